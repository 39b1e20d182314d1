//! Retries in one place: which requests may be sent twice, how many times
//! ([`RetryPolicy`]: an upstream's `retries`, its retry budget and its replay
//! buffer), and a request body that can be sent again ([`ReplayBody`]). The
//! request path asks the policy after each failed attempt.
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
//! - a request body the client did not complete (it aborted, or its chunked
//!   framing broke) is never completed on any backend: the downstream error
//!   is final for the request. Every attempt body, the current one and any
//!   later one, fails from then on ([`ClientBodyError`]), so the backend
//!   connection is aborted mid-body rather than ended cleanly, and
//!   [`ReplayBody::client_failed`] tells the request path to answer 400
//!   without blaming or retrying a backend.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::UpstreamConfig;

/// Connect failures of one request retried on other backends at most
/// (NGINX `proxy_next_upstream error timeout` tries every server; this
/// bounds the wait when many connects time out).
pub const MAX_CONNECT_RETRIES: u32 = 8;

/// An upstream's retry policy: `retries` (0 disables retrying), the retry
/// budget and `retry_buffer_bytes`. Models tower's `retry::Policy` beside
/// `retry::budget`.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Retries of a failed attempt on another backend (`retries`).
    pub retries: u32,
    /// Request bodies up to this many bytes are kept for replay
    /// (`retry_buffer_bytes`).
    pub buffer_bytes: u64,
    /// tower's `TpsBudget`, after linkerd: `retry_budget_percent` of the
    /// requests over the last 10 s, plus `retry_min_per_second`.
    budget: TpsBudget,
}

/// What one request has used of its upstream's [`RetryPolicy`].
#[derive(Debug, Clone, Copy)]
pub struct RetryState {
    idempotent: bool,
    retries: u32,
    connect_retries: u32,
}

impl RetryPolicy {
    /// The policy of an upstream configured as `config`.
    pub fn new(config: &UpstreamConfig) -> Self {
        Self {
            retries: config.retries,
            buffer_bytes: config.retry_buffer_bytes,
            budget: TpsBudget::new(
                Duration::from_secs(10),
                config.retry_min_per_second,
                config.retry_budget_percent as f32 / 100.0,
            ),
        }
    }

    /// Whether failed attempts may be retried at all (`retries > 0`).
    pub fn enabled(&self) -> bool {
        self.retries > 0
    }

    /// Start a request with `method`; credits the budget with it when
    /// retries are enabled (the budget only matters to upstreams that retry).
    pub fn begin(&self, method: &Method) -> RetryState {
        if self.enabled() {
            self.budget.deposit();
        }
        RetryState {
            idempotent: idempotent(method),
            retries: 0,
            connect_retries: 0,
        }
    }

    /// Whether the request in `state` may be tried again after a failed
    /// attempt, and if so count the retry. `nothing_sent`: the attempt
    /// failed before the request left the proxy (a connect failure), which
    /// is always safe to retry, at most [`MAX_CONNECT_RETRIES`] times and
    /// without drawing on the budget. Otherwise the method must be
    /// idempotent, `retries` not yet used up, and the budget must allow it.
    /// Either way the body must be replayable (`replayable`).
    pub fn allow(&self, state: &mut RetryState, nothing_sent: bool, replayable: bool) -> bool {
        if !self.enabled() || !replayable {
            return false;
        }
        if nothing_sent {
            if state.connect_retries < MAX_CONNECT_RETRIES {
                state.connect_retries += 1;
                return true;
            }
            return false;
        }
        if state.retries < self.retries && state.idempotent && self.budget.withdraw() {
            state.retries += 1;
            return true;
        }
        false
    }
}

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

/// The downstream request body failed (the client aborted, or its framing
/// was invalid): the request body can never be completed. Carries hyper's
/// description of the downstream error.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub struct ClientBodyError(pub String);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A downstream request body that can be sent once per attempt: each
/// [`ReplayBody::attempt`] yields a body that first replays what earlier
/// attempts consumed (kept up to `limit` bytes), then reads on from the
/// downstream. Only the newest attempt's body may be read; an older one
/// fails with [`Superseded`].
#[derive(Debug)]
pub struct ReplayBody<B = Incoming> {
    shared: Option<Arc<Mutex<Shared<B>>>>,
    hint: SizeHint,
}

#[derive(Debug)]
struct Shared<B> {
    body: B,
    chunks: Vec<Bytes>,
    buffered: u64,
    limit: u64,
    consumed: bool,
    overflow: bool,
    ended: bool,
    trailers: Option<HeaderMap>,
    generation: u64,
    /// The downstream body failed; final for every attempt.
    failed: Option<String>,
    /// Bytes read from the client, for the access log (when it is on).
    received: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl<B: Body> ReplayBody<B> {
    /// Wrap `body`, keeping up to `limit` bytes for replays. An empty body
    /// (`is_end_stream` already) costs no allocation.
    pub fn new(body: B, limit: u64) -> Self {
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
                failed: None,
                received: None,
            }))),
            hint,
        }
    }

    /// Add every byte read from the client to `received` (the access
    /// log's `bytes_in`). An empty body reads none.
    pub fn count_received(&self, received: Arc<std::sync::atomic::AtomicU64>) {
        if let Some(shared) = &self.shared {
            shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .received = Some(received);
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

    /// True if the downstream body failed (client abort, broken framing):
    /// the request must not be retried and is the client's fault (400).
    pub fn client_failed(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.failed.is_some()
        })
    }

    /// True if some of the body was read (handed to a backend connection).
    pub fn consumed(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| {
            let s = s.lock().unwrap_or_else(PoisonError::into_inner);
            s.consumed
        })
    }

    /// A copy of the whole body (its data chunks; trailers are left out) if
    /// the client completed it and every byte was kept: for a mirrored copy
    /// of the request. An empty body is an empty list; `None` while the
    /// body is still arriving, or if it failed or overflowed the buffer.
    pub fn complete_copy(&self) -> Option<Vec<Bytes>> {
        let Some(shared) = &self.shared else {
            return Some(Vec::new());
        };
        let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        (s.ended && !s.overflow && s.failed.is_none()).then(|| s.chunks.clone())
    }

    /// The body for a new attempt; earlier attempts' bodies stop working.
    pub fn attempt(&self) -> AttemptBody<B> {
        let Some(shared) = &self.shared else {
            return AttemptBody::empty();
        };
        let generation = {
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            s.generation += 1;
            s.generation
        };
        AttemptBody::new(Some(shared.clone()), generation, self.hint, Vec::new())
    }
}

/// One attempt's request body (see [`ReplayBody`]).
///
/// One pointer wide, `None` for an empty body: hyper's HTTP/1 client
/// queues each request in a channel of blocks of 32 requests, two or three
/// blocks per backend connection, so every byte of this type costs about
/// 80 bytes per backend connection (with the pointer, a block fits jemalloc's
/// 8 KiB size class instead of 12 KiB).
#[derive(Debug)]
pub struct AttemptBody<B = Incoming>(Option<Box<Attempt<B>>>);

/// A non-empty [`AttemptBody`]'s state.
#[derive(Debug)]
struct Attempt<B> {
    shared: Option<Arc<Mutex<Shared<B>>>>,
    generation: u64,
    position: usize,
    trailers_sent: bool,
    hint: SizeHint,
    /// Without `shared`: the chunks to send, from `position` on.
    fixed: Vec<Bytes>,
}

impl<B> AttemptBody<B> {
    /// An empty body (no allocation).
    pub fn empty() -> Self {
        AttemptBody(None)
    }

    /// A body of these chunks (a copy of a completed body, see
    /// [`ReplayBody::complete_copy`]), with an exact size; no chunks is
    /// [`AttemptBody::empty`].
    pub fn fixed(chunks: Vec<Bytes>) -> Self {
        if chunks.is_empty() {
            return Self::empty();
        }
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        AttemptBody::new(None, 0, SizeHint::with_exact(len), chunks)
    }

    /// A non-empty body from its start: `shared`'s `generation`-th attempt,
    /// or without `shared` the `fixed` chunks.
    fn new(
        shared: Option<Arc<Mutex<Shared<B>>>>,
        generation: u64,
        hint: SizeHint,
        fixed: Vec<Bytes>,
    ) -> Self {
        AttemptBody(Some(Box::new(Attempt {
            shared,
            generation,
            position: 0,
            trailers_sent: false,
            hint,
            fixed,
        })))
    }
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(this) = self.0.as_deref_mut() else {
            return Poll::Ready(None);
        };
        let Some(shared) = &this.shared else {
            let chunk = this.fixed.get(this.position).cloned();
            this.position += 1;
            return Poll::Ready(chunk.map(|c| Ok(Frame::data(c))));
        };
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(failed) = &s.failed {
            // Never replay a prefix of a body the client did not complete.
            return Poll::Ready(Some(Err(Box::new(ClientBodyError(failed.clone())))));
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
            Poll::Ready(Some(Err(e))) => {
                let message = e.to_string();
                s.failed = Some(message.clone());
                Poll::Ready(Some(Err(Box::new(ClientBodyError(message)))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                s.consumed = true;
                match frame.into_data() {
                    Ok(data) => {
                        let len = data.len() as u64;
                        if let Some(received) = &s.received {
                            received.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                        }
                        if !s.overflow && s.buffered + len <= s.limit {
                            s.buffered += len;
                            s.chunks.push(data.clone());
                            this.position += 1;
                        } else if !s.overflow {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            this.position = 0;
                        }
                        // The last byte of a framed body (its content-length
                        // reached): the client completed it, whether or not
                        // the backend ever polls for the end.
                        if s.body.is_end_stream() {
                            s.ended = true;
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
        self.0
            .as_ref()
            .is_none_or(|a| a.shared.is_none() && a.position >= a.fixed.len())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |a| a.hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    /// A scripted downstream body: yields its frames in order, then ends.
    struct Script(VecDeque<Result<Frame<Bytes>, String>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = String;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn script(items: Vec<Result<&'static str, &'static str>>) -> Script {
        Script(
            items
                .into_iter()
                .map(|i| {
                    i.map(|d| Frame::data(Bytes::from_static(d.as_bytes())))
                        .map_err(str::to_string)
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_complete_copy_exists_only_for_a_finished_kept_body() {
        let body = ReplayBody::new(script(vec![Ok("ab"), Ok("cd")]), 1024);
        assert_eq!(body.complete_copy(), None, "nothing read yet");
        let (data, err) = drain(body.attempt()).await;
        assert_eq!((data.as_slice(), err), (&b"abcd"[..], None));
        let copy = body.complete_copy().unwrap();
        let (data, err) = drain(AttemptBody::<Script>::fixed(copy)).await;
        assert_eq!((data.as_slice(), err), (&b"abcd"[..], None));
        // Overflowed, or failed: no copy.
        let big = ReplayBody::new(script(vec![Ok("ab"), Ok("cd")]), 3);
        drain(big.attempt()).await;
        assert_eq!(big.complete_copy(), None);
        let broken = ReplayBody::new(script(vec![Ok("ab"), Err("reset")]), 1024);
        drain(broken.attempt()).await;
        assert_eq!(broken.complete_copy(), None);
        assert!(AttemptBody::<Script>::fixed(Vec::new()).is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_attempt_body_is_one_null_pointer_and_ends_at_once() {
        assert_eq!(
            std::mem::size_of::<AttemptBody>(),
            std::mem::size_of::<usize>()
        );
        // The request hyper's HTTP/1 client queues: with this body, 32 of
        // them and the block's header fit jemalloc's 8 KiB size class.
        assert!(std::mem::size_of::<http::Request<AttemptBody>>() <= 232);
        let empty = http_body_util::Empty::<Bytes>::new();
        for body in [
            ReplayBody::new(empty, 1024).attempt(),
            AttemptBody::fixed(Vec::new()),
        ] {
            assert!(body.0.is_none() && body.is_end_stream());
            assert_eq!(body.size_hint().exact(), Some(0));
            assert_eq!(drain(body).await, (Vec::new(), None));
        }
    }

    /// Every frame of `body` until it ends or fails: the data, and the error.
    async fn drain<B>(mut body: AttemptBody<B>) -> (Vec<u8>, Option<String>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => data.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => return (data, Some(e.to_string())),
            }
        }
        (data, None)
    }

    #[tokio::test]
    async fn a_complete_body_is_replayed_whole() {
        let replay = ReplayBody::new(script(vec![Ok("hel"), Ok("lo")]), 1024);
        assert_eq!(drain(replay.attempt()).await, (b"hello".to_vec(), None));
        assert!(replay.replayable() && !replay.client_failed());
        assert_eq!(drain(replay.attempt()).await, (b"hello".to_vec(), None));
    }

    #[tokio::test]
    async fn a_failed_downstream_body_is_final_for_every_attempt() {
        let replay = ReplayBody::new(script(vec![Ok("hello"), Err("incomplete")]), 1024);
        let (data, error) = drain(replay.attempt()).await;
        assert_eq!(data, b"hello");
        assert!(error.unwrap().contains("incomplete"));
        assert!(replay.client_failed());
        // A later attempt never replays the prefix and never ends cleanly.
        let (data, error) = drain(replay.attempt()).await;
        assert!(data.is_empty(), "replayed {data:?}");
        assert!(error.unwrap().contains("client's request body failed"));
    }

    #[tokio::test]
    async fn a_body_failing_on_a_later_attempt_is_final_too() {
        // Attempt 1 reads one chunk (then its backend fails); attempt 2
        // replays it and reads on into the client's error.
        let replay = ReplayBody::new(script(vec![Ok("a"), Err("bad chunk")]), 1024);
        let mut first = replay.attempt();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        drop(first);
        let (data, error) = drain(replay.attempt()).await;
        assert_eq!(data, b"a");
        assert!(error.is_some() && replay.client_failed());
    }

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
