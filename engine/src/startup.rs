//! Opening a device at daemon start: fresh, or resumed from a state file.
//!
//! | state file says | what happens |
//! | --- | --- |
//! | (no file) | serve the source; `--target` is attached fresh |
//! | `serving`, `degraded` | serve the source (discarded marks kept); `--target` starts a fresh sync |
//! | `syncing`, `synced` | reopen S and T, clean = persisted clean minus intent regions; the copy continues |
//! | `source-detached` | serve T alone (`--source` is ignored: it is stale); `--restart-sync` refused; a later `attach` is a second migration |
//! | `syncing`, `synced`, T differs | `--target` names it: the sync starts over onto it (said in the log and events); T only from the file: refused, unless `--restart-sync` |
//! | corrupt, or S differs | refused with the reason, unless `--restart-sync` |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, LockMode, OpenOptions, OverlayDevice, OverlayOptions};
use crate::buf::{IoBuf, SharedBuf};
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::mirror::{Mirror, MirrorConfig, Parts};
use crate::regions::validate_region_size;
use crate::regions::Bits;
use crate::stacking;
use crate::state::DeviceState;
use crate::statefile::{self, Loaded, StateFile, StateImage};

#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub source: Option<PathBuf>,
    pub target: Option<PathBuf>,
    /// Serve the source through a copy-on-write overlay (`--overlay`): the
    /// source is only read.
    pub overlay: Option<OverlayOptions>,
    pub state: Option<PathBuf>,
    pub restart_sync: bool,
    /// The region size was given on the command line (else a state file's wins).
    pub region_size_explicit: bool,
    /// `--max-rate` / `--min-rate` were given on the command line (else the
    /// rates last set at runtime, recorded in the state file, apply).
    pub max_rate_explicit: bool,
    pub min_rate_explicit: bool,
    /// The state file was written by the process this one takes over from
    /// (`livemirror upgrade`), which flushed and closed both devices an
    /// instant ago: the sampled comparison of copied regions is skipped (it
    /// would only read, while the export waits).
    pub handed_over: bool,
}

/// A started device and what the caller still has to do.
pub struct Started {
    pub mirror: Arc<Mirror>,
    /// Attach this target (a fresh sync) once the daemon runs.
    pub attach: Option<PathBuf>,
    /// The device resumed a sync: call `resume_copier` once the daemon runs.
    pub resumed_sync: bool,
}

fn open(path: &Path, writable: bool, cfg: &MirrorConfig) -> Result<Backend> {
    // A restarted daemon waits here until the killed one's I/O has drained:
    // the kernel releases the exclusive claims only then.
    cfg.opener.0.open(path, None, &OpenOptions { writable, cache: cfg.cache, lock: LockMode::Wait })
}

/// Opens the source: as it is, or read-only under its overlay.
fn open_source(path: &Path, cfg: &MirrorConfig, overlay: Option<&OverlayOptions>) -> Result<Backend> {
    let Some(o) = overlay else { return open(path, !cfg.read_only, cfg) };
    // Only read, never written, so neither locked nor claimed: other readers
    // (the loop device a live medium still has) may share it.
    let base =
        cfg.opener.0.open(path, None, &OpenOptions { writable: false, cache: cfg.cache, lock: LockMode::None })?;
    Ok(Backend::Overlay(Box::new(OverlayDevice::open(base, o)?)))
}

fn refuse_or_restart<T>(restart: bool, why: String, fresh: impl FnOnce() -> Result<T>) -> Result<T> {
    if restart {
        tracing::warn!("{why}; starting over (--restart-sync)");
        fresh()
    } else {
        Err(Error::Refused(format!("{why}; pass --restart-sync to start over")))
    }
}

/// The block device a state file lives on must not be the export itself
/// (writing it would need the export to make progress: a deadlock).
fn check_state_location(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(m) = std::fs::metadata(crate::hostfs::locate(dir, None)) {
        let major = ((m.dev() >> 32) & 0xffff_f000) | ((m.dev() >> 8) & 0xfff);
        if major == 43 {
            return Err(Error::Refused(format!(
                "the state file {} is on an NBD device; it must not live on the export (put it on /run or another disk)",
                path.display()
            )));
        }
    }
    Ok(())
}

pub fn start(opts: &StartOptions, mut cfg: MirrorConfig) -> Result<Started> {
    let mut shift = validate_region_size(cfg.region_size).map_err(Error::InvalidConfig)?;
    let Some(state_path) = &opts.state else {
        let source = opts.source.as_ref().ok_or_else(|| Error::InvalidConfig("--source is required".into()))?;
        let s = open_source(source, &cfg, opts.overlay.as_ref())?;
        let mirror = Mirror::new(s, cfg)?;
        return Ok(Started { mirror, attach: opts.target.clone(), resumed_sync: false });
    };
    check_state_location(state_path)?;
    let loaded = statefile::load(state_path)
        .map_err(|e| Error::io(format!("cannot read the state file {}", state_path.display()), e))?;
    if let Some(set) = match &loaded {
        Loaded::Valid(img) => img.settings,
        _ => None,
    } {
        // Runtime settings survive a restart, unless given again now.
        if !opts.max_rate_explicit {
            cfg.max_rate = set.max_rate;
        }
        if !opts.min_rate_explicit {
            cfg.min_rate = set.min_rate;
        }
    }
    if let Loaded::Valid(img) = &loaded {
        let from_file =
            img.region_shift != shift && (!opts.region_size_explicit || img.state == DeviceState::SourceDetached);
        if from_file {
            // Serving the target alone does not use regions for routing; and
            // without an explicit --region-size the recorded one applies.
            shift = img.region_shift;
            cfg.region_size = 1 << shift;
        }
    }
    let fresh = || fresh_start(opts, state_path, shift, cfg.clone());
    let img = match loaded {
        Loaded::Missing => return fresh(),
        Loaded::Corrupt(why) => {
            return refuse_or_restart(
                opts.restart_sync,
                format!("the state file {} is corrupt ({why})", state_path.display()),
                fresh,
            )
        }
        Loaded::Valid(img) => *img,
    };
    if img.state == DeviceState::SourceDetached {
        if opts.restart_sync {
            return Err(Error::Refused(format!(
                "the state file {} says the source was detached: the source is stale and starting over would \
                 destroy data; serve the target alone (without --source and --restart-sync)",
                state_path.display()
            )));
        }
        return resume_target_only(opts, state_path, img, cfg);
    }
    if img.region_shift != shift {
        return refuse_or_restart(
            opts.restart_sync,
            format!(
                "the state file {} was written with --region-size {}, not {}",
                state_path.display(),
                1u64 << img.region_shift,
                cfg.region_size
            ),
            fresh,
        );
    }
    let (source_path, target_path) = chain_paths(opts, &img);
    let source_path = source_path.ok_or_else(|| {
        Error::InvalidConfig(format!(
            "--source is required: the state file {} says {}",
            state_path.display(),
            img.state
        ))
    })?;
    let s = open_source(&source_path, &cfg, opts.overlay.as_ref())?;
    if let Some(why) = img.source.as_ref().and_then(|rec| rec.differs(&s.ident())) {
        drop(s);
        return refuse_or_restart(opts.restart_sync, format!("the source does not match the state file: {why}"), fresh);
    }
    if opts.restart_sync {
        drop(s);
        return fresh();
    }
    match img.state {
        DeviceState::Serving | DeviceState::Degraded => {
            if img.state == DeviceState::Degraded {
                tracing::info!(
                    "the previous run had dropped its target after an error; a new attach starts a fresh sync"
                );
            }
            let bitmaps = (
                bitvec::bitvec![u64, bitvec::order::Lsb0; 0; img.regions()],
                img.discarded.clone(),
                img.unverifiable.clone(),
            );
            let mirror = assemble(state_path, &img, cfg, DeviceState::Serving, Some(s), None, Some(bitmaps))?;
            Ok(Started { mirror, attach: opts.target.clone(), resumed_sync: false })
        }
        DeviceState::Syncing | DeviceState::Synced => {
            let Some(rec_t) = img.target.clone() else {
                return Err(Error::Refused(format!(
                    "the state file {} is {} without a target",
                    state_path.display(),
                    img.state
                )));
            };
            let tpath = target_path.unwrap_or_else(|| rec_t.path.clone());
            let t = open(&tpath, true, &cfg)?;
            if let Some(why) = rec_t.differs(&t.ident()) {
                drop((s, t));
                let why = format!("the target {} does not match the state file: {why}", tpath.display());
                if opts.restart_sync {
                    return refuse_or_restart(true, why, fresh);
                }
                if opts.target.is_none() {
                    // The path came from the state file alone: it now names
                    // another device, which nobody asked us to overwrite.
                    return Err(Error::Refused(format!(
                        "{why}; name it with --target to copy everything onto it again \
                         (--restart-sync starts over without a target)"
                    )));
                }
                // The source matched, and the command line names this target:
                // what it holds is unknown, so the copy starts from nothing.
                tracing::warn!("{why}; the sync starts over");
                let started = fresh()?;
                started.mirror.event(format!("{why}: the sync starts over"));
                return Ok(started);
            }
            stacking::check_target_is_independent(&s, &t)?;
            // Regions with a write in flight at the crash are dirty again.
            let mut clean = img.clean.clone();
            clean &= !img.intent.clone();
            let intents = img.intent.count_ones();
            // The identity matched; the contents must too. Where a sample of the
            // copied regions differs, T is not what the state file says: copy
            // everything again rather than serve stale T data.
            let mut verifiable = clean.clone();
            verifiable &= !img.unverifiable.clone();
            let mismatch = if opts.handed_over {
                None
            } else {
                resume_check(&s, &t, &verifiable, img.region_shift, img.export_size)?
            };
            if let Some(why) = &mismatch {
                tracing::warn!("{why}: starting the sync over");
                clean.fill(false);
            }
            let state = if clean.all() { DeviceState::Synced } else { DeviceState::Syncing };
            let bitmaps = (clean, img.discarded.clone(), img.unverifiable.clone());
            let mirror = assemble(state_path, &img, cfg, state, Some(s), Some(t), Some(bitmaps))?;
            if let Some(why) = mismatch {
                mirror.event(format!("{why}: the sync starts over"));
            } else if intents > 0 {
                mirror.event(format!("{intents} regions had writes in flight at the crash: copied again"));
            }
            Ok(Started { mirror, attach: None, resumed_sync: state == DeviceState::Syncing })
        }
        DeviceState::SourceDetached => unreachable!("handled above"),
    }
}

/// The source and target to open for a resume: what the command line names,
/// else what the state file recorded. A command line with `--target` alone that
/// names the recorded *source* is the one of a first migration, restarted after
/// a second one (the device served then is the source now): it resumes the
/// recorded chain.
fn chain_paths(opts: &StartOptions, img: &StateImage) -> (Option<PathBuf>, Option<PathBuf>) {
    let recorded_source = img.source.as_ref().map(|d| d.path.clone());
    let recorded_target = img.target.as_ref().map(|d| d.path.clone());
    match (&opts.source, &opts.target) {
        (Some(s), t) => (Some(s.clone()), t.clone()),
        (None, Some(t)) if recorded_source.as_ref() == Some(t) => {
            tracing::info!(
                "{} is the source of the sync recorded in the state file (a second migration); resuming it",
                t.display()
            );
            (recorded_source, recorded_target)
        }
        (None, t) => (recorded_source, t.clone()),
    }
}

fn assemble(
    state_path: &Path,
    img: &StateImage,
    cfg: MirrorConfig,
    state: DeviceState,
    source: Option<Backend>,
    target: Option<Backend>,
    bitmaps: Option<(crate::regions::Bits, crate::regions::Bits, crate::regions::Bits)>,
) -> Result<Arc<Mirror>> {
    let file = StateFile::open(state_path, img)
        .map_err(|e| Error::io(format!("cannot open the state file {}", state_path.display()), e))?;
    let mut jimg = img.clone();
    jimg.state = state;
    if let Some((clean, _, _)) = &bitmaps {
        jimg.clean = clean.clone();
    }
    let journal = Journal::open(&jimg, file);
    journal.set_state(state, source.as_ref(), target.as_ref());
    let export_size = img.export_size;
    let m = Mirror::assemble(cfg, Parts { state, source, target, export_size, bitmaps, journal: Some(journal) })?;
    m.restore_settings(img.settings);
    Ok(m)
}

fn fresh_start(opts: &StartOptions, state_path: &Path, shift: u32, cfg: MirrorConfig) -> Result<Started> {
    let source = opts.source.as_ref().ok_or_else(|| Error::InvalidConfig("--source is required".into()))?;
    let s = open_source(source, &cfg, opts.overlay.as_ref())?;
    let img = statefile::fresh_image(DeviceState::Serving, shift, s.size(), Some(&s), None);
    let file = StateFile::create(state_path, &img)
        .map_err(|e| Error::io(format!("cannot create the state file {}", state_path.display()), e))?;
    let journal = Journal::open(&img, file);
    let export_size = s.size();
    let mirror = Mirror::assemble(
        cfg,
        Parts {
            state: DeviceState::Serving,
            source: Some(s),
            target: None,
            export_size,
            bitmaps: None,
            journal: Some(journal),
        },
    )?;
    Ok(Started { mirror, attach: opts.target.clone(), resumed_sync: false })
}

fn resume_target_only(opts: &StartOptions, state_path: &Path, img: StateImage, cfg: MirrorConfig) -> Result<Started> {
    if let Some(s) = &opts.source {
        tracing::warn!(
            "ignoring --source {}: the state file says the source was detached and it is stale",
            s.display()
        );
    }
    if let Some(o) = &opts.overlay {
        // Never made again: the detached source and its overlay are gone.
        tracing::warn!("ignoring --overlay {}: the source was detached", o.path.display());
    }
    let rec_t = img.target.clone().ok_or_else(|| {
        Error::Refused(format!("the state file {} is source-detached without a target", state_path.display()))
    })?;
    let tpath = opts.target.clone().unwrap_or_else(|| rec_t.path.clone());
    let t = open(&tpath, !cfg.read_only, &cfg)?;
    if let Some(why) = rec_t.differs(&t.ident()) {
        return Err(Error::Refused(format!("the target does not match the state file: {why}")));
    }
    if t.size() < img.export_size {
        return Err(Error::Refused(format!(
            "the target holds {} bytes, less than the recorded export size {}",
            t.size(),
            img.export_size
        )));
    }
    let n = img.regions();
    let all = bitvec::bitvec![u64, bitvec::order::Lsb0; 1; n];
    let none = bitvec::bitvec![u64, bitvec::order::Lsb0; 0; n];
    let bitmaps = (all, none.clone(), none);
    let mirror = assemble(state_path, &img, cfg, DeviceState::SourceDetached, None, Some(t), Some(bitmaps))?;
    Ok(Started { mirror, attach: None, resumed_sync: false })
}

/// Regions compared at resume: the most recently copied ones (the copier goes
/// in ascending order, so the highest clean regions), the first ones, and some
/// spread over the rest.
const RESUME_SAMPLES_LAST: usize = 8;
const RESUME_SAMPLES_FIRST: usize = 4;
const RESUME_SAMPLES_SPREAD: usize = 20;
/// Bytes compared per sampled region (from its start).
const RESUME_SAMPLE_BYTES: u64 = 256 << 10;

/// Which clean regions the resume check reads.
fn resume_samples(clean: &Bits) -> Vec<usize> {
    let ones: Vec<usize> = clean.iter_ones().collect();
    if ones.is_empty() {
        return Vec::new();
    }
    let mut pick: Vec<usize> = ones.iter().rev().take(RESUME_SAMPLES_LAST).copied().collect();
    pick.extend(ones.iter().take(RESUME_SAMPLES_FIRST));
    let step = (ones.len() / RESUME_SAMPLES_SPREAD).max(1);
    pick.extend(ones.iter().step_by(step).take(RESUME_SAMPLES_SPREAD));
    pick.sort_unstable();
    pick.dedup();
    pick
}

/// Runs [`resume_samples_differ`] on a thread of its own, so that it works
/// whether or not the caller is already on an engine thread.
fn resume_check(s: &Backend, t: &Backend, clean: &Bits, shift: u32, export_size: u64) -> Result<Option<String>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| crate::rt::block_on(resume_samples_differ(s, t, clean, shift, export_size)))
            .join()
            .map_err(|_| Error::io("the resume check failed", std::io::Error::other("its thread panicked")))?
            .map_err(|e| Error::io("cannot run the resume check", e))?
    })
}

/// Compares samples of the regions recorded as copied between S and T.
/// `Some(why)` when one differs.
async fn resume_samples_differ(
    s: &Backend,
    t: &Backend,
    clean: &Bits,
    shift: u32,
    export_size: u64,
) -> Result<Option<String>> {
    for r in resume_samples(clean) {
        let off = (r as u64) << shift;
        let len = ((1u64 << shift).min(RESUME_SAMPLE_BYTES)).min(export_size - off) as usize;
        let sb = SharedBuf::new(IoBuf::new(len));
        let tb = SharedBuf::new(IoBuf::new(len));
        s.read_at(&sb, 0, len, off)
            .await
            .map_err(|e| Error::io(format!("resume check: reading {} at offset {off}", s.path().display()), e))?;
        if let Err(e) = t.read_at(&tb, 0, len, off).await {
            return Ok(Some(format!(
                "the target {} cannot be read where the state file says it was copied (offset {off}: {e})",
                t.path().display()
            )));
        }
        // SAFETY: both reads completed; the buffers are only read now.
        let (a, b) = unsafe { (sb.slice(0, len), tb.slice(0, len)) };
        if let Some(at) = a.iter().zip(b).position(|(x, y)| x != y) {
            return Ok(Some(format!(
                "the target {} differs from the source at offset {}, in a region the state file records as copied",
                t.path().display(),
                off + at as u64
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_samples_include_the_last_copied_regions() {
        let mut clean = bitvec::bitvec![u64, bitvec::order::Lsb0; 0; 1000];
        clean[..400].fill(true);
        let s = resume_samples(&clean);
        for r in 392..400 {
            assert!(s.contains(&r), "region {r}, among the last copied, is not sampled: {s:?}");
        }
        assert!(s.contains(&0));
        assert!(s.iter().all(|&r| r < 400), "only clean regions are sampled");
        assert!(s.len() <= RESUME_SAMPLES_LAST + RESUME_SAMPLES_FIRST + RESUME_SAMPLES_SPREAD);
        assert!(resume_samples(&bitvec::bitvec![u64, bitvec::order::Lsb0; 0; 10]).is_empty());
    }
}
