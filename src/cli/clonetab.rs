//! `/etc/ublk-clonetab`: the clones a host brings up at boot, one per line, in the columns of
//! systemd's `/etc/clonetab` (for kernel dm-clone):
//!
//! ```text
//! # name  source                 destination   metadata      options
//! db      /srv/golden/db.img     /dev/vg/db    /dev/vg/dbmd  region-size=64K,rate=100M
//! web     nbd://images/web       /dev/vg/web   /dev/vg/webmd -
//! ```
//!
//! Options are comma-separated (`-` or nothing: none): `region-size=SIZE`, `rate=SIZE`
//! (bytes/s), `hydrate-when=always|idle`, `hydration-threshold=N`, `batch-size=N`, `queues=N`, `depth=N`,
//! `source-timeout=SECONDS`, `metrics=HOST:PORT`, `prefetch=FILE`, and the flags `no-hydration`, `no-discard-passdown`,
//! `buffered-io`, `no-recovery`, `no-zero-copy`, `trace-reads`. `#` starts a comment.
//!
//! Invariant: a bad line never stops the good ones; its error names the file, the line and
//! the field. Names and metadata paths are unique in a table (a later duplicate is the bad one).

use super::size::parse_size;
use crate::daemon::config::DEFAULT_SOURCE_TIMEOUT;
use crate::daemon::{names, DaemonConfig};
use crate::engine::HydrateWhen;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the table lives, unless `--table` or `UBLK_CLONETAB` names another.
pub const CLONETAB: &str = "/etc/ublk-clonetab";

/// The table to read: `given`, else `$UBLK_CLONETAB`, else [`CLONETAB`].
pub fn table_path(given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("UBLK_CLONETAB").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(CLONETAB))
}

/// One clone of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// 1-based line number.
    pub line: usize,
    pub name: String,
    pub source: PathBuf,
    pub dest: PathBuf,
    pub metadata: PathBuf,
    pub options: Options,
}

/// An entry's options, as [`DaemonConfig`] takes them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    pub region_size: Option<u64>,
    pub rate: u64,
    pub hydrate_when: HydrateWhen,
    pub hydration_threshold: Option<u64>,
    pub batch_size: Option<u64>,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    pub source_timeout: Option<u64>,
    pub no_hydration: bool,
    pub no_discard_passdown: bool,
    pub buffered_io: bool,
    pub no_recovery: bool,
    pub no_zero_copy: bool,
    pub metrics: Option<String>,
    pub trace_reads: bool,
    pub prefetch: Option<PathBuf>,
}

/// A bad line: `FILE:LINE: FIELD: what is wrong`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{file}:{line}: {field}: {msg}")]
pub struct LineError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub msg: String,
    /// The line's first column (the clone it meant to name), if it has one.
    pub name: Option<String>,
}

/// A parsed table: the good entries, and an error for each bad line.
#[derive(Debug, Default)]
pub struct Table {
    pub file: PathBuf,
    pub entries: Vec<Entry>,
    pub errors: Vec<LineError>,
}

impl Table {
    /// Reads and parses the table at `path`; an unreadable file is an error.
    pub fn load(path: &Path) -> anyhow::Result<Table> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the clone table {}", path.display()))?;
        Ok(parse(&text, path))
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Parses `text`, the contents of `file`.
pub fn parse(text: &str, file: &Path) -> Table {
    let mut t = Table {
        file: file.to_path_buf(),
        ..Table::default()
    };
    let mut names_seen: HashMap<String, usize> = HashMap::new();
    let mut meta_seen: HashMap<PathBuf, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
        let cols: Vec<&str> = content.split_whitespace().collect();
        if cols.is_empty() {
            continue;
        }
        let err = |field: &str, msg: String| LineError {
            file: file.display().to_string(),
            line,
            field: field.to_string(),
            msg,
            name: cols.first().map(|s| s.to_string()),
        };
        if !(4..=5).contains(&cols.len()) {
            t.errors.push(err(
                "line",
                format!(
                    "{} columns; expected: name source destination metadata [options]",
                    cols.len()
                ),
            ));
            continue;
        }
        let name = cols[0];
        if let Err(e) = names::validate(name) {
            t.errors.push(err("name", e.to_string()));
            continue;
        }
        if let Some(first) = names_seen.get(name) {
            t.errors
                .push(err("name", format!("'{name}' is already on line {first}")));
            continue;
        }
        let metadata = PathBuf::from(cols[3]);
        if let Some(first) = meta_seen.get(&metadata) {
            t.errors.push(err(
                "metadata",
                format!("{} is already used on line {first}", metadata.display()),
            ));
            continue;
        }
        let mut bad_path = None;
        for (field, v) in [("destination", cols[2]), ("metadata", cols[3])] {
            if !v.starts_with('/') {
                bad_path = Some(err(field, format!("'{v}': must be an absolute path")));
            }
        }
        let src = cols[1];
        if !src.starts_with('/') && !crate::io::nbd::is_nbd_uri(src) {
            bad_path = Some(err(
                "source",
                format!("'{src}': must be an absolute path or an NBD URI"),
            ));
        }
        if let Some(e) = bad_path {
            t.errors.push(e);
            continue;
        }
        let options = match parse_options(cols.get(4).copied().unwrap_or("-")) {
            Ok(o) => o,
            Err(msg) => {
                t.errors.push(err("options", msg));
                continue;
            }
        };
        let entry = Entry {
            line,
            name: name.to_string(),
            source: PathBuf::from(src),
            dest: PathBuf::from(cols[2]),
            metadata: metadata.clone(),
            options,
        };
        // The checks `create` makes on its options (value ranges, the NBD URI).
        if let Err(e) = entry.config().validate_options() {
            let msg = e.to_string();
            t.errors.push(match msg.strip_prefix("--source ") {
                Some(m) => err("source", m.to_string()),
                None => err("options", msg),
            });
            continue;
        }
        names_seen.insert(name.to_string(), line);
        meta_seen.insert(metadata, line);
        t.entries.push(entry);
    }
    t
}

/// Parses the options column.
fn parse_options(col: &str) -> Result<Options, String> {
    let mut o = Options::default();
    if col == "-" {
        return Ok(o);
    }
    let mut seen = Vec::new();
    for opt in col.split(',').filter(|s| !s.is_empty()) {
        let (key, val) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        if seen.contains(&key) {
            return Err(format!("'{key}' given twice"));
        }
        seen.push(key);
        let need = || val.ok_or_else(|| format!("'{key}' needs a value ({key}=...)"));
        let flag = || match val {
            None => Ok(true),
            Some(_) => Err(format!("'{key}' takes no value")),
        };
        let size =
            || -> Result<u64, String> { parse_size(need()?).map_err(|e| format!("'{key}': {e}")) };
        let num = || -> Result<u64, String> {
            let v = need()?;
            v.parse()
                .map_err(|_| format!("'{key}={v}': expected a whole number"))
        };
        let small = || -> Result<u16, String> {
            let n = num()?;
            u16::try_from(n).map_err(|_| format!("'{key}={n}': too large"))
        };
        match key {
            "region-size" => o.region_size = Some(size()?),
            "rate" => o.rate = size()?,
            "hydrate-when" => o.hydrate_when = need()?.parse()?,
            "hydration-threshold" => o.hydration_threshold = Some(num()?),
            "batch-size" => o.batch_size = Some(num()?),
            "queues" => o.queues = Some(small()?),
            "depth" => o.depth = Some(small()?),
            "source-timeout" => o.source_timeout = Some(num()?),
            "no-hydration" => o.no_hydration = flag()?,
            "no-discard-passdown" => o.no_discard_passdown = flag()?,
            "buffered-io" => o.buffered_io = flag()?,
            "no-recovery" => o.no_recovery = flag()?,
            "no-zero-copy" => o.no_zero_copy = flag()?,
            "metrics" => o.metrics = Some(need()?.to_string()),
            "trace-reads" => o.trace_reads = flag()?,
            "prefetch" => o.prefetch = Some(PathBuf::from(need()?)),
            other => {
                return Err(format!(
                    "unknown option '{other}' (known: region-size, rate, hydrate-when, hydration-threshold, \
                     batch-size, queues, depth, source-timeout, no-hydration, \
                     no-discard-passdown, buffered-io, no-recovery, no-zero-copy, metrics, \
                     trace-reads, prefetch)"
                ))
            }
        }
    }
    Ok(o)
}

impl Entry {
    /// The daemon configuration that brings this clone up: resumes its metadata, formats
    /// blank metadata, never reformats (no force flag can come from a table).
    pub fn config(&self) -> DaemonConfig {
        let o = &self.options;
        DaemonConfig {
            source: self.source.clone(),
            dest: self.dest.clone(),
            metadata: self.metadata.clone(),
            region_size: o.region_size,
            ignore_source_mismatch: false,
            no_hydration: o.no_hydration,
            no_discard_passdown: o.no_discard_passdown,
            hydration_threshold: o.hydration_threshold,
            batch_size: o.batch_size,
            rate: o.rate,
            hydrate_when: o.hydrate_when,
            queues: o.queues,
            depth: o.depth.unwrap_or(128),
            number: -1,
            force: false,
            force_reformat_this_clone: false,
            dest_moved: false,
            foreground: false,
            buffered_io: o.buffered_io,
            log_writes: None,
            log_writes_size: crate::daemon::config::DEFAULT_LOG_WRITES_SIZE,
            no_recovery: o.no_recovery,
            no_zero_copy: o.no_zero_copy,
            recover: false,
            source_timeout: o.source_timeout.unwrap_or(DEFAULT_SOURCE_TIMEOUT),
            name: Some(self.name.clone()),
            metrics: o.metrics.clone(),
            trace_reads: o.trace_reads,
            prefetch: o.prefetch.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
