//! The chunk map: which chunks the overlay file holds, in memory and on disk.
//!
//! A bit is only ever set (a chunk that was written, zeroed or trimmed reads
//! from the overlay from then on; a trimmed one as a hole, that is zeroes). That
//! makes the map easy to keep crash-safe: a page of it written over an older
//! copy can only add bits, so even a torn write loses nothing that an earlier,
//! completed write of the page had recorded.
//!
//! Reads look bits up without a lock (the words are atomics): a writer sets a
//! chunk's bit only after the chunk's data is in the file, so a reader that sees
//! the bit finds the data.
//!
//! Group commit ([`Committer`]): a write that makes chunks present waits until a
//! map page holding their bits has been written to the file. One waiter at a
//! time writes every page that changed so far; the others wait for it, so a
//! burst of first writes costs one pass over the changed pages, not one each.
//! On a file that is not in RAM the pass first syncs the data, so that a map
//! bit never reaches the disk before the data it points at.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::format::MAP_PAGE;
use crate::sync::lock;

/// Chunks per map page.
const CHUNKS_PER_PAGE: u64 = MAP_PAGE * 8;

/// Which chunks the overlay holds.
pub(super) struct PresentMap {
    words: Vec<AtomicU64>,
}

impl PresentMap {
    /// A map of `chunks` chunks from its on-disk bytes (little-endian words);
    /// bits past the last chunk are ignored.
    pub(super) fn from_bytes(chunks: u64, bytes: &[u8]) -> PresentMap {
        let nwords = chunks.div_ceil(64) as usize;
        let mut words = Vec::with_capacity(nwords);
        for i in 0..nwords {
            let mut w = [0u8; 8];
            if let Some(src) = bytes.get(i * 8..i * 8 + 8) {
                w.copy_from_slice(src);
            }
            let mut v = u64::from_le_bytes(w);
            let first = i as u64 * 64;
            if first + 64 > chunks {
                v &= (1u64 << (chunks - first)) - 1;
            }
            words.push(AtomicU64::new(v));
        }
        PresentMap { words }
    }

    pub(super) fn is_present(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Every chunk of `range` is present.
    pub(super) fn all_present(&self, range: Range<u64>) -> bool {
        self.find(range, false).is_none()
    }

    /// The first chunk of `range` whose bit is `bit`.
    fn find(&self, range: Range<u64>, bit: bool) -> Option<u64> {
        let mut c = range.start;
        while c < range.end {
            let w = self.words[(c / 64) as usize].load(Ordering::Acquire);
            let w = if bit { w } else { !w } >> (c % 64);
            if w != 0 {
                let at = c + w.trailing_zeros() as u64;
                return (at < range.end).then_some(at);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// The longest run from `start` (before `end`) whose chunks all have the
    /// bit `start` has: `(run end, present)`.
    pub(super) fn run_from(&self, start: u64, end: u64) -> (u64, bool) {
        let present = self.is_present(start);
        (self.find(start..end, !present).unwrap_or(end), present)
    }

    /// Marks `range` present; returns the map pages whose bits changed.
    pub(super) fn mark(&self, range: Range<u64>) -> BTreeSet<u64> {
        let mut pages = BTreeSet::new();
        let mut c = range.start;
        while c < range.end {
            let w = c / 64;
            let lo = c % 64;
            let hi = (range.end - w * 64).min(64);
            let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
            // Release: the chunk's data was written before its bit is seen.
            let old = self.words[w as usize].fetch_or(mask, Ordering::Release);
            if old & mask != mask {
                pages.insert(c / CHUNKS_PER_PAGE);
            }
            c = (w + 1) * 64;
        }
        pages
    }

    /// The bytes of map page `page` as they are now.
    pub(super) fn page_bytes(&self, page: u64) -> Vec<u8> {
        let per = (MAP_PAGE / 8) as usize;
        let first = page as usize * per;
        let mut out = vec![0u8; MAP_PAGE as usize];
        for (i, w) in self.words.iter().skip(first).take(per).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out
    }

    /// How many chunks are present.
    pub(super) fn count(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// Where the committer writes: the overlay file.
pub(super) trait MapIo {
    /// Makes the data written so far durable (skipped for a file in RAM).
    fn sync_data(&self) -> impl Future<Output = io::Result<()>>;
    /// Writes map page `page` (`MAP_PAGE` bytes).
    fn write_page(&self, page: u64, bytes: Vec<u8>) -> impl Future<Output = io::Result<()>>;
}

#[derive(Default)]
struct CommitState {
    /// Pages with bits not yet written.
    pending: BTreeSet<u64>,
    /// Generations: each caller of `commit` takes the next one; it is done
    /// when `committed` reaches it.
    requested: u64,
    committed: u64,
    /// A caller is writing pages now.
    running: bool,
    /// The last pass that failed: every generation up to it gets its error.
    failed: Option<(u64, String)>,
}

/// Writes changed map pages, one pass for many callers.
#[derive(Default)]
pub(super) struct Committer {
    state: Mutex<CommitState>,
    done: Notify,
}

impl Committer {
    /// Returns once `pages` (whose bits are set in `map`) are in the file.
    pub(super) async fn commit(&self, map: &PresentMap, pages: BTreeSet<u64>, io: &impl MapIo) -> io::Result<()> {
        if pages.is_empty() {
            return Ok(());
        }
        let mine = {
            let mut st = lock(&self.state);
            st.pending.extend(pages);
            st.requested += 1;
            st.requested
        };
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            // Registered before the check, so a pass ending in between is seen.
            done.as_mut().enable();
            let lead = {
                let mut st = lock(&self.state);
                if let Some((upto, why)) = &st.failed {
                    if mine <= *upto && st.committed >= mine {
                        return Err(io::Error::other(why.clone()));
                    }
                }
                if st.committed >= mine {
                    return Ok(());
                }
                if st.running {
                    false
                } else {
                    st.running = true;
                    true
                }
            };
            if lead {
                self.pass(map, io).await;
                continue;
            }
            done.await;
        }
    }

    /// Writes every pending page; several passes while callers keep adding.
    async fn pass(&self, map: &PresentMap, io: &impl MapIo) {
        loop {
            let (pages, upto) = {
                let mut st = lock(&self.state);
                if st.pending.is_empty() {
                    st.running = false;
                    drop(st);
                    self.done.notify_waiters();
                    return;
                }
                (std::mem::take(&mut st.pending), st.requested)
            };
            // Every bit in these pages was set after its data write completed;
            // on a disk that data must be durable before the bit can be.
            let mut res = io.sync_data().await;
            if res.is_ok() {
                for &p in &pages {
                    res = io.write_page(p, map.page_bytes(p)).await;
                    if res.is_err() {
                        break;
                    }
                }
            }
            let mut st = lock(&self.state);
            st.committed = upto;
            if let Err(e) = res {
                // The bits stay set in memory; the pages are written again by
                // the next caller's pass (not this one: a file that fails now
                // would fail again at once), and these callers see the error.
                st.pending.extend(pages);
                st.failed = Some((upto, format!("cannot write the overlay's chunk map: {e}")));
                st.running = false;
                drop(st);
                self.done.notify_waiters();
                return;
            }
            drop(st);
            self.done.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    #[test]
    fn bits_round_trip_through_pages_and_runs_split_where_they_change() {
        let m = PresentMap::from_bytes(100_000, &[]);
        assert_eq!(m.count(), 0);
        let pages = m.mark(10..70);
        assert_eq!(pages.into_iter().collect::<Vec<_>>(), vec![0]);
        assert!(m.mark(10..70).is_empty(), "bits already set change no page");
        assert_eq!(m.mark(32_760..32_770).into_iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(m.count(), 60 + 10);
        assert_eq!(m.run_from(0, 100), (10, false));
        assert_eq!(m.run_from(10, 100), (70, true));
        assert_eq!(m.run_from(70, 100), (100, false));
        assert!(m.all_present(10..70) && !m.all_present(9..70) && !m.all_present(10..71));
        let mut bytes = m.page_bytes(0);
        bytes.extend(m.page_bytes(1));
        let back = PresentMap::from_bytes(100_000, &bytes);
        for c in 0..100_000 {
            assert_eq!(back.is_present(c), m.is_present(c), "chunk {c}");
        }
        // Bits past the last chunk are not chunks.
        let odd = PresentMap::from_bytes(70, &[0xff; 16]);
        assert_eq!(odd.count(), 70);
    }

    struct FakeFile {
        pages: RefCell<BTreeMap<u64, Vec<u8>>>,
        fail: RefCell<bool>,
        syncs: RefCell<usize>,
    }

    impl MapIo for FakeFile {
        async fn sync_data(&self) -> io::Result<()> {
            *self.syncs.borrow_mut() += 1;
            Ok(())
        }
        async fn write_page(&self, page: u64, bytes: Vec<u8>) -> io::Result<()> {
            tokio::task::yield_now().await;
            if *self.fail.borrow() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.pages.borrow_mut().insert(page, bytes);
            Ok(())
        }
    }

    #[test]
    fn concurrent_commits_share_passes_and_every_bit_reaches_the_file() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let local = tokio::task::LocalSet::new();
        let map = std::rc::Rc::new(PresentMap::from_bytes(1 << 20, &[]));
        let file = std::rc::Rc::new(FakeFile {
            pages: RefCell::new(BTreeMap::new()),
            fail: RefCell::new(false),
            syncs: RefCell::new(0),
        });
        let c = std::rc::Rc::new(Committer::default());
        local.block_on(&rt, async {
            let mut tasks = Vec::new();
            for i in 0..64u64 {
                let (map, file, c) = (map.clone(), file.clone(), c.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let chunk = i * 40_000 % (1 << 20);
                    let pages = map.mark(chunk..chunk + 1);
                    c.commit(&map, pages, &*file).await
                }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        assert!(*file.syncs.borrow() < 64, "passes are shared ({} passes)", file.syncs.borrow());
        let pages = file.pages.borrow();
        let mut bytes = vec![0u8; (MAP_PAGE * 32) as usize];
        for (p, b) in pages.iter() {
            bytes[(*p * MAP_PAGE) as usize..(*p * MAP_PAGE + MAP_PAGE) as usize].copy_from_slice(b);
        }
        let back = PresentMap::from_bytes(1 << 20, &bytes);
        assert_eq!(back.count(), map.count());
        for i in 0..64u64 {
            assert!(back.is_present(i * 40_000 % (1 << 20)));
        }
    }

    #[test]
    fn a_failed_pass_fails_its_callers_and_the_next_pass_writes_the_pages_again() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let map = PresentMap::from_bytes(1000, &[]);
        let file = FakeFile { pages: RefCell::new(BTreeMap::new()), fail: RefCell::new(true), syncs: RefCell::new(0) };
        let c = Committer::default();
        rt.block_on(async {
            let e = c.commit(&map, map.mark(5..6), &file).await.unwrap_err();
            assert!(e.to_string().contains("chunk map"), "{e}");
            *file.fail.borrow_mut() = false;
            c.commit(&map, map.mark(7..8), &file).await.unwrap();
        });
        let back = PresentMap::from_bytes(1000, &file.pages.borrow()[&0]);
        assert!(back.is_present(5) && back.is_present(7), "the failed page was written by the next pass");
    }
}
