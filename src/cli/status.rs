//! `list` and `status`: what the running daemons report, formatted for people (or as JSON).

use crate::daemon::control::{self, RecordingStatus, Request};
use crate::engine::Status;
use anyhow::{Context, Result};
use clap::Args;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The clone device (default: all).
    pub dev: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until interrupted or fully hydrated.
    #[arg(long)]
    pub watch: bool,
}

/// `ublk-clone list`: one line per running daemon.
pub fn run_list() -> Result<()> {
    let devs = control::list_devices();
    if devs.is_empty() {
        println!("no ublk-clone devices");
        return Ok(());
    }
    println!(
        "{:<14} {:<16} {:>8} {:<24} {:<24} {:<24}",
        "DEVICE", "NAME", "PID", "SOURCE", "DEST", "METADATA"
    );
    for d in devs {
        let r = &d.record;
        let pid = if d.daemon_running {
            r.pid.to_string()
        } else {
            "-".to_string()
        };
        println!(
            "{:<14} {:<16} {:>8} {:<24} {:<24} {:<24}{}",
            r.device,
            r.name.as_deref().unwrap_or("-"),
            pid,
            r.source.display(),
            r.dest.display(),
            r.metadata.display(),
            if d.daemon_running {
                ""
            } else {
                "  (no daemon, recoverable: ublk-clone recover)"
            }
        );
    }
    Ok(())
}

fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// dm-clone's status fields plus a progress line.
pub fn format_status(dev: &str, s: &Status) -> String {
    let pct = if s.regions == 0 {
        100.0
    } else {
        s.hydrated as f64 * 100.0 / s.regions as f64
    };
    let remaining = (s.regions - s.hydrated.min(s.regions)) * s.region_size;
    let eta = if s.hydrated == s.regions {
        "done".to_string()
    } else if let Some(secs) = remaining.checked_div(s.hydration_rate_bytes_per_sec) {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        "unknown".to_string()
    };
    let mut out = format!(
        "{dev}: {} {}/{} {} {} hydration_threshold {} hydration_batch_size {} {}\n",
        s.region_size >> 9,
        s.hydrated,
        s.regions,
        s.hydrating,
        if s.knobs.hydration_enabled {
            "hydration"
        } else {
            "no_hydration"
        },
        s.knobs.threshold,
        s.knobs.batch_size,
        s.mode.name(),
    );
    out += &format!(
        "  hydrated {:.1}% ({} of {}), {}/s, ETA {eta}, commits {}, failed regions {}",
        pct,
        human((s.hydrated * s.region_size).min(s.size) as f64),
        human(s.size as f64),
        human(s.hydration_rate_bytes_per_sec as f64),
        s.commits,
        s.failed_regions.len()
    );
    if !s.mode_reason.is_empty() {
        out += &format!("\n  mode {}: {}", s.mode.name(), s.mode_reason);
    }
    if let Some(d) = &s.source_disconnected {
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.since);
        let ago = std::time::SystemTime::now()
            .duration_since(since)
            .map_or(0, |t| t.as_secs());
        out += &format!(
            "\n  source disconnected since {} ({ago} s ago), retrying: {}",
            humantime::format_rfc3339_seconds(since),
            d.reason
        );
    }
    out
}

fn fetch_status(id: u32) -> Result<(Status, Option<RecordingStatus>)> {
    let r = control::request(id, &Request::Status)?;
    let v = r.status.context("the daemon sent no status")?;
    let s = serde_json::from_value(v).context("malformed status from the daemon")?;
    Ok((s, r.recording))
}

fn format_recording(r: &RecordingStatus) -> String {
    match &r.error {
        None => format!("  recording to {}: {} entries", r.log, r.entries),
        Some(e) => format!(
            "  recording to {} STOPPED after {} entries: {e}",
            r.log, r.entries
        ),
    }
}

/// `ublk-clone status [DEV]`: the status of one clone, or of every running one.
pub fn run_status(a: &StatusArgs) -> Result<()> {
    let ids: Vec<u32> = match &a.dev {
        Some(d) => vec![control::parse_dev(d)?],
        None => control::list_records().iter().map(|r| r.id).collect(),
    };
    loop {
        let mut all_done = true;
        for id in &ids {
            let (s, rec) = fetch_status(*id)?;
            all_done &= s.hydrated == s.regions;
            if a.json {
                let mut v = serde_json::to_value(&s)?;
                if let (Some(rec), Some(obj)) = (&rec, v.as_object_mut()) {
                    obj.insert("recording".into(), serde_json::to_value(rec)?);
                }
                println!("{v}");
            } else {
                println!("{}", format_status(&format!("/dev/ublkb{id}"), &s));
                if let Some(rec) = &rec {
                    println!("{}", format_recording(rec));
                }
            }
        }
        if !a.watch || all_done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// The clone device: /dev/ublkbN, ublkbN or N.
    pub dev: String,
}

/// `ublk-clone name DEV`: the clone's name (nothing and exit 1 if the device has none).
pub fn run_name(a: &NameArgs) -> Result<()> {
    let id = control::parse_dev(&a.dev)?;
    let rec = control::list_devices()
        .into_iter()
        .find(|l| l.record.id == id)
        .and_then(|l| l.record.name);
    match rec {
        Some(n) => {
            println!("{n}");
            Ok(())
        }
        None => anyhow::bail!("/dev/ublkb{id}: no clone name recorded"),
    }
}
