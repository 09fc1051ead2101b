//! A node without its uplink, with real components: containerd pulls
//! through berth while the origin is up; then berth restarts on the same
//! cache with the origin stopped, and a fresh containerd namespace pulls
//! every image by tag and by digest (and unpacks it); a "new node" seeded
//! by `berth export` / `berth import` does the same. Also: a tag deleted
//! upstream is rejected by default and served with
//! `serve_stale_on_not_found`; a pinned image survives an eviction storm;
//! retention (`berth gc` and the daemon) removes old unpinned content only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, SystemTime};

use common::berth::{blob_path, output_text, run_cli, Berth};
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, Image, MediaKind, RegistryClient};
use common::origin::Origin;
use common::tools::{self, dead_port};
use serde_json::Value;

/// `berth <args>` to completion, logging at warn.
async fn berth(args: &[&str]) -> Output {
    run_cli(args, "warn").await
}

const KIB: usize = 1024;

/// Pull a tag (every platform of an index) through a registry client.
async fn pull_all(client: &RegistryClient, repo: &str, tag: &str) -> String {
    let m = client.get_manifest(repo, tag).await.unwrap();
    assert_eq!(m.status, 200, "{repo}:{tag}: {m:?}");
    let v: Value = serde_json::from_slice(&m.bytes).unwrap();
    let mut manifests = vec![v.clone()];
    for k in v["manifests"].as_array().cloned().unwrap_or_default() {
        let c = client
            .get_manifest(repo, k["digest"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(c.status, 200);
        manifests.push(serde_json::from_slice(&c.bytes).unwrap());
    }
    for m in manifests {
        let blobs = m["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .chain(m.get("config").cloned());
        for b in blobs {
            let d = b["digest"].as_str().unwrap();
            assert_eq!(
                content::digest_of(&client.get_blob(repo, d).await.unwrap()),
                d
            );
        }
    }
    m.docker_content_digest.unwrap()
}

fn hosts_dir(berth: &Berth, registries: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}", dead_port());
    for r in registries {
        write_hosts_toml(dir.path(), r, &berth.url(), &dead);
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_boot_serves_every_image_by_tag_and_digest_to_containerd() {
    if !tools::require_all(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let mut origin = Origin::start().await;
    let o = origin.url();
    let alpha = content::build_image(201, 2, 64 * KIB, MediaKind::Oci, "amd64");
    content::push_image(&o, "library/alpha", "1", &alpha)
        .await
        .unwrap();
    let beta = content::push_index(
        &o,
        "library/beta",
        "2",
        &[
            (
                "amd64",
                content::build_image(202, 2, 48 * KIB, MediaKind::Docker, "amd64"),
            ),
            (
                "arm64",
                content::build_image(203, 1, 48 * KIB, MediaKind::Docker, "arm64"),
            ),
        ],
        MediaKind::Docker,
    )
    .await
    .unwrap();
    let gamma = content::push_index(
        &o,
        "team/gamma",
        "3",
        &[(
            "amd64",
            content::build_image(204, 1, 48 * KIB, MediaKind::Oci, "amd64"),
        )],
        MediaKind::Oci,
    )
    .await
    .unwrap();
    let delta = content::build_image(205, 1, 32 * KIB, MediaKind::Docker, "amd64");
    content::push_image(&o, "org/delta", "4", &delta)
        .await
        .unwrap();
    let images = [
        ("docker.io/library/alpha:1", alpha.manifest_digest.clone()),
        ("docker.io/library/beta:2", beta.manifest_digest.clone()),
        ("docker.io/team/gamma:3", gamma.manifest_digest.clone()),
        ("ghcr.io/org/delta:4", delta.manifest_digest.clone()),
    ];
    let registries = ["docker.io", "ghcr.io"];

    let cache = tempfile::Builder::new()
        .prefix("berth-offline-")
        .tempdir()
        .unwrap();
    let (docker, ghcr) = (format!("docker.io={o}"), format!("ghcr.io={o}"));
    let online =
        Berth::start_with_dir(cache.path(), &["--upstream", &docker, "--upstream", &ghcr]).await;
    let ctd = Containerd::start();
    let hosts = hosts_dir(&online, &registries);
    for (r, d) in &images {
        ctd.pull_async("online", r, hosts.path(), &[])
            .await
            .assert_success();
        assert_eq!(ctd.image_digest("online", r).as_deref(), Some(d.as_str()));
    }
    online.stop();
    // No upstream at all from here on.
    origin.stop();

    let offline = Berth::start_with_dir(
        cache.path(),
        &[
            "--upstream",
            &docker,
            "--upstream",
            &ghcr,
            "--tag-ttl",
            "1s",
            "--connect-timeout",
            "1s",
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // every tag is past its TTL
    let hosts = hosts_dir(&offline, &registries);
    for (r, d) in &images {
        let out = ctd.pull_async("offline-tag", r, hosts.path(), &[]).await;
        out.assert_success();
        assert_eq!(
            ctd.image_digest("offline-tag", r).as_deref(),
            Some(d.as_str())
        );
        let (name, _) = r.rsplit_once(':').unwrap();
        let by_digest = format!("{name}@{d}");
        ctd.pull_async("offline-digest", &by_digest, hosts.path(), &[])
            .await
            .assert_success();
    }
    assert!(
        offline
            .log()
            .contains("serving the last known tag from cache"),
        "stale serving is logged"
    );

    // A new node: the cache carried over as a bundle.
    let refs: Vec<&str> = images.iter().map(|(r, _)| *r).collect();
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("node.tar");
    let cache_arg = cache.path().to_str().unwrap();
    let mut args = vec![
        "export",
        "-o",
        bundle.to_str().unwrap(),
        "--cache-dir",
        cache_arg,
    ];
    args.extend(refs.iter().copied());
    let out = berth(&args).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let node = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        bundle.to_str().unwrap(),
        "--cache-dir",
        node.path().to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    drop(offline);
    let new_node =
        Berth::start_with_dir(node.path(), &["--upstream", &docker, "--upstream", &ghcr]).await;
    let hosts = hosts_dir(&new_node, &registries);
    for (r, d) in &images {
        ctd.pull_async("new-node", r, hosts.path(), &[])
            .await
            .assert_success();
        assert_eq!(ctd.image_digest("new-node", r).as_deref(), Some(d.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_deleted_upstream_is_rejected_unless_serve_stale_is_set() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let origin = Origin::start().await;
    let img = content::build_image(211, 1, 16 * KIB, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/gone", "1", &img)
        .await
        .unwrap();
    let up = format!("docker.io={}", origin.url());
    let strict = Berth::start(&["--upstream", &up, "--tag-ttl", "1s"]).await;
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        format!(
            "[registries.\"docker.io\"]\nurl = \"{}\"\nserve_stale_on_not_found = true\n",
            origin.url()
        ),
    )
    .unwrap();
    let lenient =
        Berth::start(&["--config", conf.path().to_str().unwrap(), "--tag-ttl", "1s"]).await;
    let (a, b) = (
        RegistryClient::new(&strict.url()),
        RegistryClient::new(&lenient.url()),
    );
    assert_eq!(pull_all(&a, "library/gone", "1").await, img.manifest_digest);
    assert_eq!(pull_all(&b, "library/gone", "1").await, img.manifest_digest);

    // Delete the manifest upstream (distribution drops its tags with it).
    let http = tools::http_client();
    let r = http
        .delete(format!(
            "{}/v2/library/gone/manifests/{}",
            origin.url(),
            img.manifest_digest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let direct = RegistryClient::new(&origin.url())
        .get_manifest("library/gone", "1")
        .await
        .unwrap();
    assert_eq!(direct.status, 404, "the tag is gone upstream");
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let m = a.get_manifest("library/gone", "1").await.unwrap();
    assert_eq!(m.status, 404, "rejected by default, as Harbor does");
    let body: Value = serde_json::from_slice(&m.bytes).unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    // Content by digest still needs nothing upstream.
    let m = a
        .get_manifest("library/gone", &img.manifest_digest)
        .await
        .unwrap();
    assert_eq!(m.status, 200);

    let m = b.get_manifest("library/gone", "1").await.unwrap();
    assert_eq!(m.status, 200, "serve_stale_on_not_found keeps serving it");
    assert_eq!(
        m.docker_content_digest.as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert!(lenient
        .log()
        .contains("serving the last known tag from cache"));
}

/// The files of `img` (manifest, config, layers) in `cache`.
fn image_files(cache: &Path, img: &Image) -> Vec<PathBuf> {
    std::iter::once(img.manifest_digest.as_str())
        .chain(img.blobs().map(|b| b.digest.as_str()))
        .map(|d| blob_path(cache, d))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_image_survives_an_eviction_storm() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let mut origin = Origin::start().await;
    let keep = content::build_image(221, 3, 256 * KIB, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/keep", "1", &keep)
        .await
        .unwrap();
    let mut churn = Vec::new();
    for i in 0..8u64 {
        let img = content::build_image(230 + i, 2, 256 * KIB, MediaKind::Oci, "amd64");
        content::push_image(&origin.url(), "library/churn", &i.to_string(), &img)
            .await
            .unwrap();
        churn.push(img);
    }
    let cache = tempfile::tempdir().unwrap();
    let up = format!("docker.io={}", origin.url());
    let b = Berth::start_with_dir(
        cache.path(),
        &[
            "--upstream",
            &up,
            "--cache-capacity",
            "2MiB",
            "--pin",
            "docker.io/library/keep:*",
        ],
    )
    .await;
    let client = RegistryClient::new(&b.url());
    pull_all(&client, "library/keep", "1").await;
    for i in 0..churn.len() {
        pull_all(&client, "library/churn", &i.to_string()).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for f in image_files(cache.path(), &keep) {
        assert!(f.is_file(), "pinned file evicted: {}", f.display());
    }
    let churned: usize = churn
        .iter()
        .flat_map(|i| image_files(cache.path(), i))
        .filter(|f| f.is_file())
        .count();
    let total: usize = churn
        .iter()
        .map(|i| image_files(cache.path(), i).len())
        .sum();
    assert!(
        churned < total / 2,
        "unpinned content was evicted ({churned} of {total} files left)"
    );

    // Offline, the pinned image still pulls completely.
    origin.stop();
    assert_eq!(
        pull_all(&client, "library/keep", "1").await,
        keep.manifest_digest
    );
    b.stop();
    let ls = berth(&[
        "ls",
        "--json",
        "--pin",
        "docker.io/library/keep:*",
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ])
    .await;
    let listed: Vec<Value> = serde_json::from_slice(&ls.stdout).unwrap();
    let k = listed
        .iter()
        .find(|e| e["image"] == "docker.io/library/keep:1")
        .unwrap();
    assert_eq!(k["pinned"], true);
    assert_eq!(k["complete"], "yes");
    assert!(listed
        .iter()
        .filter(|e| e["image"] != "docker.io/library/keep:1")
        .all(|e| e["pinned"] == false));
}

fn age(files: &[PathBuf], by: Duration) {
    let t = SystemTime::now() - by;
    for f in files {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_unpinned_content_only() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let origin = Origin::start().await;
    let mut imgs = Vec::new();
    for (i, repo) in ["library/old", "library/fresh", "library/pinned"]
        .iter()
        .enumerate()
    {
        let img = content::build_image(240 + i as u64, 2, 32 * KIB, MediaKind::Oci, "amd64");
        content::push_image(&origin.url(), repo, "1", &img)
            .await
            .unwrap();
        imgs.push(img);
    }
    let (old, fresh, pinned) = (&imgs[0], &imgs[1], &imgs[2]);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let up = format!("docker.io={}", origin.url());
    let pin = "docker.io/library/pinned:*";
    let b = Berth::start_with_dir(cache.path(), &["--upstream", &up, "--pin", pin]).await;
    let client = RegistryClient::new(&b.url());
    for repo in ["library/old", "library/fresh", "library/pinned"] {
        pull_all(&client, repo, "1").await;
    }
    b.stop();
    age(&image_files(cache.path(), old), Duration::from_secs(7200));
    age(
        &image_files(cache.path(), pinned),
        Duration::from_secs(7200),
    );

    let gc = |dry: bool| {
        let mut a = vec!["gc", "--retention", "1h", "--pin", pin, "--cache-dir", dir];
        if dry {
            a.push("--dry-run");
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let dry = gc(true);
    let out = berth(&dry.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("would remove {}", old.layers[0].digest)),
        "{stdout}"
    );
    assert!(image_files(cache.path(), old).iter().all(|f| f.is_file()));

    let real = gc(false);
    let out = berth(&real.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("removed {} (", old.layers[0].digest))
            && stdout.contains(") of docker.io/library/old:1"),
        "{stdout}"
    );
    assert!(stdout.contains("removed 4 file(s)"), "{stdout}");
    assert!(image_files(cache.path(), old).iter().all(|f| !f.exists()));
    assert!(image_files(cache.path(), fresh).iter().all(|f| f.is_file()));
    assert!(image_files(cache.path(), pinned)
        .iter()
        .all(|f| f.is_file()));

    // The daemon applies retention when it starts, too.
    age(&image_files(cache.path(), fresh), Duration::from_secs(7200));
    let b = Berth::start_with_dir(
        cache.path(),
        &["--upstream", &up, "--pin", pin, "--retention", "1h"],
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while image_files(cache.path(), fresh).iter().any(|f| f.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's retention did not run:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(image_files(cache.path(), pinned)
        .iter()
        .all(|f| f.is_file()));
}
