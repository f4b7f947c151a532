//! Crash-safe state (`serve --state FILE`).
//!
//! # File format
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
//! (path, size, device/inode or device number) and the CRC32 of its bitmaps; it
//! ends with the CRC32 of itself. The bitmaps are clean, intent, discarded and
//! unverifiable, as little-endian u64 words. A slot is written bitmaps first,
//! header second, then fdatasync: a slot whose header is intact but whose
//! bitmaps are not fails the bitmap CRC. When the bitmap size changes (grow),
//! a complete new file is written next to the old one and renamed over it.
//!
//! # Ordering
//! - A region is persisted clean only after its copy is durable on T: regions
//!   cleaned by the copier wait in `cleaned_pending` until the persister has
//!   flushed T.
//! - A write that goes to both devices first sets the intent bit of its regions
//!   and waits for a persist whose snapshot includes the bit (generation
//!   numbers); a bit already durable costs nothing.
//! - A bit is cleared when its region had no writer for `QUIET` and both devices
//!   were flushed after the region's last write.
//! - Bits are set and cleared per [`INTENT_CHUNK`] (all regions of a chunk
//!   together), and writers are tracked per chunk, so a write costs one map
//!   entry however small the regions are.
//! - On resume, intent regions are dirty again.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use tokio::sync::{watch, Notify};

use crate::backend::Backend;
use crate::device::Mirror;
use crate::error::{Error, Result};
pub use crate::identity::DeviceIdent;
use crate::identity::MAX_STACK;
use crate::regions::Bits;
use crate::status::DeviceState;

const MAGIC: &[u8; 8] = b"LMSTATE\0";
/// 2: device identities carry birth time, generation and the block device's
/// stack (identity.rs). Version 1 files are still read.
const VERSION: u32 = 2;
const HEADER_SIZE: u64 = 4096;
const AREAS_START: u64 = 2 * HEADER_SIZE;
const MAX_PATH: usize = 1024;
/// Identity encodings: 1 = number, size and path (format version 1);
/// 2 = also birth time, generation and stack.
const IDENT_V1: u8 = 1;
const IDENT_V2: u8 = 2;
/// A region with no write for this long may have its intent bit cleared. Long
/// enough that a region under steady random writes keeps its bit (clearing and
/// setting it again costs a state write each time), short enough to clear
/// within the 5 s semantics.md allows (plus a tick, a flush and a write).
pub const QUIET: Duration = Duration::from_millis(4000);
/// Intent bits are set for whole chunks of this many bytes (at least one
/// region): random writes then reach a steady state, where every bit they need
/// is already durable, after a few hundred state writes instead of one per
/// region (md's bitmap chunks serve the same purpose). On resume a write in
/// flight costs at most this much extra copying.
pub const INTENT_CHUNK: u64 = 4 << 20;
/// The persister wakes at least this often.
const TICK: Duration = Duration::from_millis(250);

/// One decoded slot.
#[derive(Debug, Clone, PartialEq)]
pub struct StateImage {
    pub seq: u64,
    pub state: DeviceState,
    pub region_shift: u32,
    pub export_size: u64,
    pub source: Option<DeviceIdent>,
    pub target: Option<DeviceIdent>,
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

fn words(regions: usize) -> usize {
    regions.div_ceil(64)
}

fn area_size(regions: usize) -> u64 {
    ((4 * words(regions) * 8) as u64).div_ceil(4096).max(1) * 4096
}

struct Enc(Vec<u8>);
impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8], max: usize) {
        let b = &b[..b.len().min(max)];
        self.u16(b.len() as u16);
        self.0.extend_from_slice(b);
    }
    fn ident(&mut self, d: &Option<DeviceIdent>) {
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

fn bits_from(bytes: &[u8], regions: usize) -> Bits {
    let v: Vec<u64> = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    let mut b = Bits::from_vec(v);
    b.truncate(regions);
    b
}

/// Encodes the bitmap area (exactly `area_size(regions)` bytes).
fn encode_area(img: &StateImage) -> Vec<u8> {
    let n = img.regions();
    let w = words(n);
    let mut out = Vec::with_capacity(area_size(n) as usize);
    for b in [&img.clean, &img.intent, &img.discarded, &img.unverifiable] {
        bits_bytes(b, w, &mut out);
    }
    out.resize(area_size(n) as usize, 0);
    out
}

fn encode_header(img: &StateImage, area: &[u8]) -> Vec<u8> {
    seal_header(header_fields(img, area))
}

/// Appends the header's CRC and pads it to its slot.
fn seal_header(mut fields: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&fields);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields.resize(HEADER_SIZE as usize, 0);
    fields
}

/// The header's fields, before its CRC.
fn header_fields(img: &StateImage, area: &[u8]) -> Vec<u8> {
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
    e.0
}

struct Header {
    area_size: u64,
    seq: u64,
    region_shift: u32,
    state: DeviceState,
    export_size: u64,
    regions: usize,
    area_crc: u32,
    source: Option<DeviceIdent>,
    target: Option<DeviceIdent>,
}

fn decode_header(b: &[u8]) -> std::result::Result<Header, String> {
    let mut d = Dec { b, pos: 0 };
    let bad = || "truncated header".to_string();
    if d.take(8).ok_or_else(bad)? != MAGIC {
        return Err("not a livemirror state file (bad magic)".into());
    }
    let version = d.u32().ok_or_else(bad)?;
    if !(1..=VERSION).contains(&version) {
        return Err(format!("state file format version {version}, this livemirror reads 1 to {VERSION}"));
    }
    let area_size = d.u64().ok_or_else(bad)?;
    let seq = d.u64().ok_or_else(bad)?;
    let region_shift = d.u32().ok_or_else(bad)?;
    let state = DeviceState::from_code(d.u8().ok_or_else(bad)?).ok_or("unknown device state")?;
    let export_size = d.u64().ok_or_else(bad)?;
    let regions = d.u64().ok_or_else(bad)?;
    let area_crc = d.u32().ok_or_else(bad)?;
    let source = d.ident().ok_or("bad source identity")?;
    let target = d.ident().ok_or("bad target identity")?;
    let end = d.pos;
    let crc = d.u32().ok_or_else(bad)?;
    if crc32fast::hash(&b[..end]) != crc {
        return Err("header CRC mismatch".into());
    }
    if !(12..=26).contains(&region_shift) {
        return Err(format!("bad region size 2^{region_shift}"));
    }
    let regions = usize::try_from(regions).map_err(|_| "bad region count")?;
    if regions as u64 != export_size.div_ceil(1 << region_shift) || area_size != self::area_size(regions) {
        return Err("inconsistent sizes".into());
    }
    Ok(Header { area_size, seq, region_shift, state, export_size, regions, area_crc, source, target })
}

/// What reading a state file found.
#[derive(Debug)]
pub enum Loaded {
    Missing,
    Valid(Box<StateImage>),
    /// Neither slot is intact; the reasons for each.
    Corrupt(String),
}

/// Reads the newest intact slot of `path`.
pub fn load(path: &Path) -> io::Result<Loaded> {
    let f = match File::open(crate::hostfs::locate(path, None)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(Loaded::Corrupt("the file is empty".into()));
    }
    let mut best: Option<StateImage> = None;
    let mut why = Vec::new();
    for slot in 0..2u64 {
        let mut hb = vec![0u8; HEADER_SIZE as usize];
        if f.read_exact_at(&mut hb, slot * HEADER_SIZE).is_err() {
            why.push(format!("slot {slot}: truncated"));
            continue;
        }
        let h = match decode_header(&hb) {
            Ok(h) => h,
            Err(e) => {
                why.push(format!("slot {slot}: {e}"));
                continue;
            }
        };
        // The sizes come from the file: check them against its length before
        // allocating anything of that size.
        let area_end = h.area_size.checked_mul(slot + 1).and_then(|n| n.checked_add(AREAS_START));
        if area_end.is_none_or(|end| end > len) {
            why.push(format!("slot {slot}: bitmaps truncated (the header claims {} bytes each)", h.area_size));
            continue;
        }
        let mut area = vec![0u8; h.area_size as usize];
        if f.read_exact_at(&mut area, AREAS_START + slot * h.area_size).is_err() {
            why.push(format!("slot {slot}: bitmaps truncated"));
            continue;
        }
        if crc32fast::hash(&area) != h.area_crc {
            why.push(format!("slot {slot}: bitmap CRC mismatch"));
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
            clean: bits_from(&area[..w], h.regions),
            intent: bits_from(&area[w..2 * w], h.regions),
            discarded: bits_from(&area[2 * w..3 * w], h.regions),
            unverifiable: bits_from(&area[3 * w..4 * w], h.regions),
        };
        if best.as_ref().is_none_or(|b| img.seq > b.seq) {
            best = Some(img);
        }
    }
    Ok(match best {
        Some(img) => Loaded::Valid(Box::new(img)),
        None => Loaded::Corrupt(why.join("; ")),
    })
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

// ---------------------------------------------------------------- the journal

/// Per-chunk bookkeeping while writes are active.
struct Activity {
    writers: u32,
    /// Completion sequence number of the last write to the chunk.
    last_write: u64,
    last_end: Instant,
}

struct JState {
    /// Bumped by every change that must reach the file.
    gen: u64,
    seq: u64,
    state: DeviceState,
    export_size: u64,
    source: Option<DeviceIdent>,
    target: Option<DeviceIdent>,
    intent: Bits,
    /// Generation at which a chunk's intent bits were set, until a persist
    /// covers it (keyed by chunk).
    intent_gen: HashMap<usize, u64>,
    durable_clean: Bits,
    cleaned_pending: Vec<Range<usize>>,
    /// Keyed by chunk.
    active: HashMap<usize, Activity>,
    write_seq: u64,
    flushed_seq: u64,
}

struct Shared {
    st: Mutex<JState>,
    file: Mutex<Option<StateFile>>,
    durable: watch::Sender<u64>,
    kick: Notify,
    stop: AtomicBool,
    shift: u32,
    /// Regions per intent chunk.
    per_chunk: usize,
    failed: Mutex<Option<String>>,
    /// State file writes so far.
    writes: std::sync::atomic::AtomicU64,
}

/// The crash-safety journal of a device. Created by [`open_device`].
pub struct Journal {
    sh: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Held by a write that goes to both devices; `finish` when its legs completed.
pub struct IntentGuard {
    chunks: Range<usize>,
}

fn lk<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IntentGuard {
    pub fn finish(self, m: &Mirror) {
        let Some(j) = &m.journal else { return };
        let mut st = lk(&j.sh.st);
        st.write_seq += 1;
        let seq = st.write_seq;
        let now = Instant::now();
        for c in self.chunks {
            if let Some(a) = st.active.get_mut(&c) {
                a.writers = a.writers.saturating_sub(1);
                a.last_write = seq;
                a.last_end = now;
            }
        }
    }
}

impl Journal {
    fn new(img: &StateImage, file: StateFile) -> Journal {
        let n = img.regions();
        let (durable, _) = watch::channel(0);
        Journal {
            sh: Arc::new(Shared {
                st: Mutex::new(JState {
                    gen: 0,
                    seq: img.seq,
                    state: img.state,
                    export_size: img.export_size,
                    source: img.source.clone(),
                    target: img.target.clone(),
                    intent: bitvec![u64, Lsb0; 0; n],
                    intent_gen: HashMap::new(),
                    durable_clean: img.clean.clone(),
                    cleaned_pending: Vec::new(),
                    active: HashMap::new(),
                    write_seq: 0,
                    flushed_seq: 0,
                }),
                file: Mutex::new(Some(file)),
                durable,
                kick: Notify::new(),
                stop: AtomicBool::new(false),
                shift: img.region_shift,
                per_chunk: (INTENT_CHUNK >> img.region_shift).max(1) as usize,
                failed: Mutex::new(None),
                writes: std::sync::atomic::AtomicU64::new(0),
            }),
            thread: Mutex::new(None),
        }
    }

    /// Starts the persister thread for `m`.
    pub(crate) fn start(&self, m: &Arc<Mirror>) -> Result<()> {
        let sh = self.sh.clone();
        let weak = Arc::downgrade(m);
        let t = std::thread::Builder::new()
            .name("livemirror-state".into())
            .spawn(move || {
                if let Err(e) = crate::rt::block_on(persister(sh.clone(), weak)) {
                    *lk(&sh.failed) = Some(format!("state persister could not start: {e}"));
                }
            })
            .map_err(|e| Error::io("cannot start the state thread", e))?;
        *lk(&self.thread) = Some(t);
        Ok(())
    }

    fn bump(st: &mut JState) -> u64 {
        st.gen += 1;
        st.gen
    }

    pub fn set_state(&self, state: DeviceState, source: Option<&Backend>, target: Option<&Backend>) {
        let mut st = lk(&self.sh.st);
        st.state = state;
        st.source = source.map(DeviceIdent::of);
        st.target = target.map(DeviceIdent::of);
        Self::bump(&mut st);
    }

    pub fn set_export_size(&self, size: u64) {
        let mut st = lk(&self.sh.st);
        st.export_size = size;
        let n = size.div_ceil(1 << self.sh.shift) as usize;
        st.intent.resize(n, false);
        st.durable_clean.resize(n, true);
        Self::bump(&mut st);
    }

    /// Requests a persist of everything changed so far and waits for it.
    pub async fn persist(&self) -> Result<()> {
        let want = Self::bump(&mut lk(&self.sh.st));
        self.wait_durable(want).await
    }

    async fn wait_durable(&self, want: u64) -> Result<()> {
        let mut rx = self.sh.durable.subscribe();
        self.sh.kick.notify_one();
        loop {
            if let Some(e) = lk(&self.sh.failed).clone() {
                return Err(Error::io(e, io::Error::other("state file write failed")));
            }
            if *rx.borrow_and_update() >= want {
                return Ok(());
            }
            // The persister keeps going until `want` is covered; wake now and
            // then to notice a failure.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            self.sh.kick.notify_one();
        }
    }

    pub fn reset_clean(&self) {
        let mut st = lk(&self.sh.st);
        st.durable_clean.fill(false);
        st.cleaned_pending.clear();
        st.intent.fill(false);
        st.intent_gen.clear();
        Self::bump(&mut st);
    }

    pub fn mark_all_clean_durable(&self, _m: &Mirror) {
        let mut st = lk(&self.sh.st);
        st.durable_clean.fill(true);
        st.cleaned_pending.clear();
        Self::bump(&mut st);
    }

    pub fn note_cleaned(&self, regions: Range<usize>) {
        lk(&self.sh.st).cleaned_pending.push(regions);
    }

    pub fn mark_dirty_meta(&self) {
        Self::bump(&mut lk(&self.sh.st));
        self.sh.kick.notify_one();
    }

    /// Sets the intent bits of a write's regions and waits until a persist
    /// that includes them is durable.
    pub async fn begin_write(&self, m: &Mirror, off: u64, len: u64) -> Result<IntentGuard> {
        let per = self.sh.per_chunk;
        let chunks = {
            let map = m.map.lock().unwrap_or_else(|p| p.into_inner());
            let rs = map.regions_touching(off, len);
            (rs.start / per)..rs.end.div_ceil(per)
        };
        let mut need = 0u64;
        {
            let mut st = lk(&self.sh.st);
            let durable = *self.sh.durable.borrow();
            let n = st.intent.len();
            for c in chunks.clone() {
                let regions = (c * per).min(n)..((c + 1) * per).min(n);
                if regions.is_empty() {
                    continue;
                }
                let a = st.active.entry(c).or_insert(Activity { writers: 0, last_write: 0, last_end: Instant::now() });
                a.writers += 1;
                if !st.intent[regions.clone()].all() {
                    st.intent[regions].fill(true);
                    let g = Self::bump(&mut st);
                    st.intent_gen.insert(c, g);
                    need = need.max(g);
                } else if let Some(&g) = st.intent_gen.get(&c) {
                    if g > durable {
                        need = need.max(g);
                    }
                }
            }
        }
        let guard = IntentGuard { chunks };
        if need > 0 {
            if let Err(e) = self.wait_durable(need).await {
                guard.finish(m);
                return Err(e);
            }
        }
        Ok(guard)
    }

    pub fn flush_begin(&self) -> u64 {
        lk(&self.sh.st).write_seq
    }

    pub fn flush_done(&self, seq: u64) {
        let mut st = lk(&self.sh.st);
        st.flushed_seq = st.flushed_seq.max(seq);
    }

    /// Stops the persister after a final persist.
    pub async fn stop(&self) -> Result<()> {
        let r = self.persist().await;
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.kick.notify_one();
        let t = lk(&self.thread).take();
        if let Some(t) = t {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        r
    }

    /// State file writes since start.
    pub fn state_writes(&self) -> u64 {
        self.sh.writes.load(Ordering::Relaxed)
    }

    /// Intent bits currently set (tests and status).
    pub fn intent_count(&self) -> usize {
        lk(&self.sh.st).intent.count_ones()
    }
}

/// Builds the image to write from the journal and the device's bitmaps.
fn snapshot(sh: &Shared, m: &Mirror) -> (u64, StateImage) {
    let (discarded, unverifiable) = {
        let map = m.map.lock().unwrap_or_else(|p| p.into_inner());
        (map.discarded_bits().clone(), map.unverifiable_bits().clone())
    };
    let mut st = lk(&sh.st);
    st.seq += 1;
    let n = st.intent.len();
    let fit = |mut b: Bits| {
        b.resize(n, false);
        b
    };
    let img = StateImage {
        seq: st.seq,
        state: st.state,
        region_shift: sh.shift,
        export_size: st.export_size,
        source: st.source.clone(),
        target: st.target.clone(),
        clean: st.durable_clean.clone(),
        intent: st.intent.clone(),
        discarded: fit(discarded),
        unverifiable: fit(unverifiable),
    };
    (st.gen, img)
}

async fn persister(sh: Arc<Shared>, m: Weak<Mirror>) {
    let mut written_gen = 0u64;
    loop {
        let _ = tokio::time::timeout(TICK, sh.kick.notified()).await;
        let Some(mirror) = m.upgrade() else { return };
        let route = mirror.route();
        // 1. Clean progress: durable on T first, then recorded.
        let pending: Vec<Range<usize>> = std::mem::take(&mut lk(&sh.st).cleaned_pending);
        if !pending.is_empty() {
            let ok = match &route.target {
                Some(t) => t.backend.flush().await.is_ok(),
                None => false,
            };
            let mut st = lk(&sh.st);
            if ok {
                for r in pending {
                    let end = r.end.min(st.durable_clean.len());
                    if r.start < end {
                        st.durable_clean[r.start..end].fill(true);
                    }
                }
                Journal::bump(&mut st);
            } else if route.target.is_some() {
                // Try again next round (a failing target is dropped by the
                // request that trips over it).
                st.cleaned_pending.extend(pending);
            }
        }
        // 2. Intent bits of quiet chunks: flush both devices past their last
        // write, then clear.
        let quiet: Vec<(usize, u64)> = {
            let st = lk(&sh.st);
            st.active
                .iter()
                .filter(|(_, a)| a.writers == 0 && a.last_end.elapsed() >= QUIET)
                .map(|(&r, a)| (r, a.last_write))
                .collect()
        };
        if !quiet.is_empty() {
            let need_flush = {
                let st = lk(&sh.st);
                quiet.iter().any(|&(_, w)| w > st.flushed_seq)
            };
            let mut ok = true;
            if need_flush {
                let seq = lk(&sh.st).write_seq;
                for dev in route.source.iter().map(|s| &**s).chain(route.target.iter().map(|t| &t.backend)) {
                    ok &= dev.flush().await.is_ok();
                }
                if ok {
                    let mut st = lk(&sh.st);
                    st.flushed_seq = st.flushed_seq.max(seq);
                }
            }
            if ok {
                let mut st = lk(&sh.st);
                let flushed = st.flushed_seq;
                let mut cleared = false;
                let per = sh.per_chunk;
                for (c, w) in quiet {
                    let still_quiet = st.active.get(&c).is_some_and(|a| a.writers == 0 && a.last_write == w);
                    if still_quiet && w <= flushed {
                        st.active.remove(&c);
                        let n = st.intent.len();
                        let regions = (c * per).min(n)..((c + 1) * per).min(n);
                        st.intent[regions].fill(false);
                        st.intent_gen.remove(&c);
                        cleared = true;
                    }
                }
                if cleared {
                    Journal::bump(&mut st);
                }
            }
        }
        drop(route);
        // 3. Write the file if anything changed.
        let gen_now = lk(&sh.st).gen;
        if gen_now > written_gen {
            let (gen, img) = snapshot(&sh, &mirror);
            let res = {
                let mut f = lk(&sh.file);
                match f.as_mut() {
                    Some(f) => f.write(&img),
                    None => Ok(()),
                }
            };
            match res {
                Ok(()) => {
                    sh.writes.fetch_add(1, Ordering::Relaxed);
                    written_gen = gen;
                    *lk(&sh.failed) = None;
                    let mut st = lk(&sh.st);
                    st.intent_gen.retain(|_, g| *g > gen);
                    drop(st);
                    sh.durable.send_replace(gen);
                }
                Err(e) => {
                    tracing::error!("cannot write the state file: {e}");
                    *lk(&sh.failed) = Some(format!("cannot write the state file: {e}"));
                }
            }
        }
        if sh.stop.load(Ordering::SeqCst) && lk(&sh.st).gen <= written_gen {
            return;
        }
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
        source: source.map(DeviceIdent::of),
        target: target.map(DeviceIdent::of),
        clean: bitvec![u64, Lsb0; 0; n],
        intent: bitvec![u64, Lsb0; 0; n],
        discarded: bitvec![u64, Lsb0; 0; n],
        unverifiable: bitvec![u64, Lsb0; 0; n],
    }
}

pub(crate) fn journal_for(img: &StateImage, file: StateFile) -> Journal {
    Journal::new(img, file)
}

#[cfg(test)]
mod tests {
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
