//! Sampling a share of events (requests) evenly, without randomness.

use std::sync::atomic::{AtomicU64, Ordering};

/// Picks `percent` of the events it is asked about, spread evenly: event
/// `n` (counting from 0) is picked when `n * percent / 100` steps up, as
/// Bresenham's line algorithm spreads its steps. One relaxed atomic add per
/// event below 100 %, none at 100 %.
#[derive(Debug)]
pub struct Sampler {
    percent: u32,
    seen: AtomicU64,
}

impl Sampler {
    /// A sampler of `percent` (1 to 100; more counts as 100).
    pub fn new(percent: u32) -> Self {
        Self {
            percent: percent.min(100),
            seen: AtomicU64::new(0),
        }
    }

    /// The share picked, in percent.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Whether this event is picked.
    pub fn sample(&self) -> bool {
        if self.percent >= 100 {
            return true;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let p = u64::from(self.percent);
        n.wrapping_mul(p) / 100 != n.wrapping_add(1).wrapping_mul(p) / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_is_spread_evenly() {
        for p in [1u32, 10, 33, 50, 99, 100] {
            let s = Sampler::new(p);
            let first_100 = (0..100).filter(|_| s.sample()).count();
            assert_eq!(first_100, p as usize, "p = {p}");
            let next_1000 = (0..1000).filter(|_| s.sample()).count();
            assert_eq!(next_1000, 10 * p as usize, "p = {p}");
        }
        // Never two picks in a row below 50 %.
        let s = Sampler::new(10);
        let picks: Vec<bool> = (0..100).map(|_| s.sample()).collect();
        assert!(picks.windows(2).all(|w| !(w[0] && w[1])));
    }
}
