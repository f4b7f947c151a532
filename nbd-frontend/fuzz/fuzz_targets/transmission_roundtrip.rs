//! Round trips of the fixed-size transmission encodings: a request header
//! parsed from arbitrary bytes encodes back to the same bytes, a header built
//! from arbitrary fields parses back to itself, and the reply encoders put
//! their fields where the protocol says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_frontend::proto::*;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    b[..n].copy_from_slice(&data[..n]);

    // Bytes -> header -> bytes.
    match RequestHeader::parse(&b) {
        Ok(h) => assert_eq!(h.encode(), b),
        Err(BadMagic(m)) => assert_eq!(m.to_be_bytes(), b[..4]),
    }

    // Fields -> bytes -> header.
    let h = RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_le_bytes(b[24..28].try_into().unwrap()),
    };
    let wire = h.encode();
    assert_eq!(RequestHeader::parse(&wire), Ok(h));

    // Reply encoders.
    let r = simple_reply(h.len, h.cookie);
    assert_eq!(r[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(r[4..8], h.len.to_be_bytes());
    assert_eq!(r[8..16], h.cookie.to_be_bytes());

    let c = chunk_header(h.flags, h.kind, h.cookie, h.len);
    assert_eq!(c[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(c[4..6], h.flags.to_be_bytes());
    assert_eq!(c[6..8], h.kind.to_be_bytes());
    assert_eq!(c[8..16], h.cookie.to_be_bytes());
    assert_eq!(c[16..20], h.len.to_be_bytes());

    let o = option_reply(h.offset as u32, (h.offset >> 32) as u32, h.len);
    assert_eq!(o[..8], OPT_REPLY_MAGIC.to_be_bytes());
    assert_eq!(o[8..12], (h.offset as u32).to_be_bytes());
    assert_eq!(o[12..16], ((h.offset >> 32) as u32).to_be_bytes());
    assert_eq!(o[16..20], h.len.to_be_bytes());
});
