//! The Raft member directory format (issue 15) frozen: `tests/golden/raft1/` was written
//! by this crate's own log store and state machine (`DROVER_WRITE_GOLDEN=raft1 cargo
//! test -p drover-raft --test golden`) and is committed. It holds a journal whose
//! records are Raft entries (a membership entry, normal entries of several terms, one
//! record holding several entries), segments removed behind a purge point with the
//! journal checkpoint that marks it, `raft-state` (vote and purge point) and
//! `raft-snapshot`. Every later release must open it to the same log, vote, purge
//! point and state; a change to any of these bytes adds a new golden directory beside
//! this one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{Sum, id, normal};
use drover_journal::{FsStorage, Storage};
use drover_raft::log_store::journal_config;
use drover_raft::{RaftLog, RaftMachine};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{BasicNode, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/raft1")
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
    for batch in entries {
        log.blocking_append(batch.clone()).await.unwrap();
        for e in batch {
            if e.log_id.index <= 50 {
                sm.apply([e]).await.unwrap();
            }
        }
    }
    log.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    log.purge(id(2, 45)).await.unwrap();
    log.close().await;
    std::fs::remove_file(dir.join("LOCK")).ok();
}

#[tokio::test]
async fn the_first_raft_directory_format_opens_to_the_same_log_vote_and_state() {
    let dir = golden();
    if std::env::var("DROVER_WRITE_GOLDEN").is_ok_and(|v| v == "raft1") {
        write(&dir).await;
    }
    assert!(dir.join(drover_raft::record::STATE_FILE).is_file(), "the golden directory is committed");
    // Opened from a copy: opening may repair a torn tail, and the golden stays as written.
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let mut log = RaftLog::open(config(tmp.path()), storage.clone()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(id(2, 45)), Some(id(2, 60))));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(2, 2)));
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
