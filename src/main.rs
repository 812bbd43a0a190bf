//! `ublk-clone`: create and manage clone devices. Each subcommand parses its arguments and
//! calls one library function.

use clap::{Parser, Subcommand};
use ublk_clone::cli::clone;

#[derive(Parser)]
#[command(name = "ublk-clone", version, about = "dm-clone as a userspace ublk block device")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a clone device (formats blank metadata, resumes this clone's), print its path.
    Create(clone::CreateArgs),
    /// List running clone devices.
    List,
    /// Show hydration progress and mode.
    Status(clone::StatusArgs),
    /// Change run-time settings (hydration on/off, threshold, batch size, rate).
    Set(clone::SetArgs),
    /// Final commit, clean shutdown, remove the device.
    Stop(clone::DevArg),
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Create(a) => clone::run_create(a),
        Cmd::List => clone::run_list(),
        Cmd::Status(a) => clone::run_status(a),
        Cmd::Set(a) => clone::run_set(a),
        Cmd::Stop(a) => clone::run_stop(a),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-clone: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
