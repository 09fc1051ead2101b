//! Hardening (issue #12) through the real `berth serve` binary: a log
//! written to a file carries no terminal colour codes.

mod common;

use common::berth::Berth;
use common::tools::{self, dead_port};

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
