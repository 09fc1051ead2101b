//! Prometheus metrics, registered on berth's own registry (not the
//! process-global one) so each server and each test gets a fresh set.
//! Names follow Prometheus conventions (`berth_` prefix, `_total` counters,
//! `_bytes`, `_seconds`); labels are low-cardinality: route, method, status,
//! registry, kind (manifest|blob|tags|referrers|token), result, source.
//! The README's metric table is checked against [`Metrics::describe`] by a test.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric berth exports. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: IntCounterVec,
    /// Time to answer a request (until the response headers), by route.
    pub request_duration: HistogramVec,
    /// Cache lookups by kind (manifest|blob) and result.
    pub cache_results: IntCounterVec,
    /// Content bytes sent to clients by source (cache|upstream).
    pub served_bytes: IntCounterVec,
    /// Upstream requests by registry, kind and status.
    pub upstream_requests: IntCounterVec,
    /// Upstream latency to response headers by registry and kind.
    pub upstream_duration: HistogramVec,
    /// Bytes received from upstream by registry and kind.
    pub upstream_bytes: IntCounterVec,
    /// Docker Hub style `ratelimit-remaining` by registry.
    pub ratelimit_remaining: IntGaugeVec,
    /// Docker Hub style `ratelimit-limit` by registry.
    pub ratelimit_limit: IntGaugeVec,
    /// Upstream content that failed verification.
    pub digest_mismatches: IntCounter,
    /// Cached private content refused to a registry that did not prove it serves it.
    pub private_refusals: IntCounterVec,
    /// Downloads in progress.
    pub inflight: IntGauge,
    /// Clients streaming a download another request started.
    pub followers: IntGauge,
    /// Cache bytes accounted (published + reserved).
    pub cache_bytes: IntGauge,
    /// Cache capacity.
    pub cache_capacity: IntGauge,
    /// Cache entries.
    pub cache_entries: IntGauge,
    /// Evictions since start.
    pub evictions: IntCounter,
    /// 1 while the cache filesystem is full (misses pass through uncached).
    pub cache_full: IntGauge,
    /// Free bytes on the cache filesystem.
    pub fs_free: IntGauge,
    /// Size of the cache filesystem.
    pub fs_size: IntGauge,
    /// Manifests served from cache because upstream failed.
    pub stale_served: IntCounterVec,
    /// Client connections berth closed, by reason (idle|stalled).
    pub connections_closed: IntCounterVec,
    /// Constant 1 with the version.
    pub build_info: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Create and register every metric.
    pub fn register() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)?,
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&registry, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help)?);
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?,
            )
        };
        let m = Metrics {
            requests: counter_vec(
                "berth_http_requests_total",
                "Registry API requests answered, by route, method and status.",
                &["route", "method", "status"],
            )?,
            request_duration: histogram_vec(
                "berth_http_request_duration_seconds",
                "Time until the response headers were ready, by route.",
                &["route"],
            )?,
            cache_results: counter_vec(
                "berth_cache_requests_total",
                "Cache lookups by kind (manifest|blob) and result (hit|miss|coalesced|stale|pass).",
                &["kind", "result"],
            )?,
            served_bytes: counter_vec(
                "berth_served_bytes_total",
                "Content bytes sent to clients, by source (cache|upstream).",
                &["source"],
            )?,
            upstream_requests: counter_vec(
                "berth_upstream_requests_total",
                "Requests sent upstream, by registry, endpoint, kind and status (error when no response).",
                &["registry", "endpoint", "kind", "status"],
            )?,
            upstream_duration: histogram_vec(
                "berth_upstream_request_duration_seconds",
                "Upstream latency until response headers, by registry, endpoint and kind.",
                &["registry", "endpoint", "kind"],
            )?,
            upstream_bytes: counter_vec(
                "berth_upstream_bytes_total",
                "Content bytes received from upstream, by registry and kind.",
                &["registry", "kind"],
            )?,
            ratelimit_remaining: gauge_vec(
                "berth_upstream_ratelimit_remaining",
                "Pulls left in the upstream's rate-limit window (Docker Hub ratelimit-remaining).",
                &["registry"],
            )?,
            ratelimit_limit: gauge_vec(
                "berth_upstream_ratelimit_limit",
                "Pulls allowed per rate-limit window (Docker Hub ratelimit-limit).",
                &["registry"],
            )?,
            digest_mismatches: reg(
                &registry,
                IntCounter::new(
                    "berth_digest_mismatches_total",
                    "Upstream content that did not match its digest (never cached).",
                )?,
            )?,
            private_refusals: counter_vec(
                "berth_private_refusals_total",
                "Cached private content refused to a request through a registry that did not prove it serves it, by registry and reason (not_found|denied|unavailable).",
                &["registry", "reason"],
            )?,
            inflight: gauge("berth_inflight_fetches", "Blob downloads in progress.")?,
            followers: gauge(
                "berth_flight_followers",
                "Client responses streaming a download that another request started.",
            )?,
            cache_bytes: gauge(
                "berth_cache_size_bytes",
                "Bytes held by the cache, including space reserved for downloads.",
            )?,
            cache_capacity: gauge(
                "berth_cache_capacity_bytes",
                "Configured cache capacity in bytes.",
            )?,
            cache_entries: gauge("berth_cache_entries", "Entries in the cache index.")?,
            evictions: reg(
                &registry,
                IntCounter::new(
                    "berth_cache_evictions_total",
                    "Cache entries evicted to stay within capacity.",
                )?,
            )?,
            cache_full: gauge(
                "berth_cache_full",
                "1 while the cache filesystem is full and misses are served without caching.",
            )?,
            fs_free: gauge(
                "berth_cache_filesystem_free_bytes",
                "Bytes available to berth on the cache filesystem.",
            )?,
            fs_size: gauge(
                "berth_cache_filesystem_size_bytes",
                "Size of the cache filesystem in bytes.",
            )?,
            stale_served: counter_vec(
                "berth_stale_served_total",
                "Manifests served from cache because the upstream failed, by registry.",
                &["registry"],
            )?,
            connections_closed: counter_vec(
                "berth_client_connections_closed_total",
                "Client connections berth closed, by reason (idle: nothing open or moving; stalled: the client stopped reading).",
                &["reason"],
            )?,
            build_info: gauge_vec(
                "berth_build_info",
                "Always 1; the labels describe the build.",
                &["version"],
            )?,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// The text exposition format (0.0.4).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// (name, type, labels, help) of every metric, in registration order; the
    /// source of the README's table.
    pub fn describe(&self) -> Vec<(String, &'static str, Vec<String>, String)> {
        let collectors: Vec<(&dyn Collector, &'static str)> = vec![
            (&self.requests, "counter"),
            (&self.request_duration, "histogram"),
            (&self.cache_results, "counter"),
            (&self.served_bytes, "counter"),
            (&self.upstream_requests, "counter"),
            (&self.upstream_duration, "histogram"),
            (&self.upstream_bytes, "counter"),
            (&self.ratelimit_remaining, "gauge"),
            (&self.ratelimit_limit, "gauge"),
            (&self.digest_mismatches, "counter"),
            (&self.private_refusals, "counter"),
            (&self.inflight, "gauge"),
            (&self.followers, "gauge"),
            (&self.cache_bytes, "gauge"),
            (&self.cache_capacity, "gauge"),
            (&self.cache_entries, "gauge"),
            (&self.evictions, "counter"),
            (&self.cache_full, "gauge"),
            (&self.fs_free, "gauge"),
            (&self.fs_size, "gauge"),
            (&self.stale_served, "counter"),
            (&self.connections_closed, "counter"),
            (&self.build_info, "gauge"),
        ];
        collectors
            .into_iter()
            .flat_map(|(c, kind)| {
                c.desc().into_iter().map(move |d| {
                    (
                        d.fq_name.clone(),
                        kind,
                        d.variable_labels.clone(),
                        d.help.clone(),
                    )
                })
            })
            .collect()
    }

    /// The README table (markdown rows) for [`Metrics::describe`].
    pub fn markdown_table(&self) -> String {
        let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for (name, kind, labels, help) in self.describe() {
            out.push_str(&format!(
                "| `{name}` | {kind} | {} | {help} |\n",
                labels.join(", ")
            ));
        }
        out
    }
}

/// Keeps a gauge incremented while alive.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increment now, decrement on drop.
    pub fn new(g: &IntGauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_documents_every_metric() {
        let table = Metrics::register().unwrap().markdown_table();
        let readme = include_str!("../README.md");
        let start = readme
            .find("<!-- metrics:start -->")
            .expect("README has a metrics table marker");
        let end = readme
            .find("<!-- metrics:end -->")
            .expect("README has a metrics end marker");
        let documented = readme[start + "<!-- metrics:start -->".len()..end].trim();
        assert_eq!(
            documented,
            table.trim(),
            "README metric table is stale; replace it with:\n{table}"
        );
    }

    #[test]
    fn names_follow_conventions() {
        for (name, kind, _, _) in Metrics::register().unwrap().describe() {
            assert!(name.starts_with("berth_"), "{name}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name}: only counters end in _total"
            );
        }
    }
}
