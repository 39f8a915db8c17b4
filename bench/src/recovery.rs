//! Recovery: a data directory whose journal holds N price updates after its last
//! checkpoint (none here: the whole history is replayed); the figure is the time from
//! starting `drover controller` until it answers `ControllerAppVersionV1Req`.
//!
//! In the same run, before the process is started, the same replay is done in this
//! process phase by phase, to show where the time goes: reading and verifying the
//! segments (`recover`), decoding the entries into inputs, and applying them to the
//! core, each with the heap allocations it made (a counting global allocator).

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_cli::{Ctx, Session};
use drover_core::{Config, Controller, Event, Input};
use drover_journal::machine::encode_input;
use drover_journal::{FsStorage, FsyncMode, Journal, JournalConfig};
use drover_proto::{Payload, v1};

fn node_msg(at_ms: i64, p: Payload) -> Input {
    Input { at_ms, event: Event::node_message("n1", 1, "", p) }
}

pub async fn run(updates: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = JournalConfig::new(dir.path().join("journal"));
    config.fsync = FsyncMode::Never; // setup only
    let (journal, _) = Journal::open(config, Arc::new(FsStorage)).unwrap();
    let t0 = 1_700_000_000_000i64;
    let mut inputs = vec![
        Input {
            at_ms: t0,
            event: Event::ControllerStarted { config: Config { version: "bench".into(), ..Config::default() } },
        },
        Input { at_ms: t0, event: Event::NodeConnected { node: "n1".into(), session: 1 } },
        node_msg(
            t0,
            v1::NodeKnownCurrenciesV1Notify {
                pairs: vec!["EURUSD".into()],
                name: "n1".into(),
                version: "b".into(),
                worker: false,
            }
            .into(),
        ),
    ];
    let mut tickets = Vec::new();
    for input in inputs.drain(..) {
        tickets.push(journal.append(encode_input::<Controller>(&input).unwrap()).await.unwrap());
    }
    for seq in 1..=updates {
        let at = t0 + seq as i64;
        let u = v1::NodePriceUpdateV1Notify {
            pair: "EURUSD".into(),
            price: Some(v1::Decimal { mantissa: 108_000 + (seq % 500) as i64, scale: 5 }),
            upstream_time_ms: at,
            seq,
            epoch: 1,
        };
        tickets.push(journal.append(encode_input::<Controller>(&node_msg(at, u.into())).unwrap()).await.unwrap());
        if tickets.len() >= 8192 {
            for t in tickets.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tickets {
        t.await.unwrap();
    }
    let bytes = journal.stats().bytes;
    drop(journal);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let phases = phases(&dir.path().join("journal"));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let adm_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admission = format!("127.0.0.1:{adm_port}");
    let mut child = std::process::Command::new(crate::drover_bin())
        .args([
            "controller",
            "--listen",
            &listen,
            "--admission",
            &admission,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn drover controller (build it: cargo build --release -p drover)");
    let serving = loop {
        // The admin token appears once the controller has bootstrapped.
        let token = std::fs::read_to_string(dir.path().join("admin.token")).ok().map(|t| t.trim().to_owned());
        let ctx = Ctx { controller: listen.clone(), timeout: Duration::from_millis(500), json: false, token, ca: None };
        if let Ok(mut s) = Session::open(&ctx).await {
            if let Ok(out) = s.request(&ctx, vec![], v1::ControllerAppVersionV1Req {}.into(), false).await {
                if !out.replies.is_empty() {
                    break start.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(start.elapsed() < Duration::from_secs(120), "controller never served");
    };
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "command: cargo build --release -p drover && cd bench && cargo run --release -- recovery --updates {updates}"
    );
    println!(
        "| journaled updates since the last checkpoint | journal bytes | start → serves `version` |\n| --- | --- | --- |"
    );
    println!("| {updates} | {:.0} MB | {:.0} ms |", bytes as f64 / 1e6, serving.as_secs_f64() * 1e3);
    println!("\nThe same replay in process, by phase:\n");
    println!("| phase | time | allocations | allocated |\n| --- | --- | --- | --- |");
    for (name, took, allocs, alloc_bytes) in phases {
        println!(
            "| {name} | {:.0} ms | {allocs} ({:.2} per input) | {:.0} MB |",
            took.as_secs_f64() * 1e3,
            allocs as f64 / updates as f64,
            alloc_bytes as f64 / 1e6
        );
    }
}

/// Recover, decode and apply, timed apart, with the allocations of each.
fn phases(journal: &std::path::Path) -> Vec<(&'static str, Duration, u64, u64)> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Vec::new();
    let mut phase = |name, f: &mut dyn FnMut()| {
        let (a0, b0) = (crate::ALLOCS.load(Relaxed), crate::ALLOC_BYTES.load(Relaxed));
        let t = Instant::now();
        f();
        out.push((name, t.elapsed(), crate::ALLOCS.load(Relaxed) - a0, crate::ALLOC_BYTES.load(Relaxed) - b0));
    };
    let storage: Arc<dyn drover_journal::Storage> = Arc::new(FsStorage);
    let mut recovery = None;
    phase("read + verify segments (`recover`)", &mut || {
        recovery = Some(drover_journal::recovery::recover(&JournalConfig::new(journal), &storage).unwrap());
    });
    let recovery = recovery.unwrap();
    phase("replay: decode + apply, one input at a time (as the controller does)", &mut || {
        let (core, _) = drover_journal::replay(&recovery, || Controller::new(Config::default())).unwrap();
        std::hint::black_box(core);
    });
    let mut inputs = Vec::new();
    phase("of which: decode entries into inputs (all kept)", &mut || {
        for entry in recovery.entries() {
            if let Some(input) = drover_journal::machine::decode_entry::<Controller>(&entry.unwrap()).unwrap() {
                inputs.push(input);
            }
        }
    });
    let mut core = Controller::new(Config::default());
    phase("of which: apply the decoded inputs to the core", &mut || {
        let mut out = Vec::new();
        for input in inputs.drain(..) {
            drover_journal::StateMachine::apply(&mut core, input, &mut out);
            out.clear();
        }
    });
    std::hint::black_box(&core);
    out
}
