//! TRIM: a hint, acted on for the regions it covers wholly (docs/semantics.md,
//! "Discard and zeroes"). What it does in each state is the route's
//! [`TrimPolicy`]; a trimmed region reads as zeroes from then on (docs/decisions.md).
//! With no target the whole range goes to the source (there is nothing S must
//! stay comparable with), so an overlay gives back every whole chunk trimmed.
//! With a target and an overlay as the source, a TRIM is a WRITE_ZEROES that may
//! unmap: an overlay promises that trimmed ranges read as zeroes, in every state.

use std::ops::Range;

use super::Mirror;
use crate::error::Result;
use crate::locks::LockMode;
use crate::route::TrimPolicy;

impl Mirror {
    /// NBD TRIM.
    pub async fn trim(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let route = self.route();
        if route.target.is_some() && route.source.as_ref().is_some_and(|s| s.overlay().is_some()) {
            drop(route);
            return self.write_zeroes(off, len, true, false).await;
        }
        drop(route);
        let (covered, range) = {
            let m = self.map.lock();
            let covered = m.regions_covered(off, len);
            let range = m.bytes_of(covered.clone());
            (covered, range)
        };
        let align = self.route().max_align();
        let alone = self.route().target.is_none();
        if covered.is_empty() && !alone {
            return Ok(());
        }
        let _fg = self.fg.begin();
        // Exclusive: no write or copy of these regions runs while their marks
        // change, and none of the blocks a partial trim zeroes on S alone.
        let end = off + len;
        let lock_range = if alone {
            let a = (off - off % align)..end.div_ceil(align).saturating_mul(align).min(self.size());
            if covered.is_empty() {
                a
            } else {
                a.start.min(range.start)..a.end.max(range.end)
            }
        } else {
            range.clone()
        };
        let _guard = self.locks.lock(lock_range, LockMode::Exclusive).await;
        let route = self.route();
        let rlen = range.end - range.start;
        if let Some(s) = &route.source {
            // Alone (and still with the alignment locked for): the whole range.
            let whole = route.target.is_none() && route.max_align() <= align;
            let (at, n) = if whole { (off, len) } else { (range.start, rlen) };
            if n > 0 {
                if let Err(e) = s.discard(at, n).await {
                    tracing::debug!("discard on {} ignored: {e}", s.path().display());
                }
            }
        }
        if covered.is_empty() {
            return Ok(());
        }
        match route.trim_policy() {
            TrimPolicy::MarkDiscarded => self.map.lock().set_discarded(covered, true),
            TrimPolicy::SkipCopy => {
                let Some(t) = &route.target else { return Ok(()) };
                let (dirty, clean): (Vec<usize>, Vec<usize>) = {
                    let m = self.map.lock();
                    covered.clone().partition(|&r| !m.is_clean(r))
                };
                // Dirty regions become clean without a copy: zero T there so the
                // trimmed range reads the same before and after the switch.
                for run in runs(&dirty) {
                    let br = self.map.lock().bytes_of(run.clone());
                    if let Err(e) = t.backend.write_zeroes(br.start, br.end - br.start, true, false).await {
                        self.fail_target(t, format!("target zeroing failed at offset {}: {e}", br.start)).await;
                        return Ok(());
                    }
                    let mut m = self.map.lock();
                    m.set_clean(run.clone(), true);
                    m.set_unverifiable(run.clone(), true);
                    m.set_discarded(run.clone(), false);
                    drop(m);
                    if let Some(j) = &self.journal {
                        j.note_cleaned(run);
                    }
                }
                for run in runs(&clean) {
                    let br = self.map.lock().bytes_of(run.clone());
                    if let Err(e) = t.backend.discard(br.start, br.end - br.start).await {
                        tracing::debug!("discard on {} ignored: {e}", t.backend.path().display());
                    }
                    self.map.lock().set_unverifiable(run, true);
                }
                if let Some(j) = &self.journal {
                    j.mark_dirty_meta();
                }
                self.copier.wake.notify_waiters();
            }
            TrimPolicy::DiscardTarget => {
                if let Some(t) = &route.target {
                    if let Err(e) = t.backend.discard(range.start, rlen).await {
                        tracing::debug!("discard on {} ignored: {e}", t.backend.path().display());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Contiguous runs of sorted region indexes.
fn runs(regions: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &r in regions {
        match out.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => out.push(r..r + 1),
        }
    }
    out
}
