//! The task plane with real processes: a `drover controller`, `drover node --worker`s
//! running real jobs, the `drover task` CLI. Timeouts, aborts and downloads are checked
//! against the processes themselves (scanning /proc), the download server is a local
//! HTTP server in the test. (Exactly once across controller SIGKILLs is in `chaos.rs`.)

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Controller, Killed, wait_until};
use serde_json::Value;
use std::process::Command;

/// Processes whose command line contains `needle` as an argument.
fn processes_with(needle: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
        .count()
}

fn status(c: &Controller, id: &str) -> Value {
    let out = c.cli(&["task", "status", "--json", id]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn wait_state(c: &Controller, id: &str, state: &str, limit: Duration) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(limit, || {
        last = status(c, id);
        last["state"] == state
    });
    assert!(ok, "{id} did not reach {state}: {last}");
    last
}

/// A controller with `workers` worker nodes (cores each) that are subscribed.
fn fleet(dir: &Path, workers: &[(&str, u32)], extra: &[&str]) -> (Controller, Vec<Killed>) {
    let mut c = Controller::new(dir, extra);
    c.start();
    let token = c.join_token();
    let cache = dir.join("cache");
    let procs = workers
        .iter()
        .map(|(name, cores)| {
            c.node(
                dir,
                name,
                &token,
                &["--worker", "--cores", &cores.to_string(), "--job-cache", cache.to_str().unwrap()],
            )
        })
        .collect();
    // Subscribed once a task can run.
    let probe = c.task_run(&["--", "/bin/true"]);
    wait_state(&c, &probe, "completed", Duration::from_secs(20));
    (c, procs)
}

#[test]
fn echo_completes_with_its_output_and_a_timeout_kills_the_whole_job() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _workers) = fleet(dir.path(), &[("w1", 2)], &[]);
    // /bin/echo hi: completed, exit 0, output "hi".
    let out = c.cli(&["task", "run", "--wait", "--", "/bin/echo", "hi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let id = stdout.lines().next().unwrap().to_owned();
    assert_eq!(stdout.lines().nth(1), Some("hi"), "{stdout}");
    let logs = c.cli(&["task", "logs", &id]);
    assert_eq!(String::from_utf8(logs.stdout).unwrap(), "hi\n");
    let s = status(&c, &id);
    assert_eq!((s["state"].as_str(), s["exit_code"].as_i64()), (Some("completed"), Some(0)), "{s}");

    // A job's exit code comes back through --wait.
    let out = c.cli(&["task", "run", "--wait", "--", "/bin/sh", "-c", "echo oops >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));

    // sleep 100 with --timeout 1s: TimedOut within 2 s, and nothing of it is left. The
    // job is a shell that starts its own child, so the whole process group must go.
    let marker = "100.0417";
    let started = Instant::now();
    let out = c.cli(&[
        "task",
        "run",
        "--wait",
        "--task-timeout",
        "1s",
        "--attempts",
        "1",
        "--",
        "/bin/sh",
        "-c",
        "/bin/sleep $0; true",
        marker,
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "a timed-out task exits 1");
    assert!(took < Duration::from_secs(2) + Duration::from_millis(500), "took {took:?}");
    let id = String::from_utf8(out.stdout).unwrap().lines().next().unwrap().to_owned();
    let s = status(&c, &id);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("timed out"), "{s}");
    assert!(wait_until(Duration::from_secs(2), || processes_with(marker) == 0), "the job's processes outlived it");
    eprintln!("timeout reported after {took:?}");

    // Output beyond the bound is cut with a marker.
    let out = c.cli(&["task", "run", "--wait", "--", "/bin/sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[drover: output truncated, 1951424 more bytes dropped]"), "{}", &text[text.len() - 200..]);
}

#[test]
fn abort_kills_a_running_task() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _workers) = fleet(dir.path(), &[("w1", 1)], &[]);
    let marker = "100.0418";
    let id = c.task_run(&["--", "/bin/sleep", marker]);
    wait_state(&c, &id, "running", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || processes_with(marker) == 1), "the job did not start");
    let out = c.cli(&["task", "abort", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&c, &id)["state"], "aborted");
    assert!(wait_until(Duration::from_secs(5), || processes_with(marker) == 0), "abort did not kill the job");
    // A second abort says it is already over.
    assert!(!c.cli(&["task", "abort", &id]).status.success());
    // The core is free again.
    let next = c.task_run(&["--", "/bin/true"]);
    wait_state(&c, &next, "completed", Duration::from_secs(10));
}

/// Serves `body` at `/job` and 404 elsewhere, until the test ends.
fn serve(body: &'static [u8]) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let response = if req.starts_with("GET /job ") {
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                    .into_bytes();
                r.extend_from_slice(body);
                r
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            let _ = s.write_all(&response);
        }
    });
    port
}

#[test]
fn downloaded_jobs_run_when_their_digest_matches_and_fail_with_download_error_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _workers) = fleet(dir.path(), &[("w1", 2)], &[]);
    const SCRIPT: &[u8] = b"#!/bin/sh\necho downloaded \"$@\"\n";
    let port = serve(SCRIPT);
    let url = format!("http://127.0.0.1:{port}/job");
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(SCRIPT).iter().map(|b| format!("{b:02x}")).collect()
    };
    // Right digest: it runs with its arguments.
    let out = c.cli(&["task", "run", "--wait", "--sha256", &digest, "--", &url, "a", "b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("downloaded a b"));
    // Wrong digest: DownloadError.
    let wrong = "0".repeat(64);
    let id = c.task_run(&["--attempts", "1", "--sha256", &wrong, "--", &url]);
    let s = wait_state(&c, &id, "failed", Duration::from_secs(10));
    assert!(
        s["error"].as_str().unwrap().contains("download error")
            && s["error"].as_str().unwrap().contains("sha256 mismatch"),
        "{s}"
    );
    // A URL that answers 404, and one where nobody listens: DownloadError.
    for bad in [format!("http://127.0.0.1:{port}/missing"), format!("http://127.0.0.1:{}/job", common::free_port())] {
        let id = c.task_run(&["--attempts", "1", "--", &bad]);
        let s = wait_state(&c, &id, "failed", Duration::from_secs(10));
        assert!(s["error"].as_str().unwrap().starts_with("download error"), "{bad}: {s}");
    }
}

#[test]
fn a_sigkilled_worker_s_attempt_is_retried_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (c, mut workers) = fleet(dir.path(), &[("w1", 1)], &["--worker-grace", "1s"]);
    let marker = "3.0419";
    let id = c.task_run(&["--", "/bin/sleep", marker]);
    let s = wait_state(&c, &id, "running", Duration::from_secs(10));
    let first = s["worker"].as_str().unwrap().to_owned();
    // A second worker joins; the first dies mid-task.
    let token = c.join_token();
    let _w2 = c.node(dir.path(), "w2", &token, &["--worker", "--cores", "1"]);
    assert!(wait_until(Duration::from_secs(10), || common::worker_ready(c.http, "w2")), "w2 subscribes");
    workers[0].kill();
    let s = wait_state(&c, &id, "completed", Duration::from_secs(30));
    let history = s["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{s}");
    assert_eq!((history[0]["worker"].as_str(), history[0]["outcome"].as_str()), (Some(first.as_str()), Some("lost")));
    assert_ne!(history[1]["worker"].as_str(), Some(first.as_str()), "retried elsewhere: {s}");
    assert_eq!(history[1]["outcome"], "completed");
    // The orphan of the killed worker is not ours to wait for.
    let _ = Command::new("pkill").args(["-f", marker]).status();
}
