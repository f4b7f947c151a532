//! Where and how a remote device connects: the socket (TCP with keepalive, or
//! Unix), the greeting, STARTTLS for `nbds://`, and the option negotiation,
//! all within one bounded attempt.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::handshake::{self, BoxStream, ExportInfo, HandshakeError};
use super::tls::TlsClient;
use super::uri::{NbdUri, Transport};

/// One connection attempt (TCP connect, handshake, TLS) at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to connect.
pub(super) struct Dialer {
    pub(super) uri: NbdUri,
    /// The socket file as this process reaches it (after a switch_root).
    pub(super) socket: Option<PathBuf>,
    pub(super) tls: Option<TlsClient>,
}

fn set_keepalive(s: &tokio::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    // Closing a dead connection must not leave its unsent requests queued in
    // the kernel: once the link is back they would reach the server after
    // the same requests were resent (and newer writes acknowledged), and an
    // old write would land over a newer one. A reset drops them.
    let _ = setsockopt(s, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
    // An idle connection whose link died is noticed within about 20 s.
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &10);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &3);
    let _ = setsockopt(s, sockopt::TcpKeepCount, &3);
}

impl Dialer {
    /// One attempt: a negotiated connection and what the server said of the export.
    pub(super) async fn dial(&self) -> Result<(BoxStream, ExportInfo), HandshakeError> {
        let fut = async {
            let mut s: BoxStream = match (&self.uri.transport, &self.socket) {
                (Transport::Tcp { host, port }, _) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    s.set_nodelay(true)?;
                    set_keepalive(&s);
                    Box::new(s)
                }
                (Transport::Unix { .. }, Some(p)) => Box::new(tokio::net::UnixStream::connect(p).await?),
                (Transport::Unix { socket }, None) => Box::new(tokio::net::UnixStream::connect(socket).await?),
            };
            let no_zeroes = handshake::greet(&mut s).await?;
            if let Some(tls) = &self.tls {
                handshake::starttls(&mut s).await?;
                s = tls.wrap(s).await.map_err(|e| match e.kind() {
                    // A certificate that does not verify is final, not a link fault.
                    io::ErrorKind::InvalidData => HandshakeError::Refused(format!("TLS: {e}")),
                    _ => HandshakeError::Io(e),
                })?;
            }
            let info = handshake::negotiate(&mut s, &self.uri.export, no_zeroes).await?;
            Ok((s, info))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
            ))),
        }
    }
}
