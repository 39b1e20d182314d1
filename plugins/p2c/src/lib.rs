//! `p2c`: power of two choices. Draw two distinct backends at random
//! (weighted), send the request to the one with fewer requests in flight
//! relative to its weight.
//!
//! Sources: M. Mitzenmacher, "The Power of Two Choices in Randomized Load
//! Balancing" (IEEE TPDS 12(10), 2001): with two choices the most loaded of
//! `n` backends carries `O(log log n)` more than the mean instead of
//! `O(log n / log log n)` for one random choice. The same rule is Envoy's
//! `LEAST_REQUEST` load balancer (`choice_count = 2`), HAProxy's
//! `balance random(2)` and the core of linkerd2's balancer.
//!
//! The second backend is drawn among the others (weighted sampling without
//! replacement), so two healthy backends are always compared with each
//! other. The machinery is the SDK's [`wasmlb_sdk::weighted::TwoChoices`].
//!
//! Compared with `least-connections` it needs no scan: per pick, two binary
//! searches over the cumulative weights and two `in-flight` host calls,
//! whatever the number of backends; and balancers sharing the backends do not
//! herd onto the same least-loaded backend.
//!
//! Loads are compared as `in_flight / weight` by cross-multiplication; a tie
//! goes to the first draw. With one healthy backend it is chosen; with none
//! the answer is `Unavailable`.
//!
//! `plugin_config`: `seed` (integer, optional) fixes the random sequence;
//! without it the generator is seeded from the host's clock on the first pick.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::weighted::{SeedConfig, TwoChoices};

/// Power-of-two-choices state.
#[derive(Debug)]
pub struct P2c {
    choices: TwoChoices,
}

impl Strategy for P2c {
    type Config = SeedConfig;

    fn new(config: SeedConfig) -> Result<Self, String> {
        Ok(Self {
            choices: TwoChoices::new(config.seed),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.choices.set_backends(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        self.choices.select(cx, |id| u128::from(cx.in_flight(id)))
    }
}

wasmlb_sdk::export_strategy!(P2c);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::fastrand::Rng;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    /// Balls into bins: `n` requests that never finish, each placed by the
    /// strategy seeing the live in-flight counts. Returns the final counts.
    fn place(config: &str, set: &[Backend], n: u32) -> Vec<u32> {
        let mut s: P2c = wasmlb_sdk::instantiate(config).unwrap();
        s.set_backends(set.to_vec());
        let mut cx = MockContext::new(set);
        for _ in 0..n {
            match s.select(&cx) {
                Decision::Backend(id) => cx.in_flight[id as usize] += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        cx.in_flight
    }

    #[test]
    fn two_choices_keep_the_maximum_near_the_mean() {
        // 64 backends, 64 x 16 requests: one random choice leaves the
        // fullest backend near mean + 3 sqrt(mean) = 28 (measured below with
        // the same generator); two choices keep it within 3 of the mean of 16.
        let set = backends(&[1; 64]);
        let loads = place(r#"{"seed": 3}"#, &set, 64 * 16);
        let max = *loads.iter().max().unwrap();
        let min = *loads.iter().min().unwrap();
        assert!(max <= 19 && min >= 12, "{loads:?}");
        let mut rng = Rng::with_seed(3);
        let mut one_choice = [0u32; 64];
        for _ in 0..64 * 16 {
            one_choice[rng.usize(..64)] += 1;
        }
        let one_max = *one_choice.iter().max().unwrap();
        assert!(one_max > max + 3, "one choice {one_max}, two choices {max}");
    }

    #[test]
    fn loads_follow_weights() {
        let set = backends(&[1, 3]);
        let loads = place(r#"{"seed": 5}"#, &set, 4000);
        // in_flight / weight evens out: about 1000 and 3000.
        assert!(loads[0].abs_diff(1000) <= 10, "{loads:?}");
    }

    #[test]
    fn the_less_loaded_of_the_two_wins() {
        // With two backends both are always drawn: the idle one always wins.
        let set = backends(&[1, 1]);
        let cx = MockContext::new(&set).with_in_flight(&[0, 7]);
        let counts = spread::<P2c>(r#"{"seed": 1}"#, &set, &cx, 1000).unwrap();
        assert_eq!(counts, vec![1000, 0]);
    }

    #[test]
    fn unhealthy_backends_are_never_drawn() {
        let mut set = backends(&[1, 1, 1]);
        set[0].healthy = false;
        let cx = MockContext::new(&set).with_in_flight(&[0, 5, 5]);
        let counts = spread::<P2c>(r#"{"seed": 2}"#, &set, &cx, 1000).unwrap();
        assert_eq!(counts[0], 0);
        assert_eq!(counts[1] + counts[2], 1000);
    }

    #[test]
    fn one_healthy_backend_is_chosen_and_none_is_unavailable() {
        let mut set = backends(&[1, 1]);
        set[1].healthy = false;
        let counts = spread::<P2c>("{}", &set, &MockContext::new(&set), 10).unwrap();
        assert_eq!(counts, vec![10, 0]);
        set[0].healthy = false;
        let mut s: P2c = wasmlb_sdk::instantiate("{}").unwrap();
        s.set_backends(set.clone());
        assert_eq!(s.select(&MockContext::new(&set)), Decision::Unavailable);
    }
}
