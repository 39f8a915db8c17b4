//! End to end task throughput: a controller in this process (journal fsync on), 8
//! `drover node --worker` processes on loopback, each running real `/bin/true`
//! processes. Tasks are submitted by concurrent CLI sessions; the figure is tasks
//! completed per second from the first submission to the last completion, and the
//! submit→completed latency of each task as the controller stamped it (its submit input
//! and its completion report input).

use std::time::{Duration, Instant};

use drover_proto::{Payload, v1};

async fn counts(ctx: &drover_cli::Ctx) -> v1::TaskCounts {
    let out = drover_cli::request(ctx, vec![], v1::ControllerTaskListV1Req { state: String::new(), limit: 1 }.into())
        .await
        .unwrap();
    out.replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerTaskListV1Reply(l) => l.counts,
            _ => None,
        })
        .unwrap_or_default()
}

pub async fn run(tasks: usize, workers: usize, cores: u32, submitters: usize) {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::start_controller(dir.path(), |_| {}).await;
    let ctx = b.ctx();
    let mut procs = Vec::new();
    for i in 0..workers {
        procs.push(
            std::process::Command::new(crate::drover_bin())
                .args([
                    "node",
                    "--admission",
                    &b.admission.to_string(),
                    "--token",
                    &b.join,
                    "--worker",
                    "--cores",
                    &cores.to_string(),
                    "--name",
                    &format!("bench-worker-{i}"),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn drover node (build it: cargo build --release -p drover)"),
        );
    }
    let task = || v1::ControllerTaskRunV1Req {
        job_addr: "/bin/true".into(),
        timeout_ms: 60_000,
        cores: 1,
        max_attempts: 3,
        ..Default::default()
    };
    // Wait until every worker is subscribed: a burst of probes runs everywhere.
    loop {
        let out = drover_cli::request(&ctx, vec![], v1::ControllerListNodesV1Req {}.into()).await.unwrap();
        let online = out
            .replies
            .iter()
            .filter_map(|r| match &r.payload {
                Payload::ControllerListNodesV1Reply(l) => Some(l.nodes.iter().filter(|n| n.state == "online").count()),
                _ => None,
            })
            .sum::<usize>();
        if online == workers {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counts(&ctx).await.completed;
    let started = Instant::now();
    let per = tasks / submitters;
    let mut handles = Vec::new();
    for _ in 0..submitters {
        let ctx = ctx.clone();
        handles.push(tokio::spawn(async move {
            let mut s = drover_cli::Session::open(&ctx).await.unwrap();
            for _ in 0..per {
                s.request(&ctx, vec![], task().into(), false).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let submitted = started.elapsed();
    let total = per * submitters;
    loop {
        let c = counts(&ctx).await;
        if c.completed + c.failed >= before + total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let out = drover_cli::request(
        &ctx,
        vec![],
        v1::ControllerTaskListV1Req { state: String::new(), limit: total as u32 }.into(),
    )
    .await
    .unwrap();
    let infos: Vec<v1::TaskInfo> = out
        .replies
        .into_iter()
        .find_map(|r| match r.payload {
            Payload::ControllerTaskListV1Reply(l) => Some(l.tasks),
            _ => None,
        })
        .unwrap_or_default();
    let mut lat: Vec<f64> = infos
        .iter()
        .filter(|t| t.state == "completed")
        .map(|t| (t.finished_at_ms - t.submitted_at_ms) as f64)
        .collect();
    lat.sort_by(f64::total_cmp);
    let failed = infos.iter().filter(|t| t.state != "completed").count();
    println!(
        "| {workers} workers x {cores} cores, {submitters} submitters | {total} | {:.1} s | {:.0} | {:.0} | {:.0} | {:.0} | {failed} |",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        total as f64 / submitted.as_secs_f64(),
        crate::percentile(&lat, 0.5),
        crate::percentile(&lat, 0.99),
    );
    eprintln!("(columns: setup | tasks | wall | completed/s | submitted/s | p50 ms | p99 ms | failed)");
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
    let _ = b.stop.send(());
}
