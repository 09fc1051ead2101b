//! Observability against real tools: the scraped payload passes
//! `promtool check metrics`, a real Prometheus scrapes berth and sees a
//! counter move, counters equal what the origin actually served, and the
//! alerting rules and dashboard queries parse and behave (promtool).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::berth::{settled, Berth};
use common::content::{self, MediaKind, RegistryClient};
use common::origin::Origin;
use common::proxy::CountingProxy;
use common::tools::{self, free_port, http_client, ChildGuard};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Parse the text format into `name{labels}` -> value (labels as written).
fn samples(payload: &str) -> HashMap<String, f64> {
    payload
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            k.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(addr: &str) -> String {
    tools::metrics_text(&format!("http://{addr}")).await
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn counters_match_what_the_origin_served_and_pass_promtool() {
    if !tools::require("docker-registry") || !tools::require("promtool") {
        return;
    }
    let origin = Origin::start().await;
    let proxy = CountingProxy::start(&origin.url()).await;
    let image = content::build_image(41, 3, 32 * 1024, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/metered", "1", &image)
        .await
        .unwrap();
    proxy.reset();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let up = format!("docker.io={}", proxy.url());
    let berth = Berth::start(&["--upstream", &up, "--metrics-listen", &metrics_addr]).await;

    // Two full pulls by tag: the first misses, the second hits.
    let via = RegistryClient::new(&berth.url());
    for _ in 0..2 {
        assert_eq!(
            via.get_manifest("library/metered", "1")
                .await
                .unwrap()
                .status,
            200
        );
        for b in image.blobs() {
            assert_eq!(
                via.get_blob("library/metered", &b.digest).await.unwrap(),
                b.bytes
            );
        }
    }
    let n = image.blobs().count() as f64;
    let payload = scrape(&metrics_addr).await;
    let s = samples(&payload);
    assert_eq!(
        value(
            &s,
            "berth_cache_requests_total",
            &[("kind", "blob"), ("result", "miss")]
        ),
        n
    );
    assert_eq!(
        value(
            &s,
            "berth_cache_requests_total",
            &[("kind", "blob"), ("result", "hit")]
        ),
        n
    );
    assert_eq!(proxy.blob_gets() as f64, n, "origin blob GETs == misses");
    assert_eq!(
        value(
            &s,
            "berth_upstream_requests_total",
            &[("kind", "blob"), ("status", "200")]
        ),
        proxy.blob_gets() as f64
    );
    assert_eq!(
        value(&s, "berth_upstream_bytes_total", &[("kind", "blob")]),
        proxy.blob_bytes_served() as f64
    );
    assert_eq!(
        value(&s, "berth_served_bytes_total", &[("source", "cache")]),
        image.blob_bytes() as f64
    );
    assert_eq!(
        value(&s, "berth_served_bytes_total", &[("source", "upstream")]),
        image.blob_bytes() as f64
    );
    assert_eq!(
        value(
            &s,
            "berth_http_requests_total",
            &[("route", "blob"), ("method", "GET"), ("status", "200")]
        ),
        2.0 * n
    );
    assert_eq!(value(&s, "berth_build_info", &[]), 1.0);
    assert_eq!(value(&s, "berth_inflight_fetches", &[]), 0.0);
    assert!(value(&s, "berth_cache_size_bytes", &[]) >= image.blob_bytes() as f64);
    assert!(value(&s, "berth_cache_filesystem_size_bytes", &[]) > 0.0);

    let (ok, out) = promtool(&["check", "metrics"], Some(&payload));
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");

    // The registry listener does not expose /metrics when a metrics listener is set;
    // the metrics listener serves only probes and metrics.
    let r = http_client()
        .get(format!("{}/metrics", berth.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for probe in ["livez", "readyz"] {
        let r = http_client()
            .get(format!("http://{metrics_addr}/{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{probe}");
    }
    let r = http_client()
        .get(format!("http://{metrics_addr}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_real_prometheus_scrapes_berth() {
    if !tools::require("docker-registry") || !tools::require("prometheus") {
        return;
    }
    let origin = Origin::start().await;
    let image = content::build_image(42, 1, 4096, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/scraped", "1", &image)
        .await
        .unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let up = format!("docker.io={}", origin.url());
    let berth = Berth::start(&["--upstream", &up, "--metrics-listen", &metrics_addr]).await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {ROOT}/deploy/prometheus/rules.yaml\n\
             scrape_configs:\n  - job_name: berth\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--web.enable-lifecycle");
    let mut prom = ChildGuard::spawn("prometheus", cmd).unwrap();
    let api = format!("http://127.0.0.1:{port}");
    prom.wait_http(&format!("{api}/-/ready"), &[200], Duration::from_secs(30))
        .await
        .unwrap();

    let query = |q: &'static str| {
        let api = api.clone();
        async move {
            let v: serde_json::Value = http_client()
                .get(format!("{api}/api/v1/query"))
                .query(&[("query", q)])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while query("up{job=\"berth\"}").await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "target never up: {}",
            prom.log_tail(4000)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Traffic, then the counter must show up in Prometheus.
    let via = RegistryClient::new(&berth.url());
    via.get_manifest("library/scraped", "1").await.unwrap();
    for b in image.blobs() {
        via.get_blob("library/scraped", &b.digest).await.unwrap();
    }
    let expected = image.blobs().count() as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got =
            query("sum(berth_cache_requests_total{job=\"berth\",kind=\"blob\",result=\"miss\"})")
                .await;
        if got == Some(expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counter never reached {expected}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The alerting rules loaded into the real Prometheus without errors.
    let rules: serde_json::Value = http_client()
        .get(format!("{api}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g["name"] == "berth"), "{rules}");
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "{r}");
        }
    }
}

#[test]
fn alerting_rules_and_dashboard_queries_pass_promtool() {
    if !tools::require("promtool") {
        return;
    }
    let rules = format!("{ROOT}/deploy/prometheus/rules.yaml");
    let (ok, out) = promtool(&["check", "rules", &rules], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &[
            "test",
            "rules",
            &format!("{ROOT}/deploy/prometheus/rules_test.yaml"),
        ],
        None,
    );
    assert!(ok, "{out}");

    // Every dashboard expression, wrapped as a recording rule, must parse,
    // and every metric it names must exist in berth.
    let known: Vec<String> = berth::metrics::Metrics::register()
        .unwrap()
        .describe()
        .into_iter()
        .map(|d| d.0)
        .collect();
    for path in dashboards() {
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&dash, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        let mut groups = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, e) in exprs.iter().enumerate() {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            groups.push_str(&format!(
                "      - record: dashboard:expr{i}\n        expr: {}\n",
                serde_json::to_string(&e).unwrap()
            ));
            for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("berth_") {
                    let base = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_sum")
                        .trim_end_matches("_count");
                    assert!(
                        known.iter().any(|k| k == base || k == word),
                        "{}: unknown metric {word}",
                        path.display()
                    );
                }
            }
        }
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), groups).unwrap();
        let (ok, out) = promtool(&["check", "rules", tmp.path().to_str().unwrap()], None);
        assert!(ok, "{}: {out}", path.display());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("__inputs") && !text.contains("${DS_"),
            "dashboards must not need an import step"
        );
    }
}

fn dashboards() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for dir in ["deploy/dashboards", "deploy/helm/berth/dashboards"] {
        let d = Path::new(ROOT).join(dir);
        if let Ok(rd) = std::fs::read_dir(&d) {
            out.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json")),
            );
        }
    }
    out
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_owned());
                    }
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn json_access_log_has_one_line_per_request() {
    if !tools::require("docker-registry") {
        return;
    }
    let origin = Origin::start().await;
    let image = content::build_image(43, 1, 2048, MediaKind::Oci, "amd64");
    content::push_image(&origin.url(), "library/logged", "1", &image)
        .await
        .unwrap();
    let up = format!("docker.io={}", origin.url());
    let berth = Berth::start(&["--upstream", &up, "--log-format", "json"]).await;
    let via = RegistryClient::new(&berth.url());
    via.get_blob("library/logged", &image.layers[0].digest)
        .await
        .unwrap();
    assert!(settled(berth.cache_dir()).await);
    via.get_blob("library/logged", &image.layers[0].digest)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = berth
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty(), "every log line is JSON: {}", berth.log());
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "berth::access" && l["route"] == "blob")
        .collect();
    assert_eq!(access.len(), 2, "one access line per request");
    assert_eq!(access[0]["result"], "miss");
    assert_eq!(access[1]["result"], "hit");
    for a in &access {
        assert_eq!(a["status"], 200);
        assert_eq!(a["registry"], "docker.io");
        assert_eq!(a["repo"], "library/logged");
        assert!(a["duration_ms"].as_f64().is_some() && a["bytes"].is_string());
    }
}
