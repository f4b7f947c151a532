//! Request validation: the single place where a request header from the wire
//! becomes a [`Command`] the device may execute. Bounds, payload limits, flags
//! allowed for the command, read-only exports and negotiated features are all
//! checked here, against the transmission flags this connection was actually
//! sent; nothing downstream re-checks client input.

use crate::proto::*;

/// What was negotiated for this connection, as far as requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Structured replies (also true with extended headers, which imply them).
    pub structured: bool,
    /// Extended headers: 32-byte requests whose length is a payload length
    /// only with `CMD_FLAG_PAYLOAD_LEN`, 64-bit effect lengths otherwise.
    pub extended: bool,
    /// The id of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
    /// Writes are refused (the export or the device is read-only).
    pub read_only: bool,
    /// The transmission flags advertised to this client.
    pub flags: u16,
    /// The maximum payload advertised (NBD_INFO_BLOCK_SIZE).
    pub max_payload: u32,
}

/// A validated request: within the export, with flags this session allows.
#[allow(missing_docs)] // the fields are the request's own: offset, length, flags
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// READ `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
    /// WRITE the `len`-byte payload at `offset`, durable first with `fua`.
    Write { offset: u64, len: u32, fua: bool },
    /// DISC: the client is done.
    Disconnect,
    /// FLUSH.
    Flush,
    /// TRIM a range.
    Trim { offset: u64, len: u64, fua: bool },
    /// CACHE: prefetch a range.
    Cache { offset: u64, len: u64 },
    /// WRITE_ZEROES; without `may_unmap` the range stays allocated (NO_HOLE);
    /// `fast` asks for FAST_ZERO.
    WriteZeroes { offset: u64, len: u64, fua: bool, may_unmap: bool, fast: bool },
    /// BLOCK_STATUS of `context`, one extent with `req_one`.
    BlockStatus { offset: u64, len: u64, req_one: bool, context: u32 },
}

/// A request refused before it reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The wire errno of the reply.
    pub errno: u32,
    /// Why, for the error chunk's message.
    pub reason: &'static str,
    /// Payload bytes that follow the header on the wire and must be discarded
    /// to stay in sync (a refused WRITE still sends its data).
    pub skip: u64,
}

/// The payload that follows `h` on the wire, whatever happens to the request.
/// With compact headers only WRITE has one. With extended headers the
/// requests flagged `CMD_FLAG_PAYLOAD_LEN` have one, and so does every
/// WRITE: the spec says a WRITE must carry the flag, but qemu's client (10.0)
/// sends it without, and qemu-nbd reads the payload anyway; a WRITE's length
/// can mean nothing else.
pub fn payload_len(h: &ExtendedRequestHeader, s: &Session) -> u64 {
    let flagged = s.extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    let has_payload = h.kind == CMD_WRITE || flagged;
    if has_payload {
        h.len
    } else {
        0
    }
}

/// The transmission flag that must have been advertised for a command.
fn command_flag(kind: u16) -> Option<u16> {
    match kind {
        CMD_FLUSH => Some(TF_SEND_FLUSH),
        CMD_TRIM => Some(TF_SEND_TRIM),
        CMD_CACHE => Some(TF_SEND_CACHE),
        CMD_WRITE_ZEROES => Some(TF_SEND_WRITE_ZEROES),
        _ => None,
    }
}

/// Command flags valid for `kind` on this connection, or `None` for an unknown
/// command.
fn allowed_flags(kind: u16, s: &Session) -> Option<u16> {
    let advertised = |tf: u16, cf: u16| if s.flags & tf != 0 { cf } else { 0 };
    let extra = match kind {
        CMD_READ => advertised(TF_SEND_DF, CMD_FLAG_DF) & if s.structured { CMD_FLAG_DF } else { 0 },
        // With extended headers a WRITE says its length is a payload; no
        // other command has a payload form here (no BLOCK_STATUS_PAYLOAD).
        CMD_WRITE if s.extended => CMD_FLAG_PAYLOAD_LEN,
        CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | advertised(TF_SEND_FAST_ZERO, CMD_FLAG_FAST_ZERO),
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return None,
    };
    Some(advertised(TF_SEND_FUA, CMD_FLAG_FUA) | extra)
}

/// Validates `h` (a compact header widened, or an extended one) against the
/// session and the current export size.
pub fn validate(h: &ExtendedRequestHeader, s: &Session, export_size: u64) -> Result<Command, Rejection> {
    let skip = payload_len(h, s);
    let reject = |errno, reason| Err(Rejection { errno, reason, skip });
    let Some(allowed) = allowed_flags(h.kind, s) else {
        return reject(EINVAL, "unknown command");
    };
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    // Before the advertised-command check: a read-only export advertises no
    // TRIM, and a write of any kind to it is EPERM, as the spec asks.
    if writes && s.read_only {
        return reject(EPERM, "the export is read-only");
    }
    if command_flag(h.kind).is_some_and(|tf| s.flags & tf == 0) {
        return reject(EINVAL, "command not advertised to this client");
    }
    if h.flags & !allowed != 0 {
        return reject(EINVAL, "flag not valid for this command on this connection");
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > s.max_payload as u64 {
        return reject(EINVAL, "payload larger than the advertised maximum");
    }
    if matches!(h.kind, CMD_FLUSH | CMD_DISC) && (h.offset != 0 || h.len != 0) {
        return reject(EINVAL, "offset and length must be zero");
    }
    if h.kind == CMD_BLOCK_STATUS {
        if s.base_allocation.is_none() {
            return reject(EINVAL, "no metadata context was negotiated");
        }
        if h.len == 0 {
            return reject(EINVAL, "block status of an empty range");
        }
    }
    let in_bounds = h.offset.checked_add(h.len).is_some_and(|end| end <= export_size);
    if !in_bounds && !matches!(h.kind, CMD_FLUSH | CMD_DISC) {
        let errno = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return reject(errno, "request reaches past the end of the export");
    }
    let (offset, len) = (h.offset, h.len);
    // READ and WRITE lengths were checked against the u32 maximum above.
    let payload = u32::try_from(len).unwrap_or(u32::MAX);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len: payload },
        CMD_WRITE => Command::Write { offset, len: payload, fua },
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            context: s.base_allocation.unwrap_or(0),
        },
        _ => return reject(EINVAL, "unknown command"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u16 = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_DF
        | TF_SEND_CACHE
        | TF_SEND_FAST_ZERO;
    const S: Session = Session {
        structured: true,
        extended: false,
        base_allocation: Some(1),
        read_only: false,
        flags: ALL,
        max_payload: MAX_PAYLOAD,
    };
    const X: Session = Session { extended: true, ..S };

    fn h(kind: u16, flags: u16, offset: u64, len: u32) -> ExtendedRequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, len }.into()
    }

    fn x(kind: u16, flags: u16, offset: u64, len: u64) -> ExtendedRequestHeader {
        ExtendedRequestHeader { flags, kind, cookie: 7, offset, len }
    }

    #[test]
    fn bounds_map_to_the_right_errno() {
        assert_eq!(validate(&h(CMD_WRITE, 0, 1000, 100), &S, 1050).unwrap_err().errno, ENOSPC);
        assert_eq!(validate(&h(CMD_WRITE, 0, 1000, 100), &S, 1050).unwrap_err().skip, 100);
        assert_eq!(validate(&h(CMD_READ, 0, 1000, 100), &S, 1050).unwrap_err().errno, EINVAL);
        assert_eq!(validate(&h(CMD_TRIM, 0, u64::MAX, 2), &S, 1050).unwrap_err().errno, EINVAL);
        assert!(validate(&h(CMD_READ, 0, 1000, 50), &S, 1050).is_ok());
        assert!(validate(&h(CMD_READ, 0, 1050, 0), &S, 1050).is_ok(), "zero length at the end");
    }

    #[test]
    fn flags_are_checked_per_command() {
        assert!(validate(&h(CMD_READ, CMD_FLAG_DF, 0, 1), &S, 10).is_ok());
        let plain = Session { structured: false, ..S };
        assert_eq!(validate(&h(CMD_READ, CMD_FLAG_DF, 0, 1), &plain, 10).unwrap_err().errno, EINVAL);
        assert_eq!(validate(&h(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &S, 10).unwrap_err().errno, EINVAL);
        assert!(validate(&h(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &S, 10).is_ok());
        assert_eq!(validate(&h(CMD_READ, 1 << 9, 0, 1), &S, 10).unwrap_err().errno, EINVAL);
        let Ok(Command::WriteZeroes { may_unmap, fast, .. }) =
            validate(&h(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 4), &S, 10)
        else {
            panic!("valid write-zeroes")
        };
        assert!(!may_unmap && fast);
    }

    #[test]
    fn read_only_and_oversize_and_unknown() {
        let ro = Session { read_only: true, ..S };
        assert_eq!(validate(&h(CMD_TRIM, 0, 0, 1), &ro, 10).unwrap_err().errno, EPERM);
        assert!(validate(&h(CMD_READ, 0, 0, 1), &ro, 10).is_ok());
        assert_eq!(validate(&h(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &S, u64::MAX).unwrap_err().errno, EINVAL);
        let e = validate(&h(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &S, u64::MAX).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, MAX_PAYLOAD as u64 + 1));
        assert_eq!(validate(&h(42, 0, 0, 0), &S, 10).unwrap_err().errno, EINVAL);
        assert_eq!(validate(&h(CMD_FLUSH, 0, 1, 0), &S, 10).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn commands_and_flags_must_have_been_advertised() {
        let bare = Session { flags: TF_HAS_FLAGS | TF_SEND_FLUSH, ..S };
        for kind in [CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES] {
            let e = validate(&h(kind, 0, 0, 1), &bare, 10).unwrap_err();
            assert_eq!(e.errno, EINVAL, "command {kind} was not advertised");
        }
        assert_eq!(validate(&h(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &bare, 10).unwrap_err().errno, EINVAL, "no SEND_FUA");
        assert_eq!(validate(&h(CMD_READ, CMD_FLAG_DF, 0, 1), &bare, 10).unwrap_err().errno, EINVAL, "no SEND_DF");
        let e = validate(
            &h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
            &Session { flags: ALL & !TF_SEND_FAST_ZERO, ..S },
            10,
        );
        assert_eq!(e.unwrap_err().errno, EINVAL, "no SEND_FAST_ZERO");
        let no_flush = Session { flags: TF_HAS_FLAGS, ..S };
        assert_eq!(validate(&h(CMD_FLUSH, 0, 0, 0), &no_flush, 10).unwrap_err().errno, EINVAL);
        assert!(validate(&h(CMD_WRITE, 0, 0, 1), &bare, 10).is_ok(), "plain writes need no flag");
        // A refused WRITE still tells the caller how much payload to skip.
        assert_eq!(validate(&h(CMD_WRITE, CMD_FLAG_FUA, 0, 7), &bare, 10).unwrap_err().skip, 7);
    }

    #[test]
    fn block_status_needs_a_context() {
        let none = Session { base_allocation: None, ..S };
        assert_eq!(validate(&h(CMD_BLOCK_STATUS, 0, 0, 1), &none, 10).unwrap_err().errno, EINVAL);
        assert_eq!(validate(&h(CMD_BLOCK_STATUS, 0, 0, 0), &S, 10).unwrap_err().errno, EINVAL);
        assert!(validate(&h(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &S, 10).is_ok());
    }

    #[test]
    fn extended_headers_use_64_bit_effect_lengths() {
        let big = 5u64 << 32;
        let Ok(Command::Trim { len, .. }) = validate(&x(CMD_TRIM, 0, 0, big), &X, 1 << 40) else {
            panic!("a 20 GiB trim")
        };
        assert_eq!(len, big);
        assert!(
            matches!(validate(&x(CMD_WRITE_ZEROES, 0, 4096, big), &X, 1 << 40), Ok(Command::WriteZeroes { len, .. }) if len == big)
        );
        assert!(
            matches!(validate(&x(CMD_BLOCK_STATUS, 0, 0, big), &X, 1 << 40), Ok(Command::BlockStatus { len, .. }) if len == big)
        );
        assert!(
            matches!(validate(&x(CMD_CACHE, 0, 0, big), &X, 1 << 40), Ok(Command::Cache { len, .. }) if len == big)
        );
        let e = validate(&x(CMD_TRIM, 0, 1 << 40, big), &X, 1 << 40).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 0), "past the end, nothing to skip");
        // Reads stay within the maximum payload, whatever the header allows.
        let e = validate(&x(CMD_READ, 0, 0, MAX_PAYLOAD as u64 + 1), &X, 1 << 40).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 0));
    }

    #[test]
    fn extended_payloads_follow_the_payload_flag() {
        let w = validate(&x(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA, 0, 512), &X, 4096);
        assert_eq!(w, Ok(Command::Write { offset: 0, len: 512, fua: true }));
        // Without the flag too, as qemu's client sends it.
        let w = validate(&x(CMD_WRITE, 0, 0, 512), &X, 4096);
        assert_eq!(w, Ok(Command::Write { offset: 0, len: 512, fua: false }));
        // Another command with a payload: refused, but the payload is consumed.
        let e = validate(&x(CMD_READ, CMD_FLAG_PAYLOAD_LEN, 0, 100), &X, 4096).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 100));
        let e = validate(&x(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 12), &X, 4096).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 12));
        // An oversized write payload is refused and its length is what to skip
        // (the caller hangs up beyond its bound).
        let e = validate(&x(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 1 << 40), &X, u64::MAX).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 1 << 40));
        // The flag means nothing with compact headers: refused.
        let e = validate(&h(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 8), &S, 4096).unwrap_err();
        assert_eq!((e.errno, e.skip), (EINVAL, 8));
        assert_eq!(payload_len(&h(CMD_WRITE, 0, 0, 8), &S), 8);
        assert_eq!(payload_len(&x(CMD_WRITE, 0, 0, 8), &X), 8);
        assert_eq!(payload_len(&x(CMD_TRIM, 0, 0, 8), &X), 0);
        assert_eq!(
            payload_len(&h(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 0, 8), &S),
            0,
            "no payload form without extended headers"
        );
    }

    #[test]
    fn the_advertised_maximum_is_what_is_enforced() {
        let small = Session { max_payload: 1 << 20, ..S };
        assert!(validate(&h(CMD_READ, 0, 0, 1 << 20), &small, u64::MAX).is_ok());
        assert_eq!(validate(&h(CMD_READ, 0, 0, (1 << 20) + 1), &small, u64::MAX).unwrap_err().errno, EINVAL);
    }
}
