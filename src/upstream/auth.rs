//! Upstream authentication: `WWW-Authenticate` challenges, bearer tokens
//! fetched anonymously or with credentials and cached per scope until they
//! expire, and Basic auth (PROTOCOL.md 4.4).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use url::Url;

use super::answer::Answer;
use crate::config::Credentials;
use crate::error::Error;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm=...,service=...,scope=...`
    Bearer {
        /// Token endpoint.
        realm: String,
        /// `service` parameter to pass on.
        service: Option<String>,
        /// `scope` the registry asked for.
        scope: Option<String>,
    },
    /// `Basic realm=...`
    Basic,
}

/// Parse the first challenge berth understands from a `WWW-Authenticate` value.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    } else if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else {
        None
    }
}

/// `k="v", k2=v2` with quoted strings that may contain commas and `\"`.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// A bearer token. `Debug` never prints it.
#[derive(Clone)]
pub struct Token {
    value: Arc<str>,
    expires: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

impl Token {
    /// The `Authorization` header value.
    pub fn header(&self) -> String {
        format!("Bearer {}", self.value)
    }

    fn fresh(&self) -> bool {
        Instant::now() < self.expires
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Tokens per scope for one upstream; concurrent fetches of the same scope
/// are coalesced into one request to the token endpoint.
pub struct TokenCache {
    tokens: moka::future::Cache<String, Token>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            tokens: moka::future::Cache::new(10_000),
        }
    }
}

impl TokenCache {
    /// A still-valid token for `scope`, if cached.
    pub async fn cached(&self, scope: &str) -> Option<Token> {
        self.tokens.get(scope).await.filter(Token::fresh)
    }

    /// A token for `scope`, fetched from `realm` if needed.
    pub async fn get(
        &self,
        client: &reqwest::Client,
        upstream: &Url,
        challenge: &Challenge,
        scope: &str,
        credentials: Option<&Credentials>,
    ) -> Result<Token, Error> {
        if let Some(t) = self.cached(scope).await {
            return Ok(t);
        }
        self.tokens.invalidate(scope).await;
        let Challenge::Bearer { realm, service, .. } = challenge else {
            return Err(Error::Internal(
                "token requested for a non-bearer challenge".into(),
            ));
        };
        let fetch = fetch_token(
            client,
            upstream,
            realm,
            service.as_deref(),
            scope,
            credentials,
        );
        self.tokens
            .try_get_with(scope.to_owned(), fetch)
            .await
            .map_err(|e| (*e).clone())
    }

    /// Drop a token the upstream refused.
    pub async fn forget(&self, scope: &str) {
        self.tokens.invalidate(scope).await;
    }
}

/// Only realms on the upstream's own host or registrable domain get our
/// credentials (distribution's `realmAllowed`, PROTOCOL.md 4.4); loopback
/// upstreams may use loopback realms. The registrable domain comes from the
/// public suffix list, private section included: `x.co.uk` and
/// `evil.co.uk`, or `a.github.io` and `b.github.io`, are different owners.
/// Addresses only match themselves (or loopback to loopback).
pub fn realm_allowed(upstream: &Url, realm: &Url) -> bool {
    let (Some(u), Some(r)) = (upstream.host_str(), realm.host_str()) else {
        return false;
    };
    if u.eq_ignore_ascii_case(r) {
        return true;
    }
    let loopback = |h: &str| h == "localhost" || ip(h).is_some_and(|ip| ip.is_loopback());
    if loopback(u) && loopback(r) {
        return true;
    }
    matches!((registrable_domain(u), registrable_domain(r)), (Some(a), Some(b)) if a == b)
}

/// A host's address when it is one (`[::1]` as `url` writes IPv6 hosts).
fn ip(host: &str) -> Option<std::net::IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// The registrable domain (public suffix + one label) of a host name,
/// lowercased; `None` for addresses and for hosts that are a public suffix
/// themselves.
fn registrable_domain(host: &str) -> Option<String> {
    if ip(host).is_some() {
        return None;
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&host).map(str::to_owned)
}

async fn fetch_token(
    client: &reqwest::Client,
    upstream: &Url,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    credentials: Option<&Credentials>,
) -> Result<Token, Error> {
    let mut url =
        Url::parse(realm).map_err(|_| Error::UpstreamFailed("token realm is not a URL".into()))?;
    if !realm_allowed(upstream, &url) {
        return Err(Error::UpstreamFailed(format!(
            "token realm host {} is not on the upstream's domain; refusing to send credentials there",
            url.host_str().unwrap_or("")
        )));
    }
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        q.append_pair("scope", scope);
    }
    let mut req = client.get(url.clone());
    if let Some(Credentials::Basic { username, password }) = credentials {
        req = req.basic_auth(username, Some(password));
    }
    let resp = req.send().await.map_err(super::map_reqwest)?;
    let status = resp.status();
    match Answer::of(status) {
        Answer::Success => {}
        Answer::Denied => return Err(Error::UpstreamDenied(status.as_u16())),
        _ => {
            let e = format!("token endpoint answered {status}");
            return Err(Error::UpstreamFailed(e));
        }
    }
    let body: TokenResponse = resp
        .json()
        .await
        .map_err(|_| Error::UpstreamFailed("token endpoint sent invalid JSON".into()))?;
    let value = body
        .token
        .or(body.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::UpstreamFailed("token endpoint sent no token".into()))?;
    // The spec's default is 60 s; keep a margin so a token never expires in flight.
    let ttl = Duration::from_secs(body.expires_in.unwrap_or(60).max(10));
    Ok(Token {
        value: value.into(),
        expires: Instant::now() + ttl.mul_f64(0.9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:samalba/my-app:pull,push".into()),
            }
        );
    }

    #[test]
    fn parses_odd_challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=https://x/t , service="a \"q\" b""#),
            Some(Challenge::Bearer {
                realm: "https://x/t".into(),
                service: Some(r#"a "q" b"#.into()),
                scope: None
            })
        );
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "realm is required"
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_challenge("Bearer realm=\"unterminated"),
            Some(Challenge::Bearer {
                realm: "unterminated".into(),
                service: None,
                scope: None
            })
        );
    }

    #[test]
    fn realms() {
        let u = |s: &str| Url::parse(s).unwrap();
        for (upstream, realm, allowed) in [
            ("http://[::1]:5000", "http://[::1]:6000/auth", true),
            ("http://[::1]:5000", "http://127.0.0.1:6000/auth", true),
            (
                "https://registry-1.docker.io",
                "https://auth.docker.io/token",
                true,
            ),
            ("https://ghcr.io", "https://ghcr.io/token", true),
            ("http://127.0.0.1:5000", "http://127.0.0.1:6000/auth", true),
            ("https://ghcr.io", "https://evil.example/token", false),
            ("https://ghcr.io", "http://169.254.169.254/", false),
            (
                "https://registry.example.co.uk",
                "https://auth.example.co.uk/token",
                true,
            ),
            (
                "https://Registry.GitLab.com",
                "https://gitlab.com/jwt/auth",
                true,
            ),
        ] {
            assert_eq!(
                realm_allowed(&u(upstream), &u(realm)),
                allowed,
                "{upstream} -> {realm}"
            );
        }
    }

    #[test]
    fn realms_of_other_owners_are_refused() {
        let u = |s: &str| Url::parse(s).unwrap();
        let refused = [
            // Two labels are not a registrable domain under a multi-label suffix.
            ("https://x.co.uk", "https://evil.co.uk/token"),
            ("https://registry.x.co.uk", "https://auth.evil.co.uk/token"),
            // The private section: each github.io subdomain is its own site.
            ("https://a.github.io", "https://b.github.io/token"),
            ("https://reg.a.github.io", "https://b.github.io/token"),
            // Addresses are never a domain: only the same address (or loopback).
            ("https://10.0.0.1", "https://20.0.0.1/token"),
            ("https://1.2.3.4", "https://5.3.4/token"),
            ("https://1.2.3.4", "https://9.9.3.4/token"),
            ("https://[2001:db8::1]", "https://[2001:db8::2]/token"),
            ("https://registry.example.com", "https://127.0.0.1/token"),
            // A public suffix is nobody's domain.
            ("https://co.uk", "https://evil.co.uk/token"),
        ];
        for (upstream, realm) in refused {
            assert!(
                !realm_allowed(&u(upstream), &u(realm)),
                "{upstream} -> {realm}"
            );
        }
        assert!(realm_allowed(
            &u("https://a.github.io"),
            &u("https://auth.a.github.io/token")
        ));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token {
            value: "sekrit".into(),
            expires: Instant::now(),
        };
        assert!(!format!("{t:?}").contains("sekrit"));
    }
}
