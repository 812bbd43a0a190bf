//! ublk-clone: dm-clone rebuilt as a userspace block device on ublk.
//!
//! Layers, each depending only on those below it: `io` (block device trait and
//! implementations) -> `metadata` (on-disk format and commit protocol) and `logwrites` (the
//! dm-log-writes compatible recorder and replayer used for crash testing) -> `engine`
//! (regions, hydration, flush and commit coordination) -> `ublk` (the libublk frontend) ->
//! `daemon` (lifecycle, control server, saved configuration) -> `cli` (argument parsing, and
//! the clone table a host brings up).

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod io;
pub mod logwrites;
pub mod metadata;
pub mod ublk;
