//! Upstream faults between berth and a real distribution origin, injected
//! by the test suite's `CountingProxy` (and, where the proxy cannot
//! misbehave the right way, by a small in-test registry): connections cut
//! mid-blob at any offset (resumed with `Range`, exact bytes, also from an
//! upstream that ignores `Range`); corrupted bytes (nothing published, the
//! next request refetches); stalled headers and bodies (a 5xx or an aborted
//! body within a bound, never a hang); a client giving up while an upstream
//! revalidation is slow (later requests still revalidate); resets, stalls
//! and garbage during the token exchange (a clear 5xx, then recovery); and
//! the SSRF guard on redirects into loopback, link-local, private, shared
//! and IPv4-mapped addresses, given literally or as a host name that
//! resolves there (berth's filtering resolver), with a proxy on a loopback
//! name still usable; credentials not sent along a redirect to another host.
//!
//! `ns=` naming an unconfigured registry (no upstream request at all) is
//! covered by tests/bad_input.rs.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::berth::{blob_path, settled, tmp_files, Berth};
use common::content::{self, Blob, Image, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::{CountingProxy, Record};
use common::token::{TokenPolicy, TokenServer};
use common::tools;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::task::JoinHandle;

const MIB: usize = 1 << 20;
/// Generous bound for anything that must not hang.
const PATIENCE: Duration = Duration::from_secs(30);
/// berth's upstream read timeout in the stall tests.
const READ_TIMEOUT: &str = "1s";

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An image whose layers are incompressible blobs of the given sizes.
fn image_of(seed: u64, sizes: &[usize]) -> Image {
    let layers = sizes
        .iter()
        .enumerate()
        .map(|(i, len)| {
            Blob::new(
                content::OCI_LAYER_GZIP,
                content::pseudo_random_bytes(seed * 1000 + i as u64, *len),
            )
        })
        .collect();
    let config = Blob::new(
        content::OCI_CONFIG,
        format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes(),
    );
    content::image_from_parts(
        MediaKind::Oci.manifest_type(),
        config,
        layers,
        "amd64",
        "linux",
        None,
    )
}

struct Env {
    origin: Origin,
    proxy: CountingProxy,
    berth: Berth,
    http: reqwest::Client,
}

/// origin <- counting proxy <- berth (docker.io), with extra berth args.
async fn setup(extra: &[&str]) -> Option<Env> {
    if !tools::require("docker-registry") {
        return None;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let up = format!("docker.io={}", proxy.url());
    let mut args = vec!["--upstream", up.as_str(), "--cache-capacity", "256MiB"];
    args.extend_from_slice(extra);
    let berth = Berth::start(&args).await;
    Some(Env {
        origin,
        proxy,
        berth,
        http: tools::http_client(),
    })
}

impl Env {
    async fn push(&self, repo: &str, image: &Image) {
        content::push_image(&self.origin.url(), repo, "1", image)
            .await
            .unwrap();
        self.proxy.reset();
    }

    fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}?ns=docker.io", self.berth.url())
    }

    /// Upstream blob GETs of one digest, oldest first.
    fn gets_of(&self, digest: &str) -> Vec<Record> {
        self.proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(digest))
            .collect()
    }
}

/// GET with an optional Range; (status, body or the body's error).
async fn fetch(
    http: &reqwest::Client,
    url: &str,
    range: Option<&str>,
) -> (u16, Result<Bytes, String>) {
    let mut rb = http.get(url);
    if let Some(r) = range {
        rb = rb.header(reqwest::header::RANGE, r);
    }
    let resp = rb.send().await.expect("berth answers");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.map_err(|e| e.to_string()))
}

fn range_of(r: &Record) -> Option<String> {
    r.req_headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_at_any_offset_are_resumed_with_range_and_clients_get_exact_bytes() {
    let Some(env) = setup(&[]).await else { return };
    let size = 3 * MIB + 7;
    let cuts: [u64; 6] = [
        0,
        1,
        65_536,
        MIB as u64,
        size as u64 / 2 + 3,
        size as u64 - 1,
    ];
    let image = image_of(1, &[size; 6]);
    env.push("library/cuts", &image).await;

    for (cut, layer) in cuts.iter().zip(&image.layers) {
        env.proxy.cut_blob_after_once(*cut);
        let url = env.blob_url("library/cuts", &layer.digest);
        // A whole-blob client and a resuming client (containerd's `bytes=N-`)
        // whose range starts before the cut.
        let from = cut / 2;
        let range = format!("bytes={from}-");
        let (whole, ranged) = tokio::join!(
            fetch(&env.http, &url, None),
            fetch(&env.http, &url, Some(&range))
        );
        assert_eq!(whole.0, 200, "cut at {cut}");
        let body = whole.1.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(
            content::digest_of(&body),
            layer.digest,
            "cut at {cut}: exact bytes"
        );
        assert_eq!(ranged.0, 206, "cut at {cut}");
        let part = ranged.1.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert!(
            part == layer.bytes[from as usize..],
            "cut at {cut}: exact range"
        );

        let gets = env.gets_of(&layer.digest);
        assert_eq!(
            gets.len(),
            2,
            "cut at {cut}: one GET and one resume: {gets:?}"
        );
        assert!(!gets[0].completed && gets[0].bytes == *cut, "{gets:?}");
        let expected = (*cut > 0).then(|| format!("bytes={cut}-"));
        assert_eq!(
            range_of(&gets[1]),
            expected,
            "cut at {cut}: resumed where it broke"
        );
        assert_eq!(
            gets[1].bytes,
            layer.size() - cut,
            "only the rest is fetched"
        );
        until("published", || {
            blob_path(env.berth.cache_dir(), &layer.digest).is_file()
        })
        .await;
    }

    // Two breaks in one download (MAX_RESUMES allows three).
    let twice = image_of(2, &[2 * MIB]);
    env.push("library/twice", &twice).await;
    let layer = &twice.layers[0];
    env.proxy.cut_blob_after_once(700_000);
    env.proxy.cut_blob_after_once(500_000);
    let (st, body) = fetch(
        &env.http,
        &env.blob_url("library/twice", &layer.digest),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(content::digest_of(&body.unwrap()), layer.digest);
    let ranges: Vec<Option<String>> = env.gets_of(&layer.digest).iter().map(range_of).collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=700000-".to_owned()),
            Some("bytes=1200000-".to_owned())
        ]
    );
    assert!(settled(env.berth.cache_dir()).await);
    assert_eq!(tmp_files(env.berth.cache_dir()).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_an_upstream_that_ignores_range_still_gets_exact_bytes() {
    let fake = Fake::start().await;
    let layer = Blob::new(
        content::OCI_LAYER_GZIP,
        content::pseudo_random_bytes(3, 2 * MIB + 11),
    );
    fake.add_blob(&layer);
    fake.ignore_range.store(true, Ordering::SeqCst);
    *fake.cut_once.lock().unwrap() = Some(1_000_003);
    let up = format!("fake.example={}", fake.url());
    let berth = Berth::start(&["--upstream", &up]).await;
    let url = format!(
        "{}/v2/fake.example/team/app/blobs/{}",
        berth.url(),
        layer.digest
    );
    let (st, body) = fetch(&tools::http_client(), &url, None).await;
    assert_eq!(st, 200);
    assert_eq!(
        content::digest_of(&body.unwrap()),
        layer.digest,
        "exact bytes"
    );
    let seen = fake.seen();
    let gets: Vec<&Seen> = seen.iter().filter(|s| s.method == "GET").collect();
    assert_eq!(gets.len(), 2, "{seen:?}");
    assert!(gets.iter().all(|g| g.path.ends_with(&layer.digest)));
    assert_eq!(gets[1].range.as_deref(), Some("bytes=1000003-"));
    assert_eq!(gets[1].status, 200, "the upstream ignored the Range");
    until("published", || {
        blob_path(berth.cache_dir(), &layer.digest).is_file()
    })
    .await;
    let on_disk = std::fs::read(blob_path(berth.cache_dir(), &layer.digest)).unwrap();
    assert_eq!(content::digest_of(&on_disk), layer.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_publish_nothing_and_the_next_request_refetches() {
    let Some(env) = setup(&[]).await else { return };
    let image = image_of(4, &[3 * MIB]);
    env.push("library/rotten", &image).await;
    let layer = &image.layers[0];
    let url = env.blob_url("library/rotten", &layer.digest);
    env.proxy.corrupt_blob(true);
    let (whole, resumed) = tokio::join!(
        fetch(&env.http, &url, None),
        fetch(&env.http, &url, Some("bytes=100-"))
    );
    for (what, (st, body)) in [("whole", whole), ("bytes=100-", resumed)] {
        assert!(st == 200 || st == 206 || st >= 500, "{what}: {st}");
        if let Ok(b) = body {
            assert!(
                st >= 500,
                "{what}: a complete body of {} bytes from a corrupt upstream",
                b.len()
            );
        }
    }
    until("the temporary file is removed", || {
        tmp_files(env.berth.cache_dir()).is_empty()
    })
    .await;
    assert!(
        !blob_path(env.berth.cache_dir(), &layer.digest).exists(),
        "a corrupt blob is never published"
    );
    let metrics = tools::metrics_text(&env.berth.url()).await;
    let mismatches: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_digest_mismatches_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("berth_digest_mismatches_total");
    assert!(mismatches >= 1.0, "{metrics}");

    env.proxy.corrupt_blob(false);
    env.proxy.reset();
    let (st, body) = fetch(&env.http, &url, None).await;
    assert_eq!(st, 200);
    assert_eq!(content::digest_of(&body.unwrap()), layer.digest);
    assert_eq!(env.gets_of(&layer.digest).len(), 1, "refetched");
    until("published", || {
        blob_path(env.berth.cache_dir(), &layer.digest).is_file()
    })
    .await;
    let on_disk = std::fs::read(blob_path(env.berth.cache_dir(), &layer.digest)).unwrap();
    assert_eq!(
        content::digest_of(&on_disk),
        layer.digest,
        "the published file hashes to its name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_manifest_is_refused_and_not_cached() {
    let fake = Fake::start().await;
    let image = image_of(5, &[1024]);
    fake.add_manifest("1", &image);
    fake.corrupt_manifests.store(true, Ordering::SeqCst);
    let up = format!("fake.example={}", fake.url());
    let berth = Berth::start(&["--upstream", &up]).await;
    let via = RegistryClient::new(&berth.url());
    for reference in ["1", image.manifest_digest.as_str()] {
        let m = via
            .get_manifest("fake.example/team/app", reference)
            .await
            .unwrap();
        assert_eq!(m.status, 502, "{reference}: {:?}", m.bytes);
        assert_eq!(tools::oci_code(&m.bytes), "UNKNOWN");
    }
    assert!(!blob_path(berth.cache_dir(), &image.manifest_digest).exists());
    fake.corrupt_manifests.store(false, Ordering::SeqCst);
    let m = via
        .get_manifest("fake.example/team/app", &image.manifest_digest)
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.bytes, image.manifest_bytes);
    assert!(blob_path(berth.cache_dir(), &image.manifest_digest).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_headers_give_a_5xx_within_the_bound_then_recover() {
    let Some(env) = setup(&["--read-timeout", READ_TIMEOUT, "--connect-timeout", "1s"]).await
    else {
        return;
    };
    let image = image_of(6, &[256 * 1024]);
    env.push("library/slow", &image).await;
    env.proxy.set_delay(Duration::from_secs(4));
    let base = env.berth.url();
    let layer = &image.layers[0].digest;
    let urls = [
        (
            "GET",
            format!("{base}/v2/library/slow/manifests/1?ns=docker.io"),
        ),
        (
            "GET",
            format!("{base}/v2/library/slow/blobs/{layer}?ns=docker.io"),
        ),
        (
            "HEAD",
            format!("{base}/v2/library/slow/blobs/{layer}?ns=docker.io"),
        ),
        (
            "GET",
            format!("{base}/v2/library/slow/tags/list?ns=docker.io"),
        ),
    ];
    for (method, url) in &urls {
        let t = Instant::now();
        let resp = env
            .http
            .request(method.parse().unwrap(), url)
            .header("Accept", content::ACCEPT_ALL_MANIFESTS)
            .send()
            .await
            .unwrap();
        let st = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        let took = t.elapsed();
        assert!((502..=504).contains(&st), "{method} {url}: {st} {body:?}");
        if *method == "GET" {
            tools::oci_code(&body);
        }
        assert!(
            took < Duration::from_secs(8),
            "{method} {url}: answered only after {took:?}"
        );
    }
    assert!(!blob_path(env.berth.cache_dir(), layer).exists());

    // Healthy again: served (after the circuit breaker's backoff).
    env.proxy.set_delay(Duration::ZERO);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (st, body) = fetch(&env.http, &urls[1].1, None).await;
        if st == 200 {
            assert_eq!(content::digest_of(&body.unwrap()), *layer);
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {st}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_body_aborts_clients_within_the_bound_and_publishes_nothing() {
    let Some(env) = setup(&["--read-timeout", READ_TIMEOUT]).await else {
        return;
    };
    let image = image_of(7, &[4 * MIB]);
    env.push("library/stall", &image).await;
    let layer = &image.layers[0];
    let url = env.blob_url("library/stall", &layer.digest);
    // Every upstream body stalls after 256 KiB: 1 + MAX_RESUMES bodies
    // cannot deliver 4 MiB, each stall ends with the read timeout.
    env.proxy.hold_blob_after(Some(256 * 1024));
    let t = Instant::now();
    let (whole, tail) = tokio::join!(
        fetch(&env.http, &url, None),
        fetch(&env.http, &url, Some("bytes=3000000-"))
    );
    let took = t.elapsed();
    for (what, (st, body)) in [("whole", whole), ("tail", tail)] {
        assert!(st == 200 || st == 206 || st >= 500, "{what}: {st}");
        assert!(
            body.is_err() || st >= 500,
            "{what}: a complete body from a stalled upstream"
        );
    }
    assert!(
        took < Duration::from_secs(20),
        "clients were released only after {took:?}"
    );
    let gets = env.gets_of(&layer.digest);
    assert_eq!(
        gets.len(),
        1 + berth::cache::flight::MAX_RESUMES as usize,
        "bounded resumes: {gets:?}"
    );
    until("the temporary file is removed", || {
        tmp_files(env.berth.cache_dir()).is_empty()
    })
    .await;
    assert!(!blob_path(env.berth.cache_dir(), &layer.digest).exists());

    env.proxy.hold_blob_after(None);
    let (st, body) = fetch(&env.http, &url, None).await;
    assert_eq!(st, 200);
    assert_eq!(content::digest_of(&body.unwrap()), layer.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_mid_revalidation_does_not_freeze_the_tag() {
    let Some(env) = setup(&["--tag-ttl", "1s"]).await else {
        return;
    };
    let v1 = image_of(10, &[1024]);
    env.push("library/moving", &v1).await;
    let url = format!(
        "{}/v2/library/moving/manifests/1?ns=docker.io",
        env.berth.url()
    );
    // A client gives up while berth's upstream HEAD for the tag is slow.
    env.proxy.set_delay(Duration::from_millis(1500));
    let gave_up = env
        .http
        .get(&url)
        .header("Accept", content::ACCEPT_ALL_MANIFESTS)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    // The abandoned upstream call finishes; upstream is fast again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.proxy.set_delay(Duration::ZERO);
    // The tag moves; once the TTL has passed, berth must see the new one.
    let v2 = image_of(11, &[1024]);
    env.push("library/moving", &v2).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let via = RegistryClient::new(&env.berth.url());
    let m = via
        .get_manifest("docker.io/library/moving", "1")
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(
        m.docker_content_digest.as_deref(),
        Some(v2.manifest_digest.as_str()),
        "the tag was revalidated (upstream: {:?})",
        env.proxy
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_resets_stalls_and_garbage_give_a_clear_5xx_then_recover() {
    if !tools::require("docker-registry") {
        return;
    }
    const PASSWORD: &str = "faults-robot-password-7";
    let tokens = TokenServer::start(TokenPolicy::new().credentials("robot", PASSWORD));
    // The origin's realm is a counting proxy in front of the token server.
    let realm = CountingProxy::start(&format!("http://{}", tokens.addr())).await;
    let yaml = tokens
        .registry_auth_yaml()
        .replace(&tokens.realm(), &format!("{}/token", realm.url()));
    let origin = Origin::start_with_config(&yaml).await;
    let repos = [
        "team/refused",
        "team/unavailable",
        "team/slow",
        "team/garbage",
    ];
    let image = image_of(8, &[4096]);
    for repo in repos {
        content::push_image_auth(
            &origin.url(),
            repo,
            "1",
            &image,
            Some(tokens.push_authorization(repo)),
        )
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "read_timeout = \"{READ_TIMEOUT}\"\n[registries.\"docker.io\"]\nurl = \"{}\"\nusername = \"robot\"\npassword = \"{PASSWORD}\"\n",
            origin.url()
        ),
    )
    .unwrap();
    let berth = Berth::start(&["--config", cfg.to_str().unwrap()]).await;
    let via = RegistryClient::new(&berth.url());

    type Fault<'a> = (&'a str, Box<dyn Fn(bool) + 'a>);
    let faults: Vec<Fault<'_>> = vec![
        ("team/refused", Box::new(|on| realm.set_refuse(on))),
        (
            "team/unavailable",
            Box::new(|on| tokens.set_unavailable(on)),
        ),
        (
            "team/slow",
            Box::new(|on| {
                realm.set_delay(if on {
                    Duration::from_secs(4)
                } else {
                    Duration::ZERO
                })
            }),
        ),
        // 200 with a body that holds no token.
        (
            "team/garbage",
            Box::new(|on| realm.set_fail_all(on.then_some(200))),
        ),
    ];
    for (repo, set) in &faults {
        set(true);
        let t = Instant::now();
        let m = via
            .get_manifest(&format!("docker.io/{repo}"), "1")
            .await
            .unwrap();
        let took = t.elapsed();
        assert!(
            (502..=504).contains(&m.status),
            "{repo}: {} {:?}",
            m.status,
            String::from_utf8_lossy(&m.bytes)
        );
        tools::oci_code(&m.bytes);
        assert!(
            took < Duration::from_secs(10),
            "{repo}: answered after {took:?}"
        );
        set(false);
        // Recovers by itself (after the breaker's backoff, if it opened).
        let deadline = Instant::now() + PATIENCE;
        loop {
            let m = via
                .get_manifest(&format!("docker.io/{repo}"), "1")
                .await
                .unwrap();
            if m.status == 200 {
                assert_eq!(m.bytes, image.manifest_bytes);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{repo}: no recovery: {}",
                m.status
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let b = via
            .get_blob(&format!("docker.io/{repo}"), &image.layers[0].digest)
            .await
            .unwrap();
        assert_eq!(b, image.layers[0].bytes);
    }
    assert!(realm.count("GET", "/token") >= faults.len());
    assert!(
        !berth.log().contains(PASSWORD),
        "the password reached berth's log"
    );
}

/// Three registries on one endpoint: `guarded.example` refuses private
/// redirects, `trusting.example` takes the default, `opted-in.example` sets
/// `private_redirects = true`.
fn redirect_registries(endpoint: &str) -> String {
    format!(
        "[registries.\"guarded.example\"]\nurl = \"{endpoint}\"\nprivate_redirects = false\n\n\
         [registries.\"trusting.example\"]\nurl = \"{endpoint}\"\n\n\
         [registries.\"opted-in.example\"]\nurl = \"{endpoint}\"\nprivate_redirects = true\n"
    )
}

/// berth with `config` as its config file (the directory holding it is
/// returned, to live as long as berth), a 1 s connect timeout and `envs`.
async fn berth_with_config(config: &str, envs: &[(&str, &str)]) -> (Berth, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, config).unwrap();
    let args = ["--config", cfg.to_str().unwrap(), "--connect-timeout", "1s"];
    (Berth::start_with_env(&args, envs).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_into_private_addresses_are_refused_unless_allowed() {
    if !tools::require("docker-registry") {
        return;
    }
    // The redirect target: the real origin behind a counting proxy on 127.0.0.1.
    let origin = Origin::start().await;
    let image = image_of(9, &[64 * 1024]);
    content::push_image(&origin.url(), "team/app", "1", &image)
        .await
        .unwrap();
    let target = CountingProxy::start(&origin.url()).await;
    let fake = Fake::start().await;
    let (berth, _dir) = berth_with_config(&redirect_registries(&fake.url()), &[]).await;
    let http = tools::http_client();
    let layer = &image.layers[0];
    let blob = |registry: &str| {
        format!(
            "{}/v2/team/app/blobs/{}?ns={registry}",
            berth.url(),
            layer.digest
        )
    };
    let port = target.addr().port();
    let private_targets = [
        format!("http://127.0.0.1:{port}"),
        format!("http://127.9.9.9:{port}"),
        format!("http://localhost:{port}"),
        format!("http://[::ffff:127.0.0.1]:{port}"),
        format!("http://2130706433:{port}"),
        format!("http://[::1]:{port}"),
        "http://169.254.169.254".to_owned(),
        "http://[fd00:ec2::254]".to_owned(),
        "http://10.255.255.1".to_owned(),
        "http://192.168.255.1".to_owned(),
        "http://172.16.0.1".to_owned(),
        "http://0.0.0.0".to_owned(),
    ];
    for to in &private_targets {
        fake.set_redirect(Some(to));
        let t = Instant::now();
        let r = http.get(blob("guarded.example")).send().await.unwrap();
        let st = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert_eq!(
            st,
            502,
            "redirect to {to} was not refused ({} body bytes)",
            body.len()
        );
        assert_eq!(tools::oci_code(&body), "UNKNOWN");
        assert!(
            String::from_utf8_lossy(&body).contains("redirect"),
            "the error says why: {body:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "refused without trying to connect"
        );
        assert_eq!(target.requests().len(), 0, "redirect to {to} was followed");
        // A success in between keeps the endpoint's circuit breaker closed,
        // so each refusal above is the redirect guard's own.
        let r = http
            .get(format!(
                "{}/v2/team/app/tags/list?ns=guarded.example",
                berth.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert!(!blob_path(berth.cache_dir(), &layer.digest).exists());

    // An endpoint on a private address may redirect to private addresses by
    // default (a registry and its storage on one internal network), and
    // `private_redirects = true` says so explicitly.
    fake.set_redirect(Some(&format!("http://127.0.0.1:{port}")));
    for registry in ["trusting.example", "opted-in.example"] {
        target.reset();
        let (st, body) = fetch(&http, &blob(registry), None).await;
        assert_eq!(st, 200, "{registry}");
        assert_eq!(content::digest_of(&body.unwrap()), layer.digest);
        // Cached by the first registry: the second is a hit.
        assert!(target.blob_gets() <= 1);
    }
    assert!(settled(berth.cache_dir()).await);
    assert!(blob_path(berth.cache_dir(), &layer.digest).is_file());
}

/// Upstream credentials stay with their registry: a blob redirect to
/// another host (a CDN) is followed without the Authorization header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_not_sent_along_a_redirect_to_another_host() {
    let layer = Blob::new(
        content::OCI_LAYER_GZIP,
        content::pseudo_random_bytes(77, 300 * 1024),
    );
    let registry = Fake::start().await;
    let cdn = Fake::start().await;
    cdn.add_blob(&layer);
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("robot:s3cret-pass")
    );
    *registry.require_authorization.lock().unwrap() = Some(basic.clone());
    registry.set_redirect(Some(&cdn.url()));
    let config = format!(
        "[registries.\"creds.example\"]\nurl = \"{}\"\nusername = \"robot\"\npassword = \"s3cret-pass\"\nprivate_redirects = true\n",
        registry.url()
    );
    let (berth, _dir) = berth_with_config(&config, &[]).await;
    let url = format!(
        "{}/v2/team/app/blobs/{}?ns=creds.example",
        berth.url(),
        layer.digest
    );
    let (st, body) = fetch(&tools::http_client(), &url, None).await;
    assert_eq!(st, 200);
    assert_eq!(content::digest_of(&body.unwrap()), layer.digest);
    let at_registry = registry.seen();
    assert!(
        at_registry.iter().any(|s| s.path.contains("/blobs/")
            && s.status == 307
            && s.authorization.as_deref() == Some(basic.as_str())),
        "the registry got the credentials: {:?}",
        at_registry
            .iter()
            .map(|s| (&s.path, s.status))
            .collect::<Vec<_>>()
    );
    let at_cdn = cdn.seen();
    assert!(!at_cdn.is_empty(), "the redirect was followed");
    for s in &at_cdn {
        assert_eq!(
            s.authorization, None,
            "{} {} carried credentials to the CDN",
            s.method, s.path
        );
    }
    assert!(
        !berth.log().contains("s3cret-pass"),
        "the password reached berth's log"
    );
}

/// A host name (not `localhost`, which the literal check already refuses)
/// that resolves only to loopback addresses here, and the first of them:
/// the machine's own name (in /etc/hosts as 127.0.0.1 or 127.0.1.1, or from
/// nss-myhostname), else Debian's `ip6-localhost` family. None when no
/// candidate resolves; on CI (`CI` set) that fails the test instead.
fn loopback_name() -> Option<(String, IpAddr)> {
    let own = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .into_iter()
        .chain(std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned());
    let fixed = [
        "ip6-localhost",
        "ip6-loopback",
        "localhost.localdomain",
        "localhost6",
        "localhost6.localdomain6",
    ]
    .map(str::to_owned);
    let found = own.chain(fixed).find_map(|name| {
        let lower = name.to_ascii_lowercase();
        if name.is_empty()
            || lower == "localhost"
            || lower.ends_with(".localhost")
            || name.parse::<IpAddr>().is_ok()
        {
            return None;
        }
        let addrs: Vec<IpAddr> = (name.as_str(), 0)
            .to_socket_addrs()
            .ok()?
            .map(|a| a.ip())
            .collect();
        let first = *addrs.first()?;
        addrs
            .iter()
            .all(IpAddr::is_loopback)
            .then_some((name, first))
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no host name resolves only to loopback here (tried the hostname, ip6-localhost, localhost.localdomain, ...)"
        );
        eprintln!("SKIP: no host name resolves only to loopback on this machine");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_a_name_resolving_to_loopback_are_refused_unless_allowed() {
    let Some((name, ip)) = loopback_name() else {
        return;
    };
    let image = image_of(11, &[48 * 1024]);
    let layer = &image.layers[0];
    // The redirect target: a registry on the address `name` resolves to.
    let target = Fake::start_on(ip).await;
    target.add_blob(layer);
    let port = target.addr.port();
    let fake = Fake::start().await;
    fake.set_redirect(Some(&format!("http://{name}:{port}")));
    let (berth, _dir) = berth_with_config(&redirect_registries(&fake.url()), &[]).await;
    let http = tools::http_client();
    let blob = |registry: &str| {
        format!(
            "{}/v2/team/app/blobs/{}?ns={registry}",
            berth.url(),
            layer.digest
        )
    };

    let (st, body) = fetch(&http, &blob("guarded.example"), None).await;
    let body = body.unwrap();
    assert_eq!(st, 502, "redirect to {name} ({ip}) was not refused");
    assert_eq!(tools::oci_code(&body), "UNKNOWN");
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&format!(
            "{name} resolves only to private addresses; refused (set private_redirects = true to allow)"
        )),
        "the error says why: {text}"
    );
    assert!(
        fake.seen().iter().any(|s| s.status == 307),
        "the endpoint did redirect"
    );
    assert_eq!(
        target.connections.load(Ordering::SeqCst),
        0,
        "berth connected to the redirect target"
    );
    assert!(target.seen().is_empty());
    assert!(!blob_path(berth.cache_dir(), &layer.digest).exists());
    let log = berth.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("resolves only to private addresses")),
        "the refusal is logged at warn: {log}"
    );

    // The same redirect with `private_redirects = true`: followed, exact bytes.
    let (st, body) = fetch(&http, &blob("opted-in.example"), None).await;
    assert_eq!(st, 200, "redirect to {name} with private_redirects = true");
    assert_eq!(body.unwrap(), layer.bytes);
    assert!(target.connections.load(Ordering::SeqCst) >= 1);
    assert_eq!(target.seen().len(), 1, "{:?}", target.seen());
    assert!(settled(berth.cache_dir()).await);
    assert!(blob_path(berth.cache_dir(), &layer.digest).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_proxy_on_a_loopback_name_keeps_working() {
    // The proxy is named `localhost` (resolved by berth's resolver, which
    // would refuse it for a public endpoint were it not the configured
    // proxy); the endpoint's own name is never resolved by berth.
    let image = image_of(12, &[32 * 1024]);
    let layer = &image.layers[0];
    let proxy = Fake::start().await;
    proxy.add_blob(layer);
    let proxy_url = format!("http://localhost:{}", proxy.addr.port());
    let (berth, _dir) = berth_with_config(
        "[registries.\"public.example\"]\nurl = \"http://registry.invalid\"\n",
        &[("HTTP_PROXY", &proxy_url), ("http_proxy", &proxy_url)],
    )
    .await;
    let url = format!(
        "{}/v2/team/app/blobs/{}?ns=public.example",
        berth.url(),
        layer.digest
    );
    let (st, body) = fetch(&tools::http_client(), &url, None).await;
    assert_eq!(st, 200, "{}", berth.log());
    assert_eq!(body.unwrap(), layer.bytes);
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.method == "GET" && s.path.ends_with(&layer.digest)),
        "the blob came through the proxy"
    );
}

// ---------------------------------------------------------------------------
// A small in-test registry for faults the counting proxy cannot make: it
// ignores `Range`, redirects blob GETs, and corrupts manifests on demand.

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    status: u16,
    /// The request's Authorization header.
    authorization: Option<String>,
}

#[derive(Default)]
struct FakeState {
    blobs: Mutex<HashMap<String, Bytes>>,
    /// reference (tag or digest) -> (media type, bytes)
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    /// Prefix (`scheme://host[:port]`) blob GETs are redirected to.
    redirect: Mutex<Option<String>>,
    ignore_range: AtomicBool,
    /// Cut the next blob body after this many bytes.
    cut_once: Mutex<Option<u64>>,
    corrupt_manifests: AtomicBool,
    seen: Mutex<Vec<Seen>>,
    /// Answer requests without this exact Authorization value with a 401
    /// Basic challenge.
    require_authorization: Mutex<Option<String>>,
    /// TCP connections accepted.
    connections: AtomicUsize,
}

struct Fake {
    addr: SocketAddr,
    state: Arc<FakeState>,
    task: JoinHandle<()>,
}

impl std::ops::Deref for Fake {
    type Target = FakeState;
    fn deref(&self) -> &FakeState {
        &self.state
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type FakeBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> FakeBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

impl Fake {
    async fn start() -> Fake {
        Fake::start_on(Ipv4Addr::LOCALHOST.into()).await
    }

    async fn start_on(ip: IpAddr) -> Fake {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(fake_handle(&st, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Fake { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn add_blob(&self, b: &Blob) {
        self.blobs
            .lock()
            .unwrap()
            .insert(b.digest.clone(), b.bytes.clone());
    }

    fn add_manifest(&self, tag: &str, image: &Image) {
        let mut m = self.manifests.lock().unwrap();
        let v = (image.media_type.clone(), image.manifest_bytes.clone());
        m.insert(tag.to_owned(), v.clone());
        m.insert(image.manifest_digest.clone(), v);
    }

    fn set_redirect(&self, to: Option<&str>) {
        *self.redirect.lock().unwrap() = to.map(str::to_owned);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn fake_handle(
    st: &FakeState,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<FakeBody> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let required = st.require_authorization.lock().unwrap().clone();
    let resp = match required {
        Some(want) if authorization.as_deref() != Some(want.as_str()) => hyper::Response::builder()
            .status(401)
            .header("www-authenticate", "Basic realm=\"fake\"")
            .body(full(
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"auth"}]}"#,
            ))
            .unwrap(),
        _ => fake_route(st, &method, &path, range.as_deref()),
    };
    st.seen.lock().unwrap().push(Seen {
        method,
        path,
        range,
        status: resp.status().as_u16(),
        authorization,
    });
    resp
}

fn fake_route(
    st: &FakeState,
    method: &str,
    path: &str,
    range: Option<&str>,
) -> hyper::Response<FakeBody> {
    let reply = |status: u16, body: FakeBody| {
        hyper::Response::builder()
            .status(status)
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .body(body)
            .unwrap()
    };
    let not_found = || {
        let mut r = reply(
            404,
            full(r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#),
        );
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    };
    if path == "/v2/" {
        return reply(200, full("{}"));
    }
    if let Some(repo) = path
        .strip_prefix("/v2/")
        .and_then(|p| p.strip_suffix("/tags/list"))
    {
        let mut r = reply(200, full(format!(r#"{{"name":"{repo}","tags":["1"]}}"#)));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return r;
    }
    if let Some((_, digest)) = path.rsplit_once("/blobs/") {
        if let Some(to) = st.redirect.lock().unwrap().clone() {
            let mut r = reply(307, full(""));
            r.headers_mut()
                .insert("location", format!("{to}{path}").parse().unwrap());
            return r;
        }
        let Some(bytes) = st.blobs.lock().unwrap().get(digest).cloned() else {
            return not_found();
        };
        let total = bytes.len() as u64;
        let from = range
            .filter(|_| !st.ignore_range.load(Ordering::SeqCst))
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok());
        let (status, body) = match from {
            Some(n) if n < total => (206, bytes.slice(n as usize..)),
            _ => (200, bytes),
        };
        let len = body.len();
        let body = if method == "HEAD" {
            full("")
        } else {
            match st.cut_once.lock().unwrap().take() {
                Some(cut) => {
                    let head = body.slice(..(cut as usize).min(len));
                    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                        Ok(Frame::data(head)),
                        Err(std::io::Error::other("cut by the fake registry")),
                    ];
                    StreamBody::new(futures_util::stream::iter(frames)).boxed()
                }
                None => full(body),
            }
        };
        let mut r = reply(status, body);
        let h = r.headers_mut();
        h.insert("content-length", len.into());
        h.insert("content-type", "application/octet-stream".parse().unwrap());
        if status == 206 {
            let start = total - len as u64;
            h.insert(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1)
                    .parse()
                    .unwrap(),
            );
        }
        return r;
    }
    if let Some((_, reference)) = path.rsplit_once("/manifests/") {
        let Some((media_type, mut bytes)) = st.manifests.lock().unwrap().get(reference).cloned()
        else {
            return not_found();
        };
        let digest = content::digest_of(&bytes);
        if st.corrupt_manifests.load(Ordering::SeqCst) {
            let mut v = bytes.to_vec();
            let last = v.len() - 2;
            v[last] ^= 0x20;
            bytes = v.into();
        }
        let len = bytes.len();
        let body = if method == "HEAD" {
            full("")
        } else {
            full(bytes)
        };
        let mut r = reply(200, body);
        let h = r.headers_mut();
        h.insert("content-length", len.into());
        h.insert("content-type", media_type.parse().unwrap());
        h.insert("docker-content-digest", digest.parse().unwrap());
        return r;
    }
    not_found()
}
