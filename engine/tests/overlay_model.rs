//! A property test of the copy-on-write overlay (backend/overlay/) against a
//! byte model: random sequences of writes (any offset and length), zeroing,
//! trims, flushes and reopenings (a crash: the device is dropped without a
//! flush and opened again from its file) must always read back as the model
//! says, never touch the base image, and with a limit refuse exactly the
//! writes whose new chunks do not fit (counting what the file really holds).
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use engine::backend::{LockMode, OverlayDevice, OverlayOptions};
use engine::{rt, Backend, IoBuf, OpenOptions, SharedBuf};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20; // 256 chunks
const CHUNK: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64 },
    Trim { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(40_000)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        2 => range.prop_map(|(off, len)| Op::Trim { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(((off + i) % 251) as u8).wrapping_mul(3) | 1).collect()
}

/// What the model says the overlay file holds data for.
#[derive(Default)]
struct Held {
    /// Chunks the overlay holds (reads come from it).
    present: BTreeSet<u64>,
    /// Of those, chunks with data in the file (not holes).
    data: BTreeSet<u64>,
}

impl Held {
    fn chunks(off: u64, len: u64) -> std::ops::Range<u64> {
        off / CHUNK..(off + len).div_ceil(CHUNK)
    }

    /// Chunks a write would need space for.
    fn needs(&self, off: u64, len: u64) -> u64 {
        Self::chunks(off, len).filter(|c| !self.data.contains(c)).count() as u64
    }

    fn write(&mut self, off: u64, len: u64) {
        for c in Self::chunks(off, len) {
            self.present.insert(c);
            self.data.insert(c);
        }
    }

    /// Zeroing: whole chunks become holes; partial ones are written (unless a
    /// hole already). Returns the chunks the partial edges need.
    fn zero_needs(&self, off: u64, len: u64) -> u64 {
        let end = off + len;
        Self::chunks(off, len)
            .filter(|&c| {
                let whole = c * CHUNK >= off && ((c + 1) * CHUNK).min(SIZE) <= end;
                let hole = self.present.contains(&c) && !self.data.contains(&c);
                !whole && !hole && !self.data.contains(&c)
            })
            .count() as u64
    }

    fn zero(&mut self, off: u64, len: u64) {
        let end = off + len;
        for c in Self::chunks(off, len) {
            let whole = c * CHUNK >= off && ((c + 1) * CHUNK).min(SIZE) <= end;
            let hole = self.present.contains(&c) && !self.data.contains(&c);
            self.present.insert(c);
            if whole {
                self.data.remove(&c);
            } else if !hole {
                self.data.insert(c);
            }
        }
    }
}

fn open(image: &Path, overlay: &Path, limit: Option<u64>) -> Backend {
    let base =
        Backend::open(image, &OpenOptions { writable: false, cache: engine::CacheMode::Auto, lock: LockMode::None })
            .unwrap();
    let o = OverlayDevice::open(base, &OverlayOptions { path: overlay.to_path_buf(), limit }).unwrap();
    Backend::Overlay(Box::new(o))
}

fn occupied(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn run(ops: Vec<Op>, limit_chunks: Option<u64>) {
    let dir = tempfile::Builder::new().prefix("lmovl").tempdir_in("/dev/shm").unwrap();
    let image = dir.path().join("image");
    let overlay = dir.path().join("overlay");
    let original: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&image, &original).unwrap();
    // Header and map: 4 KiB each for 256 chunks.
    let meta = 8192;
    let limit = limit_chunks.map(|n| meta + n * CHUNK);
    let mut model = original.clone();
    let mut held = Held::default();
    rt::block_on(async {
        let mut dev = Some(open(&image, &overlay, limit));
        for (i, op) in ops.iter().enumerate() {
            let d = dev.as_ref().unwrap();
            match op.clone() {
                Op::Write { off, len, seed } => {
                    let data = fill(seed, off, len);
                    let buf = SharedBuf::new(IoBuf::from_slice(&data));
                    let fits = limit_chunks.is_none_or(|n| held.data.len() as u64 + held.needs(off, len) <= n);
                    let res = d.write_at(&buf, 0, len as usize, off, seed % 5 == 0).await;
                    if fits {
                        res.unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        held.write(off, len);
                    } else {
                        let e = res.expect_err(&format!("op {i} {op:?} does not fit and must be refused"));
                        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "op {i}: {e}");
                    }
                }
                Op::Zero { off, len } | Op::Trim { off, len } => {
                    let fits = limit_chunks.is_none_or(|n| held.data.len() as u64 + held.zero_needs(off, len) <= n);
                    let res = if matches!(op, Op::Zero { .. }) {
                        d.write_zeroes(off, len, false, false).await
                    } else {
                        d.discard(off, len).await
                    };
                    if fits {
                        res.unwrap_or_else(|e| panic!("op {i} {op:?}: {e}"));
                        model[off as usize..(off + len) as usize].fill(0);
                        held.zero(off, len);
                    } else {
                        let e = res.expect_err(&format!("op {i} {op:?}: its edges do not fit and must be refused"));
                        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "op {i}: {e}");
                    }
                }
                Op::Flush => d.flush().await.unwrap(),
                Op::Reopen => {
                    // A crash: dropped with no flush, opened again from the file.
                    drop(dev.take());
                    dev = Some(open(&image, &overlay, limit));
                }
            }
            if let Some(n) = limit_chunks {
                assert!(occupied(&overlay) <= meta + n * CHUNK, "op {i}: the file exceeds the limit");
            }
            assert_eq!(occupied(&overlay), meta + held.data.len() as u64 * CHUNK, "op {i} {op:?}: space count");
        }
        let d = dev.as_ref().unwrap();
        let buf = SharedBuf::new(IoBuf::new(SIZE as usize));
        d.read_at(&buf, 0, SIZE as usize, 0).await.unwrap();
        let Ok(got) = SharedBuf::into_inner(buf) else { panic!("buffer still shared") };
        if let Some(at) = got.as_slice().iter().zip(&model).position(|(a, b)| a != b) {
            panic!("byte {at} differs from the model after {} ops", ops.len());
        }
        // A few unaligned reads across held and base chunks.
        for (off, len) in [(1u64, 5000usize), (4095, 2), (200_000, 70_000), (SIZE - 3, 3)] {
            let b = SharedBuf::new(IoBuf::new(len));
            d.read_at(&b, 0, len, off).await.unwrap();
            let Ok(b) = SharedBuf::into_inner(b) else { panic!("buffer still shared") };
            assert!(b.as_slice() == &model[off as usize..off as usize + len], "read {off}+{len}");
        }
    })
    .unwrap();
    assert!(std::fs::read(&image).unwrap() == original, "the base image was written");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_overlay_follows_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, None);
    }

    #[test]
    fn the_limit_refuses_exactly_what_does_not_fit(ops in proptest::collection::vec(op(), 1..40), n in 4u64..40) {
        run(ops, Some(n));
    }
}

#[test]
fn reading_while_writing_never_sees_a_chunk_half_from_the_base() {
    // Four tasks rewrite whole chunks while four read them: every read of a
    // chunk is all old or all new (the map bit is set after the data).
    let dir = tempfile::Builder::new().prefix("lmovl").tempdir_in("/dev/shm").unwrap();
    let image = dir.path().join("image");
    std::fs::write(&image, vec![0x11u8; SIZE as usize]).unwrap();
    rt::block_on(async {
        let d = Arc::new(open(&image, &dir.path().join("overlay"), None));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let d = d.clone();
            tasks.push(tokio::task::spawn_local(async move {
                for i in 0..200u64 {
                    let c = (i * 7 + t * 13) % (SIZE / CHUNK);
                    if t < 4 {
                        let buf = SharedBuf::new(IoBuf::from_slice(&[0x22; CHUNK as usize]));
                        d.write_at(&buf, 0, CHUNK as usize, c * CHUNK, false).await.unwrap();
                    } else {
                        let buf = SharedBuf::new(IoBuf::new(CHUNK as usize));
                        d.read_at(&buf, 0, CHUNK as usize, c * CHUNK).await.unwrap();
                        let Ok(b) = SharedBuf::into_inner(buf) else { panic!("buffer still shared") };
                        let first = b.as_slice()[0];
                        assert!(b.as_slice().iter().all(|&x| x == first), "chunk {c} read half old, half new");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    })
    .unwrap();
}
