//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

/// `len` bytes of a deterministic pseudo-random pattern (xorshift).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
