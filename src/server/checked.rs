//! Bodies of mapped cache content that end in an error, never a complete
//! response, when their file was truncated behind berth's back.
//!
//! A truncated mapped file is answered with zero pages and a poison mark by
//! the SIGBUS handler in [`crate::cache::mmap`], and with a failed
//! `sendfile` on plain TCP (which marks the mapping the same way). A
//! [`Checked`] body checks the marks of the mappings its frames come from
//! before it yields each frame and, once hyper has dropped (written) every
//! frame it handed out, before it ends; a poisoned transfer ends in an
//! error, so hyper aborts the connection or resets the HTTP/2 stream. The
//! first time it sees a mark (also when the connection dies first and the
//! body is dropped) it runs its `on_poison` action, which quarantines the
//! entry so that the next request refetches it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use futures_util::Stream;
use http_body::{Body as HttpBody, Frame};

use crate::cache::mmap::{self, Poison};

/// What to do once a poisoned mapping is seen (quarantine the entry).
pub type OnPoison = Box<dyn FnOnce() + Send>;

/// A body of content slices, checked against the poison mark.
pub struct Checked<S> {
    inner: S,
    watched: Vec<Poison>,
    out: Arc<Outstanding>,
    on_poison: Option<OnPoison>,
    /// `inner` returned its end.
    drained: bool,
    ended: bool,
}

/// Frames handed to hyper and not yet dropped.
#[derive(Default)]
struct Outstanding {
    count: AtomicUsize,
    waker: AtomicWaker,
}

/// A frame's owner: counts as outstanding until hyper drops it.
struct Ticket {
    bytes: Bytes,
    out: Arc<Outstanding>,
}

impl AsRef<[u8]> for Ticket {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.out.count.fetch_sub(1, Ordering::SeqCst);
        self.out.waker.wake();
    }
}

impl<S> Checked<S> {
    /// Check the frames of `inner`; run `on_poison` on the first mark seen.
    pub fn new(inner: S, on_poison: OnPoison) -> Checked<S> {
        Checked {
            inner,
            watched: Vec::new(),
            out: Arc::default(),
            on_poison: Some(on_poison),
            drained: false,
            ended: false,
        }
    }

    fn poisoned(&mut self) -> bool {
        if !self.watched.iter().any(Poison::is_set) {
            return false;
        }
        if let Some(f) = self.on_poison.take() {
            f();
        }
        true
    }

    fn watch(&mut self, b: &Bytes) {
        if b.is_empty() || self.watched.iter().any(|p| p.covers(b)) {
            return;
        }
        if let Some(p) = mmap::watch(b) {
            self.watched.push(p);
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "cache file truncated while being served",
    )
}

impl<S> HttpBody for Checked<S>
where
    S: Stream<Item = io::Result<Bytes>> + Unpin,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.poisoned() {
            this.ended = true;
            return Poll::Ready(Some(Err(truncated())));
        }
        let next = if this.drained {
            Poll::Ready(None)
        } else {
            Pin::new(&mut this.inner).poll_next(cx)
        };
        match next {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Err(e))) => {
                this.ended = true;
                this.poisoned();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(b))) => {
                this.watch(&b);
                if this.watched.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                this.out.count.fetch_add(1, Ordering::SeqCst);
                let out = this.out.clone();
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(Ticket {
                    bytes: b,
                    out,
                })))))
            }
            Poll::Ready(None) => {
                this.drained = true;
                // End only once every frame was written (its bytes read).
                this.out.waker.register(cx.waker());
                if this.out.count.load(Ordering::SeqCst) > 0 {
                    return Poll::Pending;
                }
                this.ended = true;
                if this.poisoned() {
                    return Poll::Ready(Some(Err(truncated())));
                }
                Poll::Ready(None)
            }
        }
    }
}

impl<S> Drop for Checked<S> {
    fn drop(&mut self) {
        // The connection may have died of the truncation first.
        if !self.watched.is_empty() {
            self.poisoned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn plain_memory_passes_through_unchanged() {
        let frames = vec![Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"c"))];
        let body = Checked::new(
            futures_util::stream::iter(frames),
            Box::new(|| panic!("not mapped, never poisoned")),
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abc");
    }
}
