//! berth's error type, classified by who is at fault (the client, the
//! upstream, or berth itself), and its one mapping to an HTTP status and an
//! OCI error code. Turning an error into a response has no side effects; the
//! access log records it.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::registry::ErrorCode;

/// Who caused an error; decides the status class and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The request was wrong (4xx).
    Client,
    /// The upstream registry failed or refused (502/503/504, or its 404).
    Upstream,
    /// berth's own fault (500).
    Internal,
}

/// Every failure berth can report to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The repository name does not match the spec grammar.
    #[error("invalid repository name")]
    NameInvalid(String),
    /// An `ns` or path-style registry that berth does not mirror. Refused
    /// without any upstream request.
    #[error("registry is not mirrored by this berth")]
    RegistryUnknown(String),
    /// Neither a valid tag nor a valid digest.
    #[error("invalid tag")]
    TagInvalid(String),
    /// A malformed or unsupported digest.
    #[error("invalid digest")]
    DigestInvalid(String),
    /// No such manifest (upstream said 404, or offline and never cached).
    #[error("manifest unknown")]
    ManifestUnknown(String),
    /// No such blob.
    #[error("blob unknown")]
    BlobUnknown(String),
    /// A route berth does not serve (push, delete, catalog, ...).
    #[error("not supported by a read-only pull-through mirror")]
    Unsupported(&'static str),
    /// The client did not present the configured client token.
    #[error("authentication required")]
    Unauthorized,
    /// A path that is not part of the registry API.
    #[error("no such API route")]
    NotFound(String),
    /// A `Range` berth cannot satisfy; carries the full size.
    #[error("requested range not satisfiable")]
    RangeInvalid(u64),
    /// The upstream could not be reached (connect refused, DNS, TLS).
    #[error("upstream registry unreachable")]
    UpstreamUnreachable(String),
    /// The upstream did not answer in time.
    #[error("upstream registry timed out")]
    UpstreamTimeout(Duration),
    /// The upstream refused our credentials (401/403 after authenticating).
    #[error("upstream registry denied access")]
    UpstreamDenied(u16),
    /// The upstream is throttling us.
    #[error("upstream registry is rate limiting")]
    UpstreamThrottled(Option<Duration>),
    /// Any other unexpected upstream status or protocol violation.
    #[error("upstream registry failed")]
    UpstreamFailed(String),
    /// Upstream bytes did not hash to the digest they were fetched by.
    #[error("upstream content does not match its digest")]
    DigestMismatch {
        /// What was asked for.
        expected: String,
        /// What the bytes hashed to.
        actual: String,
    },
    /// The manifest is larger than any client would accept.
    #[error("manifest too large")]
    ManifestTooLarge(u64),
    /// Local I/O failed.
    #[error("local storage error")]
    Io(Arc<std::io::Error>),
    /// Any other bug-like condition.
    #[error("internal error")]
    Internal(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl Error {
    /// Who is at fault.
    pub fn source_kind(&self) -> Source {
        use Error::*;
        match self {
            NameInvalid(_) | RegistryUnknown(_) | TagInvalid(_) | DigestInvalid(_)
            | Unsupported(_) | RangeInvalid(_) | NotFound(_) | Unauthorized => Source::Client,
            ManifestUnknown(_)
            | BlobUnknown(_)
            | UpstreamUnreachable(_)
            | UpstreamTimeout(_)
            | UpstreamDenied(_)
            | UpstreamThrottled(_)
            | UpstreamFailed(_)
            | DigestMismatch { .. }
            | ManifestTooLarge(_) => Source::Upstream,
            Io(_) | Internal(_) => Source::Internal,
        }
    }

    /// The HTTP status. Any status >= 400 makes containerd move on to the next
    /// host; 429 is avoided on purpose because containerd retries it
    /// immediately up to five times (PROTOCOL.md 4.1, "Retries").
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            NameInvalid(_) | TagInvalid(_) | DigestInvalid(_) => StatusCode::BAD_REQUEST,
            RegistryUnknown(_) | ManifestUnknown(_) | BlobUnknown(_) | NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            RangeInvalid(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            UpstreamDenied(_) => StatusCode::FORBIDDEN,
            Unauthorized => StatusCode::UNAUTHORIZED,
            UpstreamThrottled(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamUnreachable(_)
            | UpstreamFailed(_)
            | DigestMismatch { .. }
            | ManifestTooLarge(_) => StatusCode::BAD_GATEWAY,
            Io(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI error code.
    pub fn code(&self) -> ErrorCode {
        use Error::*;
        match self {
            NameInvalid(_) => ErrorCode::NameInvalid,
            RegistryUnknown(_) => ErrorCode::NameUnknown,
            TagInvalid(_) => ErrorCode::ManifestInvalid,
            DigestInvalid(_) => ErrorCode::DigestInvalid,
            ManifestUnknown(_) => ErrorCode::ManifestUnknown,
            BlobUnknown(_) => ErrorCode::BlobUnknown,
            Unsupported(_) | NotFound(_) => ErrorCode::Unsupported,
            RangeInvalid(_) => ErrorCode::RangeInvalid,
            UpstreamDenied(_) => ErrorCode::Denied,
            Unauthorized => ErrorCode::Unauthorized,
            UpstreamThrottled(_) => ErrorCode::Toomanyrequests,
            ManifestTooLarge(_) => ErrorCode::SizeInvalid,
            UpstreamUnreachable(_)
            | UpstreamTimeout(_)
            | UpstreamFailed(_)
            | DigestMismatch { .. }
            | Io(_)
            | Internal(_) => ErrorCode::Unknown,
        }
    }

    /// The `detail` member of the envelope: the offending value for client
    /// errors, the upstream's reason for upstream errors. Never a secret:
    /// upstream reasons are built from status codes and URLs without query
    /// strings (see `upstream::redact`).
    pub fn detail(&self) -> Option<String> {
        use Error::*;
        match self {
            NameInvalid(s)
            | RegistryUnknown(s)
            | TagInvalid(s)
            | DigestInvalid(s)
            | ManifestUnknown(s)
            | BlobUnknown(s)
            | UpstreamUnreachable(s)
            | UpstreamFailed(s)
            | NotFound(s)
            | Internal(s) => Some(s.clone()),
            Unsupported(s) => Some((*s).to_owned()),
            RangeInvalid(size) => Some(format!("size {size}")),
            UpstreamTimeout(d) => Some(format!("after {}", humantime::format_duration(*d))),
            UpstreamDenied(status) => Some(format!("upstream status {status}")),
            DigestMismatch { expected, actual } => {
                Some(format!("expected {expected}, got {actual}"))
            }
            ManifestTooLarge(n) => Some(format!("{n} bytes")),
            UpstreamThrottled(_) | Unauthorized => None,
            Io(e) => Some(e.kind().to_string()),
        }
    }

    /// The message with its detail, for people reading a command's output.
    pub fn explained(&self) -> String {
        match self.detail() {
            Some(d) => format!("{self} ({d})"),
            None => self.to_string(),
        }
    }

    /// Whether the upstream said the thing does not exist (as opposed to
    /// failing): a cached tag is then not served stale by default.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::ManifestUnknown(_) | Error::BlobUnknown(_))
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(Error::NameInvalid("x".into()).status(), 400);
        assert_eq!(Error::RegistryUnknown("x".into()).status(), 404);
        assert_eq!(
            Error::RegistryUnknown("x".into()).code(),
            ErrorCode::NameUnknown
        );
        assert_eq!(Error::Unsupported("push").status(), 405);
        assert_eq!(
            Error::UpstreamThrottled(None).status(),
            503,
            "never 429 towards containerd"
        );
        assert_eq!(Error::UpstreamTimeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(
            Error::from(std::io::Error::other("x")).source_kind(),
            Source::Internal
        );
    }
}
