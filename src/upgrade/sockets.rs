//! The sockets of an upgrade: those a daemon received from the one it
//! replaces ([`Inherited`], which `serve.rs` starts from) and the second
//! handles a running daemon keeps to hand over ([`Held`]).

use std::os::fd::OwnedFd;

use anyhow::Context;
use nbd_frontend::kernel::HandedConnection;
use nbd_frontend::{ListenAddr, Listener};

/// Sockets a daemon received from the one it replaces, by what they are.
#[derive(Default)]
pub(crate) struct Inherited {
    pub(super) listeners: Vec<(ListenAddr, OwnedFd)>,
    pub(super) control: Option<OwnedFd>,
    pub(super) metrics: Option<OwnedFd>,
    pub(super) kernel: Vec<HandedConnection>,
    /// The state file was written by the daemon handing over, an instant ago.
    pub(crate) handed_over: bool,
}

impl Inherited {
    /// The listening socket for `addr`, if one was handed over.
    pub(crate) fn take_listener(&mut self, addr: &ListenAddr) -> anyhow::Result<Option<Listener>> {
        let Some(i) = self.listeners.iter().position(|(a, _)| a == addr) else { return Ok(None) };
        let (_, fd) = self.listeners.swap_remove(i);
        Ok(Some(Listener::from_fd(fd, addr).with_context(|| format!("the inherited listener for {addr}"))?))
    }

    /// The control socket's listening socket, if one was handed over.
    pub(crate) fn take_control(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.control.take().map(std::os::unix::net::UnixListener::from)
    }

    /// The metrics listener, if one was handed over.
    pub(crate) fn take_metrics(&mut self) -> Option<std::net::TcpListener> {
        self.metrics.take().map(std::net::TcpListener::from)
    }

    /// The kernel device's live connections (none unless handed over).
    pub(crate) fn take_kernel(&mut self) -> Vec<HandedConnection> {
        std::mem::take(&mut self.kernel)
    }
}

/// A second handle on every listening socket of a running daemon, kept to
/// hand over (they keep accepting into their backlog while no loop accepts).
pub(crate) struct Held {
    pub(crate) listeners: Vec<(ListenAddr, Listener)>,
    pub(crate) control: Option<std::os::unix::net::UnixListener>,
    pub(crate) metrics: Option<std::net::TcpListener>,
}
