//! Every default of the config file, in one place, in one style: a
//! `DEFAULT_*` const per key whose value may be omitted (the README's config
//! reference restates them). Tables deserialized by serde directly
//! (`outlier_detection`, `health_check`) name them through the
//! `default_*` functions at the end, since serde's `default = "..."` takes
//! a function.

/// Default plugin call deadline, in ms.
pub const DEFAULT_PLUGIN_DEADLINE_MS: u64 = 5;
/// Default deadline of a plugin's setup calls (instantiate, init, set-backends), in ms.
pub const DEFAULT_PLUGIN_INIT_DEADLINE_MS: u64 = 1_000;
/// Default cap on a plugin instance's linear memory, in MiB.
pub const DEFAULT_PLUGIN_MEMORY_LIMIT_MIB: u64 = 16;
/// Default inactivity limit between two reads of a backend's response body,
/// in ms (NGINX `proxy_read_timeout` 60 s, HAProxy `timeout server`).
pub const DEFAULT_RESPONSE_BODY_TIMEOUT_MS: u64 = 60_000;
/// Default `tunnel_idle_timeout_ms`: one hour (HAProxy `timeout tunnel` is
/// often set so; NGINX's `proxy_timeout` is 10 minutes).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT_MS: u64 = 3_600_000;
/// Default `pool_idle_timeout_ms`: an idle pooled backend connection is
/// closed after 60 s (NGINX's upstream `keepalive_timeout`, hyper-util's
/// `pool_idle_timeout`).
pub const DEFAULT_POOL_IDLE_TIMEOUT_MS: u64 = 60_000;
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
/// Default cap on the mirrored copies of an upstream's requests in flight
/// (`mirror_max_in_flight`); a mirror asked beyond it is skipped.
pub const DEFAULT_MIRROR_MAX_IN_FLIGHT: u32 = 64;
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

/// Default cap on an admin request body, in bytes (16 MiB: room for a plugin).
pub const DEFAULT_ADMIN_MAX_BODY_BYTES: u64 = 16 << 20;

/// Consecutive 5xx (or connect failures) that eject a backend (`outlier_detection.consecutive_5xx`).
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;

/// First ejection time, in ms (`outlier_detection.base_ejection_time_ms`).
pub const DEFAULT_BASE_EJECTION_TIME_MS: u64 = 30_000;

/// Longest ejection time, in ms (`outlier_detection.max_ejection_time_ms`).
pub const DEFAULT_MAX_EJECTION_TIME_MS: u64 = 300_000;

/// Most backends ejected at once, in percent (`outlier_detection.max_ejection_percent`).
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Time between health probes, in ms (`health_check.interval_ms`).
pub const DEFAULT_HEALTH_CHECK_INTERVAL_MS: u64 = 2_000;

/// Health probe timeout, in ms (`health_check.timeout_ms`).
pub const DEFAULT_HEALTH_CHECK_TIMEOUT_MS: u64 = 1_000;

/// Passing probes in a row that mark a backend healthy (`health_check.healthy_threshold`).
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;

/// Failing probes in a row that mark a backend unhealthy (`health_check.unhealthy_threshold`).
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;

/// Path of HTTP health probes (`health_check.path`).
pub const DEFAULT_HEALTH_CHECK_PATH: &str = "/";

// serde `default = "..."` functions for the tables deserialized directly.

pub(super) fn default_consecutive_5xx() -> u32 {
    DEFAULT_CONSECUTIVE_5XX
}

pub(super) fn default_base_ejection() -> u64 {
    DEFAULT_BASE_EJECTION_TIME_MS
}

pub(super) fn default_max_ejection() -> u64 {
    DEFAULT_MAX_EJECTION_TIME_MS
}

pub(super) fn default_max_ejection_percent() -> u32 {
    DEFAULT_MAX_EJECTION_PERCENT
}

pub(super) fn default_hc_interval() -> u64 {
    DEFAULT_HEALTH_CHECK_INTERVAL_MS
}

pub(super) fn default_hc_timeout() -> u64 {
    DEFAULT_HEALTH_CHECK_TIMEOUT_MS
}

pub(super) fn default_hc_rise() -> u32 {
    DEFAULT_HEALTHY_THRESHOLD
}

pub(super) fn default_hc_fall() -> u32 {
    DEFAULT_UNHEALTHY_THRESHOLD
}

pub(super) fn default_hc_kind() -> super::HealthCheckKind {
    super::HealthCheckKind::Http
}

pub(super) fn default_hc_path() -> String {
    DEFAULT_HEALTH_CHECK_PATH.into()
}

/// Default `dns_min_ttl_ms`: a name is not resolved again sooner, in ms.
pub const DEFAULT_DNS_MIN_TTL_MS: u64 = 1000;

/// Default `dns_max_ttl_ms`: a name is resolved again at least this often,
/// in ms (5 minutes).
pub const DEFAULT_DNS_MAX_TTL_MS: u64 = 300_000;

/// Default `[fleet] prefix`: where a fleet's keys live in etcd.
pub const DEFAULT_FLEET_PREFIX: &str = "/wasmlb/";

/// Default `[fleet] lease_ttl_ms`: an instance's registration outlives it
/// by 10 s.
pub const DEFAULT_FLEET_LEASE_TTL_MS: usize = 10_000;

/// Default `[fleet] rollback_window_ms`: a fleet swap is watched for 30 s.
pub const DEFAULT_FLEET_ROLLBACK_WINDOW_MS: usize = 30_000;

/// Default `[fleet] rollback_failure_percent`: more than 5 % failed
/// decisions in the window swaps back.
pub const DEFAULT_FLEET_ROLLBACK_FAILURE_PERCENT: u32 = 5;

/// Default `[fleet] rollback_min_requests`: the share counts from 20
/// decisions.
pub const DEFAULT_FLEET_ROLLBACK_MIN_REQUESTS: usize = 20;

/// Default `[upstream.NAME.record] max_bytes`: 64 MiB.
pub const DEFAULT_RECORD_MAX_BYTES: u64 = 64 << 20;
