//! An HTTP upgrade's tunnel (RFC 9110 §7.8): after a backend answers
//! `101 Switching Protocols`, the client's connection and the backend's are
//! spliced by [`crate::tunnel::relay`] until either side closes.
//!
//! The request path cannot run it: hyper has yet to write the 101 to the
//! client. So [`Proxy::handle`](super::Proxy::handle) leaves the [`Tunnel`]
//! on the [`Downstream`](super::Downstream), and the connection's task takes
//! it once hyper hands the connection back ([`super::Downstream::take_tunnel`]).
//!
//! Over HTTP/2 (RFC 8441 extended CONNECT) the tunnel is one stream of the
//! client's connection: the `200` response carries an [`H2Tunnel`], and
//! the connection's service spawns it; hyper upgrades the stream once the
//! `200` is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tunnel::{RelayCounters, RelayEnd, relay};
use crate::upstream::{InFlight, Upstream};

/// A backend connection switching protocols, waiting for the client's
/// connection. It counts as a request in flight to its backend (so
/// least-connections sees long-lived WebSockets) until it ends.
#[derive(Debug)]
pub struct Tunnel {
    backend: hyper::upgrade::OnUpgrade,
    address: SocketAddr,
    idle: Duration,
    open: Gauge,
    counters: RelayCounters,
    _in_flight: InFlight,
}

impl Tunnel {
    /// The tunnel to the backend at `address` whose 101 response `backend`
    /// upgrades, under `upstream`'s `tunnel_idle_timeout_ms` and metrics.
    pub(super) fn new(
        backend: hyper::upgrade::OnUpgrade,
        address: SocketAddr,
        upstream: &Upstream,
        in_flight: InFlight,
    ) -> Self {
        let metrics = upstream.metrics();
        Self {
            backend,
            address,
            idle: upstream.tunnel_idle_timeout,
            open: metrics.tunnels_open.clone(),
            counters: RelayCounters {
                to_backend: metrics.tunnel_bytes_to_backend.clone(),
                to_client: metrics.tunnel_bytes_to_client.clone(),
            },
            _in_flight: in_flight,
        }
    }

    /// Relay between `client` (the downstream connection, after the 101 was
    /// written to it) and the backend until both close, either fails, or
    /// nothing moves for `tunnel_idle_timeout_ms`. Never fails: how it ended
    /// is logged at debug level.
    pub async fn run<D>(self, mut client: D)
    where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        let address = self.address;
        let backend = match self.backend.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%address, "the backend's upgraded connection is gone: {e}");
                return;
            }
        };
        let mut backend = TokioIo::new(backend);
        self.open.inc();
        let result = relay(&mut client, &mut backend, self.idle, &self.counters).await;
        self.open.dec();
        match result {
            Ok(r) if r.end == RelayEnd::IdleTimeout => tracing::debug!(
                %address,
                "tunnel closed: nothing relayed for tunnel_idle_timeout_ms = {}",
                self.idle.as_millis()
            ),
            Ok(r) => tracing::debug!(
                %address,
                to_backend = r.to_backend,
                to_client = r.to_client,
                "tunnel closed by both sides"
            ),
            Err(e) => tracing::debug!(%address, "tunnel broken: {e}"),
        }
    }
}

/// An HTTP/2 extended CONNECT's tunnel (RFC 8441), carried in the
/// extensions of the `200` that opens it: the client's stream, upgraded
/// once hyper has sent the `200`, and the backend's [`Tunnel`]. Cloneable
/// only because response extensions must be; the first [`H2Tunnel::run`]
/// takes it.
#[derive(Clone, Debug)]
pub struct H2Tunnel(Arc<Mutex<Option<(hyper::upgrade::OnUpgrade, Tunnel)>>>);

impl H2Tunnel {
    /// The tunnel between `client`'s upgraded stream and `backend`.
    pub(super) fn new(client: hyper::upgrade::OnUpgrade, backend: Tunnel) -> Self {
        Self(Arc::new(Mutex::new(Some((client, backend)))))
    }

    /// Wait for the client's stream (hyper upgrades it once the `200` is
    /// sent), then relay as [`Tunnel::run`]; `busy` (the connection's
    /// request guard) is held until the tunnel ends. Never fails.
    pub async fn run<G>(self, busy: G) {
        let taken = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((client, tunnel)) = taken else {
            return;
        };
        match client.await {
            Ok(stream) => tunnel.run(TokioIo::new(stream)).await,
            Err(e) => tracing::debug!(
                address = %tunnel.address,
                "the client's extended CONNECT stream is gone: {e}"
            ),
        }
        drop(busy);
    }
}
