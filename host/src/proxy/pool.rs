//! The connection pool of one upstream: idle HTTP/1.1 connections to its
//! backends, kept alive and reused, over hyper's `client::conn` API.
//!
//! A request takes an idle connection to its backend (the most recently used
//! first, so a few hot connections carry the load and the rest age out), or
//! opens one within `connect_timeout_ms`, and sends on it directly: no pool
//! task and no per-request channel besides hyper's own to the connection's
//! task. The connection comes back to the pool when the response body is
//! finished ([`Lease`], held by the body), as NGINX's `keepalive` and
//! HAProxy's `http-reuse` do; a response cut short closes it.
//!
//! A pooled connection the backend closed between requests is noticed before
//! use (hyper reports it closed), or, if the close races the send, hyper
//! hands the unsent request back and it goes out on a new connection: nothing
//! was sent, so this is not a retry of the request. Connections idle for
//! longer than [`IDLE_TIMEOUT`] are closed when the pool is next used for
//! that backend.
//!
//! The pool is shared by every worker thread (one short lock per take and
//! per return; the lock is never held across an await), and survives a reload
//! that keeps the upstream's `connect_timeout_ms`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::retry::AttemptBody;

/// How long a pooled connection may stay idle before it is closed (60 s, as
/// hyper-util's legacy client and NGINX's `keepalive_timeout` default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

type Sender = SendRequest<AttemptBody>;

/// Idle connections per backend address.
#[derive(Debug)]
pub(crate) struct ConnPool {
    connect_timeout: Duration,
    idle: Mutex<HashMap<SocketAddr, VecDeque<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Connecting failed or timed out (`connect_timeout_ms`): nothing was sent.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed after (some of) the request may have been sent.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A pooled connection on loan to one response: returned to the pool when
/// the response body is finished ([`Lease::finished`]), closed if dropped
/// before.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: Arc<ConnPool>,
    address: SocketAddr,
    sender: Option<Sender>,
}

impl Lease {
    /// The response was read to its end: the connection can carry the next
    /// request.
    pub(crate) fn finished(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_ready() {
            self.pool.put(self.address, sender);
        } else if !sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Still sending the request body (the backend answered early),
            // or hyper has not yet seen the end: pool it once it is ready,
            // so no request waits behind it. (Outside a runtime, as at
            // shutdown, it is closed instead.)
            let (pool, address) = (self.pool.clone(), self.address);
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(address, sender);
                }
            });
        }
    }
}

impl ConnPool {
    /// An empty pool whose new connections must connect within `connect_timeout`.
    pub(crate) fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            connect_timeout,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// The connect timeout new connections get.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Send `request` (origin-form URI, `Host` set) to `address` on a pooled
    /// connection or a new one; the response and the lease of its connection.
    ///
    /// # Errors
    /// [`SendError::Connect`] if no connection could be opened (nothing was
    /// sent), [`SendError::Http`] if the connection failed with the request
    /// (perhaps partly) sent.
    pub(crate) async fn send(
        self: &Arc<Self>,
        address: SocketAddr,
        mut request: http::Request<AttemptBody>,
    ) -> Result<(http::Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, reused) = match self.take(address) {
                Some(sender) => (sender, true),
                None => (self.connect(address).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: self.clone(),
                        address,
                        sender: Some(sender),
                    };
                    return Ok((response, lease));
                }
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request went out.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently returned idle connection to `address` that is still
    /// ready for a request; closes those idle past [`IDLE_TIMEOUT`] or closed
    /// by the backend (only ready connections are pooled, so a pooled one is
    /// either ready or closed).
    fn take(&self, address: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = idle.get_mut(&address)?;
        while let Some(Idle { sender, since }) = queue.pop_back() {
            if sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Pool a ready connection.
    fn put(&self, address: SocketAddr, sender: Sender) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = idle.entry(address).or_default();
        // The oldest are at the front: close those idle too long.
        while queue
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT || i.sender.is_closed())
        {
            queue.pop_front();
        }
        queue.push_back(Idle { sender, since: now });
    }

    async fn connect(&self, address: SocketAddr) -> Result<Sender, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(SendError::Connect(e)),
                Err(_) => {
                    return Err(SendError::Connect(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no connection within connect_timeout_ms = {}",
                            self.connect_timeout.as_millis()
                        ),
                    )));
                }
            };
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%address, "backend connection ended with an error: {e}");
            }
        });
        Ok(sender)
    }

    /// Idle connections held now (all backends).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(VecDeque::len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers `n` requests per connection, then closes it;
    /// returns its address and the count of accepted connections.
    async fn backend(per_conn: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (address, accepted)
    }

    fn request() -> http::Request<AttemptBody> {
        http::Request::builder()
            .uri("/")
            .header("host", "t")
            .body(AttemptBody::empty())
            .unwrap()
    }

    async fn get(pool: &Arc<ConnPool>, address: SocketAddr) -> Bytes {
        let (response, mut lease) = pool.send(address, request()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        lease.finished();
        body
    }

    #[tokio::test]
    async fn a_finished_response_returns_its_connection_for_reuse() {
        let (address, accepted) = backend(usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(get(&pool, address).await, "ok");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_unfinished_does_not_return_its_connection() {
        let (address, accepted) = backend(usize::MAX).await;
        let pool = ConnPool::new(Duration::from_secs(1));
        let (_response, lease) = pool.send(address, request()).await.unwrap();
        drop(lease);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(get(&pool, address).await, "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_replaced_without_an_error() {
        // One request per connection, but the backend does not say
        // `connection: close`: the pooled connection is found closed.
        let (address, accepted) = backend(1).await;
        let pool = ConnPool::new(Duration::from_secs(1));
        for _ in 0..4 {
            assert_eq!(get(&pool, address).await, "ok");
            // Let the close reach hyper, as between real requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let address = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = ConnPool::new(Duration::from_secs(1));
        let err = pool.send(address, request()).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }
}
