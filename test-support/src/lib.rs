//! What livemirror's tests and benches share, and the daemon never links.
//!
//! [`client`] is an NBD client that drives the server exactly as a test says:
//! simple or structured replies on request, unaligned requests as they are,
//! no reconnect (a test that kills the daemon sees its requests fail). The
//! daemon's own client (`nbd_frontend::remote`, the mirror's remote devices)
//! does the opposite on purpose: it aligns, reconnects and retries, which
//! would hide what these tests look at.

pub mod client;
