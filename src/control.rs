//! The control socket: how `livemirror attach|status|wait|...` talk to a running
//! daemon. (The engine knows nothing of it: this is the binary's protocol.)
//!
//! Protocol: a Unix stream socket (mode 0600). The client writes one JSON
//! request per line; the daemon answers each with one JSON line, in order:
//!
//! ```text
//! -> {"cmd":"attach","target":"/dev/sda1"}
//! <- {"ok":true}
//! -> {"cmd":"status"}
//! <- {"ok":true,"status":{"state":"syncing",...}}
//! -> {"cmd":"grow","size":null}
//! <- {"ok":false,"error":"grow is only possible after detach-source (state is syncing)"}
//! ```
//!
//! Commands: `status`, `attach {target}`, `detach-source`, `detach-target`,
//! `verify`, `pause`, `resume`, `set-rate {rate}`, `grow {size?}`,
//! `events {interval}`, which turns the connection into a stream: after the
//! `{"ok":true}` answer the daemon writes one JSON object per line (see
//! [`stream_events`]) until the client hangs up or the daemon stops, and
//! `upgrade {binary}`, answered by the daemon's main thread once the new
//! daemon serves or the upgrade was refused (src/upgrade.rs).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use engine::{Mirror, Status, VerifyReport};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub(crate) enum Request {
    Status,
    Attach {
        target: PathBuf,
    },
    DetachSource,
    DetachTarget,
    Verify,
    Pause,
    Resume,
    SetRate {
        rate: u64,
    },
    SetMinRate {
        rate: u64,
    },
    /// `set-overlay-limit`: None removes the limit.
    SetOverlayLimit {
        limit: Option<u64>,
    },
    Grow {
        size: Option<u64>,
    },
    Events {
        interval: f64,
    },
    /// Replace the daemon with `binary` (a path as the caller sees it).
    Upgrade {
        binary: PathBuf,
    },
}

/// An `upgrade` request on its way to the daemon's main thread, with the
/// connection its answer goes to (taken off the control server's worker, so
/// that nothing there waits while the daemon stops).
pub(crate) struct UpgradeRequest {
    pub(crate) binary: PathBuf,
    /// The requesting process: the binary is found in its view.
    pub(crate) caller: Option<u32>,
    pub(crate) conn: StdUnixStream,
}

impl UpgradeRequest {
    /// Answers the request (one JSON line); the client may be gone.
    pub(crate) fn answer(mut self, resp: &Response) {
        let mut out = serde_json::to_vec(resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        let _ = self.conn.write_all(&out);
    }
}

/// What an upgrade did: the new daemon's pid and how long the export did not
/// answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct UpgradeReport {
    pub(crate) pid: u32,
    pub(crate) previous_pid: u32,
    pub(crate) pause_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Response {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) report: Option<VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upgrade: Option<UpgradeReport>,
}

impl Response {
    pub(crate) fn ok() -> Response {
        Response { ok: true, ..Default::default() }
    }
    pub(crate) fn err(e: impl ToString) -> Response {
        Response { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
}

/// Handles one request.
/// Handles one request from the process `caller` (its pid, when known).
pub(crate) async fn handle(mirror: &Arc<Mirror>, req: Request, caller: Option<u32>) -> Response {
    match req {
        Request::Status => Response { ok: true, status: Some(mirror.status()), ..Default::default() },
        Request::Attach { target } => match mirror.attach_as(&target, caller).await {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::DetachSource => match mirror.detach_source().await {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::DetachTarget => match mirror.detach_target().await {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::Verify => match mirror.verify().await {
            Ok(report) => Response { ok: true, report: Some(report), ..Default::default() },
            Err(e) => Response::err(e),
        },
        Request::Pause => mirror.pause().await.map_or_else(Response::err, |()| Response::ok()),
        Request::Resume => mirror.resume().await.map_or_else(Response::err, |()| Response::ok()),
        Request::SetRate { rate } => mirror.set_rate(rate).await.map_or_else(Response::err, |()| Response::ok()),
        Request::SetMinRate { rate } => mirror.set_min_rate(rate).await.map_or_else(Response::err, |()| Response::ok()),
        Request::SetOverlayLimit { limit } => {
            mirror.set_overlay_limit(limit).await.map_or_else(Response::err, |()| Response::ok())
        }
        Request::Grow { size } => match mirror.grow(size).await {
            Ok(size) => Response { ok: true, size: Some(size), ..Default::default() },
            Err(e) => Response::err(e),
        },
        // Answered by serve_conn, which owns the connection it streams on.
        Request::Events { .. } => Response::err("events is a stream: it needs a connection of its own"),
        // Handed to the main thread by serve_conn.
        Request::Upgrade { .. } => Response::err("upgrade is answered by the daemon's main thread"),
    }
}

/// One line of the event stream, as JSON: `type` says which kind it is.
/// - `status`: the whole status object (without its event log), once, first;
/// - `event`: an engine event as it happens (`kind` state, error or info, the
///   `state` it led to, `message`);
/// - `progress`: every interval while syncing (state, paused, regions, bytes,
///   rate, ETA, percent);
/// - `lagged`: this reader fell behind and `missed` events were dropped;
/// - `end`: the daemon is stopping; nothing follows.
fn stream_line(kind: &str, mut v: serde_json::Value) -> Vec<u8> {
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), kind.into());
    }
    let mut out = serde_json::to_vec(&v).unwrap_or_else(|_| br#"{"type":"invalid"}"#.to_vec());
    out.push(b'\n');
    out
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The `progress` object of a status.
pub(crate) fn progress_json(st: &Status) -> serde_json::Value {
    let pct = if st.regions_total > 0 { 100.0 * st.regions_clean as f64 / st.regions_total as f64 } else { 100.0 };
    serde_json::json!({
        "unix_time": now_unix(),
        "state": st.state,
        "paused": st.paused,
        "percent": (pct * 100.0).round() / 100.0,
        "regions_clean": st.regions_clean,
        "regions_total": st.regions_total,
        "bytes_copied": st.bytes_copied,
        "bytes_written_as_zeroes": st.bytes_written_as_zeroes,
        "copy_rate_bytes_per_sec": st.copy_rate_bytes_per_sec,
        "eta_seconds": st.eta_seconds,
    })
}

/// Streams events and progress to `wr` until the client hangs up (anything it
/// sends, or EOF, ends the stream) or the daemon stops.
async fn stream_events<R, W>(
    mirror: &Arc<Mirror>,
    interval: f64,
    rd: &mut R,
    wr: &mut W,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::sync::broadcast::error::RecvError;
    // Subscribe before the snapshot, so nothing falls between the two.
    let mut events = mirror.subscribe_events();
    let mut first = serde_json::to_value(mirror.status()).unwrap_or_default();
    if let Some(o) = first.as_object_mut() {
        o.remove("events");
        o.insert("unix_time".into(), now_unix().into());
    }
    let mut pending = stream_line("status", first);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut scratch = [0u8; 64];
    loop {
        if !pending.is_empty() {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = wr.write_all(&pending) => if r.is_err() { return },
            }
            pending.clear();
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {
                let end = stream_line("end", serde_json::json!({"unix_time": now_unix(), "reason": "the daemon is stopping"}));
                let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&end)).await;
                return;
            }
            // The client sends nothing on a stream: bytes or EOF both end it.
            _ = rd.read(&mut scratch) => return,
            e = events.recv() => match e {
                Ok(ev) => pending = stream_line("event", serde_json::to_value(&ev).unwrap_or_default()),
                Err(RecvError::Lagged(n)) => pending = stream_line("lagged", serde_json::json!({"unix_time": now_unix(), "missed": n})),
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let st = mirror.status();
                if st.state == engine::DeviceState::Syncing {
                    pending = stream_line("progress", progress_json(&st));
                }
            }
        }
    }
}

/// Where `upgrade` requests go (the daemon's main thread); `None` in a daemon
/// that cannot be upgraded (the demo's).
pub(crate) type Upgrades = Option<tokio::sync::mpsc::UnboundedSender<UpgradeRequest>>;

/// Serves the control socket until `stop` turns true; open connections are
/// closed then too (an idle client must not keep the daemon from exiting).
pub(crate) async fn serve(
    listener: StdUnixListener,
    mirror: Arc<Mirror>,
    stop: tokio::sync::watch::Receiver<bool>,
    upgrades: Upgrades,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("control socket: {e}");
            return;
        }
    };
    let mut stop_accept = stop.clone();
    loop {
        tokio::select! {
            _ = stop_accept.wait_for(|s| *s) => return,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let m = mirror.clone();
                    let stop = stop.clone();
                    let up = upgrades.clone();
                    tokio::task::spawn_local(async move { serve_conn(stream, m, stop, up).await });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Longest request line accepted (a path plus some JSON).
const MAX_LINE: u64 = 64 << 10;

async fn serve_conn(
    stream: tokio::net::UnixStream,
    mirror: Arc<Mirror>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    upgrades: Upgrades,
) {
    let caller = stream.peer_cred().ok().and_then(|c| c.pid()).and_then(|p| u32::try_from(p).ok());
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let mut limited = (&mut rd).take(MAX_LINE);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = limited.read_until(b'\n', &mut raw) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
        if raw.last() != Some(&b'\n') && raw.len() as u64 >= MAX_LINE {
            let _ = wr.write_all(b"{\"ok\":false,\"error\":\"request too long\"}\n").await;
            return;
        }
        // Bytes first, text second: a line that is not UTF-8 gets an answer
        // like any other bad line, instead of a silent hang-up.
        let resp = match std::str::from_utf8(&raw)
            .map_err(|e| format!("bad request: not UTF-8 ({e})"))
            .and_then(|line| serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}")))
        {
            Ok(Request::Events { interval }) => {
                if !(interval.is_finite() && (0.01..=3600.0).contains(&interval)) {
                    Response::err(format!("events: the interval must be between 0.01 and 3600 seconds, not {interval}"))
                } else {
                    if wr.write_all(b"{\"ok\":true}\n").await.is_err() {
                        return;
                    }
                    stream_events(&mirror, interval, &mut rd, &mut wr, &mut stop).await;
                    return;
                }
            }
            Ok(Request::Upgrade { binary }) => {
                let Some(tx) = upgrades else {
                    let _ = wr.write_all(b"{\"ok\":false,\"error\":\"this daemon cannot be upgraded\"}\n").await;
                    return;
                };
                // The connection goes to the main thread with the request; this
                // task ends, and with it its hold on the device.
                let conn = rd.into_inner().reunite(wr).map_err(|e| e.to_string()).and_then(|s| {
                    let s = s.into_std().map_err(|e| e.to_string())?;
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    Ok(s)
                });
                match conn {
                    Ok(conn) => {
                        tracing::info!("upgrade to {} requested (by pid {caller:?})", binary.display());
                        if let Err(e) = tx.send(UpgradeRequest { binary, caller, conn }) {
                            e.0.answer(&Response::err("the daemon is stopping"));
                        }
                    }
                    Err(e) => tracing::warn!("upgrade request: cannot keep its connection: {e}"),
                }
                return;
            }
            Ok(req) => {
                let what = format!("{req:?}");
                let resp = handle(&mirror, req, caller).await;
                if let Some(e) = &resp.error {
                    tracing::warn!("control request {what} refused: {e}");
                }
                resp
            }
            Err(e) => Response::err(e),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// A synchronous client (the CLI commands).
pub(crate) struct Client {
    path: PathBuf,
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

/// Requests the daemon answers at once; a peer that stays silent on one of
/// these for this long is not a livemirror daemon (or is hung).
const QUICK_ANSWER: Duration = Duration::from_secs(30);

impl Client {
    pub(crate) fn connect(path: &Path) -> io::Result<Client> {
        let s = StdUnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the livemirror daemon at {}: {e} (is `livemirror serve` running?)",
                    path.display()
                ),
            )
        })?;
        Ok(Client { path: path.to_path_buf(), reader: BufReader::new(s.try_clone()?), writer: s })
    }

    /// Why a peer is not a livemirror control socket, from what it sent.
    fn not_control(&self, got: &[u8]) -> io::Error {
        let p = self.path.display();
        let msg = if got.is_empty() {
            format!("{p} closed the connection without answering: it is not a livemirror control socket")
        } else if got.starts_with(b"NBDMAGIC") {
            format!(
                "{p} is an NBD socket, not a livemirror control socket (give --control the daemon's control socket)"
            )
        } else {
            let shown: String = String::from_utf8_lossy(&got[..got.len().min(40)]).escape_debug().collect();
            format!("{p} is not a livemirror control socket: it answered \"{shown}\"")
        };
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    /// Reads one line; `Ok(None)` on EOF before any byte.
    pub(crate) fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut raw = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut raw)?;
        Ok((n > 0).then_some(raw))
    }

    pub(crate) fn call(&mut self, req: &Request) -> io::Result<Response> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        let quick = matches!(req, Request::Status | Request::SetRate { .. } | Request::SetMinRate { .. });
        self.writer.set_read_timeout(quick.then_some(QUICK_ANSWER))?;
        if let Err(e) = self.writer.write_all(&line) {
            // A peer that hung up as soon as it read something it did not
            // understand; whatever it sent before says what it was.
            let mut got = Vec::new();
            let _ = (&mut self.reader).take(64).read_to_end(&mut got);
            return Err(if got.is_empty() {
                io::Error::new(e.kind(), format!("cannot send to {}: {e}", self.path.display()))
            } else {
                self.not_control(&got)
            });
        }
        let raw = match self.read_line() {
            Ok(Some(r)) => r,
            Ok(None) => return Err(self.not_control(&[])),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer from {} within {} s: it is not a livemirror control socket, or the daemon is hung",
                        self.path.display(),
                        QUICK_ANSWER.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot read from {}: {e}", self.path.display()))),
        };
        self.writer.set_read_timeout(None)?;
        serde_json::from_slice::<Response>(&raw).map_err(|_| self.not_control(&raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::Attach { target: "/dev/sdb".into() };
        assert_eq!(serde_json::to_string(&r).ok().as_deref(), Some(r#"{"cmd":"attach","target":"/dev/sdb"}"#));
        let r: Request = serde_json::from_str(r#"{"cmd":"set-rate","rate":1048576}"#).expect("parses");
        assert_eq!(r, Request::SetRate { rate: 1 << 20 });
        let r: Request = serde_json::from_str(r#"{"cmd":"grow","size":null}"#).expect("parses");
        assert_eq!(r, Request::Grow { size: None });
        let r = Request::Events { interval: 0.5 };
        assert_eq!(serde_json::to_string(&r).ok().as_deref(), Some(r#"{"cmd":"events","interval":0.5}"#));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }
}
