//! Changing an upstream's backend set while it serves: discovery sources
//! and the admin API's add and remove (HAProxy `add server` / `del server`).
//!
//! A backend that stays keeps its live state (counters, health, ejection,
//! drain); a backend that joins starts fresh, in slow start when
//! `slow_start_ms` is set; a backend that leaves is gone from the next
//! decision, while requests already on it finish (they hold its state).
//! The plugin hears of a change through `set-backends`, and only when the
//! set (addresses, weights, labels, configured state) really changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{Backend, BackendLive, Upstream};
use crate::config::BackendConfig;
use crate::metrics::Metrics;

/// What [`Upstream::replace_backends`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSetChange {
    /// Backends that joined, in list order.
    pub added: Vec<SocketAddr>,
    /// Backends that left.
    pub removed: Vec<SocketAddr>,
    /// Backends that stayed with a new weight, labels or configured state.
    pub updated: Vec<SocketAddr>,
}

impl BackendSetChange {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}

impl Upstream {
    /// The current backends as config entries (address, configured weight,
    /// labels, configured state), in id order.
    pub fn backend_configs(&self) -> Vec<BackendConfig> {
        configs_of(&self.lock().backends)
    }

    /// The backend named by `key` in admin requests: its id, or its address
    /// (`IP:port`); `None` if the upstream has no such backend.
    pub fn find_backend(&self, key: &str) -> Option<Backend> {
        let slot = self.lock();
        match key.parse::<usize>() {
            Ok(id) => slot.backends.get(id).cloned(),
            Err(_) => {
                let address = key.parse::<SocketAddr>().ok()?;
                slot.backends.iter().find(|b| b.address == address).cloned()
            }
        }
    }

    /// Make `list` the backend set (its order gives the ids). `metrics`
    /// registers the counters of backends that join. Returns what changed;
    /// when nothing did, the plugin is not called.
    pub fn replace_backends(&self, list: &[BackendConfig], metrics: &Metrics) -> BackendSetChange {
        let mut slot = self.lock();
        self.replace_in(&mut slot, list, metrics)
    }

    /// Edit the backend set in place: `edit` gets the current entries (see
    /// [`Upstream::backend_configs`]) under the upstream's lock, so edits
    /// from several admin requests never lose one another.
    ///
    /// # Errors
    /// Whatever `edit` returns; the set is then unchanged.
    pub fn edit_backends<E>(
        &self,
        metrics: &Metrics,
        edit: impl FnOnce(&mut Vec<BackendConfig>) -> Result<(), E>,
    ) -> Result<BackendSetChange, E> {
        let mut slot = self.lock();
        let mut list = configs_of(&slot.backends);
        edit(&mut list)?;
        Ok(self.replace_in(&mut slot, &list, metrics))
    }

    fn replace_in(
        &self,
        slot: &mut super::Slot,
        list: &[BackendConfig],
        metrics: &Metrics,
    ) -> BackendSetChange {
        let old: HashMap<SocketAddr, &Backend> =
            slot.backends.iter().map(|b| (b.address, b)).collect();
        let mut change = BackendSetChange::default();
        for b in list {
            match old.get(&b.address) {
                None => change.added.push(b.address),
                Some(o)
                    if o.configured_weight != b.weight
                        || o.labels != b.labels
                        || o.live.configured_state() != b.state =>
                {
                    change.updated.push(b.address);
                }
                Some(_) => {}
            }
        }
        let kept: std::collections::HashSet<SocketAddr> = list.iter().map(|b| b.address).collect();
        change.removed = slot
            .backends
            .iter()
            .map(|b| b.address)
            .filter(|a| !kept.contains(a))
            .collect();
        let same_order = slot.backends.len() == list.len()
            && slot
                .backends
                .iter()
                .zip(list)
                .all(|(o, n)| o.address == n.address);
        if change.is_empty() && same_order {
            return change;
        }
        let now = Instant::now();
        slot.backends = backends_of(
            &self.name,
            list,
            |a| old.get(a).map(|o| o.live.clone()),
            metrics,
            (!self.slow_start.is_zero()).then_some(now),
        );
        // The set changed even if no flag or weight did: always tell the plugin.
        self.refresh_forced(slot, now);
        tracing::info!(
            upstream = &*self.name,
            added = ?change.added,
            removed = ?change.removed,
            updated = ?change.updated,
            "backend set changed"
        );
        change
    }
}

/// The backends of `list` for upstream `name`: a backend `kept` knows
/// keeps its live state, with the entry's configured state applied if it
/// changed; a new one gets fresh state registered in `metrics`, and ramps
/// up from `ramp_from` when given (slow start).
pub(super) fn backends_of(
    name: &str,
    list: &[BackendConfig],
    kept: impl Fn(&SocketAddr) -> Option<Arc<BackendLive>>,
    metrics: &Metrics,
    ramp_from: Option<Instant>,
) -> Arc<[Backend]> {
    list.iter()
        .map(|b| {
            let kept = kept(&b.address);
            let is_new = kept.is_none();
            let live = kept.unwrap_or_else(|| {
                Arc::new(BackendLive::new(
                    metrics.backend(name, &b.address.to_string()),
                ))
            });
            live.apply_configured_state(b.state, is_new);
            if is_new && ramp_from.is_some() {
                live.update_status(|s| s.ramp_from = ramp_from);
            }
            Backend::new(b.address, b.weight, b.labels.clone(), live)
        })
        .collect()
}

fn configs_of(backends: &[Backend]) -> Vec<BackendConfig> {
    backends
        .iter()
        .map(|b| BackendConfig {
            address: b.address,
            weight: b.configured_weight,
            labels: b.labels.clone(),
            state: b.live.configured_state(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PluginRef, UpstreamConfig};
    use crate::plugin::{RequestView, Runtime};
    use crate::upstream::Selection;
    use std::sync::atomic::Ordering;

    fn entry(port: u16) -> BackendConfig {
        BackendConfig::new(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn pick(up: &Upstream) -> SocketAddr {
        let (parts, ()) = http::Request::new(()).into_parts();
        let request = RequestView::new(parts, SocketAddr::from(([127, 0, 0, 1], 5555)));
        match up.select(request, &[]).0 {
            Selection::Plugin { chosen, .. } => chosen.address,
            other => panic!("no backend: {other:?}"),
        }
    }

    #[test]
    fn the_plugin_hears_only_of_real_changes_and_kept_backends_keep_their_state() {
        let rt = Runtime::new().unwrap();
        let metrics = Metrics::new();
        let config = UpstreamConfig::new(
            PluginRef::Builtin("round-robin".into()),
            vec![entry(9001), entry(9002), entry(9003)],
        );
        let up = Upstream::new("app", &config, &rt, &metrics).unwrap();
        assert_eq!(pick(&up).port(), 9001);
        // The same set: no set-backends, so the rotation goes on.
        let same = up.replace_backends(&up.backend_configs(), &metrics);
        assert!(same.is_empty(), "{same:?}");
        assert_eq!(pick(&up).port(), 9002);

        let kept = up.backends()[1].live.clone();
        kept.requests.fetch_add(7, Ordering::Relaxed);
        let mut heavier = entry(9002);
        heavier.weight = 5;
        let change = up.replace_backends(&[heavier, entry(9004)], &metrics);
        assert_eq!(change.added, [SocketAddr::from(([127, 0, 0, 1], 9004))]);
        assert_eq!(change.removed.len(), 2);
        assert_eq!(change.updated, [SocketAddr::from(([127, 0, 0, 1], 9002))]);
        let now = up.backends();
        assert!(
            Arc::ptr_eq(&now[0].live, &kept),
            "a kept backend keeps its state"
        );
        assert_eq!(now[0].configured_weight, 5);
        assert_eq!(up.backend_configs().len(), 2);
        let picked: std::collections::HashSet<u16> = (0..12).map(|_| pick(&up).port()).collect();
        assert_eq!(picked, [9002, 9004].into(), "only the new set is chosen");
    }

    #[test]
    fn edits_that_fail_change_nothing() {
        let rt = Runtime::new().unwrap();
        let metrics = Metrics::new();
        let config =
            UpstreamConfig::new(PluginRef::Builtin("round-robin".into()), vec![entry(9001)]);
        let up = Upstream::new("app", &config, &rt, &metrics).unwrap();
        let err = up.edit_backends(&metrics, |list| {
            list.clear();
            Err("refused")
        });
        assert_eq!(err, Err("refused"));
        assert_eq!(up.backend_configs().len(), 1);
    }
}
