//! Attaching the kernel's NBD client to our export (`serve --nbd-device`).
//!
//! The daemon creates one socketpair per connection, serves one end itself
//! (transmission phase only: the kernel does no handshake) and hands the other
//! end to the kernel over netlink: CONNECT for a free device, RECONFIGURE for a
//! device whose previous daemon died (the kernel kept its I/O waiting, up to the
//! dead-connection timeout). A watcher thread replaces connections the kernel
//! reports dead (LINK_DEAD) and passes export size changes on (online resize).
//!
//! `livemirror upgrade` hands the live connections to the next process
//! instead ([`KernelAttachment::hand_over`], [`adopt`]): our ends of the
//! socketpairs, each with the bytes read past its last request, so the kernel
//! never sees a connection die and no request waits for `--nbd-timeout`.

mod handover;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::BlockDevice;
use tokio::sync::watch;

use crate::netlink::{self, ConnectParams, NbdNetlink};
use crate::server::Server;
use crate::transmission::HandoverSlot;
pub use handover::HandedConnection;
use handover::{Conns, KernelConn};

/// How to attach the export to a kernel device (`serve --nbd-device`).
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// The `/dev/nbdN` to connect.
    pub device: PathBuf,
    /// Connections asked for (`--nbd-connections`); at most one per CPU is used.
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
    /// The N of `/dev/nbdN`.
    pub index: u32,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
    conns: Conns,
}

/// Serves `ours` (the daemon's end of a kernel connection), starting with
/// `leftover`, and remembers it for a handover.
fn serve_kernel_end<D: BlockDevice>(
    server: &Server<D>,
    conns: &Conns,
    ours: UnixStream,
    leftover: Vec<u8>,
) -> io::Result<()> {
    ours.set_nonblocking(true)?;
    crate::server::enlarge_send_buffer(&ours);
    let slot = HandoverSlot::default();
    conns.push(KernelConn { socket: ours.try_clone()?.into(), slot: slot.clone() });
    server.serve_handed(ours, server.implicit_negotiation(), leftover, Some(slot))
}

fn serve_pairs<D: BlockDevice>(server: &Server<D>, conns: &Conns, n: usize) -> io::Result<Vec<UnixStream>> {
    let mut kernel_ends = Vec::with_capacity(n);
    for _ in 0..n {
        let (ours, theirs) = UnixStream::pair()?;
        serve_kernel_end(server, conns, ours, Vec::new())?;
        kernel_ends.push(theirs);
    }
    Ok(kernel_ends)
}

/// A socket for the kernel whose other end is already closed: the kernel's
/// receive work for it reads end-of-file at once, ends, and reports the
/// connection dead (see [`attach`]: the connections of a CONNECT but the last).
fn closed_pair() -> io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    drop(ours);
    Ok(theirs)
}

/// The most connections the kernel uses: it makes one hardware queue per
/// connection, but never more queues than there are possible CPUs, and sends
/// each request on the connection of its queue; the others would carry nothing.
pub(crate) fn usable_connections(requested: usize) -> usize {
    let cpus = std::fs::read_to_string(engine::hostfs::sys_path("devices/system/cpu/possible"))
        .ok()
        .and_then(|s| count_cpu_list(s.trim()));
    requested.clamp(1, cpus.unwrap_or(requested).max(1))
}

/// The number of CPUs in a sysfs CPU list ("0-3", "0,2-5", "7").
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut n = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// The first CPU of a sysfs CPU list ("2-3,6" -> 2).
fn first_cpu(list: &str) -> Option<usize> {
    list.trim().split([',', '-']).next().and_then(|c| c.parse::<usize>().ok())
}

/// The first CPU of each hardware queue of `/dev/nbdN` (`mq/Q/cpu_list`), in
/// queue order; a queue without a CPU is left out (no read can reach it).
fn queue_cpus(index: u32) -> Vec<(usize, usize)> {
    let dir = engine::hostfs::sys_path(&format!("block/nbd{index}/mq"));
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return out };
    for e in entries.flatten() {
        let Some(q) = e.file_name().to_str().and_then(|n| n.parse::<usize>().ok()) else { continue };
        let first = std::fs::read_to_string(e.path().join("cpu_list")).ok().and_then(|l| first_cpu(&l));
        if let Some(cpu) = first {
            out.push((q, cpu));
        }
    }
    out.sort();
    out
}

/// Reads 4 KiB with O_DIRECT from `dev` on a thread bound to `cpu`: the request
/// goes out on the connection of that CPU's hardware queue and completes only
/// once the kernel has read our reply from it.
fn probe_read(dev: PathBuf, cpu: usize) -> std::sync::mpsc::Receiver<io::Result<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("livemirror-nbd-probe".into()).spawn(move || {
        let r = (|| {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).map_err(|e| ctx(&format!("CPU {cpu}"), e.into()))?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(|e| ctx(&format!("bind to CPU {cpu}"), e.into()))?;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&dev)
                .map_err(|e| ctx(&format!("open {}", dev.display()), e))?;
            // O_DIRECT wants an aligned buffer: IoBuf is 4 KiB-aligned.
            let mut buf = engine::IoBuf::new(4096);
            f.read_exact_at(buf.as_mut_slice(), 0).map_err(|e| ctx(&format!("read {}", dev.display()), e))
        })();
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        let (tx, rx2) = std::sync::mpsc::channel();
        let _ = tx.send(Err(e));
        return rx2;
    }
    rx
}

/// Brings a device's connections up one at a time.
///
/// The kernel receives on each connection in a work item of the device's
/// receive workqueue, which runs for as long as the connection lives. That
/// workqueue has a rescuer thread: when the kernel cannot start a worker
/// quickly (memory pressure, a slow machine) the rescuer takes every item
/// waiting on the queue and runs them one after the other, so the second never
/// starts while the first lives, and the replies on its connection are never
/// read (Linux 6.1: the request times out after `--nbd-timeout`; the item stays
/// behind the first and later reads the connection that replaces it, next to
/// that one's own). So at most one receive item may ever be waiting: a CONNECT
/// hands the kernel all connections but only the last one works, the others
/// are closed on our side, so that their items end at once; then each dead
/// connection is replaced (RECONFIGURE queues one item) only once a read on
/// every hardware queue has come back, which proves every item so far runs.
struct Stager {
    index: u32,
    device: PathBuf,
    /// Connections still to give the kernel.
    owed: usize,
    /// Deaths the CONNECT caused itself (its closed connections), not to be
    /// counted as failures.
    expected_deaths: usize,
    /// Every connection given so far has been seen working.
    proven: bool,
    /// Reads in flight on each queue since `since`.
    probes: Vec<(usize, std::sync::mpsc::Receiver<io::Result<()>>)>,
    /// When the current wait (for deaths or for probes) began.
    since: Instant,
    warned: bool,
    /// Failed RECONFIGUREs in a row, and when to try again.
    failures: u32,
    retry_at: Instant,
}

/// How long the reads that prove the connections may take before the stager
/// says so (they still complete: the kernel resends after its timeout).
const PROBE_WARN: Duration = Duration::from_secs(5);

/// How long to wait for the kernel to report the CONNECT's closed connections
/// dead. Their receive work ends at once when it runs; if it has not run by
/// then, it waits behind the live one (the stall itself), and no replacement
/// could help: the device goes on with the connections it has.
const DEATH_WAIT: Duration = Duration::from_secs(10);

/// Failed RECONFIGUREs in a row before the stager gives up on the remaining
/// connections (the device keeps working on those it has), and the pause
/// between two tries.
const MAX_FAILURES: u32 = 5;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Stager {
    fn new(index: u32, device: PathBuf, owed: usize, expected_deaths: usize) -> Stager {
        let now = Instant::now();
        Stager {
            index,
            device,
            owed,
            expected_deaths,
            proven: false,
            probes: Vec::new(),
            since: now,
            warned: false,
            failures: 0,
            retry_at: now,
        }
    }

    /// Whether there is anything left to do.
    fn busy(&self) -> bool {
        self.owed > 0 || self.expected_deaths > 0 || !self.probes.is_empty()
    }

    /// A LINK_DEAD for our device: returns whether it was a failure (not one
    /// of the deaths the CONNECT caused). Either way the connection is owed.
    fn died(&mut self) -> bool {
        self.owed += 1;
        if self.expected_deaths > 0 {
            self.expected_deaths -= 1;
            if self.expected_deaths == 0 {
                self.since = Instant::now();
            }
            return false;
        }
        true
    }

    /// Starts the proving reads (one per hardware queue) unless they run.
    fn start_probes(&mut self) {
        let dev = engine::hostfs::locate(&self.device, None);
        self.probes = queue_cpus(self.index).into_iter().map(|(q, cpu)| (q, probe_read(dev.clone(), cpu))).collect();
        self.since = Instant::now();
        self.warned = false;
        if self.probes.is_empty() {
            tracing::warn!("no hardware queues of {} to prove its connections on", self.device.display());
            self.proven = true;
        }
    }

    /// Checks the proving reads; `proven` once all came back. A read that
    /// fails still came back: its connection's receive work ran.
    fn poll_probes(&mut self) {
        let mut left = Vec::new();
        for (q, rx) in self.probes.drain(..) {
            match rx.try_recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("cannot prove connection {q} of {}: {e}", self.device.display()),
                Err(std::sync::mpsc::TryRecvError::Empty) => left.push((q, rx)),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {}
            }
        }
        if !left.is_empty() && !self.warned && self.since.elapsed() >= PROBE_WARN {
            self.warned = true;
            let qs: Vec<String> = left.iter().map(|(q, _)| q.to_string()).collect();
            tracing::warn!(
                "the kernel has not read our replies on {}'s connection(s) {} for {} s: its receive work does not run \
                 (see docs/decisions.md, kernel NBD connections); the request is resent when --nbd-timeout expires",
                self.device.display(),
                qs.join(", "),
                PROBE_WARN.as_secs()
            );
        }
        self.probes = left;
        if self.probes.is_empty() {
            self.proven = true;
        }
    }

    /// One step: wait for the CONNECT's closed connections to be reported
    /// dead, prove what was given, then give the next connection. Never blocks.
    fn step<D: BlockDevice>(&mut self, server: &Server<D>, conns: &Conns, nl: &mut NbdNetlink, opts: &KernelOptions) {
        if self.expected_deaths > 0 {
            // Probing before then could send a request on a closed connection
            // (the kernel would log a failed send and resend it elsewhere).
            if self.since.elapsed() >= DEATH_WAIT {
                tracing::warn!(
                    "the kernel has not reported {} closed connection(s) of {} dead in {} s: going on with fewer",
                    self.expected_deaths,
                    self.device.display(),
                    DEATH_WAIT.as_secs()
                );
                self.expected_deaths = 0;
            }
            return;
        }
        if !self.proven {
            if self.probes.is_empty() {
                self.start_probes();
            }
            self.poll_probes();
            return;
        }
        if self.owed == 0 || Instant::now() < self.retry_at {
            return;
        }
        let res = serve_pairs(server, conns, 1).and_then(|ends| {
            let fds: Vec<_> = ends.iter().map(|s| s.as_raw_fd()).collect();
            nl.reconnect(self.index, &fds, opts.timeout, opts.dead_conn_timeout)
        });
        match res {
            Ok(()) => {
                self.owed -= 1;
                self.failures = 0;
                self.proven = false;
                if self.owed == 0 {
                    tracing::info!("all connections of {} are live", self.device.display());
                } else {
                    tracing::debug!("gave {} another connection ({} to go)", self.device.display(), self.owed);
                }
            }
            // No dead connection left to replace (a predecessor had fewer).
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => self.owed = 0,
            Err(e) => {
                self.failures += 1;
                self.retry_at = Instant::now() + RETRY_PAUSE;
                if self.failures >= MAX_FAILURES {
                    tracing::error!(
                        "cannot give {} a connection (RECONFIGURE, {} tries): {e}; it goes on with {} fewer",
                        self.device.display(),
                        self.failures,
                        self.owed
                    );
                    self.owed = 0;
                } else {
                    tracing::warn!(
                        "cannot give {} a connection (RECONFIGURE): {e}; trying again",
                        self.device.display()
                    );
                }
            }
        }
    }
}

/// The device index of `/dev/nbdN`, or an error that says what it is not.
fn index_of(device: &std::path::Path) -> io::Result<u32> {
    netlink::device_index(device).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not an NBD device (/dev/nbdN)", device.display()))
    })
}

/// Connects `opts.device` to `server` (CONNECT for a free device, RECONFIGURE
/// when a previous daemon's configuration is still there) and starts the
/// watcher that replaces dead connections and passes size changes from `size` on.
pub fn attach<D: BlockDevice>(
    server: &Server<D>,
    opts: &KernelOptions,
    mut size: watch::Receiver<u64>,
) -> io::Result<KernelAttachment> {
    let index = index_of(&opts.device)?;
    let mut nl = NbdNetlink::open()?;
    let n = usable_connections(opts.connections);
    if n < opts.connections {
        tracing::info!(
            "--nbd-connections {} for {}: the kernel uses at most {n} here (one per CPU)",
            opts.connections,
            opts.device.display()
        );
    }
    // Dead connections are reported on a multicast group: listen before any
    // can die.
    let listener = link_dead_listener()?;
    let conns = Conns::default();
    let export_size = *size.borrow_and_update();
    let stager = if nl.is_connected(index)? {
        // A predecessor died holding this device: every connection of it is
        // dead. One now, the others one at a time (see Stager).
        let ends = serve_pairs(server, &conns, 1)?;
        let fds: Vec<_> = ends.iter().map(|s| s.as_raw_fd()).collect();
        nl.reconnect(index, &fds, opts.timeout, opts.dead_conn_timeout).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot reconnect {} (RECONFIGURE): {e}", opts.device.display()))
        })?;
        crate::stats::Stats::bump(&server.stats().kernel_reconnects);
        tracing::info!(
            "reconnected {} to this daemon (1 connection now, {n} in all, the others one at a time)",
            opts.device.display()
        );
        if let Err(e) = nl.resize(index, export_size) {
            tracing::warn!("cannot set the size of {}: {e}", opts.device.display());
        }
        Stager::new(index, opts.device.clone(), n - 1, 0)
    } else {
        // All connections, but only the last one served (see Stager).
        let mut kernel_ends = Vec::with_capacity(n);
        for _ in 1..n {
            kernel_ends.push(closed_pair()?);
        }
        kernel_ends.extend(serve_pairs(server, &conns, 1)?);
        let fds: Vec<_> = kernel_ends.iter().map(|s| s.as_raw_fd()).collect();
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
        // The kernel holds its own references to its ends now.
        drop(kernel_ends);
        Stager::new(index, opts.device.clone(), 0, n - 1)
    };
    watch_device(server, opts, nl, listener, stager, size, conns, index)
}

/// Takes over a device whose live connections a previous daemon handed over
/// (`livemirror upgrade`): serves each from where that daemon stopped, and
/// gives the kernel the connections it is missing the usual way (Stager).
/// Without a live connection to take, this is a restart: [`attach`].
pub fn adopt<D: BlockDevice>(
    server: &Server<D>,
    opts: &KernelOptions,
    mut size: watch::Receiver<u64>,
    handed: Vec<HandedConnection>,
) -> io::Result<KernelAttachment> {
    if handed.is_empty() {
        return attach(server, opts, size);
    }
    let index = index_of(&opts.device)?;
    let nl = NbdNetlink::open()?;
    let listener = link_dead_listener()?;
    let conns = Conns::default();
    let n = usable_connections(opts.connections);
    let taken = handed.len();
    for h in handed {
        serve_kernel_end(server, &conns, UnixStream::from(h.socket), h.leftover)?;
    }
    // The size the kernel has is the previous daemon's; ours is the same
    // export's, but say it again only if it differs (a resize freezes the queue).
    let _ = size.borrow_and_update();
    tracing::info!("took over {} with its {taken} live connection(s)", opts.device.display());
    // Connections it had lost are dead slots: filled one at a time, after a
    // proving read on every queue.
    let stager = Stager::new(index, opts.device.clone(), n.saturating_sub(taken), 0);
    watch_device(server, opts, nl, listener, stager, size, conns, index)
}

fn link_dead_listener() -> io::Result<netlink::Genl> {
    let mut listener = netlink::Genl::open()?;
    let family = listener.nbd_family()?;
    if let Some(g) = family.mcast_group {
        listener.join(g)?;
    }
    Ok(listener)
}

/// Starts the watcher thread: staging, LINK_DEAD replacements, resizes.
#[allow(clippy::too_many_arguments)]
fn watch_device<D: BlockDevice>(
    server: &Server<D>,
    opts: &KernelOptions,
    mut nl: NbdNetlink,
    listener: netlink::Genl,
    mut stager: Stager,
    mut size: watch::Receiver<u64>,
    conns: Conns,
    index: u32,
) -> io::Result<KernelAttachment> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = server.clone();
    let opts2 = opts.clone();
    let conns2 = conns.clone();
    let watcher = std::thread::Builder::new().name("livemirror-nbd-watch".into()).spawn(move || {
        while !stop2.load(Ordering::SeqCst) {
            if stager.busy() {
                stager.step(&server, &conns2, &mut nl, &opts2);
            }
            let wait = if stager.busy() { Duration::from_millis(50) } else { Duration::from_millis(200) };
            match listener.next_link_dead(wait) {
                Ok(Some(i)) if i == index && !stop2.load(Ordering::SeqCst) => {
                    conns2.prune();
                    if stager.died() {
                        tracing::warn!(
                            "the kernel reports a dead connection on {}: replacing it",
                            opts2.device.display()
                        );
                        crate::stats::Stats::bump(&server.stats().kernel_reconnects);
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
    Ok(KernelAttachment { index, stop, watcher: Some(watcher), conns })
}

impl KernelAttachment {
    /// Stops watching; the device stays configured.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.watcher.take() {
            let _ = t.join();
        }
    }

    /// The connections to hand to the next process, once the server has
    /// stopped (see `handover.rs`).
    pub fn hand_over(&mut self) -> Vec<HandedConnection> {
        self.stop();
        self.conns.hand_over()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-3"), Some(4));
        assert_eq!(count_cpu_list("0,2-5"), Some(5));
        assert_eq!(count_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpu_list("7"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("0-y"), None);
        assert_eq!(first_cpu("2-3,6\n"), Some(2));
        assert_eq!(first_cpu("5"), Some(5));
        assert_eq!(first_cpu(""), None);
    }

    #[test]
    fn connect_deaths_are_expected_then_failures() {
        // A CONNECT of 4: 3 closed connections, whose deaths are no failure.
        let mut s = Stager::new(0, PathBuf::from("/dev/nbd0"), 0, 3);
        assert!(s.busy());
        assert!(!s.died());
        assert!(!s.died());
        assert!(!s.died());
        assert_eq!((s.owed, s.expected_deaths), (3, 0));
        // A later death is one, and is owed too.
        assert!(s.died());
        assert_eq!(s.owed, 4);
        // A reconnect of 4: 3 owed, nothing expected.
        let mut s = Stager::new(0, PathBuf::from("/dev/nbd0"), 3, 0);
        assert!(s.busy());
        assert!(s.died());
        assert_eq!(s.owed, 4);
        // One connection: nothing to do.
        assert!(!Stager::new(0, PathBuf::from("/dev/nbd0"), 0, 0).busy());
    }

    #[test]
    fn usable_connections_is_at_least_one() {
        assert_eq!(usable_connections(0), 1);
        assert_eq!(usable_connections(1), 1);
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        assert!(usable_connections(1024) >= 1);
        assert!(usable_connections(2) <= 2.max(cpus));
    }
}
