use engine::{rt, Backend, DeviceState, IoBuf, Mirror, MirrorConfig, OpenOptions};
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
