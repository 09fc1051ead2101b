//! Images in the cache: walking an image's manifests and blobs on disk,
//! noting what is present, for `ls` and `export`.

use std::collections::HashSet;
use std::fs;
use std::time::SystemTime;

use crate::cache::store::Store;
use crate::registry::manifest::{self, children, Descriptor};
use crate::registry::media_type;
use crate::registry::Digest;

/// One platform's image under a root (or the root itself when it is a
/// single manifest).
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// `os/arch[/variant]` from the index entry or the image config.
    pub platform: Option<String>,
    /// The image manifest's descriptor.
    pub manifest: Descriptor,
    /// Whether the manifest is in the cache.
    pub present: bool,
    /// Config and layers (empty when the manifest is missing).
    pub blobs: Vec<Descriptor>,
    /// Those of `blobs` not in the cache.
    pub missing: Vec<Digest>,
}

impl PlatformImage {
    /// Manifest and every blob present.
    pub fn complete(&self) -> bool {
        self.present && self.missing.is_empty()
    }
}

/// An image as found in the cache.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The root manifest (index or image manifest) descriptor.
    pub root: Descriptor,
    /// Whether the root manifest is in the cache.
    pub present: bool,
    /// Whether the root is an index.
    pub is_index: bool,
    /// The image manifests under it.
    pub images: Vec<PlatformImage>,
    /// Nested indexes between the root and the images (rare).
    pub nested: Vec<Descriptor>,
}

/// How complete a cached image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Completeness {
    /// Every platform with all its blobs.
    Yes,
    /// Some platforms complete, others missing.
    Partial,
    /// Nothing pullable.
    No,
}

impl Tree {
    /// Every digest of the tree that is in the cache (manifests and blobs).
    pub fn present_digests(&self, store: &Store) -> Vec<Digest> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let all = std::iter::once(&self.root)
            .chain(self.nested.iter())
            .chain(self.images.iter().map(|i| &i.manifest))
            .chain(self.images.iter().flat_map(|i| i.blobs.iter()));
        for c in all {
            if seen.insert(c.digest.clone()) && store.blob_path(&c.digest).is_file() {
                out.push(c.digest.clone());
            }
        }
        out
    }

    /// Complete, partial or not pullable.
    pub fn completeness(&self) -> Completeness {
        let complete = self.images.iter().filter(|i| i.complete()).count();
        if !self.present || complete == 0 {
            Completeness::No
        } else if complete == self.images.len() {
            Completeness::Yes
        } else {
            Completeness::Partial
        }
    }
}

/// Walk the image rooted at `root` (its media type and size from a tag
/// record or a descriptor, when known).
pub fn walk(store: &Store, root: Descriptor) -> Tree {
    let mut tree = Tree {
        present: false,
        is_index: false,
        images: Vec::new(),
        nested: Vec::new(),
        root: root.clone(),
    };
    let Some((media_type, bytes)) = read_manifest(store, &root.digest) else {
        return tree;
    };
    tree.present = true;
    tree.root.media_type = media_type;
    tree.root.size = bytes.len() as u64;
    let Ok(kids) = children(&bytes) else {
        return tree;
    };
    if kids.iter().any(|c| c.is_manifest) {
        tree.is_index = true;
        let mut stack: Vec<Descriptor> = kids.into_iter().filter(|c| c.is_manifest).collect();
        let mut depth = 0;
        while let Some(c) = stack.pop() {
            match read_manifest(store, &c.digest) {
                Some((mt, bytes)) => {
                    let grandkids = children(&bytes).unwrap_or_default();
                    if grandkids.iter().any(|g| g.is_manifest) && depth < 4 {
                        depth += 1;
                        tree.nested.push(c);
                        stack.extend(grandkids.into_iter().filter(|g| g.is_manifest));
                        continue;
                    }
                    let mut manifest = c.clone();
                    if manifest.media_type.is_empty() {
                        manifest.media_type = mt;
                    }
                    tree.images.push(image(store, manifest, true, grandkids));
                }
                None => tree.images.push(image(store, c, false, Vec::new())),
            }
        }
        // Index order, not stack order.
        tree.images.reverse();
    } else {
        let mut img = image(store, tree.root.clone(), true, kids);
        if img.platform.is_none() {
            img.platform = config_platform(store, img.blobs.first());
        }
        tree.images.push(img);
    }
    tree
}

fn image(
    store: &Store,
    manifest: Descriptor,
    present: bool,
    blobs: Vec<Descriptor>,
) -> PlatformImage {
    let missing = blobs
        .iter()
        .filter(|b| !store.blob_path(&b.digest).is_file())
        .map(|b| b.digest.clone())
        .collect();
    PlatformImage {
        platform: manifest.platform.clone(),
        manifest,
        present,
        blobs,
        missing,
    }
}

/// A cached manifest's media type (recorded, else from its bytes) and bytes.
pub fn read_manifest(store: &Store, d: &Digest) -> Option<(String, Vec<u8>)> {
    let bytes = fs::read(store.blob_path(d)).ok()?;
    let mt = store
        .read_media_type(d)
        .ok()
        .flatten()
        .unwrap_or_else(|| media_type::sniff(&bytes));
    Some((mt, bytes))
}

/// `os/arch[/variant]` from an image config blob, if cached and small.
pub fn config_platform(store: &Store, config: Option<&Descriptor>) -> Option<String> {
    let config = config?;
    if config.size > 1 << 20 {
        return None;
    }
    manifest::config_platform(&fs::read(store.blob_path(&config.digest)).ok()?)
}

/// The latest modification time among `digests`' files (their last use).
pub fn last_used(store: &Store, digests: &[Digest]) -> Option<SystemTime> {
    digests
        .iter()
        .filter_map(|d| fs::metadata(store.blob_path(d)).ok()?.modified().ok())
        .max()
}

/// The total size of `digests`' files.
pub fn size_on_disk(store: &Store, digests: &[Digest]) -> u64 {
    digests
        .iter()
        .filter_map(|d| fs::metadata(store.blob_path(d)).ok())
        .map(|m| m.len())
        .sum()
}
