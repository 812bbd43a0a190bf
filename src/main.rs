//! The `ublk-clone` binary: a thin dispatcher over the library's CLI shims.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use ublk_clone::cli::{self, clone};

#[derive(Parser, Debug)]
#[command(
    name = "ublk-clone",
    version,
    about = "dm-clone as a userspace block device on ublk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a clone device (formats blank metadata, resumes this clone's), print its path.
    Create(clone::CreateArgs),
    /// Start a stopped clone again from its metadata (uses the configuration saved at create).
    Start(clone::StartArgs),
    /// Attach a new daemon to a device whose daemon died (the device and its file system stayed).
    Recover(clone::RecoverArgs),
    /// Hand a running device over to a new daemon (the binary now on disk) without unmounting.
    Restart(clone::RestartArgs),
    /// List running clone devices.
    List,
    /// Show hydration progress and mode.
    Status(cli::status::StatusArgs),
    /// Change run-time settings (hydration on/off, threshold, batch size, rate).
    Set(clone::SetArgs),
    /// Final commit, clean shutdown, remove the device.
    Stop(cli::stop::StopArgs),
    /// Log a mark in the device's dm-log-writes recording (`create --log-writes`).
    Mark(clone::MarkArgs),
    /// Format a metadata device for cloning SOURCE onto DEST.
    Format(cli::metadata::FormatArgs),
    /// Check metadata; exit 0 healthy (notes for what opening repairs), 1 damage, 2 cannot read.
    Check(cli::metadata::CheckArgs),
    /// Print the superblocks and hydrated region ranges as JSON.
    Dump(cli::metadata::DumpArgs),
    /// Leave the read-only/fail mode recorded after an I/O failure (explicit operator action).
    ResetMode(cli::metadata::ResetModeArgs),
}

fn done(r: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    r.map(|()| ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Create(a) => done(clone::run_create(a)),
        Command::Start(a) => done(clone::run_start(a)),
        Command::Recover(a) => done(clone::run_recover(a)),
        Command::Restart(a) => done(clone::run_restart(a)),
        Command::List => done(cli::status::run_list()),
        Command::Status(a) => done(cli::status::run_status(a)),
        Command::Set(a) => done(clone::run_set(a)),
        Command::Stop(a) => done(cli::stop::run_stop(a)),
        Command::Mark(a) => done(clone::run_mark(a)),
        Command::Format(a) => cli::metadata::run_format(a),
        Command::Check(a) => cli::metadata::run_check(a),
        Command::Dump(a) => cli::metadata::run_dump(a),
        Command::ResetMode(a) => cli::metadata::run_reset_mode(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk-clone: error: {e:#}");
            // `check` reserves 1 for "damage found"; 2 means it could not read.
            ExitCode::from(if matches!(cli.command, Command::Check(_)) {
                2
            } else {
                1
            })
        }
    }
}
