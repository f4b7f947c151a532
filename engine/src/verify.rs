//! `verify`: compares S and T region by region with CRC32 while serving.
//!
//! Each span of regions is locked exclusively while it is read from both sides,
//! so no write can land between the two reads. Only clean regions that are not
//! unverifiable are compared (semantics.md, "verify").

use std::ops::Range;

use crate::buf::SharedBuf;
use crate::error::{Error, Result};
use crate::locks::LockMode;
use crate::mirror::Mirror;

/// What `verify` found.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub regions_compared: u64,
    /// Regions not compared: the two below together.
    pub regions_skipped: u64,
    /// Not compared because the copy has not reached them yet (dirty or being
    /// copied): a verify during a sync says how much it could not check.
    #[serde(default)]
    pub regions_not_copied_yet: u64,
    /// Not compared because S and T may legitimately differ there (trimmed).
    #[serde(default)]
    pub regions_unverifiable: u64,
    pub bytes_compared: u64,
    /// Byte ranges whose contents differ, coalesced.
    pub mismatches: Vec<(u64, u64)>,
}

impl Mirror {
    pub async fn verify(&self) -> Result<VerifyReport> {
        let route = self.route();
        if route.source.is_none() || route.target.is_none() {
            return Err(Error::Refused(format!(
                "verify needs both a source and a target, but the state is {}",
                route.state
            )));
        }
        drop(route);
        let region = self.region_size();
        let span_regions = ((1u64 << 20) / region).max(1) as usize;
        let total = self.map.lock().len();
        let mut report = VerifyReport::default();
        let mut r = 0usize;
        while r < total {
            let end = (r + span_regions).min(total);
            let bytes = self.map.lock().bytes_of(r..end);
            let _guard = self.locks.lock(bytes.clone(), LockMode::Exclusive).await;
            let route = self.route();
            let (Some(s), Some(t)) = (route.source.clone(), route.target.clone()) else {
                return Err(Error::Refused(format!("verify stopped: the state changed to {}", route.state)));
            };
            let verifiable: Vec<bool> = {
                let m = self.map.lock();
                for i in r..end {
                    if !m.is_clean(i) {
                        report.regions_not_copied_yet += 1;
                    } else if m.is_unverifiable(i) {
                        report.regions_unverifiable += 1;
                    }
                }
                (r..end).map(|i| m.is_clean(i) && !m.is_unverifiable(i)).collect()
            };
            if verifiable.iter().any(|&v| v) {
                let n = (bytes.end - bytes.start) as usize;
                let sbuf = SharedBuf::new(self.pool.alloc_unbudgeted(n));
                let tbuf = SharedBuf::new(self.pool.alloc_unbudgeted(n));
                let (sr, tr) =
                    tokio::join!(s.read_at(&sbuf, 0, n, bytes.start), t.backend.read_at(&tbuf, 0, n, bytes.start));
                sr.map_err(|e| Error::io(format!("verify: reading {} at {}", s.path().display(), bytes.start), e))?;
                if let Err(e) = tr {
                    let msg = format!("target read failed at offset {} during verify: {e}", bytes.start);
                    drop(route);
                    self.fail_target(&t, msg.clone()).await;
                    return Err(Error::Refused(format!("verify stopped: {msg}; the target was dropped")));
                }
                for (k, &v) in verifiable.iter().enumerate() {
                    let rr: Range<u64> = self.map.lock().byte_range(r + k);
                    if !v {
                        report.regions_skipped += 1;
                        continue;
                    }
                    let a = (rr.start - bytes.start) as usize;
                    let b = (rr.end - bytes.start) as usize;
                    // SAFETY: both reads completed; the buffers are only read now.
                    let (sd, td) = unsafe { (sbuf.slice(a, b - a), tbuf.slice(a, b - a)) };
                    report.regions_compared += 1;
                    report.bytes_compared += (b - a) as u64;
                    if crc32fast::hash(sd) != crc32fast::hash(td) || sd != td {
                        match report.mismatches.last_mut() {
                            Some((_, e)) if *e == rr.start => *e = rr.end,
                            _ => report.mismatches.push((rr.start, rr.end)),
                        }
                    }
                }
            } else {
                report.regions_skipped += verifiable.len() as u64;
            }
            r = end;
        }
        self.event(format!(
            "verify: {} regions compared, {} skipped ({} not copied yet, {} unverifiable), {} mismatching ranges",
            report.regions_compared,
            report.regions_skipped,
            report.regions_not_copied_yet,
            report.regions_unverifiable,
            report.mismatches.len()
        ));
        Ok(report)
    }
}
