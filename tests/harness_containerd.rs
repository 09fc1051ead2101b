//! Self-tests of the containerd and token-server harness pieces against the
//! real tools (docker-registry 2.8, containerd/ctr 1.6), without berth.

mod common;

use std::time::Duration;

use common::containerd::{ns_param, write_hosts_toml, Containerd};
use common::content::{self, MediaKind, RegistryClient};
use common::origin::Origin;
use common::token::{basic_auth, start_token_origin, TokenPolicy, TokenServer};
use common::tools::{self, dead_port, http_client};

fn dead_url() -> String {
    format!("http://127.0.0.1:{}", dead_port())
}

fn have_tools() -> bool {
    Containerd::available() && tools::require("docker-registry")
}

/// containerd pulls `docker.io/library/hello:1` through a hosts.toml whose
/// only live host is the mirror, and tags every request with `?ns=docker.io`.
#[tokio::test]
async fn containerd_pulls_through_mirror_with_ns_param() {
    if !have_tools() {
        return;
    }
    let origin = Origin::start().await;
    let image = content::build_image(11, 2, 4096, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/hello", "1", &image)
        .await
        .unwrap();

    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), "docker.io", &origin.url(), &dead_url());

    let out = ctd.pull("t1", "docker.io/library/hello:1", hosts.path(), &[]);
    out.assert_success();
    let requests = out.requests();
    let blobs = image.blobs().count();
    assert_eq!(
        requests.len(),
        2 + blobs,
        "HEAD + GET manifest + blobs: {out}"
    );
    assert_eq!(requests[0].method, "HEAD");
    for r in &requests {
        assert!(
            r.url
                .starts_with(&format!("{}/v2/library/hello/", origin.url())),
            "{r:?}"
        );
        assert!(r.url.ends_with("?ns=docker.io"), "{r:?}");
    }
    assert!(
        origin
            .log()
            .contains("/v2/library/hello/manifests/1?ns=docker.io"),
        "origin access log lacks ?ns=: {}",
        origin.log()
    );
    assert_eq!(
        ctd.image_digest("t1", "docker.io/library/hello:1")
            .as_deref(),
        Some(image.manifest_digest.as_str())
    );
    let stored = ctd.list_content("t1");
    for blob in image.blobs() {
        assert!(stored.contains(&blob.digest), "{} missing", blob.digest);
    }
    assert!(stored.contains(&image.manifest_digest));

    // Namespaces do not share content: a second namespace fetches again.
    let again = ctd
        .pull_async("t2", "docker.io/library/hello:1", hosts.path(), &[])
        .await;
    again.assert_success();
    assert_eq!(again.requests().len(), 2 + blobs, "{again}");
}

/// `--platform` passes through, and only that platform's blobs are fetched.
#[tokio::test]
async fn containerd_pulls_one_platform_of_an_index() {
    if !have_tools() {
        return;
    }
    let origin = Origin::start().await;
    let amd = content::build_image(21, 1, 1024, MediaKind::Docker, "amd64");
    let arm = content::build_image(22, 1, 1024, MediaKind::Docker, "arm64");
    let index = content::push_index(
        &origin.url(),
        "team/multi",
        "v1",
        &[("amd64", amd.clone()), ("arm64", arm.clone())],
        MediaKind::Docker,
    )
    .await
    .unwrap();

    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(
        hosts.path(),
        "registry.example.com:5000",
        &origin.url(),
        &dead_url(),
    );
    let reference = "registry.example.com:5000/team/multi:v1";
    let out = ctd.pull(
        "arm",
        reference,
        hosts.path(),
        &["--platform", "linux/arm64"],
    );
    out.assert_success();
    // containerd percent-encodes the port's colon: `?ns=registry.example.com%3A5000`.
    let urls = out.requested_urls();
    assert!(
        urls.iter()
            .all(|u| ns_param(u).as_deref() == Some("registry.example.com:5000")),
        "{urls:?}"
    );
    assert!(
        urls[0].ends_with("?ns=registry.example.com%3A5000"),
        "{urls:?}"
    );
    let stored = ctd.list_content("arm");
    assert!(stored.contains(&index.manifest_digest));
    assert!(stored.contains(&arm.layers[0].digest));
    assert!(!stored.contains(&amd.layers[0].digest));
    assert_eq!(
        ctd.image_digest("arm", reference),
        Some(index.manifest_digest)
    );
}

/// With mirror and server both dead the pull fails fast and leaves loopback
/// never (both hosts refused, nothing else tried).
#[tokio::test]
async fn containerd_pull_fails_fast_when_all_hosts_are_dead() {
    if !Containerd::available() {
        return;
    }
    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    let (mirror, server) = (dead_url(), dead_url());
    write_hosts_toml(hosts.path(), "docker.io", &mirror, &server);
    let out = ctd.pull("t", "docker.io/library/hello:1", hosts.path(), &[]);
    out.assert_failure();
    assert!(!out.timed_out);
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
    let urls = out.requested_urls();
    assert_eq!(urls.len(), 2, "{out}");
    assert!(urls[0].starts_with(&mirror), "{urls:?}");
    assert!(urls[1].starts_with(&server), "{urls:?}");
    assert!(out.stderr.contains("connection refused"), "{out}");
}

/// A Helm chart cannot be unpacked, but `ctr content fetch` stores it.
#[tokio::test]
async fn containerd_content_fetch_of_a_helm_chart() {
    if !have_tools() {
        return;
    }
    let origin = Origin::start().await;
    let chart = content::push_helm_chart(&origin.url(), "charts/mychart", "0.1.0")
        .await
        .unwrap();
    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), "ghcr.io", &origin.url(), &dead_url());
    let out = ctd
        .content_fetch_async("helm", "ghcr.io/charts/mychart:0.1.0", hosts.path(), &[])
        .await;
    out.assert_success();
    assert!(out
        .requested_urls()
        .iter()
        .all(|u| u.ends_with("?ns=ghcr.io")));
    let stored = ctd.list_content("helm");
    assert!(stored.contains(&chart.manifest_digest));
    for blob in chart.blobs() {
        assert!(stored.contains(&blob.digest), "{} missing", blob.digest);
    }
}

async fn get_token(
    ts: &TokenServer,
    scope: &str,
    auth: Option<String>,
) -> (u16, serde_json::Value) {
    let mut req = http_client()
        .get(ts.realm())
        .query(&[("service", ts.service()), ("scope", scope)]);
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn bearer(body: &serde_json::Value) -> String {
    format!("Bearer {}", body["token"].as_str().expect("token"))
}

/// distribution 2.8 accepts the token server's JWTs, and the policy holds.
#[tokio::test]
async fn token_server_drives_distribution_token_auth() {
    if !tools::require("docker-registry") {
        return;
    }
    let ts = TokenServer::start(TokenPolicy::new().public("public/app").expires_in(120));
    let origin = start_token_origin(&ts).await;
    let image = content::build_image(31, 1, 1024, MediaKind::Oci, "amd64");
    for repo in ["public/app", "private/app"] {
        content::push_image_auth(
            &origin.url(),
            repo,
            "1",
            &image,
            Some(ts.push_authorization(repo)),
        )
        .await
        .unwrap();
    }
    // Pushing without a token is refused.
    assert!(
        content::push_image(&origin.url(), "private/other", "1", &image)
            .await
            .is_err()
    );
    assert_eq!(ts.token_requests(), 0, "push tokens are minted directly");

    // Anonymous manifest GET: 401 with the Bearer challenge.
    let resp = http_client()
        .get(format!("{}/v2/private/app/manifests/1", origin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}\",service=\"{}\",scope=\"repository:private/app:pull\"",
            ts.realm(),
            ts.service()
        )
    );

    let anon_public = RegistryClient::new(&origin.url());
    // Anonymous token for the public repository works.
    let (status, body) = get_token(&ts, "repository:public/app:pull", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 120);
    assert_eq!(body["token"], body["access_token"]);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'));
    let fetched = anon_public
        .clone()
        .with_auth(Some(bearer(&body)))
        .get_manifest("public/app", "1")
        .await
        .unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(
        fetched.docker_content_digest.as_deref(),
        Some(image.manifest_digest.as_str())
    );

    // Anonymous token for the private repository carries no access.
    let (status, body) = get_token(&ts, "repository:private/app:pull", None).await;
    assert_eq!(status, 200);
    let fetched = anon_public
        .clone()
        .with_auth(Some(bearer(&body)))
        .get_manifest("private/app", "1")
        .await
        .unwrap();
    assert_eq!(fetched.status, 401);

    // Credentialed token for the private repository works.
    let (status, body) = get_token(&ts, "repository:private/app:pull", Some(ts.basic_auth())).await;
    assert_eq!(status, 200);
    let authed = RegistryClient::new(&origin.url()).with_auth(Some(bearer(&body)));
    assert_eq!(
        authed
            .get_manifest("private/app", "1")
            .await
            .unwrap()
            .status,
        200
    );
    let blob = authed
        .get_blob("private/app", &image.layers[0].digest)
        .await
        .unwrap();
    assert_eq!(blob, image.layers[0].bytes);

    // The OAuth2 password grant (containerd's POST) works too.
    let (user, pass) = ts.credentials();
    let resp = http_client()
        .post(ts.realm())
        .form(&[
            ("grant_type", "password"),
            ("username", user),
            ("password", pass),
            ("service", ts.service()),
            ("scope", "repository:private/app:pull"),
            ("client_id", "containerd-client"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let authed = RegistryClient::new(&origin.url()).with_auth(Some(bearer(&body)));
    assert_eq!(
        authed
            .get_manifest("private/app", "1")
            .await
            .unwrap()
            .status,
        200
    );

    // A wrong password gets 401 from the token server itself.
    let (status, _) = get_token(
        &ts,
        "repository:private/app:pull",
        Some(basic_auth(user, "wrong")),
    )
    .await;
    assert_eq!(status, 401);

    let log = ts.requests();
    assert_eq!(ts.token_requests(), 5);
    assert_eq!(log.len(), 5);
    assert_eq!(log[0].user, None);
    assert_eq!(log[2].user.as_deref(), Some(user));
    assert_eq!(log[3].method, "POST");
    assert_eq!(log[3].client_id.as_deref(), Some("containerd-client"));
    assert_eq!(log[4].status, 401);
    assert!(log
        .iter()
        .all(|r| r.service.as_deref() == Some(ts.service())));
}

/// containerd itself completes the anonymous token dance against the
/// token-auth origin used as a mirror.
#[tokio::test]
async fn containerd_pulls_public_repo_from_token_origin() {
    if !have_tools() {
        return;
    }
    let ts = TokenServer::start(TokenPolicy::new().public("library/hello"));
    let origin = start_token_origin(&ts).await;
    let image = content::build_image(41, 1, 1024, MediaKind::Oci, "amd64");
    for repo in ["library/hello", "library/secret"] {
        content::push_image_auth(
            &origin.url(),
            repo,
            "1",
            &image,
            Some(ts.push_authorization(repo)),
        )
        .await
        .unwrap();
    }
    let ctd = Containerd::start();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(hosts.path(), "docker.io", &origin.url(), &dead_url());

    let out = ctd.pull("t", "docker.io/library/hello:1", hosts.path(), &[]);
    out.assert_success();
    assert!(ts.token_requests() >= 1);
    let first = &ts.requests()[0];
    assert_eq!(first.method, "GET");
    assert_eq!(first.user, None);
    assert_eq!(
        first.scopes,
        vec!["repository:library/hello:pull".to_owned()]
    );

    let before = ts.token_requests();
    let out = ctd.pull("t", "docker.io/library/secret:1", hosts.path(), &[]);
    out.assert_failure();
    assert!(ts.token_requests() > before);

    // With credentials ctr uses the OAuth POST and gets in.
    let (user, pass) = ts.credentials();
    let creds = format!("{user}:{pass}");
    let out = ctd.pull(
        "t",
        "docker.io/library/secret:1",
        hosts.path(),
        &["--user", &creds],
    );
    out.assert_success();
    let last = ts.requests().pop().unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(last.user.as_deref(), Some(user));
}
