//! Shared-secret authentication: a bearer token read from a file, compared in constant time.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// Errors loading a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The token is unusable.
    #[error("invalid token{}: {reason}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The token file, if the token came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
}

/// A shared secret. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Makes a token from a string: surrounding whitespace is trimmed; what is left must be
    /// non-empty printable ASCII without spaces (it travels in an HTTP header).
    pub fn new(secret: &str) -> Result<Token, AuthError> {
        Self::checked(secret, None)
    }

    fn checked(secret: &str, path: Option<&Path>) -> Result<Token, AuthError> {
        let invalid = |reason: &str| AuthError::Invalid {
            path: path.map(Path::to_owned),
            reason: reason.to_owned(),
        };
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(invalid("the token is empty"));
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "the token must be printable ASCII without spaces (try: openssl rand -hex 32)",
            ));
        }
        if secret.len() < 16 {
            tracing::warn!("the token is shorter than 16 characters; use a long random one");
        }
        Ok(Token(secret.to_owned()))
    }

    /// Reads the token from the first line of `path` (trailing newline ignored). Warns if the
    /// file can be read by group or others.
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let read = |source| AuthError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(read)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "token file is accessible to group or others; chmod 600 it"
            );
        }
        let text = fs::read_to_string(path).map_err(read)?;
        Self::checked(&text, Some(path))
    }

    /// The secret, for a client to send.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The `Authorization` header value carrying this token.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// The server's authentication policy.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Requests must carry `Authorization: Bearer <token>`.
    Token(Token),
    /// No authentication (`--insecure-no-auth`): anyone who can reach the port can claim.
    Disabled,
}

impl Auth {
    /// Whether an `Authorization` header value (if any) is acceptable. The secret is
    /// compared in constant time.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        match self {
            Auth::Disabled => true,
            Auth::Token(token) => {
                let Some(value) = authorization else {
                    return false;
                };
                let Some(presented) = strip_bearer(value) else {
                    return false;
                };
                bool::from(presented.ct_eq(token.0.as_bytes()))
            }
        }
    }
}

fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    Some(value[scheme.len()..].trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let auth = Auth::Token(Token::new("s3cret-s3cret-s3cret\n").unwrap());
        assert!(auth.allows(Some(b"Bearer s3cret-s3cret-s3cret")));
        assert!(auth.allows(Some(b"bearer  s3cret-s3cret-s3cret ")));
        assert!(!auth.allows(Some(b"Bearer s3cret-s3cret-s3creT")));
        assert!(!auth.allows(Some(b"Bearer s3cret")));
        assert!(!auth.allows(Some(b"Basic s3cret-s3cret-s3cret")));
        assert!(!auth.allows(Some(b"Bearer")));
        assert!(!auth.allows(None));
        assert!(Auth::Disabled.allows(None));
    }

    #[test]
    fn bad_tokens_are_refused() {
        assert!(Token::new(" \n").is_err());
        assert!(Token::new("has space inside").is_err());
        assert!(format!("{:?}", Token::new("abc").unwrap()).contains("redacted"));
    }
}
