//! The worker's side of seed 2, one test per row of the seed's message table (what
//! the worker answers, with and without a manager), driven through the sans-IO
//! `Worker` without sockets or processes.

use drover_node::worker::{Action, Worker, WorkerConfig};
use drover_proto::{Payload, v1};

fn worker() -> Worker {
    let mut c = WorkerConfig::new("w1", 2, 1024);
    c.allow_managers = vec!["ctl".into()];
    Worker::new(c)
}

fn sent(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Send { payload, .. } => payload.name().to_owned(),
            Action::Start(s) => format!("start {}", s.task.as_ref().unwrap().id),
            Action::Kill(id) => format!("kill {}", id.id),
        })
        .collect()
}

/// A worker managed by "ctl".
fn managed() -> Worker {
    let mut w = worker();
    let out = w.session_opened(0);
    assert_eq!(sent(&out), ["NodeTypeV1Req"], "a new session asks the controller's type");
    let out =
        w.on_message("r", v1::NodeTypeV1Reply { node_type: v1::NodeType::Manager as i32, id: "ctl".into() }.into());
    let Some(Action::Send { request_id, payload: Payload::ManagerV1Req(req) }) = out.first() else { panic!("{out:?}") };
    assert_eq!((req.cores, req.memory_mb, req.manager_id.as_str()), (2, 1024, "ctl"));
    let rid = request_id.clone();
    assert!(w.on_message(&rid, v1::ManagerV1Reply { accepted: true }.into()).is_empty());
    assert_eq!(w.manager(), Some("ctl"));
    w
}

fn spec(id: &str, job: &str, cores: u32) -> v1::TaskSpec {
    v1::TaskSpec {
        task: Some(v1::TaskId { id: id.into(), attempt: 1 }),
        job_addr: job.into(),
        cores,
        timeout_ms: 1000,
        ..Default::default()
    }
}

fn execute(w: &mut Worker, specs: Vec<v1::TaskSpec>) -> Vec<Action> {
    w.on_message("x", v1::TasksExecuteV1Req { tasks: specs }.into())
}

#[test]
fn node_type_request_is_answered_with_the_workers_type() {
    let mut w = worker();
    let out = w.on_message("q", v1::NodeTypeV1Req { node_type: v1::NodeType::Manager as i32, id: "ctl".into() }.into());
    match &out[..] {
        [Action::Send { request_id, payload: Payload::NodeTypeV1Reply(r) }] => {
            assert_eq!((request_id.as_str(), r.node_type, r.id.as_str()), ("q", v1::NodeType::Worker as i32, "w1"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn manager_request_goes_only_to_an_allowed_manager() {
    let mut w = worker();
    w.session_opened(0);
    let reply = |t: v1::NodeType, id: &str| Payload::from(v1::NodeTypeV1Reply { node_type: t as i32, id: id.into() });
    assert!(w.on_message("r", reply(v1::NodeType::Manager, "stranger")).is_empty(), "not in --manager");
    assert!(w.on_message("r", reply(v1::NodeType::Worker, "ctl")).is_empty(), "a worker cannot manage");
    assert_eq!(sent(&w.on_message("r", reply(v1::NodeType::Manager, "ctl"))), ["ManagerV1Req"]);
}

#[test]
fn manager_answer_false_leaves_it_unmanaged_and_a_second_manager_gets_bye() {
    let mut w = worker();
    w.session_opened(0);
    let out =
        w.on_message("r", v1::NodeTypeV1Reply { node_type: v1::NodeType::Manager as i32, id: "ctl".into() }.into());
    let Some(Action::Send { request_id, .. }) = out.first() else { panic!() };
    assert!(w.on_message(request_id, v1::ManagerV1Reply { accepted: false }.into()).is_empty());
    assert_eq!(w.manager(), None);
    // A manager that accepts this worker without being asked gets ManagerBye: the
    // worker cannot be its worker.
    let mut w = worker();
    assert_eq!(sent(&w.on_message("unasked", v1::ManagerV1Reply { accepted: true }.into())), ["ManagerByeV1Req"]);
    assert_eq!(w.manager(), None);
    // A managed worker does not ask another manager, even an allowed one.
    let mut c = WorkerConfig::new("w2", 1, 1);
    c.allow_managers = vec![];
    let mut w = Worker::new(c);
    let out =
        w.on_message("r", v1::NodeTypeV1Reply { node_type: v1::NodeType::Manager as i32, id: "ctl".into() }.into());
    let Some(Action::Send { request_id, .. }) = out.first() else { panic!() };
    assert!(w.on_message(request_id, v1::ManagerV1Reply { accepted: true }.into()).is_empty());
    let out =
        w.on_message("r", v1::NodeTypeV1Reply { node_type: v1::NodeType::Manager as i32, id: "other".into() }.into());
    assert!(out.is_empty(), "already managed by ctl");
    assert_eq!(w.manager(), Some("ctl"));
}

#[test]
fn a_worker_asked_to_manage_says_false() {
    let mut w = managed();
    let out = w.on_message("q", v1::ManagerV1Req { cores: 1, ..Default::default() }.into());
    assert!(matches!(
        &out[..],
        [Action::Send { payload: Payload::ManagerV1Reply(v1::ManagerV1Reply { accepted: false }), .. }]
    ));
}

#[test]
fn without_a_manager_every_relationship_request_gets_not_mine() {
    let mut w = worker();
    for p in [
        Payload::from(v1::ManagerPingV1Req {}),
        v1::TasksExecuteV1Req { tasks: vec![spec("t1", "/bin/true", 1)] }.into(),
        v1::TasksPingV1Req::default().into(),
        v1::TasksAbortV1Req::default().into(),
    ] {
        let name = p.name().to_owned();
        assert_eq!(sent(&w.on_message("q", p)), ["NotMineV1Reply"], "{name}");
    }
}

#[test]
fn ping_from_the_manager_gets_pong() {
    let mut w = managed();
    assert_eq!(sent(&w.on_message("q", v1::ManagerPingV1Req {}.into())), ["ManagerPongV1Reply"]);
}

#[test]
fn execute_refuses_disallowed_jobs_and_overcommit_and_is_idempotent() {
    let mut w = managed();
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "/etc/passwd", 1)])), ["TasksRefusedV1Reply"]);
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "/bin/../etc/x", 1)])), ["TasksRefusedV1Reply"]);
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "relative", 1)])), ["TasksRefusedV1Reply"]);
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "/bin/true", 3)])), ["TasksRefusedV1Reply"], "2 cores only");
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "/bin/true", 2)])), ["AckV1Reply", "start t1"]);
    assert_eq!(sent(&execute(&mut w, vec![spec("t1", "/bin/true", 2)])), ["AckV1Reply"], "a repeat starts nothing");
    assert_eq!(sent(&execute(&mut w, vec![spec("t2", "/bin/true", 1)])), ["TasksRefusedV1Reply"], "full");
    assert_eq!(sent(&execute(&mut w, vec![spec("t3", "http://x/job", 0)])).len(), 1, "URLs are allowed");
}

#[test]
fn reports_repeat_until_acknowledged_then_the_task_is_forgotten() {
    let mut w = managed();
    execute(&mut w, vec![spec("t1", "/bin/true", 1)]);
    let id = v1::TaskId { id: "t1".into(), attempt: 1 };
    let out = w.started(&id, 5, 100);
    assert_eq!(sent(&out), ["TaskStartedV1Req"]);
    let Action::Send { request_id: started_rid, .. } = &out[0] else { panic!() };
    let started_rid = started_rid.clone();
    let out = w.finished(&id, Ok(v1::TaskOutcome { exit_code: 0, ..Default::default() }), 200);
    assert_eq!(sent(&out), ["TaskCompletedV1Req"]);
    let Action::Send { request_id: done_rid, .. } = &out[0] else { panic!() };
    let done_rid = done_rid.clone();
    assert!(w.tick(900).is_empty(), "not yet due");
    let mut repeated = sent(&w.tick(1_300));
    repeated.sort();
    assert_eq!(repeated, ["TaskCompletedV1Req", "TaskStartedV1Req"], "both reports repeat after 1 s");
    // Ping: completed with its outcome.
    let pong = w.on_message("p", v1::TasksPingV1Req { tasks: vec![id.clone()] }.into());
    let Some(Action::Send { payload: Payload::TasksPongV1Reply(p), .. }) = pong.first() else { panic!() };
    assert!(matches!(p.tasks[0].status, Some(v1::task_status::Status::Completed(_))));
    // Acknowledged: no more repeats, and the worker forgets it.
    w.on_message(&started_rid, v1::AckV1Reply {}.into());
    w.on_message(&done_rid, v1::AckV1Reply {}.into());
    assert!(w.tick(10_000).is_empty());
    let pong = w.on_message("p", v1::TasksPingV1Req { tasks: vec![id] }.into());
    let Some(Action::Send { payload: Payload::TasksPongV1Reply(p), .. }) = pong.first() else { panic!() };
    assert!(matches!(p.tasks[0].status, Some(v1::task_status::Status::Unknown(_))));
    assert_eq!(w.held(), 0);
}

#[test]
fn abort_kills_and_bye_or_not_mine_end_the_relationship() {
    let mut w = managed();
    execute(&mut w, vec![spec("t1", "/bin/sleep", 1)]);
    let out = w.on_message("a", v1::TasksAbortV1Req { tasks: vec![v1::TaskId { id: "t1".into(), attempt: 1 }] }.into());
    assert_eq!(sent(&out), ["AckV1Reply", "kill t1"]);
    // ManagerBye: Ack, tasks stopped, no manager.
    execute(&mut w, vec![spec("t2", "/bin/sleep", 1)]);
    let out = w.on_message("b", v1::ManagerByeV1Req {}.into());
    assert_eq!(sent(&out), ["AckV1Reply", "kill t1", "kill t2"]);
    assert_eq!(w.manager(), None);
    // NotMine in answer to a report: the manager disowned us.
    let mut w = managed();
    execute(&mut w, vec![spec("t3", "/bin/sleep", 1)]);
    let out = w.started(&v1::TaskId { id: "t3".into(), attempt: 1 }, 1, 1);
    let Action::Send { request_id, .. } = &out[0] else { panic!() };
    let out = w.on_message(request_id, v1::NotMineV1Reply {}.into());
    assert_eq!(sent(&out), ["kill t3"]);
    assert_eq!(w.manager(), None);
}
