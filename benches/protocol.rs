//! NBD wire work per request: header decode + validation, reply encoding, and
//! a whole fixed-newstyle negotiation.
#![allow(clippy::unwrap_used)] // benchmark setup: a panic is a failed run
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nbd_frontend::handshake::{Export, Handshake, Progress};
use nbd_frontend::proto::*;
use nbd_frontend::request::{validate, Session};
use std::hint::black_box;

fn requests(c: &mut Criterion) {
    let s = Session {
        structured: true,
        extended: false,
        base_allocation: Some(1),
        read_only: false,
        flags: u16::MAX,
        max_payload: MAX_PAYLOAD,
    };
    let h = RequestHeader { flags: CMD_FLAG_FUA, kind: CMD_WRITE, cookie: 77, offset: 1 << 30, len: 4096 }.encode();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse+validate", |b| {
        b.iter(|| {
            let hdr = RequestHeader::parse(black_box(&h)).ok();
            hdr.map(|hdr| validate(&hdr.into(), &s, 1 << 40))
        })
    });
    g.bench_function("encode simple reply", |b| b.iter(|| simple_reply(0, black_box(77))));
    g.bench_function("encode data chunk header", |b| {
        b.iter(|| chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, black_box(77), 4104))
    });
    g.finish();
}

fn option(o: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn handshake(c: &mut Criterion) {
    let export = Export {
        name: String::new(),
        description: "bench".into(),
        size: 1 << 30,
        read_only: false,
        fast_zero: true,
        block: BlockSizes::default(),
    };
    let mut client = 3u32.to_be_bytes().to_vec();
    client.extend(option(OPT_STRUCTURED_REPLY, &[]));
    let mut q = 0u32.to_be_bytes().to_vec();
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
    q.extend_from_slice(BASE_ALLOCATION.as_bytes());
    client.extend(option(OPT_SET_META_CONTEXT, &q));
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    client.extend(option(OPT_GO, &go));
    c.bench_function("handshake/GO with structured replies and base:allocation", |b| {
        b.iter_batched(
            || Handshake::new(vec![export.clone()]),
            |mut hs| {
                let p = hs.feed(black_box(&client));
                assert!(matches!(p, Ok(Progress::Done(_))));
                hs.take_output()
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, requests, handshake);
criterion_main!(benches);
