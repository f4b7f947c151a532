//! Reply encoding: one constructor per reply shape, each in the form the
//! session negotiated (simple replies, structured chunks, or extended chunks
//! that echo the request's offset). A reply also carries what its request holds
//! (the request slot, the payload charges), released once it is written.

use std::io::IoSlice;

use engine::{IoBuf, StatusExtent};

use crate::limits::{Charge, SlotGuard};
use crate::proto::*;
use crate::request::Session;

/// The longest reply head: an extended OFFSET_DATA header and its offset.
const MAX_HEAD: usize = EXTENDED_REPLY_LEN + 8;

/// The request a reply answers: its cookie, and its offset (extended replies
/// echo it).
#[derive(Debug, Clone, Copy)]
pub(super) struct To {
    pub(super) cookie: u64,
    pub(super) offset: u64,
}

/// One reply: a small header and an optional body.
pub(super) struct Reply {
    head: [u8; MAX_HEAD],
    head_len: u8,
    body: Body,
    /// Payload bytes charged to the connection, released once sent.
    charges: Vec<Charge>,
    /// The request's slot, released once sent.
    slot: Option<SlotGuard>,
}

enum Body {
    None,
    Buf(IoBuf),
    Bytes(Vec<u8>),
}

/// A chunk header in the form the session negotiated: extended (32 bytes)
/// or structured (20 bytes), for a payload of `len` bytes.
fn chunk(s: &Session, flags: u16, kind: u16, to: To, len: usize) -> ([u8; EXTENDED_REPLY_LEN], usize) {
    let mut h = [0u8; EXTENDED_REPLY_LEN];
    if s.extended {
        h = extended_reply(flags, kind, to.cookie, to.offset, len as u64);
        (h, EXTENDED_REPLY_LEN)
    } else {
        // Structured payloads here are at most the maximum payload plus a few
        // bytes, far below 4 GiB.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        h[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(flags, kind, to.cookie, len));
        (h, CHUNK_HEADER_LEN)
    }
}

impl Reply {
    fn new(head: &[u8], body: Body) -> Reply {
        let mut h = [0u8; MAX_HEAD];
        h[..head.len()].copy_from_slice(head);
        Reply { head: h, head_len: head.len() as u8, body, charges: Vec::new(), slot: None }
    }

    /// Success without data. Extended headers allow no simple reply.
    pub(super) fn ok(s: &Session, to: To) -> Reply {
        if s.extended {
            let (h, n) = chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, to, 0);
            return Reply::new(&h[..n], Body::None);
        }
        Reply::new(&simple_reply(0, to.cookie), Body::None)
    }

    /// An error: a simple reply with the errno, or with structured replies an
    /// error chunk that also carries `msg`.
    pub(super) fn error(s: &Session, to: To, errno: u32, msg: &str) -> Reply {
        if !s.structured {
            return Reply::new(&simple_reply(errno, to.cookie), Body::None);
        }
        let msg = crate::handshake::truncate_utf8(msg, MAX_STRING).as_bytes();
        let mut body = Vec::with_capacity(6 + msg.len());
        body.extend_from_slice(&errno.to_be_bytes());
        body.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        body.extend_from_slice(msg);
        let (h, n) = chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, to, body.len());
        Reply::new(&h[..n], Body::Bytes(body))
    }

    /// The device's error, with the errno the wire allows.
    pub(super) fn failed(s: &Session, to: To, e: &engine::Error) -> Reply {
        Reply::error(s, to, wire_errno(e.errno()), &e.to_string())
    }

    /// A READ's data: after a simple reply, or as one OFFSET_DATA chunk.
    pub(super) fn read_data(s: &Session, to: To, buf: IoBuf) -> Reply {
        if !s.structured {
            return Reply::new(&simple_reply(0, to.cookie), Body::Buf(buf));
        }
        if buf.is_empty() {
            let (h, n) = chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, to, 0);
            return Reply::new(&h[..n], Body::None);
        }
        // The data is all in memory, so no error can follow: the data chunk can
        // carry DONE itself (and one chunk satisfies DF).
        let (h, n) = chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, to, 8 + buf.len());
        let mut head = [0u8; MAX_HEAD];
        head[..n].copy_from_slice(&h[..n]);
        head[n..n + 8].copy_from_slice(&to.offset.to_be_bytes());
        Reply::new(&head[..n + 8], Body::Buf(buf))
    }

    /// One status chunk for `context`: 32-bit descriptors, or with extended
    /// headers the 64-bit ones of BLOCK_STATUS_EXT (the only kind allowed
    /// there).
    pub(super) fn block_status(s: &Session, to: To, context: u32, extents: &[StatusExtent]) -> Reply {
        let flags_of = |e: &StatusExtent| if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        let (kind, body) = if s.extended {
            let mut body = Vec::with_capacity(8 + 16 * extents.len());
            body.extend_from_slice(&context.to_be_bytes());
            body.extend_from_slice(&(extents.len() as u32).to_be_bytes());
            for e in extents {
                body.extend_from_slice(&e.len.to_be_bytes());
                body.extend_from_slice(&(flags_of(e) as u64).to_be_bytes());
            }
            (REPLY_TYPE_BLOCK_STATUS_EXT, body)
        } else {
            let mut body = Vec::with_capacity(4 + 8 * extents.len());
            body.extend_from_slice(&context.to_be_bytes());
            for e in extents {
                // Compact requests ask for at most 4 GiB, and extents are
                // clipped to the request (handle.rs).
                body.extend_from_slice(&u32::try_from(e.len).unwrap_or(u32::MAX).to_be_bytes());
                body.extend_from_slice(&flags_of(e).to_be_bytes());
            }
            (REPLY_TYPE_BLOCK_STATUS, body)
        };
        let (h, n) = chunk(s, REPLY_FLAG_DONE, kind, to, body.len());
        Reply::new(&h[..n], Body::Bytes(body))
    }

    /// Keeps the request's slot and payload charges until the reply is written.
    pub(super) fn holding(mut self, slot: SlotGuard, charges: Vec<Charge>) -> Reply {
        self.slot = Some(slot);
        self.charges = charges;
        self
    }

    /// Bytes of the body (what batching counts).
    pub(super) fn body_len(&self) -> usize {
        match &self.body {
            Body::None => 0,
            Body::Buf(b) => b.len(),
            Body::Bytes(v) => v.len(),
        }
    }

    /// Appends the reply's pieces (the head, then the body if any) for one
    /// vectored write.
    pub(super) fn push_slices<'a>(&'a self, slices: &mut Vec<IoSlice<'a>>) {
        slices.push(IoSlice::new(&self.head[..self.head_len as usize]));
        match &self.body {
            Body::None => {}
            Body::Buf(b) => slices.push(IoSlice::new(b.as_slice())),
            Body::Bytes(v) => slices.push(IoSlice::new(v)),
        }
    }
}
