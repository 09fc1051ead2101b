//! The only `unsafe` in berth: mapping a published cache file into memory
//! and handing it to hyper as [`Bytes`], so a cache hit is served without
//! copying the content in user space.
//!
//! # Safety invariant
//!
//! Mapping a file is sound only while nobody truncates or writes the mapped
//! range. berth's cache guarantees that structurally:
//!
//! 1. Content files are content-addressed (`blobs/sha256/<ab>/<hex>`). They
//!    are written under a temporary name in `tmp/`, fsynced, verified against
//!    their digest, and only then renamed into place ([`super::store`]).
//! 2. No code path opens a published file for writing again: the store opens
//!    published files read-only, and a re-fetch of the same digest writes a
//!    new temporary file whose rename atomically replaces the directory entry,
//!    leaving the old inode (and any mapping of it) untouched.
//! 3. Eviction and quarantine only `unlink` (or rename) a path; an existing
//!    mapping keeps the inode alive until the last `Bytes` clone is dropped.
//!
//! Only files obtained from [`super::store::Store::open_published`], or a
//! download's own file after its flight reached `Done` (it was verified and
//! renamed into place, and its writer has finished), may be passed to [`map`].
//!
//! A download still in progress ([`map_growing`]) is mapped under a second
//! rule: its temporary file has exactly one writer
//! (`super::flight::write_loop`), which only appends; nothing truncates or
//! rewrites it (an aborted download is unlinked, which leaves mappings
//! intact). Readers slice such a mapping only below the length the writer
//! announced after its `write` returned, so every byte they touch is final,
//! and no page wholly beyond the current end of file (which would raise
//! SIGBUS) is ever touched.
//!
//! Something outside berth writing into the cache directory breaks the
//! invariant, as it would for any mmap-based cache; `berth verify` exists to
//! find such damage.
//!
//! # From a slice back to its file
//!
//! Every live mapping is listed in a registry (address range -> the mapped
//! file), so that the plain-TCP writer ([`crate::server::zerocopy`]) can turn
//! a write of a mapped slice into `sendfile(2)` from the file at the same
//! offset: same bytes (the invariant above), no copy through user space and
//! no page faults. [`locate`] is safe code: an entry holds only a `Weak`
//! reference, and a successful upgrade proves the mapping is still alive,
//! hence still occupies that address range, so a pointer into the range is a
//! pointer into *that* file's mapping.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, LazyLock, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use memmap2::{Advice, Mmap};

/// Map the first `len` bytes of a published cache file.
pub fn map(file: Arc<File>, len: u64) -> io::Result<Bytes> {
    map_file(file, len)
}

/// Map a download's temporary file at its final size `len` while it is
/// being written. The caller slices only bytes below the length the writer
/// has announced (the growing-file rule above).
pub fn map_growing(file: Arc<File>, len: u64) -> io::Result<Bytes> {
    map_file(file, len)
}

fn map_file(file: Arc<File>, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        // mmap(2) refuses zero-length mappings.
        return Ok(Bytes::new());
    }
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: `file` is a published, content-addressed cache file which no
    // code path ever writes or truncates again, or a download's file that
    // is only appended to and whose unwritten tail is never touched (see
    // the module invariant).
    let mmap = unsafe { memmap2::MmapOptions::new().len(len).map(&*file)? };
    // Hits are mostly read front to back: ask for aggressive read-ahead.
    let _ = mmap.advise(Advice::Sequential);
    let start = mmap.as_ptr() as usize;
    let mapped = Arc::new(MappedFile { mmap, file });
    let entry = (len, Arc::downgrade(&mapped));
    REGISTRY.rcu(|m| {
        let mut m = BTreeMap::clone(m);
        m.insert(start, entry.clone());
        m
    });
    Ok(Bytes::from_owner(Owner(mapped)))
}

/// Where a slice of mapped memory comes from: the file, and the slice's
/// offset in it. `None` for memory that is not (entirely) a live mapping.
pub fn locate(slice: &[u8]) -> Option<(Arc<File>, u64)> {
    let addr = slice.as_ptr() as usize;
    let registry = REGISTRY.load();
    let (&start, (len, weak)) = registry.range(..=addr).next_back()?;
    if slice.is_empty() || addr + slice.len() > start + len {
        return None;
    }
    let mapped = weak.upgrade()?;
    Some((mapped.file.clone(), (addr - start) as u64))
}

/// Live mappings by start address: copy-on-write, so lookups (one per
/// socket write) take no lock; mappings are made once per hit blob (hot ones
/// are reused) and once per reader of a download.
static REGISTRY: LazyLock<ArcSwap<Registry>> = LazyLock::new(Default::default);

/// Start address -> (length, the mapping).
type Registry = BTreeMap<usize, (usize, Weak<MappedFile>)>;

/// A mapping and the file behind it.
struct MappedFile {
    mmap: Mmap,
    file: Arc<File>,
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        let start = self.mmap.as_ptr() as usize;
        REGISTRY.rcu(|m| {
            let mut m = BTreeMap::clone(m);
            // Only our own entry: a later mapping may already reuse the address.
            if m.get(&start).is_some_and(|(_, w)| w.strong_count() == 0) {
                m.remove(&start);
            }
            m
        });
    }
}

/// Owner kept alive by every `Bytes` slice of the mapping; dropping the last
/// one unmaps.
struct Owner(Arc<MappedFile>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0.mmap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_and_slices_share_memory() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello world").unwrap();
        let f = Arc::new(f);
        let b = map(f.clone(), 11).unwrap();
        assert_eq!(&b[..], b"hello world");
        let s = b.slice(6..);
        assert_eq!(&s[..], b"world");
        assert_eq!(
            s.as_ptr(),
            b[6..].as_ptr(),
            "a range is a slice of the mapping, not a copy"
        );
        assert!(map(f, 0).unwrap().is_empty());
    }

    #[test]
    fn slices_are_located_in_their_file_until_unmapped() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let b = map(Arc::new(f), 10).unwrap();
        let (_, off) = locate(&b[3..7]).expect("a mapped slice");
        assert_eq!(off, 3);
        assert!(locate(b"0123").is_none(), "other memory is not a mapping");
        let copy = b.to_vec();
        assert!(locate(&copy).is_none());
        let addr = b.as_ptr() as usize;
        drop(b);
        assert!(
            !REGISTRY.load().contains_key(&addr),
            "dropping the last slice removes the entry"
        );
    }
}
