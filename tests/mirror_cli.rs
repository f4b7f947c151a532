//! The mission flow driven through the CLI with real clients: patterns written
//! before attach, fio verifying its own writes while the copy runs, verify,
//! detach-source, grow, and a final byte-for-byte comparison of the target file
//! with what the export served. Also `serve --target`, TRIM before attach and
//! detach-target during a sync.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------ helpers

/// A byte model of the export.
struct Model(Vec<u8>);

impl Model {
    /// The model extended with zeroes (what a grown export shows) to `len`.
    fn padded(&self, len: u64) -> Vec<u8> {
        let mut v = self.0.clone();
        v.resize(len as usize, 0);
        v
    }

    fn fill(&mut self, off: u64, len: u64, byte: u8) {
        let end = (off + len) as usize;
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[off as usize..end].fill(byte);
    }
}

fn nbdinfo_size(uri: &str) -> u64 {
    let s = run_ok(&tool("nbdinfo"), &["--size", uri]);
    s.trim().parse().unwrap_or_else(|e| panic!("nbdinfo --size: {e}: {s:?}"))
}

/// Files the process has open (the targets of /proc/PID/fd links).
fn open_files(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect()
}

fn wait_ok(d: &Daemon, secs: u32) -> String {
    let o = d.cli(&["wait", "--timeout", &secs.to_string()]);
    assert_eq!(code(&o), 0, "wait: {}\n--- daemon log ---\n{}", text(&o), d.log_text());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn verify_ok(d: &Daemon) -> String {
    let o = d.cli(&["verify"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(code(&o), 0, "verify: {}\n--- daemon log ---\n{}", text(&o), d.log_text());
    assert!(out.contains(" 0 mismatching ranges"), "verify must report 0 mismatching ranges:\n{out}");
    assert!(!out.contains("mismatch:"), "{out}");
    out
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

// ------------------------------------------------------------- the mission

/// Four jobs on four connections, each on its own 16 MiB slice of [0, 64M),
/// random block sizes, QD32, a crc32c header in every block.
const FIO_JOB: &[&str] = &[
    "--name=mirror",
    "--rw=randwrite",
    "--bsrange=4k-128k",
    "--size=16M",
    "--offset_increment=16M",
    "--numjobs=4",
    "--iodepth=32",
    "--verify=crc32c",
    "--verify_fatal=1",
];

#[test]
fn mission_flow_through_the_cli_with_fio_during_the_sync() {
    let dir = scratch_shm();
    let src = dir.path().join("source.img");
    let tgt = dir.path().join("target.img");
    let size = 96 * MIB;
    let tsize = 128 * MIB;
    let mut model = Model(pattern(10, size as usize));
    make_image(&src, &model.0);
    make_sparse(&tgt, tsize);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let uri = d.uri();

    // Patterns before attach (aligned, unaligned, write-zeroes), all in
    // [64M, 96M), where fio does not write.
    let pre: [(u8, u64, u64); 5] = [
        (0x11, 64 * MIB, MIB),
        (0x22, 65 * MIB + 1, 300_000),
        (0x33, 72 * MIB, 4 * MIB),
        (0, 84 * MIB, MIB),
        (0x44, 96 * MIB - 7, 7),
    ];
    let mut cmds = Vec::new();
    for &(b, off, len) in &pre {
        if b == 0 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {b} {off} {len}"));
        }
        model.fill(off, len, b);
    }
    cmds.push("flush".into());
    qemu_io_ok(&d, &uri, &cmds);
    let reads: Vec<String> = pre.iter().map(|&(b, off, len)| format!("read -P {b} {off} {len}")).collect();
    qemu_io_ok(&d, &uri, &reads);

    // Attach with the copy limited, so fio's writes race it.
    d.cli_ok(&["set-rate", "16M"]);
    assert!(d.has_open(&src), "the daemon should hold the source open");
    let out = d.cli_ok(&["attach", p(&tgt)]);
    assert!(out.contains("attached"), "{out}");
    // fio starts once the copy is past 24 MiB: the first slice is clean (its
    // writes go to both legs), the second is where the copy is heading (writes
    // race it), the last two are dirty (writes go to S only).
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let st = d.status();
        if u(&st["bytes_copied"]) >= 24 * MIB {
            break st;
        }
        assert!(Instant::now() < deadline, "the copy does not progress: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(before["state"], "syncing", "{before}");
    assert!(u(&before["regions_clean"]) < 48 * MIB / u(&before["region_size"]), "{before}");

    // Three passes over each slice, verified as it goes (every 256 blocks).
    let mut args = FIO_JOB.to_vec();
    args.extend_from_slice(&["--loops=3", "--verify_backlog=256"]);
    let t0 = Instant::now();
    let r = fio(dir.path(), &uri, &args);
    let fio_secs = t0.elapsed().as_secs_f64();
    r.assert_clean(&d, 4);
    assert_eq!(r.sum("write", "io_bytes"), 3 * 64 * MIB, "every job wrote its slice three times\n{}", r.log);
    assert_eq!(r.sum("read", "io_bytes"), 3 * 64 * MIB, "every block was read back and verified\n{}", r.log);
    let st = d.status();
    eprintln!(
        "fio took {fio_secs:.1} s; copied {} bytes before it, {} after",
        before["bytes_copied"], st["bytes_copied"]
    );
    // The copy ran while fio wrote (the writes raced it).
    assert!(st["state"] == "syncing" || st["state"] == "synced", "{st}");
    assert!(u(&st["bytes_copied"]) > u(&before["bytes_copied"]), "the copy made no progress during fio: {st}");
    assert!(st["error"].is_null(), "{st}");

    d.cli_ok(&["set-rate", "0"]);
    wait_ok(&d, 60);
    let st = d.status();
    assert_eq!(st["state"], "synced", "{st}");
    assert_eq!(st["regions_clean"], st["regions_total"], "{st}");
    assert!(u(&st["bytes_copied"]) >= size, "{st}");
    verify_ok(&d);
    // In synced, reads come from the target: fio re-verifies its blocks there.
    let mut vo = FIO_JOB.to_vec();
    vo.push("--verify_only");
    let r = fio(dir.path(), &uri, &vo);
    r.assert_clean(&d, 4);
    assert_eq!(r.sum("read", "io_bytes"), 64 * MIB, "{}", r.log);

    // detach-source: S closed for good.
    d.cli_ok(&["detach-source"]);
    let st = d.status();
    assert_eq!(st["state"], "source-detached", "{st}");
    assert!(st["source"].is_null(), "{st}");
    assert!(st["target"].as_str().is_some_and(|t| t.ends_with("target.img")), "{st}");
    assert!(
        !d.has_open(&src),
        "the source is still open after detach-source: {:?}",
        open_files(d.child.as_ref().unwrap().id())
    );
    assert!(d.has_open(&tgt), "the target should be open");
    let s_at_detach = std::fs::read(&src).unwrap();
    assert_same(&s_at_detach[64 * MIB as usize..], &model.0[64 * MIB as usize..], "source (pre-attach patterns)");
    // The export still serves everything: the patterns, fio's blocks, and as a
    // whole exactly what S held when it was released.
    qemu_io_ok(&d, &uri, &reads);
    let r = fio(dir.path(), &uri, &vo);
    r.assert_clean(&d, 4);
    assert_eq!(r.sum("read", "io_bytes"), 64 * MIB, "{}", r.log);
    let e = export_bytes(&uri);
    assert_same(&e, &s_at_detach, "export after detach-source vs the released source");
    model.0.copy_from_slice(&e);

    // grow: explicit (smaller than T), then to T's whole size.
    let out = d.cli_ok(&["grow", "112M"]);
    assert!(out.contains(&(112 * MIB).to_string()), "{out}");
    assert_eq!(d.status()["export_size"], 112 * MIB);
    assert_eq!(nbdinfo_size(&uri), 112 * MIB, "a new connection sees the grown size");
    let out = d.cli_ok(&["grow"]);
    assert!(out.contains(&tsize.to_string()), "{out}");
    let st = d.status();
    assert_eq!(st["export_size"], tsize, "{st}");
    assert_eq!(st["regions_total"], tsize / u(&st["region_size"]), "{st}");
    assert_eq!(nbdinfo_size(&uri), tsize, "a new connection sees the grown size");
    model.0.resize(tsize as usize, 0); // T was sparse beyond the source's size
    let grown: [(u8, u64, u64); 4] =
        [(0x77, 96 * MIB, MIB), (0x78, 100 * MIB + 3, 5000), (0x79, 127 * MIB, MIB - 1), (0x7a, tsize - 1, 1)];
    let mut cmds: Vec<String> = grown.iter().map(|&(b, o, l)| format!("write -P {b} {o} {l}")).collect();
    cmds.push("flush".into());
    qemu_io_ok(&d, &uri, &cmds);
    for &(b, o, l) in &grown {
        model.fill(o, l, b);
    }
    let mut cmds: Vec<String> = grown.iter().map(|&(b, o, l)| format!("read -P {b} {o} {l}")).collect();
    cmds.push(format!("read -P 0 {} {}", 112 * MIB, 15 * MIB));
    qemu_io_ok(&d, &uri, &cmds);

    // Stop: the target alone holds exactly what the export served.
    let before_stop = export_bytes(&uri);
    assert_same(&before_stop, &model.0, "export before stop vs model");
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert!(!d.sock.exists(), "the NBD socket was not removed");
    assert_same(&std::fs::read(&tgt).unwrap(), &before_stop, "target file after stop vs the export");
    assert_same(&std::fs::read(&src).unwrap(), &s_at_detach, "the source was touched after detach-source");
}

/// `livemirror demo` runs the whole flow with the daemon's own NBD client and
/// checks every byte itself: it must pass, step by step.
#[test]
fn the_demo_passes_every_check() {
    let dir = scratch();
    let out = run(&bin(), &["demo", "--size", "16M", "--rate", "64M", "--dir", p(dir.path())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{}{}", stdout, String::from_utf8_lossy(&out.stderr));
    for step in 1..=9 {
        assert!(stdout.contains(&format!("[{step}] ")), "step {step} missing:\n{stdout}");
    }
    assert!(stdout.contains("demo passed"), "{stdout}");
}

#[test]
fn serve_with_target_at_start_syncs_like_attach() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let content = pattern(11, 16 * MIB as usize + 4096);
    make_image(&src, &content);
    make_sparse(&tgt, 20 * MIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--target", p(&tgt)]);
    let st = d.status();
    assert!(st["state"] == "syncing" || st["state"] == "synced", "{st}");
    assert!(st["target"].as_str().is_some_and(|t| t.ends_with("t.img")), "{st}");
    wait_ok(&d, 30);
    let st = d.status();
    assert_eq!(st["state"], "synced", "{st}");
    assert_eq!(st["regions_clean"], st["regions_total"], "{st}");
    verify_ok(&d);
    assert_same(&export_bytes(&d.uri()), &content, "export");
    assert_eq!(d.stop().code(), Some(0));
    let t = std::fs::read(&tgt).unwrap();
    assert_eq!(t.len(), 20 * MIB as usize, "the target keeps its size");
    assert_same(&t[..content.len()], &content, "target after stop");
    assert_same(&std::fs::read(&src).unwrap(), &content, "source after stop");
}

#[test]
fn trim_before_attach_shrinks_the_copy_to_the_used_blocks() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 64 * MIB;
    let content = pattern(12, size as usize); // data everywhere, nothing zero
    make_image(&src, &content);
    // The target starts full of something else, so skipped regions that were
    // not handled would show up.
    make_image(&tgt, &vec![0xeeu8; size as usize]);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let uri = d.uri();
    qemu_io_ok(&d, &uri, &["discard 8M 56M".into(), "flush".into()]);
    let st = d.status();
    let rs = u(&st["region_size"]);
    let trimmed = 56 * MIB / rs;
    assert_eq!(st["regions_discarded"], trimmed, "every wholly trimmed region is marked discarded: {st}");

    d.cli_ok(&["attach", p(&tgt)]);
    wait_ok(&d, 60);
    let st = d.status();
    assert_eq!(st["state"], "synced", "{st}");
    let copied = u(&st["bytes_copied"]);
    assert!(copied >= 8 * MIB, "the used 8 MiB must be copied: {st}");
    assert!(copied <= 8 * MIB + 4 * rs, "the trimmed 56 MiB were copied anyway ({copied} bytes): {st}");
    assert_eq!(st["regions_unverifiable"], trimmed, "the trimmed regions are unverifiable: {st}");
    let out = verify_ok(&d);
    eprintln!("{out}");
    // The first 8 MiB are intact, through the export and on the target.
    let e = export_bytes(&uri);
    assert_same(&e[..8 * MIB as usize], &content[..8 * MIB as usize], "export, first 8 MiB");
    // A trimmed range reads back stably (the same twice, whatever it is).
    let e2 = export_bytes(&uri);
    assert_same(&e2, &e, "a trimmed range must read back stably");
    // A write covering a trimmed region entirely makes it verifiable again.
    qemu_io_ok(&d, &uri, &[format!("write -P 0x5c {} {}", 16 * MIB, rs), "flush".into()]);
    let st = d.status();
    assert_eq!(st["regions_unverifiable"], trimmed - 1, "{st}");
    verify_ok(&d);
    let mut d = d;
    assert_eq!(d.stop().code(), Some(0));
    let t = std::fs::read(&tgt).unwrap();
    assert_same(&t[..8 * MIB as usize], &content[..8 * MIB as usize], "target, first 8 MiB");
    assert!(t[16 * MIB as usize..(16 * MIB + rs) as usize].iter().all(|&b| b == 0x5c), "the later write is on T");
    assert_same(&t, &e_with(&e, 16 * MIB, rs, 0x5c), "target vs what the export served");
}

fn e_with(e: &[u8], off: u64, len: u64, b: u8) -> Vec<u8> {
    let mut v = e.to_vec();
    v[off as usize..(off + len) as usize].fill(b);
    v
}

#[test]
fn detach_target_during_a_sync_then_attach_another() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let t1 = dir.path().join("t1.img");
    let t2 = dir.path().join("t2.img");
    let size = 32 * MIB;
    let mut model = Model(pattern(13, size as usize));
    make_image(&src, &model.0);
    make_sparse(&t1, size);
    make_sparse(&t2, size);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "4M"]);
    let uri = d.uri();
    d.cli_ok(&["attach", p(&t1)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while u(&d.status()["regions_clean"]) < 8 {
        assert!(Instant::now() < deadline, "no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A write into a clean region (goes to both) and one into a dirty region.
    qemu_io_ok(&d, &uri, &["write -P 0x31 4096 8192".into(), format!("write -P 0x32 {} 65536", 30 * MIB)]);
    model.fill(4096, 8192, 0x31);
    model.fill(30 * MIB, 65536, 0x32);

    d.cli_ok(&["detach-target"]);
    let st = d.status();
    assert_eq!(st["state"], "serving", "{st}");
    assert!(st["target"].is_null(), "{st}");
    assert!(st["error"].is_null(), "{st}");
    // detach-target returns once T is closed, not some time later.
    assert!(!d.has_open(&t1), "the detached target is still open after detach-target returned");
    // Writes still work, and reads see them.
    qemu_io_ok(
        &d,
        &uri,
        &["write -P 0x33 0 4096".into(), format!("write -P 0x34 {} 100000", 17 * MIB + 5), "flush".into()],
    );
    model.fill(0, 4096, 0x33);
    model.fill(17 * MIB + 5, 100000, 0x34);
    assert_same(&export_bytes(&uri), &model.0, "export after detach-target");
    assert_same(&std::fs::read(&src).unwrap(), &model.0, "source after detach-target");
    let o = d.cli(&["wait", "--timeout", "5"]);
    assert_eq!(code(&o), 1, "wait with no target must exit 1: {}", text(&o));

    // A new attach to another file completes.
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["attach", p(&t2)]);
    wait_ok(&d, 60);
    let st = d.status();
    assert_eq!(st["state"], "synced", "{st}");
    assert!(st["target"].as_str().is_some_and(|t| t.ends_with("t2.img")), "{st}");
    verify_ok(&d);
    assert_same(&export_bytes(&uri), &model.0, "export after the second sync");
    assert_eq!(d.stop().code(), Some(0));
    assert_same(&std::fs::read(&t2).unwrap(), &model.0, "second target after stop");
    assert_same(&std::fs::read(&src).unwrap(), &model.0, "source after stop");
}

#[test]
fn attach_right_after_detach_target_never_finds_the_target_still_held() {
    // detach-target used to return while the copier thread still held T open
    // (with its exclusive lock): the next attach failed about one time in five.
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 32 * MIB;
    let data = pattern(14, size as usize);
    make_image(&src, &data);
    make_sparse(&tgt, size);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "16M"]);
    for round in 0..25 {
        let o = d.cli(&["attach", p(&tgt)]);
        assert_eq!(code(&o), 0, "attach in round {round}: {}\n{}", text(&o), d.log_text());
        std::thread::sleep(Duration::from_millis(round % 5 * 7));
        let o = d.cli(&["detach-target"]);
        assert_eq!(code(&o), 0, "detach-target in round {round}: {}", text(&o));
        assert!(!d.has_open(&tgt), "round {round}: the target is still open after detach-target returned");
    }
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["attach", p(&tgt)]);
    wait_ok(&d, 60);
    verify_ok(&d);
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the target after the last sync");
}

#[test]
fn the_rate_shown_never_exceeds_the_limit() {
    // The limiter must not start with a burst, and the meter must count the
    // time the first bytes took: the demo once showed 35.8 MiB/s under 24.
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 64 * MIB;
    make_image(&src, &pattern(15, size as usize));
    make_sparse(&tgt, size);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "8M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    let t0 = Instant::now();
    let mut shown = Vec::new();
    while t0.elapsed() < Duration::from_secs(4) {
        let st = d.status();
        shown.push(st["copy_rate_bytes_per_sec"].as_f64().unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let copied = u(&d.status()["bytes_copied"]) as f64;
    let real = copied / t0.elapsed().as_secs_f64();
    let limit = 8.0 * MIB as f64;
    let worst = shown.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "rate limit 8 MiB/s: shown at most {:.2} MiB/s, copied {:.2} MiB/s",
        worst / MIB as f64,
        real / MIB as f64
    );
    // One 1 MiB piece of rounding over the 3 s window, and a little timing slack.
    assert!(worst <= limit * 1.1, "status showed {:.2} MiB/s under an 8 MiB/s limit: {shown:?}", worst / MIB as f64);
    assert!(real <= limit * 1.1 && real >= limit * 0.7, "the copy ran at {:.2} MiB/s", real / MIB as f64);
}

#[test]
fn a_second_migration_without_a_restart_and_across_one() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let t1 = dir.path().join("t1.img");
    let t2 = dir.path().join("t2.img");
    let state = dir.path().join("st");
    let size = 16 * MIB;
    let mut model = Model(pattern(16, size as usize));
    make_image(&src, &model.0);
    make_sparse(&t1, 24 * MIB);
    make_sparse(&t2, 40 * MIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--state", p(&state)]);
    let uri = d.uri();
    // The first migration: S -> T1, then T1 alone, grown.
    d.cli_ok(&["attach", p(&t1)]);
    wait_ok(&d, 60);
    d.cli_ok(&["detach-source"]);
    d.cli_ok(&["grow"]);
    qemu_io_ok(&d, &uri, &[format!("write -P 0x41 {} 65536", 20 * MIB), "flush".into()]);
    model.fill(20 * MIB, 65536, 0x41);
    // The second: T1 -> T2, with the daemon restarted in the middle of it.
    d.cli_ok(&["set-rate", "4M"]);
    d.cli_ok(&["attach", p(&t2)]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    assert!(st["source"].as_str().is_some_and(|s| s.ends_with("t1.img")), "T1 is the source now: {st}");
    assert!(st["target"].as_str().is_some_and(|s| s.ends_with("t2.img")), "{st}");
    qemu_io_ok(&d, &uri, &["write -P 0x42 4096 8192".into(), "flush".into()]);
    model.fill(4096, 8192, 0x42);
    std::thread::sleep(Duration::from_millis(700));
    assert!(d.stop().success());
    // Restarted with the command line of the first migration's end: it resumes
    // the recorded chain (T1 -> T2).
    d.restart(&["--target", p(&t1), "--state", p(&state)]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "the second sync resumes: {st}\n{}", d.log_text());
    assert!(st["source"].as_str().is_some_and(|s| s.ends_with("t1.img")), "{st}");
    // And again after a crash: acknowledged writes in the second sync survive
    // kill -9 (their regions are in flight in the state file, copied again).
    qemu_io_ok(&d, &uri, &[format!("write -P 0x43 {} 65536", 8 * MIB), "flush".into()]);
    model.fill(8 * MIB, 65536, 0x43);
    qemu_io_ok(&d, &uri, &[format!("write -P 0x44 {} 4096", 12 * MIB)]);
    model.fill(12 * MIB, 4096, 0x44);
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();
    d.restart(&["--target", p(&t1), "--state", p(&state)]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "the second sync resumes after kill -9: {st}\n{}", d.log_text());
    assert!(st["source"].as_str().is_some_and(|s| s.ends_with("t1.img")), "{st}");
    d.cli_ok(&["set-rate", "0"]);
    wait_ok(&d, 60);
    verify_ok(&d);
    d.cli_ok(&["detach-source"]);
    assert!(!d.has_open(&t1), "the first target is closed after the second detach-source");
    d.cli_ok(&["grow"]);
    assert_eq!(u(&d.status()["export_size"]), 40 * MIB);
    assert_same(&export_bytes(&uri)[..24 * MIB as usize], &model.padded(24 * MIB), "export after two migrations");
    assert!(d.stop().success());
    assert_same(&std::fs::read(&t2).unwrap()[..24 * MIB as usize], &model.padded(24 * MIB), "T2 after two migrations");
}

/// While syncing, every region is read from where its bytes are current: a
/// region the copy has finished from the target, one it has not reached from
/// the source, and a read across the boundary is split between them. Both
/// devices are changed behind the daemon's back, so each byte read says which
/// device it came from.
#[test]
fn while_syncing_a_copied_region_is_read_from_the_target_and_the_rest_from_the_source() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 16 * MIB;
    make_image(&src, &pattern(21, size as usize));
    make_sparse(&tgt, size);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "2M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while u(&d.status()["regions_clean"]) < 16 {
        assert!(Instant::now() < deadline, "the copy made no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused, the copied part stays as it is: every span in flight has landed,
    // and the copy went in ascending order, so the copied regions are a prefix.
    d.cli_ok(&["pause"]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    let region = u(&st["region_size"]);
    let boundary = u(&st["regions_clean"]) * region;
    assert!(boundary >= MIB && boundary + MIB <= size, "copied up to {boundary} of {size}: {st}");
    let k = 4096u64;
    // In the copied part: T and S get different bytes.
    poke(&tgt, 0, &[0xa1; 8192]);
    poke(&src, 0, &[0xb2; 8192]);
    // Around the boundary, and far beyond it.
    poke(&tgt, boundary - k, &[0xa3; 8192]);
    poke(&src, boundary - k, &[0xb4; 8192]);
    poke(&src, size - 2 * k, &[0xb5; 8192]);
    let uri = d.uri();
    assert_same(&pread(&uri, 0, 2 * k), &[0xa1; 8192], "a copied region (must come from the target)");
    let mut split = vec![0xa3; k as usize];
    split.extend_from_slice(&[0xb4; 4096]);
    assert_same(&pread(&uri, boundary - k, 2 * k), &split, "a read across the copied part's end (target, then source)");
    assert_same(
        &pread(&uri, size - 2 * k, 2 * k),
        &[0xb5; 8192],
        "a region not copied yet (must come from the source)",
    );
    // verify sees the tampering with the copied part: the two legs differ there.
    let o = d.cli(&["verify"]);
    assert_eq!(code(&o), 1, "verify must find the regions changed behind its back: {}", text(&o));
}

/// Convergence under any write load: writers keep the device saturated with
/// random 4K writes across the whole export for the whole sync, and the sync
/// still completes, in about the time the floor rate (`--min-rate`) promises.
///
/// "Saturated" must hold without a gap: the copier runs at full speed
/// whenever no client request has been in flight for 50 ms, and on a loaded
/// machine fio alone leaves such gaps, in which even a copier that wrongly
/// yields to clients altogether would finish. So the source is served by
/// nbdkit with a 5 ms delay on every write: each client write stays in
/// flight that long, and 64 of them keep the device busy through any pause
/// of fio's.
#[test]
fn a_sync_completes_under_saturating_random_writes_across_the_whole_export() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 96 * MIB;
    let floor = 32 * MIB;
    make_image(&src, &pattern(22, size as usize));
    make_sparse(&tgt, size);
    let qsock = dir.path().join("src.sock");
    let mut nbdkit = std::process::Command::new(tool("nbdkit"))
        .args(["-f", "-U", p(&qsock), "--filter=delay", "file", p(&src), "wdelay=5ms"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&qsock).is_err() {
        assert!(Instant::now() < deadline, "nbdkit does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let source = format!("nbd+unix:///?socket={}", qsock.display());
    let d = Daemon::start(dir.path(), &["--source", &source, "--min-rate", "32M"]);
    let json = dir.path().join("fio.json");
    let mut fio = std::process::Command::new(tool("fio"))
        .args(["--name=saturate", "--ioengine=nbd", &format!("--uri={}", d.uri()), "--rw=randwrite", "--bs=4k"])
        // Two jobs on the two halves: concurrent writes never overlap (the
        // legs of overlapping concurrent writes may land in either order).
        .args(["--iodepth=32", "--numjobs=2", "--size=48M", "--offset_increment=48M", "--serialize_overlap=1"])
        .args(["--norandommap", "--randrepeat=0", "--time_based", "--runtime=300", "--output-format=json"])
        .arg(format!("--output={}", json.display()))
        .current_dir(dir.path())
        .env("PATH", debian_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fio");
    // The writers run before the copy starts.
    let t_fio = Instant::now();
    while t_fio.elapsed() < Duration::from_secs(2) {
        assert!(fio.try_wait().unwrap().is_none(), "fio ended early:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    d.cli_ok(&["attach", p(&tgt)]);
    // What the floor promises for one pass over the export, with slack for a
    // loaded machine. A copier that yields to busy clients altogether never
    // ends here.
    let promised = Duration::from_secs_f64(size as f64 / floor as f64);
    let bound = promised * 3 + Duration::from_secs(10);
    loop {
        let st = d.status();
        if st["state"] == "synced" {
            break;
        }
        assert_eq!(st["state"], "syncing", "{st}");
        assert!(fio.try_wait().unwrap().is_none(), "the writers stopped before the sync ended: {st}");
        assert!(
            t0.elapsed() < bound,
            "not synced after {:?} under the writers (the floor promises about {promised:?}): {st}",
            t0.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    // Still writing when the sync ended: it converged under the load, not after.
    assert!(fio.try_wait().unwrap().is_none(), "the writers had stopped before the sync ended");
    eprintln!("synced in {took:?} under saturating writes (the floor promises {promised:?})");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(fio.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    wait_timeout(&mut fio, Duration::from_secs(30)).expect("fio stops on SIGINT");
    let report = std::fs::read_to_string(&json).unwrap();
    let j: serde_json::Value = serde_json::from_str(&report[report.find('{').expect("fio report")..]).unwrap();
    for job in j["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "a write failed: {job}");
        assert!(u(&job["write"]["total_ios"]) > 1000, "the writers barely wrote: {job}");
    }
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    let _ = nbdkit.kill();
    let _ = nbdkit.wait();
    assert_same(&std::fs::read(&tgt).unwrap(), &std::fs::read(&src).unwrap(), "the target after the writers");
}
