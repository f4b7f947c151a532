//! livemirror's engine: mirrors a live block device onto a hot-added target.
//!
//! The engine knows nothing about NBD. It exposes a [`Mirror`] device with the
//! operations a block frontend needs (read, write, flush, trim, write-zeroes,
//! block status, size) and the management operations of the mirror (attach,
//! detach, verify, pause, rate, grow, status). See `../shared/design/semantics.md`
//! for the rules it keeps.
//!
//! All I/O runs on threads set up by [`rt`] (a tokio current-thread runtime with
//! a per-thread io_uring).

pub mod backend;
pub mod buf;
pub mod control;
mod copier;
pub mod device;
pub mod error;
pub mod locks;
pub mod persist;
pub mod ratelimit;
pub mod regions;
pub mod rt;
pub mod stacking;
pub mod status;
pub mod uring;
mod verify;

pub use backend::{Backend, BackendKind, CacheMode, IoHooks, IoKind, LockMode as DeviceLock, OpenOptions};
pub use buf::{BufPool, IoBuf, SharedBuf};
pub use copier::is_zero;
pub use device::{Event, Mirror, MirrorConfig, StatusExtent};
pub use error::{Error, Result};
pub use status::{DeviceState, Status};
pub use verify::VerifyReport;
