//! Image rules with Harbor-style globs (`*` within a segment, a `**` segment
//! across segments), used for pins (never evicted) and prefetch. A rule is
//! `[registry/]repository[:tag]`: `library/*:1.*`, `**/etcd:**`,
//! `ghcr.io/org/app:v2`. Without a registry it matches every registry; a
//! missing tag matches every tag. Names are read the way docker and
//! containerd read them: `index.docker.io` is `docker.io`, and a
//! single-component repository on docker.io is under `library/`, so
//! `nginx` and `docker.io/nginx:1.27` cover `docker.io/library/nginx`.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

use crate::registry::{docker_repository, split_image_name, RegistryHost};

/// One parsed rule.
#[derive(Clone)]
pub struct Rule {
    text: String,
    registry: Option<RegistryHost>,
    repo: GlobMatcher,
    /// For a rule without a registry and a one-component repository
    /// (`nginx`, `redis*`): the same pattern under `library/`, which is
    /// what it names on docker.io.
    docker_library: Option<GlobMatcher>,
    tag: GlobMatcher,
    /// The literal tag when the tag part has no wildcard (prefetch can then
    /// skip listing tags).
    pub literal_tag: Option<String>,
    /// The literal repository when it has no wildcard.
    pub literal_repo: Option<String>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A Harbor-style glob (`*` and `?` stop at `/`); only the characters of
/// repository names and tags, so globset's classes and braces stay out.
fn glob(pattern: &str) -> Result<GlobMatcher, String> {
    if let Some(c) = pattern
        .chars()
        .find(|&c| !c.is_ascii_alphanumeric() && !"/._-*?".contains(c))
    {
        return Err(format!("character {c:?} is not allowed in an image rule"));
    }
    let glob = GlobBuilder::new(pattern).literal_separator(true).build();
    Ok(glob.map_err(|e| e.to_string())?.compile_matcher())
}

impl Rule {
    /// Parse `[registry/]repository[:tag]`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty image rule".into());
        }
        // A glob in the first component is a repository pattern (`*.io/x`).
        let (registry, repo, tag) = split_image_name(t);
        let tag = tag.unwrap_or("**");
        let registry = registry.map(RegistryHost::parse_docker).transpose()?;
        // `**` may span segments, so only a one-segment pattern is Docker's
        // official-image shorthand.
        let official = !repo.contains('/') && !repo.contains("**");
        let repo = match &registry {
            Some(r) if official => docker_repository(r, repo),
            _ => repo.into(),
        };
        let repo = repo.as_ref();
        if repo.is_empty() || tag.is_empty() {
            return Err(format!("{text:?}: expected [registry/]repository[:tag]"));
        }
        let wild = |s: &str| s.contains('*') || s.contains('?');
        let docker_library = (registry.is_none() && official)
            .then(|| glob(&format!("library/{repo}")))
            .transpose()
            .map_err(|e| format!("{text:?}: {e}"))?;
        Ok(Rule {
            text: t.to_owned(),
            registry,
            repo: glob(repo).map_err(|e| format!("{text:?}: {e}"))?,
            docker_library,
            tag: glob(tag).map_err(|e| format!("{text:?}: {e}"))?,
            literal_tag: (!wild(tag)).then(|| tag.to_owned()),
            literal_repo: (!wild(repo)).then(|| repo.to_owned()),
        })
    }

    /// Whether the rule is limited to one registry.
    pub fn registry(&self) -> Option<&RegistryHost> {
        self.registry.as_ref()
    }

    /// Whether `registry/repo` is covered (any tag).
    pub fn matches_repo(&self, registry: &RegistryHost, repo: &str) -> bool {
        match &self.registry {
            Some(r) => r == registry && self.repo.is_match(repo),
            None => {
                self.repo.is_match(repo)
                    || (registry.is_docker_hub()
                        && self
                            .docker_library
                            .as_ref()
                            .is_some_and(|l| l.is_match(repo)))
            }
        }
    }

    /// Whether `registry/repo:tag` is covered.
    pub fn matches(&self, registry: &RegistryHost, repo: &str, tag: &str) -> bool {
        self.matches_repo(registry, repo) && self.tag.is_match(tag)
    }
}

/// A set of rules.
#[derive(Debug, Clone, Default)]
pub struct Rules(pub Vec<Rule>);

impl Rules {
    /// Parse every rule, naming the bad one.
    pub fn parse(texts: &[String]) -> Result<Rules, String> {
        texts
            .iter()
            .map(|t| Rule::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map(Rules)
    }

    /// Whether any rule covers `registry/repo:tag`.
    pub fn matches(&self, registry: &RegistryHost, repo: &str, tag: &str) -> bool {
        self.0.iter().any(|r| r.matches(registry, repo, tag))
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> RegistryHost {
        s.parse().unwrap()
    }

    #[test]
    fn harbor_style_globs() {
        let r = Rule::parse("library/*:1.*").unwrap();
        assert!(r.matches(&h("docker.io"), "library/nginx", "1.27"));
        assert!(!r.matches(&h("docker.io"), "library/nginx", "2.0"));
        assert!(
            !r.matches(&h("docker.io"), "library/a/b", "1.0"),
            "* stays within a segment"
        );
        let r = Rule::parse("**/etcd:**").unwrap();
        assert!(r.matches(&h("registry.k8s.io"), "etcd", "3.5.12-0"));
        assert!(r.matches(&h("quay.io"), "coreos/etcd", "v3.5"));
        assert!(!r.matches(&h("quay.io"), "coreos/etcdctl", "v3.5"));
        let r = Rule::parse("ghcr.io/org/app:v2").unwrap();
        assert!(r.matches(&h("ghcr.io"), "org/app", "v2"));
        assert!(!r.matches(&h("docker.io"), "org/app", "v2"));
        assert_eq!(r.literal_tag.as_deref(), Some("v2"));
        assert_eq!(r.literal_repo.as_deref(), Some("org/app"));
        let r = Rule::parse("localhost:5000/team/*").unwrap();
        assert!(r.matches(&h("localhost:5000"), "team/x", "anything"));
        assert!(r.literal_tag.is_none());
    }

    #[test]
    fn docker_style_names() {
        let hub = h("docker.io");
        for rule in [
            "nginx",
            "nginx:1.27",
            "docker.io/nginx:1.27",
            "docker.io/nginx",
            "index.docker.io/nginx:1.27",
            "docker.io/library/nginx:1.27",
            "ngi*:1.*",
        ] {
            let r = Rule::parse(rule).unwrap();
            assert!(r.matches(&hub, "library/nginx", "1.27"), "{rule}");
            assert!(!r.matches(&hub, "library/redis", "1.27"), "{rule}");
            assert!(!r.matches(&hub, "someone/nginx", "1.27"), "{rule}");
        }
        let r = Rule::parse("docker.io/nginx").unwrap();
        assert_eq!(r.registry(), Some(&hub));
        assert_eq!(r.literal_repo.as_deref(), Some("library/nginx"));
        assert!(!r.matches(&h("quay.io"), "nginx", "1"), "docker.io only");
        assert_eq!(
            Rule::parse("index.docker.io/bitnami/redis")
                .unwrap()
                .registry(),
            Some(&hub)
        );
        // Without a registry a rule still matches every registry as written.
        let r = Rule::parse("nginx").unwrap();
        assert!(r.matches(&h("quay.io"), "nginx", "1"));
        assert!(!r.matches(&h("quay.io"), "library/nginx", "1"));
        // `**` spans segments: no `library/` shorthand for it.
        assert!(Rule::parse("docker.io/**")
            .unwrap()
            .matches(&hub, "a/b", "1"));
        assert!(Rule::parse("*/etcd")
            .unwrap()
            .matches(&hub, "coreos/etcd", "1"));
    }

    #[test]
    fn bad_rules() {
        for bad in ["", "a:", ":b", "a b", "lib/$x"] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }
}
