//! The state file's on-disk format (`serve --state FILE`): what one slot holds,
//! how it is encoded and checked, and the two-slot file that is updated in place.
//! What is written when, and why that ordering is crash-safe, is the journal's
//! (journal.rs).
//!
//! # Layout
//! Two slots, written alternately; the valid one with the higher sequence
//! number wins, so a torn or interrupted write leaves the previous state:
//!
//! ```text
//! 0      header of slot 0 (4 KiB)
//! 4096   header of slot 1 (4 KiB)
//! 8192   bitmaps of slot 0 (area_size bytes)
//! 8192+area_size   bitmaps of slot 1
//! ```
//!
//! A header holds the magic, format version, area size, sequence number, region
//! size, device state, export size, region count, the identities of S and T
//! (identity.rs) and the CRC32 of its bitmaps; it ends with the CRC32 of itself.
//! The bitmaps are clean, intent, discarded and unverifiable, as little-endian
//! u64 words. A slot is written bitmaps first, header second, then fdatasync: a
//! slot whose header is intact but whose bitmaps are not fails the bitmap CRC.
//! When the bitmap size changes (grow), a complete new file is written next to
//! the old one and renamed over it. How a slot is encoded and checked: codec.rs.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bitvec::prelude::*;

use crate::backend::Backend;
pub use crate::identity::DeviceIdent;
use crate::regions::Bits;
use crate::state::DeviceState;

mod codec;

pub use codec::Corruption;
use codec::{area_size, bits_from, decode_header, encode_area, encode_header, words};

/// Each slot's header takes this much of the file's start.
const HEADER_SIZE: u64 = 4096;
const AREAS_START: u64 = 2 * HEADER_SIZE;

/// Copy settings that survive a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Bytes per second; 0 = unlimited.
    pub max_rate: u64,
    /// The floor while clients are busy.
    pub min_rate: u64,
    pub paused: bool,
}

/// One decoded slot.
#[derive(Debug, Clone, PartialEq)]
pub struct StateImage {
    pub seq: u64,
    pub state: DeviceState,
    pub region_shift: u32,
    pub export_size: u64,
    pub source: Option<DeviceIdent>,
    pub target: Option<DeviceIdent>,
    /// The copy settings changed at runtime (`set-rate`, `pause`, the floor
    /// rate), so a restart keeps them. `None` in a version 1 file.
    pub settings: Option<Settings>,
    pub clean: Bits,
    pub intent: Bits,
    pub discarded: Bits,
    pub unverifiable: Bits,
}

impl StateImage {
    pub fn regions(&self) -> usize {
        self.clean.len()
    }
}

/// Why no slot of a state file could be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// The whole file (e.g. empty), or each slot's reason.
    pub file: Option<&'static str>,
    pub slots: Vec<(u64, Corruption)>,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = self.file {
            return f.write_str(why);
        }
        let parts: Vec<String> = self.slots.iter().map(|(s, c)| format!("slot {s}: {c}")).collect();
        f.write_str(&parts.join("; "))
    }
}

/// What reading a state file found.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Valid(Box<StateImage>),
    /// Neither slot is intact; the reasons for each.
    Corrupt(Unusable),
}

/// Reads the newest intact slot of `path`.
pub fn load(path: &Path) -> io::Result<Loaded> {
    let f = match File::open(crate::hostfs::locate(path, None)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    Ok(decode(f.metadata()?.len(), |buf, at| f.read_exact_at(buf, at)))
}

/// The newest intact slot of a state file of `len` bytes, read through
/// `read_at` (fills the buffer from that offset or fails): the file, or bytes
/// in memory (the fuzz target).
pub fn decode(len: u64, read_at: impl Fn(&mut [u8], u64) -> io::Result<()>) -> Loaded {
    if len == 0 {
        return Loaded::Corrupt(Unusable { file: Some("the file is empty"), slots: Vec::new() });
    }
    let mut best: Option<StateImage> = None;
    let mut why: Vec<(u64, Corruption)> = Vec::new();
    for slot in 0..2u64 {
        let mut hb = vec![0u8; HEADER_SIZE as usize];
        if read_at(&mut hb, slot * HEADER_SIZE).is_err() {
            why.push((slot, Corruption::Truncated));
            continue;
        }
        let h = match decode_header(&hb) {
            Ok(h) => h,
            Err(e) => {
                why.push((slot, e));
                continue;
            }
        };
        // The sizes come from the file: check them against its length before
        // allocating anything of that size.
        let area_end = h.area_size.checked_mul(slot + 1).and_then(|n| n.checked_add(AREAS_START));
        if area_end.is_none_or(|end| end > len) {
            why.push((slot, Corruption::BitmapsTruncated(h.area_size)));
            continue;
        }
        let mut area = vec![0u8; h.area_size as usize];
        if read_at(&mut area, AREAS_START + slot * h.area_size).is_err() {
            why.push((slot, Corruption::BitmapsTruncated(h.area_size)));
            continue;
        }
        if crc32fast::hash(&area) != h.area_crc && !cfg!(fuzzing) {
            why.push((slot, Corruption::BitmapCrc));
            continue;
        }
        let w = words(h.regions) * 8;
        let img = StateImage {
            seq: h.seq,
            state: h.state,
            region_shift: h.region_shift,
            export_size: h.export_size,
            source: h.source,
            target: h.target,
            settings: h.settings,
            clean: bits_from(&area[..w], h.regions),
            intent: bits_from(&area[w..2 * w], h.regions),
            discarded: bits_from(&area[2 * w..3 * w], h.regions),
            unverifiable: bits_from(&area[3 * w..4 * w], h.regions),
        };
        if best.as_ref().is_none_or(|b| img.seq > b.seq) {
            best = Some(img);
        }
    }
    match best {
        Some(img) => Loaded::Valid(Box::new(img)),
        None => Loaded::Corrupt(Unusable { file: None, slots: why }),
    }
}

/// The open state file: writes slots alternately.
pub struct StateFile {
    path: PathBuf,
    file: File,
    area_size: u64,
    last_seq: u64,
}

impl StateFile {
    /// Creates or rewrites `path` holding `img` in both slots (written to a new
    /// file and renamed over the old one).
    pub fn create(logical: &Path, img: &StateImage) -> io::Result<StateFile> {
        // Resolved at every creation: a grow recreates the file after the
        // switch_root (see hostfs).
        let located = crate::hostfs::locate(logical, None);
        let path = located.as_path();
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.new",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "state".into())
        ));
        let area = encode_area(img);
        let header = encode_header(img, &area);
        {
            let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&tmp)?;
            f.write_all_at(&header, 0)?;
            f.write_all_at(&header, HEADER_SIZE)?;
            f.write_all_at(&area, AREAS_START)?;
            f.write_all_at(&area, AREAS_START + area.len() as u64)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()?;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(StateFile { path: logical.to_path_buf(), file, area_size: area.len() as u64, last_seq: img.seq })
    }

    /// Opens an existing, valid state file for further updates.
    pub fn open(path: &Path, img: &StateImage) -> io::Result<StateFile> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(crate::hostfs::locate(path, None))?;
        Ok(StateFile { path: path.to_path_buf(), file, area_size: area_size(img.regions()), last_seq: img.seq })
    }

    /// Writes `img` (its `seq` must be newer) into the older slot and syncs.
    pub fn write(&mut self, img: &StateImage) -> io::Result<()> {
        let area = encode_area(img);
        if area.len() as u64 != self.area_size {
            let fresh = StateFile::create(&self.path, img)?;
            *self = fresh;
            return Ok(());
        }
        let header = encode_header(img, &area);
        let slot = img.seq % 2;
        self.file.write_all_at(&area, AREAS_START + slot * self.area_size)?;
        self.file.write_all_at(&header, slot * HEADER_SIZE)?;
        self.file.sync_data()?;
        self.last_seq = img.seq;
        Ok(())
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

/// An empty image for a fresh device.
pub fn fresh_image(
    state: DeviceState,
    shift: u32,
    export_size: u64,
    source: Option<&Backend>,
    target: Option<&Backend>,
) -> StateImage {
    let n = export_size.div_ceil(1 << shift) as usize;
    StateImage {
        seq: 1,
        state,
        region_shift: shift,
        export_size,
        source: source.map(Backend::ident),
        target: target.map(Backend::ident),
        settings: None,
        clean: bitvec![u64, Lsb0; 0; n],
        intent: bitvec![u64, Lsb0; 0; n],
        discarded: bitvec![u64, Lsb0; 0; n],
        unverifiable: bitvec![u64, Lsb0; 0; n],
    }
}

#[cfg(test)]
mod tests {
    use super::codec::{header_fields, seal_header, Enc, IDENT_V1, MAGIC, MAX_PATH};
    use super::*;

    fn image(seq: u64, regions_bytes: u64) -> StateImage {
        let mut img = fresh_image(DeviceState::Syncing, 16, regions_bytes, None, None);
        img.seq = seq;
        img.source = Some(DeviceIdent {
            path: "/dev/mapper/live-rw".into(),
            size: regions_bytes,
            dev: 5,
            ino: 6,
            rdev: 0xfd00,
            birth: None,
            generation: None,
            stack: "dm-name=live-rw".into(),
        });
        img.target = Some(DeviceIdent {
            path: "/dev/sda1".into(),
            size: regions_bytes * 2,
            dev: 5,
            ino: 7,
            rdev: 0x801,
            birth: Some((1_700_000_000, 123)),
            generation: Some(99),
            stack: String::new(),
        });
        for i in (0..img.regions()).step_by(3) {
            img.clean.set(i, true);
        }
        img.settings = Some(Settings { max_rate: 40 << 20, min_rate: 8 << 20, paused: true });
        img.intent.set(1, true);
        img.discarded.set(2, true);
        let last = img.regions() - 1;
        img.unverifiable.set(last, true);
        img
    }

    #[test]
    fn round_trip_and_newest_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(1, (1 << 20) * 100 + 12345);
        let mut f = StateFile::create(&p, &a).unwrap();
        let Loaded::Valid(got) = load(&p).unwrap() else { panic!("valid") };
        assert_eq!(*got, a);
        let mut b = image(2, (1 << 20) * 100 + 12345);
        b.clean.fill(true);
        b.state = DeviceState::Synced;
        f.write(&b).unwrap();
        let Loaded::Valid(got) = load(&p).unwrap() else { panic!("valid") };
        assert_eq!(*got, b);
    }

    #[test]
    fn torn_newest_slot_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(1, 64 << 20);
        let mut f = StateFile::create(&p, &a).unwrap();
        let mut b = image(2, 64 << 20);
        b.clean.fill(true);
        f.write(&b).unwrap();
        // Slot 0 holds seq 2: corrupt one byte of its bitmaps (a torn write).
        let raw = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0x5a], AREAS_START + 5).unwrap();
        let Loaded::Valid(got) = load(&p).unwrap() else { panic!("the older slot is still valid") };
        assert_eq!(got.seq, 1);
        assert_eq!(*got, StateImage { seq: 1, ..a.clone() });
        // Now break slot 1's header too: nothing is trusted.
        raw.write_all_at(&[0x77], HEADER_SIZE + 21).unwrap();
        let Loaded::Corrupt(why) = load(&p).unwrap() else { panic!("both slots are broken") };
        let why = why.to_string();
        assert!(why.contains("slot 0") && why.contains("slot 1"), "{why}");
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(1, 8 << 20);
        StateFile::create(&p, &a).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 100).unwrap();
        // Slot 0's area is intact; slot 1's area lost its tail.
        let Loaded::Valid(got) = load(&p).unwrap() else { panic!("slot 0 survives") };
        assert_eq!(got.seq, 1);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(3000).unwrap();
        assert!(matches!(load(&p).unwrap(), Loaded::Corrupt(_)));
        std::fs::write(&p, b"hello world, not a state file").unwrap();
        let Loaded::Corrupt(why) = load(&p).unwrap() else { panic!("foreign") };
        let why = why.to_string();
        assert!(why.contains("truncated") || why.contains("magic"), "{why}");
        assert!(matches!(load(&dir.path().join("none")).unwrap(), Loaded::Missing));
    }

    #[test]
    fn a_header_claiming_huge_bitmaps_is_refused_before_anything_is_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(3, 4 << 20);
        StateFile::create(&p, &a).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        // A well-formed header (valid CRC) for a 1 PiB export at 4 KiB regions:
        // 2^38 regions, a 32 GiB bitmap area, in a file of a few KiB.
        let mut big = a.clone();
        big.export_size = 1 << 50;
        big.region_shift = 12;
        let regions = 1u64 << 38;
        let mut fields = header_fields(&a, &encode_area(&a));
        fields[12..20].copy_from_slice(&area_size(regions as usize).to_le_bytes());
        fields[28..32].copy_from_slice(&12u32.to_le_bytes());
        fields[33..41].copy_from_slice(&big.export_size.to_le_bytes());
        fields[41..49].copy_from_slice(&regions.to_le_bytes());
        let sealed = seal_header(fields);
        bytes[..HEADER_SIZE as usize].copy_from_slice(&sealed);
        bytes[HEADER_SIZE as usize..2 * HEADER_SIZE as usize].copy_from_slice(&sealed);
        std::fs::write(&p, &bytes).unwrap();
        let Loaded::Corrupt(why) = load(&p).unwrap() else { panic!("a 32 GiB claim in a small file is not valid") };
        let why = why.to_string();
        assert!(why.contains("claims"), "{why}");
    }

    #[test]
    fn a_version_1_file_still_loads_with_the_identity_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(4, 8 << 20);
        let area = encode_area(&a);
        // The version 1 encoding: identities without birth, generation, stack.
        let mut e = Enc(Vec::new());
        e.0.extend_from_slice(MAGIC);
        e.u32(1);
        e.u64(area.len() as u64);
        e.u64(a.seq);
        e.u32(a.region_shift);
        e.u8(a.state.code());
        e.u64(a.export_size);
        e.u64(a.regions() as u64);
        e.u32(crc32fast::hash(&area));
        for d in [&a.source, &a.target] {
            let d = d.as_ref().unwrap();
            e.u8(IDENT_V1);
            e.u64(d.rdev);
            e.u64(d.dev);
            e.u64(d.ino);
            e.u64(d.size);
            e.bytes(d.path.as_os_str().as_encoded_bytes(), MAX_PATH);
        }
        let header = seal_header(e.0);
        let mut file = Vec::new();
        file.extend_from_slice(&header);
        file.extend_from_slice(&header);
        file.extend_from_slice(&area);
        file.extend_from_slice(&area);
        std::fs::write(&p, &file).unwrap();
        let Loaded::Valid(got) = load(&p).unwrap() else { panic!("a version 1 file loads") };
        let t = got.target.clone().unwrap();
        assert_eq!((t.birth, t.generation, t.stack.as_str()), (None, None, ""));
        assert_eq!(got.settings, None, "version 1 files recorded no settings");
        assert_eq!(t.path, a.target.as_ref().unwrap().path);
        assert_eq!(got.clean, a.clean);
    }

    #[test]
    fn every_single_byte_flip_in_a_header_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let a = image(7, 4 << 20);
        StateFile::create(&p, &a).unwrap();
        let pristine = std::fs::read(&p).unwrap();
        let header_len = encode_header(&a, &encode_area(&a)).iter().rposition(|&b| b != 0).unwrap() + 1;
        for i in 0..header_len {
            let mut bytes = pristine.clone();
            bytes[i] ^= 0x40;
            bytes[HEADER_SIZE as usize + i] ^= 0x40;
            std::fs::write(&p, &bytes).unwrap();
            assert!(matches!(load(&p).unwrap(), Loaded::Corrupt(_)), "flip at header byte {i} went unnoticed");
        }
    }
}
