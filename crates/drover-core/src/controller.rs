//! The controller's state and the rules that change it.
//!
//! `apply` handles one input, then `settle` re-establishes the assignment invariants
//! (timeouts, failover, stale streamers, drains, pins) and sends every node whose set
//! of pairs changed its full new set in one `NodeStreamModifyStateV1Req`. Every map is
//! a `BTreeMap`, so iteration order, and with it every output, is the same on replay.

use std::collections::{BTreeMap, BTreeSet};

use drover_proto::{Any, Payload, v1};
use serde::{Deserialize, Serialize};

use crate::input::{AdmissionRefusal, Config, Credential, Event, Input, OperatorRole, Output, Policy};
use crate::rng::SplitMix64;
use crate::{MAX_ID_LEN, MAX_PAIR_LEN, MAX_PAIRS_PER_NODE};

mod admission;
mod cli;
pub(crate) mod durable;
mod fleet;
pub(crate) mod identity;
mod queries;
pub(crate) mod tasks;

/// How a node looks to an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Connected and heard from recently.
    Online,
    /// Connected, but silent for more than half the node timeout.
    Suspect,
    /// Connected and being drained.
    Draining,
    /// Not connected; after a restart, within the rejoin grace.
    Rejoining,
    /// Not connected.
    Gone,
}

impl NodeState {
    /// The name used in `NodeInfo.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Suspect => "suspect",
            NodeState::Draining => "draining",
            NodeState::Rejoining => "rejoining",
            NodeState::Gone => "gone",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Node {
    name: String,
    version: String,
    known: BTreeSet<String>,
    worker: bool,
    session: Option<u64>,
    connected_since_ms: i64,
    last_seen_ms: i64,
    gone_at_ms: Option<i64>,
    draining: bool,
    /// Was streaming when the controller restarted and has not come back yet.
    rejoining: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    node: String,
    epoch: u64,
    since_ms: i64,
    last_update_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PriceRec {
    mantissa: i64,
    scale: u32,
    upstream_time_ms: i64,
    seq: u64,
    epoch: u64,
    streamer: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Pair {
    /// The last epoch issued for this pair.
    epoch: u64,
    /// The streamer whose updates are accepted.
    current: Option<Lease>,
    /// A streamer taking over make-before-break: its first update makes it current.
    next: Option<Lease>,
    latest: Option<PriceRec>,
    pinned_to: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Cli {
    /// Checkpointed as the byte `admin: bool` was (read 0, admin 1).
    role: OperatorRole,
    /// Price watches: stream id → pairs (empty: all).
    watches: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Token {
    secret_hash: [u8; 32],
    role: i32,
    description: String,
    created_ms: i64,
    /// 0: never.
    expires_ms: i64,
    /// `None`: unlimited.
    uses_left: Option<u32>,
    revoked: bool,
}

impl Token {
    fn usable(&self, now_ms: i64) -> Result<(), AdmissionRefusal> {
        if self.revoked {
            return Err(AdmissionRefusal::Revoked);
        }
        if self.expires_ms != 0 && now_ms >= self.expires_ms {
            return Err(AdmissionRefusal::Expired);
        }
        if self.uses_left == Some(0) {
            return Err(AdmissionRefusal::UsedUp);
        }
        Ok(())
    }
}

/// Most tokens kept (revoked and expired ones count until they are pruned).
pub const MAX_TOKENS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PendingReply {
    cli_session: u64,
    stream_id: String,
    node: String,
}

/// Event counters, kept in the state (so they survive restarts) for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Streamer assignments issued.
    pub assignments: u64,
    /// Pairs taken from a gone node.
    pub failovers: u64,
    /// Pairs taken from a silent streamer.
    pub stale_reassignments: u64,
    /// Make-before-break handovers completed.
    pub handovers: u64,
    /// Price updates accepted.
    pub prices_accepted: u64,
    /// Price updates older than the newest known (dropped).
    pub prices_stale: u64,
    /// Price updates from a deposed streamer (dropped).
    pub prices_fenced: u64,
    /// Malformed or refused messages.
    pub refused: u64,
    /// CLI commands handled.
    pub cli_commands: u64,
    /// Nodes declared gone after missing keepalives.
    pub timeouts: u64,
    /// Admissions granted.
    pub admissions: u64,
    /// Admissions refused.
    pub admission_refusals: u64,
}

/// The controller's whole state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controller {
    config: Config,
    rng: SplitMix64,
    now_ms: i64,
    nodes: BTreeMap<String, Node>,
    pairs: BTreeMap<String, Pair>,
    clis: BTreeMap<u64, Cli>,
    pending: BTreeMap<String, PendingReply>,
    next_request: u64,
    grace_until_ms: Option<i64>,
    tokens: BTreeMap<String, Token>,
    counters: Counters,
    /// The task plane (seed 2: this controller is the manager).
    tasks: tasks::TaskPlane,
    /// Which credential each node id belongs to, and its ticket generation. Written to
    /// checkpoints after the rest (see `checkpoint`), so older checkpoints still load.
    #[serde(skip)]
    ids: identity::Identities,
    /// Working memory of the current input; empty (or merely a cache) between inputs,
    /// so it is neither checkpointed nor compared.
    #[serde(skip)]
    scratch: Scratch,
}

/// Per-input working memory. Equal to any other `Scratch`: it holds nothing that is
/// part of the state.
#[derive(Clone, Debug, Default)]
struct Scratch {
    /// Nodes whose pair set changed during the current input.
    dirty: BTreeSet<String>,
    /// Pairs with a newly accepted price during the current input.
    published: Vec<String>,
    /// No time-based rule can fire before this (a cache of `next_deadline`; 0 = unknown).
    quiet_until_ms: i64,
    /// The current input changed a lease (a handover completed): settle fully.
    force_settle: bool,
    /// `Output::Assigned` notices of the current input.
    assigned: Vec<Output>,
    /// Pair → nodes that know it (`None`: rebuild).
    known_by: Option<BTreeMap<String, BTreeSet<String>>>,
    /// The task plane's working memory.
    tasks: tasks::TaskScratch,
}

impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Scratch {}

/// An input with its message decoded once, at the top of `handle`. Small: a decoded
/// `Payload` is 400 bytes, so all but the hot price update are boxed, and the step is
/// moved cheaply through the dispatch.
enum Step {
    /// A message on a node's stream.
    Node { node: String, session: u64, request_id: String, msg: NodeMsg },
    /// A command on a CLI stream: the Any as received (forwarded as is when fanned out)
    /// and its decoded payload.
    Cli { session: u64, stream_id: String, node_uuids: Vec<String>, any: Any, payload: Result<Box<Payload>, String> },
    /// Every other event, as it came.
    Other(Event),
}

/// What a node's message is.
pub(super) enum NodeMsg {
    /// A reply to a command a CLI fanned out to the node: passed on unread.
    Reply(Any),
    /// A price update (most inputs), unboxed.
    Price(v1::NodePriceUpdateV1Notify),
    /// Anything else, decoded (its type URL kept for refusals and fencing).
    Message { type_url: String, payload: Result<Box<Payload>, String> },
}

/// A decoded payload, boxed (see `Step`), or why it did not decode.
fn boxed(p: Result<Payload, drover_proto::PayloadError>) -> Result<Box<Payload>, String> {
    p.map(Box::new).map_err(|e| e.to_string())
}

impl Controller {
    /// Decodes the message an event carries, once.
    fn decode(&self, event: Event) -> Step {
        match event {
            // `from_uuid` is not needed: replies are routed by request id.
            Event::NodeMessage { node, session, request_id, from_uuid: _, type_url, value } => {
                let any = Any { type_url, value };
                let msg = if self.is_pending_reply(&node, &request_id) {
                    NodeMsg::Reply(any)
                } else {
                    match Payload::from_any(&any) {
                        Ok(Payload::NodePriceUpdateV1Notify(u)) => NodeMsg::Price(u),
                        other => NodeMsg::Message { type_url: any.type_url, payload: boxed(other) },
                    }
                };
                Step::Node { node, session, request_id, msg }
            }
            Event::CliMessage { session, stream_id, cli_uuid: _, node_uuids, request_id: _, type_url, value } => {
                let any = Any { type_url, value };
                let payload = boxed(Payload::from_any(&any));
                Step::Cli { session, stream_id, node_uuids, any, payload }
            }
            other => Step::Other(other),
        }
    }
}

/// Constant-time equality of two hashes.
fn subtle_eq(a: &[u8; 32], b: &[u8; 32]) -> subtle::Choice {
    use subtle::ConstantTimeEq;
    a.ct_eq(b)
}

fn any_of(p: impl Into<Payload>) -> Any {
    p.into().to_any()
}

fn valid_pair(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PAIR_LEN && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b))
}

impl Controller {
    /// A fresh state.
    pub fn new(config: Config) -> Self {
        let config = config.bounded();
        Controller {
            rng: SplitMix64(config.seed),
            config,
            now_ms: 0,
            nodes: BTreeMap::new(),
            pairs: BTreeMap::new(),
            clis: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_request: 0,
            grace_until_ms: None,
            tokens: BTreeMap::new(),
            counters: Counters::default(),
            tasks: tasks::TaskPlane::default(),
            ids: identity::Identities::default(),
            scratch: Scratch::default(),
        }
    }

    /// Applies one input: its message (if it carries one) is decoded once, here, and
    /// everything below dispatches on the decoded value.
    pub fn handle(&mut self, input: Input, out: &mut Vec<Output>) {
        self.now_ms = self.now_ms.max(input.at_ms.clamp(0, crate::input::MAX_TIME_MS));
        let step = self.decode(input.event);
        // Price updates and heartbeats only move deadlines later and, unless one
        // completes a handover (`force_settle`), do not change who streams what, so
        // they skip the full settle unless a deadline is due. A full settle when
        // nothing is due changes nothing, so replay (which starts with an empty cache)
        // reaches the same state; `tests/sim.rs` checks exactly that.
        // Admission verdicts and token creation touch only the tokens; a node's reply
        // to a command a CLI fanned out is only passed on to the CLI.
        let routine = match &step {
            Step::Node { msg: NodeMsg::Reply(_) | NodeMsg::Price(_), .. } => true,
            Step::Node { msg: NodeMsg::Message { payload, .. }, .. } => {
                matches!(payload.as_deref(), Ok(Payload::NodeHeartbeatV1Notify(_)))
            }
            Step::Cli { .. } => false,
            Step::Other(e) => matches!(
                e,
                Event::AdmissionAttempt { .. }
                    | Event::Admission { .. }
                    | Event::TokenCreate { .. }
                    | Event::NodeRefused { .. }
                    | Event::CliRefused { .. }
            ),
        };
        // Task reports and task commands touch only the task plane: they need its
        // settle (placement, task deadlines), not the fleet's.
        let task_input = match &step {
            Step::Node { msg: NodeMsg::Message { payload: Ok(p), .. }, .. } => matches!(
                **p,
                Payload::TaskStartedV1Req(_)
                    | Payload::TaskErrorV1Req(_)
                    | Payload::TaskCompletedV1Req(_)
                    | Payload::AckV1Reply(_)
                    | Payload::TasksPongV1Reply(_)
                    | Payload::TasksRefusedV1Reply(_)
            ),
            Step::Cli { payload: Ok(p), .. } => matches!(
                **p,
                Payload::ControllerTaskRunV1Req(_)
                    | Payload::ControllerTaskListV1Req(_)
                    | Payload::ControllerTaskStatusV1Req(_)
                    | Payload::ControllerTaskAbortV1Req(_)
                    | Payload::ControllerTaskLogsV1Req(_)
            ),
            _ => false,
        };
        let routine = routine || task_input;
        // A node connecting, leaving or saying what it knows can change only the pairs
        // it knows (before or after; a node's leases are on pairs it knows), so when no
        // deadline is due only those are settled: with a large fleet a full settle per
        // join would make joining quadratic. Same result as the full settle: the other
        // pairs' settle would change nothing (it runs whenever something is due), and
        // the picks happen in the same order (a pick with no candidate draws nothing).
        let targeted: Option<(String, BTreeSet<String>)> = match &step {
            Step::Other(
                Event::NodeConnected { node, .. }
                | Event::NodeOpened { node, .. }
                | Event::NodeDisconnected { node, .. },
            ) => Some(node.clone()),
            Step::Node { node, msg: NodeMsg::Message { payload: Ok(p), .. }, .. }
                if matches!(**p, Payload::NodeKnownCurrenciesV1Notify(_)) =>
            {
                Some(node.clone())
            }
            _ => None,
        }
        .map(|node| {
            let known = self.nodes.get(&node).map(|n| n.known.clone()).unwrap_or_default();
            (node, known)
        });
        match step {
            Step::Node { node, session, request_id, msg } => self.node_message(&node, session, request_id, msg, out),
            Step::Cli { session, stream_id, node_uuids, any, payload } => {
                self.cli_message(session, stream_id, node_uuids, any, payload, out)
            }
            // `decode` turns every message into a `Step` of its own.
            Step::Other(Event::NodeMessage { .. } | Event::CliMessage { .. }) => {}
            Step::Other(Event::ControllerStarted { config }) => self.started(config),
            Step::Other(Event::Tick) => {}
            Step::Other(Event::NodeConnected { node, session }) => self.node_connected(node, session, out),
            Step::Other(Event::NodeDisconnected { node, session }) => {
                if let Some(n) = self.nodes.get_mut(&node).filter(|n| n.session == Some(session)) {
                    n.session = None;
                    self.scratch.tasks.rescan();
                    n.gone_at_ms = Some(self.now_ms);
                }
            }
            Step::Other(Event::CliConnected { session, role }) => {
                self.clis.insert(session, Cli { role, watches: BTreeMap::new() });
            }
            Step::Other(Event::CliDisconnected { session }) => {
                self.clis.remove(&session);
                self.pending.retain(|_, p| p.cli_session != session);
            }
            Step::Other(Event::TokenCreate {
                session,
                stream_id,
                id,
                secret_hash,
                role,
                ttl_ms,
                uses,
                description,
            }) => self.token_create(session, &stream_id, id, secret_hash, role, ttl_ms, uses, description, out),
            Step::Other(Event::AdmissionAttempt { attempt, node, token_id: id, secret_hash }) => {
                self.admission(attempt, &node, Credential::Token { id, secret_hash }, out)
            }
            Step::Other(Event::Admission { attempt, node, credential }) => {
                self.admission(attempt, &node, credential, out)
            }
            Step::Other(Event::NodeOpened { node, session, generation }) => {
                if self.ids.current(&node, generation) {
                    self.node_connected(node, session, out);
                } else {
                    self.ids.stale_tickets += 1;
                    self.counters.refused += 1;
                    let reason = "session ticket no longer valid (the node was evicted, its token revoked, it was forgotten, or it was admitted again since): pass admission again";
                    out.push(Output::CloseNode { node, session, reason: reason.into() });
                }
            }
            Step::Other(Event::NodeRefused { node, session, request_id, type_url, reason }) => {
                self.counters.refused += 1;
                if self.nodes.get(&node).is_some_and(|n| n.session == Some(session)) {
                    out.push(Self::reply_to_node(
                        &node,
                        session,
                        request_id,
                        v1::UnknownCommandV1Notify { type_url, reason },
                    ));
                }
            }
            Step::Other(Event::CliRefused { session, stream_id, type_url, reason }) => {
                self.counters.refused += 1;
                if self.clis.contains_key(&session) {
                    self.counters.cli_commands += 1;
                    out.push(Self::count(session, &stream_id, 1, Vec::new()));
                    out.push(Self::to_cli(session, &stream_id, None, v1::UnknownCommandV1Notify { type_url, reason }));
                }
            }
        }
        let due = self.now_ms >= self.scratch.quiet_until_ms || std::mem::take(&mut self.scratch.force_settle);
        if due || (!routine && targeted.is_none()) {
            self.settle(out);
            self.scratch.quiet_until_ms = self.next_deadline().unwrap_or(i64::MAX);
        } else if let Some((node, mut pairs)) = targeted {
            if let Some(n) = self.nodes.get(&node) {
                pairs.extend(n.known.iter().cloned());
            }
            for name in pairs {
                if self.pairs.get(&name).is_some_and(|p| !self.pair_is_quiet(&name, p)) {
                    self.settle_pair(&name);
                }
            }
            self.work().settle_tasks(out);
            // New deadlines: this node's keepalive or retention, new leases going stale,
            // tasks. An early bound is safe (a settle with nothing due is a no-op).
            let soonest = self.config.node_timeout_ms.min(self.config.stale_after_ms) + 1;
            let due = self.scratch.tasks.deadline().unwrap_or(i64::MAX).min(self.now_ms + soonest);
            self.scratch.quiet_until_ms = self.scratch.quiet_until_ms.min(due);
        } else if task_input {
            self.work().settle_tasks(out);
            let due = self.scratch.tasks.deadline().unwrap_or(i64::MAX);
            self.scratch.quiet_until_ms = self.scratch.quiet_until_ms.min(due);
        }
        self.flush(out);
        out.append(&mut self.scratch.tasks.ended);
    }
}
