//! The connection pool of one upstream: idle HTTP/1.1 connections to its
//! backends, kept alive and reused, and one shared HTTP/2 connection per
//! backend, over hyper's `client::conn` API; the upstream's
//! [`Connector`] opens them (TCP, TLS, the protocol).
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
//! was sent, so this is not a retry of the request.
//!
//! Idle connections are bounded as HAProxy's `pool-max-conn` and NGINX's
//! `keepalive` bound them ([`PoolSettings`]): at most
//! `pool_max_idle_per_backend` per backend (past it the least recently used
//! is closed), each for at most `pool_idle_timeout_ms` (NGINX's upstream
//! `keepalive_timeout`). A sweep (every half of that timeout, between 100 ms
//! and 5 s, as HAProxy's `pool-purge-delay`) closes those idle too long and
//! forgets those the backend closed, so an upstream that goes quiet after a
//! burst gives its connections back without waiting for its next request.
//!
//! An HTTP/2 connection carries every request to its backend at once, up to
//! the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` (more wait in hyper for a
//! stream to close); when it closes, the next request opens a new one. The
//! sweep stops sharing one that no request has taken for
//! `pool_idle_timeout_ms`: it closes (`GOAWAY`) once its open streams end
//! (Envoy's upstream `idle_timeout` likewise closes an HTTP/2 connection
//! without active streams).
//!
//! With `send_proxy_protocol` every connection opens with a PROXY header
//! naming one client, so connections are pooled per backend and client
//! address (HAProxy likewise keeps such connections private to their
//! client): they carry that client's requests only, and are closed once
//! idle past `pool_idle_timeout_ms` like the rest.
//!
//! The pool is shared by every worker thread (one short lock per take and
//! per return; the lock is never held across an await), and survives a reload
//! that keeps the upstream's `connect_timeout_ms`, `protocol`, `tls`,
//! `send_proxy_protocol` and pool settings.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use super::FastMap as HashMap;
use crate::connector::{Connector, Sender, adapt_head};
use crate::proxy_protocol::Addresses;
use crate::retry::AttemptBody;

/// What a pooled connection is kept for: its backend, and with
/// `send_proxy_protocol` the client its PROXY header named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    backend: SocketAddr,
    client: Option<SocketAddr>,
}

impl std::hash::Hash for Key {
    /// An IPv4 address and port as one word: `SocketAddr`'s own `Hash`
    /// feeds the hasher field by field (its kind, each address byte slice,
    /// the port), which cost about 230 instructions per request for the
    /// pool's two lookups. An IPv6 address is hashed whole (a client's
    /// address is a key with `send_proxy_protocol`: folding it would let a
    /// client choose addresses that collide whatever the seed).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        fn address<H: std::hash::Hasher>(address: SocketAddr, state: &mut H) {
            match address {
                SocketAddr::V4(a) => {
                    state.write_u64((u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()));
                }
                SocketAddr::V6(a) => {
                    state.write_u128(a.ip().to_bits());
                    state.write_u16(a.port());
                }
            }
        }
        address(self.backend, state);
        if let Some(client) = self.client {
            address(client, state);
        }
    }
}

/// With `send_proxy_protocol`, idle queues of departed clients are swept
/// once the map holds this many keys (then again at twice as many as
/// remained), so it stays bounded by the clients of the last
/// `pool_idle_timeout_ms`.
const SWEEP_AT_KEYS: usize = 256;

/// How an upstream's pool bounds its idle connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolSettings {
    /// Idle HTTP/1.1 connections kept per backend (`pool_max_idle_per_backend`;
    /// `usize::MAX` if unset, 0: none, every connection closes after its
    /// response).
    pub max_idle: usize,
    /// Longest idle time of a pooled connection, in ms (`pool_idle_timeout_ms`).
    pub idle_timeout_ms: u64,
}

impl PoolSettings {
    /// The settings of an upstream configured as `config`.
    pub(crate) fn new(config: &crate::config::UpstreamConfig) -> Self {
        Self {
            max_idle: config
                .pool_max_idle_per_backend
                .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            idle_timeout_ms: config.pool_idle_timeout_ms,
        }
    }

    /// Period of the idle sweep: half the idle timeout, between 100 ms and 5 s.
    fn sweep_period(&self) -> Duration {
        Duration::from_millis((self.idle_timeout_ms / 2).clamp(100, 5_000))
    }
}

type H1 = http1::SendRequest<AttemptBody>;
type H2 = http2::SendRequest<AttemptBody>;

/// Idle HTTP/1.1 connections and shared HTTP/2 connections per backend
/// address.
#[derive(Debug)]
pub(crate) struct ConnPool {
    connector: Connector,
    settings: PoolSettings,
    idle: Mutex<IdleMap>,
    /// One multiplexed connection per backend; every request clones it.
    shared: Mutex<HashMap<Key, SharedH2>>,
}

/// A shared HTTP/2 connection.
#[derive(Debug)]
struct SharedH2 {
    sender: H2,
    /// When a request last took it, in [`crate::conn::now_ms`]'s coarse ms.
    used_ms: u64,
}

#[derive(Debug, Default)]
struct IdleMap {
    queues: HashMap<Key, VecDeque<Idle>>,
    /// Keys at which the next sweep runs (`send_proxy_protocol` only).
    sweep_at: usize,
}

#[derive(Debug)]
struct Idle {
    sender: H1,
    /// When it was pooled, in [`crate::conn::now_ms`]'s coarse ms.
    since_ms: u64,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Connecting, the TLS handshake or the HTTP/2 handshake failed or timed
    /// out (`connect_timeout_ms`): nothing was sent.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed after (some of) the request may have been sent.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// An upgrade request (`Upgrade`, e.g. WebSocket) met an HTTP/2
    /// connection, which has no upgrades: nothing was sent.
    #[error("an HTTP upgrade needs HTTP/1.1 to the backend, and it chose HTTP/2")]
    UpgradeOverH2,
}

/// A pooled connection on loan to one response: returned to the pool when
/// the response body is finished ([`Lease::finished`]), closed if dropped
/// before. An HTTP/2 stream's lease holds nothing: its connection stays
/// shared.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: Arc<ConnPool>,
    key: Key,
    sender: Option<H1>,
}

impl Lease {
    /// The response was read to its end: the connection can carry the next
    /// request.
    pub(crate) fn finished(&mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if sender.is_ready() {
            self.pool.put(self.key, sender);
        } else if !sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // Still sending the request body (the backend answered early),
            // or hyper has not yet seen the end: pool it once it is ready,
            // so no request waits behind it. (Outside a runtime, as at
            // shutdown, it is closed instead.)
            let (pool, key) = (self.pool.clone(), self.key);
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(key, sender);
                }
            });
        }
    }
}

impl ConnPool {
    /// An empty pool whose connections `connector` opens, bounded by
    /// `settings`. Inside a tokio runtime it also starts the pool's idle
    /// sweep, which ends when the pool is dropped.
    pub(crate) fn new(connector: Connector, settings: PoolSettings) -> Arc<Self> {
        let pool = Arc::new(Self {
            connector,
            settings,
            idle: Mutex::new(IdleMap::default()),
            shared: Mutex::new(HashMap::default()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep_loop(Arc::downgrade(&pool), settings.sweep_period()));
        }
        pool
    }

    /// True if a reload to `connector` and `settings` may keep this pool.
    pub(crate) fn fits(&self, connector: &Connector, settings: &PoolSettings) -> bool {
        self.connector == *connector && self.settings == *settings
    }

    /// Send `request` (origin-form URI, `Host` set) from `client` to
    /// `address` on a pooled connection or a new one; the response and the
    /// lease of its connection. For HTTP/2 the head is adapted first
    /// ([`adapt_head`]). `client` matters only with `send_proxy_protocol`:
    /// its PROXY header, and connections kept for it alone.
    ///
    /// # Errors
    /// [`SendError::Connect`] if no connection could be opened (nothing was
    /// sent), [`SendError::Http`] if the connection failed with the request
    /// (perhaps partly) sent, [`SendError::UpgradeOverH2`] for a request
    /// with `Upgrade` on an HTTP/2 connection.
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(crate) fn send(
        self: &Arc<Self>,
        address: SocketAddr,
        client: &Addresses,
        mut request: http::Request<AttemptBody>,
    ) -> impl std::future::Future<Output = Result<(http::Response<Incoming>, Lease), SendError>> + Send
    {
        async move {
            let upgrade = request.headers().contains_key(http::header::UPGRADE);
            let tls = self.connector.is_tls();
            let proxied = self.connector.sends_proxy_protocol().then_some(*client);
            let key = Key {
                backend: address,
                client: proxied.map(|p| p.source),
            };
            let mut adapted = None;
            loop {
                let (sender, reused) = match self.take(key) {
                    Some(sender) => (sender, true),
                    None => {
                        let sender = self
                            .connector
                            .connect(address, proxied)
                            .await
                            .map_err(SendError::Connect)?;
                        if let Sender::H2(h2) = &sender {
                            self.share(key, h2.clone());
                        }
                        (sender, false)
                    }
                };
                let h2 = matches!(sender, Sender::H2(_));
                if h2 && upgrade {
                    return Err(SendError::UpgradeOverH2);
                }
                if adapted != Some(h2) {
                    adapt_head(&mut request, h2, tls, address);
                    adapted = Some(h2);
                }
                let result = match sender {
                    Sender::H1(mut sender) => match sender.try_send_request(request).await {
                        Ok(response) => Ok((response, Some(sender))),
                        Err(e) => Err(e),
                    },
                    Sender::H2(mut sender) => match sender.try_send_request(request).await {
                        Ok(response) => Ok((response, None)),
                        Err(e) => {
                            self.unshare(key, &sender);
                            Err(e)
                        }
                    },
                };
                match result {
                    Ok((response, sender)) => {
                        let lease = Lease {
                            pool: self.clone(),
                            key,
                            sender,
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
    }

    /// A connection to `address` that can take a request now: the shared
    /// HTTP/2 one if open, else the most recently returned idle HTTP/1.1
    /// one that is still ready; closes those idle past
    /// `pool_idle_timeout_ms` or closed by the backend (only ready
    /// connections are pooled, so a pooled one is either ready or closed).
    fn take(&self, key: Key) -> Option<Sender<AttemptBody>> {
        // An `http1` upstream never shares a connection: no second lock.
        if self.connector.may_be_h2() {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(h2) = shared.get_mut(&key) {
                if !h2.sender.is_closed() {
                    h2.used_ms = crate::conn::now_ms();
                    return Some(Sender::H2(h2.sender.clone()));
                }
                shared.remove(&key);
            }
        }
        let now_ms = crate::conn::now_ms();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let queue = idle.queues.get_mut(&key)?;
        while let Some(Idle { sender, since_ms }) = queue.pop_back() {
            if sender.is_ready() && !self.expired(since_ms, now_ms) {
                return Some(Sender::H1(sender));
            }
        }
        None
    }

    /// Share a new HTTP/2 connection (replacing one that raced it).
    fn share(&self, key: Key, sender: H2) {
        let used_ms = crate::conn::now_ms();
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if key.client.is_some() && shared.len() >= SWEEP_AT_KEYS {
            // Per-client connections of clients that left.
            shared.retain(|_, h2| !self.unused(h2, used_ms));
        }
        shared.insert(key, SharedH2 { sender, used_ms });
    }

    /// Stop sharing `address`'s HTTP/2 connection if it is closed.
    fn unshare(&self, key: Key, sender: &H2) {
        if sender.is_closed() {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            if shared.get(&key).is_some_and(|h2| h2.sender.is_closed()) {
                shared.remove(&key);
            }
        }
    }

    /// Pool a ready connection; past `pool_max_idle_per_backend` the least
    /// recently used idle connection to its backend is closed (with 0, this
    /// one).
    fn put(&self, key: Key, sender: H1) {
        let max_idle = self.settings.max_idle;
        if max_idle == 0 {
            return;
        }
        let now_ms = crate::conn::now_ms();
        let stale = |i: &Idle| self.stale(i, now_ms);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if key.client.is_some() && idle.queues.len() >= idle.sweep_at.max(SWEEP_AT_KEYS) {
            // Per-client queues: drop those of clients gone quiet.
            idle.queues.retain(|_, queue| {
                queue.retain(|i| !stale(i));
                !queue.is_empty()
            });
            idle.sweep_at = idle.queues.len() * 2;
        }
        let queue = idle.queues.entry(key).or_default();
        // The oldest are at the front: close those idle too long.
        while queue.front().is_some_and(stale) {
            queue.pop_front();
        }
        if queue.len() >= max_idle {
            queue.pop_front();
        }
        queue.push_back(Idle {
            sender,
            since_ms: now_ms,
        });
    }

    /// True if `idle` has been idle past `pool_idle_timeout_ms` at `now_ms`,
    /// or the backend closed it.
    fn stale(&self, idle: &Idle, now_ms: u64) -> bool {
        self.expired(idle.since_ms, now_ms) || idle.sender.is_closed()
    }

    /// True if a connection pooled at `since_ms` is idle past
    /// `pool_idle_timeout_ms` at `now_ms`.
    fn expired(&self, since_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(since_ms) >= self.settings.idle_timeout_ms
    }

    /// Close idle connections past `pool_idle_timeout_ms` and forget those
    /// the backend closed; forget HTTP/2 connections that closed, and stop
    /// sharing those no request took for `pool_idle_timeout_ms` (each
    /// closes once its open streams end: hyper closes an HTTP/2 connection
    /// when its last handle is dropped).
    fn sweep(&self) {
        let now_ms = crate::conn::now_ms();
        // Dropping a sender wakes its connection's task, which shuts the
        // socket down (as `put` drops them, under the lock).
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queues
            .retain(|_, queue| {
                queue.retain(|i| !self.stale(i, now_ms));
                !queue.is_empty()
            });
        if self.connector.may_be_h2() {
            self.shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|_, h2| !self.unused(h2, now_ms));
        }
    }

    /// True if no request took shared connection `h2` for
    /// `pool_idle_timeout_ms` at `now_ms`, or it closed: no longer shared.
    fn unused(&self, h2: &SharedH2, now_ms: u64) -> bool {
        self.expired(h2.used_ms, now_ms) || h2.sender.is_closed()
    }

    /// Idle connections held now (all backends).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queues
            .values()
            .map(VecDeque::len)
            .sum()
    }
}

/// Sweep `pool` every `period` ([`PoolSettings::sweep_period`]) until it
/// is dropped.
async fn sweep_loop(pool: std::sync::Weak<ConnPool>, period: Duration) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::config::DEFAULT_POOL_IDLE_TIMEOUT_MS;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[test]
    fn keys_that_differ_are_kept_apart_and_equal_ones_found() {
        let key = |backend: &str, client: Option<&str>| Key {
            backend: backend.parse().unwrap(),
            client: client.map(|c| c.parse().unwrap()),
        };
        let keys = [
            key("10.0.0.1:80", None),
            key("10.0.0.1:81", None),
            key("10.0.0.2:80", None),
            key("[::ffff:10.0.0.1]:80", None),
            key("[2001:db8::1]:80", None),
            key("[2001:db8::1]:80", Some("192.0.2.7:5000")),
            key("10.0.0.1:80", Some("192.0.2.7:5000")),
            key("10.0.0.1:80", Some("192.0.2.7:5001")),
        ];
        let mut map: HashMap<Key, usize> = HashMap::default();
        for (i, k) in keys.iter().enumerate() {
            map.insert(*k, i);
        }
        assert_eq!(map.len(), keys.len());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(k), Some(&i));
        }
    }

    /// A backend that answers `n` requests per connection, then closes it;
    /// returns its address and the count of accepted connections.
    async fn backend(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let (address, accepted, _) = counting_backend(per_conn).await;
        (address, accepted)
    }

    /// As [`backend`], and the count of connections the proxy side closed.
    async fn counting_backend(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, closes) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, SeqCst);
                let closes = closes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                closes.fetch_add(1, SeqCst);
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
        (address, accepted, closed)
    }

    /// Wait (at most 10 s) until `read` returns `want`.
    async fn until_eq(read: impl Fn() -> usize, want: usize) {
        for _ in 0..1000 {
            if read() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("stayed at {}, not {want}", read());
    }

    /// Wait (at most 10 s) until `count` reaches `want`.
    async fn until(count: &AtomicUsize, want: usize) {
        until_eq(|| count.load(SeqCst), want).await;
    }

    /// A plaintext pool with these [`PoolSettings`].
    fn pool_with(max_idle: usize, idle_timeout_ms: u64) -> Arc<ConnPool> {
        let settings = PoolSettings {
            max_idle,
            idle_timeout_ms,
        };
        ConnPool::new(Connector::plain(Duration::from_secs(1)), settings)
    }

    /// `n` requests in flight at once, then every response read: `n`
    /// connections returned to the pool at the same time.
    async fn burst(pool: &Arc<ConnPool>, address: SocketAddr, n: usize) {
        let mut leases = Vec::new();
        for _ in 0..n {
            let (response, lease) = pool.send(address, &CLIENT, request()).await.unwrap();
            leases.push((response, lease));
        }
        for (response, mut lease) in leases {
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
            lease.finished();
        }
    }

    const CLIENT: Addresses = Addresses {
        source: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000),
        destination: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 80),
    };

    fn request() -> http::Request<AttemptBody> {
        http::Request::builder()
            .uri("/")
            .header("host", "t")
            .body(AttemptBody::empty())
            .unwrap()
    }

    async fn get(pool: &Arc<ConnPool>, address: SocketAddr) -> Bytes {
        let (response, mut lease) = pool.send(address, &CLIENT, request()).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        lease.finished();
        body
    }

    #[tokio::test]
    async fn a_finished_response_returns_its_connection_for_reuse() {
        let (address, accepted) = backend(usize::MAX).await;
        let pool = pool_with(usize::MAX, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        for _ in 0..5 {
            assert_eq!(get(&pool, address).await, "ok");
        }
        assert_eq!(accepted.load(SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_unfinished_does_not_return_its_connection() {
        let (address, accepted) = backend(usize::MAX).await;
        let pool = pool_with(usize::MAX, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        let (_response, lease) = pool.send(address, &CLIENT, request()).await.unwrap();
        drop(lease);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(get(&pool, address).await, "ok");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_replaced_without_an_error() {
        // One request per connection, but the backend does not say
        // `connection: close`: the pooled connection is found closed.
        let (address, accepted) = backend(1).await;
        let pool = pool_with(usize::MAX, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        for _ in 0..4 {
            assert_eq!(get(&pool, address).await, "ok");
            // Let the close reach hyper, as between real requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(SeqCst), 4);
    }

    #[tokio::test]
    async fn past_max_idle_the_least_recently_used_connections_close() {
        let (address, accepted, closed) = counting_backend(usize::MAX).await;
        let pool = pool_with(2, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        burst(&pool, address, 5).await;
        assert_eq!(accepted.load(SeqCst), 5);
        assert_eq!(pool.idle_count(), 2);
        until(&closed, 3).await;
        // The two kept are reused: no new connection.
        burst(&pool, address, 2).await;
        assert_eq!(accepted.load(SeqCst), 5);
    }

    #[tokio::test]
    async fn max_idle_zero_closes_every_connection_after_its_response() {
        let (address, accepted, closed) = counting_backend(usize::MAX).await;
        let pool = pool_with(0, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        for _ in 0..3 {
            assert_eq!(get(&pool, address).await, "ok");
        }
        assert_eq!(accepted.load(SeqCst), 3);
        assert_eq!(pool.idle_count(), 0);
        until(&closed, 3).await;
    }

    #[tokio::test]
    async fn the_sweep_closes_connections_idle_past_the_timeout_without_a_request() {
        let (address, accepted, closed) = counting_backend(usize::MAX).await;
        let pool = pool_with(usize::MAX, 200);
        burst(&pool, address, 3).await;
        assert_eq!(pool.idle_count(), 3);
        // No further request: the sweep alone closes them.
        until(&closed, 3).await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(accepted.load(SeqCst), 3);
    }

    #[tokio::test]
    async fn the_sweep_ends_when_the_pool_is_dropped() {
        let pool = pool_with(usize::MAX, 200);
        let weak = Arc::downgrade(&pool);
        drop(pool);
        assert!(
            weak.upgrade().is_none(),
            "the sweep task holds only a weak reference"
        );
    }

    /// An h2c backend answering "ok"; each response's body waits for
    /// `release` (a permit per body). Returns its address and the counts of
    /// accepted and of ended connections.
    async fn h2c_backend(
        release: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (count, ends) = (accepted.clone(), ended.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, SeqCst);
                let (ends, release) = (ends.clone(), release.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_| {
                        let release = release.clone();
                        async move {
                            let chunk = futures_util::stream::once(async move {
                                release.notified().await;
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from("ok")))
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(StreamBody::new(
                                chunk,
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                    .await;
                    ends.fetch_add(1, SeqCst);
                });
            }
        });
        (address, accepted, ended)
    }

    /// An h2c pool whose connections are idle after `idle_timeout_ms`.
    fn h2c_pool(idle_timeout_ms: u64) -> Arc<ConnPool> {
        let mut config = crate::config::UpstreamConfig::new(
            crate::config::PluginRef::Builtin("round-robin".into()),
            Vec::new(),
        );
        config.protocol = crate::config::UpstreamProtocol::H2c;
        let settings = PoolSettings {
            max_idle: usize::MAX,
            idle_timeout_ms,
        };
        ConnPool::new(Connector::new(&config), settings)
    }

    fn shared_count(pool: &ConnPool) -> usize {
        pool.shared.lock().unwrap().len()
    }

    #[tokio::test]
    async fn an_http2_connection_no_request_takes_is_closed_by_the_sweep() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (address, accepted, ended) = h2c_backend(release.clone()).await;
        let pool = h2c_pool(200);
        release.notify_one();
        assert_eq!(get(&pool, address).await, "ok");
        assert_eq!((accepted.load(SeqCst), shared_count(&pool)), (1, 1));
        // No further request: the sweep alone closes it.
        until(&ended, 1).await;
        assert_eq!(shared_count(&pool), 0);
        // The next request opens a new one.
        release.notify_one();
        assert_eq!(get(&pool, address).await, "ok");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn an_http2_connection_requests_keep_taking_stays_shared() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (address, accepted, ended) = h2c_backend(release.clone()).await;
        let pool = h2c_pool(400);
        // 12 requests 50 ms apart: past the idle timeout in all, never
        // idle for it.
        for _ in 0..12 {
            release.notify_one();
            assert_eq!(get(&pool, address).await, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((accepted.load(SeqCst), ended.load(SeqCst)), (1, 0));
    }

    #[tokio::test]
    async fn a_stream_open_when_its_connection_stops_being_shared_still_finishes() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (address, accepted, ended) = h2c_backend(release.clone()).await;
        let pool = h2c_pool(100);
        let (response, mut lease) = pool.send(address, &CLIENT, request()).await.unwrap();
        // The response's head has arrived, its body has not; the sweep
        // stops sharing the connection meanwhile.
        until_eq(|| shared_count(&pool), 0).await;
        assert_eq!(ended.load(SeqCst), 0, "closed under an open stream");
        release.notify_one();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        lease.finished();
        // Its last stream ended: it closes.
        until(&ended, 1).await;
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let address = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = pool_with(usize::MAX, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        let err = pool.send(address, &CLIENT, request()).await.unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }
}
