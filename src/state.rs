//! The one value every handler receives: configuration, cache, upstreams,
//! metrics and the coalescing tables. Cheap to clone (an `Arc` inside).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cache::{Cache, Manifest};
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Reference, RegistryHost, Repository};
use crate::upstream::{ManifestHead, Upstreams};

/// Shared state; clones are shallow.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    /// Validated configuration.
    pub config: Config,
    /// The cache.
    pub cache: Cache,
    /// Upstream clients.
    pub upstreams: Upstreams,
    /// Metrics.
    pub metrics: Metrics,
    /// Tag revalidations in progress (one HEAD per tag however many ask).
    pub heads: Coalescer<(RegistryHost, Repository, Reference), ManifestHead>,
    /// Manifest downloads in progress.
    pub manifest_fetches: Coalescer<(RegistryHost, Repository, Reference), Manifest>,
    /// Set once the cache index is loaded.
    pub ready: AtomicBool,
    /// The cache directory's lock, held for the daemon's lifetime.
    _lock: std::fs::File,
}

impl AppState {
    /// Wrap the parts.
    pub fn new(
        config: Config,
        cache: Cache,
        upstreams: Upstreams,
        metrics: Metrics,
        lock: std::fs::File,
    ) -> AppState {
        AppState(Arc::new(Inner {
            config,
            cache,
            upstreams,
            metrics,
            heads: Coalescer::default(),
            manifest_fetches: Coalescer::default(),
            ready: AtomicBool::new(true),
            _lock: lock,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
