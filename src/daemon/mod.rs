//! The clone daemon: the process that serves one clone device from start to stop, and the
//! operations other commands perform on it.
//!
//! A daemon is configured by a [`DaemonConfig`]. [`run`] serves the clone in the calling
//! process; [`spawn`] checks the configuration and devices, then starts a background daemon
//! and returns its device once live. The daemon opens and locks the source, destination and
//! metadata ([`open`], formatting blank metadata and resuming this clone's), saves its
//! configuration for `start` ([`saved`]), starts the engine, serves the ublk device and
//! answers its control socket ([`control`], [`server`]) until a stop request or a signal,
//! then makes the final commit and removes the device. [`stop`] stops a running clone.
//!
//! Invariant: nothing is written to any device before every check on the options and
//! devices has passed, and a daemon holds the destination's and metadata's exclusive locks
//! for as long as it runs.

pub mod config;
pub mod control;
pub mod devices;
mod error;
pub mod events;
pub mod metrics;
pub mod names;
mod open;
mod open_metadata;
mod process;
mod record;
pub mod recover;
pub mod restart;
mod run;
pub mod saved;
mod server;
mod spawn;
mod sticky;
pub mod stop;
pub mod survival;

pub use config::DaemonConfig;
pub use error::{chain, DaemonError, Result};
pub use record::LOG_START_MARK;
pub use run::run;
pub use spawn::spawn;
