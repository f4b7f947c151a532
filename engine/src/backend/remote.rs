//! Devices reached through another process or host (an NBD export), seen by
//! the engine through [`RemoteDevice`]. The engine knows no protocol: the
//! implementation lives outside it (the NBD client of nbd-frontend) and is
//! plugged in with a [`DeviceOpener`] that recognises its names (URIs).
//!
//! A remote device handles its own link: a dropped connection or a timeout is
//! retried with backoff inside it, and reported as [`LinkState::Reconnecting`]
//! meanwhile (the copier waits, status shows it). An operation fails only when
//! the device gives up — after its bounded wait — and then the engine treats it
//! like any failed disk (a target is dropped, `degraded`), so an acknowledged
//! write is never lost and the two sides never silently diverge.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use super::{Backend, Extent, OpenOptions};
use crate::buf::SharedBuf;
use crate::error::Result;
use crate::identity::DeviceIdent;

pub type IoFuture<'a, T = ()> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

/// The state of a remote device's link, for status and the copier.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum LinkState {
    Connected,
    /// The link dropped; the device is trying again.
    Reconnecting {
        attempts: u32,
        last_error: String,
    },
}

/// A block device behind a link. Its futures are polled on the engine thread
/// that calls them; an implementation hands the work to its own threads.
pub trait RemoteDevice: Send + Sync + fmt::Debug + 'static {
    /// The name it was opened by (a URI), as shown in status and logs.
    fn name(&self) -> &Path;
    /// The export's size, from the handshake.
    fn size(&self) -> u64;
    /// The size now (a reconnect may have learned a new one).
    fn current_size(&self) -> io::Result<u64>;
    /// Offset and length alignment the server requires (its minimum block size).
    fn alignment(&self) -> u64;
    /// Zeroing is cheaper than writing zeroes (the server offers fast zero).
    fn zeroing_is_fast(&self) -> bool;
    /// What identifies the export across restarts: its name, size and whatever
    /// the server reports about itself.
    fn ident(&self) -> DeviceIdent;
    fn link(&self) -> LinkState;
    fn read_at<'a>(&'a self, buf: &'a Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> IoFuture<'a>;
    fn write_at<'a>(&'a self, buf: &'a Arc<SharedBuf>, buf_off: usize, len: usize, off: u64, fua: bool)
        -> IoFuture<'a>;
    fn flush(&self) -> IoFuture<'_>;
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> IoFuture<'_>;
    fn discard(&self, off: u64, len: u64) -> IoFuture<'_>;
    fn prefetch(&self, off: u64, len: u64) -> IoFuture<'_>;
    /// Allocation status (`base:allocation` where the server has it).
    fn allocation(&self, off: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>>;
}

/// Opens the devices the engine is handed by name. The default knows local
/// paths; the binary installs one that also knows NBD URIs.
pub trait DeviceOpener: Send + Sync + 'static {
    /// Opens `name` as process `viewer` sees it (local paths; see
    /// [`super::LocalDevice::open_as`]).
    fn open(&self, name: &Path, viewer: Option<u32>, opts: &OpenOptions) -> Result<Backend>;
}

/// Local files and block devices only.
#[derive(Debug, Default)]
pub struct LocalOpener;

impl DeviceOpener for LocalOpener {
    fn open(&self, name: &Path, viewer: Option<u32>, opts: &OpenOptions) -> Result<Backend> {
        Backend::open_as(name, viewer, opts)
    }
}
