//! `livemirror upgrade` on the host: three upgrades in a row during a sync onto
//! a remote target, with a TLS listener and a write load that reconnects when
//! its connection is handed over; no connection is refused meanwhile, no write
//! is lost, the copy goes on; and a new binary that does not start, or starts
//! and cannot take over, leaves the daemon serving; an overlay goes over with
//! the limit in force. (The kernel device's
//! handover runs in the VM: tests/vm/kill-e2e.sh; the root storage daemon's in
//! tests/root_daemon.rs.)
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const WRITER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbd_writer.py");
const CREDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/tls_creds.sh");

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// One `livemirror upgrade`: the new daemon's pid and the pause it reports.
fn upgrade(d: &Daemon, extra: &[&str]) -> (u32, f64) {
    let mut args = vec!["upgrade"];
    args.extend_from_slice(extra);
    let out = d.cli_ok(&args);
    let pid = out.split("pid ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok());
    let pause = out.split("paused ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok());
    match (pid, pause) {
        (Some(p), Some(ms)) => (p, ms),
        _ => panic!("upgrade said {out:?}"),
    }
}

/// SIGTERM to a daemon that is not our child, and its end (30 s at most).
fn stop_pid(pid: u32, d: &Daemon) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} did not stop:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The reconnecting write load (tests/scripts/nbd_writer.py).
struct Writer {
    child: Child,
    stop: PathBuf,
    model: PathBuf,
}

impl Writer {
    fn start(dir: &Path, uri: &str, seed: u64) -> Writer {
        let (stop, model) = (dir.join(format!("writer{seed}.stop")), dir.join(format!("writer{seed}.model")));
        let child = Command::new(tool("python3"))
            .args([WRITER, uri, &seed.to_string(), p(&model), p(&stop)])
            .env("PATH", debian_path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nbd_writer.py");
        Writer { child, stop, model }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the write load ended ({st}): {err}");
        }
    }

    /// Stops it; the model of the export and what it printed.
    fn finish(mut self) -> (Vec<u8>, String) {
        std::fs::write(&self.stop, b"").unwrap();
        let st = wait_timeout(&mut self.child, Duration::from_secs(60)).expect("the writer stops");
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(st.success(), "the write load failed ({st}): {out}{err}");
        (std::fs::read(&self.model).unwrap(), out)
    }
}

/// Connects to every listener in a loop: a refused connection is recorded.
struct Prober {
    stop: Arc<AtomicBool>,
    tries: Arc<AtomicU64>,
    refused: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(unix: PathBuf, tcp: u16) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let tries = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (s, t, r) = (stop.clone(), tries.clone(), refused.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = std::os::unix::net::UnixStream::connect(&unix) {
                    r.lock().unwrap().push(format!("{}: {e}", unix.display()));
                }
                if let Err(e) = std::net::TcpStream::connect(("127.0.0.1", tcp)) {
                    r.lock().unwrap().push(format!("tcp {tcp}: {e}"));
                }
                t.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Prober { stop, tries, refused, thread: Some(thread) }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (self.tries.load(Ordering::Relaxed), self.refused.lock().unwrap().clone())
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn qemu_nbd_unix(sock: &Path, file: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let c = Command::new(tool("qemu-nbd"))
        .args(["-f", "raw", "-t", "-e", "8", "-k", p(sock), p(file)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "qemu-nbd does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

/// Three upgrades in a row while a sync onto a remote target (qemu-nbd) runs,
/// with a TLS listener on TCP and a plaintext one on a Unix socket, a write
/// load through the Unix socket, and a prober connecting to both listeners
/// every 2 ms. The daemon runs without `--state`, so each upgrade hands a
/// state file made for it over. Each time: a new pid serves, the pause is
/// reported, the copy's progress and rate limit survive, the remote link is
/// up; no connection was ever refused, a TLS client is served after each
/// upgrade, and at the end the export, the source and the remote disk all
/// hold exactly what the load wrote.
#[test]
fn upgrades_under_load_keep_every_write_and_refuse_no_connection() {
    let dir = scratch_shm();
    let creds = dir.path().join("creds");
    let o = Command::new("bash").arg(CREDS).arg(&creds).env("PATH", debian_path()).output().unwrap();
    assert!(o.status.success(), "tls_creds.sh: {}", text(&o));
    let size = 48 * MIB;
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(31, size as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, size);
    let qsock = dir.path().join("q.sock");
    let mut qemu = qemu_nbd_unix(&qsock, &tgt);
    let _q = KillPid(qemu.id());
    let port = free_tcp_port();
    let unix = format!("unix:{}", dir.path().join("nbd.sock").display());
    let tcp = format!("tcp:127.0.0.1:{port}");
    let remote = format!("nbd+unix:///?socket={}", qsock.display());
    let certs = creds.join("server");
    let mut d = Daemon::start(
        dir.path(),
        &[
            "--source",
            p(&src),
            "--target",
            &remote,
            "--listen",
            &unix,
            "--listen",
            &tcp,
            "--tls",
            "on",
            "--tls-certs",
            p(&certs),
            "--max-rate",
            "3M",
        ],
    );
    let first = d.child.as_ref().unwrap().id();
    let mut writer = Writer::start(dir.path(), &d.uri(), 31);
    let prober = Prober::start(d.sock.clone(), port);
    let tls_uri = format!("nbds://localhost:{port}/?tls-certificates={}", creds.join("anon").display());
    let mut pids = vec![first];
    let mut guards = Vec::new();
    for n in 1..=3 {
        let before = d.status();
        assert_eq!(before["state"], "syncing", "{before}");
        std::thread::sleep(Duration::from_millis(700));
        writer.assert_running();
        let (pid, pause) = upgrade(&d, &[]);
        eprintln!("upgrade {n}: pid {pid} took over, the export paused {pause} ms");
        assert!(!pids.contains(&pid), "upgrade {n}: pid {pid} is not new");
        guards.push(KillPid(pid));
        assert!(alive(pid), "upgrade {n}: pid {pid} does not run");
        assert!(pause > 0.0 && pause < 10_000.0, "upgrade {n}: a pause of {pause} ms");
        let prev = *pids.last().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(prev) {
            assert!(Instant::now() < deadline, "upgrade {n}: the old daemon {prev} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        pids.push(pid);
        let st = d.status();
        assert!(matches!(st["state"].as_str(), Some("syncing" | "synced")), "upgrade {n}: {st}");
        assert!(u(&st["regions_clean"]) >= u(&before["regions_clean"]), "upgrade {n}: progress lost: {before} -> {st}");
        assert_eq!(st["max_rate"], 3 << 20, "upgrade {n}: the rate limit is kept: {st}");
        assert_eq!(st["target"], remote.as_str(), "{st}");
        assert_eq!(st["target_link"]["state"], "connected", "upgrade {n}: {st}");
        // A TLS client is served by the new daemon.
        let o = run(&tool("nbdinfo"), &["--size", &tls_uri]);
        assert!(o.status.success(), "upgrade {n}: nbdinfo over TLS: {}\n{}", text(&o), d.log_text());
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), size.to_string());
    }
    // The first daemon exited 0 after handing over.
    let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(10)).expect("the first daemon exited");
    assert!(st.success(), "the first daemon exited {st}");
    d.child = None;
    let state_file = dir.path().join("ctl.sock.handover-state");
    assert!(state_file.exists(), "the handed-over state file");
    let (tries, refused) = prober.finish();
    assert!(
        refused.is_empty(),
        "{} of {tries} connection attempts refused: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    assert!(tries > 100, "the prober made only {tries} attempts");
    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let o = d.cli(&["verify"]);
    assert_eq!(code(&o), 0, "verify: {}", text(&o));
    let (model, said) = writer.finish();
    eprintln!("write load: {said}");
    let reconnects: u64 = said.split_whitespace().nth(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(reconnects >= 1, "the load never saw a connection handed over: {said}");
    assert_same(&export_bytes(&d.uri()), &model, "the export after three upgrades");
    stop_pid(*pids.last().unwrap(), &d);
    assert!(d.log_text().contains("stopped cleanly"), "{}", d.log_text());
    assert!(!state_file.exists(), "the state file made for the upgrades is removed at the clean stop");
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert_same(&std::fs::read(&tgt).unwrap(), &model, "the remote disk");
    assert_same(&std::fs::read(&src).unwrap(), &model, "the source");
}

/// A new binary that cannot be started, one that exits at once, and one that
/// starts and then cannot take over: each time `upgrade` fails with the
/// reason, and the same daemon (restarted in place after the last) serves on
/// with its sockets, its copy and every acknowledged write.
#[test]
fn a_new_binary_that_does_not_start_or_take_over_leaves_the_daemon_serving() {
    let dir = scratch_shm();
    let size = 24 * MIB;
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(32, size as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, size);
    let state = dir.path().join("state");
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--state", p(&state), "--max-rate", "2M"]);
    let pid = d.child.as_ref().unwrap().id();
    d.cli_ok(&["attach", p(&tgt)]);
    let mut writer = Writer::start(dir.path(), &d.uri(), 32);
    // Not executable.
    let text_file = dir.path().join("not-a-binary");
    std::fs::write(&text_file, "hello\n").unwrap();
    // Starts, and exits at once.
    let quits = dir.path().join("quits.sh");
    std::fs::write(&quits, "#!/bin/sh\nexit 3\n").unwrap();
    // Starts, says hello, and fails once it has the sockets (an argument only
    // the new daemon gets, which the old one was never given).
    let fails = dir.path().join("fails.sh");
    std::fs::write(&fails, format!("#!/bin/sh\nexec {} \"$@\" --max-requests 0\n", bin().display())).unwrap();
    for f in [&quits, &fails] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (binary, says) in [
        (&text_file, "cannot start"),
        (&quits, "exited (exit status: 3) before it could take over"),
        (&fails, "--max-requests and --max-connections must be at least 1"),
    ] {
        let before = d.status();
        let o = d.cli(&["upgrade", "--binary", p(binary)]);
        assert_eq!(code(&o), 1, "{}: {}", binary.display(), text(&o));
        let t = text(&o);
        assert!(t.contains(says) && t.contains("serves on"), "{}: the reason: {t}\n{}", binary.display(), d.log_text());
        assert!(alive(pid), "the daemon is gone after {}", binary.display());
        let st = d.status();
        assert!(matches!(st["state"].as_str(), Some("syncing" | "synced")), "{st}");
        assert!(u(&st["regions_clean"]) >= u(&before["regions_clean"]), "progress lost: {before} -> {st}");
        assert_eq!(st["max_rate"], 2 << 20, "{st}");
        writer.assert_running();
        qemu_io_ok(&d, &d.uri(), &["read 0 64k".into()]);
    }
    assert!(d.log_text().contains("starting again in place"), "{}", d.log_text());
    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    d.cli_ok(&["verify"]);
    let (model, said) = writer.finish();
    eprintln!("write load: {said}");
    assert_same(&export_bytes(&d.uri()), &model, "the export");
    let mut d = d;
    assert!(d.stop().success(), "{}", d.log_text());
    assert_same(&std::fs::read(&tgt).unwrap(), &model, "the target");
}

/// A daemon serving an image through an overlay hands it over: the new daemon
/// reopens the same overlay file with the limit in force (one set at runtime,
/// which a restart would not keep), serves every write made before, and the
/// image stays untouched.
#[test]
fn an_upgrade_keeps_the_overlay_and_its_limit() {
    let dir = scratch_shm();
    let size = 16 * MIB;
    let image = dir.path().join("image");
    let original = pattern(77, size as usize);
    make_image(&image, &original);
    let overlay = dir.path().join("overlay");
    let mut d = Daemon::start(dir.path(), &["--source", p(&image), "--overlay", p(&overlay), "--overlay-limit", "8M"]);
    let mut model = original.clone();
    qemu_io_ok(&d, &d.uri(), &["write -P 0x5a 1M 256k".into(), "write -P 0xa5 9M 4k".into()]);
    model[MIB as usize..(MIB + 256 * 1024) as usize].fill(0x5a);
    model[(9 * MIB) as usize..(9 * MIB + 4096) as usize].fill(0xa5);
    d.cli_ok(&["set-overlay-limit", "12M"]);
    let old = d.child.as_ref().unwrap().id();

    let (pid, _pause) = upgrade(&d, &[]);
    let _guard = KillPid(pid);
    assert_ne!(pid, old, "the same daemon after an upgrade");
    let st = wait_timeout(d.child.as_mut().unwrap(), Duration::from_secs(10)).expect("the old daemon exited");
    assert!(st.success(), "the old daemon exited {st}");
    d.child = None;
    let st = d.status();
    assert_eq!(st["overlay"]["path"], p(&overlay), "{st}");
    assert_eq!(st["overlay"]["bytes_limit"], 12 * MIB, "the limit set at runtime is kept: {st}");
    assert_same(&export_bytes(&d.uri()), &model, "the export after the upgrade");
    qemu_io_ok(&d, &d.uri(), &["write -P 0x33 2M 64k".into()]);
    model[(2 * MIB) as usize..(2 * MIB + 65536) as usize].fill(0x33);
    assert_same(&export_bytes(&d.uri()), &model, "the export after a write to the new daemon");
    stop_pid(pid, &d);
    assert_same(&std::fs::read(&image).unwrap(), &original, "the image");
}
