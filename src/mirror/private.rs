//! The private-content proof: content that came through a private registry
//! is only handed out through a registry that proved it serves it (model in
//! [`crate::cache::provenance`]).

use super::{Kind, Mirror};
use crate::cache::provenance::Access;
use crate::error::{Error, Result};
use crate::registry::{Digest, Reference, RegistryHost, Repository};
use crate::upstream::Upstream;

impl Mirror {
    /// Before content `d` that is cached (or being downloaded) is handed to
    /// a request through `registry`: if it came through a private registry
    /// and `registry` is not known to serve it, `registry`'s upstream must
    /// answer a HEAD for it (with that registry's own credentials) first.
    /// 2xx: served, and remembered. Otherwise nothing is served: 404 is
    /// BLOB_UNKNOWN/MANIFEST_UNKNOWN as if not cached, 401/403 DENIED, an
    /// unreachable upstream its usual error (fail closed). Public content
    /// (no record) costs one lock-free map lookup.
    pub(super) async fn vouch(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        d: &Digest,
        kind: Kind,
    ) -> Result<()> {
        if self.cache.provenance.access(d, registry) != Access::Unproven {
            return Ok(());
        }
        let upstream = self.upstream(registry)?;
        let proof = match kind {
            Kind::Blob => upstream.head_blob(repo, d).await.map(drop),
            Kind::Manifest => {
                let r = Reference::Digest(d.clone());
                match upstream.head_manifest(repo, &r).await {
                    // Some registries refuse HEAD on manifests: a verified GET proves it too.
                    Err(Error::UpstreamFailed(_)) => {
                        upstream.get_manifest(repo, &r, Some(d)).await.map(drop)
                    }
                    other => other.map(drop),
                }
            }
        };
        match proof {
            Ok(()) => {
                tracing::info!(target: "berth::private", registry = %registry, repo = %repo, digest = %d, ?kind, "registry proved it serves cached private content");
                self.note_served(d, &upstream).await;
                Ok(())
            }
            Err(e) => {
                let reason = match &e {
                    e if e.is_not_found() => "not_found",
                    Error::UpstreamDenied(_) => "denied",
                    _ => "unavailable",
                };
                self.metrics
                    .private_refusals
                    .with_label_values(&[registry.as_str(), reason])
                    .inc();
                tracing::warn!(target: "berth::private", registry = %registry, repo = %repo, digest = %d, ?kind, reason, error = %e, "refused cached private content to a registry that did not prove it serves it");
                Err(e)
            }
        }
    }

    /// `upstream` evidently serves `d`: update its provenance record, if any
    /// (on a blocking thread, and only when something changes). A failure
    /// to write only costs another proof later.
    pub(super) async fn note_served(&self, d: &Digest, upstream: &Upstream) {
        let origin = super::origin(upstream);
        if !self.cache.provenance.learns(d, &origin) {
            return;
        }
        let d = d.clone();
        let done = self
            .blocking(move |m| m.cache.provenance.served_by(&d, &origin))
            .await;
        if let Ok(Err(error)) = done {
            tracing::warn!(target: "berth::private", %error, "could not update a provenance record");
        }
    }
}
