//! A partition's index: what each offset still in a slot (or an end
//! marker) is. Offsets are put in at the partition's end and mostly leave
//! from its front, so the recent ones live in a ring indexed by offset
//! (`O(1)` insert, lookup and removal, no allocation once grown): a
//! `BTreeMap` there cost a third of the stream's bookkeeping per batch.
//! Entries far behind the end (a batch a stuck member holds while the
//! stream runs on; a disk stream's read-back of old offsets) go to an
//! ordered map instead, so that the ring never spans more than `cap`
//! offsets, however far apart the entries are.

use std::collections::{BTreeMap, VecDeque};
use std::ops::{Bound, RangeBounds};

use super::Entry;

#[derive(Debug)]
pub struct OffsetIndex {
    /// The offset of `ring[0]`; every key of `sparse` is below it.
    base: u64,
    /// Offsets `base..base + ring.len()`; the first and last are `Some`
    /// (or the ring is empty).
    ring: VecDeque<Option<Entry>>,
    /// How many of `ring` are `Some`.
    in_ring: usize,
    sparse: BTreeMap<u64, Entry>,
    /// The most offsets the ring spans.
    cap: usize,
}

impl Default for OffsetIndex {
    fn default() -> Self {
        OffsetIndex::new(1024)
    }
}

/// `[lo, hi)` of a range of offsets.
fn bounds(r: &impl RangeBounds<u64>) -> (u64, u64) {
    let lo = match r.start_bound() {
        Bound::Included(&a) => a,
        Bound::Excluded(&a) => a.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let hi = match r.end_bound() {
        Bound::Included(&b) => b.saturating_add(1),
        Bound::Excluded(&b) => b,
        Bound::Unbounded => u64::MAX,
    };
    (lo, hi.max(lo))
}

impl OffsetIndex {
    /// An index whose ring spans at most `cap` offsets (at least 1).
    pub fn new(cap: usize) -> OffsetIndex {
        OffsetIndex {
            base: 0,
            ring: VecDeque::new(),
            in_ring: 0,
            sparse: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    fn end(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    pub fn len(&self) -> usize {
        self.in_ring + self.sparse.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, o: &u64) -> Option<&Entry> {
        if *o >= self.base {
            self.ring.get((*o - self.base) as usize)?.as_ref()
        } else {
            self.sparse.get(o)
        }
    }

    pub fn contains_key(&self, o: &u64) -> bool {
        self.get(o).is_some()
    }

    pub fn insert(&mut self, o: u64, e: Entry) -> Option<Entry> {
        // A publish: the next offset at the end.
        if o == self.end() && !self.ring.is_empty() && self.ring.len() < self.cap {
            self.ring.push_back(Some(e));
            self.in_ring += 1;
            return None;
        }
        let above_all =
            self.ring.is_empty() && self.sparse.last_key_value().is_none_or(|(&k, _)| k < o);
        if o < self.base && !above_all {
            return self.sparse.insert(o, e);
        }
        if self.ring.is_empty() {
            self.base = o;
        }
        // The ring spans at most `cap` offsets up to `o`: what falls out
        // of it goes to the ordered map.
        let need = (o + 1).saturating_sub(self.cap as u64);
        while self.base < need && !self.ring.is_empty() {
            self.pop_front();
        }
        if self.ring.is_empty() {
            self.base = o;
        }
        let at = (o - self.base) as usize;
        if at >= self.ring.len() {
            self.ring.resize(at + 1, None);
        }
        let old = self.ring[at].replace(e);
        if old.is_none() {
            self.in_ring += 1;
        }
        self.trim();
        old
    }

    fn pop_front(&mut self) {
        if let Some(Some(e)) = self.ring.pop_front() {
            self.in_ring -= 1;
            self.sparse.insert(self.base, e);
        }
        self.base += 1;
    }

    /// Holes at the ring's ends go.
    fn trim(&mut self) {
        while matches!(self.ring.front(), Some(None)) {
            self.ring.pop_front();
            self.base += 1;
        }
        while matches!(self.ring.back(), Some(None)) {
            self.ring.pop_back();
        }
    }

    pub fn remove(&mut self, o: &u64) -> Option<Entry> {
        if *o < self.base {
            return self.sparse.remove(o);
        }
        let old = self.ring.get_mut((*o - self.base) as usize)?.take();
        if old.is_some() {
            self.in_ring -= 1;
            self.trim();
        }
        old
    }

    /// The lowest offset and its entry.
    pub fn first_key_value(&self) -> Option<(u64, &Entry)> {
        if let Some((&o, e)) = self.sparse.first_key_value() {
            return Some((o, e));
        }
        self.ring.front()?.as_ref().map(|e| (self.base, e))
    }

    /// Offsets in `r` that have an entry, ascending (or descending with
    /// `rev`).
    pub fn range(
        &self,
        r: impl RangeBounds<u64>,
    ) -> impl DoubleEndedIterator<Item = (u64, &Entry)> + '_ {
        let (lo, hi) = bounds(&r);
        let base = self.base;
        let sparse = self
            .sparse
            .range(lo..hi.min(base).max(lo))
            .map(|(&o, e)| (o, e));
        let from = lo.clamp(base, self.end());
        let to = hi.clamp(from, self.end());
        let ring = self
            .ring
            .range((from - base) as usize..(to - base) as usize)
            .enumerate()
            .filter_map(move |(i, e)| e.as_ref().map(|e| (from + i as u64, e)));
        sparse.chain(ring)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (u64, &Entry)> + '_ {
        self.range(..)
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.range(..).map(|(o, _)| o)
    }

    pub fn values(&self) -> impl Iterator<Item = &Entry> + '_ {
        self.sparse.values().chain(self.ring.iter().flatten())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Entry> + '_ {
        self.sparse
            .values_mut()
            .chain(self.ring.iter_mut().flatten())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn e(n: u64) -> Entry {
        Entry {
            len: n,
            ..Entry::marker(0)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert at the end plus `gap`.
        Push(u8),
        /// Insert at an offset below the end (a read-back).
        Back(u8),
        Remove(u8),
        RemoveFirst,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3).prop_map(Op::Push),
            1 => any::<u8>().prop_map(Op::Back),
            3 => any::<u8>().prop_map(Op::Remove),
            2 => Just(Op::RemoveFirst),
        ]
    }

    proptest! {
        /// Behaves as a `BTreeMap` under the partition's operations,
        /// whatever the spread of its offsets, and the ring stays within
        /// its cap.
        #[test]
        fn is_an_ordered_map(ops in proptest::collection::vec(op(), 1..200), cap in 1usize..12) {
            let mut x = OffsetIndex::new(cap);
            let mut m: BTreeMap<u64, Entry> = BTreeMap::new();
            let mut end = 0u64;
            for (i, op) in ops.iter().enumerate() {
                let v = e(i as u64);
                match *op {
                    Op::Push(gap) => {
                        let o = end + gap as u64;
                        end = o + 1;
                        prop_assert_eq!(x.insert(o, v), m.insert(o, v));
                    }
                    Op::Back(k) => {
                        let o = (k as u64) % (end + 1);
                        prop_assert_eq!(x.insert(o, v), m.insert(o, v));
                        end = end.max(o + 1);
                    }
                    Op::Remove(k) => {
                        let o = (k as u64) % (end + 1);
                        prop_assert_eq!(x.remove(&o), m.remove(&o));
                    }
                    Op::RemoveFirst => {
                        let f = m.first_key_value().map(|(&o, e)| (o, *e));
                        prop_assert_eq!(x.first_key_value().map(|(o, e)| (o, *e)), f);
                        if let Some((o, _)) = f {
                            prop_assert_eq!(x.remove(&o), m.remove(&o));
                        }
                    }
                }
                prop_assert!(x.ring.len() <= cap);
                prop_assert_eq!(x.len(), m.len());
                let all: Vec<(u64, Entry)> = x.iter().map(|(o, e)| (o, *e)).collect();
                let want: Vec<(u64, Entry)> = m.iter().map(|(&o, e)| (o, *e)).collect();
                prop_assert_eq!(&all, &want);
                let a = (i as u64 * 7) % (end + 2);
                let b = a + (i as u64 % 5);
                let got: Vec<u64> = x.range(a..b).rev().map(|(o, _)| o).collect();
                let want: Vec<u64> = m.range(a..b).rev().map(|(&o, _)| o).collect();
                prop_assert_eq!(got, want);
                for o in 0..end + 1 {
                    prop_assert_eq!(x.get(&o), m.get(&o));
                }
            }
        }
    }
}
