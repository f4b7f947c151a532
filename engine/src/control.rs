//! The control socket: how `livemirror attach|status|wait|...` talk to a running
//! daemon.
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::device::Mirror;
use crate::status::Status;
use crate::verify::VerifyReport;

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

/// Creates a listening Unix socket at `path` with mode 0600, creating missing
/// directories. A stale socket (nothing listening) is replaced; a live one is
/// an error.
pub fn bind_unix_socket(shown: &Path) -> io::Result<StdUnixListener> {
    let located = crate::hostfs::locate(shown, None);
    let path = located.as_path();
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", shown.display()),
                ));
            }
            match StdUnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is already served by another process", shown.display()),
                    ))
                }
                Err(_) => std::fs::remove_file(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot remove stale socket {}: {e}", shown.display()))
                })?,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot inspect {}: {e}", shown.display()))),
    }
    // socket + bind + chmod + listen: nobody can connect before listen(), so the
    // socket is never reachable with looser permissions.
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = nix::sys::socket::UnixAddr::new(path).map_err(io::Error::from)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("cannot bind {}: {e}", shown.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(128).map_err(io::Error::from)?)
        .map_err(io::Error::from)?;
    let listener = StdUnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
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
        Request::Resume => mirror.resume().map_or_else(Response::err, |()| Response::ok()),
        Request::SetRate { rate } => {
            mirror.set_rate(rate);
            Response::ok()
        }
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

    #[test]
    fn socket_is_0600_and_refuses_a_live_listener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/ctl.sock");
        let l = bind_unix_socket(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_unix_socket(&path).expect_err("second bind must fail");
        assert!(err.to_string().contains("already served by another process"), "{err}");
        drop(l);
        // Nothing listens now: the stale file is replaced.
        let _l2 = bind_unix_socket(&path).expect("rebind over a stale socket");
    }
}
