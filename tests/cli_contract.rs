//! The command-line contract of interface.md, driven exactly as written: the
//! `status --json` object, exit codes and reasons of every control command,
//! `wait`, and the daemon's sockets, signals and locks.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------ helpers

/// `livemirror ARGS` with no implicit `--control`.
fn lm(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap_or_else(|e| panic!("cannot run livemirror: {e}"))
}

fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a control command that must be refused: exit 1, exactly one line on
/// stderr containing every `needle`. Returns that line.
fn refused(d: &Daemon, args: &[&str], needles: &[&str]) -> String {
    let o = d.cli(args);
    let err = err_text(&o);
    assert_eq!(code(&o), 1, "livemirror {args:?} must exit 1 (refused); stdout: {}stderr: {err}", out_text(&o));
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "livemirror {args:?}: want a one-line reason on stderr, got: {err:?}");
    assert!(lines[0].trim().len() > 10, "livemirror {args:?}: the reason is empty: {err:?}");
    for n in needles {
        assert!(lines[0].contains(n), "livemirror {args:?}: the reason does not mention {n:?}: {err:?}");
    }
    lines[0].to_string()
}

/// Polls `status --json` until `f` holds (panics after `secs`).
fn wait_for(d: &Daemon, secs: u64, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = d.status();
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: not reached in {secs} s; status: {st}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Waits for a child to exit on its own (the daemon of `spawn_raw`).
fn exit_of(d: &mut Daemon, secs: u64) -> i32 {
    let c = d.child.as_mut().expect("spawned");
    let st = wait_timeout(c, Duration::from_secs(secs))
        .unwrap_or_else(|| panic!("livemirror did not exit within {secs} s:\n{}", d.log_text()));
    d.child = None;
    exit_code(&st)
}

fn nbdinfo_size(uri: &str) -> u64 {
    let s = run_ok(&tool("nbdinfo"), &["--size", uri]);
    s.trim().parse().unwrap_or_else(|e| panic!("nbdinfo --size {uri}: {e}: {s:?}"))
}

fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok(&tool("qemu-io"), &args);
    assert!(!out.contains("Pattern verification failed"), "qemu-io {cmds:?}:\n{out}");
    assert!(!out.to_lowercase().contains("error"), "qemu-io {cmds:?}:\n{out}");
    out
}

// ------------------------------------------------------------ status --json

/// Checks the contract fields and their JSON types; returns the object.
fn status_checked(d: &Daemon) -> serde_json::Value {
    let o = d.cli(&["status", "--json"]);
    assert_eq!(code(&o), 0, "status --json: {}", err_text(&o));
    let text = out_text(&o);
    assert!(text.ends_with('\n'), "status --json must end its line: {text:?}");
    assert_eq!(text.lines().count(), 1, "status --json must print exactly one line: {text:?}");
    let v: serde_json::Value =
        serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {text}"));
    let obj = v.as_object().unwrap_or_else(|| panic!("status --json is not an object: {text}"));
    for f in [
        "state",
        "paused",
        "export_size",
        "source",
        "target",
        "region_size",
        "regions_total",
        "regions_clean",
        "bytes_copied",
        "copy_rate_bytes_per_sec",
        "eta_seconds",
        "error",
    ] {
        assert!(obj.contains_key(f), "status --json lacks {f}: {text}");
    }
    let state = v["state"].as_str().unwrap_or_else(|| panic!("state is not a string: {text}"));
    assert!(
        ["serving", "syncing", "synced", "source-detached", "degraded"].contains(&state),
        "state {state:?} is not one of the five: {text}"
    );
    assert!(v["paused"].is_boolean(), "paused: {text}");
    for f in ["export_size", "region_size", "regions_total", "regions_clean", "bytes_copied"] {
        assert!(v[f].is_u64(), "{f} is not a non-negative integer: {text}");
    }
    assert!(v["copy_rate_bytes_per_sec"].is_f64(), "copy_rate_bytes_per_sec is not a float: {text}");
    assert!(v["eta_seconds"].is_null() || v["eta_seconds"].is_number(), "eta_seconds: {text}");
    for f in ["source", "target", "error"] {
        assert!(v[f].is_null() || v[f].is_string(), "{f} is neither a string nor null: {text}");
    }
    let (size, rs) = (v["export_size"].as_u64().unwrap_or(0), v["region_size"].as_u64().unwrap_or(0));
    assert!(rs > 0, "{text}");
    assert_eq!(v["regions_total"].as_u64(), Some(size.div_ceil(rs)), "regions_total = ceil(export/region): {text}");
    assert!(v["regions_clean"].as_u64() <= v["regions_total"].as_u64(), "{text}");
    v
}

fn human_status(d: &Daemon) -> String {
    let o = d.cli(&["status"]);
    assert_eq!(code(&o), 0, "status: {}", err_text(&o));
    out_text(&o)
}

#[test]
fn status_json_fields_types_and_region_count_for_an_odd_size() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let size = 5 * MIB + 12345; // not a multiple of any region size
    make_image(&src, &pattern(1, size as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 6 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--region-size", "16K"]);

    let v = status_checked(&d);
    assert_eq!(v["state"], "serving");
    assert_eq!(v["paused"], false);
    assert_eq!(v["export_size"], size);
    assert_eq!(v["region_size"], 16384);
    assert_eq!(v["regions_total"], size.div_ceil(16384));
    assert_eq!(v["regions_total"], 321, "5 MiB + 12345 bytes at 16 KiB is 320 full regions and a partial one");
    assert!(v["source"].as_str().is_some_and(|s| s.ends_with("s.img")), "{v}");
    assert!(v["target"].is_null(), "{v}");
    assert!(v["error"].is_null(), "{v}");
    let h = human_status(&d);
    assert!(h.contains("serving"), "human status does not mention the state:\n{h}");

    // While syncing (slowly) the target is named.
    d.cli_ok(&["set-rate", "1M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    let v = status_checked(&d);
    assert_eq!(v["state"], "syncing", "{v}");
    assert!(v["target"].as_str().is_some_and(|s| s.ends_with("t.img")), "{v}");
    let h = human_status(&d);
    assert!(h.contains("syncing"), "human status does not mention the state:\n{h}");

    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["wait", "--timeout", "30"]);
    assert_eq!(code(&o), 0, "wait: {}", err_text(&o));
    let v = status_checked(&d);
    assert_eq!(v["state"], "synced", "{v}");
    assert_eq!(v["regions_clean"], v["regions_total"], "{v}");
    assert!(v["bytes_copied"].as_u64().unwrap_or(0) >= size, "every byte was copied: {v}");
    assert!(v["error"].is_null(), "{v}");
    let h = human_status(&d);
    assert!(h.contains("synced"), "human status does not mention the state:\n{h}");

    // The default region size is 64K; the partial last region is counted.
    drop(d);
    let dir2 = scratch_shm();
    let d = Daemon::start(dir2.path(), &["--source", p(&src)]);
    let v = status_checked(&d);
    assert_eq!(v["region_size"], 65536, "{v}");
    assert_eq!(v["regions_total"], 81, "5 MiB + 12345 bytes at 64 KiB is 81 regions: {v}");
}

// ------------------------------------------------------------ refusals (exit 1)

#[test]
fn refusals_exit_1_with_a_one_line_reason() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let content = pattern(2, 8 * MIB as usize);
    make_image(&src, &content);
    let small = dir.path().join("small.img");
    make_sparse(&small, 4 * MIB);
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 12 * MIB);
    let other = dir.path().join("other.img");
    make_sparse(&other, 12 * MIB);
    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir).unwrap();
    // A file that cannot be opened for writing even by root: on a read-only mount.
    let ro_mnt = dir.path().join("ro");
    let _ro = Mount::tmpfs(&ro_mnt, "size=16m");
    let ro_file = ro_mnt.join("t.img");
    make_sparse(&ro_file, 12 * MIB);
    run_ok(&tool("mount"), &["-o", "remount,ro", p(&ro_mnt)]);
    // A loop device whose backing file is the source.
    let lo = run_ok(&tool("losetup"), &["-f", "--show", p(&src)]).trim().to_string();
    let _lo = Loop(lo.clone());

    let d = Daemon::start(dir.path(), &["--source", p(&src)]);

    // Nothing to act on while serving.
    refused(&d, &["detach-source"], &[]);
    refused(&d, &["grow"], &[]);
    refused(&d, &["grow", "16M"], &[]);
    refused(&d, &["pause"], &[]);
    refused(&d, &["resume"], &[]);

    // Targets that must not be attached.
    refused(&d, &["attach", p(&small)], &["4194304", "8388608"]);
    refused(&d, &["attach", p(&dir.path().join("does-not-exist"))], &["does-not-exist"]);
    refused(&d, &["attach", p(&a_dir)], &["a-directory"]);
    refused(&d, &["attach", p(&ro_file)], &[]);
    // The source itself: refused, and the reason says so (checked at the end,
    // so that the rest of the contract is checked too).
    let self_attach = d.cli(&["attach", p(&src)]);
    let st = d.status();
    assert_eq!(st["state"], "serving", "a refused attach changed the state: {st}");
    assert!(st["target"].is_null(), "{st}");
    let lo_line = d.cli(&["attach", &lo]);
    let lo_code = code(&lo_line);
    if lo_code == 0 {
        // Undo it so the rest of the test can go on, then fail below.
        let _ = d.cli(&["detach-target"]);
    }
    let lo_err = err_text(&lo_line);
    assert_eq!(d.state(), "serving", "{}", d.log_text());
    assert_eq!(std::fs::read(&src).unwrap(), content, "the source changed");

    // A slow sync: everything that needs synced or source-detached is refused.
    d.cli_ok(&["set-rate", "1M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    assert_eq!(d.state(), "syncing");
    refused(&d, &["attach", p(&other)], &[]);
    refused(&d, &["detach-source"], &[]);
    refused(&d, &["grow"], &[]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    assert!(st["target"].as_str().is_some_and(|t| t.ends_with("t.img")), "the first target is still attached: {st}");
    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["wait", "--timeout", "30"]);
    assert_eq!(code(&o), 0, "wait: {}", err_text(&o));
    refused(&d, &["attach", p(&other)], &[]);
    refused(&d, &["grow"], &[]);
    refused(&d, &["pause"], &[]);
    d.cli_ok(&["detach-source"]);
    assert_eq!(d.state(), "source-detached");
    refused(&d, &["detach-source"], &[]);
    // attach here is a second migration (the device served now is its source):
    // that device itself, or one too small for the export, is refused.
    refused(&d, &["attach", p(&tgt)], &["it is the source itself"]);
    refused(&d, &["attach", p(&small)], &["4194304"]);
    assert_eq!(d.state(), "source-detached");
    let line = refused(&d, &["grow", "4M"], &["never shrinks"]);
    assert!(line.contains("4194304") || line.contains("4M"), "{line}");
    refused(&d, &["grow", "13M"], &[]);
    let st = d.status();
    assert_eq!(st["export_size"], 8 * MIB, "refused grows changed the size: {st}");
    // Growing to exactly the target's size is fine.
    d.cli_ok(&["grow", "12M"]);
    assert_eq!(d.status()["export_size"], 12 * MIB);

    let self_err = err_text(&self_attach);
    assert_eq!(code(&self_attach), 1, "attach of the source itself: {self_err}");
    assert!(
        self_err.trim_end().lines().count() == 1 && self_err.contains("it is the source itself"),
        "attach of the source itself must say \"it is the source itself\": {self_err:?}"
    );
    assert_eq!(
        lo_code,
        1,
        "attach {lo} (a loop device backed by the source file) must be refused; stderr: {lo_err}\n{}",
        d.log_text()
    );
    assert_eq!(lo_err.trim_end().lines().count(), 1, "{lo_err:?}");
}

// ------------------------------------------------------------ usage (exit 2)

#[test]
fn usage_errors_exit_2() {
    let dir = scratch();
    let ctl = dir.path().join("ctl.sock");
    let c = p(&ctl);
    for args in [
        vec!["frobnicate"],
        vec!["attach", "--control", c],
        vec!["set-rate", "--control", c],
        vec!["set-rate", "12Q", "--control", c],
        vec!["set-rate", "fast", "--control", c],
        vec!["grow", "1X", "--control", c],
        vec!["wait", "--timeout", "soon", "--control", c],
        vec!["status", "--bogus", "--control", c],
        vec!["attach", "a", "b", "--control", c],
        vec!["serve", "--region-size", "lots"],
        vec![],
    ] {
        let o = lm(&args);
        assert_eq!(code(&o), 2, "livemirror {args:?}: want exit 2 (usage); stderr: {}", err_text(&o));
        assert!(!err_text(&o).trim().is_empty(), "livemirror {args:?}: no usage message");
    }
}

#[test]
fn control_commands_without_a_daemon_exit_1_naming_the_socket() {
    let dir = scratch();
    let ctl = dir.path().join("nobody/ctl.sock");
    let c = p(&ctl);
    for args in [
        vec!["status", "--control", c],
        vec!["status", "--json", "--control", c],
        vec!["attach", "/tmp/x", "--control", c],
        vec!["wait", "--control", c],
        vec!["verify", "--control", c],
        vec!["pause", "--control", c],
        vec!["set-rate", "1M", "--control", c],
        vec!["grow", "--control", c],
        vec!["detach-source", "--control", c],
    ] {
        let o = lm(&args);
        let err = err_text(&o);
        assert_eq!(code(&o), 1, "livemirror {args:?} with no daemon: want exit 1; stderr: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "livemirror {args:?}: want one line: {err:?}");
        assert!(err.contains(c), "livemirror {args:?}: the message does not name {c}: {err}");
        assert!(out_text(&o).is_empty(), "livemirror {args:?} printed on stdout: {}", out_text(&o));
    }
    // An existing socket file with nobody listening is the same.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = lm(&["status", "--control", p(&stale)]);
    assert_eq!(code(&o), 1, "{}", err_text(&o));
    assert!(err_text(&o).contains(p(&stale)), "{}", err_text(&o));
}

// ------------------------------------------------------------------- wait

#[test]
fn wait_exit_codes_and_plain_progress_lines() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(3, 64 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 64 * MIB);

    // No target: nothing to wait for.
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let t0 = Instant::now();
    let o = d.cli(&["wait"]);
    assert_eq!(code(&o), 1, "wait with no target: stderr {}", err_text(&o));
    assert!(t0.elapsed() < Duration::from_secs(5), "wait with no target must not block");
    assert!(!err_text(&o).trim().is_empty());
    drop(d);

    // serve --max-rate 1M on 64M: the sync takes a minute; wait times out.
    let dir2 = scratch_shm();
    let d = Daemon::start(dir2.path(), &["--source", p(&src), "--target", p(&tgt), "--max-rate", "1M"]);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    assert_eq!(st["max_rate"], MIB, "{st}");
    let t0 = Instant::now();
    let o = d.cli(&["wait", "--timeout", "1.5"]);
    let el = t0.elapsed();
    let err = err_text(&o);
    assert_eq!(code(&o), 3, "wait --timeout during a slow sync: stderr {err}");
    assert!(el >= Duration::from_millis(1400) && el < Duration::from_secs(8), "wait --timeout 1.5 took {el:?}");
    // stderr is a pipe: plain lines, no bar, no carriage returns or escapes.
    assert!(!err.contains('\r') && !err.contains('\x1b'), "not plain lines: {err:?}");
    assert!(err.lines().any(|l| l.contains("syncing") && l.contains('%')), "no progress line: {err:?}");
    let st = d.status();
    assert_eq!(st["state"], "syncing", "wait timing out must not change anything: {st}");
    assert!(st["bytes_copied"].as_u64().unwrap_or(0) < 32 * MIB, "the rate limit is not applied: {st}");

    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    let err = err_text(&o);
    assert_eq!(code(&o), 0, "wait after lifting the limit: stderr {err}\n{}", d.log_text());
    assert!(!err.contains('\r') && !err.contains('\x1b'), "not plain lines: {err:?}");
    assert!(err.lines().any(|l| l.contains("synced")), "no final progress line: {err:?}");
    assert_eq!(d.state(), "synced");
    // Already synced: returns at once.
    let o = d.cli(&["wait", "--timeout", "1"]);
    assert_eq!(code(&o), 0, "{}", err_text(&o));
    // Target dropped: nothing to wait for again.
    d.cli_ok(&["detach-target"]);
    let o = d.cli(&["wait", "--timeout", "5"]);
    assert_eq!(code(&o), 1, "wait after detach-target: {}", err_text(&o));
}

// --------------------------------------------------------- set-rate, pause

#[test]
fn set_rate_pause_and_resume() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(4, 64 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 64 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    assert_eq!(d.status()["max_rate"], 0);
    d.cli_ok(&["set-rate", "64K"]);
    assert_eq!(d.status()["max_rate"], 65536);
    d.cli_ok(&["set-rate", "8M"]);
    assert_eq!(d.status()["max_rate"], 8 * MIB);

    d.cli_ok(&["attach", p(&tgt)]);
    wait_for(&d, 10, "some progress", |s| s["bytes_copied"].as_u64().unwrap_or(0) > 0);
    d.cli_ok(&["pause"]);
    let a = d.status();
    assert_eq!(a["state"], "syncing", "{a}");
    assert_eq!(a["paused"], true, "{a}");
    std::thread::sleep(Duration::from_millis(500));
    let b = d.status();
    assert_eq!(b["paused"], true, "{b}");
    assert_eq!(a["bytes_copied"], b["bytes_copied"], "copying went on while paused: {a} then {b}");
    assert_eq!(a["regions_clean"], b["regions_clean"], "copying went on while paused: {a} then {b}");
    assert!(human_status(&d).contains("paused"), "human status does not say paused");
    // Client I/O goes on while paused.
    qemu_io_ok(&d.uri(), &["write -P 0x6b 100k 8k", "read -P 0x6b 100k 8k"]);

    d.cli_ok(&["resume"]);
    let c = d.status();
    assert_eq!(c["paused"], false, "{c}");
    std::thread::sleep(Duration::from_millis(500));
    let e = d.status();
    assert!(
        e["bytes_copied"].as_u64() > b["bytes_copied"].as_u64() || e["state"] == "synced",
        "copying did not resume: {b} then {e}"
    );
    d.cli_ok(&["set-rate", "0"]);
    assert_eq!(d.status()["max_rate"], 0);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "{}", err_text(&o));
    let o = d.cli(&["verify"]);
    assert_eq!(code(&o), 0, "verify after pause/resume: {}{}", out_text(&o), err_text(&o));
    // pause and resume need syncing.
    refused(&d, &["pause"], &[]);
    refused(&d, &["resume"], &[]);
}

// ------------------------------------------------------------------ daemon

#[test]
fn sockets_are_0600_in_created_directories() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 4 * MIB);
    let sock = dir.path().join("run/a/b/nbd.sock");
    let ctl = dir.path().join("ctl/c/d/control.sock");
    let listen = format!("unix:{}", sock.display());
    let mut d = Daemon::spawn_raw(dir.path(), &["--source", p(&src), "--listen", &listen, "--control", p(&ctl)]);
    d.sock = sock.clone();
    d.control = ctl.clone();
    d.wait_ready();
    for s in [&sock, &ctl] {
        let m = std::fs::metadata(s).unwrap_or_else(|e| panic!("{}: {e}", s.display()));
        assert!(m.file_type().is_socket(), "{} is not a socket", s.display());
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{} has mode {:o}", s.display(), m.permissions().mode());
    }
    assert_eq!(nbdinfo_size(&d.uri()), 4 * MIB);
    assert_eq!(d.stop().code(), Some(0), "{}", d.log_text());
    assert!(!sock.exists() && !ctl.exists(), "sockets left behind after a clean stop");
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &vec![0x3cu8; 4 * MIB as usize]);
    let src2 = dir.path().join("s2.img");
    make_image(&src2, &vec![0x3du8; 2 * MIB as usize]);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src)]);

    // Another daemon (on another source, so no lock wait) on the same NBD socket ...
    let dir2 = scratch();
    let listen = format!("unix:{}", d.sock.display());
    let ctl2 = dir2.path().join("ctl2.sock");
    let mut d2 = Daemon::spawn_raw(dir2.path(), &["--source", p(&src2), "--listen", &listen, "--control", p(&ctl2)]);
    assert_eq!(exit_of(&mut d2, 20), 1, "a second serve on a live NBD socket must exit 1:\n{}", d2.log_text());
    assert!(d2.log_text().contains("already served by another process"), "{}", d2.log_text());
    // ... or on the same control socket.
    let dir3 = scratch();
    let listen3 = format!("unix:{}", dir3.path().join("nbd3.sock").display());
    let mut d3 =
        Daemon::spawn_raw(dir3.path(), &["--source", p(&src2), "--listen", &listen3, "--control", p(&d.control)]);
    assert_eq!(exit_of(&mut d3, 20), 1, "a second serve on a live control socket must exit 1:\n{}", d3.log_text());
    assert!(d3.log_text().contains("already served by another process"), "{}", d3.log_text());
    // The first one is untouched.
    assert_eq!(d.state(), "serving");
    qemu_io_ok(&d.uri(), &["read -P 0x3c 0 4M"]);

    // kill -9 leaves both socket files behind; a restart replaces them.
    d.kill9();
    assert!(d.sock.exists() && d.control.exists(), "kill -9 should leave the socket files");
    assert!(std::os::unix::net::UnixStream::connect(&d.sock).is_err(), "nobody listens on the stale socket");
    d.restart(&["--source", p(&src)]);
    assert_eq!(d.state(), "serving");
    assert_eq!(nbdinfo_size(&d.uri()), 4 * MIB);
    qemu_io_ok(&d.uri(), &["read -P 0x3c 0 4M"]);
    assert_eq!(d.stop().code(), Some(0));
}

#[test]
fn tcp_listen_loopback_only_unless_allow_remote_and_several_addresses() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &vec![0x4eu8; 3 * MIB as usize]);

    // Not loopback, no --allow-remote: refused before serving anything.
    let port = free_tcp_port();
    let any = format!("tcp:0.0.0.0:{port}");
    let mut d = Daemon::spawn_raw(dir.path(), &["--source", p(&src), "--listen", &any]);
    assert_eq!(exit_of(&mut d, 20), 1, "{}", d.log_text());
    assert!(d.log_text().contains("--allow-remote"), "the refusal must mention --allow-remote:\n{}", d.log_text());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "something listens on {port}");
    drop(d);

    // With --allow-remote it serves.
    let dir2 = scratch();
    let ctl = dir2.path().join("ctl.sock");
    let mut d = Daemon::spawn_raw(
        dir2.path(),
        &["--source", p(&src), "--listen", &any, "--allow-remote", "--control", p(&ctl)],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(d.cli(&["status"]).status.success() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()) {
        assert!(Instant::now() < deadline, "not ready:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(nbdinfo_size(&format!("nbd://127.0.0.1:{port}")), 3 * MIB);
    assert_eq!(d.stop().code(), Some(0));

    // Loopback TCP plus two Unix sockets at once: every one serves.
    let dir3 = scratch();
    let port = free_tcp_port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let u1 = dir3.path().join("one.sock");
    let u2 = dir3.path().join("two/two.sock");
    let (l1, l2) = (format!("unix:{}", u1.display()), format!("unix:{}", u2.display()));
    let mut d = Daemon::spawn_raw(
        dir3.path(),
        &["--source", p(&src), "--listen", &l1, "--listen", &tcp, "--listen", &l2, "--control", p(&ctl)],
    );
    d.sock = u2.clone();
    d.control = ctl.clone();
    d.wait_ready();
    let uris = [
        format!("nbd+unix:///?socket={}", u1.display()),
        format!("nbd://127.0.0.1:{port}"),
        format!("nbd+unix:///?socket={}", u2.display()),
    ];
    for u in &uris {
        assert_eq!(nbdinfo_size(u), 3 * MIB, "{u}");
    }
    // A write through one is read through the others.
    qemu_io_ok(&uris[1], &["write -P 0x5f 1000 70000", "flush"]);
    qemu_io_ok(&uris[0], &["read -P 0x5f 1000 70000", "read -P 0x4e 0 1000"]);
    qemu_io_ok(&uris[2], &["read -P 0x5f 1000 70000", "read -P 0x4e 71000 100000"]);
    assert_eq!(d.stop().code(), Some(0));
    assert!(!u1.exists() && !u2.exists(), "Unix sockets left behind");
    let data = std::fs::read(&src).unwrap();
    assert!(data[1000..71000].iter().all(|&b| b == 0x5f) && data[..1000].iter().all(|&b| b == 0x4e));
}

#[test]
fn sigterm_and_sigint_exit_0_flush_and_remove_sockets() {
    use nix::sys::signal::{kill, Signal};
    for (i, sig) in [Signal::SIGTERM, Signal::SIGINT].into_iter().enumerate() {
        let dir = scratch_shm();
        let src = dir.path().join("s.img");
        make_sparse(&src, 8 * MIB);
        let tgt = dir.path().join("t.img");
        make_sparse(&tgt, 8 * MIB);
        let args = ["--source", p(&src), "--target", p(&tgt)];
        let mut d = Daemon::start(dir.path(), &args);
        d.wait_state("synced", 30);
        let byte = 0x21 + i as u8;
        qemu_io_ok(&d.uri(), &[&format!("write -P {byte} 12345 1M")]);
        // A client stays connected across the signal, with an acknowledged
        // but unflushed write.
        let script = format!(
            "h.pwrite(bytes([{}]) * 65536, {}); print('ready', flush=True); import time; time.sleep(60)",
            byte + 0x10,
            4 * MIB
        );
        let mut client = Command::new(tool("nbdsh"))
            .args(["-u", &d.uri(), "-c", &script])
            .env("PATH", debian_path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("nbdsh");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(client.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the idle client did not get its write done");
        let mut c = d.child.take().expect("running");
        kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).expect("signal");
        let st = wait_timeout(&mut c, Duration::from_secs(10));
        let _ = client.kill();
        let _ = client.wait();
        let st = st.unwrap_or_else(|| panic!("no exit within 10 s after {sig} (killed):\n{}", d.log_text()));
        assert_eq!(exit_code(&st), 0, "{sig}: {}", d.log_text());
        assert!(!d.sock.exists(), "{sig}: the NBD socket was not removed");
        assert!(!d.control.exists(), "{sig}: the control socket was not removed");
        // Both legs hold the write.
        for f in [&src, &tgt] {
            let data = std::fs::read(f).unwrap();
            assert!(
                data[12345..12345 + MIB as usize].iter().all(|&b| b == byte),
                "{sig}: {} lacks the write",
                f.display()
            );
            assert!(data[..12345].iter().all(|&b| b == 0), "{sig}: {} changed outside the write", f.display());
            let (a, b) = (4 * MIB as usize, 4 * MIB as usize + 65536);
            assert!(
                data[a..b].iter().all(|&x| x == byte + 0x10),
                "{sig}: {} lacks the idle client's write",
                f.display()
            );
        }
    }
}

#[test]
fn a_second_daemon_on_the_same_source_waits_for_the_first() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &vec![0x11u8; 4 * MIB as usize]);
    let mut d1 = Daemon::start(dir.path(), &["--source", p(&src)]);
    qemu_io_ok(&d1.uri(), &["write -P 0x22 0 1M"]);

    let dir2 = scratch();
    let mut d2 = Daemon::spawn_raw(dir2.path(), &["--source", p(&src)]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d2.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).is_none(),
        "the second daemon exited instead of waiting:\n{}",
        d2.log_text()
    );
    assert!(!d2.cli(&["status"]).status.success(), "the second daemon answers while the first holds the source");
    assert!(std::os::unix::net::UnixStream::connect(&d2.sock).is_err(), "the second daemon serves NBD already");
    // The first still serves.
    qemu_io_ok(&d1.uri(), &["read -P 0x22 0 1M"]);

    let t0 = Instant::now();
    assert_eq!(d1.stop().code(), Some(0));
    d2.wait_ready();
    assert!(t0.elapsed() < Duration::from_secs(15), "the second daemon took {:?} to take over", t0.elapsed());
    qemu_io_ok(&d2.uri(), &["read -P 0x22 0 1M", "read -P 0x11 1M 3M"]);
    assert_eq!(d2.stop().code(), Some(0));
}
