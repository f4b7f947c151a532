//! One connection's transmission phase: a writer that takes requests from the
//! device's shared queue and sends them (many in flight, matched by cookie),
//! a reader that parses simple and structured replies straight into the
//! callers' buffers, and a watchdog that declares the connection dead when
//! requests wait and nothing arrives.
//!
//! When a connection ends — an I/O error, EOF, a protocol violation, a stall —
//! every request still in flight goes back to the front of the shared queue,
//! to be sent again on another connection or after the reconnect. That is
//! safe because every NBD command is idempotent (a WRITE whose reply was lost
//! writes the same bytes again), and it is what keeps an acknowledged write
//! from being lost: nothing is answered to the engine before the server's reply.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};

use super::handshake::{BoxStream, ExportInfo};
use super::requests::{InFlight, Payload, Reply, Req, Requests, Sent};
use crate::proto::*;

/// Requests one connection has on the wire at most (qemu-nbd serves 16 at a
/// time per connection; more wait in the socket buffers, still covering the
/// link's bandwidth-delay product).
const MAX_IN_FLIGHT: usize = 128;
/// Socket buffering on our side: small requests and replies are batched.
const IO_BUFFER: usize = 256 << 10;

/// When something last arrived, in milliseconds since `base`.
struct Progress {
    base: Instant,
    last_rx: AtomicU64,
}

impl Progress {
    fn touch(&self) {
        self.last_rx.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_rx.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// Runs the connection of slot `slot` until it fails (or the queue closes);
/// returns why, after putting every unanswered request back on the queue. No
/// reply and no bytes for `stall` while requests wait is a failure.
pub(super) async fn run(
    requests: &Requests,
    slot: usize,
    stall: Duration,
    stream: BoxStream,
    info: &ExportInfo,
) -> String {
    let (rd, wr) = tokio::io::split(stream);
    let inflight = Arc::new(InFlight::default());
    requests.register(slot, Some(inflight.clone()));
    let progress = Progress { base: Instant::now(), last_rx: AtomicU64::new(0) };
    let why = tokio::select! {
        r = write_loop(requests, wr, &inflight) => r,
        r = read_loop(rd, &inflight, info, &progress) => r,
        r = watchdog(&inflight, &progress, stall) => r,
        _ = requests.closed_signal() => "the device was closed".to_string(),
    };
    requests.register(slot, None);
    let mut back: Vec<(u64, Req)> =
        inflight.lock().drain().filter(|(_, s)| s.req.done.is_some()).map(|(cookie, s)| (cookie, s.req)).collect();
    back.sort_by_key(|(cookie, _)| *cookie);
    requests.requeue_front(back.into_iter().map(|(_, r)| r).collect());
    why
}

async fn write_loop(requests: &Requests, wr: tokio::io::WriteHalf<BoxStream>, inflight: &InFlight) -> String {
    let mut w = BufWriter::with_capacity(IO_BUFFER, wr);
    let mut cookie: u64 = 0;
    let res: io::Result<()> = async {
        loop {
            // Room first, then a request: a request taken is on this connection.
            loop {
                let freed = inflight.freed.notified();
                if inflight.lock().len() < MAX_IN_FLIGHT {
                    break;
                }
                freed.await;
            }
            let req = match requests.try_pop() {
                Some(r) => r,
                None => {
                    // Nothing more to send for now: push out what is buffered.
                    w.flush().await?;
                    match requests.pop().await {
                        Some(r) => r,
                        None => return Ok(()),
                    }
                }
            };
            cookie += 1;
            let h = RequestHeader { flags: req.flags, kind: req.cmd, cookie, offset: req.offset, len: req.len };
            let payload = match &req.payload {
                Payload::Write(buf, at) => Some((buf.clone(), *at)),
                _ => None,
            };
            let len = req.len as usize;
            inflight.lock().insert(
                cookie,
                Sent { req, sent_at: Instant::now(), receiving: false, covered: 0, extents: Vec::new(), error: None },
            );
            w.write_all(&h.encode()).await?;
            if let Some((buf, at)) = payload {
                // SAFETY: a write request only reads its buffer, and the
                // engine does not change a buffer while a write of it runs.
                let data = unsafe { buf.slice(at, len) };
                w.write_all(data).await?;
            }
        }
    }
    .await;
    match res {
        Ok(()) => "the device was closed".into(),
        Err(e) => format!("sending failed: {e}"),
    }
}

/// Why the reader stopped.
fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the server broke the protocol: {}", msg.into()))
}

/// Maps an NBD error (a small errno set) and the server's message.
fn server_error(errno: u32, msg: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(errno as i32);
    if msg.is_empty() {
        e
    } else {
        io::Error::new(e.kind(), format!("{e} (the server says: {msg})"))
    }
}

async fn read_loop(
    rd: tokio::io::ReadHalf<BoxStream>,
    inflight: &InFlight,
    info: &ExportInfo,
    progress: &Progress,
) -> String {
    let mut r = BufReader::with_capacity(IO_BUFFER, rd);
    let mut scratch = Vec::new();
    let res: io::Result<()> = async {
        loop {
            let magic = r.read_u32().await?;
            progress.touch();
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let errno = r.read_u32().await?;
                    let cookie = r.read_u64().await?;
                    let (payload, len, read) = {
                        let mut map = inflight.lock();
                        let s = map
                            .get_mut(&cookie)
                            .ok_or_else(|| violation(format!("reply to unknown cookie {cookie}")))?;
                        let read = s.req.cmd == CMD_READ && errno == 0;
                        if read && info.structured {
                            return Err(violation("a simple reply with data after structured replies were agreed"));
                        }
                        s.receiving = read && s.req.done.is_some();
                        (s.req.payload.clone(), s.req.len as usize, read)
                    };
                    if read {
                        match payload {
                            Payload::Read(buf, at) => {
                                receive(&mut r, Some((&buf, at)), len, &mut scratch, progress).await?
                            }
                            // Timed out meanwhile: the bytes are read and dropped.
                            _ => receive(&mut r, None, len, &mut scratch, progress).await?,
                        }
                    }
                    if errno == ESHUTDOWN {
                        // Not the request's fault: it goes back on the queue with the rest.
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the server is shutting down"));
                    }
                    let s = inflight.lock().remove(&cookie);
                    inflight.freed.notify_one();
                    if let Some(mut s) = s {
                        let res = if errno != 0 { Err(server_error(errno, "")) } else { Ok(Reply::Done) };
                        s.req.finish(res);
                    }
                }
                STRUCTURED_REPLY_MAGIC => {
                    if !info.structured {
                        return Err(violation("a structured reply that was not agreed"));
                    }
                    let flags = r.read_u16().await?;
                    let kind = r.read_u16().await?;
                    let cookie = r.read_u64().await?;
                    let len = r.read_u32().await?;
                    chunk(&mut r, inflight, info, cookie, kind, len, &mut scratch, progress).await?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        let s = inflight.lock().remove(&cookie);
                        inflight.freed.notify_one();
                        if let Some(mut s) = s {
                            let res = if let Some(e) = s.error.take() {
                                if e.raw_os_error() == Some(ESHUTDOWN as i32) {
                                    inflight.lock().insert(cookie, s);
                                    return Err(io::Error::new(
                                        io::ErrorKind::ConnectionAborted,
                                        "the server is shutting down",
                                    ));
                                }
                                Err(e)
                            } else if s.req.cmd == CMD_READ && s.covered != s.req.len as u64 {
                                // The caller learns why its read failed (its
                                // buffer is partly unfilled: never data); the
                                // connection, which cannot be trusted, ends.
                                let why = format!("a read of {} bytes answered with {} bytes", s.req.len, s.covered);
                                s.req.finish(Err(violation(why.clone())));
                                return Err(violation(why));
                            } else if s.req.cmd == CMD_BLOCK_STATUS {
                                Ok(Reply::Extents(std::mem::take(&mut s.extents)))
                            } else {
                                Ok(Reply::Done)
                            };
                            s.req.finish(res);
                        }
                    }
                }
                m => return Err(violation(format!("reply magic {m:#x}"))),
            }
        }
    }
    .await;
    match res {
        Ok(()) => "the server closed the connection".into(),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
        Err(e) => format!("receiving failed: {e}"),
    }
}

/// Reads `len` payload bytes into the request's buffer, or into scratch
/// space when the request already timed out (its caller may reuse the buffer).
async fn receive<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    into: Option<(&Arc<engine::SharedBuf>, usize)>,
    len: usize,
    scratch: &mut Vec<u8>,
    progress: &Progress,
) -> io::Result<()> {
    if let Some((buf, at)) = into {
        // SAFETY: this range of the buffer belongs to this request alone, and
        // its caller waits for the reply (`receiving` keeps it from timing out).
        let dst = unsafe { buf.slice_mut(at, len) };
        let mut done = 0;
        while done < len {
            let n = r.read(&mut dst[done..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
            progress.touch();
        }
    } else {
        let mut left = len;
        while left > 0 {
            scratch.resize(left.min(1 << 20), 0);
            let n = r.read(scratch).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
            progress.touch();
        }
    }
    Ok(())
}

async fn read_be_u32<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<u32> {
    r.read_u32().await
}

/// One structured reply chunk for `cookie`.
#[allow(clippy::too_many_arguments)]
async fn chunk<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    inflight: &InFlight,
    info: &ExportInfo,
    cookie: u64,
    kind: u16,
    len: u32,
    scratch: &mut Vec<u8>,
    progress: &Progress,
) -> io::Result<()> {
    let (req_off, req_len, payload, live, cmd) = {
        let mut map = inflight.lock();
        let s = map.get_mut(&cookie).ok_or_else(|| violation(format!("chunk for unknown cookie {cookie}")))?;
        (s.req.offset, s.req.len as u64, s.req.payload.clone(), s.req.done.is_some(), s.req.cmd)
    };
    let within = |off: u64, n: u64| off >= req_off && off.checked_add(n).is_some_and(|e| e <= req_off + req_len);
    match kind {
        REPLY_TYPE_NONE if len == 0 => {}
        REPLY_TYPE_OFFSET_DATA if len >= 8 && cmd == CMD_READ => {
            let off = r.read_u64().await?;
            let n = (len - 8) as u64;
            if !within(off, n) {
                return Err(violation(format!("data at {off}+{n} outside the read at {req_off}+{req_len}")));
            }
            if let Some(s) = inflight.lock().get_mut(&cookie) {
                s.receiving = live;
            }
            let into = match (&payload, live) {
                (Payload::Read(buf, at), true) => Some((buf, at + (off - req_off) as usize)),
                // Timed out meanwhile: the bytes are read and dropped.
                _ => None,
            };
            receive(r, into, n as usize, scratch, progress).await?;
            if let Some(s) = inflight.lock().get_mut(&cookie) {
                s.receiving = false;
                s.covered += n;
            }
        }
        REPLY_TYPE_OFFSET_HOLE if len == 12 && cmd == CMD_READ => {
            let off = r.read_u64().await?;
            let n = read_be_u32(r).await? as u64;
            if !within(off, n) {
                return Err(violation(format!("a hole at {off}+{n} outside the read at {req_off}+{req_len}")));
            }
            let mut map = inflight.lock();
            if let Some(s) = map.get_mut(&cookie) {
                if let (Payload::Read(buf, at), true) = (&payload, s.req.done.is_some()) {
                    // SAFETY: this range belongs to this request alone, whose caller waits.
                    unsafe { buf.slice_mut(at + (off - req_off) as usize, n as usize) }.fill(0);
                }
                s.covered += n;
            }
        }
        REPLY_TYPE_BLOCK_STATUS if len >= 12 && (len - 4).is_multiple_of(8) && cmd == CMD_BLOCK_STATUS => {
            let id = read_be_u32(r).await?;
            let mut body = vec![0u8; (len - 4) as usize];
            r.read_exact(&mut body).await?;
            if Some(id) == info.allocation_context {
                if let Some(s) = inflight.lock().get_mut(&cookie) {
                    for e in body.chunks_exact(8) {
                        s.extents.push((
                            u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
                            u32::from_be_bytes([e[4], e[5], e[6], e[7]]),
                        ));
                    }
                }
            }
        }
        k if k & (1 << 15) != 0 && len >= 6 => {
            let errno = read_be_u32(r).await?;
            let mlen = r.read_u16().await? as u32;
            if 6 + mlen > len {
                return Err(violation("an error chunk whose message is longer than the chunk"));
            }
            let mut msg = vec![0u8; mlen as usize];
            r.read_exact(&mut msg).await?;
            let mut rest = vec![0u8; (len - 6 - mlen) as usize];
            r.read_exact(&mut rest).await?;
            let errno = if errno == 0 { EIO } else { errno };
            let e = server_error(errno, String::from_utf8_lossy(&msg).trim());
            if let Some(s) = inflight.lock().get_mut(&cookie) {
                s.error.get_or_insert(e);
            }
        }
        k => return Err(violation(format!("a chunk of type {k} and {len} bytes"))),
    }
    Ok(())
}

/// Declares the connection dead when its oldest request waited `stall` and
/// nothing arrived for as long (a cut link that TCP has not noticed yet).
async fn watchdog(inflight: &InFlight, progress: &Progress, stall: Duration) -> String {
    loop {
        tokio::time::sleep((stall / 4).max(Duration::from_millis(50))).await;
        let oldest = inflight.lock().values().map(|s| s.sent_at).min();
        if let Some(t) = oldest {
            if t.elapsed() >= stall && progress.idle_for() >= stall {
                return format!("no reply for {:.1} s", stall.as_secs_f64());
            }
        }
    }
}
