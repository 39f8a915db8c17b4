//! The `drover` binary: one command for every role (controller, node, CLI, coordinator)
//! and the operator tools. This file only parses arguments and dispatches; each
//! subcommand lives in its own module and returns `anyhow::Result`, so errors reach the
//! operator as one line that says what went wrong and where.

mod journal_cmd;

use clap::{Parser, Subcommand};

/// drover: a resilient controller for fleets of nodes.
#[derive(Debug, Parser)]
#[command(name = "drover", version, about, propagate_version = true)]
struct Cli {
    /// Log format for diagnostics on stderr.
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"], env = "DROVER_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect a journal directory: verify its integrity or dump its records.
    #[command(subcommand)]
    Journal(journal_cmd::JournalCommand),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.command {
        Command::Journal(cmd) => journal_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
