//! The NBD server: listening sockets, the handshake driver (with STARTTLS),
//! and the hand-off of each connection to a worker thread.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::{BlockDevice, BufPool, Drain, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::handshake::{Export, Handshake, HandshakeError, Negotiated, Progress};
use crate::limits::ConnLimits;
use crate::proto::BlockSizes;
use crate::stats::Stats;
use crate::stream::Stream;
use crate::tls::TlsPolicy;
use crate::transmission::{self, ConnShared, HandoverSlot, Phase};

/// A client has this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    #[allow(missing_docs)]
    Tcp { host: String, port: u16 },
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s}: expected tcp:HOST:PORT"))?;
            let port: u16 = port.parse().map_err(|_| format!("{s}: bad port {port:?}"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            if host.is_empty() {
                return Err(format!("{s}: expected tcp:HOST:PORT"));
            }
            return Ok(ListenAddr::Tcp { host, port });
        }
        Err(format!("{s}: expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            ListenAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl ListenAddr {
    /// Resolved socket addresses of a TCP listen address.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match self {
            ListenAddr::Unix(_) => Ok(Vec::new()),
            ListenAddr::Tcp { host, port } => Ok((host.as_str(), *port).to_socket_addrs()?.collect()),
        }
    }

    /// True for Unix sockets and for TCP addresses that only reach this host.
    pub fn is_local_only(&self) -> io::Result<bool> {
        match self {
            ListenAddr::Unix(_) => Ok(true),
            ListenAddr::Tcp { .. } => {
                let addrs = self.resolve()?;
                Ok(!addrs.is_empty() && addrs.iter().all(|a| is_loopback(a.ip())))
            }
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_loopback(),
        IpAddr::V6(v) => v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

/// A bound, listening socket.
pub enum Listener {
    /// A Unix socket and its path (removed when the daemon stops).
    Unix(std::os::unix::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Binds `addr`: a Unix socket replaces a stale socket file (never
    /// another file), a TCP address is resolved and bound non-blocking.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(p) => Ok(Listener::Unix(crate::unix_socket::bind(p)?, p.clone())),
            ListenAddr::Tcp { .. } => {
                let addrs = addr.resolve()?;
                let l = std::net::TcpListener::bind(&addrs[..])
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
                l.set_nonblocking(true)?;
                Ok(Listener::Tcp(l))
            }
        }
    }

    /// Another handle on the same listening socket: it keeps accepting (its
    /// backlog filling) after the accept loop gave its own handle up, until a
    /// process that was handed this one accepts again (`livemirror upgrade`).
    pub fn try_clone(&self) -> io::Result<Listener> {
        Ok(match self {
            Listener::Unix(l, p) => Listener::Unix(l.try_clone()?, p.clone()),
            Listener::Tcp(l) => Listener::Tcp(l.try_clone()?),
        })
    }

    /// A listening socket inherited from another process, for `addr`.
    pub fn from_fd(fd: std::os::fd::OwnedFd, addr: &ListenAddr) -> io::Result<Listener> {
        Ok(match addr {
            ListenAddr::Unix(p) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Unix(l, p.clone())
            }
            ListenAddr::Tcp { .. } => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Tcp(l)
            }
        })
    }

    /// The socket, to hand over.
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        match self {
            Listener::Unix(l, _) => l.into(),
            Listener::Tcp(l) => l.into(),
        }
    }

    /// The actual address (useful with port 0).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => l.local_addr().map(|a| format!("tcp:{a}")).unwrap_or_default(),
        }
    }
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Unix(l, _) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

/// What the server exports, and what clients may hold.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name (`""`: the default export).
    pub export_name: String,
    /// Its description (NBD_INFO_DESCRIPTION).
    pub description: String,
    /// Served read-only.
    pub read_only: bool,
    /// Payload bytes held across all connections at most (each connection's
    /// reserve comes on top, see [`ConnLimits`]).
    pub buffer_budget: usize,
    /// What one connection may hold.
    pub limits: ConnLimits,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// STARTTLS: off, offered or required, and the credentials.
    pub tls: TlsPolicy,
}

impl ServerConfig {
    /// `--buffer-budget`'s default.
    pub const DEFAULT_BUDGET: usize = 256 << 20;
    /// `--max-connections`'s default.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 128;
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            description: "livemirror".into(),
            read_only: false,
            buffer_budget: Self::DEFAULT_BUDGET,
            limits: ConnLimits::for_budget(Self::DEFAULT_BUDGET),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            tls: TlsPolicy::Off,
        }
    }
}

struct Inner<D: BlockDevice> {
    dev: Arc<D>,
    cfg: ServerConfig,
    pool: BufPool,
    workers: Vec<Arc<Worker>>,
    next_worker: AtomicUsize,
    phase: watch::Sender<Phase>,
    /// Connections being served (a shutdown waits for it to drain).
    connections: Arc<Drain>,
    stats: Arc<Stats>,
}

/// An NBD server for one device. Cheap to clone.
pub struct Server<D: BlockDevice> {
    inner: Arc<Inner<D>>,
}

impl<D: BlockDevice> Clone for Server<D> {
    fn clone(&self) -> Self {
        Server { inner: self.inner.clone() }
    }
}

impl<D: BlockDevice> Server<D> {
    /// A server for `dev`, whose connections run on `workers` (engine threads).
    pub fn new(dev: Arc<D>, cfg: ServerConfig, workers: Vec<Arc<Worker>>) -> Server<D> {
        let pool = BufPool::new(cfg.buffer_budget.max(engine_min_budget()));
        let (phase, _) = watch::channel(Phase::Running);
        Server {
            inner: Arc::new(Inner {
                dev,
                cfg,
                pool,
                workers,
                next_worker: AtomicUsize::new(0),
                phase,
                connections: Drain::new(),
                stats: Arc::new(Stats::default()),
            }),
        }
    }

    /// The buffers and payload budget its connections share.
    pub fn pool(&self) -> &BufPool {
        &self.inner.pool
    }

    /// Request and connection counters (monitoring).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// The block sizes a client is told now (they follow the devices
    /// attached: a target that needs aligned I/O raises the preferred size).
    pub fn block_sizes(&self) -> BlockSizes {
        let max = self.inner.cfg.limits.largest_payload(self.inner.pool.budget_bytes());
        BlockSizes::for_device(self.inner.dev.io_alignment(), max)
    }

    fn export(&self) -> Export {
        Export {
            name: self.inner.cfg.export_name.clone(),
            description: self.inner.cfg.description.clone(),
            size: self.inner.dev.size(),
            read_only: self.inner.cfg.read_only || self.inner.dev.read_only(),
            fast_zero: self.inner.dev.fast_zero(),
            block: self.block_sizes(),
        }
    }

    /// Accepts connections on `listener` until shutdown. Runs on an engine
    /// thread; connections are spread over the workers.
    pub async fn accept_loop(&self, listener: Listener) {
        let mut shutdown = self.inner.phase.subscribe();
        let res: io::Result<()> = async {
            match listener {
                Listener::Unix(l, _) => {
                    let l = tokio::net::UnixListener::from_std(l)?;
                    loop {
                        tokio::select! {
                            _ = shutdown.wait_for(|p| *p >= Phase::Draining) => return Ok(()),
                            a = l.accept() => match a {
                                Ok((s, _)) => self.dispatch(AnyStd::Unix(s.into_std()?)),
                                Err(e) => accept_error(e).await,
                            }
                        }
                    }
                }
                Listener::Tcp(l) => {
                    let l = tokio::net::TcpListener::from_std(l)?;
                    loop {
                        tokio::select! {
                            _ = shutdown.wait_for(|p| *p >= Phase::Draining) => return Ok(()),
                            a = l.accept() => match a {
                                Ok((s, peer)) => {
                                    tracing::debug!("connection from {peer}");
                                    self.dispatch(AnyStd::Tcp(s.into_std()?))
                                }
                                Err(e) => accept_error(e).await,
                            }
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = res {
            tracing::error!("listener failed: {e}");
        }
    }

    /// Serves an already connected stream without a handshake (the kernel's
    /// end of a socketpair) on one of the workers. It starts with `leftover`
    /// (bytes a previous process read from it); with a `handover` slot it
    /// stops between two requests when the server stops, leaving there what
    /// it read past the last one (see `transmission`).
    pub(crate) fn serve_handed(
        &self,
        stream: std::os::unix::net::UnixStream,
        neg: Negotiated,
        leftover: Vec<u8>,
        handover: Option<HandoverSlot>,
    ) -> io::Result<()> {
        let n = self.inner.workers.len().max(1);
        let i = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % n;
        let worker = self.inner.workers.get(i).ok_or_else(|| io::Error::other("no worker"))?;
        // Counted from here; the guard leaves with the task (or with the job
        // if the worker refuses it).
        let served = self.inner.connections.enter_always();
        Stats::bump(&self.inner.stats.connections_accepted);
        let server = self.clone();
        worker.run(move || async move {
            let res = async {
                let s = Stream::Unix(tokio::net::UnixStream::from_std(stream)?);
                server.serve_connection(s, &neg, leftover, handover).await
            }
            .await;
            if let Err(e) = res {
                tracing::info!("kernel connection closed: {e}");
            }
            drop(served);
        })
    }

    fn dispatch(&self, stream: AnyStd) {
        let active = self.inner.connections.active();
        if active >= self.inner.cfg.max_connections {
            // Closed at once (dropping the stream): the client sees the
            // connection end before the handshake.
            tracing::warn!(
                "refusing a connection: {active} connections are served already (--max-connections {})",
                self.inner.cfg.max_connections
            );
            Stats::bump(&self.inner.stats.connections_refused);
            return;
        }
        let n = self.inner.workers.len().max(1);
        let i = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % n;
        let Some(worker) = self.inner.workers.get(i) else {
            tracing::error!("no worker to serve a connection");
            return;
        };
        let served = self.inner.connections.enter_always();
        Stats::bump(&self.inner.stats.connections_accepted);
        let server = self.clone();
        let res = worker.run(move || async move {
            let res = server.serve_std(stream).await;
            match res {
                // A client hanging up mid-conversation is ordinary.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    tracing::debug!("connection closed: {e}")
                }
                Err(e) => tracing::info!("connection closed: {e}"),
                Ok(()) => {}
            }
            drop(served);
        });
        if let Err(e) = res {
            tracing::error!("cannot hand a connection to a worker: {e}");
        }
    }

    async fn serve_std(&self, stream: AnyStd) -> io::Result<()> {
        let stream = match stream {
            AnyStd::Unix(s) => {
                enlarge_send_buffer(&s);
                Stream::Unix(tokio::net::UnixStream::from_std(s)?)
            }
            AnyStd::Tcp(s) => Stream::Tcp(tokio::net::TcpStream::from_std(s)?),
        };
        self.serve_stream(stream).await
    }

    /// Negotiates on `stream` (upgrading it to TLS when the client asks and
    /// the policy allows) and serves it.
    pub(crate) async fn serve_stream(&self, stream: Stream) -> io::Result<()> {
        let mut shutdown = self.inner.phase.subscribe();
        let tls = &self.inner.cfg.tls;
        let negotiated = tokio::select! {
            _ = shutdown.wait_for(|p| *p >= Phase::Draining) => return Ok(()),
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(stream, vec![self.export()], tls)) => match r {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timed out")),
            },
        };
        let Some((stream, neg, leftover)) = negotiated else { return Ok(()) };
        tracing::debug!(
            "negotiated export {:?}: {} bytes, structured={}, extended headers={}, TLS={}, flags={:#x}",
            neg.export.name,
            neg.export.size,
            neg.structured,
            neg.extended,
            neg.tls,
            neg.flags
        );
        self.serve_negotiated(stream, &neg, leftover).await
    }

    /// Serves the transmission phase of an already negotiated stream (the
    /// kernel client skips the handshake: netlink attach).
    pub(crate) async fn serve_negotiated(&self, stream: Stream, neg: &Negotiated, leftover: Vec<u8>) -> io::Result<()> {
        self.serve_connection(stream, neg, leftover, None).await
    }

    /// Serves the transmission phase; a connection with a `handover` slot
    /// stops between two requests when the server stops (see `transmission`).
    async fn serve_connection(
        &self,
        stream: Stream,
        neg: &Negotiated,
        leftover: Vec<u8>,
        handover: Option<HandoverSlot>,
    ) -> io::Result<()> {
        let shared = ConnShared {
            pool: self.inner.pool.clone(),
            phase: self.inner.phase.subscribe(),
            limits: self.inner.cfg.limits.clone(),
            stats: self.inner.stats.clone(),
            handover,
        };
        transmission::serve(stream, self.inner.dev.clone(), neg, leftover, shared).await
    }

    /// A negotiation result for a client that does no handshake.
    pub(crate) fn implicit_negotiation(&self) -> Negotiated {
        let export = self.export();
        let flags = crate::handshake::transmission_flags(&export, false);
        Negotiated { export, structured: false, extended: false, tls: false, base_allocation: None, flags }
    }

    /// Stops accepting and stops every connection: requests in flight finish and
    /// their replies are delivered for up to `grace`; then connections still open
    /// (peers that do not read, payloads that never arrive) are closed. Returns
    /// when every connection has ended: after `grace` plus the time the requests
    /// already on the device take.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.phase.send_replace(Phase::Draining);
        if tokio::time::timeout(grace, self.inner.connections.wait_idle()).await.is_err() {
            let left = self.active_connections();
            tracing::warn!("{left} connection(s) still open {} s after the stop: closing them", grace.as_secs_f64());
            self.inner.phase.send_replace(Phase::Closing);
            self.inner.connections.wait_idle().await;
        }
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.inner.connections.active()
    }
}

/// A Unix socket's send buffer bounds what one write can queue for the peer:
/// with the default (~200 KiB) a 1 MiB read reply takes several writes and as
/// many wake-ups of both sides. 4 MiB measured about 10 % more 1M-read
/// throughput. The kernel caps the value at `net.core.wmem_max`; failure only
/// costs speed.
pub(crate) fn enlarge_send_buffer(s: &impl std::os::fd::AsFd) {
    const SEND_BUFFER: usize = 4 << 20;
    if let Err(e) = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER) {
        tracing::debug!("cannot enlarge a socket's send buffer: {e}");
    }
}

fn engine_min_budget() -> usize {
    // At least one maximum-size payload must fit, or a 32 MiB request could
    // never be served.
    2 * crate::proto::MAX_PAYLOAD as usize
}

enum AnyStd {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

async fn accept_error(e: io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs the handshake on `stream`, with STARTTLS as `tls` allows. Returns the
/// stream the transmission phase runs on (a TLS session if the client started
/// one), what was negotiated and the bytes read past the last option; `None`
/// if the client aborted or left.
pub async fn negotiate(
    mut stream: Stream,
    exports: Vec<Export>,
    tls: &TlsPolicy,
) -> io::Result<Option<(Stream, Negotiated, Vec<u8>)>> {
    let mut hs = Handshake::with_tls(exports, tls.mode());
    let mut buf = vec![0u8; 4096];
    loop {
        if hs.has_output() {
            let out = hs.take_output();
            stream.write_all(&out).await?;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match hs.feed(&buf[..n]) {
            Ok(Progress::Continue) => {}
            Ok(Progress::StartTls) => {
                // The ACK goes out in plaintext; then the client's ClientHello.
                let out = hs.take_output();
                stream.write_all(&out).await?;
                let Some(acceptor) = tls.acceptor() else {
                    // The handshake offers STARTTLS only with credentials.
                    return Err(io::Error::other("STARTTLS acknowledged without TLS credentials"));
                };
                stream = stream.start_tls(acceptor).await?;
                if let Stream::Tls(t) = &stream {
                    tracing::debug!("TLS session started ({})", t.protocol());
                }
                hs.tls_started().map_err(|e| io::Error::other(format!("handshake: {e}")))?;
            }
            Ok(Progress::Done(neg)) => {
                let out = hs.take_output();
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Some((stream, neg, hs.take_leftover())));
            }
            Ok(Progress::Aborted) => {
                let out = hs.take_output();
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
                return Ok(None);
            }
            Err(e) => {
                let out = hs.take_output();
                // After plaintext that followed STARTTLS nothing is sent, not
                // even the ACK: the client must not think TLS is coming.
                if !matches!(e, HandshakeError::PlaintextAfterStartTls(_)) {
                    let _ = stream.write_all(&out).await;
                }
                let _ = stream.shutdown().await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("handshake: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("unix:/run/x.sock".parse(), Ok(ListenAddr::Unix("/run/x.sock".into())));
        assert_eq!("tcp:127.0.0.1:10809".parse(), Ok(ListenAddr::Tcp { host: "127.0.0.1".into(), port: 10809 }));
        assert_eq!("tcp:[::1]:10809".parse(), Ok(ListenAddr::Tcp { host: "::1".into(), port: 10809 }));
        assert!("tcp:localhost".parse::<ListenAddr>().is_err());
        assert!("udp:x".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn loopback_policy() {
        let l: ListenAddr = "tcp:127.0.0.1:1".parse().unwrap();
        assert!(l.is_local_only().unwrap());
        let l: ListenAddr = "tcp:::1:1".parse().unwrap();
        assert!(l.is_local_only().unwrap());
        let l: ListenAddr = "tcp:0.0.0.0:1".parse().unwrap();
        assert!(!l.is_local_only().unwrap());
        let l: ListenAddr = "tcp:192.0.2.1:1".parse().unwrap();
        assert!(!l.is_local_only().unwrap());
    }
}
