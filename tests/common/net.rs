//! Two network namespaces joined by an emulated link (tests/scripts/linkem.py:
//! latency and a bandwidth cap; the kernel here has no netem), for tests of
//! remote devices: the server in one namespace, livemirror in the other.
//! Everything is torn down on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const LINKEM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/linkem.py");

/// The server's address (namespace `b`); livemirror's side is 10.77.0.1.
pub const SERVER_ADDR: &str = "10.77.0.2";

pub struct NetPair {
    pub a: String,
    pub b: String,
    emu: Option<Child>,
    stdout: Option<BufReader<ChildStdout>>,
}

fn ip(args: &[&str]) {
    let o = Command::new(super::tool("ip")).args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

impl NetPair {
    /// Namespaces `a` and `b` and a link between them: `delay_ms` each way,
    /// `rate_mbit` per direction (0: no cap).
    pub fn new(delay_ms: f64, rate_mbit: f64) -> NetPair {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!("lm{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let mut pair = NetPair { a, b, emu: None, stdout: None };
        let mut emu = Command::new(super::tool("python3"))
            .args([
                LINKEM,
                &pair.a,
                "10.77.0.1",
                &pair.b,
                SERVER_ADDR,
                "--delay-ms",
                &delay_ms.to_string(),
                "--rate-mbit",
                &rate_mbit.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start linkem.py");
        let mut out = BufReader::new(emu.stdout.take().expect("linkem stdout"));
        pair.emu = Some(emu);
        let mut line = String::new();
        out.read_line(&mut line).expect("linkem ready line");
        assert_eq!(line.trim(), "ready", "linkem.py did not start");
        pair.stdout = Some(out);
        pair
    }

    /// `PROG ARGS` run inside namespace `ns`.
    pub fn cmd(&self, ns: &str, prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new(super::tool("ip"));
        c.args(["netns", "exec", ns]).arg(prog).args(args);
        c
    }

    fn link_dev(&self) -> String {
        let o = Command::new(super::tool("ip")).args(["-n", &self.a, "-o", "link", "show"]).output().expect("ip link");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .find(|n| n.starts_with("lme"))
            .unwrap_or_else(|| panic!("no link device in {}: {text}", self.a))
    }

    /// Bytes the link delivered so far: (to the server, from the server).
    pub fn bytes(&mut self) -> (u64, u64) {
        let pid = self.emu.as_ref().expect("linkem running").id();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGUSR1)
            .expect("signal linkem");
        let mut line = String::new();
        self.stdout.as_mut().expect("linkem stdout").read_line(&mut line).expect("linkem stats");
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        assert_eq!(v.len(), 2, "linkem stats line {line:?}");
        (v[0], v[1])
    }

    /// Cuts the link (livemirror's end goes down).
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", &self.link_dev(), "down"]);
    }

    /// Restores the link after `cut`.
    pub fn heal(&self) {
        let dev = self.link_dev();
        ip(&["-n", &self.a, "link", "set", &dev, "up"]);
        ip(&["-n", &self.a, "addr", "replace", "10.77.0.1/30", "dev", &dev]);
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        if let Some(mut c) = self.emu.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = super::wait_timeout(&mut c, std::time::Duration::from_secs(5));
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new(super::tool("ip")).args(["netns", "del", ns]).output();
        }
    }
}
