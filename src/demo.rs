//! `livemirror demo`: the whole flow on temporary files, no root, no kernel NBD.
//!
//! It builds a source image, serves it, writes through an NBD connection while a
//! target is attached and synced (the copy is rate-limited so writes really race
//! it), verifies, detaches the source, grows, and checks every byte of the
//! export and of the target file against an in-memory model. The NBD client is
//! the daemon's own (the one behind remote devices, `nbd_frontend::remote`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{Client as Control, Request};
use anyhow::{bail, Context};
use clap::Args;
use engine::{DeviceState, IoBuf, RemoteDevice, SharedBuf};
use nbd_frontend::remote::uri::Transport;
use nbd_frontend::remote::{NbdUri, RemoteExport, RemoteOptions};

use crate::serve::ServeArgs;
use crate::units::{human, parse_rate, parse_size};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Size of the source image.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub(crate) size: u64,
    /// Copy rate during the demo, slow enough for writes to race the copy.
    #[arg(long, value_name = "RATE", default_value = "24M", value_parser = parse_rate)]
    pub(crate) rate: u64,
    /// Work in this directory and keep the images (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn step(n: usize, msg: impl AsRef<str>) {
    println!("[{n}] {}", msg.as_ref());
}

pub(crate) fn run(a: DemoArgs) -> u8 {
    match demo(a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("livemirror demo FAILED: {e:#}");
            1
        }
    }
}

fn control(path: &Path, req: Request) -> anyhow::Result<crate::control::Response> {
    let r = Control::connect(path)?.call(&req)?;
    if !r.ok {
        bail!("{req:?} refused: {}", r.error.unwrap_or_default());
    }
    Ok(r)
}

fn status(path: &Path) -> anyhow::Result<engine::Status> {
    control(path, Request::Status)?.status.context("no status in reply")
}

/// Connects to the export on `sock`.
fn connect(sock: &Path) -> anyhow::Result<Arc<RemoteExport>> {
    let uri = NbdUri { transport: Transport::Unix { socket: sock.to_path_buf() }, export: String::new(), tls: None };
    let name = PathBuf::from(uri.to_string());
    Ok(RemoteExport::open(&uri, &name, &RemoteOptions::default(), &|p: &Path| p.to_path_buf())?)
}

/// Writes `data` at `off`.
async fn write(c: &RemoteExport, off: u64, data: &[u8], fua: bool) -> anyhow::Result<()> {
    let mut buf = IoBuf::new(data.len());
    buf.as_mut_slice().copy_from_slice(data);
    let buf = SharedBuf::new(buf);
    c.write_at(&buf, 0, data.len(), off, fua).await.with_context(|| format!("writing {} bytes at {off}", data.len()))
}

/// Reads `len` bytes at `off`.
async fn read(c: &RemoteExport, off: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let buf = SharedBuf::new(IoBuf::zeroed(len));
    c.read_at(&buf, 0, len, off).await.with_context(|| format!("reading {len} bytes at {off}"))?;
    let buf = SharedBuf::into_inner(buf).map_err(|_| anyhow::anyhow!("a finished read still holds its buffer"))?;
    Ok(buf.as_slice().to_vec())
}

/// Applies a random write (or write-zeroes) to the export and the model.
async fn random_write(c: &RemoteExport, model: &mut [u8], rng: &mut Rng, limit: u64) -> anyhow::Result<()> {
    let max = if rng.below(4) == 0 { 256 << 10 } else { 16 << 10 };
    let len = 1 + rng.below(max);
    let off = rng.below(limit - len);
    let (o, l) = (off as usize, len as usize);
    if rng.below(8) == 0 {
        c.write_zeroes(off, len, true, false).await.with_context(|| format!("zeroing {len} bytes at {off}"))?;
        model[o..o + l].fill(0);
    } else {
        rng.fill(&mut model[o..o + l]);
        write(c, off, &model[o..o + l], rng.below(16) == 0).await?;
    }
    Ok(())
}

async fn compare_export(c: &RemoteExport, model: &[u8]) -> anyhow::Result<()> {
    let mut off = 0usize;
    while off < model.len() {
        let n = (model.len() - off).min(4 << 20);
        let got = read(c, off as u64, n).await?;
        if got != model[off..off + n] {
            let i = got.iter().zip(&model[off..off + n]).position(|(a, b)| a != b).unwrap_or(0);
            bail!("the export differs from the model at byte {}", off + i);
        }
        off += n;
    }
    Ok(())
}

fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let size = a.size.max(4 << 20) / 65536 * 65536;
    let tsize = size + size / 2;
    let (src, tgt) = (dir.join("source.img"), dir.join("target.img"));
    let (sock, ctl) = (dir.join("nbd.sock"), dir.join("control.sock"));

    // 1. A source image: patterned data with zero stretches (copied as zeroes).
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut model = vec![0u8; size as usize];
    for (i, chunk) in model.chunks_mut(1 << 20).enumerate() {
        if i % 4 != 3 {
            rng.fill(chunk);
        }
    }
    std::fs::write(&src, &model).with_context(|| format!("writing {}", src.display()))?;
    std::fs::File::create(&tgt)?.set_len(tsize)?;
    step(
        1,
        format!(
            "created {} ({}) and an empty target {} ({})",
            src.display(),
            human(size as f64),
            tgt.display(),
            human(tsize as f64)
        ),
    );

    // 2. Serve it.
    // The same parser as `livemirror serve`, so the demo runs with its defaults.
    let args = ServeArgs::from_args([
        "--source".into(),
        src.clone().into_os_string(),
        "--listen".into(),
        format!("unix:{}", sock.display()).into(),
        "--control".into(),
        ctl.clone().into_os_string(),
        "--region-size".into(),
        "64K".into(),
        // No back-off for the demo's own writes: the copy keeps its limit
        // while they race it.
        "--min-rate".into(),
        "1T".into(),
        "--buffer-budget".into(),
        "64M".into(),
    ])?;
    let daemon = crate::serve::start(&args)?;
    step(2, format!("serving it over NBD on unix:{} (livemirror serve --source {})", sock.display(), src.display()));

    let result = engine::rt::block_on(async {
        let c = connect(&sock)?;
        anyhow::ensure!(c.size() == size, "export size {} != {size}", c.size());
        for _ in 0..200 {
            random_write(&c, &mut model, &mut rng, size).await?;
        }
        compare_export(&c, &model).await?;
        step(3, "connected an NBD client; 200 random writes (unaligned, some write-zeroes), read back: OK");

        // 4. Attach with a rate limit, and keep writing while it copies.
        control(&ctl, Request::SetRate { rate: a.rate })?;
        control(&ctl, Request::Attach { target: tgt.clone() })?;
        step(
            4,
            format!(
                "attached the target; copy limited to {}/s (livemirror attach {} ; livemirror set-rate)",
                human(a.rate as f64),
                tgt.display()
            ),
        );
        let mut writes_during = 0u64;
        let mut last = Instant::now();
        let sync_start = Instant::now();
        loop {
            let st = status(&ctl)?;
            match st.state {
                DeviceState::Synced => break,
                DeviceState::Syncing => {}
                s => bail!("unexpected state {s} during the sync: {:?}", st.error),
            }
            if sync_start.elapsed() > Duration::from_secs(600) {
                bail!("the sync did not finish in 10 minutes");
            }
            for _ in 0..20 {
                random_write(&c, &mut model, &mut rng, size).await?;
                writes_during += 1;
            }
            if last.elapsed() >= Duration::from_millis(500) {
                println!(
                    "    syncing: {:5.1}% ({} copied, {}/s), {} writes so far",
                    100.0 * st.regions_clean as f64 / st.regions_total.max(1) as f64,
                    human(st.bytes_copied as f64),
                    human(st.copy_rate_bytes_per_sec),
                    writes_during
                );
                last = Instant::now();
            }
        }
        let st = status(&ctl)?;
        step(
            5,
            format!(
                "synced in {:.1} s: {} copied, {} writes raced the copy; reads now come from the target",
                sync_start.elapsed().as_secs_f64(),
                human(st.bytes_copied as f64),
                writes_during
            ),
        );
        compare_export(&c, &model).await?;

        // 6. verify: S and T region by region.
        let rep = control(&ctl, Request::Verify)?.report.context("no verify report")?;
        anyhow::ensure!(rep.mismatches.is_empty(), "verify found mismatches: {:?}", rep.mismatches);
        step(6, format!("verify: {} regions compared, 0 mismatches (livemirror verify)", rep.regions_compared));

        // 7. Release the source.
        control(&ctl, Request::DetachSource)?;
        let still_open = std::fs::read_dir("/proc/self/fd")?
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .any(|p| p == src);
        anyhow::ensure!(!still_open, "the source is still open after detach-source");
        for _ in 0..100 {
            random_write(&c, &mut model, &mut rng, size).await?;
        }
        step(
            7,
            "detached the source: it is closed; 100 more writes went to the target alone (livemirror detach-source)",
        );

        // 8. Grow to the target's size; a new connection sees it.
        let new = control(&ctl, Request::Grow { size: None })?.size.context("no size")?;
        anyhow::ensure!(new == tsize, "grew to {new}, expected {tsize}");
        let c2 = connect(&sock)?;
        anyhow::ensure!(c2.size() == tsize, "new connection sees {} bytes", c2.size());
        model.resize(tsize as usize, 0);
        for _ in 0..100 {
            random_write(&c2, &mut model, &mut rng, tsize).await?;
        }
        compare_export(&c2, &model).await?;
        step(
            8,
            format!(
                "grew the export to {} (livemirror grow); wrote into the new space; every byte matches",
                human(tsize as f64)
            ),
        );
        c2.flush().await.context("flushing")?;
        anyhow::Ok(writes_during)
    });
    daemon.shutdown()?;
    let _writes = result??;

    // 9. The target file alone holds the export.
    let on_disk = std::fs::read(&tgt)?;
    if on_disk != model {
        let i = on_disk.iter().zip(&model).position(|(x, y)| x != y).unwrap_or(0);
        bail!("the target file differs from the model at byte {i}");
    }
    step(9, format!("stopped the daemon; {} holds exactly the export's {} bytes", tgt.display(), model.len()));
    println!("demo passed in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// A directory removed on drop (the binary has no tempfile dependency).
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let base = std::env::temp_dir();
        for i in 0..1000u32 {
            let p = base.join(format!("livemirror-demo-{}-{i}", std::process::id()));
            if std::fs::create_dir(&p).is_ok() {
                return Ok(TempDir(p));
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
