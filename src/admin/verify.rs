//! `berth verify`: re-hash every published blob. A file whose content does
//! not match its name (bit rot, a disk error, someone's editor) is moved to
//! `<cache>/quarantine/` (with its media-type record), never deleted, and
//! reported; the exit status is then 1. Files in `blobs/` not named by a
//! digest are quarantined too. Leftover temporary files of interrupted
//! downloads are removed and reported. Needs the cache's lock.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::progress::Progress;
use super::{
    fail, init_logging, is_cache, lock, stderr_is_terminal, AdminError, EXIT_FAILED, EXIT_OK,
};
use crate::config::Config;
use crate::registry::digest::Digester;
use crate::registry::Digest;

/// A file that failed verification.
#[derive(Debug, Clone)]
pub struct Bad {
    /// Its name under `blobs/sha256/<ab>/`.
    pub name: String,
    /// What its content hashes to (`None` for a file not named by a digest).
    pub actual: Option<Digest>,
    /// Where it went.
    pub moved_to: PathBuf,
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    /// Blobs hashed.
    pub checked: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files quarantined.
    pub bad: Vec<Bad>,
    /// Temporary files removed (name, size).
    pub tmp_removed: Vec<(String, u64)>,
}

/// `berth verify`.
pub fn run(config: Config) -> i32 {
    let progress = Progress::new("verify", stderr_is_terminal());
    init_logging(config.log_format, "warn", progress.log_writer());
    let dir = config.cache_dir;
    let result = is_cache(&dir).and_then(|()| {
        let _lock = lock(&dir, "")?;
        let report = verify(&dir, &progress);
        progress.finish();
        report
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    for (name, size) in &report.tmp_removed {
        println!(
            "removed leftover temporary file tmp/{name} ({})",
            super::human_bytes(*size)
        );
    }
    for b in &report.bad {
        match &b.actual {
            Some(actual) => println!(
                "CORRUPT sha256:{} hashes to {actual}; moved to {}",
                b.name,
                b.moved_to.display()
            ),
            None => println!(
                "STRAY {} is not named by a sha256 digest; moved to {}",
                b.name,
                b.moved_to.display()
            ),
        }
    }
    println!(
        "verified {} blob(s), {}: {} bad{}",
        report.checked,
        super::human_bytes(report.bytes),
        report.bad.len(),
        if report.bad.is_empty() {
            String::new()
        } else {
            format!(" (quarantined in {})", dir.join("quarantine").display())
        }
    );
    if report.bad.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// Verify the cache in `dir` (the caller holds its lock).
pub fn verify(dir: &Path, progress: &Progress) -> Result<Report, AdminError> {
    let mut report = Report {
        tmp_removed: clean_tmp(&dir.join("tmp"))?,
        ..Report::default()
    };
    let files = published(dir)?;
    progress.add_bytes(files.iter().map(|f| f.2).sum());
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, std::io::Result<Digest>)>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, _, _)) = files.get(i) else {
                    return;
                };
                let r = hash_file(path, progress);
                results.lock().expect("results").push((i, r));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|r| r.0);
    for (i, r) in results {
        let (path, name, size) = &files[i];
        let expected = format!("sha256:{name}").parse::<Digest>().ok();
        let actual = match r {
            Ok(d) => d,
            // Vanished meanwhile (cannot happen under the lock) or unreadable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AdminError::io(path, e)),
        };
        report.checked += 1;
        report.bytes += size;
        if expected.as_ref() == Some(&actual) {
            continue;
        }
        let moved_to = quarantine(dir, path, name)?;
        tracing::warn!(file = %path.display(), %actual, quarantine = %moved_to.display(), "blob failed verification");
        report.bad.push(Bad {
            name: name.clone(),
            actual: expected.map(|_| actual),
            moved_to,
        });
    }
    Ok(report)
}

/// Remove everything in `tmp/` (nothing is downloading: the lock is held).
fn clean_tmp(tmp: &Path) -> Result<Vec<(String, u64)>, AdminError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(tmp) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(AdminError::io(tmp, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| AdminError::io(tmp, e))?;
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        fs::remove_file(entry.path()).map_err(|e| AdminError::io(entry.path(), e))?;
        out.push((entry.file_name().to_string_lossy().into_owned(), size));
    }
    Ok(out)
}

/// Every file under `blobs/sha256/<ab>/`: (path, name, size).
fn published(dir: &Path) -> Result<Vec<(PathBuf, String, u64)>, AdminError> {
    let root = dir.join("blobs/sha256");
    let mut out = Vec::new();
    for shard in fs::read_dir(&root).map_err(|e| AdminError::io(&root, e))? {
        let shard = shard.map_err(|e| AdminError::io(&root, e))?;
        if !shard.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for entry in fs::read_dir(shard.path()).map_err(|e| AdminError::io(shard.path(), e))? {
            let entry = entry.map_err(|e| AdminError::io(shard.path(), e))?;
            let md = entry
                .metadata()
                .map_err(|e| AdminError::io(entry.path(), e))?;
            if md.is_file() {
                out.push((
                    entry.path(),
                    entry.file_name().to_string_lossy().into_owned(),
                    md.len(),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

fn hash_file(path: &Path, progress: &Progress) -> std::io::Result<Digest> {
    let mut f = File::open(path)?;
    let mut h = Digester::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
}

/// Move a bad blob (and its media-type record) to `quarantine/`.
fn quarantine(dir: &Path, path: &Path, name: &str) -> Result<PathBuf, AdminError> {
    crate::cache::store::Store::open_existing(dir)
        .and_then(|store| store.quarantine_file(path, name))
        .map_err(|e| AdminError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Store;

    #[test]
    fn corrupt_and_stray_files_are_quarantined_and_tmp_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::of(b"good");
        store.publish_bytes(&good, b"good").unwrap();
        let bad = Digest::of(b"original");
        store.write_media_type(&bad, "application/x").unwrap();
        store.publish_bytes(&bad, b"tampered").unwrap();
        let stray_dir = dir.path().join("blobs/sha256/ab");
        std::fs::create_dir_all(&stray_dir).unwrap();
        std::fs::write(stray_dir.join("notes.txt"), b"x").unwrap();
        let (_f, tmp) = store.create_tmp().unwrap();
        let r = verify(dir.path(), &Progress::quiet("verify")).unwrap();
        assert_eq!(r.checked, 3);
        assert_eq!(r.bad.len(), 2, "{r:?}");
        assert!(!tmp.exists());
        assert_eq!(r.tmp_removed.len(), 1);
        assert!(store.blob_path(&good).is_file());
        assert!(!store.blob_path(&bad).exists());
        let q = dir.path().join("quarantine");
        assert!(q.join(bad.hex()).is_file());
        assert!(q.join(format!("{}.media-type", bad.hex())).is_file());
        assert!(q.join("notes.txt").is_file());
    }
}
