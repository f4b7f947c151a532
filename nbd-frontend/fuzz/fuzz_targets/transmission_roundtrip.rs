//! Round trips of the fixed-size transmission encodings: a request header
//! (compact from the first 28 bytes, extended from the first 32) parsed from
//! arbitrary bytes encodes back to the same bytes, a header built from
//! arbitrary fields parses back to itself, and the reply encoders (simple,
//! structured, extended) put their fields where the protocol says.
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

    // Extended headers: bytes -> header -> bytes, fields -> bytes -> header.
    let mut x = [0u8; EXTENDED_REQUEST_LEN];
    let n = data.len().min(EXTENDED_REQUEST_LEN);
    x[..n].copy_from_slice(&data[..n]);
    match ExtendedRequestHeader::parse(&x) {
        Ok(e) => assert_eq!(e.encode(), x),
        Err(BadMagic(m)) => assert_eq!(m.to_be_bytes(), x[..4]),
    }
    let e = ExtendedRequestHeader {
        flags: h.flags,
        kind: h.kind,
        cookie: h.cookie,
        offset: h.offset,
        len: u64::from_le_bytes(x[24..32].try_into().unwrap()),
    };
    assert_eq!(ExtendedRequestHeader::parse(&e.encode()), Ok(e));
    let widened = ExtendedRequestHeader::from(h);
    assert_eq!(widened.len, h.len as u64);

    let r = extended_reply(e.flags, e.kind, e.cookie, e.offset, e.len);
    assert_eq!(r[..4], EXTENDED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(r[4..6], e.flags.to_be_bytes());
    assert_eq!(r[6..8], e.kind.to_be_bytes());
    assert_eq!(r[8..16], e.cookie.to_be_bytes());
    assert_eq!(r[16..24], e.offset.to_be_bytes());
    assert_eq!(r[24..32], e.len.to_be_bytes());
});
