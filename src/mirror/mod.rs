//! What berth decides, independent of HTTP: resolve a tag (TTL, HEAD
//! revalidation, stale rules), get a manifest by digest (fetch, verify,
//! store), open a blob (hit, join a download, start one, or relay it while
//! the cache is full), the proof that a registry may read private content,
//! and the metrics that describe those decisions. The HTTP handlers
//! ([`crate::server`]) translate requests into these calls and their
//! results into responses; `berth prefetch` ([`crate::admin::prefetch`])
//! calls the same functions.
//!
//! Layers point one way: server -> mirror -> {upstream, cache} -> registry.

mod blobs;
mod manifests;
mod private;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use crate::cache::flight::Flight;
use crate::cache::provenance::Origin;
use crate::cache::{Cache, Manifest, TagRecord};
use crate::coalesce::Coalescer;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::registry::{Digest, Reference, RegistryHost, Repository, Tag};
use crate::upstream::{ManifestHead, Upstream, Upstreams};

/// How a request was answered (a metric label and the access log's field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// Joined a fetch already in progress.
    Coalesced,
    /// Served from the cache because upstream failed (offline).
    Stale,
    /// Passed through without caching.
    Pass,
}

impl CacheResult {
    /// Metric/log label.
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Stale => "stale",
            CacheResult::Pass => "pass",
        }
    }

    fn fetched(joined: bool) -> CacheResult {
        if joined {
            CacheResult::Coalesced
        } else {
            CacheResult::Miss
        }
    }
}

/// Upstream bytes of a blob.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// How the caller that starts a download taps its upstream bytes
/// (prefetch paces them, counts them and stops them on cancellation).
#[derive(Clone, Default)]
pub struct Tap {
    /// Stop opening and reading upstream once cancelled.
    pub cancel: Option<CancellationToken>,
    /// Wrap each upstream body's stream.
    pub shape: Option<Arc<dyn Fn(ByteStream) -> ByteStream + Send + Sync>>,
}

/// What a blob `GET` gets.
pub enum BlobReply {
    /// Cached: the whole blob, mapped.
    Cached(Bytes),
    /// Being downloaded (by this request or another): stream from it.
    Flight {
        /// The download.
        flight: Arc<Flight>,
        /// The blob's size.
        size: u64,
    },
    /// The cache filesystem is full: relay it ([`Mirror::relay_blob`]).
    Full,
}

/// A blob relayed from upstream without caching.
pub struct Relayed {
    /// The blob's full size.
    pub size: u64,
    /// The bytes sent: `range` of the blob.
    pub range: Range<u64>,
    /// The bytes (a full body is verified before its last chunk).
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

/// What a manifest request gets.
#[derive(Debug)]
pub enum ManifestReply {
    /// The manifest.
    Manifest(Manifest),
    /// For a HEAD: what the tag record (or upstream's HEAD) says; the
    /// manifest itself was not needed.
    Record(TagRecord),
}

/// What [`Mirror::vouch`] asks the upstream about.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Manifest,
    Blob,
}

/// Where content fetched through `upstream` comes from (the provenance of
/// private content).
pub fn origin(upstream: &Upstream) -> Origin {
    Origin {
        registry: upstream.host.clone(),
        private: upstream.private,
    }
}

/// The mirror: cache, upstream clients, metrics and the tables that turn
/// identical concurrent upstream calls into one. Clones are shallow.
#[derive(Clone)]
pub struct Mirror(Arc<Parts>);

/// What a [`Mirror`] holds.
pub struct Parts {
    /// The cache.
    pub cache: Cache,
    /// Upstream clients, per mirrored registry.
    pub upstreams: Upstreams,
    /// Metrics.
    pub metrics: Metrics,
    /// How long a tag record is trusted without asking upstream.
    tag_ttl: Duration,
    /// Tag revalidations in progress (one HEAD per tag however many ask).
    heads: Coalescer<(RegistryHost, Repository, Reference), ManifestHead>,
    /// Manifest downloads in progress.
    manifest_fetches: Coalescer<(RegistryHost, Repository, Reference), Manifest>,
}

impl std::ops::Deref for Mirror {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

impl Mirror {
    /// Assemble a mirror.
    pub fn new(cache: Cache, upstreams: Upstreams, metrics: Metrics, tag_ttl: Duration) -> Mirror {
        Mirror(Arc::new(Parts {
            cache,
            upstreams,
            metrics,
            tag_ttl,
            heads: Coalescer::default(),
            manifest_fetches: Coalescer::default(),
        }))
    }

    /// The upstream of a mirrored registry.
    pub fn upstream(&self, registry: &RegistryHost) -> Result<Arc<Upstream>> {
        self.upstreams
            .get(registry)
            .cloned()
            .ok_or_else(|| Error::RegistryUnknown(registry.to_string()))
    }

    /// Run blocking cache I/O on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Mirror) -> T + Send + 'static,
    ) -> Result<T> {
        let m = self.clone();
        tokio::task::spawn_blocking(move || f(&m))
            .await
            .map_err(|e| Error::Internal(format!("blocking cache task: {e}")))
    }

    /// A cached blob: a reused mapping inline (the warm path pays no thread
    /// hop), otherwise opened and mapped on a blocking thread.
    pub async fn cached_blob(&self, d: &Digest) -> Result<Option<Bytes>> {
        if let Some(b) = self.cache.warm_blob(d) {
            return Ok(Some(b));
        }
        let d = d.clone();
        self.blocking(move |m| m.cache.blob(&d)).await?
    }

    /// A cached manifest: from memory inline, else read on a blocking thread.
    pub async fn cached_manifest(&self, d: &Digest) -> Result<Option<Manifest>> {
        if let Some(m) = self.cache.warm_manifest(d) {
            return Ok(Some(m));
        }
        let d = d.clone();
        self.blocking(move |m| m.cache.manifest(&d)).await?
    }

    /// A tag record: from memory inline, else read on a blocking thread.
    async fn cached_tag(
        &self,
        reg: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
    ) -> Result<Option<TagRecord>> {
        if let Some(r) = self.cache.warm_tag(reg, repo, tag) {
            return Ok(Some(r));
        }
        let (reg, repo, tag) = (reg.clone(), repo.clone(), tag.clone());
        self.blocking(move |m| m.cache.tag(&reg, &repo, &tag)).await
    }

    /// Record a tag (written and fsynced on a blocking thread).
    pub async fn put_tag(
        &self,
        reg: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
        rec: TagRecord,
    ) -> Result<()> {
        let (reg, repo, tag) = (reg.clone(), repo.clone(), tag.clone());
        self.blocking(move |m| m.cache.put_tag(&reg, &repo, &tag, rec))
            .await?
    }

    /// Store a verified manifest (on a blocking thread).
    pub async fn store_manifest(&self, manifest: &Manifest, origin: Origin) -> Result<()> {
        let manifest = manifest.clone();
        self.blocking(move |m| m.cache.put_manifest(&manifest, &origin))
            .await?
    }

    /// Quarantine `d` off the async workers (its mapped file turned out
    /// truncated while being served).
    pub fn quarantine_later(&self, d: &Digest) {
        let (m, d) = (self.clone(), d.clone());
        crate::cache::in_background(move || m.cache.quarantine(&d));
    }

    /// Bring the cache gauges up to date (reads the filesystem's usage:
    /// blocking).
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let idx = &self.cache.index;
        m.cache_bytes.set(idx.weighted_bytes() as i64);
        m.cache_capacity.set(idx.capacity() as i64);
        m.cache_entries.set(idx.len() as i64);
        m.cache_full.set(i64::from(self.cache.store.is_full()));
        let dir = self.cache.store.root();
        if let (Ok(free), Ok(size)) = (fs4::available_space(dir), fs4::total_space(dir)) {
            m.fs_free.set(free as i64);
            m.fs_size.set(size as i64);
        }
        let (total, seen) = (idx.evictions(), m.evictions.get());
        if total > seen {
            m.evictions.inc_by(total - seen);
        }
    }
}
