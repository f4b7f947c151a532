//! Attaching the kernel's NBD client to our export (`serve --nbd-device`).
//!
//! The daemon creates one socketpair per connection, serves one end itself
//! (transmission phase only: the kernel does no handshake) and hands the other
//! end to the kernel over netlink: CONNECT for a free device, RECONFIGURE for a
//! device whose previous daemon died (the kernel kept its I/O waiting, up to the
//! dead-connection timeout). A watcher thread replaces connections the kernel
//! reports dead (LINK_DEAD) and passes export size changes on (online resize).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use engine::BlockDevice;
use tokio::sync::watch;

use crate::netlink::{self, ConnectParams, NbdNetlink};
use crate::server::Server;

#[derive(Debug, Clone)]
pub struct KernelOptions {
    pub device: PathBuf,
    pub connections: usize,
    /// Request timeout; requests in flight on a dead connection are resent
    /// when it fires.
    pub timeout: Duration,
    /// How long the kernel holds I/O while no connection is alive.
    pub dead_conn_timeout: Duration,
}

/// A connected kernel device. Dropping it stops the watcher but leaves the
/// device configured (a restarted daemon reconnects); call
/// [`KernelAttachment::disconnect`] to tear it down.
pub struct KernelAttachment {
    pub index: u32,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

fn serve_pairs<D: BlockDevice>(server: &Server<D>, n: usize) -> io::Result<Vec<UnixStream>> {
    let neg = server.implicit_negotiation();
    let mut kernel_ends = Vec::with_capacity(n);
    for _ in 0..n {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        crate::server::enlarge_send_buffer(&ours);
        server.serve_preconnected(ours, neg.clone())?;
        kernel_ends.push(theirs);
    }
    Ok(kernel_ends)
}

pub fn attach<D: BlockDevice>(
    server: &Server<D>,
    opts: &KernelOptions,
    mut size: watch::Receiver<u64>,
) -> io::Result<KernelAttachment> {
    let index = netlink::device_index(&opts.device).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not an NBD device (/dev/nbdN)", opts.device.display()),
        )
    })?;
    let mut nl = NbdNetlink::open()?;
    let n = opts.connections.max(1);
    let kernel_ends = serve_pairs(server, n)?;
    let fds: Vec<_> = kernel_ends.iter().map(|s| s.as_raw_fd()).collect();
    let export_size = *size.borrow_and_update();
    if nl.is_connected(index)? {
        // A predecessor died holding this device: hand the kernel new sockets.
        nl.reconnect(index, &fds, opts.timeout, opts.dead_conn_timeout).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot reconnect {} (RECONFIGURE): {e}", opts.device.display()))
        })?;
        crate::stats::Stats::bump(&server.stats().kernel_reconnects);
        tracing::info!("reconnected {} to this daemon ({n} connections)", opts.device.display());
        if let Err(e) = nl.resize(index, export_size) {
            tracing::warn!("cannot set the size of {}: {e}", opts.device.display());
        }
    } else {
        let p = ConnectParams {
            index,
            size: export_size,
            // From the sizes NBD_INFO_BLOCK_SIZE advertises: with a minimum
            // of 1 that is the kernel's smallest, 512, which every
            // filesystem block size works with.
            block_size: server.block_sizes().kernel_block_size() as u64,
            timeout: opts.timeout,
            dead_conn_timeout: opts.dead_conn_timeout,
            server_flags: server.implicit_negotiation().flags as u64,
            client_flags: 0,
        };
        nl.connect(&p, &fds).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot connect {} (netlink CONNECT): {e}", opts.device.display()))
        })?;
        tracing::info!("connected {} ({export_size} bytes, {n} connections)", opts.device.display());
    }
    // The kernel holds its own references to its ends now.
    drop(kernel_ends);

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = server.clone();
    let opts2 = opts.clone();
    let mut listener = netlink::Genl::open()?;
    let family = listener.nbd_family()?;
    if let Some(g) = family.mcast_group {
        listener.join(g)?;
    }
    let watcher = std::thread::Builder::new().name("livemirror-nbd-watch".into()).spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            match listener.next_link_dead(Duration::from_millis(200)) {
                Ok(Some(i)) if i == index && !stop2.load(Ordering::SeqCst) => {
                    tracing::warn!("the kernel reports a dead connection on {}: replacing it", opts2.device.display());
                    let res = serve_pairs(&server, 1).and_then(|ends| {
                        let fds: Vec<_> = ends.iter().map(|s| s.as_raw_fd()).collect();
                        nl.reconnect(index, &fds, opts2.timeout, opts2.dead_conn_timeout)
                    });
                    match res {
                        Ok(()) => crate::stats::Stats::bump(&server.stats().kernel_reconnects),
                        Err(e) => tracing::error!("cannot replace the dead connection: {e}"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("netlink notifications: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if size.has_changed().unwrap_or(false) {
                let new = *size.borrow_and_update();
                match nl.resize(index, new) {
                    Ok(()) => tracing::info!("resized {} to {new} bytes", opts2.device.display()),
                    Err(e) => tracing::error!("cannot resize {} to {new} bytes: {e}", opts2.device.display()),
                }
            }
        }
    })?;
    Ok(KernelAttachment { index, stop, watcher: Some(watcher) })
}

impl KernelAttachment {
    /// Stops watching; the device stays configured.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }

    /// Disconnects the kernel device (after the filesystem on it is gone).
    pub fn disconnect(&mut self) -> io::Result<()> {
        self.stop();
        NbdNetlink::open()?.disconnect(self.index)
    }
}

impl Drop for KernelAttachment {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Disconnects `/dev/nbdN` over netlink (`livemirror nbd-disconnect`).
pub fn disconnect(device: &std::path::Path) -> io::Result<()> {
    let index = netlink::device_index(device).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not an NBD device", device.display()))
    })?;
    NbdNetlink::open()?.disconnect(index)
}
