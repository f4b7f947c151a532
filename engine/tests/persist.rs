//! Write-intent ordering and resume, checked deterministically in-process.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::pattern;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::backend::{HookFuture, IoHooks, IoKind};
use engine::startup::{start, StartOptions};
use engine::statefile::{self, Loaded, StateFile};
use engine::{rt, Backend, DeviceState, IoBuf, MirrorConfig, OpenOptions};

const R: u64 = 64 << 10;

/// Start options for source `s` mirrored to `t` with the state file `st`.
fn mirrored(s: &Path, t: &Path, st: &Path) -> StartOptions {
    StartOptions {
        source: Some(s.to_path_buf()),
        target: Some(t.to_path_buf()),
        state: Some(st.to_path_buf()),
        ..Default::default()
    }
}

fn cfg() -> MirrorConfig {
    MirrorConfig { region_size: R, min_rate: u64::MAX, ..Default::default() }
}

async fn wait_state(m: &engine::Mirror, want: DeviceState) {
    for _ in 0..2000 {
        if m.state() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("state {want} not reached: {:?}", m.status());
}

fn intent_on_disk(state: &Path, region: usize) -> bool {
    match statefile::load(state).expect("read state") {
        Loaded::Valid(img) => img.intent[region],
        other => panic!("state file unreadable: {other:?}"),
    }
}

/// Records, for every source write to `region`, whether the state file already
/// said "intent" for it when the write was issued.
struct CheckIntentFirst {
    state: PathBuf,
    region: usize,
    seen: Mutex<Vec<bool>>,
}

impl IoHooks for CheckIntentFirst {
    fn before(&self, kind: IoKind, offset: u64, len: u64) -> HookFuture<'_> {
        let r = self.region as u64;
        if kind == IoKind::Write && offset < (r + 1) * R && r * R < offset + len {
            let on_disk = intent_on_disk(&self.state, self.region);
            self.seen.lock().unwrap().push(on_disk);
        }
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn a_write_to_a_clean_region_waits_for_its_intent_bit_on_disk_and_the_bit_is_cleared_later() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t, st) = (dir.path().join("s"), dir.path().join("t"), dir.path().join("state"));
    std::fs::write(&s, pattern(1, (16 * R) as usize)).unwrap();
    std::fs::File::create(&t).and_then(|f| f.set_len(16 * R)).unwrap();
    rt::block_on(async {
        let opts =
            StartOptions { source: Some(s.clone()), target: None, state: Some(st.clone()), ..Default::default() };
        let started = start(&opts, cfg()).expect("start");
        let m = started.mirror;
        let hook = Arc::new(CheckIntentFirst { state: st.clone(), region: 5, seen: Mutex::new(Vec::new()) });
        // Hooks apply to targets attached from now on.
        m.set_target_hooks(Some(hook.clone()));
        m.attach(&t).await.expect("attach");
        wait_state(&m, DeviceState::Synced).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!intent_on_disk(&st, 5));
        hook.seen.lock().unwrap().clear();
        m.write(5 * R + 77, IoBuf::from_slice(&[9; 3000]), false).await.expect("write");
        let seen = hook.seen.lock().unwrap().clone();
        assert_eq!(seen, vec![true], "the target leg was issued before the intent bit was durable");
        assert!(intent_on_disk(&st, 5), "the bit stays while the region is active");
        // Quiet for longer than the clearing bound: both legs get flushed and the
        // bit is cleared (the contract says within 5 s).
        let mut cleared = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !intent_on_disk(&st, 5) {
                cleared = true;
                break;
            }
        }
        assert!(cleared, "intent bit not cleared within 5 s of the region going quiet");
        m.shutdown().await.expect("shutdown");
    })
    .unwrap();
}

#[test]
fn intent_regions_are_dirty_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t, st) = (dir.path().join("s"), dir.path().join("t"), dir.path().join("state"));
    let data = pattern(2, (8 * R) as usize);
    std::fs::write(&s, &data).unwrap();
    // T equals S except in regions 2 and 6, as after a crash between the legs
    // of two writes: the state file says clean everywhere, intent on 2 and 6.
    let mut tdata = data.clone();
    tdata[(2 * R + 100) as usize] ^= 0xff;
    tdata[(6 * R + 4000) as usize] ^= 0x0f;
    std::fs::write(&t, &tdata).unwrap();
    let open =
        |p: &Path| Backend::open(p, &OpenOptions { lock: engine::DeviceLock::None, ..Default::default() }).unwrap();
    let (sb, tb) = (open(&s), open(&t));
    let mut img = statefile::fresh_image(DeviceState::Synced, 16, 8 * R, Some(&sb), Some(&tb));
    img.clean.fill(true);
    img.intent.set(2, true);
    img.intent.set(6, true);
    assert_eq!(img.source, Some(sb.ident()));
    drop((sb, tb));
    StateFile::create(&st, &img).unwrap();
    rt::block_on(async {
        let opts = mirrored(&s, &t, &st);
        let started = start(&opts, cfg()).expect("resume");
        assert!(started.resumed_sync, "intent regions make the device sync again");
        let m = started.mirror;
        let status = m.status();
        assert_eq!(status.state, DeviceState::Syncing);
        assert_eq!(status.regions_clean, 6);
        m.resume_copier().unwrap();
        wait_state(&m, DeviceState::Synced).await;
        assert!(m.verify().await.unwrap().mismatches.is_empty());
        m.shutdown().await.unwrap();
    })
    .unwrap();
    assert!(std::fs::read(&t).unwrap() == data, "the target was repaired from the source");
}

#[test]
fn an_already_durable_intent_bit_costs_no_state_write() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t, st) = (dir.path().join("s"), dir.path().join("t"), dir.path().join("state"));
    std::fs::write(&s, pattern(3, (4 * R) as usize)).unwrap();
    std::fs::File::create(&t).and_then(|f| f.set_len(4 * R)).unwrap();
    rt::block_on(async {
        let opts = mirrored(&s, &t, &st);
        let started = start(&opts, cfg()).expect("start");
        let m = started.mirror;
        m.attach(&t).await.expect("attach");
        wait_state(&m, DeviceState::Synced).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let j = m.journal().expect("journal");
        m.write(R, IoBuf::from_slice(&[1; 10]), false).await.unwrap();
        let after_first = j.state_writes();
        for i in 0..200u64 {
            m.write(R + i * 10, IoBuf::from_slice(&[i as u8; 10]), false).await.unwrap();
        }
        assert_eq!(j.state_writes(), after_first, "writes to a region with a durable bit caused state writes");
        // One chunk of intent bits (4 MiB of 64 KiB regions, cut at the end of
        // this small export).
        assert_eq!(j.intent_count(), 4);
        m.shutdown().await.unwrap();
    })
    .unwrap();
}

#[test]
fn the_copy_floor_set_at_runtime_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, st) = (dir.path().join("s"), dir.path().join("state"));
    std::fs::write(&s, pattern(4, (4 * R) as usize)).unwrap();
    let opts = StartOptions { source: Some(s.clone()), state: Some(st.clone()), ..Default::default() };
    rt::block_on(async {
        let m = start(&opts, cfg()).expect("start").mirror;
        m.set_min_rate(5 << 20).await.expect("set-min-rate");
        m.set_rate(7 << 20).await.expect("set-rate");
        m.shutdown().await.unwrap();
    })
    .unwrap();
    rt::block_on(async {
        let m = start(&opts, cfg()).expect("restart").mirror;
        let got = m.settings();
        assert_eq!((got.min_rate, got.max_rate, got.paused), (5 << 20, 7 << 20, false));
        m.shutdown().await.unwrap();
    })
    .unwrap();
    let explicit = StartOptions { min_rate_explicit: true, ..opts.clone() };
    rt::block_on(async {
        let m = start(&explicit, MirrorConfig { min_rate: 1 << 20, ..cfg() }).expect("restart").mirror;
        assert_eq!(m.settings().min_rate, 1 << 20, "a floor given at start wins");
        assert_eq!(m.settings().max_rate, 7 << 20);
        m.shutdown().await.unwrap();
    })
    .unwrap();
}
