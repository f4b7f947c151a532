//! Running as the storage daemon of the root filesystem.
//!
//! When `argv[0]` starts with '@' (systemd's convention for storage daemons
//! that survive the initrd's switch_root and shutdown kill sprees) or with
//! `--root-storage-daemon`, the process:
//! - locks its memory (`mlockall`), marks itself as an I/O flusher
//!   (`PR_SET_IO_FLUSHER`: allocations during reclaim do not recurse into the
//!   device we serve) and exempts itself from the OOM killer;
//! - splits into a small supervisor and the daemon; if the daemon dies
//!   abnormally the supervisor forks a new one and the restarted daemon resumes
//!   from `--state` and reconnects the kernel over netlink.
//!
//! The supervisor forks without exec: after a classic switch_root its root is
//! the emptied initramfs, where neither the binary nor its ELF interpreter can
//! be found any more, but its own memory (locked, single-threaded, with the
//! arguments already parsed) is always there.
//!
//! If the supervisor itself dies (`kill -9`; nothing else stops it: it is
//! mlocked, exempt from the OOM killer and spared by systemd's kill sprees),
//! the daemon keeps serving: the kernel device, its connections and every
//! client are the daemon's, not the supervisor's. The daemon is adopted by
//! init (or the nearest subreaper); it notices within half a second, says so
//! in the log and the event stream, and runs on unsupervised: a crash of it
//! would no longer be restarted. `livemirror upgrade` starts a supervised
//! daemon in its place without interrupting I/O.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SigHandler, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// True when this process should behave as the root storage daemon.
pub(crate) fn requested(flag: bool) -> bool {
    flag || std::env::args_os().next().is_some_and(|a| a.as_encoded_bytes().first() == Some(&b'@'))
}

/// Locks memory, marks the process as an I/O flusher and exempts it from the
/// OOM killer. Failures are logged, not fatal: a daemon that runs is better
/// than none, and the log says what is missing.
pub(crate) fn harden() {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        // glibc reserves 64 MiB of address space per thread arena, and locked
        // memory counts every reservation: two arenas keep VmLck near what is
        // really resident (the hot paths use pooled buffers, not malloc).
        if libc::mallopt(libc::M_ARENA_MAX, 2) != 1 {
            tracing::debug!("mallopt(M_ARENA_MAX) refused");
        }
        if libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) != 0 {
            tracing::warn!("mlockall failed: {}", std::io::Error::last_os_error());
        }
        const PR_SET_IO_FLUSHER: libc::c_int = 57;
        if libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 {
            tracing::warn!("PR_SET_IO_FLUSHER failed: {}", std::io::Error::last_os_error());
        }
    }
    if let Err(e) = std::fs::write(engine::hostfs::proc_path("self/oom_score_adj"), "-1000") {
        tracing::warn!("cannot set oom_score_adj: {e}");
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);
static STOPPING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    STOPPING.store(1, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// What the caller of [`supervise`] is after it returns.
pub(crate) enum Role {
    /// The forked daemon: go on and serve; its supervisor is this process.
    Daemon { supervisor: Pid },
    /// The supervisor is done: exit with this code.
    Exit(u8),
}

fn set_handler(handler: SigHandler) {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only touches atomics and calls kill (async-signal-safe).
        if let Err(e) = unsafe { signal::signal(sig, handler) } {
            eprintln!("livemirror supervisor: cannot set the {sig} handler: {e}");
        }
    }
}

/// Splits into supervisor and daemon. Must be called while the process has a
/// single thread (before logging, runtimes or workers start). Returns
/// [`Role::Daemon`] in each forked daemon and [`Role::Exit`] in the supervisor
/// once the daemon stopped for good.
pub(crate) fn supervise() -> Role {
    harden();
    set_handler(SigHandler::Handler(forward));
    let mut restarts = 0u32;
    loop {
        let started = Instant::now();
        // SAFETY: the process is single-threaded here (see above), so the child
        // may do anything.
        let child = match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                set_handler(SigHandler::SigDfl);
                return Role::Daemon { supervisor: nix::unistd::getppid() };
            }
            Ok(ForkResult::Parent { child }) => child,
            Err(e) => {
                eprintln!("livemirror supervisor: cannot start the daemon: {e}");
                return Role::Exit(1);
            }
        };
        CHILD.store(child.as_raw(), Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) == 1 {
            // A signal that arrived before CHILD was set was not forwarded.
            let _ = signal::kill(child, Signal::SIGTERM);
        }
        let status = wait_for(child);
        CHILD.store(0, Ordering::SeqCst);
        let (code, sig) = match status {
            Ok(WaitStatus::Exited(_, c)) => (Some(c), None),
            Ok(WaitStatus::Signaled(_, s, _)) => (None, Some(s)),
            Ok(other) => {
                eprintln!("livemirror supervisor: unexpected wait status {other:?}");
                (None, None)
            }
            Err(e) => {
                eprintln!("livemirror supervisor: wait failed: {e}");
                return Role::Exit(1);
            }
        };
        if STOPPING.load(Ordering::SeqCst) == 1 {
            return Role::Exit(code.unwrap_or(0) as u8);
        }
        match code {
            Some(0) => return Role::Exit(0),
            // A usage error will not get better by retrying.
            Some(2) => return Role::Exit(2),
            _ => {
                restarts += 1;
                // Back off when it keeps failing at start (a device not there
                // yet, say); a crash after a long run restarts at once.
                let pause = if started.elapsed() < Duration::from_secs(5) {
                    Duration::from_millis(200u64 << restarts.min(5)).min(Duration::from_secs(5))
                } else {
                    restarts = 0;
                    Duration::from_millis(100)
                };
                eprintln!(
                    "livemirror supervisor: the daemon stopped ({}); restarting in {} ms",
                    sig.map(|s| format!("signal {s}")).or(code.map(|c| format!("exit {c}"))).unwrap_or_default(),
                    pause.as_millis()
                );
                std::thread::sleep(pause);
            }
        }
    }
}

fn wait_for(child: Pid) -> nix::Result<WaitStatus> {
    loop {
        match waitpid(child, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            // Stopped/continued reports do not end the daemon.
            Ok(WaitStatus::Stopped(..)) | Ok(WaitStatus::Continued(..)) => continue,
            other => return other,
        }
    }
}

/// How often the daemon looks whether its supervisor still lives.
const SUPERVISOR_CHECK: Duration = Duration::from_millis(500);

/// Watches the supervisor from the daemon: once it is gone (the daemon has a
/// new parent), says so once, in the log and as an error event, and ends.
/// The daemon serves on (see the module docs). Ends when the daemon stops (a
/// worker stops only once its tasks have ended).
pub(crate) async fn watch_supervisor(supervisor: Pid, mirror: std::sync::Arc<engine::Mirror>) {
    loop {
        tokio::time::sleep(SUPERVISOR_CHECK).await;
        if mirror.is_shutting_down() {
            return;
        }
        if nix::unistd::getppid() != supervisor {
            mirror.log_event(
                engine::EventKind::Error,
                format!(
                    "the supervisor (pid {supervisor}) is gone: this daemon keeps serving, but nothing would restart it \
                     if it stopped; `livemirror upgrade` starts a supervised daemon in its place"
                ),
            );
            return;
        }
    }
}
