//! Crash test with a real process: a child appends acknowledged entries as fast as it
//! can; the parent SIGKILLs it at random moments, recovers the journal, and checks that
//! every acknowledged entry is present, in order, exactly once. 20 rounds.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use drover_journal::{FsStorage, Journal, JournalConfig};
use drover_wire::ambrosia::RpcBody;

#[test]
fn sigkill_loses_no_acknowledged_entry() {
    let mut rng = Rng::from_env_or_time();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let mut total_acked = 0usize;
    for round in 0..20u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_drover-journal-crashtest"))
            .arg(&dir)
            .arg(round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        // Let it get going: wait for the first acknowledgement, then a random while.
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 4];
        stdout.read_exact(&mut first).expect("child acknowledged nothing");
        std::thread::sleep(Duration::from_millis(10 + rng.below(150)));
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        let text = String::from_utf8_lossy(&first).into_owned() + &rest;
        let acked: Vec<u64> = text
            .lines()
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.strip_prefix("ack ").and_then(|v| v.parse().ok()))
            .collect();
        assert!(!acked.is_empty());
        total_acked += acked.len();

        let started = Instant::now();
        let (journal, rec) = Journal::open(JournalConfig::new(&dir), Arc::new(FsStorage)).expect("recover");
        let recovered_in = started.elapsed();
        let mut seen = HashSet::new();
        let mut last_k: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for e in rec.entries() {
            let e = e.expect("clean replay");
            let body = RpcBody::parse(e.message.slice(1..)).expect("rpc");
            let v = u64::from_le_bytes(body.args().try_into().expect("8 bytes"));
            assert!(seen.insert(v), "round {round}: value {v:#x} logged twice");
            let key = (v >> 40, (v >> 32) & 0xFF);
            let k = v & 0xFFFF_FFFF;
            let expected = last_k.get(&key).map_or(0, |p| p + 1);
            assert_eq!(k, expected, "round {round}: writer {key:?} out of order or with a gap");
            last_k.insert(key, k);
        }
        for v in &acked {
            assert!(seen.contains(v), "round {round}: acknowledged value {v:#x} lost");
        }
        eprintln!(
            "round {round}: {} acknowledged, {} in log, torn tail: {}, recovered in {recovered_in:?}",
            acked.len(),
            seen.len(),
            rec.report.torn_tail.is_some()
        );
        drop(rec);
        journal.close_blocking();
    }
    assert!(total_acked > 100, "too little work to mean anything: {total_acked}");
}
