//! `livemirror bench`: sweeps the copier's settings on the user's own devices
//! and recommends flags. Never writes the source; writes the target only with
//! `--force`.

use std::path::PathBuf;

use clap::Args;
use engine::bench::{measure_copy, CopyRun};
use engine::{CacheMode, MirrorConfig};

use crate::units::{human, parse_rate, parse_size};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Read from here (opened read-only).
    #[arg(long, value_name = "PATH")]
    pub(crate) source: PathBuf,
    /// Copy onto here: its contents are destroyed, so --force is required.
    #[arg(long, value_name = "PATH")]
    pub(crate) target: PathBuf,
    /// Confirm that TARGET may be overwritten.
    #[arg(long)]
    pub(crate) force: bool,
    /// How much of the source each run copies (default: all of it, at most 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub(crate) bytes: Option<u64>,
    /// Bitmap region sizes to try (comma-separated sizes).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_size, default_value = "64K,1M,4M")]
    pub(crate) region_sizes: Vec<u64>,
    /// Copier I/Os in flight to try (comma-separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,4,8,16,32")]
    pub(crate) queue_depths: Vec<usize>,
    /// Bytes per copier I/O.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_size, default_value = "1M,2M")]
    pub(crate) copy_chunks: Vec<u64>,
    /// Rate limits to try, in bytes per second (0 = unlimited).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_rate, default_value = "0")]
    pub(crate) rates: Vec<u64>,
    /// auto, direct or buffered (direct measures the devices, not the page cache).
    #[arg(long, value_name = "MODE", default_value = "direct")]
    pub(crate) cache: CacheMode,
    /// Print the runs as JSON lines instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The best run, preferring smaller regions and queue depths among runs within
/// 3 % of the fastest (finer dirty tracking, less interference, same speed).
fn recommend(runs: &[CopyRun]) -> Option<&CopyRun> {
    let best = runs.iter().map(CopyRun::bytes_per_sec).fold(0.0, f64::max);
    runs.iter()
        .filter(|r| r.bytes_per_sec() >= best * 0.97)
        .min_by_key(|r| (r.region_size, r.queue_depth, r.copy_chunk))
}

pub(crate) fn run(a: BenchArgs) -> u8 {
    if !a.force {
        eprintln!(
            "livemirror: bench writes {} (it copies the source onto it); pass --force if its contents may be destroyed",
            a.target.display()
        );
        return 1;
    }
    let limit = a.bytes.unwrap_or(1 << 30);
    let mut runs = Vec::new();
    if !a.json {
        println!(
            "copying up to {} of {} onto {} (cache {:?})",
            human(limit as f64),
            a.source.display(),
            a.target.display(),
            a.cache
        );
        println!("{:>8} {:>6} {:>8} {:>10} {:>9} {:>12}", "region", "qd", "chunk", "rate", "seconds", "throughput");
    }
    for &region in &a.region_sizes {
        for &qd in &a.queue_depths {
            for &chunk in &a.copy_chunks {
                for &rate in &a.rates {
                    let cfg = MirrorConfig {
                        region_size: region,
                        queue_depth: qd.max(1),
                        copy_chunk: chunk as usize,
                        max_rate: rate,
                        ..Default::default()
                    };
                    let (s, t, cache) = (a.source.clone(), a.target.clone(), a.cache);
                    let res = engine::rt::block_on(async move { measure_copy(&s, &t, limit, cache, cfg).await });
                    let run = match res {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            eprintln!("livemirror: {e}");
                            return 1;
                        }
                        Err(e) => {
                            eprintln!("livemirror: {e}");
                            return 1;
                        }
                    };
                    if a.json {
                        println!("{}", serde_json::to_string(&run).unwrap_or_default());
                    } else {
                        println!(
                            "{:>8} {:>6} {:>8} {:>10} {:>9.2} {:>10}/s",
                            human(region as f64),
                            qd,
                            human(chunk as f64),
                            if rate == 0 { "-".to_string() } else { format!("{}/s", human(rate as f64)) },
                            run.seconds,
                            human(run.bytes_per_sec())
                        );
                    }
                    runs.push(run);
                }
            }
        }
    }
    if let Some(r) = recommend(&runs) {
        let msg = format!(
            "recommended: --region-size {} --queue-depth {} --copy-chunk {} ({}/s)",
            human(r.region_size as f64).replace(" KiB", "K").replace(" MiB", "M").replace(".0", ""),
            r.queue_depth,
            human(r.copy_chunk as f64).replace(" KiB", "K").replace(" MiB", "M").replace(".0", ""),
            human(r.bytes_per_sec())
        );
        if a.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(region: u64, qd: usize, bps: f64) -> CopyRun {
        CopyRun {
            region_size: region,
            queue_depth: qd,
            copy_chunk: 1 << 20,
            max_rate: 0,
            bytes: 1 << 30,
            seconds: (1u64 << 30) as f64 / bps,
        }
    }

    #[test]
    fn recommendation_prefers_small_settings_among_the_fastest() {
        let runs =
            vec![run(64 << 10, 16, 1.0e9), run(1 << 20, 8, 1.02e9), run(64 << 10, 8, 0.99e9), run(4 << 20, 32, 0.5e9)];
        let r = recommend(&runs).unwrap();
        assert_eq!((r.region_size, r.queue_depth), (64 << 10, 8));
        assert!(recommend(&[]).is_none());
    }
}
