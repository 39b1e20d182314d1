//! Listeners and connections: accept, serve HTTP/1.1 and HTTP/2 cleartext
//! (prior knowledge) on the same port; reload the config and swap plugins
//! without dropping a request; shut down gracefully.
//!
//! Every request reads the current [`Proxy`] from an `ArcSwap` once, when it
//! arrives, and finishes on it: a reload builds a complete new `Proxy` (plugins
//! loaded and initialized, listeners bound) before swapping it in, so a bad
//! config changes nothing, and requests in flight keep the upstreams and
//! backends that chose them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, PluginRef};
use crate::conn::{ConnLimit, ConnPermit, TimedIo};
use crate::log_limit::LogLimiter;
use crate::metrics::{LocalOp, Metrics};
use crate::plugin::{PluginError, Runtime};
use crate::proxy::{ListenerKey, Proxy, ProxyError};
use crate::upstream::{Upstream, UpstreamSnapshot};

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

struct ListenerTask {
    key: ListenerKey,
    local: SocketAddr,
    /// The listener's own `max_connections` (`usize::MAX` if unset).
    limit: Arc<ConnLimit>,
    stop: watch::Sender<bool>,
    task: JoinHandle<bool>,
}

struct ControlState {
    config: Config,
    listeners: Vec<ListenerTask>,
}

struct Shared {
    runtime: Runtime,
    metrics: Arc<Metrics>,
    proxy: ArcSwap<Proxy>,
    addrs: ArcSwap<Vec<SocketAddr>>,
    config_path: PathBuf,
    control: Mutex<ControlState>,
    /// The global `max_connections`, over all listeners.
    conn_limit: Arc<ConnLimit>,
}

/// The global connection cap for `config`: `max_connections`, else derived
/// from the process's `RLIMIT_NOFILE`.
fn global_max_connections(config: &Config) -> usize {
    config.server.max_connections.unwrap_or_else(|| {
        crate::config::derived_max_connections(crate::fd_limit::nofile(), config)
    })
}

/// A cloneable handle to a running server's control plane: reloads, plugin
/// swaps, state and metrics. Reloads and swaps are serialized.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("config", &self.shared.config_path)
            .finish_non_exhaustive()
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
        let runtime = Runtime::new().map_err(ProxyError::Runtime)?;
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
        crate::health::start(&proxy, config);
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
        let shared = Arc::new(Shared {
            runtime,
            metrics,
            proxy: ArcSwap::from_pointee(proxy),
            addrs: ArcSwap::from_pointee(Vec::new()),
            config_path: config.path.clone(),
            control: Mutex::new(ControlState {
                config: config.clone(),
                listeners: Vec::new(),
            }),
            conn_limit: ConnLimit::new(max_connections),
        });
        let mut listeners = Vec::new();
        for ((key, listener), l) in bound.into_iter().zip(&config.listeners) {
            listeners.push(spawn_listener(&shared, key, listener, l.max_connections));
        }
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
        Ok(RunningServer {
            control,
            admin,
            shutdown_timeout: Duration::from_millis(config.server.shutdown_timeout_ms),
        })
    }
}

fn spawn_listener(
    shared: &Arc<Shared>,
    key: ListenerKey,
    listener: TcpListener,
    max_connections: Option<usize>,
) -> ListenerTask {
    let local = listener.local_addr().unwrap_or(key.address);
    let (stop, stop_rx) = watch::channel(false);
    let limit = ConnLimit::new(max_connections.unwrap_or(usize::MAX));
    let task = tokio::spawn(accept_loop(
        key,
        listener,
        shared.clone(),
        limit.clone(),
        stop_rx,
    ));
    ListenerTask {
        key,
        local,
        limit,
        stop,
        task,
    }
}

impl Control {
    /// The bound address of each listener, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.addrs.load().to_vec()
    }

    /// The proxy currently serving new requests.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.shared.proxy.load_full()
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Snapshots of every upstream, ordered by name.
    pub fn snapshots(&self) -> Vec<UpstreamSnapshot> {
        self.proxy()
            .upstreams()
            .iter()
            .map(|u| u.snapshot())
            .collect()
    }

    /// The config file path (plugin paths in admin requests resolve against its directory).
    pub fn config_path(&self) -> &std::path::Path {
        &self.shared.config_path
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
            self.shared.metrics.reload(false);
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
            let current = shared.proxy.load_full();
            Proxy::build(
                &new_config,
                &shared.runtime,
                shared.metrics.clone(),
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
        crate::health::start(&proxy, &config);
        self.shared.proxy.store(Arc::new(proxy));
        let max_connections = global_max_connections(&config);
        self.shared.conn_limit.set_max(max_connections);
        let resources = self.shared.metrics.resources();
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
            let task = spawn_listener(&self.shared, key, listener, own_max(&key));
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
        control.config = config;
        drop(control);
        self.shared.metrics.reload(true);
        let report = ReloadReport {
            upstreams,
            listeners_added,
            listeners_removed,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
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
        let upstream = self
            .proxy()
            .upstream(name)
            .cloned()
            .ok_or_else(|| SwapError::UnknownUpstream(name.to_string()))?;
        let runtime = self.shared.runtime.clone();
        let result = tokio::task::spawn_blocking(move || {
            swap_blocking(&runtime, &upstream, source, plugin_config)
        })
        .await
        .map_err(|e| SwapError::Task(e.to_string()))
        .and_then(|r| r);
        self.shared.metrics.swap(name, result.is_ok());
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

fn swap_blocking(
    runtime: &Runtime,
    upstream: &Upstream,
    source: PluginSource,
    plugin_config: Option<serde_json::Value>,
) -> Result<(String, String, bool, Option<usize>), SwapError> {
    let plugin = match source {
        PluginSource::Bytes(bytes) => runtime.load_bytes("(uploaded)", &bytes)?,
        PluginSource::Ref(r) => runtime.load(&r)?,
        PluginSource::Current => upstream.plugin(),
    };
    let state_bytes = upstream.swap_plugin(plugin.clone(), plugin_config.map(|c| c.to_string()))?;
    Ok((
        plugin.name().to_string(),
        plugin.digest().to_string(),
        plugin.from_cache(),
        state_bytes,
    ))
}

pub use crate::proxy::error_chain;

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    control: Control,
    admin: Option<crate::admin::AdminHandle>,
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

/// hyper's connection settings for `limits`: heads that cannot fit are
/// answered 431 (or 414) by hyper itself, with bounded memory (see
/// [`crate::request_rules`]).
fn connection_builder(limits: &crate::config::RequestLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(crate::request_rules::h1_max_buf_size(limits))
        .max_headers(limits.max_headers);
    builder
        .http2()
        .max_header_list_size(crate::request_rules::h2_max_header_list_size(limits));
    builder
}

/// Permits from the listener's cap and the global one, waiting (not
/// accepting) while either is reached. While the global cap is reached,
/// idle connections are reclaimed (see [`crate::conn`]) every
/// [`crate::conn::RECLAIM_MIN_IDLE`] until a slot frees.
async fn admit(
    own: &Arc<ConnLimit>,
    global: &Arc<ConnLimit>,
    metrics: &Metrics,
) -> [ConnPermit; 2] {
    static AT_CAP: LogLimiter = LogLimiter::new();
    if let (Some(a), Some(b)) = (own.try_acquire(), global.try_acquire()) {
        return [a, b];
    }
    metrics.resources().cap_reached.inc();
    let mut reported = false;
    let own_permit = own.acquire().await;
    loop {
        if let Some(p) = global.try_acquire() {
            return [own_permit, p];
        }
        let reclaimed = global.reclaim_idle(crate::conn::RECLAIM_BATCH);
        if !reported && let Some(suppressed) = AT_CAP.admit() {
            reported = true;
            tracing::warn!(
                open = global.open(),
                max_connections = global.max(),
                reclaimed,
                suppressed,
                "max_connections reached: closing idle connections, not accepting until one \
                 closes (new clients wait in the listen backlog)"
            );
        }
        tokio::select! {
            p = global.acquire() => return [own_permit, p],
            () = tokio::time::sleep(crate::conn::RECLAIM_MIN_IDLE) => {}
        }
    }
}

/// Accept connections until told to stop, then wait for open connections to
/// finish their in-flight requests. Returns true when all have. Each
/// connection holds permits under the listener's and the global
/// `max_connections`; at a cap the loop stops accepting.
async fn accept_loop(
    key: ListenerKey,
    listener: TcpListener,
    shared: Arc<Shared>,
    own_limit: Arc<ConnLimit>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    static ACCEPT_FAILED: LogLimiter = LogLimiter::new();
    let graceful = GracefulShutdown::new();
    let mut limits = None;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let open = shared.metrics.resources().connections_open.clone();
    loop {
        let permits = tokio::select! {
            p = admit(&own_limit, &shared.conn_limit, &shared.metrics) => p,
            _ = stop.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        if crate::fd_limit::is_local_resource_error(&e) {
                            shared.metrics.resources().local_error(LocalOp::Accept);
                        }
                        if let Some(suppressed) = ACCEPT_FAILED.admit() {
                            tracing::warn!(listener = %key.address, suppressed, "accept failed: {e}");
                        }
                        drop(permits);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let proxy = shared.proxy.load();
                let (header_read, idle) = proxy.downstream_timeouts();
                if limits != Some(proxy.limits()) {
                    // First connection, or a reload changed the limits.
                    limits = Some(proxy.limits());
                    builder = connection_builder(&proxy.limits());
                }
                drop(proxy);
                let (stream, activity) = TimedIo::new(stream, header_read, idle);
                let registration = shared.conn_limit.register(&activity);
                let shared = shared.clone();
                let service = service_fn(move |req| {
                    let guard = activity.begin();
                    let proxy = shared.proxy.load_full();
                    // Boxed: hyper keeps room for the service's future in every
                    // connection for its whole life; the request path's state
                    // (about 2.8 KB) would otherwise be held by each idle
                    // keep-alive connection (bench/run.py measures it).
                    Box::pin(async move {
                        let response = proxy.handle(key, peer, req).await;
                        response.map(|r| r.map(|body| body.with_request_guard(guard)))
                    })
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                open.inc();
                let open = open.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended with an error: {e}");
                    }
                    open.dec();
                    drop((registration, permits));
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    true
}
