//! The backend seam: every device the engine reads and writes.
//!
//! [`Backend`] is what routing, the copier, verify and the journal see: the
//! operations a mirrored device needs (aligned-or-not reads and writes, flush,
//! zeroing, discard, allocation status, prefetch) and what the engine asks
//! about it (size, alignment, whether zeroing is cheap, whether it lives in
//! RAM, its identity for the state file). Each kind of device is one variant:
//! the local file or block device ([`local::LocalDevice`]) and a device behind
//! a link ([`remote::RemoteDevice`], implemented outside the engine: an NBD
//! export), and a copy-on-write overlay over a read-only base
//! ([`overlay::OverlayDevice`], `serve --overlay`). The rest of the engine never
//! matches on the kind.
//!
//! An enum rather than a trait object: the hot path (a 4K write) stays free of
//! boxed futures, and adding a variant makes the compiler list every method it
//! must answer.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crate::buf::SharedBuf;
use crate::error::Result;
use crate::identity::DeviceIdent;

pub mod local;
pub mod overlay;
pub mod remote;
mod rmw;

pub use local::LocalDevice;
pub use overlay::{OverlayDevice, OverlayNotice, OverlayOptions, OverlayUsage};
pub use remote::{DeviceOpener, IoFuture, LinkState, LocalOpener, RemoteDevice};
pub use rmw::AlignedIo;

/// How to use the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT for block devices, the page cache for regular files.
    #[default]
    Auto,
    /// Always O_DIRECT (falls back to buffered for a file whose size is not aligned).
    Direct,
    /// Always through the page cache.
    Buffered,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CacheMode::Auto),
            "direct" | "none" => Ok(CacheMode::Direct),
            "buffered" | "writeback" => Ok(CacheMode::Buffered),
            _ => Err(format!("unknown cache mode {s:?} (auto, direct, buffered)")),
        }
    }
}

/// What to do when another process holds the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No exclusive lock (read-only tools).
    None,
    /// Fail at once with a clear error.
    Fail,
    /// Wait until the holder is gone (a restarted daemon waits for the I/O of its
    /// killed predecessor to drain: the kernel drops the lock only then).
    Wait,
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub writable: bool,
    pub cache: CacheMode,
    pub lock: LockMode,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { writable: true, cache: CacheMode::Auto, lock: LockMode::Fail }
    }
}

/// Kinds of I/O, as seen by test hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Zero,
    Discard,
}

pub type HookFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + 'a>>;

/// Called before every operation of a backend: tests use it to inject errors and
/// to hold an operation at a precise point (deterministic interleavings).
pub trait IoHooks: Send + Sync + 'static {
    fn before(&self, kind: IoKind, offset: u64, len: u64) -> HookFuture<'_>;
}

/// Identity of the thing behind a path, to compare devices and detect stacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Device holding the inode (the filesystem for files).
    pub dev: u64,
    pub ino: u64,
    /// For block devices, the device number.
    pub rdev: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    File,
    BlockDevice,
    /// Behind a link (an NBD export).
    Remote,
    /// A copy-on-write overlay over a read-only base.
    Overlay,
}

/// One extent of allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated (reads as zeroes).
    pub hole: bool,
}

/// A device the engine mirrors from or to.
#[derive(Debug)]
pub enum Backend {
    Local(LocalDevice),
    Remote(Arc<dyn RemoteDevice>),
    /// Boxed: it holds its base, another backend.
    Overlay(Box<OverlayDevice>),
}

impl Backend {
    /// Opens a local file or block device. Errors name the path and say what failed.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Backend> {
        LocalDevice::open(path, opts).map(Backend::Local)
    }

    /// Opens a path as seen by process `viewer` (see [`LocalDevice::open_as`]).
    pub fn open_as(path: &Path, viewer: Option<u32>, opts: &OpenOptions) -> Result<Backend> {
        LocalDevice::open_as(path, viewer, opts).map(Backend::Local)
    }

    /// Exposes only the first `size` bytes (benchmarks copy a prefix).
    pub fn with_size_limit(self, size: u64) -> Backend {
        match self {
            Backend::Local(d) => Backend::Local(d.with_size_limit(size)),
            other => other,
        }
    }

    #[cfg(feature = "testing")]
    pub fn with_hooks(self, hooks: Arc<dyn IoHooks>) -> Backend {
        match self {
            Backend::Local(d) => Backend::Local(d.with_hooks(hooks)),
            other => other,
        }
    }

    #[cfg(feature = "testing")]
    pub fn with_forced_alignment(self, align: u64) -> Backend {
        match self {
            Backend::Local(d) => Backend::Local(d.with_forced_alignment(align)),
            other => other,
        }
    }

    /// The name it was opened by (a path, or a URI for a remote device).
    pub fn path(&self) -> &Path {
        match self {
            Backend::Local(d) => d.path(),
            Backend::Remote(r) => r.name(),
            Backend::Overlay(o) => o.path(),
        }
    }

    /// Its size when opened.
    pub fn size(&self) -> u64 {
        match self {
            Backend::Local(d) => d.size(),
            Backend::Remote(r) => r.size(),
            Backend::Overlay(o) => o.size(),
        }
    }

    /// Its size now (a file or device may have grown or shrunk).
    pub fn current_size(&self) -> io::Result<u64> {
        match self {
            Backend::Local(d) => d.current_size(),
            Backend::Remote(r) => r.current_size(),
            Backend::Overlay(o) => o.current_size(),
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Local(d) => d.kind(),
            Backend::Remote(_) => BackendKind::Remote,
            Backend::Overlay(_) => BackendKind::Overlay,
        }
    }

    /// Bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        match self {
            Backend::Local(d) => d.is_direct(),
            Backend::Remote(_) | Backend::Overlay(_) => false,
        }
    }

    /// Offset and length alignment of its transfers (1: any).
    pub fn alignment(&self) -> u64 {
        match self {
            Backend::Local(d) => d.alignment(),
            Backend::Remote(r) => r.alignment(),
            Backend::Overlay(o) => o.alignment(),
        }
    }

    /// Zeroing a range is cheaper than writing zeroes (a metadata operation on
    /// a file; what the server says for a remote device).
    pub fn zeroing_is_fast(&self) -> bool {
        match self {
            Backend::Local(d) => d.kind() == BackendKind::File,
            Backend::Remote(r) => r.zeroing_is_fast(),
            // A hole punched in the overlay file.
            Backend::Overlay(_) => true,
        }
    }

    /// A file in RAM: copies are memory copies (the copier sizes its pieces by it).
    pub fn in_memory(&self) -> bool {
        match self {
            Backend::Local(d) => d.in_memory(),
            Backend::Remote(_) => false,
            Backend::Overlay(o) => o.in_memory(),
        }
    }

    /// Device and inode numbers, to compare devices and detect stacking; a
    /// remote device has none.
    pub fn identity(&self) -> Option<Identity> {
        match self {
            Backend::Local(d) => Some(d.identity()),
            Backend::Remote(_) => None,
            Backend::Overlay(o) => o.base().identity(),
        }
    }

    /// What identifies it across restarts (the state file's record).
    pub fn ident(&self) -> DeviceIdent {
        match self {
            Backend::Local(d) => d.ident(),
            Backend::Remote(r) => r.ident(),
            Backend::Overlay(o) => o.ident(),
        }
    }

    /// Reads `[off, off+len)` into `buf[buf_off..buf_off+len]`. A read that
    /// reaches the device's end fails (it is shorter than asked).
    pub async fn read_at(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.read_at(buf, buf_off, len, off).await,
            Backend::Remote(r) => r.read_at(buf, buf_off, len, off).await,
            Backend::Overlay(o) => Box::pin(o.read_at(buf, buf_off, len, off)).await,
        }
    }

    /// Writes `buf[buf_off..buf_off+len]` at `off`; an unaligned write is a
    /// read-modify-write, for which the caller holds the covering range exclusively.
    pub async fn write_at(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.write_at(buf, buf_off, len, off, fua).await,
            Backend::Remote(r) => r.write_at(buf, buf_off, len, off, fua).await,
            Backend::Overlay(o) => Box::pin(o.write_at(buf, buf_off, len, off, fua)).await,
        }
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.flush().await,
            Backend::Remote(r) => r.flush().await,
            Backend::Overlay(o) => o.flush().await,
        }
    }

    /// Writes zeroes; with `may_unmap` the range may become a hole.
    pub async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.write_zeroes(off, len, may_unmap, fua).await,
            Backend::Remote(r) => r.write_zeroes(off, len, may_unmap, fua).await,
            // Zeroes always give the overlay's space back: a hole it holds
            // reads as zeroes, which is all NO_HOLE asks of the device.
            Backend::Overlay(o) => Box::pin(o.zero(off, len, fua)).await,
        }
    }

    /// A hint: the range's contents are not needed.
    pub async fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.discard(off, len).await,
            Backend::Remote(r) => r.discard(off, len).await,
            // Trimmed chunks read as zeroes, stably, and their space comes back.
            Backend::Overlay(o) => Box::pin(o.zero(off, len, false)).await,
        }
    }

    /// A hint: the range will be read soon.
    pub async fn prefetch(&self, off: u64, len: u64) -> io::Result<()> {
        match self {
            Backend::Local(d) => d.prefetch(off, len).await,
            Backend::Remote(r) => r.prefetch(off, len).await,
            Backend::Overlay(o) => Box::pin(o.prefetch(off, len)).await,
        }
    }

    /// Allocation status of `[off, off+len)`, at most `max_extents` extents.
    pub async fn allocation(&self, off: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
        match self {
            Backend::Local(d) => d.allocation(off, len, max_extents),
            Backend::Remote(r) => r.allocation(off, len, max_extents).await,
            Backend::Overlay(o) => Box::pin(o.allocation(off, len, max_extents)).await,
        }
    }

    /// How its I/O goes, for status: "direct" (O_DIRECT), "buffered" (the page
    /// cache), "network" or "overlay".
    pub fn io_mode(&self) -> &'static str {
        match self {
            Backend::Local(d) if d.is_direct() => "direct",
            Backend::Local(_) => "buffered",
            Backend::Remote(_) => "network",
            Backend::Overlay(_) => "overlay",
        }
    }

    /// Learning where it has holes costs less than reading them: a device
    /// behind a link, where a read moves the bytes over the wire (the copier
    /// asks before it reads). A local device reads holes from the page cache.
    pub fn holes_worth_asking(&self) -> bool {
        match self {
            Backend::Remote(_) => true,
            Backend::Local(_) => false,
            Backend::Overlay(o) => o.base().holes_worth_asking(),
        }
    }

    /// The link of a remote device; `None` for a local one.
    pub fn link(&self) -> Option<LinkState> {
        match self {
            Backend::Local(_) => None,
            Backend::Remote(r) => Some(r.link()),
            Backend::Overlay(o) => o.base().link(),
        }
    }

    /// The overlay, when this device is one.
    pub fn overlay(&self) -> Option<&OverlayDevice> {
        match self {
            Backend::Overlay(o) => Some(o),
            _ => None,
        }
    }

    /// Everything local it is made of, for the stacking checks (an overlay:
    /// its base and its file).
    pub fn identities(&self) -> Vec<Identity> {
        match self {
            Backend::Overlay(o) => o.base().identities().into_iter().chain(Some(o.file_identity())).collect(),
            other => other.identity().into_iter().collect(),
        }
    }

    /// This device is gone for good (the source was detached): an overlay
    /// removes its file once closed. Nothing for other kinds.
    pub fn retire(&self) {
        if let Backend::Overlay(o) = self {
            o.retire();
        }
    }

    /// A remote device whose link is down (the copier waits for it).
    pub fn is_reconnecting(&self) -> bool {
        matches!(self.link(), Some(LinkState::Reconnecting { .. }))
    }
}
