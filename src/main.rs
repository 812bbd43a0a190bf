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
    /// Show the ublk features the running kernel offers and which of them clones use.
    Features,
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
    /// Bring up clones of the clone table (/etc/ublk-clonetab): resume, format blank, recover.
    Up(cli::table::UpArgs),
    /// Stop clones of the clone table (by name, or all that are up).
    Down(cli::table::DownArgs),
    /// Stream a clone's events as JSON lines (mode changes, hydration complete, failed regions,
    /// the source lost and back, slow commits).
    Events(cli::monitor::EventsArgs),
    /// Print Prometheus metrics of the running clones (node_exporter textfile format).
    Metrics(cli::monitor::MetricsArgs),
    /// Write the order in which a clone's regions were first read (create --trace-reads),
    /// for another clone's --prefetch.
    Trace(clone::TraceArgs),
    /// Print the name of a clone device (udev's by-id rule uses it).
    #[command(hide = true)]
    Name(cli::status::NameArgs),
    /// systemd generator: one ublk-clone@NAME.service per line of the clone table.
    #[command(hide = true)]
    SystemdGenerator(cli::table::GeneratorArgs),
    /// Write man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenDocs(GenDocsArgs),
}

#[derive(clap::Args, Debug)]
struct GenDocsArgs {
    /// Output directory: man/ and completions/ are made in it.
    dir: std::path::PathBuf,
}

/// Man pages (one per command) and bash/zsh/fish completions, from the clap definitions.
fn gen_docs(a: &GenDocsArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    let cmd = Cli::command();
    let man = a.dir.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("man pages in {}", man.display()))?;
    let comp = a.dir.join("completions");
    std::fs::create_dir_all(&comp).with_context(|| format!("cannot create {}", comp.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "ublk-clone", &comp)
            .with_context(|| format!("{shell} completion in {}", comp.display()))?;
    }
    Ok(())
}

fn done(r: anyhow::Result<()>) -> anyhow::Result<ExitCode> {
    r.map(|()| ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,libublk=warn"),
    )
    .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Create(a) => done(clone::run_create(a)),
        Command::Start(a) => done(clone::run_start(a)),
        Command::Recover(a) => done(clone::run_recover(a)),
        Command::Restart(a) => done(clone::run_restart(a)),
        Command::List => done(cli::status::run_list()),
        Command::Features => done(cli::status::run_features()),
        Command::Status(a) => done(cli::status::run_status(a)),
        Command::Set(a) => done(clone::run_set(a)),
        Command::Stop(a) => done(cli::stop::run_stop(a)),
        Command::Mark(a) => done(clone::run_mark(a)),
        Command::Format(a) => cli::metadata::run_format(a),
        Command::Check(a) => cli::metadata::run_check(a),
        Command::Dump(a) => cli::metadata::run_dump(a),
        Command::ResetMode(a) => cli::metadata::run_reset_mode(a),
        Command::Up(a) => done(cli::table::run_up(a)),
        Command::Down(a) => done(cli::table::run_down(a)),
        Command::Events(a) => done(cli::monitor::run_events(a)),
        Command::Metrics(a) => done(cli::monitor::run_metrics(a)),
        Command::Trace(a) => done(clone::run_trace(a)),
        Command::Name(a) => done(cli::status::run_name(a)),
        Command::SystemdGenerator(a) => done(cli::table::run_generator(a)),
        Command::GenDocs(a) => done(gen_docs(a)),
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
