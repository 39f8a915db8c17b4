//! The node agent.
//!
//! A node knows which pairs its upstream can serve. It opens `NodeCommandStream`, sends
//! `NodeKnownCurrenciesV1Notify` first, then heartbeats, and streams prices for exactly
//! the pairs named by the last `NodeStreamModifyStateV1Req`, each update stamped with
//! the pair's epoch. It answers `NodeStatusV1Req`, `NodeShutdownV1Req` (reply, then
//! exit) and anything else with `UnknownCommandV1Notify`. When the stream ends it
//! reconnects forever, with capped, jittered exponential backoff. It keeps no state
//! across restarts.

pub mod exec;
pub mod fence;
pub mod source;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_admission::client::{NodeAction, NodeConn};
use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Payload, v1};
use drover_wire::admission::PacketDecoder;
use source::PriceSource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Keepalive interval on the admission control channel (`conn:alive`).
const ALIVE_EVERY: Duration = Duration::from_secs(5);

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The controllers' admission addresses, comma-separated, e.g. `127.0.0.1:7401` or
    /// `a:7401,b:7401,c:7401` (every member of a cluster admits). The gRPC address to
    /// use (the leader's) comes back in `auth:ack`; admission tries the addresses in
    /// turn, starting after the last one that failed.
    pub controller: String,
    /// The join token (`drover token create --role join`).
    pub token: String,
    /// CA certificate (PEM) to verify the controller's TLS certificate; `None`: plain TCP.
    pub ca: Option<Vec<u8>>,
    /// A client certificate and key (PEM) signed by the cluster CA and naming this
    /// node's id: presented in the admission TLS handshake, and sent as the credential
    /// when `token` is empty.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// This node's uuid.
    pub id: String,
    /// A human name.
    pub name: String,
    /// The pairs its upstream serves.
    pub pairs: Vec<String>,
    /// The version it reports.
    pub version: String,
    /// Whether it is a worker.
    pub worker: bool,
    /// The worker's settings (with `worker`).
    pub worker_config: Option<worker::WorkerConfig>,
    /// Keepalive interval (must be well under the controller's node timeout).
    pub heartbeat: Duration,
    /// How often it polls upstream for each streamed pair.
    pub poll: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

impl NodeConfig {
    /// Defaults for a node of `pairs` talking to `controller`.
    pub fn new(controller: impl Into<String>, token: impl Into<String>, pairs: Vec<String>) -> Self {
        let id = random_id();
        NodeConfig {
            controller: controller.into(),
            token: token.into(),
            ca: None,
            client_identity: None,
            name: format!("node-{}", &id[..8]),
            id,
            pairs,
            version: env!("CARGO_PKG_VERSION").into(),
            worker: false,
            worker_config: None,
            heartbeat: Duration::from_millis(500),
            poll: Duration::from_millis(100),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// A fresh random node uuid (32 hex digits).
pub fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    for i in 0..2u8 {
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u8(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Why the node stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The controller sent `NodeShutdownV1Req`.
    Shutdown,
    /// The caller's shutdown signal fired.
    Stopped,
    /// The controller evicted the node (`conn:close` on the control channel).
    Evicted,
}

/// What the node reports about itself (for tests and the demo).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Price updates sent.
    pub updates_sent: std::sync::atomic::AtomicU64,
    /// Sessions opened.
    pub sessions: std::sync::atomic::AtomicU64,
}

enum End {
    Shutdown,
    Evicted(String),
    Closed(String),
    /// Admission refused the credential, or the address is not an admission port: a
    /// configuration problem that retrying fast will not fix.
    Refused(String),
}

/// Backoff after a refused credential: from this, doubling up to [`REFUSED_BACKOFF_MAX`].
const REFUSED_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between attempts with a refused credential.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(60);

use drover_wire::unix_ms as now_ms;

/// Runs a node until the controller shuts it down or `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    source: Arc<dyn PriceSource>,
    stats: Arc<NodeStats>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Exit {
    tokio::pin!(shutdown);
    let mut tasks = config.worker_config.clone().filter(|_| config.worker).map(Tasks::new);
    let mut backoff = config.backoff_min;
    let mut refused_backoff = REFUSED_BACKOFF_MIN;
    let mut last_refusal: Option<String> = None;
    let mut jitter = drover_proto_free_rng(&config.id);
    let mut fence = fence::Fence::default();
    let mut next_controller = 0;
    loop {
        let started = Instant::now();
        let end = tokio::select! {
            _ = &mut shutdown => return Exit::Stopped,
            end = session(&config, &source, &stats, &mut tasks, &mut fence, &mut next_controller) => end,
        };
        match end {
            End::Shutdown => return Exit::Shutdown,
            End::Evicted(reason) => {
                tracing::warn!(node = %config.id, %reason, "evicted by the controller; stopping");
                return Exit::Evicted;
            }
            End::Refused(why) => {
                // Said once at WARN (and again only if the reason changes), then retried
                // with a growing wait: an operator may fix the token or the address.
                let wait = refused_backoff;
                if last_refusal.as_deref() != Some(why.as_str()) {
                    tracing::warn!(node = %config.id, reason = %why, retry_in_ms = wait.as_millis() as u64,
                        "not admitted; retrying with backoff (up to 60 s) until the credential or address is fixed");
                    last_refusal = Some(why);
                } else {
                    tracing::debug!(node = %config.id, reason = %why, retry_in_ms = wait.as_millis() as u64, "not admitted");
                }
                tokio::select! {
                    _ = &mut shutdown => return Exit::Stopped,
                    _ = tokio::time::sleep(wait) => {}
                }
                refused_backoff = (refused_backoff * 2).min(REFUSED_BACKOFF_MAX);
            }
            End::Closed(why) => {
                if last_refusal.take().is_some() {
                    refused_backoff = REFUSED_BACKOFF_MIN;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = config.backoff_min;
                }
                // Full jitter in [backoff/2, backoff].
                let ms = backoff.as_millis().max(1) as u64;
                let wait = Duration::from_millis(ms / 2 + jitter() % (ms / 2 + 1));
                tracing::info!(node = %config.id, reason = %why, retry_in_ms = wait.as_millis() as u64, "disconnected");
                tokio::select! {
                    _ = &mut shutdown => return Exit::Stopped,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(config.backoff_max);
            }
        }
    }
}

fn drover_proto_free_rng(seed: &str) -> impl FnMut() -> u64 {
    let mut x =
        seed.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

struct Streaming {
    epoch: u64,
    seq: u64,
    last_upstream_ms: i64,
}

/// A byte stream: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TLS client configuration trusting the CA certificates in `ca` (PEM).
pub fn tls_client(ca: &[u8], client: Option<&(Vec<u8>, Vec<u8>)>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.map_err(|e| format!("CA file: {e}"))?).map_err(|e| format!("CA certificate: {e}"))?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("client key: {e}"))?;
            config.with_client_auth_cert(chain, key).map_err(|e| format!("client identity: {e}"))?
        }
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens a gRPC channel to `upstream`, over TLS verified against `ca` if given.
pub async fn grpc_channel(upstream: &str, ca: Option<&[u8]>) -> Result<tonic::transport::Channel, String> {
    let host = upstream.trim_start_matches("http://").trim_start_matches("https://");
    let url = format!("{}://{host}", if ca.is_some() { "https" } else { "http" });
    // HTTP/2 pings find a controller that went silent (a partition, a host that
    // vanished) within a few seconds, where TCP alone would wait for minutes; the node
    // then moves to the leader its control channel names, or passes admission again.
    let mut endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(STREAM_PING_EVERY)
        .keep_alive_timeout(STREAM_PING_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(ca) = ca {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()))
}

/// An open admission connection: the control channel after the handshake.
struct Control {
    stream: Box<dyn Io>,
    decoder: PacketDecoder,
    conn: NodeConn,
}

/// The admission addresses in `config.controller` (comma-separated).
pub fn admission_addresses(config: &NodeConfig) -> Vec<String> {
    config
        .controller
        .split(',')
        .map(|a| a.trim().trim_start_matches("http://").to_owned())
        .filter(|a| !a.is_empty())
        .collect()
}

/// Passes admission at one of the controllers, trying each in turn from `*next` (a
/// controller that is down or cannot decide is passed over; a refused credential ends
/// the round, since every controller judges it alike). `*next` is left at the one that
/// admitted, or after the last one tried.
async fn admit_any(config: &NodeConfig, next: &mut usize) -> Result<(String, String, ControlChannel), End> {
    let addrs = admission_addresses(config);
    if addrs.is_empty() {
        return Err(End::Refused("no controller address given".into()));
    }
    let mut failures = Vec::new();
    let mut refused = false;
    for _ in 0..addrs.len() {
        let addr = &addrs[*next % addrs.len()];
        match admit(config, addr).await {
            Ok(admitted) => return Ok(admitted),
            // The credential was refused: every controller judges it alike.
            Err(End::Refused(why)) if why.starts_with(DENIED) => return Err(End::Refused(why)),
            // Down, unreachable, not deciding now, or not an admission port: the next.
            Err(End::Closed(why)) => failures.push(why),
            Err(End::Refused(why)) => {
                refused = true;
                failures.push(why);
            }
            Err(end) => return Err(end),
        }
        *next = (*next + 1) % addrs.len();
    }
    let why = failures.join("; ");
    Err(if refused { End::Refused(why) } else { End::Closed(why) })
}

/// How a refused credential's reason begins.
const DENIED: &str = "admission refused: ";

/// How long connecting to an admission port may take (an unreachable controller).
const ADMISSION_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Passes admission at `addr`: returns the upstream, the ticket and the control channel.
async fn admit(config: &NodeConfig, addr: &str) -> Result<(String, String, ControlChannel), End> {
    let addr = addr.to_owned();
    let tcp = tokio::time::timeout(ADMISSION_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| End::Closed(format!("admission connect {addr}: no answer within 2 s")))?
        .map_err(|e| End::Closed(format!("admission connect {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Io> = match &config.ca {
        None => Box::new(tcp),
        Some(ca) => {
            let connector = tls_client(ca, config.client_identity.as_ref()).map_err(End::Closed)?;
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(['[', ']']).to_owned();
            let name = rustls_pki_types::ServerName::try_from(host)
                .map_err(|e| End::Closed(format!("admission host: {e}")))?;
            Box::new(connector.connect(name, tcp).await.map_err(|e| End::Closed(format!("admission TLS: {e}")))?)
        }
    };
    // The credential: the join token, or else the client certificate itself.
    let credential = match (&config.token, &config.client_identity) {
        (t, Some((cert, _))) if t.is_empty() => String::from_utf8_lossy(cert).into_owned(),
        (t, _) => t.clone(),
    };
    let mut conn = NodeConn::new(config.id.clone(), config.version.clone(), credential);
    let mut decoder = PacketDecoder::new();
    let mut pending = conn.start();
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        for a in pending.drain(..) {
            match a {
                NodeAction::Send(p) => {
                    stream.write_all(&p.to_bytes()).await.map_err(|e| End::Closed(format!("admission write: {e}")))?;
                    stream.flush().await.map_err(|e| End::Closed(format!("admission write: {e}")))?;
                }
                NodeAction::Admitted { upstream, ticket } => {
                    let control = Control { stream, decoder, conn };
                    let channel =
                        ControlChannel { control, buf: vec![0u8; 4096], alive: tokio::time::interval(ALIVE_EVERY) };
                    return Ok((upstream, ticket, channel));
                }
                NodeAction::Denied { reason } => return Err(End::Refused(format!("{DENIED}{reason}"))),
                NodeAction::Closed { reason } | NodeAction::Moved { upstream: reason, .. } => {
                    return Err(End::Closed(format!("admission closed: {reason}")));
                }
            }
        }
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Err(End::Closed("admission: controller closed the connection".into())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(End::Closed(format!("admission read: {e}{}", WRONG_PORT_HINT))),
            Err(_) => return Err(End::Closed("admission: no answer within 10 s".into())),
        };
        if let Some(kind) = wrong_port(&buf[..n]) {
            return Err(End::Refused(format!(
                "{addr} is {kind}, not an admission port: nodes connect to the controller's admission port (its --admission, default 127.0.0.1:7401), not its gRPC port (--listen, 7400) or HTTP port (--http, 7480)"
            )));
        }
        if let Err(e) = decoder.feed(&buf[..n]) {
            pending.extend(conn.on_packet(Err(e)));
        }
        while let Some(p) = decoder.next_packet() {
            pending.extend(conn.on_packet(p));
        }
    }
}

/// Added to a failed admission read: the usual cause is a node pointed at the wrong port.
const WRONG_PORT_HINT: &str = " (if this repeats: is this the controller's admission port, default 7401? the gRPC port 7400 resets admission packets)";

/// What kind of server sent `first` if it is not an admission server: an HTTP/2 server
/// (the gRPC port) opens with a SETTINGS frame, an HTTP/1 server answers `HTTP/1.x`.
pub fn wrong_port(first: &[u8]) -> Option<&'static str> {
    if first.starts_with(b"HTTP/") {
        return Some("an HTTP server (the controller's HTTP port?)");
    }
    // A frame header: 24-bit length, type 4 (SETTINGS), flags, stream 0.
    if first.len() >= 9 && first[3] == 4 && first[5..9] == [0, 0, 0, 0] {
        return Some("an HTTP/2 server (the controller's gRPC port?)");
    }
    None
}

/// The control channel of an admitted session: the node's session loop holds it, and
/// so does a tool that simulates many nodes (the fleet bench).
pub struct ControlChannel {
    control: Control,
    buf: Vec<u8>,
    alive: tokio::time::Interval,
}

/// How a control channel ended.
#[derive(Debug)]
pub enum ControlEnd {
    /// `conn:close` from the controller (an eviction), with its reason.
    Closed(String),
    /// A new `auth:ack` named another upstream (the new leader), with a new ticket.
    Moved {
        /// The gRPC address to stream to now.
        upstream: String,
        /// The ticket to open that stream with.
        ticket: String,
    },
    /// The connection ended or broke.
    Lost(String),
}

impl std::fmt::Display for ControlEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlEnd::Closed(reason) => write!(f, "closed by the controller: {reason}"),
            ControlEnd::Moved { upstream, .. } => write!(f, "moved to {upstream}"),
            ControlEnd::Lost(why) => write!(f, "control channel lost: {why}"),
        }
    }
}

impl ControlChannel {
    /// Answers the controller's keepalives until the channel ends, and says how. Meant
    /// to be polled in a `select!` loop: the state lives in `self`, so a dropped call
    /// loses nothing (short of a keepalive cut mid-write, which the controller would
    /// see as an end).
    pub async fn hold(&mut self) -> ControlEnd {
        let ControlChannel { control, buf, alive } = self;
        loop {
            tokio::select! {
                n = control.stream.read(buf) => {
                    let n = match n {
                        Ok(0) => return ControlEnd::Lost("closed by the controller".into()),
                        Ok(n) => n,
                        Err(e) => return ControlEnd::Lost(e.to_string()),
                    };
                    // Packets decoded before a bad one still count.
                    let fed = control.decoder.feed(&buf[..n]);
                    while let Some(p) = control.decoder.next_packet() {
                        for a in control.conn.on_packet(p) {
                            match a {
                                NodeAction::Closed { reason } => return ControlEnd::Closed(reason),
                                NodeAction::Moved { upstream, ticket } => return ControlEnd::Moved { upstream, ticket },
                                _ => {}
                            }
                        }
                    }
                    if let Err(e) = fed {
                        return ControlEnd::Lost(e.to_string());
                    }
                }
                _ = alive.tick() => {
                    if let Some(p) = control.conn.alive()
                        && let Err(e) = control.stream.write_all(&p.to_bytes()).await {
                        return ControlEnd::Lost(e.to_string());
                    }
                }
            }
        }
    }

    /// The stream ended: if an eviction (or a move to a new leader) is on its way over
    /// the control channel (the two connections race), it wins; otherwise the stream's
    /// end is just a disconnect.
    async fn evicted_or(&mut self, open: &mut bool, why: String) -> StreamEnd {
        if !*open {
            return StreamEnd::Lost(why);
        }
        let ControlChannel { control, buf, .. } = self;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            let n = match tokio::time::timeout_at(deadline, control.stream.read(buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                Ok(_) => {
                    *open = false;
                    return StreamEnd::Lost(why);
                }
                Err(_) => return StreamEnd::Lost(why),
            };
            if control.decoder.feed(&buf[..n]).is_err() {
                *open = false;
                return StreamEnd::Lost(why);
            }
            while let Some(p) = control.decoder.next_packet() {
                for a in control.conn.on_packet(p) {
                    match a {
                        NodeAction::Closed { reason } => return StreamEnd::Over(End::Evicted(reason)),
                        NodeAction::Moved { upstream, ticket } => return StreamEnd::Moved { upstream, ticket },
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Passes admission once for `config` and returns the gRPC address, the session ticket
/// and the open control channel (for tools that simulate many nodes).
pub async fn admit_session(config: &NodeConfig) -> Result<(String, String, ControlChannel), String> {
    match admit_any(config, &mut 0).await {
        Ok(admitted) => Ok(admitted),
        Err(End::Closed(why) | End::Evicted(why) | End::Refused(why)) => Err(why),
        Err(End::Shutdown) => Err("shut down during admission".into()),
    }
}

/// What a running task tells the worker loop.
enum TaskEvent {
    Started(v1::TaskId, i64),
    Finished(v1::TaskId, Result<v1::TaskOutcome, exec::Failure>),
}

/// The worker's state and its running tasks; outlives sessions.
struct Tasks {
    worker: worker::Worker,
    config: worker::WorkerConfig,
    events_tx: mpsc::UnboundedSender<TaskEvent>,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    kills: BTreeMap<(String, u32), tokio::sync::oneshot::Sender<()>>,
}

impl Tasks {
    fn new(config: worker::WorkerConfig) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        Tasks { worker: worker::Worker::new(config.clone()), config, events_tx, events, kills: BTreeMap::new() }
    }

    /// Carries out the worker's actions; returns the messages to send.
    fn act(&mut self, actions: Vec<worker::Action>) -> Vec<(String, Payload)> {
        let mut send = Vec::new();
        for a in actions {
            match a {
                worker::Action::Send { request_id, payload } => send.push((request_id, payload)),
                worker::Action::Kill(id) => {
                    if let Some(k) = self.kills.remove(&(id.id.clone(), id.attempt)) {
                        let _ = k.send(());
                    }
                }
                worker::Action::Start(spec) => {
                    let Some(id) = spec.task.clone() else { continue };
                    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
                    self.kills.insert((id.id.clone(), id.attempt), kill_tx);
                    let events = self.events_tx.clone();
                    let (cache, max_output) = (self.config.cache_dir.clone(), self.config.max_output);
                    tracing::info!(task = %id.id, attempt = id.attempt, job = %spec.job_addr, "starting task");
                    tokio::spawn(async move {
                        let started = {
                            let (events, id) = (events.clone(), id.clone());
                            move |ms| {
                                let _ = events.send(TaskEvent::Started(id, ms));
                            }
                        };
                        let result = exec::run(&spec, &cache, max_output, kill_rx, started).await;
                        match &result {
                            Ok(o) => {
                                tracing::info!(task = %id.id, attempt = id.attempt, exit_code = o.exit_code, "task finished")
                            }
                            Err((kind, why)) => {
                                tracing::warn!(task = %id.id, attempt = id.attempt, ?kind, %why, "task failed")
                            }
                        }
                        let _ = events.send(TaskEvent::Finished(id, result));
                    });
                }
            }
        }
        send
    }
}

/// Whether a payload belongs to seed 2 (the worker handles it).
fn is_task_plane(p: &Payload) -> bool {
    matches!(
        p,
        Payload::NodeTypeV1Req(_)
            | Payload::NodeTypeV1Reply(_)
            | Payload::ManagerV1Req(_)
            | Payload::ManagerV1Reply(_)
            | Payload::ManagerByeV1Req(_)
            | Payload::ManagerPingV1Req(_)
            | Payload::ManagerPongV1Reply(_)
            | Payload::NotMineV1Reply(_)
            | Payload::AckV1Reply(_)
            | Payload::TasksExecuteV1Req(_)
            | Payload::TasksRefusedV1Reply(_)
            | Payload::TasksPingV1Req(_)
            | Payload::TasksPongV1Reply(_)
            | Payload::TasksAbortV1Req(_)
    )
}

/// How long a node whose stream ended, its control channel still open, waits for
/// the controller holding that channel to name a new leader (or for its stream to
/// open again) before it passes admission afresh, possibly at another controller.
/// A group elects within about a second of losing its leader, and the controller's
/// rejoin grace (5 s by default) must still be running when the node is back.
const REJOIN_WAIT: Duration = Duration::from_secs(2);

/// HTTP/2 ping interval on the command stream's connection.
const STREAM_PING_EVERY: Duration = Duration::from_secs(1);
/// A ping unanswered this long ends the stream's connection.
const STREAM_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How a stream ended, as the session sees it.
enum StreamEnd {
    /// The session is over: shut down, evicted, or nothing left to hold on to.
    Over(End),
    /// The controller holding the control channel named a new upstream (a new leader).
    Moved { upstream: String, ticket: String },
    /// The stream ended or could not open (the control channel may still be open).
    Lost(String),
}

/// What a session keeps from one stream to the next: the pairs it streams (under their
/// epochs, so a move to a new leader that kept the assignments costs no gap) and
/// whether its control channel is still open.
struct Held {
    streaming: BTreeMap<String, Streaming>,
    control_open: bool,
    started: Instant,
}

/// One admitted session: admission at one of the controllers, then streams to the
/// upstream it names, moving to each new upstream a controller names (a leader change)
/// without passing admission again.
async fn session(
    config: &NodeConfig,
    source: &Arc<dyn PriceSource>,
    stats: &NodeStats,
    tasks: &mut Option<Tasks>,
    fence: &mut fence::Fence,
    next_controller: &mut usize,
) -> End {
    let (mut upstream, mut ticket, mut control) = match admit_any(config, next_controller).await {
        Ok(a) => a,
        Err(end) => return end,
    };
    let mut held = Held { streaming: BTreeMap::new(), control_open: true, started: Instant::now() };
    let seed = format!("{}/stream", config.id);
    let mut jitter = drover_proto_free_rng(&seed);
    let mut lost_since: Option<Instant> = None;
    loop {
        let began = Instant::now();
        let end = stream(config, source, stats, tasks, fence, &upstream, &ticket, &mut control, &mut held).await;
        if began.elapsed() >= REJOIN_WAIT {
            // That stream lived: a later loss starts a new wait. (One that opens and
            // dies at once, again and again, does not keep the node from moving on.)
            lost_since = None;
        }
        let why = match end {
            StreamEnd::Over(end) => return end,
            StreamEnd::Moved { upstream: to, ticket: t } => {
                tracing::info!(node = %config.id, from = %upstream, to = %to, "leadership moved: streaming to the new leader");
                (upstream, ticket) = (to, t);
                lost_since = None;
                continue;
            }
            StreamEnd::Lost(why) => why,
        };
        if !held.control_open {
            return End::Closed(why);
        }
        let since = *lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= REJOIN_WAIT {
            return End::Closed(format!("{why}; no leader named within {} s", REJOIN_WAIT.as_secs()));
        }
        tracing::info!(node = %config.id, %upstream, reason = %why, "stream lost; waiting for a new leader or retrying");
        let wait = Duration::from_millis(100 + jitter() % 200);
        tokio::select! {
            end = control.hold() => match end {
                ControlEnd::Closed(reason) => return End::Evicted(reason),
                ControlEnd::Moved { upstream: to, ticket: t } => {
                    tracing::info!(node = %config.id, from = %upstream, to = %to, "leadership moved: streaming to the new leader");
                    (upstream, ticket) = (to, t);
                    lost_since = None;
                }
                ControlEnd::Lost(_) => return End::Closed(why),
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One `NodeCommandStream` to `upstream`, until it ends or the node is moved.
#[allow(clippy::too_many_arguments)]
async fn stream(
    config: &NodeConfig,
    source: &Arc<dyn PriceSource>,
    stats: &NodeStats,
    tasks: &mut Option<Tasks>,
    fence: &mut fence::Fence,
    upstream: &str,
    ticket: &str,
    control: &mut ControlChannel,
    held: &mut Held,
) -> StreamEnd {
    let mut client = match grpc_channel(upstream, config.ca.as_deref()).await {
        Ok(c) => ControllerClient::new(c).max_decoding_message_size(4 << 20),
        Err(e) => return StreamEnd::Lost(format!("connect {upstream}: {e}")),
    };
    let (tx, rx) = mpsc::channel::<v1::StreamFromNode>(1024);
    let node = config.id.clone();
    let msg = |response: Payload, request_id: String, from_uuid: Option<String>| v1::StreamFromNode {
        node_uuid: node.clone(),
        from_uuid,
        response: Some(response.to_any()),
        request_id,
    };
    let hello = v1::NodeKnownCurrenciesV1Notify {
        pairs: config.pairs.clone(),
        name: config.name.clone(),
        version: config.version.clone(),
        worker: config.worker,
    };
    if tx.send(msg(hello.into(), String::new(), None)).await.is_err() {
        return StreamEnd::Lost("stream closed".into());
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    match tonic::metadata::MetadataValue::try_from(format!("Bearer {ticket}")) {
        Ok(v) => {
            request.metadata_mut().insert("authorization", v);
        }
        Err(_) => return StreamEnd::Over(End::Closed("ticket is not a valid header value".into())),
    }
    let mut inbound = match client.node_command_stream(request).await {
        Ok(r) => r.into_inner(),
        // The ticket is no longer good (evicted, re-admitted elsewhere, expired):
        // only admission makes a new one.
        Err(e) if matches!(e.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
            return StreamEnd::Over(End::Closed(format!("open stream: {}", e.message())));
        }
        Err(e) => return StreamEnd::Lost(format!("open stream: {}", e.message())),
    };
    stats.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(node = %config.id, %upstream, "admitted and connected");
    if let Some(t) = tasks.as_mut() {
        let actions = t.worker.session_opened(now_ms());
        for (rid, p) in t.act(actions) {
            if tx.send(msg(p, rid, None)).await.is_err() {
                return StreamEnd::Lost("stream closed".into());
            }
        }
    }
    let mut task_tick = tokio::time::interval(Duration::from_millis(250));
    let Held { streaming, control_open, started } = held;
    let started = *started;
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    let mut poll = tokio::time::interval(config.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            end = control.hold(), if *control_open => match end {
                ControlEnd::Closed(reason) => return StreamEnd::Over(End::Evicted(reason)),
                ControlEnd::Moved { upstream, ticket } => return StreamEnd::Moved { upstream, ticket },
                ControlEnd::Lost(_) => *control_open = false,
            },
            ev = async { match tasks.as_mut() { Some(t) => t.events.recv().await, None => std::future::pending().await } } => {
                let (Some(t), Some(ev)) = (tasks.as_mut(), ev) else { continue };
                let now = now_ms();
                let actions = match ev {
                    TaskEvent::Started(id, ms) => t.worker.started(&id, ms, now),
                    TaskEvent::Finished(id, result) => {
                        t.kills.remove(&(id.id.clone(), id.attempt));
                        t.worker.finished(&id, result, now)
                    }
                };
                for (rid, p) in t.act(actions) {
                    if tx.send(msg(p, rid, None)).await.is_err() {
                        return StreamEnd::Lost("stream closed".into());
                    }
                }
            }
            _ = task_tick.tick(), if tasks.is_some() => {
                let Some(t) = tasks.as_mut() else { continue };
                let actions = t.worker.tick(now_ms());
                for (rid, p) in t.act(actions) {
                    if tx.send(msg(p, rid, None)).await.is_err() {
                        return StreamEnd::Lost("stream closed".into());
                    }
                }
            }
            _ = heartbeat.tick() => {
                let beat = v1::NodeHeartbeatV1Notify { sent_at_ms: now_ms() };
                if tx.send(msg(beat.into(), String::new(), None)).await.is_err() {
                    return StreamEnd::Lost("stream closed".into());
                }
            }
            _ = poll.tick() => {
                let now = now_ms();
                for (pair, s) in streaming.iter_mut() {
                    let Some(q) = source.latest(pair, now) else { continue };
                    if q.upstream_time_ms <= s.last_upstream_ms {
                        continue;
                    }
                    s.last_upstream_ms = q.upstream_time_ms;
                    s.seq += 1;
                    let update = v1::NodePriceUpdateV1Notify {
                        pair: pair.clone(),
                        price: Some(v1::Decimal { mantissa: q.mantissa, scale: q.scale }),
                        upstream_time_ms: q.upstream_time_ms,
                        seq: s.seq,
                        epoch: s.epoch,
                    };
                    if tx.send(msg(update.into(), String::new(), None)).await.is_err() {
                        return StreamEnd::Lost("stream closed".into());
                    }
                    stats.updates_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            cmd = inbound.message() => {
                let cmd = match cmd {
                    Ok(Some(c)) => c,
                    Ok(None) => return control.evicted_or(control_open, "controller ended the stream".into()).await,
                    Err(e) => return control.evicted_or(control_open, format!("stream: {}", e.message())).await,
                };
                if let Err(stale) = fence.admit(cmd.fence.as_ref()) {
                    tracing::warn!(node = %config.id, error = %stale, "command from a deposed leader ignored");
                    continue;
                }
                let Some(any) = cmd.command else { continue };
                let reply = |p: Payload| msg(p, cmd.request_id.clone(), cmd.from_uuid.clone());
                let payload = Payload::from_any(&any);
                if let (Some(t), Ok(p)) = (tasks.as_mut(), &payload)
                    && is_task_plane(p)
                {
                    let actions = t.worker.on_message(&cmd.request_id, p.clone());
                    for (rid, p) in t.act(actions) {
                        if tx.send(msg(p, rid, None)).await.is_err() {
                            return StreamEnd::Lost("stream closed".into());
                        }
                    }
                    continue;
                }
                match payload {
                    Ok(Payload::NodeStreamModifyStateV1Req(m)) => {
                        let mut next = BTreeMap::new();
                        for a in &m.streams {
                            // The controller's latest price tells us where it stands;
                            // we only send what is newer than that.
                            let known = a.latest.as_ref().map_or(i64::MIN, |p| p.upstream_time_ms - 1);
                            let kept = streaming.remove(&a.pair).filter(|s| s.epoch == a.epoch);
                            next.insert(a.pair.clone(), kept.unwrap_or(Streaming { epoch: a.epoch, seq: 0, last_upstream_ms: known }));
                        }
                        *streaming = next;
                        tracing::info!(node = %config.id, pairs = ?streaming.keys().collect::<Vec<_>>(), "streaming");
                        let streams = m.streams.iter().map(|a| v1::StreamAssignment { pair: a.pair.clone(), epoch: a.epoch, latest: None }).collect();
                        let _ = tx.send(reply(v1::NodeStreamModifyStateV1Reply { streaming: streams }.into())).await;
                        poll.reset_immediately();
                    }
                    Ok(Payload::NodeStatusV1Req(_)) => {
                        let status = v1::NodeStatusV1Reply {
                            node_uuid: config.id.clone(),
                            name: config.name.clone(),
                            version: config.version.clone(),
                            known_pairs: config.pairs.clone(),
                            streaming: streaming.iter().map(|(p, s)| v1::StreamAssignment { pair: p.clone(), epoch: s.epoch, latest: None }).collect(),
                            uptime_ms: started.elapsed().as_millis() as u64,
                            updates_sent: stats.updates_sent.load(std::sync::atomic::Ordering::Relaxed),
                            worker: config.worker,
                        };
                        let _ = tx.send(reply(status.into())).await;
                    }
                    Ok(Payload::NodeShutdownV1Req(r)) => {
                        tracing::info!(node = %config.id, reason = %r.reason, "shutdown requested");
                        let _ = tx.send(reply(v1::NodeShutdownV1Reply {}.into())).await;
                        // Close our half and give the reply time to leave before exiting.
                        drop(tx);
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Ok(Some(_)) = inbound.message().await {}
                        }).await;
                        return StreamEnd::Over(End::Shutdown);
                    }
                    Ok(other) => {
                        let unknown = v1::UnknownCommandV1Notify { type_url: any.type_url.clone(), reason: format!("node does not handle {}", other.name()) };
                        let _ = tx.send(reply(unknown.into())).await;
                    }
                    Err(e) => {
                        let unknown = v1::UnknownCommandV1Notify { type_url: any.type_url.clone(), reason: e.to_string() };
                        let _ = tx.send(reply(unknown.into())).await;
                    }
                }
            }
        }
    }
}
