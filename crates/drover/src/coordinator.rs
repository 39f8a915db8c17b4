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
    /// Replay an instance's recorded history to an application without going live
    /// (AMBROSIA's DebugInstance; seed 4's repro and upgrade what-if flows): a
    /// checkpoint, then every logged record after it with its original sequence id.
    /// Read-only: a live coordinator may keep running on the instance. The replay's end
    /// is the end of the application's receive stream; the run ends when the
    /// application disconnects.
    Debug {
        /// The instance whose log is replayed.
        #[arg(long, env = "DROVER_INSTANCE")]
        instance: String,
        /// Where instances live.
        #[arg(long, env = "DROVER_LOG_DIR", default_value = "./ambrosia-logs")]
        log_dir: PathBuf,
        /// The port the application writes to (loopback).
        #[arg(long)]
        receive_port: u16,
        /// The port the application reads from (loopback).
        #[arg(long)]
        send_port: u16,
        /// Connect out to the application's send port (older AMBROSIA clients).
        #[arg(long)]
        connect_send: bool,
        /// Start from this checkpoint (see `checkpoints`; default: the oldest kept).
        #[arg(long)]
        checkpoint: Option<i64>,
        /// Send UpgradeService after the checkpoint: the application upgrades its state,
        /// then replays (an upgrade rehearsal).
        #[arg(long)]
        test_upgrade: bool,
        /// Print the run's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the checkpoints a debug run can start from.
    Checkpoints {
        /// The instance.
        #[arg(long, env = "DROVER_INSTANCE")]
        instance: String,
        /// Where instances live.
        #[arg(long, env = "DROVER_LOG_DIR", default_value = "./ambrosia-logs")]
        log_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
        Some(CoordinatorAction::Debug {
            instance,
            log_dir,
            receive_port,
            send_port,
            connect_send,
            checkpoint,
            test_upgrade,
            json,
        }) => {
            let mut coordinator =
                drover_coordinator::CoordinatorConfig::new(instance, &log_dir, receive_port, send_port);
            coordinator.connect_send = connect_send;
            let config = drover_coordinator::debug::DebugConfig { coordinator, checkpoint, test_upgrade };
            let report = drover_coordinator::debug::debug(config, shutdown_signal(), |_| {}).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let range = match (report.first_seq, report.last_seq) {
                    (Some(a), Some(b)) => format!(" (records {a} to {b})"),
                    _ => String::new(),
                };
                println!(
                    "debug run from checkpoint {}{}: {} records replayed{range}; the application made {} calls (dropped); {}",
                    report.checkpoint,
                    if report.test_upgrade { " with UpgradeService" } else { "" },
                    report.records,
                    report.calls_dropped,
                    report.ended
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(CoordinatorAction::Checkpoints { instance, log_dir, json }) => {
            let list = drover_coordinator::debug::checkpoints(&log_dir, &instance)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("instance {instance} has no checkpoint yet");
            } else {
                println!("{:>12}  {:>12}  {:>14}", "checkpoint", "bytes", "records after");
                for c in &list {
                    println!("{:>12}  {:>12}  {:>14}", c.seq, c.bytes, c.records_after);
                }
            }
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
                    let r = drover_ambrosia::run(&mut s, connection, 0, &target.to_le_bytes()).await;
                    if r.is_ok() {
                        // Only a debug run ends without an error.
                        println!("replay over at count {}", s.count);
                    }
                    r
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
