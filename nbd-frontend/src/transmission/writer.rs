//! The writer task of a connection: it sends replies as requests finish,
//! batching those that are ready into one vectored write, and gives back each
//! reply's slot and payload charges once it is written. A peer that stops
//! reading its replies for the stall timeout is declared dead.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::ending::Dead;
use super::reply::Reply;
use super::stalled;
use crate::stream::WriteHalf;

/// At most this many replies in one vectored write.
const MAX_BATCH_REPLIES: usize = 128;
/// A batch stops growing once its bodies hold this many bytes.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Sends the replies from `rx` until every sender is gone (then shuts the
/// write half down, unless the connection was `handed_over`) or a write
/// fails or stalls (then `dead` says why).
pub(super) async fn run(
    mut wr: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    dead: Rc<Dead>,
    stall: Duration,
    handed_over: Rc<Cell<bool>>,
) {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH_REPLIES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.body_len();
        batch.push(first);
        while batch.len() < MAX_BATCH_REPLIES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.body_len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            r.push_slices(&mut slices);
        }
        let res = write_all_vectored(&mut wr, &mut slices, stall).await;
        drop(slices);
        // Written (or lost with the connection): slots and bytes come back.
        batch.clear();
        if let Err(e) = res {
            dead.set(format!("cannot send replies: {e}"));
            // Dropping the receiver makes every later reply drop at its sender,
            // releasing what it holds.
            return;
        }
    }
    // A socket handed over stays open for the next process: no FIN, also not
    // the one tokio's Unix write half sends when it is dropped.
    match (handed_over.get(), wr) {
        (true, WriteHalf::Unix(w)) => w.forget(),
        (_, mut wr) => {
            let _ = wr.shutdown().await;
        }
    }
}

/// Writes every slice, failing if a single write makes no progress for `stall`.
async fn write_all_vectored(wr: &mut WriteHalf, mut slices: &mut [IoSlice<'_>], stall: Duration) -> io::Result<()> {
    while !slices.is_empty() {
        let n = tokio::time::timeout(stall, wr.write_vectored(slices))
            .await
            .map_err(|_| stalled("the peer reading its replies", stall))??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    // A TLS library may keep encrypted records it could not send yet (rustls
    // does): they must go out now, not when the next reply comes. A no-op
    // for plain sockets.
    tokio::time::timeout(stall, wr.flush()).await.map_err(|_| stalled("the peer reading its replies", stall))?
}
