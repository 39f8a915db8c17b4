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
    /// Without --replica: the instance registry, a file of lines `name host:port` for
    /// instances in other log directories (also --registry). With --replica: the
    /// group's initial replicas, this one included, ID=HOST:PORT,... (their Raft
    /// addresses); every founder starts with the same list.
    #[arg(long)]
    pub peers: Option<String>,
    /// The instance registry: lines `name host:port` (a replicated instance has a line
    /// per replica).
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Run as replica K of the instance (with --raft, --peers and
    /// --cluster-secret-file): the replicas form one Raft group whose log is the
    /// instance's; the leader is the primary, the others are hot secondaries.
    #[arg(long, requires_all = ["raft", "cluster_secret_file"])]
    pub replica: Option<u64>,
    /// The Raft address this replica listens on.
    #[arg(long, requires = "replica")]
    pub raft: Option<String>,
    /// The file holding the secret the replicas share (`drover cluster secret` makes one).
    #[arg(long, env = "DROVER_CLUSTER_SECRET_FILE", requires = "replica")]
    pub cluster_secret_file: Option<PathBuf>,
    /// A replica that hears no primary for this long to twice this long campaigns.
    #[arg(long, default_value = "200ms", value_parser = crate::util::parse_duration, requires = "replica")]
    pub election_timeout: std::time::Duration,
    #[command(flatten)]
    pub tls: RaftTlsArgs,
}

/// Mutual TLS on the replicas' Raft port (as the controllers' `--cluster-ca`).
#[derive(Debug, Args)]
pub struct RaftTlsArgs {
    /// The CA (PEM, `drover cert init`) that issued every replica's certificate: with
    /// it, the Raft port is mutual TLS, each side presenting --tls-cert/--tls-key and
    /// accepting only certificates this CA signed. The group secret is still proved
    /// inside.
    #[arg(long, env = "DROVER_CLUSTER_CA", requires_all = ["tls_cert", "tls_key"])]
    pub cluster_ca: Option<PathBuf>,
    /// This replica's (or this operator's) certificate, issued by --cluster-ca.
    #[arg(long, env = "DROVER_TLS_CERT", requires = "cluster_ca")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "DROVER_TLS_KEY", requires = "cluster_ca")]
    pub tls_key: Option<PathBuf>,
}

impl RaftTlsArgs {
    /// The credentials the Raft port asks for: the group secret, and TLS when given.
    fn credentials(&self, secret_file: &std::path::Path) -> anyhow::Result<drover_raft::tls::Credentials> {
        let secret = drover_raft::secret::ClusterSecret::from_file(secret_file)?;
        let tls = match (&self.cluster_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::util::raft_tls(ca, cert, key)?),
            (None, None, None) => None,
            _ => anyhow::bail!("--cluster-ca, --tls-cert and --tls-key go together"),
        };
        Ok(drover_raft::tls::Credentials { secret, tls })
    }
}

/// How the replica commands reach an instance's replicas.
#[derive(Debug, Args)]
pub struct ReplicaTarget {
    /// The instance.
    #[arg(long, env = "DROVER_INSTANCE")]
    pub instance: String,
    /// Where instances live (the replicas' directories there name their Raft addresses).
    #[arg(long, env = "DROVER_LOG_DIR", default_value = "./ambrosia-logs")]
    pub log_dir: PathBuf,
    /// Raft addresses of replicas to ask (HOST:PORT,...; default: those found in --log-dir).
    #[arg(long)]
    pub via: Option<String>,
    /// The replicas' shared secret.
    #[arg(long, env = "DROVER_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: PathBuf,
    #[command(flatten)]
    pub tls: RaftTlsArgs,
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
    /// Show an instance's replicas: the primary, the term, the commit index, and each
    /// replica's lag and its application's replay position.
    Status {
        #[command(flatten)]
        target: ReplicaTarget,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add replica K to an instance's group (start it first with --replica K and no
    /// --peers, or --peers without itself: it waits to be added).
    AddReplica {
        #[command(flatten)]
        target: ReplicaTarget,
        /// The new replica's id.
        #[arg(long)]
        replica: u64,
        /// Its Raft address.
        #[arg(long)]
        raft: String,
    },
    /// Remove replica K from an instance's group.
    RemoveReplica {
        #[command(flatten)]
        target: ReplicaTarget,
        /// The replica's id.
        #[arg(long)]
        replica: u64,
    },
    /// Hand the primary role to replica K (an upgrading secondary becomes the upgraded
    /// primary this way): about one election of downtime.
    TransferPrimary {
        #[command(flatten)]
        target: ReplicaTarget,
        /// The replica to become primary.
        #[arg(long)]
        to: u64,
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
        Some(CoordinatorAction::Status { target, json }) => {
            let (addrs, creds) = replica_target(&target)?;
            let answer =
                drover_coordinator::admin::ask(&addrs, &creds, &drover_coordinator::admin::Request::Status).await?;
            let drover_coordinator::admin::Answer::Status(st) = answer else {
                anyhow::bail!("the replica answered something else than a status");
            };
            if st.instance != target.instance {
                anyhow::bail!("those replicas serve instance {:?}, not {:?}", st.instance, target.instance);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(CoordinatorAction::AddReplica { target, replica, raft }) => {
            replica_change(&target, drover_coordinator::admin::Request::Add { id: replica, raft }).await
        }
        Some(CoordinatorAction::RemoveReplica { target, replica }) => {
            replica_change(&target, drover_coordinator::admin::Request::Remove { id: replica }).await
        }
        Some(CoordinatorAction::TransferPrimary { target, to }) => {
            replica_change(&target, drover_coordinator::admin::Request::Transfer { to }).await
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
            let Some(id) = a.replica else {
                if a.tls.cluster_ca.is_some() {
                    anyhow::bail!("--cluster-ca is for replicas' Raft port (with --replica)");
                }
                config.peers = a.registry.or(a.peers.map(PathBuf::from));
                drover_coordinator::run(config, shutdown_signal(), |_| {}).await?;
                return Ok(ExitCode::SUCCESS);
            };
            config.peers = a.registry;
            let raft_addr = a.raft.context("--replica needs --raft")?;
            let peers = match &a.peers {
                Some(p) => crate::roles::parse_peers(p).map_err(|e| anyhow::anyhow!("--peers: {e}"))?.0,
                None => Default::default(),
            };
            if let Some(listed) = peers.get(&id)
                && *listed != raft_addr
            {
                anyhow::bail!("--peers lists replica {id} at {listed}, but --raft is {raft_addr}");
            }
            let secret_file = a.cluster_secret_file.context("--replica needs --cluster-secret-file")?;
            let creds = a.tls.credentials(&secret_file)?;
            let raft = tokio::net::TcpListener::bind(&raft_addr)
                .await
                .with_context(|| format!("cannot listen on {raft_addr} for Raft (in use? see --raft)"))?;
            let replica = drover_coordinator::replica::ReplicaConfig {
                coordinator: config,
                id,
                raft,
                raft_addr,
                peers,
                creds,
                timing: drover_raft::member::Timing::from_election_timeout(a.election_timeout),
            };
            drover_coordinator::replica::run_replica(replica, shutdown_signal(), |_| {}).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The replicas' Raft addresses to ask, and the credentials to ask with.
fn replica_target(t: &ReplicaTarget) -> anyhow::Result<(Vec<String>, drover_raft::tls::Credentials)> {
    let creds = t.tls.credentials(&t.cluster_secret_file)?;
    let addrs: Vec<String> = match &t.via {
        Some(v) => v.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect(),
        None => drover_coordinator::instance::replica_raft_addresses(&t.log_dir, &t.instance),
    };
    if addrs.is_empty() {
        anyhow::bail!(
            "no replica of {} found in {} (give their Raft addresses with --via)",
            t.instance,
            t.log_dir.display()
        );
    }
    Ok((addrs, creds))
}

async fn replica_change(t: &ReplicaTarget, request: drover_coordinator::admin::Request) -> anyhow::Result<ExitCode> {
    let (addrs, creds) = replica_target(t)?;
    match drover_coordinator::admin::ask(&addrs, &creds, &request).await? {
        drover_coordinator::admin::Answer::Done(what) => {
            println!("{what}");
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn print_status(st: &drover_coordinator::admin::InstanceStatus) {
    let primary = st.primary.map_or_else(|| "none".to_owned(), |p| format!("replica {p}"));
    let commit = st.commit_index.map_or_else(|| "-".to_owned(), |c| c.to_string());
    println!("instance {}: primary {primary}, term {}, commit index {commit}", st.instance, st.term);
    println!(
        "{:>7}  {:<12}  {:<21}  {:>9}  {:>6}  {:<16}  {:>10}  {:>8}  {:>7}",
        "replica", "role", "raft", "records", "lag", "application", "replay at", "dropped", "version"
    );
    for r in &st.replicas {
        match &r.info {
            Some(i) => println!(
                "{:>7}  {:<12}  {:<21}  {:>9}  {:>6}  {:<16}  {:>10}  {:>8}  {:>7}",
                r.id,
                if r.voter { i.role.clone() } else { format!("{} (learner)", i.role) },
                r.raft,
                i.records,
                r.lag.map_or_else(|| "-".to_owned(), |l| l.to_string()),
                i.app.phase,
                i.app.next_seq,
                i.app.dropped,
                i.version
            ),
            None => println!("{:>7}  {:<12}  {:<21}", r.id, "unreachable", r.raft),
        }
    }
}
