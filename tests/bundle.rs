//! Air-gap bundles and cache maintenance with real components: a cache
//! filled through berth from a real distribution origin is exported with
//! `berth export`, read by skopeo (`oci-archive:`), imported into an empty
//! cache with `berth import` and served by a berth whose upstream is dead
//! (to `RegistryClient` and to containerd); archives made by skopeo import
//! too; a corrupted archive publishes nothing; `berth verify` quarantines a
//! corrupt blob; import/verify/gc/prefetch refuse a cache a daemon holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::berth::{output_text, run_cli, Berth};
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, Image, Index, MediaKind, RegistryClient};
use common::origin::Origin;
use common::skopeo::{run_skopeo, verify_oci_layout};
use common::tools::{self, dead_port};
use serde_json::Value;

/// `berth <args>` to completion, logging at warn.
async fn berth(args: &[&str]) -> Output {
    run_cli(args, "warn").await
}

const KIB: usize = 1024;

fn dead_upstream() -> String {
    format!("docker.io=http://127.0.0.1:{}", dead_port())
}

/// Every file under `dir` (recursively), relative.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// Pull a tag (every platform of an index) through a registry client.
async fn pull_all(client: &RegistryClient, repo: &str, tag: &str) -> String {
    let m = client.get_manifest(repo, tag).await.unwrap();
    assert_eq!(m.status, 200, "{repo}:{tag}: {:?}", m);
    let v: Value = serde_json::from_slice(&m.bytes).unwrap();
    let mut manifests = vec![v.clone()];
    if let Some(kids) = v["manifests"].as_array() {
        for k in kids {
            let d = k["digest"].as_str().unwrap();
            let c = client.get_manifest(repo, d).await.unwrap();
            assert_eq!(c.status, 200);
            manifests.push(serde_json::from_slice(&c.bytes).unwrap());
        }
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
            let bytes = client.get_blob(repo, d).await.unwrap();
            assert_eq!(content::digest_of(&bytes), d);
        }
    }
    m.docker_content_digest.unwrap()
}

/// An origin with `library/app:1.0` (OCI image), `library/multi:2` (OCI
/// index, amd64 + arm64) and `library/dock:1` (Docker schema 2), and a
/// stopped berth's cache holding all three.
struct Populated {
    origin: Origin,
    cache: tempfile::TempDir,
    app: Image,
    multi: Index,
    dock: Image,
}

async fn populated() -> Populated {
    let origin = Origin::start().await;
    let app = content::build_image(101, 2, 96 * KIB, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/app", "1.0", &app)
        .await
        .unwrap();
    let multi = content::push_index(
        &origin.url(),
        "library/multi",
        "2",
        &[
            (
                "amd64",
                content::build_image(102, 2, 64 * KIB, MediaKind::Oci, "amd64"),
            ),
            (
                "arm64",
                content::build_image(103, 1, 64 * KIB, MediaKind::Oci, "arm64"),
            ),
        ],
        MediaKind::Oci,
    )
    .await
    .unwrap();
    let dock = content::build_image(104, 1, 32 * KIB, MediaKind::Docker, "amd64");
    content::push_image(&origin.url(), "library/dock", "1", &dock)
        .await
        .unwrap();
    let cache = tempfile::Builder::new()
        .prefix("berth-bundle-")
        .tempdir()
        .unwrap();
    let up = format!("docker.io={}", origin.url());
    let b = Berth::start_with_dir(cache.path(), &["--upstream", &up]).await;
    let client = RegistryClient::new(&b.url());
    assert_eq!(
        pull_all(&client, "library/app", "1.0").await,
        app.manifest_digest
    );
    assert_eq!(
        pull_all(&client, "library/multi", "2").await,
        multi.manifest_digest
    );
    assert_eq!(
        pull_all(&client, "library/dock", "1").await,
        dock.manifest_digest
    );
    b.stop();
    Populated {
        origin,
        cache,
        app,
        multi,
        dock,
    }
}

fn dir_arg(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// The `index.json` of an OCI layout tar.
fn archive_index(tar_path: &Path) -> Value {
    let mut a = tar::Archive::new(std::fs::File::open(tar_path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy().trim_start_matches("./") == "index.json" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            return serde_json::from_str(&s).unwrap();
        }
    }
    panic!("no index.json in {}", tar_path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_skopeo_import_and_serve_offline() {
    if !tools::require_all(&["docker-registry", "skopeo"]) {
        return;
    }
    let p = populated().await;
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle.tar");
    let cache = dir_arg(p.cache.path());

    let ls = berth(&["ls", "--json", "--cache-dir", &cache]).await;
    assert!(ls.status.success(), "{}", output_text(&ls));
    let listed: Vec<Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|e| e["complete"] == "yes"), "{listed:?}");

    let out = berth(&[
        "export",
        "docker.io/library/app:1.0",
        "library/multi:2",
        "dock:1",
        "-o",
        bundle.to_str().unwrap(),
        "--cache-dir",
        &cache,
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let index = archive_index(&bundle);
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(names, ["1.0", "2", "1"]);

    // skopeo reads it.
    let archive = |tag: &str| format!("oci-archive:{}:{tag}", bundle.display());
    let inspected: Value =
        serde_json::from_str(&run_skopeo(&["inspect", &archive("1.0")]).await.unwrap()).unwrap();
    assert_eq!(inspected["Digest"], p.app.manifest_digest.as_str());
    let raw = run_skopeo(&["inspect", "--raw", &archive("2")])
        .await
        .unwrap();
    assert_eq!(raw.as_bytes(), &p.multi.manifest_bytes[..]);
    let layout = work.path().join("layout");
    run_skopeo(&[
        "copy",
        &archive("1.0"),
        &format!("oci:{}:copied", layout.display()),
    ])
    .await
    .unwrap();
    assert!(verify_oci_layout(&layout).unwrap() >= 3);

    // A new node: import into an empty cache, serve with no upstream.
    let node = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        bundle.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(node.path()),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tagged docker.io/library/app:1.0 -> ")
            && stdout.contains("tagged docker.io/library/multi:2 -> "),
        "{stdout}"
    );
    let dead = dead_upstream();
    let offline = Berth::start_with_dir(node.path(), &["--upstream", &dead]).await;
    let client = RegistryClient::new(&offline.url());
    assert_eq!(
        pull_all(&client, "library/app", "1.0").await,
        p.app.manifest_digest
    );
    assert_eq!(
        pull_all(&client, "library/multi", "2").await,
        p.multi.manifest_digest
    );
    assert_eq!(
        pull_all(&client, "library/dock", "1").await,
        p.dock.manifest_digest
    );
    let m = client.get_manifest("library/dock", "1").await.unwrap();
    assert_eq!(
        m.content_type.as_deref(),
        Some(content::DOCKER_MANIFEST),
        "media types survive the round trip"
    );

    // containerd on the new node pulls by tag and by digest, and unpacks.
    if Containerd::available() {
        let ctd = Containerd::start();
        let hosts = tempfile::tempdir().unwrap();
        let dead_server = format!("http://127.0.0.1:{}", dead_port());
        write_hosts_toml(hosts.path(), "docker.io", &offline.url(), &dead_server);
        ctd.pull_async("bundle", "docker.io/library/app:1.0", hosts.path(), &[])
            .await
            .assert_success();
        let by_digest = format!("docker.io/library/multi@{}", p.multi.manifest_digest);
        ctd.pull_async(
            "bundle",
            &by_digest,
            hosts.path(),
            &["--platform", "linux/amd64"],
        )
        .await
        .assert_success();
    }
    drop(offline);

    // One platform only: the index keeps its digest; ls says partial.
    let one = work.path().join("amd64.tar");
    let out = berth(&[
        "export",
        "library/multi:2",
        "--platform",
        "linux/amd64",
        "-o",
        one.to_str().unwrap(),
        "--cache-dir",
        &cache,
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let partial = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        one.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(partial.path()),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("linux/arm64"));
    let ls = berth(&["ls", "--json", "--cache-dir", &dir_arg(partial.path())]).await;
    let listed: Vec<Value> = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(listed[0]["digest"], p.multi.manifest_digest.as_str());
    assert_eq!(listed[0]["platforms"], serde_json::json!(["linux/amd64"]));
    assert_eq!(
        listed[0]["missing_platforms"],
        serde_json::json!(["linux/arm64/v8"])
    );
    assert_eq!(listed[0]["complete"], "partial");

    // Something not cached is named in the error.
    let out = berth(&[
        "export",
        "library/nothere:1",
        "-o",
        work.path().join("x.tar").to_str().unwrap(),
        "--cache-dir",
        &cache,
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("docker.io/library/nothere:1"),
        "{}",
        output_text(&out)
    );
    assert!(!work.path().join("x.tar").exists());
    assert!(!work.path().join("x.tar.partial").exists());
    drop(p.origin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_blobs_make_export_fail_naming_them() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let p = populated().await;
    let layer = &p.app.layers[1].digest;
    let hex = layer.strip_prefix("sha256:").unwrap();
    std::fs::remove_file(
        p.cache
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex),
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out_path = work.path().join("b.tar");
    let out = berth(&[
        "export",
        "library/app:1.0",
        "-o",
        out_path.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(p.cache.path()),
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(layer.as_str()) && err.contains("missing"),
        "{err}"
    );
    assert!(!out_path.exists());
    let ls = berth(&["ls", "--json", "--cache-dir", &dir_arg(p.cache.path())]).await;
    let listed: Vec<Value> = serde_json::from_slice(&ls.stdout).unwrap();
    let app = listed
        .iter()
        .find(|e| e["image"] == "docker.io/library/app:1.0")
        .unwrap();
    assert_eq!(app["complete"], "no");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_made_archives_import() {
    if !tools::require_all(&["docker-registry", "skopeo"]) {
        return;
    }
    let origin = Origin::start().await;
    let img = content::build_image(111, 2, 80 * KIB, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/sk", "1", &img)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = format!("docker://{}/library/sk:1", origin.host());
    let full = work.path().join("full.tar");
    let bare = work.path().join("bare.tar");
    for (tar, name) in [(&full, "library/sk:1"), (&bare, "1")] {
        run_skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &src,
            &format!("oci-archive:{}:{name}", tar.display()),
        ])
        .await
        .unwrap();
    }
    let archived = archive_index(&full)["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        archived, img.manifest_digest,
        "an OCI image is copied as is"
    );

    // A ref name with the repository.
    let a = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        full.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(a.path()),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));

    // A bare tag needs --repo; refused without it, and nothing is published.
    let b = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        bare.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(b.path()),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--repo"),
        "{}",
        output_text(&out)
    );
    assert!(files(&b.path().join("blobs")).is_empty());
    assert!(files(&b.path().join("tmp")).is_empty());
    let out = berth(&[
        "import",
        bare.to_str().unwrap(),
        "--repo",
        "library/sk",
        "--registry",
        "docker.io",
        "--cache-dir",
        &dir_arg(b.path()),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    drop(origin);

    let dead = dead_upstream();
    for dir in [a.path(), b.path()] {
        let offline = Berth::start_with_dir(dir, &["--upstream", &dead]).await;
        let client = RegistryClient::new(&offline.url());
        assert_eq!(pull_all(&client, "library/sk", "1").await, archived);
        for blob in img.blobs() {
            assert_eq!(
                client.get_blob("library/sk", &blob.digest).await.unwrap(),
                blob.bytes
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_archive_is_refused_and_nothing_is_published() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let p = populated().await;
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle.tar");
    let out = berth(&[
        "export",
        "library/app:1.0",
        "-o",
        bundle.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(p.cache.path()),
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    // Flip one byte in the middle of the last layer's data.
    let target = format!(
        "blobs/sha256/{}",
        p.app.layers[1].digest.strip_prefix("sha256:").unwrap()
    );
    let mut pos = None;
    let mut a = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == target {
            pos = Some(e.raw_file_position() + e.size() / 2);
        }
    }
    let pos = pos.expect("layer in the archive") as usize;
    let mut bytes = std::fs::read(&bundle).unwrap();
    bytes[pos] ^= 0x5a;
    std::fs::write(&bundle, bytes).unwrap();

    let node = tempfile::tempdir().unwrap();
    let out = berth(&[
        "import",
        bundle.to_str().unwrap(),
        "--cache-dir",
        &dir_arg(node.path()),
    ])
    .await;
    assert!(!out.status.success(), "{}", output_text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match its digest") && err.contains("nothing was imported"),
        "{err}"
    );
    for sub in ["blobs", "manifests", "tags", "tmp"] {
        assert!(
            files(&node.path().join(sub)).is_empty(),
            "{sub}: {:?}",
            files(&node.path().join(sub))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_quarantines_a_corrupt_blob_and_the_next_pull_heals_it() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let p = populated().await;
    let cache = dir_arg(p.cache.path());
    let layer = &p.app.layers[0];
    let hex = layer.digest.strip_prefix("sha256:").unwrap();
    let path = p
        .cache
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(p.cache.path().join("tmp/leftover-1"), b"partial").unwrap();

    let out = berth(&["verify", "--cache-dir", &cache]).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("CORRUPT sha256:{hex}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("removed leftover temporary file tmp/leftover-1"),
        "{stdout}"
    );
    assert!(p.cache.path().join("quarantine").join(hex).is_file());
    assert!(!path.exists());
    assert!(files(&p.cache.path().join("tmp")).is_empty());
    let out = berth(&["verify", "--cache-dir", &cache]).await;
    assert!(out.status.success(), "{}", output_text(&out));

    // The next pull fetches the blob again, intact.
    let up = format!("docker.io={}", p.origin.url());
    let b = Berth::start_with_dir(p.cache.path(), &["--upstream", &up]).await;
    let client = RegistryClient::new(&b.url());
    assert_eq!(
        client.get_blob("library/app", &layer.digest).await.unwrap(),
        layer.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_refuse_a_cache_a_daemon_holds() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let p = populated().await;
    let cache = dir_arg(p.cache.path());
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("b.tar");
    // Export and ls only read: they work beside the daemon.
    let up = format!("docker.io={}", p.origin.url());
    let daemon = Berth::start_with_dir(p.cache.path(), &["--upstream", &up]).await;
    let out = berth(&["ls", "--cache-dir", &cache]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("docker.io/library/app:1.0"));
    let out = berth(&[
        "export",
        "library/app:1.0",
        "-o",
        bundle.to_str().unwrap(),
        "--cache-dir",
        &cache,
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));

    let refusals: [&[&str]; 4] = [
        &["import", bundle.to_str().unwrap(), "--cache-dir", &cache],
        &["verify", "--cache-dir", &cache],
        &["gc", "--retention", "1s", "--cache-dir", &cache],
        &[
            "prefetch",
            "--prefetch",
            "library/app:1.0",
            "--upstream",
            &up,
            "--cache-dir",
            &cache,
        ],
    ];
    for args in refusals {
        let out = berth(args).await;
        assert_eq!(
            out.status.code(),
            Some(75),
            "{args:?}: {}",
            output_text(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use by a running berth"), "{args:?}: {err}");
    }
    let out = berth(refusals[3]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("on_start"));
    drop(daemon);
    let out = berth(&["verify", "--cache-dir", &cache]).await;
    assert!(out.status.success(), "{}", output_text(&out));
}
