//! A per-thread io_uring reactor driven by a tokio current-thread runtime.
//!
//! Each worker thread owns one ring (no locking on the hot path). Operations are
//! pushed to the submission queue and submitted in one `io_uring_enter` just before
//! the runtime parks (the `on_thread_park` hook), so every task that became ready
//! in one scheduler pass shares a single syscall. Completions are reaped in the same
//! hook and by a small driver task woken through the ring fd's readiness.
//!
//! An operation owns the resources the kernel may touch (buffers) until the kernel
//! reports completion. If the future is dropped first, the resources are parked in
//! the slot and freed only when the completion arrives: the kernel never writes into
//! freed memory.
//!
//! # Completion queue capacity
//! The kernel never has more operations than the completion queue has slots: an
//! operation started beyond that waits in a backlog (in order) and is submitted as
//! completions are reaped. So the completion queue cannot overflow. Should the
//! kernel still flag an overflow (IORING_SQ_CQ_OVERFLOW: completions parked on
//! its overflow list, which only an `io_uring_enter` with GETEVENTS moves into the
//! queue), [`Reactor::reap`] enters the kernel to fetch them before it returns —
//! reading the queue alone would leave them parked forever.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{squeue, IoUring};

/// Submit immediately once this many operations are queued, so a runtime that
/// never parks (always busy) still makes progress on its I/O.
const EAGER_SUBMIT_THRESHOLD: u32 = 32;
const RING_ENTRIES: u32 = 512;

enum Slot {
    Vacant {
        next_free: usize,
    },
    Waiting {
        waker: Option<Waker>,
    },
    Done {
        result: i32,
    },
    /// The future was dropped before completion; keep the resources alive until
    /// the kernel is done with them.
    Abandoned {
        _keep: Box<dyn Any>,
    },
}

pub struct Reactor {
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free_head: Cell<usize>,
    queued: Cell<u32>,
    /// Operations started and not yet consumed (their slot is not vacant).
    in_flight: Cell<usize>,
    /// Operations handed to the kernel whose completion was not reaped yet.
    in_kernel: Cell<usize>,
    /// At most this many operations are in the kernel: the completion queue's size.
    kernel_limit: usize,
    /// Operations waiting for room in the kernel, oldest first.
    backlog: RefCell<VecDeque<(usize, squeue::Entry)>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

const NO_FREE: usize = usize::MAX;

impl Reactor {
    fn new() -> io::Result<Rc<Reactor>> {
        Self::with_limit(None)
    }

    /// A reactor that keeps at most `limit` operations in the kernel (tests use a
    /// small one to exercise the backlog); `None`: the completion queue's size.
    fn with_limit(limit: Option<usize>) -> io::Result<Rc<Reactor>> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let cq_entries = ring.params().cq_entries() as usize;
        let kernel_limit = limit.unwrap_or(cq_entries).clamp(1, cq_entries);
        Ok(Rc::new(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::with_capacity(RING_ENTRIES as usize)),
            free_head: Cell::new(NO_FREE),
            queued: Cell::new(0),
            in_flight: Cell::new(0),
            in_kernel: Cell::new(0),
            kernel_limit,
            backlog: RefCell::new(VecDeque::new()),
        }))
    }

    /// Installs a reactor with a small kernel limit on the current thread (tests
    /// of the backlog). Fails if the thread already has one.
    #[doc(hidden)]
    pub fn install_with_limit(limit: usize) -> io::Result<Rc<Reactor>> {
        CURRENT.with(|cur| {
            let mut cur = cur.borrow_mut();
            if cur.is_some() {
                return Err(io::Error::other("this thread already has an io_uring reactor"));
            }
            let r = Reactor::with_limit(Some(limit))?;
            *cur = Some(r.clone());
            Ok(r)
        })
    }

    /// Installs a reactor on the current thread (idempotent).
    pub fn install() -> io::Result<Rc<Reactor>> {
        CURRENT.with(|cur| {
            let mut cur = cur.borrow_mut();
            if let Some(r) = cur.as_ref() {
                return Ok(r.clone());
            }
            let r = Reactor::new()?;
            *cur = Some(r.clone());
            Ok(r)
        })
    }

    /// The reactor of the current thread. Engine I/O must run on a thread set up
    /// by [`crate::rt`]; anything else is a programming error reported as an I/O error.
    pub fn current() -> io::Result<Rc<Reactor>> {
        CURRENT
            .with(|cur| cur.borrow().clone())
            .ok_or_else(|| io::Error::other("no io_uring reactor on this thread (use engine::rt to run engine I/O)"))
    }

    pub fn try_current() -> Option<Rc<Reactor>> {
        CURRENT.with(|cur| cur.borrow().clone())
    }

    pub fn ring_fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Operations in the kernel right now (never more than the completion queue holds).
    pub fn in_kernel(&self) -> usize {
        self.in_kernel.get()
    }

    /// Operations waiting for room in the kernel.
    pub fn backlog_len(&self) -> usize {
        self.backlog.borrow().len()
    }

    pub fn kernel_limit(&self) -> usize {
        self.kernel_limit
    }

    fn alloc_slot(&self) -> usize {
        let mut slots = self.slots.borrow_mut();
        let head = self.free_head.get();
        if head != NO_FREE {
            if let Slot::Vacant { next_free } = slots[head] {
                self.free_head.set(next_free);
            }
            slots[head] = Slot::Waiting { waker: None };
            head
        } else {
            slots.push(Slot::Waiting { waker: None });
            slots.len() - 1
        }
    }

    fn free_slot(&self, idx: usize, slots: &mut [Slot]) {
        slots[idx] = Slot::Vacant { next_free: self.free_head.get() };
        self.free_head.set(idx);
    }

    /// Queues one SQE. The caller must guarantee that every pointer inside `entry`
    /// stays valid until the completion is reaped; [`Op`] does this by owning the
    /// resources.
    unsafe fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: forwarded from the caller's contract.
        if unsafe { ring.submission().push(entry) }.is_err() {
            // Queue full: hand what we have to the kernel and retry once.
            ring.submit()?;
            self.queued.set(0);
            // SAFETY: as above.
            unsafe { ring.submission().push(entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        // The entry is in the ring now: from here on it reaches the kernel, so a
        // failed eager submit must not be reported as a failure of this operation
        // (the next park submits it).
        self.in_kernel.set(self.in_kernel.get() + 1);
        let q = self.queued.get() + 1;
        self.queued.set(q);
        if q >= EAGER_SUBMIT_THRESHOLD {
            match ring.submit() {
                Ok(_) => self.queued.set(0),
                Err(e) => tracing::debug!("io_uring eager submit deferred: {e}"),
            }
        }
        Ok(())
    }

    /// Submits queued SQEs (one syscall) if there are any.
    pub fn flush_submissions(&self) {
        if self.queued.get() == 0 {
            return;
        }
        let ring = self.ring.borrow_mut();
        match ring.submit() {
            Ok(_) => self.queued.set(0),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {
                // The completion queue is full; reaping makes room and the next
                // park retries.
            }
            Err(e) => tracing::error!("io_uring submit failed: {e}"),
        }
    }

    /// Moves completions into their slots, wakes the waiting futures and hands
    /// backlogged operations to the kernel as room frees up.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        let mut wake = Vec::new();
        loop {
            let (got, overflowed) = self.drain_completions(&mut wake);
            n += got;
            if overflowed {
                // Parked completions reach the queue only through an enter with
                // GETEVENTS; fetch them now, then drain again.
                if let Err(e) = self.ring.borrow().submitter().submit() {
                    tracing::error!("io_uring: cannot fetch overflowed completions: {e}");
                    break;
                }
                continue;
            }
            if got == 0 {
                break;
            }
        }
        self.admit_backlog(&mut wake);
        for w in wake {
            w.wake();
        }
        n
    }

    /// Reads every completion in the queue. Returns how many, and whether the
    /// kernel flagged completions parked on its overflow list.
    fn drain_completions(&self, wake: &mut Vec<Waker>) -> (usize, bool) {
        let mut n = 0;
        let mut ring = self.ring.borrow_mut();
        let mut slots = self.slots.borrow_mut();
        for cqe in ring.completion() {
            n += 1;
            self.in_kernel.set(self.in_kernel.get().saturating_sub(1));
            let idx = cqe.user_data() as usize;
            let Some(slot) = slots.get_mut(idx) else { continue };
            match std::mem::replace(slot, Slot::Done { result: cqe.result() }) {
                Slot::Waiting { waker } => {
                    if let Some(w) = waker {
                        wake.push(w);
                    }
                }
                Slot::Abandoned { .. } => {
                    self.free_slot(idx, &mut slots);
                    self.in_flight.set(self.in_flight.get() - 1);
                }
                other => *slot = other,
            }
        }
        let overflowed = ring.submission().cq_overflow();
        (n, overflowed)
    }

    /// Pushes backlogged operations while the kernel has room for them.
    fn admit_backlog(&self, wake: &mut Vec<Waker>) {
        let mut admitted = false;
        while self.in_kernel.get() < self.kernel_limit {
            let Some((slot, entry)) = self.backlog.borrow_mut().pop_front() else { break };
            // SAFETY: the entry was built by `start`, whose Op (or the slot, once
            // abandoned) still owns every resource it references.
            match unsafe { self.push(&entry) } {
                Ok(()) => admitted = true,
                Err(e) => self.complete_with_error(slot, &e, wake),
            }
        }
        if admitted {
            // The thread may be about to park: what was admitted must reach the
            // kernel now, not at some later wake-up.
            self.flush_submissions();
        }
    }

    /// Finishes an operation the kernel never saw.
    fn complete_with_error(&self, idx: usize, e: &io::Error, wake: &mut Vec<Waker>) {
        let mut slots = self.slots.borrow_mut();
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        match std::mem::replace(&mut slots[idx], Slot::Done { result: -errno }) {
            Slot::Waiting { waker } => wake.extend(waker),
            Slot::Abandoned { .. } => {
                self.free_slot(idx, &mut slots);
                self.in_flight.set(self.in_flight.get() - 1);
            }
            other => slots[idx] = other,
        }
    }

    /// Submits pending SQEs and reaps completions; runs before the thread parks.
    pub fn on_park(&self) {
        self.flush_submissions();
        self.reap();
    }

    /// Starts an operation. `build` receives the resources (already at their final
    /// heap location) and returns the SQE referencing them.
    pub fn start<R: 'static>(self: &Rc<Self>, resources: R, build: impl FnOnce(&R) -> squeue::Entry) -> Op<R> {
        let slot = self.alloc_slot();
        let entry = build(&resources).user_data(slot as u64);
        self.in_flight.set(self.in_flight.get() + 1);
        let op = Op { reactor: self.clone(), slot, resources: Some(resources), failed: None };
        // Older operations waiting for room go first (their order is kept).
        if self.in_kernel.get() >= self.kernel_limit || !self.backlog.borrow().is_empty() {
            self.backlog.borrow_mut().push_back((slot, entry));
            return op;
        }
        // SAFETY: the resources referenced by `entry` are owned by the returned Op
        // (or parked in the slot if the Op is dropped) until the CQE is reaped.
        if let Err(e) = unsafe { self.push(&entry) } {
            let mut slots = self.slots.borrow_mut();
            self.free_slot(slot, &mut slots);
            self.in_flight.set(self.in_flight.get() - 1);
            drop(slots);
            let mut op = op;
            op.slot = NO_FREE;
            op.failed = Some(e);
            return op;
        }
        op
    }
}

/// An in-flight io_uring operation. Resolves to the raw CQE result (negative errno
/// on failure) and gives the resources back.
pub struct Op<R: 'static> {
    reactor: Rc<Reactor>,
    slot: usize,
    resources: Option<R>,
    failed: Option<io::Error>,
}

impl<R: 'static> Future for Op<R> {
    type Output = (io::Result<u32>, R);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: Op is not self-referential; fields are moved out only once.
        let this = unsafe { self.get_unchecked_mut() };
        if let Some(e) = this.failed.take() {
            let res = this.resources.take().expect("Op polled after completion");
            return Poll::Ready((Err(e), res));
        }
        let mut slots = this.reactor.slots.borrow_mut();
        match &mut slots[this.slot] {
            Slot::Done { result } => {
                let result = *result;
                this.reactor.free_slot(this.slot, &mut slots);
                this.reactor.in_flight.set(this.reactor.in_flight.get() - 1);
                this.slot = NO_FREE;
                let res = this.resources.take().expect("Op polled after completion");
                let out = if result < 0 { Err(io::Error::from_raw_os_error(-result)) } else { Ok(result as u32) };
                Poll::Ready((out, res))
            }
            Slot::Waiting { waker } => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            _ => unreachable!("io_uring slot in an impossible state"),
        }
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        if self.slot == NO_FREE {
            return;
        }
        let Some(res) = self.resources.take() else { return };
        let mut slots = self.reactor.slots.borrow_mut();
        match slots[self.slot] {
            Slot::Done { .. } => {
                self.reactor.free_slot(self.slot, &mut slots);
                self.reactor.in_flight.set(self.reactor.in_flight.get() - 1);
            }
            _ => slots[self.slot] = Slot::Abandoned { _keep: Box::new(res) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;
    use std::time::Duration;

    /// Starts `n` operations at once (no reaping in between), then awaits them all.
    async fn burst(reactor: &Rc<Reactor>, n: usize) -> (usize, usize) {
        let ops: Vec<_> = (0..n).map(|_| reactor.start((), |_| opcode::Nop::new().build())).collect();
        let peak = reactor.in_kernel();
        let mut ok = 0;
        for op in ops {
            if op.await.0.is_ok() {
                ok += 1;
            }
        }
        (ok, peak)
    }

    fn on_fresh_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("test thread")
    }

    #[test]
    fn more_operations_than_the_completion_queue_holds_all_complete() {
        // 12,000 at once is what a client sending 12,000 FLUSHes back to back
        // produced; before the backlog, 1024 completed and the rest never did.
        let (ok, peak, limit) = on_fresh_thread(|| {
            let reactor = Reactor::install().expect("reactor");
            let limit = reactor.kernel_limit();
            let out = crate::rt::block_on(async {
                tokio::time::timeout(Duration::from_secs(20), burst(&reactor, 12_000)).await
            })
            .expect("runtime")
            .expect("every operation completes within 20 s");
            (out.0, out.1, limit)
        });
        assert_eq!(ok, 12_000);
        assert!(peak <= limit, "{peak} operations in the kernel, limit {limit}");
        assert!(limit >= 1024, "the limit is the completion queue size, got {limit}");
    }

    #[test]
    fn a_small_kernel_limit_is_kept_and_order_is_preserved() {
        on_fresh_thread(|| {
            let reactor = Reactor::install_with_limit(4).expect("reactor");
            crate::rt::block_on(async {
                let order = Rc::new(RefCell::new(Vec::new()));
                let mut tasks = Vec::new();
                for i in 0..64usize {
                    let r = reactor.clone();
                    let order = order.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        let (res, ()) = r.start((), |_| opcode::Nop::new().build()).await;
                        assert!(res.is_ok());
                        order.borrow_mut().push(i);
                    }));
                    assert!(reactor.in_kernel() <= 4, "in kernel: {}", reactor.in_kernel());
                }
                for t in tasks {
                    t.await.expect("task");
                }
                assert_eq!(order.borrow().len(), 64);
                assert_eq!(reactor.backlog_len(), 0);
                assert_eq!(reactor.in_kernel(), 0);
                assert_eq!(reactor.in_flight(), 0);
            })
            .expect("runtime");
        });
    }

    #[test]
    fn dropped_operations_in_the_backlog_are_cleaned_up() {
        on_fresh_thread(|| {
            let reactor = Reactor::install_with_limit(2).expect("reactor");
            crate::rt::block_on(async {
                let ops: Vec<_> =
                    (0..50).map(|_| reactor.start(vec![0u8; 64], |_| opcode::Nop::new().build())).collect();
                drop(ops);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while reactor.in_flight() > 0 {
                    assert!(std::time::Instant::now() < deadline, "{} ops never finished", reactor.in_flight());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(reactor.backlog_len(), 0);
                let (ok, _) = burst(&reactor, 10).await;
                assert_eq!(ok, 10, "the reactor still works");
            })
            .expect("runtime");
        });
    }
}
