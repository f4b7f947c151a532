//! One ublk request: decoded from the descriptor the kernel wrote, carried out
//! on the engine's [`BlockDevice`], answered with the result the driver
//! expects (bytes transferred, 0, or a negative errno).
//!
//! The mapping is one to one: READ and WRITE (with FUA) to read and write,
//! FLUSH to flush, DISCARD to trim, WRITE_ZEROES to write-zeroes, which may
//! unmap unless the kernel said NOUNMAP. Data moves by user copy: a WRITE's
//! bytes are read from the request with pread on `/dev/ublkcN` before the
//! engine writes them, a READ's are written into the request with pwrite
//! before it is committed ([`DataPort`]).

use std::io;

use engine::{BlockDevice, BufPool, IoBuf};

use crate::sys::{self, IoDesc};

/// A decoded request. Offsets and lengths are in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    },
    /// An operation this device never announced (zoned commands, WRITE_SAME).
    Unsupported(u8),
}

impl Request {
    pub fn decode(d: &IoDesc) -> Request {
        let offset = d.start_sector << 9;
        let len = (d.nr_sectors as u64) << 9;
        let fua = d.op_flags & sys::IO_F_FUA != 0;
        match d.op() {
            sys::IO_OP_READ => Request::Read { offset, len },
            sys::IO_OP_WRITE => Request::Write { offset, len, fua },
            sys::IO_OP_FLUSH => Request::Flush,
            sys::IO_OP_DISCARD => Request::Discard { offset, len, fua },
            sys::IO_OP_WRITE_ZEROES => {
                Request::WriteZeroes { offset, len, may_unmap: d.op_flags & sys::IO_F_NOUNMAP == 0, fua }
            }
            other => Request::Unsupported(other),
        }
    }

    /// Whether the request carries data to or from a buffer.
    pub fn data_len(&self) -> Option<u64> {
        match *self {
            Request::Read { len, .. } | Request::Write { len, .. } => Some(len),
            _ => None,
        }
    }
}

/// Where a request's data lives in the kernel: user copy on `/dev/ublkcN`.
pub trait DataPort {
    /// Copies the request's data (a WRITE's payload) into `buf`, whole.
    fn fetch(&self, buf: &mut [u8]) -> io::Result<()>;
    /// Copies `buf` (a READ's result) into the request, whole.
    fn deliver(&self, buf: &[u8]) -> io::Result<()>;
}

/// A request's data on the character device, at the offset that names its
/// queue and tag.
pub struct UserCopy {
    pub fd: std::os::fd::RawFd,
    pub offset: u64,
}

impl DataPort for UserCopy {
    fn fetch(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a live, writable buffer of `rest.len()` bytes.
            let n = unsafe {
                libc::pread(self.fd, rest.as_mut_ptr().cast(), rest.len(), (self.offset + done as u64) as libc::off_t)
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the request has fewer bytes than it says",
                    ))
                }
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

    fn deliver(&self, buf: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: `rest` is a live buffer of `rest.len()` bytes.
            let n = unsafe {
                libc::pwrite(self.fd, rest.as_ptr().cast(), rest.len(), (self.offset + done as u64) as libc::off_t)
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "the request takes fewer bytes than it says"))
                }
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
}

fn negative(errno: i32) -> i32 {
    -errno.abs().max(1)
}

/// Carries out `req` on `dev`, buffers from `pool`, data through `port`.
/// Returns what COMMIT_AND_FETCH reports to the kernel.
pub async fn execute<D: BlockDevice>(dev: &D, pool: &BufPool, req: Request, port: &impl DataPort) -> i32 {
    match req {
        Request::Read { offset, len } => {
            let Some(buf) = buffer(pool, len).await else { return negative(libc::EINVAL) };
            let (res, buf) = dev.read(offset, buf).await;
            if let Err(e) = res {
                return negative(e.errno());
            }
            match port.deliver(buf.as_slice()) {
                Ok(()) => len as i32,
                Err(e) => {
                    tracing::warn!("ublk: cannot hand {len} read bytes to the kernel: {e}");
                    negative(libc::EIO)
                }
            }
        }
        Request::Write { offset, len, fua } => {
            let Some(mut buf) = buffer(pool, len).await else { return negative(libc::EINVAL) };
            if let Err(e) = port.fetch(buf.as_mut_slice()) {
                tracing::warn!("ublk: cannot take {len} bytes to write from the kernel: {e}");
                return negative(libc::EIO);
            }
            match dev.write(offset, buf, fua).await {
                Ok(()) => len as i32,
                Err(e) => negative(e.errno()),
            }
        }
        Request::Flush => dev.flush().await.map_or_else(|e| negative(e.errno()), |()| 0),
        Request::Discard { offset, len, fua } => {
            dev.trim(offset, len, fua).await.map_or_else(|e| negative(e.errno()), |()| 0)
        }
        Request::WriteZeroes { offset, len, may_unmap, fua } => {
            dev.write_zeroes(offset, len, may_unmap, fua).await.map_or_else(|e| negative(e.errno()), |()| 0)
        }
        Request::Unsupported(op) => {
            tracing::debug!("ublk: operation {op} is not supported");
            negative(libc::EOPNOTSUPP)
        }
    }
}

/// A budgeted buffer for `len` bytes; `None` for a length no request can have
/// (the kernel never sends more than the device's largest request).
async fn buffer(pool: &BufPool, len: u64) -> Option<IoBuf> {
    if len == 0 || len > i32::MAX as u64 {
        return None;
    }
    pool.alloc(len as usize).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{Result as EResult, StatusExtent};
    use std::cell::RefCell;
    use std::sync::Mutex;

    fn desc(op: u8, flags: u32, sector: u64, sectors: u32) -> IoDesc {
        IoDesc { op_flags: op as u32 | flags, nr_sectors: sectors, start_sector: sector, addr: 0 }
    }

    #[test]
    fn descriptors_decode_to_what_they_mean() {
        assert_eq!(Request::decode(&desc(sys::IO_OP_READ, 0, 8, 8)), Request::Read { offset: 4096, len: 4096 });
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_WRITE, sys::IO_F_FUA, 1, 1)),
            Request::Write { offset: 512, len: 512, fua: true }
        );
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_WRITE, 0, 0, 2048)),
            Request::Write { offset: 0, len: 1 << 20, fua: false }
        );
        assert_eq!(Request::decode(&desc(sys::IO_OP_FLUSH, 0, 0, 0)), Request::Flush);
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_DISCARD, 0, 128, 128)),
            Request::Discard { offset: 65536, len: 65536, fua: false }
        );
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_WRITE_ZEROES, 0, 0, 16)),
            Request::WriteZeroes { offset: 0, len: 8192, may_unmap: true, fua: false }
        );
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_WRITE_ZEROES, sys::IO_F_NOUNMAP | sys::IO_F_FUA, 0, 16)),
            Request::WriteZeroes { offset: 0, len: 8192, may_unmap: false, fua: true }
        );
        assert_eq!(Request::decode(&desc(sys::IO_OP_WRITE_SAME, 0, 0, 8)), Request::Unsupported(sys::IO_OP_WRITE_SAME));
        assert_eq!(Request::decode(&desc(13, 0, 0, 8)), Request::Unsupported(13), "zone append");
        // Offsets past 2^32 sectors do not wrap.
        assert_eq!(
            Request::decode(&desc(sys::IO_OP_READ, 0, 1 << 33, 8)),
            Request::Read { offset: 1 << 42, len: 4096 }
        );
    }

    /// A device over a byte vector that records what was asked of it.
    struct Model {
        bytes: Mutex<Vec<u8>>,
        calls: Mutex<Vec<String>>,
        fail_with: Option<i32>,
    }

    impl Model {
        fn new(len: usize) -> Model {
            Model {
                bytes: Mutex::new((0..len).map(|i| (i % 251) as u8).collect()),
                calls: Mutex::default(),
                fail_with: None,
            }
        }
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn fail(&self) -> EResult<()> {
            match self.fail_with {
                Some(errno) => Err(engine::Error::io("model", io::Error::from_raw_os_error(errno))),
                None => Ok(()),
            }
        }
    }

    impl BlockDevice for Model {
        fn size(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn fast_zero(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, mut buf: IoBuf) -> (EResult<()>, IoBuf) {
            self.log(format!("read {offset} {}", buf.len()));
            if let Err(e) = self.fail() {
                return (Err(e), buf);
            }
            let b = self.bytes.lock().unwrap();
            let n = buf.len();
            buf.as_mut_slice().copy_from_slice(&b[offset as usize..offset as usize + n]);
            (Ok(()), buf)
        }
        async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> EResult<()> {
            self.log(format!("write {offset} {} fua={fua}", data.len()));
            self.fail()?;
            self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data.as_slice());
            Ok(())
        }
        async fn flush(&self) -> EResult<()> {
            self.log("flush".into());
            self.fail()
        }
        async fn trim(&self, offset: u64, len: u64, fua: bool) -> EResult<()> {
            self.log(format!("trim {offset} {len} fua={fua}"));
            self.fail()
        }
        async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> EResult<()> {
            self.log(format!("zeroes {offset} {len} unmap={may_unmap} fua={fua}"));
            self.fail()
        }
        async fn cache(&self, _offset: u64, _len: u64) -> EResult<()> {
            Ok(())
        }
        async fn block_status(&self, _o: u64, _l: u64, _m: usize) -> EResult<Vec<StatusExtent>> {
            Ok(Vec::new())
        }
    }

    /// The kernel's side of user copy: the request's pages as a vector.
    #[derive(Default)]
    struct Pages(RefCell<Vec<u8>>);

    impl DataPort for Pages {
        fn fetch(&self, buf: &mut [u8]) -> io::Result<()> {
            buf.copy_from_slice(&self.0.borrow()[..buf.len()]);
            Ok(())
        }
        fn deliver(&self, buf: &[u8]) -> io::Result<()> {
            *self.0.borrow_mut() = buf.to_vec();
            Ok(())
        }
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        engine::rt::block_on(f).expect("runtime")
    }

    #[test]
    fn reads_and_writes_move_the_bytes_and_report_their_length() {
        let dev = Model::new(1 << 16);
        let pool = BufPool::new(1 << 20);
        let pages = Pages::default();
        let r = run(execute(&dev, &pool, Request::Read { offset: 4096, len: 8192 }, &pages));
        assert_eq!(r, 8192);
        let want: Vec<u8> = (4096..4096 + 8192).map(|i| (i % 251) as u8).collect();
        assert_eq!(*pages.0.borrow(), want, "the read's bytes reach the request");

        *pages.0.borrow_mut() = vec![0xab; 512];
        let r = run(execute(&dev, &pool, Request::Write { offset: 512, len: 512, fua: true }, &pages));
        assert_eq!(r, 512);
        assert!(dev.bytes.lock().unwrap()[512..1024].iter().all(|&b| b == 0xab), "the request's bytes are written");
        assert_eq!(dev.calls.lock().unwrap()[1], "write 512 512 fua=true");
        assert_eq!(pool.budget_available(), 1 << 20, "every buffer's budget is given back");
    }

    #[test]
    fn the_other_operations_map_to_their_engine_calls() {
        let dev = Model::new(1 << 20);
        let pool = BufPool::new(1 << 20);
        let pages = Pages::default();
        assert_eq!(run(execute(&dev, &pool, Request::Flush, &pages)), 0);
        assert_eq!(run(execute(&dev, &pool, Request::Discard { offset: 0, len: 65536, fua: true }, &pages)), 0);
        let z = Request::WriteZeroes { offset: 4096, len: 4096, may_unmap: false, fua: false };
        assert_eq!(run(execute(&dev, &pool, z, &pages)), 0);
        assert_eq!(run(execute(&dev, &pool, Request::Unsupported(4), &pages)), -libc::EOPNOTSUPP);
        assert_eq!(
            *dev.calls.lock().unwrap(),
            vec!["flush", "trim 0 65536 fua=true", "zeroes 4096 4096 unmap=false fua=false"]
        );
    }

    #[test]
    fn engine_errors_become_negative_errnos() {
        let mut dev = Model::new(1 << 16);
        dev.fail_with = Some(libc::ENOSPC);
        let pool = BufPool::new(1 << 20);
        let pages = Pages(RefCell::new(vec![1; 4096]));
        assert_eq!(
            run(execute(&dev, &pool, Request::Write { offset: 0, len: 4096, fua: false }, &pages)),
            -libc::ENOSPC
        );
        dev.fail_with = Some(libc::EIO);
        assert_eq!(run(execute(&dev, &pool, Request::Read { offset: 0, len: 4096 }, &pages)), -libc::EIO);
        assert_eq!(run(execute(&dev, &pool, Request::Flush, &pages)), -libc::EIO);
        assert_eq!(pool.budget_available(), 1 << 20);
    }

    #[test]
    fn user_copy_moves_whole_buffers_through_a_file() {
        // The same calls the queue makes on /dev/ublkcN, on a plain file.
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 16).unwrap();
        let port = UserCopy { fd: std::os::fd::AsRawFd::as_raw_fd(&f), offset: 8192 };
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        port.deliver(&data).unwrap();
        let mut back = vec![0u8; 4096];
        port.fetch(&mut back).unwrap();
        assert_eq!(back, data);
        let past_end = UserCopy { fd: port.fd, offset: 1 << 16 };
        let e = past_end.fetch(&mut back).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "a short request is an error, not a partial buffer");
    }
}
