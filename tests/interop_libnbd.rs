//! Interoperability with libnbd's tools (nbdinfo, nbdcopy, nbdsh) and with
//! malformed traffic on raw sockets.
//!
//! The nbdsh edge cases live in `tests/scripts/nbd_edge.py`: each case checks
//! errnos and data itself and prints `CASE <name> OK`; these tests also check
//! the image bytes from outside and that the daemon keeps serving.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::raw::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use test_support::client::Client;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/nbd_edge.py");
const MIB: usize = 1 << 20;

/// `nbdsh -n` running one case of the edge-case script.
fn nbdsh_cmd(uri: &str, case: &str, structured: bool, arg: &str) -> Command {
    let mut c = Command::new(tool("nbdsh"));
    c.args(["-n", "-c", &format!("exec(open({SCRIPT:?}).read())")])
        .env("PATH", debian_path())
        .env("LM_URI", uri)
        .env("LM_CASE", case)
        .env("LM_STRUCTURED", if structured { "1" } else { "0" })
        .env("LM_ARG", arg)
        .stdin(Stdio::null());
    c
}

fn nbdsh_case_arg(d: &mut Daemon, case: &str, structured: bool, arg: &str) -> String {
    let out = nbdsh_cmd(&d.uri(), case, structured, arg).output().expect("cannot run nbdsh");
    let t = text(&out);
    assert!(
        out.status.success() && t.contains(&format!("CASE {case} OK")),
        "nbdsh case {case} (structured={structured}, arg={arg:?}) failed ({}):\n{t}\n--- daemon log ---\n{}",
        out.status,
        d.log_text()
    );
    assert_alive(d);
    t
}

fn nbdsh_case(d: &mut Daemon, case: &str, structured: bool) -> String {
    nbdsh_case_arg(d, case, structured, "")
}

/// The daemon process is still running and answers on both sockets.
fn assert_alive(d: &mut Daemon) {
    if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
        panic!("livemirror exited ({st}):\n{}", d.log_text());
    }
    assert_eq!(d.state(), "serving", "{}", d.log_text());
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run_ok(&tool("nbdinfo"), &["--json", uri]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json is not JSON ({e}):\n{out}"))
}

fn uri_for(d: &Daemon, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", d.sock.display())
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (got {:#04x}, want {:#04x})", got[i], want[i]);
    }
}

// ---------------------------------------------------------------- nbdinfo

#[test]
fn nbdinfo_json_reports_size_flags_block_sizes_and_contexts() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 24 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let v = nbdinfo_json(&d.uri());
    assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
    assert_eq!(v["structured"], true, "{v}");
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v}");
    let e = &exports[0];
    assert_eq!(e["export-name"], "", "{e}");
    assert_eq!(e["export-size"], 24u64 << 20, "{e}");
    for (flag, want) in [
        ("is_read_only", false),
        ("is_rotational", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_cache", true),
        ("can_df", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[flag], want, "{flag} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 1, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 33554432, "{e}");
    let contexts: Vec<&str> = e["contexts"].as_array().expect("contexts").iter().filter_map(|c| c.as_str()).collect();
    assert!(contexts.contains(&"base:allocation"), "{e}");
    let desc = e["description"].as_str().unwrap_or_else(|| panic!("no description in {e}"));
    assert!(!desc.trim().is_empty(), "{e}");
    // The plain output and --size agree.
    assert_eq!(run_ok(&tool("nbdinfo"), &["--size", &d.uri()]).trim(), (24u64 << 20).to_string());
    assert_alive(&mut d);
}

#[test]
fn read_only_export_is_advertised_and_refuses_writes_with_eperm() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let content = pattern(11, 8 << 20);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap(), "--read-only"]);
    let v = nbdinfo_json(&d.uri());
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["can_trim"], false, "{e}");
    assert_eq!(e["can_zero"], false, "{e}");
    assert_eq!(e["can_fast_zero"], false, "{e}");
    assert_eq!(e["can_flush"], true, "{e}");
    assert_eq!(e["export-size"], 8u64 << 20, "{e}");
    for structured in [true, false] {
        nbdsh_case(&mut d, "read_only", structured);
    }
    // nbdcopy into it fails, reading from it works.
    let src = dir.path().join("other.raw");
    make_image(&src, &pattern(12, 8 << 20));
    let out = run(&tool("nbdcopy"), &[src.to_str().unwrap(), &d.uri()]);
    assert!(!out.status.success(), "nbdcopy wrote to a read-only export:\n{}", text(&out));
    let back = dir.path().join("back.raw");
    run_ok(&tool("nbdcopy"), &[&d.uri(), back.to_str().unwrap()]);
    assert_same(&std::fs::read(&back).unwrap(), &content, "read-only export read back");
    assert_alive(&mut d);
    assert_eq!(d.stop().code(), Some(0));
    assert_same(&std::fs::read(&img).unwrap(), &content, "read-only image after the daemon stopped");
}

#[test]
fn nbdinfo_list_shows_the_named_export_and_a_wrong_name_fails_cleanly() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 4 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap(), "--export-name", "foo"]);
    let nbdinfo = tool("nbdinfo");
    let list = run_ok(&nbdinfo, &["--list", "--json", &d.uri()]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap_or_else(|e| panic!("not JSON ({e}): {list}"));
    let exports = v["exports"].as_array().expect("exports");
    assert_eq!(exports.len(), 1, "{v}");
    assert_eq!(exports[0]["export-name"], "foo", "{v}");
    assert_eq!(exports[0]["export-size"], 4u64 << 20, "{v}");
    assert!(exports[0]["description"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    let plain = run_ok(&nbdinfo, &["--list", &d.uri()]);
    assert!(plain.contains("export=\"foo\""), "{plain}");
    // The name works; wrong names (and the default export) are refused, and
    // the daemon keeps serving.
    assert_eq!(run_ok(&nbdinfo, &["--size", &uri_for(&d, "foo")]).trim(), (4u64 << 20).to_string());
    for wrong in ["bar", "", "fooo"] {
        let out = run(&nbdinfo, &["--size", &uri_for(&d, wrong)]);
        assert!(!out.status.success(), "export {wrong:?} was accepted:\n{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("export") || err.contains("No such file"), "unclear refusal of {wrong:?}: {err}");
        assert_alive(&mut d);
    }
    // The old-style NBD_OPT_EXPORT_NAME with an unknown name: the server must
    // drop that connection (it cannot send an error) and keep serving.
    let mut s = raw_connect(&d.sock);
    send_option(&mut s, 1, b"bar");
    assert_closed(&mut s, "NBD_OPT_EXPORT_NAME with an unknown export");
    let mut s = raw_handshake(&d.sock, "foo");
    raw_read_roundtrip(&mut s, 0, 512);
    // Option haggling as libnbd does it: LIST, LIST_META_CONTEXT, INFO, GO, ABORT.
    nbdsh_case_arg(&mut d, "options", true, "foo");
    assert_eq!(run_ok(&nbdinfo, &["--size", &uri_for(&d, "foo")]).trim(), (4u64 << 20).to_string());
    assert_alive(&mut d);
}

// ---------------------------------------------------------------- nbdcopy

#[test]
fn nbdcopy_file_to_nbd_and_nbd_to_file() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    let size = 20 * MIB + 4096 + 123; // not a multiple of anything nice
    make_image(&img, &pattern(21, size));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let nbdcopy = tool("nbdcopy");
    // file -> NBD
    let other = pattern(22, size);
    let src = dir.path().join("src.raw");
    make_image(&src, &other);
    run_ok(&nbdcopy, &["--flush", src.to_str().unwrap(), &d.uri()]);
    assert_same(&std::fs::read(&img).unwrap(), &other, "image after nbdcopy file -> NBD");
    // NBD -> file, and NBD -> stdout
    let out = dir.path().join("out.raw");
    run_ok(&nbdcopy, &[&d.uri(), out.to_str().unwrap()]);
    assert_same(&std::fs::read(&out).unwrap(), &other, "nbdcopy NBD -> file");
    let o = Command::new(&nbdcopy).args([&d.uri(), "-"]).env("PATH", debian_path()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_same(&o.stdout, &other, "nbdcopy NBD -> stdout");
    // Synchronous mode (one request at a time) and small requests.
    let out2 = dir.path().join("out2.raw");
    run_ok(&nbdcopy, &["--synchronous", "--request-size=65536", &d.uri(), out2.to_str().unwrap()]);
    assert_same(&std::fs::read(&out2).unwrap(), &other, "nbdcopy --synchronous NBD -> file");
    assert_alive(&mut d);
    assert_eq!(d.stop().code(), Some(0));
    assert_same(&std::fs::read(&img).unwrap(), &other, "image after the daemon stopped");
}

#[test]
fn nbdcopy_sparse_source_zeroes_the_holes() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let size = 16 * MIB;
    // The export starts full of data, so holes of the source must be zeroed.
    make_image(&img, &pattern(31, size));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let src = dir.path().join("sparse.raw");
    make_sparse(&src, size as u64);
    let mut want = vec![0u8; size];
    {
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        use std::os::unix::fs::FileExt;
        for (i, (off, len)) in [(MIB, 65536), (5 * MIB + 12345, 1000), (size - 4096, 4096)].into_iter().enumerate() {
            let p = pattern(40 + i as u64, len);
            f.write_all_at(&p, off as u64).unwrap();
            want[off..off + len].copy_from_slice(&p);
        }
    }
    assert!(std::fs::metadata(&src).unwrap().blocks() * 512 < size as u64 / 4, "source is not sparse");
    let nbdcopy = tool("nbdcopy");
    run_ok(&nbdcopy, &["--flush", src.to_str().unwrap(), &d.uri()]);
    assert_same(&std::fs::read(&img).unwrap(), &want, "image after copying a sparse source");
    // Back out with extents and without zero detection: nbdcopy follows our
    // base:allocation map, and the result still has the right bytes.
    let out = dir.path().join("out.raw");
    run_ok(&nbdcopy, &["--sparse=0", &d.uri(), out.to_str().unwrap()]);
    assert_same(&std::fs::read(&out).unwrap(), &want, "nbdcopy --sparse=0 NBD -> file");
    let out2 = dir.path().join("out2.raw");
    run_ok(&nbdcopy, &["--no-extents", &d.uri(), out2.to_str().unwrap()]);
    assert_same(&std::fs::read(&out2).unwrap(), &want, "nbdcopy --no-extents NBD -> file");
    // nbdinfo --map agrees with what is data.
    let map = run_ok(&tool("nbdinfo"), &["--map", &d.uri()]);
    let mut covered = 0u64;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad map line {line:?}");
        let (off, len, ty): (u64, u64, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(off, covered, "map is not contiguous:\n{map}");
        covered += len;
        if ty & 2 != 0 {
            let r = &want[off as usize..(off + len) as usize];
            assert!(r.iter().all(|&b| b == 0), "range {off}+{len} is reported zero but holds data:\n{map}");
        }
    }
    assert_eq!(covered, size as u64, "map does not cover the export:\n{map}");
    assert_alive(&mut d);
}

// ---------------------------------------------------------------- nbdsh edge cases

#[test]
fn nbdsh_out_of_range_requests_fail_and_the_connection_keeps_working() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let content = pattern(51, 8 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    for structured in [true, false] {
        nbdsh_case(&mut d, "out_of_range", structured);
    }
    let data = std::fs::read(&img).unwrap();
    assert_eq!(data.len(), 8 * MIB, "the image changed size");
    // Nothing was written past the pipelined/straddling refused writes.
    assert_same(&data[8 * MIB - 50000..8 * MIB - 4096], &content[8 * MIB - 50000..8 * MIB - 4096], "tail");
}

#[test]
fn nbdsh_zero_length_read_and_write_succeed() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_image(&img, &pattern(52, 4 * MIB));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    for structured in [true, false] {
        nbdsh_case(&mut d, "zero_length", structured);
    }
    assert_eq!(&std::fs::read(&img).unwrap()[20000..20010], b"ZZZZZZZZZZ");
}

#[test]
fn nbdsh_oversize_requests_get_einval_and_the_connection_survives() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    make_sparse(&img, 40 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    for structured in [true, false] {
        nbdsh_case(&mut d, "oversize", structured);
    }
    // The refused 32 MiB + 1 write of 0xee bytes never landed anywhere.
    let data = std::fs::read(&img).unwrap();
    assert!(!data.windows(4096).step_by(4096).any(|w| w.iter().all(|&b| b == 0xee)), "oversize payload was written");
}

#[test]
fn nbdsh_bad_or_unknown_command_flags_get_einval() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_image(&img, &pattern(53, 2 * MIB));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    for structured in [true, false] {
        nbdsh_case(&mut d, "bad_flags", structured);
    }
    let data = std::fs::read(&img).unwrap();
    assert!(!data[4096..8192].iter().all(|&b| b == 0xab), "a refused write landed");
}

#[test]
fn nbdsh_cache_fua_write_and_flush_succeed() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 4 * MIB as u64);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    nbdsh_case(&mut d, "cache_fua_flush", true);
    nbdsh_case(&mut d, "cache_fua_flush", false);
    let data = std::fs::read(&img).unwrap();
    assert!(data[65536..131072].iter().any(|&b| b != 0), "FUA write is not on the image");
    assert_eq!(data[200003..201003], data[65536..66536], "second FUA write is not on the image");
}

#[test]
fn nbdsh_block_status_reports_holes_and_data() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 8 * MIB as u64);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    nbdsh_case(&mut d, "block_status", true);
    // Also as another client sees it.
    let map = run_ok(&tool("nbdinfo"), &["--map", &d.uri()]);
    let first: Vec<&str> = map.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(first.get(..3), Some(&["0", "1048576", "3"][..]), "nbdinfo --map:\n{map}");
    assert!(map.lines().any(|l| l.split_whitespace().take(3).eq(["1048576", "65536", "0"])), "nbdinfo --map:\n{map}");
}

#[test]
fn nbdsh_trim_of_a_whole_region_reads_back_zeroes() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let content = pattern(54, 2 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap(), "--region-size", "64K"]);
    nbdsh_case(&mut d, "trim", true);
    let data = std::fs::read(&img).unwrap();
    assert_same(&data[..65536], &content[..65536], "before the trimmed region");
    assert!(data[65536..131072].iter().all(|&b| b == 0), "trimmed region is not zero on the image");
    assert_same(&data[131072..262144], &content[131072..262144], "between the trimmed regions");
    assert!(data[262144..266240].iter().all(|&b| b == 0), "second trimmed region is not zero on the image");
    assert!(data[266240..270336].iter().all(|&b| b == 0x77), "rewrite of the trimmed region is not on the image");
    assert!(data[270336..327680].iter().all(|&b| b == 0), "second trimmed region is not zero on the image");
    assert_same(&data[327680..], &content[327680..], "after the trimmed regions");
}

#[test]
fn nbdsh_fast_zero_works_on_a_file_backed_export() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    let content = pattern(55, 40 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    nbdsh_case(&mut d, "fast_zero", true);
    let data = std::fs::read(&img).unwrap();
    assert_same(&data[..1000], &content[..1000], "before the zeroed range");
    assert!(data[1000..71000].iter().all(|&b| b == 0), "fast zero is not on the image");
    assert_same(&data[71000..262144], &content[71000..262144], "between the zeroed ranges");
    assert!(data[262144..327680].iter().all(|&b| b == 0));
    assert_same(&data[327680..400000], &content[327680..400000], "between the zeroed ranges");
    assert!(data[400000..412345].iter().all(|&b| b == 0));
    assert_same(&data[412345..], &content[412345..], "after the zeroed ranges");
    // Fast-zero of the whole export (longer than the maximum payload).
    nbdsh_case(&mut d, "fast_zero_whole", true);
    let data = std::fs::read(&img).unwrap();
    assert!(data[..40 * MIB - 4096].iter().all(|&b| b == 0), "whole-export fast zero");
    assert!(data[40 * MIB - 4096..].iter().all(|&b| b == 0x42));
}

// ---------------------------------------------------------------- multiple connections

#[test]
fn multi_conn_concurrent_writers_on_disjoint_stripes() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    let size = 16 * MIB;
    make_image(&img, &pattern(61, size));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let want = pattern(62, size);
    let wfile = dir.path().join("want.raw");
    make_image(&wfile, &want);
    // Four connections at once, each writing every 4th 64K chunk (so their
    // requests interleave across the whole export and across regions).
    let n = 4;
    let children: Vec<Child> = (0..n)
        .map(|k| {
            nbdsh_cmd(&d.uri(), "write_stripes", true, &format!("{k} {n} {} 65536", wfile.display()))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot start nbdsh")
        })
        .collect();
    for (k, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "writer {k} failed:\n{}\n{}", text(&out), d.log_text());
    }
    // Every connection sees every other connection's flushed writes.
    nbdsh_case_arg(&mut d, "read_compare", true, wfile.to_str().unwrap());
    assert_same(&std::fs::read(&img).unwrap(), &want, "image after concurrent writers");
    // nbdcopy with four connections, in both directions.
    let other = pattern(63, size);
    let src = dir.path().join("other.raw");
    make_image(&src, &other);
    let nbdcopy = tool("nbdcopy");
    run_ok(&nbdcopy, &["--connections=4", "--requests=16", "--flush", src.to_str().unwrap(), &d.uri()]);
    assert_same(&std::fs::read(&img).unwrap(), &other, "image after nbdcopy --connections=4");
    let out = dir.path().join("out.raw");
    run_ok(&nbdcopy, &["--connections=4", "--requests=16", &d.uri(), out.to_str().unwrap()]);
    assert_same(&std::fs::read(&out).unwrap(), &other, "nbdcopy --connections=4 NBD -> file");
    assert_alive(&mut d);
}

// ---------------------------------------------------------------- malformed traffic

#[test]
fn garbage_before_and_during_the_handshake_closes_only_that_connection() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 4 * MIB as u64);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let nbdinfo = tool("nbdinfo");
    // A connection that never says anything does not block anyone.
    let idle = UnixStream::connect(&d.sock).unwrap();
    // (a) Garbage right away, without reading the greeting: unknown client flags.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let junk: Vec<u8> = (0..200u32).map(|i| (i * 37 + 0xff) as u8).collect();
    let _ = s.write_all(&junk);
    assert_closed(&mut s, "garbage instead of client flags");
    run_ok(&nbdinfo, &["--size", &d.uri()]);
    // (b) Valid flags, then an option header with a bad magic.
    let mut s = raw_connect(&d.sock);
    s.write_all(&[0x5a; 16]).unwrap();
    assert_closed(&mut s, "bad option magic");
    // (c) Client flags the server did not offer.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert_closed(&mut s, "unknown client flags");
    // (d) An option that claims 4 GiB of data, then the client hangs up.
    let mut s = raw_connect(&d.sock);
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&7u32.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    v.extend_from_slice(&[0u8; 1000]);
    s.write_all(&v).unwrap();
    drop(s);
    // (e) The client hangs up in the middle of the greeting.
    drop(UnixStream::connect(&d.sock).unwrap());
    // Everyone else is still served, by a real client and by ours.
    assert_eq!(run_ok(&nbdinfo, &["--size", &d.uri()]).trim(), (4 * MIB).to_string());
    let mut ok = raw_handshake(&d.sock, "");
    assert_eq!(raw_read_roundtrip(&mut ok, 4096, 4096), vec![0u8; 4096]);
    drop(idle);
    assert_alive(&mut d);
}

#[test]
fn bad_request_magic_after_the_handshake_closes_only_that_connection() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let content = pattern(71, 4 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sock = d.sock.clone();
    let client = rt.block_on(async {
        let c = Client::connect_unix(&sock, "", true).await.expect("client connects");
        assert_eq!(c.size(), 4 * MIB as u64);
        c.write(8192, &[0x33; 4096], false).await.expect("write");
        c
    });
    // A raw connection works, then sends 28 bytes that are not a request.
    let mut s = raw_handshake(&d.sock, "");
    assert_same(&raw_read_roundtrip(&mut s, 0, 4096), &content[..4096], "raw read");
    let garbage: Vec<u8> = (0..28u8).map(|i| i.wrapping_mul(97).wrapping_add(5)).collect();
    assert_ne!(garbage[..4], REQUEST_MAGIC.to_be_bytes());
    s.write_all(&garbage).unwrap();
    assert_closed(&mut s, "bad request magic");
    // A request header whose magic is right but whose payload never comes.
    let mut s = raw_handshake(&d.sock, "");
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes()); // WRITE
    b.extend_from_slice(&9u64.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&(1u32 << 20).to_be_bytes());
    b.extend_from_slice(&[0x44; 1000]);
    s.write_all(&b).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed(&mut s, "write whose payload is cut short");
    // Half a request header, then hang up.
    let mut s = raw_handshake(&d.sock, "");
    s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    drop(s);
    // The well-behaved client on its own connection did not notice anything.
    rt.block_on(async {
        assert_eq!(client.read(8192, 4096).await.expect("read after the garbage"), vec![0x33; 4096]);
        assert_eq!(client.read(0, 4096).await.expect("read"), content[..4096].to_vec());
        client.write(0, &[0x34; 512], true).await.expect("write after the garbage");
        client.flush().await.expect("flush");
        let e = client.read(4 * MIB as u64, 1).await.expect_err("read past the end");
        assert_eq!(e.errno(), Some(22), "{e}");
        client.disconnect().await.expect("disconnect");
    });
    run_ok(&tool("nbdinfo"), &["--size", &d.uri()]);
    assert_alive(&mut d);
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[..512], &[0x34; 512][..]);
    assert!(!data[..1 << 20].windows(1000).any(|w| w.iter().all(|&b| b == 0x44)), "a cut-short write landed");
    assert_eq!(&data[8192..12288], &[0x33; 4096][..]);
}

#[test]
fn a_client_that_never_reads_its_replies_does_not_stall_other_clients() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    let content = pattern(72, 8 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    // 400 pipelined 1 MiB READs (more than the default 256 MiB buffer budget)
    // whose replies are never read.
    let mut stalled = raw_handshake(&d.sock, "");
    // The server stops reading this client once its own share of the budget is
    // held by unsent replies, so its writes may block: that is the backpressure
    // working, and the point is that only this client is held up.
    stalled.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut sent = 0;
    for i in 0..400u64 {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&i.to_be_bytes());
        b.extend_from_slice(&((i % 8) << 20).to_be_bytes());
        b.extend_from_slice(&(1u32 << 20).to_be_bytes());
        if stalled.write_all(&b).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent >= 64, "the stalled client could queue only {sent} requests");
    std::thread::sleep(Duration::from_secs(1));
    // Another client still gets its (small) read and write served.
    let mut other =
        nbdsh_cmd(&d.uri(), "cache_fua_flush", true, "").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let st = wait_timeout(&mut other, Duration::from_secs(15));
    let mut out = String::new();
    let _ = other.stdout.take().map(|mut o| o.read_to_string(&mut out));
    let stalled_others = st.is_none();
    // Whatever happened, the server recovers once the stalled client goes away.
    drop(stalled);
    run_ok(&tool("nbdinfo"), &["--size", &d.uri()]);
    nbdsh_case(&mut d, "zero_length", true);
    assert!(
        !stalled_others,
        "a client that does not read its replies stalled another connection for 15 s \
         (the shared buffer budget is held by its unsent replies):\n{out}\n{}",
        d.log_text()
    );
    assert!(st.is_some_and(|s| s.success()), "the other client failed:\n{out}");
}
