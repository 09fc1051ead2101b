//! Prefetch: fetch the images named by `[prefetch] images` and `pins`
//! (rules with `*`/`**` globs) into the cache ahead of the first pull.
//!
//! A rule's repositories come from the upstream catalog when the
//! repository part has a wildcard (else it is taken as written); its tags
//! from `tags/list` when the tag part has one (paginated; filtered by the
//! rule; at most `max_tags` per repository, the highest in version order).
//! Rules without a registry use the default registry.
//!
//! Each image: HEAD the tag (no Docker Hub pull counted), fetch the
//! manifest(s) of the selected platforms (verified by digest), download
//! the blobs through the cache's single-flight table (so a client pulling
//! the same blob meanwhile shares the download) with at most `concurrency`
//! at once and all of them together under the `bandwidth` cap. Only when
//! every blob is in, the manifests are stored (children first) and then
//! the tag record: an interrupted prefetch never leaves a tag pointing at
//! an incomplete image.
//!
//! Cancellation (Ctrl-C, SIGTERM, daemon shutdown) is a token: waiting
//! stops at once, and every download this prefetch started ends its body,
//! fails its flight (its temporary file is removed; nothing is published)
//! and frees its worker.
//!
//! `berth prefetch` is the one-shot command (it refuses a cache a daemon
//! holds: the daemon prefetches itself with `[prefetch] on_start` and
//! `interval`); [`start::spawn_schedule`] is the daemon's side.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub mod start;

use super::listing::{self, natural_cmp};
use super::progress::Progress;
use crate::cache::{Manifest, TagRecord};
use crate::config::Config;
use crate::error::Error;
use crate::mirror::{BlobReply, CacheResult, Mirror, Tap};
use crate::pins::{Rule, Rules};
use crate::registry::manifest::{children, platform_matches, Descriptor};
use crate::registry::{Digest, Reference, RegistryHost, Repository, Tag};
use crate::state::AppState;
use crate::upstream::limiter::Limiter;
use crate::upstream::{ManifestHead, Upstream};

/// What to prefetch and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image rules (prefetch images and pins).
    pub rules: Rules,
    /// Platforms; empty or `all` means every platform.
    pub platforms: Vec<String>,
    /// Blob downloads at once.
    pub concurrency: usize,
    /// Bytes per second for all prefetch downloads together.
    pub bandwidth: Option<u64>,
    /// Most tags per repository for a rule with a tag wildcard.
    pub max_tags: usize,
    /// Entries per listing page.
    pub page_size: usize,
}

impl Options {
    /// The config's `[prefetch]` table; the rules are its images and the pins.
    pub fn from_config(config: &Config) -> Options {
        let p = &config.prefetch;
        let mut rules = p.images.0.clone();
        rules.extend(config.pins.0.iter().cloned());
        Options {
            rules: Rules(rules),
            platforms: p.platforms.clone(),
            concurrency: p.concurrency.max(1),
            bandwidth: p.bandwidth,
            max_tags: p.max_tags.max(1),
            page_size: 100,
        }
    }
}

/// One image to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Registry.
    pub registry: RegistryHost,
    /// Repository.
    pub repo: Repository,
    /// Tag.
    pub tag: Tag,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repo, self.tag)
    }
}

/// An image fetched.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// What.
    pub target: Target,
    /// The manifest digest the tag points to.
    pub digest: Digest,
    /// Platforms stored.
    pub platforms: Vec<String>,
    /// Blobs downloaded now (the rest was cached already).
    pub downloaded: usize,
}

/// What a prefetch run did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Images fetched (or found complete).
    pub fetched: Vec<Fetched>,
    /// Rules or images that failed, with why.
    pub failed: Vec<(String, String)>,
    /// Stopped by cancellation.
    pub cancelled: bool,
}

/// Why one image failed.
#[derive(Debug)]
enum Failure {
    Cancelled,
    Failed(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Failed(e.explained())
    }
}

/// Shared by the workers of one run.
struct Ctx {
    state: AppState,
    platforms: Vec<String>,
    cancel: CancellationToken,
    permits: Arc<Semaphore>,
    limiter: Option<Arc<Limiter>>,
    progress: Arc<Progress>,
}

impl Ctx {
    /// `fut`'s output, or `Cancelled` once the run is cancelled.
    async fn until_cancelled<T>(&self, fut: impl Future<Output = T>) -> Result<T, Failure> {
        self.cancel
            .run_until_cancelled(fut)
            .await
            .ok_or(Failure::Cancelled)
    }
}

/// Resolve the rules and fetch every image.
pub async fn run(
    state: &AppState,
    opts: &Options,
    cancel: &CancellationToken,
    progress: &Arc<Progress>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let resolving = resolve(state, opts, &mut outcome.failed);
    let Some(targets) = cancel.run_until_cancelled(resolving).await else {
        outcome.cancelled = true;
        return outcome;
    };
    progress.add_items(targets.len() as u64);
    let ctx = Arc::new(Ctx {
        state: state.clone(),
        platforms: opts.platforms.clone(),
        cancel: cancel.clone(),
        permits: Arc::new(Semaphore::new(opts.concurrency.max(1))),
        limiter: opts.bandwidth.map(|b| Arc::new(Limiter::new(b))),
        progress: progress.clone(),
    });
    let mut results = stream::iter(targets)
        .map(|t| {
            let ctx = ctx.clone();
            async move {
                let r = fetch_image(&ctx, &t).await;
                (t, r)
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    while let Some((t, r)) = results.next().await {
        match r {
            Ok(f) => {
                progress.item_done(&format!(
                    "fetched {t} {} [{}] ({} blob(s) downloaded)",
                    f.digest,
                    f.platforms.join(","),
                    f.downloaded
                ));
                outcome.fetched.push(f);
            }
            Err(Failure::Cancelled) => outcome.cancelled = true,
            Err(Failure::Failed(why)) => {
                progress.item_done(&format!("FAILED {t}: {why}"));
                outcome.failed.push((t.to_string(), why));
            }
        }
    }
    outcome.cancelled |= cancel.is_cancelled();
    outcome
}

/// Every (registry, repository, tag) the rules select.
async fn resolve(
    state: &AppState,
    opts: &Options,
    failed: &mut Vec<(String, String)>,
) -> Vec<Target> {
    let mut out = BTreeMap::new();
    for rule in &opts.rules.0 {
        match resolve_rule(state, opts, rule).await {
            Ok(t) => out.extend(t.into_iter().map(|t| (t.to_string(), t))),
            Err(why) => {
                tracing::warn!(rule = ?rule, error = %why, "prefetch rule failed");
                failed.push((format!("rule {rule:?}"), why));
            }
        }
    }
    out.into_values().collect()
}

async fn resolve_rule(
    state: &AppState,
    opts: &Options,
    rule: &Rule,
) -> Result<Vec<Target>, String> {
    let registry = rule
        .registry()
        .cloned()
        .unwrap_or_else(|| state.config.default_registry.clone());
    let up = state
        .mirror
        .upstreams
        .get(&registry)
        .ok_or_else(|| format!("registry {registry} is not mirrored"))?;
    let repos: Vec<String> = match &rule.literal_repo {
        // `nginx` on docker.io is `library/nginx`, as docker reads it.
        Some(r) => vec![crate::registry::docker_repository(&registry, r).into_owned()],
        None => listing::repositories(up, opts.page_size)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| rule.matches_repo(&registry, r))
            .collect(),
    };
    let mut out = Vec::new();
    for repo in repos {
        let repo: Repository = repo
            .parse()
            .map_err(|_| format!("{repo:?} is not a repository name"))?;
        let tags: Vec<String> = match &rule.literal_tag {
            Some(t) => vec![t.clone()],
            None => {
                let mut tags = listing::tags(up, &repo, opts.page_size)
                    .await
                    .map_err(|e| e.to_string())?;
                tags.retain(|t| rule.matches(&registry, repo.as_str(), t));
                tags.sort_by(|a, b| natural_cmp(a, b));
                let skip = tags.len().saturating_sub(opts.max_tags);
                tags.split_off(skip)
            }
        };
        for tag in tags {
            let tag: Tag = tag.parse().map_err(|_| format!("{tag:?} is not a tag"))?;
            out.push(Target {
                registry: registry.clone(),
                repo: repo.clone(),
                tag,
            });
        }
    }
    Ok(out)
}

/// Fetch one image; store manifests and the tag only when all blobs are in.
async fn fetch_image(ctx: &Ctx, t: &Target) -> Result<Fetched, Failure> {
    let cancel = &ctx.cancel;
    let mirror = &ctx.state.mirror;
    let up = mirror
        .upstreams
        .get(&t.registry)
        .cloned()
        .ok_or_else(|| Failure::Failed(format!("registry {} is not mirrored", t.registry)))?;
    let reference = Reference::Tag(t.tag.clone());
    let head = mirror.head_tag(&up, &t.registry, &t.repo, &t.tag);
    let root = match ctx.until_cancelled(head).await? {
        Ok(ManifestHead {
            digest: Some(d), ..
        }) => manifest(ctx, &up, &t.repo, &d).await?,
        // Registries that refuse HEAD or omit the digest: GET by tag.
        Ok(_) | Err(Error::UpstreamFailed(_)) => {
            let get = Mirror::get_manifest(&up, &t.repo, &reference, None);
            (ctx.until_cancelled(get).await??, false)
        }
        Err(e) => return Err(e.into()),
    };
    let kids = children(&root.0.bytes)
        .map_err(|e| Failure::Failed(format!("manifest {}: {e}", root.0.digest)))?;
    let mut images = Vec::new();
    let mut platforms = Vec::new();
    if kids.iter().any(|c| c.is_manifest) {
        for c in kids.iter().filter(|c| c.is_manifest) {
            if !platform_matches(&ctx.platforms, c.platform.as_deref()) {
                continue;
            }
            let m = manifest(ctx, &up, &t.repo, &c.digest).await?;
            platforms.push(c.platform.clone().unwrap_or_else(|| "unknown".into()));
            images.push(m);
        }
        if images.is_empty() {
            return Err(Failure::Failed(format!(
                "no manifest for platforms {:?} in the index",
                ctx.platforms
            )));
        }
    }
    let mut blobs: Vec<Descriptor> = Vec::new();
    for m in images.iter().chain(std::iter::once(&root)).map(|m| &m.0) {
        for c in children(&m.bytes).unwrap_or_default() {
            if !c.is_manifest && !blobs.iter().any(|b| b.digest == c.digest) {
                blobs.push(c);
            }
        }
    }
    let todo: u64 = blobs
        .iter()
        .filter(|b| !mirror.cache.index.contains(&b.digest))
        .map(|b| b.size)
        .sum();
    ctx.progress.add_bytes(todo);
    let results = futures_util::future::join_all(blobs.iter().map(|b| fetch_blob(ctx, t, b))).await;
    let mut downloaded = 0;
    let mut errors = Vec::new();
    for (b, r) in blobs.iter().zip(results) {
        match r {
            Ok(true) => downloaded += 1,
            Ok(false) => {}
            Err(Failure::Cancelled) => return Err(Failure::Cancelled),
            Err(Failure::Failed(why)) => errors.push(format!("blob {}: {why}", b.digest)),
        }
    }
    if !errors.is_empty() {
        return Err(Failure::Failed(errors.join("; ")));
    }
    if cancel.is_cancelled() {
        return Err(Failure::Cancelled);
    }
    // Everything is in: manifests (children first), then the tag.
    for (m, cached) in images.iter().chain(std::iter::once(&root)) {
        if !cached {
            mirror.store_manifest(m, crate::mirror::origin(&up)).await?;
        }
    }
    let rec = TagRecord::now(
        &root.0.digest,
        &root.0.media_type,
        root.0.bytes.len() as u64,
    );
    mirror.put_tag(&t.registry, &t.repo, &t.tag, rec).await?;
    if platforms.is_empty() {
        let config = children(&root.0.bytes)
            .unwrap_or_default()
            .into_iter()
            .next();
        let m = mirror.clone();
        let platform = tokio::task::spawn_blocking(move || {
            super::image::config_platform(&m.cache.store, config.as_ref())
        })
        .await
        .map_err(|e| Failure::Failed(format!("reading a config: {e}")))?;
        platforms.push(platform.unwrap_or_else(|| "single manifest".into()));
    }
    Ok(Fetched {
        target: t.clone(),
        digest: root.0.digest.clone(),
        platforms,
        downloaded,
    })
}

/// A manifest by digest: from the cache (`true`), or fetched and verified
/// (`false`; stored later).
async fn manifest(
    ctx: &Ctx,
    up: &Arc<Upstream>,
    repo: &Repository,
    d: &Digest,
) -> Result<(Manifest, bool), Failure> {
    if let Some(m) = ctx.state.mirror.cached_manifest(d).await? {
        return Ok((m, true));
    }
    let reference = Reference::Digest(d.clone());
    let get = Mirror::get_manifest(up, repo, &reference, Some(d));
    Ok((ctx.until_cancelled(get).await??, false))
}

/// Download one blob through the mirror (a client pulling the same blob
/// meanwhile shares the download); `true` when this call downloaded it.
async fn fetch_blob(ctx: &Ctx, t: &Target, blob: &Descriptor) -> Result<bool, Failure> {
    let mirror = &ctx.state.mirror;
    if mirror.cache.index.contains(&blob.digest) {
        return Ok(false);
    }
    let permit = ctx.until_cancelled(ctx.permits.clone().acquire_owned());
    let _permit = permit.await?.map_err(|_| Failure::Cancelled)?;
    if mirror.cache.index.contains(&blob.digest) {
        return Ok(false);
    }
    let (limiter, progress) = (ctx.limiter.clone(), ctx.progress.clone());
    let tap = Tap {
        cancel: Some(ctx.cancel.clone()),
        shape: Some(Arc::new(move |mut stream| {
            if let Some(l) = &limiter {
                stream = l.clone().throttle(stream);
            }
            let progress = progress.clone();
            stream
                .inspect(move |c| {
                    if let Ok(b) = c {
                        progress.advance(b.len() as u64);
                    }
                })
                .boxed()
        })),
    };
    let open = mirror.open_blob(&t.registry, &t.repo, &blob.digest, &tap);
    let (reply, result) = ctx.until_cancelled(open).await??;
    let flight = match reply {
        BlobReply::Flight { flight, .. } => flight,
        BlobReply::Cached(_) => return Ok(false),
        BlobReply::Full => return Err(Failure::Failed("the cache filesystem is full".to_string())),
    };
    let leader = result == CacheResult::Miss;
    let size = ctx.until_cancelled(flight.finished()).await??;
    if !leader {
        ctx.progress.advance(size);
    }
    Ok(leader)
}
