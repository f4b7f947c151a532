//! The transmission phase of one connection.
//!
//! A reader parses requests as fast as they arrive and starts each as its own
//! task, so many requests are in flight and replies go out in completion order.
//! A single writer task batches replies into vectored writes.
//!
//! What a connection may hold is bounded (limits.rs): a request slot from its
//! header until its reply is written, and payload bytes charged to the
//! connection's reserve or its share of the server budget. When either runs out
//! the reader stops reading the socket: that is the backpressure, and it stalls
//! only this connection. A peer that stops sending a payload it announced, or
//! stops reading its replies, for the stall timeout is dropped.
//!
//! Stopping: in [`Phase::Draining`] the reader stops taking requests (a payload
//! still arriving is abandoned: its request was never started), requests in
//! flight finish and their replies are delivered; in [`Phase::Closing`] replies
//! not yet written are dropped and the connection closes at once.
//!
//! A connection with a [`HandoverSlot`] (the kernel's, which another process
//! takes over on `livemirror upgrade`) stops only between two requests: a
//! request whose header was read is read whole and answered, and the bytes
//! read past the last one go into the slot. The socket is not shut down, so
//! the next process goes on from exactly where this one stopped.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use engine::{BlockDevice, BufPool, Drain, IoBuf, StatusExtent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, Notify};

use crate::handshake::Negotiated;
use crate::limits::{Charge, ConnBudget, ConnLimits, SlotGuard, Slots};
use crate::proto::*;
use crate::request::{payload_len, validate, Command, Rejection, Session};
use crate::stats::Stats;
use crate::tls::{Socket, TlsAcceptor, TlsReadHalf, TlsStream, TlsWriteHalf};

/// Most extents returned for one BLOCK_STATUS (the spec suggests ≤ 2^20).
const MAX_EXTENTS: usize = 1 << 16;
const READ_BUF: usize = 256 << 10;
const MAX_BATCH_REPLIES: usize = 128;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// WRITE payloads are charged and read in pieces of this size (so a stalled
/// sender holds at most one piece more than it sent).
const PAYLOAD_PIECE: usize = 1 << 20;
/// A refused WRITE whose payload is larger than this is not skipped: the
/// connection is closed instead (nbdkit's rule: twice the maximum payload).
const MAX_SKIP: u64 = 2 * MAX_PAYLOAD as u64;

/// A connected stream: a plain socket, or a TLS session over one. Split into
/// halves without locks (the TLS halves share the session on one thread).
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    Tls(Box<TlsStream>),
}

pub enum ReadHalf {
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Tls(TlsReadHalf),
}

pub enum WriteHalf {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Tls(TlsWriteHalf),
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Tls(t) => {
                let (r, w) = t.split();
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// True for a TLS session.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs the server side of a TLS handshake on this (plain) stream.
    pub async fn start_tls(self, acceptor: &TlsAcceptor) -> io::Result<Stream> {
        let socket = match self {
            Stream::Unix(s) => Socket::Unix(s),
            Stream::Tcp(s) => {
                // Small records (option replies, 4K replies) must not wait
                // for Nagle.
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }
            Stream::Tls(_) => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "TLS is already running on this stream"))
            }
        };
        Ok(Stream::Tls(Box::new(acceptor.accept(socket).await?)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Unix(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// The longest reply head: an extended OFFSET_DATA header and its offset.
const MAX_HEAD: usize = EXTENDED_REPLY_LEN + 8;

/// One reply: a small header and an optional body.
pub struct Reply {
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

/// The request a reply answers: its cookie, and its offset (extended replies
/// echo it).
#[derive(Debug, Clone, Copy)]
struct To {
    cookie: u64,
    offset: u64,
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

    fn body_len(&self) -> usize {
        match &self.body {
            Body::None => 0,
            Body::Buf(b) => b.len(),
            Body::Bytes(v) => v.len(),
        }
    }

    /// Success without data. Extended headers allow no simple reply.
    fn ok(s: &Session, to: To) -> Reply {
        if s.extended {
            let (h, n) = chunk(s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, to, 0);
            return Reply::new(&h[..n], Body::None);
        }
        Reply::new(&simple_reply(0, to.cookie), Body::None)
    }

    /// Keeps the request's slot and payload charges until the reply is written.
    fn holding(mut self, slot: SlotGuard, charges: Vec<Charge>) -> Reply {
        self.slot = Some(slot);
        self.charges = charges;
        self
    }

    fn error(s: &Session, to: To, errno: u32, msg: &str) -> Reply {
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

    fn read_data(s: &Session, to: To, buf: IoBuf) -> Reply {
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
    fn block_status(s: &Session, to: To, context: u32, extents: &[StatusExtent]) -> Reply {
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
                // clipped to the request (run_command).
                body.extend_from_slice(&u32::try_from(e.len).unwrap_or(u32::MAX).to_be_bytes());
                body.extend_from_slice(&flags_of(e).to_be_bytes());
            }
            (REPLY_TYPE_BLOCK_STATUS, body)
        };
        let (h, n) = chunk(s, REPLY_FLAG_DONE, kind, to, body.len());
        Reply::new(&h[..n], Body::Bytes(body))
    }
}

/// How far a server shutdown has gone (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Closing,
}

/// Server-wide resources a connection uses.
#[derive(Clone)]
pub struct ConnShared {
    pub pool: BufPool,
    pub phase: watch::Receiver<Phase>,
    pub limits: ConnLimits,
    pub stats: Arc<Stats>,
    /// Set for a connection that is handed over rather than closed (module docs).
    pub handover: Option<HandoverSlot>,
}

/// Where a connection stopped for a handover leaves the bytes it read past
/// its last request: the stream's next bytes, for the process that goes on.
#[derive(Clone, Default, Debug)]
pub struct HandoverSlot(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

impl HandoverSlot {
    /// The bytes, once the connection has stopped for a handover (`None`
    /// before, or if it ended otherwise).
    pub fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok().and_then(|mut v| v.take())
    }

    fn put(&self, rest: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            *v = Some(rest);
        }
    }
}

/// Why a connection ends early; set once, by whoever notices first.
#[derive(Default)]
struct Dead {
    why: RefCell<Option<String>>,
    notify: Notify,
}

impl Dead {
    fn set(&self, why: String) {
        let mut w = self.why.borrow_mut();
        if w.is_none() {
            *w = Some(why);
            self.notify.notify_waiters();
        }
    }
    fn is_set(&self) -> bool {
        self.why.borrow().is_some()
    }
    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_set() {
                return;
            }
            n.await;
        }
    }
}

/// What ended a wait of the reader.
enum Interrupt {
    Stop,
    Dead,
}

/// Runs `fut` unless the server reaches `until` (Draining: it stops taking
/// requests) or the connection dies first.
async fn unless_stopped<F: Future>(
    fut: F,
    phase: &mut watch::Receiver<Phase>,
    until: Phase,
    dead: &Dead,
) -> Result<F::Output, Interrupt> {
    tokio::select! {
        biased;
        _ = phase.wait_for(|p| *p >= until) => Err(Interrupt::Stop),
        _ = dead.wait() => Err(Interrupt::Dead),
        v = fut => Ok(v),
    }
}

fn stalled(what: &str, t: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} made no progress for {} s", t.as_secs_f64()))
}

/// Buffered reading of the request stream. Every read that waits for bytes the
/// peer has announced (the rest of a header, a payload) has the stall deadline;
/// waiting for the next request does not.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    stall: Duration,
}

impl Input {
    fn new(leftover: Vec<u8>, stall: Duration) -> Input {
        let mut buf = vec![0u8; READ_BUF.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(&leftover);
        Input { end: leftover.len(), buf, start: 0, stall }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    /// The bytes read and not yet taken.
    fn rest(&self) -> Vec<u8> {
        self.buf[self.start..self.end].to_vec()
    }

    /// Reads until `n` bytes are buffered. `Ok(false)` on EOF before any of them.
    async fn fill(&mut self, rd: &mut ReadHalf, n: usize) -> io::Result<bool> {
        while self.available() < n {
            if self.start > 0 && self.buf.len() - self.end < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = if self.available() == 0 {
                rd.read(&mut self.buf[self.end..]).await?
            } else {
                tokio::time::timeout(self.stall, rd.read(&mut self.buf[self.end..]))
                    .await
                    .map_err(|_| stalled("a request header", self.stall))??
            };
            if got == 0 {
                if self.available() == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-request"));
            }
            self.end += got;
        }
        Ok(true)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.start..self.start + n];
        self.start += n;
        s
    }

    /// Fills `dst` from the buffer and then straight from the socket.
    async fn read_into(&mut self, rd: &mut ReadHalf, dst: &mut [u8]) -> io::Result<()> {
        let from_buf = self.available().min(dst.len());
        dst[..from_buf].copy_from_slice(&self.buf[self.start..self.start + from_buf]);
        self.start += from_buf;
        let mut done = from_buf;
        while done < dst.len() {
            let got = tokio::time::timeout(self.stall, rd.read(&mut dst[done..]))
                .await
                .map_err(|_| stalled("a WRITE payload", self.stall))??;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-payload"));
            }
            done += got;
        }
        Ok(())
    }

    /// Discards `n` payload bytes without storing them.
    async fn skip(&mut self, rd: &mut ReadHalf, mut n: u64) -> io::Result<()> {
        let from_buf = (self.available() as u64).min(n) as usize;
        self.start += from_buf;
        n -= from_buf as u64;
        let mut scratch = vec![0u8; 64 << 10];
        while n > 0 {
            let want = (n as usize).min(scratch.len());
            self.read_into(rd, &mut scratch[..want]).await?;
            n -= want as u64;
        }
        Ok(())
    }
}

/// Writes every slice, failing if a single write makes no progress for `stall`.
async fn write_all_vectored(wr: &mut WriteHalf, mut slices: &mut [IoSlice<'_>], stall: Duration) -> io::Result<()> {
    while !slices.is_empty() {
        let n = tokio::time::timeout(stall, wr.write_vectored(slices))
            .await
            .map_err(|_| stalled("the peer reading its replies", stall))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    // A TLS library may keep encrypted records it could not send yet (rustls
    // does): they must go out now, not when the next reply comes. A no-op
    // for plain sockets.
    tokio::time::timeout(stall, wr.flush()).await.map_err(|_| stalled("the peer reading its replies", stall))?
}

async fn writer(
    mut wr: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    dead: Rc<Dead>,
    stall: Duration,
    handed_over: Rc<std::cell::Cell<bool>>,
) {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH_REPLIES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.body_len();
        batch.push(first);
        while batch.len() < MAX_BATCH_REPLIES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.body_len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            slices.push(IoSlice::new(&r.head[..r.head_len as usize]));
            match &r.body {
                Body::None => {}
                Body::Buf(b) => slices.push(IoSlice::new(b.as_slice())),
                Body::Bytes(v) => slices.push(IoSlice::new(v)),
            }
        }
        let res = write_all_vectored(&mut wr, &mut slices, stall).await;
        drop(slices);
        // Written (or lost with the connection): slots and bytes come back.
        batch.clear();
        if let Err(e) = res {
            dead.set(format!("cannot send replies: {e}"));
            // Dropping the receiver makes every later reply drop at its sender,
            // releasing what it holds.
            return;
        }
    }
    // A socket handed over stays open for the next process: no FIN, also not
    // the one tokio's Unix write half sends when it is dropped.
    match (handed_over.get(), wr) {
        (true, WriteHalf::Unix(w)) => w.forget(),
        (_, mut wr) => {
            let _ = wr.shutdown().await;
        }
    }
}

/// Serves the transmission phase on `stream` until the client disconnects, the
/// connection breaks or stalls, or the server stops. Requests started on the
/// device always finish before this returns; their replies are delivered unless
/// the server is closing or the peer stopped reading.
pub async fn serve<D: BlockDevice>(
    stream: Stream,
    dev: Arc<D>,
    neg: &Negotiated,
    leftover: Vec<u8>,
    shared: ConnShared,
) -> io::Result<()> {
    let session = Session {
        structured: neg.structured,
        extended: neg.extended,
        base_allocation: neg.base_allocation,
        read_only: neg.export.read_only || dev.read_only(),
        flags: neg.flags,
        max_payload: neg.export.block.maximum,
    };
    let header_len = if session.extended { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
    let limits = shared.limits.clone();
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let dead = Rc::new(Dead::default());
    let handed_over = Rc::new(std::cell::Cell::new(false));
    let mut writer_task =
        tokio::task::spawn_local(writer(wr, rx, dead.clone(), limits.stall_timeout, handed_over.clone()));
    // Requests started on the device and not finished.
    let inflight = Drain::new();
    let slots = Slots::new(limits.max_requests);
    let budget = ConnBudget::new(shared.pool.clone(), &limits);
    let mut input = Input::new(leftover, limits.stall_timeout);
    let mut phase = shared.phase.clone();
    // Between two requests the server's stop is heeded at Draining; inside
    // one, a connection that is handed over finishes the request first
    // (only Closing interrupts it).
    let within = if shared.handover.is_some() { Phase::Closing } else { Phase::Draining };
    let result: io::Result<()> = loop {
        // A slot first: while every slot is taken the socket is not read.
        let slot = match unless_stopped(slots.take(), &mut phase, Phase::Draining, &dead).await {
            Ok(s) => s,
            Err(i) => {
                handed_over.set(matches!(i, Interrupt::Stop) && shared.handover.is_some());
                break Ok(());
            }
        };
        if input.available() < header_len {
            match unless_stopped(input.fill(&mut rd, header_len), &mut phase, Phase::Draining, &dead).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => break Ok(()),
                Err(i) => {
                    // Stopped before the header was complete: a boundary too
                    // (what was read of it stays in `input`).
                    handed_over.set(matches!(i, Interrupt::Stop) && shared.handover.is_some());
                    break Ok(());
                }
                Ok(Err(e)) => break Err(e),
            }
        }
        let parsed = if session.extended {
            let mut hb = [0u8; EXTENDED_REQUEST_LEN];
            hb.copy_from_slice(input.take(EXTENDED_REQUEST_LEN));
            ExtendedRequestHeader::parse(&hb)
        } else {
            let mut hb = [0u8; REQUEST_LEN];
            hb.copy_from_slice(input.take(REQUEST_LEN));
            RequestHeader::parse(&hb).map(ExtendedRequestHeader::from)
        };
        let header = match parsed {
            Ok(h) => h,
            // A header in the wrong form (or garbage): nothing after it can
            // be trusted to be in sync.
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        let to = To { cookie: header.cookie, offset: header.offset };
        let (kind, started) = (header.kind, Instant::now());
        let cmd = match validate(&header, &session, dev.size()) {
            Ok(c) => c,
            Err(Rejection { errno, reason, skip }) => {
                shared.stats.record(kind, 0, started, false);
                if skip > MAX_SKIP {
                    let _ = tx.send(Reply::error(&session, to, errno, reason).holding(slot, Vec::new()));
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a refused request announced {skip} payload bytes (more than {MAX_SKIP}): hanging up"),
                    ));
                }
                match unless_stopped(input.skip(&mut rd, skip), &mut phase, within, &dead).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(_) => break Ok(()),
                }
                let _ = tx.send(Reply::error(&session, to, errno, reason).holding(slot, Vec::new()));
                continue;
            }
        };
        debug_assert_eq!(
            payload_len(&header, &session),
            if matches!(cmd, Command::Write { .. }) { header.len } else { 0 }
        );
        match cmd {
            Command::Disconnect => break Ok(()),
            Command::Read { offset, len } => {
                let charge = match unless_stopped(budget.charge(len as usize), &mut phase, within, &dead).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        shared.stats.record(kind, 0, started, false);
                        let _ = tx.send(Reply::error(&session, to, ENOMEM, &e).holding(slot, Vec::new()));
                        continue;
                    }
                    Err(_) => break Ok(()),
                };
                let buf = shared.pool.alloc_unbudgeted(len as usize);
                let (dev, tx, guard, stats) = (dev.clone(), tx.clone(), inflight.enter_always(), shared.stats.clone());
                tokio::task::spawn_local(async move {
                    let (res, buf) = dev.read(offset, buf).await;
                    drop(guard);
                    stats.record(kind, len as u64, started, res.is_ok());
                    let reply = match res {
                        Ok(()) => Reply::read_data(&session, to, buf),
                        Err(e) => Reply::error(&session, to, wire_errno(e.errno()), &e.to_string()),
                    };
                    let _ = tx.send(reply.holding(slot, vec![charge]));
                });
            }
            Command::Write { offset, len, fua } => {
                let len = len as usize;
                // A payload charged as it arrives must not sit in memory before:
                // larger than a piece, it gets a fresh mapping whose pages become
                // resident only as bytes are read into them (a pooled buffer is
                // resident already), and is unmapped, not pooled, afterwards.
                let mut buf = if len > PAYLOAD_PIECE { IoBuf::new(len) } else { shared.pool.alloc_unbudgeted(len) };
                let mut charges = Vec::with_capacity(len.div_ceil(PAYLOAD_PIECE));
                let mut pos = 0usize;
                let mut ended: Option<io::Result<()>> = None;
                let mut refusal: Option<String> = None;
                while pos < len {
                    let n = (len - pos).min(PAYLOAD_PIECE);
                    // Charged piece by piece as the payload arrives.
                    match unless_stopped(budget.charge(n), &mut phase, within, &dead).await {
                        Ok(Ok(c)) => charges.push(c),
                        Ok(Err(e)) => {
                            refusal = Some(e);
                            break;
                        }
                        Err(_) => {
                            ended = Some(Ok(()));
                            break;
                        }
                    }
                    let piece = &mut buf.as_mut_slice()[pos..pos + n];
                    match unless_stopped(input.read_into(&mut rd, piece), &mut phase, within, &dead).await {
                        Ok(Ok(())) => pos += n,
                        Ok(Err(e)) => {
                            ended = Some(Err(e));
                            break;
                        }
                        Err(_) => {
                            ended = Some(Ok(()));
                            break;
                        }
                    }
                }
                // A payload that never arrived whole: the request was not started
                // and gets no reply.
                if let Some(r) = ended {
                    break r;
                }
                if let Some(e) = refusal {
                    drop(charges);
                    match unless_stopped(input.skip(&mut rd, (len - pos) as u64), &mut phase, within, &dead).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break Err(e),
                        Err(_) => break Ok(()),
                    }
                    shared.stats.record(kind, 0, started, false);
                    let _ = tx.send(Reply::error(&session, to, ENOMEM, &e).holding(slot, Vec::new()));
                    continue;
                }
                let (dev, tx, guard, stats) = (dev.clone(), tx.clone(), inflight.enter_always(), shared.stats.clone());
                tokio::task::spawn_local(async move {
                    let res = dev.write(offset, buf, fua).await;
                    drop(guard);
                    stats.record(kind, len as u64, started, res.is_ok());
                    let reply = match res {
                        Ok(()) => Reply::ok(&session, to),
                        Err(e) => Reply::error(&session, to, wire_errno(e.errno()), &e.to_string()),
                    };
                    // The payload buffer went to the device and is gone; its
                    // bytes stay charged until the reply is out, which bounds
                    // what a peer that reads no replies can make us hold.
                    let _ = tx.send(reply.holding(slot, charges));
                });
            }
            other => {
                let (dev, tx, guard, stats) = (dev.clone(), tx.clone(), inflight.enter_always(), shared.stats.clone());
                tokio::task::spawn_local(async move {
                    let (reply, ok) = run_command(&*dev, &session, to, other).await;
                    drop(guard);
                    stats.record(kind, 0, started, ok);
                    let _ = tx.send(reply.holding(slot, Vec::new()));
                });
            }
        }
    };
    // Requests started on the device finish whatever happens (their buffers
    // and locks are the engine's); then the replies drain.
    inflight.wait_idle().await;
    if let (true, Some(slot)) = (handed_over.get(), &shared.handover) {
        slot.put(input.rest());
    }
    drop(tx);
    let closing = async {
        let _ = phase.wait_for(|p| *p >= Phase::Closing).await;
    };
    tokio::select! {
        _ = &mut writer_task => {}
        _ = closing => {
            writer_task.abort();
            tracing::info!("closing a connection with unsent replies: the server is stopping");
        }
    }
    if let Some(why) = dead.why.borrow().as_ref() {
        tracing::info!("dropped a connection: {why}");
    }
    result
}

/// Runs a command without payload; the flag says whether it succeeded.
async fn run_command<D: BlockDevice>(dev: &D, session: &Session, to: To, cmd: Command) -> (Reply, bool) {
    let res = match cmd {
        Command::Flush => dev.flush().await,
        Command::Trim { offset, len, fua } => dev.trim(offset, len, fua).await,
        Command::Cache { offset, len } => dev.cache(offset, len).await,
        Command::WriteZeroes { offset, len, fua, may_unmap, fast } => {
            if fast && !dev.fast_zero() {
                // Refusing a fast zero is the protocol's answer, not a failure.
                return (Reply::error(session, to, ENOTSUP, "zeroing is not faster than writing on this device"), true);
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
                    (Reply::block_status(session, to, context, &ext), true)
                }
                Err(e) => (Reply::error(session, to, wire_errno(e.errno()), &e.to_string()), false),
            };
        }
        Command::Read { .. } | Command::Write { .. } | Command::Disconnect => {
            return (Reply::error(session, to, EINVAL, "internal dispatch error"), false)
        }
    };
    match res {
        Ok(()) => (Reply::ok(session, to), true),
        Err(e) => (Reply::error(session, to, wire_errno(e.errno()), &e.to_string()), false),
    }
}
