//! Manifest media types and the Accept header berth sends upstream.

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest (also used by Helm charts and other artifacts).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Upstream is always asked with the full set, so that a registry never
/// down-converts an index to one platform's manifest (PROTOCOL.md 4.3,
/// "Content negotiation pitfall"); the bytes are then cached by digest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.artifact.manifest.v1+json;q=0.9, \
*/*;q=0.8";

/// containerd refuses manifests larger than this (`MaxManifestSize`,
/// PROTOCOL.md 4.1); berth refuses to cache anything bigger as a manifest.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1048 * 1048;

/// The media type without parameters (`; charset=...`), as the spec wants it
/// in `Content-Type`.
pub fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// The media type to use for a manifest whose upstream sent no usable
/// `Content-Type`: its own `mediaType` field, else a guess from its shape.
pub fn sniff(body: &[u8]) -> String {
    sniff_or(body, "")
}

/// A manifest's own `mediaType` field, else `declared` (what its
/// descriptor says) when not empty, else a guess from its shape.
pub fn sniff_or(body: &[u8], declared: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Shape>(body) {
        Ok(Shape {
            media_type: Some(mt),
            ..
        }) if !mt.is_empty() => mt,
        _ if !declared.is_empty() => declared.to_owned(),
        Ok(Shape {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_owned(),
        _ => OCI_MANIFEST.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn essence_strips_parameters() {
        assert_eq!(
            essence("application/json; charset=utf-8"),
            "application/json"
        );
        assert_eq!(essence(OCI_INDEX), OCI_INDEX);
    }

    #[test]
    fn sniffs_shape() {
        assert_eq!(sniff(br#"{"mediaType":"x/y"}"#), "x/y");
        assert_eq!(sniff(br#"{"manifests":[]}"#), OCI_INDEX);
        assert_eq!(sniff(br#"{"config":{}}"#), OCI_MANIFEST);
    }

    #[test]
    fn media_types() {
        assert_eq!(sniff_or(br#"{"mediaType":"x/y"}"#, "a/b"), "x/y");
        assert_eq!(sniff_or(br#"{"config":{}}"#, "a/b"), "a/b");
        assert_eq!(sniff_or(br#"{"manifests":[]}"#, ""), OCI_INDEX);
    }
}
