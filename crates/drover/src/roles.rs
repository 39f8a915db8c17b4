//! `drover controller` and `drover node`: the two long-running roles.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use drover_controller::{ControllerConfig, JournalTuning, Policy};
use drover_journal::{FsyncMode, RecoveryMode};
use drover_node::source::{CsvTicks, PriceSource, Simulator};
use drover_node::{Exit, NodeConfig, NodeStats};

use crate::util::{parse_duration, shutdown_signal};

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Configuration file (TOML; keys are the long flag names). Default: ./drover.toml if
    /// it exists. Flags and DROVER_* variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// gRPC address for nodes and CLIs.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// Admission address (seed 3 handshake) nodes connect to first.
    #[arg(long, env = "DROVER_ADMISSION", default_value = "127.0.0.1:7401")]
    pub admission: String,
    /// HTTP address for the dashboard (/), /metrics, /healthz and /readyz.
    #[arg(long, env = "DROVER_HTTP", default_value = "127.0.0.1:7480")]
    pub http: String,
    /// The gRPC address admitted nodes are told to use (default: the --listen address).
    #[arg(long, env = "DROVER_UPSTREAM")]
    pub upstream: Option<String>,
    /// The oldest node version admitted (the major must be this controller's).
    #[arg(long, env = "DROVER_MIN_NODE_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub min_node_version: String,
    /// An admission handshake not finished within this is closed.
    #[arg(long, env = "DROVER_HANDSHAKE_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub handshake_deadline: Duration,
    /// TLS certificate chain (PEM) for the gRPC and admission ports (with --tls-key).
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Cluster CA (PEM) for node client certificates: nodes may then pass admission with
    /// a certificate naming their id instead of a join token (needs --tls-cert).
    #[arg(long, env = "DROVER_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// How long a session ticket is valid; nodes pass admission again after it.
    #[arg(long, env = "DROVER_TICKET_TTL", default_value = "10m", value_parser = parse_duration)]
    pub ticket_ttl: Duration,
    /// Data directory: journal and checkpoints.
    #[arg(long, env = "DROVER_DATA_DIR", default_value = "./drover-data")]
    pub data_dir: PathBuf,
    /// A node silent this long is gone and loses its pairs.
    #[arg(long, env = "DROVER_NODE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub node_timeout: Duration,
    /// A streamer silent on a pair this long loses it to another capable node.
    #[arg(long, env = "DROVER_STALE_AFTER", default_value = "10s", value_parser = parse_duration)]
    pub stale_after: Duration,
    /// After a restart, how long previous streamers have to come back before their pairs move.
    #[arg(long, env = "DROVER_REJOIN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub rejoin_grace: Duration,
    /// A node gone this long (and streaming nothing) is forgotten: it leaves `drover
    /// nodes`. `drover forget` does it at once.
    #[arg(long, env = "DROVER_GONE_RETENTION", default_value = "10m", value_parser = parse_duration)]
    pub gone_retention: Duration,
    /// A queued task that no registered worker would take (none fits its cores, memory,
    /// labels or job, or every one refused it) for this long fails with the reason.
    #[arg(long, env = "DROVER_UNPLACEABLE_AFTER", default_value = "1m", value_parser = parse_duration)]
    pub unplaceable_after: Duration,
    /// How a streamer is picked: random (the seed's rule) or balanced (least loaded).
    #[arg(long, env = "DROVER_POLICY", default_value = "random", value_parser = ["random", "balanced"])]
    pub policy: String,
    /// `always` (default) or `never`: never is for measurements only and loses data on a crash.
    #[arg(long, env = "DROVER_FSYNC", default_value = "always", value_parser = ["always", "never"])]
    pub fsync: String,
    /// `strict` (refuse to start on mid-log corruption) or `tolerate-corruption`.
    #[arg(long, env = "DROVER_RECOVERY", default_value = "strict", value_parser = ["strict", "tolerate-corruption"])]
    pub recovery: String,
    /// Failed admissions allowed per peer address per minute; past it, refused at once.
    #[arg(long, env = "DROVER_MAX_FAILED_ADMISSIONS", default_value_t = 10)]
    pub max_failed_admissions: usize,
    /// Most admission connections open at once. Every connected node holds one (its
    /// control channel), so this caps the fleet; past it a node is told `conn:close`.
    #[arg(long, env = "DROVER_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Most gRPC connections open at once beyond one per node (CLIs, scripts).
    #[arg(long, env = "DROVER_MAX_CLI_CONNECTIONS", default_value_t = 256)]
    pub max_cli_connections: usize,
    /// Most HTTP (dashboard, metrics) connections open at once.
    #[arg(long, env = "DROVER_MAX_HTTP_CONNECTIONS", default_value_t = 256)]
    pub max_http_connections: usize,
    /// Most dashboard event streams (`/events`) open at once.
    #[arg(long, env = "DROVER_MAX_EVENT_SUBSCRIBERS", default_value_t = 64)]
    pub max_event_subscribers: usize,
    /// A gRPC or HTTP connection that sends nothing for this long after connecting is
    /// closed.
    #[arg(long, env = "DROVER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// A gRPC connection with no open stream, or an HTTP connection with no traffic,
    /// is closed after this long.
    #[arg(long, env = "DROVER_IDLE_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A gRPC or HTTP connection whose peer stops reading is closed after this long.
    #[arg(long, env = "DROVER_SEND_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub send_timeout: Duration,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "DROVER_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// Messages queued per stream before a peer that does not read is cut off.
    #[arg(long, env = "DROVER_STREAM_QUEUE", default_value_t = 4096)]
    pub stream_queue: usize,
    /// /healthz turns unhealthy when inputs wait this long without one being applied.
    #[arg(long, env = "DROVER_HEALTH_STALL", default_value = "5s", value_parser = parse_duration)]
    pub health_stall: Duration,
    /// Journal segment size in bytes before a new file is started.
    #[arg(long, env = "DROVER_SEGMENT_BYTES", default_value_t = JournalTuning::default().segment_bytes)]
    pub segment_bytes: u64,
    /// Group commit: after the first input of a batch, wait this long for more (0s: none).
    #[arg(long, env = "DROVER_BATCH_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub batch_delay: Duration,
    /// Take a checkpoint after this many journal records.
    #[arg(long, env = "DROVER_CHECKPOINT_EVERY", default_value_t = JournalTuning::default().checkpoint_every_records)]
    pub checkpoint_every: u64,
    /// Also take a checkpoint after this many journal bytes, so large inputs cannot
    /// grow the journal without bound between record-count checkpoints.
    #[arg(long, env = "DROVER_CHECKPOINT_EVERY_BYTES", default_value_t = JournalTuning::default().checkpoint_every_bytes)]
    pub checkpoint_every_bytes: u64,
    /// The manager id workers address (and allow with --manager).
    #[arg(long, env = "DROVER_MANAGER_ID", default_value = "controller")]
    pub manager_id: String,
    /// A task attempt may overrun its timeout by this much before the manager aborts it.
    #[arg(long, env = "DROVER_TASK_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub task_grace: Duration,
    /// Attempts on a worker that is gone are retried elsewhere after this long.
    #[arg(long, env = "DROVER_WORKER_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub worker_grace: Duration,
    /// Finished tasks remembered (oldest forgotten first).
    #[arg(long, env = "DROVER_TASK_RETENTION", default_value_t = 10_000)]
    pub task_retention: usize,
    /// Bytes of finished tasks' output kept (oldest outputs dropped first).
    #[arg(long, env = "DROVER_TASK_OUTPUT_BUDGET", default_value_t = 64 << 20)]
    pub task_output_budget: u64,
    /// Checkpoints kept; journal segments older than the oldest kept one are removed.
    #[arg(long, env = "DROVER_KEEP_CHECKPOINTS", default_value_t = JournalTuning::default().keep_checkpoints)]
    pub keep_checkpoints: usize,
    /// This controller's member id in a replicated group (with --raft and
    /// --cluster-secret-file). Without it the controller runs on its own.
    #[arg(long, env = "DROVER_MEMBER", requires_all = ["raft", "cluster_secret_file"])]
    pub member: Option<u64>,
    /// The Raft address this member listens on for its peers.
    #[arg(long, env = "DROVER_RAFT", requires = "member")]
    pub raft: Option<String>,
    /// The group's initial members, this one included: ID=HOST:PORT,ID=HOST:PORT,...
    /// (their Raft addresses). Every founder starts with the same list and the group
    /// forms itself; a member started without itself in it waits for `drover cluster add`.
    #[arg(long, env = "DROVER_PEERS", requires = "member", value_parser = parse_peers)]
    pub peers: Option<PeerList>,
    /// The file holding the cluster secret every member shares (`drover cluster secret`
    /// makes one).
    #[arg(long, env = "DROVER_CLUSTER_SECRET_FILE", requires = "member")]
    pub cluster_secret_file: Option<PathBuf>,
    /// The cluster CA (PEM, `drover cert init`): with it, the Raft port is mutual TLS,
    /// each member presenting its --tls-cert/--tls-key (issued by this CA) and
    /// accepting only peers whose certificates it signed. The cluster secret is still
    /// proved inside.
    #[arg(long, env = "DROVER_CLUSTER_CA", requires = "member")]
    pub cluster_ca: Option<PathBuf>,
    /// A member that hears no leader for this long to twice this long campaigns
    /// (heartbeats every quarter of it). A lost leader is replaced after about 3 to 4
    /// times this; raise it where machines stall for longer (slow disks, overload).
    #[arg(long, env = "DROVER_ELECTION_TIMEOUT", default_value = "200ms", value_parser = parse_duration)]
    pub election_timeout: Duration,
    /// A member snapshots its core every this many log entries; a fifth of it (at most
    /// 2,000) stays in the log behind the snapshot, and the log before is removed. A
    /// member further behind is caught up by the snapshot.
    #[arg(long, env = "DROVER_SNAPSHOT_EVERY", default_value_t = 50_000)]
    pub snapshot_every: u64,
    /// A member also snapshots after this many bytes of Raft log since its last
    /// snapshot (the unpurged log is held in memory as well as on disk).
    #[arg(long, env = "DROVER_SNAPSHOT_EVERY_BYTES", default_value_t = drover_raft::member::DEFAULT_SNAPSHOT_EVERY_BYTES)]
    pub snapshot_every_bytes: u64,
}

/// `--peers`: member id → Raft address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerList(pub std::collections::BTreeMap<u64, String>);

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`.
pub fn parse_peers(s: &str) -> Result<PeerList, String> {
    let mut peers = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a member id (a number)"))?;
        let addr = addr.trim();
        if addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            return Err(format!("{addr:?} (member {id}) is not HOST:PORT"));
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(format!("member {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no members listed".into());
    }
    Ok(PeerList(peers))
}

impl ControllerArgs {
    pub fn config(&self) -> ControllerConfig {
        let mut c = ControllerConfig::new(&self.data_dir);
        c.core.version = env!("CARGO_PKG_VERSION").into();
        c.core.node_timeout_ms = self.node_timeout.as_millis() as i64;
        c.core.stale_after_ms = self.stale_after.as_millis() as i64;
        c.core.rejoin_grace_ms = self.rejoin_grace.as_millis() as i64;
        c.core.gone_retention_ms = self.gone_retention.as_millis() as i64;
        c.core.unplaceable_after_ms = self.unplaceable_after.as_millis() as i64;
        c.core.policy = if self.policy == "balanced" { Policy::Balanced } else { Policy::Random };
        c.core.manager_id = self.manager_id.clone();
        c.core.task_grace_ms = self.task_grace.as_millis() as i64;
        c.core.worker_grace_ms = self.worker_grace.as_millis() as i64;
        c.core.task_retention = self.task_retention.max(1);
        c.core.task_output_budget = self.task_output_budget;
        c.fsync = if self.fsync == "never" { FsyncMode::Never } else { FsyncMode::Always };
        c.recovery = if self.recovery == "tolerate-corruption" {
            RecoveryMode::TolerateCorruption
        } else {
            RecoveryMode::Strict
        };
        c.upstream = self.upstream.clone();
        c.min_node_version = self.min_node_version.clone();
        c.ticket_ttl_ms = self.ticket_ttl.as_millis() as i64;
        c.handshake_deadline_ms = self.handshake_deadline.as_millis() as i64;
        c.max_failed_admissions = self.max_failed_admissions;
        c.max_connections = self.max_connections.max(1);
        c.max_message_bytes = self.max_message_bytes;
        c.max_cli_connections = self.max_cli_connections.max(1);
        c.max_http_connections = self.max_http_connections.max(1);
        c.max_event_subscribers = self.max_event_subscribers.max(1);
        c.header_timeout_ms = self.header_timeout.as_millis().max(1) as i64;
        c.idle_timeout_ms = self.idle_timeout.as_millis().max(1) as i64;
        c.send_timeout_ms = self.send_timeout.as_millis().max(1) as i64;
        c.stream_queue = self.stream_queue.max(1);
        c.health_stall_ms = self.health_stall.as_millis() as i64;
        c.journal = JournalTuning {
            segment_bytes: self.segment_bytes.max(4096),
            max_batch_delay: self.batch_delay,
            checkpoint_every_records: self.checkpoint_every.max(1),
            keep_checkpoints: self.keep_checkpoints.max(1),
            checkpoint_every_bytes: self.checkpoint_every_bytes.max(1 << 20),
        };
        c
    }
}

pub async fn controller(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.config();
    // Per node: the control channel and (shared or not) a gRPC connection.
    crate::util::fit_connections_to_fd_limit(&mut config);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let cert_pem = std::fs::read(cert).with_context(|| format!("cannot read --tls-cert {}", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("cannot read --tls-key {}", key.display()))?;
        config.tls = Some(drover_controller::TlsIdentity { cert_pem, key_pem });
    }
    if let Some(ca) = &args.client_ca {
        config.client_ca =
            Some(std::fs::read(ca).with_context(|| format!("cannot read --client-ca {}", ca.display()))?);
    }
    let grpc = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (in use? try --listen 127.0.0.1:0)", args.listen))?;
    let admission = tokio::net::TcpListener::bind(&args.admission)
        .await
        .with_context(|| format!("cannot listen on {} for admission (in use? see --admission)", args.admission))?;
    let http = tokio::net::TcpListener::bind(&args.http)
        .await
        .with_context(|| format!("cannot listen on {} for HTTP (in use? see --http)", args.http))?;
    let raft = match (&args.member, &args.raft) {
        (Some(member), Some(addr)) => {
            let secret_file = args.cluster_secret_file.as_ref().context("--member needs --cluster-secret-file")?;
            let secret = drover_raft::secret::ClusterSecret::from_file(secret_file)?;
            let peers = args.peers.clone().map(|p| p.0).unwrap_or_default();
            if let Some(listed) = peers.get(member)
                && listed != addr
            {
                anyhow::bail!("--peers lists member {member} at {listed}, but --raft is {addr}");
            }
            let tls = match &args.cluster_ca {
                None => None,
                Some(ca) => {
                    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
                        anyhow::bail!(
                            "--cluster-ca needs --tls-cert and --tls-key (this member's certificate, issued by that CA)"
                        );
                    };
                    Some(crate::util::raft_tls(ca, cert, key)?)
                }
            };
            config.cluster = Some(drover_controller::ClusterSettings {
                member: *member,
                peers,
                secret,
                tls,
                timing: drover_raft::member::Timing {
                    snapshot_every: args.snapshot_every.max(10),
                    snapshot_every_bytes: args.snapshot_every_bytes.max(1 << 20),
                    ..drover_raft::member::Timing::from_election_timeout(args.election_timeout)
                },
            });
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for Raft (in use? see --raft)"))?,
            )
        }
        _ => None,
    };
    let listeners = drover_controller::Listeners { grpc, admission: Some(admission), http: Some(http), raft };
    let token_file = args.data_dir.join(drover_controller::ADMIN_TOKEN_FILE);
    let tls = config.tls.is_some();
    // A test's slow disk: every journal fsync stalls while the named file exists (for
    // the chaos suite; never set in production, and said loudly when it is).
    let storage: std::sync::Arc<dyn drover_controller::Storage> = match std::env::var_os("DROVER_TEST_SLOW_FSYNC") {
        Some(switch) => {
            tracing::warn!(switch = %std::path::Path::new(&switch).display(), "DROVER_TEST_SLOW_FSYNC is set: journal fsyncs stall while that file exists (a test hook)");
            let faults =
                drover_controller::Faults { stall_while: Some(switch.into()), ..drover_controller::Faults::nothing() };
            std::sync::Arc::new(drover_controller::FaultyStorage::new(
                std::sync::Arc::new(drover_controller::FsStorage),
                std::sync::Arc::new(faults),
            ))
        }
        None => std::sync::Arc::new(drover_controller::FsStorage),
    };
    drover_controller::run(config, storage, listeners, shutdown_signal(), move |r| {
        let or_none = |a: Option<std::net::SocketAddr>| a.map_or("off".to_owned(), |a| a.to_string());
        let scheme = if tls { "https" } else { "http" };
        tracing::info!(
            grpc = %r.addr,
            admission = %or_none(r.admission),
            dashboard = %r.http.map_or("off".to_owned(), |a| format!("{scheme}://{a}/")),
            admin_token_file = %token_file.display(),
            "controller ready"
        );
    })
    .await
    .context("controller stopped")?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Configuration file (TOML; keys are the long flag names). Default: ./drover.toml if
    /// it exists. Flags and DROVER_* variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// The controller's admission address (its --admission port, not the gRPC port the
    /// CLI uses: admission then tells the node where gRPC is). For a cluster, every
    /// member's, comma-separated (`a:7401,b:7401,c:7401`): any member admits, nodes
    /// stream to the leader and follow it, and a node re-admits at the next address
    /// when one is down. `--controller` is another spelling of this flag.
    #[arg(long, alias = "controller", env = "DROVER_ADMISSION", default_value = "127.0.0.1:7401")]
    pub admission: String,
    /// Join token (`drover token create --role join`); or use --cert/--key.
    #[arg(long, env = "DROVER_JOIN_TOKEN", hide_env_values = true, required_unless_present = "cert")]
    pub token: Option<String>,
    /// Client certificate (PEM, signed by the cluster CA, naming this node's --id) used
    /// as the credential instead of a token; needs --key and --ca.
    #[arg(long, env = "DROVER_NODE_CERT", requires_all = ["key", "ca", "id"])]
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "DROVER_NODE_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Pairs this node's upstream serves, comma-separated.
    #[arg(long, env = "DROVER_PAIRS", value_delimiter = ',', required_unless_present = "worker")]
    pub pairs: Vec<String>,
    /// Also run tasks for the controller (seed 2: this node becomes a worker).
    #[arg(long, env = "DROVER_WORKER")]
    pub worker: bool,
    /// Cores offered to tasks (default: the machine's).
    #[arg(long, env = "DROVER_CORES")]
    pub cores: Option<u32>,
    /// Memory offered to tasks, in MiB.
    #[arg(long, env = "DROVER_MEMORY", default_value_t = 1024)]
    pub memory: u64,
    /// A label tasks may require, key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Local jobs must be under one of these path prefixes (repeatable; URLs are always allowed).
    #[arg(long = "allow-jobs", default_values = ["/bin/", "/usr/bin/"])]
    pub allow_jobs: Vec<String>,
    /// Accept only these managers (controller ids; repeatable; default: any).
    #[arg(long = "manager")]
    pub managers: Vec<String>,
    /// Bytes of stdout and of stderr kept per task (at most 1.5 MiB each, so a report
    /// fits the controller's 4 MiB message limit); the rest is dropped with a marker.
    #[arg(long, env = "DROVER_MAX_OUTPUT", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(0..=1_572_864))]
    pub max_output: u64,
    /// Where downloaded jobs are cached (default: a drover-jobs directory in the temp dir).
    #[arg(long, env = "DROVER_JOB_CACHE")]
    pub job_cache: Option<PathBuf>,
    /// A human name (default: derived from the id).
    #[arg(long, env = "DROVER_NODE_NAME")]
    pub name: Option<String>,
    /// The node uuid (default: a fresh random one; nodes keep no state across restarts).
    #[arg(long, env = "DROVER_NODE_ID")]
    pub id: Option<String>,
    /// CA certificate (PEM) to verify the controller's TLS certificate (default: plain TCP).
    #[arg(long, env = "DROVER_CA")]
    pub ca: Option<PathBuf>,
    /// Price source: `sim` (deterministic simulator) or `csv:FILE` (pair,offset_ms,price lines).
    #[arg(long, env = "DROVER_SOURCE", default_value = "sim")]
    pub source: String,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

pub fn node_config(
    controller: &str,
    token: &str,
    pairs: Vec<String>,
    name: Option<String>,
    id: Option<String>,
) -> NodeConfig {
    let mut c = NodeConfig::new(controller, token, pairs);
    c.version = env!("CARGO_PKG_VERSION").into();
    if let Some(id) = id {
        c.id = id;
        c.name = format!("node-{}", c.id.chars().take(8).collect::<String>());
    }
    if let Some(n) = name {
        c.name = n;
    }
    c
}

pub fn source(spec: &str) -> anyhow::Result<Arc<dyn PriceSource>> {
    match spec {
        "sim" => Ok(Arc::new(Simulator::default())),
        s if s.starts_with("csv:") => {
            Ok(Arc::new(CsvTicks::load(std::path::Path::new(&s[4..])).context("cannot use the CSV tick file")?))
        }
        other => anyhow::bail!("unknown --source {other:?}: use sim or csv:FILE"),
    }
}

pub async fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let source = source(&args.source)?;
    let mut config = node_config(&args.admission, args.token.as_deref().unwrap_or(""), args.pairs, args.name, args.id);
    if args.worker {
        let cores =
            args.cores.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)).max(1);
        let mut w = drover_node::worker::WorkerConfig::new(config.id.clone(), cores, args.memory);
        w.labels = args.labels.into_iter().collect();
        w.allow_jobs = args.allow_jobs;
        w.allow_managers = args.managers;
        w.max_output = args.max_output as usize;
        if let Some(dir) = args.job_cache {
            w.cache_dir = dir;
        }
        config.worker = true;
        config.worker_config = Some(w);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        let cert = std::fs::read(cert).with_context(|| format!("cannot read --cert {}", cert.display()))?;
        let key = std::fs::read(key).with_context(|| format!("cannot read --key {}", key.display()))?;
        config.client_identity = Some((cert, key));
    }
    if let Some(ca) = &args.ca {
        config.ca = Some(std::fs::read(ca).with_context(|| format!("cannot read --ca {}", ca.display()))?);
    }
    tracing::info!(id = %config.id, name = %config.name, pairs = ?config.pairs, "node starting");
    match drover_node::run(config, source, Arc::new(NodeStats::default()), shutdown_signal()).await {
        Exit::Shutdown => tracing::info!("shut down by the controller"),
        Exit::Stopped => tracing::info!("stopped"),
        Exit::Evicted => {
            tracing::warn!("evicted: not reconnecting until started again with a valid token");
            return Ok(ExitCode::from(3));
        }
    }
    Ok(ExitCode::SUCCESS)
}
