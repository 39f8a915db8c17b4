//! Admission and security, end to end with a real controller process: the seed-3
//! handshake driven from a raw TCP socket (no drover code on the node side), every
//! refusal path, tickets on the gRPC node stream, operator tokens and roles, and the
//! rate limit on failed attempts.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Controller {
    child: Child,
    grpc: u16,
    admission: u16,
    data: PathBuf,
    /// The CA to verify its TLS certificate with, if it speaks TLS.
    ca: Option<PathBuf>,
    /// Its HTTP port, when the test chose one.
    http: Option<u16>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use common::free_port;

fn start(dir: &Path, extra: &[&str]) -> Controller {
    start_with(dir, extra, None)
}

/// Runs `drover ARGS…` and asserts that it succeeded.
fn drover_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_drover")).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A development CA in `dir/certs` with a controller certificate for 127.0.0.1 (and
/// whatever `issue` adds), and a controller speaking TLS with it.
fn start_tls(dir: &Path, extra: &[&str], issue: &[(&str, &str)]) -> (Controller, PathBuf) {
    let certs = dir.join("certs");
    let d = certs.to_str().unwrap();
    drover_ok(&["cert", "init", "--dir", d]);
    drover_ok(&["cert", "issue", "controller", "--dir", d, "--san", "127.0.0.1,localhost"]);
    for (name, san) in issue {
        drover_ok(&["cert", "issue", name, "--dir", d, "--san", san]);
    }
    let p = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let mut args = vec!["--tls-cert".to_owned(), p("controller.pem"), "--tls-key".to_owned(), p("controller.key")];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (start_with(dir, &args, Some(certs.join("ca.pem"))), certs)
}

fn start_with(dir: &Path, extra: &[&str], ca: Option<PathBuf>) -> Controller {
    let (grpc, admission) = (free_port(), free_port());
    let data = dir.join("data");
    let mut args = vec![
        "controller".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{grpc}"),
        "--admission".into(),
        format!("127.0.0.1:{admission}"),
        "--data-dir".into(),
        data.to_str().unwrap().into(),
    ];
    // Each test's controller gets its own HTTP port unless the test picks one.
    if !extra.contains(&"--http") {
        args.extend(["--http".to_string(), "127.0.0.1:0".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let http = extra
        .iter()
        .position(|a| *a == "--http")
        .and_then(|i| extra.get(i + 1))
        .and_then(|a| a.rsplit(':').next()?.parse().ok());
    let c = Controller { child, grpc, admission, data, ca, http };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.cli(&["version"]).0 {
        assert!(Instant::now() < deadline, "controller did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    c
}

impl Controller {
    fn admin(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token")).unwrap().trim().to_owned()
    }

    /// Runs the CLI with `token` (None: no token at all).
    fn cli_as(&self, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(args)
            .env("DROVER_CONTROLLER", format!("127.0.0.1:{}", self.grpc))
            .env("DROVER_DATA_DIR", "/nonexistent")
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_CA");
        if let Some(ca) = &self.ca {
            cmd.env("DROVER_CA", ca);
        }
        if let Some(t) = token {
            cmd.env("DROVER_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let admin = std::fs::read_to_string(self.data.join("admin.token")).ok();
        self.cli_as(admin.as_deref().map(str::trim), args)
    }

    fn token(&self, args: &[&str]) -> String {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.cli(&all);
        assert!(ok, "{out}{err}");
        out.trim().to_owned()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.admission)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

/// Reads raw bytes until `<EOF>` count reaches `n` or the peer closes; returns the text.
fn read_packets(s: &mut TcpStream, n: usize) -> String {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while text.windows(5).filter(|w| w == b"<EOF>").count() < n {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => text.extend_from_slice(&buf[..k]),
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn establish(version: &str) -> String {
    format!("conn:establish;;{{\"id\":\"raw-node\",\"version\":\"{version}\",\"type\":\"node\"}}<EOF>")
}

/// The answer to `auth:start` with `cert`, after a correct establish.
fn attempt(c: &Controller, cert: &str) -> String {
    let mut s = c.connect();
    s.write_all(establish(env!("CARGO_PKG_VERSION")).as_bytes()).unwrap();
    assert!(read_packets(&mut s, 1).starts_with("conn:startAuth;;"));
    s.write_all(format!("auth:start;;{{\"cert\":\"{cert}\"}}<EOF>").as_bytes()).unwrap();
    read_packets(&mut s, 1)
}

#[test]
fn raw_socket_handshake_with_split_and_pipelined_packets() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &[]);
    let join = c.token(&["--role", "join"]);
    let mut s = c.connect();
    // conn:establish split over several writes, cut inside the JSON and inside <EOF>.
    let hello = establish(env!("CARGO_PKG_VERSION"));
    for part in [&hello[..5], &hello[5..20], &hello[20..hello.len() - 2], &hello[hello.len() - 2..]] {
        s.write_all(part.as_bytes()).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_packets(&mut s, 1), "conn:startAuth;;{}<EOF>");
    s.write_all(format!("auth:start;;{{\"cert\":\"{join}\"}}<EOF>").as_bytes()).unwrap();
    let ack = read_packets(&mut s, 1);
    assert!(ack.starts_with("auth:ack;;"), "{ack}");
    let json: serde_json::Value =
        serde_json::from_str(ack.trim_start_matches("auth:ack;;").trim_end_matches("<EOF>")).unwrap();
    assert_eq!(json["upstream"], format!("127.0.0.1:{}", c.grpc));
    assert!(json["ticket"].as_str().unwrap().starts_with("dk2."));
    // The node's auth:ack and a keepalive in one write: both are taken, the channel stays open.
    s.write_all(b"auth:ack;;{}<EOF>conn:alive;;{}<EOF>").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut probe = [0u8; 64];
    if let Ok(0) = s.read(&mut probe) {
        panic!("controller closed an admitted control channel")
    }
}

#[test]
fn every_refusal_gets_its_documented_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &["--handshake-deadline", "1s"]);
    let close_reason = |text: &str| -> String {
        assert!(text.starts_with("conn:close;;"), "expected conn:close, got {text:?}");
        let json: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("conn:close;;").split("<EOF>").next().unwrap()).unwrap();
        json["reason"].as_str().unwrap().to_owned()
    };
    let dec_reason = |text: &str| -> String {
        assert!(text.starts_with("auth:dec;;"), "expected auth:dec, got {text:?}");
        let json: serde_json::Value =
            serde_json::from_str(text.trim_start_matches("auth:dec;;").split("<EOF>").next().unwrap()).unwrap();
        json["reason"].as_str().unwrap().to_owned()
    };
    // Wrong version.
    let mut s = c.connect();
    s.write_all(establish("99.0.0").as_bytes()).unwrap();
    assert!(close_reason(&read_packets(&mut s, 1)).contains("incompatible"));
    // Out of order, unknown code, bad JSON, oversize packet.
    for (bytes, needle) in [
        (b"auth:start;;{\"cert\":\"x\"}<EOF>".to_vec(), "unexpected auth:start"),
        (b"conn:nope;;{}<EOF>".to_vec(), "unknown packet code"),
        (b"conn:establish;;{\"id\":<EOF>".to_vec(), "not valid JSON"),
        ([b"conn:establish;;{\"id\":\"".as_slice(), &vec![b'a'; 65 * 1024]].concat(), "exceeds"),
    ] {
        let mut s = c.connect();
        let _ = s.write_all(&bytes);
        assert!(close_reason(&read_packets(&mut s, 1)).contains(needle), "{needle}");
    }
    // Slow client.
    let mut s = c.connect();
    let started = Instant::now();
    assert!(close_reason(&read_packets(&mut s, 1)).contains("not finished within"));
    assert!(started.elapsed() < Duration::from_secs(3));
    // Bad, revoked, expired and used-up tokens.
    assert_eq!(dec_reason(&attempt(&c, "dt1.0123456789ab.notthesecretnotthesecret")), "unknown token");
    assert!(dec_reason(&attempt(&c, "hello")).contains("not a drover join token"));
    // A certificate sent in the packet, with no TLS client certificate behind it, proves nothing.
    assert!(dec_reason(&attempt(&c, "-----BEGIN CERTIFICATE-----")).contains("proof of key possession"));
    let revoked = c.token(&["--role", "join"]);
    let id = revoked.split('.').nth(1).unwrap().to_owned();
    assert!(c.cli(&["token", "revoke", &id]).0);
    assert_eq!(dec_reason(&attempt(&c, &revoked)), "token revoked");
    let expiring = c.token(&["--role", "join", "--ttl", "300ms"]);
    // (Waiting for time itself: the token's lifetime must pass.)
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(dec_reason(&attempt(&c, &expiring)), "token expired");
    let once = c.token(&["--role", "join", "--uses", "1"]);
    assert!(attempt(&c, &once).starts_with("auth:ack;;"));
    assert_eq!(dec_reason(&attempt(&c, &once)), "token has no uses left");
    // An operator token is not a join token.
    assert_eq!(dec_reason(&attempt(&c, &c.admin())), "not a join token");
    // Tokens survive a restart (journaled state), revocations too.
    drop(c);
    let c = start(dir.path(), &[]);
    assert_eq!(dec_reason(&attempt(&c, &revoked)), "token revoked");
    let (ok, out, _) = c.cli(&["token", "list", "--json"]);
    assert!(ok);
    assert!(!out.contains(revoked.split('.').nth(2).unwrap()), "secrets are never listed");
}

#[test]
fn operators_need_a_token_and_read_tokens_cannot_change_things() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &[]);
    let (ok, _, err) = c.cli_as(None, &["nodes"]);
    assert!(!ok && err.contains("operator token is required"), "{err}");
    // A wrong token is named as such, not as a missing one (issue 19).
    let (ok, _, err) = c.cli_as(Some("dt1.0123456789ab.wrongwrongwrongwrong"), &["nodes"]);
    assert!(!ok && err.contains("unknown token"), "{err}");
    let read = c.token(&["--role", "read"]);
    assert!(c.cli_as(Some(&read), &["nodes"]).0);
    let (ok, _, err) = c.cli_as(Some(&read), &["task", "abort", "t1"]);
    assert!(!ok && err.contains("`drover task abort` needs an admin token"), "{err}");
    let (ok, _, err) = c.cli_as(Some(&read), &["token", "create", "--role", "admin"]);
    assert!(!ok && err.contains("admin token"), "{err}");
}

#[test]
fn node_streams_need_a_valid_ticket_for_that_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &["--ticket-ttl", "1s"]);
    let join = c.token(&["--role", "join"]);
    let ack = attempt(&c, &join);
    let json: serde_json::Value =
        serde_json::from_str(ack.trim_start_matches("auth:ack;;").trim_end_matches("<EOF>")).unwrap();
    let ticket = json["ticket"].as_str().unwrap().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = |ticket: Option<String>, node: &'static str| {
        rt.block_on(async {
            use drover_proto::v1::controller_client::ControllerClient;
            use drover_proto::{Payload, v1};
            let mut client = ControllerClient::connect(format!("http://127.0.0.1:{}", c.grpc)).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let hello = v1::NodeKnownCurrenciesV1Notify { pairs: vec!["EURUSD".into()], ..Default::default() };
            tx.send(v1::StreamFromNode {
                node_uuid: node.into(),
                from_uuid: None,
                response: Some(Payload::from(hello).to_any()),
                request_id: String::new(),
            })
            .await
            .unwrap();
            let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            if let Some(t) = ticket {
                req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            match client.node_command_stream(req).await {
                Err(s) => s.code(),
                Ok(r) => match r.into_inner().message().await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                },
            }
        })
    };
    assert_eq!(status(Some(ticket.clone()), "raw-node"), tonic::Code::Ok, "the right node with its ticket");
    assert_eq!(status(None, "raw-node"), tonic::Code::Unauthenticated, "no ticket");
    assert_eq!(status(Some(ticket.clone()), "someone-else"), tonic::Code::PermissionDenied, "ticket for another node");
    let tampered = ticket.replacen("dk2.", "dk2.A", 1);
    assert_eq!(status(Some(tampered), "raw-node"), tonic::Code::Unauthenticated, "tampered ticket");
    // (Waiting for time itself: the ticket's lifetime must pass.)
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(status(Some(ticket), "raw-node"), tonic::Code::Unauthenticated, "expired ticket");
}

#[test]
fn brute_force_from_one_address_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let c = start(dir.path(), &["--http", &format!("127.0.0.1:{http}")]);
    // Messages in the journal right now.
    let journaled = || {
        let out = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["journal", "dump", "--json", c.data.to_str().unwrap()])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["segments"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["records"].as_array().unwrap().clone())
            .map(|r| r["messages"].as_array().unwrap().len())
            .sum::<usize>()
    };
    let (mut unknown, mut limited) = (0, 0);
    let mut before_limited = 0;
    for i in 0..30 {
        if i == 10 {
            before_limited = journaled();
        }
        let answer = attempt(&c, &format!("dt1.0123456789ab.guessguessguess{i:04}"));
        if answer.contains("unknown token") {
            unknown += 1;
        } else if answer.contains("too many failed attempts") {
            limited += 1;
        }
    }
    // The ten checked attempts are journaled (a use could have been consumed)...
    assert!(before_limited >= 12, "start, admin token and 10 attempts: {before_limited}");
    // ...but attempts refused by the limiter never reach the core: the journal did not grow.
    assert_eq!(journaled(), before_limited, "rate-limited attempts must leave no trace in the journal");
    // The controller allows 10 failures per address per minute; the rest are refused
    // before the credential is even looked at.
    eprintln!("30 wrong tokens: {unknown} checked, {limited} refused by the limiter");
    assert_eq!((unknown, limited), (10, 20));
    // The refusals are counted by reason on /metrics (refreshed every 250 ms).
    let mut metrics = String::new();
    for _ in 0..20 {
        metrics = http_get(http, "/metrics");
        if metrics.contains("reason=\"rate_limited\"} 20") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metrics.contains("drover_admission_refusals_total{reason=\"unknown_token\"} 10"), "{metrics}");
    assert!(metrics.contains("drover_admission_refusals_total{reason=\"rate_limited\"} 20"), "{metrics}");
    assert!(http_get(http, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(http, "/readyz").starts_with("HTTP/1.1 200"));
    // The limit is per address *and* credential: a valid join token from the same
    // address is admitted at once (one node's bad token must not lock out the good
    // nodes behind the same host or NAT), and another token id is judged on its own.
    let join = c.token(&["--role", "join"]);
    let answer = attempt(&c, &join);
    assert!(answer.starts_with("auth:ack;;"), "a valid credential goes through the limit: {answer}");
    let other = attempt(&c, "dt1.ba9876543210.guessguessguess0000");
    assert!(other.contains("unknown token"), "another credential is not limited by the first: {other}");
    assert!(attempt(&c, "dt1.0123456789ab.guessguessguess9999").contains("too many failed attempts"));
}

#[test]
fn a_node_with_a_bad_token_backs_off_and_does_not_lock_out_its_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let c = start(dir.path(), &["--http", &format!("127.0.0.1:{http}")]);
    let log = dir.path().join("bad.log");
    let adm = format!("127.0.0.1:{}", c.admission);
    let mut bad = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["node", "--admission", &adm, "--token", "dt1.0123456789ab.wrongwrongwrongwrong", "--pairs", "EURUSD"])
        .args(["--name", "bad"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // An observation window, not a wait for a condition: the backoff is judged by how
    // many tries fall in it. Exponential from 1 s: tries at about 0, 1, 3 and 7 s.
    std::thread::sleep(Duration::from_secs(8));
    let text = std::fs::read_to_string(&log).unwrap();
    let warned = text.matches("not admitted").count();
    assert_eq!(warned, 1, "the refusal is said once at WARN, not per try:\n{text}");
    let metrics = http_get(http, "/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("drover_admission_refusals_total{reason=\"unknown_token\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no unknown-token refusals on /metrics: {metrics}"));
    assert!((2..=5).contains(&refused), "about four tries in 8 s with backoff, not a hundred: {refused}");
    // A good node on the same address is admitted although the bad one keeps trying.
    let join = c.token(&["--role", "join"]);
    let mut good = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["node", "--admission", &adm, "--token", &join, "--pairs", "EURUSD", "--name", "good"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.cli(&["nodes"]).1.contains("good") {
        assert!(Instant::now() < deadline, "the good node was not admitted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = (bad.kill(), bad.wait(), good.kill(), good.wait());
}

#[test]
fn tls_end_to_end_with_the_drover_cert_ca_and_a_stranger_refused() {
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let (c, certs) = start_tls(dir.path(), &["--http", &http], &[]);
    let other = dir.path().join("other-ca");
    drover_ok(&["cert", "init", "--dir", other.to_str().unwrap()]);
    let ca = certs.join("ca.pem");
    // A node over TLS: admission and stream both verified against the CA.
    let join = c.token(&["--role", "join"]);
    let mut node = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["node", "--admission", &format!("127.0.0.1:{}", c.admission), "--token", &join, "--pairs", "EURUSD"])
        .args(["--name", "tls-node", "--ca", ca.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("node.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.cli(&["prices", "--json"]).1.contains("EURUSD") {
        assert!(Instant::now() < deadline, "no prices over TLS");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A client trusting another CA is refused, and so is plain text.
    let admin = c.admin();
    let run = |ca: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.args(["version", "--timeout", "3s"])
            .env("DROVER_CONTROLLER", format!("127.0.0.1:{}", c.grpc))
            .env("DROVER_TOKEN", &admin)
            .env_remove("DROVER_CA");
        if let Some(ca) = ca {
            cmd.env("DROVER_CA", ca);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(run(Some(&ca)).0, "the right CA works");
    let (ok, err) = run(Some(&other.join("ca.pem")));
    assert!(!ok, "a client trusting another CA must be refused");
    assert!(err.contains("cannot reach the controller"), "{err}");
    assert!(!run(None).0, "plain text to a TLS port must fail");
    // The HTTP endpoint speaks TLS too.
    let script = format!(
        "printf 'GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n' | openssl s_client -quiet -connect 127.0.0.1:{} -CAfile {} 2>/dev/null",
        c.http.unwrap(),
        ca.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("ok"), "HTTPS /healthz: {answer:?}");
    // Plain text on the admission port gets no handshake either.
    let mut s = c.connect();
    s.write_all(establish(env!("CARGO_PKG_VERSION")).as_bytes()).unwrap();
    assert!(!read_packets(&mut s, 1).contains("conn:startAuth"));
    let _ = node.kill();
    let _ = node.wait();
}

#[test]
fn certificate_credentials_need_the_key_and_must_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = dir.path().join("certs").join("ca.pem");
    let (c, certs) = start_tls(dir.path(), &["--client-ca", ca_pem.to_str().unwrap()], &[("node-7", "node-7")]);
    let p = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let admission = c.admission;
    let nodes = || c.cli(&["nodes", "--json", "--timeout", "2s"]).1;
    let node = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["node", "--admission", &format!("127.0.0.1:{admission}"), "--id", id, "--pairs", "EURUSD"])
            .args(["--cert", &p("node-7.pem"), "--key", &p("node-7.key"), "--ca", &p("ca.pem")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{id}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    // The node named by the certificate, holding its key, is admitted without a token.
    let mut good = node("node-7");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes().contains("\"node-7\"") {
        assert!(Instant::now() < deadline, "node-7 was not admitted by its certificate");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The same certificate and key claiming another id is refused.
    let mut liar = node("node-8");
    let log = || std::fs::read_to_string(dir.path().join("controller.log")).unwrap();
    assert!(common::wait_until(Duration::from_secs(10), || log().contains("does not name node node-8")), "{}", log());
    assert!(!nodes().contains("node-8"), "a certificate naming node-7 admitted node-8");
    // The certificate alone, without the key (no client certificate in TLS), proves nothing.
    let pem = std::fs::read_to_string(p("node-7.pem")).unwrap();
    let start = serde_json::json!({"cert": pem}).to_string();
    let script = format!(
        "{{ printf '%s' '{}'; sleep 0.5; printf '%s' 'auth:start;;{}<EOF>'; sleep 1; }} | openssl s_client -quiet -connect 127.0.0.1:{admission} -CAfile {} 2>/dev/null",
        establish(env!("CARGO_PKG_VERSION")),
        start,
        p("ca.pem"),
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("conn:startAuth"), "{answer}");
    assert!(answer.contains("auth:dec") && answer.contains("proof of key possession"), "{answer}");
    for n in [&mut good, &mut liar] {
        let _ = n.kill();
        let _ = n.wait();
    }
}

/// A plain HTTP/1.1 GET; returns the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Regression (issue 9): past 4,096 admission connections the controller dropped new
/// ones with a reset, and every connected node holds one. The cap is now
/// `--max-connections`; past it a node reads `conn:close` with the reason, and a slot
/// freed by a closed connection is used again.
#[test]
fn connections_past_the_limit_are_told_why_and_freed_slots_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &["--max-connections", "2"]);
    let join = c.token(&["--role", "join"]);
    // Two admitted nodes hold their control channels.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = c.connect();
        s.write_all(establish(env!("CARGO_PKG_VERSION")).as_bytes()).unwrap();
        assert!(read_packets(&mut s, 1).starts_with("conn:startAuth;;"));
        s.write_all(format!("auth:start;;{{\"cert\":\"{join}\"}}<EOF>").as_bytes()).unwrap();
        assert!(read_packets(&mut s, 1).starts_with("auth:ack;;"));
        held.push(s);
    }
    // The third is told, not reset.
    let mut third = c.connect();
    let answer = read_packets(&mut third, 1);
    assert!(answer.starts_with("conn:close;;") && answer.contains("too many connections (limit 2)"), "{answer:?}");
    // One node leaves; its slot admits the next.
    drop(held.remove(0));
    let admitted = common::wait_until(Duration::from_secs(10), || {
        let mut s = c.connect();
        if s.write_all(establish(env!("CARGO_PKG_VERSION")).as_bytes()).is_err() {
            return false;
        }
        read_packets(&mut s, 1).starts_with("conn:startAuth;;")
    });
    assert!(admitted, "the freed slot was not reused");
}
