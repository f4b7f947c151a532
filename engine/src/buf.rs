//! Aligned I/O buffers, a size-class pool that reuses them, and the global byte
//! budget that bounds how much payload the server may hold at once.
//!
//! Reusing buffers matters for speed: a fresh 1 MiB allocation is an mmap and 256
//! page faults; a pooled one is a pop from a free list. Every buffer is 4 KiB
//! aligned so it is valid for O_DIRECT on any device.

use std::alloc::{self, Layout};
use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const BUF_ALIGN: usize = 4096;
const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 26; // 64 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;
/// Budget granule: permits are counted in 4 KiB units so a u32 covers 16 TiB.
const GRANULE: usize = 4096;

struct RawBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: RawBuf is a uniquely owned heap allocation.
unsafe impl Send for RawBuf {}

/// Buffers of at least this size get their own mapping, aligned to a huge page
/// and marked for transparent huge pages, so an O_DIRECT request from one is a
/// single contiguous segment the block layer need not split (docs/decisions.md).
const HUGE_PAGE: usize = 2 << 20;

impl RawBuf {
    fn alloc(cap: usize) -> RawBuf {
        RawBuf::allocate(cap, false)
    }

    fn alloc_zeroed(cap: usize) -> RawBuf {
        RawBuf::allocate(cap, true)
    }

    fn allocate(cap: usize, zeroed: bool) -> RawBuf {
        let cap = cap.max(1);
        if cap >= HUGE_PAGE {
            // Fresh anonymous pages read as zeroes either way.
            return RawBuf::map_huge(cap);
        }
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        RawBuf { ptr, cap }
    }

    /// Maps `cap` bytes (rounded up to whole huge pages) at a huge-page boundary.
    fn map_huge(cap: usize) -> RawBuf {
        let len = cap.next_multiple_of(HUGE_PAGE);
        let layout = Layout::from_size_align(len, HUGE_PAGE).expect("huge buffer layout");
        let span = len + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            // Out of memory, as for any other allocation.
            alloc::handle_alloc_error(layout);
        }
        let start = base as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = span - head - len;
        // SAFETY: both ranges lie inside the mapping made above and are not used.
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
            // Only a hint: without transparent huge pages the buffer works as before.
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        let Some(ptr) = NonNull::new(aligned as *mut u8) else { alloc::handle_alloc_error(layout) };
        RawBuf { ptr, cap: len }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        if self.cap >= HUGE_PAGE {
            // SAFETY: mapped by map_huge with exactly this address and length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            return;
        }
        let layout = Layout::from_size_align(self.cap, BUF_ALIGN).expect("buffer layout");
        // SAFETY: allocated with this exact layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

fn class_of(len: usize) -> Option<usize> {
    let len = len.max(1 << MIN_CLASS_SHIFT);
    let shift = usize::BITS - (len - 1).leading_zeros();
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn class_size(class: usize) -> usize {
    1usize << (class as u32 + MIN_CLASS_SHIFT)
}

/// Most idle bytes a pool keeps for reuse.
const RETAIN_MAX: usize = 64 << 20;

struct PoolInner {
    free: [Mutex<Vec<RawBuf>>; CLASSES],
    retained: AtomicUsize,
    retain_limit: usize,
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

/// A pool of aligned buffers with a byte budget. Budgeted allocations wait when
/// the budget is spent: that wait is the backpressure on client sockets.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    pub fn new(budget_bytes: usize) -> BufPool {
        let granules = budget_bytes.div_ceil(GRANULE).min(Semaphore::MAX_PERMITS);
        BufPool {
            inner: Arc::new(PoolInner {
                free: std::array::from_fn(|_| Mutex::new(Vec::new())),
                retained: AtomicUsize::new(0),
                // Idle buffers kept for reuse: enough for the steady state of
                // many clients (64 MiB is QD8 of 1 MiB on 8 connections), not a
                // second budget's worth of memory.
                retain_limit: budget_bytes.min(RETAIN_MAX),
                budget: Arc::new(Semaphore::new(granules)),
                budget_bytes,
            }),
        }
    }

    pub fn budget_bytes(&self) -> usize {
        self.inner.budget_bytes
    }

    /// Bytes of budget currently free (for tests and status).
    pub fn budget_available(&self) -> usize {
        self.inner.budget.available_permits() * GRANULE
    }

    fn granules_for(len: usize) -> u32 {
        let charged = class_of(len).map(class_size).unwrap_or(len);
        charged.div_ceil(GRANULE).max(1) as u32
    }

    /// Allocates `len` bytes, waiting for budget. Fails only if `len` exceeds the
    /// whole budget (the caller validates lengths before this, so that is a bug).
    pub async fn alloc(&self, len: usize) -> Result<IoBuf, BudgetExceeded> {
        let n = Self::granules_for(len);
        if n as usize * GRANULE > self.inner.budget_bytes.max(GRANULE) {
            return Err(BudgetExceeded { len, budget: self.inner.budget_bytes });
        }
        let permit = self
            .inner
            .budget
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| BudgetExceeded { len, budget: self.inner.budget_bytes })?;
        let mut buf = self.take(len);
        buf.permit = Some(permit);
        Ok(buf)
    }

    /// Takes `bytes` of the budget (rounded up to 4 KiB) without a buffer, waiting
    /// while it is spent. Callers that fill a buffer as bytes arrive charge it
    /// piece by piece, so a stalled sender holds only what it has sent.
    pub async fn charge(&self, bytes: usize) -> Result<BudgetCharge, BudgetExceeded> {
        let n = bytes.div_ceil(GRANULE).max(1);
        if n * GRANULE > self.inner.budget_bytes.max(GRANULE) {
            return Err(BudgetExceeded { len: bytes, budget: self.inner.budget_bytes });
        }
        let permit = self
            .inner
            .budget
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| BudgetExceeded { len: bytes, budget: self.inner.budget_bytes })?;
        Ok(BudgetCharge { _permit: permit, bytes: n * GRANULE })
    }

    /// Allocates without waiting; `None` when the budget is spent.
    pub fn try_alloc(&self, len: usize) -> Option<IoBuf> {
        let permit = self.inner.budget.clone().try_acquire_many_owned(Self::granules_for(len)).ok()?;
        let mut buf = self.take(len);
        buf.permit = Some(permit);
        Some(buf)
    }

    /// Allocates outside the budget, for engine-internal bounded uses (copier,
    /// read-modify-write bounce buffers).
    pub fn alloc_unbudgeted(&self, len: usize) -> IoBuf {
        self.take(len)
    }

    fn take(&self, len: usize) -> IoBuf {
        let raw = match class_of(len) {
            Some(c) => {
                let reused = self.inner.free[c].lock().ok().and_then(|mut v| v.pop());
                match reused {
                    Some(r) => {
                        self.inner.retained.fetch_sub(r.cap, Ordering::Relaxed);
                        r
                    }
                    None => RawBuf::alloc(class_size(c)),
                }
            }
            None => RawBuf::alloc(len),
        };
        IoBuf { raw: Some(raw), len, pool: Some(self.inner.clone()), permit: None }
    }
}

/// A share of the pool's budget, given back on drop.
pub struct BudgetCharge {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
}

impl BudgetCharge {
    /// Bytes charged (a multiple of 4 KiB).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a {len}-byte buffer exceeds the {budget}-byte payload budget")]
pub struct BudgetExceeded {
    pub len: usize,
    pub budget: usize,
}

/// An owned, 4 KiB-aligned buffer with a logical length. Returned to its pool
/// (and its budget released) on drop.
pub struct IoBuf {
    raw: Option<RawBuf>,
    len: usize,
    pool: Option<Arc<PoolInner>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl IoBuf {
    /// A standalone buffer (not pooled, not budgeted), contents unspecified.
    pub fn new(len: usize) -> IoBuf {
        IoBuf { raw: Some(RawBuf::alloc(len)), len, pool: None, permit: None }
    }

    pub fn zeroed(len: usize) -> IoBuf {
        IoBuf { raw: Some(RawBuf::alloc_zeroed(len)), len, pool: None, permit: None }
    }

    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.raw.as_ref().map_or(0, |r| r.cap)
    }

    /// Shrinks or grows the logical length within the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.raw.as_ref().map_or(std::ptr::null(), |r| r.ptr.as_ptr())
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw.as_ref().map_or(std::ptr::null_mut(), |r| r.ptr.as_ptr())
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.raw {
            // SAFETY: the allocation holds at least `len` bytes; contents may be
            // uninitialised memory from the allocator, which is fine for u8 reads
            // in practice but callers always fill before reading.
            Some(r) => unsafe { std::slice::from_raw_parts(r.ptr.as_ptr(), self.len) },
            None => &[],
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &self.raw {
            // SAFETY: unique ownership, at least `len` bytes.
            Some(r) => unsafe { std::slice::from_raw_parts_mut(r.ptr.as_ptr(), self.len) },
            None => &mut [],
        }
    }

    pub fn fill(&mut self, byte: u8) {
        self.as_mut_slice().fill(byte);
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        if let (Some(pool), Some(c)) = (&self.pool, class_of(raw.cap)) {
            if class_size(c) == raw.cap && pool.retained.load(Ordering::Relaxed) + raw.cap <= pool.retain_limit {
                if let Ok(mut v) = pool.free[c].lock() {
                    pool.retained.fetch_add(raw.cap, Ordering::Relaxed);
                    v.push(raw);
                }
            }
        }
        // `raw` (if not pooled) and the permit drop here.
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len={}, cap={})", self.len, self.capacity())
    }
}

/// A buffer shared by several concurrent I/O operations that each touch a
/// disjoint byte range (split reads, write legs). The engine guarantees the
/// disjointness; the Arc keeps the memory alive until every kernel op is done.
pub struct SharedBuf {
    cell: UnsafeCell<IoBuf>,
}

// SAFETY: concurrent access is limited to disjoint ranges (reads) or read-only
// access (writes), as documented on every raw accessor.
unsafe impl Sync for SharedBuf {}
// SAFETY: the IoBuf inside is an owned heap allocation, movable between threads.
unsafe impl Send for SharedBuf {}

impl SharedBuf {
    pub fn new(buf: IoBuf) -> Arc<SharedBuf> {
        Arc::new(SharedBuf { cell: UnsafeCell::new(buf) })
    }

    pub fn len(&self) -> usize {
        // SAFETY: len is never changed while shared.
        unsafe { (*self.cell.get()).len() }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pointer to byte `off`. Callers must only write through it within a range no
    /// other in-flight operation touches.
    pub fn ptr_at(&self, off: usize) -> *mut u8 {
        assert!(off <= self.len(), "SharedBuf offset out of range");
        // SAFETY: in-bounds offset of a live allocation.
        unsafe { (*self.cell.get()).as_mut_ptr().add(off) }
    }

    /// Read-only view; valid while no operation writes into the buffer.
    ///
    /// # Safety
    /// No concurrent writer may touch the returned range.
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len(), "SharedBuf slice out of range");
        // SAFETY: caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr_at(off), len) }
    }

    /// Mutable view of a range.
    ///
    /// # Safety
    /// The range must not be accessed by anything else concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len(), "SharedBuf slice out of range");
        // SAFETY: caller guarantees exclusive access to the range.
        unsafe { std::slice::from_raw_parts_mut(self.ptr_at(off), len) }
    }

    /// Takes the buffer back once every other holder is gone.
    pub fn into_inner(this: Arc<SharedBuf>) -> Result<IoBuf, Arc<SharedBuf>> {
        Arc::try_unwrap(this).map(|s| s.cell.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_sit_on_huge_page_boundaries_and_work_whole() {
        for len in [HUGE_PAGE, 3 * HUGE_PAGE + 5, (64 << 20) + 1] {
            let mut b = IoBuf::new(len);
            assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0, "{len}-byte buffer");
            for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (i % 251) as u8;
            }
            assert!(b.as_slice().iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));
            let z = IoBuf::zeroed(len);
            assert_eq!(z.as_ptr() as usize % HUGE_PAGE, 0);
            assert!(z.as_slice().iter().all(|&x| x == 0), "{len}-byte zeroed buffer");
        }
        // A pooled huge buffer comes back whole and is reused.
        let pool = BufPool::new(64 << 20);
        let a = pool.alloc_unbudgeted(HUGE_PAGE);
        let addr = a.as_ptr() as usize;
        drop(a);
        assert_eq!(pool.alloc_unbudgeted(HUGE_PAGE).as_ptr() as usize, addr);
        // Small buffers keep the allocator's 4 KiB alignment.
        assert_eq!(IoBuf::new(HUGE_PAGE - 4096).as_ptr() as usize % BUF_ALIGN, 0);
    }

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(1 << 20), Some(8));
        assert_eq!(class_of(64 << 20), Some(CLASSES - 1));
        assert_eq!(class_of((64 << 20) + 1), None);
    }

    #[test]
    fn buffers_are_aligned_and_reused() {
        let pool = BufPool::new(8 << 20);
        let b = pool.alloc_unbudgeted(10_000);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(b.capacity(), 16384);
        let p = b.as_ptr();
        drop(b);
        let c = pool.alloc_unbudgeted(9000);
        assert_eq!(c.as_ptr(), p, "freed buffer of the same class is reused");
    }

    #[test]
    fn budget_blocks_and_releases() {
        let pool = BufPool::new(1 << 20);
        let a = pool.try_alloc(512 << 10).expect("half the budget");
        let b = pool.try_alloc(512 << 10).expect("the other half");
        assert!(pool.try_alloc(4096).is_none(), "budget spent");
        drop(a);
        assert!(pool.try_alloc(4096).is_some(), "budget released on drop");
        drop(b);
    }

    #[test]
    fn oversize_request_is_an_error_not_a_hang() {
        let pool = BufPool::new(1 << 20);
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let r = rt.block_on(pool.alloc(2 << 20));
        assert!(r.is_err());
    }
}
