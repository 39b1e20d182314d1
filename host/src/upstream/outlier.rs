//! Passive health: outlier ejection after consecutive 5xx (Envoy
//! `outlier_detection`) and connect failures (NGINX `max_fails` /
//! `fail_timeout`), fed by every attempt's outcome.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Upstream;
use crate::backend::Target;

impl Upstream {
    /// Record the outcome of an attempt on `chosen` for outlier detection
    /// (`ok` false: a 5xx response, a connect failure or a timeout). After
    /// `consecutive_5xx` failures in a row the backend is ejected, unless
    /// `max_ejection_percent` of the backends already are (one may always
    /// be). Without `outlier_detection` this does nothing. Lock-free unless
    /// the threshold is reached.
    pub fn report(&self, chosen: &Target, ok: bool) {
        let Some(od) = &self.outlier else { return };
        if chosen.live.record(ok) < od.consecutive_5xx {
            return;
        }
        let mut slot = self.lock();
        let now = Instant::now();
        let Some(backend) = slot
            .backends
            .iter()
            .find(|b| Arc::ptr_eq(&b.live, &chosen.live))
        else {
            return;
        };
        let counters = backend.live.clone();
        counters.consecutive_failures.store(0, Ordering::Relaxed);
        if counters.ejected(now) {
            return;
        }
        let ejected = slot.backends.iter().filter(|b| b.live.ejected(now)).count();
        let cap = (slot.backends.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            // Once per cap reached, then at debug: a second dead backend
            // fails every request sent to it, and this must not flood.
            self.metrics.ejections_skipped.inc();
            if let Some(suppressed) = self.logs.not_ejected.admit() {
                tracing::debug!(
                    upstream = &*self.name,
                    backend = %chosen.address,
                    suppressed,
                    "outlier not ejected: {ejected} of {} backends already are (max_ejection_percent = {})",
                    slot.backends.len(),
                    od.max_ejection_percent
                );
            }
            return;
        }
        let max = Duration::from_millis(od.max_ejection_time_ms);
        let time = counters.update_status(|s| {
            if s.returned_at.is_some_and(|t| now.duration_since(t) > max) {
                s.ejections = 0;
            }
            s.ejections = s.ejections.saturating_add(1);
            let time = Duration::from_millis(od.base_ejection_time_ms)
                .saturating_mul(s.ejections)
                .min(max);
            s.ejected_until = Some(now + time);
            time
        });
        self.metrics.ejections.inc();
        tracing::warn!(
            upstream = &*self.name,
            backend = %chosen.address,
            "outlier ejected for {} ms after {} failures in a row",
            time.as_millis(),
            od.consecutive_5xx
        );
        self.refresh(&mut slot, now);
    }

    /// Record a failed connect to `chosen` (refused, or not connected within
    /// `connect_timeout_ms`): nothing was sent. After `max_fails` in a row the
    /// backend leaves rotation for `fail_timeout_ms`, whatever share of the
    /// backends already has (NGINX `max_fails` / `fail_timeout`, on by
    /// default; `max_fails = 0` turns it off). It also counts for outlier
    /// detection, if configured. Lock-free below the threshold.
    pub fn report_connect_failure(&self, chosen: &Target) {
        self.report(chosen, false);
        if self.max_fails == 0 || chosen.live.record_connect(false) < self.max_fails {
            return;
        }
        let mut slot = self.lock();
        let now = Instant::now();
        let until = now + self.fail_timeout;
        let newly = chosen.live.update_status(|s| {
            let newly = s.unreachable_until.is_none_or(|t| t <= now);
            s.unreachable_until = Some(until);
            newly
        });
        chosen.live.connect_failures.store(0, Ordering::Relaxed);
        if newly {
            tracing::warn!(
                upstream = &*self.name,
                backend = %chosen.address,
                "backend unreachable: out of rotation for {} ms after {} connect failures in a row",
                self.fail_timeout.as_millis(),
                self.max_fails
            );
        }
        self.refresh(&mut slot, now);
    }

    /// Record that `chosen` answered (any response): its connect-failure
    /// streak restarts. One relaxed load when there is none.
    pub fn report_connected(&self, chosen: &Target) {
        chosen.live.record_connect(true);
    }
}
