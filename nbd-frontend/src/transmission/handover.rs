//! Stopping a connection for a handover (`livemirror upgrade`).
//!
//! A connection with a [`HandoverSlot`] (the kernel's, which another process
//! takes over) stops only between two requests: a request whose header was
//! read is read whole and answered, and the bytes read past the last one go
//! into the slot. The socket is not shut down, so the next process goes on
//! from exactly where this one stopped.

use std::sync::{Arc, Mutex};

/// Where a connection stopped for a handover leaves the bytes it read past
/// its last request: the stream's next bytes, for the process that goes on.
#[derive(Clone, Default, Debug)]
pub(crate) struct HandoverSlot(Arc<Mutex<Option<Vec<u8>>>>);

impl HandoverSlot {
    /// The bytes, once the connection has stopped for a handover (`None`
    /// before, or if it ended otherwise).
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().ok().and_then(|mut v| v.take())
    }

    pub(super) fn put(&self, rest: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            *v = Some(rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use engine::rt::Worker;
    use engine::{BlockDevice, IoBuf, StatusExtent};

    use super::HandoverSlot;
    use crate::proto::*;
    use crate::server::{Server, ServerConfig};

    /// A device in memory.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn fast_zero(&self) -> bool {
            false
        }
        async fn read(&self, offset: u64, mut buf: IoBuf) -> (engine::Result<()>, IoBuf) {
            let at = offset as usize;
            let n = buf.len();
            buf.as_mut_slice().copy_from_slice(&self.0.lock().unwrap()[at..at + n]);
            (Ok(()), buf)
        }
        async fn write(&self, offset: u64, data: IoBuf, _fua: bool) -> engine::Result<()> {
            let at = offset as usize;
            self.0.lock().unwrap()[at..at + data.len()].copy_from_slice(data.as_slice());
            Ok(())
        }
        async fn flush(&self) -> engine::Result<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u64, _: bool) -> engine::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> engine::Result<()> {
            Ok(())
        }
        async fn cache(&self, _: u64, _: u64) -> engine::Result<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, _: u64, _: usize) -> engine::Result<Vec<StatusExtent>> {
            Ok(Vec::new())
        }
    }

    fn header(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
        RequestHeader { flags: 0, kind, cookie, offset, len }.encode()
    }

    /// Reads one simple reply with `len` bytes of data; checks its cookie and
    /// that it is no error.
    fn reply(c: &mut UnixStream, cookie: u64, len: usize) -> Vec<u8> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        c.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "error reply to {cookie}");
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
        let mut data = vec![0u8; len];
        c.read_exact(&mut data).unwrap();
        data
    }

    /// Serves our end of a new socketpair, as the kernel attach does; returns
    /// the client's end and a second descriptor of ours.
    fn connect(server: &Server<Mem>, slot: Option<HandoverSlot>) -> (UnixStream, OwnedFd) {
        let (ours, client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let kept = ours.try_clone().unwrap().into();
        server.serve_handed(ours, server.implicit_negotiation(), Vec::new(), slot).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        (client, kept)
    }

    fn stop(server: &Server<Mem>) {
        engine::rt::block_on(server.shutdown(Duration::from_secs(30))).unwrap();
    }

    #[test]
    fn a_handed_over_connection_stops_between_requests_and_goes_on_in_the_next_server() {
        let dev = Arc::new(Mem(Mutex::new(vec![0u8; 1 << 20])));
        let w1 = Arc::new(Worker::spawn("handover-t1").unwrap());
        let first = Server::new(dev.clone(), ServerConfig::default(), vec![w1.clone()]);
        let slot = HandoverSlot::default();
        let (mut client, kept) = connect(&first, Some(slot.clone()));
        let (mut plain, _plain_kept) = connect(&first, None);

        let mut write = header(CMD_WRITE, 1, 4096, 4096).to_vec();
        write.extend_from_slice(&[0xab; 4096]);
        client.write_all(&write).unwrap();
        reply(&mut client, 1, 0);
        // A READ and the first 10 bytes of the next request, in one write: the
        // server reads the partial header with the READ's.
        let next = header(CMD_READ, 3, 4096, 512);
        let mut bytes = header(CMD_READ, 2, 4096, 4096).to_vec();
        bytes.extend_from_slice(&next[..10]);
        client.write_all(&bytes).unwrap();
        assert_eq!(reply(&mut client, 2, 4096), vec![0xab; 4096]);

        stop(&first);
        assert_eq!(slot.take(), Some(next[..10].to_vec()), "the bytes read past the last request");
        // Not shut down: no end-of-file for the kernel's end.
        client.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).map_err(|e| e.kind()), Err(ErrorKind::WouldBlock));
        client.set_nonblocking(false).unwrap();
        // A connection without a slot is closed at the stop.
        assert_eq!(plain.read(&mut b).unwrap(), 0, "end-of-file on a connection that is not handed over");

        // The next server goes on from the leftover bytes.
        let w2 = Arc::new(Worker::spawn("handover-t2").unwrap());
        let second = Server::new(dev.clone(), ServerConfig::default(), vec![w2.clone()]);
        let ours = UnixStream::from(kept);
        second.serve_handed(ours, second.implicit_negotiation(), next[..10].to_vec(), None).unwrap();
        client.write_all(&next[10..]).unwrap();
        assert_eq!(reply(&mut client, 3, 512), vec![0xab; 512]);
        stop(&second);
        drop((first, second));
        for w in [w1, w2] {
            if let Ok(w) = Arc::try_unwrap(w) {
                w.join();
            }
        }
    }
}
