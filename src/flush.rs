//! The clean stop of the kernel device (`--nbd-device`, `--ublk-device`):
//! whether it is taken down or left for the next daemon, and flushing it
//! first, bounded: a device that does not answer must not hold up the stop.

/// What a clean stop (SIGTERM) does with the kernel device we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelStop {
    /// Flush it and disconnect it: nobody will reconnect it, and a device left
    /// configured would hold its I/O for the whole dead-connection timeout.
    FlushAndDisconnect,
    /// Leave it configured: the root filesystem's storage daemon is restarted
    /// (by its supervisor, or the next boot stage) and reconnects it.
    Keep,
}

/// The clean stop for a daemon that is (or is not) the root storage daemon.
pub(crate) fn kernel_on_stop(root_daemon: bool) -> KernelStop {
    if root_daemon {
        KernelStop::Keep
    } else {
        KernelStop::FlushAndDisconnect
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_root_storage_daemon_leaves_its_kernel_device_configured() {
        assert_eq!(kernel_on_stop(false), KernelStop::FlushAndDisconnect);
        assert_eq!(kernel_on_stop(true), KernelStop::Keep);
    }
}
