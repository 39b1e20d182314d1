//! Active health checks, following HAProxy `check inter/rise/fall` and
//! Envoy's `health_checks`: every `interval_ms` each backend is probed (a TCP
//! connect, or `GET path` over a new HTTP/1.1 connection where 2xx and 3xx
//! pass); `unhealthy_threshold` consecutive failures mark it unhealthy,
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
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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
        for backend in upstream.backends().iter() {
            tokio::spawn(probe_loop(
                Arc::downgrade(upstream),
                backend.address,
                hc.clone(),
                metrics.clone(),
            ));
        }
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
        match probe(&hc, address).await {
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

/// One probe within `timeout_ms`.
pub async fn probe(hc: &HealthCheckConfig, address: SocketAddr) -> Probe {
    let mut local = None;
    let check = async {
        let stream = match TcpStream::connect(address).await {
            Ok(s) => s,
            Err(e) => {
                if crate::fd_limit::is_local_resource_error(&e) {
                    local = Some(e);
                }
                return None;
            }
        };
        if hc.kind == HealthCheckKind::Tcp {
            return Some(true);
        }
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let driver = tokio::spawn(conn);
        let request = http::Request::get(hc.path.as_str())
            .header(http::header::HOST, address.to_string())
            .header(http::header::USER_AGENT, "wasmlb-health-check")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let status = sender.send_request(request).await.ok()?.status();
        driver.abort();
        Some(status.is_success() || status.is_redirection())
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
