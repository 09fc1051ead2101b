//! Single-flight downloads with streaming followers.
//!
//! The first request for a missing blob starts one detached fetch task
//! (the *flight*); it does not belong to any client, so it finishes for the
//! others when the client that started it goes away. The task streams the
//! upstream body into a temporary file on a blocking writer thread, and
//! hashes it on a second one, both fed through bounded channels (network,
//! disk and hashing overlap).
//! After every write it publishes the new length on a `watch` channel.
//!
//! Every client, the first one included, is a *reader* of the growing file:
//! it takes whatever has been written, as a slice of a mapping of the file
//! (no copy; on plain TCP it leaves by `sendfile`), then waits for more. A reader's
//! Range is served as soon as its offset is present. The last byte of the
//! blob is held back until the digest has been verified, so no client can
//! receive a complete but corrupt blob: on a mismatch or a final upstream
//! failure every reader's body ends in an error (hyper then aborts the
//! connection) and nothing is published.
//!
//! For the first moments of a download (`verify_hold`, 1 s by default) no
//! byte is handed out at all: a blob that completes within it is verified
//! before its first byte leaves, and one whose bytes fail verification is
//! fetched again from the registry's next endpoint (hub -> origin) without
//! any reader noticing. This matters because containerd keeps whatever bytes
//! it received in its ingest and resumes from them with `Range` (its
//! `remotes/handlers.go` `fetch` even commits a complete ingest without
//! asking again): a corrupt prefix handed to containerd cannot be repaired by
//! any later answer until containerd's garbage collector drops that ingest.
//! Past the hold, bytes stream as they arrive (a large blob on a slow link
//! must make progress), and a mismatch aborts the readers; the endpoint that
//! served the bytes is then asked last for that blob. A download whose rate
//! shows it will outlast the hold is released at once: the hold could not
//! verify it first, only delay it (an early rate counts only by a margin: 5x
//! the hold after 2 % of it, 1x from a tenth of it on).
//!
//! The last byte leaves as soon as the sha256 matched; the fsync and the
//! rename into the cache follow without any client waiting for them.
//!
//! If the upstream body breaks, the fetch resumes with `Range: bytes=N-`
//! (bounded attempts) and readers do not notice. A body that trickles below
//! the minimum rate (`min_rate` over a `rate_window`) counts as broken: the
//! endpoint is asked last for that blob and the fetch resumes on the next
//! one, or fails once the attempts are used up, instead of holding its
//! readers forever.
//!
//! The table entry of a flight leaves the table however its task ends
//! (success, failure, panic, runtime shutdown): a drop guard removes it and
//! fails its readers, so one bad download never poisons a digest.
//!
//! A flight through a private registry is marked in the provenance records
//! before it can be joined, and its record is on disk before the blob is
//! published (see [`super::provenance`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream::Stream;
use tokio::sync::watch;

mod download;

use crate::error::Error;
use crate::registry::Digest;
use download::run;
pub use download::{
    Opener, Policy, Publish, State, DEFAULT_MIN_RATE, DEFAULT_VERIFY_HOLD, MAX_RESUMES,
};

/// Largest slice a reader hands out at once: one bounded body frame.
const READ_CHUNK: u64 = super::mmap::FRAME as u64;

/// One in-progress download.
pub struct Flight {
    /// What is being fetched.
    pub digest: Digest,
    file: Arc<File>,
    state: watch::Receiver<State>,
}

impl Flight {
    /// Wait until the size is known (or the flight failed).
    pub async fn size(&self) -> Result<u64, Error> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                State::Connecting => {}
                State::Streaming { size, .. } | State::Verified { size } | State::Done { size } => {
                    return Ok(*size)
                }
                State::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("download task vanished".into()));
            }
        }
    }

    /// Wait for the final outcome: the size once published, or the error.
    pub async fn finished(&self) -> Result<u64, Error> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                State::Done { size } => return Ok(*size),
                State::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("download task vanished".into()));
            }
        }
    }

    /// The bytes `[start, end)` as they arrive. The stream ends with an error
    /// if the flight fails.
    pub fn read(
        &self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let reader = Reader {
            file: self.file.clone(),
            state: self.state.clone(),
            pos: start,
            end,
            mapped: None,
            final_size: None,
        };
        futures_util::stream::unfold(reader, |mut r| async move {
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    // End the stream after the error: nothing more to read.
                    r.final_size = Some(0);
                    Some((Err(e), r))
                }
            }
        })
    }
}

struct Reader {
    file: Arc<File>,
    state: watch::Receiver<State>,
    pos: u64,
    end: u64,
    /// The file mapped at its final size; only written bytes are sliced.
    mapped: Option<super::mmap::Growing>,
    /// The size once the bytes are final (verified): from then on the
    /// flight's later state no longer matters to this reader.
    final_size: Option<u64>,
}

impl Reader {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        loop {
            // Once verified, the bytes are final whatever happens to the
            // flight after (a failed fsync only keeps them out of the cache).
            let state = match self.final_size {
                Some(size) => State::Verified { size },
                None => self.state.borrow_and_update().clone(),
            };
            let limit = match state {
                State::Failed(e) => {
                    return Err(std::io::Error::other(format!("upstream fetch failed: {e}")))
                }
                State::Verified { size } | State::Done { size } => {
                    self.final_size = Some(size);
                    let limit = size.min(self.end);
                    if self.pos >= limit {
                        return Ok(None);
                    }
                    limit
                }
                // Hold back the blob's last byte until it is verified.
                State::Streaming { size, written } if self.end >= size => {
                    written.min(size.saturating_sub(1))
                }
                State::Streaming { .. } if self.pos >= self.end => return Ok(None),
                State::Streaming { written, .. } => written.min(self.end),
                State::Connecting => 0,
            };
            if limit > self.pos {
                // Every byte below `limit` is final: a slice of a mapping of
                // the file, no copy (see the growing-file rule in cache::mmap).
                if self.mapped.is_none() {
                    self.mapped = Some(match state {
                        State::Done { size }
                        | State::Verified { size }
                        | State::Streaming { size, .. } => {
                            super::mmap::map_growing(self.file.clone(), size)?
                        }
                        _ => unreachable!("nothing to read before the size is known"),
                    });
                }
                let mapped = self.mapped.as_ref().expect("just mapped");
                let limit = limit.min(self.pos + READ_CHUNK);
                let chunk = mapped.bytes(self.pos, limit)?;
                self.pos = limit;
                return Ok(Some(chunk));
            }
            if self.state.changed().await.is_err()
                && !matches!(&*self.state.borrow(), State::Done { .. } | State::Failed(_))
            {
                return Err(std::io::Error::other("download task vanished"));
            }
        }
    }
}

/// The table of flights in progress. The mutex guards only map operations,
/// never I/O.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

/// Whether the caller started the flight or joined one.
pub enum Joined {
    /// This call started it.
    Leader(Arc<Flight>),
    /// It was already running.
    Follower(Arc<Flight>),
    /// It finished and was published just before: read the cache.
    Published,
}

impl Flights {
    /// Join the flight for `digest`, starting it with `opener` if there is none.
    pub fn join(
        self: &Arc<Self>,
        digest: &Digest,
        publish: Publish,
        opener: impl FnOnce() -> Opener,
    ) -> Result<Joined, Error> {
        if let Some(f) = self.get(digest) {
            return Ok(Joined::Follower(f));
        }
        // Create the temporary file before taking the lock: no I/O under it.
        let (file, tmp) = publish.store.create_tmp().inspect_err(|e| {
            publish.store.note_write_error(e);
        })?;
        let mut map = self.map.lock().expect("flights lock");
        if let Some(f) = map.get(digest) {
            let f = f.clone();
            drop(map);
            let _ = std::fs::remove_file(&tmp);
            return Ok(Joined::Follower(f));
        }
        if publish.index.contains(digest) {
            // Published between the caller's cache lookup and now.
            drop(map);
            let _ = std::fs::remove_file(&tmp);
            return Ok(Joined::Published);
        }
        // Before anyone can join: followers through other registries are
        // checked against this mark (memory only, no I/O under the lock).
        let pending = publish.provenance.begin(digest, &publish.origin);
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(State::Connecting);
        let flight = Arc::new(Flight {
            digest: digest.clone(),
            file: file.clone(),
            state: rx,
        });
        map.insert(digest.clone(), flight.clone());
        drop(map);
        let opener = opener();
        let guard = Leave {
            flights: self.clone(),
            flight: flight.clone(),
            tx,
            tmp,
            finished: false,
        };
        tokio::spawn(async move {
            let mut guard = guard;
            let (digest, file) = (guard.flight.digest.clone(), guard.flight.file.clone());
            let result = run(
                &digest,
                file,
                &guard.tmp,
                &guard.tx,
                opener,
                &publish,
                pending.as_ref(),
            )
            .await;
            // Leave the table first: a request arriving after this sees the
            // index (on success) or starts a fresh flight (on failure).
            guard.leave();
            match result {
                Ok(size) => {
                    let _ = guard.tx.send(State::Done { size });
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&guard.tmp);
                    if let Some(p) = pending {
                        publish.provenance.abandon(p);
                    }
                    if let Error::Io(io) = &e {
                        publish.store.note_write_error(io);
                    }
                    if let Error::DigestMismatch { .. } = e {
                        tracing::warn!(%digest, error = %e, detail = ?e.detail(), "upstream blob failed verification; not cached");
                    } else {
                        tracing::debug!(%digest, error = %e, detail = ?e.detail(), "blob fetch failed");
                    }
                    let _ = guard.tx.send(State::Failed(e));
                }
            }
            guard.finished = true;
        });
        Ok(Joined::Leader(flight))
    }

    /// The flight for `digest`, if one is running.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.map.lock().expect("flights lock").get(digest).cloned()
    }

    /// Wait, at most `limit`, until every download whose bytes are all
    /// verified is published. A client has its last byte before that (the
    /// fsync and rename follow it), so a graceful stop right after a pull
    /// must not drop the blob on the floor.
    pub async fn verified_published(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let verified: Vec<Arc<Flight>> = (self.map.lock().expect("flights lock").values())
                .filter(|f| matches!(*f.state.borrow(), State::Verified { .. }))
                .cloned()
                .collect();
            if verified.is_empty() {
                return;
            }
            for f in verified {
                if tokio::time::timeout_at(deadline, f.finished())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }

    /// Downloads in progress.
    pub fn in_flight(&self) -> usize {
        self.map.lock().expect("flights lock").len()
    }
}

/// Owns a flight's table entry and state sender for its task. However the
/// task ends (a panic, the runtime shutting down) the entry leaves the table
/// and readers get an error, so the digest is never stuck.
struct Leave {
    flights: Arc<Flights>,
    flight: Arc<Flight>,
    tx: watch::Sender<State>,
    tmp: PathBuf,
    finished: bool,
}

impl Leave {
    /// Remove this flight (and no later one) from the table.
    fn leave(&self) {
        let mut map = self.flights.map.lock().expect("flights lock");
        if map
            .get(&self.flight.digest)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            map.remove(&self.flight.digest);
        }
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.leave();
        let _ = std::fs::remove_file(&self.tmp);
        tracing::error!(digest = %self.flight.digest, "download task ended without an outcome");
        let _ = self.tx.send(State::Failed(Error::Internal(
            "download task ended without an outcome".into(),
        )));
    }
}

#[cfg(test)]
mod tests;
