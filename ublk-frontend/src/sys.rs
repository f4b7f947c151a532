//! The ublk driver's user ABI (`include/uapi/linux/ublk_cmd.h`), written out by
//! hand: command numbers, feature bits, the structures the kernel reads and
//! writes, and the offsets of user copy.
//!
//! Every structure is `#[repr(C)]` with the kernel's field order and widths; the
//! tests pin their sizes and field offsets to the header's, and the command
//! numbers to the values `_IOR`/`_IOWR` give in C.

/// The control device every daemon talks to; present while `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// `/dev/ublkcN`: the per-device character device the queues are served on.
pub fn char_path(id: u32) -> String {
    format!("/dev/ublkc{id}")
}

/// `/dev/ublkbN`: the block device clients see.
pub fn block_path(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, 'u', nr, size)` as asm-generic/ioctl.h encodes it.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, size)
}

const CTRL: usize = std::mem::size_of::<CtrlCmd>();
const IO: usize = std::mem::size_of::<IoCmd>();

/// Control commands (`UBLK_U_CMD_*`), sent on `/dev/ublk-control`.
pub const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL);
pub const CMD_ADD_DEV: u32 = iowr(0x04, CTRL);
pub const CMD_DEL_DEV: u32 = iowr(0x05, CTRL);
pub const CMD_START_DEV: u32 = iowr(0x06, CTRL);
pub const CMD_STOP_DEV: u32 = iowr(0x07, CTRL);
pub const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL);
pub const CMD_GET_PARAMS: u32 = ior(0x09, CTRL);
pub const CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL);
pub const CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL);
pub const CMD_GET_FEATURES: u32 = ior(0x13, CTRL);
/// Linux 6.16 and later.
pub const CMD_UPDATE_SIZE: u32 = iowr(0x15, CTRL);

/// Queue commands (`UBLK_U_IO_*`), sent on `/dev/ublkcN` by each queue's thread.
pub const IO_FETCH_REQ: u32 = iowr(0x20, IO);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO);

/// Device flags (`UBLK_F_*`): asked for at ADD_DEV, reported by GET_FEATURES.
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const F_USER_COPY: u64 = 1 << 7;
pub const F_UPDATE_SIZE: u64 = 1 << 10;

/// Device states (`UBLK_S_DEV_*`).
pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

/// Request operations (`UBLK_IO_OP_*`, bits 0–7 of `op_flags`).
pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
pub const IO_OP_WRITE_SAME: u8 = 4;
pub const IO_OP_WRITE_ZEROES: u8 = 5;
/// Request flags (`UBLK_IO_F_*`), at their own bit positions in `op_flags`.
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

/// What a fetch completes with: a request is there (`UBLK_IO_RES_OK`), or the
/// device is going away and the command will not come back (`UBLK_IO_RES_ABORT`).
pub const IO_RES_OK: i32 = 0;
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// At most this many requests per queue (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u16 = 4096;

/// Attributes of `ParamBasic::attrs` (`UBLK_ATTR_*`).
pub const ATTR_READ_ONLY: u32 = 1 << 0;
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;

/// Parameter kinds present in `Params::types` (`UBLK_PARAM_TYPE_*`).
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// User copy: a request's data is read and written with pread/pwrite on
/// `/dev/ublkcN` at this offset (`UBLKSRV_IO_BUF_OFFSET` plus the queue and tag
/// shifted into place, `UBLK_QID_OFF`/`UBLK_TAG_OFF`).
pub fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    const IO_BUF_OFFSET: u64 = 0x8000_0000;
    const TAG_OFF: u32 = 25;
    const QID_OFF: u32 = TAG_OFF + 16;
    IO_BUF_OFFSET + ((q_id as u64) << QID_OFF) + ((tag as u64) << TAG_OFF)
}

/// Where queue `q_id`'s request descriptors are mapped from `/dev/ublkcN`: one
/// slot per queue, each as large as the largest queue's array
/// (`UBLKSRV_CMD_BUF_OFFSET + q_id * ublk_max_cmd_buf_size()`).
pub fn descriptors_offset(q_id: u16, page_size: usize) -> u64 {
    let max = (MAX_QUEUE_DEPTH as usize * std::mem::size_of::<IoDesc>()).next_multiple_of(page_size);
    q_id as u64 * max as u64
}

/// Bytes mapped for a queue of `depth` descriptors.
pub fn descriptors_len(depth: u16, page_size: usize) -> usize {
    (depth as usize * std::mem::size_of::<IoDesc>()).next_multiple_of(page_size)
}

/// `struct ublksrv_ctrl_cmd`: the first 32 bytes of a control SQE's command area.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX` unless the command is for one queue.
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

impl CtrlCmd {
    pub fn new(dev_id: u32) -> CtrlCmd {
        CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() }
    }

    /// The 80-byte command area of an SQE128, this structure first.
    pub fn to_sqe_cmd(self) -> [u8; 80] {
        let mut out = [0u8; 80];
        out[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        out[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        out[6..8].copy_from_slice(&self.len.to_ne_bytes());
        out[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        out[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        out[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        out[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        out[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        out
    }
}

/// `struct ublksrv_ctrl_dev_info`: what ADD_DEV asks for and GET_DEV_INFO tells.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// Free for the server: the kernel stores it at ADD_DEV and hands it back.
    /// livemirror keeps the owner tag of the daemon that made the device here.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, as the kernel writes it into the
/// queue's mapped descriptor array at the request's tag.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoDesc {
    /// Operation in bits 0–7, `UBLK_IO_F_*` flags above.
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

impl IoDesc {
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: the 16-byte command of FETCH and COMMIT_AND_FETCH.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// The committed request's result: bytes done, or a negative errno.
    pub result: i32,
    /// The request buffer; zero with user copy.
    pub addr: u64,
}

impl IoCmd {
    pub fn to_sqe_cmd(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        out[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        out[4..8].copy_from_slice(&self.result.to_ne_bytes());
        out[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        out
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    /// Largest request, in 512-byte sectors.
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    /// The device's size, in 512-byte sectors.
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read-only: filled by GET_PARAMS).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamDevt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned` (unused; present so the layout is the kernel's).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamZoned {
    pub max_open_zones: u32,
    pub max_active_zones: u32,
    pub max_zone_append_sectors: u32,
    pub reserved: [u8; 20],
}

/// `struct ublk_params` as Linux 6.12 has it. Later kernels append more kinds;
/// `len` tells each side how much the other knows.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: ParamDevt,
    pub zoned: ParamZoned,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn command_numbers_are_what_the_c_macros_give() {
        // _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) and friends, as ublksrv and
        // the kernel's selftests print them.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_DEL_DEV, 0xc020_7505);
        assert_eq!(CMD_START_DEV, 0xc020_7506);
        assert_eq!(CMD_STOP_DEV, 0xc020_7507);
        assert_eq!(CMD_SET_PARAMS, 0xc020_7508);
        assert_eq!(CMD_GET_PARAMS, 0x8020_7509);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_START_USER_RECOVERY, 0xc020_7510);
        assert_eq!(CMD_END_USER_RECOVERY, 0xc020_7511);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(CMD_UPDATE_SIZE, 0xc020_7515);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn flags_and_codes_are_the_headers_values() {
        // As include/uapi/linux/ublk_cmd.h defines them (a typo here would still
        // decode consistently in every other test, so they are pinned by value).
        assert_eq!(
            [F_USER_RECOVERY, F_USER_RECOVERY_REISSUE, F_CMD_IOCTL_ENCODE, F_USER_COPY, F_UPDATE_SIZE],
            [0x8, 0x10, 0x40, 0x80, 0x400]
        );
        assert_eq!([S_DEV_DEAD, S_DEV_LIVE, S_DEV_QUIESCED], [0, 1, 2]);
        assert_eq!(
            [IO_OP_READ, IO_OP_WRITE, IO_OP_FLUSH, IO_OP_DISCARD, IO_OP_WRITE_SAME, IO_OP_WRITE_ZEROES],
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!([IO_F_FUA, IO_F_NOUNMAP], [0x2000, 0x8000]);
        assert_eq!([IO_RES_OK, IO_RES_ABORT], [0, -19]);
        assert_eq!([ATTR_READ_ONLY, ATTR_VOLATILE_CACHE, ATTR_FUA], [1, 4, 8]);
        assert_eq!([PARAM_TYPE_BASIC, PARAM_TYPE_DISCARD], [1, 2]);
        assert_eq!(MAX_QUEUE_DEPTH, 4096);
    }

    #[test]
    fn structures_have_the_kernel_layout() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(offset_of!(CtrlCmd, addr), 8);
        assert_eq!(offset_of!(CtrlCmd, data), 16);
        assert_eq!(offset_of!(CtrlCmd, dev_path_len), 24);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(offset_of!(DevInfo, max_io_buf_bytes), 8);
        assert_eq!(offset_of!(DevInfo, dev_id), 12);
        assert_eq!(offset_of!(DevInfo, ublksrv_pid), 16);
        assert_eq!(offset_of!(DevInfo, flags), 24);
        assert_eq!(offset_of!(DevInfo, ublksrv_flags), 32);
        assert_eq!(offset_of!(DevInfo, owner_uid), 40);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(offset_of!(IoDesc, start_sector), 8);
        assert_eq!(offset_of!(IoDesc, addr), 16);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(offset_of!(IoCmd, result), 4);
        assert_eq!(offset_of!(IoCmd, addr), 8);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(offset_of!(ParamBasic, max_sectors), 8);
        assert_eq!(offset_of!(ParamBasic, dev_sectors), 16);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(offset_of!(ParamDiscard, max_discard_segments), 16);
        assert_eq!(size_of::<ParamDevt>(), 16);
        assert_eq!(size_of::<ParamZoned>(), 32);
        assert_eq!(offset_of!(Params, basic), 8);
        assert_eq!(offset_of!(Params, discard), 40);
        assert_eq!(offset_of!(Params, devt), 60);
        assert_eq!(offset_of!(Params, zoned), 76);
        // 108 bytes of fields, padded to the 8-byte alignment of ParamBasic.
        assert_eq!(size_of::<Params>(), 112);
    }

    #[test]
    fn commands_encode_field_by_field_in_native_order() {
        let c = CtrlCmd {
            dev_id: 7,
            queue_id: 0xffff,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [42],
            ..Default::default()
        };
        let b = c.to_sqe_cmd();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(&b[4..6], &[0xff, 0xff]);
        assert_eq!(&b[6..8], &64u16.to_ne_bytes());
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(&b[16..24], &42u64.to_ne_bytes());
        assert!(b[24..].iter().all(|&x| x == 0));
        let io = IoCmd { q_id: 3, tag: 513, result: -5, addr: 0 };
        let b = io.to_sqe_cmd();
        assert_eq!(&b[0..2], &3u16.to_ne_bytes());
        assert_eq!(&b[2..4], &513u16.to_ne_bytes());
        assert_eq!(&b[4..8], &(-5i32).to_ne_bytes());
        assert!(b[8..].iter().all(|&x| x == 0));
        // Both encodings agree with the in-memory layout the kernel reads.
        // SAFETY: IoCmd is repr(C), 16 bytes, no padding (offsets checked above).
        let raw: [u8; 16] = unsafe { std::mem::transmute(io) };
        assert_eq!(raw, b);
    }

    #[test]
    fn user_copy_offsets_put_queue_and_tag_where_the_driver_reads_them() {
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        // tag at bit 25, queue at bit 41 (ublk_pos_to_tag, ublk_pos_to_hwq)
        let pos = user_copy_offset(2, 5) - 0x8000_0000;
        assert_eq!((pos >> 25) & 0xffff, 5);
        assert_eq!((pos >> 41) & 0xfff, 2);
        assert_eq!(pos & ((1 << 25) - 1), 0);
        assert_eq!(user_copy_offset(4095, 4095) - 0x8000_0000, (4095u64 << 41) | (4095u64 << 25));
    }

    #[test]
    fn descriptor_areas_are_one_maximal_slot_per_queue() {
        // 4096 descriptors of 24 bytes: 96 KiB, a multiple of 4 KiB already.
        assert_eq!(descriptors_offset(0, 4096), 0);
        assert_eq!(descriptors_offset(1, 4096), 98_304);
        assert_eq!(descriptors_offset(3, 4096), 3 * 98_304);
        assert_eq!(descriptors_len(128, 4096), 4096);
        assert_eq!(descriptors_len(171, 4096), 8192);
    }

    #[test]
    fn the_operation_is_the_low_byte_and_flags_keep_their_bits() {
        let d = IoDesc { op_flags: IO_OP_WRITE as u32 | IO_F_FUA, nr_sectors: 8, start_sector: 0, addr: 0 };
        assert_eq!(d.op(), IO_OP_WRITE);
        assert_ne!(d.op_flags & IO_F_FUA, 0);
        assert_eq!(d.op_flags & IO_F_NOUNMAP, 0);
    }
}
