//! Faults driven through the CLI: a target that fills up mid-sync, a target
//! whose capacity vanishes under the copy, a byte changed on the target behind
//! livemirror's back, malformed control traffic, and SIGKILL with clients
//! connected.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const KILL_CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/kill_client.py");

// ------------------------------------------------------------------ helpers

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn fill(model: &mut [u8], off: u64, len: u64, b: u8) {
    model[off as usize..(off + len) as usize].fill(b);
}

fn wait_closed(d: &Daemon, path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.has_open(path) {
        assert!(Instant::now() < deadline, "{what} {} is still open by the daemon", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn verify_ok(d: &Daemon) {
    let o = d.cli(&["verify"]);
    assert_eq!(code(&o), 0, "verify: {}\n{}", text(&o), d.log_text());
    assert!(String::from_utf8_lossy(&o.stdout).contains(" 0 mismatching ranges"), "{}", text(&o));
}

/// The offset in "... at offset N ..." of an error message.
fn offset_in(msg: &str) -> u64 {
    let rest = &msg[msg.find("offset ").unwrap_or_else(|| panic!("no offset in {msg:?}")) + 7..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap_or_else(|_| panic!("no offset number in {msg:?}"))
}

/// `wait` must fail (exit 1) because the target failed; returns its stderr.
fn wait_fails_degraded(d: &Daemon) -> String {
    let t0 = Instant::now();
    let o = d.cli(&["wait", "--timeout", "60"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(code(&o), 1, "wait on a failing target must exit 1: {}\n{}", text(&o), d.log_text());
    assert!(t0.elapsed() < Duration::from_secs(30), "wait took {:?}", t0.elapsed());
    assert!(err.contains("degraded"), "wait should say why: {err}");
    err
}

/// Checks the degraded status after a target failure; returns the error.
fn assert_degraded(d: &Daemon, target: &Path) -> String {
    let st = d.status();
    assert_eq!(st["state"], "degraded", "{st}\n{}", d.log_text());
    assert!(st["target"].is_null(), "the failed target is still listed: {st}");
    assert!(st["source"].is_string(), "{st}");
    let err = st["error"].as_str().unwrap_or_else(|| panic!("no error in the status: {st}")).to_string();
    assert!(err.contains("target"), "the error does not mention the target: {err}");
    assert!(err.contains("offset"), "the error does not mention the offset: {err}");
    let o = d.cli(&["status"]);
    let human = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(human.contains("degraded"), "{human}");
    wait_closed(d, target, "the failed target");
    // A wait started after the failure fails at once, too.
    let t0 = Instant::now();
    let o = d.cli(&["wait", "--timeout", "20"]);
    assert_eq!(code(&o), 1, "wait in state degraded: {}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(5), "wait in state degraded took {:?}", t0.elapsed());
    err
}

/// After a target failure: client I/O goes on (on S), S holds the model, and a
/// good target attached afterwards syncs and verifies.
fn recover_with_a_good_target(d: &mut Daemon, dir: &Path, src: &Path, model: &mut [u8]) {
    let size = model.len() as u64;
    let w: [(u8, u64, u64); 3] = [(0x61, 0, MIB), (0x62, 30 * MIB + 3, 12345), (0x63, size - 4096, 4096)];
    let mut cmds: Vec<String> = w.iter().map(|&(b, o, l)| format!("write -P {b} {o} {l}")).collect();
    cmds.push("flush".into());
    cmds.extend(w.iter().map(|&(b, o, l)| format!("read -P {b} {o} {l}")));
    qemu_io_ok(d, &d.uri(), &cmds);
    for &(b, o, l) in &w {
        fill(model, o, l, b);
    }
    assert_eq!(d.state(), "degraded", "client I/O changed the state");
    assert_same(&export_bytes(&d.uri()), model, "export while degraded");
    assert_same(&std::fs::read(src).unwrap(), model, "source while degraded");

    let good = dir.join("good.img");
    make_sparse(&good, size);
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["attach", p(&good)]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait after attaching a good target: {}\n{}", text(&o), d.log_text());
    let st = d.status();
    assert_eq!(st["state"], "synced", "{st}");
    assert!(st["error"].is_null(), "the old error is still reported: {st}");
    verify_ok(d);
    assert_same(&export_bytes(&d.uri()), model, "export after the new sync");
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert_same(&std::fs::read(&good).unwrap(), model, "good target after stop");
    assert_same(&std::fs::read(src).unwrap(), model, "source after stop");
}

// ------------------------------------------------------------ target faults

#[test]
fn a_target_that_fills_up_mid_sync_degrades_and_loses_nothing() {
    let dir = scratch_shm();
    let mnt = dir.path().join("small");
    let _mount = Mount::tmpfs(&mnt, "size=20m");
    let src = dir.path().join("s.img");
    let size = 64 * MIB;
    let mut model = pattern(41, size as usize);
    make_image(&src, &model);
    let tgt = mnt.join("t.img");
    make_sparse(&tgt, size); // 64 MiB apparent size on a 20 MiB filesystem
    let mut d = Daemon::start(dir.path(), &["--source", p(&src)]);
    qemu_io_ok(&d, &d.uri(), &["write -P 0x51 5M 1M".into(), "flush".into()]);
    fill(&mut model, 5 * MIB, MIB, 0x51);

    d.cli_ok(&["attach", p(&tgt)]);
    let err = wait_fails_degraded(&d);
    eprintln!("wait: {err}");
    let msg = assert_degraded(&d, &tgt);
    let off = offset_in(&msg);
    // A queue depth of 1 MiB copies (the piece size for files in RAM) is in
    // flight, and any of the writes past the full point may report first.
    let in_flight = engine::DEFAULT_QUEUE_DEPTH as u64 * MIB;
    assert!(
        (8 * MIB..=20 * MIB + in_flight).contains(&off),
        "the copy should fail where the 20 MiB filesystem is full: {msg}"
    );
    assert!(msg.contains("No space left") || msg.to_lowercase().contains("space"), "{msg}");
    // The source is intact byte for byte.
    assert_same(&std::fs::read(&src).unwrap(), &model, "source after the target filled up");
    recover_with_a_good_target(&mut d, dir.path(), &src, &mut model);
}

// A disk that vanishes is simulated with a loop device whose capacity drops
// under the copy: truncate the backing file and `losetup -c` (LOOP_SET_CAPACITY),
// which the kernel applies to a busy device, as it shrinks a hot-removed disk.
// Writes past the new end then fail in the block layer (ENOSPC), like I/O to a
// disk that is gone. (`losetup -d` only sets autoclear on a busy device, and
// there is no dm/nbd/scsi_debug module to pull a device for real.)
#[test]
fn a_target_whose_capacity_vanishes_mid_sync_degrades_and_loses_nothing() {
    let dir = scratch_shm();
    let backing = dir.path().join("disk.img");
    let size = 32 * MIB;
    make_sparse(&backing, size);
    let lo = run_ok(&tool("losetup"), &["-f", "--show", p(&backing)]).trim().to_string();
    let _lo = Loop(lo.clone());
    let src = dir.path().join("s.img");
    let mut model = pattern(42, size as usize);
    make_image(&src, &model);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "4M"]);
    d.cli_ok(&["attach", &lo]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while u(&d.status()["regions_clean"]) < 16 {
        assert!(Instant::now() < deadline, "no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.state(), "syncing");
    // A write into a clean region reaches both legs.
    qemu_io_ok(&d, &d.uri(), &["write -P 0x52 4096 4096".into(), "flush".into()]);
    fill(&mut model, 4096, 4096, 0x52);

    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(0).unwrap();
    run_ok(&tool("losetup"), &["-c", &lo]);
    let err = wait_fails_degraded(&d);
    eprintln!("wait: {err}");
    let msg = assert_degraded(&d, Path::new(&lo));
    assert!(offset_in(&msg) < size, "{msg}");
    assert_same(&std::fs::read(&src).unwrap(), &model, "source after the target vanished");
    recover_with_a_good_target(&mut d, dir.path(), &src, &mut model);
}

// ------------------------------------------------------------ short devices
//
// A device that becomes shorter than the export (a truncated image file, a
// shrunk volume) has failed; its missing bytes must never be served as zeroes.

/// A READ with a simple reply: the data, or the NBD error number.
fn raw_read(s: &mut UnixStream, off: u64, len: u32) -> Result<Vec<u8>, u32> {
    use std::io::Read;
    s.write_all(&common::raw::request_bytes(common::raw::CMD_READ, 0, 7, off, len)).unwrap();
    let (err, cookie) = common::raw::read_simple_reply(s).expect("reply");
    assert_eq!(cookie, 7);
    if err != 0 {
        return Err(err);
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).expect("payload");
    Ok(data)
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

#[test]
fn a_target_file_truncated_mid_sync_degrades_and_never_serves_zeroes() {
    let dir = scratch_shm();
    let size = 32 * MIB;
    let src = dir.path().join("s.img");
    let mut model = pattern(43, size as usize);
    make_image(&src, &model);
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, size);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "4M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while u(&d.status()["regions_clean"]) < 200 {
        assert!(Instant::now() < deadline, "no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    // 40 % is clean and reads of it come from T; now T loses everything.
    truncate(&tgt, 0);
    d.wait_state("degraded", 10);
    let st = d.status();
    let err = st["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("shorter than the") && err.contains("t.img"), "{st}");
    assert_same(&export_bytes(&d.uri()), &model, "export after the target was truncated");
    let o = d.cli(&["detach-source"]);
    assert_eq!(code(&o), 1, "detach-source must be refused: {}", text(&o));
    wait_closed(&d, &tgt, "the truncated target");
    recover_with_a_good_target(&mut d, dir.path(), &src, &mut model);
}

#[test]
fn a_target_file_truncated_after_the_sync_degrades_and_reads_come_from_the_source() {
    let dir = scratch_shm();
    let size = 16 * MIB;
    let src = dir.path().join("s.img");
    let model = pattern(44, size as usize);
    make_image(&src, &model);
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, size);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--target", p(&tgt)]);
    d.wait_state("synced", 30);
    truncate(&tgt, size / 2);
    d.wait_state("degraded", 10);
    let st = d.status();
    assert!(st["error"].as_str().unwrap_or_default().contains("shorter than the"), "{st}");
    assert_same(&export_bytes(&d.uri()), &model, "export after the synced target was truncated");
    let o = d.cli(&["detach-source"]);
    assert_eq!(code(&o), 1, "detach-source after the target failed: {}", text(&o));
    assert_same(&std::fs::read(&src).unwrap(), &model, "the source is intact");
}

#[test]
fn a_source_file_truncated_while_serving_fails_reads_past_its_end_with_eio() {
    let dir = scratch_shm();
    let size = 16 * MIB;
    let src = dir.path().join("s.img");
    let model = pattern(45, size as usize);
    make_image(&src, &model);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    truncate(&src, size / 2);
    let mut s = common::raw::raw_handshake(&d.sock, "");
    assert_eq!(raw_read(&mut s, size / 2 + 4096, 4096), Err(5), "a read past the source's new end is EIO");
    assert_eq!(raw_read(&mut s, size / 2 - 2048, 4096), Err(5), "a read across the new end is EIO");
    let head = raw_read(&mut s, 0, 4096).expect("the part that is still there reads");
    assert_same(&head, &model[..4096], "head of the source");
    // The status says so within the watchdog's interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = d.status();
        if st["error"].as_str().is_some_and(|e| e.contains("source failed") && e.contains("shorter than the")) {
            break;
        }
        assert!(Instant::now() < deadline, "the status does not report the short source: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // base:allocation does not call the missing half a hole (a copying client
    // would skip it as zeroes).
    let out = run_ok(&tool("nbdinfo"), &["--map", &d.uri()]);
    let tail_hole = out.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 3 && f[0].parse::<u64>().is_ok_and(|o| o >= size / 2) && f[2] != "0"
    });
    assert!(!tail_hole, "the truncated part is reported as a hole or zero:\n{out}");
}

#[test]
fn a_source_truncated_while_synced_is_dropped_and_the_target_serves_everything() {
    let dir = scratch_shm();
    let size = 16 * MIB;
    let src = dir.path().join("s.img");
    let model = pattern(46, size as usize);
    make_image(&src, &model);
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, size);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--target", p(&tgt)]);
    d.wait_state("synced", 30);
    truncate(&src, 4096);
    d.wait_state("source-detached", 10);
    let st = d.status();
    assert!(st["source"].is_null(), "{st}");
    assert_same(&export_bytes(&d.uri()), &model, "export served by the target alone");
}

#[test]
fn verify_finds_a_byte_changed_behind_our_back() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let content = pattern(43, 16 * MIB as usize);
    make_image(&src, &content);
    make_sparse(&tgt, 16 * MIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--target", p(&tgt)]);
    let o = d.cli(&["wait", "--timeout", "30"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    verify_ok(&d);

    let flip = |path: &Path, off: u64| {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[!b[0]], off).unwrap();
    };
    // One byte on T, then one on S.
    for (path, off) in [(&tgt, 5_000_001u64), (&src, 11 * MIB + 65535)] {
        flip(path, off);
        let o = d.cli(&["verify"]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(code(&o), 1, "verify must fail after a byte of {} changed: {}", path.display(), text(&o));
        let ranges: Vec<(u64, u64)> = out
            .lines()
            .filter(|l| l.starts_with("mismatch"))
            .map(|l| {
                let r = l.split("bytes ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("");
                let (a, b) = r.split_once("..").unwrap_or_else(|| panic!("no range in {l:?}"));
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect();
        assert_eq!(ranges.len(), 1, "one mismatching range expected:\n{out}");
        let (a, b) = ranges[0];
        assert!(a <= off && off < b, "the range {a}..{b} does not contain the changed byte {off}:\n{out}");
        assert!(b - a <= 64 * 1024, "the range is wider than a region: {a}..{b}");
        assert!(out.contains(" 1 mismatching ranges"), "{out}");
        flip(path, off);
        verify_ok(&d);
    }
    assert_eq!(d.stop().code(), Some(0));
    assert_same(&std::fs::read(&tgt).unwrap(), &content, "target");
}

// ----------------------------------------------------- control socket abuse

/// Sends `bytes` on a fresh control connection and reads one reply line
/// (None when the daemon closed). A hang is a failure.
fn ctl_send(conn: &mut UnixStream, bytes: &[u8]) -> Option<String> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    if conn.write_all(bytes).is_err() {
        return None; // the daemon closed while we wrote: fine
    }
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(line),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
            panic!("the daemon neither answered nor closed within 10 s after {} bytes", bytes.len())
        }
        Err(_) => None, // reset: closed
    }
}

fn assert_refused_or_closed(reply: Option<String>, what: &str) -> bool {
    match reply {
        None => false,
        Some(line) => {
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("{what}: reply is not JSON ({e}): {line:?}"));
            assert_eq!(v["ok"], false, "{what}: {line}");
            assert!(v["error"].is_string(), "{what}: no error string: {line}");
            true
        }
    }
}

#[test]
fn malformed_control_traffic_is_refused_and_the_daemon_keeps_serving() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &vec![0x2au8; 4 * MIB as usize]);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src)]);
    // A silent connection stays open throughout: it must not block anyone.
    let _silent = UnixStream::connect(&d.control).unwrap();

    let long_line = {
        let mut v = vec![b'a'; 100 << 10];
        v.push(b'\n');
        v
    };
    let long_json = {
        let mut v = br#"{"cmd":"attach","target":""#.to_vec();
        v.extend(std::iter::repeat_n(b'x', 100 << 10));
        v.extend_from_slice(b"\"}\n");
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"garbage\n".to_vec()),
        ("unknown command", br#"{"cmd":"format-disk","target":"/dev/sda"}"#.iter().chain(b"\n").copied().collect()),
        ("missing argument", b"{\"cmd\":\"attach\"}\n".to_vec()),
        ("wrong type", b"{\"cmd\":\"set-rate\",\"rate\":\"fast\"}\n".to_vec()),
        ("negative size", b"{\"cmd\":\"grow\",\"size\":-1}\n".to_vec()),
        ("no cmd", b"{}\n".to_vec()),
        ("array", b"[1,2,3]\n".to_vec()),
        ("empty line", b"\n".to_vec()),
        ("invalid utf-8", b"\xff\xfe\xfd{\"cmd\":\"status\"}\n".to_vec()),
        ("nul bytes", b"\0\0\0\0\n".to_vec()),
        ("100 KiB line", long_line),
        ("100 KiB attach path", long_json),
    ];
    for (what, bytes) in &cases {
        let mut c = UnixStream::connect(&d.control).unwrap();
        let answered = assert_refused_or_closed(ctl_send(&mut c, bytes), what);
        // Every bad line gets {"ok":false,"error":...}, never a silent hang-up.
        assert!(answered, "{what}: the daemon closed the connection without a reply");
        if answered {
            // The connection is still usable, or closed: never a wrong answer.
            if let Some(line) = ctl_send(&mut c, b"{\"cmd\":\"status\"}\n") {
                let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
                assert_eq!(v["ok"], true, "{what}: then status: {line}");
                assert_eq!(v["status"]["state"], "serving", "{what}: {line}");
            }
        }
        let st = d.status();
        assert_eq!(st["state"], "serving", "{what}: {st}");
        assert!(st["target"].is_null(), "{what}: {st}");
        if let Some(s) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{what}: the daemon exited ({s}):\n{}", d.log_text());
        }
    }

    // 100 KiB with no newline at all, the connection left open: the daemon
    // answers or closes instead of buffering forever.
    let mut c = UnixStream::connect(&d.control).unwrap();
    assert_refused_or_closed(ctl_send(&mut c, &vec![b'{'; 100 << 10]), "100 KiB without a newline");
    // Half a request, then the client goes away.
    {
        let mut c = UnixStream::connect(&d.control).unwrap();
        c.write_all(b"{\"cmd\":\"detach-").unwrap();
    }
    // Many connections opened and dropped at once.
    let many: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&d.control).unwrap()).collect();
    drop(many);

    let t0 = Instant::now();
    assert_eq!(d.state(), "serving");
    assert!(t0.elapsed() < Duration::from_secs(2), "status took {:?}", t0.elapsed());
    qemu_io_ok(&d, &d.uri(), &["read -P 0x2a 0 4M".into()]);
    // (A control connection left open across SIGTERM is the next test.)
    drop(_silent);
    drop(c);
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert!(std::fs::read(&src).unwrap().iter().all(|&b| b == 0x2a), "the source changed");
}

/// SIGTERM: "stop accepting, finish in-flight requests, flush, persist state,
/// exit 0" -- an idle control client (a script holding the socket, a stuck
/// `livemirror` CLI) has nothing in flight and must not keep the daemon alive.
#[test]
fn sigterm_with_an_idle_control_connection_exits_promptly() {
    use nix::sys::signal::{kill, Signal};
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 4 * MIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src)]);
    qemu_io_ok(&d, &d.uri(), &["write -P 0x17 0 64k".into()]);
    let idle = UnixStream::connect(&d.control).unwrap();
    // One that already talked, too.
    let mut talked = UnixStream::connect(&d.control).unwrap();
    let reply = ctl_send(&mut talked, b"{\"cmd\":\"status\"}\n").expect("a status reply");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let mut c = d.child.take().expect("running");
    let t0 = Instant::now();
    kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
    let st = wait_timeout(&mut c, Duration::from_secs(10));
    let took = t0.elapsed();
    drop((idle, talked));
    let st = st.unwrap_or_else(|| {
        panic!("SIGTERM with an idle control connection open: no exit within 10 s (killed)\n{}", d.log_text())
    });
    assert_eq!(exit_code(&st), 0, "{}", d.log_text());
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!d.control.exists() && !d.sock.exists(), "sockets left behind");
    assert!(std::fs::read(&src).unwrap()[..65536].iter().all(|&b| b == 0x17));
}

// --------------------------------------------------------------- SIGKILL

#[test]
fn sigkill_with_clients_connected_then_a_restart_serves_the_same_data() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let size = 32 * MIB;
    let orig = pattern(44, size as usize);
    make_image(&src, &orig);
    make_sparse(&tgt, size);
    let args = ["--source", p(&src), "--target", p(&tgt)];
    let mut d = Daemon::start(dir.path(), &args);
    d.wait_state("synced", 30);

    // Two clients: the writer below, and an idle raw connection.
    let _idle = UnixStream::connect(&d.sock).unwrap();
    let mut client = Command::new(tool("nbdsh"))
        .args(["-n", "-c", &format!("exec(open({KILL_CLIENT:?}).read())")])
        .env("PATH", debian_path())
        .env("LM_URI", d.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ACKED", "the client did not get its writes acknowledged: {line:?}\n{}", d.log_text());
    std::thread::sleep(Duration::from_millis(200)); // unflushed writes in flight
    d.kill9();
    let st = wait_timeout(&mut client, Duration::from_secs(20)).expect("the client noticed the kill");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    assert!(st.success(), "client: {line}{rest}");
    assert!(rest.contains("server gone"), "{rest}");

    let mut model = orig.clone();
    for i in 0..16u64 {
        fill(&mut model, i * MIB + 777, MIB / 2, 0x40 + i as u8);
    }
    fill(&mut model, 17 * MIB + 1, 100000, 0x60);
    fill(&mut model, 18 * MIB + 4095, 3, 0x61);

    d.restart(&args);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait after the restart: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    let e = export_bytes(&d.uri());
    // Everything acknowledged before the kill is there; the unflushed area
    // holds, byte by byte, either the old data or the client's 0xee.
    let (a, b) = (20 * MIB as usize, 24 * MIB as usize);
    for (i, (&got, &old)) in e[a..b].iter().zip(&orig[a..b]).enumerate() {
        assert!(got == old || got == 0xee, "byte {} is {got:#04x}: neither old nor written", a + i);
    }
    model[a..b].copy_from_slice(&e[a..b]);
    assert_same(&e, &model, "export after kill -9 and restart");
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert_same(&std::fs::read(&src).unwrap(), &model, "source after restart and stop");
    assert_same(&std::fs::read(&tgt).unwrap(), &model, "target after restart and stop");
}
