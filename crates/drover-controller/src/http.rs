//! The controller's HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`
//! (unhealthy when the journal failed or inputs wait without being applied), `/readyz`
//! (recovery finished), and the dashboard: `/` (one HTML page, its script included in
//! the binary), `/api/fleet` (the fleet view as JSON), `/events` (server-sent events:
//! the fleet view each time it changes) and, with an admin token, `POST
//! /api/nodes/{id}/drain|kick`. It reads only what the owner publishes (a metrics
//! snapshot and a fleet view through `watch` channels, and the `Health` atomics); its
//! admin actions enter the owner like any CLI command, journaled first.

use crate::now_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use drover_core::FleetView;
use drover_proto::{Payload, v1};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::owner::{Health, Inbox, ShellEvent, Snapshot};

/// The dashboard page (HTML, CSS and script in one file, shipped in the binary).
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the HTTP endpoint reads and where its admin actions go.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) snapshot: watch::Receiver<Snapshot>,
    pub(crate) views: watch::Receiver<Arc<FleetView>>,
    pub(crate) health: Arc<Health>,
    pub(crate) events: Inbox,
    pub(crate) sessions: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) stop: watch::Receiver<bool>,
    /// Inputs waiting longer than this without any being applied make the controller unhealthy.
    pub(crate) stall_ms: i64,
    /// Price history and recent events.
    pub(crate) recent: crate::recent::Shared,
    /// The journal directory (its size and newest checkpoint, for `/api/status`).
    pub(crate) journal_dir: std::path::PathBuf,
    /// When this process started serving (Unix ms).
    pub(crate) started_ms: i64,
    /// Slots for `/events` subscribers.
    pub(crate) subscribers: Arc<tokio::sync::Semaphore>,
    /// The cluster member this controller is (`None`: on its own).
    pub(crate) cluster: Option<crate::cluster::ClusterHandle>,
}

/// How long one event may wait for a subscriber that does not read before it is dropped.
const SSE_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: crate::conns::Limits,
    logs: Arc<crate::ratelog::LogLimiter>,
) {
    let mut stop = state.stop.clone();
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/api/fleet", get(fleet))
        .route("/api/history", get(history))
        .route("/api/status", get(status))
        .route("/events", get(events))
        .route("/api/nodes/{id}/{action}", post(node_action))
        .route("/api/cluster", get(crate::cluster::status))
        .route("/api/cluster/{action}", post(crate::cluster::change))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (tcp, peer, permit) = tokio::select! {
            a = crate::conns::accept(&listener, &slots, &logs, "http", limits.max_connections) => a,
            _ = stop.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        crate::conns::small_send_buffer(&tcp);
        let (acceptor, app) = (tls.clone(), app.clone().layer(axum::Extension(PeerAddr(peer))));
        tokio::spawn(async move {
            let guarded = crate::conns::Guarded::new(tcp, peer, permit, limits);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_HTTP2_STREAMS);
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(limits.header_timeout, acceptor.accept(guarded)).await {
                        Ok(Ok(tls)) => tls,
                        _ => {
                            tracing::debug!(%peer, "HTTPS handshake failed");
                            return;
                        }
                    };
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await;
                }
                None => {
                    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(guarded), service).await;
                }
            }
        });
    }
}

/// Streams one HTTP/2 connection may have open at once.
const MAX_HTTP2_STREAMS: u32 = 100;

/// The peer of an HTTP connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerAddr(std::net::SocketAddr);

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    if h.journal_failed.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: the journal cannot write\n");
    }
    // A member is healthy while its Raft engine runs (it applies what is committed).
    if let Some(c) = &s.cluster
        && c.raft.metrics().borrow().running_state.is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: the Raft engine failed\n");
    }
    let waiting = h.queued.load(Ordering::Relaxed) > 0;
    let idle_ms = now_ms() - h.last_applied_ms.load(Ordering::Relaxed);
    if waiting && idle_ms > s.stall_ms {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: inputs are waiting but none was applied\n");
    }
    (StatusCode::OK, "ok\n")
}

async fn dashboard() -> impl IntoResponse {
    ([("cache-control", "no-store")], Html(DASHBOARD))
}

async fn fleet(State(s): State<AppState>) -> Response {
    let view = s.views.borrow().clone();
    ([("content-type", "application/json"), ("cache-control", "no-store")], json(&view)).into_response()
}

/// `/api/history`: each pair's recent prices, `{pair: [[upstream_ms, "price"], …]}`.
async fn history(State(s): State<AppState>) -> Response {
    let body = s.recent.lock().map(|r| r.history_json().to_string()).unwrap_or_else(|_| "{}".into());
    ([("content-type", "application/json"), ("cache-control", "no-store")], body).into_response()
}

/// The journal directory's size in bytes, and the newest checkpoint's modification
/// time (Unix ms), read from the file system at request time.
fn journal_files(dir: &std::path::Path) -> (u64, Option<i64>, usize) {
    let (mut bytes, mut newest, mut segments) = (0u64, None::<i64>, 0usize);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = e.metadata() else { continue };
        bytes += meta.len();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if drover_journal::parse_segment_name(&name).is_some() {
            segments += 1;
        }
        if drover_journal::parse_checkpoint_name(&name).is_some()
            && let Ok(m) = meta.modified()
            && let Ok(d) = m.duration_since(std::time::UNIX_EPOCH)
        {
            let ms = d.as_millis() as i64;
            newest = Some(newest.map_or(ms, |n| n.max(ms)));
        }
    }
    (bytes, newest, segments)
}

/// `/api/status`: the controller's own health (journal size, last checkpoint, fsync
/// and append latency, inputs) and the recent events, for the dashboard.
async fn status(State(s): State<AppState>) -> Response {
    let snap = s.snapshot.borrow().clone();
    let dir = s.journal_dir.clone();
    let (bytes, checkpoint_ms, segments) =
        tokio::task::spawn_blocking(move || journal_files(&dir)).await.unwrap_or((0, None, 0));
    // A quantile past the last bucket is shown as that bound rather than hidden.
    let ms = |h: &drover_journal::histogram::HistogramSnapshot, q: f64| {
        h.quantile_bound(q).or_else(|| h.bounds.last().copied().filter(|_| h.count() > 0)).map(|us| us as f64 / 1000.0)
    };
    let events = s.recent.lock().map(|r| r.events()).unwrap_or_default();
    let body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_ms": s.started_ms,
        "at_ms": crate::now_ms(),
        "journal": {
            "bytes_on_disk": bytes,
            "segments": segments,
            "last_checkpoint_ms": checkpoint_ms,
            "checkpoints_written": snap.journal.checkpoints,
            "fsync_p50_ms": ms(&snap.histograms.fsync_us, 0.5),
            "fsync_p99_ms": ms(&snap.histograms.fsync_us, 0.99),
            "append_p99_ms": ms(&snap.histograms.append_us, 0.99),
            "failed": s.health.journal_failed.load(Ordering::Relaxed),
        },
        "inputs_applied": s.health.applied.load(Ordering::Relaxed),
        "inputs_queued": s.health.queued.load(Ordering::Relaxed),
        "events": events,
    });
    ([("content-type", "application/json"), ("cache-control", "no-store")], body.to_string()).into_response()
}

fn json(view: &FleetView) -> String {
    serde_json::to_string(view).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Server-sent events: the fleet view now, then each time it changes (at most as
/// often as the owner publishes). The stream ends when the controller stops.
async fn events(State(s): State<AppState>) -> Response {
    // A bounded number of subscribers; one that stops reading is dropped after
    // `SSE_SEND_TIMEOUT` (and its connection by the socket's send timeout).
    let Ok(slot) = s.subscribers.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many /events subscribers; retry later\n").into_response();
    };
    let (tx, rx) = mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(4);
    let mut views = s.views.clone();
    let mut stop = s.stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let data = json(&views.borrow_and_update().clone());
            let sent =
                tokio::time::timeout(SSE_SEND_TIMEOUT, tx.send(Ok(SseEvent::default().event("fleet").data(data))));
            if !matches!(sent.await, Ok(Ok(()))) {
                return;
            }
            tokio::select! {
                changed = views.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
                _ = tx.closed() => return,
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

/// Checks the request's `Authorization: Bearer <admin token>` (limited per address
/// like every operator token); `Err` is the answer to send instead.
pub(crate) async fn require_admin(
    s: &AppState,
    peer: Option<axum::Extension<PeerAddr>>,
    headers: &HeaderMap,
) -> Result<(), Response> {
    let ip = peer.map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.0.0.ip());
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = token.and_then(|t| drover_admission::token::parse(t).ok()) else {
        return Err(
            (StatusCode::UNAUTHORIZED, "an admin token is required (Authorization: Bearer <token>)\n").into_response()
        );
    };
    match crate::owner::operator_role(&s.events, presented, ip).await {
        Err(_) => Err((StatusCode::SERVICE_UNAVAILABLE, "controller is stopping\n").into_response()),
        Ok(Ok(drover_core::OperatorRole::Admin)) => Ok(()),
        Ok(Ok(drover_core::OperatorRole::Read)) => {
            Err((StatusCode::FORBIDDEN, "this token is read-only; an admin token is required\n").into_response())
        }
        Ok(Err(crate::owner::CliRefusal::Token(reason))) => {
            Err((StatusCode::UNAUTHORIZED, format!("{reason}\n")).into_response())
        }
        Ok(Err(crate::owner::CliRefusal::NotLeader { why, .. })) => {
            Err((StatusCode::MISDIRECTED_REQUEST, format!("{why}\n")).into_response())
        }
    }
}

/// `POST /api/nodes/{id}/drain|kick` with `Authorization: Bearer <admin token>`: the
/// same command `drover drain|kick` sends, through the same journaled path.
async fn node_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    peer: Option<axum::Extension<PeerAddr>>,
    headers: HeaderMap,
) -> Response {
    let payload: Payload = match action.as_str() {
        "drain" => v1::ControllerDrainNodesV1Req { node_uuids: vec![id.clone()], undo: false }.into(),
        "kick" => v1::ControllerKickNodesV1Req { node_uuids: vec![id.clone()] }.into(),
        _ => return (StatusCode::NOT_FOUND, "actions: drain, kick\n").into_response(),
    };
    if let Err(refused) = require_admin(&s, peer, &headers).await {
        return refused;
    }
    let session = s.sessions.fetch_add(1, Ordering::Relaxed);
    let (sink, mut replies) = mpsc::channel(16);
    let stream_id = format!("dashboard-{session}");
    let msg = v1::StreamFromCli {
        stream_id: stream_id.clone(),
        command: Some(payload.to_any()),
        cli_uuid: "dashboard".into(),
        ..Default::default()
    };
    let sent = async {
        s.events.send(ShellEvent::CliOpened { session, role: drover_core::OperatorRole::Admin, sink }).await?;
        s.events.send(ShellEvent::CliMessage { session, msg }).await
    };
    if sent.await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "controller is stopping\n").into_response();
    }
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(Ok(m)) = replies.recv().await {
            let Some(any) = m.response.as_ref() else { continue };
            match Payload::from_any(any) {
                Ok(Payload::ControllerDrainNodesV1Reply(r)) => return Some((r.draining, r.missing)),
                Ok(Payload::ControllerKickNodesV1Reply(r)) => return Some((r.kicked, r.missing)),
                _ => {}
            }
        }
        None
    })
    .await;
    let _ = s.events.send(ShellEvent::CliClosed { session }).await;
    match answer {
        Ok(Some((done, missing))) => {
            let status = if missing.is_empty() { StatusCode::OK } else { StatusCode::NOT_FOUND };
            let body = serde_json::json!({ "action": action, "done": done, "missing": missing });
            (status, [("content-type", "application/json")], body.to_string()).into_response()
        }
        _ => (StatusCode::GATEWAY_TIMEOUT, "no answer from the controller core\n").into_response(),
    }
}

/// `/readyz`: 200 once recovery finished; on a cluster member, 200 only while it leads
/// (a load balancer in front of the group sends to the leader), 503 naming the leader.
async fn readyz(State(s): State<AppState>) -> Response {
    if !s.health.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response();
    }
    let Some(c) = &s.cluster else { return (StatusCode::OK, "ready\n").into_response() };
    let m = c.raft.metrics().borrow().clone();
    let serving = s.health.serving.load(Ordering::SeqCst);
    match m.current_leader {
        Some(l) if l == m.id && m.state == drover_raft::openraft::ServerState::Leader && serving => {
            (StatusCode::OK, format!("ready: member {l} leads (term {})\n", m.current_term)).into_response()
        }
        Some(l) if l == m.id => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not serving: member {l} was elected (term {}) but is not serving (taking over, or no majority acknowledged it within the lease)\n",
                m.current_term
            ),
        )
            .into_response(),
        Some(l) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("following: member {l} leads (term {})\n", m.current_term))
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader: an election is under way\n").into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let snap = s.snapshot.borrow().clone();
    let mut body = render(&snap, &s.health);
    if let Some(c) = &s.cluster {
        body.push_str(&raft_metrics(c));
    }
    ([("content-type", "text/plain; version=0.0.4")], body)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The consensus metrics of a cluster member (appended to `/metrics`).
fn raft_metrics(c: &crate::cluster::ClusterHandle) -> String {
    let mut out = String::new();
    let one = |v: u64| vec![(String::new(), v)];
    let m = c.raft.metrics().borrow().clone();
    let leads = m.current_leader == Some(m.id) && m.state == drover_raft::openraft::ServerState::Leader;
    family(&mut out, "drover_raft_term", "gauge", "This member's current Raft term.", &one(m.current_term));
    family(&mut out, "drover_raft_leader", "gauge", "1 while this member leads its cluster.", &one(u64::from(leads)));
    family(
        &mut out,
        "drover_raft_last_log_index",
        "gauge",
        "The last index in this member's Raft log.",
        &one(m.last_log_index.unwrap_or(0)),
    );
    family(
        &mut out,
        "drover_raft_applied_index",
        "gauge",
        "The last committed index this member applied to its core.",
        &one(m.last_applied.map_or(0, |l| l.index)),
    );
    let last = m.last_log_index.unwrap_or(0);
    let lags: Vec<(String, u64)> = m
        .replication
        .iter()
        .flatten()
        .map(|(member, matched)| {
            (format!("{{member=\"{member}\"}}"), last.saturating_sub(matched.map_or(0, |l| l.index)))
        })
        .collect();
    family(&mut out, "drover_raft_member_lag", "gauge", "On the leader: entries each member is behind its log.", &lags);
    let st = c.stats.snapshot();
    let counters = [
        ("drover_raft_elections_total", "Terms this member saw begin since it started (elections).", st.elections),
        ("drover_raft_leader_changes_total", "Times this member saw a different leader.", st.leader_changes),
        ("drover_raft_snapshots_built_total", "Snapshots this member built of its core.", st.snapshots_built),
        (
            "drover_raft_snapshots_sent_total",
            "Snapshots this member sent to members behind its log.",
            st.snapshots_sent,
        ),
        (
            "drover_raft_snapshots_installed_total",
            "Snapshots this member installed from a leader.",
            st.snapshots_installed,
        ),
        (
            "drover_raft_campaigns_after_refusal_total",
            "Campaigns this member began at once after refusing a candidate whose log was behind its own, or splitting a vote with it.",
            st.campaigns_after_refusal,
        ),
    ];
    for (name, help, v) in counters {
        family(&mut out, name, "counter", help, &one(v));
    }
    histogram(
        &mut out,
        "drover_raft_commit_seconds",
        "On the leader: propose to committed (on a majority), per batch of inputs.",
        &st.commit_latency,
        1e-6,
    );
    out
}

/// A histogram family; `scale` converts the stored unit to the exposed one (1e-6 for
/// microseconds to seconds, 1 for counts).
fn histogram(out: &mut String, name: &str, help: &str, h: &drover_journal::histogram::HistogramSnapshot, scale: f64) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c;
        match h.bounds.get(i) {
            Some(b) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *b as f64 * scale);
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum {}", h.sum as f64 * scale);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

/// The standard `process_*` metrics (as Prometheus client libraries export them), read
/// from `/proc/self`; on a system without it they are left out.
fn process_metrics(out: &mut String) {
    use std::fmt::Write;
    // /proc/<pid>/stat reports times in USER_HZ, 100 on every Linux architecture.
    const TICKS_PER_SECOND: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let mut gauge = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        gauge(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / TICKS_PER_SECOND,
        );
    }
    if let Some(vsize) = field(23) {
        gauge("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize);
    }
    let rss_kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
    });
    if let Some(kib) = rss_kib {
        gauge("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", kib * 1024.0);
    }
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok()));
    if let (Some(start), Some(boot)) = (field(22), boot) {
        gauge(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / TICKS_PER_SECOND,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge("process_open_fds", "gauge", "Number of open file descriptors.", fds.count() as f64);
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<f64>().ok())
    });
    if let Some(m) = max_fds {
        gauge("process_max_fds", "gauge", "Maximum number of open file descriptors.", m);
    }
}

/// The Prometheus text exposition of a snapshot.
pub(crate) fn render(s: &Snapshot, h: &Health) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "drover_build_info",
        "gauge",
        "The running drover's version (always 1).",
        &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1)],
    );
    process_metrics(&mut out);
    let c = &s.counters;
    let one = |v: u64| vec![(String::new(), v)];
    let states: Vec<(String, u64)> = ["online", "suspect", "draining", "rejoining", "gone"]
        .iter()
        .map(|st| (format!("{{state=\"{st}\"}}"), s.nodes.get(st).copied().unwrap_or(0)))
        .collect();
    family(&mut out, "drover_nodes", "gauge", "Nodes by state.", &states);
    family(
        &mut out,
        "drover_pairs",
        "gauge",
        "Pairs with and without a streamer.",
        &[("{streamer=\"yes\"}".into(), s.pairs_with), ("{streamer=\"no\"}".into(), s.pairs_without)],
    );
    family(&mut out, "drover_assignments_total", "counter", "Streamer assignments issued.", &one(c.assignments));
    family(&mut out, "drover_failovers_total", "counter", "Pairs moved off a node that was gone.", &one(c.failovers));
    family(
        &mut out,
        "drover_stale_reassignments_total",
        "counter",
        "Pairs moved off a silent streamer.",
        &one(c.stale_reassignments),
    );
    family(&mut out, "drover_handovers_total", "counter", "Make-before-break handovers completed.", &one(c.handovers));
    family(
        &mut out,
        "drover_node_timeouts_total",
        "counter",
        "Nodes declared gone after missed keepalives.",
        &one(c.timeouts),
    );
    family(
        &mut out,
        "drover_price_updates_total",
        "counter",
        "Price updates by outcome.",
        &[
            ("{outcome=\"accepted\"}".into(), c.prices_accepted),
            ("{outcome=\"stale\"}".into(), c.prices_stale),
            ("{outcome=\"fenced\"}".into(), c.prices_fenced),
        ],
    );
    family(&mut out, "drover_cli_commands_total", "counter", "CLI commands handled.", &one(c.cli_commands));
    family(&mut out, "drover_refused_total", "counter", "Malformed or refused messages.", &one(c.refused));
    family(&mut out, "drover_admissions_total", "counter", "Nodes admitted by a join token.", &one(c.admissions));
    family(
        &mut out,
        "drover_admission_refusals_total",
        "counter",
        "Admissions refused since the controller started, by reason.",
        &drover_core::AdmissionRefusal::REASONS
            .iter()
            .map(|r| (format!("{{reason=\"{r}\"}}"), s.admission_refusals.get(r).copied().unwrap_or(0)))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "drover_stale_tickets_total",
        "counter",
        "Node streams refused: their ticket's generation was no longer current (evicted, revoked, forgotten or admitted again).",
        &one(s.stale_tickets),
    );
    family(
        &mut out,
        "drover_operator_token_refusals_total",
        "counter",
        "Operator tokens refused on the gRPC and HTTP ports (unknown, expired, revoked, or rate-limited).",
        &one(s.operator_refusals),
    );
    family(
        &mut out,
        "drover_undecodable_messages_total",
        "counter",
        "Messages of an unknown type or with bytes that are not their type, journaled as a digest only.",
        &one(s.undecodable),
    );
    let t = &s.tasks;
    let g = &s.task_gauges;
    family(
        &mut out,
        "drover_tasks",
        "gauge",
        "Tasks by state (queued is the queue depth).",
        &[
            ("{state=\"queued\"}".into(), g.queued),
            ("{state=\"running\"}".into(), g.running),
            ("{state=\"done\"}".into(), g.done),
            ("{state=\"failed\"}".into(), g.failed),
        ],
    );
    family(
        &mut out,
        "drover_task_outcomes_total",
        "counter",
        "Tasks by how they ended.",
        &[
            ("{outcome=\"completed\"}".into(), t.completed),
            ("{outcome=\"failed\"}".into(), t.failed),
            ("{outcome=\"aborted\"}".into(), t.aborted),
        ],
    );
    family(&mut out, "drover_tasks_submitted_total", "counter", "Tasks submitted.", &one(t.submitted));
    family(
        &mut out,
        "drover_tasks_unplaceable_total",
        "counter",
        "Tasks failed because no worker would take them for --unplaceable-after (counted in failed too).",
        &one(t.unplaceable),
    );
    family(
        &mut out,
        "drover_task_attempts_total",
        "counter",
        "Task attempts by event: dispatched (sent to a worker, refused ones included), started (the worker ran it), refused, retried, timed_out.",
        &[
            ("{event=\"dispatched\"}".into(), t.dispatched),
            ("{event=\"started\"}".into(), t.started),
            ("{event=\"retried\"}".into(), t.retries),
            ("{event=\"refused\"}".into(), t.refusals),
            ("{event=\"timed_out\"}".into(), t.timeouts),
        ],
    );
    let j = &s.journal;
    family(&mut out, "drover_journal_entries_total", "counter", "Inputs made durable.", &one(j.entries));
    family(
        &mut out,
        "drover_journal_records_total",
        "counter",
        "Journal records (group-committed batches) written.",
        &one(j.records),
    );
    family(&mut out, "drover_journal_bytes_total", "counter", "Journal bytes written.", &one(j.bytes));
    family(&mut out, "drover_journal_fsyncs_total", "counter", "fdatasync calls.", &one(j.fsyncs));
    family(&mut out, "drover_journal_max_batch", "gauge", "Largest batch, in inputs.", &one(j.max_batch));
    family(&mut out, "drover_journal_checkpoints_total", "counter", "Checkpoints written.", &one(j.checkpoints));
    let hs = &s.histograms;
    histogram(
        &mut out,
        "drover_journal_append_seconds",
        "From journal append to durable (written and fdatasync'ed).",
        &hs.append_us,
        1e-6,
    );
    histogram(&mut out, "drover_journal_fsync_seconds", "Each fdatasync of the journal.", &hs.fsync_us, 1e-6);
    histogram(
        &mut out,
        "drover_journal_batch_entries",
        "Inputs per journal record (group-commit batch size).",
        &hs.batch_entries,
        1.0,
    );
    histogram(
        &mut out,
        "drover_checkpoint_seconds",
        "Writing a checkpoint (atomic, fsync'ed).",
        &hs.checkpoint_us,
        1e-6,
    );
    {
        use std::fmt::Write;
        let _ =
            writeln!(out, "# HELP drover_replay_seconds How long recovery (checkpoint load and replay) took at start.");
        let _ = writeln!(out, "# TYPE drover_replay_seconds gauge");
        let _ = writeln!(out, "drover_replay_seconds {}", s.replay_us as f64 * 1e-6);
    }
    family(&mut out, "drover_replayed_inputs", "gauge", "Inputs replayed at start.", &one(s.replayed_inputs));
    family(
        &mut out,
        "drover_inputs_applied_total",
        "counter",
        "Inputs applied to the core.",
        &one(h.applied.load(Ordering::Relaxed)),
    );
    family(
        &mut out,
        "drover_inputs_released_total",
        "counter",
        "Inputs whose outputs were released: durable on this controller, or committed on a majority of its cluster.",
        &one(h.durable.load(Ordering::Relaxed)),
    );
    family(
        &mut out,
        "drover_journal_failed",
        "gauge",
        "1 once a journal write failed (the controller is stopping), else 0.",
        &one(u64::from(h.journal_failed.load(Ordering::Relaxed))),
    );
    family(
        &mut out,
        "drover_serving",
        "gauge",
        "1 while this controller serves nodes and CLIs (a cluster member: while it leads with a majority behind it), else 0.",
        &one(u64::from(h.serving.load(Ordering::Relaxed))),
    );
    family(
        &mut out,
        "drover_inputs_queued",
        "gauge",
        "Events waiting for the owner.",
        &one(h.queued.load(Ordering::Relaxed)),
    );
    out
}
