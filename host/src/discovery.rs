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
//! `kind = "file"` polls the file's modification time, size and inode every
//! `refresh_interval_ms` and re-reads it when any changed (an editor's or
//! `mv`'s atomic replace changes the inode), like Prometheus `file_sd`'s
//! periodic refresh.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use crate::config::{Config, DiscoveryConfig, HealthCheckConfig, read_backend_file};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

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

    fn alive(&self) -> bool {
        self.upstream.strong_count() > 0
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
    let mut seen = stamp(&path).ok();
    let mut last_error: Option<String> = None;
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
                if last_error.take().is_some() {
                    tracing::info!(upstream = &*target.name, file = %path.display(), "discovery: backend list good again");
                }
                if !target.apply(&list) {
                    return;
                }
            }
            Err(reason) => {
                // Read again when it changes (a half-written file will).
                seen = now;
                if last_error.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(
                        upstream = &*target.name,
                        "discovery: {reason}; keeping the last good backend set"
                    );
                    last_error = Some(reason);
                }
            }
        }
    }
}
