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
//!
//! With `--cluster 3` it runs a group of three controller processes instead, the
//! simulated nodes spread over the members' admission ports (each node's list
//! rotated); they follow the leader as the node agent does (a new `auth:ack` on the
//! control channel moves the stream; a stream lost with the leader re-admits at the
//! next member). Once the fleet is settled the leader is SIGKILLed, and the tool reports
//! how long until every node streams to the new leader and how many pairs moved.

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
    /// Run a group of this many controllers (3 or 5) and kill its leader once, instead
    /// of one controller.
    #[arg(long, default_value_t = 0)]
    pub cluster: usize,
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
    admission: String,
    join: String,
    pairs: usize,
    rate: f64,
    channels: Mutex<HashMap<(String, usize), tonic::transport::Channel>>,
    /// Follow the leader (a cluster): moves and re-admission instead of failing.
    follow: bool,
    /// When the leader was killed (a cluster run).
    killed: std::sync::Mutex<Option<Instant>>,
    /// Per node: its stream reopened after the kill.
    back: Vec<std::sync::atomic::AtomicBool>,
    /// Nodes whose stream reopened after the kill, and when the last one did.
    back_count: AtomicUsize,
    last_back: std::sync::Mutex<Option<Instant>>,
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
        match session(i, &shared, &mut stop, churned).await {
            Ok(Ended::Stopped) => return Ok(()),
            Ok(Ended::Churned) => {
                shared.churned.fetch_add(1, Ordering::Relaxed);
                churned = true;
            }
            // Following a group: the session's member died; admission again elsewhere.
            Err(_) if shared.follow && !shared.done.load(Ordering::Relaxed) => {
                tokio::time::sleep(Duration::from_millis(50 + (i as u64 * 7919) % 250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why a session ended without an error.
enum Ended {
    Stopped,
    Churned,
}

/// Why one stream of a session ended.
enum StreamEnd {
    Over(Ended),
    /// The control channel named a new upstream (a new leader), with a new ticket.
    Moved(String, String),
}

/// One session of a simulated node: admission, then streams to the upstream it names
/// (and to each new one a leader change names), traffic.
async fn session(
    i: usize,
    shared: &Shared,
    stop: &mut oneshot::Receiver<()>,
    after_churn: bool,
) -> anyhow::Result<Ended> {
    let id = format!("sim-{i:05}");
    // A group's admission ports, rotated per node so control channels spread out.
    let mut list: Vec<&str> = shared.admission.split(',').collect();
    let turn = i % list.len();
    list.rotate_left(turn);
    let mut admission = drover_node::NodeConfig::new(list.join(","), shared.join.clone(), Vec::new());
    admission.id = id.clone();
    // Like a real node, each simulated node holds its admission connection open as the
    // control channel for as long as its session lasts.
    let (mut upstream, mut ticket, mut control) =
        drover_node::admit_session(&admission).await.map_err(anyhow::Error::msg)?;
    let mut control_open = true;
    loop {
        match stream(i, shared, stop, after_churn, &upstream, &ticket, &mut control, &mut control_open).await? {
            StreamEnd::Over(ended) => return Ok(ended),
            StreamEnd::Moved(u, t) => (upstream, ticket) = (u, t),
        }
    }
}

/// One `NodeCommandStream` of a simulated node, until it ends or the node is moved.
#[allow(clippy::too_many_arguments)]
async fn stream(
    i: usize,
    shared: &Shared,
    stop: &mut oneshot::Receiver<()>,
    after_churn: bool,
    upstream: &str,
    ticket: &str,
    control: &mut drover_node::ControlChannel,
    control_open: &mut bool,
) -> anyhow::Result<StreamEnd> {
    let id = format!("sim-{i:05}");
    let channel = {
        let key = (upstream.to_owned(), i / shared.per_channel);
        let mut channels = shared.channels.lock().await;
        match channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = drover_node::grpc_channel(upstream, None).await.map_err(anyhow::Error::msg)?;
                channels.insert(key, c.clone());
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
    let killed = *shared.killed.lock().unwrap_or_else(|p| p.into_inner());
    if killed.is_some() && !shared.back[i].swap(true, Ordering::Relaxed) {
        shared.back_count.fetch_add(1, Ordering::Relaxed);
        *shared.last_back.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
    if after_churn {
        shared.rejoined.fetch_add(1, Ordering::Relaxed);
    }
    let mut streaming: Vec<(String, u64)> = Vec::new();
    let period = Duration::from_secs_f64(1.0 / shared.rate.max(0.01));
    let mut prices =
        tokio::time::interval_at(tokio::time::Instant::now() + period.mul_f64((i % 97) as f64 / 97.0), period);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut seq = 0u64;
    let result: anyhow::Result<StreamEnd> = loop {
        tokio::select! {
            _ = &mut *stop => break Ok(StreamEnd::Over(Ended::Stopped)),
            _ = shared.churn[i].notified() => break Ok(StreamEnd::Over(Ended::Churned)),
            why = control.hold(), if *control_open => match why {
                drover_node::ControlEnd::Moved { upstream, ticket } if shared.follow => break Ok(StreamEnd::Moved(upstream, ticket)),
                // The member holding the channel died: the stream (at the leader) goes on.
                drover_node::ControlEnd::Lost(_) if shared.follow => *control_open = false,
                why => break Err(anyhow::anyhow!("{id}: {why}")),
            },
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
    let group = (args.cluster > 0).then(|| start_group(&bin, dir.path(), args.cluster)).transpose()?;
    let (mut controller, grpc, admission, data) = match &group {
        None => {
            let grpc = format!("127.0.0.1:{g}");
            let log = std::fs::File::create(dir.path().join("controller.log"))?;
            let child = std::process::Command::new(&bin)
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
            (Some(child), grpc, format!("127.0.0.1:{a}"), data)
        }
        Some(group) => (None, group.grpc(), group.admission(), group.members[0].data.clone()),
    };
    let pid = controller.as_ref().map_or(0, |c| c.id());
    let up = Instant::now();
    let cli_data = |group: &Option<Group>| -> PathBuf {
        // A group's admin token is in the data directory of its first leader.
        group
            .as_ref()
            .and_then(|g| g.members.iter().find(|m| m.data.join("admin.token").exists()).map(|m| m.data.clone()))
            .unwrap_or_else(|| data.clone())
    };
    while !cli(&bin, &grpc, &cli_data(&group), &["version"])?.0 {
        if up.elapsed() > Duration::from_secs(30) {
            bail!("the controller did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data = cli_data(&group);
    let (ok, _, join) = cli(&bin, &grpc, &data, &["token", "create", "--role", "join"])?;
    if !ok {
        bail!("could not create a join token");
    }
    let shared = Arc::new(Shared {
        admission,
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
        follow: group.is_some(),
        killed: std::sync::Mutex::new(None),
        back: (0..args.nodes).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
        back_count: AtomicUsize::new(0),
        last_back: std::sync::Mutex::new(None),
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
    if let Some(mut group) = group {
        let code = kill_the_leader(&args, &shared, &mut group, connect_time).await;
        shared.done.store(true, Ordering::Relaxed);
        for s in stops.into_iter().flatten() {
            let _ = s.send(());
        }
        drop(group);
        return code;
    }
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
    if let Some(c) = controller.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One member of the bench's group: its child process and addresses.
struct GroupMember {
    child: Option<std::process::Child>,
    grpc: String,
    admission: String,
    http: String,
    data: PathBuf,
}

/// The bench's group of controllers (killed when dropped).
struct Group {
    members: Vec<GroupMember>,
}

impl Group {
    fn grpc(&self) -> String {
        self.members.iter().map(|m| m.grpc.clone()).collect::<Vec<_>>().join(",")
    }
    fn admission(&self) -> String {
        self.members.iter().map(|m| m.admission.clone()).collect::<Vec<_>>().join(",")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Starts `n` members of one group on loopback.
fn start_group(bin: &Path, dir: &Path, n: usize) -> anyhow::Result<Group> {
    let secret = dir.join("cluster.secret");
    let made = std::process::Command::new(bin).args(["cluster", "secret"]).output()?;
    std::fs::write(&secret, &made.stdout)?;
    let rafts: Vec<String> = (0..n).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_, _>>()?;
    let peers = rafts.iter().enumerate().map(|(k, r)| format!("{}={r}", k + 1)).collect::<Vec<_>>().join(",");
    let mut members = Vec::new();
    for (k, raft) in rafts.iter().enumerate() {
        let (g, a, h) = (free_port()?, free_port()?, free_port()?);
        let m = GroupMember {
            child: None,
            grpc: format!("127.0.0.1:{g}"),
            admission: format!("127.0.0.1:{a}"),
            http: format!("127.0.0.1:{h}"),
            data: dir.join(format!("m{}", k + 1)),
        };
        let log = std::fs::File::create(dir.join(format!("m{}.log", k + 1)))?;
        let child = std::process::Command::new(bin)
            .args(["controller", "--listen", &m.grpc, "--admission", &m.admission, "--http", &m.http])
            .args(["--data-dir", m.data.to_str().unwrap_or("."), "--max-failed-admissions", "1000000"])
            .args(["--member", &(k + 1).to_string(), "--raft", raft, "--peers", &peers])
            .arg("--cluster-secret-file")
            .arg(&secret)
            .env("DROVER_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        members.push(GroupMember { child: Some(child), ..m });
    }
    Ok(Group { members })
}

/// The leader as `drover cluster status --json` on a member says, once it answers.
fn leader_of(bin: &Path, group: &Group, not: Option<u64>) -> Option<u64> {
    group.members.iter().filter(|m| m.child.is_some()).find_map(|m| {
        let out =
            std::process::Command::new(bin).args(["cluster", "status", "--json", "--http", &m.http]).output().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["leader"].as_u64().filter(|l| Some(*l) != not)
    })
}

/// The cluster run: the fleet settled, the leader SIGKILLed, every node back on the
/// new leader; how long that took, and how many pairs moved.
async fn kill_the_leader(
    args: &FleetArgs,
    shared: &Arc<Shared>,
    group: &mut Group,
    connect_time: Duration,
) -> anyhow::Result<std::process::ExitCode> {
    let bin: PathBuf = std::env::current_exe()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let Some(leader) = leader_of(&bin, group, None) else { bail!("no leader") };
    let before: HashMap<String, usize> =
        shared.assignments.lock().await.iter().map(|(p, (n, _))| (p.clone(), *n)).collect();
    let at = Instant::now();
    *shared.killed.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    if let Some(mut c) = group.members[leader as usize - 1].child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let new_leader = loop {
        if let Some(l) = leader_of(&bin, group, Some(leader)) {
            break l;
        }
        if at.elapsed() > Duration::from_secs(30) {
            bail!("no new leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elected = at.elapsed();
    while shared.back_count.load(Ordering::Relaxed) < args.nodes {
        if at.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = shared.back_count.load(Ordering::Relaxed);
    let settled = shared.last_back.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.duration_since(at));
    // Pairs whose streamer changed after the kill (a grace past the rejoin grace).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let after = shared.assignments.lock().await.clone();
    let moved = before.iter().filter(|(p, n)| after.get(*p).is_some_and(|(m, t)| m != *n && *t > at)).count();
    println!(
        "| {} nodes, {} pairs, {} members | connect {:.1} s | leader {leader} SIGKILLed: member {new_leader} leads after {:.2} s | {back} of {} nodes streaming to it after {} | {moved} of {} pairs moved |",
        args.nodes,
        args.pairs,
        group.members.len(),
        connect_time.as_secs_f64(),
        elected.as_secs_f64(),
        args.nodes,
        settled.map_or("(none)".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
        before.len()
    );
    Ok(if back == args.nodes && moved == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}
