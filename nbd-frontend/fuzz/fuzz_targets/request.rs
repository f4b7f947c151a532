//! Fuzzes request parsing and validation: the one place where a request from
//! the wire becomes a command the device executes, for compact (28-byte) and
//! extended (32-byte) headers.
//!
//! Input layout (missing bytes read as 0):
//!
//! | bytes  | meaning                                                        |
//! |--------|----------------------------------------------------------------|
//! | 0..32  | the request header as sent on the wire: 32 bytes with extended |
//! |        | headers, the first 28 otherwise                                |
//! | 32     | session: bit 0 structured replies, bit 1 base:allocation       |
//! |        | negotiated (context id = bits 3-7), bit 2 read-only export     |
//! | 33     | bit 0: extended headers; bits 1-2: advertised maximum payload  |
//! |        | (32 MiB, 1 MiB, 4 KiB, 3 MiB + 1)                              |
//! | 34..42 | export size (big-endian u64)                                   |
//! | 42..44 | transmission flags advertised to the client (big-endian u16)   |
//!
//! A header with a bad magic must be refused by `parse` with that magic; it is
//! then validated anyway with the magic corrected, so every input exercises
//! `validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_frontend::proto::*;
use nbd_frontend::request::{payload_len, validate, Command, Session};

const WIRE_ERRNOS: [u32; 8] = [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN];
const MAX_PAYLOADS: [u32; 4] = [MAX_PAYLOAD, 1 << 20, 4096, (3 << 20) + 1];

/// The range a command touches must lie inside the export, computed without
/// overflow.
fn in_bounds(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Parses the header in the session's form, correcting a bad magic.
fn header(input: &[u8; 44], extended: bool) -> ExtendedRequestHeader {
    if extended {
        let mut wire: [u8; EXTENDED_REQUEST_LEN] = input[..32].try_into().unwrap();
        let magic = u32::from_be_bytes(wire[..4].try_into().unwrap());
        let h = match ExtendedRequestHeader::parse(&wire) {
            Ok(h) => {
                assert_eq!(magic, EXTENDED_REQUEST_MAGIC);
                h
            }
            Err(e) => {
                assert_ne!(magic, EXTENDED_REQUEST_MAGIC);
                assert_eq!(e.0, magic);
                wire[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
                ExtendedRequestHeader::parse(&wire).expect("a header with the right magic parses")
            }
        };
        assert_eq!(h.encode(), wire);
        // A compact header is never read as an extended one, or back.
        let mut compact: [u8; REQUEST_LEN] = wire[..REQUEST_LEN].try_into().unwrap();
        assert!(RequestHeader::parse(&compact).is_err());
        compact[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        let mut as_ext = [0u8; EXTENDED_REQUEST_LEN];
        as_ext[..REQUEST_LEN].copy_from_slice(&compact);
        assert!(ExtendedRequestHeader::parse(&as_ext).is_err());
        h
    } else {
        let mut wire: [u8; REQUEST_LEN] = input[..REQUEST_LEN].try_into().unwrap();
        let magic = u32::from_be_bytes(wire[..4].try_into().unwrap());
        let h = match RequestHeader::parse(&wire) {
            Ok(h) => {
                assert_eq!(magic, REQUEST_MAGIC);
                h
            }
            Err(e) => {
                assert_ne!(magic, REQUEST_MAGIC);
                assert_eq!(e.0, magic);
                wire[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                RequestHeader::parse(&wire).expect("a header with the right magic parses")
            }
        };
        assert_eq!(h.encode(), wire);
        let wide = ExtendedRequestHeader::from(h);
        assert_eq!(
            (wide.flags, wide.kind, wide.cookie, wide.offset, wide.len),
            (h.flags, h.kind, h.cookie, h.offset, h.len as u64)
        );
        wide
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = [0u8; 44];
    let n = data.len().min(input.len());
    input[..n].copy_from_slice(&data[..n]);

    let cfg = input[32];
    let extended = input[33] & 1 != 0;
    let s = Session {
        structured: cfg & 1 != 0 || extended,
        extended,
        base_allocation: (cfg & 2 != 0).then_some((cfg >> 3) as u32),
        read_only: cfg & 4 != 0,
        flags: u16::from_be_bytes([input[42], input[43]]),
        max_payload: MAX_PAYLOADS[((input[33] >> 1) & 3) as usize],
    };
    let h = header(&input, extended);
    let size = u64::from_be_bytes(input[34..42].try_into().unwrap());
    let advertised = |tf: u16| s.flags & tf != 0;

    // What follows the header on the wire, whatever the verdict.
    let flagged = extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let want_payload = if h.kind == CMD_WRITE || flagged { h.len } else { 0 };
    assert_eq!(payload_len(&h, &s), want_payload, "payload of {h:?}");

    match validate(&h, &s, size) {
        Err(rej) => {
            assert_eq!(rej.skip, want_payload, "skip of a rejected {h:?}");
            assert!(WIRE_ERRNOS.contains(&rej.errno), "errno {} is not an NBD wire value", rej.errno);
            assert!(!rej.reason.is_empty());
        }
        Ok(cmd) => {
            let fua = h.flags & CMD_FLAG_FUA != 0;
            // Only flags defined for the command, and advertised, pass.
            let mut allowed = if advertised(TF_SEND_FUA) { CMD_FLAG_FUA } else { 0 };
            match h.kind {
                CMD_READ if s.structured && advertised(TF_SEND_DF) => allowed |= CMD_FLAG_DF,
                CMD_WRITE if extended => allowed |= CMD_FLAG_PAYLOAD_LEN,
                CMD_WRITE_ZEROES => {
                    allowed |= CMD_FLAG_NO_HOLE;
                    if advertised(TF_SEND_FAST_ZERO) {
                        allowed |= CMD_FLAG_FAST_ZERO;
                    }
                }
                CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
                _ => {}
            }
            assert_eq!(h.flags & !allowed, 0, "{h:?} accepted with flags outside {allowed:#x}");
            // Only a WRITE brings a payload; nothing else accepted has one.
            assert!(want_payload == 0 || matches!(cmd, Command::Write { .. }), "{cmd:?} accepted with a payload");
            // Commands that need an advertised flag pass only with it.
            for (kind, tf) in [
                (CMD_FLUSH, TF_SEND_FLUSH),
                (CMD_TRIM, TF_SEND_TRIM),
                (CMD_CACHE, TF_SEND_CACHE),
                (CMD_WRITE_ZEROES, TF_SEND_WRITE_ZEROES),
            ] {
                assert!(h.kind != kind || advertised(tf), "{h:?} accepted without its transmission flag");
            }
            if s.read_only {
                assert!(
                    !matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }),
                    "read-only session yielded {cmd:?}"
                );
            }
            if !extended {
                assert!(h.len <= u32::MAX as u64, "a compact header carried a 64-bit length");
            }
            match cmd {
                Command::Read { offset, len } => {
                    assert_eq!(h.kind, CMD_READ);
                    assert!(len <= s.max_payload, "READ of {len} bytes above {}", s.max_payload);
                    assert!(in_bounds(offset, len as u64, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len as u64), (h.offset, h.len));
                }
                Command::Write { offset, len, fua: f } => {
                    assert_eq!(h.kind, CMD_WRITE);
                    assert!(len <= s.max_payload, "WRITE of {len} bytes above {}", s.max_payload);
                    assert!(in_bounds(offset, len as u64, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len as u64, f), (h.offset, h.len, fua));
                    assert_eq!(want_payload, len as u64, "the payload is the write");
                }
                Command::Disconnect => {
                    assert_eq!(h.kind, CMD_DISC);
                    assert_eq!((h.offset, h.len), (0, 0));
                }
                Command::Flush => {
                    assert_eq!(h.kind, CMD_FLUSH);
                    assert_eq!((h.offset, h.len), (0, 0));
                }
                Command::Trim { offset, len, fua: f } => {
                    assert_eq!(h.kind, CMD_TRIM);
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len, f), (h.offset, h.len, fua));
                }
                Command::Cache { offset, len } => {
                    assert_eq!(h.kind, CMD_CACHE);
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len), (h.offset, h.len));
                }
                Command::WriteZeroes { offset, len, fua: f, may_unmap, fast } => {
                    assert_eq!(h.kind, CMD_WRITE_ZEROES);
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len, f), (h.offset, h.len, fua));
                    assert_eq!(may_unmap, h.flags & CMD_FLAG_NO_HOLE == 0);
                    assert_eq!(fast, h.flags & CMD_FLAG_FAST_ZERO != 0);
                }
                Command::BlockStatus { offset, len, req_one, context } => {
                    assert_eq!(h.kind, CMD_BLOCK_STATUS);
                    assert_eq!(Some(context), s.base_allocation, "BLOCK_STATUS without the negotiated context");
                    assert!(len > 0);
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len), (h.offset, h.len));
                    assert_eq!(req_one, h.flags & CMD_FLAG_REQ_ONE != 0);
                }
            }
        }
    }
});
