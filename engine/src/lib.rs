//! livemirror's engine: mirrors a live block device onto a hot-added target.
//!
//! The engine knows nothing about NBD. It exposes a [`Mirror`] device with the
//! operations a block frontend needs (read, write, flush, trim, write-zeroes,
//! block status, size) and the management operations of the mirror (attach,
//! detach, verify, pause, rate, grow, status). docs/semantics.md states the
//! rules it keeps; docs/architecture.md maps where each is enforced.
//!
//! All I/O runs on threads set up by [`rt`] (a tokio current-thread runtime with
//! a per-thread io_uring).

pub mod backend;
pub mod bench;
pub mod buf;
mod copier;
pub mod drain;
pub mod error;
pub mod hostfs;
pub mod identity;
pub mod journal;
pub mod locks;
pub mod mirror;
pub mod ratelimit;
pub mod regions;
mod route;
pub mod rt;
pub mod stacking;
pub mod startup;
pub mod state;
pub mod statefile;
pub mod status;
pub mod sync;
pub mod sysfs;
#[cfg(feature = "testing")]
pub mod testing;
pub mod uring;
mod verify;

pub use backend::{
    AlignedIo, Backend, BackendKind, CacheMode, DeviceOpener, Extent, IoFuture, IoHooks, IoKind, LinkState,
    LockMode as DeviceLock, OpenOptions, RemoteDevice,
};
pub use buf::{BudgetCharge, BufPool, IoBuf, SharedBuf};
pub use copier::is_zero;
pub use drain::{Drain, DrainGuard};
pub use error::{Error, Result};
pub use identity::DeviceIdent;
pub use mirror::{KernelDevice, Mirror, MirrorConfig, Opener, StatusExtent, DEFAULT_QUEUE_DEPTH};
pub use rt::Worker;
pub use state::{DeviceState, Transition};
pub use status::{Event, EventKind, Status};
pub use verify::VerifyReport;

/// The device API a block frontend (NBD, ublk) talks to.
/// Futures are `!Send`: they run on the engine thread that polls them.
#[allow(async_fn_in_trait)]
pub trait BlockDevice: Send + Sync + 'static {
    /// Current export size in bytes (can grow at runtime).
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// True when WRITE_ZEROES is cheaper than writing zeroes.
    fn fast_zero(&self) -> bool;
    /// Requests aligned to this avoid read-modify-write (1: any alignment is
    /// as good as another). Any alignment is accepted either way.
    fn io_alignment(&self) -> u64 {
        1
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> (Result<()>, IoBuf);
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()>;
    async fn flush(&self) -> Result<()>;
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()>;
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()>;
    async fn cache(&self, offset: u64, len: u64) -> Result<()>;
    async fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<StatusExtent>>;
}

impl BlockDevice for Mirror {
    fn size(&self) -> u64 {
        Mirror::size(self)
    }
    fn read_only(&self) -> bool {
        Mirror::read_only(self)
    }
    fn fast_zero(&self) -> bool {
        Mirror::fast_zero(self)
    }
    fn io_alignment(&self) -> u64 {
        Mirror::io_alignment(self)
    }
    async fn read(&self, offset: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        Mirror::read(self, offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<()> {
        Mirror::write(self, offset, data, fua).await
    }
    async fn flush(&self) -> Result<()> {
        Mirror::flush(self).await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Mirror::trim(self, offset, len).await?;
        if fua {
            Mirror::flush(self).await?;
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        Mirror::write_zeroes(self, offset, len, may_unmap, fua).await
    }
    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        Mirror::cache(self, offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<StatusExtent>> {
        Mirror::block_status(self, offset, len, max_extents).await
    }
}
