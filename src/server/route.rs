//! Parse a request once into a validated [`Route`]: which API, which
//! registry (from `?ns=`, a path-style host, or the default), which
//! repository and reference. Nothing downstream sees raw request strings.

use http::Method;

use crate::error::Error;
use crate::registry::digest::DigestError;
use crate::registry::reference::ReferenceError;
use crate::registry::{
    docker_repository, split_registry, Digest, Reference, RegistryHost, Repository,
};

/// The repository a request is about, with the registry it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The mirrored registry.
    pub registry: RegistryHost,
    /// Repository within it (Docker Hub names normalised to `library/x`).
    pub repo: Repository,
    /// Set when `?ns=` chose the registry: echoed as `OCI-Namespace`.
    pub ns: Option<String>,
    /// Set when the registry was the first path segment (`/v2/ghcr.io/...`);
    /// `Link` headers from upstream are rewritten to keep that prefix.
    pub path_style: bool,
}

/// Every API berth answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`
    Ping,
    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    Manifest(Target, Reference),
    /// `GET|HEAD /v2/<name>/blobs/<digest>`
    Blob(Target, Digest),
    /// `GET /v2/<name>/tags/list`
    Tags(Target),
    /// `GET /v2/<name>/referrers/<digest>`
    Referrers(Target, Digest),
    /// `GET /livez`
    Livez,
    /// `GET /readyz`
    Readyz,
    /// `GET /metrics`
    Metrics,
}

impl Route {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::Tags(_) => "tags",
            Route::Referrers(..) => "referrers",
            Route::Livez => "livez",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
        }
    }
}

/// The registry for requests that name none, and which ones are mirrored.
pub struct Registries<'a> {
    /// Default registry.
    pub default: &'a RegistryHost,
    /// Whether a host is mirrored.
    pub mirrored: &'a (dyn Fn(&RegistryHost) -> bool + Sync),
}

/// Longest request path berth reads.
const MAX_PATH: usize = 2048;

/// Parse method, path and query.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    regs: &Registries<'_>,
) -> Result<Route, Error> {
    if path.len() > MAX_PATH {
        return Err(Error::NameInvalid("request path too long".into()));
    }
    let read_only = |r: Route| -> Result<Route, Error> {
        match *method {
            Method::GET | Method::HEAD => Ok(r),
            Method::DELETE => Err(Error::Unsupported("delete")),
            _ => Err(Error::Unsupported("push")),
        }
    };
    match path {
        "/livez" => return read_only(Route::Livez),
        "/readyz" => return read_only(Route::Readyz),
        "/metrics" => return read_only(Route::Metrics),
        "/v2" | "/v2/" => return read_only(Route::Ping),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(Error::NotFound(path.to_owned()));
    };
    if rest == "_catalog" || rest.starts_with("_catalog?") {
        return Err(Error::Unsupported("catalog"));
    }
    if rest.contains("/blobs/uploads") {
        return Err(Error::Unsupported("push"));
    }
    let ns = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return read_only(Route::Tags(target(name, ns, regs)?));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let t = target(name, ns, regs)?;
        let r = reference.parse::<Reference>().map_err(|e| match e {
            ReferenceError::Tag(s) => Error::TagInvalid(s),
            ReferenceError::Digest(d) => digest_error(d),
        })?;
        return read_only(Route::Manifest(t, r));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let t = target(name, ns, regs)?;
        return read_only(Route::Blob(t, digest.parse().map_err(digest_error)?));
    }
    if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        let t = target(name, ns, regs)?;
        return read_only(Route::Referrers(t, digest.parse().map_err(digest_error)?));
    }
    Err(Error::NotFound(path.to_owned()))
}

fn digest_error(e: DigestError) -> Error {
    Error::DigestInvalid(e.to_string())
}

/// Which registry and repository a name means (PROTOCOL.md 4.1 `?ns=`;
/// path-style for clients that cannot send it).
fn target(name: &str, ns: Option<String>, regs: &Registries<'_>) -> Result<Target, Error> {
    let (registry, repo, path_style) = match &ns {
        Some(ns) => {
            let host: RegistryHost = ns.parse().map_err(|_| Error::RegistryUnknown(ns.clone()))?;
            (host, name, false)
        }
        None => match split_registry(name) {
            (Some(first), rest) => {
                let host: RegistryHost = first
                    .parse()
                    .map_err(|_| Error::NameInvalid(name.to_owned()))?;
                (host, rest, true)
            }
            (None, _) => (regs.default.clone(), name, false),
        },
    };
    if !(regs.mirrored)(&registry) {
        return Err(Error::RegistryUnknown(registry.to_string()));
    }
    // Docker Hub's official images live under library/ (PEERS.md 2.2 #8).
    let repo: Repository = docker_repository(&registry, repo)
        .parse()
        .map_err(Error::NameInvalid)?;
    Ok(Target {
        registry,
        repo,
        ns,
        path_style,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: Method, path: &str, query: Option<&str>) -> Result<Route, Error> {
        let default: RegistryHost = "docker.io".parse().unwrap();
        let mirrored =
            |h: &RegistryHost| ["docker.io", "ghcr.io", "localhost:5000"].contains(&h.as_str());
        parse(
            &method,
            path,
            query,
            &Registries {
                default: &default,
                mirrored: &mirrored,
            },
        )
    }

    fn target_of(r: Route) -> Target {
        match r {
            Route::Manifest(t, _) | Route::Blob(t, _) | Route::Tags(t) | Route::Referrers(t, _) => {
                t
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ns_routing() {
        let t = target_of(
            p(
                Method::GET,
                "/v2/library/nginx/manifests/latest",
                Some("ns=docker.io"),
            )
            .unwrap(),
        );
        assert_eq!(
            (t.registry.as_str(), t.repo.as_str(), t.ns.as_deref()),
            ("docker.io", "library/nginx", Some("docker.io"))
        );
        let t = target_of(p(Method::HEAD, "/v2/org/app/manifests/v1", Some("ns=ghcr.io")).unwrap());
        assert_eq!(t.registry.as_str(), "ghcr.io");
    }

    #[test]
    fn path_style_and_default() {
        let t = target_of(p(Method::GET, "/v2/ghcr.io/org/app/tags/list", None).unwrap());
        assert_eq!(
            (t.registry.as_str(), t.repo.as_str(), t.path_style),
            ("ghcr.io", "org/app", true)
        );
        let t = target_of(p(Method::GET, "/v2/docker.io/nginx/manifests/1", None).unwrap());
        assert_eq!(t.repo.as_str(), "library/nginx");
        let t = target_of(p(Method::GET, "/v2/nginx/manifests/1", None).unwrap());
        assert_eq!(
            (t.registry.as_str(), t.repo.as_str()),
            ("docker.io", "library/nginx")
        );
        let t = target_of(p(Method::GET, "/v2/localhost:5000/a/manifests/1", None).unwrap());
        assert_eq!(t.registry.as_str(), "localhost:5000");
    }

    #[test]
    fn refusals() {
        use crate::registry::ErrorCode as C;
        let long = format!("GET /v2/{}/manifests/1", "a".repeat(300));
        for (request, code) in [
            ("GET /v2/x/manifests/1?ns=evil.example", C::NameUnknown),
            ("GET /v2/quay.io/x/manifests/1", C::NameUnknown),
            ("GET /v2/../etc/passwd/manifests/1", C::NameInvalid),
            ("GET /v2/a/%2e%2e/manifests/1", C::NameInvalid),
            ("GET /v2/Upper/manifests/1", C::NameInvalid),
            ("GET /v2/a/manifests/-bad", C::ManifestInvalid),
            ("GET /v2/a/blobs/sha256:123", C::DigestInvalid),
            ("GET /v2/a/blobs/md5:abc", C::DigestInvalid),
            ("PUT /v2/a/manifests/1", C::Unsupported),
            ("DELETE /v2/a/manifests/1", C::Unsupported),
            ("POST /v2/a/blobs/uploads/", C::Unsupported),
            ("GET /v2/_catalog", C::Unsupported),
            (&long, C::NameInvalid),
        ] {
            let (method, target) = request.split_once(' ').unwrap();
            let (path, query) = target
                .split_once('?')
                .map_or((target, None), |(p, q)| (p, Some(q)));
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert_eq!(
                p(method, path, query).unwrap_err().code(),
                code,
                "{request}"
            );
        }
        assert_eq!(
            p(Method::GET, "/v2/a/nothing", None).unwrap_err().status(),
            404
        );
    }
}
