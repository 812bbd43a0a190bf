//! Events (`ublk-clone events`): what changed in a clone, as JSON lines. The daemon's control
//! loop looks at the engine's status every tick (about 100 ms) and logs what changed since
//! the last look: the mode (with its reason), hydration complete, a region failed, the source
//! lost and back, and commits slower than [`SLOW_COMMIT`]. Readers poll with the sequence
//! number of the last event they saw.
//!
//! Invariants: sequence numbers grow by one per event and are never reused by a daemon (a
//! new daemon starts again at 1, and says which it is: [`EventsPage::pid`]); a
//! reader that fell behind by more than [`KEEP`] events is told how many it missed. A source
//! lost and back within one tick is not seen (the status shows the source's state, not its
//! history).

use crate::engine::{Engine, Mode, Status};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Events kept for readers.
pub const KEEP: usize = 4096;
/// A commit slower than this is an event.
pub const SLOW_COMMIT: Duration = Duration::from_secs(1);

/// What happened.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The daemon started serving (first event of every daemon).
    Started {
        hydrated: u64,
        regions: u64,
    },
    ModeChanged {
        mode: String,
        reason: String,
    },
    HydrationComplete,
    RegionFailed {
        region: u64,
    },
    SourceLost {
        reason: String,
    },
    SourceBack {
        after_seconds: u64,
    },
    SlowCommit {
        seconds: f64,
    },
}

/// One event, as `events` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub seq: u64,
    /// Seconds since the Unix epoch.
    pub time: f64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What a reader gets: the events after its `after`, the number to ask with next, and how
/// many it missed (fell out of the log before it asked).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EventsPage {
    pub events: Vec<Event>,
    pub next: u64,
    pub missed: u64,
    /// The daemon answering: a new daemon (a recovery or restart) numbers its events from 1
    /// again, so a reader that sees another pid starts over from 0.
    #[serde(default)]
    pub pid: u32,
}

/// The daemon's event log and the status it last looked at.
pub struct Events {
    log: VecDeque<Event>,
    next: u64,
    last: Option<Status>,
    lost_since: Option<SystemTime>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            log: VecDeque::new(),
            next: 1,
            last: None,
            lost_since: None,
        }
    }
}

impl Events {
    fn push(&mut self, kind: EventKind) {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        log::info!("event: {kind:?}");
        self.log.push_back(Event {
            seq: self.next,
            time,
            kind,
        });
        self.next += 1;
        while self.log.len() > KEEP {
            self.log.pop_front();
        }
    }

    /// Logs what changed in `engine` since the last look.
    pub fn tick(&mut self, engine: &Engine) {
        let slow = engine.metrics().take_slowest_commit();
        self.observe(engine.status(), slow);
    }

    /// Logs what changed from the last status to `now` (`slowest`: the slowest commit since).
    pub fn observe(&mut self, now: Status, slowest: Duration) {
        let Some(last) = self.last.take() else {
            self.push(EventKind::Started {
                hydrated: now.hydrated,
                regions: now.regions,
            });
            if now.mode != Mode::ReadWrite {
                self.push(EventKind::ModeChanged {
                    mode: now.mode.name().to_string(),
                    reason: now.mode_reason.clone(),
                });
            }
            self.last = Some(now);
            return;
        };
        if now.mode != last.mode {
            self.push(EventKind::ModeChanged {
                mode: now.mode.name().to_string(),
                reason: now.mode_reason.clone(),
            });
        }
        let old: BTreeSet<u64> = last.failed_regions.iter().copied().collect();
        for r in now.failed_regions.iter().filter(|r| !old.contains(r)) {
            self.push(EventKind::RegionFailed { region: *r });
        }
        match (&last.source_disconnected, &now.source_disconnected) {
            (None, Some(d)) => {
                self.lost_since = Some(UNIX_EPOCH + Duration::from_secs(d.since));
                self.push(EventKind::SourceLost {
                    reason: d.reason.clone(),
                });
            }
            (Some(_), None) => {
                let after = self
                    .lost_since
                    .take()
                    .and_then(|t| t.elapsed().ok())
                    .map_or(0, |d| d.as_secs());
                self.push(EventKind::SourceBack {
                    after_seconds: after,
                });
            }
            _ => {}
        }
        if slowest >= SLOW_COMMIT {
            self.push(EventKind::SlowCommit {
                seconds: slowest.as_secs_f64(),
            });
        }
        if now.hydrated == now.regions && last.hydrated != last.regions {
            self.push(EventKind::HydrationComplete);
        }
        self.last = Some(now);
    }

    /// The events after `after`.
    pub fn page(&self, after: u64) -> EventsPage {
        let first = self.log.front().map_or(self.next, |e| e.seq);
        EventsPage {
            events: self.log.iter().filter(|e| e.seq > after).cloned().collect(),
            next: self.next - 1,
            missed: first.saturating_sub(after + 1),
            pid: std::process::id(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Knobs, SourceDown};

    fn status(hydrated: u64) -> Status {
        Status {
            size: 1 << 20,
            region_size: 65536,
            regions: 16,
            hydrated,
            hydrating: 0,
            failed_regions: vec![],
            mode: Mode::ReadWrite,
            mode_reason: String::new(),
            commits: 0,
            flushes: 0,
            bytes_hydrated: 0,
            bytes_zeroed: 0,
            hydration_rate_bytes_per_sec: 0,
            bitmap_bytes: 0,
            direct_ios: 0,
            direct_redone: 0,
            in_place_ios: 0,
            hydration_idle_wait_ms: 0,
            user_requests_in_service: 0,
            knobs: Knobs::defaults_for(65536),
            source_disconnected: None,
        }
    }

    fn kinds(p: &EventsPage) -> Vec<&str> {
        p.events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Started { .. } => "started",
                EventKind::ModeChanged { .. } => "mode_changed",
                EventKind::HydrationComplete => "hydration_complete",
                EventKind::RegionFailed { .. } => "region_failed",
                EventKind::SourceLost { .. } => "source_lost",
                EventKind::SourceBack { .. } => "source_back",
                EventKind::SlowCommit { .. } => "slow_commit",
            })
            .collect()
    }

    #[test]
    fn changes_become_events_in_order() {
        let mut ev = Events::default();
        ev.observe(status(0), Duration::ZERO);
        ev.observe(status(3), Duration::ZERO); // progress alone is no event
        let mut s = status(5);
        s.failed_regions = vec![7, 9];
        s.source_disconnected = Some(SourceDown {
            since: 1,
            reason: "connection lost".into(),
        });
        ev.observe(s.clone(), Duration::from_millis(1500));
        s.source_disconnected = None;
        s.failed_regions = vec![7, 9]; // the same failures: no new event
        ev.observe(s.clone(), Duration::from_millis(10));
        s.hydrated = 16;
        s.mode = Mode::ReadOnly;
        s.mode_reason = "commit failed: EIO".into();
        ev.observe(s.clone(), Duration::ZERO);
        ev.observe(s, Duration::ZERO);
        let p = ev.page(0);
        assert_eq!(
            kinds(&p),
            [
                "started",
                "region_failed",
                "region_failed",
                "source_lost",
                "slow_commit",
                "source_back",
                "mode_changed",
                "hydration_complete"
            ]
        );
        assert_eq!(p.next, 8);
        assert_eq!(p.missed, 0);
        let seqs: Vec<u64> = p.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        // The JSON a reader prints.
        let v = serde_json::to_value(&p.events[6]).expect("json");
        assert_eq!(v["event"], "mode_changed");
        assert_eq!(v["mode"], "ro");
        assert_eq!(v["reason"], "commit failed: EIO");
        // Polling from the last one seen gives only what is new.
        assert!(ev.page(8).events.is_empty());
        assert_eq!(kinds(&ev.page(6)), ["mode_changed", "hydration_complete"]);
        // docs/status.md documents exactly these kinds (and `missed`, which `events` adds).
        let doc = include_str!("../../docs/status.md");
        let events_doc = doc.split("# `ublk-clone events`").nth(1).unwrap_or("");
        let events_doc = events_doc
            .split("# `ublk-clone metrics`")
            .next()
            .unwrap_or("");
        let mut documented: Vec<&str> = events_doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        documented.sort_unstable();
        let mut produced = kinds(&p);
        produced.push("missed");
        produced.sort_unstable();
        produced.dedup();
        assert_eq!(documented, produced);
    }

    #[test]
    fn a_reader_that_fell_behind_is_told_what_it_missed() {
        let mut ev = Events::default();
        ev.observe(status(0), Duration::ZERO);
        for _ in 0..KEEP + 10 {
            ev.observe(status(0), SLOW_COMMIT);
        }
        let p = ev.page(0);
        assert_eq!(p.events.len(), KEEP);
        assert_eq!(p.missed, 11);
        assert_eq!(p.next, KEEP as u64 + 11);
    }

    #[test]
    fn a_daemon_starting_degraded_says_so_first() {
        let mut ev = Events::default();
        let mut s = status(2);
        s.mode = Mode::ReadOnly;
        s.mode_reason = "carried over".into();
        ev.observe(s, Duration::ZERO);
        assert_eq!(kinds(&ev.page(0)), ["started", "mode_changed"]);
    }
}
