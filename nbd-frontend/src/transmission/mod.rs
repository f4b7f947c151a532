//! The transmission phase of one connection.
//!
//! A reader takes each request through named steps, as nbdkit's request loop
//! does ([`Connection::serve_request`]): take a request slot, **receive** the
//! header, **validate** it against this connection's session, **skip** the
//! payload of a refused request or **read** a WRITE's, then **handle** the
//! command as a task of its own; the task sends the reply ([`Done::send`]),
//! whose shape `reply.rs` encodes. So many requests are in flight and replies go out in
//! completion order; a single writer task (`writer.rs`) batches them into
//! vectored writes.
//!
//! | file | step |
//! | --- | --- |
//! | `input.rs` | buffered reading of headers and payloads, with the stall deadline |
//! | `handle.rs` | a command on the device, and its reply |
//! | `reply.rs` | one constructor per reply shape |
//! | `writer.rs` | sending replies, in batches |
//! | `ending.rs` | what ends the loop, decided in one place |
//! | `handover.rs` | stopping between two requests for `livemirror upgrade` |
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
//! read past the last one go into the slot (`handover.rs`).

mod ending;
mod handle;
mod handover;
mod input;
mod reply;
mod writer;

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{BlockDevice, BufPool, Drain, DrainGuard, IoBuf};
use tokio::sync::{mpsc, watch};

use self::ending::{Dead, End, Stops};
use self::handle::Outcome;
pub(crate) use self::handover::HandoverSlot;
use self::input::Input;
use self::reply::{Reply, To};
use crate::handshake::Negotiated;
use crate::limits::{Charge, ConnBudget, ConnLimits, SlotGuard, Slots};
use crate::proto::*;
use crate::request::{payload_len, validate, Command, Rejection, Session};
use crate::stats::Stats;
use crate::stream::{ReadHalf, Stream};

/// WRITE payloads are charged and read in pieces of this size (so a stalled
/// sender holds at most one piece more than it sent).
const PAYLOAD_PIECE: usize = 1 << 20;
/// A refused WRITE whose payload is larger than this is not skipped: the
/// connection is closed instead (nbdkit's rule: twice the maximum payload).
const MAX_SKIP: u64 = 2 * MAX_PAYLOAD as u64;

/// How far a server shutdown has gone (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Requests are taken.
    Running,
    /// No new requests; those in flight finish and their replies go out.
    Draining,
    /// Replies not yet written are dropped; connections close.
    Closing,
}

/// Server-wide resources a connection uses.
#[derive(Clone)]
pub(crate) struct ConnShared {
    /// The buffers and the payload budget every connection shares.
    pub(crate) pool: BufPool,
    /// The server's shutdown phase.
    pub(crate) phase: watch::Receiver<Phase>,
    /// What one connection may hold.
    pub(crate) limits: ConnLimits,
    /// The server's counters.
    pub(crate) stats: Arc<Stats>,
    /// Set for a connection that is handed over rather than closed (module docs).
    pub(crate) handover: Option<HandoverSlot>,
}

fn stalled(what: &str, t: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} made no progress for {} s", t.as_secs_f64()))
}

/// Serves the transmission phase on `stream` until the client disconnects, the
/// connection breaks or stalls, or the server stops. Requests started on the
/// device always finish before this returns; their replies are delivered unless
/// the server is closing or the peer stopped reading.
pub(crate) async fn serve<D: BlockDevice>(
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
    let limits = &shared.limits;
    let (rd, wr) = stream.into_split();
    let (replies, rx) = mpsc::unbounded_channel::<Reply>();
    let dead = Rc::new(Dead::default());
    // Set when the loop stops at a request boundary for a handover: the
    // writer then leaves the socket open for the next process.
    let handed_over = Rc::new(Cell::new(false));
    let mut writer_task =
        tokio::task::spawn_local(writer::run(wr, rx, dead.clone(), limits.stall_timeout, handed_over.clone()));
    // Between two requests the server's stop is heeded at Draining; inside
    // one, a connection that is handed over finishes the request first (only
    // Closing interrupts it).
    let within = if shared.handover.is_some() { Phase::Closing } else { Phase::Draining };
    let mut conn = Connection {
        dev,
        session,
        rd,
        input: Input::new(leftover, limits.stall_timeout),
        stops: Stops { phase: shared.phase.clone(), dead: dead.clone(), within },
        slots: Slots::new(limits.max_requests),
        budget: ConnBudget::new(shared.pool.clone(), limits),
        inflight: Drain::new(),
        replies,
        pool: shared.pool.clone(),
        stats: shared.stats.clone(),
    };
    let result = loop {
        match conn.serve_request().await {
            Ok(()) => {}
            Err(End::Clean) => break Ok(()),
            Err(End::Between) => {
                handed_over.set(shared.handover.is_some());
                break Ok(());
            }
            Err(End::Failed(e)) => break Err(e),
        }
    };
    // The reader's state goes now; its half of the stream lives until the
    // replies are out, with the writer's.
    let Connection { rd: _rd, input, inflight, replies, stops: Stops { mut phase, .. }, .. } = conn;
    // Requests started on the device finish whatever happens (their buffers
    // and locks are the engine's); then the replies drain.
    inflight.wait_idle().await;
    if let (true, Some(slot)) = (handed_over.get(), &shared.handover) {
        // What was read of the next request (or of several) is the next
        // process's to serve.
        slot.put(input.rest());
    }
    drop(replies);
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
    if let Some(why) = dead.why() {
        tracing::info!("dropped a connection: {why}");
    }
    result
}

/// One connection's reader and what its requests share.
struct Connection<D: BlockDevice> {
    dev: Arc<D>,
    session: Session,
    rd: ReadHalf,
    input: Input,
    stops: Stops,
    slots: Rc<Slots>,
    budget: Rc<ConnBudget>,
    /// Requests started on the device and not finished.
    inflight: Arc<Drain>,
    /// To the writer task.
    replies: mpsc::UnboundedSender<Reply>,
    pool: BufPool,
    stats: Arc<Stats>,
}

/// A request from its header until its reply is sent.
struct Request {
    to: To,
    kind: u16,
    started: Instant,
    slot: SlotGuard,
}

/// What a request on the device holds until it finishes: its place among the
/// requests in flight, and its slot and payload charges until its reply is
/// written.
struct Done {
    replies: mpsc::UnboundedSender<Reply>,
    guard: DrainGuard,
    stats: Arc<Stats>,
    req: Request,
    charges: Vec<Charge>,
}

impl Done {
    /// Leaves the requests in flight, counts the request, and hands its reply
    /// to the writer with the slot and charges it frees once written.
    fn send(self, outcome: Outcome) {
        let Done { replies, guard, stats, req, charges } = self;
        drop(guard);
        stats.record(req.kind, outcome.bytes, req.started, outcome.ok);
        let _ = replies.send(outcome.reply.holding(req.slot, charges));
    }
}

impl<D: BlockDevice> Connection<D> {
    /// One request, step by step. `Ok` when the next request may follow.
    async fn serve_request(&mut self) -> Result<(), End> {
        // A slot first: while every slot is taken the socket is not read.
        let slot = self.stops.between_requests(self.slots.take()).await?;
        let header = self.receive_header().await?;
        let to = To { cookie: header.cookie, offset: header.offset };
        let req = Request { to, kind: header.kind, started: Instant::now(), slot };
        let cmd = match validate(&header, &self.session, self.dev.size()) {
            Ok(c) => c,
            Err(rejection) => return self.refuse(req, rejection).await,
        };
        debug_assert_eq!(
            payload_len(&header, &self.session),
            if matches!(cmd, Command::Write { .. }) { header.len } else { 0 }
        );
        match cmd {
            Command::Disconnect => Err(End::Clean),
            Command::Read { offset, len } => self.start_read(req, offset, len).await,
            Command::Write { offset, len, fua } => self.receive_write(req, offset, len, fua).await,
            other => {
                let (dev, session, done) = (self.dev.clone(), self.session, self.when_done(req, Vec::new()));
                tokio::task::spawn_local(async move {
                    let outcome = handle::command(&*dev, &session, to, other).await;
                    done.send(outcome);
                });
                Ok(())
            }
        }
    }

    /// Receives the next request header; the peer closing before one ends the
    /// loop cleanly.
    async fn receive_header(&mut self) -> Result<ExtendedRequestHeader, End> {
        let header_len = if self.session.extended { EXTENDED_REQUEST_LEN } else { REQUEST_LEN };
        // Stopped before the header is complete: a boundary too (what was
        // read of it stays in `input`).
        if self.input.available() < header_len
            && !self.stops.between_requests(self.input.fill(&mut self.rd, header_len)).await??
        {
            return Err(End::Clean);
        }
        let parsed = if self.session.extended {
            let mut hb = [0u8; EXTENDED_REQUEST_LEN];
            hb.copy_from_slice(self.input.take(EXTENDED_REQUEST_LEN));
            ExtendedRequestHeader::parse(&hb)
        } else {
            let mut hb = [0u8; REQUEST_LEN];
            hb.copy_from_slice(self.input.take(REQUEST_LEN));
            RequestHeader::parse(&hb).map(ExtendedRequestHeader::from)
        };
        // A header in the wrong form (or garbage): nothing after it can be
        // trusted to be in sync.
        parsed.map_err(|e| End::Failed(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))
    }

    /// A request refused before the device: its payload is skipped to stay in
    /// sync, and the reply is the error. A payload too large to skip ends the
    /// connection after the reply.
    async fn refuse(&mut self, req: Request, r: Rejection) -> Result<(), End> {
        self.stats.record(req.kind, 0, req.started, false);
        if r.skip > MAX_SKIP {
            self.send_error(req, r.errno, r.reason);
            return Err(End::Failed(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a refused request announced {} payload bytes (more than {MAX_SKIP}): hanging up", r.skip),
            )));
        }
        self.stops.io(self.input.skip(&mut self.rd, r.skip)).await?;
        self.send_error(req, r.errno, r.reason);
        Ok(())
    }

    /// A READ: its reply's bytes are charged before it starts.
    async fn start_read(&mut self, req: Request, offset: u64, len: u32) -> Result<(), End> {
        let charge = match self.stops.unless_stopped(self.budget.charge(len as usize)).await? {
            Ok(c) => c,
            Err(why) => {
                self.stats.record(req.kind, 0, req.started, false);
                self.send_error(req, ENOMEM, &why);
                return Ok(());
            }
        };
        let buf = self.pool.alloc_unbudgeted(len as usize);
        let (dev, session, to, done) = (self.dev.clone(), self.session, req.to, self.when_done(req, vec![charge]));
        tokio::task::spawn_local(async move {
            let outcome = handle::read(&*dev, &session, to, offset, buf).await;
            done.send(outcome);
        });
        Ok(())
    }

    /// Reads a WRITE's payload, charged piece by piece as it arrives, then
    /// starts the write. A payload the budget refuses is skipped and the
    /// request refused; a payload that never arrives whole ends the loop, and
    /// its request, never started, gets no reply.
    async fn receive_write(&mut self, req: Request, offset: u64, len: u32, fua: bool) -> Result<(), End> {
        let len = len as usize;
        // A payload charged as it arrives must not sit in memory before:
        // larger than a piece, it gets a fresh mapping whose pages become
        // resident only as bytes are read into them (a pooled buffer is
        // resident already), and is unmapped, not pooled, afterwards.
        let mut buf = if len > PAYLOAD_PIECE { IoBuf::new(len) } else { self.pool.alloc_unbudgeted(len) };
        let mut charges = Vec::with_capacity(len.div_ceil(PAYLOAD_PIECE));
        let mut pos = 0usize;
        while pos < len {
            let n = (len - pos).min(PAYLOAD_PIECE);
            match self.stops.unless_stopped(self.budget.charge(n)).await? {
                Ok(c) => charges.push(c),
                Err(why) => {
                    drop(charges);
                    self.stops.io(self.input.skip(&mut self.rd, (len - pos) as u64)).await?;
                    self.stats.record(req.kind, 0, req.started, false);
                    self.send_error(req, ENOMEM, &why);
                    return Ok(());
                }
            }
            let piece = &mut buf.as_mut_slice()[pos..pos + n];
            self.stops.io(self.input.read_into(&mut self.rd, piece)).await?;
            pos += n;
        }
        // The payload buffer goes to the device and is gone; its bytes stay
        // charged until the reply is out, which bounds what a peer that reads
        // no replies can make us hold.
        let (dev, session, to, done) = (self.dev.clone(), self.session, req.to, self.when_done(req, charges));
        tokio::task::spawn_local(async move {
            let outcome = handle::write(&*dev, &session, to, offset, buf, fua).await;
            done.send(outcome);
        });
        Ok(())
    }

    /// What a request started on the device (a task of its own, spawned
    /// where the device call is written, so the task's future is built in
    /// place: a 4K write's is kilobytes) sends when it finishes.
    fn when_done(&self, req: Request, charges: Vec<Charge>) -> Done {
        Done {
            replies: self.replies.clone(),
            guard: self.inflight.enter_always(),
            stats: self.stats.clone(),
            req,
            charges,
        }
    }

    /// Sends an error reply for a request that never reached the device.
    fn send_error(&self, req: Request, errno: u32, msg: &str) {
        let _ = self.replies.send(Reply::error(&self.session, req.to, errno, msg).holding(req.slot, Vec::new()));
    }
}
