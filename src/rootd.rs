//! Running as the storage daemon of the root filesystem.
//!
//! When `argv[0]` starts with '@' (systemd's convention for storage daemons
//! that survive the initrd's switch_root and shutdown kill sprees) or with
//! `--root-storage-daemon`, the process:
//! - locks its memory (`mlockall`), marks itself as an I/O flusher
//!   (`PR_SET_IO_FLUSHER`: allocations during reclaim do not recurse into the
//!   device we serve) and exempts itself from the OOM killer;
//! - splits into a small supervisor and the daemon; if the daemon dies
//!   abnormally the supervisor restarts it with the same arguments from its own
//!   binary image (`/proc/self/exe`, which lives in RAM: the initramfs or /run),
//!   and the restarted daemon resumes from `--state` and reconnects the kernel
//!   over netlink.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Set in the environment of the supervised daemon.
pub const SUPERVISED_ENV: &str = "LIVEMIRROR_SUPERVISED";

/// True when this process should behave as the root storage daemon.
pub fn requested(flag: bool) -> bool {
    flag || std::env::args_os().next().is_some_and(|a| a.as_encoded_bytes().first() == Some(&b'@'))
}

/// Locks memory, marks the process as an I/O flusher and exempts it from the
/// OOM killer. Failures are logged, not fatal: a daemon that runs is better
/// than none, and the log says what is missing. With `leave_cwd`, the working
/// directory moves to "/" so no directory of the initrd stays busy (callers
/// resolve relative paths first).
pub fn harden(leave_cwd: bool) {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        if libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) != 0 {
            tracing::warn!("mlockall failed: {}", std::io::Error::last_os_error());
        }
        const PR_SET_IO_FLUSHER: libc::c_int = 57;
        if libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 {
            tracing::warn!("PR_SET_IO_FLUSHER failed: {}", std::io::Error::last_os_error());
        }
    }
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        tracing::warn!("cannot set oom_score_adj: {e}");
    }
    if leave_cwd {
        let _ = std::env::set_current_dir("/");
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

/// Runs the daemon under a supervisor; returns the exit code to use.
pub fn supervise() -> u8 {
    // Keep the working directory: the daemon it starts resolves relative paths
    // against it.
    harden(false);
    // SAFETY: installing a handler that only touches atomics and calls kill.
    unsafe {
        libc::signal(libc::SIGTERM, forward as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, forward as *const () as libc::sighandler_t);
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "@livemirror".into());
    let rest: Vec<_> = args.collect();
    let mut restarts = 0u32;
    loop {
        let started = Instant::now();
        let child = Command::new("/proc/self/exe").arg0(&argv0).args(&rest).env(SUPERVISED_ENV, "1").spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("livemirror supervisor: cannot start the daemon: {e}");
                return 1;
            }
        };
        CHILD.store(child.id() as i32, Ordering::SeqCst);
        let status = loop {
            match child.wait() {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("livemirror supervisor: wait failed: {e}");
                    return 1;
                }
            }
        };
        CHILD.store(0, Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) == 1 {
            return status.code().unwrap_or(0) as u8;
        }
        match (status.code(), status.signal()) {
            (Some(0), _) => return 0,
            // A usage error will not get better by retrying.
            (Some(2), _) => return 2,
            (code, sig) => {
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
