//! The copier: walks the dirty regions in ascending order and copies them from
//! the source to the target, on its own thread and io_uring.
//!
//! Contiguous dirty regions are batched into spans. A span is locked
//! exclusively (writers to it wait; fair locks keep it from starving), copied in
//! chunks, and marked clean before the lock is released, so a write that waited
//! for the span goes to both devices. Rate tokens are taken before the lock, so a
//! slow rate limit never holds writers up.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::backend::Backend;
use crate::buf::SharedBuf;
use crate::device::{Mirror, Target};
use crate::locks::LockMode;

const SOURCE_READ_ATTEMPTS: u32 = 3;

fn map_lock(m: &Mirror) -> std::sync::MutexGuard<'_, crate::regions::RegionMap> {
    m.map.lock().unwrap_or_else(|p| p.into_inner())
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

/// The rate the copier may use right now (0 = unlimited).
fn effective_rate(m: &Mirror) -> u64 {
    let max = m.copier.limiter.rate();
    if m.fg.is_active() {
        let floor = m.copier.min_rate.load(Ordering::Relaxed);
        if floor == 0 {
            return max;
        }
        if max == 0 {
            floor
        } else {
            max.min(floor)
        }
    } else {
        max
    }
}

/// Waits for a wake-up (state change, resume, set-rate) or `timeout`.
async fn nap(m: &Mirror, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, m.copier.wake.notified()).await;
}

/// Copier I/O size when none is configured. On disks 2 MiB with the default
/// queue depth of 16 (32 MiB in flight, as `qemu-img convert -m 16` keeps)
/// copied fastest: 2 GiB file to file on this machine's disk, 10 runs
/// alternating with qemu-img, median 0.53 GB/s against its 0.46; 1 MiB at
/// depth 8 got 0.26–0.49, 2 MiB at depth 8 0.28–0.67 (docs/decisions.md). A
/// file in RAM is copied with plain syscalls up to 1 MiB (see the backend), and
/// 1 MiB pieces copied 2 GiB tmpfs → tmpfs at 2.75–3.24 GB/s against 2.21–3.10
/// with 256 KiB (dd: 2.92–3.34). Foreground latency is kept by [`BUSY_CHUNK`].
pub(crate) fn chunk_for(configured: usize, source: &Backend, target: &Backend) -> u64 {
    match configured {
        0 if source.in_memory() || target.in_memory() => 1 << 20,
        0 => 2 << 20,
        n => n as u64,
    }
}

/// Copier I/O size while clients are busy. The copier then runs at its floor
/// rate, so smaller pieces cost no throughput, and a foreground write that
/// meets a copy in flight (a locked span, the target's inode lock, a device
/// queue slot) waits for less. 4K random writes during a sync of a file in RAM
/// (fio QD32, 10 s, two runs each): p99 1.13-1.32x idle with 64 KiB pieces,
/// 1.34-2.17x with 256 KiB.
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

pub(crate) async fn run(m: Arc<Mirror>, target: Arc<Target>) {
    let region = m.region_size();
    let idle_chunk = match m.route().source.as_deref() {
        Some(s) => chunk_for(m.cfg.copy_chunk, s, &target.backend),
        None => chunk_for(m.cfg.copy_chunk, &target.backend, &target.backend),
    };
    let qd = m.cfg.queue_depth.max(1);
    let slots = Arc::new(Semaphore::new(qd));
    let mut cursor = 0usize;
    loop {
        if m.copier_should_stop(&target) {
            break;
        }
        let halted =
            m.copier.paused.load(Ordering::SeqCst) || m.copier.error.lock().map(|e| e.is_some()).unwrap_or(false);
        if halted {
            nap(&m, Duration::from_millis(200)).await;
            continue;
        }
        let chunk = chunk_now(m.fg.is_active(), idle_chunk);
        let span_regions = (chunk.max(region) / region).max(1) as usize;
        let next = map_lock(&m).next_dirty_run(cursor, span_regions);
        let Some(run) = next else {
            // End of a pass: let in-flight spans land before looking again.
            let all = slots.clone().acquire_many_owned(qd as u32).await;
            drop(all);
            if cursor != 0 {
                cursor = 0;
                continue;
            }
            if map_lock(&m).all_clean() {
                match m.finish_sync(&target).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        *m.copier.error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("cannot record the synced state: {e}"));
                    }
                }
            }
            nap(&m, Duration::from_millis(100)).await;
            continue;
        };
        let bytes = map_lock(&m).bytes_of(run.clone());
        // Tokens first, lock later: a lock is never held while waiting for rate.
        let len = bytes.end - bytes.start;
        loop {
            let wait = m.copier.limiter.try_take(len, effective_rate(&m));
            if wait.is_zero() || m.copier_should_stop(&target) {
                break;
            }
            nap(&m, wait.min(Duration::from_millis(100))).await;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        if !m.copier.try_begin() {
            continue; // paused meanwhile: this span is looked at again later
        }
        cursor = run.end;
        let m2 = m.clone();
        let t2 = target.clone();
        tokio::task::spawn_local(async move {
            copy_span(&m2, &t2, run, chunk).await;
            // A target truncated under the copy would be re-extended by the next
            // writes, its copied part reading as zeroes: look after every span.
            if !m2.copier_should_stop(&t2) && !t2.backend.current_size().is_ok_and(|n| n >= m2.size()) {
                m2.check_device_sizes().await;
            }
            m2.copier.end();
            drop(permit);
        });
    }
    // Let in-flight spans finish before the thread (and its ring) goes away.
    let _ = slots.acquire_many_owned(qd as u32).await;
}

/// Copies one span of regions under an exclusive lock.
async fn copy_span(m: &Arc<Mirror>, target: &Arc<Target>, run: Range<usize>, chunk: u64) {
    let bytes = map_lock(m).bytes_of(run.clone());
    let _guard = m.locks.lock(bytes.clone(), LockMode::Exclusive).await;
    // Holding the route makes state changes wait for this copy (the barrier).
    let route = m.route();
    if m.copier_should_stop(target) {
        return;
    }
    let Some(source) = route.source.clone() else { return };
    // Regions may have become clean meanwhile (TRIM skips them).
    let pieces: Vec<(Range<usize>, bool)> = {
        let map = map_lock(m);
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
        out
    };
    for (regions, discarded) in pieces {
        let br = map_lock(m).bytes_of(regions.clone());
        if discarded {
            // Trimmed before the copy reached it: zero T instead of copying, so
            // the range keeps reading as zeroes.
            if let Err(e) = target.backend.write_zeroes(br.start, br.end - br.start, true, false).await {
                m.fail_target(target, format!("target zeroing failed at offset {}: {e}", br.start)).await;
                return;
            }
            let mut map = map_lock(m);
            map.set_clean(regions.clone(), true);
            map.set_unverifiable(regions.clone(), true);
            map.set_discarded(regions.clone(), false);
        } else {
            if !copy_bytes(m, target, &source, br.clone(), chunk).await {
                return;
            }
            let mut map = map_lock(m);
            map.set_clean(regions.clone(), true);
            map.set_unverifiable(regions.clone(), false);
            drop(map);
            let n = br.end - br.start;
            m.copier.bytes_copied.fetch_add(n, Ordering::Relaxed);
            m.copier.meter.record(n);
        }
        if let Some(j) = &m.journal {
            j.note_cleaned(regions);
        }
    }
}

/// Copies `range` from S to T in chunks. False if the copy stopped (an error was
/// recorded or the target dropped).
async fn copy_bytes(
    m: &Arc<Mirror>,
    target: &Arc<Target>,
    source: &crate::backend::Backend,
    range: Range<u64>,
    chunk: u64,
) -> bool {
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(chunk) as usize;
        let buf = SharedBuf::new(m.pool.alloc_unbudgeted(n));
        let mut attempt = 0;
        loop {
            match source.read_at(&buf, 0, n, pos).await {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    if attempt >= SOURCE_READ_ATTEMPTS {
                        let msg = format!("source read failed at offset {pos}: {e}");
                        *m.copier.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                        m.error_event(format!("copy stopped: {msg} (resume retries)"));
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
                }
            }
        }
        // SAFETY: the read completed; nothing else touches `buf`.
        let zero = m.cfg.detect_zeroes && is_zero(unsafe { buf.slice(0, n) });
        let res = if zero {
            m.copier.bytes_zeroed.fetch_add(n as u64, Ordering::Relaxed);
            target.backend.write_zeroes(pos, n as u64, true, false).await
        } else {
            target.backend.write_at(&buf, 0, n, pos, false).await
        };
        if let Err(e) = res {
            m.fail_target(target, format!("target write failed at offset {pos}: {e}")).await;
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
