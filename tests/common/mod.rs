//! Shared helpers for the integration tests: start a daemon in a private
//! directory, drive the CLI, find the real NBD clients (failing loudly if one is
//! missing: `.ci/run` installs them).
#![allow(dead_code)]

pub mod net;
pub mod raw;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livemirror"))
}

/// Full path of a required tool; panics with a clear message if it is missing.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("required tool {name} is not installed (.ci/run installs it: see README)");
}

/// Environment for the libnbd Python tools: Debian's python3 has the `nbd` module.
pub fn debian_path() -> String {
    format!("/usr/bin:/usr/sbin:/bin:/sbin:{}", std::env::var("PATH").unwrap_or_default())
}

pub fn run(cmd: &Path, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", debian_path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd.display()));
    out
}

pub fn run_ok(cmd: &Path, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{} {:?} failed ({}):\nstdout: {}\nstderr: {}",
        cmd.display(),
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `len` bytes of a deterministic pseudo-random pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn make_image(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

pub fn make_sparse(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    f.set_len(size).unwrap_or_else(|e| panic!("cannot size {}: {e}", path.display()));
}

/// A running `livemirror serve` with its sockets in a private directory.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    /// Runs in this network namespace (remote-device tests).
    pub netns: Option<String>,
}

impl Daemon {
    /// Starts `livemirror serve ARGS --listen unix:DIR/nbd.sock --control
    /// DIR/ctl.sock` and waits until it is ready.
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        let sock = dir.join("nbd.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join(format!("serve-{}.log", std::process::id()));
        let mut d = Daemon { child: None, dir: dir.to_path_buf(), sock, control, log, netns: None };
        d.spawn(args);
        d.wait_ready();
        d
    }

    /// [`Daemon::start`] inside network namespace `ns`.
    pub fn start_in(ns: &str, dir: &Path, args: &[&str]) -> Daemon {
        let sock = dir.join("nbd.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join(format!("serve-{}.log", std::process::id()));
        let mut d = Daemon { child: None, dir: dir.to_path_buf(), sock, control, log, netns: Some(ns.to_string()) };
        d.spawn(args);
        d.wait_ready();
        d
    }

    /// Starts without waiting (for tests of startup refusals).
    pub fn spawn_raw(dir: &Path, args: &[&str]) -> Daemon {
        let sock = dir.join("nbd.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join("serve-raw.log");
        let mut d = Daemon { child: None, dir: dir.to_path_buf(), sock, control, log, netns: None };
        d.spawn(args);
        d
    }

    fn spawn(&mut self, args: &[&str]) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open log: {e}"));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(tool("ip"));
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("serve").args(args);
        if !args.contains(&"--listen") {
            cmd.arg("--listen").arg(format!("unix:{}", self.sock.display()));
        }
        if !args.contains(&"--control") {
            cmd.arg("--control").arg(&self.control);
        }
        cmd.env("LIVEMIRROR_LOG", std::env::var("LIVEMIRROR_LOG").unwrap_or_else(|_| "info".into()));
        cmd.stdout(Stdio::null()).stderr(logf);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("cannot start livemirror: {e}")));
    }

    pub fn restart(&mut self, args: &[&str]) {
        self.spawn(args);
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("livemirror exited during start ({st}):\n{}", self.log_text());
                }
            }
            let ok = self.cli(&["status", "--json"]).status.success()
                && std::os::unix::net::UnixStream::connect(&self.sock).is_ok();
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "livemirror not ready after 30 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Runs `livemirror ARGS --control CTL`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap_or_else(|e| panic!("cannot run livemirror: {e}"))
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "livemirror {args:?} failed ({}): {}{}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        let s = self.cli_ok(&["status", "--json"]);
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("status is not JSON ({e}): {s}"))
    }

    pub fn state(&self) -> String {
        self.status()["state"].as_str().unwrap_or_default().to_string()
    }

    /// Polls until the state is `want` (panics after `secs`).
    pub fn wait_state(&self, want: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = self.status();
            if st["state"] == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "state {want} not reached in {secs} s; status: {st}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        wait_timeout(&mut c, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("daemon did not stop:\n{}", self.log_text()))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    /// True while the daemon has `path` open.
    pub fn has_open(&self, path: &Path) -> bool {
        let want = std::fs::canonicalize(path).expect("canonical path");
        let pid = self.child.as_ref().expect("daemon running").id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("/proc/PID/fd")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|f| f == want)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn exit_code(st: &ExitStatus) -> i32 {
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// A scratch directory under the target dir (on disk), removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lmtest").tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// A scratch directory on tmpfs (/dev/shm) for fast, large images.
pub fn scratch_shm() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lmtest").tempdir_in("/dev/shm").unwrap_or_else(|_| scratch())
}

/// A path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The exit code of a finished command (128+signal when killed).
pub fn code(o: &Output) -> i32 {
    exit_code(&o.status)
}

/// Both output streams, for assertion messages.
pub fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// xorshift64: deterministic pseudo-random numbers for workloads.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One fio run (nbd engine) and its JSON report.
pub struct FioRun {
    pub status: ExitStatus,
    pub json: serde_json::Value,
    pub log: String,
}

/// Runs fio's NBD engine on `uri` with `args` in `dir` and parses its report.
pub fn fio(dir: &Path, uri: &str, args: &[&str]) -> FioRun {
    let out_path = dir.join("fio.json");
    let _ = std::fs::remove_file(&out_path);
    let uri_arg = format!("--uri={uri}");
    let out_arg = format!("--output={}", out_path.display());
    // No verify-state files (fio drops them in its working directory).
    let mut all = vec!["--ioengine=nbd", &uri_arg, "--output-format=json", &out_arg, "--verify_state_save=0"];
    all.extend_from_slice(args);
    let out = Command::new(tool("fio"))
        .args(&all)
        .current_dir(dir)
        .env("PATH", debian_path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run fio: {e}"));
    let log = format!("fio {all:?} ({})\n{}", out.status, text(&out));
    let report = std::fs::read_to_string(&out_path).unwrap_or_default();
    // Some fio versions print notices before the JSON object.
    let json = report
        .find('{')
        .and_then(|i| serde_json::from_str(&report[i..]).ok())
        .unwrap_or_else(|| panic!("fio wrote no JSON report:\n{report}\n{log}"));
    FioRun { status: out.status, json, log }
}

impl FioRun {
    pub fn jobs(&self) -> &Vec<serde_json::Value> {
        self.json["jobs"].as_array().unwrap_or_else(|| panic!("no jobs in the report\n{}", self.log))
    }

    /// fio exited 0 and no job reports an error (a verify failure is EILSEQ).
    pub fn assert_clean(&self, d: &Daemon, njobs: usize) {
        assert!(self.status.success(), "{}\n--- daemon log ---\n{}", self.log, d.log_text());
        assert_eq!(self.jobs().len(), njobs, "{}", self.log);
        for j in self.jobs() {
            assert_eq!(j["error"], 0, "job {} reports error {}:\n{}", j["jobname"], j["error"], self.log);
        }
    }

    /// Sum of `jobs[*][dir][field]`.
    pub fn sum(&self, dir: &str, field: &str) -> u64 {
        self.jobs().iter().map(|j| j[dir][field].as_u64().unwrap_or(0)).sum()
    }
}

/// Panics naming the first differing byte (a byte-for-byte model check).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got == want {
        return; // memcmp: fast even in a debug build
    }
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got[i..].iter().zip(&want[i..]).take_while(|(a, b)| a != b).count();
        panic!("{what}: {n} bytes differ from byte {i} on (got {:#04x}, want {:#04x})", got[i], want[i]);
    }
}

/// qemu-io with `cmds` on `uri`; fails on any error or pattern mismatch.
pub fn qemu_io_ok(d: &Daemon, uri: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".into(), uri.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&tool("qemu-io"), &a);
    let t = text(&out);
    assert!(out.status.success(), "qemu-io {cmds:?} failed:\n{t}\n--- daemon log ---\n{}", d.log_text());
    assert!(!t.contains("Pattern verification failed"), "qemu-io {cmds:?}:\n{t}\n{}", d.log_text());
    assert!(!t.to_lowercase().contains("error"), "qemu-io {cmds:?}:\n{t}\n{}", d.log_text());
    t
}

/// The whole export as a client sees it (nbdcopy to stdout).
pub fn export_bytes(uri: &str) -> Vec<u8> {
    let o = Command::new(tool("nbdcopy")).args([uri, "-"]).env("PATH", debian_path()).output().expect("nbdcopy");
    assert!(o.status.success(), "nbdcopy {uri} -: {}", text(&o));
    o.stdout
}

/// `len` bytes at `off` of the export as a client reads them (nbdsh, one
/// NBD READ per call of libnbd's `pread`).
pub fn pread(uri: &str, off: u64, len: u64) -> Vec<u8> {
    let code = format!("import sys; sys.stdout.buffer.write(h.pread({len}, {off}))");
    let o =
        Command::new(tool("nbdsh")).args(["-u", uri, "-c", &code]).env("PATH", debian_path()).output().expect("nbdsh");
    assert!(o.status.success(), "nbdsh pread {off}+{len} from {uri}: {}", text(&o));
    assert_eq!(o.stdout.len() as u64, len, "nbdsh pread {off}+{len}: short read");
    o.stdout
}

/// Writes `data` at `off` straight into a device or image file, behind the
/// daemon's back (its advisory lock does not stop a plain write).
pub fn poke(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, off).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The TLS key matrix (tests/certs/make.sh): one directory per kind of key
/// and certificate a CA may issue, each with ca-cert.pem, server-cert.pem,
/// server-key.pem, client-cert.pem and client-key.pem.
pub const TLS_MATRIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/certs");

/// The kinds every gnutls peer (qemu-nbd, nbdkit, nbd-server; qemu and libnbd
/// as clients) takes, and so must livemirror, as server and as client.
pub const TLS_KINDS: &[&str] = &[
    // The reference server's own test certificates: RSA 2432 bits (PKCS#1),
    // made by certtool, the name in the CN alone (no subjectAltName).
    "nbd-reference",
    "rsa2048",
    "rsa2048-pkcs1",
    "rsa3072",
    "rsa4096",
    "rsa8192",
    "p256",
    "p256-sec1",
    "certtool-ec",
    "p384",
    "p521",
    "ed25519",
    "ed448",
    // root CA -> intermediate -> leaf, the intermediate sent with the leaf.
    "chain",
];

/// A tmpfs mounted for the test, unmounted on drop (declare it before the
/// daemon that uses it, so the daemon is gone first).
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(dir: &Path, opts: &str) -> Mount {
        std::fs::create_dir_all(dir).expect("mount point");
        run_ok(&tool("mount"), &["-t", "tmpfs", "-o", opts, "tmpfs", p(dir)]);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let umount = tool("umount");
        if !run(&umount, &[p(&self.0)]).status.success() {
            let _ = run(&umount, &["-l", p(&self.0)]);
        }
    }
}

/// A loop device, detached on drop.
pub struct Loop(pub String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(&tool("losetup"), &["-d", &self.0]);
    }
}
