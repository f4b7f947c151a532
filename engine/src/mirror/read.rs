//! The read path: READ, CACHE and BLOCK_STATUS. Where each piece comes from
//! is the route's decision ([`Route::read_plan`], [`Route::query_device`]);
//! this file carries it out, and fails a target read over to the source.

use std::ops::Range;
use std::sync::Arc;

use super::{join_all, Mirror};
use crate::buf::{IoBuf, SharedBuf};
use crate::error::{Error, Result};
use crate::route::{ReadFrom, Route};

/// One allocation extent reported to NBD clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

impl Mirror {
    /// Reads `buf.len()` bytes at `off` into `buf`.
    pub async fn read(&self, off: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(off, len, false) {
            return (Err(e), buf);
        }
        if len == 0 {
            return (Ok(()), buf);
        }
        let _fg = self.fg.begin();
        let route = self.route();
        // One trip to the map: where every piece comes from.
        let plan = route.read_plan(&self.map.lock(), off, len);
        let shared = SharedBuf::new(buf);
        let res = self.read_planned(&route, &shared, off, &plan).await;
        match SharedBuf::into_inner(shared) {
            Ok(buf) => (res, buf),
            // Every op holding a clone has completed by now; this cannot happen,
            // but never hand out a buffer the kernel may still write.
            Err(_) => (Err(Error::Internal("read buffer still shared".into())), IoBuf::new(len as usize)),
        }
    }

    async fn read_planned(
        &self,
        route: &Arc<Route>,
        buf: &Arc<SharedBuf>,
        off: u64,
        plan: &[(Range<u64>, ReadFrom)],
    ) -> Result<()> {
        let mut futs = Vec::with_capacity(plan.len());
        for (range, from) in plan {
            futs.push(self.read_piece(route, buf, off, range.clone(), *from));
        }
        for r in join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn read_piece(
        &self,
        route: &Arc<Route>,
        buf: &Arc<SharedBuf>,
        base: u64,
        range: Range<u64>,
        from: ReadFrom,
    ) -> Result<()> {
        let boff = (range.start - base) as usize;
        let blen = (range.end - range.start) as usize;
        match from {
            ReadFrom::Zero => {
                // SAFETY: pieces of one read are disjoint ranges of `buf`.
                unsafe { buf.slice_mut(boff, blen) }.fill(0);
                Ok(())
            }
            ReadFrom::Target => {
                if let Some(t) = &route.target {
                    // The registration must be gone before failing over: dropping
                    // the target waits for every registered read, ours included.
                    let res = match t.begin_read() {
                        Some(reg) => {
                            let r = t.backend.read_at(buf, boff, blen, range.start).await;
                            drop(reg);
                            Some(r)
                        }
                        None => None,
                    };
                    match res {
                        Some(Ok(())) => return Ok(()),
                        Some(Err(e)) if route.source.is_some() => {
                            self.fail_target(t, format!("target read failed at offset {}: {e}", range.start)).await;
                        }
                        Some(Err(e)) => {
                            let what =
                                format!("read from {} at offset {} failed", t.backend.path().display(), range.start);
                            return Err(Error::io(what, e));
                        }
                        None => {}
                    }
                }
                // The target is gone (or just failed): the source has every byte.
                self.read_source(route, buf, boff, blen, range.start).await
            }
            ReadFrom::Source => self.read_source(route, buf, boff, blen, range.start).await,
        }
    }

    async fn read_source(&self, route: &Route, buf: &Arc<SharedBuf>, boff: usize, blen: usize, off: u64) -> Result<()> {
        let Some(s) = &route.source else {
            return Err(Error::Internal("no device to read from".into()));
        };
        s.read_at(buf, boff, blen, off)
            .await
            .map_err(|e| Error::io(format!("read from {} at offset {off} failed", s.path().display()), e))
    }

    /// NBD CACHE: prefetch into the page cache where there is one.
    pub async fn cache(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len, false)?;
        let route = self.route();
        match route.query_device() {
            Some(d) => d.prefetch(off, len).await.map_err(|e| Error::io("prefetch failed", e)),
            None => Ok(()),
        }
    }

    /// Allocation status for NBD `base:allocation`: (length, hole, zero) extents
    /// starting at `off`, at most `max` of them.
    pub async fn block_status(&self, off: u64, len: u64, max: usize) -> Result<Vec<StatusExtent>> {
        self.check_range(off, len, false)?;
        let route = self.route();
        let end = off + len;
        // Classify by region first (discarded: zero; unverifiable: unknown),
        // then ask the device for the rest.
        let pieces: Vec<(Range<u64>, Option<StatusExtent>)> = {
            let m = self.map.lock();
            let mut out: Vec<(Range<u64>, Option<StatusExtent>)> = Vec::new();
            let fixed_any = m.discarded_count() > 0 || m.unverifiable_count() > 0;
            for r in m.regions_touching(off, len) {
                let br = m.byte_range(r);
                let piece = br.start.max(off)..br.end.min(end);
                let fixed = if !fixed_any {
                    None
                } else if m.is_discarded(r) && route.discarded_is_hole() {
                    Some(StatusExtent { len: 0, hole: true, zero: true })
                } else if m.is_unverifiable(r) && route.unverifiable_is_unknown() {
                    Some(StatusExtent { len: 0, hole: false, zero: false })
                } else {
                    None
                };
                if !fixed_any {
                    out.push((off..end, None));
                    break;
                }
                match out.last_mut() {
                    Some((last, f)) if *f == fixed && last.end == piece.start => last.end = piece.end,
                    _ => out.push((piece, fixed)),
                }
            }
            out
        };
        let dev = route.query_device();
        let mut out: Vec<StatusExtent> = Vec::new();
        for (range, fixed) in pieces {
            if out.len() >= max {
                break;
            }
            match (fixed, dev) {
                (Some(f), _) => push_extent(&mut out, StatusExtent { len: range.end - range.start, ..f }),
                (None, Some(d)) => {
                    let exts = d
                        .allocation(range.start, range.end - range.start, max - out.len())
                        .await
                        .map_err(|e| Error::io(format!("allocation query on {}", d.path().display()), e))?;
                    let mut covered = 0;
                    for e in exts {
                        covered += e.len;
                        push_extent(&mut out, StatusExtent { len: e.len, hole: e.hole, zero: e.hole });
                    }
                    if covered < range.end - range.start {
                        break; // the device stopped early; the client asks again
                    }
                }
                (None, None) => {
                    push_extent(&mut out, StatusExtent { len: range.end - range.start, hole: false, zero: false })
                }
            }
        }
        out.truncate(max.max(1));
        Ok(out)
    }
}

fn push_extent(out: &mut Vec<StatusExtent>, e: StatusExtent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}
