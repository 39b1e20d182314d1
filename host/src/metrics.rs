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
//! | `wasmlb_shadow_decisions_total` | counter | upstream, outcome (`agree`, `differ`, `error`): the shadow plugin's decisions beside the live one's |
//! | `wasmlb_mirror_requests_total` | counter | upstream, outcome (`sent`, `failed`, `skipped`): copies of requests a plugin mirrored (`forward.mirror`); `skipped` when the cap was reached or the body could not be copied |
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
//! | `wasmlb_access_log_dropped_total` | counter | (access log entries dropped: the writer was behind) |
//! | `wasmlb_backend_up` | gauge | upstream, backend (1 while the plugin may choose it) |
//! | `wasmlb_backend_check_passing` | gauge | upstream, backend (1 while active health checks pass) |
//! | `wasmlb_backend_ejected` | gauge | upstream, backend (1 while ejected by outlier detection) |
//! | `wasmlb_backend_effective_weight` | gauge | upstream, backend (the weight plugins see; lower in slow start) |
//! | `wasmlb_backend_in_flight` | gauge | upstream, backend (requests and tunnels in flight) |
//! | `wasmlb_backend_response_time_seconds` | gauge | upstream, backend (the peak-EWMA response-time estimate; 0 before the first response) |
//! | `wasmlb_plugin_info` | gauge | upstream, plugin, digest (always 1: the plugin serving each upstream) |
//!
//! Handles are looked up once, when an upstream or backend is built, so the
//! per-request cost is a few atomic operations. The per-backend and plugin
//! gauges are state, not events: they are set from a snapshot of the
//! upstreams at each scrape ([`Metrics::encode`]), so a backend that left
//! the config leaves the exposition too. Every counter is present (at 0)
//! from the moment its upstream or backend exists.
//!
//! The exposition is negotiated as the Prometheus client libraries do
//! ([`Format::negotiate`]): OpenMetrics 1.0 when the scraper's `Accept`
//! prefers `application/openmetrics-text` (Prometheus itself), else the
//! Prometheus text format 0.0.4 (`curl`, older parsers).

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    upstream: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    upstream: String,
    plugin: String,
    digest: String,
}

/// One backend's state at a scrape, for the per-backend gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendState {
    /// The upstream's name.
    pub upstream: String,
    /// The backend's address (`ip:port`), as in `wasmlb_requests_total`.
    pub backend: String,
    /// The plugin may choose it.
    pub up: bool,
    /// Its active health checks pass.
    pub check_passing: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// The weight plugins see.
    pub effective_weight: u32,
    /// Requests and tunnels in flight.
    pub in_flight: u32,
    /// The response-time estimate, in seconds (0 before the first response).
    pub response_time_seconds: f64,
}

/// The plugin serving an upstream at a scrape, for `wasmlb_plugin_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginState {
    /// The upstream's name.
    pub upstream: String,
    /// The plugin's built-in name or file path.
    pub plugin: String,
    /// `sha256:<hex>` of the component.
    pub digest: String,
}

/// An exposition format of `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Text,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when some
    /// `application/openmetrics-text` range has a q-value above 0 and at
    /// least that of the best `text/plain`, `text/*` or `*/*` range (so
    /// Prometheus, which prefers OpenMetrics, gets it); otherwise, and
    /// without the header, text 0.0.4, as client_golang's negotiation does.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: counter families
/// are named with their `_total` suffix in `# HELP`/`# TYPE`, `info`
/// families become gauges named `_info`, and `# UNIT` and `# EOF` go
/// (the differences listed in the OpenMetrics 1.0 spec's compatibility
/// section). Samples are the same in both.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut types: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            types.insert(name, kind);
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        let Some((prefix, rest)) = meta else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let (name, tail) = match (types.get(name).copied(), prefix) {
            (Some("counter"), _) => (format!("{name}_total"), tail.to_string()),
            (Some("info"), "# TYPE ") => (format!("{name}_info"), "gauge".to_string()),
            (Some("info"), _) => (format!("{name}_info"), tail.to_string()),
            _ => (name.to_string(), tail.to_string()),
        };
        out.push_str(prefix);
        out.push_str(&name);
        out.push(' ');
        out.push_str(&tail);
        out.push('\n');
    }
    out
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
    /// Access log entries dropped because its writer was behind.
    pub access_log_dropped: Counter,
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
    shadow_decisions: Family<SwapLabels, Counter>,
    mirrors: Family<SwapLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    retries: Family<UpstreamLabels, Counter>,
    ejections: Family<UpstreamLabels, Counter>,
    ejections_skipped: Family<UpstreamLabels, Counter>,
    breaker_open: Family<UpstreamLabels, Gauge>,
    calls_skipped: Family<UpstreamLabels, Counter>,
    tunnels_open: Family<UpstreamLabels, Gauge>,
    tunnel_bytes: Family<DirectionLabels, Counter>,
    resources: ResourceMetrics,
    state: StateGauges,
    /// Held while the state gauges are set and the registry encoded, so
    /// concurrent scrapes each see one whole snapshot.
    scrape: std::sync::Mutex<()>,
}

/// The scrape-time state gauges (see the module docs).
#[derive(Debug, Default)]
struct StateGauges {
    up: Family<BackendLabels, Gauge>,
    check_passing: Family<BackendLabels, Gauge>,
    ejected: Family<BackendLabels, Gauge>,
    effective_weight: Family<BackendLabels, Gauge>,
    in_flight: Family<BackendLabels, Gauge>,
    response_time: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    plugin_info: Family<PluginLabels, Gauge>,
}

impl StateGauges {
    fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "backend_up",
                "1 while the plugin may choose the backend (healthy, not ejected, not drained)",
                &self.up,
            ),
            (
                "backend_check_passing",
                "1 while the backend's active health checks pass",
                &self.check_passing,
            ),
            (
                "backend_ejected",
                "1 while the backend is ejected by outlier detection",
                &self.ejected,
            ),
            (
                "backend_effective_weight",
                "The backend's weight as plugins see it (lower during slow start)",
                &self.effective_weight,
            ),
            (
                "backend_in_flight",
                "Requests and tunnels in flight to the backend",
                &self.in_flight,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "backend_response_time_seconds",
            "The backend's peak-EWMA response-time estimate, in seconds (0 before the first response)",
            self.response_time.clone(),
        );
        registry.register(
            "plugin_info",
            "The plugin serving each upstream: its name and component digest (always 1)",
            self.plugin_info.clone(),
        );
    }

    /// Replace every gauge's label sets with the given state.
    fn set(&self, backends: &[BackendState], plugins: &[PluginState]) {
        for family in [
            &self.up,
            &self.check_passing,
            &self.ejected,
            &self.effective_weight,
            &self.in_flight,
        ] {
            family.clear();
        }
        self.response_time.clear();
        self.plugin_info.clear();
        for b in backends {
            let labels = BackendLabels {
                upstream: b.upstream.clone(),
                backend: b.backend.clone(),
            };
            self.up.get_or_create(&labels).set(i64::from(b.up));
            self.check_passing
                .get_or_create(&labels)
                .set(i64::from(b.check_passing));
            self.ejected
                .get_or_create(&labels)
                .set(i64::from(b.ejected));
            self.effective_weight
                .get_or_create(&labels)
                .set(i64::from(b.effective_weight));
            self.in_flight
                .get_or_create(&labels)
                .set(i64::from(b.in_flight));
            self.response_time
                .get_or_create(&labels)
                .set(b.response_time_seconds);
        }
        for p in plugins {
            self.plugin_info
                .get_or_create(&PluginLabels {
                    upstream: p.upstream.clone(),
                    plugin: p.plugin.clone(),
                    digest: p.digest.clone(),
                })
                .set(1);
        }
    }
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
    /// Mirrored copies: sent (a response came), failed (no response),
    /// skipped (cap reached, or the body could not be copied).
    pub mirrors: [Counter; 3],
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
        let shadow_decisions = Family::default();
        registry.register(
            "shadow_decisions",
            "Shadow plugin decisions by outcome against the live plugin's",
            shadow_decisions.clone(),
        );
        let mirrors = Family::default();
        registry.register(
            "mirror_requests",
            "Mirrored copies of requests, by upstream and outcome (sent, failed, skipped)",
            mirrors.clone(),
        );
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
        registry.register(
            "access_log_dropped",
            "Access log entries dropped because the writer was behind (its queue was full)",
            resources.access_log_dropped.clone(),
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
        for outcome in ["ok", "error"] {
            let _ = reloads.get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            });
        }
        let state = StateGauges::default();
        state.register(&mut registry);
        Self {
            state,
            scrape: std::sync::Mutex::new(()),
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
            shadow_decisions,
            mirrors,
            reloads,
        }
    }

    /// Handles of upstream `name`'s shadow decisions: agree, differ, error
    /// (present at 0 from the first call).
    pub fn shadow(&self, name: &str) -> [Counter; 3] {
        ["agree", "differ", "error"].map(|outcome| {
            self.shadow_decisions
                .get_or_create(&SwapLabels {
                    upstream: name.to_string(),
                    outcome: outcome.into(),
                })
                .clone()
        })
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
        // Counters of events that may not have happened yet, present at 0.
        for outcome in ["ok", "error"] {
            let _ = self.swaps.get_or_create(&SwapLabels {
                upstream: name.to_string(),
                outcome: outcome.into(),
            });
        }
        for status_class in ["4xx", "5xx"] {
            let _ = self.requests.get_or_create(&RequestLabels {
                upstream: name.to_string(),
                backend: "none".into(),
                class: status_class.into(),
            });
        }
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
            mirrors: ["sent", "failed", "skipped"].map(|outcome| {
                self.mirrors
                    .get_or_create(&SwapLabels {
                        upstream: name.to_string(),
                        outcome: outcome.into(),
                    })
                    .clone()
            }),
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

    /// The registry in `format`, with the per-backend and plugin gauges set
    /// from `backends` and `plugins` (the upstreams' state now).
    pub fn encode(
        &self,
        format: Format,
        backends: &[BackendState],
        plugins: &[PluginState],
    ) -> String {
        let _scrape = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.state.set(backends, plugins);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text => openmetrics_to_text(&out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_the_scrapers_preference() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
            application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        for (accept, format) in [
            (None, Format::Text),
            (Some(""), Format::Text),
            (Some("*/*"), Format::Text),
            (Some("text/plain; version=0.0.4"), Format::Text),
            (Some(prometheus), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; Q=0.9, text/plain"),
                Format::Text,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Text),
            (
                Some("application/openmetrics-text;q=junk, text/plain;q=0.5"),
                Format::OpenMetrics,
            ),
            (Some("application/json"), Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
    }

    #[test]
    fn text_format_names_counters_with_total_and_has_no_eof() {
        let m = Metrics::new();
        let _ = m.upstream("app");
        let backend = BackendState {
            upstream: "app".into(),
            backend: "127.0.0.1:1".into(),
            up: true,
            check_passing: true,
            ejected: false,
            effective_weight: 3,
            in_flight: 2,
            response_time_seconds: 0.25,
        };
        let plugin = PluginState {
            upstream: "app".into(),
            plugin: "round-robin".into(),
            digest: "sha256:ab".into(),
        };
        let om = m.encode(
            Format::OpenMetrics,
            std::slice::from_ref(&backend),
            std::slice::from_ref(&plugin),
        );
        assert!(om.contains("# TYPE wasmlb_retries counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = m.encode(Format::Text, &[backend], &[plugin]);
        assert!(
            text.contains("# TYPE wasmlb_retries_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP wasmlb_retries_total "), "{text}");
        assert!(
            text.contains("wasmlb_retries_total{upstream=\"app\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE wasmlb_connections_open gauge\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "wasmlb_backend_effective_weight{upstream=\"app\",backend=\"127.0.0.1:1\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "wasmlb_plugin_info{upstream=\"app\",plugin=\"round-robin\",digest=\"sha256:ab\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        // The next scrape's state replaces this one's: a backend that left
        // the upstream leaves the exposition.
        let text = m.encode(Format::Text, &[], &[]);
        assert!(!text.contains("127.0.0.1:1"), "{text}");
    }

    #[test]
    fn handles_count_into_the_exposition() {
        let m = Metrics::new();
        let b = m.backend("app", "127.0.0.1:9001");
        b.response(200);
        b.response(204);
        b.response(502);
        m.upstream("app").failure(FailureKind::Deadline);
        m.reload(true);
        let text = m.encode(Format::OpenMetrics, &[], &[]);
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
