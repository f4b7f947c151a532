//! Interoperability with QEMU's NBD client (qemu-io, qemu-img).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;

#[test]
fn qemu_io_patterns_unaligned_and_boundaries() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 8 << 20);
    let d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let q = tool("qemu-io");
    let uri = d.uri();
    let out = run_ok(
        &q,
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "write -P 0xa5 4095 3", // straddles a 4K boundary
            "-c",
            "write -P 0x11 8388607 1", // the very last byte
            "-c",
            "read -P 0x5a 0 4095",
            "-c",
            "read -P 0xa5 4095 3",
            "-c",
            "read -P 0x5a 4098 61438",
            "-c",
            "read -P 0x11 8388607 1",
            "-c",
            "read -P 0 65536 65536",
            "-c",
            "write -z 1000 5000",
            "-c",
            "read -P 0 1000 5000",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // Past the end: refused, and the connection stays usable.
    let out = run(&q, &["-f", "raw", &uri, "-c", "read 8388607 2", "-c", "read -P 0x11 8388607 1"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("read 1/1 bytes"), "{text}");
    assert_eq!(d.state(), "serving");
    // The bytes really are on the image.
    let data = std::fs::read(&img).unwrap();
    assert!(data[..1000].iter().all(|&b| b == 0x5a));
    assert!(data[1000..6000].iter().all(|&b| b == 0), "write -z zeroed its range");
    assert!(data[6000..65536].iter().all(|&b| b == 0x5a));
    assert_eq!(data[8388607], 0x11);
}

#[test]
fn qemu_img_info_and_convert_both_ways() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    let content = pattern(7, 6 << 20);
    make_image(&img, &content);
    let mut d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let qi = tool("qemu-img");
    let info =
        run_ok(&qi, &["info", "--output=json", "--image-opts", &format!("driver=nbd,path={}", d.sock.display())]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 6 << 20);
    // NBD -> file
    let out = dir.path().join("out.raw");
    run_ok(&qi, &["convert", "-f", "raw", "-O", "raw", &d.uri(), out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), content);
    // file -> NBD (qemu-img writes, zero-detects and flushes through us)
    let other = pattern(8, 6 << 20);
    let src2 = dir.path().join("src2.raw");
    make_image(&src2, &other);
    run_ok(&qi, &["convert", "-n", "-f", "raw", "-O", "raw", src2.to_str().unwrap(), &d.uri()]);
    assert_eq!(d.stop().code(), Some(0));
    assert_eq!(std::fs::read(&img).unwrap(), other);
}

/// qemu 10's client negotiates extended headers by itself: its trace shows
/// the ACK, 64-bit block status replies, and the writes land.
#[test]
fn qemu_negotiates_extended_headers_and_gets_block_status_ext() {
    let dir = scratch();
    let img = dir.path().join("s.img");
    make_sparse(&img, 16 << 20);
    let d = Daemon::start(dir.path(), &["--source", img.to_str().unwrap()]);
    let uri = d.uri();
    let out = run(
        &tool("qemu-io"),
        &[
            "--trace",
            "nbd_receive_option_reply",
            "--trace",
            "nbd_receive_reply_chunk_header",
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x3c 1M 3M",
            "-c",
            "read -P 0x3c 1M 3M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
        ],
    );
    let t = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !t.contains("Pattern verification failed"), "{t}");
    assert!(t.contains("option reply 11 (extended headers), type 1 (ack)"), "no extended headers:\n{t}");
    let map = run(
        &tool("qemu-img"),
        &["--trace", "nbd_receive_reply_chunk_header", "map", "--output=json", "-f", "raw", &uri],
    );
    let t = format!("{}{}", String::from_utf8_lossy(&map.stdout), String::from_utf8_lossy(&map.stderr));
    assert!(map.status.success(), "{t}");
    assert!(t.contains("type = 6 (block status (64-bit))"), "no BLOCK_STATUS_EXT:\n{t}");
    assert!(t.contains("\"data\": true"), "the written range is data:\n{t}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0x3c));
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(data[(2 << 20) + 65536..4 << 20].iter().all(|&b| b == 0x3c));
}
