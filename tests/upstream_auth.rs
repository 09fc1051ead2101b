//! berth against a token-auth origin (distribution with `auth.token` and the
//! test suite's token server): anonymous pulls of public repositories,
//! credentialed pulls of private ones, tokens reused per scope, and no secret
//! in berth's logs.

mod common;

use common::berth::Berth;
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, MediaKind, RegistryClient};
use common::token::{start_token_origin, TokenPolicy, TokenServer};
use common::tools::{self, dead_port};

const PASSWORD: &str = "s3cret-robot-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_origin_public_and_private_repositories() {
    if !tools::require("docker-registry") || !tools::require("containerd") {
        return;
    }
    let tokens = TokenServer::start(
        TokenPolicy::new()
            .public("library/public")
            .credentials("robot", PASSWORD),
    );
    let origin = start_token_origin(&tokens).await;
    let public = content::build_image(21, 2, 16 * 1024, MediaKind::Oci, "amd64");
    let private = content::build_image(22, 3, 16 * 1024, MediaKind::Docker, "amd64");
    content::push_image_auth(
        &origin.url(),
        "library/public",
        "1",
        &public,
        Some(tokens.push_authorization("library/public")),
    )
    .await
    .unwrap();
    content::push_image_auth(
        &origin.url(),
        "team/private",
        "1",
        &private,
        Some(tokens.push_authorization("team/private")),
    )
    .await
    .unwrap();

    // docker.io has credentials; ghcr.io mirrors the same origin anonymously.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "[registries.\"docker.io\"]\nurl = \"{0}\"\nusername = \"robot\"\npassword = \"{PASSWORD}\"\n\n\
             [registries.\"ghcr.io\"]\nurl = \"{0}\"\n",
            origin.url()
        ),
    )
    .unwrap();
    let berth = Berth::start(&["--config", cfg.to_str().unwrap()]).await;
    let via = RegistryClient::new(&berth.url());
    let before = tokens.token_requests();

    // Private repository with credentials: manifest and every blob.
    let m = via
        .get_manifest("docker.io/team/private", "1")
        .await
        .unwrap();
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.bytes));
    assert_eq!(m.bytes, private.manifest_bytes);
    for b in private.blobs() {
        assert_eq!(
            via.get_blob("docker.io/team/private", &b.digest)
                .await
                .unwrap(),
            b.bytes
        );
    }
    let used = tokens.token_requests() - before;
    assert!(
        used <= 2,
        "one token per scope, reused across requests: {used} token requests"
    );
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.user.as_deref() == Some("robot")),
        "credentials were used"
    );

    // Public repository through the anonymous registry entry.
    let m = via
        .get_manifest("ghcr.io/library/public", "1")
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.bytes, public.manifest_bytes);
    // Private repository without credentials: refused, in the OCI envelope.
    let http = tools::http_client();
    let r = http
        .get(format!(
            "{}/v2/ghcr.io/team/private/manifests/1",
            berth.url()
        ))
        .header("Accept", content::ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");

    // containerd pulls the private image through berth, which holds the
    // credentials (containerd would not send pull secrets to a mirror).
    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(
        hosts.path(),
        "docker.io",
        &berth.url(),
        &format!("http://127.0.0.1:{}", dead_port()),
    );
    ctd.pull_async("auth", "docker.io/team/private:1", hosts.path(), &[])
        .await
        .assert_success();

    let log = berth.log();
    assert!(!log.contains(PASSWORD), "the password reached berth's log");
    let token = tokens.issue("robot", &[("team/private", &["pull"])]);
    let sig = token.rsplit('.').next().unwrap();
    assert!(!log.contains(sig), "a token reached berth's log");
}
