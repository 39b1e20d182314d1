//! Start a server from a config (plugins, listeners, the admin API) and shut
//! it down gracefully. Listeners are in [`crate::listener`], reloads and
//! swaps in [`crate::control`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::config::Config;
use crate::conn::ConnLimit;
pub use crate::control::{
    Control, PluginSource, ReloadError, ReloadReport, SwapError, SwapReport, error_chain,
};
use crate::control::{ControlState, Shared};
use crate::listener::{Serving, global_max_connections, spawn_listener};
use crate::metrics::Metrics;
use crate::plugin::Runtime;
use crate::proxy::{ListenerKey, Proxy, ProxyError};
use crate::upstream::Upstream;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Loading plugins or building the proxy failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A listener could not bind (the OS error is the source).
    #[error("listener[{index}]: cannot bind {address}")]
    Bind {
        /// The listener's index in the config.
        index: usize,
        /// Its configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The admin listener could not bind.
    #[error("admin: cannot bind {address}")]
    AdminBind {
        /// The configured address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The plugin runtime for `config`: with its `plugin_cache_dir` if that can
/// be used, else (with a warning) without one, since the cache only saves
/// compilation time and memory.
///
/// # Errors
/// [`crate::plugin::PluginError::Engine`] if wasmtime rejects the engine
/// configuration.
pub fn runtime_for(config: &Config) -> Result<Runtime, crate::plugin::PluginError> {
    let dir = config.server.plugin_cache_dir.as_deref();
    match Runtime::with_disk_cache(dir) {
        Err(e @ crate::plugin::PluginError::DiskCache { .. }) => {
            tracing::warn!("{e}; compiling plugins without a disk cache");
            Runtime::new()
        }
        other => other,
    }
}

/// Entry point for embedding: start every listener of a config.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Load the plugins, bind every listener (and the admin listener, if
    /// configured) and start serving.
    ///
    /// # Errors
    /// [`ServerError`] naming the upstream or listener at fault.
    pub async fn start(config: &Config) -> Result<RunningServer, ServerError> {
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let runtime = runtime_for(config).map_err(ProxyError::Runtime)?;
        let metrics = Arc::new(Metrics::new());
        runtime.set_cache_limits(
            config.server.plugin_cache_entries,
            config.server.plugin_cache_mib << 20,
            metrics.resources().clone(),
        );
        let max_connections = global_max_connections(config);
        tracing::info!(
            max_connections,
            nofile = crate::fd_limit::nofile(),
            "downstream connection cap"
        );
        metrics
            .resources()
            .connections_max
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
        let proxy = Proxy::build(config, &runtime, metrics.clone(), None)?;
        if let Some(disk) = runtime.disk_cache() {
            tracing::info!(
                dir = %disk.dir.display(),
                read = disk.hits,
                compiled = disk.misses,
                "plugin disk cache"
            );
        }
        crate::control::start_background(&proxy, config);
        let mut bound = Vec::new();
        for (index, (key, l)) in ListenerKey::all(config)
            .into_iter()
            .zip(&config.listeners)
            .enumerate()
        {
            let listener =
                TcpListener::bind(l.address)
                    .await
                    .map_err(|source| ServerError::Bind {
                        index,
                        address: l.address,
                        source,
                    })?;
            bound.push((key, listener));
        }
        let serving = Arc::new(Serving {
            proxy: ArcSwap::from_pointee(proxy),
            metrics,
            conn_limit: ConnLimit::new(max_connections),
        });
        let mut listeners = Vec::new();
        for ((key, listener), l) in bound.into_iter().zip(&config.listeners) {
            listeners.push(spawn_listener(&serving, key, listener, l.max_connections));
        }
        let shared = Arc::new(Shared {
            runtime,
            serving,
            addrs: ArcSwap::from_pointee(Vec::new()),
            config_path: config.path.clone(),
            control: Mutex::new(ControlState {
                config: config.clone(),
                listeners: Vec::new(),
            }),
        });
        shared
            .addrs
            .store(Arc::new(listeners.iter().map(|l| l.local).collect()));
        shared.control.lock().await.listeners = listeners;
        let control = Control { shared };
        let admin = match &config.admin {
            Some(admin) => Some(crate::admin::start(admin, control.clone()).await.map_err(
                |source| ServerError::AdminBind {
                    address: admin.address,
                    source,
                },
            )?),
            None => None,
        };
        let fleet = config.fleet.as_ref().map(|fleet| {
            let port = control.local_addrs().first().map_or(0, SocketAddr::port);
            let instance = crate::fleet::agent::instance_name(fleet, port);
            crate::fleet::agent::start(control.clone(), fleet.clone(), instance)
        });
        Ok(RunningServer {
            control,
            admin,
            fleet,
            shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
        })
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    control: Control,
    admin: Option<crate::admin::AdminHandle>,
    fleet: Option<crate::fleet::agent::AgentHandle>,
    shutdown_timeout: Duration,
}

impl RunningServer {
    /// The bound address of each listener, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.control.local_addrs()
    }

    /// The admin API's bound address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local)
    }

    /// The control plane: reloads, swaps, snapshots, metrics.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The upstream named `name` in the current config.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.control.proxy().upstream(name).cloned()
    }

    /// Stop accepting, let in-flight requests finish for at most the
    /// configured `shutdown_timeout_ms`, then return. Returns true if every
    /// connection finished in time.
    pub async fn shutdown(self) -> bool {
        if let Some(admin) = self.admin {
            admin.task.abort();
        }
        if let Some(fleet) = self.fleet {
            // Leave the fleet first: its status goes at once.
            fleet.stop().await;
        }
        let listeners = std::mem::take(&mut self.control.shared.control.lock().await.listeners);
        for l in &listeners {
            let _ = l.stop.send(true);
        }
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let mut clean = true;
        for l in listeners {
            clean &= tokio::time::timeout_at(deadline, l.task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
        }
        clean
    }
}
