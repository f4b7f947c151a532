//! NBD_OPT_EXTENDED_HEADERS on raw sockets: the option's rules, 32-byte
//! requests with 64-bit lengths, 32-byte replies that echo the offset,
//! BLOCK_STATUS_EXT, and the payload rules (refuse, skip what is bounded,
//! hang up beyond). qemu's client negotiates the extension by itself; its
//! tests are in interop_qemu.rs.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::raw::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ACK: u32 = 1;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) | 10;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FUA: u16 = 1;
const FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;
const TYPE_ERROR: u16 = (1 << 15) | 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const GIB: u64 = 1 << 30;

fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    let u = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut data = vec![0u8; u(16) as usize];
    s.read_exact(&mut data).unwrap();
    (u(8), u(12), data)
}

fn meta_query() -> Vec<u8> {
    let q = b"base:allocation";
    let mut d = 0u32.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(q.len() as u32).to_be_bytes());
    d.extend_from_slice(q);
    d
}

/// Extended headers, base:allocation and GO; returns the stream and the
/// metadata context id.
fn negotiate(sock: &std::path::Path) -> (UnixStream, u32) {
    let mut s = raw_connect(sock);
    send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    send_option(&mut s, OPT_SET_META_CONTEXT, &meta_query());
    let (_, kind, data) = option_reply(&mut s);
    assert_eq!(kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    send_option(&mut s, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    loop {
        let (_, kind, _) = option_reply(&mut s);
        if kind == REP_ACK {
            break;
        }
    }
    (s, id)
}

fn ext_request(s: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, len: u64, payload: &[u8]) {
    let mut b = EXT_REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

/// One extended reply chunk; anything else on the wire fails the test.
fn chunk(s: &mut UnixStream) -> Chunk {
    let mut h = [0u8; 32];
    s.read_exact(&mut h).expect("an extended reply");
    assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), EXT_REPLY_MAGIC, "extended reply magic in {h:02x?}");
    let len = u64::from_be_bytes(h[24..32].try_into().unwrap());
    assert!(len < 64 << 20, "reply length {len}");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).unwrap();
    Chunk {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
        payload,
    }
}

/// The reply to a request without data: a final NONE chunk, or an error.
fn status_of(s: &mut UnixStream, cookie: u64, offset: u64) -> u32 {
    let c = chunk(s);
    assert_eq!((c.cookie, c.offset, c.flags & 1), (cookie, offset, 1), "{c:?}");
    match c.kind {
        TYPE_NONE => 0,
        TYPE_ERROR => u32::from_be_bytes(c.payload[..4].try_into().unwrap()),
        k => panic!("unexpected chunk type {k}: {c:?}"),
    }
}

fn read_ext(s: &mut UnixStream, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    ext_request(s, CMD_READ, 0, cookie, offset, len, &[]);
    let c = chunk(s);
    assert_eq!((c.kind, c.cookie, c.offset, c.flags & 1), (TYPE_OFFSET_DATA, cookie, offset, 1), "{c:?}");
    assert_eq!(u64::from_be_bytes(c.payload[..8].try_into().unwrap()), offset, "the data's own offset");
    c.payload[8..].to_vec()
}

/// (length, flags) descriptors of one BLOCK_STATUS_EXT reply.
fn block_status(s: &mut UnixStream, id: u32, cookie: u64, offset: u64, len: u64) -> Vec<(u64, u64)> {
    ext_request(s, CMD_BLOCK_STATUS, 0, cookie, offset, len, &[]);
    let c = chunk(s);
    assert_eq!((c.kind, c.cookie, c.offset), (TYPE_BLOCK_STATUS_EXT, cookie, offset), "{c:?}");
    let p = &c.payload;
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), id);
    let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert!(n > 0);
    assert_eq!(p.len(), 8 + 16 * n, "descriptor count matches the length");
    (0..n)
        .map(|i| {
            let d = &p[8 + 16 * i..];
            (u64::from_be_bytes(d[..8].try_into().unwrap()), u64::from_be_bytes(d[8..16].try_into().unwrap()))
        })
        .collect()
}

#[test]
fn extended_requests_and_replies_with_64_bit_lengths() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 8 * GIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&img)]);
    let (mut s, id) = negotiate(&d.sock);

    // WRITE with the payload flag (the spec's form) and without it (qemu's):
    // both carry their payload.
    let a = pattern(1, 8192);
    ext_request(&mut s, CMD_WRITE, FLAG_PAYLOAD_LEN | FLAG_FUA, 1, 4096, 8192, &a);
    assert_eq!(status_of(&mut s, 1, 4096), 0);
    let b = pattern(2, 4096);
    ext_request(&mut s, CMD_WRITE, 0, 2, 5 * GIB, 4096, &b);
    assert_eq!(status_of(&mut s, 2, 5 * GIB), 0);
    assert_eq!(read_ext(&mut s, 3, 4096, 8192), a);
    assert_eq!(read_ext(&mut s, 4, 5 * GIB, 4096), b);
    ext_request(&mut s, CMD_FLUSH, 0, 5, 0, 0, &[]);
    assert_eq!(status_of(&mut s, 5, 0), 0);

    // Block status over more than 4 GiB: 64-bit lengths and flags.
    let ext = block_status(&mut s, id, 6, 0, 6 * GIB);
    let total: u64 = ext.iter().map(|e| e.0).sum();
    assert!(total >= 6 * GIB - 4096 * 4 && ext.iter().all(|e| e.1 >> 32 == 0), "{ext:?}");
    assert!(ext.iter().any(|e| e.1 & 3 == 0), "the written data shows as data: {ext:?}");

    // WRITE_ZEROES and TRIM of 5 GiB in one request (beyond any 32-bit length).
    ext_request(&mut s, CMD_WRITE_ZEROES, 0, 7, 4096, 5 * GIB + 4096, &[]);
    assert_eq!(status_of(&mut s, 7, 4096), 0);
    assert_eq!(read_ext(&mut s, 8, 5 * GIB, 4096), vec![0u8; 4096], "zeroed past 4 GiB");
    ext_request(&mut s, CMD_TRIM, 0, 9, 0, 8 * GIB, &[]);
    assert_eq!(status_of(&mut s, 9, 0), 0);
    let ext = block_status(&mut s, id, 10, 0, 8 * GIB);
    assert!(ext.iter().all(|e| e.1 & 2 != 0), "everything reads as zeroes after the trim: {ext:?}");

    // Errors are extended chunks too, with the request's offset.
    ext_request(&mut s, CMD_READ, 0, 11, 8 * GIB - 1, 2, &[]);
    assert_eq!(status_of(&mut s, 11, 8 * GIB - 1), EINVAL);
    ext_request(&mut s, CMD_WRITE_ZEROES, 0, 12, 7 * GIB, 2 * GIB, &[]);
    assert_eq!(status_of(&mut s, 12, 7 * GIB), ENOSPC);
    assert_eq!(d.state(), "serving");
    ext_request(&mut s, CMD_DISC, 0, 13, 0, 0, &[]);
    assert_closed(&mut s, "after DISC");
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn payloads_are_refused_skipped_or_hung_up_on() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    make_sparse(&img, 64 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", p(&img)]);
    let (mut s, _) = negotiate(&d.sock);
    // A payload on a command without a payload form: refused, consumed.
    ext_request(&mut s, CMD_READ, FLAG_PAYLOAD_LEN, 1, 0, 100, &[0x55; 100]);
    assert_eq!(status_of(&mut s, 1, 0), EINVAL);
    ext_request(&mut s, CMD_BLOCK_STATUS, FLAG_PAYLOAD_LEN, 2, 0, 12, &[0; 12]);
    assert_eq!(status_of(&mut s, 2, 0), EINVAL);
    // A write above the advertised maximum (32 MiB) is refused and skipped...
    let big = vec![0x66u8; (32 << 20) + 4096];
    ext_request(&mut s, CMD_WRITE, FLAG_PAYLOAD_LEN, 3, 0, big.len() as u64, &big);
    assert_eq!(status_of(&mut s, 3, 0), EINVAL);
    // ...and the stream is still in sync.
    assert_eq!(read_ext(&mut s, 4, 0, 4096), vec![0u8; 4096], "the refused write wrote nothing");
    // A read longer than the maximum payload: refused, nothing to skip.
    ext_request(&mut s, CMD_READ, 0, 5, 0, (32 << 20) + 1, &[]);
    assert_eq!(status_of(&mut s, 5, 0), EINVAL);
    assert_eq!(read_ext(&mut s, 6, 4096, 512).len(), 512);
    // A payload announced beyond twice the maximum is not skipped: hang up.
    ext_request(&mut s, CMD_WRITE, FLAG_PAYLOAD_LEN, 7, 0, 1 << 40, &[]);
    assert_eq!(status_of(&mut s, 7, 0), EINVAL);
    assert_closed(&mut s, "a terabyte payload");
    // A compact request after extended headers were negotiated: out of sync.
    let (mut s, _) = negotiate(&d.sock);
    s.write_all(&request_bytes(CMD_READ, 0, 1, 0, 512)).unwrap();
    s.write_all(&[0u8; 4]).unwrap();
    assert_closed(&mut s, "a compact header in extended mode");
    assert_eq!(d.state(), "serving");
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn the_option_follows_the_spec() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    make_sparse(&img, 1 << 20);
    let d = Daemon::start(dir.path(), &["--source", p(&img)]);
    let mut s = raw_connect(&d.sock);
    send_option(&mut s, OPT_EXTENDED_HEADERS, b"data");
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID, "no data allowed");
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK, "structured replies first are fine");
    send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ACK);
    send_option(&mut s, OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ERR_INVALID, "already negotiated");
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s).1, REP_ERR_EXT_HEADER_REQD, "extended headers take precedence");
    // EXPORT_NAME is forbidden now, and cannot be refused: hang up.
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    assert_closed(&mut s, "EXPORT_NAME after extended headers");
    assert_eq!(d.state(), "serving");
}
