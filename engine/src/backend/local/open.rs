//! Opening a local device: the flags, the exclusive claim, O_DIRECT and its
//! alignment, and the wait for a killed predecessor's I/O to drain.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::LocalKind;
use super::{ioctl_blkgetsize64, ioctl_blksszget, LocalDevice};
use crate::backend::{CacheMode, Identity, LockMode, OpenOptions};
use crate::error::{Error, IoContext, Result};

impl LocalDevice {
    /// Opens `path` as a backend. Errors name the path and say what failed.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<LocalDevice> {
        Self::open_as(path, None, opts)
    }

    /// Opens a path as seen by process `viewer` (its root directory), falling
    /// back to PID 1's view. A daemon started in an initrd keeps the initrd as
    /// its root after switch_root, where /dev paths of the real system do not
    /// resolve; the caller of `attach` and PID 1 see them.
    pub fn open_as(path: &Path, viewer: Option<u32>, opts: &OpenOptions) -> Result<LocalDevice> {
        let abs = std::path::absolute(path).ctx(|| format!("bad path {}", path.display()))?;
        let actual = crate::hostfs::locate(&abs, viewer);
        let mut b = Self::open_resolved(&actual, &abs, opts)?;
        b.path = abs;
        Ok(b)
    }

    fn open_resolved(path: &Path, shown: &Path, opts: &OpenOptions) -> Result<LocalDevice> {
        let meta = std::fs::metadata(path).ctx(|| format!("cannot open {}", shown.display()))?;
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            LocalKind::BlockDevice
        } else if ft.is_file() {
            LocalKind::File
        } else {
            return Err(Error::Refused(format!("{} is neither a regular file nor a block device", shown.display())));
        };
        let mut flags = if opts.writable { libc::O_RDWR } else { libc::O_RDONLY };
        if kind == LocalKind::BlockDevice && opts.lock != LockMode::None {
            // The kernel's exclusive claim: fails while the device is mounted or
            // held by another O_EXCL opener (dm, md, another livemirror).
            flags |= libc::O_EXCL;
        }
        // Auto: O_DIRECT everywhere but on files in RAM, where it buys nothing and
        // costs read-modify-writes (copying an image file on a disk filesystem
        // ran 4-5x faster direct than through the page cache: docs/decisions.md).
        let mut want_direct = match opts.cache {
            CacheMode::Auto => kind == LocalKind::BlockDevice || !path_in_memory(path),
            CacheMode::Direct => true,
            CacheMode::Buffered => false,
        };
        let started = Instant::now();
        let mut warned = false;
        let fd = loop {
            let attempt = open_raw(path, flags | if want_direct { libc::O_DIRECT } else { 0 });
            match attempt {
                Ok(fd) => match opts.lock {
                    LockMode::None => break fd,
                    _ => match try_flock(fd.as_raw_fd()) {
                        Ok(true) => break fd,
                        Ok(false) if opts.lock == LockMode::Wait => {}
                        Ok(false) => {
                            return Err(Error::Refused(format!(
                                "{} is in use by another process (exclusive lock held)",
                                shown.display()
                            )))
                        }
                        Err(e) => return Err(Error::io(format!("cannot lock {}", shown.display()), e)),
                    },
                },
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if opts.lock != LockMode::Wait {
                        return Err(Error::Refused(format!(
                            "{} is busy (mounted, or held exclusively by another process)",
                            shown.display()
                        )));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && want_direct => {
                    if opts.cache != CacheMode::Auto {
                        return Err(Error::io(format!("{} does not support O_DIRECT", shown.display()), e));
                    }
                    // A filesystem without O_DIRECT: the page cache it is.
                    tracing::debug!("{}: no O_DIRECT here; using the page cache", shown.display());
                    want_direct = false;
                    continue;
                }
                Err(e) => {
                    let what = if opts.writable { "for writing" } else { "for reading" };
                    return Err(Error::io(format!("cannot open {} {what}", shown.display()), e));
                }
            }
            if !warned && started.elapsed() > Duration::from_secs(1) {
                tracing::warn!("waiting for exclusive access to {} (another process holds it)", shown.display());
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let st = fstat(fd.as_raw_fd()).ctx(|| format!("cannot stat {}", shown.display()))?;
        let (size, mut align, mut mem_align) = match kind {
            LocalKind::BlockDevice => {
                let mut size = 0u64;
                // SAFETY: BLKGETSIZE64 writes one u64.
                unsafe { ioctl_blkgetsize64(fd.as_raw_fd(), &mut size) }
                    .map_err(io::Error::from)
                    .ctx(|| format!("cannot read the size of {}", shown.display()))?;
                let mut lbs: libc::c_int = 512;
                // SAFETY: BLKSSZGET writes one int.
                unsafe { ioctl_blksszget(fd.as_raw_fd(), &mut lbs) }
                    .map_err(io::Error::from)
                    .ctx(|| format!("cannot read the block size of {}", shown.display()))?;
                let lbs = lbs.max(512) as u64;
                (size, lbs, lbs as usize)
            }
            LocalKind::File => {
                let (m, a) = file_dio_align(fd.as_raw_fd());
                (st.st_size as u64, a, m)
            }
        };
        let mut direct = want_direct;
        let mut fd = fd;
        if direct && kind == LocalKind::File && size % align != 0 {
            // The last partial block could only be written by extending the file.
            let why = format!(
                "{}: size {size} is not a multiple of the O_DIRECT alignment {align}; using the page cache",
                shown.display()
            );
            if opts.cache == CacheMode::Direct {
                tracing::warn!("{why}");
            } else {
                tracing::debug!("{why}");
            }
            let buffered = open_raw(path, if opts.writable { libc::O_RDWR } else { libc::O_RDONLY })
                .ctx(|| format!("cannot reopen {}", shown.display()))?;
            if opts.lock != LockMode::None {
                // Same process, so this is an upgrade of our own lock, not a wait.
                drop(fd);
                try_flock(buffered.as_raw_fd()).ctx(|| format!("cannot lock {}", shown.display()))?;
            }
            fd = buffered;
            direct = false;
        }
        if !direct {
            align = 1;
            mem_align = 1;
        }
        let identity =
            Identity { dev: st.st_dev, ino: st.st_ino, rdev: (kind == LocalKind::BlockDevice).then_some(st.st_rdev) };
        let in_memory = kind == LocalKind::File && is_in_memory(fd.as_raw_fd());
        Ok(LocalDevice {
            fd,
            path: path.to_path_buf(),
            kind,
            size,
            direct,
            align,
            mem_align,
            identity,
            writable: opts.writable,
            in_memory,
            #[cfg(feature = "testing")]
            hooks: None,
        })
    }
}

/// True if `path` is on a filesystem in RAM (tmpfs, ramfs).
fn path_in_memory(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs is plain data; statfs(2) fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    is_memory_fs(&st)
}

fn is_memory_fs(st: &libc::statfs) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // f_type's width differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    matches!(magic, TMPFS_MAGIC | RAMFS_MAGIC)
}

fn is_in_memory(fd: RawFd) -> bool {
    // SAFETY: statfs is plain data; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    is_memory_fs(&st)
}

fn open_raw(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: valid C string; the returned fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// O_DIRECT alignment (memory, offset) of a regular file, from statx when the
/// kernel reports it.
fn file_dio_align(fd: RawFd) -> (usize, u64) {
    // SAFETY: statx is plain data.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out pointer.
    let r = unsafe { libc::statx(fd, empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        (stx.stx_dio_mem_align.max(1) as usize, stx.stx_dio_offset_align as u64)
    } else {
        (4096, 4096)
    }
}

fn try_flock(fd: RawFd) -> io::Result<bool> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}
