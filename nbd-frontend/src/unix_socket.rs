//! Listening Unix sockets for the daemon's endpoints (NBD listeners, the
//! control socket): mode 0600 from the start, missing directories created, a
//! stale socket file replaced and a live one refused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::Path;

/// Creates a listening Unix socket at `path` with mode 0600, creating missing
/// directories. A stale socket (nothing listening) is replaced; a live one is
/// an error.
pub fn bind(shown: &Path) -> io::Result<StdUnixListener> {
    let located = engine::hostfs::locate(shown, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_0600_and_refuses_a_live_listener() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/ctl.sock");
        let l = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind(&path).expect_err("second bind must fail");
        assert!(err.to_string().contains("already served by another process"), "{err}");
        drop(l);
        // Nothing listens now: the stale file is replaced.
        let _l2 = bind(&path).expect("rebind over a stale socket");
    }
}
