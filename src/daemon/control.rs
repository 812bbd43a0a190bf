//! The control protocol between a running daemon and the commands that talk to it: one
//! JSON request line, one JSON response line, over `<id>.sock`; and the daemon records that
//! say which daemons run. This is the client side ([`request`], [`list_records`]); the daemon
//! answers in [`super::server`].
//!
//! Runtime files live in [`run_dir`] ([`RUN_DIR`], or `$UBLK_CLONE_RUN_DIR` for tests):
//! `<id>.json` (the daemon record: pid, device, devices and options) and `<id>.sock`.
//! Invariant: a record is listed only while its daemon's process is alive.

use super::error::{refuse, DaemonError, Named, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

pub const RUN_DIR: &str = "/run/ublk-clone";

/// Where daemon records, control sockets and the daemon log live: [`RUN_DIR`], unless
/// `UBLK_CLONE_RUN_DIR` names another directory (tests, which must not touch the host's).
pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_CLONE_RUN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUN_DIR))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Set {
        hydration: Option<bool>,
        threshold: Option<u64>,
        batch_size: Option<u64>,
        rate: Option<u64>,
        hydrate_on_read: Option<bool>,
        #[serde(default)]
        hydrate_when: Option<crate::engine::HydrateWhen>,
    },
    Stop,
    /// Hand the device over to a new daemon (`ublk-clone restart`): commit, then exit without
    /// removing the device, which the kernel then holds quiesced for the next daemon.
    Handover,
    /// Log a mark in the daemon's dm-log-writes recording.
    Mark {
        name: String,
    },
    /// The events logged after sequence number `after` (`ublk-clone events`).
    Events {
        after: u64,
    },
    /// The status and the monitoring counters (`ublk-clone metrics`).
    Metrics,
    /// The read trace (`ublk-clone trace`).
    Trace,
}

/// A clone's read trace: the regions first read, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceReply {
    pub region_size: u64,
    pub regions: Vec<u64>,
}

/// The state of a daemon's dm-log-writes recording (`create --log-writes`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordingStatus {
    pub log: String,
    /// Entries in the log so far (the index the next entry will get).
    pub entries: u64,
    /// Why recording stopped (e.g. the log is full); `None` while it runs.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub error: Option<String>,
    pub status: Option<serde_json::Value>,
    #[serde(default)]
    pub recording: Option<RecordingStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<super::events::EventsPage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<crate::engine::metrics::MetricsSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceReply>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            error: None,
            status: None,
            recording: None,
            events: None,
            metrics: None,
            trace: None,
        }
    }

    pub fn err(msg: String) -> Response {
        Response {
            ok: false,
            error: Some(msg),
            status: None,
            recording: None,
            events: None,
            metrics: None,
            trace: None,
        }
    }
}

/// The daemon record written once the device is live.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonRecord {
    pub pid: u32,
    /// While a daemon recovers the device: the dead daemon it replaces (the kernel still
    /// names that one until the recovery starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_pid: Option<u32>,
    pub id: u32,
    pub device: String,
    pub source: PathBuf,
    pub dest: PathBuf,
    pub metadata: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub region_size: u64,
    /// The clone's name (records written before names existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The ublk features the device serves with (`zero-copy`, `recovery`), from
    /// the flags the kernel granted; `None` in records written before this existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
}

pub fn record_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

pub fn socket_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.sock"))
}

/// Accepts `/dev/ublkbN`, `ublkbN` or `N`.
pub fn parse_dev(dev: &str) -> Result<u32> {
    if let Some(id) = super::names::device_number(dev) {
        return Ok(id);
    }
    let Some(name) = super::names::name_of(dev) else {
        refuse!(
            "'{dev}' is not a ublk-clone device: expected a clone's name, /dev/ublk-clone/NAME, \
             /dev/ublkbN or N"
        );
    };
    match list_devices()
        .into_iter()
        .find(|l| l.record.name.as_deref() == Some(name))
    {
        Some(l) => Ok(l.record.id),
        None => refuse!(
            "'{dev}' is not a ublk-clone device: no clone is named '{name}' (expected a clone's \
             name, /dev/ublk-clone/NAME, /dev/ublkbN or N; see `ublk-clone list`)"
        ),
    }
}

/// Sends `req` to the daemon of `/dev/ublkb<id>` and returns its answer; an answer that is
/// not `ok` is an error carrying the daemon's message.
pub fn request(id: u32, req: &Request) -> Result<Response> {
    request_within(id, req, std::time::Duration::from_secs(30))
}

/// [`request`], waiting up to `wait` for the answer.
pub fn request_within(id: u32, req: &Request, wait: std::time::Duration) -> Result<Response> {
    let path = socket_path(id);
    let mut s = UnixStream::connect(&path).named(|| {
        format!(
            "/dev/ublkb{id}: no ublk-clone daemon answers on {} (is the device running? see `ublk-clone list`)",
            path.display()
        )
    })?;
    // A wedged daemon must not hang the CLI.
    let timeout = Some(wait);
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).named(|| {
        format!(
            "/dev/ublkb{id}: the daemon did not answer within {} s (see its log)",
            wait.as_secs()
        )
    })?;
    if resp.is_empty() {
        return Err(DaemonError::Daemon(format!(
            "/dev/ublkb{id}: the daemon closed the control connection without answering"
        )));
    }
    let r: Response =
        serde_json::from_str(&resp).named(|| "malformed reply from the daemon".into())?;
    if !r.ok {
        return Err(DaemonError::Daemon(format!(
            "/dev/ublkb{id}: {}",
            r.error.clone().unwrap_or_else(|| "request failed".into())
        )));
    }
    Ok(r)
}

/// A clone device: its daemon's record, and whether that daemon is running (if not, the
/// device is quiesced and waits for `ublk-clone recover`).
pub struct Listed {
    pub record: DaemonRecord,
    pub daemon_running: bool,
}

/// The clone devices: those whose daemon runs, and those whose daemon died and that wait
/// for recovery, by device number.
pub fn list_devices() -> Vec<Listed> {
    let running = list_records();
    let mut v: Vec<Listed> = running
        .iter()
        .cloned()
        .map(|record| Listed {
            record,
            daemon_running: true,
        })
        .collect();
    for r in all_records() {
        let quiesced = matches!(
            crate::ublk::device_state(r.id),
            Some((crate::ublk::DeviceState::Quiesced, true))
        );
        if quiesced && !running.iter().any(|x| x.id == r.id) {
            v.push(Listed {
                record: r,
                daemon_running: false,
            });
        }
    }
    v.sort_by_key(|l| l.record.id);
    v
}

/// The daemon record at `p`, if `p` is one (`<N>.json`; the run directory holds other files).
fn read_record(p: &Path) -> Option<DaemonRecord> {
    let stem = p.file_name()?.to_str()?.strip_suffix(".json")?;
    stem.parse::<u32>().ok()?;
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

/// Every daemon record in the run directory, whether or not its daemon still runs.
pub fn all_records() -> Vec<DaemonRecord> {
    let mut v: Vec<DaemonRecord> = std::fs::read_dir(run_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| read_record(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|r| r.id);
    v
}

/// The records of the daemons that are running, by device number.
pub fn list_records() -> Vec<DaemonRecord> {
    all_records()
        .into_iter()
        .filter(|r| !super::process::exited(r.pid))
        .collect()
}
