//! The remote device against a scripted server: a reply that comes after its
//! request timed out is consumed without touching the caller's buffer, and a
//! request whose connection dies unanswered is sent again on the next one; a
//! read answered with fewer bytes than asked fails with that reason.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::{IoBuf, LinkState, RemoteDevice, SharedBuf};

use super::{NbdUri, RemoteExport, RemoteOptions};
use crate::proto::*;

const SIZE: u64 = 1 << 20;

fn read_u32(s: &mut UnixStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("read");
    u32::from_be_bytes(b)
}

fn reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) {
    s.write_all(&option_reply(opt, kind, data.len() as u32)).expect("reply");
    s.write_all(data).expect("reply data");
}

/// The server side of the handshake: structured replies, base:allocation as
/// context 1, GO with the export's size and flags.
fn handshake(s: &mut UnixStream) {
    s.write_all(&NBDMAGIC.to_be_bytes()).expect("greeting");
    s.write_all(&IHAVEOPT.to_be_bytes()).expect("greeting");
    s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).expect("greeting");
    read_u32(s);
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("option");
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).expect("option data");
        match opt {
            OPT_STRUCTURED_REPLY => reply(s, opt, REP_ACK, &[]),
            OPT_SET_META_CONTEXT => {
                let mut d = 1u32.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                reply(s, opt, REP_META_CONTEXT, &d);
                reply(s, opt, REP_ACK, &[]);
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                d.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
                reply(s, opt, REP_INFO, &d);
                reply(s, opt, REP_ACK, &[]);
                return;
            }
            _ => reply(s, opt, REP_ERR_UNSUP, &[]),
        }
    }
}

fn request(s: &mut UnixStream) -> Option<RequestHeader> {
    let mut b = [0u8; REQUEST_LEN];
    s.read_exact(&mut b).ok()?;
    RequestHeader::parse(&b).ok()
}

fn data_chunk(s: &mut UnixStream, cookie: u64, off: u64, fill: u8, len: u32) {
    s.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, len + 8)).expect("chunk");
    s.write_all(&off.to_be_bytes()).expect("chunk");
    s.write_all(&vec![fill; len as usize]).expect("chunk");
}

fn open(sock: &Path, timeout: Duration) -> Arc<RemoteExport> {
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", sock.display())).expect("uri");
    let opts = RemoteOptions { timeout, connections: 1 };
    RemoteExport::open(&uri, Path::new("test"), &opts, &|p| p.to_path_buf()).expect("open")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

#[test]
fn a_reply_after_the_timeout_does_not_touch_the_callers_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).expect("bind");
    let late_sent = Arc::new(AtomicUsize::new(0));
    let flag = late_sent.clone();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        handshake(&mut s);
        // The first read is answered 1.5 s late (after the 1 s timeout, before
        // the 2 s stall detection); the second at once.
        let first = request(&mut s).expect("first read");
        std::thread::sleep(Duration::from_millis(1500));
        data_chunk(&mut s, first.cookie, first.offset, 0xaa, first.len);
        flag.store(1, Ordering::SeqCst);
        let second = request(&mut s).expect("second read");
        data_chunk(&mut s, second.cookie, second.offset, 0xbb, second.len);
        while request(&mut s).is_some() {}
    });
    let dev = open(&sock, Duration::from_secs(1));
    rt().block_on(async {
        let buf = SharedBuf::new(IoBuf::zeroed(4096));
        let t0 = Instant::now();
        let err = dev.read_at(&buf, 0, 4096, 8192).await.expect_err("the read must time out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(t0.elapsed() < Duration::from_millis(1400), "timed out only after {:?}", t0.elapsed());
        assert!(err.to_string().contains("did not answer within 1 s"), "{err}");
        // The caller reuses its buffer; the late reply must not land in it.
        // SAFETY: the read has failed; nothing else uses the buffer.
        unsafe { buf.slice_mut(0, 4096) }.fill(0x11);
        while late_sent.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // SAFETY: as above.
        assert!(unsafe { buf.slice(0, 4096) }.iter().all(|&b| b == 0x11), "the late reply was written into the buffer");
        // The connection is still good: the late reply was read and dropped.
        let buf2 = SharedBuf::new(IoBuf::zeroed(4096));
        dev.read_at(&buf2, 0, 4096, 0).await.expect("second read");
        // SAFETY: the read completed.
        assert!(unsafe { buf2.slice(0, 4096) }.iter().all(|&b| b == 0xbb));
        assert_eq!(dev.link(), LinkState::Connected);
    });
    drop(dev);
    let _ = server.join();
}

#[test]
fn a_write_whose_connection_dies_unanswered_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        // First connection: take the write, then die without a reply.
        let (mut s, _) = listener.accept().expect("accept");
        handshake(&mut s);
        let w = request(&mut s).expect("write");
        let mut payload = vec![0u8; w.len as usize];
        s.read_exact(&mut payload).expect("payload");
        seen.push((w.kind, w.offset, payload));
        drop(s);
        // Second connection: answer everything.
        let (mut s, _) = listener.accept().expect("accept again");
        handshake(&mut s);
        while let Some(r) = request(&mut s) {
            let mut payload = vec![0u8; if r.kind == CMD_WRITE { r.len as usize } else { 0 }];
            s.read_exact(&mut payload).expect("payload");
            seen.push((r.kind, r.offset, payload));
            s.write_all(&simple_reply(0, r.cookie)).expect("reply");
        }
        seen
    });
    let dev = open(&sock, Duration::from_secs(10));
    rt().block_on(async {
        let mut b = IoBuf::new(3000);
        b.fill(0x5a);
        let buf = SharedBuf::new(b);
        dev.write_at(&buf, 0, 3000, 777, false).await.expect("the write succeeds after the reconnect");
        dev.flush().await.expect("flush");
    });
    drop(dev);
    let seen = server.join().expect("server");
    let writes: Vec<_> = seen.iter().filter(|(k, _, _)| *k == CMD_WRITE).collect();
    assert_eq!(
        writes.len(),
        2,
        "the write was sent once per connection: {:?}",
        seen.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    assert!(writes.iter().all(|(_, off, p)| *off == 777 && p.len() == 3000 && p.iter().all(|&b| b == 0x5a)));
    assert!(seen.iter().any(|(k, _, _)| *k == CMD_FLUSH), "the flush reached the second connection");
}

/// A structured READ reply whose chunks cover only part of the request (here
/// half, then the final NONE chunk) is an error for that read, never a buffer
/// whose missing part reads as zeroes or stale bytes.
#[test]
fn a_read_reply_that_covers_part_of_the_request_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        handshake(&mut s);
        while let Some(r) = request(&mut s) {
            let half = r.len / 2;
            s.write_all(&chunk_header(0, REPLY_TYPE_OFFSET_DATA, r.cookie, half + 8)).expect("chunk");
            s.write_all(&r.offset.to_be_bytes()).expect("chunk");
            s.write_all(&vec![0xcc; half as usize]).expect("chunk");
            s.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0)).expect("done");
        }
    });
    let dev = open(&sock, Duration::from_secs(5));
    rt().block_on(async {
        let buf = SharedBuf::new(IoBuf::zeroed(4096));
        // SAFETY: no request uses the buffer yet.
        unsafe { buf.slice_mut(0, 4096) }.fill(0x11);
        let err = dev.read_at(&buf, 0, 4096, 0).await.expect_err("a half-answered read must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("a read of 4096 bytes answered with 2048 bytes"), "{err}");
    });
    drop(dev);
    let _ = server.join();
}

#[test]
fn a_range_splits_into_pieces_that_cover_it_exactly() {
    use super::device::pieces;
    assert_eq!(pieces(0, 4).collect::<Vec<_>>(), []);
    assert_eq!(pieces(4, 4).collect::<Vec<_>>(), [(0, 4)]);
    assert_eq!(pieces(10, 4).collect::<Vec<_>>(), [(0, 4), (4, 4), (8, 2)]);
    assert_eq!(pieces(3, 4).collect::<Vec<_>>(), [(0, 3)]);
}
