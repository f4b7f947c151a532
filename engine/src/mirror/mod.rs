//! The mirror device: what NBD clients read and write, and what the control
//! commands change. One concern per file:
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | the device, its construction, the event log |
//! | `lifecycle.rs` | state changes: attach, synced, failover, detach, grow, pause, shutdown |
//! | `health.rs` | devices that shrink under us, checked in every state |
//! | `write.rs` | WRITE, WRITE_ZEROES and FLUSH, as named phases; the failover policy |
//! | `read.rs` | READ, CACHE and BLOCK_STATUS |
//! | `discard.rs` | TRIM |
//! | `status.rs` | the status report |
//! | `kernel_device.rs` | the kernel block device in front of the export |
//!
//! Which device serves a request is [`crate::route`]'s; which state changes are
//! legal is [`crate::state`]'s. The copier and the journal reach the device only
//! through the narrow traits this module implements for them
//! ([`crate::copier::CopyOwner`], [`crate::journal::JournalHost`]).

mod discard;
mod health;
mod kernel_device;
mod lifecycle;
mod read;
mod snapshot;
mod status;
mod write;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{oneshot, watch};

use crate::backend::{Backend, CacheMode, DeviceOpener, LocalOpener};
use crate::buf::BufPool;
use crate::copier::CopierCtl;
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::locks::RangeLocks;
use crate::ratelimit::Foreground;
use crate::regions::{validate_region_size, Bits, RegionMap, SharedMap, DEFAULT_REGION_SIZE};
use crate::route::{Route, Target};
use crate::state::DeviceState;
use crate::status::{Event, EventKind};
use crate::sync::lock;

pub use kernel_device::KernelDevice;
pub use read::StatusExtent;

/// Copier I/Os in flight by default (see [`crate::copier::chunk_for`]).
pub const DEFAULT_QUEUE_DEPTH: usize = 16;

/// Events a slow subscriber may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 1024;
/// Events kept for `status`.
const EVENT_LOG: usize = 64;

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
    /// Opens the devices named to `attach` and at start (local paths by
    /// default; the binary adds NBD URIs).
    pub opener: Opener,
}

/// The [`DeviceOpener`] a device uses.
#[derive(Clone)]
pub struct Opener(pub Arc<dyn DeviceOpener>);

impl Default for Opener {
    fn default() -> Self {
        Opener(Arc::new(LocalOpener))
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener")
    }
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
            opener: Opener::default(),
        }
    }
}

/// The current route and the signal that fires when its last holder is gone.
struct RouteSlot {
    current: Arc<Route>,
    drained: Option<oneshot::Receiver<()>>,
}

pub struct Mirror {
    pub(crate) cfg: MirrorConfig,
    shift: u32,
    /// Protected by its mutex; replaced only by `change_route` (lifecycle.rs).
    route: Mutex<RouteSlot>,
    pub(crate) map: Arc<SharedMap>,
    pub(crate) locks: RangeLocks,
    /// The export size; grows only in source-detached (accessed with atomics).
    size: AtomicU64,
    size_tx: watch::Sender<u64>,
    /// Serialises state changes (attach, detach, synced, ...) for their whole run.
    transition: tokio::sync::Mutex<()>,
    /// Serialises persisting and installing routes (see lifecycle.rs).
    state_lock: tokio::sync::Mutex<()>,
    pub(crate) copier: Arc<CopierCtl>,
    pub(crate) fg: Arc<Foreground>,
    pub(crate) pool: BufPool,
    events: Mutex<Vec<Event>>,
    events_tx: tokio::sync::broadcast::Sender<Event>,
    source_path: Mutex<Option<PathBuf>>,
    target_path: Mutex<Option<PathBuf>>,
    last_error: Mutex<Option<String>>,
    pub(crate) journal: Option<Arc<Journal>>,
    #[cfg(feature = "testing")]
    target_hooks: Mutex<Option<Arc<dyn crate::backend::IoHooks>>>,
    #[cfg(feature = "testing")]
    target_forced_align: AtomicU64,
    /// `/dev/nbdN` or `/dev/ublkbN` in front of the export (kernel_device.rs).
    kernel_device: Mutex<Option<KernelDevice>>,
    shutting_down: AtomicBool,
    copier_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The starting point of a device.
pub(crate) struct Parts {
    pub state: DeviceState,
    pub source: Option<Backend>,
    pub target: Option<Backend>,
    pub export_size: u64,
    /// Clean, discarded and unverifiable bitmaps (resume).
    pub bitmaps: Option<(Bits, Bits, Bits)>,
    pub journal: Option<Journal>,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
            check_alignment(b, cfg.region_size)?;
        }
        let Parts { state, source, target, export_size, bitmaps, journal } = parts;
        let mut map = RegionMap::new(export_size, shift);
        if let Some((clean, discarded, unverifiable)) = bitmaps {
            map.load(clean, discarded, unverifiable).map_err(Error::Internal)?;
        }
        let (route, drained) = Route::new(state, source.map(Arc::new), target.map(Target::new));
        let m = Arc::new(Mirror {
            shift,
            route: Mutex::new(RouteSlot { current: route, drained: Some(drained) }),
            map: Arc::new(SharedMap::new(map)),
            locks: RangeLocks::new(),
            size: AtomicU64::new(export_size),
            size_tx: watch::channel(export_size).0,
            transition: tokio::sync::Mutex::new(()),
            state_lock: tokio::sync::Mutex::new(()),
            copier: Arc::new(CopierCtl::new(cfg.max_rate, cfg.min_rate)),
            fg: Arc::new(Foreground::default()),
            pool: BufPool::new(256 << 20),
            events: Mutex::new(Vec::new()),
            events_tx: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
            source_path: Mutex::new(None),
            target_path: Mutex::new(None),
            last_error: Mutex::new(None),
            journal: journal.map(Arc::new),
            #[cfg(feature = "testing")]
            target_hooks: Mutex::new(None),
            #[cfg(feature = "testing")]
            target_forced_align: AtomicU64::new(1),
            kernel_device: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            copier_thread: Mutex::new(None),
            cfg,
        });
        let r = m.route();
        *lock(&m.source_path) = r.source.as_ref().map(|s| s.path().to_path_buf());
        *lock(&m.target_path) = r.target.as_ref().map(|t| t.backend.path().to_path_buf());
        if let Some(j) = &m.journal {
            let host: Arc<dyn crate::journal::JournalHost> = m.clone();
            j.start(Arc::downgrade(&host))?;
        }
        if let Some(o) = r.source.as_ref().and_then(|s| s.overlay()) {
            // The overlay's space notices become events (held weakly: the
            // overlay lives inside the device).
            let weak = Arc::downgrade(&m);
            let path = o.overlay_path().display().to_string();
            o.set_notifier(Box::new(move |n| {
                if let Some(m) = weak.upgrade() {
                    m.log_event(EventKind::Overlay, n.message(&path));
                }
            }));
        }
        m.start_watchdog()?;
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

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

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

    /// The largest transfer alignment the attached devices need (1: any);
    /// smaller or unaligned requests are served by read-modify-write.
    pub fn io_alignment(&self) -> u64 {
        self.route().max_align()
    }

    /// True when zeroing is cheaper than writing zeroes on every attached device.
    pub fn fast_zero(&self) -> bool {
        let r = self.route();
        r.source.iter().all(|s| s.zeroing_is_fast()) && r.target.iter().all(|t| t.backend.zeroing_is_fast())
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

    /// Logs `message` and records it as an event of `kind` (status, `events`).
    pub fn log_event(&self, kind: EventKind, message: String) {
        match kind {
            EventKind::Error => tracing::error!("{message}"),
            EventKind::Overlay => tracing::warn!("{message}"),
            _ => tracing::info!("{message}"),
        }
        let e = Event { unix_time: now_unix(), kind, state: self.state(), message };
        let mut ev = lock(&self.events);
        if ev.len() >= EVENT_LOG {
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

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
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
        if self.is_shutting_down() {
            return Err(Error::Shutdown);
        }
        Ok(())
    }
}

#[cfg(feature = "testing")]
impl Mirror {
    /// Installs hooks on every target attached from now on (tests).
    pub fn set_target_hooks(&self, hooks: Option<Arc<dyn crate::backend::IoHooks>>) {
        *lock(&self.target_hooks) = hooks;
    }

    /// Makes every target attached from now on demand aligned I/O (tests of
    /// read-modify-write on plain files).
    pub fn set_target_forced_alignment(&self, align: u64) {
        self.target_forced_align.store(align, Ordering::Relaxed);
    }
}

/// A device whose I/O alignment exceeds the region size could not be written
/// region by region.
fn check_alignment(b: &Backend, region_size: u64) -> Result<()> {
    if b.alignment() > region_size {
        return Err(Error::InvalidConfig(format!(
            "{} needs {}-byte aligned I/O, more than the {region_size}-byte region size",
            b.path().display(),
            b.alignment()
        )));
    }
    Ok(())
}

impl crate::journal::JournalHost for Mirror {
    fn marks(&self) -> (Bits, Bits) {
        let map = self.map.lock();
        (map.discarded_bits().clone(), map.unverifiable_bits().clone())
    }

    fn route(&self) -> Arc<Route> {
        Mirror::route(self)
    }
}

/// Polls every future concurrently on this task (no spawning, no allocation per
/// poll beyond the vector).
pub(crate) async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    if futs.len() == 1 {
        // The common case (one target run): no pinning on the heap.
        let mut out = Vec::with_capacity(1);
        for f in futs {
            out.push(f.await);
        }
        return out;
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
    out.into_iter().flatten().collect()
}
