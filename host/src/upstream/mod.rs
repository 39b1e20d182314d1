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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

pub use crate::backend::{Backend, BackendLive, InFlight, Target};
use crate::config::{AdminState, OnPluginError, OutlierConfig, UpstreamConfig};
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::retry::RetryPolicy;
mod breaker;
mod eligibility;
mod membership;
mod outlier;
pub mod shadow;
mod snapshot;
mod upkeep;

use breaker::Breaker;
pub use breaker::{
    BREAKER_INITIAL_BACKOFF, BREAKER_MAX_BACKOFF, BREAKER_QUIET_PERIOD, FAILING_AFTER, PluginStats,
};
pub use eligibility::evaluate_backends;
pub use membership::BackendSetChange;
use snapshot::backend_snapshot;
pub use snapshot::{BackendSnapshot, PluginSnapshot, UpstreamSnapshot};
pub use upkeep::{TICK, start as start_upkeep};

use crate::plugin::{
    Decision, Instance, InstanceSettings, Plugin, PluginError, RequestView, Runtime,
};

/// The plugin side of an upstream, swapped as a whole under the mutex.
struct Slot {
    plugin: Arc<Plugin>,
    settings: InstanceSettings,
    instance: Option<Instance>,
    backends: Arc<[Backend]>,
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
    /// How its backends are reached (TCP, TLS, protocol), by requests and
    /// health checks alike.
    pub connector: crate::connector::Connector,
    /// Wait for the backend's response headers.
    pub response_timeout: Duration,
    /// Most time between two reads of a response body.
    pub response_body_timeout: Duration,
    /// Most time a tunnel (upgrade, TCP mode) may pass with no byte either way.
    pub tunnel_idle_timeout: Duration,
    /// Bound on a whole request, if any.
    pub request_timeout: Option<Duration>,
    /// When and how often a failed attempt is retried.
    pub retry: RetryPolicy,
    /// Slots for mirrored copies in flight (`mirror_max_in_flight`).
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    outlier: Option<OutlierConfig>,
    max_fails: u32,
    fail_timeout: Duration,
    panic_threshold_percent: u32,
    slow_start: Duration,
    discovery: Option<crate::config::DiscoveryConfig>,
    /// The candidate plugin deciding in shadow, if any.
    shadow: arc_swap::ArcSwapOption<shadow::Shadow>,
    /// The trace recorder, if any.
    recorder: Option<Arc<crate::record::Recorder>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The outcome of a selection: a backend and who chose it, or why there is
/// none.
#[derive(Debug, Clone)]
pub enum Selection {
    /// The plugin chose `chosen`.
    Plugin {
        /// The backend to try.
        chosen: Target,
        /// The plugin that decided (only with `debug_headers`).
        plugin: Option<Arc<Plugin>>,
        /// Headers the plugin asked to add to the response
        /// (`response.add-header`).
        response_headers: Vec<(http::HeaderName, http::HeaderValue)>,
        /// Changes to the forwarded request and a mirror (the 0.2
        /// `forward` interface); `None` when the plugin asked none.
        edits: Option<Box<crate::plugin::RequestEdits>>,
        /// The backend `edits.mirror` names, resolved in the set the plugin
        /// decided on (ids are only valid for that set); `None` if it asked
        /// for no mirror or named no backend of the set.
        mirror: Option<Target>,
    },
    /// The plugin answered the request itself (the 0.2 `respond`
    /// decision): no backend is contacted.
    Respond {
        /// The answer, checked, with the `response.add-header` headers
        /// after its own.
        reply: Box<crate::plugin::Reply>,
    },
    /// The plugin failed, or its circuit breaker is open, and the native
    /// round-robin fallback chose `chosen`.
    Fallback {
        /// The backend to try.
        chosen: Target,
    },
    /// No backend is available (503): the plugin answered none, or, with
    /// `fallback`, the fallback found none untried and selectable.
    Unavailable {
        /// The fallback decided.
        fallback: bool,
    },
    /// The plugin failed and `on_plugin_error = "fail"` refused the request
    /// (503).
    Refused,
}

impl Selection {
    /// The backend to try, if any.
    pub fn target(&self) -> Option<&Target> {
        match self {
            Selection::Plugin { chosen, .. } | Selection::Fallback { chosen } => Some(chosen),
            Selection::Unavailable { .. } | Selection::Refused | Selection::Respond { .. } => None,
        }
    }

    /// Whether the native fallback decided (with or without a backend).
    pub fn is_fallback(&self) -> bool {
        matches!(
            self,
            Selection::Fallback { .. } | Selection::Unavailable { fallback: true }
        )
    }
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
        previous: &HashMap<SocketAddr, Arc<BackendLive>>,
        metrics: &Metrics,
    ) -> Result<Self, PluginError> {
        let slow_start = Duration::from_millis(config.slow_start_ms);
        let now = Instant::now();
        // Backends that joined through a reload ramp up (not at startup).
        let ramp_from = (!previous.is_empty() && !slow_start.is_zero()).then_some(now);
        let backends = membership::backends_of(
            name,
            &config.backends,
            |a| previous.get(a).cloned(),
            metrics,
            ramp_from,
        );
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
            track_header_reads: config.record.is_some(),
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
            connector: crate::connector::Connector::new(config),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
            response_body_timeout: Duration::from_millis(config.response_body_timeout_ms),
            tunnel_idle_timeout: Duration::from_millis(config.tunnel_idle_timeout_ms),
            request_timeout: config.request_timeout_ms.map(Duration::from_millis),
            retry: RetryPolicy::new(config),
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(
                config.mirror_max_in_flight as usize,
            )),
            outlier: config.outlier_detection.clone(),
            max_fails: config.max_fails,
            fail_timeout: Duration::from_millis(config.fail_timeout_ms),
            panic_threshold_percent: config.panic_threshold_percent,
            slow_start,
            discovery: config.discovery.clone(),
            shadow: arc_swap::ArcSwapOption::empty(),
            recorder: None,
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

    /// The upstream's name, shared (for records that outlive the request,
    /// such as the access log's, without copying it).
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// The discovery source that manages the backend set, if any (the
    /// admin API then neither adds nor removes backends).
    pub fn discovery(&self) -> Option<&crate::config::DiscoveryConfig> {
        self.discovery.as_ref()
    }

    /// The current backend set, indexed by backend id.
    pub fn backends(&self) -> Arc<[Backend]> {
        self.lock().backends.clone()
    }

    /// Counters of every backend by address, to carry over into a rebuilt upstream.
    pub fn counters(&self) -> HashMap<SocketAddr, Arc<BackendLive>> {
        self.lock()
            .backends
            .iter()
            .map(|b| (b.address, b.live.clone()))
            .collect()
    }

    /// The current plugin.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.lock().plugin.clone()
    }

    /// The JSON config the current plugin instance was initialized with.
    pub fn plugin_config_json(&self) -> String {
        self.lock().settings.config_json.clone()
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
    /// `address`. On a change the plugin is told (`set-backends`, through the upkeep's refresh).
    pub fn set_check_passing(&self, address: SocketAddr, passing: bool) {
        let mut slot = self.lock();
        let Some(backend) = slot.backends.iter().find(|b| b.address == address) else {
            return;
        };
        if backend.live.check_passing.swap(passing, Ordering::Relaxed) == passing {
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
        let old = slot.backends[id].live.set_admin_state(state);
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

    /// Choose a backend for `request`, never one of `tried` (the backends
    /// earlier attempts of this request failed on): if the plugin names a
    /// tried backend, its first untried candidate is taken, else the next
    /// selectable untried backend after it in id order. The request is
    /// handed back unchanged.
    ///
    /// With a shadow plugin, a sampled first attempt's request is also
    /// queued for the candidate (see [`shadow`]), after the live decision.
    pub fn select(&self, request: RequestView, tried: &[usize]) -> (Selection, RequestView) {
        let (selection, request, _) = self.select_traced(Box::new(request), tried, None);
        (selection, *request)
    }

    /// As [`Upstream::select`]; with a recorder and `arrived` (when the
    /// request arrived), a sampled first attempt also begins its trace
    /// record (see [`crate::record`]), for the caller to finish with the
    /// response. The request is boxed (the request path keeps it so): it
    /// moves into the plugin's store and back on every call.
    pub fn select_traced(
        &self,
        request: Box<RequestView>,
        tried: &[usize],
        arrived: Option<Instant>,
    ) -> (
        Selection,
        Box<RequestView>,
        Option<Box<crate::record::TraceStart>>,
    ) {
        let mut reads = Vec::new();
        let (selection, request) = self.select_live(request, tried, &mut reads);
        let trace = match (&self.recorder, arrived) {
            (Some(recorder), Some(at)) if tried.is_empty() => {
                recorder.begin(&request.parts, request.client, at, &reads)
            }
            _ => None,
        };
        if tried.is_empty()
            && let Some(shadow) = self.shadow.load().as_ref()
            && shadow.sampled()
        {
            let backends = self.lock().backends.clone();
            shadow.offer(
                request.copy(),
                backends,
                selection.target().map(|t| t.address),
            );
        }
        (selection, request, trace)
    }

    /// Whether a trace recorder records this upstream's requests.
    pub fn records(&self) -> bool {
        self.recorder.is_some()
    }

    /// Record this upstream's traffic with `recorder` (at build, before
    /// the upstream serves).
    pub fn set_recorder(&mut self, recorder: Arc<crate::record::Recorder>) {
        self.recorder = Some(recorder);
    }

    /// Start deciding in shadow with `plugin` (its `config_json`, on
    /// `sample_percent` of the requests), replacing any shadow plugin;
    /// `counters` are its agree, differ and error counters.
    ///
    /// # Errors
    /// [`PluginError`] if the candidate fails to instantiate or initialize;
    /// the shadow plugin before stays.
    pub fn start_shadow(
        &self,
        plugin: Arc<Plugin>,
        config_json: String,
        sample_percent: u32,
        counters: [prometheus_client::metrics::counter::Counter; 3],
    ) -> Result<(), PluginError> {
        let (mut settings, backends) = {
            let slot = self.lock();
            (slot.settings.clone(), slot.backends.clone())
        };
        settings.config_json = config_json;
        settings.log_limit = Arc::default();
        let shadow = shadow::Shadow::start(plugin, settings, backends, sample_percent, counters)?;
        self.shadow.store(Some(Arc::new(shadow)));
        Ok(())
    }

    /// Stop the shadow plugin; returns it, if there was one.
    pub fn stop_shadow(&self) -> Option<Arc<shadow::Shadow>> {
        self.shadow.swap(None)
    }

    /// The shadow plugin, if any.
    pub fn shadow(&self) -> Option<Arc<shadow::Shadow>> {
        self.shadow.load_full()
    }

    fn select_live(
        &self,
        request: Box<RequestView>,
        tried: &[usize],
        reads: &mut Vec<String>,
    ) -> (Selection, Box<RequestView>) {
        let mut slot = self.lock();
        if slot.instance.is_none() {
            self.try_replace(&mut slot);
        }
        let Some(instance) = slot.instance.as_mut() else {
            // The breaker is open, or a fresh instance failed to start.
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            self.metrics.calls_skipped.inc();
            let selection = self.on_failure(&slot.backends, tried);
            return (selection, request);
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (result, request) = instance.select_boxed(request);
        let response_headers = instance.take_response_headers();
        let edits = instance.take_edits();
        if self.recorder.is_some() {
            *reads = instance.take_header_reads();
        }
        self.metrics
            .decision_duration
            .observe(started.elapsed().as_secs_f64());
        let chosen = |slot: &Slot, id: u32| {
            let id = id as usize;
            let b = slot.backends.get(id)?;
            if tried.contains(&id) {
                return next_untried(&slot.backends, id + 1, tried);
            }
            Some(b.target(id))
        };
        match result {
            Ok(decision) => {
                if self.stats.consecutive_failures.swap(0, Ordering::Relaxed) > 0 {
                    // A half-open probe passed: the breaker is closed.
                    self.metrics.breaker_open.set(0);
                }
                let backend = match decision {
                    Decision::Respond(reply) => {
                        let reply = self.reply(reply, response_headers);
                        return (Selection::Respond { reply }, request);
                    }
                    Decision::Backend(id) => chosen(&slot, id),
                    Decision::Candidates(ids) => ids
                        .iter()
                        .find(|&&id| !tried.contains(&(id as usize)))
                        .or(ids.first())
                        .and_then(|&id| chosen(&slot, id)),
                    Decision::Unavailable => None,
                };
                let selection = match backend {
                    Some(chosen) => Selection::Plugin {
                        chosen,
                        plugin: self.debug_headers.then(|| slot.plugin.clone()),
                        response_headers,
                        mirror: edits.as_ref().and_then(|e| e.mirror).and_then(|id| {
                            let id = id as usize;
                            slot.backends.get(id).map(|b| b.target(id))
                        }),
                        edits,
                    },
                    None => Selection::Unavailable { fallback: false },
                };
                (selection, request)
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

    /// A `respond` decision (its status and body size already validated)
    /// as the reply to send: its headers checked one by one (refusals
    /// logged), then `added` (from `response.add-header`) within what is
    /// left of the caps.
    fn reply(
        &self,
        reply: crate::plugin::bindings::wasmlb::plugin::types::Reply,
        added: Vec<(http::HeaderName, http::HeaderValue)>,
    ) -> Box<crate::plugin::Reply> {
        let mut headers = crate::plugin::ResponseHeaders::default();
        for (name, value) in reply.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())) {
            if let Err(why) = headers.add(name, value)
                && let Some(suppressed) = self.logs.plugin_failed.admit()
            {
                tracing::warn!(
                    target: "wasmlb::plugin",
                    upstream = &*self.name,
                    header = name,
                    suppressed,
                    "respond: header ignored: {why}"
                );
            }
        }
        for (name, value) in &added {
            if let Ok(value) = value.to_str() {
                let _ = headers.add(name.as_str(), value);
            }
        }
        Box::new(crate::plugin::Reply {
            status: http::StatusCode::from_u16(reply.status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
            headers: headers.list,
            body: bytes::Bytes::from(reply.body),
        })
    }

    fn on_failure(&self, backends: &[Backend], tried: &[usize]) -> Selection {
        match self.on_error {
            OnPluginError::Fallback => self.fallback(backends, tried),
            OnPluginError::Fail => Selection::Refused,
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
    /// (the caller's request then probes it). Leaves the slot empty if it is
    /// open, or if instantiating failed (which reopens it).
    fn try_replace(&self, slot: &mut Slot) {
        if slot.breaker.is_open(Instant::now()) {
            return;
        }
        match slot
            .plugin
            .instantiate(&slot.settings, slot.backends.clone())
        {
            Ok(instance) => {
                slot.instance = Some(instance);
                self.stats.replacements.fetch_add(1, Ordering::Relaxed);
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
            }
        }
    }

    /// The native fallback: plain rotation over selectable backends not in
    /// `tried`, ignoring weights. `None` when there is none.
    fn fallback(&self, backends: &[Backend], tried: &[usize]) -> Selection {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let start = self.fallback_cursor.fetch_add(1, Ordering::Relaxed);
        match next_untried(backends, start, tried) {
            Some(chosen) => Selection::Fallback { chosen },
            None => Selection::Unavailable { fallback: true },
        }
    }
}

/// The first backend at or after `start` (in rotation) that is selectable
/// and not in `tried`.
fn next_untried(backends: &[Backend], start: usize, tried: &[usize]) -> Option<Target> {
    let n = backends.len();
    (0..n)
        .map(|i| start.wrapping_add(i) % n)
        .find(|&i| backends[i].live.healthy.load(Ordering::Relaxed) && !tried.contains(&i))
        .map(|i| backends[i].target(i))
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
        RequestView::new(parts, SocketAddr::from(([127, 0, 0, 1], 5555)))
    }

    #[test]
    fn round_robin_rotates_through_the_plugin() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        let picks: Vec<_> = (0..6)
            .map(|_| up.select(request(), &[]).0.target().unwrap().id)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(up.stats().fallbacks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_plugin_read_from_the_disk_cache_decides_as_a_compiled_one() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Runtime::with_disk_cache(Some(dir.path())).unwrap();
        writer
            .load(&PluginRef::Builtin("round-robin".into()))
            .unwrap();
        assert_eq!(writer.disk_cache().unwrap().misses, 1);
        let rt = Runtime::with_disk_cache(Some(dir.path())).unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        let counts = rt.disk_cache().unwrap();
        assert_eq!((counts.hits, counts.misses), (1, 0), "read, not compiled");
        let picks: Vec<_> = (0..6)
            .map(|_| up.select(request(), &[]).0.target().unwrap().id)
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_connections_sees_in_flight_counts() {
        let rt = Runtime::new().unwrap();
        let up =
            Upstream::new("app", &config("least-connections", 3), &rt, &Metrics::new()).unwrap();
        let chosen = |id: usize| up.backends()[id].target(id);
        let a = InFlight::begin(&chosen(0), Gauge::default());
        let _b = InFlight::begin(&chosen(2), Gauge::default());
        for _ in 0..3 {
            assert_eq!(up.select(request(), &[]).0.target().unwrap().id, 1);
        }
        drop(a);
        assert_eq!(up.backends()[0].live.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn empty_upstream_is_unavailable() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("none", &config("round-robin", 0), &rt, &Metrics::new()).unwrap();
        let (s, _) = up.select(request(), &[]);
        assert!(matches!(s, Selection::Unavailable { fallback: false }));
    }

    #[test]
    fn swap_replaces_the_decider_and_keeps_backends() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        let b1 = up.backends()[1].target(1);
        let _busy = InFlight::begin(&b1, Gauge::default());
        let lc = rt
            .load(&PluginRef::Builtin("least-connections".into()))
            .unwrap();
        up.swap_plugin(lc, None).unwrap();
        assert_eq!(up.plugin().name(), "least-connections");
        let picks: Vec<_> = (0..4)
            .map(|_| up.select(request(), &[]).0.target().unwrap().id)
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
        assert_eq!(up.select(request(), &[]).0.target().unwrap().id, 0);
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
        let b = |id: usize| up.backends()[id].target(id);
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
            assert_ne!(up.select(request(), &[]).0.target().unwrap().id, 1);
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
        assert_eq!(up.select(request(), &[]).0.target().unwrap().id, 1);
        up.set_check_passing(b, false);
        let snap = up.snapshot();
        assert!(snap.panic);
        assert!(snap.backends.iter().all(|b| b.selectable));
        let picks: Vec<_> = (0..4)
            .map(|_| up.select(request(), &[]).0.target().unwrap().id)
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
        // A drained backend is not offered even in panic mode.
        up.set_admin_state(a, AdminState::Drain);
        for _ in 0..4 {
            assert_eq!(up.select(request(), &[]).0.target().unwrap().id, 1);
        }
    }

    #[test]
    fn retries_skip_tried_backends() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("app", &config("round-robin", 3), &rt, &Metrics::new()).unwrap();
        for _ in 0..6 {
            let id = up.select(request(), &[0, 2]).0.target().unwrap().id;
            assert_eq!(id, 1);
        }
        assert!(up.select(request(), &[0, 1, 2]).0.target().is_none());
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
