//! The controller's HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`
//! (unhealthy when the journal failed or inputs wait without being applied) and
//! `/readyz` (recovery finished). It reads only what the owner publishes: a metrics
//! snapshot through a `watch` channel and the `Health` atomics.

use crate::now_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::owner::{Health, Snapshot};

/// Inputs waiting longer than this without any being applied make the controller unhealthy.
const STALL_MS: i64 = 5_000;

#[derive(Clone)]
struct AppState {
    snapshot: watch::Receiver<Snapshot>,
    health: Arc<Health>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Snapshot>,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { snapshot, health });
    if let Some(acceptor) = tls {
        // HTTPS: each connection is a TLS handshake, then HTTP/1.1 or h2 over it.
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                _ = stop.changed() => return,
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    _ => {
                        tracing::debug!(%peer, "HTTPS handshake failed");
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    }
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "HTTP endpoint failed");
    }
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    if h.journal_failed.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: the journal cannot write\n");
    }
    let waiting = h.queued.load(Ordering::Relaxed) > 0;
    let idle_ms = now_ms() - h.last_applied_ms.load(Ordering::Relaxed);
    if waiting && idle_ms > STALL_MS {
        return (StatusCode::SERVICE_UNAVAILABLE, "unhealthy: inputs are waiting but none was applied\n");
    }
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n")
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let snap = s.snapshot.borrow().clone();
    ([("content-type", "text/plain; version=0.0.4")], render(&snap, &s.health))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// The Prometheus text exposition of a snapshot.
pub(crate) fn render(s: &Snapshot, h: &Health) -> String {
    let mut out = String::new();
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
        "Admissions refused, by reason.",
        &[
            ("{reason=\"credential\"}".into(), c.admission_refusals),
            ("{reason=\"malformed\"}".into(), s.malformed_credentials),
            ("{reason=\"rate_limited\"}".into(), s.rate_limited),
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
    family(
        &mut out,
        "drover_journal_fsync_microseconds_total",
        "counter",
        "Time spent in fdatasync (microseconds).",
        &one(j.fsync_nanos / 1_000),
    );
    family(&mut out, "drover_journal_max_batch", "gauge", "Largest batch, in inputs.", &one(j.max_batch));
    family(&mut out, "drover_journal_checkpoints_total", "counter", "Checkpoints written.", &one(j.checkpoints));
    family(
        &mut out,
        "drover_inputs_applied_total",
        "counter",
        "Inputs applied to the core.",
        &one(h.applied.load(Ordering::Relaxed)),
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
