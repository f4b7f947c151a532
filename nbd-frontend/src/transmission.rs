//! The transmission phase of one connection.
//!
//! A reader parses requests as fast as they arrive and starts each as its own
//! task, so many requests are in flight and replies go out in completion order.
//! Payload buffers (WRITE data, READ results) come from the server-wide budgeted
//! pool: when the budget is spent the reader stops reading the socket, which is
//! the backpressure. A single writer task batches replies into vectored writes.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use engine::{BlockDevice, BufPool, IoBuf, StatusExtent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::handshake::Negotiated;
use crate::proto::*;
use crate::request::{validate, Command, Rejection, Session};

/// Most extents returned for one BLOCK_STATUS (the spec suggests ≤ 2^20).
const MAX_EXTENTS: usize = 1 << 16;
const READ_BUF: usize = 256 << 10;
const MAX_BATCH_REPLIES: usize = 128;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How long a closing connection may take to deliver its last replies to a peer
/// that does not read them.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const GRANULE: usize = 4096;

/// A connected stream of either kind, split into halves without locks.
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

pub enum ReadHalf {
    Unix(tokio::net::unix::OwnedReadHalf),
    Tcp(tokio::net::tcp::OwnedReadHalf),
}

pub enum WriteHalf {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
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
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Unix(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
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
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Unix(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// One reply: a small header and an optional body.
pub struct Reply {
    head: [u8; 32],
    head_len: u8,
    body: Body,
    /// This connection's share of the payload budget, released once sent.
    hold: Option<OwnedSemaphorePermit>,
}

enum Body {
    None,
    Buf(IoBuf),
    Bytes(Vec<u8>),
}

impl Reply {
    fn new(head: &[u8], body: Body) -> Reply {
        let mut h = [0u8; 32];
        h[..head.len()].copy_from_slice(head);
        Reply { head: h, head_len: head.len() as u8, body, hold: None }
    }

    fn body_len(&self) -> usize {
        match &self.body {
            Body::None => 0,
            Body::Buf(b) => b.len(),
            Body::Bytes(v) => v.len(),
        }
    }

    fn ok(cookie: u64) -> Reply {
        Reply::new(&simple_reply(0, cookie), Body::None)
    }

    fn holding(mut self, hold: OwnedSemaphorePermit) -> Reply {
        self.hold = Some(hold);
        self
    }

    fn error(session: &Session, cookie: u64, errno: u32, msg: &str) -> Reply {
        if !session.structured {
            return Reply::new(&simple_reply(errno, cookie), Body::None);
        }
        let msg = crate::handshake::truncate_utf8(msg, MAX_STRING).as_bytes();
        let mut body = Vec::with_capacity(6 + msg.len());
        body.extend_from_slice(&errno.to_be_bytes());
        body.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        body.extend_from_slice(msg);
        let head = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, body.len() as u32);
        Reply::new(&head, Body::Bytes(body))
    }

    fn read_data(session: &Session, cookie: u64, offset: u64, buf: IoBuf) -> Reply {
        if !session.structured {
            return Reply::new(&simple_reply(0, cookie), Body::Buf(buf));
        }
        if buf.is_empty() {
            return Reply::new(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0), Body::None);
        }
        // The data is all in memory, so no error can follow: the data chunk can
        // carry DONE itself (and one chunk satisfies DF).
        let mut head = [0u8; 28];
        head[..20].copy_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + buf.len() as u32,
        ));
        head[20..].copy_from_slice(&offset.to_be_bytes());
        Reply::new(&head, Body::Buf(buf))
    }

    fn block_status(cookie: u64, context: u32, extents: &[StatusExtent]) -> Reply {
        let mut body = Vec::with_capacity(4 + 8 * extents.len());
        body.extend_from_slice(&context.to_be_bytes());
        for e in extents {
            let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
            body.extend_from_slice(&(e.len as u32).to_be_bytes());
            body.extend_from_slice(&flags.to_be_bytes());
        }
        let head = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, body.len() as u32);
        Reply::new(&head, Body::Bytes(body))
    }
}

/// Server-wide resources a connection uses.
#[derive(Clone)]
pub struct ConnShared {
    pub pool: BufPool,
    pub shutdown: watch::Receiver<bool>,
    /// Payload bytes one connection may hold (in flight or unsent): a peer that
    /// stops reading its replies stalls itself, not the others.
    pub conn_budget: usize,
}

/// Buffered reading of the request stream.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    fn new(leftover: Vec<u8>) -> Input {
        let mut buf = vec![0u8; READ_BUF.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(&leftover);
        Input { end: leftover.len(), buf, start: 0 }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    /// Reads until `n` bytes are buffered. `Ok(false)` on EOF before any of them.
    async fn fill(&mut self, rd: &mut ReadHalf, n: usize) -> io::Result<bool> {
        while self.available() < n {
            if self.start > 0 && self.buf.len() - self.end < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = rd.read(&mut self.buf[self.end..]).await?;
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
        if from_buf < dst.len() {
            rd.read_exact(&mut dst[from_buf..]).await?;
        }
        Ok(())
    }

    /// Discards `n` payload bytes without storing them.
    async fn skip(&mut self, rd: &mut ReadHalf, mut n: u64) -> io::Result<()> {
        let from_buf = (self.available() as u64).min(n) as usize;
        self.start += from_buf;
        n -= from_buf as u64;
        let mut scratch = [0u8; 16 << 10];
        while n > 0 {
            let want = (n as usize).min(scratch.len());
            rd.read_exact(&mut scratch[..want]).await?;
            n -= want as u64;
        }
        Ok(())
    }
}

/// Counts requests in flight on this connection.
#[derive(Default)]
struct InFlight {
    count: Cell<usize>,
    idle: Notify,
}

impl InFlight {
    fn start(self: &Rc<Self>) -> InFlightGuard {
        self.count.set(self.count.get() + 1);
        InFlightGuard(self.clone())
    }
    async fn wait_idle(&self) {
        while self.count.get() > 0 {
            self.idle.notified().await;
        }
    }
}

struct InFlightGuard(Rc<InFlight>);
impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let c = self.0.count.get() - 1;
        self.0.count.set(c);
        if c == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

async fn write_all_vectored(wr: &mut WriteHalf, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

async fn writer(mut wr: WriteHalf, mut rx: mpsc::UnboundedReceiver<Reply>, dead: Rc<Cell<bool>>) {
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
        if !dead.get() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for r in &batch {
                slices.push(IoSlice::new(&r.head[..r.head_len as usize]));
                match &r.body {
                    Body::None => {}
                    Body::Buf(b) => slices.push(IoSlice::new(b.as_slice())),
                    Body::Bytes(v) => slices.push(IoSlice::new(v)),
                }
            }
            if let Err(e) = write_all_vectored(&mut wr, &mut slices).await {
                tracing::debug!("connection write failed: {e}");
                dead.set(true);
            }
        }
        batch.clear();
    }
    let _ = wr.shutdown().await;
}

/// Serves the transmission phase on `stream` until the client disconnects, the
/// connection breaks, or the server shuts down. In-flight requests always
/// finish before this returns.
pub async fn serve<D: BlockDevice>(
    stream: Stream,
    dev: Arc<D>,
    neg: &Negotiated,
    leftover: Vec<u8>,
    shared: ConnShared,
) -> io::Result<()> {
    let session = Session {
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        read_only: neg.export.read_only || dev.read_only(),
    };
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let dead = Rc::new(Cell::new(false));
    let writer_task = tokio::task::spawn_local(writer(wr, rx, dead.clone()));
    let inflight = Rc::new(InFlight::default());
    let mut input = Input::new(leftover);
    let mut shutdown = shared.shutdown.clone();
    let conn_granules = shared.conn_budget.div_ceil(GRANULE).max(1);
    let budget = Budget { pool: shared.pool.clone(), conn: Arc::new(Semaphore::new(conn_granules)), conn_granules };
    let result = loop {
        if dead.get() {
            break Ok(());
        }
        // Between requests, also watch for server shutdown.
        if input.available() < REQUEST_LEN {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break Ok(()),
                r = input.fill(&mut rd, REQUEST_LEN) => match r {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
            }
        }
        let mut hb = [0u8; REQUEST_LEN];
        hb.copy_from_slice(input.take(REQUEST_LEN));
        let header = match RequestHeader::parse(&hb) {
            Ok(h) => h,
            Err(e) => break Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        };
        let cookie = header.cookie;
        let cmd = match validate(&header, &session, dev.size()) {
            Ok(c) => c,
            Err(Rejection { errno, reason, skip }) => {
                if let Err(e) = input.skip(&mut rd, skip as u64).await {
                    break Err(e);
                }
                let _ = tx.send(Reply::error(&session, cookie, errno, reason));
                continue;
            }
        };
        let guard = inflight.start();
        match cmd {
            Command::Disconnect => {
                drop(guard);
                break Ok(());
            }
            Command::Read { offset, len } => {
                let (hold, buf) = match budget.take(len as usize, &mut shutdown).await {
                    Taken::Ok(h, b) => (h, b),
                    Taken::Shutdown => break Ok(()),
                    Taken::Err(e) => {
                        let _ = tx.send(Reply::error(&session, cookie, ENOMEM, &e));
                        continue;
                    }
                };
                let (dev, tx) = (dev.clone(), tx.clone());
                tokio::task::spawn_local(async move {
                    let (res, buf) = dev.read(offset, buf).await;
                    let reply = match res {
                        Ok(()) => Reply::read_data(&session, cookie, offset, buf),
                        Err(e) => Reply::error(&session, cookie, wire_errno(e.errno()), &e.to_string()),
                    };
                    let _ = tx.send(reply.holding(hold));
                    drop(guard);
                });
            }
            Command::Write { offset, len, fua } => {
                let (hold, mut buf) = match budget.take(len as usize, &mut shutdown).await {
                    Taken::Ok(h, b) => (h, b),
                    Taken::Shutdown => break Ok(()),
                    Taken::Err(e) => {
                        if let Err(e) = input.skip(&mut rd, len as u64).await {
                            break Err(e);
                        }
                        let _ = tx.send(Reply::error(&session, cookie, ENOMEM, &e));
                        continue;
                    }
                };
                if let Err(e) = input.read_into(&mut rd, buf.as_mut_slice()).await {
                    break Err(e);
                }
                let (dev, tx) = (dev.clone(), tx.clone());
                tokio::task::spawn_local(async move {
                    let reply = match dev.write(offset, buf, fua).await {
                        Ok(()) => Reply::ok(cookie),
                        Err(e) => Reply::error(&session, cookie, wire_errno(e.errno()), &e.to_string()),
                    };
                    drop(hold);
                    let _ = tx.send(reply);
                    drop(guard);
                });
            }
            other => {
                let (dev, tx) = (dev.clone(), tx.clone());
                tokio::task::spawn_local(async move {
                    let reply = run_command(&*dev, &session, cookie, other).await;
                    let _ = tx.send(reply);
                    drop(guard);
                });
            }
        }
    };
    // Every started request finishes and is answered (if the peer still
    // listens) before the connection closes.
    inflight.wait_idle().await;
    drop(tx);
    // A peer that stopped reading must not keep us here forever.
    if tokio::time::timeout(DRAIN_TIMEOUT, writer_task).await.is_err() {
        tracing::info!("dropping a connection whose peer does not read its replies");
    }
    result
}

/// The two budgets a payload buffer is charged to: this connection's and the
/// server's.
struct Budget {
    pool: BufPool,
    conn: Arc<Semaphore>,
    conn_granules: usize,
}

enum Taken {
    Ok(OwnedSemaphorePermit, IoBuf),
    Shutdown,
    Err(String),
}

impl Budget {
    /// Waits for both budgets, or for shutdown.
    async fn take(&self, len: usize, shutdown: &mut watch::Receiver<bool>) -> Taken {
        let granules = len.div_ceil(GRANULE).max(1);
        if granules > self.conn_granules {
            return Taken::Err(format!("a {len}-byte payload exceeds the per-connection budget"));
        }
        let conn = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Taken::Shutdown,
            p = self.conn.clone().acquire_many_owned(granules as u32) => match p {
                Ok(p) => p,
                Err(e) => return Taken::Err(e.to_string()),
            },
        };
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => Taken::Shutdown,
            b = self.pool.alloc(len) => match b {
                Ok(b) => Taken::Ok(conn, b),
                Err(e) => Taken::Err(e.to_string()),
            },
        }
    }
}

async fn run_command<D: BlockDevice>(dev: &D, session: &Session, cookie: u64, cmd: Command) -> Reply {
    let res = match cmd {
        Command::Flush => dev.flush().await,
        Command::Trim { offset, len, fua } => dev.trim(offset, len as u64, fua).await,
        Command::Cache { offset, len } => dev.cache(offset, len as u64).await,
        Command::WriteZeroes { offset, len, fua, may_unmap, fast } => {
            if fast && !dev.fast_zero() {
                return Reply::error(session, cookie, ENOTSUP, "zeroing is not faster than writing on this device");
            }
            dev.write_zeroes(offset, len as u64, may_unmap, fua).await
        }
        Command::BlockStatus { offset, len, req_one, context } => {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            return match dev.block_status(offset, len as u64, max).await {
                Ok(mut ext) => {
                    if ext.is_empty() {
                        ext.push(StatusExtent { len: len as u64, hole: false, zero: false });
                    }
                    if req_one {
                        ext.truncate(1);
                        ext[0].len = ext[0].len.min(len as u64);
                    }
                    Reply::block_status(cookie, context, &ext)
                }
                Err(e) => Reply::error(session, cookie, wire_errno(e.errno()), &e.to_string()),
            };
        }
        Command::Read { .. } | Command::Write { .. } | Command::Disconnect => {
            return Reply::error(session, cookie, EINVAL, "internal dispatch error")
        }
    };
    match res {
        Ok(()) => Reply::ok(cookie),
        Err(e) => Reply::error(session, cookie, wire_errno(e.errno()), &e.to_string()),
    }
}
