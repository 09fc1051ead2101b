//! The in-memory index of published content: a size-weighted LRU (moka,
//! LRU policy so a freshly fetched blob is never refused admission). The
//! eviction listener hands the file to the [`Reaper`] thread, which unlinks
//! it off the async workers; a mapping that is still being served keeps its
//! inode alive, so streaming clients are not disturbed.
//!
//! Downloads in progress are accounted for before they finish with a
//! reservation entry of the expected size, so that concurrent misses cannot
//! overrun the disk: the LRU evicts to make room for them up front. A
//! reservation is never read, so left alone it would drift to the cold end
//! of the LRU and be "evicted" while its download still needs the space;
//! every live reservation (downloads and the pinned space) is therefore
//! touched before each insertion that may evict, which keeps reservations
//! out of the victim order: only published blobs are ever evicted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use arc_swap::ArcSwap;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::reaper::Reaper;
use super::store::{unix_secs, Scanned, Store};
use crate::registry::Digest;

/// Index key: published content, or space held for a download.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Blob(Digest),
    Reservation(u64),
}

/// What the index knows about a published file.
#[derive(Debug)]
pub struct Entry {
    /// Size in bytes.
    pub size: u64,
    /// Inode of the published file (eviction only removes this inode).
    pub ino: u64,
    /// Last time the file's mtime was refreshed, in unix seconds.
    touched: AtomicU64,
}

impl Entry {
    /// Whether the on-disk recency should be refreshed now (at most once a
    /// minute per entry, to keep hits free of metadata writes).
    pub fn should_touch(&self) -> bool {
        let now = unix_secs(SystemTime::now());
        let last = self.touched.load(Ordering::Relaxed);
        now >= last + 60
            && self
                .touched
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The LRU index. Cheap to share behind an `Arc`; no lock is held across I/O.
///
/// Pinned content is kept out of the LRU (in a copy-on-write map read
/// without locks), and its bytes are held by one reservation so the LRU
/// still keeps the total within capacity.
pub struct Index {
    entries: Cache<Key, Arc<Entry>>,
    capacity: u64,
    next_reservation: AtomicU64,
    /// Ids of the reservations alive now (kept most recent).
    live: Mutex<HashSet<u64>>,
    reaper: Arc<Reaper>,
    /// Digests that must never be evicted (published or not yet).
    pin_set: ArcSwap<HashSet<Digest>>,
    /// Published pinned entries.
    pinned: ArcSwap<HashMap<Digest, Arc<Entry>>>,
    /// Space held for the pinned bytes.
    pinned_space: Mutex<Option<Reservation>>,
    /// Serialises pin-set updates. Held while entries move between the LRU
    /// and the pinned map; making room can evict, and eviction unlinks files.
    pin_update: Mutex<()>,
}

/// Space held for a download; released on drop.
pub struct Reservation {
    index: Arc<Index>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.index
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
        self.index.entries.invalidate(&Key::Reservation(self.id));
    }
}

/// moka weighs in u32; weigh in KiB so a single entry can be up to 4 TiB.
fn weight(size: u64) -> u32 {
    u32::try_from(size.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl Index {
    /// An empty index bounded to `capacity` bytes whose evictions unlink
    /// files from `store` (on the reaper thread).
    pub fn new(capacity: u64, store: Arc<Store>) -> Index {
        let reaper = Arc::new(Reaper::start(store));
        let queue = reaper.clone();
        let entries = Cache::builder()
            .max_capacity(capacity.div_ceil(1024).max(1))
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|k: &Key, e: &Arc<Entry>| match k {
                Key::Blob(_) | Key::Reservation(_) => weight(e.size),
            })
            .eviction_listener(move |k: Arc<Key>, e: Arc<Entry>, cause| {
                // Explicit removals (a vanished file) and replacements keep the file.
                if !matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                    return;
                }
                if let Key::Blob(d) = &*k {
                    queue.evicted(d.clone(), e.ino, e.size);
                }
            })
            .build();
        Index {
            entries,
            capacity,
            next_reservation: AtomicU64::new(0),
            live: Mutex::new(HashSet::new()),
            reaper,
            pin_set: ArcSwap::from_pointee(HashSet::new()),
            pinned: ArcSwap::from_pointee(HashMap::new()),
            pinned_space: Mutex::new(None),
            pin_update: Mutex::new(()),
        }
    }

    /// Whether a digest is pinned.
    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.pin_set.load().contains(d)
    }

    /// The pinned digests.
    pub fn pins(&self) -> Arc<HashSet<Digest>> {
        self.pin_set.load_full()
    }

    /// Pin more digests (content already published moves out of the LRU).
    pub fn pin(self: &Arc<Self>, more: impl IntoIterator<Item = Digest>) {
        let _g = self.pin_update.lock().expect("pin lock");
        let mut set = (**self.pin_set.load()).clone();
        let before = set.len();
        set.extend(more);
        if set.len() == before {
            return;
        }
        self.apply_pins(set);
    }

    /// Replace the pin set.
    pub fn set_pins(self: &Arc<Self>, set: HashSet<Digest>) {
        let _g = self.pin_update.lock().expect("pin lock");
        self.apply_pins(set);
    }

    fn apply_pins(self: &Arc<Self>, set: HashSet<Digest>) {
        let mut pinned = (**self.pinned.load()).clone();
        // Unpinned entries go back to the LRU.
        let released: Vec<Digest> = pinned
            .keys()
            .filter(|d| !set.contains(*d))
            .cloned()
            .collect();
        for d in released {
            if let Some(e) = pinned.remove(&d) {
                self.entries.insert(Key::Blob(d), e);
            }
        }
        // Newly pinned published entries leave the LRU (an explicit removal
        // does not unlink).
        for d in &set {
            if pinned.contains_key(d) {
                continue;
            }
            if let Some(e) = self.entries.remove(&Key::Blob(d.clone())) {
                pinned.insert(d.clone(), e);
            }
        }
        self.pin_set.store(Arc::new(set));
        let bytes: u64 = pinned.values().map(|e| e.size).sum();
        self.pinned.store(Arc::new(pinned));
        // Release the old hold before taking the new one: holding both would
        // count the pinned bytes twice and evict unpinned content that fits.
        // The lock is not held while reserving (that evicts, which unlinks).
        let old = self.pinned_space.lock().expect("pinned space lock").take();
        drop(old);
        let space = (bytes > 0).then(|| self.reserve(bytes));
        *self.pinned_space.lock().expect("pinned space lock") = space;
    }

    /// Rebuild from a scan of the store (least recent first, so the LRU order
    /// is restored). Pinned digests go straight to the pinned map, so loading
    /// an over-full cache never evicts them.
    pub fn load(self: &Arc<Self>, scanned: Vec<Scanned>, pins: HashSet<Digest>) {
        let (pinned, rest): (Vec<_>, Vec<_>) =
            scanned.into_iter().partition(|s| pins.contains(&s.digest));
        let pinned: HashMap<Digest, Arc<Entry>> = pinned
            .into_iter()
            .map(|s| {
                (
                    s.digest,
                    Arc::new(Entry {
                        size: s.size,
                        ino: s.ino,
                        touched: AtomicU64::new(unix_secs(SystemTime::now())),
                    }),
                )
            })
            .collect();
        self.pinned.store(Arc::new(pinned));
        self.set_pins(pins);
        for s in rest {
            let touched = unix_secs(s.last_used);
            self.entries.insert(
                Key::Blob(s.digest),
                Arc::new(Entry {
                    size: s.size,
                    ino: s.ino,
                    touched: AtomicU64::new(touched),
                }),
            );
        }
        self.entries.run_pending_tasks();
    }

    /// Look up published content; counts as a use.
    pub fn get(&self, d: &Digest) -> Option<Arc<Entry>> {
        if let Some(e) = self.pinned.load().get(d) {
            return Some(e.clone());
        }
        self.entries.get(&Key::Blob(d.clone()))
    }

    /// Whether content is published, without counting a use.
    pub fn contains(&self, d: &Digest) -> bool {
        self.pinned.load().contains_key(d) || self.entries.contains_key(&Key::Blob(d.clone()))
    }

    /// Record newly published content and evict what no longer fits.
    pub fn insert(self: &Arc<Self>, d: Digest, size: u64, ino: u64) {
        let e = Arc::new(Entry {
            size,
            ino,
            touched: AtomicU64::new(unix_secs(SystemTime::now())),
        });
        if self.is_pinned(&d) {
            let _g = self.pin_update.lock().expect("pin lock");
            let mut pinned = (**self.pinned.load()).clone();
            pinned.insert(d.clone(), e);
            self.pinned.store(Arc::new(pinned));
            let set = (**self.pin_set.load()).clone();
            self.apply_pins(set);
            return;
        }
        self.keep_reservations_recent();
        self.entries.insert(Key::Blob(d), e);
        self.entries.run_pending_tasks();
    }

    /// Reservations (downloads in progress and the pinned space) are LRU
    /// entries that are never read; touch them all so none is ever the one
    /// evicted. Called before every insertion that may evict: reads are
    /// applied before writes, so the touch ranks them after everything but
    /// the newcomer.
    fn keep_reservations_recent(&self) {
        let live: Vec<u64> = self
            .live
            .lock()
            .expect("reservations lock")
            .iter()
            .copied()
            .collect();
        for id in live {
            let _ = self.entries.get(&Key::Reservation(id));
        }
    }

    /// Forget an entry whose file has gone (nothing is unlinked).
    pub fn forget(&self, d: &Digest) {
        self.entries.invalidate(&Key::Blob(d.clone()));
        if self.pinned.load().contains_key(d) {
            let _g = self.pin_update.lock().expect("pin lock");
            let mut pinned = (**self.pinned.load()).clone();
            pinned.remove(d);
            self.pinned.store(Arc::new(pinned));
        }
    }

    /// Unpinned entries not used since `before` (unix seconds), for retention.
    pub fn unused_since(&self, before: u64) -> Vec<(Digest, u64, u64)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| match &*k {
                Key::Blob(d) if e.touched.load(Ordering::Relaxed) < before => {
                    Some((d.clone(), e.size, e.ino))
                }
                _ => None,
            })
            .collect()
    }

    /// Drop an entry from the index (the caller removes the file).
    pub fn remove(&self, d: &Digest) {
        self.entries.invalidate(&Key::Blob(d.clone()));
    }

    /// Hold `size` bytes for a download in progress.
    pub fn reserve(self: &Arc<Self>, size: u64) -> Reservation {
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(Entry {
            size,
            ino: 0,
            touched: AtomicU64::new(0),
        });
        self.keep_reservations_recent();
        self.live.lock().expect("reservations lock").insert(id);
        self.entries.insert(Key::Reservation(id), e);
        self.entries.run_pending_tasks();
        Reservation {
            index: self.clone(),
            id,
        }
    }

    /// Bytes accounted (published + reserved), rounded up to KiB.
    pub fn weighted_bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size() * 1024
    }

    /// Configured bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Number of entries (published and reserved).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evicted blobs unlinked since start.
    pub fn evictions(&self) -> u64 {
        self.reaper.evictions()
    }

    /// Wait until the files of every eviction so far are unlinked.
    pub fn settle(&self) {
        self.entries.run_pending_tasks();
        self.reaper.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An index of `capacity` bytes over a fresh store.
    fn setup(capacity: u64) -> (tempfile::TempDir, Arc<Store>, Arc<Index>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let index = Arc::new(Index::new(capacity, store.clone()));
        (dir, store, index)
    }

    /// Publish 4 KiB of byte `i`: its digest and inode.
    fn put(store: &Store, i: u8) -> (Digest, u64) {
        let body = vec![i; 4096];
        let d = Digest::of(&body);
        let ino = store.publish_bytes(&d, &body).unwrap();
        (d, ino)
    }

    #[test]
    fn evicts_least_recent_and_unlinks() {
        let (_dir, store, index) = setup(10 * 1024);
        let mut ds = Vec::new();
        for i in 0..3u8 {
            let (d, ino) = put(&store, i);
            index.insert(d.clone(), 4096, ino);
            ds.push(d);
            if i == 1 {
                assert!(index.get(&ds[0]).is_some()); // make 0 more recent than 1
            }
        }
        assert!(index.weighted_bytes() <= 10 * 1024);
        assert!(index.contains(&ds[0]) && index.contains(&ds[2]));
        assert!(!index.contains(&ds[1]));
        index.settle();
        assert!(
            store.open_published(&ds[1]).unwrap().is_none(),
            "evicted file unlinked"
        );
        assert_eq!(index.evictions(), 1);
    }

    #[test]
    fn a_download_reservation_is_never_the_lru_victim() {
        let (_dir, store, index) = setup(40 * 1024);
        // A large download in flight holds 16 KiB.
        let r = index.reserve(16 * 1024);
        let mut ds = Vec::new();
        for i in 0..12u8 {
            let (d, ino) = put(&store, i);
            index.insert(d.clone(), 4096, ino);
            ds.push(d);
            // Hits keep the published entries warmer than the reservation.
            for d in &ds {
                let _ = index.get(d);
            }
            index.entries.run_pending_tasks();
            assert!(
                index.entries.contains_key(&Key::Reservation(r.id)),
                "the reservation was evicted after {} insertions",
                i + 1
            );
            assert!(index.weighted_bytes() <= 40 * 1024);
        }
        // Published bytes never exceed capacity minus what is reserved.
        let published: u64 = ds.iter().filter(|d| index.contains(d)).count() as u64 * 4096;
        assert!(published <= 24 * 1024, "{published}");
        drop(r);
        index.entries.run_pending_tasks();
        assert_eq!(
            index.len(),
            ds.iter().filter(|d| index.contains(d)).count() as u64
        );
    }

    #[test]
    fn pinned_content_is_never_evicted() {
        let (_dir, store, index) = setup(12 * 1024);
        let put = |i| put(&store, i);
        let (p, ino) = put(0);
        index.pin([p.clone()]);
        index.insert(p.clone(), 4096, ino);
        for i in 1..10u8 {
            let (d, ino) = put(i);
            index.insert(d, 4096, ino);
        }
        assert!(index.contains(&p), "pinned survives LRU pressure");
        assert!(store.open_published(&p).unwrap().is_some());
        assert!(
            index.weighted_bytes() <= 12 * 1024,
            "pinned bytes still count toward capacity"
        );
        // Unpinning returns it to the LRU.
        index.set_pins(HashSet::new());
        for i in 10..20u8 {
            let (d, ino) = put(i);
            index.insert(d, 4096, ino);
        }
        assert!(!index.contains(&p));
    }

    #[test]
    fn pinned_space_is_counted_once_and_never_the_lru_victim() {
        let (_dir, store, index) = setup(16 * 1024);
        let put = |i| put(&store, i);
        let ((p1, i1), (p2, i2)) = (put(0), put(1));
        index.pin([p1.clone(), p2.clone()]);
        index.insert(p1, 4096, i1);
        let ((a, ia), (b, ib)) = (put(2), put(3));
        index.insert(a.clone(), 4096, ia);
        index.insert(b.clone(), 4096, ib);
        // 4 KiB pinned + 8 KiB unpinned + 4 KiB more pinned fit exactly.
        index.insert(p2, 4096, i2);
        assert!(index.contains(&a) && index.contains(&b), "nothing evicted");
        assert_eq!(index.weighted_bytes(), 16 * 1024);
        // Hits rank the unpinned entries after the pinned space; a new
        // download must still evict an unpinned entry, not the pinned space.
        assert!(index.get(&a).is_some() && index.get(&b).is_some());
        let _r = index.reserve(4096);
        assert!(!index.contains(&a), "the least recent unpinned entry goes");
        assert!(index.contains(&b));
        assert_eq!(index.weighted_bytes(), 16 * 1024, "pinned bytes still held");
    }

    #[test]
    fn reservations_make_room_and_release() {
        let (_dir, store, index) = setup(8 * 1024);
        let (d, ino) = put(&store, 1);
        index.insert(d.clone(), 4096, ino);
        {
            let _r = index.reserve(6 * 1024);
            assert!(!index.contains(&d), "room was made for the download");
            assert!(index.weighted_bytes() <= 8 * 1024);
        }
        assert_eq!(index.weighted_bytes(), 0, "released on drop");
    }
}
