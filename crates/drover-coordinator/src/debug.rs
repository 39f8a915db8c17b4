//! Debug runs (`drover coordinator debug`, AMBROSIA's DebugInstance) and the list of
//! checkpoints they can start from (`drover coordinator checkpoints`).
//!
//! Seed 4 names two start-up flows that replay recorded history without going live:
//! "running a repro or what-if test" (a checkpoint, then the logged replay messages,
//! and that is all) and "performing an upgrade what-if test" (a checkpoint, then
//! `UpgradeService`, then the logged replay messages). A debug run plays either to an
//! application on the usual ports. It only reads: the log is opened without its lock,
//! a torn tail is left in place, `instance.json` is not written, so a live coordinator
//! may keep running on the same instance.
//!
//! After the last record the coordinator closes its send connection: that is how the
//! application learns the replay is complete (drover-ambrosia's `run` returns `Ok`).
//! The application's outgoing calls are read and dropped (they are counted); anything
//! an application may not send in this flow (a `Checkpoint` nobody asked for, an
//! `InitialMessage`, a coordinator-only type) ends the run with an error. The run ends
//! when the application closes its connection, or on the shutdown signal.

use std::sync::Arc;

use bytes::Bytes;
use drover_journal::recovery::{Start, read_only};
use drover_journal::{FsStorage, Listing, Storage};
use drover_wire::ambrosia::{Direction, Frame, Limits, Message, MessageReader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::instance;
use crate::server::{CoordinatorConfig, CoordinatorError, Listening, MAX_CALL, connect_output, journal_config};
use crate::session::Session;

/// One checkpoint a debug run can start from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointInfo {
    /// Its number: the sequence id of the first record it does not cover (what
    /// `--checkpoint` takes).
    pub seq: i64,
    /// Its size on disk, in bytes.
    pub bytes: u64,
    /// Records in the log after it (what a debug run from it replays).
    pub records_after: u64,
}

/// The checkpoints of `instance`, oldest first (read-only).
pub fn checkpoints(log_dir: &std::path::Path, name: &str) -> Result<Vec<CheckpointInfo>, CoordinatorError> {
    instance::load(log_dir, name)?;
    let config = journal_config(&CoordinatorConfig::new(name, log_dir, 0, 0));
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let listing = Listing::read(storage.as_ref(), &config.dir)?;
    let Some(&oldest) = listing.checkpoints.first() else { return Ok(Vec::new()) };
    let end = read_only(&config, &storage, Start::At(oldest))?.next_seq;
    Ok(listing
        .checkpoints
        .iter()
        .map(|&seq| CheckpointInfo {
            seq,
            bytes: std::fs::metadata(config.dir.join(drover_journal::checkpoint_name(seq))).map_or(0, |m| m.len()),
            records_after: u64::try_from(end - seq).unwrap_or(0),
        })
        .collect())
}

/// Settings of a debug run.
#[derive(Clone, Debug)]
pub struct DebugConfig {
    /// The instance, its log directory and the application ports (as for a live run;
    /// the upgrade, fsync and peer settings are not used).
    pub coordinator: CoordinatorConfig,
    /// Start from this checkpoint (default: the oldest kept).
    pub checkpoint: Option<i64>,
    /// Send `UpgradeService` between the checkpoint and the records.
    pub test_upgrade: bool,
}

/// What a debug run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DebugReport {
    /// The checkpoint it started from.
    pub checkpoint: i64,
    /// Records in the log after it (a record holding only impulses is not sent, as
    /// in recovery).
    pub records: u64,
    /// Sequence ids of the first and last record sent.
    pub first_seq: Option<i64>,
    /// See `first_seq`.
    pub last_seq: Option<i64>,
    /// Whether `UpgradeService` was sent.
    pub test_upgrade: bool,
    /// Calls the application made during the run (read and dropped).
    pub calls_dropped: u64,
    /// Other messages read and dropped (`AttachTo`, `TakeCheckpoint`, pings).
    pub other_dropped: u64,
    /// How it ended.
    pub ended: String,
}

/// Runs one debug session: waits for the application, replays, and returns when the
/// application closes its connection or `shutdown` resolves.
pub async fn debug(
    config: DebugConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_listening: impl FnOnce(Listening),
) -> Result<DebugReport, CoordinatorError> {
    let c = &config.coordinator;
    instance::load(&c.log_dir, &c.instance)?;
    let journal = journal_config(c);
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let listing = Listing::read(storage.as_ref(), &journal.dir)?;
    let seq = match config.checkpoint {
        Some(n) if listing.checkpoints.contains(&n) => n,
        Some(n) => {
            return Err(CoordinatorError::Config(format!(
                "instance {} has no checkpoint {n}; it keeps {:?} (drover coordinator checkpoints --instance {} lists them)",
                c.instance, listing.checkpoints, c.instance
            )));
        }
        None => *listing.checkpoints.first().ok_or_else(|| {
            CoordinatorError::Config(format!("instance {} has no checkpoint yet: start it once first", c.instance))
        })?,
    };
    let read = {
        let journal = journal.clone();
        tokio::task::spawn_blocking(move || read_only(&journal, &storage, Start::At(seq)))
            .await
            .map_err(|e| CoordinatorError::Config(format!("log read task failed: {e}")))??
    };
    let Some(stored) = read.checkpoint.clone() else {
        let why = read.report.rejected_checkpoints.first().map_or("unreadable".to_owned(), |(_, r)| r.clone());
        return Err(CoordinatorError::Config(format!("checkpoint {seq} cannot be used: {why}")));
    };
    if let Some(cut) = &read.report.torn_tail {
        tracing::info!(file = %cut.file.display(), offset = cut.offset,
            "the log ends in a partial record (a live coordinator writing, or a crash); replaying up to it");
    }
    let records: Vec<(i64, Bytes)> = read.records().collect();
    let mut report = DebugReport {
        checkpoint: seq,
        records: records.len() as u64,
        first_seq: records.first().map(|r| r.0),
        last_seq: records.last().map(|r| r.0),
        test_upgrade: config.test_upgrade,
        ..DebugReport::default()
    };
    let stream = Session::replay_only(read.committer_id, &c.instance, &stored, records, config.test_upgrade)
        .map_err(CoordinatorError::Config)?;
    drop(read);

    let receive = TcpListener::bind(("127.0.0.1", c.receive_port)).await?;
    let send = if c.connect_send { None } else { Some(TcpListener::bind(("127.0.0.1", c.send_port)).await?) };
    on_listening(Listening {
        receive_port: receive.local_addr()?.port(),
        send_port: send.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()),
        peer_port: 0,
    });
    tracing::info!(instance = %c.instance, checkpoint = seq, records = report.records, test_upgrade = config.test_upgrade,
        "debug run: waiting for the application");
    tokio::pin!(shutdown);
    let (mut input, mut output) = loop {
        let (input, from) = tokio::select! {
            _ = &mut shutdown => { report.ended = "interrupted before an application came".into(); return Ok(report) }
            a = receive.accept() => a?,
        };
        tokio::select! {
            _ = &mut shutdown => { report.ended = "interrupted before an application came".into(); return Ok(report) }
            o = connect_output(c, send.as_ref(), &input) => match o {
                Ok(o) => break (input, o),
                Err(e) => tracing::warn!(%from, error = %e, "no application session; waiting for the next application"),
            },
        }
    };
    let limits = Limits { max_checkpoint: c.max_checkpoint, max_message: MAX_CALL, ..Limits::default() };
    let mut reader = MessageReader::new(Direction::ToCoordinator, limits);
    let mut buf = vec![0u8; 64 * 1024];
    // Sending and reading at once: a large replay must not block on an application
    // that waits for us to read its calls.
    let sending = async {
        for bytes in &stream {
            output.write_all(bytes).await?;
        }
        output.flush().await?;
        // The end of the replay: the application sees its receive stream end.
        output.shutdown().await
    };
    tokio::pin!(sending);
    let mut sent = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => { report.ended = "interrupted".into(); break }
            r = &mut sending, if !sent => {
                sent = true;
                if let Err(e) = r {
                    report.ended = format!("the application's connection failed during the replay: {e}");
                    break;
                }
                tracing::info!(records = report.records, "debug run: replay sent");
            }
            n = input.read(&mut buf) => {
                let n = match n {
                    Ok(0) => { report.ended = "the application closed its connection".into(); break }
                    Ok(n) => n,
                    Err(e) => { report.ended = format!("reading from the application: {e}"); break }
                };
                reader.feed(&buf[..n]);
                loop {
                    match reader.next_frame() {
                        Ok(None) => break,
                        Ok(Some(frame)) => count(&mut report, frame)?,
                        Err(e) => return Err(CoordinatorError::Misbehaved(format!("it sent bad bytes: {e}"))),
                    }
                }
            }
        }
    }
    tracing::info!(instance = %c.instance, records = report.records, calls_dropped = report.calls_dropped,
        ended = %report.ended, "debug run over");
    Ok(report)
}

/// Counts (and drops) what the application sent; refuses what it may not send.
fn count(report: &mut DebugReport, frame: Frame) -> Result<(), CoordinatorError> {
    let m = match frame {
        Frame::Message(m) => m,
        Frame::CheckpointData { .. } => {
            return Err(CoordinatorError::Misbehaved("checkpoint bytes during a debug run".into()));
        }
    };
    match m {
        Message::Rpc(_) => report.calls_dropped += 1,
        Message::RpcBatch(rpcs) => report.calls_dropped += rpcs.len() as u64,
        Message::AttachTo { .. } | Message::TakeCheckpoint | Message::Ping(_) | Message::PingReturn(_) => {
            report.other_dropped += 1
        }
        Message::Checkpoint { .. } => {
            return Err(CoordinatorError::Misbehaved(
                "it sent a Checkpoint during a debug run, where nothing asks for one".into(),
            ));
        }
        Message::InitialMessage(_) => {
            return Err(CoordinatorError::Misbehaved(
                "it sent an InitialMessage during a debug run (that belongs to a first start)".into(),
            ));
        }
        other => {
            return Err(CoordinatorError::Misbehaved(format!(
                "message type {} ({:?}) is not one an application may send",
                other.message_type() as u8,
                other.message_type()
            )));
        }
    }
    Ok(())
}
