//! Request counters for monitoring (`livemirror serve --metrics`).
//!
//! Every request adds to a handful of relaxed atomics of its command: count,
//! errors, bytes, the sum of its latencies and one histogram bucket. No lock
//! and no allocation on the request path; readers (a metrics scrape) take a
//! snapshot that may be a few requests apart between fields, which is all a
//! counter scrape promises anyway.
//!
//! Latency is measured from the moment the request header has been parsed to
//! the moment its reply is queued for the socket: the server's own time,
//! without the client's or the network's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::proto::*;

/// The commands counted apart, in the order of [`Stats::command`]'s index.
pub const COMMANDS: [&str; 8] = ["read", "write", "flush", "trim", "cache", "write_zeroes", "block_status", "other"];

/// Upper bounds of the latency histogram's buckets, in microseconds (a last
/// bucket, +Inf, takes the rest). From a 4K request on RAM (tens of µs) to a
/// FLUSH behind a slow disk (seconds).
pub const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// The counters of one command. The request count is the sum of the buckets
/// (one atomic add fewer per request).
#[derive(Default)]
pub(crate) struct CommandStats {
    errors: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

/// A consistent-enough copy of one command's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSnapshot {
    /// Requests finished.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Bytes read or written.
    pub bytes: u64,
    /// The sum of their latencies.
    pub nanos: u64,
    /// Per bucket (not cumulative), the last one being +Inf.
    pub buckets: Vec<u64>,
}

/// Server-wide counters. One per [`crate::Server`], shared by its connections.
#[derive(Default)]
pub struct Stats {
    commands: [CommandStats; COMMANDS.len()],
    /// Connections handed to a worker (clients and kernel sockets).
    pub connections_accepted: AtomicU64,
    /// Connections closed at accept because `max_connections` were served.
    pub connections_refused: AtomicU64,
    /// Sockets handed to the kernel in place of dead ones (RECONFIGURE): after
    /// a daemon restart, and whenever the kernel reports a dead connection.
    pub kernel_reconnects: AtomicU64,
}

/// The index in [`COMMANDS`] of an NBD command type.
pub(crate) fn command_index(kind: u16) -> usize {
    match kind {
        CMD_READ => 0,
        CMD_WRITE => 1,
        CMD_FLUSH => 2,
        CMD_TRIM => 3,
        CMD_CACHE => 4,
        CMD_WRITE_ZEROES => 5,
        CMD_BLOCK_STATUS => 6,
        _ => 7,
    }
}

impl Stats {
    /// Counts one finished request of NBD command type `kind`.
    #[inline]
    pub(crate) fn record(&self, kind: u16, bytes: u64, started: Instant, ok: bool) {
        let c = &self.commands[command_index(kind)];
        let nanos = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let us = nanos / 1000;
        let bucket = BUCKETS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS_US.len());
        if !ok {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if bytes > 0 {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        c.nanos.fetch_add(nanos, Ordering::Relaxed);
        c.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of command `COMMANDS[i]`.
    pub fn command(&self, i: usize) -> CommandSnapshot {
        let Some(c) = self.commands.get(i) else { return CommandSnapshot::default() };
        let buckets: Vec<u64> = c.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        CommandSnapshot {
            requests: buckets.iter().sum(),
            errors: c.errors.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            nanos: c.nanos.load(Ordering::Relaxed),
            buckets,
        }
    }

    /// Reads one of the connection counters.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_land_in_their_command_and_bucket() {
        let s = Stats::default();
        let now = Instant::now();
        s.record(CMD_READ, 4096, now, true);
        s.record(CMD_READ, 4096, now, false);
        s.record(CMD_WRITE_ZEROES, 0, now, true);
        s.record(99, 0, now, false);
        let slow = now.checked_sub(Duration::from_secs(20)).unwrap_or(now);
        s.record(CMD_FLUSH, 0, slow, true);
        let r = s.command(0);
        assert_eq!((r.requests, r.errors, r.bytes), (2, 1, 8192));
        assert_eq!(r.buckets.iter().sum::<u64>(), 2);
        assert_eq!(s.command(5).requests, 1);
        assert_eq!(s.command(7).errors, 1);
        let f = s.command(2);
        assert_eq!(f.buckets.last(), Some(&1), "20 s is past the last bound: {f:?}");
        assert!(f.nanos >= 20_000_000_000);
        assert_eq!(s.command(1), CommandSnapshot { buckets: vec![0; BUCKETS_US.len() + 1], ..Default::default() });
    }
}
