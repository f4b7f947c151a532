//! What the root storage daemon's supervisor (`rootd.rs`) and the daemon it
//! supervises agree on for an upgrade: the exec plan the daemon writes, how
//! the exec'd supervisor learns which daemon it already has, and the exit
//! status of a successor that did not take over.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The exit status of a successor that did not take over (the old daemon
/// serves on): its supervisor must not start it again.
pub(crate) const EXIT_NOT_TAKEN_OVER: u8 = 75;

/// The plan a supervisor execs for an upgrade (written next to the control
/// socket by the daemon, which then sends it SIGUSR1). `error` is the
/// supervisor's answer when the exec failed.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct ExecPlan {
    pub(crate) program: String,
    /// argv[0] first.
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) error: Option<String>,
}

/// The environment variable that tells an exec'd supervisor which child it
/// already has: the daemon it replaces, which serves until the handover.
pub(crate) const ENV_ADOPT: &str = "LIVEMIRROR_SUPERVISE_PREVIOUS";

/// Where the plan for `control` is written (and read by the supervisor).
pub(crate) fn plan_path(control: &Path) -> PathBuf {
    let mut name = control.file_name().map(OsString::from).unwrap_or_else(|| "control".into());
    name.push(".upgrade-plan");
    control.with_file_name(name)
}
