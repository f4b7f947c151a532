//! livemirror's NBD frontend: the wire protocol, the handshake, the transmission
//! phase, the server, the kernel attach, and the NBD client behind remote
//! devices. It serves the engine through [`engine::BlockDevice`] and uses only
//! the engine surface docs/architecture.md lists.
//!
//! Layout follows the protocol's phases: [`proto`] (constants and encodings),
//! [`handshake`] (option negotiation, sans-I/O), [`request`] (validation of every
//! request in one place), `transmission` (one connection's request loop, over
//! a [`stream`]), [`tls`] (STARTTLS: the acceptor over OpenSSL, the TLS
//! stream; its X.509 credentials in `tls/x509.rs`), [`server`] (listeners, the
//! handshake driver, connection hand-off), [`kernel`] and [`netlink`] (the
//! kernel's NBD client), [`stats`] (counters) and [`remote`] (the client).
//!
//! Every public item is documented (`missing_docs` is denied) and public only
//! because the binary, the tests, the benches or the fuzz targets use it.

#![deny(missing_docs)]

pub mod handshake;
pub mod kernel;
mod limits;
pub mod netlink;
pub mod proto;
pub mod remote;
pub mod request;
pub mod server;
pub mod stats;
pub mod stream;
pub mod tls;
mod transmission;
pub mod unix_socket;

pub use handshake::{Export, Handshake, Negotiated, Progress, TlsMode};
pub use limits::ConnLimits;
pub use server::{ListenAddr, Listener, Server, ServerConfig};
pub use tls::{TlsAcceptor, TlsPolicy};
