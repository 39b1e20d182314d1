//! Which backends a plugin is offered: admin state, health checks, ejection
//! and connect failures, Envoy's panic threshold, and slow start.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::backend::{Backend, ramp_percent};
use crate::config::AdminState;

/// Which backends the plugin may choose, and with which weights, at `now`.
///
/// A backend is available when its admin state is `ready`, its health checks
/// pass, it is not ejected and connect failures have not made it
/// unreachable. When fewer than `panic_threshold_percent` of the ready
/// backends are available, every ready backend that is not unreachable is
/// offered (Envoy's panic threshold: better to spread load over possibly bad
/// backends than to overload the few left or fail); a backend that refuses
/// connections is pointless to offer, unless every ready backend does. A backend that becomes available again
/// (not in panic mode) starts a slow-start ramp of `slow_start`; while any
/// backend ramps, every weight is the configured weight times its ramp
/// percentage (100 when not ramping), so integer weights can express 10 %.
///
/// Stores each backend's `healthy` flag. Returns the backend set with the
/// new weights (the same `Arc` if no weight changed), whether any flag or
/// weight changed, and whether the upstream is in panic mode.
pub fn evaluate_backends(
    backends: &Arc<[Backend]>,
    now: Instant,
    panic_threshold_percent: u32,
    slow_start: Duration,
) -> (Arc<[Backend]>, bool, bool) {
    let ready: Vec<bool> = backends
        .iter()
        .map(|b| b.live.admin_state() == AdminState::Ready)
        .collect();
    let reachable: Vec<bool> = backends
        .iter()
        .zip(&ready)
        .map(|(b, &r)| r && !b.live.unreachable(now))
        .collect();
    let up: Vec<bool> = backends
        .iter()
        .zip(&reachable)
        .map(|(b, &r)| r && b.live.check_passing.load(Ordering::Relaxed) && !b.live.ejected(now))
        .collect();
    let n_ready = ready.iter().filter(|&&r| r).count();
    let n_up = up.iter().filter(|&&u| u).count();
    let panic = panic_threshold_percent > 0
        && n_ready > 0
        && n_up * 100 < panic_threshold_percent as usize * n_ready;
    // In panic mode: the ready backends that accept connections, or every
    // ready backend if none does.
    let offered = if reachable.contains(&true) {
        &reachable
    } else {
        &ready
    };
    let mut changed = false;
    let mut percents = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        let selectable = if panic { offered[i] } else { up[i] };
        let was = b.live.healthy.swap(selectable, Ordering::Relaxed);
        changed |= was != selectable;
        let pct = b.live.update_status(|s| {
            if !selectable {
                s.ramp_from = None;
            } else if !was && !panic && !slow_start.is_zero() {
                s.ramp_from = Some(now);
            }
            let pct = s
                .ramp_from
                .map_or(100, |t| ramp_percent(now.duration_since(t), slow_start));
            if pct >= 100 {
                s.ramp_from = None;
            }
            pct
        });
        percents.push(pct);
    }
    let ramping = percents.iter().any(|&p| p < 100);
    let weight = |b: &Backend, pct: u32| {
        if ramping {
            b.configured_weight.saturating_mul(pct).max(1)
        } else {
            b.configured_weight
        }
    };
    let reweighted = backends
        .iter()
        .zip(&percents)
        .any(|(b, &p)| weight(b, p) != b.weight);
    if !reweighted {
        return (backends.clone(), changed, panic);
    }
    let new: Arc<[Backend]> = backends
        .iter()
        .zip(&percents)
        .map(|(b, &p)| Backend {
            weight: weight(b, p),
            ..b.clone()
        })
        .collect();
    (new, true, panic)
}
