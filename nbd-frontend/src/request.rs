//! Request validation: the single place where a request header from the wire
//! becomes a [`Command`] the device may execute. Bounds, payload limits, flags
//! allowed for the command, read-only exports and negotiated features are all
//! checked here, against the transmission flags this connection was actually
//! sent; nothing downstream re-checks client input.

use crate::proto::*;

/// What was negotiated for this connection, as far as requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub structured: bool,
    pub base_allocation: Option<u32>,
    pub read_only: bool,
    /// The transmission flags advertised to this client.
    pub flags: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Disconnect,
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool, may_unmap: bool, fast: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool, context: u32 },
}

/// A request refused before it reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub reason: &'static str,
    /// Payload bytes that follow the header on the wire and must be discarded
    /// to stay in sync (a refused WRITE still sends its data).
    pub skip: u32,
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
        CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | advertised(TF_SEND_FAST_ZERO, CMD_FLAG_FAST_ZERO),
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return None,
    };
    Some(advertised(TF_SEND_FUA, CMD_FLAG_FUA) | extra)
}

/// Validates `h` against the session and the current export size.
pub fn validate(h: &RequestHeader, s: &Session, export_size: u64) -> Result<Command, Rejection> {
    let skip = if h.kind == CMD_WRITE { h.len } else { 0 };
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
    if matches!(h.kind, CMD_READ | CMD_WRITE) && h.len > MAX_PAYLOAD {
        return reject(EINVAL, "payload larger than the 32 MiB maximum");
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
    let in_bounds = h.offset.checked_add(h.len as u64).is_some_and(|end| end <= export_size);
    if !in_bounds && !matches!(h.kind, CMD_FLUSH | CMD_DISC) {
        let errno = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return reject(errno, "request reaches past the end of the export");
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
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
    const S: Session = Session { structured: true, base_allocation: Some(1), read_only: false, flags: ALL };

    fn h(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, len }
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
        assert_eq!((e.errno, e.skip), (EINVAL, MAX_PAYLOAD + 1));
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
}
