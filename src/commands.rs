//! The control commands: talk to the daemon, print, pick the exit code
//! (0 ok, 1 failed or refused, 2 usage, 3 wait timed out).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::{Client, Request, Response};
use engine::{DeviceState, Status, VerifyReport};

use crate::units::{human, human_secs};

fn call(control: &Path, req: &Request) -> Result<Response, u8> {
    let mut c = Client::connect(control).map_err(|e| {
        eprintln!("livemirror: {e}");
        1
    })?;
    let r = c.call(req).map_err(|e| {
        eprintln!("livemirror: {e}");
        1
    })?;
    if !r.ok {
        eprintln!("livemirror: {}", r.error.as_deref().unwrap_or("the daemon refused without a reason"));
        return Err(1);
    }
    Ok(r)
}

pub(crate) fn simple(control: &Path, req: Request) -> u8 {
    match call(control, &req) {
        Ok(_) => 0,
        Err(c) => c,
    }
}

/// `set-rate`: the limit, the floor, or both (the limit first).
pub(crate) fn set_rate(control: &Path, rate: Option<u64>, min_rate: Option<u64>) -> u8 {
    let requests =
        rate.map(|rate| Request::SetRate { rate }).into_iter().chain(min_rate.map(|rate| Request::SetMinRate { rate }));
    for req in requests {
        if let Err(c) = call(control, &req) {
            return c;
        }
    }
    0
}

/// `upgrade`: the daemon starts `binary` (default: this command's own
/// executable, which the daemon reaches through /proc as this process sees
/// it) and hands over to it; prints who serves now and how long the export
/// paused.
pub(crate) fn upgrade(control: &Path, binary: Option<PathBuf>) -> u8 {
    let binary = match binary {
        Some(b) => crate::devices::absolute(&b).unwrap_or(b),
        None => match std::fs::read_link("/proc/self/exe") {
            Ok(p) if !p.to_string_lossy().ends_with(" (deleted)") => p,
            Ok(p) => {
                eprintln!("livemirror: this binary was replaced while it ran ({}): run the new one", p.display());
                return 1;
            }
            Err(e) => {
                eprintln!("livemirror: cannot tell which binary this is (/proc/self/exe): {e}");
                return 1;
            }
        },
    };
    match call(control, &Request::Upgrade { binary: binary.clone() }) {
        Ok(r) => {
            match r.upgrade {
                Some(u) => println!(
                    "upgraded to {}: pid {} serves now (was pid {}); the export paused {:.0} ms",
                    binary.display(),
                    u.pid,
                    u.previous_pid,
                    u.pause_ms
                ),
                None => println!("upgraded to {}", binary.display()),
            }
            0
        }
        Err(c) => c,
    }
}

pub(crate) fn attach(control: &Path, target: PathBuf) -> u8 {
    // The daemon resolves the path in its own working directory: send it absolute.
    let target = crate::devices::absolute(&target).unwrap_or(target);
    match call(control, &Request::Attach { target: target.clone() }) {
        Ok(_) => {
            println!("attached {}; sync started (livemirror wait shows progress)", target.display());
            0
        }
        Err(c) => c,
    }
}

fn fetch_status(control: &Path) -> Result<Status, u8> {
    let r = call(control, &Request::Status)?;
    r.status.ok_or_else(|| {
        eprintln!("livemirror: the daemon sent no status");
        1
    })
}

/// The value at a dotted `path` in `v`: object keys, and array indexes
/// (negative ones count from the end).
pub(crate) fn lookup<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut cur = v;
    for seg in path.split('.') {
        cur = match cur {
            serde_json::Value::Object(o) => o.get(seg)?,
            serde_json::Value::Array(a) => {
                let i: i64 = seg.parse().ok()?;
                let i = if i < 0 { a.len().checked_sub(i.unsigned_abs() as usize)? } else { i as usize };
                a.get(i)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// How `status --get` prints a value: strings bare, everything else as JSON
/// (`null`, `true`, `42`, `{"a":1}`).
pub(crate) fn bare(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn status(control: &Path, json: bool, get: &[String]) -> u8 {
    let st = match fetch_status(control) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if json {
        // Straight from the struct: the fields keep their documented order
        // (state first), which a generic JSON value would sort.
        return match serde_json::to_string(&st) {
            Ok(line) => {
                println!("{line}");
                0
            }
            Err(e) => {
                eprintln!("livemirror: cannot encode the status: {e}");
                1
            }
        };
    }
    if !get.is_empty() {
        let v = match serde_json::to_value(&st) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("livemirror: cannot encode the status: {e}");
                return 1;
            }
        };
        let mut out = String::new();
        for f in get {
            match lookup(&v, f) {
                Some(x) => {
                    out.push_str(&bare(x));
                    out.push('\n');
                }
                None => {
                    let fields: Vec<&str> =
                        v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
                    eprintln!("livemirror: the status has no field {f:?} (fields: {})", fields.join(", "));
                    return 1;
                }
            }
        }
        print!("{out}");
        return 0;
    }
    let pct = percent(&st);
    println!("state:    {}{}", st.state, if st.paused { " (paused)" } else { "" });
    println!("export:   {} bytes ({})", st.export_size, human(st.export_size as f64));
    println!("source:   {}", st.source.as_deref().unwrap_or("-"));
    println!("target:   {}", st.target.as_deref().unwrap_or("-"));
    if let Some(o) = &st.overlay {
        let limit = match o.bytes_limit {
            Some(l) if l > 0 => {
                format!(" of {} ({:.0} %)", human(l as f64), 100.0 * o.bytes_used as f64 / l as f64)
            }
            _ => " (no limit)".to_string(),
        };
        let refused =
            if o.writes_refused > 0 { format!("; {} writes refused: full", o.writes_refused) } else { String::new() };
        println!("overlay:  {} holds {}{limit}{refused}", o.path, human(o.bytes_used as f64));
    }
    if let Some(k) = &st.kernel_device {
        println!("kernel:   {k}");
    }
    println!(
        "regions:  {} of {} clean ({pct:.1} %), {} per region",
        st.regions_clean,
        st.regions_total,
        human(st.region_size as f64)
    );
    if st.state == DeviceState::Syncing || st.bytes_copied > 0 {
        let limit = if st.max_rate > 0 { format!(" (limit {}/s)", human(st.max_rate as f64)) } else { String::new() };
        if st.paused {
            println!("copied:   {}, paused{limit}", human(st.bytes_copied as f64));
        } else {
            let eta = st.eta_seconds.map(human_secs).unwrap_or_else(|| "-".into());
            println!(
                "copied:   {} at {}/s, ETA {eta}{limit}",
                human(st.bytes_copied as f64),
                human(st.copy_rate_bytes_per_sec)
            );
        }
    }
    println!(
        "zeroes:   detection {}; {} of the copy written as zeroes",
        if st.detect_zeroes { "on" } else { "off" },
        human(st.bytes_written_as_zeroes as f64)
    );
    if st.regions_discarded > 0 || st.regions_unverifiable > 0 {
        println!("trimmed:  {} discarded, {} unverifiable regions", st.regions_discarded, st.regions_unverifiable);
    }
    println!("error:    {}", st.error.as_deref().unwrap_or("-"));
    if !st.events.is_empty() {
        println!("recent events:");
        for e in st.events.iter().rev().take(5).rev() {
            println!("  {}", e.message);
        }
    }
    0
}

fn percent(st: &Status) -> f64 {
    if st.regions_total > 0 {
        100.0 * st.regions_clean as f64 / st.regions_total as f64
    } else {
        100.0
    }
}

/// Follows the daemon's event stream, one JSON object per line on stdout.
pub(crate) fn events(control: &Path, interval: f64) -> u8 {
    let mut c = match Client::connect(control) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("livemirror: {e}");
            return 1;
        }
    };
    match c.call(&Request::Events { interval }) {
        Ok(r) if r.ok => {}
        Ok(r) => {
            eprintln!("livemirror: {}", r.error.as_deref().unwrap_or("the daemon refused without a reason"));
            return 1;
        }
        Err(e) => {
            eprintln!("livemirror: {e}");
            return 1;
        }
    }
    let mut out = std::io::stdout().lock();
    let mut ended = false;
    loop {
        match c.read_line() {
            Ok(Some(line)) => {
                ended = line.starts_with(br#"{"#) && line.windows(12).any(|w| w == br#""type":"end""#);
                // A reader that went away (`| head -1`) is not an error.
                if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                    return 0;
                }
            }
            Ok(None) if ended => return 0,
            Ok(None) => {
                eprintln!("livemirror: the daemon closed the event stream");
                return 1;
            }
            Err(e) => {
                eprintln!("livemirror: the event stream broke: {e}");
                return 1;
            }
        }
    }
}

/// Why a remote device's link holds up the copy, if it does.
fn link_down(st: &Status) -> Option<String> {
    use engine::backend::LinkState;
    [("source", &st.source_link), ("target", &st.target_link)].into_iter().find_map(|(which, l)| match l {
        Some(LinkState::Reconnecting { attempts, last_error }) => {
            Some(format!("the {which}'s link is down, reconnecting (attempt {attempts}: {last_error})"))
        }
        _ => None,
    })
}

/// One line of `wait`'s progress, honest about a pause.
pub(crate) fn progress_message(st: &Status) -> String {
    let regions = format!("{}/{} regions", st.regions_clean, st.regions_total);
    if let Some(why) = link_down(st) {
        return format!("{regions}, waiting: {why}");
    }
    if st.paused {
        return format!("{regions}, paused (livemirror resume continues)");
    }
    format!(
        "{regions}, {}/s, ETA {}",
        human(st.copy_rate_bytes_per_sec),
        st.eta_seconds.map(human_secs).unwrap_or_else(|| "-".into())
    )
}

/// Why waiting for this status can never succeed, if so.
fn hopeless(st: &Status) -> Option<String> {
    match st.state {
        DeviceState::Degraded => Some(format!("degraded: {}", st.error.as_deref().unwrap_or("target failed"))),
        DeviceState::Serving => {
            Some("no target is attached: nothing to wait for (`livemirror attach TARGET` starts a sync)".to_string())
        }
        DeviceState::Syncing => st.error.clone().map(|e| format!("the copy stopped: {e}")),
        _ => None,
    }
}

pub(crate) fn wait(control: &Path, timeout: Option<f64>) -> u8 {
    let start = Instant::now();
    // The first status decides whether there is anything to wait for at all,
    // before any progress is drawn.
    let first = match fetch_status(control) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if let Some(f) = hopeless(&first) {
        eprintln!("livemirror: {f}");
        return 1;
    }
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {percent:>3}% {msg}") {
            b.set_style(style.progress_chars("=> "));
        }
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut last_line = Instant::now() - Duration::from_secs(60);
    let mut said_paused = false;
    let mut next = Some(first);
    loop {
        let st = match next.take() {
            Some(s) => s,
            None => match fetch_status(control) {
                Ok(s) => s,
                Err(c) => {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    return c;
                }
            },
        };
        let done = matches!(st.state, DeviceState::Synced | DeviceState::SourceDetached);
        if let Some(f) = hopeless(&st) {
            if let Some(b) = &bar {
                b.abandon();
            }
            eprintln!("livemirror: {f}");
            return 1;
        }
        let msg = progress_message(&st);
        if st.paused && !said_paused && timeout.is_none() {
            // Without a timeout a paused wait would look hung: say why it waits.
            let why = "the copy is paused: waiting until `livemirror resume` (Ctrl-C stops waiting)";
            match &bar {
                Some(b) => b.println(why),
                None => eprintln!("{why}"),
            }
        }
        said_paused = st.paused;
        if let Some(b) = &bar {
            b.set_length(st.regions_total.max(1));
            b.set_position(st.regions_clean);
            b.set_message(msg.clone());
        } else if done || last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!("{}: {:.1}% ({msg})", st.state, percent(&st));
            last_line = Instant::now();
        }
        if done {
            if let Some(b) = &bar {
                b.finish_with_message(format!("synced ({})", human(st.bytes_copied as f64)));
            }
            return 0;
        }
        if timeout.is_some_and(|t| start.elapsed().as_secs_f64() >= t) {
            if let Some(b) = &bar {
                b.abandon();
            }
            eprintln!("livemirror: timed out waiting for the sync ({msg})");
            return 3;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// verify's summary line, and whether a `--strict` run passes. Zero regions
/// compared is never called a match.
pub(crate) fn verify_summary(rep: &VerifyReport) -> (String, bool) {
    let mut s = format!(
        "verify: {} regions compared ({}), {} mismatching ranges",
        rep.regions_compared,
        human(rep.bytes_compared as f64),
        rep.mismatches.len()
    );
    if rep.regions_not_copied_yet > 0 {
        s.push_str(&format!(
            "; {} regions not compared because the copy has not reached them yet (verify --wait compares everything)",
            rep.regions_not_copied_yet
        ));
    }
    if rep.regions_unverifiable > 0 {
        s.push_str(&format!("; {} trimmed regions cannot be compared", rep.regions_unverifiable));
    }
    let other = rep.regions_skipped.saturating_sub(rep.regions_not_copied_yet + rep.regions_unverifiable);
    if other > 0 {
        s.push_str(&format!("; {other} more regions skipped"));
    }
    if rep.mismatches.is_empty() {
        if rep.regions_compared == 0 {
            s.push_str(": nothing was compared, so this is no evidence that the disks match");
        } else if rep.regions_not_copied_yet > 0 {
            s.push_str(": the compared regions match; the others are not checked");
        } else {
            s.push_str(": source and target match");
        }
    }
    let strict_ok = rep.mismatches.is_empty() && rep.regions_compared > 0 && rep.regions_not_copied_yet == 0;
    (s, strict_ok)
}

pub(crate) fn verify(control: &Path, wait_first: bool, timeout: Option<f64>, strict: bool) -> u8 {
    if wait_first {
        let c = wait(control, timeout);
        if c != 0 {
            return c;
        }
    }
    let r = match call(control, &Request::Verify) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let Some(rep) = r.report else {
        eprintln!("livemirror: the daemon sent no verify report");
        return 1;
    };
    for (s, e) in &rep.mismatches {
        println!("mismatch: bytes {s}..{e} ({} bytes)", e - s);
    }
    let (line, strict_ok) = verify_summary(&rep);
    println!("{line}");
    if !rep.mismatches.is_empty() || (strict && !strict_ok) {
        1
    } else {
        0
    }
}

pub(crate) fn grow(control: &Path, size: Option<u64>) -> u8 {
    match call(control, &Request::Grow { size }) {
        Ok(r) => {
            if let Some(s) = r.size {
                println!("export size is now {s} bytes ({})", human(s as f64));
            }
            0
        }
        Err(c) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_prints_fields_bare_and_follows_dotted_paths() {
        let v = serde_json::json!({
            "state": "degraded",
            "error": "target write failed at offset 0: cannot open \"/x\\\"y\": gone",
            "eta_seconds": null,
            "paused": false,
            "export_size": 1024,
            "events": [{"message": "first"}, {"message": "last"}],
        });
        assert_eq!(bare(lookup(&v, "state").unwrap()), "degraded");
        assert_eq!(bare(lookup(&v, "error").unwrap()), r#"target write failed at offset 0: cannot open "/x\"y": gone"#);
        assert_eq!(bare(lookup(&v, "eta_seconds").unwrap()), "null");
        assert_eq!(bare(lookup(&v, "paused").unwrap()), "false");
        assert_eq!(bare(lookup(&v, "export_size").unwrap()), "1024");
        assert_eq!(bare(lookup(&v, "events.0.message").unwrap()), "first");
        assert_eq!(bare(lookup(&v, "events.-1.message").unwrap()), "last");
        assert_eq!(bare(lookup(&v, "events.1").unwrap()), r#"{"message":"last"}"#);
        assert!(lookup(&v, "events.2").is_none());
        assert!(lookup(&v, "events.-3").is_none());
        assert!(lookup(&v, "nope").is_none());
        assert!(lookup(&v, "state.x").is_none());
    }

    #[test]
    fn progress_shows_no_eta_while_paused_and_says_what_holds_it_up() {
        let mut st: Status = serde_json::from_value(serde_json::json!({
            "state": "syncing", "paused": false, "export_size": 1u64 << 30, "source": "/dev/s", "target": "/dev/t",
            "region_size": 65536, "regions_total": 1000, "regions_clean": 250, "bytes_copied": 1u64 << 28,
            "copy_rate_bytes_per_sec": 1048576.0, "eta_seconds": 750.0, "error": null, "regions_discarded": 0,
            "regions_unverifiable": 0, "max_rate": 0, "copier_running": true
        }))
        .expect("a status");
        assert_eq!(progress_message(&st), "250/1000 regions, 1.0 MiB/s, ETA 12m30s");
        st.paused = true;
        st.eta_seconds = None;
        let m = progress_message(&st);
        assert!(m.contains("paused") && !m.contains("ETA"), "{m}");
        st.target_link =
            Some(engine::backend::LinkState::Reconnecting { attempts: 3, last_error: "connection refused".into() });
        let m = progress_message(&st);
        assert!(m.contains("the target's link is down") && m.contains("attempt 3: connection refused"), "{m}");
    }

    fn report(compared: u64, not_yet: u64, mismatches: usize) -> VerifyReport {
        VerifyReport {
            regions_compared: compared,
            regions_skipped: not_yet,
            regions_not_copied_yet: not_yet,
            regions_unverifiable: 0,
            bytes_compared: compared * 65536,
            mismatches: vec![(0, 4096); mismatches],
        }
    }

    #[test]
    fn nothing_compared_is_never_a_pass() {
        let (line, ok) = verify_summary(&report(0, 100, 0));
        assert!(!ok);
        assert!(line.contains("100 regions not compared because the copy has not reached them yet"), "{line}");
        assert!(line.contains("nothing was compared"), "{line}");
        assert!(!line.contains("match;") && !line.contains("source and target match"), "{line}");
        let (line, ok) = verify_summary(&report(40, 60, 0));
        assert!(!ok, "{line}");
        assert!(line.contains("the others are not checked"), "{line}");
        let (line, ok) = verify_summary(&report(100, 0, 0));
        assert!(ok && line.ends_with("source and target match"), "{line}");
        let (line, ok) = verify_summary(&report(100, 0, 2));
        assert!(!ok && line.contains("2 mismatching ranges") && !line.contains("match:"), "{line}");
    }
}
