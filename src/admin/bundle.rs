//! Air-gap bundles: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) in a tar, the format skopeo reads and writes as
//! `oci-archive:` and containerd as `ctr images export/import`.
//!
//! - [`export`](fn@export): `berth export REF... -o bundle.tar` writes images
//!   from the cache (read-only; may run beside the daemon). Each image's
//!   `index.json` entry carries `org.opencontainers.image.ref.name` (the
//!   tag, or the full reference with `--ref-names full`) and
//!   `io.containerd.image.name` (the full reference).
//! - [`import`](fn@import): `berth import bundle.tar` verifies every blob's
//!   digest while extracting, publishes nothing unless the whole archive is
//!   sound, and records the tags, so pulls by tag then work offline.
//!   Needs the cache's lock.

mod export;
mod import;

pub use export::{export, write_bundle, ExportError};
pub use import::{import, import_archive, ImportSummary, NameDefaults};

/// The `oci-layout` file's content.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
/// The OCI annotation naming an `index.json` entry.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's annotation with the full image name.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
