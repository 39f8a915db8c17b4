//! The counter service, live and in a repro run: it counts to a target by calling
//! itself once per step, so replaying its log must reach the count it reached live.
//!
//! ```sh
//! drover coordinator register --instance counter --log-dir /tmp/amb
//! drover coordinator --instance counter --log-dir /tmp/amb --receive-port 2000 --send-port 2001 &
//! cargo run -p drover-ambrosia --example counter -- 2000 2001 3000   # ... count 3000, done 3000; Ctrl-C
//!
//! # A repro run of the same log on other ports (the live coordinator may keep running):
//! drover coordinator debug --instance counter --log-dir /tmp/amb --receive-port 2100 --send-port 2101 &
//! cargo run -p drover-ambrosia --example counter -- 2100 2101        # ... replay over at count 3000
//! ```
//!
//! In the repro run the service restores the checkpoint, handles every logged call
//! again (its own calls are dropped by the coordinator), and `run` returns `Ok` when the
//! coordinator closes the connection after the last record. With `debug
//! --test-upgrade` it also prints `upgraded at N` once, right after the checkpoint.

use drover_ambrosia::{Connection, examples::Counter};

#[tokio::main]
async fn main() {
    let arg = |i: usize, d: u64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let connection = Connection::listening_coordinator(arg(1, 2000) as u16, arg(2, 2001) as u16);
    let mut counter = Counter::default();
    match drover_ambrosia::run(&mut counter, connection, 0, &arg(3, 1000).to_le_bytes()).await {
        Ok(()) => println!("replay over at count {}", counter.count),
        Err(e) => {
            eprintln!("counter: {e}");
            std::process::exit(1);
        }
    }
}
