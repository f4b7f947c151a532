//! NBD wire constants and the fixed-size message encodings (doc/proto.md of the
//! NetworkBlockDevice project). Everything is big-endian on the wire.

/// The greeting's first 8 bytes (`NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// The greeting's second 8 bytes, and the magic opening every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Opens every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Opens a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Opens a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Opens a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Opens an extended (32-byte) request, after NBD_OPT_EXTENDED_HEADERS.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Opens an extended (32-byte) reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after NBD_OPT_EXPORT_NAME may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
/// Transmission flag: the flags field is valid (always set).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is accepted.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the FUA command flag is accepted.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is a rotating disk (a scheduling hint).
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: TRIM is accepted.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES is accepted.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the DF (do not fragment) command flag is accepted.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see each other's writes once flushed.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: RESIZE is accepted.
pub const TF_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: CACHE is accepted.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the FAST_ZERO command flag is accepted.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
/// Option: choose the export and end the handshake (no reply on success).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake without an export.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS on this connection.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and end the handshake with it.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: choose metadata contexts (`base:allocation`).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use 32-byte extended request and reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
/// Option reply: done, success.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context and its id.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: the option is not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
/// Option error: the option is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
/// Option error: not available on this platform.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) | 4;
/// Option error: TLS must be started first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;
/// Option error: the client must accept block size constraints.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) | 8;
/// Option error: the request or reply would be too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;
/// Option error: extended headers must be negotiated first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) | 10;

// Info types.
/// Info: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// Info: the export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Command: the range's contents are not needed (a hint).
pub const CMD_TRIM: u16 = 4;
/// Command: the range will be read soon (a hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: report the range's status in the negotiated contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Command flag: durable before the reply (force unit access).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag of WRITE_ZEROES: keep the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag of READ: reply in one data chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag of BLOCK_STATUS: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag of WRITE_ZEROES: fail unless zeroing is faster than writing.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the length field is a payload that follows.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
/// Chunk flag: the last chunk of its reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no data (success).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: 32-bit block status extents of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// 64-bit extents, the only block status chunk with extended headers.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: an error at an offset, with a message.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Errors on the wire.
/// Wire errno: operation not permitted.
pub const EPERM: u32 = 1;
/// Wire errno: input/output error.
pub const EIO: u32 = 5;
/// Wire errno: out of memory (a payload the budget cannot take).
pub const ENOMEM: u32 = 12;
/// Wire errno: invalid request.
pub const EINVAL: u32 = 22;
/// Wire errno: no space (a write past the end).
pub const ENOSPC: u32 = 28;
/// Wire errno: the reply would be too large.
pub const EOVERFLOW: u32 = 75;
/// Wire errno: not supported (a refused fast zero).
pub const ENOTSUP: u32 = 95;
/// Wire errno: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// A compact request header's length.
pub const REQUEST_LEN: usize = 28;
/// A simple reply header's length.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// A structured reply chunk header's length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// An extended request header's length.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// An extended reply chunk header's length.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Strings in the protocol are at most this long.
pub const MAX_STRING: usize = 4096;
/// The largest payload we accept or send in one request (the spec's default).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The smallest preferred block size we advertise (a page).
pub const PREFERRED_BLOCK: u32 = 4096;
/// The minimum block size we advertise: any byte is addressable.
pub const MIN_BLOCK: u32 = 1;
/// The kernel's NBD client takes logical block sizes from 512 to a page.
const KERNEL_MIN_BLOCK: u32 = 512;
const KERNEL_MAX_BLOCK: u32 = 4096;

/// What NBD_INFO_BLOCK_SIZE tells a client, and what the kernel attach uses:
/// one source so the two cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest length and alignment a request may have.
    pub minimum: u32,
    /// Requests aligned to this avoid read-modify-write behind the export.
    pub preferred: u32,
    /// Largest READ or WRITE payload the server accepts.
    pub maximum: u32,
}

impl BlockSizes {
    /// The sizes for a device whose transfers need `alignment` (1: any) and a
    /// server that accepts payloads up to `max_payload`.
    ///
    /// The minimum stays 1: the engine turns unaligned requests into
    /// read-modify-writes itself, so every byte is addressable. The preferred
    /// size is where that stops: the devices' alignment, at least a page (the
    /// buffers and the page cache work in pages). The spec wants it a power
    /// of two, at least 512 and at most the maximum.
    pub(crate) fn for_device(alignment: u64, max_payload: u32) -> BlockSizes {
        let maximum = max_payload.max(PREFERRED_BLOCK);
        let align = u32::try_from(alignment.max(1)).unwrap_or(u32::MAX);
        let preferred = align.checked_next_power_of_two().unwrap_or(1 << 31).max(PREFERRED_BLOCK);
        // A maximum that is not a power of two still has a power-of-two floor.
        let cap = 1u32 << (31 - maximum.leading_zeros());
        BlockSizes { minimum: MIN_BLOCK, preferred: preferred.min(cap), maximum }
    }

    /// The logical block size for the kernel's NBD client: the smallest one
    /// it takes that honours the minimum (the kernel then never sends less).
    pub(crate) fn kernel_block_size(&self) -> u32 {
        self.minimum.max(KERNEL_MIN_BLOCK).next_power_of_two().min(KERNEL_MAX_BLOCK)
    }
}

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes::for_device(1, MAX_PAYLOAD)
    }
}
/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Maps a host errno to the small set of values NBD allows on the wire.
pub(crate) fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A request header as read off the wire (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Where the command starts.
    pub offset: u64,
    /// How many bytes it covers.
    pub len: u32,
}

/// A header that does not start with the magic its form needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Reads a compact header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// The header on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A request of either form, its length widened to 64 bits: what
/// [`crate::request::validate`] checks. Compact headers convert into it; the
/// 32-byte extended header is this on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedRequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// Echoed in the reply.
    pub cookie: u64,
    /// Where the command starts.
    pub offset: u64,
    /// How many bytes it covers, or with `CMD_FLAG_PAYLOAD_LEN` its payload's length.
    pub len: u64,
}

impl From<RequestHeader> for ExtendedRequestHeader {
    fn from(h: RequestHeader) -> Self {
        ExtendedRequestHeader { flags: h.flags, kind: h.kind, cookie: h.cookie, offset: h.offset, len: h.len as u64 }
    }
}

impl ExtendedRequestHeader {
    /// Reads an extended header.
    pub fn parse(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<ExtendedRequestHeader, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(ExtendedRequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            len: u64::from_be_bytes([b[24], b[25], b[26], b[27], b[28], b[29], b[30], b[31]]),
        })
    }

    /// The header on the wire.
    pub fn encode(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// An extended reply chunk header: like a structured one, plus the request's
/// offset and a 64-bit payload length.
pub fn extended_reply(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply header: the errno (0 for success) and the cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply header (followed by `len` bytes of data).
pub fn option_reply(opt: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&opt.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let h = RequestHeader { flags: 3, kind: CMD_WRITE, cookie: 0xdead_beef_0102_0304, offset: 1 << 40, len: 4096 };
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] = 0;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn extended_request_round_trip_and_widening() {
        let h = ExtendedRequestHeader {
            flags: CMD_FLAG_PAYLOAD_LEN,
            kind: CMD_WRITE,
            cookie: 9,
            offset: 1 << 50,
            len: 5 << 32,
        };
        assert_eq!(ExtendedRequestHeader::parse(&h.encode()), Ok(h));
        assert_eq!(ExtendedRequestHeader::parse(&[0u8; 32]), Err(BadMagic(0)));
        let c = RequestHeader { flags: 1, kind: CMD_READ, cookie: 3, offset: 4, len: u32::MAX };
        assert_eq!(ExtendedRequestHeader::from(c).len, u32::MAX as u64);
        let r = extended_reply(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, 4096, 1 << 33);
        assert_eq!(&r[..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[16..24], &4096u64.to_be_bytes());
        assert_eq!(&r[24..32], &(1u64 << 33).to_be_bytes());
    }

    #[test]
    fn block_sizes_follow_the_device_and_the_spec() {
        let d = BlockSizes::default();
        assert_eq!((d.minimum, d.preferred, d.maximum), (1, 4096, MAX_PAYLOAD));
        assert_eq!(d.kernel_block_size(), 512);
        assert_eq!(BlockSizes::for_device(512, MAX_PAYLOAD).preferred, 4096, "at least a page");
        assert_eq!(BlockSizes::for_device(65536, MAX_PAYLOAD).preferred, 65536);
        assert_eq!(BlockSizes::for_device(3000, MAX_PAYLOAD).preferred, 4096, "a power of two");
        assert_eq!(BlockSizes::for_device(1 << 40, MAX_PAYLOAD).preferred, MAX_PAYLOAD, "never above the maximum");
        let odd = BlockSizes::for_device(1 << 30, 3 << 20);
        assert_eq!((odd.preferred, odd.maximum), (2 << 20, 3 << 20));
        let k = BlockSizes { minimum: 4096, ..d };
        assert_eq!(k.kernel_block_size(), 4096);
    }

    #[test]
    fn errno_mapping_is_restricted_to_wire_values() {
        assert_eq!(wire_errno(libc::EDQUOT), ENOSPC);
        assert_eq!(wire_errno(libc::EBADF), EIO);
        assert_eq!(wire_errno(libc::EROFS), EPERM);
    }
}
