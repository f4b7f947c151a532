//! fio's NBD engine (libnbd) against the daemon: many connections, deep queues,
//! data verified by fio itself (crc32c/md5 headers in every block).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

const MIB: usize = 1 << 20;

fn assert_serving(d: &mut Daemon) {
    if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
        panic!("livemirror exited ({st}):\n{}", d.log_text());
    }
    assert_eq!(d.state(), "serving", "{}", d.log_text());
}

/// Four jobs (four connections), each owning a 32 MiB slice, queue depth 32,
/// random block sizes; every block carries a crc32c header that fio checks.
const VERIFY_JOB: &[&str] = &[
    "--name=verify",
    "--rw=randwrite",
    "--bsrange=4k-128k",
    "--size=32M",
    "--offset_increment=32M",
    "--numjobs=4",
    "--iodepth=32",
    "--verify=crc32c",
    "--verify_fatal=1",
];

#[test]
fn fio_random_writes_verified_with_crc32c_4_jobs_qd32() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    make_sparse(&img, 128 << 20);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    // Verification interleaved with the writes (every 256 blocks), four passes.
    let mut args = VERIFY_JOB.to_vec();
    args.extend_from_slice(&["--verify_backlog=256", "--loops=4"]);
    let r = fio(dir.path(), &d.uri(), &args);
    r.assert_clean(&d, 4);
    let written = r.sum("write", "io_bytes");
    assert_eq!(written, 4 * 4 * 32 * MIB as u64, "every job wrote its slice four times\n{}", r.log);
    assert_eq!(r.sum("read", "io_bytes"), written, "every written block was read back and verified\n{}", r.log);
    assert_serving(&mut d);

    // The data is really on the image: after a clean restart fio re-reads and
    // re-verifies every block of the last pass.
    assert_eq!(d.stop().code(), Some(0));
    d.restart(&["--source", img.to_str().unwrap()]);
    let mut args = VERIFY_JOB.to_vec();
    args.push("--verify_only");
    let r = fio(dir.path(), &d.uri(), &args);
    r.assert_clean(&d, 4);
    assert_eq!(r.sum("read", "io_bytes"), 4 * 32 * MIB as u64, "{}", r.log);

    // And the check has teeth: one flipped byte on the image is caught.
    assert_eq!(d.stop().code(), Some(0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let off = 40 * MIB as u64 + 777;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off).unwrap();
        f.write_all_at(&[!b[0]], off).unwrap();
    }
    d.restart(&["--source", img.to_str().unwrap()]);
    let r = fio(dir.path(), &d.uri(), &args);
    assert!(!r.status.success(), "fio did not notice a corrupted byte:\n{}", r.log);
    assert!(r.jobs().iter().any(|j| j["error"] != 0), "no job reports the corruption:\n{}", r.log);
    assert_serving(&mut d);
}

#[test]
fn fio_mixed_random_read_write_with_verify_backlog_for_three_seconds() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    make_image(&img, &pattern(81, 128 * MIB));
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let r = fio(
        dir.path(),
        &d.uri(),
        &[
            "--name=mixed",
            "--rw=randrw",
            "--rwmixread=50",
            // Unaligned small blocks up to large ones (minimum block size is 1).
            "--bssplit=512/10:4k/50:64k/30:1M/10",
            "--size=32M",
            "--offset_increment=32M",
            "--numjobs=4",
            "--iodepth=32",
            "--verify=crc32c",
            "--verify_backlog=64",
            "--verify_fatal=1",
            "--time_based",
            "--runtime=3",
        ],
    );
    r.assert_clean(&d, 4);
    for j in r.jobs() {
        assert!(j["write"]["io_bytes"].as_u64().unwrap_or(0) > 0, "job wrote nothing: {}", r.log);
        assert!(j["read"]["io_bytes"].as_u64().unwrap_or(0) > 0, "job read nothing: {}", r.log);
    }
    assert_serving(&mut d);
}

#[test]
fn fio_sequential_writes_with_flushes_alongside_random_trims() {
    let dir = scratch_shm();
    let img = dir.path().join("s.img");
    let content = pattern(82, 64 * MIB);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap(), "--region-size", "64K"]);
    let r = fio(
        dir.path(),
        &d.uri(),
        &[
            // Sequential 1 MiB writes with a flush every 4, md5-verified, on
            // the first 32 MiB ...
            "--name=seq",
            "--rw=write",
            "--bs=1M",
            "--size=32M",
            "--offset=0",
            "--iodepth=8",
            "--fsync=4",
            "--verify=md5",
            "--verify_fatal=1",
            // ... while another connection trims every 64K region of the rest.
            "--name=trim",
            "--rw=randtrim",
            "--bs=64k",
            "--size=32M",
            "--offset=32M",
            "--iodepth=16",
        ],
    );
    r.assert_clean(&d, 2);
    let seq = r.jobs().iter().find(|j| j["jobname"] == "seq").expect("seq job");
    let trim = r.jobs().iter().find(|j| j["jobname"] == "trim").expect("trim job");
    assert_eq!(seq["write"]["io_bytes"], 32 * MIB as u64, "{}", r.log);
    assert_eq!(seq["read"]["io_bytes"], 32 * MIB as u64, "verify read everything back\n{}", r.log);
    assert!(seq["sync"]["total_ios"].as_u64().unwrap_or(0) > 0, "no flushes were sent\n{}", r.log);
    assert_eq!(trim["trim"]["io_bytes"], 32 * MIB as u64, "{}", r.log);
    assert_serving(&mut d);
    assert_eq!(d.stop().code(), Some(0));
    let data = std::fs::read(&img).unwrap();
    assert_ne!(&data[..MIB], &content[..MIB], "the sequential writes are not on the image");
    assert!(data[32 * MIB..].iter().all(|&b| b == 0), "trimmed regions do not read back as zeroes");
}
