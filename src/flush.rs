//! Flushing a kernel block device before it is taken down (the clean stop of
//! `--nbd-device` and `--ublk-device`), bounded: a device that does not answer
//! must not hold up the stop.

/// Flushes a kernel block device (its page cache, then a FLUSH to us), for at
/// most `limit`: a device that does not answer must not hold up the stop.
pub(crate) fn flush_kernel_device(dev: &std::path::Path, limit: std::time::Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = dev.to_path_buf();
    let spawned = std::thread::Builder::new().name("livemirror-flush".into()).spawn(move || {
        let r = std::fs::File::open(&path).and_then(|f| f.sync_all());
        let _ = tx.send(r);
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot flush {}: {e}", dev.display());
        return;
    }
    match rx.recv_timeout(limit) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("cannot flush {}: {e}", dev.display()),
        Err(_) => {
            tracing::warn!("flushing {} took more than {} s: disconnecting anyway", dev.display(), limit.as_secs_f64())
        }
    }
}
