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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::UpstreamConfig;
use crate::plugin::{
    Decision, FailureKind, Instance, InstanceSettings, Plugin, PluginError, RequestView, Runtime,
};

/// Minimum wait between two attempts to replace a broken instance whose
/// replacement failed.
pub const REPLACE_BACKOFF: Duration = Duration::from_secs(1);

/// Live state of one backend. Indexed by the plugin's backend id.
#[derive(Debug)]
pub struct BackendState {
    /// The backend's address.
    pub address: SocketAddr,
    /// Effective weight (at least 1).
    pub weight: u32,
    /// Labels from the config.
    pub labels: BTreeMap<String, String>,
    /// Requests forwarded whose response body is not yet fully sent.
    pub in_flight: AtomicU32,
    /// Whether the backend may be chosen. Always true until health checks exist.
    pub healthy: AtomicBool,
    /// Requests forwarded to this backend since start.
    pub requests: AtomicU64,
}

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
}

impl PluginStats {
    /// The counter for `kind`.
    pub fn failures(&self, kind: FailureKind) -> u64 {
        match kind {
            FailureKind::Trap => self.traps.load(Ordering::Relaxed),
            FailureKind::Deadline => self.deadlines.load(Ordering::Relaxed),
            FailureKind::BadAnswer => self.bad_answers.load(Ordering::Relaxed),
        }
    }

    fn count(&self, kind: FailureKind) {
        let c = match kind {
            FailureKind::Trap => &self.traps,
            FailureKind::Deadline => &self.deadlines,
            FailureKind::BadAnswer => &self.bad_answers,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

struct Slot {
    instance: Option<Instance>,
    last_attempt: Option<Instant>,
}

/// A named group of backends with its plugin.
pub struct Upstream {
    name: Arc<str>,
    backends: Arc<[BackendState]>,
    plugin: Arc<Plugin>,
    settings: InstanceSettings,
    slot: Mutex<Slot>,
    fallback_cursor: AtomicUsize,
    stats: PluginStats,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Wait for the backend's response headers.
    pub response_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("plugin", &self.plugin.name())
            .field("backends", &self.backends.len())
            .finish_non_exhaustive()
    }
}

/// The outcome of a selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// Backend index, or `None` when no backend is available (503).
    pub backend: Option<usize>,
    /// The plugin failed and the native round-robin chose.
    pub fallback: bool,
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
    ) -> Result<Self, PluginError> {
        let plugin = runtime.load(&config.plugin)?;
        Self::with_plugin(name, config, plugin)
    }

    /// As [`Upstream::new`] with an already loaded plugin.
    ///
    /// # Errors
    /// [`PluginError::Init`] if the plugin's `init` or `set-backends` fails.
    pub fn with_plugin(
        name: &str,
        config: &UpstreamConfig,
        plugin: Arc<Plugin>,
    ) -> Result<Self, PluginError> {
        let backends: Arc<[BackendState]> = config
            .backends
            .iter()
            .map(|b| BackendState {
                address: b.address,
                weight: b.weight,
                labels: b.labels.clone(),
                in_flight: AtomicU32::new(0),
                healthy: AtomicBool::new(true),
                requests: AtomicU64::new(0),
            })
            .collect();
        let name: Arc<str> = name.into();
        let settings = InstanceSettings {
            upstream: name.clone(),
            config_json: config.plugin_config.to_string(),
            deadline_ms: config.plugin_deadline_ms,
            memory_limit_bytes: usize::try_from(
                config.plugin_memory_limit_mib.saturating_mul(1 << 20),
            )
            .unwrap_or(usize::MAX),
        };
        let instance = plugin.instantiate(&settings, backends.clone())?;
        Ok(Self {
            name,
            backends,
            plugin,
            settings,
            slot: Mutex::new(Slot {
                instance: Some(instance),
                last_attempt: None,
            }),
            fallback_cursor: AtomicUsize::new(0),
            stats: PluginStats::default(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
        })
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backends' live state, indexed by backend id.
    pub fn backends(&self) -> &[BackendState] {
        &self.backends
    }

    /// The plugin's name (built-in name or file path).
    pub fn plugin_name(&self) -> &str {
        self.plugin.name()
    }

    /// Plugin failure and fallback counters.
    pub fn stats(&self) -> &PluginStats {
        &self.stats
    }

    /// Choose a backend for `request`. The request is handed back unchanged.
    pub fn select(&self, request: RequestView) -> (Selection, RequestView) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(instance) = slot.instance.as_mut() else {
            self.try_replace(&mut slot);
            drop(slot);
            return (self.fallback(), request);
        };
        let (result, request) = instance.select(request);
        match result {
            Ok(Decision::Backend(id)) => (
                Selection {
                    backend: Some(id as usize),
                    fallback: false,
                },
                request,
            ),
            Ok(Decision::Candidates(ids)) => (
                Selection {
                    backend: ids.first().map(|&id| id as usize),
                    fallback: false,
                },
                request,
            ),
            Ok(Decision::Unavailable) => (
                Selection {
                    backend: None,
                    fallback: false,
                },
                request,
            ),
            Err((kind, message)) => {
                self.stats.count(kind);
                tracing::warn!(
                    upstream = &*self.name,
                    plugin = self.plugin.name(),
                    failure = kind.as_str(),
                    "plugin select failed, serving with the round-robin fallback: {message}"
                );
                // A trapped instance cannot be entered again; one that answered
                // nonsense may hold corrupt state. Either way, start afresh.
                slot.instance = None;
                slot.last_attempt = None;
                self.try_replace(&mut slot);
                drop(slot);
                (self.fallback(), request)
            }
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
        match self
            .plugin
            .instantiate(&self.settings, self.backends.clone())
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
    fn fallback(&self) -> Selection {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        let n = self.backends.len();
        let start = self.fallback_cursor.fetch_add(1, Ordering::Relaxed);
        let backend = (0..n)
            .map(|i| start.wrapping_add(i) % n)
            .find(|&i| self.backends[i].healthy.load(Ordering::Relaxed));
        Selection {
            backend,
            fallback: true,
        }
    }

    /// Mark a request as in flight to backend `index` until the guard drops.
    pub fn begin(self: &Arc<Self>, index: usize) -> InFlight {
        let b = &self.backends[index];
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        b.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            upstream: self.clone(),
            index,
        }
    }
}

/// Counts one request in flight to a backend; decrements on drop (when the
/// response body has been sent, or the request failed).
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    index: usize,
}

impl InFlight {
    /// The backend's index.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.backends[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
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
        let up = Upstream::new("app", &config("round-robin", 3), &rt).unwrap();
        let picks: Vec<_> = (0..6)
            .map(|_| up.select(request()).0.backend.unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(up.stats().fallbacks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn least_connections_sees_in_flight_counts() {
        let rt = Runtime::new().unwrap();
        let up = Arc::new(Upstream::new("app", &config("least-connections", 3), &rt).unwrap());
        let _a = up.begin(0);
        let _b = up.begin(2);
        for _ in 0..3 {
            assert_eq!(up.select(request()).0.backend, Some(1));
        }
        drop(_a);
        assert_eq!(up.backends()[0].in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn empty_upstream_is_unavailable() {
        let rt = Runtime::new().unwrap();
        let up = Upstream::new("none", &config("round-robin", 0), &rt).unwrap();
        assert_eq!(
            up.select(request()).0,
            Selection {
                backend: None,
                fallback: false
            }
        );
    }

    #[test]
    fn bad_plugin_config_fails_init_with_the_plugins_message() {
        let rt = Runtime::new().unwrap();
        let mut c = config("round-robin", 1);
        c.plugin_config = serde_json::json!({"bogus": true});
        let e = Upstream::new("app", &c, &rt).unwrap_err().to_string();
        assert!(
            e.contains(
                "plugin round-robin: init failed: invalid plugin_config: unknown field `bogus`"
            ),
            "{e}"
        );
    }
}
