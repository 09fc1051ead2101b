//! The hot path: one upstream GET however many clients miss the same blob at
//! once, every client streamed the exact bytes while the download runs
//! (Range included), a leader that goes away, a broken upstream body
//! resumed with `Range`, corrupted upstream bytes never delivered as a
//! complete blob nor published, and Range on cached blobs.
//!
//! origin (docker-registry) <- CountingProxy <- berth <- reqwest clients.
//! "Download still in progress" is made deterministic with the proxy's
//! `hold_blob_after` knob (the upstream body stalls at a byte count until
//! released), never with sleeps.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::berth::{blob_path, settled, Berth};
use common::content::{self, Blob, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::{CountingProxy, Record};
use common::tools;
use tokio::sync::Barrier;

const MIB: usize = 1 << 20;
/// Generous bound for anything the tests wait for.
const PATIENCE: Duration = Duration::from_secs(20);

struct Env {
    _origin: Origin,
    origin_url: String,
    proxy: CountingProxy,
    berth: Berth,
    http: reqwest::Client,
}

/// origin <- counting proxy <- berth (docker.io mirrors the proxy).
async fn setup() -> Option<Env> {
    if !tools::require("docker-registry") {
        return None;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let upstream = format!("docker.io={}", proxy.url());
    let berth = Berth::start(&["--upstream", &upstream, "--cache-capacity", "256MiB"]).await;
    Some(Env {
        origin_url: origin.url(),
        _origin: origin,
        proxy,
        berth,
        http: tools::http_client(),
    })
}

impl Env {
    /// Push an image whose single layer is `len` incompressible bytes;
    /// returns that layer. The proxy's records are cleared afterwards.
    async fn push_layer(&self, repo: &str, seed: u64, len: usize) -> Blob {
        let layer = Blob::new(
            content::OCI_LAYER_GZIP,
            content::pseudo_random_bytes(seed, len),
        );
        let config = Blob::new(
            content::OCI_CONFIG,
            format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes(),
        );
        let image = content::image_from_parts(
            MediaKind::Oci.manifest_type(),
            config,
            vec![layer.clone()],
            "amd64",
            "linux",
            None,
        );
        RegistryClient::new(&self.origin_url)
            .push_image(repo, "latest", &image)
            .await
            .expect("push image to origin");
        self.proxy.reset();
        layer
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.berth.url())
    }

    async fn get(&self, url: &str, range: Option<&str>) -> reqwest::Response {
        let mut rb = self.http.get(url);
        if let Some(r) = range {
            rb = rb.header(reqwest::header::RANGE, r);
        }
        rb.send().await.expect("request to berth")
    }

    /// Where berth publishes a blob.
    fn cached_path(&self, digest: &str) -> std::path::PathBuf {
        blob_path(self.berth.cache_dir(), digest)
    }

    /// The upstream blob GETs, oldest first.
    fn blob_records(&self) -> Vec<Record> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:"))
            .collect()
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Read at least one more non-empty chunk (panics at end of body or error).
async fn first_chunk(resp: &mut reqwest::Response) -> Bytes {
    loop {
        let c = tokio::time::timeout(PATIENCE, resp.chunk())
            .await
            .expect("a chunk within the patience bound")
            .expect("body chunk")
            .expect("body not finished yet");
        if !c.is_empty() {
            return c;
        }
    }
}

/// The rest of a body after `head` (already read).
async fn rest(mut resp: reqwest::Response, head: Bytes) -> reqwest::Result<Vec<u8>> {
    let mut out = head.to_vec();
    while let Some(c) = resp.chunk().await? {
        out.extend_from_slice(&c);
    }
    Ok(out)
}

/// Poll `cond` every 5 ms until true (panics after PATIENCE with `what`).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn tmp_files(berth: &Berth) -> Vec<String> {
    std::fs::read_dir(berth.cache_dir().join("tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_misses_make_one_upstream_get() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/storm", 1, 6 * MIB).await;
    let url = env.blob_url("library/storm", &layer.digest);
    // The upstream body stalls after 1 MiB: every client arrives while the
    // one download is in progress.
    env.proxy.hold_blob_after(Some(MIB as u64));

    const N: usize = 64;
    let barrier = Arc::new(Barrier::new(N));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (barrier, answered, http, url) = (
            barrier.clone(),
            answered.clone(),
            env.http.clone(),
            url.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let resp = http.get(&url).send().await.expect("GET blob");
            answered.fetch_add(1, Ordering::SeqCst);
            let status = resp.status().as_u16();
            let len = resp.content_length();
            let dcd = header(&resp, "docker-content-digest");
            let body = resp.bytes().await.expect("blob body");
            (status, len, dcd, body)
        }));
    }
    // All 64 have their response headers while the body is still held.
    until("all 64 clients got response headers", || {
        answered.load(Ordering::SeqCst) == N
    })
    .await;
    assert_eq!(
        env.proxy.blob_gets(),
        1,
        "one upstream GET while 64 clients wait"
    );
    assert!(!env.blob_records()[0].completed, "download still held");
    env.proxy.hold_blob_after(None);

    for t in tasks {
        let (status, len, dcd, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(len, Some(layer.size()), "Content-Length");
        assert_eq!(dcd.as_deref(), Some(layer.digest.as_str()));
        assert_eq!(body.len() as u64, layer.size());
        assert_eq!(content::digest_of(&body), layer.digest, "exact bytes");
    }
    let recs = env.blob_records();
    assert_eq!(recs.len(), 1, "exactly one upstream blob GET: {recs:?}");
    assert!(recs[0].completed);
    assert_eq!(
        recs[0].bytes,
        layer.size(),
        "the blob crossed the uplink once"
    );
    assert!(recs[0].req_headers.get("range").is_none());
    assert!(settled(env.berth.cache_dir()).await);
    assert!(env.cached_path(&layer.digest).is_file(), "published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_client_disconnecting_does_not_disturb_the_others() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/leaver", 2, 4 * MIB).await;
    let url = env.blob_url("library/leaver", &layer.digest);
    env.proxy.hold_blob_after(Some(MIB as u64));

    // The leader starts the download and reads a little.
    let mut leader = env.get(&url, None).await;
    assert_eq!(leader.status(), 200);
    let got = first_chunk(&mut leader).await;
    assert_eq!(&got[..], &layer.bytes[..got.len()]);
    assert_eq!(env.proxy.blob_gets(), 1);

    // Followers join the same download.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut followers = Vec::new();
    for _ in 0..8 {
        let (answered, http, url) = (answered.clone(), env.http.clone(), url.clone());
        followers.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.expect("GET blob");
            answered.fetch_add(1, Ordering::SeqCst);
            (resp.status().as_u16(), resp.bytes().await)
        }));
    }
    until("8 followers got response headers", || {
        answered.load(Ordering::SeqCst) == 8
    })
    .await;

    // The leader goes away mid-body, then the upstream body resumes.
    drop(leader);
    env.proxy.hold_blob_after(None);

    for f in followers {
        let (status, body) = f.await.unwrap();
        assert_eq!(status, 200);
        let body = body.expect("follower body complete");
        assert_eq!(content::digest_of(&body), layer.digest, "exact bytes");
    }
    assert_eq!(env.proxy.blob_gets(), 1, "{:?}", env.proxy.requests());

    // Published: a further GET is answered with no upstream request at all.
    env.proxy.reset();
    let again = env.get(&url, None).await;
    assert_eq!(again.status(), 200);
    let body = again.bytes().await.unwrap();
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.proxy.requests().len(), 0, "served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_client_disconnecting_still_completes_and_publishes() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/alone", 3, 3 * MIB).await;
    let url = env.blob_url("library/alone", &layer.digest);
    env.proxy.hold_blob_after(Some(MIB as u64 / 2));

    let mut only = env.get(&url, None).await;
    let _ = first_chunk(&mut only).await;
    drop(only);
    env.proxy.hold_blob_after(None);

    // The download belongs to no client: it finishes and is published.
    until("the blob is published", || {
        env.cached_path(&layer.digest).is_file()
    })
    .await;
    until("tmp/ is empty", || tmp_files(&env.berth).is_empty()).await;
    env.proxy.reset();
    let body = env.get(&url, None).await.bytes().await.unwrap();
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.proxy.requests().len(), 0, "served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_cut_mid_stream_is_resumed_with_range() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/cut", 4, 4 * MIB).await;
    let url = env.blob_url("library/cut", &layer.digest);
    // Odd offset, not on any chunk boundary.
    let cut: u64 = 1_500_001;
    env.proxy.cut_blob_after_once(cut);
    env.proxy.hold_blob_after(Some(MIB as u64));

    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (answered, http, url) = (answered.clone(), env.http.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.expect("GET blob");
            answered.fetch_add(1, Ordering::SeqCst);
            (resp.status().as_u16(), resp.bytes().await)
        }));
    }
    until("6 clients got response headers", || {
        answered.load(Ordering::SeqCst) == 6
    })
    .await;
    env.proxy.hold_blob_after(None);

    for c in clients {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, 200);
        let body = body.expect("the break is invisible to clients");
        assert_eq!(content::digest_of(&body), layer.digest, "exact bytes");
    }
    let recs = env.blob_records();
    assert_eq!(recs.len(), 2, "one GET, one resume: {recs:?}");
    assert_eq!(recs[0].bytes, cut);
    assert!(!recs[0].completed, "first body was cut");
    assert!(recs[0].req_headers.get("range").is_none());
    let range = recs[1]
        .req_headers
        .get("range")
        .and_then(|v| v.to_str().ok());
    assert_eq!(
        range,
        Some(format!("bytes={cut}-").as_str()),
        "resumed where it broke"
    );
    assert_eq!(recs[1].status, 206);
    assert!(recs[1].completed);
    assert_eq!(
        recs[1].bytes,
        layer.size() - cut,
        "only the rest is fetched"
    );
    assert!(settled(env.berth.cache_dir()).await);
    assert!(env.cached_path(&layer.digest).is_file(), "published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_keeps_breaking_fails_after_bounded_resumes() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/flaky", 9, 2 * MIB).await;
    let url = env.blob_url("library/flaky", &layer.digest);
    // Every body breaks after 256 KiB: 1 + MAX_RESUMES bodies cannot
    // deliver 2 MiB.
    let cut = 256 * 1024u64;
    env.proxy.cut_blob_after(Some(cut));

    let resp = env.get(&url, None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(layer.size()));
    if let Ok(b) = resp.bytes().await {
        panic!("complete body of {} bytes from a broken origin", b.len());
    }
    let recs = env.blob_records();
    let attempts = 1 + berth::cache::flight::MAX_RESUMES as usize;
    assert_eq!(recs.len(), attempts, "bounded resumes: {recs:?}");
    for (i, r) in recs.iter().enumerate() {
        let expected = (i > 0).then(|| format!("bytes={}-", i as u64 * cut));
        let range = r.req_headers.get("range").and_then(|v| v.to_str().ok());
        assert_eq!(range, expected.as_deref(), "attempt {i}");
    }
    until("the temporary file is removed", || {
        tmp_files(&env.berth).is_empty()
    })
    .await;
    assert!(
        !env.cached_path(&layer.digest).exists(),
        "nothing published"
    );

    // A healthy origin afterwards: a fresh download succeeds.
    env.proxy.cut_blob_after(None);
    env.proxy.reset();
    let body = env.get(&url, None).await.bytes().await.unwrap();
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.blob_records().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_upstream_bytes_are_never_delivered_whole_nor_published() {
    let Some(env) = setup().await else { return };
    let layer = env.push_layer("library/rotten", 5, 2 * MIB).await;
    let url = env.blob_url("library/rotten", &layer.digest);
    env.proxy.corrupt_blob(true);
    env.proxy.hold_blob_after(Some(MIB as u64 / 2));

    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (answered, http, url) = (answered.clone(), env.http.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.expect("GET blob");
            answered.fetch_add(1, Ordering::SeqCst);
            let (status, len) = (resp.status().as_u16(), resp.content_length());
            (status, len, resp.bytes().await)
        }));
    }
    until("4 clients got response headers", || {
        answered.load(Ordering::SeqCst) == 4
    })
    .await;
    env.proxy.hold_blob_after(None);

    for c in clients {
        let (status, len, body) = c.await.unwrap();
        match body {
            Ok(b) => panic!(
                "a client received a complete body ({} of {len:?} bytes, status {status}, digest {})",
                b.len(),
                content::digest_of(&b)
            ),
            // The body ends in an error: the connection is aborted before the
            // last byte, which berth holds back until the digest matched.
            Err(_) => assert_eq!(status, 200),
        }
    }
    assert_eq!(env.proxy.blob_gets(), 1);
    until("the temporary file is removed", || {
        tmp_files(&env.berth).is_empty()
    })
    .await;
    assert!(
        !env.cached_path(&layer.digest).exists(),
        "a corrupt blob is never published"
    );

    // Once upstream is healthy again, the next request refetches.
    env.proxy.corrupt_blob(false);
    env.proxy.reset();
    let resp = env.get(&url, None).await;
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.expect("healthy body");
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.proxy.blob_gets(), 1, "refetched");
    assert!(settled(env.berth.cache_dir()).await);
    assert!(env.cached_path(&layer.digest).is_file(), "published now");
    env.proxy.reset();
    let body = env.get(&url, None).await.bytes().await.unwrap();
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.proxy.requests().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_served_from_a_blob_still_downloading() {
    let Some(env) = setup().await else { return };
    let size = 5 * MIB as u64;
    let layer = env.push_layer("library/ranged", 6, size as usize).await;
    let url = env.blob_url("library/ranged", &layer.digest);
    let held = 2 * MIB as u64;
    env.proxy.hold_blob_after(Some(held));

    // The first client starts the download (and keeps reading).
    let leader = env.get(&url, None).await;
    assert_eq!(leader.status(), 200);
    let leader = tokio::spawn(async move { leader.bytes().await });
    env.proxy.wait_blob_bytes(held, PATIENCE).await;

    // A small range inside what is already there: answered completely
    // while the download is still held.
    let r = env.get(&url, Some("bytes=0-99")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some(format!("bytes 0-99/{size}").as_str())
    );
    assert_eq!(r.content_length(), Some(100));
    let body = r.bytes().await.unwrap();
    assert_eq!(&body[..], &layer.bytes[..100]);

    // An open-ended range from inside what is there: the first bytes come now.
    let offset = 1_000_003u64;
    let mut r = env.get(&url, Some(&format!("bytes={offset}-"))).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some(format!("bytes {offset}-{}/{size}", size - 1).as_str())
    );
    assert_eq!(r.content_length(), Some(size - offset));
    let head = first_chunk(&mut r).await;
    assert_eq!(
        &head[..],
        &layer.bytes[offset as usize..offset as usize + head.len()]
    );

    // A range beyond what has arrived: headers now, bytes once they exist.
    let tail_at = size - 1000;
    let tail = env.get(&url, Some(&format!("bytes={tail_at}-"))).await;
    assert_eq!(tail.status(), 206);
    assert_eq!(
        header(&tail, "content-range").as_deref(),
        Some(format!("bytes {tail_at}-{}/{size}", size - 1).as_str())
    );
    let mid = env.get(&url, Some("bytes=1500000-2999999")).await;
    assert_eq!(mid.status(), 206);
    assert!(
        !env.blob_records()[0].completed,
        "all of the above while the download is held"
    );

    env.proxy.hold_blob_after(None);
    let body = rest(r, head).await.unwrap();
    assert_eq!(&body[..], &layer.bytes[offset as usize..]);
    let body = tail.bytes().await.unwrap();
    assert_eq!(&body[..], &layer.bytes[tail_at as usize..]);
    let body = mid.bytes().await.unwrap();
    assert_eq!(&body[..], &layer.bytes[1_500_000..3_000_000]);
    let body = leader.await.unwrap().unwrap();
    assert_eq!(content::digest_of(&body), layer.digest);
    assert_eq!(env.proxy.blob_gets(), 1, "{:?}", env.proxy.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_stream_before_the_download_ends() {
    let Some(env) = setup().await else { return };
    let size = 4 * MIB as u64;
    let layer = env.push_layer("library/paced", 7, size as usize).await;
    let url = env.blob_url("library/paced", &layer.digest);
    // A paced upstream that also cannot finish until released.
    env.proxy.set_body_rate(Some(4 * MIB as u64));
    env.proxy.hold_blob_after(Some(size / 2));

    let mut leader = env.get(&url, None).await;
    let leader_head = first_chunk(&mut leader).await;
    let mut follower = env.get(&url, None).await;
    assert_eq!(follower.status(), 200);
    assert_eq!(follower.content_length(), Some(size));
    let follower_head = first_chunk(&mut follower).await;
    assert_eq!(
        &follower_head[..],
        &layer.bytes[..follower_head.len()],
        "a follower's first bytes"
    );
    // Both have bytes, and the one upstream download is still running.
    let recs = env.blob_records();
    assert_eq!(recs.len(), 1);
    assert!(
        !recs[0].completed && recs[0].bytes < size,
        "follower streamed before the upstream body ended: {:?}",
        recs[0]
    );

    env.proxy.set_body_rate(None);
    env.proxy.hold_blob_after(None);
    let (a, b) = tokio::join!(rest(leader, leader_head), rest(follower, follower_head));
    assert_eq!(content::digest_of(&a.unwrap()), layer.digest);
    assert_eq!(content::digest_of(&b.unwrap()), layer.digest);
    assert_eq!(env.proxy.blob_gets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_and_head_on_cached_blobs() {
    let Some(env) = setup().await else { return };
    let size: u64 = 1_234_567;
    let layer = env.push_layer("library/cached", 8, size as usize).await;
    let url = env.blob_url("library/cached", &layer.digest);
    let b = &layer.bytes;

    // A Range miss starts the whole download; it is published afterwards.
    let r = env.get(&url, Some("bytes=10-19")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        header(&r, "content-range").as_deref(),
        Some(format!("bytes 10-19/{size}").as_str())
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &b[10..20]);
    until("the ranged miss is published", || {
        env.cached_path(&layer.digest).is_file()
    })
    .await;
    assert_eq!(env.proxy.blob_gets(), 1);
    env.proxy.reset();

    let s = size;
    let cases: [(String, u64, u64); 5] = [
        ("bytes=0-99".into(), 0, 100),
        ("bytes=1000-".into(), 1000, s),
        ("bytes=-500".into(), s - 500, s),
        (format!("bytes={}-{}", s - 10, s + 100), s - 10, s),
        ("bytes=-99999999".into(), 0, s),
    ];
    for (range, start, end) in cases {
        let r = env.get(&url, Some(&range)).await;
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            header(&r, "content-range").as_deref(),
            Some(format!("bytes {start}-{}/{s}", end - 1).as_str()),
            "{range}"
        );
        assert_eq!(r.content_length(), Some(end - start), "{range}");
        assert_eq!(header(&r, "accept-ranges").as_deref(), Some("bytes"));
        let body = r.bytes().await.unwrap();
        assert_eq!(&body[..], &b[start as usize..end as usize], "{range}");
    }

    for bad in [format!("bytes={s}-"), "bytes=5-2".into(), "bytes=-0".into()] {
        let r = env.get(&url, Some(&bad)).await;
        assert_eq!(r.status(), 416, "{bad}");
        assert_eq!(
            header(&r, "content-range").as_deref(),
            Some(format!("bytes */{s}").as_str()),
            "{bad}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "RANGE_INVALID", "{bad}: {v}");
    }

    // A whole GET without Range.
    let r = env.get(&url, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.content_length(), Some(s));
    assert_eq!(content::digest_of(&r.bytes().await.unwrap()), layer.digest);

    let h = env.http.head(&url).send().await.unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(
        header(&h, "content-length").as_deref(),
        Some(s.to_string().as_str())
    );
    assert_eq!(
        header(&h, "docker-content-digest").as_deref(),
        Some(layer.digest.as_str())
    );
    assert!(h.bytes().await.unwrap().is_empty());

    assert_eq!(
        env.proxy.requests().len(),
        0,
        "cached: nothing goes upstream"
    );
}
