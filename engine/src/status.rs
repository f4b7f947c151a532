//! The status report (`livemirror status --json`) and the event log.

use serde::{Deserialize, Serialize};

pub use crate::state::DeviceState;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The device state changed (attached, synced, degraded, ...).
    State,
    /// Something failed (a device error, a stopped copy).
    Error,
    /// Everything else (pause, rate, verify, grow).
    #[default]
    Info,
    /// The overlay's space: 75 % and 90 % of `--overlay-limit` crossed, writes
    /// refused for lack of space.
    Overlay,
}

/// One line of the event log shown by `status`, and what
/// `Mirror::subscribe_events` delivers as it happens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub unix_time: f64,
    #[serde(default)]
    pub kind: EventKind,
    /// The device state right after the event.
    #[serde(default = "serving")]
    pub state: DeviceState,
    pub message: String,
}

fn serving() -> DeviceState {
    DeviceState::Serving
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
    /// The copy rate kept while clients are busy (`--min-rate`, `set-rate --min-rate`).
    #[serde(default)]
    pub min_rate: u64,
    /// How the source's and target's I/O goes: "direct", "buffered" or
    /// "network" (`--cache auto` picks per device: docs/decisions.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_io: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_io: Option<String>,
    /// The link of a remote source or target (`{"state":"connected"}` or
    /// `{"state":"reconnecting","attempts":N,"last_error":"…"}`); absent for a
    /// local device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_link: Option<crate::backend::LinkState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_link: Option<crate::backend::LinkState>,
    pub copier_running: bool,
    /// The source's overlay (`serve --overlay`): what its file occupies and the
    /// limit; null without one, and once the source is detached.
    #[serde(default)]
    pub overlay: Option<crate::backend::OverlayUsage>,
    /// The kernel block device serving the export (`/dev/nbdN` for
    /// `--nbd-device`, `/dev/ublkbN` for `--ublk-device`); null without one.
    #[serde(default)]
    pub kernel_device: Option<String>,
    #[serde(default)]
    pub events: Vec<Event>,
}
