//! Plain-TCP writes of mapped cache content through `sendfile(2)`.
//!
//! Cache hits reach hyper as slices of a file mapping ([`crate::cache::mmap`]),
//! so HTTP/1 and HTTP/2 framing, Range and keep-alive stay hyper's business.
//! When hyper then writes such a slice to a plain TCP socket, [`Zerocopy`]
//! recognises it ([`crate::cache::mmap::locate`]) and asks the kernel to send
//! the same bytes straight from the file at the same offset, as nginx and
//! distribution do: no copy through user space and no page faults on the
//! mapping, which roughly halves the CPU a warm hit costs. The bytes are the
//! same by the cache's invariant (published files are never written again;
//! a download's file is only appended to, and only written bytes are
//! sliced). Everything else (headers, JSON) is written as usual, in one
//! `writev` up to the first large mapped slice; mapped slices under
//! [`MIN_SENDFILE`] (HTTP/2 DATA frames are 16 KiB) are copied along with it,
//! where a syscall per slice would cost more than the copy. TLS connections
//! encrypt in user space and do not use this path.
//!
//! Like nginx's `tcp_nopush`, the socket is corked (`TCP_CORK`) from the
//! headers in front of mapped content until hyper flushes: the kernel sends
//! full segments, headers included, instead of one per write (the
//! connection keeps `TCP_NODELAY` for everything else). A filesystem that
//! cannot feed `sendfile` falls back to copying.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustix::io::Errno;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::cache::mmap;

/// Most bytes handed to one `sendfile` call (the kernel caps a call a little
/// below 2 GiB anyway; smaller calls let other connections on the worker run).
const MAX_SENDFILE: usize = 16 << 20;
/// Mapped slices shorter than this are copied with the bytes around them.
pub const MIN_SENDFILE: usize = 64 << 10;
/// Bytes one connection may write before it yields its worker. A client
/// that reads as fast as loopback lets a body's writes succeed for as long
/// as tokio's budget lasts (128 writes: 128 MiB of `sendfile`, tens of
/// milliseconds), and every other connection on the worker, such as a
/// cached manifest answer, waits that long; and when a download releases
/// its bytes to 32 waiting clients at once, the last one's first byte waits
/// for everyone's turn. A content body goes out in 1 MiB slices, so this is
/// a yield after every slice (a fraction of a millisecond of `sendfile`);
/// the yield costs one task switch.
const YIELD_AFTER: usize = 1 << 20;

/// A TCP stream that sends mapped cache content with `sendfile(2)`.
pub struct Zerocopy {
    inner: TcpStream,
    corked: bool,
    /// `sendfile` refused this connection's files once: copy from now on.
    copy_only: bool,
    /// Bytes written since this connection last yielded its worker.
    since_yield: usize,
}

impl Zerocopy {
    /// Wrap an accepted connection.
    pub fn new(inner: TcpStream) -> Zerocopy {
        Zerocopy {
            inner,
            corked: false,
            copy_only: false,
            since_yield: 0,
        }
    }

    /// Yield the worker once [`YIELD_AFTER`] bytes went out since the last
    /// yield; `yield_now` defers the wake-up until the I/O driver was
    /// polled, so the connections it makes ready run first.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.since_yield < YIELD_AFTER {
            return Poll::Ready(());
        }
        self.since_yield = 0;
        let turn = std::pin::pin!(tokio::task::yield_now());
        turn.poll(cx)
    }

    /// Count what a write sent toward the next yield.
    fn sent(&mut self, r: io::Result<usize>) -> Poll<io::Result<usize>> {
        if let Ok(n) = r {
            self.since_yield += n;
        }
        Poll::Ready(r)
    }

    /// The file and offset behind `buf`, if it is worth a `sendfile`.
    fn mapped(&self, buf: &[u8]) -> Option<(std::sync::Arc<std::fs::File>, u64)> {
        if self.copy_only || buf.len() < MIN_SENDFILE {
            return None;
        }
        mmap::locate(buf)
    }

    fn cork(&mut self, on: bool) {
        if self.corked != on {
            // Best effort: a failure only costs segment efficiency.
            let _ = rustix::net::sockopt::set_tcp_cork(&self.inner, on);
            self.corked = on;
        }
    }

    /// Send `buf` (a mapped slice of `file` at `offset`) with `sendfile`;
    /// copy it instead if the kernel cannot.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        file: &std::fs::File,
        offset: u64,
    ) -> Poll<io::Result<usize>> {
        let len = buf.len().min(MAX_SENDFILE);
        self.cork(true);
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let mut at = offset;
            match self.inner.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, file, Some(&mut at), len).map_err(io::Error::from)
            }) {
                // The file ended before the mapping did: only possible if the
                // cache invariant was broken behind berth's back. The body
                // serving it sees the mark and quarantines the entry.
                Ok(0) => {
                    if let Some(poison) = mmap::watch(buf) {
                        poison.set();
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cache file shorter than its mapping",
                    )));
                }
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e)
                    if matches!(
                        Errno::from_io_error(&e),
                        Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP)
                    ) =>
                {
                    // The filesystem cannot feed sendfile: the mapped bytes
                    // are just as good to copy.
                    tracing::debug!(error = %e, "sendfile unavailable; copying");
                    self.copy_only = true;
                    return Pin::new(&mut self.inner).poll_write(cx, buf);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// A copy from a mapping faulted in the kernel (`EFAULT`: its file was
/// truncated behind berth's back): mark the mappings, so that the body
/// serving them quarantines the entry.
fn poison_on_fault(e: &io::Error, bufs: &[IoSlice<'_>]) {
    if Errno::from_io_error(e) != Some(Errno::FAULT) {
        return;
    }
    for b in bufs {
        if let Some(poison) = mmap::watch(b) {
            poison.set();
        }
    }
}

impl AsyncRead for Zerocopy {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Zerocopy {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_turn(cx));
        if let Some((file, offset)) = self.mapped(buf) {
            let sent = ready!(self.poll_sendfile(cx, buf, &file, offset));
            return self.sent(sent);
        }
        let sent = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.sent(sent.inspect_err(|e| poison_on_fault(e, &[IoSlice::new(buf)])))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        ready!(self.poll_turn(cx));
        if let Some((file, offset)) = self.mapped(&bufs[first]) {
            let sent = ready!(self.poll_sendfile(cx, &bufs[first], &file, offset));
            return self.sent(sent);
        }
        // Plain bytes up to the next mapped slice, which the next call sends.
        let end = bufs[first..]
            .iter()
            .position(|b| self.mapped(b).is_some())
            .map_or(bufs.len(), |p| first + p);
        if end < bufs.len() {
            // Headers in front of mapped content: one segment with it.
            self.cork(true);
        }
        let sent = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[first..end]));
        self.sent(sent.inspect_err(|e| poison_on_fault(e, &bufs[first..end])))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything queued was written: send the last partial segment now.
        self.cork(false);
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn mapped_and_plain_bytes_arrive_in_order() {
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::cache::store::Store::open(dir.path()).unwrap();
        let d = crate::registry::Digest::of(&content);
        store.publish_bytes(&d, &content).unwrap();
        let mapped = mmap::map(store.open_published(&d).unwrap().unwrap()).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let (s, _) = listener.accept().await.unwrap();
        let mut z = Zerocopy::new(s);
        let head = b"HEAD-BYTES".to_vec();
        let part = mapped.slice(1000..2_500_000);
        let tail = b"tail".to_vec();
        let mut bufs: Vec<&[u8]> = vec![&head, &part, &tail, &mapped[..10]];
        // writev semantics: partial writes, the caller advances.
        while !bufs.is_empty() {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = z.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            while n > 0 {
                if n >= bufs[0].len() {
                    n -= bufs[0].len();
                    bufs.remove(0);
                } else {
                    bufs[0] = &bufs[0][n..];
                    n = 0;
                }
            }
        }
        z.shutdown().await.unwrap();
        drop(z);
        let got = reader.await.unwrap();
        let mut want = head.clone();
        want.extend_from_slice(&content[1000..2_500_000]);
        want.extend_from_slice(&tail);
        want.extend_from_slice(&content[..10]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
    }
}
