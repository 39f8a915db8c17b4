//! Helpers shared by the process tests: free ports, spawning `drover` with its log in
//! a file, a controller with its own ports and data directory, a CLI runner acting as
//! its first admin, and polling with a deadline (no fixed sleeps).
#![allow(dead_code)]

pub mod history;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Killed {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port for a server this test starts (and may restart on the same port).
///
/// Not from the kernel's ephemeral range (`bind :0`): outgoing connections take their
/// local ports from that range, so a port handed out there can be taken by some
/// connection while a killed server is down, and the restart fails to bind. Ports are
/// drawn from 20000–32767 instead, spread by process id and a counter, and checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(2_654_435_761);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base.wrapping_add(n.wrapping_mul(7_919)) % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The `drover` binary under test: this build's, or `DROVER_TEST_BIN` (to run a test
/// against another release, e.g. to show that a fixed bug was there before).
pub fn drover_bin() -> PathBuf {
    std::env::var_os("DROVER_TEST_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_drover")), PathBuf::from)
}

/// `GET path` over HTTP/1.1 on 127.0.0.1:`port`: the whole response, head and body.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The dashboard's `/api/fleet` view of the controller with HTTP on `port`.
pub fn fleet_view(port: u16) -> serde_json::Value {
    let r = http_get(port, "/api/fleet");
    let body = r.find("\r\n\r\n").map_or("", |i| r[i + 4..].trim());
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/api/fleet is not JSON ({e}): {r}"))
}

/// Whether the node named `name` is a subscribed worker (the controller knows its
/// cores), as the fleet view on HTTP `port` shows it.
pub fn worker_ready(port: u16, name: &str) -> bool {
    fleet_view(port)["nodes"]
        .as_array()
        .is_some_and(|nodes| nodes.iter().any(|n| n["name"] == name && n["cores"].is_u64()))
}

/// A finished command's stdout then stderr, as text (for assertions and their messages).
pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs `drover ARGS`, stderr appended to `log`.
pub fn spawn(args: &[&str], log: &Path) -> Killed {
    spawn_env(args, &[], log)
}

/// `spawn` with more environment variables.
pub fn spawn_env(args: &[&str], env: &[(String, String)], log: &Path) -> Killed {
    let err = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut cmd = Command::new(drover_bin());
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdout(Stdio::null()).stderr(err);
    Killed(cmd.spawn().expect("spawn drover"))
}

/// The numbers after `line_prefix` (the first word) in every `FILE_PREFIX*.out` file
/// of `dir`: what example services printed (`count N`, `ack N`, `done N`).
pub fn numbers(dir: &Path, file_prefix: &str, line_prefix: &str) -> Vec<u64> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(file_prefix) && name.ends_with(".out") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            all.extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix(line_prefix))
                    .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok()),
            );
        }
    }
    all
}

pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A controller's addresses and data directory; it can be (re)started and killed.
pub struct Controller {
    pub grpc: u16,
    pub admission: u16,
    pub http: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
    /// More environment variables for the process.
    pub env: Vec<(String, String)>,
    pub proc: Option<Killed>,
    /// The address the ports bind to (default 127.0.0.1).
    pub bind: String,
    /// The host admitted nodes are told to reach the gRPC port at (`--upstream`).
    pub upstream_host: Option<String>,
}

impl Controller {
    pub fn new(dir: &Path, extra: &[&str]) -> Controller {
        Controller {
            grpc: free_port(),
            admission: free_port(),
            http: free_port(),
            data: dir.join("data"),
            log: dir.join("controller.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            proc: None,
            bind: "127.0.0.1".into(),
            upstream_host: None,
        }
    }

    /// Starts it and waits until it answers.
    pub fn start(&mut self) {
        let (g, a, h) = (
            format!("{}:{}", self.bind, self.grpc),
            format!("{}:{}", self.bind, self.admission),
            format!("{}:{}", self.bind, self.http),
        );
        let mut args = vec!["controller", "--listen", &g, "--admission", &a, "--http", &h, "--data-dir"];
        let data = self.data.to_str().unwrap().to_owned();
        args.push(&data);
        let upstream = self.upstream_host.as_ref().map(|host| format!("{host}:{}", self.grpc));
        if let Some(u) = &upstream {
            args.extend(["--upstream", u.as_str()]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        self.proc = Some(spawn_env(&args, &self.env, &self.log));
        assert!(
            wait_until(Duration::from_secs(20), || self.cli(&["version"]).status.success()),
            "controller did not start"
        );
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Runs a CLI command as the first admin.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_command(self.grpc, &self.data, args).output().expect("run cli")
    }

    /// `drover task run ARGS…` as the first admin; returns the task id.
    pub fn task_run(&self, args: &[&str]) -> String {
        let mut all = vec!["task", "run"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(out.status.success(), "task run failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn join_token(&self) -> String {
        self.token("join")
    }

    /// A new token of `role` (join, read, admin), created by the first admin.
    pub fn token(&self, role: &str) -> String {
        let out = self.cli(&["token", "create", "--role", role]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Starts a node; `extra` are more flags (e.g. `--worker`).
    pub fn node(&self, dir: &Path, name: &str, token: &str, extra: &[&str]) -> Killed {
        let adm = format!("127.0.0.1:{}", self.admission);
        let mut args = vec!["node", "--admission", &adm, "--token", token, "--name", name];
        args.extend_from_slice(extra);
        spawn(&args, &dir.join(format!("{name}.log")))
    }
}

/// A CLI command against the controller on gRPC port `grpc`, as the first admin of
/// `data` (for callers that spawn it themselves or run it from another thread).
pub fn cli_command(grpc: u16, data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(drover_bin());
    cmd.args(args)
        .env("DROVER_CONTROLLER", format!("127.0.0.1:{grpc}"))
        .env("DROVER_DATA_DIR", data)
        .env_remove("DROVER_TOKEN");
    cmd
}

// Controller groups (clusters).

/// A member of a controller group: its id, Raft port and controller.
pub struct Member {
    pub id: u64,
    pub raft: u16,
    pub ctl: Controller,
}

/// Starts member `m` of the group whose initial list is `peers` (empty for a member
/// joining later), with its node timeout at 3 s.
pub fn start_member(m: &mut Member, peers: &str, secret: &Path) {
    let (g, a, h, r) = (
        format!("127.0.0.1:{}", m.ctl.grpc),
        format!("127.0.0.1:{}", m.ctl.admission),
        format!("127.0.0.1:{}", m.ctl.http),
        format!("127.0.0.1:{}", m.raft),
    );
    let (id, data, secret) = (m.id.to_string(), m.ctl.data.to_str().unwrap().to_owned(), secret.to_str().unwrap());
    let mut args = vec![
        "controller",
        "--listen",
        &g,
        "--admission",
        &a,
        "--http",
        &h,
        "--data-dir",
        &data,
        "--member",
        &id,
        "--raft",
        &r,
        "--cluster-secret-file",
        secret,
        // Nodes are judged quickly, so the test's nodes show up at once.
        "--node-timeout",
        "3s",
    ];
    // A member joining later starts without the initial list.
    if !peers.is_empty() {
        args.extend(["--peers", peers]);
    }
    args.extend(m.ctl.extra.iter().map(String::as_str));
    m.ctl.proc = Some(spawn_env(&args, &m.ctl.env, &m.ctl.log));
}

/// `drover cluster status --json` through member `http`'s port, if it answers.
pub fn status(http: u16) -> Option<serde_json::Value> {
    let out = std::process::Command::new(drover_bin())
        .args(["cluster", "status", "--json", "--http", &format!("127.0.0.1:{http}")])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The leader `http`'s member reports, once every one of `expect` members answers
/// with no lag (or, with `expect` 0, once any leader is reported).
pub fn leader_via(http: u16, expect: usize) -> Option<u64> {
    let s = status(http)?;
    let leader = s["leader"].as_u64()?;
    let members = s["members"].as_array()?;
    let caught_up = members.iter().filter(|m| m["lag"] == 0 && m["role"] != "unreachable").count();
    (caught_up >= expect).then_some(leader)
}

pub fn cli(grpc: u16, token: &str, args: &[&str]) -> Output {
    cli_at(&format!("127.0.0.1:{grpc}"), token, args)
}

/// The CLI with `DROVER_CONTROLLER` set to `controllers` (one address or a list).
pub fn cli_at(controllers: &str, token: &str, args: &[&str]) -> Output {
    std::process::Command::new(drover_bin())
        .args(args)
        .env("DROVER_CONTROLLER", controllers)
        .env("DROVER_TOKEN", token)
        .output()
        .expect("run cli")
}

// The chaos suites.

/// Chaos scenarios run one at a time: they measure timings on a 2-core machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the chaos suites' one-at-a-time lock.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One chaos scenario's figures: printed as `CHAOS SUMMARY {...}` and appended to
/// `target/tmp/chaos-summary.jsonl`.
pub fn chaos_report(scenario: &str, profile: &str, figures: serde_json::Value) {
    use std::io::Write;
    let line = serde_json::json!({"scenario": scenario, "profile": profile, "figures": figures});
    eprintln!("CHAOS SUMMARY {line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-summary.jsonl");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}
