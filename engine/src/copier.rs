//! The copier: walks the dirty regions in ascending order and copies them from
//! the source to the target, on its own thread and io_uring.
//!
//! Contiguous dirty regions are batched into spans. A span is locked
//! exclusively (writers to it wait; fair locks keep it from starving), copied in
//! chunks, and marked clean before the lock is released, so a write that waited
//! for the span goes to both devices. Rate tokens are taken before the lock, so a
//! slow rate limit never holds writers up.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::backend::Backend;
use crate::buf::{BufPool, SharedBuf};
use crate::drain::{Drain, DrainGuard};
use crate::journal::Journal;
use crate::locks::{LockMode, RangeLocks};
use crate::ratelimit::{Foreground, RateLimiter, RateMeter};
use crate::regions::SharedMap;
use crate::route::{Route, Target};
use crate::status::EventKind;
use crate::sync::lock;

const SOURCE_READ_ATTEMPTS: u32 = 3;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What the copier needs from the device that owns it (and nothing more).
pub(crate) trait CopyOwner: Send + Sync + 'static {
    /// The route now. A span holds it while it copies: state changes wait for that.
    fn route(&self) -> Arc<Route>;
    fn shutting_down(&self) -> bool;
    fn export_size(&self) -> u64;
    /// Drops the failed target (`degraded`).
    fn fail_target<'a>(&'a self, target: &'a Arc<Target>, reason: String) -> BoxFuture<'a, ()>;
    /// Nothing is dirty: flush T and enter `synced`. False if the state moved on.
    fn finish_sync<'a>(&'a self, target: &'a Arc<Target>) -> BoxFuture<'a, crate::error::Result<bool>>;
    /// Checks every device still holds the export; false (and failed over) if not.
    fn check_device_sizes(&self) -> BoxFuture<'_, bool>;
    fn event(&self, kind: EventKind, message: String);
}

/// The copier's control block, shared with the control commands.
pub(crate) struct CopierCtl {
    /// Copy spans in flight. Closed while paused: a span either entered before
    /// the pause (and `pause` waits for it) or sees the pause and does not start.
    spans: Arc<Drain>,
    pub(crate) limiter: RateLimiter,
    pub(crate) min_rate: AtomicU64,
    pub(crate) wake: Notify,
    pub(crate) running: AtomicBool,
    /// Why the copy stopped (a source read error), until `resume`.
    pub(crate) error: Mutex<Option<String>>,
    pub(crate) bytes_copied: AtomicU64,
    /// Of those, bytes that read as zeroes and were zeroed on T instead of written.
    pub(crate) bytes_zeroed: AtomicU64,
    pub(crate) meter: RateMeter,
}

impl CopierCtl {
    pub(crate) fn new(max_rate: u64, min_rate: u64) -> CopierCtl {
        CopierCtl {
            spans: Drain::new(),
            limiter: RateLimiter::new(max_rate),
            min_rate: AtomicU64::new(min_rate),
            wake: Notify::new(),
            running: AtomicBool::new(false),
            error: Mutex::new(None),
            bytes_copied: AtomicU64::new(0),
            bytes_zeroed: AtomicU64::new(0),
            meter: RateMeter::new(Duration::from_secs(3)),
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.spans.is_closed()
    }

    /// Stops starting spans and waits for those in flight.
    pub(crate) async fn pause(&self) {
        self.spans.close();
        self.spans.wait_idle().await;
    }

    /// Paused from the start (a restart of a paused copy): nothing is in flight.
    pub(crate) fn close_for_pause(&self) {
        self.spans.close();
    }

    pub(crate) fn unpause(&self) {
        // The rate is measured afresh: the pause is not part of it.
        self.meter.reset();
        self.spans.reopen();
        self.wake.notify_waiters();
    }

    fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    fn set_error(&self, e: String) {
        *lock(&self.error) = Some(e);
    }

    /// A fresh sync: counters and errors start over, not paused.
    pub(crate) fn reset(&self) {
        self.bytes_copied.store(0, Ordering::Relaxed);
        self.bytes_zeroed.store(0, Ordering::Relaxed);
        self.meter.reset();
        *lock(&self.error) = None;
        self.spans.reopen();
    }
}

/// Everything one copy job works with: a narrow handle, not the whole device.
pub(crate) struct CopyJob {
    pub(crate) owner: Arc<dyn CopyOwner>,
    pub(crate) map: Arc<SharedMap>,
    pub(crate) locks: RangeLocks,
    pub(crate) pool: BufPool,
    pub(crate) journal: Option<Arc<Journal>>,
    pub(crate) ctl: Arc<CopierCtl>,
    pub(crate) fg: Arc<Foreground>,
    pub(crate) target: Arc<Target>,
    pub(crate) region_size: u64,
    pub(crate) queue_depth: usize,
    /// Configured piece size (0: by device, [`chunk_for`]).
    pub(crate) copy_chunk: usize,
    pub(crate) detect_zeroes: bool,
}

impl CopyJob {
    fn should_stop(&self) -> bool {
        self.owner.shutting_down() || !self.owner.route().is_syncing_to(&self.target)
    }

    fn link_down(&self) -> bool {
        self.target.backend.is_reconnecting() || self.owner.route().source.as_ref().is_some_and(|s| s.is_reconnecting())
    }
}

/// True if every byte is zero (vectorises well: 64-byte blocks OR-folded).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The rate the copier may use now (0 = unlimited), or `None` when it must
/// wait: with clients busy it runs at the floor (never above the limit), and a
/// floor of 0 means no floor at all: the copy yields to busy clients entirely
/// (md's `sync_speed_min` of 0).
fn rate_now(max: u64, floor: u64, clients_busy: bool) -> Option<u64> {
    match (clients_busy, floor, max) {
        (false, _, max) => Some(max),
        (true, 0, _) => None,
        (true, floor, 0) => Some(floor),
        (true, floor, max) => Some(max.min(floor)),
    }
}

/// Waits for a wake-up (state change, resume, set-rate) or `timeout`.
async fn nap(job: &CopyJob, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, job.ctl.wake.notified()).await;
}

/// Copier I/O size when none is configured: 2 MiB on disks (with the default
/// depth of 16, 32 MiB in flight, which this kind of disk rewards), 1 MiB for
/// files in RAM (the largest copy done with plain syscalls). The measurements
/// are in docs/decisions.md; client latency is kept by [`BUSY_CHUNK`].
pub(crate) fn chunk_for(configured: usize, source: &Backend, target: &Backend) -> u64 {
    match configured {
        0 if source.in_memory() || target.in_memory() => 1 << 20,
        0 => 2 << 20,
        n => n as u64,
    }
}

/// Copier I/O size while clients are busy: the copier runs at its floor rate
/// then, so smaller pieces cost no throughput, and a client write that meets a
/// copy in flight waits for less (docs/decisions.md).
const BUSY_CHUNK: u64 = 64 << 10;

/// The I/O size for the next span: the configured one when the copier has
/// the devices to itself, at most [`BUSY_CHUNK`] while clients are busy.
fn chunk_now(clients_busy: bool, idle_chunk: u64) -> u64 {
    if clients_busy {
        idle_chunk.min(BUSY_CHUNK)
    } else {
        idle_chunk
    }
}

/// Copies every dirty region onto the job's target until the sync is done,
/// the target is dropped, or the daemon stops.
pub(crate) async fn run(job: Arc<CopyJob>) {
    let region = job.region_size;
    let idle_chunk = match job.owner.route().source.as_deref() {
        Some(s) => chunk_for(job.copy_chunk, s, &job.target.backend),
        None => chunk_for(job.copy_chunk, &job.target.backend, &job.target.backend),
    };
    let qd = job.queue_depth.max(1);
    let slots = Arc::new(Semaphore::new(qd));
    let mut cursor = 0usize;
    loop {
        if job.should_stop() {
            break;
        }
        if job.ctl.is_paused() || job.ctl.error().is_some() || job.link_down() {
            // A remote device reconnecting is waited for, not failed: the copy
            // goes on once its link is back (or the device gives up and fails).
            nap(&job, Duration::from_millis(200)).await;
            continue;
        }
        let chunk = chunk_now(job.fg.is_active(), idle_chunk);
        let span_regions = (chunk.max(region) / region).max(1) as usize;
        let next = {
            let map = job.map.lock();
            map.next_dirty_run(cursor, span_regions).map(|run| (map.bytes_of(run.clone()), run))
        };
        let Some((bytes, run)) = next else {
            // End of a pass: let in-flight spans land before looking again.
            let all = slots.clone().acquire_many_owned(qd as u32).await;
            drop(all);
            if cursor != 0 {
                cursor = 0;
                continue;
            }
            if job.map.lock().all_clean() {
                match job.owner.finish_sync(&job.target).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => job.ctl.set_error(format!("cannot record the synced state: {e}")),
                }
            }
            nap(&job, Duration::from_millis(100)).await;
            continue;
        };
        // Tokens first, lock later: a lock is never held while waiting for rate.
        let len = bytes.end - bytes.start;
        loop {
            let rate = rate_now(job.ctl.limiter.rate(), job.ctl.min_rate.load(Ordering::Relaxed), job.fg.is_active());
            let wait = match rate {
                Some(r) => job.ctl.limiter.try_take(len, r),
                // Back off fully: look again once clients may have paused.
                None => Duration::from_millis(50),
            };
            if wait.is_zero() || job.should_stop() {
                break;
            }
            nap(&job, wait.min(Duration::from_millis(100))).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let Some(span) = job.ctl.spans.enter() else {
            continue; // paused meanwhile: this span is looked at again later
        };
        cursor = run.end;
        let job2 = job.clone();
        tokio::task::spawn_local(async move {
            copy_span(&job2, run, chunk, span).await;
            drop(permit);
        });
    }
    // Let in-flight spans finish before the thread (and its ring) goes away.
    let _ = slots.acquire_many_owned(qd as u32).await;
}

/// Copies one span of regions under an exclusive lock.
async fn copy_span(job: &CopyJob, run: Range<usize>, chunk: u64, _span: DrainGuard) {
    let bytes = job.map.lock().bytes_of(run.clone());
    let guard = job.locks.lock(bytes.clone(), LockMode::Exclusive).await;
    // Holding the route makes state changes wait for this copy (the barrier).
    let route = job.owner.route();
    if job.should_stop() {
        return;
    }
    let Some(source) = route.source.clone() else { return };
    let target = &job.target;
    // Regions may have become clean meanwhile (TRIM skips them).
    let pieces: Vec<(Range<u64>, Range<usize>, bool)> = {
        let map = job.map.lock();
        let mut out: Vec<(Range<usize>, bool)> = Vec::new();
        for r in run {
            if map.is_clean(r) {
                continue;
            }
            let d = map.is_discarded(r);
            match out.last_mut() {
                Some((last, ld)) if last.end == r && *ld == d => last.end = r + 1,
                _ => out.push((r..r + 1, d)),
            }
        }
        out.into_iter().map(|(rs, d)| (map.bytes_of(rs.clone()), rs, d)).collect()
    };
    for (br, regions, discarded) in pieces {
        if discarded {
            // Trimmed before the copy reached it: zero T instead of copying, so
            // the range keeps reading as zeroes.
            if let Err(e) = target.backend.write_zeroes(br.start, br.end - br.start, true, false).await {
                job.owner.fail_target(target, format!("target zeroing failed at offset {}: {e}", br.start)).await;
                return;
            }
            let mut map = job.map.lock();
            map.set_clean(regions.clone(), true);
            map.set_unverifiable(regions.clone(), true);
            map.set_discarded(regions.clone(), false);
        } else {
            if !copy_bytes(job, &source, br.clone(), chunk).await {
                return;
            }
            let mut map = job.map.lock();
            map.set_clean(regions.clone(), true);
            map.set_unverifiable(regions.clone(), false);
            drop(map);
            let n = br.end - br.start;
            job.ctl.bytes_copied.fetch_add(n, Ordering::Relaxed);
            job.ctl.meter.record(n);
        }
        if let Some(j) = &job.journal {
            j.note_cleaned(regions);
        }
    }
    drop((guard, route));
    // A target truncated under the copy would be re-extended by the next writes,
    // its copied part reading as zeroes: look after every span.
    if !job.should_stop() && !target.backend.current_size().is_ok_and(|n| n >= job.owner.export_size()) {
        job.owner.check_device_sizes().await;
    }
}

/// Copies `range` from S to T in chunks. False if the copy stopped (an error was
/// recorded or the target dropped).
async fn copy_bytes(job: &CopyJob, source: &Backend, range: Range<u64>, chunk: u64) -> bool {
    let target = &job.target;
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(chunk) as usize;
        // A hole of a remote source reads as zeroes: zero T instead of moving
        // the bytes over the link. Asked under the span's lock, so no write
        // to S can have filled it since. A failed question is not an error:
        // the piece is read as usual.
        if job.detect_zeroes && source.holes_worth_asking() {
            let hole = source
                .allocation(pos, n as u64, 1)
                .await
                .is_ok_and(|e| e.first().is_some_and(|e| e.hole && e.len >= n as u64));
            if hole {
                job.ctl.bytes_zeroed.fetch_add(n as u64, Ordering::Relaxed);
                if let Err(e) = target.backend.write_zeroes(pos, n as u64, true, false).await {
                    job.owner.fail_target(target, format!("target write failed at offset {pos}: {e}")).await;
                    return false;
                }
                pos += n as u64;
                continue;
            }
        }
        let buf = SharedBuf::new(job.pool.alloc_unbudgeted(n));
        let mut attempt = 0;
        loop {
            match source.read_at(&buf, 0, n, pos).await {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    if attempt >= SOURCE_READ_ATTEMPTS {
                        let msg = format!("source read failed at offset {pos}: {e}");
                        job.ctl.set_error(msg.clone());
                        job.owner.event(EventKind::Error, format!("copy stopped: {msg} (resume retries)"));
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
            }
        }
        // SAFETY: the read completed; nothing else touches `buf`.
        let zero = job.detect_zeroes && is_zero(unsafe { buf.slice(0, n) });
        let res = if zero {
            job.ctl.bytes_zeroed.fetch_add(n as u64, Ordering::Relaxed);
            target.backend.write_zeroes(pos, n as u64, true, false).await
        } else {
            target.backend.write_at(&buf, 0, n, pos, false).await
        };
        if let Err(e) = res {
            job.owner.fail_target(target, format!("target write failed at offset {pos}: {e}")).await;
            return false;
        }
        pos += n as u64;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{chunk_now, is_zero, BUSY_CHUNK};

    #[test]
    fn copier_pieces_shrink_only_while_clients_are_busy() {
        assert_eq!(chunk_now(false, 1 << 20), 1 << 20);
        assert_eq!(chunk_now(true, 1 << 20), BUSY_CHUNK);
        assert_eq!(chunk_now(true, 16 << 10), 16 << 10, "a smaller configured size is kept");
    }

    #[test]
    fn busy_clients_hold_the_copy_to_its_floor_and_a_floor_of_zero_stops_it() {
        use super::rate_now;
        const M: u64 = 1 << 20;
        assert_eq!(rate_now(0, 32 * M, false), Some(0), "idle: unlimited");
        assert_eq!(rate_now(8 * M, 32 * M, false), Some(8 * M), "idle: the limit");
        assert_eq!(rate_now(0, 32 * M, true), Some(32 * M), "busy: the floor");
        assert_eq!(rate_now(8 * M, 32 * M, true), Some(8 * M), "busy: never above the limit");
        assert_eq!(rate_now(0, 0, true), None, "busy with no floor: wait");
        assert_eq!(rate_now(0, 0, false), Some(0), "idle with no floor: unlimited");
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        v[999] = 1;
        assert!(!is_zero(&v));
        v[999] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
