//! The status report (`livemirror status --json`).

use std::sync::atomic::Ordering;

use super::Mirror;
use crate::state::DeviceState;
use crate::status::Status;
use crate::sync::lock;

impl Mirror {
    pub fn status(&self) -> Status {
        let route = self.route();
        let (total, clean, discarded, unverifiable, region_size) = {
            let m = self.map.lock();
            (m.len() as u64, m.clean_count(), m.discarded_count(), m.unverifiable_count(), m.region_size())
        };
        let copier_error = lock(&self.copier.error).clone();
        let error = copier_error.or_else(|| lock(&self.last_error).clone());
        let rate = self.copier.meter.rate();
        let syncing = route.state == DeviceState::Syncing;
        let remaining = if syncing { (total - clean) * region_size } else { 0 };
        let paused = self.copier.is_paused() && syncing;
        // A paused copy has no ETA, and no rate: it is not copying.
        let eta = if !syncing || paused {
            None
        } else if remaining == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some(remaining as f64 / rate)
        } else {
            None
        };
        Status {
            state: route.state,
            paused,
            export_size: self.size(),
            source: route.source.as_ref().map(|s| s.path().display().to_string()),
            target: route.target.as_ref().map(|t| t.backend.path().display().to_string()),
            region_size,
            regions_total: total,
            regions_clean: clean,
            bytes_copied: self.copier.bytes_copied.load(Ordering::Relaxed),
            bytes_written_as_zeroes: self.copier.bytes_zeroed.load(Ordering::Relaxed),
            detect_zeroes: self.cfg.detect_zeroes,
            copy_rate_bytes_per_sec: if syncing && !paused { rate } else { 0.0 },
            eta_seconds: eta,
            error,
            regions_discarded: discarded,
            regions_unverifiable: unverifiable,
            max_rate: self.copier.limiter.rate(),
            min_rate: self.copier.min_rate.load(std::sync::atomic::Ordering::Relaxed),
            source_io: route.source.as_ref().map(|s| s.io_mode().to_string()),
            target_io: route.target.as_ref().map(|t| t.backend.io_mode().to_string()),
            source_link: route.source.as_ref().and_then(|s| s.link()),
            target_link: route.target.as_ref().and_then(|t| t.backend.link()),
            copier_running: self.copier.running.load(Ordering::Relaxed),
            overlay: route.source.as_ref().and_then(|s| s.overlay()).map(|o| o.usage()),
            kernel_device: self.kernel_device().map(|k| k.path),
            events: self.events(),
        }
    }
}
