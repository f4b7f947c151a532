//! Which device serves which request: the routing policy, in one place.
//!
//! A [`Route`] is immutable: the state plus the devices that exist in it. A
//! request takes the current route *after* it holds its range lock and keeps it
//! until it completes; a state change installs a new route and then waits until
//! every holder of the old one is gone (the barrier of docs/semantics.md, "State
//! changes are barriers"). Everything a request asks — which legs a write takes,
//! where each piece of a read comes from, what TRIM does, which device answers
//! CACHE and BLOCK_STATUS — is a method here, decided from the route's state and
//! the region map; the I/O code only carries the answers out.
//!
//! Dropping the target after a failure cannot use the barrier (the failing write
//! itself holds the old route), so [`Target`] has a gate of its own: reads
//! enter it before touching T, and the failure path closes it and waits for the
//! reads inside before the failing write is acknowledged.

use std::ops::Range;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::drain::{Drain, DrainGuard};
use crate::regions::RegionMap;
use crate::state::DeviceState;

/// The target and the gate that lets it be dropped under reads in flight.
pub(crate) struct Target {
    /// Shared, because a second migration makes it the next sync's source.
    pub(crate) backend: Arc<Backend>,
    reads: Arc<Drain>,
}

impl Target {
    pub(crate) fn new(backend: Backend) -> Arc<Target> {
        Arc::new(Target { backend: Arc::new(backend), reads: Drain::new() })
    }

    /// Enters the gate for one read; `None` once the target is being dropped.
    pub(crate) fn begin_read(&self) -> Option<DrainGuard> {
        self.reads.enter()
    }

    /// No new reads from now on (they go to S instead).
    pub(crate) fn stop_reads(&self) {
        self.reads.close();
    }

    /// Stops new reads and waits for the ones inside the gate.
    pub(crate) async fn close_reads(&self) {
        self.reads.close();
        self.reads.wait_idle().await;
    }
}

/// Where a piece of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFrom {
    Source,
    Target,
    /// A discarded region: reads as zeroes until written (docs/decisions.md).
    Zero,
}

/// What a TRIM does in this state (docs/semantics.md, "Discard and zeroes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrimPolicy {
    /// No target: mark the regions discarded (a later sync skips them).
    MarkDiscarded,
    /// A sync is running or done: dirty regions are zeroed on T and become clean
    /// without a copy; clean ones are discarded on T too; both are unverifiable.
    SkipCopy,
    /// T alone: pass the discard on to it.
    DiscardTarget,
}

/// The legs of one write, decided under its lock.
#[derive(Debug, Default)]
pub(crate) struct Legs {
    pub(crate) source: bool,
    /// Byte runs that also go to T.
    pub(crate) target_runs: Vec<Range<u64>>,
}

/// Which devices serve which requests. Replaced on every state change.
pub(crate) struct Route {
    pub(crate) state: DeviceState,
    pub(crate) source: Option<Arc<Backend>>,
    pub(crate) target: Option<Arc<Target>>,
    /// Dropped with the route: wakes the state change waiting for old holders.
    _drained: oneshot::Sender<()>,
}

impl Route {
    /// A route and the signal that fires once the last holder dropped it.
    pub(crate) fn new(
        state: DeviceState,
        source: Option<Arc<Backend>>,
        target: Option<Arc<Target>>,
    ) -> (Arc<Route>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Arc::new(Route { state, source, target, _drained: tx }), rx)
    }

    /// The largest I/O alignment any device of the route needs.
    pub(crate) fn max_align(&self) -> u64 {
        let s = self.source.as_ref().map_or(1, |s| s.alignment());
        let t = self.target.as_ref().map_or(1, |t| t.backend.alignment());
        s.max(t)
    }

    /// True while the copy onto `target` should go on.
    pub(crate) fn is_syncing_to(&self, target: &Arc<Target>) -> bool {
        self.state == DeviceState::Syncing && self.target.as_ref().is_some_and(|t| Arc::ptr_eq(t, target))
    }

    /// True if `target` is this route's target.
    pub(crate) fn has_target(&self, target: &Arc<Target>) -> bool {
        self.target.as_ref().is_some_and(|t| Arc::ptr_eq(t, target))
    }

    /// Which legs a write of `[off, off+len)` takes (rules 4 and 5): S always
    /// while it exists; T where it already holds S's bytes, everywhere once synced.
    pub(crate) fn write_legs(&self, map: &RegionMap, off: u64, len: u64) -> Legs {
        let whole = || std::iter::once(off..off + len).collect();
        match self.state {
            DeviceState::Serving | DeviceState::Degraded => Legs { source: true, target_runs: Vec::new() },
            DeviceState::Syncing => Legs { source: true, target_runs: map.clean_byte_runs(off, len) },
            DeviceState::Synced => Legs { source: true, target_runs: whole() },
            DeviceState::SourceDetached => Legs { source: false, target_runs: whole() },
        }
    }

    /// Where each piece of a read of `[off, off+len)` comes from (rule 6), in
    /// order and coalesced.
    pub(crate) fn read_plan(&self, map: &RegionMap, off: u64, len: u64) -> Vec<(Range<u64>, ReadFrom)> {
        let end = off + len;
        let any_discard = map.discarded_count() > 0;
        let single = match self.state {
            DeviceState::Synced | DeviceState::SourceDetached => Some(ReadFrom::Target),
            DeviceState::Serving | DeviceState::Degraded if !any_discard => Some(ReadFrom::Source),
            _ => None,
        };
        if let Some(from) = single {
            return vec![(off..end, from)];
        }
        let mut out: Vec<(Range<u64>, ReadFrom)> = Vec::new();
        for r in map.regions_touching(off, len) {
            let br = map.byte_range(r);
            let piece = br.start.max(off)..br.end.min(end);
            let from = if any_discard && map.is_discarded(r) {
                ReadFrom::Zero
            } else if self.state == DeviceState::Syncing && map.is_clean(r) {
                ReadFrom::Target
            } else {
                ReadFrom::Source
            };
            match out.last_mut() {
                Some((last, f)) if *f == from && last.end == piece.start => last.end = piece.end,
                _ => out.push((piece, from)),
            }
        }
        out
    }

    pub(crate) fn trim_policy(&self) -> TrimPolicy {
        match self.state {
            DeviceState::Serving | DeviceState::Degraded => TrimPolicy::MarkDiscarded,
            DeviceState::Syncing | DeviceState::Synced => TrimPolicy::SkipCopy,
            DeviceState::SourceDetached => TrimPolicy::DiscardTarget,
        }
    }

    /// The device that answers CACHE and BLOCK_STATUS: T once it holds
    /// everything, else S.
    pub(crate) fn query_device(&self) -> Option<&Backend> {
        match self.state {
            DeviceState::Synced | DeviceState::SourceDetached => self.target.as_ref().map(|t| &*t.backend),
            _ => self.source.as_deref(),
        }
    }

    /// A discarded region is reported as a zero hole while no target exists
    /// (with a target it is zeroed on T, and the device says so itself).
    pub(crate) fn discarded_is_hole(&self) -> bool {
        self.target.is_none()
    }

    /// An unverifiable region's allocation is unknown while S and T both exist
    /// (they may differ there); with T alone it is whatever T says.
    pub(crate) fn unverifiable_is_unknown(&self) -> bool {
        self.state != DeviceState::SourceDetached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(state: DeviceState) -> Arc<Route> {
        Route::new(state, None, None).0
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // ranges of bytes, not lists of numbers
    fn write_legs_follow_the_state() {
        let mut map = RegionMap::new(8 * 4096, 12);
        map.set_clean(2..4, true);
        let legs = route(DeviceState::Syncing).write_legs(&map, 4096, 4 * 4096);
        assert!(legs.source);
        assert_eq!(legs.target_runs, [2 * 4096..4 * 4096], "only clean regions go to T while syncing");
        let legs = route(DeviceState::Synced).write_legs(&map, 100, 10);
        assert!(legs.source);
        assert_eq!(legs.target_runs, [100..110]);
        let legs = route(DeviceState::SourceDetached).write_legs(&map, 100, 10);
        assert!(!legs.source);
        assert_eq!(legs.target_runs, [100..110]);
        for s in [DeviceState::Serving, DeviceState::Degraded] {
            let legs = route(s).write_legs(&map, 0, 8 * 4096);
            assert!(legs.source && legs.target_runs.is_empty(), "{s}");
        }
    }

    #[test]
    fn reads_split_by_region_while_syncing() {
        let mut map = RegionMap::new(8 * 4096, 12);
        map.set_clean(1..3, true);
        map.set_discarded(5..6, true);
        let plan = route(DeviceState::Syncing).read_plan(&map, 0, 8 * 4096);
        assert_eq!(
            plan,
            vec![
                (0..4096, ReadFrom::Source),
                (4096..3 * 4096, ReadFrom::Target),
                (3 * 4096..5 * 4096, ReadFrom::Source),
                (5 * 4096..6 * 4096, ReadFrom::Zero),
                (6 * 4096..8 * 4096, ReadFrom::Source),
            ]
        );
        assert_eq!(route(DeviceState::Synced).read_plan(&map, 10, 20), vec![(10..30, ReadFrom::Target)]);
        let plan = route(DeviceState::Serving).read_plan(&map, 0, 8 * 4096);
        assert!(plan.contains(&(5 * 4096..6 * 4096, ReadFrom::Zero)), "{plan:?}");
    }

    #[test]
    fn trim_and_queries_follow_the_state() {
        assert_eq!(route(DeviceState::Serving).trim_policy(), TrimPolicy::MarkDiscarded);
        assert_eq!(route(DeviceState::Degraded).trim_policy(), TrimPolicy::MarkDiscarded);
        assert_eq!(route(DeviceState::Syncing).trim_policy(), TrimPolicy::SkipCopy);
        assert_eq!(route(DeviceState::Synced).trim_policy(), TrimPolicy::SkipCopy);
        assert_eq!(route(DeviceState::SourceDetached).trim_policy(), TrimPolicy::DiscardTarget);
        assert!(route(DeviceState::Serving).discarded_is_hole());
        assert!(!route(DeviceState::SourceDetached).unverifiable_is_unknown());
    }
}
