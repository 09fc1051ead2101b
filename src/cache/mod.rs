//! The cache facade: published content (mmap-served), manifests with their
//! media types, tag records, the single-flight table for misses, and the
//! provenance of private content.

pub mod flight;
pub mod index;
pub mod mmap;
pub mod provenance;
pub mod reaper;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::pins::Rules;
use crate::registry::{Digest, RegistryHost, Repository, Tag};
use flight::Flights;
use index::Index;
use provenance::{Origin, Provenance};
use store::{unix_ms, unix_secs, Store};

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

type TagKey = (RegistryHost, Repository, Tag);

/// The cache. Cheap to share behind an `Arc`.
pub struct Cache {
    /// Files on disk.
    pub store: Arc<Store>,
    /// The LRU index of published content.
    pub index: Arc<Index>,
    /// Downloads in progress.
    pub flights: Arc<Flights>,
    /// Which registries are known to serve private content.
    pub provenance: Arc<Provenance>,
    /// How downloads treat unverified and slow bytes.
    pub flight_policy: flight::Policy,
    /// Small in-memory copies of hot manifests (bounded, 64 MiB).
    manifests: moka::sync::Cache<Digest, Manifest>,
    /// Tag records read from disk or written recently.
    tags: moka::sync::Cache<TagKey, TagRecord>,
    /// Images never evicted.
    pins: Rules,
    /// Recently served mappings, reused so that hot blobs are not mapped
    /// and page-faulted again on every request. An entry of an evicted
    /// (unlinked) file still holds correct, immutable content; it is dropped
    /// after [`MAPPING_IDLE`], which bounds how long its disk space lingers.
    maps: moka::sync::Cache<Digest, (u64, Bytes)>,
}

/// Most mappings kept for reuse.
const MAPPED_FILES: u64 = 512;
/// A mapping unused this long is dropped (unmapped once no response holds it).
const MAPPING_IDLE: Duration = Duration::from_secs(30);

/// Run blocking `f` on tokio's blocking pool without waiting for it (or
/// right here outside a runtime).
pub fn in_background(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(f)),
        Err(_) => f(),
    }
}

/// Every digest reachable from the tag records that match `rules`.
pub fn pinned_digests(store: &Store, rules: &Rules) -> std::io::Result<HashSet<Digest>> {
    if rules.is_empty() {
        return Ok(HashSet::new());
    }
    let mut roots = Vec::new();
    for (reg, repo, tag, bytes) in store.tag_records()? {
        if rules.matches(&reg, repo.as_str(), tag.as_str()) {
            if let Some(d) = serde_json::from_slice::<TagRecord>(&bytes)
                .ok()
                .and_then(|r| r.digest())
            {
                roots.push(d);
            }
        }
    }
    Ok(closure(store, roots))
}

/// The digests of `roots` and everything their cached manifests reference
/// (index -> manifests -> config and layers). Missing manifests end the walk
/// there; their children are pinned when they arrive.
pub fn closure(store: &Store, roots: Vec<Digest>) -> HashSet<Digest> {
    let mut seen = HashSet::new();
    let mut stack = roots;
    while let Some(d) = stack.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        let Ok(Some(bytes)) = store.read_manifest(&d) else {
            continue;
        };
        for c in crate::registry::manifest::children(&bytes).unwrap_or_default() {
            if c.is_manifest {
                stack.push(c.digest);
            } else {
                seen.insert(c.digest);
            }
        }
    }
    seen
}

impl Cache {
    /// Open the cache directory and rebuild the index from it; content of
    /// tags matching `pins` (and everything those manifests reference) is
    /// pinned before anything could be evicted.
    pub fn open(dir: &std::path::Path, capacity: u64, pins: Rules) -> std::io::Result<Cache> {
        let store = Arc::new(Store::open(dir)?);
        let index = Arc::new(Index::new(capacity, store.clone()));
        let scanned = store.scan()?;
        let n = scanned.len();
        let pinned = pinned_digests(&store, &pins)?;
        if !pinned.is_empty() {
            tracing::info!(digests = pinned.len(), "pinned content found");
        }
        index.load(scanned, pinned);
        let provenance = Arc::new(Provenance::load(store.clone())?);
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
            provenance,
            flight_policy: flight::Policy::default(),
            manifests: moka::sync::Cache::builder()
                .max_capacity(64 << 20)
                .weigher(|_, m: &Manifest| u32::try_from(m.bytes.len()).unwrap_or(u32::MAX))
                .build(),
            tags: moka::sync::Cache::new(100_000),
            maps: moka::sync::Cache::builder()
                .max_capacity(MAPPED_FILES)
                .time_to_idle(MAPPING_IDLE)
                .build(),
            pins,
        })
    }

    /// A published blob whose mapping is in the reuse cache: no file I/O
    /// (a recency touch, at most once a minute, goes to a blocking thread).
    /// `None` means "ask [`Cache::blob`]", not "missing".
    pub fn warm_blob(&self, d: &Digest) -> Option<Bytes> {
        let entry = self.index.get(d)?;
        let (ino, bytes) = self.maps.get(d)?;
        if ino != entry.ino || mmap::watch(&bytes).is_some_and(|p| p.is_set()) {
            return None;
        }
        if entry.should_touch() {
            if let Some((file, _)) = mmap::locate(&bytes) {
                in_background(move || Store::touch(&file));
            }
        }
        Some(bytes)
    }

    /// A published blob, mapped: `None` on a miss. Never copies the content.
    /// Blocking (open, fstat, futimens, mmap): call it off the async workers.
    /// A file found shorter than the index says (truncated behind berth's
    /// back) or unreadable is quarantined and is a miss, so it is refetched.
    pub fn blob(&self, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(bytes) = self.warm_blob(d) {
            return Ok(Some(bytes));
        }
        let Some(entry) = self.index.get(d) else {
            return Ok(None);
        };
        let published = match self.store.open_published(d) {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Removed behind our back (or by `berth gc`): a miss.
                self.index.forget(d);
                return Ok(None);
            }
            Err(error) => {
                tracing::warn!(digest = %d, %error, "cached file unreadable");
                self.quarantine(d);
                return Ok(None);
            }
        };
        let (size, ino) = (published.size(), published.ino());
        if ino != entry.ino {
            self.index.insert(d.clone(), size, ino);
        } else if size != entry.size {
            tracing::warn!(digest = %d, size, expected = entry.size, "cached file truncated behind berth's back");
            self.quarantine(d);
            return Ok(None);
        }
        if entry.should_touch() {
            Store::touch(published.file());
        }
        let bytes = mmap::map(published)?;
        self.maps.insert(d.clone(), (ino, bytes.clone()));
        Ok(Some(bytes))
    }

    /// Take damaged content out of service: forget it everywhere and move
    /// its file to `<cache>/quarantine/`, so the next request refetches it.
    /// Blocking (a rename).
    pub fn quarantine(&self, d: &Digest) {
        self.maps.invalidate(d);
        self.manifests.invalidate(d);
        self.index.forget(d);
        match self.store.quarantine(d) {
            Ok(to) => {
                tracing::warn!(digest = %d, quarantine = %to.display(), "damaged cache entry quarantined; it will be fetched again")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(digest = %d, %error, "could not quarantine a damaged cache entry")
            }
        }
    }

    /// A cached manifest held in memory: no file I/O. `None` means "ask
    /// [`Cache::manifest`]", not "missing".
    pub fn warm_manifest(&self, d: &Digest) -> Option<Manifest> {
        let m = self.manifests.get(d)?;
        if self.index.get(d).is_some() && !mmap::watch(&m.bytes).is_some_and(|p| p.is_set()) {
            return Some(m);
        }
        self.manifests.invalidate(d);
        None
    }

    /// A cached manifest by digest.
    /// Blocking (reads the media type and maps the file) unless
    /// [`Cache::warm_manifest`] has it: call it off the async workers.
    pub fn manifest(&self, d: &Digest) -> Result<Option<Manifest>> {
        if let Some(m) = self.warm_manifest(d) {
            return Ok(Some(m));
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

    /// Store verified manifest bytes, fetched through `origin`, under their
    /// digest (a private origin is recorded first, see [`provenance`]). Out
    /// of space is not an error: the manifest is served without being cached.
    pub fn put_manifest(&self, m: &Manifest, origin: &Origin) -> Result<()> {
        match self.store_manifest(m, origin) {
            Err(Error::Io(e)) if self.store.note_write_error(&e) => Ok(()),
            other => other,
        }
    }

    fn store_manifest(&self, m: &Manifest, origin: &Origin) -> Result<()> {
        if Digest::of(&m.bytes) != m.digest {
            return Err(Error::Internal("put_manifest with a wrong digest".into()));
        }
        if origin.private {
            self.provenance.grant(&m.digest, &origin.registry)?;
        }
        self.store.write_media_type(&m.digest, &m.media_type)?;
        let ino = self.store.publish_bytes(&m.digest, &m.bytes)?;
        self.index
            .insert(m.digest.clone(), m.bytes.len() as u64, ino);
        self.manifests.insert(m.digest.clone(), m.clone());
        if self.index.is_pinned(&m.digest) {
            // A pinned manifest arrived: pin what it references too.
            self.index.pin(closure(&self.store, vec![m.digest.clone()]));
        }
        if !origin.private {
            // Served by a public registry: not private content (a record
            // left behind by an error only costs a HEAD later).
            if let Err(error) = self.provenance.served_by(&m.digest, origin) {
                tracing::warn!(digest = %m.digest, %error, "could not drop a provenance record");
            }
        }
        Ok(())
    }

    /// The last record for a tag if it is in memory: no file I/O.
    pub fn warm_tag(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
    ) -> Option<TagRecord> {
        self.tags
            .get(&(registry.clone(), repo.clone(), tag.clone()))
    }

    /// The last record for a tag, if any.
    /// Blocking (reads the record file) unless [`Cache::warm_tag`] has it.
    pub fn tag(&self, registry: &RegistryHost, repo: &Repository, tag: &Tag) -> Option<TagRecord> {
        if let Some(r) = self.warm_tag(registry, repo, tag) {
            return Some(r);
        }
        let key = (registry.clone(), repo.clone(), tag.clone());
        let bytes = self.store.read_tag(registry, repo, tag).ok()??;
        let rec: TagRecord = serde_json::from_slice(&bytes).ok()?;
        rec.digest()?;
        self.tags.insert(key, rec.clone());
        Some(rec)
    }

    /// Replace a tag record (memory and disk, crash-safe). Blocking (fsync).
    pub fn put_tag(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
        rec: TagRecord,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Internal(e.to_string()))?;
        match self.store.write_tag(registry, repo, tag, &bytes) {
            Err(e) if self.store.note_write_error(&e) => return Ok(()),
            written => written?,
        }
        if self.pins.matches(registry, repo.as_str(), tag.as_str()) {
            if let Some(d) = rec.digest() {
                self.index.pin(closure(&self.store, vec![d]));
            }
        }
        self.tags
            .insert((registry.clone(), repo.clone(), tag.clone()), rec);
        Ok(())
    }

    /// Remove unpinned content unused for `retention`; returns (entries, bytes).
    pub fn apply_retention(&self, retention: Duration) -> (usize, u64) {
        if retention.is_zero() {
            return (0, 0);
        }
        let before = unix_secs(SystemTime::now()).saturating_sub(retention.as_secs());
        let (mut n, mut bytes) = (0, 0);
        for (d, size, ino) in self.index.unused_since(before) {
            self.index.remove(&d);
            self.manifests.invalidate(&d);
            match self.store.remove_blob(&d, ino) {
                Ok(true) => {
                    n += 1;
                    bytes += size;
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, digest = %d, "could not remove expired content")
                }
            }
        }
        if n > 0 {
            tracing::info!(entries = n, bytes, retention = %humantime::format_duration(retention), "removed content unused for longer than the retention period");
        }
        (n, bytes)
    }

    /// What a fetch task through `origin` needs to publish into this cache.
    pub fn publisher(&self, origin: Origin) -> flight::Publish {
        flight::Publish {
            store: self.store.clone(),
            index: self.index.clone(),
            provenance: self.provenance.clone(),
            origin,
            policy: self.flight_policy,
        }
    }
}
