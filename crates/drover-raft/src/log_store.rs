//! openraft's log storage over drover's journal.
//!
//! - **Append**: the entries of one call become one journal append (the journal's
//!   writer group-commits and fsyncs); openraft is told they are durable, in order, by
//!   one task that awaits the journal's tickets first come, first served.
//! - **Reads** come from a mirror in memory of the unpurged log (replication reads it
//!   constantly; the journal is the durable truth, read once at open).
//! - **Vote and purge point** are saved in the state file, after every earlier append
//!   is durable (openraft requires write IO in order).
//! - **Truncate** (an uncommitted tail a new leader overwrote) cuts the journal at the
//!   record holding the first removed entry and appends again the entries of that
//!   record that stay.
//! - **Purge** records the purge point; the mirror forgets the purged entries, and a
//!   journal checkpoint at the record holding the first unpurged entry lets the
//!   journal remove the segments before it (whole segments only: reopening skips the
//!   purged entries of the record that straddles the point).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use drover_journal::{Journal, JournalConfig, JournalError, Storage, Ticket};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use tokio::sync::{mpsc, oneshot};

use crate::record::{RecordError, STATE_FILE, SavedState, decode_entry, encode_entry};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The journal underneath.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A Raft entry or the state file does not decode.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The journal holds something other than a contiguous Raft log.
    #[error("{0}")]
    NotARaftLog(String),
    /// The state file could not be read.
    #[error("reading {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// One entry of the mirror: the entry and the journal record holding it (`None` until
/// its append is durable).
struct Held {
    entry: Entry,
    record: Option<i64>,
}

/// What the log store and its readers share.
#[derive(Default)]
struct Mirror {
    /// The unpurged entries, by index, contiguous.
    entries: VecDeque<Held>,
    saved: SavedState,
}

impl Mirror {
    fn position(&self, index: u64) -> Option<usize> {
        let first = self.entries.front()?.entry.log_id.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        (at < self.entries.len()).then_some(at)
    }

    fn range(&self, range: impl RangeBounds<u64>) -> Vec<Entry> {
        self.entries.iter().map(|h| &h.entry).filter(|e| range.contains(&e.log_id.index)).cloned().collect()
    }
}

/// Work for the task that reports appends durable, in order.
enum Flush {
    /// An append (one journal record): its ticket, its first index and count, and
    /// openraft's callback on the last record of the call.
    Append { ticket: Ticket, first: u64, count: usize, callback: Option<LogFlushed<TypeConfig>> },
    /// Answered once every earlier append is reported.
    Barrier(oneshot::Sender<()>),
}

/// openraft's log storage over a [`Journal`].
pub struct RaftLog {
    journal: Arc<Journal>,
    storage: Arc<dyn Storage>,
    state_path: PathBuf,
    mirror: Arc<Mutex<Mirror>>,
    flush: mpsc::UnboundedSender<Flush>,
}

/// Reads for replication: a handle on the same mirror.
#[derive(Clone)]
pub struct RaftLogReaderHandle {
    mirror: Arc<Mutex<Mirror>>,
}

fn lock(m: &Mutex<Mirror>) -> MutexGuard<'_, Mirror> {
    // A panic while holding it leaves a consistent mirror (every update is one step).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_err(e: impl ToString) -> StorageError {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

fn vote_err(e: impl ToString) -> StorageError {
    StorageIOError::write_vote(AnyError::error(e.to_string())).into()
}

impl RaftLog {
    /// Opens (or creates) the Raft log in `config.dir`. Must be called inside a tokio
    /// runtime (it starts the task reporting appends durable).
    pub fn open(config: JournalConfig, storage: Arc<dyn Storage>) -> Result<RaftLog, OpenError> {
        let state_path = config.dir.join(STATE_FILE);
        let saved = match storage.read(&state_path) {
            Ok(bytes) => SavedState::decode(&bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => SavedState::default(),
            Err(source) => return Err(OpenError::State { path: state_path, source }),
        };
        let (journal, recovery) = Journal::open(config, storage.clone())?;
        let mut mirror = Mirror { entries: VecDeque::new(), saved };
        let purged = mirror.saved.purged.map(|p| p.index);
        for message in recovery.entries() {
            let message = message?;
            let entry = decode_entry(&message.message)?.ok_or_else(|| {
                OpenError::NotARaftLog(format!("record {} holds a message that is not a Raft entry", message.seq))
            })?;
            let index = entry.log_id.index;
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            let expected = mirror.entries.back().map(|h| h.entry.log_id.index + 1).or(purged.map(|p| p + 1));
            if expected.is_some_and(|x| x != index) {
                return Err(OpenError::NotARaftLog(format!(
                    "record {} holds entry {index} where entry {} belongs",
                    message.seq,
                    expected.unwrap_or(0)
                )));
            }
            mirror.entries.push_back(Held { entry, record: Some(message.seq) });
        }
        drop(recovery);
        let mirror = Arc::new(Mutex::new(mirror));
        let (flush, rx) = mpsc::unbounded_channel();
        tokio::spawn(report_flushes(rx, mirror.clone()));
        Ok(RaftLog { journal: Arc::new(journal), storage, state_path, mirror, flush })
    }

    /// Waits until every append so far is durable and reported.
    async fn barrier(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.flush.send(Flush::Barrier(tx)).map_err(|_| write_err("the flush task stopped"))?;
        rx.await.map_err(|_| write_err("the flush task stopped"))
    }

    /// Saves the state file (vote and purge point) durably.
    async fn save(&self, saved: SavedState) -> Result<(), io::Error> {
        let (storage, path) = (self.storage.clone(), self.state_path.clone());
        tokio::task::spawn_blocking(move || storage.write_atomic(&path, &saved.encode()))
            .await
            .map_err(io::Error::other)?
    }

    /// The journal under the log (for its counters and histograms).
    pub fn journal(&self) -> Arc<Journal> {
        self.journal.clone()
    }

    /// Closes the journal (waits for its writer).
    pub async fn close(self) {
        let _ = self.barrier().await;
        if let Ok(journal) = Arc::try_unwrap(self.journal) {
            let _ = tokio::task::spawn_blocking(move || journal.close_blocking()).await;
        }
    }
}

/// Reports appends durable to openraft in the order they were made.
async fn report_flushes(mut rx: mpsc::UnboundedReceiver<Flush>, mirror: Arc<Mutex<Mirror>>) {
    while let Some(f) = rx.recv().await {
        match f {
            Flush::Append { ticket, first, count, callback } => match ticket.await {
                Ok(pos) => {
                    {
                        let mut m = lock(&mirror);
                        for i in first..first + count as u64 {
                            if let Some(at) = m.position(i) {
                                m.entries[at].record = Some(pos.seq);
                            }
                        }
                    }
                    if let Some(callback) = callback {
                        callback.log_io_completed(Ok(()));
                    }
                }
                Err(e) => {
                    if let Some(callback) = callback {
                        callback.log_io_completed(Err(io::Error::other(e.to_string())));
                    }
                }
            },
            Flush::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for RaftLogReaderHandle {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(lock(&self.mirror).range(range))
    }
}

impl RaftLogReader<TypeConfig> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(lock(&self.mirror).range(range))
    }
}

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = RaftLogReaderHandle;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let m = lock(&self.mirror);
        let last_purged_log_id = m.saved.purged;
        let last_log_id = m.entries.back().map(|h| h.entry.log_id).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        RaftLogReaderHandle { mirror: self.mirror.clone() }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.barrier().await?;
        let mut saved = lock(&self.mirror).saved.clone();
        saved.vote = Some(*vote);
        self.save(saved.clone()).await.map_err(vote_err)?;
        lock(&self.mirror).saved = saved;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(lock(&self.mirror).saved.vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(first) = entries.first().map(|e| e.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        // One journal record holds at most `max_entry` bytes: a follower handed many
        // entries at once (a leader's backlog) appends them as several records, in
        // order; openraft hears once the last is durable (records become durable in order).
        let encoded: Vec<bytes::Bytes> = entries.iter().map(encode_entry).collect();
        let runs = drover_journal::split_by_size(encoded, self.journal.max_entry());
        lock(&self.mirror).entries.extend(entries.into_iter().map(|entry| Held { entry, record: None }));
        let mut callback = Some(callback);
        let (last, mut at) = (runs.len() - 1, first);
        for (i, run) in runs.into_iter().enumerate() {
            let count = run.len();
            let ticket = self.journal.append_batch(run).await.map_err(write_err)?;
            let callback = if i == last { callback.take() } else { None };
            self.flush
                .send(Flush::Append { ticket, first: at, count, callback })
                .map_err(|_| write_err("flush task stopped"))?;
            at += count as u64;
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.barrier().await?;
        let (record, survivors) = {
            let m = lock(&self.mirror);
            let Some(at) = m.position(log_id.index) else { return Ok(()) };
            let record = m.entries[at].record.ok_or_else(|| write_err("an entry to truncate is not durable"))?;
            let survivors: Vec<Entry> =
                m.entries.iter().take(at).filter(|h| h.record == Some(record)).map(|h| h.entry.clone()).collect();
            (record, survivors)
        };
        drover_journal::Log::truncate_from(&*self.journal, record).await.map_err(write_err)?;
        let mut new_record = None;
        if !survivors.is_empty() {
            let ticket =
                self.journal.append_batch(survivors.iter().map(encode_entry).collect()).await.map_err(write_err)?;
            new_record = Some(ticket.await.map_err(write_err)?.seq);
        }
        let mut m = lock(&self.mirror);
        if let Some(at) = m.position(log_id.index) {
            m.entries.truncate(at);
        }
        for h in m.entries.iter_mut().filter(|h| h.record == Some(record)) {
            h.record = new_record;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.barrier().await?;
        let mut saved = lock(&self.mirror).saved.clone();
        if saved.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        saved.purged = Some(log_id);
        self.save(saved.clone()).await.map_err(write_err)?;
        let first_kept = {
            let mut m = lock(&self.mirror);
            m.saved = saved.clone();
            while m.entries.front().is_some_and(|h| h.entry.log_id.index <= log_id.index) {
                m.entries.pop_front();
            }
            m.entries.front().map(|h| h.record)
        };
        // The journal keeps the records from the one holding the first unpurged entry
        // (every append is durable after the barrier, so each has its record); a
        // journal checkpoint there, holding the state file's bytes, lets it remove
        // the segments before. Only space is at stake: a failure is logged.
        let seq = match first_kept {
            Some(Some(record)) => Ok(record),
            Some(None) => return Ok(()),
            None => self.journal.flush().await,
        };
        let reclaimed = match seq {
            Ok(seq) => self.journal.checkpoint_at(seq, saved.encode()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = reclaimed {
            tracing::warn!(error = %e, purged = log_id.index, "raft log: segments behind the purge point not reclaimed");
        }
        Ok(())
    }
}

/// Opens a log store for tests and tools on a fresh journal configuration.
pub fn journal_config(dir: impl Into<PathBuf>) -> JournalConfig {
    let mut c = JournalConfig::new(dir);
    // Checkpoints are Raft snapshots, taken by openraft, never by record count.
    c.checkpoint_every_records = u64::MAX;
    c.checkpoint_every_bytes = u64::MAX;
    // A record holds up to 16 MiB, as a single controller's journal does, so an entry
    // can carry the largest batch a controller proposes.
    c.max_batch_bytes = 16 << 20;
    c
}
