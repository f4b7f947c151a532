//! Threads that can run engine I/O: a tokio current-thread runtime plus a
//! `LocalSet`, with this thread's io_uring reactor hooked into parking.
//!
//! Engine futures are `!Send` (they use the thread's ring), so work is handed to a
//! worker as a `Send` closure that builds the future on the worker itself.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::thread::JoinHandle;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::LocalSet;

use crate::uring::Reactor;

/// Keeps the reactor (and so the ring fd) alive for as long as tokio watches it.
struct RingFd(Rc<Reactor>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring_fd()
    }
}

fn build_runtime() -> io::Result<tokio::runtime::Runtime> {
    Reactor::install()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(|| {
            if let Some(r) = Reactor::try_current() {
                r.on_park();
            }
        })
        .build()
}

/// Wakes futures whose completions arrive while the thread is parked in epoll.
async fn drive(reactor: Rc<Reactor>) {
    // SAFETY: RingFd owns an Rc of the reactor, so the ring fd stays open and
    // unchanged for the AsyncFd's whole life.
    let fd = match unsafe { AsyncFd::register_with_interest(RingFd(reactor.clone()), Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("cannot watch the io_uring fd: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable().await else { return };
        reactor.reap();
        guard.clear_ready();
        // A completion posted between the reap and clear_ready raised a new
        // readiness event (tokio keeps it), so nothing is lost.
    }
}

/// Runs `fut` to completion on the current thread with an io_uring reactor, then
/// lets every task it spawned finish. For tools, tests and the CLI.
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    let rt = build_runtime()?;
    let local = LocalSet::new();
    let reactor = Reactor::current()?;
    let driver = local.spawn_local(drive(reactor));
    let out = local.block_on(&rt, fut);
    driver.abort();
    rt.block_on(local);
    Ok(out)
}

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A thread running engine I/O. Jobs are spawned as local tasks on it.
pub struct Worker {
    tx: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl Worker {
    pub fn spawn(name: &str) -> io::Result<Worker> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            let rt = match build_runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let local = LocalSet::new();
            let Ok(reactor) = Reactor::current() else { return };
            let driver = local.spawn_local(drive(reactor));
            let _ = ready_tx.send(Ok(()));
            local.block_on(&rt, async {
                while let Some(job) = rx.recv().await {
                    tokio::task::spawn_local(job());
                }
            });
            driver.abort();
            // The sender is gone: let every job finish before the thread exits.
            rt.block_on(local);
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("worker thread died during start"))??;
        Ok(Worker { tx: Some(tx), thread: Some(thread), name: name.to_string() })
    }

    /// Runs `make()` as a task on this worker.
    pub fn run<F, Fut>(&self, make: F) -> io::Result<()>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || Box::pin(make()));
        self.tx
            .as_ref()
            .ok_or_else(|| io::Error::other("worker is shutting down"))?
            .send(job)
            .map_err(|_| io::Error::other(format!("worker {} has stopped", self.name)))
    }

    /// Runs `make()` on this worker and returns its output.
    pub async fn call<F, Fut, T>(&self, make: F) -> io::Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.run(move || async move {
            let _ = tx.send(make().await);
        })?;
        rx.await.map_err(|_| io::Error::other("worker dropped the job"))
    }

    /// Stops taking jobs and waits for every running job to finish.
    pub fn join(self) {
        drop(self);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            // The last handle can be dropped by a task running on the worker
            // itself (a connection holding the server); joining would wait for
            // ourselves. Closing the channel is enough: the thread finishes its
            // tasks and exits on its own.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
