//! Crash-safe file replacement for files other programs read at any moment
//! (containerd re-reads `hosts.toml` on every pull): write a temporary file
//! in the same directory, fsync it, rename it over the target, fsync the
//! directory. Backups are hard links, so a restore gives back the very same
//! inode: bytes, mode, owner and mtime.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::NodeError;

/// `path` with `suffix` appended to its file name (`hosts.toml.berth-backup`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The file's bytes, or `None` if it does not exist.
pub fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, NodeError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::io(path, e)),
    }
}

/// Atomically replace (or create) `path` with `bytes`, mode `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    let dir = parent(path);
    let tmp = with_suffix(
        &dir.join(format!(
            ".{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        )),
        &format!(".berth-tmp-{}", std::process::id()),
    );
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(NodeError::io(path, e));
    }
    sync_dir(dir);
    Ok(())
}

/// Hard-link `path` to `backup` (fails if `backup` exists).
pub fn link_backup(path: &Path, backup: &Path) -> Result<(), NodeError> {
    fs::hard_link(path, backup).map_err(|e| NodeError::io(backup, e))?;
    sync_dir(parent(backup));
    Ok(())
}

/// Atomically move `from` over `to`.
pub fn rename(from: &Path, to: &Path) -> Result<(), NodeError> {
    fs::rename(from, to).map_err(|e| NodeError::io(to, e))?;
    sync_dir(parent(to));
    Ok(())
}

/// Remove a file; a missing file is fine.
pub fn remove(path: &Path) -> Result<(), NodeError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent(path));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(path, e)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Best effort: make a rename or unlink durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts.toml");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn backup_is_the_same_inode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"orig").unwrap();
        let b = with_suffix(&p, ".berth-backup");
        link_backup(&p, &b).unwrap();
        assert!(link_backup(&p, &b).is_err(), "never clobbers a backup");
        write_atomic(&p, b"new", 0o644).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"orig");
        rename(&b, &p).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"orig");
        assert!(read_opt(&b).unwrap().is_none());
    }
}
