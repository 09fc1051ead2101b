//! Reading just enough of a manifest to walk an image: an index lists child
//! manifests (with platforms), an image manifest lists its config and
//! layers. Used to pin whole images, prefetch platforms, export and import
//! bundles.
//! The bytes are never re-serialised.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer};

use super::Digest;

/// A descriptor in an index, an image manifest or an OCI layout's
/// `index.json`, read leniently: a missing `mediaType` is empty and a
/// missing `size` 0, so berth walks whatever it cached (the `oci-spec`
/// crate refuses both, see README.md); the digest is validated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Descriptor {
    /// Its media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// The content's digest.
    pub digest: Digest,
    /// Its size.
    #[serde(default)]
    pub size: u64,
    /// `os/arch[/variant]` for an index entry.
    #[serde(default, deserialize_with = "platform")]
    pub platform: Option<String>,
    /// Its annotations (an `index.json` entry's image name).
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Whether it is itself a manifest (an index entry).
    #[serde(skip)]
    pub is_manifest: bool,
}

impl Descriptor {
    /// A manifest known by digest (a tag's target), media type and size
    /// when known.
    pub fn manifest(digest: Digest, media_type: &str, size: u64) -> Descriptor {
        Descriptor {
            digest,
            size,
            media_type: media_type.to_owned(),
            platform: None,
            annotations: HashMap::new(),
            is_manifest: true,
        }
    }
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// An index entry's `platform` as `os/arch[/variant]`.
fn platform<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Platform>::deserialize(d)?.map(|p| label(&p)))
}

fn label(p: &Platform) -> String {
    match p.variant.as_deref() {
        Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
        _ => format!("{}/{}", p.os, p.architecture),
    }
}

/// `os/arch[/variant]` of an image config that names both.
pub fn config_platform(config: &[u8]) -> Option<String> {
    let p: Platform = serde_json::from_slice(config).ok()?;
    (!p.os.is_empty() && !p.architecture.is_empty()).then(|| label(&p))
}

/// The descriptors of any manifest shape: an index's `manifests`, an image
/// manifest's `config` and `layers`, an artifact manifest's `blobs`.
#[derive(Deserialize)]
struct Shape {
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
}

/// What a manifest references; an error when it is not JSON of a known shape
/// or names an invalid digest.
pub fn children(bytes: &[u8]) -> Result<Vec<Descriptor>, String> {
    let shape: Shape = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let manifests = shape.manifests.into_iter().flatten().map(|d| Descriptor {
        is_manifest: true,
        ..d
    });
    Ok(manifests
        .chain(shape.config)
        .chain(shape.layers.into_iter().flatten())
        .chain(shape.blobs.into_iter().flatten())
        .collect())
}

/// Whether an index entry's platform is wanted: `all`, an exact
/// `os/arch[/variant]`, or `os/arch` matching any variant.
pub fn platform_matches(wanted: &[String], platform: Option<&str>) -> bool {
    if wanted.is_empty() || wanted.iter().any(|w| w == "all") {
        return true;
    }
    let Some(p) = platform else { return true };
    wanted.iter().any(|w| {
        w == p
            || p.strip_prefix(w.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_image() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"m","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"digest":"{}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            d('a'),
            d('b')
        );
        let c = children(index.as_bytes()).unwrap();
        assert_eq!(c.len(), 2);
        assert!(c[0].is_manifest);
        assert_eq!(c[0].platform.as_deref(), Some("linux/arm64/v8"));
        let image = format!(
            r#"{{"config":{{"digest":"{}","size":3}},"layers":[{{"digest":"{}","size":4}}]}}"#,
            d('c'),
            d('e')
        );
        let c = children(image.as_bytes()).unwrap();
        assert_eq!(c.iter().map(|x| x.size).collect::<Vec<_>>(), [3, 4]);
        assert!(children(b"nope").is_err());
        assert!(children(br#"{"layers":[{"digest":"sha256:zz"}]}"#).is_err());
    }

    #[test]
    fn platforms() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(platform_matches(&w(&[]), Some("linux/amd64")));
        assert!(platform_matches(&w(&["all"]), Some("linux/s390x")));
        assert!(platform_matches(
            &w(&["linux/arm64"]),
            Some("linux/arm64/v8")
        ));
        assert!(!platform_matches(&w(&["linux/arm"]), Some("linux/arm64")));
        assert!(!platform_matches(&w(&["linux/amd64"]), Some("linux/arm64")));
    }
}
