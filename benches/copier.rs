//! The copier, tmpfs to tmpfs, across region sizes and queue depths: the time
//! from attach to synced for a 128 MiB image (random data, so no zero skipping).
#![allow(clippy::unwrap_used)] // benchmark setup: a panic is a failed run
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::{rt, Backend, DeviceState, Mirror, MirrorConfig, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

const SIZE: u64 = 128 << 20;

fn sync_once(src: &Path, tgt: &Path, region: u64, qd: usize) -> Duration {
    std::fs::File::create(tgt).and_then(|f| f.set_len(SIZE)).expect("target");
    let out = rt::block_on(async {
        let s = Backend::open(src, &OpenOptions::default()).expect("source");
        let cfg = MirrorConfig { region_size: region, queue_depth: qd, min_rate: 0, ..Default::default() };
        let m = Mirror::new(s, cfg).expect("mirror");
        let t0 = Instant::now();
        m.attach(tgt).await.expect("attach");
        while m.state() != DeviceState::Synced {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let took = t0.elapsed();
        m.shutdown().await.expect("shutdown");
        took
    });
    out.expect("runtime")
}

fn copier(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
    let src = dir.path().join("s.img");
    let tgt = dir.path().join("t.img");
    let mut data = vec![0u8; SIZE as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&src, &data).expect("source");
    let mut g = c.benchmark_group("copier tmpfs->tmpfs 128MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE));
    for region in [64u64 << 10, 1 << 20, 4 << 20] {
        for qd in [1usize, 4, 8, 16] {
            let id = BenchmarkId::new(format!("region {}K", region >> 10), format!("qd {qd}"));
            g.bench_with_input(id, &(region, qd), |b, &(region, qd)| {
                b.iter_custom(|iters| (0..iters).map(|_| sync_once(&src, &tgt, region, qd)).sum())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, copier);
criterion_main!(benches);
