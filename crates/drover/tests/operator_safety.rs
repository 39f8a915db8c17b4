//! Operator safety with real processes: what an operator can do by accident must not
//! lose data or hang. A second controller on a live data directory is refused, CLIs
//! keep one overall deadline (connect included) and name the port they reached when
//! it is the wrong kind, and output piped into `head` ends quietly.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Controller, cli_command, wait_until};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
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
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
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
    let verify =
        Command::new(env!("CARGO_BIN_EXE_drover")).args(["journal", "verify"]).arg(&first.data).output().unwrap();
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
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
