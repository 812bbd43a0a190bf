//! Command-line front end: thin shims from clap arguments to library calls.

pub mod clone;
pub mod control;
pub mod size;
