//! `livemirror`: argument parsing and wiring. The work happens in the `engine`
//! and `nbd-frontend` crates.

mod bench;
mod commands;
mod control;
mod demo;
mod rootd;
mod serve;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_CONTROL: &str = "/run/livemirror/control.sock";
pub const DEFAULT_LISTEN: &str = "unix:/run/livemirror/nbd.sock";

#[derive(Parser)]
#[command(
    name = "livemirror",
    version,
    about = "Serve a block device over NBD and mirror it live onto a hot-added target"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct ControlArg {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (logs to stderr).
    Serve(Box<serve::ServeArgs>),
    /// Hot-add TARGET and start the sync; returns once started.
    Attach {
        target: PathBuf,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show the daemon's state.
    Status {
        /// One JSON object on one line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Wait until synced (exit 1 if degraded or stopped on an error, 3 on timeout).
    Wait {
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
    /// Compare source and target region by region (CRC32); exit 0 iff they match.
    Verify {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Pause the copy (foreground I/O continues).
    Pause {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Resume the copy (also retries after a source read error).
    Resume {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Limit the copy rate (bytes/s with K/M/G suffixes; 0 = unlimited).
    SetRate {
        #[arg(value_parser = units::parse_size)]
        rate: u64,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Grow the export to the target's size (or SIZE), after detach-source.
    Grow {
        #[arg(value_parser = units::parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Run the whole flow on temporary files and check every byte.
    Demo(demo::DemoArgs),
    /// Measure the copier on your own devices and recommend flags (writes TARGET; needs --force).
    Bench(bench::BenchArgs),
    /// Disconnect a kernel NBD device over netlink (after its filesystem is unmounted).
    NbdDisconnect { device: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Serve(a) => serve::run(*a),
        Cmd::Attach { target, control } => commands::attach(&control.control, target),
        Cmd::Status { json, control } => commands::status(&control.control, json),
        Cmd::Wait { timeout, control } => commands::wait(&control.control, timeout),
        Cmd::DetachSource { control } => commands::simple(&control.control, crate::control::Request::DetachSource),
        Cmd::DetachTarget { control } => commands::simple(&control.control, crate::control::Request::DetachTarget),
        Cmd::Verify { control } => commands::verify(&control.control),
        Cmd::Pause { control } => commands::simple(&control.control, crate::control::Request::Pause),
        Cmd::Resume { control } => commands::simple(&control.control, crate::control::Request::Resume),
        Cmd::SetRate { rate, control } => commands::simple(&control.control, crate::control::Request::SetRate { rate }),
        Cmd::Grow { size, control } => commands::grow(&control.control, size),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::NbdDisconnect { device } => match nbd_frontend::kernel::disconnect(&device) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("livemirror: cannot disconnect {}: {e}", device.display());
                1
            }
        },
    };
    ExitCode::from(code)
}
