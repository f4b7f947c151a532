//! `serve --ublk-device auto|N`: the kernel's ublk driver as the kernel device
//! (crate `livemirror-ublk`), and `livemirror ublk-remove`.
//!
//! The daemon gets a mount namespace of its own before anything else starts
//! (and before the root storage daemon's supervisor forks): a server that
//! shares a mount namespace with a file system on its own device can
//! deadlock when it exits, because tearing the namespace down may unmount that
//! file system, whose writes only this exiting server could serve (libublk's
//! README, "Mount namespace caveat"). In a private namespace made before the
//! device exists, no mount of `/dev/ublkbN` is ever ours. Paths the daemon is
//! given later are found through `/proc/PID/root` (engine::hostfs) and are not
//! affected.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use engine::rt::Worker;
use engine::{KernelDevice, Mirror};
use ublk_frontend::device::{self, DeviceId, Options, UblkDevice};

use crate::flush::KernelStop;

/// `serve`'s ublk options.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct UblkArgs {
    /// Serve the export as /dev/ublkbN through the kernel's ublk driver
    /// (module ublk_drv, Linux 6.5 or later): auto (this daemon's own device
    /// after a restart, else the next free number) or N.
    #[arg(long, value_name = "auto|N", conflicts_with = "nbd_device")]
    pub(crate) ublk_device: Option<DeviceId>,
    /// Requests in flight per ublk queue (one queue per I/O thread), 1 to 512.
    #[arg(long, value_name = "N", default_value_t = ublk_frontend::params::DEFAULT_QUEUE_DEPTH,
          value_parser = clap::value_parser!(u16).range(1..=ublk_frontend::params::MAX_QUEUE_DEPTH as i64))]
    pub(crate) ublk_queue_depth: u16,
}

/// Before anything else runs (single-threaded): the driver must be there and
/// able (else exit 1 before listening, naming the module and `--nbd-device`),
/// then the private mount namespace.
pub(crate) fn prepare() -> anyhow::Result<()> {
    if !ublk_frontend::ctrl::driver_loaded() {
        bail!("--ublk-device: {}", ublk_frontend::Error::NoDriver);
    }
    device::probe().context("--ublk-device")?;
    private_mounts().context("--ublk-device: cannot make a mount namespace of its own for the daemon")
}

fn private_mounts() -> std::io::Result<()> {
    // SAFETY: plain syscalls; the process has one thread here, so the new
    // namespace is every thread's (unshare affects the calling thread only).
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Private, not slave: mounts made later elsewhere (the file system on
        // our device) must not propagate into this namespace.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The ublk device a daemon serves.
pub(crate) struct Door {
    dev: UblkDevice,
}

/// Makes the device (or takes over this daemon's device after a crash or a
/// restart) and declares it to the mirror for `status` and `grow`.
pub(crate) fn attach(
    mirror: &Arc<Mirror>,
    workers: &[Arc<Worker>],
    control: &Path,
    args: &UblkArgs,
    id: DeviceId,
    budget: usize,
) -> anyhow::Result<Door> {
    let mut opts = Options::new(id, ublk_frontend::owner_tag(control.as_os_str().as_encoded_bytes()));
    opts.queue_depth = args.ublk_queue_depth;
    opts.discard_granularity = mirror.region_size();
    opts.buffer_budget = budget;
    // Measurement only (docs/decisions.md, ublk; benches/guest): requests cross to another thread.
    opts.hop = std::env::var_os("LIVEMIRROR_UBLK_HOP").is_some_and(|v| v == "1");
    let dev = UblkDevice::start(mirror.clone(), workers, &opts)?;
    let path = dev.path();
    let grow_refusal = (!dev.can_resize()).then(|| device::resize_refusal(&path));
    mirror.set_kernel_device(Some(KernelDevice { path: path.display().to_string(), grow_refusal }));
    let (q, d) = dev.queues();
    tracing::info!(
        "{} {} ({q} queues of {d} requests{})",
        if dev.recovered() { "took over" } else { "serving on" },
        path.display(),
        if dev.can_resize() { "" } else { "; no online resize in this kernel" }
    );
    if dev.can_resize() {
        follow_size(mirror, dev.resizer(), &path)?;
    }
    Ok(Door { dev })
}

/// Passes every grow of the export on to the device (its own thread: control
/// commands must not run on the queues' threads).
fn follow_size(mirror: &Arc<Mirror>, resizer: device::Resizer, path: &Path) -> anyhow::Result<()> {
    let mut size = mirror.subscribe_size();
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("livemirror-ublk-size".into())
        .spawn(move || {
            let _ = engine::rt::block_on(async move {
                while size.changed().await.is_ok() {
                    let bytes = *size.borrow_and_update();
                    match resizer.resize(bytes) {
                        Ok(()) => tracing::info!("{} is now {bytes} bytes", path.display()),
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            });
        })
        .context("cannot start the ublk resize thread")?;
    Ok(())
}

impl Door {
    /// The device's part of SIGTERM. A daemon that keeps it (the root storage
    /// daemon) leaves it for the next one: requests being carried out finish,
    /// the rest wait in the driver. Otherwise: flush it, then remove it.
    pub(crate) fn stop(self, how: KernelStop, limit: Duration) {
        let path = self.dev.path();
        match how {
            KernelStop::Keep => {
                self.dev.leave(limit);
                tracing::info!("left {} for the next daemon", path.display());
            }
            KernelStop::FlushAndDisconnect => {
                // While the queues still serve it: the page cache and the
                // kernel's FLUSH reach the devices first.
                crate::flush::flush_kernel_device(&path, limit);
                match self.dev.remove() {
                    Ok(()) => tracing::info!("removed {}", path.display()),
                    Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
    }
}

/// `livemirror ublk-remove DEVICE`: stops and deletes a ublk device no daemon
/// serves any more (one a root storage daemon left, or one whose daemon died
/// for good). I/O still waiting on it fails.
pub(crate) fn remove(device: &str) -> u8 {
    let id = match device.parse::<DeviceId>() {
        Ok(DeviceId::Number(n)) => n,
        _ => {
            eprintln!("livemirror: {device}: expected /dev/ublkbN or N");
            return 2;
        }
    };
    match device::remove_unserved(id) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("livemirror: {e}");
            1
        }
    }
}
