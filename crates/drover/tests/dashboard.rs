//! The dashboard in a real browser: a `drover controller` and two `drover node`s as
//! processes, Debian's headless Chromium driven through chromedriver (WebDriver over
//! HTTP, spoken here with a few lines of std networking). The page is loaded once;
//! everything after that arrives over server-sent events. A screenshot is saved as a
//! test artifact (`target/tmp/dashboard.png`).
//!
//! Chromium and chromedriver are required (`.ci/run` installs them); without them the
//! test fails and says how to install them, it does not skip.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Killed, free_port, spawn, wait_until};
use serde_json::{Value, json};

mod common;

/// One HTTP/1.1 exchange with `Connection: close`; the body is read by its
/// Content-Length (chromedriver keeps connections open): (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let length =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
        if length.is_some_and(|len| raw.len() >= end + 4 + len) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// A WebDriver session on chromedriver.
struct Browser {
    port: u16,
    session: String,
    _driver: Killed,
}

impl Browser {
    fn start(log: &Path) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run chromedriver ({e}); install Chromium: apt-get install chromium chromium-driver")
            });
        let driver = Killed(driver);
        assert!(
            wait_until(Duration::from_secs(20), || http(port, "GET", "/status", None)
                .is_ok_and(|(_, b)| b.contains("\"ready\":true"))),
            "chromedriver did not become ready"
        );
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"]
            }
        }}});
        let (status, body) = http(port, "POST", "/session", Some(&caps)).expect("new session");
        assert_eq!(status, 200, "chromedriver refused a session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().expect("session id").to_owned();
        Browser { port, session, _driver: driver }
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let (status, text) = http(self.port, method, &path, body.as_ref()).expect("webdriver call");
        assert_eq!(status, 200, "{method} {what}: {text}");
        serde_json::from_str::<Value>(&text).expect("webdriver json")["value"].clone()
    }

    fn go(&self, url: &str) {
        self.call("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs a script in the page and returns its value.
    fn eval(&self, script: &str) -> Value {
        self.call("POST", "execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn screenshot(&self, to: &Path) {
        let png = self.call("GET", "screenshot", None);
        std::fs::write(to, base64_decode(png.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
    }
}

/// Standard base64 (the screenshot's encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// What the page shows: nodes by name (state) and pairs (streamer name, price, upstream time).
const READ_PAGE: &str = r##"
return {
  live: document.querySelector("#live").textContent,
  nodes: [...document.querySelectorAll("#nodes tbody tr")].map(r => ({name: r.dataset.nodeName, state: r.dataset.state})),
  pairs: [...document.querySelectorAll("#pairs tbody tr")].map(r => ({pair: r.dataset.pair, streamer: r.dataset.streamer, price: r.dataset.price, upstream: Number(r.dataset.upstream)})),
  loads: performance.getEntriesByType("navigation").length,
};"##;

fn node_state(page: &Value, name: &str) -> Option<String> {
    page["nodes"].as_array()?.iter().find(|n| n["name"] == name).and_then(|n| n["state"].as_str().map(str::to_owned))
}

fn pair<'a>(page: &'a Value, name: &str) -> Option<&'a Value> {
    page["pairs"].as_array()?.iter().find(|p| p["pair"] == name)
}

#[test]
fn the_dashboard_shows_nodes_and_live_prices_and_a_killed_node_as_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, admission, web) = (free_port(), free_port(), free_port());
    let data = dir.path().join("data");
    let _controller = spawn(
        &[
            "controller",
            "--listen",
            &format!("127.0.0.1:{grpc}"),
            "--admission",
            &format!("127.0.0.1:{admission}"),
            "--http",
            &format!("127.0.0.1:{web}"),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.path().join("controller.log"),
    );
    let cli = |args: &[&str]| common::cli_command(grpc, &data, args).output().expect("run cli");
    assert!(wait_until(Duration::from_secs(15), || cli(&["version"]).status.success()), "controller did not start");
    let token = String::from_utf8(cli(&["token", "create", "--role", "join"]).stdout).unwrap().trim().to_owned();
    let adm = format!("127.0.0.1:{admission}");
    let node = |name: &str, pairs: &str| {
        spawn(
            &["node", "--admission", &adm, "--token", &token, "--pairs", pairs, "--name", name],
            &dir.path().join(format!("{name}.log")),
        )
    };
    let mut alpha = node("alpha", "EURUSD,GBPUSD");
    let _beta = node("beta", "GBPUSD,USDJPY");
    let _gamma = spawn(
        &["node", "--admission", &adm, "--token", &token, "--worker", "--cores", "1", "--name", "gamma"],
        &dir.path().join("gamma.log"),
    );

    let browser = Browser::start(&dir.path().join("chromedriver.log"));
    browser.go(&format!("http://127.0.0.1:{web}/"));

    // Both nodes and a price for every pair appear, pushed over server-sent events.
    let mut page = Value::Null;
    let shown = wait_until(Duration::from_secs(20), || {
        page = browser.eval(READ_PAGE);
        page["live"] == "live"
            && node_state(&page, "alpha").as_deref() == Some("online")
            && node_state(&page, "beta").as_deref() == Some("online")
            && ["EURUSD", "GBPUSD", "USDJPY"]
                .iter()
                .all(|p| pair(&page, p).is_some_and(|r| r["price"].as_str().is_some_and(|s| !s.is_empty())))
    });
    assert!(shown, "the dashboard did not show both nodes with prices: {page}");
    assert_eq!(pair(&page, "USDJPY").unwrap()["streamer"], "beta", "only beta serves USDJPY");
    assert_eq!(pair(&page, "EURUSD").unwrap()["streamer"], "alpha", "only alpha serves EURUSD");

    // A task run on the worker shows in the task figures.
    let ran = cli(&["task", "run", "--wait", "--", "/bin/echo", "dashboard"]);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let done = wait_until(Duration::from_secs(10), || {
        browser.eval("return document.querySelector('[data-task=\"done\"]').textContent;") == "1"
    });
    assert!(done, "the dashboard did not count the completed task");
    // The task table lists it, live, and a job that exits 1 shows in the recent events.
    let ran = cli(&["task", "run", "--wait", "--", "/bin/false"]);
    assert!(!ran.status.success(), "/bin/false exits 1");
    let listed = wait_until(Duration::from_secs(10), || {
        let rows = browser.eval(
            "return [...document.querySelectorAll('#task-list tbody tr')].map(r => [r.dataset.taskId, r.dataset.state, r.textContent]);",
        );
        let rows = rows.as_array().cloned().unwrap_or_default();
        rows.len() == 2
            && rows[0][1] == "completed"
            && rows[0][2].as_str().is_some_and(|t| t.contains("/bin/false"))
            && rows[1][2].as_str().is_some_and(|t| t.contains("/bin/echo dashboard"))
    });
    assert!(listed, "the task table does not list both tasks, newest first");
    let noted = wait_until(Duration::from_secs(10), || {
        browser
            .eval("return [...document.querySelectorAll('#events li')].map(l => l.textContent).join('\\n');")
            .as_str()
            .is_some_and(|t| t.contains("completed: exit code 1"))
    });
    assert!(noted, "the recent events do not show the task that exited 1");
    let health = browser.eval("return document.querySelector('#health').textContent;");
    assert!(
        health
            .as_str()
            .is_some_and(|h| h.contains("journal") && h.contains("fsync p50 / p99") && h.contains("last checkpoint")),
        "the controller's health line: {health}"
    );

    // Prices keep updating in place (no reload: still one navigation).
    let first = pair(&page, "USDJPY").unwrap()["upstream"].as_i64().unwrap();
    let updated = wait_until(Duration::from_secs(10), || {
        page = browser.eval(READ_PAGE);
        pair(&page, "USDJPY").and_then(|r| r["upstream"].as_i64()).is_some_and(|t| t > first)
    });
    assert!(updated, "USDJPY did not update live: {page}");
    // Each pair has a price chart that grows as prices arrive.
    let points = |pair: &str| -> u64 {
        browser
            .eval(&format!(
                "const s = document.querySelector('#pairs tr[data-pair=\"{pair}\"] svg.spark'); return s && s.querySelector('polyline') ? Number(s.dataset.points) : 0;"
            ))
            .as_u64()
            .unwrap_or(0)
    };
    let before = points("USDJPY");
    assert!(before >= 2, "USDJPY has a price chart with points: {before}");
    assert!(wait_until(Duration::from_secs(10), || points("USDJPY") > before), "the chart did not grow live");
    assert_eq!(page["loads"], 1, "the page must not reload");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser.screenshot(&shot);

    // A killed node shows as gone, and its shared pair moves to the other node.
    alpha.0.kill().unwrap();
    alpha.0.wait().unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        page = browser.eval(READ_PAGE);
        node_state(&page, "alpha").as_deref() == Some("gone")
            && pair(&page, "GBPUSD").is_some_and(|r| r["streamer"] == "beta")
            && pair(&page, "EURUSD").is_some_and(|r| r["streamer"] == "")
    });
    assert!(gone, "the killed node did not show as gone: {page}");
    let after = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-after-kill.png");
    browser.screenshot(&after);

    // Read-only without a token: no action buttons, and the action endpoint refuses.
    let buttons = "return document.querySelectorAll('#nodes button').length;";
    assert_eq!(browser.eval(buttons), 0, "no admin actions without a token");
    let (status, _) = http(web, "POST", "/api/nodes/x/drain", None).unwrap();
    assert_eq!(status, 401, "an action without a token is refused");
    // With the admin token typed in, beta's drain button drains it (journaled like the CLI's).
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    browser.eval(&format!(
        "const t = document.querySelector('#token'); t.value = {}; t.dispatchEvent(new Event('input')); return 0;",
        json!(admin.trim())
    ));
    browser.eval(
        "const row = [...document.querySelectorAll('#nodes tbody tr')].find(r => r.dataset.nodeName === 'beta');
         [...row.querySelectorAll('button')].find(b => b.textContent === 'drain').click(); return 0;",
    );
    let drained = wait_until(Duration::from_secs(10), || {
        page = browser.eval(READ_PAGE);
        node_state(&page, "beta").as_deref() == Some("draining")
    });
    assert!(drained, "drain from the dashboard did not take effect: {page}");

    // /metrics has every family the operator guide lists, histograms with observations.
    let (status, metrics) = http(web, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    for family in [
        "drover_nodes{state=\"gone\"} 1",
        "drover_pairs{streamer=\"yes\"}",
        "drover_assignments_total",
        "drover_failovers_total",
        "drover_handovers_total",
        "drover_price_updates_total{outcome=\"accepted\"}",
        "drover_price_updates_total{outcome=\"fenced\"}",
        "drover_cli_commands_total",
        "drover_admissions_total 3",
        "drover_admission_refusals_total{reason=\"rate_limited\"}",
        "drover_journal_append_seconds_bucket{le=\"0.001\"}",
        "drover_journal_fsync_seconds_count",
        "drover_journal_batch_entries_bucket{le=\"+Inf\"}",
        "drover_checkpoint_seconds_count",
        "drover_replay_seconds",
        "drover_inputs_applied_total",
        "drover_tasks{state=\"done\"} 2",
        "drover_task_outcomes_total{outcome=\"completed\"} 2",
        "drover_task_attempts_total{event=\"dispatched\"} 2",
        "drover_task_attempts_total{event=\"started\"} 2",
        "drover_build_info{version=",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics:\n{metrics}");
    }
    let count =
        |name: &str| -> u64 { metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0) };
    assert!(count("drover_journal_fsync_seconds_count ") > 10, "fsyncs observed:\n{metrics}");
    assert!(count("drover_journal_append_seconds_count ") > 10, "appends observed:\n{metrics}");
    assert!(count("drover_journal_batch_entries_count ") > 10, "batches observed:\n{metrics}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot is not a PNG of the page");
    eprintln!("screenshots: {} and {}", shot.display(), after.display());
}
