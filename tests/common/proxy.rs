//! An in-process counting HTTP reverse proxy (hyper 1) between berth and the origin, with fault knobs.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// One proxied request.
#[derive(Clone, Debug)]
pub struct Record {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Response status sent to the client (0 while the upstream has not answered).
    pub status: u16,
    /// Response body bytes actually forwarded to the client.
    pub bytes: u64,
    /// True once the whole response body was forwarded.
    pub completed: bool,
    pub req_headers: HeaderMap,
}

#[derive(Clone, Debug, Default)]
struct Knobs {
    fail_all: Option<u16>,
    /// Extra headers on `fail_all` answers (e.g. `Retry-After`).
    fail_headers: Vec<(String, String)>,
    delay: Duration,
    refuse: bool,
    cut_blob_after: Option<u64>,
    /// Cut limits for the next blob GETs only, consumed one per blob GET.
    cut_blob_once: Vec<u64>,
    corrupt_blob: bool,
    /// Corrupt only the next this many blob GETs.
    corrupt_blob_next: u32,
    /// Drop the next this many requests unanswered (connection closed).
    drop_next: u32,
    /// Pace blob bodies to this many bytes per second (read live by every body).
    body_rate: Option<u64>,
    /// Stall blob bodies once they have forwarded this many bytes (read live).
    hold_blob_after: Option<u64>,
}

struct Shared {
    upstream: String,
    records: Mutex<Vec<Arc<Mutex<Record>>>>,
    bytes: AtomicU64,
    /// Connections closed and requests dropped unanswered while refusing.
    refused: AtomicU64,
    knobs: Mutex<Knobs>,
    client: Client<HttpConnector, Incoming>,
}

/// A reverse proxy on 127.0.0.1:<ephemeral> forwarding everything to one
/// upstream and recording each request. Stops (aborting open connections)
/// when dropped.
pub struct CountingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl CountingProxy {
    /// Starts a proxy to `upstream_url` (e.g. `http://127.0.0.1:5000`).
    pub async fn start(upstream_url: &str) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy listener");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            upstream: upstream_url.trim_end_matches('/').to_string(),
            records: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            knobs: Mutex::new(Knobs::default()),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        CountingProxy { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Snapshot of all recorded requests, oldest first.
    pub fn requests(&self) -> Vec<Record> {
        self.shared
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }

    /// Requests with `method` (case-insensitive) whose path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }

    /// GETs of `/blobs/sha256:...`.
    pub fn blob_gets(&self) -> usize {
        self.count("GET", "/blobs/sha256:")
    }

    /// GETs of `/manifests/...`.
    pub fn manifest_gets(&self) -> usize {
        self.count("GET", "/manifests/")
    }

    /// HEADs of `/manifests/...`.
    pub fn manifest_heads(&self) -> usize {
        self.count("HEAD", "/manifests/")
    }

    /// Response body bytes forwarded to clients since start/reset (all requests).
    pub fn bytes_served(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    /// Response body bytes forwarded for `/blobs/` requests since start/reset.
    pub fn blob_bytes_served(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.path.contains("/blobs/"))
            .map(|r| r.bytes)
            .sum()
    }

    /// Forgets all records and zeroes `bytes_served` and
    /// `refused_connections` (knobs are kept).
    pub fn reset(&self) {
        self.shared.records.lock().unwrap().clear();
        self.shared.bytes.store(0, Ordering::SeqCst);
        self.shared.refused.store(0, Ordering::SeqCst);
    }

    /// While `set_refuse(true)`: connections closed right after accept plus
    /// requests dropped unanswered on already open connections (refused
    /// work is not in `requests()`).
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Extra headers sent with every `set_fail_all` answer, e.g.
    /// `[("Retry-After", "30")]` for a 429 (empty: none).
    pub fn set_fail_headers(&self, headers: &[(&str, &str)]) {
        self.shared.knobs.lock().unwrap().fail_headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Answer every request with this status (and a registry-style JSON error) instead of forwarding.
    pub fn set_fail_all(&self, status: Option<u16>) {
        self.shared.knobs.lock().unwrap().fail_all = status;
    }

    /// Wait this long before forwarding each request.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.knobs.lock().unwrap().delay = delay;
    }

    /// Close new connections immediately and drop requests on open ones without answering.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.knobs.lock().unwrap().refuse = refuse;
    }

    /// For blob GETs, abort the response body after `n` bytes (the client gets a truncated body).
    pub fn cut_blob_after(&self, n: Option<u64>) {
        self.shared.knobs.lock().unwrap().cut_blob_after = n;
    }

    /// Cut only the next successful blob GET after `n` bytes (later ones are
    /// not cut by this knob). Calling it again queues one more cut.
    pub fn cut_blob_after_once(&self, n: u64) {
        self.shared.knobs.lock().unwrap().cut_blob_once.push(n);
    }

    /// For blob GETs, flip (XOR 0xff) the first body byte.
    /// Corrupt (flip the first byte of) only the next `n` blob GETs.
    pub fn corrupt_blob_next(&self, n: u32) {
        self.shared.knobs.lock().unwrap().corrupt_blob_next = n;
    }

    /// Close the connection of the next `n` requests without an answer (a
    /// reset or early EOF for the client); later requests pass.
    pub fn drop_next(&self, n: u32) {
        self.shared.knobs.lock().unwrap().drop_next = n;
    }

    pub fn corrupt_blob(&self, on: bool) {
        self.shared.knobs.lock().unwrap().corrupt_blob = on;
    }

    /// Pace blob GET bodies to about `bytes_per_sec` (`None`: full speed).
    /// Bodies already running follow changes at once, so a test can slow a
    /// download down and then let it finish quickly.
    pub fn set_body_rate(&self, bytes_per_sec: Option<u64>) {
        self.shared.knobs.lock().unwrap().body_rate = bytes_per_sec.map(|r| r.max(1));
    }

    /// Stall every blob GET body once it has forwarded `n` bytes, until the
    /// knob is cleared (`None`) or raised; running bodies follow changes at
    /// once. Makes "download still in progress" deterministic.
    pub fn hold_blob_after(&self, n: Option<u64>) {
        self.shared.knobs.lock().unwrap().hold_blob_after = n;
    }

    /// Polls until some blob GET has forwarded at least `n` body bytes
    /// (panics after `timeout`); returns that record.
    pub async fn wait_blob_bytes(&self, n: u64, timeout: Duration) -> Record {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .requests()
                .into_iter()
                .find(|r| r.method == "GET" && r.path.contains("/blobs/sha256:") && r.bytes >= n)
            {
                return r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no blob GET forwarded {n} bytes within {timeout:?}: {:?}",
                self.requests()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        if shared.knobs.lock().unwrap().refuse {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
    for h in listed {
        headers.remove(h.as_str());
    }
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|e: Infallible| -> BoxError { match e {} })
        .boxed()
}

fn error_response(status: u16, message: &str) -> Response<ProxyBody> {
    let code = match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let knobs = {
        let mut k = shared.knobs.lock().unwrap();
        if k.drop_next > 0 {
            k.drop_next -= 1;
            drop(k);
            shared.refused.fetch_add(1, Ordering::SeqCst);
            return Err("CountingProxy: dropping this request".into());
        }
        k.clone()
    };
    if knobs.refuse {
        // An error from the service makes hyper close the connection unanswered.
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return Err("CountingProxy: refusing".into());
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let record = Arc::new(Mutex::new(Record {
        method: method.to_string(),
        path: path.clone(),
        query,
        status: 0,
        bytes: 0,
        completed: false,
        req_headers: req.headers().clone(),
    }));
    shared.records.lock().unwrap().push(record.clone());

    if let Some(status) = knobs.fail_all {
        let mut r = record.lock().unwrap();
        r.status = status;
        r.completed = true;
        let mut resp = error_response(status, "injected by CountingProxy");
        for (k, v) in &knobs.fail_headers {
            if let (Ok(k), Ok(v)) = (
                http::header::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                resp.headers_mut().insert(k, v);
            }
        }
        return Ok(resp);
    }
    if !knobs.delay.is_zero() {
        tokio::time::sleep(knobs.delay).await;
    }

    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = format!("{}{pq}", shared.upstream).parse()?;
    strip_hop_by_hop(&mut parts.headers);
    let upstream_req = Request::from_parts(parts, body);

    let resp = match shared.client.request(upstream_req).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = record.lock().unwrap();
            r.status = 502;
            r.completed = true;
            return Ok(error_response(
                502,
                &format!("CountingProxy upstream error: {e}"),
            ));
        }
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    let is_blob_get = method == http::Method::GET
        && path.contains("/blobs/sha256:")
        && (200..300).contains(&status);
    {
        let mut r = record.lock().unwrap();
        r.status = status;
        r.completed = body.is_end_stream();
    }
    let (cut_once, corrupt_once) = if is_blob_get {
        let mut k = shared.knobs.lock().unwrap();
        let corrupt = k.corrupt_blob_next > 0;
        k.corrupt_blob_next = k.corrupt_blob_next.saturating_sub(1);
        (
            (!k.cut_blob_once.is_empty()).then(|| k.cut_blob_once.remove(0)),
            corrupt,
        )
    } else {
        (None, false)
    };
    let counting = CountingBody {
        inner: body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        record,
        shared,
        cut_after: if is_blob_get {
            match (knobs.cut_blob_after, cut_once) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            None
        },
        corrupt: is_blob_get && (knobs.corrupt_blob || corrupt_once),
        paced: is_blob_get,
        pending: Bytes::new(),
        pace_wait: None,
        sent: 0,
        done: false,
        flush_wait: None,
    };
    Ok(Response::from_parts(parts, counting.boxed()))
}

/// Forwards the upstream body, counting bytes and applying cut/corrupt
/// faults and (for blob GETs) the live rate and hold knobs.
struct CountingBody {
    inner: ProxyBody,
    record: Arc<Mutex<Record>>,
    shared: Arc<Shared>,
    cut_after: Option<u64>,
    corrupt: bool,
    /// Whether `body_rate` and `hold_blob_after` apply (successful blob GETs).
    paced: bool,
    /// Data taken from `inner` but not forwarded yet (paced bodies).
    pending: Bytes,
    /// Wait before forwarding more (pacing, or re-checking a hold).
    pace_wait: Option<Pin<Box<tokio::time::Sleep>>>,
    sent: u64,
    done: bool,
    flush_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Pause between the last forwarded chunk of a cut body and the abort.
const CUT_FLUSH_WAIT: Duration = Duration::from_millis(100);
/// How often a held body re-reads the hold knob.
const HOLD_RECHECK: Duration = Duration::from_millis(5);
/// Pieces a paced body is split into per second of pacing.
const PACE_STEPS_PER_SEC: u64 = 50;

impl CountingBody {
    fn account(&mut self, n: u64) {
        self.sent += n;
        self.shared.bytes.fetch_add(n, Ordering::SeqCst);
        self.record.lock().unwrap().bytes += n;
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                // Give hyper a moment to flush what was already forwarded, then
                // fail the body so the connection is aborted mid-response.
                let flush = this
                    .flush_wait
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CUT_FLUSH_WAIT)));
                if flush.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                return Poll::Ready(Some(Err("CountingProxy: blob body cut".into())));
            }
            if let Some(wait) = this.pace_wait.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pace_wait = None;
            }
            if this.pending.is_empty() {
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        this.record.lock().unwrap().completed = true;
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => this.pending = data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    },
                }
            }
            let mut take = this.pending.len();
            if this.paced {
                let (rate, hold) = {
                    let k = this.shared.knobs.lock().unwrap();
                    (k.body_rate, k.hold_blob_after)
                };
                if let Some(h) = hold {
                    if this.sent >= h {
                        this.pace_wait = Some(Box::pin(tokio::time::sleep(HOLD_RECHECK)));
                        continue;
                    }
                    take = take.min((h - this.sent) as usize);
                }
                if let Some(rate) = rate {
                    let step = (rate / PACE_STEPS_PER_SEC).max(1);
                    take = take.min(step as usize);
                    let pause = Duration::from_secs_f64(take as f64 / rate as f64);
                    this.pace_wait = Some(Box::pin(tokio::time::sleep(pause)));
                }
            }
            let mut data = this.pending.split_to(take);
            if let Some(limit) = this.cut_after {
                let room = limit.saturating_sub(this.sent);
                if data.len() as u64 > room {
                    // Forward what fits, then fail the body: hyper aborts the
                    // connection mid-response.
                    this.done = true;
                    this.pending = Bytes::new();
                    if room == 0 {
                        // Nothing of this frame fits: go through the
                        // flush-then-abort path above.
                        continue;
                    }
                    data.truncate(room as usize);
                }
            }
            if this.corrupt && this.sent == 0 && !data.is_empty() {
                let mut b = BytesMut::from(&data[..]);
                b[0] ^= 0xff;
                data = b.freeze();
            }
            this.account(data.len() as u64);
            if this.pending.is_empty() && this.inner.is_end_stream() && !this.done {
                this.record.lock().unwrap().completed = true;
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.done && self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.cut_after.is_some() {
            SizeHint::default()
        } else {
            // What is still inside `inner`, plus what was taken out but not forwarded.
            let inner = self.inner.size_hint();
            let extra = self.pending.len() as u64;
            let mut h = SizeHint::new();
            h.set_lower(inner.lower() + extra);
            if let Some(u) = inner.upper() {
                h.set_upper(u + extra);
            }
            h
        }
    }
}
