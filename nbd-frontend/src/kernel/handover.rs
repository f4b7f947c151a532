//! The kernel's live connections, kept for `livemirror upgrade`: a second
//! descriptor of each socket the server reads, with the slot its reader
//! leaves the bytes read past its last request in. A handover gives the next
//! process the connections that stopped between two requests; `adopt` (in
//! the parent module) serves them on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::transmission::HandoverSlot;

/// A live kernel connection handed from one process to the next: our end of
/// the socketpair and the bytes already read from it past its last request.
pub struct HandedConnection {
    /// Our end of the socketpair whose other end the kernel holds.
    pub socket: OwnedFd,
    /// What was read from it and not yet served: the start of the next
    /// request(s), served first by the process that goes on.
    pub leftover: Vec<u8>,
}

/// Our end of one kernel connection, kept (a second descriptor of the socket
/// the server reads) so that it can be handed over.
pub(super) struct KernelConn {
    pub(super) socket: OwnedFd,
    pub(super) slot: HandoverSlot,
}

/// Every connection given to the kernel and not known dead.
#[derive(Clone, Default)]
pub(super) struct Conns(Arc<Mutex<Vec<KernelConn>>>);

impl Conns {
    pub(super) fn push(&self, c: KernelConn) {
        if let Ok(mut v) = self.0.lock() {
            v.push(c);
        }
    }

    /// Closes our copies of the connections the kernel has closed.
    pub(super) fn prune(&self) {
        if let Ok(mut v) = self.0.lock() {
            v.retain(|c| !at_eof(&c.socket));
        }
    }

    /// The connections to hand over, once the server has stopped (every
    /// connection stopped between two requests). One that ended otherwise
    /// (the kernel closed it, it broke mid-request) is closed here: the
    /// kernel finds its slot dead and the next process fills it.
    pub(super) fn hand_over(&self) -> Vec<HandedConnection> {
        let kept = self.0.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        let mut out = Vec::new();
        for c in kept {
            match c.slot.take() {
                Some(leftover) if !at_eof(&c.socket) => out.push(HandedConnection { socket: c.socket, leftover }),
                _ => drop(c.socket),
            }
        }
        out
    }
}

/// True when the peer has closed the socket (a read would return end-of-file).
fn at_eof(fd: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    matches!(
        nix::sys::socket::recv(
            fd.as_raw_fd(),
            &mut b,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
        ),
        Ok(0)
    )
}
