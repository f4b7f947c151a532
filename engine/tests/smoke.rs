#![allow(clippy::unwrap_used, unreachable_pub)] // test code: a panic is a failure; helpers are shared through `mod common`
use engine::{rt, Backend, DeviceState, IoBuf, KernelDevice, Mirror, MirrorConfig, OpenOptions};
use std::sync::Arc;

#[test]
fn serve_write_read_attach_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.img");
    let t = dir.path().join("t.img");
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&s, &data).unwrap();
    std::fs::File::create(&t).unwrap().set_len(8 << 20).unwrap();
    rt::block_on(async {
        let src = Backend::open(&s, &OpenOptions::default()).unwrap();
        let m: Arc<Mirror> = Mirror::new(src, MirrorConfig::default()).unwrap();
        let (r, buf) = m.read(12345, IoBuf::new(100_000)).await;
        r.unwrap();
        assert_eq!(buf.as_slice(), &data[12345..112345]);
        m.write(4096 * 3 + 7, IoBuf::from_slice(&[0xAB; 9000]), false).await.unwrap();
        m.attach(&t).await.unwrap();
        for _ in 0..200 {
            if m.state() == DeviceState::Synced {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(m.state(), DeviceState::Synced);
        let rep = m.verify().await.unwrap();
        assert!(rep.mismatches.is_empty());
        m.detach_source().await.unwrap();
        // A kernel device that cannot follow a size change: grow is refused
        // with its reason and changes nothing; status names the device.
        assert_eq!(m.status().kernel_device, None);
        m.set_kernel_device(Some(KernelDevice {
            path: "/dev/ublkb0".into(),
            grow_refusal: Some("/dev/ublkb0 cannot change size".into()),
        }));
        assert_eq!(m.status().kernel_device.as_deref(), Some("/dev/ublkb0"));
        let e = m.grow(None).await.unwrap_err().to_string();
        assert_eq!(e, "/dev/ublkb0 cannot change size");
        assert_eq!(m.size(), 4 << 20, "a refused grow changes nothing");
        m.set_kernel_device(Some(KernelDevice { path: "/dev/ublkb0".into(), grow_refusal: None }));
        let n = m.grow(None).await.unwrap();
        assert_eq!(n, 8 << 20);
        m.shutdown().await.unwrap();
    })
    .unwrap();
    let tt = std::fs::read(&t).unwrap();
    let mut expect = data.clone();
    expect[4096 * 3 + 7..4096 * 3 + 7 + 9000].fill(0xAB);
    assert_eq!(&tt[..4 << 20], &expect[..]);
}

/// Files in RAM take two write paths by size (plain syscalls, io_uring workers
/// from 256 KiB): sizes on both sides of the switch, unaligned, several in
/// flight at once, must land byte for byte.
#[test]
fn writes_to_a_file_in_ram_land_on_both_paths() {
    let dir = tempfile::Builder::new().prefix("lmsmoke").tempdir_in("/dev/shm").expect("/dev/shm must be a tmpfs");
    let s = dir.path().join("s.img");
    let size = 16usize << 20;
    std::fs::File::create(&s).unwrap().set_len(size as u64).unwrap();
    let mut model = vec![0u8; size];
    let writes: Vec<(usize, usize)> = vec![
        (0, 4096),
        (4096, (256 << 10) - 1),
        (1 << 20, 256 << 10),
        ((2 << 20) + 7, 1 << 20),
        ((5 << 20) + 4095, (3 << 20) + 5),
        ((9 << 20) + 1, 2 << 20),
        (size - (1 << 20), 1 << 20),
    ];
    rt::block_on(async {
        let src = Backend::open(&s, &OpenOptions::default()).unwrap();
        assert!(src.in_memory(), "a file in /dev/shm is in RAM");
        let m: Arc<Mirror> = Mirror::new(src, MirrorConfig::default()).unwrap();
        let mut tasks = Vec::new();
        for (i, &(off, len)) in writes.iter().enumerate() {
            let fill: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 + 1)).collect();
            model[off..off + len].copy_from_slice(&fill);
            let m = m.clone();
            tasks.push(tokio::task::spawn_local(
                async move { m.write(off as u64, IoBuf::from_slice(&fill), false).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (r, buf) = m.read(0, IoBuf::new(size)).await;
        r.unwrap();
        assert!(buf.as_slice() == &model[..], "read back differs from the model");
        m.shutdown().await.unwrap();
    })
    .unwrap();
    assert!(std::fs::read(&s).unwrap() == model, "file differs from the model");
}

/// A read that reaches the end of a device which became shorter fails, on the
/// plain-syscall path (files in RAM) as on io_uring (files on disk, O_DIRECT
/// or not): the missing bytes are never returned as zeroes.
#[test]
fn reads_past_the_end_of_a_truncated_device_fail_on_every_path() {
    use engine::CacheMode;
    let disk = std::path::Path::new("/var/tmp");
    let dirs = [tempfile::tempdir_in("/dev/shm").unwrap(), tempfile::tempdir_in(disk).unwrap()];
    for dir in &dirs {
        for cache in [CacheMode::Buffered, CacheMode::Direct] {
            let path = dir.path().join(format!("{cache:?}.img"));
            std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
            let b = Backend::open(&path, &OpenOptions { cache, ..OpenOptions::default() }).unwrap();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(256 << 10).unwrap();
            let what = format!("{} ({cache:?}, direct={})", path.display(), b.is_direct());
            rt::block_on(async {
                for (off, len) in [(512u64 << 10, 4096usize), ((256 << 10) - 4096, 8192), (0, 1 << 20)] {
                    let buf = engine::SharedBuf::new(IoBuf::new(len));
                    let err = b.read_at(&buf, 0, len, off).await.expect_err(&format!("{what}: read at {off}+{len}"));
                    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{what}: {err}");
                    assert!(err.to_string().contains("shorter") || err.to_string().contains("ends at"), "{err}");
                }
                let buf = engine::SharedBuf::new(IoBuf::new(4096));
                b.read_at(&buf, 0, 4096, 4096).await.expect("what is still there reads");
            })
            .unwrap();
        }
    }
}

/// Subscribers see every state change as it happens, in order, each with the
/// state it led to; the status keeps the same events.
#[test]
fn state_changes_reach_event_subscribers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t) = (dir.path().join("s.img"), dir.path().join("t.img"));
    std::fs::write(&s, vec![7u8; 1 << 20]).unwrap();
    std::fs::File::create(&t).unwrap().set_len(1 << 20).unwrap();
    rt::block_on(async {
        let m = Mirror::new(Backend::open(&s, &OpenOptions::default()).unwrap(), MirrorConfig::default()).unwrap();
        let mut rx = m.subscribe_events();
        m.attach(&t).await.unwrap();
        let mut states = Vec::new();
        while states.last() != Some(&DeviceState::Synced) {
            let e = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
            if e.kind == engine::EventKind::State {
                states.push(e.state);
            }
        }
        m.detach_source().await.unwrap();
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!((e.kind, e.state), (engine::EventKind::State, DeviceState::SourceDetached), "{e:?}");
        assert_eq!(states, vec![DeviceState::Syncing, DeviceState::Synced]);
        assert!(m.status().events.iter().any(|e| e.kind == engine::EventKind::State && e.state == DeviceState::Synced));
        m.shutdown().await.unwrap();
    })
    .unwrap();
}

/// A verify during a sync says how much it could not compare yet; a paused
/// copy reports no ETA and no rate.
#[test]
fn verify_during_a_paused_sync_reports_what_it_could_not_compare() {
    let dir = tempfile::tempdir().unwrap();
    let (s, t) = (dir.path().join("s.img"), dir.path().join("t.img"));
    std::fs::write(&s, vec![9u8; 8 << 20]).unwrap();
    std::fs::File::create(&t).unwrap().set_len(8 << 20).unwrap();
    rt::block_on(async {
        let cfg = MirrorConfig { max_rate: 1 << 20, min_rate: u64::MAX, ..MirrorConfig::default() };
        let m = Mirror::new(Backend::open(&s, &OpenOptions::default()).unwrap(), cfg).unwrap();
        m.attach(&t).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        m.pause().await.unwrap();
        let st = m.status();
        assert!(st.paused && st.eta_seconds.is_none() && st.copy_rate_bytes_per_sec == 0.0, "{st:?}");
        let rep = m.verify().await.unwrap();
        let total = st.regions_total;
        assert_eq!(rep.regions_compared + rep.regions_not_copied_yet + rep.regions_unverifiable, total);
        assert!(rep.regions_not_copied_yet > 0 && rep.regions_not_copied_yet == total - st.regions_clean, "{rep:?}");
        assert_eq!(rep.regions_skipped, rep.regions_not_copied_yet + rep.regions_unverifiable);
        m.shutdown().await.unwrap();
    })
    .unwrap();
}

/// `--cache auto` picks O_DIRECT for files on a disk filesystem and the page
/// cache for files in RAM, and status says which.
#[test]
fn cache_auto_is_direct_on_disk_and_buffered_in_ram() {
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let ram = tempfile::tempdir_in("/dev/shm").unwrap();
    let (s, t) = (disk.path().join("s.img"), ram.path().join("t.img"));
    std::fs::write(&s, vec![1u8; 1 << 20]).unwrap();
    std::fs::File::create(&t).unwrap().set_len(1 << 20).unwrap();
    rt::block_on(async {
        let src = Backend::open(&s, &OpenOptions::default()).unwrap();
        assert!(src.is_direct(), "a file on a disk filesystem is opened O_DIRECT by default");
        let m = Mirror::new(src, MirrorConfig::default()).unwrap();
        m.attach(&t).await.unwrap();
        let st = m.status();
        assert_eq!((st.source_io.as_deref(), st.target_io.as_deref()), (Some("direct"), Some("buffered")), "{st:?}");
        m.shutdown().await.unwrap();
    })
    .unwrap();
    // An unaligned size cannot be written with O_DIRECT: the page cache, quietly.
    std::fs::write(&s, vec![1u8; 1000]).unwrap();
    assert!(!Backend::open(&s, &OpenOptions::default()).unwrap().is_direct());
}
