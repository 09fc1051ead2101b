//! Blobs: a hit is a slice of the mapped file; a miss joins the download
//! in progress or starts one (one upstream fetch however many ask, bytes
//! streamed to all while it downloads); while the cache filesystem is full,
//! blobs are relayed from upstream without caching, and a full-body relay
//! holds its last chunk back until the sha256 matched, so a client never
//! receives a complete but wrong blob.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::StreamExt;

use super::{BlobReply, CacheResult, Kind, Mirror, Relayed, Tap};
use crate::cache::flight::{Flight, Joined, Opener};
use crate::cache::store::is_out_of_space;
use crate::error::{Error, Result};
use crate::registry::{Digest, RegistryHost, Repository};

impl Mirror {
    /// The cached blob, after the private-content proof.
    pub async fn blob_hit(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
    ) -> Result<Option<Bytes>> {
        let Some(bytes) = self.cached_blob(d).await? else {
            return Ok(None);
        };
        self.vouch(registry, repo, d, Kind::Blob).await?;
        Ok(Some(bytes))
    }

    /// A blob's size for a `HEAD`: cached, from the download in progress,
    /// or upstream's HEAD (nothing is fetched).
    pub async fn blob_size(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
    ) -> Result<(u64, CacheResult)> {
        if let Some(bytes) = self.blob_hit(registry, repo, d).await? {
            return Ok((bytes.len() as u64, CacheResult::Hit));
        }
        let upstream = self.upstream(registry)?;
        let size = match self.cache.flights.get(d) {
            Some(f) => {
                self.vouch(registry, repo, d, Kind::Blob).await?;
                f.size().await?
            }
            None => upstream.head_blob(repo, d).await?,
        };
        Ok((size, CacheResult::Pass))
    }

    /// A blob for a `GET`: cached, or the download that fetches it (joined
    /// or started here with `tap` on its upstream bytes).
    pub async fn open_blob(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
        tap: &Tap,
    ) -> Result<(BlobReply, CacheResult)> {
        if let Some(bytes) = self.blob_hit(registry, repo, d).await? {
            return Ok((BlobReply::Cached(bytes), CacheResult::Hit));
        }
        let upstream = self.upstream(registry)?;
        if self.cache.store.is_full() {
            return Ok((BlobReply::Full, CacheResult::Pass));
        }
        let (u, repo2, digest, tap2) = (upstream.clone(), repo.clone(), d.clone(), tap.clone());
        let opener = move || -> Opener {
            Box::new(move |offset| {
                let (u, repo, digest, tap) =
                    (u.clone(), repo2.clone(), digest.clone(), tap2.clone());
                Box::pin(async move {
                    let open = u.open_blob(&repo, &digest, offset);
                    let mut body = match &tap.cancel {
                        None => open.await?,
                        Some(c) => c
                            .run_until_cancelled(open)
                            .await
                            .ok_or_else(|| Error::Internal("download cancelled".into()))??,
                    };
                    if let Some(shape) = &tap.shape {
                        body.stream = shape(body.stream);
                    }
                    if let Some(c) = &tap.cancel {
                        // Cancellation ends the body early: the flight fails
                        // (and resumes only to find the token cancelled).
                        body.stream = body.stream.take_until(c.clone().cancelled_owned()).boxed();
                    }
                    Ok(body)
                })
            })
        };
        let publish = self.cache.publisher(super::origin(&upstream));
        let (result, flight) = match self.cache.flights.join(d, publish, opener) {
            Err(Error::Io(e)) if is_out_of_space(&e) => {
                return Ok((BlobReply::Full, CacheResult::Pass))
            }
            Err(e) => return Err(e),
            Ok(Joined::Leader(f)) => {
                self.watch_flight(f.clone());
                (CacheResult::Miss, f)
            }
            Ok(Joined::Follower(f)) => {
                // Someone else's download, possibly through a private registry.
                self.vouch(registry, repo, d, Kind::Blob).await?;
                (CacheResult::Coalesced, f)
            }
            Ok(Joined::Published) => {
                let bytes = self
                    .blob_hit(registry, repo, d)
                    .await?
                    .ok_or_else(|| Error::Internal("published blob vanished".into()))?;
                return Ok((BlobReply::Cached(bytes), CacheResult::Hit));
            }
        };
        match flight.size().await {
            Err(Error::Io(e)) if is_out_of_space(&e) => Ok((BlobReply::Full, CacheResult::Pass)),
            Err(e) => Err(e),
            Ok(size) => Ok((BlobReply::Flight { flight, size }, result)),
        }
    }

    /// Keep the in-flight gauge current for a download this mirror started.
    fn watch_flight(&self, flight: Arc<Flight>) {
        let metrics = self.metrics.clone();
        metrics.inflight.inc();
        tracing::debug!(digest = %flight.digest, "blob cache miss; fetching from upstream");
        tokio::spawn(async move {
            // Mismatches are counted where they are blamed on an endpoint
            // (upstream::Upstream::open_blob), once per bad copy.
            let _ = flight.finished().await;
            metrics.inflight.dec();
        });
    }

    /// A blob's size as upstream reports it (for a ranged relay).
    pub async fn upstream_blob_size(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
    ) -> Result<u64> {
        self.upstream(registry)?.head_blob(repo, d).await
    }

    /// Relay `range` of a blob (all of it if `None`) straight from upstream,
    /// touching no disk; `size` if already known. A full body is verified.
    pub async fn relay_blob(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
        range: Option<Range<u64>>,
        size: Option<u64>,
    ) -> Result<Relayed> {
        tracing::debug!(digest = %d, "cache full: relaying blob without caching");
        let upstream = self.upstream(registry)?;
        let start = range.as_ref().map_or(0, |r| r.start);
        let body = upstream.open_blob(repo, d, start).await?;
        let size = size
            .or(body.size)
            .ok_or_else(|| Error::UpstreamFailed("blob size unknown".into()))?;
        let range = range.unwrap_or(0..size);
        let want = range.end - range.start;
        let verify = (range.start == 0 && range.end == size).then(|| d.clone());
        Ok(Relayed {
            size,
            range,
            stream: crate::transfer::verified(body.stream, want, verify).boxed(),
        })
    }
}
