//! One hardware queue, served on the engine thread it was started on.
//!
//! The queue's FETCH and COMMIT_AND_FETCH commands go through that thread's
//! own io_uring (the engine's [`Reactor`]), the same ring the engine's I/O for
//! the request uses: a request is fetched, carried out and committed without
//! leaving the thread (docs/decisions.md, ublk). The driver requires that:
//! the thread that sends a queue's last FETCH is the queue's daemon, and a
//! command for the queue from any other thread is refused.
//!
//! Each tag has a task: FETCH, then forever carry out the request the fetch
//! completed with and send its result with the next fetch. A fetch that
//! completes with `UBLK_IO_RES_ABORT` ends the task (the device is stopping).
//!
//! Leaving the device to the next server ([`Shared::freeze`]): a request that
//! arrives after the freeze is not carried out and never committed. It stays
//! with the driver, which gives it to the next server once this process has
//! exited (`UBLK_F_USER_RECOVERY_REISSUE`). The ordering that makes this
//! exact is in [`Shared::enter`]. Then [`Shared::quit`] ends the tag tasks
//! that wait on a fetch: their commands stay in the kernel until the thread's
//! ring is closed (the driver cancels them then), so the engine threads can
//! finish and the process exit.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use engine::rt::Worker;
use engine::uring::Reactor;
use engine::{BlockDevice, BufPool};
use io_uring::{opcode, types};

use crate::request::{execute, Request, UserCopy};
use crate::sys::{self, IoCmd, IoDesc};

/// What the queues of one device share with the thread that controls it.
pub(crate) struct Shared {
    /// `/dev/ublkcN`, open once for all queues (the driver allows one opener).
    cdev: Mutex<Option<OwnedFd>>,
    raw_fd: RawFd,
    frozen: AtomicBool,
    /// Set once: every tag task waiting on a fetch ends.
    quit: tokio::sync::watch::Sender<bool>,
    /// Requests being carried out right now.
    busy: AtomicUsize,
    /// Tag tasks that have not ended.
    alive: AtomicUsize,
    /// Requests carried out since start, for the log and the tests.
    pub(crate) served: AtomicU64,
    /// The first error that ended a queue, if any.
    failure: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new(cdev: OwnedFd) -> Shared {
        let raw_fd = cdev.as_raw_fd();
        Shared {
            cdev: Mutex::new(Some(cdev)),
            raw_fd,
            frozen: AtomicBool::new(false),
            quit: tokio::sync::watch::Sender::new(false),
            busy: AtomicUsize::new(0),
            alive: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            failure: Mutex::new(None),
        }
    }

    /// From now on no request is carried out (see the module doc).
    pub(crate) fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Ends every tag task that waits on a fetch (after [`Shared::freeze`],
    /// or when the device is dropped without being removed or left).
    pub(crate) fn quit(&self) {
        self.quit.send_replace(true);
    }

    /// Marks a request as being carried out; false (and nothing marked) after
    /// the freeze. The count is raised before the freeze is read, and
    /// [`Shared::freeze`] is stored before [`Shared::busy`] is read (all SeqCst):
    /// so once the freezer sees no request busy, every later one sees the freeze.
    fn enter(&self) -> bool {
        self.busy.fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            self.busy.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    pub(crate) fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn fail(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
    }

    /// Closes `/dev/ublkcN` (once every queue has ended: the driver deletes a
    /// device only when nothing holds it).
    pub(crate) fn close(&self) {
        if let Ok(mut c) = self.cdev.lock() {
            c.take();
        }
    }
}

/// The queue's request descriptors, mapped read-only from `/dev/ublkcN`.
struct Descriptors {
    ptr: *const IoDesc,
    len: usize,
    depth: u16,
}

impl Descriptors {
    fn map(fd: RawFd, q_id: u16, depth: u16) -> std::io::Result<Descriptors> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = sys::descriptors_len(depth, page);
        // SAFETY: a fresh read-only shared mapping of the driver's descriptor
        // array; the pointer is checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                sys::descriptors_offset(q_id, page) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Descriptors { ptr: ptr as *const IoDesc, len, depth })
    }

    fn get(&self, tag: u16) -> IoDesc {
        debug_assert!(tag < self.depth);
        // SAFETY: tag < depth, and the mapping holds `depth` descriptors; the
        // driver wrote this one before completing the tag's fetch (the CQE we
        // reaped orders it before this read), and writes it again only after
        // our next commit.
        unsafe { self.ptr.add(tag as usize).read_volatile() }
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

struct Queue<D> {
    id: u16,
    fd: RawFd,
    dev: Arc<D>,
    pool: BufPool,
    /// Only to measure the alternative (docs/decisions.md, ublk): carry each
    /// request out on this other engine thread, as a queue thread of its own
    /// would have to.
    hop: Option<Arc<Worker>>,
    shared: Arc<Shared>,
    descriptors: Descriptors,
    reactor: Rc<Reactor>,
}

/// Counts a tag task as alive for as long as it exists.
struct Alive(Arc<Shared>);

impl Alive {
    fn new(shared: &Arc<Shared>) -> Alive {
        shared.alive.fetch_add(1, Ordering::SeqCst);
        Alive(shared.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts serving queue `q_id` (`depth` tags) on the current engine thread.
/// Returns once every tag's task is spawned; the fetches reach the kernel
/// when the thread next parks. Errors (the mapping) are recorded in `shared`.
pub(crate) fn start<D: BlockDevice>(
    dev: Arc<D>,
    pool: BufPool,
    shared: Arc<Shared>,
    q_id: u16,
    depth: u16,
    hop: Option<Arc<Worker>>,
) {
    // Counted before anything can fail, so the controller never sees zero
    // tasks alive while this queue is still starting.
    let starting = Alive::new(&shared);
    let reactor = match Reactor::current() {
        Ok(r) => r,
        Err(e) => return shared.fail(format!("queue {q_id}: {e}")),
    };
    let descriptors = match Descriptors::map(shared.raw_fd, q_id, depth) {
        Ok(d) => d,
        Err(e) => return shared.fail(format!("queue {q_id}: cannot map its request descriptors: {e}")),
    };
    let q =
        Rc::new(Queue { id: q_id, fd: shared.raw_fd, dev, pool, hop, shared: shared.clone(), descriptors, reactor });
    for tag in 0..depth {
        let alive = Alive::new(&shared);
        tokio::task::spawn_local(serve_tag(q.clone(), tag, alive));
    }
    drop(starting);
}

async fn serve_tag<D: BlockDevice>(q: Rc<Queue<D>>, tag: u16, _alive: Alive) {
    let mut op = sys::IO_FETCH_REQ;
    let mut result = 0;
    let mut quit = q.shared.quit.subscribe();
    loop {
        let cmd = IoCmd { q_id: q.id, tag, result, addr: 0 }.to_sqe_cmd();
        let entry = opcode::UringCmd16::new(types::Fd(q.fd), op).cmd(cmd).build();
        // The command's data is inline in the SQE: nothing to keep alive, so
        // dropping the operation (quit) is safe; the kernel keeps the command.
        let fetched = q.reactor.start((), move |_| entry);
        let (res, ()) = tokio::select! {
            r = fetched => r,
            _ = quit.wait_for(|&q| q) => return,
        };
        match res {
            Ok(_) => {}
            // UBLK_IO_RES_ABORT: the device is stopping; this tag is done.
            Err(e) if e.raw_os_error() == Some(-sys::IO_RES_ABORT) => return,
            Err(e) => {
                let what = if op == sys::IO_FETCH_REQ { "fetch" } else { "commit" };
                q.shared.fail(format!("queue {} tag {tag}: {what} failed: {e}", q.id));
                tracing::error!("ublk queue {} tag {tag}: {what} failed: {e}", q.id);
                return;
            }
        }
        if !q.shared.enter() {
            // Frozen: the request stays with the driver for the next server.
            return;
        }
        let req = Request::decode(&q.descriptors.get(tag));
        let port = UserCopy { fd: q.fd, offset: sys::user_copy_offset(q.id, tag) };
        let outcome = match &q.hop {
            None => execute(&*q.dev, &q.pool, req, &port).await,
            Some(w) => {
                let (dev, pool) = (q.dev.clone(), q.pool.clone());
                let done = w.call(move || async move { execute(&*dev, &pool, req, &port).await }).await;
                done.unwrap_or(-libc::ESHUTDOWN)
            }
        };
        q.shared.leave();
        if outcome == -libc::ESHUTDOWN {
            // The engine is shutting down: leave the request uncommitted, to
            // be reissued to the next server, rather than fail it.
            return;
        }
        result = outcome;
        q.shared.served.fetch_add(1, Ordering::Relaxed);
        op = sys::IO_COMMIT_AND_FETCH_REQ;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        Shared::new(null.into())
    }

    #[test]
    fn after_the_freeze_no_request_is_carried_out_and_none_is_counted() {
        let s = shared();
        assert!(s.enter(), "before the freeze a request is carried out");
        assert_eq!(s.busy(), 1);
        s.freeze();
        assert!(!s.enter(), "after the freeze it is left to the driver");
        assert_eq!(s.busy(), 1, "a refused request is not counted");
        s.leave();
        assert_eq!(s.busy(), 0, "the one already running finishes and is counted out");
    }

    #[test]
    fn the_freezer_that_sees_nothing_busy_sees_no_later_request_run() {
        // Four threads enter and leave as fast as they can; once the freezer has
        // stored the freeze and then seen zero busy, no enter may succeed.
        let s = Arc::new(shared());
        let seen_idle = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (s, seen_idle, violations) = (s.clone(), seen_idle.clone(), violations.clone());
                std::thread::spawn(move || {
                    for _ in 0..200_000 {
                        if s.enter() {
                            if seen_idle.load(Ordering::SeqCst) {
                                violations.fetch_add(1, Ordering::SeqCst);
                            }
                            s.leave();
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(5));
        s.freeze();
        while s.busy() != 0 {
            std::hint::spin_loop();
        }
        seen_idle.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(violations.load(Ordering::SeqCst), 0);
        assert_eq!(s.busy(), 0);
    }

    #[test]
    fn quit_wakes_every_waiting_tag_task() {
        let s = Arc::new(shared());
        let mut rx = s.quit.subscribe();
        let woken = engine::rt::block_on(async {
            let s2 = s.clone();
            let waiter = tokio::task::spawn_local(async move { rx.wait_for(|&q| q).await.is_ok() });
            s2.quit();
            waiter.await.expect("task")
        })
        .expect("runtime");
        assert!(woken);
    }
}
