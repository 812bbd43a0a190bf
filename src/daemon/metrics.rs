//! Prometheus metrics: the exposition text of one clone ([`render`]), served by the daemon
//! at `--metrics ADDR` (`GET /metrics`) and printed by `ublk-clone metrics` (for
//! node_exporter's textfile collector). Every metric carries `device` and `name` labels.

use crate::engine::metrics::{HistogramSnapshot, MetricsSnapshot, LATENCY_BOUNDS};
use crate::engine::{Engine, Mode, Status};
use std::fmt::Write;
use std::sync::Arc;

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text for one clone. `with_help`: the `# HELP`/`# TYPE` lines (once per
/// metric when several clones are printed together).
pub fn render(
    device: &str,
    name: &str,
    s: &Status,
    m: &MetricsSnapshot,
    with_help: bool,
) -> String {
    let labels = format!("device=\"{}\",name=\"{}\"", label(device), label(name));
    let mut out = String::new();
    let mut metric = |n: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        if with_help {
            let _ = writeln!(out, "# HELP ublk_clone_{n} {help}");
            let _ = writeln!(out, "# TYPE ublk_clone_{n} {kind}");
        }
        for (extra, v) in samples {
            let sep = if extra.is_empty() { "" } else { "," };
            let _ = writeln!(out, "ublk_clone_{n}{{{labels}{sep}{extra}}} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    metric(
        "regions",
        "gauge",
        "Regions of the clone.",
        &one(s.regions as f64),
    );
    metric(
        "regions_hydrated",
        "gauge",
        "Regions hydrated (served from the destination).",
        &one(s.hydrated as f64),
    );
    metric(
        "regions_failed",
        "gauge",
        "Regions whose source could not be read.",
        &one(s.failed_regions.len() as f64),
    );
    metric(
        "hydrated_bytes_total",
        "counter",
        "Bytes hydrated in the background by this daemon.",
        &one(s.bytes_hydrated as f64),
    );
    metric(
        "zeroed_bytes_total",
        "counter",
        "Of the hydrated bytes, those zeroed instead of copied.",
        &one(s.bytes_zeroed as f64),
    );
    metric(
        "hydration_rate_bytes",
        "gauge",
        "Background hydration rate, bytes per second.",
        &one(s.hydration_rate_bytes_per_sec as f64),
    );
    metric(
        "user_requests_in_service",
        "gauge",
        "User requests the daemon holds now, on all queues.",
        &one(s.user_requests_in_service as f64),
    );
    metric(
        "hydration_idle_wait_seconds_total",
        "counter",
        "Time background hydration waited for users to pause (--hydrate-when idle), summed over its workers.",
        &one(s.hydration_idle_wait_ms as f64 / 1000.0),
    );
    metric(
        "mode",
        "gauge",
        "1 for the mode the clone is in (rw, ro, fail).",
        &[Mode::ReadWrite, Mode::ReadOnly, Mode::Fail]
            .iter()
            .map(|x| {
                (
                    format!("mode=\"{}\"", x.name()),
                    if *x == s.mode { 1.0 } else { 0.0 },
                )
            })
            .collect::<Vec<_>>(),
    );
    metric(
        "source_connected",
        "gauge",
        "0 while a remote source is out of reach, else 1.",
        &one(if s.source_disconnected.is_some() {
            0.0
        } else {
            1.0
        }),
    );
    metric(
        "source_read_errors_total",
        "counter",
        "Failed source reads: background hydration (each attempt) and user I/O.",
        &one(m.source_read_errors as f64),
    );
    metric(
        "commits_total",
        "counter",
        "Metadata commits.",
        &one(s.commits as f64),
    );
    let ops: Vec<(String, f64)> = m
        .ops
        .iter()
        .map(|(op, n, _)| (format!("op=\"{op}\""), *n as f64))
        .collect();
    metric(
        "io_requests_total",
        "counter",
        "User requests by operation.",
        &ops,
    );
    let bytes: Vec<(String, f64)> = m
        .ops
        .iter()
        .map(|(op, _, b)| (format!("op=\"{op}\""), *b as f64))
        .collect();
    metric(
        "io_bytes_total",
        "counter",
        "User request bytes by operation.",
        &bytes,
    );
    histogram(
        &mut out,
        &labels,
        "commit_seconds",
        "Commit latency (destination flush and metadata).",
        &m.commit,
        with_help,
    );
    histogram(
        &mut out,
        &labels,
        "flush_seconds",
        "FLUSH request latency.",
        &m.flush,
        with_help,
    );
    out
}

fn histogram(
    out: &mut String,
    labels: &str,
    n: &str,
    help: &str,
    h: &HistogramSnapshot,
    with_help: bool,
) {
    if with_help {
        let _ = writeln!(out, "# HELP ublk_clone_{n} {help}");
        let _ = writeln!(out, "# TYPE ublk_clone_{n} histogram");
    }
    let mut cum = 0;
    for (i, b) in LATENCY_BOUNDS.iter().enumerate() {
        cum += h.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "ublk_clone_{n}_bucket{{{labels},le=\"{b}\"}} {cum}");
    }
    let _ = writeln!(
        out,
        "ublk_clone_{n}_bucket{{{labels},le=\"+Inf\"}} {}",
        h.count
    );
    let _ = writeln!(out, "ublk_clone_{n}_sum{{{labels}}} {}", h.sum_seconds);
    let _ = writeln!(out, "ublk_clone_{n}_count{{{labels}}} {}", h.count);
}

/// Listens at `addr` (before the daemon opens anything: a refused address changes nothing).
pub fn listen(addr: &str) -> super::Result<tiny_http::Server> {
    tiny_http::Server::http(addr)
        .map_err(|e| super::DaemonError::Refused(format!("--metrics {addr}: cannot listen: {e}")))
}

/// Serves `GET /metrics` on `server` on a thread of its own for the daemon's life.
pub fn serve(
    server: tiny_http::Server,
    device: String,
    name: String,
    engine: Arc<Engine>,
) -> std::io::Result<()> {
    if let Some(a) = server.server_addr().to_ip() {
        log::info!("metrics at http://{a}/metrics");
    }
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let text = render(
                        &device,
                        &name,
                        &engine.status(),
                        &engine.metrics().snapshot(),
                        true,
                    );
                    let ct = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"text/plain; version=0.0.4"[..],
                    );
                    let mut r = tiny_http::Response::from_string(text);
                    if let Ok(h) = ct {
                        r = r.with_header(h);
                    }
                    r
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metrics::{Metrics, OpKind};
    use crate::engine::Knobs;
    use prometheus_parse::{Scrape, Value};
    use std::time::Duration;

    fn status() -> Status {
        Status {
            size: 1 << 30,
            region_size: 65536,
            regions: 16384,
            hydrated: 1000,
            hydrating: 2,
            failed_regions: vec![3, 4],
            mode: Mode::ReadOnly,
            mode_reason: "commit failed".into(),
            commits: 12,
            flushes: 5,
            bytes_hydrated: 65536000,
            bytes_zeroed: 65536,
            hydration_rate_bytes_per_sec: 1 << 20,
            bitmap_bytes: 2048,
            direct_ios: 0,
            direct_redone: 0,
            in_place_ios: 0,
            hydration_idle_wait_ms: 0,
            user_requests_in_service: 0,
            knobs: Knobs::defaults_for(65536),
            source_disconnected: None,
        }
    }

    fn scrape(text: &str) -> Scrape {
        match Scrape::parse(text.lines().map(|l| Ok(l.to_string()))) {
            Ok(s) => s,
            Err(e) => panic!("not the exposition format: {e}\n{text}"),
        }
    }

    fn value(s: &Scrape, metric: &str, extra: Option<(&str, &str)>) -> Value {
        let found = s.samples.iter().find(|x| {
            x.metric == metric
                && x.labels.get("device") == Some("/dev/ublkb3")
                && x.labels.get("name") == Some("db")
                && extra.is_none_or(|(k, v)| x.labels.get(k) == Some(v))
        });
        match found {
            Some(x) => x.value.clone(),
            None => panic!("no sample {metric} {extra:?}"),
        }
    }

    #[test]
    fn the_exposition_parses_and_says_what_the_clone_does() {
        let m = Metrics::default();
        m.count_op(OpKind::Write, 4096);
        m.count_op(OpKind::Write, 4096);
        m.count_op(OpKind::Read, 65536);
        m.observe_commit(Duration::from_millis(3));
        m.observe_commit(Duration::from_millis(30));
        m.observe_commit(Duration::from_secs(20));
        m.flush.observe(Duration::from_micros(80));
        let text = render("/dev/ublkb3", "db", &status(), &m.snapshot(), true);
        let s = scrape(&text);
        assert_eq!(value(&s, "ublk_clone_regions", None), Value::Gauge(16384.0));
        assert_eq!(
            value(&s, "ublk_clone_regions_hydrated", None),
            Value::Gauge(1000.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_regions_failed", None),
            Value::Gauge(2.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_hydrated_bytes_total", None),
            Value::Counter(65536000.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_mode", Some(("mode", "ro"))),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_mode", Some(("mode", "rw"))),
            Value::Gauge(0.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_source_connected", None),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_io_requests_total", Some(("op", "write"))),
            Value::Counter(2.0)
        );
        assert_eq!(
            value(&s, "ublk_clone_io_bytes_total", Some(("op", "read"))),
            Value::Counter(65536.0)
        );
        match value(&s, "ublk_clone_commit_seconds", None) {
            Value::Histogram(h) => {
                let counts: Vec<f64> = h.iter().map(|b| b.count).collect();
                assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
                assert_eq!(counts.last(), Some(&3.0));
                let le_5ms = h.iter().find(|b| b.less_than == 0.005).map(|b| b.count);
                assert_eq!(le_5ms, Some(1.0));
                let le_10s = h.iter().find(|b| b.less_than == 10.0).map(|b| b.count);
                assert_eq!(le_10s, Some(2.0));
            }
            other => panic!("commit_seconds is not a histogram: {other:?}"),
        }
        // Every metric is documented.
        for x in &s.samples {
            let base = x.metric.trim_end_matches("_count").trim_end_matches("_sum");
            assert!(s.docs.contains_key(base), "{} has no HELP", x.metric);
        }
        // Without HELP/TYPE (a second clone in the same output) it still parses.
        let more = render("/dev/ublkb4", "w\"eb", &status(), &m.snapshot(), false);
        assert!(more.contains("name=\"w\\\"eb\""));
        scrape(&format!("{text}{more}"));
    }
}
