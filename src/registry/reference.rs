//! Repository names, tags, references and registry hosts, each a newtype
//! that can only be built through the distribution-spec grammar (anchored),
//! so that a value that exists is safe as a path component; and the one
//! reading of image names as people write them ([`ImageRef`], Docker's
//! normalisation), shared by routing, pins and the admin commands.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;

use super::digest::{Digest, DigestError};

/// `<name>` grammar from the distribution spec (PROTOCOL.md 4.3).
static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
    )
    .expect("name regex")
});
/// Tag grammar from the distribution spec.
static TAG_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").expect("tag regex"));
/// A registry host with an optional port, as containerd sends it in `?ns=`.
static HOST_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*(?::[0-9]{1,5})?$")
        .expect("host regex")
});

/// Longest repository name berth accepts (distribution's limit).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name such as `library/nginx`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Repository {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() > MAX_NAME_LEN || !NAME_RE.is_match(s) {
            return Err(s.to_owned());
        }
        Ok(Repository(s.to_owned()))
    }
}

/// A validated tag.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !TAG_RE.is_match(s) {
            return Err(s.to_owned());
        }
        Ok(Tag(s.to_owned()))
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceError {
    /// Neither a tag nor a digest.
    Tag(String),
    /// Looks like a digest but is not a valid one.
    Digest(DigestError),
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            return s
                .parse()
                .map(Reference::Digest)
                .map_err(ReferenceError::Digest);
        }
        s.parse().map(Reference::Tag).map_err(ReferenceError::Tag)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t.as_str()),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// A registry host with optional port (`docker.io`, `myregistry.io:5000`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistryHost(String);

impl RegistryHost {
    /// The host as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a path segment looks like a registry host rather than the
    /// first component of a repository name (the same rule docker uses: a
    /// dot, a port, or `localhost`). A `*` never is one: it starts a pin's
    /// repository pattern (`*.io/x`).
    pub fn looks_like_host(segment: &str) -> bool {
        !segment.contains('*')
            && (segment.contains('.') || segment.contains(':') || segment == "localhost")
    }

    /// Parse a registry named in an image reference, `index.docker.io` read
    /// as `docker.io`; the error names it.
    pub fn parse_docker(s: &str) -> Result<RegistryHost, String> {
        s.parse::<RegistryHost>()
            .map(RegistryHost::docker_normalized)
            .map_err(|_| format!("{s:?} is not a registry host"))
    }

    /// Docker Hub's canonical name: `index.docker.io` (the legacy name the
    /// docker CLI and containerd rewrite) is `docker.io`.
    pub fn docker_normalized(self) -> RegistryHost {
        if self.0 == "index.docker.io" {
            RegistryHost(DOCKER_HUB.to_owned())
        } else {
            self
        }
    }

    /// Whether this is Docker Hub (`docker.io`).
    pub fn is_docker_hub(&self) -> bool {
        self.0 == DOCKER_HUB
    }
}

/// Docker Hub's registry name.
const DOCKER_HUB: &str = "docker.io";

/// An image reference as people write it, `[registry/]repository[:tag][@digest]`,
/// validated and normalised the way docker reads it ([`ImageRef::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry (the default registry when none was named).
    pub registry: RegistryHost,
    /// The repository (`library/` added for single names on docker.io).
    pub repo: Repository,
    /// The tag, if named.
    pub tag: Option<Tag>,
    /// The digest, if named.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parse `[registry/]repository[:tag][@digest]` the way docker does
    /// ([`split_image_name`], [`RegistryHost::parse_docker`],
    /// [`docker_repository`]), `default_registry` when none is named. berth
    /// never guesses `latest`: a tag or a digest must be named.
    pub fn parse(s: &str, default_registry: &RegistryHost) -> Result<ImageRef, String> {
        let s = s.trim();
        let at = |e: String| format!("{s:?}: {e}");
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| at(e.to_string()))?)),
            None => (s, None),
        };
        let (registry, repo, tag) = split_image_name(rest);
        let registry = match registry {
            Some(r) => RegistryHost::parse_docker(r).map_err(at)?,
            None => default_registry.clone(),
        };
        let repo = docker_repository(&registry, repo);
        let repo: Repository = repo
            .parse()
            .map_err(|_| at(format!("{repo:?} is not a repository name")))?;
        let tag = tag
            .map(|t| t.parse().map_err(|_| at(format!("{t:?} is not a tag"))))
            .transpose()?;
        if tag.is_none() && digest.is_none() {
            return Err(at(format!(
                "name a tag or a digest (e.g. {registry}/{repo}:latest)"
            )));
        }
        Ok(ImageRef {
            registry,
            repo,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Split off the first path component when it names a registry
/// ([`RegistryHost::looks_like_host`]): `(registry, rest)`.
pub fn split_registry(s: &str) -> (Option<&str>, &str) {
    match s.split_once('/') {
        Some((first, rest)) if RegistryHost::looks_like_host(first) => (Some(first), rest),
        _ => (None, s),
    }
}

/// The parts of an image name as people write it, split the way docker
/// does (nothing validated yet): `(registry, repository, tag)`, the
/// registry by [`split_registry`], the tag after the last `:` after the
/// last `/`. A digest (`@...`) must be split off before.
pub fn split_image_name(s: &str) -> (Option<&str>, &str, Option<&str>) {
    let (registry, path) = split_registry(s);
    let (repo, tag) = split_tag(path);
    (registry, repo, tag)
}

/// Split `repository[:tag]` at the last `:` after the last `/`.
pub fn split_tag(path: &str) -> (&str, Option<&str>) {
    let slash = path.rfind('/').map(|i| i + 1).unwrap_or(0);
    match path[slash..].rfind(':') {
        Some(i) => (&path[..slash + i], Some(&path[slash + i + 1..])),
        None => (path, None),
    }
}

/// Docker's repository normalisation: a single-component name on Docker Hub
/// is an official image under `library/` (`nginx` is `library/nginx`).
pub fn docker_repository<'a>(registry: &RegistryHost, repo: &'a str) -> Cow<'a, str> {
    if registry.is_docker_hub() && !repo.contains('/') {
        Cow::Owned(format!("library/{repo}"))
    } else {
        Cow::Borrowed(repo)
    }
}

impl FromStr for RegistryHost {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() > 255 || !HOST_RE.is_match(s) {
            return Err(s.to_owned());
        }
        Ok(RegistryHost(s.to_ascii_lowercase()))
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "{:?}", self.0) }
        }
    )*};
}
display_as_str!(Repository, Tag, RegistryHost);

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "nginx",
            "library/nginx",
            "a/b/c",
            "foo.bar/baz_qux",
            "a__b",
            "a---b",
            "x1/y2",
        ] {
            assert!(ok.parse::<Repository>().is_ok(), "{ok}");
        }
        for bad in [
            "", "Nginx", "../etc", "a/../b", "a//b", "/a", "a/", "a..b", "a b", "a%2e%2e", ".a",
            "a/.", "a___b", "-a", "a-",
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad}");
        }
        assert!("a".repeat(256).parse::<Repository>().is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.0", "v1.2.3-rc_1", "_x", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), ".."] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "sha256:zz".parse::<Reference>(),
            Err(ReferenceError::Digest(_))
        ));
    }

    #[test]
    fn hosts() {
        for ok in [
            "docker.io",
            "registry-1.docker.io",
            "localhost:5000",
            "127.0.0.1:5001",
            "Quay.IO",
        ] {
            assert!(ok.parse::<RegistryHost>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a..b",
            "-a.com",
            "a.com:",
            "a.com:123456",
            "a/b",
            "a_b.com",
            "a.com/",
        ] {
            assert!(bad.parse::<RegistryHost>().is_err(), "{bad}");
        }
        assert!(RegistryHost::looks_like_host("ghcr.io"));
        assert!(!RegistryHost::looks_like_host("library"));
    }

    #[test]
    fn references_like_docker() {
        let parse = |s: &str| ImageRef::parse(s, &"docker.io".parse().unwrap());
        let r = parse("nginx:1.27").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:1.27");
        let r = parse("docker.io/library/nginx:1.27").unwrap();
        assert_eq!(r.repo.as_str(), "library/nginx");
        let r = parse("localhost:5000/team/app:v1").unwrap();
        assert_eq!(r.registry.as_str(), "localhost:5000");
        assert_eq!(r.repo.as_str(), "team/app");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert!(r.tag.is_none());
        assert_eq!(r.digest.unwrap().to_string(), d);
        let r = parse(&format!("quay.io/a/b:t@{d}")).unwrap();
        assert_eq!(r.tag.unwrap().as_str(), "t");
        assert!(parse("nginx").is_err(), "a tag or digest is required");
        assert!(parse("Bad/Name:1").is_err());
        assert!(parse("x@sha256:zz").is_err());
    }

    #[test]
    fn docker_normalisation() {
        let h = |s: &str| s.parse::<RegistryHost>().unwrap().docker_normalized();
        assert_eq!(h("index.docker.io").as_str(), "docker.io");
        assert_eq!(h("Index.Docker.IO").as_str(), "docker.io");
        assert_eq!(h("ghcr.io").as_str(), "ghcr.io");
        assert_eq!(docker_repository(&h("docker.io"), "nginx"), "library/nginx");
        assert_eq!(
            docker_repository(&h("docker.io"), "bitnami/redis"),
            "bitnami/redis"
        );
        assert_eq!(docker_repository(&h("quay.io"), "nginx"), "nginx");
        assert_eq!(split_image_name("nginx"), (None, "nginx", None));
        assert_eq!(
            split_image_name("docker.io/nginx:1.27"),
            (Some("docker.io"), "nginx", Some("1.27"))
        );
        assert_eq!(
            split_image_name("localhost:5000/team/app:v2"),
            (Some("localhost:5000"), "team/app", Some("v2"))
        );
        assert_eq!(
            split_image_name("library/nginx"),
            (None, "library/nginx", None)
        );
    }
}
