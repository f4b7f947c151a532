//! A ublk device's life: made new or taken over from a server that died,
//! started, resized, removed (a clean stop) or left for the next server.
//!
//! Every device livemirror makes has user recovery with reissue: when the
//! serving process dies, the driver holds the device's I/O, gives back what was
//! in flight, and waits for a new server. A daemon started again with the same
//! arguments finds its device by the owner tag it stored at ADD_DEV
//! ([`crate::owner_tag`]) and takes it over: START_USER_RECOVERY, fetches on
//! every queue, END_USER_RECOVERY. No I/O error reaches the device's users.
//!
//! Control commands that wait for the queues (START_DEV, END_USER_RECOVERY,
//! STOP_DEV) are sent from the calling thread, which must not be one of the
//! engine threads serving the queues.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::rt::Worker;
use engine::{BlockDevice, BufPool};

use crate::ctrl::{self, Control};
use crate::params::{self, Geometry};
use crate::queue::{self, Shared};
use crate::sys::{self, DevInfo};
use crate::{Error, Result};

/// Which device: `auto` (this daemon's own device if one exists, else the next
/// free number) or a number N for `/dev/ublkbN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceId {
    Auto,
    Number(u32),
}

impl FromStr for DeviceId {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DeviceId, String> {
        if s == "auto" {
            return Ok(DeviceId::Auto);
        }
        let n = s.strip_prefix("/dev/ublkb").unwrap_or(s);
        match n.parse::<u32>() {
            Ok(n) if n < (1 << 20) => Ok(DeviceId::Number(n)),
            _ => Err(format!("{s}: expected auto, a device number N or /dev/ublkbN")),
        }
    }
}

/// How to make or take over a device.
#[derive(Debug, Clone)]
pub struct Options {
    pub id: DeviceId,
    /// Marks this daemon's devices ([`crate::owner_tag`]).
    pub owner_tag: u64,
    pub queue_depth: u16,
    pub max_io_bytes: u32,
    /// TRIM's unit (the region size); 0: no discard.
    pub discard_granularity: u64,
    /// Payload bytes all requests in flight may hold together.
    pub buffer_budget: usize,
    /// Bound on every wait for the driver: start, recovery, stop.
    pub timeout: Duration,
    /// Measurement only (docs/decisions.md, ublk): carry each request out on
    /// the next engine thread instead of the queue's own, as a design with
    /// queue threads apart from the engine threads would.
    pub hop: bool,
}

impl Options {
    pub fn new(id: DeviceId, owner_tag: u64) -> Options {
        Options {
            id,
            owner_tag,
            queue_depth: params::DEFAULT_QUEUE_DEPTH,
            max_io_bytes: params::DEFAULT_MAX_IO_BYTES,
            discard_granularity: 64 << 10,
            buffer_budget: 256 << 20,
            timeout: Duration::from_secs(30),
            hop: false,
        }
    }
}

/// A device this process serves.
pub struct UblkDevice {
    id: u32,
    shared: Arc<Shared>,
    features: u64,
    recovered: bool,
    queues: u16,
    depth: u16,
    timeout: Duration,
}

const FLAGS: u64 = sys::F_USER_RECOVERY | sys::F_USER_RECOVERY_REISSUE | sys::F_USER_COPY | sys::F_CMD_IOCTL_ENCODE;

fn control() -> Result<Control> {
    Control::open().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NoDriver,
        _ => Error::io(format!("cannot open {}", sys::CONTROL_PATH), e),
    })
}

/// The driver's features, or why they are not enough.
fn check_features(ctrl: &Control) -> Result<u64> {
    let f = ctrl.features().map_err(|e| Error::io("cannot ask the ublk driver for its features", e))?;
    let need = [(sys::F_USER_COPY, "user copy"), (sys::F_USER_RECOVERY_REISSUE, "user recovery with reissue")];
    let missing: Vec<&str> = need.iter().filter(|(bit, _)| f & bit == 0).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return Err(Error::Unsupported(format!(
            "this kernel's ublk driver lacks {} (Linux 6.5 or later has it)",
            missing.join(" and ")
        )));
    }
    Ok(f)
}

/// Checks that the driver is loaded and has what livemirror needs; returns its
/// features. Cheap: for a daemon to fail before it listens.
pub fn probe() -> Result<u64> {
    check_features(&control()?)
}

fn ours(info: &DevInfo, tag: u64) -> bool {
    info.ublksrv_flags == tag
}

/// True while `pid` is a process that has not exited (a zombie has).
fn running(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

fn open_char(id: u32, deadline: Instant) -> Result<OwnedFd> {
    let path = sys::char_path(id);
    loop {
        match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f.into()),
            // devtmpfs makes the node during ADD_DEV; a /dev run by udev alone may lag.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(Error::io(format!("cannot open {path}"), e)),
        }
    }
}

fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl UblkDevice {
    /// Makes the device `opts.id` asks for, or takes over this daemon's
    /// device when one exists (same owner tag): the restart of a daemon that
    /// was killed or left its device for the next one.
    pub fn start<D: BlockDevice>(dev: Arc<D>, workers: &[Arc<Worker>], opts: &Options) -> Result<UblkDevice> {
        let ctrl = control()?;
        let features = check_features(&ctrl)?;
        let existing = match opts.id {
            DeviceId::Number(n) => match ctrl.info(n) {
                Ok(info) if ours(&info, opts.owner_tag) => Some(info),
                Ok(info) => {
                    return Err(Error::Refused(format!(
                        "{} exists and was not made by this daemon (its server: pid {}); choose another number or auto",
                        sys::block_path(n),
                        info.ublksrv_pid
                    )))
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
                Err(e) => return Err(Error::io(format!("cannot look at {}", sys::block_path(n)), e)),
            },
            DeviceId::Auto => {
                ctrl::device_ids().into_iter().filter_map(|id| ctrl.info(id).ok()).find(|i| ours(i, opts.owner_tag))
            }
        };
        match existing {
            Some(info) if info.state == sys::S_DEV_DEAD => {
                // Made but never started (its server died during the start), or
                // stopped: nothing waits on it. Make it again, same number.
                tracing::info!("{} was left unstarted; making it again", sys::block_path(info.dev_id));
                remove_stale(&ctrl, info.dev_id, opts.timeout)?;
                create(&ctrl, dev, workers, opts, features, info.dev_id)
            }
            Some(info) => take_over(&ctrl, dev, workers, opts, features, info),
            None => {
                let id = match opts.id {
                    DeviceId::Number(n) => n,
                    DeviceId::Auto => u32::MAX,
                };
                create(&ctrl, dev, workers, opts, features, id)
            }
        }
    }

    /// Takes over device `id`, whoever made it: the seam for handing a running
    /// device from one livemirror process to the next (`livemirror upgrade`).
    /// The previous server must have exited or be exiting (it left the device,
    /// or died); its I/O waits meanwhile and none of it fails.
    pub fn recover<D: BlockDevice>(
        id: u32,
        dev: Arc<D>,
        workers: &[Arc<Worker>],
        opts: &Options,
    ) -> Result<UblkDevice> {
        let ctrl = control()?;
        let features = check_features(&ctrl)?;
        let info = ctrl.info(id).map_err(|e| Error::io(format!("cannot look at {}", sys::block_path(id)), e))?;
        take_over(&ctrl, dev, workers, opts, features, info)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(sys::block_path(self.id))
    }

    /// True when this process took the device over from a previous server.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    pub fn queues(&self) -> (u16, u16) {
        (self.queues, self.depth)
    }

    /// Requests served since start.
    pub fn served(&self) -> u64 {
        self.shared.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the driver can change the size of a live device (UPDATE_SIZE,
    /// Linux 6.16).
    pub fn can_resize(&self) -> bool {
        self.features & sys::F_UPDATE_SIZE != 0
    }

    /// Shows `bytes` (its whole sectors) as the device's size.
    pub fn resize(&self, bytes: u64) -> Result<()> {
        self.resizer().resize(bytes)
    }

    /// A handle that resizes this device from another thread.
    pub fn resizer(&self) -> Resizer {
        Resizer { id: self.id, can: self.can_resize() }
    }

    /// The clean stop: removes the device. Requests in flight are served to
    /// the end, queued ones fail (the kernel's users should have flushed and
    /// unmounted), the queues end, then the device is deleted.
    pub fn remove(self) -> Result<()> {
        let ctrl = control()?;
        let stopped = ctrl.stop(self.id).map_err(|e| Error::io(format!("cannot stop {}", self.path().display()), e));
        let deadline = Instant::now() + self.timeout;
        if !wait_until(deadline, || self.shared.alive() == 0) {
            tracing::warn!("{}: {} queue tasks did not end", self.path().display(), self.shared.alive());
        }
        self.shared.close();
        stopped?;
        ctrl.delete(self.id).map_err(|e| Error::io(format!("cannot delete {}", self.path().display()), e))
    }

    /// Leaves the device for the next server (the root file system's daemon
    /// does this when it stops). Requests already being carried out finish
    /// (at most `limit`); later ones are held by the driver and given to the
    /// next server once this process has exited. The caller flushes the
    /// engine afterwards and exits.
    pub fn leave(self, limit: Duration) {
        self.shared.freeze();
        if !wait_until(Instant::now() + limit, || self.shared.busy() == 0) {
            tracing::warn!(
                "{}: {} requests still running after {} s; the driver gives them to the next server",
                self.path().display(),
                self.shared.busy(),
                limit.as_secs_f64()
            );
        }
        // Dropping self ends the tasks that wait on fetches.
    }
}

impl Drop for UblkDevice {
    /// A device neither removed nor left (a failed start of the daemon) is
    /// left too: its tag tasks end so the engine threads can stop, and the
    /// driver holds its I/O for the next server.
    fn drop(&mut self) {
        self.shared.freeze();
        self.shared.quit();
    }
}

/// Resizes one device (UPDATE_SIZE), from any thread but a queue's.
#[derive(Debug, Clone, Copy)]
pub struct Resizer {
    id: u32,
    can: bool,
}

impl Resizer {
    pub fn resize(&self, bytes: u64) -> Result<()> {
        let path = PathBuf::from(sys::block_path(self.id));
        if !self.can {
            return Err(Error::Refused(resize_refusal(&path)));
        }
        let ctrl = control()?;
        ctrl.update_size(self.id, bytes >> 9)
            .map_err(|e| Error::io(format!("cannot resize {} to {bytes} bytes", path.display()), e))
    }
}

/// What `grow` says where the driver cannot resize a live device.
pub fn resize_refusal(path: &std::path::Path) -> String {
    format!(
        "{} cannot change size while it runs: this kernel's ublk driver has no online resize (UPDATE_SIZE, Linux \
         6.16); the export keeps its size (grow the file system after the next boot instead)",
        path.display()
    )
}

/// Stops and deletes device `id`, which no server serves (a device left by a
/// root storage daemon, or one whose server died and will not come back).
/// I/O still waiting on it fails.
pub fn remove_unserved(id: u32) -> Result<()> {
    let ctrl = control()?;
    let info = ctrl.info(id).map_err(|e| Error::io(format!("cannot look at {}", sys::block_path(id)), e))?;
    if info.state == sys::S_DEV_LIVE && running(info.ublksrv_pid) {
        return Err(Error::Refused(format!(
            "{} is served by pid {}: stop that daemon instead",
            sys::block_path(id),
            info.ublksrv_pid
        )));
    }
    remove_stale(&ctrl, id, Duration::from_secs(30))
}

fn remove_stale(ctrl: &Control, id: u32, timeout: Duration) -> Result<()> {
    let path = sys::block_path(id);
    ctrl.stop(id).map_err(|e| Error::io(format!("cannot stop {path}"), e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match ctrl.delete(id) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            // A dying server may still hold its character device a moment.
            Err(e) if Instant::now() < deadline && e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(Error::io(format!("cannot delete {path}"), e)),
        }
    }
}

/// Starts serving every queue of the device on the engine threads (queue q on
/// thread q mod n: one thread per queue for the queue's whole life), and
/// waits until each has started or one failed.
fn serve_queues<D: BlockDevice>(
    dev: &Arc<D>,
    workers: &[Arc<Worker>],
    shared: &Arc<Shared>,
    opts: &Options,
    queues: u16,
    depth: u16,
) -> Result<()> {
    if workers.is_empty() {
        return Err(Error::Refused("no engine threads to serve the queues on".into()));
    }
    let pool = BufPool::new(opts.buffer_budget.max(opts.max_io_bytes as usize));
    for q in 0..queues {
        let (dev, pool, shared) = (dev.clone(), pool.clone(), shared.clone());
        let home = q as usize % workers.len();
        let hop = opts.hop.then(|| workers[(home + 1) % workers.len()].clone());
        workers[home]
            .run(move || async move { queue::start(dev, pool, shared, q, depth, hop) })
            .map_err(|e| Error::io(format!("cannot start queue {q}"), e))?;
    }
    let want = queues as usize * depth as usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    let started = wait_until(deadline, || shared.alive() >= want || shared.failure().is_some());
    if let Some(f) = shared.failure() {
        return Err(Error::Refused(f));
    }
    if !started {
        return Err(Error::Refused(format!(
            "the queues did not start within 10 s ({} of {want} tags)",
            shared.alive()
        )));
    }
    Ok(())
}

/// Undoes a start that failed after ADD_DEV: the fetches end, the device goes.
fn abandon(ctrl: &Control, id: u32, shared: Option<&Arc<Shared>>, timeout: Duration) {
    let _ = ctrl.stop(id);
    if let Some(s) = shared {
        wait_until(Instant::now() + timeout, || s.alive() == 0);
        s.close();
    }
    if let Err(e) = ctrl.delete(id) {
        tracing::warn!("cannot delete {} after a failed start: {e}", sys::block_path(id));
    }
}

fn create<D: BlockDevice>(
    ctrl: &Control,
    dev: Arc<D>,
    workers: &[Arc<Worker>],
    opts: &Options,
    features: u64,
    id: u32,
) -> Result<UblkDevice> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut info = DevInfo {
        nr_hw_queues: params::queue_count(workers.len(), cpus),
        queue_depth: opts.queue_depth.clamp(1, params::MAX_QUEUE_DEPTH),
        max_io_buf_bytes: opts.max_io_bytes,
        dev_id: id,
        flags: FLAGS,
        ublksrv_flags: opts.owner_tag,
        ..Default::default()
    };
    ctrl.add(&mut info).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST) => Error::Refused(format!("{} already exists", sys::block_path(id))),
        _ => Error::io("cannot add a ublk device", e),
    })?;
    let id = info.dev_id;
    let geometry = Geometry {
        size: dev.size(),
        io_alignment: dev.io_alignment(),
        discard_granularity: opts.discard_granularity,
        read_only: dev.read_only(),
        max_io_bytes: info.max_io_buf_bytes,
    };
    if let Err(e) = ctrl.set_params(id, &geometry.params()) {
        abandon(ctrl, id, None, opts.timeout);
        return Err(Error::io(format!("cannot set the parameters of {}", sys::block_path(id)), e));
    }
    let deadline = Instant::now() + opts.timeout;
    let shared = match open_char(id, deadline) {
        Ok(fd) => Arc::new(Shared::new(fd)),
        Err(e) => {
            abandon(ctrl, id, None, opts.timeout);
            return Err(e);
        }
    };
    let started = serve_queues(&dev, workers, &shared, opts, info.nr_hw_queues, info.queue_depth).and_then(|()| {
        ctrl.start(id, std::process::id() as i32, opts.timeout)
            .map_err(|e| Error::io(format!("cannot start {}", sys::block_path(id)), e))
    });
    if let Err(e) = started {
        abandon(ctrl, id, Some(&shared), opts.timeout);
        return Err(e);
    }
    Ok(UblkDevice {
        id,
        shared,
        features,
        recovered: false,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        timeout: opts.timeout,
    })
}

fn take_over<D: BlockDevice>(
    ctrl: &Control,
    dev: Arc<D>,
    workers: &[Arc<Worker>],
    opts: &Options,
    features: u64,
    info: DevInfo,
) -> Result<UblkDevice> {
    let id = info.dev_id;
    let path = sys::block_path(id);
    if info.flags & sys::F_USER_RECOVERY == 0 {
        return Err(Error::Refused(format!("{path} was made without user recovery: it cannot be taken over")));
    }
    let shown = ctrl.params(id).map_err(|e| Error::io(format!("cannot read the parameters of {path}"), e))?;
    let shown_bytes = shown.basic.dev_sectors << 9;
    if dev.size() >> 9 < shown.basic.dev_sectors {
        return Err(Error::Refused(format!(
            "the export ({} bytes) is smaller than {path} ({shown_bytes} bytes): not taking it over",
            dev.size()
        )));
    }
    // The previous server's exit makes the driver quiesce the device (its
    // fetches are cancelled, what it held is requeued); wait for that.
    let deadline = Instant::now() + opts.timeout;
    let mut last = info;
    let quiesced = wait_until(deadline, || {
        if let Ok(i) = ctrl.info(id) {
            last = i;
        }
        last.state == sys::S_DEV_QUIESCED
    });
    if !quiesced {
        return Err(Error::Refused(if running(last.ublksrv_pid) {
            format!("{path} is served by pid {}", last.ublksrv_pid)
        } else {
            format!("{path} did not become free within {} s (state {})", opts.timeout.as_secs(), last.state)
        }));
    }
    let mut begun = Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    // EBUSY while the previous server's character device is still open.
    wait_until(deadline, || {
        begun = ctrl.start_recovery(id);
        !matches!(&begun, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
    });
    begun.map_err(|e| Error::io(format!("cannot begin the recovery of {path}"), e))?;
    let shared = Arc::new(Shared::new(open_char(id, deadline)?));
    serve_queues(&dev, workers, &shared, opts, last.nr_hw_queues, last.queue_depth)?;
    ctrl.end_recovery(id, std::process::id() as i32, opts.timeout)
        .map_err(|e| Error::io(format!("cannot end the recovery of {path}"), e))?;
    let device = UblkDevice {
        id,
        shared,
        features,
        recovered: true,
        queues: last.nr_hw_queues,
        depth: last.queue_depth,
        timeout: opts.timeout,
    };
    if dev.size() >> 9 > shown.basic.dev_sectors {
        if device.can_resize() {
            device.resize(dev.size())?;
        } else {
            tracing::warn!(
                "{path} stays at {shown_bytes} bytes (the export has {}): {}",
                dev.size(),
                resize_refusal(&device.path())
            );
        }
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_parse_as_the_cli_writes_them() {
        assert_eq!("auto".parse::<DeviceId>(), Ok(DeviceId::Auto));
        assert_eq!("0".parse::<DeviceId>(), Ok(DeviceId::Number(0)));
        assert_eq!("/dev/ublkb12".parse::<DeviceId>(), Ok(DeviceId::Number(12)));
        assert!("ublkb1".parse::<DeviceId>().unwrap_err().contains("expected auto"));
        assert!("-1".parse::<DeviceId>().is_err());
        assert!("99999999".parse::<DeviceId>().is_err(), "more than the driver's 2^20 minors");
    }

    #[test]
    fn a_zombie_or_a_missing_process_is_not_running() {
        assert!(!running(0));
        assert!(!running(std::process::id() as i32), "ourselves: never a previous server");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not reaped: a zombie.
        wait_until(Instant::now() + Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z"))
        });
        assert!(!running(pid));
        child.wait().unwrap();
        assert!(!running(pid));
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(running(sleeper.id() as i32));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
