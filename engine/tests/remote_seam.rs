//! The backend seam: a device behind a link, plugged in through a
//! `DeviceOpener`, is mirrored to like any disk — and while its link is down
//! the copy waits instead of failing it.
#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
mod common;
use common::pattern;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::backend::remote::IoFuture;
use engine::backend::Extent;
use engine::identity::DeviceIdent;
use engine::{
    rt, Backend, DeviceOpener, DeviceState, LinkState, Mirror, MirrorConfig, OpenOptions, Opener, RemoteDevice,
    SharedBuf,
};

/// An in-memory "remote" disk whose link can be cut.
#[derive(Debug)]
struct FakeRemote {
    name: PathBuf,
    data: Mutex<Vec<u8>>,
    down: AtomicBool,
    writes_while_down: AtomicU64,
}

impl FakeRemote {
    fn check(&self) -> std::io::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            self.writes_while_down.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl RemoteDevice for FakeRemote {
    fn name(&self) -> &Path {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn current_size(&self) -> std::io::Result<u64> {
        Ok(self.size())
    }
    fn alignment(&self) -> u64 {
        1
    }
    fn zeroing_is_fast(&self) -> bool {
        true
    }
    fn ident(&self) -> DeviceIdent {
        DeviceIdent {
            path: self.name.clone(),
            size: self.size(),
            dev: 0,
            ino: 0,
            rdev: 0,
            birth: None,
            generation: None,
            stack: "fake-remote".into(),
        }
    }
    fn link(&self) -> LinkState {
        if self.down.load(Ordering::SeqCst) {
            LinkState::Reconnecting { attempts: 1, last_error: "cable cut".into() }
        } else {
            LinkState::Connected
        }
    }
    fn read_at<'a>(&'a self, buf: &'a Arc<SharedBuf>, buf_off: usize, len: usize, off: u64) -> IoFuture<'a> {
        Box::pin(async move {
            let d = self.data.lock().unwrap();
            // SAFETY: the engine gives each read a range of `buf` of its own.
            unsafe { buf.slice_mut(buf_off, len) }.copy_from_slice(&d[off as usize..off as usize + len]);
            Ok(())
        })
    }
    fn write_at<'a>(
        &'a self,
        buf: &'a Arc<SharedBuf>,
        buf_off: usize,
        len: usize,
        off: u64,
        _fua: bool,
    ) -> IoFuture<'a> {
        Box::pin(async move {
            self.check()?;
            // SAFETY: write legs only read the buffer.
            let src = unsafe { buf.slice(buf_off, len) };
            self.data.lock().unwrap()[off as usize..off as usize + len].copy_from_slice(src);
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, off: u64, len: u64, _may_unmap: bool, _fua: bool) -> IoFuture<'_> {
        Box::pin(async move {
            self.check()?;
            self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            Ok(())
        })
    }
    fn discard(&self, _off: u64, _len: u64) -> IoFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    fn prefetch(&self, _off: u64, _len: u64) -> IoFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    fn allocation(&self, _off: u64, len: u64, _max: usize) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move { Ok(vec![Extent { len, hole: false }]) })
    }
}

/// Opens `fake://` names as the fake remote, everything else locally.
struct FakeOpener(Arc<FakeRemote>);

impl DeviceOpener for FakeOpener {
    fn open(&self, name: &Path, viewer: Option<u32>, opts: &OpenOptions) -> engine::Result<Backend> {
        if name.to_string_lossy().starts_with("fake://") {
            return Ok(Backend::Remote(self.0.clone()));
        }
        Backend::open_as(name, viewer, opts)
    }
}

#[test]
fn a_remote_target_is_mirrored_and_a_cut_link_pauses_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.img");
    let data = pattern(21, 8 << 20);
    std::fs::write(&s, &data).unwrap();
    let remote = Arc::new(FakeRemote {
        name: "fake://host/export".into(),
        data: Mutex::new(vec![0u8; 8 << 20]),
        down: AtomicBool::new(true),
        writes_while_down: AtomicU64::new(0),
    });
    let cfg =
        MirrorConfig { min_rate: u64::MAX, opener: Opener(Arc::new(FakeOpener(remote.clone()))), ..Default::default() };
    rt::block_on(async {
        let m = Mirror::new(Backend::open(&s, &OpenOptions::default()).unwrap(), cfg).unwrap();
        m.attach(Path::new("fake://host/export")).await.unwrap();
        // The link is down: no copy reaches the device, and status says why.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let st = m.status();
        assert_eq!(st.state, DeviceState::Syncing);
        assert_eq!(st.regions_clean, 0, "copied through a cut link: {st:?}");
        assert!(matches!(st.target_link, Some(LinkState::Reconnecting { .. })), "{st:?}");
        assert_eq!(remote.writes_while_down.load(Ordering::SeqCst), 0);
        // The link is back: the sync completes, reads come from the remote.
        remote.down.store(false, Ordering::SeqCst);
        for _ in 0..500 {
            if m.state() == DeviceState::Synced {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(m.state(), DeviceState::Synced, "{:?}", m.status());
        assert_eq!(m.status().target_link, Some(LinkState::Connected));
        assert!(m.verify().await.unwrap().mismatches.is_empty());
        m.detach_source().await.unwrap();
        let (r, buf) = m.read(12345, engine::IoBuf::new(4096)).await;
        r.unwrap();
        assert_eq!(buf.as_slice(), &data[12345..12345 + 4096]);
        m.shutdown().await.unwrap();
    })
    .unwrap();
    assert!(*remote.data.lock().unwrap() == data, "the remote holds the source's bytes");
}
