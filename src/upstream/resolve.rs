//! The DNS half of the SSRF guard. The redirect policy in
//! [`super::endpoint`] refuses redirects to *literal* loopback, link-local,
//! private and shared addresses (and `localhost`), but a redirect or token
//! realm naming a *host* that resolves to such an address (a CDN name
//! pointed at 127.0.0.1, at 169.254.169.254 cloud metadata, at 10.0.0.5)
//! would pass that check. [`GuardedResolver`] is the resolver of every
//! upstream client: it resolves with tokio and drops every private address
//! (`super::is_private`) unless the endpoint allows private redirects or the
//! name is one the operator configured for it (the endpoint's own host, an
//! `HTTP(S)_PROXY`/`ALL_PROXY` host). When nothing is left the connection
//! fails with [`Refused`], an upstream failure (502), logged at warn.
//!
//! The filter runs on the addresses the connection then uses: there is no
//! second lookup between the check and the connect, so a name that answers
//! public first and private next (DNS rebinding) gains nothing.
//!
//! Not covered here: IP literals (reqwest does not resolve them; the
//! redirect policy checks them), and names a proxy resolves: through an
//! HTTP(S) proxy berth resolves only the proxy's host, the proxy resolves
//! the target.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

/// A name that resolved only to private addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    name: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} resolves only to private addresses; refused (set private_redirects = true to allow)",
            self.name
        )
    }
}

impl std::error::Error for Refused {}

/// Which names may resolve to private addresses for one endpoint.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `private_redirects`: every name may.
    allow_private: bool,
    /// Names the operator configured (lower case, no trailing dot).
    trusted: Vec<String>,
}

fn normal(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Policy {
    /// The policy of an endpoint at `url`, with the proxy hosts reqwest
    /// reads from the environment trusted too.
    pub fn new(url: &Url, allow_private: bool) -> Policy {
        Policy::with_proxies(url, allow_private, &env_proxies())
    }

    fn with_proxies(url: &Url, allow_private: bool, proxies: &[String]) -> Policy {
        let trusted = url
            .host_str()
            .into_iter()
            .chain(proxies.iter().map(String::as_str))
            .map(normal)
            .collect();
        Policy {
            allow_private,
            trusted,
        }
    }

    /// The addresses a connection to `name` may use: all of them for a
    /// trusted name or with `private_redirects`, else the public ones; an
    /// error when private addresses were all there was.
    pub fn permitted(
        &self,
        name: &str,
        found: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        if self.allow_private || self.trusted.contains(&normal(name)) {
            return Ok(found);
        }
        let had_any = !found.is_empty();
        let public: Vec<SocketAddr> = found.into_iter().filter(|a| !is_private(a.ip())).collect();
        if public.is_empty() && had_any {
            return Err(Refused {
                name: name.to_owned(),
            });
        }
        Ok(public)
    }
}

/// The hosts of the proxies reqwest takes from the environment
/// (`ALL_PROXY`, `HTTP_PROXY`, `HTTPS_PROXY`, either case; hyper-util's
/// matcher reads the same variables, and a value without a scheme is HTTP).
fn env_proxies() -> Vec<String> {
    [
        "ALL_PROXY",
        "all_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .filter_map(|v| proxy_host(&v))
    .collect()
}

fn proxy_host(value: &str) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let url = if value.contains("://") {
        Url::parse(value)
    } else {
        Url::parse(&format!("http://{value}"))
    };
    url.ok()?.host_str().map(str::to_owned)
}

/// A `reqwest` resolver applying a [`Policy`]; `registry` and `endpoint`
/// label its warnings.
pub struct GuardedResolver {
    policy: Arc<Policy>,
    registry: Arc<str>,
    endpoint: Arc<str>,
}

impl GuardedResolver {
    /// A resolver for one endpoint.
    pub fn new(policy: Policy, registry: &str, endpoint: &str) -> GuardedResolver {
        GuardedResolver {
            policy: Arc::new(policy),
            registry: registry.into(),
            endpoint: endpoint.into(),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (policy, registry, endpoint) = (
            self.policy.clone(),
            self.registry.clone(),
            self.endpoint.clone(),
        );
        Box::pin(async move {
            let host = name.as_str();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            match policy.permitted(host, found) {
                Ok(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                Err(refused) => {
                    tracing::warn!(registry = %registry, endpoint = %endpoint, host, "upstream connection refused: {refused}");
                    Err(refused.into())
                }
            }
        })
    }
}

/// Whether `ip` is an address the SSRF guard refuses (loopback, private,
/// link-local, shared, and IPv6 forms that reach them).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                // Shared address space (RFC 6598): internal cloud services
                // live there (Alibaba Cloud's metadata at 100.100.100.200).
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d)
            // addresses reach the embedded IPv4 address.
            let embedded = (s[..6] == [0, 0, 0, 0, 0, 0xffff]
                || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
            .then(|| {
                let o = v6.octets();
                std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15])
            });
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || embedded.is_some_and(|v4| is_private(v4.into()))
        }
    }
}

/// Whether a URL names a private address or a localhost name.
pub fn url_is_private(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_private(ip.into()),
        Some(url::Host::Ipv6(ip)) => is_private(ip.into()),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost")
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses() {
        let u = |s: &str| Url::parse(s).unwrap();
        for p in [
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://169.254.169.254/",
            "http://[::1]/",
            "http://localhost:5000/",
            "http://[fe80::1]/",
            "http://192.168.1.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://100.100.100.200/",
            "http://2130706433/",
        ] {
            assert!(url_is_private(&u(p)), "{p}");
        }
        for p in [
            "https://registry-1.docker.io/",
            "http://8.8.8.8/",
            "http://[2001:db8::1]/",
            "http://[::ffff:8.8.8.8]/",
            "http://100.128.0.1/",
        ] {
            assert!(!url_is_private(&u(p)), "{p}");
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter()
            .map(|a| SocketAddr::new(a.parse().unwrap(), 0))
            .collect()
    }

    fn policy(url: &str, allow_private: bool, proxies: &[&str]) -> Policy {
        let proxies: Vec<String> = proxies.iter().filter_map(|p| proxy_host(p)).collect();
        Policy::with_proxies(&Url::parse(url).unwrap(), allow_private, &proxies)
    }

    #[test]
    fn private_only_names_are_refused() {
        let p = policy("https://registry-1.docker.io", false, &[]);
        for private in [
            "127.0.0.1",
            "127.0.1.1",
            "169.254.169.254",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.100.100.200",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            let e = p
                .permitted("cdn.example", addrs(&[private]))
                .expect_err(private);
            assert_eq!(
                e.to_string(),
                "cdn.example resolves only to private addresses; refused (set private_redirects = true to allow)"
            );
        }
    }

    #[test]
    fn public_addresses_pass_and_private_ones_are_dropped() {
        let p = policy("https://registry-1.docker.io", false, &[]);
        let mixed = addrs(&["127.0.0.1", "104.18.1.1", "::1", "2606:4700::1", "10.0.0.1"]);
        assert_eq!(
            p.permitted("cdn.example", mixed).unwrap(),
            addrs(&["104.18.1.1", "2606:4700::1"])
        );
        // Nothing found is not a refusal: the connector reports it.
        assert_eq!(p.permitted("cdn.example", vec![]).unwrap(), vec![]);
    }

    #[test]
    fn configured_hosts_and_the_opt_in_keep_private_addresses() {
        let local = addrs(&["127.0.0.1", "::1"]);
        let p = policy(
            "http://Registry.Internal:5000/proj",
            false,
            &[
                "http://squid.corp:3128",
                "proxy.lan:8080",
                "http://10.0.0.9:3128",
            ],
        );
        for trusted in [
            "registry.internal",
            "REGISTRY.internal.",
            "squid.corp",
            "proxy.lan",
        ] {
            assert_eq!(
                p.permitted(trusted, local.clone()).unwrap(),
                local,
                "{trusted}"
            );
        }
        assert!(p.permitted("storage.internal", local.clone()).is_err());
        let p = policy("https://registry-1.docker.io", true, &[]);
        assert_eq!(p.permitted("cdn.example", local.clone()).unwrap(), local);
    }

    #[test]
    fn proxy_values() {
        assert_eq!(
            proxy_host("http://user:pw@proxy:3128").as_deref(),
            Some("proxy")
        );
        assert_eq!(proxy_host("proxy.lan:8080").as_deref(), Some("proxy.lan"));
        assert_eq!(proxy_host("  "), None);
    }
}
