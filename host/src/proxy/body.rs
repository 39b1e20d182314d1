//! The body of a response sent downstream, with the request's deadline and
//! the backend body's inactivity timer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::Lease;
use crate::conn::RequestGuard;
use crate::upstream::InFlight;

/// The body of a response sent downstream: a backend's streamed body (holding
/// its in-flight count until finished or dropped), or a small fixed body.
/// With `request_timeout_ms`, the body fails (the response is cut) at the
/// request's deadline. A backend body also fails when the backend sends
/// nothing for `response_body_timeout_ms` while the proxy waits on it (a slow
/// client reading is not the backend's inactivity: no read is pending then).
///
/// One pointer wide: a `Response<ProxyBody>` is then 120 bytes, under the
/// 128 that the compiler moves with inline stores instead of a `memcpy`
/// call, and a response is moved about a dozen times on its way to hyper
/// (out of the attempt, the retry loop, the timeout, gRPC shaping, the
/// service). Its state is one allocation, made with the response
/// (`bench/instructions.py`).
#[derive(Debug)]
pub struct ProxyBody {
    inner: Box<Inner>,
}

// Kept under the inline-move limit (see [`ProxyBody`]).
const _: () = assert!(std::mem::size_of::<http::Response<ProxyBody>>() <= 128);

#[derive(Debug)]
struct Inner {
    kind: BodyKind,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    request: Option<RequestGuard>,
    /// The request's access log entry, written when this body is dropped.
    access: Option<crate::access_log::Pending>,
}

/// The request's deadline passed while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("request_timeout_ms reached while sending the response body")]
pub struct BodyTimeout;

/// The backend sent no part of the response body for
/// `response_body_timeout_ms` (NGINX `proxy_read_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing for response_body_timeout_ms")]
pub struct BodyIdleTimeout;

#[derive(Debug)]
enum BodyKind {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

/// A backend's streamed body and what it holds until it is finished.
#[derive(Debug)]
struct UpstreamBody {
    body: Incoming,
    _in_flight: InFlight,
    /// Back to the pool once the body is read to its end.
    lease: Lease,
    ended: bool,
    idle: IdleTimer,
}

/// The inactivity timer of a backend body: armed only when a read would
/// block (most bodies finish without one, and pay no timer), re-armed after
/// each frame.
#[derive(Debug)]
struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl IdleTimer {
    /// Poll the timer after a read returned `Pending`; ready when it expired.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let at = tokio::time::Instant::now() + self.limit;
        match &mut self.sleep {
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            Some(sleep) if self.progressed => sleep.as_mut().reset(at),
            Some(_) => {}
        }
        self.progressed = false;
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}

impl ProxyBody {
    pub(super) fn upstream(
        body: Incoming,
        in_flight: InFlight,
        lease: Lease,
        idle_limit: Duration,
    ) -> Self {
        Self::new(BodyKind::Upstream(UpstreamBody {
            body,
            _in_flight: in_flight,
            lease,
            ended: false,
            idle: IdleTimer {
                limit: idle_limit,
                sleep: None,
                progressed: false,
            },
        }))
    }

    pub(super) fn full(bytes: Bytes) -> Self {
        Self::new(BodyKind::Full(Some(bytes)))
    }

    fn new(kind: BodyKind) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                deadline: None,
                request: None,
                access: None,
            }),
        }
    }

    /// Fail the body (cut the response) when `deadline` fires while the
    /// body is still streaming (`request_timeout_ms`).
    pub(super) fn set_deadline(&mut self, deadline: Pin<Box<tokio::time::Sleep>>) {
        self.inner.deadline = Some(deadline);
    }

    /// Write `entry` to the access log once this body is finished or
    /// dropped.
    pub(super) fn set_access(&mut self, entry: crate::access_log::Pending) {
        self.inner.access = Some(entry);
    }

    /// True for a response body the proxy made (an error's text), not a
    /// backend's.
    pub fn is_proxy_made(&self) -> bool {
        matches!(self.inner.kind, BodyKind::Full(_))
    }

    /// The text of a proxy-made body, taken out of it.
    pub fn take_text(&mut self) -> Option<String> {
        match &mut self.inner.kind {
            BodyKind::Full(bytes) => bytes
                .take()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            BodyKind::Upstream(_) => None,
        }
    }

    /// Keep the downstream connection's request guard until the body is
    /// finished (see [`crate::conn`]). In place: a response is large enough
    /// that moving it out and back costs more than the rest of this.
    pub fn hold_request_guard(&mut self, guard: RequestGuard) {
        self.inner.request = Some(guard);
    }
}

impl Drop for ProxyBody {
    /// A backend body read to its end gives its connection back to the pool
    /// (hyper stops polling a body with a known length once it has every
    /// byte, so `is_end_stream` counts as the end too).
    fn drop(&mut self) {
        if let BodyKind::Upstream(upstream) = &mut self.inner.kind
            && (upstream.ended || upstream.body.is_end_stream())
        {
            upstream.lease.finished();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self.get_mut().inner;
        let frame = match &mut this.kind {
            BodyKind::Upstream(upstream) => match Pin::new(&mut upstream.body).poll_frame(cx) {
                Poll::Ready(f) => {
                    upstream.idle.progressed = true;
                    upstream.ended = f.is_none();
                    Poll::Ready(f.map(|r| r.map_err(Into::into)))
                }
                Poll::Pending if upstream.idle.poll_expired(cx) => {
                    return Poll::Ready(Some(Err(Box::new(BodyIdleTimeout))));
                }
                Poll::Pending => Poll::Pending,
            },
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if let (Poll::Ready(Some(Ok(f))), Some(access)) = (&frame, this.access.as_mut())
            && let Some(data) = f.data_ref()
        {
            access.sent(data.len());
        }
        if frame.is_pending()
            && let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner.kind {
            BodyKind::Upstream(upstream) => upstream.body.is_end_stream(),
            BodyKind::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner.kind {
            BodyKind::Upstream(upstream) => upstream.body.size_hint(),
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
        }
    }
}
