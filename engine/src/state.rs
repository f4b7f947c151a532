//! The device states and the one table of which changes are legal.
//!
//! Every lifecycle operation asks [`DeviceState::next`] before it changes
//! anything; the answer is the state to enter or a refusal with its reason.
//! What each state routes where is [`crate::route`]'s business; this file only
//! says which transitions exist (docs/semantics.md, "Device states").

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// The source alone, no target.
    Serving,
    /// A target is attached and being copied to.
    Syncing,
    /// Every region is on the target; writes go to both.
    Synced,
    /// The source is gone; the target alone serves.
    SourceDetached,
    /// The target failed and was dropped; the source alone serves.
    Degraded,
}

/// What can happen to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// `attach`: a new target starts a sync (from source-detached, the device
    /// served now becomes its source: a second migration).
    Attach,
    /// The copier found nothing dirty and flushed the target.
    SyncComplete,
    /// The target failed (an I/O error, a device that shrank).
    TargetFailed,
    /// The source failed while the target holds everything.
    SourceFailed,
    /// `detach-source`.
    DetachSource,
    /// `detach-target`.
    DetachTarget,
    /// `grow`: only the size changes.
    Grow,
    /// `pause` / `resume`: only the copier's flag changes.
    PauseResume,
}

/// Why a transition is not possible now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub state: DeviceState,
    pub transition: Transition,
    pub reason: &'static str,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (state is {})", self.reason, self.state)
    }
}

impl DeviceState {
    pub const ALL: [DeviceState; 5] = [
        DeviceState::Serving,
        DeviceState::Syncing,
        DeviceState::Synced,
        DeviceState::SourceDetached,
        DeviceState::Degraded,
    ];

    /// The state `t` leads to from `self`, or why it cannot happen. Pure: the
    /// caller changes the route only after this said yes.
    pub fn next(self, t: Transition) -> Result<DeviceState, Refusal> {
        use DeviceState::*;
        use Transition::*;
        let refuse = |reason| Err(Refusal { state: self, transition: t, reason });
        match (self, t) {
            // From source-detached: a second migration, the device served now
            // becomes the source of a sync onto the new target.
            (Serving | Degraded | SourceDetached, Attach) => Ok(Syncing),
            (Syncing | Synced, Attach) => refuse("a target is already attached; detach-target first"),

            (Syncing, SyncComplete) => Ok(Synced),
            (_, SyncComplete) => refuse("no sync is running"),

            (Syncing | Synced, TargetFailed) => Ok(Degraded),
            (SourceDetached, TargetFailed) => refuse("the target is the only device left"),
            (_, TargetFailed) => refuse("no target is attached"),

            (Synced, SourceFailed) => Ok(SourceDetached),
            (_, SourceFailed) => refuse("the target does not hold every region yet"),

            (Synced, DetachSource) => Ok(SourceDetached),
            (SourceDetached, DetachSource) => refuse("the source is already detached"),
            (_, DetachSource) => refuse("detach-source needs state synced"),

            (Syncing | Synced | Degraded, DetachTarget) => Ok(Serving),
            (SourceDetached, DetachTarget) => refuse("the target is the only device left"),
            (Serving, DetachTarget) => refuse("no target is attached"),

            (SourceDetached, Grow) => Ok(SourceDetached),
            (_, Grow) => refuse("grow is only possible after detach-source"),

            (Syncing, PauseResume) => Ok(Syncing),
            (_, PauseResume) => refuse("no copy to pause or resume"),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Serving => "serving",
            DeviceState::Syncing => "syncing",
            DeviceState::Synced => "synced",
            DeviceState::SourceDetached => "source-detached",
            DeviceState::Degraded => "degraded",
        }
    }

    /// The state's number in the state file.
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
        DeviceState::ALL.into_iter().find(|s| s.code() == c)
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceState::*;
    use Transition::*;

    const ALL_TRANSITIONS: [Transition; 8] =
        [Attach, SyncComplete, TargetFailed, SourceFailed, DetachSource, DetachTarget, Grow, PauseResume];

    /// The whole table, as semantics.md states it: every (state, transition)
    /// pair, allowed or refused.
    #[test]
    fn every_state_and_transition_pair() {
        let allowed = [
            (Serving, Attach, Syncing),
            (Degraded, Attach, Syncing),
            (SourceDetached, Attach, Syncing),
            (Syncing, SyncComplete, Synced),
            (Syncing, TargetFailed, Degraded),
            (Synced, TargetFailed, Degraded),
            (Synced, SourceFailed, SourceDetached),
            (Synced, DetachSource, SourceDetached),
            (Syncing, DetachTarget, Serving),
            (Synced, DetachTarget, Serving),
            (Degraded, DetachTarget, Serving),
            (SourceDetached, Grow, SourceDetached),
            (Syncing, PauseResume, Syncing),
        ];
        let mut pairs = 0;
        for s in DeviceState::ALL {
            for t in ALL_TRANSITIONS {
                pairs += 1;
                let want = allowed.iter().find(|(a, b, _)| *a == s && *b == t).map(|(_, _, n)| *n);
                match (s.next(t), want) {
                    (Ok(got), Some(n)) => assert_eq!(got, n, "{s} + {t:?}"),
                    (Err(r), None) => {
                        assert_eq!((r.state, r.transition), (s, t));
                        assert!(!r.reason.is_empty());
                    }
                    (got, want) => panic!("{s} + {t:?}: got {got:?}, the table says {want:?}"),
                }
            }
        }
        assert_eq!(pairs, 40);
    }

    #[test]
    fn state_codes_round_trip() {
        for s in DeviceState::ALL {
            assert_eq!(DeviceState::from_code(s.code()), Some(s));
        }
        assert_eq!(DeviceState::from_code(9), None);
    }
}
