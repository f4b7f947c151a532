//! Deterministic replays of the races semantics.md names. Hooks hold an
//! operation at an exact point; the test then checks what may and may not
//! happen meanwhile, releases it, and checks every byte at the end.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::pattern;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engine::testing::{Gate, TestHooks};
use engine::{rt, Backend, DeviceState, IoBuf, IoKind, Mirror, MirrorConfig, OpenOptions};
use tokio::task::spawn_local;

const R: u64 = 64 << 10;

struct Fx {
    _dir: tempfile::TempDir,
    s_path: PathBuf,
    t_path: PathBuf,
    s: Arc<TestHooks>,
    t: Arc<TestHooks>,
    m: Arc<Mirror>,
    model: Vec<u8>,
}

fn fixture(regions: u64, cfg: MirrorConfig, align: u64) -> Fx {
    let dir = tempfile::tempdir().expect("tempdir");
    let s_path = dir.path().join("s.img");
    let t_path = dir.path().join("t.img");
    let model = pattern(1, (regions * R) as usize);
    std::fs::write(&s_path, &model).expect("write source");
    std::fs::File::create(&t_path).and_then(|f| f.set_len(regions * R)).expect("create target");
    let s = TestHooks::new();
    let t = TestHooks::new();
    let mut src = Backend::open(&s_path, &OpenOptions::default()).expect("open source").with_hooks(s.clone());
    if align > 1 {
        src = src.with_forced_alignment(align);
    }
    let m = Mirror::new(src, MirrorConfig { region_size: R, ..cfg }).expect("mirror");
    m.set_target_hooks(Some(t.clone()));
    if align > 1 {
        m.set_target_forced_alignment(align);
    }
    Fx { _dir: dir, s_path, t_path, s, t, m, model }
}

fn serial() -> MirrorConfig {
    // One copy in flight, one region per copy: the copier's position is exact.
    MirrorConfig { queue_depth: 1, copy_chunk: R as usize, min_rate: u64::MAX, ..Default::default() }
}

async fn wait_state(m: &Mirror, want: DeviceState) {
    for _ in 0..2000 {
        if m.state() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("state {want} not reached; status: {:?}", m.status());
}

async fn write(m: &Mirror, model: &mut [u8], off: u64, data: &[u8]) {
    m.write(off, IoBuf::from_slice(data), false).await.expect("write");
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

async fn read(m: &Mirror, off: u64, len: usize) -> Vec<u8> {
    let (r, b) = m.read(off, IoBuf::new(len)).await;
    r.expect("read");
    b.as_slice().to_vec()
}

async fn check_export(m: &Mirror, model: &[u8]) {
    let got = read(m, 0, model.len()).await;
    assert!(
        got == model,
        "export differs from the model at byte {:?}",
        got.iter().zip(model).position(|(a, b)| a != b)
    );
}

fn check_file(p: &Path, model: &[u8]) {
    let got = std::fs::read(p).expect("read file");
    assert!(
        &got[..model.len()] == model,
        "{} differs from the model at byte {:?}",
        p.display(),
        got.iter().zip(model).position(|(a, b)| a != b)
    );
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    rt::block_on(f).expect("runtime");
}

/// Attach while a write is on its way to S only: attach waits for it (barrier),
/// and the copier copies the region only after it.
#[test]
fn attach_during_a_write_to_the_source_only() {
    let mut fx = fixture(16, serial(), 1);
    run(async {
        let gate = Gate::new();
        fx.s.hold(IoKind::Write, 5 * R..6 * R, gate.clone(), Some(1));
        let m = fx.m.clone();
        let data = vec![0xAB; 5000];
        let w = spawn_local(async move { m.write(5 * R + 100, IoBuf::from_slice(&data), false).await });
        gate.wait_arrived(1).await;
        let m = fx.m.clone();
        let t = fx.t_path.clone();
        let a = spawn_local(async move { m.attach(&t).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!a.is_finished(), "attach must wait for the write that chose its legs before it");
        assert!(fx.t.log().is_empty(), "nothing may be copied before the barrier");
        gate.release();
        w.await.expect("join").expect("write");
        fx.model[(5 * R + 100) as usize..(5 * R + 5100) as usize].fill(0xAB);
        a.await.expect("join").expect("attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        assert!(fx.m.verify().await.expect("verify").mismatches.is_empty());
        check_export(&fx.m, &fx.model).await;
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
}

/// A write to a region while the copier copies it waits for the copy, then
/// goes to both devices.
#[test]
fn write_arriving_while_its_region_is_copying() {
    let mut fx = fixture(16, serial(), 1);
    run(async {
        let gate = Gate::new();
        fx.s.hold(IoKind::Read, 3 * R..4 * R, gate.clone(), Some(1));
        fx.m.attach(&fx.t_path).await.expect("attach");
        gate.wait_arrived(1).await; // the copier holds region 3 and is reading S
        let m = fx.m.clone();
        let w = spawn_local(async move { m.write(3 * R + 10, IoBuf::from_slice(&[0x77; 100]), false).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!w.is_finished(), "the write must wait for the copy of its region");
        assert!(fx.s.ops(IoKind::Write, 3 * R..4 * R).is_empty(), "the write has not reached S yet");
        gate.release();
        w.await.expect("join").expect("write");
        fx.model[(3 * R + 10) as usize..(3 * R + 110) as usize].fill(0x77);
        // The region was clean when the write ran: it went to T too.
        assert!(
            fx.t.ops(IoKind::Write, 3 * R + 10..3 * R + 110).len() >= 2,
            "copy and write-through both reached T: {:?}",
            fx.t.log()
        );
        wait_state(&fx.m, DeviceState::Synced).await;
        assert!(fx.m.verify().await.expect("verify").mismatches.is_empty());
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
    check_file(&fx.s_path, &fx.model);
}

/// The copier reaching a region with a write in flight waits for the write and
/// reads S only after it.
#[test]
fn copier_arriving_while_a_write_is_in_flight() {
    let mut fx = fixture(16, serial(), 1);
    run(async {
        let hold_copier = Gate::new();
        fx.t.hold(IoKind::Write, 0..R, hold_copier.clone(), Some(1));
        let hold_write = Gate::new();
        fx.s.hold(IoKind::Write, 10 * R..11 * R, hold_write.clone(), Some(1));
        fx.m.attach(&fx.t_path).await.expect("attach");
        hold_copier.wait_arrived(1).await;
        let m = fx.m.clone();
        let w = spawn_local(async move { m.write(10 * R + 5, IoBuf::from_slice(&[0x42; 70_000]), false).await });
        hold_write.wait_arrived(1).await;
        hold_copier.release();
        // The copier gets as far as region 10 and stops there.
        for _ in 0..400 {
            if fx.m.status().regions_clean >= 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fx.m.status().regions_clean, 10, "regions 10 and 11 wait for the write");
        assert!(fx.s.ops(IoKind::Read, 10 * R..11 * R).is_empty(), "S read before the write finished");
        hold_write.release();
        w.await.expect("join").expect("write");
        fx.model[(10 * R + 5) as usize..(10 * R + 70_005) as usize].fill(0x42);
        wait_state(&fx.m, DeviceState::Synced).await;
        check_export(&fx.m, &fx.model).await;
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
}

/// TRIM during a copy waits for the region being copied; trimmed regions end
/// clean and unverifiable, read stably, and verify skips them.
#[test]
fn trim_during_a_copy() {
    let fx = fixture(16, serial(), 1);
    run(async {
        let gate = Gate::new();
        fx.s.hold(IoKind::Read, 5 * R..6 * R, gate.clone(), Some(1));
        fx.m.attach(&fx.t_path).await.expect("attach");
        gate.wait_arrived(1).await;
        let m = fx.m.clone();
        let tr = spawn_local(async move { m.trim(4 * R, 3 * R).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!tr.is_finished(), "the trim must wait for the region being copied");
        gate.release();
        tr.await.expect("join").expect("trim");
        wait_state(&fx.m, DeviceState::Synced).await;
        let st = fx.m.status();
        assert_eq!(st.regions_unverifiable, 3, "{st:?}");
        let a = read(&fx.m, 4 * R, 3 * R as usize).await;
        let b = read(&fx.m, 4 * R, 3 * R as usize).await;
        assert_eq!(a, b, "a trimmed range reads stably");
        let rep = fx.m.verify().await.expect("verify");
        assert!(rep.mismatches.is_empty());
        assert_eq!(rep.regions_skipped, 3);
        // Outside the trim everything is intact.
        let before = read(&fx.m, 0, 4 * R as usize).await;
        assert!(before == fx.model[..4 * R as usize]);
        let after = read(&fx.m, 7 * R, 9 * R as usize).await;
        assert!(after == fx.model[7 * R as usize..]);
        fx.m.shutdown().await.expect("shutdown");
    });
}

/// T fails on a write while a T read is in flight: the failing write is not
/// acknowledged before the read drained; afterwards reads come from S and a
/// fresh attach to a good target converges.
#[test]
fn target_failing_with_reads_in_flight() {
    let mut fx = fixture(16, MirrorConfig { min_rate: u64::MAX, ..Default::default() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        let hold_read = Gate::new();
        fx.t.hold(IoKind::Read, 2 * R..3 * R, hold_read.clone(), Some(1));
        let m = fx.m.clone();
        let r = spawn_local(async move {
            let (res, b) = m.read(2 * R, IoBuf::new(R as usize)).await;
            res.map(|()| b.as_slice().to_vec())
        });
        hold_read.wait_arrived(1).await;
        fx.t.fail(IoKind::Write, 7 * R..8 * R, libc::EIO, None);
        let m = fx.m.clone();
        let w = spawn_local(async move { m.write(7 * R, IoBuf::from_slice(&[0x99; 4096]), false).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(fx.m.state(), DeviceState::Degraded, "reads are routed away from T at once");
        assert!(!w.is_finished(), "the failing write waits for in-flight T reads");
        hold_read.release();
        let got = r.await.expect("join").expect("read");
        assert!(got == fx.model[2 * R as usize..3 * R as usize]);
        w.await.expect("join").expect("the write succeeds on S");
        fx.model[7 * R as usize..7 * R as usize + 4096].fill(0x99);
        check_export(&fx.m, &fx.model).await;
        let st = fx.m.status();
        assert!(st.error.as_deref().unwrap_or("").contains("target write failed"), "{st:?}");
        assert!(st.target.is_none());
        // A new attach to a good target starts over and converges.
        fx.m.set_target_hooks(None);
        let t2 = fx.t_path.with_extension("2");
        std::fs::File::create(&t2).and_then(|f| f.set_len(16 * R)).expect("t2");
        fx.m.attach(&t2).await.expect("re-attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        assert!(fx.m.status().error.is_none());
        fx.m.shutdown().await.expect("shutdown");
        check_file(&t2, &fx.model);
    });
}

/// A failed T read is retried on S (and T is dropped).
#[test]
fn failed_target_read_is_retried_on_the_source() {
    let fx = fixture(8, MirrorConfig { min_rate: u64::MAX, ..Default::default() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        fx.t.fail(IoKind::Read, 3 * R..4 * R, libc::EIO, Some(1));
        let got = read(&fx.m, 3 * R - 10, 100).await;
        assert!(got == fx.model[3 * R as usize - 10..3 * R as usize + 90]);
        assert_eq!(fx.m.state(), DeviceState::Degraded);
        fx.m.shutdown().await.expect("shutdown");
    });
}

/// detach-source waits for writes in flight; afterwards S is closed and never
/// touched again.
#[test]
fn detach_source_during_writes() {
    let mut fx = fixture(8, MirrorConfig { min_rate: u64::MAX, ..Default::default() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        let gate = Gate::new();
        fx.s.hold(IoKind::Write, R..2 * R, gate.clone(), Some(1));
        let m = fx.m.clone();
        let w = spawn_local(async move { m.write(R + 1, IoBuf::from_slice(&[5; 300]), true).await });
        gate.wait_arrived(1).await;
        let m = fx.m.clone();
        let d = spawn_local(async move { m.detach_source().await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!d.is_finished(), "detach-source waits for writes that chose S");
        gate.release();
        w.await.expect("join").expect("write");
        fx.model[R as usize + 1..R as usize + 301].fill(5);
        d.await.expect("join").expect("detach");
        assert_eq!(fx.m.state(), DeviceState::SourceDetached);
        let s_ops = fx.s.log().len();
        write(&fx.m, &mut fx.model, 3 * R + 7, &[9; 5000]).await;
        fx.m.flush().await.expect("flush");
        check_export(&fx.m, &fx.model).await;
        assert_eq!(fx.s.log().len(), s_ops, "S is never touched after detach-source");
        let open = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|p| p == fx.s_path);
        assert!(!open, "the source file descriptor is closed");
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
}

/// detach-target during a sync with writes in flight: back to serving, the
/// writes land on S, and the copier stops.
#[test]
fn detach_target_during_writes() {
    let mut fx = fixture(16, MirrorConfig { max_rate: 1 << 20, min_rate: u64::MAX, ..serial() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        let gate = Gate::new();
        fx.s.hold(IoKind::Write, 12 * R..13 * R, gate.clone(), Some(1));
        let m = fx.m.clone();
        let w = spawn_local(async move { m.write(12 * R, IoBuf::from_slice(&[3; 1000]), false).await });
        gate.wait_arrived(1).await;
        let m = fx.m.clone();
        let d = spawn_local(async move { m.detach_target().await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!d.is_finished());
        gate.release();
        w.await.expect("join").expect("write");
        fx.model[12 * R as usize..12 * R as usize + 1000].fill(3);
        d.await.expect("join").expect("detach-target");
        assert_eq!(fx.m.state(), DeviceState::Serving);
        let t_ops = fx.t.log().len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fx.t.log().len(), t_ops, "the copier stopped");
        check_export(&fx.m, &fx.model).await;
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.s_path, &fx.model);
}

/// A source read error stops the copier with the error in status; resume
/// retries and the sync completes.
#[test]
fn source_read_error_stops_the_copier_until_resume() {
    let fx = fixture(8, serial(), 1);
    run(async {
        fx.s.fail(IoKind::Read, 4 * R..5 * R, libc::EIO, Some(3));
        fx.m.attach(&fx.t_path).await.expect("attach");
        for _ in 0..400 {
            if fx.m.status().error.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let st = fx.m.status();
        assert_eq!(st.state, DeviceState::Syncing);
        assert!(st.error.as_deref().unwrap_or("").contains("source read failed"), "{st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fx.m.state(), DeviceState::Syncing, "no progress past the bad region without resume");
        fx.m.resume().await.expect("resume");
        wait_state(&fx.m, DeviceState::Synced).await;
        assert!(fx.m.status().error.is_none());
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
}

/// Synced: an S write error drops S instead of failing the client.
#[test]
fn source_write_error_when_synced_detaches_the_source() {
    let mut fx = fixture(8, MirrorConfig { min_rate: u64::MAX, ..Default::default() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        wait_state(&fx.m, DeviceState::Synced).await;
        fx.s.fail(IoKind::Write, 0..8 * R, libc::EIO, None);
        write(&fx.m, &mut fx.model, 2 * R + 3, &[0xEE; 777]).await;
        let st = fx.m.status();
        assert_eq!(st.state, DeviceState::SourceDetached);
        assert!(st.error.as_deref().unwrap_or("").contains("source write failed"));
        check_export(&fx.m, &fx.model).await;
        fx.m.shutdown().await.expect("shutdown");
    });
    check_file(&fx.t_path, &fx.model);
}

/// Before synced, an S write error is the client's error.
#[test]
fn source_write_error_while_syncing_fails_the_write() {
    let fx = fixture(8, MirrorConfig { max_rate: 64 << 10, ..serial() }, 1);
    run(async {
        fx.m.attach(&fx.t_path).await.expect("attach");
        fx.s.fail(IoKind::Write, 0..8 * R, libc::EIO, Some(1));
        let err = fx.m.write(6 * R, IoBuf::from_slice(&[1; 10]), false).await.expect_err("must fail");
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(fx.m.state(), DeviceState::Syncing);
        fx.m.detach_target().await.expect("detach-target");
        fx.m.shutdown().await.expect("shutdown");
    });
}

/// With 4 KiB-aligned devices, concurrent unaligned writes into one sector are
/// read-modify-written under an exclusive lock: none is lost.
#[test]
fn concurrent_unaligned_writes_to_one_sector_lose_nothing() {
    for synced in [false, true] {
        let mut fx = fixture(4, MirrorConfig { min_rate: u64::MAX, ..Default::default() }, 4096);
        run(async {
            if synced {
                fx.m.attach(&fx.t_path).await.expect("attach");
                wait_state(&fx.m, DeviceState::Synced).await;
            }
            let base = R + 4096 * 3;
            let mut tasks = Vec::new();
            for i in 0..96u64 {
                // 1-byte writes all over one sector, and 2-byte writes straddling
                // into the next one.
                let (off, data) =
                    if i % 8 == 7 { (base + 4095, vec![i as u8; 2]) } else { (base + i * 37 % 4096, vec![i as u8]) };
                if i % 8 != 7 {
                    fx.model[off as usize] = i as u8;
                }
                let m = fx.m.clone();
                tasks.push(spawn_local(async move { m.write(off, IoBuf::from_slice(&data), false).await }));
            }
            for t in tasks {
                t.await.expect("join").expect("write");
            }
            // The straddling writes all wrote the same two bytes: the last one wins
            // per byte, and every one of them wrote its own value; accept what the
            // device says for those two, check the rest exactly.
            let got = read(&fx.m, base + 4095, 2).await;
            fx.model[(base + 4095) as usize..(base + 4097) as usize].copy_from_slice(&got);
            assert!(got[0] == got[1] && got[0] % 8 == 7, "a straddling write was torn: {got:?}");
            check_export(&fx.m, &fx.model).await;
            fx.m.shutdown().await.expect("shutdown");
        });
        check_file(&fx.s_path, &fx.model);
        if synced {
            check_file(&fx.t_path, &fx.model);
        }
    }
}
