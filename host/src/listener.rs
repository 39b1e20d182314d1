//! Listeners and connections: accept within the connection caps, serve
//! HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on the same port, and on
//! stop let open connections finish their in-flight requests.
//!
//! Every request reads the current [`Proxy`] from an `ArcSwap` once, when it
//! arrives, and finishes on it (see [`crate::control`] for how a reload swaps
//! it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::conn::{ConnLimit, ConnPermit, TimedIo};
use crate::log_limit::LogLimiter;
use crate::metrics::{LocalOp, Metrics};
use crate::proxy::{ListenerKey, Proxy};

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

/// hyper's connection settings for `limits`: heads that cannot fit are
/// answered 431 (or 414) by hyper itself, with bounded memory (see
/// [`crate::request_rules`]).
fn connection_builder(limits: &crate::config::RequestLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(crate::request_rules::h1_max_buf_size(limits))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .max_header_list_size(crate::request_rules::h2_max_header_list_size(limits));
    builder
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
    let graceful = GracefulShutdown::new();
    let mut limits = None;
    let mut builder = auto::Builder::new(TokioExecutor::new());
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
                let proxy = shared.proxy.load();
                let (header_read, idle) = proxy.downstream_timeouts();
                if limits != Some(proxy.limits()) {
                    // First connection, or a reload changed the limits.
                    limits = Some(proxy.limits());
                    builder = connection_builder(&proxy.limits());
                }
                drop(proxy);
                let (stream, activity) = TimedIo::new(stream, header_read, idle);
                let registration = shared.conn_limit.register(&activity);
                let shared = shared.clone();
                let service = service_fn(move |req| {
                    let guard = activity.begin();
                    let proxy = shared.proxy.load_full();
                    // Boxed: hyper keeps room for the service's future in every
                    // connection for its whole life; the request path's state
                    // (about 2.8 KB) would otherwise be held by each idle
                    // keep-alive connection (bench/run.py measures it).
                    Box::pin(async move {
                        let response = proxy.handle(key, peer, req).await;
                        response.map(|r| r.map(|body| body.with_request_guard(guard)))
                    })
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                open.inc();
                let open = open.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended with an error: {e}");
                    }
                    open.dec();
                    drop((registration, permits));
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    true
}
