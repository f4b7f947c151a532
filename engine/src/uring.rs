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

use std::any::Any;
use std::cell::{Cell, RefCell};
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
    in_flight: Cell<usize>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

const NO_FREE: usize = usize::MAX;

impl Reactor {
    fn new() -> io::Result<Rc<Reactor>> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        Ok(Rc::new(Reactor {
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::with_capacity(RING_ENTRIES as usize)),
            free_head: Cell::new(NO_FREE),
            queued: Cell::new(0),
            in_flight: Cell::new(0),
        }))
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
        let q = self.queued.get() + 1;
        self.queued.set(q);
        if q >= EAGER_SUBMIT_THRESHOLD {
            ring.submit()?;
            self.queued.set(0);
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

    /// Moves completions into their slots and wakes the waiting futures.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        let mut wake = Vec::new();
        {
            let mut ring = self.ring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in ring.completion() {
                n += 1;
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
        }
        for w in wake {
            w.wake();
        }
        n
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
        // SAFETY: the resources referenced by `entry` are owned by the returned Op
        // (or parked in the slot if the Op is dropped) until the CQE is reaped.
        match unsafe { self.push(&entry) } {
            Ok(()) => {
                self.in_flight.set(self.in_flight.get() + 1);
                Op { reactor: self.clone(), slot, resources: Some(resources), failed: None }
            }
            Err(e) => {
                let mut slots = self.slots.borrow_mut();
                self.free_slot(slot, &mut slots);
                Op { reactor: self.clone(), slot: NO_FREE, resources: Some(resources), failed: Some(e) }
            }
        }
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
