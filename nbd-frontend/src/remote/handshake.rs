//! The client side of the fixed-newstyle handshake: the greeting, STARTTLS
//! when the URI asks for TLS, structured replies, the `base:allocation` meta
//! context, then `NBD_OPT_GO` with the information requests for the export's
//! name, description and block sizes (`NBD_OPT_EXPORT_NAME` for a server
//! without GO). What the server says ends up in [`ExportInfo`].

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::*;

/// A byte stream the handshake and the transmission phase run on (TCP, a
/// Unix socket, or TLS over either).
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

pub(super) type BoxStream = Box<dyn Stream>;

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server refused: final, reconnecting will not help.
    #[error("{0}")]
    Refused(String),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
}

impl HandshakeError {
    /// Worth trying again later (the link or the server may come back).
    pub(super) fn is_transient(&self) -> bool {
        match self {
            HandshakeError::Io(_) => true,
            HandshakeError::Refused(_) | HandshakeError::Protocol(_) => false,
        }
    }
}

type Result<T> = std::result::Result<T, HandshakeError>;

fn protocol<T>(msg: impl Into<String>) -> Result<T> {
    Err(HandshakeError::Protocol(msg.into()))
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    /// Its size in bytes.
    pub(crate) size: u64,
    /// Transmission flags (`TF_*`).
    pub(crate) flags: u16,
    /// Block-size constraints (NBD_INFO_BLOCK_SIZE; defaults when absent).
    pub(crate) min_block: u32,
    pub(crate) preferred_block: u32,
    pub(crate) max_payload: u32,
    /// The name and description the server reported, if any.
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) structured: bool,
    /// The id of `base:allocation`, when the server agreed to it.
    pub(crate) allocation_context: Option<u32>,
}

impl ExportInfo {
    /// Transmission flag `flag` is set.
    pub(crate) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// What must stay the same across reconnects for the export to be the
    /// same one (its size may change: the engine checks sizes itself).
    pub(super) fn same_export_key(&self) -> String {
        format!(
            "name={:?} description={:?} flags={:#06x} blocks={}/{}/{}",
            self.name.as_deref().unwrap_or(""),
            self.description.as_deref().unwrap_or(""),
            self.flags,
            self.min_block,
            self.preferred_block,
            self.max_payload
        )
    }
}

async fn read_u16<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b).await?;
    Ok(u16::from_be_bytes(b))
}

async fn read_u32<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

async fn read_u64<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await?;
    Ok(u64::from_be_bytes(b))
}

async fn send_option<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    w.write_all(&v).await?;
    w.flush().await
}

/// One option reply: its type and data.
async fn option_reply<R: AsyncRead + Unpin + ?Sized>(r: &mut R, opt: u32) -> Result<(u32, Vec<u8>)> {
    let magic = read_u64(r).await?;
    if magic != OPT_REPLY_MAGIC {
        return protocol(format!("option reply magic {magic:#x}"));
    }
    let o = read_u32(r).await?;
    let kind = read_u32(r).await?;
    let len = read_u32(r).await?;
    if o != opt {
        return protocol(format!("a reply to option {o} while option {opt} was asked"));
    }
    if len as usize > MAX_STRING * 4 + 64 {
        return protocol(format!("a {len}-byte option reply"));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok((kind, data))
}

fn error_text(kind: u32, data: &[u8]) -> String {
    let what = match kind {
        REP_ERR_UNSUP => "not supported",
        REP_ERR_POLICY => "forbidden by the server's policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not available on the server's platform",
        REP_ERR_TLS_REQD => "the server requires TLS (use nbds://)",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block-size negotiation",
        REP_ERR_TOO_BIG => "too big",
        _ => "refused",
    };
    let msg = String::from_utf8_lossy(data);
    let msg = msg.trim();
    if msg.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({msg})")
    }
}

/// Reads the greeting and answers it. Returns once the server waits for
/// options, with whether both sides dropped the 124 zero bytes of EXPORT_NAME.
pub(super) async fn greet<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(s: &mut S) -> Result<bool> {
    let magic = read_u64(s).await?;
    if magic != NBDMAGIC {
        return protocol("not an NBD server (no NBDMAGIC)");
    }
    let style = read_u64(s).await?;
    if style != IHAVEOPT {
        return Err(HandshakeError::Refused(
            "the server speaks the oldstyle protocol, which has no export names or options".into(),
        ));
    }
    let hflags = read_u16(s).await?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Refused("the server does not speak fixed newstyle".into()));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    Ok(hflags & FLAG_NO_ZEROES != 0)
}

/// Asks for TLS. After `Ok` the caller runs the TLS handshake on the stream.
pub(super) async fn starttls<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(s: &mut S) -> Result<()> {
    send_option(s, OPT_STARTTLS, &[]).await?;
    let (kind, data) = option_reply(s, OPT_STARTTLS).await?;
    match kind {
        REP_ACK => Ok(()),
        k if k & (1 << 31) != 0 => Err(HandshakeError::Refused(format!("STARTTLS: {}", error_text(k, &data)))),
        k => protocol(format!("reply type {k} to STARTTLS")),
    }
}

fn name_and_queries(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut q = (export.len() as u32).to_be_bytes().to_vec();
    q.extend_from_slice(export.as_bytes());
    q.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for c in queries {
        q.extend_from_slice(&(c.len() as u32).to_be_bytes());
        q.extend_from_slice(c.as_bytes());
    }
    q
}

/// Negotiates options after the greeting (and TLS) and enters transmission.
pub(super) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    if export.len() > MAX_STRING {
        return Err(HandshakeError::Refused(format!("an export name of {} bytes is too long", export.len())));
    }
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let (kind, _) = option_reply(s, OPT_STRUCTURED_REPLY).await?;
    let structured = kind == REP_ACK;
    let mut allocation_context = None;
    if structured {
        send_option(s, OPT_SET_META_CONTEXT, &name_and_queries(export, &[BASE_ALLOCATION])).await?;
        loop {
            let (kind, data) = option_reply(s, OPT_SET_META_CONTEXT).await?;
            match kind {
                REP_META_CONTEXT if data.len() >= 4 => {
                    let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                    if &data[4..] == BASE_ALLOCATION.as_bytes() {
                        allocation_context = Some(id);
                    }
                }
                REP_META_CONTEXT => return protocol("a short meta context reply"),
                REP_ACK => break,
                // Refused or unknown: go on without it (the copier reads holes).
                k if k & (1 << 31) != 0 => break,
                k => return protocol(format!("reply type {k} to SET_META_CONTEXT")),
            }
        }
    }
    let mut go = (export.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(export.as_bytes());
    let wanted = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    go.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
    for w in wanted {
        go.extend_from_slice(&w.to_be_bytes());
    }
    send_option(s, OPT_GO, &go).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: MIN_BLOCK,
        preferred_block: PREFERRED_BLOCK,
        max_payload: MAX_PAYLOAD,
        name: None,
        description: None,
        structured,
        allocation_context,
    };
    let mut have_export = false;
    loop {
        let (kind, data) = option_reply(s, OPT_GO).await?;
        match kind {
            REP_INFO => parse_info(&mut info, &data, &mut have_export)?,
            REP_ACK => break,
            REP_ERR_UNSUP => return export_name_fallback(s, export, info, no_zeroes).await,
            k if k & (1 << 31) != 0 => {
                return Err(HandshakeError::Refused(format!("export {export:?}: {}", error_text(k, &data))))
            }
            k => return protocol(format!("reply type {k} to GO")),
        }
    }
    if !have_export {
        return protocol("GO succeeded without NBD_INFO_EXPORT");
    }
    check_block_sizes(&info)?;
    Ok(info)
}

fn parse_info(info: &mut ExportInfo, d: &[u8], have_export: &mut bool) -> Result<()> {
    if d.len() < 2 {
        return protocol("an empty NBD_REP_INFO");
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).chars().take(256).collect::<String>();
    match u16::from_be_bytes([d[0], d[1]]) {
        INFO_EXPORT if d.len() == 12 => {
            info.size = u64::from_be_bytes([d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9]]);
            info.flags = u16::from_be_bytes([d[10], d[11]]);
            *have_export = true;
        }
        INFO_NAME => info.name = Some(text(&d[2..])),
        INFO_DESCRIPTION => info.description = Some(text(&d[2..])),
        INFO_BLOCK_SIZE if d.len() == 14 => {
            let u = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            info.min_block = u(2);
            info.preferred_block = u(6);
            info.max_payload = u(10);
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => return protocol(format!("an NBD_REP_INFO of {} bytes", d.len())),
        _ => {} // information we did not ask for is ignored, as the spec says
    }
    Ok(())
}

/// The spec's rules for the constraints: powers of two, min ≤ preferred,
/// the maximum a multiple of the minimum.
fn check_block_sizes(info: &ExportInfo) -> Result<()> {
    let (min, pref, max) = (info.min_block, info.preferred_block, info.max_payload);
    if !min.is_power_of_two() || min > 64 << 10 || !pref.is_power_of_two() || pref < min {
        return protocol(format!("block sizes min {min} preferred {pref}"));
    }
    if max < min || !max.is_multiple_of(min) {
        return protocol(format!("maximum payload {max} with minimum block {min}"));
    }
    Ok(())
}

/// A server without GO: the old way, which reports only the size and flags.
async fn export_name_fallback<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    s: &mut S,
    export: &str,
    mut info: ExportInfo,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    s.write_all(&v).await?;
    s.flush().await?;
    info.size = read_u64(s).await?;
    info.flags = read_u16(s).await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await?;
    }
    info.name = Some(export.to_string());
    Ok(info)
}
