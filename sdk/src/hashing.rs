//! Request keys and hashes for hash-based strategies (`ring-hash`, `maglev`,
//! or your own): what to hash a request on, and a fast 64-bit hash.
//!
//! ```
//! use wasmlb_sdk::hashing::{HashKey, HashOn, hash64};
//! use wasmlb_sdk::testing::{MockContext, backends};
//! let key = HashKey { hash_on: HashOn::Header, name: Some("x-user".into()) };
//! let set = backends(&[1]);
//! let cx = MockContext::new(&set).with_header("x-user", "alice");
//! assert_eq!(key.bytes(&cx), b"alice");
//! assert_eq!(hash64(b"alice", 0), hash64(b"alice", 0));
//! ```

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::{Backend, Context};

/// What a request is hashed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashOn {
    /// The downstream peer's IP address (not the port).
    #[default]
    ClientAddress,
    /// A request header's first value.
    Header,
    /// A cookie's value.
    Cookie,
    /// The path and query.
    Path,
}

/// What a hash-based strategy keys requests on: `hash_on` and `name`. It
/// deserializes from a `plugin_config` holding just those two keys; a
/// strategy with more keys declares both fields itself and builds this.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HashKey {
    /// What to hash on (default: the client address).
    pub hash_on: HashOn,
    /// The header or cookie name.
    pub name: Option<String>,
}

impl HashKey {
    /// `Err` naming the problem when `hash_on` needs a `name` that is missing.
    pub fn validate(&self) -> Result<(), String> {
        let needs_name = matches!(self.hash_on, HashOn::Header | HashOn::Cookie);
        if needs_name && self.name.as_deref().is_none_or(str::is_empty) {
            return Err("hash_on = \"header\" or \"cookie\" needs `name`".to_string());
        }
        Ok(())
    }

    /// The bytes to hash for the request in `cx`. A request without the
    /// header or cookie is keyed on its client address instead.
    pub fn bytes(&self, cx: &dyn Context) -> Vec<u8> {
        let name = self.name.as_deref().unwrap_or("");
        let found = match self.hash_on {
            HashOn::ClientAddress => None,
            HashOn::Path => Some(cx.path()),
            HashOn::Header => cx.header(name),
            HashOn::Cookie => cookie(&cx.header_all("cookie"), name),
        };
        match found {
            Some(k) => k.into_bytes(),
            None => format!("{}", cx.client_address().ip()).into_bytes(),
        }
    }
}

/// The value of cookie `name` in `Cookie` header values (RFC 6265 §4.2:
/// `name=value` pairs separated by `;`), without surrounding quotes.
pub fn cookie(headers: &[String], name: &str) -> Option<String> {
    headers
        .iter()
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// Bounded load for consistent hashing (V. Mirrokni, M. Thorup, M.
/// Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA 2018; Envoy
/// `hash_balance_factor`, HAProxy `hash-balance-factor`): with `factor`
/// percent (at least 100), no backend takes a request while it has
/// `ceil(factor/100 × (total in flight + 1) / healthy)` or more in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadBound {
    bound: u64,
}

impl LoadBound {
    /// The bound for `factor` percent, the in-flight counts by backend id
    /// and the number of healthy backends.
    pub fn new(factor: u32, in_flight: &[u32], healthy: usize) -> Self {
        let total: u64 = in_flight.iter().map(|&c| u64::from(c)).sum();
        let healthy = healthy.max(1) as u64;
        Self {
            bound: (u64::from(factor) * (total + 1)).div_ceil(100 * healthy),
        }
    }

    /// The bound, in requests in flight.
    pub fn get(&self) -> u64 {
        self.bound
    }

    /// The first of `candidates` (backend ids, in preference order) under
    /// the bound, given the in-flight counts by id.
    pub fn first_under(
        &self,
        candidates: impl Iterator<Item = u32>,
        in_flight: &[u32],
    ) -> Option<u32> {
        candidates
            .into_iter()
            .find(|&id| u64::from(in_flight.get(id as usize).copied().unwrap_or(0)) < self.bound)
    }
}

/// A hash-based strategy's bounded-load setting (`hash_balance_factor`)
/// and what applying it needs: the number of healthy backends, and the
/// in-flight counts, read only when the bound is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoundedLoad {
    factor: u32,
    healthy: usize,
}

impl BoundedLoad {
    /// `factor` percent of the mean in-flight load; 0 turns it off.
    ///
    /// # Errors
    /// A message naming `hash_balance_factor` unless `factor` is 0 or at
    /// least 100.
    pub fn new(factor: u32) -> Result<Self, String> {
        if factor != 0 && factor < 100 {
            return Err("hash_balance_factor must be 0 (off) or at least 100".to_string());
        }
        Ok(Self { factor, healthy: 0 })
    }

    /// Count the healthy backends (call from `Strategy::set_backends`).
    pub fn set_backends(&mut self, backends: &[Backend]) {
        self.healthy = backends.iter().filter(|b| b.healthy).count();
    }

    /// The in-flight counts by backend id: one `in-flight-all` host call
    /// with the bound on, nothing (an empty list) with it off.
    pub fn in_flight(&self, cx: &dyn Context) -> Vec<u32> {
        if self.factor == 0 {
            Vec::new()
        } else {
            cx.in_flight_all()
        }
    }

    /// `home`, or with the bound on, the first backend of `walk` (the
    /// strategy's fallback order, starting with `home`) under the bound;
    /// `home` if none is. `walk` is not consumed with the bound off.
    pub fn choose(&self, home: u32, walk: impl Iterator<Item = u32>, in_flight: &[u32]) -> u32 {
        if self.factor == 0 {
            return home;
        }
        LoadBound::new(self.factor, in_flight, self.healthy)
            .first_under(walk, in_flight)
            .unwrap_or(home)
    }
}

/// 64-bit FNV-1a over `bytes` (offset basis xor `seed`), finished with
/// SplitMix64's mixer so nearby inputs land far apart.
pub fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MockContext, backends};

    #[test]
    fn cookies_are_found_by_name() {
        assert_eq!(
            cookie(&["a=1; sid=\"x y\"".into()], "sid").as_deref(),
            Some("x y")
        );
        assert_eq!(
            cookie(&["a=1".into(), "sid=2".into()], "sid").as_deref(),
            Some("2")
        );
        assert_eq!(cookie(&["a=1".into()], "sid"), None);
    }

    #[test]
    fn a_missing_key_falls_back_to_the_client_address() {
        let key = HashKey {
            hash_on: HashOn::Cookie,
            name: Some("sid".into()),
        };
        let set = backends(&[1]);
        assert_eq!(key.bytes(&MockContext::new(&set)), b"192.0.2.1");
        let cx = MockContext::new(&set).with_header("cookie", "sid=abc");
        assert_eq!(key.bytes(&cx), b"abc");
    }

    #[test]
    fn load_bound_follows_the_mean() {
        // 10 in flight over 4: ceil(1.25 x 11 / 4) = 4.
        let b = LoadBound::new(125, &[10, 0, 0, 0], 4);
        assert_eq!(b.get(), 4);
        assert_eq!(
            b.first_under([0, 2, 1].into_iter(), &[10, 0, 0, 0]),
            Some(2)
        );
        assert_eq!(b.first_under([0].into_iter(), &[10, 0, 0, 0]), None);
        assert!(BoundedLoad::new(99).is_err());
        assert!(BoundedLoad::new(0).is_ok() && BoundedLoad::new(150).is_ok());
        let mut on = BoundedLoad::new(125).unwrap();
        on.set_backends(&backends(&[1, 1, 1, 1]));
        assert_eq!(on.choose(0, [0, 3].into_iter(), &[10, 0, 0, 0]), 3);
        let off = BoundedLoad::new(0).unwrap();
        assert_eq!(off.choose(0, [0, 3].into_iter(), &[10, 0, 0, 0]), 0);
    }

    #[test]
    fn header_and_cookie_need_a_name() {
        let key = HashKey {
            hash_on: HashOn::Header,
            name: None,
        };
        assert!(key.validate().unwrap_err().contains("name"));
        assert!(HashKey::default().validate().is_ok());
    }
}
