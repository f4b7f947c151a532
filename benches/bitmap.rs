//! The region bitmap at 1 TiB / 64 KiB = 16 Mi regions: finding the next dirty
//! run when almost everything is clean (the copier's last pass), and the clean
//! runs of a write (every write-through while syncing).
#![allow(clippy::unwrap_used)] // benchmark setup: a panic is a failed run
use criterion::{criterion_group, criterion_main, Criterion};
use engine::regions::RegionMap;
use std::hint::black_box;

fn bitmap(c: &mut Criterion) {
    let mut m = RegionMap::new(1 << 40, 16);
    let n = m.len();
    m.set_clean(0..n, true);
    // A few scattered dirty regions, as after writes raced a nearly done copy.
    let dirty: Vec<usize> = (0..64).map(|i| (i * 2_654_435_761usize) % n).collect();
    for &d in &dirty {
        m.set_clean(d..d + 1, false);
    }
    let mut g = c.benchmark_group("bitmap 16Mi regions");
    g.bench_function("next dirty run, whole scan", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut found = 0;
            while let Some(r) = m.next_dirty_run(black_box(at), 16) {
                found += 1;
                at = r.end;
            }
            found
        })
    });
    g.bench_function("next dirty run from a random start", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7_919) % n;
            m.next_dirty_run(black_box(i), 16)
        })
    });
    g.bench_function("clean runs of a 1 MiB write", |b| b.iter(|| m.clean_byte_runs(black_box(123 << 20), 1 << 20)));
    g.finish();
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
