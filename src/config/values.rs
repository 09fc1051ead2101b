//! Value types shared by the configuration ([`crate::config`]) and its
//! per-registry part ([`crate::upstream::config`]): the error, upstream
//! credentials, byte sizes. Imports nothing from the crate, so both depend
//! on it and not on each other.

use std::fmt;

/// Upstream credentials. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password: Basic auth, also used to obtain bearer tokens.
    Basic {
        /// The user (printed).
        username: String,
        /// The password (never printed).
        password: String,
    },
    /// A static bearer token.
    Token(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Token(_) => f.debug_tuple("Token").field(&"<redacted>").finish(),
        }
    }
}

/// How big the cache may grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A share (0 < f <= 1) of the cache filesystem's size.
    Share(f64),
}

/// A config problem, phrased for a person.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// `20GiB`, `500MB`, `1048576` (as `bytesize` reads them), or `50%`.
pub fn parse_capacity(s: &str) -> Result<Capacity, String> {
    let s = s.trim();
    if let Some(pct) = s.strip_suffix('%') {
        let v: f64 = pct
            .trim()
            .parse()
            .map_err(|_| "not a percentage".to_string())?;
        if !(v > 0.0 && v <= 100.0) {
            return Err("a percentage must be in (0, 100]".into());
        }
        return Ok(Capacity::Share(v / 100.0));
    }
    // bytesize wants a unit after a fraction or a number past u64: bytes.
    let bare = s.ends_with(|c: char| c.is_ascii_digit() || c == '.');
    let bytes: bytesize::ByteSize = if bare {
        format!("{s}B").parse()
    } else {
        s.parse()
    }
    .map_err(|_| "expected a number with an optional unit (20GiB, 500MB, 1048576)")?;
    if bytes.0 == 0 {
        return Err("capacity must be positive".into());
    }
    Ok(Capacity::Bytes(bytes.0))
}

/// A byte rate per second (`50MiB`): a [`parse_capacity`] in bytes, not a share.
pub fn parse_rate(s: &str) -> Option<u64> {
    match parse_capacity(s) {
        Ok(Capacity::Bytes(b)) => Some(b),
        _ => None,
    }
}
