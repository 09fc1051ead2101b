//! The only `unsafe` in berth: mapping cache files into memory and handing
//! them to hyper as [`Bytes`], so content is served without copying it in
//! user space, and surviving a mapped file that was truncated behind
//! berth's back.
//!
//! # Safety invariant
//!
//! A `&[u8]` (or a [`Bytes`]) over mapped memory is sound only while every
//! byte it covers exists in the file and nobody changes it. The types here
//! make the caller prove that instead of trusting it:
//!
//! 1. [`map`] takes a [`Published`], which only
//!    [`super::store::Store::open_published`] creates. Published files are
//!    content-addressed (`blobs/sha256/<ab>/<hex>`), were written under a
//!    temporary name, fsynced, verified and renamed into place, and no code
//!    path opens them for writing again; eviction and quarantine only
//!    `unlink`/`rename` (a mapping keeps its inode). The whole file is
//!    final, so the whole mapping may be one slice.
//! 2. A download still being written ([`map_growing`]) is kept as raw
//!    memory ([`memmap2::MmapRaw`]): no reference to it exists until
//!    [`Growing::bytes`] forms one, and that refuses any byte at or past
//!    the file's current length (an `fstat` per frame). The file has exactly
//!    one writer, which only appends with positional writes, and readers
//!    ask only for bytes below the length the writer announced after its
//!    `write` returned, so every byte a slice covers is final.
//!
//! # A file truncated behind berth's back
//!
//! Something outside berth (an operator, a broken disk, a full-disk
//! cleaner) can still truncate a mapped file. Touching a mapped page past
//! the new end of file raises SIGBUS, which would kill the daemon. berth
//! defends in depth instead of crashing:
//!
//! - A process SIGBUS handler ([`install`], `SA_SIGINFO`) looks the faulting
//!   address up in [`SLOTS`], a fixed, lock-free table of live mappings. If
//!   the address is in one, it maps an anonymous zero page over the faulting
//!   page (`MAP_FIXED`, so the instruction resumes and reads zeros), marks
//!   that mapping poisoned and returns. Otherwise it hands the signal to
//!   the handler it replaced (Rust's stack-overflow handler) or restores the
//!   default action, so the fault repeats and kills as before. It only uses
//!   atomics and `mmap`/`sigaction` (async-signal-safe; no allocation, no
//!   locks) and preserves `errno`.
//! - Every body that hands out mapped slices checks the poison flag
//!   ([`watch`]) before each frame and, once every frame it handed out has
//!   been written (dropped by hyper), before ending; a poisoned transfer
//!   ends in an error, so hyper aborts the connection (HTTP/1) or resets
//!   the stream (HTTP/2) and the client never sees a complete response with
//!   zeros in it. The entry is quarantined and refetched on the next miss.
//! - On plain TCP the bytes usually leave by `sendfile(2)` from the file
//!   ([`locate`]), which never touches the mapping: a truncated file ends
//!   the write early with an error, and the writer marks the mapping
//!   ([`poison`]).
//!
//! Why not `pread` into buffers instead? It costs a copy per byte served,
//! which is what the mapping exists to avoid; and checking the file length
//! before every frame still leaves a window between the check and the
//! read. The handler closes that window.
//!
//! # From a slice back to its file
//!
//! Every live mapping is also listed in [`REGISTRY`] (address range -> the
//! mapped file), so that the plain-TCP writer can turn a write of a mapped
//! slice into `sendfile(2)` from the file at the same offset. [`locate`] is
//! safe code: an entry holds only a `Weak` reference, and a successful
//! upgrade proves the mapping is still alive, hence still occupies that
//! address range.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Once, OnceLock, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use memmap2::{Advice, MmapOptions, MmapRaw};

use super::store::Published;

/// Largest slice of content handed out at once (a body frame of a cache
/// hit, a read of a download in progress): slices are free, and a bounded
/// frame lets the send timeout tell a client that stopped reading from one
/// that is merely slow.
pub const FRAME: usize = 1 << 20;

/// Map a published cache file; the whole file is final (rule 1).
pub fn map(published: Published) -> io::Result<Bytes> {
    let (file, len) = published.into_parts();
    if len == 0 {
        // mmap(2) refuses zero-length mappings.
        return Ok(Bytes::new());
    }
    let mapped = Mapping::new(Arc::new(file), len)?;
    let len = mapped.len;
    Ok(Bytes::from_owner(Part {
        mapped,
        start: 0,
        end: len,
    }))
}

/// Map a download's file at its final size `len` while it is written
/// (rule 2). Nothing is readable until [`Growing::bytes`] vouches for it.
pub fn map_growing(file: Arc<File>, len: u64) -> io::Result<Growing> {
    if len == 0 {
        return Ok(Growing(None));
    }
    Ok(Growing(Some(Mapping::new(file, len)?)))
}

/// A mapping of a file that may still be growing.
pub struct Growing(Option<Arc<Mapping>>);

impl Growing {
    /// The bytes `[start, end)`, which the caller knows to be written: a
    /// slice of the mapping, no copy. Refused if they are not all in the
    /// file now (rule 2).
    pub fn bytes(&self, start: u64, end: u64) -> io::Result<Bytes> {
        let Some(mapped) = &self.0 else {
            return if start == end {
                Ok(Bytes::new())
            } else {
                Err(io::Error::other("range beyond an empty mapping"))
            };
        };
        let in_file = mapped.file.metadata()?.len();
        if start > end || end > in_file || end > mapped.len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("bytes {start}..{end} are not in the file ({in_file} bytes)"),
            ));
        }
        Ok(Bytes::from_owner(Part {
            mapped: mapped.clone(),
            start: start as usize,
            end: end as usize,
        }))
    }
}

/// Whether the mapping behind `slice` faulted past the end of its file
/// (see the module doc). `None` for memory that is not a live mapping.
pub fn watch(slice: &[u8]) -> Option<Poison> {
    let (mapped, _) = find(slice)?;
    Some(Poison(mapped))
}

/// Mark the mapping behind `slice` (if any) poisoned: its file turned out
/// shorter than the mapping (a `sendfile` or a copy from it failed).
pub fn poison(slice: &[u8]) {
    if let Some((mapped, _)) = find(slice) {
        SLOTS[mapped.slot].poisoned.store(true, Ordering::SeqCst);
    }
}

/// Watches one mapping for the SIGBUS handler's poison mark.
#[derive(Clone)]
pub struct Poison(Arc<Mapping>);

impl Poison {
    /// True once a page of the mapping was replaced by zeros.
    pub fn is_set(&self) -> bool {
        SLOTS[self.0.slot].poisoned.load(Ordering::SeqCst)
    }

    /// Whether `slice` lies in this mapping.
    pub fn covers(&self, slice: &[u8]) -> bool {
        let (start, addr) = (self.0.start(), slice.as_ptr() as usize);
        addr >= start && addr + slice.len() <= start + self.0.len
    }
}

/// Where a slice of mapped memory comes from: the file, and the slice's
/// offset in it. `None` for memory that is not (entirely) a live mapping.
pub fn locate(slice: &[u8]) -> Option<(Arc<File>, u64)> {
    let (mapped, offset) = find(slice)?;
    Some((mapped.file.clone(), offset))
}

fn find(slice: &[u8]) -> Option<(Arc<Mapping>, u64)> {
    let addr = slice.as_ptr() as usize;
    let registry = REGISTRY.load();
    let (&start, (len, weak)) = registry.range(..=addr).next_back()?;
    if slice.is_empty() || addr + slice.len() > start + len {
        return None;
    }
    let mapped = weak.upgrade()?;
    Some((mapped, (addr - start) as u64))
}

/// Live mappings by start address: copy-on-write, so lookups (one per
/// socket write) take no lock; mappings are made once per hit blob (hot ones
/// are reused) and once per reader of a download.
static REGISTRY: LazyLock<ArcSwap<Registry>> = LazyLock::new(Default::default);

/// Start address -> (length, the mapping).
type Registry = BTreeMap<usize, (usize, Weak<Mapping>)>;

/// A read-only mapping, the file behind it, and its slot in [`SLOTS`].
struct Mapping {
    raw: MmapRaw,
    file: Arc<File>,
    len: usize,
    slot: usize,
}

impl Mapping {
    fn new(file: Arc<File>, len: u64) -> io::Result<Arc<Mapping>> {
        install();
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
        let raw = MmapOptions::new().len(len).map_raw_read_only(&*file)?;
        // Hits are mostly read front to back: ask for aggressive read-ahead.
        let _ = raw.advise(Advice::Sequential);
        let start = raw.as_ptr() as usize;
        let slot = claim(start, len).ok_or_else(|| io::Error::other("too many live mappings"))?;
        let mapped = Arc::new(Mapping {
            raw,
            file,
            len,
            slot,
        });
        let entry = (len, Arc::downgrade(&mapped));
        REGISTRY.rcu(|m| {
            let mut m = BTreeMap::clone(m);
            m.insert(start, entry.clone());
            m
        });
        Ok(mapped)
    }

    fn start(&self) -> usize {
        self.raw.as_ptr() as usize
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let start = self.start();
        REGISTRY.rcu(|m| {
            let mut m = BTreeMap::clone(m);
            // Only our own entry: a later mapping may already reuse the address.
            if m.get(&start).is_some_and(|(_, w)| w.strong_count() == 0) {
                m.remove(&start);
            }
            m
        });
        // Before munmap (the MmapRaw field drops after this): the address
        // range must not be claimed by a slot once something else may map it.
        release(self.slot);
    }
}

/// Owner kept alive by every `Bytes` slice of a mapping: the range
/// `[start, end)` of it, all of which is final (rules 1 and 2). Dropping the
/// last owner unmaps.
struct Part {
    mapped: Arc<Mapping>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `[start, end)` lies inside the mapping (checked when the
        // Part was made), the mapping lives as long as `self`, and those
        // bytes are in the file and never written again (rules 1 and 2). A
        // truncation behind berth's back is answered by the SIGBUS handler
        // with zero pages, so reading stays defined.
        unsafe {
            std::slice::from_raw_parts(
                self.mapped.raw.as_ptr().add(self.start),
                self.end - self.start,
            )
        }
    }
}

/// Most mappings alive at once (each response of mapped content holds one,
/// hot blobs one each in the reuse cache). 24 bytes a slot, zero pages
/// until used.
const MAX_SLOTS: usize = 1 << 16;

/// A live mapping as the signal handler sees it. `start == 0`: free.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

/// The lock-free table the SIGBUS handler searches.
static SLOTS: [Slot; MAX_SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
    }
}; MAX_SLOTS];

/// Slots `< HIGH` may be in use; the handler scans only those.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Where the next claim starts looking.
static CURSOR: AtomicUsize = AtomicUsize::new(0);

fn claim(start: usize, len: usize) -> Option<usize> {
    let first = CURSOR.fetch_add(1, Ordering::Relaxed);
    for i in 0..MAX_SLOTS {
        let n = (first + i) % MAX_SLOTS;
        let slot = &SLOTS[n];
        if slot
            .start
            .compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            slot.poisoned.store(false, Ordering::SeqCst);
            slot.len.store(len, Ordering::SeqCst);
            HIGH.fetch_max(n + 1, Ordering::SeqCst);
            return Some(n);
        }
    }
    None
}

fn release(n: usize) {
    SLOTS[n].len.store(0, Ordering::SeqCst);
    SLOTS[n].start.store(0, Ordering::SeqCst);
}

/// The slot whose mapping contains `addr`. Async-signal-safe.
fn slot_of(addr: usize) -> Option<&'static Slot> {
    let high = HIGH.load(Ordering::SeqCst).min(MAX_SLOTS);
    SLOTS[..high].iter().find(|s| {
        let start = s.start.load(Ordering::SeqCst);
        start != 0 && addr >= start && addr - start < s.len.load(Ordering::SeqCst)
    })
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action before ours, to hand foreign faults to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Install the SIGBUS handler (once, before the first mapping).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sysconf and sigaction are called with valid arguments;
        // `on_sigbus` is async-signal-safe (see the module doc).
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as Handler as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            // Read the old action first, then publish it, then install:
            // the handler never runs before PREVIOUS is set.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                tracing::warn!(
                    "cannot read the SIGBUS action; truncated cache files may crash berth"
                );
                return;
            }
            let _ = PREVIOUS.set(old);
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the SIGBUS handler; truncated cache files may crash berth"
                );
            }
        }
    });
}

/// An `SA_SIGINFO` signal handler.
type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // only async-signal-safe calls follow, and errno is restored.
    unsafe {
        let errno = *libc::__errno_location();
        let addr = (*info).si_addr() as usize;
        if let Some(slot) = slot_of(addr) {
            let page = PAGE.load(Ordering::Relaxed);
            let at = addr & !(page - 1);
            let zero = libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if zero != libc::MAP_FAILED {
                slot.poisoned.store(true, Ordering::SeqCst);
                *libc::__errno_location() = errno;
                return;
            }
        }
        // Not ours (or no zero page): what would have happened without us.
        match PREVIOUS.get() {
            Some(old)
                if old.sa_flags & libc::SA_SIGINFO != 0
                    && old.sa_sigaction != libc::SIG_DFL
                    && old.sa_sigaction != libc::SIG_IGN =>
            {
                let previous: Handler = std::mem::transmute(old.sa_sigaction);
                previous(sig, info, ctx);
            }
            _ => {
                // Default action: returning re-executes the access, which
                // faults again and terminates the process.
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
        *libc::__errno_location() = errno;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Store;
    use crate::registry::Digest;
    use std::io::Write;

    fn published(content: &[u8]) -> (tempfile::TempDir, Store, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(content);
        store.publish_bytes(&d, content).unwrap();
        (dir, store, d)
    }

    #[test]
    fn maps_and_slices_share_memory() {
        let (_dir, store, d) = published(b"hello world");
        let b = map(store.open_published(&d).unwrap().unwrap()).unwrap();
        assert_eq!(&b[..], b"hello world");
        let s = b.slice(6..);
        assert_eq!(&s[..], b"world");
        assert_eq!(
            s.as_ptr(),
            b[6..].as_ptr(),
            "a range is a slice of the mapping, not a copy"
        );
    }

    #[test]
    fn slices_are_located_in_their_file_until_unmapped() {
        let (_dir, store, d) = published(b"0123456789");
        let b = map(store.open_published(&d).unwrap().unwrap()).unwrap();
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
        assert!(slot_of(addr).is_none(), "and frees its slot");
    }

    #[test]
    fn a_growing_file_is_sliced_only_where_written() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123").unwrap();
        let f = Arc::new(f);
        let g = map_growing(f.clone(), 10).unwrap();
        assert_eq!(&g.bytes(1, 4).unwrap()[..], b"123");
        assert!(g.bytes(2, 6).is_err(), "unwritten bytes are refused");
        (&*f).write_all(b"456789").unwrap();
        assert_eq!(&g.bytes(2, 10).unwrap()[..], b"23456789");
        assert!(g.bytes(0, 11).is_err(), "never past the mapping");
    }

    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_poisoned_instead_of_crashing() {
        let page = PAGE.load(Ordering::Relaxed).max(4096);
        let content = vec![7u8; 4 * page];
        let (_dir, store, d) = published(&content);
        let b = map(store.open_published(&d).unwrap().unwrap()).unwrap();
        let poison = watch(&b).expect("a mapping");
        assert!(!poison.is_set());
        File::options()
            .write(true)
            .open(store.blob_path(&d))
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        assert_eq!(b[0], 7, "bytes still in the file read normally");
        // SIGBUS without the handler: the test process would die here.
        let tail: u64 = b[2 * page..].iter().map(|&x| u64::from(x)).sum();
        assert_eq!(tail, 0, "the truncated pages read as zeros");
        assert!(poison.is_set(), "the mapping is marked poisoned");
    }
}
