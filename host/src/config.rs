//! The config file: listeners, routes and upstreams, in TOML.
//!
//! ```toml
//! [[listener]]
//! address = "127.0.0.1:8080"
//! upstream = "app"              # default upstream for this listener
//!
//! [[route]]                     # optional; first match wins
//! host = "api.example.com"      # optional
//! path_prefix = "/v1"           # optional
//! upstream = "api"
//!
//! [upstream.app]
//! plugin = "round-robin"        # a built-in name, or a path to a .wasm component
//! backends = [
//!   { address = "127.0.0.1:9001" },
//!   { address = "127.0.0.1:9002", weight = 3 },
//! ]
//! [upstream.app.plugin_config]  # optional, handed to the plugin as JSON
//! ```
//!
//! [`Config::load`] parses and validates; every error names the file, the line
//! and the key at fault (for example
//! `wasmlb.toml:12: route[0].upstream: no upstream named "apii"`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::builtin;

/// Default plugin call deadline, in ms.
pub const DEFAULT_PLUGIN_DEADLINE_MS: u64 = 5;
/// Default deadline of a plugin's setup calls (instantiate, init, set-backends), in ms.
pub const DEFAULT_PLUGIN_INIT_DEADLINE_MS: u64 = 1_000;
/// Default cap on a plugin instance's linear memory, in MiB.
pub const DEFAULT_PLUGIN_MEMORY_LIMIT_MIB: u64 = 16;
/// Default inactivity limit between two reads of a backend's response body,
/// in ms (NGINX `proxy_read_timeout` 60 s, HAProxy `timeout server`).
pub const DEFAULT_RESPONSE_BODY_TIMEOUT_MS: u64 = 60_000;
/// Default number of compiled plugin components kept for reuse (swaps back,
/// reloads); the least recently used beyond it are released.
pub const DEFAULT_PLUGIN_CACHE_ENTRIES: usize = 16;
/// Default bound on the compiled components kept for reuse, in MiB of
/// compiled code.
pub const DEFAULT_PLUGIN_CACHE_MIB: usize = 256;
/// File descriptors kept back from downstream connections when
/// `max_connections` is derived from `RLIMIT_NOFILE`: standard streams,
/// listeners, the epoll instance, the epoch ticker, logs and plugin images
/// (admin connections and health checks are reserved on top).
pub const RESERVED_FDS: u64 = 32;
/// Default TCP connect timeout to a backend, in ms.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default wait for a backend's response headers, in ms.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 30_000;
/// Default bound on graceful shutdown, in ms.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Default limit on receiving a downstream request head, in ms (HAProxy
/// `timeout http-request`): slowloris protection.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default idle time after which a downstream keep-alive connection with no
/// request in progress is closed, in ms (HAProxy `timeout http-keep-alive`,
/// NGINX `keepalive_timeout` 75 s).
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default number of retries of a failed request on another backend.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default retry budget: retries may add at most this share of requests, in percent
/// (Envoy `retry_budget.budget_percent`, linkerd `retryRatio` 0.2).
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Default floor of the retry budget, in retries per second (linkerd `minRetriesPerSecond`).
pub const DEFAULT_RETRY_MIN_PER_SECOND: u32 = 10;
/// Default cap on the request body kept for replaying a retry, in bytes.
pub const DEFAULT_RETRY_BUFFER_BYTES: u64 = 64 * 1024;
/// Default panic threshold, in percent of non-drained backends (Envoy `healthy_panic_threshold`).
pub const DEFAULT_PANIC_THRESHOLD_PERCENT: u32 = 50;
/// Default connect failures in a row that take a backend out of rotation
/// (NGINX `max_fails=1`).
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// Default time a backend stays out of rotation after `max_fails` connect
/// failures, in ms (NGINX `fail_timeout=10s`).
pub const DEFAULT_FAIL_TIMEOUT_MS: u64 = 10_000;
/// Default limit on a request line's target (the URI), in bytes; longer is
/// 414 (NGINX `large_client_header_buffers` 8k).
pub const DEFAULT_MAX_REQUEST_LINE_BYTES: usize = 8 * 1024;
/// Default limit on a request's header fields (names, values and 4 bytes of
/// framing each), in bytes; more is 431 (HAProxy `tune.bufsize` 16k).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default limit on the number of request header fields; more is 431
/// (hyper's default, HAProxy `tune.http.maxhdr` 101).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default cap on concurrent admin API connections; at the cap the admin
/// listener stops accepting until one closes.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// A config error: the file, the 1-based line if known, the key path
/// (`upstream.app.backends[1].address`) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {key}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending value, when known.
    pub line: Option<usize>,
    /// Dotted key path of the offending value; `(file)` for the file as a whole.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (plugin paths are relative to its directory).
    pub path: PathBuf,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Routes, in file order (first match wins).
    pub routes: Vec<RouteConfig>,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Process-wide settings (`[server]`).
    pub server: ServerConfig,
    /// The admin API (`[admin]`), if configured.
    pub admin: Option<AdminConfig>,
}

/// Default cap on an admin request body, in bytes (16 MiB: room for a plugin).
pub const DEFAULT_ADMIN_MAX_BODY_BYTES: u64 = 16 << 20;

/// `[admin]`: the admin API listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to bind. Anything but loopback requires `token`.
    pub address: SocketAddr,
    /// Bearer token every request must carry (read from `token_file`).
    pub token: Option<String>,
    /// Requests with a larger body are refused with 413, in bytes.
    pub max_body_bytes: u64,
    /// Directories a plugin path in an admin request must lie in
    /// (`plugin_dirs`, relative to the config file; default: the config
    /// file's directory), as given and resolved.
    pub plugin_dirs: Vec<PathBuf>,
    /// Concurrent admin connections at most (`max_connections`, default 64).
    pub max_connections: usize,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// Upstream for requests no route matches.
    pub upstream: String,
    /// Open connections at most on this listener (`max_connections`,
    /// default: only the global cap applies); at the cap it stops accepting
    /// and the kernel's backlog holds new clients (HAProxy `bind ... maxconn`).
    pub max_connections: Option<usize>,
}

/// One `[[route]]`: matches when every given condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Exact host (case-insensitive, port ignored), if set.
    pub host: Option<String>,
    /// Path prefix (byte-wise, like Envoy `prefix` / HAProxy `path_beg`), if set.
    pub path_prefix: Option<String>,
    /// The upstream that serves matching requests.
    pub upstream: String,
}

/// What a plugin is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginRef {
    /// A strategy embedded in the binary (see [`crate::builtin`]).
    Builtin(String),
    /// A `.wasm` component file.
    File {
        /// The file (resolved against the config file's directory).
        path: PathBuf,
        /// How it is named in messages and the admin API: the resolved path
        /// for a config file's plugin, the path as given for an admin
        /// request's (which must not learn the server's directories).
        shown: String,
    },
}

/// Largest plugin file read, in bytes (16 MiB, the admin API's default
/// body limit); the size is checked before anything is read.
pub const MAX_PLUGIN_FILE_BYTES: u64 = 16 << 20;

impl PluginRef {
    /// Resolve a `plugin` value as written in a config file: one ending in
    /// `.wasm` or containing a path separator is a file relative to `base`
    /// (which must exist); anything else must name a built-in.
    ///
    /// # Errors
    /// A message naming the unknown built-in (and listing the built-ins) or
    /// the missing file.
    pub fn resolve(value: &str, base: &Path) -> Result<PluginRef, String> {
        if let Some(builtin) = Self::builtin(value)? {
            return Ok(builtin);
        }
        let file = base.join(value);
        if file.is_file() {
            Ok(PluginRef::File {
                shown: file.display().to_string(),
                path: file,
            })
        } else {
            Err(format!("plugin file {} not found", file.display()))
        }
    }

    /// Resolve a `plugin` value from an admin request (untrusted): a
    /// built-in, or a `.wasm` file that lies, after resolving `..` and
    /// symbolic links, inside one of `dirs` (relative paths are taken
    /// against `base`, the config file's directory). Messages name the value
    /// as given, never a resolved path, and do not tell whether a file
    /// outside `dirs` exists.
    ///
    /// # Errors
    /// A message: unknown built-in, not a `.wasm` path, outside the plugin
    /// directories, or not found inside them.
    pub fn resolve_confined(
        value: &str,
        base: &Path,
        dirs: &[PathBuf],
    ) -> Result<PluginRef, String> {
        if let Some(builtin) = Self::builtin(value)? {
            return Ok(builtin);
        }
        let outside = || {
            format!(
                "plugin path {value:?} is not a .wasm file inside the allowed plugin directories ([admin] plugin_dirs)"
            )
        };
        if !value.ends_with(".wasm") || value.contains('\0') {
            return Err(outside());
        }
        let file = lexical_normalize(&base.join(value));
        let dirs: Vec<PathBuf> = dirs.iter().map(|d| lexical_normalize(d)).collect();
        if !dirs.iter().any(|d| file.starts_with(d)) {
            return Err(outside());
        }
        let Ok(real) = file.canonicalize() else {
            return Err(format!(
                "plugin file {value:?} not found in the plugin directories"
            ));
        };
        let inside = dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| real.starts_with(d));
        if !inside || !real.is_file() {
            // A link out of the directories, or not a regular file.
            return Err(outside());
        }
        Ok(PluginRef::File {
            path: real,
            shown: value.to_string(),
        })
    }

    /// `Some` built-in for a value that is not path-like; an error for an
    /// unknown one; `None` for a path.
    fn builtin(value: &str) -> Result<Option<PluginRef>, String> {
        let looks_like_path =
            value.ends_with(".wasm") || value.contains('/') || value.contains('\\');
        if looks_like_path {
            return Ok(None);
        }
        match builtin::get(value) {
            Some(_) => Ok(Some(PluginRef::Builtin(value.to_string()))),
            None => Err(format!(
                "no built-in plugin named {value:?} (built-ins: {:?}; a file path must end in .wasm)",
                builtin::names()
            )),
        }
    }
}

/// `path` with `.` and `..` components resolved without touching the file
/// system (`..` never climbs above the root).
fn lexical_normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Read a plugin file of at most [`MAX_PLUGIN_FILE_BYTES`]: its size is
/// checked first, then its first 4 bytes must be the WebAssembly magic
/// `\0asm`, and only then is the rest read. Messages never quote the file.
///
/// # Errors
/// A message: cannot open, too large, or not WebAssembly.
pub fn read_plugin_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {}", e.kind()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {}", e.kind()))?
        .len();
    if len > MAX_PLUGIN_FILE_BYTES {
        return Err(format!(
            "{len} bytes, larger than the {MAX_PLUGIN_FILE_BYTES}-byte limit on plugin files"
        ));
    }
    let mut reader = file.take(MAX_PLUGIN_FILE_BYTES);
    let mut magic = [0u8; 4];
    if reader.read_exact(&mut magic).is_err() || &magic != b"\0asm" {
        return Err("not a WebAssembly file (no \\0asm header)".into());
    }
    let mut bytes = magic.to_vec();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {}", e.kind()))?;
    Ok(bytes)
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginRef::Builtin(n) => write!(f, "{n}"),
            PluginRef::File { shown, .. } => write!(f, "{shown}"),
        }
    }
}

/// One `[upstream.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// The strategy plugin.
    pub plugin: PluginRef,
    /// `plugin_config`, as the JSON object handed to the plugin's `init`.
    pub plugin_config: serde_json::Value,
    /// The backends, in file order (their index is the plugin's backend id).
    pub backends: Vec<BackendConfig>,
    /// Deadline of each plugin call, in ms (`plugin_deadline_ms`, default 5).
    pub plugin_deadline_ms: u64,
    /// Deadline of the plugin's setup calls (instantiation, `init`,
    /// `set-backends`), in ms (`plugin_init_deadline_ms`, default 1000).
    pub plugin_init_deadline_ms: u64,
    /// Cap on the plugin's linear memory, in MiB (`plugin_memory_limit_mib`, default 16).
    pub plugin_memory_limit_mib: u64,
    /// TCP connect timeout, in ms (`connect_timeout_ms`, default 5000); on expiry 504.
    pub connect_timeout_ms: u64,
    /// Wait for response headers, in ms (`response_timeout_ms`, default 30000); on expiry 504.
    pub response_timeout_ms: u64,
    /// Most time between two reads of the response body, in ms
    /// (`response_body_timeout_ms`, default 60000, NGINX `proxy_read_timeout`);
    /// on expiry both connections are cut (the status is already sent).
    pub response_body_timeout_ms: u64,
    /// What to do when the plugin fails (`on_plugin_error`, default `fallback`).
    pub on_plugin_error: OnPluginError,
    /// Add `x-wasmlb-plugin` (the plugin that decided, or `(fallback)`) and
    /// `x-wasmlb-backend` (the backend's address) to responses
    /// (`debug_headers`, default false).
    pub debug_headers: bool,
    /// Active health checking (`[upstream.NAME.health_check]`), if configured.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier ejection (`[upstream.NAME.outlier_detection]`), if configured.
    pub outlier_detection: Option<OutlierConfig>,
    /// Bound on a whole request (all attempts and the response body), in ms
    /// (`request_timeout_ms`, default none). On expiry before the response
    /// headers: 504; after: the response is cut.
    pub request_timeout_ms: Option<u64>,
    /// Retries of a failed attempt on another backend (`retries`, default 2; 0 disables).
    pub retries: u32,
    /// Retries may add at most this share of the upstream's requests, in percent
    /// (`retry_budget_percent`, default 20).
    pub retry_budget_percent: u32,
    /// Retries always allowed per second regardless of the share (`retry_min_per_second`, default 10).
    pub retry_min_per_second: u32,
    /// Request bodies up to this size are kept so an attempt that already sent
    /// them can be replayed, in bytes (`retry_buffer_bytes`, default 65536).
    pub retry_buffer_bytes: u64,
    /// When fewer than this share of the non-drained backends are healthy and
    /// not ejected, all of them are offered to the plugin, in percent
    /// (`panic_threshold_percent`, default 50; 0 disables).
    pub panic_threshold_percent: u32,
    /// Connect failures in a row (refused, or `connect_timeout_ms` passed)
    /// that take a backend out of rotation for `fail_timeout_ms`
    /// (`max_fails`, default 1, as NGINX; 0 disables).
    pub max_fails: u32,
    /// How long a backend stays out of rotation after `max_fails` connect
    /// failures, in ms (`fail_timeout_ms`, default 10000, as NGINX).
    pub fail_timeout_ms: u64,
    /// A backend that joins or recovers ramps its effective weight from 10 %
    /// to 100 % over this window, in ms (`slow_start_ms`, default 0: off).
    pub slow_start_ms: u64,
}

/// `[upstream.NAME.outlier_detection]`: passive outlier ejection, following
/// Envoy's outlier detection (`consecutive_5xx`, `base_ejection_time`,
/// `max_ejection_time`, `max_ejection_percent`).
///
/// A backend whose last `consecutive_5xx` responses were all 5xx, connect
/// failures or timeouts is ejected for `base_ejection_time_ms` times the
/// number of times it has been ejected, capped at `max_ejection_time_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures that eject (default 5).
    #[serde(default = "default_consecutive_5xx")]
    pub consecutive_5xx: u32,
    /// Ejection time of a first ejection, in ms (default 30000).
    #[serde(default = "default_base_ejection")]
    pub base_ejection_time_ms: u64,
    /// Cap on the ejection time, in ms (default 300000).
    #[serde(default = "default_max_ejection")]
    pub max_ejection_time_ms: u64,
    /// At most this share of the backends is ejected at once, in percent;
    /// one backend may always be ejected (default 10, as Envoy).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

fn default_consecutive_5xx() -> u32 {
    5
}
fn default_base_ejection() -> u64 {
    30_000
}
fn default_max_ejection() -> u64 {
    300_000
}
fn default_max_ejection_percent() -> u32 {
    10
}

/// What an active health check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `GET path` over a new HTTP/1.1 connection; 2xx and 3xx pass (as HAProxy `option httpchk`).
    Http,
    /// A TCP connect succeeds.
    Tcp,
}

/// `[upstream.NAME.health_check]`: active health checks, following HAProxy
/// `check inter/rise/fall` and Envoy `health_checks`
/// (interval, timeout, healthy/unhealthy thresholds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// `http` (default) or `tcp`.
    #[serde(default = "default_hc_kind")]
    pub kind: HealthCheckKind,
    /// Path probed by `http` checks (default `/`).
    #[serde(default = "default_hc_path")]
    pub path: String,
    /// Time between probes of one backend, in ms (default 2000).
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    /// A probe not finished in this time fails, in ms (default 1000).
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
    /// Consecutive passing probes that mark a down backend healthy (default 2, HAProxy `rise`).
    #[serde(default = "default_hc_rise")]
    pub healthy_threshold: u32,
    /// Consecutive failing probes that mark a backend unhealthy (default 3, HAProxy `fall`).
    #[serde(default = "default_hc_fall")]
    pub unhealthy_threshold: u32,
}

fn default_hc_kind() -> HealthCheckKind {
    HealthCheckKind::Http
}
fn default_hc_path() -> String {
    "/".into()
}
fn default_hc_interval() -> u64 {
    2_000
}
fn default_hc_timeout() -> u64 {
    1_000
}
fn default_hc_rise() -> u32 {
    2
}
fn default_hc_fall() -> u32 {
    3
}

impl UpstreamConfig {
    /// An upstream of `plugin` over `backends` with an empty `plugin_config`
    /// and every other setting at its default (as if omitted from the file).
    pub fn new(plugin: PluginRef, backends: Vec<BackendConfig>) -> Self {
        Self {
            plugin,
            plugin_config: serde_json::Value::Object(serde_json::Map::new()),
            backends,
            plugin_deadline_ms: DEFAULT_PLUGIN_DEADLINE_MS,
            plugin_init_deadline_ms: DEFAULT_PLUGIN_INIT_DEADLINE_MS,
            plugin_memory_limit_mib: DEFAULT_PLUGIN_MEMORY_LIMIT_MIB,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            response_timeout_ms: DEFAULT_RESPONSE_TIMEOUT_MS,
            response_body_timeout_ms: DEFAULT_RESPONSE_BODY_TIMEOUT_MS,
            on_plugin_error: OnPluginError::default(),
            debug_headers: false,
            health_check: None,
            outlier_detection: None,
            request_timeout_ms: None,
            retries: DEFAULT_RETRIES,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            retry_min_per_second: DEFAULT_RETRY_MIN_PER_SECOND,
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
            panic_threshold_percent: DEFAULT_PANIC_THRESHOLD_PERCENT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout_ms: DEFAULT_FAIL_TIMEOUT_MS,
            slow_start_ms: 0,
        }
    }
}

impl BackendConfig {
    /// A backend at `address` with weight 1 and no labels.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            labels: BTreeMap::new(),
            state: AdminState::Ready,
        }
    }
}

/// One backend of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `ip:port`.
    pub address: SocketAddr,
    /// Relative weight, at least 1 (default 1).
    pub weight: u32,
    /// Free-form labels, handed to the plugin.
    pub labels: BTreeMap<String, String>,
    /// Administrative state (`state`, default `ready`).
    pub state: AdminState,
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

/// A backend's administrative state, as HAProxy `set server ... state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes requests (subject to health and outlier ejection).
    #[default]
    Ready,
    /// Takes no new requests; requests in flight finish. Health checks go on.
    Drain,
    /// Maintenance: takes no new requests and is not health checked;
    /// requests in flight finish.
    Maint,
}

impl AdminState {
    /// `ready`, `drain` or `maint`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }

    /// Parse `ready`, `drain` or `maint` (surrounding whitespace ignored).
    ///
    /// # Errors
    /// A message naming the bad value and the accepted ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "ready" => Ok(Self::Ready),
            "drain" => Ok(Self::Drain),
            "maint" => Ok(Self::Maint),
            other => Err(format!(
                "unknown backend state {other:?} (expected ready, drain or maint)"
            )),
        }
    }
}

/// `[server]`: process-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Bound on the graceful-shutdown wait for in-flight requests, in ms
    /// (`shutdown_timeout_ms`, default 10000).
    pub shutdown_timeout_ms: u64,
    /// A downstream request head must arrive within this time of its first
    /// byte, in ms (`header_read_timeout_ms`, default 10000).
    pub header_read_timeout_ms: u64,
    /// A downstream connection with no request in progress and no bytes
    /// received for this long is closed, in ms (`idle_timeout_ms`, default 60000).
    pub idle_timeout_ms: u64,
    /// Request limits (`max_request_line_bytes`, `max_header_bytes`,
    /// `max_headers`).
    pub limits: RequestLimits,
    /// Open downstream connections at most, over all listeners
    /// (`max_connections`; unset: derived from `RLIMIT_NOFILE` by
    /// [`derived_max_connections`], as HAProxy derives `maxconn`). At the cap
    /// listeners stop accepting; the kernel's backlog holds new clients.
    pub max_connections: Option<usize>,
    /// Compiled plugin components kept for reuse (`plugin_cache_entries`,
    /// default 16); the least recently used beyond it are released.
    pub plugin_cache_entries: usize,
    /// Bound on the kept compiled components, in MiB (`plugin_cache_mib`,
    /// default 256).
    pub plugin_cache_mib: usize,
}

/// The global connection cap when `max_connections` is unset, for a process
/// allowed `nofile` descriptors: each proxied connection may hold two (the
/// client's and a backend's), so `(nofile - reserved) / 2`, where
/// `reserved` is [`RESERVED_FDS`] plus one descriptor per admin connection,
/// per backend (its health check) and per cached plugin component. At least 1.
/// HAProxy derives `maxconn` from `ulimit -n` the same way.
pub fn derived_max_connections(nofile: u64, config: &Config) -> usize {
    let admin = config
        .admin
        .as_ref()
        .map_or(0, |a| a.max_connections as u64);
    let backends: u64 = config
        .upstreams
        .values()
        .map(|u| u.backends.len() as u64)
        .sum();
    let reserved = RESERVED_FDS + admin + backends + config.server.plugin_cache_entries as u64;
    usize::try_from(nofile.saturating_sub(reserved) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Limits on a downstream request's head (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// The request target (URI) at most, in bytes; longer is 414
    /// (`max_request_line_bytes`, default 8192).
    pub max_request_line_bytes: usize,
    /// The header fields at most (each counted as name + value + 4 bytes),
    /// in bytes; more is 431 (`max_header_bytes`, default 16384).
    pub max_header_bytes: usize,
    /// Header fields at most; more is 431 (`max_headers`, default 100).
    pub max_headers: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_request_line_bytes: DEFAULT_MAX_REQUEST_LINE_BYTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            limits: RequestLimits::default(),
            max_connections: None,
            plugin_cache_entries: DEFAULT_PLUGIN_CACHE_ENTRIES,
            plugin_cache_mib: DEFAULT_PLUGIN_CACHE_MIB,
        }
    }
}

// ---- raw, as deserialized -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    upstream: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Spanned<String>,
    token_file: Option<Spanned<String>>,
    max_body_bytes: Option<u64>,
    plugin_dirs: Option<Spanned<Vec<String>>>,
    max_connections: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    upstream: Spanned<String>,
    max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<String>,
    path_prefix: Option<Spanned<String>>,
    upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    plugin: Spanned<String>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    plugin_config: Option<toml::Table>,
    plugin_deadline_ms: Option<Spanned<u64>>,
    plugin_init_deadline_ms: Option<Spanned<u64>>,
    plugin_memory_limit_mib: Option<Spanned<u64>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    response_timeout_ms: Option<Spanned<u64>>,
    response_body_timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    on_plugin_error: OnPluginError,
    #[serde(default)]
    debug_headers: bool,
    health_check: Option<Spanned<HealthCheckConfig>>,
    outlier_detection: Option<Spanned<OutlierConfig>>,
    request_timeout_ms: Option<Spanned<u64>>,
    retries: Option<u32>,
    retry_budget_percent: Option<Spanned<u32>>,
    retry_min_per_second: Option<u32>,
    retry_buffer_bytes: Option<u64>,
    panic_threshold_percent: Option<Spanned<u32>>,
    slow_start_ms: Option<u64>,
    max_fails: Option<u32>,
    fail_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    state: AdminState,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    shutdown_timeout_ms: Option<u64>,
    header_read_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
    max_request_line_bytes: Option<Spanned<u64>>,
    max_header_bytes: Option<Spanned<u64>>,
    max_headers: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    plugin_cache_entries: Option<Spanned<u64>>,
    plugin_cache_mib: Option<Spanned<u64>>,
}

impl Config {
    /// Read and validate the config file at `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, line and key: unreadable file, TOML
    /// syntax, unknown keys, wrong types, no listener, duplicate listener or
    /// backend addresses, unparsable addresses, references to missing
    /// upstreams, zero weights or timeouts, unknown built-in plugins and
    /// missing plugin files.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validate config `text` as if read from `path` (used for messages and
    /// to resolve plugin paths).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let v = Validator { text, path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(raw)
    }
}

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: span.map(|s| line_of(self.text, s.start)),
            key: key.into(),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        // toml's message already quotes the line; keep its first line only
        // and put the line number where every other error has it.
        let message = e.message().trim().to_string();
        self.err(e.span(), "(syntax)", message)
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.listener.is_empty() {
            return Err(self.err(None, "listener", "at least one [[listener]] is required"));
        }
        let upstream_names: HashSet<&str> = raw.upstream.keys().map(String::as_str).collect();
        let check_ref = |key: String, name: &Spanned<String>| {
            if upstream_names.contains(name.get_ref().as_str()) {
                Ok(())
            } else {
                let mut known: Vec<&str> = upstream_names.iter().copied().collect();
                known.sort_unstable();
                Err(self.err(
                    Some(name.span()),
                    key,
                    format!(
                        "no upstream named {:?} (defined: {known:?})",
                        name.get_ref()
                    ),
                ))
            }
        };

        let mut listeners = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in raw.listener.iter().enumerate() {
            let key = format!("listener[{i}].address");
            let address = self.socket_addr(&key, &l.address)?;
            if address.port() != 0 && !seen.insert(address) {
                return Err(self.err(
                    Some(l.address.span()),
                    key,
                    format!("duplicate listener address {address}"),
                ));
            }
            check_ref(format!("listener[{i}].upstream"), &l.upstream)?;
            let max_connections = l
                .max_connections
                .as_ref()
                .map(|m| {
                    self.bounded(
                        &format!("listener[{i}].max_connections"),
                        Some(m),
                        0,
                        1..=10_000_000,
                    )
                })
                .transpose()?;
            listeners.push(ListenerConfig {
                address,
                upstream: l.upstream.get_ref().clone(),
                max_connections,
            });
        }

        let mut routes = Vec::new();
        for (i, r) in raw.route.iter().enumerate() {
            check_ref(format!("route[{i}].upstream"), &r.upstream)?;
            if let Some(p) = &r.path_prefix
                && !p.get_ref().starts_with('/')
            {
                return Err(self.err(
                    Some(p.span()),
                    format!("route[{i}].path_prefix"),
                    "must start with '/'",
                ));
            }
            routes.push(RouteConfig {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.as_ref().map(|p| p.get_ref().clone()),
                upstream: r.upstream.get_ref().clone(),
            });
        }

        let mut upstreams = BTreeMap::new();
        for (name, u) in raw.upstream {
            let up = self.upstream(&name, u)?;
            upstreams.insert(name, up);
        }

        let admin = raw.admin.as_ref().map(|a| self.admin(a)).transpose()?;

        Ok(Config {
            admin,
            path: self.path.to_path_buf(),
            listeners,
            routes,
            upstreams,
            server: self.server(&raw.server)?,
        })
    }

    fn server(&self, s: &RawServer) -> Result<ServerConfig, ConfigError> {
        let positive = |key: &str, v: &Option<Spanned<u64>>, default: u64| match v {
            Some(v) if *v.get_ref() == 0 => Err(self.err(
                Some(v.span()),
                format!("server.{key}"),
                "must be at least 1",
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        };
        Ok(ServerConfig {
            shutdown_timeout_ms: s.shutdown_timeout_ms.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS),
            header_read_timeout_ms: positive(
                "header_read_timeout_ms",
                &s.header_read_timeout_ms,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
            )?,
            idle_timeout_ms: positive(
                "idle_timeout_ms",
                &s.idle_timeout_ms,
                DEFAULT_IDLE_TIMEOUT_MS,
            )?,
            limits: RequestLimits {
                max_request_line_bytes: self.bounded(
                    "server.max_request_line_bytes",
                    s.max_request_line_bytes.as_ref(),
                    DEFAULT_MAX_REQUEST_LINE_BYTES,
                    64..=65_534,
                )?,
                max_header_bytes: self.bounded(
                    "server.max_header_bytes",
                    s.max_header_bytes.as_ref(),
                    DEFAULT_MAX_HEADER_BYTES,
                    1024..=1 << 20,
                )?,
                max_headers: self.bounded(
                    "server.max_headers",
                    s.max_headers.as_ref(),
                    DEFAULT_MAX_HEADERS,
                    1..=10_000,
                )?,
            },
            max_connections: s
                .max_connections
                .as_ref()
                .map(|m| self.bounded("server.max_connections", Some(m), 0, 1..=10_000_000))
                .transpose()?,
            plugin_cache_entries: self.bounded(
                "server.plugin_cache_entries",
                s.plugin_cache_entries.as_ref(),
                DEFAULT_PLUGIN_CACHE_ENTRIES,
                1..=10_000,
            )?,
            plugin_cache_mib: self.bounded(
                "server.plugin_cache_mib",
                s.plugin_cache_mib.as_ref(),
                DEFAULT_PLUGIN_CACHE_MIB,
                1..=1 << 20,
            )?,
        })
    }

    /// `v` if within `range`, else an error naming `key`; `default` if unset.
    fn bounded(
        &self,
        key: &str,
        v: Option<&Spanned<u64>>,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> Result<usize, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        match usize::try_from(*v.get_ref()) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.err(
                Some(v.span()),
                key,
                format!("must be from {} to {}", range.start(), range.end()),
            )),
        }
    }

    fn admin(&self, a: &RawAdmin) -> Result<AdminConfig, ConfigError> {
        let address = self.socket_addr("admin.address", &a.address)?;
        let token = match &a.token_file {
            Some(f) => {
                let base = self.path.parent().unwrap_or_else(|| Path::new("."));
                let path = base.join(f.get_ref());
                let token = std::fs::read_to_string(&path)
                    .map_err(|e| {
                        self.err(
                            Some(f.span()),
                            "admin.token_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?
                    .trim()
                    .to_string();
                if token.is_empty() {
                    return Err(self.err(
                        Some(f.span()),
                        "admin.token_file",
                        format!("{} is empty", path.display()),
                    ));
                }
                Some(token)
            }
            None => None,
        };
        if !address.ip().is_loopback() && token.is_none() {
            return Err(self.err(
                Some(a.address.span()),
                "admin.address",
                format!("{address} is not a loopback address: set admin.token_file so requests must carry a bearer token"),
            ));
        }
        let base = self.path.parent().unwrap_or_else(|| Path::new("."));
        let plugin_dirs = match &a.plugin_dirs {
            None => vec![base.to_path_buf()],
            Some(dirs) => {
                if dirs.get_ref().is_empty() {
                    return Err(self.err(
                        Some(dirs.span()),
                        "admin.plugin_dirs",
                        "name at least one directory",
                    ));
                }
                let mut out = Vec::new();
                for d in dirs.get_ref() {
                    let dir = base.join(d);
                    if !dir.is_dir() {
                        return Err(self.err(
                            Some(dirs.span()),
                            "admin.plugin_dirs",
                            format!("{d:?} is not a directory"),
                        ));
                    }
                    out.push(dir);
                }
                out
            }
        };
        let max_connections = match &a.max_connections {
            Some(n) if *n.get_ref() == 0 => {
                return Err(self.err(
                    Some(n.span()),
                    "admin.max_connections",
                    "must be at least 1",
                ));
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_ADMIN_MAX_CONNECTIONS,
        };
        Ok(AdminConfig {
            address,
            token,
            max_body_bytes: a.max_body_bytes.unwrap_or(DEFAULT_ADMIN_MAX_BODY_BYTES),
            plugin_dirs,
            max_connections,
        })
    }

    fn upstream(&self, name: &str, u: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let prefix = format!("upstream.{name}");
        if name.is_empty() {
            return Err(self.err(
                Some(u.plugin.span()),
                "upstream",
                "upstream names must not be empty",
            ));
        }
        let plugin = self.plugin_ref(&format!("{prefix}.plugin"), &u.plugin)?;
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (i, b) in u.backends.iter().enumerate() {
            let key = format!("{prefix}.backends[{i}].address");
            let address = self.socket_addr(&key, &b.address)?;
            if !seen.insert(address) {
                return Err(self.err(
                    Some(b.address.span()),
                    key,
                    format!("duplicate backend {address}"),
                ));
            }
            let weight = match &b.weight {
                Some(w) if *w.get_ref() == 0 => {
                    return Err(self.err(
                        Some(w.span()),
                        format!("{prefix}.backends[{i}].weight"),
                        "must be at least 1",
                    ));
                }
                Some(w) => *w.get_ref(),
                None => 1,
            };
            backends.push(BackendConfig {
                address,
                weight,
                labels: b.labels.clone(),
                state: b.state,
            });
        }
        let positive = |key: &str, v: &Option<Spanned<u64>>, default: u64| match v {
            Some(s) if *s.get_ref() == 0 => Err(self.err(
                Some(s.span()),
                format!("{prefix}.{key}"),
                "must be at least 1",
            )),
            Some(s) => Ok(*s.get_ref()),
            None => Ok(default),
        };
        let plugin_config = match u.plugin_config {
            Some(table) => serde_json::to_value(table).map_err(|e| {
                self.err(
                    None,
                    format!("{prefix}.plugin_config"),
                    format!("cannot convert to JSON: {e}"),
                )
            })?,
            None => serde_json::Value::Object(serde_json::Map::new()),
        };
        Ok(UpstreamConfig {
            plugin,
            plugin_config,
            backends,
            plugin_deadline_ms: positive(
                "plugin_deadline_ms",
                &u.plugin_deadline_ms,
                DEFAULT_PLUGIN_DEADLINE_MS,
            )?,
            plugin_init_deadline_ms: positive(
                "plugin_init_deadline_ms",
                &u.plugin_init_deadline_ms,
                DEFAULT_PLUGIN_INIT_DEADLINE_MS,
            )?,
            plugin_memory_limit_mib: positive(
                "plugin_memory_limit_mib",
                &u.plugin_memory_limit_mib,
                DEFAULT_PLUGIN_MEMORY_LIMIT_MIB,
            )?,
            connect_timeout_ms: positive(
                "connect_timeout_ms",
                &u.connect_timeout_ms,
                DEFAULT_CONNECT_TIMEOUT_MS,
            )?,
            response_timeout_ms: positive(
                "response_timeout_ms",
                &u.response_timeout_ms,
                DEFAULT_RESPONSE_TIMEOUT_MS,
            )?,
            response_body_timeout_ms: positive(
                "response_body_timeout_ms",
                &u.response_body_timeout_ms,
                DEFAULT_RESPONSE_BODY_TIMEOUT_MS,
            )?,
            on_plugin_error: u.on_plugin_error,
            debug_headers: u.debug_headers,
            health_check: match u.health_check {
                Some(hc) => {
                    let span = hc.span();
                    let hc = hc.into_inner();
                    let key = format!("{prefix}.health_check");
                    if hc.interval_ms == 0 || hc.timeout_ms == 0 {
                        return Err(self.err(
                            Some(span),
                            key,
                            "interval_ms and timeout_ms must be at least 1",
                        ));
                    }
                    if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                        return Err(self.err(Some(span), key, "thresholds must be at least 1"));
                    }
                    if !hc.path.starts_with('/') {
                        return Err(self.err(Some(span), key, "path must start with '/'"));
                    }
                    Some(hc)
                }
                None => None,
            },
            outlier_detection: match u.outlier_detection {
                Some(od) => {
                    let span = od.span();
                    let od = od.into_inner();
                    let key = format!("{prefix}.outlier_detection");
                    if od.consecutive_5xx == 0 || od.base_ejection_time_ms == 0 {
                        return Err(self.err(
                            Some(span),
                            key,
                            "consecutive_5xx and base_ejection_time_ms must be at least 1",
                        ));
                    }
                    if od.max_ejection_time_ms < od.base_ejection_time_ms {
                        return Err(self.err(
                            Some(span),
                            key,
                            "max_ejection_time_ms must be at least base_ejection_time_ms",
                        ));
                    }
                    if od.max_ejection_percent > 100 {
                        return Err(self.err(
                            Some(span),
                            key,
                            "max_ejection_percent is at most 100",
                        ));
                    }
                    Some(od)
                }
                None => None,
            },
            request_timeout_ms: match u.request_timeout_ms {
                Some(t) => Some(positive("request_timeout_ms", &Some(t), 0)?),
                None => None,
            },
            retries: u.retries.unwrap_or(DEFAULT_RETRIES),
            retry_budget_percent: self.percent(
                &format!("{prefix}.retry_budget_percent"),
                u.retry_budget_percent.as_ref(),
                DEFAULT_RETRY_BUDGET_PERCENT,
            )?,
            retry_min_per_second: u
                .retry_min_per_second
                .unwrap_or(DEFAULT_RETRY_MIN_PER_SECOND),
            retry_buffer_bytes: u.retry_buffer_bytes.unwrap_or(DEFAULT_RETRY_BUFFER_BYTES),
            panic_threshold_percent: self.percent(
                &format!("{prefix}.panic_threshold_percent"),
                u.panic_threshold_percent.as_ref(),
                DEFAULT_PANIC_THRESHOLD_PERCENT,
            )?,
            slow_start_ms: u.slow_start_ms.unwrap_or(0),
            max_fails: u.max_fails.unwrap_or(DEFAULT_MAX_FAILS),
            fail_timeout_ms: positive(
                "fail_timeout_ms",
                &u.fail_timeout_ms,
                DEFAULT_FAIL_TIMEOUT_MS,
            )?,
        })
    }

    fn percent(
        &self,
        key: &str,
        v: Option<&Spanned<u32>>,
        default: u32,
    ) -> Result<u32, ConfigError> {
        match v {
            Some(p) if *p.get_ref() > 100 => {
                Err(self.err(Some(p.span()), key, "a percentage is at most 100"))
            }
            Some(p) => Ok(*p.get_ref()),
            None => Ok(default),
        }
    }

    fn socket_addr(&self, key: &str, s: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        s.get_ref().parse().map_err(|_| {
            self.err(
                Some(s.span()),
                key,
                format!(
                    "{:?} is not an IP:port address (e.g. \"127.0.0.1:9001\")",
                    s.get_ref()
                ),
            )
        })
    }

    fn plugin_ref(&self, key: &str, s: &Spanned<String>) -> Result<PluginRef, ConfigError> {
        let base = self.path.parent().unwrap_or_else(|| Path::new("."));
        PluginRef::resolve(s.get_ref(), base)
            .map_err(|message| self.err(Some(s.span()), key, message))
    }
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/wasmlb/test.toml"))
    }

    const GOOD: &str = r#"
[[listener]]
address = "127.0.0.1:8080"
upstream = "app"

[[route]]
host = "API.example.com"
path_prefix = "/v1"
upstream = "api"

[upstream.app]
plugin = "round-robin"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", weight = 3, labels = { zone = "a" } },
]

[upstream.api]
plugin = "least-connections"
plugin_deadline_ms = 2
[upstream.api.plugin_config]
key = "x-user"
"#;

    #[test]
    fn parses_the_documented_shape() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listeners[0].address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
        let app = &c.upstreams["app"];
        assert_eq!(app.plugin, PluginRef::Builtin("round-robin".into()));
        assert_eq!(app.backends[1].weight, 3);
        assert_eq!(app.backends[1].labels["zone"], "a");
        assert_eq!(app.plugin_config, serde_json::json!({}));
        assert_eq!(app.plugin_deadline_ms, DEFAULT_PLUGIN_DEADLINE_MS);
        let api = &c.upstreams["api"];
        assert_eq!(api.plugin_deadline_ms, 2);
        assert_eq!(api.plugin_config, serde_json::json!({"key": "x-user"}));
        assert!(api.backends.is_empty());
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn route_to_missing_upstream_names_line_and_key() {
        let bad = GOOD.replace("upstream = \"api\"", "upstream = \"apii\"");
        let e = error_of(&bad);
        assert!(
            e.starts_with("/etc/wasmlb/test.toml:9: route[0].upstream: no upstream named \"apii\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let bad = GOOD.replace("plugin_deadline_ms = 2", "plugin_deadline = 2");
        let e = error_of(&bad);
        assert!(e.contains("test.toml:20"), "{e}");
        assert!(e.contains("unknown field `plugin_deadline`"), "{e}");
    }

    #[test]
    fn bad_addresses_and_duplicates_are_rejected() {
        let e = error_of(&GOOD.replace("127.0.0.1:9002", "localhost:9002"));
        assert!(e.contains("upstream.app.backends[1].address"), "{e}");
        assert!(e.contains("not an IP:port"), "{e}");
        let e = error_of(&GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001"));
        assert!(e.contains("duplicate backend 127.0.0.1:9001"), "{e}");
        let twice =
            format!("{GOOD}\n[[listener]]\naddress = \"127.0.0.1:8080\"\nupstream = \"app\"\n");
        assert!(error_of(&twice).contains("duplicate listener address"));
        let dup_upstream = format!("{GOOD}\n[upstream.app]\nplugin = \"round-robin\"\n");
        assert!(
            error_of(&dup_upstream).contains("duplicate key"),
            "{}",
            error_of(&dup_upstream)
        );
    }

    #[test]
    fn plugins_must_exist() {
        let e = error_of(&GOOD.replace("\"least-connections\"", "\"least-conn\""));
        assert!(
            e.contains("upstream.api.plugin: no built-in plugin named \"least-conn\""),
            "{e}"
        );
        let e = error_of(&GOOD.replace("\"least-connections\"", "\"plugins/missing.wasm\""));
        assert!(
            e.contains("plugin file /etc/wasmlb/plugins/missing.wasm not found"),
            "{e}"
        );
    }

    #[test]
    fn zero_weight_and_zero_timeouts_are_rejected() {
        assert!(
            error_of(&GOOD.replace("weight = 3", "weight = 0"))
                .contains("backends[1].weight: must be at least 1")
        );
        assert!(
            error_of(&GOOD.replace("plugin_deadline_ms = 2", "plugin_deadline_ms = 0"))
                .contains("plugin_deadline_ms")
        );
    }

    #[test]
    fn a_listener_is_required() {
        assert!(
            error_of("[upstream.a]\nplugin = \"round-robin\"\n")
                .contains("at least one [[listener]]")
        );
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let e = error_of("[[listener]]\naddress = \n");
        assert!(e.starts_with("/etc/wasmlb/test.toml:2: (syntax)"), "{e}");
    }

    #[test]
    fn failure_handling_keys_parse_with_defaults() {
        let c = parse(GOOD).unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(app.retries, DEFAULT_RETRIES);
        assert_eq!(app.panic_threshold_percent, 50);
        assert_eq!(app.request_timeout_ms, None);
        assert!(app.outlier_detection.is_none());
        assert_eq!(app.backends[0].state, AdminState::Ready);
        assert_eq!(
            c.server.header_read_timeout_ms,
            DEFAULT_HEADER_READ_TIMEOUT_MS
        );
        let text = GOOD
            .replace(
                "[upstream.api]",
                "retries = 1\nrequest_timeout_ms = 900\nslow_start_ms = 5000\n\
             [upstream.app.outlier_detection]\nconsecutive_5xx = 3\n\n[upstream.api]",
            )
            .replace("weight = 3,", "weight = 3, state = \"drain\",")
            + "\n[server]\nidle_timeout_ms = 5000\n";
        let c = parse(&text).unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(
            (app.retries, app.request_timeout_ms, app.slow_start_ms),
            (1, Some(900), 5000)
        );
        let od = app.outlier_detection.as_ref().unwrap();
        assert_eq!((od.consecutive_5xx, od.base_ejection_time_ms), (3, 30_000));
        assert_eq!(app.backends[1].state, AdminState::Drain);
        assert_eq!(c.server.idle_timeout_ms, 5000);
    }

    #[test]
    fn fault_containment_keys_are_bounded_and_named_with_their_line() {
        let e = error_of(&format!("{GOOD}\n[server]\nmax_connections = 0\n"));
        assert!(
            e.contains("test.toml:") && e.contains("server.max_connections: must be from 1 to"),
            "{e}"
        );
        let e = error_of(&format!("{GOOD}\n[server]\nplugin_cache_entries = 0\n"));
        assert!(
            e.contains("server.plugin_cache_entries: must be from 1"),
            "{e}"
        );
        let e = error_of(&format!("{GOOD}\n[server]\nplugin_cache_mib = 0\n"));
        assert!(e.contains("server.plugin_cache_mib: must be from 1"), "{e}");
        let e = error_of(&format!("{GOOD}\n[server]\nmax_connections = \"lots\"\n"));
        // A type error names the file and line (the TOML parser's message).
        let line = GOOD.lines().count() + 3;
        assert!(
            e.contains(&format!("test.toml:{line}:")) && e.contains("expected u64"),
            "{e}"
        );
        let e = error_of(&GOOD.replacen(
            "upstream = \"app\"\n",
            "upstream = \"app\"\nmax_connections = 0\n",
            1,
        ));
        assert!(
            e.contains("test.toml:5: listener[0].max_connections: must be from 1"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "[upstream.api]",
            "response_body_timeout_ms = 0\n[upstream.api]",
        ));
        assert!(
            e.contains("upstream.app.response_body_timeout_ms: must be at least 1"),
            "{e}"
        );
        let c = parse(&format!(
            "{GOOD}\n[server]\nmax_connections = 500\nplugin_cache_entries = 4\nplugin_cache_mib = 64\n"
        ))
        .unwrap();
        assert_eq!(c.server.max_connections, Some(500));
        assert_eq!(
            (c.server.plugin_cache_entries, c.server.plugin_cache_mib),
            (4, 64)
        );
        assert_eq!(
            c.upstreams["app"].response_body_timeout_ms,
            DEFAULT_RESPONSE_BODY_TIMEOUT_MS
        );
        // (256 - 32 reserved - 2 backends - 4 cached components) / 2; never 0.
        assert_eq!(derived_max_connections(256, &c), 109);
        assert_eq!(derived_max_connections(10, &c), 1);
        assert_eq!(parse(GOOD).unwrap().server.max_connections, None);
    }

    #[test]
    fn bad_failure_handling_values_are_named() {
        let e = error_of(&GOOD.replace("weight = 3,", "weight = 3, state = \"sleeping\","));
        assert!(e.contains("unknown variant `sleeping`"), "{e}");
        let e = error_of(&GOOD.replace(
            "[upstream.api]",
            "panic_threshold_percent = 150\n[upstream.api]",
        ));
        assert!(
            e.contains("upstream.app.panic_threshold_percent: a percentage is at most 100"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "[upstream.api]",
            "[upstream.app.outlier_detection]\nbase_ejection_time_ms = 0\n[upstream.api]",
        ));
        assert!(e.contains("upstream.app.outlier_detection"), "{e}");
        let e = error_of(&format!("{GOOD}\n[server]\nheader_read_timeout_ms = 0\n"));
        assert!(
            e.contains("server.header_read_timeout_ms: must be at least 1"),
            "{e}"
        );
    }
}
