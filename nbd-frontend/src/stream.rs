//! A connected stream of the server side: a Unix or TCP socket, or a TLS
//! session over one, and the read and write halves it splits into. The halves
//! need no lock: a TLS session's halves share it on one thread (tls/mod.rs).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tls::{Socket, TlsAcceptor, TlsReadHalf, TlsStream, TlsWriteHalf};

/// A connected stream: a plain socket, or a TLS session over one. Split into
/// halves without locks (the TLS halves share the session on one thread).
pub enum Stream {
    /// A Unix socket (a local client, or the kernel's end of a socketpair).
    Unix(tokio::net::UnixStream),
    /// A TCP connection.
    Tcp(tokio::net::TcpStream),
    /// A TLS session over either, after STARTTLS.
    Tls(Box<TlsStream>),
}

/// The reading half of a [`Stream`].
pub(crate) enum ReadHalf {
    /// Of a Unix socket.
    Unix(tokio::net::unix::OwnedReadHalf),
    /// Of a TCP connection.
    Tcp(tokio::net::tcp::OwnedReadHalf),
    /// Of a TLS session.
    Tls(TlsReadHalf),
}

/// The writing half of a [`Stream`].
pub(crate) enum WriteHalf {
    /// Of a Unix socket.
    Unix(tokio::net::unix::OwnedWriteHalf),
    /// Of a TCP connection.
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    /// Of a TLS session.
    Tls(TlsWriteHalf),
}

impl Stream {
    /// Splits into halves that a reader and a writer task own apart.
    pub(crate) fn into_split(self) -> (ReadHalf, WriteHalf) {
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
    pub(crate) async fn start_tls(self, acceptor: &TlsAcceptor) -> io::Result<Stream> {
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
