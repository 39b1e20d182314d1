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

use crate::Backend;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::backends;

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
    fn empty_table_picks_nothing() {
        let mut set = backends(&[1]);
        set[0].healthy = false;
        let table = WeightedTable::new(&set);
        assert!(table.is_empty());
        assert_eq!(table.pick(&mut fastrand::Rng::with_seed(1)), None);
    }
}
