//! One 4 KiB request over a Unix socket through the whole stack (client
//! encode, server parse/validate, engine, io_uring on a tmpfs file, reply) at
//! queue depth 1: the per-request latency floor.
#![allow(clippy::unwrap_used)] // benchmark setup: a panic is a failed run
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::rt::Worker;
use engine::{Backend, Mirror, MirrorConfig, OpenOptions};
use nbd_frontend::{ListenAddr, Listener, Server, ServerConfig};
use test_support::client::Client;

fn roundtrip(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir");
    let img = dir.path().join("s.img");
    std::fs::write(&img, vec![7u8; 64 << 20]).expect("image");
    let sock = dir.path().join("nbd.sock");
    let worker = Arc::new(Worker::spawn("bench-io").expect("worker"));
    let mirror = {
        let img = img.clone();
        engine::rt::block_on(async move {
            let s = Backend::open(&img, &OpenOptions::default()).expect("open");
            Mirror::new(s, MirrorConfig::default()).expect("mirror")
        })
        .expect("runtime")
    };
    let server = Server::new(mirror, ServerConfig::default(), vec![worker.clone()]);
    let listener = Listener::bind(&ListenAddr::Unix(sock.clone())).expect("listen");
    let s2 = server.clone();
    worker.run(move || async move { s2.accept_loop(listener).await }).expect("accept loop");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let client = rt.block_on(Client::connect_unix(&sock, "", true)).expect("connect");
    let data = vec![1u8; 4096];
    let mut g = c.benchmark_group("nbd 4K round trip QD1 (unix socket)");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % 16384;
            rt.block_on(client.read(i * 4096, 4096)).expect("read")
        })
    });
    g.bench_function("write", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % 16384;
            rt.block_on(client.write(i * 4096, &data, false)).expect("write")
        })
    });
    g.finish();
    drop(client);
    rt.block_on(server.shutdown(std::time::Duration::from_secs(5)));
}

criterion_group!(benches, roundtrip);
criterion_main!(benches);
