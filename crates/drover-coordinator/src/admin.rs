//! Operating an instance's replicas: `drover coordinator status`, `add-replica`,
//! `remove-replica` and `transfer-primary`, over the replicas' Raft ports.
//!
//! A request travels as drover-raft's forwarded request (the Raft port's own
//! authenticated connection: only holders of the group's secret are heard), in
//! postcard. Any replica answers `Info` (its own view) and `Status` (it asks every
//! replica of the membership for its `Info` and puts them side by side). Changes
//! (`Transfer`, `Add`, `Remove`) are the leader's: a replica that does not lead passes
//! them on to the one it knows leads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_raft::machine::RaftMachine;
use drover_raft::member::Leadership;
use drover_raft::network::{ForwardHandler, Forwarder};
use drover_raft::openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use drover_raft::tls::Credentials;
use drover_raft::types::TypeConfig;
use serde::{Deserialize, Serialize};

use crate::replica::{AppView, ReplicaInfo, Shared};
use crate::replicated::InstanceLog;

/// A request to a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// This replica's view of itself.
    Info,
    /// Every replica's view.
    Status,
    /// Hand the primary role to replica `to` (on the primary).
    Transfer {
        /// The replica to become primary.
        to: u64,
    },
    /// Add replica `id`, reachable at Raft address `raft` (learner, then voter).
    Add {
        /// Its id.
        id: u64,
        /// Its Raft address.
        raft: String,
    },
    /// Remove replica `id` from the group.
    Remove {
        /// Its id.
        id: u64,
    },
    /// To replica `id` itself, from the leader once its removal is committed: it ends
    /// its application's session and stops (openraft does not tell it).
    Removed {
        /// Its id.
        id: u64,
    },
}

/// A replica's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// To `Info`.
    Info(ReplicaInfo),
    /// To `Status`.
    Status(InstanceStatus),
    /// A change was made (what was done).
    Done(String),
}

/// One replica in the instance's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// Its id.
    pub id: u64,
    /// Whether it votes (a replica being added does not yet).
    pub voter: bool,
    /// Its Raft address in the membership.
    pub raft: String,
    /// Its answer (`None`: unreachable).
    pub info: Option<ReplicaInfo>,
    /// Records it is behind the primary (when both answered).
    pub lag: Option<i64>,
}

/// The instance as its replicas report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The instance.
    pub instance: String,
    /// The primary (the replica reporting itself leader in the highest term).
    pub primary: Option<u64>,
    /// The primary's term (or the highest any replica reports).
    pub term: u64,
    /// The primary's commit index.
    pub commit_index: Option<u64>,
    /// Every replica of the membership.
    pub replicas: Vec<ReplicaView>,
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No replica could be reached.
    #[error("no replica answered ({0})")]
    Unreachable(String),
    /// A replica refused or failed the request.
    #[error("{0}")]
    Refused(String),
    /// The answer is not of this protocol.
    #[error("undecodable answer: {0}")]
    Decode(String),
}

/// What the admin handler works on (set once the member has started).
pub(crate) struct Ctx {
    pub(crate) raft: Raft<TypeConfig>,
    pub(crate) machine: RaftMachine<InstanceLog>,
    pub(crate) leadership: Leadership,
    pub(crate) creds: Credentials,
    pub(crate) shared: Shared,
}

/// Where the handler finds its [`Ctx`].
pub(crate) type Slot = Arc<Mutex<Option<Ctx>>>;

const TTL: Duration = Duration::from_secs(2);

/// The forwarded-request handler of a replica.
pub(crate) fn handler(slot: Slot) -> ForwardHandler {
    Arc::new(move |bytes: Vec<u8>| {
        let slot = slot.clone();
        Box::pin(async move {
            let request: Request = postcard::from_bytes(&bytes).map_err(|e| format!("bad admin request: {e}"))?;
            let parts = {
                let guard = slot.lock().map_err(|_| "replica state unavailable".to_owned())?;
                let c = guard.as_ref().ok_or_else(|| "this replica is starting or stopping".to_owned())?;
                (c.raft.clone(), c.machine.clone(), c.leadership.clone(), c.creds.clone(), c.shared.clone())
            };
            let answer = handle(request, parts).await?;
            postcard::to_allocvec(&answer).map_err(|e| e.to_string())
        })
    })
}

type Parts = (Raft<TypeConfig>, RaftMachine<InstanceLog>, Leadership, Credentials, Shared);

fn info(raft: &Raft<TypeConfig>, machine: &RaftMachine<InstanceLog>, shared: &Shared) -> ReplicaInfo {
    let m = raft.metrics().borrow().clone();
    let role = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    let (records, digest, version, checkpoints) =
        machine.with_core(|c| (c.next_seq(), c.digest(), c.version(), c.checkpoints()));
    ReplicaInfo {
        instance: shared.instance.clone(),
        id: m.id,
        role: role.into(),
        term: m.current_term,
        leader: m.current_leader,
        commit_index: m.last_applied.map_or(0, |l| l.index),
        records,
        digest,
        version,
        checkpoints,
        app: shared.app.lock().map(|a| a.clone()).unwrap_or_else(|_| AppView::default()),
        addresses: (*shared.addresses).clone(),
    }
}

async fn handle(request: Request, parts: Parts) -> Result<Answer, String> {
    let (raft, machine, leadership, creds, shared) = parts;
    let me = raft.metrics().borrow().id;
    match request {
        Request::Info => Ok(Answer::Info(info(&raft, &machine, &shared))),
        Request::Status => Ok(Answer::Status(status(&raft, &machine, &creds, &shared).await)),
        Request::Removed { id } => {
            if id != me {
                return Err(format!("this is replica {me}, not {id}"));
            }
            shared.mark_removed().map_err(|e| format!("marking replica {me} removed: {e}"))?;
            tracing::warn!(replica = me, "the leader removed this replica from the instance's group");
            Ok(Answer::Done(format!("replica {me} stops")))
        }
        change => {
            let m = raft.metrics().borrow().clone();
            if m.current_leader != Some(me) {
                // The leader decides; pass it on once.
                let leader = m.current_leader.ok_or("no replica leads right now: try again in a second")?;
                let addr = m
                    .membership_config
                    .membership()
                    .get_node(&leader)
                    .map(|n| n.addr.clone())
                    .ok_or("the leader's address is unknown")?;
                let body = postcard::to_allocvec(&change).map_err(|e| e.to_string())?;
                let answer = Forwarder::new(creds)
                    .call(&addr, body, Duration::from_secs(20))
                    .await
                    .map_err(|e| e.to_string())?;
                return postcard::from_bytes(&answer).map_err(|e| e.to_string());
            }
            match change {
                Request::Transfer { to } => {
                    leadership.transfer(to).await.map_err(|e| e.to_string())?;
                    Ok(Answer::Done(format!("replica {to} is primary")))
                }
                Request::Add { id, raft: addr } => {
                    raft.add_learner(id, BasicNode::new(&addr), true)
                        .await
                        .map_err(|e| format!("adding replica {id} as a learner: {e}"))?;
                    let mut voters: std::collections::BTreeSet<u64> =
                        raft.metrics().borrow().membership_config.membership().voter_ids().collect();
                    voters.insert(id);
                    raft.change_membership(voters, false)
                        .await
                        .map_err(|e| format!("making replica {id} a voter: {e}"))?;
                    Ok(Answer::Done(format!("replica {id} ({addr}) added")))
                }
                Request::Remove { id } => {
                    if id == me {
                        return Err(format!(
                            "replica {id} is primary: hand the role over first (drover coordinator transfer-primary)"
                        ));
                    }
                    let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone());
                    raft.change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                        .await
                        .map_err(|e| format!("removing replica {id}: {e}"))?;
                    // Then tell it (it may be down: then it is told nothing, and stays
                    // stopped only if its operator stops it).
                    let body = postcard::to_allocvec(&Request::Removed { id }).map_err(|e| e.to_string())?;
                    let told = match addr {
                        Some(a) => Forwarder::new(creds).call(&a, body, TTL).await.map_err(|e| e.to_string()),
                        None => Err("its address is not in the membership".into()),
                    };
                    Ok(Answer::Done(match told {
                        Ok(_) => format!("replica {id} removed; it ended its application's session and stops"),
                        Err(e) => format!(
                            "replica {id} removed; it could not be told ({e}): stop its process and application"
                        ),
                    }))
                }
                Request::Info | Request::Status | Request::Removed { .. } => unreachable!("answered above"),
            }
        }
    }
}

async fn status(
    raft: &Raft<TypeConfig>,
    machine: &RaftMachine<InstanceLog>,
    creds: &Credentials,
    shared: &Shared,
) -> InstanceStatus {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let nodes: Vec<(u64, String)> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    let mut set = tokio::task::JoinSet::new();
    let body = postcard::to_allocvec(&Request::Info).unwrap_or_default();
    let forwarder = Forwarder::new(creds.clone());
    for (id, addr) in nodes.iter().cloned() {
        if id == m.id {
            continue;
        }
        let (forwarder, body) = (forwarder.clone(), body.clone());
        set.spawn(async move {
            let answer = forwarder.call(&addr, body, TTL).await.ok();
            let info = answer.and_then(|a| match postcard::from_bytes(&a) {
                Ok(Answer::Info(i)) => Some(i),
                _ => None,
            });
            (id, info)
        });
    }
    let mut infos: BTreeMap<u64, Option<ReplicaInfo>> = BTreeMap::new();
    infos.insert(m.id, Some(info(raft, machine, shared)));
    while let Some(r) = set.join_next().await {
        if let Ok((id, i)) = r {
            infos.insert(id, i);
        }
    }
    let primary = infos.values().flatten().filter(|i| i.role == "leader").max_by_key(|i| i.term).cloned();
    let term = primary.as_ref().map_or_else(|| infos.values().flatten().map(|i| i.term).max().unwrap_or(0), |p| p.term);
    let replicas = nodes
        .iter()
        .map(|(id, addr)| {
            let info = infos.get(id).cloned().flatten();
            let lag = info.as_ref().zip(primary.as_ref()).map(|(i, p)| (p.records - i.records).max(0));
            ReplicaView { id: *id, voter: voters.contains(id), raft: addr.clone(), info, lag }
        })
        .collect();
    InstanceStatus {
        instance: shared.instance.clone(),
        primary: primary.as_ref().map(|p| p.id),
        term,
        commit_index: primary.as_ref().map(|p| p.commit_index),
        replicas,
    }
}

/// Sends `request` to the first of `addrs` (replicas' Raft addresses) that answers.
pub async fn ask(addrs: &[String], creds: &Credentials, request: &Request) -> Result<Answer, AdminError> {
    let body = postcard::to_allocvec(request).map_err(|e| AdminError::Decode(e.to_string()))?;
    let forwarder = Forwarder::new(creds.clone());
    let ttl = match request {
        Request::Info | Request::Status | Request::Removed { .. } => Duration::from_secs(5),
        _ => Duration::from_secs(30),
    };
    let mut errors = Vec::new();
    for addr in addrs {
        match forwarder.call(addr, body.clone(), ttl).await {
            Ok(a) => return postcard::from_bytes(&a).map_err(|e| AdminError::Decode(e.to_string())),
            Err(drover_raft::network::ForwardError::Refused(why)) => return Err(AdminError::Refused(why)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(AdminError::Unreachable(errors.join("; ")))
}
