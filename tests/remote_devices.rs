//! Remote devices: NBD exports of real servers (qemu-nbd, nbdkit, nbd-server,
//! another livemirror) as the mirror's target or source, over an emulated link
//! between two network namespaces (latency, a bandwidth cap, cuts), with a
//! write load checked against a byte model: the mission flow, a cut link, a
//! server killed and restarted (as target and as source), a link that stays
//! down, a remote source, a restart with --state, TLS with X.509.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::net::{NetPair, SERVER_ADDR};
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use test_support::client::Client;

const MIB: u64 = 1 << 20;

/// A server process, killed on drop.
struct Peer(Option<Child>);

impl Peer {
    fn spawn(mut cmd: Command, what: &'static str) -> Peer {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        Peer(Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"))))
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` (in namespace `ns`, or a Unix socket) accepts connections.
fn wait_listening(net: Option<&NetPair>, target: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Bounded: a server whose connection slots are all taken accepts the
        // TCP connection and then never answers the handshake.
        let nbdinfo = tool("nbdinfo");
        let probe = ["5", p(&nbdinfo), "--size", target];
        let ok = match net {
            Some(n) => n.cmd(&n.a, p(&tool("timeout")), &probe).output().is_ok_and(|o| o.status.success()),
            None => run(&tool("timeout"), &probe).status.success(),
        };
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "no NBD server answers at {target}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `s.img` holding `size` bytes of `pattern(seed)` and a sparse `t.img` of the
/// same size in `dir`: the source, its bytes, and the target.
fn source_and_sparse_target(dir: &Path, seed: u64, size: u64) -> (PathBuf, Vec<u8>, PathBuf) {
    let src = dir.join("s.img");
    let data = pattern(seed, size as usize);
    make_image(&src, &data);
    let tgt = dir.join("t.img");
    make_sparse(&tgt, size);
    (src, data, tgt)
}

fn qemu_nbd(net: &NetPair, file: &Path, extra: &[&str]) -> Peer {
    // Room for livemirror's connections (4 by default) and the readiness probe.
    let mut args = vec!["-f", "raw", "-t", "-b", SERVER_ADDR, "-p", "10809", "-x", "exp", "-e", "16"];
    args.extend_from_slice(extra);
    args.push(p(file));
    let peer = Peer::spawn(net.cmd(&net.b, p(&tool("qemu-nbd")), &args), "qemu-nbd");
    wait_listening(Some(net), &format!("nbd://{SERVER_ADDR}/exp"));
    peer
}

/// A daemonised server, killed through its pid file on drop.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(pid) = std::fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Writers through the daemon's NBD socket until stopped; every
/// acknowledged write lands in the model. A failed write fails the test.
struct Load {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(sock: &Path, model: Arc<Mutex<Vec<u8>>>, span: u64, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w, sock) = (stop.clone(), writes.clone(), sock.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for k in 0..2u64 {
                    let (s, w, model, sock) = (s.clone(), w.clone(), model.clone(), sock.clone());
                    tasks.push(tokio::spawn(async move {
                        let c = Client::connect_unix(&sock, "", k == 0).await.expect("connect to the daemon");
                        let mut rng = Rng(seed * 7 + k + 1);
                        // Two writers on interleaved 256 KiB stripes: never the same bytes at once.
                        let stripe = 256 << 10;
                        while !s.load(Ordering::Relaxed) {
                            let n = span / stripe / 2;
                            let st = (rng.below(n) * 2 + k) * stripe;
                            let len = 1 + rng.below(40_000);
                            let off = st + rng.below(stripe - len);
                            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                            c.write(off, &data, rng.below(8) == 0)
                                .await
                                .unwrap_or_else(|e| panic!("a client write at {off}+{len} failed: {e}"));
                            model.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
                            w.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        });
        Load { stop, writes, thread: Some(thread) }
    }

    /// Blocks until the load has made `more` writes beyond those done so far:
    /// proof that clients are being served, whatever the machine's speed.
    fn wait_for_more_writes(&self, more: u64, within: Duration, when: &str) {
        let goal = self.writes.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + within;
        while self.writes.load(Ordering::Relaxed) < goal {
            assert!(
                Instant::now() < deadline,
                "the clients made {} of {more} writes {when} in {within:?}",
                more + self.writes.load(Ordering::Relaxed) - goal
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        self.writes.load(Ordering::Relaxed)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_export(sock: &Path, size: u64) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = Client::connect_unix(sock, "", true).await.expect("connect");
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(8 * MIB);
            out.extend(c.read(off, n as u32).await.expect("read"));
            off += n;
        }
        out
    })
}

fn verify_ok(d: &Daemon) {
    let o = d.cli(&["verify"]);
    assert_eq!(code(&o), 0, "verify: {}\n{}", text(&o), d.log_text());
    assert!(String::from_utf8_lossy(&o.stdout).contains(" 0 mismatching ranges"), "{}", text(&o));
}

/// Polls status until `f` holds (panics after `secs`).
fn wait_for(d: &Daemon, secs: u64, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = d.status();
        if f(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what} not seen in {secs} s; status {st}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mission_flow_onto_a_remote_target_over_a_5ms_link_under_writes() {
    let dir = scratch();
    let net = NetPair::new(2.5, 400.0);
    let src = dir.path().join("s.img");
    let data = pattern(1, (48 * MIB) as usize);
    make_image(&src, &data);
    // The remote export is bigger, so grow has room; O_DIRECT on the server
    // makes it ask for aligned I/O (our device reads, modifies and writes).
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 64 * MIB);
    let _server = qemu_nbd(&net, &tgt, &["--cache=none"]);
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", p(&src)]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 48 * MIB, 1);
    let uri = format!("nbd://{SERVER_ADDR}/exp");
    // A copy of at least 2 s, so that the writes race it on a slow machine too.
    d.cli_ok(&["set-rate", "24M"]);
    d.cli_ok(&["attach", &uri]);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let st = d.status();
    assert_eq!(st["target"], uri.as_str());
    assert_eq!(st["target_link"]["state"], "connected", "{st}");
    verify_ok(&d);
    let writes = load.finish();
    assert!(writes > 50, "only {writes} writes raced the sync");
    d.cli_ok(&["detach-source"]);
    d.cli_ok(&["grow"]);
    assert_eq!(u(&d.status()["export_size"]), 64 * MIB, "grow takes the remote export's size");
    // Writes into the new space reach the remote disk.
    let load = Load::start(&d.sock, model.clone(), 48 * MIB, 2);
    std::thread::sleep(Duration::from_millis(500));
    load.finish();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tail = pattern(3, MIB as usize + 333);
    rt.block_on(async {
        let c = Client::connect_unix(&d.sock, "", true).await.unwrap();
        c.write(60 * MIB + 7, &tail, true).await.unwrap();
    });
    let mut want = model.lock().unwrap().clone();
    want.resize((64 * MIB) as usize, 0);
    want[(60 * MIB + 7) as usize..(60 * MIB + 7) as usize + tail.len()].copy_from_slice(&tail);
    assert_same(&read_export(&d.sock, 64 * MIB), &want, "the export after grow");
    let mut d = d;
    assert!(d.stop().success());
    let on_disk = std::fs::read(&tgt).unwrap();
    assert_same(&on_disk, &want, "the remote disk after a clean stop");
}

/// Sync under writes, the link cut for longer than the stall detection:
/// the link is reported reconnecting, writes wait, and after the link comes
/// back the sync completes with every acknowledged write on both sides.
#[test]
fn a_link_cut_mid_sync_pauses_the_copy_and_loses_nothing() {
    let dir = scratch();
    let net = NetPair::new(1.0, 160.0);
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 4, 64 * MIB);
    let _server = Peer::spawn(
        net.cmd(&net.b, p(&tool("nbdkit")), &["-f", "-i", SERVER_ADDR, "-p", "10809", "-e", "exp", "file", p(&tgt)]),
        "nbdkit",
    );
    wait_listening(Some(&net), &format!("nbd://{SERVER_ADDR}/exp"));
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", p(&src), "--remote-timeout", "20"]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 64 * MIB, 4);
    d.cli_ok(&["attach", &format!("nbd://{SERVER_ADDR}/exp")]);
    wait_for(&d, 30, "a tenth copied", |st| u(&st["bytes_copied"]) > 6 * MIB);
    net.cut();
    let st = wait_for(&d, 15, "the link reported down", |st| st["target_link"]["state"] == "reconnecting");
    assert_eq!(st["state"], "syncing", "a cut link is not a failed disk: {st}");
    let before = u(&st["bytes_copied"]);
    std::thread::sleep(Duration::from_secs(1));
    let st = d.status();
    assert_eq!(u(&st["bytes_copied"]), before, "copied through a cut link: {st}");
    net.heal();
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    assert_eq!(d.status()["target_link"]["state"], "connected");
    verify_ok(&d);
    load.finish();
    let want = model.lock().unwrap().clone();
    assert_same(&read_export(&d.sock, 64 * MIB), &want, "the export");
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &want, "the remote disk");
    assert_same(&std::fs::read(&src).unwrap(), &want, "the source");
}

/// The server is killed with requests in flight and started again: the
/// device reconnects, resends, and the sync completes.
#[test]
fn a_server_killed_and_restarted_mid_sync_is_reconnected_to() {
    let dir = scratch();
    let net = NetPair::new(0.5, 200.0);
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 5, 64 * MIB);
    let mut server = qemu_nbd(&net, &tgt, &[]);
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", p(&src), "--remote-timeout", "30"]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 64 * MIB, 5);
    d.cli_ok(&["attach", &format!("nbd://{SERVER_ADDR}/exp")]);
    wait_for(&d, 30, "a tenth copied", |st| u(&st["bytes_copied"]) > 6 * MIB);
    server.kill();
    wait_for(&d, 15, "the link reported down", |st| st["target_link"]["state"] == "reconnecting");
    std::thread::sleep(Duration::from_millis(700));
    let _server = qemu_nbd(&net, &tgt, &[]);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    load.finish();
    let want = model.lock().unwrap().clone();
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &want, "the remote disk");
    assert_same(&std::fs::read(&src).unwrap(), &want, "the source");
}

/// The remote *source* is killed with requests in flight and started again
/// mid-sync: the copy and the clients' writes (which must reach the source)
/// wait for the link, nothing fails, and the sync completes with every
/// acknowledged write on both sides.
#[test]
fn a_remote_source_killed_and_restarted_mid_sync_is_reconnected_to() {
    let dir = scratch();
    let net = NetPair::new(0.5, 200.0);
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 11, 64 * MIB);
    let mut server = qemu_nbd(&net, &src, &[]);
    let uri = format!("nbd://{SERVER_ADDR}/exp");
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", &uri, "--remote-timeout", "30"]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 64 * MIB, 11);
    d.cli_ok(&["attach", p(&tgt)]);
    wait_for(&d, 30, "a tenth copied", |st| u(&st["bytes_copied"]) > 6 * MIB);
    load.wait_for_more_writes(10, Duration::from_secs(30), "before the source went away");
    server.kill();
    let st = wait_for(&d, 15, "the source link reported down", |st| st["source_link"]["state"] == "reconnecting");
    assert_eq!(st["state"], "syncing", "a lost source link is not a failed disk: {st}");
    std::thread::sleep(Duration::from_millis(700));
    let _server = qemu_nbd(&net, &src, &[]);
    // Served again: the writers go on.
    load.wait_for_more_writes(20, Duration::from_secs(60), "after the source came back");
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let st = d.status();
    assert_eq!(st["source_link"]["state"], "connected", "{st}");
    verify_ok(&d);
    load.finish();
    let want = model.lock().unwrap().clone();
    assert_same(&read_export(&d.sock, 64 * MIB), &want, "the export");
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &want, "the local target");
    assert_same(&std::fs::read(&src).unwrap(), &want, "the remote source");
}

/// A link that stays down longer than --remote-timeout: the target is
/// dropped (degraded), clients go on with the source, nothing is lost.
#[test]
fn a_link_that_stays_down_degrades_the_target_and_keeps_the_source() {
    let dir = scratch();
    let net = NetPair::new(1.0, 80.0);
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 6, 32 * MIB);
    let _server = qemu_nbd(&net, &tgt, &[]);
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", p(&src), "--remote-timeout", "4"]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 32 * MIB, 6);
    d.cli_ok(&["attach", &format!("nbd://{SERVER_ADDR}/exp")]);
    wait_for(&d, 30, "some copied", |st| u(&st["bytes_copied"]) > 2 * MIB);
    load.wait_for_more_writes(10, Duration::from_secs(30), "before the cut");
    let cut_at = Instant::now();
    net.cut();
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 1, "wait must fail once the target is dropped: {}\n{}", text(&o), d.log_text());
    let waited = cut_at.elapsed();
    assert!(waited < Duration::from_secs(30), "degraded only after {waited:?}");
    let st = d.status();
    assert_eq!(st["state"], "degraded", "{st}");
    let err = st["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("did not answer within 4 s"), "the reason names the timeout: {err}");
    // Clients were never stopped: the load runs on after the failover.
    load.wait_for_more_writes(20, Duration::from_secs(30), "after the target was dropped");
    load.finish();
    let want = model.lock().unwrap().clone();
    assert_same(&read_export(&d.sock, 32 * MIB), &want, "the export after degraded");
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&src).unwrap(), &want, "the source");
}

/// Serving an export of another host (nbd-server) mirrored to a local file.
#[test]
fn a_remote_source_from_nbd_server_is_mirrored_to_a_local_file() {
    let dir = scratch();
    let net = NetPair::new(2.5, 400.0);
    let src = dir.path().join("s.img");
    let data = pattern(7, (24 * MIB) as usize);
    make_image(&src, &data);
    let conf = dir.path().join("nbd-server.conf");
    std::fs::write(
        &conf,
        format!("[generic]\nlistenaddr = {SERVER_ADDR}\nport = 10809\n[exp]\nexportname = {}\n", src.display()),
    )
    .unwrap();
    // nbd-server forks a daemon (with -d it would serve one connection):
    // it is found and killed through its pid file.
    let pidfile = dir.path().join("nbd-server.pid");
    let o = net.cmd(&net.b, p(&tool("nbd-server")), &["-C", p(&conf), "-p", p(&pidfile)]).output().unwrap();
    assert!(o.status.success(), "nbd-server: {}", String::from_utf8_lossy(&o.stderr));
    let _server = PidFile(pidfile);
    wait_listening(Some(&net), &format!("nbd://{SERVER_ADDR}/exp"));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 24 * MIB);
    let uri = format!("nbd://{SERVER_ADDR}/exp");
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", &uri, "--target", p(&tgt)]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 24 * MIB, 7);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    assert_eq!(d.status()["source_link"]["state"], "connected");
    verify_ok(&d);
    load.finish();
    d.cli_ok(&["detach-source"]);
    let want = model.lock().unwrap().clone();
    assert_same(&read_export(&d.sock, 24 * MIB), &want, "the export");
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &want, "the local target");
    assert_same(&std::fs::read(&src).unwrap(), &want, "the remote source");
}

/// A mostly empty remote source (nbdkit reports its holes through
/// base:allocation): the holes are zeroed on the target, not carried over
/// the link.
#[test]
fn holes_of_a_remote_source_are_not_copied_over_the_link() {
    let dir = scratch();
    let mut net = NetPair::new(1.0, 400.0);
    let src = dir.path().join("s.img");
    make_sparse(&src, 256 * MIB);
    let chunk = pattern(8, (4 * MIB) as usize);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&chunk, 100 * MIB).unwrap();
    }
    let _server = Peer::spawn(
        net.cmd(&net.b, p(&tool("nbdkit")), &["-f", "-i", SERVER_ADDR, "-p", "10809", "file", p(&src)]),
        "nbdkit",
    );
    wait_listening(Some(&net), &format!("nbd://{SERVER_ADDR}/"));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 256 * MIB);
    let (_, from_server_before) = net.bytes();
    let d = Daemon::start_in(&net.a, dir.path(), &["--source", &format!("nbd://{SERVER_ADDR}/"), "--target", p(&tgt)]);
    let o = d.cli(&["wait", "--timeout", "120"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let (_, from_server) = net.bytes();
    let moved = from_server - from_server_before;
    assert!(moved < 32 * MIB, "{moved} bytes came over the link for 4 MiB of data in a 256 MiB export");
    let st = d.status();
    assert!(u(&st["bytes_written_as_zeroes"]) >= 200 * MIB, "{st}");
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    let got = std::fs::read(&tgt).unwrap();
    assert_same(&got[(100 * MIB) as usize..(104 * MIB) as usize], &chunk, "the data");
    assert!(is_zeroes(&got[..(100 * MIB) as usize]) && is_zeroes(&got[(104 * MIB) as usize..]), "the holes");
}

fn is_zeroes(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn qemu_nbd_unix(sock: &Path, file: &Path, extra: &[&str]) -> Peer {
    let _ = std::fs::remove_file(sock);
    let mut args = vec!["-f", "raw", "-t", "-k", p(sock)];
    args.extend_from_slice(extra);
    args.push(p(file));
    let mut c = Command::new(tool("qemu-nbd"));
    c.args(&args);
    let peer = Peer::spawn(c, "qemu-nbd");
    wait_listening(None, &format!("nbd+unix:///?socket={}", sock.display()));
    peer
}

/// Where a TLS-only qemu-nbd listens.
enum TlsListen<'a> {
    Unix(&'a Path),
    Tcp(u16),
}

/// qemu-nbd serving `file` with TLS only (`creds` is its `--object`, id
/// `tls0`), once it accepts connections (a plaintext probe would be refused).
fn qemu_nbd_tls(listen: TlsListen<'_>, creds: &str, file: &Path) -> Peer {
    let port;
    let mut args = vec!["-f", "raw", "-t"];
    match &listen {
        TlsListen::Unix(sock) => {
            let _ = std::fs::remove_file(sock);
            args.extend(["-k", p(sock)]);
        }
        TlsListen::Tcp(n) => {
            port = n.to_string();
            args.extend(["-b", "127.0.0.1", "-p", &port]);
        }
    }
    args.extend(["--object", creds, "--tls-creds", "tls0", p(file)]);
    let mut c = Command::new(tool("qemu-nbd"));
    c.args(&args);
    let peer = Peer::spawn(c, "qemu-nbd with TLS");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = || match &listen {
        TlsListen::Unix(sock) => std::os::unix::net::UnixStream::connect(sock).is_ok(),
        TlsListen::Tcp(n) => std::net::TcpStream::connect(("127.0.0.1", *n)).is_ok(),
    };
    while !ready() {
        assert!(Instant::now() < deadline, "qemu-nbd with TLS does not accept connections");
        std::thread::sleep(Duration::from_millis(50));
    }
    peer
}

/// A restart with --state resumes against the same remote export; one that is
/// not the export the state file recorded is refused when only the state file
/// names it, and gets the whole sync again when --target names it.
#[test]
fn a_restart_with_state_resumes_on_the_same_remote_export_and_refuses_another() {
    let dir = scratch();
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 9, 32 * MIB);
    let qsock = dir.path().join("q.sock");
    let mut server = qemu_nbd_unix(&qsock, &tgt, &[]);
    let state = dir.path().join("state");
    let uri = format!("nbd+unix:///?socket={}", qsock.display());
    let args = ["--source", p(&src), "--target", &uri, "--state", p(&state), "--max-rate", "8M"];
    let mut d = Daemon::start(dir.path(), &args);
    wait_for(&d, 30, "progress recorded", |st| u(&st["regions_clean"]) >= 160);
    d.kill9();
    // Same export: the sync resumes where the state file says.
    d.restart(&args);
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    assert!(u(&st["regions_clean"]) >= 16, "the resume kept the progress: {st}");
    assert!(!d.log_text().contains("starts over"), "{}", d.log_text());
    d.kill9();
    // The recorded address now serves an export of another size: a restart
    // that takes the target from the state file refuses it, with the reason.
    server.kill();
    let bigger = dir.path().join("b.img");
    make_sparse(&bigger, 40 * MIB);
    let mut server = qemu_nbd_unix(&qsock, &bigger, &[]);
    let mut r = Daemon::spawn_raw(dir.path(), &["--source", p(&src), "--state", p(&state)]);
    let st = wait_timeout(r.child.as_mut().unwrap(), Duration::from_secs(30)).expect("refused in time");
    assert_eq!(exit_code(&st), 1);
    let log = r.log_text();
    assert!(log.contains("the target") && log.contains("does not match the state file"), "{log}");
    assert!(log.contains("41943040 bytes"), "the reason names the size: {log}");
    assert!(log.contains(&format!("socket={}", qsock.display())), "the reason names the export: {log}");
    assert!(log.contains("name it with --target"), "{log}");
    // The right export again: the sync completes.
    server.kill();
    let _server = qemu_nbd_unix(&qsock, &tgt, &[]);
    d.restart(&[&args[..6], &["--max-rate", "0"]].concat());
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the remote disk");
    // Another export at another address, named by --target: what it holds is
    // unknown, so the sync starts over onto it and copies every byte.
    let other = dir.path().join("o.img");
    make_sparse(&other, 32 * MIB);
    let osock = dir.path().join("o.sock");
    let _other_server = qemu_nbd_unix(&osock, &other, &[]);
    let ouri = format!("nbd+unix:///?socket={}", osock.display());
    d.restart(&["--source", p(&src), "--target", &ouri, "--state", p(&state)]);
    let st = d.status();
    assert!(format!("{}", st["events"]).contains("the sync starts over"), "{st}");
    assert!(d.log_text().contains(&format!("socket={}", osock.display())), "{}", d.log_text());
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    assert!(d.stop().success());
    assert_same(&std::fs::read(&other).unwrap(), &data, "the other remote disk");
}

/// The target is another livemirror's export; a read-only export and a too
/// small one are refused as targets with their reasons.
#[test]
fn another_livemirror_is_a_target_and_unusable_exports_are_refused() {
    let dir = scratch();
    let far = dir.path().join("far");
    std::fs::create_dir(&far).unwrap();
    let far_img = far.join("t.img");
    make_sparse(&far_img, 16 * MIB);
    let mut remote = Daemon::start(&far, &["--source", p(&far_img)]);
    let src = dir.path().join("s.img");
    let data = pattern(10, (16 * MIB) as usize);
    make_image(&src, &data);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    // Read-only: refused, saying so.
    let ro = dir.path().join("ro.img");
    make_sparse(&ro, 16 * MIB);
    let rsock = dir.path().join("ro.sock");
    let _ro = qemu_nbd_unix(&rsock, &ro, &["-r"]);
    let o = d.cli(&["attach", &format!("nbd+unix:///?socket={}", rsock.display())]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("read-only export"), "{}", text(&o));
    // Too small: refused, naming both sizes.
    let small = dir.path().join("small.img");
    make_sparse(&small, 8 * MIB);
    let ssock = dir.path().join("small.sock");
    let _small = qemu_nbd_unix(&ssock, &small, &[]);
    let o = d.cli(&["attach", &format!("nbd+unix:///?socket={}", ssock.display())]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("8388608") && text(&o).contains("16777216"), "{}", text(&o));
    // A key file that cannot be read is refused before anything connects.
    let o = d.cli(&["attach", "nbds+unix:///?socket=/nonexistent&tls-psk-file=/nonexistent.psk"]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("/nonexistent.psk"), "{}", text(&o));
    // Another livemirror.
    d.cli_ok(&["attach", &remote.uri()]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    assert!(remote.stop().success());
    assert_same(&std::fs::read(&far_img).unwrap(), &data, "the far livemirror's disk");
}

/// Makes a CA, a server certificate for `localhost` and a client
/// certificate with openssl; returns (server dir, client dir, a second CA's dir).
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ossl = tool("openssl");
    let sh = |args: &[&str], cwd: &Path| {
        let o = Command::new(&ossl).args(args).current_dir(cwd).output().unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let (srv, cli, other) = (dir.join("pki-server"), dir.join("pki-client"), dir.join("pki-other"));
    for d in [&srv, &cli, &other] {
        std::fs::create_dir_all(d).unwrap();
    }
    let ca = |d: &Path| {
        sh(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=livemirror test CA",
            ],
            d,
        );
    };
    ca(&srv);
    ca(&other);
    let ext = srv.join("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    sh(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &srv,
    );
    sh(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server-cert.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        &srv,
    );
    std::fs::write(srv.join("cext.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    sh(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client-key.pem",
            "-out",
            "client.csr",
            "-subj",
            "/CN=livemirror",
        ],
        &srv,
    );
    sh(
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "client-cert.pem",
            "-days",
            "2",
            "-extfile",
            "cext.cnf",
        ],
        &srv,
    );
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(srv.join(f), cli.join(f)).unwrap();
    }
    (srv, cli, other)
}

/// nbds:// with X.509: qemu-nbd requiring TLS and a client certificate is a
/// target; a server whose certificate another CA signed is refused; a
/// plaintext URI to a TLS-only server is refused with the reason.
#[test]
fn nbds_with_x509_certificates() {
    let dir = scratch();
    let (srv, cli, other) = make_pki(dir.path());
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let qsock = dir.path().join("q.sock");
    let _server = qemu_nbd_tls(
        TlsListen::Unix(&qsock),
        &format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on", srv.display()),
        &tgt,
    );
    let src = dir.path().join("s.img");
    let data = pattern(11, (16 * MIB) as usize);
    make_image(&src, &data);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    // Plaintext to a server that requires TLS.
    let o = d.cli(&["attach", &format!("nbd+unix:///?socket={}", qsock.display())]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("requires TLS"), "{}", text(&o));
    // A CA that did not sign the server's certificate.
    std::fs::copy(srv.join("client-cert.pem"), other.join("client-cert.pem")).unwrap();
    std::fs::copy(srv.join("client-key.pem"), other.join("client-key.pem")).unwrap();
    let o =
        d.cli(&["attach", &format!("nbds+unix:///?socket={}&tls-certificates={}", qsock.display(), other.display())]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("TLS"), "{}", text(&o));
    // The right credentials.
    let uri = format!("nbds+unix:///?socket={}&tls-certificates={}", qsock.display(), cli.display());
    d.cli_ok(&["attach", &uri]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the remote disk over TLS");
}

/// nbds:// with a pre-shared key: qemu-nbd requiring TLS with psktool's key
/// file is a target; a wrong key and an unknown identity are refused with the
/// reason (not retried as link faults); a file of several identities needs
/// the one to use named in the URI.
#[test]
fn nbds_with_a_pre_shared_key() {
    let dir = scratch();
    let srv = dir.path().join("psk-server");
    std::fs::create_dir_all(&srv).unwrap();
    let key = "7d2c6a8e1f0b4c9a3e5d7f1b2a4c6e8d0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let wrong = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    std::fs::write(srv.join("keys.psk"), format!("alice:{key}\nbob:{wrong}\n")).unwrap();
    let good = dir.path().join("good.psk");
    std::fs::write(&good, format!("alice:{key}\n")).unwrap();
    let bad = dir.path().join("bad.psk");
    std::fs::write(&bad, format!("alice:{}00\n", &key[..key.len() - 2])).unwrap();
    let stranger = dir.path().join("stranger.psk");
    std::fs::write(&stranger, format!("carol:{key}\n")).unwrap();
    let two = dir.path().join("two.psk");
    std::fs::write(&two, format!("alice:{key}\ndave:{wrong}\n")).unwrap();
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let qsock = dir.path().join("q.sock");
    let _server = qemu_nbd_tls(
        TlsListen::Unix(&qsock),
        &format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", srv.display()),
        &tgt,
    );
    let src = dir.path().join("s.img");
    let data = pattern(12, (16 * MIB) as usize);
    make_image(&src, &data);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let uri = |user: &str, file: &std::path::Path| {
        format!("nbds+unix://{user}/?socket={}&tls-psk-file={}", qsock.display(), file.display())
    };
    // The wrong key for alice: the handshake fails and attach says so, at once.
    let t0 = Instant::now();
    let o = d.cli(&["attach", &uri("alice@", &bad)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("PSK identity \"alice\""), "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(20), "a wrong key was retried for {:?}", t0.elapsed());
    // An identity the server does not know.
    let o = d.cli(&["attach", &uri("", &stranger)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("PSK identity \"carol\""), "{}", text(&o));
    // Two identities in the file and none named.
    let o = d.cli(&["attach", &uri("", &two)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("holds 2 identities"), "{}", text(&o));
    // A name the file does not hold.
    let o = d.cli(&["attach", &uri("erin@", &two)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(text(&o).contains("no key for the identity \"erin\""), "{}", text(&o));
    // The right key, the identity named in a file of two.
    d.cli_ok(&["attach", &uri("alice@", &two)]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the remote disk over TLS-PSK");
    // The only identity of a file is used when the URI names none.
    let tgt2 = dir.path().join("t2.img");
    make_sparse(&tgt2, 16 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    drop(_server);
    let _server2 = qemu_nbd_tls(
        TlsListen::Unix(&qsock),
        &format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", srv.display()),
        &tgt2,
    );
    d.cli_ok(&["attach", &uri("", &good)]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt2).unwrap(), &data, "the second remote disk over TLS-PSK");
}

/// A server that rejects requests outside its block-size constraints (nbdkit's
/// blocksize-policy filter: 4 KiB minimum, 1 MiB maximum, errors otherwise):
/// the 2 MiB copy pieces are split and the clients' unaligned writes become
/// read-modify-writes, so the sync completes with every byte in place.
#[test]
fn a_server_with_block_size_constraints_gets_only_requests_it_accepts() {
    let dir = scratch();
    let (src, data, tgt) = source_and_sparse_target(dir.path(), 12, 32 * MIB);
    let ksock = dir.path().join("k.sock");
    let mut c = Command::new(tool("nbdkit"));
    c.args([
        "-f",
        "-U",
        p(&ksock),
        "--filter=blocksize-policy",
        "file",
        p(&tgt),
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1048576",
        "blocksize-error-policy=error",
    ]);
    let _server = Peer::spawn(c, "nbdkit with blocksize-policy");
    let uri = format!("nbd+unix:///?socket={}", ksock.display());
    wait_listening(None, &uri);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--target", &uri]);
    let model = Arc::new(Mutex::new(data));
    let load = Load::start(&d.sock, model.clone(), 32 * MIB, 12);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    assert!(d.log_text().contains("blocks 4096/65536/1048576"), "{}", d.log_text());
    // Writes go on in synced: every one reaches the remote disk as whole blocks.
    load.wait_for_more_writes(20, Duration::from_secs(30), "in synced");
    load.finish();
    verify_ok(&d);
    let want = model.lock().unwrap().clone();
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &want, "the remote disk");
}

/// The requests that arrive at a remote target, as nbdkit's log filter records
/// them: the copy's zero runs are WRITE_ZEROES, not data; clients' TRIM,
/// WRITE_ZEROES and FLUSH on the export reach the remote as the same commands;
/// and the copy uses several connections where the server allows them.
#[test]
fn trims_zeroes_and_flushes_reach_a_remote_target_as_such() {
    let dir = scratch();
    let src = dir.path().join("s.img");
    let mut data = pattern(13, (16 * MIB) as usize);
    data[(4 * MIB) as usize..(8 * MIB) as usize].fill(0);
    make_image(&src, &data);
    let tgt = dir.path().join("t.img");
    make_image(&tgt, &pattern(14, (16 * MIB) as usize));
    let ksock = dir.path().join("k.sock");
    let log = dir.path().join("nbdkit.log");
    let mut c = Command::new(tool("nbdkit"));
    c.args(["-f", "-U", p(&ksock), "--filter=log", "file", p(&tgt), &format!("logfile={}", log.display())]);
    let _server = Peer::spawn(c, "nbdkit with the log filter");
    let uri = format!("nbd+unix:///?socket={}", ksock.display());
    wait_listening(None, &uri);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--target", &uri]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    let lines = |what: &str| -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!(" {what} id=")))
            .map(str::to_string)
            .collect()
    };
    let field = |line: &str, name: &str| -> u64 {
        let v = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or("0x0");
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(u64::MAX)
    };
    // The copy: the zero run became Zero requests and no Write touched it.
    let zeroed: u64 = lines("Zero")
        .iter()
        .filter(|l| field(l, "offset") >= 4 * MIB && field(l, "offset") < 8 * MIB)
        .map(|l| field(l, "count"))
        .sum();
    assert_eq!(zeroed, 4 * MIB, "the source's zero run reached the remote as WRITE_ZEROES: {:?}", lines("Zero"));
    let written_in_run = lines("Write").iter().any(|l| {
        let (o, n) = (field(l, "offset"), field(l, "count"));
        o < 8 * MIB && o + n > 4 * MIB
    });
    assert!(!written_in_run, "data was written into the zero run: {:?}", lines("Write"));
    let conns: std::collections::BTreeSet<String> = lines("Write")
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("connection=")).map(str::to_string))
        .collect();
    assert!(conns.len() > 1, "nbdkit's file plugin allows several connections; the copy used {conns:?}");
    // Clients' commands on the synced export.
    let before_flushes = lines("Flush").len();
    qemu_io_ok(&d, &d.uri(), &["discard 1M 1M".to_string(), "write -z 10M 1M".to_string(), "flush".to_string()]);
    let trims = lines("Trim");
    assert!(
        trims.iter().any(|l| field(l, "offset") == MIB && field(l, "count") == MIB),
        "the TRIM did not reach the remote: {trims:?}"
    );
    let zeroes = lines("Zero");
    assert!(
        zeroes.iter().any(|l| field(l, "offset") == 10 * MIB && field(l, "count") == MIB),
        "the WRITE_ZEROES did not reach the remote: {zeroes:?}"
    );
    assert!(lines("Flush").len() > before_flushes, "the FLUSH did not reach the remote");
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    let got = std::fs::read(&tgt).unwrap();
    assert!(is_zeroes(&got[(10 * MIB) as usize..(11 * MIB) as usize]), "the zeroed MiB");
    // The trimmed MiB may read as anything; everything else is the source.
    assert_same(&got[..MIB as usize], &data[..MIB as usize], "the remote disk before the trim");
    assert_same(
        &got[(2 * MIB) as usize..(10 * MIB) as usize],
        &data[(2 * MIB) as usize..(10 * MIB) as usize],
        "the remote disk",
    );
    assert_same(&got[(11 * MIB) as usize..], &data[(11 * MIB) as usize..], "the remote disk after the zeroes");
}

/// nbds:// with every kind of key and certificate the gnutls clients take
/// (tests/certs): nbdkit serves each with client certificates required, and
/// each is attached, synced and checked, then detached for the next.
#[test]
fn nbds_takes_every_key_and_chain_the_gnutls_clients_take() {
    let dir = scratch();
    let src = dir.path().join("s.img");
    let data = pattern(16, MIB as usize);
    make_image(&src, &data);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    for kind in TLS_KINDS {
        let creds = Path::new(TLS_MATRIX).join(kind);
        let tgt = dir.path().join(format!("{kind}.img"));
        make_sparse(&tgt, MIB);
        let qsock = dir.path().join(format!("{kind}.sock"));
        let _server = Peer::spawn(
            {
                let mut c = Command::new(tool("nbdkit"));
                c.args(["-f", "-U", p(&qsock), "--tls=require", &format!("--tls-certificates={}", creds.display())]);
                c.args(["--tls-verify-peer", "file", p(&tgt)]);
                c
            },
            "nbdkit with TLS",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&qsock).is_err() {
            assert!(Instant::now() < deadline, "nbdkit with the {kind} credentials does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = d.cli(&[
            "attach",
            &format!("nbds+unix:///?socket={}&tls-certificates={}", qsock.display(), creds.display()),
        ]);
        assert_eq!(code(&o), 0, "{kind}: attach: {}\n{}", text(&o), d.log_text());
        let o = d.cli(&["wait", "--timeout", "60"]);
        assert_eq!(code(&o), 0, "{kind}: wait: {}\n{}", text(&o), d.log_text());
        verify_ok(&d);
        d.cli_ok(&["detach-target"]);
        assert_same(&std::fs::read(&tgt).unwrap(), &data, &format!("the remote disk over TLS with {kind}"));
    }
}

/// nbds:// over TCP: the server's certificate must name the URI's host. The
/// test certificate names `localhost`, so `nbds://localhost:PORT/` syncs and
/// `nbds://127.0.0.1:PORT/` (the same server) is refused as unverifiable.
#[test]
fn nbds_over_tcp_checks_the_host_name_in_the_certificate() {
    let dir = scratch();
    let (srv, cli, _) = make_pki(dir.path());
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = qemu_nbd_tls(
        TlsListen::Tcp(port),
        &format!("tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=on", srv.display()),
        &tgt,
    );
    let src = dir.path().join("s.img");
    let data = pattern(15, (16 * MIB) as usize);
    make_image(&src, &data);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let o = d.cli(&["attach", &format!("nbds://127.0.0.1:{port}/?tls-certificates={}", cli.display())]);
    assert_eq!(code(&o), 1, "a certificate for localhost accepted for 127.0.0.1: {}", text(&o));
    assert!(text(&o).contains("not valid for name"), "the refusal names the mismatch: {}", text(&o));
    assert_eq!(d.state(), "serving");
    d.cli_ok(&["attach", &format!("nbds://localhost:{port}/?tls-certificates={}", cli.display())]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "wait: {}\n{}", text(&o), d.log_text());
    verify_ok(&d);
    let mut d = d;
    assert!(d.stop().success());
    assert_same(&std::fs::read(&tgt).unwrap(), &data, "the remote disk over TLS on TCP");
}
