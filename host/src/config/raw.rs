//! The config file as deserialized, before validation: every key optional
//! where it has a default, with spans for error messages.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) listener: Vec<RawListener>,
    #[serde(default)]
    pub(super) route: Vec<RawRoute>,
    #[serde(default)]
    pub(super) upstream: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) admin: Option<RawAdmin>,
    pub(super) access_log: Option<RawAccessLog>,
    pub(super) dns: Option<RawDns>,
    pub(super) fleet: Option<Spanned<RawFleet>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecord {
    pub(super) path: Spanned<String>,
    pub(super) sample_percent: Option<Spanned<u32>>,
    pub(super) max_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) endpoints: Option<Spanned<Vec<String>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) instance: Option<Spanned<String>>,
    pub(super) lease_ttl_ms: Option<Spanned<u64>>,
    pub(super) rollback_window_ms: Option<Spanned<u64>>,
    pub(super) rollback_failure_percent: Option<Spanned<u32>>,
    pub(super) rollback_min_requests: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    pub(super) nameservers: Vec<Spanned<String>>,
    pub(super) dns_min_ttl_ms: Option<Spanned<u64>>,
    pub(super) dns_max_ttl_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessLog {
    pub(super) path: Spanned<String>,
    pub(super) format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) address: Spanned<String>,
    pub(super) token_file: Option<Spanned<String>>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) plugin_dirs: Option<Spanned<Vec<String>>>,
    pub(super) max_connections: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) address: Spanned<String>,
    pub(super) upstream: Spanned<String>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) tls: Option<Spanned<RawListenerTls>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) tls_passthrough: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) accept_proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListenerTls {
    pub(super) certificates: Spanned<Vec<RawCertificate>>,
    pub(super) alpn: Option<Spanned<Vec<String>>>,
    pub(super) min_version: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) server_name: Option<Spanned<String>>,
    pub(super) ca_file: Option<String>,
    pub(super) client_cert: Option<String>,
    pub(super) client_key: Option<String>,
    #[serde(default)]
    pub(super) insecure_skip_verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) host: Option<String>,
    pub(super) path_prefix: Option<Spanned<String>>,
    pub(super) sni: Option<Spanned<String>>,
    pub(super) upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) plugin: Spanned<String>,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
    pub(super) plugin_config: Option<toml::Table>,
    pub(super) shadow_plugin: Option<Spanned<String>>,
    pub(super) shadow_plugin_config: Option<toml::Table>,
    pub(super) shadow_sample_percent: Option<Spanned<u32>>,
    pub(super) record: Option<Spanned<RawRecord>>,
    pub(super) plugin_deadline_ms: Option<Spanned<u64>>,
    pub(super) plugin_init_deadline_ms: Option<Spanned<u64>>,
    pub(super) plugin_memory_limit_mib: Option<Spanned<u64>>,
    pub(super) connect_timeout_ms: Option<Spanned<u64>>,
    pub(super) response_timeout_ms: Option<Spanned<u64>>,
    pub(super) response_body_timeout_ms: Option<Spanned<u64>>,
    pub(super) tunnel_idle_timeout_ms: Option<Spanned<u64>>,
    pub(super) pool_max_idle_per_backend: Option<u32>,
    pub(super) pool_idle_timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) on_plugin_error: OnPluginError,
    #[serde(default)]
    pub(super) debug_headers: bool,
    pub(super) health_check: Option<Spanned<HealthCheckConfig>>,
    pub(super) outlier_detection: Option<Spanned<OutlierConfig>>,
    pub(super) request_timeout_ms: Option<Spanned<u64>>,
    pub(super) retries: Option<u32>,
    pub(super) retry_budget_percent: Option<Spanned<u32>>,
    pub(super) retry_min_per_second: Option<u32>,
    pub(super) retry_buffer_bytes: Option<u64>,
    pub(super) mirror_max_in_flight: Option<u32>,
    pub(super) panic_threshold_percent: Option<Spanned<u32>>,
    pub(super) slow_start_ms: Option<u64>,
    pub(super) max_fails: Option<u32>,
    pub(super) fail_timeout_ms: Option<Spanned<u64>>,
    pub(super) protocol: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawUpstreamTls>>,
    pub(super) send_proxy_protocol: Option<Spanned<String>>,
    pub(super) discovery: Option<Spanned<super::discovery::RawDiscovery>>,
    pub(super) dns_min_ttl_ms: Option<Spanned<u64>>,
    pub(super) dns_max_ttl_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Spanned<String>,
    pub(super) weight: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) state: AdminState,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) shutdown_timeout_ms: Option<Spanned<u64>>,
    pub(super) header_read_timeout_ms: Option<Spanned<u64>>,
    pub(super) idle_timeout_ms: Option<Spanned<u64>>,
    pub(super) max_request_line_bytes: Option<Spanned<u64>>,
    pub(super) max_header_bytes: Option<Spanned<u64>>,
    pub(super) max_headers: Option<Spanned<u64>>,
    pub(super) max_connections: Option<Spanned<u64>>,
    pub(super) plugin_cache_entries: Option<Spanned<u64>>,
    pub(super) plugin_cache_mib: Option<Spanned<u64>>,
    pub(super) plugin_cache_dir: Option<Spanned<String>>,
}
