//! `livemirror upgrade`: replaces the running daemon with the binary now
//! installed, with no refused connection, no I/O error and no lost write.
//!
//! What the successor gets:
//! - the listening sockets (NBD listeners, the control socket, the metrics
//!   listener): second handles the daemon keeps from the start, so they accept
//!   throughout (a connection made meanwhile waits in the backlog);
//! - the kernel device's live connections, each with the bytes read past its
//!   last request (nbd-frontend's kernel/): the kernel never sees a
//!   connection die, so nothing waits for `--nbd-timeout`. A ublk device is
//!   left instead (its queues stopped, the device kept) and the successor,
//!   started with the same `--ublk-device`, takes it over by user recovery,
//!   which reissues what was in flight;
//! - the state: the state file written at this daemon's clean stop (one is
//!   made for a daemon run without `--state`), and the devices by name (this
//!   daemon closed them, releasing their locks).
//!
//! Network clients' connections are not handed over (a TLS session cannot be):
//! each gets the replies to its requests in flight, then its connection ends,
//! and the client reconnects to the same socket.
//!
//! The order:
//! 1. The successor starts: spawned by this daemon, or for a supervised root
//!    storage daemon exec'd by the supervisor in place of itself (its pid, which
//!    the initramfs glue recorded, stays). It checks what it can without the
//!    devices (arguments, TLS credentials, the kernel's NBD client), connects
//!    to this daemon's handover socket and says hello. Until then this daemon
//!    serves as usual: a binary that does not start changes nothing.
//! 2. This daemon stops: the accept loops end (the sockets stay open), requests
//!    in flight finish, the kernel connections stop between two requests, the
//!    copier stops, the devices are flushed, the state persisted, the devices
//!    closed. The pause begins.
//! 3. It sends the manifest and the sockets. The successor opens the devices,
//!    loads the state, serves, resumes the copy and says ready: the pause ends,
//!    and this daemon exits. If the successor fails instead, this daemon starts
//!    again in place from the same sockets and state file, and serves on.

pub(crate) mod plan;
pub(crate) mod sockets;
mod stage;
pub(crate) mod wire;

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nbd_frontend::kernel::HandedConnection;
use nbd_frontend::ListenAddr;

use crate::control::{Response, UpgradeReport, UpgradeRequest};
use crate::serve::{Running, ServeArgs};
use plan::{plan_path, ExecPlan, ENV_ADOPT};
use sockets::{Held, Inherited};
use wire::{Manifest, Msg};

pub(crate) use wire::{take_env, ENV_HANDOVER};

/// How long the successor may take to start and say hello, and to take over
/// once it has everything (opening remote devices included).
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// This process's command line, as it was started (the successor gets the same).
static ARGV: OnceLock<Vec<OsString>> = OnceLock::new();
/// A root storage daemon's binary directory (its own tmpfs).
static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory the first daemon was started in: relative paths on the
/// command line are relative to it (a successor inherits procfs as its
/// working directory, see engine::hostfs).
static START_DIR: OnceLock<PathBuf> = OnceLock::new();
const ENV_START_DIR: &str = "LIVEMIRROR_START_DIR";

/// Where this daemon's command line was written for: the predecessor's
/// start directory for a successor, else the working directory.
pub(crate) fn start_dir() -> Option<PathBuf> {
    match std::env::var_os(ENV_START_DIR) {
        Some(d) => {
            std::env::remove_var(ENV_START_DIR);
            Some(PathBuf::from(d))
        }
        None => std::env::current_dir().ok(),
    }
}

/// Runs `f` with `dir` as the working directory, and returns to the current
/// one (which may be a procfs no path reaches) afterwards.
pub(crate) fn in_dir<T>(dir: Option<&Path>, f: impl FnOnce() -> T) -> T {
    let here = std::fs::File::open(".");
    let moved = match (dir, &here) {
        (Some(d), Ok(_)) => std::env::set_current_dir(d).is_ok(),
        _ => false,
    };
    let out = f();
    if let (true, Ok(h)) = (moved, &here) {
        if let Err(e) = nix::unistd::fchdir(h) {
            eprintln!("livemirror: cannot return to the working directory: {e}");
        }
    }
    out
}

/// Remembers the command line, the directory it was written for and, for a
/// root storage daemon, where its binary is; called first thing in `serve` (a
/// supervisor's forks inherit all three).
pub(crate) fn remember_start(root_daemon: bool, start_dir: Option<PathBuf>) {
    let _ = ARGV.set(std::env::args_os().collect());
    if let Some(d) = start_dir {
        let _ = START_DIR.set(d);
    }
    if let Some(dir) = std::env::var_os(ENV_BIN_DIR) {
        // A successor run through the staged interpreter: its executable is
        // the interpreter, not the binary, and so is its process name.
        std::env::remove_var(ENV_BIN_DIR);
        let _ = BIN_DIR.set(PathBuf::from(dir));
        if let Err(e) = nix::sys::prctl::set_name(c"livemirror") {
            eprintln!("livemirror: cannot set the process name: {e}");
        }
    } else if root_daemon {
        if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
            let _ = BIN_DIR.set(dir);
        }
    }
}

/// How the kernel device goes to the successor. NBD: the live connections
/// (the successor serves them on; [`nbd_frontend::kernel::adopt`]). A ublk
/// device needs nothing here: the old daemon leaves it (`stop`) and the
/// successor's start recovers it by its id, as after a crash.
pub(crate) enum KernelHandover {
    Nbd(Vec<HandedConnection>),
}

/// The arguments the successor (or this daemon, restarting in place) serves
/// with: the command line's, except that the devices are the ones served now
/// (the state file records them without credentials), the rates are the ones
/// in force (and an overlay's limit), and the rest a state file keeps (the
/// region size, the copy's progress, a pause) comes from it.
pub(crate) fn successor_args(args: &ServeArgs, m: &Manifest) -> ServeArgs {
    let mut a = args.clone();
    a.source = m.source.clone();
    a.target = m.target.clone();
    a.state = Some(m.state.clone());
    a.restart_sync = false;
    a.region_size = None;
    a.max_rate = Some(m.max_rate);
    a.min_rate = Some(m.min_rate);
    if let Some(o) = &m.overlay {
        a.overlay_limit = o.limit;
    }
    a
}

/// What an upgrade request came to.
pub(crate) enum Outcome {
    /// The successor serves: this process exits (0) and leaves the sockets,
    /// their files and the kernel device alone. `notify`: its pid, for a
    /// service manager watching this process as the main one.
    HandedOver { notify: Option<u32> },
    /// This daemon serves (the same `Running`, or one restarted in place).
    Serving(Box<Running>),
    /// Neither: the successor failed after this daemon stopped, and it could
    /// not start again either.
    Lost(anyhow::Error),
}

/// How the successor was started, to watch it until it says hello.
enum Launch {
    Spawned(std::process::Child),
    /// Exec'd by the supervisor in place of itself.
    Supervisor {
        pid: nix::unistd::Pid,
        plan: PathBuf,
    },
}

impl Launch {
    /// Why the successor will not say hello, once that is known.
    fn gone(&mut self) -> Option<String> {
        match self {
            Launch::Spawned(c) => match c.try_wait() {
                Ok(Some(st)) => Some(format!("it exited ({st}) before it could take over (its log says why)")),
                Ok(None) => None,
                Err(e) => Some(format!("cannot watch it: {e}")),
            },
            Launch::Supervisor { pid, plan } => {
                if nix::sys::signal::kill(*pid, None).is_err() {
                    return Some(format!("the supervisor (pid {pid}) is gone"));
                }
                let p = engine::hostfs::locate(plan, None);
                let plan: ExecPlan = std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok())?;
                plan.error.map(|e| format!("the supervisor cannot start it: {e}"))
            }
        }
    }

    /// Stops a successor that will not take over (a supervisor's own child is
    /// the supervisor's to reap; it exits by itself once the handover socket
    /// is gone).
    fn abandon(&mut self) {
        if let Launch::Spawned(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Launch::Spawned(c) => Some(c.id()),
            Launch::Supervisor { .. } => None,
        }
    }
}

/// Starts the successor from `req.binary` (as the caller sees it).
fn launch(args: &ServeArgs, req: &UpgradeRequest, env: &str) -> anyhow::Result<Launch> {
    let argv = ARGV.get().cloned().unwrap_or_else(|| std::env::args_os().collect());
    let binary = engine::hostfs::locate(&req.binary, req.caller);
    if !crate::rootd::requested(args.root_storage_daemon) {
        let mut c = std::process::Command::new(&binary);
        if let Some(a0) = argv.first() {
            c.arg0(a0);
        }
        c.args(&argv[1.min(argv.len())..]).env(ENV_HANDOVER, env).stdin(std::process::Stdio::null());
        if let Some(d) = START_DIR.get() {
            c.env(ENV_START_DIR, d);
        }
        let child = c.spawn().with_context(|| format!("cannot start {}", req.binary.display()))?;
        return Ok(Launch::Spawned(child));
    }
    // A root storage daemon: from its own tmpfs, through the staged interpreter.
    let caller = req.caller.context("the caller's pid is unknown: cannot find its libraries")?;
    let bin_dir = BIN_DIR.get().context("this daemon does not know where its binary lives")?;
    let reach = engine::hostfs::locate(bin_dir, None);
    let staged = stage::stage(&binary, caller, bin_dir, &reach)
        .with_context(|| format!("cannot stage the new binary in {}", bin_dir.display()))?;
    let (program, cmdline) = staged.command_line(&argv);
    let supervisor = crate::rootd::supervisor();
    match supervisor.filter(|s| *s == nix::unistd::getppid()) {
        Some(pid) => {
            let plan = ExecPlan {
                program: program.display().to_string(),
                argv: cmdline.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
                env: [
                    (ENV_HANDOVER, env.to_string()),
                    (ENV_ADOPT, std::process::id().to_string()),
                    (ENV_BIN_DIR, bin_dir.display().to_string()),
                ]
                .into_iter()
                .chain(START_DIR.get().map(|d| (ENV_START_DIR, d.display().to_string())))
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                error: None,
            };
            let path = plan_path(&args.control);
            std::fs::write(engine::hostfs::locate(&path, None), serde_json::to_vec(&plan)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).context("cannot signal the supervisor")?;
            Ok(Launch::Supervisor { pid, plan: path })
        }
        // No supervisor (it died): the successor brings its own.
        None => {
            let mut c = std::process::Command::new(&program);
            c.arg0(&cmdline[0]);
            c.args(&cmdline[1..]).env(ENV_HANDOVER, env).env(ENV_BIN_DIR, bin_dir).stdin(std::process::Stdio::null());
            if let Some(d) = START_DIR.get() {
                c.env(ENV_START_DIR, d);
            }
            Ok(Launch::Spawned(c.spawn().context("cannot start the new binary")?))
        }
    }
}

/// Tells a successor run from a staged copy where its binary directory is
/// (it cannot tell from its own executable, which is the ELF interpreter).
pub(crate) const ENV_BIN_DIR: &str = "LIVEMIRROR_BIN_DIR";

/// What this daemon hands over, once it has stopped.
struct Stopped {
    held: Held,
    kernel: KernelHandover,
    manifest: Manifest,
    upgrades: crate::control::Upgrades,
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Stops serving, keeping what the successor needs (see the module docs, 2).
fn stop(args: &ServeArgs, running: Running) -> (Stopped, anyhow::Result<()>) {
    let stopped_at = now_unix();
    let Running {
        mirror,
        server,
        kernel,
        ublk,
        workers,
        stop_control,
        mut sockets,
        shutdown_timeout,
        held,
        notifier,
        remove_on_stop,
        upgrades,
        ..
    } = running;
    // The socket files are the successor's now.
    sockets.take();
    if let Some(n) = notifier {
        n.pause();
    }
    let mut kernel = kernel;
    if let Some((_, k)) = kernel.as_mut() {
        // No connection is replaced from now on.
        k.stop();
    }
    if let Some(door) = ublk {
        // Left, not removed: the driver holds its I/O until the successor,
        // started with the same --ublk-device, takes it over by user
        // recovery (and reissues what was in flight), as after a crash.
        door.stop(crate::flush::KernelStop::Keep, shutdown_timeout);
    }
    let status = mirror.status();
    let settings = mirror.settings();
    let (state, made) = match (&args.state, remove_on_stop) {
        (Some(s), made) => (s.clone(), made.is_some()),
        (None, _) => (handover_state_path(&args.control), true),
    };
    let res = engine::rt::block_on(async {
        server.shutdown(shutdown_timeout).await;
        stop_control.send_replace(true);
        mirror.shutdown().await
    })
    .map_err(anyhow::Error::from)
    .and_then(|r| r.context("the final flush"))
    .and_then(|()| match args.state {
        Some(_) => Ok(()),
        None => mirror.write_state_file(&engine::hostfs::locate(&state, None)).map_err(anyhow::Error::from),
    });
    let handed = kernel.map(|(_, mut k)| k.hand_over()).unwrap_or_default();
    drop(server);
    drop(mirror);
    for w in workers {
        if let Ok(w) = std::sync::Arc::try_unwrap(w) {
            w.join();
        }
    }
    let manifest = Manifest {
        listeners: held.listeners.iter().map(|(a, _)| a.to_string()).collect(),
        control: held.control.is_some(),
        metrics: held.metrics.is_some(),
        kernel_connections: handed.len(),
        source: status.source.map(PathBuf::from),
        target: status.target.map(PathBuf::from),
        state,
        state_made_for_handover: made,
        max_rate: settings.max_rate,
        min_rate: settings.min_rate,
        overlay: status.overlay.as_ref().map(|o| wire::OverlayInForce { limit: o.bytes_limit }),
        bin_dir: BIN_DIR.get().cloned(),
        stopped_at,
        stop_ms: (now_unix() - stopped_at).max(0.0) * 1000.0,
    };
    (Stopped { held, kernel: KernelHandover::Nbd(handed), manifest, upgrades }, res)
}

/// A state file for a daemon run without `--state`, next to its control socket.
fn handover_state_path(control: &Path) -> PathBuf {
    let mut name = control.file_name().map(OsString::from).unwrap_or_else(|| "control".into());
    name.push(".handover-state");
    control.with_file_name(name)
}

/// Sends the manifest with every socket.
fn send_manifest(conn: &std::os::unix::net::UnixStream, s: &Stopped) -> std::io::Result<()> {
    let mut fds = Vec::new();
    for (_, l) in &s.held.listeners {
        fds.push(l.as_fd().as_raw_fd());
    }
    if let Some(c) = &s.held.control {
        fds.push(c.as_raw_fd());
    }
    if let Some(m) = &s.held.metrics {
        fds.push(m.as_raw_fd());
    }
    let KernelHandover::Nbd(handed) = &s.kernel;
    let mut blobs: Vec<&[u8]> = Vec::new();
    for h in handed {
        fds.push(h.socket.as_raw_fd());
        blobs.push(&h.leftover);
    }
    wire::send(conn, &Msg::Manifest(Box::new(s.manifest.clone())), &blobs, &fds)
}

/// What the stopped daemon still holds, as if it had been handed over to
/// itself (a restart in place).
fn inherited_from(s: Stopped) -> anyhow::Result<Inherited> {
    let dup = |fd: &dyn std::os::fd::AsFd| fd.as_fd().try_clone_to_owned();
    let mut inh = Inherited { handed_over: true, ..Default::default() };
    for (a, l) in &s.held.listeners {
        inh.listeners.push((a.clone(), l.try_clone()?.into_fd()));
    }
    if let Some(c) = &s.held.control {
        inh.control = Some(dup(c)?);
    }
    if let Some(m) = &s.held.metrics {
        inh.metrics = Some(dup(m)?);
    }
    let KernelHandover::Nbd(handed) = s.kernel;
    inh.kernel = handed;
    Ok(inh)
}

/// Performs an upgrade request (on a thread of its own: it blocks) and answers
/// it. `running` is the daemon; what becomes of it is the outcome.
pub(crate) fn perform(args: &ServeArgs, running: Running, req: UpgradeRequest) -> Outcome {
    let out = perform_inner(args, running, req);
    // A supervisor's exec plan (or its answer) is of no use afterwards.
    let _ = std::fs::remove_file(engine::hostfs::locate(&plan_path(&args.control), None));
    out
}

fn perform_inner(args: &ServeArgs, running: Running, req: UpgradeRequest) -> Outcome {
    let refuse = |req: UpgradeRequest, running: Running, why: String| {
        tracing::warn!("upgrade refused: {why}");
        req.answer(&Response::err(why));
        Outcome::Serving(Box::new(running))
    };
    let rdv = match wire::Rendezvous::open() {
        Ok(r) => r,
        Err(e) => return refuse(req, running, format!("cannot open the handover socket: {e}")),
    };
    let mut launch = match launch(args, &req, &rdv.env_value()) {
        Ok(l) => l,
        Err(e) => return refuse(req, running, format!("{e:#}; this daemon serves on")),
    };
    let (conn, pid, version) = match rdv.accept(Instant::now() + HELLO_TIMEOUT, || launch.gone()) {
        Ok(x) => x,
        Err(why) => {
            launch.abandon();
            return refuse(req, running, format!("the new binary did not start: {why}; this daemon serves on"));
        }
    };
    tracing::info!("upgrade: livemirror {version} (pid {pid}) is ready to take over; stopping");
    let (stopped, res) = stop(args, running);
    let fail = match res {
        Err(e) => Some(format!("this daemon did not stop cleanly ({e:#})")),
        Ok(()) => match send_manifest(&conn, &stopped) {
            Err(e) => Some(format!("cannot hand the sockets over: {e}")),
            Ok(()) => match wire::recv(&conn, Instant::now() + TAKEOVER_TIMEOUT) {
                Ok((Msg::Ready { pid, pause_ms }, _, _)) => {
                    tracing::info!("upgrade: pid {pid} serves now (the export paused {pause_ms:.0} ms); exiting");
                    let report = UpgradeReport { pid, previous_pid: std::process::id(), pause_ms };
                    req.answer(&Response { ok: true, upgrade: Some(report), ..Default::default() });
                    return Outcome::HandedOver { notify: launch.pid() };
                }
                Ok((Msg::Failed { error }, _, _)) => Some(format!("the new daemon could not take over: {error}")),
                Ok((other, _, _)) => Some(format!("the new daemon said {other:?}")),
                Err(e) => Some(format!("the new daemon did not take over: {e}")),
            },
        },
    };
    let why = fail.unwrap_or_default();
    let _ = wire::send(&conn, &Msg::Abort { reason: why.clone() }, &[], &[]);
    drop(conn);
    // It must let go of the devices before this daemon opens them again.
    launch.abandon();
    if launch.pid().is_none() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    tracing::error!("upgrade failed: {why}; starting again in place");
    match restart_in_place(args, stopped) {
        Ok(r) => {
            req.answer(&Response::err(format!("{why}; the daemon serves on (restarted in place)")));
            Outcome::Serving(Box::new(r))
        }
        Err(e) => {
            req.answer(&Response::err(format!("{why}; and the daemon could not start again: {e:#}")));
            Outcome::Lost(e)
        }
    }
}

fn restart_in_place(args: &ServeArgs, stopped: Stopped) -> anyhow::Result<Running> {
    let a = successor_args(args, &stopped.manifest);
    let made = stopped.manifest.state_made_for_handover.then(|| stopped.manifest.state.clone());
    let upgrades = stopped.upgrades.clone();
    let pre = crate::serve::prepare(&a)?;
    let mut r = crate::serve::start_with(&a, pre, inherited_from(stopped)?, upgrades)?;
    r.remove_on_stop = made;
    Ok(r)
}

/// The successor's side: connects to the daemon it replaces (the handover
/// socket [`ENV_HANDOVER`] names), says hello, receives the sockets and
/// starts from them. On failure it tells the old daemon, which serves on.
pub(crate) fn take_over(
    args: &mut ServeArgs,
    env: &str,
    upgrades: crate::control::Upgrades,
) -> anyhow::Result<Running> {
    let conn = wire::connect(env).context("cannot reach the daemon to take over from")?;
    let (msg, blobs, fds) =
        wire::recv(&conn, Instant::now() + TAKEOVER_TIMEOUT).context("the daemon to take over from")?;
    let m = match msg {
        Msg::Manifest(m) => *m,
        Msg::Abort { reason } => bail!("the old daemon gave up: {reason}"),
        other => bail!("the old daemon sent {other:?}"),
    };
    let res = (|| {
        let mut inh = Inherited { handed_over: true, ..Default::default() };
        let mut fds = fds.into_iter();
        let mut next = |what: &str| fds.next().with_context(|| format!("no socket for {what} in the handover"));
        for a in &m.listeners {
            let addr: ListenAddr = a.parse().map_err(anyhow::Error::msg)?;
            inh.listeners.push((addr, next(a)?));
        }
        if m.control {
            inh.control = Some(next("the control socket")?);
        }
        if m.metrics {
            inh.metrics = Some(next("the metrics listener")?);
        }
        for leftover in blobs.into_iter().take(m.kernel_connections) {
            inh.kernel.push(HandedConnection { socket: next("a kernel connection")?, leftover });
        }
        if let Some(d) = &m.bin_dir {
            let _ = BIN_DIR.set(d.clone());
        }
        *args = successor_args(args, &m);
        let pre = crate::serve::prepare(args)?;
        let mut r = crate::serve::start_with(args, pre, inh, upgrades)?;
        r.remove_on_stop = m.state_made_for_handover.then(|| m.state.clone());
        Ok::<_, anyhow::Error>(r)
    })();
    match res {
        Ok(r) => {
            let pause_ms = (now_unix() - m.stopped_at).max(0.0) * 1000.0;
            wire::send(&conn, &Msg::Ready { pid: std::process::id(), pause_ms }, &[], &[])
                .context("cannot tell the old daemon")?;
            tracing::info!(
                "took over: the export paused {pause_ms:.0} ms (the old daemon took {:.0} ms to stop, this one {:.0} ms \
                 to start from there)",
                m.stop_ms,
                pause_ms - m.stop_ms
            );
            Ok(r)
        }
        Err(e) => {
            let _ = wire::send(&conn, &Msg::Failed { error: format!("{e:#}") }, &[], &[]);
            Err(e)
        }
    }
}
