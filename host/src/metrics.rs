//! Prometheus metrics (prometheus-client), served by the admin API at
//! `GET /metrics` in the text exposition format.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `wasmlb_requests_total` | counter | upstream, backend (`none` if no backend was chosen), class (`2xx`...) |
//! | `wasmlb_requests_in_flight` | gauge | upstream |
//! | `wasmlb_request_duration_seconds` | histogram | upstream (request head in to response head out) |
//! | `wasmlb_plugin_decision_duration_seconds` | histogram | upstream |
//! | `wasmlb_plugin_failures_total` | counter | upstream, kind (`trap`, `deadline`, `bad_answer`) |
//! | `wasmlb_plugin_swaps_total` | counter | upstream, outcome (`ok`, `error`) |
//! | `wasmlb_reloads_total` | counter | outcome (`ok`, `error`) |
//! | `wasmlb_retries_total` | counter | upstream |
//! | `wasmlb_outlier_ejections_total` | counter | upstream |
//! | `wasmlb_outlier_ejections_skipped_total` | counter | upstream (an outlier not ejected: `max_ejection_percent` reached) |
//! | `wasmlb_plugin_breaker_open` | gauge | upstream (1 while the plugin's circuit breaker is open) |
//! | `wasmlb_plugin_calls_skipped_total` | counter | upstream (requests decided without calling the plugin: breaker open) |
//! | `wasmlb_tunnels_open` | gauge | upstream (WebSocket/upgrade tunnels and TCP-mode connections open) |
//! | `wasmlb_tunnel_bytes_total` | counter | upstream, direction (`to_backend`, `to_client`): bytes relayed by tunnels |
//! | `wasmlb_connections_open` | gauge | (downstream connections open) |
//! | `wasmlb_connections_max` | gauge | (the global `max_connections`) |
//! | `wasmlb_connections_cap_reached_total` | counter | (times a listener stopped accepting at a cap) |
//! | `wasmlb_tls_handshake_failures_total` | counter | (downstream TLS handshakes that failed or timed out) |
//! | `wasmlb_local_resource_errors_total` | counter | op (`accept`, `connect`, `health_check`): the proxy ran out of descriptors, buffers, memory or ports |
//! | `wasmlb_plugin_cache_entries` | gauge | (compiled components kept for reuse) |
//! | `wasmlb_plugin_cache_bytes` | gauge | (their compiled code, in bytes) |
//!
//! Handles are looked up once, when an upstream or backend is built, so the
//! per-request cost is a few atomic operations.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::plugin_call::FailureKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    backend: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    upstream: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    upstream: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    upstream: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

/// Where the proxy ran out of a local resource (see [`crate::fd_limit`]).
#[derive(Debug, Clone, Copy)]
pub enum LocalOp {
    /// Accepting a downstream connection.
    Accept,
    /// Connecting to a backend.
    Connect,
    /// A health check probe.
    HealthCheck,
}

/// Process-wide resource metrics: connections against their cap, local
/// resource errors, the compiled-component cache.
#[derive(Debug, Clone, Default)]
pub struct ResourceMetrics {
    /// Downstream connections open.
    pub connections_open: Gauge,
    /// The global connection cap.
    pub connections_max: Gauge,
    /// Times a listener stopped accepting at a cap.
    pub cap_reached: Counter,
    /// Downstream TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// Compiled components kept for reuse.
    pub plugin_cache_entries: Gauge,
    /// Their compiled code, in bytes.
    pub plugin_cache_bytes: Gauge,
    local_errors: [Counter; 3],
}

impl ResourceMetrics {
    /// Count a local resource error during `op`.
    pub fn local_error(&self, op: LocalOp) {
        self.local_errors[op as usize].inc();
    }
}

type HistogramFamily = Family<UpstreamLabels, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 100 us .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn decision_histogram() -> Histogram {
    // 100 ns .. ~3.3 ms
    Histogram::new(exponential_buckets(0.000_000_1, 2.0, 16))
}

/// The process's metrics registry and metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    in_flight: Family<UpstreamLabels, Gauge>,
    request_duration: HistogramFamily,
    decision_duration: HistogramFamily,
    plugin_failures: Family<FailureLabels, Counter>,
    swaps: Family<SwapLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    ejections: Family<UpstreamLabels, Counter>,
    ejections_skipped: Family<UpstreamLabels, Counter>,
    breaker_open: Family<UpstreamLabels, Gauge>,
    calls_skipped: Family<UpstreamLabels, Counter>,
    tunnels_open: Family<UpstreamLabels, Gauge>,
    tunnel_bytes: Family<DirectionLabels, Counter>,
    resources: ResourceMetrics,
}

/// Metric handles of one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// Requests in flight.
    pub in_flight: Gauge,
    /// Request duration, in seconds.
    pub request_duration: Histogram,
    /// Plugin decision duration, in seconds.
    pub decision_duration: Histogram,
    /// Retries of failed attempts on another backend.
    pub retries: Counter,
    /// Backends ejected by outlier detection.
    pub ejections: Counter,
    /// Outliers not ejected because `max_ejection_percent` was reached.
    pub ejections_skipped: Counter,
    /// 1 while the plugin's circuit breaker is open.
    pub breaker_open: Gauge,
    /// Requests decided without calling the plugin (breaker open).
    pub calls_skipped: Counter,
    /// Tunnels open (HTTP upgrades, TCP-mode connections).
    pub tunnels_open: Gauge,
    /// Bytes relayed by tunnels from clients to backends.
    pub tunnel_bytes_to_backend: Counter,
    /// Bytes relayed by tunnels from backends to clients.
    pub tunnel_bytes_to_client: Counter,
    failures: [Counter; 3],
}

impl UpstreamMetrics {
    /// Count one plugin failure of `kind`.
    pub fn failure(&self, kind: FailureKind) {
        let i = match kind {
            FailureKind::Trap => 0,
            FailureKind::Deadline => 1,
            FailureKind::BadAnswer => 2,
        };
        self.failures[i].inc();
    }
}

/// Request counters of one backend, by status class `1xx`..`5xx`.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    classes: [Counter; 5],
}

impl BackendMetrics {
    /// Count a response with `status`.
    pub fn response(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.classes[i].inc();
    }
}

fn class(status: u16) -> String {
    format!("{}xx", (status / 100).clamp(1, 5))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every wasmlb metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasmlb");
        let requests = Family::default();
        let in_flight = Family::default();
        let request_duration: HistogramFamily = Family::new_with_constructor(request_histogram);
        let decision_duration: HistogramFamily = Family::new_with_constructor(decision_histogram);
        let plugin_failures = Family::default();
        let swaps = Family::default();
        let reloads = Family::default();
        registry.register(
            "requests",
            "Requests by upstream, backend and status class",
            requests.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests in flight by upstream",
            in_flight.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head received to response head sent",
            request_duration.clone(),
        );
        registry.register(
            "plugin_decision_duration_seconds",
            "Time of one plugin select call, host side",
            decision_duration.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin select failures by kind",
            plugin_failures.clone(),
        );
        registry.register(
            "plugin_swaps",
            "Plugin swaps through the admin API by outcome",
            swaps.clone(),
        );
        registry.register("reloads", "Config reloads by outcome", reloads.clone());
        let retries = Family::default();
        let ejections = Family::default();
        registry.register(
            "retries",
            "Failed attempts retried on another backend, by upstream",
            retries.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Backends ejected by outlier detection, by upstream",
            ejections.clone(),
        );
        let ejections_skipped = Family::default();
        let breaker_open = Family::default();
        let calls_skipped = Family::default();
        registry.register(
            "outlier_ejections_skipped",
            "Outliers not ejected because max_ejection_percent was reached, by upstream",
            ejections_skipped.clone(),
        );
        registry.register(
            "plugin_breaker_open",
            "1 while the upstream's plugin circuit breaker is open",
            breaker_open.clone(),
        );
        registry.register(
            "plugin_calls_skipped",
            "Requests decided without calling the plugin (circuit breaker open), by upstream",
            calls_skipped.clone(),
        );
        let tunnels_open = Family::default();
        let tunnel_bytes = Family::default();
        registry.register(
            "tunnels_open",
            "Tunnels open (HTTP upgrades such as WebSocket, TCP-mode connections), by upstream",
            tunnels_open.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes relayed by tunnels, by upstream and direction (to_backend, to_client)",
            tunnel_bytes.clone(),
        );
        let resources = ResourceMetrics::default();
        for (name, help, gauge) in [
            (
                "connections_open",
                "Downstream connections open",
                &resources.connections_open,
            ),
            (
                "connections_max",
                "The global cap on downstream connections (max_connections)",
                &resources.connections_max,
            ),
            (
                "plugin_cache_entries",
                "Compiled plugin components kept for reuse",
                &resources.plugin_cache_entries,
            ),
            (
                "plugin_cache_bytes",
                "Compiled code of the kept plugin components, in bytes",
                &resources.plugin_cache_bytes,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "connections_cap_reached",
            "Times a listener stopped accepting at its connection cap",
            resources.cap_reached.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Downstream TLS handshakes that failed (bad client hello, plaintext, unknown protocol) or timed out",
            resources.tls_handshake_failures.clone(),
        );
        let local_errors: Family<OpLabels, Counter> = Family::default();
        registry.register(
            "local_resource_errors",
            "Operations that failed because the proxy ran out of descriptors, buffers, memory or ports",
            local_errors.clone(),
        );
        let op = |name: &str| {
            local_errors
                .get_or_create(&OpLabels { op: name.into() })
                .clone()
        };
        let resources = ResourceMetrics {
            local_errors: [op("accept"), op("connect"), op("health_check")],
            ..resources
        };
        Self {
            tunnels_open,
            tunnel_bytes,
            ejections_skipped,
            breaker_open,
            calls_skipped,
            resources,
            retries,
            ejections,
            registry,
            requests,
            in_flight,
            request_duration,
            decision_duration,
            plugin_failures,
            swaps,
            reloads,
        }
    }

    /// Handles for upstream `name`.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let u = UpstreamLabels {
            upstream: name.to_string(),
        };
        let failure = |kind: FailureKind| {
            self.plugin_failures
                .get_or_create(&FailureLabels {
                    upstream: name.to_string(),
                    kind: kind.as_str().to_string(),
                })
                .clone()
        };
        let direction = |direction: &str| {
            self.tunnel_bytes
                .get_or_create(&DirectionLabels {
                    upstream: name.to_string(),
                    direction: direction.to_string(),
                })
                .clone()
        };
        UpstreamMetrics {
            in_flight: self.in_flight.get_or_create(&u).clone(),
            request_duration: self.request_duration.get_or_create(&u).clone(),
            decision_duration: self.decision_duration.get_or_create(&u).clone(),
            retries: self.retries.get_or_create(&u).clone(),
            ejections: self.ejections.get_or_create(&u).clone(),
            ejections_skipped: self.ejections_skipped.get_or_create(&u).clone(),
            breaker_open: self.breaker_open.get_or_create(&u).clone(),
            calls_skipped: self.calls_skipped.get_or_create(&u).clone(),
            tunnels_open: self.tunnels_open.get_or_create(&u).clone(),
            tunnel_bytes_to_backend: direction("to_backend"),
            tunnel_bytes_to_client: direction("to_client"),
            failures: [
                failure(FailureKind::Trap),
                failure(FailureKind::Deadline),
                failure(FailureKind::BadAnswer),
            ],
        }
    }

    /// Handles for backend `address` of upstream `upstream`.
    pub fn backend(&self, upstream: &str, address: &str) -> BackendMetrics {
        let counter = |status: u16| {
            self.requests
                .get_or_create(&RequestLabels {
                    upstream: upstream.to_string(),
                    backend: address.to_string(),
                    class: class(status),
                })
                .clone()
        };
        BackendMetrics {
            classes: [
                counter(100),
                counter(200),
                counter(300),
                counter(400),
                counter(500),
            ],
        }
    }

    /// Count a response the proxy made without a backend (e.g. 503).
    pub fn unrouted(&self, upstream: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_string(),
                backend: "none".into(),
                class: class(status),
            })
            .inc();
    }

    /// Process-wide resource metrics.
    pub fn resources(&self) -> &ResourceMetrics {
        &self.resources
    }

    /// Count a plugin swap on `upstream`.
    pub fn swap(&self, upstream: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" }.to_string();
        self.swaps
            .get_or_create(&SwapLabels {
                upstream: upstream.to_string(),
                outcome,
            })
            .inc();
    }

    /// Count a config reload.
    pub fn reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" }.to_string();
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_count_into_the_exposition() {
        let m = Metrics::new();
        let b = m.backend("app", "127.0.0.1:9001");
        b.response(200);
        b.response(204);
        b.response(502);
        m.upstream("app").failure(FailureKind::Deadline);
        m.reload(true);
        let text = m.encode();
        assert!(
            text.contains(
                r#"wasmlb_requests_total{upstream="app",backend="127.0.0.1:9001",class="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"wasmlb_requests_total{upstream="app",backend="127.0.0.1:9001",class="5xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"wasmlb_plugin_failures_total{upstream="app",kind="deadline"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"wasmlb_reloads_total{outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("wasmlb_plugin_decision_duration_seconds_bucket"),
            "{text}"
        );
    }
}
