//! The coordinator with real processes: `drover coordinator` and the shipped counter
//! service (`drover coordinator example counter`, built on drover-ambrosia), SIGKILLed
//! at random moments. The counter counts to its target by calling itself once per
//! step, so a lost call stops it short and a repeated one makes it overshoot.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Killed, free_port, wait_until};

fn counter(dir: &Path, receive: u16, send: u16, target: u64, round: usize) -> Killed {
    let out = std::fs::File::create(dir.join(format!("counter-{round}.out"))).unwrap();
    let err = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("counter.log")).unwrap();
    let (r, s, t) = (receive.to_string(), send.to_string(), target.to_string());
    let args = ["coordinator", "example", "counter", "--receive-port", &r, "--send-port", &s, "--target", &t];
    Killed(Command::new(env!("CARGO_BIN_EXE_drover")).args(args).stdout(out).stderr(err).spawn().unwrap())
}

/// Every `count N` line the counter printed in every run.
fn counts(dir: &Path) -> Vec<u64> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("counter-") && name.ends_with(".out") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            all.extend(text.lines().filter_map(|l| l.strip_prefix("count ")).filter_map(|n| n.parse::<u64>().ok()));
        }
    }
    all
}

/// Whether any run printed that it reached the target.
fn done(dir: &Path, rounds: usize, target: u64) -> bool {
    (0..=rounds).any(|r| {
        std::fs::read_to_string(dir.join(format!("counter-{r}.out")))
            .unwrap_or_default()
            .lines()
            .any(|l| l == format!("done {target}"))
    })
}

/// The count a run ended up with: its checkpoint (`restored N`) plus what it replayed
/// and counted after it.
fn final_count(dir: &Path, round: usize) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("counter-{round}.out"))).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("count ").or_else(|| l.strip_prefix("restored ")))
        .and_then(|n| n.parse().ok())
}

#[test]
fn calls_are_neither_lost_nor_repeated_across_sigkills_of_coordinator_and_application() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    register(d, "counter");
    let (receive, send) = (free_port(), free_port());
    let target = 20_000;
    let mut coord = coordinator_for(d, "counter", receive, send);
    let mut round = 0;
    let mut app = counter(d, receive, send, target, round);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let (mut coordinator_kills, mut app_kills, mut mid_count) = (0, 0, 0);
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(100 + x % 300));
        if counts(d).into_iter().max().unwrap_or(0) < target {
            mid_count += 1;
        }
        if x.is_multiple_of(2) {
            coord.kill();
            coordinator_kills += 1;
            app.kill();
            coord = coordinator_for(d, "counter", receive, send);
        } else {
            app.kill();
            app_kills += 1;
        }
        round += 1;
        app = counter(d, receive, send, target, round);
    }
    let finished =
        wait_until(Duration::from_secs(120), || done(d, round, target) || counts(d).iter().any(|c| *c > target));
    let all = counts(d);
    let max = all.iter().copied().max().unwrap_or(0);
    let tail = |f: &str| {
        let t = std::fs::read_to_string(d.join(f)).unwrap_or_default();
        t.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    assert!(max <= target, "a repeated call made the counter overshoot to {max}");
    assert!(
        finished,
        "the counter stopped at {max} of {target}: a call was lost\ncoordinator:\n{}\ncounter:\n{}\nlast run:\n{}",
        tail("coordinator-counter.log"),
        tail("counter.log"),
        tail(&format!("counter-{round}.out"))
    );
    // One more recovery from the log alone gives the same final state.
    app.kill();
    round += 1;
    let _last = counter(d, receive, send, target, round);
    let recovered = wait_until(Duration::from_secs(60), || final_count(d, round) == Some(target));
    if !recovered {
        let tail = |f: &str| {
            let t = std::fs::read_to_string(d.join(f)).unwrap_or_default();
            t.lines().rev().take(8).collect::<Vec<_>>().join("\n")
        };
        panic!(
            "recovery did not reach {target}\nlast run:\n{}\ncoordinator:\n{}\ncounter:\n{}",
            tail(&format!("counter-{round}.out")),
            tail("coordinator-counter.log"),
            tail("counter.log")
        );
    }
    assert!(counts(d).iter().all(|c| *c <= target));
    assert!(mid_count >= 10, "only {mid_count} of the kills came while the counter was counting");
    eprintln!(
        "{coordinator_kills} coordinator and {app_kills} application SIGKILLs ({mid_count} while counting); counted to {target} exactly ({} count lines incl. replays)",
        all.len()
    );
    drop(coord);
}

/// `drover coordinator register` for `instance` in `dir/logs`.
fn register(dir: &Path, instance: &str) {
    let reg = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["coordinator", "register", "--instance", instance, "--log-dir", dir.join("logs").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(reg.status.success(), "{}", String::from_utf8_lossy(&reg.stderr));
}

fn coordinator_for(dir: &Path, instance: &str, receive: u16, send: u16) -> Killed {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("coordinator-{instance}.log")))
        .unwrap();
    let (r, s) = (receive.to_string(), send.to_string());
    let log_dir = dir.join("logs");
    let args = [
        "coordinator",
        "--instance",
        instance,
        "--log-dir",
        log_dir.to_str().unwrap(),
        "--receive-port",
        &r,
        "--send-port",
        &s,
    ];
    Killed(Command::new(env!("CARGO_BIN_EXE_drover")).args(args).stdout(Stdio::null()).stderr(err).spawn().unwrap())
}

fn pair_app(dir: &Path, which: &str, receive: u16, send: u16, target: u64, round: usize) -> Killed {
    let out = std::fs::File::create(dir.join(format!("{which}-{round}.out"))).unwrap();
    let err = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{which}.err"))).unwrap();
    let (r, s, t) = (receive.to_string(), send.to_string(), target.to_string());
    let args = ["coordinator", "example", which, "--receive-port", &r, "--send-port", &s, "--target", &t];
    Killed(Command::new(env!("CARGO_BIN_EXE_drover")).args(args).stdout(out).stderr(err).spawn().unwrap())
}

/// Numbers after `prefix` in every output of `which`.
fn numbers(dir: &Path, which: &str, prefix: &str) -> Vec<u64> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{which}-")) && name.ends_with(".out") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            all.extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix(prefix))
                    .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok()),
            );
        }
    }
    all
}

#[test]
fn calls_between_two_coordinators_are_delivered_exactly_once_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for instance in ["server", "client"] {
        register(d, instance);
    }
    let ports = [(free_port(), free_port()), (free_port(), free_port())];
    let target = 1500;
    let names = ["server", "client"];
    let apps = ["pair-server", "pair-client"];
    let mut coords: Vec<Killed> = (0..2).map(|i| coordinator_for(d, names[i], ports[i].0, ports[i].1)).collect();
    let mut round = 0;
    let mut running: Vec<Killed> =
        (0..2).map(|i| pair_app(d, apps[i], ports[i].0, ports[i].1, target, round)).collect();
    let mut x = 0xD1B5_4A32_D192_ED03u64;
    let (mut kills, mut mid) = ([0usize; 4], 0);
    for _ in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(150 + x % 300));
        if numbers(d, "pair-client", "ack ").into_iter().max().unwrap_or(0) < target {
            mid += 1;
        }
        let victim = (x % 4) as usize;
        kills[victim] += 1;
        round += 1;
        let i = victim % 2;
        if victim >= 2 {
            // A coordinator: its application goes down with it.
            coords[i].kill();
            running[i].kill();
            coords[i] = coordinator_for(d, names[i], ports[i].0, ports[i].1);
        } else {
            running[i].kill();
        }
        running[i] = pair_app(d, apps[i], ports[i].0, ports[i].1, target, round);
    }
    let finished = wait_until(Duration::from_secs(120), || {
        numbers(d, "pair-client", "done ").contains(&target)
            || numbers(d, "pair-server", "count ").iter().any(|c| *c > target)
    });
    let counts = numbers(d, "pair-server", "count ");
    let acks = numbers(d, "pair-client", "ack ");
    let max = counts.iter().copied().max().unwrap_or(0);
    assert!(max <= target, "the server counted {max}: an add was delivered twice");
    assert!(acks.iter().all(|a| *a <= target), "an acknowledgement was delivered twice");
    assert!(finished, "stuck at {max} of {target}: a call was lost");
    assert_eq!(max, target);
    assert!(mid >= 8, "only {mid} kills came while the pair was counting");
    eprintln!(
        "kills: server app {}, client app {}, server coordinator {}, client coordinator {} ({mid} mid-count); \
         {target} adds and acks, each exactly once",
        kills[0], kills[1], kills[2], kills[3]
    );
    drop(running);
    drop(coords);
}

#[test]
fn a_second_coordinator_on_the_same_instance_is_refused_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    register(d, "solo");
    let receive = free_port();
    let first = coordinator_for(d, "solo", receive, free_port());
    assert!(wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", receive)).is_ok()));
    let (r, s, p) = (free_port().to_string(), free_port().to_string(), free_port().to_string());
    let log_dir = d.join("logs");
    let args = ["coordinator", "--instance", "solo", "--log-dir", log_dir.to_str().unwrap()];
    let second = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .args(["--receive-port", &r, "--send-port", &s, "--peer-port", &p])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second coordinator must not run: {err}");
    assert!(
        err.contains("in use by another process") && err.contains(&format!("pid {}", first.pid())),
        "the error names the holder: {err}"
    );
    assert!(err.contains(&log_dir.join("solo").display().to_string()), "and the directory: {err}");
}

/// A peer link must say who it is (`AttachTo`, a short message) before it may send
/// anything large: a connection that announces a 60 MiB message first is closed at
/// once instead of being buffered (it was: up to 64 MiB per unauthenticated link).
#[test]
fn a_peer_link_that_has_not_attached_gets_a_small_budget() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    register(d, "solo");
    let (receive, send, peer) = (free_port(), free_port(), free_port());
    let log_dir = d.join("logs");
    let err = std::fs::OpenOptions::new().create(true).append(true).open(d.join("coordinator.log")).unwrap();
    let (r, s, p) = (receive.to_string(), send.to_string(), peer.to_string());
    let args = ["coordinator", "--instance", "solo", "--log-dir", log_dir.to_str().unwrap()];
    let _coord = Killed(
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(args)
            .args(["--receive-port", &r, "--send-port", &s, "--peer-port", &p])
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap(),
    );
    // (Not probed by connecting: a probe on the receive port spoils the next session,
    // which is issue 17's to fix.)
    let listening = || std::fs::read_to_string(d.join("coordinator.log")).unwrap_or_default().contains("listening");
    assert!(wait_until(Duration::from_secs(20), listening));
    // The peer port is served while an application is attached.
    let _app = counter(d, receive, send, u64::MAX, 0);
    assert!(wait_until(Duration::from_secs(20), || !counts(d).is_empty()), "the application runs");
    let mut link = std::net::TcpStream::connect(("127.0.0.1", peer)).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut head = Vec::new();
    drover_wire::ambrosia::varint::put_int(&mut head, 60 << 20);
    head.push(0); // an RPC
    link.write_all(&head).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    match link.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the link was kept open waiting for 60 MiB: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // The coordinator and its application go on.
    let before = counts(d).len();
    assert!(wait_until(Duration::from_secs(10), || counts(d).len() > before), "calls still flow");
}
