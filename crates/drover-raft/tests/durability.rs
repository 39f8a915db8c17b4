//! The log store and the state-machine adapter across reopen, on real files: what
//! openraft was told is durable is there after a restart, a truncation in the middle
//! of a group-committed record keeps the entries before it, and the purge point and
//! vote survive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod common;

use common::{Sum, id, normal};
use drover_journal::{FsStorage, Storage};
use drover_raft::log_store::journal_config;
use drover_raft::{Inputs, RaftLog, RaftMachine};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{BasicNode, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

fn open(dir: &std::path::Path) -> RaftLog {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    RaftLog::open(journal_config(dir.join("journal")), storage).unwrap()
}

async fn indexes(log: &mut RaftLog) -> Vec<(u64, u64)> {
    log.try_get_log_entries(..).await.unwrap().iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
}

#[tokio::test]
async fn the_log_vote_and_purge_point_survive_reopen_and_a_truncation_inside_a_record_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    let nodes: BTreeMap<u64, BasicNode> = [(1, BasicNode::new("a:1")), (2, BasicNode::new("b:1"))].into();
    let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2])], nodes);
    let mut first = vec![openraft::Entry { log_id: id(1, 0), payload: EntryPayload::Membership(membership) }];
    first.extend((1..5).map(|i| normal(1, i, &[i])));
    // One append call: one journal record holding entries 0 to 4.
    log.blocking_append(first).await.unwrap();
    log.blocking_append((5..8).map(|i| normal(1, i, &[i]))).await.unwrap();
    log.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    // A new leader overwrites from index 3: entries 3.. go, 0 to 2 (same record) stay.
    log.truncate(id(1, 3)).await.unwrap();
    log.blocking_append((3..6).map(|i| normal(2, i, &[10 * i]))).await.unwrap();
    let want = vec![(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)];
    assert_eq!(indexes(&mut log).await, want);
    log.close().await;

    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, want, "the same log after reopen");
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(2, 2)));
    log.purge(id(1, 1)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(id(1, 1)), Some(id(2, 5))));
    log.close().await;

    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, want[2..].to_vec(), "purged entries stay purged");
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(id(1, 1)));
    // Everything purged: the last log id is the purge point.
    log.purge(id(2, 5)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(id(2, 5)), Some(id(2, 5))));
    log.blocking_append([normal(3, 6, &[1])]).await.unwrap();
    log.close().await;
    let mut log = open(dir.path());
    assert_eq!(indexes(&mut log).await, vec![(3, 6)]);
    log.close().await;
}

#[tokio::test]
async fn committed_inputs_reach_the_core_and_a_snapshot_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut sm = RaftMachine::open(dir.path(), storage.clone(), Sum::default).unwrap();
    sm.apply([normal(1, 1, &[2, 3]), openraft::Entry { log_id: id(1, 2), payload: EntryPayload::Blank }])
        .await
        .unwrap();
    assert_eq!(sm.take_outputs(), vec![2, 5], "one output per committed input, in order");
    sm.apply([normal(1, 3, &[10])]).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(id(1, 3)));
    // A restart restores the core from the snapshot file.
    let mut again = RaftMachine::open(dir.path(), storage.clone(), Sum::default).unwrap();
    assert_eq!(again.with_core(|s| s.0), 15);
    assert_eq!(again.applied_state().await.unwrap().0, Some(id(1, 3)));
    // A follower installs the leader's snapshot.
    let other = tempfile::tempdir().unwrap();
    let mut follower = RaftMachine::open(other.path(), storage, Sum::default).unwrap();
    follower.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(follower.with_core(|s| s.0), 15);
    assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);
    // A bad input in a committed entry is an error, not a panic.
    let bad = openraft::Entry { log_id: id(1, 4), payload: EntryPayload::Normal(Inputs(vec![0x7F])) };
    assert!(follower.apply([bad]).await.is_err());
}

/// A follower handed more entries in one call than one journal record holds (a
/// leader's backlog) stores them all, as several records, and reports them durable
/// (a single record over the limit used to stop the journal, and the member with it).
#[tokio::test]
async fn one_append_larger_than_a_record_is_split_into_records_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut config = journal_config(dir.path().join("journal"));
    config.max_batch_bytes = 64 << 10;
    let mut log = RaftLog::open(config.clone(), storage.clone()).unwrap();
    // 40 entries of about 8 KiB: about 320 KiB in one call, five times the record limit.
    let big: Vec<u64> = (0..1000).collect();
    log.blocking_append((1..=40).map(|i| normal(1, i, &big))).await.unwrap();
    let want: Vec<(u64, u64)> = (1..=40).map(|i| (1, i)).collect();
    assert_eq!(indexes(&mut log).await, want);
    log.close().await;
    let mut log = RaftLog::open(config, storage).unwrap();
    assert_eq!(indexes(&mut log).await, want, "every entry is on disk, in order");
    let inspection =
        drover_journal::inspect::inspect(&dir.path().join("journal"), &FsStorage, &drover_journal::Limits::default())
            .unwrap();
    let records: usize = inspection.segments.iter().map(|s| s.records.len()).sum();
    assert!(records >= 5, "320 KiB under a 64 KiB record limit takes at least 5 records, not {records}");
}

/// Purging behind a snapshot gives the disk back: the journal removes the segments
/// holding only purged entries (a journal checkpoint at the first kept record marks the
/// point), and the log reopens with exactly the unpurged entries.
#[tokio::test]
async fn purging_removes_the_segments_behind_the_purge_point() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut config = journal_config(dir.path().join("journal"));
    config.segment_bytes = 16 << 10;
    let segments = || {
        std::fs::read_dir(dir.path().join("journal"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".log"))
            .count()
    };
    let mut log = RaftLog::open(config.clone(), storage.clone()).unwrap();
    // 200 entries of about 800 bytes, one record each: about ten 16 KiB segments.
    let values: Vec<u64> = (0..100).collect();
    for i in 1..=200 {
        log.blocking_append([normal(1, i, &values)]).await.unwrap();
    }
    let before = segments();
    assert!(before >= 8, "{before} segments");
    log.purge(id(1, 150)).await.unwrap();
    let after = segments();
    // 50 of 200 entries stay: about a quarter of the segments, plus the one straddling.
    assert!(after <= before / 2, "segments behind entry 150 removed: {before} -> {after}");
    log.close().await;
    let mut log = RaftLog::open(config.clone(), storage.clone()).unwrap();
    let want: Vec<(u64, u64)> = (151..=200).map(|i| (1, i)).collect();
    assert_eq!(indexes(&mut log).await, want, "the unpurged entries, and only they, after reopen");
    assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(id(1, 150)));
    // What `drover journal verify` reads: no gap, no damage, the checkpoint readable.
    let inspection =
        drover_journal::inspect::inspect(&dir.path().join("journal"), &FsStorage, &drover_journal::Limits::default())
            .unwrap();
    assert!(!inspection.damaged(), "{:?}", inspection.gaps);
    assert!(!inspection.checkpoints.is_empty());
    // Purging everything, then appending, reopens to the new entry alone.
    log.purge(id(1, 200)).await.unwrap();
    log.blocking_append([normal(2, 201, &[1])]).await.unwrap();
    log.close().await;
    let mut log = RaftLog::open(config, storage).unwrap();
    assert_eq!(indexes(&mut log).await, vec![(2, 201)]);
    log.close().await;
}
