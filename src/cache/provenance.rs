//! Provenance of private content: which registries are known to serve a
//! digest that came through a registry marked `private`.
//!
//! berth holds the credentials of private registries, and the cache is keyed
//! by digest only, so without this a digest fetched through private registry
//! P would be handed to anyone naming it through another registry R. The
//! model: **cached content of a private registry is not handed to a client
//! that could not have pulled it upstream.**
//!
//! - Only content that came through a private registry has a record
//!   "digest D is known available from registries {P, ...}". No record means
//!   public content, served to anyone by digest, as before.
//! - A request for a recorded D through a registry in the record is served.
//!   Through any other registry R, the server first asks R's upstream (a
//!   HEAD with R's own credentials): 2xx adds R to the record, or drops the
//!   record if R is public (the content is evidently public); anything else
//!   (404, 401/403, unreachable) serves nothing. See `mirror::private` (`Mirror::vouch`).
//! - A blob download through private P marks P *pending* on D in memory
//!   under the flight table's lock, before the flight can be joined, so
//!   every follower is checked; readers through P are served meanwhile. The
//!   record is written durably before the blob is published (so no crash
//!   leaves a published private blob without its record) and P becomes a
//!   confirmed member; a failed download withdraws the pending mark. A
//!   manifest through P is recorded the same way before it is published.
//! - Any successful fetch through a public registry drops the record.
//!
//! On disk: `<cache>/private/sha256/<hex>`, one registry host per line,
//! written to `tmp/`, fsynced and renamed, then the directory fsynced. All
//! records are read at start (there are few: one per private digest). A
//! record file that does not parse still counts as a record with no
//! registries (fail closed).
//!
//! The in-memory map is copy-on-write behind an `ArcSwap`: checks take no
//! lock; writes (private misses and proofs, both rare) clone it. No lock is
//! held across I/O, and concurrent writers are not serialized: a disk write
//! can be overtaken by one carrying an older snapshot. Every such race
//! errs on the closed side: a confirmed registry may be missing from the file
//! (it proves itself again with one HEAD), or a dropped record may come
//! back (one more HEAD). A record is only ever removed from disk because a
//! public registry proved it serves the content.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::store::Store;
use crate::registry::{Digest, RegistryHost};

/// Where content is fetched from: the registry the request named, and
/// whether it is private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The registry host.
    pub registry: RegistryHost,
    /// Whether its content is private (`private = true`).
    pub private: bool,
}

/// What may be done with cached (or in-flight) content for a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No record: public content.
    Public,
    /// The registry is known to serve it.
    Granted,
    /// Private content the registry has not been shown to serve.
    Unproven,
}

#[derive(Debug, Clone, Default)]
struct Record {
    /// Registries known to serve the digest (persisted).
    hosts: BTreeSet<RegistryHost>,
    /// Private registries downloading it now (memory only).
    pending: Vec<RegistryHost>,
}

/// A download through a private registry, marked pending by [`Provenance::begin`].
#[derive(Debug, Clone)]
pub struct Pending {
    digest: Digest,
    registry: RegistryHost,
    /// The record did not exist before: a failed download removes it again.
    created: bool,
}

type Map = HashMap<Digest, Arc<Record>>;

/// The provenance records. Cheap to share behind an `Arc`.
pub struct Provenance {
    map: ArcSwap<Map>,
    store: Arc<Store>,
}

impl Provenance {
    /// Read every record from `<cache>/private/` (a missing directory is an
    /// empty set: caches made before provenance existed).
    pub fn load(store: Arc<Store>) -> io::Result<Provenance> {
        let mut map = Map::new();
        for (digest, bytes) in store.private_records()? {
            let hosts = String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| l.trim().parse::<RegistryHost>().ok())
                .collect();
            map.insert(
                digest,
                Arc::new(Record {
                    hosts,
                    pending: Vec::new(),
                }),
            );
        }
        if !map.is_empty() {
            tracing::info!(target: "berth::private", records = map.len(), "private content records loaded");
        }
        Ok(Provenance {
            map: ArcSwap::from_pointee(map),
            store,
        })
    }

    /// Whether content `d` may be handed to a request through `registry`.
    /// Lock-free.
    pub fn access(&self, d: &Digest, registry: &RegistryHost) -> Access {
        match self.map.load().get(d) {
            None => Access::Public,
            Some(r) if r.hosts.contains(registry) || r.pending.contains(registry) => {
                Access::Granted
            }
            Some(_) => Access::Unproven,
        }
    }

    /// Records held (private digests).
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A download of `d` through `origin` starts: a private origin is marked
    /// pending (memory only, no I/O: called under the flight table's lock).
    pub fn begin(&self, d: &Digest, origin: &Origin) -> Option<Pending> {
        if !origin.private {
            return None;
        }
        let mut created = false;
        self.update(|map| {
            created = !map.contains_key(d);
            let mut rec = map.get(d).map(|r| Record::clone(r)).unwrap_or_default();
            rec.pending.push(origin.registry.clone());
            map.insert(d.clone(), Arc::new(rec));
        });
        Some(Pending {
            digest: d.clone(),
            registry: origin.registry.clone(),
            created,
        })
    }

    /// The pending download is verified and about to be published: write
    /// the record with its registry confirmed (durably), then confirm it in
    /// memory. An error must stop the publication. If a public registry
    /// proved meanwhile that it serves the content, the record is gone and
    /// stays gone.
    pub fn commit(&self, p: &Pending) -> io::Result<()> {
        self.record(&p.digest, &p.registry, false)
    }

    /// The pending download failed: withdraw its mark, and the record too if
    /// the download created it and nothing else was added since. Memory only.
    pub fn abandon(&self, p: Pending) {
        self.update(|map| {
            let Some(rec) = map.get(&p.digest) else {
                return;
            };
            let mut rec = Record::clone(rec);
            if let Some(i) = rec.pending.iter().position(|h| h == &p.registry) {
                rec.pending.swap_remove(i);
            }
            if p.created && rec.hosts.is_empty() && rec.pending.is_empty() {
                map.remove(&p.digest);
            } else {
                map.insert(p.digest.clone(), Arc::new(rec));
            }
        });
    }

    /// `registry` served `d`: record it (creating the record if needed),
    /// durably first, then in memory. Used for a private registry's
    /// manifests, before they are published.
    pub fn grant(&self, d: &Digest, registry: &RegistryHost) -> io::Result<()> {
        self.record(d, registry, true)
    }

    /// Add `registry` to the record of `d` on disk, then in memory (moving
    /// it from pending to confirmed); a missing record is created only with
    /// `create`.
    fn record(&self, d: &Digest, registry: &RegistryHost, create: bool) -> io::Result<()> {
        let mut hosts = match self.map.load().get(d) {
            Some(r) => r.hosts.clone(),
            None if create => BTreeSet::new(),
            None => return Ok(()),
        };
        hosts.insert(registry.clone());
        let text: String = hosts.iter().map(|h| format!("{h}\n")).collect();
        self.store.write_private(d, text.as_bytes())?;
        self.update(|map| {
            let mut rec = match map.get(d) {
                Some(r) => Record::clone(r),
                None if create => Record::default(),
                None => return,
            };
            if let Some(i) = rec.pending.iter().position(|h| h == registry) {
                rec.pending.swap_remove(i);
            }
            rec.hosts.insert(registry.clone());
            map.insert(d.clone(), Arc::new(rec));
        });
        Ok(())
    }

    /// Whether [`Provenance::served_by`] would change anything (so callers
    /// on the async runtime only move to a blocking thread when it does).
    pub fn learns(&self, d: &Digest, origin: &Origin) -> bool {
        match self.map.load().get(d) {
            None => false,
            Some(r) => !origin.private || !r.hosts.contains(&origin.registry),
        }
    }

    /// `origin` proved it serves recorded content `d` (a fetch through it
    /// succeeded, or its upstream answered a HEAD with 2xx): a private
    /// origin joins the record, a public one drops it. Public content (no
    /// record) stays public. Does I/O only when something changes.
    pub fn served_by(&self, d: &Digest, origin: &Origin) -> io::Result<()> {
        if !self.learns(d, origin) {
            return Ok(());
        }
        if origin.private {
            return self.grant(d, &origin.registry);
        }
        self.update(|map| {
            map.remove(d);
        });
        tracing::info!(target: "berth::private", digest = %d, registry = %origin.registry, "a public registry serves this content: it is no longer treated as private");
        self.store.remove_private(d)
    }

    /// Remove the records (memory and disk) of digests `keep` rejects; only
    /// for offline tools holding the cache lock (no download in progress).
    /// Returns how many went.
    pub fn prune(&self, keep: impl Fn(&Digest) -> bool) -> io::Result<usize> {
        let gone: Vec<Digest> = self
            .map
            .load()
            .keys()
            .filter(|d| !keep(d))
            .cloned()
            .collect();
        for d in &gone {
            self.update(|map| {
                map.remove(d);
            });
            self.store.remove_private(d)?;
        }
        Ok(gone.len())
    }

    /// Copy-on-write update (retried if another writer got in first).
    fn update(&self, mut f: impl FnMut(&mut Map)) {
        self.map.rcu(|cur| {
            let mut next = Map::clone(cur);
            f(&mut next);
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(host: &str, private: bool) -> Origin {
        Origin {
            registry: host.parse().unwrap(),
            private,
        }
    }

    fn open(dir: &std::path::Path) -> Provenance {
        Provenance::load(Arc::new(Store::open(dir).unwrap())).unwrap()
    }

    #[test]
    fn private_downloads_are_recorded_durably_and_public_proof_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let prov = open(dir.path());
        let d = Digest::of(b"secret");
        let (p, p2, r) = (
            origin("p.example", true),
            origin("p2.example", true),
            origin("docker.io", false),
        );
        assert_eq!(prov.access(&d, &r.registry), Access::Public);
        assert!(
            prov.begin(&d, &r).is_none(),
            "public downloads mark nothing"
        );

        let pending = prov.begin(&d, &p).unwrap();
        assert_eq!(prov.access(&d, &p.registry), Access::Granted);
        assert_eq!(prov.access(&d, &r.registry), Access::Unproven);
        assert!(open(dir.path()).is_empty(), "pending is memory only");
        prov.commit(&pending).unwrap();
        assert_eq!(open(dir.path()).access(&d, &p.registry), Access::Granted);
        assert_eq!(open(dir.path()).access(&d, &p2.registry), Access::Unproven);

        prov.served_by(&d, &p2).unwrap();
        assert_eq!(open(dir.path()).access(&d, &p2.registry), Access::Granted);
        assert!(!prov.learns(&d, &p2));

        assert!(prov.learns(&d, &r));
        prov.served_by(&d, &r).unwrap();
        assert_eq!(prov.access(&d, &p2.registry), Access::Public);
        assert!(open(dir.path()).is_empty());
        // Public content stays public: nothing is created by a proof.
        prov.served_by(&d, &p).unwrap();
        assert!(open(dir.path()).is_empty() && prov.is_empty());
    }

    #[test]
    fn a_failed_download_withdraws_only_what_it_added() {
        let dir = tempfile::tempdir().unwrap();
        let prov = open(dir.path());
        let d = Digest::of(b"x");
        let (p, p2) = (origin("p.example", true), origin("p2.example", true));
        let pending = prov.begin(&d, &p).unwrap();
        prov.abandon(pending);
        assert_eq!(prov.access(&d, &p.registry), Access::Public);

        prov.grant(&d, &p.registry).unwrap();
        let pending = prov.begin(&d, &p2).unwrap();
        assert_eq!(prov.access(&d, &p2.registry), Access::Granted);
        prov.abandon(pending);
        assert_eq!(prov.access(&d, &p2.registry), Access::Unproven);
        assert_eq!(prov.access(&d, &p.registry), Access::Granted);
    }

    #[test]
    fn public_proof_during_a_private_download_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let prov = open(dir.path());
        let d = Digest::of(b"z");
        let pending = prov.begin(&d, &origin("p.example", true)).unwrap();
        prov.served_by(&d, &origin("docker.io", false)).unwrap();
        prov.commit(&pending).unwrap();
        assert!(prov.is_empty() && open(dir.path()).is_empty());
    }

    #[test]
    fn unreadable_records_fail_closed_and_prune_removes_records() {
        let dir = tempfile::tempdir().unwrap();
        let prov = open(dir.path());
        let d = Digest::of(b"y");
        prov.grant(&d, &"p.example".parse().unwrap()).unwrap();
        let file = dir.path().join("private/sha256").join(d.hex());
        std::fs::write(&file, b"\xff not a host\n").unwrap();
        let prov = open(dir.path());
        assert_eq!(
            prov.access(&d, &"p.example".parse().unwrap()),
            Access::Unproven
        );
        assert_eq!(prov.prune(|_| true).unwrap(), 0);
        assert_eq!(prov.prune(|_| false).unwrap(), 1);
        assert!(!file.exists() && open(dir.path()).is_empty());
    }
}
