//! `least-connections`: fewest in-flight requests relative to weight.
//!
//! Source: HAProxy `balance leastconn` (`src/lb_fwlc.c`): a server's key is
//! its in-flight count divided by its weight, the lowest key wins, and servers
//! with equal keys are used in turn. Here the keys `in_flight / weight` are
//! compared exactly by cross-multiplication, and ties are broken in rotation:
//! the scan starts just after the previously chosen backend.
//!
//! Per pick: one `in-flight-all` host call and an O(n) scan. Backends marked
//! unhealthy are skipped; with none healthy the answer is `Unavailable`.
//!
//! State hand-off: the tie-breaking cursor survives a plugin swap (format `lc1`).
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;

/// Least-connections state.
#[derive(Debug, Default)]
pub struct LeastConnections {
    backends: Vec<Backend>,
    /// Last id chosen; the next scan starts after it.
    cursor: usize,
}

impl LeastConnections {
    /// The healthy backend with the lowest `in_flight / weight`, ties broken
    /// in rotation after `self.cursor`. `in_flight` is indexed by id; a
    /// missing entry counts as 0.
    pub fn pick(&mut self, in_flight: &[u32]) -> Option<u32> {
        let n = self.backends.len();
        let mut best: Option<(usize, u64, u64)> = None; // (id, in_flight, weight)
        // One division, then two plain ranges: a `%` per step costs more
        // than the rest of the loop body.
        let start = self.cursor.wrapping_add(1) % n.max(1);
        for id in (start..n).chain(0..start) {
            let b = &self.backends[id];
            if !b.healthy {
                continue;
            }
            let load = u64::from(in_flight.get(id).copied().unwrap_or(0));
            let weight = u64::from(b.weight.max(1));
            // load / weight < best_load / best_weight, without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
                best = Some((id, load, weight));
            }
        }
        let (id, _, _) = best?;
        self.cursor = id;
        Some(id as u32)
    }
}

impl Strategy for LeastConnections {
    type Config = NoConfig;

    fn new(_: NoConfig) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.backends = backends;
        self.cursor = usize::MAX; // the first scan starts at id 0
    }

    fn select(&mut self, cx: &dyn Context) -> Decision {
        if self.backends.is_empty() {
            return Decision::Unavailable;
        }
        match self.pick(&cx.in_flight_all()) {
            Some(id) => Decision::Backend(id),
            None => Decision::Unavailable,
        }
    }

    /// `lc1\0` then the cursor (u64 LE).
    fn export_state(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        out.extend_from_slice(STATE_TAG);
        out.extend_from_slice(&(self.cursor as u64).to_le_bytes());
        out
    }

    fn import_state(&mut self, state: &[u8]) -> Result<(), String> {
        match (state.get(..4), state.get(4..12)) {
            (Some(tag), Some(cursor)) if tag == STATE_TAG => {
                let mut le = [0u8; 8];
                le.copy_from_slice(cursor);
                self.cursor = usize::try_from(u64::from_le_bytes(le)).unwrap_or(usize::MAX);
                Ok(())
            }
            _ => Err("not least-connections state (no lc1 tag)".into()),
        }
    }
}

/// Format tag of the exported state.
const STATE_TAG: &[u8; 4] = b"lc1\0";

wasmlb_sdk::export_strategy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    #[test]
    fn idle_backends_rotate() {
        let set = backends(&[1, 1, 1]);
        let counts = spread::<LeastConnections>("{}", &set, &MockContext::new(&set), 30).unwrap();
        assert_eq!(counts, vec![10, 10, 10]);
    }

    #[test]
    fn busiest_backend_is_avoided() {
        let set = backends(&[1, 1, 1]);
        let cx = MockContext::new(&set).with_in_flight(&[5, 0, 5]);
        let counts = spread::<LeastConnections>("{}", &set, &cx, 10).unwrap();
        assert_eq!(counts, vec![0, 10, 0]);
    }

    #[test]
    fn load_is_relative_to_weight() {
        // 4 in flight at weight 4 (key 1) beats 2 in flight at weight 1 (key 2).
        let set = backends(&[4, 1]);
        let cx = MockContext::new(&set).with_in_flight(&[4, 2]);
        let counts = spread::<LeastConnections>("{}", &set, &cx, 5).unwrap();
        assert_eq!(counts, vec![5, 0]);
    }

    #[test]
    fn ties_rotate_among_the_least_loaded() {
        let set = backends(&[1, 1, 1, 1]);
        let cx = MockContext::new(&set).with_in_flight(&[1, 0, 1, 0]);
        let counts = spread::<LeastConnections>("{}", &set, &cx, 10).unwrap();
        assert_eq!(counts, vec![0, 5, 0, 5]);
    }

    #[test]
    fn state_hand_off_keeps_the_tie_rotation() {
        let set = backends(&[1, 1, 1]);
        let cx = MockContext::new(&set);
        let mut a: LeastConnections = wasmlb_sdk::instantiate("{}").unwrap();
        a.set_backends(set.clone());
        assert_eq!(a.select(&cx), Decision::Backend(0));
        let mut b: LeastConnections = wasmlb_sdk::instantiate("{}").unwrap();
        b.set_backends(set.clone());
        b.import_state(&a.export_state()).unwrap();
        assert_eq!(b.select(&cx), Decision::Backend(1));
        assert!(b.import_state(b"rr1\0").is_err());
    }

    #[test]
    fn unhealthy_backends_are_skipped() {
        let mut set = backends(&[1, 1]);
        set[0].healthy = false;
        let counts = spread::<LeastConnections>("{}", &set, &MockContext::new(&set), 4).unwrap();
        assert_eq!(counts, vec![0, 4]);
        set[1].healthy = false;
        let mut lc: LeastConnections = wasmlb_sdk::instantiate("{}").unwrap();
        lc.set_backends(set.clone());
        assert_eq!(lc.select(&MockContext::new(&set)), Decision::Unavailable);
    }
}
