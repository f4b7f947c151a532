//! A token bucket for the copier whose rate can change at any time, plus the
//! foreground-activity signal the copier backs off on.

use crate::sync::lock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after the last foreground request the device still counts as busy.
const FOREGROUND_HOLD: Duration = Duration::from_millis(50);

pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    /// (time of last refill, available tokens). Tokens may go negative: a big
    /// take is allowed at once and paid for by waiting afterwards.
    /// `None` until first use: a fresh bucket starts empty, so a copy never
    /// starts with a burst above its rate.
    bucket: Mutex<Option<(Instant, f64)>>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> RateLimiter {
        RateLimiter { rate: AtomicU64::new(rate), bucket: Mutex::new(None) }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// How long to wait before `bytes` may be spent at `rate` (0 = unlimited).
    /// Charges the bucket when the answer is zero.
    pub fn try_take(&self, bytes: u64, rate: u64) -> Duration {
        if rate == 0 {
            return Duration::ZERO;
        }
        let mut guard = lock(&self.bucket);
        let now = Instant::now();
        // At most a quarter second of burst.
        let cap = rate as f64 / 4.0;
        let b = guard.get_or_insert((now, 0.0));
        let elapsed = now.duration_since(b.0).as_secs_f64();
        b.1 = (b.1 + elapsed * rate as f64).min(cap.max(bytes as f64));
        b.0 = now;
        if b.1 >= bytes as f64 || b.1 >= cap {
            b.1 -= bytes as f64;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((bytes as f64 - b.1).min(cap) / rate as f64)
        }
    }
}

/// Tracks foreground requests so the copier can yield to them.
#[derive(Default)]
pub struct Foreground {
    in_flight: AtomicUsize,
    last_end_ns: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

pub struct ForegroundGuard<'a>(&'a Foreground);

impl Foreground {
    fn now_ns(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }

    pub fn begin(&self) -> ForegroundGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ForegroundGuard(self)
    }

    /// True while requests are in flight or one ended very recently.
    pub fn is_active(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let last = self.last_end_ns.load(Ordering::Relaxed);
        last != 0 && self.now_ns().saturating_sub(last) < FOREGROUND_HOLD.as_nanos() as u64
    }
}

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        let ns = self.0.now_ns().max(1);
        self.0.last_end_ns.store(ns, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A sliding estimate of a byte rate over the last few seconds: the bytes
/// finished in the window, divided by the window's length — or by the time since
/// the measurement started, if that is shorter. (Dividing by the time since the
/// first sample instead would leave out the time the first bytes took, and show
/// more than was copied.)
pub struct RateMeter {
    samples: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    window: Duration,
    started: Mutex<Instant>,
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter { samples: Mutex::new(Default::default()), window, started: Mutex::new(Instant::now()) }
    }

    pub fn record(&self, bytes: u64) {
        let now = Instant::now();
        let mut s = lock(&self.samples);
        s.push_back((now, bytes));
        while s.front().is_some_and(|(t, _)| now.duration_since(*t) > self.window) {
            s.pop_front();
        }
    }

    /// Starts a new measurement (a new sync, a resumed copy).
    pub fn reset(&self) {
        lock(&self.samples).clear();
        *lock(&self.started) = Instant::now();
    }

    /// Bytes per second over the window (0 when idle for a whole window).
    pub fn rate(&self) -> f64 {
        let now = Instant::now();
        let mut s = lock(&self.samples);
        while s.front().is_some_and(|(t, _)| now.duration_since(*t) > self.window) {
            s.pop_front();
        }
        if s.is_empty() {
            return 0.0;
        }
        let total: u64 = s.iter().map(|(_, b)| b).sum();
        let since_start = now.duration_since(*lock(&self.started));
        // Never over less than a tenth of a second, so the very first piece
        // does not read as an absurd rate.
        let span = self.window.min(since_start).as_secs_f64().max(0.1);
        total as f64 / span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let r = RateLimiter::new(0);
        assert_eq!(r.try_take(1 << 30, 0), Duration::ZERO);
    }

    #[test]
    fn limited_rate_makes_takes_wait_from_the_start() {
        let r = RateLimiter::new(1 << 20);
        // A fresh bucket is empty: no burst above the rate, even at the start.
        let wait = r.try_take(256 << 10, 1 << 20);
        assert!(wait > Duration::from_millis(100), "a quarter-second's bytes must wait, got {wait:?}");
    }

    /// Granted bytes over a second never exceed the rate by more than one take.
    #[test]
    fn the_limiter_never_grants_more_than_its_rate() {
        let rate = 8u64 << 20;
        let r = RateLimiter::new(rate);
        let take = 1u64 << 20;
        let t0 = Instant::now();
        let mut granted = 0u64;
        while t0.elapsed() < Duration::from_millis(1500) {
            let w = r.try_take(take, rate);
            if w.is_zero() {
                granted += take;
            } else {
                std::thread::sleep(w.min(Duration::from_millis(20)));
            }
        }
        let allowed = rate as f64 * t0.elapsed().as_secs_f64() + take as f64;
        assert!(granted as f64 <= allowed, "granted {granted} bytes, the rate allows {allowed}");
        assert!(granted as f64 >= 0.8 * rate as f64 * 1.5, "the limiter starved the copy: {granted}");
    }

    #[test]
    fn the_meter_counts_the_time_the_first_bytes_took() {
        let m = RateMeter::new(Duration::from_secs(3));
        m.reset();
        std::thread::sleep(Duration::from_millis(400));
        // 4 MiB finished after 0.4 s: 10 MiB/s, not "4 MiB over no time".
        m.record(4 << 20);
        let rate = m.rate();
        assert!(rate < 11.0 * (1 << 20) as f64 && rate > 9.0 * (1 << 20) as f64, "rate {rate}");
    }

    #[test]
    fn foreground_is_active_while_in_flight_and_shortly_after() {
        let f = Foreground::default();
        assert!(!f.is_active());
        let g = f.begin();
        assert!(f.is_active());
        drop(g);
        assert!(f.is_active(), "still warm right after");
    }
}
