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

use crate::backend::BackendLive;
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
        drop(watch(upstream, &addresses, &hc, metrics));
    }
}

/// Start probing `addresses`, backends of `upstream` (those that joined it
/// after the start, through discovery or the admin API). Each loop ends
/// when its backend leaves the upstream or the upstream is dropped. A loop
/// belongs to one membership of its backend (its [`BackendLive`]): if the
/// address leaves and joins again before the old loop's next probe, the old
/// loop ends and only the new one probes. Returns the loops' handles (a
/// caller may drop them: the loops run detached).
pub fn watch(
    upstream: &Arc<Upstream>,
    addresses: &[SocketAddr],
    hc: &HealthCheckConfig,
    metrics: &Arc<Metrics>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let backends = upstream.backends();
    addresses
        .iter()
        .filter_map(|&address| backends.iter().find(|b| b.address == address))
        .map(|backend| {
            tokio::spawn(probe_loop(
                Arc::downgrade(upstream),
                backend.address,
                Arc::downgrade(&backend.live),
                hc.clone(),
                metrics.clone(),
            ))
        })
        .collect()
}

/// The live state of `address` in `up` if it is still the membership `live`
/// (not a later one of the same address).
fn member(
    up: &Upstream,
    address: SocketAddr,
    live: &Weak<BackendLive>,
) -> Option<Arc<BackendLive>> {
    up.backends()
        .iter()
        .find(|b| b.address == address && std::ptr::eq(Arc::as_ptr(&b.live), live.as_ptr()))
        .map(|b| b.live.clone())
}

async fn probe_loop(
    upstream: Weak<Upstream>,
    address: SocketAddr,
    live: Weak<BackendLive>,
    hc: HealthCheckConfig,
    metrics: Arc<Metrics>,
) {
    static LOCAL: LogLimiter = LogLimiter::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(hc.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut fails) = (0u32, 0u32);
    loop {
        ticker.tick().await;
        let connector = {
            let Some(up) = upstream.upgrade() else { return };
            // Gone, or superseded by a later membership of the address.
            let Some(current) = member(&up, address, &live) else {
                return;
            };
            if current.admin_state() == AdminState::Maint {
                continue;
            }
            up.connector.clone()
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
        let passing = member(&up, address, &live).map(|l| l.check_passing.load(Ordering::Relaxed));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, PluginRef, UpstreamConfig};
    use crate::plugin::Runtime;

    #[tokio::test]
    async fn a_loop_ends_when_its_backend_leaves_and_joins_again_before_its_next_probe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let runtime = Runtime::new().unwrap();
        let metrics = Arc::new(Metrics::new());
        let entry = BackendConfig::new(address);
        let config = UpstreamConfig::new(
            PluginRef::Builtin("round-robin".into()),
            vec![entry.clone()],
        );
        let up = Arc::new(Upstream::new("app", &config, &runtime, &metrics).unwrap());
        let hc: HealthCheckConfig =
            toml::from_str("kind = \"tcp\"\ninterval_ms = 20\ntimeout_ms = 1000").unwrap();
        let first = watch(&up, &[address], &hc, &metrics);
        assert_eq!(first.len(), 1);
        // Leaves and joins again at once: a new membership, a new loop.
        up.replace_backends(&[], &metrics);
        let change = up.replace_backends(&[entry], &metrics);
        assert_eq!(change.added, vec![address]);
        let second = watch(&up, &change.added, &hc, &metrics);
        // The first loop notices at its next tick that its membership ended.
        tokio::time::timeout(Duration::from_secs(30), async {
            while !first[0].is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the superseded probe loop keeps running");
        assert!(!second[0].is_finished(), "the current member's loop ended");
        // And the current one ends once its backend leaves for good.
        up.replace_backends(&[], &metrics);
        tokio::time::timeout(Duration::from_secs(30), async {
            while !second[0].is_finished() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the probe loop of a backend that left keeps running");
    }
}
