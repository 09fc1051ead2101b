//! A full cache filesystem (a small tmpfs made by the test): berth keeps
//! serving what it has, serves misses straight from upstream without
//! caching (verified, never half-written), says so in logs and metrics, and
//! resumes caching by itself when space returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::berth::Berth;
use common::content::{self, MediaKind};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools::{self, http_client};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if std::env::var_os("CI").is_some() {
                panic!("cannot mount a tmpfs (the disk-full test needs root)");
            }
            eprintln!("SKIP: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn published(cache: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

async fn get(url: &str) -> Result<bytes::Bytes, String> {
    let r = http_client()
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    r.bytes().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn full_disk_passes_misses_through_and_recovers() {
    if !tools::require("docker-registry") {
        return;
    }
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    // Three incompressible ~2.5 MiB layers.
    let image = content::build_image(61, 3, 2_500_000, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/big", "1", &image)
        .await
        .unwrap();
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![7u8; 4 << 20]).unwrap();
    let cache = fs.path.join("cache");
    let up = format!("docker.io={}", proxy.url());
    let metrics = format!("127.0.0.1:{}", tools::free_port());
    // The configured capacity is larger than the filesystem: a misconfiguration berth must survive.
    let berth = Berth::start_with_dir(
        &cache,
        &[
            "--upstream",
            &up,
            "--cache-capacity",
            "1GiB",
            "--metrics-listen",
            &metrics,
        ],
    )
    .await;
    let blob = |i: usize| {
        format!(
            "{}/v2/library/big/blobs/{}",
            berth.url(),
            image.layers[i].digest
        )
    };

    // The first layer fits and is cached.
    assert_eq!(get(&blob(0)).await.unwrap(), image.layers[0].bytes);
    assert!(published(&cache, &image.layers[0].digest));
    // The second runs out of space while downloading: that response is
    // aborted (never a complete wrong or partial 200), nothing is published.
    let first_try = get(&blob(1)).await;
    assert!(
        first_try.is_err() || first_try.as_ref().unwrap() == &image.layers[1].bytes,
        "no partial body accepted"
    );
    assert!(!published(&cache, &image.layers[1].digest));
    // From now on misses are relayed, complete and verified, without caching.
    for _ in 0..2 {
        assert_eq!(get(&blob(1)).await.unwrap(), image.layers[1].bytes);
    }
    assert!(!published(&cache, &image.layers[1].digest));
    let tmp_left: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
    assert!(
        tmp_left.is_empty(),
        "no temporary files left behind: {tmp_left:?}"
    );
    // A Range request while full is relayed too.
    let r = http_client()
        .get(blob(1))
        .header("Range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.unwrap(),
        image.layers[1].bytes.slice(100..200)
    );
    // Cached content is still served without asking upstream.
    proxy.reset();
    assert_eq!(get(&blob(0)).await.unwrap(), image.layers[0].bytes);
    assert_eq!(proxy.blob_gets(), 0);
    let m = tools::metrics_text(&format!("http://{metrics}")).await;
    assert!(
        m.lines().any(|l| l == "berth_cache_full 1"),
        "exported: {}",
        m.lines()
            .filter(|l| l.contains("full"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(berth.log().contains("cache filesystem is full"));

    // Space returns: berth notices by itself and caches again.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert_eq!(get(&blob(2)).await.unwrap(), image.layers[2].bytes);
        if published(&cache, &image.layers[2].digest) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "caching never resumed:\n{}",
            berth.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(berth.log().contains("caching resumes"));
    let m = tools::metrics_text(&format!("http://{metrics}")).await;
    assert!(m.lines().any(|l| l == "berth_cache_full 0"));
    drop(berth);
}
