//! The periodic upkeep of an upstream: end ejections and unreachable
//! periods, step slow starts, report drained backends, and offer the plugin
//! the backend set that results. [`start`] runs it every [`TICK`] for each
//! upstream; the loop holds a weak reference and ends when a reload or
//! shutdown drops the upstream.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Slot, Upstream, evaluate_backends};
use crate::config::AdminState;

/// Period of [`Upstream::tick`]: the resolution of ejection ends, slow-start
/// steps and drain reports.
pub const TICK: Duration = Duration::from_millis(100);

impl Upstream {
    /// Periodic upkeep (every [`TICK`]): end expired ejections and
    /// unreachable periods, advance slow starts, and report drained backends.
    pub fn tick(&self) {
        let mut slot = self.lock();
        let now = Instant::now();
        for b in slot.backends.iter() {
            let drained = b.live.admin_state() == AdminState::Drain
                && b.live.in_flight.load(Ordering::Relaxed) == 0;
            let (readmitted, retrying, report_drained) = b.live.update_status(|s| {
                let readmitted = s.ejected_until.is_some_and(|t| t <= now);
                if readmitted {
                    s.ejected_until = None;
                    s.returned_at = Some(now);
                }
                let retrying = s.unreachable_until.is_some_and(|t| t <= now);
                if retrying {
                    s.unreachable_until = None;
                }
                let report = drained && !s.drained_reported;
                s.drained_reported |= report;
                (readmitted, retrying, report)
            });
            if retrying {
                tracing::info!(upstream = &*self.name, backend = %b.address, "fail_timeout_ms passed: the unreachable backend is tried again");
            }
            if readmitted {
                b.live.consecutive_failures.store(0, Ordering::Relaxed);
                tracing::info!(upstream = &*self.name, backend = %b.address, "ejection ended, backend readmitted");
            }
            if report_drained {
                tracing::info!(upstream = &*self.name, backend = %b.address, "backend drained: no request in flight");
            }
        }
        self.refresh(&mut slot, now);
    }

    /// Re-evaluate which backends the plugin may choose and their effective
    /// weights (see [`evaluate_backends`]); when anything changed, hand the
    /// plugin the new set through `set-backends` (under the lock, so no
    /// decision sees a half-applied change). A plugin that traps on it is
    /// replaced.
    pub(super) fn refresh(&self, slot: &mut Slot, now: Instant) {
        self.refresh_inner(slot, now, false);
    }

    /// As [`Upstream::refresh`], and the plugin gets `set-backends` even
    /// if no flag or weight changed (the set itself did).
    pub(super) fn refresh_forced(&self, slot: &mut Slot, now: Instant) {
        self.refresh_inner(slot, now, true);
    }

    fn refresh_inner(&self, slot: &mut Slot, now: Instant, force: bool) {
        let (backends, changed, panic) = evaluate_backends(
            &slot.backends,
            now,
            self.panic_threshold_percent,
            self.slow_start,
        );
        if panic != slot.panic {
            slot.panic = panic;
            if panic {
                tracing::warn!(
                    upstream = &*self.name,
                    "panic mode: fewer than {} % of the backends are available; offering all ready backends",
                    self.panic_threshold_percent
                );
            } else {
                tracing::info!(upstream = &*self.name, "panic mode ended");
            }
        }
        if !changed && !force {
            return;
        }
        slot.backends = backends.clone();
        if let Some(instance) = slot.instance.as_mut()
            && let Err(e) = instance.set_backends(backends)
        {
            self.trip(slot, "set-backends", &e);
        }
    }
}

/// Start the upkeep loop of each of `upstreams` (calls [`Upstream::tick`]
/// every [`TICK`]). Must run inside a tokio runtime.
pub fn start<'a>(upstreams: impl IntoIterator<Item = &'a Arc<Upstream>>) {
    for upstream in upstreams {
        tokio::spawn(upkeep_loop(Arc::downgrade(upstream)));
    }
}

async fn upkeep_loop(upstream: Weak<Upstream>) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(up) = upstream.upgrade() else { return };
        up.tick();
    }
}
