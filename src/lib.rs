//! ublk-clone: dm-clone rebuilt as a userspace block device on ublk.
//!
//! Layers, each depending only on those below it: `metadata` (on-disk format and commit
//! protocol) -> `io` (block device trait and implementations) -> `engine` (regions,
//! hydration, flush and commit coordination) -> `ublk` (the libublk frontend) -> `cli`.
//! `logwrites` is the dm-log-writes compatible recorder and replayer used for crash testing.

pub mod cli;
pub mod engine;
pub mod io;
pub mod logwrites;
pub mod metadata;
pub mod ublk;
