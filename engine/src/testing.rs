//! Test support: I/O hooks that inject errors and hold operations at precise
//! points, so races can be replayed deterministically. Production devices have
//! no hooks; this module only adds code that tests call.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::backend::{HookFuture, IoHooks, IoKind};
use crate::sync::lock;

/// A point where matching operations stop until released.
#[derive(Default)]
pub struct Gate {
    arrived: AtomicUsize,
    arrived_notify: Notify,
    open: AtomicBool,
    open_notify: Notify,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// Operations that reached the gate so far.
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Waits until `n` operations reached the gate (panics after 20 s: a test
    /// that waits forever is worse than one that fails).
    pub async fn wait_arrived(&self, n: usize) {
        let res = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.arrived_notify.notified();
                if self.arrived() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(res.is_ok(), "gate: {n} arrivals expected, {} seen", self.arrived());
    }

    /// Lets every held and future operation through.
    pub fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.open_notify.notify_waiters();
    }

    async fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        self.arrived_notify.notify_waiters();
        loop {
            let notified = self.open_notify.notified();
            if self.open.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Clone)]
enum Action {
    Fail(i32),
    Hold(Arc<Gate>),
}

struct Rule {
    kind: IoKind,
    range: Range<u64>,
    action: Action,
    /// How many more times the rule fires (`None`: forever).
    remaining: Option<usize>,
}

/// One recorded operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpRecord {
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
}

/// Scripted hooks: rules are checked in the order they were added; the first
/// rule whose kind matches and whose range overlaps the operation fires.
#[derive(Default)]
pub struct TestHooks {
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<OpRecord>>,
}

impl TestHooks {
    pub fn new() -> Arc<TestHooks> {
        Arc::new(TestHooks::default())
    }

    /// Fails matching operations with `errno` (`times`: `None` = always).
    pub fn fail(&self, kind: IoKind, range: Range<u64>, errno: i32, times: Option<usize>) {
        lock(&self.rules).push(Rule { kind, range, action: Action::Fail(errno), remaining: times });
    }

    /// Holds matching operations at `gate` (`times`: `None` = always).
    pub fn hold(&self, kind: IoKind, range: Range<u64>, gate: Arc<Gate>, times: Option<usize>) {
        lock(&self.rules).push(Rule { kind, range, action: Action::Hold(gate), remaining: times });
    }

    pub fn clear(&self) {
        lock(&self.rules).clear();
    }

    pub fn log(&self) -> Vec<OpRecord> {
        lock(&self.log).clone()
    }

    /// Recorded operations of `kind` overlapping `range`.
    pub fn ops(&self, kind: IoKind, range: Range<u64>) -> Vec<OpRecord> {
        self.log()
            .into_iter()
            .filter(|o| o.kind == kind && o.offset < range.end && range.start < o.offset + o.len.max(1))
            .collect()
    }
}

impl IoHooks for TestHooks {
    fn before(&self, kind: IoKind, offset: u64, len: u64) -> HookFuture<'_> {
        lock(&self.log).push(OpRecord { kind, offset, len });
        let action = {
            let mut rules = lock(&self.rules);
            let end = offset + len.max(1);
            let hit = rules
                .iter_mut()
                .find(|r| r.kind == kind && r.range.start < end && offset < r.range.end && r.remaining != Some(0));
            hit.map(|r| {
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                r.action.clone()
            })
        };
        Box::pin(async move {
            match action {
                None => Ok(()),
                Some(Action::Fail(errno)) => Err(std::io::Error::from_raw_os_error(errno)),
                Some(Action::Hold(g)) => {
                    g.pass().await;
                    Ok(())
                }
            }
        })
    }
}
