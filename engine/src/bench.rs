//! `livemirror bench`: the real copier on the user's own devices. The source is
//! opened read-only; only the target is written.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{Backend, CacheMode, LockMode, OpenOptions};
use crate::error::{Error, Result};
use crate::mirror::{Mirror, MirrorConfig};
use crate::state::DeviceState;

/// One measured copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyRun {
    pub region_size: u64,
    pub queue_depth: usize,
    pub copy_chunk: usize,
    pub max_rate: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl CopyRun {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }
}

/// Copies the first `bytes` of `source` onto `target` with `cfg` and returns
/// how long it took from attach to synced (target flushed).
pub async fn measure_copy(
    source: &Path,
    target: &Path,
    bytes: u64,
    cache: CacheMode,
    cfg: MirrorConfig,
) -> Result<CopyRun> {
    let s =
        Backend::open(source, &OpenOptions { writable: false, cache, lock: LockMode::Fail })?.with_size_limit(bytes);
    let bytes = s.size();
    let region_size = cfg.region_size;
    let (queue_depth, copy_chunk, max_rate) = (cfg.queue_depth, cfg.copy_chunk, cfg.max_rate);
    let m = Mirror::new(s, MirrorConfig { read_only: true, min_rate: u64::MAX, cache, ..cfg })?;
    let t0 = Instant::now();
    m.attach(target).await?;
    loop {
        match m.state() {
            DeviceState::Synced => break,
            DeviceState::Syncing => {}
            other => {
                let why = m.status().error.unwrap_or_default();
                m.shutdown().await?;
                return Err(Error::Refused(format!("the copy did not finish (state {other}): {why}")));
            }
        }
        if let Some(e) = m.status().error {
            m.shutdown().await?;
            return Err(Error::Refused(format!("the copy stopped: {e}")));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = t0.elapsed().as_secs_f64();
    m.shutdown().await?;
    Ok(CopyRun { region_size, queue_depth, copy_chunk, max_rate, bytes, seconds })
}
