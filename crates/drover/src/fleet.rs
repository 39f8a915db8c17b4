//! `drover bench fleet`: many simulated nodes in one process against a real
//! `drover controller` child process, to measure the controller at fleet scale.
//!
//! Each simulated node passes a real admission handshake and holds the control channel
//! open (answering keepalives), opens its own gRPC `NodeCommandStream`, announces
//! three pairs, heartbeats every second, streams prices for the pairs it is assigned
//! (`--rate` updates per second per pair) and answers status requests. With `--churn
//! R`, R random nodes per second drop their session during the measurement window and
//! come back at once through admission, as restarting nodes do. The tool reports the
//! controller's resident memory and CPU, how long `drover nodes` and `drover status
//! --all` take, and the failover latency under that load (a streamer's stream is
//! dropped; the time until another simulated node is assigned its pair).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use drover_proto::v1::controller_client::ControllerClient;
use drover_proto::{Payload, v1};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Distinct pairs (each node knows three).
    #[arg(long, default_value_t = 300)]
    pub pairs: usize,
    /// Price updates per second per assigned pair.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Failover trials under load.
    #[arg(long, default_value_t = 20)]
    pub failovers: usize,
    /// Nodes connecting at the same time.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Node streams per HTTP/2 connection (each node still has its own gRPC stream).
    #[arg(long, default_value_t = 100)]
    pub streams_per_connection: usize,
    /// Nodes per second that drop their session and reconnect (through admission)
    /// during the measurement window.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
}

/// Where assignments are reported: pair → (node, when assigned).
type Assignments = Arc<Mutex<HashMap<String, (usize, Instant)>>>;

struct Shared {
    /// Per node: drop the session and reconnect.
    churn: Vec<tokio::sync::Notify>,
    /// Sessions dropped by churn, and reconnections completed after one.
    churned: AtomicUsize,
    rejoined: AtomicUsize,
    /// Measurements are over: nodes ending now are the teardown, not failures.
    done: std::sync::atomic::AtomicBool,
    grpc: String,
    admission: String,
    join: String,
    pairs: usize,
    rate: f64,
    channels: Mutex<HashMap<usize, tonic::transport::Channel>>,
    per_channel: usize,
    connected: AtomicUsize,
    updates: AtomicU64,
    assignments: Assignments,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The controller's resident memory (kB) and CPU ticks (user + system).
fn proc_stats(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

/// One simulated node: sessions one after another (a churned session reconnects at
/// once) until `stop` fires or a session fails.
async fn node(i: usize, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) -> anyhow::Result<()> {
    let mut churned = false;
    loop {
        match session(i, &shared, &mut stop, churned).await? {
            Ended::Stopped => return Ok(()),
            Ended::Churned => {
                shared.churned.fetch_add(1, Ordering::Relaxed);
                churned = true;
            }
        }
    }
}

/// Why a session ended without an error.
enum Ended {
    Stopped,
    Churned,
}

/// One session of a simulated node: admission, stream, traffic.
async fn session(
    i: usize,
    shared: &Shared,
    stop: &mut oneshot::Receiver<()>,
    after_churn: bool,
) -> anyhow::Result<Ended> {
    let id = format!("sim-{i:05}");
    let mut admission = drover_node::NodeConfig::new(shared.admission.clone(), shared.join.clone(), Vec::new());
    admission.id = id.clone();
    // Like a real node, each simulated node holds its admission connection open as the
    // control channel for as long as its session lasts.
    let (_upstream, ticket, mut control) = drover_node::admit_session(&admission).await.map_err(anyhow::Error::msg)?;
    let channel = {
        let mut channels = shared.channels.lock().await;
        match channels.get(&(i / shared.per_channel)) {
            Some(c) => c.clone(),
            None => {
                let c = drover_node::grpc_channel(&shared.grpc, None).await.map_err(anyhow::Error::msg)?;
                channels.insert(i / shared.per_channel, c.clone());
                c
            }
        }
    };
    let mut client = ControllerClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::StreamFromNode>(64);
    let msg = |p: Payload, request_id: String| v1::StreamFromNode {
        node_uuid: id.clone(),
        from_uuid: None,
        response: Some(p.to_any()),
        request_id,
    };
    let known: Vec<String> = (0..3).map(|k| format!("P{:04}", (i * 3 + k) % shared.pairs)).collect();
    let hello =
        v1::NodeKnownCurrenciesV1Notify { pairs: known, name: id.clone(), version: "sim".into(), worker: false };
    tx.send(msg(hello.into(), String::new())).await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", format!("Bearer {ticket}").parse()?);
    let mut inbound = client.node_command_stream(req).await?.into_inner();
    shared.connected.fetch_add(1, Ordering::Relaxed);
    if after_churn {
        shared.rejoined.fetch_add(1, Ordering::Relaxed);
    }
    let mut streaming: Vec<(String, u64)> = Vec::new();
    let period = Duration::from_secs_f64(1.0 / shared.rate.max(0.01));
    let mut prices =
        tokio::time::interval_at(tokio::time::Instant::now() + period.mul_f64((i % 97) as f64 / 97.0), period);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0u64;
    let result = loop {
        tokio::select! {
            _ = &mut *stop => break Ok(Ended::Stopped),
            _ = shared.churn[i].notified() => break Ok(Ended::Churned),
            why = control.hold() => break Err(anyhow::anyhow!("{id}: {why}")),
            _ = beat.tick() => {
                let b = v1::NodeHeartbeatV1Notify { sent_at_ms: 0 };
                if tx.send(msg(b.into(), String::new())).await.is_err() {
                    break Err(anyhow::anyhow!("{id}: the stream ended"));
                }
            }
            _ = prices.tick(), if !streaming.is_empty() => {
                let now = drover_wire::unix_ms();
                for (pair, epoch) in &streaming {
                    seq += 1;
                    let u = v1::NodePriceUpdateV1Notify {
                        pair: pair.clone(),
                        price: Some(v1::Decimal { mantissa: 100_000 + (now % 1000), scale: 5 }),
                        upstream_time_ms: now,
                        seq,
                        epoch: *epoch,
                    };
                    if tx.send(msg(u.into(), String::new())).await.is_err() { break; }
                    shared.updates.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = inbound.message() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => break Err(anyhow::anyhow!("{id}: the controller ended the stream")),
                    Err(e) => break Err(anyhow::anyhow!("{id}: {e}")),
                };
                let Some(any) = m.command else { continue };
                match Payload::from_any(&any) {
                    Ok(Payload::NodeStreamModifyStateV1Req(r)) => {
                        let now = Instant::now();
                        let mut a = shared.assignments.lock().await;
                        for s in &r.streams {
                            if !streaming.iter().any(|(p, e)| *p == s.pair && *e == s.epoch) {
                                a.insert(s.pair.clone(), (i, now));
                            }
                        }
                        streaming = r.streams.iter().map(|s| (s.pair.clone(), s.epoch)).collect();
                    }
                    Ok(Payload::NodeStatusV1Req(_)) => {
                        let st = v1::NodeStatusV1Reply { node_uuid: id.clone(), name: id.clone(), ..Default::default() };
                        let _ = tx.send(msg(st.into(), m.request_id)).await;
                    }
                    _ => {}
                }
            }
        }
    };
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    result
}

fn cli(bin: &Path, grpc: &str, data: &Path, args: &[&str]) -> anyhow::Result<(bool, Duration, String)> {
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(args)
        .env("DROVER_CONTROLLER", grpc)
        .env("DROVER_DATA_DIR", data)
        .env_remove("DROVER_TOKEN")
        .output()?;
    if !out.status.success() && args.first() != Some(&"version") {
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("`drover {}` failed: {}", args.join(" "), err.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
    }
    Ok((out.status.success(), started.elapsed(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

pub async fn run(args: FleetArgs) -> anyhow::Result<std::process::ExitCode> {
    let bin: PathBuf = std::env::current_exe().context("cannot find the drover binary")?;
    // This process holds every simulated node's sockets: one control channel each plus
    // the shared gRPC connections.
    crate::util::raise_fd_limit(args.nodes as u64 + (args.nodes / args.streams_per_connection.max(1)) as u64 + 1024);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let (g, a, h) = (free_port()?, free_port()?, free_port()?);
    let grpc = format!("127.0.0.1:{g}");
    let log = std::fs::File::create(dir.path().join("controller.log"))?;
    let mut controller = std::process::Command::new(&bin)
        .args([
            "controller",
            "--listen",
            &grpc,
            "--admission",
            &format!("127.0.0.1:{a}"),
            "--http",
            &format!("127.0.0.1:{h}"),
        ])
        .args(["--data-dir", data.to_str().unwrap_or("."), "--max-failed-admissions", "1000000"])
        .env("DROVER_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?;
    let pid = controller.id();
    let up = Instant::now();
    while !cli(&bin, &grpc, &data, &["version"])?.0 {
        if up.elapsed() > Duration::from_secs(20) {
            bail!("the controller did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, _, join) = cli(&bin, &grpc, &data, &["token", "create", "--role", "join"])?;
    if !ok {
        bail!("could not create a join token");
    }
    let shared = Arc::new(Shared {
        grpc: grpc.clone(),
        admission: format!("127.0.0.1:{a}"),
        join: join.trim().to_owned(),
        pairs: args.pairs,
        rate: args.rate,
        channels: Mutex::new(HashMap::new()),
        per_channel: args.streams_per_connection.max(1),
        connected: AtomicUsize::new(0),
        updates: AtomicU64::new(0),
        churn: (0..args.nodes).map(|_| tokio::sync::Notify::new()).collect(),
        churned: AtomicUsize::new(0),
        rejoined: AtomicUsize::new(0),
        done: std::sync::atomic::AtomicBool::new(false),
        assignments: Arc::new(Mutex::new(HashMap::new())),
    });
    let (idle_rss, _) = proc_stats(pid);
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency));
    let mut stops = Vec::with_capacity(args.nodes);
    let failed = Arc::new(AtomicUsize::new(0));
    for i in 0..args.nodes {
        let (stop_tx, stop_rx) = oneshot::channel();
        stops.push(Some(stop_tx));
        let (shared, gate, failed) = (shared.clone(), gate.clone(), failed.clone());
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let connected_before = shared.connected.load(Ordering::Relaxed);
            let r = tokio::spawn(node(i, shared.clone(), stop_rx));
            // Hold the permit until this node is connected (or failed).
            while shared.connected.load(Ordering::Relaxed) <= connected_before && !r.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            drop(permit);
            if let Ok(Err(e)) = r.await
                && !shared.done.load(Ordering::Relaxed)
                && failed.fetch_add(1, Ordering::Relaxed) < 5
            {
                eprintln!("node {i}: {e:#}");
            }
        });
    }
    while shared.connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.nodes {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {} of {} nodes connected", shared.connected.load(Ordering::Relaxed), args.nodes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed();
    eprintln!(
        "{} nodes connected in {:.1} s ({} failed)",
        shared.connected.load(Ordering::Relaxed),
        connect_time.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    // Steady state: CPU over 10 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, t0) = proc_stats(pid);
    let u0 = shared.updates.load(Ordering::Relaxed);
    let window = Instant::now();
    // Churn during the window: random nodes drop their session and come straight back.
    let churner = (args.churn > 0.0).then(|| {
        let (shared, rate, nodes) = (shared.clone(), args.churn, args.nodes);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            loop {
                tick.tick().await;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shared.churn[(x % nodes as u64) as usize].notify_one();
            }
        })
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    if let Some(c) = churner {
        c.abort();
    }
    let (rss, t1) = proc_stats(pid);
    let ticks_per_s = 100.0;
    let cpu = (t1 - t0) as f64 / ticks_per_s / window.elapsed().as_secs_f64() * 100.0;
    let ups = (shared.updates.load(Ordering::Relaxed) - u0) as f64 / window.elapsed().as_secs_f64();
    let (nodes_ok, nodes_time, listing) = cli(&bin, &grpc, &data, &["nodes", "--json", "--timeout", "30s"])?;
    let listed =
        serde_json::from_str::<serde_json::Value>(&listing).ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
    let (status_ok, status_time, _) = cli(&bin, &grpc, &data, &["status", "--all", "--timeout", "30s"])?;
    // Failover under load: drop a streamer's stream, time the reassignment.
    let mut lat = Vec::new();
    for k in 0..args.failovers {
        let pair = format!("P{:04}", (k * 7) % args.pairs);
        let Some((victim, _)) = shared.assignments.lock().await.get(&pair).copied() else { continue };
        let Some(stop) = stops[victim].take() else { continue };
        let dropped = Instant::now();
        let _ = stop.send(());
        let deadline = dropped + Duration::from_secs(10);
        loop {
            if let Some((n, at)) = shared.assignments.lock().await.get(&pair).copied()
                && n != victim
                && at > dropped
            {
                lat.push(at.duration_since(dropped).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{pair}: no new streamer within 10 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "| {} nodes, {} pairs, {} upd/s/pair | connect {:.1} s | RSS {:.0} MiB (idle {:.0}) | CPU {:.0} % | {:.0} updates/s | nodes {} in {:.2} s{} | status --all {:.2} s{} | failover p50 {:.1} ms p99 {:.1} ms ({} trials) |",
        args.nodes,
        args.pairs,
        args.rate,
        connect_time.as_secs_f64(),
        rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        cpu,
        ups,
        listed,
        nodes_time.as_secs_f64(),
        if nodes_ok { "" } else { " (FAILED)" },
        status_time.as_secs_f64(),
        if status_ok { "" } else { " (FAILED)" },
        pct(0.5),
        pct(0.99),
        lat.len()
    );
    if args.churn > 0.0 {
        println!(
            "churn {}/s during the window: {} sessions dropped, {} of them back through admission",
            args.churn,
            shared.churned.load(Ordering::Relaxed),
            shared.rejoined.load(Ordering::Relaxed)
        );
    }
    shared.done.store(true, Ordering::Relaxed);
    let lost = failed.load(Ordering::Relaxed);
    if lost > 0 {
        eprintln!("{lost} simulated nodes failed (admission refused or session ended by the controller)");
    }
    for s in stops.into_iter().flatten() {
        let _ = s.send(());
    }
    let _ = controller.kill();
    let _ = controller.wait();
    Ok(std::process::ExitCode::SUCCESS)
}
