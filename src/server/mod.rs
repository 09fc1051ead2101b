//! The HTTP server: accept loop (hyper-util auto HTTP/1 + HTTP/2, header
//! read, idle and send timeouts, connection limit, graceful shutdown,
//! sendfile for mapped content on plain TCP), dispatch of parsed
//! routes to handlers, and the access log and request metrics in one place.

pub mod checked;
pub mod conn;
pub mod handlers;
pub mod range;
pub mod response;
pub mod route;
pub mod watchdog;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Source};
use crate::mirror::CacheResult;
use crate::state::AppState;
use conn::Conn;
use response::{Body, ErrorNote};
use route::{Registries, Route};
use watchdog::{Activity, Tracked, Verdict};

/// Most connections served at once; more wait in the accept backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long an idle connection's graceful close may take.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight responses.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Which API a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The registry API (and probes).
    Registry,
    /// Only /metrics, /livez, /readyz.
    Metrics,
}

/// Serve `listener` until `shutdown` resolves, then drain for a grace period.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    role: Role,
    shutdown: impl Future<Output = ()>,
) {
    let stopping = CancellationToken::new();
    // Connection tasks; dropping the set aborts whatever is left.
    let mut connections = tokio::task::JoinSet::new();
    let header_timeout = state.config.header_timeout;
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        // Queue body buffers (mapped files) instead of copying them into one write buffer.
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024);
    let tls = match (&state.config.tls, role) {
        (Some(files), Role::Registry) => match crate::tls::server_config(files) {
            Ok(cfg) => Some(tokio_rustls::TlsAcceptor::from(cfg)),
            Err(error) => {
                // Validated at config load; a file removed since then is fatal.
                tracing::error!(%error, "cannot set up TLS; not serving");
                return;
            }
        },
        _ => None,
    };
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let st = state.clone();
        let watched = activity.clone();
        let svc = service_fn(move |req| {
            let st = st.clone();
            let in_use = watched.begin();
            async move {
                let resp = handle(&st, role, req).await;
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::wrap(b, in_use)))
            }
        });
        let (builder, stopping, tls, st) = (
            builder.clone(),
            stopping.clone(),
            tls.clone(),
            state.clone(),
        );
        connections.spawn(async move {
            let result = match tls {
                // Plain TCP: mapped cache content goes out with sendfile(2).
                None => {
                    let io = TokioIo::new(Conn::new(stream, activity.clone(), header_timeout));
                    let conn = builder.serve_connection(io, svc);
                    drive(conn, &st, &activity, &stopping).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let io = Conn::new(tls_stream, activity.clone(), header_timeout);
                            let io = TokioIo::new(io);
                            let conn = builder.serve_connection(io, svc);
                            drive(conn, &st, &activity, &stopping).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    tokio::select! {
        _ = async { while connections.join_next().await.is_some() {} } => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; closing remaining connections"),
    }
    // Aborts the stragglers: nothing outlives `run` (in-process users such
    // as tests get the cache lock back).
    drop(connections);
}

/// Run one connection until it ends, berth shuts down (graceful: in-flight
/// responses finish, HTTP/2 gets a GOAWAY), it idles (graceful) or its
/// client stops reading (closed at once); see [`watchdog`].
async fn drive<I, S>(
    conn: auto::Connection<'_, I, S, TokioExecutor>,
    state: &AppState,
    activity: &Activity,
    stopping: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<
        Request<hyper::body::Incoming>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (idle, send) = (state.config.idle_timeout, state.config.send_timeout);
    tokio::pin!(conn);
    let mut closing = false;
    // Once closing: HTTP/2's graceful close waits for the client (a PING
    // answer, streams it opened meanwhile), so it gets a bound.
    let hard_stop = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = stopping.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
                hard_stop.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            // Re-created each turn: the verdict is read from `activity`. A
            // closing connection is still cut off when it stalls.
            verdict = activity.expired(if closing { Duration::MAX / 4 } else { idle }, send) => {
                state.mirror.metrics.connections_closed.with_label_values(&[verdict.label()]).inc();
                tracing::debug!(reason = verdict.label(), "closing client connection");
                match verdict {
                    Verdict::Idle => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                        hard_stop.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                    // Dropping the connection closes the socket.
                    Verdict::Stalled => return Ok(()),
                }
            }
            _ = &mut hard_stop => {
                // A response still moving after an idle close keeps going
                // (the stall rule still applies); shutdown's grace is final.
                if stopping.is_cancelled() || activity.open() == 0 {
                    return Ok(());
                }
                hard_stop.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// One request: parse, dispatch, log. Generic over the body so tests can
/// call it without sockets (request bodies are never read).
pub async fn handle<B>(state: &AppState, role: Role, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let head = req.method() == Method::HEAD;
    let mirrored = |h: &crate::registry::RegistryHost| state.mirror.upstreams.get(h).is_some();
    let regs = Registries {
        default: &state.config.default_registry,
        mirrored: &mirrored,
    };
    let parsed = route::parse(req.method(), req.uri().path(), req.uri().query(), &regs);
    let parsed = match (role, parsed) {
        (Role::Metrics, Ok(r @ (Route::Metrics | Route::Livez | Route::Readyz))) => Ok(r),
        (Role::Metrics, _) => Err(Error::NotFound(req.uri().path().to_owned())),
        (Role::Registry, Ok(Route::Metrics)) if state.config.metrics_listen.is_some() => Err(
            Error::NotFound("/metrics is served on the metrics listener".into()),
        ),
        (_, r) => r,
    };
    let parsed = match parsed {
        Ok(r) if !matches!(r, Route::Livez | Route::Readyz) && !authorized(state, &req) => {
            Err(Error::Unauthorized)
        }
        Ok(r) => private_guard(state, &req, r),
        other => other,
    };
    let label = parsed.as_ref().map(Route::label).unwrap_or("invalid");
    let (target, resp) = match parsed {
        Ok(route) => {
            let target = match &route {
                Route::Manifest(t, _)
                | Route::Blob(t, _)
                | Route::Tags(t)
                | Route::Referrers(t, _) => Some(t.clone()),
                _ => None,
            };
            let r = dispatch(state, route, &req, head)
                .await
                .unwrap_or_else(|e| response::error(&e, head));
            (target, r)
        }
        Err(e) => (None, response::error(&e, head)),
    };
    record(state, &req, label, target.as_ref(), &resp, started);
    resp
}

async fn dispatch<B>(
    state: &AppState,
    route: Route,
    req: &Request<B>,
    head: bool,
) -> Result<Response<Body>, Error> {
    match route {
        Route::Ping => Ok(handlers::ping(head)),
        Route::Livez => Ok(handlers::probe(state, "livez")),
        Route::Readyz => Ok(handlers::probe(state, "readyz")),
        // Encoding reads the cache filesystem's usage (statvfs): off the workers.
        Route::Metrics => {
            let st = state.clone();
            tokio::task::spawn_blocking(move || handlers::probe(&st, "metrics"))
                .await
                .map_err(|e| Error::Internal(format!("metrics task: {e}")))
        }
        Route::Manifest(t, reference) => handlers::manifest(state, &t, reference, head).await,
        Route::Blob(t, d) => handlers::blob(state, &t, &d, req.headers(), head).await,
        Route::Tags(t) => {
            let q = handlers::relay_query(req.uri().query(), &["n", "last"]);
            let tail = if q.is_empty() {
                "tags/list".to_owned()
            } else {
                format!("tags/list?{q}")
            };
            handlers::passthrough(state, &t, tail, req.headers(), head).await
        }
        Route::Referrers(t, d) => {
            let q = handlers::relay_query(req.uri().query(), &["artifactType"]);
            let tail = if q.is_empty() {
                format!("referrers/{d}")
            } else {
                format!("referrers/{d}?{q}")
            };
            handlers::passthrough(state, &t, tail, req.headers(), head).await
        }
    }
}

/// Private registries (PROTOCOL.md's "Clients SHOULD NOT send upstream
/// credentials to a proxy"): berth holds the credentials, so whoever can
/// reach berth could read what they unlocked. The model: containerd on this
/// node selects the registry with `?ns=` and is trusted like the node's own
/// runtime; any other access (path-style or default-registry names, used by
/// skopeo/docker and by anything else that can reach the port) needs the
/// client token. Every access to private content is logged.
fn private_guard<B>(state: &AppState, req: &Request<B>, r: Route) -> Result<Route, Error> {
    let t = match &r {
        Route::Manifest(t, _) | Route::Blob(t, _) | Route::Tags(t) | Route::Referrers(t, _) => t,
        _ => return Ok(r),
    };
    if !state
        .mirror
        .upstreams
        .get(&t.registry)
        .is_some_and(|u| u.private)
    {
        return Ok(r);
    }
    let token_presented = state.config.client_token.is_some() && authorized(state, req);
    if t.ns.is_none() && !token_presented {
        tracing::warn!(target: "berth::private", registry = %t.registry, repo = %t.repo, "refused path-style access to a private registry");
        return Err(Error::RegistryUnknown(format!(
            "{} is private: select it with ?ns= (containerd) or authenticate with the client token",
            t.registry
        )));
    }
    tracing::info!(target: "berth::private", registry = %t.registry, repo = %t.repo, path = req.uri().path(), ns = t.ns.as_deref().unwrap_or("-"), "private content accessed");
    Ok(r)
}

/// Whether the request carries the configured client token (as a Bearer
/// token, or as the password of Basic credentials, for clients such as
/// skopeo `--creds`). Compared in constant time.
fn authorized<B>(state: &AppState, req: &Request<B>) -> bool {
    let Some(expected) = &state.config.client_token else {
        return true;
    };
    let Some(h) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let presented = if let Some(t) = h.strip_prefix("Bearer ") {
        t.trim().to_owned()
    } else if let Some(b) = h.strip_prefix("Basic ") {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .unwrap_or_default();
        let raw = String::from_utf8_lossy(&raw).into_owned();
        raw.split_once(':')
            .map(|(_, p)| p.to_owned())
            .unwrap_or_default()
    } else {
        return false;
    };
    token_matches(&presented, &expected.0)
}

/// Constant-time token comparison that leaks neither where the tokens
/// differ nor the expected token's length: both sides are hashed to
/// fixed-size sha256 digests, which `subtle` compares without branching.
fn token_matches(presented: &str, expected: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    use subtle::ConstantTimeEq as _;
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// The access log line and request metrics.
fn record<B>(
    state: &AppState,
    req: &Request<B>,
    label: &'static str,
    target: Option<&route::Target>,
    resp: &Response<Body>,
    started: Instant,
) {
    let elapsed = started.elapsed();
    let status = resp.status();
    let m = &state.mirror.metrics;
    m.requests
        .with_label_values(&[label, req.method().as_str(), status.as_str()])
        .inc();
    m.request_duration
        .with_label_values(&[label])
        .observe(elapsed.as_secs_f64());
    let result = resp.extensions().get::<CacheResult>().copied();
    if let (Some(r), "manifest" | "blob") = (result, label) {
        m.cache_results.with_label_values(&[label, r.label()]).inc();
    }
    let bytes = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let registry = target.map(|t| t.registry.as_str()).unwrap_or("-");
    let repo = target.map(|t| t.repo.as_str()).unwrap_or("-");
    let ns = target.and_then(|t| t.ns.as_deref()).unwrap_or("-");
    let result = result.map(CacheResult::label).unwrap_or("-");
    let error = resp.extensions().get::<ErrorNote>();
    let detail = error.and_then(|e| e.0.detail()).unwrap_or_default();
    match error.map(|e| e.0.source_kind()) {
        Some(Source::Internal) => {
            tracing::error!(target: "berth::access", method = %req.method(), path = req.uri().path(), status = status.as_u16(), ns, registry, repo, route = label, result, bytes, duration_ms = elapsed.as_secs_f64() * 1e3, error = %error.map(|e| e.0.to_string()).unwrap_or_default(), detail, "request")
        }
        Some(Source::Upstream) => {
            tracing::warn!(target: "berth::access", method = %req.method(), path = req.uri().path(), status = status.as_u16(), ns, registry, repo, route = label, result, bytes, duration_ms = elapsed.as_secs_f64() * 1e3, error = %error.map(|e| e.0.to_string()).unwrap_or_default(), detail, "request")
        }
        _ => {
            tracing::info!(target: "berth::access", method = %req.method(), path = req.uri().path(), status = status.as_u16(), ns, registry, repo, route = label, result, bytes, duration_ms = elapsed.as_secs_f64() * 1e3, "request")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn client_tokens_match_only_when_equal() {
        assert!(token_matches("s3cret-token", "s3cret-token"));
        assert!(!token_matches("s3cret-tokem", "s3cret-token"));
        assert!(!token_matches("s3cret", "s3cret-token"), "a prefix");
        assert!(!token_matches("s3cret-token-and-more", "s3cret-token"));
        assert!(!token_matches("", "s3cret-token"));
        assert!(!token_matches("S3CRET-TOKEN", "s3cret-token"));
    }
}
