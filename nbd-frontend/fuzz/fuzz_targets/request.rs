//! Fuzzes request parsing and validation: the one place where a request from
//! the wire becomes a command the device executes.
//!
//! Input layout (missing bytes read as 0):
//!
//! | bytes  | meaning                                                        |
//! |--------|----------------------------------------------------------------|
//! | 0..28  | the request header as sent on the wire                        |
//! | 28     | session: bit 0 structured replies, bit 1 base:allocation       |
//! |        | negotiated (context id = bits 3-7), bit 2 read-only export     |
//! | 29..37 | export size (big-endian u64)                                   |
//! | 37..39 | transmission flags advertised to the client (big-endian u16)   |
//!
//! A header with a bad magic must be refused by `parse` with that magic; it is
//! then validated anyway with the magic corrected, so every input exercises
//! `validate`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_frontend::proto::*;
use nbd_frontend::request::{validate, Command, Session};

const WIRE_ERRNOS: [u32; 8] = [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN];

/// The range a command touches must lie inside the export, computed without
/// overflow.
fn in_bounds(offset: u64, len: u32, size: u64) -> bool {
    offset.checked_add(len as u64).is_some_and(|end| end <= size)
}

fuzz_target!(|data: &[u8]| {
    let mut input = [0u8; 39];
    let n = data.len().min(input.len());
    input[..n].copy_from_slice(&data[..n]);

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

    let cfg = input[28];
    let s = Session {
        structured: cfg & 1 != 0,
        base_allocation: (cfg & 2 != 0).then_some((cfg >> 3) as u32),
        read_only: cfg & 4 != 0,
        flags: u16::from_be_bytes([input[37], input[38]]),
    };
    let size = u64::from_be_bytes(input[29..37].try_into().unwrap());
    let advertised = |tf: u16| s.flags & tf != 0;

    match validate(&h, &s, size) {
        Err(rej) => {
            let want_skip = if h.kind == CMD_WRITE { h.len } else { 0 };
            assert_eq!(rej.skip, want_skip, "skip of a rejected {h:?}");
            assert!(WIRE_ERRNOS.contains(&rej.errno), "errno {} is not an NBD wire value", rej.errno);
            assert!(!rej.reason.is_empty());
        }
        Ok(cmd) => {
            let fua = h.flags & CMD_FLAG_FUA != 0;
            // Only flags defined for the command, and advertised, pass.
            let mut allowed = if advertised(TF_SEND_FUA) { CMD_FLAG_FUA } else { 0 };
            match h.kind {
                CMD_READ if s.structured && advertised(TF_SEND_DF) => allowed |= CMD_FLAG_DF,
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
            match cmd {
                Command::Read { offset, len } => {
                    assert_eq!(h.kind, CMD_READ);
                    assert!(len <= MAX_PAYLOAD, "READ of {len} bytes");
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len), (h.offset, h.len));
                }
                Command::Write { offset, len, fua: f } => {
                    assert_eq!(h.kind, CMD_WRITE);
                    assert!(len <= MAX_PAYLOAD, "WRITE of {len} bytes");
                    assert!(in_bounds(offset, len, size), "{cmd:?} past export size {size}");
                    assert_eq!((offset, len, f), (h.offset, h.len, fua));
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
