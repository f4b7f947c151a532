//! What the overlay file occupies, and `--overlay-limit`.
//!
//! The overlay keeps its own count of the chunks whose data the file holds
//! (allocated: written, not punched), so a write that would take the file past
//! the limit is refused before any byte of it is written, and exactly then: a
//! write into chunks the file already holds needs no space and always goes
//! through. Header and map are counted from the start (they are allocated when
//! the file is made).
//!
//! Callers keep the engine's locking rule (docs/semantics.md, "Sub-block
//! writes"): a write or zeroing that changes the allocation of a chunk holds
//! that chunk exclusively against other zeroing, so the count follows the file.
//!
//! Crossing 75 % and 90 % of the limit upwards, and refusing a write, are
//! notices for the event stream; a crossing is announced again only after the
//! use fell below the mark by a tenth of the limit, and refusals are announced
//! at most once a second with how many there were.

use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitvec::prelude::{BitVec, Lsb0};

use crate::sync::lock;

/// Marks, in percent of the limit.
const MARKS: [u64; 2] = [75, 90];
/// A refusal notice at most this often.
const REFUSAL_NOTICE_EVERY: Duration = Duration::from_secs(1);

/// Something the event stream should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayNotice {
    /// Use crossed `percent` % of the limit.
    Crossed {
        /// The mark crossed (75 or 90).
        percent: u64,
        /// What the overlay's file occupies.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// Writes were refused for lack of space.
    Refused {
        /// Writes refused since the last notice.
        count: u64,
        /// Bytes more the last refused write needed (0: not known).
        wanted: u64,
        /// What the overlay's file occupies.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

impl OverlayNotice {
    /// The event's text.
    pub fn message(&self, path: &str) -> String {
        match self {
            OverlayNotice::Crossed { percent, used, limit } => format!(
                "overlay {path} is {percent}% full: {} of {} used (writes are refused once it is full)",
                human(*used),
                human(*limit)
            ),
            OverlayNotice::Refused { count, wanted, used, limit } => format!(
                "overlay {path} is full: {count} write{} refused (ENOSPC); the last needed {} more, {} of {} used; \
                 free space with fstrim or by deleting files",
                if *count == 1 { "" } else { "s" },
                human(*wanted),
                human(*used),
                human(*limit)
            ),
        }
    }
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", b.div_ceil(1024))
    }
}

/// A refused allocation: how much more it needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NoSpace {
    pub(super) wanted: u64,
}

struct State {
    limit: Option<u64>,
    allocated: BitVec<u64, Lsb0>,
    /// Bytes the file occupies by our count (metadata + allocated chunks).
    used: u64,
    /// The marks crossed (and not yet re-armed).
    crossed: [bool; MARKS.len()],
    refused_since: u64,
    /// What the last refused write needed (for a notice flushed later).
    last_wanted: u64,
    refused_total: u64,
    last_refusal_notice: Option<Instant>,
    notices: Vec<OverlayNotice>,
}

pub(super) struct Space {
    chunk: u64,
    state: Mutex<State>,
}

impl Space {
    /// `allocated` says which chunks hold data now; `metadata` is what header
    /// and map occupy.
    pub(super) fn new(chunk: u64, limit: Option<u64>, allocated: BitVec<u64, Lsb0>, metadata: u64) -> Space {
        let used = metadata + allocated.count_ones() as u64 * chunk;
        let mut crossed = [false; MARKS.len()];
        if let Some(l) = limit {
            for (i, m) in MARKS.iter().enumerate() {
                crossed[i] = used * 100 >= l * m;
            }
        }
        Space {
            chunk,
            state: Mutex::new(State {
                limit,
                allocated,
                used,
                crossed,
                refused_since: 0,
                last_wanted: 0,
                refused_total: 0,
                last_refusal_notice: None,
                notices: Vec::new(),
            }),
        }
    }

    pub(super) fn limit(&self) -> Option<u64> {
        lock(&self.state).limit
    }

    /// A new limit (`set-overlay-limit`): the marks are judged against it from
    /// now on, and those it puts use past are announced at once.
    pub(super) fn set_limit(&self, limit: Option<u64>) {
        let mut st = lock(&self.state);
        st.limit = limit;
        st.crossed = [false; MARKS.len()];
        self.check_marks(&mut st);
    }

    pub(super) fn used(&self) -> u64 {
        lock(&self.state).used
    }

    /// Writes refused so far.
    pub(super) fn refused_total(&self) -> u64 {
        lock(&self.state).refused_total
    }

    /// Chunks of `range` the file does not hold data for: they are counted as
    /// allocated now, or nothing is and the write must be refused.
    pub(super) fn allocate(&self, range: Range<u64>) -> Result<(), NoSpace> {
        self.allocate_each(range)
    }

    /// [`Space::allocate`] for any set of chunks, all or none.
    pub(super) fn allocate_each(&self, chunks: impl IntoIterator<Item = u64> + Clone) -> Result<(), NoSpace> {
        let mut st = lock(&self.state);
        let new = chunks.clone().into_iter().filter(|&c| !st.allocated[c as usize]).count() as u64 * self.chunk;
        if new == 0 {
            return Ok(());
        }
        if let Some(limit) = st.limit {
            if st.used + new > limit {
                st.refused_since += 1;
                st.refused_total += 1;
                st.last_wanted = new;
                let due = st.last_refusal_notice.is_none_or(|t| t.elapsed() >= REFUSAL_NOTICE_EVERY);
                if due {
                    let n = OverlayNotice::Refused { count: st.refused_since, wanted: new, used: st.used, limit };
                    st.notices.push(n);
                    st.refused_since = 0;
                    st.last_refusal_notice = Some(Instant::now());
                }
                return Err(NoSpace { wanted: new });
            }
        }
        for c in chunks {
            st.allocated.set(c as usize, true);
        }
        st.used += new;
        self.check_marks(&mut st);
        Ok(())
    }

    /// `range`'s chunks were punched: the file holds nothing there now.
    pub(super) fn release(&self, range: Range<u64>) {
        let mut st = lock(&self.state);
        let r = range.start as usize..range.end as usize;
        let freed = st.allocated[r.clone()].count_ones() as u64 * self.chunk;
        st.allocated[r].fill(false);
        st.used -= freed;
        self.check_marks(&mut st);
    }

    /// Whether the file holds data for `chunk`.
    pub(super) fn is_allocated(&self, chunk: u64) -> bool {
        lock(&self.state).allocated[chunk as usize]
    }

    fn check_marks(&self, st: &mut State) {
        let Some(limit) = st.limit else { return };
        for (i, &m) in MARKS.iter().enumerate() {
            let at = st.used * 100 >= limit * m;
            if at && !st.crossed[i] {
                st.crossed[i] = true;
                let n = OverlayNotice::Crossed { percent: m, used: st.used, limit };
                st.notices.push(n);
            } else if !at && st.crossed[i] && st.used * 100 < limit * m.saturating_sub(10) {
                st.crossed[i] = false;
            }
        }
    }

    /// Notices since the last call (a refusal count still waiting for its
    /// second is reported now if `flush_refusals`).
    pub(super) fn take_notices(&self, flush_refusals: bool) -> Vec<OverlayNotice> {
        let mut st = lock(&self.state);
        if flush_refusals && st.refused_since > 0 {
            if let Some(limit) = st.limit {
                let n =
                    OverlayNotice::Refused { count: st.refused_since, wanted: st.last_wanted, used: st.used, limit };
                st.notices.push(n);
            }
            st.refused_since = 0;
            st.last_refusal_notice = Some(Instant::now());
        }
        std::mem::take(&mut st.notices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitvec::bitvec;

    #[test]
    fn the_limit_refuses_exactly_the_write_that_does_not_fit() {
        // 4 KiB of metadata, room for 6 chunks.
        let s = Space::new(4096, Some(7 * 4096), bitvec![u64, Lsb0; 0; 100], 4096);
        s.allocate(0..4).unwrap();
        assert_eq!(s.used(), 5 * 4096);
        assert_eq!(s.allocate(10..13), Err(NoSpace { wanted: 3 * 4096 }), "3 more do not fit");
        assert_eq!(s.used(), 5 * 4096, "a refusal changes nothing");
        s.allocate(2..6).unwrap(); // 2 new: exactly full
        assert_eq!(s.used(), 7 * 4096);
        s.allocate(0..6).unwrap(); // rewriting held chunks needs nothing
        assert!(s.allocate(6..7).is_err());
        s.release(0..2);
        s.allocate(6..8).unwrap();
        assert!(s.is_allocated(7) && !s.is_allocated(0));
    }

    #[test]
    fn marks_are_announced_once_per_crossing_and_refusals_are_counted() {
        let s = Space::new(4096, Some(100 * 4096), bitvec![u64, Lsb0; 0; 200], 0);
        s.allocate(0..74).unwrap();
        assert!(s.take_notices(false).is_empty());
        s.allocate(74..80).unwrap();
        assert!(matches!(s.take_notices(false)[..], [OverlayNotice::Crossed { percent: 75, .. }]));
        s.allocate(80..95).unwrap();
        assert!(matches!(s.take_notices(false)[..], [OverlayNotice::Crossed { percent: 90, .. }]));
        s.release(85..95); // 85 %: not re-armed for 90 until below 80 %
        s.allocate(85..95).unwrap();
        assert!(s.take_notices(false).is_empty());
        s.release(70..95); // 70 %: 90 re-armed (below 80), 75 not (not below 65)
        s.allocate(70..92).unwrap();
        assert!(matches!(s.take_notices(false)[..], [OverlayNotice::Crossed { percent: 90, .. }]));
        s.release(60..95); // 60 %: both re-armed
        s.allocate(60..92).unwrap();
        let n = s.take_notices(false);
        assert_eq!(n.len(), 2, "{n:?}");
        for _ in 0..4 {
            assert!(s.allocate(100..110).is_err());
        }
        assert!(s.allocate(100..109).is_err());
        let n = s.take_notices(true);
        assert!(matches!(n[0], OverlayNotice::Refused { count: 1, wanted: 40960, .. }), "{n:?}");
        // The flushed notice says what the last refused write needed.
        assert!(matches!(n[1], OverlayNotice::Refused { count: 4, wanted: 36864, .. }), "{n:?}");
        assert!(n[0].message("/run/ov").contains("refused (ENOSPC)"));
    }
}
