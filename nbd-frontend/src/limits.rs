//! What one connection may hold, so that no client can hurt the others.
//!
//! - **Requests:** at most `max_requests` per connection are between "header
//!   read" and "reply written to the socket". When they are all taken the
//!   connection stops reading its socket: a client that pipelines without
//!   reading its replies (or sends a flood of bad requests) stalls only itself,
//!   and the reply queue stays bounded.
//! - **Payload bytes:** each connection has a small reserve of its own
//!   (`reserve` bytes) that no other connection can touch, and may hold up to
//!   `shared_cap` bytes of the server-wide budget on top. Small requests of an
//!   honest client are served from its reserve whatever the others hold; a
//!   connection that holds its cap waits for its own replies to drain.
//! - **Write payloads** are charged as their bytes arrive, in pieces, so a client
//!   that sends a 32 MiB header and then stops holds only what it sent.
//! - **Stalls:** a payload that stops arriving, or replies the peer stops
//!   reading, for `stall_timeout` drop the connection (see transmission/).
//!
//! Memory held for payloads is therefore at most the server budget plus one
//! reserve per connection.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use engine::{BudgetCharge, BufPool};
use tokio::sync::Notify;

/// Budget accounting granule.
const GRANULE: usize = 4096;

/// Per-connection limits (server flags: `--max-requests`, `--connection-budget`,
/// `--connection-reserve`, `--stall-timeout`).
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Requests read and not yet answered, per connection.
    pub max_requests: usize,
    /// Bytes of the shared budget one connection may hold.
    pub shared_cap: usize,
    /// Bytes each connection may always use, outside the shared budget.
    pub reserve: usize,
    /// A payload or reply that makes no progress for this long drops the connection.
    pub stall_timeout: Duration,
}

impl ConnLimits {
    /// `--max-requests`'s default.
    pub const DEFAULT_MAX_REQUESTS: usize = 128;
    const DEFAULT_RESERVE: usize = 1 << 20;
    const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

    /// The defaults for a server budget of `budget` bytes: a quarter of it per
    /// connection, but never less than two maximum payloads.
    pub fn for_budget(budget: usize) -> ConnLimits {
        ConnLimits {
            max_requests: Self::DEFAULT_MAX_REQUESTS,
            shared_cap: (budget / 4).max(2 * crate::proto::MAX_PAYLOAD as usize),
            reserve: Self::DEFAULT_RESERVE,
            stall_timeout: Self::DEFAULT_STALL_TIMEOUT,
        }
    }
}

impl ConnLimits {
    /// The largest READ or WRITE payload a connection can always be granted
    /// with a server budget of `budget` bytes: what the server advertises.
    pub(crate) fn largest_payload(&self, budget: usize) -> u32 {
        let reserve = self.reserve / GRANULE * GRANULE;
        let cap = self.shared_cap.min(budget).max(reserve);
        u32::try_from(cap).unwrap_or(u32::MAX).min(crate::proto::MAX_PAYLOAD)
    }
}

/// Request slots of one connection.
pub(crate) struct Slots {
    free: Cell<usize>,
    released: Notify,
}

impl Slots {
    pub(crate) fn new(n: usize) -> Rc<Slots> {
        Rc::new(Slots { free: Cell::new(n.max(1)), released: Notify::new() })
    }

    /// Waits for a free slot.
    pub(crate) async fn take(self: &Rc<Self>) -> SlotGuard {
        loop {
            // Registered before the check: a release between the check and the
            // await still wakes us (single-threaded, but the order documents it).
            let released = self.released.notified();
            if self.free.get() > 0 {
                self.free.set(self.free.get() - 1);
                return SlotGuard(self.clone());
            }
            released.await;
        }
    }
}

/// One taken request slot; given back when the reply has been written (or
/// dropped with the connection).
pub(crate) struct SlotGuard(Rc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.free.set(self.0.free.get() + 1);
        self.0.released.notify_one();
    }
}

/// The payload bytes one connection holds: its reserve and its share of the
/// server budget.
pub(crate) struct ConnBudget {
    pool: BufPool,
    reserve_free: Cell<usize>,
    shared_held: Cell<usize>,
    shared_cap: usize,
    released: Notify,
}

/// Bytes charged to a connection; given back on drop.
pub(crate) struct Charge {
    budget: Rc<ConnBudget>,
    reserve: usize,
    shared: Option<BudgetCharge>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let b = &self.budget;
        b.reserve_free.set(b.reserve_free.get() + self.reserve);
        if let Some(s) = self.shared.take() {
            b.shared_held.set(b.shared_held.get() - s.bytes());
        }
        b.released.notify_waiters();
    }
}

impl ConnBudget {
    pub(crate) fn new(pool: BufPool, limits: &ConnLimits) -> Rc<ConnBudget> {
        Rc::new(ConnBudget {
            pool,
            reserve_free: Cell::new(limits.reserve / GRANULE * GRANULE),
            shared_held: Cell::new(0),
            shared_cap: limits.shared_cap,
            released: Notify::new(),
        })
    }

    /// The largest single charge this connection can ever get.
    pub(crate) fn max_charge(&self) -> usize {
        self.shared_cap.min(self.pool.budget_bytes()).max(self.reserve_free.get())
    }

    /// Charges `bytes`: from the reserve when it has room (never waits), else
    /// from the shared budget, waiting first for this connection's own share and
    /// then for the server's.
    pub(crate) async fn charge(self: &Rc<Self>, bytes: usize) -> Result<Charge, String> {
        let n = bytes.div_ceil(GRANULE).max(1) * GRANULE;
        if self.reserve_free.get() >= n {
            self.reserve_free.set(self.reserve_free.get() - n);
            return Ok(Charge { budget: self.clone(), reserve: n, shared: None });
        }
        if n > self.max_charge() {
            return Err(format!(
                "a {bytes}-byte payload exceeds the per-connection budget of {} bytes",
                self.max_charge()
            ));
        }
        loop {
            let released = self.released.notified();
            if self.shared_held.get() + n <= self.shared_cap {
                break;
            }
            // This connection's own replies or requests must drain first.
            released.await;
        }
        // Claimed before the wait for the server budget, so two requests of this
        // connection cannot both pass the cap check and then exceed it.
        self.shared_held.set(self.shared_held.get() + n);
        match self.pool.charge(n).await {
            Ok(c) => {
                // `n` is a multiple of the granule, so the pool charged exactly n.
                Ok(Charge { budget: self.clone(), reserve: 0, shared: Some(c) })
            }
            Err(e) => {
                self.shared_held.set(self.shared_held.get() - n);
                self.released.notify_waiters();
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(reserve: usize, cap: usize) -> ConnLimits {
        ConnLimits { max_requests: 4, shared_cap: cap, reserve, stall_timeout: Duration::from_secs(1) }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
    }

    #[test]
    fn the_reserve_serves_small_requests_when_the_shared_budget_is_gone() {
        run(async {
            let pool = BufPool::new(64 << 20);
            let hog = ConnBudget::new(pool.clone(), &limits(0, 64 << 20));
            let honest = ConnBudget::new(pool.clone(), &limits(1 << 20, 64 << 20));
            let _all = hog.charge(64 << 20).await.expect("the hog takes everything");
            assert_eq!(pool.budget_available(), 0);
            let mut held = Vec::new();
            for _ in 0..256 {
                let c = tokio::time::timeout(Duration::from_millis(100), honest.charge(4096)).await;
                held.push(c.expect("a 4K charge never waits while the reserve has room").expect("charged"));
            }
            // The reserve is used up now: the next charge needs the shared budget.
            assert!(tokio::time::timeout(Duration::from_millis(50), honest.charge(4096)).await.is_err());
            drop(held);
            assert!(honest.charge(4096).await.is_ok(), "given back on drop");
        });
    }

    #[test]
    fn a_connection_cannot_exceed_its_share() {
        run(async {
            let pool = BufPool::new(64 << 20);
            let c = ConnBudget::new(pool.clone(), &limits(0, 8 << 20));
            let a = c.charge(8 << 20).await.expect("up to the cap");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), c.charge(4096)).await.is_err(),
                "over the cap waits"
            );
            assert_eq!(pool.budget_available(), 56 << 20, "the others still have the rest");
            drop(a);
            assert!(c.charge(4096).await.is_ok());
            assert!(c.charge(9 << 20).await.is_err(), "larger than the cap is refused, not waited for");
        });
    }

    #[test]
    fn slots_bound_requests_and_come_back() {
        run(async {
            let s = Slots::new(2);
            let a = s.take().await;
            let _b = s.take().await;
            assert!(tokio::time::timeout(Duration::from_millis(50), s.take()).await.is_err());
            drop(a);
            assert!(tokio::time::timeout(Duration::from_millis(50), s.take()).await.is_ok());
        });
    }
}
