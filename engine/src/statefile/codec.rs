//! The encoding of one slot: the header's fields (little-endian, the device
//! identities length-prefixed), its CRC, and the bitmap area's words; and the
//! checks a slot must pass to be decoded (magic, version, both CRCs, sizes that
//! agree with each other). Where slots sit in the file is mod.rs's.

use std::path::PathBuf;

use super::{Settings, StateImage, HEADER_SIZE};
use crate::identity::{DeviceIdent, MAX_STACK};
use crate::regions::Bits;
use crate::state::DeviceState;

pub(super) const MAGIC: &[u8; 8] = b"LMSTATE\0";
/// 2: device identities carry birth time, generation and the block device's
/// stack (identity.rs), and the runtime copy settings are kept. Version 1 files
/// are still read.
const VERSION: u32 = 2;
pub(super) const MAX_PATH: usize = 1024;
/// Identity encodings: 1 = number, size and path (format version 1);
/// 2 = also birth time, generation and stack.
pub(super) const IDENT_V1: u8 = 1;
const IDENT_V2: u8 = 2;

pub(super) fn words(regions: usize) -> usize {
    regions.div_ceil(64)
}

pub(super) fn area_size(regions: usize) -> u64 {
    ((4 * words(regions) * 8) as u64).div_ceil(4096).max(1) * 4096
}

pub(super) struct Enc(pub(super) Vec<u8>);
impl Enc {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, b: &[u8], max: usize) {
        let b = &b[..b.len().min(max)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    pub(super) fn ident(&mut self, d: &Option<DeviceIdent>) {
        match d {
            None => self.u8(0),
            Some(d) => {
                self.u8(IDENT_V2);
                self.u64(d.rdev);
                self.u64(d.dev);
                self.u64(d.ino);
                self.u64(d.size);
                self.bytes(d.path.as_os_str().as_encoded_bytes(), MAX_PATH);
                let (secs, nsecs) = d.birth.unwrap_or((0, 0));
                self.u8(d.birth.is_some() as u8);
                self.u64(secs as u64);
                self.u32(nsecs);
                self.u8(d.generation.is_some() as u8);
                self.u64(d.generation.unwrap_or(0));
                self.bytes(d.stack.as_bytes(), MAX_STACK);
            }
        }
    }
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}
impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes)
    }
    fn bytes(&mut self, max: usize) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        if n > max {
            return None;
        }
        self.take(n)
    }
    fn ident(&mut self) -> Option<Option<DeviceIdent>> {
        let tag = self.u8()?;
        if tag == 0 {
            return Some(None);
        }
        if tag != IDENT_V1 && tag != IDENT_V2 {
            return None;
        }
        let rdev = self.u64()?;
        let dev = self.u64()?;
        let ino = self.u64()?;
        let size = self.u64()?;
        let p = self.bytes(MAX_PATH)?;
        let path = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p));
        let mut d = DeviceIdent { path, size, dev, ino, rdev, birth: None, generation: None, stack: String::new() };
        if tag == IDENT_V2 {
            let has_birth = self.u8()? != 0;
            let secs = self.u64()? as i64;
            let nsecs = self.u32()?;
            d.birth = has_birth.then_some((secs, nsecs));
            let has_gen = self.u8()? != 0;
            let generation = self.u64()?;
            d.generation = has_gen.then_some(generation);
            d.stack = String::from_utf8(self.bytes(MAX_STACK)?.to_vec()).ok()?;
        }
        Some(Some(d))
    }
}

fn bits_bytes(bits: &Bits, nwords: usize, out: &mut Vec<u8>) {
    let raw = bits.as_raw_slice();
    for i in 0..nwords {
        out.extend_from_slice(&raw.get(i).copied().unwrap_or(0).to_le_bytes());
    }
}

pub(super) fn bits_from(bytes: &[u8], regions: usize) -> Bits {
    let v: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    let mut b = Bits::from_vec(v);
    b.truncate(regions);
    b
}

/// Encodes the bitmap area (exactly `area_size(regions)` bytes).
pub(super) fn encode_area(img: &StateImage) -> Vec<u8> {
    let n = img.regions();
    let w = words(n);
    let mut out = Vec::with_capacity(area_size(n) as usize);
    for b in [&img.clean, &img.intent, &img.discarded, &img.unverifiable] {
        bits_bytes(b, w, &mut out);
    }
    out.resize(area_size(n) as usize, 0);
    out
}

pub(super) fn encode_header(img: &StateImage, area: &[u8]) -> Vec<u8> {
    seal_header(header_fields(img, area))
}

/// Appends the header's CRC and pads it to its slot.
pub(super) fn seal_header(mut fields: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&fields);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields.resize(HEADER_SIZE as usize, 0);
    fields
}

/// The header's fields, before its CRC.
pub(super) fn header_fields(img: &StateImage, area: &[u8]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(HEADER_SIZE as usize));
    e.0.extend_from_slice(MAGIC);
    e.u32(VERSION);
    e.u64(area.len() as u64);
    e.u64(img.seq);
    e.u32(img.region_shift);
    e.u8(img.state.code());
    e.u64(img.export_size);
    e.u64(img.regions() as u64);
    e.u32(crc32fast::hash(area));
    e.ident(&img.source);
    e.ident(&img.target);
    let set = img.settings.unwrap_or_default();
    e.u8(img.settings.is_some() as u8);
    e.u64(set.max_rate);
    e.u64(set.min_rate);
    e.u8(set.paused as u8);
    e.0
}

pub(super) struct Header {
    pub(super) area_size: u64,
    pub(super) seq: u64,
    pub(super) region_shift: u32,
    pub(super) state: DeviceState,
    pub(super) export_size: u64,
    pub(super) regions: usize,
    pub(super) area_crc: u32,
    pub(super) source: Option<DeviceIdent>,
    pub(super) target: Option<DeviceIdent>,
    pub(super) settings: Option<Settings>,
}

/// What is wrong with one slot of a state file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("truncated")]
    Truncated,
    #[error("not a livemirror state file (bad magic)")]
    BadMagic,
    #[error("state file format version {0}, this livemirror reads 1 to {VERSION}")]
    Version(u32),
    #[error("unknown device state {0}")]
    UnknownState(u8),
    #[error("bad {0} identity")]
    BadIdentity(&'static str),
    #[error("header CRC mismatch")]
    HeaderCrc,
    #[error("bad region size 2^{0}")]
    RegionSize(u32),
    #[error("inconsistent sizes")]
    InconsistentSizes,
    #[error("bitmaps truncated (the header claims {0} bytes each)")]
    BitmapsTruncated(u64),
    #[error("bitmap CRC mismatch")]
    BitmapCrc,
}

pub(super) fn decode_header(b: &[u8]) -> Result<Header, Corruption> {
    use Corruption::*;
    let mut d = Dec { b, pos: 0 };
    if d.take(8).ok_or(Truncated)? != MAGIC {
        return Err(BadMagic);
    }
    let version = d.u32().ok_or(Truncated)?;
    if !(1..=VERSION).contains(&version) {
        return Err(Version(version));
    }
    let area_size = d.u64().ok_or(Truncated)?;
    let seq = d.u64().ok_or(Truncated)?;
    let region_shift = d.u32().ok_or(Truncated)?;
    let code = d.u8().ok_or(Truncated)?;
    let state = DeviceState::from_code(code).ok_or(UnknownState(code))?;
    let export_size = d.u64().ok_or(Truncated)?;
    let regions = d.u64().ok_or(Truncated)?;
    let area_crc = d.u32().ok_or(Truncated)?;
    let source = d.ident().ok_or(BadIdentity("source"))?;
    let target = d.ident().ok_or(BadIdentity("target"))?;
    let settings = if version >= 2 {
        let recorded = d.u8().ok_or(Truncated)? != 0;
        let max_rate = d.u64().ok_or(Truncated)?;
        let min_rate = d.u64().ok_or(Truncated)?;
        let paused = d.u8().ok_or(Truncated)? != 0;
        recorded.then_some(Settings { max_rate, min_rate, paused })
    } else {
        None
    };
    let end = d.pos;
    let crc = d.u32().ok_or(Truncated)?;
    // A fuzzing build skips the CRCs, so mutated fields reach the checks
    // below instead of stopping here (fuzz_targets/state_file.rs).
    if crc32fast::hash(&b[..end]) != crc && !cfg!(fuzzing) {
        return Err(HeaderCrc);
    }
    if !(12..=26).contains(&region_shift) {
        return Err(RegionSize(region_shift));
    }
    let regions = usize::try_from(regions).map_err(|_| InconsistentSizes)?;
    if regions as u64 != export_size.div_ceil(1 << region_shift) || area_size != self::area_size(regions) {
        return Err(InconsistentSizes);
    }
    Ok(Header { area_size, seq, region_shift, state, export_size, regions, area_crc, source, target, settings })
}
