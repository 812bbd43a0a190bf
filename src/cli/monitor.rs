//! `events` and `metrics`: what the daemons report for monitoring. `events` prints JSON lines
//! (docs/status.md lists the event kinds) and follows them; `metrics` prints the Prometheus
//! exposition text of every clone (for node_exporter's textfile collector; a daemon started
//! with `--metrics ADDR` also serves it over HTTP).

use crate::daemon::control::{self, Request};
use crate::daemon::metrics::render;
use crate::engine::Status;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// The clone (name, /dev/ublk-clone/NAME, /dev/ublkbN or N; default: every running one).
    pub dev: Option<String>,
    /// Print the events logged so far and exit, instead of following.
    #[arg(long)]
    pub no_follow: bool,
}

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// The clone (default: every running one).
    pub dev: Option<String>,
}

/// The devices a command covers, with their names.
fn devices(dev: Option<&str>) -> Result<Vec<(u32, String)>> {
    let names: HashMap<u32, String> = control::list_devices()
        .into_iter()
        .map(|l| (l.record.id, l.record.name.unwrap_or_default()))
        .collect();
    let ids = match dev {
        Some(d) => vec![control::parse_dev(d)?],
        None => control::list_records().iter().map(|r| r.id).collect(),
    };
    Ok(ids
        .into_iter()
        .map(|id| (id, names.get(&id).cloned().unwrap_or_default()))
        .collect())
}

/// `ublk-clone events [DEV]`: one JSON object per line, each with its `device` and `name`.
pub fn run_events(a: &EventsArgs) -> Result<()> {
    let devs = devices(a.dev.as_deref())?;
    // Per device: the daemon last read from, and the last event seen from it.
    let mut after: HashMap<u32, (u32, u64)> = HashMap::new();
    loop {
        for (id, name) in &devs {
            let (pid, seen) = after.get(id).copied().unwrap_or((0, 0));
            let r = control::request(*id, &Request::Events { after: seen })?;
            let mut page = r
                .events
                .context("the daemon sent no events (an older daemon?)")?;
            if pid != 0 && page.pid != pid {
                // A new daemon (a recovery, a restart): its events start at 1 again.
                let r = control::request(*id, &Request::Events { after: 0 })?;
                page = r.events.context("the daemon sent no events")?;
            }
            if page.missed > 0 {
                println!(
                    "{}",
                    serde_json::json!({"device": format!("/dev/ublkb{id}"), "name": name,
                        "event": "missed", "count": page.missed})
                );
            }
            for e in &page.events {
                let mut v = serde_json::to_value(e)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("device".into(), format!("/dev/ublkb{id}").into());
                    o.insert("name".into(), name.clone().into());
                }
                println!("{v}");
            }
            after.insert(*id, (page.pid, page.next));
        }
        if a.no_follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ublk-clone metrics [DEV]`: the exposition text of each clone.
pub fn run_metrics(a: &MetricsArgs) -> Result<()> {
    let mut out = String::new();
    for (i, (id, name)) in devices(a.dev.as_deref())?.iter().enumerate() {
        let r = control::request(*id, &Request::Metrics)?;
        let m = r
            .metrics
            .context("the daemon sent no metrics (an older daemon?)")?;
        let s: Status = serde_json::from_value(r.status.context("no status")?)
            .context("malformed status from the daemon")?;
        out += &render(&format!("/dev/ublkb{id}"), name, &s, &m, i == 0);
    }
    print!("{out}");
    Ok(())
}
