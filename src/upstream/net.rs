//! What a transport exchange with an upstream means: errors mapped without
//! leaking URLs, dropped connections worth one retry, `Retry-After`, and
//! URLs fit for logs.

use std::time::Duration;

use http::header::HeaderMap;
use url::Url;

use super::resolve;
use crate::error::Error;

/// `Retry-After` as seconds (HTTP dates are rare from registries and are
/// treated as absent).
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Whether the connection was reset or closed before a complete response
/// (after it was established), also before the request could be written
/// (hyper reports that as canceled): transient, worth one immediate retry
/// on a new connection.
pub fn connection_dropped(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() {
        return false;
    }
    std::iter::successors(std::error::Error::source(e), |s| s.source()).any(|c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_closed() || h.is_canceled())
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                use std::io::ErrorKind::*;
                matches!(
                    io.kind(),
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                )
            })
    })
}

/// Map a transport error without leaking the URL's query string.
pub fn map_reqwest(e: reqwest::Error) -> Error {
    let what = e.url().map(redact).unwrap_or_default();
    // The innermost cause says what really happened (refused, reset, a TLS
    // certificate problem); it is an I/O or rustls message, never a secret.
    let causes = || std::iter::successors(std::error::Error::source(&e), |s| s.source());
    let root = causes()
        .last()
        .map(|c| format!(": {c}"))
        .unwrap_or_default();
    let closed = connection_dropped(&e);
    let refused = causes().find_map(|c| c.downcast_ref::<resolve::Refused>());
    if let Some(refused) = refused {
        // The SSRF guard's own refusal: an upstream failure, not a dead host.
        Error::UpstreamFailed(format!("{what}: {refused}"))
    } else if e.is_timeout() {
        Error::UpstreamTimeout(Duration::ZERO)
    } else if e.is_connect() {
        Error::UpstreamUnreachable(format!("cannot connect to {what}{root}"))
    } else if closed {
        // A peer that accepts and drops connections is as dead as one that refuses them.
        Error::UpstreamUnreachable(format!(
            "connection to {what} closed before a complete response{root}"
        ))
    } else if e.is_redirect() {
        Error::UpstreamFailed(format!("refused or too many redirects from {what}"))
    } else {
        Error::UpstreamFailed(format!("{what}: {}{root}", e.without_url()))
    }
}

/// A URL fit for logs and error details: no query, no credentials.
pub fn redact(url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_queries() {
        let u = Url::parse("https://auth.example/token?scope=x&password=y").unwrap();
        assert_eq!(redact(&u), "https://auth.example/token");
    }
}
