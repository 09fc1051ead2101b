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
pub mod net;
pub mod resolve;

pub use answer::ManifestHead;
pub use net::{map_reqwest, redact, retry_after};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;

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
