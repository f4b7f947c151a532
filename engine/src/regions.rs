//! The region bitmap: which parts of the export are clean on the target, which
//! were discarded, which can no longer be verified, and which have writes whose
//! intent must survive a crash.
//!
//! One bit per region per property (1 TiB at 64 KiB is 16 Mi regions: 2 MiB per
//! bitmap). Nothing here allocates per region or per request.

use std::ops::{Deref, DerefMut, Range};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use bitvec::prelude::*;

pub type Bits = BitVec<u64, Lsb0>;

pub const MIN_REGION_SIZE: u64 = 4096;
pub const MAX_REGION_SIZE: u64 = 64 << 20;
pub const DEFAULT_REGION_SIZE: u64 = 64 << 10;

/// Checks a region size against the documented limits.
pub fn validate_region_size(size: u64) -> Result<u32, String> {
    if !size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&size) {
        return Err(format!(
            "region size {size} must be a power of two between {} and {} bytes",
            MIN_REGION_SIZE, MAX_REGION_SIZE
        ));
    }
    Ok(size.trailing_zeros())
}

#[derive(Clone, Debug)]
pub struct RegionMap {
    shift: u32,
    export_size: u64,
    /// T holds exactly S's bytes here, and every later write reaches both.
    clean: Bits,
    /// Wholly trimmed while not on the target: reads as zeroes until written.
    discarded: Bits,
    /// S and T may legitimately differ here (a trim or a skipped copy).
    unverifiable: Bits,
    clean_count: u64,
    discarded_count: u64,
    unverifiable_count: u64,
}

impl RegionMap {
    pub fn new(export_size: u64, region_shift: u32) -> RegionMap {
        let n = Self::count_for(export_size, region_shift);
        RegionMap {
            shift: region_shift,
            export_size,
            clean: bitvec![u64, Lsb0; 0; n],
            discarded: bitvec![u64, Lsb0; 0; n],
            unverifiable: bitvec![u64, Lsb0; 0; n],
            clean_count: 0,
            discarded_count: 0,
            unverifiable_count: 0,
        }
    }

    fn count_for(size: u64, shift: u32) -> usize {
        size.div_ceil(1u64 << shift) as usize
    }

    pub fn region_size(&self) -> u64 {
        1u64 << self.shift
    }
    pub fn shift(&self) -> u32 {
        self.shift
    }
    pub fn len(&self) -> usize {
        self.clean.len()
    }
    pub fn is_empty(&self) -> bool {
        self.clean.is_empty()
    }
    pub fn export_size(&self) -> u64 {
        self.export_size
    }
    pub fn clean_count(&self) -> u64 {
        self.clean_count
    }
    pub fn all_clean(&self) -> bool {
        self.clean_count == self.len() as u64
    }

    /// Byte range of region `r` (the last one may be short).
    pub fn byte_range(&self, r: usize) -> Range<u64> {
        let start = (r as u64) << self.shift;
        start..(start + self.region_size()).min(self.export_size)
    }

    /// Byte range of regions `rs`.
    pub fn bytes_of(&self, rs: Range<usize>) -> Range<u64> {
        let start = (rs.start as u64) << self.shift;
        let end = ((rs.end as u64) << self.shift).min(self.export_size);
        start..end.max(start)
    }

    /// Regions touched by the byte range (empty for an empty range).
    pub fn regions_touching(&self, off: u64, len: u64) -> Range<usize> {
        if len == 0 {
            return 0..0;
        }
        let first = (off >> self.shift) as usize;
        let last = ((off + len - 1) >> self.shift) as usize;
        first..(last + 1).min(self.len())
    }

    /// Regions wholly covered by the byte range. The last region counts as
    /// covered when the range reaches the end of the export.
    pub fn regions_covered(&self, off: u64, len: u64) -> Range<usize> {
        let end = (off + len).min(self.export_size);
        let first = off.div_ceil(self.region_size()) as usize;
        let last = if end == self.export_size { self.len() } else { (end >> self.shift) as usize };
        if first >= last {
            0..0
        } else {
            first..last
        }
    }

    pub fn is_clean(&self, r: usize) -> bool {
        self.clean[r]
    }

    pub fn set_clean(&mut self, rs: Range<usize>, clean: bool) {
        set_counted(&mut self.clean, &mut self.clean_count, rs, clean);
    }

    pub fn set_all_dirty(&mut self) {
        self.clean.fill(false);
        self.clean_count = 0;
    }

    pub fn is_discarded(&self, r: usize) -> bool {
        self.discarded[r]
    }
    pub fn discarded_count(&self) -> u64 {
        self.discarded_count
    }
    pub fn set_discarded(&mut self, rs: Range<usize>, on: bool) {
        set_counted(&mut self.discarded, &mut self.discarded_count, rs, on);
    }

    pub fn is_unverifiable(&self, r: usize) -> bool {
        self.unverifiable[r]
    }
    pub fn unverifiable_count(&self) -> u64 {
        self.unverifiable_count
    }
    pub fn set_unverifiable(&mut self, rs: Range<usize>, on: bool) {
        set_counted(&mut self.unverifiable, &mut self.unverifiable_count, rs, on);
    }
    pub fn clear_unverifiable(&mut self) {
        self.unverifiable.fill(false);
        self.unverifiable_count = 0;
    }

    pub fn clean_bits(&self) -> &Bits {
        &self.clean
    }
    pub fn discarded_bits(&self) -> &Bits {
        &self.discarded
    }
    pub fn unverifiable_bits(&self) -> &Bits {
        &self.unverifiable
    }

    /// Replaces the bitmaps (loaded from a state file); lengths must match.
    pub fn load(&mut self, clean: Bits, discarded: Bits, unverifiable: Bits) -> Result<(), String> {
        let n = self.len();
        if clean.len() != n || discarded.len() != n || unverifiable.len() != n {
            return Err(format!("bitmap length mismatch: expected {n} regions"));
        }
        self.clean_count = clean.count_ones() as u64;
        self.discarded_count = discarded.count_ones() as u64;
        self.unverifiable_count = unverifiable.count_ones() as u64;
        self.clean = clean;
        self.discarded = discarded;
        self.unverifiable = unverifiable;
        Ok(())
    }

    pub fn any_discarded(&self, rs: Range<usize>) -> bool {
        self.discarded_count > 0 && self.discarded[rs].any()
    }

    pub fn any_unverifiable(&self, rs: Range<usize>) -> bool {
        self.unverifiable_count > 0 && self.unverifiable[rs].any()
    }

    /// Clean sub-ranges of `[off, off+len)` in bytes, in order.
    pub fn clean_byte_runs(&self, off: u64, len: u64) -> Vec<Range<u64>> {
        let rs = self.regions_touching(off, len);
        let end = off + len;
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in rs {
            if !self.clean[r] {
                continue;
            }
            let br = self.byte_range(r);
            let s = br.start.max(off);
            let e = br.end.min(end);
            match out.last_mut() {
                Some(last) if last.end == s => last.end = e,
                _ => out.push(s..e),
            }
        }
        out
    }

    /// First dirty region at or after `from`, and how many dirty regions follow
    /// it contiguously (at most `max`).
    pub fn next_dirty_run(&self, from: usize, max: usize) -> Option<Range<usize>> {
        if from >= self.len() {
            return None;
        }
        let start = from + self.clean[from..].first_zero()?;
        let limit = (start + max).min(self.len());
        let len = self.clean[start..limit].first_one().unwrap_or(limit - start);
        Some(start..start + len)
    }

    /// Grows the map to a new export size. New regions count as clean: they are
    /// only ever created after the source is gone, when the target is the whole
    /// truth.
    pub fn grow(&mut self, new_size: u64) {
        if new_size <= self.export_size {
            return;
        }
        let n = Self::count_for(new_size, self.shift);
        let old = self.len();
        self.clean.resize(n, true);
        self.discarded.resize(n, false);
        self.unverifiable.resize(n, false);
        self.clean_count += (n - old) as u64;
        self.export_size = new_size;
    }
}

/// The region map as requests, the copier and the journal share it: a mutex,
/// plus a hint readable without it saying whether any region is discarded, so
/// the write path can shape its lock without a trip to the map when none is.
pub struct SharedMap {
    map: Mutex<RegionMap>,
    discarded_hint: AtomicBool,
}

impl SharedMap {
    pub fn new(map: RegionMap) -> SharedMap {
        let hint = AtomicBool::new(map.discarded_count() > 0);
        SharedMap { map: Mutex::new(map), discarded_hint: hint }
    }

    pub fn lock(&self) -> MapGuard<'_> {
        MapGuard { guard: crate::sync::lock(&self.map), hint: &self.discarded_hint }
    }

    /// False when no region was discarded at the end of the last trip to the
    /// map. Callers that act on it re-check under their range lock.
    pub fn maybe_discarded(&self) -> bool {
        self.discarded_hint.load(Ordering::Acquire)
    }
}

/// A trip to the map; refreshes the discard hint when it ends.
pub struct MapGuard<'a> {
    guard: MutexGuard<'a, RegionMap>,
    hint: &'a AtomicBool,
}

impl Deref for MapGuard<'_> {
    type Target = RegionMap;
    fn deref(&self) -> &RegionMap {
        &self.guard
    }
}

impl DerefMut for MapGuard<'_> {
    fn deref_mut(&mut self) -> &mut RegionMap {
        &mut self.guard
    }
}

impl Drop for MapGuard<'_> {
    fn drop(&mut self) {
        // Still under the mutex: a writer that reads the hint before taking its
        // range lock and the map after it sees every discard made before.
        self.hint.store(self.guard.discarded_count() > 0, Ordering::Release);
    }
}

fn set_counted(bits: &mut Bits, count: &mut u64, rs: Range<usize>, on: bool) {
    let slice = &mut bits[rs.clone()];
    let before = slice.count_ones() as u64;
    slice.fill(on);
    let after = if on { rs.len() as u64 } else { 0 };
    *count = *count - before + after;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_arithmetic_with_a_partial_last_region() {
        let m = RegionMap::new(10 * 4096 + 100, 12);
        assert_eq!(m.len(), 11);
        assert_eq!(m.byte_range(10), 40960..41060);
        assert_eq!(m.regions_touching(4095, 2), 0..2);
        assert_eq!(m.regions_touching(0, 0), 0..0);
        assert_eq!(m.regions_covered(1, 8192), 1..2);
        assert_eq!(m.regions_covered(0, 4095), 0..0);
        // Reaching the end of the export covers the short last region.
        assert_eq!(m.regions_covered(40960, 100), 10..11);
    }

    #[test]
    fn dirty_runs_and_clean_runs() {
        let mut m = RegionMap::new(16 * 4096, 12);
        m.set_clean(0..3, true);
        m.set_clean(5..6, true);
        assert_eq!(m.clean_count(), 4);
        assert_eq!(m.next_dirty_run(0, 100), Some(3..5));
        assert_eq!(m.next_dirty_run(5, 100), Some(6..16));
        assert_eq!(m.next_dirty_run(6, 4), Some(6..10));
        assert_eq!(m.clean_byte_runs(4096, 5 * 4096), vec![4096..3 * 4096, 5 * 4096..6 * 4096]);
        m.set_clean(0..16, true);
        assert!(m.all_clean());
        assert_eq!(m.next_dirty_run(0, 100), None);
        m.set_discarded(2..5, true);
        m.set_discarded(4..6, true);
        assert_eq!(m.discarded_count(), 4);
        assert!(m.any_discarded(5..7) && !m.any_discarded(6..16));
        m.set_discarded(0..16, false);
        assert_eq!(m.discarded_count(), 0);
    }

    #[test]
    fn region_size_limits() {
        assert!(validate_region_size(4096).is_ok());
        assert!(validate_region_size(64 << 20).is_ok());
        assert!(validate_region_size(2048).is_err());
        assert!(validate_region_size(3 * 4096).is_err());
        assert!(validate_region_size(128 << 20).is_err());
    }
}

/// The map against a model of one bool per region, over any sequence of
/// changes on any export and region size: the counts kept as bits change, the
/// runs the copier asks for, and the byte arithmetic requests use.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Clean(usize, usize, bool),
        Discarded(usize, usize, bool),
        Unverifiable(usize, usize, bool),
        AllDirty,
        ClearUnverifiable,
        Grow(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0usize..80, 0usize..80);
        prop_oneof![
            (range.clone(), any::<bool>()).prop_map(|((a, b), on)| Op::Clean(a, b, on)),
            (range.clone(), any::<bool>()).prop_map(|((a, b), on)| Op::Discarded(a, b, on)),
            (range, any::<bool>()).prop_map(|((a, b), on)| Op::Unverifiable(a, b, on)),
            Just(Op::AllDirty),
            Just(Op::ClearUnverifiable),
            (0u64..400).prop_map(Op::Grow),
        ]
    }

    /// A region range within `n` regions from two arbitrary numbers.
    fn within(a: usize, b: usize, n: usize) -> Range<usize> {
        let (a, b) = (a % (n + 1), b % (n + 1));
        a.min(b)..a.max(b)
    }

    struct Model {
        size: u64,
        clean: Vec<bool>,
        discarded: Vec<bool>,
        unverifiable: Vec<bool>,
    }

    fn count(v: &[bool]) -> u64 {
        v.iter().filter(|b| **b).count() as u64
    }

    fn check(m: &RegionMap, model: &Model) -> Result<(), TestCaseError> {
        prop_assert_eq!(m.export_size(), model.size);
        prop_assert_eq!(m.len(), model.clean.len());
        prop_assert_eq!(m.clean_count(), count(&model.clean));
        prop_assert_eq!(m.discarded_count(), count(&model.discarded));
        prop_assert_eq!(m.unverifiable_count(), count(&model.unverifiable));
        prop_assert_eq!(m.all_clean(), model.clean.iter().all(|b| *b));
        for r in 0..m.len() {
            prop_assert_eq!(m.is_clean(r), model.clean[r]);
            prop_assert_eq!(m.is_discarded(r), model.discarded[r]);
            prop_assert_eq!(m.is_unverifiable(r), model.unverifiable[r]);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn the_map_follows_a_model_through_any_changes(
            shift in 0u32..5,
            size in 1u64..200,
            ops in prop::collection::vec(op(), 0..40),
            probes in prop::collection::vec((0u64..400, 0u64..400, 0usize..90, 1usize..20), 8),
        ) {
            let mut m = RegionMap::new(size, shift);
            let n = size.div_ceil(1 << shift) as usize;
            let mut model = Model { size, clean: vec![false; n], discarded: vec![false; n], unverifiable: vec![false; n] };
            check(&m, &model)?;
            for op in ops {
                let n = model.clean.len();
                match op {
                    Op::Clean(a, b, on) => {
                        let rs = within(a, b, n);
                        m.set_clean(rs.clone(), on);
                        model.clean[rs].fill(on);
                    }
                    Op::Discarded(a, b, on) => {
                        let rs = within(a, b, n);
                        m.set_discarded(rs.clone(), on);
                        model.discarded[rs].fill(on);
                    }
                    Op::Unverifiable(a, b, on) => {
                        let rs = within(a, b, n);
                        m.set_unverifiable(rs.clone(), on);
                        model.unverifiable[rs].fill(on);
                    }
                    Op::AllDirty => {
                        m.set_all_dirty();
                        model.clean.fill(false);
                    }
                    Op::ClearUnverifiable => {
                        m.clear_unverifiable();
                        model.unverifiable.fill(false);
                    }
                    Op::Grow(new) => {
                        m.grow(new);
                        if new > model.size {
                            let n = new.div_ceil(1 << shift) as usize;
                            model.clean.resize(n, true);
                            model.discarded.resize(n, false);
                            model.unverifiable.resize(n, false);
                            model.size = new;
                        }
                    }
                }
                check(&m, &model)?;
            }

            // Queries, against definitions made of single bytes and regions.
            let size = model.size;
            let n = model.clean.len();
            let region_of = |byte: u64| (byte >> shift) as usize;
            for (a, b, from, max) in probes {
                let off = a % size;
                let len = b % (size - off + 1);
                let bytes = off..off + len;
                // Touching: every region holding a byte of the range.
                let touching: Vec<usize> = bytes.clone().map(region_of).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                let got: Vec<usize> = m.regions_touching(off, len).collect();
                prop_assert_eq!(got, touching);
                // Covered: every region all of whose bytes are in the range.
                let covered: Vec<usize> = (0..n).filter(|&r| {
                    let br = m.byte_range(r);
                    br.start >= off && br.end <= off + len
                }).collect();
                let got: Vec<usize> = m.regions_covered(off, len).collect();
                prop_assert_eq!(got, covered);
                // Clean runs: the range's bytes whose region is clean, joined.
                let mut runs: Vec<Range<u64>> = Vec::new();
                for byte in bytes.clone().filter(|&x| model.clean[region_of(x)]) {
                    match runs.last_mut() {
                        Some(last) if last.end == byte => last.end = byte + 1,
                        _ => runs.push(byte..byte + 1),
                    }
                }
                prop_assert_eq!(m.clean_byte_runs(off, len), runs);
                // The next dirty run: the first dirty region from `from`, and the
                // dirty ones after it, at most `max`.
                let want = (from..n).find(|&r| !model.clean[r]).map(|start| {
                    let end = (start..n).take(max).take_while(|&r| !model.clean[r]).count();
                    start..start + end
                });
                prop_assert_eq!(m.next_dirty_run(from, max), want);
                // Region ranges to bytes: each region's bytes, the last one clipped.
                let rs = within(from, from + max, n);
                if rs.is_empty() {
                    prop_assert!(m.bytes_of(rs.clone()).is_empty());
                } else {
                    prop_assert_eq!(m.bytes_of(rs.clone()), m.byte_range(rs.start).start..m.byte_range(rs.end - 1).end);
                }
                prop_assert_eq!(m.any_discarded(rs.clone()), model.discarded[rs.clone()].iter().any(|b| *b));
                prop_assert_eq!(m.any_unverifiable(rs.clone()), model.unverifiable[rs].iter().any(|b| *b));
            }
        }
    }
}
