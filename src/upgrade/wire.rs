//! The conversation between the daemon being replaced and its successor: one
//! Unix stream connection to an abstract socket the old daemon listens on
//! (named, with a secret token, in the successor's environment), carrying
//! length-prefixed JSON messages, binary blobs (the bytes kernel connections
//! read past their last request) and file descriptors (SCM_RIGHTS).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The environment variable that tells a new daemon whom to take over from:
/// `NAME TOKEN` (the old daemon's abstract socket and the secret it expects).
pub(crate) const ENV_HANDOVER: &str = "LIVEMIRROR_HANDOVER";

/// Bumped when the messages change meaning; both sides must speak the same.
pub(crate) const PROTOCOL: u32 = 1;

/// At most this many descriptors in one message (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 128;
/// The longest message and blob accepted (the leftovers are at most a read
/// buffer each).
const MAX_LEN: u32 = 64 << 20;

/// What the new daemon gets: which descriptor is which (in the order of the
/// message's descriptors), and what to start from.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Manifest {
    /// One descriptor each: the NBD listening sockets, by `--listen` address.
    pub(crate) listeners: Vec<String>,
    /// One descriptor: the control socket's listening socket.
    pub(crate) control: bool,
    /// One descriptor: the metrics listener.
    pub(crate) metrics: bool,
    /// One descriptor and one blob each: the kernel device's live connections.
    pub(crate) kernel_connections: usize,
    /// The devices as they are now (the state file records them without
    /// credentials), and the state file to resume from.
    pub(crate) source: Option<PathBuf>,
    pub(crate) target: Option<PathBuf>,
    pub(crate) state: PathBuf,
    /// The state file was made for the handover (the daemon ran without
    /// `--state`): removed at the next clean stop.
    pub(crate) state_made_for_handover: bool,
    /// The copy's rate limit and floor now (from the command line or
    /// `set-rate`; a state file keeps only the latter).
    pub(crate) max_rate: u64,
    pub(crate) min_rate: u64,
    /// The overlay served over the source (`--overlay`), with the limit in
    /// force now (from the command line or `set-overlay-limit`); None without
    /// one (absent from a predecessor that knew no overlays).
    #[serde(default)]
    pub(crate) overlay: Option<OverlayInForce>,
    /// Where a root storage daemon's binaries live (its own tmpfs).
    pub(crate) bin_dir: Option<PathBuf>,
    /// When the old daemon stopped answering (Unix time): the pause starts.
    pub(crate) stopped_at: f64,
    /// How long the old daemon took to stop (drain, flush, persist, close).
    pub(crate) stop_ms: f64,
}

/// An overlay's settings that a restart would not keep.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub(crate) struct OverlayInForce {
    /// The most its file may occupy; None for no limit.
    pub(crate) limit: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub(crate) enum Msg {
    /// New to old: started, checked what it could, waiting for the handover.
    Hello { protocol: u32, version: String, pid: u32, token: String },
    /// Old to new: everything, with the descriptors.
    Manifest(Box<Manifest>),
    /// Old to new: the old daemon gave up before sending anything (the new
    /// one exits).
    Abort { reason: String },
    /// New to old: serving; the old one exits.
    Ready { pid: u32, pause_ms: f64 },
    /// New to old: could not take over; the old one serves on.
    Failed { error: String },
}

/// A frame: 8 bytes (JSON length, blob count, little-endian) carrying the
/// descriptors, the JSON, then each blob as a 4-byte length and its bytes.
pub(crate) fn send(s: &UnixStream, msg: &Msg, blobs: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = |n: usize| u32::try_from(n).ok().filter(|&n| n <= MAX_LEN).ok_or_else(|| io::Error::other("too long"));
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&len(json.len())?.to_le_bytes());
    head[4..].copy_from_slice(&len(blobs.len())?.to_le_bytes());
    let iov = [io::IoSlice::new(&head)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map_err(io::Error::from)?;
    let mut w = s;
    // The descriptors went with the first byte; the rest of the header follows.
    w.write_all(&head[n..])?;
    w.write_all(&json)?;
    for b in blobs {
        w.write_all(&len(b.len())?.to_le_bytes())?;
        w.write_all(b)?;
    }
    w.flush()
}

/// Receives one frame, waiting until `deadline`.
pub(crate) fn recv(s: &UnixStream, deadline: Instant) -> io::Result<(Msg, Vec<Vec<u8>>, Vec<OwnedFd>)> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no message in time"))
    };
    s.set_read_timeout(Some(left()?))?;
    let mut head = [0u8; 8];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < head.len() {
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [io::IoSliceMut::new(&mut head[got..])];
        let r =
            recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).map_err(
                |e| match e {
                    nix::errno::Errno::EAGAIN => io::Error::new(io::ErrorKind::TimedOut, "no message in time"),
                    e => io::Error::from(e),
                },
            )?;
        for c in r.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this
                // process for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if r.bytes == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other daemon hung up"));
        }
        got += r.bytes;
        s.set_read_timeout(Some(left()?))?;
    }
    let json_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let nblobs = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if json_len > MAX_LEN || nblobs as usize > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a handover message out of bounds"));
    }
    let mut r = s;
    let mut json = vec![0u8; json_len as usize];
    r.read_exact(&mut json)?;
    let msg: Msg = serde_json::from_slice(&json).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut blobs = Vec::with_capacity(nblobs as usize);
    for _ in 0..nblobs {
        let mut l = [0u8; 4];
        r.read_exact(&mut l)?;
        let l = u32::from_le_bytes(l);
        if l > MAX_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a handover blob out of bounds"));
        }
        let mut b = vec![0u8; l as usize];
        r.read_exact(&mut b)?;
        blobs.push(b);
    }
    Ok((msg, blobs, fds))
}

/// A secret of 16 hex digits (the kernel's random numbers: no /dev in a
/// daemon's root after a switch_root).
pub(crate) fn token() -> io::Result<String> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The old daemon's end: an abstract socket only its successor knows the
/// token for (abstract names leave no file behind, in any root).
pub(crate) struct Rendezvous {
    listener: UnixListener,
    name: String,
    pub(crate) token: String,
}

impl Rendezvous {
    pub(crate) fn open() -> io::Result<Rendezvous> {
        let token = token()?;
        let name = format!("livemirror-upgrade-{}-{token}", std::process::id());
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        listener.set_nonblocking(true)?;
        Ok(Rendezvous { listener, name, token })
    }

    /// The value of [`ENV_HANDOVER`] for the successor.
    pub(crate) fn env_value(&self) -> String {
        format!("{} {}", self.name, self.token)
    }

    /// Waits until `deadline` for the successor's hello; `gone` says why to
    /// stop waiting early (the new process died). Connections from another
    /// user, or without the token, are dropped.
    pub(crate) fn accept(
        &self,
        deadline: Instant,
        mut gone: impl FnMut() -> Option<String>,
    ) -> Result<(UnixStream, u32, String), String> {
        loop {
            if let Some(why) = gone() {
                return Err(why);
            }
            if Instant::now() >= deadline {
                return Err("it did not connect in time".into());
            }
            match self.listener.accept() {
                Ok((s, _)) => match self.hello(s) {
                    Ok(r) => return Ok(r),
                    Err(e) => tracing::warn!("upgrade: a connection to the handover socket refused: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("the handover socket: {e}")),
            }
        }
    }

    fn hello(&self, s: UnixStream) -> Result<(UnixStream, u32, String), String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let cred =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).map_err(|e| e.to_string())?;
        if cred.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!("from uid {}", cred.uid()));
        }
        match recv(&s, Instant::now() + Duration::from_secs(10)).map_err(|e| e.to_string())? {
            (Msg::Hello { token, .. }, _, _) if token != self.token => Err("a wrong token".into()),
            (Msg::Hello { protocol, version, .. }, _, _) if protocol != PROTOCOL => Err(format!(
                "livemirror {version} speaks handover protocol {protocol}, this daemon {PROTOCOL}: upgrade in two steps"
            )),
            (Msg::Hello { pid, version, .. }, _, _) => Ok((s, pid, version)),
            (other, _, _) => Err(format!("{other:?} instead of a hello")),
        }
    }
}

/// The value of [`ENV_HANDOVER`], removed from the environment (nothing this
/// process starts later is a successor). Call while the process has one
/// thread.
pub(crate) fn take_env() -> Option<String> {
    let v = std::env::var_os(ENV_HANDOVER)?;
    std::env::remove_var(ENV_HANDOVER);
    Some(v.to_string_lossy().into_owned())
}

/// The successor's end: connects to the socket `env` (the value of
/// [`ENV_HANDOVER`]) names and says hello.
pub(crate) fn connect(env: &str) -> io::Result<UnixStream> {
    let (name, token) = env
        .split_once(' ')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{ENV_HANDOVER}={env}")))?;
    let s = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    let hello = Msg::Hello {
        protocol: PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        token: token.to_string(),
    };
    send(&s, &hello, &[], &[])?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_json_blobs_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let m = Manifest { listeners: vec!["unix:/a".into()], kernel_connections: 2, ..Default::default() };
        send(&a, &Msg::Manifest(Box::new(m)), &[b"first", b""], &[x.as_raw_fd(), a.as_raw_fd()]).unwrap();
        let (msg, blobs, fds) = recv(&b, Instant::now() + Duration::from_secs(5)).unwrap();
        match msg {
            Msg::Manifest(m) => assert_eq!((m.listeners.len(), m.kernel_connections), (1, 2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(blobs, vec![b"first".to_vec(), Vec::new()]);
        assert_eq!(fds.len(), 2);
        // The second descriptor was `a` itself: both must go for the end.
        drop(fds);
        drop(a);
        let e = recv(&b, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_rendezvous_takes_only_the_right_token_and_protocol() {
        let r = Rendezvous::open().unwrap();
        let name = r.name.clone();
        let connect = |token: &str, protocol: u32| {
            let s = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
            let hello = Msg::Hello { protocol, version: "x".into(), pid: 7, token: token.into() };
            send(&s, &hello, &[], &[]).unwrap();
            s
        };
        let _wrong = connect("0000", PROTOCOL);
        let _old = connect(&r.token, PROTOCOL + 1);
        let _right = connect(&r.token, PROTOCOL);
        let (_, pid, _) = r.accept(Instant::now() + Duration::from_secs(10), || None).unwrap();
        assert_eq!(pid, 7);
        let e = r.accept(Instant::now() + Duration::from_millis(200), || None).unwrap_err();
        assert!(e.contains("in time"), "{e}");
        assert_eq!(r.accept(Instant::now() + Duration::from_secs(1), || Some("died".into())).unwrap_err(), "died");
    }
}
