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
