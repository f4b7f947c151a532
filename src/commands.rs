//! The control commands: talk to the daemon, print, pick the exit code
//! (0 ok, 1 failed or refused, 2 usage, 3 wait timed out).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::{Client, Request, Response};
use engine::{DeviceState, Status};

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

pub fn simple(control: &Path, req: Request) -> u8 {
    match call(control, &req) {
        Ok(_) => 0,
        Err(c) => c,
    }
}

pub fn attach(control: &Path, target: PathBuf) -> u8 {
    // The daemon resolves the path in its own working directory: send it absolute.
    let target = std::path::absolute(&target).unwrap_or(target);
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

pub fn status(control: &Path, json: bool) -> u8 {
    let st = match fetch_status(control) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if json {
        match serde_json::to_string(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("livemirror: {e}");
                return 1;
            }
        }
        return 0;
    }
    let pct = if st.regions_total > 0 { 100.0 * st.regions_clean as f64 / st.regions_total as f64 } else { 100.0 };
    println!("state:    {}{}", st.state, if st.paused { " (paused)" } else { "" });
    println!("export:   {} bytes ({})", st.export_size, human(st.export_size as f64));
    println!("source:   {}", st.source.as_deref().unwrap_or("-"));
    println!("target:   {}", st.target.as_deref().unwrap_or("-"));
    println!(
        "regions:  {} of {} clean ({pct:.1} %), {} per region",
        st.regions_clean,
        st.regions_total,
        human(st.region_size as f64)
    );
    if st.state == DeviceState::Syncing || st.bytes_copied > 0 {
        let eta = st.eta_seconds.map(human_secs).unwrap_or_else(|| "-".into());
        println!(
            "copied:   {} at {}/s, ETA {eta}{}",
            human(st.bytes_copied as f64),
            human(st.copy_rate_bytes_per_sec),
            if st.max_rate > 0 { format!(" (limit {}/s)", human(st.max_rate as f64)) } else { String::new() }
        );
    }
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

pub fn wait(control: &Path, timeout: Option<f64>) -> u8 {
    let start = Instant::now();
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
    loop {
        let st = match fetch_status(control) {
            Ok(s) => s,
            Err(c) => return c,
        };
        let done = matches!(st.state, DeviceState::Synced | DeviceState::SourceDetached);
        let msg = format!(
            "{}/{} regions, {}/s, ETA {}",
            st.regions_clean,
            st.regions_total,
            human(st.copy_rate_bytes_per_sec),
            st.eta_seconds.map(human_secs).unwrap_or_else(|| "-".into())
        );
        if let Some(b) = &bar {
            b.set_length(st.regions_total.max(1));
            b.set_position(st.regions_clean);
            b.set_message(msg.clone());
        } else if done || last_line.elapsed() >= Duration::from_secs(2) {
            let pct =
                if st.regions_total > 0 { 100.0 * st.regions_clean as f64 / st.regions_total as f64 } else { 100.0 };
            eprintln!("{}: {pct:.1}% ({msg})", st.state);
            last_line = Instant::now();
        }
        if done {
            if let Some(b) = &bar {
                b.finish_with_message(format!("synced ({})", human(st.bytes_copied as f64)));
            }
            return 0;
        }
        let failure = match st.state {
            DeviceState::Degraded => Some(format!("degraded: {}", st.error.as_deref().unwrap_or("target failed"))),
            DeviceState::Serving => Some("no target is attached".to_string()),
            DeviceState::Syncing => st.error.clone().map(|e| format!("the copy stopped: {e}")),
            _ => None,
        };
        if let Some(f) = failure {
            if let Some(b) = &bar {
                b.abandon();
            }
            eprintln!("livemirror: {f}");
            return 1;
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

pub fn verify(control: &Path) -> u8 {
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
    println!(
        "verify: {} regions compared ({}), {} skipped, {} mismatching ranges",
        rep.regions_compared,
        human(rep.bytes_compared as f64),
        rep.regions_skipped,
        rep.mismatches.len()
    );
    u8::from(!rep.mismatches.is_empty())
}

pub fn grow(control: &Path, size: Option<u64>) -> u8 {
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
