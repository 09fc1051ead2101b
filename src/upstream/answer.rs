//! What an upstream's answer means: its HTTP status classified once, for
//! every request berth makes ([`Answer`]), and the headers berth reads.

use http::header::{self, HeaderMap};
use http::StatusCode;

use super::net::{redact, retry_after};
use crate::error::Error;
use crate::registry::media_type;
use crate::registry::Digest;

/// What an upstream's status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx.
    Success,
    /// 404: the content or repository is not there (an answer, not a failure).
    NotFound,
    /// 401, 403: our credentials (or their absence) were refused.
    Denied,
    /// 429: rate-limited.
    Throttled,
    /// 5xx.
    ServerError,
    /// Anything else (another 4xx, a 3xx not followed): this request was refused.
    Refused,
}

impl Answer {
    /// Classify a status.
    pub fn of(status: StatusCode) -> Answer {
        match status.as_u16() {
            200..=299 => Answer::Success,
            404 => Answer::NotFound,
            401 | 403 => Answer::Denied,
            429 => Answer::Throttled,
            500.. => Answer::ServerError,
            _ => Answer::Refused,
        }
    }

    /// Whether the answer tells against the endpoint rather than the
    /// request: the next endpoint is asked (see the parent module).
    pub fn is_endpoint_failure(self) -> bool {
        matches!(
            self,
            Answer::Denied | Answer::Throttled | Answer::ServerError
        )
    }
}

/// The error for an answer that is not a success; `not_found` says what a
/// 404 means for this request.
pub fn error(resp: &reqwest::Response, not_found: impl FnOnce() -> Error) -> Error {
    let status = resp.status();
    match Answer::of(status) {
        Answer::NotFound => not_found(),
        Answer::Denied => Error::UpstreamDenied(status.as_u16()),
        Answer::Throttled => Error::UpstreamThrottled(retry_after(resp.headers())),
        _ => Error::UpstreamFailed(format!("{} answered {status}", redact(resp.url()))),
    }
}

/// The `Content-Length` header. Read the header, not reqwest's
/// `content_length()`: that is the body's size hint, 0 for a HEAD response.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok())
}

/// The `Content-Type` without parameters.
pub fn content_type(h: &HeaderMap) -> Option<String> {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| media_type::essence(s).to_owned())
}

/// The count in Docker Hub's `ratelimit-limit: 100;w=21600` and
/// `ratelimit-remaining: 20;w=21600` (PROTOCOL.md 4.5).
pub fn ratelimit(h: &HeaderMap, name: &str) -> Option<i64> {
    h.get(name)?
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// `bytes START-END/TOTAL` -> (START, TOTAL if known).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// What a manifest HEAD told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when sent and valid.
    pub digest: Option<Digest>,
    /// Media type.
    pub media_type: String,
    /// `Content-Length`.
    pub size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let of = |s: u16| Answer::of(StatusCode::from_u16(s).unwrap());
        assert_eq!(of(206), Answer::Success);
        assert_eq!(of(404), Answer::NotFound);
        assert_eq!(of(403), Answer::Denied);
        assert_eq!(of(429), Answer::Throttled);
        assert_eq!(of(502), Answer::ServerError);
        assert_eq!(of(405), Answer::Refused);
        assert!(of(401).is_endpoint_failure() && !of(404).is_endpoint_failure());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
