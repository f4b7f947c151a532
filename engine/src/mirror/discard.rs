//! TRIM: a hint, acted on only for regions it covers wholly (docs/semantics.md,
//! "Discard and zeroes"). What it does in each state is the route's
//! [`TrimPolicy`]; a trimmed region reads as zeroes from then on (docs/decisions.md).

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
        let (covered, range) = {
            let m = self.map.lock();
            let covered = m.regions_covered(off, len);
            let range = m.bytes_of(covered.clone());
            (covered, range)
        };
        if covered.is_empty() {
            return Ok(());
        }
        let _fg = self.fg.begin();
        // Exclusive: no write or copy of these regions runs while their marks change.
        let _guard = self.locks.lock(range.clone(), LockMode::Exclusive).await;
        let route = self.route();
        let rlen = range.end - range.start;
        if let Some(s) = &route.source {
            if let Err(e) = s.discard(range.start, rlen).await {
                tracing::debug!("discard on {} ignored: {e}", s.path().display());
            }
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
