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
//! renamed into place, and its writer has finished), may be passed to [`map`]. Something outside berth writing into the cache
//! directory breaks the invariant, as it would for any mmap-based cache;
//! `berth verify` exists to find such damage.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;
use memmap2::{Advice, Mmap};

/// Map the first `len` bytes of a published cache file.
pub fn map(file: &File, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        // mmap(2) refuses zero-length mappings.
        return Ok(Bytes::new());
    }
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: `file` is a published, content-addressed cache file which no
    // code path ever writes or truncates again (see the module invariant).
    let mmap = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
    // Hits are mostly read front to back: ask for aggressive read-ahead.
    let _ = mmap.advise(Advice::Sequential);
    Ok(Bytes::from_owner(MappedFile(mmap)))
}

/// Owner kept alive by every `Bytes` slice of the mapping; dropping the last
/// one unmaps.
struct MappedFile(Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
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
        let b = map(&f, 11).unwrap();
        assert_eq!(&b[..], b"hello world");
        let s = b.slice(6..);
        assert_eq!(&s[..], b"world");
        assert_eq!(
            s.as_ptr(),
            b[6..].as_ptr(),
            "a range is a slice of the mapping, not a copy"
        );
        assert!(map(&f, 0).unwrap().is_empty());
    }
}
