//! `berth ls`: the cached images, one per tag record: `registry/repo:tag`,
//! digest, platforms (those complete in the cache), size of the present
//! files, last use (newest file mtime), pinned, and whether every platform
//! is complete. Reads only; works beside a running daemon (files evicted
//! meanwhile simply count as missing).

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::image::{self, Completeness};
use super::{fail, init_logging, AdminError, EXIT_OK};
use crate::cache::store::Store;
use crate::cache::TagRecord;
use crate::cli::LsArgs;
use crate::config::Config;
use crate::pins::Rules;
use crate::registry::manifest::Descriptor;

/// One listed image.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// `registry/repo:tag`.
    pub image: String,
    /// The registry.
    pub registry: String,
    /// The repository.
    pub repository: String,
    /// The tag.
    pub tag: String,
    /// The manifest digest the tag points to.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Platforms complete in the cache.
    pub platforms: Vec<String>,
    /// Platforms of the index not (completely) in the cache.
    pub missing_platforms: Vec<String>,
    /// Bytes of the image's files present in the cache.
    pub size: u64,
    /// Newest use of any of its files (unix seconds), if any is present.
    pub last_used: Option<u64>,
    /// Matches a pin rule.
    pub pinned: bool,
    /// Every referenced blob present (`partial`: some platforms).
    pub complete: Completeness,
    /// When upstream last confirmed the tag (unix milliseconds).
    pub fetched_at_ms: u64,
}

/// `berth ls`.
pub fn run(config: Config, args: &LsArgs) -> i32 {
    init_logging(config.log_format, "warn", Default::default());
    let entries = match list(&config.cache_dir, &config.pins) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        serde_json::to_string_pretty(&entries).expect("entries serialise") + "\n"
    } else {
        table(&entries, args.no_trunc)
    };
    let _ = out.write_all(text.as_bytes());
    EXIT_OK
}

/// Every tag record in `dir`, walked.
pub fn list(dir: &std::path::Path, pins: &Rules) -> Result<Vec<Entry>, AdminError> {
    let store = Store::open_existing(dir).map_err(|e| AdminError::io(dir, e))?;
    let records = match store.tag_records() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(AdminError::io(dir.join("tags"), e)),
    };
    let mut out = Vec::new();
    for (registry, repo, tag, bytes) in records {
        let Some((rec, digest)) = serde_json::from_slice::<TagRecord>(&bytes)
            .ok()
            .and_then(|r| r.digest().map(|d| (r, d)))
        else {
            tracing::warn!(%registry, %repo, %tag, "unreadable tag record skipped");
            continue;
        };
        let tree = image::walk(
            &store,
            Descriptor::manifest(digest.clone(), &rec.media_type, rec.size),
        );
        let present = tree.present_digests(&store);
        let (mut platforms, mut missing_platforms) = (Vec::new(), Vec::new());
        for img in &tree.images {
            let name = img.platform.clone().unwrap_or_else(|| "unknown".into());
            if img.complete() {
                platforms.push(name);
            } else {
                missing_platforms.push(name);
            }
        }
        let last_used = image::last_used(&store, &present)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        out.push(Entry {
            image: format!("{registry}/{repo}:{tag}"),
            registry: registry.to_string(),
            repository: repo.to_string(),
            tag: tag.to_string(),
            digest: digest.to_string(),
            media_type: tree.root.media_type.clone(),
            platforms,
            missing_platforms,
            size: image::size_on_disk(&store, &present),
            last_used,
            pinned: pins.matches(&registry, repo.as_str(), tag.as_str()),
            complete: tree.completeness(),
            fetched_at_ms: rec.fetched_at_ms,
        });
    }
    out.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(out)
}

fn table(entries: &[Entry], no_trunc: bool) -> String {
    let now = crate::cache::store::unix_secs(SystemTime::now());
    let mut rows = vec![[
        "IMAGE".to_owned(),
        "DIGEST".into(),
        "PLATFORMS".into(),
        "SIZE".into(),
        "LAST USE".into(),
        "PINNED".into(),
        "COMPLETE".into(),
    ]];
    for e in entries {
        let digest = if no_trunc {
            e.digest.clone()
        } else {
            e.digest.chars().take(19).collect()
        };
        let mut platforms = e.platforms.join(",");
        if !e.missing_platforms.is_empty() {
            if !platforms.is_empty() {
                platforms.push(' ');
            }
            platforms.push_str(&format!("(+{} not cached)", e.missing_platforms.len()));
        }
        if platforms.is_empty() {
            platforms.push('-');
        }
        rows.push([
            e.image.clone(),
            digest,
            platforms,
            super::human_bytes(e.size),
            e.last_used
                .map(|t| super::human_ago(now.saturating_sub(t)))
                .unwrap_or_else(|| "-".into()),
            if e.pinned { "yes" } else { "no" }.into(),
            match e.complete {
                Completeness::Yes => "yes",
                Completeness::Partial => "partial",
                Completeness::No => "no",
            }
            .into(),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut text = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    let total: u64 = entries.iter().map(|e| e.size).sum();
    text.push_str(&format!(
        "{} image(s), {} referenced\n",
        entries.len(),
        super::human_bytes(total)
    ));
    text
}
