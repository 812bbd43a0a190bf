//! Command-line glue: clap argument structs and `run_*` functions, each a thin shim that
//! parses arguments, makes one library call and reports with `anyhow` context.

pub mod clone;
pub mod config;
pub mod control;
pub mod devices;
pub mod metadata;
pub mod size;
pub mod stop;
