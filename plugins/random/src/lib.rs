//! `random`: each request goes to a backend chosen at random, with
//! probability proportional to its weight.
//!
//! Source: HAProxy `balance random(1)` and Envoy's `RANDOM` load balancer.
//! Stateless between requests, so it is the usual choice when many balancers
//! share the backends and none should see a pattern (no rotation to
//! synchronise on). Over `n` requests backend `i` serves `n × wᵢ / Σw` in
//! expectation, with binomial spread.
//!
//! Per pick: one binary search over the healthy backends' cumulative weights
//! ([`wasmlb_sdk::weighted::WeightedTable`], O(log n)), no host calls.
//! Unhealthy backends are skipped; with none healthy the answer is
//! `Unavailable`.
//!
//! `plugin_config`: `seed` (integer, optional) fixes the random sequence;
//! without it the generator is seeded from the host's monotonic clock on the
//! first pick, so separate balancers do not draw the same sequence.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::fastrand::Rng;
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::weighted::{SeedConfig, WeightedTable};

/// Weighted random state.
#[derive(Debug)]
pub struct Random {
    table: WeightedTable,
    rng: Option<Rng>,
}

impl Strategy for Random {
    type Config = SeedConfig;

    fn new(config: SeedConfig) -> Result<Self, String> {
        Ok(Self {
            table: WeightedTable::default(),
            rng: config.seed.map(Rng::with_seed),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.table = WeightedTable::new(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let rng = self
            .rng
            .get_or_insert_with(|| Rng::with_seed(cx.monotonic_now()));
        match self.table.pick(rng) {
            Some(id) => Decision::Backend(id),
            None => Decision::Unavailable,
        }
    }
}

wasmlb_sdk::export_strategy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    #[test]
    fn spread_follows_weights() {
        let set = backends(&[1, 1, 2, 4]);
        let n = 80_000;
        let counts = spread::<Random>(r#"{"seed": 42}"#, &set, &MockContext::new(&set), n).unwrap();
        for (got, weight) in counts.iter().zip([1u32, 1, 2, 4]) {
            let expected = n as u32 / 8 * weight;
            // Binomial: 3 % is over 5 standard deviations at these counts.
            assert!(got.abs_diff(expected) < expected * 3 / 100, "{counts:?}");
        }
    }

    #[test]
    fn unhealthy_backends_are_never_chosen() {
        let mut set = backends(&[1, 1, 1]);
        set[1].healthy = false;
        let counts =
            spread::<Random>(r#"{"seed": 1}"#, &set, &MockContext::new(&set), 3000).unwrap();
        assert_eq!(counts[1], 0);
        assert_eq!(counts[0] + counts[2], 3000);
    }

    #[test]
    fn none_healthy_is_unavailable() {
        let mut set = backends(&[1]);
        set[0].healthy = false;
        let mut s: Random = wasmlb_sdk::instantiate("{}").unwrap();
        s.set_backends(set.clone());
        assert_eq!(s.select(&MockContext::new(&set)), Decision::Unavailable);
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let set = backends(&[1, 1, 1, 1]);
        let cx = MockContext::new(&set);
        let run = || {
            let mut s: Random = wasmlb_sdk::instantiate(r#"{"seed": 9}"#).unwrap();
            s.set_backends(set.clone());
            (0..50).map(|_| s.select(&cx)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let err = wasmlb_sdk::instantiate::<Random>(r#"{"sede": 1}"#).unwrap_err();
        assert!(err.contains("sede"), "{err}");
    }
}
