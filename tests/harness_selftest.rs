//! Proves the integration-test harness works on its own (no berth needed):
//! origin registry, real content, counting proxy, skopeo.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::content::{
    self, build_image, digest_of, push_helm_chart, push_image, push_index, Image, MediaKind,
    RegistryClient, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, HELM_CHART_LAYER, HELM_CONFIG,
    OCI_INDEX, OCI_MANIFEST,
};
use common::origin::{Origin, REGISTRY_BIN};
use common::proxy::CountingProxy;
use common::skopeo::{skopeo_copy_all, skopeo_inspect, verify_oci_layout};
use common::tools::{self, require, ChildGuard};

/// Pulls `image` back from `base`/`repo` by `reference` and checks every digest.
async fn assert_image_roundtrip(base: &str, repo: &str, reference: &str, image: &Image) {
    let client = RegistryClient::new(base);
    let got = client.get_manifest(repo, reference).await.unwrap();
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.bytes));
    assert_eq!(got.bytes, image.manifest_bytes);
    assert_eq!(got.content_type.as_deref(), Some(image.media_type.as_str()));
    assert_eq!(
        got.docker_content_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );
    for blob in image.blobs() {
        let bytes = client.get_blob(repo, &blob.digest).await.unwrap();
        assert_eq!(digest_of(&bytes), blob.digest);
    }
}

#[test]
fn tools_ports_and_require() {
    let p = tools::free_port();
    assert!(p > 0);
    let dead = tools::dead_port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", dead)).is_err());
    assert!(require("sh"));
    if std::env::var_os("CI").is_none() {
        assert!(!require("berth-no-such-tool-xyz"));
    }
}

#[tokio::test]
async fn child_guard_logs_and_kills() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo out-line; echo err-line >&2; exec sleep 600"]);
    let mut guard = ChildGuard::spawn("sleeper", cmd).unwrap();
    let pid = guard.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(guard.log().contains("out-line") && guard.log().contains("err-line")) {
        assert!(Instant::now() < deadline, "log: {}", guard.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(guard.is_running());
    let proc_path = format!("/proc/{pid}");
    assert!(std::path::Path::new(&proc_path).exists());
    drop(guard);
    // Reaped by the guard, so the PID is gone (not a zombie).
    assert!(!std::path::Path::new(&proc_path).exists());
}

#[tokio::test]
async fn wait_http_ok_times_out_on_dead_port() {
    let url = format!("http://127.0.0.1:{}/v2/", tools::dead_port());
    let t = Instant::now();
    let err = tools::wait_http_ok(&url, Duration::from_millis(300)).await;
    assert!(err.is_err());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn origin_oci_image_roundtrip() {
    if !require(REGISTRY_BIN) {
        return;
    }
    let origin = Origin::start().await;
    let img = build_image(1, 3, 64 * 1024, MediaKind::Oci, "amd64");
    assert_eq!(img.layers.len(), 3);
    assert_eq!(img.media_type, OCI_MANIFEST);
    // Layers are incompressible: compressed size is at least the data size.
    assert!(img.layers.iter().all(|l| l.size() >= 64 * 1024));
    push_image(&origin.url(), "library/alpine", "3.19", &img)
        .await
        .unwrap();
    assert_image_roundtrip(&origin.url(), "library/alpine", "3.19", &img).await;
    assert_image_roundtrip(&origin.url(), "library/alpine", &img.manifest_digest, &img).await;

    // diff_ids match the uncompressed layer tars, which hold real files.
    let config: serde_json::Value = serde_json::from_slice(&img.config.bytes).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    for (layer, diff_id) in img
        .layers
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
    {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer.bytes[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(digest_of(&tar), diff_id.as_str().unwrap());
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n.ends_with("data.bin")), "{names:?}");
    }
    // Same seed, same bytes.
    let again = build_image(1, 3, 64 * 1024, MediaKind::Oci, "amd64");
    assert_eq!(again.manifest_digest, img.manifest_digest);
    assert!(origin.log().contains("/v2/library/alpine/manifests/3.19"));
}

#[tokio::test]
async fn origin_docker_image_and_manifest_list() {
    if !require(REGISTRY_BIN) {
        return;
    }
    let origin = Origin::start().await;
    let img = build_image(2, 2, 10_000, MediaKind::Docker, "amd64");
    assert_eq!(img.media_type, DOCKER_MANIFEST);
    push_image(&origin.url(), "team/app", "v1", &img)
        .await
        .unwrap();
    assert_image_roundtrip(&origin.url(), "team/app", "v1", &img).await;

    let amd = build_image(3, 2, 5_000, MediaKind::Docker, "amd64");
    let arm = build_image(4, 2, 5_000, MediaKind::Docker, "arm64");
    let list = push_index(
        &origin.url(),
        "team/multi",
        "latest",
        &[("amd64", amd.clone()), ("arm64", arm.clone())],
        MediaKind::Docker,
    )
    .await
    .unwrap();
    assert_eq!(list.media_type, DOCKER_MANIFEST_LIST);
    let got = RegistryClient::new(&origin.url())
        .get_manifest("team/multi", "latest")
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.content_type.as_deref(), Some(DOCKER_MANIFEST_LIST));
    assert_eq!(got.bytes, list.manifest_bytes);
    assert_eq!(digest_of(&got.bytes), list.manifest_digest);
    let parsed: serde_json::Value = serde_json::from_slice(&got.bytes).unwrap();
    assert_eq!(parsed["manifests"][1]["platform"]["architecture"], "arm64");
    for child in [&amd, &arm] {
        assert_image_roundtrip(&origin.url(), "team/multi", &child.manifest_digest, child).await;
    }
}

#[tokio::test]
async fn origin_oci_index_and_helm_chart() {
    if !require(REGISTRY_BIN) {
        return;
    }
    let origin = Origin::start().await;
    let amd = build_image(5, 1, 4_096, MediaKind::Oci, "amd64");
    let arm = build_image(5, 1, 4_096, MediaKind::Oci, "arm64");
    // Same seed: layers are shared across platforms, configs differ.
    assert_eq!(amd.layers[0].digest, arm.layers[0].digest);
    assert_ne!(amd.manifest_digest, arm.manifest_digest);
    let index = push_index(
        &origin.url(),
        "library/busybox",
        "1.36",
        &[("amd64", amd), ("arm64", arm)],
        MediaKind::Oci,
    )
    .await
    .unwrap();
    let client = RegistryClient::new(&origin.url());
    let got = client
        .get_manifest("library/busybox", "1.36")
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.content_type.as_deref(), Some(OCI_INDEX));
    assert_eq!(digest_of(&got.bytes), index.manifest_digest);

    let chart = push_helm_chart(&origin.url(), "charts/mychart", "0.1.0")
        .await
        .unwrap();
    assert_eq!(chart.config.media_type, HELM_CONFIG);
    assert_eq!(chart.layers[0].media_type, HELM_CHART_LAYER);
    assert_image_roundtrip(&origin.url(), "charts/mychart", "0.1.0", &chart).await;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&chart.layers[0].bytes[..])
        .read_to_end(&mut tar)
        .unwrap();
    let names: Vec<String> = tar::Archive::new(&tar[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    for want in [
        "mychart/Chart.yaml",
        "mychart/values.yaml",
        "mychart/templates/cm.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
}

#[tokio::test]
async fn proxy_counts_requests_and_bytes() {
    if !require(REGISTRY_BIN) {
        return;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let img = build_image(6, 2, 32 * 1024, MediaKind::Oci, "amd64");
    // Pushing through the proxy works (upload Location points back at the proxy).
    push_image(&proxy.url(), "library/nginx", "1.25", &img)
        .await
        .unwrap();
    assert!(proxy.count("POST", "/blobs/uploads/") >= 3);
    assert!(proxy.count("PUT", "/blobs/uploads/") >= 3);
    assert_eq!(proxy.count("PUT", "/manifests/1.25"), 1);
    proxy.reset();
    assert_eq!(proxy.requests().len(), 0);
    assert_eq!(proxy.bytes_served(), 0);

    assert_image_roundtrip(&proxy.url(), "library/nginx", "1.25", &img).await;
    let client = RegistryClient::new(&proxy.url());
    let head = client
        .fetch_manifest(
            reqwest::Method::HEAD,
            "library/nginx",
            "1.25",
            content::ACCEPT_ALL_MANIFESTS,
        )
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(
        head.docker_content_digest.as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(proxy.manifest_gets(), 1);
    assert_eq!(proxy.manifest_heads(), 1);
    assert_eq!(proxy.blob_gets(), 3);
    assert_eq!(proxy.bytes_served(), img.blob_bytes() + img.manifest_size());
    assert_eq!(proxy.blob_bytes_served(), img.blob_bytes());
    let recs = proxy.requests();
    assert!(
        recs.iter().all(|r| r.status == 200 && r.completed),
        "{recs:?}"
    );
    let layer_rec = recs
        .iter()
        .find(|r| r.path.ends_with(&img.layers[0].digest))
        .unwrap();
    assert_eq!(layer_rec.bytes, img.layers[0].size());
}

#[tokio::test]
async fn proxy_fault_knobs() {
    if !require(REGISTRY_BIN) {
        return;
    }
    let origin = Origin::start().await;
    let img = build_image(7, 1, 100_000, MediaKind::Oci, "amd64");
    push_image(&origin.url(), "library/faulty", "v1", &img)
        .await
        .unwrap();
    let proxy = CountingProxy::start(&origin.url()).await;
    let client = RegistryClient::new(&proxy.url());
    let layer = &img.layers[0];
    let http = tools::http_client();
    let blob_url = format!("{}/v2/library/faulty/blobs/{}", proxy.url(), layer.digest);

    // fail_all answers every request with the status, without forwarding.
    proxy.set_fail_all(Some(503));
    let resp = http
        .get(format!("{}/v2/", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(client
        .get_blob("library/faulty", &layer.digest)
        .await
        .is_err());
    proxy.set_fail_all(None);

    // delay holds each request back.
    proxy.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    let bytes = client
        .get_blob("library/faulty", &layer.digest)
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(digest_of(&bytes), layer.digest);
    proxy.set_delay(Duration::ZERO);

    // cut: the client sees a truncated body (an error), the proxy counts what it sent.
    proxy.reset();
    proxy.cut_blob_after(Some(1000));
    let resp = http.get(&blob_url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.bytes().await.is_err(),
        "truncated body must be an error"
    );
    let rec = proxy.requests().pop().unwrap();
    assert_eq!(rec.bytes, 1000);
    assert!(!rec.completed);
    // Cut at 0: headers only, then the connection drops.
    proxy.cut_blob_after(Some(0));
    let resp = http.get(&blob_url).send().await;
    assert!(resp.is_err() || resp.unwrap().bytes().await.is_err());
    // A limit equal to the blob size lets the whole blob through.
    proxy.cut_blob_after(Some(layer.size()));
    let bytes = client
        .get_blob("library/faulty", &layer.digest)
        .await
        .unwrap();
    assert_eq!(digest_of(&bytes), layer.digest);
    // Manifests are not cut.
    let m = client.get_manifest("library/faulty", "v1").await.unwrap();
    assert_eq!(digest_of(&m.bytes), img.manifest_digest);
    proxy.cut_blob_after(None);

    // corrupt: same length, different digest.
    proxy.corrupt_blob(true);
    let bytes = client
        .get_blob("library/faulty", &layer.digest)
        .await
        .unwrap();
    assert_eq!(bytes.len(), layer.bytes.len());
    assert_ne!(digest_of(&bytes), layer.digest);
    proxy.corrupt_blob(false);

    // refuse: connections are closed without an answer.
    proxy.set_refuse(true);
    let fresh = tools::http_client();
    assert!(fresh
        .get(format!("{}/v2/", proxy.url()))
        .send()
        .await
        .is_err());
    assert!(client
        .get_blob("library/faulty", &layer.digest)
        .await
        .is_err());
    proxy.set_refuse(false);
    let bytes = tools::http_client()
        .get(&blob_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(digest_of(&bytes), layer.digest);
}

#[tokio::test]
async fn skopeo_inspect_and_copy_from_origin() {
    if !require(REGISTRY_BIN) || !require("skopeo") {
        return;
    }
    let origin = Origin::start().await;
    let img = build_image(8, 2, 20_000, MediaKind::Oci, "amd64");
    push_image(&origin.url(), "library/single", "v1", &img)
        .await
        .unwrap();
    let raw = skopeo_inspect(&origin.host(), "library/single:v1", true)
        .await
        .unwrap();
    assert_eq!(raw.as_bytes(), &img.manifest_bytes[..]);
    let info = skopeo_inspect(&origin.host(), "library/single:v1", false)
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["Digest"], img.manifest_digest.as_str());
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);

    let amd = build_image(9, 2, 8_000, MediaKind::Docker, "amd64");
    let arm = build_image(10, 1, 8_000, MediaKind::Docker, "arm64");
    let list = push_index(
        &origin.url(),
        "library/multi",
        "v2",
        &[("amd64", amd.clone()), ("arm64", arm.clone())],
        MediaKind::Docker,
    )
    .await
    .unwrap();
    let raw = skopeo_inspect(&origin.host(), "library/multi:v2", true)
        .await
        .unwrap();
    assert_eq!(digest_of(raw.as_bytes()), list.manifest_digest);

    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    skopeo_copy_all(&format!("{}/library/multi:v2", origin.host()), &layout)
        .await
        .unwrap();
    let n = verify_oci_layout(&layout).unwrap();
    // 2 child manifests + 2 configs + 3 layers + the list itself.
    assert_eq!(n, 8, "blobs in layout");
    // skopeo converts Docker schema 2 to OCI when writing an oci: layout
    // (configs and manifests are re-serialized), so only layers keep their digests.
    for blob in amd.layers.iter().chain(arm.layers.iter()) {
        let path = layout
            .join("blobs/sha256")
            .join(blob.digest.trim_start_matches("sha256:"));
        assert!(path.is_file(), "missing layer {}", blob.digest);
    }

    // An OCI index is copied byte for byte: every blob and manifest keeps its digest.
    let amd = build_image(11, 2, 8_000, MediaKind::Oci, "amd64");
    let arm = build_image(12, 1, 8_000, MediaKind::Oci, "arm64");
    let index = push_index(
        &origin.url(),
        "library/ocimulti",
        "v3",
        &[("amd64", amd.clone()), ("arm64", arm.clone())],
        MediaKind::Oci,
    )
    .await
    .unwrap();
    let oci_layout = dir.path().join("oci-layout-copy");
    skopeo_copy_all(
        &format!("docker://{}/library/ocimulti:v3", origin.host()),
        &oci_layout,
    )
    .await
    .unwrap();
    assert_eq!(verify_oci_layout(&oci_layout).unwrap(), 8);
    let mut want: Vec<String> = amd
        .blobs()
        .chain(arm.blobs())
        .map(|b| b.digest.clone())
        .collect();
    want.extend([
        amd.manifest_digest.clone(),
        arm.manifest_digest.clone(),
        index.manifest_digest.clone(),
    ]);
    for digest in &want {
        let path = oci_layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        assert!(path.is_file(), "missing {digest}");
    }

    // A corrupted layout is detected.
    let victim = layout
        .join("blobs/sha256")
        .join(amd.layers[0].digest.trim_start_matches("sha256:"));
    std::fs::write(&victim, b"garbage").unwrap();
    assert!(verify_oci_layout(&layout).is_err());
}

/// Runs only once `src/` implements `berth serve`; skipped (with a message)
/// while the binary does not know the subcommand.
#[tokio::test]
async fn berth_starts_and_answers_v2() {
    let probe = std::process::Command::new(common::berth::BERTH_BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&probe.stdout);
    if !probe.status.success() || !help.contains("--listen") {
        eprintln!("SKIP: berth binary has no `serve` subcommand yet");
        return;
    }
    let mut b = common::berth::Berth::start(&[
        "--upstream",
        &format!("docker.io=http://127.0.0.1:{}", tools::dead_port()),
    ])
    .await;
    assert!(b.is_running());
    let resp = tools::http_client()
        .get(format!("{}/v2/", b.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(b.cache_dir().is_dir());
    b.stop();
}
