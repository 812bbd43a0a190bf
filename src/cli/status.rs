//! `list` and `status`: what the running daemons report, formatted for people (or as JSON).

use crate::daemon::control::{self, RecordingStatus, Request};
use crate::engine::Status;
use anyhow::{Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The clone device (default: all).
    pub dev: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until interrupted, fully hydrated (exit 0), or hydration ends
    /// short of it: only failed regions left, or the clone out of read-write mode (exit 1).
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
        "{:<14} {:<16} {:>8} {:<24} {:<24} {:<24} {:<20}",
        "DEVICE", "NAME", "PID", "SOURCE", "DEST", "METADATA", "FEATURES"
    );
    for d in devs {
        let r = &d.record;
        let pid = if d.daemon_running {
            r.pid.to_string()
        } else {
            "-".to_string()
        };
        println!(
            "{:<14} {:<16} {:>8} {:<24} {:<24} {:<24} {:<20}{}",
            r.device,
            r.name.as_deref().unwrap_or("-"),
            pid,
            r.source.display(),
            r.dest.display(),
            r.metadata.display(),
            match &r.features {
                None => "?".to_string(),
                Some(f) if f.is_empty() => "-".to_string(),
                Some(f) => f.join(","),
            },
            if d.daemon_running {
                ""
            } else {
                "  (no daemon, recoverable: ublk-clone recover)"
            }
        );
    }
    Ok(())
}

/// `ublk-clone features`: what the kernel's ublk driver offers (`UBLK_U_CMD_GET_FEATURES`)
/// and what clones created now use of it.
pub fn run_features() -> Result<()> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        anyhow::bail!("/dev/ublk-control is missing: ublk_drv is not loaded (modprobe ublk_drv)");
    }
    let Some(f) = crate::ublk::driver_features() else {
        anyhow::bail!(
            "cannot ask the ublk driver for its features through /dev/ublk-control (it needs \
             root)"
        );
    };
    println!("kernel ublk features: {f:#x}");
    for line in feature_lines(f) {
        println!("{line}");
    }
    Ok(())
}

/// One line per feature clones use where the kernel offers it.
fn feature_lines(f: u64) -> Vec<String> {
    use libublk::sys;
    let has = |flag: u32| f & flag as u64 != 0;
    let zc = if crate::ublk::zero_copy(f) {
        "offered; new clones use it unless created with --no-zero-copy"
    } else {
        "not offered (needs UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY: kernel 6.16 or later); \
         request data is copied through the daemon"
    };
    let rec = if has(sys::UBLK_F_USER_RECOVERY) && has(sys::UBLK_F_USER_RECOVERY_REISSUE) {
        "offered; new clones use it unless created with --no-recovery"
    } else {
        "not offered: a daemon's death removes its device"
    };
    let quiesce = if has(sys::UBLK_F_QUIESCE) {
        "offered; `restart` quiesces the device: new requests wait in the kernel for the \
         new daemon instead of reaching the old one"
    } else {
        "not offered (UBLK_F_QUIESCE: kernel 6.16 or later); `restart` hands over as a \
         recovery: requests in flight are re-issued to the new daemon"
    };
    vec![
        format!("zero-copy: {zc}"),
        format!("recovery: {rec}"),
        format!("quiesce: {quiesce}"),
    ]
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
    if s.knobs.hydrate_when == crate::engine::HydrateWhen::Idle {
        out += &format!(
            "\n  hydration only while users are idle (--hydrate-when idle): waited {} ms in all, \
             {} user requests in service now",
            s.hydration_idle_wait_ms, s.user_requests_in_service
        );
    }
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

/// The version of `status --json`'s schema (docs/status.md).
pub const STATUS_SCHEMA: u32 = 1;

/// One device's `status --json` object (docs/status.md).
pub fn status_json(
    device: &str,
    name: Option<&str>,
    features: Option<&[String]>,
    s: &Status,
    rec: Option<&RecordingStatus>,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(s)?;
    let Some(obj) = v.as_object_mut() else {
        anyhow::bail!("the status is not a JSON object");
    };
    obj.insert("schema_version".into(), STATUS_SCHEMA.into());
    obj.insert("device".into(), device.into());
    obj.insert("name".into(), name.into());
    obj.insert("ublk_features".into(), features.into());
    if let Some(rec) = rec {
        obj.insert("recording".into(), serde_json::to_value(rec)?);
    }
    Ok(v)
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

/// `ublk-clone status [DEV]`: the status of one clone, or of every running one. With
/// `--watch` on a terminal, a progress bar per clone (rate, ETA, mode); otherwise lines.
pub fn run_status(a: &StatusArgs) -> Result<()> {
    let ids: Vec<u32> = match &a.dev {
        Some(d) => vec![control::parse_dev(d)?],
        None => control::list_records().iter().map(|r| r.id).collect(),
    };
    let records: std::collections::HashMap<u32, control::DaemonRecord> = control::list_devices()
        .into_iter()
        .map(|l| (l.record.id, l.record))
        .collect();
    let names: std::collections::HashMap<u32, String> = records
        .iter()
        .filter_map(|(id, r)| Some((*id, r.name.clone()?)))
        .collect();
    if a.watch && !a.json && std::io::stdout().is_terminal() {
        return watch_bars(&ids, &names);
    }
    loop {
        let mut all_done = true;
        let mut ended = Vec::new();
        for id in &ids {
            let (s, rec) = fetch_status(*id)?;
            all_done &= watch_over(*id, &s, &mut ended);
            let dev = format!("/dev/ublkb{id}");
            if a.json {
                let name = names.get(id).map(String::as_str);
                let features = records.get(id).and_then(|r| r.features.as_deref());
                println!("{}", status_json(&dev, name, features, &s, rec.as_ref())?);
            } else {
                println!("{}", format_status(&dev, &s));
                if let Some(rec) = &rec {
                    println!("{}", format_recording(rec));
                }
            }
        }
        if !a.watch {
            return Ok(());
        }
        if all_done {
            return watch_result(&ended);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Whether `--watch` is over for clone `id`: hydrated, or hydration has ended short of it
/// (failed regions only are left, or the clone left read-write mode), which goes to `ended`.
fn watch_over(id: u32, s: &Status, ended: &mut Vec<String>) -> bool {
    let failed = s.failed_regions.len() as u64;
    if s.hydrated >= s.regions {
        return true;
    }
    let why = if s.mode != crate::engine::Mode::ReadWrite {
        format!("the clone is in {} mode", s.mode.name())
    } else if s.hydrated + failed >= s.regions {
        format!("{failed} regions failed to hydrate (source read errors)")
    } else {
        return false;
    };
    ended.push(format!(
        "/dev/ublkb{id}: hydration ended at {} of {} regions: {why}",
        s.hydrated, s.regions
    ));
    true
}

/// `--watch`'s exit: success when every clone is hydrated, else an error saying why not.
fn watch_result(ended: &[String]) -> Result<()> {
    if ended.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", ended.join("; "))
    }
}

/// The progress bar's message: the daemon's own rate and ETA, the mode, a lost source.
fn bar_message(s: &Status) -> String {
    let remaining = (s.regions - s.hydrated.min(s.regions)) * s.region_size;
    let eta = match remaining.checked_div(s.hydration_rate_bytes_per_sec) {
        _ if remaining == 0 => "done".to_string(),
        Some(secs) => format!("ETA {}m{:02}s", secs / 60, secs % 60),
        None if !s.knobs.hydration_enabled => "hydration off".to_string(),
        None => "ETA unknown".to_string(),
    };
    let mut m = format!(
        "{}/s {eta} {}",
        human(s.hydration_rate_bytes_per_sec as f64),
        s.mode.name()
    );
    if !s.failed_regions.is_empty() {
        m += &format!(", {} failed regions", s.failed_regions.len());
    }
    if s.source_disconnected.is_some() {
        m += ", source disconnected (retrying)";
    }
    m
}

/// `status --watch` on a terminal: one bar per clone until all are hydrated.
fn watch_bars(ids: &[u32], names: &std::collections::HashMap<u32, String>) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let style = ProgressStyle::with_template(
        "{prefix:24} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}",
    )
    .context("progress bar template")?
    .progress_chars("=> ");
    let multi = MultiProgress::new();
    let bars: Vec<(u32, ProgressBar)> = ids
        .iter()
        .map(|id| {
            let b = multi.add(ProgressBar::new(0).with_style(style.clone()));
            let dev = format!("/dev/ublkb{id}");
            b.set_prefix(match names.get(id) {
                Some(n) => format!("{dev} ({n})"),
                None => dev,
            });
            (*id, b)
        })
        .collect();
    loop {
        let mut all_done = true;
        let mut ended = Vec::new();
        for (id, bar) in &bars {
            let (s, _) = fetch_status(*id)?;
            all_done &= watch_over(*id, &s, &mut ended);
            bar.set_length(s.size);
            bar.set_position((s.hydrated * s.region_size).min(s.size));
            bar.set_message(bar_message(&s));
        }
        if all_done {
            for (_, b) in &bars {
                b.finish();
            }
            return watch_result(&ended);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Knobs, Mode, SourceDown};
    use libublk::sys;

    #[test]
    fn zero_copy_needs_both_flags_and_recovery_both_of_its() {
        let zc = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY) as u64;
        let rec = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        let l = feature_lines(zc | rec);
        assert!(l[0].starts_with("zero-copy: offered") && l[1].starts_with("recovery: offered"));
        // 6.12 offers user copy and recovery, not auto buffer registration.
        let l = feature_lines(sys::UBLK_F_USER_COPY as u64 | rec);
        assert!(l[0].starts_with("zero-copy: not offered"), "{l:?}");
        let l = feature_lines(sys::UBLK_F_AUTO_BUF_REG as u64 | sys::UBLK_F_USER_RECOVERY as u64);
        assert!(l[0].starts_with("zero-copy: not offered") && l[1].starts_with("recovery: not"));
        assert_eq!(
            crate::ublk::feature_names(zc | rec),
            ["zero-copy", "recovery"]
        );
        // Quiesce is used on a recoverable device only.
        let q = sys::UBLK_F_QUIESCE as u64;
        assert!(l[2].starts_with("quiesce: not offered"), "{l:?}");
        assert!(feature_lines(rec | q)[2].starts_with("quiesce: offered"));
        assert_eq!(crate::ublk::feature_names(rec | q), ["recovery", "quiesce"]);
        assert!(crate::ublk::feature_names(q).is_empty());
        assert!(crate::ublk::feature_names(zc & !(sys::UBLK_F_USER_COPY as u64)).is_empty());
    }

    /// Every key `status --json` writes (nested ones as `a.b`).
    fn keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
        if let Some(o) = v.as_object() {
            for (k, x) in o {
                let key = format!("{prefix}{k}");
                if x.is_object() {
                    keys(x, &format!("{key}."), out);
                } else {
                    out.push(key);
                }
            }
        }
    }

    /// The JSON status and docs/status.md name the same keys: nothing undocumented is
    /// written, nothing documented is missing.
    #[test]
    fn the_json_status_is_what_docs_status_md_documents() -> Result<()> {
        let s = Status {
            size: 1 << 30,
            region_size: 65536,
            regions: 16384,
            hydrated: 100,
            hydrating: 2,
            failed_regions: vec![7],
            mode: Mode::ReadWrite,
            mode_reason: String::new(),
            commits: 3,
            flushes: 4,
            bytes_hydrated: 5,
            bytes_zeroed: 1,
            hydration_rate_bytes_per_sec: 6,
            bitmap_bytes: 7,
            direct_ios: 0,
            direct_redone: 0,
            in_place_ios: 0,
            hydration_idle_wait_ms: 0,
            user_requests_in_service: 0,
            knobs: Knobs::defaults_for(65536),
            source_disconnected: Some(SourceDown {
                since: 1,
                reason: "gone".into(),
            }),
        };
        let rec = RecordingStatus {
            log: "/l".into(),
            entries: 9,
            error: None,
        };
        let features = ["zero-copy".to_string(), "recovery".to_string()];
        let v = status_json("/dev/ublkb0", Some("db"), Some(&features), &s, Some(&rec))?;
        assert_eq!(v["schema_version"], STATUS_SCHEMA);
        assert_eq!(v["name"], "db");
        assert_eq!(v["ublk_features"][0], "zero-copy");
        let mut written = Vec::new();
        keys(&v, "", &mut written);
        written.sort();
        let whole = include_str!("../../docs/status.md");
        let doc = whole
            .split("\n# `ublk-clone events`")
            .next()
            .unwrap_or(whole);
        let mut documented: Vec<String> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_string)
            .collect();
        documented.sort();
        assert_eq!(written, documented);
        assert!(doc.contains(&format!("Schema version {STATUS_SCHEMA}:")));
        Ok(())
    }
}
