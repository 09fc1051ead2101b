//! Talking to upstream registries: one `reqwest` client per mirrored
//! registry (rustls, its own CA and `insecure` opt-in), the auth dance, and
//! the four reads berth needs: manifest HEAD/GET, blob GET from an offset,
//! blob HEAD, and pass-through of tag lists and referrers.

pub mod auth;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use url::Url;

use crate::cache::flight;
use crate::config::{Config, ConfigError, Credentials, RegistryConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::registry::media_type::{self, MANIFEST_ACCEPT, MAX_MANIFEST_SIZE};
use crate::registry::{Digest, Reference, RegistryHost, Repository};
use auth::{parse_challenge, Challenge, TokenCache};

/// All configured upstreams by registry host. Anything else is refused
/// before a request is made (the SSRF guard for `?ns=`).
pub struct Upstreams {
    by_host: BTreeMap<RegistryHost, Arc<Upstream>>,
}

impl Upstreams {
    /// Build a client per registry.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Upstreams, ConfigError> {
        let mut by_host = BTreeMap::new();
        for (host, reg) in &config.registries {
            by_host.insert(
                host.clone(),
                Arc::new(Upstream::new(reg, config, metrics.clone())?),
            );
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

/// One upstream registry.
pub struct Upstream {
    /// The registry host clients name.
    pub host: RegistryHost,
    base: Url,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// The registry answered a Basic challenge once: send Basic up front.
    basic: AtomicBool,
    read_timeout: Duration,
    metrics: Metrics,
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

fn url_is_private(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_private(ip.into()),
        Some(url::Host::Ipv6(ip)) => is_private(ip.into()),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost")
        }
        None => true,
    }
}

/// Map a transport error without leaking the URL's query string.
pub(crate) fn map_reqwest(e: reqwest::Error) -> Error {
    let what = e.url().map(redact).unwrap_or_default();
    if e.is_timeout() {
        Error::UpstreamTimeout(Duration::ZERO)
    } else if e.is_connect() {
        Error::UpstreamUnreachable(format!("cannot connect to {what}"))
    } else if e.is_redirect() {
        Error::UpstreamFailed(format!("refused or too many redirects from {what}"))
    } else {
        Error::UpstreamFailed(format!("{what}: {}", e.without_url()))
    }
}

/// A URL fit for logs and error details: no query, no credentials.
pub fn redact(url: &Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    )
}

impl Upstream {
    fn new(
        reg: &RegistryConfig,
        config: &Config,
        metrics: Metrics,
    ) -> Result<Upstream, ConfigError> {
        let allow_private = url_is_private(&reg.url);
        // Follow redirects (Docker Hub, registry.k8s.io send blobs to CDNs).
        // reqwest drops Authorization on a cross-host redirect. A redirect into
        // loopback, link-local (cloud metadata) or private ranges is refused
        // unless the upstream itself lives there.
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if !allow_private && url_is_private(attempt.url()) {
                attempt.error("redirect to a private address refused")
            } else {
                attempt.follow()
            }
        });
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(policy)
            .use_rustls_tls()
            .https_only(false);
        if let Some(ca) = &reg.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| ConfigError(format!("{}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ConfigError(format!("{}: not a PEM CA bundle ({e})", ca.display())))?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if reg.insecure {
            tracing::warn!(registry = %reg.host, "TLS certificate verification is DISABLED for this upstream (insecure = true)");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| ConfigError(format!("registry {}: {e}", reg.host)))?;
        let mut base = reg.url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Upstream {
            host: reg.host.clone(),
            base,
            client,
            credentials: reg.credentials.clone(),
            tokens: TokenCache::default(),
            basic: AtomicBool::new(false),
            read_timeout: config.read_timeout,
            metrics,
        })
    }

    /// The upstream base URL (for logs).
    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, repo: &Repository, tail: &str) -> Result<Url, Error> {
        self.base
            .join(&format!("v2/{}/{}", repo.as_str(), tail))
            .map_err(|e| Error::Internal(format!("building upstream URL: {e}")))
    }

    async fn auth_header(&self, scope: &str) -> Option<String> {
        match &self.credentials {
            Some(Credentials::Token(t)) => return Some(format!("Bearer {t}")),
            Some(Credentials::Basic { username, password })
                if self.basic.load(Ordering::Relaxed) =>
            {
                use base64::Engine as _;
                let raw = format!("{username}:{password}");
                return Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ));
            }
            _ => {}
        }
        self.tokens.cached(scope).await.map(|t| t.header())
    }

    /// Send a body-less request, answering one auth challenge.
    async fn send(
        &self,
        method: Method,
        repo: &Repository,
        tail: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let url = self.url(repo, tail)?;
        let scope = format!("repository:{}:pull", repo.as_str());
        let mut retried = false;
        loop {
            let mut req = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(h) = self.auth_header(&scope).await {
                req = req.header(header::AUTHORIZATION, h);
            }
            let kind = kind_of(tail);
            let started = std::time::Instant::now();
            let sent = req.send().await;
            let status = sent
                .as_ref()
                .map(|r| r.status().as_str().to_owned())
                .unwrap_or_else(|_| "error".into());
            self.metrics
                .upstream_requests
                .with_label_values(&[self.host.as_str(), kind, &status])
                .inc();
            self.metrics
                .upstream_duration
                .with_label_values(&[self.host.as_str(), kind])
                .observe(started.elapsed().as_secs_f64());
            let resp = sent.map_err(|e| match map_reqwest(e) {
                Error::UpstreamTimeout(_) => Error::UpstreamTimeout(self.read_timeout),
                other => other,
            })?;
            if kind == "manifest" {
                self.record_ratelimit(resp.headers());
            }
            if resp.status() != StatusCode::UNAUTHORIZED || retried {
                return Ok(resp);
            }
            let Some(challenge) = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge)
            else {
                return Ok(resp);
            };
            retried = true;
            match challenge {
                Challenge::Basic => match &self.credentials {
                    Some(Credentials::Basic { .. }) => self.basic.store(true, Ordering::Relaxed),
                    _ => return Ok(resp),
                },
                bearer @ Challenge::Bearer { .. } => {
                    if matches!(self.credentials, Some(Credentials::Token(_))) {
                        return Ok(resp);
                    }
                    self.tokens.forget(&scope).await;
                    self.tokens
                        .get(
                            &self.client,
                            &self.base,
                            &bearer,
                            &scope,
                            self.credentials.as_ref(),
                        )
                        .await?;
                }
            }
        }
    }

    /// Export Docker Hub's `ratelimit-limit: 100;w=21600` and
    /// `ratelimit-remaining: 20;w=21600` (PROTOCOL.md 4.5).
    fn record_ratelimit(&self, h: &HeaderMap) {
        let read = |name: &str| -> Option<i64> {
            h.get(name)?
                .to_str()
                .ok()?
                .split(';')
                .next()?
                .trim()
                .parse()
                .ok()
        };
        if let Some(v) = read("ratelimit-remaining") {
            self.metrics
                .ratelimit_remaining
                .with_label_values(&[self.host.as_str()])
                .set(v);
        }
        if let Some(v) = read("ratelimit-limit") {
            self.metrics
                .ratelimit_limit
                .with_label_values(&[self.host.as_str()])
                .set(v);
        }
    }

    /// Count content bytes received.
    fn count_bytes(&self, kind: &str, n: usize) {
        self.metrics
            .upstream_bytes
            .with_label_values(&[self.host.as_str(), kind])
            .inc_by(n as u64);
    }

    /// Classify a non-success status.
    fn status_error(&self, resp: &reqwest::Response, not_found: impl FnOnce() -> Error) -> Error {
        let status = resp.status();
        match status.as_u16() {
            404 => not_found(),
            401 | 403 => Error::UpstreamDenied(status.as_u16()),
            429 => Error::UpstreamThrottled,
            _ => Error::UpstreamFailed(format!("{} answered {status}", redact(resp.url()))),
        }
    }

    /// HEAD a manifest: digest, type and size without a counted pull.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<ManifestHead, Error> {
        let resp = self
            .send(
                Method::HEAD,
                repo,
                &format!("manifests/{reference}"),
                manifest_accept(),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, || {
                Error::ManifestUnknown(format!("{repo}:{reference}"))
            }));
        }
        let h = resp.headers();
        Ok(ManifestHead {
            digest: h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok()),
            media_type: content_type(h).unwrap_or_default(),
            size: h
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok()),
        })
    }

    /// GET a manifest's bytes and media type (bounded to containerd's limit).
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<(String, Bytes), Error> {
        let resp = self
            .send(
                Method::GET,
                repo,
                &format!("manifests/{reference}"),
                manifest_accept(),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, || {
                Error::ManifestUnknown(format!("{repo}:{reference}"))
            }));
        }
        if let Some(len) = resp.content_length().filter(|l| *l > MAX_MANIFEST_SIZE) {
            return Err(Error::ManifestTooLarge(len));
        }
        let ct = content_type(resp.headers());
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(map_reqwest)?;
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST_SIZE {
                return Err(Error::ManifestTooLarge((body.len() + chunk.len()) as u64));
            }
            body.extend_from_slice(&chunk);
        }
        let body = body.freeze();
        self.count_bytes("manifest", body.len());
        let media_type = match ct {
            Some(ct)
                if !matches!(
                    ct.as_str(),
                    "" | "application/octet-stream" | "text/plain" | "application/json"
                ) =>
            {
                ct
            }
            _ => media_type::sniff(&body),
        };
        Ok((media_type, body))
    }

    /// Open a blob's body at `offset` (a resume after a broken body).
    pub async fn open_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<flight::Body, Error> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("range header"),
            );
        }
        let resp = self
            .send(Method::GET, repo, &format!("blobs/{digest}"), headers)
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_error(&resp, || Error::BlobUnknown(digest.to_string())));
        }
        let (size, skip) = if status == StatusCode::PARTIAL_CONTENT {
            let cr = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match parse_content_range(cr) {
                Some((start, total)) if start == offset => (total, 0),
                _ => {
                    return Err(Error::UpstreamFailed(format!(
                        "unexpected Content-Range {cr:?} resuming at {offset}"
                    )))
                }
            }
        } else {
            // The upstream ignored the Range: drop what we already have.
            (resp.content_length(), offset)
        };
        let mut to_skip = skip;
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let stream = resp.bytes_stream().filter_map(move |chunk| {
            if let Ok(b) = &chunk {
                metrics
                    .upstream_bytes
                    .with_label_values(&[host.as_str(), "blob"])
                    .inc_by(b.len() as u64);
            }
            let out = match chunk {
                Err(e) => Some(Err(map_reqwest(e))),
                Ok(mut b) if to_skip > 0 => {
                    let n = to_skip.min(b.len() as u64);
                    to_skip -= n;
                    let rest = b.split_off(n as usize);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                Ok(b) => Some(Ok(b)),
            };
            std::future::ready(out)
        });
        Ok(flight::Body {
            size,
            stream: stream.boxed(),
        })
    }

    /// HEAD a blob: its size.
    pub async fn head_blob(&self, repo: &Repository, digest: &Digest) -> Result<u64, Error> {
        let resp = self
            .send(
                Method::HEAD,
                repo,
                &format!("blobs/{digest}"),
                HeaderMap::new(),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, || Error::BlobUnknown(digest.to_string())));
        }
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::UpstreamFailed("blob HEAD without Content-Length".into()))
    }

    /// Pass a GET through (tag lists, referrers): status, headers, body.
    pub async fn passthrough(
        &self,
        repo: &Repository,
        tail: &str,
        accept: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, Error> {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(header::ACCEPT, a.clone());
        }
        self.send(Method::GET, repo, tail, headers).await
    }
}

/// The metric label for an upstream path.
fn kind_of(tail: &str) -> &'static str {
    match tail.split('/').next() {
        Some("manifests") => "manifest",
        Some("blobs") => "blob",
        Some("tags") => "tags",
        Some("referrers") => "referrers",
        _ => "other",
    }
}

fn manifest_accept() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    h
}

fn content_type(h: &HeaderMap) -> Option<String> {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| media_type::essence(s).to_owned())
}

/// `bytes START-END/TOTAL` -> (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

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
        ] {
            assert!(url_is_private(&u(p)), "{p}");
        }
        for p in [
            "https://registry-1.docker.io/",
            "http://8.8.8.8/",
            "http://[2001:db8::1]/",
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
