//! One primitive for "count what is in flight, optionally refuse newcomers,
//! and wait until the count is zero" — the gate in front of target reads, the
//! copier's in-flight spans, a connection's requests, a server's connections.
//!
//! # Ordering
//! [`Drain::enter`] claims first and checks [`Drain::close`] second, and
//! `close` sets the flag before it reads the count: so a `close` followed by
//! [`Drain::wait_idle`] either sees the newcomer's claim (and waits for it) or
//! the newcomer sees the flag (and backs out). No entry slips past a close.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    active: AtomicUsize,
    closed: AtomicBool,
    idle: Notify,
}

/// One entry; leaves on drop.
pub struct DrainGuard(Arc<Drain>);

impl Drain {
    pub fn new() -> Arc<Drain> {
        Arc::new(Drain::default())
    }

    /// Enters unless closed.
    pub fn enter(self: &Arc<Self>) -> Option<DrainGuard> {
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            return None;
        }
        Some(DrainGuard(self.clone()))
    }

    /// Enters even when closed (pure counting of what is in flight).
    pub fn enter_always(self: &Arc<Self>) -> DrainGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        DrainGuard(self.clone())
    }

    /// Refuses new [`Drain::enter`]s from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Accepts new entries again.
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Entries in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight.
    pub async fn wait_idle(&self) {
        loop {
            // Registered before the check, so a leave in between still wakes us.
            let idle = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn leave(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
    }

    #[test]
    fn close_refuses_newcomers_and_waits_for_the_others() {
        run(async {
            let d = Drain::new();
            let a = d.enter().expect("open");
            let b = d.enter_always();
            d.close();
            assert!(d.enter().is_none(), "closed");
            assert_eq!(d.active(), 2, "a refused entry leaves no count behind");
            assert!(tokio::time::timeout(Duration::from_millis(30), d.wait_idle()).await.is_err());
            drop(a);
            drop(b);
            tokio::time::timeout(Duration::from_millis(100), d.wait_idle()).await.expect("idle once both left");
            d.reopen();
            assert!(d.enter().is_some());
        });
    }

    #[test]
    fn a_close_racing_an_enter_never_loses_it() {
        // Threads enter and leave while another closes and waits: whenever
        // wait_idle returns after close, no entry made after the close exists.
        for _ in 0..50 {
            let d = Drain::new();
            let entered = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (d, entered) = (d.clone(), entered.clone());
                    std::thread::spawn(move || {
                        for _ in 0..1000 {
                            if let Some(g) = d.enter() {
                                entered.fetch_add(1, Ordering::SeqCst);
                                std::hint::black_box(&g);
                            }
                        }
                    })
                })
                .collect();
            d.close();
            run(d.wait_idle());
            let at_idle = entered.load(Ordering::SeqCst);
            for w in workers {
                w.join().expect("worker");
            }
            assert_eq!(entered.load(Ordering::SeqCst), at_idle, "an entry got past the close");
        }
    }
}
