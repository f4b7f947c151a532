//! Refuses a target that is the source or that the source is built on: writing
//! it would destroy the data being copied.
//!
//! "Built on" follows the kernel's view in sysfs: the slaves of a device-mapper
//! or md device (recursively), the backing file of a loop device, the filesystem
//! a source file lives on, and whole disks versus their partitions.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::backend::{Backend, Identity};
use crate::error::{Error, Result};
use crate::sysfs::{parse_dev, sysfs_dir, whole_disk};

/// What a source depends on: block devices (by number) and files (dev, ino).
#[derive(Default, Debug)]
pub struct Underlying {
    pub devices: HashSet<u64>,
    pub files: HashSet<(u64, u64)>,
}

fn add_device(dev: u64, out: &mut Underlying, depth: usize) {
    if depth > 16 || !out.devices.insert(dev) {
        return;
    }
    let dir = sysfs_dir(dev);
    if let Ok(entries) = fs::read_dir(dir.join("slaves")) {
        for e in entries.flatten() {
            if let Some(d) = fs::read_to_string(e.path().join("dev")).ok().and_then(|s| parse_dev(&s)) {
                add_device(d, out, depth + 1);
            }
        }
    }
    if let Ok(backing) = fs::read_to_string(dir.join("loop/backing_file")) {
        add_file(Path::new(backing.trim()), out, depth + 1);
    }
}

fn add_file(path: &Path, out: &mut Underlying, depth: usize) {
    if let Ok(m) = fs::metadata(crate::hostfs::locate(path, None)) {
        out.files.insert((m.dev(), m.ino()));
        add_device(m.dev(), out, depth + 1);
    }
}

/// Everything `source` is built on, itself included.
pub fn underlying(source: &Identity) -> Underlying {
    let mut out = Underlying::default();
    out.files.insert((source.dev, source.ino));
    match source.rdev {
        Some(rdev) => add_device(rdev, &mut out, 0),
        None => add_device(source.dev, &mut out, 0),
    }
    out
}

/// Refuses `target` if it is `source` or something `source` is built on.
pub fn check_target_is_independent(source: &Backend, target: &Backend) -> Result<()> {
    // A remote device is built on nothing local, and nothing local on it.
    let Some(t) = target.identity() else { return Ok(()) };
    // An overlay is made of its base and its file: the target may be neither.
    for s in source.identities() {
        check_one(source, s, target, t)?;
    }
    Ok(())
}

fn check_one(source: &Backend, s: Identity, target: &Backend, t: Identity) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::Refused(format!(
            "refusing target {}: {why} (source {})",
            target.path().display(),
            source.path().display()
        )))
    };
    if (s.dev, s.ino) == (t.dev, t.ino) || (s.rdev.is_some() && s.rdev == t.rdev) {
        return refuse("it is the source itself");
    }
    let under = underlying(&s);
    if under.files.contains(&(t.dev, t.ino)) {
        return refuse("the source is built on it");
    }
    // The other way round: a target built on the source (a loop device over the
    // source file, a dm device on top of it) would write into the source.
    let over = underlying(&t);
    if over.files.contains(&(s.dev, s.ino)) || s.rdev.is_some_and(|r| over.devices.contains(&r)) {
        return refuse("it is built on the source");
    }
    if let Some(trdev) = t.rdev {
        if under.devices.contains(&trdev) {
            return refuse("the source is built on it");
        }
        let tdisk = whole_disk(trdev);
        for &d in &under.devices {
            // A whole-disk target containing a partition the source uses, or a
            // partition target of a whole disk the source uses.
            if (tdisk == trdev && whole_disk(d) == trdev && d != trdev) || (d == tdisk && tdisk != trdev) {
                return refuse("it overlaps a device the source is built on");
            }
        }
    }
    Ok(())
}
