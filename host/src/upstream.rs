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
//! the request is served by the host's native round-robin fallback, the event
//! is logged and counted ([`Upstream::stats`]), and the instance is replaced
//! by a fresh one
//! (at most one replacement attempt per [`REPLACE_BACKOFF`] if replacing fails).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::UpstreamConfig;
use crate::metrics::{BackendMetrics, Metrics, UpstreamMetrics};
use crate::plugin::{
    Decision, FailureKind, Instance, InstanceSettings, Plugin, PluginError, RequestView, Runtime,
};
use prometheus_client::metrics::gauge::Gauge;

/// Minimum wait between two attempts to replace a broken instance whose
/// replacement failed.
pub const REPLACE_BACKOFF: Duration = Duration::from_secs(1);

/// Counters of one backend that outlive config reloads: a reload keeps the
/// counters of every backend whose address stays in the upstream, so requests
/// in flight across a reload are still counted (least-connections stays
/// right; see pingora #144).
#[derive(Debug)]
pub struct BackendCounters {
    /// Requests forwarded whose response body is not yet fully sent.
    pub in_flight: AtomicU32,
    /// Whether the backend may be chosen. Always true until health checks exist.
    pub healthy: AtomicBool,
    /// Requests forwarded to this backend since it joined the upstream.
    pub requests: AtomicU64,
    /// Its `wasmlb_requests_total` counters.
    pub metrics: BackendMetrics,
}

impl BackendCounters {
    /// Fresh counters (healthy, nothing in flight) reporting into `metrics`.
    pub fn new(metrics: BackendMetrics) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            metrics,
        }
    }
}

/// One backend as the plugin sees it: its config and live counters. Indexed
/// by the plugin's backend id.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// The backend's address.
    pub address: SocketAddr,
    /// Effective weight (at least 1).
    pub weight: u32,
    /// Labels from the config.
    pub labels: BTreeMap<String, String>,
    /// Live counters, shared across reloads.
    pub counters: Arc<BackendCounters>,
    /// `address` as a URI authority, computed once (not per request).
    pub authority: http::uri::Authority,
}

impl BackendState {
    /// The request-path handle for this backend, as backend `id`.
    pub fn chosen(&self, id: usize) -> Chosen {
        Chosen {
            id,
            address: self.address,
            authority: self.authority.clone(),
            counters: self.counters.clone(),
        }
    }
}

/// `address` as a URI authority. A socket address always formats as a valid
/// authority (`1.2.3.4:80`, `[::1]:80`).
fn authority_of(address: SocketAddr) -> http::uri::Authority {
    http::uri::Authority::try_from(address.to_string().as_str())
        .expect("a socket address is a valid URI authority")
}

/// What to do when the plugin fails (trap, deadline, bad answer):
/// `on_plugin_error` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPluginError {
    /// Serve the request with the host's round-robin (the default).
    #[default]
    Fallback,
    /// Answer 503.
    Fail,
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
    /// Instances replaced after a failure.
    pub replacements: AtomicU64,
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
    last_attempt: Option<Instant>,
    loaded_at: SystemTime,
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
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Wait for the backend's response headers.
    pub response_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The backend a request goes to: taken from the same backend snapshot the
/// plugin decided on, so a concurrent reload or swap cannot shift it.
#[derive(Debug, Clone)]
pub struct Chosen {
    /// The backend's id in that snapshot.
    pub id: usize,
    /// Its address.
    pub address: SocketAddr,
    /// Its address as a URI authority.
    pub authority: http::uri::Authority,
    /// Its live counters.
    pub counters: Arc<BackendCounters>,
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
}

/// A point-in-time view of an upstream for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamSnapshot {
    /// Upstream name.
    pub name: String,
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
    /// `ok`, `failing` (the last calls all failed) or `no_instance`.
    pub status: &'static str,
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
    /// Weight.
    pub weight: u32,
    /// `healthy` or `unhealthy`.
    pub state: &'static str,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests forwarded since the backend joined the upstream.
    pub requests: u64,
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
        let backends: Arc<[BackendState]> = config
            .backends
            .iter()
            .map(|b| BackendState {
                address: b.address,
                weight: b.weight,
                labels: b.labels.clone(),
                counters: previous.get(&b.address).cloned().unwrap_or_else(|| {
                    Arc::new(BackendCounters::new(
                        metrics.backend(name, &b.address.to_string()),
                    ))
                }),
                authority: authority_of(b.address),
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
        };
        let instance = plugin.instantiate(&settings, backends.clone())?;
        Ok(Self {
            name,
            slot: Mutex::new(Slot {
                plugin,
                settings,
                instance: Some(instance),
                backends,
                last_attempt: None,
                loaded_at: SystemTime::now(),
            }),
            fallback_cursor: AtomicUsize::new(0),
            stats: PluginStats::default(),
            metrics: upstream_metrics,
            on_error: config.on_plugin_error,
            debug_headers: config.debug_headers,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
        })
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
        slot.last_attempt = None;
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

    /// Mark the backend at `address` healthy or not. On a change, the plugin
    /// gets `set-backends` with the new flags (under the upstream's lock, so
    /// no decision sees a half-applied change); a plugin that traps on it is
    /// replaced.
    pub fn set_healthy(&self, address: SocketAddr, healthy: bool) {
        let mut slot = self.lock();
        let Some(backend) = slot.backends.iter().find(|b| b.address == address) else {
            return;
        };
        if backend.counters.healthy.swap(healthy, Ordering::Relaxed) == healthy {
            return;
        }
        let state = if healthy { "healthy" } else { "unhealthy" };
        tracing::info!(upstream = &*self.name, backend = %address, "backend is now {state}");
        let backends = slot.backends.clone();
        if let Some(instance) = slot.instance.as_mut()
            && let Err(e) = instance.set_backends(backends)
        {
            tracing::warn!(
                upstream = &*self.name,
                "plugin set-backends failed, replacing the instance: {e}"
            );
            slot.instance = None;
            slot.last_attempt = None;
            self.try_replace(&mut slot);
        }
    }

    /// Choose a backend for `request`. The request is handed back unchanged.
    pub fn select(&self, request: RequestView) -> (Selection, RequestView) {
        let mut slot = self.lock();
        let Some(instance) = slot.instance.as_mut() else {
            self.try_replace(&mut slot);
            let selection = self.on_failure(&slot.backends);
            return (selection, request);
        };
        let started = Instant::now();
        let (result, request) = instance.select(request);
        self.metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
        let chosen = |slot: &Slot, id: u32| {
            slot.backends
                .get(id as usize)
                .map(|b| b.chosen(id as usize))
        };
        let decided_by = self.debug_headers.then(|| slot.plugin.clone());
        let ok = |backend| Selection {
            backend,
            fallback: false,
            failed: false,
            decided_by,
        };
        match result {
            Ok(decision) => {
                self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                let backend = match decision {
                    Decision::Backend(id) => chosen(&slot, id),
                    Decision::Candidates(ids) => ids.first().and_then(|&id| chosen(&slot, id)),
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
                tracing::warn!(
                    upstream = &*self.name,
                    plugin = slot.plugin.name(),
                    failure = kind.as_str(),
                    on_plugin_error = ?self.on_error,
                    "plugin select failed: {message}"
                );
                // A trapped instance cannot be entered again; one that answered
                // nonsense may hold corrupt state. Either way, start afresh.
                slot.instance = None;
                slot.last_attempt = None;
                self.try_replace(&mut slot);
                let selection = self.on_failure(&slot.backends);
                (selection, request)
            }
        }
    }

    fn on_failure(&self, backends: &[BackendState]) -> Selection {
        match self.on_error {
            OnPluginError::Fallback => self.fallback(backends),
            OnPluginError::Fail => Selection {
                backend: None,
                fallback: false,
                failed: true,
                decided_by: None,
            },
        }
    }

    /// Instantiate a fresh instance into `slot` unless an attempt failed
    /// within [`REPLACE_BACKOFF`].
    fn try_replace(&self, slot: &mut Slot) {
        let now = Instant::now();
        if slot
            .last_attempt
            .is_some_and(|t| now.duration_since(t) < REPLACE_BACKOFF)
        {
            return;
        }
        slot.last_attempt = Some(now);
        match slot
            .plugin
            .instantiate(&slot.settings, slot.backends.clone())
        {
            Ok(instance) => {
                slot.instance = Some(instance);
                self.stats.replacements.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(
                upstream = &*self.name,
                "replacing the plugin instance failed: {e}"
            ),
        }
    }

    /// The native fallback: plain rotation over healthy backends, ignoring
    /// weights. `None` when no backend is healthy.
    fn fallback(&self, backends: &[BackendState]) -> Selection {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let n = backends.len();
        let start = self.fallback_cursor.fetch_add(1, Ordering::Relaxed);
        let backend = (0..n)
            .map(|i| start.wrapping_add(i) % n)
            .find(|&i| backends[i].counters.healthy.load(Ordering::Relaxed))
            .map(|i| backends[i].chosen(i));
        Selection {
            backend,
            fallback: true,
            failed: false,
            decided_by: None,
        }
    }

    /// A point-in-time view for the admin API.
    pub fn snapshot(&self) -> UpstreamSnapshot {
        let slot = self.lock();
        let status = if slot.instance.is_none() {
            "no_instance"
        } else if self.stats.failing() {
            "failing"
        } else {
            "ok"
        };
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
            plugin: PluginSnapshot {
                name: slot.plugin.name().to_string(),
                digest: slot.plugin.digest().to_string(),
                loaded_at_unix_s: slot
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                status,
                on_plugin_error: self.on_error,
                failures,
                fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
                replacements: self.stats.replacements.load(Ordering::Relaxed),
            },
            backends: slot
                .backends
                .iter()
                .enumerate()
                .map(|(id, b)| BackendSnapshot {
                    id,
                    address: b.address,
                    weight: b.weight,
                    state: if b.counters.healthy.load(Ordering::Relaxed) {
                        "healthy"
                    } else {
                        "unhealthy"
                    },
                    in_flight: b.counters.in_flight.load(Ordering::Relaxed),
                    requests: b.counters.requests.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

/// Counts one request in flight to a backend; decrements on drop (when the
/// response body has been sent, or the request failed).
#[derive(Debug)]
pub struct InFlight {
    counters: Arc<BackendCounters>,
    gauge: Gauge,
}

impl InFlight {
    /// Count a request to `chosen` as in flight (in its counters and in the
    /// upstream's `gauge`) until the guard drops.
    pub fn begin(chosen: &Chosen, gauge: Gauge) -> Self {
        chosen.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        chosen.counters.requests.fetch_add(1, Ordering::Relaxed);
        gauge.inc();
        Self {
            counters: chosen.counters.clone(),
            gauge,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, PluginRef};

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
            .map(|_| up.select(request()).0.backend.unwrap().id)
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
            assert_eq!(up.select(request()).0.backend.unwrap().id, 1);
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
        let (s, _) = up.select(request());
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
            .map(|_| up.select(request()).0.backend.unwrap().id)
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
        assert_eq!(up.select(request()).0.backend.unwrap().id, 0);
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
}
