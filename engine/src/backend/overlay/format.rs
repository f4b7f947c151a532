//! The overlay file's layout and header.
//!
//! ```text
//! 0            4 KiB header (magic, version, sizes, where the map and data are,
//!              the overlay's own id, what the base image was; CRC32 over it)
//! map_offset   the chunk map: one bit per chunk, little-endian u64 words,
//!              4 KiB pages (a set bit: the overlay holds that chunk)
//! data_offset  chunk i's bytes at data_offset + i * chunk size (1 MiB aligned)
//! ```
//!
//! Data sits at its export offset (plus `data_offset`), so the file system's own
//! allocation is the overlay's: a chunk never written is a hole, a trimmed chunk
//! is punched back into one, and what the file occupies is what it holds. A
//! chunk whose map bit is set reads from the file — data, or zeroes where it is
//! a hole — and every other chunk reads from the base image.

use std::fmt;

/// "LiveMirror OVerLaY", format 1.
pub(super) const MAGIC: [u8; 8] = *b"LMOVRLY1";
pub(super) const VERSION: u32 = 1;
pub(super) const HEADER_LEN: u64 = 4096;
/// The map is written in pages of this size.
pub(super) const MAP_PAGE: u64 = 4096;
/// Where the data starts is aligned to this (huge pages on tmpfs, erase blocks).
const DATA_ALIGN: u64 = 1 << 20;
/// 4 KiB chunks: a 4 KiB write is never a copy-up (dm-snapshot's live overlay
/// uses the same size; docs/decisions.md, "The overlay").
pub(super) const CHUNK_SHIFT: u32 = 12;
/// The longest base name recorded (only shown in messages).
const NAME_MAX: usize = 1024;
const CRC_AT: usize = HEADER_LEN as usize - 4;

/// What the overlay records about the image it was made over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BaseRecord {
    pub(super) size: u64,
    /// CRC32 of sampled blocks (see `super::fingerprint`).
    pub(super) fingerprint: u32,
    /// The base's name when the overlay was made (for messages only).
    pub(super) name: String,
}

/// The overlay file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) chunk_shift: u32,
    pub(super) export_size: u64,
    pub(super) map_offset: u64,
    pub(super) map_len: u64,
    pub(super) data_offset: u64,
    /// Random at creation: a re-created overlay is another overlay (the state
    /// file tells them apart by it).
    pub(super) id: [u8; 16],
    pub(super) base: BaseRecord,
}

/// Why bytes are not a usable header.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeaderError {
    NotAnOverlay,
    Version(u32),
    Corrupt(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotAnOverlay => f.write_str("it is not a livemirror overlay (no overlay header)"),
            HeaderError::Version(v) => {
                write!(f, "it is a livemirror overlay of format {v}, which this version cannot read")
            }
            HeaderError::Corrupt(why) => write!(f, "its header is corrupt ({why})"),
        }
    }
}

impl Header {
    /// The layout for an export of `export_size` bytes.
    pub(super) fn new(export_size: u64, id: [u8; 16], base: BaseRecord) -> Header {
        let chunks = export_size.div_ceil(1 << CHUNK_SHIFT);
        let map_len = chunks.div_ceil(64).max(1) * 8;
        let map_len = map_len.div_ceil(MAP_PAGE) * MAP_PAGE;
        let data_offset = (HEADER_LEN + map_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        Header { chunk_shift: CHUNK_SHIFT, export_size, map_offset: HEADER_LEN, map_len, data_offset, id, base }
    }

    pub(super) fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub(super) fn chunks(&self) -> u64 {
        self.export_size.div_ceil(self.chunk_size())
    }

    /// The file's length: every chunk whole, so a chunk is always one aligned
    /// piece of the file.
    pub(super) fn file_len(&self) -> u64 {
        self.data_offset + self.chunks() * self.chunk_size()
    }

    /// The overlay's id as text (state files and messages).
    pub(super) fn id_text(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_shift.to_le_bytes());
        b[16..24].copy_from_slice(&self.export_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.map_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.map_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..64].copy_from_slice(&self.id);
        b[64..72].copy_from_slice(&self.base.size.to_le_bytes());
        b[72..76].copy_from_slice(&self.base.fingerprint.to_le_bytes());
        let name = truncate_utf8(&self.base.name, NAME_MAX);
        b[76..78].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[78..78 + name.len()].copy_from_slice(name.as_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: the magic, the version, the CRC, and a
    /// layout that is consistent before anything it says is used.
    pub(super) fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < HEADER_LEN as usize || b[0..8] != MAGIC {
            return Err(HeaderError::NotAnOverlay);
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(HeaderError::Version(version));
        }
        let crc = u32_at(CRC_AT);
        if crc != crc32fast::hash(&b[..CRC_AT]) {
            return Err(HeaderError::Corrupt("CRC mismatch".into()));
        }
        let name_len = u16::from_le_bytes([b[76], b[77]]) as usize;
        if name_len > NAME_MAX {
            return Err(HeaderError::Corrupt(format!("base name of {name_len} bytes")));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[48..64]);
        let h = Header {
            chunk_shift: u32_at(12),
            export_size: u64_at(16),
            map_offset: u64_at(24),
            map_len: u64_at(32),
            data_offset: u64_at(40),
            id,
            base: BaseRecord {
                size: u64_at(64),
                fingerprint: u32_at(72),
                name: String::from_utf8_lossy(&b[78..78 + name_len]).into_owned(),
            },
        };
        // The layout must be the one this version writes for that size: a
        // header that passed its CRC but describes something else is refused
        // before its sizes are used for anything.
        let expect = Header::new(h.export_size, h.id, h.base.clone());
        if h.chunk_shift != CHUNK_SHIFT {
            return Err(HeaderError::Corrupt(format!("chunk size 2^{} (expected 2^{CHUNK_SHIFT})", h.chunk_shift)));
        }
        if (h.map_offset, h.map_len, h.data_offset) != (expect.map_offset, expect.map_len, expect.data_offset) {
            return Err(HeaderError::Corrupt(format!(
                "layout map {}+{} data {} does not fit an export of {} bytes",
                h.map_offset, h.map_len, h.data_offset, h.export_size
            )));
        }
        Ok(h)
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where the fingerprint samples a base of `size` bytes: its first and last
/// 64 KiB (superblocks, partition tables, backup headers: what differs between
/// two builds of an image) and 16 blocks of 4 KiB spread between.
pub(super) fn fingerprint_ranges(size: u64) -> Vec<(u64, u64)> {
    const EDGE: u64 = 64 << 10;
    const SPREAD: u64 = 16;
    const BLOCK: u64 = 4096;
    let mut out = vec![(0, size.min(EDGE))];
    if size > EDGE {
        let tail = size.saturating_sub(EDGE).max(EDGE);
        out.push((tail, size - tail));
        for i in 1..=SPREAD {
            let at = (size / (SPREAD + 1) * i) / BLOCK * BLOCK;
            if at >= EDGE && at + BLOCK <= tail {
                out.push((at, BLOCK));
            }
        }
    }
    out.retain(|&(_, len)| len > 0);
    out
}

/// Folds the sampled bytes into one CRC32, with each sample's place, so that
/// the same bytes elsewhere count as different.
pub(super) fn fingerprint_of(samples: &[(u64, Vec<u8>)]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (at, bytes) in samples {
        h.update(&at.to_le_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> Header {
        Header::new(size, [7; 16], BaseRecord { size, fingerprint: 0xdead_beef, name: "/live/rootfs.img".into() })
    }

    #[test]
    fn a_header_round_trips_and_its_layout_holds_every_chunk() {
        for size in [1, 4095, 4096, 4097, 1 << 30, (8u64 << 30) + 512] {
            let h = header(size);
            assert_eq!(Header::decode(&h.encode()), Ok(h.clone()), "size {size}");
            assert!(h.map_len * 8 >= h.chunks(), "the map has a bit for every chunk");
            assert_eq!(h.map_len % MAP_PAGE, 0);
            assert_eq!(h.data_offset % DATA_ALIGN, 0);
            assert!(h.data_offset >= h.map_offset + h.map_len);
            assert!(h.file_len() >= h.data_offset + size);
        }
        // 8 GiB of 4 KiB chunks: a 256 KiB map.
        assert_eq!(header(8 << 30).map_len, 256 << 10);
    }

    #[test]
    fn a_damaged_header_is_refused_with_its_reason() {
        let good = header(1 << 20).encode();
        assert_eq!(Header::decode(&[0u8; 4096]), Err(HeaderError::NotAnOverlay));
        assert_eq!(Header::decode(&good[..100]), Err(HeaderError::NotAnOverlay));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(matches!(Header::decode(&flipped), Err(HeaderError::Corrupt(_))));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert_eq!(Header::decode(&v2), Err(HeaderError::Version(2)));
        // A consistent CRC over an inconsistent layout is refused too.
        let mut h = header(1 << 20);
        h.data_offset = 4096;
        assert!(matches!(Header::decode(&h.encode()), Err(HeaderError::Corrupt(_))));
    }

    #[test]
    fn fingerprint_samples_stay_inside_the_base_and_see_its_ends() {
        for size in [0u64, 1, 4096, 65536, 65537, 200_000, 1 << 30] {
            let r = fingerprint_ranges(size);
            for &(at, len) in &r {
                assert!(at + len <= size, "size {size}: sample {at}+{len}");
            }
            if size > 0 {
                assert_eq!(r[0].0, 0);
                assert!(r.iter().any(|&(at, len)| at + len == size), "size {size}: the last byte is sampled");
            }
        }
        let a = fingerprint_of(&[(0, vec![1, 2, 3])]);
        assert_ne!(a, fingerprint_of(&[(4096, vec![1, 2, 3])]), "the place counts");
        assert_ne!(a, fingerprint_of(&[(0, vec![1, 2, 4])]));
    }
}
