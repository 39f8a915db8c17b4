//! End-to-end tests with real processes on loopback: a `drover controller`, several
//! `drover node`s and the `drover` CLI. Signals are real (SIGKILL, SIGSTOP/SIGCONT);
//! no fixed sleeps: every wait polls a condition until a deadline.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {} failed", self.name);
    }
    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use common::free_port;

fn spawn(args: &[&str], log: &Path, name: &str) -> Proc {
    let err = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn drover");
    Proc { child, name: name.to_owned() }
}

/// The admission port that goes with a gRPC port in these tests.
fn admission_port(port: u16) -> u16 {
    ADMISSION.with(|m| *m.borrow().get(&port).expect("controller started"))
}

thread_local! {
    static ADMISSION: std::cell::RefCell<std::collections::HashMap<u16, u16>> = Default::default();
    static DATA: std::cell::RefCell<std::collections::HashMap<u16, std::path::PathBuf>> = Default::default();
}

fn controller(dir: &Path, port: u16) -> Proc {
    let listen = format!("127.0.0.1:{port}");
    let adm = ADMISSION.with(|m| *m.borrow_mut().entry(port).or_insert_with(free_port));
    let admission = format!("127.0.0.1:{adm}");
    let data = dir.join("data");
    DATA.with(|m| m.borrow_mut().insert(port, data.clone()));
    let log = dir.join(format!(
        "controller-{}.log",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    let p = spawn(
        &[
            "controller",
            "--listen",
            &listen,
            "--admission",
            &admission,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--node-timeout",
            "3s",
        ],
        &log,
        "controller",
    );
    assert!(wait_until(Duration::from_secs(10), || cli(port, &["version"]).0), "controller did not come up");
    p
}

/// A join token for nodes of the controller on `port` (created once per controller).
fn join_token(port: u16) -> String {
    let (ok, out, err) = cli(port, &["token", "create", "--role", "join", "--description", "e2e"]);
    assert!(ok, "token create failed: {out}{err}");
    out.trim().to_owned()
}

fn node(dir: &Path, port: u16, name: &str, pairs: &str) -> Proc {
    let addr = format!("127.0.0.1:{}", admission_port(port));
    let token = join_token(port);
    spawn(
        &["node", "--admission", &addr, "--token", &token, "--pairs", pairs, "--name", name],
        &dir.join(format!("{name}.log")),
        name,
    )
}

/// Runs a CLI command as the controller's first admin; returns (exit 0?, stdout, stderr).
fn cli(port: u16, args: &[&str]) -> (bool, String, String) {
    let data = DATA.with(|m| m.borrow().get(&port).cloned()).expect("controller started");
    let out = common::cli_command(port, &data, args).output().expect("run cli");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn nodes(port: u16) -> Vec<Value> {
    let (ok, out, err) = cli(port, &["nodes", "--json", "--timeout", "2s"]);
    if !ok {
        return Vec::new();
    }
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("bad json {e}: {out} {err}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// (node name, epoch) streaming `pair`.
fn streamer(port: u16, pair: &str) -> Option<(String, u64)> {
    nodes(port).into_iter().find_map(|n| {
        let s = n["streaming"].as_array()?.iter().find(|a| a["pair"] == pair)?.clone();
        Some((n["name"].as_str()?.to_owned(), s["epoch"].as_u64()?))
    })
}

fn node_id(port: u16, name: &str) -> Option<String> {
    nodes(port)
        .into_iter()
        .find(|n| n["name"] == name && n["state"] != "gone")
        .and_then(|n| n["id"].as_str().map(str::to_owned))
}

/// Latest (price, upstream time, epoch) of `pair`.
fn price(port: u16, pair: &str) -> Option<(String, i64, u64)> {
    let (ok, out, _) = cli(port, &["prices", "--json", "--timeout", "2s", pair]);
    if !ok {
        return None;
    }
    let all: Value = serde_json::from_str(&out).ok()?;
    all.as_array()?.iter().find(|v| v["pair"] == pair).map(|v| {
        (
            v["price"].as_str().unwrap_or_default().to_owned(),
            v["upstream_time_ms"].as_i64().unwrap_or(0),
            v["epoch"].as_u64().unwrap_or(0),
        )
    })
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn fleet(dir: &Path, port: u16) -> Vec<Proc> {
    let nodes = vec![
        node(dir, port, "na", "EURUSD,GBPUSD"),
        node(dir, port, "nb", "GBPUSD,USDJPY,EURUSD"),
        node(dir, port, "nc", "EURUSD,USDJPY"),
    ];
    assert!(
        wait_until(Duration::from_secs(10), || ["EURUSD", "GBPUSD", "USDJPY"].iter().all(|p| price(port, p).is_some())),
        "fleet did not start streaming"
    );
    nodes
}

#[test]
fn streamer_sigkill_moves_its_pairs_and_prices_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let mut fleet = fleet(dir.path(), port);
    let (victim, epoch) = streamer(port, "EURUSD").expect("EURUSD streamer");
    let (_, before, _) = price(port, "EURUSD").unwrap();
    let i = fleet.iter().position(|p| p.name == victim).unwrap();
    fleet[i].sigkill();
    assert!(
        wait_until(Duration::from_secs(3), || streamer(port, "EURUSD").is_some_and(|(n, e)| n != victim && e > epoch)),
        "EURUSD did not fail over from {victim}"
    );
    assert!(
        wait_until(Duration::from_secs(3), || price(port, "EURUSD").is_some_and(|(_, t, e)| t > before && e > epoch)),
        "EURUSD prices did not resume under the new epoch"
    );
}

#[test]
fn silent_streamer_is_replaced_within_node_timeout_plus_one_second() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let fleet = fleet(dir.path(), port);
    let (victim, epoch) = streamer(port, "USDJPY").expect("USDJPY streamer");
    let p = fleet.iter().find(|p| p.name == victim).unwrap();
    let stopped = Instant::now();
    p.signal("-STOP");
    assert!(
        wait_until(Duration::from_secs(6), || streamer(port, "USDJPY").is_some_and(|(n, e)| n != victim && e > epoch)),
        "USDJPY never moved off the stopped node"
    );
    let took = stopped.elapsed();
    assert!(took <= Duration::from_millis(4_000), "moved after {took:?}, bound is node_timeout (3s) + 1s");
    // When it wakes up, its stale updates are fenced: the streamer stays the new one.
    p.signal("-CONT");
    let new = streamer(port, "USDJPY").unwrap();
    assert!(!wait_until(Duration::from_secs(2), || streamer(port, "USDJPY").is_some_and(|s| s != new)));
}

#[test]
fn controller_sigkill_and_restart_keeps_assignments_and_prices() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut c = controller(dir.path(), port);
    let _fleet = fleet(dir.path(), port);
    let before: Vec<Option<(String, u64)>> = ["EURUSD", "GBPUSD", "USDJPY"].iter().map(|p| streamer(port, p)).collect();
    let (_, last_t, _) = price(port, "EURUSD").unwrap();
    c.sigkill();
    let _c2 = controller(dir.path(), port);
    // Right after recovery, before any node is back, the latest price is intact.
    let (_, t, _) = price(port, "EURUSD").expect("price after recovery");
    assert!(t >= last_t, "latest price went back: {t} < {last_t}");
    assert!(
        wait_until(Duration::from_secs(8), || nodes(port).iter().filter(|n| n["state"] == "online").count() == 3),
        "nodes did not rejoin"
    );
    let after: Vec<Option<(String, u64)>> = ["EURUSD", "GBPUSD", "USDJPY"].iter().map(|p| streamer(port, p)).collect();
    assert_eq!(before, after, "assignments changed across the restart");
}

#[test]
fn status_all_with_a_stopped_node_times_out_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let fleet = fleet(dir.path(), port);
    let id = node_id(port, "nc").unwrap();
    fleet[2].signal("-STOP");
    let started = Instant::now();
    let (ok, out, err) = cli(port, &["status", "--all", "--timeout", "1s"]);
    assert!(!ok, "status must fail when a node does not answer: {out}");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(err.contains(&id), "the missing node is named: {err}");
    assert_eq!(out.lines().count(), 3, "header plus the two nodes that answered: {out}");
}

#[test]
fn kicked_node_reconnects_and_shutdown_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let mut fleet = fleet(dir.path(), port);
    let (ok, out, err) = cli(port, &["kick", "na"]);
    assert!(ok, "{out}{err}");
    assert!(wait_until(Duration::from_secs(5), || {
        nodes(port).iter().any(|n| n["name"] == "na" && n["state"] == "online")
    }));
    let (ok, out, err) = cli(port, &["shutdown", "nb"]);
    assert!(ok, "{out}{err}");
    let i = fleet.iter().position(|p| p.name == "nb").unwrap();
    let mut status = None;
    assert!(wait_until(Duration::from_secs(5), || {
        status = fleet[i].child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "node exits 0 after NodeShutdownV1Req");
}

#[test]
fn unknown_any_from_a_cli_is_answered_and_the_stream_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use drover_proto::v1::controller_client::ControllerClient;
        use drover_proto::{Any, Payload, v1};
        let mut client = ControllerClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let admin = std::fs::read_to_string(dir.path().join("data").join("admin.token")).unwrap();
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert("authorization", format!("Bearer {}", admin.trim()).parse().unwrap());
        let mut inbound = client.cli_command_stream(req).await.unwrap().into_inner();
        let send = |sid: &str, any: Any| v1::StreamFromCli {
            stream_id: sid.into(),
            cli_uuid: "test".into(),
            node_uuids: vec![],
            command: Some(any),
            request_id: sid.into(),
        };
        tx.send(send("a", Any { type_url: "type.googleapis.com/acme.Frobnicate".into(), value: vec![1] }))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = inbound.message().await.unwrap().unwrap();
            got.push(Payload::from_any(m.response.as_ref().unwrap()).unwrap());
        }
        assert!(
            matches!(&got[1], Payload::UnknownCommandV1Notify(u) if u.type_url.ends_with("acme.Frobnicate")),
            "{got:?}"
        );
        // Same stream, next command works.
        tx.send(send("b", Payload::from(v1::ControllerAppVersionV1Req {}).to_any())).await.unwrap();
        let mut version = None;
        while version.is_none() {
            let m = inbound.message().await.unwrap().unwrap();
            if let Payload::ControllerAppVersionV1Reply(v) = Payload::from_any(m.response.as_ref().unwrap()).unwrap() {
                version = Some(v.version);
            }
        }
        assert_eq!(version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    });
}

#[test]
fn sigterm_stops_the_controller_gracefully_with_a_final_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut c = controller(dir.path(), port);
    let _n = node(dir.path(), port, "na", "EURUSD");
    assert!(wait_until(Duration::from_secs(10), || price(port, "EURUSD").is_some()));
    c.signal("-TERM");
    let mut status = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status = c.child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "SIGTERM is a clean stop");
    let journal = dir.path().join("data").join("journal");
    let checkpoints = std::fs::read_dir(&journal)
        .unwrap()
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".ckpt")));
    assert_eq!(checkpoints.count(), 1, "a final checkpoint was written");
    let (ok, out, _) = {
        let out = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["journal", "verify", journal.to_str().unwrap()])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), ())
    };
    assert!(ok, "{out}");
}

#[test]
fn demo_runs_and_shows_a_failover() {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["demo", "--duration", "8s", "--kill-after", "3s"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("*** killed"), "{text}");
    // After the kill, EURUSD is streamed under a new epoch by a node that is not the victim.
    let after = text.split("*** killed").nth(1).unwrap();
    let victim = after.split_whitespace().next().unwrap();
    let eurusd = after.lines().find(|l| l.trim_start().starts_with("EURUSD")).expect("EURUSD row after the kill");
    let cols: Vec<&str> = eurusd.split_whitespace().collect();
    assert_ne!(cols[2], victim, "{eurusd}");
    assert!(cols[3].parse::<u64>().unwrap() >= 2, "{eurusd}");
    assert!(text.contains("demo finished"), "{text}");
}

/// `drover demo --ha`: the leader is stopped, another member leads, and every pair is
/// streamed by the same node under the same epoch as before (no reshuffle), with
/// prices still moving.
#[test]
fn ha_demo_shows_a_new_leader_with_the_same_streamers_and_epochs() {
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["demo", "--ha", "--duration", "11s", "--kill-after", "4s"])
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let (before, after) = text.split_once("*** stopped the leader, member ").expect("the leader was stopped");
    let old: u64 = after.split_whitespace().next().unwrap().parse().unwrap();
    // The last table before the stop and the last table of the run.
    let rows = |t: &str| -> Vec<(String, String, String, String)> {
        let last = t.rsplit("PAIR     PRICE").next().unwrap();
        last.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|c| c.len() == 4 && c[0].len() == 6 && c[0].chars().all(|ch| ch.is_ascii_uppercase()))
            .map(|c| (c[0].to_owned(), c[1].to_owned(), c[2].to_owned(), c[3].to_owned()))
            .collect()
    };
    let (was, now) = (rows(before), rows(after));
    assert_eq!(was.len(), 4, "{text}");
    assert_eq!(now.len(), 4, "{text}");
    for ((pair, p0, s0, e0), (pair1, p1, s1, e1)) in was.iter().zip(&now) {
        assert_eq!((pair, s0, e0), (pair1, s1, e1), "a pair moved on the leader change:\n{text}");
        let _ = (p0, p1);
    }
    assert!(was.iter().zip(&now).any(|(a, b)| a.1 != b.1), "no price moved after the stop:\n{text}");
    let leader = after.lines().rev().find_map(|l| l.trim().strip_prefix("leader: member ")).expect("a leader line");
    let new: u64 = leader.split_whitespace().next().unwrap().parse().unwrap();
    assert_ne!(new, old, "{text}");
    assert!(text.contains("demo finished"), "{text}");
}

#[test]
fn evicted_node_stops_and_stays_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _c = controller(dir.path(), port);
    let mut fleet = fleet(dir.path(), port);
    let (ok, out, err) = cli(port, &["evict", "na", "--reason", "decommissioned"]);
    assert!(ok, "{out}{err}");
    let i = fleet.iter().position(|p| p.name == "na").unwrap();
    let mut status = None;
    assert!(wait_until(Duration::from_secs(5), || {
        status = fleet[i].child.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(status.unwrap().code(), Some(3), "an evicted node exits 3 and does not reconnect");
    assert!(nodes(port).iter().any(|n| n["name"] == "na" && n["state"] == "gone"));
    // Its pairs are streamed by the others.
    assert!(wait_until(Duration::from_secs(3), || streamer(port, "EURUSD").is_some_and(|(n, _)| n != "na")));
}
