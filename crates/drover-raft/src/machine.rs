//! openraft's state machine over a drover [`StateMachine`] (the controller's core, or
//! any machine the journal can replay).
//!
//! Committed entries arrive in order: a normal entry's input messages are decoded as
//! the journal's replay decodes them and applied to the core; the core's outputs are
//! kept for the shell ([`RaftMachine::take_outputs`]), which is how the output rule
//! holds: an output exists only once its input is committed. Membership entries are
//! remembered. A snapshot is the core's checkpoint plus the applied log id and the
//! membership, saved durably in the file [`SNAPSHOT_FILE`] (format 1: the length of a
//! header u32, the header (last applied log id and membership log id, each a present
//! byte and term, node id, index u64; the membership as `record` encodes it; the
//! snapshot id), then the core's checkpoint bytes). The snapshot it replaces is kept,
//! in the same format, as [`PREVIOUS_SNAPSHOT_FILE`]: with the log the journal keeps
//! since the previous purge, it is where an upgrade what-if run starts ([`what_if_dir`]).

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use drover_journal::recovery::{Recovery, Start};
use drover_journal::{ReplayEntry, StateMachine, Storage};
use drover_wire::ambrosia::varint;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};

use crate::record::{self, RecordError};
use crate::stats::RaftStats;
use crate::types::{Entry, Inputs, LogId, StorageError, TypeConfig};

/// A batch of committed entries at least this large is applied off the async workers.
const LARGE_APPLY_BYTES: usize = 256 << 10;

/// The file holding the newest snapshot, beside the journal's files.
pub const SNAPSHOT_FILE: &str = "raft-snapshot";

/// The file holding the snapshot before the newest (written since the format of
/// release 0.1's `raft2` golden directory; older directories have none).
pub const PREVIOUS_SNAPSHOT_FILE: &str = "raft-snapshot.prev";

type Meta = SnapshotMeta<u64, BasicNode>;

/// The snapshot file cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("raft snapshot: {0}")]
pub struct SnapshotError(String);

struct Applied<M: StateMachine> {
    machine: M,
    last_applied: Option<LogId>,
    membership: StoredMembership<u64, BasicNode>,
    outputs: Vec<M::Output>,
    snapshot: Option<(Meta, Vec<u8>)>,
    built: u64,
    /// Whether outputs are kept for the shell (a leader's), or dropped as they are
    /// made (a follower's: its shell has no one to send them to)...
    keep: bool,
    /// ...except those this says a follower's shell acts on too (the controller's:
    /// evictions, since a follower may hold the evicted node's control channel).
    follower_keeps: Option<fn(&M::Output) -> bool>,
}

/// openraft's state machine over a drover core `M`.
pub struct RaftMachine<M: StateMachine> {
    applied: Arc<Mutex<Applied<M>>>,
    storage: Arc<dyn Storage>,
    path: PathBuf,
    stats: Arc<RaftStats>,
}

/// Another handle on the same state machine (the shell keeps one to read the core and
/// take outputs while openraft owns the other).
impl<M: StateMachine> Clone for RaftMachine<M> {
    fn clone(&self) -> Self {
        RaftMachine {
            applied: self.applied.clone(),
            storage: self.storage.clone(),
            path: self.path.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// Builds snapshots of a [`RaftMachine`].
pub struct Builder<M: StateMachine> {
    applied: Arc<Mutex<Applied<M>>>,
    storage: Arc<dyn Storage>,
    path: PathBuf,
    stats: Arc<RaftStats>,
}

fn lock<M: StateMachine>(m: &Mutex<Applied<M>>) -> MutexGuard<'_, Applied<M>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn sm_err(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snapshot_err(e: impl ToString) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// The snapshot file's bytes for `meta` and the core's checkpoint.
fn encode_snapshot(meta: &Meta, core: &[u8]) -> Vec<u8> {
    let mut h = vec![1u8];
    record::put_log_id(&mut h, meta.last_log_id);
    record::put_log_id(&mut h, *meta.last_membership.log_id());
    record::encode_membership_bytes(meta.last_membership.membership(), &mut h);
    h.extend_from_slice(&(meta.snapshot_id.len() as u32).to_le_bytes());
    h.extend_from_slice(meta.snapshot_id.as_bytes());
    let mut out = Vec::with_capacity(4 + h.len() + core.len());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(core);
    out
}

/// Splits a snapshot file into its meta and the core's checkpoint.
fn decode_snapshot(bytes: &[u8]) -> Result<(Meta, &[u8]), RecordError> {
    let mut r = record::Reader::new(bytes, "snapshot");
    let len = r.u32()? as usize;
    let mut h = record::Reader::new(r.take(len)?, "snapshot");
    match h.u8()? {
        1 => {}
        f => return Err(record::bad("snapshot", format!("format {f} is not one this binary reads (it reads 1)"))),
    }
    let last_log_id = h.log_id()?;
    let membership_id = h.log_id()?;
    let membership = record::decode_membership_from(&mut h)?;
    let id_len = h.u32()? as usize;
    let snapshot_id =
        String::from_utf8(h.take(id_len)?.to_vec()).map_err(|_| record::bad("snapshot", "id is not UTF-8"))?;
    let meta = Meta { last_log_id, last_membership: StoredMembership::new(membership_id, membership), snapshot_id };
    Ok((meta, r.rest()))
}

impl<M: StateMachine + Send + Sync + 'static> RaftMachine<M>
where
    M::Output: Send + Sync,
{
    /// Opens the state machine whose snapshot lives in `dir` (a fresh core from `fresh`
    /// when there is none).
    pub fn open(
        dir: impl Into<PathBuf>,
        storage: Arc<dyn Storage>,
        fresh: impl FnOnce() -> M,
    ) -> Result<RaftMachine<M>, SnapshotError> {
        let path = dir.into().join(SNAPSHOT_FILE);
        let applied = load(&*storage, &path, fresh, true)?;
        Ok(RaftMachine { applied: Arc::new(Mutex::new(applied)), storage, path, stats: Arc::default() })
    }

    /// The member's consensus counters (snapshots are counted here; the member shares
    /// the same counters with its network and its leadership watcher).
    pub fn stats(&self) -> Arc<RaftStats> {
        self.stats.clone()
    }

    /// The outputs of every entry applied since the last call (committed inputs only).
    pub fn take_outputs(&self) -> Vec<M::Output> {
        std::mem::take(&mut lock(&self.applied).outputs)
    }

    /// Runs `f` on the core (for queries).
    pub fn with_core<T>(&self, f: impl FnOnce(&M) -> T) -> T {
        f(&lock(&self.applied).machine)
    }

    /// The core, for queries, until the guard is dropped (entries wait to be applied
    /// meanwhile: keep it short, and never across an `.await`).
    pub fn core(&self) -> Core<'_, M> {
        Core(lock(&self.applied))
    }

    /// Keep outputs for [`take_outputs`](Self::take_outputs) (a leader), or drop them
    /// as they are made (a follower). Turning it off also drops those kept so far.
    pub fn keep_outputs(&self, keep: bool) {
        let mut a = lock(&self.applied);
        a.keep = keep;
        if !keep {
            a.outputs.clear();
        }
    }

    /// While outputs are not kept (a follower), keep still those `keeps` accepts, for
    /// [`take_outputs`](Self::take_outputs) (the few a follower's shell acts on).
    pub fn keep_when_following(&self, keeps: fn(&M::Output) -> bool) {
        lock(&self.applied).follower_keeps = Some(keeps);
    }

    /// The log id of the last entry applied.
    pub fn last_applied(&self) -> Option<LogId> {
        lock(&self.applied).last_applied
    }
}

/// The core of a [`RaftMachine`], borrowed (see [`RaftMachine::core`]).
pub struct Core<'a, M: StateMachine>(MutexGuard<'a, Applied<M>>);

impl<M: StateMachine> std::ops::Deref for Core<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.0.machine
    }
}

/// Saves `new` as the snapshot file at `path`, after keeping `old` (the snapshot it
/// replaces, if any) as [`PREVIOUS_SNAPSHOT_FILE`] beside it. A crash between the two
/// leaves both files holding the old snapshot, which is still the current one.
async fn save_snapshot(
    storage: Arc<dyn Storage>,
    path: PathBuf,
    old: Option<Vec<u8>>,
    new: Vec<u8>,
) -> Result<(), StorageError> {
    tokio::task::spawn_blocking(move || {
        if let Some(old) = old {
            storage.write_atomic(&path.with_file_name(PREVIOUS_SNAPSHOT_FILE), &old)?;
        }
        storage.write_atomic(&path, &new)
    })
    .await
    .map_err(snapshot_err)?
    .map_err(snapshot_err)
}

/// The applied state as the snapshot file at `path` holds it (a fresh core from
/// `fresh` when there is none); `keep`: whether outputs are kept (see
/// [`RaftMachine::keep_outputs`]).
fn load<M: StateMachine>(
    storage: &dyn Storage,
    path: &std::path::Path,
    fresh: impl FnOnce() -> M,
    keep: bool,
) -> Result<Applied<M>, SnapshotError> {
    Ok(match read_snapshot(storage, path)? {
        Some((meta, core, bytes)) => Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            snapshot: Some((meta, bytes)),
            ..Applied::new(core, keep)
        },
        None => Applied::new(fresh(), keep),
    })
}

/// The snapshot file at `path` (its header, the core it holds, its bytes), or `None`
/// when there is none.
fn read_snapshot<M: StateMachine>(
    storage: &dyn Storage,
    path: &std::path::Path,
) -> Result<Option<(Meta, M, Vec<u8>)>, SnapshotError> {
    let bytes = match storage.read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotError(format!("reading {}: {e}", path.display()))),
    };
    let (meta, core) = decode_snapshot(&bytes).map_err(|e| SnapshotError(format!("{}: {e}", path.display())))?;
    let core =
        M::restore(core).map_err(|e| SnapshotError(format!("{}: the core does not restore: {e}", path.display())))?;
    Ok(Some((meta, core, bytes)))
}

impl<M: StateMachine> Applied<M> {
    /// `machine` with nothing applied yet.
    fn new(machine: M, keep: bool) -> Applied<M> {
        Applied {
            machine,
            last_applied: None,
            membership: StoredMembership::default(),
            outputs: Vec::new(),
            snapshot: None,
            built: 0,
            keep,
            follower_keeps: None,
        }
    }
}

/// The Raft entries of the member log in `dir`, read from the checkpoint `start` names
/// (recovery may repair a torn tail: give it a copy), for tools.
fn read_log(dir: &std::path::Path, storage: &Arc<dyn Storage>, start: Start) -> Result<Recovery, String> {
    drover_journal::recovery::recover_from(&crate::log_store::journal_config(dir), storage, start)
        .map_err(|e| format!("reading the log: {e}"))
}

/// One logged message of [`read_log`] as the Raft entry it holds.
fn logged_entry(m: Result<ReplayEntry, drover_journal::JournalError>) -> Result<Entry, String> {
    let m = m.map_err(|e| format!("reading the log: {e}"))?;
    record::decode_entry(&m.message)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("record {} holds a message that is not a Raft entry", m.seq))
}

/// A member's core as its directory holds it (see [`replay_dir`]).
pub struct Replayed<M> {
    /// The core.
    pub core: M,
    /// The index of the snapshot it started from (0: none).
    pub snapshot_index: u64,
    /// The last entry applied after the snapshot (its term and index).
    pub last: Option<LogId>,
    /// Normal entries applied after the snapshot.
    pub entries: u64,
}

/// The core of the member whose Raft directory is `dir`: its snapshot, then every
/// entry in its log after it, in order. For tools (`drover journal state` on a
/// member's directory); give it a copy, since opening the journal repairs a torn tail.
/// The last entries may not be committed yet (a member does not record how far the
/// group committed): the result is what this member would apply if they are.
pub fn replay_dir<M: StateMachine>(
    dir: &std::path::Path,
    storage: Arc<dyn Storage>,
    fresh: impl FnOnce() -> M,
) -> Result<Replayed<M>, String> {
    let mut a = load(&*storage, &dir.join(SNAPSHOT_FILE), fresh, false).map_err(|e| e.to_string())?;
    let snapshot_index = a.last_applied.map_or(0, |l| l.index);
    let recovery = read_log(dir, &storage, Start::NewestCheckpoint)?;
    let mut entries = 0;
    for entry in recovery.entries().map(logged_entry) {
        let entry = entry?;
        if entry.log_id.index <= snapshot_index && snapshot_index > 0 {
            continue;
        }
        if let EntryPayload::Normal(Inputs(data)) = &entry.payload {
            apply_inputs(&mut a, entry.log_id, data)?;
            entries += 1;
        }
        a.last_applied = Some(entry.log_id);
    }
    Ok(Replayed { core: a.machine, snapshot_index, last: a.last_applied, entries })
}

/// One stretch of a member's log replayed between two of its states.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stretch {
    /// The first entry replayed (the state it started from covers those before).
    pub first_index: u64,
    /// The snapshot compared at the end: it covers the entries up to this one.
    pub snapshot_index: u64,
    /// Normal entries (batches of inputs) replayed.
    pub entries: u64,
}

/// Where a what-if run over a member's directory started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStart {
    /// Nowhere: no state the log continues (nothing was replayed).
    #[default]
    Nowhere,
    /// A fresh core, at the group's first entry.
    FirstEntry,
    /// The snapshot covering the entries up to this one.
    Snapshot(u64),
}

/// The outcome of a what-if run over a member's directory ([`what_if_dir`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemberWhatIf {
    /// Where replay started.
    pub start: ReplayStart,
    /// The log still starts at the group's first entry, but no seeded core was given
    /// to replay it from there.
    pub first_entry_unused: bool,
    /// Stretches that replayed to exactly the snapshot's state.
    pub matched: Vec<Stretch>,
    /// The first stretch that did not, and the first part of the state that differs.
    pub diverged: Option<(Stretch, String)>,
    /// Normal entries after the last compared snapshot: replayed, nothing to compare.
    pub unchecked_entries: u64,
    /// Snapshots (by the entry they cover) not compared, and why.
    pub skipped: Vec<(u64, String)>,
}

/// Upgrade what-if over the member whose Raft directory is `dir` (give it a copy, as
/// for [`replay_dir`]): this binary's core replays the log from the oldest state the
/// directory holds that the log continues (the previous snapshot; the start of the
/// log when `fresh` is given, since a member's core is seeded from the cluster
/// secret), and its state is compared with every later snapshot the directory holds.
/// The journal keeps the log back to the purge before last, so the previous snapshot
/// is normally covered; a member caught up by a snapshot from the leader has a gap
/// instead, reported as a snapshot not compared.
pub fn what_if_dir<M: StateMachine + drover_journal::Divergence>(
    dir: &std::path::Path,
    storage: Arc<dyn Storage>,
    fresh: Option<M>,
) -> Result<MemberWhatIf, String> {
    let mut recorded: Vec<(u64, M)> = Vec::new();
    for name in [PREVIOUS_SNAPSHOT_FILE, SNAPSHOT_FILE] {
        if let Some((meta, core, _)) = read_snapshot::<M>(&*storage, &dir.join(name)).map_err(|e| e.to_string())?
            && let Some(last) = meta.last_log_id
        {
            recorded.push((last.index, core));
        }
    }
    recorded.sort_by_key(|(i, _)| *i);
    recorded.dedup_by_key(|(i, _)| *i);
    let recovery = read_log(dir, &storage, Start::OldestCheckpoint)?;
    let mut log = recovery.entries().map(logged_entry).peekable();
    let first = match log.peek() {
        Some(Ok(e)) => e.log_id.index,
        Some(Err(e)) => return Err(e.clone()),
        None => u64::MAX,
    };
    let mut report = MemberWhatIf::default();
    // The oldest state the log continues: the start (entry 0 is the group's first
    // membership), else the oldest snapshot whose next entry the log holds.
    let start = match fresh {
        Some(core) if first == 0 => (None, core),
        _ => {
            report.first_entry_unused = first == 0;
            let Some(at) = recorded.iter().position(|(i, _)| i.saturating_add(1) >= first) else {
                report.skipped.extend(recorded.iter().map(|(i, _)| (*i, "the log does not reach back to it".into())));
                return Ok(report);
            };
            let (index, core) = recorded.remove(at);
            report.skipped.extend(recorded.drain(..at).map(|(i, _)| (i, "older than the log".into())));
            (Some(index), core)
        }
    };
    report.start = start.0.map_or(ReplayStart::FirstEntry, ReplayStart::Snapshot);
    let mut a = Applied::new(start.1, false);
    let mut at = start.0;
    let mut targets = recorded.into_iter().filter(move |(i, _)| Some(*i) > start.0).peekable();
    let mut stretch = Stretch { first_index: at.map_or(0, |i| i + 1), snapshot_index: 0, entries: 0 };
    for entry in log {
        let entry = entry?;
        let index = entry.log_id.index;
        if at.is_some_and(|a| index <= a) {
            continue;
        }
        let expected = at.map_or(0, |a| a + 1);
        if index != expected {
            let why = format!(
                "the log skips from entry {expected} to {index} (a snapshot from the leader caught this member up)"
            );
            report.skipped.extend(targets.map(|(i, _)| (i, why.clone())));
            return Ok(report);
        }
        if let EntryPayload::Normal(Inputs(data)) = &entry.payload {
            apply_inputs(&mut a, entry.log_id, data)?;
            stretch.entries += 1;
        }
        at = Some(index);
        if let Some((_, recorded)) = targets.next_if(|(target, _)| *target == index) {
            let done = Stretch { snapshot_index: index, ..stretch.clone() };
            stretch = Stretch { first_index: index + 1, snapshot_index: 0, entries: 0 };
            match a.machine.first_difference(&recorded) {
                None => report.matched.push(done),
                Some(part) => {
                    report.diverged = Some((done, part));
                    return Ok(report);
                }
            }
        }
    }
    report.skipped.extend(targets.map(|(i, _)| (i, "past the end of the log".into())));
    report.unchecked_entries = stretch.entries;
    Ok(report)
}

/// Applies one normal entry's input messages.
fn apply_inputs<M: StateMachine>(a: &mut Applied<M>, id: LogId, data: &[u8]) -> Result<(), String> {
    let mut at = 0;
    while at < data.len() {
        let (size, n) = match varint::get_int(&data[at..]) {
            Ok(Some((size, n))) if size > 0 && at + n + size as usize <= data.len() => (size as usize, n),
            _ => return Err(format!("malformed input message at byte {at}")),
        };
        let message = Bytes::copy_from_slice(&data[at + n..at + n + size]);
        at += n + size;
        let entry = ReplayEntry { seq: id.index as i64, message };
        if let Some(input) = drover_journal::machine::decode_entry::<M>(&entry).map_err(|e| e.to_string())? {
            a.machine.apply(input, &mut a.outputs);
            if !a.keep {
                match a.follower_keeps {
                    Some(keeps) => a.outputs.retain(keeps),
                    None => a.outputs.clear(),
                }
            }
        }
    }
    Ok(())
}

impl<M: StateMachine + Send + Sync + 'static> RaftSnapshotBuilder<TypeConfig> for Builder<M>
where
    M::Output: Send + Sync,
{
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, bytes, old) = {
            let mut a = lock(&self.applied);
            a.built += 1;
            let core = a.machine.checkpoint().map_err(snapshot_err)?;
            let snapshot_id = match a.last_applied {
                Some(id) => format!("{}-{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index, a.built),
                None => format!("none-{}", a.built),
            };
            let meta = Meta { last_log_id: a.last_applied, last_membership: a.membership.clone(), snapshot_id };
            let bytes = encode_snapshot(&meta, &core);
            (meta, bytes, a.snapshot.as_ref().map(|(_, old)| old.clone()))
        };
        save_snapshot(self.storage.clone(), self.path.clone(), old, bytes.clone()).await?;
        lock(&self.applied).snapshot = Some((meta.clone(), bytes.clone()));
        RaftStats::bump(&self.stats.snapshots_built);
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl<M: StateMachine + Send + Sync + 'static> RaftStateMachine<TypeConfig> for RaftMachine<M>
where
    M::Output: Send + Sync,
{
    type SnapshotBuilder = Builder<M>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<u64, BasicNode>), StorageError> {
        let a = lock(&self.applied);
        Ok((a.last_applied, a.membership.clone()))
    }

    // openraft's own error type is the large one.
    #[allow(clippy::result_large_err)]
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let bytes: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(Inputs(data)) => data.len(),
                _ => 0,
            })
            .sum();
        let apply = || {
            let mut a = lock(&self.applied);
            let mut replies = Vec::with_capacity(entries.len());
            for e in entries {
                a.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(Inputs(data)) => apply_inputs(&mut a, e.log_id, &data)
                        .map_err(|why| StorageError::from(StorageIOError::apply(e.log_id, AnyError::error(why))))?,
                    EntryPayload::Membership(m) => a.membership = StoredMembership::new(Some(e.log_id), m),
                }
                replies.push(());
            }
            Ok(replies)
        };
        // A large batch (a member applying its backlog after a restart: thousands of
        // entries of hundreds of inputs) is CPU work of seconds; on a worker thread of
        // its own, so the Raft port, heartbeats and timers of this member keep running.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && bytes >= LARGE_APPLY_BYTES { tokio::task::block_in_place(apply) } else { apply() }
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder {
            applied: self.applied.clone(),
            storage: self.storage.clone(),
            path: self.path.clone(),
            stats: self.stats.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        // The bytes carry the leader's header; the file keeps the meta it was sent with.
        let (_, core) = decode_snapshot(&bytes).map_err(sm_err)?;
        let machine = M::restore(core).map_err(sm_err)?;
        let file = encode_snapshot(meta, core);
        let old = lock(&self.applied).snapshot.as_ref().map(|(_, old)| old.clone());
        save_snapshot(self.storage.clone(), self.path.clone(), old, file.clone()).await?;
        let mut a = lock(&self.applied);
        a.machine = machine;
        a.last_applied = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        a.snapshot = Some((meta.clone(), file));
        RaftStats::bump(&self.stats.snapshots_installed);
        tracing::info!(last = ?meta.last_log_id, "caught up by a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let a = lock(&self.applied);
        Ok(a.snapshot
            .as_ref()
            .map(|(meta, bytes)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(bytes.clone())) }))
    }
}
