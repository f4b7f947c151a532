//! What identifies a device across restarts, so that a resumed sync never
//! trusts a disk that is not the one it was copying to.
//!
//! A path names whatever is there now, and device and inode numbers are reused:
//! ext4 hands a new file the inode number of one just deleted, and a loop
//! device keeps its number when it is pointed at another image. So the
//! identity also holds what changes when the thing behind the path is replaced:
//!
//! - files: the birth time (statx) and the inode generation (FS_IOC_GETVERSION),
//!   both new for every file created, where the filesystem has them;
//! - block devices: what sysfs says about the device itself — the disk's serial
//!   and WWID, a partition's number and start plus its disk's identity, a dm
//!   device's UUID and name, an md array's UUID, a loop device's backing file
//!   (with that file's own identity) and offset.
//!
//! A field that one side does not know is not compared (an older state file,
//! a filesystem without birth times). Identity cannot prove the contents are
//! the same; the resume also compares samples of the copied regions (startup.rs).

use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sysfs::{sysfs_dir, whole_disk};

/// Longest stack description kept (sysfs strings are short; this bounds a
/// hostile state file too).
pub const MAX_STACK: usize = 1024;

/// What identifies a device across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdent {
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    /// Device number of a block device (0 for a file).
    pub rdev: u64,
    /// Birth time of a file (seconds, nanoseconds), where the filesystem records it.
    pub birth: Option<(i64, u32)>,
    /// Inode generation of a file, where the filesystem has one.
    pub generation: Option<u64>,
    /// What sysfs says identifies a block device (empty: nothing known).
    pub stack: String,
}

impl DeviceIdent {
    /// Why `other` (what is there now) is not the device recorded as `self`, or `None`.
    pub fn differs(&self, other: &DeviceIdent) -> Option<String> {
        let now = other.path.display();
        let was = self.path.display();
        let same_number = if self.rdev != 0 || other.rdev != 0 {
            self.rdev == other.rdev
        } else {
            (self.dev, self.ino) == (other.dev, other.ino)
        };
        if !same_number {
            return Some(format!(
                "{now} is not the device recorded as {was} (device {:#x}/{:#x} inode {} vs {:#x}/{:#x} inode {})",
                other.rdev, other.dev, other.ino, self.rdev, self.dev, self.ino
            ));
        }
        if let (Some(a), Some(b)) = (self.birth, other.birth) {
            if a != b {
                return Some(format!(
                    "{now} was created at {}.{:09}, but the file recorded as {was} at {}.{:09}: it was replaced",
                    b.0, b.1, a.0, a.1
                ));
            }
        }
        if let (Some(a), Some(b)) = (self.generation, other.generation) {
            if a != b {
                return Some(format!(
                    "{now} has inode generation {b}, the file recorded as {was} had {a}: it was replaced"
                ));
            }
        }
        // An overlay's stack names the overlay itself: one side with an overlay
        // and the other without is another device even where the other side
        // knows nothing (a plain file records no stack).
        let overlay = is_overlay(&self.stack) || is_overlay(&other.stack);
        if ((!self.stack.is_empty() && !other.stack.is_empty()) || overlay) && self.stack != other.stack {
            return Some(format!(
                "{now} is now [{}], but the device recorded as {was} was [{}]: it was replaced or re-pointed",
                other.stack, self.stack
            ));
        }
        if self.size != other.size {
            return Some(format!("{now} is {} bytes, but the state file recorded {} bytes", other.size, self.size));
        }
        None
    }
}

fn is_overlay(stack: &str) -> bool {
    stack.starts_with("overlay ")
}

pub(crate) fn truncate(mut s: String) -> String {
    if s.len() > MAX_STACK {
        let mut end = MAX_STACK;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

pub(crate) fn file_birth(fd: RawFd) -> Option<(i64, u32)> {
    // SAFETY: statx is plain data; the kernel fills it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out pointer.
    let r = unsafe { libc::statx(fd, empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_BTIME, &mut stx) };
    (r == 0 && stx.stx_mask & libc::STATX_BTIME != 0).then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec))
}

nix::ioctl_read!(ioctl_getversion, b'v', 1, libc::c_long);

pub(crate) fn file_generation(fd: RawFd) -> Option<u64> {
    let mut g: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes one long; unsupported filesystems fail.
    unsafe { ioctl_getversion(fd, &mut g) }.ok().map(|_| g as u64)
}

fn read_attr(dir: &Path, name: &str) -> Option<String> {
    let v = std::fs::read_to_string(dir.join(name)).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// What sysfs says identifies block device `rdev` (see the module docs).
pub(crate) fn block_identity(rdev: u64, depth: usize) -> String {
    let dir = sysfs_dir(rdev);
    let mut out = String::new();
    for (label, attr) in [
        ("serial", "serial"),
        ("serial", "device/serial"),
        ("wwid", "wwid"),
        ("wwid", "device/wwid"),
        ("dm-uuid", "dm/uuid"),
        ("dm-name", "dm/name"),
        ("md-uuid", "md/uuid"),
        ("loop-offset", "loop/offset"),
    ] {
        if let Some(v) = read_attr(&dir, attr) {
            let _ = write!(out, "{}{label}={v}", if out.is_empty() { "" } else { " " });
        }
    }
    if let Some(backing) = read_attr(&dir, "loop/backing_file") {
        let path = Path::new(&backing);
        let meta = std::fs::metadata(crate::hostfs::locate(path, None)).ok();
        let born = std::fs::File::open(crate::hostfs::locate(path, None))
            .ok()
            .and_then(|f| file_birth(std::os::fd::AsRawFd::as_raw_fd(&f)));
        let _ = write!(out, " loop={backing}");
        if let Some(m) = meta {
            let _ = write!(out, " loop-file={:#x}:{}", m.dev(), m.ino());
        }
        if let Some((s, ns)) = born {
            let _ = write!(out, " loop-born={s}.{ns:09}");
        }
    }
    if let (Some(part), Some(start)) = (read_attr(&dir, "partition"), read_attr(&dir, "start")) {
        let _ = write!(out, " part={part}@{start}");
        let disk = whole_disk(rdev);
        if disk != rdev && depth == 0 {
            let d = block_identity(disk, depth + 1);
            if !d.is_empty() {
                let _ = write!(out, " disk=[{d}]");
            }
        }
    }
    out.trim_start().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> DeviceIdent {
        DeviceIdent {
            path: "/a".into(),
            size: 10,
            dev: 1,
            ino: 2,
            rdev: 0,
            birth: Some((100, 5)),
            generation: Some(7),
            stack: String::new(),
        }
    }

    #[test]
    fn a_file_recreated_with_the_same_inode_number_is_another_file() {
        let a = ident();
        assert!(a.differs(&a.clone()).is_none());
        assert!(a.differs(&DeviceIdent { path: "/b".into(), ..a.clone() }).is_none(), "a rename is the same file");
        let reborn = DeviceIdent { birth: Some((101, 0)), ..a.clone() };
        assert!(a.differs(&reborn).unwrap().contains("replaced"));
        let regen = DeviceIdent { generation: Some(8), ..a.clone() };
        assert!(a.differs(&regen).unwrap().contains("generation"));
        assert!(a.differs(&DeviceIdent { ino: 3, ..a.clone() }).is_some());
        assert!(a.differs(&DeviceIdent { size: 11, ..a.clone() }).unwrap().contains("11 bytes"));
    }

    #[test]
    fn unknown_fields_are_not_compared() {
        let a = ident();
        let old = DeviceIdent { birth: None, generation: None, ..a.clone() };
        assert!(old.differs(&a).is_none(), "a state file without birth times still matches");
        assert!(a.differs(&old).is_none());
    }

    #[test]
    fn a_block_device_re_pointed_elsewhere_differs_by_its_stack() {
        let a = DeviceIdent { rdev: 0x700, stack: "loop=/img/a loop-file=0x10:5".into(), ..ident() };
        let b = DeviceIdent { stack: "loop=/img/b loop-file=0x10:6".into(), ..a.clone() };
        assert!(a.differs(&b).unwrap().contains("re-pointed"));
        assert!(a.differs(&DeviceIdent { stack: String::new(), ..a.clone() }).is_none());
    }

    #[test]
    fn files_on_this_machine_get_a_birth_time() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").expect("write");
        let f = std::fs::File::open(&p).expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        assert!(file_birth(fd).is_some(), "statx reports no birth time on /var/tmp");
    }
}
