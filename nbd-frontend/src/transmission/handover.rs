//! Stopping a connection for a handover (`livemirror upgrade`).
//!
//! A connection with a [`HandoverSlot`] (the kernel's, which another process
//! takes over) stops only between two requests: a request whose header was
//! read is read whole and answered, and the bytes read past the last one go
//! into the slot. The socket is not shut down, so the next process goes on
//! from exactly where this one stopped.

use std::sync::{Arc, Mutex};

/// Where a connection stopped for a handover leaves the bytes it read past
/// its last request: the stream's next bytes, for the process that goes on.
#[derive(Clone, Default, Debug)]
pub(crate) struct HandoverSlot(Arc<Mutex<Option<Vec<u8>>>>);

impl HandoverSlot {
    /// The bytes, once the connection has stopped for a handover (`None`
    /// before, or if it ended otherwise).
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok().and_then(|mut v| v.take())
    }

    pub(super) fn put(&self, rest: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            *v = Some(rest);
        }
    }
}
