//! Crash safety: berth is killed with SIGKILL at random moments while 50+
//! distinct blobs (1-4 MiB, paced by the upstream proxy so that they are
//! all in flight at once) and a few tagged manifests are being ingested,
//! several rounds on the same cache directory. After every crash:
//! `berth verify` finds zero corrupt entries, every published blob hashes
//! to its name (re-hashed here too), every tag record parses, and a restart
//! leaves no temporary file. At the end every blob is served with the exact
//! bytes, fetched again from upstream exactly when it had been lost.
//!
//! The kill moments come from a seeded generator (printed, and
//! reproducible with `BERTH_CRASH_SEED=<n>`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::berth::{tmp_files, Berth, BERTH_BIN};
use common::content::{self, Blob, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools;

const MIB: usize = 1 << 20;
const BLOBS: usize = 56;
const TAGS: usize = 4;
const ROUNDS: usize = 4;
/// Upstream pace per blob body, drawn per round from this range (bytes/s):
/// the slowest round keeps every download in flight for seconds, the
/// fastest publishes some while others are still streaming.
const RATES: (u64, u64) = (MIB as u64 / 2, 4 * MIB as u64);
const PATIENCE: Duration = Duration::from_secs(60);

/// splitmix64: the test's only source of randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every published blob hashes to its name; returns their digests.
fn published_and_intact(cache: &Path) -> Vec<String> {
    let mut digests = Vec::new();
    for p in files_in(&cache.join("blobs/sha256")) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let shard = p
            .parent()
            .and_then(|d| d.file_name())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(shard, name[..2], "{} is in the wrong shard", p.display());
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            content::digest_of(&bytes),
            format!("sha256:{name}"),
            "{} does not hash to its name ({} bytes)",
            p.display(),
            bytes.len()
        );
        digests.push(format!("sha256:{name}"));
    }
    digests
}

/// Every tag record is complete JSON naming a digest.
fn tag_records_intact(cache: &Path) -> usize {
    let records = files_in(&cache.join("tags"));
    for p in &records {
        let bytes = std::fs::read(p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "torn tag record {} ({e}): {:?}",
                p.display(),
                String::from_utf8_lossy(&bytes)
            )
        });
        let d = v["digest"].as_str().unwrap_or_default();
        assert!(
            d.starts_with("sha256:") && d.len() == 71,
            "{}: {v}",
            p.display()
        );
    }
    records.len()
}

/// `berth verify --cache-dir DIR`: (exit success, stdout).
fn berth_verify(cache: &Path) -> (bool, String) {
    let out = Command::new(BERTH_BIN)
        .arg("verify")
        .arg("--cache-dir")
        .arg(cache)
        .env_remove("BERTH_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run berth verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_ingests_never_leaves_corrupt_or_partial_content() {
    if !tools::require("docker-registry") {
        return;
    }
    let seed = std::env::var("BERTH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash test seed: BERTH_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let origin = Origin::start().await;
    let push = RegistryClient::new(&origin.url());
    let mut blobs = Vec::new();
    for i in 0..BLOBS {
        let len = rng.between(MIB as u64, 4 * MIB as u64) as usize;
        let b = Blob::new(
            content::OCI_LAYER_GZIP,
            content::pseudo_random_bytes(seed ^ (i as u64 * 7919), len),
        );
        push.push_blob("library/crash", &b).await.unwrap();
        blobs.push(b);
    }
    let mut images = Vec::new();
    for t in 0..TAGS {
        let img = content::build_image(
            seed ^ (1000 + t as u64),
            1,
            8 * 1024,
            MediaKind::Oci,
            "amd64",
        );
        push.push_image("library/tagged", &format!("t{t}"), &img)
            .await
            .unwrap();
        images.push(img);
    }
    let proxy = CountingProxy::start(&origin.url()).await;
    let up = format!("docker.io={}", proxy.url());
    let args = ["--upstream", up.as_str(), "--cache-capacity", "1GiB"];
    let dir = tempfile::Builder::new()
        .prefix("berth-crash-")
        .tempdir()
        .unwrap();
    let cache = dir.path();

    let mut interrupted = 0;
    for round in 0..ROUNDS {
        let mut berth = Berth::start_with_dir(cache, &args).await;
        assert_eq!(
            tmp_files(cache).len(),
            0,
            "round {round}: a restart leaves no temporary file"
        );
        let rate = rng.between(RATES.0, RATES.1);
        proxy.set_body_rate(Some(rate));
        let http = tools::http_client();
        let base = berth.url();
        let mut clients = Vec::new();
        for b in &blobs {
            let url = format!("{base}/v2/library/crash/blobs/{}?ns=docker.io", b.digest);
            let http = http.clone();
            clients.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(PATIENCE, async {
                    http.get(&url).send().await?.bytes().await
                })
                .await;
            }));
        }
        for t in 0..TAGS {
            let url = format!("{base}/v2/library/tagged/manifests/t{t}?ns=docker.io");
            let http = http.clone();
            clients.push(tokio::spawn(async move {
                let _ = http
                    .get(&url)
                    .header("Accept", content::ACCEPT_ALL_MANIFESTS)
                    .send()
                    .await;
            }));
        }
        // Kill while the largest blob still missing from the cache is on
        // its way (blobs finished in earlier rounds are hits now), so every
        // round with something left to fetch interrupts a download.
        let cached = published_and_intact(cache);
        let largest_missing = blobs
            .iter()
            .filter(|b| !cached.iter().any(|d| b.digest.ends_with(d.as_str())))
            .map(|b| b.bytes.len() as u64)
            .max()
            .unwrap_or(0);
        let longest_ms = largest_missing * 1000 / rate;
        let wait = Duration::from_millis(rng.between(150, (longest_ms * 8 / 10).max(151)));
        tokio::time::sleep(wait).await;
        let in_flight = proxy
            .requests()
            .iter()
            .filter(|r| r.path.contains("/blobs/") && r.method == "GET" && !r.completed)
            .count();
        berth.kill9();
        let leftovers = tmp_files(cache).len();
        interrupted += leftovers;
        eprintln!(
            "round {round}: {} KiB/s per download, SIGKILL after {wait:?} with {in_flight} upstream blob GETs in flight; {leftovers} temporary file(s) left",
            rate / 1024
        );
        for c in clients {
            let _ = tokio::time::timeout(PATIENCE, c).await;
        }
        drop(berth);

        let (ok, report) = berth_verify(cache);
        assert!(ok, "round {round}: berth verify failed:\n{report}");
        assert!(
            report.contains(": 0 bad"),
            "round {round}: berth verify found corrupt entries:\n{report}"
        );
        assert!(
            !cache.join("quarantine").exists() || files_in(&cache.join("quarantine")).is_empty(),
            "round {round}: something was quarantined:\n{report}"
        );
        let intact = published_and_intact(cache);
        let tags = tag_records_intact(cache);
        eprintln!(
            "round {round}: {} blob(s) published and intact, {tags} tag record(s); verify: {}",
            intact.len(),
            report.lines().last().unwrap_or_default()
        );
        proxy.set_body_rate(None);
        proxy.reset();
    }
    assert!(
        interrupted > 0,
        "no round caught a download in progress: the test did not test a crash"
    );

    // Restart for good: no leftovers, and everything is served exactly,
    // from the cache or fetched again.
    let berth = Berth::start_with_dir(cache, &args).await;
    assert_eq!(tmp_files(cache).len(), 0);
    let cached: Vec<String> = published_and_intact(cache);
    let missing = blobs.iter().filter(|b| !cached.contains(&b.digest)).count();
    proxy.reset();
    let via = RegistryClient::new(&berth.url());
    let t = Instant::now();
    let mut fetches = Vec::new();
    for b in &blobs {
        let (via, digest) = (via.clone(), b.digest.clone());
        fetches.push(tokio::spawn(async move {
            via.get_blob("docker.io/library/crash", &digest).await
        }));
    }
    for (b, f) in blobs.iter().zip(fetches) {
        let got: Bytes = f.await.unwrap().unwrap();
        assert_eq!(got.len(), b.bytes.len());
        assert!(
            got == b.bytes,
            "{}: wrong bytes after the crashes",
            b.digest
        );
    }
    for (t, img) in images.iter().enumerate() {
        let m = via
            .get_manifest("docker.io/library/tagged", &format!("t{t}"))
            .await
            .unwrap();
        assert_eq!(m.status, 200);
        assert_eq!(m.bytes, img.manifest_bytes);
    }
    eprintln!(
        "after {ROUNDS} crashes: {} of {BLOBS} blobs were cached, {missing} fetched again in {:?}",
        BLOBS - missing,
        t.elapsed()
    );
    assert_eq!(
        proxy.blob_gets(),
        missing,
        "exactly the lost blobs are fetched again: {:?}",
        proxy.requests()
    );
    // A client's last byte comes before the fsync and rename: wait for them.
    let published = published_within(cache, blobs.len(), PATIENCE).await;
    for b in &blobs {
        assert!(published.contains(&b.digest), "{} published", b.digest);
    }
}

/// The published blobs once there are `n` of them (or `patience` is over).
async fn published_within(cache: &Path, n: usize, patience: Duration) -> Vec<String> {
    let t = Instant::now();
    loop {
        let intact = published_and_intact(cache);
        if intact.len() >= n || t.elapsed() > patience {
            return intact;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client's last byte does not wait for the fsync and the rename (the
/// sha256 proves the bytes; the fsync only decides whether the cache keeps
/// them). Killed after a client received a whole, verified blob and before
/// the rename (held there by a test-build fault point), berth leaves no
/// published entry and, after a restart, no temporary file; the blob is
/// then fetched again and published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_the_last_byte_and_the_rename_publishes_nothing() {
    if !tools::require("docker-registry") {
        return;
    }
    let origin = Origin::start().await;
    let blob = Blob::new(
        content::OCI_LAYER_GZIP,
        content::pseudo_random_bytes(0x5eed, 6 * MIB),
    );
    RegistryClient::new(&origin.url())
        .push_blob("library/crash", &blob)
        .await
        .unwrap();
    let proxy = CountingProxy::start(&origin.url()).await;
    let up = format!("docker.io={}", proxy.url());
    let args = ["--upstream", up.as_str()];
    let dir = tempfile::Builder::new()
        .prefix("berth-crash-")
        .tempdir()
        .unwrap();
    let cache = dir.path();
    let pause = [("BERTH_FAULT_PAUSE_BEFORE_PUBLISH_MS", "600000")];
    let mut berth = Berth::try_start_with_env(cache, &args, &pause)
        .await
        .unwrap();
    let via = RegistryClient::new(&berth.url());
    let got = tokio::time::timeout(
        PATIENCE,
        via.get_blob("docker.io/library/crash", &blob.digest),
    )
    .await
    .expect("the client gets its last byte while the rename is held")
    .unwrap();
    assert!(got == blob.bytes, "the client got the exact bytes");
    assert!(
        published_and_intact(cache).is_empty(),
        "nothing is published before the rename"
    );
    assert_eq!(tmp_files(cache).len(), 1, "the download is still in tmp/");
    berth.kill9();
    drop(berth);

    let (ok, report) = berth_verify(cache);
    assert!(ok && report.contains(": 0 bad"), "berth verify:\n{report}");
    let berth = Berth::start_with_dir(cache, &args).await;
    assert_eq!(
        tmp_files(cache).len(),
        0,
        "a restart leaves no temporary file"
    );
    assert!(published_and_intact(cache).is_empty());
    let via = RegistryClient::new(&berth.url());
    let again: Bytes = via
        .get_blob("docker.io/library/crash", &blob.digest)
        .await
        .unwrap();
    assert!(again == blob.bytes);
    assert_eq!(
        proxy.blob_gets(),
        2,
        "fetched again: {:?}",
        proxy.requests()
    );
    let published = published_within(cache, 1, PATIENCE).await;
    assert_eq!(published, vec![blob.digest.clone()]);
}
