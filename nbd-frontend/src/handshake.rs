//! The fixed-newstyle handshake as a sans-I/O state machine.
//!
//! Bytes from the client go in through [`Handshake::feed`]; bytes for the client
//! come out of [`Handshake::take_output`]. Nothing here reads a socket, so the
//! whole negotiation can be driven (and fuzzed) from memory. The input buffer is
//! bounded: an option longer than [`MAX_OPTION_LEN`] is skipped without being
//! stored and answered with `NBD_REP_ERR_TOO_BIG` — except the two that take no
//! data: ABORT is acknowledged as soon as its header arrives, and an oversized
//! STARTTLS gets the `NBD_REP_ERR_INVALID` any payload on it earns.
//!
//! TLS ([`TlsMode`]): `NBD_OPT_STARTTLS` is acknowledged with
//! [`Progress::StartTls`]; the driver then runs the TLS handshake on its
//! socket and calls [`Handshake::tls_started`], which forgets everything
//! negotiated in plaintext (structured replies, extended headers, the metadata
//! context) and goes on reading options from the TLS stream. Bytes that arrive
//! in plaintext after STARTTLS are never carried into the TLS session: they
//! are a protocol violation (and the classic STARTTLS injection), so the
//! connection is dropped. With [`TlsMode::Required`] every option before TLS
//! but STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD` without its data
//! being stored, and `NBD_OPT_EXPORT_NAME` (which cannot be refused) hangs up.

use crate::proto::*;

/// Longest option payload we buffer (an export name, info requests, queries).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The answer to a STARTTLS that carries data, short or oversized.
const STARTTLS_TAKES_NO_DATA: &str = "NBD_OPT_STARTTLS takes no data";
/// A client that sends more options than this is not negotiating in good faith.
pub const MAX_OPTIONS: u32 = 4096;

/// What the server offers under one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The name a client asks for (`""` is the default export).
    pub name: String,
    /// Sent with NBD_INFO_DESCRIPTION when not empty.
    pub description: String,
    /// Its size in bytes.
    pub size: u64,
    /// Served read-only.
    pub read_only: bool,
    /// Zeroing is cheaper than writing zeroes (FAST_ZERO is offered).
    pub fast_zero: bool,
    /// What NBD_INFO_BLOCK_SIZE says.
    pub block: BlockSizes,
}

/// How the server treats TLS on a connection (`--tls off|on|require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS is unsupported.
    Off,
    /// STARTTLS is offered; plaintext clients are served too.
    Offered,
    /// Nothing but STARTTLS (and ABORT) before TLS; the spec's FORCEDTLS.
    Required,
}

/// The result of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export the client chose.
    pub export: Export,
    /// Structured replies; also true with extended headers, which imply them.
    pub structured: bool,
    /// Extended headers: 32-byte requests and replies.
    pub extended: bool,
    /// The options, and so the transmission phase, ran inside TLS.
    pub tls: bool,
    /// The context id of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// What [`Handshake::feed`] made of the input so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More input is needed.
    Continue,
    /// Transmission phase begins.
    Done(Negotiated),
    /// The client aborted (soft disconnect).
    Aborted,
    /// STARTTLS was acknowledged (the ACK is queued as output): send it, run
    /// the TLS handshake, then call [`Handshake::tls_started`].
    StartTls,
}

/// Why the server drops the connection (a hard disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Client flags this server does not know.
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option that does not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// NBD_OPT_EXPORT_NAME for an export we do not have (it cannot be answered).
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// An export name that is not UTF-8.
    #[error("export name is not valid UTF-8")]
    BadExportName,
    /// NBD_OPT_EXPORT_NAME with a name longer than a protocol string.
    #[error("export name of {0} bytes with NBD_OPT_EXPORT_NAME")]
    ExportNameTooLong(u32),
    /// More than [`MAX_OPTIONS`] options.
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// Input fed after the negotiation ended.
    #[error("the negotiation already finished")]
    Finished,
    /// NBD_OPT_EXPORT_NAME in plaintext when TLS is required.
    #[error("NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    TlsRequired,
    /// A client without fixed newstyle, when TLS is required.
    #[error("the client does not speak fixed newstyle, so it cannot start the TLS this server requires")]
    TlsNeedsFixedNewstyle,
    /// Bytes that arrived in plaintext after STARTTLS and before TLS.
    #[error("{0} plaintext bytes after NBD_OPT_STARTTLS, before the TLS handshake")]
    PlaintextAfterStartTls(usize),
    /// [`Handshake::tls_started`] without a STARTTLS acknowledged.
    #[error("no STARTTLS is waiting for its TLS handshake")]
    NoTlsPending,
    /// NBD_OPT_EXPORT_NAME, which has no way to end with extended headers.
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameWithExtendedHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        opt: u32,
        len: u32,
    },
    /// An option answered with the error `reply` and its text `why` without
    /// its data being stored: too long (TOO_BIG), sent before the required TLS
    /// (TLS_REQD), or a STARTTLS with data (INVALID).
    SkipData {
        opt: u32,
        remaining: u32,
        reply: u32,
        why: &'static str,
    },
    /// STARTTLS was acknowledged; the driver runs the TLS handshake.
    AwaitTls,
    Finished,
}

const BASE_ALLOCATION_ID: u32 = 1;

/// The server side of the option negotiation, sans-I/O: the driver feeds it
/// what the client sent and sends what it outputs.
pub struct Handshake {
    exports: Vec<Export>,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    no_zeroes: bool,
    /// What the server was configured for; a client that is not fixed
    /// newstyle gets `Off` (the spec allows TLS only with fixed newstyle).
    tls_mode: TlsMode,
    /// TLS is running: options now arrive decrypted.
    tls_active: bool,
    structured: bool,
    extended: bool,
    /// Export name the last SET_META_CONTEXT referred to, and whether it
    /// selected base:allocation.
    meta: Option<(String, bool)>,
    options: u32,
}

/// The transmission flags for `export`, truthfully: only what we implement.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if export.read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary (protocol strings must stay valid UTF-8).
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked reader over option data.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.data.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.data.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }
    fn string(&mut self) -> Option<Result<&'a str, ()>> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Some(Err(()));
        }
        let b = self.bytes(n)?;
        Some(std::str::from_utf8(b).map_err(|_| ()))
    }
    fn at_end(&self) -> bool {
        self.pos == self.data.len()
    }
}

/// A parse failure of option data, answered with NBD_REP_ERR_INVALID.
struct Invalid(&'static str);

impl Handshake {
    /// Starts a negotiation without TLS; the greeting is already queued.
    pub fn new(exports: Vec<Export>) -> Handshake {
        Handshake::with_tls(exports, TlsMode::Off)
    }

    /// Starts a negotiation in `tls_mode`; the greeting is already queued.
    pub fn with_tls(exports: Vec<Export>, tls_mode: TlsMode) -> Handshake {
        let mut output = Vec::with_capacity(256);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            exports,
            state: State::ClientFlags,
            input: Vec::new(),
            output,
            no_zeroes: false,
            tls_mode,
            tls_active: false,
            structured: false,
            extended: false,
            meta: None,
            options: 0,
        }
    }

    /// True once STARTTLS succeeded and the TLS handshake ran.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after [`Progress::StartTls`] succeeded: negotiation
    /// starts over inside TLS. Nothing negotiated in plaintext survives (the
    /// spec: the client must negotiate structured replies, extended headers
    /// and metadata contexts again), so a man in the middle of the plaintext
    /// part cannot have changed what the session uses.
    pub fn tls_started(&mut self) -> Result<(), HandshakeError> {
        if self.state != State::AwaitTls {
            return Err(HandshakeError::NoTlsPending);
        }
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta = None;
        self.input.clear();
        self.state = State::OptionHeader;
        Ok(())
    }

    /// Whether an option received now is refused for want of TLS (ABORT never
    /// gets here: it is answered as soon as its header arrives).
    fn needs_tls_first(&self, opt: u32) -> bool {
        self.tls_mode == TlsMode::Required && !self.tls_active && opt != OPT_STARTTLS
    }

    /// Bytes to send to the client.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Output is waiting to be sent.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Input received after the negotiation finished (belongs to the
    /// transmission phase).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    fn find(&self, name: &str) -> Option<&Export> {
        self.exports.iter().find(|e| e.name == name)
    }

    /// Feeds client bytes and advances as far as they allow.
    pub fn feed(&mut self, data: &[u8]) -> Result<Progress, HandshakeError> {
        match self.state {
            State::Finished => return Err(HandshakeError::Finished),
            // Plaintext between STARTTLS and the TLS handshake.
            State::AwaitTls => return Err(HandshakeError::PlaintextAfterStartTls(self.input.len() + data.len())),
            _ => {}
        }
        let mut data = data;
        loop {
            // Skipping a refused option consumes input without storing it.
            if let State::SkipData { opt, remaining, reply, why } = self.state {
                let from_buf = self.input.len().min(remaining as usize);
                self.input.drain(..from_buf);
                let mut remaining = remaining - from_buf as u32;
                let from_data = data.len().min(remaining as usize);
                data = &data[from_data..];
                remaining -= from_data as u32;
                if remaining > 0 {
                    self.state = State::SkipData { opt, remaining, reply, why };
                    return Ok(Progress::Continue);
                }
                self.reply_error(opt, reply, why);
                self.state = State::OptionHeader;
                continue;
            }
            if !data.is_empty() {
                self.input.extend_from_slice(data);
                data = &[];
            }
            match self.step()? {
                Some(Progress::StartTls) if !self.input.is_empty() => {
                    // The client did not wait for the ACK: whatever it sent
                    // is not part of the TLS session and must not be read as
                    // options inside it.
                    return Err(HandshakeError::PlaintextAfterStartTls(self.input.len()));
                }
                Some(p) => return Ok(p),
                None if self.state == State::Finished => return Ok(Progress::Continue),
                None => {}
            }
        }
    }

    /// One state transition. `Ok(None)` means "call again", `Ok(Some(Continue))`
    /// means "need more input".
    fn step(&mut self) -> Result<Option<Progress>, HandshakeError> {
        match self.state {
            State::ClientFlags => {
                let Some(b) = self.input.get(..4) else { return Ok(Some(Progress::Continue)) };
                let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                self.input.drain(..4);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(HandshakeError::UnknownClientFlags(flags));
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    // Such a client can only send EXPORT_NAME: TLS is impossible.
                    match self.tls_mode {
                        TlsMode::Required => return Err(HandshakeError::TlsNeedsFixedNewstyle),
                        TlsMode::Offered => self.tls_mode = TlsMode::Off,
                        TlsMode::Off => {}
                    }
                }
                self.state = State::OptionHeader;
                Ok(None)
            }
            State::OptionHeader => {
                let Some(b) = self.input.get(..16) else { return Ok(Some(Progress::Continue)) };
                let magic = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                let opt = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
                let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
                self.input.drain(..16);
                if magic != IHAVEOPT {
                    return Err(HandshakeError::BadOptionMagic(magic));
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(HandshakeError::TooManyOptions);
                }
                if opt == OPT_ABORT {
                    // Answered at once whatever data follows: the client is leaving,
                    // and an oversized ABORT must not earn a TOO_BIG first.
                    self.reply(opt, REP_ACK, &[]);
                    self.state = State::Finished;
                    return Ok(Some(Progress::Aborted));
                }
                if opt == OPT_EXPORT_NAME && self.needs_tls_first(opt) {
                    // EXPORT_NAME has no error reply: the only answer is to hang up.
                    return Err(HandshakeError::TlsRequired);
                }
                if opt == OPT_EXPORT_NAME && len > MAX_OPTION_LEN {
                    return Err(HandshakeError::ExportNameTooLong(len));
                }
                self.state = if self.needs_tls_first(opt) {
                    // Refused whatever it says: not worth storing before TLS.
                    State::SkipData {
                        opt,
                        remaining: len,
                        reply: REP_ERR_TLS_REQD,
                        why: "TLS is required: send NBD_OPT_STARTTLS first",
                    }
                } else if len > MAX_OPTION_LEN && opt == OPT_STARTTLS {
                    // STARTTLS takes no data: the same answer as for a short payload.
                    State::SkipData { opt, remaining: len, reply: REP_ERR_INVALID, why: STARTTLS_TAKES_NO_DATA }
                } else if len > MAX_OPTION_LEN {
                    State::SkipData { opt, remaining: len, reply: REP_ERR_TOO_BIG, why: "option data is too long" }
                } else {
                    State::OptionData { opt, len }
                };
                Ok(None)
            }
            State::OptionData { opt, len } => {
                if self.input.len() < len as usize {
                    return Ok(Some(Progress::Continue));
                }
                let data: Vec<u8> = self.input.drain(..len as usize).collect();
                self.state = State::OptionHeader;
                self.handle_option(opt, &data)
            }
            State::SkipData { .. } => Ok(None),
            State::AwaitTls | State::Finished => Ok(Some(Progress::Continue)),
        }
    }

    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        self.output.extend_from_slice(&option_reply(opt, kind, data.len() as u32));
        self.output.extend_from_slice(data);
    }

    fn reply_error(&mut self, opt: u32, kind: u32, msg: &str) {
        let msg = truncate_utf8(msg, MAX_STRING);
        self.reply(opt, kind, msg.as_bytes());
    }

    fn handle_option(&mut self, opt: u32, data: &[u8]) -> Result<Option<Progress>, HandshakeError> {
        match opt {
            OPT_EXPORT_NAME => {
                if self.extended {
                    // The spec forbids it, and it has no error reply.
                    return Err(HandshakeError::ExportNameWithExtendedHeaders);
                }
                let name = std::str::from_utf8(data).map_err(|_| HandshakeError::BadExportName)?;
                let Some(export) = self.find(name).cloned() else {
                    return Err(HandshakeError::UnknownExport(name.to_string()));
                };
                let flags = transmission_flags(&export, self.structured || self.extended);
                self.output.extend_from_slice(&export.size.to_be_bytes());
                self.output.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                Ok(Some(self.finish(export, flags)))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                let entries: Vec<Vec<u8>> = self
                    .exports
                    .iter()
                    .map(|e| {
                        let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        d.extend_from_slice(e.name.as_bytes());
                        d.extend_from_slice(e.description.as_bytes());
                        d
                    })
                    .collect();
                for d in entries {
                    self.reply(opt, REP_SERVER, &d);
                }
                self.reply(opt, REP_ACK, &[]);
                Ok(None)
            }
            OPT_STARTTLS => {
                if self.tls_mode == TlsMode::Off {
                    self.reply_error(opt, REP_ERR_UNSUP, "TLS is not enabled on this server");
                } else if self.tls_active {
                    self.reply_error(opt, REP_ERR_INVALID, "TLS is already running on this connection");
                } else if !data.is_empty() {
                    self.reply_error(opt, REP_ERR_INVALID, STARTTLS_TAKES_NO_DATA);
                } else {
                    self.reply(opt, REP_ACK, &[]);
                    self.state = State::AwaitTls;
                    return Ok(Some(Progress::StartTls));
                }
                Ok(None)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.reply_error(opt, REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                } else if self.extended {
                    self.reply_error(opt, REP_ERR_INVALID, "extended headers are already negotiated");
                } else {
                    self.extended = true;
                    self.reply(opt, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => match self.info_or_go(opt, data) {
                Ok(p) => Ok(p),
                Err(Invalid(msg)) => {
                    self.reply_error(opt, REP_ERR_INVALID, msg);
                    Ok(None)
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if self.extended {
                    self.reply_error(
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are negotiated already, and they include structured replies",
                    );
                } else if self.structured {
                    self.reply_error(opt, REP_ERR_INVALID, "structured replies are already negotiated");
                } else {
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if opt == OPT_SET_META_CONTEXT {
                    self.meta = None;
                }
                if !(self.structured || self.extended) {
                    self.reply_error(opt, REP_ERR_INVALID, "negotiate structured replies or extended headers first");
                    return Ok(None);
                }
                if let Err(Invalid(msg)) = self.meta_context(opt, data) {
                    self.reply_error(opt, REP_ERR_INVALID, msg);
                }
                Ok(None)
            }
            _ => {
                self.reply_error(opt, REP_ERR_UNSUP, "option not supported by this server");
                Ok(None)
            }
        }
    }

    fn finish(&mut self, export: Export, flags: u16) -> Progress {
        let base_allocation = match &self.meta {
            Some((name, true)) if *name == export.name => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        self.state = State::Finished;
        Progress::Done(Negotiated {
            export,
            structured: self.structured || self.extended,
            extended: self.extended,
            tls: self.tls_active,
            base_allocation,
            flags,
        })
    }

    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> Result<Option<Progress>, Invalid> {
        let mut c = Cursor { data, pos: 0 };
        let name = match c.string() {
            Some(Ok(n)) => n,
            Some(Err(())) => return Err(Invalid("export name is too long or not UTF-8")),
            None => return Err(Invalid("truncated export name")),
        };
        let n = c.u16().ok_or(Invalid("truncated information request count"))?;
        let mut wanted = Vec::with_capacity(n as usize);
        for _ in 0..n {
            wanted.push(c.u16().ok_or(Invalid("truncated information request list"))?);
        }
        if !c.at_end() {
            return Err(Invalid("trailing bytes after the information requests"));
        }
        let Some(export) = self.find(name).cloned() else {
            let msg = format!("no export named {name:?} on this server");
            self.reply_error(opt, REP_ERR_UNKNOWN, &msg);
            return Ok(None);
        };
        let flags = transmission_flags(&export, self.structured || self.extended);
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(opt, REP_INFO, &info);
        if wanted.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(export.name.as_bytes());
            self.reply(opt, REP_INFO, &d);
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(export.description.as_bytes());
            self.reply(opt, REP_INFO, &d);
        }
        // Always advertised: the minimum is 1 and the maximum at least the
        // spec's default, so clients that did not ask lose nothing by
        // ignoring them.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&export.block.minimum.to_be_bytes());
        d.extend_from_slice(&export.block.preferred.to_be_bytes());
        d.extend_from_slice(&export.block.maximum.to_be_bytes());
        self.reply(opt, REP_INFO, &d);
        self.reply(opt, REP_ACK, &[]);
        if opt == OPT_GO {
            return Ok(Some(self.finish(export, flags)));
        }
        Ok(None)
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<(), Invalid> {
        let mut c = Cursor { data, pos: 0 };
        let name = match c.string() {
            Some(Ok(n)) => n.to_string(),
            Some(Err(())) => return Err(Invalid("export name is too long or not UTF-8")),
            None => return Err(Invalid("truncated export name")),
        };
        let nq = c.u32().ok_or(Invalid("truncated query count"))?;
        let mut queries = Vec::new();
        for _ in 0..nq {
            match c.string() {
                Some(Ok(q)) => queries.push(q),
                Some(Err(())) => return Err(Invalid("query is too long or not UTF-8")),
                None => return Err(Invalid("truncated query")),
            }
        }
        if !c.at_end() {
            return Err(Invalid("trailing bytes after the queries"));
        }
        if self.find(&name).is_none() {
            let msg = format!("no export named {name:?} on this server");
            self.reply_error(opt, REP_ERR_UNKNOWN, &msg);
            return Ok(());
        }
        let selects = if opt == OPT_LIST_META_CONTEXT {
            queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == BASE_ALLOCATION)
        } else {
            queries.contains(&BASE_ALLOCATION)
        };
        if selects {
            let id = if opt == OPT_SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d);
        }
        if opt == OPT_SET_META_CONTEXT {
            self.meta = Some((name, selects));
        }
        self.reply(opt, REP_ACK, &[]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> Export {
        Export {
            name: "".into(),
            description: "test disk".into(),
            size: 1 << 20,
            read_only: false,
            fast_zero: true,
            block: BlockSizes::default(),
        }
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        opt(OPT_GO, &d)
    }

    /// Splits option replies out of the server's output: (opt, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = 0;
        while p + 20 <= out.len() {
            assert_eq!(&out[p..p + 8], &OPT_REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(out[p + 8..p + 12].try_into().unwrap());
            let t = u32::from_be_bytes(out[p + 12..p + 16].try_into().unwrap());
            let l = u32::from_be_bytes(out[p + 16..p + 20].try_into().unwrap()) as usize;
            v.push((o, t, out[p + 20..p + 20 + l].to_vec()));
            p += 20 + l;
        }
        assert_eq!(p, out.len(), "output ends on a reply boundary");
        v
    }

    fn started() -> Handshake {
        let mut h = Handshake::new(vec![export()]);
        let greeting = h.take_output();
        assert_eq!(greeting.len(), 18);
        assert_eq!(h.feed(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()), Ok(Progress::Continue));
        h
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let mut h = started();
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
        let mut q = 0u32.to_be_bytes().to_vec();
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(BASE_ALLOCATION.as_bytes());
        h.feed(&opt(OPT_SET_META_CONTEXT, &q)).unwrap();
        let p = h.feed(&go("", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION])).unwrap();
        let Progress::Done(n) = p else { panic!("expected Done, got {p:?}") };
        assert!(n.structured);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(n.flags & TF_SEND_DF, 0);
        let r = replies(&h.take_output());
        let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(kinds, vec![REP_ACK, REP_META_CONTEXT, REP_ACK, REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(&r[5].2[2..], b"test disk");
    }

    #[test]
    fn unknown_option_is_unsupported_and_parsing_continues() {
        let mut h = started();
        h.feed(&opt(99, b"whatever")).unwrap();
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, REP_ERR_UNSUP);
        assert!(matches!(h.feed(&go("", &[])).unwrap(), Progress::Done(_)));
    }

    #[test]
    fn unknown_export_refused_properly() {
        let mut h = started();
        h.feed(&go("nope", &[])).unwrap();
        let r = replies(&h.take_output());
        assert_eq!(r.last().map(|x| x.1), Some(REP_ERR_UNKNOWN));
        assert_eq!(h.feed(&opt(OPT_EXPORT_NAME, b"nope")), Err(HandshakeError::UnknownExport("nope".into())));
    }

    #[test]
    fn export_name_without_zeroes_and_with() {
        let mut h = started();
        let p = h.feed(&opt(OPT_EXPORT_NAME, b"")).unwrap();
        assert!(matches!(p, Progress::Done(_)));
        assert_eq!(h.take_output().len(), 10, "no 124 zero bytes with NO_ZEROES");
        let mut h = Handshake::new(vec![export()]);
        h.take_output();
        h.feed(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        h.feed(&opt(OPT_EXPORT_NAME, b"")).unwrap();
        assert_eq!(h.take_output().len(), 134);
    }

    #[test]
    fn byte_at_a_time_feeding_works() {
        let mut h = Handshake::new(vec![export()]);
        h.take_output();
        let mut all = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        all.extend(opt(OPT_LIST, &[]));
        all.extend(go("", &[]));
        let mut done = false;
        for b in all {
            if let Progress::Done(_) = h.feed(&[b]).unwrap() {
                done = true;
            }
        }
        assert!(done);
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(r[1].1, REP_ACK);
    }

    #[test]
    fn oversized_option_is_skipped_not_buffered() {
        let mut h = started();
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_GO.to_be_bytes());
        hdr.extend_from_slice(&(MAX_OPTION_LEN + 10).to_be_bytes());
        h.feed(&hdr).unwrap();
        let junk = vec![7u8; 4096];
        let mut left = MAX_OPTION_LEN + 10;
        while left > 0 {
            let n = left.min(4096);
            h.feed(&junk[..n as usize]).unwrap();
            assert!(h.input.len() < 64, "skipped data is not stored");
            left -= n;
        }
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_TOO_BIG);
        assert!(matches!(h.feed(&go("", &[])).unwrap(), Progress::Done(_)));
    }

    fn kinds(out: &[u8]) -> Vec<(u32, u32)> {
        replies(out).into_iter().map(|(o, t, _)| (o, t)).collect()
    }

    fn option_header(opt: u32, len: u32) -> Vec<u8> {
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&opt.to_be_bytes());
        hdr.extend_from_slice(&len.to_be_bytes());
        hdr
    }

    #[test]
    fn oversized_abort_before_required_tls_is_acknowledged_at_once() {
        let mut h = started_with(TlsMode::Required);
        assert_eq!(h.feed(&option_header(OPT_ABORT, MAX_OPTION_LEN + 1)), Ok(Progress::Aborted));
        assert_eq!(kinds(&h.take_output()), vec![(OPT_ABORT, REP_ACK)]);
    }

    #[test]
    fn oversized_starttls_gets_the_no_data_answer_not_too_big() {
        let mut h = started_with(TlsMode::Required);
        let mut input = option_header(OPT_STARTTLS, MAX_OPTION_LEN + 1);
        input.resize(input.len() + MAX_OPTION_LEN as usize + 1, 0);
        assert_eq!(h.feed(&input), Ok(Progress::Continue));
        assert_eq!(kinds(&h.take_output()), vec![(OPT_STARTTLS, REP_ERR_INVALID)]);
        // The connection is still usable: a plain STARTTLS is acknowledged.
        assert_eq!(h.feed(&option_header(OPT_STARTTLS, 0)), Ok(Progress::StartTls));
    }

    #[test]
    fn bad_client_flags_and_magic_disconnect() {
        let mut h = Handshake::new(vec![export()]);
        assert_eq!(h.feed(&0x8000_0000u32.to_be_bytes()), Err(HandshakeError::UnknownClientFlags(0x8000_0000)));
        let mut h = started();
        assert!(matches!(h.feed(&[0u8; 16]), Err(HandshakeError::BadOptionMagic(0))));
    }

    #[test]
    fn malformed_go_gets_invalid() {
        let mut h = started();
        // Name length claims more bytes than the option carries.
        let mut d = 100u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        h.feed(&opt(OPT_GO, &d)).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn read_only_export_flags() {
        let e = Export { read_only: true, ..export() };
        let f = transmission_flags(&e, false);
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(f & TF_SEND_TRIM, 0);
        assert_ne!(f & TF_SEND_FLUSH, 0);
        assert_eq!(f & TF_SEND_DF, 0);
    }

    #[test]
    fn long_error_messages_stay_valid_utf8() {
        let name = "é".repeat(2040);
        let mut h = started();
        h.feed(&go(&name, &[])).unwrap();
        let r = replies(&h.take_output());
        let (_, kind, msg) = r.last().unwrap().clone();
        assert_eq!(kind, REP_ERR_UNKNOWN);
        assert!(msg.len() <= MAX_STRING);
        assert!(std::str::from_utf8(&msg).is_ok(), "message was cut inside a character");
        assert_eq!(truncate_utf8("aé", 2), "a");
    }

    #[test]
    fn oversized_export_name_disconnects_without_an_option_reply() {
        let mut h = started();
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hdr.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert_eq!(h.feed(&hdr), Err(HandshakeError::ExportNameTooLong(MAX_OPTION_LEN + 1)));
        assert!(h.take_output().is_empty());
    }

    #[test]
    fn meta_context_requires_structured_replies() {
        let mut h = started();
        let mut q = 0u32.to_be_bytes().to_vec();
        q.extend_from_slice(&0u32.to_be_bytes());
        h.feed(&opt(OPT_LIST_META_CONTEXT, &q)).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
    }

    fn started_with(mode: TlsMode) -> Handshake {
        let mut h = Handshake::with_tls(vec![export()], mode);
        h.take_output();
        h.feed(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
        h
    }

    fn meta_query() -> Vec<u8> {
        let mut q = 0u32.to_be_bytes().to_vec();
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(BASE_ALLOCATION.as_bytes());
        q
    }

    #[test]
    fn required_tls_refuses_every_option_but_starttls_and_abort() {
        let mut h = started_with(TlsMode::Required);
        for (o, d) in [
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_EXTENDED_HEADERS, vec![]),
            (OPT_INFO, go("", &[])[16..].to_vec()),
            (OPT_GO, go("", &[])[16..].to_vec()),
            (OPT_SET_META_CONTEXT, meta_query()),
            (99, b"unknown".to_vec()),
        ] {
            assert_eq!(h.feed(&opt(o, &d)), Ok(Progress::Continue), "option {o}");
            let r = replies(&h.take_output());
            assert_eq!((r.len(), r[0].0, r[0].1), (1, o, REP_ERR_TLS_REQD), "option {o}");
        }
        // Long options are refused without being stored.
        let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&OPT_GO.to_be_bytes());
        hdr.extend_from_slice(&(1u32 << 20).to_be_bytes());
        h.feed(&hdr).unwrap();
        for _ in 0..256 {
            h.feed(&[0u8; 4096]).unwrap();
            assert!(h.input.len() < 64);
        }
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_TLS_REQD);
        assert_eq!(h.feed(&opt(OPT_ABORT, &[])), Ok(Progress::Aborted));
        assert_eq!(replies(&h.take_output())[0].1, REP_ACK);
        // EXPORT_NAME cannot be refused: the connection ends.
        let mut h = started_with(TlsMode::Required);
        assert_eq!(h.feed(&opt(OPT_EXPORT_NAME, b"")), Err(HandshakeError::TlsRequired));
        assert!(h.take_output().is_empty());
    }

    #[test]
    fn starttls_resets_the_negotiation_and_is_not_repeated() {
        let mut h = started_with(TlsMode::Offered);
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
        h.feed(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
        h.feed(&opt(OPT_SET_META_CONTEXT, &meta_query())).unwrap();
        h.feed(&opt(OPT_STARTTLS, b"x")).unwrap();
        assert_eq!(replies(&h.take_output()).last().map(|r| r.1), Some(REP_ERR_INVALID), "STARTTLS takes no data");
        assert_eq!(h.feed(&opt(OPT_STARTTLS, &[])), Ok(Progress::StartTls));
        assert_eq!(replies(&h.take_output()), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
        // Nothing may be read before the TLS handshake ran.
        assert_eq!(h.feed(b"x"), Err(HandshakeError::PlaintextAfterStartTls(1)));
        h.tls_started().unwrap();
        assert!(h.tls_active());
        assert_eq!(h.tls_started(), Err(HandshakeError::NoTlsPending));
        h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID, "TLS already runs");
        let Progress::Done(n) = h.feed(&go("", &[])).unwrap() else { panic!("GO inside TLS") };
        assert!(n.tls);
        assert!(!n.structured && !n.extended, "plaintext negotiation does not survive STARTTLS");
        assert_eq!(n.base_allocation, None);
        assert_eq!(n.flags & TF_SEND_DF, 0);
    }

    #[test]
    fn plaintext_behind_starttls_is_never_read_inside_tls() {
        let mut h = started_with(TlsMode::Required);
        let mut both = opt(OPT_STARTTLS, &[]);
        both.extend(opt(OPT_GO, &go("", &[])[16..]));
        assert!(matches!(h.feed(&both), Err(HandshakeError::PlaintextAfterStartTls(n)) if n > 0));
    }

    #[test]
    fn tls_off_and_clients_without_fixed_newstyle() {
        let mut h = started_with(TlsMode::Off);
        h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_UNSUP);
        // Without fixed newstyle a client cannot do TLS: with TLS offered it
        // is served as without TLS, with TLS required it is turned away.
        let mut h = Handshake::with_tls(vec![export()], TlsMode::Offered);
        h.take_output();
        h.feed(&0u32.to_be_bytes()).unwrap();
        h.feed(&opt(OPT_STARTTLS, &[])).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_UNSUP);
        let mut h = Handshake::with_tls(vec![export()], TlsMode::Required);
        h.take_output();
        assert_eq!(h.feed(&0u32.to_be_bytes()), Err(HandshakeError::TlsNeedsFixedNewstyle));
    }

    #[test]
    fn extended_headers_negotiate_as_the_spec_says() {
        let mut h = started();
        h.feed(&opt(OPT_EXTENDED_HEADERS, b"x")).unwrap();
        h.feed(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
        h.feed(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[])).unwrap();
        h.feed(&opt(OPT_SET_META_CONTEXT, &meta_query())).unwrap();
        let kinds: Vec<u32> = replies(&h.take_output()).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            vec![REP_ERR_INVALID, REP_ACK, REP_ERR_INVALID, REP_ERR_EXT_HEADER_REQD, REP_META_CONTEXT, REP_ACK]
        );
        let Progress::Done(n) = h.feed(&go("", &[INFO_BLOCK_SIZE])).unwrap() else { panic!("GO") };
        assert!(n.extended && n.structured);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(n.flags & TF_SEND_DF, 0);
        // EXPORT_NAME is forbidden after extended headers and has no error reply.
        let mut h = started();
        h.feed(&opt(OPT_EXTENDED_HEADERS, &[])).unwrap();
        assert_eq!(h.feed(&opt(OPT_EXPORT_NAME, b"")), Err(HandshakeError::ExportNameWithExtendedHeaders));
    }

    #[test]
    fn block_size_info_carries_the_exports_sizes() {
        let e = Export { block: BlockSizes { minimum: 1, preferred: 65536, maximum: 8 << 20 }, ..export() };
        let mut h = Handshake::new(vec![e]);
        h.take_output();
        h.feed(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        h.feed(&go("", &[])).unwrap();
        let r = replies(&h.take_output());
        let bs = r.iter().find(|x| x.1 == REP_INFO && x.2[..2] == INFO_BLOCK_SIZE.to_be_bytes()).expect("block sizes");
        assert_eq!(&bs.2[2..], &[0, 0, 0, 1, 0, 1, 0, 0, 0, 0x80, 0, 0]);
    }
}
