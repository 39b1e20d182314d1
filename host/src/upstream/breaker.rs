//! The plugin's circuit breaker and its failure counters (see the parent
//! module's docs for the policy).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::plugin_call::FailureKind;

/// How long the plugin's circuit breaker stays open after the first failure.
pub const BREAKER_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest the breaker stays open (the backoff doubles up to this).
pub const BREAKER_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A failure after this long without one starts the backoff over.
pub const BREAKER_QUIET_PERIOD: Duration = Duration::from_secs(60);

/// The plugin's circuit breaker (see the module docs).
#[derive(Debug)]
pub(super) struct Breaker {
    /// While set and in the future, the plugin is not called.
    pub(super) open_until: Option<Instant>,
    /// How long the next trip keeps it open.
    next_backoff: Duration,
    last_failure: Option<Instant>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open_until: None,
            next_backoff: BREAKER_INITIAL_BACKOFF,
            last_failure: None,
        }
    }
}

impl Breaker {
    /// Open after a failure at `now`; returns how long it stays open.
    pub(super) fn trip(&mut self, now: Instant) -> Duration {
        if self
            .last_failure
            .is_some_and(|t| now.duration_since(t) >= BREAKER_QUIET_PERIOD)
        {
            self.next_backoff = BREAKER_INITIAL_BACKOFF;
        }
        let wait = self.next_backoff;
        self.open_until = Some(now + wait);
        self.next_backoff = (wait * 2).min(BREAKER_MAX_BACKOFF);
        self.last_failure = Some(now);
        wait
    }

    pub(super) fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }
}

/// Consecutive failed calls after which a plugin is reported as failing.
pub const FAILING_AFTER: u64 = 5;

/// Counters of plugin failures and fallbacks for one upstream.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// `select` calls made (each request's decision that reached the
    /// plugin, failed or not).
    pub calls: AtomicU64,
    /// `select` calls that trapped.
    pub traps: AtomicU64,
    /// `select` calls cut at their deadline.
    pub deadlines: AtomicU64,
    /// Answers naming an unknown backend (or an empty candidate list).
    pub bad_answers: AtomicU64,
    /// Requests decided by the native round-robin fallback.
    pub fallbacks: AtomicU64,
    /// Instances replaced after a failure (each replacement is a half-open
    /// probe of the circuit breaker).
    pub replacements: AtomicU64,
    /// Requests decided without calling the plugin: its circuit breaker was
    /// open.
    pub skipped: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_trips: AtomicU64,
    /// Failed calls since the last successful one; at [`FAILING_AFTER`] the
    /// plugin is reported as failing.
    pub consecutive_failures: AtomicU64,
}

impl PluginStats {
    /// The counter for `kind`.
    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.counter(kind).load(Ordering::Relaxed)
    }

    /// Failed calls of every kind (trap, deadline, bad answer).
    pub fn failures_total(&self) -> u64 {
        self.traps.load(Ordering::Relaxed)
            + self.deadlines.load(Ordering::Relaxed)
            + self.bad_answers.load(Ordering::Relaxed)
    }

    /// True when the last [`FAILING_AFTER`] calls all failed.
    pub fn failing(&self) -> bool {
        self.consecutive_failures.load(Ordering::Relaxed) >= FAILING_AFTER
    }

    pub(super) fn counter(&self, kind: FailureKind) -> &AtomicU64 {
        match kind {
            FailureKind::Trap => &self.traps,
            FailureKind::Deadline => &self.deadlines,
            FailureKind::BadAnswer => &self.bad_answers,
        }
    }
}
