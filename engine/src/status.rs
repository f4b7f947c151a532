//! Device states and the status report (`livemirror status --json`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::device::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    Serving,
    Syncing,
    Synced,
    SourceDetached,
    Degraded,
}

impl DeviceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Serving => "serving",
            DeviceState::Syncing => "syncing",
            DeviceState::Synced => "synced",
            DeviceState::SourceDetached => "source-detached",
            DeviceState::Degraded => "degraded",
        }
    }

    pub fn code(&self) -> u8 {
        match self {
            DeviceState::Serving => 0,
            DeviceState::Syncing => 1,
            DeviceState::Synced => 2,
            DeviceState::SourceDetached => 3,
            DeviceState::Degraded => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<DeviceState> {
        Some(match c {
            0 => DeviceState::Serving,
            1 => DeviceState::Syncing,
            2 => DeviceState::Synced,
            3 => DeviceState::SourceDetached,
            4 => DeviceState::Degraded,
            _ => return None,
        })
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status object. The first twelve fields are the contract of
/// interface.md; the rest are additions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub state: DeviceState,
    pub paused: bool,
    pub export_size: u64,
    pub source: Option<String>,
    pub target: Option<String>,
    pub region_size: u64,
    pub regions_total: u64,
    pub regions_clean: u64,
    pub bytes_copied: u64,
    /// Of `bytes_copied`, what read as zeroes on S and was zeroed (or punched)
    /// on T instead of written (zero detection, `--detect-zeroes`).
    #[serde(default)]
    pub bytes_written_as_zeroes: u64,
    #[serde(default)]
    pub detect_zeroes: bool,
    pub copy_rate_bytes_per_sec: f64,
    pub eta_seconds: Option<f64>,
    pub error: Option<String>,
    pub regions_discarded: u64,
    pub regions_unverifiable: u64,
    pub max_rate: u64,
    pub copier_running: bool,
    #[serde(default)]
    pub events: Vec<Event>,
}
