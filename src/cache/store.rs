//! The on-disk layout and every file operation on it.
//!
//! ```text
//! <root>/blobs/sha256/<ab>/<hex>       content (blobs and manifests), published by rename only
//! <root>/manifests/sha256/<ab>/<hex>   the media type of a manifest stored in blobs/
//! <root>/tags/<registry>/<repo>/_tags/<tag>   tag -> digest record (JSON)
//! <root>/private/sha256/<hex>         registries known to serve private content (see provenance)
//! <root>/tmp/                          in-progress downloads; emptied at start
//! ```
//! `_tags` cannot collide with a repository component: those start with
//! `[a-z0-9]`. Paths are built only from validated newtypes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::registry::{Digest, RegistryHost, Repository, Tag};

/// Handle to the cache directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// Set when a write ran out of space; cleared once space is back.
    full: Arc<AtomicBool>,
    /// Unix millis of the last free-space check while full.
    full_checked: AtomicU64,
}

/// While the filesystem is full, free space is checked at most this often.
const FULL_RECHECK_MS: u64 = 2000;

/// End pass-through mode if the cache filesystem has room again.
fn recheck_space(root: &Path, full: &AtomicBool) {
    let (Ok(free), Ok(total)) = (fs4::available_space(root), fs4::total_space(root)) else {
        return;
    };
    if free >= (64 << 20).min(total / 10) && full.swap(false, Ordering::Relaxed) {
        tracing::info!(dir = %root.display(), free, "cache filesystem has space again: caching resumes");
    }
}

/// A tag record found on disk: (registry, repository, tag, record bytes).
pub type TagFile = (RegistryHost, Repository, Tag, Vec<u8>);

/// An open published (verified, renamed into place, never written again)
/// cache file: the proof [`super::mmap::map`] asks for. Only
/// [`Store::open_published`] makes one.
#[derive(Debug)]
pub struct Published {
    file: File,
    size: u64,
    ino: u64,
}

impl Published {
    /// Its size when opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its inode.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub(super) fn into_parts(self) -> (File, u64) {
        (self.file, self.size)
    }
}

/// A published blob found by [`Store::scan`].
#[derive(Debug, Clone)]
pub struct Scanned {
    /// Its digest (from the file name, which is trusted: only verified
    /// content is ever renamed there).
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Inode, to tell a re-published file from the one an eviction meant.
    pub ino: u64,
    /// Last recorded use (mtime; see [`Store::touch`]).
    pub last_used: SystemTime,
}

impl Store {
    /// Open (creating if needed) a cache directory and remove leftovers of
    /// interrupted downloads.
    pub fn open(root: &Path) -> io::Result<Store> {
        for sub in [
            "blobs/sha256",
            "manifests/sha256",
            "tags",
            "tmp",
            "private/sha256",
        ] {
            fs::create_dir_all(root.join(sub))?;
        }
        let store = Store::open_existing(root)?;
        store.clean_tmp()?;
        Ok(store)
    }

    /// Open an existing cache directory without changing anything (nothing
    /// created, `tmp/` left alone), for read-only commands (`berth ls`,
    /// `berth export`) that may run beside a live daemon.
    pub fn open_existing(root: &Path) -> io::Result<Store> {
        if !root.join("blobs/sha256").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not a berth cache directory (no blobs/sha256)",
            ));
        }
        Ok(Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            full: Arc::new(AtomicBool::new(false)),
            full_checked: AtomicU64::new(0),
        })
    }

    /// Record a failed write: out of space switches the cache to pass-through
    /// (misses are served without caching) until space returns.
    pub fn note_write_error(&self, e: &io::Error) -> bool {
        let full = is_out_of_space(e);
        if full && !self.full.swap(true, Ordering::Relaxed) {
            self.full_checked.store(unix_ms(), Ordering::Relaxed);
            tracing::warn!(dir = %self.root.display(), "cache filesystem is full: serving misses without caching until space returns");
        }
        full
    }

    /// Whether the cache is in pass-through mode. While full, free space is
    /// re-checked every couple of seconds, on a blocking thread (`statvfs`
    /// can stall on a busy or remote filesystem, and this is asked on every
    /// miss); the mode ends by itself when at least min(64 MiB, 10% of the
    /// filesystem) is free again.
    pub fn is_full(&self) -> bool {
        if !self.full.load(Ordering::Relaxed) {
            return false;
        }
        let now = unix_ms();
        let last = self.full_checked.load(Ordering::Relaxed);
        if now >= last + FULL_RECHECK_MS
            && self
                .full_checked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (root, full) = (self.root.clone(), self.full.clone());
            super::in_background(move || recheck_space(&root, &full));
        }
        self.full.load(Ordering::Relaxed)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clean_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            if fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                files = n,
                "removed temporary files of interrupted downloads"
            );
        }
        Ok(n)
    }

    fn sharded(&self, top: &str, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root.join(top).join("sha256").join(&hex[..2]).join(hex)
    }

    /// Where a published blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.sharded("blobs", d)
    }

    /// Open a published blob read-only, with its size and inode: the only
    /// way to obtain a [`Published`], which [`super::mmap::map`] requires.
    pub fn open_published(&self, d: &Digest) -> io::Result<Option<Published>> {
        let Some(file) = found(File::open(self.blob_path(d)))? else {
            return Ok(None);
        };
        let md = file.metadata()?;
        Ok(Some(Published {
            file,
            size: md.len(),
            ino: md.ino(),
        }))
    }

    /// Create a fresh temporary file for a download.
    pub fn create_tmp(&self) -> io::Result<(File, PathBuf)> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!(
            "{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((f, path))
    }

    /// Publish a verified, fsynced temporary file under its digest; returns
    /// the new inode. Rename is atomic: readers see the old entry, or none,
    /// or the complete new file, never a partial one.
    pub fn publish(&self, tmp: &Path, d: &Digest) -> io::Result<u64> {
        let dest = self.blob_path(d);
        fs::create_dir_all(dest.parent().expect("sharded path has a parent"))?;
        fs::rename(tmp, &dest)?;
        Ok(fs::metadata(&dest)?.ino())
    }

    /// Write small content (a manifest) through tmp + fsync + rename.
    pub fn publish_bytes(&self, d: &Digest, bytes: &[u8]) -> io::Result<u64> {
        let dest = self.blob_path(d);
        self.write_atomic(&dest, bytes)?;
        Ok(fs::metadata(&dest)?.ino())
    }

    /// Record a manifest's media type (written before its content is published).
    pub fn write_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()> {
        self.write_atomic(&self.sharded("manifests", d), media_type.as_bytes())
    }

    /// A manifest's media type, if recorded.
    pub fn read_media_type(&self, d: &Digest) -> io::Result<Option<String>> {
        found(fs::read(self.sharded("manifests", d)))
            .map(|o| o.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Where the record of `registry/repo:tag` lives.
    pub fn tag_path(&self, registry: &RegistryHost, repo: &Repository, tag: &Tag) -> PathBuf {
        self.root
            .join("tags")
            .join(registry.as_str())
            .join(repo.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    /// Read a tag record's bytes.
    pub fn read_tag(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
    ) -> io::Result<Option<Vec<u8>>> {
        found(fs::read(self.tag_path(registry, repo, tag)))
    }

    /// Replace a tag record atomically.
    pub fn write_tag(
        &self,
        registry: &RegistryHost,
        repo: &Repository,
        tag: &Tag,
        bytes: &[u8],
    ) -> io::Result<()> {
        self.write_atomic(&self.tag_path(registry, repo, tag), bytes)
    }

    /// Every tag record on disk: (registry, repository, tag, record bytes).
    /// Entries whose path does not parse are skipped.
    pub fn tag_records(&self) -> io::Result<Vec<TagFile>> {
        let root = self.root.join("tags");
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&root) else {
                    continue;
                };
                let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
                // <registry>/<repo...>/_tags/<tag>
                if parts.len() < 4 || parts[parts.len() - 2] != "_tags" {
                    continue;
                }
                let (Ok(reg), Ok(repo), Ok(tag)) = (
                    parts[0].parse::<RegistryHost>(),
                    parts[1..parts.len() - 2].join("/").parse::<Repository>(),
                    parts[parts.len() - 1].parse::<Tag>(),
                ) else {
                    continue;
                };
                if let Some(bytes) = found(fs::read(&path))? {
                    out.push((reg, repo, tag, bytes));
                }
            }
        }
        Ok(out)
    }

    fn private_dir(&self) -> PathBuf {
        self.root.join("private").join("sha256")
    }

    /// Replace the provenance record of private content `d` durably: tmp,
    /// fsync, rename, then fsync the directory, so the record is on disk
    /// before the content it protects is published.
    pub fn write_private(&self, d: &Digest, bytes: &[u8]) -> io::Result<()> {
        let dir = self.private_dir();
        self.write_atomic(&dir.join(d.hex()), bytes)?;
        File::open(&dir)?.sync_all()
    }

    /// Remove the provenance record of `d` (absent is fine).
    pub fn remove_private(&self, d: &Digest) -> io::Result<()> {
        match fs::remove_file(self.private_dir().join(d.hex())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every provenance record: (digest, bytes). A cache without the
    /// directory has none; files not named by a digest are skipped.
    pub fn private_records(&self) -> io::Result<Vec<(Digest, Vec<u8>)>> {
        let Some(entries) = found(fs::read_dir(self.private_dir()))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
            else {
                continue;
            };
            if let Some(bytes) = found(fs::read(entry.path()))? {
                out.push((digest, bytes));
            }
        }
        Ok(out)
    }

    /// Read a published manifest's bytes (small), if it is one.
    pub fn read_manifest(&self, d: &Digest) -> io::Result<Option<Vec<u8>>> {
        if self.read_media_type(d)?.is_none() {
            return Ok(None);
        }
        found(fs::read(self.blob_path(d)))
    }

    /// Crash-safe small write: tmp in the same directory, fsync, rename.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let (mut f, tmp) = self.create_tmp()?;
        let res = (|| {
            f.write_all(bytes)?;
            f.sync_data()?;
            fs::create_dir_all(dest.parent().expect("absolute path"))?;
            fs::rename(&tmp, dest)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Remove a published blob if it is still the inode the caller means
    /// (an eviction must not remove a newer copy published meanwhile).
    pub fn remove_blob(&self, d: &Digest, ino: u64) -> io::Result<bool> {
        let path = self.blob_path(d);
        match found(fs::metadata(&path))? {
            Some(md) if md.ino() == ino => {
                fs::remove_file(&path)?;
                let _ = fs::remove_file(self.sharded("manifests", d));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Move a published blob that is damaged (and its media-type record)
    /// aside to `<root>/quarantine/`, never deleting it; returns where it went.
    pub fn quarantine(&self, d: &Digest) -> io::Result<PathBuf> {
        self.quarantine_file(&self.blob_path(d), d.hex())
    }

    /// Move `path` (a file named `name` by its hex digest) to quarantine.
    pub fn quarantine_file(&self, path: &Path, name: &str) -> io::Result<PathBuf> {
        let q = self.root.join("quarantine");
        fs::create_dir_all(&q)?;
        let mut dest = q.join(name);
        let mut n = 1;
        while dest.exists() {
            dest = q.join(format!("{name}.{n}"));
            n += 1;
        }
        fs::rename(path, &dest)?;
        if name.len() >= 2 {
            let sidecar = self
                .root
                .join("manifests/sha256")
                .join(&name[..2])
                .join(name);
            if sidecar.is_file() {
                fs::rename(&sidecar, format!("{}.media-type", dest.display()))?;
            }
        }
        Ok(dest)
    }

    /// Record a use of a published file (its mtime), so that recency
    /// survives a restart. The content is not touched.
    pub fn touch(file: &File) {
        let _ = file.set_modified(SystemTime::now());
    }

    /// Every published blob, least recently used first.
    pub fn scan(&self) -> io::Result<Vec<Scanned>> {
        let mut out = Vec::new();
        for shard in fs::read_dir(self.root.join("blobs/sha256"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|n| format!("sha256:{n}").parse::<Digest>().ok())
                else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not named by a digest");
                    continue;
                };
                let md = entry.metadata()?;
                if !md.is_file() {
                    continue;
                }
                out.push(Scanned {
                    digest,
                    size: md.len(),
                    ino: md.ino(),
                    last_used: md.modified().unwrap_or(UNIX_EPOCH),
                });
            }
        }
        out.sort_by_key(|s| s.last_used);
        Ok(out)
    }
}

/// Why the cache directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (a running daemon) holds it.
    #[error(
        "cache directory {0} is in use by a running berth (its lock file is held); stop it first"
    )]
    Busy(PathBuf),
    /// The lock file could not be opened.
    #[error("cannot open the lock file in {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// Take the cache directory's exclusive lock (`<dir>/lock`), held until
/// the returned file is dropped. The daemon holds it for its lifetime;
/// offline commands that change the cache take it too, so they refuse to
/// run under a live daemon. The kernel releases it if the process dies.
pub fn lock(dir: &Path) -> Result<File, LockError> {
    fs::create_dir_all(dir).map_err(|e| LockError::Io(dir.to_path_buf(), e))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(|e| LockError::Io(dir.to_path_buf(), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(LockError::Busy(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(LockError::Io(dir.to_path_buf(), e)),
    }
}

/// ENOSPC or EDQUOT.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch at `t` (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `None` for a file that is not there.
fn found<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_scan_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"abc");
        let ino = store.publish_bytes(&d, b"abc").unwrap();
        let p = store.open_published(&d).unwrap().unwrap();
        assert_eq!((p.size(), p.ino()), (3, ino));
        let scanned = store.scan().unwrap();
        assert_eq!(scanned.len(), 1);
        assert_eq!(scanned[0].digest, d);
        assert!(
            !store.remove_blob(&d, ino + 1).unwrap(),
            "another inode is left alone"
        );
        assert!(store.remove_blob(&d, ino).unwrap());
        assert!(store.open_published(&d).unwrap().is_none());
    }

    #[test]
    fn the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(LockError::Busy(_))));
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn leftover_tmp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_f, p) = store.create_tmp().unwrap();
        assert!(p.exists());
        drop(store);
        Store::open(dir.path()).unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn tag_records_do_not_collide_with_nested_repos() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reg: RegistryHost = "docker.io".parse().unwrap();
        let a: Repository = "a/b".parse().unwrap();
        let ab: Repository = "a/b/c".parse().unwrap();
        let c: Tag = "c".parse().unwrap();
        store.write_tag(&reg, &a, &c, b"one").unwrap();
        store.write_tag(&reg, &ab, &c, b"two").unwrap();
        assert_eq!(store.read_tag(&reg, &a, &c).unwrap().unwrap(), b"one");
        assert_eq!(store.read_tag(&reg, &ab, &c).unwrap().unwrap(), b"two");
    }
}
