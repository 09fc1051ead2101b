//! berth: a node-local, pull-through OCI registry mirror.
//!
//! containerd (through `hosts.toml`), k3s (through `registries.yaml`),
//! skopeo and other clients pull through berth; it answers from an on-disk,
//! mmap-served LRU cache, fetches each missing blob from upstream exactly
//! once however many clients ask at the same moment, streams it to all of
//! them while it downloads, and publishes it only after its sha256 matched.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap structs of every subcommand).
//! - [`config`]: config file, defaults, the validated [`config::Config`].
//! - [`error`]: the error type and its one mapping to HTTP status + OCI code.
//! - [`registry`]: OCI wire types (names, image references read the docker
//!   way, digests, media types, descriptors, the error envelope); pure.
//! - [`server`]: accept loop, routing ([`server::route`]), handlers, Range,
//!   responses, access log; connection I/O with `sendfile` for mapped
//!   content on plain TCP ([`server::conn`]); idle and stalled connections
//!   closed ([`server::watchdog`]).
//! - [`upstream`]: reqwest clients per registry, bearer/basic auth
//!   ([`upstream::auth`]), what a status means ([`upstream::answer`]),
//!   transport errors and redaction ([`upstream::net`]), and a filtering DNS
//!   resolver as the SSRF guard ([`upstream::resolve`]).
//! - [`cache`]: the store on disk ([`cache::store`]), the LRU index
//!   ([`cache::index`]), single-flight downloads with streaming followers
//!   ([`cache::flight`]), which registries may read private content
//!   ([`cache::provenance`]), and the one module with `unsafe` ([`cache::mmap`]).
//! - [`mirror`]: what berth decides, independent of HTTP: tag TTL and
//!   revalidation, stale answers, manifest fetch-verify-store, blob hits,
//!   downloads and relays, the private-content proof; used by the server
//!   and by prefetch.
//! - [`transfer`]: a blob body in transit, how to blame its source, and the
//!   verifying stream of a relay.
//!
//! Layers point one way: server -> mirror -> {upstream, cache} ->
//! {transfer, registry}; `tests/layers.sh` checks it and that no modules
//! import each other.
//! - [`coalesce`]: one upstream call for many identical concurrent requests.
//! - [`state`]: the shared [`state::AppState`] (config + mirror + readiness).
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logging.
//! - [`admin`]: offline and maintenance commands on a cache directory:
//!   `berth ls`, `verify`, `gc`, `export`/`import` (OCI layout bundles for
//!   air-gapped nodes) and `prefetch` (also run by the daemon on a schedule).
//! - [`node`]: node integration: `berth containerd install|uninstall`
//!   (hosts.toml per registry, config.toml check) and `berth k3s`
//!   (registries.yaml entries).
#![deny(missing_docs)]

pub mod admin;
pub mod cache;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod pins;
pub mod registry;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod transfer;
pub mod upstream;

use std::future::Future;

use anyhow::Context as _;
use tokio::net::TcpListener;

use config::{Capacity, Config};
use state::AppState;

/// Build the shared state: open the cache (rebuilding its index) and the
/// upstream clients. Never contacts an upstream, so berth starts offline.
pub fn build_state(config: Config) -> anyhow::Result<AppState> {
    std::fs::create_dir_all(&config.cache_dir).with_context(|| {
        format!(
            "cannot create cache directory {}",
            config.cache_dir.display()
        )
    })?;
    let capacity = match config.capacity {
        Capacity::Bytes(b) => b,
        Capacity::Share(f) => {
            let total = fs4::total_space(&config.cache_dir).with_context(|| {
                format!(
                    "cannot read the size of the filesystem of {}",
                    config.cache_dir.display()
                )
            })?;
            (total as f64 * f) as u64
        }
    };
    // Before opening (which empties tmp/): never share a cache with a live daemon.
    let lock = cache::store::lock(&config.cache_dir)?;
    let mut cache = cache::Cache::open(&config.cache_dir, capacity, config.pins.clone())
        .with_context(|| format!("cannot open cache directory {}", config.cache_dir.display()))?;
    cache.flight_policy = cache::flight::Policy {
        verify_hold: config.verify_hold,
        min_rate: config.min_rate,
        rate_window: config.read_timeout,
    };
    let metrics = metrics::Metrics::register().context("registering metrics")?;
    let upstreams =
        upstream::Upstreams::new(&config, &metrics).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mirror = mirror::Mirror::new(cache, upstreams, metrics, config.tag_ttl);
    let state = AppState::new(config, mirror, lock);
    // `Cache::open` loaded the index (before any listener is bound).
    state.readiness.index_loaded();
    Ok(state)
}

/// Serve the registry API (and, if given, the metrics listener) until
/// `shutdown` resolves. Listeners are bound by the caller (tests use port 0).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let st = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        // /readyz says 503 from the first moment of the drain.
        st.readiness.draining();
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let retention = state.config.retention;
    if !retention.is_zero() {
        let mirror = state.mirror.clone();
        let mut stop = rx.clone();
        tokio::spawn(async move {
            // Check often enough to be within ~4% of the configured age.
            let every = (retention / 24).clamp(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(3600),
            );
            loop {
                let m = mirror.clone();
                let _ =
                    tokio::task::spawn_blocking(move || m.cache.apply_retention(retention)).await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|v| *v) => break,
                }
            }
        });
    }
    admin::prefetch::start::spawn_schedule(&state, wait(rx.clone()));
    // The probe listener outlives the registry listener's drain, so that
    // probes see /readyz 503 (not a refused connection) until the end.
    let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
    let metrics = metrics_listener.map(|l| {
        let st = state.clone();
        tokio::spawn(async move {
            server::run(l, st, server::Role::Metrics, async {
                let _ = drained.await;
            })
            .await
        })
    });
    let flights = state.mirror.cache.flights.clone();
    server::run(listener, state, server::Role::Registry, wait(rx)).await;
    flights.verified_published(server::SHUTDOWN_GRACE).await;
    let _ = drained_tx.send(());
    if let Some(m) = metrics {
        let _ = m.await;
    }
}
