//! The one value every handler receives: configuration and the
//! [`Mirror`] (cache, upstreams, metrics). Cheap to clone (an `Arc`
//! inside). Also the [`Readiness`] that `/readyz` reports.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::mirror::Mirror;

/// Shared state; clones are shallow.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What [`AppState`] holds.
pub struct Inner {
    /// Validated configuration.
    pub config: Config,
    /// What berth decides: cache, upstreams, metrics.
    pub mirror: Mirror,
    /// What `/readyz` reports: ready once the cache index is loaded, not
    /// ready again from the start of shutdown.
    pub readiness: Readiness,
    /// The cache directory's lock, held for the daemon's lifetime.
    _lock: std::fs::File,
}

impl AppState {
    /// Wrap the parts.
    pub fn new(config: Config, mirror: Mirror, lock: std::fs::File) -> AppState {
        AppState(Arc::new(Inner {
            config,
            mirror,
            readiness: Readiness::default(),
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

/// Whether berth should get traffic (`/readyz`): `Loading` until the cache
/// index is loaded, `Ready`, then `Draining` from the start of shutdown on
/// (final), so that load balancers and the kubelet stop sending requests
/// while in-flight responses finish.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

const LOADING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    /// The cache index is loaded: ready, unless shutdown already began.
    pub fn index_loaded(&self) {
        let _ = self
            .0
            .compare_exchange(LOADING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Shutdown began: not ready from now on.
    pub fn draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn ready_only_between_index_load_and_shutdown() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "not ready before the index is loaded");
        r.index_loaded();
        assert!(r.is_ready());
        r.draining();
        assert!(!r.is_ready(), "not ready once shutdown began");
        r.index_loaded();
        assert!(!r.is_ready(), "draining is final");

        let r = Readiness::default();
        r.draining();
        r.index_loaded();
        assert!(!r.is_ready(), "shutdown before the load finished");
    }
}
