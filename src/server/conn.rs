//! A client connection's I/O: the one layer every read and write of an
//! accepted connection (plain TCP or TLS) passes through.
//!
//! [`Conn`] does three things on the way:
//!
//! - **A deadline on the first bytes.** hyper's HTTP/1 header read timeout
//!   starts only once hyper-util's protocol detection is done, and that
//!   detection (it reads until the 24-byte HTTP/2 preface is complete or a
//!   byte differs from it) has no timer of its own: a connection that sends
//!   nothing, or a piece of the preface, would hold one of the
//!   [`super::MAX_CONNECTIONS`] slots forever. Reads fail with `TimedOut`
//!   once the deadline passes before the first [`PREFACE_LEN`] bytes
//!   arrived; after that hyper's own timers apply.
//! - **Progress for the watchdog.** Every write that moves bytes, and every
//!   write the socket blocks, is reported to the connection's [`Activity`]
//!   ([`super::watchdog`]).
//! - **`sendfile(2)` on plain TCP.** Cache hits reach hyper as slices of a
//!   file mapping ([`crate::cache::mmap`]), so HTTP/1 and HTTP/2 framing,
//!   Range and keep-alive stay hyper's business. When hyper writes such a
//!   slice to a plain TCP socket, it is recognised
//!   ([`crate::cache::mmap::locate`]) and the kernel sends the same bytes
//!   straight from the file at the same offset, as nginx and distribution
//!   do: no copy through user space and no page faults on the mapping,
//!   which roughly halves the CPU a warm hit costs. The bytes are the same
//!   by the cache's invariant (published files are never written again; a
//!   download's file is only appended to, and only written bytes are
//!   sliced). Everything else (headers, JSON) is written as usual, in one
//!   `writev` up to the first large mapped slice; mapped slices under
//!   [`MIN_SENDFILE`] (HTTP/2 DATA frames are 16 KiB) are copied along with
//!   it, where a syscall per slice would cost more than the copy. TLS
//!   encrypts in user space and does not use this path. Like nginx's
//!   `tcp_nopush`, the socket is corked (`TCP_CORK`) from the headers in
//!   front of mapped content until hyper flushes: the kernel sends full
//!   segments, headers included, instead of one per write (the connection
//!   keeps `TCP_NODELAY` for everything else). A filesystem that cannot feed
//!   `sendfile` falls back to copying. A plain connection yields its worker
//!   after each MiB it wrote (`YIELD_AFTER`).

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustix::io::Errno;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::watchdog::Activity;
use crate::cache::mmap;

/// Length of the HTTP/2 connection preface: what protocol detection reads at most.
pub const PREFACE_LEN: usize = 24;
/// Most bytes handed to one `sendfile` call (the kernel caps a call a little
/// below 2 GiB anyway; smaller calls let other connections on the worker run).
const MAX_SENDFILE: usize = 16 << 20;
/// Mapped slices shorter than this are copied with the bytes around them.
pub const MIN_SENDFILE: usize = 64 << 10;
/// Bytes one plain connection may write before it yields its worker. A
/// client that reads as fast as loopback lets a body's writes succeed for
/// as long as tokio's budget lasts (128 writes: 128 MiB of `sendfile`, tens
/// of milliseconds), and every other connection on the worker, such as a
/// cached manifest answer, waits that long; and when a download releases
/// its bytes to 32 waiting clients at once, the last one's first byte waits
/// for everyone's turn. A content body goes out in 1 MiB slices, so this is
/// a yield after every slice (a fraction of a millisecond of `sendfile`);
/// the yield costs one task switch.
const YIELD_AFTER: usize = 1 << 20;

/// What a connection runs over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// The socket, when bytes go to it as they are (`sendfile`, cork, yield).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Transport for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {}

/// An accepted connection's I/O (see the module doc).
pub struct Conn<T> {
    io: T,
    activity: Arc<Activity>,
    /// Until the first [`PREFACE_LEN`] bytes arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
    corked: bool,
    /// `sendfile` refused this connection's files once: copy from now on.
    copy_only: bool,
    /// Bytes written since this connection last yielded its worker.
    since_yield: usize,
}

impl<T: Transport> Conn<T> {
    /// Wrap `io`, reporting to `activity`; the first bytes are due within
    /// `header_timeout` from now.
    pub fn new(io: T, activity: Arc<Activity>, header_timeout: Duration) -> Conn<T> {
        Conn {
            io,
            activity,
            deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
            seen: 0,
            corked: false,
            copy_only: false,
            since_yield: 0,
        }
    }

    /// Tell the watchdog whether a write moved bytes or is blocked.
    fn note(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.wrote(),
            Poll::Pending => self.activity.blocked(),
            _ => {}
        }
        polled
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
    fn mapped(&self, buf: &[u8]) -> Option<(Arc<File>, u64)> {
        if self.copy_only || buf.len() < MIN_SENDFILE || self.io.tcp().is_none() {
            return None;
        }
        mmap::locate(buf)
    }

    fn cork(&mut self, on: bool) {
        if let Some(tcp) = self.io.tcp().filter(|_| self.corked != on) {
            // Best effort: a failure only costs segment efficiency.
            let _ = rustix::net::sockopt::set_tcp_cork(tcp, on);
            self.corked = on;
        }
    }

    /// Send `buf` (a mapped slice of `file` at `offset`) with `sendfile`;
    /// copy it instead if the kernel cannot.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        file: &File,
        offset: u64,
    ) -> Poll<io::Result<usize>> {
        self.cork(true);
        let sent = match self.io.tcp() {
            Some(tcp) => ready!(sendfile(tcp, cx, file, offset, buf.len().min(MAX_SENDFILE))),
            None => return Pin::new(&mut self.io).poll_write(cx, buf),
        };
        match sent {
            // The file ended before the mapping did: only possible if the
            // cache invariant was broken behind berth's back. The body
            // serving it sees the mark and quarantines the entry.
            Ok(0) => {
                mmap::poison(buf);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cache file shorter than its mapping",
                )))
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
                Pin::new(&mut self.io).poll_write(cx, buf)
            }
            r => Poll::Ready(r),
        }
    }

    /// A plain-TCP write: mapped content by `sendfile`, the rest as usual.
    fn poll_plain(
        &mut self,
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
        let sent = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &bufs[first..end]));
        self.sent(sent.inspect_err(|e| poison_on_fault(e, &bufs[first..end])))
    }
}

/// One `sendfile(2)` of `len` bytes of `file` from `offset` to `tcp`, once
/// the socket takes them.
fn sendfile(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    file: &File,
    offset: u64,
    len: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        let mut at = offset;
        match tcp.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(tcp, file, Some(&mut at), len).map_err(io::Error::from)
        }) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            r => return Poll::Ready(r),
        }
    }
}

/// A copy from a mapping faulted in the kernel (`EFAULT`: its file was
/// truncated behind berth's back): mark the mappings, so that the body
/// serving them quarantines the entry.
fn poison_on_fault(e: &io::Error, bufs: &[IoSlice<'_>]) {
    if Errno::from_io_error(e) == Some(Errno::FAULT) {
        bufs.iter().for_each(|b| mmap::poison(b));
    }
}

impl<T: Transport> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
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

impl<T: Transport> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.io.tcp() {
            Some(_) => this.poll_plain(cx, &[IoSlice::new(buf)]),
            None => Pin::new(&mut this.io).poll_write(cx, buf),
        };
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.io.tcp() {
            Some(_) => this.poll_plain(cx, bufs),
            None => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
        };
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.tcp().is_some() || self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Everything queued was written: send the last partial segment now.
        this.cork(false);
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.cork(false);
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    impl Transport for tokio::io::DuplexStream {}

    #[tokio::test]
    async fn silent_peers_time_out_and_talkative_ones_do_not() {
        let timeout = Duration::from_millis(50);
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = Conn::new(server, Activity::new(), timeout);
        let mut buf = [0u8; 8];
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let (mut client2, server2) = tokio::io::duplex(64);
        let mut s = Conn::new(server2, Activity::new(), timeout);
        client2.write_all(&[b'x'; PREFACE_LEN]).await.unwrap();
        let mut got = [0u8; PREFACE_LEN];
        s.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        client2.write_all(b"later").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later", "no deadline after the first bytes");
        client.shutdown().await.unwrap();
    }

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
        let mut z = Conn::new(s, Activity::new(), Duration::from_secs(60));
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
