//! Byte-range locks, kept only for ranges with I/O in flight.
//!
//! Foreground writes take their range shared; the copier, TRIM and
//! read-modify-write take theirs exclusive. Grants are FIFO among conflicting
//! requests: a request waits for every *earlier* overlapping request (granted or
//! still waiting) unless both are shared. A waiting copier therefore blocks new
//! writers to its range, so a hot region cannot starve the copy, and since a
//! request only ever waits for earlier ones there is no deadlock.

use crate::sync::lock;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

struct Entry {
    seq: u64,
    range: Range<u64>,
    mode: LockMode,
    granted: bool,
    waker: Option<Waker>,
}

impl Entry {
    fn conflicts(&self, range: &Range<u64>, mode: LockMode) -> bool {
        self.range.start < range.end
            && range.start < self.range.end
            && !(self.mode == LockMode::Shared && mode == LockMode::Shared)
    }
}

#[derive(Default)]
struct Table {
    /// Ordered by `seq` (arrival order).
    entries: Vec<Entry>,
    next_seq: u64,
    waiting: usize,
}

impl Table {
    fn index_of(&self, seq: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    /// Grants every waiting entry that no earlier entry blocks.
    fn grant_waiters(&mut self) {
        if self.waiting == 0 {
            return;
        }
        for i in 0..self.entries.len() {
            if self.entries[i].granted {
                continue;
            }
            let (before, rest) = self.entries.split_at_mut(i);
            let e = &mut rest[0];
            if !before.iter().any(|b| b.conflicts(&e.range, e.mode)) {
                e.granted = true;
                self.waiting -= 1;
                if let Some(w) = e.waker.take() {
                    w.wake();
                }
            }
        }
    }
}

/// The lock table. Cheap to share (`Arc`).
#[derive(Default, Clone)]
pub struct RangeLocks {
    table: Arc<Mutex<Table>>,
}

impl RangeLocks {
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Locks `range` in `mode`. An empty range is granted at once.
    pub fn lock(&self, range: Range<u64>, mode: LockMode) -> LockFuture {
        let mut t = self.table();
        let seq = t.next_seq;
        t.next_seq += 1;
        let granted = range.is_empty() || !t.entries.iter().any(|e| e.conflicts(&range, mode));
        if !granted {
            t.waiting += 1;
        }
        t.entries.push(Entry { seq, range, mode, granted, waker: None });
        drop(t);
        LockFuture { guard: Some(RangeGuard { locks: self.clone(), seq }) }
    }

    /// Number of entries (granted or waiting): for tests and status.
    pub fn active(&self) -> usize {
        self.table().entries.len()
    }

    fn release(&self, seq: u64) {
        let mut t = self.table();
        if let Some(i) = t.index_of(seq) {
            let e = t.entries.remove(i);
            if !e.granted {
                t.waiting -= 1;
            }
            t.grant_waiters();
        }
    }
}

/// Resolves when the lock is granted. Dropping it before then withdraws the
/// request (and lets later requests through).
pub struct LockFuture {
    guard: Option<RangeGuard>,
}

impl Future for LockFuture {
    type Output = RangeGuard;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard> {
        let seq = match &self.guard {
            Some(g) => g.seq,
            None => panic!("LockFuture polled after completion"),
        };
        let locks = match &self.guard {
            Some(g) => g.locks.clone(),
            None => unreachable!(),
        };
        let mut t = locks.table();
        let Some(i) = t.index_of(seq) else { unreachable!("lock entry vanished") };
        if t.entries[i].granted {
            drop(t);
            match self.guard.take() {
                Some(g) => Poll::Ready(g),
                None => unreachable!(),
            }
        } else {
            t.entries[i].waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// A granted (or requested) range lock; released on drop.
pub struct RangeGuard {
    locks: RangeLocks,
    seq: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn poll_once(f: &mut LockFuture) -> Option<RangeGuard> {
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag);
        let mut cx = Context::from_waker(&waker);
        match Pin::new(f).poll(&mut cx) {
            Poll::Ready(g) => Some(g),
            Poll::Pending => None,
        }
    }

    #[test]
    fn shared_locks_coexist_exclusive_waits() {
        let l = RangeLocks::new();
        let a = poll_once(&mut l.lock(0..100, LockMode::Shared)).expect("first shared");
        let b = poll_once(&mut l.lock(50..150, LockMode::Shared)).expect("overlapping shared");
        let mut x = l.lock(90..95, LockMode::Exclusive);
        assert!(poll_once(&mut x).is_none());
        drop(a);
        assert!(poll_once(&mut x).is_none(), "b still overlaps");
        drop(b);
        assert!(poll_once(&mut x).is_some());
    }

    #[test]
    fn waiting_exclusive_blocks_later_shared_fairness() {
        let l = RangeLocks::new();
        let a = poll_once(&mut l.lock(0..10, LockMode::Shared)).expect("granted");
        let mut x = l.lock(0..10, LockMode::Exclusive);
        assert!(poll_once(&mut x).is_none());
        // A later writer to the same range queues behind the copier.
        let mut w = l.lock(5..6, LockMode::Shared);
        assert!(poll_once(&mut w).is_none());
        // A writer elsewhere is not affected.
        assert!(poll_once(&mut l.lock(20..30, LockMode::Shared)).is_some());
        drop(a);
        let xg = poll_once(&mut x).expect("copier gets it first");
        assert!(poll_once(&mut w).is_none());
        drop(xg);
        assert!(poll_once(&mut w).is_some());
    }

    #[test]
    fn dropping_a_waiter_unblocks_followers() {
        let l = RangeLocks::new();
        let a = poll_once(&mut l.lock(0..10, LockMode::Shared)).expect("granted");
        let mut x = l.lock(0..10, LockMode::Exclusive);
        assert!(poll_once(&mut x).is_none());
        let mut w = l.lock(0..10, LockMode::Shared);
        assert!(poll_once(&mut w).is_none());
        drop(x); // withdrawn
        assert!(poll_once(&mut w).is_some());
        drop(a);
        assert_eq!(l.active(), 0, "every entry released");
    }

    #[test]
    fn empty_and_adjacent_ranges_do_not_conflict() {
        let l = RangeLocks::new();
        let _a = poll_once(&mut l.lock(0..10, LockMode::Exclusive)).expect("granted");
        assert!(poll_once(&mut l.lock(10..20, LockMode::Exclusive)).is_some());
        assert!(poll_once(&mut l.lock(5..5, LockMode::Exclusive)).is_some());
    }
}
