//! What the device tells the kernel about itself: size, block sizes, the
//! largest request, discard and write-zeroes limits, caching; and how many
//! queues of what depth serve it.
//!
//! Each value says what the engine really does:
//! - logical block 512: the engine serves any alignment (read-modify-write for
//!   pieces of a block), so the smallest block the kernel allows is true;
//! - physical block and minimum I/O: the largest transfer alignment of the
//!   devices behind the export (O_DIRECT's logical block size), below which a
//!   write costs a read-modify-write;
//! - discard granularity: the region size, since TRIM acts only on regions it
//!   covers wholly (docs/semantics.md); one range per request;
//! - a volatile write cache with FUA: FLUSH and FUA reach every leg of the
//!   mirror (a write is durable only after one of them).

use crate::sys::{self, ParamBasic, ParamDiscard, Params};

/// Largest request the kernel sends, and the largest buffer one request holds.
/// docs/decisions.md (ublk) has the measurements behind it.
pub const DEFAULT_MAX_IO_BYTES: u32 = 1 << 20;

/// Requests in flight per queue. docs/decisions.md (ublk) has the measurements.
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;

/// The deepest queue livemirror makes. Every tag keeps a fetch in the kernel on
/// its engine thread's ring, which holds at most 1024 operations in the kernel
/// (engine::uring): half of them stay for the engine's own I/O.
pub const MAX_QUEUE_DEPTH: u16 = 512;

/// Largest DISCARD or WRITE_ZEROES the kernel sends as one request: 1 GiB, so
/// that a whole-device discard is a few hundred requests, none holding the
/// range locks of more than 16,384 regions of 64 KiB at once.
const MAX_ZEROES_OR_DISCARD_SECTORS: u32 = (1 << 30) >> 9;

/// The facts about the export that the device's parameters are made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes; the device shows the whole 512-byte sectors of it.
    pub size: u64,
    /// The devices' transfer alignment (1: any).
    pub io_alignment: u64,
    /// TRIM's unit (the region size); 0 when the export takes no TRIM.
    pub discard_granularity: u64,
    pub read_only: bool,
    pub max_io_bytes: u32,
}

/// log2 of a power of two between 512 and 64 KiB that covers `bytes`.
fn block_shift(bytes: u64) -> u8 {
    let b = bytes.clamp(512, 64 << 10).next_power_of_two();
    b.trailing_zeros() as u8
}

impl Geometry {
    /// The parameters SET_PARAMS takes for this export.
    pub fn params(&self) -> Params {
        let physical = block_shift(self.io_alignment);
        let mut attrs = sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA;
        if self.read_only {
            attrs |= sys::ATTR_READ_ONLY;
        }
        let basic = ParamBasic {
            attrs,
            logical_bs_shift: 9,
            physical_bs_shift: physical,
            io_opt_shift: physical,
            io_min_shift: physical,
            max_sectors: self.max_io_bytes >> 9,
            dev_sectors: self.size >> 9,
            ..Default::default()
        };
        let mut p = Params {
            len: std::mem::size_of::<Params>() as u32,
            types: sys::PARAM_TYPE_BASIC,
            basic,
            ..Default::default()
        };
        if !self.read_only && self.discard_granularity > 0 {
            p.types |= sys::PARAM_TYPE_DISCARD;
            p.discard = ParamDiscard {
                discard_alignment: 0,
                discard_granularity: self.discard_granularity.min(u32::MAX as u64) as u32,
                max_discard_sectors: MAX_ZEROES_OR_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_ZEROES_OR_DISCARD_SECTORS,
                max_discard_segments: 1,
                reserved0: 0,
            };
        }
        p
    }
}

/// How many queues: one per engine thread that serves them, at most one per
/// CPU (the kernel allows no more, and a queue is served by one thread).
pub fn queue_count(threads: usize, cpus: usize) -> u16 {
    threads.min(cpus).clamp(1, 4096) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            size: 1 << 30,
            io_alignment: 4096,
            discard_granularity: 64 << 10,
            read_only: false,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
        }
    }

    #[test]
    fn a_writable_export_on_4k_devices() {
        let p = geometry().params();
        assert_eq!(p.types, sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD);
        assert_eq!(p.len, 112);
        assert_eq!(p.basic.logical_bs_shift, 9, "any alignment is served");
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.io_min_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) / 512);
        assert_eq!(p.basic.max_sectors, 2048, "1 MiB requests");
        assert_eq!(p.basic.attrs, sys::ATTR_VOLATILE_CACHE | sys::ATTR_FUA);
        assert_eq!(p.discard.discard_granularity, 65536, "TRIM acts on whole regions");
        assert_eq!(p.discard.max_discard_segments, 1, "the driver takes single ranges only");
        assert_eq!(p.discard.max_discard_sectors, 2 << 20);
        assert_eq!(p.discard.max_write_zeroes_sectors, 2 << 20);
    }

    #[test]
    fn read_only_exports_say_so_and_take_no_discard() {
        let p = Geometry { read_only: true, ..geometry() }.params();
        assert_ne!(p.basic.attrs & sys::ATTR_READ_ONLY, 0);
        assert_eq!(p.types, sys::PARAM_TYPE_BASIC);
        assert_eq!(p.discard, ParamDiscard::default());
    }

    #[test]
    fn block_sizes_are_powers_of_two_between_512_and_64k() {
        assert_eq!(Geometry { io_alignment: 1, ..geometry() }.params().basic.physical_bs_shift, 9);
        assert_eq!(Geometry { io_alignment: 512, ..geometry() }.params().basic.physical_bs_shift, 9);
        assert_eq!(Geometry { io_alignment: 3000, ..geometry() }.params().basic.physical_bs_shift, 12);
        assert_eq!(Geometry { io_alignment: 1 << 20, ..geometry() }.params().basic.physical_bs_shift, 16);
    }

    #[test]
    fn a_size_that_is_not_whole_sectors_shows_its_whole_sectors() {
        let p = Geometry { size: (1 << 20) + 100, ..geometry() }.params();
        assert_eq!(p.basic.dev_sectors, 2048);
    }

    #[test]
    fn one_queue_per_serving_thread_and_never_more_than_cpus() {
        assert_eq!(queue_count(4, 2), 2);
        assert_eq!(queue_count(2, 8), 2);
        assert_eq!(queue_count(0, 8), 1);
    }
}
