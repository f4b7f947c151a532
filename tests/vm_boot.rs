//! The VM end-to-end scenarios (tests/vm/): a Debian kernel booted under QEMU (TCG) runs its
//! root filesystem from livemirror over the kernel's NBD client and performs the rebootless
//! install (install-e2e, and install-nbdclient-e2e with `nbd-client`), survives `kill -9` of
//! the daemon under a write load (kill-e2e), and boots a Debian 12 system whose initramfs
//! `mkinitramfs` built with initrd-glue/, installs it with `livemirror-install` and shuts it
//! down through the glue (glue-e2e; glue-partition-e2e installs onto a partition), and makes the whole journey on a live ISO built with
//! dracut's dmsquash-live: boot from the CD, install onto a blank disk without a reboot, eject
//! the CD, and boot the disk by itself through its own GRUB (live-iso-e2e). This test runs
//! `tests/vm/run-all.sh` with the livemirror
//! binary named by `LIVEMIRROR_VM_BIN` (scripts/test-all.sh builds and names the release binary,
//! which is what a live system carries), else the one cargo just built for the tests.
//!
//! It is never skipped: a missing prerequisite fails it with the command that installs it.
//! The kernel and QEMU are fetched with `apt-get download`, and the Debian roots with
//! debootstrap, into the rig's cache on the first run; the live ISO is cached there too, keyed
//! by what it was built from (see tests/vm/README.md). The whole
//! output streams through the test harness (shown on failure, or live with `--nocapture`) and
//! is also kept in target/tmp/vm-boot.log.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[test]
fn vm_rebootless_install_scenarios() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/run-all.sh");
    let log_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vm-boot.log");
    let mut log =
        std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let bin = std::env::var_os("LIVEMIRROR_VM_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_livemirror").into());
    assert!(bin.is_file(), "LIVEMIRROR_VM_BIN={} is not a file (cargo build --release?)", bin.display());
    let start = Instant::now();
    // stderr joins stdout so the log keeps the order of events.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg("exec bash \"$0\" 2>&1")
        .arg(&script)
        .env("LIVEMIRROR_BIN", &bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e} (the VM rig needs bash)", script.display()));
    let mut text = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line.unwrap_or_else(|e| format!("<unreadable output: {e}>"));
        println!("{line}");
        let _ = writeln!(log, "{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().expect("wait for run-all.sh");
    let elapsed = start.elapsed().as_secs_f64();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "VM scenarios failed ({status}) after {elapsed:.0} s; full log: {}\n\
             (run one by hand: LIVEMIRROR_BIN={} bash {} install-e2e; known livemirror bugs \
             and workaround knobs: tests/vm/README.md)\n--- last lines ---\n{}",
            log_path.display(),
            bin.display(),
            script.display(),
            tail.join("\n")
        );
    }
    assert!(text.contains(" passed, 0 failed"), "run-all.sh exited 0 without a clean summary:\n{text}");
    println!("VM scenarios passed in {elapsed:.0} s with {} (log: {})", bin.display(), log_path.display());
}
