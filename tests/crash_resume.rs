//! Crash-safety: kill -9 at random moments under a random-write workload, with
//! a byte model. Every acknowledged write must survive every restart; a write
//! in flight at a kill must read back, sector by sector, as old or new.
//!
//! `LIVEMIRROR_SOAK_KILLS=N` runs N kills instead of the CI default (see README).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::client::Client;

const SECTOR: usize = 512;

/// What the export must contain: bytes, plus for each sector the alternatives
/// an interrupted write allows.
struct Model {
    bytes: Vec<u8>,
    /// Sectors with an unacknowledged write at a kill: (sector, old, new).
    uncertain: Vec<(usize, Vec<u8>, Vec<u8>)>,
}

impl Model {
    fn check(&mut self, got: &[u8], when: &str) {
        // Resolve uncertain sectors to what the device shows, if allowed.
        for (s, old, new) in std::mem::take(&mut self.uncertain) {
            let at = s * SECTOR;
            let end = (at + SECTOR).min(got.len());
            let g = &got[at..end];
            assert!(
                g == &old[..end - at] || g == &new[..end - at],
                "{when}: sector {s} is neither the old nor the new data"
            );
            self.bytes[at..end].copy_from_slice(g);
        }
        if let Some(i) = got.iter().zip(&self.bytes).position(|(a, b)| a != b) {
            panic!("{when}: byte {i} differs from the model (acknowledged write lost)");
        }
    }
}

struct Rig {
    dir: tempfile::TempDir,
    src: std::path::PathBuf,
    state: std::path::PathBuf,
    daemon: Option<Daemon>,
}

impl Rig {
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--source".into(),
            self.src.display().to_string(),
            "--state".into(),
            self.state.display().to_string(),
            "--region-size".into(),
            "4K".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn start(&mut self, extra: &[&str]) {
        let args = self.args(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.daemon = Some(Daemon::start(self.dir.path(), &refs));
    }

    fn d(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Four writers on disjoint interleaved stripes write until the daemon dies.
/// Acknowledged writes go into the model; the write in flight at the end of
/// each writer becomes "uncertain" sectors.
async fn workload(sock: &Path, model: &Arc<Mutex<Model>>, seed: u64, stop_after: Duration) {
    let size = model.lock().unwrap().bytes.len() as u64;
    let stripe = 48 * 1024u64; // crosses 4K regions, never aligned to them
    let writers = 4u64;
    let deadline = Instant::now() + stop_after;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let model = model.clone();
        let sock = sock.to_path_buf();
        tasks.push(tokio::spawn(async move {
            let Ok(c) = Client::connect_unix(&sock, "", w % 2 == 0).await else { return };
            let mut rng = Rng(seed ^ (w + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            while Instant::now() < deadline {
                // Pick a stripe owned by this writer and a range inside it.
                let nstripes = size / stripe;
                let s = (rng.next() % (nstripes / writers)) * writers + w;
                let len = 1 + rng.next() % 20_000;
                let off = s * stripe + rng.next() % (stripe - len);
                let mut data = vec![0u8; len as usize];
                for b in data.iter_mut() {
                    *b = rng.next() as u8;
                }
                let old = model.lock().unwrap().bytes[off as usize..(off + len) as usize].to_vec();
                match c.write(off, &data, rng.next().is_multiple_of(8)).await {
                    Ok(()) => {
                        model.lock().unwrap().bytes[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    Err(_) => {
                        // The daemon died with this write in flight.
                        let mut m = model.lock().unwrap();
                        let first = off as usize / SECTOR;
                        let last = (off + len - 1) as usize / SECTOR;
                        for sector in first..=last {
                            let at = sector * SECTOR;
                            let end = (at + SECTOR).min(m.bytes.len());
                            let mut new = m.bytes[at..end].to_vec();
                            let (a, b) = (at.max(off as usize), end.min((off + len) as usize));
                            new[a - at..b - at].copy_from_slice(&data[a - off as usize..b - off as usize]);
                            let prev = m.bytes[at..end].to_vec();
                            debug_assert_eq!(&prev[a - at..b - at], &old[a - off as usize..b - off as usize]);
                            m.uncertain.push((sector, prev, new));
                        }
                        return;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn read_all(sock: &Path, size: usize) -> Vec<u8> {
    let c = Client::connect_unix(sock, "", true).await.expect("connect");
    let mut out = Vec::with_capacity(size);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(8 << 20);
        out.extend(c.read(off as u64, n as u32).await.expect("read"));
        off += n;
    }
    out
}

#[test]
fn kill_9_loop_under_writes_loses_no_acknowledged_write() {
    let kills: usize = std::env::var("LIVEMIRROR_SOAK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let dir = scratch_shm();
    let size = 24usize << 20;
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    make_image(&src, &pattern(11, size));
    make_sparse(&tgt, 32 << 20);
    let mut rig = Rig { state: dir.path().join("state"), src, dir, daemon: None };
    let model = Arc::new(Mutex::new(Model { bytes: pattern(11, size), uncertain: Vec::new() }));
    let runtime = rt();
    rig.start(&["--max-rate", "4M"]);
    rig.d().cli_ok(&["attach", tgt.to_str().unwrap()]);
    let mut rng = Rng(0xC0FFEE);
    let mut clean_seen = Vec::new();
    for k in 0..kills {
        if k == kills * 2 / 3 {
            // The last third of the kills happens with the copy finished.
            rig.d().cli_ok(&["set-rate", "0"]);
            rig.d().cli_ok(&["wait", "--timeout", "60"]);
        }
        let ms = 30 + rng.next() % 250;
        let sock = rig.d().sock.clone();
        let m2 = model.clone();
        let seed = rng.next();
        // Writers run on this thread; the kill comes from a timer thread at a
        // random moment, while writes (and state writes) are in flight.
        let pid = rig.d().child.as_ref().map(|c| c.id()).expect("pid");
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        });
        runtime.block_on(workload(&sock, &m2, seed, Duration::from_secs(10)));
        killer.join().expect("killer");
        rig.daemon.as_mut().expect("daemon").kill9();
        // Restart with the same arguments: it must resume, not start over.
        rig.start(&[]);
        let st = rig.d().status();
        clean_seen.push(st["regions_clean"].as_u64().unwrap_or(0));
        assert!(
            st["state"] == "syncing" || st["state"] == "synced",
            "after kill {k} the daemon resumed in state {}",
            st["state"]
        );
        let got = runtime.block_on(read_all(&rig.d().sock, size));
        model.lock().unwrap().check(&got, &format!("after kill {k}"));
    }
    rig.d().cli_ok(&["set-rate", "0"]);
    rig.d().cli_ok(&["wait", "--timeout", "60"]);
    let out = rig.d().cli(&["verify"]);
    assert!(out.status.success(), "verify after the kills: {}", String::from_utf8_lossy(&out.stdout));
    let got = runtime.block_on(read_all(&rig.d().sock, size));
    model.lock().unwrap().check(&got, "after the sync");
    rig.d().cli_ok(&["detach-source"]);
    // Killed after detach-source: the restart serves T alone.
    rig.daemon.as_mut().expect("daemon").kill9();
    let args = ["--target", tgt.to_str().unwrap(), "--state", rig.state.to_str().unwrap()];
    rig.daemon = Some(Daemon::start(rig.dir.path(), &args));
    let st = rig.d().status();
    assert_eq!(st["state"], "source-detached");
    assert!(st["source"].is_null());
    let got = runtime.block_on(read_all(&rig.d().sock, size));
    model.lock().unwrap().check(&got, "serving the target alone");
    assert_eq!(exit_code(&rig.daemon.as_mut().expect("daemon").stop()), 0);
    let t = std::fs::read(&tgt).expect("target");
    model.lock().unwrap().check(&t[..size], "the target file after a clean stop");
    // Progress never went backwards by more than what the last second held.
    eprintln!("clean regions seen after each restart: {clean_seen:?}");
}

#[test]
fn progress_survives_a_kill_after_a_quiet_spell() {
    let dir = scratch_shm();
    let size = 64usize << 20;
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    make_image(&src, &pattern(3, size));
    make_sparse(&tgt, size as u64);
    let mut rig = Rig { state: dir.path().join("state"), src, dir, daemon: None };
    rig.start(&["--max-rate", "16M"]);
    rig.d().cli_ok(&["attach", tgt.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(2));
    rig.d().cli_ok(&["pause"]);
    // Longer than the intent-clearing bound (5 s is the contract; ours is ~1.3 s).
    std::thread::sleep(Duration::from_millis(2500));
    let before = rig.d().status()["regions_clean"].as_u64().unwrap_or(0);
    assert!(before > 1000, "the copy made progress ({before} regions)");
    rig.daemon.as_mut().expect("daemon").kill9();
    rig.start(&[]);
    let st = rig.d().status();
    let after = st["regions_clean"].as_u64().unwrap_or(0);
    assert!(after * 10 >= before * 9, "kept {after} of {before} clean regions");
    // The pause was recorded and survives the kill.
    assert_eq!(st["paused"], true, "{st}");
    rig.d().cli_ok(&["resume"]);
    rig.d().cli_ok(&["set-rate", "0"]);
    rig.d().cli_ok(&["wait", "--timeout", "60"]);
    assert_eq!(exit_code(&rig.daemon.as_mut().expect("daemon").stop()), 0);
    assert!(std::fs::read(&tgt).expect("t") == pattern(3, size));
}

#[test]
fn corrupt_and_mismatching_state_files_are_refused() {
    let dir = scratch();
    let src = dir.path().join("s.img");
    let other = dir.path().join("other.img");
    let tgt = dir.path().join("t.img");
    let state = dir.path().join("state");
    make_image(&src, &pattern(5, 4 << 20));
    make_image(&other, &pattern(6, 4 << 20));
    make_sparse(&tgt, 4 << 20);
    let s = src.to_str().unwrap();
    let st = state.to_str().unwrap();
    {
        let mut d = Daemon::start(dir.path(), &["--source", s, "--state", st, "--target", tgt.to_str().unwrap()]);
        d.cli_ok(&["wait", "--timeout", "30"]);
        assert_eq!(exit_code(&d.stop()), 0);
    }
    let refused = |args: &[&str], why: &str| {
        let mut d = Daemon::spawn_raw(dir.path(), args);
        let status = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(20)).expect("exits");
        assert_eq!(exit_code(&status), 1, "{args:?} must be refused");
        let log = d.log_text();
        assert!(log.contains(why), "expected {why:?} in:\n{log}");
        std::fs::remove_file(&d.log).ok();
    };
    // A different source.
    refused(&["--source", other.to_str().unwrap(), "--state", st], "does not match the state file");
    // A different region size.
    refused(&["--source", s, "--state", st, "--region-size", "1M"], "--region-size");
    // Bytes flipped in both copies of the header.
    let pristine = std::fs::read(&state).unwrap();
    let mut bad = pristine.clone();
    bad[25] ^= 1;
    bad[4096 + 25] ^= 1;
    std::fs::write(&state, &bad).unwrap();
    refused(&["--source", s, "--state", st], "is corrupt");
    // Bitmaps flipped in both copies.
    let mut bad = pristine.clone();
    let n = bad.len();
    bad[8192] ^= 1;
    bad[n - 1] ^= 1;
    std::fs::write(&state, &bad).unwrap();
    refused(&["--source", s, "--state", st], "CRC");
    // Truncated.
    std::fs::write(&state, &pristine[..6000]).unwrap();
    refused(&["--source", s, "--state", st], "is corrupt");
    // --restart-sync starts over from a corrupt file.
    let mut d = Daemon::start(dir.path(), &["--source", s, "--state", st, "--restart-sync"]);
    assert_eq!(d.state(), "serving");
    assert_eq!(exit_code(&d.stop()), 0);
}

#[test]
fn a_restarted_daemon_waits_for_the_exclusive_lock() {
    let dir = scratch();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(9, 1 << 20));
    // Hold the lock the way a dying predecessor would until its I/O drained.
    let f = std::fs::File::open(&src).unwrap();
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_or_else(
        |(_, e)| panic!("flock: {e}"),
        |held| {
            let mut d = Daemon::spawn_raw(dir.path(), &["--source", src.to_str().unwrap()]);
            std::thread::sleep(Duration::from_millis(1500));
            assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none(), "it must wait, not exit");
            assert!(!d.cli(&["status"]).status.success(), "not serving while another process holds the source");
            drop(held);
            d.wait_ready();
            assert_eq!(d.state(), "serving");
        },
    );
}

// ------------------------------------------------ a restart onto another disk

/// Serves `src` with `--state`, attaches `tgt` at 4M/s and stops the daemon
/// (SIGTERM) once about half the regions are clean. Returns the daemon's args.
fn half_synced(dir: &Path, src: &Path, tgt: &str, state: &Path) -> Vec<String> {
    let args: Vec<String> =
        ["--source", p(src), "--state", p(state), "--max-rate", "4M"].iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(dir, &refs);
    d.cli_ok(&["attach", tgt]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = d.status();
        if st["regions_clean"].as_u64().unwrap_or(0) * 2 >= st["regions_total"].as_u64().unwrap_or(1) {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stop().success(), "{}", d.log_text());
    args
}

/// A restart with `args`, which leave the target out (its path comes from the
/// state file), is refused: the recorded path now names another device, and
/// the refusal says why (`want`) and how to copy onto it.
fn restart_refused(dir: &Path, args: &[String], want: &str) -> String {
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("serve").args(args);
    cmd.arg("--listen").arg(format!("unix:{}", dir.join("nbd.sock").display()));
    cmd.arg("--control").arg(dir.join("ctl.sock"));
    let out = cmd.output().expect("run livemirror serve");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a restart onto a replaced target it was not told of must be refused:\n{err}"
    );
    assert!(err.contains(want), "the refusal should say why ({want:?}):\n{err}");
    assert!(err.contains("name it with --target"), "the refusal should say what to do:\n{err}");
    err
}

/// A restart with `args`, which name the replaced target, starts the sync over
/// onto it: the log and the events say why (`want`), reads never see the new
/// target's blank bytes, and the target ends holding exactly the source.
fn restart_starts_over(dir: &Path, args: &[String], want: &str, data: &[u8], target: &Path) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(dir, &refs);
    let st = d.status();
    let events = format!("{}", st["events"]);
    assert!(events.contains(want) && events.contains("the sync starts over"), "{st}");
    assert!(d.log_text().contains(want), "{}", d.log_text());
    assert!(st["state"] == "syncing" || st["state"] == "synced", "{st}");
    assert_same(&export_bytes(&d.uri()), data, "export right after the restart");
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["wait", "--timeout", "60"]);
    assert!(d.cli(&["verify"]).status.success(), "verify after the fresh sync");
    assert!(d.stop().success());
    assert_same(&std::fs::read(target).unwrap(), data, "the new target after the fresh sync");
}

#[test]
fn a_target_file_replaced_under_the_same_inode_number_is_not_trusted() {
    // On ext4 a file created right after another was deleted gets its inode
    // number back: the case a (device, inode) identity cannot see.
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on disk");
    let size = 16usize << 20;
    let src = dir.path().join("src.img");
    let tgt = dir.path().join("tgt.img");
    let state = dir.path().join("st");
    let data = pattern(77, size);
    make_image(&src, &data);
    make_sparse(&tgt, size as u64);
    let mut args = half_synced(dir.path(), &src, p(&tgt), &state);
    use std::os::unix::fs::MetadataExt;
    let old_ino = std::fs::metadata(&tgt).unwrap().ino();
    std::fs::remove_file(&tgt).unwrap();
    // Create files until one gets the old inode number back (ext4 usually hands
    // it out again soon), and make that the "new" target.
    let mut reused = false;
    for i in 0..256 {
        let f = dir.path().join(format!("new{i}.img"));
        make_sparse(&f, size as u64);
        if std::fs::metadata(&f).unwrap().ino() == old_ino {
            std::fs::rename(&f, &tgt).unwrap();
            reused = true;
            break;
        }
    }
    if !reused {
        make_sparse(&tgt, size as u64);
    }
    // With the inode number reused, only the birth time and generation tell.
    let want = if reused { "replaced" } else { "does not match the state file" };
    let err = restart_refused(dir.path(), &args, want);
    eprintln!("refused without --target (inode number reused: {reused}): {err}");
    // Named on the command line, the new file gets every byte copied again.
    args.extend(["--target".to_string(), p(&tgt).to_string()]);
    restart_starts_over(dir.path(), &args, want, &data, &tgt);
}

#[test]
fn a_loop_device_re_pointed_at_another_image_is_not_trusted() {
    let dir = scratch_shm();
    let size = 16usize << 20;
    let src = dir.path().join("src.img");
    let (back1, back2) = (dir.path().join("disk1.img"), dir.path().join("disk2.img"));
    let state = dir.path().join("st");
    let data = pattern(78, size);
    make_image(&src, &data);
    make_sparse(&back1, size as u64);
    make_sparse(&back2, size as u64);
    let lo = run_ok(&tool("losetup"), &["-f", "--show", p(&back1)]).trim().to_string();
    let _lo = Loop(lo.clone());
    let mut args = half_synced(dir.path(), &src, &lo, &state);
    run_ok(&tool("losetup"), &["-d", &lo]);
    // Same device node and number, another (blank) image behind it.
    run_ok(&tool("losetup"), &[&lo, p(&back2)]);
    let err = restart_refused(dir.path(), &args, "re-pointed");
    eprintln!("refused without --target: {err}");
    args.extend(["--target".to_string(), lo.clone()]);
    restart_starts_over(dir.path(), &args, "re-pointed", &data, &back2);
}

#[test]
fn a_target_whose_copied_regions_changed_while_stopped_is_copied_again() {
    // Same file, same identity, but its contents were changed behind our back
    // while the daemon was down: the resume check notices and starts over.
    let dir = scratch_shm();
    let size = 16usize << 20;
    let src = dir.path().join("src.img");
    let tgt = dir.path().join("tgt.img");
    let state = dir.path().join("st");
    let data = pattern(79, size);
    make_image(&src, &data);
    make_sparse(&tgt, size as u64);
    let args = half_synced(dir.path(), &src, p(&tgt), &state);
    // Wipe the first 4 MiB of T in place (the copied part).
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(&tgt).unwrap().write_all_at(&vec![0u8; 4 << 20], 0).unwrap();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(dir.path(), &refs);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    let half = st["regions_total"].as_u64().unwrap() / 2;
    assert!(st["regions_clean"].as_u64().unwrap() < half, "the changed target's old progress was kept: {st}");
    assert!(format!("{}", st["events"]).contains("the sync starts over"), "{st}");
    // Reads never see the wiped bytes.
    assert_same(&export_bytes(&d.uri()), &data, "export right after the resume");
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["wait", "--timeout", "60"]);
    assert!(d.cli(&["verify"]).status.success());
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the target after the second sync");
}

#[test]
fn set_rate_and_pause_survive_a_restart_with_state() {
    let dir = scratch_shm();
    let size = 32usize << 20;
    let src = dir.path().join("src.img");
    let tgt = dir.path().join("tgt.img");
    let state = dir.path().join("st");
    let data = pattern(80, size);
    make_image(&src, &data);
    make_sparse(&tgt, size as u64);
    let base = ["--source", p(&src), "--state", p(&state)];
    let mut d = Daemon::start(dir.path(), &base);
    d.cli_ok(&["set-rate", "3M"]);
    d.cli_ok(&["set-rate", "--min-rate", "1M"]);
    assert_eq!(d.status()["min_rate"], 1 << 20);
    d.cli_ok(&["attach", p(&tgt)]);
    std::thread::sleep(Duration::from_millis(500));
    d.cli_ok(&["pause"]);
    assert!(d.stop().success());
    // Restarted without --max-rate: the rate and the pause set at runtime hold.
    let mut d = Daemon::start(dir.path(), &base);
    let st = d.status();
    assert_eq!((st["state"].as_str(), st["paused"].as_bool()), (Some("syncing"), Some(true)), "{st}");
    assert_eq!(st["max_rate"], 3 << 20, "{st}");
    assert_eq!(st["min_rate"], 1 << 20, "the floor set at runtime holds: {st}");
    let clean = st["regions_clean"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(d.status()["regions_clean"].as_u64().unwrap(), clean, "a paused copy went on after the restart");
    d.cli_ok(&["resume"]);
    assert!(d.stop().success());
    // A rate given on the command line wins over the recorded one.
    let mut args = base.to_vec();
    args.extend(["--max-rate", "0"]);
    let mut d = Daemon::start(dir.path(), &args);
    let st = d.status();
    assert_eq!((st["paused"].as_bool(), st["max_rate"].as_u64()), (Some(false), Some(0)), "{st}");
    assert_eq!(st["min_rate"], 1 << 20, "only the rate given again changed: {st}");
    // Both at once; and set-rate with neither is a usage error.
    d.cli_ok(&["set-rate", "0", "--min-rate", "2M"]);
    assert_eq!((d.status()["max_rate"].as_u64(), d.status()["min_rate"].as_u64()), (Some(0), Some(2 << 20)));
    assert_eq!(d.cli(&["set-rate"]).status.code(), Some(2));
    d.cli_ok(&["wait", "--timeout", "60"]);
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the target after the resumed sync");
}
