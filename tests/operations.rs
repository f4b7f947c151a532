//! Operating livemirror day to day: the systemd notifications, the metrics
//! endpoint, the event stream, `status --get`, honest progress in `wait`
//! (also on a terminal), `verify` during a sync, zero detection on and off,
//! and a CLI that explains itself (help, grammar, errors, man pages).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn lm(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap_or_else(|e| panic!("cannot run livemirror: {e}"))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Starts `livemirror serve ARGS` like [`Daemon::start`], with extra
/// environment variables, without waiting for it.
fn spawn_with_env(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
    let sock = dir.join("nbd.sock");
    let control = dir.join("ctl.sock");
    let log = dir.join("serve-env.log");
    let logf = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(bin());
    cmd.arg("serve").args(args);
    cmd.arg("--listen").arg(format!("unix:{}", sock.display())).arg("--control").arg(&control);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null()).stderr(logf);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start livemirror: {e}"));
    Daemon { child: Some(child), dir: dir.to_path_buf(), sock, control, log, netns: None }
}

fn sigterm(d: &Daemon) {
    let pid = d.child.as_ref().expect("running").id() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).expect("kill");
}

// ------------------------------------------------------------------ systemd

#[test]
fn systemd_notify_ready_when_ready_status_with_progress_and_stopping() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(71, 16 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let nsock = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&nsock).expect("notify socket");
    rx.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut d = spawn_with_env(dir.path(), &["--source", p(&src), "--max-rate", "2M"], &[("NOTIFY_SOCKET", p(&nsock))]);
    let mut buf = vec![0u8; 4096];
    let recv = |buf: &mut Vec<u8>| -> String {
        let n = rx.recv(buf).unwrap_or_else(|e| panic!("no notification: {e}"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv(&mut buf);
    // The first message is READY=1, and ready means ready: at this moment the
    // NBD socket accepts and status answers.
    assert!(first.lines().any(|l| l == "READY=1"), "first notification is not READY=1: {first:?}");
    assert!(first.contains("STATUS=serving "), "no STATUS with the state: {first:?}");
    assert!(std::os::unix::net::UnixStream::connect(&d.sock).is_ok(), "READY=1 before the NBD socket accepts");
    assert_eq!(d.status()["state"], "serving");

    d.cli_ok(&["attach", p(&tgt)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut synced = false;
    while Instant::now() < deadline && !synced {
        let m = recv(&mut buf);
        if m.contains("STATUS=syncing onto") && m.contains('%') && seen.iter().all(|s: &String| !s.contains("ETA")) {
            d.cli_ok(&["set-rate", "0"]);
        }
        synced = m.contains("STATUS=synced onto");
        seen.push(m);
    }
    assert!(
        seen.iter().any(|m| m.contains("STATUS=syncing onto") && m.contains("% (") && m.contains("ETA")),
        "no progress in STATUS=: {seen:?}"
    );
    assert!(synced, "no synced STATUS=: {seen:?}");
    sigterm(&d);
    let mut stopping = String::new();
    while !stopping.contains("STOPPING=1") {
        stopping = recv(&mut buf);
    }
    let st = wait_timeout(d.child.as_mut().expect("running"), Duration::from_secs(30)).expect("daemon stops");
    d.child = None;
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
}

#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    let dir = scratch();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/initrd-glue/systemd/livemirror@.service"))
        .expect("the unit file");
    assert!(unit.contains("Type=notify") && unit.contains("ExecStart=/usr/sbin/livemirror serve "), "{unit}");
    // systemctl reload is livemirror upgrade.
    assert!(
        unit.contains("ExecReload=/usr/sbin/livemirror upgrade --control /run/livemirror/%i/control.sock"),
        "{unit}"
    );
    let o = lm(&["upgrade", "--control", "/run/livemirror/x/control.sock", "--help"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // The same unit with the binary under test in place of /usr/sbin's, and
    // the man pages it names generated into a MANPATH of its own.
    let local = unit.replace("/usr/sbin/livemirror", p(&bin()));
    let path = dir.path().join("livemirror@test.service");
    std::fs::write(&path, local).expect("unit copy");
    let man = dir.path().join("man/man1");
    let o = lm(&["generate", "man", p(&man)]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = Command::new(tool("systemd-analyze"))
        .args(["verify", p(&path)])
        .env("MANPATH", dir.path().join("man"))
        .env("PATH", debian_path())
        .output()
        .expect("systemd-analyze");
    assert!(o.status.success() && o.stderr.is_empty(), "systemd-analyze verify: {}", text(&o));
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/initrd-glue/systemd/example.conf"))
        .expect("the example configuration");
    let args = conf.lines().find_map(|l| l.strip_prefix("LIVEMIRROR_ARGS=")).expect("LIVEMIRROR_ARGS in example.conf");
    // What the unit runs, given the example's arguments, parses.
    let mut argv: Vec<&str> = vec!["serve", "--listen", "unix:/run/livemirror/x/nbd.sock"];
    argv.extend(args.split_whitespace());
    argv.push("--help");
    let o = lm(&argv);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

// ------------------------------------------------------------------ metrics

fn scrape(port: u16, request: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read the answer");
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {all:?}"));
    (head.to_string(), body.to_string())
}

/// `name{labels}` → value, and every `# TYPE` line checked for a known type.
fn samples(body: &str) -> HashMap<String, f64> {
    let mut m = HashMap::new();
    for l in body.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let kind = t.split_whitespace().nth(1).unwrap_or_default();
            assert!(["gauge", "counter", "histogram"].contains(&kind), "bad TYPE line {l:?}");
            continue;
        }
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
        let v: f64 = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
        assert!(m.insert(k.to_string(), v).is_none(), "sample {k} twice");
    }
    m
}

fn metric(m: &HashMap<String, f64>, k: &str) -> f64 {
    *m.get(k).unwrap_or_else(|| panic!("no sample {k}; have {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_are_scraped_in_prometheus_text_format() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(72, 8 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 8 * MIB);
    let port = free_tcp_port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--metrics", &addr]);

    let (head, body) = scrape(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
    let m = samples(&body);
    assert_eq!(metric(&m, r#"livemirror_state{state="serving"}"#), 1.0);
    assert_eq!(metric(&m, r#"livemirror_state{state="syncing"}"#), 0.0);
    assert_eq!(metric(&m, "livemirror_export_size_bytes"), (8 * MIB) as f64);
    assert_eq!(metric(&m, r#"livemirror_nbd_requests_total{command="write"}"#), 0.0);

    qemu_io_ok(
        &d,
        &d.uri(),
        &["write -P 0x11 0 64k".into(), "read -P 0x11 0 64k".into(), "read 1M 4k".into(), "flush".into()],
    );
    // A request the server must refuse: a READ past the end.
    {
        let mut s = raw::raw_handshake(&d.sock, "");
        raw::raw_request(&mut s, raw::CMD_READ, 7, 16 * MIB, 4096);
        let (err, cookie) = raw::read_simple_reply(&mut s).expect("reply");
        assert_eq!(cookie, 7);
        assert_ne!(err, 0, "a read past the end succeeded");
    }
    d.cli_ok(&["attach", p(&tgt)]);
    let o = d.cli(&["wait", "--timeout", "60"]);
    assert_eq!(code(&o), 0, "{}", text(&o));

    let (_, body) = scrape(port, "GET /metrics HTTP/1.0\r\n\r\n");
    let m = samples(&body);
    assert_eq!(metric(&m, r#"livemirror_state{state="synced"}"#), 1.0);
    assert_eq!(metric(&m, r#"livemirror_state{state="serving"}"#), 0.0);
    assert_eq!(metric(&m, "livemirror_regions_dirty"), 0.0);
    assert_eq!(metric(&m, "livemirror_regions_clean"), metric(&m, "livemirror_regions_total"));
    assert_eq!(metric(&m, "livemirror_copied_bytes_total"), (8 * MIB) as f64);
    assert_eq!(metric(&m, "livemirror_detect_zeroes"), 1.0);
    assert!(metric(&m, r#"livemirror_events_total{kind="state"}"#) >= 2.0, "attached and synced");
    assert!(metric(&m, r#"livemirror_nbd_requests_total{command="write"}"#) >= 1.0);
    assert!(metric(&m, r#"livemirror_nbd_requests_total{command="read"}"#) >= 3.0);
    assert!(metric(&m, r#"livemirror_nbd_requests_total{command="flush"}"#) >= 1.0);
    assert!(metric(&m, r#"livemirror_nbd_request_bytes_total{command="write"}"#) >= 65536.0);
    assert_eq!(metric(&m, r#"livemirror_nbd_request_errors_total{command="read"}"#), 1.0);
    assert_eq!(metric(&m, r#"livemirror_nbd_request_errors_total{command="write"}"#), 0.0);
    for c in ["read", "write", "flush"] {
        let count = metric(&m, &format!(r#"livemirror_nbd_request_duration_seconds_count{{command="{c}"}}"#));
        let inf = metric(&m, &format!(r#"livemirror_nbd_request_duration_seconds_bucket{{command="{c}",le="+Inf"}}"#));
        let reqs = metric(&m, &format!(r#"livemirror_nbd_requests_total{{command="{c}"}}"#));
        assert_eq!((count, inf), (reqs, reqs), "{c}: histogram count and +Inf bucket are the request count");
        assert!(metric(&m, &format!(r#"livemirror_nbd_request_duration_seconds_sum{{command="{c}"}}"#)) > 0.0);
    }
    assert!(metric(&m, "livemirror_nbd_connections_accepted_total") >= 2.0);
    assert_eq!(metric(&m, "livemirror_nbd_kernel_reconnects_total"), 0.0);
    assert!(metric(&m, "livemirror_nbd_connections") >= 0.0);

    let (head, _) = scrape(port, "GET / HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.0 404"), "{head}");
    let (head, _) = scrape(port, "POST /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.0 405"), "{head}");
}

#[test]
fn a_metrics_address_reachable_from_other_hosts_needs_allow_remote() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 4 * MIB);
    let port = free_tcp_port().to_string();
    let mut d = Daemon::spawn_raw(dir.path(), &["--source", p(&src), "--metrics", &format!("tcp:0.0.0.0:{port}")]);
    let st = wait_timeout(d.child.as_mut().expect("spawned"), Duration::from_secs(30)).expect("exits");
    d.child = None;
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    assert!(d.log_text().contains("--allow-remote"), "{}", d.log_text());
    assert!(!d.sock.exists() && !d.control.exists(), "a refused start left sockets behind");
    let o = lm(&["serve", "--source", p(&src), "--metrics", "unix:/tmp/m.sock"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(stderr(&o).contains("tcp:HOST:PORT"), "{}", text(&o));
}

// ------------------------------------------------------------------- events

/// Lines of a child's stdout, through a channel.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads stream lines until `f` matches one (panics after `secs`); returns
/// every line read, the match last.
fn until(
    rx: &mpsc::Receiver<String>,
    secs: u64,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx.recv_timeout(left).unwrap_or_else(|_| panic!("{what}: not seen in {secs} s; got {got:?}"));
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"));
        assert!(v["type"].is_string() && v["unix_time"].is_number(), "no type or time: {l}");
        let hit = f(&v);
        got.push(v);
        if hit {
            return got;
        }
    }
}

#[test]
fn events_follow_every_state_change_and_progress_as_it_happens() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(73, 16 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "2M"]);
    let mut ev = Command::new(bin())
        .args(["events", "--interval", "0.2", "--control", p(&d.control)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("livemirror events");
    let rx = lines_of(&mut ev);
    let first = until(&rx, 10, "the first line", |_| true);
    assert_eq!(first[0]["type"], "status", "{first:?}");
    assert_eq!(first[0]["state"], "serving");
    assert!(first[0].get("events").is_none(), "the first line carries the event log: {first:?}");

    d.cli_ok(&["attach", p(&tgt)]);
    let got = until(&rx, 10, "the attach event", |v| v["type"] == "event" && v["state"] == "syncing");
    let attached = got.last().expect("a line");
    assert_eq!(attached["kind"], "state");
    assert!(attached["message"].as_str().is_some_and(|m| m.contains("attached")), "{attached}");
    // Progress at the interval: three lines in well under 3 s, each later and
    // further than the one before.
    let t0 = Instant::now();
    let mut prog = Vec::new();
    while prog.len() < 3 {
        let got = until(&rx, 5, "progress", |v| v["type"] == "progress");
        prog.push(got.last().cloned().expect("a line"));
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "3 progress lines at 0.2 s took {:?}", t0.elapsed());
    for w in prog.windows(2) {
        assert!(w[1]["unix_time"].as_f64() > w[0]["unix_time"].as_f64(), "{w:?}");
        assert!(w[1]["bytes_copied"].as_u64() >= w[0]["bytes_copied"].as_u64(), "{w:?}");
    }
    for p in &prog {
        assert_eq!(p["state"], "syncing");
        for f in ["percent", "regions_clean", "regions_total", "bytes_copied", "copy_rate_bytes_per_sec"] {
            assert!(p[f].is_number(), "{f} in {p}");
        }
    }
    d.cli_ok(&["pause"]);
    until(&rx, 5, "the pause event", |v| v["type"] == "event" && v["kind"] == "info");
    let got = until(&rx, 5, "paused progress", |v| v["type"] == "progress" && v["paused"] == true);
    assert!(got.last().is_some_and(|v| v["eta_seconds"].is_null()), "an ETA while paused: {got:?}");
    d.cli_ok(&["resume"]);
    d.cli_ok(&["set-rate", "0"]);
    until(&rx, 30, "the synced event", |v| v["type"] == "event" && v["kind"] == "state" && v["state"] == "synced");

    // The same events are kept in the status, with their kind and state.
    let st = d.status();
    let log = st["events"].as_array().expect("events in status");
    let find = |state: &str, needle: &str| {
        log.iter().find(|e| {
            e["kind"] == "state" && e["state"] == state && e["message"].as_str().is_some_and(|m| m.contains(needle))
        })
    };
    assert!(find("syncing", "attached").is_some(), "no attach event in status: {st}");
    assert!(find("synced", "synced").is_some(), "no synced event in status: {st}");
    assert!(
        log.iter().any(|e| e["kind"] == "info" && e["message"].as_str().is_some_and(|m| m.contains("paus"))),
        "{st}"
    );
    let times: Vec<f64> = log.iter().filter_map(|e| e["unix_time"].as_f64()).collect();
    assert_eq!(times.len(), log.len());
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "events out of order: {st}");

    // An error reaches the stream as it happens: the target cut short under a
    // synced export is a failed device (the read is served from the source).
    std::fs::OpenOptions::new().write(true).open(&tgt).unwrap().set_len(4 * MIB).unwrap();
    qemu_io_ok(&d, &d.uri(), &["read 12M 64k".to_string()]);
    let got = until(&rx, 10, "the error event", |v| v["type"] == "event" && v["kind"] == "error");
    let error = got.last().expect("a line");
    assert!(error["message"].as_str().is_some_and(|m| m.contains("target read failed")), "{error}");
    until(&rx, 10, "the state change it caused", |v| v["type"] == "event" && v["state"] == "degraded");
    assert_eq!(d.state(), "degraded");
    assert!(
        d.status()["events"].as_array().is_some_and(|log| log.iter().any(|e| e["kind"] == "error")),
        "the error is kept in status too"
    );

    // A stopping daemon ends the stream with an end line; `events` exits 0.
    sigterm(&d);
    until(&rx, 30, "the end line", |v| v["type"] == "end");
    let st = wait_timeout(&mut ev, Duration::from_secs(10)).expect("events exits");
    assert_eq!(st.code(), Some(0));
    assert_eq!(d.stop_reaped(), Some(0), "{}", d.log_text());
}

trait Reap {
    fn stop_reaped(&mut self) -> Option<i32>;
}

impl Reap for Daemon {
    /// Waits for a daemon already told to stop.
    fn stop_reaped(&mut self) -> Option<i32> {
        let st = wait_timeout(self.child.as_mut()?, Duration::from_secs(60));
        self.child = None;
        st.and_then(|s| s.code())
    }
}

// ------------------------------------------------------------- status --get

#[test]
fn status_get_prints_fields_bare_even_with_quotes_inside() {
    let dir = scratch_shm();
    let mnt = dir.path().join("small");
    let _mount = Mount::tmpfs(&mnt, "size=2m");
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(74, 8 * MIB as usize));
    let tgt = mnt.join(r#"t"q\.img"#);
    make_sparse(&tgt, 8 * MIB); // 8 MiB on a 2 MiB filesystem: the copy fails
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let o = d.cli(&["status", "--get", "state", "--get", "target", "--get", "eta_seconds", "--get", "paused"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(stdout(&o), "serving\nnull\nnull\nfalse\n");
    assert_eq!(d.cli_ok(&["status", "--get", "export_size"]), format!("{}\n", 8 * MIB));

    d.cli_ok(&["attach", p(&tgt)]);
    d.wait_state("degraded", 30);
    let st = d.status();
    let err = st["error"].as_str().expect("an error").to_string();
    assert_eq!(d.cli_ok(&["status", "--get", "error"]), format!("{err}\n"));
    assert!(err.contains("No space left"), "{err}");
    // An event whose message has a quote and a backslash (JSON-escaped in
    // status --json) comes out as the text itself.
    let events = st["events"].as_array().expect("events");
    let i = events
        .iter()
        .position(|e| e["message"].as_str().is_some_and(|m| m.contains("attached")))
        .expect("attach event");
    let want = events[i]["message"].as_str().unwrap_or_default().to_string();
    assert!(want.contains(r#"t"q\.img"#), "{want}");
    let json = d.cli_ok(&["status", "--json"]);
    assert!(json.contains(r#"t\"q\\.img"#), "status --json escapes it: {json}");
    let got = d.cli_ok(&["status", "--get", &format!("events.{i}.message")]);
    assert_eq!(got, format!("{want}\n"));
    let last = d.cli_ok(&["status", "--get", "events.-1"]);
    let v: serde_json::Value = serde_json::from_str(last.trim()).expect("an object prints as JSON");
    assert!(v["message"].is_string(), "{last}");

    let o = d.cli(&["status", "--get", "no_such_field"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(stderr(&o).contains("no_such_field") && stderr(&o).contains("export_size"), "{}", text(&o));
    assert!(stdout(&o).is_empty());
    let o = d.cli(&["status", "--json", "--get", "state"]);
    assert_eq!(code(&o), 2, "--json and --get together: {}", text(&o));
}

// --------------------------------------------------------------------- wait

#[test]
fn wait_is_honest_about_no_target_and_a_pause() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(75, 32 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 32 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "4M"]);

    // No target: says so first, and draws no progress.
    let o = d.cli(&["wait"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line, no progress before it: {err:?}");
    assert!(err.contains("no target is attached"), "{err}");
    assert!(!err.contains('%'), "a progress line: {err}");

    d.cli_ok(&["attach", p(&tgt)]);
    d.cli_ok(&["pause"]);
    // Paused, with a timeout: the lines say paused and show no ETA.
    let o = d.cli(&["wait", "--timeout", "1"]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    let err = stderr(&o);
    let progress: Vec<&str> = err.lines().filter(|l| l.contains('%')).collect();
    assert!(!progress.is_empty(), "{err}");
    for l in &progress {
        assert!(l.contains("paused") && !l.contains("ETA"), "a paused line with an ETA: {l:?}");
    }
    assert!(err.contains("timed out"), "{err}");
    assert!(!err.contains("waiting until"), "with a timeout there is no need to explain: {err}");

    // Paused, without a timeout: it says why it keeps waiting, and finishes
    // once resumed.
    let mut w = Command::new(bin())
        .args(["wait", "--control", p(&d.control)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wait");
    let err_pipe = w.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err_pipe).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let why = rx.recv_timeout(Duration::from_secs(10)).expect("a first line");
    assert!(why.contains("paused") && why.contains("livemirror resume"), "{why}");
    d.cli_ok(&["resume"]);
    d.cli_ok(&["set-rate", "0"]);
    let st = wait_timeout(&mut w, Duration::from_secs(60)).expect("wait ends");
    assert_eq!(st.code(), Some(0));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.starts_with("synced")), "{rest:?}");
}

#[test]
fn wait_draws_a_progress_bar_on_a_terminal() {
    use nix::pty::{openpty, Winsize};
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(76, 16 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 16 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "4M"]);
    d.cli_ok(&["attach", p(&tgt)]);

    let ws = Winsize { ws_row: 24, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = openpty(Some(&ws), None).expect("a pseudo-terminal");
    let slave = std::fs::File::from(pty.slave);
    let mut child = Command::new(bin())
        .args(["wait", "--timeout", "60", "--control", p(&d.control)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(slave.try_clone().expect("dup"))
        .env("TERM", "xterm")
        .spawn()
        .expect("wait on a terminal");
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // EIO once the last writer of the terminal is gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    d.cli_ok(&["pause"]);
    std::thread::sleep(Duration::from_millis(1200));
    d.cli_ok(&["resume"]);
    d.cli_ok(&["set-rate", "0"]);
    let st = wait_timeout(&mut child, Duration::from_secs(60)).expect("wait ends");
    assert_eq!(st.code(), Some(0));
    let mut all = Vec::new();
    while let Ok(b) = rx.recv_timeout(Duration::from_secs(2)) {
        all.extend(b);
    }
    let screen = String::from_utf8_lossy(&all);
    assert!(screen.contains('\r') || screen.contains("\x1b["), "no redraws: the bar was not drawn: {screen:?}");
    assert!(screen.contains("[=") && screen.contains('%'), "no bar: {screen:?}");
    assert!(screen.contains("ETA"), "no ETA while copying: {screen:?}");
    let paused_frames: Vec<&str> = screen.split(['\r', '\n']).filter(|f| f.contains("paused (")).collect();
    assert!(!paused_frames.is_empty(), "the bar never said paused: {screen:?}");
    assert!(paused_frames.iter().all(|f| !f.contains("ETA")), "an ETA while paused: {paused_frames:?}");
    assert!(screen.contains("synced ("), "no final line: {screen:?}");
}

// ------------------------------------------------------------------- verify

#[test]
fn verify_during_a_sync_says_what_it_could_not_compare_and_can_wait() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(77, 32 * MIB as usize));
    let tgt = dir.path().join("t.img");
    make_sparse(&tgt, 32 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "2M"]);
    d.cli_ok(&["attach", p(&tgt)]);
    std::thread::sleep(Duration::from_millis(300));
    let o = d.cli(&["verify"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "no mismatch, so exit 0 (the contract): {}", text(&o));
    assert!(out.contains("not compared because the copy has not reached them yet"), "{out}");
    assert!(!out.contains("source and target match"), "a partial verify called a pass: {out}");
    let o = d.cli(&["verify", "--strict"]);
    assert_eq!(code(&o), 1, "--strict during a sync: {}", text(&o));

    d.cli_ok(&["set-rate", "0"]);
    let o = d.cli(&["verify", "--wait", "--timeout", "60", "--strict"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let out = stdout(&o);
    assert!(out.contains("verify: 512 regions compared") && out.contains("source and target match"), "{out}");
    let o = d.cli(&["verify", "--timeout", "5"]);
    assert_eq!(code(&o), 2, "--timeout needs --wait: {}", text(&o));
}

// ------------------------------------------------------------ zero detection

/// Allocated bytes of a file, and whether SEEK_HOLE finds a hole before `end`.
fn allocation(path: &std::path::Path, end: u64) -> (u64, bool) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    let blocks = f.metadata().expect("stat").blocks() * 512;
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    (blocks, hole >= 0 && (hole as u64) < end)
}

#[test]
fn detect_zeroes_on_leaves_holes_and_off_writes_every_byte() {
    let size = 16 * MIB;
    // Data in the first and last MiB, zero bytes (written, not holes) between.
    let mut content = vec![0u8; size as usize];
    content[..MIB as usize].copy_from_slice(&pattern(78, MIB as usize));
    content[(size - MIB) as usize..].copy_from_slice(&pattern(79, MIB as usize));
    for mode in ["on", "off"] {
        let dir = scratch_shm();
        let src = dir.path().join("s.img");
        make_image(&src, &content);
        assert!(allocation(&src, size).0 >= size, "the source must be fully allocated");
        let tgt = dir.path().join("t.img");
        make_sparse(&tgt, size);
        let mut d = Daemon::start(dir.path(), &["--source", p(&src), "--detect-zeroes", mode]);
        assert_eq!(d.status()["detect_zeroes"], mode == "on");
        d.cli_ok(&["attach", p(&tgt)]);
        let o = d.cli(&["wait", "--timeout", "60"]);
        assert_eq!(code(&o), 0, "{}", text(&o));
        let st = d.status();
        let human = d.cli_ok(&["status"]);
        assert!(human.contains(&format!("detection {mode}")), "{human}");
        assert_eq!(st["bytes_copied"], size, "{st}");
        let zeroed = st["bytes_written_as_zeroes"].as_u64().expect("bytes_written_as_zeroes");
        assert_eq!(d.stop().code(), Some(0));
        assert_same(&std::fs::read(&tgt).expect("target"), &content, "target");
        let (allocated, hole) = allocation(&tgt, size);
        if mode == "on" {
            assert_eq!(zeroed, size - 2 * MIB, "{st}");
            assert!(hole, "no hole in the target's zero run");
            assert!(allocated <= 3 * MIB, "the zero run was written: {allocated} bytes allocated");
        } else {
            assert_eq!(zeroed, 0, "{st}");
            assert!(!hole, "off must write every byte, but the target has a hole");
            assert!(allocated >= size, "only {allocated} of {size} bytes allocated");
        }
    }
    let o = lm(&["serve", "--source", "/x", "--detect-zeroes", "maybe"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
}

// --------------------------------------------------------------------- CLI

/// Every argument of every command (hidden ones aside) has help text.
#[test]
fn every_argument_of_every_command_has_help() {
    let o = lm(&["--help"]);
    let top = stdout(&o);
    let cmds: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(
        cmds.len() >= 15 && cmds.contains(&"nbd-disconnect".to_string()) && cmds.contains(&"events".to_string()),
        "{top}"
    );
    assert!(top.contains("1K = 1024") && top.contains("Exit codes"), "the grammar and exit codes: {top}");
    let mut bare = Vec::new();
    for c in &cmds {
        let o = lm(&[c, "--help"]);
        assert_eq!(code(&o), 0, "{c} --help: {}", text(&o));
        let h = stdout(&o);
        let mut section = "";
        let lines: Vec<&str> = h.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.starts_with(' ') {
                section = l;
                continue;
            }
            let t = l.trim_start();
            let is_arg = t.starts_with('-') || t.starts_with('<') || t.starts_with('[');
            if !(section == "Arguments:" || section == "Options:") || !is_arg {
                continue;
            }
            if t.contains("--help") || t.contains("--version") {
                continue;
            }
            // clap puts the help after the argument on the same line, or on
            // the next lines indented further; "[default: …]" alone is none.
            let indent = l.len() - t.len();
            let is_help = |s: &str| !s.is_empty() && !s.starts_with('[') && !s.starts_with('-');
            let own = t.split("  ").skip(1).any(|s| is_help(s.trim()));
            let next = lines.get(i + 1).is_some_and(|n| {
                let nt = n.trim_start();
                n.len() - nt.len() > indent && is_help(nt)
            });
            if !own && !next {
                bare.push(format!("{c}: {t}"));
            }
        }
        // Benchmark narratives belong in docs/decisions.md, not in --help.
        for w in ["p99", "was seen", "Linux 6.1", "1.6-1.7x"] {
            assert!(!h.contains(w), "{c} --help tells a benchmark story ({w}): {h}");
        }
    }
    assert!(bare.is_empty(), "arguments without help text:\n{}", bare.join("\n"));
    let o = lm(&["serve", "--help"]);
    assert!(stdout(&o).contains("--detect-zeroes") && stdout(&o).contains("--metrics"), "{}", text(&o));
}

#[test]
fn one_size_and_rate_grammar_everywhere() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 8 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src), "--max-rate", "1.5G/s", "--min-rate", "10mb"]);
    assert_eq!(d.status()["max_rate"], 3u64 << 29);
    for (arg, want) in [("10mb", 10 * MIB), ("1.5G", 3 << 29), ("64KB/s", 64 << 10), ("100 M", 100 * MIB), ("0", 0)] {
        d.cli_ok(&["set-rate", arg]);
        assert_eq!(d.status()["max_rate"], want, "set-rate {arg}");
    }
    for bad in ["12Q", "1.3K", "fast", "1e3"] {
        let o = d.cli(&["set-rate", bad]);
        assert_eq!(code(&o), 2, "set-rate {bad}: {}", text(&o));
        assert!(
            stderr(&o).contains("K, M, G or T") && stderr(&o).contains("1.5G"),
            "the error says what is accepted: {}",
            text(&o)
        );
    }
    let o = d.cli(&["grow", "1M/s"]);
    assert_eq!(code(&o), 2, "a size with /s: {}", text(&o));
    assert!(stderr(&o).contains("a size takes no /s"), "{}", text(&o));
    let o = lm(&["serve", "--source", p(&src), "--region-size", "64kb", "--help"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

#[test]
fn a_missing_source_is_a_usage_error() {
    let o = lm(&["serve", "--target", "/tmp/t.img"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(stderr(&o).contains("--source"), "{}", text(&o));
}

#[test]
fn a_control_command_on_something_else_says_so() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 8 * MIB);
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    // The NBD socket instead of the control socket.
    let o = lm(&["status", "--control", p(&d.sock)]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.contains("is an NBD socket, not a livemirror control socket"), "{err}");
    // Some other service that answers something else.
    let other = dir.path().join("other.sock");
    let l = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    std::thread::spawn(move || {
        for s in l.incoming().take(2) {
            let Ok(mut s) = s else { return };
            let mut b = [0u8; 256];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    for args in [vec!["status"], vec!["pause"]] {
        let mut a = args.clone();
        a.extend(["--control", p(&other)]);
        let o = lm(&a);
        assert_eq!(code(&o), 1, "{}", text(&o));
        let err = stderr(&o);
        assert!(err.contains("is not a livemirror control socket"), "{args:?}: {err}");
        assert!(err.contains("HTTP/1.1 400"), "it shows what it got: {err}");
        assert!(!err.contains("expected value"), "a JSON parser error leaks out: {err}");
    }
}

#[test]
fn nbd_device_without_a_kernel_driver_fails_before_listening() {
    // This machine's kernel has no NBD driver (the VM scenarios cover one that
    // has); a host where it is loaded cannot run this check.
    assert!(
        !std::path::Path::new("/sys/module/nbd").exists(),
        "the nbd module is loaded here: this test checks a host without it"
    );
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 8 * MIB);
    let mut d = Daemon::spawn_raw(dir.path(), &["--source", p(&src), "--nbd-device", "/dev/nbd0"]);
    let st = wait_timeout(d.child.as_mut().expect("spawned"), Duration::from_secs(30)).expect("exits");
    d.child = None;
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("no NBD driver"), "{log}");
    assert_eq!(log.matches("no NBD driver").count(), 1, "the reason twice: {log}");
    assert!(!log.contains("serving "), "it listened first: {log}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
    assert!(!d.sock.exists() && !d.control.exists(), "socket files left behind: {left:?}");
    let o = lm(&["serve", "--source", p(&src), "--nbd-device", "/dev/sda"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("not an NBD device"), "{}", text(&o));
}

#[test]
fn every_failure_says_its_reason_once() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_sparse(&src, 8 * MIB);
    let missing = dir.path().join("missing.img");
    let nodir = dir.path().join("no/such/dir/state");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("file");
    let under_file = file.join("ctl.sock");
    let cases: Vec<Vec<String>> = vec![
        vec!["serve".into(), "--source".into(), p(&missing).into()],
        vec!["serve".into(), "--source".into(), p(&src).into(), "--target".into(), p(&missing).into()],
        vec!["serve".into(), "--source".into(), p(&src).into(), "--control".into(), p(&under_file).into()],
        vec![
            "serve".into(),
            "--source".into(),
            p(&src).into(),
            "--listen".into(),
            format!("unix:{}", p(&under_file)),
            "--control".into(),
            p(&dir.path().join("c.sock")).into(),
        ],
        vec!["serve".into(), "--source".into(), p(&src).into(), "--state".into(), p(&nodir).into()],
        vec![
            "bench".into(),
            "--source".into(),
            p(&missing).into(),
            "--target".into(),
            p(&src).into(),
            "--force".into(),
        ],
        vec!["nbd-disconnect".into(), "/dev/nbd0".into()],
        vec!["generate".into(), "man".into(), p(&under_file).into()],
    ];
    let (nbd, ctl) = (format!("unix:{}", p(&dir.path().join("n.sock"))), p(&dir.path().join("c.sock")).to_string());
    for mut args in cases {
        // Never the default sockets in /run: private ones unless the case names its own.
        if args[0] == "serve" {
            if !args.iter().any(|x| x == "--listen") {
                args.extend(["--listen".to_string(), nbd.clone()]);
            }
            if !args.iter().any(|x| x == "--control") {
                args.extend(["--control".to_string(), ctl.clone()]);
            }
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = lm(&a);
        let err = stderr(&o);
        assert_eq!(code(&o), 1, "{a:?}: {}", text(&o));
        // The daemon's own log lines may surround it: the reason is the
        // one line that starts with "livemirror:".
        let reasons_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("livemirror:")).collect();
        assert_eq!(reasons_lines.len(), 1, "{a:?}: {err}");
        let last = reasons_lines[0];
        // Each OS reason ("No such file or directory (os error 2)") once.
        let mut reasons = 0;
        for r in ["(os error", "No such file", "Not a directory", "no NBD driver"] {
            let n = last.matches(r).count();
            assert!(n <= 1, "{a:?} says {r:?} {n} times: {last}");
            reasons += n;
        }
        assert!(reasons >= 1, "{a:?} gives no reason: {last}");
        assert!(!last.contains(": : "), "{a:?}: {last}");
    }
    // A refused attach through the daemon, too.
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let o = d.cli(&["attach", p(&missing)]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(err.matches("No such file").count() == 1, "{err}");
}

#[test]
fn man_pages_and_completions_are_generated_from_the_cli() {
    let dir = scratch();
    let man = dir.path().join("man1");
    let o = lm(&["generate", "man", p(&man)]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let top = std::fs::read_to_string(man.join("livemirror.1")).expect("livemirror.1");
    assert!(top.contains(".TH livemirror 1") && top.contains("attach"), "{top}");
    for c in ["serve", "attach", "status", "events", "wait", "verify", "set-rate", "grow", "nbd-disconnect"] {
        let page = std::fs::read_to_string(man.join(format!("livemirror-{c}.1")))
            .unwrap_or_else(|e| panic!("livemirror-{c}.1: {e}"));
        assert!(page.contains(&format!(".TH livemirror-{c} 1")), "{c}: {page}");
    }
    let serve = std::fs::read_to_string(man.join("livemirror-serve.1")).expect("serve page");
    assert!(serve.contains("detect") && serve.contains("metrics"), "{serve}");
    assert!(!man.join("livemirror-generate.1").exists(), "the hidden command got a page");
    for (shell, needle) in [("bash", "nbd-disconnect"), ("zsh", "detect-zeroes"), ("fish", "set-rate")] {
        let o = lm(&["generate", "completions", shell]);
        assert_eq!(code(&o), 0, "{shell}: {}", text(&o));
        assert!(stdout(&o).contains(needle), "{shell} completions lack {needle}");
    }
    let o = lm(&["generate", "completions", "bash", "--dir", p(&dir.path().join("c"))]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(dir.path().join("c/livemirror.bash").exists(), "{}", text(&o));
}

/// `livemirror events | head -1`: when the reader goes away the follower ends
/// at its next line, quietly (SIGPIPE, as Unix tools do), never with a panic.
#[test]
fn events_end_quietly_when_the_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    make_image(&src, &pattern(74, MIB as usize));
    let d = Daemon::start(dir.path(), &["--source", p(&src)]);
    let mut ev = Command::new(bin())
        .args(["events", "--interval", "0.05", "--control", p(&d.control)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("livemirror events");
    let mut first = String::new();
    BufReader::new(ev.stdout.take().expect("stdout")).read_line(&mut first).expect("a line");
    assert!(first.contains("\"type\":\"status\""), "{first}");
    // The reader (and its pipe) is gone now; the next line, for this event,
    // finds no reader.
    d.cli_ok(&["set-rate", "1M"]);
    let st = wait_timeout(&mut ev, Duration::from_secs(10)).expect("events ends once nobody reads");
    let mut err = String::new();
    ev.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert_eq!(st.signal(), Some(libc::SIGPIPE), "exit {st}; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(d.state(), "serving", "the daemon is unaffected");
}
