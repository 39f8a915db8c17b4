//! Coordinator replicas (issue 18): takeover time and self-call throughput.
//!
//! - **Takeover**: three `drover coordinator --replica K` processes (release build,
//!   `DROVER_BIN`) of one instance, each with a counter service in this process (it
//!   calls itself once per call, forever; a service whose session ends reconnects, as
//!   a supervisor would restart it). Each trial SIGKILLs the primary's process and
//!   measures, from the kill: the new primary's service answering
//!   `TakeBecomingPrimaryCheckpoint` (its `checkpoint()`), and its first call after
//!   that (processing again). The killed replica is restarted and caught up before the
//!   next trial.
//! - **Throughput**: 1 KiB fire-and-forget self calls, 256 in flight, through one
//!   coordinator and through three replicas (all in this process, logs fsync'd; the
//!   secondaries' services hot, replaying every record), in the same run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_ambrosia::{Connection, Outbox, Service};
use drover_coordinator::admin::{Answer, Request};

/// What a counter service saw, shared with the bench.
#[derive(Default)]
struct Seen {
    /// When it last answered a checkpoint request.
    checkpoint: Option<Instant>,
    /// When it handled its first call after that.
    first_call_after: Option<Instant>,
    calls: u64,
}

struct Counter(Arc<Mutex<Seen>>);

impl Service for Counter {
    fn on_call(&mut self, _method: i32, _args: &[u8], out: &mut Outbox) {
        let mut s = self.0.lock().unwrap();
        s.calls += 1;
        if s.checkpoint.is_some() && s.first_call_after.is_none() {
            s.first_call_after = Some(Instant::now());
        }
        out.call_self(1, &[]);
    }
    fn checkpoint(&self) -> Vec<u8> {
        let mut s = self.0.lock().unwrap();
        s.checkpoint = Some(Instant::now());
        s.first_call_after = None;
        Vec::new()
    }
    fn restore(&mut self, _bytes: &[u8]) {}
}

struct Replica {
    id: u64,
    raft: String,
    receive: u16,
    send: u16,
    proc: Option<std::process::Child>,
    seen: Arc<Mutex<Seen>>,
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(dir: &std::path::Path, r: &mut Replica, peers: &str, secret: &std::path::Path) {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("replica-{}.log", r.id))).unwrap();
    let child = std::process::Command::new(crate::drover_bin())
        .args(["coordinator", "--instance", "bench", "--log-dir"])
        .arg(dir.join("logs"))
        .args(["--replica", &r.id.to_string(), "--raft", &r.raft, "--peers", peers, "--cluster-secret-file"])
        .arg(secret)
        .args(["--receive-port", &r.receive.to_string(), "--send-port", &r.send.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn drover (build it: cargo build --release -p drover)");
    r.proc = Some(child);
}

/// Runs a counter service against replica ports forever, reconnecting when its session ends.
fn service(receive: u16, send: u16, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut c = Counter(seen.clone());
            let _ = drover_ambrosia::run(&mut c, Connection::listening_coordinator(receive, send), 0, b"").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

async fn status(
    rafts: &[String],
    creds: &drover_raft::tls::Credentials,
) -> Option<drover_coordinator::admin::InstanceStatus> {
    match drover_coordinator::admin::ask(rafts, creds, &Request::Status).await {
        Ok(Answer::Status(s)) => Some(s),
        _ => None,
    }
}

pub async fn takeover(trials: usize) -> (Vec<f64>, Vec<f64>) {
    let (_tmp, root) = crate::cluster::bench_dir();
    let dir = root.as_path();
    let secret_path = dir.join("secret");
    let made = std::process::Command::new(crate::drover_bin()).args(["cluster", "secret"]).output().unwrap();
    std::fs::write(&secret_path, &made.stdout).unwrap();
    let secret = drover_raft::secret::ClusterSecret::from_file(&secret_path).unwrap();
    let creds = drover_raft::tls::Credentials::plain(secret);
    let mut replicas: Vec<Replica> = (1..=3)
        .map(|id| Replica {
            id,
            raft: format!("127.0.0.1:{}", port()),
            receive: port(),
            send: port(),
            proc: None,
            seen: Arc::default(),
        })
        .collect();
    let peers = replicas.iter().map(|r| format!("{}={}", r.id, r.raft)).collect::<Vec<_>>().join(",");
    let rafts: Vec<String> = replicas.iter().map(|r| r.raft.clone()).collect();
    for r in replicas.iter_mut() {
        start(dir, r, &peers, &secret_path);
    }
    let services: Vec<_> = replicas.iter().map(|r| service(r.receive, r.send, r.seen.clone())).collect();
    let (mut answered, mut processing) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        // Steady: a primary, every replica's service in session and caught up.
        let deadline = Instant::now() + Duration::from_secs(60);
        let primary = loop {
            if let Some(s) = status(&rafts, &creds).await
                && let Some(p) = s.primary
                && s.replicas.iter().all(|r| {
                    r.info.as_ref().is_some_and(|i| {
                        r.lag.is_some_and(|l| l < 50) && (i.app.phase == "secondary" || i.app.phase == "primary")
                    })
                })
            {
                break p;
            }
            assert!(Instant::now() < deadline, "trial {trial}: the replicas did not settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let k = replicas.iter().position(|r| r.id == primary).unwrap();
        for r in &replicas {
            let mut s = r.seen.lock().unwrap();
            s.checkpoint = None;
            s.first_call_after = None;
        }
        let killed = Instant::now();
        if let Some(mut p) = replicas[k].proc.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        // The new primary's service answers TakeBecomingPrimaryCheckpoint, then handles a call.
        let deadline = killed + Duration::from_secs(30);
        let (a, p) = loop {
            let got = replicas.iter().enumerate().filter(|(i, _)| *i != k).find_map(|(_, r)| {
                let s = r.seen.lock().unwrap();
                Some((s.checkpoint?, s.first_call_after?))
            });
            if let Some(got) = got {
                break got;
            }
            assert!(Instant::now() < deadline, "trial {trial}: no new primary processing within 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        answered.push((a - killed).as_secs_f64() * 1000.0);
        processing.push((p - killed).as_secs_f64() * 1000.0);
        eprintln!(
            "trial {trial}: killed replica {primary}; checkpoint answered {:.0} ms, processing {:.0} ms",
            answered[trial], processing[trial]
        );
        start(dir, &mut replicas[k], &peers, &secret_path);
    }
    for s in services {
        s.abort();
    }
    for r in replicas.iter_mut() {
        if let Some(mut p) = r.proc.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
    (answered, processing)
}

/// Where the replicas' logs are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// All on the disk (one disk, shared).
    Disk,
    /// The secondaries' in memory (`/dev/shm`), as if on disks of their own.
    FollowersInMemory,
    /// Every replica's in memory: the Raft round without a disk.
    AllInMemory,
}

/// 1 KiB self calls through three in-process replicas (the primary's service floods;
/// the secondaries' services replay every record).
pub async fn three_replicas(size: usize, calls: u64, window: usize, hot: bool, logs: Logs) -> (f64, f64) {
    let shm = logs != Logs::Disk;
    let dir = tempfile::tempdir().unwrap();
    // Secondaries on a disk of their own, as on their own machines: here, memory.
    let shm_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let creds = drover_raft::tls::Credentials::plain(drover_raft::secret::ClusterSecret::generate().unwrap());
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peers: std::collections::BTreeMap<u64, String> =
        listeners.iter().enumerate().map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string())).collect();
    let mut stops = Vec::new();
    let mut ports = Vec::new();
    for (i, raft) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let config = drover_coordinator::replica::ReplicaConfig {
            coordinator: drover_coordinator::CoordinatorConfig::new(
                "bench",
                if logs == Logs::AllInMemory || (shm && id != 1) { shm_dir.path() } else { dir.path() },
                0,
                0,
            ),
            id,
            raft,
            raft_addr: peers[&id].clone(),
            peers: peers.clone(),
            creds: creds.clone(),
            timing: Default::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(drover_coordinator::replica::run_replica(
            config,
            async {
                let _ = stopped.await;
            },
            move |l| {
                let _ = tx.send(l);
            },
        ));
        let l = rx.await.unwrap();
        ports.push((l.receive_port, l.send_port.unwrap()));
        stops.push((stop, task));
    }
    let rafts: Vec<String> = peers.values().cloned().collect();
    let mut primary = loop {
        if let Some(s) = status(&rafts, &creds).await
            && let Some(p) = s.primary
        {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if shm && primary != 1 {
        // The primary is the replica on the disk.
        let _ = drover_coordinator::admin::ask(&rafts, &creds, &Request::Transfer { to: 1 }).await;
        primary = 1;
    }
    // The secondaries' services first (they wait for the first checkpoint), then the primary's.
    let mut apps = Vec::new();
    for (i, (r, s)) in ports.iter().enumerate() {
        if i as u64 + 1 == primary || !hot {
            continue;
        }
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let mut flood = crate::coordinator::flood(size, window, calls, tx);
        let c = Connection::listening_coordinator(*r, *s);
        apps.push(tokio::spawn(async move {
            let _ = drover_ambrosia::run(&mut flood, c, 0, b"").await;
        }));
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let mut flood = crate::coordinator::flood(size, window, calls, done_tx);
    let (r, s) = ports[primary as usize - 1];
    let started = Instant::now();
    apps.push(tokio::spawn(async move {
        if let Err(e) = drover_ambrosia::run(&mut flood, Connection::listening_coordinator(r, s), 0, b"").await {
            eprintln!("flood service stopped: {e}");
        }
    }));
    tokio::time::timeout(Duration::from_secs(900), done_rx).await.unwrap().unwrap();
    let took = started.elapsed().as_secs_f64();
    for a in apps {
        a.abort();
    }
    for (stop, task) in stops {
        let _ = stop.send(());
        let _ = task.await;
    }
    let rate = calls as f64 / took;
    (rate, rate * size as f64 / 1e6)
}

pub async fn run(trials: usize, calls: u64, window: usize, only: Option<&str>) {
    println!(
        "command: cargo build --release -p drover && cd bench && cargo run --release -- replicas --trials {trials} --calls {calls} --window {window}"
    );
    if let Some(setup) = only {
        // One setup alone (for a profiler): one, hot, cold, shm or mem.
        let (rate, mb) = match setup {
            "one" => crate::coordinator::one(1024, calls, window).await,
            "hot" => three_replicas(1024, calls, window, true, Logs::Disk).await,
            "cold" => three_replicas(1024, calls, window, false, Logs::Disk).await,
            "mem" => three_replicas(1024, calls, window, true, Logs::AllInMemory).await,
            _ => three_replicas(1024, calls, window, true, Logs::FollowersInMemory).await,
        };
        println!("{setup}: {calls} calls, {rate:.0} calls/s, {mb:.1} MB/s");
        return;
    }
    let (one_rate, one_mb) = crate::coordinator::one(1024, calls, window).await;
    let (three_rate, three_mb) = three_replicas(1024, calls, window, true, Logs::Disk).await;
    let (cold_rate, cold_mb) = three_replicas(1024, calls, window, false, Logs::Disk).await;
    let (shm_rate, shm_mb) = three_replicas(1024, calls, window, true, Logs::FollowersInMemory).await;
    let (mem_rate, mem_mb) = three_replicas(1024, calls, window, true, Logs::AllInMemory).await;
    println!("\n| 1 KiB self calls, {window} in flight | calls | calls/s | MB/s |\n| --- | --- | --- | --- |");
    println!("| one coordinator | {calls} | {one_rate:.0} | {one_mb:.1} |");
    println!("| three replicas (primary + 2 hot secondaries) | {calls} | {three_rate:.0} | {three_mb:.1} |");
    println!("| three replicas, secondaries without applications | {calls} | {cold_rate:.0} | {cold_mb:.1} |");
    println!(
        "| three replicas, hot secondaries' logs in memory (/dev/shm: the disk not shared) | {calls} | {shm_rate:.0} | {shm_mb:.1} |"
    );
    println!("| three replicas, hot, every log in memory (no disk at all) | {calls} | {mem_rate:.0} | {mem_mb:.1} |");
    println!(
        "three replicas / one: {:.2}× with hot secondaries, {:.2}× without their applications, {:.2}× with the secondaries' logs off the shared disk, {:.2}× with no disk (goal ≥ 0.6×)",
        three_rate / one_rate,
        cold_rate / one_rate,
        shm_rate / one_rate,
        mem_rate / one_rate
    );
    if trials == 0 {
        return;
    }
    let (mut answered, mut processing) = takeover(trials).await;
    answered.sort_by(f64::total_cmp);
    processing.sort_by(f64::total_cmp);
    let p = |v: &[f64], q: f64| crate::percentile(v, q);
    println!(
        "\n| takeover after SIGKILL of the primary ({trials} trials) | p50 ms | p90 ms | p99 ms | max ms |\n| --- | --- | --- | --- | --- |"
    );
    for (what, v) in [
        ("new primary's service answered TakeBecomingPrimaryCheckpoint", &answered),
        ("…and handled its next call", &processing),
    ] {
        println!(
            "| {what} | {:.0} | {:.0} | {:.0} | {:.0} |",
            p(v, 0.5),
            p(v, 0.9),
            p(v, 0.99),
            v.last().copied().unwrap_or(0.0)
        );
    }
}
