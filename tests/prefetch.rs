//! `berth prefetch` against a real distribution origin (behind a counting
//! proxy): glob rules select some repositories and tags and not others, one
//! platform only; the cache then serves them with no upstream request;
//! repository and tag listings are followed across pages (distribution 2.8
//! pages `_catalog` but ignores `n` on `tags/list`, so a small in-test
//! server pages tag lists with `Link`); `berth ls` shows the result; a
//! bandwidth cap measurably slows a prefetch; SIGINT and SIGTERM stop it
//! within a couple of seconds leaving no temporary file and no tag of an
//! incomplete image; the daemon prefetches on start.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::berth::{blob_path, cli_command, output_text, run_cli, tmp_files, Berth};
use common::content::{self, Image, Index, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools::{self, ChildGuard};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `berth <args>` to completion, logging at info.
async fn berth(args: &[&str]) -> Output {
    run_cli(args, "info").await
}

const KIB: usize = 1024;

async fn ls(cache: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["ls", "--json", "--cache-dir", cache.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = berth(&args).await;
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A reverse proxy that pages `tags/list` itself, `n` at a time, sorted,
/// with `Link: <...>; rel="next"`; everything else is forwarded as is.
struct Paginator {
    addr: SocketAddr,
    tag_pages: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Paginator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type PBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

impl Paginator {
    async fn start(upstream: &str) -> Paginator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tag_pages = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.trim_end_matches('/').to_owned();
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let pages = tag_pages.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (upstream, client, pages) = (upstream.clone(), client.clone(), pages.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, upstream.clone(), client.clone(), pages.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Paginator {
            addr,
            tag_pages,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn full(b: impl Into<Bytes>) -> PBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

async fn handle(
    mut req: Request<Incoming>,
    upstream: String,
    client: Client<HttpConnector, Incoming>,
    pages: Arc<AtomicUsize>,
) -> Result<Response<PBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    if req.method() == http::Method::GET && path.ends_with("/tags/list") {
        pages.fetch_add(1, Ordering::SeqCst);
        let q: Vec<(String, String)> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let all: Value = tools::http_client()
            .get(format!("{upstream}{path}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut tags: Vec<String> = serde_json::from_value(all["tags"].clone()).unwrap();
        tags.sort();
        if let Some(last) = get("last") {
            tags.retain(|t| *t > last);
        }
        let n: usize = get("n").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
        let more = tags.len() > n;
        tags.truncate(n);
        let body = serde_json::json!({"name": all["name"], "tags": tags}).to_string();
        let mut resp = Response::new(full(body));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        if more {
            let link = format!("<{path}?n={n}&last={}>; rel=\"next\"", tags.last().unwrap());
            resp.headers_mut().insert("link", link.parse().unwrap());
        }
        return Ok(resp);
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    *req.uri_mut() = format!("{upstream}{pq}").parse().unwrap();
    req.headers_mut().remove("host");
    match client.request(req).await {
        Ok(r) => Ok(r.map(|b| b.boxed())),
        Err(_) => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(r)
        }
    }
}

/// Index over amd64 + arm64 (OCI).
fn two_platforms(seed: u64, layer: usize) -> Vec<(&'static str, Image)> {
    vec![
        (
            "amd64",
            content::build_image(seed, 2, layer, MediaKind::Oci, "amd64"),
        ),
        (
            "arm64",
            content::build_image(seed + 1, 2, layer, MediaKind::Oci, "arm64"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_rules_prefetch_exactly_the_matching_tags_for_one_platform() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let origin = Origin::start().await;
    let o = origin.url();
    // library/app: 1.0 1.1 1.2 1.10 2.0 (index); library/tool: 1.5 (image);
    // library/zzz-other, team/app: not matched by the repository globs.
    let mut app: Vec<(String, Index)> = Vec::new();
    for (i, tag) in ["1.0", "1.1", "1.2", "1.10", "2.0"].iter().enumerate() {
        let idx = content::push_index(
            &o,
            "library/app",
            tag,
            &two_platforms(300 + 2 * i as u64, 24 * KIB),
            MediaKind::Oci,
        )
        .await
        .unwrap();
        app.push((tag.to_string(), idx));
    }
    let tool = content::build_image(320, 1, 24 * KIB, MediaKind::Docker, "amd64");
    content::push_image(&o, "library/tool", "1.5", &tool)
        .await
        .unwrap();
    let other = content::build_image(321, 1, 8 * KIB, MediaKind::Oci, "amd64");
    for repo in ["library/zzz-other", "team/app", "team/b", "team/c"] {
        content::push_image(&o, repo, "1.0", &other).await.unwrap();
    }
    let proxy = CountingProxy::start(&o).await;
    let pager = Paginator::start(&proxy.url()).await;

    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let up = format!("docker.io={}", pager.url());
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        "[prefetch]\nimages = [\"library/app:1.*\", \"docker.io/library/t*:**\"]\nmax_tags = 3\nplatforms = [\"linux/amd64\"]\n",
    )
    .unwrap();
    let out = berth(&[
        "prefetch",
        "--config",
        conf.path().to_str().unwrap(),
        "--upstream",
        &up,
        "--pin",
        "library/tool:*",
        "--page-size",
        "2",
        "--cache-dir",
        dir,
    ])
    .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        pager.tag_pages.load(Ordering::SeqCst) >= 3,
        "library/app's 5 tags came in pages of 2"
    );
    assert!(
        proxy.count("GET", "/v2/_catalog") >= 3,
        "7 repositories came in pages of 2: {:?}",
        proxy.requests()
    );

    // Exactly: app 1.1, 1.2, 1.10 (1.* capped at the 3 highest), tool 1.5 (a pin).
    let listed = ls(cache.path(), &["--pin", "library/tool:*"]).await;
    let names: Vec<&str> = listed
        .iter()
        .map(|e| e["image"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "docker.io/library/app:1.1",
            "docker.io/library/app:1.10",
            "docker.io/library/app:1.2",
            "docker.io/library/tool:1.5"
        ]
    );
    for e in &listed {
        let is_tool = e["image"] == "docker.io/library/tool:1.5";
        assert_eq!(e["pinned"], is_tool, "{e}");
        assert_eq!(e["platforms"], serde_json::json!(["linux/amd64"]), "{e}");
        if is_tool {
            assert_eq!(e["complete"], "yes");
        } else {
            assert_eq!(e["complete"], "partial", "{e}");
            assert_eq!(
                e["missing_platforms"],
                serde_json::json!(["linux/arm64/v8"])
            );
        }
    }
    let human = berth(&["ls", "--cache-dir", dir, "--pin", "library/tool:*"]).await;
    let table = String::from_utf8_lossy(&human.stdout);
    assert!(
        table.contains("PINNED") && table.contains("linux/amd64 (+1 not cached)"),
        "{table}"
    );
    for (tag, idx) in &app {
        let amd = &idx.children[0];
        let arm = &idx.children[1];
        let wanted = ["1.1", "1.2", "1.10"].contains(&tag.as_str());
        assert_eq!(
            blob_path(cache.path(), &amd.layers[0].digest).is_file(),
            wanted,
            "{tag}"
        );
        assert!(
            !blob_path(cache.path(), &arm.layers[0].digest).exists(),
            "{tag} arm64"
        );
    }
    assert!(!blob_path(cache.path(), &other.layers[0].digest).exists());

    // The cache serves them without asking upstream.
    proxy.reset();
    let b = Berth::start_with_dir(cache.path(), &["--upstream", &up]).await;
    let client = RegistryClient::new(&b.url());
    for tag in ["1.1", "1.2", "1.10"] {
        let (_, idx) = app.iter().find(|(t, _)| t == tag).unwrap();
        let m = client.get_manifest("library/app", tag).await.unwrap();
        assert_eq!(
            m.docker_content_digest.as_deref(),
            Some(idx.manifest_digest.as_str())
        );
        let amd = &idx.children[0];
        let m = client
            .get_manifest("library/app", &amd.manifest_digest)
            .await
            .unwrap();
        assert_eq!(m.status, 200);
        for blob in amd.blobs() {
            assert_eq!(
                client.get_blob("library/app", &blob.digest).await.unwrap(),
                blob.bytes
            );
        }
    }
    assert_eq!(
        client
            .get_manifest("library/tool", "1.5")
            .await
            .unwrap()
            .status,
        200
    );
    assert!(
        proxy.requests().is_empty(),
        "served from the cache: {:?}",
        proxy.requests()
    );
}

/// An origin behind a proxy paced to `rate` bytes per second, with one
/// 3-layer image of `layer` bytes per layer at `library/big:1`.
async fn slow_origin(seed: u64, layer: usize, rate: Option<u64>) -> (Origin, CountingProxy, Image) {
    let origin = Origin::start().await;
    let img = content::build_image(seed, 3, layer, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/big", "1", &img)
        .await
        .unwrap();
    let proxy = CountingProxy::start(&origin.url()).await;
    proxy.set_body_rate(rate);
    (origin, proxy, img)
}

fn spawn_prefetch(cache: &Path, up: &str, extra: &[&str]) -> ChildGuard {
    let mut cmd = cli_command(
        &[
            "prefetch",
            "--prefetch",
            "library/big:1",
            "--upstream",
            up,
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
        "info",
    );
    cmd.args(extra);
    ChildGuard::spawn("berth-prefetch", cmd).unwrap()
}

async fn wait_exit(child: &mut ChildGuard, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait() {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "prefetch still running after {limit:?}:\n{}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sigterm_stop_a_prefetch_promptly_and_cleanly() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    for (seed, sig) in [(400, Signal::SIGINT), (410, Signal::SIGTERM)] {
        // 3 x 1 MiB at 256 KiB/s: about 12 s if left alone.
        let (_origin, proxy, img) = slow_origin(seed, 1 << 20, Some(256 << 10)).await;
        let cache = tempfile::tempdir().unwrap();
        let up = format!("docker.io={}", proxy.url());
        let mut child = spawn_prefetch(cache.path(), &up, &["--concurrency", "2"]);
        proxy
            .wait_blob_bytes(300 << 10, Duration::from_secs(20))
            .await;
        let signalled = Instant::now();
        child.signal(sig);
        let status = wait_exit(&mut child, Duration::from_secs(5)).await;
        let took = signalled.elapsed();
        eprintln!("{sig:?}: prefetch stopped {took:?} after the signal");
        assert!(took < Duration::from_secs(3), "{sig:?}: took {took:?}");
        assert_eq!(status.code(), Some(130), "{sig:?}: {}", child.log());
        assert!(
            tmp_files(cache.path()).is_empty(),
            "{sig:?}: {:?}",
            tmp_files(cache.path())
        );
        // Nothing half-published: no tag, no manifest; any blob present is whole.
        assert!(ls(cache.path(), &[]).await.is_empty());
        assert!(!blob_path(cache.path(), &img.manifest_digest).exists());
        for b in img.blobs() {
            let p = blob_path(cache.path(), &b.digest);
            if p.exists() {
                assert_eq!(content::digest_of(&std::fs::read(&p).unwrap()), b.digest);
            }
        }
        assert!(!img
            .layers
            .iter()
            .all(|l| blob_path(cache.path(), &l.digest).exists()));

        // A later run (unpaced) completes the image.
        proxy.set_body_rate(None);
        let out = berth(&[
            "prefetch",
            "--prefetch",
            "library/big:1",
            "--upstream",
            &up,
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ])
        .await;
        assert!(out.status.success(), "{}", output_text(&out));
        let listed = ls(cache.path(), &[]).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["complete"], "yes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_cap_slows_a_prefetch() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    // 3 x 512 KiB.
    let (_origin, proxy, _img) = slow_origin(420, 512 << 10, None).await;
    let up = format!("docker.io={}", proxy.url());
    let mut took = Vec::new();
    for cap in [None, Some("512KiB")] {
        let cache = tempfile::tempdir().unwrap();
        let mut args = vec![
            "prefetch",
            "--prefetch",
            "library/big:1",
            "--upstream",
            &up,
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ];
        if let Some(c) = cap {
            args.extend(["--bandwidth", c]);
        }
        let started = Instant::now();
        let out = berth(&args).await;
        took.push(started.elapsed());
        assert!(out.status.success(), "{}", output_text(&out));
    }
    eprintln!("uncapped {:?}, capped at 512KiB/s {:?}", took[0], took[1]);
    // 1.5 MiB at 512 KiB/s: about 3 s (minus a small burst credit).
    assert!(took[1] >= Duration::from_millis(2500), "{took:?}");
    assert!(took[1] > took[0] + Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_prefetches_on_start() {
    if !tools::require_all(&["docker-registry"]) {
        return;
    }
    let (_origin, proxy, img) = slow_origin(430, 64 * KIB, None).await;
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        conf.path(),
        format!(
            "[registries.\"docker.io\"]\nurl = \"{}\"\n\n[prefetch]\nimages = [\"library/big:1\"]\non_start = true\n",
            proxy.url()
        ),
    )
    .unwrap();
    let b = Berth::start(&["--config", conf.path().to_str().unwrap()]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = ls(b.cache_dir(), &[]).await;
        if listed.first().is_some_and(|e| e["complete"] == "yes") {
            break;
        }
        assert!(Instant::now() < deadline, "not prefetched:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.log().contains("prefetch finished"), "{}", b.log());
    proxy.reset();
    let client = RegistryClient::new(&b.url());
    for blob in img.blobs() {
        assert_eq!(
            client.get_blob("library/big", &blob.digest).await.unwrap(),
            blob.bytes
        );
    }
    assert_eq!(
        client
            .get_manifest("library/big", "1")
            .await
            .unwrap()
            .status,
        200
    );
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
}
