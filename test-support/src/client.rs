//! A small NBD client: fixed-newstyle handshake with `NBD_OPT_GO`, optional
//! structured replies, and pipelined requests matched by cookie. Used by the
//! tests and the benches (real peers are tested with their own clients).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use nbd_frontend::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("server error {errno}: {message}")]
    Nbd { errno: u32, message: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Nbd { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

#[derive(Debug)]
enum Done {
    Ok,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

struct Pending {
    /// For reads: offset and length of the request.
    read: Option<(u64, u32)>,
    buf: Vec<u8>,
    extents: Vec<Extent>,
    error: Option<(u32, String)>,
    tx: oneshot::Sender<Result<Done>>,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

pub struct Client {
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: PendingMap,
    next_cookie: AtomicU64,
    size: u64,
    flags: u16,
    structured: bool,
    reader: tokio::task::JoinHandle<()>,
}

fn lock(p: &PendingMap) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
    // A test that panicked while holding it has failed already; the data is
    // still what the reader left.
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn read_u32<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await?;
    Ok(u64::from_be_bytes(b))
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    w.write_all(&v).await
}

/// Reads one option reply: (type, data).
async fn option_reply<R: AsyncRead + Unpin>(r: &mut R, opt: u32) -> Result<(u32, Vec<u8>)> {
    let magic = read_u64(r).await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ClientError::Protocol(format!("bad option reply magic {magic:#x}")));
    }
    let o = read_u32(r).await?;
    let kind = read_u32(r).await?;
    let len = read_u32(r).await?;
    if o != opt {
        return Err(ClientError::Protocol(format!("reply for option {o}, expected {opt}")));
    }
    if len > 1 << 20 {
        return Err(ClientError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok((kind, data))
}

impl Client {
    /// Connects to a Unix socket and negotiates `export` with NBD_OPT_GO.
    pub async fn connect_unix(path: &Path, export: &str, structured: bool) -> Result<Client> {
        let s = UnixStream::connect(path).await?;
        Self::handshake(s, export, structured).await
    }

    async fn handshake(mut s: UnixStream, export: &str, structured: bool) -> Result<Client> {
        let magic = read_u64(&mut s).await?;
        let ihaveopt = read_u64(&mut s).await?;
        if magic != NBDMAGIC || ihaveopt != IHAVEOPT {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let mut hf = [0u8; 2];
        s.read_exact(&mut hf).await?;
        let hflags = u16::from_be_bytes(hf);
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes()).await?;
        let mut use_structured = false;
        if structured {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[]).await?;
            let (kind, _) = option_reply(&mut s, OPT_STRUCTURED_REPLY).await?;
            use_structured = kind == REP_ACK;
            if use_structured {
                let mut q = (export.len() as u32).to_be_bytes().to_vec();
                q.extend_from_slice(export.as_bytes());
                q.extend_from_slice(&1u32.to_be_bytes());
                q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
                q.extend_from_slice(BASE_ALLOCATION.as_bytes());
                send_option(&mut s, OPT_SET_META_CONTEXT, &q).await?;
                loop {
                    let (kind, _) = option_reply(&mut s, OPT_SET_META_CONTEXT).await?;
                    if kind != REP_META_CONTEXT {
                        break;
                    }
                }
            }
        }
        let mut go = (export.len() as u32).to_be_bytes().to_vec();
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut s, OPT_GO, &go).await?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let (kind, data) = option_reply(&mut s, OPT_GO).await?;
            match kind {
                REP_INFO if data.len() >= 12 && data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(
                        data[2..10].try_into().map_err(|_| ClientError::Protocol("info".into()))?,
                    ));
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                REP_ACK => break,
                k if k & (1 << 31) != 0 => {
                    return Err(ClientError::Nbd { errno: k, message: String::from_utf8_lossy(&data).into_owned() })
                }
                k => return Err(ClientError::Protocol(format!("unexpected option reply {k}"))),
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no NBD_INFO_EXPORT".into()))?;
        let (rd, wr) = s.into_split();
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let reader = tokio::spawn(reader_loop(rd, pending.clone(), use_structured));
        Ok(Client {
            writer: tokio::sync::Mutex::new(wr),
            pending,
            next_cookie: AtomicU64::new(1),
            size,
            flags,
            structured: use_structured,
            reader,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn flags(&self) -> u16 {
        self.flags
    }
    pub fn structured(&self) -> bool {
        self.structured
    }

    async fn request(&self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Result<Done> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read = (kind == CMD_READ).then_some((offset, len));
        let buf = if kind == CMD_READ { vec![0u8; len as usize] } else { Vec::new() };
        lock(&self.pending).insert(cookie, Pending { read, buf, extents: Vec::new(), error: None, tx });
        let h = RequestHeader { flags, kind, cookie, offset, len };
        {
            let mut w = self.writer.lock().await;
            let res = async {
                w.write_all(&h.encode()).await?;
                if !payload.is_empty() {
                    w.write_all(payload).await?;
                }
                io::Result::Ok(())
            }
            .await;
            if let Err(e) = res {
                lock(&self.pending).remove(&cookie);
                return Err(e.into());
            }
        }
        rx.await.map_err(|_| ClientError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")))?
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        match self.request(CMD_READ, 0, offset, len, &[]).await? {
            Done::Data(d) => Ok(d),
            _ => Ok(Vec::new()),
        }
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[]).await.map(|_| ())
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.request(CMD_WRITE_ZEROES, flags, offset, len, &[]).await.map(|_| ())
    }

    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>> {
        match self.request(CMD_BLOCK_STATUS, 0, offset, len, &[]).await? {
            Done::Extents(e) => Ok(e),
            _ => Ok(Vec::new()),
        }
    }

    /// Sends an arbitrary request (tests of malformed traffic).
    pub async fn raw(&self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Result<()> {
        self.request(kind, flags, offset, len, payload).await.map(|_| ())
    }

    /// Soft disconnect.
    pub async fn disconnect(self) -> Result<()> {
        let h = RequestHeader { flags: 0, kind: CMD_DISC, cookie: 0, offset: 0, len: 0 };
        let mut w = self.writer.lock().await;
        w.write_all(&h.encode()).await?;
        w.shutdown().await?;
        drop(w);
        // The server answers nothing to DISC; wait until it closes its side.
        while !self.reader.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn reader_loop(mut rd: tokio::net::unix::OwnedReadHalf, pending: PendingMap, structured: bool) {
    let res: Result<()> = async {
        loop {
            let magic = match read_u32(&mut rd).await {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let errno = read_u32(&mut rd).await?;
                    let cookie = read_u64(&mut rd).await?;
                    let Some(mut p) = lock(&pending).remove(&cookie) else {
                        return Err(ClientError::Protocol(format!("reply for unknown cookie {cookie}")));
                    };
                    if errno != 0 {
                        let _ = p.tx.send(Err(ClientError::Nbd { errno, message: String::new() }));
                    } else if p.read.is_some() {
                        if structured {
                            return Err(ClientError::Protocol("simple reply to a structured read".into()));
                        }
                        rd.read_exact(&mut p.buf).await?;
                        let _ = p.tx.send(Ok(Done::Data(p.buf)));
                    } else {
                        let _ = p.tx.send(Ok(Done::Ok));
                    }
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    rd.read_exact(&mut h).await?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let kind = u16::from_be_bytes([h[2], h[3]]);
                    let cookie =
                        u64::from_be_bytes(h[4..12].try_into().map_err(|_| ClientError::Protocol("hdr".into()))?);
                    let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                    if len > (MAX_PAYLOAD + 64) {
                        return Err(ClientError::Protocol(format!("chunk of {len} bytes")));
                    }
                    let mut body = vec![0u8; len as usize];
                    rd.read_exact(&mut body).await?;
                    let mut map = lock(&pending);
                    let Some(p) = map.get_mut(&cookie) else {
                        return Err(ClientError::Protocol(format!("chunk for unknown cookie {cookie}")));
                    };
                    match kind {
                        REPLY_TYPE_NONE => {}
                        REPLY_TYPE_OFFSET_DATA => {
                            let (roff, rlen) =
                                p.read.ok_or_else(|| ClientError::Protocol("data for a non-read".into()))?;
                            if body.len() < 8 {
                                return Err(ClientError::Protocol("short data chunk".into()));
                            }
                            let off = u64::from_be_bytes(
                                body[0..8].try_into().map_err(|_| ClientError::Protocol("off".into()))?,
                            );
                            let n = body.len() - 8;
                            if off < roff || off + n as u64 > roff + rlen as u64 {
                                return Err(ClientError::Protocol("data chunk outside the request".into()));
                            }
                            let at = (off - roff) as usize;
                            p.buf[at..at + n].copy_from_slice(&body[8..]);
                        }
                        REPLY_TYPE_OFFSET_HOLE => {
                            let (roff, _) =
                                p.read.ok_or_else(|| ClientError::Protocol("hole for a non-read".into()))?;
                            let off = u64::from_be_bytes(
                                body[0..8].try_into().map_err(|_| ClientError::Protocol("off".into()))?,
                            );
                            let n = u32::from_be_bytes(
                                body[8..12].try_into().map_err(|_| ClientError::Protocol("len".into()))?,
                            );
                            let at = (off - roff) as usize;
                            p.buf[at..at + n as usize].fill(0);
                        }
                        REPLY_TYPE_BLOCK_STATUS => {
                            for c in body[4..].chunks_exact(8) {
                                p.extents.push(Extent {
                                    len: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                                    flags: u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                                });
                            }
                        }
                        k if k & (1 << 15) != 0 => {
                            let errno = u32::from_be_bytes(
                                body[0..4].try_into().map_err(|_| ClientError::Protocol("err".into()))?,
                            );
                            let mlen = u16::from_be_bytes([body[4], body[5]]) as usize;
                            let msg = String::from_utf8_lossy(&body[6..6 + mlen.min(body.len() - 6)]).into_owned();
                            p.error = Some((errno, msg));
                        }
                        k => return Err(ClientError::Protocol(format!("unknown chunk type {k}"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        let Some(p) = map.remove(&cookie) else { continue };
                        let out = match p.error {
                            Some((errno, message)) => Err(ClientError::Nbd { errno, message }),
                            None if p.read.is_some() => Ok(Done::Data(p.buf)),
                            None if !p.extents.is_empty() => Ok(Done::Extents(p.extents)),
                            None => Ok(Done::Ok),
                        };
                        let _ = p.tx.send(out);
                    }
                }
                m => return Err(ClientError::Protocol(format!("bad reply magic {m:#x}"))),
            }
        }
    }
    .await;
    if let Err(e) = res {
        tracing::debug!("nbd client reader stopped: {e}");
    }
    // Fail whatever is still waiting.
    for (_, p) in lock(&pending).drain() {
        let _ = p.tx.send(Err(ClientError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"))));
    }
}
