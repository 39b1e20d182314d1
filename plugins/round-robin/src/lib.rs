//! `round-robin`: NGINX's smooth weighted round-robin.
//!
//! Source: NGINX `ngx_http_upstream_get_peer()` in
//! `src/http/ngx_http_upstream_round_robin.c` (smooth weighting, nginx 1.3.1,
//! 2012). Each pick adds every healthy backend's weight to its
//! `current_weight`, chooses the largest (first on ties), and subtracts the
//! total weight from the chosen one. Over any window of `sum(weights)` picks
//! each backend is chosen exactly `weight` times, and picks of a heavy backend
//! are spread out rather than bunched (weights 5:1:1 give `a a b a c a a`).
//!
//! With all weights equal this is plain rotation, which is computed in O(1);
//! unequal weights cost O(n) per pick, as in NGINX.
//!
//! Backends marked unhealthy are skipped. With no healthy backend the answer
//! is `Unavailable` (the host answers 503). State is the upstream's: one
//! rotation across all requests, whatever thread serves them.
//!
//! State hand-off: across a plugin swap the rotation continues where it was
//! (cursor and NGINX current weights), format `rr1`, see [`RoundRobin::export_state`].
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::weighted::Rotation;

/// Smooth weighted round-robin state.
#[derive(Debug, Default)]
pub struct RoundRobin {
    rotation: Rotation,
}

impl Strategy for RoundRobin {
    type Config = NoConfig;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.rotation = Rotation::healthy(&backends);
    }

    fn select(&mut self, _cx: &dyn Context) -> Decision {
        match self.rotation.next() {
            Some(id) => Decision::Backend(id),
            None => Decision::Unavailable,
        }
    }

    fn export_state(&self) -> Vec<u8> {
        self.encode()
    }

    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.decode(state)
    }
}

const STATE_TAG: &[u8; 4] = b"rr1\0";

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let chunk: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(chunk))
}

impl RoundRobin {
    /// `rr1\0`, the cursor, the number of weights, then each smooth weight
    /// (all little-endian u64/i64).
    fn encode(&self) -> Vec<u8> {
        let (cursor, current) = self.rotation.position();
        let mut out = Vec::with_capacity(4 + 16 + 8 * current.len());
        out.extend_from_slice(STATE_TAG);
        out.extend_from_slice(&(cursor as u64).to_le_bytes());
        out.extend_from_slice(&(current.len() as u64).to_le_bytes());
        for w in current {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    fn decode(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.get(..4) != Some(STATE_TAG.as_slice()) {
            return Err("not round-robin state (no rr1 tag)".into());
        }
        let bad = || String::from("truncated round-robin state");
        let cursor = read_u64(bytes, 4).ok_or_else(bad)?;
        let n = read_u64(bytes, 12).ok_or_else(bad)?;
        let n = usize::try_from(n).map_err(|_| bad())?;
        if n > bytes.len() / 8 {
            return Err(bad());
        }
        let mut current = Vec::with_capacity(n);
        for i in 0..n {
            current.push(read_u64(bytes, 20 + 8 * i).ok_or_else(bad)? as i64);
        }
        self.rotation
            .restore(usize::try_from(cursor).unwrap_or(usize::MAX), &current);
        Ok(())
    }
}

wasmlb_sdk::export_strategy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    fn picks(weights: &[u32], n: usize) -> Vec<u32> {
        let set = backends(weights);
        let mut rr: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
        rr.set_backends(set.clone());
        let cx = MockContext::new(&set);
        (0..n)
            .map(|_| match rr.select(&cx) {
                Decision::Backend(id) => id,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        assert_eq!(picks(&[1, 1, 1, 1], 8), vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn smooth_sequence_matches_nginx() {
        // The example from the NGINX commit message: weights 5, 1, 1.
        assert_eq!(picks(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_one_to_three_split_exactly() {
        let set = backends(&[1, 3]);
        let counts = spread::<RoundRobin>("{}", &set, &MockContext::new(&set), 100).unwrap();
        assert_eq!(counts, vec![25, 75]);
    }

    #[test]
    fn unhealthy_backends_are_skipped() {
        for weights in [[1u32, 1, 1], [2, 1, 1]] {
            let mut set = backends(&weights);
            set[1].healthy = false;
            let counts = spread::<RoundRobin>("{}", &set, &MockContext::new(&set), 30).unwrap();
            assert_eq!(counts[1], 0, "weights {weights:?}: {counts:?}");
            assert_eq!(counts.iter().sum::<u32>(), 30);
        }
    }

    #[test]
    fn no_healthy_backend_is_unavailable() {
        let mut set = backends(&[1, 1]);
        set.iter_mut().for_each(|b| b.healthy = false);
        let mut rr: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
        rr.set_backends(set.clone());
        assert_eq!(rr.select(&MockContext::new(&set)), Decision::Unavailable);
        rr.set_backends(Vec::new());
        assert_eq!(rr.select(&MockContext::new(&[])), Decision::Unavailable);
    }

    #[test]
    fn state_hand_off_continues_the_rotation() {
        for weights in [vec![1u32, 1, 1, 1], vec![5, 1, 1]] {
            let set = backends(&weights);
            let cx = MockContext::new(&set);
            let mut a: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
            a.set_backends(set.clone());
            let mut reference: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
            reference.set_backends(set.clone());
            for _ in 0..2 {
                a.select(&cx);
                reference.select(&cx);
            }
            let mut b: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
            b.set_backends(set.clone());
            b.import_state(&a.export_state()).unwrap();
            for _ in 0..10 {
                assert_eq!(b.select(&cx), reference.select(&cx), "weights {weights:?}");
            }
        }
        let mut rr: RoundRobin = wasmlb_sdk::instantiate("{}").unwrap();
        assert!(rr.import_state(b"lc1\0abc").is_err());
        assert!(rr.import_state(b"rr1\0").is_err());
    }

    #[test]
    fn config_keys_are_rejected() {
        let err = wasmlb_sdk::instantiate::<RoundRobin>(r#"{"x":1}"#).unwrap_err();
        assert!(err.contains("unknown field `x`"), "{err}");
    }
}
