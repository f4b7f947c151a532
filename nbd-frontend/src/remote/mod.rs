//! Remote devices: an NBD export as the mirror's source or target.
//!
//! | file | what |
//! | --- | --- |
//! | `uri.rs` | `nbd://`, `nbds://`, `nbd+unix://` names |
//! | `handshake.rs` | the client side of the handshake (STARTTLS, structured replies, `base:allocation`, GO) |
//! | `tls.rs` | the TLS client of `nbds://` (OpenSSL: X.509 and pre-shared keys) |
//! | `requests.rs` | requests from the engine's call to their answer: the shared queue, each connection's in-flight table, expiry |
//! | `conn.rs` | one connection: pipelined requests, replies into the callers' buffers, the stall watchdog |
//! | `dial.rs` | one connection attempt: socket, greeting, STARTTLS, options |
//! | `slots.rs` | the connection slots that reconnect with backoff, the sweeper, the link state, the device's thread |
//! | `device.rs` | the [`engine::RemoteDevice`]: splitting to block sizes, read-modify-write, the commands |
//! | `opener.rs` | the [`engine::DeviceOpener`] that tells URIs from paths |
//!
//! The engine knows no protocol: it sees a `Backend::Remote` and asks it
//! about its link (docs/semantics.md, "Network faults").

mod conn;
mod device;
mod dial;
mod handshake;
mod opener;
mod requests;
mod slots;
mod tls;
pub mod uri;

pub use device::{OpenError, RemoteExport, RemoteOptions};
pub use opener::NbdOpener;
pub use uri::{is_nbd_uri, NbdUri};

#[cfg(test)]
mod tests;
