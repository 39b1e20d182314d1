//! The control plane: reload the config and swap plugins without dropping a
//! request, and read the state the admin API shows.
//!
//! A reload builds a complete new [`Proxy`] (plugins loaded and initialized,
//! listeners bound) before swapping it in, so a bad config changes nothing,
//! and requests in flight keep the upstreams and backends that chose them.
//! Reloads and swaps are serialized.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

mod membership;
pub use membership::{MembershipError, Removal};

use crate::config::{Config, ConfigError, PluginRef};
use crate::listener::{ListenerTask, Serving, global_max_connections, spawn_listener};
use crate::metrics::Metrics;
use crate::plugin::{PluginError, Runtime};
pub use crate::proxy::error_chain;
use crate::proxy::{ListenerKey, Proxy, ProxyError};
use crate::upstream::{Upstream, UpstreamSnapshot};

/// Why a reload was rejected. The running config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A plugin failed to load or initialize.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A new listener could not bind.
    #[error("listener {address}: cannot bind: {source}")]
    Bind {
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The reload task failed unexpectedly.
    #[error("reload task failed: {0}")]
    Task(String),
}

/// What a reload changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// Upstream names in the new config.
    pub upstreams: Vec<String>,
    /// Listener addresses bound by this reload.
    pub listeners_added: Vec<SocketAddr>,
    /// Listener addresses closed by this reload (their open connections drain).
    pub listeners_removed: Vec<SocketAddr>,
    /// Time to validate, build and swap, in ms.
    pub elapsed_ms: f64,
}

/// What to swap in as an upstream's plugin.
#[derive(Debug, Clone)]
pub enum PluginSource {
    /// Component bytes (uploaded).
    Bytes(Vec<u8>),
    /// A built-in or a file.
    Ref(PluginRef),
    /// The upstream's current plugin, re-initialized (e.g. with a new config).
    Current,
    /// Component bytes with a name to show (a fleet's plugin).
    Named {
        /// The name, e.g. `fleet:strategy.wasm`.
        name: String,
        /// The component.
        bytes: Vec<u8>,
    },
    /// A plugin already loaded (a fleet instance swapping back).
    Loaded(Arc<crate::plugin::Plugin>),
}

/// Why a plugin swap was rejected. The old plugin keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No upstream has that name.
    #[error("no upstream named {0:?}")]
    UnknownUpstream(String),
    /// The plugin failed to load, link or initialize.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The swap task failed unexpectedly.
    #[error("swap task failed: {0}")]
    Task(String),
    /// The upstream has no shadow plugin (to promote or restart).
    #[error("upstream {0:?} has no shadow plugin")]
    NoShadow(String),
}

/// The outcome of a swap.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwapReport {
    /// The upstream.
    pub upstream: String,
    /// The new plugin's name.
    pub plugin: String,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// The compiled component came from the digest cache.
    pub cached: bool,
    /// Bytes of strategy state handed from the old plugin to the new one
    /// (`null` if none: a side lacks the state interface, or the import refused).
    pub state_bytes: Option<usize>,
    /// Time from the request to the new plugin serving, in ms.
    pub elapsed_ms: f64,
}

/// The config being served and its listeners; held while a reload or swap runs.
pub(crate) struct ControlState {
    pub(crate) config: Config,
    pub(crate) listeners: Vec<ListenerTask>,
}

/// Everything the control plane holds.
pub(crate) struct Shared {
    pub(crate) runtime: Runtime,
    /// The proxy, metrics and connection cap the listeners read.
    pub(crate) serving: Arc<Serving>,
    pub(crate) addrs: ArcSwap<Vec<SocketAddr>>,
    pub(crate) config_path: PathBuf,
    pub(crate) control: Mutex<ControlState>,
}

/// A cloneable handle to a running server's control plane: reloads, plugin
/// swaps, state and metrics. Reloads and swaps are serialized.
#[derive(Clone)]
pub struct Control {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config", &self.shared.config_path)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The bound address of each listener, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.addrs.load().to_vec()
    }

    /// The proxy currently serving new requests.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.shared.serving.proxy.load_full()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.serving.metrics
    }

    /// Snapshots of every upstream, ordered by name.
    pub fn snapshots(&self) -> Vec<UpstreamSnapshot> {
        self.proxy().upstreams().map(|u| u.snapshot()).collect()
    }

    /// The config file path (plugin paths in admin requests resolve against its directory).
    pub fn config_path(&self) -> &std::path::Path {
        &self.shared.config_path
    }

    /// The served config's upstream `name`, as configured.
    pub async fn upstream_config(&self, name: &str) -> Option<crate::config::UpstreamConfig> {
        self.shared
            .control
            .lock()
            .await
            .config
            .upstreams
            .get(name)
            .cloned()
    }

    /// `sha256:<hex>` of the served config file's text.
    pub async fn config_digest(&self) -> String {
        self.shared.control.lock().await.config.digest.clone()
    }

    /// Re-read the config file and apply it.
    ///
    /// # Errors
    /// As [`Control::apply`]; the running config keeps serving.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let result = match Config::load(&self.shared.config_path) {
            Ok(config) => self.apply(config).await,
            Err(e) => Err(ReloadError::Config(e)),
        };
        if let Err(e) = &result {
            self.shared.serving.metrics.reload(false);
            tracing::error!(
                "reload rejected, the running config keeps serving: {}",
                error_chain(e)
            );
        }
        result
    }

    /// Apply `config`: build a new proxy (plugins loaded and initialized,
    /// counters of kept backends carried over), bind added listeners, swap,
    /// then close removed listeners (their connections drain). Plugins
    /// swapped in through the admin API revert to the config's.
    ///
    /// # Errors
    /// [`ReloadError`]; nothing changes.
    pub async fn apply(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let started = Instant::now();
        let mut control = self.shared.control.lock().await;
        let shared = self.shared.clone();
        let new_config = config.clone();
        let proxy = tokio::task::spawn_blocking(move || {
            let current = shared.serving.proxy.load_full();
            Proxy::build(
                &new_config,
                &shared.runtime,
                shared.serving.metrics.clone(),
                Some(&current),
            )
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))??;

        let keys = ListenerKey::all(&config);
        let mut added = Vec::new();
        for key in &keys {
            if !control.listeners.iter().any(|l| l.key == *key) {
                let listener =
                    TcpListener::bind(key.address)
                        .await
                        .map_err(|source| ReloadError::Bind {
                            address: key.address,
                            source,
                        })?;
                added.push((*key, listener));
            }
        }
        // Commit.
        start_background(&proxy, &config);
        self.shared.serving.proxy.store(Arc::new(proxy));
        let max_connections = global_max_connections(&config);
        self.shared.serving.conn_limit.set_max(max_connections);
        let resources = self.shared.serving.metrics.resources();
        resources
            .connections_max
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
        self.shared.runtime.set_cache_limits(
            config.server.plugin_cache_entries,
            config.server.plugin_cache_mib << 20,
            resources.clone(),
        );
        let own_max = |key: &ListenerKey| {
            keys.iter()
                .position(|k| k == key)
                .and_then(|i| config.listeners[i].max_connections)
        };
        for l in &control.listeners {
            l.limit.set_max(own_max(&l.key).unwrap_or(usize::MAX));
        }
        let mut listeners_added = Vec::new();
        for (key, listener) in added {
            let task = spawn_listener(&self.shared.serving, key, listener, own_max(&key));
            listeners_added.push(task.local);
            control.listeners.push(task);
        }
        let mut listeners_removed = Vec::new();
        let (keep, removed): (Vec<_>, Vec<_>) = std::mem::take(&mut control.listeners)
            .into_iter()
            .partition(|l| keys.contains(&l.key));
        for l in removed {
            listeners_removed.push(l.local);
            let _ = l.stop.send(true);
        }
        let mut ordered = keep;
        ordered.sort_by_key(|l| keys.iter().position(|k| *k == l.key));
        self.shared
            .addrs
            .store(Arc::new(ordered.iter().map(|l| l.local).collect()));
        control.listeners = ordered;
        let upstreams = config.upstreams.keys().cloned().collect();
        let mut control_warnings = config.warnings.clone();
        if config.server.plugin_cache_dir != control.config.server.plugin_cache_dir {
            control_warnings
                .push("server.plugin_cache_dir changed: it takes effect at the next start".into());
        }
        control.config = config;
        drop(control);
        self.shared.serving.metrics.reload(true);
        let report = ReloadReport {
            upstreams,
            listeners_added,
            listeners_removed,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        for warning in &control_warnings {
            tracing::warn!("{warning}");
        }
        tracing::info!(?report, "config reloaded");
        Ok(report)
    }

    /// Swap the plugin of upstream `name`. The new plugin is compiled (or
    /// taken from the digest cache), its imports checked, and it is
    /// instantiated and initialized before the swap; then every new decision
    /// uses it. `plugin_config` (a JSON object) replaces the upstream's
    /// config if given.
    ///
    /// # Errors
    /// [`SwapError`]; the old plugin keeps serving.
    pub async fn swap_plugin(
        &self,
        name: &str,
        source: PluginSource,
        plugin_config: Option<serde_json::Value>,
    ) -> Result<SwapReport, SwapError> {
        let started = Instant::now();
        let _control = self.shared.control.lock().await;
        let upstream = self.upstream_named(name)?;
        let runtime = self.shared.runtime.clone();
        let result = tokio::task::spawn_blocking(move || {
            swap_blocking(&runtime, &upstream, source, plugin_config)
        })
        .await
        .map_err(|e| SwapError::Task(e.to_string()))
        .and_then(|r| r);
        self.shared.serving.metrics.swap(name, result.is_ok());
        let (plugin, digest, cached, state_bytes) = result?;
        let report = SwapReport {
            upstream: name.to_string(),
            plugin,
            digest,
            cached,
            state_bytes,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::info!(?report, "plugin swapped");
        Ok(report)
    }
}

impl Control {
    /// The current upstream `name`.
    ///
    /// # Errors
    /// [`SwapError::UnknownUpstream`].
    fn upstream_named(&self, name: &str) -> Result<Arc<Upstream>, SwapError> {
        self.proxy()
            .upstream(name)
            .cloned()
            .ok_or_else(|| SwapError::UnknownUpstream(name.to_string()))
    }

    /// Run `source` as upstream `name`'s shadow plugin (see
    /// [`crate::upstream::shadow`]) with `plugin_config` (default `{}`) on
    /// `sample_percent` of the requests (default: the shadow before's, else
    /// 100), replacing the shadow plugin before. `PluginSource::Current`
    /// restarts the current shadow plugin.
    ///
    /// # Errors
    /// [`SwapError`]: no such upstream, no shadow plugin to restart, or the
    /// candidate fails to load or initialize; the shadow before stays.
    pub async fn swap_shadow(
        &self,
        name: &str,
        source: PluginSource,
        plugin_config: Option<serde_json::Value>,
        sample_percent: Option<u32>,
    ) -> Result<SwapReport, SwapError> {
        let started = Instant::now();
        let _control = self.shared.control.lock().await;
        let upstream = self.upstream_named(name)?;
        let before = upstream.shadow();
        let runtime = self.shared.runtime.clone();
        let counters = self.shared.serving.metrics.shadow(name);
        let result = tokio::task::spawn_blocking(move || {
            let plugin = load_source(&runtime, source, || match &before {
                Some(s) => Ok(s.plugin().clone()),
                None => Err(SwapError::NoShadow(upstream.name().to_string())),
            })?;
            let config = plugin_config.map_or_else(
                || {
                    before
                        .as_ref()
                        .map_or_else(|| "{}".to_string(), |s| s.config_json().to_string())
                },
                |c| c.to_string(),
            );
            let percent = sample_percent
                .or_else(|| before.as_ref().map(|s| s.sample_percent()))
                .unwrap_or(100);
            upstream.start_shadow(plugin.clone(), config, percent, counters)?;
            Ok((
                plugin.name().to_string(),
                plugin.digest().to_string(),
                plugin.from_cache(),
            ))
        })
        .await
        .map_err(|e| SwapError::Task(e.to_string()))
        .and_then(|r| r)?;
        let report = SwapReport {
            upstream: name.to_string(),
            plugin: result.0,
            digest: result.1,
            cached: result.2,
            state_bytes: None,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::info!(?report, "shadow plugin started");
        Ok(report)
    }

    /// Stop upstream `name`'s shadow plugin; true if it had one.
    ///
    /// # Errors
    /// [`SwapError::UnknownUpstream`].
    pub fn stop_shadow(&self, name: &str) -> Result<bool, SwapError> {
        let upstream = self.upstream_named(name)?;
        Ok(upstream.stop_shadow().is_some())
    }

    /// Promote upstream `name`'s shadow plugin: an ordinary swap to it (with
    /// its config), after which it no longer runs in shadow.
    ///
    /// # Errors
    /// [`SwapError`]: no such upstream, no shadow plugin, or the swap fails
    /// (the live plugin and the shadow stay).
    pub async fn promote_shadow(&self, name: &str) -> Result<SwapReport, SwapError> {
        let upstream = self.upstream_named(name)?;
        let shadow = upstream
            .shadow()
            .ok_or_else(|| SwapError::NoShadow(name.to_string()))?;
        let config = serde_json::from_str(shadow.config_json()).ok();
        let report = self
            .swap_plugin(name, PluginSource::Loaded(shadow.plugin().clone()), config)
            .await?;
        // Only the shadow that was promoted stops (a concurrent swap_shadow
        // may have replaced it).
        if upstream.shadow().is_some_and(|s| Arc::ptr_eq(&s, &shadow)) {
            upstream.stop_shadow();
        }
        Ok(report)
    }
}

/// The plugin `source` names, loaded (compiled or from the cache);
/// `current` gives [`PluginSource::Current`]'s.
///
/// # Errors
/// [`SwapError::Plugin`] if it fails to load, or `current`'s error.
fn load_source(
    runtime: &Runtime,
    source: PluginSource,
    current: impl FnOnce() -> Result<Arc<crate::plugin::Plugin>, SwapError>,
) -> Result<Arc<crate::plugin::Plugin>, SwapError> {
    Ok(match source {
        PluginSource::Bytes(bytes) => runtime.load_bytes("(uploaded)", &bytes)?,
        PluginSource::Named { name, bytes } => runtime.load_bytes(&name, &bytes)?,
        PluginSource::Ref(r) => runtime.load(&r)?,
        PluginSource::Loaded(plugin) => plugin,
        PluginSource::Current => current()?,
    })
}

fn swap_blocking(
    runtime: &Runtime,
    upstream: &Upstream,
    source: PluginSource,
    plugin_config: Option<serde_json::Value>,
) -> Result<(String, String, bool, Option<usize>), SwapError> {
    let plugin = load_source(runtime, source, || Ok(upstream.plugin()))?;
    let state_bytes = upstream.swap_plugin(plugin.clone(), plugin_config.map(|c| c.to_string()))?;
    Ok((
        plugin.name().to_string(),
        plugin.digest().to_string(),
        plugin.from_cache(),
        state_bytes,
    ))
}

/// Start the background loops of a freshly built `proxy`: each upstream's
/// upkeep (ejection ends, slow start) and, where configured, its health
/// checks. The loops end when the proxy's upstreams are dropped.
pub(crate) fn start_background(proxy: &Proxy, config: &Config) {
    crate::upstream::start_upkeep(proxy.upstreams());
    crate::health::start(proxy.upstreams(), proxy.metrics(), config);
    crate::discovery::start(proxy.upstreams(), proxy.metrics(), config);
}
