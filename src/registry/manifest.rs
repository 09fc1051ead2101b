//! Reading just enough of a manifest to walk an image: an index lists child
//! manifests (with platforms), an image manifest lists its config and
//! layers. Used to pin whole images, prefetch platforms and export bundles.
//! The bytes are never re-serialised.

use serde::Deserialize;

use super::Digest;

/// A descriptor found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// The content's digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// `os/arch[/variant]` for an index entry.
    pub platform: Option<String>,
    /// Whether the child is itself a manifest (an index entry).
    pub is_manifest: bool,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Shape {
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
}

/// What a manifest references; an error when it is not JSON of a known shape
/// or names an invalid digest.
pub fn children(bytes: &[u8]) -> Result<Vec<Child>, String> {
    let shape: Shape = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let mut out = Vec::new();
    let mut push = |d: Descriptor, is_manifest: bool| -> Result<(), String> {
        let digest: Digest = d.digest.parse().map_err(|e| format!("{e}"))?;
        let platform = d.platform.map(|p| match p.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
            _ => format!("{}/{}", p.os, p.architecture),
        });
        out.push(Child {
            digest,
            size: d.size,
            media_type: d.media_type,
            platform,
            is_manifest,
        });
        Ok(())
    };
    for d in shape.manifests.unwrap_or_default() {
        push(d, true)?;
    }
    if let Some(c) = shape.config {
        push(c, false)?;
    }
    for d in shape
        .layers
        .unwrap_or_default()
        .into_iter()
        .chain(shape.blobs.unwrap_or_default())
    {
        push(d, false)?;
    }
    Ok(out)
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
