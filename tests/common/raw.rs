//! A raw NBD client on blocking sockets, for tests that must send exactly what
//! a hostile or broken client would: no library in between that refuses or
//! fixes anything.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub fn raw_connect(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
    let hflags = u16::from_be_bytes([g[16], g[17]]);
    assert_eq!(hflags & 3, 3, "server does not offer FIXED_NEWSTYLE | NO_ZEROES");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    s
}

pub fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

/// Handshake by hand with NBD_OPT_EXPORT_NAME: no structured replies.
pub fn raw_handshake(sock: &Path, export: &str) -> UnixStream {
    let mut s = raw_connect(sock);
    send_option(&mut s, 1, export.as_bytes());
    let mut b = [0u8; 10];
    s.read_exact(&mut b).expect("export size and flags");
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert_ne!(flags & 1, 0, "HAS_FLAGS not set in {flags:#x}");
    s
}

pub fn raw_request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32) {
    s.write_all(&request_bytes(kind, 0, cookie, offset, len)).unwrap();
}

/// A READ with a simple reply works on this raw connection.
pub fn raw_read_roundtrip(s: &mut UnixStream, offset: u64, len: u32) -> Vec<u8> {
    raw_request(s, 0, 0x1234_5678_9abc_def0, offset, len);
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("simple reply");
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
    assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 0, "read failed");
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 0x1234_5678_9abc_def0, "cookie");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).expect("read payload");
    data
}

/// The server closes `s` (EOF or reset) within 10 s; whatever it sends first
/// is discarded.
pub fn assert_closed(s: &mut UnixStream, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("{what}: the server did not close the connection")
            }
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: the server keeps sending and never closes");
    }
}

/// One request on the wire, with flags.
pub fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Reads one simple reply header: (error, cookie).
pub fn read_simple_reply(s: &mut impl Read) -> std::io::Result<(u32, u64)> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r)?;
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "reply magic");
    Ok((u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap())))
}
