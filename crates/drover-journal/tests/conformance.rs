//! The journal's conformance suite, run against the real file system and against the
//! in-memory storage, plus fault injection (failed fsync, ENOSPC with a short write)
//! and damage (torn tails at every offset, flipped bits, damaged checkpoints).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::Seen;
use drover_journal::machine::encode_input;
use drover_journal::{
    Faults, FaultyStorage, FsStorage, Journal, JournalConfig, JournalError, MemStorage, RecoveryMode, StateMachine,
    Storage, replay, segment_name,
};

fn entry(v: u64) -> bytes::Bytes {
    encode_input::<Seen>(&v).unwrap()
}

fn open(config: &JournalConfig, storage: &Arc<dyn Storage>) -> (Journal, Seen) {
    let (j, rec) = Journal::open(config.clone(), storage.clone()).expect("open");
    let (m, _) = replay(&rec, Seen::default).expect("replay");
    (j, m)
}

fn append_all(j: &Journal, values: impl IntoIterator<Item = u64>) {
    let tickets: Vec<_> = values.into_iter().map(|v| j.append_blocking(entry(v)).expect("append")).collect();
    for t in tickets {
        t.wait().expect("durable");
    }
}

/// Runs `test` against a real directory and an in-memory file system.
fn both(test: impl Fn(JournalConfig, Arc<dyn Storage>)) {
    let tmp = tempfile::tempdir().expect("tempdir");
    test(JournalConfig::new(tmp.path().join("journal")), Arc::new(FsStorage));
    test(JournalConfig::new(PathBuf::from("/mem/journal")), Arc::new(MemStorage::new()));
}

#[test]
fn appends_survive_reopen_in_order() {
    both(|config, storage| {
        let (j, m) = open(&config, &storage);
        assert!(m.0.is_empty());
        append_all(&j, 0..500);
        j.close_blocking();
        let (j, m) = open(&config, &storage);
        assert_eq!(m.0, (0..500).collect::<Vec<_>>());
        append_all(&j, 500..600);
        j.close_blocking();
        let (_, m) = open(&config, &storage);
        assert_eq!(m.0, (0..600).collect::<Vec<_>>());
    });
}

#[test]
fn an_input_of_a_format_this_binary_does_not_know_is_refused_by_name_not_skipped() {
    both(|config, storage| {
        let (j, _) = open(&config, &storage);
        append_all(&j, 0..3);
        // What a later release would write: its inputs under the next method id.
        let newer = drover_journal::encode_entry(<Seen as StateMachine>::INPUT_FORMAT as i32 + 1, &7u64.to_le_bytes());
        j.append_blocking(newer).unwrap().wait().unwrap();
        j.close_blocking();
        let (_, rec) = Journal::open(config.clone(), storage.clone()).expect("open");
        let err = replay(&rec, Seen::default).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("at record") && err.contains("input format 2") && err.contains("format 1"), "{err}");
    });
}

#[test]
fn concurrent_appends_are_group_committed() {
    both(|config, storage| {
        let (j, _) = open(&config, &storage);
        // Queue many before waiting on any: the writer batches what waits.
        append_all(&j, 0..2000);
        let stats = j.stats();
        assert_eq!(stats.entries, 2000);
        assert!(stats.records < 2000, "no batching: {stats:?}");
        assert_eq!(stats.fsyncs, stats.records);
        j.close_blocking();
    });
}

#[test]
fn segments_rotate_and_replay_across_them() {
    both(|mut config, storage| {
        config.segment_bytes = 512;
        config.max_batch_bytes = 128;
        let (j, _) = open(&config, &storage);
        append_all(&j, 0..300);
        j.close_blocking();
        let segments = storage.list(&config.dir).unwrap().iter().filter(|n| n.ends_with(".log")).count();
        assert!(segments > 5, "only {segments} segments");
        let (_, m) = open(&config, &storage);
        assert_eq!(m.0, (0..300).collect::<Vec<_>>());
    });
}

#[test]
fn checkpoint_then_replay_only_what_follows_and_trim() {
    both(|mut config, storage| {
        config.keep_checkpoints = 1;
        let (j, _) = open(&config, &storage);
        let mut model = Seen::default();
        for round in 0..3u64 {
            let values: Vec<u64> = (round * 100..round * 100 + 100).collect();
            append_all(&j, values.clone());
            model.0.extend(values);
            let covered = j.checkpoint_blocking(drover_journal::StateMachine::checkpoint(&model).unwrap()).unwrap();
            assert!(covered > 0);
        }
        append_all(&j, 300..310);
        j.close_blocking();
        let (j2, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        assert!(rec.checkpoint.is_some());
        assert_eq!(rec.entries().count(), 10, "only the entries after the checkpoint are replayed");
        let (m, _) = replay(&rec, Seen::default).unwrap();
        assert_eq!(m.0, (0..310).collect::<Vec<_>>());
        drop(rec);
        j2.close_blocking();
        let names = storage.list(&config.dir).unwrap();
        assert_eq!(names.iter().filter(|n| n.ends_with(".ckpt")).count(), 1, "{names:?}");
        assert!(!names.contains(&segment_name(0)), "segment 0 should be trimmed: {names:?}");
    });
}

#[test]
fn damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    both(|config, storage| {
        let (j, _) = open(&config, &storage);
        append_all(&j, 0..10);
        j.checkpoint_blocking(drover_journal::StateMachine::checkpoint(&Seen((0..10).collect())).unwrap()).unwrap();
        append_all(&j, 10..20);
        let newest =
            j.checkpoint_blocking(drover_journal::StateMachine::checkpoint(&Seen((0..20).collect())).unwrap()).unwrap();
        append_all(&j, 20..25);
        j.close_blocking();
        let path = config.dir.join(drover_journal::checkpoint_name(newest));
        let mut bytes = storage.read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xFF;
        overwrite(&storage, &path, &bytes);
        let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        assert_eq!(rec.report.rejected_checkpoints.len(), 1);
        let (m, _) = replay(&rec, Seen::default).unwrap();
        assert_eq!(m.0, (0..25).collect::<Vec<_>>());
    });
}

fn overwrite(storage: &Arc<dyn Storage>, path: &Path, bytes: &[u8]) {
    storage.write_atomic(path, bytes).unwrap();
}

/// The newest segment's bytes and the offset where its last record starts.
fn last_record(config: &JournalConfig, storage: &Arc<dyn Storage>) -> (PathBuf, Vec<u8>, usize) {
    let mut segs: Vec<String> =
        storage.list(&config.dir).unwrap().into_iter().filter(|n| n.ends_with(".log")).collect();
    segs.sort();
    let path = config.dir.join(segs.last().unwrap());
    let bytes = storage.read(&path).unwrap();
    let scan = drover_journal::scan::scan_segment(
        &bytes,
        storage.read(&config.dir.join("committer-id")).map(|b| String::from_utf8(b).unwrap().parse().unwrap()).unwrap(),
        drover_journal::parse_segment_name(path.file_name().unwrap().to_str().unwrap()).unwrap(),
        &config.limits,
    );
    (path, bytes, scan.records.last().unwrap().offset)
}

#[test]
fn torn_tail_at_every_offset_of_the_last_record() {
    both(|config, storage| {
        let (j, _) = open(&config, &storage);
        append_all(&j, 0..5);
        append_all(&j, [5, 6, 7]); // the last record holds 5, 6, 7 or just 7
        j.close_blocking();
        let (path, bytes, last) = last_record(&config, &storage);
        let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        let whole = replay(&rec, Seen::default).unwrap().0;
        drop(rec);
        let before_last: usize = {
            // How many inputs the records before the last one hold.
            let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
            let last_seq = rec.entries().last().unwrap().unwrap().seq;
            rec.entries().filter(|e| e.as_ref().unwrap().seq < last_seq).count()
        };
        for cut in last..bytes.len() {
            overwrite(&storage, &path, &bytes[..cut]);
            let (j, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
            if cut > last {
                assert!(rec.report.torn_tail.is_some(), "cut {cut}: no torn tail reported");
            }
            let (m, _) = replay(&rec, Seen::default).unwrap();
            assert_eq!(m.0, whole.0[..before_last], "cut {cut}");
            // The journal keeps working after the repair.
            append_all(&j, [99]);
            j.close_blocking();
            let (_, m) = open(&config, &storage);
            assert_eq!(m.0.last(), Some(&99), "cut {cut}");
        }
    });
}

#[test]
fn flipped_bit_in_a_middle_record_is_refused_with_file_and_offset() {
    both(|mut config, storage| {
        let (j, _) = open(&config, &storage);
        for v in 0..10 {
            append_all(&j, [v]); // one record each
        }
        j.close_blocking();
        let (path, mut bytes, last) = last_record(&config, &storage);
        let target = last / 2 + 30;
        bytes[target] ^= 0x04;
        overwrite(&storage, &path, &bytes);
        let err = Journal::open(config.clone(), storage.clone()).expect_err("corruption must refuse");
        match &err {
            JournalError::Corrupt { file, offset, .. } => {
                assert_eq!(file, &path);
                assert!(*offset <= target as u64, "offset {offset} after the flipped byte {target}");
            }
            other => panic!("wrong error: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("at byte"), "{msg}");
        config.recovery = RecoveryMode::TolerateCorruption;
        let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        assert_eq!(rec.report.dropped.len(), 1);
        let (m, _) = replay(&rec, Seen::default).unwrap();
        assert_eq!(m.0.len(), 9, "exactly one record dropped: {:?}", m.0);
    });
}

#[test]
fn failed_fsync_is_an_error_to_every_waiter_and_poisons() {
    both(|config, storage| {
        let faults = Faults::none();
        let faulty: Arc<dyn Storage> = Arc::new(FaultyStorage::new(storage.clone(), faults.clone()));
        let (j, _) = open(&config, &faulty);
        append_all(&j, 0..3);
        faults.fail_sync_after.store(0, Ordering::SeqCst);
        let tickets: Vec<_> = (3..50).map(|v| j.append_blocking(entry(v)).unwrap()).collect();
        for t in tickets {
            assert!(t.wait().is_err(), "a failed fsync must never look like success");
        }
        let later = j.append_blocking(entry(100)).unwrap().wait();
        assert!(matches!(later, Err(JournalError::Poisoned(_))), "{later:?}");
        j.close_blocking();
        let (_, m) = open(&config, &storage);
        assert_eq!(m.0[..3], [0, 1, 2]);
    });
}

#[test]
fn disk_full_mid_record_loses_nothing_acknowledged() {
    both(|config, storage| {
        let faults = Faults::none();
        let faulty: Arc<dyn Storage> = Arc::new(FaultyStorage::new(storage.clone(), faults.clone()));
        let (j, _) = open(&config, &faulty);
        append_all(&j, 0..20);
        faults.space_left.store(10, Ordering::SeqCst); // the next record is cut short
        let t = j.append_blocking(entry(20)).unwrap().wait();
        assert!(matches!(t, Err(JournalError::Io { .. })), "{t:?}");
        j.close_blocking();
        let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        assert!(rec.report.torn_tail.is_some(), "the short write is a torn tail");
        let (m, _) = replay(&rec, Seen::default).unwrap();
        assert_eq!(m.0, (0..20).collect::<Vec<_>>());
    });
}

#[test]
fn crash_keeps_every_acknowledged_entry() {
    let mem = MemStorage::new();
    let storage: Arc<dyn Storage> = Arc::new(mem.clone());
    let config = JournalConfig::new("/mem/crash");
    let (j, _) = open(&config, &storage);
    append_all(&j, 0..100);
    // Queued but not awaited: may or may not survive, must not corrupt.
    let _unacked: Vec<_> = (100..120).map(|v| j.append_blocking(entry(v)).unwrap()).collect();
    mem.crash();
    drop(_unacked);
    j.close_blocking();
    mem.crash();
    let (_, m) = open(&config, &storage);
    assert!(m.0.len() >= 100);
    assert_eq!(m.0, (0..m.0.len() as u64).collect::<Vec<_>>());
}

#[test]
fn an_input_that_does_not_decode_is_a_replay_error_naming_its_record() {
    both(|config, storage| {
        let (j, _) = open(&config, &storage);
        append_all(&j, [1, 2]);
        j.append_blocking(drover_journal::encode_entry(1, &[1, 2, 3])).unwrap().wait().unwrap();
        j.close_blocking();
        let (_, rec) = Journal::open(config.clone(), storage.clone()).unwrap();
        // Group commit may have put 1 and 2 in one record: the bad entry is in the last.
        let last = rec.entries().last().unwrap().unwrap().seq;
        match replay(&rec, Seen::default) {
            Err(JournalError::Replay { at, reason }) => {
                assert_eq!(at, format!("record {last}"));
                assert!(reason.contains("does not decode"), "{reason}");
            }
            other => panic!("expected a replay error, got {other:?}"),
        }
    });
}

#[test]
fn a_read_only_read_changes_nothing_and_reads_from_the_named_checkpoint() {
    use drover_journal::recovery::{Start, read_only};
    both(|mut config, storage| {
        // Nothing there: a read-only read fails and creates nothing.
        assert!(read_only(&config, &storage, Start::NewestCheckpoint).is_err());
        assert!(storage.list(&config.dir).is_err() || storage.list(&config.dir).unwrap().is_empty());
        config.keep_checkpoints = 10;
        let (j, _) = open(&config, &storage);
        for v in 0..30 {
            append_all(&j, [v]);
            if v % 10 == 9 && v < 29 {
                assert_eq!(j.checkpoint_blocking(v.to_le_bytes().to_vec()).unwrap(), v as i64 + 1);
            }
        }
        j.close_blocking();
        let (path, bytes, last) = last_record(&config, &storage);
        // Half of the last record: a writer mid-append, as a debug run over a live log sees.
        overwrite(&storage, &path, &bytes[..last + 5]);
        let rec = read_only(&config, &storage, Start::At(10)).unwrap();
        assert_eq!(rec.checkpoint_seq, 10);
        assert!(rec.report.torn_tail.is_some());
        assert_eq!(rec.records().map(|(s, _)| s).collect::<Vec<_>>(), (10..29).collect::<Vec<i64>>());
        assert_eq!(storage.read(&path).unwrap().len(), last + 5, "the torn tail was left in place");
    });
}
