//! Rate limits for log lines on per-request paths, so that no fault (a
//! trapping plugin, a full descriptor table, a dead backend under load) can
//! write more than a few lines per second per cause.
//!
//! Each cause owns a [`LogLimiter`]: at most [`LINES_PER_WINDOW`] lines per
//! [`WINDOW`]; the rest are counted, and the first line admitted in a later
//! window carries that count (`suppressed = n`), as NGINX's
//! `limit_req_log_level` and Envoy's `ENVOY_LOG_PERIODIC` keep logs readable
//! under floods.
//!
//! ```
//! use wasmlb::log_limit::LogLimiter;
//! static ACCEPT: LogLimiter = LogLimiter::new();
//! if let Some(suppressed) = ACCEPT.admit() {
//!     tracing::warn!(suppressed, "accept failed");
//! }
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines admitted per cause per [`WINDOW`].
pub const LINES_PER_WINDOW: u32 = 3;
/// The rate-limit window.
pub const WINDOW: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Admits at most [`LINES_PER_WINDOW`] lines per [`WINDOW`] for one cause.
/// Lock-free; `const`-constructible for statics.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// Start of the current window, in ms since the process's first log
    /// decision, plus 1 (0: no window yet).
    window: AtomicU64,
    admitted: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter with no line logged yet.
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            admitted: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, with `n` the lines of this
    /// cause suppressed since the last admitted one (log it with the line);
    /// `None` if this line must be dropped (it is counted).
    pub fn admit(&self) -> Option<u64> {
        let now = now_ms() + 1;
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        let start = self.window.load(Ordering::Relaxed);
        if start == 0 || now.saturating_sub(start) >= window_ms {
            // A new window: one caller wins the reset.
            if self
                .window
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.admitted.store(1, Ordering::Relaxed);
                return Some(self.suppressed.swap(0, Ordering::Relaxed));
            }
        }
        if self.admitted.fetch_add(1, Ordering::Relaxed) < LINES_PER_WINDOW {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Lines dropped since the last admitted one.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_few_lines_and_the_rest_is_counted() {
        let limiter = LogLimiter::new();
        let (mut admitted, mut reported) = (0u64, 0u64);
        for _ in 0..10_000 {
            if let Some(n) = limiter.admit() {
                admitted += 1;
                reported += n;
            }
        }
        // Unless the loop straddles a window boundary, exactly the budget.
        assert!(
            admitted >= u64::from(LINES_PER_WINDOW) && admitted <= 2 * u64::from(LINES_PER_WINDOW),
            "{admitted}"
        );
        // Every line is either logged or counted (and reported later).
        assert_eq!(admitted + reported + limiter.suppressed(), 10_000);
    }

    #[test]
    fn the_next_window_reports_what_was_suppressed() {
        let limiter = LogLimiter::new();
        for _ in 0..100 {
            limiter.admit();
        }
        let dropped = limiter.suppressed();
        assert!(dropped > 0);
        std::thread::sleep(WINDOW + Duration::from_millis(20));
        assert_eq!(limiter.admit(), Some(dropped));
        assert_eq!(limiter.suppressed(), 0);
    }

    #[test]
    fn threads_share_one_budget() {
        let limiter = std::sync::Arc::new(LogLimiter::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = limiter.clone();
                std::thread::spawn(move || {
                    let (mut admitted, mut reported) = (0u64, 0u64);
                    for _ in 0..1000 {
                        if let Some(n) = l.admit() {
                            admitted += 1;
                            reported += n;
                        }
                    }
                    (admitted, reported)
                })
            })
            .collect();
        let (admitted, reported) = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert!(
            admitted <= 2 * u64::from(LINES_PER_WINDOW) + 4,
            "{admitted}"
        );
        assert_eq!(admitted + reported + limiter.suppressed(), 4000);
    }
}
