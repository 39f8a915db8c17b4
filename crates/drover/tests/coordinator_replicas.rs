//! Coordinator replicas with real processes: three `drover coordinator --replica K`
//! per instance, each with its own application (`drover coordinator example ...`),
//! primaries and their applications SIGKILLed while they work. An application whose
//! session ends (its replica was killed, or stopped being primary) is restarted, as a
//! supervisor would, and comes back as a secondary.
//!
//! - The counter counts to its target by calling itself once per step: a lost call
//!   stops it short, a repeated one makes it overshoot (every application, primary or
//!   secondary, prints each count it reaches). At the end every replica holds the same
//!   records (count and digest, `drover coordinator status`).
//! - A client and a server instance, three replicas each, exchange acknowledged calls
//!   while primaries on both sides are killed: every add and every ack exactly once.
//! - An upgrade by `transfer-primary` to an upgrading secondary under load: the
//!   upgrade hook runs once, the count is exact, the instance is at the new version.
//! - Membership under load: a fourth replica added (its application follows as a
//!   secondary), then removed: it ends its application's session, stops, and refuses
//!   to run again; the counter goes on.
//! - Mutual TLS on the replicas' Raft port: the counter counts exactly, and an admin
//!   command with a certificate from another CA, or none, is refused.
//! - A partition: the primary and its application in their own network namespace,
//!   cut off while counting; the majority takes over and counts on, and after the
//!   heal the old primary rejoins as a secondary; then that secondary is cut off and
//!   healed while the count goes on; the count is exact and every replica holds the
//!   same records (anything the isolated primary took alone would differ).
//!
//! Profiles: the CI profile counts to 20,000 with 10 kills (the figure) and
//! exchanges 2,500 calls with 8 kills; `DROVER_CHAOS_PROFILE=long` counts to 50,000
//! with 25 kills and exchanges 10,000 calls with 8 kills.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Killed, chaos_report, free_port, serial, wait_until};

fn long() -> bool {
    std::env::var("DROVER_CHAOS_PROFILE").is_ok_and(|p| p == "long")
}

fn profile() -> &'static str {
    if long() { "long" } else { "ci" }
}

/// One replica: its ports, its process, its application.
struct Replica {
    id: u64,
    /// The address its Raft port listens on and its peers reach it by.
    ip: String,
    /// The network namespace it runs in, with its application (None: the host's).
    ns: Option<String>,
    raft: u16,
    receive: u16,
    send: u16,
    upgrade: Option<u64>,
    process: Option<Killed>,
    app: Option<Killed>,
}

impl Replica {
    /// Replica `id` at `ip` (in namespace `ns`), on free ports, not started.
    fn new(id: u64, ip: String, ns: Option<String>) -> Replica {
        Replica {
            id,
            ip,
            ns,
            raft: free_port(),
            receive: free_port(),
            send: free_port(),
            upgrade: None,
            process: None,
            app: None,
        }
    }
}

/// The replicas of one instance.
struct Instance {
    dir: PathBuf,
    name: String,
    app: &'static str,
    /// Arguments of the application after its ports (`--target N`).
    app_args: Vec<String>,
    replicas: Vec<Replica>,
    rounds: usize,
    /// `--cluster-ca --tls-cert --tls-key` for the replicas and the admin commands.
    tls: Vec<String>,
}

/// `drover`, in network namespace `ns` when given (`ip netns exec` execs it: the
/// child's pid is drover's).
fn command(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_drover")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_drover")),
    }
}

fn secret(dir: &Path) -> PathBuf {
    let path = dir.join("secret");
    if !path.exists() {
        let out = Command::new(env!("CARGO_BIN_EXE_drover")).args(["cluster", "secret"]).output().unwrap();
        assert!(out.status.success());
        std::fs::write(&path, out.stdout).unwrap();
    }
    path
}

impl Instance {
    fn new(dir: &Path, name: &str, app: &'static str, app_args: &[&str]) -> Instance {
        Instance::new_with_tls(dir, name, app, app_args, Vec::new())
    }

    fn new_with_tls(dir: &Path, name: &str, app: &'static str, app_args: &[&str], tls: Vec<String>) -> Instance {
        Instance::new_placed(dir, name, app, app_args, tls, |_| ("127.0.0.1".into(), None))
    }

    /// Replicas placed by `place(id)`: (the address, the network namespace).
    fn new_placed(
        dir: &Path,
        name: &str,
        app: &'static str,
        app_args: &[&str],
        tls: Vec<String>,
        place: impl Fn(u64) -> (String, Option<String>),
    ) -> Instance {
        secret(dir);
        let replicas = (1..=3)
            .map(|id| {
                let (ip, ns) = place(id);
                Replica::new(id, ip, ns)
            })
            .collect();
        let mut i = Instance {
            dir: dir.to_owned(),
            name: name.to_owned(),
            app,
            app_args: app_args.iter().map(|s| s.to_string()).collect(),
            replicas,
            rounds: 0,
            tls,
        };
        for k in 0..3 {
            i.start(k);
        }
        for k in 0..3 {
            i.start_app(k);
        }
        i
    }

    /// The founding replicas (1 to 3): a replica added later is not in its own list.
    fn peers(&self) -> String {
        self.replicas.iter().take(3).map(|r| format!("{}={}:{}", r.id, r.ip, r.raft)).collect::<Vec<_>>().join(",")
    }

    fn log(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{}-replica-{}.log", self.name, self.replicas[k].id))
    }

    fn start(&mut self, k: usize) {
        let peers = self.peers();
        let r = &self.replicas[k];
        let err = std::fs::OpenOptions::new().create(true).append(true).open(self.log(k)).unwrap();
        let (id, raft, rp, sp) =
            (r.id.to_string(), format!("{}:{}", r.ip, r.raft), r.receive.to_string(), r.send.to_string());
        let logs = self.dir.join("logs");
        let sec = secret(&self.dir);
        let mut args = vec![
            "coordinator",
            "--instance",
            &self.name,
            "--log-dir",
            logs.to_str().unwrap(),
            "--replica",
            &id,
            "--raft",
            &raft,
            "--peers",
            &peers,
            "--cluster-secret-file",
            sec.to_str().unwrap(),
            "--receive-port",
            &rp,
            "--send-port",
            &sp,
        ];
        let v = r.upgrade.map(|v| v.to_string());
        if let Some(v) = &v {
            args.extend(["--upgrade-version", v]);
        }
        args.extend(self.tls.iter().map(String::as_str));
        let child = command(r.ns.as_deref()).args(args).stdout(Stdio::null()).stderr(err).spawn().unwrap();
        self.replicas[k].process = Some(Killed(child));
    }

    fn start_app(&mut self, k: usize) {
        self.rounds += 1;
        let r = &self.replicas[k];
        let out =
            std::fs::File::create(self.dir.join(format!("{}-app-{}-{}.out", self.name, r.id, self.rounds))).unwrap();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}-apps.err", self.name)))
            .unwrap();
        let (rp, sp) = (r.receive.to_string(), r.send.to_string());
        let mut args = vec!["coordinator", "example", self.app, "--receive-port", &rp, "--send-port", &sp];
        args.extend(self.app_args.iter().map(String::as_str));
        let child = command(r.ns.as_deref()).args(args).stdout(out).stderr(err).spawn().unwrap();
        self.replicas[k].app = Some(Killed(child));
    }

    /// Restarts applications whose sessions ended (a supervisor's job).
    fn tend(&mut self) {
        for k in 0..self.replicas.len() {
            let exited = self.replicas[k].app.as_mut().is_none_or(|a| a.0.try_wait().ok().flatten().is_some());
            let running = self.replicas[k].process.as_mut().is_some_and(|p| p.0.try_wait().ok().flatten().is_none());
            if exited && running {
                self.start_app(k);
            }
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let sec = secret(&self.dir);
        let out = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["coordinator", "status", "--json", "--instance", &self.name, "--log-dir"])
            .arg(self.dir.join("logs"))
            .arg("--cluster-secret-file")
            .arg(sec)
            .args(&self.tls)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The primary's index in `replicas`, once one leads and its application is primary.
    fn primary(&self) -> Option<usize> {
        let s = self.status()?;
        let p = s["primary"].as_u64()?;
        self.replicas.iter().position(|r| r.id == p)
    }

    fn kill_replica(&mut self, k: usize) {
        if let Some(mut p) = self.replicas[k].process.take() {
            p.kill();
        }
        if let Some(mut a) = self.replicas[k].app.take() {
            a.kill();
        }
    }

    fn kill_app(&mut self, k: usize) {
        if let Some(mut a) = self.replicas[k].app.take() {
            a.kill();
        }
    }

    /// Numbers after `prefix` in every output of this instance's applications.
    fn numbers(&self, prefix: &str) -> Vec<u64> {
        common::numbers(&self.dir, &format!("{}-app-", self.name), prefix)
    }

    /// Every replica answers with the same record count and digest.
    fn replicas_identical(&self) -> Option<(i64, u64)> {
        let s = self.status()?;
        let infos: Vec<&serde_json::Value> = s["replicas"].as_array()?.iter().map(|r| &r["info"]).collect();
        if infos.len() != 3 || infos.iter().any(|i| i.is_null()) {
            return None;
        }
        let first = (infos[0]["records"].as_i64()?, infos[0]["digest"].as_u64()?);
        infos
            .iter()
            .all(|i| (i["records"].as_i64(), i["digest"].as_u64()) == (Some(first.0), Some(first.1)))
            .then_some(first)
    }

    /// Tends the applications until the counter reports `target` done (or overshoots)
    /// or `secs` pass: whether it finished, and the highest count any application saw.
    fn count_to(&mut self, target: u64, secs: u64) -> (bool, u64) {
        let finished = wait_until(Duration::from_secs(secs), || {
            self.tend();
            self.numbers("done ").contains(&target) || self.numbers("count ").iter().any(|c| *c > target)
        });
        (finished, self.numbers("count ").into_iter().max().unwrap_or(0))
    }

    /// Tends the applications until every replica reports the same records (within
    /// 30 s): their count and digest.
    fn identical(&mut self) -> Option<(i64, u64)> {
        let mut same = None;
        wait_until(Duration::from_secs(30), || {
            self.tend();
            same = self.replicas_identical();
            same.is_some()
        });
        same
    }

    /// Lines of every replica's log containing `what`.
    fn log_lines(&self, what: &str) -> usize {
        (0..3)
            .map(|k| {
                std::fs::read_to_string(self.log(k)).unwrap_or_default().lines().filter(|l| l.contains(what)).count()
            })
            .sum()
    }

    fn tail(&self) -> String {
        let mut out = String::new();
        for k in 0..3 {
            let t = std::fs::read_to_string(self.log(k)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().rev().take(10).collect();
            out += &format!("--- replica {}:\n{}\n", k + 1, lines.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        out
    }
}

/// A small xorshift: the kill schedule is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Waits `ms` while tending the instances' applications.
fn tend_for(instances: &mut [&mut Instance], ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        for i in instances.iter_mut() {
            i.tend();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the primary replica (`coordinator`) or only its application; restarts it.
/// Returns what was killed, or `None` when no primary was found in time.
fn kill_primary(i: &mut Instance, coordinator: bool) -> Option<&'static str> {
    let mut p = None;
    wait_until(Duration::from_secs(10), || {
        i.tend();
        p = i.primary();
        p.is_some()
    });
    let p = p?;
    if coordinator {
        i.kill_replica(p);
        i.start(p);
        Some("coordinator")
    } else {
        i.kill_app(p);
        Some("application")
    }
}

#[test]
fn the_counter_on_three_replicas_counts_exactly_across_sigkills_of_primaries_and_their_applications() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let target: u64 = if long() { 50_000 } else { 20_000 };
    let t = target.to_string();
    let mut inst = Instance::new(dir.path(), "counter", "counter", &["--target", &t]);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut coordinator_kills, mut app_kills, mut mid) = (0, 0, 0);
    let started = Instant::now();
    // Let the count start.
    assert!(
        wait_until(Duration::from_secs(30), || {
            inst.tend();
            inst.numbers("count ").into_iter().max().unwrap_or(0) > 0
        }),
        "the counter never started\n{}",
        inst.tail()
    );
    let kills = if long() { 25 } else { 10 };
    let spacing = 2_500;
    for _ in 0..kills {
        tend_for(&mut [&mut inst], spacing / 2 + rng.next() % spacing);
        if inst.numbers("count ").into_iter().max().unwrap_or(0) < target {
            mid += 1;
        }
        match kill_primary(&mut inst, !rng.next().is_multiple_of(3)) {
            Some("coordinator") => coordinator_kills += 1,
            Some(_) => app_kills += 1,
            None => panic!("no primary\n{}", inst.tail()),
        }
    }
    let (finished, max) = inst.count_to(target, 300);
    if max > target || !finished {
        let kept = dir.keep();
        panic!(
            "the counter {} (files kept in {})\n{:#?}\n{}",
            if max > target {
                format!("overshot to {max}: a call was logged twice")
            } else {
                format!("stopped at {max} of {target}: a call was lost")
            },
            kept.display(),
            inst.status(),
            inst.tail()
        );
    }
    let same = inst.identical();
    let (records, digest) = same.unwrap_or_else(|| panic!("the replicas' logs differ: {:#?}", inst.status()));
    assert!(records as u64 > target, "{records} records for {target} counts");
    assert!(mid >= kills * 4 / 5, "only {mid} of the kills came while the counter was counting");
    chaos_report(
        "coordinator replicas: counter with primary kills",
        profile(),
        serde_json::json!({
            "target": target, "coordinator_kills": coordinator_kills, "application_kills": app_kills,
            "kills_mid_count": mid, "max_count": max, "records": records, "digest": format!("{digest:016x}"),
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );
}

#[test]
fn two_replicated_instances_deliver_every_call_exactly_once_while_primaries_die_on_both_sides() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let target: u64 = if long() { 10_000 } else { 2_500 };
    let t = target.to_string();
    let mut server = Instance::new(dir.path(), "server", "pair-server", &[]);
    let mut client = Instance::new(dir.path(), "client", "pair-client", &["--target", &t]);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut kills = [0usize; 4];
    let mut mid = 0;
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || {
            server.tend();
            client.tend();
            !client.numbers("ack ").is_empty()
        }),
        "no acknowledgement ever came\n{}\n{}",
        server.tail(),
        client.tail()
    );
    for _ in 0..8 {
        tend_for(&mut [&mut server, &mut client], 300 + rng.next() % 500);
        if client.numbers("ack ").into_iter().max().unwrap_or(0) < target {
            mid += 1;
        }
        let victim = (rng.next() % 4) as usize;
        let side = if victim.is_multiple_of(2) { &mut server } else { &mut client };
        if kill_primary(side, victim >= 2).is_none() {
            panic!("no primary\n{}", side.tail());
        }
        kills[victim] += 1;
    }
    let finished = wait_until(Duration::from_secs(180), || {
        server.tend();
        client.tend();
        client.numbers("done ").contains(&target) || server.numbers("count ").iter().any(|c| *c > target)
    });
    let counts = server.numbers("count ");
    let acks = client.numbers("ack ");
    let max = counts.iter().copied().max().unwrap_or(0);
    assert!(max <= target, "the server counted {max}: an add was delivered twice");
    assert!(acks.iter().all(|a| *a <= target), "an acknowledgement was delivered twice");
    if !finished {
        let kept = dir.keep();
        panic!(
            "stuck at {max} of {target}: a call was lost (files kept in {})\nserver: {:#?}\nclient: {:#?}\n{}\n{}",
            kept.display(),
            server.status(),
            client.status(),
            server.tail(),
            client.tail()
        );
    }
    assert_eq!(max, target);
    assert!(mid >= 6, "only {mid} kills came while the pair was exchanging calls");
    chaos_report(
        "coordinator replicas: two instances with primary kills",
        profile(),
        serde_json::json!({
            "target": target, "server_app_kills": kills[0], "client_app_kills": kills[1],
            "server_coordinator_kills": kills[2], "client_coordinator_kills": kills[3], "kills_mid_exchange": mid,
            "seconds": started.elapsed().as_secs_f64(),
            "links_remade_for_an_unanswered_call": server.log_lines("not committed by the other coordinator") + client.log_lines("not committed by the other coordinator"),
            "calls_out_of_order": server.log_lines("came out of order") + client.log_lines("came out of order"),
        }),
    );
}

#[test]
fn transfer_primary_to_an_upgrading_secondary_upgrades_once_under_load_and_loses_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let target: u64 = 3_000;
    let t = target.to_string();
    let mut inst = Instance::new(dir.path(), "up", "counter", &["--target", &t]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            inst.tend();
            inst.numbers("count ").into_iter().max().unwrap_or(0) > 200
        }),
        "the counter never started\n{}",
        inst.tail()
    );
    // Replica 3 comes back as an upgrading secondary (version 1); if it leads, the
    // primary role moves away first, so the upgrade happens by transfer-primary.
    let p = inst.primary().expect("a primary");
    let up = if p == 2 { 1 } else { 2 };
    inst.kill_replica(up);
    inst.replicas[up].upgrade = Some(1);
    inst.start(up);
    inst.start_app(up);
    assert!(
        wait_until(Duration::from_secs(20), || {
            inst.tend();
            inst.status().is_some_and(|s| {
                s["replicas"].as_array().is_some_and(|rs| {
                    rs.iter()
                        .any(|r| r["id"].as_u64() == Some(up as u64 + 1) && r["info"]["app"]["phase"] == "secondary")
                })
            })
        }),
        "the upgrading secondary never followed\n{}",
        inst.tail()
    );
    let before = inst.numbers("count ").into_iter().max().unwrap_or(0);
    let sec = secret(&inst.dir);
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["coordinator", "transfer-primary", "--instance", "up", "--to", &(up + 1).to_string(), "--log-dir"])
        .arg(inst.dir.join("logs"))
        .arg("--cluster-secret-file")
        .arg(sec)
        .output()
        .unwrap();
    assert!(out.status.success(), "transfer-primary: {}", common::text(&out));
    let (finished, max) = inst.count_to(target, 120);
    assert!(max <= target, "overshoot to {max}");
    assert!(finished, "stopped at {max}\n{}", inst.tail());
    let upgrades = inst.numbers("upgraded at ");
    assert_eq!(upgrades.len(), 1, "the upgrade hook ran {} times: {upgrades:?}", upgrades.len());
    assert!(upgrades[0] >= before && upgrades[0] < target, "upgraded at {} (count was {before} before)", upgrades[0]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            inst.tend();
            inst.status().is_some_and(|s| {
                s["primary"].as_u64() == Some(up as u64 + 1)
                    && s["replicas"].as_array().is_some_and(|rs| rs.iter().all(|r| r["info"]["version"] == 1))
            }) && inst.replicas_identical().is_some()
        }),
        "not every replica at version 1 with the same log: {:#?}",
        inst.status()
    );
}

/// Runs `drover coordinator SUB --instance NAME ARGS... --log-dir --cluster-secret-file`.
fn admin(inst: &Instance, sub: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["coordinator", sub, "--instance", &inst.name])
        .args(args)
        .arg("--log-dir")
        .arg(inst.dir.join("logs"))
        .arg("--cluster-secret-file")
        .arg(secret(&inst.dir))
        .args(&inst.tls)
        .output()
        .unwrap()
}

#[test]
fn a_replica_added_under_load_follows_and_once_removed_stops_and_does_not_run_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut inst = Instance::new(dir.path(), "members", "counter", &["--target", "10000000"]);
    let counting = |inst: &mut Instance, above: u64| {
        wait_until(Duration::from_secs(30), || {
            inst.tend();
            inst.numbers("count ").into_iter().max().unwrap_or(0) > above
        })
    };
    assert!(counting(&mut inst, 200), "the counter never started\n{}", inst.tail());
    // Replica 4, started with the founders as its peers, then added.
    inst.replicas.push(Replica::new(4, "127.0.0.1".into(), None));
    inst.start(3);
    inst.start_app(3);
    let raft = format!("127.0.0.1:{}", inst.replicas[3].raft);
    let out = admin(&inst, "add-replica", &["--replica", "4", "--raft", &raft]);
    assert!(out.status.success(), "add-replica: {}", common::text(&out));
    let following = wait_until(Duration::from_secs(30), || {
        inst.tend();
        inst.status().is_some_and(|s| {
            s["replicas"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["id"] == 4
                        && r["voter"] == true
                        && r["info"]["app"]["phase"] == "secondary"
                        && r["info"]["records"].as_i64().unwrap_or(0) > 0
                })
            })
        })
    });
    assert!(
        following,
        "replica 4 never followed as a voter with a secondary application: {:#?}\n{}",
        inst.status(),
        std::fs::read_to_string(inst.log(3)).unwrap_or_default()
    );
    if inst.primary() == Some(3) {
        let out = admin(&inst, "transfer-primary", &["--to", "1"]);
        assert!(out.status.success(), "transfer-primary: {}", common::text(&out));
    }
    // Its application in session (not tended from here on: no other session ends).
    let mut app = inst.replicas[3].app.take().expect("replica 4's application");
    let out = admin(&inst, "remove-replica", &["--replica", "4"]);
    assert!(out.status.success(), "remove-replica: {}", common::text(&out));
    assert!(common::text(&out).contains("stops"), "it was told: {}", common::text(&out));
    // Its process exits by itself (0), and its application's session ended.
    let mut exited = None;
    let stopped = wait_until(Duration::from_secs(10), || {
        exited = inst.replicas[3].process.as_mut().and_then(|p| p.0.try_wait().ok().flatten());
        exited.is_some()
    });
    assert!(stopped, "the removed replica kept running\n{}", std::fs::read_to_string(inst.log(3)).unwrap_or_default());
    assert!(exited.is_some_and(|e| e.success()), "exit {exited:?}");
    let app_ended = wait_until(Duration::from_secs(10), || app.0.try_wait().ok().flatten().is_some());
    assert!(app_ended, "the removed replica's application is still in session");
    inst.replicas[3].process = None;
    // Started again, it refuses, naming why.
    inst.start(3);
    let mut again = None;
    assert!(wait_until(Duration::from_secs(10), || {
        again = inst.replicas[3].process.as_mut().and_then(|p| p.0.try_wait().ok().flatten());
        again.is_some()
    }));
    assert!(again.is_some_and(|e| !e.success()), "a removed replica ran again: {again:?}");
    let log = std::fs::read_to_string(inst.log(3)).unwrap_or_default();
    assert!(log.contains("was removed from the instance's group"), "{log}");
    inst.replicas[3].process = None;
    // The group is the three founders again, and the count goes on.
    let ids: Vec<u64> = inst
        .status()
        .and_then(|s| s["replicas"].as_array().map(|rs| rs.iter().filter_map(|r| r["id"].as_u64()).collect()))
        .unwrap_or_default();
    assert_eq!(ids, vec![1, 2, 3]);
    let now = inst.numbers("count ").into_iter().max().unwrap_or(0);
    assert!(counting(&mut inst, now + 200), "the counter stopped after the removal\n{}", inst.tail());
}

#[test]
fn replicas_on_mutual_tls_count_and_refuse_a_certificate_from_another_ca() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let cert = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_drover")).arg("cert").args(args).output().unwrap();
        assert!(out.status.success(), "drover cert {args:?}: {}", common::text(&out));
    };
    let flags = |d: &Path| -> Vec<String> {
        ["--cluster-ca", "ca.pem", "--tls-cert", "replica.pem", "--tls-key", "replica.key"]
            .iter()
            .enumerate()
            .map(|(i, a)| if i % 2 == 1 { d.join(a).display().to_string() } else { a.to_string() })
            .collect()
    };
    let (ours, theirs) = (dir.path().join("ca"), dir.path().join("other-ca"));
    for d in [&ours, &theirs] {
        cert(&["init", "--dir", d.to_str().unwrap()]);
        cert(&["issue", "replica", "--dir", d.to_str().unwrap()]);
    }
    let target: u64 = 1_000;
    let t = target.to_string();
    let mut inst = Instance::new_with_tls(dir.path(), "tls", "counter", &["--target", &t], flags(&ours));
    let (finished, max) = inst.count_to(target, 60);
    assert!(finished && max == target, "the counter reached {max} of {target} over TLS\n{}", inst.tail());
    assert!(inst.identical().is_some(), "status over TLS: {:#?}", inst.status());
    // The same secret, but a certificate from another CA, or none: refused.
    let mut stranger = Instance { tls: flags(&theirs), replicas: Vec::new(), ..inst_view(&inst) };
    assert!(!admin(&stranger, "status", &["--json"]).status.success(), "a certificate from another CA was taken");
    stranger.tls.clear();
    assert!(!admin(&stranger, "status", &["--json"]).status.success(), "a plain connection was taken");
}

/// An `Instance` that names the same instance and directory (for admin commands with
/// other credentials), with no processes of its own.
fn inst_view(i: &Instance) -> Instance {
    Instance {
        dir: i.dir.clone(),
        name: i.name.clone(),
        app: i.app,
        app_args: Vec::new(),
        replicas: Vec::new(),
        rounds: 0,
        tls: Vec::new(),
    }
}

#[test]
fn an_isolated_primary_is_replaced_the_count_goes_on_and_after_the_heal_it_rejoins_with_the_same_records() {
    let _serial = serial();
    let ns = common::netns::Netns::required(8);
    let (host, inside) = (ns.host_ip.clone(), ns.ns_ip());
    let dir = tempfile::tempdir().unwrap();
    let target: u64 = if long() { 30_000 } else { 8_000 };
    let t = target.to_string();
    // Replica 1 (and its application) in the namespace; 2 and 3 on the host's end of
    // the link, an address that stays reachable on the host while the link is down.
    let name = ns.name.clone();
    let mut inst = Instance::new_placed(dir.path(), "split", "counter", &["--target", &t], Vec::new(), |id| {
        if id == 1 { (inside.clone(), Some(name.clone())) } else { (host.clone(), None) }
    });
    let counted = |inst: &Instance| inst.numbers("count ").into_iter().max().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(30), || {
            inst.tend();
            counted(&inst) > 300
        }),
        "the counter never started\n{}",
        inst.tail()
    );
    if inst.primary() != Some(0) {
        let out = admin(&inst, "transfer-primary", &["--to", "1"]);
        assert!(out.status.success(), "transfer-primary: {}", common::text(&out));
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            inst.tend();
            inst.status().is_some_and(|s| {
                s["primary"] == 1
                    && s["replicas"]
                        .as_array()
                        .is_some_and(|rs| rs.iter().any(|r| r["id"] == 1 && r["info"]["app"]["phase"] == "primary"))
            })
        }),
        "replica 1 never served as primary: {:#?}",
        inst.status()
    );
    // The cut (link down, and a blackhole route so the namespace's addresses are not
    // sent to the default gateway instead).
    let subnet = format!("{}.0/24", inst.replicas[0].ip.rsplit_once('.').unwrap().0);
    let at_cut = counted(&inst);
    ns.cut().expect("cut the link");
    common::netns::ip(&["route", "add", "blackhole", &subnet]).expect("blackhole the namespace's subnet");
    let cut = Instant::now();
    let mut new_primary = None;
    let took_over = wait_until(Duration::from_secs(20), || {
        inst.tend();
        new_primary = inst.status().and_then(|s| s["primary"].as_u64()).filter(|p| *p != 1);
        new_primary.is_some()
    });
    let elected_ms = cut.elapsed().as_millis() as u64;
    let counting_on = took_over
        && wait_until(Duration::from_secs(20), || {
            inst.tend();
            counted(&inst) > at_cut + 500
        });
    let resumed_ms = cut.elapsed().as_millis() as u64;
    // Let the majority count a while with replica 1 cut off.
    tend_for(&mut [&mut inst], 2_000);
    common::netns::ip(&["route", "del", "blackhole", &subnet]).expect("remove the blackhole");
    ns.heal().expect("heal the link");
    let healed = Instant::now();
    assert!(took_over, "the majority elected no primary in 20 s: {:#?}\n{}", inst.status(), inst.tail());
    assert!(counting_on, "the count did not go on after the cut (at {at_cut})\n{}", inst.tail());
    let rejoined = wait_until(Duration::from_secs(30), || {
        inst.tend();
        inst.status().is_some_and(|s| {
            s["primary"].as_u64() != Some(1)
                && s["replicas"].as_array().is_some_and(|rs| {
                    rs.iter().any(|r| {
                        r["id"] == 1 && r["info"]["role"] == "follower" && r["info"]["app"]["phase"] == "secondary"
                    })
                })
        })
    });
    let rejoin_ms = healed.elapsed().as_millis() as u64;
    assert!(rejoined, "replica 1 did not rejoin as a secondary: {:#?}\n{}", inst.status(), inst.tail());
    // Now the secondary is cut off: the primary counts on with the other one, and
    // after the heal the secondary catches up with its application still in session.
    let before = counted(&inst);
    let app_pid = inst.replicas[0].app.as_ref().map(Killed::pid);
    ns.cut().expect("cut the link again");
    common::netns::ip(&["route", "add", "blackhole", &subnet]).expect("blackhole again");
    let on_without_it = wait_until(Duration::from_secs(20), || {
        inst.tend();
        counted(&inst) > before + 300
    });
    tend_for(&mut [&mut inst], 1_000);
    common::netns::ip(&["route", "del", "blackhole", &subnet]).expect("remove the blackhole");
    ns.heal().expect("heal the link");
    assert!(on_without_it, "the count stopped while a secondary was cut off (at {before})\n{}", inst.tail());
    let (finished, max) = inst.count_to(target, 120);
    assert_eq!(
        inst.replicas[0].app.as_ref().map(Killed::pid),
        app_pid,
        "the cut-off secondary's application was restarted (its session ended)\n{}",
        inst.tail()
    );
    assert!(max <= target, "overshot to {max}: a call was logged twice");
    assert!(finished, "stopped at {max} of {target}\n{}", inst.tail());
    let same = inst.identical();
    assert!(same.is_some(), "the replicas' logs differ after the heal: {:#?}", inst.status());
    chaos_report(
        "coordinator replicas: isolated primary",
        profile(),
        serde_json::json!({
            "target": target, "count_at_cut": at_cut, "new_primary": new_primary,
            "new_primary_ms": elected_ms, "counted_500_more_ms": resumed_ms, "rejoined_as_secondary_ms": rejoin_ms,
            "records": same.map(|s| s.0),
        }),
    );
}
