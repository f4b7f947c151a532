//! The write path: WRITE, WRITE_ZEROES and FLUSH.
//!
//! A write goes through named phases (the shape of QEMU's mirror job's active
//! write, `active_write_prepare` / `active_write_settle`):
//!
//! 1. **plan** — the range lock, then one trip to the region map that decides
//!    everything under it: the legs, the discarded regions to repair, the intent
//!    chunks, whether unverifiable regions are covered.
//! 2. **prepare** — repair discarded regions on S (their untouched bytes read
//!    as zeroes and must keep doing so), then make the write's intent durable
//!    (a crash between the legs must leave the region dirty on resume).
//! 3. **apply** — the legs run concurrently, from the same buffer.
//! 4. **settle** — the intent is released, a failed leg fails its device over
//!    ([`Mirror::failover`], shared with FLUSH), and regions the write covered
//!    on both devices become verifiable again.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use super::{join_all, Mirror};
use crate::backend::Backend;
use crate::buf::{IoBuf, SharedBuf};
use crate::error::{Error, Result};
use crate::journal::IntentGuard;
use crate::locks::{LockMode, RangeGuard};
use crate::route::{Legs, Route, Target};
use crate::state::DeviceState;

/// What a write puts on each leg.
enum Payload<'a> {
    Data(&'a Arc<SharedBuf>),
    Zeroes { may_unmap: bool },
}

impl Payload<'_> {
    async fn apply(&self, dev: &Backend, buf_off: u64, off: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            Payload::Data(b) => dev.write_at(b, buf_off as usize, len as usize, off, fua).await,
            Payload::Zeroes { may_unmap } => dev.write_zeroes(off, len, *may_unmap, fua).await,
        }
    }
}

/// Everything decided for one write under its lock.
struct WritePlan {
    _guard: RangeGuard,
    route: Arc<Route>,
    legs: Legs,
    /// Discarded regions the write touches, to repair first (the lock is then
    /// exclusive over their whole span).
    discarded: Vec<(usize, Range<u64>)>,
    /// Regions whose intent must be durable before the legs run.
    intent: Option<Range<usize>>,
    /// Unverifiable regions the write covers wholly.
    covers_unverifiable: Option<Range<usize>>,
}

/// A leg's failure: the device and the error.
type LegResult<D> = std::result::Result<(), (Arc<D>, io::Error)>;

/// Which request the failover policy is settling (for its messages).
#[derive(Clone, Copy)]
enum Request {
    Write { off: u64 },
    Flush,
}

impl Request {
    fn target_reason(self, e: &io::Error) -> String {
        match self {
            Request::Write { off } => format!("target write failed at offset {off}: {e}"),
            Request::Flush => format!("target flush failed: {e}"),
        }
    }
    fn source_reason(self, e: &io::Error) -> String {
        match self {
            Request::Write { off } => format!("source write failed at offset {off}: {e}"),
            Request::Flush => format!("source flush failed: {e}"),
        }
    }
    fn context(self, dev: &Backend) -> String {
        match self {
            Request::Write { off } => format!("write to {} at offset {off} failed", dev.path().display()),
            Request::Flush => format!("flush of {} failed", dev.path().display()),
        }
    }
}

impl Mirror {
    /// Writes `data` at `off`. Acknowledged (returns) when every leg completed.
    pub async fn write(&self, off: u64, data: IoBuf, fua: bool) -> Result<()> {
        self.check_writable()?;
        let len = data.len() as u64;
        self.check_range(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let _fg = self.fg.begin();
        let data = SharedBuf::new(data);
        self.write_payload(off, len, Payload::Data(&data), fua).await
    }

    /// Writes zeroes (NBD WRITE_ZEROES). `may_unmap` allows a hole.
    pub async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let _fg = self.fg.begin();
        self.write_payload(off, len, Payload::Zeroes { may_unmap }, fua).await
    }

    async fn write_payload(&self, off: u64, len: u64, payload: Payload<'_>, fua: bool) -> Result<()> {
        let zeroing = matches!(payload, Payload::Zeroes { .. });
        let plan = self.plan_write(off, len, zeroing).await;
        let intent = self.prepare_write(&plan, off, len).await?;
        let (s_res, t_res) = self.apply_write(&plan, off, len, &payload, fua).await;
        self.settle_write(plan, intent, s_res, t_res, off).await
    }

    /// Phase 1: the range lock, and one trip to the map under it.
    async fn plan_write(&self, off: u64, len: u64, zeroing: bool) -> WritePlan {
        // The lock's shape comes from what is known before it: the devices'
        // alignment and whether any region is discarded at all. Both are
        // re-checked under the lock; a change means another round.
        let mut repair_discards = self.map.maybe_discarded() && {
            let m = self.map.lock();
            let rs = m.regions_touching(off, len);
            !rs.is_empty() && m.any_discarded(rs)
        };
        loop {
            let align = self.route().max_align();
            let rmw = align > 1 && (!off.is_multiple_of(align) || !len.is_multiple_of(align));
            // Zeroing may give a device's blocks back (an overlay's chunks): no
            // write to the same blocks may run meanwhile, or its data could land
            // in a block the device just counted as free.
            let rmw = rmw || (zeroing && align > 1);
            let (range, mode) = if repair_discards {
                // The repair writes the untouched parts of whole regions.
                let m = self.map.lock();
                (m.bytes_of(m.regions_touching(off, len)), LockMode::Exclusive)
            } else if rmw {
                // Read-modify-write: two unaligned writes to one block must not
                // interleave (docs/semantics.md, "Sub-block writes").
                (off - off % align..(off + len).div_ceil(align) * align, LockMode::Exclusive)
            } else {
                (off..off + len, LockMode::Shared)
            };
            let guard = self.locks.lock(range, mode).await;
            // Under the lock: the route this write will use, and the map.
            let route = self.route();
            if route.max_align() > align {
                continue;
            }
            let m = self.map.lock();
            let regions = m.regions_touching(off, len);
            let touches_discard = !regions.is_empty() && m.any_discarded(regions.clone());
            if touches_discard && !repair_discards {
                // A TRIM landed between the hint and the lock.
                repair_discards = true;
                continue;
            }
            let discarded = if touches_discard {
                regions.clone().filter(|&r| m.is_discarded(r)).map(|r| (r, m.byte_range(r))).collect()
            } else {
                Vec::new()
            };
            let legs = route.write_legs(&m, off, len);
            let both = !legs.target_runs.is_empty() && route.source.is_some();
            let intent = (both && self.journal.is_some()).then(|| regions.clone());
            let covers_unverifiable = if both && m.unverifiable_count() > 0 {
                let covered = m.regions_covered(off, len);
                (!covered.is_empty() && m.any_unverifiable(covered.clone())).then_some(covered)
            } else {
                None
            };
            drop(m);
            return WritePlan { _guard: guard, route, legs, discarded, intent, covers_unverifiable };
        }
    }

    /// Phase 2: repair discarded regions on S, then make the intent durable.
    async fn prepare_write(&self, plan: &WritePlan, off: u64, len: u64) -> Result<Option<IntentGuard>> {
        if !plan.discarded.is_empty() {
            self.repair_discarded(plan, off, len).await?;
        }
        match (&self.journal, &plan.intent) {
            (Some(j), Some(regions)) => Ok(Some(j.begin_write(regions.clone()).await?)),
            _ => Ok(None),
        }
    }

    /// A write into discarded regions: they read as zeroes until now, so the
    /// parts the write does not cover must read as zeroes afterwards too.
    /// The plan holds the regions exclusively.
    async fn repair_discarded(&self, plan: &WritePlan, off: u64, len: u64) -> Result<()> {
        let end = off + len;
        if let Some(s) = &plan.route.source {
            let zero = |at: u64, n: u64| async move {
                s.write_zeroes(at, n, false, false)
                    .await
                    .map_err(|e| Error::io(format!("zeroing a discarded region of {}", s.path().display()), e))
            };
            for (_, br) in &plan.discarded {
                if br.start < off {
                    zero(br.start, off - br.start).await?;
                }
                if end < br.end {
                    zero(end, br.end - end).await?;
                }
            }
        }
        let mut m = self.map.lock();
        for &(r, _) in &plan.discarded {
            m.set_discarded(r..r + 1, false);
        }
        Ok(())
    }

    /// Phase 3: the legs, concurrently.
    async fn apply_write(
        &self,
        plan: &WritePlan,
        off: u64,
        len: u64,
        payload: &Payload<'_>,
        fua: bool,
    ) -> (LegResult<Backend>, LegResult<Target>) {
        let route = &plan.route;
        let source_leg = async {
            match (plan.legs.source, &route.source) {
                (true, Some(s)) => payload.apply(s, 0, off, len, fua).await.map_err(|e| (s.clone(), e)),
                _ => Ok(()),
            }
        };
        let target_legs = async {
            let Some(t) = &route.target else { return Ok(()) };
            let runs = &plan.legs.target_runs;
            let futs: Vec<_> =
                runs.iter().map(|r| payload.apply(&t.backend, r.start - off, r.start, r.end - r.start, fua)).collect();
            for res in join_all(futs).await {
                res.map_err(|e| (t.clone(), e))?;
            }
            Ok(())
        };
        tokio::join!(source_leg, target_legs)
    }

    /// Phase 4: release the intent, fail over a failed leg, clear the marks.
    async fn settle_write(
        &self,
        plan: WritePlan,
        intent: Option<IntentGuard>,
        s_res: LegResult<Backend>,
        t_res: LegResult<Target>,
        off: u64,
    ) -> Result<()> {
        // Both legs are done: the persister may clear the bit once quiet.
        drop(intent);
        let both_ok = s_res.is_ok() && t_res.is_ok();
        if s_res.is_err() && t_res.is_ok() && plan.route.state == DeviceState::Syncing {
            // The write failed on S (an overlay that is full, say) but reached
            // T where regions were clean: they are dirty again, so the copier
            // makes T equal to S there, and reads come from S meanwhile.
            self.redirty_target_runs(&plan);
        }
        self.failover(&plan.route, s_res, t_res, Request::Write { off }).await?;
        if both_ok {
            if let Some(covered) = plan.covers_unverifiable {
                // Written whole on both devices: S and T agree there again.
                self.map.lock().set_unverifiable(covered, false);
            }
        }
        Ok(())
    }

    /// Marks the regions of `plan`'s target runs dirty again.
    fn redirty_target_runs(&self, plan: &WritePlan) {
        let mut touched = Vec::new();
        {
            let mut m = self.map.lock();
            for run in &plan.legs.target_runs {
                let rs = m.regions_touching(run.start, run.end - run.start);
                m.set_clean(rs.clone(), false);
                touched.push(rs);
            }
        }
        if let Some(j) = &self.journal {
            for rs in touched {
                j.note_dirtied(rs);
            }
        }
        self.copier.wake.notify_waiters();
    }

    /// The failover policy of every request with legs on both devices (write
    /// and flush), after the legs completed:
    /// - T failed: while S exists, T is dropped (`degraded`, reads leave it
    ///   first) and the request stands on S's result; with T alone, the error
    ///   goes to the client.
    /// - S failed: in `synced`, with T's leg done, S is dropped instead
    ///   (`source-detached`) and the request succeeds; otherwise the error goes
    ///   to the client.
    async fn failover(
        &self,
        route: &Route,
        s_res: LegResult<Backend>,
        t_res: LegResult<Target>,
        req: Request,
    ) -> Result<()> {
        let target_ok = t_res.is_ok();
        if let Err((t, e)) = t_res {
            if route.source.is_none() {
                return Err(Error::io(req.context(&t.backend), e));
            }
            self.fail_target(&t, req.target_reason(&e)).await;
        }
        if let Err((s, e)) = s_res {
            if route.state == DeviceState::Synced && target_ok && self.fail_source(&s, req.source_reason(&e)).await {
                return Ok(());
            }
            return Err(Error::io(req.context(&s), e));
        }
        Ok(())
    }

    /// Makes every acknowledged write durable on every attached device.
    pub async fn flush(&self) -> Result<()> {
        let _fg = self.fg.begin();
        let route = self.route();
        let flush_seq = self.journal.as_ref().map(|j| j.flush_begin());
        let s_fut = async {
            match &route.source {
                Some(s) => s.flush().await.map_err(|e| (s.clone(), e)),
                None => Ok(()),
            }
        };
        let t_fut = async {
            match &route.target {
                Some(t) => t.backend.flush().await.map_err(|e| (t.clone(), e)),
                None => Ok(()),
            }
        };
        let (s_res, t_res) = tokio::join!(s_fut, t_fut);
        let both_ok = s_res.is_ok() && t_res.is_ok();
        self.failover(&route, s_res, t_res, Request::Flush).await?;
        if let (Some(j), Some(seq), true) = (&self.journal, flush_seq, both_ok) {
            // Only a flush of both devices lets intent bits go.
            if route.source.is_some() && route.target.is_some() {
                j.flush_done(seq);
            }
        }
        Ok(())
    }
}
