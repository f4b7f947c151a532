//! The remote device: an NBD export seen by the engine as an
//! [`engine::RemoteDevice`].
//!
//! The engine's futures are polled on its own threads; each only queues wire
//! requests (`requests.rs`) and waits for their answers. The work runs on a
//! thread of the device's own: the connection slots that reconnect and the
//! sweeper that fails requests after `--remote-timeout` (`slots.rs`).
//!
//! Engine requests are split to the server's block-size constraints: pieces
//! of at most the maximum payload, and an unaligned write becomes a
//! read-modify-write of the covering blocks (the engine holds that range
//! exclusively, as it does for an O_DIRECT disk).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{AlignedIo, DeviceIdent, Extent, IoBuf, IoFuture, LinkState, RemoteDevice, SharedBuf};
use tokio::sync::oneshot;

use super::dial::Dialer;
use super::handshake::{ExportInfo, HandshakeError};
use super::requests::{Payload, Reply, Req};
use super::slots::{self, IoThread, Shared};
use super::tls::TlsClient;
use super::uri::{NbdUri, Transport};
use crate::proto::*;

/// How a remote device behaves on a bad link.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// How long a request waits for the link (reconnects included) before it
    /// fails and the device with it.
    pub timeout: Duration,
    /// Connections used when the server allows several (CAN_MULTI_CONN).
    pub connections: usize,
}

impl RemoteOptions {
    /// `--remote-timeout`'s default.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// `--remote-connections`' default.
    pub const DEFAULT_CONNECTIONS: usize = 4;

    /// No reply and no bytes for this long while requests wait: the
    /// connection is taken for dead and replaced (a quarter of the timeout,
    /// between 2 and 15 s).
    fn stall(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_secs(2), Duration::from_secs(15))
    }
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions { timeout: Self::DEFAULT_TIMEOUT, connections: Self::DEFAULT_CONNECTIONS }
    }
}

/// TRIM and WRITE_ZEROES carry no payload; their length is still 32 bits.
const MAX_NO_PAYLOAD: u64 = 1 << 30;

/// An NBD export opened as a device.
pub struct RemoteExport {
    name: PathBuf,
    endpoint: String,
    info: ExportInfo,
    shared: Arc<Shared>,
    /// Cleared when the server refuses a FAST_ZERO request.
    fast_zero: AtomicBool,
    _io: IoThread,
}

impl std::fmt::Debug for RemoteExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteExport").field("endpoint", &self.endpoint).field("info", &self.info).finish()
    }
}

impl Drop for RemoteExport {
    fn drop(&mut self) {
        self.shared.requests.close();
    }
}

/// Why an export could not be opened (naming the URI).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The server could not be reached or the connection failed.
    #[error("{context}: {cause}")]
    Io {
        /// What could not be done, naming the URI.
        context: String,
        /// The error of the connection.
        cause: io::Error,
    },
    /// The server refused, or the URI's credentials are unusable.
    #[error("{0}")]
    Refused(String),
}

impl RemoteExport {
    /// Connects to `uri` and negotiates the export; fails at once (no
    /// retries) when the server cannot be reached or refuses. `locate` maps
    /// file names (the socket, TLS credentials) to where this process can
    /// reach them.
    pub fn open(
        uri: &NbdUri,
        name: &Path,
        opts: &RemoteOptions,
        locate: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Arc<RemoteExport>, OpenError> {
        let endpoint = uri.endpoint();
        let fail = |why: String| OpenError::Refused(format!("{}: {why}", name.display()));
        let tls = match &uri.tls {
            Some(c) => Some(TlsClient::new(c, uri.tls_server_name(), locate).map_err(fail)?),
            None => None,
        };
        let socket = match &uri.transport {
            Transport::Unix { socket } => Some(locate(socket)),
            Transport::Tcp { .. } => None,
        };
        let dialer = Arc::new(Dialer { uri: uri.clone(), socket, tls });
        let io = IoThread::spawn().map_err(|e| fail(format!("cannot start its I/O thread: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let d = dialer.clone();
            io.handle.spawn(async move {
                let _ = tx.send(d.dial().await);
            });
        }
        let (stream, info) = rx.recv().map_err(|_| fail("its I/O thread stopped".into()))?.map_err(|e| match e {
            HandshakeError::Io(cause) => {
                OpenError::Io { context: format!("cannot connect to {}", name.display()), cause }
            }
            e => fail(e.to_string()),
        })?;
        let connections = if info.has(TF_CAN_MULTI_CONN) { opts.connections.clamp(1, 16) } else { 1 };
        let shared = Arc::new(Shared::new(endpoint.clone(), info.size, opts.timeout, opts.stall()));
        slots::start(&io, &shared, dialer, connections, (stream, info.clone()));
        tracing::info!(
            "{endpoint}: {} bytes, flags {:#06x}, blocks {}/{}/{}, {} connection(s){}{}",
            info.size,
            info.flags,
            info.min_block,
            info.preferred_block,
            info.max_payload,
            connections,
            if info.structured { ", structured replies" } else { "" },
            if info.allocation_context.is_some() { ", base:allocation" } else { "" },
        );
        Ok(Arc::new(RemoteExport {
            name: name.to_path_buf(),
            endpoint,
            fast_zero: AtomicBool::new(info.has(TF_SEND_WRITE_ZEROES)),
            info,
            shared,
            _io: io,
        }))
    }

    /// The server says the export is read-only.
    pub fn read_only(&self) -> bool {
        self.info.has(TF_READ_ONLY)
    }

    fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Payload,
    ) -> oneshot::Receiver<io::Result<Reply>> {
        let (tx, rx) = oneshot::channel();
        self.shared.requests.push(Req {
            cmd,
            flags,
            offset,
            len,
            payload,
            deadline: Instant::now() + self.shared.timeout,
            done: Some(tx),
        });
        rx
    }

    async fn wait(&self, rx: oneshot::Receiver<io::Result<Reply>>) -> io::Result<Reply> {
        rx.await.unwrap_or_else(|_| Err(io::Error::other(format!("{}: the device was closed", self.endpoint))))
    }

    /// Sends the pieces of one engine request at once, then waits for all;
    /// the first error wins.
    async fn all(&self, rxs: Vec<oneshot::Receiver<io::Result<Reply>>>) -> io::Result<()> {
        let mut first = Ok(());
        for rx in rxs {
            if let Err(e) = self.wait(rx).await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    fn align(&self) -> u64 {
        self.info.min_block as u64
    }

    fn max_piece(&self) -> u64 {
        self.info.max_payload.max(self.info.min_block) as u64
    }

    fn aligned(&self, off: u64, len: u64) -> bool {
        off.is_multiple_of(self.align()) && len.is_multiple_of(self.align())
    }

    fn read_only_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is a read-only export", self.endpoint))
    }

    async fn flush_now(&self) -> io::Result<()> {
        if !self.info.has(TF_SEND_FLUSH) {
            return Ok(());
        }
        let rx = self.submit(CMD_FLUSH, 0, 0, 0, Payload::None);
        self.wait(rx).await.map(|_| ())
    }

    /// Zeroes an aligned range with WRITE_ZEROES (split to 32-bit lengths).
    async fn zero_aligned(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()> {
        let fast = may_unmap && self.info.has(TF_SEND_FAST_ZERO) && self.fast_zero.load(Ordering::Relaxed);
        let mut flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        if fua && self.info.has(TF_SEND_FUA) {
            flags |= CMD_FLAG_FUA;
        }
        let step = MAX_NO_PAYLOAD - MAX_NO_PAYLOAD % self.align();
        let zeroes = |flags: u16| {
            pieces(len, step)
                .map(|(at, n)| self.submit(CMD_WRITE_ZEROES, flags, off + at, n as u32, Payload::None))
                .collect()
        };
        if fast {
            match self.all(zeroes(flags | CMD_FLAG_FAST_ZERO)).await {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    // Zeroing is not faster than writing there: say so from now
                    // on (our own clients see it), and zero the slow way.
                    self.fast_zero.store(false, Ordering::Relaxed);
                }
                r => return self.after_fua(r, fua).await,
            }
        }
        let r = self.all(zeroes(flags)).await;
        self.after_fua(r, fua).await
    }

    async fn after_fua(&self, r: io::Result<()>, fua: bool) -> io::Result<()> {
        r?;
        if fua && !self.info.has(TF_SEND_FUA) {
            self.flush_now().await?;
        }
        Ok(())
    }

    /// Writes zeroes from a buffer (a server without WRITE_ZEROES, or the
    /// unaligned edges of a range).
    async fn zero_by_writing(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let zeroes = SharedBuf::new(IoBuf::zeroed(STEP.min(len) as usize));
        for (at, n) in pieces(len, STEP) {
            self.write_at_inner(&zeroes, 0, n as usize, off + at, fua).await?;
        }
        Ok(())
    }

    async fn write_at_inner(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()> {
        if self.aligned(off, len as u64) {
            return self.write_aligned(buf, buf_off, len, off, fua).await;
        }
        // Read-modify-write of the covering blocks; the engine holds them
        // exclusively (alignment() tells it to).
        // SAFETY: a write only reads its buffer.
        let data = unsafe { buf.slice(buf_off, len) };
        self.write_unaligned(data, off, fua).await
    }

    async fn allocation_inner(&self, off: u64, len: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
        if self.info.allocation_context.is_none() || len == 0 {
            return Ok(vec![Extent { len, hole: false }]);
        }
        let a = self.align();
        let start = off - off % a;
        let want = ((off + len).div_ceil(a) * a - start).min((u32::MAX as u64) - (u32::MAX as u64) % a);
        let rx = self.submit(CMD_BLOCK_STATUS, 0, start, want as u32, Payload::None);
        let exts = match self.wait(rx).await? {
            Reply::Extents(e) => e,
            Reply::Done => Vec::new(),
        };
        let end = off + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = start;
        for (elen, flags) in exts {
            if elen == 0 || out.len() >= max_extents.max(1) {
                break;
            }
            let (s, e) = (pos.max(off), (pos + elen as u64).min(end));
            pos += elen as u64;
            if e <= s {
                if pos >= end {
                    break;
                }
                continue;
            }
            // Both bits: not allocated *and* reads as zeroes (a hole over a
            // backing file is not zeroes).
            let hole = flags & (STATE_HOLE | STATE_ZERO) == STATE_HOLE | STATE_ZERO;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += e - s,
                _ => out.push(Extent { len: e - s, hole }),
            }
            if pos >= end {
                break;
            }
        }
        if out.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: BLOCK_STATUS answered no extent for offset {off}", self.endpoint),
            ));
        }
        Ok(out)
    }

    /// What identifies the export: where it is and what the server says of it.
    fn stack(&self) -> String {
        let mut desc = self.info.description.clone().unwrap_or_default();
        desc.truncate(desc.char_indices().nth(200).map_or(desc.len(), |(i, _)| i));
        format!(
            "nbd endpoint={} {}",
            self.endpoint,
            ExportInfo { description: Some(desc), ..self.info.clone() }.same_export_key()
        )
    }
}

/// Aligned transfers, split to the maximum payload; read-modify-write
/// ([`AlignedIo`]'s unaligned transfers) is built on them.
impl AlignedIo for RemoteExport {
    fn transfer_alignment(&self) -> u64 {
        self.align()
    }

    async fn read_aligned(&self, buf: &Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> io::Result<()> {
        let rxs = pieces(len as u64, self.max_piece())
            .map(|(at, n)| {
                self.submit(CMD_READ, 0, off + at, n as u32, Payload::Read(buf.clone(), buf_off + at as usize))
            })
            .collect();
        self.all(rxs).await
    }

    async fn write_aligned(
        &self,
        buf: &Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> io::Result<()> {
        if self.read_only() {
            return Err(self.read_only_error());
        }
        let fua_flag = fua && self.info.has(TF_SEND_FUA);
        let flags = if fua_flag { CMD_FLAG_FUA } else { 0 };
        let rxs = pieces(len as u64, self.max_piece())
            .map(|(at, n)| {
                self.submit(CMD_WRITE, flags, off + at, n as u32, Payload::Write(buf.clone(), buf_off + at as usize))
            })
            .collect();
        self.all(rxs).await?;
        if fua && !fua_flag {
            self.flush_now().await?;
        }
        Ok(())
    }
}

impl RemoteDevice for RemoteExport {
    fn name(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn current_size(&self) -> io::Result<u64> {
        Ok(self.shared.size.load(Ordering::Acquire))
    }

    fn alignment(&self) -> u64 {
        self.align()
    }

    fn zeroing_is_fast(&self) -> bool {
        // On a link, zeroing costs a header instead of the bytes.
        self.info.has(TF_SEND_WRITE_ZEROES) && self.fast_zero.load(Ordering::Relaxed)
    }

    fn ident(&self) -> DeviceIdent {
        DeviceIdent {
            path: self.name.clone(),
            size: self.info.size,
            dev: 0,
            ino: 0,
            rdev: 0,
            birth: None,
            generation: None,
            stack: self.stack(),
        }
    }

    fn link(&self) -> LinkState {
        self.shared.link_state()
    }

    fn read_at<'a>(&'a self, buf: &'a Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> IoFuture<'a> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            if self.aligned(off, len as u64) {
                return self.read_aligned(buf, buf_off, len, off).await;
            }
            self.read_unaligned(buf, buf_off, len, off).await
        })
    }

    fn write_at<'a>(
        &'a self,
        buf: &'a Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        fua: bool,
    ) -> IoFuture<'a> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            self.write_at_inner(buf, buf_off, len, off, fua).await
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_now())
    }

    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool, fua: bool) -> IoFuture<'_> {
        Box::pin(async move {
            if len == 0 {
                return Ok(());
            }
            if self.read_only() {
                return Err(self.read_only_error());
            }
            if !self.info.has(TF_SEND_WRITE_ZEROES) {
                return self.zero_by_writing(off, len, fua).await;
            }
            // Unaligned edges are written, the aligned middle zeroed.
            let a = self.align();
            let mid_start = off.div_ceil(a) * a;
            let mid_end = ((off + len) / a) * a;
            if mid_end <= mid_start {
                return self.zero_by_writing(off, len, fua).await;
            }
            if mid_start > off {
                self.zero_by_writing(off, mid_start - off, fua).await?;
            }
            if off + len > mid_end {
                self.zero_by_writing(mid_end, off + len - mid_end, fua).await?;
            }
            self.zero_aligned(mid_start, mid_end - mid_start, may_unmap, fua).await
        })
    }

    fn discard(&self, off: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if !self.info.has(TF_SEND_TRIM) || self.read_only() {
                return Ok(());
            }
            // A hint: only whole blocks are passed on.
            let a = self.align();
            let start = off.div_ceil(a) * a;
            let end = ((off + len) / a) * a;
            let step = MAX_NO_PAYLOAD - MAX_NO_PAYLOAD % a;
            let mut rxs = Vec::new();
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(step);
                rxs.push(self.submit(CMD_TRIM, 0, pos, n as u32, Payload::None));
                pos += n;
            }
            self.all(rxs).await
        })
    }

    fn prefetch(&self, off: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if !self.info.has(TF_SEND_CACHE) || len == 0 {
                return Ok(());
            }
            let a = self.align();
            let start = off - off % a;
            let n = ((off + len).div_ceil(a) * a - start).min(self.max_piece());
            let rx = self.submit(CMD_CACHE, 0, start, n as u32, Payload::None);
            // A hint: a server that cannot is not an error.
            let _ = self.wait(rx).await;
            Ok(())
        })
    }

    fn allocation(&self, off: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(self.allocation_inner(off, len, max_extents))
    }
}

/// `[0, len)` in pieces of at most `step` bytes: (offset, length) pairs.
pub(super) fn pieces(len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(step)).map(move |i| (i * step, step.min(len - i * step)))
}
