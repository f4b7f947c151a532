//! Remote devices: an NBD export as the mirror's source or target.
//!
//! | file | what |
//! | --- | --- |
//! | `uri.rs` | `nbd://`, `nbds://`, `nbd+unix://` names |
//! | `handshake.rs` | the client side of the handshake (STARTTLS, structured replies, `base:allocation`, GO) |
//! | `tls.rs` | the TLS client of `nbds://` (OpenSSL: X.509 and pre-shared keys) |
//! | `conn.rs` | one connection: pipelined requests, replies into the callers' buffers, the stall watchdog |
//! | `device.rs` | the [`engine::RemoteDevice`]: splitting to block sizes, connection slots, reconnects, timeouts |
//! | `opener.rs` | the [`engine::DeviceOpener`] that tells URIs from paths |
//!
//! The engine knows no protocol: it sees a `Backend::Remote` and asks it
//! about its link (docs/semantics.md, "Network faults").

mod conn;
mod device;
mod handshake;
mod opener;
mod tls;
pub mod uri;

pub use device::{OpenError, RemoteExport, RemoteOptions};
pub use handshake::ExportInfo;
pub use opener::NbdOpener;
pub use uri::{is_nbd_uri, NbdUri};

#[cfg(test)]
mod tests;
