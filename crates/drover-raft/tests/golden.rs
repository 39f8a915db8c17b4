//! The Raft member directory format (issue 15) frozen: `tests/golden/raft1/` was written
//! by this crate's own log store and state machine (`DROVER_WRITE_GOLDEN=raft1 cargo
//! test -p drover-raft --test golden`) and is committed. It holds a journal whose
//! records are Raft entries (a membership entry, normal entries of several terms, one
//! record holding several entries), segments removed behind a purge point with the
//! journal checkpoint that marks it, `raft-state` (vote and purge point) and
//! `raft-snapshot`. Every later release must open it to the same log, vote, purge
//! point and state; a change to any of these bytes adds a new golden directory beside
//! this one.
//!
//! `tests/golden/raft2/` (`DROVER_WRITE_GOLDEN=raft2`) adds what the next release
//! writes: `raft-snapshot.prev`, the snapshot before the newest, kept for upgrade
//! what-if runs ([`drover_raft::machine::what_if_dir`]), which both directories serve.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{Sum, id, normal};
use drover_journal::{FsStorage, Storage};
use drover_raft::log_store::journal_config;
use drover_raft::machine::ReplayStart;
use drover_raft::{RaftLog, RaftMachine};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{BasicNode, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/raft1")
}

fn golden2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/raft2")
}

/// A copy of `dir` (opening may repair a torn tail, and a golden stays as written).
fn copy(dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

/// The core of a release whose rules changed: it adds every input twice.
#[derive(Debug, Default)]
struct SumTwice(u64);

impl drover_journal::StateMachine for SumTwice {
    type Input = u64;
    type Output = u64;
    fn apply(&mut self, input: u64, out: &mut Vec<u64>) {
        self.0 += 2 * input;
        out.push(self.0);
    }
    fn encode_input(input: &u64, buf: &mut Vec<u8>) -> Result<(), drover_journal::EncodeError> {
        Sum::encode_input(input, buf)
    }
    fn decode_input(bytes: &[u8]) -> Result<u64, drover_journal::DecodeError> {
        Sum::decode_input(bytes)
    }
    fn checkpoint(&self) -> Result<Vec<u8>, drover_journal::EncodeError> {
        Sum(self.0).checkpoint()
    }
    fn restore(bytes: &[u8]) -> Result<Self, drover_journal::DecodeError> {
        Sum::restore(bytes).map(|s| SumTwice(s.0))
    }
}

impl drover_journal::Divergence for SumTwice {
    fn first_difference(&self, other: &Self) -> Option<String> {
        (self.0 != other.0).then(|| format!("the sum: {} replayed, {} recorded", self.0, other.0))
    }
}

fn config(dir: &Path) -> drover_journal::JournalConfig {
    let mut c = journal_config(dir);
    // Small segments, so the purge removes some.
    c.segment_bytes = 4 << 10;
    c
}

/// Writes the golden directory: entries 0..=60 (0 a membership of members 1 and 2;
/// 1..=40 of term 1, each adding its index; 41..=60 of term 2, as one record of five
/// and then one each), vote (term 2, member 2, committed), a snapshot at 50, the log
/// purged to 45.
async fn write(dir: &Path) {
    write_with(dir, &[]).await
}

/// [`write`], with a snapshot and a purge at each of `earlier` (snapshot index, purge
/// index) before the snapshot at 50 and the purge to 45.
async fn write_with(dir: &Path, earlier: &[(u64, u64)]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut log = RaftLog::open(config(dir), storage.clone()).unwrap();
    let mut sm = RaftMachine::open(dir, storage.clone(), Sum::default).unwrap();
    let nodes: BTreeMap<u64, BasicNode> =
        [(1, BasicNode::new("10.0.0.1:7701")), (2, BasicNode::new("10.0.0.2:7701"))].into();
    let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2])], nodes);
    let first = openraft::Entry { log_id: id(1, 0), payload: EntryPayload::Membership(membership) };
    log.blocking_append([first.clone()]).await.unwrap();
    sm.apply([first]).await.unwrap();
    let mut entries: Vec<_> = (1..=40).map(|i| vec![normal(1, i, &[i; 40])]).collect();
    entries.push((41..=45).map(|i| normal(2, i, &[i; 40])).collect());
    entries.extend((46..=60).map(|i| vec![normal(2, i, &[i; 40])]));
    let mut earlier = earlier.iter().peekable();
    for batch in entries {
        log.blocking_append(batch.clone()).await.unwrap();
        for e in batch {
            let index = e.log_id.index;
            if index <= 50 {
                sm.apply([e]).await.unwrap();
            }
            if let Some(&(_, purge)) = earlier.next_if(|(at, _)| *at == index) {
                sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
                log.purge(id(1, purge)).await.unwrap();
            }
        }
    }
    log.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    log.purge(id(2, 45)).await.unwrap();
    log.close().await;
    std::fs::remove_file(dir.join("LOCK")).ok();
}

/// Opens the log in `dir` and checks what both golden directories hold: purged to 45,
/// entries up to 60, the vote of member 2 in term 2, committed.
async fn open_log(dir: &Path, storage: &Arc<dyn Storage>) -> RaftLog {
    let mut log = RaftLog::open(config(dir), storage.clone()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(id(2, 45)), Some(id(2, 60))));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(2, 2)));
    log
}

#[tokio::test]
async fn the_first_raft_directory_format_opens_to_the_same_log_vote_and_state() {
    let dir = golden();
    if std::env::var("DROVER_WRITE_GOLDEN").is_ok_and(|v| v == "raft1") {
        write(&dir).await;
    }
    assert!(dir.join(drover_raft::record::STATE_FILE).is_file(), "the golden directory is committed");
    let tmp = copy(&dir);
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut log = open_log(tmp.path(), &storage).await;
    let got = log.try_get_log_entries(..).await.unwrap();
    let want: Vec<_> = (46..=60).map(|i| normal(2, i, &[i; 40])).collect();
    assert_eq!(got, want, "entries 46..=60, byte for byte");
    log.close().await;
    // Segments behind the purge point were removed, and a journal checkpoint marks it.
    let segments = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
        .count();
    let checkpoints = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "ckpt"))
        .count();
    assert!(checkpoints >= 1 && segments >= 1, "{segments} segments, {checkpoints} checkpoints");
    // The snapshot: the sum of inputs 1..=50, forty times each, applied at index 50.
    let mut sm = RaftMachine::open(tmp.path(), storage.clone(), Sum::default).unwrap();
    let sum50: u64 = (1..=50u64).map(|i| 40 * i).sum();
    assert_eq!(sm.with_core(|s| s.0), sum50);
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(id(2, 50)));
    assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![1, 2]);
    // What `drover journal state` computes: the snapshot, then every entry after it.
    let replayed = drover_raft::machine::replay_dir(tmp.path(), storage, Sum::default).unwrap();
    let sum60: u64 = (1..=60u64).map(|i| 40 * i).sum();
    assert_eq!((replayed.core.0, replayed.snapshot_index, replayed.entries), (sum60, 50, 10));
}

#[tokio::test]
async fn the_second_raft_directory_format_keeps_the_previous_snapshot_and_a_what_if_run_compares_with_it() {
    let dir = golden2();
    if std::env::var("DROVER_WRITE_GOLDEN").is_ok_and(|v| v == "raft2") {
        // Entries 1..=40 are of term 1: the snapshot at 30 and the purge to 25 lie there.
        write_with(&dir, &[(30, 25)]).await;
    }
    assert!(dir.join(drover_raft::machine::PREVIOUS_SNAPSHOT_FILE).is_file(), "the golden directory is committed");
    let tmp = copy(&dir);
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    // It opens as raft1 does: the same log, vote and state.
    open_log(tmp.path(), &storage).await.close().await;
    let sm = RaftMachine::open(tmp.path(), storage.clone(), Sum::default).unwrap();
    assert_eq!(sm.with_core(|s| s.0), (1..=50u64).map(|i| 40 * i).sum::<u64>());
    // The journal still holds the log since the purge before last (to 25), so the
    // previous snapshot (at 30) is where a what-if run starts; it reaches the newest
    // snapshot's state (at 50), then replays the ten entries after it.
    let tmp = copy(&dir);
    let report = drover_raft::machine::what_if_dir(tmp.path(), storage.clone(), None::<Sum>).unwrap();
    assert_eq!(report.start, ReplayStart::Snapshot(30));
    assert_eq!(
        report.matched,
        vec![drover_raft::machine::Stretch { first_index: 31, snapshot_index: 50, entries: 20 }]
    );
    assert_eq!((report.diverged.clone(), report.unchecked_entries, report.skipped.len()), (None, 10, 0));
    // A release whose rules add each input twice computes another state: named, with
    // the stretch.
    let tmp = copy(&dir);
    let report = drover_raft::machine::what_if_dir(tmp.path(), storage.clone(), None::<SumTwice>).unwrap();
    let (stretch, part) = report.diverged.expect("the changed rules diverge");
    assert_eq!((stretch.first_index, stretch.snapshot_index), (31, 50));
    assert!(part.contains("replayed"), "{part}");
    // The run wrote nothing into the copy it read (it had no torn tail to repair).
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(std::fs::read(e.path()).unwrap(), std::fs::read(tmp.path().join(e.file_name())).unwrap_or_default());
    }
}

#[tokio::test]
async fn a_what_if_run_on_the_first_format_has_one_snapshot_and_nothing_to_compare_it_with() {
    let tmp = copy(&golden());
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let report = drover_raft::machine::what_if_dir(tmp.path(), storage, None::<Sum>).unwrap();
    assert_eq!(report.start, ReplayStart::Snapshot(50));
    assert!(report.matched.is_empty() && report.diverged.is_none() && report.skipped.is_empty());
    assert_eq!(report.unchecked_entries, 10, "entries 51..=60 replayed with this binary's rules");
}

#[tokio::test]
async fn a_young_member_is_replayed_from_its_first_entry_when_its_core_can_be_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut log = RaftLog::open(config(tmp.path()), storage.clone()).unwrap();
    let mut sm = RaftMachine::open(tmp.path(), storage.clone(), Sum::default).unwrap();
    let membership = openraft::Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, BasicNode::new("a:1"))]));
    let first = openraft::Entry { log_id: id(1, 0), payload: EntryPayload::Membership(membership) };
    log.blocking_append([first.clone()]).await.unwrap();
    sm.apply([first]).await.unwrap();
    for i in 1..=20 {
        log.blocking_append([normal(1, i, &[i])]).await.unwrap();
        if i <= 10 {
            sm.apply([normal(1, i, &[i])]).await.unwrap();
        }
    }
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    log.close().await;
    // With a seeded core, from entry 0 to the snapshot at 10, then ten more.
    let report = drover_raft::machine::what_if_dir(tmp.path(), storage.clone(), Some(Sum::default())).unwrap();
    assert_eq!(report.start, ReplayStart::FirstEntry);
    assert_eq!(report.matched, vec![drover_raft::machine::Stretch { first_index: 0, snapshot_index: 10, entries: 10 }]);
    assert_eq!(report.unchecked_entries, 10);
    // Without, the start of the log is named as not used, and the run starts at the
    // snapshot.
    let report = drover_raft::machine::what_if_dir(tmp.path(), storage, None::<Sum>).unwrap();
    assert_eq!(report.start, ReplayStart::Snapshot(10));
    assert!(report.first_entry_unused && report.skipped.is_empty());
    assert!(report.matched.is_empty());
}
