//! Talking to upstream registries. Each mirrored registry has an ordered
//! list of [`endpoint::Endpoint`]s (a hub project first, the origin last);
//! a request moves to the next endpoint when one refuses connections, times
//! out, answers 5xx, 429, or 401/403 after authenticating, or its circuit
//! breaker is open. A 404 is an answer, not a failure: it does not fall back.

pub mod answer;
pub mod auth;
pub mod breaker;
pub mod check;
pub mod config;
pub mod endpoint;
pub mod limiter;
pub mod resolve;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use url::Url;

use crate::config::{Config, ConfigError, RegistryConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::registry::{Digest, Reference, RegistryHost, Repository};
use crate::transfer;
use breaker::Failure;
use endpoint::Endpoint;

/// All configured upstreams by registry host. Anything else is refused
/// before a request is made (the SSRF guard for `?ns=`).
pub struct Upstreams {
    by_host: BTreeMap<RegistryHost, Arc<Upstream>>,
}

impl Upstreams {
    /// Build the clients of every registry's endpoints.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Upstreams, ConfigError> {
        let mut by_host = BTreeMap::new();
        for (host, reg) in &config.registries {
            by_host.insert(host.clone(), Arc::new(Upstream::new(reg, config, metrics)?));
        }
        Ok(Upstreams { by_host })
    }

    /// The upstream for a registry host, if it is mirrored.
    pub fn get(&self, host: &RegistryHost) -> Option<&Arc<Upstream>> {
        self.by_host.get(host)
    }

    /// Every upstream.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_host.values()
    }
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

/// One mirrored registry: its endpoints in order.
pub struct Upstream {
    /// The registry host clients name.
    pub host: RegistryHost,
    /// Endpoints, tried in order.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Blobs whose bytes from some endpoints were bad or too slow lately:
    /// a bit per endpoint index, for an hour.
    faults: moka::sync::Cache<Digest, u64>,
    /// Serve a cached tag even when upstream answers it is gone.
    pub serve_stale_on_not_found: bool,
    /// Cached content is private (see `RegistryConfig::private`).
    pub private: bool,
}

/// How long an endpoint that served bad or trickling bytes of a blob is
/// asked last for that blob.
const FAULT_MEMORY: Duration = Duration::from_secs(3600);

/// Whether an error from one endpoint should send the request to the next,
/// and what it tells the breaker.
fn failure_of(e: &Error) -> Option<Failure> {
    match e {
        Error::UpstreamUnreachable(_) => Some(Failure::Transport),
        Error::UpstreamTimeout(_) => Some(Failure::Timeout),
        Error::UpstreamThrottled(after) => Some(Failure::Throttled(*after)),
        Error::UpstreamDenied(_) => Some(Failure::Denied),
        Error::UpstreamFailed(_) | Error::DigestMismatch { .. } => Some(Failure::Server),
        _ => None,
    }
}

impl Upstream {
    fn new(
        reg: &RegistryConfig,
        config: &Config,
        metrics: &Metrics,
    ) -> Result<Upstream, ConfigError> {
        let endpoints = reg
            .endpoints
            .iter()
            .map(|ep| Endpoint::new(&reg.host, ep, config, metrics.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.len() > 64 {
            return Err(ConfigError(format!(
                "registry {}: at most 64 endpoints",
                reg.host
            )));
        }
        Ok(Upstream {
            host: reg.host.clone(),
            endpoints,
            faults: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(FAULT_MEMORY)
                .build(),
            serve_stale_on_not_found: reg.serve_stale_on_not_found,
            private: reg.private,
        })
    }

    /// Run `op` on each endpoint in order until one answers; endpoints in
    /// `defer` (they failed this very object) are tried after the others.
    /// Endpoints whose breaker is open are skipped without a request; if
    /// every one is open, one request at a time still probes them (see
    /// [`breaker`]) and the others get the last error at once.
    /// `op` gets each endpoint with its index in the list.
    async fn first<'a, T, F, Fut>(&'a self, what: &str, defer: u64, op: F) -> Result<T, Error>
    where
        F: Fn(usize, &'a Arc<Endpoint>) -> Fut,
        Fut: Future<Output = Result<T, Error>> + 'a,
    {
        let n = self.endpoints.len();
        let order = (0..n)
            .filter(|i| defer & (1 << i) == 0)
            .chain((0..n).filter(|i| defer & (1 << i) != 0));
        let mut last = None;
        let mut tried = false;
        for last_resort in [false, true] {
            if last_resort && tried {
                break;
            }
            for i in order.clone() {
                let ep = &self.endpoints[i];
                let Some(admitted) = ep.breaker.admit(last_resort) else {
                    if !last_resort {
                        tracing::debug!(registry = %self.host, endpoint = %ep.label, what, "endpoint skipped: circuit open");
                    }
                    continue;
                };
                tried = true;
                match op(i, ep).await {
                    Ok(v) => {
                        admitted.success();
                        return Ok(v);
                    }
                    Err(e) => match failure_of(&e) {
                        Some(f) => {
                            admitted.failure(f);
                            tracing::warn!(registry = %self.host, endpoint = %ep.label, what, error = %e, detail = ?e.detail(), "upstream endpoint failed; trying the next");
                            last = Some(e);
                        }
                        None => {
                            admitted.success();
                            return Err(e);
                        }
                    },
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::UpstreamUnreachable(format!(
                "every endpoint of {} is backing off after failures",
                self.host
            ))
        }))
    }

    /// HEAD a manifest: digest, type and size without a counted pull.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<ManifestHead, Error> {
        self.first("manifest HEAD", 0, |_, ep| {
            ep.head_manifest(repo, reference)
        })
        .await
    }

    /// GET a manifest's bytes and media type; with `expect`, bytes that do
    /// not match are a failure of that endpoint and the next one is asked.
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        expect: Option<&Digest>,
    ) -> Result<(String, Bytes), Error> {
        self.first("manifest GET", 0, |_, ep| async move {
            let (mt, bytes) = ep.get_manifest(repo, reference).await?;
            if let Some(expected) = expect {
                let actual = Digest::of(&bytes);
                if &actual != expected {
                    ep.metrics.digest_mismatches.inc();
                    tracing::warn!(registry = %ep.host, endpoint = %ep.label, %expected, %actual, "upstream manifest failed verification; not cached");
                    return Err(Error::DigestMismatch { expected: expected.to_string(), actual: actual.to_string() });
                }
            }
            Ok((mt, bytes))
        })
        .await
    }

    /// Open a blob's body at `offset` on the first endpoint that serves it.
    /// Endpoints whose bytes for this blob failed verification or trickled
    /// below the minimum rate lately are asked last; the body carries a
    /// [`transfer::Blame`] that records such a fault against its endpoint.
    pub async fn open_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<transfer::Body, Error> {
        let defer = self.faults.get(digest).unwrap_or(0);
        self.first("blob GET", defer, |index, ep| async move {
            let mut body = ep.open_blob(repo, digest, offset).await?;
            let (faults, ep, d) = (self.faults.clone(), ep.clone(), digest.clone());
            let endpoints = self.endpoints.len();
            body.blame = Some(Box::new(move |fault| {
                if fault == transfer::Fault::Mismatch {
                    ep.metrics.digest_mismatches.inc();
                }
                tracing::warn!(registry = %ep.host, endpoint = %ep.label, digest = %d, ?fault, "endpoint failed this blob; the next attempt asks the next endpoint first");
                ep.breaker.failure(Failure::Server);
                let bits = faults
                    .entry(d.clone())
                    .and_upsert_with(|old| old.map_or(0, |e| e.into_value()) | (1 << index))
                    .into_value();
                bits.count_ones() < endpoints as u32
            }));
            Ok(body)
        })
        .await
    }

    /// A blob's size.
    pub async fn head_blob(&self, repo: &Repository, digest: &Digest) -> Result<u64, Error> {
        self.first("blob HEAD", 0, |_, ep| ep.head_blob(repo, digest))
            .await
    }

    /// Relay a GET (tag lists, referrers). 5xx/429/401/403 fall back.
    pub async fn passthrough(
        &self,
        repo: &Repository,
        tail: &str,
        accept: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, Error> {
        self.first("relay", 0, |_, ep| ep.passthrough(repo, tail, accept))
            .await
    }
}

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

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                // Shared address space (RFC 6598): internal cloud services
                // live there (Alibaba Cloud's metadata at 100.100.100.200).
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
            // addresses reach the embedded IPv4 address.
            let embedded = (s[..6] == [0, 0, 0, 0, 0, 0xffff]
                || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
            .then(|| {
                let o = v6.octets();
                std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15])
            });
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || embedded.is_some_and(|v4| is_private(v4.into()))
        }
    }
}

pub(crate) fn url_is_private(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_private(ip.into()),
        Some(url::Host::Ipv6(ip)) => is_private(ip.into()),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost")
        }
        None => true,
    }
}

/// Whether the connection was reset or closed before a complete response
/// (after it was established), also before the request could be written
/// (hyper reports that as canceled): transient, worth one immediate retry
/// on a new connection.
pub(crate) fn connection_dropped(e: &reqwest::Error) -> bool {
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
pub(crate) fn map_reqwest(e: reqwest::Error) -> Error {
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
    fn private_addresses() {
        let u = |s: &str| Url::parse(s).unwrap();
        for p in [
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://169.254.169.254/",
            "http://[::1]/",
            "http://localhost:5000/",
            "http://[fe80::1]/",
            "http://192.168.1.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://100.100.100.200/",
            "http://2130706433/",
        ] {
            assert!(url_is_private(&u(p)), "{p}");
        }
        for p in [
            "https://registry-1.docker.io/",
            "http://8.8.8.8/",
            "http://[2001:db8::1]/",
            "http://[::ffff:8.8.8.8]/",
            "http://100.128.0.1/",
        ] {
            assert!(!url_is_private(&u(p)), "{p}");
        }
    }

    #[test]
    fn redaction_drops_queries() {
        let u = Url::parse("https://auth.example/token?scope=x&password=y").unwrap();
        assert_eq!(redact(&u), "https://auth.example/token");
    }
}
