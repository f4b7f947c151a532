//! The overlay file outside the I/O path: the base's fingerprint, making a
//! new file, random ids, which chunks the file holds after a restart, and
//! positioned reads and writes that go to the end.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use bitvec::prelude::{BitVec, Lsb0};

use super::format::{self, BaseRecord, Header};
use crate::backend::Backend;
use crate::buf::{IoBuf, SharedBuf};
use crate::error::{Error, IoContext, Result};

/// The base's record for a new overlay (and to compare with an existing
/// one's): its size and a CRC32 of sampled blocks. Also the base's name.
pub(super) fn fingerprint(base: &Backend) -> Result<(BaseRecord, String)> {
    let size = base.size();
    let name = base.path().display().to_string();
    let ranges = format::fingerprint_ranges(size);
    // The base's reads are async (it may be remote): on a thread of its own,
    // whether or not the caller runs on an engine thread.
    let samples = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                crate::rt::block_on(async {
                    let mut out = Vec::with_capacity(ranges.len());
                    for &(at, len) in &ranges {
                        let b = SharedBuf::new(IoBuf::new(len as usize));
                        base.read_at(&b, 0, len as usize, at).await?;
                        // SAFETY: the read completed; the buffer is only read now.
                        out.push((at, unsafe { b.slice(0, len as usize) }.to_vec()));
                    }
                    Ok::<_, io::Error>(out)
                })
            })
            .join()
            .map_err(|_| io::Error::other("the fingerprint thread panicked"))
    });
    let samples =
        samples.and_then(|r| r).and_then(|r| r).ctx(|| format!("cannot read the image {name} to fingerprint it"))?;
    let record = BaseRecord { size, fingerprint: format::fingerprint_of(&samples), name: name.clone() };
    Ok((record, name))
}

/// Makes a new overlay in the empty file: header, zeroed map (allocated, so the
/// space count is exact from the start), the file's full length as a hole, and
/// all of it durable before it is used.
pub(super) fn create(fd: RawFd, path: &Path, base: &Backend, record: BaseRecord) -> Result<Header> {
    let shown = path.display();
    let header = Header::new(base.size(), random_id(), record);
    let ctx = |what: &str| format!("cannot make the overlay {shown}: {what}");
    pwrite_all(fd, &header.encode(), 0).ctx(|| ctx("writing its header"))?;
    // SAFETY: plain fallocate on our fd.
    if unsafe { libc::fallocate(fd, 0, header.map_offset as i64, header.map_len as i64) } != 0 {
        let e = io::Error::last_os_error();
        return Err(Error::io(ctx("allocating its map"), e));
    }
    // SAFETY: plain ftruncate on our fd.
    if unsafe { libc::ftruncate(fd, header.file_len() as i64) } != 0 {
        return Err(Error::io(ctx("setting its length"), io::Error::last_os_error()));
    }
    // SAFETY: plain fsync on our fd.
    if unsafe { libc::fsync(fd) } != 0 {
        return Err(Error::io(ctx("syncing it"), io::Error::last_os_error()));
    }
    if let Some(dir) = path.parent() {
        // The new name must survive a crash as well as the file.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    tracing::info!(
        "made the overlay {shown} over {} ({} bytes, {} chunks of {} bytes)",
        header.base.name,
        header.export_size,
        header.chunks(),
        header.chunk_size()
    );
    Ok(header)
}

/// 16 random bytes (the overlay's id).
fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `len` bytes into our buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Without getrandom, the time and pid still tell two overlays apart.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        id[..16].copy_from_slice(&t.to_le_bytes());
        id[12..16].copy_from_slice(&std::process::id().to_le_bytes());
    }
    id
}

/// Which chunks the file holds data for (SEEK_DATA/SEEK_HOLE over the data
/// area; a file system without them counts every chunk as held).
pub(super) fn allocated_chunks(fd: RawFd, h: &Header) -> io::Result<BitVec<u64, Lsb0>> {
    let chunks = h.chunks();
    let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, chunks as usize);
    let (start, end) = (h.data_offset, h.data_offset + chunks * h.chunk_size());
    let mut pos = start;
    while pos < end {
        // SAFETY: plain lseek on our fd.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // nothing but holes to the end
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    bits[((pos - start) / h.chunk_size()) as usize..].fill(true);
                    break;
                }
                _ => return Err(e),
            }
        }
        let data = (data as u64).max(pos);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).clamp(data + 1, end);
        let first = (data - start) / h.chunk_size();
        let last = (hole - start).div_ceil(h.chunk_size());
        bits[first as usize..last as usize].fill(true);
        pos = hole;
    }
    Ok(bits)
}

/// Reads up to `buf.len()` bytes at `off`; returns how many (short at the end).
pub(super) fn pread_full(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length stay within `buf`.
        let n = unsafe {
            libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, (off + done as u64) as libc::off_t)
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}

pub(super) fn pwrite_all(fd: RawFd, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length stay within `buf`.
        let n = unsafe {
            libc::pwrite(fd, buf[done..].as_ptr().cast(), buf.len() - done, (off + done as u64) as libc::off_t)
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "the file accepted no bytes")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
