//! `drover demo`: a controller and three nodes with overlapping pairs in one process,
//! on a temporary data directory, talking real gRPC over loopback. Prints a live table
//! of pairs, prices and streamers; after a few seconds it kills the node streaming
//! EURUSD (its stream drops without a goodbye, as in a crash) and shows the failover.
//!
//! `drover demo --ha`: three controllers as one replicated group (real Raft ports,
//! real admission and gRPC), the same nodes given every member's admission address,
//! and a worker; after a few seconds it stops the leader abruptly (its sockets close,
//! as in a crash) and shows the new leader, the same streamers under the same epochs,
//! and prices that never stopped.

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
    /// Kill the EURUSD streamer (with --ha: the leader) after this long.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub kill_after: Duration,
    /// Three controllers as one replicated group; the leader is killed instead of a node.
    #[arg(long)]
    pub ha: bool,
}

/// One controller of the demo, running in this process.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), drover_controller::ShellError>>,
    grpc: std::net::SocketAddr,
    admission: std::net::SocketAddr,
    http: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Running {
    /// Stops it at once: its ports close, as in a crash (what it committed is on the
    /// others' disks).
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let _ = (&mut self.task).await;
        }
    }
}

/// Starts one controller on loopback ports; `cluster`: as member of a group.
async fn start_controller(
    dir: std::path::PathBuf,
    cluster: Option<(drover_controller::ClusterSettings, tokio::net::TcpListener)>,
) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&dir)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let admission = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (grpc, admission_addr, http_addr) = (listener.local_addr()?, admission.local_addr()?, http.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = ControllerConfig::new(&dir);
    let raft = cluster.map(|(settings, raft)| {
        config.cluster = Some(settings);
        raft
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(drover_controller::run(
        config,
        std::sync::Arc::new(drover_controller::FsStorage),
        drover_controller::Listeners { grpc: listener, admission: Some(admission), http: Some(http), raft },
        async {
            let _ = stop_rx.await;
        },
        move |_| {
            let _ = ready_tx.send(());
        },
    ));
    ready_rx.await.context("the controller did not start")?;
    Ok(Running { stop: Some(stop_tx), task, grpc, admission: admission_addr, http: http_addr, dir })
}

/// Three members of one group, on loopback.
async fn start_group(root: &std::path::Path) -> anyhow::Result<Vec<Running>> {
    let secret = drover_raft::secret::ClusterSecret::generate()?;
    let mut rafts = Vec::new();
    for _ in 0..3 {
        rafts.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let peers: std::collections::BTreeMap<u64, String> = rafts
        .iter()
        .enumerate()
        .map(|(i, l)| Ok((i as u64 + 1, l.local_addr()?.to_string())))
        .collect::<std::io::Result<_>>()?;
    let mut members = Vec::new();
    for (i, raft) in rafts.into_iter().enumerate() {
        let settings = drover_controller::ClusterSettings {
            member: i as u64 + 1,
            peers: peers.clone(),
            secret: secret.clone(),
            tls: None,
            timing: drover_raft::member::Timing::default(),
        };
        members.push(start_controller(root.join(format!("member-{}", i + 1)), Some((settings, raft))).await?);
    }
    Ok(members)
}

/// Who leads the group, as any running member's HTTP port says: (member, term).
async fn leader_of(members: &[Running]) -> Option<(u64, u64)> {
    for m in members.iter().filter(|m| m.stop.is_some()) {
        if let Ok(s) = crate::cluster_cmd::status(&m.http.to_string(), None).await
            && let Some(l) = s.leader
        {
            return Some((l, s.term));
        }
    }
    None
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
    let mut controllers = if args.ha {
        start_group(dir.path()).await?
    } else {
        vec![start_controller(dir.path().to_path_buf(), None).await?]
    };
    let list = |f: fn(&Running) -> std::net::SocketAddr| {
        controllers.iter().map(|c| f(c).to_string()).collect::<Vec<_>>().join(",")
    };
    let (grpcs, admissions) = (list(|c| c.grpc), list(|c| c.admission));
    for (i, c) in controllers.iter().enumerate() {
        let name = if args.ha { format!("member {}", i + 1) } else { "controller".to_owned() };
        println!("drover demo: {name} on {} (admission {}), data in {}", c.grpc, c.admission, c.dir.display());
        println!("  dashboard: http://{}/", c.http);
    }
    // The operator's first admin token is in the data directory of the first leader;
    // with it, a join token.
    let mut admin = None;
    let waited = Instant::now();
    while admin.is_none() {
        admin = controllers
            .iter()
            .find_map(|c| std::fs::read_to_string(c.dir.join(drover_controller::ADMIN_TOKEN_FILE)).ok());
        if admin.is_none() {
            anyhow::ensure!(waited.elapsed() < Duration::from_secs(20), "no leader wrote an admin token within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let admin = admin.unwrap_or_default().trim().to_owned();
    let ctx = Ctx { controller: grpcs, timeout: Duration::from_secs(5), json: false, token: Some(admin), ca: None };
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
        let cfg =
            node_config(&admissions, &join, pairs.split(',').map(str::to_owned).collect(), Some(name.into()), None);
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
    let mut wcfg = node_config(&admissions, &join, Vec::new(), Some("worker-1".into()), None);
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
        if args.ha {
            match leader_of(&controllers).await {
                Some((l, term)) => println!("       leader: member {l} (term {term})"),
                None => println!("       leader: none yet (an election)"),
            }
        }
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
            if args.ha {
                if let Some((l, term)) = leader_of(&controllers).await
                    && let Some(victim) = controllers.get_mut(l as usize - 1)
                {
                    let streamers: Vec<String> = prices.iter().map(|p| format!("{}@{}", p.streamer, p.epoch)).collect();
                    victim.stop().await;
                    println!(
                        "\n*** stopped the leader, member {l} (term {term}): watch a new leader take over with the same streamers and epochs"
                    );
                    tracing::debug!(?streamers, "streamers before the leader stopped");
                    killed = Some(format!("leader member {l}"));
                }
            } else {
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
    }
    for (_, h) in nodes {
        h.abort();
    }
    worker.abort();
    for c in &mut controllers {
        c.stop().await;
    }
    let what =
        if args.ha { "the others elected a new leader and the nodes followed it" } else { "its pairs failed over" };
    println!("\ndemo finished{}", killed.map(|k| format!(" (killed {k}; {what})")).unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}
