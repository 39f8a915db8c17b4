//! Crash-test child for `tests/crash.rs`: opens (and so recovers) the journal in the
//! directory given as the first argument, then appends from several threads as fast as
//! it can, printing `ack <value>` for every entry whose ticket resolved, until it is
//! killed. Values are `round << 40 | thread << 32 | counter`, so the parent can check
//! uniqueness and per-thread order.

use std::io::Write;
use std::sync::Arc;

use drover_journal::{FsStorage, Journal, JournalConfig, encode_entry};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(round)) = (args.next(), args.next().and_then(|r| r.parse::<u64>().ok())) else {
        eprintln!("usage: drover-journal-crashtest DIR ROUND");
        std::process::exit(2);
    };
    let config = JournalConfig::new(dir);
    let (journal, recovery) = match Journal::open(config, Arc::new(FsStorage)) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("open failed: {e}");
            std::process::exit(1);
        }
    };
    drop(recovery);
    let journal = Arc::new(journal);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                for k in 0u64.. {
                    let value = round << 40 | t << 32 | k;
                    let ticket = match journal.append_blocking(encode_entry(1, &value.to_le_bytes())) {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                    if ticket.wait().is_err() {
                        return;
                    }
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "ack {value}").is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
