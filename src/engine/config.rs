//! The engine's settings and the region arithmetic: the mode, the run-time knobs, the
//! configuration fixed at start, and the geometry that maps byte offsets to regions.

use serde::Serialize;
use std::time::Duration;

/// Metadata mode, ordered by severity (dm-clone's rw / ro / fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub enum Mode {
    ReadWrite,
    ReadOnly,
    Fail,
}

impl Mode {
    pub fn from_metadata(m: crate::metadata::MetadataMode) -> Mode {
        match m {
            crate::metadata::MetadataMode::ReadWrite => Mode::ReadWrite,
            crate::metadata::MetadataMode::ReadOnly => Mode::ReadOnly,
            crate::metadata::MetadataMode::Fail => Mode::Fail,
        }
    }

    pub fn to_metadata(self) -> crate::metadata::MetadataMode {
        match self {
            Mode::ReadWrite => crate::metadata::MetadataMode::ReadWrite,
            Mode::ReadOnly => crate::metadata::MetadataMode::ReadOnly,
            Mode::Fail => crate::metadata::MetadataMode::Fail,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::ReadWrite => "rw",
            Mode::ReadOnly => "ro",
            Mode::Fail => "fail",
        }
    }
}

/// Run-time knobs (dm-clone's messages plus ours).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Knobs {
    pub hydration_enabled: bool,
    /// Maximum regions being hydrated at once, including write-triggered hydrations.
    pub threshold: u64,
    /// Contiguous regions per background copy.
    pub batch_size: u64,
    /// Background hydration byte rate limit; 0 = unlimited.
    pub rate_bytes_per_sec: u64,
    /// Queue regions that users read for early hydration.
    pub hydrate_on_read: bool,
    /// When background batches start: whatever users do, or only while they have no request
    /// in service.
    #[serde(default)]
    pub hydrate_when: HydrateWhen,
}

/// When background hydration starts a batch (`--hydrate-when`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HydrateWhen {
    /// Whatever users do, bounded by the threshold and the rate limit.
    #[default]
    Always,
    /// Only while no user request is in service (dm-clone's sweep pauses while user I/O is in
    /// flight): a batch under way finishes, the next waits for a moment without user I/O.
    /// Under a load that never pauses, hydration waits for it; the rate limit is then a
    /// ceiling, not a promise.
    Idle,
}

impl HydrateWhen {
    pub fn is_always(&self) -> bool {
        *self == HydrateWhen::Always
    }

    pub fn name(self) -> &'static str {
        match self {
            HydrateWhen::Always => "always",
            HydrateWhen::Idle => "idle",
        }
    }
}

impl std::str::FromStr for HydrateWhen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(HydrateWhen::Always),
            "idle" => Ok(HydrateWhen::Idle),
            other => Err(format!(
                "unknown hydration policy '{other}' (known: always, idle)"
            )),
        }
    }
}

impl Knobs {
    /// Defaults sized so that one background copy moves about 4 MiB.
    pub fn defaults_for(region_size: u64) -> Knobs {
        let batch = (4 << 20) / region_size.max(1);
        let batch = batch.max(1);
        Knobs {
            hydration_enabled: true,
            threshold: batch * 2,
            batch_size: batch,
            rate_bytes_per_sec: 0,
            hydrate_on_read: true,
            hydrate_when: HydrateWhen::Always,
        }
    }
}

/// Background hydration workers (and batches in flight) for a remote source.
pub const REMOTE_HYDRATION_WORKERS: usize = 4;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Size of the clone device in bytes (the source size).
    pub size: u64,
    /// Logical block size of the clone in bytes: the larger of the source's and the
    /// destination's, so that every I/O the engine passes on is aligned for both (with
    /// O_DIRECT a 4Kn device refuses anything smaller). I/O not aligned to it is refused.
    pub block_size: u64,
    pub discard_passdown: bool,
    pub commit_period: Duration,
    pub source_retries: u32,
    pub retry_backoff: Duration,
    pub hydration_workers: usize,
    /// Background batches keep their full size under user load (a remote source pays a round
    /// trip or two per batch, so smaller batches would cut its throughput, and its copies do
    /// not contend with user I/O for a local device).
    pub full_batches_under_load: bool,
    /// Memory for copy buffers (copy-on-write and background hydration), in bytes.
    pub copy_budget: u64,
    pub knobs: Knobs,
    /// A degraded mode to start in, and why, when the metadata records a milder one (the mode
    /// a dead daemon of this clone was in: see [`crate::metadata::survival`]).
    pub start_mode: Option<(Mode, String)>,
    /// Record the order in which regions are first read (`--trace-reads`).
    pub trace_reads: bool,
    /// Regions to hydrate first, in order (`--prefetch`).
    pub prefetch: Vec<u64>,
    /// Deliberate protocol violations, for the crash oracle's own tests only.
    #[cfg(test)]
    pub(crate) bugs: Bugs,
}

/// Deliberate protocol violations that the crash oracle (`crash_tests`) must catch. All off
/// by default; they exist only in test builds, so the production path cannot take them.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bugs {
    /// Commit the metadata (shadows and superblock) *before* flushing the destination.
    pub commit_before_dest_flush: bool,
    /// Set a region's bit and make it durable *before* its copy or write reached the
    /// destination.
    pub bit_before_copy: bool,
    /// A FLUSH joins the commit already in flight (or none at all) instead of waiting for
    /// one that starts after it arrived, so it can complete without a covering flush.
    pub flush_joins_old_commit: bool,
    /// The FLUSH fast path ignores uncommitted region bits (flushes only the destination).
    pub fast_flush_ignores_dirty: bool,
    /// A user write's region bit reaches the survival copy only after the write was
    /// acknowledged (lazily), so a daemon death in between forgets it.
    pub survival_after_ack: bool,
}

impl EngineConfig {
    pub fn new(size: u64, region_size: u64) -> EngineConfig {
        EngineConfig {
            size,
            block_size: crate::io::SECTOR_SIZE,
            discard_passdown: true,
            commit_period: Duration::from_secs(1),
            source_retries: 3,
            retry_backoff: Duration::from_millis(10),
            hydration_workers: 2,
            full_batches_under_load: false,
            copy_budget: 64 << 20,
            knobs: Knobs::defaults_for(region_size),
            start_mode: None,
            trace_reads: false,
            prefetch: Vec::new(),
            #[cfg(test)]
            bugs: Bugs::default(),
        }
    }

    /// More background copies in flight, for a source with network latency to hide (an NBD
    /// export): 4 workers and room for 4 batches, so that reading the next batches overlaps
    /// writing the last one. Measured (`cargo bench --bench nbd_hydration -- 1024 5`, medians
    /// of 5 rounds): 0.90-0.98x of `nbdcopy` with 4, 0.59-0.74x with 2. A local source keeps
    /// 2, leaving its disk to users.
    pub fn for_remote_source(mut self) -> EngineConfig {
        self.hydration_workers = REMOTE_HYDRATION_WORKERS;
        self.full_batches_under_load = true;
        self.knobs.threshold = self.knobs.batch_size * REMOTE_HYDRATION_WORKERS as u64;
        self
    }
}

/// Region arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub size: u64,
    pub region_size: u64,
    pub region_shift: u32,
    pub nr_regions: u64,
}

impl Geometry {
    pub fn region_of(&self, offset: u64) -> u64 {
        offset >> self.region_shift
    }
    pub fn region_start(&self, r: u64) -> u64 {
        r << self.region_shift
    }
    /// End of region `r`, clamped to the device size (the last region may be partial).
    pub fn region_end(&self, r: u64) -> u64 {
        ((r + 1) << self.region_shift).min(self.size)
    }
    /// Byte span of regions `[head, head+count)`.
    pub fn regions_span(&self, head: u64, count: u64) -> (u64, u64) {
        let start = self.region_start(head);
        (start, self.region_end(head + count - 1) - start)
    }
}
