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
    delay: Duration,
    refuse: bool,
    cut_blob_after: Option<u64>,
    corrupt_blob: bool,
}

struct Shared {
    upstream: String,
    records: Mutex<Vec<Arc<Mutex<Record>>>>,
    bytes: AtomicU64,
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

    /// Forgets all records and zeroes `bytes_served` (knobs are kept).
    pub fn reset(&self) {
        self.shared.records.lock().unwrap().clear();
        self.shared.bytes.store(0, Ordering::SeqCst);
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

    /// For blob GETs, flip (XOR 0xff) the first body byte.
    pub fn corrupt_blob(&self, on: bool) {
        self.shared.knobs.lock().unwrap().corrupt_blob = on;
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
    let knobs = shared.knobs.lock().unwrap().clone();
    if knobs.refuse {
        // An error from the service makes hyper close the connection unanswered.
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
        return Ok(error_response(status, "injected by CountingProxy"));
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
    let counting = CountingBody {
        inner: body.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        record,
        shared,
        cut_after: if is_blob_get {
            knobs.cut_blob_after
        } else {
            None
        },
        corrupt: is_blob_get && knobs.corrupt_blob,
        sent: 0,
        done: false,
        flush_wait: None,
    };
    Ok(Response::from_parts(parts, counting.boxed()))
}

/// Forwards the upstream body, counting bytes and applying cut/corrupt faults.
struct CountingBody {
    inner: ProxyBody,
    record: Arc<Mutex<Record>>,
    shared: Arc<Shared>,
    cut_after: Option<u64>,
    corrupt: bool,
    sent: u64,
    done: bool,
    flush_wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Pause between the last forwarded chunk of a cut body and the abort.
const CUT_FLUSH_WAIT: Duration = Duration::from_millis(100);

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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.record.lock().unwrap().completed = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        if let Some(limit) = this.cut_after {
                            let room = limit.saturating_sub(this.sent);
                            if data.len() as u64 > room {
                                // Forward what fits, then fail the body: hyper
                                // aborts the connection mid-response.
                                this.done = true;
                                if room == 0 {
                                    // Nothing of this frame fits: go through
                                    // the flush-then-abort path above.
                                    cx.waker().wake_by_ref();
                                    return Poll::Pending;
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
                        if this.inner.is_end_stream() {
                            this.record.lock().unwrap().completed = true;
                        }
                        Frame::data(data)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.done && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.cut_after.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
