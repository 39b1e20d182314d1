//! DNS resolution of backend names: A and AAAA records through
//! hickory-resolver, from the system's resolver configuration
//! (`/etc/resolv.conf`, and `/etc/hosts` for names such as `localhost`) or
//! from the name servers in `[dns] nameservers`.
//!
//! A lookup returns the addresses sorted (so every instance with the same
//! answer builds the same backend order, which the hashing strategies need)
//! and how long the answer is valid (the records' TTL).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// Per-query timeout, in ms (each name server is tried twice).
pub const DNS_QUERY_TIMEOUT_MS: u64 = 2000;

/// Why a name did not resolve.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    /// The resolver could not be set up (no usable system configuration).
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    /// The query failed: no such name, no A/AAAA records, a timeout, or a
    /// server failure.
    #[error("{0}")]
    Lookup(String),
}

/// One answer: the addresses, sorted, and until when they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The A and AAAA addresses, sorted and without duplicates.
    pub ips: Vec<IpAddr>,
    /// When the answer's TTL runs out.
    pub valid_until: Instant,
}

/// A resolver for backend names.
#[derive(Clone)]
pub struct DnsResolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsResolver").finish_non_exhaustive()
    }
}

impl DnsResolver {
    /// A resolver asking `nameservers` (UDP, then TCP for truncated
    /// answers), or the system's configured ones when the list is empty.
    ///
    /// # Errors
    /// [`DnsError::Setup`] when the system configuration cannot be read.
    pub fn new(nameservers: &[SocketAddr]) -> Result<Self, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = Duration::from_millis(DNS_QUERY_TIMEOUT_MS);
        opts.attempts = 2;
        // Every lookup asks again once the TTL ran out; the caller schedules
        // lookups by TTL, so the resolver's own cache only absorbs bursts.
        let inner = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self { inner })
    }

    /// The A and AAAA addresses of `host`.
    ///
    /// # Errors
    /// [`DnsError::Lookup`] with the resolver's reason; an answer without
    /// addresses is an error too.
    pub async fn lookup(&self, host: &str) -> Result<Resolved, DnsError> {
        let answer = self
            .inner
            .lookup_ip(host)
            .await
            .map_err(|e| DnsError::Lookup(e.to_string()))?;
        let mut ips: Vec<IpAddr> = answer.iter().collect();
        ips.sort();
        ips.dedup();
        if ips.is_empty() {
            return Err(DnsError::Lookup("no A or AAAA records".into()));
        }
        Ok(Resolved {
            ips,
            valid_until: answer.valid_until(),
        })
    }
}

/// One backend found through an SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvBackend {
    /// The target's address with the record's port.
    pub address: SocketAddr,
    /// The record's weight (0 to 65535).
    pub weight: u16,
    /// The record's priority (the group chosen; lower is preferred).
    pub priority: u16,
    /// The target name, lowercased, without the final dot.
    pub target: String,
}

/// An SRV answer turned into backends (see [`DnsResolver::lookup_srv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvResolved {
    /// The backends, sorted by address.
    pub backends: Vec<SrvBackend>,
    /// When the first TTL involved (the SRV's or a target's) runs out.
    pub valid_until: Instant,
}

impl DnsResolver {
    /// The backends behind SRV name `name` (RFC 2782): the records of the
    /// lowest priority whose targets resolve to at least one address; a
    /// higher priority is used only when no target of every lower one does.
    /// A target of `.` ("no service here") is skipped.
    ///
    /// # Errors
    /// [`DnsError::Lookup`] when the SRV lookup fails or no target resolves.
    pub async fn lookup_srv(&self, name: &str) -> Result<SrvResolved, DnsError> {
        use hickory_resolver::proto::rr::RData;
        let answer = self
            .inner
            .srv_lookup(name)
            .await
            .map_err(|e| DnsError::Lookup(e.to_string()))?;
        let mut valid_until = answer.valid_until();
        let mut records: Vec<(u16, u16, u16, String)> = answer
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((
                    srv.priority,
                    srv.weight,
                    srv.port,
                    srv.target
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                )),
                _ => None,
            })
            .filter(|(_, _, _, target)| !target.is_empty())
            .collect();
        records.sort();
        let mut priorities: Vec<u16> = records.iter().map(|r| r.0).collect();
        priorities.dedup();
        let mut last_error = None;
        for priority in priorities {
            let mut backends = Vec::new();
            for (_, weight, port, target) in records.iter().filter(|r| r.0 == priority) {
                match self.lookup(target).await {
                    Ok(resolved) => {
                        valid_until = valid_until.min(resolved.valid_until);
                        backends.extend(resolved.ips.iter().map(|ip| SrvBackend {
                            address: SocketAddr::new(*ip, *port),
                            weight: *weight,
                            priority,
                            target: target.clone(),
                        }));
                    }
                    Err(e) => last_error = Some(format!("{target}: {e}")),
                }
            }
            if !backends.is_empty() {
                backends.sort_by_key(|b| b.address);
                backends.dedup_by_key(|b| b.address);
                return Ok(SrvResolved {
                    backends,
                    valid_until,
                });
            }
        }
        Err(DnsError::Lookup(match last_error {
            Some(e) => format!("no SRV target resolves ({e})"),
            None => "no SRV records".into(),
        }))
    }
}

/// Run `lookups` with a resolver for `nameservers`, blocking the caller
/// (config load, which may run inside a tokio runtime or outside any): on
/// a thread of its own with its own runtime.
///
/// # Errors
/// [`DnsError::Setup`] when the runtime or the resolver cannot be set up.
fn block_on_resolver<T, F, Fut>(nameservers: &[SocketAddr], lookups: F) -> Result<T, DnsError>
where
    T: Send + 'static,
    F: FnOnce(DnsResolver) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let nameservers = nameservers.to_vec();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        runtime.block_on(async move { Ok(lookups(DnsResolver::new(&nameservers)?).await) })
    })
    .join()
    .unwrap_or_else(|_| Err(DnsError::Setup("the resolver thread panicked".into())))
}

/// [`DnsResolver::lookup_srv`] once, blocking the caller (config load).
pub fn resolve_srv_blocking(
    nameservers: &[SocketAddr],
    name: &str,
) -> Result<SrvResolved, DnsError> {
    let name = name.to_string();
    block_on_resolver(nameservers, |resolver| async move {
        resolver.lookup_srv(&name).await
    })?
}

/// Resolve each of `hosts` once, blocking the caller (config load).
/// Results are in `hosts` order.
pub fn resolve_blocking(
    nameservers: &[SocketAddr],
    hosts: &[String],
) -> Vec<Result<Resolved, DnsError>> {
    let owned = hosts.to_vec();
    let joined = block_on_resolver(nameservers, |resolver| async move {
        futures_util::future::join_all(owned.iter().map(|h| resolver.lookup(h))).await
    });
    joined.unwrap_or_else(|e| vec![Err(e); hosts.len()])
}

/// Whether `host` is a syntactically valid DNS name (RFC 1123 labels:
/// letters, digits, `-` and `_`, 1 to 63 bytes each, 253 in all; a final
/// dot allowed).
pub fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // All digits and dots is an IPv4 address, not a name.
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["localhost", "app.internal", "a-b.c_d.example.", "x1"] {
            assert!(is_dns_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "", ".", "a..b", "-a.b", "a-.b", "a b", "1.2.3.4", "::1", &long, "é.com",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn localhost_resolves_from_the_hosts_file() {
        let results = resolve_blocking(&[], &["localhost".to_string()]);
        let resolved = results[0].clone().expect("localhost");
        assert!(
            resolved.ips.contains(&IpAddr::from([127, 0, 0, 1])),
            "{resolved:?}"
        );
    }
}
