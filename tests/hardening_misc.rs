//! Hardening (issue #12) through the real `berth serve` binary: a log
//! written to a file carries no terminal colour codes; `/readyz` answers
//! 503 from the start of shutdown while in-flight requests drain; pins
//! written the Docker way (`nginx`, `docker.io/nginx:1.27`) protect
//! `docker.io/library/nginx`.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::tools::{self, dead_port, free_port};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_to_a_file_has_no_colour_codes() {
    // The harness sends berth's stderr to a file, as systemd or a container
    // runtime would; the dead upstream makes warnings with error fields.
    let up = format!("docker.io=http://127.0.0.1:{}", dead_port());
    let berth = Berth::start(&["--upstream", &up]).await;
    let http = tools::http_client();
    for path in [
        "/v2/",
        "/readyz",
        "/metrics",
        "/v2/library/nginx/manifests/latest",
        "/v2/library/nginx/blobs/sha256:nope",
        "/v2/../../etc/passwd",
    ] {
        http.get(format!("{}{path}", berth.url()))
            .send()
            .await
            .expect(path);
    }
    let log = berth.log();
    assert!(
        log.contains("berth ready") && log.contains("request"),
        "expected startup and access log lines:\n{log}"
    );
    let escapes = log.matches("\x1b[").count();
    assert_eq!(escapes, 0, "colour codes in a log file:\n{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_shutdown_drains_in_flight_requests() {
    // An upstream that accepts connections and never answers keeps one
    // request in flight, so the drain after SIGTERM lasts.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
            let _ = accepted_tx.send(()).await;
        }
    });
    let up = format!("docker.io=http://{silent_addr}");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let berth = Berth::start(&[
        "--upstream",
        &up,
        "--read-timeout",
        "60s",
        "--metrics-listen",
        &metrics_addr,
    ])
    .await;
    let probe = format!("http://{metrics_addr}");
    let http = tools::http_client();
    let status = |url: String| {
        let http = http.clone();
        async move {
            http.get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        }
    };
    assert_eq!(status(format!("{probe}/readyz")).await, Ok(200));
    assert_eq!(status(format!("{}/readyz", berth.url())).await, Ok(200));

    let slow = tokio::spawn(status(format!(
        "{}/v2/library/slow/manifests/latest",
        berth.url()
    )));
    tokio::time::timeout(Duration::from_secs(10), accepted.recv())
        .await
        .expect("berth asked the upstream")
        .unwrap();

    kill(Pid::from_raw(berth.pid() as i32), Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = status(format!("{probe}/readyz")).await;
        if s == Ok(503) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz during the drain: {s:?}\n{}",
            berth.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!slow.is_finished(), "the request is still being drained");
    assert_eq!(
        status(format!("{probe}/livez")).await,
        Ok(200),
        "alive while draining"
    );
    assert!(berth.log().contains("shutting down"));
}

/// Set the modification time (berth's "last used") of `files` back by `by`.
fn age(files: &[std::path::PathBuf], by: Duration) {
    let t = std::time::SystemTime::now() - by;
    for f in files {
        let file = std::fs::File::options().write(true).open(f).unwrap();
        file.set_modified(t).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_written_the_docker_way_protect_library_images_from_retention() {
    use common::berth::{blob_path, output_text, run_cli};
    use common::content::{self, MediaKind, RegistryClient};
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let origin = common::origin::Origin::start().await;
    let nginx = content::build_image(900, 2, 16 * 1024, MediaKind::Oci, "amd64");
    let other = content::build_image(901, 2, 16 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/nginx", "1.27", &nginx)
        .await
        .unwrap();
    content::push_image(&origin.url(), "library/other", "1", &other)
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let up = format!("docker.io={}", origin.url());
    let b = Berth::start_with_dir(cache.path(), &["--upstream", &up]).await;
    let client = RegistryClient::new(&b.url());
    for (repo, tag, img) in [
        ("library/nginx", "1.27", &nginx),
        ("library/other", "1", &other),
    ] {
        client.get_manifest(repo, tag).await.unwrap();
        for blob in img.blobs() {
            client.get_blob(repo, &blob.digest).await.unwrap();
        }
    }
    b.stop();
    let files = |img: &content::Image| -> Vec<_> {
        img.blobs()
            .map(|bl| blob_path(cache.path(), &bl.digest))
            .collect()
    };
    age(&files(&nginx), Duration::from_secs(7200));
    age(&files(&other), Duration::from_secs(7200));

    // `berth gc --dry-run` with each way of writing the pin: nginx is kept.
    for pin in ["nginx", "docker.io/nginx:1.27", "index.docker.io/nginx"] {
        let out = run_cli(
            &[
                "gc",
                "--dry-run",
                "--retention",
                "1h",
                "--pin",
                pin,
                "--cache-dir",
                dir,
            ],
            "warn",
        )
        .await;
        assert!(out.status.success(), "{}", output_text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("would remove {}", other.layers[0].digest)),
            "{pin}: {stdout}"
        );
        for blob in nginx.blobs() {
            assert!(!stdout.contains(&blob.digest), "{pin} pins nginx: {stdout}");
        }
    }

    // The daemon's retention at start, with the pin as users write it.
    let b = Berth::start_with_dir(
        cache.path(),
        &["--upstream", &up, "--pin", "nginx", "--retention", "1h"],
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while files(&other).iter().any(|f| f.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's retention did not run:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        files(&nginx).iter().all(|f| f.is_file()),
        "`--pin nginx` keeps docker.io/library/nginx"
    );
}
