//! A controller that is one member of a replicated group: starting the member, keeping
//! the "who leads" hint current, and the cluster's HTTP endpoints.
//!
//! The member's Raft log and snapshot live in `DATA_DIR/raft` (never mixed with a
//! single controller's `DATA_DIR/journal`). Its core starts from the same seed on every
//! member (derived from the cluster secret), so every member applying the same
//! committed inputs reaches the same state: the core is deterministic, and the seed
//! is part of it.
//!
//! Endpoints (on the controller's HTTP port):
//! - `GET /api/cluster`: the cluster view (`drover cluster status`), asked of every
//!   member over the Raft port, on any member;
//! - `POST /api/cluster/add?id=N&raft=HOST:PORT` and `POST /api/cluster/remove?id=N`
//!   (admin token; on the leader): membership changes through openraft (a new member
//!   joins as a learner, catches up, then becomes a voter);
//! - `POST /api/cluster/transfer?id=N` (admin token; on the leader): hands leadership
//!   to member N ([`drover_raft::member::Leadership`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use drover_raft::TypeConfig;
use drover_raft::member::{Member, Settings};
use drover_raft::openraft::{self, BasicNode, ChangeMembers, Raft};
use drover_raft::status::Addresses;
use drover_raft::tls::Credentials;
use tokio::net::TcpListener;

use crate::owner::{Backend, LeaderHint, Replicated};
use crate::{ClusterSettings, ControllerConfig, ShellError};

/// How long one member may take to answer a status request.
const STATUS_TTL: Duration = Duration::from_secs(2);

/// What the HTTP endpoints need of the member.
#[derive(Clone)]
pub(crate) struct ClusterHandle {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) creds: Credentials,
    pub(crate) about: Addresses,
    pub(crate) leadership: drover_raft::member::Leadership,
    pub(crate) stats: Arc<drover_raft::stats::RaftStats>,
}

/// Who leads, as the admission port needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Leader {
    /// No leader is known (an election, or this member is cut off).
    Unknown,
    /// This member leads (or is the one controller): admissions are decided here.
    Me,
    /// Another member leads: admissions are forwarded to its Raft address, and nodes
    /// stream to its gRPC address (`None` until it answered a status request).
    Other {
        /// Its Raft address.
        raft: String,
        /// Its gRPC address, as nodes reach it.
        grpc: Option<String>,
    },
}

/// What the rest of the shell gets of a started member.
pub(crate) struct Started {
    pub(crate) backend: Backend,
    pub(crate) handle: ClusterHandle,
    /// Who leads, kept current.
    pub(crate) leader: tokio::sync::watch::Receiver<Leader>,
    /// Reaches the leader's forwarded-request handler.
    pub(crate) forwarder: drover_raft::network::Forwarder,
}

/// The core's random seed in a group: derived from the cluster secret, so every
/// member's core makes the same choices (and a what-if run holding the secret can
/// replay a log from its first entry).
pub fn core_seed(secret: &drover_raft::secret::ClusterSecret) -> u64 {
    u64::from_le_bytes(secret.derive("core seed")[..8].try_into().expect("8 of 32 bytes"))
}

/// Starts this controller's member of the group: its log and snapshot in
/// `DATA_DIR/raft`, the Raft port, and the task keeping the leader hint current.
pub(crate) async fn start(
    config: &ControllerConfig,
    c: &ClusterSettings,
    listener: TcpListener,
    storage: Arc<dyn drover_journal::Storage>,
    about: BTreeMap<String, String>,
    events: crate::owner::Inbox,
) -> Result<Started, ShellError> {
    let upstream = about.get("grpc").cloned().unwrap_or_default();
    let about: Addresses = Arc::new(about);
    let creds = Credentials { secret: c.secret.clone(), tls: c.tls.clone() };
    let mut core = config.core.clone();
    core.seed = core_seed(&c.secret);
    let settings = Settings {
        id: c.member,
        dir: config.data_dir.join("raft"),
        listener,
        peers: c.peers.clone(),
        creds: creds.clone(),
        about: about.clone(),
        timing: c.timing,
        forward: Some(crate::forward::handler(events, upstream)),
    };
    let member = Member::start(settings, storage, || drover_core::Controller::new(core))
        .await
        .map_err(|e| ShellError::Cluster(e.to_string()))?;
    let handle = ClusterHandle {
        raft: member.raft.clone(),
        creds: creds.clone(),
        about,
        leadership: member.leadership.clone(),
        stats: member.stats.clone(),
    };
    let hint =
        Arc::new(Mutex::new(LeaderHint { text: "no leader is known yet; retry shortly".to_owned(), grpc: None }));
    let (leader_tx, leader) = tokio::sync::watch::channel(Leader::Unknown);
    tokio::spawn(watch_leader(member.raft.clone(), creds.clone(), hint.clone(), leader_tx));
    tokio::spawn(watch_replication(member.raft.clone()));
    tracing::info!(member = c.member, dir = %config.data_dir.join("raft").display(), "cluster member started");
    let backend = Backend::Replicated(Box::new(Replicated::new(member, hint)));
    Ok(Started { backend, handle, leader, forwarder: drover_raft::network::Forwarder::new(creds) })
}

/// Keeps `hint` saying who leads and where (its gRPC address, asked of the leader
/// over the Raft port), for refusals on a member that does not lead, and `leader` for
/// the admission port. While the leader's gRPC address is unknown (it did not answer),
/// it is asked again every [`ASK_AGAIN`].
async fn watch_leader(
    raft: Raft<TypeConfig>,
    creds: Credentials,
    hint: Arc<Mutex<LeaderHint>>,
    leader: tokio::sync::watch::Sender<Leader>,
) {
    let mut metrics = raft.metrics();
    let mut known: Option<Option<u64>> = None;
    let mut ask_again = false;
    loop {
        let m = metrics.borrow_and_update().clone();
        if known != Some(m.current_leader) || ask_again {
            let mut leader_grpc = None;
            let (text, now) = match m.current_leader {
                None => ("no leader is elected right now; retry shortly".to_owned(), Leader::Unknown),
                Some(l) if l == m.id => (format!("member {l} (this one) leads"), Leader::Me),
                Some(l) => {
                    let addr = m.membership_config.membership().get_node(&l).map(|n| n.addr.clone());
                    let grpc = match &addr {
                        Some(a) => drover_raft::network::ask_status(a, &creds, STATUS_TTL)
                            .await
                            .ok()
                            .and_then(|s| s.addresses.get("grpc").cloned()),
                        None => None,
                    };
                    leader_grpc = grpc.clone();
                    let text = match &grpc {
                        Some(g) => format!("the leader is member {l}, gRPC at {g}"),
                        None => format!("the leader is member {l} (its gRPC address did not answer)"),
                    };
                    match addr {
                        Some(raft) => (text, Leader::Other { raft, grpc }),
                        None => (text, Leader::Unknown),
                    }
                }
            };
            tracing::debug!(leader = ?m.current_leader, term = m.current_term, "{text}");
            ask_again = matches!(now, Leader::Other { grpc: None, .. });
            if let Ok(mut h) = hint.lock() {
                *h = LeaderHint { text, grpc: leader_grpc };
            }
            leader.send_if_modified(|l| {
                let changed = *l != now;
                *l = now;
                changed
            });
            known = Some(m.current_leader);
        }
        if ask_again {
            if let Ok(Err(_)) = tokio::time::timeout(ASK_AGAIN, metrics.changed()).await {
                return;
            }
        } else if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// How soon a leader whose gRPC address did not answer is asked again.
const ASK_AGAIN: Duration = Duration::from_millis(500);

/// On the leader: logs once when a member stops taking entries (nothing acknowledged
/// for [`STALLED_AFTER`] while it is behind) and once when it resumes.
async fn watch_replication(raft: Raft<TypeConfig>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Per member: the last index it acknowledged, since when, and whether it is stalled.
    let mut seen: BTreeMap<u64, (u64, std::time::Instant, bool)> = BTreeMap::new();
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() || m.state == openraft::ServerState::Shutdown {
            return;
        }
        let Some(replication) = m.replication.as_ref() else {
            seen.clear();
            continue;
        };
        let last = m.last_log_index.unwrap_or(0);
        for (member, matched) in replication {
            let index = matched.map_or(0, |l| l.index);
            let now = std::time::Instant::now();
            let e = seen.entry(*member).or_insert((index, now, false));
            if index != e.0 || index >= last {
                if e.2 {
                    tracing::info!(member, index, "member replicating again");
                }
                *e = (index, now, false);
            } else if !e.2 && now.duration_since(e.1) >= STALLED_AFTER {
                tracing::warn!(member, index, behind = last - index, "member not replicating (down or unreachable?)");
                e.2 = true;
            }
        }
    }
}

/// How long a member behind the leader may acknowledge nothing before it is reported.
const STALLED_AFTER: Duration = Duration::from_secs(3);

/// `GET /api/cluster`: every member's view, side by side.
pub(crate) async fn status(State(s): State<crate::http::AppState>) -> Response {
    let Some(c) = &s.cluster else {
        return (StatusCode::NOT_FOUND, "this controller is not a cluster member\n").into_response();
    };
    let view = drover_raft::status::gather(&c.raft, &c.creds, &c.about, STATUS_TTL).await;
    json(&view)
}

fn json(view: &drover_raft::status::ClusterStatus) -> Response {
    let body = serde_json::to_string(view).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    ([("content-type", "application/json"), ("cache-control", "no-store")], body).into_response()
}

/// The query of a membership change: `id=N` and, to add, `raft=HOST:PORT`.
struct Change {
    id: u64,
    raft: Option<String>,
}

impl Change {
    fn parse(query: Option<&str>) -> Result<Change, String> {
        let mut id = None;
        let mut raft = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = v.replace("%3A", ":").replace("%3a", ":");
            match k {
                "id" => id = Some(v.parse::<u64>().map_err(|_| format!("id={v} is not a member id"))?),
                "raft" => raft = Some(v),
                other => return Err(format!("unknown parameter {other}")),
            }
        }
        Ok(Change { id: id.ok_or("id=N is required")?, raft })
    }
}

/// `POST /api/cluster/add?id=N&raft=HOST:PORT`, `/api/cluster/remove?id=N` and
/// `/api/cluster/transfer?id=N`.
pub(crate) async fn change(
    State(s): State<crate::http::AppState>,
    axum::extract::Path(action): axum::extract::Path<String>,
    RawQuery(query): RawQuery,
    peer: Option<axum::Extension<crate::http::PeerAddr>>,
    headers: HeaderMap,
) -> Response {
    let Some(c) = s.cluster.clone() else {
        return (StatusCode::NOT_FOUND, "this controller is not a cluster member\n").into_response();
    };
    let q = match Change::parse(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    if let Err(refused) = crate::http::require_admin(&s, peer, &headers).await {
        return refused;
    }
    let m = c.raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        let body = format!(
            "this controller (member {}) does not lead; send membership changes to the leader (member {:?}, see drover cluster status)\n",
            m.id, m.current_leader
        );
        return (StatusCode::MISDIRECTED_REQUEST, body).into_response();
    }
    let result = match action.as_str() {
        "add" => {
            let Some(addr) = q.raft.filter(|a| !a.is_empty()) else {
                return (StatusCode::BAD_REQUEST, "add needs raft=HOST:PORT\n").into_response();
            };
            add(&c.raft, q.id, addr).await
        }
        "remove" if q.id == m.id => Err(format!(
            "member {} leads: hand leadership over first (drover cluster transfer-leader ID), then remove it on the new leader",
            q.id
        )),
        "transfer" => c.leadership.transfer(q.id).await.map_err(|e| e.to_string()),
        "remove" => c
            .raft
            .change_membership(ChangeMembers::RemoveVoters([q.id].into()), false)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => return (StatusCode::NOT_FOUND, "actions: add, remove, transfer\n").into_response(),
    };
    match result {
        Ok(()) => {
            tracing::info!(%action, member = q.id, "membership changed");
            let view = drover_raft::status::gather(&c.raft, &c.creds, &c.about, STATUS_TTL).await;
            json(&view)
        }
        Err(e) => {
            tracing::warn!(%action, member = q.id, error = %e, "membership change failed");
            (StatusCode::CONFLICT, format!("{action} member {}: {e}\n", q.id)).into_response()
        }
    }
}

/// Adds member `id` at `addr`: as a learner first (the call returns once it has caught
/// up), then as a voter.
async fn add(raft: &Raft<TypeConfig>, id: u64, addr: String) -> Result<(), String> {
    raft.add_learner(id, BasicNode::new(addr), true).await.map_err(|e| format!("as a learner: {e}"))?;
    let voters = ChangeMembers::<u64, openraft::BasicNode>::AddVoterIds([id].into());
    raft.change_membership(voters, false).await.map(drop).map_err(|e| format!("as a voter: {e}"))
}
