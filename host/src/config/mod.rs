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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod defaults;
mod discovery;
mod plugin_ref;
mod raw;
mod tls;
mod validate;

pub use defaults::*;
use defaults::{
    default_base_ejection, default_consecutive_5xx, default_hc_fall, default_hc_interval,
    default_hc_kind, default_hc_path, default_hc_rise, default_hc_timeout, default_max_ejection,
    default_max_ejection_percent,
};
pub use discovery::{
    BackendSpec, DEFAULT_FILE_REFRESH_INTERVAL_MS, DiscoveryConfig, MAX_BACKEND_FILE_BYTES,
    expand_specs, parse_backend, parse_backend_list, read_backend_file, srv_backends,
};
pub use plugin_ref::{MAX_PLUGIN_FILE_BYTES, PluginRef, read_plugin_file};
use raw::RawConfig;
pub use tls::{ListenerTlsConfig, UpstreamProtocol, UpstreamTlsConfig};
use validate::Validator;

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

/// `[dns]`: the resolver for backend names (`name:port` backends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask, `IP:port` (`nameservers`; empty: the
    /// system's, from `/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Shortest wait before a name is resolved again, in ms
    /// (`dns_min_ttl_ms`, default 1000; an upstream may override it).
    pub min_ttl_ms: u64,
    /// Longest wait before a name is resolved again, in ms
    /// (`dns_max_ttl_ms`, default 300000; an upstream may override it).
    pub max_ttl_ms: u64,
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
    /// The access log (`[access_log]`), if configured.
    pub access_log: Option<AccessLogConfig>,
    /// `[dns]`: how backend names are resolved.
    pub dns: DnsConfig,
    /// `[fleet]`: the etcd this instance registers in and takes plugins
    /// from, if configured (read at start; a reload does not change it).
    pub fleet: Option<FleetConfig>,
    /// `sha256:<hex>` of the file's text, as read.
    pub digest: String,
    /// What is valid but worth an operator's attention (an expired
    /// certificate, `insecure_skip_verify`), each naming its key: `--check`
    /// prints them, a start or reload logs them.
    pub warnings: Vec<String>,
}

/// `[fleet]`: a fleet of wasmlb instances sharing plugins through etcd (see
/// [`crate::fleet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd endpoints, `http://host:port` (`endpoints`, required).
    pub endpoints: Vec<String>,
    /// Key prefix of the fleet's keys (`prefix`, default `/wasmlb/`; a
    /// missing final `/` is added).
    pub prefix: String,
    /// This instance's name in the fleet (`instance`; default: the host
    /// name and the first listener's port, `host:port`). No `/`.
    pub instance: Option<String>,
    /// TTL of the instance's registration lease, in ms (`lease_ttl_ms`,
    /// default 10000, at least 2000; etcd counts whole seconds): an instance
    /// that stops leaves the fleet's status this long after.
    pub lease_ttl_ms: u64,
    /// How long after a fleet swap its plugin is watched, in ms
    /// (`rollback_window_ms`, default 30000).
    pub rollback_window_ms: u64,
    /// In that window, the share of decisions the plugin failed (trap,
    /// deadline, bad answer, or skipped by an open circuit breaker) above
    /// which the instance swaps back by itself, in percent
    /// (`rollback_failure_percent`, default 5, 0 to 100).
    pub rollback_failure_percent: u32,
    /// Decisions needed in the window before the share counts
    /// (`rollback_min_requests`, default 20, at least 1).
    pub rollback_min_requests: u64,
}

/// An upstream's shadow plugin: `shadow_plugin`,
/// `[upstream.NAME.shadow_plugin_config]`, `shadow_sample_percent`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// The candidate (a built-in name or a `.wasm` file).
    pub plugin: PluginRef,
    /// Its `plugin_config` (default `{}`).
    pub plugin_config: serde_json::Value,
    /// Share of requests it decides beside the live plugin, in percent
    /// (`shadow_sample_percent`, default 100, 1 to 100).
    pub sample_percent: u32,
}

/// `[upstream.NAME.record]`: record the upstream's traffic as a trace
/// `wasmlb simulate --trace` replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordConfig {
    /// The file (relative to the config file's directory), appended to.
    pub path: PathBuf,
    /// Share of requests recorded, in percent (`sample_percent`, default
    /// 100, 1 to 100).
    pub sample_percent: u32,
    /// Recording stops once the file holds this many bytes (`max_bytes`,
    /// default 67108864, 64 MiB).
    pub max_bytes: u64,
}

/// `[access_log]`: one line per request (see [`crate::access_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// `path`: a file (relative to the config file's directory), appended
    /// to; `-` for stdout.
    pub path: PathBuf,
    /// `format`: `json` (default) or `combined`.
    pub format: AccessLogFormat,
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// NGINX's and Apache's `combined`, plus request time, upstream,
    /// backend and attempts.
    Combined,
}

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
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Address to bind; port 0 picks a free port.
    pub address: SocketAddr,
    /// Upstream for requests no route matches.
    pub upstream: String,
    /// Open connections at most on this listener (`max_connections`,
    /// default: only the global cap applies); at the cap it stops accepting
    /// and the kernel's backlog holds new clients (HAProxy `bind ... maxconn`).
    pub max_connections: Option<usize>,
    /// TLS termination (`[listener.tls]`), if set.
    pub tls: Option<ListenerTlsConfig>,
    /// What it balances (`mode`, default `"http"`).
    pub mode: ListenerMode,
    /// TCP mode only: read (not terminate) each connection's TLS ClientHello
    /// for its SNI name, which routes (`[[route]] sni`) and plugins
    /// (`server-name`) see; the ClientHello is forwarded unchanged
    /// (`tls_passthrough`, default false; HAProxy `req.ssl_sni`, NGINX
    /// `ssl_preread`).
    pub tls_passthrough: bool,
    /// Every connection opens with a PROXY protocol header (v1 or v2,
    /// detected), whose source address is then the client's: in
    /// `X-Forwarded-For`, the plugin's `client-address` and logs
    /// (`accept_proxy_protocol`, default false; HAProxy `bind ...
    /// accept-proxy`, NGINX `listen ... proxy_protocol`). A connection
    /// without a valid header is closed.
    pub accept_proxy_protocol: bool,
}

/// A version of HAProxy's PROXY protocol
/// (<https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    /// The text header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header (16 bytes plus the addresses).
    V2,
}

/// What a listener balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenerMode {
    /// HTTP requests, each routed and balanced (L7).
    #[default]
    Http,
    /// Whole TCP connections: the plugin picks a backend once per
    /// connection and bytes are relayed both ways (L4; HAProxy `mode tcp`,
    /// NGINX `stream`).
    Tcp,
}

/// One `[[route]]`: matches when every given condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Exact host (case-insensitive, port ignored), if set.
    pub host: Option<String>,
    /// Path prefix (byte-wise, like Envoy `prefix` / HAProxy `path_beg`), if set.
    pub path_prefix: Option<String>,
    /// TLS SNI name (exact, lowercase; `*.example.com` matches one label),
    /// for TCP listeners with `tls_passthrough`. A route with `sni` applies
    /// to TCP listeners only; routes without it to HTTP listeners only.
    pub sni: Option<String>,
    /// The upstream that serves matching requests.
    pub upstream: String,
}

/// One `[upstream.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// The strategy plugin.
    pub plugin: PluginRef,
    /// `plugin_config`, as the JSON object handed to the plugin's `init`.
    pub plugin_config: serde_json::Value,
    /// A candidate plugin run in shadow beside the live one, if any (see
    /// [`crate::upstream::shadow`]).
    pub shadow: Option<ShadowConfig>,
    /// `[upstream.NAME.record]`: a trace recorder (see [`crate::record`]).
    pub record: Option<RecordConfig>,
    /// The backends, in file order (their index is the plugin's backend id),
    /// or as read from the discovery source.
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
    /// Most time a tunnel (an HTTP upgrade such as WebSocket, or a TCP-mode
    /// connection) may pass with no byte either way, in ms
    /// (`tunnel_idle_timeout_ms`, default 3600000; HAProxy `timeout tunnel`).
    pub tunnel_idle_timeout_ms: u64,
    /// Idle HTTP/1.1 connections kept open per backend for reuse
    /// (`pool_max_idle_per_backend`, default none: no cap; HAProxy
    /// `pool-max-conn`, hyper-util's `pool_max_idle_per_host`). Past it, the
    /// least recently used idle connection is closed; 0 closes every
    /// connection when its response ends (no keep-alive to the backends).
    pub pool_max_idle_per_backend: Option<u32>,
    /// How long an idle pooled connection to a backend is kept, in ms
    /// (`pool_idle_timeout_ms`, default 60000; NGINX upstream
    /// `keepalive_timeout`). A shared HTTP/2 connection no request has used
    /// for this long is closed once its open streams end (Envoy's upstream
    /// `idle_timeout`).
    pub pool_idle_timeout_ms: u64,
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
    /// Mirrored copies of requests (a plugin's `forward.mirror`) in flight
    /// at most; past it a mirror is skipped and counted, never waited for
    /// (`mirror_max_in_flight`, default 64; 0 turns mirroring off). A
    /// request body is mirrored only if it was kept whole within
    /// `retry_buffer_bytes`.
    pub mirror_max_in_flight: u32,
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
    /// The protocol spoken to the backends (`protocol`, default `http1`).
    pub protocol: UpstreamProtocol,
    /// TLS to the backends (`[upstream.NAME.tls]`), if set.
    pub tls: Option<UpstreamTlsConfig>,
    /// Open every backend connection with a PROXY protocol header naming
    /// the client (`send_proxy_protocol = "v1" | "v2"`, default none;
    /// HAProxy `server ... send-proxy`, NGINX `proxy_protocol on`). The
    /// header comes before TLS. HTTP connections then carry one client's
    /// requests only; health checks send the `LOCAL` (v2) or `UNKNOWN` (v1)
    /// form.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Where the backends come from when not listed
    /// (`[upstream.NAME.discovery]`); `backends` then holds the set read at
    /// load. The admin API cannot add or remove backends of such an upstream.
    pub discovery: Option<DiscoveryConfig>,
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

/// What an active health check probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `GET path` over a new connection (the upstream's protocol and TLS);
    /// 2xx and 3xx pass (as HAProxy `option httpchk`).
    Http,
    /// A TCP connect (and the TLS handshake, with `[upstream.NAME.tls]`) succeeds.
    Tcp,
    /// The standard gRPC health check, `grpc.health.v1.Health/Check` with an
    /// empty service name, over HTTP/2 (`protocol` `h2c`, `h2` or `auto`):
    /// passes on `grpc-status` 0 and `SERVING`.
    Grpc,
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

impl UpstreamConfig {
    /// An upstream of `plugin` over `backends` with an empty `plugin_config`
    /// and every other setting at its default (as if omitted from the file).
    pub fn new(plugin: PluginRef, backends: Vec<BackendConfig>) -> Self {
        Self {
            plugin,
            plugin_config: serde_json::Value::Object(serde_json::Map::new()),
            shadow: None,
            record: None,
            backends,
            plugin_deadline_ms: DEFAULT_PLUGIN_DEADLINE_MS,
            plugin_init_deadline_ms: DEFAULT_PLUGIN_INIT_DEADLINE_MS,
            plugin_memory_limit_mib: DEFAULT_PLUGIN_MEMORY_LIMIT_MIB,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            response_timeout_ms: DEFAULT_RESPONSE_TIMEOUT_MS,
            response_body_timeout_ms: DEFAULT_RESPONSE_BODY_TIMEOUT_MS,
            tunnel_idle_timeout_ms: DEFAULT_TUNNEL_IDLE_TIMEOUT_MS,
            pool_max_idle_per_backend: None,
            pool_idle_timeout_ms: DEFAULT_POOL_IDLE_TIMEOUT_MS,
            on_plugin_error: OnPluginError::default(),
            debug_headers: false,
            health_check: None,
            outlier_detection: None,
            request_timeout_ms: None,
            retries: DEFAULT_RETRIES,
            retry_budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            retry_min_per_second: DEFAULT_RETRY_MIN_PER_SECOND,
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
            mirror_max_in_flight: DEFAULT_MIRROR_MAX_IN_FLIGHT,
            panic_threshold_percent: DEFAULT_PANIC_THRESHOLD_PERCENT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout_ms: DEFAULT_FAIL_TIMEOUT_MS,
            slow_start_ms: 0,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            send_proxy_protocol: None,
            discovery: None,
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
    /// Where compiled components are also kept on disk across restarts, an
    /// absolute path (`plugin_cache_dir`, relative to the config file's
    /// folder; unset or `""`: no disk cache, the default). Read at start
    /// only. See [`crate::plugin::Runtime::with_disk_cache`].
    pub plugin_cache_dir: Option<PathBuf>,
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
            plugin_cache_dir: None,
        }
    }
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

    /// `file:line: table.key` for `key` of `[table]` in the config file as
    /// it is on disk now (`wasmlb.toml:6: upstream.app.plugin`), for errors
    /// found after validation (a plugin that fails to load). Without the
    /// line when the file cannot be read or the key is not found.
    pub fn locate(&self, table: &str, key: &str) -> String {
        self.locate_in(table, None, key)
    }

    /// As [`Config::locate`], for `key` of the `index`-th (0-based)
    /// `[[table]]`: `wasmlb.toml:9: listener[1].address`.
    pub fn locate_nth(&self, table: &str, index: usize, key: &str) -> String {
        self.locate_in(table, Some(index), key)
    }

    fn locate_in(&self, table: &str, index: Option<usize>, key: &str) -> String {
        let line = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| key_line(&text, table, index, key));
        format!(
            "{}{}: {table}{}.{key}",
            self.path.display(),
            line.map(|l| format!(":{l}")).unwrap_or_default(),
            index.map(|i| format!("[{i}]")).unwrap_or_default()
        )
    }

    /// Validate config `text` as if read from `path` (used for messages and
    /// to resolve plugin paths).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let v = Validator {
            text,
            path,
            warnings: std::cell::RefCell::default(),
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| v.toml_error(&e, None))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| v.toml_error(e.inner(), Some(e.path().to_string())))?;
        let mut config = v.validate(raw)?;
        config.digest = crate::plugin::digest(text.as_bytes());
        Ok(config)
    }
}

/// The 1-based line where `key` is set in the `[table]` section of `text`
/// (`table` dotted, e.g. `upstream.app`), or with `index` in the
/// `index`-th `[[table]]`; found through toml's own span-keeping parse, so
/// quoting, dotted keys and inline tables are as TOML reads them.
fn key_line(text: &str, table: &str, index: Option<usize>, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(text).ok()?;
    let mut node: &DeTable<'_> = root.get_ref();
    let segments: Vec<&str> = table.split('.').collect();
    for (n, segment) in segments.iter().enumerate() {
        let value = node.get(*segment)?.get_ref();
        let value = match (value, index) {
            (DeValue::Array(array), Some(i)) if n + 1 == segments.len() => array.get(i)?.get_ref(),
            (value, _) => value,
        };
        let DeValue::Table(table) = value else {
            return None;
        };
        node = table;
    }
    let (found, _) = node.iter().find(|(k, _)| k.get_ref() == key)?;
    Some(validate::line_of(text, found.span().start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_located_in_their_table() {
        let text = "[[listener]]\nplugin = 1\n[upstream.a]\nplugin = \"x\"\n[upstream.\"b\"]\n  plugin=\"y\"\n";
        assert_eq!(key_line(text, "upstream.a", None, "plugin"), Some(4));
        assert_eq!(key_line(text, "upstream.b", None, "plugin"), Some(6));
        assert_eq!(key_line(text, "upstream.c", None, "plugin"), None);
        let text =
            "[[listener]]\naddress = \"a\"\n\n[[listener]]\nmode = \"tcp\"\naddress = \"b\"\n";
        assert_eq!(key_line(text, "listener", Some(0), "address"), Some(2));
        assert_eq!(key_line(text, "listener", Some(1), "address"), Some(6));
        assert_eq!(key_line(text, "listener", Some(2), "address"), None);
    }

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
        // A name without a port, and a name that is not a DNS name.
        for bad in ["localhost", "local host:9002", "-x.example:9002"] {
            let e = error_of(&GOOD.replace("127.0.0.1:9002", bad));
            assert!(e.contains("upstream.app.backends[1].address"), "{e}");
            assert!(e.contains("not an IP:port"), "{e}");
        }
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
        // A syntax error names the key its line sets, in its table.
        let e = error_of("[[listener]]\naddress = \"a\"\n[[listener]]\naddress = \n");
        assert!(
            e.starts_with("/etc/wasmlb/test.toml:4: listener[1].address: "),
            "{e}"
        );
        let e = error_of("x = [1,\n");
        assert!(e.contains("test.toml:"), "{e}");
        // A value of the wrong type names its whole key path.
        let e = error_of(
            "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"a\"\naccept_proxy_protocol = \"yes\"\n",
        );
        assert!(
            e.starts_with(
                "/etc/wasmlb/test.toml:4: listener[0].accept_proxy_protocol: invalid type"
            ),
            "{e}"
        );
        let e = error_of(
            "[upstream.a]\nplugin = \"round-robin\"\nbackends = [ { address = \"127.0.0.1:1\", weight = \"3\" } ]\n",
        );
        assert!(
            e.starts_with("/etc/wasmlb/test.toml:3: upstream.a.backends[0].weight: invalid type"),
            "{e}"
        );
        // A duplicate key, and a table where an array of tables belongs.
        let e = error_of("[upstream.a]\nplugin = \"x\"\nplugin = \"y\"\n");
        assert!(
            e.starts_with("/etc/wasmlb/test.toml:3: upstream.a.plugin: duplicate key"),
            "{e}"
        );
        let e = error_of("[listener]\naddress = \"127.0.0.1:0\"\n");
        assert!(e.starts_with("/etc/wasmlb/test.toml:1: listener: "), "{e}");
        assert!(e.contains("write [[listener]]"), "{e}");
        let e = error_of("[[server]]\nidle_timeout_ms = 5\n");
        assert!(
            e.starts_with("/etc/wasmlb/test.toml:1: server[0]: ")
                && e.contains("write [server] once, not [[server]]"),
            "{e}"
        );
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
    fn pool_keys_parse_with_defaults_and_reject_a_zero_timeout_at_its_line() {
        let c = parse(GOOD).unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(app.pool_max_idle_per_backend, None);
        assert_eq!(app.pool_idle_timeout_ms, DEFAULT_POOL_IDLE_TIMEOUT_MS);
        let text = GOOD.replace(
            "[upstream.api]",
            "pool_max_idle_per_backend = 0\npool_idle_timeout_ms = 2500\n\n[upstream.api]",
        );
        let c = parse(&text).unwrap();
        let app = &c.upstreams["app"];
        assert_eq!(
            (app.pool_max_idle_per_backend, app.pool_idle_timeout_ms),
            (Some(0), 2500)
        );
        let e = error_of(&GOOD.replace(
            "[upstream.api]",
            "pool_idle_timeout_ms = 0\n\n[upstream.api]",
        ));
        assert!(
            e.contains("test.toml:")
                && e.contains("upstream.app.pool_idle_timeout_ms: must be at least 1"),
            "{e}"
        );
        let e = error_of(&GOOD.replace(
            "[upstream.api]",
            "pool_max_idle_per_backend = -1\n\n[upstream.api]",
        ));
        assert!(
            e.contains("test.toml:") && e.contains("pool_max_idle_per_backend"),
            "{e}"
        );
    }

    #[test]
    fn plugin_cache_dir_is_off_by_default_resolves_against_the_config_and_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.toml");
        let with = |server: &str| Config::parse(&format!("{GOOD}\n[server]\n{server}\n"), &path);
        assert_eq!(parse(GOOD).unwrap().server.plugin_cache_dir, None);
        assert_eq!(
            with("plugin_cache_dir = \"\"")
                .unwrap()
                .server
                .plugin_cache_dir,
            None
        );
        let c = with("plugin_cache_dir = \"cache/plugins\"").unwrap();
        let made = dir.path().join("cache/plugins");
        assert_eq!(c.server.plugin_cache_dir.as_deref(), Some(made.as_path()));
        assert!(
            made.is_dir(),
            "created at load, as nginx -t creates its folders"
        );
        std::fs::write(dir.path().join("a-file"), b"").unwrap();
        let e = with("plugin_cache_dir = \"a-file/cache\"")
            .unwrap_err()
            .to_string();
        let line = GOOD.lines().count() + 3; // the line after `[server]`
        assert!(
            e.contains(&format!("test.toml:{line}:"))
                && e.contains("server.plugin_cache_dir: cannot create folder \"a-file/cache\""),
            "{e}"
        );
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
