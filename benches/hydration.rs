//! Background hydration throughput against `dd iflag=direct oflag=direct bs=4M` copying the
//! same source, side by side and interleaved in one run (files on the same file system, no
//! ublk). Prints each run and the ratio of medians. Not a timed test: a benchmark.
//!
//! `cargo bench --bench hydration [-- SIZE_MIB [ROUNDS]]` (defaults: 1024 MiB, 3 rounds).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_clone::io::file::{Access, FileDev};

mod common;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let src = dir.path().join("source");
    // Incompressible source data, written once.
    let status = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", src.display()),
            "bs=4M",
            &format!("count={}", mib / 4),
            "status=none",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "dd could not create the source");
    let _ = Command::new("sync").status();
    let (mut dd_t, mut clone_t) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = time_dd(&src, &dir.path().join("dd-dest"))?;
        println!(
            "round {round}: dd {:.2} s ({:.0} MiB/s)",
            t.as_secs_f64(),
            mib as f64 / t.as_secs_f64()
        );
        dd_t.push(t);
        let t = time_hydration(&src, dir.path())?;
        println!(
            "round {round}: ublk-clone hydration {:.2} s ({:.0} MiB/s)",
            t.as_secs_f64(),
            mib as f64 / t.as_secs_f64()
        );
        clone_t.push(t);
    }
    dd_t.sort();
    clone_t.sort();
    let (d, c) = (
        dd_t[rounds / 2].as_secs_f64(),
        clone_t[rounds / 2].as_secs_f64(),
    );
    println!(
        "median: dd {:.0} MiB/s, hydration {:.0} MiB/s, ratio hydration/dd = {:.2}x (target >= 0.9x)",
        mib as f64 / d,
        mib as f64 / c,
        d / c
    );
    Ok(())
}

fn time_dd(src: &Path, dst: &Path) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_file(dst);
    let t0 = Instant::now();
    let status = Command::new("dd")
        .args([
            &format!("if={}", src.display()),
            &format!("of={}", dst.display()),
            "bs=4M",
            "iflag=direct",
            "oflag=direct",
            "status=none",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "dd failed");
    let t = t0.elapsed();
    std::fs::remove_file(dst)?;
    Ok(t)
}

fn time_hydration(src: &Path, dir: &Path) -> anyhow::Result<Duration> {
    let source = Arc::new(FileDev::open(src, Access::ReadOnly, true)?);
    common::time_hydration(source, dir, |c| c)
}
