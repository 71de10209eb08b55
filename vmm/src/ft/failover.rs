//! The failover state machine: the one place a side of a pair decides, after losing its
//! peer, whether it goes on. Every peer loss (a failed send, a closed socket, silence, the
//! peer's divergence or error) reaches [`settle`] through the machine's single peer-loss
//! path; the machine then carries the decision out (a backup goes live, a primary releases
//! its held output, a loser halts its guest).
//!
//! Without an arbiter, or while the arbiter does not answer, nobody goes on: that is what
//! prevents split brain.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Role;

/// The answer to one [`Arbiter::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This side holds the pair's generation: it goes on alone.
    Won,
    /// Another side holds it (or it is stale): this side halts. Says who holds it.
    Lost(String),
    /// No answer could be had (unreachable, timeouts, a server error): asked again, the
    /// guest paused meanwhile.
    Unreachable(String),
    /// The arbiter refused the claim in a way that asking again will not change (a wrong
    /// token, a bad id, a generation that is not open): this side halts at once.
    Refused(String),
}

/// What decides, when one side of a live pair loses the other, which one goes on.
pub trait Arbiter: Send {
    /// Asks for the right to go on alone.
    fn claim(&mut self) -> Claim;
    /// Who is asking and for what, for messages.
    fn describe(&self) -> String;
    /// Re-protect: this side, the holder of its generation, opens the next one for itself
    /// and a new backup, and claims that one from now on. Returns the new generation, or
    /// why it could not be opened (this side then goes on alone at the old one).
    fn re_pair(&mut self) -> Result<u64, String>;
    /// A joining backup learns its pair's generation from the live side's state transfer
    /// and checks that the arbiter has it open (nobody holds it yet).
    fn join_generation(&mut self, generation: u64) -> Result<(), String>;
}

/// How often an unanswered claim is asked again.
pub const RETRY: Duration = Duration::from_millis(500);

/// A side that won: what it won and how long the arbiter took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Won {
    /// The side's role from now on ([`Role::Alone`] or [`Role::LiveAfterFailover`]).
    pub role: Role,
    /// The arbiter and the claim, for messages.
    pub what: String,
    /// From the first claim to the answer.
    pub after: Duration,
}

/// Why a side that lost its peer does not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotWon {
    /// No arbiter is configured, or it gave the generation to the other side: halt.
    #[error("{0}")]
    Halted(String),
    /// The arbiter refused the claim (a configuration error): halt, with a distinct status.
    #[error("{what}: {why}")]
    Refused {
        /// The arbiter and the claim.
        what: String,
        /// Its answer.
        why: String,
    },
    /// The process was asked to stop while waiting for the arbiter.
    #[error("stopped while waiting for the arbiter")]
    Interrupted,
}

/// The role a side takes after its peer is lost: the winner goes on (a backup live, a
/// primary alone), anyone else halts.
pub fn role_after_peer_loss(side: Role, won: bool) -> Role {
    match (side, won) {
        (Role::Backup, true) => Role::LiveAfterFailover,
        (_, true) => Role::Alone,
        (_, false) => Role::Halted,
    }
}

/// Settles a peer loss of `side`: asks `arbiter` until it answers (or `stop` is raised),
/// saying so on standard error while it does not.
pub fn settle(
    side: Role,
    arbiter: Option<&mut (dyn Arbiter + '_)>,
    stop: &AtomicBool,
) -> Result<Won, NotWon> {
    let Some(arbiter) = arbiter else {
        return Err(NotWon::Halted(
            "no arbiter is configured (--arbiter), so this side may not go on alone".into(),
        ));
    };
    let t0 = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            return Err(NotWon::Interrupted);
        }
        match arbiter.claim() {
            Claim::Won => {
                return Ok(Won {
                    role: role_after_peer_loss(side, true),
                    what: arbiter.describe(),
                    after: t0.elapsed(),
                })
            }
            Claim::Lost(holder) => {
                return Err(NotWon::Halted(format!(
                    "the arbiter gave {} to the other side ({holder})",
                    arbiter.describe()
                )))
            }
            Claim::Refused(why) => {
                return Err(NotWon::Refused {
                    what: arbiter.describe(),
                    why,
                })
            }
            Claim::Unreachable(e) => {
                eprintln!(
                    "twinvm: the arbiter did not answer ({e}); the guest stays paused until it does"
                );
                std::thread::sleep(RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    struct Scripted(VecDeque<Claim>);

    impl Arbiter for Scripted {
        fn claim(&mut self) -> Claim {
            self.0
                .pop_front()
                .unwrap_or(Claim::Unreachable("script over".into()))
        }
        fn describe(&self) -> String {
            "generation 1 of VM \"t\"".into()
        }
        fn re_pair(&mut self) -> Result<u64, String> {
            Err("scripted".into())
        }
        fn join_generation(&mut self, _: u64) -> Result<(), String> {
            Err("scripted".into())
        }
    }

    fn run(side: Role, answers: Vec<Claim>) -> Result<Won, NotWon> {
        let mut a = Scripted(answers.into());
        settle(side, Some(&mut a), &AtomicBool::new(false))
    }

    #[test]
    fn the_winner_goes_on_in_its_new_role() {
        let won = run(Role::Backup, vec![Claim::Won]).unwrap();
        assert_eq!(won.role, Role::LiveAfterFailover);
        let won = run(Role::Primary, vec![Claim::Won]).unwrap();
        assert_eq!(won.role, Role::Alone);
    }

    #[test]
    fn no_answer_is_asked_again_and_never_taken_as_a_win() {
        let won = run(
            Role::Backup,
            vec![Claim::Unreachable("down".into()), Claim::Won],
        )
        .unwrap();
        assert!(won.after >= RETRY, "{won:?}");
        // Stopped while waiting: neither won nor halted.
        let mut a = Scripted(VecDeque::new());
        assert_eq!(
            settle(Role::Primary, Some(&mut a), &AtomicBool::new(true)),
            Err(NotWon::Interrupted)
        );
    }

    #[test]
    fn losers_and_refusals_halt() {
        assert!(matches!(
            run(Role::Primary, vec![Claim::Lost("backup@b".into())]),
            Err(NotWon::Halted(w)) if w.contains("other side (backup@b)")
        ));
        assert!(matches!(
            run(Role::Backup, vec![Claim::Refused("401".into())]),
            Err(NotWon::Refused { why, .. }) if why == "401"
        ));
        assert!(matches!(
            settle(Role::Backup, None, &AtomicBool::new(false)),
            Err(NotWon::Halted(w)) if w.contains("no arbiter")
        ));
        assert_eq!(role_after_peer_loss(Role::Backup, false), Role::Halted);
    }
}
