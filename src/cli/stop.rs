//! `stop`: the shim over [`daemon::stop::stop`].

use crate::daemon;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The clone device: /dev/ublkbN or N.
    pub dev: String,
    /// Stop even though the device is mounted or open: whatever uses it gets I/O errors.
    #[arg(long)]
    pub force: bool,
}

/// `ublk-clone stop DEV`: returns once the daemon has exited and released its devices.
pub fn run_stop(a: &StopArgs) -> Result<()> {
    Ok(daemon::stop::stop(&a.dev, a.force)?)
}
