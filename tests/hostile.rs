//! Hostile clients: slow-loris connections (silent, trickling headers, a
//! piece of the HTTP/2 preface, idle keep-alive) closed by the header
//! timeout while normal clients are served at once; silent connections
//! beyond the connection limit (berth holds no more than `MAX_CONNECTIONS`;
//! a normal client waits about the header timeout at most); over-long
//! paths, headers and names answered with bounded errors; a request flood
//! with bounded memory and no error; invalid `Range` values on hits, misses
//! and HEADs; private registries off the anonymous path-style route, with
//! every access logged; idle HTTP/2 connections closed by the idle timeout,
//! clients that stop reading (HTTP/1 socket full, HTTP/2 window never
//! reopened) cut off by the send timeout; content cached through a private
//! registry not handed out (from the cache or a download in flight) through
//! another registry until that registry's upstream proved it has it, also
//! after a restart.
//!
//! Everything runs against the real binary on 127.0.0.1; counts and times
//! are bounded, and time limits are generous "no hang" bounds, never
//! throughput assertions.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::berth::{settled, Berth};
use common::content::{self, Image, MediaKind};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The header timeout berth runs with here (the default is 15 s).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Generous bound for anything that must not hang.
const PATIENCE: Duration = Duration::from_secs(30);

struct Env {
    _origin: Origin,
    proxy: CountingProxy,
    berth: Berth,
    image: Image,
}

/// origin (one small image `library/app:1`) <- counting proxy <- berth.
async fn setup(extra: &[&str]) -> Option<Env> {
    setup_with(HEADER_TIMEOUT, extra).await
}

async fn setup_with(header_timeout: Duration, extra: &[&str]) -> Option<Env> {
    if !tools::require("docker-registry") {
        return None;
    }
    let origin = Origin::start().await;
    let image = content::build_image(71, 2, 48 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/app", "1", &image)
        .await
        .unwrap();
    let proxy = CountingProxy::start(&origin.url()).await;
    let up = format!("docker.io={}", proxy.url());
    let timeout = format!("{}s", header_timeout.as_secs());
    let mut args = vec!["--upstream", &up, "--header-timeout", &timeout];
    args.extend_from_slice(extra);
    let berth = Berth::start(&args).await;
    Some(Env {
        _origin: origin,
        proxy,
        berth,
        image,
    })
}

/// Send raw bytes, read the answer until the server closes (bounded).
/// Returns (status, head, body); status 0 when the server closed without
/// an answer.
async fn raw(addr: &str, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything (431).
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the server answers (or closes) in time");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, body)
}

fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n{extra}\r\n").into_bytes()
}

fn status_line(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Poll until `cond` or PATIENCE.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Read from a slow-loris connection until the server closes it; returns
/// how long that took and whatever was answered.
async fn closed_after(mut s: TcpStream, started: Instant) -> (Duration, Vec<u8>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
            Err(_) => panic!("a slow-loris connection was still open after {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_while_normal_clients_are_served() {
    let Some(env) = setup(&[]).await else { return };
    let addr = env.berth.addr();
    let pid = env.berth.pid();
    let http = tools::http_client();
    let layer = &env.image.layers[0];
    let blob_url = format!(
        "{}/v2/library/app/blobs/{}?ns=docker.io",
        env.berth.url(),
        layer.digest
    );
    assert_eq!(http.get(&blob_url).send().await.unwrap().status(), 200);
    let fds_before = fds(pid);

    const EACH: usize = 40;
    let started = Instant::now();
    let mut conns = Vec::new();
    for i in 0..4 * EACH {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        match i % 4 {
            // Connects and says nothing.
            0 => {}
            // A piece of the HTTP/2 preface, then nothing.
            1 => s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),
            // A request head that never ends (trickled below).
            2 => s
                .write_all(b"GET /v2/ HTTP/1.1\r\nHost: berth\r\nX-Slow: ")
                .await
                .unwrap(),
            // One complete request, then an idle keep-alive connection.
            _ => {
                s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: berth\r\n\r\n")
                    .await
                    .unwrap();
            }
        }
        conns.push(s);
    }
    // Trickle one header byte every 200 ms on the "2" connections: each
    // byte arrives well within any per-read timeout, the head never ends.
    let (tricklers, rest): (Vec<_>, Vec<_>) =
        conns.into_iter().enumerate().partition(|(i, _)| i % 4 == 2);
    let mut waits = Vec::new();
    for (_, s) in tricklers {
        waits.push(tokio::spawn(async move {
            let (mut rd, mut wr) = s.into_split();
            let writer = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if wr.write_all(b"a").await.is_err() {
                        return;
                    }
                }
            });
            let mut buf = [0u8; 1024];
            let mut out = Vec::new();
            let took = loop {
                match tokio::time::timeout(PATIENCE, rd.read(&mut buf)).await {
                    Err(_) => panic!("a trickling connection was still open after {PATIENCE:?}"),
                    Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
                    Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                }
            };
            writer.abort();
            (took, out, 2)
        }));
    }
    for (i, s) in rest {
        waits.push(tokio::spawn(async move {
            let (took, out) = closed_after(s, started).await;
            (took, out, i % 4)
        }));
    }

    // Meanwhile, normal clients are served at once.
    for _ in 0..5 {
        let t = Instant::now();
        let r = http.get(&blob_url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), layer.bytes);
        let r = http
            .get(format!("{}/v2/", env.berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a normal client waited {:?} behind slow-loris connections",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut slowest = Duration::ZERO;
    for w in waits {
        let (took, out, kind) = w.await.unwrap();
        slowest = slowest.max(took);
        assert!(
            took >= HEADER_TIMEOUT - Duration::from_millis(500),
            "kind {kind} closed after {took:?}, before the header timeout"
        );
        assert!(
            took < HEADER_TIMEOUT + Duration::from_secs(8),
            "kind {kind} closed only after {took:?}"
        );
        let text = String::from_utf8_lossy(&out);
        if kind == 3 {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        } else {
            assert!(
                out.is_empty() || text.starts_with("HTTP/1.1 408"),
                "kind {kind} got {text}"
            );
        }
    }
    eprintln!("slow-loris connections closed after at most {slowest:?}");
    until("berth released the slow-loris sockets", || {
        fds(pid) <= fds_before + 4
    })
    .await;
    assert_eq!(
        http.get(&blob_url).send().await.unwrap().status(),
        200,
        "still serving"
    );
}

/// Read until the server closes the connection (EOF or reset); the bytes read.
async fn drain(mut s: TcpStream) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}

fn closed_count(metrics: &str, reason: &str) -> u64 {
    let series = format!("berth_client_connections_closed_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_and_clients_that_stop_reading_are_closed() {
    const IDLE: Duration = Duration::from_secs(2);
    const SEND: Duration = Duration::from_secs(2);
    let Some(env) = setup(&["--idle-timeout", "2s", "--send-timeout", "2s"]).await else {
        return;
    };
    let addr = env.berth.addr();
    let http = tools::http_client();
    // Bigger than loopback socket buffers (a few MiB), cached before the test.
    let big = content::Blob::new(
        "application/octet-stream",
        content::pseudo_random_bytes(73, 48 << 20),
    );
    content::RegistryClient::new(&env._origin.url())
        .push_blob("library/app", &big)
        .await
        .unwrap();
    let path = format!("/v2/library/app/blobs/{}?ns=docker.io", big.digest);
    let r = http
        .get(format!("{}{path}", env.berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), big.bytes.len());

    // 1. HTTP/2: preface and SETTINGS, then silence.
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let idle_h2 = tokio::spawn(closed_after(s, started));

    // 1b. HTTP/2 with no request but a PING every 300 ms: control traffic
    // does not keep a connection open.
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (_pinger_h2, mut pinger) = h2::client::handshake(tcp).await.unwrap();
    let mut ping_pong = pinger.ping_pong().expect("ping_pong taken once");
    let pinging = tokio::spawn(async move {
        let started = Instant::now();
        let conn = tokio::spawn(async move {
            let _ = pinger.await;
        });
        let mut pongs = 0u32;
        while !conn.is_finished() {
            if ping_pong.ping(h2::Ping::opaque()).await.is_ok() {
                pongs += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (started.elapsed(), pongs)
    });

    // 2. HTTP/1.1: ask for the big blob, read a little, stop reading. A
    // small receive buffer (no autotuning) so that berth's writes block.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    let mut s = sock.connect(addr.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: berth\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    s.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(SEND + Duration::from_secs(3)).await;
    let got = drain(s).await + first.len();
    assert!(
        got < big.bytes.len(),
        "a client that stopped reading was cut off ({got} of {} bytes)",
        big.bytes.len()
    );

    // 3. HTTP/2: ask for the big blob and never reopen the flow-control
    // window (berth can send 64 KiB, then has to wait for the client).
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn_task = tokio::spawn(conn);
    let req = http::Request::get(format!("http://berth{path}"))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let stalled = Instant::now();
    let mut body = resp.into_body();
    let mut h2_got = 0;
    // Take the data without releasing capacity: the window stays shut.
    let end = tokio::time::timeout(PATIENCE, async {
        while let Some(chunk) = body.data().await {
            match chunk {
                Ok(c) => h2_got += c.len(),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stalled HTTP/2 stream was never closed");
    assert!(h2_got < big.bytes.len(), "{h2_got}");
    assert!(
        stalled.elapsed() >= SEND.min(IDLE) - Duration::from_millis(500),
        "closed after {:?}, before the send/idle timeout",
        stalled.elapsed()
    );
    let _ = tokio::time::timeout(PATIENCE, conn_task).await;

    let (took, _) = idle_h2.await.unwrap();
    assert!(
        took >= IDLE - Duration::from_millis(500) && took < IDLE + Duration::from_secs(8),
        "idle HTTP/2 connection closed after {took:?}"
    );
    let metrics = tools::metrics_text(&env.berth.url()).await;
    let (took, pongs) = tokio::time::timeout(PATIENCE, pinging)
        .await
        .expect("a pinging HTTP/2 connection was closed")
        .unwrap();
    assert!(
        pongs >= 3,
        "the client pinged while it waited ({pongs} pongs)"
    );
    assert!(
        took >= IDLE - Duration::from_millis(500) && took < IDLE + Duration::from_secs(8),
        "pinging HTTP/2 connection closed after {took:?}"
    );
    // Idle: the silent and the pinging HTTP/2 connections; stalled: the
    // HTTP/1 reader and the HTTP/2 stream with a shut window.
    assert!(closed_count(&metrics, "idle") >= 2, "{metrics}");
    assert!(closed_count(&metrics, "stalled") >= 2, "{metrics}");
    // Still serving, the exact bytes.
    let r = http
        .get(format!("{}{path}", env.berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), big.bytes);
}

/// The soft RLIMIT_NOFILE of this process (inherited by berth).
fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_connection_limit_only_delay_clients_by_the_header_timeout() {
    let limit = berth::server::MAX_CONNECTIONS;
    let extra = 64;
    if fd_limit() < 2 * (limit + extra) as u64 + 512 {
        eprintln!(
            "SKIP: RLIMIT_NOFILE {} is too low to open {limit} connections",
            fd_limit()
        );
        return;
    }
    // Long enough that opening every connection takes less, even on a busy machine.
    let header_timeout = Duration::from_secs(8);
    let Some(env) = setup_with(header_timeout, &[]).await else {
        return;
    };
    let pid = env.berth.pid();
    let addr = env.berth.addr();
    let base_fds = fds(pid);
    // Watch berth's descriptors for the whole test: it must never hold
    // more connections than its limit.
    let peak = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (peak, watching) = (peak.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak.fetch_max(rd.count() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = Instant::now();
    let mut silent = Vec::with_capacity(limit + extra);
    for _ in 0..limit + extra {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    let opened = started.elapsed();
    if opened < header_timeout / 2 {
        // Every slot is taken by a connection that says nothing (on a very
        // busy machine the first ones may already be closed by now).
        until("berth accepted up to its limit", || {
            peak.load(Ordering::Relaxed) as usize >= base_fds + limit - 16
        })
        .await;
    }
    // A normal client waits in the accept backlog until the header timeout
    // frees slots, then is served.
    let t = Instant::now();
    let r = tools::http_client()
        .get(format!("{}/v2/", env.berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let waited = t.elapsed();
    eprintln!(
        "{} silent connections opened in {opened:?}; a normal client was served after {waited:?}",
        limit + extra
    );
    assert!(
        waited < header_timeout + Duration::from_secs(10),
        "a normal client waited {waited:?}"
    );
    let mut closed = 0;
    for s in silent {
        let (took, out) = closed_after(s, started).await;
        assert!(out.is_empty());
        assert!(took < opened + header_timeout * 3 + Duration::from_secs(10));
        closed += 1;
    }
    assert_eq!(closed, limit + extra);
    until("berth released them", || fds(pid) <= base_fds + 4).await;
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    let peak = peak.load(Ordering::Relaxed) as usize;
    eprintln!("berth held at most {peak} fds ({base_fds} before)");
    assert!(
        peak <= base_fds + limit + 16,
        "berth held {peak} fds: more connections than its limit of {limit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_paths_headers_and_names_get_bounded_errors() {
    let Some(env) = setup(&[]).await else { return };
    let a = env.berth.addr();
    let digest = &env.image.layers[0].digest;
    let ok_blob = format!("/v2/library/app/blobs/{digest}?ns=docker.io");

    // (request, acceptable statuses, OCI code when berth itself answers)
    let long_header = format!("X-Big: {}\r\n", "a".repeat(70 * 1024));
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let long_name = format!("X-{}: v\r\n", "n".repeat(70 * 1024));
    let cases: Vec<(Vec<u8>, &[u16], Option<&str>)> = vec![
        (
            get(&format!("/v2/{}/manifests/1", "a/".repeat(1500)), ""),
            &[400][..],
            Some("NAME_INVALID"),
        ),
        (
            get(&format!("/v2/library/{}/manifests/1", "x".repeat(300)), ""),
            &[400][..],
            Some("NAME_INVALID"),
        ),
        (
            get(
                &format!("/v2/library/app/manifests/{}", "t".repeat(129)),
                "",
            ),
            &[400][..],
            Some("MANIFEST_INVALID"),
        ),
        (
            get(
                &format!("/v2/library/app/blobs/sha256:{}", "a".repeat(2000)),
                "",
            ),
            &[400][..],
            Some("DIGEST_INVALID"),
        ),
        (
            get(
                &format!("/v2/library/app/manifests/1?ns={}", "r".repeat(1500)),
                "",
            ),
            &[404][..],
            Some("NAME_UNKNOWN"),
        ),
        (
            get(
                &format!("/v2/{}.example/app/manifests/1", "h".repeat(400)),
                "",
            ),
            &[400, 404][..],
            None,
        ),
        // A URI longer than hyper's whole read buffer (64 KiB).
        (
            get(&format!("/v2/{}", "a".repeat(80 * 1024)), ""),
            &[400, 414, 431][..],
            None,
        ),
        (get(&ok_blob, &long_header), &[431, 400][..], None),
        (get(&ok_blob, &many_headers), &[431, 400][..], None),
        (get(&ok_blob, &long_name), &[431, 400][..], None),
        // A huge query on a valid route is ignored.
        (
            get(&format!("/v2/?{}", "k=v&".repeat(10_000)), ""),
            &[200][..],
            None,
        ),
        // Bytes that are not a valid request target, method or header name.
        (
            b"GET /v2/\xff\xfe HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(),
            &[400][..],
            None,
        ),
        (
            format!(
                "{} /v2/ HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
                "M".repeat(5000)
            )
            .into_bytes(),
            &[400, 405, 414, 431][..],
            None,
        ),
        (
            b"GET /v2/ HTTP/1.1\r\nHost: b\r\nX-Bad\x01Name: v\r\nConnection: close\r\n\r\n"
                .to_vec(),
            &[400][..],
            None,
        ),
    ];
    for (req, statuses, code) in &cases {
        let (st, head, body) = raw(&a, req).await;
        let shown = String::from_utf8_lossy(&req[..req.len().min(120)]).into_owned();
        assert!(
            statuses.contains(&st),
            "{shown}...: {st} not in {statuses:?}\n{head}"
        );
        if let Some(code) = code {
            assert_eq!(tools::oci_code(&body), *code, "{shown}");
        }
    }

    // The same over HTTP/2 (prior knowledge): an over-long header list is
    // refused, the connection or the stream fails, nothing crashes.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/v2/", env.berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "HTTP/2 works");
    let r = h2
        .get(format!("{}/v2/", env.berth.url()))
        .header("x-big", "b".repeat(100 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(
            r.status() == 431 || r.status() == 400,
            "HTTP/2 oversized header list: {}",
            r.status()
        );
    }
    let r = h2
        .get(format!(
            "{}/v2/library/{}/manifests/1",
            env.berth.url(),
            "x".repeat(3000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let (st, _, body) = raw(&a, &get(&ok_blob, "")).await;
    assert_eq!(st, 200, "still serving");
    assert_eq!(body, env.image.layers[0].bytes);
    assert_eq!(
        env.proxy.count("GET", "/manifests/"),
        0,
        "no refused request reached the upstream: {:?}",
        env.proxy.requests()
    );
    assert!(!env.berth.log().contains("panicked"), "{}", env.berth.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flood_keeps_memory_bounded_and_gets_no_error() {
    let Some(env) = setup(&[]).await else { return };
    let pid = env.berth.pid();
    let base = env.berth.url();
    let img = &env.image;
    // Warm the cache: the manifest by tag and every blob.
    let via = content::RegistryClient::new(&base);
    assert_eq!(
        via.get_manifest("docker.io/library/app", "1")
            .await
            .unwrap()
            .status,
        200
    );
    for b in img.blobs() {
        assert_eq!(
            via.get_blob("docker.io/library/app", &b.digest)
                .await
                .unwrap(),
            b.bytes
        );
    }
    env.proxy.reset();

    // (url, expected status, expected body length)
    let targets: Arc<Vec<(String, u16, Option<usize>)>> = Arc::new(vec![
        (format!("{base}/v2/"), 200, Some(2)),
        (
            format!(
                "{base}/v2/library/app/blobs/{}?ns=docker.io",
                img.config.digest
            ),
            200,
            Some(img.config.bytes.len()),
        ),
        (
            format!(
                "{base}/v2/library/app/manifests/{}?ns=docker.io",
                img.manifest_digest
            ),
            200,
            Some(img.manifest_bytes.len()),
        ),
        (
            format!("{base}/v2/library/app/manifests/1?ns=docker.io"),
            200,
            Some(img.manifest_bytes.len()),
        ),
        (format!("{base}/v2/Bad..Name/manifests/1"), 400, None),
        (
            format!("{base}/v2/library/app/manifests/1?ns=evil.example"),
            404,
            None,
        ),
    ]);
    let errors = Arc::new(AtomicU64::new(0));
    let flood = |total: usize| {
        let (targets, errors) = (targets.clone(), errors.clone());
        async move {
            const CONNS: usize = 64;
            let mut tasks = Vec::new();
            for c in 0..CONNS {
                let (targets, errors) = (targets.clone(), errors.clone());
                tasks.push(tokio::spawn(async move {
                    // One connection per task.
                    let http = reqwest::Client::builder()
                        .no_proxy()
                        .http1_only()
                        .pool_max_idle_per_host(1)
                        .timeout(PATIENCE)
                        .build()
                        .unwrap();
                    for i in 0..total / CONNS {
                        let (url, status, len) = &targets[(c + i) % targets.len()];
                        let ok = match http.get(url).send().await {
                            Ok(r) if r.status() == *status => match r.bytes().await {
                                Ok(b) => len.is_none_or(|l| b.len() == l),
                                Err(_) => false,
                            },
                            _ => false,
                        };
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    flood(2_048).await;
    let rss_warm = status_line(pid, "VmRSS:");
    let fds_warm = fds(pid);
    let t = Instant::now();
    let total = 20_480;
    tokio::time::timeout(Duration::from_secs(240), flood(total))
        .await
        .expect("the flood finished within the bound");
    let took = t.elapsed();
    let rss_after = status_line(pid, "VmRSS:");
    eprintln!(
        "flood: {total} requests over 64 connections in {took:?}; VmRSS {rss_warm} -> {rss_after} KiB; fds {fds_warm} -> {}",
        fds(pid)
    );
    assert_eq!(errors.load(Ordering::Relaxed), 0, "failed requests");
    assert!(
        rss_after < rss_warm + 64 * 1024,
        "RSS grew from {rss_warm} KiB to {rss_after} KiB"
    );
    until("the flood's connections are released", || {
        fds(pid) <= fds_warm + 4
    })
    .await;
    assert_eq!(
        env.proxy.requests().len(),
        0,
        "everything was answered from the cache or refused locally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ranges_are_416_on_hits_misses_and_heads() {
    let Some(env) = setup(&[]).await else { return };
    let a = env.berth.addr();
    let cached = &env.image.layers[0];
    let cold = &env.image.layers[1];
    let url = |b: &content::Blob| format!("/v2/library/app/blobs/{}?ns=docker.io", b.digest);
    let (st, _, _) = raw(&a, &get(&url(cached), "")).await;
    assert_eq!(st, 200);

    for blob in [cached, cold] {
        let size = blob.size();
        let invalid: Vec<Vec<u8>> = vec![
            b"bytes=abc".to_vec(),
            b"bytes=5-2".to_vec(),
            b"bytes=-0".to_vec(),
            b"bytes=".to_vec(),
            b"bytes=-".to_vec(),
            b"bytes=--1".to_vec(),
            b"bytes=1--2".to_vec(),
            b"bytes=0x10-".to_vec(),
            b"bytes=+1-2".to_vec(),
            b"bytes=99999999999999999999999-".to_vec(),
            b"bytes=18446744073709551615-".to_vec(),
            b"bytes=-99999999999999999999999".to_vec(),
            format!("bytes={size}-").into_bytes(),
            format!("bytes={}-{}", size + 10, size + 20).into_bytes(),
            b"bytes=\xff-1".to_vec(),
        ];
        for method in ["GET", "HEAD"] {
            for r in &invalid {
                let mut req = format!(
                    "{method} {} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nRange: ",
                    url(blob)
                )
                .into_bytes();
                req.extend_from_slice(r);
                req.extend_from_slice(b"\r\n\r\n");
                let (st, head, body) = raw(&a, &req).await;
                let shown = String::from_utf8_lossy(r);
                assert_eq!(st, 416, "{method} Range: {shown}: {head}");
                assert!(
                    head.to_ascii_lowercase()
                        .contains(&format!("content-range: bytes */{}", blob.size())),
                    "{method} Range: {shown}: {head}"
                );
                if method == "GET" {
                    assert_eq!(tools::oci_code(&body), "RANGE_INVALID");
                }
            }
        }
    }
    // Valid edge cases, on the (by now cached) cold blob and the hot one.
    for blob in [cached, cold] {
        let n = blob.size();
        let cases: Vec<(String, u16, u64, u64)> = vec![
            ("bytes=0-0".into(), 206, 0, 1),
            (format!("bytes={}-", n - 1), 206, n - 1, n),
            ("bytes=0-18446744073709551615".into(), 206, 0, n),
            (format!("bytes=-{}", n + 100), 206, 0, n),
            ("bytes= 3-9".into(), 206, 3, 10),
            // Several ranges, or another unit: the whole blob.
            ("bytes=0-1,5-6".into(), 200, 0, n),
            ("items=0-1".into(), 200, 0, n),
        ];
        for (range, status, start, end) in cases {
            let (st, head, body) = raw(&a, &get(&url(blob), &format!("Range: {range}\r\n"))).await;
            assert_eq!(st, status, "Range: {range}: {head}");
            assert_eq!(
                body,
                blob.bytes[start as usize..end as usize],
                "Range: {range}"
            );
        }
    }
    let (st, _, _) = raw(&a, &get("/v2/", "")).await;
    assert_eq!(st, 200);
    assert!(!env.berth.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registries_are_off_the_anonymous_path_style_route() {
    if !tools::require("docker-registry") {
        return;
    }
    let origin = Origin::start().await;
    let image = content::build_image(72, 1, 16 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "team/app", "1", &image)
        .await
        .unwrap();
    let proxy = CountingProxy::start(&origin.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[registries.\"private.example\"]\nurl = \"{0}\"\nprivate = true\n\n\
             [registries.\"public.example\"]\nurl = \"{0}\"\n",
            proxy.url()
        ),
    )
    .unwrap();
    let berth = Berth::start(&["--config", cfg.to_str().unwrap()]).await;
    let a = berth.addr();
    let layer = &image.layers[0].digest;

    let refused = [
        "/v2/private.example/team/app/manifests/1".to_owned(),
        format!(
            "/v2/private.example/team/app/manifests/{}",
            image.manifest_digest
        ),
        format!("/v2/private.example/team/app/blobs/{layer}"),
        "/v2/private.example/team/app/tags/list".to_owned(),
    ];
    for target in &refused {
        let (st, head, body) = raw(&a, &get(target, "")).await;
        assert_eq!(st, 404, "{target}: {head}");
        assert_eq!(tools::oci_code(&body), "NAME_UNKNOWN", "{target}");
    }
    assert_eq!(
        proxy.requests().len(),
        0,
        "a refused request makes no upstream request"
    );

    // containerd's way, ?ns=, is allowed (and caches).
    let allowed = [
        "/v2/team/app/manifests/1?ns=private.example".to_owned(),
        format!("/v2/team/app/blobs/{layer}?ns=private.example"),
    ];
    for target in &allowed {
        let (st, head, _) = raw(&a, &get(target, "")).await;
        assert_eq!(st, 200, "{target}: {head}");
    }
    // Cached now, and still not served path-style.
    for target in &refused[..3] {
        let (st, _, body) = raw(&a, &get(target, "")).await;
        assert_eq!((st, tools::oci_code(&body).as_str()), (404, "NAME_UNKNOWN"));
    }
    // A public registry on the same origin is unaffected.
    let (st, _, _) = raw(&a, &get("/v2/public.example/team/app/manifests/1", "")).await;
    assert_eq!(st, 200);

    let log = berth.log();
    assert!(
        log.contains("refused path-style access to a private registry"),
        "{log}"
    );
    assert!(log.contains("private content accessed"), "{log}");
    let accessed = log
        .lines()
        .filter(|l| l.contains("private content accessed"))
        .count();
    assert!(
        accessed >= allowed.len(),
        "every private access is logged ({accessed})"
    );
    drop(berth);

    // With a client token: the token unlocks path-style and default-registry
    // names; without it nothing is answered.
    let token = "hostile-test-client-token-0123456789";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let berth = Berth::start_with_env(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--default-registry",
            "private.example",
            "--client-token-file",
            token_file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let a = berth.addr();
    let bearer = format!("Authorization: Bearer {token}\r\n");
    for target in [
        "/v2/private.example/team/app/manifests/1",
        "/v2/team/app/manifests/1",
        "/v2/team/app/manifests/1?ns=private.example",
    ] {
        let (st, _, _) = raw(&a, &get(target, "")).await;
        assert_eq!(st, 401, "{target} without the token");
        let (st, head, _) = raw(&a, &get(target, &bearer)).await;
        assert_eq!(st, 200, "{target} with the token: {head}");
    }
    let log = berth.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("private content accessed"))
            .count(),
        3,
        "{log}"
    );
}

/// Two mirrored registries with distribution origins behind counting
/// proxies: `private.example` (private, holding `team/app:1`) and
/// `public.example` (without it), plus `private2.example` (private, other
/// content).
struct Provenance {
    image: Image,
    public_origin: Origin,
    private: CountingProxy,
    public: CountingProxy,
    private2: CountingProxy,
    cfg: tempfile::TempDir,
    _origins: Vec<Origin>,
}

impl Provenance {
    async fn start(image: Image) -> Provenance {
        let (private_origin, public_origin, private2_origin) = (
            Origin::start().await,
            Origin::start().await,
            Origin::start().await,
        );
        content::push_image(&private_origin.url(), "team/app", "1", &image)
            .await
            .unwrap();
        let other = content::build_image(75, 1, 16 * 1024, MediaKind::Oci, "amd64");
        content::push_image(&private2_origin.url(), "team/app", "1", &other)
            .await
            .unwrap();
        let private = CountingProxy::start(&private_origin.url()).await;
        let public = CountingProxy::start(&public_origin.url()).await;
        let private2 = CountingProxy::start(&private2_origin.url()).await;
        let cfg = tempfile::tempdir().unwrap();
        std::fs::write(
            cfg.path().join("berth.toml"),
            format!(
                "[registries.\"private.example\"]\nurl = \"{}\"\nprivate = true\n\n\
                 [registries.\"public.example\"]\nurl = \"{}\"\n\n\
                 [registries.\"private2.example\"]\nurl = \"{}\"\nprivate = true\n",
                private.url(),
                public.url(),
                private2.url()
            ),
        )
        .unwrap();
        Provenance {
            image,
            public_origin,
            private,
            public,
            private2,
            cfg,
            _origins: vec![private_origin, private2_origin],
        }
    }

    async fn berth(&self, cache: &std::path::Path) -> Berth {
        let cfg = self.cfg.path().join("berth.toml");
        Berth::start_with_dir(cache, &["--config", cfg.to_str().unwrap()]).await
    }
}

fn head_req(target: &str) -> Vec<u8> {
    format!("HEAD {target} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\n\r\n").into_bytes()
}

fn refusals(metrics: &str, registry: &str, reason: &str) -> u64 {
    let (registry, reason) = (
        format!("registry=\"{registry}\""),
        format!("reason=\"{reason}\""),
    );
    metrics
        .lines()
        .filter(|l| l.starts_with("berth_private_refusals_total{"))
        .filter(|l| l.contains(&registry) && l.contains(&reason))
        .find_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Content pulled through a private registry is cached by digest, but a
/// request naming another registry gets it only once that registry's
/// upstream answered a HEAD for it; the record survives a restart, and a
/// public registry that has the content makes it public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_private_content_needs_upstream_proof_through_another_registry() {
    if !tools::require("docker-registry") {
        return;
    }
    let image = content::build_image(74, 1, 64 * 1024, MediaKind::Oci, "amd64");
    let env = Provenance::start(image).await;
    let (layer, manifest) = (&env.image.layers[0], &env.image.manifest_digest);
    let cache = tempfile::tempdir().unwrap();
    let berth = env.berth(cache.path()).await;
    let a = berth.addr();

    // Pulled through the private registry, containerd's way.
    let (st, head, _) = raw(&a, &get("/v2/team/app/manifests/1?ns=private.example", "")).await;
    assert_eq!(st, 200, "{head}");
    let private_blob = format!("/v2/team/app/blobs/{}?ns=private.example", layer.digest);
    let (st, head, body) = raw(&a, &get(&private_blob, "")).await;
    assert_eq!(st, 200, "{head}");
    assert_eq!(body, layer.bytes.as_ref());
    assert!(settled(cache.path()).await);
    for d in [&layer.digest, manifest] {
        let hex = d.strip_prefix("sha256:").unwrap();
        let record = cache.path().join("private/sha256").join(hex);
        let text = std::fs::read_to_string(&record).unwrap();
        assert_eq!(text.trim(), "private.example", "{}", record.display());
    }

    // The same digests named through the public registry (path-style,
    // anonymous): its origin does not have them, so nothing is served.
    let blob_path = format!("/v2/public.example/team/app/blobs/{}", layer.digest);
    let manifest_path = format!("/v2/public.example/team/app/manifests/{manifest}");
    let refuse_all = |env: &Provenance, a: &str, round: usize| {
        let (blob_path, manifest_path, a) =
            (blob_path.clone(), manifest_path.clone(), a.to_owned());
        let layer_bytes = layer.bytes.clone();
        let (heads_before, manifests_before) = (
            env.public.count("HEAD", &layer.digest),
            env.public.count("HEAD", manifest),
        );
        async move {
            let (st, head, body) = raw(&a, &get(&blob_path, "")).await;
            assert_eq!(
                (st, tools::oci_code(&body).as_str()),
                (404, "BLOB_UNKNOWN"),
                "round {round}: {head}"
            );
            assert!(!body.windows(64).any(|w| layer_bytes.starts_with(w)));
            let (st, _, body) = raw(&a, &head_req(&blob_path)).await;
            assert_eq!((st, body.len()), (404, 0), "round {round}: HEAD");
            let (st, head, body) = raw(&a, &get(&manifest_path, "")).await;
            assert_eq!(
                (st, tools::oci_code(&body).as_str()),
                (404, "MANIFEST_UNKNOWN"),
                "round {round}: {head}"
            );
            (heads_before, manifests_before)
        }
    };
    let (blob_heads, manifest_heads) = refuse_all(&env, &a, 1).await;
    assert_eq!(
        env.public.count("HEAD", &layer.digest),
        blob_heads + 2,
        "{:?}",
        env.public.requests()
    );
    assert_eq!(env.public.count("HEAD", manifest), manifest_heads + 1);
    assert_eq!(
        env.public.blob_gets(),
        0,
        "nothing is downloaded for a refusal"
    );
    assert_eq!(env.public.manifest_gets(), 0);
    let log = berth.log();
    assert!(
        log.contains(
            "refused cached private content to a registry that did not prove it serves it"
        ),
        "{log}"
    );
    let (_, _, metrics) = raw(&a, &get("/metrics", "")).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert_eq!(
        refusals(&metrics, "public.example", "not_found"),
        3,
        "{metrics}"
    );

    // Another private registry, selected with ?ns=, with other content.
    for target in [
        format!("/v2/team/app/blobs/{}?ns=private2.example", layer.digest),
        format!("/v2/team/app/manifests/{manifest}?ns=private2.example"),
    ] {
        let (st, head, body) = raw(&a, &get(&target, "")).await;
        assert_eq!(st, 404, "{target}: {head}");
        assert!(matches!(
            tools::oci_code(&body).as_str(),
            "BLOB_UNKNOWN" | "MANIFEST_UNKNOWN"
        ));
    }
    assert_eq!(env.private2.count("HEAD", &layer.digest), 1);
    assert_eq!(env.private2.count("HEAD", manifest), 1);
    assert_eq!(env.private2.blob_gets(), 0);

    // The private registry itself is served from the cache.
    env.private.reset();
    let (st, _, body) = raw(&a, &get(&private_blob, "")).await;
    assert_eq!((st, body.as_slice()), (200, layer.bytes.as_ref()));
    assert_eq!(env.private.requests().len(), 0);

    // A public upstream that refuses berth, or cannot be reached: still
    // nothing (fail closed).
    env.public.set_fail_all(Some(403));
    let (st, head, body) = raw(&a, &get(&blob_path, "")).await;
    assert_eq!(
        (st, tools::oci_code(&body).as_str()),
        (403, "DENIED"),
        "{head}"
    );
    env.public.set_fail_all(None);
    env.public.set_refuse(true);
    let (st, head, body) = raw(&a, &get(&blob_path, "")).await;
    assert!(matches!(st, 502..=504), "{head}");
    assert!(!tools::oci_code(&body).is_empty());
    env.public.set_refuse(false);
    let (_, _, metrics) = raw(&a, &get("/metrics", "")).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let count = |registry, reason| refusals(&metrics, registry, reason);
    assert_eq!(count("public.example", "denied"), 1, "{metrics}");
    assert_eq!(count("public.example", "unavailable"), 1, "{metrics}");
    assert_eq!(count("private2.example", "not_found"), 2, "{metrics}");

    // The records survive a restart on the same cache (and the public
    // endpoint's circuit breaker, opened above, starts closed).
    berth.stop();
    let berth = env.berth(cache.path()).await;
    let a = berth.addr();
    let (blob_heads, _) = refuse_all(&env, &a, 2).await;
    assert_eq!(env.public.count("HEAD", &layer.digest), blob_heads + 2);
    assert_eq!(env.public.blob_gets(), 0);
    let (st, _, body) = raw(&a, &get(&private_blob, "")).await;
    assert_eq!((st, body.as_slice()), (200, layer.bytes.as_ref()));
    assert_eq!(
        env.private.requests().len(),
        0,
        "still served from the cache"
    );

    // The public origin gets the same image: now the public registry proves
    // it has the content with one HEAD each, and the bytes come from the
    // cache (no blob or manifest GET upstream).
    content::push_image(&env.public_origin.url(), "team/app", "1", &env.image)
        .await
        .unwrap();
    env.public.reset();
    let (st, head, body) = raw(&a, &get(&blob_path, "")).await;
    assert_eq!(st, 200, "{head}");
    assert_eq!(body, layer.bytes.as_ref());
    let (st, head, body) = raw(&a, &get(&manifest_path, "")).await;
    assert_eq!(st, 200, "{head}");
    assert_eq!(body, env.image.manifest_bytes.as_ref());
    assert_eq!(env.public.count("HEAD", &layer.digest), 1);
    assert_eq!(env.public.count("HEAD", manifest), 1);
    assert_eq!((env.public.blob_gets(), env.public.manifest_gets()), (0, 0));
    // Evidently public: the records are gone, and nobody needs a proof now.
    for d in [&layer.digest, manifest] {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert!(!cache.path().join("private/sha256").join(hex).exists());
    }
    env.public.reset();
    let (st, _, _) = raw(&a, &get(&blob_path, "")).await;
    assert_eq!(st, 200);
    assert_eq!(env.public.requests().len(), 0);
}

/// While a private registry's download of a large blob is in flight, a
/// request for the digest through the public registry does not join it
/// (its origin lacks the blob); once the public origin has it, the request
/// joins the same download (no second one) and gets the exact bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_download_in_flight_is_not_joined_without_upstream_proof() {
    if !tools::require("docker-registry") {
        return;
    }
    let big = content::Blob::new(
        "application/octet-stream",
        content::pseudo_random_bytes(76, 8 << 20),
    );
    let image = content::image_from_parts(
        MediaKind::Oci.manifest_type(),
        content::build_image(77, 1, 4 * 1024, MediaKind::Oci, "amd64").config,
        vec![big.clone()],
        "amd64",
        "linux",
        None,
    );
    let env = Provenance::start(image).await;
    let cache = tempfile::tempdir().unwrap();
    let berth = env.berth(cache.path()).await;
    let a = berth.addr();
    env.private.hold_blob_after(Some(1 << 20));
    let private_pull = {
        let (a, target) = (
            a.clone(),
            format!("/v2/team/app/blobs/{}?ns=private.example", big.digest),
        );
        tokio::spawn(async move { raw(&a, &get(&target, "")).await })
    };
    env.private.wait_blob_bytes(1 << 20, PATIENCE).await;

    let public_path = format!("/v2/public.example/team/app/blobs/{}", big.digest);
    let (st, head, body) = raw(&a, &get(&public_path, "")).await;
    assert_eq!(
        (st, tools::oci_code(&body).as_str()),
        (404, "BLOB_UNKNOWN"),
        "{head}"
    );
    assert!(body.len() < 4096, "none of the download's bytes");
    let (st, _, _) = raw(&a, &head_req(&public_path)).await;
    assert_eq!(st, 404);
    assert_eq!(env.public.count("HEAD", &big.digest), 2);
    assert!(
        !private_pull.is_finished(),
        "the private download is still held"
    );

    // The public origin gets the blob while the download is still held: the
    // public request proves it and joins the one download.
    content::RegistryClient::new(&env.public_origin.url())
        .push_blob("team/app", &big)
        .await
        .unwrap();
    let public_pull = {
        let (a, target) = (a.clone(), public_path.clone());
        tokio::spawn(async move { raw(&a, &get(&target, "")).await })
    };
    until(
        "the public request proved its registry has the blob",
        || env.public.count("HEAD", &big.digest) == 3,
    )
    .await;
    env.private.hold_blob_after(None);
    let (st, head, body) = private_pull.await.unwrap();
    assert_eq!((st, body.len()), (200, big.bytes.len()), "{head}");
    assert!(body == big.bytes.as_ref());
    let (st, head, body) = public_pull.await.unwrap();
    assert_eq!(st, 200, "{head}");
    assert!(body == big.bytes.as_ref());
    assert_eq!(env.private.blob_gets(), 1, "one download");
    assert_eq!(env.public.blob_gets(), 0);
    let hex = big.digest.strip_prefix("sha256:").unwrap();
    assert!(
        !cache.path().join("private/sha256").join(hex).exists(),
        "a public registry has it: not private"
    );
}
