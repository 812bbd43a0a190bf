//! The daemon's side of the control socket: binds `<id>.sock`, writes the daemon record, and
//! answers requests ([`Request`]) until a stop request, a signal, or the device's end.
//!
//! Invariant: one request is answered at a time, on the serving thread, and a client that
//! sends nothing is dropped after 5 s, so a wedged client never keeps the daemon from
//! stopping.

use super::control::{self, DaemonRecord, RecordingStatus, Request, Response};
use super::error::{Named, Result};
use super::process;
use super::sticky::Sticky;
use crate::engine::Engine;
use crate::logwrites::Recording;
use crate::ublk;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

/// The daemon's recording, as the control server sees it: the recorder and the log's name.
pub(super) type CtlRecording = (Arc<Recording>, String);

/// Binds the control socket of `rec`'s device and writes its record (which makes the daemon
/// visible to `list`).
pub(super) fn bind_control(rec: &DaemonRecord) -> Result<UnixListener> {
    let sock = control::socket_path(rec.id);
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).named(|| format!("cannot bind {}", sock.display()))?;
    l.set_nonblocking(true)?;
    let path = control::record_path(rec.id);
    // Atomically: a record cut short (a full /run) would hide a recoverable device.
    super::sticky::write_atomically(&path, &serde_json::to_vec_pretty(rec)?)?;
    Ok(l)
}

/// How the control loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LoopEnd {
    /// Stop: the final commit, then remove the device.
    Stop,
    /// Hand over (`restart`): the commit is made; exit and leave the device to the next daemon.
    Handover,
}

/// Answers requests on `l` until a stop or handover request, a signal, or the device was
/// stopped from outside (all its queues ended).
pub(super) fn control_loop(
    l: &UnixListener,
    engine: &Engine,
    sticky: &Sticky,
    rec: Option<&CtlRecording>,
) -> LoopEnd {
    let mut events = super::events::Events::default();
    let mut last_tick: Option<std::time::Instant> = None;
    loop {
        if last_tick.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            events.tick(engine);
            last_tick = Some(std::time::Instant::now());
        }
        // Failed regions found since the last tick (a `set` is recorded before its answer).
        if let Err(e) = sticky.record(engine) {
            log::warn!("{}", super::error::chain(&e));
        }
        if process::stop_requested() {
            return LoopEnd::Stop;
        }
        if ublk::queues_alive() == 0 {
            log::warn!("the device was stopped from outside (all queues ended); shutting down");
            return LoopEnd::Stop;
        }
        match l.accept() {
            Ok((s, _)) => {
                if let Some(end) = answer(&s, engine, sticky, rec, &events) {
                    return end;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                log::error!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request line from `s` and answers it. Returns how the loop ends, if it asked to.
fn answer(
    s: &UnixStream,
    engine: &Engine,
    sticky: &Sticky,
    rec: Option<&CtlRecording>,
    events: &super::events::Events,
) -> Option<LoopEnd> {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(s);
    if reader.read_line(&mut line).is_err() {
        return None;
    }
    let (resp, stop) = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Set {
            hydration,
            threshold,
            batch_size,
            rate,
            hydrate_on_read,
            hydrate_when,
        }) => {
            let mut k = engine.knobs();
            if let Some(h) = hydration {
                k.hydration_enabled = h;
            }
            if let Some(t) = threshold {
                k.threshold = t;
            }
            if let Some(b) = batch_size {
                k.batch_size = b.max(1);
            }
            if let Some(r) = rate {
                k.rate_bytes_per_sec = r;
            }
            if let Some(h) = hydrate_on_read {
                k.hydrate_on_read = h;
            }
            if let Some(w) = hydrate_when {
                k.hydrate_when = w;
            }
            engine.set_knobs(k);
            // Answered once a daemon started after this one dies would keep the settings.
            match sticky.record(engine) {
                Ok(()) => (ok_status(engine, rec), None),
                Err(e) => (
                    Response::err(format!(
                        "the settings apply, but a daemon recovering this one would not keep \
                         them: {}",
                        super::error::chain(&e)
                    )),
                    None,
                ),
            }
        }
        Ok(Request::Mark { name }) => (mark(rec, &name), None),
        Ok(Request::Stop) => (Response::ok(), Some(LoopEnd::Stop)),
        Ok(Request::Handover) => handover(engine, rec),
        Ok(Request::Status) => (ok_status(engine, rec), None),
        Ok(Request::Events { after }) => (
            Response {
                events: Some(events.page(after)),
                ..Response::ok()
            },
            None,
        ),
        Ok(Request::Trace) => match engine.read_trace() {
            Some(regions) => (
                Response {
                    trace: Some(control::TraceReply {
                        region_size: engine.geometry().region_size,
                        regions,
                    }),
                    ..Response::ok()
                },
                None,
            ),
            None => (
                Response::err(
                    "not tracing: the clone was not started with --trace-reads (or \
                     trace-reads in the clone table)"
                        .into(),
                ),
                None,
            ),
        },
        Ok(Request::Metrics) => (
            Response {
                metrics: Some(engine.metrics().snapshot()),
                ..ok_status(engine, rec)
            },
            None,
        ),
        Err(e) => (Response::err(format!("bad request: {e}")), None),
    };
    let mut w = s;
    let _ =
        w.write_all(format!("{}\n", serde_json::to_string(&resp).unwrap_or_default()).as_bytes());
    stop
}

/// A handover request: refused while recording (the log would end without its end mark and
/// the next daemon would start a new one); otherwise a commit makes everything done so far
/// durable, so the next daemon has little to take from the survival copy, and the process
/// exits. Hydration and requests that run meanwhile go on as usual (their bits go to the
/// survival copy). Where the kernel can quiesce the device (`UBLK_F_QUIESCE`), the daemon
/// then quiesces it, so that new requests wait in the kernel rather than reach it. Copies and
/// requests in flight when the process exits are cut short exactly as by a crash: a copy's
/// bit is not set, and a request is re-issued to the next daemon.
fn handover(engine: &Engine, rec: Option<&CtlRecording>) -> (Response, Option<LoopEnd>) {
    if rec.is_some() {
        return (
            Response::err(
                "a daemon that records (--log-writes) cannot be restarted: stop it and start \
                 the clone again"
                    .into(),
            ),
            None,
        );
    }
    if let Err(e) = engine.flush_blocking() {
        // Degraded now, and persisted as such: the next daemon starts in that mode.
        log::error!("commit before the handover failed: {e}; handing over anyway");
    }
    (Response::ok(), Some(LoopEnd::Handover))
}

fn recording_status(rec: Option<&CtlRecording>) -> Option<RecordingStatus> {
    rec.map(|(r, log)| RecordingStatus {
        log: log.clone(),
        entries: r.space.entries(),
        error: r.space.status().err().map(|e| e.to_string()),
    })
}

/// Logs the mark `name` in the recording, if the daemon records.
fn mark(rec: Option<&CtlRecording>, name: &str) -> Response {
    let Some((r, log)) = rec else {
        return Response::err(
            "not recording: marks need a daemon started with `create --log-writes FILE`".into(),
        );
    };
    let max = r.space.sectorsize() as usize - 33;
    if name.is_empty() || name.len() > max {
        return Response::err(format!("mark '{name}': must be 1 to {max} bytes"));
    }
    match r.space.mark(name) {
        Ok(()) => Response {
            recording: recording_status(rec),
            ..Response::ok()
        },
        Err(e) => Response::err(format!("cannot log mark '{name}' in {log}: {e}")),
    }
}

fn ok_status(engine: &Engine, rec: Option<&CtlRecording>) -> Response {
    Response {
        status: serde_json::to_value(engine.status()).ok(),
        recording: recording_status(rec),
        ..Response::ok()
    }
}
