//! State changes: attach, synced, the failure paths, detach, grow, pause,
//! rate, shutdown. Every one asks [`DeviceState::next`] first.
//!
//! # Ordering
//! Two locks order state changes:
//! - `transition` (held for a whole command, barrier waits included) makes
//!   commands such as attach and detach-source run one at a time;
//! - `state_lock` (held only to persist and install a route, never across a
//!   barrier) also serialises the failure paths, which run inside requests
//!   that hold the old route and so must never wait for a barrier.
//!
//! A change that makes writes skip a leg is persisted before it is installed,
//! so no write that skipped the leg can be acknowledged before the state file
//! says so.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Mirror;
use crate::backend::{Backend, LockMode, OpenOptions};
use crate::copier::{BoxFuture, CopyJob, CopyOwner};
use crate::error::{Error, Result};
use crate::route::{Route, Target};
use crate::stacking;
use crate::state::{DeviceState, Refusal, Transition};
use crate::statefile::Settings;
use crate::status::EventKind;
use crate::sync::lock;

fn refused(r: Refusal) -> Error {
    Error::Refused(r.to_string())
}

/// The devices of the route a change installs.
type Devices = (Option<Arc<Backend>>, Option<Arc<Target>>);

impl Mirror {
    /// Persists and installs the route `t` leads to, if the table allows `t`
    /// from the current state and `pick` agrees with the current route (it
    /// returns the devices of the new route, or `None` if the route is not the
    /// one the caller meant). Returns the old route's drain signal, or the
    /// refusal.
    async fn change_route(
        &self,
        t: Transition,
        pick: impl FnOnce(&Route) -> Option<Devices>,
    ) -> Result<std::result::Result<oneshot::Receiver<()>, Refusal>> {
        let _s = self.state_lock.lock().await;
        let current = self.route();
        let state = match current.state.next(t) {
            Ok(s) => s,
            Err(r) => return Ok(Err(r)),
        };
        let Some((source, target)) = pick(&current) else {
            return Ok(Err(Refusal { state: current.state, transition: t, reason: "the devices changed meanwhile" }));
        };
        drop(current);
        if let Some(j) = &self.journal {
            j.set_state(state, source.as_deref(), target.as_ref().map(|t| &*t.backend));
            j.persist().await?;
        }
        let (route, drained) = Route::new(state, source, target);
        let mut slot = lock(&self.route);
        slot.current = route;
        Ok(Ok(slot.drained.replace(drained).unwrap_or_else(|| oneshot::channel().1)))
    }

    /// Waits until every request that took the old route has completed.
    async fn barrier(rx: oneshot::Receiver<()>) {
        // Resolves (with an error) when the old route's sender is dropped.
        let _ = rx.await;
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
        route.state.next(Transition::Attach).map_err(refused)?;
        let Some(source) = copy_source(&route) else {
            return Err(Error::Internal(format!("no device to copy from in state {}", route.state)));
        };
        let second_migration = route.source.is_none();
        drop(route);
        // A copier of a failed target may still be winding down with it open.
        self.join_copier().await;
        let target = self.open_target(path, viewer, &source)?;
        let tsize = target.size();
        self.check_target_fits(&target, tsize)?;
        let target = Target::new(target);
        {
            let mut map = self.map.lock();
            map.set_all_dirty();
            map.clear_unverifiable();
        }
        if let Some(j) = &self.journal {
            j.reset_clean();
        }
        self.copier.reset();
        self.set_error(None);
        let t2 = target.clone();
        let s2 = source.clone();
        let rx = self
            .change_route(Transition::Attach, move |old| {
                copy_source(old).is_some_and(|s| Arc::ptr_eq(&s, &s2)).then(|| (Some(s2), Some(t2)))
            })
            .await?
            .map_err(refused)?;
        Self::barrier(rx).await;
        *lock(&self.source_path) = Some(source.path().to_path_buf());
        *lock(&self.target_path) = Some(path.to_path_buf());
        self.state_event(if second_migration {
            format!(
                "attached target {} ({} bytes); sync started from {}, the device served until now",
                path.display(),
                tsize,
                source.path().display()
            )
        } else {
            format!("attached target {} ({} bytes); sync started", path.display(), tsize)
        });
        self.start_copier(target)
    }

    pub(crate) fn open_target(&self, path: &Path, viewer: Option<u32>, source: &Backend) -> Result<Backend> {
        // Before opening: our own exclusive lock on S would otherwise make S
        // look "in use by another process".
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let (Ok(meta), Some(s)) = (std::fs::metadata(crate::hostfs::locate(&abs, viewer)), source.identity()) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
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
        let opts = OpenOptions { writable: true, cache: self.cfg.cache, lock: LockMode::Fail };
        let t = self.cfg.opener.0.open(path, viewer, &opts)?;
        stacking::check_target_is_independent(source, &t)?;
        self.prepare_target(t)
    }

    /// Checks the alignment of a freshly opened target (and applies test hooks).
    pub(crate) fn prepare_target(&self, t: Backend) -> Result<Backend> {
        #[cfg(feature = "testing")]
        let t = {
            let mut t = t;
            let forced = self.target_forced_align.load(Ordering::Relaxed);
            if forced > 1 {
                t = t.with_forced_alignment(forced);
            }
            if let Some(h) = lock(&self.target_hooks).clone() {
                t = t.with_hooks(h);
            }
            t
        };
        super::check_alignment(&t, self.region_size())?;
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

    /// Continues the copy of a resumed device in state `syncing`.
    pub fn resume_copier(self: &Arc<Self>) -> Result<()> {
        let r = self.route();
        if r.state != DeviceState::Syncing {
            return Ok(());
        }
        let Some(t) = r.target.clone() else { return Ok(()) };
        drop(r);
        let (clean, total) = {
            let m = self.map.lock();
            (m.clean_count(), m.len())
        };
        self.event(format!("resuming the sync: {clean} of {total} regions already clean"));
        self.start_copier(t)
    }

    /// Waits until the copier thread (if any) has exited.
    pub(crate) async fn join_copier(&self) {
        let handle = lock(&self.copier_thread).take();
        if let Some(h) = handle {
            // It exits at its next step once its target is no longer the route's.
            self.copier.wake.notify_waiters();
            if tokio::task::spawn_blocking(move || h.join()).await.is_err() {
                tracing::error!("the copier thread could not be joined");
            }
        }
    }

    fn start_copier(self: &Arc<Self>, target: Arc<Target>) -> Result<()> {
        const COPIER_NICE: libc::c_int = 10;
        let owner: Arc<dyn CopyOwner> = self.clone();
        let job = Arc::new(CopyJob {
            owner,
            map: self.map.clone(),
            locks: self.locks.clone(),
            pool: self.pool.clone(),
            journal: self.journal.clone(),
            ctl: self.copier.clone(),
            fg: self.fg.clone(),
            target,
            region_size: self.region_size(),
            queue_depth: self.cfg.queue_depth,
            copy_chunk: self.cfg.copy_chunk,
            detect_zeroes: self.cfg.detect_zeroes,
        });
        let ctl = self.copier.clone();
        let mut slot = lock(&self.copier_thread);
        if let Some(old) = slot.take() {
            // A previous copier exits as soon as it sees that its target is no
            // longer the route's; it holds no locks by then.
            if !old.is_finished() {
                let _ = old.join();
            }
        }
        ctl.running.store(true, Ordering::SeqCst);
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
                if let Err(e) = crate::rt::block_on(crate::copier::run(job)) {
                    *lock(&ctl.error) = Some(format!("copier could not start: {e}"));
                }
                ctl.running.store(false, Ordering::SeqCst);
            })
            .map_err(|e| Error::io("cannot start the copier thread", e))?;
        *slot = Some(handle);
        Ok(())
    }

    /// Called by the copier when nothing is dirty: flush T, then `synced`.
    pub(crate) async fn finish_sync(&self, target: &Arc<Target>) -> Result<bool> {
        let _t = self.transition.lock().await;
        if !self.route().is_syncing_to(target) || !self.map.lock().all_clean() {
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
            j.mark_all_clean_durable();
        }
        let changed = self
            .change_route(Transition::SyncComplete, |r| {
                r.is_syncing_to(target).then(|| (r.source.clone(), r.target.clone()))
            })
            .await?;
        let Ok(rx) = changed else { return Ok(false) };
        Self::barrier(rx).await;
        self.state_event("synced: every region is on the target; reads now come from it".into());
        Ok(true)
    }

    /// Drops the failed target: `degraded`. Returns once no read can reach it.
    pub(crate) async fn fail_target(&self, target: &Arc<Target>, reason: String) {
        // New reads avoid T from here on; those inside the gate are awaited below.
        target.stop_reads();
        let changed = self
            .change_route(Transition::TargetFailed, |r| {
                (r.has_target(target) && r.source.is_some()).then(|| (r.source.clone(), None))
            })
            .await;
        target.close_reads().await;
        match changed {
            Ok(Ok(_)) => {
                self.set_error(Some(reason.clone()));
                self.copier.wake.notify_waiters();
                // The error, then the state change it caused: a script that
                // follows errors sees every one with kind "error".
                self.error_event(reason);
                self.state_event("degraded: the target was dropped after that error; the source serves alone".into());
            }
            // Another request dropped it first, or it is no longer attached.
            Ok(Err(_)) => {}
            Err(e) => {
                // The route did not change; the target stays closed for reads
                // and every later write keeps failing over to here.
                tracing::error!("cannot persist the degraded state: {e}");
                self.set_error(Some(format!("{reason}; and the state could not be persisted: {e}")));
            }
        }
    }

    /// Drops the failed source while synced: `source-detached`. True when the
    /// source is gone (by this call or an earlier one).
    pub(crate) async fn fail_source(&self, source: &Arc<Backend>, reason: String) -> bool {
        let changed = self
            .change_route(Transition::SourceFailed, |r| {
                r.source.as_ref().is_some_and(|s| Arc::ptr_eq(s, source)).then(|| (None, r.target.clone()))
            })
            .await;
        match changed {
            Ok(Ok(_)) => {
                *lock(&self.source_path) = None;
                // Closed when its last request ends; an overlay's file goes too.
                source.retire();
                self.set_error(Some(reason.clone()));
                self.error_event(reason);
                self.state_event(
                    "source-detached: the source was dropped after that error; the target serves alone".into(),
                );
                true
            }
            Ok(Err(_)) => self.route().source.is_none(),
            Err(e) => {
                tracing::error!("cannot persist the source-detached state: {e}");
                false
            }
        }
    }

    /// Releases the source: only from `synced`. Afterwards S is closed.
    pub async fn detach_source(&self) -> Result<()> {
        let _t = self.transition.lock().await;
        let route = self.route();
        if let Err(r) = route.state.next(Transition::DetachSource) {
            let (clean, total) = {
                let m = self.map.lock();
                (m.clean_count(), m.len())
            };
            return Err(Error::Refused(format!(
                "{}, but the state is {} ({clean} of {total} regions clean)",
                r.reason, r.state
            )));
        }
        let source = route.source.clone();
        drop(route);
        // The target must still hold the whole export before the source goes.
        if !self.check_device_sizes().await {
            return Err(Error::Refused(format!(
                "detach-source refused: {}",
                lock(&self.last_error).clone().unwrap_or_else(|| "a device is shorter than the export".into())
            )));
        }
        let rx =
            self.change_route(Transition::DetachSource, |r| Some((None, r.target.clone()))).await?.map_err(refused)?;
        Self::barrier(rx).await;
        if let Some(s) = source {
            // Persisted as source-detached above, so nothing will read S again:
            // an overlay's file goes with it (its RAM comes back).
            s.retire();
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
        self.state().next(Transition::DetachTarget).map_err(refused)?;
        if let Some(j) = &self.journal {
            j.reset_clean();
        }
        let rx =
            self.change_route(Transition::DetachTarget, |r| Some((r.source.clone(), None))).await?.map_err(refused)?;
        if let Some(t) = &target {
            t.stop_reads();
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
        self.map.lock().set_all_dirty();
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
        route.state.next(Transition::Grow).map_err(refused)?;
        self.check_growable()?;
        let Some(t) = route.target.clone() else {
            return Err(Error::Internal("source-detached without a target".into()));
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
        self.map.lock().grow(want);
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

    /// Pauses the copy; returns once no copy I/O is in flight any more (and,
    /// with `--state`, once a restart would find the copy paused too).
    pub async fn pause(&self) -> Result<()> {
        self.state().next(Transition::PauseResume).map_err(refused)?;
        self.copier.pause().await;
        self.persist_settings().await?;
        self.event("copy paused".into());
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        self.state().next(Transition::PauseResume).map_err(refused)?;
        *lock(&self.copier.error) = None;
        self.set_error(None);
        self.copier.unpause();
        self.persist_settings().await?;
        self.event("copy resumed".into());
        Ok(())
    }

    /// Limits the copy rate (0 = unlimited); kept across a restart with `--state`.
    pub async fn set_rate(&self, rate: u64) -> Result<()> {
        self.copier.limiter.set_rate(rate);
        self.copier.wake.notify_waiters();
        self.persist_settings().await?;
        self.event(if rate == 0 {
            "copy rate unlimited".into()
        } else {
            format!("copy rate limited to {rate} bytes/s")
        });
        Ok(())
    }

    /// The copy rate kept while clients are busy; kept across a restart too.
    pub async fn set_min_rate(&self, rate: u64) -> Result<()> {
        self.copier.min_rate.store(rate, Ordering::Relaxed);
        self.persist_settings().await?;
        self.event(format!("copy floor while clients are busy: {rate} bytes/s"));
        Ok(())
    }

    /// The copy settings as they are now.
    pub fn settings(&self) -> Settings {
        Settings {
            max_rate: self.copier.limiter.rate(),
            min_rate: self.copier.min_rate.load(Ordering::Relaxed),
            paused: self.copier.is_paused(),
        }
    }

    /// A copy that was paused before a restart stays paused (startup.rs); the
    /// journal then records the settings in force now (a flag on the command
    /// line may have changed a rate).
    pub(crate) fn restore_settings(&self, recorded: Option<Settings>) {
        if recorded.is_some_and(|s| s.paused) && self.state() == DeviceState::Syncing {
            self.copier.close_for_pause();
        }
        if let Some(j) = &self.journal {
            j.note_settings(self.settings());
        }
    }

    async fn persist_settings(&self) -> Result<()> {
        match &self.journal {
            Some(j) => j.set_settings(self.settings()).await,
            None => Ok(()),
        }
    }

    /// Changes the source overlay's limit (`set-overlay-limit`; None: none).
    /// Not kept across a restart: the command line's `--overlay-limit` applies then.
    pub async fn set_overlay_limit(&self, limit: Option<u64>) -> Result<()> {
        let route = self.route();
        let Some(o) = route.source.as_ref().and_then(|s| s.overlay()) else {
            return Err(Error::Refused("there is no overlay: the source is not served with --overlay".into()));
        };
        o.set_limit(limit)?;
        let path = o.overlay_path().display().to_string();
        self.event(match limit {
            Some(l) => format!("overlay {path}: limit set to {l} bytes"),
            None => format!("overlay {path}: no limit"),
        });
        Ok(())
    }

    /// Stops the copier, flushes every device and persists the state. Requests
    /// must have drained before this is called.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutting_down.store(true, Ordering::SeqCst);
        // The copier sees `shutting_down` at its next step and returns after
        // its in-flight copies complete.
        self.join_copier().await;
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
}

/// The device a new sync copies from: S, or in source-detached the device
/// served now (a second migration).
fn copy_source(route: &Route) -> Option<Arc<Backend>> {
    match (&route.source, &route.target, route.state) {
        (Some(s), _, _) => Some(s.clone()),
        (None, Some(t), DeviceState::SourceDetached) => Some(t.backend.clone()),
        _ => None,
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

impl CopyOwner for Mirror {
    fn route(&self) -> Arc<Route> {
        Mirror::route(self)
    }

    fn shutting_down(&self) -> bool {
        self.is_shutting_down()
    }

    fn export_size(&self) -> u64 {
        self.size()
    }

    fn fail_target<'a>(&'a self, target: &'a Arc<Target>, reason: String) -> BoxFuture<'a, ()> {
        Box::pin(Mirror::fail_target(self, target, reason))
    }

    fn finish_sync<'a>(&'a self, target: &'a Arc<Target>) -> BoxFuture<'a, Result<bool>> {
        Box::pin(Mirror::finish_sync(self, target))
    }

    fn check_device_sizes(&self) -> BoxFuture<'_, bool> {
        Box::pin(Mirror::check_device_sizes(self))
    }

    fn event(&self, kind: EventKind, message: String) {
        self.log_event(kind, message);
    }
}
