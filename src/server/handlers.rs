//! The registry API: ping, manifests (tag TTL, HEAD revalidation, stale on
//! upstream failure), blobs (mapped hits, single-flight misses, Range), and
//! pass-through of tag lists and referrers. Content that came through a
//! private registry is only handed out through a registry that proved it
//! serves it ([`vouch`], model in [`crate::cache::provenance`]).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::checked::{Checked, OnPoison};
use super::range::{parse_range, ByteRange};
use super::response::{self, value, Body, CacheResult};
use super::route::Target;
use super::uncached;
use crate::cache::flight::{Joined, Opener};
use crate::cache::provenance::Access;
use crate::cache::store::is_out_of_space;
use crate::cache::{Manifest, TagRecord};
use crate::error::{Error, Result};
use crate::metrics::GaugeGuard;
use crate::registry::{Digest, Reference, Tag};
use crate::state::AppState;
use crate::upstream::{ManifestHead, Upstream};

const API_VERSION: &str = "Docker-Distribution-API-Version";
/// Largest pass-through body (tag lists, referrer indexes) berth relays.
const MAX_PASSTHROUGH: usize = 16 << 20;

pub(super) fn with_result(mut resp: Response<Body>, result: CacheResult) -> Response<Body> {
    resp.extensions_mut().insert(result);
    resp
}

fn builder(status: StatusCode, t: Option<&Target>) -> http::response::Builder {
    let mut b = Response::builder()
        .status(status)
        .header(API_VERSION, "registry/2.0");
    if let Some(ns) = t.and_then(|t| t.ns.as_deref()) {
        // Echo the namespace that chose the upstream (distribution-spec "Registry Proxying").
        b = b.header("OCI-Namespace", value(ns));
    }
    b
}

/// `GET /v2/`
pub fn ping(head: bool) -> Response<Body> {
    let body = if head {
        response::empty()
    } else {
        response::full(Bytes::from_static(b"{}"))
    };
    builder(StatusCode::OK, None)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 2)
        .body(body)
        .expect("ping response")
}

fn upstream_for(state: &AppState, t: &Target) -> Result<Arc<Upstream>> {
    state
        .upstreams
        .get(&t.registry)
        .cloned()
        .ok_or_else(|| Error::RegistryUnknown(t.registry.to_string()))
}

/// Run blocking cache I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking cache task: {e}")))
}

/// A cached blob: a reused mapping inline (the warm path pays no thread
/// hop), otherwise opened and mapped on a blocking thread.
async fn cached_blob(state: &AppState, d: &Digest) -> Result<Option<Bytes>> {
    if let Some(b) = state.cache.warm_blob(d) {
        return Ok(Some(b));
    }
    let (st, d) = (state.clone(), d.clone());
    blocking(move || st.cache.blob(&d)).await?
}

/// A cached manifest: from memory inline, else read on a blocking thread.
async fn cached_manifest(state: &AppState, d: &Digest) -> Result<Option<Manifest>> {
    if let Some(m) = state.cache.warm_manifest(d) {
        return Ok(Some(m));
    }
    let (st, d) = (state.clone(), d.clone());
    blocking(move || st.cache.manifest(&d)).await?
}

/// A tag record: from memory inline, else read on a blocking thread.
async fn cached_tag(state: &AppState, t: &Target, tag: &Tag) -> Result<Option<TagRecord>> {
    if let Some(r) = state.cache.warm_tag(&t.registry, &t.repo, tag) {
        return Ok(Some(r));
    }
    let (st, reg, repo, tag) = (
        state.clone(),
        t.registry.clone(),
        t.repo.clone(),
        tag.clone(),
    );
    blocking(move || st.cache.tag(&reg, &repo, &tag)).await
}

/// Record a tag (written and fsynced on a blocking thread).
async fn put_tag(state: &AppState, t: &Target, tag: &Tag, rec: TagRecord) -> Result<()> {
    let (st, reg, repo, tag) = (
        state.clone(),
        t.registry.clone(),
        t.repo.clone(),
        tag.clone(),
    );
    blocking(move || st.cache.put_tag(&reg, &repo, &tag, rec)).await?
}

/// Quarantine `d` (off the async workers) once its mapped file turns out
/// truncated while being served.
fn quarantine_on_poison(state: &AppState, d: &Digest) -> OnPoison {
    let (st, d) = (state.clone(), d.clone());
    Box::new(move || crate::cache::in_background(move || st.cache.quarantine(&d)))
}

fn manifest_response(
    state: &AppState,
    m: &Manifest,
    t: &Target,
    head: bool,
    result: CacheResult,
) -> Response<Body> {
    let digest = m.digest.to_string();
    let body = if head {
        response::empty()
    } else {
        response::content(m.bytes.clone(), quarantine_on_poison(state, &m.digest))
    };
    let resp = builder(StatusCode::OK, Some(t))
        .header(header::CONTENT_TYPE, value(&m.media_type))
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header("Docker-Content-Digest", value(&digest))
        .header(header::ETAG, value(&format!("\"{digest}\"")))
        .body(body)
        .expect("manifest response");
    with_result(resp, result)
}

/// HEAD answered from a tag record (the manifest bytes are not needed).
fn record_head(rec: &TagRecord, t: &Target, result: CacheResult) -> Response<Body> {
    let resp = builder(StatusCode::OK, Some(t))
        .header(header::CONTENT_TYPE, value(&rec.media_type))
        .header(header::CONTENT_LENGTH, rec.size)
        .header("Docker-Content-Digest", value(&rec.digest))
        .header(header::ETAG, value(&format!("\"{}\"", rec.digest)))
        .body(response::empty())
        .expect("head response");
    with_result(resp, result)
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`
pub async fn manifest(
    state: &AppState,
    t: &Target,
    reference: Reference,
    head: bool,
) -> Result<Response<Body>> {
    let tag = match reference {
        Reference::Digest(d) => {
            if let Some(m) = cached_manifest(state, &d).await? {
                vouch(state, t, &d, Kind::Manifest).await?;
                return Ok(manifest_response(state, &m, t, head, CacheResult::Hit));
            }
            let upstream = upstream_for(state, t)?;
            let (m, joined) =
                fetch_manifest(state, upstream, t, Reference::Digest(d.clone()), Some(d)).await?;
            return Ok(manifest_response(
                state,
                &m,
                t,
                head,
                if joined {
                    CacheResult::Coalesced
                } else {
                    CacheResult::Miss
                },
            ));
        }
        Reference::Tag(tag) => tag,
    };
    let rec = cached_tag(state, t, &tag).await?;
    if let Some(rec) = rec.as_ref().filter(|r| r.age() < state.config.tag_ttl) {
        if let Some(d) = rec.digest() {
            if let Some(m) = cached_manifest(state, &d).await? {
                vouch(state, t, &d, Kind::Manifest).await?;
                return Ok(manifest_response(state, &m, t, head, CacheResult::Hit));
            }
            if head {
                return Ok(record_head(rec, t, CacheResult::Hit));
            }
        }
    }
    let upstream = upstream_for(state, t)?;
    match revalidate(state, &upstream, t, &tag, head).await {
        Ok(resp) => Ok(resp),
        // Upstream says the tag is gone: reject, as Harbor does by default,
        // unless the registry is configured to keep serving the cached copy.
        Err(e) if e.is_not_found() && !upstream.serve_stale_on_not_found => Err(e),
        Err(e) => {
            let Some(rec) = rec else { return Err(e) };
            if let Some(d) = rec.digest() {
                if let Some(m) = cached_manifest(state, &d).await? {
                    vouch(state, t, &d, Kind::Manifest).await?;
                    tracing::warn!(registry = %t.registry, repo = %t.repo, tag = %tag, error = %e,
                        age = ?rec.age(), "upstream failed; serving the last known tag from cache");
                    state
                        .metrics
                        .stale_served
                        .with_label_values(&[t.registry.as_str()])
                        .inc();
                    return Ok(manifest_response(state, &m, t, head, CacheResult::Stale));
                }
                if head {
                    return Ok(record_head(&rec, t, CacheResult::Stale));
                }
            }
            Err(e)
        }
    }
}

/// Ask upstream what a tag points to now (one HEAD however many ask; HEADs
/// do not count against Docker Hub's pull limit) and answer from the cache
/// when the digest is already there.
async fn revalidate(
    state: &AppState,
    upstream: &Arc<Upstream>,
    t: &Target,
    tag: &Tag,
    head: bool,
) -> Result<Response<Body>> {
    let key = (
        t.registry.clone(),
        t.repo.clone(),
        Reference::Tag(tag.clone()),
    );
    let (u, repo, reference) = (upstream.clone(), t.repo.clone(), key.2.clone());
    let (head_result, _) = state
        .heads
        .run(key, move || async move {
            u.head_manifest(&repo, &reference).await
        })
        .await;
    let record = |m: &Manifest| {
        let rec = TagRecord::now(&m.digest, &m.media_type, m.bytes.len() as u64);
        put_tag(state, t, tag, rec)
    };
    let fetched = |joined: bool| {
        if joined {
            CacheResult::Coalesced
        } else {
            CacheResult::Miss
        }
    };
    let h = match head_result {
        // Some registries refuse HEAD on manifests or omit the digest;
        // containerd then uses GET too (PROTOCOL.md 4.1).
        Err(Error::UpstreamFailed(_)) | Ok(ManifestHead { digest: None, .. }) => {
            let reference = Reference::Tag(tag.clone());
            let (m, joined) = fetch_manifest(state, upstream.clone(), t, reference, None).await?;
            record(&m).await?;
            return Ok(manifest_response(state, &m, t, head, fetched(joined)));
        }
        Err(e) => return Err(e),
        Ok(h) => h,
    };
    let d = h.digest.clone().expect("matched above");
    // The registry just said the tag is `d`: it serves `d`.
    note_served(state, &d, upstream).await;
    if let Some(m) = cached_manifest(state, &d).await? {
        record(&m).await?;
        return Ok(manifest_response(state, &m, t, head, CacheResult::Hit));
    }
    if let (true, Some(size)) = (head && !h.media_type.is_empty(), h.size) {
        // A HEAD needs no body: answer from upstream's HEAD, fetch nothing.
        let rec = TagRecord::now(&d, &h.media_type, size);
        put_tag(state, t, tag, rec.clone()).await?;
        return Ok(record_head(&rec, t, CacheResult::Pass));
    }
    let (m, joined) = fetch_manifest(
        state,
        upstream.clone(),
        t,
        Reference::Digest(d.clone()),
        Some(d),
    )
    .await?;
    record(&m).await?;
    Ok(manifest_response(state, &m, t, head, fetched(joined)))
}

/// GET a manifest upstream (coalesced), verify it, store it.
async fn fetch_manifest(
    state: &AppState,
    upstream: Arc<Upstream>,
    t: &Target,
    reference: Reference,
    expect: Option<Digest>,
) -> Result<(Manifest, bool)> {
    let key = (t.registry.clone(), t.repo.clone(), reference.clone());
    let (st, repo, origin) = (state.clone(), t.repo.clone(), upstream.origin());
    let (res, joined) = state
        .manifest_fetches
        .run(key, move || async move {
            // A mismatch is verified (and counted) per endpoint in the upstream.
            let (media_type, bytes) = upstream
                .get_manifest(&repo, &reference, expect.as_ref())
                .await?;
            let m = Manifest {
                digest: Digest::of(&bytes),
                bytes,
                media_type: media_type.into(),
            };
            let (st2, m2) = (st.clone(), m.clone());
            tokio::task::spawn_blocking(move || st2.cache.put_manifest(&m2, &origin))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            Ok(m)
        })
        .await;
    res.map(|m| (m, joined))
}

pub(super) fn blob_headers(
    t: &Target,
    d: &Digest,
    status: StatusCode,
    len: u64,
) -> http::response::Builder {
    let digest = d.to_string();
    builder(status, Some(t))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("Docker-Content-Digest", value(&digest))
        .header(header::ETAG, value(&format!("\"{digest}\"")))
}

pub(super) fn ranged(
    t: &Target,
    d: &Digest,
    range: Option<ByteRange>,
    size: u64,
) -> (http::response::Builder, u64, u64) {
    match range {
        None => (blob_headers(t, d, StatusCode::OK, size), 0, size),
        Some(r) => {
            let b = blob_headers(t, d, StatusCode::PARTIAL_CONTENT, r.end - r.start).header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end - 1),
            );
            (b, r.start, r.end)
        }
    }
}

/// A cache hit: a slice of the mapped file, no copy.
async fn serve_hit(
    state: &AppState,
    t: &Target,
    d: &Digest,
    range_header: Option<&http::HeaderValue>,
    head: bool,
) -> Result<Option<Response<Body>>> {
    let Some(bytes) = cached_blob(state, d).await? else {
        return Ok(None);
    };
    vouch(state, t, d, Kind::Blob).await?;
    let size = bytes.len() as u64;
    let (b, start, end) = ranged(t, d, parse_range(range_header, size)?, size);
    let body = if head {
        response::empty()
    } else {
        state
            .metrics
            .served_bytes
            .with_label_values(&["cache"])
            .inc_by(end - start);
        response::content(
            bytes.slice(start as usize..end as usize),
            quarantine_on_poison(state, d),
        )
    };
    Ok(Some(with_result(
        b.body(body).expect("blob response"),
        CacheResult::Hit,
    )))
}

/// `GET|HEAD /v2/<name>/blobs/<digest>`
pub async fn blob(
    state: &AppState,
    t: &Target,
    d: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>> {
    let range_header = headers.get(header::RANGE);
    if let Some(resp) = serve_hit(state, t, d, range_header, head).await? {
        return Ok(resp);
    }
    let upstream = upstream_for(state, t)?;
    if head {
        let size = match state.cache.flights.get(d) {
            Some(f) => {
                vouch(state, t, d, Kind::Blob).await?;
                f.size().await?
            }
            None => upstream.head_blob(&t.repo, d).await?,
        };
        let (b, _, _) = ranged(t, d, parse_range(range_header, size)?, size);
        return Ok(with_result(
            b.body(response::empty()).expect("blob head"),
            CacheResult::Pass,
        ));
    }
    if state.cache.store.is_full() {
        return uncached::blob(state, &upstream, t, d, range_header).await;
    }
    let (repo, digest, u) = (t.repo.clone(), d.clone(), upstream.clone());
    let joined = state.cache.flights.join(
        d,
        state.cache.publisher(upstream.origin()),
        move || -> Opener {
            Box::new(move |offset| {
                let (u, repo, digest) = (u.clone(), repo.clone(), digest.clone());
                Box::pin(async move { u.open_blob(&repo, &digest, offset).await })
            })
        },
    );
    let joined = match joined {
        Err(Error::Io(e)) if is_out_of_space(&e) => {
            return uncached::blob(state, &upstream, t, d, range_header).await
        }
        other => other?,
    };
    let (result, flight) = match joined {
        Joined::Leader(f) => (CacheResult::Miss, f),
        Joined::Follower(f) => {
            // Someone else's download, possibly through a private registry.
            vouch(state, t, d, Kind::Blob).await?;
            (CacheResult::Coalesced, f)
        }
        Joined::Published => {
            return serve_hit(state, t, d, range_header, head)
                .await?
                .ok_or_else(|| Error::Internal("published blob vanished".into()));
        }
    };
    if matches!(result, CacheResult::Miss) {
        watch_flight(state, flight.clone());
    }
    let size = match flight.size().await {
        Err(Error::Io(e)) if is_out_of_space(&e) => {
            return uncached::blob(state, &upstream, t, d, range_header).await
        }
        other => other?,
    };
    let (b, start, end) = ranged(t, d, parse_range(range_header, size)?, size);
    state
        .metrics
        .served_bytes
        .with_label_values(&["upstream"])
        .inc_by(end - start);
    let follower =
        matches!(result, CacheResult::Coalesced).then(|| GaugeGuard::new(&state.metrics.followers));
    let stream = flight.read(start, end).map_ok(move |b| {
        let _counted_while_streaming = &follower;
        b
    });
    let body = BodyExt::boxed_unsync(Checked::new(
        Box::pin(stream),
        quarantine_on_poison(state, d),
    ));
    Ok(with_result(b.body(body).expect("blob response"), result))
}

/// What [`vouch`] asks the upstream about.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Manifest,
    Blob,
}

/// Before content `d` that is cached (or being downloaded) is handed to a
/// request through `t.registry`: if it came through a private registry and
/// `t.registry` is not known to serve it, `t.registry`'s upstream must
/// answer a HEAD for it (with that registry's own credentials) first. 2xx:
/// served, and remembered. Otherwise nothing is served: 404 is
/// BLOB_UNKNOWN/MANIFEST_UNKNOWN as if not cached, 401/403 DENIED, an
/// unreachable upstream its usual error (fail closed). Public content (no
/// record) costs one lock-free map lookup.
async fn vouch(state: &AppState, t: &Target, d: &Digest, kind: Kind) -> Result<()> {
    if state.cache.provenance.access(d, &t.registry) != Access::Unproven {
        return Ok(());
    }
    let upstream = upstream_for(state, t)?;
    let proof = match kind {
        Kind::Blob => upstream.head_blob(&t.repo, d).await.map(drop),
        Kind::Manifest => {
            let r = Reference::Digest(d.clone());
            match upstream.head_manifest(&t.repo, &r).await {
                // Some registries refuse HEAD on manifests: a verified GET proves it too.
                Err(Error::UpstreamFailed(_)) => {
                    upstream.get_manifest(&t.repo, &r, Some(d)).await.map(drop)
                }
                other => other.map(drop),
            }
        }
    };
    match proof {
        Ok(()) => {
            tracing::info!(target: "berth::private", registry = %t.registry, repo = %t.repo, digest = %d, ?kind, "registry proved it serves cached private content");
            note_served(state, d, &upstream).await;
            Ok(())
        }
        Err(e) => {
            let reason = match &e {
                e if e.is_not_found() => "not_found",
                Error::UpstreamDenied(_) => "denied",
                _ => "unavailable",
            };
            state
                .metrics
                .private_refusals
                .with_label_values(&[t.registry.as_str(), reason])
                .inc();
            tracing::warn!(target: "berth::private", registry = %t.registry, repo = %t.repo, digest = %d, ?kind, reason, error = %e, "refused cached private content to a registry that did not prove it serves it");
            Err(e)
        }
    }
}

/// `upstream` evidently serves `d`: update its provenance record, if any
/// (on a blocking thread, and only when something changes). A failure to
/// write only costs another proof later.
async fn note_served(state: &AppState, d: &Digest, upstream: &Upstream) {
    let origin = upstream.origin();
    if !state.cache.provenance.learns(d, &origin) {
        return;
    }
    let (st, d) = (state.clone(), d.clone());
    let done =
        tokio::task::spawn_blocking(move || st.cache.provenance.served_by(&d, &origin)).await;
    if let Ok(Err(error)) = done {
        tracing::warn!(target: "berth::private", %error, "could not update a provenance record");
    }
}

/// Keep the in-flight gauge current for a flight.
fn watch_flight(state: &AppState, flight: Arc<crate::cache::flight::Flight>) {
    let st = state.clone();
    st.metrics.inflight.inc();
    tracing::debug!(digest = %flight.digest, "blob cache miss; fetching from upstream");
    tokio::spawn(async move {
        // Mismatches are counted where they are blamed on an endpoint
        // (upstream::Upstream::open_blob), once per bad copy.
        let _ = flight.finished().await;
        st.metrics.inflight.dec();
    });
}

/// `GET /v2/<name>/tags/list` and `GET /v2/<name>/referrers/<digest>`:
/// relayed from upstream, not cached.
pub async fn passthrough(
    state: &AppState,
    t: &Target,
    tail: String,
    req_headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>> {
    let upstream = upstream_for(state, t)?;
    let resp = upstream
        .passthrough(&t.repo, &tail, req_headers.get(header::ACCEPT))
        .await?;
    let status = resp.status();
    let mut b = builder(status, Some(t));
    if let Some(ct) = resp.headers().get(header::CONTENT_TYPE) {
        b = b.header(header::CONTENT_TYPE, ct.clone());
    }
    for name in ["OCI-Filters-Applied"] {
        if let Some(v) = resp.headers().get(name) {
            b = b.header(name, v.clone());
        }
    }
    if let Some(link) = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
    {
        b = b.header(header::LINK, value(&rewrite_link(link, t)));
    }
    let mut body = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(crate::upstream::map_reqwest)?;
        if body.len() + chunk.len() > MAX_PASSTHROUGH {
            return Err(Error::UpstreamFailed(
                "upstream response too large to relay".into(),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    b = b.header(header::CONTENT_LENGTH, body.len());
    let body = if head {
        response::empty()
    } else {
        response::full(body)
    };
    Ok(with_result(
        b.body(body).expect("passthrough response"),
        CacheResult::Pass,
    ))
}

/// Upstream `Link: </v2/<repo>/tags/list?...>` must lead back through berth:
/// keep the path-style registry prefix, and the `ns` parameter.
fn rewrite_link(link: &str, t: &Target) -> String {
    let mut out = link.to_owned();
    if t.path_style {
        out = out.replacen("</v2/", &format!("</v2/{}/", t.registry), 1);
    }
    if let Some(ns) = &t.ns {
        if let Some(end) = out.find('>') {
            let sep = if out[..end].contains('?') { '&' } else { '?' };
            let ns_q: String = url::form_urlencoded::byte_serialize(ns.as_bytes()).collect();
            out.insert_str(end, &format!("{sep}ns={ns_q}"));
        }
    }
    out
}

/// Query parameters relayed to upstream for a pass-through route.
pub fn relay_query(query: Option<&str>, keep: &[&str]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if keep.contains(&k.as_ref()) {
            ser.append_pair(&k, &v);
        }
    }
    ser.finish()
}

/// `/livez`, `/readyz`, `/metrics`.
pub fn probe(state: &AppState, what: &str) -> Response<Body> {
    let (status, body, ct) = match what {
        "metrics" => {
            refresh_gauges(state);
            (
                StatusCode::OK,
                Bytes::from(state.metrics.encode()),
                "text/plain; version=0.0.4",
            )
        }
        "readyz" if !state.readiness.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"not ready\n"),
            "text/plain",
        ),
        _ => (StatusCode::OK, Bytes::from_static(b"ok\n"), "text/plain"),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ct)
        .header(header::CONTENT_LENGTH, body.len())
        .body(response::full(body))
        .expect("probe response")
}

fn refresh_gauges(state: &AppState) {
    let m = &state.metrics;
    let idx = &state.cache.index;
    m.cache_bytes.set(idx.weighted_bytes() as i64);
    m.cache_capacity.set(idx.capacity() as i64);
    m.cache_entries.set(idx.len() as i64);
    m.cache_full.set(i64::from(state.cache.store.is_full()));
    let dir = state.cache.store.root();
    if let (Ok(free), Ok(size)) = (fs4::available_space(dir), fs4::total_space(dir)) {
        m.fs_free.set(free as i64);
        m.fs_size.set(size as i64);
    }
    let (total, seen) = (idx.evictions(), m.evictions.get());
    if total > seen {
        m.evictions.inc_by(total - seen);
    }
}

/// Whether a request method is a HEAD.
pub fn is_head<B>(req: &Request<B>) -> bool {
    req.method() == Method::HEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rewriting() {
        let t = Target {
            registry: "ghcr.io".parse().unwrap(),
            repo: "a/b".parse().unwrap(),
            ns: None,
            path_style: true,
        };
        assert_eq!(
            rewrite_link("</v2/a/b/tags/list?last=x&n=2>; rel=\"next\"", &t),
            "</v2/ghcr.io/a/b/tags/list?last=x&n=2>; rel=\"next\""
        );
        let t = Target {
            ns: Some("ghcr.io".into()),
            path_style: false,
            ..t
        };
        assert_eq!(
            rewrite_link("</v2/a/b/tags/list?last=x&n=2>; rel=\"next\"", &t),
            "</v2/a/b/tags/list?last=x&n=2&ns=ghcr.io>; rel=\"next\""
        );
    }

    #[test]
    fn relays_only_known_query_parameters() {
        assert_eq!(
            relay_query(Some("n=5&last=b&ns=docker.io&evil=1"), &["n", "last"]),
            "n=5&last=b"
        );
        assert_eq!(relay_query(None, &["n"]), "");
    }
}
