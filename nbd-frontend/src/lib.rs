//! livemirror's NBD frontend: the wire protocol, the handshake, the transmission
//! phase, the server and the kernel attach. It talks to the engine only through
//! [`engine::BlockDevice`].
//!
//! Layout follows the protocol's phases: [`proto`] (constants and encodings),
//! [`handshake`] (option negotiation, sans-I/O), [`request`] (validation of every
//! request in one place), [`transmission`] (one connection's request loop),
//! [`tls`] (STARTTLS: the acceptor over OpenSSL, the TLS stream; its X.509
//! credentials in `x509`)
//! and [`server`] (listeners, the handshake driver, connection hand-off).

pub mod client;
pub mod handshake;
pub mod kernel;
pub mod limits;
pub mod netlink;
pub mod proto;
pub mod remote;
pub mod request;
pub mod server;
pub mod stats;
pub mod tls;
pub mod transmission;
pub mod unix_socket;
mod x509;

pub use handshake::{Export, Handshake, Negotiated, Progress, TlsMode};
pub use limits::ConnLimits;
pub use server::{ListenAddr, Listener, Server, ServerConfig};
pub use tls::{TlsAcceptor, TlsPolicy};
