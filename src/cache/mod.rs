//! The cache facade: published content (mmap-served), manifests with their
//! media types, tag records, and the single-flight table for misses.

pub mod flight;
pub mod index;
pub mod mmap;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registry::{Digest, RegistryHost, Repository, Tag};
use flight::Flights;
use index::Index;
use store::Store;

/// A manifest ready to serve.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The exact upstream bytes.
    pub bytes: Bytes,
    /// The upstream `Content-Type` (without parameters).
    pub media_type: Arc<str>,
    /// Its digest.
    pub digest: Digest,
}

/// What berth last learned about a tag, kept on disk so that a node without
/// an uplink still resolves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TagRecord {
    /// The manifest digest the tag pointed to.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// When upstream last confirmed it (unix milliseconds).
    pub fetched_at_ms: u64,
}

impl TagRecord {
    /// A record confirmed now.
    pub fn now(digest: &Digest, media_type: &str, size: u64) -> TagRecord {
        TagRecord {
            digest: digest.to_string(),
            media_type: media_type.to_owned(),
            size,
            fetched_at_ms: unix_ms(),
        }
    }

    /// How long ago upstream confirmed it.
    pub fn age(&self) -> Duration {
        Duration::from_millis(unix_ms().saturating_sub(self.fetched_at_ms))
    }

    /// The digest, parsed (records on disk are re-validated).
    pub fn digest(&self) -> Option<Digest> {
        self.digest.parse().ok()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type TagKey = (RegistryHost, Repository, Tag);

/// The cache. Cheap to share behind an `Arc`.
pub struct Cache {
    /// Files on disk.
    pub store: Arc<Store>,
    /// The LRU index of published content.
    pub index: Arc<Index>,
    /// Downloads in progress.
    pub flights: Arc<Flights>,
    /// Small in-memory copies of hot manifests (bounded, 64 MiB).
    manifests: moka::sync::Cache<Digest, Manifest>,
    /// Tag records read from disk or written recently.
    tags: moka::sync::Cache<TagKey, TagRecord>,
}

impl Cache {
    /// Open the cache directory and rebuild the index from it.
    pub fn open(dir: &std::path::Path, capacity: u64) -> std::io::Result<Cache> {
        let store = Arc::new(Store::open(dir)?);
        let index = Arc::new(Index::new(capacity, store.clone()));
        let scanned = store.scan()?;
        let n = scanned.len();
        index.load(scanned);
        tracing::info!(
            blobs = n,
            bytes = index.weighted_bytes(),
            capacity,
            "cache index loaded"
        );
        Ok(Cache {
            store,
            index,
            flights: Arc::new(Flights::default()),
            manifests: moka::sync::Cache::builder()
                .max_capacity(64 << 20)
                .weigher(|_, m: &Manifest| u32::try_from(m.bytes.len()).unwrap_or(u32::MAX))
                .build(),
            tags: moka::sync::Cache::new(100_000),
        })
    }

    /// A published blob, mapped: `None` on a miss. Never copies the content.
    pub fn blob(&self, d: &Digest) -> Result<Option<Bytes>> {
        let Some(entry) = self.index.get(d) else {
            return Ok(None);
        };
        let Some((file, size, ino)) = self.store.open_published(d)? else {
            // Removed behind our back (or by `berth gc`): a miss.
            self.index.forget(d);
            return Ok(None);
        };
        if ino != entry.ino {
            self.index.insert(d.clone(), size, ino);
        }
        if entry.should_touch() {
            Store::touch(&file);
        }
        Ok(Some(mmap::map(&file, size)?))
    }

    /// A cached manifest by digest.
    pub fn manifest(&self, d: &Digest) -> Result<Option<Manifest>> {
        if let Some(m) = self.manifests.get(d) {
            if self.index.get(d).is_some() {
                return Ok(Some(m));
            }
            self.manifests.invalidate(d);
        }
        let Some(media_type) = self.store.read_media_type(d)? else {
            return Ok(None);
        };
        let Some(bytes) = self.blob(d)? else {
            return Ok(None);
        };
        let m = Manifest {
            bytes,
            media_type: media_type.into(),
            digest: d.clone(),
        };
        self.manifests.insert(d.clone(), m.clone());
        Ok(Some(m))
    }

    /// Store verified manifest bytes under their digest.
    pub fn put_manifest(&self, m: &Manifest) -> Result<()> {
        if Digest::of(&m.bytes) != m.digest {
            return Err(Error::Internal("put_manifest with a wrong digest".into()));
        }
        self.store.write_media_type(&m.digest, &m.media_type)?;
        let ino = self.store.publish_bytes(&m.digest, &m.bytes)?;
        self.index
            .insert(m.digest.clone(), m.bytes.len() as u64, ino);
        self.manifests.insert(m.digest.clone(), m.clone());
        Ok(())
    }

    /// The last record for a tag, if any.
    pub fn tag(&self, registry: &RegistryHost, repo: &Repository, tag: &Tag) -> Option<TagRecord> {
        let key = (registry.clone(), repo.clone(), tag.clone());
        if let Some(r) = self.tags.get(&key) {
            return Some(r);
        }
        let bytes = self.store.read_tag(registry, repo, tag).ok()??;
        let rec: TagRecord = serde_json::from_slice(&bytes).ok()?;
        rec.digest()?;
        self.tags.insert(key, rec.clone());
        Some(rec)
    }

    /// Replace a tag record (memory and disk, crash-safe).
    pub fn put_tag(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
        rec: TagRecord,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Internal(e.to_string()))?;
        self.store.write_tag(registry, repo, tag, &bytes)?;
        self.tags
            .insert((registry.clone(), repo.clone(), tag.clone()), rec);
        Ok(())
    }

    /// What a fetch task needs to publish into this cache.
    pub fn publisher(&self) -> flight::Publish {
        flight::Publish {
            store: self.store.clone(),
            index: self.index.clone(),
        }
    }
}
