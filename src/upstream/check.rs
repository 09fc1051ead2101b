//! `berth check`, like Harbor's "Test Connection": for every configured
//! registry and endpoint, is it reachable (and its TLS valid), does auth
//! work anonymously and with the configured credentials, and how much
//! rate-limit headroom is left. Never prints a secret.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use http::header;

use super::answer::Answer;
use super::auth::{parse_challenge, Challenge};
use super::endpoint::Endpoint;
use super::{redact, Upstreams};
use crate::config::Credentials;
use crate::registry::{Reference, Repository};

/// The outcome for one endpoint.
#[derive(Debug)]
pub struct Report {
    /// Registry host.
    pub registry: String,
    /// Endpoint URL (redacted).
    pub endpoint: String,
    /// `GET /v2/` result: status and latency, or the error.
    pub reachable: Result<(u16, Duration), String>,
    /// Anonymous access: None when not applicable.
    pub anonymous: Option<Result<(), String>>,
    /// Access with the configured credentials: None when there are none.
    pub credentials: Option<Result<(), String>>,
    /// `remaining/limit` from Docker Hub's headers, when the registry sends them.
    pub ratelimit: Option<String>,
}

impl Report {
    /// Whether this endpoint is usable.
    pub fn ok(&self) -> bool {
        self.reachable.is_ok() && !matches!(self.credentials, Some(Err(_)))
    }
}

/// A repository that exists on Docker Hub for rate-limit probes (Docker's
/// documented `ratelimitpreview/test`); HEADs do not count as pulls.
const DOCKER_HUB_PROBE: &str = "ratelimitpreview/test";

/// Check every endpoint of the selected registries (all when empty).
pub async fn run(upstreams: &Upstreams, only: &[String]) -> Vec<Report> {
    let mut out = Vec::new();
    for up in upstreams.iter() {
        if !only.is_empty() && !only.iter().any(|r| r == up.host.as_str()) {
            continue;
        }
        for ep in &up.endpoints {
            out.push(check(ep).await);
        }
    }
    out
}

async fn check(ep: &Endpoint) -> Report {
    let mut report = Report {
        registry: ep.host.to_string(),
        endpoint: redact(ep.base()),
        reachable: Err(String::new()),
        anonymous: None,
        credentials: None,
        ratelimit: None,
    };
    let v2 = ep.root().join("v2/").expect("v2 url");
    let started = Instant::now();
    let resp = match ep.client().get(v2.clone()).send().await {
        Ok(r) => r,
        Err(e) => {
            report.reachable = Err(describe(e));
            return report;
        }
    };
    report.reachable = Ok((resp.status().as_u16(), started.elapsed()));
    let challenge = resp
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge);
    let creds = ep.credentials();
    match (&challenge, resp.status().as_u16()) {
        (_, 200) => report.anonymous = Some(Ok(())),
        (Some(Challenge::Bearer { .. }), 401) => {
            report.anonymous = Some(
                ep.probe_token(challenge.as_ref().expect("bearer"), None)
                    .await,
            );
            if creds.is_some() {
                report.credentials = Some(
                    ep.probe_token(challenge.as_ref().expect("bearer"), creds)
                        .await,
                );
            }
        }
        (Some(Challenge::Basic), 401) => {
            report.anonymous = Some(Err("the endpoint requires Basic credentials".into()));
            if let Some(Credentials::Basic { username, password }) = creds {
                let r = ep
                    .client()
                    .get(v2.clone())
                    .basic_auth(username, Some(password))
                    .send()
                    .await;
                report.credentials = Some(verdict(r, "credentials"));
            }
        }
        (_, s) => report.anonymous = Some(Err(format!("GET /v2/ answered {s}"))),
    }
    if let (Some(Credentials::Token(t)), None) = (creds, &report.credentials) {
        let r = ep.client().get(v2).bearer_auth(t).send().await;
        report.credentials = Some(verdict(r, "token"));
    }
    if ep.root().host_str() == Some("registry-1.docker.io") {
        let repo: Repository = DOCKER_HUB_PROBE.parse().expect("probe repo");
        let reference: Reference = "latest".parse().expect("probe tag");
        if let Ok(limit) = ep.ratelimit(&repo, &reference).await {
            report.ratelimit = limit;
        }
    }
    report
}

/// Whether `what` (credentials, a token) was accepted.
fn verdict(r: reqwest::Result<reqwest::Response>, what: &str) -> Result<(), String> {
    match r {
        Ok(r) if Answer::of(r.status()) == Answer::Success => Ok(()),
        Ok(r) => Err(format!("{what} refused ({})", r.status())),
        Err(e) => Err(describe(e)),
    }
}

fn describe(e: reqwest::Error) -> String {
    let mut msg = String::from(if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    });
    // The full source chain names TLS problems ("invalid peer certificate: UnknownIssuer").
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let _ = write!(msg, ": {s}");
        src = s.source();
    }
    msg
}

/// Human-readable report; the second value is the exit code (0 all good,
/// 1 something is broken).
pub fn render(reports: &[Report]) -> (String, i32) {
    let mut out = String::new();
    let mut broken = false;
    for r in reports {
        let status = if r.ok() { "OK  " } else { "FAIL" };
        broken |= !r.ok();
        let _ = writeln!(out, "{status} {} via {}", r.registry, r.endpoint);
        match &r.reachable {
            Ok((code, took)) => {
                let tls = if r.endpoint.starts_with("https://") {
                    ", TLS verified"
                } else {
                    ", plain HTTP"
                };
                let _ = writeln!(
                    out,
                    "     reachable: GET /v2/ -> {code} in {} ms{tls}",
                    took.as_millis()
                );
            }
            Err(e) => {
                let _ = writeln!(out, "     reachable: NO ({e})");
            }
        }
        let show = |what: &str, v: &Option<Result<(), String>>, out: &mut String| {
            let _ = match v {
                None => writeln!(out, "     {what}: not configured"),
                Some(Ok(())) => writeln!(out, "     {what}: ok"),
                Some(Err(e)) => writeln!(out, "     {what}: {e}"),
            };
        };
        if r.reachable.is_ok() {
            show("anonymous", &r.anonymous, &mut out);
            show("credentials", &r.credentials, &mut out);
        }
        if let Some(rl) = &r.ratelimit {
            let _ = writeln!(out, "     rate limit: {rl}");
        }
    }
    (out, i32::from(broken))
}
