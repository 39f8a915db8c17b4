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

async fn trial(b: &crate::Bench, i: usize, silent: bool) -> Duration {
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
    let t0 = Instant::now();
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
    let took = t0.elapsed();
    beat.abort();
    let _ = victim.kill();
    let _ = victim.wait();
    took
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

pub async fn run(trials: usize) {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::start_controller(dir.path(), |c| c.core.node_timeout_ms = 1_000).await;
    let mut killed = Vec::new();
    for i in 0..trials {
        killed.push(trial(&b, i, false).await.as_secs_f64() * 1e3);
    }
    let mut silent = Vec::new();
    for i in 0..(trials / 10).max(3) {
        silent.push(trial(&b, i, true).await.as_secs_f64() * 1e3);
    }
    println!(
        "command: cargo build --release -p drover && cd bench && cargo run --release -- failover --trials {trials}"
    );
    println!("| failure | trials | p50 | p99 | max |\n| --- | --- | --- | --- | --- |");
    row("SIGKILL of the streamer → standby has its NodeStreamModifyStateV1Req", killed);
    row("SIGSTOP of the streamer (node_timeout 1 s) → standby assigned", silent);
    let _ = b.stop.send(());
}
