//! The kernel's NBD client, driven over generic netlink (family "nbd").
//!
//! livemirror hands the kernel one end of a socketpair per connection and
//! serves the other end itself; no handshake happens on these sockets (the
//! kernel only speaks the transmission phase). With a dead-connection timeout,
//! the kernel holds I/O when the daemon dies and a restarted daemon hands it new
//! sockets with RECONFIGURE; the same command resizes the device online.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const NETLINK_GENERIC: libc::c_int = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const NBD_FAMILY: &str = "nbd";
const NBD_MCAST_GROUP: &str = "nbd_mc_group";
const NBD_GENL_VERSION: u8 = 1;

pub(crate) const NBD_CMD_CONNECT: u8 = 1;
pub(crate) const NBD_CMD_DISCONNECT: u8 = 2;
pub(crate) const NBD_CMD_RECONFIGURE: u8 = 3;
pub(crate) const NBD_CMD_LINK_DEAD: u8 = 4;
pub(crate) const NBD_CMD_STATUS: u8 = 5;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;

/// A netlink attribute, possibly nested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        let kind = match self {
            Attr::U32(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::U64(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::Str(t, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *t
            }
            Attr::Nested(t, items) => {
                for a in items {
                    a.encode(out);
                }
                *t | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(start + pad4(len as usize), 0);
    }
}

/// Parses a run of attributes into (type, payload) pairs; malformed input
/// ends the list instead of panicking.
pub(crate) fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        let adv = pad4(len).min(b.len());
        b = &b[adv..];
    }
    out
}

fn u32_of(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

fn u16_of(p: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(p.get(..2)?.try_into().ok()?))
}

/// Builds a complete generic netlink request.
pub(crate) fn build_message(family: u16, cmd: u8, version: u8, seq: u32, flags: u16, attrs: &[Attr]) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m.extend_from_slice(&[cmd, version, 0, 0]);
    for a in attrs {
        a.encode(&mut m);
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&family.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// One generic netlink socket.
pub(crate) struct Genl {
    fd: OwnedFd,
    seq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NbdFamily {
    pub(crate) id: u16,
    pub(crate) mcast_group: Option<u32>,
}

impl Genl {
    pub(crate) fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; bind with pid 0 lets the kernel pick.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid fd and address.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
        // SAFETY: valid fd and option value.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Genl { fd, seq: 1 })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl to the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid fd, buffer and address.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: valid fd and buffer.
        let r = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Sends a request and collects the attribute payloads of every reply
    /// message until the ACK; a negative ACK is the error.
    pub(crate) fn request(&mut self, family: u16, cmd: u8, version: u8, attrs: &[Attr]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(&build_message(family, cmd, version, seq, NLM_F_REQUEST | NLM_F_ACK, attrs))?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = self.recv(&mut buf)?;
            let mut b = &buf[..n];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if len < 16 || len > b.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let body = &b[16..len];
                if mseq == seq {
                    match kind {
                        NLMSG_ERROR => {
                            let code = body
                                .get(..4)
                                .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                                .unwrap_or(-libc::EIO);
                            if code != 0 {
                                return Err(io::Error::from_raw_os_error(-code));
                            }
                            return Ok(replies);
                        }
                        NLMSG_DONE => return Ok(replies),
                        _ => replies.push(body.get(4..).unwrap_or(&[]).to_vec()),
                    }
                }
                b = &b[pad4(len).min(b.len())..];
            }
        }
    }

    /// Looks up the "nbd" family and its multicast group.
    pub(crate) fn nbd_family(&mut self) -> io::Result<NbdFamily> {
        let replies = self
            .request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &[Attr::Str(CTRL_ATTR_FAMILY_NAME, NBD_FAMILY.into())])
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    io::Error::new(io::ErrorKind::NotFound, "the kernel has no NBD driver (load it: modprobe nbd)")
                } else {
                    e
                }
            })?;
        parse_family(&replies)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family id in the controller's reply"))
    }

    /// Joins a multicast group (LINK_DEAD notifications).
    pub(crate) fn join(&self, group: u32) -> io::Result<()> {
        // SAFETY: valid fd and option value.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                &group as *const u32 as *const libc::c_void,
                4,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the next LINK_DEAD and returns its device index (`None` on
    /// timeout or for other messages).
    pub(crate) fn next_link_dead(&self, timeout: Duration) -> io::Result<Option<u32>> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: valid fd and option value.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let mut buf = vec![0u8; 8192];
        let n = match self.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(parse_link_dead(&buf[..n]))
    }
}

fn parse_family(replies: &[Vec<u8>]) -> Option<NbdFamily> {
    // The controller answers with one message.
    if let Some(r) = replies.first() {
        let attrs = parse_attrs(r);
        let id = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID).and_then(|(_, p)| u16_of(p))?;
        let mut group = None;
        if let Some((_, groups)) = attrs.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GROUPS) {
            for (_, g) in parse_attrs(groups) {
                let ga = parse_attrs(g);
                let name = ga.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_NAME).map(|(_, p)| p);
                let gid = ga.iter().find(|(t, _)| *t == CTRL_ATTR_MCAST_GRP_ID).and_then(|(_, p)| u32_of(p));
                if name.is_some_and(|n| n.split(|&c| c == 0).next() == Some(NBD_MCAST_GROUP.as_bytes())) {
                    group = gid;
                }
            }
        }
        return Some(NbdFamily { id, mcast_group: group });
    }
    None
}

/// The device index of a LINK_DEAD notification in `msg` (one datagram).
pub(crate) fn parse_link_dead(msg: &[u8]) -> Option<u32> {
    if msg.len() < 20 {
        return None;
    }
    let len = (u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize).min(msg.len());
    if msg[16] != NBD_CMD_LINK_DEAD || len < 20 {
        return None;
    }
    parse_attrs(&msg[20..len]).into_iter().find(|(t, _)| *t == NBD_ATTR_INDEX).and_then(|(_, p)| u32_of(p))
}

/// What to tell the kernel when connecting a device.
#[derive(Debug, Clone)]
pub(crate) struct ConnectParams {
    pub(crate) index: u32,
    pub(crate) size: u64,
    pub(crate) block_size: u64,
    /// Request timeout: in-flight requests of a dead connection are resent
    /// when it fires.
    pub(crate) timeout: Duration,
    /// How long the kernel holds I/O waiting for a new connection.
    pub(crate) dead_conn_timeout: Duration,
    pub(crate) server_flags: u64,
    pub(crate) client_flags: u64,
}

fn sockets_attr(fds: &[RawFd]) -> Attr {
    Attr::Nested(
        NBD_ATTR_SOCKETS,
        fds.iter().map(|&fd| Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, fd as u32)])).collect(),
    )
}

/// The kernel NBD driver's netlink interface.
pub struct NbdNetlink {
    genl: Genl,
    pub(crate) family: NbdFamily,
}

impl NbdNetlink {
    /// Opens a generic netlink socket and finds the `nbd` family (fails when
    /// the kernel has no NBD driver).
    pub fn open() -> io::Result<NbdNetlink> {
        let mut genl = Genl::open()?;
        let family = genl.nbd_family()?;
        Ok(NbdNetlink { genl, family })
    }

    /// Connects device `p.index` over `fds`; returns the index the kernel chose.
    pub(crate) fn connect(&mut self, p: &ConnectParams, fds: &[RawFd]) -> io::Result<u32> {
        let attrs = vec![
            Attr::U32(NBD_ATTR_INDEX, p.index),
            Attr::U64(NBD_ATTR_SIZE_BYTES, p.size),
            Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size),
            Attr::U64(NBD_ATTR_TIMEOUT, p.timeout.as_secs().max(1)),
            Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, p.dead_conn_timeout.as_secs()),
            Attr::U64(NBD_ATTR_SERVER_FLAGS, p.server_flags),
            Attr::U64(NBD_ATTR_CLIENT_FLAGS, p.client_flags),
            sockets_attr(fds),
        ];
        let replies = self.genl.request(self.family.id, NBD_CMD_CONNECT, NBD_GENL_VERSION, &attrs)?;
        let idx = replies
            .iter()
            .flat_map(|r| parse_attrs(r).into_iter().map(|(t, p)| (t, p.to_vec())).collect::<Vec<_>>())
            .find(|(t, _)| *t == NBD_ATTR_INDEX)
            .and_then(|(_, p)| u32_of(&p));
        Ok(idx.unwrap_or(p.index))
    }

    /// Replaces dead sockets of a connected device (a restarted daemon).
    pub(crate) fn reconnect(
        &mut self,
        index: u32,
        fds: &[RawFd],
        timeout: Duration,
        dead_conn_timeout: Duration,
    ) -> io::Result<()> {
        let attrs = vec![
            Attr::U32(NBD_ATTR_INDEX, index),
            Attr::U64(NBD_ATTR_TIMEOUT, timeout.as_secs().max(1)),
            Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout.as_secs()),
            sockets_attr(fds),
        ];
        self.genl.request(self.family.id, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &attrs).map(|_| ())
    }

    /// Changes the device size online.
    pub(crate) fn resize(&mut self, index: u32, size: u64) -> io::Result<()> {
        let attrs = vec![Attr::U32(NBD_ATTR_INDEX, index), Attr::U64(NBD_ATTR_SIZE_BYTES, size)];
        self.genl.request(self.family.id, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &attrs).map(|_| ())
    }

    /// Disconnects device `index`.
    pub(crate) fn disconnect(&mut self, index: u32) -> io::Result<()> {
        self.genl
            .request(self.family.id, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &[Attr::U32(NBD_ATTR_INDEX, index)])
            .map(|_| ())
    }

    /// Whether device `index` has a configuration (is connected).
    pub(crate) fn is_connected(&mut self, index: u32) -> io::Result<bool> {
        let replies =
            self.genl.request(self.family.id, NBD_CMD_STATUS, NBD_GENL_VERSION, &[Attr::U32(NBD_ATTR_INDEX, index)])?;
        for r in &replies {
            for (t, list) in parse_attrs(r) {
                if t != NBD_ATTR_DEVICE_LIST {
                    continue;
                }
                for (it, item) in parse_attrs(list) {
                    if it != NBD_DEVICE_ITEM {
                        continue;
                    }
                    let a = parse_attrs(item);
                    let idx = a.iter().find(|(t, _)| *t == NBD_DEVICE_INDEX).and_then(|(_, p)| u32_of(p));
                    let conn = a.iter().find(|(t, _)| *t == NBD_DEVICE_CONNECTED).and_then(|(_, p)| p.first().copied());
                    if idx == Some(index) {
                        return Ok(conn == Some(1));
                    }
                }
            }
        }
        Ok(false)
    }
}

/// The index N of a `/dev/nbdN` path.
pub fn device_index(path: &std::path::Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_nesting_and_padding() {
        let a = vec![
            Attr::U32(NBD_ATTR_INDEX, 3),
            Attr::U64(NBD_ATTR_SIZE_BYTES, 1 << 33),
            Attr::Str(2, "nbd".into()),
            sockets_attr(&[7, 9]),
        ];
        let msg = build_message(0x1c, NBD_CMD_CONNECT, 1, 42, NLM_F_REQUEST | NLM_F_ACK, &a);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(msg[16], NBD_CMD_CONNECT);
        let attrs = parse_attrs(&msg[20..]);
        assert_eq!(attrs.len(), 4);
        assert_eq!(u32_of(attrs[0].1), Some(3));
        assert_eq!(attrs[1].1, &(1u64 << 33).to_ne_bytes());
        assert_eq!(attrs[2].1, b"nbd\0");
        assert_eq!(attrs[3].0, NBD_ATTR_SOCKETS, "the nested flag is masked off");
        let socks: Vec<u32> = parse_attrs(attrs[3].1)
            .iter()
            .filter_map(|(_, item)| parse_attrs(item).first().and_then(|(_, p)| u32_of(p)))
            .collect();
        assert_eq!(socks, vec![7, 9]);
    }

    #[test]
    fn link_dead_notifications_parse_and_garbage_does_not() {
        let msg = build_message(0x1c, NBD_CMD_LINK_DEAD, 1, 0, 0, &[Attr::U32(NBD_ATTR_INDEX, 5)]);
        assert_eq!(parse_link_dead(&msg), Some(5));
        let other = build_message(0x1c, NBD_CMD_STATUS, 1, 0, 0, &[Attr::U32(NBD_ATTR_INDEX, 5)]);
        assert_eq!(parse_link_dead(&other), None);
        assert_eq!(parse_link_dead(&[0xff; 7]), None);
        let mut bad = msg.clone();
        bad[20] = 200; // attribute length past the end
        assert_eq!(parse_link_dead(&bad), None);
        for cut in 0..msg.len() {
            let _ = parse_link_dead(&msg[..cut]);
            let _ = parse_attrs(&msg[..cut]);
        }
    }

    #[test]
    fn family_reply_parsing() {
        let reply = {
            let mut v = Vec::new();
            Attr::U32(CTRL_ATTR_FAMILY_ID, 0x1d).encode(&mut v); // u16 in a 4-byte payload is what the kernel sends
            Attr::Nested(
                CTRL_ATTR_MCAST_GROUPS,
                vec![Attr::Nested(
                    1,
                    vec![
                        Attr::Str(CTRL_ATTR_MCAST_GRP_NAME, NBD_MCAST_GROUP.into()),
                        Attr::U32(CTRL_ATTR_MCAST_GRP_ID, 9),
                    ],
                )],
            )
            .encode(&mut v);
            v
        };
        assert_eq!(parse_family(&[reply]), Some(NbdFamily { id: 0x1d, mcast_group: Some(9) }));
    }

    #[test]
    fn device_paths() {
        assert_eq!(device_index(std::path::Path::new("/dev/nbd0")), Some(0));
        assert_eq!(device_index(std::path::Path::new("/dev/nbd15")), Some(15));
        assert_eq!(device_index(std::path::Path::new("/dev/sda")), None);
    }

    #[test]
    fn this_host_without_the_driver_gets_a_clear_error() {
        // The development and CI host kernels have no nbd driver (the guest
        // tests use a Debian kernel); where one exists, opening succeeds.
        match NbdNetlink::open() {
            Ok(nl) => assert!(nl.family.id > 0),
            Err(e) => assert!(e.to_string().contains("modprobe nbd") || e.raw_os_error().is_some(), "{e}"),
        }
    }
}
