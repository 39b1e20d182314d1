//! Active health checks, following HAProxy `check inter/rise/fall` and
//! Envoy's `health_checks`: every `interval_ms` each backend is probed over
//! a new connection opened as requests open theirs (the upstream's TLS and
//! protocol, [`crate::connector`]): a connect (`tcp`), `GET path` where 2xx
//! and 3xx pass (`http`), or the standard gRPC health check (`grpc`); `unhealthy_threshold` consecutive failures mark it unhealthy,
//! `healthy_threshold` consecutive passes mark it healthy again. Backends
//! start healthy.
//!
//! A state change is pushed to the upstream's plugin (`set-backends` with the
//! new `healthy` flags) and is visible through the `healthy` host function;
//! the built-in strategies and the fallback skip unhealthy backends. Health
//! lives in the backend's counters, so it survives config reloads. Backends
//! in `maint` are not probed.
//!
//! A probe that fails because the proxy itself is out of descriptors,
//! buffers, memory or ports ([`crate::fd_limit`]) counts neither way: a full
//! descriptor table never marks a healthy backend down.
//!
//! Each loop holds only a weak reference to its upstream and ends when a
//! reload or shutdown drops it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::connector::{Connector, Sender, adapt_head};

use crate::config::{AdminState, Config, HealthCheckConfig, HealthCheckKind};
use crate::log_limit::LogLimiter;
use crate::metrics::{LocalOp, Metrics};
use crate::upstream::Upstream;

/// Start the probe loops of the `upstreams` whose config has a
/// `health_check`. Must run inside a tokio runtime.
pub fn start<'a>(
    upstreams: impl IntoIterator<Item = &'a Arc<Upstream>>,
    metrics: &Arc<Metrics>,
    config: &Config,
) {
    for upstream in upstreams {
        let Some(hc) = config
            .upstreams
            .get(upstream.name())
            .and_then(|u| u.health_check.clone())
        else {
            continue;
        };
        let addresses: Vec<SocketAddr> = upstream.backends().iter().map(|b| b.address).collect();
        watch(upstream, &addresses, &hc, metrics);
    }
}

/// Start probing `addresses`, backends of `upstream` (those that joined it
/// after the start, through discovery or the admin API). Each loop ends
/// when its backend leaves the upstream or the upstream is dropped.
pub fn watch(
    upstream: &Arc<Upstream>,
    addresses: &[SocketAddr],
    hc: &HealthCheckConfig,
    metrics: &Arc<Metrics>,
) {
    for &address in addresses {
        tokio::spawn(probe_loop(
            Arc::downgrade(upstream),
            address,
            hc.clone(),
            metrics.clone(),
        ));
    }
}

async fn probe_loop(
    upstream: Weak<Upstream>,
    address: SocketAddr,
    hc: HealthCheckConfig,
    metrics: Arc<Metrics>,
) {
    static LOCAL: LogLimiter = LogLimiter::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        let maint = {
            let Some(up) = upstream.upgrade() else { return };
            up.backends()
                .iter()
                .find(|b| b.address == address)
                .is_some_and(|b| b.live.admin_state() == AdminState::Maint)
        };
        if maint {
            continue;
        }
        let connector = match upstream.upgrade() {
            Some(up) => up.connector.clone(),
            None => return,
        };
        match probe(&hc, address, &connector).await {
            Probe::Pass => {
                passes = passes.saturating_add(1);
                fails = 0;
            }
            Probe::Fail => {
                fails = fails.saturating_add(1);
                passes = 0;
            }
            Probe::Local(e) => {
                metrics.resources().local_error(LocalOp::HealthCheck);
                if let Some(suppressed) = LOCAL.admit() {
                    tracing::warn!(backend = %address, suppressed, "health check skipped, out of local resources: {e}");
                }
                continue;
            }
        }
        let Some(up) = upstream.upgrade() else { return };
        let passing = up
            .backends()
            .iter()
            .find(|b| b.address == address)
            .map(|b| b.live.check_passing.load(Ordering::Relaxed));
        match passing {
            None => return,
            Some(true) if fails >= hc.unhealthy_threshold => up.set_check_passing(address, false),
            Some(false) if passes >= hc.healthy_threshold => up.set_check_passing(address, true),
            Some(_) => {}
        }
    }
}

/// True if `body` (one gRPC frame of a `HealthCheckResponse`) says
/// `SERVING`: field 1 (`status`, varint) is 1.
fn grpc_serving(body: &[u8]) -> bool {
    // 5-byte frame header: compressed flag, big-endian length.
    let Some(message) = body.get(5..) else {
        return false;
    };
    message == [0x08, 0x01]
}

/// The outcome of one probe.
#[derive(Debug)]
pub enum Probe {
    /// Connected (TCP), or answered 2xx/3xx (HTTP), within `timeout_ms`.
    Pass,
    /// Anything else the backend could be blamed for.
    Fail,
    /// The proxy could not open a socket (out of descriptors, buffers,
    /// memory or ports): says nothing about the backend.
    Local(std::io::Error),
}

/// The path of the standard gRPC health check.
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// One probe within `timeout_ms`, connecting with `connector`.
pub async fn probe(hc: &HealthCheckConfig, address: SocketAddr, connector: &Connector) -> Probe {
    let mut local = None;
    let check = async {
        let blame = |e: std::io::Error, local: &mut Option<std::io::Error>| {
            if crate::fd_limit::is_local_resource_error(&e) {
                *local = Some(e);
            }
        };
        if hc.kind == HealthCheckKind::Tcp {
            return match connector.reach(address).await {
                Ok(()) => Some(true),
                Err(e) => {
                    blame(e, &mut local);
                    None
                }
            };
        }
        let sender = match connector.connect::<Full<Bytes>>(address, None).await {
            Ok(s) => s,
            Err(e) => {
                blame(e, &mut local);
                return None;
            }
        };
        let grpc = hc.kind == HealthCheckKind::Grpc;
        let mut request = if grpc {
            http::Request::post(GRPC_HEALTH_CHECK)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                // A gRPC frame: not compressed, 0 bytes (an empty service name).
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        } else {
            http::Request::get(hc.path.as_str()).body(Full::new(Bytes::new()))
        }
        .ok()?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::HOST,
            http::HeaderValue::from_str(&address.to_string()).ok()?,
        );
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("wasmlb-health-check"),
        );
        let h2 = matches!(sender, Sender::H2(_));
        adapt_head(&mut request, h2, connector.is_tls(), address);
        let response = match sender {
            Sender::H1(mut s) => s.send_request(request).await.ok()?,
            Sender::H2(mut s) => s.send_request(request).await.ok()?,
        };
        let status = response.status();
        if !grpc {
            return Some(status.is_success() || status.is_redirection());
        }
        let grpc_status_in =
            |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.as_bytes() == b"0");
        let head_status = grpc_status_in(response.headers());
        let collected = response.into_body().collect().await.ok()?;
        let trailer_status = collected.trailers().and_then(grpc_status_in);
        let ok = status == http::StatusCode::OK && trailer_status.or(head_status) == Some(true);
        Some(ok && grpc_serving(&collected.to_bytes()))
    };
    let passed = tokio::time::timeout(Duration::from_millis(hc.timeout_ms), check)
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
    match (passed, local) {
        (true, _) => Probe::Pass,
        (false, Some(e)) => Probe::Local(e),
        (false, None) => Probe::Fail,
    }
}
