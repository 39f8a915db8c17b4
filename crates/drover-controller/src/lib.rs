//! The controller shell: the I/O around `drover-core`.
//!
//! ```text
//!  gRPC handlers ──ShellEvent──▶ owner task ──append──▶ journal (group commit, fsync)
//!   (grpc.rs)                   (owner.rs)  ──apply──▶ core
//!                                   │ (ticket, outputs), in order
//!                                   ▼
//!                             releaser task ──awaits each ticket──▶ node / CLI streams
//! ```
//!
//! The gRPC handlers hold no state: each stream gets a task that turns messages into
//! [`ShellEvent`]s for the one owner task. The owner stamps each input with the time,
//! appends it to the journal, applies it to the core at once, and hands the core's
//! outputs, with the journal ticket of the input that caused them, to the releaser.
//! The releaser awaits tickets in order and only then sends: **no output leaves
//! before the input that caused it is durable**. A failed journal write stops the
//! controller. Sessions are registered with the releaser through the same ordered
//! channel, so an output can never overtake the registration of its session.

mod admission;
mod cluster;
mod conns;
mod forward;
mod grpc;
mod http;
mod owner;
mod ratelog;
mod recent;
mod secrets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use cluster::core_seed;
pub use drover_core::{Config as CoreConfig, Policy};
pub use drover_journal::{Faults, FaultyStorage, FsStorage, Storage};
use drover_journal::{FsyncMode, JournalConfig, RecoveryMode};
pub use owner::{Health, Snapshot};
use tokio::net::TcpListener;

/// Settings of a controller process.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Data directory (journal, checkpoints).
    pub data_dir: PathBuf,
    /// Core settings (timeouts, policy, grace).
    pub core: CoreConfig,
    /// Journal fsync policy.
    pub fsync: FsyncMode,
    /// Journal damage policy.
    pub recovery: RecoveryMode,
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// Messages queued per stream before a slow peer is cut off.
    pub stream_queue: usize,
    /// The gRPC address handed to admitted nodes in `auth:ack` (default: the gRPC
    /// listener's own address).
    pub upstream: Option<String>,
    /// The oldest node version admitted (its major must be the controller's).
    pub min_node_version: String,
    /// How long a session ticket stays valid.
    pub ticket_ttl_ms: i64,
    /// Admission handshakes must finish within this.
    pub handshake_deadline_ms: i64,
    /// Failed admissions allowed per address per minute before it is refused at once.
    pub max_failed_admissions: usize,
    /// Most admission connections open at once (each connected node holds one).
    pub max_connections: usize,
    /// Most gRPC connections open at once beyond one per admission slot (CLIs).
    pub max_cli_connections: usize,
    /// Most HTTP connections open at once.
    pub max_http_connections: usize,
    /// Most `/events` (dashboard) subscribers at once.
    pub max_event_subscribers: usize,
    /// A gRPC or HTTP connection must send its first bytes within this.
    pub header_timeout_ms: i64,
    /// A gRPC connection without an open stream, or an HTTP connection without a byte
    /// either way, is closed after this.
    pub idle_timeout_ms: i64,
    /// A gRPC or HTTP connection whose peer does not read for this long is closed.
    pub send_timeout_ms: i64,
    /// TLS identity (certificate chain and key, PEM) for the gRPC and admission ports.
    pub tls: Option<TlsIdentity>,
    /// The cluster CA (PEM) that node client certificates must chain to; enables
    /// certificate credentials at admission (with `tls`).
    pub client_ca: Option<Vec<u8>>,
    /// `/healthz` reports unhealthy when inputs wait this long without one applied.
    pub health_stall_ms: i64,
    /// Journal tuning: segment size, group-commit delay, checkpoint interval, checkpoints kept.
    pub journal: JournalTuning,
    /// Membership of a replicated controller group (`None`: one controller, with its
    /// own journal, as before).
    pub cluster: Option<ClusterSettings>,
}

/// A controller that is one member of a replicated group (`drover controller --member
/// ID --raft ADDR --peers ...`).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// This member's id.
    pub member: u64,
    /// The initial members (this one included, when it founds the group): id → Raft
    /// address. A member not in it waits to be added.
    pub peers: std::collections::BTreeMap<u64, String>,
    /// The secret every member holds (`--cluster-secret-file`).
    pub secret: drover_raft::secret::ClusterSecret,
    /// Mutual TLS on the Raft port under the cluster CA (`--cluster-ca` with
    /// `--tls-cert` and `--tls-key`); `None`: the secret alone.
    pub tls: Option<drover_raft::tls::RaftTls>,
    /// Heartbeats, elections, snapshots.
    pub timing: drover_raft::member::Timing,
}

/// The journal settings an operator may change.
#[derive(Clone, Debug)]
pub struct JournalTuning {
    /// Start a new segment file past this size.
    pub segment_bytes: u64,
    /// Wait up to this long after the first input of a batch for more (0: no wait).
    pub max_batch_delay: std::time::Duration,
    /// Take a checkpoint after this many journal records.
    pub checkpoint_every_records: u64,
    /// Checkpoints kept (older segments are removed).
    pub keep_checkpoints: usize,
    /// Also take a checkpoint after this many journal bytes (whatever the record count).
    pub checkpoint_every_bytes: u64,
}

impl Default for JournalTuning {
    fn default() -> Self {
        let j = JournalConfig::new("");
        JournalTuning {
            segment_bytes: j.segment_bytes,
            max_batch_delay: j.max_batch_delay,
            checkpoint_every_records: j.checkpoint_every_records,
            keep_checkpoints: j.keep_checkpoints,
            checkpoint_every_bytes: 64 << 20,
        }
    }
}

/// A certificate chain and its private key, PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity(<redacted>)")
    }
}

impl TlsIdentity {
    /// A rustls server configuration for the admission port.
    pub(crate) fn rustls(&self, client_ca: Option<&[u8]>) -> Result<tokio_rustls::rustls::ServerConfig, ShellError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: String| ShellError::Config(format!("TLS {what}: {e}"));
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("certificate", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("key", e.to_string()))?;
        let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("versions", e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                // Client certificates are optional (token holders have none); a presented
                // one must chain to the cluster CA.
                let mut roots = tokio_rustls::rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    roots
                        .add(c.map_err(|e| bad("client CA", e.to_string()))?)
                        .map_err(|e| bad("client CA", e.to_string()))?;
                }
                let verifier = tokio_rustls::rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad("client CA", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        builder.with_single_cert(certs, key).map_err(|e| bad("identity", e.to_string()))
    }
}

impl ControllerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ControllerConfig {
            data_dir: data_dir.into(),
            core: CoreConfig { version: env!("CARGO_PKG_VERSION").into(), ..CoreConfig::default() },
            fsync: FsyncMode::Always,
            recovery: RecoveryMode::Strict,
            max_message_bytes: 4 << 20,
            stream_queue: 4096,
            upstream: None,
            min_node_version: "0.1.0".into(),
            ticket_ttl_ms: 10 * 60_000,
            handshake_deadline_ms: 10_000,
            max_failed_admissions: 10,
            max_connections: 20_000,
            max_cli_connections: 256,
            max_http_connections: 256,
            max_event_subscribers: 64,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            send_timeout_ms: 30_000,
            tls: None,
            client_ca: None,
            health_stall_ms: 5_000,
            journal: JournalTuning::default(),
            cluster: None,
        }
    }

    /// The limits of the gRPC (`grpc: true`) or HTTP port.
    fn conn_limits(&self, grpc: bool) -> conns::Limits {
        let ms = |v: i64| std::time::Duration::from_millis(v.max(1) as u64);
        conns::Limits {
            max_connections: if grpc {
                self.max_connections.saturating_add(self.max_cli_connections)
            } else {
                self.max_http_connections
            },
            header_timeout: ms(self.header_timeout_ms),
            idle_timeout: ms(self.idle_timeout_ms),
            send_timeout: ms(self.send_timeout_ms),
            count_streams: grpc,
        }
    }

    fn journal(&self) -> JournalConfig {
        let mut j = JournalConfig::new(self.data_dir.join("journal"));
        j.fsync = self.fsync;
        j.recovery = self.recovery;
        j.segment_bytes = self.journal.segment_bytes;
        j.max_batch_delay = self.journal.max_batch_delay;
        j.checkpoint_every_records = self.journal.checkpoint_every_records;
        j.keep_checkpoints = self.journal.keep_checkpoints;
        j.checkpoint_every_bytes = self.journal.checkpoint_every_bytes;
        j.max_batch_bytes = JOURNAL_ENTRY_BYTES;
        j
    }

    /// Checks that every size a peer controls stays below the internal limits it feeds:
    /// the largest gRPC message, wrapped as a journal input, must fit in one journal
    /// entry with at least half of it to spare.
    pub fn check_limits(&self) -> Result<(), ShellError> {
        let worst = largest_input_bytes(self.max_message_bytes);
        if worst > JOURNAL_ENTRY_BYTES / 2 {
            return Err(ShellError::Config(format!(
                "--max-message-bytes {} is too large: its largest input ({worst} bytes in the journal) must fit twice in one journal entry ({JOURNAL_ENTRY_BYTES} bytes); the most allowed is {}",
                self.max_message_bytes,
                JOURNAL_ENTRY_BYTES / 2 - owner::INPUT_OVERHEAD - drover_proto::MAX_NODE_ID
            )));
        }
        Ok(())
    }
}

/// The most bytes one journal append of the controller may hold (inputs are grouped
/// into appends up to this; one input is never larger, see [`ControllerConfig::check_limits`]).
pub const JOURNAL_ENTRY_BYTES: usize = 16 << 20;

/// An upper bound on the journal bytes of the input made from one gRPC message of
/// `max_message_bytes`: the message's own fields (they are all bounded by its size),
/// the node id the shell adds, and the fixed overhead.
pub fn largest_input_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes + drover_proto::MAX_NODE_ID + owner::INPUT_OVERHEAD
}

/// Why the controller stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The journal could not be opened, replayed or written.
    #[error("journal: {0}")]
    Journal(#[from] drover_journal::JournalError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// Binding or accepting failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A setting is unusable.
    #[error("{0}")]
    Config(String),
    /// The state or an input could not be encoded for the journal.
    #[error("encoding for the journal: {0}")]
    Encode(#[from] drover_journal::EncodeError),
    /// Another process holds the data directory.
    #[error(transparent)]
    Lock(#[from] drover_journal::LockError),
    /// The cluster member failed (its Raft engine, its log, its snapshot).
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Where the controller listens.
pub struct Listeners {
    /// gRPC (nodes and CLIs).
    pub grpc: TcpListener,
    /// Admission (seed 3 text packets). Without it nodes cannot be admitted.
    pub admission: Option<TcpListener>,
    /// HTTP: `/metrics`, `/healthz`, `/readyz`.
    pub http: Option<TcpListener>,
    /// The Raft port (a cluster member only).
    pub raft: Option<TcpListener>,
}

/// File in the data directory holding the ticket signing key.
pub const TICKET_KEY_FILE: &str = "ticket.key";
/// File in the data directory holding the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Writes a secret file readable by its owner only.
pub(crate) fn write_secret(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The 32-byte key in `dir/name`, made (from the OS's secure randomness, mode 0600) at
/// first start.
fn key_file(dir: &std::path::Path, name: &str) -> Result<[u8; 32], ShellError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            bytes.try_into().map_err(|_| ShellError::Config(format!("{} must hold exactly 32 bytes", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| ShellError::Config(format!("no secure randomness: {e}")))?;
            write_secret(&path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e.into()),
    }
}

/// A running controller: its address and a way to watch its health.
pub struct Running {
    /// The gRPC address it listens on.
    pub addr: SocketAddr,
    /// The admission address, if it serves admission.
    pub admission: Option<SocketAddr>,
    /// The HTTP address (dashboard, metrics), if it serves HTTP.
    pub http: Option<SocketAddr>,
    /// Health and progress, shared with the HTTP endpoint.
    pub health: Arc<Health>,
}

/// Runs a controller on `listener` until `shutdown` resolves, then stops gracefully
/// (final checkpoint). `on_ready` is called once recovery is done and it serves. The
/// journal lives in `config.data_dir` on `storage` (`FsStorage` in production; a test
/// passes the journal's fault-injecting storage).
pub async fn run(
    config: ControllerConfig,
    storage: Arc<dyn drover_journal::Storage>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Running) + Send,
) -> Result<(), ShellError> {
    let listener = listeners.grpc;
    let addr = listener.local_addr()?;
    config.check_limits()?;
    // Before anything in the directory is read or written: a second process on the same
    // data directory would trim the segments this one appends to.
    let _lock = tokio::task::block_in_place(|| drover_journal::DirLock::acquire(&config.data_dir))?;
    // A cluster's keys are the cluster's: every member derives the same ones from the
    // cluster secret, so a ticket or a sealed task secret made by one leader is good
    // on the next.
    let (ticket_key, seal_key) = match &config.cluster {
        Some(c) => (c.secret.derive("ticket signing key"), c.secret.derive("task secret sealing key")),
        None => (key_file(&config.data_dir, TICKET_KEY_FILE)?, key_file(&config.data_dir, secrets::SECRET_KEY_FILE)?),
    };
    let key = drover_admission::ticket::TicketKey::from_bytes(ticket_key);
    let sealer = Arc::new(secrets::Sealer::new(seal_key));
    let version = drover_admission::version::Version::parse(&config.core.version)
        .ok_or_else(|| ShellError::Config(format!("controller version {:?} is not x.y.z", config.core.version)))?;
    let min_node = drover_admission::version::Version::parse(&config.min_node_version)
        .ok_or_else(|| ShellError::Config(format!("min node version {:?} is not x.y.z", config.min_node_version)))?;
    let mut cluster_handle = None;
    let (events_tx, events_rx) = owner::Inbox::new(65_536);
    // One controller always leads; a member learns who does from its group.
    let (_one_leader, mut leader) = tokio::sync::watch::channel(cluster::Leader::Me);
    let mut forwarder = None;
    let (backend, replay_us, replayed) = match (&config.cluster, listeners.raft) {
        (None, _) => {
            let (core, journal, replay_us, replayed) = open_local(&config, storage).await?;
            (owner::Backend::Local { core: Box::new(core), journal }, replay_us, replayed)
        }
        (Some(_), None) => return Err(ShellError::Config("a cluster member needs its Raft port (--raft)".into())),
        (Some(c), Some(raft_listener)) => {
            // What this member tells the others it serves (gRPC as nodes should reach it).
            let mut about = std::collections::BTreeMap::new();
            about.insert("raft".to_owned(), raft_listener.local_addr()?.to_string());
            about.insert("grpc".to_owned(), config.upstream.clone().unwrap_or_else(|| addr.to_string()));
            if let Some(h) = &listeners.http {
                about.insert("http".to_owned(), h.local_addr()?.to_string());
            }
            if let Some(a) = &listeners.admission {
                about.insert("admission".to_owned(), a.local_addr()?.to_string());
            }
            let started = cluster::start(&config, c, raft_listener, storage, about, events_tx.clone()).await?;
            cluster_handle = Some(started.handle);
            leader = started.leader;
            forwarder = Some(started.forwarder);
            (started.backend, 0, 0)
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health = Arc::new(Health::default());
    let logs = Arc::new(ratelog::LogLimiter::default());
    let service =
        grpc::Service::new(events_tx.clone(), config.stream_queue, key.clone(), logs.clone(), config.max_message_bytes);
    let admission_addr = match listeners.admission {
        Some(l) => {
            let a = l.local_addr()?;
            let settings = admission::Settings {
                upstream: config.upstream.clone().unwrap_or_else(|| addr.to_string()),
                upstream_port_on_local_ip: (config.upstream.is_none() && addr.ip().is_unspecified())
                    .then_some(addr.port()),
                policy: drover_admission::version::VersionPolicy { controller: version, min_node },
                handshake_deadline_ms: config.handshake_deadline_ms,
                ticket_ttl_ms: config.ticket_ttl_ms,
                max_connections: config.max_connections,
                leader: leader.clone(),
                forwarder: forwarder.clone(),
            };
            let tls = match &config.tls {
                Some(id) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(id.rustls(config.client_ca.as_deref())?))),
                None => None,
            };
            tokio::spawn(admission::serve(
                l,
                settings,
                key.clone(),
                tls,
                events_tx.clone(),
                stop_rx.clone(),
                logs.clone(),
            ));
            tracing::info!(addr = %a, "serving admission");
            Some(a)
        }
        None => None,
    };
    let mut owner = owner::Owner::new(config.clone(), backend, health.clone(), sealer);
    owner.set_replay(replay_us, replayed);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let http_addr = listeners.http.as_ref().map(|h| h.local_addr()).transpose()?;
    if let Some(h) = listeners.http {
        tracing::info!(addr = %h.local_addr()?, "serving HTTP (/metrics, /healthz, /readyz)");
        let tls = match &config.tls {
            Some(id) => {
                let mut server = id.rustls(None)?;
                server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
            }
            None => None,
        };
        let state = http::AppState {
            snapshot: owner.snapshots(),
            views: owner.views(),
            health: health.clone(),
            events: events_tx.clone(),
            sessions: service.sessions(),
            stop: stop_rx.clone(),
            stall_ms: config.health_stall_ms,
            recent: owner.recent(),
            journal_dir: config.journal().dir,
            started_ms: now_ms(),
            subscribers: Arc::new(tokio::sync::Semaphore::new(config.max_event_subscribers.max(1))),
            cluster: cluster_handle.clone(),
        };
        tokio::spawn(http::serve(h, state, tls, config.conn_limits(false), logs.clone()));
    }
    let owner_task = tokio::spawn(owner.run(events_rx, stop_rx.clone(), ready_tx));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(drover_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let grpc = drover_proto::v1::controller_server::ControllerServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    tracing::info!(%addr, "serving gRPC");
    let mut server_stop = stop_rx.clone();
    // HTTP/2 limits: streams per connection, and pings that find dead peers (a live
    // peer's answers do not keep a connection without streams open: see `conns`).
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_GRPC_STREAMS)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .http2_max_header_list_size(64 << 10);
    if let Some(id) = &config.tls {
        let identity = tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| ShellError::Config(format!("TLS: {e}")))?;
    }
    // `Server::builder().tcp_nodelay` only applies to listeners tonic binds itself, not
    // to an incoming stream like this one: set it on each accepted connection, or small
    // writes (a failover's assignment) can wait for a delayed ACK (measured: 40 ms tail).
    // Connections are accepted here, not by tonic: capped, with backoff when accepting
    // fails, and each behind the timeouts of `conns::Guarded`.
    let limits = config.conn_limits(true);
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<std::io::Result<conns::Guarded<tokio::net::TcpStream>>>(64);
    {
        let (logs, mut stop) = (logs.clone(), stop_rx.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        tokio::spawn(async move {
            loop {
                let (tcp, peer, permit) = tokio::select! {
                    a = conns::accept(&listener, &slots, &logs, "grpc", limits.max_connections) => a,
                    _ = stop.changed() => return,
                };
                let _ = tcp.set_nodelay(true);
                if conn_tx.send(Ok(conns::Guarded::new(tcp, peer, permit, limits))).await.is_err() {
                    return;
                }
            }
        });
    }
    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let server = builder.add_service(grpc).add_service(reflection).serve_with_incoming_shutdown(incoming, async move {
        let _ = server_stop.wait_for(|s| *s).await;
    });
    let server = tokio::spawn(server);
    let mut owner_task = owner_task;
    // Ready once recovery, the start input and the first admin token are done.
    tokio::select! {
        _ = ready_rx => on_ready(Running { addr, admission: admission_addr, http: http_addr, health: health.clone() }),
        r = &mut owner_task => {
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(SERVER_DRAIN, server).await;
            return match r {
                Ok(r) => r,
                Err(e) => Err(ShellError::Io(std::io::Error::other(format!("owner task failed: {e}")))),
            };
        }
    }
    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            // The owner finishes what is queued, flushes, and writes a final checkpoint.
            owner_task.await
        }
        r = &mut owner_task => {
            // The owner only ends on its own after a fatal journal error.
            let _ = stop_tx.send(true);
            r
        }
    };
    // Streams still open (nodes that have not noticed yet) end with the process: a
    // stopping controller, above all one whose journal failed, does not wait for them.
    let _ = tokio::time::timeout(SERVER_DRAIN, server).await;
    match result {
        Ok(r) => r,
        Err(e) => Err(ShellError::Io(std::io::Error::other(format!("owner task failed: {e}")))),
    }
}

/// Opens the local journal of a controller on its own and replays it: the core, the
/// journal, how long recovery took (µs) and how many inputs it replayed.
async fn open_local(
    config: &ControllerConfig,
    storage: Arc<dyn drover_journal::Storage>,
) -> Result<(drover_core::Controller, drover_journal::Journal, u64, u64), ShellError> {
    let (journal, recovery) = tokio::task::block_in_place(|| drover_journal::Journal::open(config.journal(), storage))?;
    let started = std::time::Instant::now();
    let (core, stats) = drover_journal::replay(&recovery, || {
        let mut core = config.core.clone();
        core.seed = fresh_seed();
        drover_core::Controller::new(core)
    })?;
    tracing::info!(
        dir = %config.data_dir.display(),
        inputs = stats.inputs,
        checkpoint = recovery.checkpoint.is_some(),
        torn_tail = recovery.report.torn_tail.is_some(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let replay_us = started.elapsed().as_micros() as u64;
    // A directory of an earlier format is migrated at once: a checkpoint in this
    // release's format covers everything recovered, so from here on only this release
    // (or a later one) reads it, and an older binary refuses it instead of misreading.
    // (Replay restored the checkpoint, so its format was read: `ok()` loses nothing.)
    let found = recovery.checkpoint.as_deref().and_then(|b| drover_core::checkpoint_format(b).ok());
    drop(recovery);
    if let Some(old) = found.filter(|&f| f < drover_core::CHECKPOINT_FORMAT) {
        use drover_journal::StateMachine;
        let covered = journal.checkpoint(core.checkpoint()?).await?;
        tracing::info!(
            from = old,
            to = drover_core::CHECKPOINT_FORMAT,
            covered,
            "data directory migrated: checkpoint written in this release's format"
        );
    }
    Ok((core, journal, replay_us, stats.inputs))
}

/// Streams one gRPC connection may have open at once (a node uses one, a CLI one per
/// command it runs).
const MAX_GRPC_STREAMS: u32 = 128;

/// How long a stopping controller lets the gRPC server finish open streams.
const SERVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The wall clock in Unix milliseconds: the time the shell stamps on inputs and
/// compares tickets and deadlines with.
pub(crate) use drover_wire::unix_ms as now_ms;

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}
