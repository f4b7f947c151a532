//! `livemirror bench`: never writes the source, writes the target only with
//! --force, and recommends flags from what it measured.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::*;
use std::process::Command;

#[test]
fn bench_needs_force_never_writes_the_source_and_recommends_flags() {
    let dir = scratch_shm();
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let data = pattern(21, 8 << 20);
    make_image(&src, &data);
    make_image(&tgt, &pattern(22, 8 << 20));
    let bench = |extra: &[&str]| {
        Command::new(bin())
            .args([
                "bench",
                "--source",
                src.to_str().unwrap(),
                "--target",
                tgt.to_str().unwrap(),
                "--cache",
                "buffered",
            ])
            .args(extra)
            .output()
            .expect("run bench")
    };
    let out = bench(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(std::fs::read(&tgt).unwrap() == pattern(22, 8 << 20), "the target was written without --force");

    let out = bench(&[
        "--force",
        "--region-sizes",
        "64K,1M",
        "--queue-depths",
        "1,4",
        "--copy-chunks",
        "1M",
        "--bytes",
        "4M",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let rows = text.lines().filter(|l| l.split_whitespace().next().is_some_and(|w| w.parse::<f64>().is_ok())).count();
    assert_eq!(rows, 4, "one row per run:\n{text}");
    assert!(text.contains("recommended: --region-size"), "{text}");
    assert!(std::fs::read(&src).unwrap() == data, "bench changed the source");
    let t = std::fs::read(&tgt).unwrap();
    assert!(t[..4 << 20] == data[..4 << 20], "the target holds the copied prefix");

    let out = bench(&[
        "--force",
        "--bytes",
        "1M",
        "--region-sizes",
        "64K",
        "--queue-depths",
        "2",
        "--copy-chunks",
        "1M",
        "--json",
    ]);
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON run");
    assert_eq!(v["bytes"], 1 << 20);
    assert_eq!(v["queue_depth"], 2);
}
