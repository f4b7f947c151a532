//! livemirror's ublk frontend: the kernel's `ublk_drv` as the kernel block
//! device (`/dev/ublkbN`), served on the engine's own threads. It talks to the
//! engine only through [`engine::BlockDevice`], like the NBD frontend.
//!
//! - [`sys`]: the driver's user ABI (command numbers, structures, offsets);
//! - [`ctrl`]: the control device (add, start, stop, delete, recover, resize);
//! - [`params`]: what the device tells the kernel (sizes, limits, queues);
//! - [`request`]: one request, decoded and carried out on the engine;
//! - `queue`: one hardware queue served on one engine thread's io_uring;
//! - [`device`]: a device's life: create or take over, start, remove or leave.
//!
//! Requirements: Linux 6.5 or later with `ublk_drv` (user copy, user recovery
//! with reissue); online resize needs Linux 6.16.

pub mod ctrl;
pub mod device;
pub mod params;
mod queue;
pub mod request;
pub mod sys;

pub use device::{DeviceId, Options, UblkDevice};

/// Why a ublk device could not be made, taken over, resized or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `/dev/ublk-control`: the module is not loaded or not built.
    #[error(
        "no {}: the kernel's ublk driver is not loaded (modprobe ublk_drv; livemirror needs Linux 6.5 or later built \
         with CONFIG_BLK_DEV_UBLK); --nbd-device /dev/nbdN serves the export through the kernel's NBD client instead",
        sys::CONTROL_PATH
    )]
    NoDriver,
    /// The driver lacks something livemirror needs.
    #[error("{0}; --nbd-device /dev/nbdN serves the export through the kernel's NBD client instead")]
    Unsupported(String),
    /// A system call failed; says what was being done.
    #[error("{context}: {cause}")]
    Io { context: String, cause: std::io::Error },
    /// Not possible in the device's present state (nothing was changed).
    #[error("{0}")]
    Refused(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Io { context: context.into(), cause }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A tag that marks the devices one daemon makes, so that the daemon started
/// again with the same arguments finds its device (`--ublk-device auto`): the
/// driver keeps it in the device's `ublksrv_flags` and hands it back. `key`
/// names the daemon (its control socket's path). The top 16 bits say "LM".
pub fn owner_tag(key: &[u8]) -> u64 {
    // FNV-1a, 64-bit: stable across builds and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0x4c4d_u64 << 48) | (h & 0x0000_ffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tags_are_stable_and_marked() {
        let a = owner_tag(b"/run/livemirror/control.sock");
        assert_eq!(a >> 48, 0x4c4d);
        assert_eq!(a, owner_tag(b"/run/livemirror/control.sock"), "the same daemon gets the same tag");
        assert_ne!(a, owner_tag(b"/run/other/control.sock"));
        // Pinned: a daemon of the next version must find this version's device.
        assert_eq!(owner_tag(b""), 0x4c4d_0000_0000_0000 | (0xcbf2_9ce4_8422_2325 & 0xffff_ffff_ffff));
    }

    #[test]
    fn the_missing_driver_names_the_module_and_the_alternative() {
        let e = Error::NoDriver.to_string();
        assert!(
            e.contains("/dev/ublk-control") && e.contains("modprobe ublk_drv") && e.contains("--nbd-device"),
            "{e}"
        );
    }
}
