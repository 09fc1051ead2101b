//! The `[registries."<host>"]` tables: each mirrored registry has an ordered
//! list of upstream endpoints (a Harbor-like hub project first, the origin
//! last), each with its own credentials, TLS material, timeouts and
//! bandwidth cap. Credentials come from the file, from environment variables
//! named in it, or from a docker `config.json` (`auths`), e.g. a mounted
//! Kubernetes `dockerconfigjson` Secret.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::values::{err, parse_rate, ConfigError, Credentials};
use crate::registry::RegistryHost;

/// The embedded registry table (`berth serve` with no config).
pub const DEFAULT_REGISTRIES: &[(&str, &str)] = &[
    ("docker.io", "https://registry-1.docker.io"),
    ("ghcr.io", "https://ghcr.io"),
    ("quay.io", "https://quay.io"),
    ("registry.k8s.io", "https://registry.k8s.io"),
    ("gcr.io", "https://gcr.io"),
    ("public.ecr.aws", "https://public.ecr.aws"),
    ("mcr.microsoft.com", "https://mcr.microsoft.com"),
];

/// Connection and auth settings shared by the registry table (for its `url`)
/// and by each `[[registries."<host>".endpoints]]` entry.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileEndpoint {
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    token: Option<String>,
    token_env: Option<String>,
    docker_config: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    insecure: bool,
    #[serde(with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    read_timeout: Option<Duration>,
    bandwidth: Option<String>,
    hub: Option<bool>,
    private_redirects: Option<bool>,
}

/// One `[registries."<host>"]` table.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileRegistry {
    /// Tried in order before `url`.
    endpoints: Vec<FileEndpoint>,
    /// Whether the origin (`url`, or the known origin) is tried last.
    origin_fallback: Option<bool>,
    /// Serve a cached tag even when upstream says it no longer exists.
    serve_stale_on_not_found: bool,
    /// Cached content of this registry is private (see [`RegistryConfig::private`]).
    private: bool,
    #[serde(flatten)]
    origin: FileEndpoint,
}

/// One upstream endpoint, validated.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Full URL; a path is a project prefix (`https://hub/dockerhub-proxy`
    /// sends `docker.io/library/nginx` to `https://hub/v2/dockerhub-proxy/library/nginx`).
    pub url: Url,
    /// Credentials, if any (redacted in `Debug`).
    pub credentials: Option<Credentials>,
    /// Extra PEM CA bundle.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Skip TLS verification (explicit opt-in, warned about at start).
    pub insecure: bool,
    /// Connect timeout override.
    pub connect_timeout: Option<Duration>,
    /// Read timeout override.
    pub read_timeout: Option<Duration>,
    /// Bytes per second cap on blob downloads.
    pub bandwidth: Option<u64>,
    /// A hub (Harbor proxy project): blob HEADs are sent as ranged GETs,
    /// since a hub answers 404 to HEAD on blobs it has not cached yet.
    pub hub: bool,
    /// Follow redirects (and fetch token realms) into loopback, link-local
    /// or private addresses, given literally or as a name that resolves
    /// there (`upstream::resolve`). Default: only when the endpoint itself
    /// is at such an address. The endpoint's own host and the proxy hosts
    /// may resolve there regardless.
    pub private_redirects: Option<bool>,
}

/// A mirrored registry, validated.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The registry host clients name (`docker.io`).
    pub host: RegistryHost,
    /// Endpoints in the order they are tried.
    pub endpoints: Vec<EndpointConfig>,
    /// Serve a cached tag even when upstream answers that it is gone.
    pub serve_stale_on_not_found: bool,
    /// Content is private: only clients that select the registry with
    /// `?ns=` (containerd on this node) or present the client token may
    /// read it; path-style names are refused otherwise; every access is logged.
    /// Its cached content is handed to requests through another registry
    /// only once that registry proved it serves it (`cache::provenance`).
    pub private: bool,
}

impl RegistryConfig {
    /// The first endpoint's URL (for logs and simple setups).
    pub fn primary_url(&self) -> &Url {
        &self.endpoints[0].url
    }
}

/// Where environment variables come from (injectable for tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Build the registry table: embedded defaults, then the file, then
/// `--upstream REGISTRY=URL` flags (which replace the origin URL).
pub fn build(
    file: BTreeMap<String, FileRegistry>,
    flags: &[String],
    global_docker_config: Option<&Path>,
    where_: &str,
    env: Env<'_>,
) -> Result<BTreeMap<RegistryHost, RegistryConfig>, ConfigError> {
    let known: HashMap<&str, &str> = DEFAULT_REGISTRIES.iter().copied().collect();
    let mut out = BTreeMap::new();
    for (host, url) in DEFAULT_REGISTRIES {
        let host: RegistryHost = host.parse().expect("default host");
        out.insert(
            host.clone(),
            plain(host, Url::parse(url).expect("default url")),
        );
    }
    let mut flag_urls = BTreeMap::new();
    for spec in flags {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| err(format!("--upstream {spec:?}: expected REGISTRY=URL")))?;
        let host: RegistryHost = name.parse().map_err(|_| {
            err(format!(
                "--upstream {spec:?}: {name:?} is not a registry host"
            ))
        })?;
        let url = parse_url(url).map_err(|e| err(format!("--upstream {spec:?}: {e}")))?;
        flag_urls.insert(host, url);
    }
    for (name, reg) in file {
        let host: RegistryHost = name.parse().map_err(|_| {
            err(format!(
                "{where_}: registries.\"{name}\": not a registry host name"
            ))
        })?;
        let ctx = format!("{where_}: registries.\"{name}\"");
        let mut endpoints = Vec::new();
        for (i, ep) in reg.endpoints.iter().enumerate() {
            let ctx = format!("{ctx}.endpoints[{i}]");
            let url = ep
                .url
                .as_deref()
                .ok_or_else(|| err(format!("{ctx}: `url` is required")))?;
            let url = parse_url(url).map_err(|e| err(format!("{ctx}.url: {e}")))?;
            endpoints.push(endpoint(url, ep, global_docker_config, &ctx, env)?);
        }
        let origin_url = match (
            &reg.origin.url,
            flag_urls.remove(&host),
            known.get(host.as_str()),
        ) {
            (_, Some(flag), _) => Some(flag),
            (Some(u), None, _) => Some(parse_url(u).map_err(|e| err(format!("{ctx}.url: {e}")))?),
            (None, None, Some(k)) => Some(Url::parse(k).expect("default url")),
            (None, None, None) => None,
        };
        if reg.origin_fallback.unwrap_or(true) {
            if let Some(url) = origin_url {
                endpoints.push(endpoint(url, &reg.origin, global_docker_config, &ctx, env)?);
            }
        } else if reg.origin.url.is_some() {
            return Err(err(format!(
                "{ctx}: `url` and `origin_fallback = false` contradict each other"
            )));
        }
        if endpoints.is_empty() {
            return Err(err(format!(
                "{ctx}: `url` or `endpoints` is required for a registry berth does not know"
            )));
        }
        out.insert(
            host.clone(),
            RegistryConfig {
                host,
                endpoints,
                serve_stale_on_not_found: reg.serve_stale_on_not_found,
                private: reg.private,
            },
        );
    }
    for (host, url) in flag_urls {
        match out.get_mut(&host) {
            Some(reg) => {
                let last = reg.endpoints.last_mut().expect("at least one endpoint");
                last.url = url;
            }
            None => {
                out.insert(host.clone(), plain(host, url));
            }
        }
    }
    Ok(out)
}

/// A registry with one endpoint at `url` and nothing else set.
fn plain(host: RegistryHost, url: Url) -> RegistryConfig {
    let ep = endpoint(url, &FileEndpoint::default(), None, "", &|_| None);
    RegistryConfig {
        host,
        endpoints: vec![ep.expect("an endpoint with only a URL is valid")],
        serve_stale_on_not_found: false,
        private: false,
    }
}

fn endpoint(
    url: Url,
    ep: &FileEndpoint,
    global_docker_config: Option<&Path>,
    ctx: &str,
    env: Env<'_>,
) -> Result<EndpointConfig, ConfigError> {
    let from_env = |var: &Option<String>, what: &str| -> Result<Option<String>, ConfigError> {
        match var {
            None => Ok(None),
            Some(name) => env(name)
                .filter(|v| !v.is_empty())
                .map(Some)
                .ok_or_else(|| {
                    err(format!(
                        "{ctx}.{what}: environment variable {name} is not set"
                    ))
                }),
        }
    };
    // `what` in the file, or the variable that `what_env` names; not both.
    let either = |value: &Option<String>, var: &Option<String>, what: &str| match (
        value,
        from_env(var, &format!("{what}_env"))?,
    ) {
        (Some(_), Some(_)) => Err(err(format!(
            "{ctx}: give `{what}` or `{what}_env`, not both"
        ))),
        (v, e) => Ok(v.clone().or(e)),
    };
    let password = either(&ep.password, &ep.password_env, "password")?;
    let token = either(&ep.token, &ep.token_env, "token")?;
    let mut credentials = match (ep.username.clone(), password, token) {
        (None, None, None) => None,
        (Some(username), Some(password), None) => Some(Credentials::Basic { username, password }),
        (None, None, Some(token)) => Some(Credentials::Token(token)),
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(err(format!("{ctx}: `username` and `password` go together")))
        }
        _ => {
            return Err(err(format!(
                "{ctx}: give either `username`/`password` or `token`, not both"
            )))
        }
    };
    if credentials.is_none() {
        if let Some(path) = ep.docker_config.as_deref().or(global_docker_config) {
            credentials = docker_config_credentials(path, &url)
                .map_err(|e| err(format!("{ctx}.docker_config: {e}")))?;
        }
    }
    for (what, p) in [
        ("ca_file", &ep.ca_file),
        ("client_cert", &ep.client_cert),
        ("client_key", &ep.client_key),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(err(format!(
                    "{ctx}.{what}: {} is not a readable file",
                    p.display()
                )));
            }
        }
    }
    let client_identity = match (&ep.client_cert, &ep.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => {
            return Err(err(format!(
                "{ctx}: `client_cert` and `client_key` go together"
            )))
        }
    };
    let bandwidth = match &ep.bandwidth {
        None => None,
        Some(s) => Some(parse_rate(s).ok_or_else(|| {
            err(format!(
                "{ctx}.bandwidth: {s:?} is not a byte rate such as \"50MiB\" (per second)"
            ))
        })?),
    };
    let hub = ep
        .hub
        .unwrap_or_else(|| !url.path().trim_matches('/').is_empty());
    Ok(EndpointConfig {
        url,
        credentials,
        ca_file: ep.ca_file.clone(),
        client_identity,
        insecure: ep.insecure,
        connect_timeout: ep.connect_timeout,
        read_timeout: ep.read_timeout,
        bandwidth,
        hub,
        private_redirects: ep.private_redirects,
    })
}

/// Validate an upstream URL.
pub fn parse_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{s:?}: the scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("put credentials in `username`/`password`, not in the URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?}: an upstream URL takes no query or fragment"));
    }
    Ok(url)
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

/// Credentials for `url`'s host from a docker `config.json` (or a
/// Kubernetes `.dockerconfigjson`). Docker Hub's entry is keyed
/// `https://index.docker.io/v1/`.
pub fn docker_config_credentials(path: &Path, url: &Url) -> Result<Option<Credentials>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: DockerConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => return Ok(None),
    };
    const DOCKER_HUB: [&str; 3] = ["registry-1.docker.io", "docker.io", "index.docker.io"];
    let docker_hub = DOCKER_HUB.contains(&host.as_str());
    let key_host = |k: &str| -> String {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next().unwrap_or("").to_owned()
    };
    let entry = cfg.auths.iter().find(|(k, _)| {
        let kh = key_host(k);
        kh == host || (docker_hub && DOCKER_HUB.contains(&kh.as_str()))
    });
    let Some((key, a)) = entry else {
        return Ok(None);
    };
    if let Some(t) = &a.registrytoken {
        return Ok(Some(Credentials::Token(t.clone())));
    }
    if let (Some(u), Some(p)) = (&a.username, &a.password) {
        return Ok(Some(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        }));
    }
    if let Some(auth) = &a.auth {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("auths[{key:?}].auth is not base64"))?;
        let raw =
            String::from_utf8(raw).map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
        let (u, p) = raw
            .split_once(':')
            .ok_or_else(|| format!("auths[{key:?}].auth is not user:password"))?;
        return Ok(Some(Credentials::Basic {
            username: u.to_owned(),
            password: p.to_owned(),
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(
        text: &str,
        flags: &[&str],
        env: Env<'_>,
    ) -> Result<BTreeMap<RegistryHost, RegistryConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            registries: BTreeMap<String, FileRegistry>,
        }
        let f: F = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        build(f.registries, &flags, None, "test", env)
    }

    #[test]
    fn hub_first_then_origin() {
        let env = |k: &str| (k == "HARBOR_PW").then(|| "pw".to_string());
        let r = parse(
            r#"
            [registries."docker.io"]
            [[registries."docker.io".endpoints]]
            url = "https://harbor.example.com/dockerhub-proxy"
            username = "robot$berth"
            password_env = "HARBOR_PW"
            bandwidth = "10MiB"
            connect_timeout = "1s"
            "#,
            &[],
            &env,
        )
        .unwrap();
        let d = &r[&"docker.io".parse().unwrap()];
        assert_eq!(d.endpoints.len(), 2);
        assert!(d.endpoints[0].hub);
        assert_eq!(d.endpoints[0].bandwidth, Some(10 << 20));
        assert!(
            matches!(&d.endpoints[0].credentials, Some(Credentials::Basic { password, .. }) if password == "pw")
        );
        assert_eq!(d.endpoints[1].url.as_str(), "https://registry-1.docker.io/");
        assert!(!d.endpoints[1].hub);
        assert!(
            !format!("{d:?}").contains("\"pw\""),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn flags_replace_the_origin_and_add_registries() {
        let r = parse(
            "[registries.\"docker.io\"]\norigin_fallback = true\n[[registries.\"docker.io\".endpoints]]\nurl = \"http://127.0.0.1:1/p\"\n",
            &["docker.io=http://127.0.0.1:2", "new.io=http://127.0.0.1:3"],
            &no_env,
        )
        .unwrap();
        let d = &r[&"docker.io".parse().unwrap()];
        assert_eq!(d.endpoints[1].url.as_str(), "http://127.0.0.1:2/");
        assert!(r.contains_key(&"new.io".parse().unwrap()));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, named) in [
            (
                "[registries.\"docker.io\"]\npassword_env = \"NOPE\"\nusername = \"u\"\n",
                "NOPE",
            ),
            (
                "[registries.\"x.io\"]\norigin_fallback = false\n",
                "required",
            ),
            (
                "[registries.\"x.io\"]\nurl = \"http://a\"\nbandwidth = \"50%\"\n",
                "bandwidth",
            ),
            (
                "[registries.\"x.io\"]\nurl = \"http://a\"\nclient_cert = \"/nonexistent\"\n",
                "client_cert",
            ),
            (
                "[registries.\"x.io\"]\n[[registries.\"x.io\".endpoints]]\nurll = \"http://a\"\n",
                "urll",
            ),
        ] {
            let e = parse(text, &[], &no_env).unwrap_err();
            assert!(e.0.contains(named), "{e}");
        }
    }

    #[test]
    fn docker_config_json() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("hubuser:hubpass");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"harbor.example.com":{{"username":"robot","password":"pw"}}}}}}"#),
        )
        .unwrap();
        let hub =
            docker_config_credentials(&p, &Url::parse("https://registry-1.docker.io").unwrap())
                .unwrap();
        assert_eq!(
            hub,
            Some(Credentials::Basic {
                username: "hubuser".into(),
                password: "hubpass".into()
            })
        );
        let h =
            docker_config_credentials(&p, &Url::parse("https://harbor.example.com/proj").unwrap())
                .unwrap();
        assert_eq!(
            h,
            Some(Credentials::Basic {
                username: "robot".into(),
                password: "pw".into()
            })
        );
        assert_eq!(
            docker_config_credentials(&p, &Url::parse("https://ghcr.io").unwrap()).unwrap(),
            None
        );
    }
}
