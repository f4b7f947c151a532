//! The handle step: a validated command run on the device, and the reply
//! that says how it went.

use engine::{BlockDevice, IoBuf, StatusExtent};

use super::reply::{Reply, To};
use crate::proto::*;
use crate::request::{Command, Session};

/// Most extents returned for one BLOCK_STATUS (the spec suggests ≤ 2^20).
const MAX_EXTENTS: usize = 1 << 16;

/// How a request went: its reply, whether it succeeded, and the bytes it
/// moved (for the counters).
pub(super) struct Outcome {
    pub(super) reply: Reply,
    pub(super) ok: bool,
    pub(super) bytes: u64,
}

/// A READ into `buf`.
pub(super) async fn read<D: BlockDevice>(dev: &D, s: &Session, to: To, offset: u64, buf: IoBuf) -> Outcome {
    let bytes = buf.len() as u64;
    let (res, buf) = dev.read(offset, buf).await;
    let ok = res.is_ok();
    let reply = match res {
        Ok(()) => Reply::read_data(s, to, buf),
        Err(e) => Reply::failed(s, to, &e),
    };
    Outcome { reply, ok, bytes }
}

/// A WRITE of its whole payload `buf`.
pub(super) async fn write<D: BlockDevice>(dev: &D, s: &Session, to: To, offset: u64, buf: IoBuf, fua: bool) -> Outcome {
    let bytes = buf.len() as u64;
    let res = dev.write(offset, buf, fua).await;
    let ok = res.is_ok();
    let reply = match res {
        Ok(()) => Reply::ok(s, to),
        Err(e) => Reply::failed(s, to, &e),
    };
    Outcome { reply, ok, bytes }
}

/// A command without payload.
pub(super) async fn command<D: BlockDevice>(dev: &D, session: &Session, to: To, cmd: Command) -> Outcome {
    let done = |reply, ok| Outcome { reply, ok, bytes: 0 };
    let res = match cmd {
        Command::Flush => dev.flush().await,
        Command::Trim { offset, len, fua } => dev.trim(offset, len, fua).await,
        Command::Cache { offset, len } => dev.cache(offset, len).await,
        Command::WriteZeroes { offset, len, fua, may_unmap, fast } => {
            if fast && !dev.fast_zero() {
                // Refusing a fast zero is the protocol's answer, not a failure.
                return done(
                    Reply::error(session, to, ENOTSUP, "zeroing is not faster than writing on this device"),
                    true,
                );
            }
            dev.write_zeroes(offset, len, may_unmap, fua).await
        }
        Command::BlockStatus { offset, len, req_one, context } => {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            return match dev.block_status(offset, len, max).await {
                Ok(mut ext) => {
                    if ext.is_empty() {
                        ext.push(StatusExtent { len, hole: false, zero: false });
                    }
                    if req_one {
                        ext.truncate(1);
                    }
                    // The last extent may reach past the request, but not by
                    // more than the request's length: a compact reply's 32-bit
                    // lengths then always fit, and REQ_ONE is satisfied.
                    if let Some(last) = ext.last_mut() {
                        last.len = last.len.min(len);
                    }
                    done(Reply::block_status(session, to, context, &ext), true)
                }
                Err(e) => done(Reply::failed(session, to, &e), false),
            };
        }
        Command::Read { .. } | Command::Write { .. } | Command::Disconnect => {
            return done(Reply::error(session, to, EINVAL, "internal dispatch error"), false)
        }
    };
    match res {
        Ok(()) => done(Reply::ok(session, to), true),
        Err(e) => done(Reply::failed(session, to, &e), false),
    }
}
