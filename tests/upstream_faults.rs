//! Transient and hostile upstream faults against real distribution origins,
//! injected by the test suite's `CountingProxy` (issue #12):
//!
//! - one dropped connection (a reset or early EOF before the answer) is
//!   retried at once on a new connection and does not take the registry
//!   offline;
//! - a registry whose only endpoint was down answers the very next request
//!   once it is back (a half-open probe), and fails fast only while down;
//! - a hub that serves corrupt blobs (always, or once) in front of a good
//!   origin: clients get correct bytes from the origin, the hub is not asked
//!   for that blob again, and a real containerd pulls the image on the first
//!   try; with the verification hold off, the first transfer is aborted and
//!   the next request goes to the origin;
//! - a hub that trickles a blob below the minimum rate: the download moves
//!   to the origin instead of holding its clients.

mod common;

use std::time::{Duration, Instant};

use common::berth::Berth;
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, Image, MediaKind};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools::{self, dead_port};

const REPO: &str = "library/app";
const NAME: &str = "docker.io/library/app";

/// An origin holding `REPO:1.0` and a counting proxy in front of it.
async fn origin_with_image(seed: u64, layers: usize, layer_size: usize) -> (Origin, Image) {
    let origin = Origin::start().await;
    let image = content::build_image(seed, layers, layer_size, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), REPO, "1.0", &image)
        .await
        .unwrap();
    (origin, image)
}

/// A berth config: docker.io with `hub` as the first endpoint (if any) and
/// `origin` as the registry's own URL (the fallback).
fn config(origin: &str, hub: Option<&str>) -> tempfile::NamedTempFile {
    let mut text = format!("[registries.\"docker.io\"]\nurl = \"{origin}\"\n");
    if let Some(hub) = hub {
        text += &format!("\n[[registries.\"docker.io\".endpoints]]\nurl = \"{hub}\"\n");
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

async fn start(cfg: &tempfile::NamedTempFile, extra: &[&str]) -> Berth {
    let mut args = vec!["--config", cfg.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    Berth::start(&args).await
}

fn blob_url(berth: &Berth, digest: &str) -> String {
    format!("{}/v2/{NAME}/blobs/{digest}", berth.url())
}

/// GET a blob; the status and the body (an error if the transfer was cut).
async fn get(url: &str) -> (u16, Result<Vec<u8>, String>) {
    let resp = tools::http_client()
        .get(url)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string()),
    )
}

fn blob_gets(p: &CountingProxy, digest: &str) -> usize {
    p.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/blobs/{digest}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dropped_connection_does_not_take_the_registry_offline() {
    if !tools::require("docker-registry") {
        return;
    }
    let (origin, image) = origin_with_image(1201, 3, 64 * 1024).await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let cfg = config(&proxy.url(), None);
    let berth = start(&cfg, &[]).await;

    // The origin drops the first blob GET unanswered; the next would succeed.
    proxy.drop_next(1);
    for b in image.blobs() {
        let (status, body) = get(&blob_url(&berth, &b.digest)).await;
        assert_eq!(status, 200, "{}: {body:?}\n{}", b.digest, berth.log());
        assert_eq!(content::digest_of(&body.unwrap()), b.digest);
    }
    assert_eq!(proxy.refused_connections(), 1, "one request was dropped");
    assert!(
        !berth.log().contains("backing off"),
        "one reset opened no breaker:\n{}",
        berth.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_endpoint_that_was_down_answers_the_next_request_once_back() {
    if !tools::require("docker-registry") {
        return;
    }
    let (origin, image) = origin_with_image(1202, 2, 32 * 1024).await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let cfg = config(&proxy.url(), None);
    let berth = start(&cfg, &[]).await;
    let layers: Vec<_> = image.layers.iter().collect();

    // Down: every connection is dropped. The miss fails, and fast.
    proxy.set_refuse(true);
    let started = Instant::now();
    let (status, _) = get(&blob_url(&berth, &layers[0].digest)).await;
    assert!(status >= 500, "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // While it stays down, requests still fail (one probe at a time).
    let (status, _) = get(&blob_url(&berth, &layers[0].digest)).await;
    assert!(status >= 500, "{status}");

    // Back: the very next request is let through and succeeds, although the
    // breaker's backoff (5 s at least) has not run out.
    proxy.set_refuse(false);
    let started = Instant::now();
    for l in &layers {
        let (status, body) = get(&blob_url(&berth, &l.digest)).await;
        assert_eq!(status, 200, "{body:?}\n{}", berth.log());
        assert_eq!(content::digest_of(&body.unwrap()), l.digest);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered without waiting for the backoff: {:?}",
        started.elapsed()
    );
}

/// origin <- origin proxy, origin <- hub proxy (corrupting): two endpoints
/// of docker.io, the hub first.
struct CorruptHub {
    _origin: Origin,
    image: Image,
    hub: CountingProxy,
    origin: CountingProxy,
    cfg: tempfile::NamedTempFile,
}

impl CorruptHub {
    async fn start(seed: u64, layer_size: usize) -> CorruptHub {
        let (origin, image) = origin_with_image(seed, 2, layer_size).await;
        let hub = CountingProxy::start(&origin.url()).await;
        let origin_proxy = CountingProxy::start(&origin.url()).await;
        let cfg = config(&origin_proxy.url(), Some(&hub.url()));
        CorruptHub {
            _origin: origin,
            image,
            hub,
            origin: origin_proxy,
            cfg,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_serving_corrupt_blobs_is_passed_over_for_the_origin() {
    if !tools::require("docker-registry") {
        return;
    }
    let t = CorruptHub::start(1203, 256 * 1024).await;
    let berth = start(&t.cfg, &[]).await;
    t.hub.corrupt_blob(true);
    let layer = &t.image.layers[0];
    // Three GETs in a row: each gets the correct bytes (the first was held
    // back until verified, then fetched again from the origin unseen).
    for i in 0..3 {
        let (status, body) = get(&blob_url(&berth, &layer.digest)).await;
        assert_eq!(status, 200, "GET {i}: {}", berth.log());
        let body = body.unwrap_or_else(|e| panic!("GET {i} was cut: {e}\n{}", berth.log()));
        assert_eq!(content::digest_of(&body), layer.digest, "GET {i}");
    }
    assert_eq!(
        blob_gets(&t.hub, &layer.digest),
        1,
        "the hub was asked once"
    );
    assert_eq!(
        blob_gets(&t.origin, &layer.digest),
        1,
        "the origin served it"
    );
    let metrics = tools::metrics_text(&berth.url()).await;
    assert!(
        metrics.contains("berth_digest_mismatches_total 1"),
        "{metrics}"
    );

    // With the hold off the first transfer cannot be saved: it is aborted
    // (never completed with wrong bytes), and the next one comes from the
    // origin.
    let t = CorruptHub::start(1204, 256 * 1024).await;
    let berth = start(&t.cfg, &["--verify-hold", "0s"]).await;
    t.hub.corrupt_blob(true);
    let layer = &t.image.layers[1];
    let (status, body) = get(&blob_url(&berth, &layer.digest)).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a corrupt transfer is cut, not completed");
    for i in 0..2 {
        let (status, body) = get(&blob_url(&berth, &layer.digest)).await;
        assert_eq!(status, 200, "GET {i}: {}", berth.log());
        let body = body.unwrap_or_else(|e| panic!("GET {i} was cut: {e}\n{}", berth.log()));
        assert_eq!(content::digest_of(&body), layer.digest);
    }
    assert_eq!(
        blob_gets(&t.hub, &layer.digest),
        1,
        "the hub was asked once"
    );
    assert_eq!(blob_gets(&t.origin, &layer.digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_a_corrupting_hub_on_the_first_try() {
    if !tools::require("docker-registry") || !Containerd::available() {
        return;
    }
    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    for (case, seed, always) in [("always", 1205, true), ("once", 1206, false)] {
        let t = CorruptHub::start(seed, 512 * 1024).await;
        let berth = start(&t.cfg, &[]).await;
        write_hosts_toml(
            hosts.path(),
            "docker.io",
            &berth.url(),
            &format!("http://127.0.0.1:{}", dead_port()),
        );
        if always {
            t.hub.corrupt_blob(true);
        } else {
            t.hub.corrupt_blob_next(1);
        }
        let ns = format!("corrupt-{case}");
        ctd.pull_async(&ns, "docker.io/library/app:1.0", hosts.path(), &[])
            .await
            .assert_success();
        assert_eq!(
            ctd.image_digest(&ns, "docker.io/library/app:1.0")
                .as_deref(),
            Some(t.image.manifest_digest.as_str()),
            "{case}"
        );
        let corrupted: Vec<_> = t
            .image
            .blobs()
            .filter(|b| blob_gets(&t.hub, &b.digest) > 0 && blob_gets(&t.origin, &b.digest) > 0)
            .collect();
        assert!(
            !corrupted.is_empty(),
            "{case}: some blob came from the origin after the hub's copy failed"
        );
        for b in t.image.blobs() {
            assert!(
                blob_gets(&t.hub, &b.digest) <= 1,
                "{case}: the hub was asked for {} once at most",
                b.digest
            );
        }
        drop(berth);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_hub_hands_the_download_to_the_origin() {
    if !tools::require("docker-registry") {
        return;
    }
    let t = CorruptHub::start(1207, 1 << 20).await;
    // Must deliver 256 KiB/s averaged over every 1 s window.
    let berth = start(&t.cfg, &["--read-timeout", "1s", "--min-rate", "256KiB"]).await;
    // The hub sends about 20 KB/s: a byte often enough for any read
    // timeout, 50 s for the whole layer.
    t.hub.set_body_rate(Some(20_000));
    let layer = &t.image.layers[0];
    let started = Instant::now();
    let (status, body) = get(&blob_url(&berth, &layer.digest)).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    let body = body.unwrap_or_else(|e| panic!("cut: {e}\n{}", berth.log()));
    assert_eq!(content::digest_of(&body), layer.digest);
    assert!(
        took < Duration::from_secs(15),
        "moved on instead of trickling for 50 s: {took:?}"
    );
    assert_eq!(blob_gets(&t.hub, &layer.digest), 1);
    let from_origin: Vec<_> = t
        .origin
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&format!("/blobs/{}", layer.digest)))
        .collect();
    assert_eq!(from_origin.len(), 1, "{from_origin:#?}");
    assert!(
        from_origin[0].req_headers.get("range").is_some(),
        "the origin resumed where the hub stopped: {from_origin:#?}"
    );
    assert!(berth.log().contains("TooSlow"), "{}", berth.log());
}
