//! `drover demo`: a controller and three nodes with overlapping pairs in one process,
//! on a temporary data directory, talking real gRPC over loopback. Prints a live table
//! of pairs, prices and streamers; after a few seconds it kills the node streaming
//! EURUSD (its stream drops without a goodbye, as in a crash) and shows the failover.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use drover_cli::{Ctx, Session};
use drover_controller::ControllerConfig;
use drover_node::NodeStats;
use drover_node::source::Simulator;
use drover_proto::{Payload, v1};

use crate::roles::node_config;
use crate::util::{parse_duration, shutdown_signal};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this long (Ctrl-C stops earlier).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Kill the EURUSD streamer after this long.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub kill_after: Duration,
}

async fn snapshot(ctx: &Ctx) -> anyhow::Result<(Vec<v1::NodeInfo>, Vec<v1::PriceView>)> {
    let mut s = Session::open(ctx).await?;
    let nodes = s.request(ctx, vec![], v1::ControllerListNodesV1Req {}.into(), false).await?;
    let prices =
        s.request(ctx, vec![], v1::ControllerPricesV1Req { pairs: vec![], watch: false }.into(), false).await?;
    let nodes = nodes
        .replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerListNodesV1Reply(l) => Some(l.nodes),
            _ => None,
        })
        .unwrap_or_default();
    let prices = prices
        .replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerPricesV1Reply(p) => Some(p.prices),
            _ => None,
        })
        .unwrap_or_default();
    Ok((nodes, prices))
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admission = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let admission_addr = admission.local_addr()?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_addr = http.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = ControllerConfig::new(dir.path());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let controller = tokio::spawn(drover_controller::run(
        config,
        std::sync::Arc::new(drover_controller::FsStorage),
        drover_controller::Listeners { grpc: listener, admission: Some(admission), http: Some(http), raft: None },
        async {
            let _ = stop_rx.await;
        },
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    ready_rx.await.context("the controller did not start")?;
    println!("drover demo: controller on {addr} (admission {admission_addr}), data in {}", dir.path().display());
    println!("dashboard: http://{http_addr}/");
    // The operator's first admin token is in the data directory; with it, a join token.
    let admin = std::fs::read_to_string(dir.path().join(drover_controller::ADMIN_TOKEN_FILE))?.trim().to_owned();
    let ctx = Ctx {
        controller: addr.to_string(),
        timeout: Duration::from_secs(2),
        json: false,
        token: Some(admin),
        ca: None,
    };
    let req = v1::ControllerTokenCreateV1Req {
        role: v1::TokenRole::Join as i32,
        ttl_ms: 0,
        uses: 0,
        description: "demo nodes".into(),
    };
    let out = drover_cli::request(&ctx, vec![], req.into()).await?;
    let join = out
        .replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerTokenCreateV1Reply(t) => Some(t.token),
            _ => None,
        })
        .context("no join token")?;
    let specs = [("node-a", "EURUSD,GBPUSD"), ("node-b", "GBPUSD,USDJPY,EURUSD"), ("node-c", "EURUSD,USDJPY,AUDUSD")];
    let mut nodes = HashMap::new();
    for (name, pairs) in specs {
        let cfg = node_config(
            &admission_addr.to_string(),
            &join,
            pairs.split(',').map(str::to_owned).collect(),
            Some(name.into()),
            None,
        );
        println!("  {name} knows {pairs}");
        let handle = tokio::spawn(drover_node::run(
            cfg,
            Arc::new(Simulator::default()),
            Arc::new(NodeStats::default()),
            std::future::pending(),
        ));
        nodes.insert(name.to_owned(), handle);
    }
    // One worker, and a task for it once it is subscribed.
    let mut wcfg = node_config(&admission_addr.to_string(), &join, Vec::new(), Some("worker-1".into()), None);
    wcfg.worker = true;
    wcfg.worker_config = Some(drover_node::worker::WorkerConfig::new(wcfg.id.clone(), 1, 256));
    println!("  worker-1 runs tasks (1 core)");
    let worker = tokio::spawn(drover_node::run(
        wcfg,
        Arc::new(Simulator::default()),
        Arc::new(NodeStats::default()),
        std::future::pending(),
    ));
    let task = v1::ControllerTaskRunV1Req {
        job_addr: "/bin/echo".into(),
        args: vec!["hello from".into(), "worker-1".into()],
        timeout_ms: 10_000,
        cores: 1,
        max_attempts: 3,
        ..Default::default()
    };
    let task_id =
        drover_cli::request(&ctx, vec![], task.into()).await?.replies.into_iter().find_map(|r| match r.payload {
            Payload::ControllerTaskRunV1Reply(t) => Some(t.task_id),
            _ => None,
        });
    let mut task_reported = false;
    let started = Instant::now();
    let mut killed: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if started.elapsed() >= args.duration {
            break;
        }
        let (infos, prices) = match snapshot(&ctx).await {
            Ok(s) => s,
            Err(e) => {
                println!("(controller not answering yet: {e})");
                continue;
            }
        };
        // Who streams each pair now (a pair whose only capable node is gone has nobody).
        let now_streaming: HashMap<&str, &str> =
            infos.iter().flat_map(|n| n.streaming.iter().map(move |a| (a.pair.as_str(), n.name.as_str()))).collect();
        println!("\n[{:>3}s] PAIR     PRICE        STREAMER  EPOCH", started.elapsed().as_secs());
        for p in &prices {
            let price = p.price.clone().unwrap_or_default();
            println!(
                "       {:<8} {:<12} {:<9} {}",
                price.pair,
                price.price.as_ref().map(drover_cli::commands::decimal).unwrap_or_default(),
                now_streaming.get(price.pair.as_str()).copied().unwrap_or("(none)"),
                p.epoch
            );
        }
        let states: Vec<String> = infos.iter().map(|n| format!("{}={}", n.name, n.state)).collect();
        println!("       nodes: {}", states.join("  "));
        if let (Some(id), false) = (&task_id, task_reported) {
            let logs = drover_cli::request(&ctx, vec![], v1::ControllerTaskLogsV1Req { id: id.clone() }.into()).await;
            let outcome = logs.ok().and_then(|o| {
                o.replies.into_iter().find_map(|r| match r.payload {
                    Payload::ControllerTaskLogsV1Reply(l) => l.outcome,
                    _ => None,
                })
            });
            if let Some(o) = outcome {
                println!(
                    "       task {id} on worker-1: exit {}, output {:?}",
                    o.exit_code,
                    String::from_utf8_lossy(&o.stdout).trim()
                );
                task_reported = true;
            }
        }
        if killed.is_none() && started.elapsed() >= args.kill_after {
            let streamer = infos.iter().find(|n| n.streaming.iter().any(|a| a.pair == "EURUSD"));
            if let Some(victim) = streamer
                && let Some(h) = nodes.remove(&victim.name)
            {
                h.abort();
                println!(
                    "\n*** killed {} (it streamed EURUSD): watch EURUSD move to another node with a new epoch",
                    victim.name
                );
                killed = Some(victim.name.clone());
            }
        }
    }
    for (_, h) in nodes {
        h.abort();
    }
    worker.abort();
    let _ = stop_tx.send(());
    let _ = controller.await;
    println!("\ndemo finished{}", killed.map(|k| format!(" (killed {k}; its pairs failed over)")).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
