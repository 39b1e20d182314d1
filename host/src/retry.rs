//! What retries need: which requests may be sent twice, and a request body
//! that can be sent again.
//!
//! The rules (RFC 9110 §9.2.2, as Envoy and HAProxy `retry-on` apply them):
//! - an attempt that failed before the request left the proxy (connect
//!   refused or timed out) may always be retried: the backend saw nothing.
//!   (A request on a pooled keep-alive connection the backend had already
//!   closed is retried the same way by hyper-util's pool, which sees it was
//!   never written.)
//! - an attempt that failed after the request was sent (connection reset
//!   before any response byte, response timeout) is retried only if the
//!   method is idempotent: the backend may have acted on it.
//! - either way, the body must be available again: [`ReplayBody`] keeps up
//!   to `retry_buffer_bytes` of what was sent; a larger body that was
//!   (partly) sent cannot be replayed, so its request is not retried.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Whether `method` is idempotent (RFC 9110 §9.2.2: the safe methods GET,
/// HEAD, OPTIONS, TRACE, plus PUT and DELETE).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Error of an attempt's body that a later attempt superseded.
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
pub struct Superseded;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A downstream request body that can be sent once per attempt: each
/// [`ReplayBody::attempt`] yields a body that first replays what earlier
/// attempts consumed (kept up to `limit` bytes), then reads on from the
/// downstream. Only the newest attempt's body may be read; an older one
/// fails with [`Superseded`].
#[derive(Debug)]
pub struct ReplayBody {
    shared: Option<Arc<Mutex<Shared>>>,
    hint: SizeHint,
}

#[derive(Debug)]
struct Shared {
    body: Incoming,
    chunks: Vec<Bytes>,
    buffered: u64,
    limit: u64,
    consumed: bool,
    overflow: bool,
    ended: bool,
    trailers: Option<HeaderMap>,
    generation: u64,
}

impl ReplayBody {
    /// Wrap `body`, keeping up to `limit` bytes for replays. An empty body
    /// (`is_end_stream` already) costs no allocation.
    pub fn new(body: Incoming, limit: u64) -> Self {
        if body.is_end_stream() {
            return Self {
                shared: None,
                hint: SizeHint::with_exact(0),
            };
        }
        let hint = body.size_hint();
        Self {
            shared: Some(Arc::new(Mutex::new(Shared {
                body,
                chunks: Vec::new(),
                buffered: 0,
                limit,
                consumed: false,
                overflow: false,
                ended: false,
                trailers: None,
                generation: 0,
            }))),
            hint,
        }
    }

    /// True if every byte consumed so far is kept, so a new attempt can send
    /// the whole body (always true before anything was read).
    pub fn replayable(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            !s.overflow
        })
    }

    /// True if some of the body was read (handed to a backend connection).
    pub fn consumed(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.consumed
        })
    }

    /// The body for a new attempt; earlier attempts' bodies stop working.
    pub fn attempt(&self) -> AttemptBody {
        let Some(shared) = &self.shared else {
            return AttemptBody {
                shared: None,
                generation: 0,
                position: 0,
                trailers_sent: false,
                hint: SizeHint::with_exact(0),
            };
        };
        let generation = {
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            s.generation += 1;
            s.generation
        };
        AttemptBody {
            shared: Some(shared.clone()),
            generation,
            position: 0,
            trailers_sent: false,
            hint: self.hint,
        }
    }
}

/// One attempt's request body (see [`ReplayBody`]).
#[derive(Debug)]
pub struct AttemptBody {
    shared: Option<Arc<Mutex<Shared>>>,
    generation: u64,
    position: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(shared) = &this.shared else {
            return Poll::Ready(None);
        };
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(chunk) = s.chunks.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                s.consumed = true;
                match frame.into_data() {
                    Ok(data) => {
                        let len = data.len() as u64;
                        if !s.overflow && s.buffered + len <= s.limit {
                            s.buffered += len;
                            s.chunks.push(data.clone());
                            this.position += 1;
                        } else if !s.overflow {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            this.position = 0;
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            s.ended = true;
                            s.trailers = Some(trailers.clone());
                            this.trailers_sent = true;
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Err(_) => Poll::Ready(None),
                    },
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.shared.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(!idempotent(&m.parse().unwrap()), "{m}");
        }
    }
}
