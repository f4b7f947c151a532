//! `livemirror serve`'s flags, and the daemon's start and clean stop: opens the
//! devices, starts the workers, the NBD listeners, the control socket and the
//! kernel device, and shuts everything down cleanly ([`Running::shutdown`]).
//! The process around it (signals, upgrades) is `daemon.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use engine::rt::Worker;
use engine::{CacheMode, Mirror, MirrorConfig};
use nbd_frontend::{ListenAddr, Listener, Server, ServerConfig, TlsAcceptor, TlsPolicy};

use crate::units::{parse_rate, parse_size};

/// `--detect-zeroes on|off`, as qemu names the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OnOff {
    On,
    Off,
}

/// `--tls off|on|require`, as qemu-nbd and nbdkit name the modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TlsArg {
    Off,
    On,
    Require,
}

/// `--metrics ADDR`: only TCP (a scraper connects over the network stack).
fn parse_metrics_addr(s: &str) -> Result<ListenAddr, String> {
    match s.parse::<ListenAddr>()? {
        a @ ListenAddr::Tcp { .. } => Ok(a),
        ListenAddr::Unix(_) => Err(format!("{s}: the metrics address is tcp:HOST:PORT")),
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// The device, image or NBD export (a URI, below) to serve (may be left
    /// out only with --state, when the state file names the source).
    #[arg(long, value_name = "DEVICE", required_unless_present = "state")]
    pub(crate) source: Option<PathBuf>,
    /// Attach this target (a device, image or NBD URI) right after start.
    #[arg(long, value_name = "DEVICE")]
    pub(crate) target: Option<PathBuf>,
    /// Serve the source through a copy-on-write overlay kept in PATH (made if
    /// missing or empty; on tmpfs it lives in RAM): the source is only read,
    /// every write, write-zeroes and trim lands in PATH, reads merge the two.
    /// An overlay made over another image is refused. After detach-source the
    /// file is removed.
    #[arg(long, value_name = "PATH")]
    pub(crate) overlay: Option<PathBuf>,
    /// The most the overlay file may occupy: a write that would need more fails
    /// with ENOSPC and changes nothing (events at 75 % and 90 %).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "overlay")]
    pub(crate) overlay_limit: Option<u64>,
    /// unix:PATH or tcp:HOST:PORT (repeatable).
    #[arg(long, value_name = "ADDR", default_value = crate::DEFAULT_LISTEN)]
    pub(crate) listen: Vec<ListenAddr>,
    /// The control socket.
    #[arg(long, value_name = "PATH", default_value = crate::DEFAULT_CONTROL)]
    pub(crate) control: PathBuf,
    /// Persisted bitmap; enables crash-resume.
    #[arg(long, value_name = "PATH")]
    pub(crate) state: Option<PathBuf>,
    /// Ignore a mismatching state file and start over.
    #[arg(long)]
    pub(crate) restart_sync: bool,
    /// The NBD export name clients ask for (default "", the default export).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub(crate) export_name: String,
    /// Bitmap granularity (default 64K, or the state file's).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) region_size: Option<u64>,
    /// Copier I/Os in flight.
    #[arg(long, value_name = "N", default_value_t = engine::DEFAULT_QUEUE_DEPTH)]
    pub(crate) queue_depth: usize,
    /// Copy rate limit in bytes per second, 0 = unlimited (default: 0, or
    /// with --state the rate `set-rate` last set).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) max_rate: Option<u64>,
    /// The copy rate kept while clients are busy: the copier backs off to it
    /// (default: 32M, or with --state the floor last set; docs/decisions.md
    /// says how 32M was chosen). 0: no floor, the copy waits while clients are
    /// busy (under constant load it does not end).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub(crate) min_rate: Option<u64>,
    /// Attach the kernel's NBD client to this device over netlink.
    #[arg(long, value_name = "/dev/nbdN")]
    pub(crate) nbd_device: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) ublk: crate::ublk::UblkArgs,
    /// Export read-only: clients' writes, trims and write-zeroes are refused
    /// (a target can still be attached and synced).
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Allow TCP listen and metrics addresses that are not loopback although
    /// clients are not authenticated (not needed for --listen with --tls
    /// require and --tls-psk or --tls-verify-peer).
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// STARTTLS: off; on (offered, plaintext clients served too); require
    /// (every option but STARTTLS is refused until TLS runs).
    #[arg(long, value_name = "off|on|require", value_enum, default_value = "off")]
    pub(crate) tls: TlsArg,
    /// X.509 credentials: DIR/server-cert.pem (the chain, leaf first),
    /// DIR/server-key.pem (RSA from 2048 bits, ECDSA P-256/P-384/P-521,
    /// Ed25519 or Ed448; not encrypted), and DIR/ca-cert.pem for
    /// --tls-verify-peer (the qemu-nbd/nbdkit layout).
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    pub(crate) tls_certs: Option<PathBuf>,
    /// Pre-shared keys: "identity:hexkey" lines, as psktool writes them.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_psk: Option<PathBuf>,
    /// With --tls-certs: clients must present a certificate signed by
    /// DIR/ca-cert.pem.
    #[arg(long, requires = "tls_certs")]
    pub(crate) tls_verify_peer: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics; ADDR is tcp:HOST:PORT
    /// (loopback unless --allow-remote).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub(crate) metrics: Option<ListenAddr>,
    /// Zero detection: on, runs of zeroes read from the source are zeroed on
    /// the target (a hole in a file, an unmap on a disk that supports it)
    /// instead of written; off, every byte is written.
    #[arg(long, value_name = "on|off", value_enum, default_value = "on")]
    pub(crate) detect_zeroes: OnOff,
    /// Page-cache use: auto (O_DIRECT for block devices), direct or buffered.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub(crate) cache: CacheMode,
    /// Payload bytes buffered across all connections at most (each
    /// connection's reserve comes on top). Default 256M; 64M as a root storage
    /// daemon, whose memory is locked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) buffer_budget: Option<u64>,
    /// Bytes of the shared budget one connection may hold (default: a quarter
    /// of the budget, at least 64M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) connection_budget: Option<u64>,
    /// Bytes each connection may always use outside the shared budget, so an
    /// honest client is served whatever the others hold.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub(crate) connection_reserve: u64,
    /// Requests one connection may have between reading and answering; at the
    /// limit its socket is not read.
    #[arg(long, value_name = "N", default_value_t = nbd_frontend::ConnLimits::DEFAULT_MAX_REQUESTS)]
    pub(crate) max_requests: usize,
    /// Connections served at once; more are closed right after accept.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::DEFAULT_MAX_CONNECTIONS)]
    pub(crate) max_connections: usize,
    /// A client that stops sending a payload it announced, or stops reading
    /// its replies, for this long is disconnected.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub(crate) stall_timeout: f64,
    /// On SIGTERM/SIGINT, how long connections may take to receive the replies
    /// of their requests in flight before they are closed.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub(crate) shutdown_timeout: f64,
    /// Connections the kernel client uses (at most one per CPU: the kernel
    /// sends on one per hardware queue); given one after the other (see
    /// docs/decisions.md, kernel NBD connections).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub(crate) nbd_connections: usize,
    /// Kernel request timeout: requests in flight on a dead connection are
    /// resent when it fires.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub(crate) nbd_timeout: u64,
    /// How long the kernel holds I/O while the daemon is gone (a restart
    /// reconnects within it).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub(crate) nbd_dead_timeout: u64,
    /// Run as the root filesystem's storage daemon: locked memory, I/O flusher,
    /// no OOM kill, supervised restarts (also when argv[0] starts with '@').
    #[arg(long)]
    pub(crate) root_storage_daemon: bool,
    /// Bytes per copier I/O while clients are idle (default 2M; 1M for files
    /// in RAM); while they are busy, at most 64K.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) copy_chunk: Option<u64>,
    /// I/O threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub(crate) workers: Option<usize>,
    #[command(flatten)]
    pub(crate) remote: crate::devices::RemoteArgs,
}

impl ServeArgs {
    /// Parses `serve`'s arguments from a list (the demo starts a daemon in
    /// process with the same defaults as the command line).
    pub(crate) fn from_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<ServeArgs> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("serve")).chain(args);
        Ok(<Wrapper as clap::Parser>::try_parse_from(argv)?.serve)
    }

    /// The same arguments with every path made absolute (the daemon may change
    /// its working directory, and a supervisor restarts it with these).
    pub(crate) fn absolute(mut self) -> std::io::Result<ServeArgs> {
        let abs = |p: &mut PathBuf| -> std::io::Result<()> {
            *p = std::path::absolute(&*p)?;
            Ok(())
        };
        for p in [&mut self.source, &mut self.target].into_iter().flatten() {
            *p = crate::devices::absolute(p)?;
        }
        for p in [&mut self.state, &mut self.tls_certs, &mut self.tls_psk, &mut self.overlay].into_iter().flatten() {
            abs(p)?;
        }
        abs(&mut self.control)?;
        for l in &mut self.listen {
            if let ListenAddr::Unix(p) = l {
                abs(p)?;
            }
        }
        Ok(self)
    }
}

fn seconds(flag: &str, secs: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, not {secs}"))
}

/// Loads the TLS credentials `--tls` asks for; they are read once, at start.
fn tls_policy(args: &ServeArgs) -> anyhow::Result<TlsPolicy> {
    let acceptor = match (&args.tls_certs, &args.tls_psk) {
        (Some(dir), None) => Some(TlsAcceptor::x509(dir, args.tls_verify_peer)?),
        (None, Some(file)) => Some(TlsAcceptor::psk(file)?),
        (None, None) => None,
        // clap refuses both; said again here for callers that build ServeArgs.
        (Some(_), Some(_)) => bail!("--tls-certs and --tls-psk: give one of them"),
    };
    Ok(match (args.tls, acceptor) {
        (TlsArg::Off, None) => TlsPolicy::Off,
        (TlsArg::Off, Some(_)) => {
            bail!("TLS credentials were given but --tls is off (add --tls on or --tls require)")
        }
        (TlsArg::On | TlsArg::Require, None) => {
            bail!("--tls on and --tls require need credentials: --tls-certs DIR or --tls-psk FILE")
        }
        (TlsArg::On, Some(a)) => TlsPolicy::Offered(a),
        (TlsArg::Require, Some(a)) => TlsPolicy::Required(a),
    })
}

/// Which NBD listen addresses may reach other hosts. Without `--allow-remote`
/// only when every client must authenticate (TLS required with a PSK or
/// client certificates): encryption alone would still let anyone write.
fn check_listeners(args: &ServeArgs, tls: &TlsPolicy) -> anyhow::Result<Vec<ListenAddr>> {
    let mut remote = Vec::new();
    for l in &args.listen {
        if !l.is_local_only().with_context(|| format!("cannot resolve {l}"))? {
            remote.push(l.clone());
        }
    }
    if let Some(l) = remote.first() {
        if !args.allow_remote && !tls.authenticates_every_client() {
            bail!(
                "refusing to listen on {l}: it is reachable from other hosts and clients are not authenticated \
                 (use --tls require with --tls-psk or --tls-verify-peer, or add --allow-remote to insist)"
            );
        }
    }
    Ok(remote)
}

/// Payload bytes the clients of one door may hold at once (`--buffer-budget`).
fn buffer_budget(args: &ServeArgs) -> usize {
    let root_daemon = crate::rootd::requested(args.root_storage_daemon);
    args.buffer_budget.map_or(if root_daemon { 64 << 20 } else { ServerConfig::DEFAULT_BUDGET }, |b| b as usize)
}

fn server_config(args: &ServeArgs, served: &str, tls: TlsPolicy) -> anyhow::Result<ServerConfig> {
    let budget = buffer_budget(args);
    let mut limits = nbd_frontend::ConnLimits::for_budget(budget);
    if let Some(c) = args.connection_budget {
        if c < nbd_frontend::proto::MAX_PAYLOAD as u64 {
            bail!("--connection-budget must hold at least one 32M payload");
        }
        limits.shared_cap = c as usize;
    }
    limits.reserve = args.connection_reserve as usize;
    if args.max_requests == 0 || args.max_connections == 0 {
        bail!("--max-requests and --max-connections must be at least 1");
    }
    limits.max_requests = args.max_requests;
    limits.stall_timeout = seconds("--stall-timeout", args.stall_timeout)?;
    Ok(ServerConfig {
        export_name: args.export_name.clone(),
        description: format!("livemirror export of {served}"),
        read_only: args.read_only,
        buffer_budget: budget,
        limits,
        max_connections: args.max_connections,
        tls,
    })
}

/// A running daemon: devices, I/O threads, NBD listeners and control socket.
pub(crate) struct Running {
    pub(crate) mirror: Arc<Mirror>,
    pub(crate) server: Server<Mirror>,
    pub(crate) kernel: Option<(PathBuf, nbd_frontend::kernel::KernelAttachment)>,
    pub(crate) ublk: Option<crate::ublk::Door>,
    /// What a clean stop does with the kernel device (see [`crate::flush::kernel_on_stop`]).
    pub(crate) kernel_stop: crate::flush::KernelStop,
    pub(crate) workers: Vec<Arc<Worker>>,
    pub(crate) stop_control: tokio::sync::watch::Sender<bool>,
    pub(crate) sockets: SocketFiles,
    pub(crate) shutdown_timeout: std::time::Duration,
    /// Second handles on the listening sockets, for `livemirror upgrade`.
    pub(crate) held: crate::upgrade::sockets::Held,
    pub(crate) notifier: Option<crate::notify::Notifier>,
    /// A state file made for an upgrade (the daemon was started without
    /// `--state`): removed at a clean stop.
    pub(crate) remove_on_stop: Option<PathBuf>,
    /// Where the control server sends `upgrade` requests.
    pub(crate) upgrades: crate::control::Upgrades,
}

/// Socket files this daemon created. Removed when dropped (a failed start
/// leaves none behind), unless handed over with [`SocketFiles::take`].
#[derive(Default)]
pub(crate) struct SocketFiles(Vec<PathBuf>);

impl SocketFiles {
    pub(crate) fn take(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in self.take() {
            let _ = std::fs::remove_file(engine::hostfs::locate(&p, None));
        }
    }
}

/// Fails early, before anything is opened or bound, when `--nbd-device`
/// cannot work on this host.
fn check_kernel_nbd(dev: &std::path::Path) -> anyhow::Result<()> {
    if nbd_frontend::netlink::device_index(dev).is_none() {
        bail!("--nbd-device {}: not an NBD device (expected /dev/nbdN)", dev.display());
    }
    nbd_frontend::netlink::NbdNetlink::open()
        .with_context(|| format!("--nbd-device {}: cannot use the kernel's NBD client", dev.display()))?;
    Ok(())
}

/// What `start` checks before it opens or binds anything (a successor of
/// `livemirror upgrade` checks it before it says hello to the old daemon).
pub(crate) struct Prepared {
    tls: TlsPolicy,
    remote: Vec<ListenAddr>,
}

/// Opens the devices and starts serving; returns once every listener accepts
/// and the control socket answers.
pub(crate) fn start(args: &ServeArgs) -> anyhow::Result<Running> {
    start_with(args, prepare(args)?, crate::upgrade::sockets::Inherited::default(), None)
}

pub(crate) fn prepare(args: &ServeArgs) -> anyhow::Result<Prepared> {
    let tls = tls_policy(args)?;
    let remote = check_listeners(args, &tls)?;
    if let Some(m) = &args.metrics {
        let local = m.is_local_only().with_context(|| format!("cannot resolve {m}"))?;
        if !local && !args.allow_remote {
            bail!("refusing to serve metrics on {m}: it is reachable from other hosts (add --allow-remote to insist)");
        }
    }
    if let Some(c) = args.copy_chunk {
        if c == 0 || c > 64 << 20 || !c.is_multiple_of(4096) {
            bail!("--copy-chunk must be a multiple of 4K between 4K and 64M");
        }
    }
    if let Some(dev) = &args.nbd_device {
        check_kernel_nbd(dev)?;
    }
    Ok(Prepared { tls, remote })
}

/// [`start`] from the sockets `inherited` holds (a predecessor's, handed over
/// by `livemirror upgrade`), binding the others; `upgrades` is where the
/// control server sends `upgrade` requests.
pub(crate) fn start_with(
    args: &ServeArgs,
    pre: Prepared,
    mut inherited: crate::upgrade::sockets::Inherited,
    upgrades: crate::control::Upgrades,
) -> anyhow::Result<Running> {
    let Prepared { tls, remote } = pre;
    let cfg = MirrorConfig {
        region_size: args.region_size.unwrap_or(engine::regions::DEFAULT_REGION_SIZE),
        queue_depth: args.queue_depth.max(1),
        max_rate: args.max_rate.unwrap_or(0),
        min_rate: args.min_rate.unwrap_or(engine::MirrorConfig::default().min_rate),
        copy_chunk: args.copy_chunk.unwrap_or(0) as usize,
        read_only: args.read_only,
        cache: args.cache,
        detect_zeroes: args.detect_zeroes == OnOff::On,
        opener: args.remote.opener()?,
    };
    let started = engine::startup::start(
        &engine::startup::StartOptions {
            source: args.source.clone(),
            target: args.target.clone(),
            overlay: args
                .overlay
                .clone()
                .map(|path| engine::backend::OverlayOptions { path, limit: args.overlay_limit }),
            state: args.state.clone(),
            restart_sync: args.restart_sync,
            region_size_explicit: args.region_size.is_some(),
            max_rate_explicit: args.max_rate.is_some(),
            min_rate_explicit: args.min_rate.is_some(),
            handed_over: inherited.handed_over,
        },
        cfg,
    )?;
    let mirror = started.mirror.clone();
    let served = mirror.status().source.or_else(|| mirror.status().target).unwrap_or_default();

    let nworkers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1);
    let workers: Vec<Arc<Worker>> = (0..nworkers)
        .map(|i| Worker::spawn(&format!("livemirror-io{i}")).map(Arc::new))
        .collect::<Result<_, _>>()
        .context("cannot start I/O threads")?;
    let tls_log = match &tls {
        TlsPolicy::Off => "TLS off".to_string(),
        TlsPolicy::Offered(a) => format!("TLS offered ({})", a.describe()),
        TlsPolicy::Required(a) => format!("TLS required ({})", a.describe()),
    };
    let authenticated = tls.authenticates_every_client();
    let server = Server::new(mirror.clone(), server_config(args, &served, tls)?, workers.clone());
    let mut bound = Vec::new();
    let mut sockets = SocketFiles::default();
    let mut held = crate::upgrade::sockets::Held { listeners: Vec::new(), control: None, metrics: None };
    for l in &args.listen {
        let listener = match inherited.take_listener(l)? {
            Some(inh) => inh,
            // Listener::bind names a TCP address in its errors itself.
            None if matches!(l, ListenAddr::Tcp { .. }) => Listener::bind(l)?,
            None => Listener::bind(l).with_context(|| format!("cannot listen on {l}"))?,
        };
        held.listeners.push((l.clone(), listener.try_clone().context("a second handle on a listener")?));
        bound.push(listener);
        if let ListenAddr::Unix(p) = l {
            sockets.0.push(p.clone());
        }
    }
    let control = match inherited.take_control() {
        Some(c) => c,
        None => nbd_frontend::unix_socket::bind(&args.control)
            .with_context(|| format!("cannot create the control socket {}", args.control.display()))?,
    };
    held.control = Some(control.try_clone().context("a second handle on the control socket")?);
    sockets.0.push(args.control.clone());
    let metrics = match (&args.metrics, inherited.take_metrics()) {
        (Some(_), Some(l)) => Some(l),
        (Some(a), None) => {
            let addrs = a.resolve().with_context(|| format!("cannot resolve {a}"))?;
            let l =
                std::net::TcpListener::bind(&addrs[..]).with_context(|| format!("cannot listen for metrics on {a}"))?;
            l.set_nonblocking(true).context("metrics socket")?;
            Some(l)
        }
        (None, _) => None,
    };
    if let Some(m) = &metrics {
        held.metrics = Some(m.try_clone().context("a second handle on the metrics listener")?);
    }
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    let addrs: Vec<String> = bound.iter().map(|l| l.local_addr()).collect();
    let io0 = workers[0].clone();
    for l in bound {
        let s = server.clone();
        io0.run(move || async move { s.accept_loop(l).await })?;
    }
    let (stop_control, stop_rx) = tokio::sync::watch::channel(false);
    {
        let m = mirror.clone();
        let stop = stop_rx.clone();
        let up = upgrades.clone();
        io0.run(move || crate::control::serve(control, m, stop, up))?;
    }
    if let Some(pid) = crate::rootd::supervisor() {
        let (m, stop) = (mirror.clone(), stop_rx.clone());
        io0.run(move || crate::rootd::watch_supervisor(pid, m, stop))?;
    }
    if let Some(l) = metrics {
        let (m, s, stop) = (mirror.clone(), server.clone(), stop_rx.clone());
        io0.run(move || crate::metrics::serve(l, m, s, stop))?;
    }
    tracing::info!(
        "serving {served} ({} bytes) on {}; {tls_log}; control {}{}",
        mirror.size(),
        addrs.join(", "),
        args.control.display(),
        metrics_addr.map(|a| format!("; metrics http://{a}/metrics")).unwrap_or_default()
    );
    for l in &remote {
        if !authenticated {
            tracing::warn!(
                "{l} is reachable from other hosts and the export is unauthenticated: anyone who can connect may \
                 read and write it"
            );
        }
    }
    let shutdown_timeout = seconds("--shutdown-timeout", args.shutdown_timeout)?;
    let mut running = Running {
        mirror,
        server,
        kernel: None,
        ublk: None,
        kernel_stop: crate::flush::kernel_on_stop(crate::rootd::requested(args.root_storage_daemon)),
        workers,
        stop_control,
        sockets,
        shutdown_timeout,
        held,
        notifier: None,
        remove_on_stop: None,
        upgrades,
    };
    if let Some(t) = started.attach {
        let m = running.mirror.clone();
        running.on_io(move || async move { m.attach(&t).await })?.context("cannot attach the target")?;
    }
    if started.resumed_sync {
        running.mirror.resume_copier()?;
    }
    if let Some(dev) = &args.nbd_device {
        let opts = nbd_frontend::kernel::KernelOptions {
            device: dev.clone(),
            connections: args.nbd_connections.clamp(1, 16),
            timeout: std::time::Duration::from_secs(args.nbd_timeout.max(1)),
            dead_conn_timeout: std::time::Duration::from_secs(args.nbd_dead_timeout),
        };
        // Connections a predecessor handed over are served on; without any,
        // the device is connected (or reconnected after a crash).
        let handed = inherited.take_kernel();
        let k = nbd_frontend::kernel::adopt(&running.server, &opts, running.mirror.subscribe_size(), handed)
            .with_context(|| format!("cannot attach the kernel client to {}", dev.display()))?;
        running.kernel = Some((dev.clone(), k));
        let path = dev.display().to_string();
        running.mirror.set_kernel_device(Some(engine::KernelDevice { path, grow_refusal: None }));
    }
    if let Some(id) = args.ublk.ublk_device {
        let budget = buffer_budget(args);
        running.ublk =
            Some(crate::ublk::attach(&running.mirror, &running.workers, &args.control, &args.ublk, id, budget)?);
    }
    Ok(running)
}

impl Running {
    /// Runs `f` on the first I/O thread and waits for its result.
    pub(crate) fn on_io<F, Fut, T>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let w = self.workers[0].clone();
        Ok(engine::rt::block_on(async move { w.call(f).await })??)
    }

    /// Stops accepting, drains every connection, stops the copier, flushes and
    /// persists, then stops the threads and removes the sockets.
    pub(crate) fn shutdown(self) -> anyhow::Result<()> {
        let Running {
            mirror,
            server,
            kernel,
            ublk,
            kernel_stop,
            workers,
            stop_control,
            sockets,
            shutdown_timeout,
            notifier,
            remove_on_stop,
            ..
        } = self;
        if let Some(n) = notifier {
            n.stopping();
        }
        if let Some(door) = ublk {
            door.stop(kernel_stop, shutdown_timeout);
        }
        if let Some((dev, mut k)) = kernel {
            match kernel_stop {
                crate::flush::KernelStop::FlushAndDisconnect => {
                    // While our connections still serve it: the kernel's
                    // dirty pages and its FLUSH reach the devices first.
                    crate::flush::flush_kernel_device(&dev, shutdown_timeout);
                    match k.disconnect() {
                        Ok(()) => tracing::info!("disconnected {}", dev.display()),
                        Err(e) => tracing::warn!("cannot disconnect {}: {e}", dev.display()),
                    }
                }
                // A restarted daemon reconnects it (`livemirror nbd-disconnect`
                // tears it down).
                crate::flush::KernelStop::Keep => drop(k),
            }
        }
        engine::rt::block_on(async {
            server.shutdown(shutdown_timeout).await;
            stop_control.send_replace(true);
            mirror.shutdown().await.context("final flush")
        })??;
        drop(server);
        for w in workers {
            if let Ok(w) = Arc::try_unwrap(w) {
                w.join();
            }
        }
        // Removes the socket files.
        drop(sockets);
        if let Some(p) = remove_on_stop {
            let _ = std::fs::remove_file(engine::hostfs::locate(&p, None));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_source_is_a_usage_error_unless_a_state_file_may_name_it() {
        let e = ServeArgs::from_args(["--target".into(), "/t".into()]).map(|_| ()).unwrap_err();
        let e = e.downcast::<clap::Error>().expect("a clap error");
        assert_eq!(e.exit_code(), 2);
        assert!(ServeArgs::from_args(["--state".into(), "/s".into()]).is_ok());
    }

    fn args(extra: &[&str]) -> ServeArgs {
        let mut v: Vec<std::ffi::OsString> = vec!["--source".into(), "/s".into()];
        v.extend(extra.iter().map(|a| a.into()));
        ServeArgs::from_args(v).expect("valid arguments")
    }

    #[test]
    fn tls_flags_must_agree() {
        let e = tls_policy(&args(&["--tls", "on"])).unwrap_err().to_string();
        assert!(e.contains("need credentials"), "{e}");
        let e = tls_policy(&args(&["--tls-psk", "/nonexistent/keys.psk"])).unwrap_err().to_string();
        assert!(e.contains("keys.psk"), "the file is read first: {e}");
        assert!(matches!(tls_policy(&args(&[])), Ok(TlsPolicy::Off)));
        let both = ServeArgs::from_args(["--source", "/s", "--tls-certs", "/d", "--tls-psk", "/f"].map(Into::into));
        assert!(both.is_err(), "clap refuses --tls-certs with --tls-psk");
        let verify = ServeArgs::from_args(["--source", "/s", "--tls-verify-peer"].map(Into::into));
        assert!(verify.is_err(), "--tls-verify-peer needs --tls-certs");
    }

    #[test]
    fn remote_listeners_need_authenticated_clients_or_allow_remote() {
        let remote = ["--listen", "tcp:192.0.2.1:10809"];
        let e = check_listeners(&args(&remote), &TlsPolicy::Off).unwrap_err().to_string();
        assert!(e.contains("not authenticated") && e.contains("--allow-remote"), "{e}");
        let mut insist = remote.to_vec();
        insist.push("--allow-remote");
        assert_eq!(check_listeners(&args(&insist), &TlsPolicy::Off).unwrap().len(), 1);
        assert!(check_listeners(&args(&["--listen", "tcp:127.0.0.1:10809"]), &TlsPolicy::Off).unwrap().is_empty());
    }

    #[test]
    fn metrics_take_tcp_only() {
        assert!(parse_metrics_addr("tcp:127.0.0.1:9100").is_ok());
        assert!(parse_metrics_addr("unix:/run/m.sock").unwrap_err().contains("tcp:HOST:PORT"));
    }
}
