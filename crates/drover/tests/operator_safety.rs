//! Operator safety with real processes: what an operator can do by accident must not
//! lose data or hang. A second controller on a live data directory is refused, CLIs
//! keep one overall deadline (connect included) and name the port they reached when
//! it is the wrong kind, and output piped into `head` ends quietly.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Controller, cli_command, http_get, text, wait_until};

/// A started controller with one node named `name` (started with `extra`) that
/// `drover nodes` already lists, and the join token it used.
fn controller_with_node(dir: &std::path::Path, name: &str, extra: &[&str]) -> (Controller, common::Killed, String) {
    let mut c = Controller::new(dir, &[]);
    c.start();
    let token = c.join_token();
    let node = c.node(dir, name, &token, extra);
    assert!(wait_until(Duration::from_secs(15), || text(&c.cli(&["nodes"])).contains(name)), "{name} joined");
    (c, node, token)
}

#[test]
fn a_second_controller_on_a_live_data_directory_is_refused_and_acknowledged_writes_survive() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Controller::new(dir.path(), &[]);
    first.start();
    let pid = first.proc.as_ref().unwrap().pid();

    // The second one, on other ports, must refuse at once and touch nothing.
    let mut second = Controller::new(dir.path(), &[]);
    second.data = first.data.clone();
    let (g, a, h) = (
        format!("127.0.0.1:{}", second.grpc),
        format!("127.0.0.1:{}", second.admission),
        format!("127.0.0.1:{}", second.http),
    );
    let started = Instant::now();
    let out = Command::new(common::drover_bin())
        .args(["controller", "--listen", &g, "--admission", &a, "--http", &h, "--data-dir"])
        .arg(&first.data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "the second controller must not run: {said}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused at once, took {:?}", started.elapsed());
    assert!(said.contains(&first.data.display().to_string()), "the error names the directory: {said}");
    assert!(said.contains(&format!("pid {pid}")), "and the holder's pid: {said}");

    // The first keeps working; what it acknowledged survives kill -9 and restart.
    let token = first.cli(&["token", "create", "--role", "read", "--description", "survivor"]);
    assert!(token.status.success(), "{}", text(&token));

    // The read-only tools read without the lock and say a live process holds it.
    let verify = Command::new(common::drover_bin()).args(["journal", "verify"]).arg(&first.data).output().unwrap();
    let said = text(&verify);
    assert!(verify.status.success(), "{said}");
    assert!(said.contains("in use by a running process") && said.contains(&format!("pid {pid}")), "{said}");

    first.kill();
    first.start();
    let list = first.cli(&["token", "list"]);
    assert!(text(&list).contains("survivor"), "an acknowledged token survives: {}", text(&list));
}

#[test]
fn a_stopped_controller_cannot_hold_a_cli_past_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &[]);
    c.start();
    let pid = c.proc.as_ref().unwrap().pid().to_string();
    let signal = |sig: &str| assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    // SIGSTOP: the kernel still accepts connections, nobody answers.
    signal("-STOP");
    for args in [&["nodes", "--timeout", "1s"][..], &["status", "--all", "--timeout", "1s"][..]] {
        let started = Instant::now();
        let out = cli_command(c.grpc, &c.data, args).stdin(Stdio::null()).output().unwrap();
        let took = started.elapsed();
        assert!(!out.status.success(), "{args:?} cannot succeed against a stopped controller");
        assert!(took < Duration::from_secs(4), "{args:?} took {took:?} with --timeout 1s: {}", text(&out));
        assert!(text(&out).contains("no answer"), "{args:?} says why: {}", text(&out));
    }
    signal("-CONT");
}

#[test]
fn a_cli_pointed_at_the_admission_port_says_which_port_it_wants() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &[]);
    c.start();
    let started = Instant::now();
    let out = cli_command(c.admission, &c.data, &["nodes", "--timeout", "2s"]).stdin(Stdio::null()).output().unwrap();
    let said = text(&out);
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}: {said}", started.elapsed());
    assert!(said.contains("admission port") && said.contains("gRPC port"), "names both kinds of port: {said}");
}

#[test]
fn a_node_pointed_at_the_grpc_port_says_which_port_it_wants() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &[]);
    c.start();
    let token = c.join_token();
    let grpc = format!("127.0.0.1:{}", c.grpc);
    let log = dir.path().join("node.log");
    let _node =
        common::spawn(&["node", "--admission", &grpc, "--token", &token, "--name", "lost", "--pairs", "EURUSD"], &log);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            l.contains("gRPC port") && l.contains("admission port")
        }),
        "the node's log names the right port: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[test]
fn output_piped_into_a_closed_reader_ends_quietly() {
    // `drover completions bash | head -1`: the reader goes away after one line.
    let mut child = Command::new(common::drover_bin())
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "no panic on a closed pipe: {err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "ends like any Unix tool (exit 0 or SIGPIPE), not exit 101: {:?}",
        out.status
    );
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(out)))
}

#[test]
fn views_agree_on_a_pair_without_streamer_and_gone_nodes_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &["--node-timeout", "1s"]);
    c.start();
    let token = c.join_token();
    let mut node = c.node(dir.path(), "solo", &token, &["--pairs", "EURUSD"]);
    assert!(wait_until(Duration::from_secs(15), || { json(&c.cli(&["prices", "--json"]))[0]["streamer"].is_string() }));
    node.kill();
    // Nobody else knows EURUSD: every view says it has no streamer.
    assert!(
        wait_until(Duration::from_secs(10), || json(&c.cli(&["prices", "--json"]))[0]["streamer"].is_null()),
        "prices still names the gone streamer: {}",
        text(&c.cli(&["prices", "--json"]))
    );
    let prices = json(&c.cli(&["prices", "--json"]));
    assert!(prices[0]["source"].as_str().is_some_and(|s| !s.is_empty()), "the price keeps its source: {prices}");
    let table = text(&c.cli(&["prices"]));
    assert!(table.lines().any(|l| l.starts_with("EURUSD") && l.contains(" - ")), "no streamer shown as -: {table}");
    // The dashboard's view is republished at most every 250 ms.
    let fleet = || common::fleet_view(c.http);
    // The same view is judged throughout: EURUSD listed, with no streamer.
    let mut view = serde_json::Value::Null;
    let agreed = wait_until(Duration::from_secs(5), || {
        view = fleet();
        view["pairs"][0]["pair"] == "EURUSD" && view["pairs"][0]["streamer"].is_null()
    });
    assert!(agreed, "{view}");
    assert_eq!(view["pairs"][0]["epoch"], prices[0]["epoch"], "both name the last epoch issued: {view}");

    // The gone node is listed as gone, with when; forget removes it; a typo is an error.
    let nodes = text(&c.cli(&["nodes"]));
    assert!(nodes.lines().any(|l| l.contains("solo") && l.contains("gone") && l.contains("ago")), "{nodes}");
    let typo = c.cli(&["forget", "sloo"]);
    assert!(!typo.status.success() && text(&typo).contains("no node is named \"sloo\""), "{}", text(&typo));
    let forget = c.cli(&["forget", "solo"]);
    assert!(forget.status.success(), "{}", text(&forget));
    assert!(!text(&c.cli(&["nodes"])).contains("solo"), "forgotten nodes leave the listing");
}

#[test]
fn token_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _node, join) = controller_with_node(dir.path(), "n1", &["--pairs", "EURUSD"]);
    let as_token = |token: &str, args: &[&str]| {
        let out = cli_command(c.grpc, &c.data, args).env("DROVER_TOKEN", token).output().unwrap();
        (out.status.success(), text(&out))
    };
    let (ok, said) = as_token(&join, &["nodes"]);
    assert!(!ok && said.contains("join token, for nodes"), "{said}");
    let (ok, said) = as_token("dt1.0123456789ab.notthesecretatall", &["nodes"]);
    assert!(!ok && said.contains("unknown token"), "{said}");
    let (ok, said) = as_token("hello", &["nodes"]);
    assert!(!ok && said.contains("not a drover token"), "{said}");
    let read = String::from_utf8(c.cli(&["token", "create", "--role", "read"]).stdout).unwrap();
    let (ok, said) = as_token(read.trim(), &["kick", "nobody-at-all"]);
    assert!(!ok, "{said}");
    // Node names are resolved first; kick an existing node to reach the role check.
    let (ok, said) = as_token(read.trim(), &["kick", "n1"]);
    assert!(!ok && said.contains("`drover kick` needs an admin token"), "{said}");
    assert!(!said.contains("V1Req"), "no internal message names: {said}");
    // --uses is for join tokens (admissions); an operator token would never count down.
    let uses = c.cli(&["token", "create", "--role", "read", "--uses", "3"]);
    assert!(!uses.status.success() && text(&uses).contains("--uses"), "{}", text(&uses));
}

#[test]
fn tasks_no_worker_could_run_are_refused_at_once_and_abort_takes_several_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _worker, _) = controller_with_node(dir.path(), "w1", &["--pairs", "EURUSD", "--worker", "--cores", "1"]);
    // The worker subscribes right after joining.
    assert!(wait_until(Duration::from_secs(10), || common::worker_ready(c.http, "w1")), "w1 subscribes");
    let started = Instant::now();
    let out = c.cli(&["task", "run", "--wait", "--", "echo", "hi"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("absolute path"), "{}", text(&out));
    let out = c.cli(&["task", "run", "--", "/opt/not-allowed"]);
    assert!(!out.status.success() && text(&out).contains("runs only jobs under"), "{}", text(&out));
    let out = c.cli(&["task", "run", "--cores", "8", "--", "/bin/true"]);
    assert!(!out.status.success() && text(&out).contains("needs 8 cores, has 1"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not after waiting");
    // Two queued tasks (the worker is busy with a sleeper), aborted in one command.
    let sleeper = c.task_run(&["--", "/bin/sleep", "30"]);
    let a = c.task_run(&["--", "/bin/true"]);
    let b = c.task_run(&["--", "/bin/true"]);
    let out = c.cli(&["task", "abort", &a, &b, &sleeper]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for id in [&a, &b, &sleeper] {
        assert!(said.contains(&format!("{id}: aborted")), "{said}");
    }
}

/// Runs promtool (Debian's `prometheus` package; `.ci/run` installs it) on `input`.
fn promtool(args: &[&str], input: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); install it: apt-get install prometheus"));
    if let Some(text) = input {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

#[test]
fn metrics_and_the_shipped_alert_rules_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _node, _) = controller_with_node(dir.path(), "m1", &["--pairs", "EURUSD", "--worker", "--cores", "1"]);
    let raw = http_get(c.http, "/metrics");
    let body = &raw[raw.find("\r\n\r\n").unwrap() + 4..];
    for family in ["drover_build_info{version=", "process_resident_memory_bytes", "drover_journal_failed 0"] {
        assert!(body.contains(family), "{family} missing:\n{body}");
    }
    let (ok, said) = promtool(&["check", "metrics"], Some(body));
    assert!(ok && said.trim().is_empty(), "promtool check metrics found problems:\n{said}");
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/prometheus/drover-alerts.yml");
    let (ok, said) = promtool(&["check", "rules", rules], None);
    assert!(ok && said.contains("SUCCESS"), "promtool check rules: {said}");
}

#[test]
fn nodes_of_a_controller_listening_on_every_address_are_told_a_reachable_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &[]);
    c.bind = "0.0.0.0".into();
    c.start();
    let token = c.join_token();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut config =
        drover_node::NodeConfig::new(format!("127.0.0.1:{}", c.admission), token, vec!["EURUSD".to_owned()]);
    config.version = env!("CARGO_PKG_VERSION").into();
    let (upstream, _ticket, _control) = runtime.block_on(drover_node::admit_session(&config)).expect("admitted");
    assert_eq!(upstream, format!("127.0.0.1:{}", c.grpc), "not 0.0.0.0: the address the node reached");
}

#[test]
fn a_price_watch_outlives_a_controller_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Controller::new(dir.path(), &[]);
    c.start();
    let token = c.join_token();
    let _node = c.node(dir.path(), "w", &token, &["--pairs", "EURUSD"]);
    let out = dir.path().join("watch.out");
    let err = dir.path().join("watch.err");
    let mut watch = cli_command(c.grpc, &c.data, &["prices", "--watch", "--json", "--duration", "40s"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let lines = || std::fs::read_to_string(&out).unwrap_or_default().lines().count();
    assert!(wait_until(Duration::from_secs(15), || lines() >= 3), "the watch shows prices");
    c.kill();
    c.start();
    let before = lines();
    assert!(
        wait_until(Duration::from_secs(20), || lines() > before + 2),
        "the watch goes on after the restart: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let said = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(said.contains("reconnecting") && said.contains("reconnected"), "and says so: {said}");
    let _ = watch.kill();
    let _ = watch.wait();
}
