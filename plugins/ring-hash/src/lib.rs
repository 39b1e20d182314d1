//! `ring-hash`: consistent hashing on a Ketama-style ring, with optional
//! bounded load.
//!
//! Sources: D. Karger et al., "Consistent Hashing and Random Trees" (STOC
//! 1997), as done by libketama and Envoy's `RING_HASH` load balancer; bounded
//! load from V. Mirrokni, M. Thorup, M. Zadimoghaddam, "Consistent Hashing
//! with Bounded Loads" (SODA 2018), as Envoy's `hash_balance_factor` and
//! HAProxy's `hash-balance-factor`.
//!
//! Each healthy backend puts `points_per_weight × weight` points on a 64-bit
//! ring (libketama's fixed points per server, so a backend's points do not
//! depend on the others'), at `hash64("<address>_<i>")`. A
//! request's key is hashed and served by the first point clockwise: a binary
//! search, O(log ring_size). Removing a backend moves only its own keys (about
//! `1/N` of them) and adding one takes about `1/(N+1)`; no other key moves.
//!
//! With `hash_balance_factor = F` (a percentage, at least 100) no backend
//! takes a request while it has `ceil(F/100 × (in_flight_total + 1) / N)`
//! requests in flight or more: the walk goes on clockwise to the next
//! backend under that bound. 125 keeps every backend within 25 % of the mean
//! load at the price of moving some keys off their home backend under load.
//! It costs one `in-flight-all` host call per request.
//!
//! `plugin_config`:
//! - `hash_on`, `name`: the key, as [`wasmlb_sdk::hashing::HashKey`]
//!   (client address by default; a header, a cookie or the path);
//! - `points_per_weight`: ring points per unit of weight (default 256, 1 to
//!   4096; more points spread keys more evenly and cost memory: 12 bytes
//!   each, and the ring is capped at Envoy's 8,388,608 points);
//! - `hash_balance_factor`: 0 (default, off) or at least 100.
//!
//! Only healthy backends are on the ring; with none the answer is
//! `Unavailable`.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::hashing::{BoundedLoad, HashKey, HashOn, hash64};
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;

/// `plugin_config` of `ring-hash`.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// What to hash on.
    pub hash_on: HashOn,
    /// The header or cookie name.
    pub name: Option<String>,
    /// Ring points per unit of weight.
    pub points_per_weight: u32,
    /// Bounded load, in percent of the mean (0: off).
    pub hash_balance_factor: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hash_on: HashOn::ClientAddress,
            name: None,
            points_per_weight: 256,
            hash_balance_factor: 0,
        }
    }
}

/// Most points on a ring (Envoy's `maximum_ring_size`).
pub const MAX_RING: u64 = 8_388_608;

/// The ring: `(point, backend id)` sorted by point.
pub fn build_ring(backends: &[Backend], points_per_weight: u32) -> Vec<(u64, u32)> {
    let healthy: Vec<&Backend> = backends.iter().filter(|b| b.healthy).collect();
    let total: u64 = healthy.iter().map(|b| u64::from(b.weight.max(1))).sum();
    // Scale down only when the ring would exceed its cap.
    let per_weight = u64::from(points_per_weight).min((MAX_RING / total.max(1)).max(1));
    let mut ring = Vec::new();
    for b in healthy {
        for i in 0..per_weight * u64::from(b.weight.max(1)) {
            let label = format!("{}_{i}", b.address);
            ring.push((hash64(label.as_bytes(), 0), b.id));
        }
    }
    ring.sort_unstable();
    ring
}

/// `ring-hash` state.
#[derive(Debug)]
pub struct RingHash {
    key: HashKey,
    points_per_weight: u32,
    bounded: BoundedLoad,
    ring: Vec<(u64, u32)>,
}

impl RingHash {
    /// The backend for a key hashing to `h`, given in-flight counts by id
    /// (only read with bounded load).
    pub fn lookup(&self, h: u64, in_flight: &[u32]) -> Option<u32> {
        if self.ring.is_empty() {
            return None;
        }
        let start = self.ring.partition_point(|&(p, _)| p < h) % self.ring.len();
        let clockwise =
            (0..self.ring.len()).map(|step| self.ring[(start + step) % self.ring.len()].1);
        Some(
            self.bounded
                .choose(self.ring[start].1, clockwise, in_flight),
        )
    }
}

impl Strategy for RingHash {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let key = HashKey {
            hash_on: config.hash_on,
            name: config.name,
        };
        key.validate()?;
        if !(1..=4096).contains(&config.points_per_weight) {
            return Err("points_per_weight must be between 1 and 4096".into());
        }
        Ok(Self {
            key,
            points_per_weight: config.points_per_weight,
            bounded: BoundedLoad::new(config.hash_balance_factor)?,
            ring: Vec::new(),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.ring = build_ring(&backends, self.points_per_weight);
        self.bounded.set_backends(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let h = hash64(&self.key.bytes(cx), 0);
        self.lookup(h, &self.bounded.in_flight(cx))
            .map_or(Decision::Unavailable, Decision::Backend)
    }
}

wasmlb_sdk::export_strategy!(RingHash);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends};

    fn ring(set: &[Backend], config: &str) -> RingHash {
        let mut s: RingHash = wasmlb_sdk::instantiate(config).unwrap();
        s.set_backends(set.to_vec());
        s
    }

    fn keys() -> impl Iterator<Item = u64> {
        (0..20_000u32).map(|k| hash64(format!("key-{k}").as_bytes(), 0))
    }

    #[test]
    fn keys_spread_by_weight() {
        let s = ring(&backends(&[1, 1, 2]), "{}");
        let mut counts = [0u32; 3];
        for h in keys() {
            counts[s.lookup(h, &[]).unwrap() as usize] += 1;
        }
        for (got, expected) in counts.iter().zip([5000u32, 5000, 10_000]) {
            assert!(got.abs_diff(expected) < expected / 10, "{counts:?}");
        }
    }

    #[test]
    fn removing_one_of_n_moves_only_its_keys() {
        let n = 8;
        let mut set = backends(&vec![1; n]);
        let before = ring(&set, "{}");
        set[3].healthy = false;
        let after = ring(&set, "{}");
        let mut moved = 0;
        for h in keys() {
            let (b, a) = (
                before.lookup(h, &[]).unwrap(),
                after.lookup(h, &[]).unwrap(),
            );
            if b != a {
                assert_eq!(b, 3, "a key of a healthy backend moved");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / 20_000.0;
        assert!((fraction - 1.0 / 8.0).abs() < 0.03, "moved {fraction:.3}");
    }

    #[test]
    fn bounded_load_walks_past_a_busy_backend() {
        let set = backends(&[1, 1, 1, 1]);
        let s = ring(&set, r#"{"hash_balance_factor": 125}"#);
        let h = keys().find(|&h| s.lookup(h, &[]) == Some(0)).unwrap();
        // Total 10 in flight: bound ceil(1.25 x 11 / 4) = 4; backend 0 has 10.
        let chosen = s.lookup(h, &[10, 0, 0, 0]).unwrap();
        assert_ne!(chosen, 0);
        // Under the bound the key stays home.
        assert_eq!(s.lookup(h, &[3, 3, 2, 2]), Some(0));
        // Without a factor, load is ignored.
        assert_eq!(ring(&set, "{}").lookup(h, &[10, 0, 0, 0]), Some(0));
    }

    #[test]
    fn bounded_load_keeps_every_backend_near_the_mean() {
        // One hot key, 40 requests that stay in flight: without a bound all
        // land on one backend; with 125 % none exceeds ceil(1.25 x 40 / 4) = 13.
        let set = backends(&[1, 1, 1, 1]);
        let mut s = ring(
            &set,
            r#"{"hash_on": "header", "name": "x-user", "hash_balance_factor": 125}"#,
        );
        let mut cx = MockContext::new(&set).with_header("x-user", "hot");
        for _ in 0..40 {
            match s.select(&cx) {
                Decision::Backend(id) => cx.in_flight[id as usize] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(cx.in_flight.iter().all(|&c| c <= 13), "{:?}", cx.in_flight);
    }

    #[test]
    fn configs_are_checked() {
        for (bad, word) in [
            (r#"{"hash_balance_factor": 50}"#, "hash_balance_factor"),
            (r#"{"points_per_weight": 0}"#, "points_per_weight"),
            (r#"{"hash_on": "cookie"}"#, "name"),
        ] {
            let err = wasmlb_sdk::instantiate::<RingHash>(bad).unwrap_err();
            assert!(err.contains(word), "{bad}: {err}");
        }
    }

    #[test]
    fn none_healthy_is_unavailable() {
        let mut set = backends(&[1]);
        set[0].healthy = false;
        let mut s = ring(&set, "{}");
        assert_eq!(s.select(&MockContext::new(&set)), Decision::Unavailable);
    }
}
