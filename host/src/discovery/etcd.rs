//! `kind = "etcd"`: read every entry under the prefix, then watch it from
//! the revision read, applying each change; on any failure (etcd down, the
//! watch cancelled or compacted past), keep the last good set and start
//! over with a full read after a backoff (250 ms doubling to 5 s), as
//! Kubernetes informers re-list after a broken watch.

use std::time::Duration;

use etcd_client::EventType;

use super::{Failing, Target};
use crate::etcd::{Entries, EtcdError, connect, read_and_watch};

/// First wait before reconnecting after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a quiet watch checks that its upstream still exists.
const ALIVE_CHECK: Duration = Duration::from_secs(1);

/// Follow `prefix` on `endpoints` for `target` until its upstream is gone.
pub(super) async fn follow(target: Target, endpoints: Vec<String>, prefix: String) {
    let mut entries = Entries::new(&prefix);
    let mut failing = Failing::default();
    let mut backoff = BACKOFF_MIN;
    while target.alive() {
        match watch_once(&target, &endpoints, &prefix, &mut entries, &mut failing).await {
            Ok(()) => return,
            Err(e) => {
                if failing.failed(e.message.clone()) {
                    tracing::warn!(
                        upstream = &*target.name,
                        "discovery: {e}; keeping the last good backend set"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        if failing.0.is_none() {
            backoff = BACKOFF_MIN;
        }
    }
}

/// One connection: a full read, then the watch. `Ok` once the upstream is
/// gone; `Err` when etcd fails (the caller retries).
async fn watch_once(
    target: &Target,
    endpoints: &[String],
    prefix: &str,
    entries: &mut Entries,
    failing: &mut Failing,
) -> Result<(), EtcdError> {
    let fail = |e: etcd_client::Error| EtcdError::new(endpoints, e);
    let mut client = connect(endpoints).await?;
    let (kvs, mut stream) = read_and_watch(&mut client, endpoints, prefix).await?;
    entries.clear();
    for (key, value) in &kvs {
        if let Err(reason) = entries.put(key, value) {
            skipped(target, &reason);
        }
    }
    if failing.recovered() {
        tracing::info!(upstream = &*target.name, "discovery: etcd reachable again");
    }
    if !apply(target, entries) {
        return Ok(());
    }
    let mut alive = tokio::time::interval(ALIVE_CHECK);
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(fail)?,
            _ = alive.tick() => {
                if !target.alive() {
                    // Dropping the stream ends the watch on the server.
                    return Ok(());
                }
                continue;
            }
        };
        let Some(response) = message else {
            return Err(EtcdError::new(endpoints, "the watch stream ended"));
        };
        if response.canceled() {
            return Err(EtcdError::new(
                endpoints,
                format!(
                    "the watch was cancelled ({}; compacted at revision {})",
                    response.cancel_reason(),
                    response.compact_revision()
                ),
            ));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => {
                    if let Err(reason) = entries.put(kv.key(), kv.value()) {
                        skipped(target, &reason);
                    }
                }
                EventType::Delete => entries.delete(kv.key()),
            }
        }
        if !response.events().is_empty() && !apply(target, entries) {
            return Ok(());
        }
    }
}

/// Apply the entries' set (the plugin hears of it only if it changed);
/// false once the upstream is gone.
fn apply(target: &Target, entries: &Entries) -> bool {
    let (set, duplicates) = entries.backends();
    for reason in duplicates {
        skipped(target, &reason);
    }
    target.apply(&set)
}

fn skipped(target: &Target, reason: &str) {
    tracing::warn!(
        upstream = &*target.name,
        "discovery: etcd entry skipped, the rest unchanged: {reason}"
    );
}
