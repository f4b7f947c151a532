//! Range locks: the per-request cost when uncontended, and throughput when two
//! threads hammer overlapping ranges with an occasional exclusive (copier-like)
//! holder.
#![allow(clippy::unwrap_used)] // benchmark setup: a panic is a failed run
use criterion::{criterion_group, criterion_main, Criterion};
use engine::locks::{LockMode, RangeLocks};
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Spins a lock future to completion (the benches never park).
fn acquire(l: &RangeLocks, r: std::ops::Range<u64>, m: LockMode) -> engine::locks::RangeGuard {
    let mut f = pin!(l.lock(r, m));
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(g) = f.as_mut().poll(&mut cx) {
            return g;
        }
        std::hint::spin_loop();
    }
}

fn locks(c: &mut Criterion) {
    let l = RangeLocks::new();
    // Typical load: some locks already held elsewhere.
    let held: Vec<_> = (0..32).map(|i| acquire(&l, i * 1_000_000..i * 1_000_000 + 4096, LockMode::Shared)).collect();
    c.bench_function("lock+unlock shared 4K, 32 others held", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            drop(acquire(&l, black_box(i * 8192 % (1 << 30)..i * 8192 % (1 << 30) + 4096), LockMode::Shared))
        })
    });
    drop(held);
    c.bench_function("contended: 2 threads, 1 in 64 exclusive", |b| {
        b.iter_custom(|iters| {
            let l = RangeLocks::new();
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let l = l.clone();
                    s.spawn(move || {
                        for i in 0..iters {
                            let off = (i * 4096 + t * 2048) % (1 << 20);
                            let m = if i % 64 == 0 { LockMode::Exclusive } else { LockMode::Shared };
                            drop(acquire(&l, off..off + 4096, m));
                        }
                    });
                }
            });
            start.elapsed() / 2
        })
    });
    let _ = Duration::ZERO;
}

criterion_group!(benches, locks);
criterion_main!(benches);
