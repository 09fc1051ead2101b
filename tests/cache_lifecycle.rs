//! The cache over its life: the capacity bound (LRU eviction, never more on
//! disk than configured, downloads and pinned content counted), eviction of
//! a blob while it is being streamed, restarts (graceful, kill -9, smaller
//! capacity), and misses that cannot reach upstream.
//!
//! origin (docker-registry) <- CountingProxy <- berth <- reqwest clients.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::berth::{blob_path, settled, tmp_files, Berth};
use common::content::{self, Blob, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools::{self, dead_port};

const MIB: usize = 1 << 20;
/// Generous bound for anything the tests wait for.
const PATIENCE: Duration = Duration::from_secs(20);

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
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

/// Total size of the files under `dir` (files vanishing meanwhile count 0).
fn du(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// An origin behind a counting proxy, without berth (tests start it).
struct Upstream {
    _origin: Origin,
    origin_url: String,
    proxy: CountingProxy,
}

async fn upstream() -> Option<Upstream> {
    if !tools::require("docker-registry") {
        return None;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    Some(Upstream {
        origin_url: origin.url(),
        _origin: origin,
        proxy,
    })
}

impl Upstream {
    fn arg(&self) -> String {
        format!("docker.io={}", self.proxy.url())
    }

    /// Push `len` incompressible bytes as a blob of `repo`.
    async fn push_blob(&self, repo: &str, seed: u64, len: usize) -> Blob {
        let blob = Blob::new(
            content::OCI_LAYER_GZIP,
            content::pseudo_random_bytes(seed, len),
        );
        RegistryClient::new(&self.origin_url)
            .push_blob(repo, &blob)
            .await
            .expect("push blob to origin");
        blob
    }
}

fn blob_url(berth: &Berth, repo: &str, digest: &str) -> String {
    format!("{}/v2/{repo}/blobs/{digest}", berth.url())
}

/// GET a whole blob through berth and check its bytes.
async fn pull(http: &reqwest::Client, berth: &Berth, repo: &str, blob: &Blob) {
    let resp = http
        .get(blob_url(berth, repo, &blob.digest))
        .send()
        .await
        .expect("GET blob");
    assert_eq!(resp.status(), 200, "{}", blob.digest);
    let body = resp.bytes().await.expect("blob body");
    assert_eq!(content::digest_of(&body), blob.digest, "exact bytes");
    assert!(settled(berth.cache_dir()).await, "download settled");
}

/// Sets the flag when dropped (also when a test panics), so that a sampling
/// thread always stops.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_never_exceeded_and_lru_is_evicted() {
    let Some(up) = upstream().await else { return };
    const CAPACITY: u64 = 8 * MIB as u64;
    let berth = Berth::start(&["--upstream", &up.arg(), "--cache-capacity", "8MiB"]).await;
    let http = tools::http_client();
    let mut blobs = Vec::new();
    for i in 0..10u64 {
        blobs.push(up.push_blob("library/lru", 100 + i, MIB).await);
    }
    up.proxy.reset();

    // Sample the size of blobs/ all along, not only between pulls.
    let blobs_dir = berth.cache_dir().join("blobs");
    let peak = Arc::new(AtomicU64::new(0));
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sampler = {
        let (stop, peak, dir) = (stop.0.clone(), peak.clone(), blobs_dir.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(du(&dir), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let tmp_dir = berth.cache_dir().join("tmp");
    for (i, b) in blobs.iter().enumerate() {
        if i == 8 {
            // The cache is full. A download in progress holds its size up
            // front: the least recently used blob goes before it finishes,
            // so published + partial never exceed the capacity.
            up.proxy.hold_blob_after(Some(MIB as u64 / 2));
            let url = blob_url(&berth, "library/lru", &b.digest);
            let resp = http.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            up.proxy.wait_blob_bytes(MIB as u64 / 2, PATIENCE).await;
            until("the partial download is on disk", || du(&tmp_dir) > 0).await;
            assert!(
                !blob_path(berth.cache_dir(), &blobs[0].digest).exists(),
                "room was made for the download before it finished"
            );
            let total = du(&blobs_dir) + du(&tmp_dir);
            assert!(total <= CAPACITY, "{total} bytes in the cache > {CAPACITY}");
            up.proxy.hold_blob_after(None);
            let body = resp.bytes().await.unwrap();
            assert_eq!(content::digest_of(&body), b.digest);
        } else {
            pull(&http, &berth, "library/lru", b).await;
        }
        let now = du(&blobs_dir);
        assert!(now <= CAPACITY, "{now} bytes on disk > capacity {CAPACITY}");
    }
    drop(stop);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    // Weights are rounded up to KiB; 1 MiB blobs round exactly.
    assert!(
        peak <= CAPACITY + 16 * 1024,
        "peak {peak} > capacity {CAPACITY}"
    );
    assert_eq!(up.proxy.blob_gets(), 10);

    // Least recently used first: the two oldest are gone, the rest are there.
    let on_disk = |b: &Blob| blob_path(berth.cache_dir(), &b.digest).is_file();
    let present: Vec<bool> = blobs.iter().map(on_disk).collect();
    assert_eq!(
        present,
        [false, false, true, true, true, true, true, true, true, true],
        "blobs 0 and 1 evicted"
    );

    // The most recent (and any other survivor) is a hit: no upstream request.
    up.proxy.reset();
    pull(&http, &berth, "library/lru", &blobs[9]).await;
    pull(&http, &berth, "library/lru", &blobs[2]).await;
    assert_eq!(up.proxy.requests().len(), 0, "hits");

    // An evicted one is fetched again, and pushes out the now least recent
    // (3: 2 and 9 were just used).
    pull(&http, &berth, "library/lru", &blobs[0]).await;
    assert_eq!(up.proxy.blob_gets(), 1, "evicted blob refetched");
    let present: Vec<bool> = blobs.iter().map(on_disk).collect();
    assert_eq!(
        present,
        [true, false, true, false, true, true, true, true, true, true],
        "recency follows use"
    );
    assert!(du(&blobs_dir) <= CAPACITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_content_counts_against_capacity_and_evicts_only_what_must_go() {
    let Some(up) = upstream().await else { return };
    const CAPACITY: u64 = 8 * MIB as u64;
    let berth = Berth::start(&[
        "--upstream",
        &up.arg(),
        "--cache-capacity",
        "8MiB",
        "--pin",
        "library/pinned:*",
    ])
    .await;
    let http = tools::http_client();
    let layers: Vec<Blob> = (0..3u64)
        .map(|i| {
            Blob::new(
                content::OCI_LAYER_GZIP,
                content::pseudo_random_bytes(700 + i, MIB),
            )
        })
        .collect();
    let config = Blob::new(content::OCI_CONFIG, br#"{"os":"linux"}"#.to_vec());
    let image = content::image_from_parts(
        content::OCI_MANIFEST,
        config,
        layers,
        "amd64",
        "linux",
        None,
    );
    content::push_image(&up.origin_url, "library/pinned", "1", &image)
        .await
        .unwrap();
    let mut free = Vec::new();
    for i in 0..4u64 {
        free.push(up.push_blob("library/free", 710 + i, MIB).await);
    }
    let on_disk = |b: &Blob| blob_path(berth.cache_dir(), &b.digest).is_file();

    // The pinned tag is resolved first, then 4 MiB of unpinned content,
    // then the pinned blobs: 3 MiB pinned + 4 MiB unpinned fit in 8 MiB,
    // so nothing may be evicted.
    let via = RegistryClient::new(&berth.url());
    let m = via.get_manifest("library/pinned", "1").await.unwrap();
    assert_eq!(m.bytes, image.manifest_bytes);
    for b in &free {
        pull(&http, &berth, "library/free", b).await;
    }
    for b in image.blobs() {
        pull(&http, &berth, "library/pinned", b).await;
    }
    let present: Vec<bool> = free.iter().map(on_disk).collect();
    assert_eq!(present, [true; 4], "room enough: nothing evicted");
    assert!(du(&berth.cache_dir().join("blobs")) <= CAPACITY);

    // Use every unpinned blob, then make room for ~2 MiB more: the least
    // recently used unpinned blob goes, the pinned bytes stay counted.
    up.proxy.reset();
    for b in &free {
        pull(&http, &berth, "library/free", b).await;
    }
    assert_eq!(up.proxy.requests().len(), 0);
    // (2 MiB less 8 KiB: the pinned manifest and config take 2 KiB, so one
    // 1 MiB eviction is exactly enough.)
    let extra = up.push_blob("library/free", 720, 2 * MIB - 8 * 1024).await;
    pull(&http, &berth, "library/free", &extra).await;
    let used = du(&berth.cache_dir().join("blobs"));
    assert!(
        used <= CAPACITY,
        "{used} bytes on disk > capacity {CAPACITY}"
    );
    for b in image.blobs() {
        assert!(on_disk(b), "pinned {} kept", b.digest);
    }
    let present: Vec<bool> = free.iter().map(on_disk).collect();
    assert_eq!(present, [false, true, true, true], "only the LRU one went");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_evicted_while_streaming_reach_slow_clients_intact() {
    let Some(up) = upstream().await else { return };
    let berth = Berth::start(&["--upstream", &up.arg(), "--cache-capacity", "16MiB"]).await;
    let http = tools::http_client();
    let repo = "library/evict";
    let big_hit = up.push_blob(repo, 200, 12 * MIB).await;
    let big_flight = up.push_blob(repo, 201, 12 * MIB).await;
    let mut fillers = Vec::new();
    for i in 0..6u64 {
        fillers.push(up.push_blob(repo, 210 + i, 4 * MIB).await);
    }
    let mut fillers = fillers.iter();
    let cache = berth.cache_dir().to_path_buf();

    // 1. A cache hit (a mapping of the published file) to a slow client.
    pull(&http, &berth, repo, &big_hit).await;
    let mut slow = http
        .get(blob_url(&berth, repo, &big_hit.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let head = slow.chunk().await.unwrap().expect("first chunk");
    while blob_path(&cache, &big_hit.digest).exists() {
        let f = fillers
            .next()
            .expect("enough fillers to evict the big blob");
        pull(&http, &berth, repo, f).await;
    }
    let mut body = head.to_vec();
    while let Some(c) = slow.chunk().await.expect("slow client body") {
        body.extend_from_slice(&c);
    }
    assert_eq!(body.len(), big_hit.bytes.len());
    assert_eq!(
        content::digest_of(&body),
        big_hit.digest,
        "evicted mid-stream, delivered intact"
    );

    // 2. A download in progress to a slow client: it finishes, is published,
    //    is evicted, and the client (still reading the download's file) gets
    //    every byte.
    up.proxy.hold_blob_after(Some(MIB as u64));
    let mut slow = http
        .get(blob_url(&berth, repo, &big_flight.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let head = slow.chunk().await.unwrap().expect("first chunk");
    up.proxy.hold_blob_after(None);
    until("the downloaded blob is published", || {
        blob_path(&cache, &big_flight.digest).is_file()
    })
    .await;
    while blob_path(&cache, &big_flight.digest).exists() {
        let f = fillers
            .next()
            .expect("enough fillers to evict the big blob");
        pull(&http, &berth, repo, f).await;
    }
    let mut body = head.to_vec();
    while let Some(c) = slow.chunk().await.expect("slow client body") {
        body.extend_from_slice(&c);
    }
    assert_eq!(
        content::digest_of(&body),
        big_flight.digest,
        "evicted mid-stream, delivered intact"
    );
    assert!(du(&cache.join("blobs")) <= 16 * MIB as u64);
    // Neither big blob was fetched twice.
    let gets = |d: &str| up.proxy.count("GET", d);
    assert_eq!((gets(&big_hit.digest), gets(&big_flight.digest)), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_cache_without_upstream() {
    let Some(up) = upstream().await else { return };
    let dir = tempfile::Builder::new()
        .prefix("berth-restart-")
        .tempdir()
        .unwrap();
    let arg = up.arg();
    let args = ["--upstream", arg.as_str(), "--tag-ttl", "10m"];
    let berth = Berth::start_with_dir(dir.path(), &args).await;
    let image = content::build_image(300, 2, 256 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&up.origin_url, "library/keep", "1.0", &image)
        .await
        .unwrap();
    let via = RegistryClient::new(&berth.url());
    let m = via.get_manifest("library/keep", "1.0").await.unwrap();
    assert_eq!(m.bytes, image.manifest_bytes);
    for b in image.blobs() {
        let got = via.get_blob("library/keep", &b.digest).await.unwrap();
        assert_eq!(content::digest_of(&got), b.digest);
    }
    let status = berth.stop().expect("berth exited");
    assert!(status.success(), "graceful stop: {status}");

    let berth = Berth::start_with_dir(dir.path(), &args).await;
    assert!(tmp_files(dir.path()).is_empty(), "tmp/ empty after start");
    up.proxy.reset();
    let via = RegistryClient::new(&berth.url());
    let by_tag = via.get_manifest("library/keep", "1.0").await.unwrap();
    assert_eq!(by_tag.status, 200);
    assert_eq!(by_tag.bytes, image.manifest_bytes);
    assert_eq!(
        by_tag.docker_content_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(by_tag.content_type.as_deref(), Some(content::OCI_MANIFEST));
    let by_digest = via
        .get_manifest("library/keep", &image.manifest_digest)
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, image.manifest_bytes);
    assert_eq!(
        by_digest.content_type.as_deref(),
        Some(content::OCI_MANIFEST)
    );
    for b in image.blobs() {
        let got = via.get_blob("library/keep", &b.digest).await.unwrap();
        assert_eq!(content::digest_of(&got), b.digest);
    }
    assert_eq!(
        up.proxy.requests().len(),
        0,
        "everything from the cache: {:?}",
        up.proxy.requests()
    );
    drop(berth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_smaller_capacity_keeps_the_most_recent() {
    let Some(up) = upstream().await else { return };
    let dir = tempfile::Builder::new()
        .prefix("berth-shrink-")
        .tempdir()
        .unwrap();
    let arg = up.arg();
    let berth = Berth::start_with_dir(
        dir.path(),
        &["--upstream", arg.as_str(), "--cache-capacity", "8MiB"],
    )
    .await;
    let http = tools::http_client();
    let mut blobs = Vec::new();
    for i in 0..6u64 {
        let b = up.push_blob("library/shrink", 600 + i, MIB).await;
        pull(&http, &berth, "library/shrink", &b).await;
        blobs.push(b);
    }
    berth.stop();

    // Recency survives the restart (file mtimes): the oldest two go.
    let berth = Berth::start_with_dir(
        dir.path(),
        &["--upstream", arg.as_str(), "--cache-capacity", "4MiB"],
    )
    .await;
    until("the index fits the new capacity", || {
        du(&dir.path().join("blobs")) <= 4 * MIB as u64
    })
    .await;
    let present: Vec<bool> = blobs
        .iter()
        .map(|b| blob_path(dir.path(), &b.digest).is_file())
        .collect();
    assert_eq!(present, [false, false, true, true, true, true]);
    up.proxy.reset();
    for b in &blobs[2..] {
        pull(&http, &berth, "library/shrink", b).await;
    }
    assert_eq!(up.proxy.requests().len(), 0, "the kept blobs are hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_a_download_leaves_nothing_half_done() {
    let Some(up) = upstream().await else { return };
    let dir = tempfile::Builder::new()
        .prefix("berth-crash-")
        .tempdir()
        .unwrap();
    let arg = up.arg();
    let args = ["--upstream", arg.as_str()];
    let mut berth = Berth::start_with_dir(dir.path(), &args).await;
    let blob = up.push_blob("library/crash", 400, 6 * MIB).await;
    up.proxy.reset();

    let held = 2 * MIB as u64;
    up.proxy.hold_blob_after(Some(held));
    let http = tools::http_client();
    let mut resp = http
        .get(blob_url(&berth, "library/crash", &blob.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.chunk().await.unwrap();
    up.proxy.wait_blob_bytes(held, PATIENCE).await;
    until("the partial download is on disk", || {
        du(&dir.path().join("tmp")) > 0
    })
    .await;
    berth.kill9();
    assert!(resp.bytes().await.is_err(), "the client saw the crash");
    assert!(
        !tmp_files(dir.path()).is_empty(),
        "a partial file was left behind"
    );
    assert!(!blob_path(dir.path(), &blob.digest).exists());
    drop(berth);

    let berth = Berth::start_with_dir(dir.path(), &args).await;
    assert!(
        tmp_files(dir.path()).is_empty(),
        "leftovers removed at start: {:?}",
        tmp_files(dir.path())
    );
    assert!(!blob_path(dir.path(), &blob.digest).exists());
    up.proxy.hold_blob_after(None);
    up.proxy.reset();
    pull(&http, &berth, "library/crash", &blob).await;
    assert_eq!(up.proxy.blob_gets(), 1, "fetched again, not served half");
    assert!(blob_path(dir.path(), &blob.digest).is_file());
}

fn assert_envelope(body: &Bytes, code: &str) {
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    assert_eq!(v["errors"][0]["code"], code, "{v}");
    assert!(v["errors"][0]["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_fails_a_miss_fast() {
    let upstream = format!("docker.io=http://127.0.0.1:{}", dead_port());
    let berth = Berth::start(&["--upstream", &upstream]).await;
    let http = tools::http_client();
    let digest = content::digest_of(b"never cached");
    let urls = [
        format!("{}/v2/library/gone/manifests/latest", berth.url()),
        format!("{}/v2/library/gone/manifests/{digest}", berth.url()),
        format!("{}/v2/library/gone/blobs/{digest}", berth.url()),
    ];
    for url in &urls {
        let started = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(10), http.get(url).send())
            .await
            .unwrap_or_else(|_| panic!("{url} hung"))
            .unwrap();
        let status = resp.status().as_u16();
        let ct = header(&resp, "content-type");
        let body = resp.bytes().await.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{url} took {took:?}");
        assert_eq!(status, 502, "{url}: {}", String::from_utf8_lossy(&body));
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_envelope(&body, "UNKNOWN");
    }
    let started = Instant::now();
    let head = http.head(&urls[2]).send().await.unwrap();
    assert_eq!(head.status(), 502);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(tmp_files(berth.cache_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_not_found_is_blob_unknown() {
    let Some(up) = upstream().await else { return };
    let berth = Berth::start(&["--upstream", &up.arg()]).await;
    let http = tools::http_client();
    // The repository exists upstream; the blob does not.
    let known = up.push_blob("library/present", 500, 1024).await;
    let missing = content::digest_of(b"not in the origin");
    up.proxy.reset();
    let resp = http
        .get(blob_url(&berth, "library/present", &missing))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_envelope(&resp.bytes().await.unwrap(), "BLOB_UNKNOWN");
    assert_eq!(up.proxy.blob_gets(), 1);
    let head = http
        .head(blob_url(&berth, "library/present", &missing))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 404);
    let resp = http
        .get(format!("{}/v2/library/present/manifests/nope", berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_envelope(&resp.bytes().await.unwrap(), "MANIFEST_UNKNOWN");
    until("no temporary file is left", || {
        tmp_files(berth.cache_dir()).is_empty()
    })
    .await;
    assert!(!blob_path(berth.cache_dir(), &missing).exists());
    // A 404 is not remembered as an error: the blob that exists still pulls.
    pull(&http, &berth, "library/present", &known).await;
}
