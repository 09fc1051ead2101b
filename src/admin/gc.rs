//! `berth gc`: apply the retention period now (the daemon does it on its
//! own schedule): remove unpinned content whose last use (file mtime) is
//! older than `--retention` / `retention`, and say what went, with the
//! images it belonged to. Tag records stay (they are tiny, and keep saying
//! where a tag pointed); `berth ls` shows such images as not complete.
//! Provenance records of private content no longer cached are removed.
//! Needs the cache's lock.

use std::collections::HashMap;
use std::time::SystemTime;

use super::{fail, init_logging, is_cache, lock, AdminError, EXIT_OK};
use crate::cache::{closure, Cache, TagRecord};
use crate::cli::GcArgs;
use crate::config::Config;
use crate::registry::Digest;

/// One removed (or, with `--dry-run`, removable) file.
#[derive(Debug, Clone)]
pub struct Removed {
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Tagged images that referenced it.
    pub images: Vec<String>,
}

/// `berth gc`.
pub fn run(config: Config, args: &GcArgs) -> i32 {
    match gc(config, args) {
        Ok(()) => EXIT_OK,
        Err(e) => fail(&e),
    }
}

fn gc(config: Config, args: &GcArgs) -> Result<(), AdminError> {
    init_logging(config.log_format, "warn", Default::default());
    let dir = &config.cache_dir;
    if config.retention.is_zero() {
        println!("retention is 0s (disabled): nothing to remove");
        return Ok(());
    }
    is_cache(dir)?;
    let _lock = lock(dir, ", or let the daemon apply `retention` from its config")?;
    // No size bound here: gc removes by age only, never by LRU.
    let cache =
        Cache::open(dir, u64::MAX, config.pins.clone()).map_err(|e| AdminError::io(dir, e))?;
    let removed = collect(&cache, config.retention, args.dry_run)?;
    if !args.dry_run {
        // No daemon runs (the lock), so no download is in progress: a
        // record without its content protects nothing.
        cache
            .provenance
            .prune(|d| cache.store.blob_path(d).exists())
            .map_err(|e| AdminError::io(dir, e))?;
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for r in &removed {
        let owners = if r.images.is_empty() {
            ", untagged".to_owned()
        } else {
            format!(" of {}", r.images.join(", "))
        };
        println!(
            "{verb} {} ({}){owners}",
            r.digest,
            super::human_bytes(r.size)
        );
    }
    let bytes: u64 = removed.iter().map(|r| r.size).sum();
    let on_disk = cache.store.scan().map(|s| s.len()).unwrap_or(0);
    let remain = if args.dry_run {
        on_disk.saturating_sub(removed.len())
    } else {
        on_disk
    };
    println!(
        "{verb} {} file(s), {}, unused for longer than {}; {} file(s) remain",
        removed.len(),
        super::human_bytes(bytes),
        humantime::format_duration(config.retention),
        remain,
    );
    Ok(())
}

/// Apply `retention` (or only list, with `dry_run`).
pub fn collect(
    cache: &Cache,
    retention: std::time::Duration,
    dry_run: bool,
) -> Result<Vec<Removed>, AdminError> {
    let owners = owners(cache)?;
    let now = crate::cache::store::unix_secs(SystemTime::now());
    let candidates = cache
        .index
        .unused_since(now.saturating_sub(retention.as_secs()));
    if !dry_run {
        cache.apply_retention(retention);
    }
    let mut out: Vec<Removed> = candidates
        .into_iter()
        .filter(|(d, _, _)| dry_run || !cache.store.blob_path(d).exists())
        .map(|(digest, size, _)| Removed {
            images: owners.get(&digest).cloned().unwrap_or_default(),
            digest,
            size,
        })
        .collect();
    out.sort_by(|a, b| a.images.cmp(&b.images).then(a.digest.cmp(&b.digest)));
    Ok(out)
}

/// Which tagged images reference each digest.
fn owners(cache: &Cache) -> Result<HashMap<Digest, Vec<String>>, AdminError> {
    let store = &cache.store;
    let records = store
        .tag_records()
        .map_err(|e| AdminError::io(store.root().join("tags"), e))?;
    let mut map: HashMap<Digest, Vec<String>> = HashMap::new();
    for (reg, repo, tag, bytes) in records {
        let Some(root) = serde_json::from_slice::<TagRecord>(&bytes)
            .ok()
            .and_then(|r| r.digest())
        else {
            continue;
        };
        for d in closure(store, vec![root]) {
            map.entry(d)
                .or_default()
                .push(format!("{reg}/{repo}:{tag}"));
        }
    }
    Ok(map)
}
