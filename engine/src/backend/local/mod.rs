//! A local device: one regular file or block device, driven through the
//! thread's io_uring.
//!
//! It hides device alignment. With O_DIRECT every transfer must be
//! aligned; an unaligned write is turned into a read-modify-write of the covering
//! aligned range. The caller (the mirror device) holds that covering range
//! exclusively for the duration, so two concurrent unaligned writes to one sector
//! cannot lose each other's bytes.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

#[cfg(feature = "testing")]
use super::IoHooks;
mod open;

use open::fstat;

use super::AlignedIo;
use super::{BackendKind, Extent, Identity, IoKind};

/// What a local device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalKind {
    File,
    BlockDevice,
}
use crate::buf::{IoBuf, SharedBuf};
use crate::identity::{self, DeviceIdent};
use crate::uring::Reactor;

/// The largest single kernel transfer we issue; longer requests are split.
const MAX_OP_BYTES: usize = 1 << 30;

nix::ioctl_read!(ioctl_blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(ioctl_blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_write_ptr_bad!(ioctl_blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);

pub struct LocalDevice {
    fd: OwnedFd,
    path: PathBuf,
    kind: LocalKind,
    size: u64,
    direct: bool,
    /// Offset and length alignment the kernel requires (1 when buffered).
    align: u64,
    /// Buffer address alignment the kernel requires.
    mem_align: usize,
    identity: Identity,
    writable: bool,
    /// A file in RAM (tmpfs, ramfs): see [`SYNC_MEMORY_MAX`] and [`WORKER_MEMORY_WRITE_MIN`].
    in_memory: bool,
    #[cfg(feature = "testing")]
    hooks: Option<Arc<dyn IoHooks>>,
}

/// Largest read done with a plain syscall on a file in RAM: tmpfs cannot do
/// non-blocking I/O, so io_uring would hand it to a worker thread and back,
/// which costs more than the copy itself up to this size (docs/decisions.md).
const SYNC_MEMORY_MAX: usize = 1 << 20;

/// Smallest write to a file in RAM handed to an io_uring worker on purpose
/// (IOSQE_ASYNC): its copy into the page cache then overlaps with the next
/// receive or source read on the other core (docs/decisions.md).
const WORKER_MEMORY_WRITE_MIN: usize = 256 << 10;

impl fmt::Debug for LocalDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDevice")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .field("align", &self.align)
            .finish()
    }
}

impl LocalDevice {
    /// Exposes only the first `size` bytes (benchmarks copy a prefix).
    pub fn with_size_limit(mut self, size: u64) -> LocalDevice {
        self.size = self.size.min(size);
        self
    }

    #[cfg(feature = "testing")]
    pub fn with_hooks(mut self, hooks: Arc<dyn IoHooks>) -> LocalDevice {
        self.hooks = Some(hooks);
        self
    }

    /// Pretends the device needs `align`-byte aligned transfers even when it does
    /// not (tests exercise read-modify-write on plain files with this).
    #[cfg(feature = "testing")]
    pub fn with_forced_alignment(mut self, align: u64) -> LocalDevice {
        assert!(align.is_power_of_two());
        self.align = self.align.max(align);
        self.mem_align = self.mem_align.max(align as usize);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn kind(&self) -> BackendKind {
        match self.kind {
            LocalKind::File => BackendKind::File,
            LocalKind::BlockDevice => BackendKind::BlockDevice,
        }
    }
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    pub fn alignment(&self) -> u64 {
        self.align
    }
    pub fn identity(&self) -> Identity {
        self.identity
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Re-reads the current size (a file or device may have grown).
    pub fn current_size(&self) -> io::Result<u64> {
        match self.kind {
            LocalKind::File => Ok(fstat(self.raw_fd())?.st_size as u64),
            LocalKind::BlockDevice => {
                let mut size = 0u64;
                // SAFETY: BLKGETSIZE64 writes one u64.
                unsafe { ioctl_blkgetsize64(self.raw_fd(), &mut size) }.map_err(io::Error::from)?;
                Ok(size)
            }
        }
    }

    /// What a file occupies on its file system (its allocated blocks).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(fstat(self.raw_fd())?.st_blocks as u64 * 512)
    }

    /// A file in RAM (tmpfs, ramfs).
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// True when a write of `[off, off+len)` must be read-modify-written.
    pub fn needs_rmw(&self, off: u64, len: u64) -> bool {
        self.align > 1 && (!off.is_multiple_of(self.align) || !len.is_multiple_of(self.align))
    }

    #[cfg(feature = "testing")]
    async fn hook(&self, kind: IoKind, off: u64, len: u64) -> io::Result<()> {
        match &self.hooks {
            Some(h) => h.before(kind, off, len).await,
            None => Ok(()),
        }
    }

    /// Production builds have no hooks: nothing to wait for.
    #[cfg(not(feature = "testing"))]
    #[inline(always)]
    async fn hook(&self, _kind: IoKind, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn types_fd(&self) -> types::Fd {
        types::Fd(self.fd.as_raw_fd())
    }

    /// Reads exactly `len` bytes at `off` into `dst` (kernel-visible memory owned
    /// by `keep`). A read that reaches the end of the device fails: the device is
    /// shorter than the range asked for (truncated, shrunk), and its missing
    /// bytes are not data.
    async fn raw_read_exact<K: 'static>(&self, keep: K, ptr: *mut u8, len: usize, off: u64) -> (io::Result<()>, K) {
        if self.in_memory && len <= SYNC_MEMORY_MAX {
            // SAFETY: the caller guarantees [ptr, ptr+len) is ours to write.
            return (unsafe { self.sync_read_exact(ptr, len, off) }, keep);
        }
        let reactor = match Reactor::current() {
            Ok(r) => r,
            Err(e) => return (Err(e), keep),
        };
        let mut done = 0usize;
        let mut keep = keep;
        while done < len {
            let chunk = (len - done).min(MAX_OP_BYTES);
            // SAFETY: done < len, so the pointer stays within the caller's range.
            let p = unsafe { ptr.add(done) };
            let fd = self.types_fd();
            let o = off + done as u64;
            let op = reactor.start(keep, |_| opcode::Read::new(fd, p, chunk as u32).offset(o).build());
            let (res, k) = op.await;
            keep = k;
            match res {
                // The device ended before the range did: it is shorter than the
                // caller (the export) believes. Never invent the missing bytes.
                Ok(0) => return (Err(short_device(o)), keep),
                Ok(n) => done += n as usize,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return (Err(e), keep),
            }
        }
        (Ok(()), keep)
    }

    async fn raw_write_all<K: 'static>(
        &self,
        keep: K,
        ptr: *const u8,
        len: usize,
        off: u64,
        fua: bool,
    ) -> (io::Result<()>, K) {
        if self.in_memory && len < WORKER_MEMORY_WRITE_MIN {
            // SAFETY: the caller guarantees [ptr, ptr+len) stays valid.
            return (unsafe { self.sync_write_all(ptr, len, off, fua) }, keep);
        }
        let sqe_flags = if self.in_memory { squeue::Flags::ASYNC } else { squeue::Flags::empty() };
        let reactor = match Reactor::current() {
            Ok(r) => r,
            Err(e) => return (Err(e), keep),
        };
        let mut done = 0usize;
        let mut keep = keep;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        while done < len {
            let chunk = (len - done).min(MAX_OP_BYTES);
            // SAFETY: within the caller's range.
            let p = unsafe { ptr.add(done) };
            let fd = self.types_fd();
            let o = off + done as u64;
            let op = reactor.start(keep, |_| {
                opcode::Write::new(fd, p, chunk as u32).offset(o).rw_flags(flags).build().flags(sqe_flags)
            });
            let (res, k) = op.await;
            keep = k;
            match res {
                Ok(0) => return (Err(io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes")), keep),
                Ok(n) => done += n as usize,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => return (Err(e), keep),
            }
        }
        (Ok(()), keep)
    }

    /// # Safety
    /// `[ptr, ptr+len)` must be valid for writes.
    unsafe fn sync_read_exact(&self, ptr: *mut u8, len: usize, off: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < len {
            // SAFETY: within the caller's range.
            let n = unsafe {
                libc::pread(self.fd.as_raw_fd(), ptr.add(done).cast(), len - done, (off + done as u64) as libc::off_t)
            };
            match n {
                0 => return Err(short_device(off + done as u64)),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// # Safety
    /// `[ptr, ptr+len)` must be valid for reads.
    unsafe fn sync_write_all(&self, ptr: *const u8, len: usize, off: u64, fua: bool) -> io::Result<()> {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let mut done = 0usize;
        while done < len {
            // SAFETY: within the caller's range.
            let iov = libc::iovec { iov_base: unsafe { ptr.add(done) } as *mut libc::c_void, iov_len: len - done };
            // SAFETY: one valid iovec.
            let n = unsafe { libc::pwritev2(self.fd.as_raw_fd(), &iov, 1, (off + done as u64) as libc::off_t, flags) };
            match n {
                0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes")),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn aligned(&self, ptr: *const u8, len: usize, off: u64) -> bool {
        off.is_multiple_of(self.align)
            && (len as u64).is_multiple_of(self.align)
            && (ptr as usize).is_multiple_of(self.mem_align)
    }

    /// Reads `[off, off+len)` into `buf[buf_off..buf_off+len]`. The range of `buf`
    /// must not be touched by anything else until this returns.
    pub async fn read_at(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.hook(IoKind::Read, off, len as u64).await?;
        let ptr = buf.ptr_at(buf_off);
        if self.aligned(ptr, len, off) {
            return self.raw_read_exact(buf.clone(), ptr, len, off).await.0;
        }
        self.read_unaligned(buf, buf_off, len, off).await
    }

    /// Writes `buf[buf_off..buf_off+len]` at `off`. If the range is not aligned
    /// for this device, the caller must hold the covering aligned range
    /// exclusively (see [`Backend::needs_rmw`]).
    pub async fn write_at(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.hook(IoKind::Write, off, len as u64).await?;
        let ptr = buf.ptr_at(buf_off) as *const u8;
        if self.aligned(ptr, len, off) {
            return self.raw_write_all(buf.clone(), ptr, len, off, fua).await.0;
        }
        // SAFETY: write legs only read the buffer.
        let data = unsafe { buf.slice(buf_off, len) };
        self.write_unaligned(data, off, fua).await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.hook(IoKind::Flush, 0, 0).await?;
        let reactor = Reactor::current()?;
        let fd = self.types_fd();
        let (res, ()) = reactor.start((), |_| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build()).await;
        res.map(|_| ())
    }

    async fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        let reactor = Reactor::current()?;
        let fd = self.types_fd();
        let (res, ()) = reactor.start((), |_| opcode::Fallocate::new(fd, len).offset(off).mode(mode).build()).await;
        res.map(|_| ())
    }

    /// Writes zeroes over `[off, off+len)`. With `may_unmap` the device may
    /// deallocate the range (a hole that reads as zeroes); without it the range
    /// stays provisioned.
    pub async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.hook(IoKind::Zero, off, len).await?;
        let end = off + len;
        // Block devices zero only whole logical blocks; do the edges by writing.
        let gran = if self.kind == LocalKind::BlockDevice { self.align.max(512) } else { 1 };
        let mid_start = off.div_ceil(gran) * gran;
        let mid_end = end / gran * gran;
        if mid_start >= mid_end {
            return self.write_zero_bytes(off, len, fua).await;
        }
        if mid_start > off {
            self.write_zero_bytes(off, mid_start - off, false).await?;
        }
        if end > mid_end {
            self.write_zero_bytes(mid_end, end - mid_end, false).await?;
        }
        let mlen = mid_end - mid_start;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let mut done = false;
        if may_unmap {
            done = self.fallocate(punch, mid_start, mlen).await.is_ok();
        }
        if !done {
            match self.fallocate(zero, mid_start, mlen).await {
                Ok(()) => done = true,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if !done && self.kind == LocalKind::File {
            // tmpfs has no ZERO_RANGE: punch, then allocate again so the range
            // stays provisioned.
            if self.fallocate(punch, mid_start, mlen).await.is_ok()
                && (may_unmap || self.fallocate(libc::FALLOC_FL_KEEP_SIZE, mid_start, mlen).await.is_ok())
            {
                done = true;
            }
        }
        if !done {
            self.write_zero_bytes(mid_start, mlen, false).await?;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroes a range by writing zero-filled buffers.
    async fn write_zero_bytes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = SharedBuf::new(IoBuf::zeroed(CHUNK.min(len) as usize + 2 * self.align as usize));
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(CHUNK) as usize;
            let ptr = zeros.ptr_at(0) as *const u8;
            if self.aligned(ptr, n, pos) {
                let (r, _) = self.raw_write_all(zeros.clone(), ptr, n, pos, fua).await;
                r?;
            } else {
                // SAFETY: `zeros` is only read.
                let data = unsafe { zeros.slice(0, n) };
                self.write_unaligned(data, pos, fua).await?;
            }
            pos += n as u64;
        }
        Ok(())
    }

    /// Discards `[off, off+len)`: a hint; contents afterwards are unspecified.
    pub async fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.hook(IoKind::Discard, off, len).await?;
        match self.kind {
            LocalKind::File => self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len).await,
            LocalKind::BlockDevice => {
                let a = self.align.max(512);
                let s = off.div_ceil(a) * a;
                let e = (off + len) / a * a;
                if s >= e {
                    return Ok(());
                }
                // BLKDISCARD is a blocking ioctl: run it off the I/O thread on a
                // duplicate of our fd.
                let dup = self.fd.try_clone()?;
                tokio::task::spawn_blocking(move || {
                    let range = [s, e - s];
                    // SAFETY: BLKDISCARD reads two u64s.
                    unsafe { ioctl_blkdiscard(dup.as_raw_fd(), &range) }.map(|_| ()).map_err(io::Error::from)
                })
                .await
                .map_err(|e| io::Error::other(format!("discard task failed: {e}")))?
            }
        }
    }

    /// Hints that `[off, off+len)` will be read soon.
    pub async fn prefetch(&self, off: u64, len: u64) -> io::Result<()> {
        if self.direct || len == 0 {
            return Ok(());
        }
        let reactor = Reactor::current()?;
        let fd = self.types_fd();
        let (res, ()) = reactor
            .start((), |_| opcode::Fadvise::new(fd, len as libc::off_t, libc::POSIX_FADV_WILLNEED).offset(off).build())
            .await;
        res.map(|_| ())
    }

    /// Allocation status of `[off, off+len)`, at most `max_extents` extents
    /// (the last one may end early; callers ask again from there).
    pub fn allocation(&self, off: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
        if self.kind == LocalKind::BlockDevice || len == 0 {
            return Ok(vec![Extent { len, hole: false }]);
        }
        // Past the file's current end (a truncated file) nothing is known to be
        // a hole: report data, so a client reads it (and gets the error) rather
        // than skipping it as zeroes.
        let current = self.current_size()?;
        let end = (off + len).min(self.size.max(off)).min(current.max(off));
        if end <= off {
            return Ok(vec![Extent { len, hole: false }]);
        }
        let fd = self.raw_fd();
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < max_extents {
            // SAFETY: plain lseek on a valid fd.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    out.push(Extent { len: end - pos, hole: true });
                    break;
                }
                if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    // No SEEK_DATA on this filesystem: report data.
                    out.push(Extent { len: end - pos, hole: false });
                    break;
                }
                return Err(e);
            }
            let data = (data as u64).min(end);
            if data > pos {
                out.push(Extent { len: data - pos, hole: true });
                pos = data;
                continue;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let hole = (hole as u64).min(end).max(pos + 1);
            out.push(Extent { len: hole - pos, hole: false });
            pos = hole;
        }
        if len > 0 && out.is_empty() {
            out.push(Extent { len: len.min(end.saturating_sub(off)).max(1), hole: false });
        }
        Ok(out)
    }

    /// What identifies this device across restarts (identity.rs): for a file
    /// also its birth time and generation, for a block device what sysfs says.
    pub fn ident(&self) -> DeviceIdent {
        let id = self.identity;
        let (birth, generation) = match self.kind {
            LocalKind::File => (identity::file_birth(self.raw_fd()), identity::file_generation(self.raw_fd())),
            LocalKind::BlockDevice => (None, None),
        };
        let stack = id.rdev.map(|r| identity::block_identity(r, 0)).unwrap_or_default();
        DeviceIdent {
            path: self.path.clone(),
            size: self.size,
            dev: id.dev,
            ino: id.ino,
            rdev: id.rdev.unwrap_or(0),
            birth,
            generation,
            stack: identity::truncate(stack),
        }
    }
}

/// The transfers read-modify-write is built on (`rmw.rs`): straight to the
/// ring, without the test hooks (the caller's operation passed them already).
impl AlignedIo for LocalDevice {
    fn transfer_alignment(&self) -> u64 {
        self.align
    }

    async fn read_aligned(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        self.raw_read_exact(buf.clone(), buf.ptr_at(buf_off), len, off).await.0
    }

    async fn write_aligned(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()> {
        self.raw_write_all(buf.clone(), buf.ptr_at(buf_off) as *const u8, len, off, fua).await.0
    }
}

/// The error for a read that found the end of the device at `at`.
fn short_device(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the device ends at or before byte {at}, inside the range read (truncated or shrunk?)"),
    )
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV) | Some(libc::ENOSYS))
}
