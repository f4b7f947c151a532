//! How a connection's request loop ends, and the one place that decides it.
//!
//! Every wait of the reader (for a request slot, a header, a payload, a budget
//! charge) also ends when the server stops taking requests or when the
//! connection is declared dead (by the writer, when the peer stops reading its
//! replies). Both end the loop cleanly; an I/O error or a protocol violation
//! ends it with that error. A connection that is handed over
//! (`handover.rs`) heeds the server's stop only between two requests: inside
//! one, only [`Phase::Closing`] interrupts it.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::rc::Rc;

use tokio::sync::{watch, Notify};

use super::Phase;

/// Why the request loop stopped.
pub(super) enum End {
    /// The peer disconnected (at a request boundary, or with DISC), the server
    /// stopped taking requests, or the connection was declared dead: nothing
    /// to report to the caller.
    Clean,
    /// The server stopped taking requests while the reader waited between two
    /// requests (for a slot or the next header): where a handover may cut.
    Between,
    /// An I/O error or a protocol violation.
    Failed(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Failed(e)
    }
}

/// Why a connection ends early; set once, by whoever notices first.
#[derive(Default)]
pub(super) struct Dead {
    why: RefCell<Option<String>>,
    notify: Notify,
}

impl Dead {
    pub(super) fn set(&self, why: String) {
        let mut w = self.why.borrow_mut();
        if w.is_none() {
            *w = Some(why);
            self.notify.notify_waiters();
        }
    }

    fn is_set(&self) -> bool {
        self.why.borrow().is_some()
    }

    /// Why the connection was declared dead, if it was.
    pub(super) fn why(&self) -> Option<String> {
        self.why.borrow().clone()
    }

    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

/// What the reader's waits stop for: the server's phase and the connection's death.
pub(super) struct Stops {
    pub(super) phase: watch::Receiver<Phase>,
    pub(super) dead: Rc<Dead>,
    /// The phase that interrupts a request already begun: Draining, or
    /// Closing for a connection that is handed over.
    pub(super) within: Phase,
}

impl Stops {
    /// Runs `fut`, a wait between two requests, unless the server stops
    /// taking requests ([`End::Between`]) or the connection dies first.
    pub(super) async fn between_requests<F: Future>(&mut self, fut: F) -> Result<F::Output, End> {
        tokio::select! {
            biased;
            _ = self.phase.wait_for(|p| *p >= Phase::Draining) => Err(End::Between),
            _ = self.dead.wait() => Err(End::Clean),
            v = fut => Ok(v),
        }
    }

    /// Runs `fut`, a wait inside a request, unless the server reaches
    /// `within` or the connection dies first; then the loop ends cleanly.
    pub(super) async fn unless_stopped<F: Future>(&mut self, fut: F) -> Result<F::Output, End> {
        let within = self.within;
        tokio::select! {
            biased;
            _ = self.phase.wait_for(|p| *p >= within) => Err(End::Clean),
            _ = self.dead.wait() => Err(End::Clean),
            v = fut => Ok(v),
        }
    }

    /// [`Stops::unless_stopped`] for an I/O step, whose error ends the loop
    /// with that error.
    pub(super) async fn io<T>(&mut self, fut: impl Future<Output = io::Result<T>>) -> Result<T, End> {
        self.unless_stopped(fut).await?.map_err(End::Failed)
    }
}
