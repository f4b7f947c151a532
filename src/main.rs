//! `livemirror`: argument parsing and wiring. The work happens in the `engine`,
//! `nbd-frontend` and `ublk-frontend` crates.

mod bench;
mod commands;
mod control;
mod daemon;
mod demo;
mod devices;
mod flush;
mod generate;
mod jsonline;
mod metrics;
mod notify;
mod rootd;
mod serve;
mod ublk;
mod units;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use units::{parse_limit, Limit};

pub(crate) const DEFAULT_CONTROL: &str = "/run/livemirror/control.sock";
pub(crate) const DEFAULT_LISTEN: &str = "unix:/run/livemirror/nbd.sock";

const AFTER_HELP: &str = "\
Sizes and rates: a number with an optional binary unit K, M, G or T, also written KB or KiB,
in any case (1K = 1024 bytes); decimals that make whole bytes (1.5G); rates may end in /s.
Examples: 4096, 64K, 10mb, 1.5G, 100M/s, \"24.0 MiB/s\".

Exit codes: 0 success, 1 failed or refused (one line on stderr says why), 2 usage error,
3 `wait` (or `verify --wait`) timed out.";

#[derive(Parser)]
#[command(
    name = "livemirror",
    version,
    about = "Serve a block device over NBD and mirror it live onto a hot-added target",
    after_help = AFTER_HELP
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub(crate) struct ControlArg {
    /// The daemon's control socket (the livemirror@NAME service uses
    /// /run/livemirror/NAME/control.sock).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub(crate) control: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (logs to stderr).
    #[command(after_help = devices::DEVICE_HELP)]
    Serve(Box<serve::ServeArgs>),
    /// Hot-add TARGET and start the sync; returns once started.
    #[command(after_help = devices::DEVICE_HELP)]
    Attach {
        /// The disk, image or NBD export (a URI, below) to copy onto: at least
        /// as large as the export; everything on it is overwritten.
        #[arg(value_name = "TARGET")]
        target: PathBuf,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show the daemon's state.
    Status {
        /// One JSON object on one line.
        #[arg(long, conflicts_with = "get")]
        json: bool,
        /// Print one field of the JSON object, bare: strings without quotes,
        /// null as `null`, objects and arrays as compact JSON. A dotted path
        /// reaches into objects and arrays (`events.-1.message`: negative
        /// indexes count from the end). Repeat for several fields, one per line.
        #[arg(long, value_name = "FIELD")]
        get: Vec<String>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Follow the daemon: one JSON object per line for every event and state
    /// change as it happens, and progress at a steady interval while syncing.
    Events {
        /// Seconds between progress lines while syncing.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Wait until synced (exit 1 if degraded, no target or stopped on an
    /// error, 3 on timeout).
    Wait {
        /// Give up after this many seconds (exit 3); default: wait as long as
        /// it takes.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Release the source (only when synced).
    DetachSource {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Cancel a sync or drop the target.
    DetachTarget {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Compare source and target region by region (CRC32); exit 0 iff no
    /// region differs.
    Verify {
        /// First wait for the sync to complete (as `wait` does), so that every
        /// region can be compared.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (exit 3).
        #[arg(long, value_name = "SECS", requires = "wait")]
        timeout: Option<f64>,
        /// Exit 1 also when some regions could not be compared because the
        /// copy has not reached them yet, or when nothing was compared.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Pause the copy (client I/O continues).
    Pause {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Resume the copy (also retries after a source read error).
    Resume {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Limit the copy rate, or set the floor it keeps while clients are busy.
    SetRate {
        /// Bytes per second, e.g. 100M or 1.5G/s; 0 = unlimited.
        #[arg(value_name = "RATE", value_parser = units::parse_rate, required_unless_present = "min_rate")]
        rate: Option<u64>,
        /// The copy rate kept while clients are busy (serve's --min-rate), e.g. 16M; 0 = no floor: the copy
        /// waits while clients are busy (under constant load it does not end).
        #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
        min_rate: Option<u64>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Change the overlay's limit at runtime (serve --overlay-limit): writes that need more
    /// space than SIZE allows fail with ENOSPC. Not kept across a restart.
    SetOverlayLimit {
        /// The most the overlay file may occupy, e.g. 2G; "none" removes the limit.
        #[arg(value_name = "SIZE|none", value_parser = parse_limit)]
        limit: Limit,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Grow the export, after detach-source.
    Grow {
        /// The new export size, e.g. 20G (default: the target's whole size;
        /// never smaller than now).
        #[arg(value_name = "SIZE", value_parser = units::parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Replace the running daemon with the binary this command runs from (the
    /// one now installed), keeping its listening sockets, the kernel device,
    /// the copy and its settings: no refused connection, no I/O error.
    /// Network clients' connections end after their requests are answered
    /// and are made again. If the new binary does not start or cannot take
    /// over, the daemon serves on.
    Upgrade {
        /// Start this binary instead (default: the one this command runs from).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Run the whole flow on temporary files and check every byte.
    Demo(demo::DemoArgs),
    /// Measure the copier on your own devices and recommend flags (writes TARGET; needs --force).
    Bench(bench::BenchArgs),
    /// Disconnect a kernel NBD device over netlink (after its filesystem is unmounted).
    NbdDisconnect {
        /// The kernel NBD device, /dev/nbdN.
        #[arg(value_name = "DEVICE")]
        device: PathBuf,
    },
    /// Stop and delete a ublk device no daemon serves any more (one a root
    /// storage daemon left, or one whose daemon died for good).
    UblkRemove {
        /// The ublk device, /dev/ublkbN (or N).
        #[arg(value_name = "DEVICE")]
        device: String,
    },
    /// Write man pages or shell completions generated from this CLI (packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// A command whose output reader went away (`livemirror events | head -1`)
/// ends at its next write, as Unix tools do, instead of panicking in
/// `println!`. Only for the commands that print; the daemon keeps ignoring
/// SIGPIPE (Rust's default): a client that hangs up must never kill it.
fn end_quietly_on_a_closed_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler code, and no thread exists yet that
    // could depend on SIGPIPE being ignored.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::Demo(_) | Cmd::Bench(_)) {
        end_quietly_on_a_closed_pipe();
    }
    use crate::control::Request;
    let code = match cli.cmd {
        Cmd::Serve(a) => daemon::run(*a),
        Cmd::Attach { target, control } => commands::attach(&control.control, target),
        Cmd::Status { json, get, control } => commands::status(&control.control, json, &get),
        Cmd::Events { interval, control } => commands::events(&control.control, interval),
        Cmd::Wait { timeout, control } => commands::wait(&control.control, timeout),
        Cmd::DetachSource { control } => commands::simple(&control.control, Request::DetachSource),
        Cmd::DetachTarget { control } => commands::simple(&control.control, Request::DetachTarget),
        Cmd::Verify { wait, timeout, strict, control } => commands::verify(&control.control, wait, timeout, strict),
        Cmd::Pause { control } => commands::simple(&control.control, Request::Pause),
        Cmd::Resume { control } => commands::simple(&control.control, Request::Resume),
        Cmd::SetRate { rate, min_rate, control } => commands::set_rate(&control.control, rate, min_rate),
        Cmd::Grow { size, control } => commands::grow(&control.control, size),
        Cmd::SetOverlayLimit { limit, control } => {
            commands::simple(&control.control, Request::SetOverlayLimit { limit: limit.0 })
        }
        Cmd::Upgrade { binary, control } => commands::upgrade(&control.control, binary),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::NbdDisconnect { device } => match nbd_frontend::kernel::disconnect(&device) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("livemirror: cannot disconnect {}: {e}", device.display());
                1
            }
        },
        Cmd::UblkRemove { device } => ublk::remove(&device),
        Cmd::Generate(a) => generate::run(a),
    };
    ExitCode::from(code)
}
