//! Upstream tiers: berth -> a Harbor-like hub project (nginx rewriting
//! `/v2/<project>/...` in front of a proxy-mode docker-registry, see
//! `common::hub`) -> the origin, with the origin as berth's fallback.
//! Counting proxies sit between berth and each endpoint, so every case
//! asserts which endpoint served the bytes; every blob is checked by sha256.
//!
//! Covered: the chain through the hub (project prefix, ranged GET instead of
//! a blob HEAD), a dead hub (circuit breaker: contacted once, not per blob),
//! 429 with Retry-After / 503 / slow hubs, Basic-auth hub with a bearer-token
//! origin (file, env and docker config.json credentials; nothing secret in
//! the log), mTLS with a test CA (wrong CA fails closed with a clear error,
//! `insecure` is warned about), and a miss with every endpoint down.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::berth::Berth;
use common::containerd::{write_hosts_toml, Containerd};
use common::content::{self, Image, MediaKind, RegistryClient};
use common::hub::{Hub, HubOptions, Pki, NGINX_BIN};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::token::{start_token_origin, TokenPolicy, TokenServer};
use common::tools::{self, dead_port, free_port};

const PROJECT: &str = "dockerhub-proxy";
/// The repository at the origin (and what berth is asked for under docker.io).
const REPO: &str = "library/app";
/// How clients name it through berth (path-style).
const NAME: &str = "docker.io/library/app";
/// The hub's path prefix for it.
const HUB_PATH: &str = "/v2/dockerhub-proxy/library/app/";

fn have_hub() -> bool {
    tools::require_all(&["docker-registry", NGINX_BIN, "openssl"])
}

/// A berth config file in its own temp dir.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { _dir: dir, path }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// `[registries."docker.io"]` with `origin_lines` in the registry table
/// (the fallback origin) and one hub endpoint `hub_url` plus `hub_lines`.
fn docker_io_config(origin_lines: &str, hub_url: &str, hub_lines: &str) -> String {
    format!(
        "[registries.\"docker.io\"]\n{origin_lines}\n\n[[registries.\"docker.io\".endpoints]]\nurl = \"{hub_url}\"\n{hub_lines}\n"
    )
}

async fn start_berth(config: &str) -> (Berth, ConfigFile) {
    let cfg = ConfigFile::new(config);
    let berth = Berth::start(&["--config", cfg.path()]).await;
    (berth, cfg)
}

/// Pulls `image` through berth as a client does (manifest by tag, then every
/// blob) and checks every byte against its digest.
async fn pull_and_verify(berth: &Berth, name: &str, tag: &str, image: &Image) {
    let via = RegistryClient::new(&berth.url());
    let m = via.get_manifest(name, tag).await.unwrap();
    assert_eq!(
        m.status,
        200,
        "manifest {name}:{tag}: {}\nberth log:\n{}",
        String::from_utf8_lossy(&m.bytes),
        berth.log()
    );
    assert_eq!(content::digest_of(&m.bytes), image.manifest_digest);
    assert_eq!(m.bytes, image.manifest_bytes);
    for b in image.blobs() {
        let bytes = via
            .get_blob(name, &b.digest)
            .await
            .unwrap_or_else(|e| panic!("blob {}: {e:#}\nberth log:\n{}", b.digest, berth.log()));
        assert_eq!(
            content::digest_of(&bytes),
            b.digest,
            "blob bytes match their digest"
        );
    }
}

/// `who` forwarded the manifest and every blob of `image`, whole, with 2xx.
fn assert_served(p: &CountingProxy, image: &Image, who: &str) {
    let reqs = p.requests();
    assert!(
        reqs.iter().any(|r| r.method == "GET"
            && r.path.contains("/manifests/")
            && r.status == 200
            && r.completed),
        "{who} served no manifest: {reqs:#?}"
    );
    for b in image.blobs() {
        assert!(
            reqs.iter().any(|r| r.method == "GET"
                && r.path.ends_with(&format!("/blobs/{}", b.digest))
                && r.status == 200
                && r.completed
                && r.bytes == b.size()),
            "{who} did not serve blob {} whole: {reqs:#?}",
            b.digest
        );
    }
}

/// `who` saw no request at all.
fn assert_untouched(p: &CountingProxy, who: &str) {
    let reqs = p.requests();
    assert!(reqs.is_empty(), "{who} was asked: {reqs:#?}");
}

/// Sum of `berth_upstream_requests_total` samples whose labels contain every
/// one of `labels` (e.g. `endpoint="127.0.0.1:1/p"`).
async fn upstream_requests_metric(metrics_addr: &str, labels: &[&str]) -> u64 {
    let text = tools::metrics_text(&format!("http://{metrics_addr}")).await;
    text.lines()
        .filter(|l| l.starts_with("berth_upstream_requests_total{"))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Parses berth's OCI error envelope: `(code, detail)` of the first error.
fn envelope(body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "not an OCI error envelope ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    let e = &v["errors"][0];
    (
        e["code"].as_str().unwrap_or_default().to_owned(),
        e["detail"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| e["detail"].to_string()),
    )
}

/// origin <- origin_proxy <- berth, and origin <- hub <- hub_proxy <- berth.
struct Tiers {
    _origin: Origin,
    origin_proxy: CountingProxy,
    hub: Hub,
    hub_proxy: CountingProxy,
    image: Image,
}

impl Tiers {
    /// An open origin holding `REPO:1.0` (`layers` layers), a hub in front
    /// of it, and the two counting proxies.
    async fn start(seed: u64, layers: usize, hub: HubOptions) -> Tiers {
        let origin = Origin::start().await;
        let image = content::build_image(seed, layers, 48 * 1024, MediaKind::Oci, "amd64");
        content::push_image(&origin.url(), REPO, "1.0", &image)
            .await
            .unwrap();
        let hub = Hub::start(&origin.url(), hub).await;
        let hub_proxy = CountingProxy::start(&hub.url()).await;
        let origin_proxy = CountingProxy::start(&origin.url()).await;
        Tiers {
            _origin: origin,
            origin_proxy,
            hub,
            hub_proxy,
            image,
        }
    }

    /// The origin (via its proxy) as `url`, the hub project (via its proxy)
    /// as the one endpoint, with `hub_lines` added to it.
    fn config(&self, hub_lines: &str) -> String {
        docker_io_config(
            &format!("url = \"{}\"", self.origin_proxy.url()),
            &format!("{}/{PROJECT}", self.hub_proxy.url()),
            hub_lines,
        )
    }

    fn reset(&self) {
        self.hub_proxy.reset();
        self.origin_proxy.reset();
        self.hub.backend().reset();
        self.hub_proxy.set_fail_all(None);
        self.hub_proxy.set_fail_headers(&[]);
        self.hub_proxy.set_delay(Duration::ZERO);
        self.hub_proxy.set_refuse(false);
        self.origin_proxy.set_fail_all(None);
        self.origin_proxy.set_fail_headers(&[]);
    }
}

/// 1. berth -> hub project -> origin: everything comes from the hub under
/// `/v2/dockerhub-proxy/library/...`, nothing from the origin; a blob HEAD is
/// answered from a one-byte ranged GET (the hub 404s a HEAD on an uncached
/// blob); containerd pulls through the chain too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_berth_hub_origin_serves_everything_from_the_hub_project() {
    if !have_hub() {
        return;
    }
    let t = Tiers::start(41, 3, HubOptions::new()).await;
    let (berth, _cfg) = start_berth(&t.config("")).await;
    let http = tools::http_client();

    // The stand-in behaves like Harbor: HEAD on a blob it has not cached is 404.
    let layer = &t.image.layers[0];
    let direct = http
        .head(format!("{}{HUB_PATH}blobs/{}", t.hub.url(), layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(
        direct.status(),
        404,
        "the hub's HEAD-on-uncached-blob quirk"
    );
    assert_eq!(t.hub.backend().requests().len(), 0);

    // berth answers a blob HEAD with the right size, from a ranged GET.
    let head = http
        .head(format!("{}/v2/{NAME}/blobs/{}", berth.url(), layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200, "{}", berth.log());
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        layer.size().to_string()
    );
    let reqs = t.hub_proxy.requests();
    assert!(
        reqs.iter().any(|r| r.method == "GET"
            && r.path == format!("{HUB_PATH}blobs/{}", layer.digest)
            && r.req_headers.get("range").and_then(|v| v.to_str().ok()) == Some("bytes=0-0")),
        "berth sent the hub a GET with Range bytes=0-0: {reqs:#?}"
    );
    assert_eq!(
        t.hub_proxy.count("HEAD", "/blobs/"),
        0,
        "no blob HEAD to a hub: {reqs:#?}"
    );
    assert_untouched(&t.origin_proxy, "origin (blob HEAD)");

    // The pull: manifest by tag, then every blob.
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    assert_served(&t.hub_proxy, &t.image, "hub");
    for r in t.hub_proxy.requests() {
        assert!(
            r.path.starts_with(HUB_PATH),
            "hub requests carry the project prefix: {r:?}"
        );
        assert!(r.status < 400, "hub answered an error: {r:?}");
    }
    assert_untouched(&t.origin_proxy, "origin");
    // nginx rewrote the project away before its registry.
    let backend = t.hub.backend().requests();
    assert!(!backend.is_empty());
    for r in &backend {
        assert!(
            r.path == "/v2/" || r.path.starts_with("/v2/library/app/"),
            "rewritten by the hub: {r:?}"
        );
    }

    // A real client: containerd through berth (fresh tag, so berth misses).
    if Containerd::available() {
        let second = content::build_image(42, 2, 32 * 1024, MediaKind::Docker, "amd64");
        content::push_image(&t.origin_proxy.url(), REPO, "2.0", &second)
            .await
            .unwrap();
        t.reset();
        let ctd = Containerd::start();
        let hosts = tempfile::tempdir().unwrap();
        write_hosts_toml(
            hosts.path(),
            "docker.io",
            &berth.url(),
            &format!("http://127.0.0.1:{}", dead_port()),
        );
        ctd.pull_async("tiers", "docker.io/library/app:2.0", hosts.path(), &[])
            .await
            .assert_success();
        assert_eq!(
            ctd.image_digest("tiers", "docker.io/library/app:2.0")
                .as_deref(),
            Some(second.manifest_digest.as_str())
        );
        assert_served(&t.hub_proxy, &second, "hub (containerd pull)");
        assert_untouched(&t.origin_proxy, "origin (containerd pull)");
    }
}

/// 2. A dead hub: the pull falls back to the origin with correct bytes, and
/// the hub is contacted once for the whole pull (circuit breaker), not once
/// per blob. Two kinds of dead: a port that refuses connections (nginx
/// stopped; attempts counted by berth's own upstream request metric, as
/// nothing can count refused connections), and a hub that accepts and drops
/// connections (counted at its proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_hub_falls_back_to_origin_and_is_contacted_once() {
    if !have_hub() {
        return;
    }
    let mut t = Tiers::start(43, 5, HubOptions::new()).await;
    let requests_per_pull = 1 + t.image.blobs().count();

    // (a) The hub accepts connections and closes them without an answer.
    t.hub_proxy.set_refuse(true);
    let (berth, _cfg) = start_berth(&t.config("")).await;
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    assert_served(&t.origin_proxy, &t.image, "origin");
    assert_eq!(t.hub.backend().requests().len(), 0);
    let contacted = t.hub_proxy.refused_connections();
    eprintln!("dropping hub: {contacted} connections for {requests_per_pull} requests");
    assert!(
        contacted >= 1,
        "the hub was tried first: {contacted} connections"
    );
    // A connection closed before any response is retried once at once (a
    // single reset is transient); dropped again, it is a transport failure
    // and the breaker opens, as for a refused connection.
    assert!(
        contacted <= 2,
        "a hub that drops connections is skipped after a short run, not tried for each of {requests_per_pull} requests: {contacted}"
    );
    drop(berth);

    // (b) nginx stopped: the hub's port refuses connections.
    t.reset();
    t.hub.stop();
    let metrics = format!("127.0.0.1:{}", free_port());
    let cfg = ConfigFile::new(&docker_io_config(
        &format!("url = \"{}\"", t.origin_proxy.url()),
        &t.hub.project_url(),
        "",
    ));
    let berth = Berth::start(&["--config", cfg.path(), "--metrics-listen", &metrics]).await;
    let started = Instant::now();
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    let took = started.elapsed();
    assert_served(&t.origin_proxy, &t.image, "origin");
    assert_eq!(t.hub.backend().requests().len(), 0);
    let label = format!("endpoint=\"127.0.0.1:{}/{PROJECT}\"", t.hub.port());
    let attempts = upstream_requests_metric(&metrics, &[&label]).await;
    let failed = upstream_requests_metric(&metrics, &[&label, "status=\"error\""]).await;
    assert_eq!(
        (attempts, failed),
        (1, 1),
        "a refusing hub is tried once, then skipped ({requests_per_pull} requests)"
    );
    assert!(
        took < Duration::from_secs(20),
        "falling back from a refusing hub does not hang: {took:?}"
    );
    let skipped = berth
        .log()
        .matches("endpoint skipped: circuit open")
        .count();
    assert!(
        skipped >= t.image.blobs().count(),
        "later requests skipped the hub because its breaker was open: {skipped} skips"
    );
}

/// 3. A throttling (429 + Retry-After), failing (503) or slow (beyond its
/// `read_timeout`) hub: each pull falls back to the origin with correct
/// bytes; 429 and a timeout take the hub out at once, 503s after a short run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_failing_and_slow_hubs_fall_back_to_origin() {
    if !have_hub() {
        return;
    }
    let t = Tiers::start(44, 5, HubOptions::new()).await;
    let requests_per_pull = 1 + t.image.blobs().count();

    // 429 with Retry-After: 30: one hub request, then the hub is skipped.
    t.reset();
    t.hub_proxy.set_fail_all(Some(429));
    t.hub_proxy.set_fail_headers(&[("Retry-After", "30")]);
    let (berth, _cfg) = start_berth(&t.config("")).await;
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    assert_served(&t.origin_proxy, &t.image, "origin (hub 429)");
    let hub = t.hub_proxy.requests();
    assert_eq!(
        hub.len(),
        1,
        "after a 429 with Retry-After the hub is skipped for every later request: {hub:#?}"
    );
    assert_eq!(hub[0].status, 429);
    assert_eq!(
        t.hub_proxy.blob_gets(),
        0,
        "no blob was asked of the throttling hub"
    );
    drop(berth);

    // 503: falls back each time; the hub is skipped after a short run of 5xx.
    t.reset();
    t.hub_proxy.set_fail_all(Some(503));
    let (berth, _cfg) = start_berth(&t.config("")).await;
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    assert_served(&t.origin_proxy, &t.image, "origin (hub 503)");
    let hub = t.hub_proxy.requests();
    // The manifest HEAD, the manifest GET and the first blob: three 5xx in a
    // row open the breaker (README), the other blobs skip the hub.
    assert_eq!(
        hub.len(),
        3,
        "a 503ing hub is skipped after three 5xx, not asked for each of {requests_per_pull} requests: {hub:#?}"
    );
    assert!(hub.iter().all(|r| r.status == 503));
    drop(berth);

    // Slow: the hub answers after 5 s; its read_timeout is 1 s.
    t.reset();
    t.hub_proxy.set_delay(Duration::from_secs(5));
    let (berth, _cfg) =
        start_berth(&t.config("read_timeout = \"1s\"\nconnect_timeout = \"1s\"")).await;
    let started = Instant::now();
    pull_and_verify(&berth, NAME, "1.0", &t.image).await;
    let took = started.elapsed();
    assert_served(&t.origin_proxy, &t.image, "origin (slow hub)");
    let hub = t.hub_proxy.requests();
    assert_eq!(
        hub.len(),
        1,
        "a hub that timed out is skipped for the rest of the pull: {hub:#?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "one timeout, not one per request: {took:?}"
    );
    drop(berth);

    // Hub and origin both throttling: a miss is answered at once with a
    // status containerd falls back on (503, never 429), and while both are
    // backing off nothing is asked upstream.
    t.reset();
    for p in [&t.hub_proxy, &t.origin_proxy] {
        p.set_fail_all(Some(429));
        p.set_fail_headers(&[("Retry-After", "30")]);
    }
    let (berth, _cfg) = start_berth(&t.config("")).await;
    let http = tools::http_client();
    for (i, url) in [
        format!("{}/v2/{NAME}/manifests/1.0", berth.url()),
        format!(
            "{}/v2/{NAME}/blobs/{}",
            berth.url(),
            t.image.layers[0].digest
        ),
    ]
    .iter()
    .enumerate()
    {
        let started = Instant::now();
        let r = http.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert!(
            status >= 500 && status != 429,
            "{url}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        if i == 0 {
            assert_eq!(status, 503, "throttled everywhere: 503");
        }
        envelope(&body);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{url}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        (
            t.hub_proxy.requests().len(),
            t.origin_proxy.requests().len()
        ),
        (1, 1),
        "each throttling endpoint was asked once, then left alone for its Retry-After"
    );
}

const HUB_USER: &str = "robot$berth-node";
const HUB_PASSWORD: &str = "hub-R0bot-secret-7f3a";
const ORIGIN_USER: &str = "origin-robot";
const ORIGIN_PASSWORD: &str = "origin-T0ken-secret-91c2";

/// 4. A Basic-auth hub in front of a bearer-token origin, credentials for
/// both in berth: pulls go through the hub; with the hub down they go to the
/// token origin; a wrong hub password falls back to the origin. Credentials
/// from the file, from the environment and from a docker config.json each
/// work. No password, Basic string or token reaches berth's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_hub_and_token_origin_with_file_env_and_docker_config_credentials() {
    if !have_hub() {
        return;
    }
    let tokens = TokenServer::start(TokenPolicy::new().credentials(ORIGIN_USER, ORIGIN_PASSWORD));
    let origin = start_token_origin(&tokens).await;
    // Each credential source pulls image `n` through the hub, then image
    // `n + 1` with the hub refusing (from the origin).
    let images: Vec<Image> = (0..8)
        .map(|i| content::build_image(50 + i, 2, 24 * 1024, MediaKind::Oci, "amd64"))
        .collect();
    for (i, image) in images.iter().enumerate() {
        content::push_image_auth(
            &origin.url(),
            REPO,
            &format!("v{i}"),
            image,
            Some(tokens.push_authorization(REPO)),
        )
        .await
        .unwrap();
    }
    let hub = Hub::start(
        &origin.url(),
        HubOptions::new()
            .basic_auth(HUB_USER, HUB_PASSWORD)
            .remote_credentials(ORIGIN_USER, ORIGIN_PASSWORD),
    )
    .await;
    let hub_proxy = CountingProxy::start(&hub.url()).await;
    let origin_proxy = CountingProxy::start(&origin.url()).await;
    let hub_url = format!("{}/{PROJECT}", hub_proxy.url());

    // Without credentials, neither tier serves anything.
    let r = tools::http_client()
        .get(format!("{}{HUB_PATH}manifests/v0", hub.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));

    let dir = tempfile::tempdir().unwrap();
    let docker_config = dir.path().join("config.json");
    {
        use base64::Engine as _;
        let b64 =
            |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        std::fs::write(
            &docker_config,
            serde_json::json!({"auths": {
                hub_proxy.host(): {"auth": b64(HUB_USER, HUB_PASSWORD)},
                format!("http://{}", origin_proxy.host()): {"auth": b64(ORIGIN_USER, ORIGIN_PASSWORD)},
            }})
            .to_string(),
        )
        .unwrap();
    }
    // Given to berth's process only (never set_var in a multi-threaded test).
    let hub_env = "TIERS_HUB_PASSWORD".to_owned();
    let origin_env = "TIERS_ORIGIN_PASSWORD".to_owned();
    let envs = [
        (hub_env.as_str(), HUB_PASSWORD),
        (origin_env.as_str(), ORIGIN_PASSWORD),
    ];
    let dc = docker_config.display();
    let sources = [
        (
            "file",
            format!(
                "url = \"{}\"\nusername = \"{ORIGIN_USER}\"\npassword = \"{ORIGIN_PASSWORD}\"",
                origin_proxy.url()
            ),
            format!("username = \"{HUB_USER}\"\npassword = \"{HUB_PASSWORD}\""),
        ),
        (
            "env",
            format!(
                "url = \"{}\"\nusername = \"{ORIGIN_USER}\"\npassword_env = \"{origin_env}\"",
                origin_proxy.url()
            ),
            format!("username = \"{HUB_USER}\"\npassword_env = \"{hub_env}\""),
        ),
        (
            "docker config.json",
            format!("url = \"{}\"\ndocker_config = \"{dc}\"", origin_proxy.url()),
            format!("docker_config = \"{dc}\""),
        ),
    ];
    let mut secrets_seen: Vec<String> = {
        use base64::Engine as _;
        [(HUB_USER, HUB_PASSWORD), (ORIGIN_USER, ORIGIN_PASSWORD)]
            .iter()
            .map(|(u, p)| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")))
            .collect()
    };
    for (i, (source, origin_lines, hub_lines)) in sources.iter().enumerate() {
        let (through_hub, from_origin) = (&images[2 * i], &images[2 * i + 1]);
        hub_proxy.reset();
        origin_proxy.reset();
        hub_proxy.set_refuse(false);
        let cfg = ConfigFile::new(&docker_io_config(origin_lines, &hub_url, hub_lines));
        let berth = Berth::start_with_env(&["--config", cfg.path()], &envs).await;

        // Through the Basic-auth hub (which pulls from the token origin itself).
        pull_and_verify(&berth, NAME, &format!("v{}", 2 * i), through_hub).await;
        assert_served(&hub_proxy, through_hub, &format!("hub ({source})"));
        assert_untouched(&origin_proxy, &format!("origin ({source}, hub up)"));
        let hub_reqs = hub_proxy.requests();
        assert!(
            hub_reqs
                .iter()
                .filter(|r| r.status < 400)
                .all(|r| r.req_headers.contains_key("authorization")),
            "every request the hub served carried Basic credentials ({source}): {hub_reqs:#?}"
        );
        assert!(
            hub.access_log()
                .iter()
                .any(|e| e.status == 200 && e.user == HUB_USER),
            "nginx authenticated {HUB_USER} ({source})"
        );

        // The hub down: the token origin, with berth's origin credentials.
        hub_proxy.set_refuse(true);
        pull_and_verify(&berth, NAME, &format!("v{}", 2 * i + 1), from_origin).await;
        assert_served(
            &origin_proxy,
            from_origin,
            &format!("origin ({source}, hub down)"),
        );
        let bearer: Vec<String> = origin_proxy
            .requests()
            .iter()
            .filter_map(|r| {
                r.req_headers
                    .get("authorization")?
                    .to_str()
                    .ok()
                    .map(str::to_owned)
            })
            .collect();
        assert!(
            !bearer.is_empty() && bearer.iter().all(|a| a.starts_with("Bearer ")),
            "berth used bearer tokens at the origin ({source}): {bearer:?}"
        );
        secrets_seen.extend(bearer.iter().map(|a| a["Bearer ".len()..].to_owned()));
        secrets_seen.extend(hub_reqs.iter().filter_map(|r| {
            let a = r.req_headers.get("authorization")?.to_str().ok()?;
            Some(a.strip_prefix("Basic ")?.to_owned())
        }));
        assert_no_secret(&berth.log(), &secrets_seen, source);
    }
    hub_proxy.set_refuse(false);
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.user.as_deref() == Some(ORIGIN_USER)),
        "the token server saw berth's (and the hub's) origin credentials"
    );

    // A wrong hub password: 401 after authenticating moves on to the origin.
    hub_proxy.reset();
    origin_proxy.reset();
    let (berth, _cfg) = start_berth(&docker_io_config(
        &format!(
            "url = \"{}\"\nusername = \"{ORIGIN_USER}\"\npassword = \"{ORIGIN_PASSWORD}\"",
            origin_proxy.url()
        ),
        &hub_url,
        &format!("username = \"{HUB_USER}\"\npassword = \"not-the-{HUB_PASSWORD}\""),
    ))
    .await;
    let image = &images[6];
    pull_and_verify(&berth, NAME, "v6", image).await;
    assert_served(&origin_proxy, image, "origin (wrong hub password)");
    let hub_reqs = hub_proxy.requests();
    assert!(
        !hub_reqs.is_empty() && hub_reqs.iter().all(|r| r.status == 401),
        "the hub refused every request: {hub_reqs:#?}"
    );
    assert!(
        hub_reqs.len() <= 2,
        "one challenge and one refused retry, then the hub is skipped: {hub_reqs:#?}"
    );
    assert!(
        hub_reqs
            .iter()
            .any(|r| r.req_headers.contains_key("authorization")),
        "berth did try its (wrong) credentials: {hub_reqs:#?}"
    );
    assert_no_secret(&berth.log(), &secrets_seen, "wrong hub password");
    assert!(
        !berth.log().contains("not-the-"),
        "the wrong password reached berth's log"
    );
}

fn assert_no_secret(log: &str, extra: &[String], source: &str) {
    for secret in [HUB_PASSWORD, ORIGIN_PASSWORD]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().cloned())
    {
        assert!(
            !log.contains(&secret),
            "a secret ({} chars) reached berth's log ({source})",
            secret.len()
        );
    }
}

/// 5. mTLS to the hub with a test CA: `ca_file` + `client_cert`/`client_key`
/// works; a wrong CA fails closed (nothing reaches the hub's registry; 502 in
/// the OCI envelope without fallback, the origin with it); no client
/// certificate is refused by the hub and falls back; `insecure = true` works
/// and is warned about at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_hub_with_test_ca_and_wrong_ca_fails_closed() {
    if !have_hub() {
        return;
    }
    let pki = Pki::generate("hub");
    let other = Pki::generate("other");
    let origin = Origin::start().await;
    let image = content::build_image(45, 3, 32 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), REPO, "1.0", &image)
        .await
        .unwrap();
    let origin_proxy = CountingProxy::start(&origin.url()).await;
    let hub = Hub::start(&origin.url(), HubOptions::new().tls(&pki, true)).await;
    assert!(hub.url().starts_with("https://"));
    let origin_url = format!("url = \"{}\"", origin_proxy.url());
    let identity = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        pki.client_cert().display(),
        pki.client_key().display()
    );

    // The right CA and a client certificate: everything from the hub.
    let (berth, _cfg) = start_berth(&docker_io_config(
        &origin_url,
        &hub.project_url(),
        &format!("ca_file = \"{}\"\n{identity}", pki.ca().display()),
    ))
    .await;
    pull_and_verify(&berth, NAME, "1.0", &image).await;
    assert_untouched(&origin_proxy, "origin (mTLS hub)");
    assert_served(hub.backend(), &image, "hub registry (mTLS)");
    let log = hub.access_log();
    assert!(!log.is_empty());
    assert!(
        log.iter().all(|e| e.ssl_client_verify == "SUCCESS"),
        "every request came with a verified client certificate: {log:#?}"
    );
    assert!(log.iter().all(|e| e.uri.starts_with(HUB_PATH)), "{log:#?}");
    drop(berth);

    // A wrong CA, no fallback: 502 in the OCI envelope, fast, nothing served by the hub.
    hub.backend().reset();
    let entries = hub.access_log().len();
    let cfg = ConfigFile::new(&format!(
        "[registries.\"docker.io\"]\norigin_fallback = false\n\n[[registries.\"docker.io\".endpoints]]\nurl = \"{}\"\nca_file = \"{}\"\n{identity}\n",
        hub.project_url(),
        other.ca().display()
    ));
    let berth = Berth::start(&["--config", cfg.path()]).await;
    let http = tools::http_client();
    let started = Instant::now();
    let r = http
        .get(format!("{}/v2/{NAME}/manifests/1.0", berth.url()))
        .header("Accept", content::ACCEPT_ALL_MANIFESTS)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    let (code, detail) = envelope(&body);
    assert_eq!(code, "UNKNOWN");
    eprintln!("wrong CA: {detail}");
    assert!(
        detail.contains("connect")
            && detail.contains("https://127.0.0.1")
            && detail.contains("certificate"),
        "the detail names the failed TLS connection: {detail}"
    );
    let r = http
        .get(format!(
            "{}/v2/{NAME}/blobs/{}",
            berth.url(),
            image.layers[0].digest
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "blob: {}", r.status());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert_untouched(hub.backend(), "hub registry (wrong CA)");
    assert_eq!(
        hub.access_log().len(),
        entries,
        "no request got past the TLS handshake"
    );
    let log = berth.log();
    assert!(
        log.contains("upstream endpoint failed"),
        "berth logs the failure: {log}"
    );
    drop(berth);

    // A wrong CA with the origin as fallback: the origin serves.
    origin_proxy.reset();
    let (berth, _cfg) = start_berth(&docker_io_config(
        &origin_url,
        &hub.project_url(),
        &format!("ca_file = \"{}\"\n{identity}", other.ca().display()),
    ))
    .await;
    pull_and_verify(&berth, NAME, "1.0", &image).await;
    assert_served(&origin_proxy, &image, "origin (wrong CA, fallback)");
    assert_untouched(hub.backend(), "hub registry (wrong CA, fallback)");
    assert_eq!(hub.access_log().len(), entries);
    drop(berth);

    // The right CA but no client certificate: the hub answers 400, berth
    // moves on to the origin.
    origin_proxy.reset();
    let (berth, _cfg) = start_berth(&docker_io_config(
        &origin_url,
        &hub.project_url(),
        &format!("ca_file = \"{}\"", pki.ca().display()),
    ))
    .await;
    pull_and_verify(&berth, NAME, "1.0", &image).await;
    assert_served(&origin_proxy, &image, "origin (no client certificate)");
    assert_untouched(hub.backend(), "hub registry (no client certificate)");
    let refused: Vec<_> = hub.access_log().into_iter().skip(entries).collect();
    assert!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|e| e.status == 400 && e.ssl_client_verify == "NONE"),
        "nginx refused the certificate-less requests: {refused:#?}"
    );
    drop(berth);

    // insecure = true (no CA given): works, with a warning at start.
    origin_proxy.reset();
    let (berth, _cfg) = start_berth(&docker_io_config(
        &origin_url,
        &hub.project_url(),
        &format!("insecure = true\n{identity}"),
    ))
    .await;
    let startup_log = berth.log();
    assert!(
        startup_log.contains("WARN")
            && startup_log.contains("insecure = true")
            && startup_log.contains("verification is DISABLED"),
        "berth warns about insecure at start: {startup_log}"
    );
    pull_and_verify(&berth, NAME, "1.0", &image).await;
    assert_untouched(&origin_proxy, "origin (insecure hub)");
    assert_served(hub.backend(), &image, "hub registry (insecure)");
}

/// 6. A miss with every endpoint down (refusing, or hanging past its
/// timeout) answers a 5xx in the OCI envelope within seconds; once the
/// breakers are open, at once and without contacting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_down_answers_a_fast_5xx() {
    let http = tools::http_client();
    let blob = format!("sha256:{}", "ab".repeat(32));

    // Both refusing.
    let (berth, _cfg) = start_berth(&docker_io_config(
        &format!("url = \"http://127.0.0.1:{}\"", dead_port()),
        &format!("http://127.0.0.1:{}/{PROJECT}", dead_port()),
        "",
    ))
    .await;
    for (what, url) in [
        (
            "manifest",
            format!("{}/v2/{NAME}/manifests/1.0", berth.url()),
        ),
        ("blob", format!("{}/v2/{NAME}/blobs/{blob}", berth.url())),
    ] {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(30), http.get(&url).send())
            .await
            .unwrap_or_else(|_| panic!("{what}: berth hung"))
            .unwrap();
        let took = started.elapsed();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert!(
            (500..600).contains(&status),
            "{what}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        let (code, detail) = envelope(&body);
        assert!(!code.is_empty(), "{what}: {detail}");
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    }
    drop(berth);

    // The hub hangs past its 1 s read timeout, the origin refuses.
    let hang = CountingProxy::start(&format!("http://127.0.0.1:{}", dead_port())).await;
    hang.set_delay(Duration::from_secs(60));
    let (berth, _cfg) = start_berth(&docker_io_config(
        &format!("url = \"http://127.0.0.1:{}\"", dead_port()),
        &format!("{}/{PROJECT}", hang.url()),
        "read_timeout = \"1s\"",
    ))
    .await;
    let mut statuses = Vec::new();
    for (what, url) in [
        (
            "manifest",
            format!("{}/v2/{NAME}/manifests/1.0", berth.url()),
        ),
        ("blob", format!("{}/v2/{NAME}/blobs/{blob}", berth.url())),
        (
            "manifest again",
            format!("{}/v2/{NAME}/manifests/2.0", berth.url()),
        ),
    ] {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(30), http.get(&url).send())
            .await
            .unwrap_or_else(|_| panic!("{what}: berth hung"))
            .unwrap();
        let took = started.elapsed();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        assert!(
            (500..600).contains(&status),
            "{what}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        envelope(&body);
        assert!(took < Duration::from_secs(10), "{what} took {took:?}");
        statuses.push(status);
    }
    assert_eq!(
        hang.requests().len(),
        1,
        "the hanging hub cost one timeout; later misses skipped it: {:#?}",
        hang.requests()
    );
    eprintln!("all down statuses: {statuses:?}");
}
