//! `serve --metrics tcp:HOST:PORT`: Prometheus' text format at `/metrics`.
//!
//! The HTTP side is a small HTTP/1.0 responder of our own (docs/decisions.md
//! says why): one request per connection, `GET` or `HEAD` of `/metrics`, a
//! bounded request head read within a deadline, a bounded number of
//! connections at once, and the connection closed after the answer. It runs on
//! the first I/O thread beside the control socket; rendering takes the status
//! snapshot the control socket serves and reads the frontend's atomics.

use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use engine::{DeviceState, EventKind, Mirror, Status};
use nbd_frontend::stats::{Stats, BUCKETS_US, COMMANDS};
use nbd_frontend::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A scraper has this long to send its request head.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Scrapes served at once; more connections are closed at accept.
const MAX_CLIENTS: usize = 8;

/// Events seen since the daemon started, by kind.
#[derive(Default)]
pub(crate) struct EventCounts {
    pub(crate) state: Cell<u64>,
    pub(crate) error: Cell<u64>,
    pub(crate) info: Cell<u64>,
    pub(crate) overlay: Cell<u64>,
    /// Events this counter missed because it fell behind (never expected).
    pub(crate) missed: Cell<u64>,
}

/// What the frontend contributes to a scrape.
pub(crate) struct Frontend<'a> {
    pub(crate) stats: &'a Stats,
    pub(crate) connections: usize,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn one(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    metric(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The whole exposition text.
pub(crate) fn render(st: &Status, fe: &Frontend<'_>, events: &EventCounts) -> String {
    let mut o = String::with_capacity(16 << 10);
    metric(&mut o, "livemirror_state", "gauge", "1 for the mirror's current state, 0 for the others.");
    for s in [
        DeviceState::Serving,
        DeviceState::Syncing,
        DeviceState::Synced,
        DeviceState::SourceDetached,
        DeviceState::Degraded,
    ] {
        let _ = writeln!(o, "livemirror_state{{state=\"{s}\"}} {}", u8::from(st.state == s));
    }
    one(&mut o, "livemirror_paused", "gauge", "1 while the copy is paused.", u8::from(st.paused));
    one(&mut o, "livemirror_export_size_bytes", "gauge", "Size of the export.", st.export_size);
    one(&mut o, "livemirror_region_size_bytes", "gauge", "Bitmap granularity.", st.region_size);
    one(&mut o, "livemirror_regions_total", "gauge", "Regions of the export.", st.regions_total);
    one(&mut o, "livemirror_regions_clean", "gauge", "Regions the target holds in sync.", st.regions_clean);
    one(
        &mut o,
        "livemirror_regions_dirty",
        "gauge",
        "Regions still to copy (total minus clean).",
        st.regions_total.saturating_sub(st.regions_clean),
    );
    one(&mut o, "livemirror_regions_discarded", "gauge", "Regions wholly trimmed.", st.regions_discarded);
    one(
        &mut o,
        "livemirror_copied_bytes_total",
        "counter",
        "Bytes the copier has copied onto the current target (starts at 0 with each attach).",
        st.bytes_copied,
    );
    one(
        &mut o,
        "livemirror_copied_as_zeroes_bytes_total",
        "counter",
        "Of the copied bytes, those that read as zeroes and were zeroed on the target instead of written.",
        st.bytes_written_as_zeroes,
    );
    one(&mut o, "livemirror_detect_zeroes", "gauge", "1 when zero detection is on.", u8::from(st.detect_zeroes));
    one(
        &mut o,
        "livemirror_copy_rate_bytes_per_second",
        "gauge",
        "Copy rate (0 when not syncing or paused).",
        st.copy_rate_bytes_per_sec,
    );
    one(
        &mut o,
        "livemirror_copy_rate_limit_bytes_per_second",
        "gauge",
        "Configured copy rate limit (0 = unlimited).",
        st.max_rate,
    );
    if let Some(eta) = st.eta_seconds {
        one(&mut o, "livemirror_eta_seconds", "gauge", "Estimated time until synced (absent when unknown).", eta);
    }
    one(&mut o, "livemirror_error", "gauge", "1 while the status reports an error.", u8::from(st.error.is_some()));
    if let Some(ov) = &st.overlay {
        one(
            &mut o,
            "livemirror_overlay_bytes_used",
            "gauge",
            "What the source's overlay file occupies.",
            ov.bytes_used,
        );
        if let Some(l) = ov.bytes_limit {
            one(&mut o, "livemirror_overlay_bytes_limit", "gauge", "The overlay's --overlay-limit.", l);
        }
        one(
            &mut o,
            "livemirror_overlay_chunks_present",
            "gauge",
            "4 KiB chunks the overlay holds (written, zeroed or trimmed).",
            ov.chunks_present,
        );
        one(
            &mut o,
            "livemirror_overlay_writes_refused_total",
            "counter",
            "Writes refused with ENOSPC because the overlay was full.",
            ov.writes_refused,
        );
    }
    metric(&mut o, "livemirror_events_total", "counter", "Events logged since the daemon started, by kind.");
    for (k, v) in [
        (EventKind::State, &events.state),
        (EventKind::Error, &events.error),
        (EventKind::Info, &events.info),
        (EventKind::Overlay, &events.overlay),
    ] {
        let name = serde_json::to_value(k).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let _ = writeln!(o, "livemirror_events_total{{kind=\"{name}\"}} {}", v.get());
    }

    let snaps: Vec<_> = (0..COMMANDS.len()).map(|i| fe.stats.command(i)).collect();
    metric(&mut o, "livemirror_nbd_requests_total", "counter", "NBD requests answered, by command.");
    for (c, s) in COMMANDS.iter().zip(&snaps) {
        let _ = writeln!(o, "livemirror_nbd_requests_total{{command=\"{c}\"}} {}", s.requests);
    }
    metric(
        &mut o,
        "livemirror_nbd_request_errors_total",
        "counter",
        "NBD requests answered with an error, by command.",
    );
    for (c, s) in COMMANDS.iter().zip(&snaps) {
        let _ = writeln!(o, "livemirror_nbd_request_errors_total{{command=\"{c}\"}} {}", s.errors);
    }
    metric(&mut o, "livemirror_nbd_request_bytes_total", "counter", "Payload bytes of READ and WRITE requests.");
    for (c, s) in COMMANDS.iter().zip(&snaps).take(2) {
        let _ = writeln!(o, "livemirror_nbd_request_bytes_total{{command=\"{c}\"}} {}", s.bytes);
    }
    metric(
        &mut o,
        "livemirror_nbd_request_duration_seconds",
        "histogram",
        "Time from a request's header to its reply being queued, by command.",
    );
    for (c, s) in COMMANDS.iter().zip(&snaps) {
        let mut cum = 0u64;
        for (i, n) in s.buckets.iter().enumerate() {
            cum += n;
            let le = BUCKETS_US.get(i).map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(o, "livemirror_nbd_request_duration_seconds_bucket{{command=\"{c}\",le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(o, "livemirror_nbd_request_duration_seconds_sum{{command=\"{c}\"}} {}", s.nanos as f64 / 1e9);
        let _ = writeln!(o, "livemirror_nbd_request_duration_seconds_count{{command=\"{c}\"}} {cum}");
    }
    one(&mut o, "livemirror_nbd_connections", "gauge", "NBD connections open now.", fe.connections);
    one(
        &mut o,
        "livemirror_nbd_connections_accepted_total",
        "counter",
        "NBD connections served (client and kernel sockets).",
        Stats::get(&fe.stats.connections_accepted),
    );
    one(
        &mut o,
        "livemirror_nbd_connections_refused_total",
        "counter",
        "NBD connections closed at accept because --max-connections were open.",
        Stats::get(&fe.stats.connections_refused),
    );
    one(
        &mut o,
        "livemirror_nbd_kernel_reconnects_total",
        "counter",
        "Sockets handed to the kernel NBD client in place of dead ones.",
        Stats::get(&fe.stats.kernel_reconnects),
    );
    o
}

/// The response to one request head.
fn respond(head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (status, extra, text, send_body) = match (method, target.map(|t| t.split('?').next().unwrap_or(t)), version) {
        (Some(m @ ("GET" | "HEAD")), Some("/metrics"), Some(v)) if v.starts_with("HTTP/") => {
            ("200 OK", "", body(), m == "GET")
        }
        (Some("GET" | "HEAD"), Some(_), Some(_)) => ("404 Not Found", "", "livemirror serves /metrics\n".into(), true),
        (Some(_), Some(_), Some(_)) => {
            ("405 Method Not Allowed", "Allow: GET, HEAD\r\n", "only GET and HEAD\n".into(), true)
        }
        _ => ("400 Bad Request", "", "bad request\n".into(), true),
    };
    let ctype = if status.starts_with("200") { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain" };
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        text.len()
    )
    .into_bytes();
    if send_body {
        out.extend_from_slice(text.as_bytes());
    }
    out
}

/// Reads a request head: until an empty line, EOF, or [`MAX_HEAD`] bytes.
async fn read_head(s: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < MAX_HEAD {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(head)
}

/// Serves scrapes until `stop` turns true.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    mirror: Arc<Mirror>,
    server: Server<Mirror>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics socket: {e}");
            return;
        }
    };
    let counts = Rc::new(EventCounts::default());
    {
        let (counts, mut rx, mut stop) = (counts.clone(), mirror.subscribe_events(), stop.clone());
        tokio::task::spawn_local(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    e = rx.recv() => match e {
                        Ok(ev) => {
                            let c = match ev.kind {
                                EventKind::State => &counts.state,
                                EventKind::Error => &counts.error,
                                EventKind::Info => &counts.info,
                                EventKind::Overlay => &counts.overlay,
                            };
                            c.set(c.get() + 1);
                        }
                        Err(RecvError::Lagged(n)) => counts.missed.set(counts.missed.get() + n),
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
    }
    let busy = Rc::new(Cell::new(0usize));
    loop {
        let (mut sock, peer) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if busy.get() >= MAX_CLIENTS {
            tracing::debug!("metrics: {MAX_CLIENTS} scrapes in progress, closing the connection from {peer}");
            continue;
        }
        busy.set(busy.get() + 1);
        let (mirror, server, counts, busy) = (mirror.clone(), server.clone(), counts.clone(), busy.clone());
        tokio::task::spawn_local(async move {
            let work = async {
                let head = read_head(&mut sock).await?;
                let out = respond(&head, || {
                    let fe = Frontend { stats: server.stats(), connections: server.active_connections() };
                    render(&mirror.status(), &fe, &counts)
                });
                sock.write_all(&out).await?;
                sock.shutdown().await
            };
            match tokio::time::timeout(REQUEST_DEADLINE, work).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics: connection from {peer}: {e}"),
                Err(_) => tracing::debug!("metrics: {peer} took too long"),
            }
            busy.set(busy.get() - 1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_and_head_of_metrics_are_served() {
        let ok = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || "x 1\n".into())).unwrap();
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 4\r\n") && ok.contains("version=0.0.4"), "{ok}");
        let head = String::from_utf8(respond(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", || "x 1\n".into())).unwrap();
        assert!(head.starts_with("HTTP/1.0 200") && head.ends_with("\r\n\r\n"), "{head}");
        let nf = String::from_utf8(respond(b"GET / HTTP/1.1\r\n\r\n", || unreachable!())).unwrap();
        assert!(nf.starts_with("HTTP/1.0 404"), "{nf}");
        let na = String::from_utf8(respond(b"POST /metrics HTTP/1.1\r\n\r\n", || unreachable!())).unwrap();
        assert!(na.starts_with("HTTP/1.0 405") && na.contains("Allow: GET, HEAD"), "{na}");
        let bad = String::from_utf8(respond(b"\x00\x01", || unreachable!())).unwrap();
        assert!(bad.starts_with("HTTP/1.0 400"), "{bad}");
    }
}
