//! systemd notifications (`Type=notify` units): READY=1 once the contract's
//! "ready" holds, STATUS= with the state and progress while running, and
//! STOPPING=1 on a clean stop. The `sd-notify` crate speaks the protocol; this
//! module only decides what to say and when. Without `NOTIFY_SOCKET` in the
//! environment nothing is started.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use engine::{DeviceState, Mirror, Status};
use sd_notify::NotifyState;

use crate::units::{human, human_secs};

/// How often STATUS= is refreshed (only sent when the text changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The one-line STATUS= text for a status.
pub(crate) fn status_line(st: &Status) -> String {
    let pct = if st.regions_total > 0 { 100.0 * st.regions_clean as f64 / st.regions_total as f64 } else { 100.0 };
    let target = st.target.as_deref().unwrap_or("-");
    match st.state {
        DeviceState::Serving => format!("serving {} (no target)", st.source.as_deref().unwrap_or("-")),
        DeviceState::Syncing if st.paused => format!("syncing onto {target}: paused at {pct:.1}%"),
        DeviceState::Syncing => match &st.error {
            Some(e) => format!("syncing onto {target}: stopped at {pct:.1}%: {e}"),
            None => format!(
                "syncing onto {target}: {pct:.1}% ({} copied), {}/s, ETA {}",
                human(st.bytes_copied as f64),
                human(st.copy_rate_bytes_per_sec),
                st.eta_seconds.map(human_secs).unwrap_or_else(|| "-".into())
            ),
        },
        DeviceState::Synced => format!("synced onto {target}: reads come from the target"),
        DeviceState::SourceDetached => format!("source-detached: serving {target} alone"),
        DeviceState::Degraded => {
            format!("degraded: {}", st.error.as_deref().unwrap_or("the target failed"))
        }
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// The notifier of a running daemon.
pub(crate) struct Notifier {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Checks that the control socket answers, sends READY=1 with the first
    /// STATUS=, and keeps STATUS= current. `None` outside a notify service.
    pub(crate) fn start(control: &Path, mirror: Arc<Mirror>) -> Option<Notifier> {
        std::env::var_os("NOTIFY_SOCKET")?;
        // The listeners accept from the moment they are bound; that the
        // control socket answers is checked the way a client would see it.
        let answered = crate::control::Client::connect(control)
            .and_then(|mut c| c.call(&crate::control::Request::Status))
            .map(|r| r.ok);
        if !matches!(answered, Ok(true)) {
            tracing::warn!("the control socket does not answer yet ({answered:?}); telling systemd ready anyway");
        }
        let mut last = status_line(&mirror.status());
        send(&[NotifyState::Ready, NotifyState::Status(&last)]);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("livemirror-notify".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(STATUS_EVERY);
                    let line = status_line(&mirror.status());
                    if line != last && !stop2.load(Ordering::Relaxed) {
                        send(&[NotifyState::Status(&line)]);
                        last = line;
                    }
                }
            })
            .map_err(|e| tracing::warn!("cannot start the status notifier: {e}"))
            .ok();
        Some(Notifier { stop, thread })
    }

    /// Stops refreshing STATUS= without telling systemd anything: the daemon
    /// hands over to a successor, which notifies from then on.
    pub(crate) fn pause(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// STOPPING=1: the stop has begun.
    pub(crate) fn stopping(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        send(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing in-flight requests")]);
    }
}

/// MAINPID=: the service's main process is `pid` now (a successor started by
/// `livemirror upgrade`; this process exits). Nothing outside a notify service.
pub(crate) fn main_pid(pid: u32) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        send(&[NotifyState::MainPid(pid)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_carry_state_and_progress_and_no_eta_when_paused() {
        let mut st: Status = serde_json::from_value(serde_json::json!({
            "state": "syncing", "paused": false, "export_size": 1u64 << 30, "source": "/dev/s", "target": "/dev/t",
            "region_size": 65536, "regions_total": 1000, "regions_clean": 250, "bytes_copied": 1u64 << 28,
            "copy_rate_bytes_per_sec": 1048576.0, "eta_seconds": 750.0, "error": null, "regions_discarded": 0,
            "regions_unverifiable": 0, "max_rate": 0, "copier_running": true
        }))
        .expect("a status");
        let l = status_line(&st);
        assert_eq!(l, "syncing onto /dev/t: 25.0% (256.0 MiB copied), 1.0 MiB/s, ETA 12m30s");
        st.paused = true;
        st.eta_seconds = None;
        assert_eq!(status_line(&st), "syncing onto /dev/t: paused at 25.0%");
        st.state = DeviceState::Degraded;
        st.error = Some("target write failed at offset 0: EIO".into());
        assert!(status_line(&st).starts_with("degraded: target write failed"));
    }
}
