//! A copy-on-write overlay: a writable device made of a read-only base (an
//! image, never written) and an overlay file that takes every write, zeroing
//! and trim (`serve --source IMAGE --overlay PATH`). Reads merge the two.
//!
//! The file's layout is in [`format`]: data sits at its own offset, 4 KiB
//! chunks, and a map with a bit per chunk says which chunks the file holds
//! ([`map`]); the file system's holes are the overlay's free space, so a trim
//! punches a hole and gives the space back ([`space`] keeps the count and
//! `--overlay-limit`); [`file`] makes, checks and reopens the file.
//!
//! Ordering, for every write that makes chunks present (the same discipline as
//! the state file's write intent, turned around: the data first, then the
//! record that points at it):
//! 1. space is counted, or the write is refused (ENOSPC) before any byte moves;
//! 2. the data is written (a partial chunk not held yet is copied up from the
//!    base first, in one piece with the new bytes);
//! 3. the chunks' map bits are set and their map pages written to the file
//!    (on a disk, after the data is synced) — only then is the write
//!    acknowledged, so it survives `kill -9`; FLUSH and FUA sync the file.
//!
//! Callers hold the covering chunks exclusively for unaligned writes and for
//! zeroing ([`OverlayDevice::alignment`] is the chunk size, which makes the
//! mirror's write path do so): two copy-ups of one chunk never interleave, and
//! the space count follows the file.

mod file;
mod format;
mod map;
mod space;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use super::{Backend, CacheMode, Extent, LocalDevice, LockMode, OpenOptions};
use crate::buf::{IoBuf, SharedBuf};
use crate::error::{Error, IoContext, Result};
use crate::identity::DeviceIdent;
use file::{allocated_chunks, create, fingerprint, pread_full, pwrite_all};
use format::{Header, HEADER_LEN, MAP_PAGE};
use map::{Committer, MapIo, PresentMap};
use space::{NoSpace, Space};

pub use space::OverlayNotice;

/// What `serve --overlay` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayOptions {
    /// The overlay file (created when missing or empty).
    pub path: PathBuf,
    /// The most the file may occupy (`--overlay-limit`).
    pub limit: Option<u64>,
}

/// What `status` shows about an overlay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OverlayUsage {
    /// The overlay file.
    pub path: String,
    /// What the overlay's file occupies (its allocated blocks).
    pub bytes_used: u64,
    /// `--overlay-limit` (or `set-overlay-limit`); None without one.
    pub bytes_limit: Option<u64>,
    /// 4 KiB chunks the overlay holds (written, zeroed or trimmed).
    #[serde(default)]
    pub chunks_present: u64,
    /// Writes refused for lack of space since the daemon started.
    #[serde(default)]
    pub writes_refused: u64,
}

type Notifier = Box<dyn Fn(OverlayNotice) + Send + Sync>;

/// The overlay device.
pub struct OverlayDevice {
    base: Box<Backend>,
    file: LocalDevice,
    /// The overlay file as named (messages, status, removal).
    path: PathBuf,
    header: Header,
    map: PresentMap,
    committer: Committer,
    space: Space,
    shift: u32,
    /// Remove the file when the device is closed (the source was detached).
    retired: AtomicBool,
    notifier: OnceLock<Notifier>,
}

impl fmt::Debug for OverlayDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverlayDevice")
            .field("base", &self.base.path())
            .field("path", &self.path)
            .field("export_size", &self.header.export_size)
            .finish()
    }
}

impl OverlayDevice {
    /// Opens the overlay at `opts.path` over `base` (opened read-only by the
    /// caller), or makes a new one there if the file is missing or empty.
    /// Refused, changing nothing, when the file is something else, was made
    /// over another base, or is shorter than its header says. Waits for the
    /// file's exclusive lock (a killed predecessor's I/O drains first).
    pub fn open(base: Backend, opts: &OverlayOptions) -> Result<OverlayDevice> {
        let path = std::path::absolute(&opts.path).ctx(|| format!("bad overlay path {}", opts.path.display()))?;
        // Created here if missing (mode 0600: it holds the device's data); the
        // header is written under the lock below.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                // Where the system sees it now: a root storage daemon restarted
                // after switch_root has an emptied root of its own.
                .open(crate::hostfs::locate(&path, None))
                .ctx(|| format!("cannot create the overlay {}", path.display()))?;
        }
        let file = LocalDevice::open(
            &path,
            &OpenOptions { writable: true, cache: CacheMode::Buffered, lock: LockMode::Wait },
        )?;
        let fd = file.raw_fd();
        let len = file.current_size().ctx(|| format!("cannot stat the overlay {}", path.display()))?;
        let shown = path.display().to_string();
        let (base_record, base_shown) = fingerprint(&base)?;
        let header = if len == 0 {
            create(fd, &path, &base, base_record)?
        } else {
            let mut raw = vec![0u8; HEADER_LEN as usize];
            let got = pread_full(fd, &mut raw, 0).ctx(|| format!("cannot read the overlay {shown}"))?;
            let header = Header::decode(&raw[..got])
                .map_err(|e| Error::Refused(format!("overlay {shown}: {e}; refusing to use or change it")))?;
            if header.base != base_record || header.export_size != base.size() {
                return Err(Error::Refused(format!(
                    "overlay {shown} was made over another image ({}: {} bytes, fingerprint {:08x}); {base_shown} \
                     is {} bytes with fingerprint {:08x}: refusing it (nothing in it was changed)",
                    header.base.name,
                    header.base.size,
                    header.base.fingerprint,
                    base_record.size,
                    base_record.fingerprint
                )));
            }
            if len < header.file_len() {
                return Err(Error::Refused(format!(
                    "overlay {shown} is {len} bytes, shorter than the {} its header describes (truncated?): \
                     refusing it (nothing in it was changed)",
                    header.file_len()
                )));
            }
            header
        };
        let mut raw_map = vec![0u8; header.map_len as usize];
        pread_full(fd, &mut raw_map, header.map_offset).ctx(|| format!("cannot read the overlay {shown}'s map"))?;
        let map = PresentMap::from_bytes(header.chunks(), &raw_map);
        let allocated = allocated_chunks(fd, &header).ctx(|| format!("cannot read the overlay {shown}'s extents"))?;
        let metadata = HEADER_LEN + header.map_len;
        if let Some(l) = opts.limit {
            if l < metadata + header.chunk_size() {
                return Err(Error::InvalidConfig(format!(
                    "--overlay-limit {l} leaves no room: the overlay's header and map alone take {metadata} bytes"
                )));
            }
        }
        let space = Space::new(header.chunk_size(), opts.limit, allocated, metadata);
        if let Some(l) = opts.limit {
            if space.used() > l {
                tracing::warn!(
                    "overlay {shown} already holds {} bytes, more than --overlay-limit {l}: writes that need new \
                     space are refused until some is given back (fstrim)",
                    space.used()
                );
            }
        }
        tracing::info!(
            "overlay {shown} over {base_shown}: {} of {} chunks held, {} bytes used{}",
            map.count(),
            header.chunks(),
            space.used(),
            opts.limit.map(|l| format!(" of {l}")).unwrap_or_default()
        );
        Ok(OverlayDevice {
            base: Box::new(base),
            file,
            path,
            shift: header.chunk_shift,
            header,
            map,
            committer: Committer::default(),
            space,
            retired: AtomicBool::new(false),
            notifier: OnceLock::new(),
        })
    }

    /// The image (the base) as named.
    pub fn path(&self) -> &Path {
        self.base.path()
    }

    /// The overlay file.
    pub fn overlay_path(&self) -> &Path {
        &self.path
    }

    /// The read-only base (the image).
    pub fn base(&self) -> &Backend {
        &self.base
    }

    /// The overlay file's identity (a target must not be it).
    pub fn file_identity(&self) -> super::Identity {
        self.file.identity()
    }

    /// The export's size: the base's when the overlay was made.
    pub fn size(&self) -> u64 {
        self.header.export_size
    }

    /// The base's size now (a truncated image has failed, as any device).
    pub fn current_size(&self) -> io::Result<u64> {
        self.base.current_size()
    }

    /// The chunk size: unaligned writes and zeroing must hold their covering
    /// chunks exclusively (see the module doc).
    pub fn alignment(&self) -> u64 {
        self.header.chunk_size().max(self.base.alignment())
    }

    /// Both parts in RAM (a live image in RAM, an overlay on tmpfs).
    pub fn in_memory(&self) -> bool {
        self.file.in_memory() && self.base.in_memory()
    }

    /// The base's identity with the overlay's own id: another overlay over the
    /// same image is another device (a state file refuses it).
    pub fn ident(&self) -> DeviceIdent {
        let mut id = self.base.ident();
        let under = std::mem::take(&mut id.stack);
        id.stack = crate::identity::truncate(if under.is_empty() {
            format!("overlay {}", self.header.id_text())
        } else {
            format!("overlay {} on {under}", self.header.id_text())
        });
        id
    }

    /// What status shows.
    pub fn usage(&self) -> OverlayUsage {
        let bytes_used = self.file.allocated_bytes().unwrap_or_else(|_| self.space.used());
        OverlayUsage {
            path: self.path.display().to_string(),
            bytes_used,
            bytes_limit: self.space.limit(),
            chunks_present: self.map.count(),
            writes_refused: self.space.refused_total(),
        }
    }

    /// Changes `--overlay-limit` at runtime (`set-overlay-limit`; None: no
    /// limit). Refused when the header and map alone would not fit.
    pub fn set_limit(&self, limit: Option<u64>) -> Result<()> {
        let metadata = HEADER_LEN + self.header.map_len;
        if let Some(l) = limit {
            if l < metadata + self.header.chunk_size() {
                return Err(Error::Refused(format!(
                    "an overlay limit of {l} bytes leaves no room: the overlay's header and map alone take {metadata}"
                )));
            }
        }
        self.space.set_limit(limit);
        self.deliver_notices(false);
        Ok(())
    }

    /// Where the overlay's events go (set once, by the mirror).
    pub fn set_notifier(&self, f: Notifier) {
        let _ = self.notifier.set(f);
    }

    /// Hands pending notices to the notifier (`flush`: also a refusal count
    /// still waiting for its second).
    pub fn deliver_notices(&self, flush: bool) {
        let notices = self.space.take_notices(flush);
        if let Some(f) = self.notifier.get() {
            for n in notices {
                f(n);
            }
        }
    }

    /// The source was detached for good: remove the file once the device is
    /// closed (its space, RAM on tmpfs, comes back).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    fn data_off(&self, off: u64) -> u64 {
        self.header.data_offset + off
    }

    fn chunk_start(&self, c: u64) -> u64 {
        c << self.shift
    }

    fn chunk_end(&self, c: u64) -> u64 {
        ((c + 1) << self.shift).min(self.header.export_size)
    }

    /// The chunks `[off, end)` touches.
    fn chunks_touching(&self, off: u64, end: u64) -> std::ops::Range<u64> {
        (off >> self.shift)..((end - 1) >> self.shift) + 1
    }

    /// Reads `[off, off+len)`: runs the overlay holds from the file, the rest
    /// from the base.
    pub async fn read_at(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off + len as u64;
        let chunks = self.chunks_touching(off, end);
        let mut parts: Vec<Pin<Box<dyn Future<Output = io::Result<()>> + '_>>> = Vec::new();
        let mut pos = off;
        let mut c = chunks.start;
        while pos < end {
            let (run_end, present) = self.map.run_from(c, chunks.end);
            let stop = self.chunk_start(run_end).min(end);
            let (n, at) = ((stop - pos) as usize, buf_off + (pos - off) as usize);
            if stop == end && parts.is_empty() {
                // One run: no boxing.
                return if present {
                    self.file.read_at(buf, at, n, self.data_off(pos)).await
                } else {
                    self.base.read_at(buf, at, n, pos).await
                };
            }
            parts.push(if present {
                Box::pin(self.file.read_at(buf, at, n, self.data_off(pos)))
            } else {
                Box::pin(self.base.read_at(buf, at, n, pos))
            });
            pos = stop;
            c = run_end;
        }
        // One after the other: the runs are few (a read crosses a chunk boundary
        // where the overlay starts or stops holding data), and a file in RAM
        // answers at once.
        for part in parts {
            part.await?;
        }
        Ok(())
    }

    /// Writes `buf[buf_off..+len]` at `off` (the ordering in the module doc).
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
        let end = off + len as u64;
        let chunks = self.chunks_touching(off, end);
        if self.map.all_present(chunks.clone()) && self.all_allocated(chunks.clone()) {
            // Every chunk is held with its data: a plain write in place.
            return self.file.write_at(buf, buf_off, len, self.data_off(off), fua).await;
        }
        self.allocate(chunks.clone())?;
        let (head, tail) = (chunks.start, chunks.end - 1);
        // A chunk the write covers only in part, and the overlay does not hold
        // yet, is copied up: the base's bytes around the new ones, one piece.
        let copy_up = |c: u64| {
            let partial = off > self.chunk_start(c) || end < self.chunk_end(c);
            partial && !self.map.is_present(c)
        };
        let res = if head == tail && copy_up(head) {
            self.copy_up(head, buf, buf_off, off, end, fua).await
        } else {
            let head_up = copy_up(head);
            let tail_up = head != tail && copy_up(tail);
            let mid = (if head_up { self.chunk_end(head) } else { off })..(if tail_up {
                self.chunk_start(tail)
            } else {
                end
            });
            let h = async {
                match head_up {
                    true => self.copy_up(head, buf, buf_off, off, self.chunk_end(head), fua).await,
                    false => Ok(()),
                }
            };
            let t = async {
                match tail_up {
                    true => {
                        let from = self.chunk_start(tail);
                        self.copy_up(tail, buf, buf_off + (from - off) as usize, from, end, fua).await
                    }
                    false => Ok(()),
                }
            };
            let m = async {
                if mid.end <= mid.start {
                    return Ok(());
                }
                let at = buf_off + (mid.start - off) as usize;
                self.file.write_at(buf, at, (mid.end - mid.start) as usize, self.data_off(mid.start), fua).await
            };
            let (a, b, c) = tokio::join!(h, t, m);
            a.and(b).and(c)
        };
        // A failed write leaves its chunks counted (some of their pages may be
        // in the file) and their bits unset (they still read from the base).
        res?;
        self.make_present(chunks, fua).await
    }

    /// Writes chunk `c` whole: the base's bytes, with `buf[buf_off..]` over
    /// `[from, to)` (inside the chunk).
    async fn copy_up(
        &self,
        c: u64,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        from: u64,
        to: u64,
        fua: bool,
    ) -> io::Result<()> {
        let (start, stop) = (self.chunk_start(c), self.chunk_end(c));
        let n = (stop - start) as usize;
        let bounce = SharedBuf::new(IoBuf::new(n));
        self.base.read_at(&bounce, 0, n, start).await?;
        // SAFETY: the bounce buffer is ours alone now; `buf`'s range is only read
        // (write payloads are never written to while a write runs).
        unsafe {
            let src = buf.slice(buf_off, (to - from) as usize);
            bounce.slice_mut((from - start) as usize, src.len()).copy_from_slice(src);
        }
        self.file.write_at(&bounce, 0, n, self.data_off(start), fua).await
    }

    /// Writes zeroes over `[off, off+len)` (WRITE_ZEROES and TRIM alike):
    /// whole chunks become holes the overlay holds, giving their space back;
    /// the partial chunks at the edges are written, unless they are such holes
    /// already. Refused (ENOSPC) before anything changes when the edges need
    /// space that is not there.
    pub async fn zero(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let mut whole: Option<std::ops::Range<u64>> = None;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        for c in self.chunks_touching(off, end) {
            let (from, to) = (off.max(self.chunk_start(c)), end.min(self.chunk_end(c)));
            if from == self.chunk_start(c) && to == self.chunk_end(c) {
                // Whole chunks are contiguous: the middle of the range.
                whole = Some(whole.map_or(c..c + 1, |w| w.start..c + 1));
            } else if !self.map.is_present(c) || self.space.is_allocated(c) {
                // (a chunk held as a hole reads as zeroes already)
                partial.push((from, to));
            }
        }
        if !partial.is_empty() {
            let res = self.space.allocate_each(partial.iter().map(|&(from, _)| from >> self.shift));
            self.deliver_notices(false);
            res.map_err(|e| self.no_space(e))?;
            for &(from, to) in &partial {
                let zeroes = SharedBuf::new(IoBuf::zeroed((to - from) as usize));
                self.write_at(&zeroes, 0, (to - from) as usize, from, false).await?;
            }
        }
        if let Some(w) = whole {
            let (a, b) = (self.data_off(self.chunk_start(w.start)), self.data_off(self.chunk_start(w.end)));
            // Punched before the bits are set: a chunk that turns present must
            // read as zeroes at once, whatever a failed write left in the file.
            match self.file.discard(a, b - a).await {
                Ok(()) => self.space.release(w.clone()),
                // No hole punching here: zeroes written (the space stays used).
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.file.write_zeroes(a, b - a, false, false).await?;
                }
                Err(e) => return Err(e),
            }
            self.deliver_notices(false);
            self.make_present(w, false).await?;
        }
        if fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    fn all_allocated(&self, chunks: std::ops::Range<u64>) -> bool {
        chunks.into_iter().all(|c| self.space.is_allocated(c))
    }

    /// Counts `chunks`' space, or refuses the write.
    fn allocate(&self, chunks: std::ops::Range<u64>) -> io::Result<()> {
        let res = self.space.allocate(chunks);
        self.deliver_notices(false);
        res.map_err(|e| self.no_space(e))
    }

    /// ENOSPC, said as `StorageFull` (clients receive ENOSPC) with the reason.
    fn no_space(&self, NoSpace { wanted }: NoSpace) -> io::Error {
        io::Error::new(
            io::ErrorKind::StorageFull,
            format!("the overlay {} is full (--overlay-limit): {wanted} more bytes needed", self.path.display()),
        )
    }

    /// Sets `chunks`' map bits and waits until the map pages holding them are
    /// in the file (with `fua`, durable).
    async fn make_present(&self, chunks: std::ops::Range<u64>, fua: bool) -> io::Result<()> {
        let pages = self.map.mark(chunks);
        if pages.is_empty() {
            return Ok(());
        }
        self.committer.commit(&self.map, pages, &FileIo(self)).await?;
        if fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    /// Makes every completed write durable (data and map: one file).
    pub async fn flush(&self) -> io::Result<()> {
        self.file.flush().await
    }

    /// Allocation status: holes where the overlay holds a hole, the base's
    /// status where it holds nothing.
    pub async fn allocation(&self, off: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
        let end = off + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = off;
        while pos < end && out.len() < max_extents {
            let c = pos >> self.shift;
            let (run_end, present) = self.map.run_from(c, self.chunks_touching(off, end).end);
            let stop = self.chunk_start(run_end).min(end);
            let part = if present {
                self.file.allocation(self.data_off(pos), stop - pos, max_extents - out.len())?
            } else {
                self.base.allocation(pos, stop - pos, max_extents - out.len()).await?
            };
            let mut got = 0;
            for e in part {
                got += e.len;
                match out.last_mut() {
                    Some(last) if last.hole == e.hole => last.len += e.len,
                    _ => out.push(e),
                }
            }
            if got < stop - pos {
                break; // the part ran out of extents; the caller asks again
            }
            pos = stop;
        }
        Ok(out)
    }

    /// A hint for the base (the overlay file is in RAM or cached anyway).
    pub async fn prefetch(&self, off: u64, len: u64) -> io::Result<()> {
        self.base.prefetch(off, len).await
    }
}

impl Drop for OverlayDevice {
    fn drop(&mut self) {
        self.deliver_notices(true);
        if self.retired.load(Ordering::SeqCst) {
            // By its name as the system sees it now: a root storage daemon's
            // own root was emptied at switch_root (`/run` moved on).
            match std::fs::remove_file(crate::hostfs::locate(&self.path, None)) {
                Ok(()) => tracing::info!("removed the overlay {} (the source was detached)", self.path.display()),
                Err(e) => tracing::warn!("cannot remove the overlay {}: {e}", self.path.display()),
            }
        }
    }
}

/// The committer's view of the file.
struct FileIo<'a>(&'a OverlayDevice);

impl MapIo for FileIo<'_> {
    async fn sync_data(&self) -> io::Result<()> {
        // A file in RAM has nothing to sync (and nothing survives a power cut).
        if self.0.file.in_memory() {
            return Ok(());
        }
        self.0.file.flush().await
    }

    async fn write_page(&self, page: u64, bytes: Vec<u8>) -> io::Result<()> {
        let h = &self.0.header;
        let at = h.map_offset + page * MAP_PAGE;
        if self.0.file.in_memory() {
            // A page copied into RAM never waits: written here, not through the
            // ring, whose writes to tmpfs go to a kernel worker thread and back.
            return pwrite_all(self.0.file.raw_fd(), &bytes, at);
        }
        let b = SharedBuf::new(IoBuf::from_slice(&bytes));
        self.0.file.write_at(&b, 0, bytes.len(), at, false).await
    }
}
