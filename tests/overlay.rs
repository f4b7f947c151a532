//! `serve --source IMAGE --overlay PATH [--overlay-limit SIZE]` against a byte
//! model: reads merge the image and the overlay, the image is never written,
//! every acknowledged write survives `kill -9`, the limit refuses exactly the
//! write that does not fit and nothing else, trims and write-zeroes give space
//! back, an overlay made over another image is refused untouched, a sync over
//! an overlay resumes after a crash, and detach-source removes the overlay.
//!
//! `LIVEMIRROR_OVERLAY_KILLS=N` runs N kills in the crash test instead of 4.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::client::Client;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4096;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn sha(path: &Path) -> Vec<u8> {
    let out = run_ok(&tool("sha256sum"), &[p(path)]);
    out.split_whitespace().next().unwrap_or_default().as_bytes().to_vec()
}

/// What the overlay file occupies (its allocated blocks).
fn occupied(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

struct Rig {
    dir: tempfile::TempDir,
    image: PathBuf,
    overlay: PathBuf,
    model: Vec<u8>,
}

impl Rig {
    fn new(size: u64) -> Rig {
        let dir = scratch_shm();
        let image = dir.path().join("rootfs.img");
        let overlay = dir.path().join("overlay");
        let model = pattern(0x5eed, size as usize);
        make_image(&image, &model);
        Rig { dir, image, overlay, model }
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["--source", p(&self.image), "--overlay", p(&self.overlay)];
        a.extend_from_slice(extra);
        a
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        Daemon::start(self.dir.path(), &self.args(extra))
    }

    fn check(&self, d: &Daemon, when: &str) {
        let got = export_bytes(&d.uri());
        assert_same(&got, &self.model, when);
    }
}

/// Random writes (unaligned, sub-chunk and multi-chunk), write-zeroes with and
/// without NO_HOLE, and trims, through one client; the model follows.
async fn scramble(c: &Client, model: &mut [u8], seed: u64, ops: usize) {
    scramble_in(c, model, 0..model.len() as u64, seed, ops).await
}

/// [`scramble`] inside `window` only.
async fn scramble_in(c: &Client, model: &mut [u8], window: std::ops::Range<u64>, seed: u64, ops: usize) {
    let size = window.end - window.start;
    let mut rng = Rng(seed);
    for i in 0..ops {
        let len = match rng.below(4) {
            0 => 1 + rng.below(700),
            1 => CHUNK,
            2 => 1 + rng.below(3 * CHUNK),
            _ => 1 + rng.below(200_000),
        };
        let len = len.min(size / 2);
        let off = window.start
            + if rng.below(2) == 0 { rng.below(size - len) / CHUNK * CHUNK } else { rng.below(size - len) };
        let range = off as usize..(off + len) as usize;
        match rng.below(10) {
            0 => {
                c.write_zeroes(off, len as u32, rng.below(2) == 0).await.unwrap();
                model[range].fill(0);
            }
            1 => {
                // A trim makes whole chunks read as zeroes (the overlay holds a
                // hole there); the bytes of partial chunks are zeroed too.
                c.trim(off, len as u32).await.unwrap();
                model[range].fill(0);
            }
            _ => {
                let data = pattern(seed ^ i as u64, len as usize);
                c.write(off, &data, rng.below(8) == 0).await.unwrap();
                model[range].copy_from_slice(&data);
            }
        }
    }
}

#[test]
fn reads_merge_the_image_and_the_overlay_and_the_image_is_never_written() {
    let mut rig = Rig::new(24 * MIB);
    let before = sha(&rig.image);
    let mut d = rig.start(&[]);
    let st = d.status();
    assert_eq!(st["overlay"]["path"], p(&rig.overlay), "status names the overlay: {st}");
    assert!(st["overlay"]["bytes_limit"].is_null());
    assert_eq!(st["source"], p(&rig.image), "the source is the image");
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        scramble(&c, &mut rig.model, 1, 400).await;
        c.flush().await.unwrap();
    });
    rig.check(&d, "after random writes, zeroes and trims");
    assert_eq!(sha(&rig.image), before, "the image was written");
    // Only what was written occupies the overlay: far less than the image.
    let used = d.status()["overlay"]["bytes_used"].as_u64().unwrap();
    assert_eq!(used, occupied(&rig.overlay), "bytes_used is what the file occupies");
    assert!(used < 20 * MIB, "the overlay holds {used} bytes for a 24 MiB image after 400 small writes");
    // A clean restart serves the same bytes from the same overlay.
    assert_eq!(d.stop().code(), Some(0));
    let d = rig.start(&[]);
    rig.check(&d, "after a restart");
    // And the same image without the overlay is still the original.
    drop(d);
    let plain = Daemon::start(rig.dir.path(), &["--source", p(&rig.image), "--read-only"]);
    let got = export_bytes(&plain.uri());
    assert_same(&got, &pattern(0x5eed, (24 * MIB) as usize), "the image alone");
}

#[test]
fn a_4k_write_costs_one_chunk_of_ram_not_a_copy_up() {
    let rig = Rig::new(64 * MIB);
    let d = rig.start(&[]);
    let base = occupied(&rig.overlay);
    let n = 2000u64;
    let mut rng = Rng(7);
    let mut chunks: Vec<u64> = (0..64 * MIB / CHUNK).collect();
    for i in (1..chunks.len()).rev() {
        chunks.swap(i, rng.below(i as u64 + 1) as usize);
    }
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        for &ch in &chunks[..n as usize] {
            c.write(ch * CHUNK, &pattern(ch, CHUNK as usize), false).await.unwrap();
        }
    });
    let grown = occupied(&rig.overlay) - base;
    assert!(
        grown <= n * CHUNK * 11 / 10,
        "{n} random 4 KiB writes made the overlay grow by {grown} bytes (at most {} allowed)",
        n * CHUNK * 11 / 10
    );
    assert!(grown >= n * CHUNK, "{n} writes of 4 KiB hold at least {} bytes, not {grown}", n * CHUNK);
    assert_eq!(d.status()["overlay"]["chunks_present"], n);
}

#[test]
fn the_limit_refuses_exactly_the_write_that_does_not_fit_and_trim_gives_space_back() {
    // 16 MiB image: header and map take 8 KiB; the limit leaves room for 100 chunks.
    let mut rig = Rig::new(16 * MIB);
    let limit = 8192 + 100 * CHUNK;
    let lim = limit.to_string();
    let d = rig.start(&["--overlay-limit", &lim]);
    assert_eq!(d.status()["overlay"]["bytes_limit"], limit);
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        // 100 distinct chunks fit, one by one; the events cross 75 % and 90 %.
        for i in 0..100u64 {
            let data = pattern(i, CHUNK as usize);
            c.write(i * 2 * CHUNK, &data, false).await.unwrap_or_else(|e| panic!("write {i} of 100: {e}"));
            rig.model[(i * 2 * CHUNK) as usize..((i * 2 + 1) * CHUNK) as usize].copy_from_slice(&data);
        }
        // The 101st needs one chunk more: refused with ENOSPC, and it changes nothing.
        let e = c.write(201 * CHUNK, &[0xEE; 10], false).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC as u32), "{e}");
        // So is a write into held chunks that also needs one more.
        let e = c.write(0, &vec![0xEE; (CHUNK + 1) as usize], false).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC as u32), "{e}");
        // Rewriting what the overlay holds needs no space: it goes through.
        let data = pattern(1000, 300);
        c.write(2 * CHUNK + 5, &data, false).await.unwrap();
        rig.model[(2 * CHUNK + 5) as usize..(2 * CHUNK + 305) as usize].copy_from_slice(&data);
    });
    rig.check(&d, "at the limit");
    let st = d.status();
    assert_eq!(st["overlay"]["bytes_used"], limit, "the file occupies exactly the limit: {st}");
    assert_eq!(st["overlay"]["writes_refused"], 2);
    assert_eq!(st["state"], "serving", "the daemon keeps serving");
    // The refusal counts reach the event log within a second or so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let kinds = loop {
        let ev = d.status()["events"].as_array().cloned().unwrap_or_default();
        let overlay: Vec<String> = ev
            .iter()
            .filter(|e| e["kind"] == "overlay")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect();
        let refused: u64 = overlay
            .iter()
            .filter(|m| m.contains("refused"))
            .map(|m| {
                m.split_whitespace().skip_while(|w| *w != "full:").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
            })
            .sum();
        if refused >= 2 || Instant::now() > deadline {
            break overlay;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(kinds.iter().any(|m| m.contains("75% full")), "no 75 % event: {kinds:?}");
    assert!(kinds.iter().any(|m| m.contains("90% full")), "no 90 % event: {kinds:?}");
    assert!(kinds.iter().any(|m| m.contains("refused (ENOSPC)")), "no refusal event: {kinds:?}");
    // Trim and write-zeroes give chunks back; then new chunks fit again.
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        c.trim(0, (20 * CHUNK) as u32).await.unwrap(); // chunks 0, 2, .., 18: 10 chunks
        c.write_zeroes(40 * CHUNK, (10 * CHUNK) as u32, false).await.unwrap(); // 5 more
        rig.model[..(20 * CHUNK) as usize].fill(0);
        rig.model[(40 * CHUNK) as usize..(50 * CHUNK) as usize].fill(0);
        let used = occupied(&rig.overlay);
        assert_eq!(used, limit - 15 * CHUNK, "15 chunks given back");
        for i in 0..15u64 {
            let at = (3000 + i) * CHUNK;
            let data = pattern(i + 77, CHUNK as usize);
            c.write(at, &data, false).await.unwrap_or_else(|e| panic!("after the trim, write {i}: {e}"));
            rig.model[at as usize..(at + CHUNK) as usize].copy_from_slice(&data);
        }
        let e = c.write(3100 * CHUNK, &[1; 4096], false).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC as u32));
    });
    rig.check(&d, "after trims and new writes");
    assert_eq!(occupied(&rig.overlay), limit);
}

#[test]
fn an_overlay_made_over_another_image_is_refused_and_left_unchanged() {
    let rig = Rig::new(8 * MIB);
    let mut d = rig.start(&[]);
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        c.write(12345, &pattern(3, 50_000), false).await.unwrap();
    });
    assert_eq!(d.stop().code(), Some(0));
    let overlay_sum = sha(&rig.overlay);
    let refused = |what: &str, expect: &str| {
        let mut d = Daemon::spawn_raw(rig.dir.path(), &rig.args(&[]));
        let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(30)).expect("exits");
        assert_eq!(exit_code(&st), 1, "{what}: exit status");
        let log = d.log_text();
        let last = log.lines().last().unwrap_or_default();
        assert!(last.contains(expect), "{what}: the last line says why: {log}");
        assert!(last.contains(p(&rig.overlay)), "{what}: the overlay is named: {last}");
        assert_eq!(sha(&rig.overlay), overlay_sum, "{what}: the overlay changed");
        let _ = std::fs::remove_file(&d.log);
    };
    // Another image of the same size.
    let original = std::fs::read(&rig.image).unwrap();
    let mut other = original.clone();
    other[100] ^= 0xff;
    make_image(&rig.image, &other);
    refused("one byte changed in the image's first block", "was made over another image");
    // A larger image.
    let mut larger = original.clone();
    larger.extend(vec![0u8; 4096]);
    make_image(&rig.image, &larger);
    refused("a larger image", "was made over another image");
    make_image(&rig.image, &original);
    // A file that is not an overlay is refused too, and left as it is.
    let keep = std::fs::read(&rig.overlay).unwrap();
    std::fs::write(&rig.overlay, b"my notes, not an overlay").unwrap();
    let sum = sha(&rig.overlay);
    let mut d = Daemon::spawn_raw(rig.dir.path(), &rig.args(&[]));
    let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(30)).expect("exits");
    assert_eq!(exit_code(&st), 1);
    assert!(d.log_text().contains("not a livemirror overlay"), "{}", d.log_text());
    assert_eq!(sha(&rig.overlay), sum);
    let _ = std::fs::remove_file(&d.log);
    // A truncated overlay is refused.
    std::fs::write(&rig.overlay, &keep[..keep.len() - 8192]).unwrap();
    let mut d = Daemon::spawn_raw(rig.dir.path(), &rig.args(&[]));
    let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(30)).expect("exits");
    assert_eq!(exit_code(&st), 1);
    assert!(d.log_text().contains("truncated"), "{}", d.log_text());
    let _ = std::fs::remove_file(&d.log);
    // The original overlay over the original image serves its writes again.
    std::fs::write(&rig.overlay, &keep).unwrap();
    let d = rig.start(&[]);
    let got = export_bytes(&d.uri());
    let mut want = original;
    want[12345..12345 + 50_000].copy_from_slice(&pattern(3, 50_000));
    assert_same(&got, &want, "the original overlay");
}

/// A sector written when the daemon was killed: (sector, old bytes, new bytes).
type Uncertain = (usize, Vec<u8>, Vec<u8>);

/// Four writers write until the daemon is killed; acknowledged writes go into
/// the model, the one in flight at the kill may be old or new per sector.
#[test]
fn every_acknowledged_write_survives_kill9_under_four_writers() {
    let kills: usize = std::env::var("LIVEMIRROR_OVERLAY_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let rig = Rig::new(32 * MIB);
    let model = Arc::new(Mutex::new(rig.model.clone()));
    let uncertain: Arc<Mutex<Vec<Uncertain>>> = Arc::new(Mutex::new(Vec::new()));
    let mut d = rig.start(&[]);
    for k in 0..kills {
        let runtime = rt();
        let sock = d.sock.clone();
        let (m2, u2) = (model.clone(), uncertain.clone());
        let writers = std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for w in 0..4u64 {
                    let (m, u, sock) = (m2.clone(), u2.clone(), sock.clone());
                    tasks.push(tokio::spawn(async move {
                        let c = Client::connect_unix(&sock, "", w % 2 == 0).await.unwrap();
                        let mut rng = Rng((k as u64 + 1) * 1000 + w);
                        // Each writer owns every fourth 64 KiB stripe, so
                        // writers never overlap and the model is exact.
                        let stripe = 65536u64;
                        loop {
                            let nstripes = (32 * MIB) / stripe;
                            let s = rng.below(nstripes / 4) * 4 + w;
                            let len = 1 + rng.below(20_000);
                            let off = s * stripe + rng.below(stripe - len);
                            let data = pattern(rng.next(), len as usize);
                            let r = off as usize..(off + len) as usize;
                            match c.write(off, &data, rng.below(8) == 0).await {
                                Ok(()) => m.lock().unwrap()[r].copy_from_slice(&data),
                                Err(_) => {
                                    let mm = m.lock().unwrap();
                                    let mut un = u.lock().unwrap();
                                    for sector in r.start / 512..=(r.end - 1) / 512 {
                                        let (a, b) = (sector * 512, sector * 512 + 512);
                                        let old = mm[a..b].to_vec();
                                        let mut new = old.clone();
                                        let (x, y) = (a.max(r.start), b.min(r.end));
                                        new[x - a..y - a].copy_from_slice(&data[x - r.start..y - r.start]);
                                        un.push((sector, old, new));
                                    }
                                    drop(mm);
                                    return;
                                }
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        });
        std::thread::sleep(Duration::from_millis(400 + 300 * (k as u64 % 3)));
        d.kill9();
        writers.join().unwrap();
        d.restart(&rig.args(&[]));
        let got = export_bytes(&d.uri());
        let mut m = model.lock().unwrap();
        for (sector, old, new) in std::mem::take(&mut *uncertain.lock().unwrap()) {
            let g = &got[sector * 512..sector * 512 + 512];
            assert!(g == old.as_slice() || g == new.as_slice(), "kill {k}: sector {sector} is neither old nor new");
            m[sector * 512..sector * 512 + 512].copy_from_slice(g);
        }
        assert_same(&got, &m, &format!("after kill {k}"));
    }
}

#[test]
fn a_sync_over_an_overlay_resumes_after_kill9_and_detach_removes_the_overlay() {
    let mut rig = Rig::new(32 * MIB);
    let target = rig.dir.path().join("disk.img");
    make_sparse(&target, 40 * MIB);
    let state = rig.dir.path().join("state");
    let mut d = rig.start(&["--state", p(&state), "--max-rate", "8M"]);
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        scramble(&c, &mut rig.model, 2, 150).await;
    });
    d.cli_ok(&["attach", p(&target)]);
    // Writes during the copy; kill -9 once part of it is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.status()["regions_clean"].as_u64().unwrap() < 64 {
        assert!(Instant::now() < deadline, "the copy made no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes race the copy in the last 8 MiB (two intent chunks of 4 MiB: the
    // regions there are copied again after the crash, the others are kept).
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        scramble_in(&c, &mut rig.model, 24 * MIB..32 * MIB, 3, 100).await;
    });
    d.kill9();
    d.restart(&rig.args(&["--state", p(&state), "--max-rate", "8M"]));
    let st = d.status();
    assert_eq!(st["state"], "syncing", "the sync resumes: {st}");
    // Progress is persisted once a second, so some of it may be lost, never all.
    assert!(st["regions_clean"].as_u64().unwrap() > 0, "the copy did not keep its progress: {st}");
    assert!(st["events"].to_string().contains("resuming the sync"), "{st}");
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        scramble(&c, &mut rig.model, 4, 100).await;
    });
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["wait", "--timeout", "120"]);
    d.cli_ok(&["verify"]);
    rig.check(&d, "synced over the overlay");
    assert!(rig.overlay.exists());
    d.cli_ok(&["detach-source"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.overlay.exists() {
        assert!(Instant::now() < deadline, "the overlay file is still there after detach-source");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = d.status();
    assert!(st["overlay"].is_null(), "status shows no overlay after detach-source: {st}");
    assert!(!d.has_open(&rig.image), "the image is closed");
    rig.check(&d, "after detach-source");
    assert_eq!(d.stop().code(), Some(0));
    let t = std::fs::read(&target).unwrap();
    assert_same(&t[..rig.model.len()], &rig.model, "the target holds the export");
    // A restart with the same command line serves the target alone and does
    // not make a new overlay.
    let d = rig.start(&["--state", p(&state), "--target", p(&target)]);
    assert_eq!(d.state(), "source-detached");
    assert!(!rig.overlay.exists(), "a new overlay was made after the source was detached");
}

#[test]
fn a_full_overlay_while_synced_drops_the_source_and_the_write_lands_on_the_target() {
    let mut rig = Rig::new(8 * MIB);
    let target = rig.dir.path().join("disk.img");
    make_sparse(&target, 8 * MIB);
    let limit = (8192 + 4 * CHUNK).to_string();
    let d = rig.start(&["--overlay-limit", &limit, "--target", p(&target)]);
    d.wait_state("synced", 60);
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        // 4 chunks fit; the fifth would not: in synced, S is dropped instead.
        for i in 0..5u64 {
            let data = pattern(i + 9, CHUNK as usize);
            c.write(i * 10 * CHUNK, &data, false).await.unwrap_or_else(|e| panic!("write {i}: {e}"));
            rig.model[(i * 10 * CHUNK) as usize..(i * 10 * CHUNK + CHUNK) as usize].copy_from_slice(&data);
        }
    });
    d.wait_state("source-detached", 10);
    rig.check(&d, "after the overlay filled while synced");
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.overlay.exists() {
        assert!(Instant::now() < deadline, "the overlay of the dropped source is still there");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn set_overlay_limit_changes_the_limit_at_runtime() {
    let rig = Rig::new(16 * MIB);
    let d = rig.start(&[]);
    let used = |d: &Daemon| d.status()["overlay"]["bytes_used"].as_u64().unwrap();
    // Room for exactly 3 more chunks.
    let limit = (used(&d) + 3 * CHUNK).to_string();
    d.cli_ok(&["set-overlay-limit", &limit]);
    assert_eq!(d.status()["overlay"]["bytes_limit"].to_string(), limit);
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        c.write(0, &[1; 3 * 4096], false).await.unwrap();
        let e = c.write(100 * CHUNK, &[2; 10], false).await.unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOSPC as u32), "{e}");
    });
    // "none": no limit any more.
    d.cli_ok(&["set-overlay-limit", "none"]);
    assert!(d.status()["overlay"]["bytes_limit"].is_null());
    rt().block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        c.write(100 * CHUNK, &[2; 10], false).await.unwrap();
    });
    // A limit smaller than the overlay's own map is refused, and so is a daemon without one.
    let out = d.cli(&["set-overlay-limit", "4K"]);
    assert_eq!(code(&out), 1);
    assert!(text(&out).contains("leaves no room"), "{}", text(&out));
    let out = d.cli(&["set-overlay-limit", "lots"]);
    assert_eq!(code(&out), 2, "a bad size is a usage error");
    let plain_dir = scratch_shm();
    let img = plain_dir.path().join("img");
    make_image(&img, &pattern(1, MIB as usize));
    let plain = Daemon::start(plain_dir.path(), &["--source", p(&img)]);
    let out = plain.cli(&["set-overlay-limit", "1G"]);
    assert_eq!(code(&out), 1);
    assert!(text(&out).contains("no overlay"), "{}", text(&out));
}
