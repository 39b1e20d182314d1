//! Weighted random choice over the healthy backends, in O(log n) per pick.
//!
//! ```
//! use wasmlb_sdk::testing::backends;
//! use wasmlb_sdk::weighted::WeightedTable;
//! let table = WeightedTable::new(&backends(&[1, 3]));
//! assert_eq!(table.total(), 4);
//! // Points 0..4 of the weight line: backend 0 owns [0, 1), backend 1 [1, 4).
//! assert_eq!(table.at(0), Some(0));
//! assert_eq!(table.at(1), Some(1));
//! assert_eq!(table.at(3), Some(1));
//! ```

use alloc::vec::Vec;

use crate::{Backend, Context, Decision};

/// The healthy backends laid end to end on a line of length
/// [`WeightedTable::total`], each owning a stretch as long as its weight.
/// Built once per [`crate::Strategy::set_backends`]; a pick is a binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightedTable {
    ids: Vec<u32>,
    /// Exclusive end of each backend's stretch.
    ends: Vec<u64>,
}

impl WeightedTable {
    /// The table of the healthy backends of `backends` (weight 0 counts as 1).
    pub fn new(backends: &[Backend]) -> Self {
        let mut table = Self::default();
        let mut end = 0u64;
        for b in backends.iter().filter(|b| b.healthy) {
            end += u64::from(b.weight.max(1));
            table.ids.push(b.id);
            table.ends.push(end);
        }
        table
    }

    /// Sum of the healthy backends' weights; 0 when none is healthy.
    pub fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Number of healthy backends.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no backend is healthy.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The backend owning point `point` of the line (`point < total()`);
    /// `None` past the end or when the table is empty.
    pub fn at(&self, point: u64) -> Option<u32> {
        let i = self.ends.partition_point(|&end| end <= point);
        self.ids.get(i).copied()
    }

    /// A backend chosen with probability proportional to its weight.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> Option<u32> {
        match self.total() {
            0 => None,
            total => self.at(rng.u64(..total)),
        }
    }

    /// Two distinct backends, each drawn with probability proportional to
    /// its weight, the second among the others (weighted sampling without
    /// replacement). With one healthy backend, that backend twice; `None`
    /// with none.
    pub fn pick_two(&self, rng: &mut fastrand::Rng) -> Option<(u32, u32)> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let first_point = rng.u64(..total);
        let i = self.ends.partition_point(|&end| end <= first_point);
        let first = *self.ids.get(i)?;
        if self.ids.len() == 1 {
            return Some((first, first));
        }
        // Draw on the line with the first backend's stretch cut out.
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let len = self.ends[i] - start;
        let mut point = rng.u64(..total - len);
        if point >= start {
            point += len;
        }
        Some((first, self.at(point)?))
    }
}

/// `plugin_config` of a random strategy whose only setting is its seed
/// (the built-in `random` and `p2c`): `{"seed": 7}` fixes the random
/// sequence, for reproducible tests; `{}` seeds from the host's clock.
/// Other keys are rejected, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeedConfig {
    /// Seed of the random sequence; absent: seeded from the clock.
    pub seed: Option<u64>,
}

/// Power of two choices (M. Mitzenmacher, IEEE TPDS 2001; Envoy
/// `LEAST_REQUEST`, HAProxy `random(2)`, linkerd2): draw two distinct healthy
/// backends with probability proportional to weight, and take the one whose
/// `load / weight` is lower (the first draw on a tie). The built-in `p2c`
/// and `peak-ewma` strategies are this with different loads.
#[derive(Debug, Clone, Default)]
pub struct TwoChoices {
    table: WeightedTable,
    weights: Vec<u32>,
    rng: Option<fastrand::Rng>,
}

impl TwoChoices {
    /// With `seed`, a fixed random sequence; without, seeded from the host's
    /// clock on the first pick.
    pub fn new(seed: Option<u64>) -> Self {
        Self {
            rng: seed.map(fastrand::Rng::with_seed),
            ..Self::default()
        }
    }

    /// Take a new backend set (call from `Strategy::set_backends`).
    pub fn set_backends(&mut self, backends: &[Backend]) {
        self.table = WeightedTable::new(backends);
        self.weights = backends.iter().map(|b| b.weight.max(1)).collect();
    }

    /// Choose for one request; `load(id)` is read for the two drawn
    /// backends only. One healthy backend is chosen without reading its
    /// load; none gives `Unavailable`.
    pub fn select(&mut self, cx: &dyn Context, mut load: impl FnMut(u32) -> u128) -> Decision {
        let rng = self
            .rng
            .get_or_insert_with(|| fastrand::Rng::with_seed(cx.monotonic_now()));
        let Some((a, b)) = self.table.pick_two(rng) else {
            return Decision::Unavailable;
        };
        if a == b {
            return Decision::Backend(a);
        }
        let weight = |id: u32| u128::from(self.weights.get(id as usize).copied().unwrap_or(1));
        // load_b / weight_b < load_a / weight_a, without division.
        if load(b) * weight(a) < load(a) * weight(b) {
            Decision::Backend(b)
        } else {
            Decision::Backend(a)
        }
    }
}

/// NGINX's smooth weighted round-robin (`ngx_http_upstream_get_peer`, nginx
/// 1.3.1): each pick adds every eligible item's weight to its current
/// weight, takes the largest (first on ties) and subtracts the total from
/// it. Over any `sum(weights)` picks each item is chosen exactly `weight`
/// times, spread out (5:1:1 gives `a a b a c a a`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Smooth {
    current: Vec<i64>,
}

impl Smooth {
    /// State for `n` items, indexed `0..n`.
    pub fn new(n: usize) -> Self {
        Self {
            current: alloc::vec![0; n],
        }
    }

    /// The current weights, one per item (for exporting state).
    pub fn current(&self) -> &[i64] {
        &self.current
    }

    /// Restore current weights exported with [`Smooth::current`]; ignored
    /// unless there is one per item.
    pub fn restore(&mut self, current: &[i64]) {
        if current.len() == self.current.len() {
            self.current.copy_from_slice(current);
        }
    }

    /// Pick among `eligible` `(index, weight)` pairs (indexes below `n`;
    /// weight 0 counts as 1). `None` when nothing is eligible.
    pub fn pick(&mut self, eligible: impl Iterator<Item = (usize, u32)> + Clone) -> Option<usize> {
        let total: i64 = eligible.clone().map(|(_, w)| i64::from(w.max(1))).sum();
        let mut best: Option<usize> = None;
        for (i, w) in eligible {
            let slot = self.current.get_mut(i)?;
            *slot += i64::from(w.max(1));
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// Round-robin over a fixed list of `(id, weight)` members: an O(1) cursor
/// when every weight is equal, otherwise NGINX's smooth weighted round-robin
/// ([`Smooth`]). What `round-robin`, `sticky` (for new sessions) and
/// `canary` (within a group) rotate with; build it in
/// [`crate::Strategy::set_backends`].
///
/// ```
/// use wasmlb_sdk::testing::backends;
/// use wasmlb_sdk::weighted::Rotation;
/// let mut r = Rotation::healthy(&backends(&[5, 1, 1]));
/// let picks: Vec<u32> = (0..7).map(|_| r.next().unwrap()).collect();
/// assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
/// let mut r = Rotation::healthy(&backends(&[2, 2]));
/// assert_eq!([r.next(), r.next(), r.next()], [Some(0), Some(1), Some(0)]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    members: Vec<(u32, u32)>,
    equal: bool,
    /// Index into `members` of the last equal-weight pick.
    cursor: usize,
    smooth: Smooth,
}

impl Rotation {
    /// Rotate over `members`, `(id, weight)` in order (weight 0 counts as 1).
    /// The first pick is the first member.
    pub fn new(members: Vec<(u32, u32)>) -> Self {
        let members: Vec<(u32, u32)> = members.into_iter().map(|(id, w)| (id, w.max(1))).collect();
        Self {
            equal: members.windows(2).all(|w| w[0].1 == w[1].1),
            cursor: members.len().saturating_sub(1),
            smooth: Smooth::new(members.len()),
            members,
        }
    }

    /// Rotate over the healthy backends of a set, in id order.
    pub fn healthy(backends: &[Backend]) -> Self {
        Self::new(
            backends
                .iter()
                .filter(|b| b.healthy)
                .map(|b| (b.id, b.weight))
                .collect(),
        )
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when there is no member to pick.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The rotation's position, for exporting state: the cursor (equal
    /// weights) and the smooth current weights (one per member).
    pub fn position(&self) -> (usize, &[i64]) {
        (self.cursor, self.smooth.current())
    }

    /// Restore a position exported with [`Rotation::position`]; a cursor out
    /// of range, or weights for another number of members, are ignored.
    pub fn restore(&mut self, cursor: usize, current: &[i64]) {
        if cursor < self.members.len() {
            self.cursor = cursor;
        }
        self.smooth.restore(current);
    }
}

impl Iterator for Rotation {
    type Item = u32;

    /// The next member's id; `None` only when there is no member (the
    /// rotation never ends otherwise).
    fn next(&mut self) -> Option<u32> {
        if self.members.is_empty() {
            return None;
        }
        if self.equal {
            self.cursor = (self.cursor + 1) % self.members.len();
            return Some(self.members[self.cursor].0);
        }
        let eligible = self.members.iter().enumerate().map(|(i, &(_, w))| (i, w));
        self.smooth.pick(eligible).map(|i| self.members[i].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::backends;

    #[test]
    fn rotation_skips_unhealthy_and_restores_its_position() {
        let mut set = backends(&[1, 1, 1]);
        set[1].healthy = false;
        let mut r = Rotation::healthy(&set);
        assert_eq!([r.next(), r.next(), r.next()], [Some(0), Some(2), Some(0)]);
        let (cursor, current) = r.position();
        let current = current.to_vec();
        let mut again = Rotation::healthy(&set);
        again.restore(cursor, &current);
        assert_eq!(again.next(), Some(2));
        assert_eq!(Rotation::new(Vec::new()).next(), None);
    }

    #[test]
    fn unhealthy_backends_own_nothing() {
        let mut set = backends(&[2, 5, 3]);
        set[1].healthy = false;
        let table = WeightedTable::new(&set);
        assert_eq!(table.total(), 5);
        assert_eq!(table.len(), 2);
        assert_eq!(
            (0..5).map(|p| table.at(p).unwrap()).collect::<Vec<_>>(),
            [0, 0, 2, 2, 2]
        );
        assert_eq!(table.at(5), None);
    }

    #[test]
    fn picks_follow_weights() {
        let table = WeightedTable::new(&backends(&[1, 2, 7]));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[table.pick(&mut rng).unwrap() as usize] += 1;
        }
        for (got, weight) in counts.iter().zip([1u32, 2, 7]) {
            let expected = 10_000 * weight;
            assert!(got.abs_diff(expected) < expected / 20, "{counts:?}");
        }
    }

    #[test]
    fn pick_two_never_repeats_and_follows_weights() {
        let table = WeightedTable::new(&backends(&[1, 1, 2]));
        let mut rng = fastrand::Rng::with_seed(3);
        let mut firsts = [0u32; 3];
        for _ in 0..40_000 {
            let (a, b) = table.pick_two(&mut rng).unwrap();
            assert_ne!(a, b);
            firsts[a as usize] += 1;
        }
        for (got, expected) in firsts.iter().zip([10_000u32, 10_000, 20_000]) {
            assert!(got.abs_diff(expected) < expected / 20, "{firsts:?}");
        }
        let single = WeightedTable::new(&backends(&[4]));
        assert_eq!(single.pick_two(&mut rng), Some((0, 0)));
    }

    #[test]
    fn smooth_weighting_interleaves() {
        let mut s = Smooth::new(3);
        let picks: Vec<usize> = (0..7)
            .map(|_| s.pick([(0, 5), (1, 1), (2, 1)].into_iter()).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(Smooth::new(0).pick(core::iter::empty()), None);
    }

    #[test]
    fn empty_table_picks_nothing() {
        let mut set = backends(&[1]);
        set[0].healthy = false;
        let table = WeightedTable::new(&set);
        assert!(table.is_empty());
        assert_eq!(table.pick(&mut fastrand::Rng::with_seed(1)), None);
    }
}
