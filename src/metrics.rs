//! Prometheus metrics, registered on berth's own registry (not the
//! process-global one) so each test and each server gets a fresh set.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric berth exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: IntCounterVec,
    /// Request latency by route.
    pub request_duration: HistogramVec,
    /// Cache lookups by kind (manifest|blob) and result.
    pub cache_results: IntCounterVec,
    /// Bytes sent to clients by source (cache|upstream).
    pub served_bytes: IntCounterVec,
    /// Upstream requests by registry, kind and status class.
    pub upstream_requests: IntCounterVec,
    /// Upstream content that failed verification.
    pub digest_mismatches: IntCounter,
    /// Downloads in progress.
    pub inflight: IntGauge,
    /// Cache bytes accounted (published + reserved).
    pub cache_bytes: IntGauge,
    /// Cache capacity.
    pub cache_capacity: IntGauge,
    /// Cache entries.
    pub cache_entries: IntGauge,
    /// Evictions since start.
    pub evictions: IntGauge,
    /// Constant 1 with the version.
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// Create and register every metric.
    pub fn register() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);
        let requests = IntCounterVec::new(
            Opts::new(
                "berth_http_requests_total",
                "Registry API requests served, by route, method and status.",
            ),
            &["route", "method", "status"],
        )?;
        reg(Box::new(requests.clone()))?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "berth_http_request_duration_seconds",
                "Time to answer a request (headers sent), by route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route"],
        )?;
        reg(Box::new(request_duration.clone()))?;
        let cache_results = IntCounterVec::new(
            Opts::new(
                "berth_cache_requests_total",
                "Cache lookups by kind (manifest|blob) and result (hit|miss|coalesced|stale|pass).",
            ),
            &["kind", "result"],
        )?;
        reg(Box::new(cache_results.clone()))?;
        let served_bytes = IntCounterVec::new(
            Opts::new(
                "berth_served_bytes_total",
                "Content bytes sent to clients, by source (cache|upstream).",
            ),
            &["source"],
        )?;
        reg(Box::new(served_bytes.clone()))?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "berth_upstream_requests_total",
                "Requests berth sent upstream, by registry, kind and status.",
            ),
            &["registry", "kind", "status"],
        )?;
        reg(Box::new(upstream_requests.clone()))?;
        let digest_mismatches = IntCounter::new(
            "berth_digest_mismatches_total",
            "Upstream content that did not match its digest (never cached).",
        )?;
        reg(Box::new(digest_mismatches.clone()))?;
        let inflight = IntGauge::new("berth_inflight_fetches", "Blob downloads in progress.")?;
        reg(Box::new(inflight.clone()))?;
        let cache_bytes = IntGauge::new(
            "berth_cache_size_bytes",
            "Bytes held by the cache, including space reserved for downloads.",
        )?;
        reg(Box::new(cache_bytes.clone()))?;
        let cache_capacity =
            IntGauge::new("berth_cache_capacity_bytes", "Configured cache capacity.")?;
        reg(Box::new(cache_capacity.clone()))?;
        let cache_entries = IntGauge::new("berth_cache_entries", "Entries in the cache index.")?;
        reg(Box::new(cache_entries.clone()))?;
        let evictions = IntGauge::new("berth_cache_evictions", "Entries evicted since start.")?;
        reg(Box::new(evictions.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new("berth_build_info", "Always 1; labels carry the build."),
            &["version"],
        )?;
        reg(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            cache_results,
            served_bytes,
            upstream_requests,
            digest_mismatches,
            inflight,
            cache_bytes,
            cache_capacity,
            cache_entries,
            evictions,
            build_info,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
