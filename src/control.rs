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
//! `verify`, `pause`, `resume`, `set-rate {rate}`, `grow {size?}`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use engine::{Mirror, Status, VerifyReport};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Attach { target: PathBuf },
    DetachSource,
    DetachTarget,
    Verify,
    Pause,
    Resume,
    SetRate { rate: u64 },
    Grow { size: Option<u64> },
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl Response {
    fn ok() -> Response {
        Response { ok: true, ..Default::default() }
    }
    fn err(e: impl ToString) -> Response {
        Response { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
}

/// Handles one request.
/// Handles one request from the process `caller` (its pid, when known).
pub async fn handle(mirror: &Arc<Mirror>, req: Request, caller: Option<u32>) -> Response {
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
        Request::Grow { size } => match mirror.grow(size).await {
            Ok(size) => Response { ok: true, size: Some(size), ..Default::default() },
            Err(e) => Response::err(e),
        },
    }
}

/// Serves the control socket until `stop` turns true; open connections are
/// closed then too (an idle client must not keep the daemon from exiting).
pub async fn serve(listener: StdUnixListener, mirror: Arc<Mirror>, stop: tokio::sync::watch::Receiver<bool>) {
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
                    tokio::task::spawn_local(async move { serve_conn(stream, m, stop).await });
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

async fn serve_conn(stream: tokio::net::UnixStream, mirror: Arc<Mirror>, mut stop: tokio::sync::watch::Receiver<bool>) {
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
pub struct Client {
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> io::Result<Client> {
        let s = StdUnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the livemirror daemon at {}: {e} (is `livemirror serve` running?)",
                    path.display()
                ),
            )
        })?;
        Ok(Client { reader: BufReader::new(s.try_clone()?), writer: s })
    }

    pub fn call(&mut self, req: &Request) -> io::Result<Response> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the control connection"));
        }
        serde_json::from_str(&resp).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply: {e}")))
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
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }
}
