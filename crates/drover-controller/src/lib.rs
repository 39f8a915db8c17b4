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

mod grpc;
mod owner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use drover_core::{Config as CoreConfig, Policy};
use drover_journal::{FsStorage, FsyncMode, JournalConfig, RecoveryMode};
pub use owner::Health;
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
}

impl ControllerConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ControllerConfig {
            data_dir: data_dir.into(),
            core: CoreConfig { version: env!("CARGO_PKG_VERSION").into(), ..CoreConfig::default() },
            fsync: FsyncMode::Always,
            recovery: RecoveryMode::Strict,
            max_message_bytes: 1 << 20,
            stream_queue: 4096,
        }
    }

    fn journal(&self) -> JournalConfig {
        let mut j = JournalConfig::new(self.data_dir.join("journal"));
        j.fsync = self.fsync;
        j.recovery = self.recovery;
        j
    }
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
}

/// A running controller: its address and a way to watch its health.
pub struct Running {
    /// The gRPC address it listens on.
    pub addr: SocketAddr,
    /// Health and progress, shared with the HTTP endpoint.
    pub health: Arc<Health>,
}

/// Runs a controller on `listener` until `shutdown` resolves, then stops gracefully
/// (final checkpoint). `on_ready` is called once recovery is done and it serves.
pub async fn run(
    config: ControllerConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Running) + Send,
) -> Result<(), ShellError> {
    let addr = listener.local_addr()?;
    let storage: Arc<dyn drover_journal::Storage> = Arc::new(FsStorage);
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
    drop(recovery);
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(65_536);
    let health = Arc::new(Health::default());
    let service = grpc::Service::new(events_tx, config.stream_queue);
    let owner = owner::Owner::new(config.clone(), core, journal, health.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let owner_task = tokio::spawn(owner.run(events_rx, stop_rx.clone()));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(drover_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let grpc = drover_proto::v1::controller_server::ControllerServer::new(service)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    on_ready(Running { addr, health });
    tracing::info!(%addr, "serving gRPC");
    let mut server_stop = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(grpc)
        .add_service(reflection)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(server);
    let mut owner_task = owner_task;
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
    let _ = server.await;
    match result {
        Ok(r) => r,
        Err(e) => Err(ShellError::Io(std::io::Error::other(format!("owner task failed: {e}")))),
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::hash::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}
