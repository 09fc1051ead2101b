//! berth as containerd's and skopeo's mirror, against a real distribution
//! origin (behind a counting proxy) and a private containerd: pulls by tag,
//! by digest, multi-arch, Docker and OCI media types, a Helm chart, the
//! second pull served with zero upstream blob requests, path-style names,
//! and tag revalidation.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::skopeo;
use common::tools::{self, dead_port};

struct Setup {
    _origin: Origin,
    origin_url: String,
    proxy: CountingProxy,
    berth: Berth,
}

/// origin <- counting proxy <- berth (docker.io and ghcr.io both mirror the origin).
async fn setup(extra: &[&str]) -> Setup {
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let docker = format!("docker.io={}", proxy.url());
    let ghcr = format!("ghcr.io={}", proxy.url());
    let mut args = vec!["--upstream", &docker, "--upstream", &ghcr];
    args.extend_from_slice(extra);
    let berth = Berth::start(&args).await;
    Setup {
        origin_url: origin.url(),
        _origin: origin,
        proxy,
        berth,
    }
}

fn hosts_for(berth: &Berth, registry: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    if registry == "docker.io" {
        // The shipped example, with berth's port and a dead `server`: it must
        // parse (containerd silently ignores a broken hosts.toml) and route.
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/containerd/certs.d/docker.io/hosts.toml"
        ))
        .unwrap();
        assert!(
            example.contains("http://127.0.0.1:5050")
                && example.contains("https://registry-1.docker.io")
        );
        let text = example
            .replace("http://127.0.0.1:5050", &berth.url())
            .replace("https://registry-1.docker.io", &dead);
        std::fs::create_dir_all(dir.path().join(registry)).unwrap();
        std::fs::write(dir.path().join(registry).join("hosts.toml"), text).unwrap();
    } else {
        // `server` is a dead port: only berth can answer, nothing leaves the machine.
        write_hosts_toml(dir.path(), registry, &berth.url(), &dead);
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pull_by_tag_then_fresh_namespace_needs_no_upstream_blobs() {
    if !tools::require_all(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let s = setup(&[]).await;
    let image = content::build_image(1, 3, 64 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&s.origin_url, "library/app", "1.0", &image)
        .await
        .unwrap();
    s.proxy.reset();

    let ctd = Containerd::start();
    let hosts = hosts_for(&s.berth, "docker.io");
    let out = ctd
        .pull_async("first", "docker.io/library/app:1.0", hosts.path(), &[])
        .await;
    out.assert_success();
    for r in out.requests() {
        assert!(
            r.url.starts_with(&s.berth.url()),
            "only berth is asked: {r:?}"
        );
        assert!(
            r.url.ends_with("?ns=docker.io"),
            "containerd routed with ns=: {r:?}"
        );
    }
    assert_eq!(
        ctd.image_digest("first", "docker.io/library/app:1.0")
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert_eq!(
        s.proxy.blob_gets(),
        image.blobs().count(),
        "one upstream GET per blob: {:?}",
        s.proxy.requests()
    );

    s.proxy.reset();
    let out = ctd
        .pull_async("second", "docker.io/library/app:1.0", hosts.path(), &[])
        .await;
    out.assert_success();
    assert_eq!(
        s.proxy.blob_gets(),
        0,
        "second pull served from cache: {:?}",
        s.proxy.requests()
    );
    assert_eq!(
        s.proxy.requests().len(),
        0,
        "tag inside its TTL: no upstream request at all"
    );
    assert!(ctd.list_content("second").contains(&image.layers[0].digest));

    // By digest, in a third namespace: still nothing upstream.
    let by_digest = format!("docker.io/library/app@{}", image.manifest_digest);
    let out = ctd.pull_async("third", &by_digest, hosts.path(), &[]).await;
    out.assert_success();
    assert_eq!(s.proxy.requests().len(), 0, "{:?}", s.proxy.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_manifest_list_by_platform_and_all_platforms() {
    if !tools::require_all(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let s = setup(&[]).await;
    let amd = content::build_image(2, 2, 32 * 1024, MediaKind::Docker, "amd64");
    let arm = content::build_image(3, 2, 32 * 1024, MediaKind::Docker, "arm64");
    let list = content::build_index(
        &[("amd64", amd.clone()), ("arm64", arm.clone())],
        MediaKind::Docker,
    );
    RegistryClient::new(&s.origin_url)
        .push_index("team/multi", "v2", &list)
        .await
        .unwrap();
    s.proxy.reset();

    let ctd = Containerd::start();
    let hosts = hosts_for(&s.berth, "docker.io");
    let out = ctd
        .pull_async(
            "arm",
            "docker.io/team/multi:v2",
            hosts.path(),
            &["--platform", "linux/arm64"],
        )
        .await;
    out.assert_success();
    assert_eq!(
        ctd.image_digest("arm", "docker.io/team/multi:v2")
            .as_deref(),
        Some(list.manifest_digest.as_str())
    );
    let fetched: Vec<String> = s
        .proxy
        .requests()
        .iter()
        .filter(|r| r.path.contains("/blobs/"))
        .map(|r| r.path.clone())
        .collect();
    for b in arm.blobs() {
        assert!(
            fetched.iter().any(|p| p.ends_with(&b.digest)),
            "arm64 blob {} fetched",
            b.digest
        );
    }
    for b in amd.blobs() {
        assert!(
            !fetched.iter().any(|p| p.ends_with(&b.digest)),
            "amd64 blob {} not fetched",
            b.digest
        );
    }

    s.proxy.reset();
    let out = ctd
        .pull_async(
            "all",
            "docker.io/team/multi:v2",
            hosts.path(),
            &["--all-platforms"],
        )
        .await;
    out.assert_success();
    assert_eq!(
        s.proxy.blob_gets(),
        amd.blobs().count(),
        "only the new platform's blobs go upstream: {:?}",
        s.proxy.requests()
    );
    let stored = ctd.list_content("all");
    for b in amd.blobs().chain(arm.blobs()) {
        assert!(stored.contains(&b.digest));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_fetches_oci_index_and_helm_chart() {
    if !tools::require_all(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let s = setup(&[]).await;
    let amd = content::build_image(4, 1, 8 * 1024, MediaKind::Oci, "amd64");
    let arm = content::build_image(5, 1, 8 * 1024, MediaKind::Oci, "arm64");
    let index = content::build_index(&[("amd64", amd), ("arm64", arm)], MediaKind::Oci);
    RegistryClient::new(&s.origin_url)
        .push_index("library/oci-multi", "1", &index)
        .await
        .unwrap();
    let chart = content::push_helm_chart(&s.origin_url, "charts/mychart", "0.1.0")
        .await
        .unwrap();

    let ctd = Containerd::start();
    let hosts = hosts_for(&s.berth, "docker.io");
    let out = ctd
        .pull_async(
            "oci",
            "docker.io/library/oci-multi:1",
            hosts.path(),
            &["--all-platforms"],
        )
        .await;
    out.assert_success();
    assert_eq!(
        ctd.image_digest("oci", "docker.io/library/oci-multi:1")
            .as_deref(),
        Some(index.manifest_digest.as_str())
    );

    let out = ctd
        .content_fetch_async("helm", "docker.io/charts/mychart:0.1.0", hosts.path(), &[])
        .await;
    out.assert_success();
    let stored = ctd.list_content("helm");
    for b in chart.blobs() {
        assert!(
            stored.contains(&b.digest),
            "chart blob {} fetched",
            b.digest
        );
    }
    // The chart's media types survive byte for byte.
    let via = RegistryClient::new(&s.berth.url());
    let m = via
        .get_manifest("docker.io/charts/mychart", "0.1.0")
        .await
        .unwrap();
    assert_eq!(m.bytes, chart.manifest_bytes);
    assert_eq!(
        m.content_type.as_deref(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(
        m.docker_content_digest.as_deref(),
        Some(chart.manifest_digest.as_str())
    );
}

#[tokio::test]
async fn skopeo_inspects_and_copies_through_path_style_names() {
    if !tools::require_all(&["docker-registry", "skopeo"]) {
        return;
    }
    let s = setup(&[]).await;
    let amd = content::build_image(6, 2, 16 * 1024, MediaKind::Oci, "amd64");
    let arm = content::build_image(7, 2, 16 * 1024, MediaKind::Oci, "arm64");
    let index = content::build_index(&[("amd64", amd), ("arm64", arm)], MediaKind::Oci);
    RegistryClient::new(&s.origin_url)
        .push_index("org/tool", "1", &index)
        .await
        .unwrap();

    // ghcr.io is the first path segment; no ?ns= from skopeo.
    let raw = skopeo::skopeo_inspect(&s.berth.addr(), "ghcr.io/org/tool:1", true)
        .await
        .unwrap();
    assert_eq!(raw.trim().as_bytes(), index.manifest_bytes.as_ref());

    let layout = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/ghcr.io/org/tool:1", s.berth.addr());
    skopeo::skopeo_copy_all(&src, layout.path()).await.unwrap();
    let n = skopeo::verify_oci_layout(layout.path()).unwrap();
    assert!(
        n > 2 * 4,
        "index, 2 manifests, 2 configs, 4 layers re-hashed: {n}"
    );

    // A single-segment name without a host goes to the default registry, under library/.
    let img = content::build_image(8, 1, 4096, MediaKind::Docker, "amd64");
    content::push_image(&s.origin_url, "library/busybox", "latest", &img)
        .await
        .unwrap();
    let raw = skopeo::skopeo_inspect(&s.berth.addr(), "busybox:latest", true)
        .await
        .unwrap();
    assert_eq!(raw.trim().as_bytes(), img.manifest_bytes.as_ref());
}

#[tokio::test]
async fn tags_are_revalidated_with_head_after_their_ttl() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let s = setup(&["--tag-ttl", "1s"]).await;
    let v1 = content::build_image(9, 1, 4096, MediaKind::Oci, "amd64");
    content::push_image(&s.origin_url, "library/moving", "latest", &v1)
        .await
        .unwrap();
    let via = RegistryClient::new(&s.berth.url());
    let m = via.get_manifest("library/moving", "latest").await.unwrap();
    assert_eq!(
        m.docker_content_digest.as_deref(),
        Some(v1.manifest_digest.as_str())
    );
    s.proxy.reset();
    let _ = via.get_manifest("library/moving", "latest").await.unwrap();
    assert_eq!(s.proxy.requests().len(), 0, "inside the TTL");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v2 = content::build_image(10, 1, 4096, MediaKind::Oci, "amd64");
    content::push_image(&s.origin_url, "library/moving", "latest", &v2)
        .await
        .unwrap();
    s.proxy.reset();
    let m = via.get_manifest("library/moving", "latest").await.unwrap();
    assert_eq!(
        m.docker_content_digest.as_deref(),
        Some(v2.manifest_digest.as_str()),
        "moved tag is followed"
    );
    assert_eq!(s.proxy.manifest_heads(), 1, "{:?}", s.proxy.requests());
    assert_eq!(
        s.proxy.manifest_gets(),
        1,
        "the new manifest is fetched once"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.proxy.reset();
    let m = via.get_manifest("library/moving", "latest").await.unwrap();
    assert_eq!(m.bytes, v2.manifest_bytes);
    assert_eq!(
        (s.proxy.manifest_heads(), s.proxy.manifest_gets()),
        (1, 0),
        "unchanged tag: one HEAD, no counted GET"
    );

    // A HEAD after the TTL revalidates too, and carries no body.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let h = via
        .fetch_manifest(
            reqwest::Method::HEAD,
            "library/moving",
            "latest",
            content::ACCEPT_ALL_MANIFESTS,
        )
        .await
        .unwrap();
    assert_eq!(h.status, 200);
    assert!(h.bytes.is_empty());
    assert_eq!(
        h.docker_content_digest.as_deref(),
        Some(v2.manifest_digest.as_str())
    );
}

#[tokio::test]
async fn tag_list_is_passed_through_with_pagination() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let s = setup(&[]).await;
    let img = content::build_image(11, 1, 1024, MediaKind::Oci, "amd64");
    for t in ["a", "b", "c"] {
        content::push_image(&s.origin_url, "org/tags", t, &img)
            .await
            .unwrap();
    }
    let http = tools::http_client();
    let direct = http
        .get(format!("{}/v2/org/tags/tags/list?n=2", s.origin_url))
        .send()
        .await
        .unwrap();
    let origin_link = direct
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned());
    let origin_body: serde_json::Value = direct.json().await.unwrap();

    let r = http
        .get(format!(
            "{}/v2/ghcr.io/org/tags/tags/list?n=2",
            s.berth.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let link = r
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, origin_body, "relayed unchanged");
    let q = s.proxy.requests().last().unwrap().query.clone();
    assert_eq!(q.as_deref(), Some("n=2"), "n is relayed");
    match origin_link {
        // This distribution paginates: berth's Link must lead back through berth.
        Some(_) => {
            let link = link.expect("Link relayed");
            assert!(
                link.starts_with("</v2/ghcr.io/org/tags/tags/list?"),
                "{link}"
            );
            let next = link.trim_start_matches('<').split('>').next().unwrap();
            let r = http
                .get(format!("{}{next}", s.berth.url()))
                .send()
                .await
                .unwrap();
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["tags"], serde_json::json!(["c"]));
        }
        None => {
            // distribution 2.8 ignores n and does not sort.
            assert!(link.is_none());
            let mut tags: Vec<String> = serde_json::from_value(body["tags"].clone()).unwrap();
            tags.sort();
            assert_eq!(tags, ["a", "b", "c"], "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_images_still_pull_when_the_origin_is_gone() {
    if !tools::require_all(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let mut s = setup(&["--tag-ttl", "1s", "--connect-timeout", "1s"]).await;
    let image = content::build_image(12, 2, 16 * 1024, MediaKind::Docker, "amd64");
    content::push_image(&s.origin_url, "library/offline", "1", &image)
        .await
        .unwrap();
    let ctd = Containerd::start();
    let hosts = hosts_for(&s.berth, "docker.io");
    ctd.pull_async("online", "docker.io/library/offline:1", hosts.path(), &[])
        .await
        .assert_success();

    s._origin.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the tag's TTL has passed
    let started = std::time::Instant::now();
    let out = ctd
        .pull_async("offline", "docker.io/library/offline:1", hosts.path(), &[])
        .await;
    out.assert_success();
    assert_eq!(
        ctd.image_digest("offline", "docker.io/library/offline:1")
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no hang while the origin is gone"
    );
    assert!(
        s.berth
            .log()
            .contains("serving the last known tag from cache"),
        "stale serving is logged"
    );

    // Something never cached fails fast with a 5xx, so containerd falls back.
    let http = tools::http_client();
    let started = std::time::Instant::now();
    let r = http
        .get(format!(
            "{}/v2/library/never/manifests/1?ns=docker.io",
            s.berth.url()
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert!(started.elapsed() < Duration::from_secs(5));
}
