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
//! served the bytes is then asked last for that blob.
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
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::index::Index;
use super::provenance::{Origin, Pending, Provenance};
use super::store::Store;
use crate::error::Error;
use crate::registry::digest::Digester;
use crate::registry::Digest;
use crate::transfer::{Body, Fault};

/// How many times a broken upstream body is resumed before the flight fails.
pub const MAX_RESUMES: u32 = 3;

/// How many times a download held back for verification starts over from
/// another endpoint after its bytes failed verification.
const MAX_RESTARTS: u32 = 3;

/// How a download treats unverified and slow bytes.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Hand out nothing for this long after the upstream answered, so a
    /// blob that arrives within it is verified before any byte leaves.
    pub verify_hold: Duration,
    /// Bytes per second a body must average over each `rate_window`
    /// (0: no minimum).
    pub min_rate: u64,
    /// The window `min_rate` is measured over.
    pub rate_window: Duration,
}

/// Default [`Policy::verify_hold`].
pub const DEFAULT_VERIFY_HOLD: Duration = Duration::from_secs(1);
/// Default [`Policy::min_rate`] (bytes per second).
pub const DEFAULT_MIN_RATE: u64 = 16 * 1024;

impl Default for Policy {
    /// The defaults `berth serve` uses (its rate window is the read timeout).
    fn default() -> Policy {
        Policy {
            verify_hold: DEFAULT_VERIFY_HOLD,
            min_rate: DEFAULT_MIN_RATE,
            rate_window: Duration::from_secs(30),
        }
    }
}

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
    /// Verification hold and minimum rate.
    pub policy: Policy,
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

enum Msg {
    Size(u64),
    Data(Bytes),
    /// The verification hold is over: readers may take what is written.
    Release,
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
    // Space for the download stays reserved until it is published.
    let mut reservation = None;
    // Set by the writer once readers may see bytes; from then on a failed
    // attempt can no longer be retried unseen.
    let released = Arc::new(AtomicBool::new(publish.policy.verify_hold.is_zero()));
    let mut restarts = 0;
    let size = loop {
        // Bounded so a slow disk or hasher applies back-pressure to the
        // download instead of buffering it in memory.
        let (tx, rx) = mpsc::channel::<Msg>(16);
        let writer = {
            let (file, state, expected) = (file.clone(), state.clone(), digest.clone());
            let released = released.clone();
            tokio::task::spawn_blocking(move || write_loop(rx, &file, &state, &expected, &released))
        };
        let mut sources = Vec::new();
        let pumped = pump(&mut opener, &tx, publish, &mut reservation, &mut sources).await;
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
        match (pumped, written) {
            (_, Err(e @ Error::Io(_))) => return Err(e),
            (Err(e), _) => return Err(e),
            (Ok(()), Err(e @ Error::DigestMismatch { .. })) => {
                let mut another = false;
                for s in &sources {
                    another |= s.blame(Fault::Mismatch);
                }
                restarts += 1;
                if released.load(Ordering::Acquire) || !another || restarts > MAX_RESTARTS {
                    return Err(e);
                }
                // Nobody has seen a byte: start over, the next endpoint first.
                tracing::warn!(%digest, error = %e, "upstream blob failed verification before any byte was served; fetching it again");
                file.set_len(0)?;
                continue;
            }
            (Ok(()), Err(e)) => return Err(e),
            (Ok(()), Ok(size)) => break size,
        }
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

/// Counts a body's bytes per window against the minimum rate.
struct Rate {
    policy: Policy,
    since: tokio::time::Instant,
    bytes: u64,
}

impl Rate {
    fn new(policy: Policy) -> Rate {
        Rate {
            policy,
            since: tokio::time::Instant::now(),
            bytes: 0,
        }
    }

    /// When the current window closes (never without a minimum).
    fn deadline(&self) -> Option<tokio::time::Instant> {
        (self.policy.min_rate > 0).then(|| self.since + self.policy.rate_window)
    }

    /// Close the window if it is over: an error if it fell short.
    fn check(&mut self) -> Result<(), Error> {
        let Some(deadline) = self.deadline() else {
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        if now < deadline {
            return Ok(());
        }
        let window = now - self.since;
        let need = (self.policy.min_rate as f64 * window.as_secs_f64()) as u64;
        if self.bytes < need {
            return Err(Error::UpstreamFailed(format!(
                "upstream body too slow: {} bytes in {:.1} s, below the minimum of {} bytes/s",
                self.bytes,
                window.as_secs_f64(),
                self.policy.min_rate
            )));
        }
        self.since = now;
        self.bytes = 0;
        Ok(())
    }
}

/// Move upstream bytes into the writer, resuming broken and trickling
/// bodies; every body used is kept in `sources` (to blame on a mismatch).
async fn pump(
    opener: &mut Opener,
    tx: &mpsc::Sender<Msg>,
    publish: &Publish,
    reservation: &mut Option<super::index::Reservation>,
    sources: &mut Vec<Body>,
) -> Result<(), Error> {
    let policy = publish.policy;
    let body = opener(0).await?;
    let size = body.size;
    if reservation.is_none() {
        *reservation = size.map(|s| publish.index.reserve(s));
    }
    if let Some(s) = size {
        tx.send(Msg::Size(s)).await.map_err(|_| writer_gone())?;
    }
    sources.push(body);
    let mut hold =
        (!policy.verify_hold.is_zero()).then(|| tokio::time::Instant::now() + policy.verify_hold);
    let mut rate = Rate::new(policy);
    let mut received = 0u64;
    let mut resumes = 0u32;
    loop {
        let body = sources.last_mut().expect("a body");
        let wake = match (hold, rate.deadline()) {
            (Some(h), Some(r)) => Some(h.min(r)),
            (h, r) => h.or(r),
        };
        let next = match wake {
            Some(at) => tokio::time::timeout_at(at, body.stream.next()).await.ok(),
            None => Some(body.stream.next().await),
        };
        if hold.is_some_and(|h| tokio::time::Instant::now() >= h) {
            hold = None;
            tx.send(Msg::Release).await.map_err(|_| writer_gone())?;
        }
        let broken = match next {
            // A timer fired: only the rate window may be over.
            None => None,
            Some(Some(Ok(chunk))) => {
                received += chunk.len() as u64;
                rate.bytes += chunk.len() as u64;
                if size.is_some_and(|s| received > s) {
                    return Err(Error::UpstreamFailed(
                        "upstream sent more bytes than its Content-Length".into(),
                    ));
                }
                tx.send(Msg::Data(chunk)).await.map_err(|_| writer_gone())?;
                None
            }
            Some(Some(Err(e))) => Some(e),
            Some(None) if size.is_none_or(|s| received == s) => return Ok(()),
            Some(None) => Some(Error::UpstreamFailed(format!(
                "upstream body ended at {received} of {} bytes",
                size.unwrap_or(0)
            ))),
        };
        let broken = match broken {
            Some(e) => e,
            None => match rate.check() {
                Ok(()) => continue,
                Err(e) => {
                    let _ = body.blame(Fault::TooSlow);
                    e
                }
            },
        };
        resumes += 1;
        if resumes > MAX_RESUMES {
            return Err(broken);
        }
        tracing::debug!(error = %broken, received, resumes, "upstream body broke; resuming with Range");
        tokio::time::sleep(Duration::from_millis(100 * u64::from(resumes))).await;
        let body = opener(received).await?;
        if body.size.is_some() && size.is_some() && body.size != size {
            return Err(Error::UpstreamFailed(
                "blob size changed while resuming".into(),
            ));
        }
        sources.push(body);
        rate = Rate::new(policy);
    }
}

fn writer_gone() -> Error {
    Error::Internal("cache writer stopped".into())
}

/// Blocking side: hash, write, announce progress; verify at the end.
/// Until `released`, readers are told nothing is written yet.
fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    file: &File,
    state: &watch::Sender<State>,
    expected: &Digest,
    released: &AtomicBool,
) -> Result<u64, Error> {
    let mut hasher = Digester::default();
    let mut size = None;
    let mut written = 0u64;
    let visible = |written: u64| {
        if released.load(Ordering::Acquire) {
            written
        } else {
            0
        }
    };
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Size(s) => {
                size = Some(s);
                state.send_replace(State::Streaming {
                    size: s,
                    written: visible(written),
                });
            }
            Msg::Data(chunk) => {
                hasher.update(&chunk);
                // Positional: the file is shared with readers and sendfile,
                // and the append-only rule must not depend on its offset.
                file.write_all_at(&chunk, written)?;
                written += chunk.len() as u64;
                if let (Some(s), true) = (size, released.load(Ordering::Acquire)) {
                    state.send_replace(State::Streaming { size: s, written });
                }
            }
            Msg::Release => {
                released.store(true, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::transfer::Blame;
    use std::sync::atomic::AtomicUsize;

    fn cache(policy: Policy) -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Cache::open(dir.path(), 1 << 30, Default::default()).unwrap();
        cache.flight_policy = policy;
        (dir, cache)
    }

    fn publish(cache: &Cache) -> Publish {
        cache.publisher(Origin {
            registry: "docker.io".parse().unwrap(),
            private: false,
        })
    }

    fn body(bytes: Vec<u8>, blame: Option<Blame>) -> Body {
        let size = Some(bytes.len() as u64);
        let stream = futures_util::stream::iter([Ok(Bytes::from(bytes))]).boxed();
        Body {
            size,
            stream,
            blame,
        }
    }

    async fn read_all(f: &Flight, size: u64) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(f.read(0, size));
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    fn leader(j: Result<Joined, Error>) -> Arc<Flight> {
        match j.unwrap() {
            Joined::Leader(f) => f,
            _ => panic!("expected to start the flight"),
        }
    }

    /// An opener serving corrupt bytes first (blaming records it), then good ones.
    fn corrupt_then_good(good: Vec<u8>, blamed: Arc<AtomicUsize>) -> Opener {
        let calls = Arc::new(AtomicUsize::new(0));
        Box::new(move |_offset| {
            let (good, blamed) = (good.clone(), blamed.clone());
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                let mut bytes = good;
                let blame: Option<Blame> = first.then(|| {
                    bytes[0] ^= 0xff;
                    Box::new(move |f: Fault| {
                        assert_eq!(f, Fault::Mismatch);
                        blamed.fetch_add(1, Ordering::SeqCst);
                        true
                    }) as Blame
                });
                Ok(body(bytes, blame))
            })
        })
    }

    #[tokio::test]
    async fn a_mismatch_within_the_hold_is_fetched_again_unseen() {
        let (_dir, cache) = cache(Policy {
            verify_hold: Duration::from_secs(5),
            ..Policy::default()
        });
        let good = b"the good bytes of a blob".to_vec();
        let digest = Digest::of(&good);
        let blamed = Arc::new(AtomicUsize::new(0));
        let opener = corrupt_then_good(good.clone(), blamed.clone());
        let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
        let size = f.size().await.unwrap();
        assert_eq!(
            read_all(&f, size).await.unwrap(),
            good,
            "readers saw only good bytes"
        );
        assert_eq!(f.finished().await.unwrap(), good.len() as u64);
        assert_eq!(
            blamed.load(Ordering::SeqCst),
            1,
            "the bad source was blamed"
        );
        assert!(cache.index.contains(&digest));
    }

    #[tokio::test]
    async fn a_mismatch_after_the_hold_fails_the_readers_and_blames_the_source() {
        let (_dir, cache) = cache(Policy {
            verify_hold: Duration::ZERO,
            ..Policy::default()
        });
        let good = b"the good bytes of another blob".to_vec();
        let digest = Digest::of(&good);
        let blamed = Arc::new(AtomicUsize::new(0));
        let opener = corrupt_then_good(good.clone(), blamed.clone());
        let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
        let size = f.size().await.unwrap();
        assert!(read_all(&f, size).await.is_err());
        assert!(matches!(
            f.finished().await,
            Err(Error::DigestMismatch { .. })
        ));
        assert_eq!(blamed.load(Ordering::SeqCst), 1);
        assert!(!cache.index.contains(&digest));
    }

    #[tokio::test]
    async fn a_trickling_body_moves_on_after_the_rate_window() {
        let (_dir, cache) = cache(Policy {
            verify_hold: Duration::ZERO,
            min_rate: 10_000,
            rate_window: Duration::from_millis(300),
        });
        let good = pseudo(64 * 1024);
        let digest = Digest::of(&good);
        let slow = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let (g, s2) = (good.clone(), slow.clone());
        let opener: Opener = Box::new(move |offset| {
            let (good, slow) = (g.clone(), s2.clone());
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                let size = Some(good.len() as u64);
                let rest = Bytes::from(good).slice(offset as usize..);
                if first {
                    // One byte, then nothing more: a trickle.
                    let stream = futures_util::stream::iter([Ok(rest.slice(..1))])
                        .chain(futures_util::stream::pending())
                        .boxed();
                    let blame: Blame = Box::new(move |f| {
                        assert_eq!(f, Fault::TooSlow);
                        slow.fetch_add(1, Ordering::SeqCst);
                        true
                    });
                    Ok(Body {
                        size,
                        stream,
                        blame: Some(blame),
                    })
                } else {
                    let stream = futures_util::stream::iter([Ok(rest)]).boxed();
                    Ok(Body {
                        size,
                        stream,
                        blame: None,
                    })
                }
            })
        });
        let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
        let done = tokio::time::timeout(Duration::from_secs(10), f.finished()).await;
        assert_eq!(done.expect("not held forever").unwrap(), good.len() as u64);
        assert_eq!(
            slow.load(Ordering::SeqCst),
            1,
            "the trickling source was blamed"
        );
    }

    #[tokio::test]
    async fn a_panicking_download_leaves_the_table() {
        let (_dir, cache) = cache(Policy::default());
        let good = b"panic-free bytes".to_vec();
        let digest = Digest::of(&good);
        let opener: Opener = Box::new(|_| Box::pin(async { panic!("injected") }));
        let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
        assert!(f.finished().await.is_err(), "readers get an error");
        assert!(
            cache.flights.get(&digest).is_none(),
            "the entry left the table"
        );
        let g = good.clone();
        let opener: Opener = Box::new(move |_| {
            let g = g.clone();
            Box::pin(async move { Ok(body(g, None)) })
        });
        let f = leader(cache.flights.join(&digest, publish(&cache), || opener));
        assert_eq!(f.finished().await.unwrap(), good.len() as u64);
    }

    fn pseudo(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }
}
