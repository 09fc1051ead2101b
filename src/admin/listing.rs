//! Listing what an upstream has, page by page: `GET /v2/<repo>/tags/list`
//! (through the upstream's endpoint fallback) and `GET /v2/_catalog` (the
//! first endpoint that answers). Pages are requested with `n`; the next
//! page is the `Link: <...>; rel="next"` URL when sent, else `last=<the
//! last entry>` while full pages keep adding new entries (registries that
//! ignore `n` return everything at once and the loop ends).

use std::cmp::Ordering;
use std::collections::HashSet;

use http::header;
use serde::Deserialize;
use url::Url;

use crate::config::Credentials;
use crate::error::Error;
use crate::registry::Repository;
use crate::upstream::answer::Answer;
use crate::upstream::auth::{parse_challenge, Challenge, TokenCache};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::Upstream;

/// A safety bound on pages per listing.
const MAX_PAGES: usize = 10_000;

/// Why a listing failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The repository does not exist upstream.
    #[error("repository {0} not found upstream")]
    NotFound(String),
    /// The registry does not offer a catalog (Docker Hub, most clouds).
    #[error("registry {0} does not list its repositories (no _catalog); name repositories without wildcards")]
    NoCatalog(String),
    /// The upstream failed.
    #[error("{}", .0.explained())]
    Upstream(Error),
    /// The upstream sent something that is not a listing.
    #[error("invalid listing from {0}: {1}")]
    Invalid(String, String),
}

fn answered(what: &str, status: http::StatusCode) -> ListError {
    ListError::Upstream(Error::UpstreamFailed(format!("{what} answered {status}")))
}

#[derive(Deserialize)]
struct TagsPage {
    tags: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct CatalogPage {
    repositories: Option<Vec<String>>,
}

/// Every tag of `repo`, following pagination.
pub async fn tags(up: &Upstream, repo: &Repository, page: usize) -> Result<Vec<String>, ListError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut tail = format!("tags/list?n={page}");
    for _ in 0..MAX_PAGES {
        let resp = up
            .passthrough(repo, &tail, None)
            .await
            .map_err(ListError::Upstream)?;
        match Answer::of(resp.status()) {
            Answer::Success => {}
            Answer::NotFound => return Err(ListError::NotFound(format!("{}/{repo}", up.host))),
            _ => return Err(answered(&format!("tags/list of {repo}"), resp.status())),
        }
        let next = next_link(resp.headers());
        let body: TagsPage = resp
            .json()
            .await
            .map_err(|e| ListError::Invalid(format!("{}/{repo}", up.host), e.to_string()))?;
        let tags = body.tags.unwrap_or_default();
        let full = tags.len() >= page;
        let last = tags.last().cloned();
        let mut added = false;
        for t in tags {
            if seen.insert(t.clone()) {
                out.push(t);
                added = true;
            }
        }
        match (next, last) {
            (Some(link), _) => match link_tail(&link, "tags/list") {
                Some(t) => tail = t,
                None => break,
            },
            (None, Some(last)) if full && added => {
                tail = format!(
                    "tags/list?n={page}&last={}",
                    url::form_urlencoded::byte_serialize(last.as_bytes()).collect::<String>()
                );
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Every repository the registry lists, following pagination. A hub
/// endpoint's project prefix is stripped (others' repositories are left out).
pub async fn repositories(up: &Upstream, page: usize) -> Result<Vec<String>, ListError> {
    let mut last_err = None;
    for ep in &up.endpoints {
        match catalog(ep, page).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::debug!(registry = %up.host, endpoint = %ep.label, error = %e, "catalog failed");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ListError::NoCatalog(up.host.to_string())))
}

async fn catalog(ep: &Endpoint, page: usize) -> Result<Vec<String>, ListError> {
    let prefix = ep.base().path().trim_matches('/').to_owned();
    let host = ep.host.to_string();
    let tokens = TokenCache::default();
    let scope = "registry:catalog:*";
    let mut url = ep
        .root()
        .join(&format!("v2/_catalog?n={page}"))
        .map_err(|e| ListError::Invalid(host.clone(), e.to_string()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut bearer: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut retried = false;
        let resp = loop {
            let mut req = ep.client().get(url.clone());
            req = match (ep.credentials(), &bearer) {
                (_, Some(b)) => req.header(header::AUTHORIZATION, b),
                (Some(Credentials::Token(t)), None) => req.bearer_auth(t),
                (Some(Credentials::Basic { username, password }), None) => {
                    req.basic_auth(username, Some(password))
                }
                (None, None) => req,
            };
            let resp = req
                .send()
                .await
                .map_err(|e| ListError::Upstream(crate::upstream::map_reqwest(e)))?;
            if resp.status() != http::StatusCode::UNAUTHORIZED || retried {
                break resp;
            }
            retried = true;
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some(c @ Challenge::Bearer { .. }) => {
                    let t = tokens
                        .get(ep.client(), ep.root(), &c, scope, ep.credentials())
                        .await
                        .map_err(ListError::Upstream)?;
                    bearer = Some(t.header());
                }
                _ => break resp,
            }
        };
        let status = resp.status();
        match Answer::of(status) {
            Answer::Success => {}
            Answer::Denied | Answer::NotFound => return Err(ListError::NoCatalog(host)),
            _ if status == http::StatusCode::METHOD_NOT_ALLOWED => {
                return Err(ListError::NoCatalog(host))
            }
            _ => return Err(answered("_catalog", status)),
        }
        let next = next_link(resp.headers());
        let body: CatalogPage = resp
            .json()
            .await
            .map_err(|e| ListError::Invalid(host.clone(), e.to_string()))?;
        let repos = body.repositories.unwrap_or_default();
        let full = repos.len() >= page;
        let last = repos.last().cloned();
        let mut added = false;
        for r in repos {
            if !seen.insert(r.clone()) {
                continue;
            }
            added = true;
            let name = if prefix.is_empty() {
                Some(r)
            } else {
                r.strip_prefix(&format!("{prefix}/")).map(str::to_owned)
            };
            out.extend(name);
        }
        match (next, last) {
            (Some(link), _) => match ep.root().join(&link) {
                Ok(u) => url = u,
                Err(_) => break,
            },
            (None, Some(last)) if full && added => {
                url.query_pairs_mut()
                    .clear()
                    .append_pair("n", &page.to_string())
                    .append_pair("last", &last);
            }
            _ => break,
        }
    }
    Ok(out)
}

/// The target of `Link: <...>; rel="next"`.
pub fn next_link(h: &http::HeaderMap) -> Option<String> {
    for v in h.get_all(header::LINK) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(',') {
            let part = part.trim();
            let (Some(start), Some(end)) = (part.find('<'), part.find('>')) else {
                continue;
            };
            let params = &part[end + 1..];
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            });
            if is_next && start < end {
                return Some(part[start + 1..end].to_owned());
            }
        }
    }
    None
}

/// `tags/list?last=x&n=2` from a Link target (path or absolute URL) ending
/// in `.../<what>?...`, to ask the same upstream for the next page.
pub fn link_tail(link: &str, what: &str) -> Option<String> {
    let base = Url::parse("http://link.invalid/").expect("base URL");
    let url = base.join(link).ok()?;
    let path = url.path();
    let at = path.rfind(what)?;
    let mut tail = path[at..].to_owned();
    if let Some(q) = url.query() {
        tail.push('?');
        tail.push_str(q);
    }
    Some(tail)
}

/// Version-aware order (`1.9` < `1.10`): digit runs compare as numbers.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let o = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|c| **c == b'0').count();
    &s[n.min(s.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::LINK,
            "</v2/a/b/tags/list?last=x&n=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        let l = next_link(&h).unwrap();
        assert_eq!(l, "/v2/a/b/tags/list?last=x&n=2");
        assert_eq!(link_tail(&l, "tags/list").unwrap(), "tags/list?last=x&n=2");
        assert_eq!(
            link_tail("https://r.example/v2/p/a/tags/list?n=1&last=b", "tags/list").unwrap(),
            "tags/list?n=1&last=b"
        );
        h.insert(header::LINK, "<x>; rel=\"prev\"".parse().unwrap());
        assert!(next_link(&h).is_none());
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["1.10", "1.9", "1.2.3", "latest", "1.09a", "2"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["1.2.3", "1.9", "1.09a", "1.10", "2", "latest"]);
    }
}
