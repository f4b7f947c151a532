//! The `serve` command's process: its paths, the root storage daemon's
//! supervisor, logging, and then the daemon's life until it stops (SIGTERM,
//! SIGINT) or an upgrade hands it over (`livemirror upgrade`). Starting and
//! stopping the daemon itself is `serve.rs`; the handover is `upgrade/`.

use anyhow::{bail, Context};

use crate::serve::ServeArgs;

/// Logs go through a bounded in-memory queue to a writer thread and are
/// dropped when it is full: a stalled stderr (a full pipe, a journal on the
/// root we serve) must never stall the I/O path.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVEMIRROR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(16_384)
        .thread_name("livemirror-log")
        .finish(std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    guard
}

/// `livemirror serve`: the process around the daemon (paths, the supervisor,
/// logging); its exit status.
pub(crate) fn run(args: ServeArgs) -> u8 {
    // Relative paths mean what they meant to the daemon an upgrade replaces.
    let start_dir = crate::upgrade::start_dir();
    let args = match crate::upgrade::in_dir(start_dir.as_deref(), || args.absolute()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("livemirror: {e}");
            return 1;
        }
    };
    // Paths are absolute from here on; procfs as the working directory lets
    // them be found after a switch_root (see engine::hostfs).
    let proc_cwd = engine::hostfs::enter_proc_cwd();
    let root_daemon = crate::rootd::requested(args.root_storage_daemon);
    crate::upgrade::remember_start(root_daemon, start_dir);
    if args.ublk.ublk_device.is_some() {
        // Before the supervisor forks: it and every daemon it starts share the namespace.
        if let Err(e) = crate::ublk::prepare() {
            eprintln!("livemirror: {e:#}");
            return 1;
        }
    }
    if root_daemon {
        if let crate::rootd::Role::Exit(code) = crate::rootd::supervise(crate::upgrade::plan::plan_path(&args.control))
        {
            return code;
        }
    }
    // A successor of `livemirror upgrade` (read while this process has one thread).
    let handover = crate::upgrade::take_env();
    let _log = init_logging();
    if let Err(e) = proc_cwd {
        tracing::warn!("no procfs ({e}): paths will only be looked up in this process's root");
    }
    if root_daemon {
        crate::rootd::harden();
    }
    let successor = handover.is_some();
    match live(args, handover) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("livemirror: {e:#}");
            // The old daemon serves on: a supervisor must not start this again.
            if successor {
                crate::upgrade::plan::EXIT_NOT_TAKEN_OVER
            } else {
                1
            }
        }
    }
}

/// The daemon's life: started (or taken over from a predecessor), it serves
/// until a stop signal, or until an upgrade hands it over.
fn live(mut args: ServeArgs, handover: Option<String>) -> anyhow::Result<()> {
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut running = match handover {
        None => crate::serve::start_with(
            &args,
            crate::serve::prepare(&args)?,
            crate::upgrade::sockets::Inherited::default(),
            Some(upgrade_tx),
        )?,
        Some(env) => crate::upgrade::take_over(&mut args, &env, Some(upgrade_tx))?,
    };
    running.notifier = crate::notify::Notifier::start(&args.control, running.mirror.clone());
    let mut running = Some(running);
    // Signals and upgrade requests; an upgrade runs on a thread of its own, so
    // that a stop signal that arrives meanwhile is not lost.
    let ended = engine::rt::block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        loop {
            let req = tokio::select! {
                _ = term.recv() => return Ok(false),
                _ = int.recv() => return Ok(false),
                r = upgrade_rx.recv() => match r { Some(r) => r, None => continue },
            };
            let Some(r) = running.take() else { bail!("no running daemon to upgrade") };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let a = args.clone();
            std::thread::Builder::new()
                .name("livemirror-upgrade".into())
                .spawn(move || {
                    let _ = tx.send(crate::upgrade::perform(&a, r, req));
                })
                .context("cannot start the upgrade")?;
            let mut rx = std::pin::pin!(rx);
            let mut stop_after = false;
            let outcome = loop {
                tokio::select! {
                    o = &mut rx => break o.context("the upgrade thread died")?,
                    _ = term.recv() => stop_after = true,
                    _ = int.recv() => stop_after = true,
                }
            };
            match outcome {
                crate::upgrade::Outcome::HandedOver { notify } => {
                    if let Some(pid) = notify {
                        crate::notify::main_pid(pid);
                    }
                    return Ok(true);
                }
                crate::upgrade::Outcome::Serving(mut r) => {
                    if r.notifier.is_none() {
                        r.notifier = crate::notify::Notifier::start(&args.control, r.mirror.clone());
                    }
                    running = Some(*r);
                    if stop_after {
                        return Ok(false);
                    }
                }
                crate::upgrade::Outcome::Lost(e) => return Err(e),
            }
        }
    })??;
    if ended {
        // Handed over: the successor serves the sockets and the kernel device.
        return Ok(());
    }
    tracing::info!("shutting down: finishing in-flight requests");
    if let Some(r) = running {
        r.shutdown()?;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
