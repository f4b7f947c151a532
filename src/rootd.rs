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
/// The daemon an exec'd supervisor replaces: it serves until the handover.
static PREVIOUS: AtomicI32 = AtomicI32::new(0);
static STOPPING: AtomicI32 = AtomicI32::new(0);
static UPGRADE: AtomicI32 = AtomicI32::new(0);
/// In the daemon: its supervisor's pid (0: none).
static SUPERVISOR: AtomicI32 = AtomicI32::new(0);

/// The daemon's supervisor, if it runs under one.
pub(crate) fn supervisor() -> Option<Pid> {
    let p = SUPERVISOR.load(Ordering::SeqCst);
    (p > 0).then(|| Pid::from_raw(p))
}

extern "C" fn forward(sig: libc::c_int) {
    STOPPING.store(1, Ordering::SeqCst);
    for pid in [CHILD.load(Ordering::SeqCst), PREVIOUS.load(Ordering::SeqCst)] {
        if pid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

extern "C" fn upgrade_requested(_: libc::c_int) {
    UPGRADE.store(1, Ordering::SeqCst);
}

/// What the caller of [`supervise`] is after it returns.
pub(crate) enum Role {
    /// The forked daemon: go on and serve.
    Daemon,
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

/// `livemirror upgrade` of a supervised daemon: the daemon wrote the plan at
/// `plan` and sent SIGUSR1. The supervisor becomes the new binary's
/// supervisor by exec'ing it (its pid, which the initramfs glue recorded,
/// stays); the new one forks the successor and keeps the old daemon as a child
/// until the handover is over. Returns only if the exec failed, having
/// written why into the plan for the daemon to read.
fn exec_upgrade(plan: &std::path::Path, daemon: Pid) {
    use std::os::unix::process::CommandExt;
    let path = engine::hostfs::locate(plan, None);
    let read = std::fs::read(&path);
    // Read once: a stray SIGUSR1 later finds no plan to run again.
    let _ = std::fs::remove_file(&path);
    let why = match read.map_err(|e| e.to_string()).and_then(|b| {
        serde_json::from_slice::<crate::upgrade::plan::ExecPlan>(&b).map_err(|e| format!("{}: {e}", plan.display()))
    }) {
        Ok(p) if p.argv.is_empty() => "an empty command line".to_string(),
        Ok(mut p) => {
            eprintln!("livemirror supervisor: upgrading: exec {} ({})", p.program, p.argv.join(" "));
            let mut c = std::process::Command::new(&p.program);
            c.arg0(&p.argv[0])
                .args(&p.argv[1..])
                .envs(p.env.iter().cloned())
                .env(crate::upgrade::plan::ENV_ADOPT, daemon.to_string());
            // Only returns on failure.
            let e = c.exec();
            p.error = Some(format!("exec {}: {e}", p.program));
            let _ = serde_json::to_vec(&p).map(|b| std::fs::write(&path, b));
            return eprintln!("livemirror supervisor: cannot exec the new binary: {e}; supervising on");
        }
        Err(e) => e,
    };
    eprintln!("livemirror supervisor: no upgrade plan: {why}");
    let failed = crate::upgrade::plan::ExecPlan { error: Some(why), ..Default::default() };
    let _ = serde_json::to_vec(&failed).map(|b| std::fs::write(&path, b));
}

/// Splits into supervisor and daemon. Must be called while the process has a
/// single thread (before logging, runtimes or workers start). Returns
/// [`Role::Daemon`] in each forked daemon and [`Role::Exit`] in the supervisor
/// once the daemon stopped for good. `plan` is where an upgrade's exec plan is
/// written (next to the control socket).
///
/// A supervisor exec'd by an upgrade ([`crate::upgrade::plan::ENV_ADOPT`] names the
/// daemon it replaces, which is its child already) forks the successor
/// first: if that one takes over, the old daemon exits and is reaped; if not
/// (it exits with [`crate::upgrade::plan::EXIT_NOT_TAKEN_OVER`]), the old daemon
/// serves on and is supervised as if it had been forked here.
pub(crate) fn supervise(plan: std::path::PathBuf) -> Role {
    harden();
    set_handler(SigHandler::Handler(forward));
    // The flag is polled (wait_any); the handler does nothing else.
    let usr1 = signal::SigAction::new(
        SigHandler::Handler(upgrade_requested),
        signal::SaFlags::empty(),
        signal::SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    if let Err(e) = unsafe { signal::sigaction(Signal::SIGUSR1, &usr1) } {
        eprintln!("livemirror supervisor: cannot set the SIGUSR1 handler: {e}");
    }
    let mut previous = std::env::var(crate::upgrade::plan::ENV_ADOPT).ok().and_then(|p| p.parse::<i32>().ok());
    std::env::remove_var(crate::upgrade::plan::ENV_ADOPT);
    PREVIOUS.store(previous.unwrap_or(0), Ordering::SeqCst);
    let mut taking_over = std::env::var_os(crate::upgrade::wire::ENV_HANDOVER).is_some();
    let mut restarts = 0u32;
    let mut daemon: Option<Pid> = None;
    loop {
        let started = Instant::now();
        let child = match daemon {
            Some(d) => d,
            None => {
                // SAFETY: the process is single-threaded here (see above), so
                // the child may do anything.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        set_handler(SigHandler::SigDfl);
                        // SAFETY: restores the default action; no handler code.
                        let _ = unsafe { signal::signal(Signal::SIGUSR1, SigHandler::SigDfl) };
                        SUPERVISOR.store(nix::unistd::getppid().as_raw(), Ordering::SeqCst);
                        return Role::Daemon;
                    }
                    Ok(ForkResult::Parent { child }) => child,
                    Err(e) => {
                        eprintln!("livemirror supervisor: cannot start the daemon: {e}");
                        return Role::Exit(1);
                    }
                }
            }
        };
        daemon = Some(child);
        if taking_over {
            // The first daemon after an upgrade was given the handover socket;
            // a restarted one must not look for it again.
            std::env::remove_var(crate::upgrade::wire::ENV_HANDOVER);
        }
        CHILD.store(child.as_raw(), Ordering::SeqCst);
        if STOPPING.load(Ordering::SeqCst) == 1 {
            // A signal that arrived before CHILD was set was not forwarded.
            let _ = signal::kill(child, Signal::SIGTERM);
        }
        // An upgrade is acted on once the one before it is over.
        let (pid, status) = match wait_any(previous.is_none()) {
            Ok(Some((pid, status))) => (Some(pid), status),
            Ok(None) => {
                UPGRADE.store(0, Ordering::SeqCst);
                exec_upgrade(&plan, child);
                continue;
            }
            Err(e) => {
                eprintln!("livemirror supervisor: wait failed: {e}");
                return Role::Exit(1);
            }
        };
        if pid.map(Pid::as_raw) == previous {
            // The daemon an upgrade replaced, gone (it handed over, or died).
            previous = None;
            PREVIOUS.store(0, Ordering::SeqCst);
            continue;
        }
        if pid != Some(child) {
            continue;
        }
        daemon = None;
        CHILD.store(0, Ordering::SeqCst);
        let (code, sig) = match status {
            WaitStatus::Exited(_, c) => (Some(c), None),
            WaitStatus::Signaled(_, s, _) => (None, Some(s)),
            other => {
                eprintln!("livemirror supervisor: unexpected wait status {other:?}");
                (None, None)
            }
        };
        if std::mem::take(&mut taking_over) && code == Some(i32::from(crate::upgrade::plan::EXIT_NOT_TAKEN_OVER)) {
            match previous.take() {
                // The old daemon serves on: it is the one to supervise now.
                Some(p) => {
                    PREVIOUS.store(0, Ordering::SeqCst);
                    daemon = Some(Pid::from_raw(p));
                    eprintln!("livemirror supervisor: the new daemon did not take over; pid {p} serves on");
                    continue;
                }
                None => return Role::Exit(crate::upgrade::plan::EXIT_NOT_TAKEN_OVER),
            }
        }
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

/// How often the supervisor looks for an ended child or an upgrade request
/// (SIGUSR1 sets a flag; a signal could land just before a blocking wait).
const SUPERVISOR_POLL: Duration = Duration::from_millis(100);

/// Waits for any child to end (its pid and status), or, when `upgrade` allows,
/// for an upgrade request (`None`).
fn wait_any(upgrade: bool) -> nix::Result<Option<(Pid, WaitStatus)>> {
    use nix::sys::wait::WaitPidFlag;
    loop {
        if upgrade && UPGRADE.load(Ordering::SeqCst) == 1 {
            return Ok(None);
        }
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(SUPERVISOR_POLL),
            Err(nix::errno::Errno::EINTR) => {}
            // Stopped/continued reports do not end the daemon.
            Ok(WaitStatus::Stopped(..)) | Ok(WaitStatus::Continued(..)) => {}
            Ok(st) => match st.pid() {
                Some(pid) => return Ok(Some((pid, st))),
                None => std::thread::sleep(SUPERVISOR_POLL),
            },
            Err(e) => return Err(e),
        }
    }
}

/// How often the daemon looks whether its supervisor still lives.
const SUPERVISOR_CHECK: Duration = Duration::from_millis(500);

/// Watches the supervisor from the daemon: once it is gone (the daemon has a
/// new parent), says so once, in the log and as an error event, and ends.
/// The daemon serves on (see the module docs). Ends when `stop` turns true
/// (a worker stops only once its tasks have ended).
pub(crate) async fn watch_supervisor(
    supervisor: Pid,
    mirror: std::sync::Arc<engine::Mirror>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISOR_CHECK) => {}
            _ = stop.wait_for(|s| *s) => return,
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
