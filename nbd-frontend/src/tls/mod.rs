//! STARTTLS on the server: the acceptor for both kinds of credentials, and
//! the stream a TLS session runs on. Both go through OpenSSL.
//!
//! - **X.509** (`--tls-certs DIR`, the layout qemu-nbd and nbdkit use):
//!   `DIR/server-cert.pem` (the chain, leaf first) and `DIR/server-key.pem`
//!   are required; `DIR/ca-cert.pem` is the CA that client certificates must
//!   chain to, required with `--tls-verify-peer` and unused without it. Which
//!   keys and chains are accepted, and why others are refused: `x509.rs`.
//! - **Pre-shared keys** (`--tls-psk FILE`, psktool's `identity:hexkey`
//!   lines). TLS 1.3 with (EC)DHE key exchange, or TLS 1.2 with ECDHE-PSK
//!   suites; the key authenticates both ends and no certificate is involved.
//!
//! Both end in a [`TlsStream`]. The transmission phase splits it into a read
//! and a write half driven by two tasks of one thread ([`TlsStream::split`]);
//! the TLS library itself is not split, so both halves borrow it in turn.

pub(crate) mod x509;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::handshake::TlsMode;

/// The largest plaintext one TLS record carries: small reply pieces are
/// gathered up to this so a header and its data travel in one record.
const RECORD: usize = 16 << 10;
/// Longest PSK identity and key we accept (OpenSSL's limits are larger; these
/// are far above what psktool writes: short names, 32-byte keys).
const MAX_PSK_IDENTITY: usize = 255;
const MAX_PSK_KEY: usize = 256;

/// Why the TLS credentials cannot be used; raised at startup.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A credential file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    #[allow(missing_docs)]
    Read { path: PathBuf, source: io::Error },
    /// A credential file holds something unusable, and why.
    #[error("{}: {reason}", path.display())]
    #[allow(missing_docs)]
    Invalid { path: PathBuf, reason: String },
    /// The TLS library refused the configuration.
    #[error("cannot set up TLS: {0}")]
    Library(String),
}

/// `--tls off|on|require` with its credentials.
#[derive(Debug, Clone, Default)]
pub enum TlsPolicy {
    /// No STARTTLS.
    #[default]
    Off,
    /// STARTTLS is offered; plaintext clients are served too.
    Offered(TlsAcceptor),
    /// Only TLS clients get past the first option.
    Required(TlsAcceptor),
}

impl TlsPolicy {
    /// What the handshake is told.
    pub fn mode(&self) -> TlsMode {
        match self {
            TlsPolicy::Off => TlsMode::Off,
            TlsPolicy::Offered(_) => TlsMode::Offered,
            TlsPolicy::Required(_) => TlsMode::Required,
        }
    }

    /// The credentials, unless TLS is off.
    pub fn acceptor(&self) -> Option<&TlsAcceptor> {
        match self {
            TlsPolicy::Off => None,
            TlsPolicy::Offered(a) | TlsPolicy::Required(a) => Some(a),
        }
    }

    /// True when every client that reaches the export has authenticated:
    /// TLS is required and the credentials prove the client (a PSK, or a
    /// client certificate our CA signed).
    pub fn authenticates_every_client(&self) -> bool {
        matches!(self, TlsPolicy::Required(a) if a.authenticates_clients())
    }
}

/// Accepts TLS sessions with the configured credentials. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    backend: Arc<Backend>,
}

enum Backend {
    X509 { context: openssl::ssl::SslContext, verify_peer: bool, dir: PathBuf },
    Psk { context: openssl::ssl::SslContext, file: PathBuf, identities: usize },
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsAcceptor({})", self.describe())
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read { path: path.to_path_buf(), source })
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Invalid { path: path.to_path_buf(), reason: reason.to_string() }
}

impl TlsAcceptor {
    /// X.509 credentials from `dir`. With `verify_peer` a client must present a
    /// certificate that chains to `dir/ca-cert.pem`.
    pub fn x509(dir: &Path, verify_peer: bool) -> Result<TlsAcceptor, TlsSetupError> {
        let context = x509::server_context(dir, verify_peer)?;
        Ok(TlsAcceptor { backend: Arc::new(Backend::X509 { context, verify_peer, dir: dir.to_path_buf() }) })
    }

    /// Pre-shared keys from `file` (psktool's format): OpenSSL, like X.509;
    /// rustls (the nbds:// client's library) has no external PSK (rustls
    /// issue 174).
    pub fn psk(file: &Path) -> Result<TlsAcceptor, TlsSetupError> {
        use openssl::ssl::{SslContextBuilder, SslMethod, SslOptions, SslVersion};
        let text = read_file(file)?;
        let keys = Arc::new(parse_psk_file(&text).map_err(|reason| invalid(file, reason))?);
        let lib = |e: openssl::error::ErrorStack| TlsSetupError::Library(e.to_string());
        let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(lib)?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(lib)?;
        // Renegotiation would let the peer restart the handshake under a
        // split stream; tickets would only cost records (nobody resumes).
        b.set_options(SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE);
        b.set_num_tickets(0).map_err(lib)?;
        // Whole socket reads, not a record header and then its body (x509.rs).
        b.set_read_ahead(true);
        // TLS 1.2: PSK suites with an ephemeral key exchange only, for
        // forward secrecy. (TLS 1.3 uses psk_dhe_ke unless told otherwise.)
        b.set_cipher_list("ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256")
            .map_err(lib)?;
        // TLS 1.3: a key from the PSK callback is bound to SHA-256 suites;
        // AES-GCM first (hardware AES; OpenSSL would pick ChaCha20 else).
        b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256").map_err(lib)?;
        let lookup = keys.clone();
        b.set_psk_server_callback(move |_ssl, identity, out| {
            let Some(id) = identity else { return Ok(0) };
            match lookup.get(id) {
                Some(key) if key.len() <= out.len() => {
                    out[..key.len()].copy_from_slice(key);
                    Ok(key.len())
                }
                _ => {
                    // Returning no key fails the handshake.
                    tracing::info!("TLS: unknown PSK identity {:?}", String::from_utf8_lossy(id));
                    Ok(0)
                }
            }
        });
        let context = b.build();
        let identities = keys.len();
        Ok(TlsAcceptor { backend: Arc::new(Backend::Psk { context, file: file.to_path_buf(), identities }) })
    }

    /// For the log: which credentials.
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::X509 { verify_peer: true, dir, .. } => {
                format!("X.509 certificates from {}, client certificates verified", dir.display())
            }
            Backend::X509 { verify_peer: false, dir, .. } => {
                format!("X.509 certificates from {}, clients not authenticated", dir.display())
            }
            Backend::Psk { file, identities, .. } => {
                format!("pre-shared keys from {} ({identities} identities)", file.display())
            }
        }
    }

    /// True when a client that completes the TLS handshake has proven who it
    /// is: it holds a pre-shared key, or a certificate our CA signed.
    pub fn authenticates_clients(&self) -> bool {
        match &*self.backend {
            Backend::X509 { verify_peer, .. } => *verify_peer,
            Backend::Psk { .. } => true,
        }
    }

    /// Runs the server side of the TLS handshake on a plain socket.
    pub(crate) async fn accept(&self, socket: Socket) -> io::Result<TlsStream> {
        let halves = Rc::new(Halves::default());
        let transport = Transport { socket, halves: halves.clone() };
        let failed = |e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS handshake failed: {e}"))
        };
        let context = match &*self.backend {
            Backend::X509 { context, .. } | Backend::Psk { context, .. } => context,
        };
        let ssl = openssl::ssl::Ssl::new(context).map_err(|e| failed(&e))?;
        let mut session = tokio_openssl::SslStream::new(ssl, transport).map_err(|e| failed(&e))?;
        if let Err(e) = Pin::new(&mut session).accept().await {
            return Err(failed(&handshake_failure(&e, session.ssl())));
        }
        Ok(TlsStream { session: Box::new(session), halves })
    }
}

/// Why a handshake failed, in OpenSSL's words without its source locations:
/// its reasons (`peer did not return a certificate`), and for a client
/// certificate that did not verify, what was wrong with it.
fn handshake_failure(e: &openssl::ssl::Error, ssl: &openssl::ssl::SslRef) -> String {
    let mut why = match (e.ssl_error(), e.io_error()) {
        (Some(stack), _) if !stack.errors().is_empty() => {
            let reasons: Vec<&str> = stack.errors().iter().filter_map(|x| x.reason()).collect();
            if reasons.is_empty() {
                stack.to_string()
            } else {
                reasons.join("; ")
            }
        }
        (_, Some(io)) => io.to_string(),
        _ if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => "the peer closed the connection".to_string(),
        _ => e.to_string(),
    };
    let verify = ssl.verify_result();
    if verify != openssl::x509::X509VerifyResult::OK {
        why = format!("{why} (the client certificate: {})", verify.error_string());
    }
    why
}

/// Parses psktool's format: one `identity:hexkey` per line (the identity ends
/// at the first colon). Empty lines and `#` comments are skipped.
pub fn parse_psk_file(text: &[u8]) -> Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "is not UTF-8 text".to_string())?;
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, hex) = line.split_once(':').ok_or_else(|| format!("line {n}: expected identity:hexkey"))?;
        if id.is_empty() || id.len() > MAX_PSK_IDENTITY {
            return Err(format!("line {n}: the identity must have 1 to {MAX_PSK_IDENTITY} bytes"));
        }
        let key =
            decode_hex(hex.trim()).ok_or_else(|| format!("line {n}: the key is not an even number of hex digits"))?;
        if key.is_empty() || key.len() > MAX_PSK_KEY {
            return Err(format!("line {n}: the key must have 1 to {MAX_PSK_KEY} bytes"));
        }
        if keys.insert(id.as_bytes().to_vec(), key).is_some() {
            return Err(format!("line {n}: identity {id:?} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("holds no identity:hexkey line".into());
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.as_bytes().chunks(2).map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8)).collect()
}

/// A plain connected socket, what TLS runs over.
pub(crate) enum Socket {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, b),
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, b),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Which half of a split TLS stream is inside the TLS library now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Side {
    #[default]
    Neither,
    Reader,
    Writer,
}

/// The wakers of the two halves of a split TLS stream.
///
/// tokio keeps one waker per direction of a socket. The TLS library
/// sometimes does I/O in the other direction than its caller asked for
/// (OpenSSL writes an alert or answers a key update while reading). Registered with the caller's waker alone, that I/O would take the
/// other half's place: the other half, parked on the same direction, would
/// sleep through its readiness. So I/O in the other direction registers a
/// waker that wakes both halves.
#[derive(Default)]
struct Halves {
    side: Cell<Side>,
    reader: RefCell<Option<Waker>>,
    writer: RefCell<Option<Waker>>,
}

impl Halves {
    fn remember(slot: &RefCell<Option<Waker>>, w: &Waker) {
        let mut s = slot.borrow_mut();
        if !s.as_ref().is_some_and(|old| old.will_wake(w)) {
            *s = Some(w.clone());
        }
    }

    /// The waker to register for I/O in a direction that belongs to `owner`'s
    /// half: the caller's own, plus the owner's when another half is calling.
    fn waker_for(&self, owner: Side, cx: &Context<'_>) -> Option<Waker> {
        let side = self.side.get();
        if side == Side::Neither || side == owner {
            return None;
        }
        let slot = if owner == Side::Reader { &self.reader } else { &self.writer };
        let other = slot.borrow().clone()?;
        if other.will_wake(cx.waker()) {
            return None;
        }
        Some(Waker::from(Arc::new(BothWakers(cx.waker().clone(), other))))
    }
}

struct BothWakers(Waker, Waker);

impl Wake for BothWakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.wake_by_ref();
        self.1.wake_by_ref();
    }
}

/// The socket as the TLS library sees it (see [`Halves`]).
pub(crate) struct Transport {
    socket: Socket,
    halves: Rc<Halves>,
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.halves.waker_for(Side::Reader, cx) {
            Some(w) => Pin::new(&mut this.socket).poll_read(&mut Context::from_waker(&w), buf),
            None => Pin::new(&mut this.socket).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.halves.waker_for(Side::Writer, cx) {
            Some(w) => Pin::new(&mut this.socket).poll_write(&mut Context::from_waker(&w), buf),
            None => Pin::new(&mut this.socket).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.halves.waker_for(Side::Writer, cx) {
            Some(w) => Pin::new(&mut this.socket).poll_write_vectored(&mut Context::from_waker(&w), b),
            None => Pin::new(&mut this.socket).poll_write_vectored(cx, b),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.halves.waker_for(Side::Writer, cx) {
            Some(w) => Pin::new(&mut this.socket).poll_shutdown(&mut Context::from_waker(&w)),
            None => Pin::new(&mut this.socket).poll_shutdown(cx),
        }
    }
}

/// An established TLS session over a socket.
pub struct TlsStream {
    session: Box<tokio_openssl::SslStream<Transport>>,
    halves: Rc<Halves>,
}

impl TlsStream {
    /// The protocol version and cipher suite, for the log.
    pub fn protocol(&self) -> String {
        let ssl = self.session.ssl();
        let suite = ssl.current_cipher().map_or("?", |c| c.name());
        format!("{}, {suite}", ssl.version_str())
    }

    /// Read and write halves for two tasks of the same thread.
    pub fn split(self) -> (TlsReadHalf, TlsWriteHalf) {
        let halves = self.halves.clone();
        let shared = Rc::new(RefCell::new(self));
        (
            TlsReadHalf { tls: shared.clone(), halves: halves.clone() },
            TlsWriteHalf { tls: shared, halves, scratch: Vec::new() },
        )
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().session.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().session.as_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().session.as_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().session.as_mut()).poll_shutdown(cx)
    }
}

/// Marks which half is inside the TLS library for the length of one poll.
///
/// The `RefCell` borrow cannot conflict: both halves live on one thread and
/// a poll never calls into the other half.
fn polled<T>(
    tls: &RefCell<TlsStream>,
    halves: &Halves,
    side: Side,
    cx: &mut Context<'_>,
    f: impl FnOnce(Pin<&mut TlsStream>, &mut Context<'_>) -> T,
) -> T {
    let slot = if side == Side::Reader { &halves.reader } else { &halves.writer };
    Halves::remember(slot, cx.waker());
    halves.side.set(side);
    let r = f(Pin::new(&mut *tls.borrow_mut()), cx);
    halves.side.set(Side::Neither);
    r
}

/// The reading half of a [`TlsStream`].
pub struct TlsReadHalf {
    tls: Rc<RefCell<TlsStream>>,
    halves: Rc<Halves>,
}

impl AsyncRead for TlsReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        polled(&this.tls, &this.halves, Side::Reader, cx, |s, cx| s.poll_read(cx, buf))
    }
}

/// The writing half of a [`TlsStream`].
pub struct TlsWriteHalf {
    tls: Rc<RefCell<TlsStream>>,
    halves: Rc<Halves>,
    /// Small slices gathered into one record (see [`RECORD`]).
    scratch: Vec<u8>,
}

impl AsyncWrite for TlsWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        polled(&this.tls, &this.halves, Side::Writer, cx, |s, cx| s.poll_write(cx, buf))
    }

    /// OpenSSL makes at least one record per slice; a reply is a
    /// 16- or 32-byte header and its data, so small slices are copied into
    /// one record first. The copy is deterministic, so a retry after
    /// `Pending` offers the same bytes again (OpenSSL requires that).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(first) = bufs.iter().find(|b| !b.is_empty()) else { return Poll::Ready(Ok(0)) };
        if first.len() >= RECORD {
            let first: &[u8] = first;
            return polled(&this.tls, &this.halves, Side::Writer, cx, |s, cx| s.poll_write(cx, first));
        }
        let mut scratch = std::mem::take(&mut this.scratch);
        scratch.clear();
        for b in bufs {
            let room = RECORD - scratch.len();
            if room == 0 {
                break;
            }
            scratch.extend_from_slice(&b[..b.len().min(room)]);
        }
        let r = polled(&this.tls, &this.halves, Side::Writer, cx, |s, cx| s.poll_write(cx, &scratch));
        this.scratch = scratch;
        r
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        polled(&this.tls, &this.halves, Side::Writer, cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        polled(&this.tls, &this.halves, Side::Writer, cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_parse_as_psktool_writes_them() {
        let k = parse_psk_file(b"alice:0a0B\n\n# a comment\nbob:ff00ff00\r\n").unwrap();
        assert_eq!(k.get(&b"alice"[..]), Some(&vec![0x0a, 0x0b]));
        assert_eq!(k.get(&b"bob"[..]), Some(&vec![0xff, 0, 0xff, 0]));
        assert!(parse_psk_file(b"alice:abc\n").unwrap_err().contains("line 1"));
        assert!(parse_psk_file(b"alice:zz\n").is_err());
        assert!(parse_psk_file(b"nokey\n").unwrap_err().contains("identity:hexkey"));
        assert!(parse_psk_file(b":00\n").is_err());
        assert!(parse_psk_file(b"a:00\na:11\n").unwrap_err().contains("twice"));
        assert!(parse_psk_file(b"\n# nothing\n").is_err());
        assert!(parse_psk_file(b"a:\n").is_err());
    }

    #[test]
    fn missing_credentials_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = TlsAcceptor::x509(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("server-cert.pem"), "{e}");
        let e = TlsAcceptor::psk(&dir.path().join("keys.psk")).unwrap_err().to_string();
        assert!(e.contains("keys.psk"), "{e}");
        std::fs::write(dir.path().join("server-cert.pem"), "not a certificate").unwrap();
        let e = TlsAcceptor::x509(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
