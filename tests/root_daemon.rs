//! The root storage daemon mode on the host: the supervisor forks the daemon,
//! restarts it after `kill -9` (the sync resumes from `--state`), and stops
//! both on SIGTERM; a daemon whose supervisor was killed serves on. The same mode under a real switch_root runs in the VM
//! scenarios (tests/vm/).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn proc_field(pid: u32, name: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    st.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string())).unwrap_or_default()
}

/// The one daemon child of `sup`, once it answers on the control socket.
fn daemon_child(d: &Daemon, sup: u32, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kids = children(sup);
        if kids.len() == 1 && Some(kids[0]) != not && d.cli(&["status", "--json"]).status.success() {
            return kids[0];
        }
        assert!(Instant::now() < deadline, "no daemon child answering; children {kids:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn supervisor_restarts_a_killed_daemon_which_resumes_the_sync() {
    let dir = scratch_shm();
    let (src, tgt, state) = (dir.path().join("s.img"), dir.path().join("t.img"), dir.path().join("state"));
    let data = pattern(7, 48 << 20);
    make_image(&src, &data);
    make_sparse(&tgt, 48 << 20);
    let mut d = Daemon::start(
        dir.path(),
        &[
            "--root-storage-daemon",
            "--source",
            p(&src),
            "--state",
            p(&state),
            "--max-rate",
            "8M",
            "--region-size",
            "1M",
        ],
    );
    let sup = d.child.as_ref().map(|c| c.id()).expect("running");
    let first = daemon_child(&d, sup, None);

    // The daemon is hardened and does not sit in the directory it was started from.
    assert_ne!(proc_field(first, "VmLck"), "0 kB", "daemon memory is not locked");
    // Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some containers drop:
    // then the daemon must say so instead.
    let may_lower = std::process::Command::new("sh")
        .args(["-c", "echo -1000 > /proc/self/oom_score_adj"])
        .status()
        .is_ok_and(|s| s.success());
    let adj = std::fs::read_to_string(format!("/proc/{first}/oom_score_adj")).unwrap_or_default();
    if may_lower {
        assert_eq!(adj.trim(), "-1000", "OOM killer exemption missing");
    } else {
        assert!(d.log_text().contains("cannot set oom_score_adj"), "no warning about oom_score_adj:\n{}", d.log_text());
    }
    assert_eq!(std::fs::read_link(format!("/proc/{first}/cwd")).ok().as_deref(), Some(Path::new("/proc")));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{sup}/comm")).ok(),
        std::fs::read_to_string(format!("/proc/{first}/comm")).ok()
    );

    d.cli_ok(&["attach", p(&tgt)]);
    // Let some regions become clean and durable (persisted at least once a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.status()["regions_clean"].as_u64().unwrap_or(0) < 8 {
        assert!(Instant::now() < deadline, "no progress: {}", d.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let before = d.status()["regions_clean"].as_u64().unwrap_or(0);
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).expect("kill -9 the daemon");

    let second = daemon_child(&d, sup, Some(first));
    let st = d.status();
    assert_eq!(st["state"], "syncing", "restarted daemon: {st}");
    let after = st["regions_clean"].as_u64().unwrap_or(0);
    // Progress is saved at least once a second: what was copied since the last
    // save (at 8 MiB/s, up to 8 regions; twice that on a loaded machine) is
    // copied again, nothing before it.
    assert!(after + 16 >= before && after > 0, "progress lost: {before} clean before the kill, {after} after");
    assert!(d.log_text().contains("restarting"), "supervisor did not say it restarted:\n{}", d.log_text());

    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["wait", "--timeout", "60"]);
    d.cli_ok(&["verify"]);
    assert_eq!(std::fs::read(&tgt).expect("read target"), data, "target differs from the source");

    // SIGTERM to the supervisor stops the daemon cleanly; both exit 0.
    let st = d.stop();
    assert!(st.success(), "supervisor exit: {st}\n{}", d.log_text());
    assert!(!Path::new(&format!("/proc/{second}")).exists(), "daemon {second} outlived its supervisor");
}

/// Kills a process by pid when dropped (a daemon that is not our child).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive (its parent has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The supervisor killed with SIGKILL: the daemon keeps serving its clients
/// (it is adopted; the kernel device and every connection are its own), says
/// once that it runs unsupervised now, and still stops cleanly on SIGTERM.
#[test]
fn the_daemon_outlives_its_supervisor_serves_on_and_says_so() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let data = pattern(8, 8 << 20);
    make_image(&src, &data);
    let mut d = Daemon::start(dir.path(), &["--root-storage-daemon", "--source", p(&src)]);
    let sup = d.child.as_ref().map(|c| c.id()).expect("running");
    let daemon = daemon_child(&d, sup, None);
    let _reap = KillOnDrop(daemon);
    d.kill9();
    assert!(!alive(sup), "the supervisor still runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    let gone = format!("the supervisor (pid {sup}) is gone");
    loop {
        let st = d.status();
        if st["events"].to_string().contains(&gone) {
            assert_eq!(st["state"], "serving", "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "no event about the supervisor: {st}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(daemon), "the daemon died with its supervisor");
    assert_ne!(proc_field(daemon, "PPid"), sup.to_string(), "not adopted");
    // Clients are served as before.
    let uri = d.uri();
    qemu_io_ok(&d, &uri, &["write -P 0x5c 1M 64k".into(), "read -P 0x5c 1M 64k".into(), "flush".into()]);
    assert_same(&pread(&uri, 0, 4096), &data[..4096], "a read after the supervisor died");
    // Said once, not every half second.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.log_text().matches(&gone).count(), 1, "{}", d.log_text());
    // SIGTERM still stops it cleanly, and what it acknowledged is on the disk.
    kill(Pid::from_raw(daemon as i32), Signal::SIGTERM).expect("SIGTERM the daemon");
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(daemon) {
        assert!(Instant::now() < deadline, "the daemon did not stop on SIGTERM:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.log_text().contains("stopped cleanly"), "{}", d.log_text());
    let on_disk = std::fs::read(&src).unwrap();
    assert_same(&on_disk[1 << 20..(1 << 20) + (64 << 10)], &[0x5c; 64 << 10], "the write on the source");
}

/// A root storage daemon started as the glue starts one: `@livemirror serve`,
/// from a copy of the binary in a directory of its own (where an upgrade
/// stages the new binary and its libraries).
fn start_from_copy(dir: &Path, args: &[&str]) -> Daemon {
    use std::os::unix::process::CommandExt;
    let bin_dir = dir.join("bin");
    std::fs::copy(bin(), bin_dir.join("livemirror")).unwrap();
    let (sock, control, log) = (dir.join("nbd.sock"), dir.join("ctl.sock"), dir.join("serve.log"));
    let logf = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(bin_dir.join("livemirror"))
        .arg0("@livemirror")
        .arg("serve")
        .args(args)
        .args(["--listen", &format!("unix:{}", sock.display()), "--control", p(&control)])
        .stdout(std::process::Stdio::null())
        .stderr(logf)
        .spawn()
        .expect("start @livemirror");
    let mut d = Daemon { child: Some(child), dir: dir.to_path_buf(), sock, control, log, netns: None };
    d.wait_ready();
    d
}

/// `livemirror upgrade`; the new daemon's pid.
fn upgrade(d: &Daemon) -> u32 {
    let out = d.cli_ok(&["upgrade"]);
    out.split("pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("upgrade said {out:?}"))
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// An upgrade of the supervised root storage daemon mid-sync: the supervisor
/// execs the new binary in place (its pid, which the initramfs glue records,
/// stays), runs it from the copy staged next to the old one (on a tmpfs made
/// larger for it) with the interpreter and libraries the upgrade command ran
/// with, and its new child
/// takes over; both are still '@' processes (spared by systemd's kill
/// sprees), hardened, and the new supervisor restarts a killed daemon as the
/// old one did. Then the supervisor is killed: an upgrade of the orphaned
/// daemon starts a new supervisor with it.
#[test]
fn an_upgrade_keeps_the_supervisor_and_gives_an_orphaned_daemon_one_again() {
    let dir = scratch_shm();
    let (src, tgt, state) = (dir.path().join("s.img"), dir.path().join("t.img"), dir.path().join("state"));
    let data = pattern(9, 32 << 20);
    make_image(&src, &data);
    make_sparse(&tgt, 32 << 20);
    // The binary's own tmpfs, as the glue mounts it: too small for a second
    // copy with its libraries, which the upgrade makes room for.
    let bin_size = std::fs::metadata(bin()).unwrap().len();
    let _bin_fs = Mount::tmpfs(&dir.path().join("bin"), &format!("size={},mode=0755", bin_size + (4 << 20)));
    let mut d = start_from_copy(
        dir.path(),
        &["--source", p(&src), "--state", p(&state), "--max-rate", "4M", "--region-size", "1M"],
    );
    let sup = d.child.as_ref().map(|c| c.id()).expect("running");
    let first = daemon_child(&d, sup, None);
    d.cli_ok(&["attach", p(&tgt)]);
    std::thread::sleep(Duration::from_millis(1200));
    let before = d.status()["regions_clean"].as_u64().unwrap_or(0);
    let second = upgrade(&d);
    assert_ne!(second, first);
    assert_eq!(daemon_child(&d, sup, Some(first)), second, "the new daemon is the supervisor's child");
    assert!(!alive(first), "the old daemon still runs");
    for pid in [sup, second] {
        let argv = cmdline(pid);
        assert_eq!(argv.first().map(String::as_str), Some("@livemirror"), "pid {pid}: {argv:?}");
        assert_ne!(proc_field(pid, "VmLck"), "0 kB", "pid {pid}: memory not locked");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let staged = dir.path().join("bin/lib").display().to_string();
        assert!(maps.contains(&format!("{staged}/libc.so")), "pid {pid} does not run from the staged libraries");
    }
    assert_eq!(std::fs::read_to_string(format!("/proc/{second}/comm")).unwrap().trim(), "livemirror");
    assert!(d.log_text().contains("made the tmpfs"), "the binary's tmpfs was not made larger:\n{}", d.log_text());
    assert!(!dir.path().join("ctl.sock.upgrade-plan").exists(), "the exec plan is left behind");
    let st = d.status();
    assert_eq!(st["state"], "syncing", "{st}");
    assert!(st["regions_clean"].as_u64().unwrap_or(0) >= before, "progress lost: {before} -> {st}");
    // The new supervisor restarts a killed daemon, which resumes the sync.
    kill(Pid::from_raw(second as i32), Signal::SIGKILL).unwrap();
    let third = daemon_child(&d, sup, Some(second));
    assert!(d.log_text().contains("restarting"), "{}", d.log_text());
    assert_eq!(d.status()["state"], "syncing");
    // The supervisor killed: the orphaned daemon is upgraded, and gets one.
    let _reap = KillOnDrop(third);
    d.kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.status()["events"].to_string().contains("is gone") {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let fourth = upgrade(&d);
    let _reap4 = KillOnDrop(fourth);
    let new_sup = proc_field(fourth, "PPid").parse::<u32>().unwrap();
    let _reap_sup = KillOnDrop(new_sup);
    assert_ne!(new_sup, sup);
    assert_eq!(cmdline(new_sup).first().map(String::as_str), Some("@livemirror"), "a new supervisor");
    kill(Pid::from_raw(fourth as i32), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let fifth = loop {
        let kids = children(new_sup);
        if kids.len() == 1 && kids[0] != fourth && d.cli(&["status", "--json"]).status.success() {
            break kids[0];
        }
        assert!(Instant::now() < deadline, "the new supervisor did not restart the daemon:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    let _reap5 = KillOnDrop(fifth);
    d.cli_ok(&["set-rate", "0"]);
    d.cli_ok(&["wait", "--timeout", "60"]);
    d.cli_ok(&["verify"]);
    kill(Pid::from_raw(new_sup as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(new_sup) || alive(fifth) {
        assert!(Instant::now() < deadline, "SIGTERM did not stop the supervisor and daemon:\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&tgt).unwrap(), data, "the target differs from the source");
}
