//! `drover coordinator`: run an AMBROSIA-compatible coordinator for one instance,
//! register instances, and run the shipped example services against it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use drover_journal::FsyncMode;

use crate::util::shutdown_signal;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    #[command(subcommand)]
    pub action: Option<CoordinatorAction>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The instance to serve (register it first).
    #[arg(long, env = "DROVER_INSTANCE")]
    pub instance: Option<String>,
    /// Where instances live (one directory each: instance.json and the log).
    #[arg(long, env = "DROVER_LOG_DIR", default_value = "./ambrosia-logs")]
    pub log_dir: PathBuf,
    /// The port the application writes to (loopback).
    #[arg(long, env = "DROVER_RECEIVE_PORT")]
    pub receive_port: Option<u16>,
    /// The port the application reads from (loopback).
    #[arg(long, env = "DROVER_SEND_PORT")]
    pub send_port: Option<u16>,
    /// Connect out to the application's send port (older AMBROSIA clients, e.g. C)
    /// instead of listening on it.
    #[arg(long)]
    pub connect_send: bool,
    /// Move the instance to this version at this start (an upgrade).
    #[arg(long)]
    pub upgrade_version: Option<u64>,
    /// `always` (default) or `never` (measurements only: calls are lost on a crash).
    #[arg(long, default_value = "always", value_parser = ["always", "never"])]
    pub fsync: String,
    /// Largest application checkpoint accepted, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_checkpoint: u64,
    /// Ask the application for a checkpoint after this many log bytes.
    #[arg(long, default_value_t = 1000 << 20)]
    pub checkpoint_every_bytes: u64,
    /// The port other coordinators link to (0: any free port; recorded in instance.json
    /// for instances in the same --log-dir).
    #[arg(long, default_value_t = 0)]
    pub peer_port: u16,
    /// Instance addresses for instances in other log directories: lines `name host:port`.
    #[arg(long)]
    pub peers: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CoordinatorAction {
    /// Create an instance (as `Ambrosia RegisterInstance` does).
    Register {
        /// The instance name (letters, digits, '-', '_').
        #[arg(long)]
        instance: String,
        /// Where instances live.
        #[arg(long, default_value = "./ambrosia-logs")]
        log_dir: PathBuf,
        /// The application version it starts at.
        #[arg(long = "app-version", default_value_t = 0)]
        app_version: u64,
    },
    /// Run a shipped example service against a coordinator: `hello` calls itself once
    /// and prints what it received; `counter` counts to --target by calling itself.
    Example {
        /// Which one (`pair-server` and `pair-client` are a service and its client on
        /// two instances: the client sends `add` to the server, which acknowledges).
        #[arg(value_parser = ["hello", "counter", "pair-server", "pair-client"])]
        name: String,
        /// For `pair-client`: its own instance name, and the server's.
        #[arg(long, default_value = "client")]
        own: String,
        /// For `pair-client`: the server instance.
        #[arg(long, default_value = "server")]
        server: String,
        /// The coordinator's receive port.
        #[arg(long)]
        receive_port: u16,
        /// The coordinator's send port.
        #[arg(long)]
        send_port: u16,
        /// For `counter`: how far to count.
        #[arg(long, default_value_t = 1000)]
        target: u64,
        /// Listen on the send port (for a coordinator started with --connect-send).
        #[arg(long)]
        listen_send: bool,
    },
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Some(CoordinatorAction::Register { instance, log_dir, app_version }) => {
            let meta = drover_coordinator::instance::register(&log_dir, &instance, app_version)?;
            println!("registered instance {} (version {}) in {}", meta.name, meta.version, log_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Some(CoordinatorAction::Example { name, own, server, receive_port, send_port, target, listen_send }) => {
            let connection = if listen_send {
                drover_ambrosia::Connection::ConnectingCoordinator { receive_port, send_port }
            } else {
                drover_ambrosia::Connection::ListeningCoordinator { receive_port, send_port }
            };
            let result = match name.as_str() {
                "hello" => {
                    let mut s = drover_ambrosia::examples::Hello::default();
                    drover_ambrosia::run(&mut s, connection, 0, b"").await
                }
                "pair-server" => {
                    let mut s = drover_ambrosia::examples::PairServer::default();
                    drover_ambrosia::run(&mut s, connection, 0, b"").await
                }
                "pair-client" => {
                    let mut s = drover_ambrosia::examples::PairClient { own, server, ..Default::default() };
                    drover_ambrosia::run(&mut s, connection, 0, &target.to_le_bytes()).await
                }
                _ => {
                    let mut s = drover_ambrosia::examples::Counter::default();
                    drover_ambrosia::run(&mut s, connection, 0, &target.to_le_bytes()).await
                }
            };
            result.context("the example service stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let a = args.run;
            let instance =
                a.instance.context("--instance is required (and registered: drover coordinator register)")?;
            let receive = a.receive_port.context("--receive-port is required")?;
            let send = a.send_port.context("--send-port is required")?;
            let mut config = drover_coordinator::CoordinatorConfig::new(instance, &a.log_dir, receive, send);
            config.connect_send = a.connect_send;
            config.upgrade_version = a.upgrade_version;
            config.fsync = if a.fsync == "never" { FsyncMode::Never } else { FsyncMode::Always };
            config.max_checkpoint = a.max_checkpoint;
            config.checkpoint_every_bytes = a.checkpoint_every_bytes.max(1 << 20);
            config.peer_port = a.peer_port;
            config.peers = a.peers;
            drover_coordinator::run(config, shutdown_signal(), |_| {}).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
