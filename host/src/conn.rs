//! Downstream connection timeouts, enforced on the socket's read side:
//!
//! - **request head** (`header_read_timeout_ms`, HAProxy `timeout
//!   http-request`): the first request's whole head is due within this of
//!   accept (a connection that never sends a byte is closed then, not after
//!   the idle timeout); on a kept-alive connection, once the first byte of
//!   the next request arrives the whole head must follow in time, else the
//!   connection is closed (slowloris protection);
//! - **idle keep-alive** (`idle_timeout_ms`, HAProxy `timeout
//!   http-keep-alive`, NGINX `keepalive_timeout`): a connection with no
//!   request in progress and nothing received for this long is closed.
//!
//! A request is in progress from the moment hyper hands it to the proxy
//! until its response body is finished ([`ConnActivity::begin`] returns a
//! guard the response body holds). While one is, neither timeout runs
//! (slow backends are bounded by the upstream's timeouts). Works the same
//! for HTTP/1.1 and h2c: for HTTP/2 "in progress" means any stream open.
//!
//! [`ConnLimit`] caps open connections (HAProxy `maxconn`): a listener takes
//! a [`ConnPermit`] before it accepts, so at the cap it stops accepting and
//! the kernel's listen backlog holds new clients until a connection closes.
//! To make room it closes up to [`RECLAIM_BATCH`] connections that have no
//! request in progress, no request head arriving, and have been so for at
//! least [`RECLAIM_MIN_IDLE`] (idle keep-alive, or never sent a byte),
//! oldest first, as NGINX reuses its "reusable" connections when
//! `worker_connections` run out: otherwise silent clients would hold every
//! slot for `header_read_timeout_ms` while real clients wait.
//!
//! The timer lives in [`TimedIo::poll_read`]: when a read would block, the
//! deadline that applies is computed from [`ConnActivity`] and a
//! `tokio::time::Sleep` armed for it; when it fires the read fails with
//! `TimedOut` and hyper closes the connection.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Sleep;

/// The process's first call: an `Instant` (to arm timers) and the coarse
/// clock's reading at that moment, in ms.
fn epoch() -> &'static (Instant, u64) {
    static EPOCH: OnceLock<(Instant, u64)> = OnceLock::new();
    EPOCH.get_or_init(|| (Instant::now(), coarse_clock_ms()))
}

/// `CLOCK_MONOTONIC_COARSE` in ms: the monotonic clock as of the kernel's
/// last tick (1–10 ms behind), read from the vDSO without the TSC read a
/// precise clock costs (NGINX likewise reads the time once per event-loop
/// turn for its timers).
fn coarse_clock_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    let s = u64::try_from(t.tv_sec).unwrap_or(0);
    let ns = u64::try_from(t.tv_nsec).unwrap_or(0);
    s.saturating_mul(1000).saturating_add(ns / 1_000_000)
}

/// Milliseconds since the process's first call, at the coarse clock's
/// resolution (a tick, 1–10 ms), never 0 (0 means unset). For timeouts of
/// 100s of ms and more: a deadline computed from it may fall up to one tick
/// early.
pub(crate) fn now_ms() -> u64 {
    coarse_clock_ms().saturating_sub(epoch().1).max(1)
}

/// The `Instant` `ms` (as [`now_ms`] counts) after the epoch; past what an
/// `Instant` can hold (a timeout of `u64::MAX` ms), about 30 years after it,
/// as tokio's own far-future deadline.
fn instant_at_ms(ms: u64) -> Instant {
    let epoch = epoch().0;
    epoch
        .checked_add(Duration::from_millis(ms))
        .unwrap_or_else(|| epoch + Duration::from_secs(86_400 * 365 * 30))
}

/// Which timeout applies to a connection, shared by its socket and the
/// requests it carries.
#[derive(Debug)]
pub struct ConnActivity {
    active: AtomicU32,
    idle_since_ms: AtomicU64,
    head_started_ms: AtomicU64,
    /// Bytes of a request head arrived since the last request began.
    receiving: AtomicBool,
    /// Asked to close to make room under the connection cap.
    reclaimed: AtomicBool,
    waker: AtomicWaker,
}

impl Default for ConnActivity {
    /// A freshly accepted connection: its first request head is due within
    /// the head-read timeout, counted from now.
    fn default() -> Self {
        let now = now_ms();
        Self {
            active: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(now),
            head_started_ms: AtomicU64::new(now),
            receiving: AtomicBool::new(false),
            reclaimed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }
}

impl ConnActivity {
    /// A request arrived: no timeout runs until the returned guard drops.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(0, Ordering::Relaxed);
        self.receiving.store(false, Ordering::Relaxed);
        RequestGuard {
            activity: self.clone(),
        }
    }

    /// The deadline that applies now, in ms since the epoch, if any.
    fn deadline_ms(&self, header_read: Duration, idle: Duration) -> Option<u64> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match self.head_started_ms.load(Ordering::Relaxed) {
            0 => Some(
                self.idle_since_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(ms(idle)),
            ),
            started => Some(started.saturating_add(ms(header_read))),
        }
    }

    fn received(&self) {
        if self.active.load(Ordering::Relaxed) == 0 {
            self.receiving.store(true, Ordering::Relaxed);
            if self.head_started_ms.load(Ordering::Relaxed) == 0 {
                self.head_started_ms.store(now_ms(), Ordering::Relaxed);
            }
        }
    }

    /// Since when (ms) the connection has had no request in progress and no
    /// head arriving, if so.
    fn idle_since(&self) -> Option<u64> {
        (self.active.load(Ordering::Relaxed) == 0 && !self.receiving.load(Ordering::Relaxed))
            .then(|| self.idle_since_ms.load(Ordering::Relaxed))
    }

    /// Ask the connection to close at its next blocked read, if still idle.
    fn reclaim(&self) {
        self.reclaimed.store(true, Ordering::Relaxed);
        self.waker.wake();
    }
}

/// Held by a response body: the request is in progress until it drops.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<ConnActivity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        a.idle_since_ms.store(now_ms(), Ordering::Relaxed);
        if a.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The idle timer must start even if no read is pending a wake-up.
            a.waker.wake();
        }
    }
}

/// A cap on open connections, adjustable at run time (a reload may change
/// it; lowering it closes nothing, it only stops accepting until the count
/// falls below).
#[derive(Debug)]
pub struct ConnLimit {
    open: AtomicUsize,
    max: AtomicUsize,
    freed: Notify,
    /// Open connections, for reclaiming idle ones at the cap.
    registry: Mutex<HashMap<u64, Weak<ConnActivity>>>,
    next_id: AtomicU64,
}

/// Connections closed at most per reclaim (NGINX drains 32 at a time).
pub const RECLAIM_BATCH: usize = 32;
/// A connection must have been idle this long to be reclaimed, so one whose
/// next request is on its way is not cut.
pub const RECLAIM_MIN_IDLE: Duration = Duration::from_millis(200);

/// A connection's entry in its [`ConnLimit`]'s registry; removed on drop.
#[derive(Debug)]
pub struct Registration {
    limit: Arc<ConnLimit>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.limit
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl ConnLimit {
    /// A cap of `max` open connections (`usize::MAX`: none).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            freed: Notify::new(),
            registry: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Make a connection's activity known, so it can be reclaimed while idle.
    pub fn register(self: &Arc<Self>, activity: &Arc<ConnActivity>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::downgrade(activity));
        Registration {
            limit: self.clone(),
            id,
        }
    }

    /// Ask up to `n` of the connections idle for at least
    /// [`RECLAIM_MIN_IDLE`] to close, oldest first; returns how many were asked.
    pub fn reclaim_idle(&self, n: usize) -> usize {
        let newest = now_ms()
            .saturating_sub(u64::try_from(RECLAIM_MIN_IDLE.as_millis()).unwrap_or(u64::MAX));
        let mut idle: Vec<(u64, Arc<ConnActivity>)> = self
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(Weak::upgrade)
            .filter_map(|a| Some((a.idle_since()?, a)))
            .filter(|(since, _)| *since <= newest)
            .collect();
        idle.sort_unstable_by_key(|(since, _)| *since);
        idle.truncate(n);
        for (_, a) in &idle {
            a.reclaim();
        }
        idle.len()
    }

    /// Change the cap; waiters re-check at once.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A permit if a connection may open now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnPermit> {
        let max = self.max.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnPermit {
                limit: Some(self.clone()),
            })
    }

    /// Wait until a connection may open.
    pub async fn acquire(self: &Arc<Self>) -> ConnPermit {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a release in between is not missed.
            freed.as_mut().enable();
            if let Some(permit) = self.try_acquire() {
                return permit;
            }
            freed.await;
        }
    }
}

/// One open connection's place under a [`ConnLimit`]; released on drop.
#[derive(Debug)]
pub struct ConnPermit {
    limit: Option<Arc<ConnLimit>>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(limit) = self.limit.take() {
            limit.open.fetch_sub(1, Ordering::AcqRel);
            limit.freed.notify_waiters();
        }
    }
}

/// A timer kept armed across deadlines, after NGINX's lazy timers
/// (`NGX_TIMER_LAZY_DELAY` in `ngx_event_add_timer`: a timer is not moved
/// for a change under 300 ms), taken to its end: an armed timer is only
/// moved earlier, or re-armed once it fires. A deadline later than the armed
/// one keeps the timer as it is; when it fires early it is re-armed for the
/// deadline that applies then. So a deadline that moves later with every
/// request (the idle timeout of [`TimedIo`], the response-head deadline a
/// downstream connection keeps for its requests, `response_timeout_ms`)
/// resets tokio's timer wheel about once per timeout, not once or twice per
/// request. Deadlines are in [`now_ms`]'s coarse ms, so one may fire up to a
/// clock tick (1–10 ms) early. 16 bytes; its tokio timer (about 100 bytes)
/// is boxed.
#[derive(Debug)]
pub(crate) struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
    /// The deadline it is armed for, in [`now_ms`]'s ms.
    armed_ms: u64,
}

/// The deadline passed before the future it bounded was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

impl LazyTimer {
    /// A timer not armed yet: the first deadline polled arms it.
    pub(crate) fn unarmed() -> Self {
        Self::new(u64::MAX)
    }

    /// A timer armed for `at_ms` (in [`now_ms`]'s ms).
    pub(crate) fn new(at_ms: u64) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                instant_at_ms(at_ms),
            ))),
            armed_ms: at_ms,
        }
    }

    /// Ready once `at_ms` has passed. An armed timer that fires no later
    /// than `at_ms` is kept (and re-armed for `at_ms` when it fires); one
    /// armed later, or already fired, is reset to `at_ms`.
    pub(crate) fn poll_until(&mut self, cx: &mut Context<'_>, at_ms: u64) -> Poll<()> {
        loop {
            if self.sleep.is_elapsed() || at_ms < self.armed_ms {
                self.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(instant_at_ms(at_ms)));
                self.armed_ms = at_ms;
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if self.armed_ms >= at_ms => return Poll::Ready(()),
                // It fired for an earlier deadline: re-armed on the next turn.
                Poll::Ready(()) => {}
            }
        }
    }

    /// `future`, bounded by `at_ms`: its output, or [`Elapsed`] once the
    /// deadline passed first. The future is polled before the timer, so a
    /// ready future wins over a passed deadline. The future is pinned by
    /// the caller (`std::pin::pin!`), where it was made: taken by value, it
    /// was moved into this future's state and then pinned there, a second
    /// copy of the whole request (720 bytes) on every request.
    pub(crate) fn within<'a, F: Future + ?Sized>(
        &'a mut self,
        at_ms: u64,
        mut future: Pin<&'a mut F>,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> + 'a {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(out) = future.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            self.poll_until(cx, at_ms).map(|()| Err(Elapsed))
        })
    }
}

/// How long an HTTP/1 connection stays idle before it is parked (its hyper
/// connection and buffers freed; see [`TimedIo`]): 50 ms.
pub const PARK_AFTER: Duration = Duration::from_millis(50);

/// What a read that would block gets from the timers.
enum Verdict {
    /// A deadline passed or the connection was reclaimed: fail the read.
    Fail(io::Error),
    /// Idle for [`PARK_AFTER`] with parking enabled: park.
    Park,
}

/// A downstream socket with the head-read and idle timeouts on its reads.
///
/// With parking enabled ([`TimedIo::enable_parking`], HTTP/1 only), a read
/// that would block once the connection has been idle (no request in
/// progress, no head arriving, every written byte flushed) for
/// [`PARK_AFTER`] returns end-of-file instead, and [`TimedIo::take_parked`]
/// tells it apart from a real one: the HTTP/1 connection serving it ends
/// cleanly and frees its read and write buffers, and the socket waits in
/// [`TimedIo::wait_readable`] for the next request holding only this struct
/// (as NGINX frees a keep-alive connection's buffers while it waits). A
/// client whose next request comes sooner keeps its buffers: re-creating
/// them for every request cost about 5 % of the CPU per request under load.
#[derive(Debug)]
pub struct TimedIo<S> {
    inner: S,
    activity: Arc<ConnActivity>,
    header_read: Duration,
    idle: Duration,
    timer: LazyTimer,
    /// Bytes read before the current reader took over, served first.
    prefix: Bytes,
    park: bool,
    parked: bool,
    unflushed: bool,
}

/// A socket that can wait until it is readable without reading.
pub trait ReadReady {
    /// Ready when a read would not block (data, end-of-file or an error).
    ///
    /// # Errors
    /// The socket's error.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl<S> TimedIo<S> {
    /// Wrap `inner`; returns it with the activity handle its requests must
    /// report to.
    pub fn new(inner: S, header_read: Duration, idle: Duration) -> (Self, Arc<ConnActivity>) {
        let activity = Arc::new(ConnActivity::default());
        let io = Self {
            inner,
            activity: activity.clone(),
            header_read,
            idle,
            timer: LazyTimer::unarmed(),
            prefix: Bytes::new(),
            park: false,
            parked: false,
            unflushed: false,
        };
        (io, activity)
    }

    /// Let reads park the connection while it is idle (see [`TimedIo`]).
    pub fn enable_parking(&mut self) {
        self.park = true;
    }

    /// True (once) if the last end-of-file was a park, not the peer's.
    pub fn take_parked(&mut self) -> bool {
        std::mem::take(&mut self.parked)
    }

    /// Serve `bytes` (read earlier, not consumed) before reading the socket.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            // An empty view may still hold a whole buffer (hyper's, frozen).
        } else if self.prefix.is_empty() {
            self.prefix = bytes;
        } else {
            let mut joined = bytes::BytesMut::from(&bytes[..]);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
    }

    /// The timeouts' verdict while a read would block: fail once the
    /// deadline that applies passed or the connection was reclaimed, park
    /// (if `may_park`) once it has been idle for [`PARK_AFTER`], else
    /// `Pending` with the timer armed for the earlier of the two.
    fn poll_timeouts(&mut self, cx: &mut Context<'_>, may_park: bool) -> Poll<Verdict> {
        self.activity.waker.register(cx.waker());
        let idle_since = self.activity.idle_since();
        if self.activity.reclaimed.swap(false, Ordering::Relaxed) && idle_since.is_some() {
            return Poll::Ready(Verdict::Fail(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed while idle to make room: max_connections reached",
            )));
        }
        let deadline = self.activity.deadline_ms(self.header_read, self.idle);
        let park_at = idle_since
            .filter(|_| may_park)
            .map(|since| since.saturating_add(PARK_AFTER.as_millis() as u64));
        let Some(at_ms) = deadline.into_iter().chain(park_at).min() else {
            // No deadline while a request is in progress: the armed timer
            // stays (it wakes the reader once, harmlessly).
            return Poll::Pending;
        };
        // A deadline that moved later (each finished request moves the idle
        // one) keeps the earlier timer, re-armed when it fires: one timer
        // reset per PARK_AFTER under load, not one per request.
        self.timer
            .poll_until(cx, at_ms)
            .map(|()| self.expired(park_at == Some(at_ms)))
    }

    /// The verdict once the timer for the current deadline fired: park
    /// (`park`: it was the park time), else the timeout's error.
    fn expired(&self, park: bool) -> Verdict {
        if park {
            return Verdict::Park;
        }
        let what = if self.activity.head_started_ms.load(Ordering::Relaxed) == 0 {
            "idle keep-alive timeout"
        } else {
            "request head not received in time"
        };
        Verdict::Fail(io::Error::new(io::ErrorKind::TimedOut, what))
    }

    /// [`TimedIo::poll_timeouts`] without parking: ready with the error.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.poll_timeouts(cx, false) {
            Poll::Ready(Verdict::Fail(e)) => Poll::Ready(e),
            Poll::Ready(Verdict::Park) | Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: ReadReady> TimedIo<S> {
    /// Wait, holding no buffer, until the socket is readable (or bytes were
    /// [`TimedIo::unread`]), under the same idle and head-read timeouts as a
    /// read.
    ///
    /// # Errors
    /// `TimedOut` at the idle or head-read deadline, `ConnectionAborted` if
    /// reclaimed under the connection cap, or the socket's error.
    pub async fn wait_readable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            if !self.prefix.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(r) = self.inner.poll_read_ready(cx) {
                return Poll::Ready(r);
            }
            self.poll_deadline(cx).map(Err)
        })
        .await
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.activity.received();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.received();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_timeouts(cx, this.park && !this.unflushed) {
                Poll::Ready(Verdict::Park) => {
                    this.parked = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Verdict::Fail(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.unflushed = true;
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.unflushed = true;
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.unflushed = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(
        header_ms: u64,
        idle_ms: u64,
    ) -> (
        TimedIo<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<ConnActivity>,
    ) {
        let (a, b) = tokio::io::duplex(1024);
        let (io, activity) = TimedIo::new(
            a,
            Duration::from_millis(header_ms),
            Duration::from_millis(idle_ms),
        );
        (io, b, activity)
    }

    #[tokio::test]
    async fn an_idle_connection_times_out() {
        let (mut io, _peer, activity) = pair(10_000, 50).await;
        // After one request, the connection is idle (keep-alive).
        drop(activity.begin());
        let mut buf = [0u8; 8];
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("idle"), "{e}");
    }

    #[tokio::test]
    async fn a_silent_new_connection_is_cut_at_the_head_timeout_not_the_idle_one() {
        let (mut io, _peer, _a) = pair(50, 60_000).await;
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        let e = read.expect("cut long before the idle timeout").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("request head"), "{e}");
    }

    #[tokio::test]
    async fn the_limit_waits_for_a_release_and_follows_a_new_cap() {
        let limit = ConnLimit::new(2);
        let a = limit.acquire().await;
        let _b = limit.acquire().await;
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.open(), 2);
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "at the cap nothing is admitted");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a release admits the waiter")
            .unwrap();
        assert_eq!(limit.open(), 2);
        limit.set_max(3);
        let _d = limit.try_acquire().expect("a raised cap admits at once");
        drop(c);
        assert_eq!(limit.open(), 2);
    }

    #[tokio::test]
    async fn at_the_cap_idle_connections_are_reclaimed_oldest_first_and_busy_ones_kept() {
        let limit = ConnLimit::new(3);
        let (mut idle, _p1, a1) = pair(60_000, 60_000).await;
        let (mut busy, _p2, a2) = pair(60_000, 60_000).await;
        let (mut heading, mut p3, a3) = pair(60_000, 60_000).await;
        let _r = [
            limit.register(&a1),
            limit.register(&a2),
            limit.register(&a3),
        ];
        let _guard = a2.begin();
        p3.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(heading.read(&mut buf).await.unwrap(), 8);
        // Too fresh to reclaim.
        assert_eq!(limit.reclaim_idle(RECLAIM_BATCH), 0);
        tokio::time::sleep(RECLAIM_MIN_IDLE + Duration::from_millis(50)).await;
        assert_eq!(limit.reclaim_idle(RECLAIM_BATCH), 1, "only the idle one");
        let e = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let read = tokio::time::timeout(Duration::from_millis(100), busy.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "a connection with a request in progress stays"
        );
    }

    #[tokio::test]
    async fn a_partial_head_times_out_with_its_own_timer() {
        let (mut io, mut peer, _a) = pair(50, 60_000).await;
        peer.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        let e = io.read(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("request head"), "{e}");
    }

    #[tokio::test]
    async fn an_idle_connection_parks_after_the_grace_not_at_once() {
        let (mut io, mut peer, activity) = pair(60_000, 60_000).await;
        io.enable_parking();
        drop(activity.begin());
        let mut buf = [0u8; 8];
        // Within PARK_AFTER the read waits, and data that comes is read.
        let early = tokio::time::timeout(PARK_AFTER / 5, io.read(&mut buf)).await;
        assert!(early.is_err(), "no park before PARK_AFTER");
        peer.write_all(b"GET").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 3);
        assert!(!io.take_parked());
        // The next request ends; idle past PARK_AFTER, the read parks.
        drop(activity.begin());
        let read = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await;
        assert_eq!(read.expect("parked, not timed out").unwrap(), 0);
        assert!(io.take_parked(), "an end-of-file that is a park");
        // A request in progress is never parked.
        let _busy = activity.begin();
        let read = tokio::time::timeout(PARK_AFTER * 3, io.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "still waiting while a request is in progress"
        );
        assert!(!io.take_parked());
    }

    #[tokio::test]
    async fn an_idle_deadline_moved_later_outlives_the_timer_armed_for_the_earlier_one() {
        // The timer armed for the first idle deadline is kept when a
        // request moves the deadline later; when it fires it must re-arm,
        // not fail the read.
        let (mut io, _peer, activity) = pair(60_000, 1_000).await;
        drop(activity.begin());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            io.read(&mut buf).await.unwrap_err()
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A request came and went: idle again from now, for 1 s more.
        drop(activity.begin());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !reader.is_finished(),
            "cut at the first deadline, which the request had moved"
        );
        let e = reader.await.unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("idle"), "{e}");
    }

    #[tokio::test]
    async fn no_timeout_while_a_request_is_in_progress() {
        let (mut io, mut peer, activity) = pair(20, 20).await;
        let guard = activity.begin();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_millis(150), io.read(&mut buf)).await;
        assert!(read.is_err(), "the read must still be pending");
        drop(guard);
        // Now idle: the timer starts when the guard drops.
        let e = io.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(peer.write_all(b"x").await);
    }

    /// A future that never finishes, bounded by `timer` at `at_ms`; `Err`
    /// if the timer has not cut it within 5 s.
    async fn pending_within(
        timer: &mut LazyTimer,
        at_ms: u64,
    ) -> Result<Result<(), Elapsed>, tokio::time::error::Elapsed> {
        let never = std::pin::pin!(std::future::pending::<()>());
        tokio::time::timeout(Duration::from_secs(5), timer.within(at_ms, never)).await
    }

    #[tokio::test]
    async fn a_ready_future_is_not_cut_and_a_slow_one_is_cut_at_the_deadline() {
        let mut timer = LazyTimer::new(now_ms() + 60_000);
        let at = now_ms() + 60_000;
        assert_eq!(timer.within(at, std::pin::pin!(async { 7 })).await, Ok(7));
        let at = now_ms() + 50;
        let cut = pending_within(&mut timer, at)
            .await
            .expect("cut at its own deadline, not the armed one 60 s away");
        assert_eq!(cut, Err(Elapsed));
        assert!(now_ms() + 10 >= at, "not cut long before its deadline");
    }

    #[tokio::test]
    async fn a_timer_armed_early_is_kept_and_re_armed_when_it_fires() {
        // Armed for 100 ms from now; the next deadline is 400 ms away: the
        // timer is kept, fires at 100 ms, and must then wait on, not cut.
        let start = now_ms();
        let mut timer = LazyTimer::new(start + 100);
        let at = start + 400;
        let cut = pending_within(&mut timer, at)
            .await
            .expect("cut at the later deadline");
        assert_eq!(cut, Err(Elapsed));
        assert!(
            now_ms() + 10 >= at,
            "cut at the deadline armed before ({} ms in), not at its own",
            now_ms() - start
        );
        // Fired: the next use re-arms it.
        let at = now_ms() + 30;
        assert_eq!(
            timer
                .within(at, std::pin::pin!(std::future::pending::<()>()))
                .await,
            Err(Elapsed)
        );
    }
}
