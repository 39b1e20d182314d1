//! Relaying bytes both ways between a client connection and a backend
//! connection: the splice behind HTTP upgrades (WebSocket) and TCP-mode
//! listeners.
//!
//! Each direction has one buffer and reads only when it is empty, so a peer
//! that does not read holds back the other side (TCP backpressure) and
//! memory stays bounded. The buffer starts at [`BUFFER_BYTES`] (what a
//! WebSocket or an interactive session keeps) and doubles, up to
//! [`MAX_BUFFER_BYTES`], each time a read fills it: a bulk transfer then
//! moves bigger chunks with fewer system calls and wake-ups per byte. Half-close is honoured, as
//! tokio's `copy_bidirectional` and HAProxy do: when one side ends its
//! stream, the other side's write half is shut down after what was read has
//! been written, and the opposite direction keeps flowing until it ends too.
//! The relay is cut when no byte moved either way for the idle timeout
//! (HAProxy `timeout tunnel`, NGINX `proxy_timeout`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first buffer of each direction, in bytes (16 KiB, as HAProxy's
/// `bufsize` and NGINX's `proxy_buffer_size` in `stream`).
pub const BUFFER_BYTES: usize = 16 * 1024;

/// The largest a direction's buffer grows to, in bytes (64 KiB), once reads
/// keep filling it (a bulk transfer).
pub const MAX_BUFFER_BYTES: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides ended their streams (each half-closed, in either order).
    Closed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
}

/// The bytes a relay moved, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes read from the client and written to the backend.
    pub to_backend: u64,
    /// Bytes read from the backend and written to the client.
    pub to_client: u64,
    /// How it ended.
    pub end: RelayEnd,
}

/// Byte counters a relay adds to as bytes are written (metrics).
#[derive(Debug, Clone, Default)]
pub struct RelayCounters {
    /// Client to backend.
    pub to_backend: Counter,
    /// Backend to client.
    pub to_client: Counter,
}

/// One direction: read into the buffer, write it all out, repeat; at the
/// reader's end, flush and shut down the writer.
struct Half {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The last read filled the buffer.
    filled: bool,
    read_done: bool,
    need_flush: bool,
    done: bool,
    total: u64,
}

impl Half {
    fn new() -> Self {
        Self {
            buf: vec![0; BUFFER_BYTES].into_boxed_slice(),
            pos: 0,
            cap: 0,
            filled: false,
            read_done: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    /// Copy until the reader ends (then the writer is shut down: ready) or
    /// would block (pending). `moved` is set when any byte moved.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &Counter,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                self.pos = 0;
                self.cap = 0;
                if self.filled && self.buf.len() < MAX_BUFFER_BYTES {
                    // The last read filled the (now empty) buffer: double it.
                    self.buf =
                        vec![0; (self.buf.len() * 2).min(MAX_BUFFER_BYTES)].into_boxed_slice();
                }
                let mut buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.cap = n;
                            *moved = true;
                            self.filled = n == self.buf.len();
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
                self.need_flush = true;
                counter.inc_by(n as u64);
                *moved = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relay between `client` and `backend` until both have ended their streams,
/// or nothing moved for `idle`.
///
/// # Errors
/// The first read or write error of either side (a reset, a broken pipe);
/// the caller drops both connections.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    idle: Duration,
    counters: &RelayCounters,
) -> io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Half::new();
    let mut down = Half::new();
    let mut last = tokio::time::Instant::now();
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let end = std::future::poll_fn(|cx| {
        let mut moved = false;
        if !up.done {
            let r = up.poll_copy(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *backend),
                &counters.to_backend,
                &mut moved,
            );
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
        }
        if !down.done {
            let r = down.poll_copy(
                cx,
                Pin::new(&mut *backend),
                Pin::new(&mut *client),
                &counters.to_client,
                &mut moved,
            );
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ok(RelayEnd::Closed));
        }
        if moved {
            // Re-armed lazily: the timer is reset only when it fires.
            last = tokio::time::Instant::now();
        }
        while sleep.as_mut().poll(cx).is_ready() {
            let due = last + idle;
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(Ok(RelayEnd::IdleTimeout));
            }
            sleep.as_mut().reset(due);
        }
        Poll::Pending
    })
    .await?;
    Ok(Relayed {
        to_backend: up.total,
        to_client: down.total,
        end,
    })
}

/// A stream whose first reads return bytes already read from it (a read
/// buffer's leftover, a peeked TLS ClientHello); writes go straight through.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, reading `prefix` first.
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn bytes_flow_both_ways_and_a_half_close_keeps_the_other_direction() {
        // Pipes smaller than the 1000 bytes sent back: the relay waits for
        // the client to read.
        let (mut client, mut client_end) = duplex(64);
        let (mut backend, mut backend_end) = duplex(64);
        let counters = RelayCounters::default();
        let relay = tokio::spawn(async move {
            relay(
                &mut client_end,
                &mut backend_end,
                Duration::from_secs(5),
                &counters,
            )
            .await
            .map(|r| (r, counters.to_backend.get(), counters.to_client.get()))
        });
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        backend.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        // The client is done sending; the backend still answers.
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.expect("eof");
        assert!(rest.is_empty(), "the backend saw the client's end");
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.map(|_| got)
        });
        backend.write_all(&[7u8; 1000]).await.expect("write");
        backend.shutdown().await.expect("shutdown");
        let got = reader.await.expect("join").expect("read");
        assert_eq!(got.len(), 1000);
        let (relayed, up, down) = relay.await.expect("join").expect("relay");
        assert_eq!(relayed.end, RelayEnd::Closed);
        assert_eq!((relayed.to_backend, relayed.to_client), (4, 1000));
        assert_eq!((up, down), (4, 1000));
    }

    /// Copy `reader` to a `Vec` through one `Half`; its final buffer size.
    async fn copy_through_half<R: AsyncRead + Unpin>(reader: &mut R) -> (Vec<u8>, usize) {
        let mut half = Half::new();
        let mut out = Vec::new();
        let counter = Counter::default();
        std::future::poll_fn(|cx| {
            let mut moved = false;
            half.poll_copy(
                cx,
                Pin::new(&mut *reader),
                Pin::new(&mut out),
                &counter,
                &mut moved,
            )
        })
        .await
        .expect("copy");
        (out, half.buf.len())
    }

    #[tokio::test]
    async fn a_bulk_transfer_grows_the_buffer_and_small_reads_keep_it() {
        let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
        let (out, size) = copy_through_half(&mut std::io::Cursor::new(data.clone())).await;
        assert_eq!(out, data);
        assert_eq!(size, MAX_BUFFER_BYTES);
        // Reads of at most 1 KiB (a pipe that small) never fill it.
        let (mut tx, mut rx) = duplex(1024);
        let writer = tokio::spawn(async move {
            tx.write_all(&[5u8; 100_000]).await.expect("write");
        });
        let (out, size) = copy_through_half(&mut rx).await;
        writer.await.expect("join");
        assert_eq!(out.len(), 100_000);
        assert_eq!(size, BUFFER_BYTES);
    }

    #[tokio::test]
    async fn silence_both_ways_ends_the_relay_at_the_idle_timeout() {
        let (_client, mut client_end) = duplex(64);
        let (_backend, mut backend_end) = duplex(64);
        let relayed = relay(
            &mut client_end,
            &mut backend_end,
            Duration::from_millis(50),
            &RelayCounters::default(),
        )
        .await
        .expect("relay");
        assert_eq!(relayed.end, RelayEnd::IdleTimeout);
    }

    #[tokio::test]
    async fn a_side_that_does_not_read_holds_the_other_back() {
        let (mut client, mut client_end) = duplex(1024);
        let (_backend, mut backend_end) = duplex(1024);
        let task = tokio::spawn(async move {
            relay(
                &mut client_end,
                &mut backend_end,
                Duration::from_secs(60),
                &RelayCounters::default(),
            )
            .await
        });
        // The backend never reads: the client can only fill the buffers.
        let mut written = 0usize;
        let chunk = [1u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(200), client.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                _ => break,
            }
            assert!(written < 1 << 20, "no backpressure: {written} bytes taken");
        }
        assert!(written <= 1024 + MAX_BUFFER_BYTES + 1024, "{written}");
        task.abort();
    }
}
