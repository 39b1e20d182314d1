//! `peak-ewma`: power of two choices over a latency-aware load.
//!
//! Source: linkerd2's balancer and tower's `balance::p2c` with
//! `load::PeakEwma` (after Finagle's "peak EWMA"). Two distinct backends are
//! drawn at random (weighted, without replacement) and the request goes to
//! the one with the lower cost
//!
//! `cost = rtt × (in_flight + 1) / weight`
//!
//! where `rtt` is the host's peak-sensitive EWMA of the backend's response
//! time (the `rtt-estimate` host call: a slow response raises it at once,
//! fast ones bring it down over about 10 s). A backend that turns slow is
//! avoided after its first slow response, not after a queue has built up;
//! a backend with no response yet counts `default_rtt_ms`.
//!
//! Per pick: two binary searches and four host calls (two `in-flight`, two
//! `rtt-estimate`), whatever the number of backends. Ties go to the first
//! draw. With one healthy backend it is chosen; with none the answer is
//! `Unavailable`.
//!
//! `plugin_config`: `default_rtt_ms` (default 30) and `seed` (optional; without
//! it the generator is seeded from the host's clock).
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;
use wasmlb_sdk::weighted::TwoChoices;

/// `plugin_config` of `peak-ewma`.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Response time assumed for a backend without a measurement, in ms.
    pub default_rtt_ms: u64,
    /// Seed of the random sequence; absent: seeded from the clock.
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_rtt_ms: 30,
            seed: None,
        }
    }
}

/// Peak-EWMA P2C state.
#[derive(Debug)]
pub struct PeakEwma {
    choices: TwoChoices,
    default_rtt_ns: u64,
}

impl Strategy for PeakEwma {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.default_rtt_ms == 0 {
            return Err("default_rtt_ms must be at least 1".into());
        }
        Ok(Self {
            choices: TwoChoices::new(config.seed),
            default_rtt_ns: config.default_rtt_ms.saturating_mul(1_000_000),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.choices.set_backends(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let default_rtt = self.default_rtt_ns;
        // cost = rtt x (in_flight + 1); TwoChoices divides by the weight.
        self.choices.select(cx, |id| {
            let rtt = match cx.rtt_estimate(id) {
                0 => default_rtt,
                ns => ns,
            };
            u128::from(rtt) * (u128::from(cx.in_flight(id)) + 1)
        })
    }
}

wasmlb_sdk::export_strategy!(PeakEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    #[test]
    fn a_slow_backend_is_avoided_before_a_queue_builds() {
        // Same in-flight counts, one backend 10x slower: it only wins when
        // it is not drawn (it never wins a comparison).
        let set = backends(&[1, 1, 1, 1]);
        let cx = MockContext::new(&set).with_rtt_ms(&[5, 5, 5, 50]);
        let counts = spread::<PeakEwma>(r#"{"seed": 4}"#, &set, &cx, 4000).unwrap();
        assert_eq!(counts[3], 0, "{counts:?}");
    }

    #[test]
    fn load_and_latency_trade_off() {
        // 5 ms with 9 in flight costs 50; 20 ms idle costs 20: the slow idle one wins.
        let set = backends(&[1, 1]);
        let cx = MockContext::new(&set)
            .with_rtt_ms(&[5, 20])
            .with_in_flight(&[9, 0]);
        let counts = spread::<PeakEwma>(r#"{"seed": 1}"#, &set, &cx, 100).unwrap();
        assert_eq!(counts, vec![0, 100]);
    }

    #[test]
    fn unmeasured_backends_count_the_default_rtt() {
        // Unmeasured (30 ms by default) against a measured 40 ms: the new one wins.
        let set = backends(&[1, 1]);
        let mut cx = MockContext::new(&set);
        cx.rtt_ns = vec![0, 40_000_000];
        let counts = spread::<PeakEwma>(r#"{"seed": 2}"#, &set, &cx, 100).unwrap();
        assert_eq!(counts, vec![100, 0]);
        // With a 50 ms default the measured one wins.
        let counts =
            spread::<PeakEwma>(r#"{"seed": 2, "default_rtt_ms": 50}"#, &set, &cx, 100).unwrap();
        assert_eq!(counts, vec![0, 100]);
    }

    #[test]
    fn unhealthy_and_config_errors() {
        let mut set = backends(&[1, 1]);
        set[0].healthy = false;
        let cx = MockContext::new(&set).with_rtt_ms(&[1, 100]);
        let counts = spread::<PeakEwma>("{}", &set, &cx, 10).unwrap();
        assert_eq!(counts, vec![0, 10]);
        let err = wasmlb_sdk::instantiate::<PeakEwma>(r#"{"default_rtt_ms": 0}"#).unwrap_err();
        assert!(err.contains("default_rtt_ms"), "{err}");
    }
}
