//! The chaos suite of high availability, part 2 (issue 16): three `drover controller`
//! processes as one group, nodes given every member's admission address, and the
//! leader killed while the fleet streams and an operator works. What must hold:
//!
//! - **no reshuffle**: a leader change moves no pair to another node (the new leader
//!   holds the assignments and gives every node the rejoin grace to reappear);
//! - **nothing acknowledged is lost**: every token `token create` acknowledged is
//!   there after all the kills, and the history of adds and reads through the CLI is
//!   linearizable (`common::history`);
//! - **nothing runs twice**: every task submitted takes effect exactly once;
//! - **a node that dies with the leader** has its pairs moved within the rejoin grace
//!   plus the node timeout (plus the election).
//!
//! Each scenario prints a summary line (`CHAOS SUMMARY {...}`) and appends it to
//! `target/tmp/chaos-summary.jsonl`; RELIABILITY.md holds the figures of a long run.
//! Profiles as in `chaos.rs`:
//!
//! ```sh
//! cargo test -p drover --test ha_chaos -- --nocapture
//! DROVER_CHAOS_PROFILE=long cargo test -p drover --test ha_chaos -- --nocapture
//! ```

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::history::{Kind, Op, check};
use common::{
    Controller, Killed, Member, cli_at, drover_bin, free_port, leader_via, serial, spawn, start_member, wait_until,
};
use serde_json::{Value, json};

struct Profile {
    name: &'static str,
    leader_kills: usize,
    together_rounds: usize,
}

/// The profile, with `DROVER_CHAOS_LEADER_KILLS=N` overriding its number of leader kills.
fn profile() -> Profile {
    let mut p = match std::env::var("DROVER_CHAOS_PROFILE").as_deref() {
        Ok("long") => Profile { name: "long", leader_kills: 100, together_rounds: 10 },
        _ => Profile { name: "ci", leader_kills: 20, together_rounds: 2 },
    };
    if let Some(n) = std::env::var("DROVER_CHAOS_LEADER_KILLS").ok().and_then(|v| v.parse().ok()) {
        p.leader_kills = n;
    }
    p
}

fn report(scenario: &str, figures: Value) {
    common::chaos_report(scenario, profile().name, figures);
}

/// A group of controllers, its secret, and its first admin token.
struct Group {
    dir: tempfile::TempDir,
    secret: PathBuf,
    peers: String,
    members: Vec<Member>,
    admin: String,
}

impl Group {
    /// Starts `n` members and waits for a leader every member follows.
    fn start(n: u64) -> Group {
        Group::start_with(n, false)
    }

    /// `start`, each member's journal fsyncs stalling while `DIR/slow-m{id}` exists
    /// (`slow_disks`), holding the stall in milliseconds.
    fn start_with(n: u64, slow_disks: bool) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.secret");
        let made = std::process::Command::new(drover_bin()).args(["cluster", "secret"]).output().unwrap();
        assert!(made.status.success());
        std::fs::write(&secret, &made.stdout).unwrap();
        let mut members: Vec<Member> = (1..=n)
            .map(|id| {
                let d = dir.path().join(format!("m{id}"));
                std::fs::create_dir_all(&d).unwrap();
                let mut ctl = Controller::new(&d, &[]);
                if slow_disks {
                    let switch = dir.path().join(format!("slow-m{id}")).display().to_string();
                    ctl.env.push(("DROVER_TEST_SLOW_FSYNC".into(), switch));
                }
                Member { id, raft: free_port(), ctl }
            })
            .collect();
        let peers = members.iter().map(|m| format!("{}=127.0.0.1:{}", m.id, m.raft)).collect::<Vec<_>>().join(",");
        for m in &mut members {
            start_member(m, &peers, &secret);
        }
        let mut g = Group { dir, secret, peers, members, admin: String::new() };
        assert!(g.wait_healthy(Duration::from_secs(40)).is_some(), "no leader with every member caught up");
        let mut admin = None;
        assert!(
            wait_until(Duration::from_secs(20), || {
                admin = g.members.iter().find_map(|m| std::fs::read_to_string(m.ctl.data.join("admin.token")).ok());
                admin.is_some()
            }),
            "no admin.token"
        );
        g.admin = admin.unwrap().trim().to_owned();
        g
    }

    fn at(&self, id: u64) -> usize {
        self.members.iter().position(|m| m.id == id).unwrap()
    }

    /// The leader, once every running member reports it with no lag.
    fn wait_healthy(&self, limit: Duration) -> Option<u64> {
        let running = self.members.iter().filter(|m| m.ctl.proc.is_some()).count();
        let mut leader = None;
        wait_until(limit, || {
            leader = self.members.iter().filter(|m| m.ctl.proc.is_some()).find_map(|m| leader_via(m.ctl.http, running));
            leader.is_some()
        });
        leader
    }

    /// The leader as any member other than `not` reports it, when it is not `not`.
    fn new_leader(&self, not: u64, limit: Duration) -> Option<u64> {
        let mut leader = None;
        wait_until(limit, || {
            leader = self
                .members
                .iter()
                .filter(|m| m.id != not && m.ctl.proc.is_some())
                .find_map(|m| leader_via(m.ctl.http, 0))
                .filter(|&l| l != not);
            leader.is_some()
        });
        leader
    }

    fn grpcs(&self) -> String {
        self.members.iter().map(|m| format!("127.0.0.1:{}", m.ctl.grpc)).collect::<Vec<_>>().join(",")
    }

    /// The CLI against the whole member list (it finds the leader).
    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.grpcs(), &self.admin, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_slice(&self.cli(args).stdout).unwrap_or(Value::Null)
    }

    /// A node given every member's admission address, the list rotated by a hash of
    /// its name (so nodes hold their control channels at different members, the
    /// leader's among them).
    fn node(&self, name: &str, token: &str, extra: &[&str]) -> Killed {
        let mut all: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.ctl.admission)).collect();
        let turn = name.bytes().map(usize::from).sum::<usize>() % all.len();
        all.rotate_left(turn);
        let list = all.join(",");
        let mut args = vec!["node", "--admission", &list, "--token", token, "--name", name];
        args.extend_from_slice(extra);
        spawn(&args, &self.dir.path().join(format!("{name}.log")))
    }

    /// The usual fleet: four nodes with overlapping pairs (every pair known by two or
    /// more) and a worker, all given every member's admission address.
    fn fleet(&self) -> Vec<Killed> {
        let join =
            String::from_utf8(self.cli(&["token", "create", "--role", "join"]).stdout).unwrap().trim().to_owned();
        assert!(join.starts_with("dt1."), "{join:?}");
        [
            ("n1", "EURUSD,GBPUSD,USDJPY"),
            ("n2", "GBPUSD,USDJPY,AUDUSD"),
            ("n3", "AUDUSD,EURUSD,USDCHF"),
            ("n4", "USDCHF,EURUSD"),
        ]
        .iter()
        .map(|(name, pairs)| self.node(name, &join, &["--pairs", pairs]))
        .chain(std::iter::once(self.node("w1", &join, &["--worker", "--cores", "2"])))
        .collect()
    }

    /// Starts the operator thread; its tasks' effects file, its stop switch, and it.
    fn operate(&self) -> (PathBuf, Arc<AtomicBool>, std::thread::JoinHandle<Recorded>) {
        let effects = self.dir.path().join("effects.txt");
        let stop = Arc::new(AtomicBool::new(false));
        let (grpcs, admin, file, flag) = (self.grpcs(), self.admin.clone(), effects.clone(), stop.clone());
        let op = std::thread::spawn(move || operator(grpcs, admin, file, flag));
        (effects, stop, op)
    }

    /// Who streams each pair (`None` when nobody does), read through the leader.
    fn streamers(&self) -> Option<BTreeMap<String, Option<String>>> {
        let prices = self.json(&["prices", "--json"]);
        let rows = prices.as_array()?;
        Some(
            rows.iter()
                .map(|r| (r["pair"].as_str().unwrap_or("").to_owned(), r["streamer"].as_str().map(str::to_owned)))
                .collect(),
        )
    }

    /// Waits until each of `pairs` has a streamer, and returns who streams what.
    fn wait_all_streamed(&self, pairs: &[&str], limit: Duration) -> Option<BTreeMap<String, String>> {
        let mut got = None;
        wait_until(limit, || {
            got = self.streamers().and_then(|s| {
                pairs
                    .iter()
                    .map(|p| s.get(*p).cloned().flatten().map(|n| (p.to_string(), n)))
                    .collect::<Option<BTreeMap<_, _>>>()
            });
            got.is_some()
        });
        got
    }

    /// The newest `upstream_time_ms` over every pair, read through the leader.
    fn newest_price_ms(&self) -> Option<i64> {
        self.json(&["prices", "--json"]).as_array()?.iter().filter_map(|r| r["upstream_time_ms"].as_i64()).max()
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

const PAIRS: [&str; 5] = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF"];

/// What the operator did: its adds and reads (times in µs since `began`) and the tasks
/// it got acknowledged.
struct Recorded {
    history: Vec<Op>,
    tasks: Vec<String>,
    began: Instant,
}

/// The operator: token adds and whole-set reads through the member list, recorded for
/// the checker, and a task now and then; runs until `stop`.
fn operator(g_grpcs: String, admin: String, effects: PathBuf, stop: Arc<AtomicBool>) -> Recorded {
    let began = Instant::now();
    let us = || began.elapsed().as_micros() as u64;
    let mut history = Vec::new();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let element = format!("op-{i}");
        let invoked = us();
        let out = std::process::Command::new(drover_bin())
            .args(["token", "create", "--role", "read", "--description", &element])
            .env("DROVER_CONTROLLER", &g_grpcs)
            .env("DROVER_TOKEN", &admin)
            .env("DROVER_TIMEOUT", "10s")
            .output()
            .unwrap();
        let returned = out.status.success().then(us);
        history.push(Op { invoked, returned, kind: Kind::Add(element) });
        if i.is_multiple_of(3) {
            let invoked = us();
            let out = std::process::Command::new(drover_bin())
                .args(["token", "list", "--json"])
                .env("DROVER_CONTROLLER", &g_grpcs)
                .env("DROVER_TOKEN", &admin)
                .env("DROVER_TIMEOUT", "10s")
                .output()
                .unwrap();
            let returned = us();
            if out.status.success() {
                let seen = operator_tokens(&serde_json::from_slice(&out.stdout).unwrap_or(Value::Null));
                history.push(Op { invoked, returned: Some(returned), kind: Kind::Read(seen) });
            }
        }
        if i.is_multiple_of(7) {
            let script = format!("echo \"$0\" >> {}", effects.display());
            let name = format!("task-{i}");
            let out = std::process::Command::new(drover_bin())
                .args(["task", "run", "--", "/bin/sh", "-c", &script, &name])
                .env("DROVER_CONTROLLER", &g_grpcs)
                .env("DROVER_TOKEN", &admin)
                .env("DROVER_TIMEOUT", "10s")
                .output()
                .unwrap();
            if out.status.success() {
                tasks.push(name);
            }
        }
    }
    Recorded { history, tasks, began }
}

/// The operator's tokens (descriptions `op-N`) in a `token list --json` document.
fn operator_tokens(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["description"].as_str())
                .filter(|d| d.starts_with("op-"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// What an operator's run left, checked once the faults are over.
struct Outcome {
    acknowledged: usize,
    reads: usize,
    /// Acknowledged adds missing from the final read.
    lost: Vec<String>,
    /// The checker's verdict on the history plus the final read.
    linearizable: Result<(), String>,
    tasks: usize,
    not_run: Vec<String>,
    twice: Vec<String>,
    /// The tasks' effects file.
    effects: String,
}

/// Reads the token set once more through the group (after every recorded operation),
/// checks the history with that read appended, and waits (up to a minute) for every
/// acknowledged task's effect, then 2 s more for a duplicate.
fn outcome(g: &Group, r: &Recorded, effects: &Path) -> Outcome {
    let invoked = r.began.elapsed().as_micros() as u64;
    let list = g.json(&["token", "list", "--json"]);
    let returned = r.began.elapsed().as_micros() as u64;
    let seen = operator_tokens(&list);
    let acknowledged: Vec<&String> = r
        .history
        .iter()
        .filter_map(|o| match (&o.kind, o.returned) {
            (Kind::Add(e), Some(_)) => Some(e),
            _ => None,
        })
        .collect();
    let lost = acknowledged.iter().filter(|e| !seen.contains(**e)).map(|e| e.to_string()).collect();
    let mut full = r.history.clone();
    full.push(Op { invoked, returned: Some(returned), kind: Kind::Read(seen) });
    let done = |name: &str, text: &str| text.lines().filter(|l| *l == name).count();
    wait_until(Duration::from_secs(60), || {
        let text = std::fs::read_to_string(effects).unwrap_or_default();
        r.tasks.iter().all(|t| done(t, &text) >= 1)
    });
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(effects).unwrap_or_default();
    Outcome {
        acknowledged: acknowledged.len(),
        reads: r.history.iter().filter(|o| matches!(o.kind, Kind::Read(_))).count(),
        lost,
        linearizable: check(&full),
        tasks: r.tasks.len(),
        not_run: r.tasks.iter().filter(|t| done(t, &text) == 0).cloned().collect(),
        twice: r.tasks.iter().filter(|t| done(t, &text) > 1).cloned().collect(),
        effects: text,
    }
}

impl Outcome {
    /// The figures every scenario reports.
    fn figures(&self) -> Value {
        json!({"acknowledged_adds": self.acknowledged, "reads": self.reads, "lost_acknowledged": self.lost.len(),
            "history_linearizable": self.linearizable.is_ok(), "tasks": self.tasks,
            "tasks_not_run": self.not_run.len(), "tasks_run_twice": self.twice.len()})
    }

    /// Nothing acknowledged lost, the history linearizable, every task once, and at
    /// least `adds` adds and one task acknowledged (so the run checked something).
    fn assert_sound(&self, adds: usize) {
        assert!(self.lost.is_empty(), "acknowledged tokens lost: {:?}", self.lost);
        assert!(self.linearizable.is_ok(), "the history is not linearizable: {:?}", self.linearizable);
        assert!(
            self.not_run.is_empty() && self.twice.is_empty(),
            "tasks not run {:?}, run twice {:?}:\n{}",
            self.not_run,
            self.twice,
            self.effects
        );
        assert!(
            self.acknowledged >= adds && self.tasks > 0,
            "too little load: {} adds, {} tasks",
            self.acknowledged,
            self.tasks
        );
    }
}

/// Merges two JSON objects (the second's keys win).
fn merged(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

#[test]
fn leader_sigkills_under_load_move_no_pair_lose_no_acknowledged_input_and_run_no_task_twice() {
    let _serial = serial();
    let p = profile();
    let mut g = Group::start(3);
    let _nodes = g.fleet();
    assert!(g.wait_all_streamed(&PAIRS, Duration::from_secs(30)).is_some(), "pairs never all streamed");

    let (effects, stop, op) = g.operate();

    let mut to_price = Vec::new();
    let mut to_leader = Vec::new();
    let mut moved_total = 0;
    let mut failures = Vec::new();
    for round in 0..p.leader_kills {
        let Some(leader) = g.wait_healthy(Duration::from_secs(60)) else {
            failures.push(format!("round {round}: the group did not settle with every member caught up"));
            break;
        };
        let Some(before) = g.wait_all_streamed(&PAIRS, Duration::from_secs(30)) else {
            failures.push(format!("round {round}: not every pair streamed before the kill"));
            break;
        };
        let l = g.at(leader);
        let killed_ms = unix_ms();
        let killed = Instant::now();
        g.members[l].ctl.kill();
        let Some(next) = g.new_leader(leader, Duration::from_secs(20)) else {
            failures.push(format!("round {round}: no new leader within 20 s"));
            break;
        };
        to_leader.push(killed.elapsed().as_millis() as u64);
        // The first price produced after the kill that the new leader accepted.
        if wait_until(Duration::from_secs(20), || g.newest_price_ms().is_some_and(|t| t > killed_ms)) {
            to_price.push(killed.elapsed().as_millis() as u64);
        } else {
            failures.push(format!("round {round}: no price accepted within 20 s of the kill"));
        }
        match g.wait_all_streamed(&PAIRS, Duration::from_secs(30)) {
            Some(after) => {
                let moved: Vec<&String> = PAIRS
                    .iter()
                    .map(|p| &before[*p])
                    .zip(PAIRS.iter().map(|p| &after[*p]))
                    .filter(|(a, b)| a != b)
                    .map(|(a, _)| a)
                    .collect();
                if !moved.is_empty() {
                    let changed: Vec<String> = PAIRS
                        .iter()
                        .filter(|p| before[**p] != after[**p])
                        .map(|p| format!("{p}: {} -> {}", before[*p], after[*p]))
                        .collect();
                    failures.push(format!("round {round}: pairs moved on the leader change: {changed:?}"));
                }
                moved_total += moved.len();
            }
            None => failures.push(format!("round {round}: pairs not all streamed after the kill")),
        }
        eprintln!(
            "round {round}: leader {leader} killed; member {next} leads after {} ms, first price after {} ms",
            to_leader.last().unwrap(),
            to_price.last().map_or("-".to_owned(), |v| v.to_string())
        );
        let (peers, secret) = (g.peers.clone(), g.secret.clone());
        start_member(&mut g.members[l], &peers, &secret);
    }
    stop.store(true, Ordering::Relaxed);
    let recorded = op.join().unwrap();
    // Everything acknowledged is there, read once more through the leader.
    g.wait_healthy(Duration::from_secs(60));
    let o = outcome(&g, &recorded, &effects);

    // How the nodes followed: told by the member holding their control channel, or by
    // passing admission again elsewhere (their channel died with the leader).
    let logs: String = ["n1", "n2", "n3", "n4", "w1"]
        .iter()
        .map(|n| std::fs::read_to_string(g.dir.path().join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    let told = logs.lines().filter(|l| l.contains("leadership moved")).count();
    let readmitted = logs.lines().filter(|l| l.contains("disconnected")).count();
    to_price.sort_unstable();
    to_leader.sort_unstable();
    report(
        "leader SIGKILL under load",
        merged(
            o.figures(),
            json!({"kills": to_leader.len(),
            "pairs_moved": moved_total, "nodes_moved_by_auth_ack": told, "nodes_readmitted": readmitted,
            "kill_to_leader_ms": {"p50": percentile(&to_leader, 0.5), "p99": percentile(&to_leader, 0.99), "max": to_leader.last()},
            "kill_to_first_price_ms": {"p50": percentile(&to_price, 0.5), "p99": percentile(&to_price, 0.99), "max": to_price.last()}}),
        ),
    );
    assert!(failures.is_empty(), "{failures:#?}");
    o.assert_sound(p.leader_kills);
}

/// A node and the leader die at the same moment: the new leader cannot have heard of
/// the node's death, so it must judge it lost by the grace it gives every node; its
/// pairs move to the other capable nodes within rejoin grace + node timeout (+ the
/// election), and no other pair moves.
#[test]
fn a_node_that_dies_with_the_leader_has_its_pairs_moved_within_the_grace_and_the_node_timeout() {
    let _serial = serial();
    let p = profile();
    let mut g = Group::start(3);
    let join = String::from_utf8(g.cli(&["token", "create", "--role", "join"]).stdout).unwrap().trim().to_owned();
    let mut nodes: BTreeMap<String, Killed> = [
        ("n1", "EURUSD,GBPUSD,USDJPY"),
        ("n2", "GBPUSD,USDJPY,AUDUSD"),
        ("n3", "AUDUSD,EURUSD,USDCHF"),
        ("n4", "USDCHF,EURUSD,USDJPY,GBPUSD,AUDUSD"),
    ]
    .iter()
    .map(|(name, pairs)| (name.to_string(), g.node(name, &join, &["--pairs", pairs])))
    .collect();
    let mut bounds = Vec::new();
    let mut failures = Vec::new();
    // The rejoin grace (5 s) + the node timeout (3 s) + an election and some slack.
    let bound = Duration::from_secs(5 + 3 + 4);
    for round in 0..p.together_rounds {
        let leader = g.wait_healthy(Duration::from_secs(60)).expect("a settled group");
        let before = g.wait_all_streamed(&PAIRS, Duration::from_secs(30)).expect("every pair streamed");
        let ids = node_ids(&g);
        // The victim: a node that streams something, a different one each round where
        // it can be (the others know every pair between them, so there is always
        // somewhere to move to).
        let Some((victim, victim_id)) = ids
            .iter()
            .cycle()
            .skip(round)
            .take(ids.len())
            .find(|(_, id)| before.values().any(|s| s == id))
            .map(|(n, i)| (n.clone(), i.clone()))
        else {
            failures.push(format!("round {round}: no streaming node to kill"));
            break;
        };
        let theirs: Vec<&str> = PAIRS.iter().copied().filter(|p| before[*p] == victim_id).collect();
        let l = g.at(leader);
        let killed = Instant::now();
        nodes.get_mut(&victim).unwrap().kill();
        g.members[l].ctl.kill();
        let mut after = None;
        let moved = wait_until(Duration::from_secs(30), || {
            after = g.wait_all_streamed(&PAIRS, Duration::from_secs(1));
            after.as_ref().is_some_and(|a| theirs.iter().all(|p| a[*p] != victim_id))
        });
        let took = killed.elapsed();
        bounds.push(took.as_millis() as u64);
        eprintln!("round {round}: {victim} ({theirs:?}) and leader {leader} killed; its pairs moved after {took:?}");
        if !moved || took > bound {
            failures.push(format!(
                "round {round}: {victim}'s pairs {theirs:?} moved: {moved}, after {took:?} (bound {bound:?})"
            ));
        }
        if let Some(a) = &after {
            let others: Vec<&&str> = PAIRS.iter().filter(|p| !theirs.contains(p) && a[**p] != before[**p]).collect();
            if !others.is_empty() {
                failures.push(format!("round {round}: pairs of live nodes moved too: {others:?}"));
            }
        }
        // The node and the member come back for the next round.
        nodes.insert(victim.clone(), g.node(&victim, &join, &["--pairs", pairs_of(&victim)]));
        let (peers, secret) = (g.peers.clone(), g.secret.clone());
        start_member(&mut g.members[l], &peers, &secret);
    }
    bounds.sort_unstable();
    report(
        "node and leader die together",
        json!({"rounds": bounds.len(), "bound_ms": bound.as_millis() as u64,
            "moved_after_ms": {"p50": percentile(&bounds, 0.5), "max": bounds.last()}}),
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

fn pairs_of(name: &str) -> &'static str {
    match name {
        "n1" => "EURUSD,GBPUSD,USDJPY",
        "n2" => "GBPUSD,USDJPY,AUDUSD",
        "n3" => "AUDUSD,EURUSD,USDCHF",
        _ => "USDCHF,EURUSD,USDJPY,GBPUSD,AUDUSD",
    }
}

/// Node names and ids, from `drover nodes --json`.
fn node_ids(g: &Group) -> Vec<(String, String)> {
    g.json(&["nodes", "--json"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["state"] != "gone")
                .filter_map(|n| Some((n["name"].as_str()?.to_owned(), n["id"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

mod checker {
    use super::*;

    fn add(invoked: u64, returned: Option<u64>, e: &str) -> Op {
        Op { invoked, returned, kind: Kind::Add(e.into()) }
    }

    fn read(invoked: u64, returned: u64, seen: &[&str]) -> Op {
        Op { invoked, returned: Some(returned), kind: Kind::Read(seen.iter().map(|s| s.to_string()).collect()) }
    }

    #[test]
    fn the_checker_accepts_linearizable_histories_and_rejects_each_kind_of_violation() {
        // Concurrent add and read may go either way; an unacknowledged add may appear.
        let ok = [
            add(0, Some(10), "a"),
            read(5, 8, &[]),
            read(11, 20, &["a"]),
            add(12, None, "b"),
            read(21, 30, &["a", "b"]),
        ];
        assert!(check(&ok).is_ok(), "{:?}", check(&ok));
        let lost = [add(0, Some(10), "a"), read(11, 20, &[])];
        assert!(check(&lost).unwrap_err().starts_with("rule 1"));
        let future = [read(0, 5, &["a"]), add(6, Some(10), "a")];
        assert!(check(&future).unwrap_err().starts_with("rule 2"));
        let nowhere = [read(0, 5, &["z"])];
        assert!(check(&nowhere).unwrap_err().starts_with("rule 2"));
        let back = [add(0, None, "a"), read(1, 5, &["a"]), read(6, 9, &[])];
        assert!(check(&back).unwrap_err().starts_with("rule 3"));
        let unordered = [add(0, None, "a"), add(0, None, "b"), read(1, 10, &["a"]), read(2, 9, &["b"])];
        assert!(check(&unordered).unwrap_err().starts_with("rule 4"));
    }
}

/// Any member admits, so a follower may hold a node's control channel: an eviction
/// (decided by the leader) reaches the node through that follower, and the node stops
/// (exit 3) instead of re-admitting.
#[test]
fn a_node_admitted_by_a_follower_follows_the_leader_and_its_eviction_reaches_it_there() {
    let _serial = serial();
    let g = Group::start(3);
    let leader = g.wait_healthy(Duration::from_secs(30)).expect("a leader");
    let follower = g.members.iter().find(|m| m.id != leader).unwrap();
    let join = String::from_utf8(g.cli(&["token", "create", "--role", "join"]).stdout).unwrap().trim().to_owned();
    let adm = format!("127.0.0.1:{}", follower.ctl.admission);
    let log = g.dir.path().join("nf.log");
    let mut node = spawn(&["node", "--admission", &adm, "--token", &join, "--name", "nf", "--pairs", "EURUSD"], &log);
    assert!(
        g.wait_all_streamed(&["EURUSD"], Duration::from_secs(20)).is_some(),
        "a node admitted by a follower never streamed on the leader:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let out = g.cli(&["evict", "nf", "--reason", "decommissioned"]);
    assert!(out.status.success(), "{}", common::text(&out));
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = node.0.try_wait().unwrap();
            status.is_some()
        }),
        "the evicted node kept running:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(status.unwrap().code(), Some(3), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}

/// `GET path` on `port` from inside network namespace `ns` (bash's /dev/tcp): the
/// status line, or "" when nothing answered.
fn ns_http_status(ns: &str, port: u16, path: &str) -> String {
    let script =
        format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3");
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "2", "bash", "-c", &script])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The leader is cut off by a network partition (it runs in its own network
/// namespace, whose link goes down): it stops serving within the lease, the majority
/// elects a new leader, the nodes (all on the majority's side) follow it with no pair
/// moved, a write sent to the isolated leader is never acknowledged, and after the heal
/// the old leader rejoins as a follower and what it took alone is gone.
#[test]
fn an_isolated_leader_stops_serving_the_majority_takes_over_and_the_fleet_follows_it() {
    let _serial = serial();
    let ns = common::netns::Netns::required(7);
    let (host, inside) = (ns.host_ip.clone(), ns.ns_ip());
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cluster.secret");
    let made = std::process::Command::new(drover_bin()).args(["cluster", "secret"]).output().unwrap();
    std::fs::write(&secret, &made.stdout).unwrap();
    // Member 1 inside the namespace, members 2 and 3 on the host; every port listens on
    // all addresses and is advertised at the address the others reach it by.
    struct M {
        id: u64,
        ip: String,
        grpc: u16,
        admission: u16,
        http: u16,
        raft: u16,
        data: PathBuf,
        proc: Option<Killed>,
    }
    let mut ms: Vec<M> = (1..=3u64)
        .map(|id| M {
            id,
            ip: if id == 1 { inside.clone() } else { host.clone() },
            grpc: free_port(),
            admission: free_port(),
            http: free_port(),
            raft: free_port(),
            data: dir.path().join(format!("m{id}")),
            proc: None,
        })
        .collect();
    let peers = ms.iter().map(|m| format!("{}={}:{}", m.id, m.ip, m.raft)).collect::<Vec<_>>().join(",");
    let launch = |m: &M| -> Killed {
        let any = |p: u16| format!("0.0.0.0:{p}");
        // The Raft port must be the address the peers list names (a local address
        // stays reachable on the host while the link is down).
        let (g, a, h, r) = (any(m.grpc), any(m.admission), any(m.http), format!("{}:{}", m.ip, m.raft));
        let (upstream, id, data) =
            (format!("{}:{}", m.ip, m.grpc), m.id.to_string(), m.data.to_str().unwrap().to_owned());
        let mut cmd = if m.id == 1 {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_drover")]);
            c
        } else {
            std::process::Command::new(drover_bin())
        };
        cmd.args([
            "controller",
            "--listen",
            &g,
            "--admission",
            &a,
            "--http",
            &h,
            "--raft",
            &r,
            "--upstream",
            &upstream,
        ]);
        cmd.args(["--data-dir", &data, "--member", &id, "--peers", &peers, "--cluster-secret-file"]);
        cmd.arg(&secret).args(["--node-timeout", "3s"]);
        let log = std::fs::File::create(dir.path().join(format!("m{}.log", m.id))).unwrap();
        Killed(cmd.stdout(std::process::Stdio::null()).stderr(log).spawn().expect("spawn a member"))
    };
    for m in &mut ms {
        m.proc = Some(launch(m));
    }
    let host_http = |m: &M| m.http;
    // The majority's view, through member 2's HTTP port (reachable on loopback).
    let logs = || {
        (1..=3)
            .map(|i| {
                format!(
                    "--- m{i}:\n{}",
                    std::fs::read_to_string(dir.path().join(format!("m{i}.log"))).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(
        wait_until(Duration::from_secs(40), || leader_via(host_http(&ms[1]), 3).is_some()),
        "no settled group: {:?}\n{}",
        common::status(ms[1].http),
        logs()
    );
    let mut admin = None;
    wait_until(Duration::from_secs(20), || {
        admin = ms.iter().find_map(|m| std::fs::read_to_string(m.data.join("admin.token")).ok());
        admin.is_some()
    });
    let admin = admin.expect("an admin token").trim().to_owned();
    let grpcs = ms.iter().map(|m| format!("{}:{}", m.ip, m.grpc)).collect::<Vec<_>>().join(",");
    let cli = |args: &[&str]| cli_at(&grpcs, &admin, args);
    // Member 1 leads (handed leadership if it does not already).
    let leader = leader_via(ms[1].http, 3).unwrap();
    if leader != 1 {
        let http = format!("{}:{}", if leader == 1 { &inside } else { &host }, ms[(leader - 1) as usize].http);
        let out = std::process::Command::new(drover_bin())
            .args(["cluster", "transfer-leader", "--http", &http, "--token", &admin, "1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::text(&out));
    }
    assert!(wait_until(Duration::from_secs(20), || leader_via(ms[1].http, 3) == Some(1)), "member 1 never led");
    assert!(wait_until(Duration::from_secs(10), || ns_http_status(&ns.name, ms[0].http, "/readyz").contains("200")));

    // Nodes on the host, each given every member's admission address, some with the
    // isolated member's first (so it holds their control channels).
    let join = String::from_utf8(cli(&["token", "create", "--role", "join"]).stdout).unwrap().trim().to_owned();
    let adm: Vec<String> = ms.iter().map(|m| format!("{}:{}", m.ip, m.admission)).collect();
    let specs = [
        ("n1", "EURUSD,GBPUSD,USDJPY"),
        ("n2", "GBPUSD,USDJPY,AUDUSD"),
        ("n3", "AUDUSD,EURUSD,USDCHF"),
        ("n4", "USDCHF,EURUSD"),
    ];
    let _nodes: Vec<Killed> = specs
        .iter()
        .enumerate()
        .map(|(i, (name, pairs))| {
            let mut list = adm.clone();
            list.rotate_left(i % 3);
            let list = list.join(",");
            spawn(
                &["node", "--admission", &list, "--token", &join, "--name", name, "--pairs", pairs],
                &dir.path().join(format!("{name}.log")),
            )
        })
        .collect();
    let streamers = || -> Option<BTreeMap<String, String>> {
        let v: Value = serde_json::from_slice(&cli(&["prices", "--json"]).stdout).ok()?;
        PAIRS
            .iter()
            .map(|p| {
                v.as_array()?
                    .iter()
                    .find(|r| r["pair"] == *p)
                    .and_then(|r| r["streamer"].as_str())
                    .map(|s| (p.to_string(), s.to_owned()))
            })
            .collect()
    };
    let newest = || -> i64 {
        serde_json::from_slice::<Value>(&cli(&["prices", "--json"]).stdout)
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| a.iter().filter_map(|r| r["upstream_time_ms"].as_i64()).max().unwrap_or(0))
            })
            .unwrap_or(0)
    };
    let mut before = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            before = streamers();
            before.is_some()
        }),
        "pairs never all streamed"
    );
    let before = before.unwrap();

    let began = Instant::now();
    // The cut. With the link down the host would route the namespace's addresses to
    // its default gateway; a blackhole route drops them instead, as a partition does.
    let subnet = format!("{}.0/24", inside.rsplit_once('.').unwrap().0);
    ns.cut().expect("cut the link");
    common::netns::ip(&["route", "add", "blackhole", &subnet]).expect("blackhole the namespace's subnet");
    let cut = Instant::now();
    let cut_ms = unix_ms();
    // A write sent to the isolated leader from its own side is never acknowledged.
    let write_invoked = began.elapsed().as_micros() as u64;
    let isolated_write = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_drover"),
            "token",
            "create",
            "--role",
            "read",
            "--description",
            "isolated",
        ])
        .env("DROVER_CONTROLLER", format!("127.0.0.1:{}", ms[0].grpc))
        .env("DROVER_TOKEN", &admin)
        .env("DROVER_TIMEOUT", "3s")
        .spawn()
        .unwrap();
    let stopped_serving =
        wait_until(Duration::from_secs(10), || ns_http_status(&ns.name, ms[0].http, "/readyz").contains("503"));
    let stop_ms = cut.elapsed().as_millis() as u64;
    let mut next = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            next = leader_via(ms[1].http, 0).filter(|&l| l != 1);
            next.is_some()
        }),
        "the majority elected no leader"
    );
    let elected_ms = cut.elapsed().as_millis() as u64;
    let priced = wait_until(Duration::from_secs(20), || newest() > cut_ms);
    let price_ms = cut.elapsed().as_millis() as u64;
    let mut after = None;
    let all_back = wait_until(Duration::from_secs(20), || {
        after = streamers();
        after.is_some()
    });
    let moved: Vec<String> = match &after {
        Some(a) => PAIRS
            .iter()
            .filter(|p| a[**p] != before[**p])
            .map(|p| format!("{p}: {} -> {}", before[*p], a[*p]))
            .collect(),
        None => vec!["not every pair streamed after the cut".into()],
    };
    let write = isolated_write.wait_with_output().unwrap();
    let write_returned = write.status.success().then(|| began.elapsed().as_micros() as u64);

    // The heal: member 1 rejoins as a follower of the new leader.
    common::netns::ip(&["route", "del", "blackhole", &subnet]).expect("remove the blackhole");
    ns.heal().expect("heal the link");
    let healed = Instant::now();
    let rejoined = wait_until(Duration::from_secs(30), || leader_via(ms[1].http, 3) == next);
    let rejoin_ms = healed.elapsed().as_millis() as u64;
    let read_invoked = began.elapsed().as_micros() as u64;
    let tokens = String::from_utf8_lossy(&cli(&["token", "list", "--json"]).stdout).into_owned();
    let read_returned = began.elapsed().as_micros() as u64;
    // The write and the read after the heal, as the history checker sees them: an
    // acknowledged write missing from a later read is a lost write.
    let listed: BTreeSet<String> = serde_json::from_str::<Value>(&tokens)
        .ok()
        .and_then(|v| {
            v.as_array().map(|a| a.iter().filter_map(|t| t["description"].as_str().map(str::to_owned)).collect())
        })
        .unwrap_or_default();
    let history = [
        Op { invoked: write_invoked, returned: write_returned, kind: Kind::Add("isolated".into()) },
        Op {
            invoked: read_invoked,
            returned: Some(read_returned),
            kind: Kind::Read(listed.into_iter().filter(|d| d == "isolated").collect()),
        },
    ];
    let linearizable = check(&history);
    report(
        "leader isolated by a partition",
        json!({"stopped_serving_ms": stop_ms, "majority_leader_ms": elected_ms, "first_price_ms": price_ms,
            "pairs_moved": moved.len(), "isolated_write_acknowledged": write.status.success(),
            "rejoined_as_follower_ms": rejoin_ms, "history_linearizable": linearizable.is_ok()}),
    );
    assert!(linearizable.is_ok(), "the history is not linearizable: {linearizable:?}");
    assert!(stopped_serving, "the isolated leader kept serving");
    assert!(stop_ms < 3_000, "the isolated leader served {stop_ms} ms into the partition (lease: about 1 s)");
    let node_logs = || {
        ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}:\n{}",
                    std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(priced, "no price accepted by the majority's leader:\n{}\n{}", node_logs(), logs());
    assert!(all_back && moved.is_empty(), "pairs moved on the majority's side: {moved:?}");
    assert!(!write.status.success(), "a write to the isolated leader was acknowledged");
    assert!(rejoined, "the old leader did not rejoin as a follower: {:?}", common::status(ms[1].http));
    assert!(!tokens.contains("\"isolated\""), "what the isolated leader took alone survived: {tokens}");
    drop(ms);
}

/// The leader's disk turns slow (each journal fsync stalls 1.5 s, for 8 s) while the
/// fleet streams and the operator works: no election storm (at most one leader
/// change), nothing acknowledged lost, the history linearizable, no pair moved.
#[test]
fn a_slow_disk_on_the_leader_causes_no_election_storm_and_loses_nothing() {
    let _serial = serial();
    let g = Group::start_with(3, true);
    let _nodes = g.fleet();
    let before = g.wait_all_streamed(&PAIRS, Duration::from_secs(30)).expect("every pair streamed");
    let leader = g.wait_healthy(Duration::from_secs(30)).expect("a settled group");
    let term = |http: u16| common::status(http).and_then(|s| s["term"].as_u64());
    let term_before = term(g.members[g.at(leader)].ctl.http).unwrap_or(0);
    let (effects, stop, op) = g.operate();
    std::thread::sleep(Duration::from_secs(1));
    let switch = g.dir.path().join(format!("slow-m{leader}"));
    std::fs::write(&switch, "1500").unwrap();
    // Who leads, sampled through the slow period and a little after.
    let mut leaders: Vec<(u64, u64)> = Vec::new();
    let slow = Instant::now();
    while slow.elapsed() < Duration::from_secs(10) {
        if slow.elapsed() >= Duration::from_secs(8) && switch.exists() {
            std::fs::remove_file(&switch).unwrap();
        }
        let seen = g
            .members
            .iter()
            .find_map(|m| common::status(m.ctl.http).and_then(|s| Some((s["leader"].as_u64()?, s["term"].as_u64()?))));
        if let Some(l) = seen
            && leaders.last() != Some(&l)
        {
            leaders.push(l);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&switch);
    stop.store(true, Ordering::Relaxed);
    let recorded = op.join().unwrap();
    let settled = g.wait_healthy(Duration::from_secs(30));
    let term_after = settled.and_then(|l| term(g.members[g.at(l)].ctl.http)).unwrap_or(0);
    let distinct_leaders: BTreeSet<(u64, u64)> = leaders.iter().copied().collect();
    let changes = distinct_leaders.iter().filter(|(l, t)| (*l, *t) != (leader, term_before)).count();
    let o = outcome(&g, &recorded, &effects);
    let after = g.wait_all_streamed(&PAIRS, Duration::from_secs(30));
    let moved = after.as_ref().map_or(PAIRS.len(), |a| PAIRS.iter().filter(|p| a[**p] != before[**p]).count());
    report(
        "slow disk on the leader",
        merged(
            o.figures(),
            json!({"stall_ms_per_fsync": 1500, "slow_for_ms": 8000, "leaders_seen": leaders,
            "leader_changes": changes, "terms": [term_before, term_after], "pairs_moved": moved}),
        ),
    );
    if std::env::var_os("DROVER_CHAOS_DUMP").is_some() {
        for m in &g.members {
            let log = std::fs::read_to_string(&m.ctl.log).unwrap_or_default();
            eprintln!("--- member {}:", m.id);
            for l in log.lines().filter(|l| l.contains("WARN") || l.contains("leader") || l.contains("ERROR")) {
                eprintln!("{l}");
            }
        }
    }
    assert!(changes <= 1, "an election storm: {leaders:?}");
    o.assert_sound(1);
    if changes == 0 {
        assert_eq!(moved, 0, "pairs moved without a leader change: {before:?} -> {after:?}");
    }
}

/// Membership changes under faults: the group grows from three to five while the
/// fleet streams and the operator works, its leader is SIGKILLed, and it shrinks back
/// to three (the killed member and one more removed): nothing acknowledged is lost,
/// the history is linearizable, no pair moves on the leader change, every task takes
/// effect once.
#[test]
fn membership_three_to_five_to_three_with_the_leader_killed_loses_nothing() {
    let _serial = serial();
    let mut g = Group::start(3);
    let _nodes = g.fleet();
    g.wait_all_streamed(&PAIRS, Duration::from_secs(30)).expect("every pair streamed");
    let (effects, stop, op) = g.operate();
    let cluster = |g: &Group, args: &[&str]| {
        let mut leader = None;
        wait_until(Duration::from_secs(30), || {
            leader = g.members.iter().filter(|m| m.ctl.proc.is_some()).find_map(|m| leader_via(m.ctl.http, 0));
            leader.is_some()
        });
        let leader = leader.expect("a leader");
        let http = format!("127.0.0.1:{}", g.members[g.at(leader)].ctl.http);
        let mut all = vec!["cluster"];
        all.extend_from_slice(args);
        all.extend(["--http", &http, "--token", &g.admin]);
        std::process::Command::new(drover_bin()).args(&all).output().unwrap()
    };
    // 3 -> 5.
    for id in [4u64, 5] {
        let d = g.dir.path().join(format!("m{id}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut m = Member { id, raft: free_port(), ctl: Controller::new(&d, &[]) };
        start_member(&mut m, "", &g.secret);
        let raft = format!("127.0.0.1:{}", m.raft);
        g.members.push(m);
        let added = cluster(&g, &["add", &id.to_string(), &raft]);
        assert!(added.status.success(), "add {id}: {}", common::text(&added));
        // The load runs on between the changes.
        std::thread::sleep(Duration::from_secs(2));
    }
    let leader = g.wait_healthy(Duration::from_secs(60)).expect("five caught-up members");
    // The leader dies.
    let before = g.wait_all_streamed(&PAIRS, Duration::from_secs(30)).expect("every pair streamed");
    let l = g.at(leader);
    g.members[l].ctl.kill();
    let next = g.new_leader(leader, Duration::from_secs(20)).expect("a new leader among the four");
    let after = g.wait_all_streamed(&PAIRS, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let moved: Vec<&&str> = PAIRS.iter().filter(|p| after.as_ref().is_none_or(|a| a[**p] != before[**p])).collect();
    // 5 -> 3: the dead member and one more that does not lead.
    let other = g.members.iter().map(|m| m.id).find(|&id| id != leader && id != next).unwrap();
    for id in [leader, other] {
        let removed = cluster(&g, &["remove", &id.to_string()]);
        assert!(removed.status.success(), "remove {id}: {}", common::text(&removed));
        let at = g.at(id);
        g.members[at].ctl.kill();
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    let recorded = op.join().unwrap();
    let settled = g.wait_healthy(Duration::from_secs(30)).expect("a settled group of three");
    let s = common::status(g.members[g.at(settled)].ctl.http).unwrap();
    let ids: Vec<u64> = s["members"].as_array().unwrap().iter().filter_map(|m| m["id"].as_u64()).collect();
    let o = outcome(&g, &recorded, &effects);
    report(
        "membership 3 -> 5 -> 3 with a leader SIGKILL",
        merged(o.figures(), json!({"members_after": ids, "pairs_moved": moved.len()})),
    );
    assert_eq!(ids.len(), 3, "three members again: {s}");
    assert!(!ids.contains(&leader) && !ids.contains(&other), "{s}");
    assert!(moved.is_empty(), "pairs moved on the leader change: {moved:?}");
    o.assert_sound(20);
}

/// `drover bench fleet --cluster 3` at a small size: simulated nodes spread over the
/// members follow the leader through its SIGKILL; every one streams to the new leader
/// and no pair moves (the tool exits 1 otherwise).
#[test]
fn the_fleet_bench_follows_a_killed_leader_with_every_node_and_no_pair_moved() {
    let _serial = serial();
    let out = std::process::Command::new(drover_bin())
        .args(["bench", "fleet", "--nodes", "90", "--pairs", "30", "--cluster", "3"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_owned();
    report("fleet bench across a leader SIGKILL", json!({"output": table}));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("90 of 90 nodes streaming to it") && text.contains("| 0 of 30 pairs moved"), "{text}");
}
