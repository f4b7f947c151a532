//! A remote device's requests, from the engine's call until their answer: the
//! queue the device fills and its connections drain, and the table of each
//! connection's requests on the wire.
//!
//! Every request carries its deadline (`--remote-timeout` from its call): the
//! sweeper ([`Requests::expire`]) fails it there, wherever it waits — queued,
//! or on the wire of a connection that does not answer. A request on a
//! connection that dies goes back to the front of the queue
//! ([`Requests::requeue_front`]). Closing the queue (the device dropped) ends
//! every connection.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use engine::sync::lock;
use engine::SharedBuf;
use tokio::sync::{oneshot, Notify};

/// What a request carries.
#[derive(Clone)]
pub(super) enum Payload {
    None,
    /// Send these bytes (`buf[at..at+len]`).
    Write(Arc<SharedBuf>, usize),
    /// Receive into `buf[at..at+len]`.
    Read(Arc<SharedBuf>, usize),
}

/// A request's answer.
pub(super) enum Reply {
    Done,
    /// BLOCK_STATUS extents of `base:allocation`: (length, flags).
    Extents(Vec<(u32, u32)>),
}

/// One wire request, from the engine's call until its answer.
pub(super) struct Req {
    pub cmd: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
    pub payload: Payload,
    pub deadline: Instant,
    /// Taken when answered (or timed out).
    pub done: Option<oneshot::Sender<io::Result<Reply>>>,
}

impl Req {
    pub(super) fn finish(&mut self, r: io::Result<Reply>) {
        // The buffer goes back before the caller wakes: it may want it whole.
        self.payload = Payload::None;
        if let Some(tx) = self.done.take() {
            let _ = tx.send(r);
        }
    }
}

/// A request on the wire, with what its reply has delivered so far.
pub(super) struct Sent {
    pub req: Req,
    pub sent_at: Instant,
    /// The reader is copying this reply's payload into the caller's buffer:
    /// the request must not be timed out meanwhile (the caller could reuse
    /// the buffer while we still write into it).
    pub receiving: bool,
    pub covered: u64,
    pub extents: Vec<(u32, u32)>,
    pub error: Option<io::Error>,
}

/// The requests in flight on one connection, by cookie.
#[derive(Default)]
pub(super) struct InFlight {
    map: Mutex<HashMap<u64, Sent>>,
    /// Fires when a request leaves (room for the writer).
    pub(super) freed: Notify,
}

impl InFlight {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<u64, Sent>> {
        lock(&self.map)
    }

    /// Fails, with `why`, every request whose deadline passed and whose reply
    /// is not being received. The entry stays (its caller is told and gone) so
    /// a late reply is still recognised and consumed.
    fn expire(&self, now: Instant, why: &dyn Fn() -> io::Error) {
        for s in self.lock().values_mut() {
            if !s.receiving && s.req.deadline <= now && s.req.done.is_some() {
                s.req.finish(Err(why()));
            }
        }
    }
}

/// The queue shared by the device and its connections, and the in-flight
/// tables of the connections that are up (for the sweeper).
#[derive(Default)]
pub(super) struct Requests {
    queue: Mutex<VecDeque<Req>>,
    queued: Notify,
    closed: AtomicBool,
    closed_notify: Notify,
    conns: Mutex<Vec<Option<Arc<InFlight>>>>,
}

impl Requests {
    pub(super) fn push(&self, req: Req) {
        lock(&self.queue).push_back(req);
        self.queued.notify_one();
    }

    pub(super) fn try_pop(&self) -> Option<Req> {
        lock(&self.queue).pop_front()
    }

    /// The next request; `None` once the device is closed.
    pub(super) async fn pop(&self) -> Option<Req> {
        loop {
            let queued = self.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            if let Some(r) = self.try_pop() {
                return Some(r);
            }
            tokio::select! {
                _ = queued => {}
                _ = self.closed_signal() => return None,
            }
        }
    }

    /// Requests a dead connection had in flight: first in line again.
    pub(super) fn requeue_front(&self, reqs: Vec<Req>) {
        if reqs.is_empty() {
            return;
        }
        let mut q = lock(&self.queue);
        for r in reqs.into_iter().rev() {
            q.push_front(r);
        }
        drop(q);
        self.queued.notify_waiters();
        self.queued.notify_one();
    }

    /// Records connection `slot`'s in-flight table (`None`: the connection is gone).
    pub(super) fn register(&self, slot: usize, inflight: Option<Arc<InFlight>>) {
        let mut c = lock(&self.conns);
        if c.len() <= slot {
            c.resize(slot + 1, None);
        }
        c[slot] = inflight;
    }

    /// Closes the queue: waiting connections and the sweeper stop.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.closed_notify.notify_waiters();
        self.queued.notify_waiters();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Returns once the queue is closed.
    pub(super) async fn closed_signal(&self) {
        loop {
            let n = self.closed_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// Fails, with `why`, every request, queued or on the wire, whose wait is over.
    pub(super) fn expire(&self, now: Instant, why: &dyn Fn() -> io::Error) {
        let mut expired = Vec::new();
        {
            let mut q = lock(&self.queue);
            let mut i = 0;
            while i < q.len() {
                if q[i].deadline <= now {
                    if let Some(r) = q.remove(i) {
                        expired.push(r);
                    }
                } else {
                    i += 1;
                }
            }
        }
        for mut r in expired {
            r.finish(Err(why()));
        }
        let conns: Vec<Arc<InFlight>> = lock(&self.conns).iter().flatten().cloned().collect();
        for c in conns {
            c.expire(now, why);
        }
    }
}
