//! The mirror device: what NBD clients read and write.
//!
//! Routing lives in an immutable [`Route`] (state + which devices exist). Every
//! request takes a snapshot of the route *after* it holds its range lock and keeps
//! it until it completes. A state change installs a new route and then waits until
//! every holder of the old one is gone: that is the barrier semantics.md asks for
//! ("takes effect only after every request that chose its legs under the old
//! state has completed").
//!
//! Dropping the target after a failure cannot use that barrier (the failing write
//! itself holds the old route), so the target has its own gate: readers register
//! before reading it and re-check that it is still usable; the failure path marks
//! it unusable and waits for registered readers to drain before the failing write
//! is acknowledged.

use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch, Notify};

use crate::backend::{Backend, CacheMode, IoHooks, LockMode as DevLock, OpenOptions};
use crate::buf::{BufPool, IoBuf, SharedBuf};
use crate::error::{Error, Result};
use crate::locks::{LockMode, RangeGuard, RangeLocks};
use crate::persist::Journal;
use crate::ratelimit::{Foreground, RateLimiter, RateMeter};
use crate::regions::{validate_region_size, RegionMap, DEFAULT_REGION_SIZE};
use crate::stacking;
use crate::status::{DeviceState, Status};

/// How often every device's size is compared with the export's.
const SIZE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Copier I/Os in flight by default (see [`crate::copier::chunk_for`]).
pub const DEFAULT_QUEUE_DEPTH: usize = 16;

/// Tunables of a mirror device.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub region_size: u64,
    /// Copier I/Os in flight.
    pub queue_depth: usize,
    /// Copier rate limit in bytes/s (0 = unlimited).
    pub max_rate: u64,
    /// The copier's floor rate while foreground I/O is active.
    pub min_rate: u64,
    /// Bytes per copier I/O; 0 picks by device (see [`crate::copier::chunk_for`]).
    pub copy_chunk: usize,
    pub read_only: bool,
    pub cache: CacheMode,
    /// Treat all-zero source chunks as zeroes on the target (punch/zero-range).
    pub detect_zeroes: bool,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            region_size: DEFAULT_REGION_SIZE,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_rate: 0,
            min_rate: 32 << 20,
            copy_chunk: 0,
            read_only: false,
            cache: CacheMode::Auto,
            detect_zeroes: true,
        }
    }
}

/// The target device and the gate that lets it be dropped under in-flight reads.
pub(crate) struct Target {
    pub(crate) backend: Backend,
    usable: AtomicBool,
    reads: AtomicUsize,
    reads_done: Notify,
}

impl Target {
    fn new(backend: Backend) -> Arc<Target> {
        Arc::new(Target {
            backend,
            usable: AtomicBool::new(true),
            reads: AtomicUsize::new(0),
            reads_done: Notify::new(),
        })
    }

    /// Registers a read; `None` if the target is being dropped.
    fn begin_read(self: &Arc<Self>) -> Option<TargetRead> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.usable.load(Ordering::SeqCst) {
            Some(TargetRead(self.clone()))
        } else {
            self.end_read();
            None
        }
    }

    fn end_read(&self) {
        if self.reads.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.reads_done.notify_waiters();
        }
    }

    /// Stops new reads and waits for the registered ones.
    async fn close_reads(&self) {
        self.usable.store(false, Ordering::SeqCst);
        loop {
            let notified = self.reads_done.notified();
            if self.reads.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct TargetRead(Arc<Target>);
impl Drop for TargetRead {
    fn drop(&mut self) {
        self.0.end_read();
    }
}

/// Which devices serve which requests. Immutable; replaced on every state change.
pub(crate) struct Route {
    pub(crate) state: DeviceState,
    pub(crate) source: Option<Arc<Backend>>,
    pub(crate) target: Option<Arc<Target>>,
    /// Dropped with the route: wakes the state change waiting for old holders.
    _drained: oneshot::Sender<()>,
}

impl Route {
    fn max_align(&self) -> u64 {
        let s = self.source.as_ref().map_or(1, |s| s.alignment());
        let t = self.target.as_ref().map_or(1, |t| t.backend.alignment());
        s.max(t)
    }
}

struct RouteSlot {
    current: Arc<Route>,
    drained: Option<oneshot::Receiver<()>>,
}

/// Copier control shared between the control commands and the copier thread.
pub(crate) struct CopierCtl {
    pub(crate) paused: AtomicBool,
    pub(crate) limiter: RateLimiter,
    pub(crate) min_rate: AtomicU64,
    pub(crate) wake: Notify,
    pub(crate) running: AtomicBool,
    pub(crate) error: Mutex<Option<String>>,
    pub(crate) bytes_copied: AtomicU64,
    /// Of those, bytes that read as zeroes and were zeroed on T instead of written.
    pub(crate) bytes_zeroed: AtomicU64,
    pub(crate) meter: RateMeter,
    /// Copy spans started and not finished.
    pub(crate) in_flight: AtomicUsize,
    pub(crate) idle: Notify,
}

impl CopierCtl {
    /// Claims a copy slot unless paused (checked after claiming, so `pause`
    /// either sees the claim or the copier sees the pause).
    pub(crate) fn try_begin(&self) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) {
            self.end();
            return false;
        }
        true
    }

    pub(crate) fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let n = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            n.await;
        }
    }
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The device state changed (attached, synced, degraded, ...).
    State,
    /// Something failed (a device error, a stopped copy).
    Error,
    /// Everything else (pause, rate, verify, grow).
    #[default]
    Info,
}

/// One line of the event log shown by `status`, and what `subscribe_events`
/// delivers as it happens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub unix_time: f64,
    #[serde(default)]
    pub kind: EventKind,
    /// The device state right after the event.
    #[serde(default = "serving")]
    pub state: DeviceState,
    pub message: String,
}

fn serving() -> DeviceState {
    DeviceState::Serving
}

/// Events a slow subscriber may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 1024;

pub struct Mirror {
    pub(crate) cfg: MirrorConfig,
    shift: u32,
    route: Mutex<RouteSlot>,
    pub(crate) map: Mutex<RegionMap>,
    pub(crate) locks: RangeLocks,
    size: AtomicU64,
    size_tx: watch::Sender<u64>,
    /// Serialises state changes (attach, detach, synced, ...).
    transition: tokio::sync::Mutex<()>,
    /// Serialises persisting and installing routes (see "transitions").
    state_lock: tokio::sync::Mutex<()>,
    pub(crate) copier: CopierCtl,
    pub(crate) fg: Foreground,
    pub(crate) pool: BufPool,
    events: Mutex<Vec<Event>>,
    events_tx: tokio::sync::broadcast::Sender<Event>,
    source_path: Mutex<Option<PathBuf>>,
    target_path: Mutex<Option<PathBuf>>,
    last_error: Mutex<Option<String>>,
    pub(crate) journal: Option<Journal>,
    target_hooks: Mutex<Option<Arc<dyn IoHooks>>>,
    target_forced_align: AtomicU64,
    shutting_down: AtomicBool,
    copier_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Where a piece of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFrom {
    Source,
    Target,
    Zero,
}

impl Mirror {
    /// Serves `source` alone (state `serving`).
    pub fn new(source: Backend, cfg: MirrorConfig) -> Result<Arc<Mirror>> {
        let export_size = source.size();
        Self::assemble(
            cfg,
            Parts {
                state: DeviceState::Serving,
                source: Some(source),
                target: None,
                export_size,
                bitmaps: None,
                journal: None,
            },
        )
    }

    /// Builds a device in any state (fresh, or resumed from a state file).
    pub(crate) fn assemble(cfg: MirrorConfig, parts: Parts) -> Result<Arc<Mirror>> {
        let shift = validate_region_size(cfg.region_size).map_err(Error::InvalidConfig)?;
        for b in parts.source.iter().chain(parts.target.iter()) {
            if b.alignment() > cfg.region_size {
                return Err(Error::InvalidConfig(format!(
                    "{} needs {}-byte aligned I/O, more than the {}-byte region size",
                    b.path().display(),
                    b.alignment(),
                    cfg.region_size
                )));
            }
        }
        let Parts { state, source, target, export_size, bitmaps, journal } = parts;
        let m = Self::build(cfg, shift, export_size, journal)?;
        if let Some((clean, discarded, unverifiable)) = bitmaps {
            lock(&m.map).load(clean, discarded, unverifiable).map_err(Error::Refused)?;
        }
        *lock(&m.source_path) = source.as_ref().map(|s| s.path().to_path_buf());
        *lock(&m.target_path) = target.as_ref().map(|t| t.path().to_path_buf());
        let (tx, rx) = oneshot::channel();
        *lock(&m.route) = RouteSlot {
            current: Arc::new(Route {
                state,
                source: source.map(Arc::new),
                target: target.map(Target::new),
                _drained: tx,
            }),
            drained: Some(rx),
        };
        if let Some(j) = &m.journal {
            j.start(&m)?;
        }
        m.start_watchdog()?;
        let r = m.route();
        let what = match (&r.source, &r.target) {
            (Some(s), None) => format!("serving {} ({export_size} bytes)", s.path().display()),
            (None, Some(t)) => format!("serving {} alone ({export_size} bytes)", t.backend.path().display()),
            (Some(s), Some(t)) => format!(
                "serving {} mirrored to {} ({export_size} bytes, state {state})",
                s.path().display(),
                t.backend.path().display()
            ),
            (None, None) => "no device".into(),
        };
        drop(r);
        m.event(what);
        Ok(m)
    }

    /// Continues the copy of a resumed device in state `syncing`.
    pub fn resume_copier(self: &Arc<Self>) -> Result<()> {
        let r = self.route();
        if r.state != DeviceState::Syncing {
            return Ok(());
        }
        let Some(t) = r.target.clone() else { return Ok(()) };
        drop(r);
        let (clean, total) = {
            let m = lock(&self.map);
            (m.clean_count(), m.len())
        };
        self.event(format!("resuming the sync: {clean} of {total} regions already clean"));
        self.start_copier(t)
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn build(cfg: MirrorConfig, shift: u32, size: u64, journal: Option<Journal>) -> Result<Arc<Mirror>> {
        let (tx, _rx) = oneshot::channel();
        let (size_tx, _) = watch::channel(size);
        let limiter = RateLimiter::new(cfg.max_rate);
        let min_rate = cfg.min_rate;
        Ok(Arc::new(Mirror {
            shift,
            route: Mutex::new(RouteSlot {
                current: Arc::new(Route { state: DeviceState::Serving, source: None, target: None, _drained: tx }),
                drained: None,
            }),
            map: Mutex::new(RegionMap::new(size, shift)),
            locks: RangeLocks::new(),
            size: AtomicU64::new(size),
            size_tx,
            transition: tokio::sync::Mutex::new(()),
            state_lock: tokio::sync::Mutex::new(()),
            copier: CopierCtl {
                paused: AtomicBool::new(false),
                limiter,
                min_rate: AtomicU64::new(min_rate),
                wake: Notify::new(),
                running: AtomicBool::new(false),
                error: Mutex::new(None),
                bytes_copied: AtomicU64::new(0),
                bytes_zeroed: AtomicU64::new(0),
                meter: RateMeter::new(Duration::from_secs(3)),
                in_flight: AtomicUsize::new(0),
                idle: Notify::new(),
            },
            fg: Foreground::default(),
            pool: BufPool::new(256 << 20),
            events: Mutex::new(Vec::new()),
            events_tx: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
            source_path: Mutex::new(None),
            target_path: Mutex::new(None),
            last_error: Mutex::new(None),
            journal,
            target_hooks: Mutex::new(None),
            target_forced_align: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            copier_thread: Mutex::new(None),
            cfg,
        }))
    }

    // ------------------------------------------------------------------ basics

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Watch the export size (the frontend resizes kernel devices on change).
    pub fn subscribe_size(&self) -> watch::Receiver<u64> {
        self.size_tx.subscribe()
    }

    pub fn read_only(&self) -> bool {
        self.cfg.read_only
    }

    pub fn region_size(&self) -> u64 {
        1 << self.shift
    }

    pub fn config(&self) -> &MirrorConfig {
        &self.cfg
    }

    pub fn state(&self) -> DeviceState {
        self.route().state
    }

    pub(crate) fn route(&self) -> Arc<Route> {
        lock(&self.route).current.clone()
    }

    /// True when every attached device is a regular file (zeroing is then a
    /// metadata operation, i.e. "fast").
    pub fn fast_zero(&self) -> bool {
        let r = self.route();
        r.source.iter().all(|s| s.kind() == crate::backend::BackendKind::File)
            && r.target.iter().all(|t| t.backend.kind() == crate::backend::BackendKind::File)
    }

    pub(crate) fn event(&self, message: String) {
        self.log_event(EventKind::Info, message);
    }

    pub(crate) fn state_event(&self, message: String) {
        self.log_event(EventKind::State, message);
    }

    pub(crate) fn error_event(&self, message: String) {
        self.log_event(EventKind::Error, message);
    }

    fn log_event(&self, kind: EventKind, message: String) {
        match kind {
            EventKind::Error => tracing::error!("{message}"),
            _ => tracing::info!("{message}"),
        }
        let e = Event { unix_time: now_unix(), kind, state: self.state(), message };
        let mut ev = lock(&self.events);
        if ev.len() >= 64 {
            ev.remove(0);
        }
        ev.push(e.clone());
        // Nobody listening is fine.
        let _ = self.events_tx.send(e);
    }

    /// Every event from now on, as it happens (`livemirror events`).
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events_tx.subscribe()
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *lock(&self.last_error) = e;
    }

    /// Installs hooks on every target attached from now on (tests).
    pub fn set_target_hooks(&self, hooks: Option<Arc<dyn IoHooks>>) {
        *lock(&self.target_hooks) = hooks;
    }

    /// Makes every target attached from now on demand aligned I/O (tests of
    /// read-modify-write on plain files).
    pub fn set_target_forced_alignment(&self, align: u64) {
        self.target_forced_align.store(align, Ordering::Relaxed);
    }

    fn check_range(&self, off: u64, len: u64, write: bool) -> Result<()> {
        let size = self.size();
        if off.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset: off, len, size, write });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.cfg.read_only {
            return Err(Error::ReadOnly);
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(Error::Shutdown);
        }
        Ok(())
    }

    // -------------------------------------------------------------- transitions
    //
    // Two locks order state changes:
    // - `transition` (held for a whole command, including barrier waits) makes
    //   commands such as attach and detach-source run one at a time;
    // - `state_lock` (held only to persist and install a route, never across a
    //   barrier) also serialises the failure paths, which run inside requests
    //   that hold the old route and so must never wait for a barrier.
    // A change that makes writes skip a leg is persisted before it is installed,
    // so no write that skipped the leg can be acknowledged before the state file
    // says so.

    /// Persists and installs a new route if `decide` approves of the current one.
    /// Returns the old route's drain signal, or `None` if nothing changed.
    async fn change_route(
        &self,
        decide: impl FnOnce(&Route) -> Option<(DeviceState, Option<Arc<Backend>>, Option<Arc<Target>>)>,
    ) -> Result<Option<oneshot::Receiver<()>>> {
        let _s = self.state_lock.lock().await;
        let current = self.route();
        let Some((state, source, target)) = decide(&current) else { return Ok(None) };
        drop(current);
        if let Some(j) = &self.journal {
            j.set_state(state, source.as_deref(), target.as_ref().map(|t| &t.backend));
            j.persist().await?;
        }
        let mut slot = lock(&self.route);
        let (tx, rx) = oneshot::channel();
        slot.current = Arc::new(Route { state, source, target, _drained: tx });
        Ok(Some(slot.drained.replace(rx).unwrap_or_else(|| oneshot::channel().1)))
    }

    /// Waits until every request that took the old route has completed.
    async fn barrier(rx: Option<oneshot::Receiver<()>>) {
        if let Some(rx) = rx {
            // Resolves (with an error) when the old route's sender is dropped.
            let _ = rx.await;
        }
    }

    /// Hot-adds `path` as the target and starts the sync.
    pub async fn attach(self: &Arc<Self>, path: &Path) -> Result<()> {
        self.attach_as(path, None).await
    }

    /// Like [`Mirror::attach`], resolving `path` as process `viewer` sees it (the
    /// control client), which matters once the daemon's root is stale.
    pub async fn attach_as(self: &Arc<Self>, path: &Path, viewer: Option<u32>) -> Result<()> {
        let _t = self.transition.lock().await;
        let route = self.route();
        match route.state {
            DeviceState::Serving | DeviceState::Degraded => {}
            s => return Err(Error::Refused(format!("a target is already attached (state {s}); detach-target first"))),
        }
        let Some(source) = route.source.clone() else {
            return Err(Error::Refused("no source to copy from".into()));
        };
        drop(route);
        // A copier of a failed target may still be winding down with it open.
        self.join_copier().await;
        let target = self.open_target(path, viewer, &source)?;
        let tsize = target.size();
        self.check_target_fits(&target, tsize)?;
        let target = Target::new(target);
        {
            let mut map = lock(&self.map);
            map.set_all_dirty();
            map.clear_unverifiable();
        }
        if let Some(j) = &self.journal {
            j.reset_clean();
        }
        self.copier.bytes_copied.store(0, Ordering::Relaxed);
        self.copier.bytes_zeroed.store(0, Ordering::Relaxed);
        self.copier.meter.reset();
        *lock(&self.copier.error) = None;
        self.copier.paused.store(false, Ordering::SeqCst);
        self.set_error(None);
        let t2 = target.clone();
        let rx = self
            .change_route(move |old| {
                matches!(old.state, DeviceState::Serving | DeviceState::Degraded)
                    .then(|| (DeviceState::Syncing, old.source.clone(), Some(t2)))
            })
            .await?;
        if rx.is_none() {
            return Err(Error::Refused("the state changed while attaching; try again".into()));
        }
        Self::barrier(rx).await;
        *lock(&self.target_path) = Some(path.to_path_buf());
        self.state_event(format!("attached target {} ({} bytes); sync started", path.display(), tsize));
        self.start_copier(target)?;
        Ok(())
    }

    pub(crate) fn open_target(&self, path: &Path, viewer: Option<u32>, source: &Backend) -> Result<Backend> {
        // Before opening: our own exclusive lock on S would otherwise make S
        // look "in use by another process".
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Ok(meta) = std::fs::metadata(crate::hostfs::locate(&abs, viewer)) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let s = source.identity();
            let same = (meta.dev(), meta.ino()) == (s.dev, s.ino)
                || (meta.file_type().is_block_device() && Some(meta.rdev()) == s.rdev);
            if same {
                return Err(Error::Refused(format!(
                    "refusing target {}: it is the source itself (source {})",
                    path.display(),
                    source.path().display()
                )));
            }
        }
        let opts = OpenOptions { writable: true, cache: self.cfg.cache, lock: DevLock::Fail };
        let t = Backend::open_as(path, viewer, &opts)?;
        stacking::check_target_is_independent(source, &t)?;
        self.prepare_target(t)
    }

    /// Applies test hooks and checks alignment of a freshly opened target.
    pub(crate) fn prepare_target(&self, mut t: Backend) -> Result<Backend> {
        let forced = self.target_forced_align.load(Ordering::Relaxed);
        if forced > 1 {
            t = t.with_forced_alignment(forced);
        }
        if let Some(h) = lock(&self.target_hooks).clone() {
            t = t.with_hooks(h);
        }
        if t.alignment() > self.region_size() {
            return Err(Error::InvalidConfig(format!(
                "{} needs {}-byte aligned I/O, more than the {}-byte region size",
                t.path().display(),
                t.alignment(),
                self.region_size()
            )));
        }
        Ok(t)
    }

    pub(crate) fn check_target_fits(&self, t: &Backend, tsize: u64) -> Result<()> {
        let esize = self.size();
        if tsize < esize {
            return Err(Error::Refused(format!(
                "target {} is too small: {} bytes, but the export is {} bytes",
                t.path().display(),
                tsize,
                esize
            )));
        }
        Ok(())
    }

    /// Waits until the copier thread (if any) has exited.
    async fn join_copier(&self) {
        let handle = lock(&self.copier_thread).take();
        if let Some(h) = handle {
            // It exits at its next step once its target is no longer the route's.
            self.copier.wake.notify_waiters();
            if tokio::task::spawn_blocking(move || h.join()).await.is_err() {
                tracing::error!("the copier thread could not be joined");
            }
        }
    }

    pub(crate) fn start_copier(self: &Arc<Self>, target: Arc<Target>) -> Result<()> {
        const COPIER_NICE: libc::c_int = 10;
        let m = self.clone();
        let mut slot = lock(&self.copier_thread);
        if let Some(old) = slot.take() {
            // A previous copier exits as soon as it sees that its target is no
            // longer the route's; it holds no locks by then.
            if !old.is_finished() {
                let _ = old.join();
            }
        }
        self.copier.running.store(true, Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name("livemirror-copier".into())
            .spawn(move || {
                // Background work: when the CPU is contended the I/O threads
                // should get it first. The copier keeps a share (CFS never
                // starves a niced thread), and its rate floor still applies.
                // SAFETY: setpriority on this thread's own id.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, COPIER_NICE) } != 0 {
                    tracing::debug!("cannot lower the copier's priority: {}", std::io::Error::last_os_error());
                }
                let res = crate::rt::block_on(crate::copier::run(m.clone(), target));
                if let Err(e) = res {
                    m.set_error(Some(format!("copier could not start: {e}")));
                }
                m.copier.running.store(false, Ordering::SeqCst);
            })
            .map_err(|e| Error::io("cannot start the copier thread", e))?;
        *slot = Some(handle);
        Ok(())
    }

    /// Called by the copier when nothing is dirty: flush T, then `synced`.
    pub(crate) async fn finish_sync(&self, target: &Arc<Target>) -> Result<bool> {
        let _t = self.transition.lock().await;
        let is_ours =
            |r: &Route| r.state == DeviceState::Syncing && r.target.as_ref().is_some_and(|t| Arc::ptr_eq(t, target));
        if !is_ours(&self.route()) || !lock(&self.map).all_clean() {
            return Ok(false);
        }
        // A target that shrank under the copy holds less than the export.
        if !self.check_device_sizes().await {
            return Ok(false);
        }
        if let Err(e) = target.backend.flush().await {
            self.fail_target(target, format!("target flush failed: {e}")).await;
            return Ok(false);
        }
        if let Some(j) = &self.journal {
            j.mark_all_clean_durable(self);
        }
        let rx = self
            .change_route(|r| is_ours(r).then(|| (DeviceState::Synced, r.source.clone(), r.target.clone())))
            .await?;
        if rx.is_none() {
            return Ok(false);
        }
        Self::barrier(rx).await;
        self.state_event("synced: every region is on the target; reads now come from it".into());
        Ok(true)
    }

    /// Drops the failed target: `degraded`. Returns once no read can reach it.
    pub(crate) async fn fail_target(&self, target: &Arc<Target>, reason: String) {
        // New reads avoid T from here on; registered ones are awaited below.
        target.usable.store(false, Ordering::SeqCst);
        let changed = self
            .change_route(|r| {
                r.target
                    .as_ref()
                    .is_some_and(|t| Arc::ptr_eq(t, target))
                    .then(|| (DeviceState::Degraded, r.source.clone(), None))
            })
            .await;
        target.close_reads().await;
        match changed {
            Ok(Some(_)) => {
                self.set_error(Some(reason.clone()));
                self.copier.wake.notify_waiters();
                self.state_event(format!("degraded: target dropped after an error: {reason}"));
            }
            Ok(None) => {}
            Err(e) => {
                // The route did not change; the target stays marked unusable for
                // reads and every later write keeps failing over to here.
                tracing::error!("cannot persist the degraded state: {e}");
                self.set_error(Some(format!("{reason}; and the state could not be persisted: {e}")));
            }
        }
    }

    /// Drops the failed source while synced: `source-detached`. True when the
    /// source is gone (by this call or an earlier one).
    async fn fail_source(&self, source: &Arc<Backend>, reason: String) -> bool {
        let changed = self
            .change_route(|r| {
                (r.state == DeviceState::Synced && r.source.as_ref().is_some_and(|s| Arc::ptr_eq(s, source)))
                    .then(|| (DeviceState::SourceDetached, None, r.target.clone()))
            })
            .await;
        match changed {
            Ok(Some(_)) => {
                *lock(&self.source_path) = None;
                self.set_error(Some(reason.clone()));
                self.state_event(format!("source-detached: source dropped after an error: {reason}"));
                true
            }
            Ok(None) => self.route().source.is_none(),
            Err(e) => {
                tracing::error!("cannot persist the source-detached state: {e}");
                false
            }
        }
    }

    /// Releases the source: only from `synced`. Afterwards S is closed.
    pub async fn detach_source(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        let source = self.route().source.clone();
        // The target must still hold the whole export before the source goes.
        if self.state() == DeviceState::Synced && !self.check_device_sizes().await {
            return Err(Error::Refused(format!(
                "detach-source refused: {}",
                lock(&self.last_error).clone().unwrap_or_else(|| "a device is shorter than the export".into())
            )));
        }
        let rx = self
            .change_route(|r| {
                (r.state == DeviceState::Synced).then(|| (DeviceState::SourceDetached, None, r.target.clone()))
            })
            .await?;
        if rx.is_none() {
            let st = self.state();
            let (clean, total) = {
                let m = lock(&self.map);
                (m.clean_count(), m.len())
            };
            return Err(Error::Refused(format!(
                "detach-source needs state synced, but the state is {st} ({clean} of {total} regions clean)"
            )));
        }
        Self::barrier(rx).await;
        if let Some(s) = source {
            release(s, "the detached source").await;
        }
        let path = lock(&self.source_path).take();
        self.state_event(format!(
            "source detached: {} closed; serving from the target alone",
            path.map(|p| p.display().to_string()).unwrap_or_default()
        ));
        Ok(())
    }

    /// Cancels a sync or drops the target: back to `serving`.
    pub async fn detach_target(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        let target = self.route().target.clone();
        if let Some(j) = &self.journal {
            j.reset_clean();
        }
        let rx = self
            .change_route(|r| {
                matches!(r.state, DeviceState::Syncing | DeviceState::Synced | DeviceState::Degraded)
                    .then(|| (DeviceState::Serving, r.source.clone(), None))
            })
            .await?;
        if rx.is_none() {
            return Err(Error::Refused(format!("detach-target is not possible in state {}", self.state())));
        }
        if let Some(t) = &target {
            t.usable.store(false, Ordering::SeqCst);
        }
        self.copier.wake.notify_waiters();
        Self::barrier(rx).await;
        if let Some(t) = &target {
            t.close_reads().await;
        }
        // Done means T is closed: a re-attach right after must not find our own
        // exclusive lock on it (the copier still held it).
        self.join_copier().await;
        if let Some(t) = target {
            release(t, "the detached target").await;
        }
        lock(&self.map).set_all_dirty();
        let path = lock(&self.target_path).take();
        self.set_error(None);
        *lock(&self.copier.error) = None;
        self.state_event(format!(
            "target {} detached; serving from the source alone",
            path.map(|p| p.display().to_string()).unwrap_or_default()
        ));
        Ok(())
    }

    /// Grows the export after `detach-source` to the target's size or `new_size`.
    pub async fn grow(&self, new_size: Option<u64>) -> Result<u64> {
        let _t = self.transition.lock().await;
        let route = self.route();
        if route.state != DeviceState::SourceDetached {
            return Err(Error::Refused(format!(
                "grow is only possible after detach-source (state is {})",
                route.state
            )));
        }
        let Some(t) = route.target.clone() else {
            return Err(Error::Refused("no target to grow onto".into()));
        };
        let tsize = t
            .backend
            .current_size()
            .map_err(|e| Error::io(format!("cannot read the size of {}", t.backend.path().display()), e))?;
        let cur = self.size();
        let want = new_size.unwrap_or(tsize);
        if want < cur {
            return Err(Error::Refused(format!("grow never shrinks: {want} is less than the current {cur} bytes")));
        }
        if want > tsize {
            return Err(Error::Refused(format!("cannot grow to {want} bytes: the target holds only {tsize}")));
        }
        if want == cur {
            return Ok(cur);
        }
        lock(&self.map).grow(want);
        if let Some(j) = &self.journal {
            let _s = self.state_lock.lock().await;
            j.set_export_size(want);
            j.persist().await?;
        }
        self.size.store(want, Ordering::Release);
        self.size_tx.send_replace(want);
        self.event(format!("export grown from {cur} to {want} bytes"));
        Ok(want)
    }

    /// Pauses the copy; returns once no copy I/O is in flight any more.
    pub async fn pause(&self) -> Result<()> {
        let st = self.state();
        if st != DeviceState::Syncing {
            return Err(Error::Refused(format!("nothing to pause: state is {st}")));
        }
        self.copier.paused.store(true, Ordering::SeqCst);
        self.copier.wait_idle().await;
        self.event("copy paused".into());
        Ok(())
    }

    pub fn resume(&self) -> Result<()> {
        let st = self.state();
        if st != DeviceState::Syncing {
            return Err(Error::Refused(format!("nothing to resume: state is {st}")));
        }
        self.copier.paused.store(false, Ordering::SeqCst);
        *lock(&self.copier.error) = None;
        self.set_error(None);
        self.copier.wake.notify_waiters();
        self.event("copy resumed".into());
        Ok(())
    }

    pub fn set_rate(&self, rate: u64) {
        self.copier.limiter.set_rate(rate);
        self.copier.wake.notify_waiters();
        self.event(if rate == 0 {
            "copy rate unlimited".into()
        } else {
            format!("copy rate limited to {rate} bytes/s")
        });
    }

    pub fn set_min_rate(&self, rate: u64) {
        self.copier.min_rate.store(rate, Ordering::Relaxed);
    }

    // ------------------------------------------------------------------- status

    pub fn status(&self) -> Status {
        let route = self.route();
        let (total, clean, discarded, unverifiable, region_size) = {
            let m = lock(&self.map);
            (m.len() as u64, m.clean_count(), m.discarded_count(), m.unverifiable_count(), m.region_size())
        };
        let copier_error = lock(&self.copier.error).clone();
        let error = copier_error.or_else(|| lock(&self.last_error).clone());
        let rate = self.copier.meter.rate();
        let syncing = route.state == DeviceState::Syncing;
        let remaining = if syncing { (total - clean) * region_size } else { 0 };
        let paused = self.copier.paused.load(Ordering::Relaxed) && syncing;
        // A paused copy has no ETA, and no rate: it is not copying.
        let eta = if !syncing || paused {
            None
        } else if remaining == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some(remaining as f64 / rate)
        } else {
            None
        };
        Status {
            state: route.state,
            paused,
            export_size: self.size(),
            source: route.source.as_ref().map(|s| s.path().display().to_string()),
            target: route.target.as_ref().map(|t| t.backend.path().display().to_string()),
            region_size,
            regions_total: total,
            regions_clean: clean,
            bytes_copied: self.copier.bytes_copied.load(Ordering::Relaxed),
            bytes_written_as_zeroes: self.copier.bytes_zeroed.load(Ordering::Relaxed),
            detect_zeroes: self.cfg.detect_zeroes,
            copy_rate_bytes_per_sec: if syncing && !paused { rate } else { 0.0 },
            eta_seconds: eta,
            error,
            regions_discarded: discarded,
            regions_unverifiable: unverifiable,
            max_rate: self.copier.limiter.rate(),
            copier_running: self.copier.running.load(Ordering::Relaxed),
            events: self.events(),
        }
    }

    // ----------------------------------------------------------------- requests

    /// Takes the range lock a write needs and the route to use under it.
    async fn lock_for_write(&self, off: u64, len: u64) -> (RangeGuard, Arc<Route>, bool) {
        loop {
            let route = self.route();
            let align = route.max_align();
            let (touches_discard, region_span) = {
                let m = lock(&self.map);
                let rs = m.regions_touching(off, len);
                let d = !rs.is_empty() && m.any_discarded(rs.clone());
                (d, m.bytes_of(rs))
            };
            let rmw = align > 1 && (!off.is_multiple_of(align) || !len.is_multiple_of(align));
            let (range, mode) = if touches_discard {
                (region_span, LockMode::Exclusive)
            } else if rmw {
                (off - off % align..(off + len).div_ceil(align) * align, LockMode::Exclusive)
            } else {
                (off..off + len, LockMode::Shared)
            };
            drop(route);
            let guard = self.locks.lock(range, mode).await;
            let route = self.route();
            let still_ok = route.max_align() <= align && {
                if mode == LockMode::Exclusive && touches_discard {
                    true
                } else {
                    let m = lock(&self.map);
                    let rs = m.regions_touching(off, len);
                    rs.is_empty() || !m.any_discarded(rs)
                }
            };
            if still_ok {
                return (guard, route, touches_discard);
            }
        }
    }

    /// Writes `data` at `off`. Acknowledged (returns) when every leg completed.
    pub async fn write(&self, off: u64, data: IoBuf, fua: bool) -> Result<()> {
        self.check_writable()?;
        let len = data.len() as u64;
        self.check_range(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let _fg = self.fg.begin();
        let (_guard, route, discard_fix) = self.lock_for_write(off, len).await;
        let data = SharedBuf::new(data);
        self.write_locked(&route, off, len, Payload::Data(&data), fua, discard_fix).await
    }

    /// Writes zeroes (NBD WRITE_ZEROES). `may_unmap` allows a hole.
    pub async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len, true)?;
        if len == 0 {
            return Ok(());
        }
        let _fg = self.fg.begin();
        let (_guard, route, discard_fix) = self.lock_for_write(off, len).await;
        self.write_locked(&route, off, len, Payload::Zeroes { may_unmap }, fua, discard_fix).await
    }

    async fn write_locked(
        &self,
        route: &Arc<Route>,
        off: u64,
        len: u64,
        payload: Payload<'_>,
        fua: bool,
        discard_fix: bool,
    ) -> Result<()> {
        let (to_source, target_runs) = self.legs(route, off, len);
        if discard_fix {
            self.clear_discards(route, off, len).await?;
        }
        let intent = match (&self.journal, target_runs.is_empty() || route.source.is_none()) {
            (Some(j), false) => Some(j.begin_write(self, off, len).await?),
            _ => None,
        };
        let source_leg = async {
            match (to_source, &route.source) {
                (true, Some(s)) => payload.apply(s, 0, off, len, fua).await.map_err(|e| (s.clone(), e)),
                _ => Ok(()),
            }
        };
        let target_legs = async {
            let Some(t) = &route.target else { return Ok(()) };
            let mut futs = Vec::with_capacity(target_runs.len());
            for r in &target_runs {
                futs.push(payload.apply(&t.backend, r.start - off, r.start, r.end - r.start, fua));
            }
            for res in join_all(futs).await {
                res.map_err(|e| (t.clone(), e))?;
            }
            Ok(())
        };
        let (s_res, t_res) = tokio::join!(source_leg, target_legs);
        if let Some(i) = intent {
            i.finish(self);
        }
        if let Err((t, e)) = &t_res {
            if route.source.is_some() {
                self.fail_target(t, format!("target write failed at offset {off}: {e}")).await;
            } else {
                return Err(Error::io(
                    format!("write to {} at offset {off} failed", t.backend.path().display()),
                    clone_io(e),
                ));
            }
        }
        if let Err((s, e)) = s_res {
            // Synced and the target took the write: drop the source, not the write.
            if route.state == DeviceState::Synced
                && t_res.is_ok()
                && self.fail_source(&s, format!("source write failed at offset {off}: {e}")).await
            {
                return Ok(());
            }
            return Err(Error::io(format!("write to {} at offset {off} failed", s.path().display()), e));
        }
        if !target_runs.is_empty() && route.source.is_some() {
            self.clear_unverifiable_covered(off, len);
        }
        Ok(())
    }

    /// Decides the legs of a write under its lock: whether S gets it, and which
    /// byte runs go to T.
    fn legs(&self, route: &Route, off: u64, len: u64) -> (bool, Vec<Range<u64>>) {
        match route.state {
            DeviceState::Serving | DeviceState::Degraded => (true, Vec::new()),
            DeviceState::Syncing => (true, lock(&self.map).clean_byte_runs(off, len)),
            DeviceState::Synced => (true, std::iter::once(off..off + len).collect()),
            DeviceState::SourceDetached => (false, std::iter::once(off..off + len).collect()),
        }
    }

    /// A write into discarded regions: those regions read as zeroes until now, so
    /// the parts the write does not cover must read as zeroes afterwards too.
    /// The caller holds the regions exclusively.
    async fn clear_discards(&self, route: &Route, off: u64, len: u64) -> Result<()> {
        let regions: Vec<(usize, Range<u64>)> = {
            let m = lock(&self.map);
            m.regions_touching(off, len).filter(|&r| m.is_discarded(r)).map(|r| (r, m.byte_range(r))).collect()
        };
        let end = off + len;
        if let Some(s) = &route.source {
            for (_, br) in &regions {
                if br.start < off {
                    s.write_zeroes(br.start, off - br.start, false, false)
                        .await
                        .map_err(|e| Error::io(format!("zeroing a discarded region of {}", s.path().display()), e))?;
                }
                if end < br.end {
                    s.write_zeroes(end, br.end - end, false, false)
                        .await
                        .map_err(|e| Error::io(format!("zeroing a discarded region of {}", s.path().display()), e))?;
                }
            }
        }
        let mut m = lock(&self.map);
        for (r, _) in regions {
            m.set_discarded(r..r + 1, false);
        }
        Ok(())
    }

    fn clear_unverifiable_covered(&self, off: u64, len: u64) {
        let mut m = lock(&self.map);
        let covered = m.regions_covered(off, len);
        if !covered.is_empty() && m.any_unverifiable(covered.clone()) {
            m.set_unverifiable(covered, false);
        }
    }

    /// Reads `buf.len()` bytes at `off` into `buf`.
    pub async fn read(&self, off: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(off, len, false) {
            return (Err(e), buf);
        }
        if len == 0 {
            return (Ok(()), buf);
        }
        let _fg = self.fg.begin();
        let route = self.route();
        let plan = self.read_plan(&route, off, len);
        let shared = SharedBuf::new(buf);
        let res = self.read_planned(&route, &shared, off, &plan).await;
        match SharedBuf::into_inner(shared) {
            Ok(buf) => (res, buf),
            // Every op holding a clone has completed by now; this cannot happen,
            // but never hand out a buffer the kernel may still write.
            Err(_) => (Err(Error::Internal("read buffer still shared".into())), IoBuf::new(len as usize)),
        }
    }

    fn read_plan(&self, route: &Route, off: u64, len: u64) -> Vec<(Range<u64>, ReadFrom)> {
        let end = off + len;
        let m = lock(&self.map);
        let mut out: Vec<(Range<u64>, ReadFrom)> = Vec::new();
        let any_discard = m.discarded_count() > 0;
        let single = match route.state {
            DeviceState::Synced | DeviceState::SourceDetached => Some(ReadFrom::Target),
            DeviceState::Serving | DeviceState::Degraded if !any_discard => Some(ReadFrom::Source),
            _ => None,
        };
        if let Some(from) = single {
            out.push((off..end, from));
            return out;
        }
        for r in m.regions_touching(off, len) {
            let br = m.byte_range(r);
            let piece = br.start.max(off)..br.end.min(end);
            let from = match route.state {
                _ if any_discard && m.is_discarded(r) => ReadFrom::Zero,
                DeviceState::Syncing if m.is_clean(r) => ReadFrom::Target,
                _ => ReadFrom::Source,
            };
            match out.last_mut() {
                Some((last, f)) if *f == from && last.end == piece.start => last.end = piece.end,
                _ => out.push((piece, from)),
            }
        }
        out
    }

    async fn read_planned(
        &self,
        route: &Arc<Route>,
        buf: &Arc<SharedBuf>,
        off: u64,
        plan: &[(Range<u64>, ReadFrom)],
    ) -> Result<()> {
        let mut futs = Vec::with_capacity(plan.len());
        for (range, from) in plan {
            futs.push(self.read_piece(route, buf, off, range.clone(), *from));
        }
        for r in join_all(futs).await {
            r?;
        }
        Ok(())
    }

    async fn read_piece(
        &self,
        route: &Arc<Route>,
        buf: &Arc<SharedBuf>,
        base: u64,
        range: Range<u64>,
        from: ReadFrom,
    ) -> Result<()> {
        let boff = (range.start - base) as usize;
        let blen = (range.end - range.start) as usize;
        match from {
            ReadFrom::Zero => {
                // SAFETY: pieces of one read are disjoint ranges of `buf`.
                unsafe { buf.slice_mut(boff, blen) }.fill(0);
                Ok(())
            }
            ReadFrom::Target => {
                if let Some(t) = &route.target {
                    // The registration must be gone before failing over: dropping
                    // the target waits for every registered read, ours included.
                    let res = match t.begin_read() {
                        Some(reg) => {
                            let r = t.backend.read_at(buf, boff, blen, range.start).await;
                            drop(reg);
                            Some(r)
                        }
                        None => None,
                    };
                    match res {
                        Some(Ok(())) => return Ok(()),
                        Some(Err(e)) if route.source.is_some() => {
                            self.fail_target(t, format!("target read failed at offset {}: {e}", range.start)).await;
                        }
                        Some(Err(e)) => {
                            let what =
                                format!("read from {} at offset {} failed", t.backend.path().display(), range.start);
                            return Err(Error::io(what, e));
                        }
                        None => {}
                    }
                }
                // The target is gone (or just failed): the source has every byte.
                self.read_source(route, buf, boff, blen, range.start).await
            }
            ReadFrom::Source => self.read_source(route, buf, boff, blen, range.start).await,
        }
    }

    async fn read_source(&self, route: &Route, buf: &Arc<SharedBuf>, boff: usize, blen: usize, off: u64) -> Result<()> {
        let Some(s) = &route.source else {
            return Err(Error::Internal("no device to read from".into()));
        };
        s.read_at(buf, boff, blen, off)
            .await
            .map_err(|e| Error::io(format!("read from {} at offset {off} failed", s.path().display()), e))
    }

    /// Makes every acknowledged write durable on every attached device.
    pub async fn flush(&self) -> Result<()> {
        let _fg = self.fg.begin();
        let route = self.route();
        let flush_seq = self.journal.as_ref().map(|j| j.flush_begin());
        let s_fut = async {
            match &route.source {
                Some(s) => s.flush().await.map_err(|e| (s.clone(), e)),
                None => Ok(()),
            }
        };
        let t_fut = async {
            match &route.target {
                Some(t) => t.backend.flush().await.map_err(|e| (t.clone(), e)),
                None => Ok(()),
            }
        };
        let (s_res, t_res) = tokio::join!(s_fut, t_fut);
        if let Err((t, e)) = &t_res {
            if route.source.is_some() {
                self.fail_target(t, format!("target flush failed: {e}")).await;
            } else {
                return Err(Error::io(format!("flush of {} failed", t.backend.path().display()), clone_io(e)));
            }
        }
        if let Err((s, e)) = s_res {
            if route.state == DeviceState::Synced
                && t_res.is_ok()
                && self.fail_source(&s, format!("source flush failed: {e}")).await
            {
                return Ok(());
            }
            return Err(Error::io(format!("flush of {} failed", s.path().display()), e));
        }
        if let (Some(j), Some(seq)) = (&self.journal, flush_seq) {
            if route.source.is_some() && route.target.is_some() {
                j.flush_done(seq);
            }
        }
        Ok(())
    }

    /// NBD TRIM: a hint. Only regions wholly covered are acted on; see
    /// semantics.md ("Discard and zeroes").
    pub async fn trim(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len, true)?;
        let covered = lock(&self.map).regions_covered(off, len);
        if covered.is_empty() {
            return Ok(());
        }
        let _fg = self.fg.begin();
        let range = lock(&self.map).bytes_of(covered.clone());
        let _guard = self.locks.lock(range.clone(), LockMode::Exclusive).await;
        let route = self.route();
        let rlen = range.end - range.start;
        if let Some(s) = &route.source {
            if let Err(e) = s.discard(range.start, rlen).await {
                tracing::debug!("discard on {} ignored: {e}", s.path().display());
            }
        }
        match route.state {
            DeviceState::Serving | DeviceState::Degraded => {
                let mut m = lock(&self.map);
                m.set_discarded(covered, true);
            }
            DeviceState::Syncing | DeviceState::Synced => {
                let Some(t) = &route.target else { return Ok(()) };
                let (dirty, clean): (Vec<usize>, Vec<usize>) = {
                    let m = lock(&self.map);
                    covered.clone().partition(|&r| !m.is_clean(r))
                };
                // Dirty regions become clean without a copy: zero T there so the
                // trimmed range reads the same before and after the switch.
                for run in runs(&dirty) {
                    let br = lock(&self.map).bytes_of(run.clone());
                    if let Err(e) = t.backend.write_zeroes(br.start, br.end - br.start, true, false).await {
                        self.fail_target(t, format!("target zeroing failed at offset {}: {e}", br.start)).await;
                        return Ok(());
                    }
                    let mut m = lock(&self.map);
                    m.set_clean(run.clone(), true);
                    m.set_unverifiable(run.clone(), true);
                    m.set_discarded(run.clone(), false);
                    drop(m);
                    if let Some(j) = &self.journal {
                        j.note_cleaned(run);
                    }
                }
                for run in runs(&clean) {
                    let br = lock(&self.map).bytes_of(run.clone());
                    if let Err(e) = t.backend.discard(br.start, br.end - br.start).await {
                        tracing::debug!("discard on {} ignored: {e}", t.backend.path().display());
                    }
                    lock(&self.map).set_unverifiable(run, true);
                }
                if let Some(j) = &self.journal {
                    j.mark_dirty_meta();
                }
                self.copier.wake.notify_waiters();
            }
            DeviceState::SourceDetached => {
                if let Some(t) = &route.target {
                    if let Err(e) = t.backend.discard(range.start, rlen).await {
                        tracing::debug!("discard on {} ignored: {e}", t.backend.path().display());
                    }
                }
            }
        }
        Ok(())
    }

    /// NBD CACHE: prefetch into the page cache where there is one.
    pub async fn cache(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len, false)?;
        let route = self.route();
        let res = match (&route.state, &route.source, &route.target) {
            (DeviceState::Synced | DeviceState::SourceDetached, _, Some(t)) => t.backend.prefetch(off, len).await,
            (_, Some(s), _) => s.prefetch(off, len).await,
            _ => Ok(()),
        };
        res.map_err(|e| Error::io("prefetch failed", e))
    }

    /// Allocation status for NBD `base:allocation`: (length, hole, zero) extents
    /// starting at `off`, at most `max` of them.
    pub async fn block_status(&self, off: u64, len: u64, max: usize) -> Result<Vec<StatusExtent>> {
        self.check_range(off, len, false)?;
        let route = self.route();
        let end = off + len;
        // Classify by region first (discarded: zero; unverifiable: unknown),
        // then ask the device for the rest.
        let pieces: Vec<(Range<u64>, Option<StatusExtent>)> = {
            let m = lock(&self.map);
            let mut out: Vec<(Range<u64>, Option<StatusExtent>)> = Vec::new();
            let fixed_any = m.discarded_count() > 0 || m.unverifiable_count() > 0;
            for r in m.regions_touching(off, len) {
                let br = m.byte_range(r);
                let piece = br.start.max(off)..br.end.min(end);
                let fixed = if !fixed_any {
                    None
                } else if m.is_discarded(r) && route.target.is_none() {
                    Some(StatusExtent { len: 0, hole: true, zero: true })
                } else if m.is_unverifiable(r) && route.state != DeviceState::SourceDetached {
                    Some(StatusExtent { len: 0, hole: false, zero: false })
                } else {
                    None
                };
                if !fixed_any {
                    out.push((off..end, None));
                    break;
                }
                match out.last_mut() {
                    Some((last, f)) if *f == fixed && last.end == piece.start => last.end = piece.end,
                    _ => out.push((piece, fixed)),
                }
            }
            out
        };
        let dev: Option<&Backend> = match route.state {
            DeviceState::Synced | DeviceState::SourceDetached => route.target.as_ref().map(|t| &t.backend),
            _ => route.source.as_deref(),
        };
        let mut out: Vec<StatusExtent> = Vec::new();
        for (range, fixed) in pieces {
            if out.len() >= max {
                break;
            }
            match (fixed, dev) {
                (Some(f), _) => push_extent(&mut out, StatusExtent { len: range.end - range.start, ..f }),
                (None, Some(d)) => {
                    let exts = d
                        .allocation(range.start, range.end - range.start, max - out.len())
                        .map_err(|e| Error::io(format!("allocation query on {}", d.path().display()), e))?;
                    let mut covered = 0;
                    for e in exts {
                        covered += e.len;
                        push_extent(&mut out, StatusExtent { len: e.len, hole: e.hole, zero: e.hole });
                    }
                    if covered < range.end - range.start {
                        break; // the device stopped early; the client asks again
                    }
                }
                (None, None) => {
                    push_extent(&mut out, StatusExtent { len: range.end - range.start, hole: false, zero: false })
                }
            }
        }
        out.truncate(max.max(1));
        Ok(out)
    }

    // ----------------------------------------------------------------- shutdown

    /// Stops the copier, flushes every device and persists the state. Requests
    /// must have drained before this is called.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.copier.wake.notify_waiters();
        let handle = lock(&self.copier_thread).take();
        if let Some(h) = handle {
            // The copier sees `shutting_down` at its next step and returns after
            // its in-flight copies complete.
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let route = self.route();
        let flush_seq = self.journal.as_ref().map(|j| j.flush_begin());
        if let Some(s) = &route.source {
            s.flush().await.map_err(|e| Error::io(format!("final flush of {}", s.path().display()), e))?;
        }
        if let Some(t) = &route.target {
            t.backend
                .flush()
                .await
                .map_err(|e| Error::io(format!("final flush of {}", t.backend.path().display()), e))?;
        }
        if let (Some(j), Some(seq)) = (&self.journal, flush_seq) {
            j.flush_done(seq);
            j.stop().await?;
        }
        Ok(())
    }

    /// Checks that every attached device still holds the whole export. A device
    /// that became shorter (a truncated file, a shrunk volume) has failed: the
    /// target is dropped (`degraded`), the source too when the target has every
    /// byte (`synced` → `source-detached`); otherwise the error is recorded and
    /// reads past the device's end fail with EIO. True when every device fits.
    pub(crate) async fn check_device_sizes(&self) -> bool {
        let route = self.route();
        let export = self.size();
        let short = |b: &Backend| match b.current_size() {
            Ok(n) if n >= export => None,
            Ok(n) => Some(format!("{} is now {n} bytes, shorter than the {export}-byte export", b.path().display())),
            Err(e) => Some(format!("cannot read the size of {}: {e}", b.path().display())),
        };
        let mut fits = true;
        let mut target_ok = true;
        if let Some(t) = &route.target {
            if let Some(why) = short(&t.backend) {
                fits = false;
                target_ok = false;
                if route.source.is_some() {
                    self.fail_target(t, format!("target failed: {why}")).await;
                } else {
                    self.record_fault(format!("target failed: {why}"));
                }
            }
        }
        if let Some(src) = &route.source {
            if let Some(why) = short(src) {
                fits = false;
                if !(route.state == DeviceState::Synced
                    && target_ok
                    && self.fail_source(src, format!("source failed: {why}")).await)
                {
                    self.record_fault(format!("source failed: {why}"));
                }
            }
        }
        fits
    }

    /// Records a device fault in status and the event log, once per distinct fault.
    fn record_fault(&self, why: String) {
        let mut last = lock(&self.last_error);
        if last.as_deref() != Some(why.as_str()) {
            *last = Some(why.clone());
            drop(last);
            self.error_event(why);
        }
    }

    /// Starts the thread that checks the devices' sizes once a second, in every
    /// state (a device can be truncated while nothing reads it).
    fn start_watchdog(self: &Arc<Self>) -> Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("livemirror-watch".into())
            .spawn(move || {
                let res = crate::rt::block_on(async move {
                    loop {
                        tokio::time::sleep(SIZE_CHECK_INTERVAL).await;
                        let Some(m) = weak.upgrade() else { return };
                        if m.is_shutting_down() {
                            return;
                        }
                        m.check_device_sizes().await;
                    }
                });
                if let Err(e) = res {
                    tracing::error!("the device size watchdog could not start: {e}");
                }
            })
            .map_err(|e| Error::io("cannot start the device watchdog thread", e))?;
        Ok(())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub(crate) fn copier_should_stop(&self, target: &Arc<Target>) -> bool {
        if self.shutting_down.load(Ordering::Relaxed) {
            return true;
        }
        let r = self.route();
        !(r.state == DeviceState::Syncing && r.target.as_ref().is_some_and(|t| Arc::ptr_eq(t, target)))
    }
}

/// Drops `dev` once nothing else holds it, so its file descriptor (and its
/// exclusive lock) is closed when this returns. Holders are requests of the old
/// route (gone after the barrier) and short-lived checks; 10 s is far beyond
/// them.
async fn release<T>(dev: Arc<T>, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&dev) > 1 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("{what} is still in use after 10 s; it is closed when the last user finishes");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The starting point of a device.
pub(crate) struct Parts {
    pub state: DeviceState,
    pub source: Option<Backend>,
    pub target: Option<Backend>,
    pub export_size: u64,
    /// Clean, discarded and unverifiable bitmaps (resume).
    pub bitmaps: Option<(crate::regions::Bits, crate::regions::Bits, crate::regions::Bits)>,
    pub journal: Option<Journal>,
}

/// One allocation extent reported to NBD clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u64,
    pub hole: bool,
    pub zero: bool,
}

fn push_extent(out: &mut Vec<StatusExtent>, e: StatusExtent) {
    if e.len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += e.len,
        _ => out.push(e),
    }
}

/// Contiguous runs of sorted region indexes.
fn runs(regions: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &r in regions {
        match out.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => out.push(r..r + 1),
        }
    }
    out
}

fn clone_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// What a write puts on each leg.
enum Payload<'a> {
    Data(&'a Arc<SharedBuf>),
    Zeroes { may_unmap: bool },
}

impl Payload<'_> {
    async fn apply(&self, dev: &Backend, buf_off: u64, off: u64, len: u64, fua: bool) -> std::io::Result<()> {
        match self {
            Payload::Data(b) => dev.write_at(b, buf_off as usize, len as usize, off, fua).await,
            Payload::Zeroes { may_unmap } => dev.write_zeroes(off, len, *may_unmap, fua).await,
        }
    }
}

/// Polls every future concurrently on this task (no spawning, no allocation per
/// poll beyond the vector).
pub(crate) async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    if futs.len() == 1 {
        let mut futs = futs;
        let f = futs.pop().expect("one future");
        return vec![f.await];
    }
    let mut futs: Vec<_> = futs.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        out[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future completed")).collect()
}
