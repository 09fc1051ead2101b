//! Closing connections that idle or stop reading.
//!
//! hyper has a header read timeout for HTTP/1 but nothing for a connection
//! that, once its request is in, just sits there: an HTTP/2 connection
//! that sent its preface and nothing else, a keep-alive connection nobody
//! reuses, or a client that asked for a 1 GiB blob and stopped reading (its
//! socket buffer full, or, over HTTP/2, its flow-control window never
//! reopened). Each would hold one of the [`super::MAX_CONNECTIONS`] slots,
//! a file descriptor and possibly a mapping forever.
//!
//! [`Activity`] is shared by a connection's I/O ([`super::conn::Conn`])
//! and its responses ([`Tracked`] bodies) and decides:
//! - **stalled**: a response has bytes the client does not take: a socket
//!   write has been blocked for the send timeout, or a body frame (at most
//!   [`crate::cache::mmap::FRAME`], 1 MiB) handed to hyper has not been taken
//!   for the send timeout (hyper asks for the next frame only once the last
//!   one is nearly written; over HTTP/2 that needs the client to reopen its
//!   flow-control window). The connection is closed. A client slower than one
//!   frame per send timeout (17 KiB/s at the default) counts as stalled.
//!   A response waiting for upstream holds no frame and blocks no write, so
//!   it is never "stalled": the upstream timeouts bound that wait.
//! - **idle**: no request open, no write blocked, and no request begun or
//!   finished and no frame handed out for the idle timeout: the connection
//!   is shut down gracefully (HTTP/2 GOAWAY), as nginx's `keepalive_timeout`
//!   does. Control traffic (HTTP/2 PINGs, SETTINGS, trickled headers) does
//!   not count as activity, so it cannot keep a connection open.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::response::Body;

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing open, nothing moving.
    Idle,
    /// A response the client does not read.
    Stalled,
}

impl Verdict {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Idle => "idle",
            Verdict::Stalled => "stalled",
        }
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// What a connection is doing, updated lock-free by its I/O and bodies.
#[derive(Debug)]
pub struct Activity {
    /// Last time a request began or ended or a body frame was handed out
    /// (ms since [`EPOCH`]).
    last_request: AtomicU64,
    /// Last time a body frame was handed to hyper.
    frame_at: AtomicU64,
    /// Requests being answered (handler running or body not yet dropped).
    open: AtomicUsize,
    /// Body frames handed to hyper and not yet followed by a request for
    /// the next one: bytes waiting for the client.
    pending_frames: AtomicUsize,
    /// When a socket write last returned "would block" without a write
    /// succeeding since (0: not blocked).
    blocked_since: AtomicU64,
}

impl Activity {
    /// A fresh connection, active now.
    pub fn new() -> Arc<Activity> {
        let now = now_ms();
        Arc::new(Activity {
            last_request: AtomicU64::new(now),
            frame_at: AtomicU64::new(now),
            open: AtomicUsize::new(0),
            pending_frames: AtomicUsize::new(0),
            blocked_since: AtomicU64::new(0),
        })
    }

    fn touched(&self) {
        self.last_request.store(now_ms(), Ordering::Relaxed);
    }

    /// A write moved bytes.
    pub(super) fn wrote(&self) {
        self.blocked_since.store(0, Ordering::Relaxed);
    }

    /// A write found the socket full.
    pub(super) fn blocked(&self) {
        // Keep the first time: only a successful write clears it. (`max(1)`:
        // 0 means "not blocked".)
        let _ = self.blocked_since.compare_exchange(
            0,
            now_ms().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A request arrived: the connection is busy until the guard (moved into
    /// the response body by [`Tracked::wrap`]) is dropped.
    pub fn begin(self: &Arc<Self>) -> InUse {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.touched();
        InUse(self.clone())
    }

    /// Requests being answered.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The verdict now, if any.
    pub fn verdict(&self, idle: Duration, send: Duration) -> Option<Verdict> {
        let now = now_ms();
        let since =
            |t: &AtomicU64| Duration::from_millis(now.saturating_sub(t.load(Ordering::Relaxed)));
        let blocked = self.blocked_since.load(Ordering::Relaxed) != 0;
        // The socket takes nothing (HTTP/1, or HTTP/2 with an open window).
        if blocked && since(&self.blocked_since) >= send {
            return Some(Verdict::Stalled);
        }
        // A frame the client does not take (HTTP/2 with a shut window, or a
        // trickle slower than a frame per send timeout).
        if self.pending_frames.load(Ordering::Relaxed) > 0 && since(&self.frame_at) >= send {
            return Some(Verdict::Stalled);
        }
        if self.open() == 0 && !blocked && since(&self.last_request) >= idle {
            return Some(Verdict::Idle);
        }
        None
    }

    /// Resolves when the connection should be closed.
    pub async fn expired(&self, idle: Duration, send: Duration) -> Verdict {
        let tick = (idle.min(send) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            if let Some(v) = self.verdict(idle, send) {
                return v;
            }
        }
    }
}

/// One open request on a connection.
#[derive(Debug)]
pub struct InUse(Arc<Activity>);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.touched();
    }
}

/// A response body that tells its connection's [`Activity`] when it holds
/// bytes the client has not taken yet.
pub struct Tracked {
    inner: Body,
    in_use: InUse,
    frame_out: bool,
}

impl Tracked {
    /// Wrap `inner`; `in_use` lives as long as the body.
    pub fn wrap(inner: Body, in_use: InUse) -> Body {
        http_body_util::BodyExt::boxed_unsync(Tracked {
            inner,
            in_use,
            frame_out: false,
        })
    }

    fn settle(&mut self) {
        if std::mem::take(&mut self.frame_out) {
            self.in_use.0.pending_frames.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Asked for the next frame: the previous one was taken.
        self.settle();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if f.is_data() {
                self.frame_out = true;
                let a = &self.in_use.0;
                a.pending_frames.fetch_add(1, Ordering::Relaxed);
                let now = now_ms();
                a.frame_at.store(now, Ordering::Relaxed);
                a.last_request.store(now, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const IDLE: Duration = Duration::from_millis(100);
    const SEND: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn idle_only_without_open_requests() {
        let a = Activity::new();
        assert_eq!(a.verdict(IDLE, SEND), None);
        let busy = a.begin();
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(
            a.verdict(IDLE, SEND),
            None,
            "a request waiting upstream is not idle"
        );
        drop(busy);
        assert_eq!(
            a.verdict(IDLE, SEND),
            None,
            "finishing a request is activity"
        );
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(a.verdict(IDLE, SEND), Some(Verdict::Idle));
        a.wrote();
        assert_eq!(
            a.verdict(IDLE, SEND),
            Some(Verdict::Idle),
            "control traffic (a PING answered) is not activity"
        );
    }

    #[tokio::test]
    async fn stalled_while_writes_are_blocked_and_never_idle() {
        let a = Activity::new();
        a.blocked();
        tokio::time::sleep(SEND / 2).await;
        a.blocked();
        assert_eq!(a.verdict(IDLE * 100, SEND), None);
        tokio::time::sleep(SEND).await;
        assert_eq!(
            a.verdict(IDLE * 100, SEND),
            Some(Verdict::Stalled),
            "the first block counts"
        );
        a.wrote();
        assert_eq!(a.verdict(IDLE * 100, SEND), None, "a write unblocks");
        a.blocked();
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(
            a.verdict(IDLE, SEND * 100),
            None,
            "a blocked write is not idle, whatever the timeouts"
        );
    }

    #[tokio::test]
    async fn stalled_while_a_frame_waits_for_the_client() {
        let a = Activity::new();
        let body = super::super::response::full(Bytes::from_static(b"data"));
        let mut body = Tracked::wrap(body, a.begin());
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        assert_eq!(a.verdict(IDLE, SEND), None);
        tokio::time::sleep(SEND * 2).await;
        a.wrote();
        assert_eq!(
            a.verdict(IDLE, SEND),
            Some(Verdict::Stalled),
            "other writes do not take the frame"
        );
        assert!(body.frame().await.is_none());
        tokio::time::sleep(SEND * 2).await;
        assert_eq!(
            a.verdict(IDLE, SEND),
            None,
            "the frame was taken; the body is open"
        );
        drop(body);
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(a.verdict(IDLE, SEND), Some(Verdict::Idle));
    }
}
