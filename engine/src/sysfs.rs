//! The kernel's view of block devices in sysfs: device numbers, a device's
//! directory, the whole disk of a partition. Used to tell what a device is
//! built on (stacking.rs) and what identifies it (identity.rs).

use std::fs;
use std::path::PathBuf;

pub(crate) fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}
pub(crate) fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}
pub(crate) fn makedev(ma: u64, mi: u64) -> u64 {
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

pub(crate) fn sysfs_dir(dev: u64) -> PathBuf {
    crate::hostfs::sys_path(&format!("dev/block/{}:{}", major(dev), minor(dev)))
}

pub(crate) fn parse_dev(s: &str) -> Option<u64> {
    let (a, b) = s.trim().split_once(':')?;
    Some(makedev(a.parse().ok()?, b.parse().ok()?))
}

/// The whole disk a partition belongs to (itself for a whole disk).
pub(crate) fn whole_disk(dev: u64) -> u64 {
    let dir = sysfs_dir(dev);
    if dir.join("partition").exists() {
        // dev/block/M:m links to devices/.../disk/partition.
        if let (Ok(link), Some(links)) = (fs::read_link(&dir), dir.parent()) {
            let real = crate::hostfs::join_link(links, &link);
            if let Some(parent) = real.parent() {
                if let Some(d) = fs::read_to_string(parent.join("dev")).ok().and_then(|s| parse_dev(&s)) {
                    return d;
                }
            }
        }
    }
    dev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_round_trip() {
        for (ma, mi) in [(8, 1), (253, 0), (259, 65536), (7, 3)] {
            let d = makedev(ma, mi);
            assert_eq!((major(d), minor(d)), (ma, mi));
        }
        assert_eq!(parse_dev("253:4\n"), Some(makedev(253, 4)));
        assert_eq!(parse_dev("junk"), None);
    }
}
