//! Buffered reading of the request stream. Every read that waits for bytes the
//! peer has announced (the rest of a header, a payload) has the stall deadline;
//! waiting for the next request does not.

use std::io;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::stalled;
use crate::stream::ReadHalf;

/// How much is read from the socket at once (many small requests per read).
const READ_BUF: usize = 256 << 10;

/// The bytes read from the socket and not yet consumed.
pub(super) struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    stall: Duration,
}

impl Input {
    pub(super) fn new(leftover: Vec<u8>, stall: Duration) -> Input {
        let mut buf = vec![0u8; READ_BUF.max(leftover.len())];
        buf[..leftover.len()].copy_from_slice(&leftover);
        Input { end: leftover.len(), buf, start: 0, stall }
    }

    pub(super) fn available(&self) -> usize {
        self.end - self.start
    }

    /// The bytes read and not yet taken.
    pub(super) fn rest(&self) -> Vec<u8> {
        self.buf[self.start..self.end].to_vec()
    }

    /// Reads until `n` bytes are buffered. `Ok(false)` on EOF before any of them.
    pub(super) async fn fill(&mut self, rd: &mut ReadHalf, n: usize) -> io::Result<bool> {
        while self.available() < n {
            if self.start > 0 && self.buf.len() - self.end < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let got = if self.available() == 0 {
                rd.read(&mut self.buf[self.end..]).await?
            } else {
                tokio::time::timeout(self.stall, rd.read(&mut self.buf[self.end..]))
                    .await
                    .map_err(|_| stalled("a request header", self.stall))??
            };
            if got == 0 {
                if self.available() == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-request"));
            }
            self.end += got;
        }
        Ok(true)
    }

    pub(super) fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.buf[self.start..self.start + n];
        self.start += n;
        s
    }

    /// Fills `dst` from the buffer and then straight from the socket.
    pub(super) async fn read_into(&mut self, rd: &mut ReadHalf, dst: &mut [u8]) -> io::Result<()> {
        let from_buf = self.available().min(dst.len());
        dst[..from_buf].copy_from_slice(&self.buf[self.start..self.start + from_buf]);
        self.start += from_buf;
        let mut done = from_buf;
        while done < dst.len() {
            let got = tokio::time::timeout(self.stall, rd.read(&mut dst[done..]))
                .await
                .map_err(|_| stalled("a WRITE payload", self.stall))??;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-payload"));
            }
            done += got;
        }
        Ok(())
    }

    /// Discards `n` payload bytes without storing them.
    pub(super) async fn skip(&mut self, rd: &mut ReadHalf, mut n: u64) -> io::Result<()> {
        let from_buf = (self.available() as u64).min(n) as usize;
        self.start += from_buf;
        n -= from_buf as u64;
        let mut scratch = vec![0u8; 64 << 10];
        while n > 0 {
            let want = (n as usize).min(scratch.len());
            self.read_into(rd, &mut scratch[..want]).await?;
            n -= want as u64;
        }
        Ok(())
    }
}
