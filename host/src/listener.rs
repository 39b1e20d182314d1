//! Listeners and connections: accept within the connection caps, serve
//! HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, or, on
//! a listener with `[listener.tls]`, terminate TLS (rustls: certificate by
//! SNI, HTTP/2 or HTTP/1.1 by ALPN), and on stop let open connections finish
//! their in-flight requests.
//!
//! The TLS handshake runs under the head-read timeout (a client that never
//! finishes it is closed then, like one that never sends its head); a failed
//! handshake (plaintext on a TLS port, an unknown protocol, a bad hello)
//! closes the connection and counts in `wasmlb_tls_handshake_failures_total`.
//!
//! Every request reads the current [`Proxy`] from an `ArcSwap` once, when it
//! arrives, and finishes on it (see [`crate::control`] for how a reload swaps
//! it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::{ConnActivity, ConnLimit, ConnPermit, TimedIo};
use crate::log_limit::LogLimiter;
use crate::metrics::{LocalOp, Metrics};
use crate::proxy::{Downstream, DownstreamTls, ListenerKey, Proxy, ProxyBody};
use crate::tunnel::Prefixed;

/// An error that ends a downstream connection (hyper's, TLS, I/O, PROXY header).
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every listener's accept loop reads: the proxy serving new requests,
/// the metrics and the global connection cap.
pub(crate) struct Serving {
    /// The proxy new requests are served by; a reload swaps it.
    pub proxy: ArcSwap<Proxy>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The global `max_connections`, over all listeners.
    pub conn_limit: Arc<ConnLimit>,
}

/// A running listener: its accept loop, and how to stop it.
pub(crate) struct ListenerTask {
    /// Which configured listener it is.
    pub key: ListenerKey,
    /// The bound address.
    pub local: SocketAddr,
    /// The listener's own `max_connections` (`usize::MAX` if unset).
    pub limit: Arc<ConnLimit>,
    /// Send `true` to stop accepting.
    pub stop: watch::Sender<bool>,
    /// The accept loop; true once every connection finished.
    pub task: JoinHandle<bool>,
}

/// The global connection cap for `config`: `max_connections`, else derived
/// from the process's `RLIMIT_NOFILE`.
pub(crate) fn global_max_connections(config: &Config) -> usize {
    config.server.max_connections.unwrap_or_else(|| {
        crate::config::derived_max_connections(crate::fd_limit::nofile(), config)
    })
}

/// Start the accept loop of `listener` (configured as `key`, with its own
/// `max_connections` if set).
pub(crate) fn spawn_listener(
    serving: &Arc<Serving>,
    key: ListenerKey,
    listener: TcpListener,
    max_connections: Option<usize>,
) -> ListenerTask {
    let local = listener.local_addr().unwrap_or(key.address);
    let (stop, stop_rx) = watch::channel(false);
    let limit = ConnLimit::new(max_connections.unwrap_or(usize::MAX));
    let task = tokio::spawn(accept_loop(
        key,
        listener,
        serving.clone(),
        limit.clone(),
        stop_rx,
    ));
    ListenerTask {
        key,
        local,
        limit,
        stop,
        task,
    }
}

/// hyper's HTTP/1 and HTTP/2 connection settings for a listener.
#[derive(Clone, Debug)]
struct Protocols {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    /// The settings for `limits`: heads that cannot fit are answered 431 (or
    /// 414) by hyper itself, with bounded memory (see [`crate::request_rules`]).
    fn new(limits: &crate::config::RequestLimits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(crate::request_rules::h1_max_buf_size(limits))
            .max_headers(limits.max_headers);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.max_header_list_size(crate::request_rules::h2_max_header_list_size(limits))
            // RFC 8441: WebSocket (and other upgrades) over HTTP/2.
            .enable_connect_protocol();
        Self { h1, h2 }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4): a connection that opens
/// with it speaks h2c with prior knowledge.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// True if the connection opens with the HTTP/2 preface. Reads at most its
/// 24 bytes, under the head-read timeout, and leaves them unread.
async fn sniff_h2(io: &mut TimedIo<TcpStream>) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    while n < buf.len() {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            break;
        }
    }
    io.unread(bytes::Bytes::copy_from_slice(&buf[..n]));
    Ok(buf[..n] == H2_PREFACE[..])
}

/// Drive hyper connection `conn` (HTTP/1 or HTTP/2: the same inherent
/// methods, no common trait) to its end, finishing gracefully once
/// `closing` turns true; its result with the error boxed.
macro_rules! serve_until_closed {
    ($conn:expr, $closing:ident) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let (done, _) = drive(
            &mut conn,
            |c, cx| c.as_mut().poll(cx),
            |c| c.as_mut().graceful_shutdown(),
            &mut $closing,
        )
        .await;
        done.map_err(Into::into)
    }};
}

/// Serve an HTTP/2 connection until it closes, or until `closing` turns
/// true (then open streams finish, and it closes).
async fn serve_h2<I, S>(
    io: I,
    h2: &http2::Builder<TokioExecutor>,
    service: S,
    mut closing: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = crate::proxy::ProxyBody> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    serve_until_closed!(h2.serve_connection(TokioIo::new(io), service), closing)
}

/// Poll `conn` to its end with `poll`; the first time `closing` turns true
/// meanwhile, ask it to finish gracefully with `graceful`. Its result, and
/// whether it was asked to finish.
///
/// `closing` is polled (registering the task with the watch) only on the
/// first turn and when its version moved: the task wakes once per backend
/// response and once per request, and re-polling a registered watch future
/// takes its waiter lock each time.
async fn drive<C, R>(
    conn: &mut C,
    poll: fn(&mut C, &mut std::task::Context<'_>) -> std::task::Poll<R>,
    graceful: fn(&mut C),
    closing: &mut watch::Receiver<bool>,
) -> (R, bool) {
    // A second receiver to read the version without the wait's borrow.
    let probe = closing.clone();
    let wait = closing.wait_for(|c| *c);
    let mut wait = std::pin::pin!(wait);
    let mut shutting = false;
    let mut registered = false;
    std::future::poll_fn(|cx| {
        loop {
            if let std::task::Poll::Ready(done) = poll(conn, cx) {
                return std::task::Poll::Ready((done, shutting));
            }
            if shutting || (registered && !probe.has_changed().unwrap_or(true)) {
                return std::task::Poll::Pending;
            }
            registered = true;
            if wait.as_mut().poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            // Closing: finish gracefully, and poll the connection again.
            graceful(conn);
            shutting = true;
        }
    })
    .await
}

/// Serve one downstream connection until it closes, or until `closing`
/// turns true (then in-flight requests finish and it closes).
///
/// HTTP/2 (prior knowledge) is served by one hyper connection for its whole
/// life. HTTP/1 is served one busy period at a time: when the connection
/// has been idle for [`crate::conn::PARK_AFTER`] its hyper connection ends
/// and frees its buffers, and the socket
/// waits for the next request holding only its [`TimedIo`] (see there), so
/// an idle keep-alive connection costs a few hundred bytes, not hyper's 16 KiB
/// of buffers.
///
/// After a `101 Switching Protocols` (an upgrade, such as WebSocket) hyper
/// hands the connection back and it becomes the client side of the
/// [`crate::proxy::Tunnel`] the request left.
///
/// When the connection ends, `end` logs how (an error at debug level) and
/// releases its places under the connection caps.
#[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
fn serve_connection(
    mut io: TimedIo<TcpStream>,
    protocols: Arc<Protocols>,
    service: ProxyService,
    mut closing: watch::Receiver<bool>,
    end: ConnEnd,
) -> impl std::future::Future<Output = ()> + Send {
    // An `async` block, not an `async fn`: an `async fn` keeps its
    // arguments twice in its state (as captured, and moved into locals),
    // and this state is every idle connection's memory.
    async move {
        let closed = |c: &bool| *c;
        // One labelled block for every way out, so that this future is the
        // connection's whole task (no wrapper holding a second copy of its
        // arguments).
        let served: Result<(), BoxError> = 'serve: {
            let h2 = tokio::select! {
                h2 = sniff_h2(&mut io) => match h2 {
                    Ok(h2) => h2,
                    Err(e) => break 'serve Err(e.into()),
                },
                _ = closing.wait_for(closed) => break 'serve Ok(()),
            };
            if h2 {
                // Boxed: the HTTP/2 state is large, and every connection's task
                // would otherwise hold room for it.
                break 'serve Box::pin(serve_h2(io, &protocols.h2, service, closing)).await;
            }
            io.enable_parking();
            loop {
                // Boxed: allocated only while the connection is busy.
                let mut conn = Box::new(
                    protocols
                        .h1
                        .serve_connection(TokioIo::new(io), service.clone()),
                );
                let (done, shutting) = drive(
                    &mut conn,
                    |c, cx| c.poll_without_shutdown(cx),
                    |c| std::pin::Pin::new(&mut **c).graceful_shutdown(),
                    &mut closing,
                )
                .await;
                if let Err(e) = done {
                    break 'serve Err(e.into());
                }
                // Moved out through a function: a Box moved out of in place
                // keeps its allocation until the end of the loop's body,
                // i.e. for the whole parked wait below.
                let parts = unbox(conn).into_parts();
                io = parts.io.into_inner();
                if let Some(tunnel) = service.downstream.take_tunnel() {
                    // Busy for the tunnel's life: no idle timeout, no reclaim, no
                    // park (the tunnel has its own idle timeout).
                    let _busy = service.activity.begin();
                    io.unread(parts.read_buf);
                    // Boxed: rare, and its state would widen every connection's task.
                    Box::pin(tunnel.run(io)).await;
                    break 'serve Ok(());
                }
                if shutting || !io.take_parked() {
                    // The client closed, or hyper ended the connection: close ours.
                    let _ = io.shutdown().await;
                    break 'serve Ok(());
                }
                io.unread(parts.read_buf);
                tokio::select! {
                    ready = io.wait_readable() => if let Err(e) = ready {
                        break 'serve Err(e.into());
                    },
                    _ = closing.wait_for(closed) => break 'serve Ok(()),
                }
            }
        };
        end.finish(served);
    }
}

/// The value in `boxed`, its allocation freed now (moving out of a `Box` in
/// place frees it only when the `Box`'s scope ends).
#[allow(clippy::boxed_local)] // taking the Box is the point: it is freed on return
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

/// What a downstream connection gives back when its task ends (or is
/// dropped): its places under the listener's and the global connection caps,
/// its entry in the reclaim registry, and its count in
/// `wasmlb_connections_open`.
struct ConnEnd {
    peer: SocketAddr,
    open: prometheus_client::metrics::gauge::Gauge,
    _registration: crate::conn::Registration,
    _permits: [ConnPermit; 2],
}

impl ConnEnd {
    /// The connection ended with `served`: an error is logged at debug level
    /// (clients closing mid-request are routine, not the proxy's fault).
    fn finish(self, served: Result<(), BoxError>) {
        if let Err(e) = served {
            tracing::debug!(peer = %self.peer, "connection ended with an error: {e}");
        }
    }
}

impl Drop for ConnEnd {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// The per-connection service: hands each request to the current proxy,
/// with the connection's request guard held by the response body.
#[derive(Clone)]
struct ProxyService {
    shared: Arc<Serving>,
    key: ListenerKey,
    downstream: Arc<Downstream>,
    activity: Arc<ConnActivity>,
}

type ServiceFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<ProxyBody>, std::convert::Infallible>,
            > + Send,
    >,
>;

impl hyper::service::Service<http::Request<Incoming>> for ProxyService {
    type Response = http::Response<ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = ServiceFuture;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let proxy = self.shared.proxy.load_full();
        let (key, downstream) = (self.key, self.downstream.clone());
        // Boxed: hyper keeps room for the service's future in every
        // connection for its whole life; the request path's state (about
        // 1.6 KB) would otherwise be held by each idle keep-alive
        // connection (bench/run.py measures it).
        Box::pin(proxy.handle(key, downstream, req, guard))
    }
}

/// Terminate TLS on `io` with `acceptor`, then serve HTTP/2 or HTTP/1.1 as
/// ALPN chose (HTTP/1.1 if none), until the connection closes or `closing`
/// turns true. A failed or timed-out handshake is counted and closes the
/// connection. `service` makes the service once the session is known.
async fn serve_tls(
    io: TimedIo<TcpStream>,
    acceptor: tokio_rustls::TlsAcceptor,
    protocols: Arc<Protocols>,
    service: impl FnOnce(DownstreamTls) -> ProxyService,
    mut closing: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> Result<(), BoxError> {
    let stream = tokio::select! {
        s = acceptor.accept(io) => match s {
            Ok(s) => s,
            Err(e) => {
                metrics.resources().tls_handshake_failures.inc();
                return Err(format!("TLS handshake failed: {e}").into());
            }
        },
        _ = closing.wait_for(|c| *c) => return Ok(()),
    };
    let session = stream.get_ref().1;
    let tls = DownstreamTls {
        sni: session
            .server_name()
            .map(|n| Arc::from(n.to_ascii_lowercase())),
        alpn: session.alpn_protocol().map(<[u8]>::to_vec),
    };
    let h2 = tls.alpn.as_deref() == Some(b"h2".as_slice());
    let service = service(tls);
    if h2 {
        return Box::pin(serve_h2(stream, &protocols.h2, service, closing)).await;
    }
    let (downstream, activity) = (service.downstream.clone(), service.activity.clone());
    let mut conn = protocols.h1.serve_connection(TokioIo::new(stream), service);
    let (done, _) = drive(
        &mut conn,
        |c, cx| c.poll_without_shutdown(cx),
        |c| std::pin::Pin::new(c).graceful_shutdown(),
        &mut closing,
    )
    .await;
    done?;
    let parts = conn.into_parts();
    let mut stream = parts.io.into_inner();
    if let Some(tunnel) = downstream.take_tunnel() {
        let _busy = activity.begin();
        // Bytes the client sent after the upgrade request's head go first.
        let stream = Prefixed::new(parts.read_buf, stream);
        tunnel.run(stream).await;
        return Ok(());
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// With `accept_proxy_protocol`: read the connection's PROXY header within
/// `timeout` (the head-read timeout) and return the client and destination
/// it names, or `own` (the socket's) for a `LOCAL`/`UNKNOWN` header. Bytes
/// read past the header stay for the HTTP (or TLS) layer.
///
/// # Errors
/// A missing, invalid or late header: the connection is closed.
async fn proxied_addresses(
    stream: &mut TimedIo<TcpStream>,
    timeout: Duration,
    own: (SocketAddr, SocketAddr),
) -> Result<(SocketAddr, SocketAddr), BoxError> {
    let (addresses, rest) = crate::proxy_protocol::read_addresses(stream, timeout, own)
        .await
        .map_err(|e| format!("no PROXY protocol header: {e}"))?;
    stream.unread(rest);
    Ok(addresses)
}

/// Permits from the listener's cap and the global one, waiting (not
/// accepting) while either is reached. While the global cap is reached,
/// idle connections are reclaimed (see [`crate::conn`]) every
/// [`crate::conn::RECLAIM_MIN_IDLE`] until a slot frees.
async fn admit(
    own: &Arc<ConnLimit>,
    global: &Arc<ConnLimit>,
    metrics: &Metrics,
) -> [ConnPermit; 2] {
    static AT_CAP: LogLimiter = LogLimiter::new();
    if let (Some(a), Some(b)) = (own.try_acquire(), global.try_acquire()) {
        return [a, b];
    }
    metrics.resources().cap_reached.inc();
    let mut reported = false;
    let own_permit = own.acquire().await;
    loop {
        if let Some(p) = global.try_acquire() {
            return [own_permit, p];
        }
        let reclaimed = global.reclaim_idle(crate::conn::RECLAIM_BATCH);
        if !reported && let Some(suppressed) = AT_CAP.admit() {
            reported = true;
            tracing::warn!(
                open = global.open(),
                max_connections = global.max(),
                reclaimed,
                suppressed,
                "max_connections reached: closing idle connections, not accepting until one \
                 closes (new clients wait in the listen backlog)"
            );
        }
        tokio::select! {
            p = global.acquire() => return [own_permit, p],
            () = tokio::time::sleep(crate::conn::RECLAIM_MIN_IDLE) => {}
        }
    }
}

/// Accept connections until told to stop, then wait for open connections to
/// finish their in-flight requests. Returns true when all have. Each
/// connection holds permits under the listener's and the global
/// `max_connections`; at a cap the loop stops accepting.
async fn accept_loop(
    key: ListenerKey,
    listener: TcpListener,
    shared: Arc<Serving>,
    own_limit: Arc<ConnLimit>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    static ACCEPT_FAILED: LogLimiter = LogLimiter::new();
    // Connections hold a receiver: `closed()` is their end.
    let (closing, closing_rx) = watch::channel(false);
    // The settings of the limits last seen (a reload may change them).
    let mut current: Option<(crate::config::RequestLimits, Arc<Protocols>)> = None;
    let open = shared.metrics.resources().connections_open.clone();
    loop {
        let permits = tokio::select! {
            p = admit(&own_limit, &shared.conn_limit, &shared.metrics) => p,
            _ = stop.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        if crate::fd_limit::is_local_resource_error(&e) {
                            shared.metrics.resources().local_error(LocalOp::Accept);
                        }
                        if let Some(suppressed) = ACCEPT_FAILED.admit() {
                            tracing::warn!(listener = %key.address, suppressed, "accept failed: {e}");
                        }
                        drop(permits);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // The address the client reached (a wildcard listener's
                // real one), for PROXY headers to backends.
                let local = stream.local_addr().unwrap_or(key.address);
                let proxy = shared.proxy.load();
                if let Some(passthrough) = proxy.tcp_mode(&key) {
                    // TCP mode: never idle in the HTTP sense, never reclaimed.
                    let proxy = arc_swap::Guard::into_inner(proxy);
                    let activity = Arc::new(ConnActivity::default());
                    let busy = activity.begin();
                    let registration = shared.conn_limit.register(&activity);
                    let closing = closing_rx.clone();
                    open.inc();
                    let open = open.clone();
                    tokio::spawn(async move {
                        proxy.serve_tcp(key, (peer, local), stream, passthrough).await;
                        open.dec();
                        drop((busy, registration, permits, closing));
                    });
                    continue;
                }
                let (header_read, idle) = proxy.downstream_timeouts();
                let limits = proxy.limits();
                let protocols = match &current {
                    Some((seen, protocols)) if *seen == limits => protocols.clone(),
                    // First connection, or a reload changed the limits.
                    _ => {
                        let protocols = Arc::new(Protocols::new(&limits));
                        current = Some((limits, protocols.clone()));
                        protocols
                    }
                };
                let tls = proxy.tls_acceptor(&key);
                let accept_proxy = proxy.accepts_proxy_protocol(&key);
                drop(proxy);
                let (mut stream, activity) = TimedIo::new(stream, header_read, idle);
                let registration = shared.conn_limit.register(&activity);
                let service = {
                    let shared = shared.clone();
                    move |tls, (peer, local)| ProxyService {
                        shared,
                        key,
                        downstream: Arc::new(Downstream::new(peer, local, tls)),
                        activity,
                    }
                };
                let closing = closing_rx.clone();
                let metrics = shared.metrics.clone();
                open.inc();
                let end = ConnEnd {
                    peer,
                    open: open.clone(),
                    _registration: registration,
                    _permits: permits,
                };
                if tls.is_none() && !accept_proxy {
                    // The common case: the task is `serve_connection` itself.
                    let service = service(None, (peer, local));
                    tokio::spawn(serve_connection(stream, protocols, service, closing, end));
                    continue;
                }
                // The rare, large phases (the PROXY header, TLS) are boxed.
                tokio::spawn(async move {
                    let addresses = if accept_proxy {
                        Box::pin(proxied_addresses(&mut stream, header_read, (peer, local)))
                            .await
                    } else {
                        Ok((peer, local))
                    };
                    match (addresses, tls) {
                        (Err(e), _) => end.finish(Err(e)),
                        (Ok(addresses), None) => {
                            let service = service(None, addresses);
                            serve_connection(stream, protocols, service, closing, end).await;
                        }
                        (Ok(addresses), Some(acceptor)) => {
                            let service = move |session| service(Some(session), addresses);
                            let served = Box::pin(serve_tls(
                                stream, acceptor, protocols, service, closing, metrics,
                            ))
                            .await;
                            end.finish(served);
                        }
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    drop(closing_rx);
    let _ = closing.send(true);
    closing.closed().await;
    true
}
