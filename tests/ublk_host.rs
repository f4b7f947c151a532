//! `serve --ublk-device` on a host whose kernel has no ublk driver (this one
//! has none; the driver itself is tested in the VM scenarios, tests/vm):
//! the daemon exits 1 before it listens, with one line naming the module and
//! the alternative; `ublk-remove` says the same; `status --json` carries
//! `kernel_device`, null without a kernel device.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

use std::process::Command;
use std::time::Duration;

/// These tests are about a kernel without the driver; on one with it they
/// would test nothing, so they say so instead of passing.
fn no_driver_here() {
    assert!(
        !std::path::Path::new("/dev/ublk-control").exists(),
        "this machine has /dev/ublk-control: these tests check the daemon without ublk_drv (run them where the module \
         is not loaded; the VM scenarios test the driver)"
    );
}

fn one_line(stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr).into_owned();
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "want a one-line reason on stderr, got: {err:?}");
    lines[0].to_string()
}

#[test]
fn without_the_driver_serve_exits_1_before_listening() {
    no_driver_here();
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 16 << 20);
    for extra in [&["--ublk-device", "auto"][..], &["--ublk-device", "3", "--root-storage-daemon"][..]] {
        let sock = dir.path().join("nbd.sock");
        let ctl = dir.path().join("ctl.sock");
        let mut child = Command::new(bin())
            .args(["serve", "--source", p(&img), "--listen", &format!("unix:{}", p(&sock)), "--control", p(&ctl)])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let st = wait_timeout(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("serve {extra:?} did not exit within 30 s without the driver")
        });
        let out = child.wait_with_output().unwrap();
        assert_eq!(exit_code(&st), 1, "serve {extra:?}: exit 1 without the driver");
        let line = one_line(&out.stderr);
        for needle in ["/dev/ublk-control", "ublk_drv", "--nbd-device"] {
            assert!(line.contains(needle), "serve {extra:?}: the reason does not name {needle:?}: {line}");
        }
        assert!(!sock.exists() && !ctl.exists(), "serve {extra:?} listened before it failed");
    }
}

#[test]
fn ublk_remove_without_the_driver_exits_1_and_a_bad_name_2() {
    no_driver_here();
    let o = run(&bin(), &["ublk-remove", "/dev/ublkb0"]);
    assert_eq!(code(&o), 1);
    let line = one_line(&o.stderr);
    assert!(line.contains("ublk_drv") && line.contains("/dev/ublk-control"), "{line}");
    let o = run(&bin(), &["ublk-remove", "/dev/sda"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
}

#[test]
fn status_names_no_kernel_device_when_there_is_none() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 16 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", p(&img)]);
    let st = d.status();
    let obj = st.as_object().unwrap();
    assert!(obj.contains_key("kernel_device"), "status --json lacks kernel_device: {st}");
    assert!(st["kernel_device"].is_null(), "kernel_device without --nbd-device or --ublk-device: {st}");
    let o = d.cli(&["status", "--get", "kernel_device"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "null");
    assert_eq!(exit_code(&d.stop()), 0);
}
