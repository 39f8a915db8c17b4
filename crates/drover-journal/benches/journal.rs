//! Journal benchmarks, printed as a markdown table for BENCHMARKS.md.
//!
//! `cargo bench -p drover-journal --bench journal` (set `BENCH_SECS` per cell,
//! default 2, and `BENCH_DIR` for the directory, default a temp dir under `target/`).
//!
//! * this machine's raw limits, in the same run: fsyncs/s of a 4 KiB append loop, and
//!   sequential write bandwidth with one fsync at the end;
//! * group-commit append throughput for 64 B and 1 KiB entries at 1, 16 and 256
//!   concurrent appenders, fsync on;
//! * replay speed of 1M 64 B inputs, and recovery time with a checkpoint plus 1M
//!   inputs after it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_journal::{
    DecodeError, FsStorage, FsyncMode, Journal, JournalConfig, StateMachine, encode_entry, machine::encode_input,
    replay,
};

fn secs() -> f64 {
    std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0)
}

fn raw_fsyncs_per_sec(dir: &Path) -> f64 {
    let path = dir.join("raw-fsync");
    let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let block = vec![0xA5u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs() {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    rate
}

fn raw_sequential_mb_per_sec(dir: &Path) -> f64 {
    let path = dir.join("raw-seq");
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    let total = 512usize;
    let start = Instant::now();
    for _ in 0..total {
        f.write_all(&chunk).unwrap();
    }
    f.sync_data().unwrap();
    let rate = total as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    rate * 1.048_576
}

fn fresh_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn append_throughput(root: &Path, size: usize, appenders: usize) -> (f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = fresh_dir(root, &format!("append-{size}-{appenders}"));
    let (journal, _) = Journal::open(JournalConfig::new(&dir), Arc::new(FsStorage)).unwrap();
    let journal = Arc::new(journal);
    let message = encode_entry(1, &vec![7u8; size.saturating_sub(4)]);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..appenders)
            .map(|_| {
                let (journal, message, stop, count) = (journal.clone(), message.clone(), stop.clone(), count.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        journal.append(message.clone()).await.unwrap().await.unwrap();
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(secs())).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed) as f64;
    let stats = journal.stats();
    let per_batch = stats.entries as f64 / stats.records.max(1) as f64;
    drop(journal);
    let _ = std::fs::remove_dir_all(&dir);
    (n / elapsed, n * message.len() as f64 / elapsed / 1e6, per_batch)
}

/// Counts inputs and sums them, so replay does real decoding work.
#[derive(Default)]
struct Counter {
    n: u64,
    sum: u64,
}

impl StateMachine for Counter {
    type Input = [u8; 56];
    type Output = ();
    fn apply(&mut self, input: [u8; 56], _out: &mut Vec<()>) {
        self.n += 1;
        self.sum = self.sum.wrapping_add(u64::from(input[0]));
    }
    fn encode_input(input: &[u8; 56], buf: &mut Vec<u8>) -> Result<(), drover_journal::EncodeError> {
        buf.extend_from_slice(input);
        Ok(())
    }
    fn decode_input(bytes: &[u8]) -> Result<[u8; 56], DecodeError> {
        bytes.try_into().map_err(|_| DecodeError("size".into()))
    }
    fn checkpoint(&self) -> Result<Vec<u8>, drover_journal::EncodeError> {
        let mut v = self.n.to_le_bytes().to_vec();
        v.extend_from_slice(&self.sum.to_le_bytes());
        v.resize(1 << 20, 0); // a 1 MiB state, as a stand-in for a real fleet
        Ok(v)
    }
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        let n = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or(DecodeError("n".into()))?);
        let sum = u64::from_le_bytes(bytes.get(8..16).and_then(|b| b.try_into().ok()).ok_or(DecodeError("s".into()))?);
        Ok(Counter { n, sum })
    }
}

/// Writes `n` 64-byte inputs (fsync off for the setup only), optionally after a checkpoint.
fn build_log(dir: &Path, n: u64, with_checkpoint: bool) -> u64 {
    let mut config = JournalConfig::new(dir);
    config.fsync = FsyncMode::Never;
    config.max_batch_bytes = 64 << 10;
    let (journal, _) = Journal::open(config, Arc::new(FsStorage)).unwrap();
    if with_checkpoint {
        journal.checkpoint_blocking(Counter { n: 0, sum: 0 }.checkpoint().unwrap()).unwrap();
    }
    let input = [1u8; 56];
    let entry = encode_input::<Counter>(&input).unwrap();
    let mut tickets = Vec::with_capacity(4096);
    for _ in 0..n {
        tickets.push(journal.append_blocking(entry.clone()).unwrap());
        if tickets.len() == 4096 {
            tickets.drain(..).for_each(|t| {
                t.wait().unwrap();
            });
        }
    }
    tickets.into_iter().for_each(|t| {
        t.wait().unwrap();
    });
    let bytes = journal.stats().bytes;
    journal.close_blocking();
    bytes
}

fn main() {
    let root = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-journal"));
    std::fs::create_dir_all(&root).unwrap();
    println!("command: cargo bench -p drover-journal --bench journal   (BENCH_SECS={})", secs());
    let fsyncs = raw_fsyncs_per_sec(&root);
    let seq = raw_sequential_mb_per_sec(&root);
    println!("\n| raw limit (same run) | value |\n| --- | --- |");
    println!("| fsyncs/s, 4 KiB append + fdatasync loop | {fsyncs:.0} |");
    println!("| sequential write, 512 MiB then one fsync | {seq:.0} MB/s |");

    println!("\n| entry | appenders | inputs/s | MB/s | entries per fsync | % of raw sequential |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for size in [64usize, 1024] {
        for appenders in [1usize, 16, 256] {
            let (rate, mbs, per_batch) = append_throughput(&root, size, appenders);
            println!("| {size} B | {appenders} | {rate:.0} | {mbs:.1} | {per_batch:.1} | {:.0} % |", 100.0 * mbs / seq);
        }
    }

    let n = 1_000_000u64;
    println!("\n| recovery | inputs | time | inputs/s | MB/s |\n| --- | --- | --- | --- | --- |");
    for (label, with_checkpoint) in
        [("open + replay, no checkpoint", false), ("open + 1 MiB checkpoint + replay", true)]
    {
        let dir = fresh_dir(&root, if with_checkpoint { "recovery" } else { "replay" });
        let bytes = build_log(&dir, n, with_checkpoint);
        let start = Instant::now();
        let (journal, rec) = Journal::open(JournalConfig::new(&dir), Arc::new(FsStorage)).unwrap();
        let (m, _) = replay(&rec, Counter::default).unwrap();
        let t = start.elapsed().as_secs_f64();
        assert_eq!(m.n, n);
        assert_eq!(rec.checkpoint.is_some(), with_checkpoint);
        drop(rec);
        journal.close_blocking();
        println!("| {label} | {n} | {:.0} ms | {:.2} M | {:.0} |", t * 1e3, n as f64 / t / 1e6, bytes as f64 / t / 1e6);
    }
    let _ = std::fs::remove_dir_all(&root);
}
