//! The manager's side of seed 2, rule by rule: one table row per message of the seed
//! (what the controller answers, given the relationship), then the scheduling rules
//! (placement, refusals, retries, deadlines, lost workers) and reconciliation after a
//! restart from a checkpoint.

use drover_core::{Config, Controller, Event, Input, Output};
use drover_journal::StateMachine;
use drover_proto::{Payload, v1};

struct Script {
    core: Controller,
    now: i64,
}

fn payload(any: &Option<drover_proto::Any>) -> Payload {
    Payload::from_any(any.as_ref().expect("any")).expect("decodes")
}

/// Every message to `node` in `out`: (request id, payload).
fn to(out: &[Output], node: &str) -> Vec<(String, Payload)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToNode { node: n, msg, .. } if n == node => Some((msg.request_id.clone(), payload(&msg.command))),
            _ => None,
        })
        .filter(|(_, p)| !matches!(p, Payload::NodeStreamModifyStateV1Req(_)))
        .collect()
}

fn names(msgs: &[(String, Payload)]) -> Vec<String> {
    msgs.iter().map(|(_, p)| p.name().to_owned()).collect()
}

impl Script {
    fn new() -> Script {
        let config = Config { manager_id: "ctl".into(), ..Config::default() };
        let mut s = Script { core: Controller::new(config.clone()), now: 10_000 };
        s.run(Event::ControllerStarted { config });
        s.now += 10_000;
        s.run(Event::Tick);
        s
    }

    fn run(&mut self, event: Event) -> Vec<Output> {
        let mut out = Vec::new();
        self.core.handle(Input { at_ms: self.now, event }, &mut out);
        out
    }

    fn at(&mut self, ms: i64) -> Vec<Output> {
        self.now += ms;
        self.run(Event::Tick)
    }

    /// Lets `ms` pass in steps of 500 ms, the `alive` nodes sending heartbeats.
    fn pass(&mut self, ms: i64, alive: &[(&str, u64)]) -> Vec<Output> {
        let mut out = Vec::new();
        let end = self.now + ms;
        while self.now < end {
            self.now = (self.now + 500).min(end);
            for (node, session) in alive {
                out.extend(self.msg(node, *session, "", v1::NodeHeartbeatV1Notify { sent_at_ms: 0 }));
            }
            out.extend(self.run(Event::Tick));
        }
        out
    }

    fn connect(&mut self, node: &str, session: u64, worker: bool) -> Vec<Output> {
        let mut out = self.run(Event::NodeConnected { node: node.into(), session });
        let hello = v1::NodeKnownCurrenciesV1Notify { pairs: vec![], name: node.into(), version: "1".into(), worker };
        out.extend(self.msg(node, session, "", hello));
        out
    }

    fn msg(&mut self, node: &str, session: u64, rid: &str, p: impl Into<Payload>) -> Vec<Output> {
        self.run(Event::node_message(node, session, rid, p))
    }

    /// Connects `node` as a worker with `cores` and returns what it was sent.
    fn worker(&mut self, node: &str, session: u64, cores: u32) -> Vec<Output> {
        let mut out = self.connect(node, session, true);
        out.extend(self.msg(
            node,
            session,
            "w1",
            v1::ManagerV1Req {
                cores,
                memory_mb: 1024,
                labels: Default::default(),
                manager_id: "ctl".into(),
                allow_jobs: vec![],
            },
        ));
        out
    }

    fn cli(&mut self, p: impl Into<Payload>) -> Vec<Output> {
        self.run(Event::CliConnected { session: 900, role: drover_core::OperatorRole::Admin });
        self.run(Event::cli_message(900, "s1", "cli", vec![], p))
    }

    fn submit(&mut self, job: &str, attempts: u32) -> (String, Vec<Output>) {
        let out = self.cli(v1::ControllerTaskRunV1Req {
            job_addr: job.into(),
            timeout_ms: 1_000,
            cores: 1,
            max_attempts: attempts,
            ..Default::default()
        });
        let id = out
            .iter()
            .find_map(|o| match o {
                Output::ToCli { msg, .. } => match payload(&msg.response) {
                    Payload::ControllerTaskRunV1Reply(r) => Some(r.task_id),
                    _ => None,
                },
                _ => None,
            })
            .expect("task id");
        (id, out)
    }

    fn status(&mut self, id: &str) -> v1::TaskInfo {
        let out = self.cli(v1::ControllerTaskStatusV1Req { id: id.into() });
        out.iter()
            .find_map(|o| match o {
                Output::ToCli { msg, .. } => match payload(&msg.response) {
                    Payload::ControllerTaskStatusV1Reply(r) => r.task,
                    _ => None,
                },
                _ => None,
            })
            .expect("task")
    }
}

/// The `TasksExecuteV1Req`s in `out` for `node`: (request id, task id, attempt).
fn executes(out: &[Output], node: &str) -> Vec<(String, String, u32)> {
    to(out, node)
        .into_iter()
        .filter_map(|(rid, p)| match p {
            Payload::TasksExecuteV1Req(r) => {
                let t = r.tasks[0].task.clone().unwrap();
                Some((rid, t.id, t.attempt))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn seed_rows_node_type_and_manager_request() {
    let mut s = Script::new();
    s.connect("w", 1, true);
    // NodeTypeRequest → NodeTypeAnswer with the manager's type (and id).
    let out = s.msg("w", 1, "r1", v1::NodeTypeV1Req { node_type: v1::NodeType::Worker as i32, id: "w".into() });
    match &to(&out, "w")[..] {
        [(rid, Payload::NodeTypeV1Reply(r))] => {
            assert_eq!((rid.as_str(), r.node_type, r.id.as_str()), ("r1", v1::NodeType::Manager as i32, "ctl"))
        }
        other => panic!("{other:?}"),
    }
    // ManagerRequest addressed to another manager: false.
    let req = |m: &str| v1::ManagerV1Req {
        cores: 2,
        memory_mb: 10,
        labels: Default::default(),
        manager_id: m.into(),
        allow_jobs: vec![],
    };
    let out = s.msg("w", 1, "r2", req("someone-else"));
    assert!(matches!(&to(&out, "w")[..], [(_, Payload::ManagerV1Reply(v1::ManagerV1Reply { accepted: false }))]));
    assert!(!s.core.is_task_worker("w"));
    // From a node that is not a worker: false.
    s.connect("n", 2, false);
    let out = s.msg("n", 2, "r3", req("ctl"));
    assert!(matches!(&to(&out, "n")[..], [(_, Payload::ManagerV1Reply(v1::ManagerV1Reply { accepted: false }))]));
    // From a worker addressing this manager: true, and the relationship exists.
    let out = s.msg("w", 1, "r4", req("ctl"));
    assert!(matches!(&to(&out, "w")[..], [(_, Payload::ManagerV1Reply(v1::ManagerV1Reply { accepted: true }))]));
    assert!(s.core.is_task_worker("w"));
}

#[test]
fn seed_rows_ping_bye_and_not_mine() {
    let mut s = Script::new();
    s.connect("x", 1, true);
    // ManagerPing from a non-partner → NotMine; so is every relationship-specific request.
    for p in [
        Payload::from(v1::ManagerPingV1Req {}),
        v1::TaskStartedV1Req { task: Some(v1::TaskId { id: "t1".into(), attempt: 1 }), started_at_ms: 0 }.into(),
        v1::TaskErrorV1Req::default().into(),
        v1::TaskCompletedV1Req::default().into(),
        v1::TasksExecuteV1Req::default().into(),
        v1::TasksPingV1Req::default().into(),
        v1::TasksAbortV1Req::default().into(),
    ] {
        let name = p.name().to_owned();
        let out = s.msg("x", 1, "q", p);
        assert_eq!(names(&to(&out, "x")), ["NotMineV1Reply"], "{name} from a non-partner");
    }
    // A partner's ManagerPing → ManagerPong.
    s.worker("w", 2, 1);
    let out = s.msg("w", 2, "p", v1::ManagerPingV1Req {});
    assert_eq!(names(&to(&out, "w")), ["ManagerPongV1Reply"]);
    // ManagerBye → Ack whatever the relationship, and it ends.
    let out = s.msg("w", 2, "b", v1::ManagerByeV1Req {});
    assert_eq!(names(&to(&out, "w")), ["AckV1Reply"]);
    assert!(!s.core.is_task_worker("w"));
    let out = s.msg("x", 1, "b", v1::ManagerByeV1Req {});
    assert_eq!(names(&to(&out, "x")), ["AckV1Reply"], "ManagerBye from a non-partner is acknowledged too");
    let out = s.msg("w", 2, "p", v1::ManagerPingV1Req {});
    assert_eq!(names(&to(&out, "w")), ["NotMineV1Reply"]);
}

#[test]
fn tasks_execute_ack_reports_and_deduplication() {
    let mut s = Script::new();
    s.worker("w", 1, 1);
    let (id, out) = s.submit("/bin/true", 3);
    let ex = executes(&out, "w");
    assert_eq!(ex.len(), 1, "placed at once on the free worker");
    let (rid, _, attempt) = ex[0].clone();
    s.msg("w", 1, &rid, v1::AckV1Reply {});
    let tid = v1::TaskId { id: id.clone(), attempt };
    // TaskStarted → Ack; TaskCompleted → Ack, the task is completed; a repeat → Ack, no change.
    let out = s.msg("w", 1, "r1", v1::TaskStartedV1Req { task: Some(tid.clone()), started_at_ms: 1 });
    assert_eq!(names(&to(&out, "w")), ["AckV1Reply"]);
    let done = v1::TaskCompletedV1Req {
        task: Some(tid.clone()),
        outcome: Some(v1::TaskOutcome { exit_code: 0, stdout: b"hi\n".to_vec(), ..Default::default() }),
    };
    let out = s.msg("w", 1, "r2", done.clone());
    assert_eq!(names(&to(&out, "w")), ["AckV1Reply"]);
    assert_eq!(s.status(&id).state, "completed");
    let out = s.msg("w", 1, "r2", done);
    assert_eq!(names(&to(&out, "w")), ["AckV1Reply"], "a repeated report is acknowledged again");
    let t = s.status(&id);
    assert_eq!((t.state.as_str(), t.attempts, t.exit_code), ("completed", 1, Some(0)));
    assert_eq!(s.core.task_counters().completed, 1, "counted once");
    // The worker's core is free again: the next task goes out at once.
    let (_, out) = s.submit("/bin/true", 1);
    assert_eq!(executes(&out, "w").len(), 1);
}

#[test]
fn refused_tasks_go_elsewhere_and_refusals_do_not_count_as_attempts() {
    let mut s = Script::new();
    s.worker("a", 1, 4);
    s.worker("b", 2, 1);
    let (id, out) = s.submit("/bin/true", 1);
    let (rid, _, _) = executes(&out, "a").pop().expect("most free cores: a");
    let out = s.msg("a", 1, &rid, v1::TasksRefusedV1Reply { reason: "busy".into() });
    let ex = executes(&out, "b");
    assert_eq!(ex.len(), 1, "placed on the other worker: {out:?}");
    let t = s.status(&id);
    assert_eq!((t.state.as_str(), t.attempts), ("running", 1), "the refused dispatch was not an attempt");
    assert_eq!(t.history[0].outcome, "refused");
}

#[test]
fn errors_retry_with_backoff_until_max_attempts_then_fail() {
    let mut s = Script::new();
    s.worker("w", 1, 1);
    let (id, out) = s.submit("/bin/false", 2);
    let (_, _, n) = executes(&out, "w")[0].clone();
    let err = |n| v1::TaskErrorV1Req {
        task: Some(v1::TaskId { id: id.clone(), attempt: n }),
        kind: v1::TaskErrorKind::RunningError as i32,
        message: "boom".into(),
        at_ms: 0,
    };
    let out = s.msg("w", 1, "e1", err(n));
    assert!(executes(&out, "w").is_empty(), "not before the backoff");
    let out = s.at(600);
    let (_, _, n2) = executes(&out, "w").pop().expect("retried after the backoff");
    assert_eq!(n2, n + 1);
    s.msg("w", 1, "e2", err(n2));
    let t = s.status(&id);
    assert_eq!((t.state.as_str(), t.attempts), ("failed", 2));
    assert!(t.error.contains("boom"), "{}", t.error);
}

#[test]
fn the_manager_aborts_an_overdue_attempt_and_a_stale_report_is_answered_with_abort() {
    let mut s = Script::new();
    s.worker("w", 1, 1);
    let (id, out) = s.submit("/bin/sleep", 2);
    let (_, _, n) = executes(&out, "w")[0].clone();
    s.msg(
        "w",
        1,
        "s",
        v1::TaskStartedV1Req { task: Some(v1::TaskId { id: id.clone(), attempt: n }), started_at_ms: 0 },
    );
    // timeout 1 s + grace 5 s: at 6.1 s the manager aborts it.
    let out = s.pass(6_100, &[("w", 1)]);
    let sent = names(&to(&out, "w"));
    assert!(sent.contains(&"TasksAbortV1Req".to_owned()), "{sent:?}");
    assert_eq!(s.core.task_counters().timeouts, 1);
    // The worker then says the old attempt started: it is not current, so: Ack + abort.
    let out = s.msg(
        "w",
        1,
        "s2",
        v1::TaskStartedV1Req { task: Some(v1::TaskId { id: id.clone(), attempt: n }), started_at_ms: 0 },
    );
    assert_eq!(names(&to(&out, "w")), ["AckV1Reply", "TasksAbortV1Req"]);
}

#[test]
fn a_lost_worker_s_attempt_is_retried_on_another_worker_after_the_grace() {
    let mut s = Script::new();
    s.worker("a", 1, 1);
    let (id, out) = s.submit("/bin/true", 3);
    assert_eq!(executes(&out, "a").len(), 1);
    s.worker("b", 2, 1);
    s.run(Event::NodeDisconnected { node: "a".into(), session: 1 });
    assert!(executes(&s.pass(1_000, &[("b", 2)]), "b").is_empty(), "not within the worker grace");
    let out = s.pass(5_000, &[("b", 2)]);
    assert_eq!(executes(&out, "b").len(), 1, "retried on b");
    let t = s.status(&id);
    assert_eq!(t.history[0].outcome, "lost");
    assert_eq!(t.attempts, 2);
}

#[test]
fn after_a_restart_returning_workers_are_pinged_and_nothing_runs_twice() {
    let mut s = Script::new();
    s.worker("a", 1, 2);
    let (t1, out) = s.submit("/bin/one", 3);
    let (_, _, n1) = executes(&out, "a")[0].clone();
    let (t2, out) = s.submit("/bin/two", 3);
    let (_, _, n2) = executes(&out, "a")[0].clone();
    // Crash: the state comes back from a checkpoint; the new process starts.
    let bytes = s.core.checkpoint().unwrap();
    s.core = Controller::restore(&bytes).unwrap();
    s.now += 2_000;
    let config = Config { manager_id: "ctl".into(), ..Config::default() };
    s.run(Event::ControllerStarted { config });
    // The worker comes back and re-subscribes: the manager asks about both attempts.
    let out = s.worker("a", 7, 2);
    let pings: Vec<(String, Vec<v1::TaskId>)> = to(&out, "a")
        .into_iter()
        .filter_map(|(rid, p)| match p {
            Payload::TasksPingV1Req(r) => Some((rid, r.tasks)),
            _ => None,
        })
        .collect();
    assert_eq!(pings.len(), 1, "{out:?}");
    assert_eq!(executes(&out, "a").len(), 0, "nothing is dispatched again on reconnect");
    let (rid, asked) = pings[0].clone();
    assert_eq!(asked.len(), 2);
    // t1 is still running there; t2 the worker never got (lost with the crash).
    use v1::task_status::Status;
    let pong = v1::TasksPongV1Reply {
        tasks: vec![
            v1::TaskStatus {
                task: Some(v1::TaskId { id: t1.clone(), attempt: n1 }),
                status: Some(Status::Started(v1::task_status::Started { started_at_ms: 5 })),
            },
            v1::TaskStatus {
                task: Some(v1::TaskId { id: t2.clone(), attempt: n2 }),
                status: Some(Status::Unknown(v1::task_status::Unknown {})),
            },
        ],
    };
    s.msg("a", 7, &rid, pong);
    assert_eq!(s.status(&t1).state, "running");
    assert_eq!(s.status(&t1).attempts, 1, "t1 is not started twice");
    let t = s.status(&t2);
    assert_eq!((t.state.as_str(), t.history[0].outcome.as_str()), ("queued", "lost"));
    let out = s.at(600);
    let again = executes(&out, "a");
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].1.as_str(), again[0].2), (t2.as_str(), n2 + 1), "t2 gets a new attempt");
}

#[test]
fn abort_tells_the_worker_and_bad_specs_are_refused() {
    let mut s = Script::new();
    s.worker("w", 1, 1);
    let (id, _) = s.submit("/bin/sleep", 3);
    let out = s.cli(v1::ControllerTaskAbortV1Req { id: id.clone() });
    assert!(names(&to(&out, "w")).contains(&"TasksAbortV1Req".to_owned()));
    assert_eq!(s.status(&id).state, "aborted");
    let out = s.cli(v1::ControllerTaskRunV1Req { job_addr: String::new(), timeout_ms: 1, ..Default::default() });
    let refused = out.iter().any(|o| match o {
        Output::ToCli { msg, .. } => {
            matches!(payload(&msg.response), Payload::UnknownCommandV1Notify(u) if u.reason.contains("job address"))
        }
        _ => false,
    });
    assert!(refused, "{out:?}");
}

/// The refusal a `ControllerTaskRunV1Req` got, if it was refused.
fn refusal(out: &[Output]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Output::ToCli { msg, .. } => match payload(&msg.response) {
            Payload::UnknownCommandV1Notify(u) => Some(u.reason),
            _ => None,
        },
        _ => None,
    })
}

#[test]
fn jobs_no_registered_worker_could_run_are_refused_at_submission() {
    let mut s = Script::new();
    let run = |job: &str, cores: u32| v1::ControllerTaskRunV1Req {
        job_addr: job.into(),
        timeout_ms: 1_000,
        cores,
        max_attempts: 1,
        ..Default::default()
    };
    // Not an absolute path nor a URL: refused whatever the workers.
    let why = refusal(&s.cli(run("echo", 1))).expect("a relative job is refused");
    assert!(why.contains("absolute path"), "{why}");
    s.connect("w", 1, true);
    let sub = v1::ManagerV1Req {
        cores: 2,
        memory_mb: 1024,
        labels: Default::default(),
        manager_id: "ctl".into(),
        allow_jobs: vec!["/bin/".into(), "/usr/bin/".into()],
    };
    s.msg("w", 1, "w1", sub);
    let why = refusal(&s.cli(run("/bin/echo", 4))).expect("more cores than any worker has");
    assert!(why.contains("needs 4 cores, has 2"), "{why}");
    let why = refusal(&s.cli(run("/opt/job", 1))).expect("outside every worker's allowed jobs");
    assert!(why.contains("runs only jobs under /bin/, /usr/bin/"), "{why}");
    assert_eq!(refusal(&s.cli(run("/bin/echo", 2))), None, "a job a worker can run is accepted");
    assert_eq!(refusal(&s.cli(run("https://example.test/job", 1))), None, "prefixes are for paths, not URLs");
    let why = refusal(&s.cli(run("/bin/../opt/job", 1))).expect("`..` is refused");
    assert!(why.contains("`..`"), "{why}");
}

#[test]
fn a_task_no_worker_takes_fails_after_unplaceable_after_with_the_reason() {
    // No worker at all: it waits, then fails saying so.
    let mut s = Script::new();
    let (id, _) = s.submit("/bin/true", 1);
    s.at(59_000);
    assert_eq!(s.status(&id).state, "queued");
    s.at(1_500);
    let t = s.status(&id);
    assert_eq!(t.state, "failed", "{t:?}");
    assert!(t.error.contains("no worker is registered"), "{}", t.error);

    // A worker that refuses it every time: asked again with a growing pause, the
    // refusal rows stay bounded, and it fails with the worker's reason.
    let mut s = Script::new();
    s.worker("w", 1, 2);
    let (id, mut out) = s.submit("/bin/true", 1);
    let mut refused = 0;
    for _ in 0..200 {
        for (rid, _, _) in executes(&out, "w") {
            refused += 1;
            s.msg("w", 1, &rid, v1::TasksRefusedV1Reply { reason: "disk full".into() });
        }
        if s.status(&id).state == "failed" {
            break;
        }
        out = s.pass(500, &[("w", 1)]);
    }
    let t = s.status(&id);
    assert_eq!(t.state, "failed", "{t:?}");
    assert!(t.error.contains("refused: disk full"), "{}", t.error);
    assert!((3..=12).contains(&refused), "asked again with a growing pause, not every second: {refused}");
    let rows = t.history.iter().filter(|h| h.outcome == "refused").count();
    assert!(rows <= 8, "refusal rows are bounded: {rows}");
}
