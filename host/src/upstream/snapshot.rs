//! The admin API's view of an upstream, its plugin and its backends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Instant, UNIX_EPOCH};

use super::Upstream;
use crate::backend::Backend;
use crate::config::{AdminState, OnPluginError};
use crate::plugin_call::FailureKind;

/// A point-in-time view of an upstream for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamSnapshot {
    /// Upstream name.
    pub name: String,
    /// True while too few backends are available and all ready ones are
    /// offered to the plugin (Envoy panic mode).
    pub panic: bool,
    /// The plugin.
    pub plugin: PluginSnapshot,
    /// Backends in id order.
    pub backends: Vec<BackendSnapshot>,
    /// The shadow plugin, if any: its decisions against the live plugin's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<super::shadow::ShadowSnapshot>,
}

/// The plugin part of [`UpstreamSnapshot`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginSnapshot {
    /// Built-in name or file path (`(uploaded)` for bytes sent to the admin API).
    pub name: String,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    /// When this plugin was swapped in, in seconds since the Unix epoch.
    pub loaded_at_unix_s: u64,
    /// `ok`; `failing` (the circuit breaker is open, or the last
    /// [`super::FAILING_AFTER`] calls all failed); or `no_instance` (the breaker
    /// is closed and the next request builds and probes a fresh instance).
    pub status: &'static str,
    /// The circuit breaker: `closed`, `open` (the plugin is not called) or
    /// `half_open` (the next request probes a fresh instance).
    pub breaker: &'static str,
    /// While the breaker is open: time until the next probe, in ms.
    pub retry_in_ms: Option<u64>,
    /// Times the breaker opened.
    pub breaker_trips: u64,
    /// Requests decided without calling the plugin (breaker open).
    pub skipped: u64,
    /// `fallback` or `fail`.
    pub on_plugin_error: OnPluginError,
    /// Failure counters by kind, since the upstream was (re)built.
    pub failures: BTreeMap<&'static str, u64>,
    /// Requests decided by the fallback.
    pub fallbacks: u64,
    /// Instances replaced after failures.
    pub replacements: u64,
}

/// One backend in [`UpstreamSnapshot`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSnapshot {
    /// Backend id (index).
    pub id: usize,
    /// Address.
    pub address: SocketAddr,
    /// Configured weight.
    pub weight: u32,
    /// Weight the plugin sees (differs during slow start).
    pub effective_weight: u32,
    /// Summary, first that applies: `maint`, `drained` (drain with nothing
    /// in flight), `drain`, `unreachable` (out of rotation after connect
    /// failures), `ejected`, `unhealthy` (failing health checks), `healthy`.
    pub state: &'static str,
    /// `ready`, `drain` or `maint`.
    pub admin_state: AdminState,
    /// Whether the active health checks pass.
    pub check_passing: bool,
    /// Milliseconds left of an outlier ejection, if ejected.
    pub ejected_for_ms: Option<u64>,
    /// Milliseconds left out of rotation after connect failures
    /// (`max_fails` / `fail_timeout_ms`), if so.
    pub unreachable_for_ms: Option<u64>,
    /// Times ejected by outlier detection.
    pub ejections: u32,
    /// Whether the plugin may choose it (`healthy` as the plugin sees it).
    pub selectable: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests forwarded since the backend joined the upstream.
    pub requests: u64,
    /// The response-time estimate (peak EWMA, what plugins read as
    /// `rtt-estimate`), in ms; 0 before the first response.
    pub rtt_ms: f64,
}

impl Upstream {
    /// A point-in-time view for the admin API.
    pub fn snapshot(&self) -> UpstreamSnapshot {
        let slot = self.lock();
        let now = Instant::now();
        let open = slot.breaker.is_open(now);
        let status = if open || self.stats.failing() {
            "failing"
        } else if slot.instance.is_none() {
            "no_instance"
        } else {
            "ok"
        };
        let breaker = match (open, slot.instance.is_some()) {
            (true, _) => "open",
            (false, false) => "half_open",
            (false, true) => "closed",
        };
        let retry_in_ms = slot
            .breaker
            .open_until
            .filter(|_| open)
            .map(|t| u64::try_from(t.duration_since(now).as_millis()).unwrap_or(u64::MAX));
        let failures = [
            FailureKind::Trap,
            FailureKind::Deadline,
            FailureKind::BadAnswer,
        ]
        .into_iter()
        .map(|k| (k.as_str(), self.stats.failures(k)))
        .collect();
        UpstreamSnapshot {
            name: self.name.to_string(),
            panic: slot.panic,
            plugin: PluginSnapshot {
                name: slot.plugin.name().to_string(),
                digest: slot.plugin.digest().to_string(),
                loaded_at_unix_s: slot
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                status,
                breaker,
                retry_in_ms,
                breaker_trips: self.stats.breaker_trips.load(Ordering::Relaxed),
                skipped: self.stats.skipped.load(Ordering::Relaxed),
                on_plugin_error: self.on_error,
                failures,
                fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
                replacements: self.stats.replacements.load(Ordering::Relaxed),
            },
            backends: slot
                .backends
                .iter()
                .enumerate()
                .map(|(id, b)| backend_snapshot(id, b, now))
                .collect(),
            shadow: self.shadow.load().as_ref().map(|s| s.snapshot()),
        }
    }
}

/// The admin view of backend `id` at `now`.
pub(super) fn backend_snapshot(id: usize, b: &Backend, now: Instant) -> BackendSnapshot {
    let c = &b.live;
    let status = c.status();
    let admin_state = c.admin_state();
    let in_flight = c.in_flight.load(Ordering::Relaxed);
    let check_passing = c.check_passing.load(Ordering::Relaxed);
    let left_ms = |until: Option<Instant>| {
        until
            .filter(|&t| t > now)
            .map(|t| u64::try_from(t.duration_since(now).as_millis()).unwrap_or(u64::MAX))
    };
    let ejected_for_ms = left_ms(status.ejected_until);
    let unreachable_for_ms = left_ms(status.unreachable_until);
    let state = match admin_state {
        AdminState::Maint => "maint",
        AdminState::Drain if in_flight == 0 => "drained",
        AdminState::Drain => "drain",
        AdminState::Ready if unreachable_for_ms.is_some() => "unreachable",
        AdminState::Ready if ejected_for_ms.is_some() => "ejected",
        AdminState::Ready if !check_passing => "unhealthy",
        AdminState::Ready => "healthy",
    };
    BackendSnapshot {
        id,
        address: b.address,
        weight: b.configured_weight,
        effective_weight: b.weight,
        state,
        admin_state,
        check_passing,
        ejected_for_ms,
        unreachable_for_ms,
        ejections: status.ejections,
        selectable: c.healthy.load(Ordering::Relaxed),
        in_flight,
        requests: c.requests.load(Ordering::Relaxed),
        rtt_ms: c.rtt.get_ns() as f64 / 1e6,
    }
}
