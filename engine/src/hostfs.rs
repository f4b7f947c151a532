//! Paths as the rest of the system sees them.
//!
//! A daemon started in an initramfs keeps the initramfs as its root after
//! `switch_root`. The usual switch_root moves `/dev`, `/proc`, `/sys` and `/run`
//! into the new root and empties the initramfs, so afterwards none of the paths
//! a user names (`/dev/sdb`, `/run/livemirror/state`) exist in the daemon's own
//! root, and neither does `/proc` to look them up through `/proc/PID/root`.
//!
//! The daemon therefore makes procfs its working directory at start
//! ([`enter_proc_cwd`]); the moved mount keeps working, and a relative path
//! `PID/root/dev/sdb` reaches any process's view of the file system from then
//! on. Every path the daemon opens, creates, binds or removes goes through
//! [`locate`], which picks the view: the caller's (for `attach`), our own if the
//! path exists there, else PID 1's (the running system's). Paths given to the
//! daemon are always absolute, so the unusual working directory changes nothing
//! else.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

static PROC_CWD: AtomicBool = AtomicBool::new(false);

const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Makes procfs the working directory, if `/proc` is a procfs. Idempotent; a
/// process without procfs keeps its working directory and resolves paths in
/// its own root only.
pub fn enter_proc_cwd() -> io::Result<()> {
    if PROC_CWD.load(Ordering::SeqCst) {
        return Ok(());
    }
    // A daemon started by one that already runs this way (`livemirror
    // upgrade` after a switch_root) inherits procfs as its working directory
    // and may have no /proc in its root at all.
    if nix::sys::statfs::statfs(".").is_ok_and(|st| st.filesystem_type().0 == PROC_SUPER_MAGIC) {
        PROC_CWD.store(true, Ordering::SeqCst);
        return Ok(());
    }
    let st = nix::sys::statfs::statfs("/proc").map_err(io::Error::from)?;
    if st.filesystem_type().0 as i64 != PROC_SUPER_MAGIC {
        return Err(io::Error::new(io::ErrorKind::NotFound, "/proc is not a procfs"));
    }
    std::env::set_current_dir("/proc")?;
    PROC_CWD.store(true, Ordering::SeqCst);
    Ok(())
}

/// A path into procfs (`rel` is relative to its root, e.g. `self/fd`).
pub fn proc_path(rel: &str) -> PathBuf {
    if PROC_CWD.load(Ordering::SeqCst) {
        PathBuf::from(rel)
    } else {
        Path::new("/proc").join(rel)
    }
}

fn root_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// `pid`'s root directory, if it differs from ours (and is reachable).
fn foreign_root(pid: u32) -> Option<PathBuf> {
    let root = proc_path(&format!("{pid}/root"));
    let theirs = root_id(&root)?;
    (Some(theirs) != root_id(Path::new("/"))).then_some(root)
}

fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Where the absolute path `abs` is reached from here: through `viewer`'s root
/// when it differs from ours (`attach` names the target as its caller sees
/// it), else in our root if the path (or, for a path about to be created, its
/// directory) exists there, else through PID 1's root.
pub fn locate(abs: &Path, viewer: Option<u32>) -> PathBuf {
    if let Some(root) = viewer.and_then(foreign_root) {
        return under(&root, abs);
    }
    let pid1 = foreign_root(1);
    let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
    if exists(abs) {
        return abs.to_path_buf();
    }
    if let Some(root) = &pid1 {
        let theirs = under(root, abs);
        if exists(&theirs) {
            return theirs;
        }
    }
    if let Some(dir) = abs.parent() {
        if !exists(dir) {
            if let Some(root) = &pid1 {
                if exists(&under(root, dir)) {
                    return under(root, abs);
                }
            }
        }
    }
    abs.to_path_buf()
}

/// A sysfs path (`rel` relative to `/sys`), in whichever view has sysfs.
pub fn sys_path(rel: &str) -> PathBuf {
    let ours = Path::new("/sys").join(rel);
    if Path::new("/sys/dev").exists() {
        return ours;
    }
    foreign_root(1).map(|r| under(&r, &ours)).unwrap_or(ours)
}

/// Joins a symlink's target onto the directory holding the link, removing `..`
/// lexically (right for sysfs, whose directories are not symlinks).
pub fn join_link(dir: &Path, target: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in dir.join(target).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_prefers_our_root_for_existing_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("x");
        std::fs::write(&f, b"1").expect("write");
        assert_eq!(locate(&f, None), f);
        // A path to be created resolves where its directory exists: ours.
        let g = dir.path().join("new.sock");
        assert_eq!(locate(&g, None), g);
        // A viewer sharing our root changes nothing.
        assert_eq!(locate(&f, Some(std::process::id())), f);
    }

    #[test]
    fn link_targets_join_lexically() {
        assert_eq!(
            join_link(Path::new("/sys/dev/block"), Path::new("../../devices/virtual/block/loop0")),
            PathBuf::from("/sys/devices/virtual/block/loop0")
        );
        assert_eq!(
            join_link(Path::new("1/root/sys/dev/block"), Path::new("../../devices/pci/sda/sda1")),
            PathBuf::from("1/root/sys/devices/pci/sda/sda1")
        );
    }
}
