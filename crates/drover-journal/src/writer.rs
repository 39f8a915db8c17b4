//! The group-commit writer: one thread owns the active segment file.
//!
//! Callers hand entries (encoded AMBROSIA messages) to [`Journal::append`] and get a
//! [`Ticket`] that resolves once the entry is on disk. The thread takes the first
//! waiting entry, then everything else that arrived meanwhile (up to
//! `max_batch_bytes`, optionally waiting `max_batch_delay` for more), writes them as one
//! log record, calls `fdatasync` once, and only then resolves the batch's tickets. A
//! failed write or fsync resolves every waiting ticket with the error and poisons the
//! journal: after a failed fsync the page cache can no longer be trusted, so nothing
//! more is accepted. For simulation the writer can run as a task on the caller's
//! runtime instead (`JournalConfig::writer_task`), doing the same steps.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use drover_wire::ambrosia::{HEADER_LEN, RecordHeader, check_bytes};
use tokio::sync::{mpsc, oneshot};

use crate::histogram::{Histogram, HistogramSnapshot, LATENCY_BOUNDS_US, SIZE_BOUNDS};
use crate::recovery::{Messages, Recovery, Segment, recover};
use crate::scan::scan_segment;
use crate::storage::{AppendFile, Storage};
use crate::{
    FsyncMode, JournalConfig, JournalError, Listing, ReplayEntry, checkpoint, parse_segment_name, segment_name,
};

/// Where an entry landed: its record's sequence id and its index in that record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The record's sequence id.
    pub seq: i64,
    /// The entry's index within the record.
    pub index: u32,
}

/// Resolves when an appended entry is durable (or the write failed).
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<Position, JournalError>>);

impl Future for Ticket {
    type Output = Result<Position, JournalError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(JournalError::Closed)))
    }
}

impl Ticket {
    /// Waits for durability from a thread that is not running an async runtime.
    pub fn wait(self) -> Result<Position, JournalError> {
        self.0.blocking_recv().unwrap_or(Err(JournalError::Closed))
    }
}

enum Cmd {
    /// One or more entries, made durable together; the ticket gets the last one's position.
    Append {
        messages: Vec<Bytes>,
        done: oneshot::Sender<Result<Position, JournalError>>,
        at: Instant,
    },
    Checkpoint {
        state: Vec<u8>,
        /// Covers the records before this sequence id (`None`: every record so far).
        at: Option<i64>,
        done: oneshot::Sender<Result<i64, JournalError>>,
    },
    Flush {
        done: oneshot::Sender<Result<i64, JournalError>>,
    },
    Read {
        from: i64,
        done: oneshot::Sender<Result<Vec<ReplayEntry>, JournalError>>,
    },
    Truncate {
        from: i64,
        done: oneshot::Sender<Result<(), JournalError>>,
    },
    Purge {
        seq: i64,
        done: oneshot::Sender<Result<i64, JournalError>>,
    },
}

/// The writer's histograms at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalHistograms {
    /// From `append` to durable, per append call, in microseconds.
    pub append_us: HistogramSnapshot,
    /// Each `fdatasync`, in microseconds.
    pub fsync_us: HistogramSnapshot,
    /// Entries per record (group-commit batch size).
    pub batch_entries: HistogramSnapshot,
    /// Writing a checkpoint (atomically, with its fsyncs), in microseconds.
    pub checkpoint_us: HistogramSnapshot,
}

/// Counters the writer keeps, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Entries made durable.
    pub entries: u64,
    /// Records written.
    pub records: u64,
    /// Log bytes written.
    pub bytes: u64,
    /// fsync calls.
    pub fsyncs: u64,
    /// Total time spent in fsync.
    pub fsync_nanos: u64,
    /// Largest batch, in entries.
    pub max_batch: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Every record before this sequence id is durable.
    pub durable_seq: i64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            append_latency: Histogram::new(LATENCY_BOUNDS_US),
            fsync_latency: Histogram::new(LATENCY_BOUNDS_US),
            batch_entries: Histogram::new(SIZE_BOUNDS),
            checkpoint_latency: Histogram::new(LATENCY_BOUNDS_US),
            entries: AtomicU64::default(),
            records: AtomicU64::default(),
            bytes: AtomicU64::default(),
            fsyncs: AtomicU64::default(),
            fsync_nanos: AtomicU64::default(),
            max_batch: AtomicU64::default(),
            checkpoints: AtomicU64::default(),
            durable_seq: AtomicI64::default(),
            checkpoint_due: AtomicBool::default(),
        }
    }
}

#[derive(Debug)]
struct Shared {
    append_latency: Histogram,
    fsync_latency: Histogram,
    batch_entries: Histogram,
    checkpoint_latency: Histogram,
    entries: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    max_batch: AtomicU64,
    checkpoints: AtomicU64,
    durable_seq: AtomicI64,
    checkpoint_due: AtomicBool,
}

/// A handle on an open journal. Appends from one handle are written in the order they
/// were made.
#[derive(Debug)]
pub struct Journal {
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    committer_id: i32,
    max_entry: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    /// Recovers the journal in `config.dir` and starts its writer. The returned
    /// [`Recovery`] holds the checkpoint and the entries to replay.
    pub fn open(config: JournalConfig, storage: Arc<dyn Storage>) -> Result<(Journal, Recovery), JournalError> {
        let recovery = recover(&config, &storage)?;
        if config.fsync == FsyncMode::Never {
            tracing::warn!(
                dir = %config.dir.display(),
                "JOURNAL FSYNC IS OFF (--fsync never): acknowledged inputs WILL BE LOST on a crash; use only for measurements"
            );
        }
        let (file, file_len, file_first_seq) = match &recovery.tail.segment {
            Some((path, len)) => {
                let first = path.file_name().and_then(|n| parse_segment_name(&n.to_string_lossy())).unwrap_or(0);
                (storage.open_append(path).map_err(|e| JournalError::io("open", path, e))?, *len, first)
            }
            None => {
                let path = config.dir.join(segment_name(recovery.next_seq));
                let f = storage.open_append(&path).map_err(|e| JournalError::io("create", &path, e))?;
                storage.sync_dir(&config.dir).map_err(|e| JournalError::io("sync", &config.dir, e))?;
                (f, 0, recovery.next_seq)
            }
        };
        let shared = Arc::new(Shared::default());
        shared.durable_seq.store(recovery.next_seq, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        let max_entry = config.max_batch_bytes.min(config.limits.max_record - HEADER_LEN);
        let writer = Writer {
            committer_id: recovery.committer_id,
            next_seq: recovery.next_seq,
            file,
            file_len,
            file_first_seq,
            buf: Vec::new(),
            poisoned: None,
            shared: shared.clone(),
            since_checkpoint: (0, 0),
            storage,
            config,
        };
        let thread = if writer.config.writer_task {
            tokio::spawn(writer.run_task(rx));
            None
        } else {
            let thread = std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || writer.run(rx))
                .map_err(|e| JournalError::io("spawn writer for", std::path::Path::new("journal"), e))?;
            Some(thread)
        };
        Ok((Journal { tx, shared, committer_id: recovery.committer_id, max_entry, thread }, recovery))
    }

    /// The most bytes one `append_batch` may carry: a caller splits larger batches and
    /// refuses a single entry over it before it reaches the journal.
    pub fn max_entry(&self) -> usize {
        self.max_entry
    }

    fn check_size(&self, messages: &[Bytes]) -> Result<(), JournalError> {
        let size: usize = messages.iter().map(Bytes::len).sum();
        if size > self.max_entry {
            return Err(JournalError::Poisoned(format!(
                "entries of {size} bytes exceed the batch limit of {}",
                self.max_entry
            )));
        }
        Ok(())
    }

    /// Queues an encoded message; waits only for queue space. The ticket resolves when
    /// the message is durable.
    pub async fn append(&self, message: Bytes) -> Result<Ticket, JournalError> {
        self.append_batch(vec![message]).await
    }

    /// Queues several encoded messages, in order, to be made durable together (in one
    /// record). The ticket resolves, with the last message's position, once all are
    /// durable.
    pub async fn append_batch(&self, messages: Vec<Bytes>) -> Result<Ticket, JournalError> {
        self.check_size(&messages)?;
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Append { messages, done, at: Instant::now() }).await.map_err(|_| JournalError::Closed)?;
        Ok(Ticket(rx))
    }

    /// [`Journal::append`] for threads without an async runtime.
    pub fn append_blocking(&self, message: Bytes) -> Result<Ticket, JournalError> {
        let messages = vec![message];
        self.check_size(&messages)?;
        let (done, rx) = oneshot::channel();
        self.tx.blocking_send(Cmd::Append { messages, done, at: Instant::now() }).map_err(|_| JournalError::Closed)?;
        Ok(Ticket(rx))
    }

    /// Writes a checkpoint of `state`, which must reflect every entry appended before
    /// this call, then trims what it makes unnecessary. Returns the sequence id it
    /// covers up to.
    pub async fn checkpoint(&self, state: Vec<u8>) -> Result<i64, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Checkpoint { state, at: None, done }).await.map_err(|_| JournalError::Closed)?;
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Writes a checkpoint of `state` covering only the records before `seq` (at most
    /// the next sequence id), then trims what it makes unnecessary: for a log whose
    /// state is kept elsewhere and which needs the records from `seq` on (the Raft log:
    /// its entries behind a snapshot). Returns `seq`.
    pub async fn checkpoint_at(&self, seq: i64, state: Vec<u8>) -> Result<i64, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Checkpoint { state, at: Some(seq), done }).await.map_err(|_| JournalError::Closed)?;
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// [`Journal::checkpoint`] for threads without an async runtime.
    pub fn checkpoint_blocking(&self, state: Vec<u8>) -> Result<i64, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx.blocking_send(Cmd::Checkpoint { state, at: None, done }).map_err(|_| JournalError::Closed)?;
        rx.blocking_recv().unwrap_or(Err(JournalError::Closed))
    }

    /// Waits until everything appended before is durable; returns the next sequence id.
    pub async fn flush(&self) -> Result<i64, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Flush { done }).await.map_err(|_| JournalError::Closed)?;
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Cmd,
    ) -> Result<T, JournalError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(cmd(done)).await.map_err(|_| JournalError::Closed)?;
        rx.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Whether enough log has accumulated since the last checkpoint that one is due.
    pub fn checkpoint_due(&self) -> bool {
        self.shared.checkpoint_due.load(Ordering::Relaxed)
    }

    /// This journal's committer id.
    pub fn committer_id(&self) -> i32 {
        self.committer_id
    }

    /// The writer's histograms: append→durable and fsync latency, entries per record,
    /// checkpoint write time (microseconds, except batch sizes).
    pub fn histograms(&self) -> JournalHistograms {
        let s = &self.shared;
        JournalHistograms {
            append_us: s.append_latency.snapshot(),
            fsync_us: s.fsync_latency.snapshot(),
            batch_entries: s.batch_entries.snapshot(),
            checkpoint_us: s.checkpoint_latency.snapshot(),
        }
    }

    /// A snapshot of the writer's counters.
    pub fn stats(&self) -> JournalStats {
        let s = &self.shared;
        JournalStats {
            entries: s.entries.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_nanos: s.fsync_nanos.load(Ordering::Relaxed),
            max_batch: s.max_batch.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            durable_seq: s.durable_seq.load(Ordering::SeqCst),
        }
    }

    /// Stops accepting appends, lets the writer finish what is queued, and waits for
    /// its thread (blocking).
    pub fn close_blocking(mut self) {
        let thread = self.thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl crate::Log for Journal {
    async fn append(&self, entries: Vec<Bytes>) -> Result<Ticket, JournalError> {
        self.append_batch(entries).await
    }

    async fn read_from(&self, from: i64) -> Result<Vec<ReplayEntry>, JournalError> {
        self.ask(|done| Cmd::Read { from, done }).await
    }

    async fn truncate_from(&self, from: i64) -> Result<(), JournalError> {
        self.ask(|done| Cmd::Truncate { from, done }).await
    }

    async fn checkpoint(&self, state: Vec<u8>) -> Result<i64, JournalError> {
        Journal::checkpoint(self, state).await
    }

    async fn purge_before(&self, seq: i64) -> Result<i64, JournalError> {
        self.ask(|done| Cmd::Purge { seq, done }).await
    }

    fn durable_seq(&self) -> i64 {
        self.shared.durable_seq.load(Ordering::SeqCst)
    }
}

struct Writer {
    config: JournalConfig,
    storage: Arc<dyn Storage>,
    committer_id: i32,
    next_seq: i64,
    file: Box<dyn AppendFile>,
    file_len: u64,
    file_first_seq: i64,
    buf: Vec<u8>,
    poisoned: Option<String>,
    shared: Arc<Shared>,
    /// Records and bytes since the last checkpoint.
    since_checkpoint: (u64, u64),
}

/// A ticket to resolve, with the index of its last entry in the record and when it
/// was appended.
type Waiter = (oneshot::Sender<Result<Position, JournalError>>, u32, Instant);

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<Waiter> = Vec::new();
        let mut pending: Option<Cmd> = None;
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            pending = self.step(cmd, &mut rx, &mut batch);
        }
    }

    /// [`Writer::run`] as a task (see [`crate::JournalConfig::writer_task`]).
    async fn run_task(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut batch: Vec<Waiter> = Vec::new();
        let mut pending: Option<Cmd> = None;
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => break,
                },
            };
            pending = self.step(cmd, &mut rx, &mut batch);
        }
    }

    /// Carries out one command (an append gathers what else is queued into its
    /// record); returns a command taken from the queue and not yet carried out.
    fn step(&mut self, cmd: Cmd, rx: &mut mpsc::Receiver<Cmd>, batch: &mut Vec<Waiter>) -> Option<Cmd> {
        match cmd {
            Cmd::Append { messages, done, at } => {
                self.start_record();
                let mut entries = 0;
                add(&mut self.buf, &mut entries, batch, messages, (done, at));
                let pending = self.gather(rx, batch, &mut entries);
                self.commit(batch, entries);
                return pending;
            }
            Cmd::Checkpoint { state, at, done } => {
                let _ = done.send(self.checkpoint(&state, at));
            }
            Cmd::Flush { done } => {
                let _ = done.send(match &self.poisoned {
                    Some(p) => Err(JournalError::Poisoned(p.clone())),
                    None => Ok(self.next_seq),
                });
            }
            Cmd::Read { from, done } => {
                let _ = done.send(self.read_from(from));
            }
            Cmd::Truncate { from, done } => {
                let result = self.truncate_from(from);
                if let Err(e) = &result
                    && !matches!(e, JournalError::OutOfRange { .. } | JournalError::Poisoned(_))
                {
                    // Half a truncation leaves the files in doubt, like a failed write.
                    self.poison(e);
                }
                let _ = done.send(result);
            }
            Cmd::Purge { seq, done } => {
                let _ = done.send(self.purge_before(seq));
            }
        }
        None
    }

    fn start_record(&mut self) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
    }

    /// Adds every append already waiting (and, with a batch delay, those arriving
    /// soon) to the current record. Returns a non-append command that ended the batch.
    fn gather(&mut self, rx: &mut mpsc::Receiver<Cmd>, batch: &mut Vec<Waiter>, entries: &mut u32) -> Option<Cmd> {
        let deadline = Instant::now() + self.config.max_batch_delay;
        let limit = self.config.max_batch_bytes.min(self.config.limits.max_record);
        loop {
            match rx.try_recv() {
                Ok(Cmd::Append { messages, done, at }) => {
                    let size: usize = messages.iter().map(Bytes::len).sum();
                    if self.buf.len() + size > limit {
                        return Some(Cmd::Append { messages, done, at });
                    }
                    add(&mut self.buf, entries, batch, messages, (done, at));
                }
                Ok(other) => return Some(other),
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() < deadline && !self.config.writer_task => {
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(_) => return None,
            }
        }
    }

    /// Writes the current record, syncs, and resolves the batch's tickets.
    fn commit(&mut self, batch: &mut Vec<Waiter>, entries: u32) {
        if let Some(p) = &self.poisoned {
            for (w, _, _) in batch.drain(..) {
                let _ = w.send(Err(JournalError::Poisoned(p.clone())));
            }
            return;
        }
        let seq = self.next_seq;
        let payload_len = self.buf.len() - HEADER_LEN;
        let header = RecordHeader {
            committer_id: self.committer_id,
            length: self.buf.len() as i32,
            check: check_bytes(&self.buf[HEADER_LEN..]),
            seq,
        };
        let mut head = Vec::with_capacity(HEADER_LEN);
        header.encode(&mut head);
        self.buf[..HEADER_LEN].copy_from_slice(&head);

        let result = self.write_and_sync();
        match result {
            Ok(()) => {
                self.next_seq += 1;
                self.file_len += self.buf.len() as u64;
                let s = &self.shared;
                s.entries.fetch_add(u64::from(entries), Ordering::Relaxed);
                s.records.fetch_add(1, Ordering::Relaxed);
                s.bytes.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                s.max_batch.fetch_max(u64::from(entries), Ordering::Relaxed);
                s.durable_seq.store(self.next_seq, Ordering::SeqCst);
                self.since_checkpoint.0 += 1;
                self.since_checkpoint.1 += self.buf.len() as u64;
                if self.since_checkpoint.0 >= self.config.checkpoint_every_records
                    || self.since_checkpoint.1 >= self.config.checkpoint_every_bytes
                {
                    s.checkpoint_due.store(true, Ordering::Relaxed);
                }
                s.batch_entries.observe(u64::from(entries));
                for (w, index, at) in batch.drain(..) {
                    s.append_latency.observe_duration(at.elapsed());
                    let _ = w.send(Ok(Position { seq, index }));
                }
                if self.file_len >= self.config.segment_bytes
                    && let Err(e) = self.rotate()
                {
                    self.poison(&e);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, record = seq, payload = payload_len, "journal write failed; journal stops");
                self.poison(&e);
                for (w, _, _) in batch.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
    }

    fn poison(&mut self, e: &JournalError) {
        self.poisoned.get_or_insert_with(|| e.to_string());
    }

    fn segment_path(&self) -> PathBuf {
        self.config.dir.join(segment_name(self.file_first_seq))
    }

    fn write_and_sync(&mut self) -> Result<(), JournalError> {
        self.file.write_all(&self.buf).map_err(|e| JournalError::io("write", &self.segment_path(), e))?;
        if self.config.fsync == FsyncMode::Always {
            let t = Instant::now();
            self.file.sync_data().map_err(|e| JournalError::io("fsync", &self.segment_path(), e))?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            let took = t.elapsed();
            self.shared.fsync_nanos.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            self.shared.fsync_latency.observe_duration(took);
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let path = self.config.dir.join(segment_name(self.next_seq));
        self.file = self.storage.open_append(&path).map_err(|e| JournalError::io("create", &path, e))?;
        self.storage.sync_dir(&self.config.dir).map_err(|e| JournalError::io("sync", &self.config.dir, e))?;
        self.file_len = 0;
        self.file_first_seq = self.next_seq;
        Ok(())
    }

    fn checkpoint(&mut self, state: &[u8], at: Option<i64>) -> Result<i64, JournalError> {
        if let Some(p) = &self.poisoned {
            return Err(JournalError::Poisoned(p.clone()));
        }
        let started = Instant::now();
        let covered = match at {
            None => self.next_seq,
            Some(seq) => {
                let listing = self.listing()?;
                let first = self.first_held(&listing);
                let newest = listing.checkpoints.last().copied().unwrap_or(first);
                if seq > self.next_seq || seq < newest {
                    return Err(JournalError::OutOfRange { seq, first: newest, next: self.next_seq });
                }
                seq
            }
        };
        let path = self.config.dir.join(crate::checkpoint_name(covered));
        let bytes = checkpoint::encode(self.committer_id, covered, state);
        self.storage.write_atomic(&path, &bytes).map_err(|e| JournalError::io("write", &path, e))?;
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.shared.checkpoint_latency.observe_duration(started.elapsed());
        self.shared.checkpoint_due.store(false, Ordering::Relaxed);
        self.since_checkpoint = (0, 0);
        // Each checkpoint starts a new segment, so that trimming removes whole files.
        if self.file_len > 0 {
            self.rotate()?;
        }
        if let Err(e) = self.trim() {
            // Trimming only saves space; a failure is worth a log line, not an outage.
            tracing::warn!(error = %e, "journal trim failed");
        }
        Ok(covered)
    }

    /// Keeps the newest `keep_checkpoints` checkpoints and removes segments that only
    /// hold records the oldest kept checkpoint covers.
    fn trim(&mut self) -> Result<(), JournalError> {
        let listing = self.listing()?;
        let keep = self.config.keep_checkpoints.max(1).min(listing.checkpoints.len());
        let Some(&oldest_kept) = listing.checkpoints.get(listing.checkpoints.len() - keep) else { return Ok(()) };
        self.purge(&listing, oldest_kept).map(drop)
    }

    /// The journal directory's segments and checkpoints.
    fn listing(&self) -> Result<Listing, JournalError> {
        Listing::read(self.storage.as_ref(), &self.config.dir)
    }

    /// The first sequence id held (`next_seq` when no record is).
    fn first_held(&self, listing: &Listing) -> i64 {
        listing.segments.first().copied().unwrap_or(self.next_seq).min(self.next_seq)
    }

    /// Drops the checkpoints before the one covering up to `seq` and the segments that
    /// only hold records it covers. Returns the first sequence id still held.
    fn purge_before(&mut self, seq: i64) -> Result<i64, JournalError> {
        let listing = self.listing()?;
        self.purge(&listing, seq)
    }

    /// [`Writer::purge_before`] on a listing just read.
    fn purge(&mut self, listing: &Listing, seq: i64) -> Result<i64, JournalError> {
        let dir = self.config.dir.clone();
        let first = self.first_held(listing);
        if !listing.checkpoints.contains(&seq) {
            return Err(JournalError::OutOfRange { seq, first, next: self.next_seq });
        }
        for &old in listing.checkpoints.iter().filter(|&&c| c < seq) {
            let p = dir.join(crate::checkpoint_name(old));
            self.storage.remove(&p).map_err(|e| JournalError::io("remove", &p, e))?;
        }
        let mut first_kept = first;
        for pair in listing.segments.windows(2) {
            let (this, next) = (pair[0], pair[1]);
            if next <= seq && this != self.file_first_seq {
                let p = dir.join(segment_name(this));
                self.storage.remove(&p).map_err(|e| JournalError::io("remove", &p, e))?;
                first_kept = next;
            }
        }
        self.storage.sync_dir(&dir).map_err(|e| JournalError::io("sync", &dir, e))?;
        Ok(first_kept)
    }

    /// Reads one segment and its whole records.
    fn load_segment(&self, first: i64) -> Result<Segment, JournalError> {
        let path = self.config.dir.join(segment_name(first));
        let data = Bytes::from(self.storage.read(&path).map_err(|e| JournalError::io("read", &path, e))?);
        let scan = scan_segment(&data, self.committer_id, first, &self.config.limits);
        if let Some(found) = scan.damage {
            return Err(JournalError::Corrupt {
                file: path,
                offset: found.offset as u64,
                damage: found.damage.to_string(),
            });
        }
        Ok(Segment { path, data, records: scan.records })
    }

    fn read_from(&self, from: i64) -> Result<Vec<ReplayEntry>, JournalError> {
        let listing = self.listing()?;
        let first = self.first_held(&listing);
        let segments = listing.segments;
        if from < first || from > self.next_seq {
            return Err(JournalError::OutOfRange { seq: from, first, next: self.next_seq });
        }
        let start = segments.iter().rposition(|&s| s <= from).unwrap_or(0);
        let mut out = Vec::new();
        for &s in &segments[start..] {
            let seg = self.load_segment(s)?;
            for rec in seg.records.iter().filter(|r| r.seq >= from) {
                for m in (Messages { seg: &seg, rec, at: rec.payload.start, failed: false }) {
                    out.push(m?);
                }
            }
        }
        Ok(out)
    }

    fn truncate_from(&mut self, from: i64) -> Result<(), JournalError> {
        if let Some(p) = &self.poisoned {
            return Err(JournalError::Poisoned(p.clone()));
        }
        let listing = self.listing()?;
        let first = self.first_held(&listing);
        if from < first || from > self.next_seq {
            return Err(JournalError::OutOfRange { seq: from, first, next: self.next_seq });
        }
        if from == self.next_seq {
            return Ok(());
        }
        let dir = self.config.dir.clone();
        for &c in listing.checkpoints.iter().filter(|&&c| c > from) {
            let p = dir.join(crate::checkpoint_name(c));
            self.storage.remove(&p).map_err(|e| JournalError::io("remove", &p, e))?;
        }
        let segments = &listing.segments;
        let at = segments.iter().rposition(|&s| s <= from).unwrap_or(0);
        for &s in &segments[at + 1..] {
            let p = dir.join(segment_name(s));
            self.storage.remove(&p).map_err(|e| JournalError::io("remove", &p, e))?;
        }
        let seg = self.load_segment(segments[at])?;
        let offset = seg.records.iter().find(|r| r.seq == from).map_or(seg.data.len(), |r| r.offset);
        self.storage.truncate(&seg.path, offset as u64).map_err(|e| JournalError::io("truncate", &seg.path, e))?;
        self.storage.sync_dir(&dir).map_err(|e| JournalError::io("sync", &dir, e))?;
        self.file = self.storage.open_append(&seg.path).map_err(|e| JournalError::io("open", &seg.path, e))?;
        self.file_len = offset as u64;
        self.file_first_seq = segments[at];
        self.next_seq = from;
        self.shared.durable_seq.store(from, Ordering::SeqCst);
        Ok(())
    }
}

/// Adds an append's messages to the record being built.
fn add(
    buf: &mut Vec<u8>,
    entries: &mut u32,
    batch: &mut Vec<Waiter>,
    messages: Vec<Bytes>,
    (done, at): (oneshot::Sender<Result<Position, JournalError>>, Instant),
) {
    for m in &messages {
        buf.extend_from_slice(m);
    }
    *entries += messages.len() as u32;
    batch.push((done, entries.saturating_sub(1), at));
}
