//! An upstream: a named group of backends, their live state, and the plugin
//! instance that chooses among them.
//!
//! One plugin instance per upstream, behind a mutex: every request of the
//! upstream, whichever worker thread serves it, is decided by the same
//! instance in turn, so the plugin's state (a round-robin cursor) is global.
//! A call costs well under a microsecond (see `benches/select.rs`), so the
//! critical section is short.
//!
//! When the plugin traps, overruns its deadline or answers an unknown backend,
//! the request is served per `on_plugin_error` (the host's native round-robin
//! fallback, or 503), the event is counted ([`Upstream::stats`]) and logged
//! (rate-limited, [`crate::log_limit`]), and the plugin's **circuit breaker**
//! opens: the broken instance is dropped and, while the breaker is open,
//! requests are decided per `on_plugin_error` without calling the plugin.
//! When it closes, a fresh instance is built and the next request probes it
//! (half-open); a failure reopens the breaker for twice as long, from
//! [`BREAKER_INITIAL_BACKOFF`] up to [`BREAKER_MAX_BACKOFF`]; after
//! [`BREAKER_QUIET_PERIOD`] without a failure the backoff starts over (as
//! Envoy's and Hystrix-style breakers, with gRPC's connection backoff). A
//! plugin that fails on every call thus costs a few calls per 30 s, not one
//! per request.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tower::retry::budget::{Budget, TpsBudget};

use crate::backend::ramp_percent;
pub use crate::backend::{BackendCounters, BackendState, Chosen, InFlight};
use crate::config::{AdminState, OnPluginError, OutlierConfig, UpstreamConfig};
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::plugin::{
    Decision, FailureKind, Instance, InstanceSettings, Plugin, PluginError, RequestView, Runtime,
};

/// How long the plugin's circuit breaker stays open after the first failure.
pub const BREAKER_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest the breaker stays open (the backoff doubles up to this).
pub const BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failure after this long without one starts the backoff over.
pub const BREAKER_QUIET_PERIOD: Duration = Duration::from_secs(60);

/// The plugin's circuit breaker (see the module docs).
#[derive(Debug)]
struct Breaker {
    /// While set and in the future, the plugin is not called.
    open_until: Option<Instant>,
    /// How long the next trip keeps it open.
    next_backoff: Duration,
    last_failure: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open_until: None,
            next_backoff: BREAKER_INITIAL_BACKOFF,
            last_failure: None,
        }
    }
}

impl Breaker {
    /// Open after a failure at `now`; returns how long it stays open.
    fn trip(&mut self, now: Instant) -> Duration {
        if self
            .last_failure
            .is_some_and(|t| now.duration_since(t) >= BREAKER_QUIET_PERIOD)
        {
            self.next_backoff = BREAKER_INITIAL_BACKOFF;
        }
        let wait = self.next_backoff;
        self.open_until = Some(now + wait);
        self.next_backoff = (wait * 2).min(BREAKER_MAX_BACKOFF);
        self.last_failure = Some(now);
        wait
    }

    fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }
}

/// Period of [`Upstream::tick`]: the resolution of ejection ends, slow-start
/// steps and drain reports.
pub const TICK: Duration = Duration::from_millis(100);

/// Which backends the plugin may choose, and with which weights, at `now`.
///
/// A backend is available when its admin state is `ready`, its health checks
/// pass, it is not ejected and connect failures have not made it
/// unreachable. When fewer than `panic_threshold_percent` of the ready
/// backends are available, every ready backend that is not unreachable is
/// offered (Envoy's panic threshold: better to spread load over possibly bad
/// backends than to overload the few left or fail); a backend that refuses
/// connections is pointless to offer, unless every ready backend does. A backend that becomes available again
/// (not in panic mode) starts a slow-start ramp of `slow_start`; while any
/// backend ramps, every weight is the configured weight times its ramp
/// percentage (100 when not ramping), so integer weights can express 10 %.
///
/// Stores each backend's `healthy` flag. Returns the backend set with the
/// new weights (the same `Arc` if no weight changed), whether any flag or
/// weight changed, and whether the upstream is in panic mode.
pub fn evaluate_backends(
    backends: &Arc<[BackendState]>,
    now: Instant,
    panic_threshold_percent: u32,
    slow_start: Duration,
) -> (Arc<[BackendState]>, bool, bool) {
    let ready: Vec<bool> = backends
        .iter()
        .map(|b| b.counters.admin_state() == AdminState::Ready)
        .collect();
    let reachable: Vec<bool> = backends
        .iter()
        .zip(&ready)
        .map(|(b, &r)| r && !b.counters.unreachable(now))
        .collect();
    let up: Vec<bool> = backends
        .iter()
        .zip(&reachable)
        .map(|(b, &r)| {
            r && b.counters.check_passing.load(Ordering::Relaxed) && !b.counters.ejected(now)
        })
        .collect();
    let n_ready = ready.iter().filter(|&&r| r).count();
    let n_up = up.iter().filter(|&&u| u).count();
    let panic = panic_threshold_percent > 0
        && n_ready > 0
        && n_up * 100 < panic_threshold_percent as usize * n_ready;
    // In panic mode: the ready backends that accept connections, or every
    // ready backend if none does.
    let offered = if reachable.contains(&true) {
        &reachable
    } else {
        &ready
    };
    let mut changed = false;
    let mut percents = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        let selectable = if panic { offered[i] } else { up[i] };
        let was = b.counters.healthy.swap(selectable, Ordering::Relaxed);
        changed |= was != selectable;
        let pct = b.counters.update_status(|s| {
            if !selectable {
                s.ramp_from = None;
            } else if !was && !panic && !slow_start.is_zero() {
                s.ramp_from = Some(now);
            }
            let pct = s
                .ramp_from
                .map_or(100, |t| ramp_percent(now.duration_since(t), slow_start));
            if pct >= 100 {
                s.ramp_from = None;
            }
            pct
        });
        percents.push(pct);
    }
    let ramping = percents.iter().any(|&p| p < 100);
    let weight = |b: &BackendState, pct: u32| {
        if ramping {
            b.configured_weight.saturating_mul(pct).max(1)
        } else {
            b.configured_weight
        }
    };
    let reweighted = backends
        .iter()
        .zip(&percents)
        .any(|(b, &p)| weight(b, p) != b.weight);
    if !reweighted {
        return (backends.clone(), changed, panic);
    }
    let new: Arc<[BackendState]> = backends
        .iter()
        .zip(&percents)
        .map(|(b, &p)| BackendState {
            weight: weight(b, p),
            ..b.clone()
        })
        .collect();
    (new, true, panic)
}

/// Consecutive failed calls after which a plugin is reported as failing.
pub const FAILING_AFTER: u64 = 5;

/// Counters of plugin failures and fallbacks for one upstream.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// `select` calls that trapped.
    pub traps: AtomicU64,
    /// `select` calls cut at their deadline.
    pub deadlines: AtomicU64,
    /// Answers naming an unknown backend (or an empty candidate list).
    pub bad_answers: AtomicU64,
    /// Requests decided by the native round-robin fallback.
    pub fallbacks: AtomicU64,
    /// Instances replaced after a failure (each replacement is a half-open
    /// probe of the circuit breaker).
    pub replacements: AtomicU64,
    /// Requests decided without calling the plugin: its circuit breaker was
    /// open.
    pub skipped: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_trips: AtomicU64,
    /// Failed calls since the last successful one; at [`FAILING_AFTER`] the
    /// plugin is reported as failing.
    pub consecutive_failures: AtomicU64,
}

impl PluginStats {
    /// The counter for `kind`.
    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.counter(kind).load(Ordering::Relaxed)
    }

    /// True when the last [`FAILING_AFTER`] calls all failed.
    pub fn failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) >= FAILING_AFTER
    }

    fn counter(&self, kind: FailureKind) -> &AtomicU64 {
        match kind {
            FailureKind::Trap => &self.traps,
            FailureKind::Deadline => &self.deadlines,
            FailureKind::BadAnswer => &self.bad_answers,
        }
    }
}

/// The plugin side of an upstream, swapped as a whole under the mutex.
struct Slot {
    plugin: Arc<Plugin>,
    settings: InstanceSettings,
    instance: Option<Instance>,
    backends: Arc<[BackendState]>,
    breaker: Breaker,
    loaded_at: SystemTime,
    /// Too few backends are available: all ready ones are offered.
    panic: bool,
}

/// Rate limits of an upstream's repeated log lines, one per cause.
#[derive(Debug, Default)]
struct UpstreamLogs {
    plugin_failed: LogLimiter,
    replace_failed: LogLimiter,
    not_ejected: LogLimiter,
}

/// A named group of backends with its plugin.
pub struct Upstream {
    name: Arc<str>,
    slot: Mutex<Slot>,
    fallback_cursor: AtomicUsize,
    stats: PluginStats,
    metrics: UpstreamMetrics,
    on_error: OnPluginError,
    debug_headers: bool,
    logs: UpstreamLogs,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Wait for the backend's response headers.
    pub response_timeout: Duration,
    /// Most time between two reads of a response body.
    pub response_body_timeout: Duration,
    /// Bound on a whole request, if any.
    pub request_timeout: Option<Duration>,
    /// Retries of a failed attempt on another backend.
    pub retries: u32,
    /// Request bodies up to this many bytes are kept for replay.
    pub retry_buffer_bytes: u64,
    retry_budget: TpsBudget,
    outlier: Option<OutlierConfig>,
    max_fails: u32,
    fail_timeout: Duration,
    panic_threshold_percent: u32,
    slow_start: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The outcome of a selection.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The backend, or `None` when no backend is available (503).
    pub backend: Option<Chosen>,
    /// The plugin failed and the native round-robin chose.
    pub fallback: bool,
    /// The plugin failed and `on_plugin_error = "fail"` refused the request.
    pub failed: bool,
    /// The plugin that decided (only with `debug_headers`; `None` for the fallback).
    pub decided_by: Option<Arc<Plugin>>,
    /// Headers the plugin asked to add to the response (`response.add-header`).
    pub response_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

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
}

/// The plugin part of [`UpstreamSnapshot`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginSnapshot {
    /// Built-in name or file path (`admin upload` for uploaded bytes).
    pub name: String,
    /// `sha256:<hex>` of the component bytes.
    pub digest: String,
    /// When this plugin was swapped in, in seconds since the Unix epoch.
    pub loaded_at_unix_s: u64,
    /// `ok`; `failing` (the circuit breaker is open, or the last
    /// [`FAILING_AFTER`] calls all failed); or `no_instance` (the breaker
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
    /// Load the upstream's plugin with `runtime` and instantiate it (running
    /// its `init` and `set-backends`).
    ///
    /// # Errors
    /// Any [`PluginError`] from loading or initializing the plugin.
    pub fn new(
        name: &str,
        config: &UpstreamConfig,
        runtime: &Runtime,
        metrics: &Metrics,
    ) -> Result<Self, PluginError> {
        let plugin = runtime.load(&config.plugin)?;
        Self::build(name, config, plugin, &HashMap::new(), metrics)
    }

    /// Build with an already loaded plugin. `previous` maps backend addresses
    /// to counters to keep (from the upstream this one replaces); other
    /// backends start at zero.
    ///
    /// # Errors
    /// [`PluginError::Init`] if the plugin's `init` or `set-backends` fails.
    pub fn build(
        name: &str,
        config: &UpstreamConfig,
        plugin: Arc<Plugin>,
        previous: &HashMap<SocketAddr, Arc<BackendCounters>>,
        metrics: &Metrics,
    ) -> Result<Self, PluginError> {
        let slow_start = Duration::from_millis(config.slow_start_ms);
        let now = Instant::now();
        let backends: Arc<[BackendState]> = config
            .backends
            .iter()
            .map(|b| {
                let kept = previous.get(&b.address).cloned();
                let is_new = kept.is_none();
                let counters = kept.unwrap_or_else(|| {
                    Arc::new(BackendCounters::new(
                        metrics.backend(name, &b.address.to_string()),
                    ))
                });
                counters.apply_configured_state(b.state, is_new);
                if is_new && !previous.is_empty() && !slow_start.is_zero() {
                    // Joined through a reload: ramp up (not at startup).
                    counters.update_status(|s| s.ramp_from = Some(now));
                }
                BackendState::new(b.address, b.weight, b.labels.clone(), counters)
            })
            .collect();
        let upstream_metrics = metrics.upstream(name);
        let name: Arc<str> = name.into();
        let settings = InstanceSettings {
            upstream: name.clone(),
            config_json: config.plugin_config.to_string(),
            deadline_ms: config.plugin_deadline_ms,
            init_deadline_ms: config.plugin_init_deadline_ms,
            memory_limit_bytes: usize::try_from(
                config.plugin_memory_limit_mib.saturating_mul(1 << 20),
            )
            .unwrap_or(usize::MAX),
            log_limit: Arc::default(),
        };
        let mut upstream = Self {
            name,
            slot: Mutex::new(Slot {
                plugin: plugin.clone(),
                settings: settings.clone(),
                instance: None,
                backends: backends.clone(),
                breaker: Breaker::default(),
                loaded_at: SystemTime::now(),
                panic: false,
            }),
            fallback_cursor: AtomicUsize::new(0),
            stats: PluginStats::default(),
            metrics: upstream_metrics,
            on_error: config.on_plugin_error,
            debug_headers: config.debug_headers,
            logs: UpstreamLogs::default(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
            response_body_timeout: Duration::from_millis(config.response_body_timeout_ms),
            request_timeout: config.request_timeout_ms.map(Duration::from_millis),
            retries: config.retries,
            retry_buffer_bytes: config.retry_buffer_bytes,
            retry_budget: TpsBudget::new(
                Duration::from_secs(10),
                config.retry_min_per_second,
                config.retry_budget_percent as f32 / 100.0,
            ),
            outlier: config.outlier_detection.clone(),
            max_fails: config.max_fails,
            fail_timeout: Duration::from_millis(config.fail_timeout_ms),
            panic_threshold_percent: config.panic_threshold_percent,
            slow_start,
        };
        // Flags and weights from carried-over state (drain, ejection, health)
        // before the plugin first sees the set.
        let slot = upstream
            .slot
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let (evaluated, _, panic) = evaluate_backends(
            &backends,
            now,
            upstream.panic_threshold_percent,
            upstream.slow_start,
        );
        slot.backends = evaluated.clone();
        slot.panic = panic;
        slot.instance = Some(plugin.instantiate(&settings, evaluated)?);
        Ok(upstream)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current backend set, indexed by backend id.
    pub fn backends(&self) -> Arc<[BackendState]> {
        self.lock().backends.clone()
    }

    /// Counters of every backend by address, to carry over into a rebuilt upstream.
    pub fn counters(&self) -> HashMap<SocketAddr, Arc<BackendCounters>> {
        self.lock()
            .backends
            .iter()
            .map(|b| (b.address, b.counters.clone()))
            .collect()
    }

    /// The current plugin.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.lock().plugin.clone()
    }

    /// Plugin failure and fallback counters.
    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    /// The upstream's metric handles.
    pub fn metrics(&self) -> &UpstreamMetrics {
        &self.metrics
    }

    /// Whether responses carry the `x-wasmlb-*` debug headers.
    pub fn debug_headers(&self) -> bool {
        self.debug_headers
    }

    /// What happens when the plugin fails.
    pub fn on_plugin_error(&self) -> OnPluginError {
        self.on_error
    }

    /// Instantiate `plugin` for this upstream's current backends (with
    /// `config_json`, or the current one) and swap it in atomically: every
    /// request is decided entirely by the old instance or by the new one.
    ///
    /// The new instance is built and initialized before the swap, outside the
    /// lock; requests keep flowing to the old one meanwhile.
    ///
    /// If both plugins have the `wasmlb:plugin/state` interface, the old
    /// instance's exported state is imported into the new one inside the same
    /// critical section. Returns the number of state bytes handed over.
    ///
    /// # Errors
    /// [`PluginError::Init`] if the new plugin's `init` or `set-backends`
    /// fails; the old plugin keeps serving.
    pub fn swap_plugin(
        &self,
        plugin: Arc<Plugin>,
        config_json: Option<String>,
    ) -> Result<Option<usize>, PluginError> {
        let (mut settings, backends) = {
            let slot = self.lock();
            (slot.settings.clone(), slot.backends.clone())
        };
        if let Some(json) = config_json {
            settings.config_json = json;
        }
        let mut instance = plugin.instantiate(&settings, backends.clone())?;
        let mut slot = self.lock();
        if !Arc::ptr_eq(&slot.backends, &backends) {
            // The set changed while the new instance was built: tell it.
            instance
                .set_backends(slot.backends.clone())
                .map_err(|message| PluginError::Init {
                    plugin: plugin.name().to_string(),
                    stage: "set-backends",
                    message,
                })?;
        }
        let handed_over =
            self.hand_over_state(slot.instance.as_mut(), &mut instance, plugin.name());
        slot.instance = Some(instance);
        slot.plugin = plugin;
        slot.settings = settings;
        slot.breaker = Breaker::default();
        self.metrics.breaker_open.set(0);
        slot.loaded_at = SystemTime::now();
        drop(slot);
        self.stats.consecutive_failures.store(0, Ordering::Relaxed);
        Ok(handed_over)
    }

    /// `export-state` on `old`, `import-state` on `new`; returns the number of
    /// bytes handed over, or `None` if nothing was (no state interface on
    /// either side, nothing exported, or the import refused; logged).
    fn hand_over_state(
        &self,
        old: Option<&mut Instance>,
        new: &mut Instance,
        new_name: &str,
    ) -> Option<usize> {
        let bytes = match old?.export_state()? {
            Ok(bytes) if !bytes.is_empty() => bytes,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(
                    upstream = &*self.name,
                    "export-state failed, the new plugin starts fresh: {e}"
                );
                return None;
            }
        };
        let len = bytes.len();
        match new.import_state(bytes)? {
            Ok(()) => Some(len),
            Err(e) => {
                tracing::info!(
                    upstream = &*self.name,
                    plugin = new_name,
                    "import-state refused, starting fresh: {e}"
                );
                None
            }
        }
    }

    /// Record the active health checks' verdict for the backend at
    /// `address`. On a change the plugin is told (see [`Upstream::refresh`]).
    pub fn set_check_passing(&self, address: SocketAddr, passing: bool) {
        let mut slot = self.lock();
        let Some(backend) = slot.backends.iter().find(|b| b.address == address) else {
            return;
        };
        if backend
            .counters
            .check_passing
            .swap(passing, Ordering::Relaxed)
            == passing
        {
            return;
        }
        let state = if passing { "healthy" } else { "unhealthy" };
        tracing::info!(upstream = &*self.name, backend = %address, "health check: backend is now {state}");
        self.refresh(&mut slot, Instant::now());
    }

    /// Set the administrative state of the backend at `address` (HAProxy
    /// `set server ... state`). Returns its snapshot, or `None` if the
    /// upstream has no such backend.
    pub fn set_admin_state(
        &self,
        address: SocketAddr,
        state: AdminState,
    ) -> Option<BackendSnapshot> {
        let mut slot = self.lock();
        let id = slot.backends.iter().position(|b| b.address == address)?;
        let old = slot.backends[id].counters.set_admin_state(state);
        if old != state {
            tracing::info!(
                upstream = &*self.name,
                backend = %address,
                "backend state {} -> {}",
                old.as_str(),
                state.as_str()
            );
        }
        let now = Instant::now();
        self.refresh(&mut slot, now);
        Some(backend_snapshot(id, &slot.backends[id], now))
    }

    /// Record the outcome of an attempt on `chosen` for outlier detection
    /// (`ok` false: a 5xx response, a connect failure or a timeout). After
    /// `consecutive_5xx` failures in a row the backend is ejected, unless
    /// `max_ejection_percent` of the backends already are (one may always
    /// be). Without `outlier_detection` this does nothing. Lock-free unless
    /// the threshold is reached.
    pub fn report(&self, chosen: &Chosen, ok: bool) {
        let Some(od) = &self.outlier else { return };
        if chosen.counters.record(ok) < od.consecutive_5xx {
            return;
        }
        let mut slot = self.lock();
        let now = Instant::now();
        let Some(backend) = slot
            .backends
            .iter()
            .find(|b| Arc::ptr_eq(&b.counters, &chosen.counters))
        else {
            return;
        };
        let counters = backend.counters.clone();
        counters.consecutive_failures.store(0, Ordering::Relaxed);
        if counters.ejected(now) {
            return;
        }
        let ejected = slot
            .backends
            .iter()
            .filter(|b| b.counters.ejected(now))
            .count();
        let cap = (slot.backends.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            // Once per cap reached, then at debug: a second dead backend
            // fails every request sent to it, and this must not flood.
            self.metrics.ejections_skipped.inc();
            if let Some(suppressed) = self.logs.not_ejected.admit() {
                tracing::debug!(
                    upstream = &*self.name,
                    backend = %chosen.address,
                    suppressed,
                    "outlier not ejected: {ejected} of {} backends already are (max_ejection_percent = {})",
                    slot.backends.len(),
                    od.max_ejection_percent
                );
            }
            return;
        }
        let max = Duration::from_millis(od.max_ejection_time_ms);
        let time = counters.update_status(|s| {
            if s.returned_at.is_some_and(|t| now.duration_since(t) > max) {
                s.ejections = 0;
            }
            s.ejections = s.ejections.saturating_add(1);
            let time = Duration::from_millis(od.base_ejection_time_ms)
                .saturating_mul(s.ejections)
                .min(max);
            s.ejected_until = Some(now + time);
            time
        });
        self.metrics.ejections.inc();
        tracing::warn!(
            upstream = &*self.name,
            backend = %chosen.address,
            "outlier ejected for {} ms after {} failures in a row",
            time.as_millis(),
            od.consecutive_5xx
        );
        self.refresh(&mut slot, now);
    }

    /// Record a failed connect to `chosen` (refused, or not connected within
    /// `connect_timeout_ms`): nothing was sent. After `max_fails` in a row the
    /// backend leaves rotation for `fail_timeout_ms`, whatever share of the
    /// backends already has (NGINX `max_fails` / `fail_timeout`, on by
    /// default; `max_fails = 0` turns it off). It also counts for outlier
    /// detection, if configured. Lock-free below the threshold.
    pub fn report_connect_failure(&self, chosen: &Chosen) {
        self.report(chosen, false);
        if self.max_fails == 0 || chosen.counters.record_connect(false) < self.max_fails {
            return;
        }
        let mut slot = self.lock();
        let now = Instant::now();
        let until = now + self.fail_timeout;
        let newly = chosen.counters.update_status(|s| {
            let newly = s.unreachable_until.is_none_or(|t| t <= now);
            s.unreachable_until = Some(until);
            newly
        });
        chosen.counters.connect_failures.store(0, Ordering::Relaxed);
        if newly {
            tracing::warn!(
                upstream = &*self.name,
                backend = %chosen.address,
                "backend unreachable: out of rotation for {} ms after {} connect failures in a row",
                self.fail_timeout.as_millis(),
                self.max_fails
            );
        }
        self.refresh(&mut slot, now);
    }

    /// Record that `chosen` answered (any response): its connect-failure
    /// streak restarts. One relaxed load when there is none.
    pub fn report_connected(&self, chosen: &Chosen) {
        chosen.counters.record_connect(true);
    }

    /// Periodic upkeep (every [`TICK`]): end expired ejections and
    /// unreachable periods, advance slow starts, and report drained backends.
    pub fn tick(&self) {
        let mut slot = self.lock();
        let now = Instant::now();
        for b in slot.backends.iter() {
            let drained = b.counters.admin_state() == AdminState::Drain
                && b.counters.in_flight.load(Ordering::Relaxed) == 0;
            let (readmitted, retrying, report_drained) = b.counters.update_status(|s| {
                let readmitted = s.ejected_until.is_some_and(|t| t <= now);
                if readmitted {
                    s.ejected_until = None;
                    s.returned_at = Some(now);
                }
                let retrying = s.unreachable_until.is_some_and(|t| t <= now);
                if retrying {
                    s.unreachable_until = None;
                }
                let report = drained && !s.drained_reported;
                s.drained_reported |= report;
                (readmitted, retrying, report)
            });
            if retrying {
                tracing::info!(upstream = &*self.name, backend = %b.address, "fail_timeout_ms passed: the unreachable backend is tried again");
            }
            if readmitted {
                b.counters.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::info!(upstream = &*self.name, backend = %b.address, "ejection ended, backend readmitted");
            }
            if report_drained {
                tracing::info!(upstream = &*self.name, backend = %b.address, "backend drained: no request in flight");
            }
        }
        self.refresh(&mut slot, now);
    }

    /// Re-evaluate which backends the plugin may choose and their effective
    /// weights (see [`evaluate_backends`]); when anything changed, hand the
    /// plugin the new set through `set-backends` (under the lock, so no
    /// decision sees a half-applied change). A plugin that traps on it is
    /// replaced.
    fn refresh(&self, slot: &mut Slot, now: Instant) {
        let (backends, changed, panic) = evaluate_backends(
            &slot.backends,
            now,
            self.panic_threshold_percent,
            self.slow_start,
        );
        if panic != slot.panic {
            slot.panic = panic;
            if panic {
                tracing::warn!(
                    upstream = &*self.name,
                    "panic mode: fewer than {} % of the backends are available; offering all ready backends",
                    self.panic_threshold_percent
                );
            } else {
                tracing::info!(upstream = &*self.name, "panic mode ended");
            }
        }
        if !changed {
            return;
        }
        slot.backends = backends.clone();
        if let Some(instance) = slot.instance.as_mut()
            && let Err(e) = instance.set_backends(backends)
        {
            self.trip(slot, "set-backends", &e);
        }
    }

    /// Take one retry from the retry budget (tower's `TpsBudget`, after
    /// linkerd: `retry_budget_percent` of the requests over the last 10 s,
    /// plus `retry_min_per_second`). False when the budget is spent.
    pub fn withdraw_retry(&self) -> bool {
        self.retry_budget.withdraw()
    }

    /// Credit the retry budget with one request.
    pub fn deposit_request(&self) {
        self.retry_budget.deposit();
    }

    /// Choose a backend for `request`, never one of `tried` (the backends
    /// earlier attempts of this request failed on): if the plugin names a
    /// tried backend, its first untried candidate is taken, else the next
    /// selectable untried backend after it in id order. The request is
    /// handed back unchanged.
    pub fn select(&self, request: RequestView, tried: &[usize]) -> (Selection, RequestView) {
        let mut slot = self.lock();
        if slot.instance.is_none() && !self.try_replace(&mut slot) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.metrics.calls_skipped.inc();
            let selection = self.on_failure(&slot.backends, tried);
            return (selection, request);
        }
        let Some(instance) = slot.instance.as_mut() else {
            let selection = self.on_failure(&slot.backends, tried);
            return (selection, request);
        };
        let started = Instant::now();
        let (result, request) = instance.select(request);
        let response_headers = instance.take_response_headers();
        self.metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
        let chosen = |slot: &Slot, id: u32| {
            let id = id as usize;
            let b = slot.backends.get(id)?;
            if tried.contains(&id) {
                return next_untried(&slot.backends, id + 1, tried);
            }
            Some(b.chosen(id))
        };
        let decided_by = self.debug_headers.then(|| slot.plugin.clone());
        let ok = |backend| Selection {
            backend,
            fallback: false,
            failed: false,
            decided_by,
            response_headers,
        };
        match result {
            Ok(decision) => {
                if self.stats.consecutive_failures.swap(0, Ordering::Relaxed) > 0 {
                    // A half-open probe passed: the breaker is closed.
                    self.metrics.breaker_open.set(0);
                }
                let backend = match decision {
                    Decision::Backend(id) => chosen(&slot, id),
                    Decision::Candidates(ids) => ids
                        .iter()
                        .find(|&&id| !tried.contains(&(id as usize)))
                        .or(ids.first())
                        .and_then(|&id| chosen(&slot, id)),
                    Decision::Unavailable => None,
                };
                (ok(backend), request)
            }
            Err((kind, message)) => {
                self.stats.counter(kind).fetch_add(1, Ordering::Relaxed);
                self.metrics.failure(kind);
                self.stats
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed);
                // A trapped instance cannot be entered again; one that answered
                // nonsense may hold corrupt state. Either way, start afresh,
                // once the breaker closes.
                self.trip(&mut slot, kind.as_str(), &message);
                let selection = self.on_failure(&slot.backends, tried);
                (selection, request)
            }
        }
    }

    fn on_failure(&self, backends: &[BackendState], tried: &[usize]) -> Selection {
        match self.on_error {
            OnPluginError::Fallback => self.fallback(backends, tried),
            OnPluginError::Fail => Selection {
                backend: None,
                fallback: false,
                failed: true,
                decided_by: None,
                response_headers: Vec::new(),
            },
        }
    }

    /// Drop the instance and open the circuit breaker after a failure of
    /// `what` (`trap`, `deadline`, `bad_answer`, `set-backends`,
    /// `instantiate`); logged, rate-limited.
    fn trip(&self, slot: &mut Slot, what: &str, message: &str) {
        slot.instance = None;
        let wait = slot.breaker.trip(Instant::now());
        self.stats.breaker_trips.fetch_add(1, Ordering::Relaxed);
        self.metrics.breaker_open.set(1);
        if let Some(suppressed) = self.logs.plugin_failed.admit() {
            // The first line of the message: wasmtime appends a backtrace.
            let first = message.lines().next().unwrap_or_default();
            tracing::warn!(
                upstream = &*self.name,
                plugin = slot.plugin.name(),
                failure = what,
                on_plugin_error = ?self.on_error,
                retry_in_ms = wait.as_millis() as u64,
                suppressed,
                "plugin failed, circuit breaker open: {first}"
            );
        }
    }

    /// Build a fresh instance into `slot` if the circuit breaker is closed
    /// (the caller's request then probes it). False if it is open, or
    /// instantiating failed (which reopens it).
    fn try_replace(&self, slot: &mut Slot) -> bool {
        if slot.breaker.is_open(Instant::now()) {
            return false;
        }
        match slot
            .plugin
            .instantiate(&slot.settings, slot.backends.clone())
        {
            Ok(instance) => {
                slot.instance = Some(instance);
                self.stats.replacements.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                if let Some(suppressed) = self.logs.replace_failed.admit() {
                    tracing::error!(
                        upstream = &*self.name,
                        suppressed,
                        "replacing the plugin instance failed: {e}"
                    );
                }
                self.trip(slot, "instantiate", &e.to_string());
                false
            }
        }
    }

    /// The native fallback: plain rotation over selectable backends not in
    /// `tried`, ignoring weights. `None` when there is none.
    fn fallback(&self, backends: &[BackendState], tried: &[usize]) -> Selection {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let start = self.fallback_cursor.fetch_add(1, Ordering::Relaxed);
        let backend = next_untried(backends, start, tried);
        Selection {
            backend,
            fallback: true,
            failed: false,
            decided_by: None,
            response_headers: Vec::new(),
        }
    }

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
        }
    }
}

/// The first backend at or after `start` (in rotation) that is selectable
/// and not in `tried`.
fn next_untried(backends: &[BackendState], start: usize, tried: &[usize]) -> Option<Chosen> {
    let n = backends.len();
    (0..n)
        .map(|i| start.wrapping_add(i) % n)
        .find(|&i| backends[i].counters.healthy.load(Ordering::Relaxed) && !tried.contains(&i))
        .map(|i| backends[i].chosen(i))
}

fn backend_snapshot(id: usize, b: &BackendState, now: Instant) -> BackendSnapshot {
    let c = &b.counters;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, PluginRef};
    use prometheus_client::metrics::gauge::Gauge;

    fn config(plugin: &str, n: u16) -> UpstreamConfig {
        let backends = (0..n)
            .map(|i| BackendConfig::new(SocketAddr::from(([127, 0, 0, 1], 9001 + i))))
            .collect();
        UpstreamConfig::new(PluginRef::Builtin(plugin.into()), backends)
    }

    fn request() -> RequestView {
        let (parts, ()) = http::Request::new(()).into_parts();
        RequestView {
            parts,
            client: SocketAddr::from(([127, 0, 0, 1], 5555)),
        }
    }

    #[test]
    fn round_robin_rotates_through_the_plugin() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        let picks: Vec<_> = (0..6)
            .map(|_| up.select(request(), &[]).0.backend.unwrap().id)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(up.stats().fallbacks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn least_connections_sees_in_flight_counts() {
        let rt = Runtime::new().unwrap();
        let up =
            Upstream::new("app", &config("least-connections", 3), &rt, &Metrics::new()).unwrap();
        let chosen = |id: usize| up.backends()[id].chosen(id);
        let a = InFlight::begin(&chosen(0), Gauge::default());
        let _b = InFlight::begin(&chosen(2), Gauge::default());
        for _ in 0..3 {
            assert_eq!(up.select(request(), &[]).0.backend.unwrap().id, 1);
        }
        drop(a);
        assert_eq!(
            up.backends()[0].counters.in_flight.load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn empty_upstream_is_unavailable() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("none", &config("round-robin", 0), &rt, &Metrics::new()).unwrap();
        let (s, _) = up.select(request(), &[]);
        assert!(s.backend.is_none() && !s.fallback && !s.failed);
    }

    #[test]
    fn swap_replaces_the_decider_and_keeps_backends() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        let b1 = up.backends()[1].chosen(1);
        let _busy = InFlight::begin(&b1, Gauge::default());
        let lc = rt
            .load(&PluginRef::Builtin("least-connections".into()))
            .unwrap();
        up.swap_plugin(lc, None).unwrap();
        assert_eq!(up.plugin().name(), "least-connections");
        let picks: Vec<_> = (0..4)
            .map(|_| up.select(request(), &[]).0.backend.unwrap().id)
            .collect();
        assert_eq!(
            picks,
            vec![0, 2, 0, 2],
            "least-connections avoids the busy backend"
        );
        // Swapping back to known bytes hits the digest cache.
        let rr = rt.load(&PluginRef::Builtin("round-robin".into())).unwrap();
        assert!(rr.from_cache());
        up.swap_plugin(rr, None).unwrap();
        assert_eq!(up.snapshot().plugin.name, "round-robin");
    }

    #[test]
    fn failed_swap_keeps_the_old_plugin() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 2), &rt, &Metrics::new()).unwrap();
        let lc = rt
            .load(&PluginRef::Builtin("least-connections".into()))
            .unwrap();
        let e = up
            .swap_plugin(lc, Some(r#"{"nope":1}"#.into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `nope`"), "{e}");
        assert_eq!(up.plugin().name(), "round-robin");
        assert_eq!(up.select(request(), &[]).0.backend.unwrap().id, 0);
    }

    #[test]
    fn bad_plugin_config_fails_init_with_the_plugins_message() {
        let rt = Runtime::new().unwrap();
        let mut c = config("round-robin", 1);
        c.plugin_config = serde_json::json!({"bogus": true});
        let e = Upstream::new("app", &c, &rt, &Metrics::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "plugin round-robin: init failed: invalid plugin_config: unknown field `bogus`"
            ),
            "{e}"
        );
    }

    fn with_outlier(n: u16, consecutive: u32, max_percent: u32) -> UpstreamConfig {
        let mut c = config("round-robin", n);
        c.outlier_detection = Some(OutlierConfig {
            consecutive_5xx: consecutive,
            base_ejection_time_ms: 60_000,
            max_ejection_time_ms: 300_000,
            max_ejection_percent: max_percent,
        });
        c
    }

    #[test]
    fn consecutive_failures_eject_within_the_cap() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &with_outlier(3, 2, 10), &rt, &Metrics::new()).unwrap();
        let b = |id: usize| up.backends()[id].chosen(id);
        up.report(&b(1), false);
        up.report(&b(1), true); // a success resets the streak
        up.report(&b(1), false);
        assert_eq!(up.snapshot().backends[1].state, "healthy");
        up.report(&b(1), false);
        let snap = up.snapshot();
        assert_eq!(snap.backends[1].state, "ejected");
        assert!(snap.backends[1].ejected_for_ms.unwrap() > 50_000);
        assert_eq!(snap.backends[1].ejections, 1);
        for _ in 0..6 {
            assert_ne!(up.select(request(), &[]).0.backend.unwrap().id, 1);
        }
        // 10 % of 3 is 0, but one may always be ejected; a second may not.
        up.report(&b(2), false);
        up.report(&b(2), false);
        assert_eq!(up.snapshot().backends[2].state, "healthy");
        assert_eq!(up.metrics().ejections.get(), 1);
    }

    #[test]
    fn panic_mode_offers_every_ready_backend() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 2), &rt, &Metrics::new()).unwrap();
        let [a, b] = [0, 1].map(|i| up.backends()[i].address);
        up.set_check_passing(a, false);
        // 1 of 2 available is 50 %: not below the default threshold.
        assert!(!up.snapshot().panic);
        assert_eq!(up.select(request(), &[]).0.backend.unwrap().id, 1);
        up.set_check_passing(b, false);
        let snap = up.snapshot();
        assert!(snap.panic);
        assert!(snap.backends.iter().all(|b| b.selectable));
        let picks: Vec<_> = (0..4)
            .map(|_| up.select(request(), &[]).0.backend.unwrap().id)
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
        // A drained backend is not offered even in panic mode.
        up.set_admin_state(a, AdminState::Drain);
        for _ in 0..4 {
            assert_eq!(up.select(request(), &[]).0.backend.unwrap().id, 1);
        }
    }

    #[test]
    fn retries_skip_tried_backends() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        for _ in 0..6 {
            let id = up.select(request(), &[0, 2]).0.backend.unwrap().id;
            assert_eq!(id, 1);
        }
        assert!(up.select(request(), &[0, 1, 2]).0.backend.is_none());
    }

    #[test]
    fn slow_start_scales_weights_while_a_backend_ramps() {
        let rt = Runtime::new().unwrap();
        let mut c = config("round-robin", 2);
        c.slow_start_ms = 10_000;
        let up = Upstream::new("app", &c, &rt, &Metrics::new()).unwrap();
        assert_eq!(up.backends()[1].weight, 1, "no ramp at startup");
        let b = up.backends()[1].address;
        up.set_check_passing(b, false);
        up.set_check_passing(b, true);
        let weights: Vec<u32> = up.backends().iter().map(|b| b.weight).collect();
        assert_eq!(weights, vec![100, 10]);
        let later = Instant::now() + Duration::from_secs(5);
        let (backends, changed, panic) = evaluate_backends(&up.backends(), later, 50, c_slow());
        assert!(changed && !panic);
        assert_eq!(backends[1].weight, 50);
        let done = Instant::now() + Duration::from_secs(11);
        let (backends, _, _) = evaluate_backends(&backends, done, 50, c_slow());
        assert_eq!(
            backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            vec![1, 1]
        );
    }

    #[test]
    fn the_breaker_backs_off_exponentially_and_starts_over_after_a_quiet_period() {
        let mut b = Breaker::default();
        let t0 = Instant::now();
        assert!(!b.is_open(t0));
        assert_eq!(b.trip(t0), BREAKER_INITIAL_BACKOFF);
        assert!(b.is_open(t0 + Duration::from_millis(50)));
        assert!(!b.is_open(t0 + BREAKER_INITIAL_BACKOFF));
        let mut waits = Vec::new();
        let mut t = t0;
        for _ in 0..12 {
            t += Duration::from_secs(1);
            waits.push(b.trip(t));
        }
        assert_eq!(waits[0], BREAKER_INITIAL_BACKOFF * 2);
        assert_eq!(waits[1], BREAKER_INITIAL_BACKOFF * 4);
        assert_eq!(*waits.last().unwrap(), BREAKER_MAX_BACKOFF);
        // Quiet for long enough: the next failure starts over.
        assert_eq!(b.trip(t + BREAKER_QUIET_PERIOD), BREAKER_INITIAL_BACKOFF);
    }

    fn c_slow() -> Duration {
        Duration::from_secs(10)
    }
}
