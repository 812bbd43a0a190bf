//! ublk-clone: dm-clone rebuilt as a userspace block device on ublk.
//!
//! Layers, each depending only on those below it: `metadata` (on-disk format and commit
//! protocol) -> `io` (block device trait and implementations) -> `engine` (regions,
//! hydration, flush and commit coordination) -> `ublk` (the libublk frontend) -> `cli`.

pub mod io;
pub mod logwrites;
