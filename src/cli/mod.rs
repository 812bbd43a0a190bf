//! Command-line glue: clap argument structs and `run_*` functions, each a thin shim that
//! parses arguments, makes one library call (mostly into [`crate::daemon`]) and reports with
//! `anyhow` context.

pub mod clone;
pub mod clonetab;
pub mod metadata;
pub mod monitor;
pub mod size;
pub mod status;
pub mod stop;
pub mod table;
