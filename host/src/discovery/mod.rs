//! Discovery sources at run time: each upstream with
//! `[upstream.NAME.discovery]` gets a task that follows its source and
//! applies every good new set with [`Upstream::replace_backends`]; joined
//! backends get health checks like configured ones.
//!
//! A source that fails or turns bad (unreadable file, malformed JSON, a bad
//! address) keeps the last good set and logs the reason once per distinct
//! reason, with the file, line and column. The set read at config load is
//! the first good set.
//!
//! Backends written as `name:port` are resolved again when their answer's
//! TTL runs out, the wait clamped to `[dns_min_ttl_ms, dns_max_ttl_ms]`
//! (as NGINX's `resolver ... valid=` and HAProxy's `hold valid` bound it);
//! a failed lookup keeps that name's last addresses and is tried again
//! after `dns_min_ttl_ms`.
//!
//! `kind = "file"` polls the file's modification time, size and inode every
//! `refresh_interval_ms` and re-reads it when any changed (an editor's or
//! `mv`'s atomic replace changes the inode), like Prometheus `file_sd`'s
//! periodic refresh.
//!
//! `kind = "etcd"` reads every entry under its prefix, then follows a watch
//! from the revision read (see [`etcd`]); a failed connection or watch keeps
//! the last good set and starts over with a full read.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{
    BackendSpec, Config, DiscoveryConfig, DnsConfig, HealthCheckConfig, expand_specs,
    read_backend_file,
};
use crate::dns::DnsResolver;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

mod etcd;

/// Start the discovery task of each of `upstreams` that has a source. Must
/// run inside a tokio runtime; each task ends when its upstream is dropped
/// (a reload built a new one, which gets its own task).
pub fn start<'a>(
    upstreams: impl IntoIterator<Item = &'a Arc<Upstream>>,
    metrics: &Arc<Metrics>,
    config: &Config,
) {
    for upstream in upstreams {
        let Some(source) = upstream.discovery().cloned() else {
            continue;
        };
        let hc = config
            .upstreams
            .get(upstream.name())
            .and_then(|u| u.health_check.clone());
        let target = Target {
            name: upstream.shared_name().clone(),
            upstream: Arc::downgrade(upstream),
            metrics: metrics.clone(),
            health_check: hc,
        };
        match source {
            DiscoveryConfig::File {
                path,
                refresh_interval_ms,
            } => {
                tokio::spawn(file_loop(
                    target,
                    path,
                    Duration::from_millis(refresh_interval_ms),
                ));
            }
            DiscoveryConfig::DnsSrv { name, dns } => {
                tokio::spawn(srv_loop(target, name, dns));
            }
            DiscoveryConfig::Dns { specs, dns } => {
                tokio::spawn(dns_loop(target, specs, dns));
            }
            DiscoveryConfig::Etcd { endpoints, prefix } => {
                tokio::spawn(etcd::follow(target, endpoints, prefix));
            }
        }
    }
}

/// Where a source's sets go.
struct Target {
    name: Arc<str>,
    upstream: Weak<Upstream>,
    metrics: Arc<Metrics>,
    health_check: Option<HealthCheckConfig>,
}

impl Target {
    /// Apply `list`; false once the upstream is gone.
    fn apply(&self, list: &[crate::config::BackendConfig]) -> bool {
        let Some(upstream) = self.upstream.upgrade() else {
            return false;
        };
        let change = upstream.replace_backends(list, &self.metrics);
        if let Some(hc) = &self.health_check
            && !change.added.is_empty()
        {
            crate::health::watch(&upstream, &change.added, hc, &self.metrics);
        }
        true
    }

    /// A resolver for this source's lookups; `None` (logged) when it
    /// cannot be set up, and the set found at load stays.
    fn resolver(&self, dns: &DnsConfig) -> Option<DnsResolver> {
        DnsResolver::new(&dns.nameservers)
            .inspect_err(|e| {
                tracing::error!(
                    upstream = &*self.name,
                    "discovery: {e}; the backends found at load stay"
                );
            })
            .ok()
    }

    fn alive(&self) -> bool {
        self.upstream.strong_count() > 0
    }
}

/// A source's current failure, so each distinct reason is logged once
/// (and the recovery once), however often the source is asked again.
#[derive(Debug, Default)]
struct Failing(Option<String>);

impl Failing {
    /// Record `reason`; true if it differs from the current one (log it).
    fn failed(&mut self, reason: String) -> bool {
        if self.0.as_deref() == Some(reason.as_str()) {
            return false;
        }
        self.0 = Some(reason);
        true
    }

    /// Record a success; true if the source was failing (log that).
    fn recovered(&mut self) -> bool {
        self.0.take().is_some()
    }
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

async fn file_loop(target: Target, path: std::path::PathBuf, every: Duration) {
    // Nothing seen yet: the first tick reads the file, so a change made
    // between the config load and this task's start is not missed (an
    // unchanged file then changes nothing).
    let mut seen: Option<Stamp> = None;
    let mut failing = Failing::default();
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if !target.alive() {
            return;
        }
        let now = stamp(&path).ok();
        if now.is_some() && now == seen {
            continue;
        }
        let read = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_backend_file(&path)).await
        };
        let result = read.unwrap_or_else(|e| Err(format!("{}: {e}", path.display())));
        match result {
            Ok(list) => {
                seen = now;
                if failing.recovered() {
                    tracing::info!(upstream = &*target.name, file = %path.display(), "discovery: backend list good again");
                }
                if !target.apply(&list) {
                    return;
                }
            }
            Err(reason) => {
                // Read again when it changes (a half-written file will).
                seen = now;
                if failing.failed(reason.clone()) {
                    tracing::warn!(
                        upstream = &*target.name,
                        "discovery: {reason}; keeping the last good backend set"
                    );
                }
            }
        }
    }
}

/// When a `name:port` entry of [`dns_loop`] is looked up next, and why it
/// last failed.
struct NameState {
    due: Instant,
    failing: Failing,
}

/// `ttl` clamped to `bounds` (min, max).
fn clamp_ttl(ttl: Duration, bounds: (Duration, Duration)) -> Duration {
    ttl.clamp(bounds.0, bounds.1)
}

/// How long until an answer valid until `valid_until` is asked for again:
/// its remaining TTL, within `dns`'s bounds.
fn wait_after(valid_until: std::time::Instant, dns: &DnsConfig) -> Duration {
    let ttl = valid_until.saturating_duration_since(std::time::Instant::now());
    clamp_ttl(
        ttl,
        (retry_after(dns), Duration::from_millis(dns.max_ttl_ms)),
    )
}

/// How long until a failed lookup is tried again: `dns_min_ttl_ms`.
fn retry_after(dns: &DnsConfig) -> Duration {
    Duration::from_millis(dns.min_ttl_ms)
}

async fn dns_loop(target: Target, mut specs: Vec<BackendSpec>, dns: DnsConfig) {
    let Some(resolver) = target.resolver(&dns) else {
        return;
    };
    // The first answers came with the config (in `specs`); ask again after
    // the shortest wait, which learns their TTL.
    let start = Instant::now() + retry_after(&dns);
    let mut names: Vec<Option<NameState>> = specs
        .iter()
        .map(|s| {
            matches!(s, BackendSpec::Name { .. }).then(|| NameState {
                due: start,
                failing: Failing::default(),
            })
        })
        .collect();
    loop {
        let Some(next) = names.iter().flatten().map(|n| n.due).min() else {
            return;
        };
        tokio::time::sleep_until(next).await;
        if !target.alive() {
            return;
        }
        let now = Instant::now();
        let mut changed = false;
        for (spec, state) in specs.iter_mut().zip(names.iter_mut()) {
            let (BackendSpec::Name { host, resolved, .. }, Some(state)) = (spec, state.as_mut())
            else {
                continue;
            };
            if state.due > now {
                continue;
            }
            match resolver.lookup(host).await {
                Ok(answer) => {
                    state.due = Instant::now() + wait_after(answer.valid_until, &dns);
                    if state.failing.recovered() {
                        tracing::info!(upstream = &*target.name, name = %host, "discovery: the name resolves again");
                    }
                    if answer.ips != *resolved {
                        *resolved = answer.ips;
                        changed = true;
                    }
                }
                Err(e) => {
                    state.due = Instant::now() + retry_after(&dns);
                    let reason = e.to_string();
                    if state.failing.failed(reason.clone()) {
                        tracing::warn!(
                            upstream = &*target.name,
                            name = %host,
                            "discovery: cannot resolve: {reason}; keeping its last addresses"
                        );
                    }
                }
            }
        }
        if changed && !target.apply(&expand_specs(&specs)) {
            return;
        }
    }
}

async fn srv_loop(target: Target, name: String, dns: DnsConfig) {
    let Some(resolver) = target.resolver(&dns) else {
        return;
    };
    let mut failing = Failing::default();
    let mut wait = retry_after(&dns);
    loop {
        tokio::time::sleep(wait).await;
        if !target.alive() {
            return;
        }
        match resolver.lookup_srv(&name).await {
            Ok(answer) => {
                wait = wait_after(answer.valid_until, &dns);
                if failing.recovered() {
                    tracing::info!(upstream = &*target.name, name = %name, "discovery: SRV resolves again");
                }
                if !target.apply(&crate::config::srv_backends(&answer)) {
                    return;
                }
            }
            Err(e) => {
                wait = retry_after(&dns);
                let reason = e.to_string();
                if failing.failed(reason.clone()) {
                    tracing::warn!(
                        upstream = &*target.name,
                        name = %name,
                        "discovery: cannot resolve SRV: {reason}; keeping the last good backend set"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_bounded() {
        let bounds = (Duration::from_millis(1000), Duration::from_millis(300_000));
        assert_eq!(clamp_ttl(Duration::ZERO, bounds), bounds.0);
        assert_eq!(
            clamp_ttl(Duration::from_secs(30), bounds),
            Duration::from_secs(30)
        );
        assert_eq!(clamp_ttl(Duration::from_secs(86_400), bounds), bounds.1);
    }
}
