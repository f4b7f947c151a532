//! Fuzzes the sans-I/O handshake: arbitrary client bytes, fed in arbitrary
//! chunk sizes, against a few export configurations.
//!
//! Input layout (missing header bytes read as 0):
//!
//! | byte | meaning                                                            |
//! |------|--------------------------------------------------------------------|
//! | 0    | bits 0-1: export set (see `exports`); bits 2-3: TLS mode (0 off,   |
//! |      | 1 offered, 2-3 required); bits 4-7 == 0xA: repetition is on (kept  |
//! |      | rare: long streams are slow to execute)                            |
//! | 1    | chunking: 0 = everything in one `feed`, else pseudo-random chunk   |
//! |      | sizes in `1..=32*b` (b = this byte), seeded from it                |
//! | 2    | repetition (if on and b > 0): the body's tail (from `split`) is    |
//! |      | repeated `64*b` more times, capped at `MAX_STREAM`, so a small     |
//! |      | input can stream >64 KiB (option count limit, oversized options)   |
//! | 3-4  | `split` (big-endian u16), only used when repeating                 |
//! | 5..  | body: the client's byte stream (client flags, options, ...)        |
//!
//! TLS: on `Progress::StartTls` the harness plays the TLS handshake by calling
//! `tls_started` and keeps feeding: the rest of the stream is what the client
//! says inside TLS (the bytes are the same, only the transport differs).
//!
//! Invariants checked:
//! * no panic (including overflow checks: cargo-fuzz builds with
//!   debug assertions);
//! * once `feed` returns `Err`, `Done` or `Aborted`, the harness stops (and a
//!   further `feed` must be refused with `Finished`);
//! * all output is well formed: the 18-byte greeting, then option replies
//!   (error replies carry at most `MAX_STRING` bytes of UTF-8 text without
//!   NUL, as the spec requires of strings), then, if
//!   `NBD_OPT_EXPORT_NAME` finished the negotiation, exactly 10 or 134 bytes;
//! * no option reply is ever sent to `NBD_OPT_EXPORT_NAME` (the spec leaves
//!   the server no way to answer it but the export data or a disconnect);
//! * output is bounded: each option costs the client at least 16 bytes and
//!   makes at most `per_option_output_bound` bytes of replies, plus
//!   `ESCAPE_GROWTH` bytes per byte of export name it quotes in an error;
//! * `Done`: the export is one of those offered, its flags are
//!   `transmission_flags(export, structured)`, `base_allocation` implies
//!   structured replies, and what was sent to the client agrees;
//! * the leftover after `Done`/`Aborted` is exactly the tail of the bytes fed,
//!   shorter than the last chunk;
//! * TLS: STARTTLS is acknowledged only when TLS is on, once, and only as the
//!   last thing in a feed (plaintext behind it is refused); before TLS in
//!   required mode every reply is TLS_REQD except to STARTTLS and ABORT, and
//!   `Done` is reached only inside TLS; TLS_REQD is never sent otherwise;
//!   `Done` says TLS exactly when STARTTLS happened;
//! * extended headers imply structured replies, and are never finished with
//!   `NBD_OPT_EXPORT_NAME`;
//! * heap retained by the `Handshake` between calls stays below
//!   `2 * (MAX_OPTION_LEN + 16 + chunk) + slack`, and the heap peak inside one
//!   `feed` is bounded too (measured with a counting global allocator, since
//!   the buffers are private).
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use libfuzzer_sys::fuzz_target;
use nbd_frontend::handshake::{transmission_flags, HandshakeError, MAX_OPTIONS, MAX_OPTION_LEN};
use nbd_frontend::proto::*;
use nbd_frontend::{Export, Handshake, Progress, TlsMode};

// ---------------------------------------------------------------------------
// Heap accounting.

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Relaxed)
}

// ---------------------------------------------------------------------------
// Configuration.

/// The longest stream one input may expand to.
const MAX_STREAM: usize = 160 << 10;
/// Slack for small allocations (the initial output buffer, the last
/// SET_META_CONTEXT's export name (<= MAX_STRING), allocator rounding).
const HEAP_SLACK: usize = 2 * MAX_STRING + 4096;

fn export(name: &str, description: &str, size: u64, read_only: bool) -> Export {
    Export {
        name: name.into(),
        description: description.into(),
        size,
        read_only,
        fast_zero: !read_only,
        block: BlockSizes::default(),
    }
}

fn exports(sel: u8) -> Vec<Export> {
    match sel & 3 {
        0 => vec![
            export("", "default disk", 1 << 30, false),
            export("ro", "a read-only disk", 1 << 20, true),
            export("disk2", "", 4096, false),
        ],
        1 => vec![export("", "", 1 << 20, false)],
        2 => vec![],
        _ => (0..16)
            .map(|i| {
                export(&format!("export-{i:02}-{}", "n".repeat(i * 8)), &"d".repeat(200), i as u64 * 512, i % 2 == 1)
            })
            .collect(),
    }
}

/// Reply bytes per byte of option data: error replies quote the client's
/// export name with `{:?}`, which escapes a 1-byte control character as up to
/// 6 bytes (`\u{7f}`); longer characters grow less.
const ESCAPE_GROWTH: usize = 6;

/// The most reply bytes one option can produce, not counting the quoted export
/// name of an "unknown export" error (see `ESCAPE_GROWTH`); from
/// `Handshake::handle_option` and friends.
fn per_option_output_bound(exports: &[Export]) -> usize {
    // Fixed messages are < 80 bytes; "no export named {:?} on this server"
    // adds 33 around the name.
    let error = 20 + 96;
    let list: usize = exports.iter().map(|e| 20 + 4 + e.name.len() + e.description.len()).sum::<usize>() + 20;
    let info = exports
        .iter()
        .map(|e| (20 + 12) + (20 + 2 + e.name.len()) + (20 + 2 + e.description.len()) + (20 + 14) + 20)
        .max()
        .unwrap_or(0);
    let export_name = 8 + 2 + 124;
    let meta = (20 + 4 + BASE_ALLOCATION.len()) + 20;
    [error, list, info, export_name, meta].into_iter().max().unwrap()
}

/// The client's byte stream: `prefix` once, then `tail` repeated (or the whole
/// body once when not repeating), without materialising it.
struct Stream<'a> {
    prefix: &'a [u8],
    tail: &'a [u8],
    len: usize,
    pos: usize,
}

impl<'a> Stream<'a> {
    fn new(body: &'a [u8], reps: u8, split: u16) -> Stream<'a> {
        if reps == 0 {
            return Stream { prefix: body, tail: &[], len: body.len(), pos: 0 };
        }
        let split = (split as usize).min(body.len());
        let (prefix, tail) = body.split_at(split);
        let len = (prefix.len() + tail.len() * (1 + 64 * reps as usize)).min(MAX_STREAM);
        Stream { prefix, tail, len, pos: 0 }
    }

    /// Byte `i` of the stream (for checking the leftover).
    fn at(&self, i: usize) -> u8 {
        if i < self.prefix.len() {
            self.prefix[i]
        } else {
            self.tail[(i - self.prefix.len()) % self.tail.len()]
        }
    }

    /// Fills `buf` with the next `n` bytes (fewer at the end).
    fn next_chunk(&mut self, buf: &mut Vec<u8>, n: usize) {
        buf.clear();
        let end = (self.pos + n).min(self.len);
        while self.pos < end {
            if self.pos < self.prefix.len() {
                let take = (end.min(self.prefix.len())) - self.pos;
                buf.extend_from_slice(&self.prefix[self.pos..self.pos + take]);
                self.pos += take;
            } else {
                let off = (self.pos - self.prefix.len()) % self.tail.len();
                let take = (self.tail.len() - off).min(end - self.pos);
                buf.extend_from_slice(&self.tail[off..off + take]);
                self.pos += take;
            }
        }
    }
}

/// Chunk sizes: everything at once, or xorshift-chosen sizes in `1..=32*seed`.
struct Chunker {
    seed: u8,
    state: u32,
}

impl Chunker {
    fn max(&self) -> usize {
        if self.seed == 0 {
            MAX_STREAM
        } else {
            32 * self.seed as usize
        }
    }
    fn next(&mut self) -> usize {
        if self.seed == 0 {
            return MAX_STREAM;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + (self.state as usize % self.max())
    }
}

// ---------------------------------------------------------------------------
// Output checking: an incremental parser of the server's byte stream, so that
// the harness holds no growing buffers (keeps the heap accounting exact).

#[derive(Debug, Default)]
struct Reply {
    opt: u32,
    kind: u32,
    len: u32,
}

#[derive(Debug)]
enum OutState {
    Greeting,
    Header,
    Data(Reply),
    /// After an NBD_OPT_EXPORT_NAME finish: size, flags, maybe zeroes.
    Trailer,
}

struct OutChecker {
    state: OutState,
    /// Partial greeting/reply header bytes, or the data of the current reply.
    buf: Vec<u8>,
    total: usize,
    trailer: Vec<u8>,
    /// The INFO_EXPORT payload of the last successful GO/INFO.
    last_info_export: Option<(u64, u16)>,
    last_reply: Option<(u32, u32)>,
    /// The server's TLS mode, and whether the harness started TLS.
    tls_mode: TlsMode,
    tls: bool,
    /// A client that is not fixed newstyle (TLS is impossible for it).
    fixed: bool,
}

impl OutChecker {
    fn new() -> OutChecker {
        OutChecker {
            state: OutState::Greeting,
            buf: Vec::with_capacity(MAX_STRING + 64),
            total: 0,
            trailer: Vec::with_capacity(256),
            last_info_export: None,
            last_reply: None,
            tls_mode: TlsMode::Off,
            tls: false,
            fixed: true,
        }
    }

    fn push(&mut self, mut out: &[u8]) {
        self.total += out.len();
        while !out.is_empty() {
            match &self.state {
                OutState::Greeting => {
                    let take = (18 - self.buf.len()).min(out.len());
                    self.buf.extend_from_slice(&out[..take]);
                    out = &out[take..];
                    if self.buf.len() < 18 {
                        continue;
                    }
                    assert_eq!(&self.buf[..8], &NBDMAGIC.to_be_bytes());
                    assert_eq!(&self.buf[8..16], &IHAVEOPT.to_be_bytes());
                    assert_eq!(&self.buf[16..18], &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                    self.buf.clear();
                    self.state = OutState::Header;
                }
                OutState::Header => {
                    // The magic first: if it is not a reply's, this is the
                    // EXPORT_NAME trailer (whose first 8 bytes, the export
                    // size, are never OPT_REPLY_MAGIC for our exports).
                    let want = if self.buf.len() < 8 { 8 } else { 20 };
                    let take = (want - self.buf.len()).min(out.len());
                    self.buf.extend_from_slice(&out[..take]);
                    out = &out[take..];
                    if self.buf.len() < want {
                        continue;
                    }
                    if want == 8 {
                        if self.buf[..] != OPT_REPLY_MAGIC.to_be_bytes() {
                            self.trailer.extend_from_slice(&self.buf);
                            self.buf.clear();
                            self.state = OutState::Trailer;
                        }
                        continue;
                    }
                    let u = |i: usize| u32::from_be_bytes(self.buf[i..i + 4].try_into().unwrap());
                    let r = Reply { opt: u(8), kind: u(12), len: u(16) };
                    assert!(r.len as usize <= MAX_OPTION_LEN as usize, "reply of {} bytes", r.len);
                    if r.kind & (1 << 31) != 0 {
                        assert!(r.len as usize <= MAX_STRING, "error reply of {} bytes", r.len);
                    }
                    self.buf.clear();
                    let empty = r.len == 0;
                    self.state = OutState::Data(r);
                    if empty {
                        self.finish_reply();
                    }
                }
                OutState::Data(r) => {
                    let len = r.len as usize;
                    let take = (len - self.buf.len()).min(out.len());
                    self.buf.extend_from_slice(&out[..take]);
                    out = &out[take..];
                    if self.buf.len() == len {
                        self.finish_reply();
                    }
                }
                OutState::Trailer => {
                    assert!(self.trailer.len() + out.len() <= 134, "trailer longer than 134 bytes");
                    self.trailer.extend_from_slice(out);
                    out = &[];
                }
            }
        }
    }

    fn finish_reply(&mut self) {
        let OutState::Data(r) = std::mem::replace(&mut self.state, OutState::Header) else { unreachable!() };
        let d = &self.buf[..];
        // NBD_OPT_EXPORT_NAME cannot be answered with an option reply: the
        // client reads the export size next, so a problem means disconnect.
        assert_ne!(r.opt, OPT_EXPORT_NAME, "option reply {:#x} sent to NBD_OPT_EXPORT_NAME", r.kind);
        if r.kind & (1 << 31) != 0 {
            if let Err(e) = std::str::from_utf8(d) {
                panic!(
                    "error reply {:#x} to option {} is not UTF-8 ({e}): {:?}",
                    r.kind,
                    r.opt,
                    String::from_utf8_lossy(d)
                );
            }
            assert!(!d.contains(&0), "error reply {:#x} to option {} contains NUL", r.kind, r.opt);
        }
        if r.kind == REP_INFO && d.len() >= 2 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
            assert_eq!(d.len(), 12, "INFO_EXPORT payload");
            let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            let flags = u16::from_be_bytes([d[10], d[11]]);
            self.last_info_export = Some((size, flags));
        }
        if r.kind == REP_ERR_TLS_REQD {
            assert!(
                self.tls_mode == TlsMode::Required && !self.tls,
                "TLS_REQD to option {} outside required TLS",
                r.opt
            );
        } else if self.tls_mode == TlsMode::Required && !self.tls {
            let allowed = matches!((r.opt, r.kind), (OPT_STARTTLS, REP_ACK | REP_ERR_INVALID) | (OPT_ABORT, REP_ACK));
            assert!(allowed, "reply {:#x} to option {} before the required TLS", r.kind, r.opt);
        }
        if (r.opt, r.kind) == (OPT_STARTTLS, REP_ACK) {
            assert!(
                self.tls_mode != TlsMode::Off && self.fixed && !self.tls,
                "STARTTLS acknowledged in {:?}, tls={}",
                self.tls_mode,
                self.tls
            );
        }
        if r.kind == REP_SERVER {
            assert!(d.len() >= 4);
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            assert!(n <= d.len() - 4, "LIST entry name length past the reply");
        }
        self.last_reply = Some((r.opt, r.kind));
        self.buf.clear();
    }
}

// ---------------------------------------------------------------------------

fn progress_heap(r: &Result<Progress, HandshakeError>) -> usize {
    match r {
        Ok(Progress::Done(n)) => n.export.name.capacity() + n.export.description.capacity(),
        Err(HandshakeError::UnknownExport(s)) => s.capacity(),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let hdr = |i: usize| data.get(i).copied().unwrap_or(0);
    let body = data.get(5..).unwrap_or(&[]);
    let reps = if hdr(0) >> 4 == 0xA { hdr(2) } else { 0 };
    let mut stream = Stream::new(body, reps, u16::from_be_bytes([hdr(3), hdr(4)]));
    let mut chunker = Chunker { seed: hdr(1), state: 0x9e37_79b9 ^ hdr(1) as u32 };
    let offered = exports(hdr(0));
    let tls_mode = match (hdr(0) >> 2) & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Offered,
        _ => TlsMode::Required,
    };
    let per_option = per_option_output_bound(&offered);
    let no_zeroes = body.len() >= 4 && body[3] & FLAG_C_NO_ZEROES as u8 != 0;

    let max_chunk = chunker.max().min(stream.len.max(1));
    let mut chunk = Vec::with_capacity(max_chunk);
    let mut checker = OutChecker::new();
    checker.tls_mode = tls_mode;
    checker.fixed = body.len() < 4 || body[3] & FLAG_C_FIXED_NEWSTYLE as u8 != 0;
    let hs_exports = offered.clone();

    // Everything the harness owns is allocated; from here on the heap growth
    // is the handshake's (minus what the harness is handed, subtracted below).
    let base = live();
    let mut hs = Handshake::with_tls(hs_exports, tls_mode);
    let retained_bound = 2 * (MAX_OPTION_LEN as usize + 16 + max_chunk) + HEAP_SLACK;

    let mut fed = 0usize;
    let mut last_chunk = 0usize;
    let mut ended: Option<Progress> = None;
    checker.push(&hs.take_output());
    while stream.pos < stream.len {
        let n = chunker.next();
        stream.next_chunk(&mut chunk, n);
        last_chunk = chunk.len();

        let before = live();
        PEAK.store(before, Relaxed);
        let r = hs.feed(&chunk);
        let peak = PEAK.load(Relaxed) - before;
        let out = hs.take_output();
        let retained = live().saturating_sub(base + out.capacity() + progress_heap(&r));
        fed += chunk.len();

        assert!(retained <= retained_bound, "handshake retains {retained} heap bytes (bound {retained_bound}) after {fed} bytes fed in chunks of <= {max_chunk}");
        // Inside one feed: the buffers, one copy of an option's data, the
        // replies it produced (at most doubled by Vec growth) and their
        // formatting temporaries.
        let peak_bound = 2 * retained_bound + 2 * out.len() + MAX_OPTION_LEN as usize + 8 * MAX_STRING;
        assert!(peak <= peak_bound, "feed of {} bytes peaked at {peak} heap bytes (bound {peak_bound})", chunk.len());

        checker.push(&out);
        drop(out);
        let options = (fed.saturating_sub(4) / 16).min(MAX_OPTIONS as usize);
        let out_bound = 18 + options * per_option + ESCAPE_GROWTH * fed;
        assert!(checker.total <= out_bound, "{} output bytes for {fed} input bytes (bound {out_bound})", checker.total);

        match r {
            Ok(Progress::Continue) => {}
            Ok(Progress::StartTls) => {
                // The ACK was the last reply, and nothing was left behind it.
                assert_eq!(checker.last_reply, Some((OPT_STARTTLS, REP_ACK)));
                assert!(hs.take_leftover().is_empty(), "input kept across STARTTLS");
                hs.tls_started().expect("TLS starts after StartTls");
                assert!(hs.tls_active());
                checker.tls = true;
            }
            Ok(p) => {
                ended = Some(p);
                break;
            }
            Err(HandshakeError::PlaintextAfterStartTls(n)) => {
                assert!(n > 0);
                assert_eq!(checker.last_reply, Some((OPT_STARTTLS, REP_ACK)), "refused plaintext after what?");
                return;
            }
            Err(HandshakeError::TlsRequired) => {
                assert!(tls_mode == TlsMode::Required && !checker.tls);
                return;
            }
            Err(_) => return,
        }
    }

    let Some(end) = ended else { return };

    // The leftover is exactly what followed the final option.
    let leftover = hs.take_leftover();
    assert!(leftover.len() < last_chunk, "leftover {} >= last chunk {last_chunk}", leftover.len());
    for (i, b) in leftover.iter().enumerate() {
        assert_eq!(*b, stream.at(fed - leftover.len() + i), "leftover byte {i} is not the stream's");
    }
    // Finished means finished.
    assert_eq!(hs.feed(b"more"), Err(HandshakeError::Finished));
    assert!(!hs.has_output());

    match end {
        Progress::Aborted => {
            assert_eq!(checker.last_reply, Some((OPT_ABORT, REP_ACK)), "abort is acknowledged");
            assert!(checker.trailer.is_empty());
        }
        Progress::Done(n) => {
            assert!(offered.contains(&n.export), "negotiated export {:?} was not offered", n.export.name);
            assert_eq!(n.tls, checker.tls, "Done says TLS={} after STARTTLS={}", n.tls, checker.tls);
            if tls_mode == TlsMode::Required {
                assert!(n.tls, "transmission without the required TLS");
            }
            if n.extended {
                assert!(n.structured, "extended headers without structured replies");
                assert!(checker.trailer.is_empty(), "extended headers finished by EXPORT_NAME");
            }
            assert_eq!(n.flags, transmission_flags(&n.export, n.structured));
            if n.base_allocation.is_some() {
                assert!(n.structured, "base:allocation without structured replies");
            }
            if n.structured {
                assert_ne!(n.flags & TF_SEND_DF, 0);
            }
            assert_eq!(n.flags & TF_READ_ONLY != 0, n.export.read_only);
            if checker.trailer.is_empty() {
                // NBD_OPT_GO: ended by its ACK, after an INFO_EXPORT for the export.
                assert!(matches!(checker.state, OutState::Header) && checker.buf.is_empty(), "output ends mid-reply");
                assert_eq!(checker.last_reply, Some((OPT_GO, REP_ACK)));
                assert_eq!(checker.last_info_export, Some((n.export.size, n.flags)));
            } else {
                // NBD_OPT_EXPORT_NAME: size, flags, and zeroes unless NO_ZEROES.
                let t = &checker.trailer;
                assert_eq!(t.len(), if no_zeroes { 10 } else { 134 });
                assert_eq!(u64::from_be_bytes(t[..8].try_into().unwrap()), n.export.size);
                assert_eq!(u16::from_be_bytes([t[8], t[9]]), n.flags);
                assert!(t[10..].iter().all(|&b| b == 0));
            }
        }
        Progress::Continue | Progress::StartTls => unreachable!(),
    }
});
