//! `maglev`: consistent hashing with the Maglev lookup table.
//!
//! Source: D. E. Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, §3.4 (Pseudocode 1: each backend walks
//! its own permutation of the table, `(offset + j × skip) mod M`, claiming
//! the first free slot in turn until the table is full). Weights follow
//! Envoy's `MaglevTable`: a backend takes a turn only when its accumulated
//! share reaches the heaviest backend's. The table has `M = 65537` slots (a
//! prime, as the paper requires, and Envoy's default); `offset` and `skip`
//! come from two hashes of the backend's address, and backends take their
//! turns in address order, so every balancer with the same backends builds
//! the same table, whatever order it lists them in.
//!
//! A request's key is hashed ([`wasmlb_sdk::hashing::hash64`]: FNV-1a 64,
//! finished with the SplitMix64 mixer)
//! and looked up: O(1) per request, the table is rebuilt (O(M log M) at
//! worst) only when the backend set or health changes. Properties, tested
//! below: each backend owns its weighted share of the table within 1 %, and
//! removing one of `N` backends moves about `1/N` of the keys, almost all
//! of them the removed backend's.
//!
//! `plugin_config`:
//! - `hash_on`: `"client-address"` (default; the IP, not the port),
//!   `"header"`, `"cookie"` or `"path"` (path and query);
//! - `name`: the header or cookie name (required for those two);
//! - `hash_balance_factor`: bounded load as in `ring-hash` (0, the default,
//!   is off; else at least 100, a percentage of the mean in-flight load). A
//!   request whose backend is at the bound walks the following table slots
//!   to the first backend under it; one `in-flight-all` host call.
//!
//! A request without the key (no such header or cookie) is hashed on its
//! client address. Only healthy backends are in the table; with none the
//! answer is `Unavailable`.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::hashing::{BoundedLoad, HashKey, HashOn, hash64 as hash};
use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;

/// Slots in the lookup table (prime; Envoy's default).
pub const TABLE_SIZE: usize = 65_537;

/// The lookup table for `backends`: slot → backend id; empty when no
/// backend is healthy.
pub fn build_table(backends: &[Backend]) -> Vec<u32> {
    struct Entry {
        id: u32,
        offset: u64,
        skip: u64,
        next: u64,
        weight: u64,
        target: u64,
    }
    let m = TABLE_SIZE as u64;
    // Backends take their turns in address order, not list order: where two
    // permutations want the same slot, the first to walk wins, so list
    // order would change about 0.02 % of the slots between two balancers
    // that list the same backends differently.
    let mut healthy: Vec<&Backend> = backends.iter().filter(|b| b.healthy).collect();
    healthy.sort_unstable_by(|a, b| a.address.cmp(&b.address));
    let mut entries: Vec<Entry> = healthy
        .into_iter()
        .map(|b| Entry {
            id: b.id,
            offset: hash(b.address.as_bytes(), 0) % m,
            skip: hash(b.address.as_bytes(), 1) % (m - 1) + 1,
            next: 0,
            weight: u64::from(b.weight.max(1)),
            target: 0,
        })
        .collect();
    if entries.is_empty() {
        return Vec::new();
    }
    let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);
    let mut table = vec![u32::MAX; TABLE_SIZE];
    let mut filled = 0usize;
    let mut iteration = 1u64;
    while filled < TABLE_SIZE {
        for e in &mut entries {
            if filled == TABLE_SIZE {
                break;
            }
            // Envoy: a backend of weight w takes a turn in w of every
            // max_weight iterations.
            if iteration * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            loop {
                let slot = ((e.offset + e.next * e.skip) % m) as usize;
                e.next += 1;
                if table[slot] == u32::MAX {
                    table[slot] = e.id;
                    filled += 1;
                    break;
                }
            }
        }
        iteration += 1;
    }
    table
}

/// `plugin_config` of `maglev`.
#[derive(Debug, Default, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// What to hash on.
    pub hash_on: HashOn,
    /// The header or cookie name.
    pub name: Option<String>,
    /// Bounded load, in percent of the mean (0: off).
    pub hash_balance_factor: u32,
}

/// Maglev state.
#[derive(Debug, Default)]
pub struct Maglev {
    key: HashKey,
    bounded: BoundedLoad,
    table: Vec<u32>,
}

impl Maglev {
    /// The backend for a key hashing to `h`, given in-flight counts by id
    /// (only read with bounded load).
    pub fn lookup(&self, h: u64, in_flight: &[u32]) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        let slot = (h % TABLE_SIZE as u64) as usize;
        // The following slots hold the backends in a pseudo-random order
        // (each backend's permutation), so walking them spreads the overflow.
        let walk = (0..TABLE_SIZE).map(|step| self.table[(slot + step) % TABLE_SIZE]);
        Some(self.bounded.choose(self.table[slot], walk, in_flight))
    }
}

impl Strategy for Maglev {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        let key = HashKey {
            hash_on: config.hash_on,
            name: config.name,
        };
        key.validate()?;
        Ok(Self {
            key,
            bounded: BoundedLoad::new(config.hash_balance_factor)?,
            table: Vec::new(),
        })
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.table = build_table(&backends);
        self.bounded.set_backends(&backends);
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        let h = hash(&self.key.bytes(cx), 0);
        self.lookup(h, &self.bounded.in_flight(cx))
            .map_or(Decision::Unavailable, Decision::Backend)
    }
}

wasmlb_sdk::export_strategy!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends};

    fn owned(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &id in table {
            counts[id as usize] += 1;
        }
        counts
    }

    #[test]
    fn each_backend_owns_its_share_within_one_percent() {
        for n in [3usize, 10, 64] {
            let table = build_table(&backends(&vec![1; n]));
            let share = TABLE_SIZE as f64 / n as f64;
            for (id, c) in owned(&table, n).into_iter().enumerate() {
                let off = (c as f64 - share).abs() / share;
                assert!(off < 0.01, "n={n}: backend {id} owns {c}, share {share:.0}");
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_the_backends_order() {
        let forward = backends(&[1; 20]);
        let address_of = |set: &[Backend], id: u32| set[id as usize].address.clone();
        let mut reversed = forward.clone();
        reversed.reverse();
        for (id, b) in reversed.iter_mut().enumerate() {
            b.id = id as u32;
        }
        let (a, b) = (build_table(&forward), build_table(&reversed));
        let differing = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| address_of(&forward, **x) != address_of(&reversed, **y))
            .count();
        assert_eq!(differing, 0);
    }

    #[test]
    fn weights_set_the_shares() {
        let table = build_table(&backends(&[1, 2, 1]));
        let counts = owned(&table, 3);
        let quarter = TABLE_SIZE as f64 / 4.0;
        for (c, w) in counts.iter().zip([1.0, 2.0, 1.0]) {
            assert!(
                (*c as f64 - quarter * w).abs() / (quarter * w) < 0.01,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_keys() {
        let n = 10;
        let mut set = backends(&vec![1; n]);
        let before = build_table(&set);
        set[4].healthy = false;
        let after = build_table(&set);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let moved_elsewhere = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **b != 4)
            .count();
        let fraction = moved as f64 / TABLE_SIZE as f64;
        // The removed backend's tenth must move; Maglev moves only a little more.
        assert!((0.099..0.13).contains(&fraction), "moved {fraction:.3}");
        assert!(
            (moved_elsewhere as f64) < 0.03 * TABLE_SIZE as f64,
            "{moved_elsewhere} keys of healthy backends moved"
        );
    }

    #[test]
    fn the_same_key_reaches_the_same_backend_and_keys_spread() {
        let set = backends(&[1, 1, 1, 1]);
        let mut s: Maglev =
            wasmlb_sdk::instantiate(r#"{"hash_on": "header", "name": "x-user"}"#).unwrap();
        s.set_backends(set.clone());
        let pick = |s: &mut Maglev, user: &str| {
            s.select(&MockContext::new(&set).with_header("x-user", user))
        };
        let first = pick(&mut s, "alice");
        for _ in 0..10 {
            assert_eq!(pick(&mut s, "alice"), first);
        }
        let mut counts = [0u32; 4];
        for u in 0..4000 {
            if let Decision::Backend(id) = pick(&mut s, &format!("user-{u}")) {
                counts[id as usize] += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn cookie_and_path_keys() {
        let set = backends(&[1, 1, 1, 1, 1, 1, 1, 1]);
        let mut by_cookie: Maglev =
            wasmlb_sdk::instantiate(r#"{"hash_on": "cookie", "name": "sid"}"#).unwrap();
        by_cookie.set_backends(set.clone());
        let with_cookie =
            |v: &str| MockContext::new(&set).with_header("cookie", &format!("theme=dark; sid={v}"));
        assert_eq!(
            by_cookie.select(&with_cookie("abc")),
            by_cookie.select(&with_cookie("abc"))
        );
        let mut by_path: Maglev = wasmlb_sdk::instantiate(r#"{"hash_on": "path"}"#).unwrap();
        by_path.set_backends(set.clone());
        let spread: std::collections::BTreeSet<u32> = (0..50)
            .map(|i| {
                match by_path.select(&MockContext::new(&set).with_path(&format!("/item/{i}"))) {
                    Decision::Backend(id) => id,
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert!(spread.len() > 4, "{spread:?}");
    }

    #[test]
    fn header_without_name_is_rejected() {
        let err = wasmlb_sdk::instantiate::<Maglev>(r#"{"hash_on": "header"}"#).unwrap_err();
        assert!(err.contains("name"), "{err}");
        let err = wasmlb_sdk::instantiate::<Maglev>(r#"{"hash_on": "ip"}"#).unwrap_err();
        assert!(err.contains("ip"), "{err}");
    }

    #[test]
    fn bounded_load_keeps_a_hot_key_within_the_bound() {
        let set = backends(&[1, 1, 1, 1]);
        let mut s: Maglev = wasmlb_sdk::instantiate(
            r#"{"hash_on": "header", "name": "x-user", "hash_balance_factor": 125}"#,
        )
        .unwrap();
        s.set_backends(set.clone());
        let mut cx = MockContext::new(&set).with_header("x-user", "hot");
        for _ in 0..40 {
            match s.select(&cx) {
                Decision::Backend(id) => cx.in_flight[id as usize] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(cx.in_flight.iter().all(|&c| c <= 13), "{:?}", cx.in_flight);
        let err = wasmlb_sdk::instantiate::<Maglev>(r#"{"hash_balance_factor": 10}"#).unwrap_err();
        assert!(err.contains("hash_balance_factor"), "{err}");
    }

    #[test]
    fn none_healthy_is_unavailable() {
        let mut set = backends(&[1, 1]);
        set.iter_mut().for_each(|b| b.healthy = false);
        let mut s: Maglev = wasmlb_sdk::instantiate("{}").unwrap();
        s.set_backends(set.clone());
        assert_eq!(s.select(&MockContext::new(&set)), Decision::Unavailable);
    }
}
