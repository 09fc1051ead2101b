//! Single-flight downloads with streaming followers.
//!
//! The first request for a missing blob starts one detached fetch task
//! (the *flight*); it does not belong to any client, so it finishes for the
//! others when the client that started it goes away. The task streams the
//! upstream body into a temporary file, hashing as it goes, on a blocking
//! writer thread fed through a bounded channel (network and disk overlap).
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
//! If the upstream body breaks, the fetch resumes with `Range: bytes=N-`
//! (bounded attempts) and readers do not notice.
//!
//! A flight through a private registry is marked in the provenance records
//! before it can be joined, and its record is on disk before the blob is
//! published (see [`super::provenance`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::index::Index;
use super::provenance::{Origin, Pending, Provenance};
use super::store::Store;
use crate::error::Error;
use crate::registry::digest::Digester;
use crate::registry::Digest;

/// How many times a broken upstream body is resumed before the flight fails.
pub const MAX_RESUMES: u32 = 3;

/// Largest slice a reader hands out at once: one bounded body frame.
const READ_CHUNK: u64 = crate::server::response::FRAME as u64;

/// Where a flight stands; readers watch it.
#[derive(Debug, Clone)]
pub enum State {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Size known; `written` bytes are in the file.
    Streaming {
        /// Total size.
        size: u64,
        /// Bytes written so far.
        written: u64,
    },
    /// Verified and published.
    Done {
        /// Total size.
        size: u64,
    },
    /// Failed; nothing was published.
    Failed(Error),
}

/// An upstream body, possibly starting at an offset.
pub struct Body {
    /// Full size of the blob, when the upstream said.
    pub size: Option<u64>,
    /// The bytes from the requested offset on.
    pub stream: BoxStream<'static, Result<Bytes, Error>>,
}

/// Opens the upstream body at a byte offset (0, or where to resume).
pub type Opener = Box<dyn FnMut(u64) -> BoxFuture<'static, Result<Body, Error>> + Send>;

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
                State::Streaming { size, .. } | State::Done { size } => return Ok(*size),
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
        };
        futures_util::stream::unfold(reader, |mut r| async move {
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    // End the stream after the error.
                    r.state = watch::channel(State::Done { size: 0 }).1;
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
}

impl Reader {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, std::io::Error> {
        loop {
            let state = self.state.borrow_and_update().clone();
            let limit = match state {
                State::Failed(e) => {
                    return Err(std::io::Error::other(format!("upstream fetch failed: {e}")))
                }
                State::Done { size } => {
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
                        State::Done { size } | State::Streaming { size, .. } => {
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

/// Everything a fetch task needs to publish its result.
pub struct Publish {
    /// The store to write into.
    pub store: Arc<Store>,
    /// The index to record the result in (and reserve space from).
    pub index: Arc<Index>,
    /// Provenance records of private content.
    pub provenance: Arc<Provenance>,
    /// The registry the download goes through.
    pub origin: Origin,
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
        let flights = self.clone();
        let digest = digest.clone();
        let opener = opener();
        tokio::spawn(async move {
            let result = run(&digest, file, &tmp, &tx, opener, &publish, pending.as_ref()).await;
            // Leave the table first: a request arriving after this sees the
            // index (on success) or starts a fresh flight (on failure).
            flights.map.lock().expect("flights lock").remove(&digest);
            match result {
                Ok(size) => {
                    let _ = tx.send(State::Done { size });
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
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
                    let _ = tx.send(State::Failed(e));
                }
            }
        });
        Ok(Joined::Leader(flight))
    }

    /// The flight for `digest`, if one is running.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.map.lock().expect("flights lock").get(digest).cloned()
    }

    /// Downloads in progress.
    pub fn in_flight(&self) -> usize {
        self.map.lock().expect("flights lock").len()
    }
}

enum Msg {
    Size(u64),
    Data(Bytes),
    Finish,
}

/// Fetch, verify, publish. Returns the size.
async fn run(
    digest: &Digest,
    file: Arc<File>,
    tmp: &std::path::Path,
    state: &watch::Sender<State>,
    mut opener: Opener,
    publish: &Publish,
    pending: Option<&Pending>,
) -> Result<u64, Error> {
    // Bounded so a slow disk or hasher applies back-pressure to the
    // download instead of buffering it in memory.
    let (tx, rx) = mpsc::channel::<Msg>(16);
    let writer = {
        let (file, state, expected) = (file.clone(), state.clone(), digest.clone());
        tokio::task::spawn_blocking(move || write_loop(rx, &file, &state, &expected))
    };
    // Space for the download stays reserved until it is published.
    let mut reservation = None;
    let pumped = pump(&mut opener, &tx, publish, &mut reservation).await;
    let _ = match &pumped {
        Ok(()) => tx.send(Msg::Finish).await,
        Err(_) => Ok(()),
    };
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::Internal(format!("writer task: {e}")))?;
    // A local write failure (disk full) is the real cause even if the pump
    // then saw the writer go away.
    let size = match (pumped, written) {
        (_, Err(e @ Error::Io(_))) => return Err(e),
        (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
        (Ok(()), Ok(size)) => size,
    };
    if let Some(p) = pending {
        // The record is durable before the blob is visible.
        let (prov, p) = (publish.provenance.clone(), p.clone());
        tokio::task::spawn_blocking(move || prov.commit(&p))
            .await
            .map_err(|e| Error::Internal(format!("provenance task: {e}")))??;
    }
    let (store, tmp_owned, d) = (publish.store.clone(), PathBuf::from(tmp), digest.clone());
    let ino = tokio::task::spawn_blocking(move || store.publish(&tmp_owned, &d))
        .await
        .map_err(|e| Error::Internal(format!("publish task: {e}")))??;
    // Swap the reservation for the published entry (the file is already in
    // blobs/, so the disk never held more than was accounted).
    drop(reservation);
    publish.index.insert(digest.clone(), size, ino);
    if !publish.origin.private && publish.provenance.learns(digest, &publish.origin) {
        // A public registry served it: it is not private content. A record
        // left behind by an error only costs a HEAD later.
        let (prov, d, origin) = (
            publish.provenance.clone(),
            digest.clone(),
            publish.origin.clone(),
        );
        let done = tokio::task::spawn_blocking(move || prov.served_by(&d, &origin)).await;
        if let Ok(Err(error)) = done {
            tracing::warn!(%digest, %error, "could not drop a provenance record");
        }
    }
    Ok(size)
}

/// Move upstream bytes into the writer, resuming broken bodies.
async fn pump(
    opener: &mut Opener,
    tx: &mpsc::Sender<Msg>,
    publish: &Publish,
    reservation: &mut Option<super::index::Reservation>,
) -> Result<(), Error> {
    let mut body = opener(0).await?;
    let size = body.size;
    *reservation = size.map(|s| publish.index.reserve(s));
    if let Some(s) = size {
        tx.send(Msg::Size(s)).await.map_err(|_| writer_gone())?;
    }
    let mut received = 0u64;
    let mut resumes = 0u32;
    loop {
        let broken = match body.stream.next().await {
            Some(Ok(chunk)) => {
                received += chunk.len() as u64;
                if size.is_some_and(|s| received > s) {
                    return Err(Error::UpstreamFailed(
                        "upstream sent more bytes than its Content-Length".into(),
                    ));
                }
                tx.send(Msg::Data(chunk)).await.map_err(|_| writer_gone())?;
                continue;
            }
            Some(Err(e)) => e,
            None if size.is_none_or(|s| received == s) => return Ok(()),
            None => Error::UpstreamFailed(format!(
                "upstream body ended at {received} of {} bytes",
                size.unwrap_or(0)
            )),
        };
        resumes += 1;
        if resumes > MAX_RESUMES {
            return Err(broken);
        }
        tracing::debug!(error = %broken, received, resumes, "upstream body broke; resuming with Range");
        tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes))).await;
        body = opener(received).await?;
        if body.size.is_some() && size.is_some() && body.size != size {
            return Err(Error::UpstreamFailed(
                "blob size changed while resuming".into(),
            ));
        }
    }
}

fn writer_gone() -> Error {
    Error::Internal("cache writer stopped".into())
}

/// Blocking side: hash, write, announce progress; verify at the end.
fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    file: &File,
    state: &watch::Sender<State>,
    expected: &Digest,
) -> Result<u64, Error> {
    let mut hasher = Digester::default();
    let mut size = None;
    let mut written = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Size(s) => {
                size = Some(s);
                state.send_replace(State::Streaming { size: s, written });
            }
            Msg::Data(chunk) => {
                hasher.update(&chunk);
                // Positional: the file is shared with readers and sendfile,
                // and the append-only rule must not depend on its offset.
                file.write_all_at(&chunk, written)?;
                written += chunk.len() as u64;
                if let Some(s) = size {
                    state.send_replace(State::Streaming { size: s, written });
                }
            }
            Msg::Finish => {
                file.sync_data()?;
                let actual = hasher.finish();
                if &actual != expected {
                    return Err(Error::DigestMismatch {
                        expected: expected.to_string(),
                        actual: actual.to_string(),
                    });
                }
                if size.is_none() {
                    // Unknown length: readers saw nothing yet; they get it all at Done.
                    state.send_replace(State::Streaming {
                        size: written,
                        written,
                    });
                }
                return Ok(written);
            }
        }
    }
    Err(Error::UpstreamFailed("download aborted".into()))
}
