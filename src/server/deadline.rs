//! A deadline on a connection's first bytes.
//!
//! hyper's HTTP/1 header read timeout starts only once hyper-util's
//! protocol detection is done, and that detection (it reads until the
//! 24-byte HTTP/2 preface is complete or a byte differs from it) has no timer
//! of its own: a connection that sends nothing, or a piece of the preface,
//! would hold one of the [`super::MAX_CONNECTIONS`] slots forever. Wrapped in
//! [`FirstBytes`], reads fail with `TimedOut` once the deadline passes
//! before the first [`PREFACE_LEN`] bytes arrived; after that hyper's own
//! timers apply.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Length of the HTTP/2 connection preface: what protocol detection reads at most.
pub const PREFACE_LEN: usize = 24;

/// An I/O stream whose first [`PREFACE_LEN`] bytes must arrive in time.
pub struct FirstBytes<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
}

impl<T> FirstBytes<T> {
    /// Wrap `inner`; the deadline is `timeout` from now.
    pub fn new(inner: T, timeout: Duration) -> FirstBytes<T> {
        FirstBytes {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            seen: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                this.seen += buf.filled().len() - before;
                if this.seen >= PREFACE_LEN {
                    this.deadline = None;
                }
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request within the header timeout",
                        )));
                    }
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn silent_peers_time_out_and_talkative_ones_do_not() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server, Duration::from_millis(50));
        let mut buf = [0u8; 8];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let (mut client2, server2) = tokio::io::duplex(64);
        let mut s = FirstBytes::new(server2, Duration::from_millis(50));
        client2.write_all(&[b'x'; PREFACE_LEN]).await.unwrap();
        let mut got = [0u8; PREFACE_LEN];
        s.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        client2.write_all(b"later").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later", "no deadline after the first bytes");
        client.shutdown().await.unwrap();
    }
}
