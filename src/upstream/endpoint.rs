//! One upstream endpoint (an origin registry, or a hub project under a path
//! prefix): its `reqwest` client (rustls, extra CA, client certificate,
//! explicit `insecure` opt-in, timeouts), the auth dance, bandwidth cap, and
//! the reads berth needs. Fallback between endpoints lives in the parent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use reqwest::RequestBuilder;
use url::Url;

use super::answer::ManifestHead;
use super::answer::{self, content_length, content_type, parse_content_range, Answer};
use super::auth::{parse_challenge, Challenge, TokenCache};
use super::breaker::Breaker;
use super::limiter::Limiter;
use super::net::{connection_dropped, map_reqwest, redact};
use super::resolve::url_is_private;
use super::resolve::{GuardedResolver, Policy};
use crate::config::{Config, ConfigError, Credentials, EndpointConfig};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::registry::media_type::{self, MANIFEST_ACCEPT, MAX_MANIFEST_SIZE};
use crate::registry::{Digest, Reference, RegistryHost, Repository};
use crate::transfer;

/// One endpoint of a mirrored registry.
pub struct Endpoint {
    /// The registry host clients name (metric label).
    pub host: RegistryHost,
    /// `host[:port][/prefix]` of the endpoint (metric label; no secrets).
    pub label: String,
    /// The configured URL (for logs).
    base: Url,
    /// `scheme://host[:port]/`: where `/v2/` lives.
    root: Url,
    /// Hub project prefix, if any.
    prefix: Option<String>,
    hub: bool,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// The registry answered a Basic challenge once: send Basic up front.
    basic: AtomicBool,
    read_timeout: Duration,
    limiter: Option<Arc<Limiter>>,
    /// Skips this endpoint for a while after failures.
    pub breaker: Breaker,
    pub(crate) metrics: Metrics,
}

impl Endpoint {
    /// Build the client for one endpoint.
    pub fn new(
        host: &RegistryHost,
        ep: &EndpointConfig,
        config: &Config,
        metrics: Metrics,
    ) -> Result<Endpoint, ConfigError> {
        let allow_private = ep
            .private_redirects
            .unwrap_or_else(|| url_is_private(&ep.url));
        // Follow redirects (Docker Hub, registry.k8s.io send blobs to CDNs).
        // reqwest drops Authorization on a cross-host redirect. A redirect into
        // loopback, link-local (cloud metadata) or private ranges is refused
        // unless the endpoint itself lives there: literal addresses here,
        // names that resolve there in the resolver (redirects and token
        // realms alike).
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if !allow_private && url_is_private(attempt.url()) {
                attempt.error("redirect to a private address refused")
            } else {
                attempt.follow()
            }
        });
        let read_timeout = ep.read_timeout.unwrap_or(config.read_timeout);
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(ep.connect_timeout.unwrap_or(config.connect_timeout))
            .read_timeout(read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .redirect(policy)
            .dns_resolver(Arc::new(GuardedResolver::new(
                Policy::new(&ep.url, allow_private),
                host.as_str(),
                &redact(&ep.url),
            )))
            .use_rustls_tls();
        let ctx = format!("registry {} endpoint {}", host, redact(&ep.url));
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| ConfigError(format!("{ctx}: {}: {e}", path.display())))
        };
        if let Some(ca) = &ep.ca_file {
            let pem = read(ca)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ConfigError(format!(
                    "{ctx}: {}: not a PEM CA bundle ({e})",
                    ca.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(ConfigError(format!(
                    "{ctx}: {} holds no certificate",
                    ca.display()
                )));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &ep.client_identity {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                ConfigError(format!("{ctx}: client certificate/key unusable ({e})"))
            })?;
            builder = builder.identity(id);
        }
        if ep.insecure {
            tracing::warn!(registry = %host, endpoint = %redact(&ep.url), "TLS certificate verification is DISABLED for this endpoint (insecure = true)");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let client = builder
            .build()
            .map_err(|e| ConfigError(format!("{ctx}: {e}")))?;
        let mut root = ep.url.clone();
        root.set_path("/");
        let prefix = Some(ep.url.path().trim_matches('/').to_owned()).filter(|p| !p.is_empty());
        let label = format!(
            "{}{}",
            root.host_str().unwrap_or(""),
            root.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + &prefix.as_ref().map(|p| format!("/{p}")).unwrap_or_default();
        Ok(Endpoint {
            host: host.clone(),
            label,
            base: ep.url.clone(),
            root,
            prefix,
            hub: ep.hub,
            client,
            credentials: ep.credentials.clone(),
            tokens: TokenCache::default(),
            basic: AtomicBool::new(false),
            read_timeout,
            limiter: ep.bandwidth.map(|b| Arc::new(Limiter::new(b))),
            breaker: Breaker::default(),
            metrics,
        })
    }

    /// `scheme://host[:port]/` of the endpoint.
    pub fn root(&self) -> &Url {
        &self.root
    }

    /// The HTTP client (for `berth check`).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The configured credentials (for `berth check`; never logged).
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Fetch a token for a pull scope, anonymously or with `creds`.
    pub async fn probe_token(
        &self,
        challenge: &Challenge,
        creds: Option<&Credentials>,
    ) -> Result<(), String> {
        let scope = match challenge {
            Challenge::Bearer { scope: Some(s), .. } => s.clone(),
            _ => format!(
                "repository:{}:pull",
                self.prefix
                    .clone()
                    .unwrap_or_else(|| "library/alpine".into())
            ),
        };
        let cache = TokenCache::default();
        cache
            .get(&self.client, &self.root, challenge, &scope, creds)
            .await
            .map(|_| ())
            .map_err(|e| e.explained())
    }

    /// `remaining/limit` from a manifest HEAD's rate-limit headers, if sent.
    pub async fn ratelimit(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<Option<String>, Error> {
        let resp = self
            .send(
                Method::HEAD,
                repo,
                &format!("manifests/{reference}"),
                manifest_accept(),
            )
            .await?;
        let read = |n: &str| answer::ratelimit(resp.headers(), n);
        Ok(
            match (read("ratelimit-remaining"), read("ratelimit-limit")) {
                (Some(r), Some(l)) => Some(format!("{r} of {l} pulls left in the window")),
                _ => None,
            },
        )
    }

    /// The endpoint URL (for logs and metrics; no secrets in it).
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The repository name at this endpoint: a hub project prefix goes in
    /// front (`dockerhub-proxy/library/nginx`).
    fn remote_repo(&self, repo: &Repository) -> String {
        match &self.prefix {
            Some(p) => format!("{p}/{}", repo.as_str()),
            None => repo.as_str().to_owned(),
        }
    }

    fn url(&self, repo: &Repository, tail: &str) -> Result<Url, Error> {
        self.root
            .join(&format!("v2/{}/{}", self.remote_repo(repo), tail))
            .map_err(|e| Error::Internal(format!("building upstream URL: {e}")))
    }

    /// A configured token, Basic once the registry asked for it, else a
    /// cached bearer token for `scope`.
    async fn authorize(&self, req: RequestBuilder, scope: &str) -> RequestBuilder {
        match &self.credentials {
            Some(Credentials::Token(t)) => req.bearer_auth(t),
            Some(Credentials::Basic { username, password })
                if self.basic.load(Ordering::Relaxed) =>
            {
                req.basic_auth(username, Some(password))
            }
            _ => match self.tokens.cached(scope).await {
                Some(t) => req.header(header::AUTHORIZATION, t.header()),
                None => req,
            },
        }
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
        let scope = format!("repository:{}:pull", self.remote_repo(repo));
        let mut retried = false;
        loop {
            let req = self.client.request(method.clone(), url.clone());
            let req = self.authorize(req.headers(headers.clone()), &scope).await;
            let kind = kind_of(tail);
            let mut started = std::time::Instant::now();
            let retry = req.try_clone();
            let mut sent = req.send().await;
            if let (Err(e), Some(again)) = (&sent, retry) {
                if connection_dropped(e) {
                    // A reset or early EOF on a pooled or fresh connection is
                    // transient: these requests are idempotent, so retry once
                    // at once (the broken connection has left the pool). Only a
                    // second drop reaches the breaker.
                    self.count_request(kind, "error", started);
                    started = std::time::Instant::now();
                    tracing::debug!(registry = %self.host, endpoint = %self.label, error = %e, "connection dropped; retrying once on a new connection");
                    sent = again.send().await;
                }
            }
            let status = sent
                .as_ref()
                .map(|r| r.status().as_str().to_owned())
                .unwrap_or_else(|_| "error".into());
            self.count_request(kind, &status, started);
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
                            &self.root,
                            &bearer,
                            &scope,
                            self.credentials.as_ref(),
                        )
                        .await?;
                }
            }
        }
    }

    /// Count one upstream request and its latency.
    fn count_request(&self, kind: &str, status: &str, started: std::time::Instant) {
        self.metrics
            .upstream_requests
            .with_label_values(&[self.host.as_str(), &self.label, kind, status])
            .inc();
        self.metrics
            .upstream_duration
            .with_label_values(&[self.host.as_str(), &self.label, kind])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Export Docker Hub's rate-limit headers (PROTOCOL.md 4.5).
    fn record_ratelimit(&self, h: &HeaderMap) {
        let m = &self.metrics;
        for (name, gauge) in [
            ("ratelimit-remaining", &m.ratelimit_remaining),
            ("ratelimit-limit", &m.ratelimit_limit),
        ] {
            if let Some(v) = answer::ratelimit(h, name) {
                gauge.with_label_values(&[self.host.as_str()]).set(v);
            }
        }
    }

    /// Count content bytes received.
    fn count_bytes(&self, kind: &str, n: usize) {
        self.metrics
            .upstream_bytes
            .with_label_values(&[self.host.as_str(), kind])
            .inc_by(n as u64);
    }

    /// A manifest request with the full Accept set; a non-success status
    /// becomes the classified error.
    async fn manifest_request(
        &self,
        method: Method,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<reqwest::Response, Error> {
        let resp = self
            .send(
                method,
                repo,
                &format!("manifests/{reference}"),
                manifest_accept(),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(answer::error(&resp, || {
                Error::ManifestUnknown(format!("{repo}:{reference}"))
            }));
        }
        Ok(resp)
    }

    /// HEAD a manifest: digest, type and size without a counted pull.
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<ManifestHead, Error> {
        let resp = self.manifest_request(Method::HEAD, repo, reference).await?;
        let h = resp.headers();
        Ok(ManifestHead {
            digest: h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok()),
            media_type: content_type(h).unwrap_or_default(),
            size: content_length(h),
        })
    }

    /// GET a manifest's bytes and media type (bounded to containerd's limit).
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
    ) -> Result<(String, Bytes), Error> {
        let resp = self.manifest_request(Method::GET, repo, reference).await?;
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
    ) -> Result<transfer::Body, Error> {
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
            return Err(answer::error(&resp, || {
                Error::BlobUnknown(digest.to_string())
            }));
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
        let stream = match &self.limiter {
            Some(l) => l.clone().throttle(stream.boxed()),
            None => stream.boxed(),
        };
        Ok(transfer::Body {
            size,
            stream,
            blame: None,
        })
    }

    /// A blob's size. A hub answers 404 to HEAD on a blob it has not cached
    /// yet (goharbor/harbor#22609), so hubs get a one-byte ranged GET instead.
    pub async fn head_blob(&self, repo: &Repository, digest: &Digest) -> Result<u64, Error> {
        let tail = format!("blobs/{digest}");
        let resp = if self.hub {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
            self.send(Method::GET, repo, &tail, h).await?
        } else {
            self.send(Method::HEAD, repo, &tail, HeaderMap::new())
                .await?
        };
        if !resp.status().is_success() {
            return Err(answer::error(&resp, || {
                Error::BlobUnknown(digest.to_string())
            }));
        }
        let h = resp.headers();
        let size = if resp.status() == StatusCode::PARTIAL_CONTENT {
            let range = h.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
            range
                .and_then(parse_content_range)
                .and_then(|(_, total)| total)
        } else {
            content_length(h)
        };
        // Dropping a GET response closes its connection: nothing more is downloaded.
        size.ok_or_else(|| Error::UpstreamFailed("blob size unknown (no Content-Length)".into()))
    }

    /// Pass a GET through (tag lists, referrers): status, headers, body;
    /// an answer that tells against the endpoint is an error.
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
        let resp = self.send(Method::GET, repo, tail, headers).await?;
        if Answer::of(resp.status()).is_endpoint_failure() {
            return Err(answer::error(&resp, || Error::NotFound(tail.to_owned())));
        }
        Ok(resp)
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
