//! etcd v3, through the `etcd-client` crate: connecting with bounded
//! timeouts, and the backend entries a `kind = "etcd"` discovery source
//! reads under its prefix.
//!
//! An entry is one key under the prefix whose value is a JSON object
//! `{"address": "ip:port", "weight": 1, "labels": {...}, "state": "ready"}`
//! (the backend-list file's entry format; all but `address` optional). When
//! `address` is absent, the key's last segment (after the prefix) is the
//! address, so `/services/app/10.0.0.5:8080` with the value `{}` is a
//! backend. A service registers by putting its key with a lease and keeping
//! the lease alive (`etcdctl lease grant`, `put --lease`, `lease keep-alive`):
//! when it stops, etcd deletes the key at the lease's expiry, as Eureka
//! drops an instance that stops renewing and Consul one whose TTL check
//! lapses.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

pub use etcd_client::Client;
use etcd_client::ConnectOptions;

use crate::config::{BackendConfig, parse_backend};

/// How long connecting to an etcd endpoint may take (2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one unary etcd request may take (5 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest value read as a backend entry, in bytes (64 KiB); larger values
/// are skipped and logged.
pub const MAX_ENTRY_BYTES: usize = 64 << 10;

/// An etcd request failed.
#[derive(Debug, thiserror::Error)]
#[error("etcd {endpoints}: {message}")]
pub struct EtcdError {
    /// The endpoints, comma-separated.
    pub endpoints: String,
    /// What failed, with etcd-client's reason.
    pub message: String,
}

impl EtcdError {
    /// An error of `endpoints` saying `message`.
    pub fn new(endpoints: &[String], message: impl std::fmt::Display) -> Self {
        Self {
            endpoints: endpoints.join(","),
            message: message.to_string(),
        }
    }
}

/// Connect to `endpoints` (`http://host:port`), connecting within
/// [`CONNECT_TIMEOUT`], each unary request within [`REQUEST_TIMEOUT`], and
/// HTTP/2 keep-alive pings every 5 s (a silent server is noticed in 10 s,
/// which also ends a watch on it).
///
/// # Errors
/// [`EtcdError`] if an endpoint is malformed. A server that is down is
/// noticed at the first request, not here.
pub async fn connect(endpoints: &[String]) -> Result<Client, EtcdError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| EtcdError::new(endpoints, e))
}

/// Read every key under `prefix`, then watch the prefix from the revision
/// read (so no change between the two is missed, as a Kubernetes informer
/// lists then watches). Returns the keys and values read and the watch.
///
/// # Errors
/// [`EtcdError`] if the read or the watch fails.
pub async fn read_and_watch(
    client: &mut Client,
    endpoints: &[String],
    prefix: &str,
) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, etcd_client::WatchStream), EtcdError> {
    let fail = |e: etcd_client::Error| EtcdError::new(endpoints, e);
    let read = client
        .get(
            prefix.as_bytes(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(fail)?;
    let revision = read.header().map_or(0, |h| h.revision());
    let kvs = read
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect();
    let stream = client
        .watch(
            prefix.as_bytes(),
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
        .map_err(fail)?;
    Ok((kvs, stream))
}

/// Whether `endpoint` is a URL etcd-client can connect to here:
/// `http://host:port` (TLS to etcd is not supported yet).
///
/// # Errors
/// Why not, as a sentence.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(if endpoint.starts_with("https://") {
            format!("{endpoint:?}: TLS to etcd is not supported yet; use http://")
        } else {
            format!("{endpoint:?} is not an http://host:port URL")
        });
    };
    let authority = rest.trim_end_matches('/');
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{endpoint:?} is not an http://host:port URL")),
    }
}

/// The backend an entry stands for: `key` (under `prefix`) and its JSON
/// `value` (see the module docs).
///
/// # Errors
/// A sentence naming what is wrong: not UTF-8, too large, not a JSON
/// object, a bad address (in the value or the key), a zero weight, an
/// unknown field.
pub fn parse_entry(prefix: &str, key: &[u8], value: &[u8]) -> Result<BackendConfig, String> {
    if value.len() > MAX_ENTRY_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_ENTRY_BYTES} an entry may have",
            value.len()
        ));
    }
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| {
            format!(
                "{}:{}: not a JSON object {{\"address\": ...}}: {e}",
                e.line(),
                e.column()
            )
        })?;
    if !object.contains_key("address") {
        let key = String::from_utf8_lossy(key);
        let name = key.strip_prefix(prefix).unwrap_or(&key);
        let last = name.rsplit('/').next().unwrap_or(name);
        object.insert("address".into(), serde_json::Value::String(last.into()));
    }
    parse_backend(&serde_json::Value::Object(object).to_string())
        .map_err(|e| e.split_once(": ").map_or(e.clone(), |(_, m)| m.to_string()))
}

/// The entries under a prefix, by key, and the backend set they make.
#[derive(Debug, Default)]
pub struct Entries {
    prefix: String,
    by_key: BTreeMap<Vec<u8>, BackendConfig>,
}

impl Entries {
    /// No entries yet, under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            by_key: BTreeMap::new(),
        }
    }

    /// Set `key` to `value`. A value that does not parse leaves the key's
    /// last good entry (or its absence) as it was.
    ///
    /// # Errors
    /// `KEY: reason`, for the caller to log.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        match parse_entry(&self.prefix, key, value) {
            Ok(b) => {
                self.by_key.insert(key.to_vec(), b);
                Ok(())
            }
            Err(e) => Err(format!("{}: {e}", String::from_utf8_lossy(key))),
        }
    }

    /// Remove `key` (deleted, or its lease expired).
    pub fn delete(&mut self, key: &[u8]) {
        self.by_key.remove(key);
    }

    /// Forget every entry (before a full read).
    pub fn clear(&mut self) {
        self.by_key.clear();
    }

    /// The backend set, in key order; an address under two keys is kept
    /// under the first, and each later key is named in `duplicates`.
    pub fn backends(&self) -> (Vec<BackendConfig>, Vec<String>) {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(self.by_key.len());
        let mut duplicates = Vec::new();
        for (key, b) in &self.by_key {
            if seen.insert(b.address) {
                out.push(b.clone());
            } else {
                duplicates.push(format!(
                    "{}: duplicate backend {}",
                    String::from_utf8_lossy(key),
                    b.address
                ));
            }
        }
        (out, duplicates)
    }
}

/// Read every entry under `prefix` once, blocking the caller (config load),
/// within [`CONNECT_TIMEOUT`] + [`REQUEST_TIMEOUT`]. Returns the backend set
/// and, for each skipped key, why.
///
/// # Errors
/// [`EtcdError`] if etcd cannot be reached or the read fails.
pub fn read_prefix_blocking(
    endpoints: &[String],
    prefix: &str,
) -> Result<(Vec<BackendConfig>, Vec<String>), EtcdError> {
    let owned = endpoints.to_vec();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| EtcdError::new(&owned, e))?;
        runtime.block_on(async move {
            let read = async {
                let mut client = connect(&owned).await?;
                let response = client
                    .get(
                        prefix.as_bytes(),
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .map_err(|e| EtcdError::new(&owned, e))?;
                let mut entries = Entries::new(&prefix);
                let mut skipped = Vec::new();
                for kv in response.kvs() {
                    if let Err(e) = entries.put(kv.key(), kv.value()) {
                        skipped.push(e);
                    }
                }
                let (backends, duplicates) = entries.backends();
                skipped.extend(duplicates);
                Ok((backends, skipped))
            };
            tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, read)
                .await
                .unwrap_or_else(|_| Err(EtcdError::new(&owned, "timed out")))
        })
    })
    .join()
    .unwrap_or_else(|_| Err(EtcdError::new(endpoints, "the etcd thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_from_the_value_or_the_key() {
        let b = parse_entry(
            "/s/",
            b"/s/x",
            br#"{"address": "10.0.0.1:80", "weight": 3}"#,
        )
        .unwrap();
        assert_eq!((b.address.to_string(), b.weight), ("10.0.0.1:80".into(), 3));
        let b = parse_entry("/s/", b"/s/10.0.0.2:81", b"{}").unwrap();
        assert_eq!(b.address.to_string(), "10.0.0.2:81");
    }

    #[test]
    fn hostile_entries_are_refused_with_a_reason() {
        let big = format!(
            "{{\"address\": \"1.2.3.4:5\", \"x\": \"{}\"}}",
            "a".repeat(70_000)
        );
        let cases: [(&[u8], &[u8], &str); 8] = [
            (b"/s/a", b"not json", "not a JSON object"),
            (b"/s/a", b"[1]", "not a JSON object"),
            (b"/s/a", b"\xff\xfe", "not UTF-8"),
            (b"/s/host:80", b"{}", "\"host:80\" is not an IP:port"),
            (b"/s/a", br#"{"address": "1.2.3.4"}"#, "is not an IP:port"),
            (
                b"/s/a",
                br#"{"address": "1.2.3.4:5", "weight": 0}"#,
                "weight must be",
            ),
            (
                b"/s/a",
                br#"{"address": "1.2.3.4:5", "port": 1}"#,
                "unknown field",
            ),
            (b"/s/a", big.as_bytes(), "more than the 65536"),
        ];
        for (key, value, want) in cases {
            let err = parse_entry("/s/", key, value).unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(value)
            );
        }
        let deep = "[".repeat(100_000);
        assert!(parse_entry("/s/", b"/s/a", deep.as_bytes()).is_err());
    }

    #[test]
    fn a_bad_put_keeps_the_last_good_entry_and_duplicates_keep_the_first_key() {
        let mut e = Entries::new("/s/");
        e.put(b"/s/a", br#"{"address": "10.0.0.1:80"}"#).unwrap();
        let err = e.put(b"/s/a", b"garbage").unwrap_err();
        assert!(err.starts_with("/s/a: "), "{err}");
        e.put(b"/s/b", br#"{"address": "10.0.0.1:80"}"#).unwrap();
        let (set, dups) = e.backends();
        assert_eq!(set.len(), 1);
        assert_eq!(dups, ["/s/b: duplicate backend 10.0.0.1:80"]);
        e.delete(b"/s/a");
        let (set, dups) = e.backends();
        assert_eq!((set.len(), dups.len()), (1, 0));
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:2379").is_ok());
        assert!(check_endpoint("http://etcd.internal:2379/").is_ok());
        for bad in [
            "127.0.0.1:2379",
            "https://x:1",
            "http://x",
            "http://:1",
            "http://x:99999",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
