//! `drover task run|list|status|abort|logs`: the operator's side of the task plane.
//! Every command is one controller request; `run --wait` then follows the task with
//! status requests until it ends and exits with its exit code.

use std::io::Write;
use std::time::Duration;

use drover_proto::{Payload, v1};
use serde_json::json;

use crate::client::{CliError, Ctx};
use crate::commands::{controller_reply, table};

fn info_json(t: &v1::TaskInfo) -> serde_json::Value {
    let spec = t.spec.clone().unwrap_or_default();
    json!({
        "id": t.id,
        "state": t.state,
        "job": spec.job_addr,
        "args": spec.args,
        "env": spec.env,
        "secret_env": spec.secret_env.keys().collect::<Vec<_>>(),
        "attempts": t.attempts,
        "max_attempts": spec.max_attempts,
        "worker": t.worker,
        "exit_code": t.exit_code,
        "error": t.error,
        "submitted_at_ms": t.submitted_at_ms,
        "finished_at_ms": t.finished_at_ms,
        "history": t.history.iter().map(|h| json!({
            "attempt": h.attempt, "worker": h.worker, "outcome": h.outcome,
            "dispatched_at_ms": h.dispatched_at_ms, "started_at_ms": h.started_at_ms,
            "finished_at_ms": h.finished_at_ms, "detail": h.detail,
        })).collect::<Vec<_>>(),
    })
}

async fn status_of(ctx: &Ctx, id: &str) -> Result<Option<v1::TaskInfo>, CliError> {
    let reply = controller_reply(ctx, v1::ControllerTaskStatusV1Req { id: id.to_owned() }.into(), |p| match p {
        Payload::ControllerTaskStatusV1Reply(r) => Some(r.task),
        _ => None,
    })
    .await?;
    Ok(reply.flatten())
}

fn terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "aborted")
}

/// `drover task run`: prints the task id; with `wait`, follows it and returns its exit
/// code (1 when it failed or was aborted). Without `wait`: 0 once accepted.
pub async fn run(ctx: &Ctx, req: v1::ControllerTaskRunV1Req, wait: bool) -> Result<i32, CliError> {
    let Some(id) = controller_reply(ctx, req.into(), |p| match p {
        Payload::ControllerTaskRunV1Reply(r) => Some(r.task_id),
        _ => None,
    })
    .await?
    else {
        return Ok(1);
    };
    if ctx.json && !wait {
        println!("{}", json!({ "id": id }));
    } else {
        println!("{id}");
    }
    if !wait {
        return Ok(0);
    }
    let mut last = String::new();
    loop {
        let Some(t) = status_of(ctx, &id).await? else {
            eprintln!("{id}: the controller no longer knows this task");
            return Ok(1);
        };
        let line = match t.history.last() {
            Some(h) if t.state == "running" => format!("{id}: running on {} (attempt {})", h.worker, h.attempt),
            _ if !t.error.is_empty() && t.state != "completed" => format!("{id}: {} ({})", t.state, t.error),
            _ => format!("{id}: {}", t.state),
        };
        if line != last {
            eprintln!("{}", crate::printable(&line));
            last = line;
        }
        if terminal(&t.state) {
            if t.state == "completed" {
                logs(ctx, &id).await?;
            }
            if ctx.json {
                println!("{}", info_json(&t));
            }
            return Ok(match (t.state.as_str(), t.exit_code) {
                ("completed", Some(code)) => code,
                _ => 1,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `drover task list [--state S]`.
pub async fn list(ctx: &Ctx, state: Option<String>, limit: u32) -> Result<bool, CliError> {
    let req = v1::ControllerTaskListV1Req { state: state.unwrap_or_default(), limit };
    let Some(r) = controller_reply(ctx, req.into(), |p| match p {
        Payload::ControllerTaskListV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if ctx.json {
        println!("{}", serde_json::Value::Array(r.tasks.iter().map(info_json).collect()));
        return Ok(true);
    }
    let rows: Vec<Vec<String>> = r
        .tasks
        .iter()
        .map(|t| {
            let spec = t.spec.clone().unwrap_or_default();
            vec![
                t.id.clone(),
                t.state.clone(),
                format!("{}/{}", t.attempts, spec.max_attempts),
                t.worker.clone(),
                t.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                format!("{} {}", spec.job_addr, spec.args.join(" ")).trim().to_owned(),
            ]
        })
        .collect();
    println!("{}", table(&["ID", "STATE", "ATTEMPTS", "WORKER", "EXIT", "JOB"], &rows));
    if let Some(c) = r.counts {
        eprintln!(
            "queued {}, running {}, completed {}, failed {}, aborted {}",
            c.queued, c.running, c.completed, c.failed, c.aborted
        );
    }
    Ok(true)
}

/// `drover task status ID`: exits 1 when there is no such task.
pub async fn status(ctx: &Ctx, id: &str) -> Result<bool, CliError> {
    let Some(t) = status_of(ctx, id).await? else {
        eprintln!("no task {id}");
        return Ok(false);
    };
    if ctx.json {
        println!("{}", info_json(&t));
        return Ok(true);
    }
    let spec = t.spec.clone().unwrap_or_default();
    println!("task      {}", t.id);
    println!("state     {}", t.state);
    println!("job       {}", crate::printable(&format!("{} {}", spec.job_addr, spec.args.join(" "))));
    if !spec.env.is_empty() || !spec.secret_env.is_empty() {
        let plain = spec.env.iter().map(|(k, v)| format!("{k}={v}"));
        let secret = spec.secret_env.keys().map(|k| format!("{k}=(secret)"));
        println!("env       {}", crate::printable(&plain.chain(secret).collect::<Vec<_>>().join(" ")));
    }
    println!("attempts  {}/{}", t.attempts, spec.max_attempts);
    if let Some(c) = t.exit_code {
        println!("exit code {c}");
    }
    if !t.error.is_empty() {
        println!("error     {}", crate::printable(&t.error));
    }
    let rows: Vec<Vec<String>> = t
        .history
        .iter()
        .map(|h| vec![h.attempt.to_string(), h.worker.clone(), h.outcome.clone(), h.detail.clone()])
        .collect();
    if !rows.is_empty() {
        println!("{}", table(&["ATTEMPT", "WORKER", "OUTCOME", "DETAIL"], &rows));
    }
    Ok(true)
}

/// `drover task abort ID…`.
pub async fn abort(ctx: &Ctx, ids: &[String]) -> Result<bool, CliError> {
    let mut all = true;
    for id in ids {
        let Some(r) = controller_reply(ctx, v1::ControllerTaskAbortV1Req { id: id.to_owned() }.into(), |p| match p {
            Payload::ControllerTaskAbortV1Reply(r) => Some(r),
            _ => None,
        })
        .await?
        else {
            return Ok(false);
        };
        if r.aborted {
            println!("{id}: aborted");
        } else {
            eprintln!("{id}: not aborted (it is {})", r.state);
            all = false;
        }
    }
    Ok(all)
}

/// `drover task logs ID`: the task's stdout to stdout, its stderr to stderr.
pub async fn logs(ctx: &Ctx, id: &str) -> Result<bool, CliError> {
    let Some(r) = controller_reply(ctx, v1::ControllerTaskLogsV1Req { id: id.to_owned() }.into(), |p| match p {
        Payload::ControllerTaskLogsV1Reply(r) => Some(r),
        _ => None,
    })
    .await?
    else {
        return Ok(false);
    };
    if !r.found {
        eprintln!("no task {id}");
        return Ok(false);
    }
    if let Some(o) = &r.outcome {
        let _ = std::io::stdout().write_all(&o.stdout);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(&o.stderr);
    }
    if !r.note.is_empty() {
        eprintln!("({})", r.note);
    }
    Ok(r.outcome.is_some())
}
