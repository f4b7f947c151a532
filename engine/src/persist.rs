//! Crash-safe state (`--state FILE`). Filled in by the persistence work; until
//! then a device has no journal and these are never called.

use std::ops::Range;

use crate::backend::Backend;
use crate::device::Mirror;
use crate::error::Result;
use crate::status::DeviceState;

pub struct Journal {
    _private: (),
}

pub struct IntentGuard;

impl IntentGuard {
    pub fn finish(self, _m: &Mirror) {}
}

impl Journal {
    pub fn set_state(&self, _state: DeviceState, _source: Option<&Backend>, _target: Option<&Backend>) {}
    pub async fn persist(&self) -> Result<()> {
        Ok(())
    }
    pub fn reset_clean(&self) {}
    pub fn mark_all_clean_durable(&self, _m: &Mirror) {}
    pub fn set_export_size(&self, _size: u64) {}
    pub async fn begin_write(&self, _m: &Mirror, _off: u64, _len: u64) -> Result<IntentGuard> {
        Ok(IntentGuard)
    }
    pub fn flush_begin(&self) -> u64 {
        0
    }
    pub fn flush_done(&self, _seq: u64) {}
    pub fn note_cleaned(&self, _regions: Range<usize>) {}
    pub fn mark_dirty_meta(&self) {}
}
