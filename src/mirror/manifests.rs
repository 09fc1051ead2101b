//! Manifests: by digest from the cache or fetched, verified and stored
//! (one download however many ask); by tag through the tag record while
//! it is younger than the TTL, then revalidated with a HEAD (which does not
//! count against Docker Hub's pull limit), and served stale from the cache
//! when upstream fails.

use std::sync::Arc;

use super::{CacheResult, Kind, ManifestReply, Mirror};
use crate::cache::{Manifest, TagRecord};
use crate::error::{Error, Result};
use crate::registry::{Digest, Reference, RegistryHost, Repository, Tag};
use crate::upstream::{ManifestHead, Upstream};

impl Mirror {
    /// `GET|HEAD` a manifest by tag or digest through `registry`.
    pub async fn manifest(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        reference: Reference,
        head: bool,
    ) -> Result<(ManifestReply, CacheResult)> {
        let tag = match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.cached_manifest(&d).await? {
                    self.vouch(registry, repo, &d, Kind::Manifest).await?;
                    return Ok((ManifestReply::Manifest(m), CacheResult::Hit));
                }
                let upstream = self.upstream(registry)?;
                let (m, joined) = self
                    .fetch_manifest(
                        &upstream,
                        registry,
                        repo,
                        Reference::Digest(d.clone()),
                        Some(d),
                    )
                    .await?;
                return Ok((ManifestReply::Manifest(m), CacheResult::fetched(joined)));
            }
            Reference::Tag(tag) => tag,
        };
        let rec = self.cached_tag(registry, repo, &tag).await?;
        if let Some(rec) = rec.as_ref().filter(|r| r.age() < self.tag_ttl) {
            if let Some(reply) = self.answer_from_record(registry, repo, rec, head).await? {
                return Ok((reply, CacheResult::Hit));
            }
        }
        let upstream = self.upstream(registry)?;
        match self.revalidate(&upstream, registry, repo, &tag, head).await {
            Ok(answer) => Ok(answer),
            // Upstream says the tag is gone: reject, as Harbor does by default,
            // unless the registry is configured to keep serving the cached copy.
            Err(e) if e.is_not_found() && !upstream.serve_stale_on_not_found => Err(e),
            Err(e) => {
                let Some(rec) = rec else { return Err(e) };
                let Some(reply) = self.answer_from_record(registry, repo, &rec, head).await? else {
                    return Err(e);
                };
                if let ManifestReply::Manifest(_) = reply {
                    tracing::warn!(registry = %registry, repo = %repo, tag = %tag, error = %e,
                        age = ?rec.age(), "upstream failed; serving the last known tag from cache");
                    self.metrics
                        .stale_served
                        .with_label_values(&[registry.as_str()])
                        .inc();
                }
                Ok((reply, CacheResult::Stale))
            }
        }
    }

    /// Answer from a tag record: its manifest if cached (and vouched for),
    /// or the record itself for a HEAD.
    async fn answer_from_record(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        rec: &TagRecord,
        head: bool,
    ) -> Result<Option<ManifestReply>> {
        let Some(d) = rec.digest() else {
            return Ok(None);
        };
        if let Some(m) = self.cached_manifest(&d).await? {
            self.vouch(registry, repo, &d, Kind::Manifest).await?;
            return Ok(Some(ManifestReply::Manifest(m)));
        }
        Ok(head.then(|| ManifestReply::Record(rec.clone())))
    }

    /// What a tag points to now, asked with one HEAD however many ask.
    pub async fn head_tag(
        &self,
        upstream: &Arc<Upstream>,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
    ) -> Result<ManifestHead> {
        let key = (registry.clone(), repo.clone(), Reference::Tag(tag.clone()));
        let (u, repo, reference) = (upstream.clone(), repo.clone(), key.2.clone());
        let (head, _) = self
            .heads
            .run(key, move || async move {
                u.head_manifest(&repo, &reference).await
            })
            .await;
        head
    }

    /// Ask upstream what a tag points to now and answer from the cache when
    /// the digest is already there; record the tag.
    async fn revalidate(
        &self,
        upstream: &Arc<Upstream>,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
        head: bool,
    ) -> Result<(ManifestReply, CacheResult)> {
        let record = |m: &Manifest| {
            let rec = TagRecord::now(&m.digest, &m.media_type, m.bytes.len() as u64);
            self.put_tag(registry, repo, tag, rec)
        };
        let h = match self.head_tag(upstream, registry, repo, tag).await {
            // Some registries refuse HEAD on manifests or omit the digest;
            // containerd then uses GET too (PROTOCOL.md 4.1).
            Err(Error::UpstreamFailed(_)) | Ok(ManifestHead { digest: None, .. }) => {
                let reference = Reference::Tag(tag.clone());
                let (m, joined) = self
                    .fetch_manifest(upstream, registry, repo, reference, None)
                    .await?;
                record(&m).await?;
                return Ok((ManifestReply::Manifest(m), CacheResult::fetched(joined)));
            }
            Err(e) => return Err(e),
            Ok(h) => h,
        };
        let d = h.digest.clone().expect("matched above");
        // The registry just said the tag is `d`: it serves `d`.
        self.note_served(&d, upstream).await;
        if let Some(m) = self.cached_manifest(&d).await? {
            record(&m).await?;
            return Ok((ManifestReply::Manifest(m), CacheResult::Hit));
        }
        if let (true, Some(size)) = (head && !h.media_type.is_empty(), h.size) {
            // A HEAD needs no body: answer from upstream's HEAD, fetch nothing.
            let rec = TagRecord::now(&d, &h.media_type, size);
            self.put_tag(registry, repo, tag, rec.clone()).await?;
            return Ok((ManifestReply::Record(rec), CacheResult::Pass));
        }
        let reference = Reference::Digest(d.clone());
        let (m, joined) = self
            .fetch_manifest(upstream, registry, repo, reference, Some(d))
            .await?;
        record(&m).await?;
        Ok((ManifestReply::Manifest(m), CacheResult::fetched(joined)))
    }

    /// GET a manifest upstream and verify it (against `expect`, or just
    /// hash it for a tag); not stored.
    pub async fn get_manifest(
        upstream: &Upstream,
        repo: &Repository,
        reference: &Reference,
        expect: Option<&Digest>,
    ) -> Result<Manifest> {
        // A mismatch is verified (and counted) per endpoint in the upstream.
        let (media_type, bytes) = upstream.get_manifest(repo, reference, expect).await?;
        Ok(Manifest {
            digest: Digest::of(&bytes),
            bytes,
            media_type: media_type.into(),
        })
    }

    /// GET a manifest upstream (one download however many ask), verify it,
    /// store it; `true` when this call joined another's download.
    async fn fetch_manifest(
        &self,
        upstream: &Arc<Upstream>,
        registry: &RegistryHost,
        repo: &Repository,
        reference: Reference,
        expect: Option<Digest>,
    ) -> Result<(Manifest, bool)> {
        let key = (registry.clone(), repo.clone(), reference.clone());
        let (mirror, up, repo) = (self.clone(), upstream.clone(), repo.clone());
        let (res, joined) = self
            .manifest_fetches
            .run(key, move || async move {
                let m = Mirror::get_manifest(&up, &repo, &reference, expect.as_ref()).await?;
                mirror.store_manifest(&m, super::origin(&up)).await?;
                Ok(m)
            })
            .await;
        res.map(|m| (m, joined))
    }
}
