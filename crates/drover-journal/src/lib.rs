//! drover's journal: a durable log of AMBROSIA log records with group commit,
//! checkpoints, trimming and checkpoint-plus-replay recovery.
//!
//! Layout of a journal directory (`<data-dir>/journal/`):
//!
//! * `committer-id`: the committer id, chosen once when the journal is created.
//! * `<first seq, 20 digits>.log`: segments, each a run of log records (24-byte
//!   header, XXH64 check bytes, sequence ids 0, 1, 2 … continuing across segments).
//!   Each record is one group-committed batch of entries; an entry is one AMBROSIA
//!   message (the controller logs its inputs as RPC messages).
//! * `checkpoint-<next seq, 20 digits>.ckpt`: a checkpoint announcement record (seq -2,
//!   holding a `Checkpoint` message), the serialized state, then a trailer with the
//!   sequence id it covers up to and the XXH64 of the state.
//!
//! [`Journal::open`] recovers (see [`recovery`]) and starts the writer thread
//! ([`writer`]); the caller then replays [`Recovery::entries`] into its state machine
//! ([`machine`]) before appending.

pub mod checkpoint;
pub mod histogram;
pub mod inspect;
pub mod lock;
pub mod log;
pub mod machine;
pub mod recovery;
pub mod scan;
pub mod storage;
pub mod whatif;
pub mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use drover_wire::ambrosia::Limits;
pub use lock::{DirLock, LockError};
pub use log::Log;
pub use machine::{DecodeError, Divergence, EncodeError, StateMachine, encode_entry, replay};
pub use recovery::{Recovery, RecoveryReport, ReplayEntry};
pub use storage::{Faults, FaultyStorage, FsStorage, MemStorage, Storage};
pub use writer::{Journal, JournalHistograms, JournalStats, Position, Ticket};

/// Whether appends are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncMode {
    /// `fdatasync` once per batch before any append of the batch is acknowledged.
    Always,
    /// Never sync: for measurements only. Acknowledged appends can be lost on a crash,
    /// and the journal says so loudly in its log when it opens.
    Never,
}

/// What recovery does with damage in the middle of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryMode {
    /// Refuse to start, naming the file and byte offset.
    Strict,
    /// Skip to the next valid record and report what was dropped.
    TolerateCorruption,
}

/// Journal settings.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The journal directory.
    pub dir: PathBuf,
    /// Start a new segment once the current one reaches this size.
    pub segment_bytes: u64,
    /// Close a batch once it holds this many bytes.
    pub max_batch_bytes: usize,
    /// After the first entry of a batch, wait up to this long for more (0: batch only
    /// what arrived while the previous write was in flight).
    pub max_batch_delay: Duration,
    /// fsync policy.
    pub fsync: FsyncMode,
    /// Checkpoints kept; segments older than the oldest kept one are trimmed.
    pub keep_checkpoints: usize,
    /// Suggest a checkpoint after this many records since the last one.
    pub checkpoint_every_records: u64,
    /// Suggest a checkpoint after this many log bytes since the last one.
    pub checkpoint_every_bytes: u64,
    /// Damage policy for recovery.
    pub recovery: RecoveryMode,
    /// Size limits on records and messages.
    pub limits: Limits,
    /// Appends queued to the writer before `append` waits.
    pub queue_depth: usize,
    /// Run the writer as a task on the caller's tokio runtime instead of a thread of
    /// its own: for deterministic simulation on a single-threaded runtime with virtual
    /// time, over in-memory storage (the writer's file operations block its task).
    /// `max_batch_delay` must then be zero.
    pub writer_task: bool,
}

impl JournalConfig {
    /// Defaults for a journal in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        JournalConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_batch_bytes: 4 << 20,
            max_batch_delay: Duration::ZERO,
            fsync: FsyncMode::Always,
            keep_checkpoints: 2,
            checkpoint_every_records: 100_000,
            checkpoint_every_bytes: 256 << 20,
            recovery: RecoveryMode::Strict,
            limits: Limits::default(),
            queue_depth: 65_536,
            writer_task: false,
        }
    }
}

/// Everything that can go wrong in the journal.
#[derive(Clone, Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Damage that is not a torn tail: recovery refuses to start.
    #[error("journal corrupt: {} at byte {offset}: {damage}", file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damage.
        offset: u64,
        /// What is wrong.
        damage: String,
    },
    /// A checkpoint or a logged input that the state machine cannot decode.
    #[error("replay failed at {at}: {reason}")]
    Replay {
        /// `checkpoint` or `record <seq>`.
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// A write or fsync failed earlier; nothing more is accepted, because what the
    /// file system holds can no longer be trusted.
    #[error("journal stopped after a failed write: {0}")]
    Poisoned(String),
    /// The journal was closed.
    #[error("journal is closed")]
    Closed,
    /// A read, truncation or purge named records the log does not hold (purged, or
    /// past its end).
    #[error("record {seq} is outside the log (it holds records {first} to {next} exclusive)")]
    OutOfRange {
        /// The sequence id asked for.
        seq: i64,
        /// The first record still held.
        first: i64,
        /// The sequence id the next record will get.
        next: i64,
    },
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        JournalError::Io { op, path: path.to_owned(), source: Arc::new(source) }
    }
}

/// File name of the segment whose first record has sequence id `first_seq`.
pub fn segment_name(first_seq: i64) -> String {
    format!("{first_seq:020}.log")
}

/// File name of the checkpoint that covers every record before `next_seq`.
pub fn checkpoint_name(next_seq: i64) -> String {
    format!("checkpoint-{next_seq:020}.ckpt")
}

/// Name of the file holding the committer id.
pub const COMMITTER_FILE: &str = "committer-id";

/// The first sequence id of a segment file name.
pub fn parse_segment_name(name: &str) -> Option<i64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// The covered sequence id of a checkpoint file name.
pub fn parse_checkpoint_name(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("checkpoint-")?.strip_suffix(".ckpt")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// What a journal directory holds, from one listing of it: the first sequence id of
/// each segment and the covered sequence id of each checkpoint, both ascending, and
/// whether the committer id file is there.
#[derive(Debug, Default)]
pub struct Listing {
    /// First sequence id of each segment, ascending.
    pub segments: Vec<i64>,
    /// The first sequence id each checkpoint does not cover, ascending.
    pub checkpoints: Vec<i64>,
    /// Whether the committer id file is there.
    pub committer: bool,
}

impl Listing {
    /// Lists `dir`.
    pub fn read(storage: &dyn Storage, dir: &Path) -> Result<Listing, JournalError> {
        let names = storage.list(dir).map_err(|e| JournalError::io("list", dir, e))?;
        let mut l = Listing { committer: names.iter().any(|n| n == COMMITTER_FILE), ..Listing::default() };
        for name in &names {
            if let Some(seq) = parse_segment_name(name) {
                l.segments.push(seq);
            } else if let Some(seq) = parse_checkpoint_name(name) {
                l.checkpoints.push(seq);
            }
        }
        l.segments.sort_unstable();
        l.checkpoints.sort_unstable();
        Ok(l)
    }
}

/// Splits encoded entries into runs of at most `limit` bytes, in order: one
/// `append_batch` each, so no append crosses the journal's entry limit (`max_entry`).
/// An entry over `limit` on its own goes alone (and the journal refuses it: callers
/// keep single entries below the limit).
pub fn split_by_size(encoded: Vec<bytes::Bytes>, limit: usize) -> Vec<Vec<bytes::Bytes>> {
    let mut chunks: Vec<Vec<bytes::Bytes>> = Vec::new();
    let mut size = 0;
    for e in encoded {
        match chunks.last_mut() {
            Some(last) if size + e.len() <= limit => {
                size += e.len();
                last.push(e);
            }
            _ => {
                size = e.len();
                chunks.push(vec![e]);
            }
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_split_so_no_append_crosses_the_entry_limit() {
        let sizes = [5, 5, 3, 9, 1, 10, 2];
        let encoded: Vec<bytes::Bytes> = sizes.iter().map(|&n| bytes::Bytes::from(vec![0u8; n])).collect();
        let chunks = split_by_size(encoded, 10);
        let lens: Vec<Vec<usize>> = chunks.iter().map(|c| c.iter().map(bytes::Bytes::len).collect()).collect();
        assert_eq!(lens, vec![vec![5, 5], vec![3], vec![9, 1], vec![10], vec![2]]);
        assert!(split_by_size(Vec::new(), 10).is_empty());
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_checkpoint_name(&checkpoint_name(7)), Some(7));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("checkpoint-00000000000000000007.ckpt"), None);
    }
}
