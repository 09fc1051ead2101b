//! The thread that unlinks evicted blobs. moka calls its eviction listener
//! on the thread whose insertion made room, which is often an async worker
//! finishing a download or starting one; an `unlink` of a large file can
//! take milliseconds on a busy disk, and every request on that worker would
//! wait for it. The listener only queues the work; this thread does it.
//!
//! Deferring an unlink is safe: a blob is removed only if its inode is
//! still the one evicted ([`Store::remove_blob`]), so a copy published again
//! meanwhile survives; an unlink lost to a crash leaves a file that the next
//! start indexes (and evicts if the cache is over capacity).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use super::store::Store;
use crate::registry::Digest;

enum Job {
    Unlink { digest: Digest, ino: u64, size: u64 },
    Flush(mpsc::SyncSender<()>),
}

/// Queue of evicted blobs to unlink, drained by one background thread
/// that lives as long as the queue.
pub struct Reaper {
    tx: mpsc::Sender<Job>,
    evictions: Arc<AtomicU64>,
}

impl Reaper {
    /// Start the thread that removes evicted files from `store`.
    pub fn start(store: Arc<Store>) -> Reaper {
        let (tx, rx) = mpsc::channel();
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let spawned = std::thread::Builder::new()
            .name("berth-reaper".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Unlink { digest, ino, size } => {
                            unlink(&store, &digest, ino, size, &counter)
                        }
                        Job::Flush(done) => drop(done.send(())),
                    }
                }
            });
        if let Err(error) = spawned {
            // Without a thread the queue is never drained: files of evicted
            // blobs stay on disk until the next start's scan finds them.
            tracing::error!(%error, "could not start the eviction thread");
        }
        Reaper { tx, evictions }
    }

    /// Queue an evicted blob for removal (never blocks on I/O).
    pub fn evicted(&self, digest: Digest, ino: u64, size: u64) {
        let _ = self.tx.send(Job::Unlink { digest, ino, size });
    }

    /// Wait until every removal queued so far is done (tests, shutdown).
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Job::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Blobs unlinked since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

fn unlink(store: &Store, d: &Digest, ino: u64, size: u64, counter: &AtomicU64) {
    match store.remove_blob(d, ino) {
        Ok(true) => {
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(digest = %d, size, "evicted");
        }
        Ok(false) => {}
        Err(error) => tracing::warn!(%error, digest = %d, "could not remove an evicted blob"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlinks_only_the_evicted_inode() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let body = b"evicted".to_vec();
        let d = Digest::of(&body);
        let old = store.publish_bytes(&d, &body).unwrap();
        let reaper = Reaper::start(store.clone());
        // Published again before the queued removal runs: a new inode (the
        // open handle keeps the old inode number from being reused).
        let _held = std::fs::File::open(store.blob_path(&d)).unwrap();
        store.remove_blob(&d, old).unwrap();
        let new = store.publish_bytes(&d, &body).unwrap();
        reaper.evicted(d.clone(), old, 7);
        reaper.flush();
        assert!(store.open_published(&d).unwrap().is_some(), "new copy kept");
        assert_eq!(reaper.evictions(), 0);
        reaper.evicted(d.clone(), new, 7);
        reaper.flush();
        assert!(store.open_published(&d).unwrap().is_none());
        assert_eq!(reaper.evictions(), 1);
    }
}
