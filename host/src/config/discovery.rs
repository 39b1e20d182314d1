//! `[upstream.NAME.discovery]`: where an upstream's backends come from when
//! the config does not list them, and the backend-list file format.
//!
//! `kind = "file"` follows Prometheus `file_sd` and Traefik's file
//! provider: a JSON list of backends, re-read when it changes. The file is
//! read at config load (so `--check`, start and every reload see it, and a
//! bad file at that point is a config error), then polled by
//! `crate::discovery`; a bad file later keeps the last good set.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{AdminState, BackendConfig, DnsConfig};

/// Largest backend-list file read, in bytes (4 MiB).
pub const MAX_BACKEND_FILE_BYTES: u64 = 4 << 20;

/// Default `refresh_interval_ms` of a file source: how often its
/// modification time and size are checked, in ms.
pub const DEFAULT_FILE_REFRESH_INTERVAL_MS: u64 = 1000;

/// A discovery source (`[upstream.NAME.discovery]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryConfig {
    /// `kind = "file"`: the backends are the JSON list in `path` (a list of
    /// `{address, weight?, labels?, state?}`), re-read when its modification
    /// time or size changes, checked every `refresh_interval_ms`.
    File {
        /// The file, resolved against the config file's directory.
        path: PathBuf,
        /// Poll period in ms (default 1000, at least 1).
        refresh_interval_ms: u64,
    },
    /// `kind = "dns-srv"`: the backends are the targets of SRV name `name`
    /// (RFC 2782: the lowest priority that resolves; each target's A/AAAA
    /// addresses with the record's port; weight from the record, 0 taken
    /// as 1; labels `srv_target` and `srv_priority`), resolved again when
    /// the TTL runs out, within the same bounds as names.
    DnsSrv {
        /// The SRV name, e.g. `_http._tcp.app.internal`.
        name: String,
        /// The resolver and the bounds on re-resolution, the upstream's
        /// `dns_min_ttl_ms`/`dns_max_ttl_ms` over `[dns]`'s.
        dns: DnsConfig,
    },
    /// `kind = "etcd"`: the backends are the entries under `prefix` in etcd
    /// (one key per backend, its value `{address?, weight?, labels?,
    /// state?}`, see [`crate::etcd`]), read at config load and then watched;
    /// a key whose lease expires leaves the set.
    Etcd {
        /// The etcd endpoints, `http://host:port`.
        endpoints: Vec<String>,
        /// The key prefix, e.g. `/services/app/`.
        prefix: String,
    },
    /// Backends written as `name:port`: each name is resolved at config
    /// load and again when its answer's TTL runs out, the wait bounded by
    /// `dns.min_ttl_ms` and `dns.max_ttl_ms`.
    Dns {
        /// The `backends` list, in order; each name's `resolved` holds its
        /// addresses found at load.
        specs: Vec<BackendSpec>,
        /// The resolver and the bounds on re-resolution, as for `DnsSrv`.
        dns: DnsConfig,
    },
}

/// One entry of an upstream's `backends` list whose set DNS decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// An `IP:port` entry: one backend, always.
    Address(BackendConfig),
    /// A `name:port` entry: one backend per address the name resolves to
    /// (A and AAAA), each with the entry's weight, labels and state.
    Name {
        /// The DNS name, as written.
        host: String,
        /// The port of every address.
        port: u16,
        /// Each backend's weight.
        weight: u32,
        /// Each backend's labels.
        labels: BTreeMap<String, String>,
        /// Each backend's configured state.
        state: AdminState,
        /// The addresses it resolves to, sorted (at config load; the
        /// discovery task keeps its own copy current).
        resolved: Vec<std::net::IpAddr>,
    },
}

/// The backends `specs` stand for, each name expanded to its `resolved`
/// addresses, in order; an address met twice is kept once, where it first
/// appears.
pub fn expand_specs(specs: &[BackendSpec]) -> Vec<BackendConfig> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for spec in specs {
        match spec {
            BackendSpec::Address(b) => {
                if seen.insert(b.address) {
                    out.push(b.clone());
                }
            }
            BackendSpec::Name {
                port,
                weight,
                labels,
                state,
                resolved,
                ..
            } => {
                for ip in resolved {
                    let address = SocketAddr::new(*ip, *port);
                    if seen.insert(address) {
                        out.push(BackendConfig {
                            address,
                            weight: *weight,
                            labels: labels.clone(),
                            state: *state,
                        });
                    }
                }
            }
        }
    }
    out
}

/// `[upstream.NAME.discovery]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) kind: Spanned<String>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) refresh_interval_ms: Option<Spanned<u64>>,
    pub(super) endpoints: Option<Spanned<Vec<String>>>,
    pub(super) prefix: Option<Spanned<String>>,
}

/// One entry of a backend-list file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    #[serde(deserialize_with = "socket_addr")]
    address: SocketAddr,
    #[serde(default = "one", deserialize_with = "weight")]
    weight: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    state: AdminState,
}

fn one() -> u32 {
    1
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an IP:port address (e.g. \"127.0.0.1:9001\")"
        ))
    })
}

fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        0 => Err(serde::de::Error::custom("weight must be at least 1")),
        w => Ok(w),
    }
}

/// Parse a backend-list file's `text`: a JSON array of
/// `{"address": "ip:port", "weight": 1, "labels": {...}, "state": "ready"}`
/// (all but `address` optional; unknown keys refused).
///
/// # Errors
/// `LINE:COLUMN: message` for malformed JSON, an unknown key, a bad address
/// or a zero weight; `LINE: duplicate backend ADDR` for an address listed
/// twice.
pub fn parse_backend_list(text: &str) -> Result<Vec<BackendConfig>, String> {
    let entries: Vec<FileBackend> = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        if !seen.insert(e.address) {
            let line = second_mention_line(text, &e.address.to_string())
                .map_or_else(String::new, |l| format!("{l}: "));
            return Err(format!(
                "{line}entry [{i}]: duplicate backend {}",
                e.address
            ));
        }
        backends.push(BackendConfig {
            address: e.address,
            weight: e.weight,
            labels: e.labels,
            state: e.state,
        });
    }
    Ok(backends)
}

/// Parse one backend, `{"address": "ip:port", "weight": 1, "labels": {...},
/// "state": "ready"}` (the admin API's `POST /upstreams/{name}/backends`).
///
/// # Errors
/// `LINE:COLUMN: message`, as [`parse_backend_list`].
pub fn parse_backend(text: &str) -> Result<BackendConfig, String> {
    let e: FileBackend = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    Ok(BackendConfig {
        address: e.address,
        weight: e.weight,
        labels: e.labels,
        state: e.state,
    })
}

/// `LINE:COLUMN: message` (serde_json appends " at line L column C"; the
/// place goes first, as in every other error here).
fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    format!("{}:{}: {message}", e.line(), e.column())
}

/// The 1-based line of the second `"address"` string literal in `text`.
fn second_mention_line(text: &str, address: &str) -> Option<usize> {
    let quoted = format!("\"{address}\"");
    let first = text.find(&quoted)?;
    let second = first + quoted.len() + text[first + quoted.len()..].find(&quoted)?;
    Some(text[..second].matches('\n').count() + 1)
}

/// Read and parse the backend-list file at `path` (at most
/// [`MAX_BACKEND_FILE_BYTES`]).
///
/// # Errors
/// `FILE: reason` when it cannot be read or is too large, `FILE:LINE:COLUMN:
/// message` when it does not parse (see [`parse_backend_list`]).
pub fn read_backend_file(path: &Path) -> Result<Vec<BackendConfig>, String> {
    let shown = path.display();
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .len();
    if len > MAX_BACKEND_FILE_BYTES {
        return Err(format!(
            "{shown}: {len} bytes, more than the {MAX_BACKEND_FILE_BYTES} a backend list may have"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
    parse_backend_list(&text).map_err(|e| format!("{shown}:{e}"))
}

/// The backends of an SRV answer, as config entries (see
/// [`DiscoveryConfig::DnsSrv`]).
pub fn srv_backends(answer: &crate::dns::SrvResolved) -> Vec<BackendConfig> {
    answer
        .backends
        .iter()
        .map(|b| BackendConfig {
            address: b.address,
            weight: u32::from(b.weight.max(1)),
            labels: BTreeMap::from([
                ("srv_priority".to_string(), b.priority.to_string()),
                ("srv_target".to_string(), b.target.clone()),
            ]),
            state: AdminState::Ready,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_list_parses_with_defaults() {
        let list = parse_backend_list(
            r#"[
              {"address": "127.0.0.1:9001"},
              {"address": "[::1]:9002", "weight": 3, "labels": {"zone": "a"}, "state": "drain"}
            ]"#,
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].weight, list[0].state), (1, AdminState::Ready));
        assert_eq!(list[1].address.to_string(), "[::1]:9002");
        assert_eq!((list[1].weight, list[1].state), (3, AdminState::Drain));
        assert_eq!(list[1].labels["zone"], "a");
        assert!(parse_backend_list("[]").unwrap().is_empty());
    }

    #[test]
    fn hostile_lists_are_refused_with_their_line() {
        let cases = [
            ("", "1:0: EOF while parsing a value"),
            ("{}", "invalid type: map, expected a sequence"),
            (
                "[\n{\"address\": \"localhost:1\"}]",
                "2:26: \"localhost:1\" is not an IP:port",
            ),
            (
                "[\n\n{\"address\": \"1.2.3.4:5\", \"weight\": 0}]",
                "weight must be at least 1",
            ),
            (
                "[{\"address\": \"1.2.3.4:5\", \"port\": 1}]",
                "unknown field `port`",
            ),
            ("[{\"weight\": 2}]", "missing field `address`"),
            (
                "[{\"address\": \"1.2.3.4:5\", \"state\": \"gone\"}]",
                "unknown variant `gone`",
            ),
            (
                "[{\"address\": 5}]",
                "invalid type: integer `5`, expected a string",
            ),
            (
                "[{\"address\": \"1.2.3.4:5\"},\n {\"address\": \"1.2.3.4:5\"}]",
                "2: entry [1]: duplicate backend 1.2.3.4:5",
            ),
            (
                "[{\"address\": \"1.2.3.4:5\"}] trailing",
                "trailing characters",
            ),
            (
                "[{\"address\": \"1.2.3.4:5\", \"weight\": 4294967296}]",
                "1:",
            ),
        ];
        for (text, want) in cases {
            let err = parse_backend_list(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
            assert!(err.as_bytes()[0].is_ascii_digit(), "no line: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let labels = format!("[{{\"labels\": {}", "{\"a\":".repeat(100_000));
        for text in ["[".repeat(100_000), labels] {
            let err = parse_backend_list(&text).unwrap_err();
            assert!(err.starts_with("1:"), "{err}");
        }
    }

    #[test]
    fn files_name_themselves_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backends.json");
        assert!(
            read_backend_file(&path)
                .unwrap_err()
                .starts_with(&path.display().to_string())
        );
        std::fs::write(&path, "[{\"address\": \"x\"}]").unwrap();
        let err = read_backend_file(&path).unwrap_err();
        assert!(err.starts_with(&format!("{}:1:", path.display())), "{err}");
    }
}
