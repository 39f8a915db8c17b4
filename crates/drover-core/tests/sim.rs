//! Seeded deterministic simulation of the controller core: fake nodes and a CLI driven
//! by one seed through random joins, leaves, silent failures, kicks, drains, pins,
//! price updates (in and out of order, some from deposed streamers), status fan-outs,
//! task submissions run by fake workers (acks, refusals, starts, completions, errors,
//! repeated reports, pings after reconnects), and controller crashes (checkpoint +
//! replay at random points). Invariants are checked after every step; a failure names
//! the seed (`DROVER_SIM_SEED=<n>` reruns it, `DROVER_SIM_SEEDS=<n>` runs more seeds).

use std::collections::{BTreeMap, BTreeSet};

use drover_core::{Config, Controller, Event, Input, Output, Policy, SplitMix64};
use drover_journal::StateMachine;
use drover_proto::{Payload, v1};

const PAIRS: [&str; 5] = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD", "USDCHF"];

#[derive(Debug)]
struct FakeNode {
    id: String,
    known: Vec<String>,
    session: Option<u64>,
    streaming: BTreeMap<String, u64>,
    silent: bool,
    last_beat: i64,
    /// Workers: the attempts it holds (task id, attempt) → started.
    worker: bool,
    held: BTreeMap<(String, u32), bool>,
    /// Reports not yet acknowledged: request id → report.
    reports: BTreeMap<String, Payload>,
}

struct Sim {
    seed: u64,
    rng: SplitMix64,
    now: i64,
    core: Controller,
    log: Vec<Input>,
    checkpoint: Option<(usize, Vec<u8>)>,
    nodes: Vec<FakeNode>,
    next_session: u64,
    cli: Option<u64>,
    last_price: BTreeMap<String, i64>,
    step: usize,
    crashes: u32,
    updates: u64,
    next_report: u64,
    /// Tasks the core has reported completed, to catch one completing twice.
    completed: BTreeSet<String>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SplitMix64(seed);
        let nodes = (0..6)
            .map(|i| {
                let known: Vec<String> = PAIRS.iter().filter(|_| rng.below(2) == 0).map(|p| p.to_string()).collect();
                FakeNode {
                    id: format!("node-{i}"),
                    known,
                    session: None,
                    streaming: BTreeMap::new(),
                    silent: false,
                    last_beat: 0,
                    worker: i % 2 == 0,
                    held: BTreeMap::new(),
                    reports: BTreeMap::new(),
                }
            })
            .collect();
        let policy = if seed.is_multiple_of(2) { Policy::Random } else { Policy::Balanced };
        let config = Config { policy, seed, version: "test".into(), ..Config::default() };
        let mut sim = Sim {
            seed,
            rng,
            now: 1_000_000,
            core: Controller::new(config.clone()),
            log: Vec::new(),
            checkpoint: None,
            nodes,
            next_session: 1,
            cli: None,
            last_price: BTreeMap::new(),
            step: 0,
            crashes: 0,
            updates: 0,
            next_report: 0,
            completed: BTreeSet::new(),
        };
        sim.input(Event::ControllerStarted { config });
        sim
    }

    fn fail(&self, what: String) -> ! {
        panic!("seed {} step {}: {what}\n(rerun: DROVER_SIM_SEED={})", self.seed, self.step, self.seed)
    }

    fn input(&mut self, event: Event) -> Vec<Output> {
        let input = Input { at_ms: self.now, event };
        // Inputs must survive the journal encoding unchanged.
        let mut buf = Vec::new();
        Controller::encode_input(&input, &mut buf).expect("inputs encode");
        let decoded = Controller::decode_input(&buf).expect("input decodes");
        assert_eq!(decoded, input);
        self.log.push(input.clone());
        let mut out = Vec::new();
        self.core.apply(input, &mut out);
        self.deliver(&out);
        out
    }

    fn deliver(&mut self, out: &[Output]) {
        let mut replies: Vec<(String, u64, String, Payload)> = Vec::new();
        let refuse = self.step % 8 == 3;
        for o in out {
            match o {
                Output::ToNode { node, session, msg } => {
                    let Some(n) = self.nodes.iter_mut().find(|n| &n.id == node && n.session == Some(*session)) else {
                        continue;
                    };
                    let any = msg.command.clone().expect("command");
                    let mut reply = |p: Payload| replies.push((n.id.clone(), *session, msg.request_id.clone(), p));
                    match Payload::from_any(&any).expect("decodes") {
                        Payload::NodeStreamModifyStateV1Req(m) => {
                            n.streaming = m.streams.into_iter().map(|s| (s.pair, s.epoch)).collect();
                        }
                        Payload::NodeStatusV1Req(_) if !n.silent => {
                            reply(v1::NodeStatusV1Reply { node_uuid: n.id.clone(), ..Default::default() }.into());
                        }
                        // A fake worker: refuses now and then, else holds the attempts.
                        Payload::TasksExecuteV1Req(r) if n.worker && !n.silent => {
                            if refuse {
                                reply(v1::TasksRefusedV1Reply { reason: "sim refuses".into() }.into());
                            } else {
                                for t in r.tasks {
                                    let id = t.task.expect("task id");
                                    n.held.entry((id.id, id.attempt)).or_insert(false);
                                }
                                reply(v1::AckV1Reply {}.into());
                            }
                        }
                        Payload::TasksPingV1Req(r) if n.worker && !n.silent => {
                            use v1::task_status::Status;
                            let tasks = r
                                .tasks
                                .into_iter()
                                .map(|id| {
                                    let status = match n.held.get(&(id.id.clone(), id.attempt)) {
                                        Some(true) => Status::Started(v1::task_status::Started { started_at_ms: 1 }),
                                        Some(false) => Status::Pending(v1::task_status::Pending {}),
                                        None => Status::Unknown(v1::task_status::Unknown {}),
                                    };
                                    v1::TaskStatus { task: Some(id), status: Some(status) }
                                })
                                .collect();
                            reply(v1::TasksPongV1Reply { tasks }.into());
                        }
                        Payload::TasksAbortV1Req(r) if n.worker && !n.silent => {
                            for id in r.tasks {
                                n.held.remove(&(id.id, id.attempt));
                            }
                            reply(v1::AckV1Reply {}.into());
                        }
                        Payload::AckV1Reply(_) => {
                            n.reports.remove(&msg.request_id);
                        }
                        Payload::NotMineV1Reply(_) => {
                            n.reports.clear();
                            n.held.clear();
                        }
                        _ => {}
                    }
                }
                Output::CloseNode { node, session, .. } => {
                    if let Some(n) = self.nodes.iter_mut().find(|n| &n.id == node && n.session == Some(*session)) {
                        n.session = None;
                        n.streaming.clear();
                    }
                }
                Output::ToCli { .. }
                | Output::AdmissionVerdict { .. }
                | Output::EvictNode { .. }
                | Output::Assigned { .. }
                | Output::TaskEnded { .. } => {}
            }
        }
        for (node, session, request_id, payload) in replies {
            self.input(Event::node_message(&node, session, &request_id, payload));
        }
    }

    fn node_msg(&mut self, i: usize, payload: impl Into<Payload>) -> Vec<Output> {
        self.node_req(i, String::new(), payload.into())
    }

    fn cli_cmd(&mut self, node_uuids: Vec<String>, payload: impl Into<Payload>) -> Vec<Output> {
        let session = match self.cli {
            Some(s) => s,
            None => {
                let s = self.next_session;
                self.next_session += 1;
                self.input(Event::CliConnected { session: s, role: drover_core::OperatorRole::Admin });
                self.cli = Some(s);
                s
            }
        };
        let stream_id = format!("s{}", self.step);
        self.input(Event::cli_message(session, &stream_id, "cli", node_uuids, payload))
    }

    fn node_req(&mut self, i: usize, request_id: String, payload: Payload) -> Vec<Output> {
        let Some(session) = self.nodes[i].session else { return Vec::new() };
        let node = self.nodes[i].id.clone();
        self.input(Event::node_message(&node, session, &request_id, payload))
    }

    fn random_node(&mut self) -> usize {
        self.rng.below(self.nodes.len())
    }

    fn step(&mut self) {
        self.step += 1;
        self.now += self.rng.below(400) as i64;
        // Heartbeats from every live, non-silent node once a second.
        for i in 0..self.nodes.len() {
            if self.nodes[i].session.is_some() && !self.nodes[i].silent && self.now - self.nodes[i].last_beat >= 1000 {
                self.nodes[i].last_beat = self.now;
                self.node_msg(i, v1::NodeHeartbeatV1Notify { sent_at_ms: self.now });
            }
        }
        if self.core.next_deadline().is_some_and(|d| d <= self.now) {
            self.input(Event::Tick);
        }
        let i = self.random_node();
        match self.rng.below(100) {
            0..=14 if self.nodes[i].session.is_none() => {
                let s = self.next_session;
                self.next_session += 1;
                self.nodes[i].session = Some(s);
                self.nodes[i].silent = false;
                self.nodes[i].last_beat = self.now;
                let node = self.nodes[i].id.clone();
                self.input(Event::NodeConnected { node: node.clone(), session: s });
                let pairs = self.nodes[i].known.clone();
                let worker = self.nodes[i].worker;
                self.node_msg(i, v1::NodeKnownCurrenciesV1Notify { pairs, name: node, version: "t".into(), worker });
                if worker {
                    // Re-subscribe (the manager then pings its attempts), and repeat
                    // unacknowledged reports.
                    let req = v1::ManagerV1Req {
                        cores: 2,
                        memory_mb: 64,
                        labels: Default::default(),
                        manager_id: "controller".into(),
                        allow_jobs: vec![],
                    };
                    self.node_req(i, "sub".into(), req.into());
                    let pending: Vec<(String, Payload)> =
                        self.nodes[i].reports.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    for (rid, p) in pending {
                        self.node_req(i, rid, p);
                    }
                }
            }
            15..=19 => {
                if let Some(s) = self.nodes[i].session.take() {
                    self.nodes[i].streaming.clear();
                    let node = self.nodes[i].id.clone();
                    self.input(Event::NodeDisconnected { node, session: s });
                }
            }
            20..=22 => self.nodes[i].silent = true,
            23..=64 => {
                // A price update from a streamer, sometimes out of order, sometimes
                // with an epoch it no longer holds.
                let n = &self.nodes[i];
                if n.session.is_some() && !n.silent && !n.streaming.is_empty() {
                    let k = self.rng.below(n.streaming.len());
                    let (pair, epoch) = n.streaming.iter().nth(k).map(|(p, e)| (p.clone(), *e)).unwrap();
                    let epoch = if self.rng.below(10) == 0 { epoch.saturating_sub(1) } else { epoch };
                    let t = self.now - self.rng.below(300) as i64;
                    let before = self.core.latest_price(&pair);
                    let node = self.nodes[i].id.clone();
                    self.updates += 1;
                    self.node_msg(
                        i,
                        v1::NodePriceUpdateV1Notify {
                            pair: pair.clone(),
                            price: Some(v1::Decimal { mantissa: t, scale: 3 }),
                            upstream_time_ms: t,
                            seq: self.updates,
                            epoch,
                        },
                    );
                    if self.core.latest_price(&pair) != before {
                        // An accepted update came from the current streamer, at its epoch.
                        match self.core.streamer(&pair) {
                            Some((s, e)) if s == node && e == epoch => {}
                            other => self.fail(format!("{pair}: accepted ({node}, {epoch}) but streamer is {other:?}")),
                        }
                    }
                }
            }
            65..=67 => {
                let id = self.nodes[i].id.clone();
                self.cli_cmd(Vec::new(), v1::ControllerKickNodesV1Req { node_uuids: vec![id] });
            }
            68..=70 => {
                let id = self.nodes[i].id.clone();
                // A drain, or now and then its undo; now and then a forget (refused
                // for a connected node; a gone one leaves, with its leases).
                match self.rng.below(6) {
                    0 => {
                        self.cli_cmd(Vec::new(), v1::ControllerForgetNodesV1Req { node_uuids: vec![id] });
                    }
                    1 | 2 => {
                        self.cli_cmd(Vec::new(), v1::ControllerDrainNodesV1Req { node_uuids: vec![id], undo: true });
                    }
                    _ => {
                        self.cli_cmd(Vec::new(), v1::ControllerDrainNodesV1Req { node_uuids: vec![id], undo: false });
                    }
                }
            }
            71..=73 => {
                let id = self.nodes[i].id.clone();
                let pairs = self.nodes[i].known.iter().take(1).cloned().collect();
                let unpin = self.rng.below(2) == 0;
                self.cli_cmd(Vec::new(), v1::ControllerStreamPairsV1Req { node_uuid: id, pairs, unpin });
            }
            74..=77 => {
                let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
                let out = self.cli_cmd(ids, v1::NodeStatusV1Req {});
                let count = out.iter().find_map(|o| match o {
                    Output::ToCli { msg, .. } => match Payload::from_any(msg.response.as_ref()?).ok()? {
                        Payload::CliResponseCountV1Notify(c) => Some(c),
                        _ => None,
                    },
                    _ => None,
                });
                let c = count.unwrap_or_else(|| self.fail("fan-out without a response count".into()));
                if c.expected as usize + c.missing.len() != self.nodes.len() {
                    self.fail(format!("count {c:?} does not cover all {} nodes", self.nodes.len()));
                }
            }
            78..=80 => {
                self.checkpoint = Some((self.log.len(), self.core.checkpoint().expect("the state encodes")));
            }
            83..=86 => {
                let req = v1::ControllerTaskRunV1Req {
                    job_addr: "/bin/true".into(),
                    timeout_ms: 5_000,
                    cores: 1,
                    max_attempts: 3,
                    ..Default::default()
                };
                self.cli_cmd(Vec::new(), req);
            }
            87..=94 if self.nodes[i].worker && self.nodes[i].session.is_some() && !self.nodes[i].silent => {
                // The worker reports on one of its attempts; now and then it repeats an
                // unacknowledged report instead.
                if !self.nodes[i].reports.is_empty() && self.rng.below(4) == 0 {
                    let k = self.rng.below(self.nodes[i].reports.len());
                    let (rid, p) = self.nodes[i].reports.iter().nth(k).map(|(a, b)| (a.clone(), b.clone())).unwrap();
                    self.node_req(i, rid, p);
                } else if !self.nodes[i].held.is_empty() {
                    let k = self.rng.below(self.nodes[i].held.len());
                    let ((id, attempt), started) =
                        self.nodes[i].held.iter().nth(k).map(|(a, b)| (a.clone(), *b)).unwrap();
                    let task = Some(v1::TaskId { id: id.clone(), attempt });
                    let report: Payload = if !started {
                        self.nodes[i].held.insert((id, attempt), true);
                        v1::TaskStartedV1Req { task, started_at_ms: self.now }.into()
                    } else {
                        self.nodes[i].held.remove(&(id, attempt));
                        if self.rng.below(5) == 0 {
                            v1::TaskErrorV1Req { task, kind: 3, message: "sim".into(), at_ms: self.now }.into()
                        } else {
                            v1::TaskCompletedV1Req { task, outcome: Some(v1::TaskOutcome::default()) }.into()
                        }
                    };
                    self.next_report += 1;
                    let rid = format!("r{}", self.next_report);
                    self.nodes[i].reports.insert(rid.clone(), report.clone());
                    self.node_req(i, rid, report);
                }
            }
            95 if self.nodes[i].worker => {
                // The worker process restarts: everything it held is gone.
                self.nodes[i].held.clear();
                self.nodes[i].reports.clear();
            }
            81..=82 => self.crash(),
            _ => {}
        }
        self.check();
    }

    /// Task invariants: reservations match attempts and never exceed a worker's cores;
    /// only running tasks have an attempt; a task completes at most once.
    fn check_tasks(&mut self) {
        let tasks = self.core.task_states();
        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        for t in &tasks {
            match (t.state, &t.attempt) {
                ("running", Some((_, w))) => *used.entry(w.clone()).or_default() += t.cores,
                ("running", None) => self.fail(format!("{} is running without an attempt", t.id)),
                (s, Some(a)) => self.fail(format!("{} is {s} but has attempt {a:?}", t.id)),
                _ => {}
            }
        }
        for n in &self.nodes {
            let held = used.get(&n.id).copied().unwrap_or(0);
            match self.core.worker_load(&n.id) {
                Some((cores, reserved)) if reserved != held || reserved > cores => {
                    self.fail(format!("{}: {reserved} of {cores} cores reserved, attempts hold {held}", n.id));
                }
                Some(_) => {}
                None if held > 0 => self.fail(format!("{} holds attempts but is no worker", n.id)),
                None => {}
            }
        }
        let completed: BTreeSet<String> =
            tasks.iter().filter(|t| t.state == "completed").map(|t| t.id.clone()).collect();
        if !self.completed.is_subset(&completed) {
            self.fail("a completed task stopped being completed".into());
        }
        if self.core.task_counters().completed != completed.len() as u64 {
            self.fail(format!(
                "{} completions counted for {} completed tasks",
                self.core.task_counters().completed,
                completed.len()
            ));
        }
        self.completed = completed;
    }

    /// Crash the controller: rebuild it from the last checkpoint plus the inputs
    /// after it, compare with the live state, then restart it.
    fn crash(&mut self) {
        self.crashes += 1;
        let (from, mut rebuilt) = match &self.checkpoint {
            Some((at, bytes)) => (*at, Controller::restore(bytes).expect("checkpoint restores")),
            None => (0, Controller::new(Config { seed: self.seed, ..Config::default() })),
        };
        let mut scratch = Vec::new();
        for input in &self.log[from..] {
            rebuilt.apply(input.clone(), &mut scratch);
        }
        if rebuilt != self.core {
            self.fail("replayed state differs from the live state".into());
        }
        self.core = rebuilt;
        for n in &mut self.nodes {
            n.session = None;
            n.streaming.clear();
        }
        self.cli = None;
        let config = self.core.config().clone();
        self.input(Event::ControllerStarted { config });
    }

    fn check(&mut self) {
        self.check_tasks();
        for pair in PAIRS {
            let cur = self.core.streamer(pair);
            let next = self.core.incoming_streamer(pair);
            if let (Some((a, ea)), Some((b, eb))) = (cur, next)
                && (a == b || eb <= ea)
            {
                self.fail(format!("{pair}: current ({a},{ea}) and incoming ({b},{eb})"));
            }
            for (node, _) in cur.into_iter().chain(next) {
                if !self.core.is_online(node) && !self.core.is_rejoining(node) {
                    self.fail(format!("{pair} leased to {node}, which is gone"));
                }
            }
            let capable_online =
                self.nodes.iter().any(|n| self.core.is_online(&n.id) && n.known.iter().any(|k| k == pair));
            if capable_online && cur.is_none() {
                self.fail(format!("{pair} is known by an online node but has no streamer"));
            }
            // At most one node streams the pair at the epoch that is accepted.
            if let Some((_, e)) = cur {
                let holders =
                    self.nodes.iter().filter(|n| n.session.is_some() && n.streaming.get(pair) == Some(&e)).count();
                if holders > 1 {
                    self.fail(format!("{pair}: {holders} nodes hold the current epoch {e}"));
                }
            }
            if let Some((_, _, t)) = self.core.latest_price(pair) {
                let prev = self.last_price.insert(pair.to_string(), t);
                if prev.is_some_and(|p| p > t) {
                    self.fail(format!("{pair}: price went back in upstream time {prev:?} → {t}"));
                }
            }
        }
        // What each connected fake node streams is what the controller leased it.
        for n in &self.nodes {
            if n.session.is_none() {
                continue;
            }
            let leased: BTreeSet<(String, u64)> = PAIRS
                .iter()
                .flat_map(|p| {
                    [self.core.streamer(p), self.core.incoming_streamer(p)]
                        .into_iter()
                        .flatten()
                        .filter(|(node, _)| *node == n.id)
                        .map(|(_, e)| (p.to_string(), e))
                })
                .collect();
            let held: BTreeSet<(String, u64)> = n.streaming.iter().map(|(p, e)| (p.clone(), *e)).collect();
            if leased != held {
                self.fail(format!("{} holds {held:?} but is leased {leased:?}", n.id));
            }
        }
    }
}

fn run(seed: u64, steps: usize) -> (u32, u64, u64, [u64; 3]) {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    let c = sim.core.counters();
    let t = sim.core.task_counters();
    (sim.crashes, c.prices_accepted, c.failovers + c.timeouts, [t.completed, t.retries, t.refusals])
}

#[test]
fn simulated_fleets_keep_the_invariants() {
    let seeds: Vec<u64> = match std::env::var("DROVER_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("DROVER_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("DROVER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
            (1..=n).collect()
        }
    };
    let (mut crashes, mut accepted, mut failovers, mut tasks) = (0, 0, 0, [0u64; 3]);
    for seed in &seeds {
        let (c, a, f, t) = run(*seed, 1500);
        crashes += c;
        accepted += a;
        failovers += f;
        for (sum, x) in tasks.iter_mut().zip(t) {
            *sum += x;
        }
    }
    let [completed, retries, refusals] = tasks;
    eprintln!(
        "{} seeds: {crashes} crashes replayed, {accepted} prices accepted, {failovers} failovers/timeouts, \
         {completed} tasks completed, {retries} retries, {refusals} refusals",
        seeds.len()
    );
    assert!(crashes > 0 && accepted > 0 && failovers > 0, "the simulation exercised too little");
    assert!(completed > 0 && retries > 0 && refusals > 0, "the task plane was exercised too little");
}
