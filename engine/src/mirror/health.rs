//! Devices that become shorter than the export (a truncated image file, a
//! shrunk volume) have failed: their missing bytes must never be served, and
//! nothing shows it until someone reads there. So sizes are checked after every
//! copied span (copier.rs), before `synced` and `detach-source`
//! (lifecycle.rs), and once a second in every state by a watchdog.

use std::sync::Arc;
use std::time::Duration;

use super::Mirror;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::state::DeviceState;
use crate::sync::lock;

/// How often every device's size is compared with the export's (and pending
/// overlay notices delivered).
const SIZE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Mirror {
    /// Checks that every attached device still holds the whole export. A device
    /// that became shorter (a truncated file, a shrunk volume) has failed: the
    /// target is dropped (`degraded`), the source too when the target has every
    /// byte (`synced` → `source-detached`); otherwise the error is recorded and
    /// reads past the device's end fail with EIO. True when every device fits.
    pub(crate) async fn check_device_sizes(&self) -> bool {
        let route = self.route();
        let export = self.size();
        let short = |b: &Backend| match b.current_size() {
            Ok(n) if n >= export => None,
            Ok(n) => Some(format!("{} is now {n} bytes, shorter than the {export}-byte export", b.path().display())),
            Err(e) => Some(format!("cannot read the size of {}: {e}", b.path().display())),
        };
        let mut fits = true;
        let mut target_ok = true;
        if let Some(t) = &route.target {
            if let Some(why) = short(&t.backend) {
                fits = false;
                target_ok = false;
                if route.source.is_some() {
                    self.fail_target(t, format!("target failed: {why}")).await;
                } else {
                    self.record_fault(format!("target failed: {why}"));
                }
            }
        }
        if let Some(src) = &route.source {
            if let Some(why) = short(src) {
                fits = false;
                if !(route.state == DeviceState::Synced
                    && target_ok
                    && self.fail_source(src, format!("source failed: {why}")).await)
                {
                    self.record_fault(format!("source failed: {why}"));
                }
            }
        }
        fits
    }

    /// Records a device fault in status and the event log, once per distinct fault.
    fn record_fault(&self, why: String) {
        let mut last = lock(&self.last_error);
        if last.as_deref() != Some(why.as_str()) {
            *last = Some(why.clone());
            drop(last);
            self.error_event(why);
        }
    }

    /// Starts the thread that checks the devices' sizes once a second, in every
    /// state (a device can be truncated while nothing reads it).
    pub(super) fn start_watchdog(self: &Arc<Self>) -> Result<()> {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("livemirror-watch".into())
            .spawn(move || {
                let res = crate::rt::block_on(async move {
                    loop {
                        tokio::time::sleep(SIZE_CHECK_INTERVAL).await;
                        let Some(m) = weak.upgrade() else { return };
                        if m.is_shutting_down() {
                            return;
                        }
                        m.check_device_sizes().await;
                        // A count of refused overlay writes waits at most a
                        // second for its event.
                        if let Some(o) = m.route().source.as_ref().and_then(|s| s.overlay()) {
                            o.deliver_notices(true);
                        }
                    }
                });
                if let Err(e) = res {
                    tracing::error!("the device size watchdog could not start: {e}");
                }
            })
            .map_err(|e| Error::io("cannot start the device watchdog thread", e))?;
        Ok(())
    }
}
