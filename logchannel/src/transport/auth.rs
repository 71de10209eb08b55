//! Pair authentication: both ends of a log channel prove they hold the same secret, by
//! challenge-response, before the backup accepts any log entry. The secret never crosses
//! the wire.
//!
//! ```text
//! primary                                        backup
//!   AuthHello { version, header, nonce_p } ---->
//!                    <------------------------- AuthChallenge { nonce_b }
//!   AuthProof { mac_p } ----------------------->  verify mac_p (constant time), check header
//!                    <------------------------- AuthWelcome { version, mac_b }  (or Refuse)
//!   verify mac_b (constant time)
//!
//! mac_r = HMAC-SHA256(secret, DOMAIN || nonce_p || nonce_b || role_r || SHA-256(header))
//! ```
//!
//! Both nonces are 32 random bytes, fresh per connection, so a proof is never valid on
//! another connection, and the role byte keeps a proof made by one side from being
//! reflected as the other's. The backup proves itself only after the primary did, so a
//! stranger that connects to the backup learns nothing but a nonce.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::entry::LogHeader;

/// Length of a nonce and of a proof.
pub const NONCE_LEN: usize = 32;
/// The shortest pair secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// Domain separation for the proofs (changes with the authentication scheme).
const DOMAIN: &[u8] = b"twinvm logchannel pair auth v1\0";

type HmacSha256 = Hmac<Sha256>;

/// The secret shared by the two ends of a pair (`--pair-secret-file`). Its `Debug` output
/// does not show it.
#[derive(Clone)]
pub struct PairSecret(Arc<[u8]>);

impl std::fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairSecret(<{} bytes, redacted>)", self.0.len())
    }
}

/// Why a pair secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read the pair secret file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The secret is too short to resist guessing.
    #[error("the pair secret{} is {len} bytes; at least {MIN_SECRET_LEN} are needed (e.g. `openssl rand -hex 32`)", .path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    TooShort {
        /// The file, if it came from one.
        path: Option<PathBuf>,
        /// Its length.
        len: usize,
    },
}

impl PairSecret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<PairSecret, SecretError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                path: None,
                len: bytes.len(),
            });
        }
        Ok(PairSecret(bytes.into()))
    }

    /// Reads the secret from the first line of `path` (trailing whitespace and the line
    /// end are not part of it). Warns if the file is readable by group or others.
    pub fn from_file(path: &Path) -> Result<PairSecret, SecretError> {
        let read_err = |source| SecretError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = std::fs::read(path).map_err(read_err)?;
        let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
        let end = line
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let secret = PairSecret::new(&line[..end]).map_err(|e| match e {
            SecretError::TooShort { len, .. } => SecretError::TooShort {
                path: Some(path.to_owned()),
                len,
            },
            other => other,
        })?;
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "the pair secret file is readable by group or others; chmod 600 it"
                );
            }
        }
        Ok(secret)
    }
}

/// Which side a proof is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Primary,
    Backup,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Primary => b"P",
            Role::Backup => b"B",
        }
    }
}

/// A fresh random nonce.
pub(crate) fn nonce() -> io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

/// What the proofs of one connection are bound to.
#[derive(Debug, Clone)]
pub(crate) struct Transcript {
    pub nonce_primary: [u8; NONCE_LEN],
    pub nonce_backup: [u8; NONCE_LEN],
    pub header_hash: [u8; 32],
}

impl Transcript {
    pub fn new(
        nonce_primary: [u8; NONCE_LEN],
        nonce_backup: [u8; NONCE_LEN],
        header: &LogHeader,
    ) -> Transcript {
        let encoded = postcard::to_stdvec(header).expect("a header always encodes");
        Transcript {
            nonce_primary,
            nonce_backup,
            header_hash: Sha256::digest(&encoded).into(),
        }
    }

    fn mac(&self, secret: &PairSecret, role: Role) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        mac.update(&self.nonce_primary);
        mac.update(&self.nonce_backup);
        mac.update(role.tag());
        mac.update(&self.header_hash);
        mac
    }

    /// The proof `role` sends.
    pub fn proof(&self, secret: &PairSecret, role: Role) -> [u8; NONCE_LEN] {
        self.mac(secret, role).finalize().into_bytes().into()
    }

    /// Whether `proof` is `role`'s proof under `secret` (constant-time comparison).
    pub fn verify(&self, secret: &PairSecret, role: Role, proof: &[u8; NONCE_LEN]) -> bool {
        self.mac(secret, role).verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader::new([1; 32], [2; 32], "console=ttyS0", 128, 10_000, "vm-a")
    }

    #[test]
    fn proofs_bind_secret_role_nonces_and_header() {
        let s = PairSecret::new(*b"0123456789abcdef").unwrap();
        let t = Transcript::new([1; 32], [2; 32], &header());
        let p = t.proof(&s, Role::Primary);
        assert!(t.verify(&s, Role::Primary, &p));
        assert!(
            !t.verify(&s, Role::Backup, &p),
            "reflected as the other role"
        );
        let other = PairSecret::new(*b"0123456789abcdeX").unwrap();
        assert!(!t.verify(&other, Role::Primary, &p), "another secret");
        let t2 = Transcript::new([1; 32], [3; 32], &header());
        assert!(!t2.verify(&s, Role::Primary, &p), "another nonce");
        let mut h = header();
        h.vm_id = "vm-b".into();
        let t3 = Transcript::new([1; 32], [2; 32], &h);
        assert!(!t3.verify(&s, Role::Primary, &p), "another header");
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }

    #[test]
    fn secrets_come_from_the_first_line_and_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123  \nsecond line\n").unwrap();
        let s = PairSecret::from_file(&path).unwrap();
        assert_eq!(&*s.0, b"0123456789abcdef0123");
        assert!(!format!("{s:?}").contains("0123"), "Debug shows the secret");
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(
            PairSecret::from_file(&path),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        assert!(matches!(
            PairSecret::from_file(&dir.path().join("missing")),
            Err(SecretError::Read { .. })
        ));
    }
}
