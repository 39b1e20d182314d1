//! One backend's live state: request counters, and the inputs that decide
//! whether the plugin may choose it (active health check verdict, outlier
//! ejection, administrative state) and with which effective weight (slow
//! start).
//!
//! [`BackendLive`] outlive config reloads: a reload keeps the counters of
//! every backend whose address stays in the upstream, so requests in flight
//! across a reload are still counted (least-connections stays right; see
//! pingora #144), and health, ejections and drain survive.
//!
//! The per-request path only touches atomics ([`InFlight`],
//! [`BackendLive::record`]); everything else changes under the
//! upstream's lock (see `Upstream::refresh` in `upstream/upkeep.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use crate::config::AdminState;
use crate::metrics::BackendMetrics;

/// Outlier-ejection and slow-start bookkeeping of one backend. Changed only
/// under the upstream's lock.
#[derive(Debug, Default, Clone, Copy)]
pub struct Status {
    /// Ejected by outlier detection until then.
    pub ejected_until: Option<Instant>,
    /// How often it has been ejected (the ejection time multiplier).
    pub ejections: u32,
    /// When the last ejection ended (to reset the multiplier after a
    /// healthy `max_ejection_time_ms`).
    pub returned_at: Option<Instant>,
    /// Start of the slow-start ramp, while ramping.
    pub ramp_from: Option<Instant>,
    /// Out of rotation after `max_fails` connect failures in a row, until
    /// then (NGINX `max_fails` / `fail_timeout`; see
    /// [`BackendLive::record_connect`]).
    pub unreachable_until: Option<Instant>,
    /// A drain with nothing in flight has been reported.
    pub drained_reported: bool,
}

/// The live state of one backend, shared across reloads (the entries of a
/// new backend set that keep their address keep it): health (checks,
/// ejection, connect failures), admin state, slow start, in-flight and
/// request counts, and the RTT estimate.
#[derive(Debug)]
pub struct BackendLive {
    /// Requests forwarded whose response body is not yet fully sent.
    pub in_flight: AtomicU32,
    /// Whether the plugin may choose the backend: what the plugin sees as
    /// `healthy` (ready, passing its health checks and not ejected, or any
    /// ready backend while the upstream is in panic mode).
    pub healthy: AtomicBool,
    /// Requests forwarded to this backend since it joined the upstream.
    pub requests: AtomicU64,
    /// Its `wasmlb_requests_total` counters.
    pub metrics: BackendMetrics,
    /// The last verdict of the active health checks (true until they say otherwise).
    pub check_passing: AtomicBool,
    /// Responses in a row that were 5xx, connect failures or timeouts.
    pub consecutive_failures: AtomicU32,
    /// Connect failures (refused, or not connected within
    /// `connect_timeout_ms`) in a row; any response resets it.
    pub connect_failures: AtomicU32,
    /// Peak-EWMA of the response time (what plugins read as `rtt-estimate`).
    pub rtt: RttEstimate,
    admin: AtomicU8,
    configured: AtomicU8,
    status: Mutex<Status>,
}

/// Time constant of [`RttEstimate`]'s decay (linkerd2's and tower's default).
pub const RTT_DECAY: Duration = Duration::from_secs(10);

/// A peak-sensitive exponentially weighted moving average of a backend's
/// response time, after tower's `load::peak_ewma` (itself after linkerd and
/// Finagle): a sample above the estimate replaces it at once; a lower sample
/// is blended in with weight `1 - exp(-elapsed / RTT_DECAY)`, `elapsed` being
/// the time since the previous sample. Lock-free: concurrent samples may
/// overwrite each other, which only drops a sample.
#[derive(Debug, Default)]
pub struct RttEstimate {
    /// The estimate, in ns (0: no sample yet).
    estimate_ns: AtomicU64,
    /// When the last sample arrived, in ns on the caller's clock.
    updated_ns: AtomicU64,
}

impl RttEstimate {
    /// Record one response time `sample_ns` observed at `now_ns` (any
    /// monotonic clock in ns, the same for every call).
    pub fn observe(&self, sample_ns: u64, now_ns: u64) {
        let previous = self.estimate_ns.load(Ordering::Relaxed);
        let last = self.updated_ns.swap(now_ns, Ordering::Relaxed);
        let next = if previous == 0 || sample_ns >= previous {
            sample_ns
        } else {
            let elapsed = now_ns.saturating_sub(last) as f64;
            let keep = (-elapsed / RTT_DECAY.as_nanos() as f64).exp();
            (previous as f64 * keep + sample_ns as f64 * (1.0 - keep)) as u64
        };
        self.estimate_ns.store(next.max(1), Ordering::Relaxed);
    }

    /// The estimate, in ns; 0 before the first sample.
    pub fn get_ns(&self) -> u64 {
        self.estimate_ns.load(Ordering::Relaxed)
    }
}

fn state_code(s: AdminState) -> u8 {
    match s {
        AdminState::Ready => 0,
        AdminState::Drain => 1,
        AdminState::Maint => 2,
    }
}

fn state_of(code: u8) -> AdminState {
    match code {
        1 => AdminState::Drain,
        2 => AdminState::Maint,
        _ => AdminState::Ready,
    }
}

impl BackendLive {
    /// Fresh counters (healthy, ready, nothing in flight) reporting into `metrics`.
    pub fn new(metrics: BackendMetrics) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            metrics,
            check_passing: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            connect_failures: AtomicU32::new(0),
            rtt: RttEstimate::default(),
            admin: AtomicU8::new(0),
            configured: AtomicU8::new(0),
            status: Mutex::new(Status::default()),
        }
    }

    /// The administrative state.
    pub fn admin_state(&self) -> AdminState {
        state_of(self.admin.load(Ordering::Relaxed))
    }

    /// Set the administrative state; returns the previous one. Call through
    /// the upstream so the plugin is told.
    pub fn set_admin_state(&self, state: AdminState) -> AdminState {
        let old = state_of(self.admin.swap(state_code(state), Ordering::Relaxed));
        if old != state {
            self.update_status(|s| s.drained_reported = false);
        }
        old
    }

    /// Apply the `state` written in a (re)loaded config: it takes effect when
    /// the backend is new or the configured value changed since the last
    /// load; otherwise a state set at runtime (admin API) is kept.
    pub fn apply_configured_state(&self, state: AdminState, is_new: bool) {
        let old = state_of(self.configured.swap(state_code(state), Ordering::Relaxed));
        if is_new || old != state {
            self.set_admin_state(state);
        }
    }

    /// The state the config (or discovery source) last set, whatever the
    /// admin API set since.
    pub fn configured_state(&self) -> AdminState {
        state_of(self.configured.load(Ordering::Relaxed))
    }

    /// A copy of the ejection and slow-start bookkeeping.
    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Change the ejection and slow-start bookkeeping.
    pub fn update_status<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether outlier detection has the backend ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.status().ejected_until.is_some_and(|t| t > now)
    }

    /// Whether connect failures keep the backend out of rotation at `now`.
    pub fn unreachable(&self, now: Instant) -> bool {
        self.status().unreachable_until.is_some_and(|t| t > now)
    }

    /// Record whether connecting to the backend worked: `connected` false
    /// for a refused or timed-out connect, true for any response. Returns
    /// the connect failures in a row (0 after a success). Atomics only.
    pub fn record_connect(&self, connected: bool) -> u32 {
        streak(&self.connect_failures, connected)
    }

    /// Record the outcome of one attempt for outlier detection: `ok` is false
    /// for a 5xx response, a connect failure or a timeout. Returns the number
    /// of failures in a row (0 after a success). Two atomics, no lock.
    pub fn record(&self, ok: bool) -> u32 {
        streak(&self.consecutive_failures, ok)
    }
}

/// Count a failure in a row in `counter` (`ok` false) or end the streak
/// (`ok` true; only a load when there is none). Returns the streak.
fn streak(counter: &AtomicU32, ok: bool) -> u32 {
    if ok {
        if counter.load(Ordering::Relaxed) != 0 {
            counter.store(0, Ordering::Relaxed);
        }
        0
    } else {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Slow-start weight factor in percent (10..=100) for a backend that became
/// available `elapsed` ago, over a `window`: a linear ramp (HAProxy
/// `slowstart`; Envoy `slow_start_window` with aggression 1.0) from Envoy's
/// default `min_weight_percent` of 10 %, in steps of 5 % so the plugin is
/// told at most 18 times per ramp.
pub fn ramp_percent(elapsed: Duration, window: Duration) -> u32 {
    if window.is_zero() || elapsed >= window {
        return 100;
    }
    let pct = (elapsed.as_millis() * 100 / window.as_millis()) as u32;
    (pct / 5 * 5).clamp(10, 100)
}

/// One member of an upstream's backend set: its config (address, weights,
/// labels) and a handle on its [`BackendLive`] state. Indexed by the
/// plugin's backend id.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The backend's address.
    pub address: SocketAddr,
    /// Effective weight handed to the plugin (at least 1): the configured
    /// weight, or while some backend of the upstream is in slow start, the
    /// configured weight times its ramp percentage (100 when not ramping).
    pub weight: u32,
    /// The configured weight.
    pub configured_weight: u32,
    /// Labels from the config.
    pub labels: BTreeMap<String, String>,
    /// Live state, shared across reloads.
    pub live: Arc<BackendLive>,
    /// `address` as a URI authority, computed once (not per request).
    pub authority: http::uri::Authority,
}

impl Backend {
    /// A backend at `address` with `weight` (as configured and effective).
    pub fn new(
        address: SocketAddr,
        weight: u32,
        labels: BTreeMap<String, String>,
        live: Arc<BackendLive>,
    ) -> Self {
        Self {
            address,
            weight,
            configured_weight: weight,
            labels,
            live,
            authority: authority_of(address),
        }
    }

    /// The request-path handle for this backend, as backend `id`.
    pub fn target(&self, id: usize) -> Target {
        Target {
            id,
            address: self.address,
            authority: self.authority.clone(),
            live: self.live.clone(),
        }
    }
}

/// `address` as a URI authority. A socket address always formats as a valid
/// authority (`1.2.3.4:80`, `[::1]:80`).
fn authority_of(address: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(address.to_string().as_str())
        .expect("a socket address is a valid URI authority")
}

/// The target of one attempt: the backend chosen for it, taken from the same
/// backend set the plugin decided on, so a concurrent reload or swap cannot
/// shift it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The backend's id in that snapshot.
    pub id: usize,
    /// Its address.
    pub address: SocketAddr,
    /// Its address as a URI authority.
    pub authority: http::uri::Authority,
    /// Its live state.
    pub live: Arc<BackendLive>,
}

/// Counts one request in flight to a backend; decrements on drop (when the
/// response body has been sent, or the request failed).
#[derive(Debug)]
pub struct InFlight {
    live: Arc<BackendLive>,
    gauge: Gauge,
}

impl InFlight {
    /// Count a request to `chosen` as in flight (in its counters and in the
    /// upstream's `gauge`) until the guard drops.
    pub fn begin(chosen: &Target, gauge: Gauge) -> Self {
        chosen.live.in_flight.fetch_add(1, Ordering::Relaxed);
        chosen.live.requests.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Self {
            live: chosen.live.clone(),
            gauge,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.live.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// Former name of [`BackendLive`].
#[deprecated(note = "renamed to BackendLive")]
pub type BackendCounters = BackendLive;
/// Former name of [`Backend`].
#[deprecated(note = "renamed to Backend")]
pub type BackendState = Backend;
/// Former name of [`Target`].
#[deprecated(note = "renamed to Target")]
pub type Chosen = Target;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_is_linear_from_ten_percent_in_five_percent_steps() {
        let w = Duration::from_secs(10);
        assert_eq!(ramp_percent(Duration::ZERO, w), 10);
        assert_eq!(ramp_percent(Duration::from_millis(2_600), w), 25);
        assert_eq!(ramp_percent(Duration::from_millis(5_000), w), 50);
        assert_eq!(ramp_percent(Duration::from_millis(9_999), w), 95);
        assert_eq!(ramp_percent(w, w), 100);
        assert_eq!(ramp_percent(Duration::ZERO, Duration::ZERO), 100);
    }

    #[test]
    fn rtt_estimate_jumps_to_peaks_and_decays_to_lower_samples() {
        let rtt = RttEstimate::default();
        assert_eq!(rtt.get_ns(), 0);
        rtt.observe(5_000_000, 0);
        assert_eq!(rtt.get_ns(), 5_000_000);
        // A peak replaces the estimate at once.
        rtt.observe(50_000_000, 1_000);
        assert_eq!(rtt.get_ns(), 50_000_000);
        // A lower sample right after barely moves it ...
        rtt.observe(5_000_000, 2_000);
        assert!(rtt.get_ns() > 49_000_000, "{}", rtt.get_ns());
        // ... one a decay time (10 s) later moves it 1 - 1/e of the way.
        rtt.observe(5_000_000, 2_000 + RTT_DECAY.as_nanos() as u64);
        let expected = 5e6 + (rtt_before_decay(50e6, 5e6, 1e-6)) * (-1f64).exp();
        let got = rtt.get_ns() as f64;
        assert!(
            (got - expected).abs() / expected < 0.01,
            "{got} vs {expected}"
        );
    }

    /// The estimate after one lower sample `elapsed_s` after `peak`, minus `low`.
    fn rtt_before_decay(peak: f64, low: f64, elapsed_s: f64) -> f64 {
        let keep = (-elapsed_s / RTT_DECAY.as_secs_f64()).exp();
        (peak * keep + low * (1.0 - keep)) - low
    }

    #[test]
    fn record_counts_failures_in_a_row() {
        let c = BackendLive::new(crate::metrics::Metrics::new().backend("a", "b"));
        assert_eq!(c.record(false), 1);
        assert_eq!(c.record(false), 2);
        assert_eq!(c.record(true), 0);
        assert_eq!(c.record(false), 1);
    }

    #[test]
    fn configured_state_applies_only_when_new_or_changed() {
        let c = BackendLive::new(crate::metrics::Metrics::new().backend("a", "b"));
        c.apply_configured_state(AdminState::Ready, true);
        c.set_admin_state(AdminState::Drain); // admin API
        c.apply_configured_state(AdminState::Ready, false); // reload, same config
        assert_eq!(c.admin_state(), AdminState::Drain);
        c.apply_configured_state(AdminState::Maint, false); // config changed
        assert_eq!(c.admin_state(), AdminState::Maint);
    }
}
