//! What a VMM process is to its VM: its [`Role`], and the checks a side of a pair makes at
//! start-up so that whatever the live side will need is known to work before it can win
//! the arbiter (issue #11, finding 10).

use std::fmt;

/// The role of a VMM process, as the status file and standard error name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A guest with no pair (`run`, `record`).
    Alone,
    /// A replay of a log file.
    Replaying,
    /// The primary of a live pair.
    Primary,
    /// The backup of a live pair, replaying its primary.
    Backup,
    /// A backup that won the arbiter after losing its primary and runs the VM now.
    LiveAfterFailover,
    /// A side of a pair that lost its peer and was not allowed to go on: its guest stopped.
    Halted,
}

impl Role {
    /// The name in the status file and on standard error.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Alone => "alone",
            Role::Replaying => "replaying",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::LiveAfterFailover => "live-after-failover",
            Role::Halted => "halted",
        }
    }

    /// Whether this side runs the VM for the outside world (its output is real).
    pub fn is_live(self) -> bool {
        matches!(self, Role::Alone | Role::Primary | Role::LiveAfterFailover)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A side of a pair that could not run the VM if it went live.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The guest has a card and this side, which may go live, has no TAP for it.
    #[error(
        "the {role} gives the guest a network card (--nic/--mac) but no TAP (--tap): if it \
         went live it would run the VM cut off from the network. Pass --tap NAME (the TAP on \
         this host's segment), or run without --arbiter (a side without one never goes on alone)"
    )]
    NicWithoutTap {
        /// The side.
        role: Role,
    },
}

/// What a side given a network card without a TAP may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkCheck {
    /// Nothing to say.
    Fine,
    /// Allowed, with a warning to print at start-up.
    Warn(String),
}

/// Checks at start-up that a side of a pair that may run the VM has its network: `nic` is
/// whether the guest has a card, `tap` whether this side connects it, `may_go_live` whether
/// it can ever run the VM for the outside (a primary always; a backup only with an
/// arbiter, since without one a backup that loses its primary halts).
pub fn check_network(
    role: Role,
    nic: bool,
    tap: bool,
    may_go_live: bool,
) -> Result<NetworkCheck, StartError> {
    if !nic || tap {
        return Ok(NetworkCheck::Fine);
    }
    match (role, may_go_live) {
        (Role::Backup, false) => Ok(NetworkCheck::Fine),
        (Role::Primary, false) => Ok(NetworkCheck::Warn(
            "the primary gives the guest a network card (--nic) connected to nothing (no \
             --tap): the VM has no network"
                .to_string(),
        )),
        (role, _) => Err(StartError::NicWithoutTap { role }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_that_may_go_live_needs_its_tap() {
        assert_eq!(
            check_network(Role::Backup, true, false, true),
            Err(StartError::NicWithoutTap { role: Role::Backup })
        );
        assert_eq!(
            check_network(Role::Primary, true, false, true),
            Err(StartError::NicWithoutTap {
                role: Role::Primary
            })
        );
        // A backup without an arbiter never goes live: it matches its primary's card.
        assert_eq!(
            check_network(Role::Backup, true, false, false),
            Ok(NetworkCheck::Fine)
        );
        assert!(matches!(
            check_network(Role::Primary, true, false, false),
            Ok(NetworkCheck::Warn(_))
        ));
        assert_eq!(
            check_network(Role::Backup, true, true, true),
            Ok(NetworkCheck::Fine)
        );
        assert_eq!(
            check_network(Role::Primary, false, false, true),
            Ok(NetworkCheck::Fine)
        );
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::LiveAfterFailover.to_string(), "live-after-failover");
        assert!(Role::LiveAfterFailover.is_live());
        assert!(!Role::Backup.is_live());
        assert!(!Role::Halted.is_live());
    }
}
