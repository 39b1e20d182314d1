//! `ip-hash`: the client's address picks the backend, so a client keeps
//! reaching the same backend while the backend set stays the same.
//!
//! Source: NGINX `ip_hash` (`src/http/modules/ngx_http_upstream_ip_hash_module.c`),
//! reproduced step for step so a client maps to the same backend position as
//! behind NGINX given the same backend list and weights:
//! - the key is the first three octets of an IPv4 address (the whole /24
//!   shares a backend) or all 16 octets of an IPv6 address;
//! - `hash` starts at 89 and takes `hash = (hash * 113 + octet) % 6271` per
//!   octet; `hash % total_weight` (the weights of all backends, healthy or
//!   not) is a point on the backends laid end to end in list order;
//! - if that backend is unhealthy the key is hashed again, continuing from the
//!   current `hash`; after 20 tries the pick falls back to round robin over
//!   the healthy backends.
//!
//! So a backend going down moves only its own clients, and they come back
//! when it returns. Adding or removing a backend remaps most clients, as in
//! NGINX (use `ring-hash` or `maglev` where that matters). The client address
//! is the TCP peer's, never a header. Per pick: one host call and O(n) to
//! walk the weights, like NGINX; no `plugin_config`.
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::{IpAddr, SocketAddr};

/// NGINX's starting value, multiplier and modulus.
const HASH_INIT: u32 = 89;
const HASH_MUL: u32 = 113;
const HASH_MOD: u32 = 6271;
/// Rehash attempts before falling back to round robin (NGINX: 20).
const MAX_TRIES: usize = 20;

/// `ip-hash` state.
#[derive(Debug, Default)]
pub struct IpHash {
    backends: Vec<Backend>,
    total_weight: u32,
    /// Round-robin cursor for the fallback.
    cursor: usize,
}

/// The octets NGINX hashes: 3 for IPv4 (and IPv4-mapped IPv6), 16 for IPv6.
fn key(client: SocketAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    match client.ip() {
        IpAddr::V4(v4) => {
            out[..3].copy_from_slice(&v4.octets()[..3]);
            (out, 3)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                out[..3].copy_from_slice(&v4.octets()[..3]);
                (out, 3)
            }
            None => (v6.octets(), 16),
        },
    }
}

impl IpHash {
    /// The backend id for `client`, as NGINX's `ip_hash` would choose it.
    pub fn pick(&mut self, client: SocketAddr) -> Option<u32> {
        if self.total_weight == 0 {
            return None;
        }
        let (octets, len) = key(client);
        let mut hash = HASH_INIT;
        for _ in 0..MAX_TRIES {
            for &o in &octets[..len] {
                hash = (hash * HASH_MUL + u32::from(o)) % HASH_MOD;
            }
            let mut w = hash % self.total_weight;
            let mut chosen = None;
            for b in &self.backends {
                let weight = b.weight.max(1);
                if w < weight {
                    chosen = Some(b);
                    break;
                }
                w -= weight;
            }
            if let Some(b) = chosen
                && b.healthy
            {
                return Some(b.id);
            }
        }
        // NGINX falls back to round robin after 20 tries.
        let n = self.backends.len();
        for step in 1..=n {
            let id = (self.cursor + step) % n;
            if self.backends[id].healthy {
                self.cursor = id;
                return Some(id as u32);
            }
        }
        None
    }
}

impl Strategy for IpHash {
    type Config = NoConfig;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.total_weight = backends.iter().map(|b| b.weight.max(1)).sum();
        self.backends = backends;
        self.cursor = 0;
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        match self.pick(cx.client_address()) {
            Some(id) => Decision::Backend(id),
            None => Decision::Unavailable,
        }
    }
}

wasmlb_sdk::export_strategy!(IpHash);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::Ipv4Addr;
    use wasmlb_sdk::testing::backends;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), 50000)
    }

    fn strategy(set: &[Backend]) -> IpHash {
        let mut s = IpHash::default();
        s.set_backends(set.to_vec());
        s
    }

    /// 65,536 client /24 networks 10.x.y.0.
    fn networks() -> impl Iterator<Item = SocketAddr> {
        (0..=255u8).flat_map(|x| (0..=255u8).map(move |y| v4(10, x, y, 1)))
    }

    #[test]
    fn nginx_arithmetic_for_a_known_address() {
        // 192.0.2.x: 89 -> (89*113+192)%6271 = 3978 -> (3978*113+0)%6271
        // = 4273 -> (4273*113+2)%6271 = 6255; 6255 % 4 = 3.
        let mut s = strategy(&backends(&[1, 1, 1, 1]));
        assert_eq!(s.pick(v4(192, 0, 2, 7)), Some(3));
    }

    #[test]
    fn a_whole_slash_24_shares_a_backend() {
        let mut s = strategy(&backends(&[1, 1, 1, 1, 1]));
        let first = s.pick(v4(198, 51, 100, 1));
        for last in 0..=255 {
            assert_eq!(s.pick(v4(198, 51, 100, last)), first);
        }
    }

    #[test]
    fn networks_spread_by_weight() {
        let set = backends(&[1, 1, 2]);
        let mut s = strategy(&set);
        let mut counts = [0u32; 3];
        for client in networks() {
            counts[s.pick(client).unwrap() as usize] += 1;
        }
        // 6271 hash values over a total weight of 4: within 2 % of the shares.
        for (got, share) in counts.iter().zip([16_384u32, 16_384, 32_768]) {
            assert!(got.abs_diff(share) < share / 50, "{counts:?}");
        }
    }

    #[test]
    fn a_backend_going_down_moves_only_its_clients() {
        let mut set = backends(&[1, 1, 1, 1]);
        let mut s = strategy(&set);
        let before: Vec<u32> = networks().map(|c| s.pick(c).unwrap()).collect();
        set[2].healthy = false;
        s.set_backends(set.clone());
        let after: Vec<u32> = networks().map(|c| s.pick(c).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b == 2 {
                assert_ne!(*a, 2);
            } else {
                assert_eq!(a, b, "a client of a healthy backend moved");
            }
        }
        // And they come back when it returns.
        set[2].healthy = true;
        s.set_backends(set);
        assert!(networks().map(|c| s.pick(c).unwrap()).eq(before));
    }

    #[test]
    fn ipv6_clients_hash_all_sixteen_octets() {
        let mut s = strategy(&backends(&[1; 8]));
        let ids: std::collections::BTreeSet<u32> = (0..64u16)
            .map(|i| {
                let ip = wasmlb_sdk::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
                s.pick(SocketAddr::new(ip.into(), 1)).unwrap()
            })
            .collect();
        // Differing only in the last octets, they still spread.
        assert!(ids.len() > 1, "{ids:?}");
    }

    #[test]
    fn none_healthy_is_unavailable() {
        let mut set = backends(&[1, 1]);
        set.iter_mut().for_each(|b| b.healthy = false);
        assert_eq!(strategy(&set).pick(v4(10, 0, 0, 1)), None);
    }
}
