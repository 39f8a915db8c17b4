//! Failover latency: a `drover node` process streams a pair; a standby (a raw gRPC
//! client here, so it can timestamp what it receives) knows the pair too. The victim
//! is SIGKILLed (or SIGSTOPped); the figure is the time from the signal to the standby
//! receiving the `NodeStreamModifyStateV1Req` that gives it the pair.

use std::time::{Duration, Instant};

use drover_cli::{Ctx, Session};

use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Payload, v1};
use tokio_stream::wrappers::ReceiverStream;

async fn streamer_of(ctx: &Ctx, pair: &str) -> Option<String> {
    let mut s = Session::open(ctx).await.ok()?;
    let out = s.request(ctx, vec![], v1::ControllerListNodesV1Req {}.into(), false).await.ok()?;
    out.replies.into_iter().find_map(|r| match r.payload {
        Payload::ControllerListNodesV1Reply(l) => {
            l.nodes.into_iter().find(|n| n.streaming.iter().any(|a| a.pair == pair)).map(|n| n.node_uuid)
        }
        _ => None,
    })
}

/// One trial's figures: signal → the controller applied an input (the disconnect, in
/// all but rare trials where a heartbeat lands first), and signal → the standby has its
/// assignment.
struct Timing {
    applied: Duration,
    assigned: Duration,
}

async fn trial(b: &crate::Bench, i: usize, silent: bool) -> Timing {
    let addr = b.addr;
    let pair = format!("F{}{i:04}", if silent { "S" } else { "K" });
    let ctx = b.ctx();
    let mut victim = std::process::Command::new(crate::drover_bin())
        .args(["node", "--admission", &b.admission.to_string(), "--token", &b.join, "--pairs", &pair])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn drover node (build it: cargo build --release -p drover)");
    while streamer_of(&ctx, &pair).await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut client = ControllerClient::connect(format!("http://{addr}")).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let me = format!("standby-{pair}");
    let hello = v1::NodeKnownCurrenciesV1Notify {
        pairs: vec![pair.clone()],
        name: me.clone(),
        version: "bench".into(),
        worker: false,
    };
    tx.send(v1::StreamFromNode {
        node_uuid: me.clone(),
        from_uuid: None,
        response: Some(Payload::from(hello).to_any()),
        request_id: String::new(),
    })
    .await
    .unwrap();
    let ticket = crate::admit(b.admission, &b.join, &me).await;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", format!("Bearer {ticket}").parse().unwrap());
    let mut inbound = client.node_command_stream(req).await.unwrap().into_inner();
    // The first assignment (empty: the victim streams the pair) says the hello was applied.
    inbound.message().await.unwrap().unwrap();
    let beat = tokio::spawn({
        let tx = tx.clone();
        let me = me.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let hb = Payload::from(v1::NodeHeartbeatV1Notify { sent_at_ms: 0 }).to_any();
                if tx
                    .send(v1::StreamFromNode {
                        node_uuid: me.clone(),
                        from_uuid: None,
                        response: Some(hb),
                        request_id: String::new(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    // For a SIGKILL the standby's heartbeats are paused around the signal (its 1 s
    // timeout is far), so the first input applied after it is the victim's disconnect.
    if !silent {
        beat.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied_before = b.health.applied.load(std::sync::atomic::Ordering::Relaxed);
    let health = b.health.clone();
    let t0 = Instant::now();
    // A thread that looks every 50 µs (a sleeping poll: spinning would take one of the
    // two cores the controller needs), for at most 2 s.
    let watch_applied = std::thread::spawn(move || {
        while health.applied.load(std::sync::atomic::Ordering::Relaxed) == applied_before {
            if t0.elapsed() > Duration::from_secs(2) {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Some(t0.elapsed())
    });
    if silent {
        std::process::Command::new("kill").args(["-STOP", &victim.id().to_string()]).status().unwrap();
    } else {
        victim.kill().unwrap();
    }
    loop {
        let m = inbound.message().await.unwrap().unwrap();
        if let Ok(Payload::NodeStreamModifyStateV1Req(r)) = Payload::from_any(m.command.as_ref().unwrap()) {
            if r.streams.iter().any(|s| s.pair == pair) {
                break;
            }
        }
    }
    let assigned = t0.elapsed();
    beat.abort();
    let applied = watch_applied.join().ok().flatten().unwrap_or(assigned).min(assigned);
    drop(tx);
    let _ = victim.kill();
    let _ = victim.wait();
    Timing { applied, assigned }
}

fn row(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {label} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        ms.len(),
        crate::percentile(&ms, 0.5),
        crate::percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// `fsync: false` runs the controller with `--fsync never`: not a configuration to run,
/// only to see how much of the latency is the journal's fdatasync.
pub async fn run(trials: usize, fsync: bool) {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::start_controller(dir.path(), |c| {
        c.core.node_timeout_ms = 1_000;
        if !fsync {
            c.fsync = drover_journal::FsyncMode::Never;
        }
    })
    .await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut killed, mut seen, mut released) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..trials {
        let t = trial(&b, i, false).await;
        killed.push(ms(t.assigned));
        seen.push(ms(t.applied));
        released.push(ms(t.assigned.saturating_sub(t.applied)));
    }
    let mut silent = Vec::new();
    for i in 0..(trials / 10).max(3) {
        silent.push(ms(trial(&b, i, true).await.assigned));
    }
    println!(
        "command: cargo build --release -p drover && cd bench && cargo run --release -- failover --trials {trials}{}",
        if fsync { "" } else { " --fsync never" }
    );
    println!("| failure | trials | p50 | p99 | max |\n| --- | --- | --- | --- | --- |");
    row("SIGKILL of the streamer → standby has its NodeStreamModifyStateV1Req", killed);
    row("… of which: SIGKILL → the controller applied the disconnect", seen);
    row("… of which: applied → standby has it (journal fsync, release, send)", released);
    row("SIGSTOP of the streamer (node_timeout 1 s) → standby assigned", silent);
    let _ = b.stop.send(());
}
