//! The registry API over HTTP: ping, manifests, blobs (Range, mapped hits,
//! streaming downloads, relays while the cache is full), pass-through of tag
//! lists and referrers, and the probes. What to answer is decided by the
//! [`crate::mirror`]; this module only translates requests into mirror
//! calls and mirror results into responses.

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::checked::{Checked, OnPoison};
use super::range::{parse_range, ByteRange};
use super::response::{self, value, Body};
use super::route::Target;
use crate::error::{Error, Result};
use crate::metrics::GaugeGuard;
use crate::mirror::{BlobReply, CacheResult, ManifestReply, Tap};
use crate::registry::{Digest, Reference};
use crate::state::AppState;

const API_VERSION: &str = "Docker-Distribution-API-Version";
/// Largest pass-through body (tag lists, referrer indexes) berth relays.
const MAX_PASSTHROUGH: usize = 16 << 20;

/// The response `b` with `body`, marked with how it was answered.
fn answer(b: http::response::Builder, body: Body, result: CacheResult) -> Response<Body> {
    let mut resp = b.body(body).expect("response headers are valid");
    resp.extensions_mut().insert(result);
    resp
}

/// `body`, or nothing for a HEAD.
fn unless_head(head: bool, body: impl FnOnce() -> Body) -> Body {
    if head {
        response::empty()
    } else {
        body()
    }
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
    let body = unless_head(head, || response::full(Bytes::from_static(b"{}")));
    builder(StatusCode::OK, None)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, 2)
        .body(body)
        .expect("ping response")
}

/// Quarantine `d` (off the async workers) once its mapped file turns out
/// truncated while being served.
fn quarantine_on_poison(state: &AppState, d: &Digest) -> OnPoison {
    let (mirror, d) = (state.mirror.clone(), d.clone());
    Box::new(move || mirror.quarantine_later(&d))
}

/// Content's headers: its type, size and digest.
fn content_headers(
    t: &Target,
    status: StatusCode,
    media_type: &str,
    len: u64,
    digest: &str,
) -> http::response::Builder {
    builder(status, Some(t))
        .header(header::CONTENT_TYPE, value(media_type))
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Content-Digest", value(digest))
        .header(header::ETAG, value(&format!("\"{digest}\"")))
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`
pub async fn manifest(
    state: &AppState,
    t: &Target,
    reference: Reference,
    head: bool,
) -> Result<Response<Body>> {
    let (reply, result) = state
        .mirror
        .manifest(&t.registry, &t.repo, reference, head)
        .await?;
    Ok(match reply {
        ManifestReply::Manifest(m) => {
            let digest = m.digest.to_string();
            let len = m.bytes.len() as u64;
            let b = content_headers(t, StatusCode::OK, &m.media_type, len, &digest);
            let body = unless_head(head, || {
                response::content(m.bytes, quarantine_on_poison(state, &m.digest))
            });
            answer(b, body, result)
        }
        // A HEAD answered from a tag record (the manifest bytes are not needed).
        ManifestReply::Record(rec) => {
            let b = content_headers(t, StatusCode::OK, &rec.media_type, rec.size, &rec.digest);
            answer(b, response::empty(), result)
        }
    })
}

fn blob_headers(t: &Target, d: &Digest, status: StatusCode, len: u64) -> http::response::Builder {
    let octets = "application/octet-stream";
    content_headers(t, status, octets, len, &d.to_string()).header(header::ACCEPT_RANGES, "bytes")
}

fn ranged(
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

/// `GET|HEAD /v2/<name>/blobs/<digest>`
pub async fn blob(
    state: &AppState,
    t: &Target,
    d: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>> {
    let range_header = headers.get(header::RANGE);
    let mirror = &state.mirror;
    if head {
        let (size, result) = mirror.blob_size(&t.registry, &t.repo, d).await?;
        let (b, _, _) = ranged(t, d, parse_range(range_header, size)?, size);
        return Ok(answer(b, response::empty(), result));
    }
    let (reply, result) = mirror
        .open_blob(&t.registry, &t.repo, d, &Tap::default())
        .await?;
    let (size, flight) = match reply {
        BlobReply::Full => return relay(state, t, d, range_header).await,
        BlobReply::Cached(bytes) => {
            // A hit: a slice of the mapped file, no copy.
            let size = bytes.len() as u64;
            let (b, start, end) = ranged(t, d, parse_range(range_header, size)?, size);
            count_served(state, "cache", end - start);
            let body = response::content(
                bytes.slice(start as usize..end as usize),
                quarantine_on_poison(state, d),
            );
            return Ok(answer(b, body, result));
        }
        BlobReply::Flight { flight, size } => (size, flight),
    };
    let (b, start, end) = ranged(t, d, parse_range(range_header, size)?, size);
    count_served(state, "upstream", end - start);
    let follower = matches!(result, CacheResult::Coalesced)
        .then(|| GaugeGuard::new(&mirror.metrics.followers));
    let stream = flight.read(start, end).map_ok(move |b| {
        let _counted_while_streaming = &follower;
        b
    });
    let body = BodyExt::boxed_unsync(Checked::new(
        Box::pin(stream),
        quarantine_on_poison(state, d),
    ));
    Ok(answer(b, body, result))
}

/// Content bytes a blob response sends, by source (cache|upstream).
fn count_served(state: &AppState, source: &str, bytes: u64) {
    let served = &state.mirror.metrics.served_bytes;
    served.with_label_values(&[source]).inc_by(bytes);
}

/// A blob relayed from upstream without caching (the cache filesystem is
/// full). A Range needs the size first, from upstream's HEAD.
async fn relay(
    state: &AppState,
    t: &Target,
    d: &Digest,
    range_header: Option<&http::HeaderValue>,
) -> Result<Response<Body>> {
    let mirror = &state.mirror;
    let (size, range) = match range_header {
        None => (None, None),
        Some(_) => {
            let size = mirror.upstream_blob_size(&t.registry, &t.repo, d).await?;
            (Some(size), parse_range(range_header, size)?)
        }
    };
    let span = range.as_ref().map(|r| r.start..r.end);
    let relayed = mirror
        .relay_blob(&t.registry, &t.repo, d, span, size)
        .await?;
    let (b, start, end) = ranged(t, d, range, relayed.size);
    count_served(state, "upstream", end - start);
    let frames = relayed.stream.map(|r| r.map(Frame::data));
    let body = BodyExt::boxed_unsync(StreamBody::new(frames));
    Ok(answer(b, body, CacheResult::Pass))
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
    let resp = state
        .mirror
        .upstream(&t.registry)?
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
    Ok(answer(
        b,
        unless_head(head, || response::full(body)),
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
            state.mirror.refresh_gauges();
            (
                StatusCode::OK,
                Bytes::from(state.mirror.metrics.encode()),
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
