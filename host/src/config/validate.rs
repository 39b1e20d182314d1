//! Validation of the raw config: ranges, references, addresses, plugin
//! files; every error names the file, the line and the key.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use super::raw::*;
use super::*;

/// Validates a [`raw::RawConfig`] into a [`Config`], naming the file, line
/// and key of the first error.
pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
    /// Warnings found so far (see [`Config::warnings`]).
    pub(super) warnings: std::cell::RefCell<Vec<String>>,
}

impl Validator<'_> {
    pub(super) fn err(
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

    /// A TOML error as a config error. `path` is where deserializing failed
    /// (serde_path_to_error: `upstream.app.backends[0].weight`); without it
    /// (a syntax error, a duplicate key), the key is the one the error's
    /// line sets, under the table that line is in, or `(syntax)`.
    pub(super) fn toml_error(&self, e: &toml::de::Error, path: Option<String>) -> ConfigError {
        // toml's message already quotes the line; keep its first line only
        // and put the line number where every other error has it.
        let mut message = e.message().trim().to_string();
        let key = path
            .map(|p| clean_path(&p))
            .filter(|p| !p.is_empty() && p != ".")
            .or_else(|| e.span().and_then(|s| key_path_at(self.text, s.start)))
            .unwrap_or_else(|| "(syntax)".to_string());
        if message.contains("invalid type: map, expected a sequence") {
            message.push_str(&format!(
                " (write [[{key}]] for each entry: an array of tables, not [{key}])"
            ));
        } else if let Some(table) = key
            .strip_suffix(']')
            .and_then(|k| k.rsplit_once('['))
            .map(|(table, _)| table.to_string())
            .filter(|_| message.starts_with("invalid type: map"))
        {
            // `[[server]]` where `[server]` belongs: serde reads the table
            // array as a sequence of the struct's fields.
            message = format!(
                "{table} is a table, not an array of tables (write [{table}] once, not [[{table}]])"
            );
        } else if message.contains("invalid type: sequence, expected") && !key.ends_with(']') {
            message.push_str(&format!(" (write [{key}] once: a table, not [[{key}]])"));
        }
        self.err(e.span(), key, message)
    }

    pub(super) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
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
            let tls = l
                .tls
                .as_ref()
                .map(|t| self.listener_tls(&format!("listener[{i}].tls"), t))
                .transpose()?;
            let mode = match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("http", _)) => ListenerMode::Http,
                Some(("tcp", _)) => ListenerMode::Tcp,
                Some((_, span)) => {
                    return Err(self.err(
                        Some(span),
                        format!("listener[{i}].mode"),
                        "must be \"http\" or \"tcp\"",
                    ));
                }
            };
            let tls_passthrough = l.tls_passthrough.as_ref().is_some_and(|t| *t.get_ref());
            if mode == ListenerMode::Tcp && tls.is_some() {
                return Err(self.err(
                    l.tls.as_ref().map(Spanned::span),
                    format!("listener[{i}].tls"),
                    "a TCP listener does not terminate TLS; use tls_passthrough = true to route by SNI",
                ));
            }
            if tls_passthrough && mode != ListenerMode::Tcp {
                return Err(self.err(
                    l.tls_passthrough.as_ref().map(Spanned::span),
                    format!("listener[{i}].tls_passthrough"),
                    "needs mode = \"tcp\" (an HTTP listener terminates TLS with [listener.tls])",
                ));
            }
            listeners.push(ListenerConfig {
                address,
                upstream: l.upstream.get_ref().clone(),
                max_connections,
                tls,
                mode,
                tls_passthrough,
                accept_proxy_protocol: l.accept_proxy_protocol,
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
            if let Some(sni) = &r.sni {
                if r.host.is_some() || r.path_prefix.is_some() {
                    return Err(self.err(
                        Some(sni.span()),
                        format!("route[{i}].sni"),
                        "a route matches either sni (TCP listeners) or host/path_prefix (HTTP listeners), not both",
                    ));
                }
                let name = sni.get_ref();
                let label = name.strip_prefix("*.").unwrap_or(name);
                if label.is_empty()
                    || label.contains('*')
                    || !label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(self.err(
                        Some(sni.span()),
                        format!("route[{i}].sni"),
                        "must be a DNS name, or *. followed by one",
                    ));
                }
            }
            routes.push(RouteConfig {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.as_ref().map(|p| p.get_ref().clone()),
                sni: r.sni.as_ref().map(|s| s.get_ref().to_ascii_lowercase()),
                upstream: r.upstream.get_ref().clone(),
            });
        }

        let dns = self.dns(raw.dns.as_ref())?;
        let mut upstreams = BTreeMap::new();
        for (name, u) in raw.upstream {
            let up = self.upstream(&name, u, &dns)?;
            upstreams.insert(name, up);
        }

        let admin = raw.admin.as_ref().map(|a| self.admin(a)).transpose()?;
        let access_log = raw
            .access_log
            .as_ref()
            .map(|a| self.access_log(a))
            .transpose()?;

        let fleet = raw.fleet.as_ref().map(|f| self.fleet(f)).transpose()?;
        Ok(Config {
            admin,
            access_log,
            dns,
            fleet,
            digest: String::new(),
            path: self.path.to_path_buf(),
            listeners,
            routes,
            upstreams,
            server: self.server(&raw.server)?,
            warnings: self.warnings.take(),
        })
    }

    pub(super) fn server(&self, s: &RawServer) -> Result<ServerConfig, ConfigError> {
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
            shutdown_timeout_ms: positive(
                "shutdown_timeout_ms",
                &s.shutdown_timeout_ms,
                DEFAULT_SHUTDOWN_TIMEOUT_MS,
            )?,
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
            plugin_cache_dir: self.plugin_cache_dir(s.plugin_cache_dir.as_ref())?,
        })
    }

    /// `server.plugin_cache_dir`: unset or `""` is none (the default),
    /// anything else a folder relative to the config file's, created now (as
    /// `nginx -t` creates its temporary folders) so that a path that cannot
    /// be one is rejected with the key's line.
    fn plugin_cache_dir(
        &self,
        v: Option<&Spanned<String>>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = v.filter(|v| !v.get_ref().is_empty()) else {
            return Ok(None);
        };
        let base = self.path.parent().unwrap_or_else(|| Path::new("."));
        let dir = std::path::absolute(base.join(v.get_ref()))
            .and_then(|dir| std::fs::create_dir_all(&dir).map(|()| dir))
            .map_err(|e| {
                self.err(
                    Some(v.span()),
                    "server.plugin_cache_dir",
                    format!("cannot create folder {:?}: {e}", v.get_ref()),
                )
            })?;
        Ok(Some(dir))
    }

    /// `v` if within `range`, else an error naming `key`; `default` if unset.
    pub(super) fn bounded(
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

    pub(super) fn access_log(&self, a: &RawAccessLog) -> Result<AccessLogConfig, ConfigError> {
        let format = match a.format.as_ref().map(|f| (f.get_ref().as_str(), f.span())) {
            None | Some(("json", _)) => AccessLogFormat::Json,
            Some(("combined", _)) => AccessLogFormat::Combined,
            Some((other, span)) => {
                return Err(self.err(
                    Some(span),
                    "access_log.format",
                    format!("{other:?} is not a format (use \"json\" or \"combined\")"),
                ));
            }
        };
        let given = a.path.get_ref();
        if given.is_empty() {
            return Err(self.err(
                Some(a.path.span()),
                "access_log.path",
                "must be a file path or \"-\" (stdout)",
            ));
        }
        let path = if given == "-" {
            PathBuf::from("-")
        } else {
            let base = self.path.parent().unwrap_or_else(|| Path::new("."));
            base.join(given)
        };
        Ok(AccessLogConfig { path, format })
    }

    pub(super) fn admin(&self, a: &RawAdmin) -> Result<AdminConfig, ConfigError> {
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

    /// `[dns]`, or its defaults.
    fn dns(&self, raw: Option<&RawDns>) -> Result<DnsConfig, ConfigError> {
        let mut dns = DnsConfig {
            nameservers: Vec::new(),
            min_ttl_ms: DEFAULT_DNS_MIN_TTL_MS,
            max_ttl_ms: DEFAULT_DNS_MAX_TTL_MS,
        };
        let Some(raw) = raw else { return Ok(dns) };
        for (i, s) in raw.nameservers.iter().enumerate() {
            dns.nameservers
                .push(self.socket_addr(&format!("dns.nameservers[{i}]"), s)?);
        }
        self.ttl_bounds(
            "dns",
            raw.dns_min_ttl_ms.as_ref(),
            raw.dns_max_ttl_ms.as_ref(),
            &dns,
        )
    }

    /// `base` with `dns_min_ttl_ms` and `dns_max_ttl_ms` from `table` where
    /// set: each at least 1, the minimum at most the maximum.
    fn ttl_bounds(
        &self,
        table: &str,
        min: Option<&Spanned<u64>>,
        max: Option<&Spanned<u64>>,
        base: &DnsConfig,
    ) -> Result<DnsConfig, ConfigError> {
        let one = |key: &str, v: Option<&Spanned<u64>>, default: u64| match v {
            Some(v) if *v.get_ref() == 0 => Err(self.err(
                Some(v.span()),
                format!("{table}.{key}"),
                "must be at least 1",
            )),
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        };
        let lo = one("dns_min_ttl_ms", min, base.min_ttl_ms)?;
        let hi = one("dns_max_ttl_ms", max, base.max_ttl_ms)?;
        if lo > hi {
            return Err(self.err(
                min.or(max).map(Spanned::span),
                format!("{table}.dns_min_ttl_ms"),
                format!("{lo} is more than dns_max_ttl_ms ({hi})"),
            ));
        }
        Ok(DnsConfig {
            nameservers: base.nameservers.clone(),
            min_ttl_ms: lo,
            max_ttl_ms: hi,
        })
    }

    /// A backend's `address`: `IP:port`, or `name:port` for DNS.
    fn backend_address(
        &self,
        key: &str,
        s: &Spanned<String>,
    ) -> Result<Result<SocketAddr, (String, u16)>, ConfigError> {
        if let Ok(a) = s.get_ref().parse::<SocketAddr>() {
            return Ok(Ok(a));
        }
        if let Some((host, port)) = s.get_ref().rsplit_once(':')
            && crate::dns::is_dns_name(host)
            && let Ok(port) = port.parse::<u16>()
        {
            return Ok(Err((host.to_ascii_lowercase(), port)));
        }
        self.socket_addr(key, s).map(Ok)
    }

    /// Backend `i`'s weight: at least 1, default 1.
    fn backend_weight(&self, prefix: &str, i: usize, b: &RawBackend) -> Result<u32, ConfigError> {
        match &b.weight {
            Some(w) if *w.get_ref() == 0 => Err(self.err(
                Some(w.span()),
                format!("{prefix}.backends[{i}].weight"),
                "must be at least 1",
            )),
            Some(w) => Ok(*w.get_ref()),
            None => Ok(1),
        }
    }

    pub(super) fn upstream(
        &self,
        name: &str,
        u: RawUpstream,
        dns: &DnsConfig,
    ) -> Result<UpstreamConfig, ConfigError> {
        let prefix = format!("upstream.{name}");
        let (protocol, tls) =
            self.upstream_protocol(&prefix, u.protocol.as_ref(), u.tls.as_ref())?;
        if name.is_empty() {
            return Err(self.err(
                Some(u.plugin.span()),
                "upstream",
                "upstream names must not be empty",
            ));
        }
        let plugin = self.plugin_ref(&format!("{prefix}.plugin"), &u.plugin)?;
        let mut backends = Vec::new();
        let mut specs = Vec::new();
        let mut names = Vec::new();
        let mut seen = HashSet::new();
        let mut seen_names = HashSet::new();
        for (i, b) in u.backends.iter().enumerate() {
            let key = format!("{prefix}.backends[{i}].address");
            let address = match self.backend_address(&key, &b.address)? {
                Ok(address) => address,
                Err((host, port)) => {
                    if !seen_names.insert((host.clone(), port)) {
                        return Err(self.err(
                            Some(b.address.span()),
                            key,
                            format!("duplicate backend {host}:{port}"),
                        ));
                    }
                    let weight = self.backend_weight(&prefix, i, b)?;
                    names.push((specs.len(), i, host.clone()));
                    specs.push(BackendSpec::Name {
                        host,
                        port,
                        weight,
                        labels: b.labels.clone(),
                        state: b.state,
                        resolved: Vec::new(),
                    });
                    continue;
                }
            };
            if !seen.insert(address) {
                return Err(self.err(
                    Some(b.address.span()),
                    key,
                    format!("duplicate backend {address}"),
                ));
            }
            let weight = self.backend_weight(&prefix, i, b)?;
            let backend = BackendConfig {
                address,
                weight,
                labels: b.labels.clone(),
                state: b.state,
            };
            specs.push(BackendSpec::Address(backend.clone()));
            backends.push(backend);
        }
        // The resolver settings of an upstream that resolves anything: its
        // own TTL bounds over [dns]'s.
        let upstream_dns = if names.is_empty() && u.discovery.is_none() {
            None
        } else {
            Some(self.ttl_bounds(
                &prefix,
                u.dns_min_ttl_ms.as_ref(),
                u.dns_max_ttl_ms.as_ref(),
                dns,
            )?)
        };
        let discovery = match (&u.discovery, upstream_dns) {
            (None, None) => None,
            (None, Some(upstream_dns)) => {
                let hosts: Vec<String> = names.iter().map(|(_, _, h)| h.clone()).collect();
                let results = crate::dns::resolve_blocking(&upstream_dns.nameservers, &hosts);
                for ((spec_index, i, host), result) in names.iter().zip(results) {
                    let found = result.map_err(|e| {
                        self.err(
                            Some(u.backends[*i].address.span()),
                            format!("{prefix}.backends[{i}].address"),
                            format!("cannot resolve {host:?}: {e}"),
                        )
                    })?;
                    if let Some(BackendSpec::Name { resolved, .. }) = specs.get_mut(*spec_index) {
                        *resolved = found.ips;
                    }
                }
                backends = expand_specs(&specs);
                Some(DiscoveryConfig::Dns {
                    specs,
                    dns: upstream_dns,
                })
            }
            (Some(d), upstream_dns) => {
                if !u.backends.is_empty() {
                    return Err(self.err(
                        Some(d.span()),
                        format!("{prefix}.discovery"),
                        "backends and discovery exclude each other: list the backends, or name where they come from",
                    ));
                }
                let upstream_dns = upstream_dns.unwrap_or_else(|| dns.clone());
                let (discovery, found) = self.discovery(&prefix, d.get_ref(), upstream_dns)?;
                backends = found;
                Some(discovery)
            }
        };
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
        let shadow = match &u.shadow_plugin {
            Some(candidate) => {
                let plugin = self.plugin_ref(&format!("{prefix}.shadow_plugin"), candidate)?;
                let plugin_config = match u.shadow_plugin_config {
                    Some(table) => serde_json::to_value(table).map_err(|e| {
                        self.err(
                            None,
                            format!("{prefix}.shadow_plugin_config"),
                            format!("cannot convert to JSON: {e}"),
                        )
                    })?,
                    None => serde_json::Value::Object(serde_json::Map::new()),
                };
                let sample_percent = self.percent(
                    &format!("{prefix}.shadow_sample_percent"),
                    u.shadow_sample_percent.as_ref(),
                    100,
                )?;
                if sample_percent == 0 {
                    return Err(self.err(
                        u.shadow_sample_percent.as_ref().map(Spanned::span),
                        format!("{prefix}.shadow_sample_percent"),
                        "must be from 1 to 100 (remove shadow_plugin to turn shadowing off)",
                    ));
                }
                Some(ShadowConfig {
                    plugin,
                    plugin_config,
                    sample_percent,
                })
            }
            None => {
                if u.shadow_plugin_config.is_some() || u.shadow_sample_percent.is_some() {
                    return Err(self.err(
                        u.shadow_sample_percent.as_ref().map(Spanned::span),
                        format!("{prefix}.shadow_plugin"),
                        "shadow_plugin_config and shadow_sample_percent need shadow_plugin",
                    ));
                }
                None
            }
        };
        let record = match &u.record {
            Some(r) => {
                let r = r.get_ref();
                let sample_percent = self.percent(
                    &format!("{prefix}.record.sample_percent"),
                    r.sample_percent.as_ref(),
                    100,
                )?;
                if sample_percent == 0 {
                    return Err(self.err(
                        r.sample_percent.as_ref().map(Spanned::span),
                        format!("{prefix}.record.sample_percent"),
                        "must be from 1 to 100 (remove [record] to stop recording)",
                    ));
                }
                let max_bytes = match &r.max_bytes {
                    Some(m) if *m.get_ref() == 0 => {
                        return Err(self.err(
                            Some(m.span()),
                            format!("{prefix}.record.max_bytes"),
                            "must be at least 1",
                        ));
                    }
                    Some(m) => *m.get_ref(),
                    None => DEFAULT_RECORD_MAX_BYTES,
                };
                if r.path.get_ref().is_empty() {
                    return Err(self.err(
                        Some(r.path.span()),
                        format!("{prefix}.record.path"),
                        "must not be empty",
                    ));
                }
                let base = self.path.parent().unwrap_or_else(|| Path::new("."));
                Some(RecordConfig {
                    path: base.join(r.path.get_ref()),
                    sample_percent,
                    max_bytes,
                })
            }
            None => None,
        };
        Ok(UpstreamConfig {
            plugin,
            plugin_config,
            shadow,
            record,
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
            tunnel_idle_timeout_ms: positive(
                "tunnel_idle_timeout_ms",
                &u.tunnel_idle_timeout_ms,
                DEFAULT_TUNNEL_IDLE_TIMEOUT_MS,
            )?,
            pool_max_idle_per_backend: u.pool_max_idle_per_backend,
            pool_idle_timeout_ms: positive(
                "pool_idle_timeout_ms",
                &u.pool_idle_timeout_ms,
                DEFAULT_POOL_IDLE_TIMEOUT_MS,
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
            mirror_max_in_flight: u
                .mirror_max_in_flight
                .unwrap_or(DEFAULT_MIRROR_MAX_IN_FLIGHT),
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
            protocol,
            tls,
            discovery,
            send_proxy_protocol: match u
                .send_proxy_protocol
                .as_ref()
                .map(|v| (v.get_ref().as_str(), v.span()))
            {
                None => None,
                Some(("v1", _)) => Some(ProxyProtocolVersion::V1),
                Some(("v2", _)) => Some(ProxyProtocolVersion::V2),
                Some((_, span)) => {
                    return Err(self.err(
                        Some(span),
                        format!("{prefix}.send_proxy_protocol"),
                        "must be \"v1\" or \"v2\"",
                    ));
                }
            },
        })
    }

    /// A discovery source and the backends it names now.
    fn discovery(
        &self,
        prefix: &str,
        d: &super::discovery::RawDiscovery,
        dns: DnsConfig,
    ) -> Result<(DiscoveryConfig, Vec<BackendConfig>), ConfigError> {
        let key = |k: &str| format!("{prefix}.discovery.{k}");
        let only = |field: &str, present: bool| {
            if present {
                Err(self.err(
                    Some(d.kind.span()),
                    key(field),
                    format!("not a key of kind {:?}", d.kind.get_ref()),
                ))
            } else {
                Ok(())
            }
        };
        match d.kind.get_ref().as_str() {
            "dns-srv" => {
                only("path", d.path.is_some())?;
                only("endpoints", d.endpoints.is_some())?;
                only("prefix", d.prefix.is_some())?;
                only("refresh_interval_ms", d.refresh_interval_ms.is_some())?;
                let Some(name) = &d.name else {
                    return Err(self.err(
                        Some(d.kind.span()),
                        key("name"),
                        "a dns-srv source needs name = \"_service._proto.domain\"",
                    ));
                };
                let host = name.get_ref().to_ascii_lowercase();
                if !crate::dns::is_dns_name(&host) {
                    return Err(self.err(
                        Some(name.span()),
                        key("name"),
                        format!("{host:?} is not a DNS name"),
                    ));
                }
                let answer =
                    crate::dns::resolve_srv_blocking(&dns.nameservers, &host).map_err(|e| {
                        self.err(
                            Some(name.span()),
                            key("name"),
                            format!("cannot resolve SRV {host:?}: {e}"),
                        )
                    })?;
                Ok((
                    DiscoveryConfig::DnsSrv { name: host, dns },
                    srv_backends(&answer),
                ))
            }
            "file" => {
                only("name", d.name.is_some())?;
                only("endpoints", d.endpoints.is_some())?;
                only("prefix", d.prefix.is_some())?;
                let Some(path) = &d.path else {
                    return Err(self.err(
                        Some(d.kind.span()),
                        key("path"),
                        "a file source needs path = \"FILE.json\"",
                    ));
                };
                let base = self.path.parent().unwrap_or_else(|| Path::new("."));
                let resolved = base.join(path.get_ref());
                let refresh_interval_ms = match &d.refresh_interval_ms {
                    Some(v) if *v.get_ref() == 0 => {
                        return Err(self.err(
                            Some(v.span()),
                            key("refresh_interval_ms"),
                            "must be at least 1",
                        ));
                    }
                    Some(v) => *v.get_ref(),
                    None => DEFAULT_FILE_REFRESH_INTERVAL_MS,
                };
                let backends = read_backend_file(&resolved)
                    .map_err(|e| self.err(Some(path.span()), key("path"), e))?;
                Ok((
                    DiscoveryConfig::File {
                        path: resolved,
                        refresh_interval_ms,
                    },
                    backends,
                ))
            }
            "etcd" => {
                only("path", d.path.is_some())?;
                only("name", d.name.is_some())?;
                only("refresh_interval_ms", d.refresh_interval_ms.is_some())?;
                let endpoints =
                    self.etcd_endpoints(&key("endpoints"), d.endpoints.as_ref(), d.kind.span())?;
                let Some(prefix) = &d.prefix else {
                    return Err(self.err(
                        Some(d.kind.span()),
                        key("prefix"),
                        "an etcd source needs prefix = \"/services/NAME/\"",
                    ));
                };
                if prefix.get_ref().is_empty() {
                    return Err(self.err(Some(prefix.span()), key("prefix"), "must not be empty"));
                }
                let (backends, skipped) =
                    crate::etcd::read_prefix_blocking(&endpoints, prefix.get_ref())
                        .map_err(|e| self.err(Some(prefix.span()), key("prefix"), e.to_string()))?;
                for reason in skipped {
                    tracing::warn!(
                        "{}: {}: skipped {reason}",
                        self.path.display(),
                        key("prefix")
                    );
                }
                Ok((
                    DiscoveryConfig::Etcd {
                        endpoints,
                        prefix: prefix.get_ref().clone(),
                    },
                    backends,
                ))
            }
            other => Err(self.err(
                Some(d.kind.span()),
                key("kind"),
                format!(
                    "unknown discovery kind {other:?} (supported: \"file\", \"dns-srv\", \"etcd\")"
                ),
            )),
        }
    }

    /// `[fleet]`.
    fn fleet(&self, f: &Spanned<super::raw::RawFleet>) -> Result<FleetConfig, ConfigError> {
        let table = f.span();
        let f = f.get_ref();
        let endpoints =
            self.etcd_endpoints("fleet.endpoints", f.endpoints.as_ref(), table.clone())?;
        let mut prefix = match &f.prefix {
            Some(p) if p.get_ref().is_empty() => {
                return Err(self.err(Some(p.span()), "fleet.prefix", "must not be empty"));
            }
            Some(p) => p.get_ref().clone(),
            None => DEFAULT_FLEET_PREFIX.to_string(),
        };
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let instance = match &f.instance {
            Some(i)
                if i.get_ref().is_empty()
                    || i.get_ref().contains('/')
                    || i.get_ref().len() > 200 =>
            {
                return Err(self.err(
                    Some(i.span()),
                    "fleet.instance",
                    "must be 1 to 200 bytes without '/'",
                ));
            }
            Some(i) => Some(i.get_ref().clone()),
            None => None,
        };
        let lease_ttl_ms = self.bounded(
            "fleet.lease_ttl_ms",
            f.lease_ttl_ms.as_ref(),
            DEFAULT_FLEET_LEASE_TTL_MS,
            2_000..=3_600_000,
        )?;
        let rollback_window_ms = self.bounded(
            "fleet.rollback_window_ms",
            f.rollback_window_ms.as_ref(),
            DEFAULT_FLEET_ROLLBACK_WINDOW_MS,
            1..=86_400_000,
        )?;
        let rollback_min_requests = self.bounded(
            "fleet.rollback_min_requests",
            f.rollback_min_requests.as_ref(),
            DEFAULT_FLEET_ROLLBACK_MIN_REQUESTS,
            1..=1_000_000_000,
        )?;
        Ok(FleetConfig {
            endpoints,
            prefix,
            instance,
            lease_ttl_ms: lease_ttl_ms as u64,
            rollback_window_ms: rollback_window_ms as u64,
            rollback_failure_percent: self.percent(
                "fleet.rollback_failure_percent",
                f.rollback_failure_percent.as_ref(),
                DEFAULT_FLEET_ROLLBACK_FAILURE_PERCENT,
            )?,
            rollback_min_requests: rollback_min_requests as u64,
        })
    }

    /// `endpoints = ["http://host:port", ...]` (required, non-empty).
    pub(super) fn etcd_endpoints(
        &self,
        key: &str,
        endpoints: Option<&Spanned<Vec<String>>>,
        table: std::ops::Range<usize>,
    ) -> Result<Vec<String>, ConfigError> {
        let Some(endpoints) = endpoints else {
            return Err(self.err(
                Some(table),
                key,
                "needs endpoints = [\"http://127.0.0.1:2379\"]",
            ));
        };
        if endpoints.get_ref().is_empty() {
            return Err(self.err(
                Some(endpoints.span()),
                key,
                "must name at least one endpoint",
            ));
        }
        for e in endpoints.get_ref() {
            crate::etcd::check_endpoint(e).map_err(|m| self.err(Some(endpoints.span()), key, m))?;
        }
        Ok(endpoints.get_ref().clone())
    }

    pub(super) fn percent(
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

    pub(super) fn socket_addr(
        &self,
        key: &str,
        s: &Spanned<String>,
    ) -> Result<SocketAddr, ConfigError> {
        s.get_ref().parse().map_err(|_| {
            let given = s.get_ref();
            // `::1:0`: an IPv6 address needs brackets to set a port apart.
            let hint = match given.rsplit_once(':') {
                Some((ip, port))
                    if !given.contains('[') && ip.parse::<std::net::Ipv6Addr>().is_ok() =>
                {
                    format!("; an IPv6 address goes in brackets: \"[{ip}]:{port}\"")
                }
                _ => String::new(),
            };
            self.err(
                Some(s.span()),
                key,
                format!("{given:?} is not an IP:port address (e.g. \"127.0.0.1:9001\"){hint}"),
            )
        })
    }

    pub(super) fn plugin_ref(
        &self,
        key: &str,
        s: &Spanned<String>,
    ) -> Result<PluginRef, ConfigError> {
        let base = self.path.parent().unwrap_or_else(|| Path::new("."));
        PluginRef::resolve(s.get_ref(), base)
            .map_err(|message| self.err(Some(s.span()), key, message))
    }
}

/// 1-based line number of byte `offset` in `text`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of the `key = value` line holding byte `offset` of `text` (a
/// value of the wrong type: name its key, not just its line), if the line
/// has that shape.
/// A serde_path_to_error path without the segments toml's `Spanned`
/// adds (`$__serde_spanned_private_value`).
fn clean_path(path: &str) -> String {
    path.split('.')
        .filter(|s| !s.starts_with("$__"))
        .collect::<Vec<_>>()
        .join(".")
}

/// The dotted key the line at `offset` sets, under the `[table]` or
/// `[[array]]` header above it (`upstream.app.plugin`); the header's own
/// name on a header line.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?.trim();
    if line.starts_with('[') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let key = key_at(text, offset)?;
    let above = text.get(..start)?;
    let Some(header) = above
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
    else {
        return Some(key);
    };
    let table = header.trim_matches(|c| c == '[' || c == ']').trim();
    if header.starts_with("[[") {
        // The n-th entry of an array of tables: `listener[1].address`.
        let index = above
            .lines()
            .filter(|l| l.trim() == header)
            .count()
            .saturating_sub(1);
        return Some(format!("{table}[{index}].{key}"));
    }
    Some(format!("{table}.{key}"))
}

fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    bare.then(|| key.to_string())
}
