//! The log interface's contract ([`drover_journal::Log`]): append → durable ticket,
//! read from a sequence id, truncate an uncommitted tail, checkpoint and purge before
//! it. The checks are written against the trait, so a replicated log implementing it
//! runs them unchanged; here they run on the journal over real files and in memory,
//! across segment boundaries, and every state they leave must survive a reopen.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::Seen;
use drover_journal::{FsStorage, Journal, JournalConfig, JournalError, Log, MemStorage, Storage, replay};

fn entry(v: u64) -> Bytes {
    drover_journal::machine::encode_input::<Seen>(&v).unwrap()
}

/// The values the entries from `from` on carry.
async fn values<L: Log>(log: &L, from: i64) -> Result<Vec<(i64, u64)>, JournalError> {
    let entries = log.read_from(from).await?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let bytes = &e.message[e.message.len() - 8..];
            (e.seq, u64::from_le_bytes(bytes.try_into().unwrap()))
        })
        .collect())
}

/// Appends each value as its own record; returns their sequence ids.
async fn append<L: Log>(log: &L, vals: impl IntoIterator<Item = u64>) -> Vec<i64> {
    let mut seqs = Vec::new();
    for v in vals {
        seqs.push(log.append(vec![entry(v)]).await.unwrap().await.unwrap().seq);
    }
    seqs
}

/// The contract, on any log that starts empty.
async fn contract<L: Log>(log: &L) {
    // Append → ticket with consecutive sequence ids; durable_seq follows.
    assert_eq!(append(log, 0..20).await, (0..20).collect::<Vec<_>>());
    assert_eq!(log.durable_seq(), 20);
    // Several entries in one append share a record.
    let t = log.append(vec![entry(100), entry(101)]).await.unwrap().await.unwrap();
    assert_eq!((t.seq, t.index), (20, 1));
    let all = values(log, 0).await.unwrap();
    assert_eq!(all.len(), 22);
    assert_eq!(all[20..], [(20, 100), (20, 101)]);
    // Read from any held id; the next id reads nothing; past it is out of range.
    assert_eq!(values(log, 13).await.unwrap()[0], (13, 13));
    assert!(values(log, 21).await.unwrap().is_empty());
    assert!(matches!(values(log, 22).await, Err(JournalError::OutOfRange { seq: 22, .. })));

    // Truncate an uncommitted tail: the ids are reused by the next appends.
    log.truncate_from(15).await.unwrap();
    assert_eq!(log.durable_seq(), 15);
    assert_eq!(values(log, 0).await.unwrap().last(), Some(&(14, 14)));
    assert_eq!(append(log, [500, 501]).await, [15, 16]);
    assert_eq!(values(log, 14).await.unwrap(), [(14, 14), (15, 500), (16, 501)]);
    assert!(matches!(log.truncate_from(18).await, Err(JournalError::OutOfRange { .. })));
    log.truncate_from(17).await.expect("truncating at the end removes nothing");

    // Checkpoint, more records, purge before it: older ids are gone, later ones stay.
    let covered = log.checkpoint(17u64.to_le_bytes().to_vec()).await.unwrap();
    assert_eq!(covered, 17);
    append(log, 600..610).await;
    assert!(matches!(log.purge_before(16).await, Err(JournalError::OutOfRange { .. })), "no checkpoint at 16");
    let first = log.purge_before(17).await.unwrap();
    assert!(first <= 17, "the checkpoint's records stay readable from {first}");
    assert!(matches!(values(log, first - 1).await, Err(JournalError::OutOfRange { .. })));
    assert_eq!(values(log, 17).await.unwrap()[0], (17, 600));
    // A truncation never reaches below what is held, and drops checkpoints past it.
    assert!(matches!(log.truncate_from(first - 1).await, Err(JournalError::OutOfRange { .. })));
    let later = log.checkpoint(27u64.to_le_bytes().to_vec()).await.unwrap();
    assert_eq!(later, 27);
    append(log, [700]).await;
    log.truncate_from(20).await.unwrap();
    assert_eq!(values(log, 17).await.unwrap().iter().map(|v| v.1).collect::<Vec<_>>(), [600, 601, 602]);
}

fn run(config: JournalConfig, storage: Arc<dyn Storage>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (j, _) = Journal::open(config.clone(), storage.clone()).unwrap();
    rt.block_on(contract(&j));
    j.close_blocking();
    // What the contract left is what a restart recovers: the checkpoint at 17, then
    // the three records the last truncation kept.
    let (j, rec) = Journal::open(config, storage).unwrap();
    assert_eq!(rec.checkpoint.as_deref(), Some(&17u64.to_le_bytes()[..]));
    assert_eq!(rec.next_seq, 20);
    let (seen, _) = replay(&rec, Seen::default).unwrap();
    assert_eq!(seen.0, [17, 600, 601, 602], "the checkpoint's state, then the records after it");
    assert_eq!(rt.block_on(values(&j, 17)).unwrap().len(), 3);
    j.close_blocking();
}

/// Small segments, so reads, truncations and purges cross files.
fn small(dir: PathBuf) -> JournalConfig {
    JournalConfig { segment_bytes: 200, ..JournalConfig::new(dir) }
}

#[test]
fn the_journal_keeps_the_log_contract_on_files() {
    let tmp = tempfile::tempdir().unwrap();
    run(JournalConfig::new(tmp.path().join("one-segment")), Arc::new(FsStorage));
    run(small(tmp.path().join("many-segments")), Arc::new(FsStorage));
}

#[test]
fn the_journal_keeps_the_log_contract_in_memory() {
    run(JournalConfig::new(PathBuf::from("/mem/one")), Arc::new(MemStorage::new()));
    run(small(PathBuf::from("/mem/many")), Arc::new(MemStorage::new()));
}
