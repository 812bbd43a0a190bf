//! The `ublk-clone` binary: a thin dispatcher over the library's CLI shims.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use ublk_clone::cli;

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
    /// Format a metadata device for cloning SOURCE onto DEST.
    Format(cli::metadata::FormatArgs),
    /// Check metadata; exit 0 healthy, 1 problems found, 2 cannot read.
    Check(cli::metadata::CheckArgs),
    /// Print the superblocks and hydrated region ranges as JSON.
    Dump(cli::metadata::DumpArgs),
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Format(a) => cli::metadata::run_format(a),
        Command::Check(a) => cli::metadata::run_check(a),
        Command::Dump(a) => cli::metadata::run_dump(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk-clone: {e:#}");
            ExitCode::from(2)
        }
    }
}
