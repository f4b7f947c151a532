//! A remote device's connection slots and their sweeper, on the device's own
//! thread (`livemirror-nbdc`, a tokio runtime).
//!
//! Each slot connects, serves its connection (`conn.rs`) and reconnects with
//! backoff when the connection fails, for as long as the device lives; the
//! link is `reconnecting` while no slot is up. The sweeper fails the requests
//! whose bounded wait (`--remote-timeout`) is over. So a network fault is not
//! a disk failure: while the link is down requests wait; only a request that
//! waited the whole timeout fails, and then the engine treats the device as
//! failed (a target is dropped: `degraded`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::sync::lock;
use engine::LinkState;
use tokio::sync::oneshot;

use super::conn;
use super::dial::Dialer;
use super::handshake::{BoxStream, ExportInfo};
use super::requests::Requests;

/// Backoff between connection attempts: doubling from 100 ms to 2 s.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often the sweeper looks for requests whose wait is over.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Link {
    /// Which slots have a connection now.
    up: Vec<bool>,
    /// Failed attempts since the last connection was lost.
    attempts: u32,
    last_error: String,
}

/// What the device, its connection slots and the sweeper share.
pub(super) struct Shared {
    pub(super) requests: Requests,
    link: Mutex<Link>,
    /// The export's size as the last handshake reported it.
    pub(super) size: AtomicU64,
    /// How long a request waits for its answer, reconnects included.
    pub(super) timeout: Duration,
    /// No reply and no bytes for this long while requests wait: the
    /// connection is dead.
    stall: Duration,
    pub(super) endpoint: String,
}

impl Shared {
    pub(super) fn new(endpoint: String, size: u64, timeout: Duration, stall: Duration) -> Shared {
        Shared {
            requests: Requests::default(),
            link: Mutex::new(Link::default()),
            size: AtomicU64::new(size),
            timeout,
            stall,
            endpoint,
        }
    }

    fn set_up(&self, slot: usize, up: bool, why: Option<String>) {
        let mut l = lock(&self.link);
        if l.up.len() <= slot {
            l.up.resize(slot + 1, false);
        }
        l.up[slot] = up;
        if up {
            l.attempts = 0;
        }
        if let Some(w) = why {
            l.last_error = w;
        }
    }

    fn attempt_failed(&self, why: String) {
        let mut l = lock(&self.link);
        l.attempts = l.attempts.saturating_add(1);
        l.last_error = why;
    }

    pub(super) fn link_state(&self) -> LinkState {
        let l = lock(&self.link);
        if l.up.iter().any(|&u| u) {
            LinkState::Connected
        } else {
            LinkState::Reconnecting { attempts: l.attempts, last_error: l.last_error.clone() }
        }
    }

    /// The error a request gets when its wait is over.
    fn timed_out(&self) -> io::Error {
        let link = match self.link_state() {
            LinkState::Connected => "the link is up but the server did not answer".to_string(),
            LinkState::Reconnecting { attempts, last_error } => {
                format!("the link is down ({last_error}; {attempts} reconnect attempts)")
            }
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{} did not answer within {:.0} s: {link}", self.endpoint, self.timeout.as_secs_f64()),
        )
    }
}

/// Starts `connections` slots on `io`, the first over the connection `first`
/// that opening the device made, and the sweeper.
pub(super) fn start(
    io: &IoThread,
    shared: &Arc<Shared>,
    dialer: Arc<Dialer>,
    connections: usize,
    first: (BoxStream, ExportInfo),
) {
    shared.set_up(0, true, None);
    let key = first.1.same_export_key();
    let mut first = Some(first);
    for slot in 0..connections {
        io.handle.spawn(slot_loop(shared.clone(), dialer.clone(), slot, key.clone(), first.take()));
    }
    io.handle.spawn(sweeper(shared.clone()));
}

/// One connection slot: connect, serve, reconnect with backoff, forever
/// (until the device is closed).
async fn slot_loop(
    shared: Arc<Shared>,
    dialer: Arc<Dialer>,
    slot: usize,
    key: String,
    mut first: Option<(BoxStream, ExportInfo)>,
) {
    let mut backoff = BACKOFF_FIRST;
    while !shared.requests.is_closed() {
        let conn = match first.take() {
            Some(c) => Ok(c),
            None => tokio::select! {
                r = dialer.dial() => r,
                _ = shared.requests.closed_signal() => return,
            },
        };
        let (stream, info) = match conn {
            Ok((s, info)) if info.same_export_key() == key => (s, info),
            Ok((_, info)) => {
                let why = format!(
                    "{} now reports another export ({}; it was {key}): not using it",
                    shared.endpoint,
                    info.same_export_key()
                );
                tracing::warn!("{why}");
                shared.attempt_failed(why);
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
            Err(e) => {
                let why = format!("connecting: {e}");
                tracing::debug!("{}: {why}", shared.endpoint);
                shared.attempt_failed(why);
                if !e.is_transient() {
                    // A refusal (a TLS certificate, an unknown export) is not
                    // cured by hammering: try again at the slowest pace.
                    backoff = BACKOFF_MAX;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.requests.closed_signal() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        shared.size.store(info.size, Ordering::Release);
        shared.set_up(slot, true, None);
        let why = conn::run(&shared.requests, slot, shared.stall, stream, &info).await;
        if shared.requests.is_closed() {
            return;
        }
        tracing::warn!("{} (connection {slot}): {why}; reconnecting", shared.endpoint);
        shared.set_up(slot, false, Some(why));
    }
}

/// Fails the requests whose wait is over, until the device is closed.
async fn sweeper(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = shared.requests.closed_signal() => return,
        }
        shared.requests.expire(Instant::now(), &|| shared.timed_out());
    }
}

/// The device's own thread and runtime; stopped when the device is dropped.
pub(super) struct IoThread {
    pub(super) handle: tokio::runtime::Handle,
    _stop: oneshot::Sender<()>,
}

impl IoThread {
    pub(super) fn spawn() -> io::Result<IoThread> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name("livemirror-nbdc".into()).spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            });
            // Dropping the runtime cancels the connection tasks.
        })?;
        Ok(IoThread { handle, _stop: stop })
    }
}
