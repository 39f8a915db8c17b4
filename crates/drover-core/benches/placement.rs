//! Placement throughput of the core alone: 1,000 workers with 64 cores each.
//!
//! Phase 1 submits 64,000 one-core tasks while every worker has room (each submission
//! is one input: validate, queue, place, emit `TasksExecuteV1Req`). Phase 2 queues
//! 64,000 more, then feeds one `TaskCompletedV1Req` per running task: each completion
//! frees a core and the next queued task is placed in the same input. Inputs are built
//! before the clock starts; the figures are `Controller::handle` alone.
//!
//! `cargo bench -p drover-core --bench placement` (BENCH_WORKERS, BENCH_CORES to vary).

use std::time::Instant;

use drover_core::{Config, Controller, Event, Input, Output};
use drover_proto::{Payload, v1};

fn submit(i: usize) -> Event {
    let run = v1::ControllerTaskRunV1Req {
        job_addr: "/bin/true".into(),
        args: vec![format!("{i}")],
        timeout_ms: 600_000,
        cores: 1,
        max_attempts: 3,
        ..Default::default()
    };
    Event::cli_message(1, &format!("s{i}"), "bench", vec![], run)
}

fn main() {
    let workers: usize = std::env::var("BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let cores: u32 = std::env::var("BENCH_CORES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let slots = workers * cores as usize;
    let config = Config { manager_id: "ctl".into(), ..Config::default() };
    let mut core = Controller::new(config.clone());
    let now = 1_000_000;
    let mut out: Vec<Output> = Vec::new();
    let apply = |core: &mut Controller, event: Event, out: &mut Vec<Output>| {
        core.handle(Input { at_ms: now, event }, out);
    };
    apply(&mut core, Event::ControllerStarted { config }, &mut out);
    apply(&mut core, Event::CliConnected { session: 1, role: drover_core::OperatorRole::Admin }, &mut out);
    for w in 0..workers {
        let node = format!("w{w:04}");
        let s = w as u64 + 10;
        apply(&mut core, Event::NodeConnected { node: node.clone(), session: s }, &mut out);
        let hello =
            v1::NodeKnownCurrenciesV1Notify { pairs: vec![], name: node.clone(), version: "1".into(), worker: true };
        apply(&mut core, Event::node_message(&node, s, "", hello), &mut out);
        let req = v1::ManagerV1Req {
            cores,
            memory_mb: 1 << 20,
            labels: Default::default(),
            manager_id: "ctl".into(),
            allow_jobs: vec![],
        };
        apply(&mut core, Event::node_message(&node, s, "m", req), &mut out);
    }
    out.clear();

    // Phase 1: submissions placed at once.
    let events: Vec<Event> = (0..slots).map(submit).collect();
    let started = Instant::now();
    for e in events {
        apply(&mut core, e, &mut out);
    }
    let took = started.elapsed();
    let mut running: Vec<(String, u64, v1::TaskId)> = Vec::new();
    for o in out.drain(..) {
        if let Output::ToNode { node, session, msg } = o
            && let Some(any) = &msg.command
            && let Ok(Payload::TasksExecuteV1Req(r)) = Payload::from_any(any)
        {
            running.push((node, session, r.tasks[0].task.clone().unwrap()));
        }
    }
    assert_eq!(running.len(), slots, "every submission placed");
    let rate1 = slots as f64 / took.as_secs_f64();
    println!(
        "phase 1: {slots} submissions placed on {workers} workers x {cores} cores in {:.3} s: {:.0} tasks placed/s ({:.2} µs each)",
        took.as_secs_f64(),
        rate1,
        took.as_secs_f64() * 1e6 / slots as f64
    );

    // Phase 2: a full queue drained by completions.
    for i in 0..slots {
        apply(&mut core, submit(slots + i), &mut out);
    }
    out.clear();
    assert_eq!(core.task_gauges().queued, slots as u64);
    let reports: Vec<Event> = running
        .iter()
        .map(|(node, session, id)| {
            let done = v1::TaskCompletedV1Req {
                task: Some(id.clone()),
                outcome: Some(v1::TaskOutcome { exit_code: 0, ..Default::default() }),
            };
            Event::node_message(node, *session, "r", done)
        })
        .collect();
    let started = Instant::now();
    for e in reports {
        apply(&mut core, e, &mut out);
    }
    let took = started.elapsed();
    let placed = out
        .iter()
        .filter(|o| matches!(o, Output::ToNode { msg, .. } if msg.command.as_ref().is_some_and(|a| a.type_url.ends_with("TasksExecuteV1Req"))))
        .count();
    assert_eq!(placed, slots, "each completion placed the next task");
    println!(
        "phase 2: {slots} completions, each placing a queued task, in {:.3} s: {:.0} tasks placed/s ({:.2} µs each)",
        took.as_secs_f64(),
        slots as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / slots as f64
    );
    let g = core.task_gauges();
    println!("state after: {} running, {} done, {} queued", g.running, g.done, g.queued);
}
