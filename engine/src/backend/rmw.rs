//! Read-modify-write, written once for every device whose transfers must be
//! aligned: a local file or block device under O_DIRECT, a remote export with
//! a minimum block size. A device implements [`AlignedIo`]'s aligned transfers
//! and gets the unaligned ones.
//!
//! An unaligned read goes through a bounce buffer covering its range. An
//! unaligned write reads the partial blocks at either end of its covering
//! range into a bounce buffer, puts its bytes between them and writes the
//! whole range. Nothing may change those edge blocks between that read and
//! that write: the caller holds the covering range exclusively (the mirror's
//! write path takes its lock in that shape, `mirror/write.rs`).

use std::io;
use std::sync::Arc;

use crate::buf::{IoBuf, SharedBuf};

/// The aligned transfers of a device, and the unaligned ones built on them
/// (provided: a device implements the aligned three).
#[allow(async_fn_in_trait)]
pub trait AlignedIo {
    /// The offset and length alignment its transfers need.
    fn transfer_alignment(&self) -> u64;

    /// Reads the aligned `[off, off+len)` into `buf[buf_off..buf_off+len]`.
    async fn read_aligned(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()>;

    /// Writes `buf[buf_off..buf_off+len]` at the aligned `off`.
    async fn write_aligned(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()>;

    /// Reads `[off, off+len)` into `buf[buf_off..buf_off+len]` through an
    /// aligned bounce buffer. The range of `buf` must be the caller's alone.
    async fn read_unaligned(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        let (start, end) = covering(off, len as u64, self.transfer_alignment());
        let bounce = SharedBuf::new(IoBuf::new((end - start) as usize));
        self.read_aligned(&bounce, 0, (end - start) as usize, start).await?;
        let from = (off - start) as usize;
        // SAFETY: the caller guarantees exclusive use of this range of `buf`;
        // the bounce buffer is ours alone and its read is done.
        unsafe { buf.slice_mut(buf_off, len).copy_from_slice(bounce.slice(from, len)) };
        Ok(())
    }

    /// Writes `data` at `off` by read-modify-write of its covering aligned
    /// range, which the caller holds exclusively.
    async fn write_unaligned(&self, data: &[u8], off: u64, fua: bool) -> io::Result<()> {
        let a = self.transfer_alignment();
        let end = off + data.len() as u64;
        let (start, aend) = covering(off, data.len() as u64, a);
        let total = (aend - start) as usize;
        let bounce = SharedBuf::new(IoBuf::new(total));
        let head_partial = !off.is_multiple_of(a);
        let tail_partial = !end.is_multiple_of(a);
        if head_partial {
            self.read_aligned(&bounce, 0, a as usize, start).await?;
        }
        // One block holding both partial ends is read once.
        if tail_partial && (aend - a != start || !head_partial) {
            self.read_aligned(&bounce, (aend - a - start) as usize, a as usize, aend - a).await?;
        }
        let from = (off - start) as usize;
        // SAFETY: the bounce buffer is ours alone and its reads are done.
        unsafe { bounce.slice_mut(from, data.len()) }.copy_from_slice(data);
        self.write_aligned(&bounce, 0, total, start, fua).await
    }
}

/// The aligned range `[start, end)` covering `[off, off+len)`.
fn covering(off: u64, len: u64, align: u64) -> (u64, u64) {
    (off - off % align, (off + len).div_ceil(align) * align)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A device in memory that accepts only aligned transfers and counts the
    /// bytes it reads.
    struct Aligned {
        bytes: Mutex<Vec<u8>>,
        align: u64,
        read_bytes: Mutex<usize>,
    }

    impl Aligned {
        fn check(&self, len: usize, off: u64) -> io::Result<()> {
            if !off.is_multiple_of(self.align) || !(len as u64).is_multiple_of(self.align) {
                return Err(io::Error::other(format!("unaligned transfer {off}+{len}")));
            }
            Ok(())
        }
    }

    impl AlignedIo for Aligned {
        fn transfer_alignment(&self) -> u64 {
            self.align
        }

        async fn read_aligned(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
            self.check(len, off)?;
            *self.read_bytes.lock().unwrap() += len;
            let src = self.bytes.lock().unwrap();
            // SAFETY: the test owns `buf`; nothing else touches it.
            unsafe { buf.slice_mut(buf_off, len) }.copy_from_slice(&src[off as usize..off as usize + len]);
            Ok(())
        }

        async fn write_aligned(
            &self,
            buf: &Arc<SharedBuf>,
            buf_off: usize,
            len: usize,
            off: u64,
            _fua: bool,
        ) -> io::Result<()> {
            self.check(len, off)?;
            // SAFETY: the test owns `buf`; nothing else writes it.
            let data = unsafe { buf.slice(buf_off, len) };
            self.bytes.lock().unwrap()[off as usize..off as usize + len].copy_from_slice(data);
            Ok(())
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    /// Every offset and length within four blocks, for three alignments:
    /// the device sees only aligned transfers, a write changes exactly its
    /// bytes and reads at most its two partial edge blocks, and a read
    /// returns exactly the bytes asked for.
    #[test]
    fn every_unaligned_range_is_served_by_aligned_transfers() {
        for align in [1u64, 4, 8] {
            let size = 4 * align as usize;
            let initial: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            for off in 0..size {
                for len in 1..=size - off {
                    let dev = Aligned { bytes: Mutex::new(initial.clone()), align, read_bytes: Mutex::new(0) };
                    let data: Vec<u8> = (0..len).map(|i| 0x80 | i as u8).collect();
                    block_on(dev.write_unaligned(&data, off as u64, false)).unwrap();
                    let mut want = initial.clone();
                    want[off..off + len].copy_from_slice(&data);
                    assert_eq!(*dev.bytes.lock().unwrap(), want, "write of {len} at {off}, alignment {align}");
                    let partial = |at: usize| usize::from(!(at as u64).is_multiple_of(align));
                    let edges = partial(off) + partial(off + len);
                    assert!(
                        *dev.read_bytes.lock().unwrap() <= edges * align as usize,
                        "write of {len} at {off}, alignment {align}: read more than its partial edges"
                    );

                    let buf = SharedBuf::new(IoBuf::zeroed(len + 3));
                    block_on(dev.read_unaligned(&buf, 3, len, off as u64)).unwrap();
                    // SAFETY: the read is done; the test owns `buf`.
                    let got = unsafe { buf.slice(0, len + 3) };
                    assert_eq!(&got[..3], &[0, 0, 0], "a read wrote before its range");
                    assert_eq!(&got[3..], &want[off..off + len], "read of {len} at {off}, alignment {align}");
                }
            }
        }
    }
}
