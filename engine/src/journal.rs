//! The crash-safety journal (`serve --state FILE`): write intent and copy
//! progress, persisted through the state file (statefile.rs) by a thread of its
//! own.
//!
//! # Ordering
//! - A region is persisted clean only after its copy is durable on T: regions
//!   cleaned by the copier wait in `cleaned_pending` until the persister has
//!   flushed T.
//! - A write that goes to both devices first sets the intent bit of its regions
//!   and waits for a persist whose snapshot includes the bit (generation
//!   numbers); a bit already durable costs nothing.
//! - A bit is cleared when its region had no writer for [`QUIET`] and both
//!   devices were flushed after the region's last write.
//! - Bits are set and cleared per [`INTENT_CHUNK`] (all regions of a chunk
//!   together), and writers are tracked per chunk, so a write costs one map
//!   entry however small the regions are.
//! - On resume, intent regions are dirty again.
//!
//! The journal knows the device only through [`JournalHost`], held weakly: the
//! marks to persist and the devices to flush.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bitvec::prelude::*;
use tokio::sync::{watch, Notify};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::regions::Bits;
use crate::route::Route;
use crate::state::DeviceState;
use crate::statefile::{DeviceIdent, Settings, StateFile, StateImage};
use crate::sync::lock;

/// A region with no write for this long may have its intent bit cleared. Long
/// enough that a region under steady random writes keeps its bit (clearing and
/// setting it again costs a state write each time), short enough to clear
/// within the 5 s semantics.md allows (plus a tick, a flush and a write).
pub const QUIET: Duration = Duration::from_millis(4000);
/// Intent bits are set for whole chunks of this many bytes (at least one
/// region): random writes then reach a steady state, where every bit they need
/// is already durable, after a few hundred state writes instead of one per
/// region (md's bitmap chunks serve the same purpose). On resume a write in
/// flight costs at most this much extra copying.
pub const INTENT_CHUNK: u64 = 4 << 20;
/// The persister wakes at least this often.
const TICK: Duration = Duration::from_millis(250);

/// What the journal needs from the device it persists.
pub(crate) trait JournalHost: Send + Sync {
    /// The discarded and unverifiable marks, as they are now.
    fn marks(&self) -> (Bits, Bits);
    /// The devices to flush before progress or cleared intents are recorded.
    fn route(&self) -> Arc<Route>;
}

/// Per-chunk bookkeeping while writes are active.
struct Activity {
    writers: u32,
    /// Completion sequence number of the last write to the chunk.
    last_write: u64,
    last_end: Instant,
}

struct JState {
    /// Bumped by every change that must reach the file.
    gen: u64,
    seq: u64,
    state: DeviceState,
    export_size: u64,
    source: Option<DeviceIdent>,
    target: Option<DeviceIdent>,
    settings: Option<Settings>,
    intent: Bits,
    /// Generation at which a chunk's intent bits were set, until a persist
    /// covers it (keyed by chunk).
    intent_gen: HashMap<usize, u64>,
    durable_clean: Bits,
    cleaned_pending: Vec<Range<usize>>,
    /// Keyed by chunk.
    active: HashMap<usize, Activity>,
    write_seq: u64,
    flushed_seq: u64,
}

struct Shared {
    st: Mutex<JState>,
    file: Mutex<Option<StateFile>>,
    durable: watch::Sender<u64>,
    kick: Notify,
    stop: AtomicBool,
    shift: u32,
    /// Regions per intent chunk.
    per_chunk: usize,
    failed: Mutex<Option<String>>,
    /// State file writes so far.
    writes: std::sync::atomic::AtomicU64,
}

/// The crash-safety journal of a device.
pub struct Journal {
    sh: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Held by a write that goes to both devices while its legs run. Dropping it
/// (when the legs completed, or when the write is cancelled) records the end of
/// the write, so no writer count is ever left behind.
pub struct IntentGuard {
    sh: Arc<Shared>,
    chunks: Range<usize>,
}

impl Drop for IntentGuard {
    fn drop(&mut self) {
        let mut st = lock(&self.sh.st);
        st.write_seq += 1;
        let seq = st.write_seq;
        let now = Instant::now();
        for c in self.chunks.clone() {
            if let Some(a) = st.active.get_mut(&c) {
                a.writers = a.writers.saturating_sub(1);
                a.last_write = seq;
                a.last_end = now;
            }
        }
    }
}

impl Journal {
    fn new(img: &StateImage, file: StateFile) -> Journal {
        let n = img.regions();
        let (durable, _) = watch::channel(0);
        Journal {
            sh: Arc::new(Shared {
                st: Mutex::new(JState {
                    gen: 0,
                    seq: img.seq,
                    state: img.state,
                    export_size: img.export_size,
                    source: img.source.clone(),
                    target: img.target.clone(),
                    settings: img.settings,
                    intent: bitvec![u64, Lsb0; 0; n],
                    intent_gen: HashMap::new(),
                    durable_clean: img.clean.clone(),
                    cleaned_pending: Vec::new(),
                    active: HashMap::new(),
                    write_seq: 0,
                    flushed_seq: 0,
                }),
                file: Mutex::new(Some(file)),
                durable,
                kick: Notify::new(),
                stop: AtomicBool::new(false),
                shift: img.region_shift,
                per_chunk: (INTENT_CHUNK >> img.region_shift).max(1) as usize,
                failed: Mutex::new(None),
                writes: std::sync::atomic::AtomicU64::new(0),
            }),
            thread: Mutex::new(None),
        }
    }

    /// Starts the persister thread for `host`.
    pub(crate) fn start(&self, host: Weak<dyn JournalHost>) -> Result<()> {
        let sh = self.sh.clone();
        let weak = host;
        let t = std::thread::Builder::new()
            .name("livemirror-state".into())
            .spawn(move || {
                if let Err(e) = crate::rt::block_on(persister(sh.clone(), weak)) {
                    *lock(&sh.failed) = Some(format!("state persister could not start: {e}"));
                }
            })
            .map_err(|e| Error::io("cannot start the state thread", e))?;
        *lock(&self.thread) = Some(t);
        Ok(())
    }

    fn bump(st: &mut JState) -> u64 {
        st.gen += 1;
        st.gen
    }

    pub fn set_state(&self, state: DeviceState, source: Option<&Backend>, target: Option<&Backend>) {
        let mut st = lock(&self.sh.st);
        st.state = state;
        st.source = source.map(Backend::ident);
        st.target = target.map(Backend::ident);
        Self::bump(&mut st);
    }

    /// Records the copy settings; the next persist writes them.
    pub fn note_settings(&self, settings: Settings) {
        let mut st = lock(&self.sh.st);
        if st.settings != Some(settings) {
            st.settings = Some(settings);
            Self::bump(&mut st);
            self.sh.kick.notify_one();
        }
    }

    /// Records the copy settings and waits until they are durable.
    pub async fn set_settings(&self, settings: Settings) -> Result<()> {
        let want = {
            let mut st = lock(&self.sh.st);
            if st.settings == Some(settings) {
                return Ok(());
            }
            st.settings = Some(settings);
            Self::bump(&mut st)
        };
        self.wait_durable(want).await
    }

    pub fn set_export_size(&self, size: u64) {
        let mut st = lock(&self.sh.st);
        st.export_size = size;
        let n = size.div_ceil(1 << self.sh.shift) as usize;
        st.intent.resize(n, false);
        st.durable_clean.resize(n, true);
        Self::bump(&mut st);
    }

    /// Requests a persist of everything changed so far and waits for it.
    pub async fn persist(&self) -> Result<()> {
        let want = Self::bump(&mut lock(&self.sh.st));
        self.wait_durable(want).await
    }

    async fn wait_durable(&self, want: u64) -> Result<()> {
        let mut rx = self.sh.durable.subscribe();
        self.sh.kick.notify_one();
        loop {
            if let Some(e) = lock(&self.sh.failed).clone() {
                return Err(Error::io(e, io::Error::other("state file write failed")));
            }
            if *rx.borrow_and_update() >= want {
                return Ok(());
            }
            // The persister keeps going until `want` is covered; wake now and
            // then to notice a failure.
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            self.sh.kick.notify_one();
        }
    }

    pub fn reset_clean(&self) {
        let mut st = lock(&self.sh.st);
        st.durable_clean.fill(false);
        st.cleaned_pending.clear();
        st.intent.fill(false);
        st.intent_gen.clear();
        Self::bump(&mut st);
    }

    pub fn mark_all_clean_durable(&self) {
        let mut st = lock(&self.sh.st);
        st.durable_clean.fill(true);
        st.cleaned_pending.clear();
        Self::bump(&mut st);
    }

    pub fn note_cleaned(&self, regions: Range<usize>) {
        lock(&self.sh.st).cleaned_pending.push(regions);
    }

    /// `regions` are dirty again (a write reached T but failed on S): the
    /// next persist records them so.
    pub fn note_dirtied(&self, regions: Range<usize>) {
        let mut st = lock(&self.sh.st);
        let n = st.durable_clean.len();
        let r = regions.start.min(n)..regions.end.min(n);
        st.durable_clean[r.clone()].fill(false);
        // A copy of them cleaned before this must not be recorded after it.
        st.cleaned_pending.retain(|c| c.end <= r.start || c.start >= r.end);
        Self::bump(&mut st);
        drop(st);
        self.sh.kick.notify_one();
    }

    pub fn mark_dirty_meta(&self) {
        Self::bump(&mut lock(&self.sh.st));
        self.sh.kick.notify_one();
    }

    /// Sets the intent bits of the chunks holding `regions` (a write's) and
    /// waits until a persist that includes them is durable.
    pub async fn begin_write(&self, regions: Range<usize>) -> Result<IntentGuard> {
        let per = self.sh.per_chunk;
        let chunks = (regions.start / per)..regions.end.div_ceil(per);
        let mut need = 0u64;
        {
            let mut st = lock(&self.sh.st);
            let durable = *self.sh.durable.borrow();
            let n = st.intent.len();
            for c in chunks.clone() {
                let regions = (c * per).min(n)..((c + 1) * per).min(n);
                if regions.is_empty() {
                    continue;
                }
                let a = st.active.entry(c).or_insert(Activity { writers: 0, last_write: 0, last_end: Instant::now() });
                a.writers += 1;
                if !st.intent[regions.clone()].all() {
                    st.intent[regions].fill(true);
                    let g = Self::bump(&mut st);
                    st.intent_gen.insert(c, g);
                    need = need.max(g);
                } else if let Some(&g) = st.intent_gen.get(&c) {
                    if g > durable {
                        need = need.max(g);
                    }
                }
            }
        }
        // From here on the guard records the end of the write, whatever happens.
        let guard = IntentGuard { sh: self.sh.clone(), chunks };
        if need > 0 {
            self.wait_durable(need).await?;
        }
        Ok(guard)
    }

    pub fn flush_begin(&self) -> u64 {
        lock(&self.sh.st).write_seq
    }

    pub fn flush_done(&self, seq: u64) {
        let mut st = lock(&self.sh.st);
        st.flushed_seq = st.flushed_seq.max(seq);
    }

    /// Stops the persister after a final persist. Called at a clean stop,
    /// once every request has drained and both legs were flushed
    /// ([`Journal::flush_done`]): every write is durable on both then, so no
    /// region needs its intent mark any more (a restart, or the next process
    /// of an upgrade, would copy them all again for nothing).
    pub async fn stop(&self) -> Result<()> {
        {
            let mut st = lock(&self.sh.st);
            let flushed = st.flushed_seq;
            let done: Vec<usize> =
                st.active.iter().filter(|(_, a)| a.writers == 0 && a.last_write <= flushed).map(|(&c, _)| c).collect();
            if !done.is_empty() {
                let (n, per) = (st.intent.len(), self.sh.per_chunk);
                for c in done {
                    st.active.remove(&c);
                    st.intent[(c * per).min(n)..((c + 1) * per).min(n)].fill(false);
                    st.intent_gen.remove(&c);
                }
                Journal::bump(&mut st);
            }
        }
        let r = self.persist().await;
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.kick.notify_one();
        let t = lock(&self.thread).take();
        if let Some(t) = t {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        r
    }

    /// State file writes since start.
    pub fn state_writes(&self) -> u64 {
        self.sh.writes.load(Ordering::Relaxed)
    }

    /// Intent bits currently set (tests and status).
    pub fn intent_count(&self) -> usize {
        lock(&self.sh.st).intent.count_ones()
    }
}

/// Builds the image to write from the journal and the device's marks.
fn snapshot(sh: &Shared, host: &dyn JournalHost) -> (u64, StateImage) {
    let (discarded, unverifiable) = host.marks();
    let mut st = lock(&sh.st);
    st.seq += 1;
    let n = st.intent.len();
    let fit = |mut b: Bits| {
        b.resize(n, false);
        b
    };
    let img = StateImage {
        seq: st.seq,
        state: st.state,
        region_shift: sh.shift,
        export_size: st.export_size,
        source: st.source.clone(),
        target: st.target.clone(),
        settings: st.settings,
        clean: st.durable_clean.clone(),
        intent: st.intent.clone(),
        discarded: fit(discarded),
        unverifiable: fit(unverifiable),
    };
    (st.gen, img)
}

async fn persister(sh: Arc<Shared>, m: Weak<dyn JournalHost>) {
    let mut written_gen = 0u64;
    loop {
        let _ = tokio::time::timeout(TICK, sh.kick.notified()).await;
        let Some(mirror) = m.upgrade() else { return };
        let route = mirror.route();
        // 1. Clean progress: durable on T first, then recorded.
        let pending: Vec<Range<usize>> = std::mem::take(&mut lock(&sh.st).cleaned_pending);
        if !pending.is_empty() {
            let ok = match &route.target {
                Some(t) => t.backend.flush().await.is_ok(),
                None => false,
            };
            let mut st = lock(&sh.st);
            if ok {
                for r in pending {
                    let end = r.end.min(st.durable_clean.len());
                    if r.start < end {
                        st.durable_clean[r.start..end].fill(true);
                    }
                }
                Journal::bump(&mut st);
            } else if route.target.is_some() {
                // Try again next round (a failing target is dropped by the
                // request that trips over it).
                st.cleaned_pending.extend(pending);
            }
        }
        // 2. Intent bits of quiet chunks: flush both devices past their last
        // write, then clear.
        let quiet: Vec<(usize, u64)> = {
            let st = lock(&sh.st);
            st.active
                .iter()
                .filter(|(_, a)| a.writers == 0 && a.last_end.elapsed() >= QUIET)
                .map(|(&r, a)| (r, a.last_write))
                .collect()
        };
        if !quiet.is_empty() {
            let need_flush = {
                let st = lock(&sh.st);
                quiet.iter().any(|&(_, w)| w > st.flushed_seq)
            };
            let mut ok = true;
            if need_flush {
                let seq = lock(&sh.st).write_seq;
                for dev in route.source.iter().map(|s| &**s).chain(route.target.iter().map(|t| &*t.backend)) {
                    ok &= dev.flush().await.is_ok();
                }
                if ok {
                    let mut st = lock(&sh.st);
                    st.flushed_seq = st.flushed_seq.max(seq);
                }
            }
            if ok {
                let mut st = lock(&sh.st);
                let flushed = st.flushed_seq;
                let mut cleared = false;
                let per = sh.per_chunk;
                for (c, w) in quiet {
                    let still_quiet = st.active.get(&c).is_some_and(|a| a.writers == 0 && a.last_write == w);
                    if still_quiet && w <= flushed {
                        st.active.remove(&c);
                        let n = st.intent.len();
                        let regions = (c * per).min(n)..((c + 1) * per).min(n);
                        st.intent[regions].fill(false);
                        st.intent_gen.remove(&c);
                        cleared = true;
                    }
                }
                if cleared {
                    Journal::bump(&mut st);
                }
            }
        }
        drop(route);
        // 3. Write the file if anything changed.
        let gen_now = lock(&sh.st).gen;
        if gen_now > written_gen {
            let (gen, img) = snapshot(&sh, &*mirror);
            let res = {
                let mut f = lock(&sh.file);
                match f.as_mut() {
                    Some(f) => f.write(&img),
                    None => Ok(()),
                }
            };
            match res {
                Ok(()) => {
                    sh.writes.fetch_add(1, Ordering::Relaxed);
                    written_gen = gen;
                    *lock(&sh.failed) = None;
                    let mut st = lock(&sh.st);
                    st.intent_gen.retain(|_, g| *g > gen);
                    drop(st);
                    sh.durable.send_replace(gen);
                }
                Err(e) => {
                    tracing::error!("cannot write the state file: {e}");
                    *lock(&sh.failed) = Some(format!("cannot write the state file: {e}"));
                }
            }
        }
        if sh.stop.load(Ordering::SeqCst) && lock(&sh.st).gen <= written_gen {
            return;
        }
    }
}

impl Journal {
    /// The journal of a device starting from `img`, persisted through `file`.
    pub(crate) fn open(img: &StateImage, file: StateFile) -> Journal {
        Journal::new(img, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::statefile::fresh_image;

    fn writers(j: &Journal, chunk: usize) -> u32 {
        lock(&j.sh.st).active.get(&chunk).map_or(0, |a| a.writers)
    }

    /// A write cancelled while it waits for its intent to be durable (the
    /// persister is not running here, so it never is) leaves no writer behind:
    /// the guard exists from the moment the count went up.
    #[test]
    fn a_cancelled_write_leaves_no_writer_count_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = fresh_image(DeviceState::Syncing, 16, 64 << 20, None, None);
        let file = StateFile::create(&dir.path().join("st"), &img).expect("state file");
        let j = Journal::open(&img, file);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let cancelled = tokio::time::timeout(Duration::from_millis(50), j.begin_write(0..3)).await;
            assert!(cancelled.is_err(), "the intent cannot become durable without the persister");
        });
        assert_eq!(writers(&j, 0), 0, "the cancelled write's count was released");
        // Once durable, a write holds its count until its guard is dropped.
        j.sh.durable.send_replace(u64::MAX);
        let guard = rt.block_on(j.begin_write(0..3)).expect("durable intent");
        assert_eq!(writers(&j, 0), 1);
        drop(guard);
        assert_eq!(writers(&j, 0), 0, "the finished write's count was released");
    }
}
