//! The download itself: pump the upstream body (resuming with Range,
//! moving to the next endpoint on a mismatch within the verification hold,
//! or on a trickle below the minimum rate) into two blocking threads, one
//! appending to the temporary file and one hashing, so that hashing runs
//! beside the write and the client's transfer, never in front of them.
//! Then verify (readers get the last byte), fsync, and publish.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::cache::index::{Index, Reservation};
use crate::cache::provenance::{Origin, Pending, Provenance};
use crate::cache::store::Store;
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
    /// Every byte written and the digest matched: readers may take the
    /// last byte. Not yet durable nor published (the fsync runs now).
    Verified {
        /// Total size.
        size: u64,
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

enum Msg {
    Size(u64),
    Data(Bytes),
    /// The verification hold is over: readers may take what is written.
    Release,
    Finish,
}

/// Fetch, verify, publish. Returns the size.
pub(super) async fn run(
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
            let (file, state, released) = (file.clone(), state.clone(), released.clone());
            tokio::task::spawn_blocking(move || write_loop(rx, &file, &state, &released))
        };
        // The hasher gets the same buffers (reference-counted, not copied).
        let (hash_tx, hash_rx) = mpsc::channel::<Bytes>(16);
        let hasher = tokio::task::spawn_blocking(move || hash_loop(hash_rx));
        let mut sources = Vec::new();
        let pipes = Pipes {
            writer: &tx,
            hasher: &hash_tx,
        };
        let pumped = pump(&mut opener, pipes, publish, &mut reservation, &mut sources).await;
        let _ = match &pumped {
            Ok(()) => tx.send(Msg::Finish).await,
            Err(_) => Ok(()),
        };
        drop((tx, hash_tx));
        let written = writer
            .await
            .map_err(|e| Error::Internal(format!("writer task: {e}")))?;
        let actual = hasher
            .await
            .map_err(|e| Error::Internal(format!("hasher task: {e}")))?;
        let written = written.and_then(|n| {
            if &actual == digest {
                Ok(n)
            } else {
                Err(Error::DigestMismatch {
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                })
            }
        });
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
    // The hash proves the bytes: every reader may now take the last one. The
    // fsync below only decides whether the cache keeps them, so no client
    // waits for it; a crash before the rename leaves only a file in tmp/,
    // which start-up removes (README "Crash safety").
    state.send_replace(State::Verified { size });
    let synced = file.clone();
    tokio::task::spawn_blocking(move || synced.sync_data())
        .await
        .map_err(|e| Error::Internal(format!("fsync task: {e}")))??;
    fault_point_before_publish().await;
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

/// Where the pump sends each chunk: the file writer and the hasher.
#[derive(Clone, Copy)]
struct Pipes<'a> {
    writer: &'a mpsc::Sender<Msg>,
    hasher: &'a mpsc::Sender<Bytes>,
}

impl Pipes<'_> {
    async fn send(&self, msg: Msg) -> Result<(), Error> {
        if let Msg::Data(chunk) = &msg {
            self.hasher
                .send(chunk.clone())
                .await
                .map_err(|_| gone("hasher"))?;
        }
        self.writer.send(msg).await.map_err(|_| gone("writer"))
    }
}

/// Move upstream bytes into the writer and the hasher, resuming broken and
/// trickling bodies; every body used is kept in `sources` (to blame on a
/// mismatch).
async fn pump(
    opener: &mut Opener,
    tx: Pipes<'_>,
    publish: &Publish,
    reservation: &mut Option<Reservation>,
    sources: &mut Vec<Body>,
) -> Result<(), Error> {
    let policy = publish.policy;
    let body = opener(0).await?;
    let size = body.size;
    if reservation.is_none() {
        *reservation = size.map(|s| publish.index.reserve(s));
    }
    if let Some(s) = size {
        tx.send(Msg::Size(s)).await?;
    }
    sources.push(body);
    let started = tokio::time::Instant::now();
    let mut hold = (!policy.verify_hold.is_zero()).then(|| started + policy.verify_hold);
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
        if hold.is_some_and(|h| {
            tokio::time::Instant::now() >= h || outlasts(started, h, received, size)
        }) {
            hold = None;
            tx.send(Msg::Release).await?;
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
                tx.send(Msg::Data(chunk)).await?;
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

/// Whether a download that started at `start` and has `received` of `size`
/// bytes will still be running when the hold ends at `until`. Then the hold
/// cannot verify it before its first byte leaves and would only delay every
/// reader, so it ends at once and the bytes stream while they arrive.
fn outlasts(
    start: tokio::time::Instant,
    until: tokio::time::Instant,
    received: u64,
    size: Option<u64>,
) -> bool {
    let now = tokio::time::Instant::now();
    let (Some(size), elapsed) = (size, now - start) else {
        return false;
    };
    // An early rate is trusted only by a wide margin: after 2 % of the hold
    // the download must need 5x the hold, after 10 % and later 1x.
    let hold = until - start;
    if received == 0 || elapsed < hold / 50 {
        return false;
    }
    let margin = (hold.as_secs_f64() / 10.0 / elapsed.as_secs_f64()).max(1.0);
    elapsed.mul_f64(size as f64 / received as f64) > hold.mul_f64(margin)
}

fn gone(what: &str) -> Error {
    Error::Internal(format!("cache {what} stopped"))
}

/// Blocking side: write and announce progress. Until `released`, readers
/// are told nothing is written yet. Verification is [`hash_loop`]'s.
fn write_loop(
    mut rx: mpsc::Receiver<Msg>,
    file: &File,
    state: &watch::Sender<State>,
    released: &AtomicBool,
) -> Result<u64, Error> {
    let mut size = None;
    let mut written = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Msg::Size(s) => {
                size = Some(s);
                let visible = if released.load(Ordering::Acquire) {
                    written
                } else {
                    0
                };
                state.send_replace(State::Streaming {
                    size: s,
                    written: visible,
                });
            }
            Msg::Data(chunk) => {
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
            // Unknown length: readers saw nothing yet; they get it all once
            // verified.
            Msg::Finish => return Ok(written),
        }
    }
    Err(Error::UpstreamFailed("download aborted".into()))
}

/// Blocking side: the sha256 of every chunk, in order.
fn hash_loop(mut rx: mpsc::Receiver<Bytes>) -> Digest {
    let mut hasher = Digester::default();
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
    }
    hasher.finish()
}

/// Test builds only: `BERTH_FAULT_PAUSE_BEFORE_PUBLISH_MS` holds a verified,
/// fsynced download before its rename, so the crash tests can kill berth
/// after a client got the last byte and before the blob is published.
async fn fault_point_before_publish() {
    if cfg!(debug_assertions) {
        if let Some(ms) = std::env::var("BERTH_FAULT_PAUSE_BEFORE_PUBLISH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}
