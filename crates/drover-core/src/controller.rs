//! The controller's state and the rules that change it.
//!
//! `apply` handles one input, then `settle` re-establishes the assignment invariants
//! (timeouts, failover, stale streamers, drains, pins) and sends every node whose set
//! of pairs changed its full new set in one `NodeStreamModifyStateV1Req`. Every map is
//! a `BTreeMap`, so iteration order, and with it every output, is the same on replay.

use std::collections::{BTreeMap, BTreeSet};

use drover_proto::{Any, Payload, v1};
use serde::{Deserialize, Serialize};

use crate::input::{Config, Credential, Event, Input, Output, Policy};
use crate::rng::SplitMix64;
use crate::{MAX_ID_LEN, MAX_PAIR_LEN, MAX_PAIRS_PER_NODE};

pub(crate) mod durable;
pub(crate) mod identity;
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
    admin: bool,
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
    fn usable(&self, now_ms: i64) -> Result<(), &'static str> {
        if self.revoked {
            return Err("token revoked");
        }
        if self.expires_ms != 0 && now_ms >= self.expires_ms {
            return Err("token expired");
        }
        if self.uses_left == Some(0) {
            return Err("token has no uses left");
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
    /// No task time rule (overdue or lost attempt, end of a backoff) can fire before
    /// this (a cache, lowered whenever a deadline may have come earlier; 0 = unknown).
    task_due_ms: i64,
    /// Workers with free cores by (free cores, id), for placement (`None`: rebuild).
    free_index: Option<BTreeSet<(u32, String)>>,
    /// Pair → nodes that know it (`None`: rebuild).
    known_by: Option<BTreeMap<String, BTreeSet<String>>>,
    /// `Output::TaskEnded` notices of the current input.
    ended: Vec<Output>,
}

impl PartialEq for Scratch {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Scratch {}

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

    /// Admissions refused because the node id belongs to another credential, and node
    /// streams refused because their ticket's generation was no longer current.
    pub fn identity_counters(&self) -> (u64, u64) {
        (self.ids.refused, self.ids.stale_tickets)
    }

    /// Whether `request_id` from `node` answers a command a CLI fanned out to it (its
    /// reply is relayed to the CLI unread).
    pub fn is_pending_reply(&self, node: &str, request_id: &str) -> bool {
        self.pending.get(request_id).is_some_and(|p| p.node == node)
    }

    /// Whether CLI `session` holds an admin token.
    pub fn cli_is_admin(&self, session: u64) -> bool {
        self.clis.get(&session).is_some_and(|c| c.admin)
    }

    /// What a node id is bound to (`token <id>` or `certificate`), if it is.
    pub fn node_credential(&self, node: &str) -> Option<&str> {
        self.ids.credential_of(node)
    }

    /// Whether an operator token is valid now: `Ok(true)` admin, `Ok(false)` read only,
    /// or why it is refused. Read-only (nothing is consumed), so it needs no journaling.
    /// Nothing about a token is revealed before its secret matches.
    pub fn operator_role(&self, id: &str, secret_hash: &[u8; 32], now_ms: i64) -> Result<bool, &'static str> {
        const UNKNOWN: &str = "unknown token (a wrong secret, or a token of another controller's data directory)";
        let t = self.tokens.get(id).ok_or(UNKNOWN)?;
        if !bool::from(subtle_eq(&t.secret_hash, secret_hash)) {
            return Err(UNKNOWN);
        }
        t.usable(now_ms)?;
        match t.role {
            r if r == v1::TokenRole::Admin as i32 => Ok(true),
            r if r == v1::TokenRole::Read as i32 => Ok(false),
            _ => Err(
                "this is a join token, for nodes; CLI commands need a read or admin token (drover token create --role read|admin)",
            ),
        }
    }

    /// The stream a node is connected by, if it is connected.
    pub fn session_of(&self, node: &str) -> Option<u64> {
        self.nodes.get(node).and_then(|n| n.session)
    }

    /// A node as an operator knows it: its name and short id (`alpha (b62e77daa853)`),
    /// or the id alone for a node the core does not know.
    pub fn node_label(&self, id: &str) -> String {
        let short: String = id.chars().take(12).collect();
        match self.nodes.get(id).map(|n| n.name.as_str()).filter(|n| !n.is_empty()) {
            Some(name) => format!("{name} ({short})"),
            None => short,
        }
    }

    /// Whether any admin token is usable now.
    pub fn has_admin_token(&self, now_ms: i64) -> bool {
        self.tokens.values().any(|t| t.role == v1::TokenRole::Admin as i32 && t.usable(now_ms).is_ok())
    }

    /// Nodes per state (in `NodeState::as_str` names), and pairs with and without a
    /// streamer: the gauges for metrics.
    pub fn gauges(&self) -> (BTreeMap<&'static str, u64>, u64, u64) {
        let mut states = BTreeMap::new();
        for n in self.nodes.values() {
            *states.entry(self.node_state(n).as_str()).or_insert(0) += 1;
        }
        let with = self.pairs.values().filter(|p| p.current.is_some()).count() as u64;
        (states, with, self.pairs.len() as u64 - with)
    }

    /// What operators see: every node and pair, in one pass over each
    /// (O(nodes + pairs)).
    pub fn fleet_view(&self) -> crate::FleetView {
        let mut streaming: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let pairs = self
            .pairs
            .iter()
            .map(|(name, p)| {
                for l in [&p.current, &p.next].into_iter().flatten() {
                    streaming.entry(l.node.as_str()).or_default().push(name.clone());
                }
                crate::PairView {
                    pair: name.clone(),
                    streamer: p.current.as_ref().map(|l| l.node.clone()),
                    epoch: p.current.as_ref().map_or(p.epoch, |l| l.epoch),
                    incoming: p.next.as_ref().map(|l| l.node.clone()),
                    price: p.latest.as_ref().map(|r| drover_proto::format_decimal(r.mantissa, r.scale)),
                    upstream_time_ms: p.latest.as_ref().map(|r| r.upstream_time_ms),
                    // Since the streamer's last update; with nobody streaming, since the
                    // newest price's upstream time (when its age matters most).
                    age_ms: match &p.current {
                        Some(l) => Some(self.now_ms - l.last_update_ms.max(l.since_ms)),
                        None => p.latest.as_ref().map(|r| (self.now_ms - r.upstream_time_ms).max(0)),
                    },
                }
            })
            .collect();
        let nodes = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let load = self.tasks.worker_resources(id);
                crate::NodeView {
                    id: id.clone(),
                    name: n.name.clone(),
                    version: n.version.clone(),
                    state: self.node_state(n).as_str(),
                    connected_since_ms: n.connected_since_ms,
                    gone_since_ms: if n.session.is_none() { n.gone_at_ms } else { None },
                    worker: n.worker,
                    known_pairs: n.known.len(),
                    known: n.known.iter().take(crate::view::MAX_KNOWN_SHOWN).cloned().collect(),
                    streaming: streaming.remove(id.as_str()).unwrap_or_default(),
                    cores: load.map(|l| l.0),
                    used_cores: load.map(|l| l.1),
                    memory_mb: load.map(|l| l.2),
                }
            })
            .collect();
        crate::FleetView {
            at_ms: self.now_ms,
            nodes,
            pairs,
            tasks: Some(self.tasks.gauges()),
            recent_tasks: self.tasks.recent(crate::view::RECENT_TASKS),
        }
    }

    /// Whether `node` is in a worker relationship with this manager.
    pub fn is_task_worker(&self, node: &str) -> bool {
        self.tasks.is_worker(node)
    }

    /// A worker's declared cores and the cores reserved on it (`None`: not a worker of
    /// this manager).
    pub fn worker_load(&self, node: &str) -> Option<(u32, u32)> {
        self.tasks.worker_load(node)
    }

    /// Every task: id, state, cores, and its current attempt.
    pub fn task_states(&self) -> Vec<tasks::TaskState> {
        self.tasks.task_states()
    }

    /// The task plane's counters.
    pub fn task_counters(&self) -> &tasks::TaskCounters {
        &self.tasks.counters
    }

    /// Task queue depth and tasks by state (O(tasks)).
    pub fn task_gauges(&self) -> tasks::TaskGauges {
        self.tasks.gauges()
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The time of the last input.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The current streamer of `pair` and its epoch.
    pub fn streamer(&self, pair: &str) -> Option<(&str, u64)> {
        self.pairs.get(pair)?.current.as_ref().map(|l| (l.node.as_str(), l.epoch))
    }

    /// The node taking `pair` over make-before-break, if a handover is under way.
    pub fn incoming_streamer(&self, pair: &str) -> Option<(&str, u64)> {
        self.pairs.get(pair)?.next.as_ref().map(|l| (l.node.as_str(), l.epoch))
    }

    /// Every pair the controller knows of.
    pub fn pair_names(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    /// The newest accepted price of `pair`: (mantissa, scale, upstream time).
    pub fn latest_price(&self, pair: &str) -> Option<(i64, u32, i64)> {
        self.pairs.get(pair)?.latest.as_ref().map(|p| (p.mantissa, p.scale, p.upstream_time_ms))
    }

    /// Whether `node` is connected.
    pub fn is_online(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.session.is_some())
    }

    /// Whether `node` was streaming before a restart and may still come back.
    pub fn is_rejoining(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.rejoining) && self.in_grace()
    }

    /// Whether the rejoin grace after a restart is still running.
    pub fn in_grace(&self) -> bool {
        self.grace_until_ms.is_some_and(|g| self.now_ms < g)
    }

    /// The pairs `node` knows.
    pub fn known_pairs(&self, node: &str) -> Option<&BTreeSet<String>> {
        self.nodes.get(node).map(|n| &n.known)
    }

    /// Node ids, with their state.
    pub fn node_states(&self) -> impl Iterator<Item = (&str, NodeState)> {
        self.nodes.iter().map(|(id, n)| (id.as_str(), self.node_state(n)))
    }

    fn node_state(&self, n: &Node) -> NodeState {
        match n.session {
            None if n.rejoining && self.in_grace() => NodeState::Rejoining,
            None => NodeState::Gone,
            Some(_) if n.draining => NodeState::Draining,
            Some(_) if self.now_ms - n.last_seen_ms > self.config.node_timeout_ms / 2 => NodeState::Suspect,
            Some(_) => NodeState::Online,
        }
    }

    /// When the core next needs a `Tick`: a keepalive deadline, a stale streamer, the
    /// end of the rejoin grace, or a gone node to forget.
    pub fn next_deadline(&self) -> Option<i64> {
        let mut d: Option<i64> = None;
        let mut at = |t: i64| d = Some(d.map_or(t, |x| x.min(t)));
        for n in self.nodes.values() {
            match (n.session, n.gone_at_ms) {
                (Some(_), _) => at(n.last_seen_ms + self.config.node_timeout_ms + 1),
                (None, Some(g)) => at(g + self.config.gone_retention_ms + 1),
                _ => {}
            }
        }
        // A streamer going stale is a deadline only while it is still ahead: one already
        // stale has had its settle, which found no one to take the pair (or a pin or a
        // handover holds it), and only an input that runs the full settle anyway can
        // change that. Kept, it would make every later input run the full settle.
        for p in self.pairs.values() {
            if let Some(l) = &p.current {
                let stale_at = l.last_update_ms + self.config.stale_after_ms + 1;
                if stale_at > self.now_ms {
                    at(stale_at);
                }
            }
        }
        if let Some(g) = self.grace_until_ms
            && self.now_ms < g
        {
            at(g);
        }
        if let Some(t) = self.task_deadline() {
            at(t);
        }
        d
    }

    /// A cheap lower bound of `next_deadline`, cached by the last full settle: never
    /// later than the true deadline (routine inputs only move deadlines later), so a
    /// `Tick` scheduled on it is never late; an early one settles to no change.
    pub fn next_deadline_hint(&self) -> Option<i64> {
        match self.scratch.quiet_until_ms {
            i64::MAX => None,
            d => Some(d),
        }
    }

    /// Applies one input.
    pub fn handle(&mut self, input: Input, out: &mut Vec<Output>) {
        self.now_ms = self.now_ms.max(input.at_ms);
        // Price updates and heartbeats only move deadlines later and, unless one
        // completes a handover (`force_settle`), do not change who streams what, so
        // they skip the full settle unless a deadline is due. A full settle when
        // nothing is due changes nothing, so replay (which starts with an empty cache)
        // reaches the same state; `tests/sim.rs` checks exactly that.
        // Admission verdicts and token creation touch only the tokens.
        let routine = matches!(&input.event, Event::NodeMessage { type_url, .. }
            if type_url.ends_with(".NodePriceUpdateV1Notify") || type_url.ends_with(".NodeHeartbeatV1Notify"))
            || matches!(
                &input.event,
                Event::AdmissionAttempt { .. }
                    | Event::Admission { .. }
                    | Event::TokenCreate { .. }
                    | Event::NodeRefused { .. }
                    | Event::CliRefused { .. }
            );
        // Task reports and task commands touch only the task plane: they need its
        // settle (placement, task deadlines), not the fleet's.
        let task_input = match &input.event {
            Event::NodeMessage { type_url, .. } => [
                ".TaskStartedV1Req",
                ".TaskErrorV1Req",
                ".TaskCompletedV1Req",
                ".AckV1Reply",
                ".TasksPongV1Reply",
                ".TasksRefusedV1Reply",
            ]
            .iter()
            .any(|s| type_url.ends_with(s)),
            Event::CliMessage { type_url, .. } => type_url.contains(".ControllerTask"),
            _ => false,
        };
        // A node's reply to a command a CLI fanned out is only passed on to the CLI.
        let cli_reply = matches!(&input.event, Event::NodeMessage { node, request_id, .. }
            if self.is_pending_reply(node, request_id));
        let routine = routine || task_input || cli_reply;
        // A node connecting, leaving or saying what it knows can change only the pairs
        // it knows (before or after; a node's leases are on pairs it knows), so when no
        // deadline is due only those are settled: with a large fleet a full settle per
        // join would make joining quadratic. Same result as the full settle: the other
        // pairs' settle would change nothing (it runs whenever something is due), and
        // the picks happen in the same order (a pick with no candidate draws nothing).
        let targeted: Option<(String, BTreeSet<String>)> = match &input.event {
            Event::NodeConnected { node, .. }
            | Event::NodeOpened { node, .. }
            | Event::NodeDisconnected { node, .. } => Some(node.clone()),
            Event::NodeMessage { node, type_url, .. } if type_url.ends_with(".NodeKnownCurrenciesV1Notify") => {
                Some(node.clone())
            }
            _ => None,
        }
        .map(|node| {
            let known = self.nodes.get(&node).map(|n| n.known.clone()).unwrap_or_default();
            (node, known)
        });
        match input.event {
            Event::ControllerStarted { config } => self.started(config),
            Event::Tick => {}
            Event::NodeConnected { node, session } => self.node_connected(node, session, out),
            // `from_uuid` is not needed: replies are routed by request id.
            Event::NodeMessage { node, session, request_id, from_uuid: _, type_url, value } => {
                self.node_message(&node, session, request_id, Any { type_url, value }, out)
            }
            Event::NodeDisconnected { node, session } => {
                if let Some(n) = self.nodes.get_mut(&node).filter(|n| n.session == Some(session)) {
                    n.session = None;
                    self.scratch.task_due_ms = 0;
                    n.gone_at_ms = Some(self.now_ms);
                }
            }
            Event::CliConnected { session, admin } => {
                self.clis.insert(session, Cli { admin, watches: BTreeMap::new() });
            }
            Event::CliMessage { session, stream_id, cli_uuid: _, node_uuids, request_id: _, type_url, value } => {
                self.cli_message(session, stream_id, node_uuids, Any { type_url, value }, out)
            }
            Event::CliDisconnected { session } => {
                self.clis.remove(&session);
                self.pending.retain(|_, p| p.cli_session != session);
            }
            Event::TokenCreate { session, stream_id, id, secret_hash, role, ttl_ms, uses, description } => {
                self.token_create(session, &stream_id, id, secret_hash, role, ttl_ms, uses, description, out)
            }
            Event::AdmissionAttempt { attempt, node, token_id: id, secret_hash } => {
                self.admission(attempt, &node, Credential::Token { id, secret_hash }, out)
            }
            Event::Admission { attempt, node, credential } => self.admission(attempt, &node, credential, out),
            Event::NodeOpened { node, session, generation } => {
                if self.ids.current(&node, generation) {
                    self.node_connected(node, session, out);
                } else {
                    self.ids.stale_tickets += 1;
                    self.counters.refused += 1;
                    let reason = "session ticket no longer valid (the node was evicted, its token revoked, it was forgotten, or it was admitted again since): pass admission again";
                    out.push(Output::CloseNode { node, session, reason: reason.into() });
                }
            }
            Event::NodeRefused { node, session, request_id, type_url, reason } => {
                self.counters.refused += 1;
                if self.nodes.get(&node).is_some_and(|n| n.session == Some(session)) {
                    out.push(self.reply_to_node(
                        &node,
                        session,
                        request_id,
                        v1::UnknownCommandV1Notify { type_url, reason },
                    ));
                }
            }
            Event::CliRefused { session, stream_id, type_url, reason } => {
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
            self.settle_tasks(out);
            // New deadlines: this node's keepalive or retention, new leases going stale,
            // tasks. An early bound is safe (a settle with nothing due is a no-op).
            let soonest = self.config.node_timeout_ms.min(self.config.stale_after_ms) + 1;
            let due = self.task_deadline().unwrap_or(i64::MAX).min(self.now_ms + soonest);
            self.scratch.quiet_until_ms = self.scratch.quiet_until_ms.min(due);
        } else if task_input {
            self.settle_tasks(out);
            let due = self.task_deadline().unwrap_or(i64::MAX);
            self.scratch.quiet_until_ms = self.scratch.quiet_until_ms.min(due);
        }
        self.flush(out);
        out.append(&mut self.scratch.ended);
    }

    #[allow(clippy::too_many_arguments)]
    fn token_create(
        &mut self,
        session: u64,
        stream_id: &str,
        id: String,
        secret_hash: [u8; 32],
        role: i32,
        ttl_ms: u64,
        uses: u32,
        description: String,
        out: &mut Vec<Output>,
    ) {
        let reply = |out: &mut Vec<Output>, p: Payload| {
            if session != 0 {
                out.push(Self::count(session, stream_id, 1, Vec::new()));
                out.push(Self::to_cli(session, stream_id, None, p));
            }
        };
        // Revoked and expired tokens make room first.
        if self.tokens.len() >= MAX_TOKENS {
            let now = self.now_ms;
            self.tokens.retain(|_, t| t.usable(now).is_ok());
        }
        if session != 0 && !self.cli_is_admin(session) {
            self.counters.refused += 1;
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            return reply(
                out,
                v1::UnknownCommandV1Notify { type_url, reason: "creating tokens needs an admin token".into() }.into(),
            );
        }
        if uses != 0 && role != v1::TokenRole::Join as i32 {
            self.counters.refused += 1;
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            let reason = "--uses counts admissions, so it is for join tokens only; limit an operator token with --ttl";
            return reply(out, v1::UnknownCommandV1Notify { type_url, reason: reason.into() }.into());
        }
        let valid_role =
            [v1::TokenRole::Join, v1::TokenRole::Read, v1::TokenRole::Admin].iter().any(|r| *r as i32 == role);
        if !valid_role || self.tokens.len() >= MAX_TOKENS || self.tokens.contains_key(&id) {
            self.counters.refused += 1;
            let reason =
                if valid_role { "token table full or id taken" } else { "token role must be join, read or admin" };
            let type_url = drover_proto::type_url::<v1::ControllerTokenCreateV1Req>();
            return reply(out, v1::UnknownCommandV1Notify { type_url, reason: reason.into() }.into());
        }
        let expires_ms = if ttl_ms == 0 { 0 } else { self.now_ms.saturating_add(ttl_ms.min(i64::MAX as u64) as i64) };
        self.tokens.insert(
            id.clone(),
            Token {
                secret_hash,
                role,
                description: description.chars().take(256).collect(),
                created_ms: self.now_ms,
                expires_ms,
                uses_left: (uses != 0).then_some(uses),
                revoked: false,
            },
        );
        // The shell puts the secret into this reply before it leaves.
        reply(out, v1::ControllerTokenCreateV1Reply { id, token: String::new(), expires_at_ms: expires_ms }.into());
    }

    /// Whether a join credential would be admitted at `now_ms`, without using it up: the
    /// shell asks this (read-only, not journaled) before letting an attempt through a
    /// rate limit, so a valid credential is never locked out by someone else's failures.
    pub fn join_credential_valid(&self, token_id: &str, secret_hash: &[u8; 32], now_ms: i64) -> Result<(), String> {
        let Some(t) = self.tokens.get(token_id) else {
            return Err("unknown token".into());
        };
        // The secret is compared before anything about the token is revealed.
        if !bool::from(subtle_eq(&t.secret_hash, secret_hash)) {
            return Err("unknown token".into());
        }
        if t.role != v1::TokenRole::Join as i32 {
            return Err("not a join token".into());
        }
        t.usable(now_ms).map_err(str::to_owned)
    }

    /// Judges an admission: the credential (a token is checked here; a certificate was
    /// checked by the shell), then the node id's binding. A use of a token is consumed
    /// only by an admission that succeeds.
    fn admission(&mut self, attempt: u64, node: &str, credential: Credential, out: &mut Vec<Output>) {
        let result = self.admit(node, credential);
        match &result {
            Ok(_) => self.counters.admissions += 1,
            Err(_) => self.counters.admission_refusals += 1,
        }
        out.push(Output::AdmissionVerdict { attempt, result });
    }

    fn admit(&mut self, node: &str, credential: Credential) -> Result<u64, String> {
        if let Credential::Token { id, secret_hash } = &credential {
            self.join_credential_valid(id, secret_hash, self.now_ms)?;
        }
        let known = self.nodes.contains_key(node);
        let generation =
            self.ids.admit(node, credential.binding(), self.now_ms, known, self.config.gone_retention_ms)?;
        if let Credential::Token { id, .. } = &credential
            && let Some(u) = self.tokens.get_mut(id).and_then(|t| t.uses_left.as_mut())
        {
            *u -= 1;
        }
        Ok(generation)
    }

    fn started(&mut self, config: Config) {
        self.config = Config { seed: self.config.seed, ..config };
        // Every connection died with the previous process.
        let streaming: BTreeSet<String> =
            self.pairs.values().flat_map(|p| p.current.iter().chain(p.next.iter())).map(|l| l.node.clone()).collect();
        for (id, n) in &mut self.nodes {
            self.scratch.task_due_ms = 0;
            if n.session.take().is_some() {
                n.gone_at_ms = Some(self.now_ms);
            }
            n.rejoining = streaming.contains(id);
            n.draining = false;
        }
        self.clis.clear();
        self.pending.clear();
        // Answers to requests sent on the old connections never come: the workers are
        // asked about their attempts again when they rejoin.
        self.tasks.requests.clear();
        self.tasks.restarted_at_ms = self.now_ms;
        self.grace_until_ms = Some(self.now_ms + self.config.rejoin_grace_ms);
        for p in self.pairs.values_mut() {
            // A handover in flight restarts from scratch once nodes are back.
            p.next = None;
            if let Some(l) = &mut p.current {
                l.last_update_ms = self.now_ms;
            }
        }
    }

    fn node_connected(&mut self, node: String, session: u64, out: &mut Vec<Output>) {
        if node.is_empty() || node.len() > MAX_ID_LEN {
            self.counters.refused += 1;
            out.push(Output::CloseNode { node, session, reason: "invalid node id".into() });
            return;
        }
        let now = self.now_ms;
        let n = self.nodes.entry(node.clone()).or_insert_with(|| Node {
            name: String::new(),
            version: String::new(),
            known: BTreeSet::new(),
            worker: false,
            session: None,
            connected_since_ms: now,
            last_seen_ms: now,
            gone_at_ms: None,
            draining: false,
            rejoining: false,
        });
        // An attempt's deadline depends on whether its worker is online: rescan.
        self.scratch.task_due_ms = 0;
        if let Some(old) = n.session.replace(session) {
            // A second stream for the same node replaces the first.
            out.push(Output::CloseNode { node: node.clone(), session: old, reason: "replaced by a new stream".into() });
        }
        n.connected_since_ms = now;
        n.last_seen_ms = now;
        n.gone_at_ms = None;
        n.draining = false;
        n.rejoining = false;
        // It learns its pairs (if it kept any through a restart) once it says what it
        // knows (`known_currencies`).
    }

    fn reply_to_node(&self, node: &str, session: u64, request_id: String, payload: impl Into<Payload>) -> Output {
        Output::ToNode {
            node: node.to_owned(),
            session,
            msg: v1::StreamToNode { from_uuid: None, command: Some(any_of(payload)), request_id },
        }
    }

    fn node_message(&mut self, node: &str, session: u64, request_id: String, any: Any, out: &mut Vec<Output>) {
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.session == Some(session)) else {
            // A message from a connection that is no longer current. A price on it is
            // fenced like one under an old epoch (a streamer cut off and replaced,
            // whose queued updates arrive after the partition heals).
            if any.type_url.ends_with(".NodePriceUpdateV1Notify") {
                self.counters.prices_fenced += 1;
            }
            return;
        };
        n.last_seen_ms = self.now_ms;
        // A reply to a command a CLI fanned out goes back to that CLI.
        if self.is_pending_reply(node, &request_id)
            && let Some(p) = self.pending.remove(&request_id)
        {
            if self.clis.contains_key(&p.cli_session) {
                out.push(Output::ToCli {
                    session: p.cli_session,
                    msg: v1::StreamToCli {
                        stream_id: p.stream_id,
                        node_uuid: Some(node.to_owned()),
                        response: Some(any),
                        request_id,
                    },
                });
            }
            return;
        }
        let payload = Payload::from_any(&any);
        if let Ok(p) = &payload
            && self.task_message(node, session, request_id.clone(), p, out)
        {
            return;
        }
        match payload {
            Ok(Payload::NodeHeartbeatV1Notify(_)) => {}
            Ok(Payload::NodeKnownCurrenciesV1Notify(k)) => self.known_currencies(node, k, out, session, request_id),
            Ok(Payload::NodePriceUpdateV1Notify(u)) => self.price_update(node, u),
            // Replies to the controller's own commands (stream modify, heartbeats) need nothing more.
            Ok(Payload::NodeStreamModifyStateV1Reply(_) | Payload::UnknownCommandV1Notify(_)) => {}
            Ok(other) => {
                self.counters.refused += 1;
                let reason = format!("the controller does not handle {} from a node", other.name());
                out.push(self.reply_to_node(
                    node,
                    session,
                    request_id,
                    v1::UnknownCommandV1Notify { type_url: any.type_url.clone(), reason },
                ));
            }
            Err(e) => {
                self.counters.refused += 1;
                out.push(self.reply_to_node(
                    node,
                    session,
                    request_id,
                    v1::UnknownCommandV1Notify { type_url: any.type_url.clone(), reason: e.to_string() },
                ));
            }
        }
    }

    fn known_currencies(
        &mut self,
        node: &str,
        k: v1::NodeKnownCurrenciesV1Notify,
        out: &mut Vec<Output>,
        session: u64,
        request_id: String,
    ) {
        // Control characters (ESC, CR, LF …) in what operators are shown could forge
        // rows or drive their terminal.
        let printable = |s: &str| !s.chars().any(char::is_control);
        if k.pairs.len() > MAX_PAIRS_PER_NODE
            || k.pairs.iter().any(|p| !valid_pair(p))
            || !printable(&k.name)
            || !printable(&k.version)
        {
            self.counters.refused += 1;
            let reason = format!(
                "known pairs refused: at most {MAX_PAIRS_PER_NODE} names of 1..={MAX_PAIR_LEN} letters, digits or /_-., and a name and version without control characters"
            );
            out.push(self.reply_to_node(
                node,
                session,
                request_id,
                v1::UnknownCommandV1Notify {
                    type_url: drover_proto::type_url::<v1::NodeKnownCurrenciesV1Notify>(),
                    reason,
                },
            ));
            return;
        }
        let Some(n) = self.nodes.get_mut(node) else { return };
        let old = std::mem::replace(&mut n.known, k.pairs.into_iter().collect());
        if let Some(index) = self.scratch.known_by.as_mut() {
            for p in &old {
                if let Some(set) = index.get_mut(p) {
                    set.remove(node);
                }
            }
            for p in &n.known {
                index.entry(p.clone()).or_default().insert(node.to_owned());
            }
        }
        n.name = k.name.chars().take(MAX_ID_LEN).collect();
        n.version = k.version.chars().take(MAX_ID_LEN).collect();
        n.worker = k.worker;
        let known = n.known.clone();
        for p in &known {
            self.pairs.entry(p.clone()).or_default();
        }
        // Pairs it no longer knows, it no longer streams.
        for (name, pair) in &mut self.pairs {
            if known.contains(name) {
                continue;
            }
            if pair.current.as_ref().is_some_and(|l| l.node == node) {
                pair.current = None;
            }
            if pair.next.as_ref().is_some_and(|l| l.node == node) {
                pair.next = None;
            }
        }
        self.scratch.dirty.insert(node.to_owned());
    }

    fn price_update(&mut self, node: &str, u: v1::NodePriceUpdateV1Notify) {
        let now = self.now_ms;
        let Some(pair) = self.pairs.get_mut(&u.pair) else {
            self.counters.prices_fenced += 1;
            return;
        };
        let is = |l: &Option<Lease>| l.as_ref().is_some_and(|l| l.node == node && l.epoch == u.epoch);
        if is(&pair.next) {
            // The incoming streamer is running: now the old one may stop.
            if let Some(old) = pair.current.take() {
                self.scratch.dirty.insert(old.node);
            }
            pair.current = pair.next.take();
            self.counters.handovers += 1;
            self.scratch.force_settle = true;
        } else if !is(&pair.current) {
            self.counters.prices_fenced += 1;
            return;
        }
        if let Some(l) = &mut pair.current {
            l.last_update_ms = now;
        }
        let Some(price) = u.price else {
            self.counters.refused += 1;
            return;
        };
        if pair.latest.as_ref().is_some_and(|p| u.upstream_time_ms <= p.upstream_time_ms) {
            self.counters.prices_stale += 1;
            return;
        }
        pair.latest = Some(PriceRec {
            mantissa: price.mantissa,
            scale: price.scale,
            upstream_time_ms: u.upstream_time_ms,
            seq: u.seq,
            epoch: u.epoch,
            streamer: node.to_owned(),
        });
        self.counters.prices_accepted += 1;
        self.publish(&u.pair);
    }

    fn price_view(&self, name: &str, pair: &Pair) -> Option<v1::PriceView> {
        let p = pair.latest.as_ref()?;
        Some(v1::PriceView {
            price: Some(v1::Price {
                pair: name.to_owned(),
                price: Some(v1::Decimal { mantissa: p.mantissa, scale: p.scale }),
                upstream_time_ms: p.upstream_time_ms,
                seq: p.seq,
            }),
            streamer: pair.current.as_ref().map(|l| l.node.clone()).unwrap_or_default(),
            epoch: pair.current.as_ref().map_or(pair.epoch, |l| l.epoch),
            source: p.streamer.clone(),
            source_epoch: p.epoch,
        })
    }

    fn publish(&mut self, pair: &str) {
        // Watch notifications are collected into `published` and drained by `settle`.
        if self.clis.values().any(|c| !c.watches.is_empty()) {
            self.scratch.published.push(pair.to_owned());
        }
    }

    fn settle(&mut self, out: &mut Vec<Output>) {
        let now = self.now_ms;
        let grace = self.in_grace();
        if !grace && self.grace_until_ms.is_some() {
            self.grace_until_ms = None;
            for n in self.nodes.values_mut() {
                n.rejoining = false;
            }
        }
        // Keepalives missed: the node is gone.
        let timeout = self.config.node_timeout_ms;
        for (id, n) in &mut self.nodes {
            if let Some(s) = n.session
                && now - n.last_seen_ms > timeout
            {
                n.session = None;
                self.scratch.task_due_ms = 0;
                n.gone_at_ms = Some(now);
                self.counters.timeouts += 1;
                out.push(Output::CloseNode {
                    node: id.clone(),
                    session: s,
                    reason: format!("no keepalive for {timeout} ms"),
                });
            }
        }
        let retention = self.config.gone_retention_ms;
        let expired =
            |n: &Node| n.session.is_none() && !n.rejoining && n.gone_at_ms.is_some_and(|g| now - g > retention);
        // The set of leased nodes is built only when some node is past its retention.
        let forgotten: Vec<String> = if self.nodes.values().any(expired) {
            let leased: BTreeSet<&str> = self
                .pairs
                .values()
                .flat_map(|p| p.current.iter().chain(p.next.iter()))
                .map(|l| l.node.as_str())
                .collect();
            self.nodes
                .iter()
                .filter(|(id, n)| expired(n) && !leased.contains(id.as_str()))
                .map(|(id, _)| id.clone())
                .collect()
        } else {
            Vec::new()
        };
        for id in forgotten {
            self.forget_node(&id);
        }

        // Only pairs some rule could change are settled; a pair streamed by a usable
        // node that knows it, fresh, with no incoming streamer, pin elsewhere or drain is
        // left as it is (exactly what `settle_pair` would do with it), without a clone.
        let names: Vec<String> =
            self.pairs.iter().filter(|(name, p)| !self.pair_is_quiet(name, p)).map(|(n, _)| n.clone()).collect();
        for name in names {
            self.settle_pair(&name);
        }
        self.settle_tasks(out);
    }

    /// Whether `settle_pair` would leave `pair` unchanged, decided without touching it.
    fn pair_is_quiet(&self, name: &str, p: &Pair) -> bool {
        let Some(cur) = &p.current else { return false };
        if p.next.is_some() || p.pinned_to.as_ref().is_some_and(|pin| *pin != cur.node) {
            return false;
        }
        let Some(n) = self.nodes.get(&cur.node) else { return false };
        n.session.is_some()
            && !n.draining
            && n.known.contains(name)
            && self.now_ms - cur.last_update_ms <= self.config.stale_after_ms
    }

    /// Sends each node whose pairs changed its whole new set, and price watchers the
    /// prices accepted during this input.
    fn flush(&mut self, out: &mut Vec<Output>) {
        out.append(&mut self.scratch.assigned);
        let dirty = std::mem::take(&mut self.scratch.dirty);
        let mut streams_of = if dirty.is_empty() { BTreeMap::new() } else { self.leases_by_node(Some(&dirty), true) };
        for node in &dirty {
            let Some(session) = self.nodes.get(node).and_then(|n| n.session) else { continue };
            let streams = streams_of.remove(node.as_str()).unwrap_or_default();
            out.push(Output::ToNode {
                node: node.clone(),
                session,
                msg: v1::StreamToNode {
                    from_uuid: None,
                    command: Some(any_of(v1::NodeStreamModifyStateV1Req { streams })),
                    request_id: String::new(),
                },
            });
        }
        for pair in std::mem::take(&mut self.scratch.published) {
            let Some(view) = self.pairs.get(&pair).and_then(|p| self.price_view(&pair, p)) else { continue };
            for (session, cli) in &self.clis {
                for (stream_id, filter) in &cli.watches {
                    if filter.is_empty() || filter.contains(&pair) {
                        out.push(Output::ToCli {
                            session: *session,
                            msg: v1::StreamToCli {
                                stream_id: stream_id.clone(),
                                node_uuid: None,
                                response: Some(any_of(v1::ControllerPriceV1Notify { price: Some(view.clone()) })),
                                request_id: String::new(),
                            },
                        });
                    }
                }
            }
        }
    }

    /// Online nodes that know `pair` and may take it (draining ones too when
    /// `draining`), minus `except`, in id order. Walks an index of the nodes' known
    /// pairs (a cache in `Scratch`, built when unknown and kept in step when a node's
    /// pairs change or it is forgotten), so finding a streamer costs O(capable nodes),
    /// not O(nodes), and allocates only for the candidates themselves: a pair no node
    /// can take is cheap to retry on every settle.
    fn candidates(&mut self, pair: &str, except: Option<&str>, draining: bool) -> Vec<String> {
        let nodes = &self.nodes;
        let index = self.scratch.known_by.get_or_insert_with(|| {
            let mut index: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (id, n) in nodes {
                for p in &n.known {
                    index.entry(p.clone()).or_default().insert(id.clone());
                }
            }
            index
        });
        let Some(knowers) = index.get(pair) else { return Vec::new() };
        knowers
            .iter()
            .filter(|id| {
                Some(id.as_str()) != except
                    && nodes
                        .get(*id)
                        .is_some_and(|n| n.session.is_some() && (draining || !n.draining) && n.known.contains(pair))
            })
            .cloned()
            .collect()
    }

    fn load(&self, node: &str) -> usize {
        self.pairs.values().filter(|p| [&p.current, &p.next].into_iter().flatten().any(|l| l.node == node)).count()
    }

    fn pick(&mut self, pair: &str, except: Option<&str>) -> Option<String> {
        let mut cands: Vec<String> = self.candidates(pair, except, false);
        if cands.is_empty() && except.is_none() {
            // A pair with no streamer at all is worse than one on a draining node:
            // draining nodes are the last resort.
            cands = self.candidates(pair, None, true);
        }
        if cands.is_empty() {
            return None;
        }
        let pool: Vec<String> = match self.config.policy {
            Policy::Random => cands,
            Policy::Balanced => {
                let loads: Vec<usize> = cands.iter().map(|c| self.load(c)).collect();
                let min = loads.iter().copied().min().unwrap_or(0);
                cands.into_iter().zip(loads).filter(|(_, l)| *l == min).map(|(c, _)| c).collect()
            }
        };
        let i = self.rng.below(pool.len());
        pool.into_iter().nth(i)
    }

    fn lease(&mut self, pair: &str, node: String, reason: &'static str) -> Lease {
        let p = self.pairs.entry(pair.to_owned()).or_default();
        p.epoch += 1;
        self.counters.assignments += 1;
        self.scratch.dirty.insert(node.clone());
        self.scratch.assigned.push(Output::Assigned {
            pair: pair.to_owned(),
            node: node.clone(),
            epoch: p.epoch,
            reason,
        });
        Lease { node, epoch: p.epoch, since_ms: self.now_ms, last_update_ms: self.now_ms }
    }

    fn usable(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.session.is_some())
    }

    fn settle_pair(&mut self, name: &str) {
        let now = self.now_ms;
        let Some(pair) = self.pairs.get(name).cloned() else { return };
        let mut current = pair.current;
        let mut next = pair.next;
        let mut failed_over = false;
        // A streamer that is gone loses the pair at once, unless it is a previous
        // streamer that the rejoin grace after a restart is still waiting for.
        if let Some(l) = &current {
            if !self.usable(&l.node) && !self.is_rejoining(&l.node) {
                self.counters.failovers += 1;
                failed_over = true;
                current = None;
            } else if self.nodes.get(&l.node).is_some_and(|n| n.session.is_some() && !n.known.contains(name)) {
                current = None;
            }
        }
        if next.as_ref().is_some_and(|l| !self.usable(&l.node)) {
            next = None;
        }
        if current.is_none()
            && let Some(n) = next.take()
        {
            current = Some(n);
        }
        let pinned = pair.pinned_to.clone().filter(|p| self.usable(p) && self.nodes[p].known.contains(name));
        if current.is_none() {
            let target = pinned.clone().or_else(|| self.pick(name, None));
            if let Some(t) = target {
                let why = if failed_over {
                    "failover: the streamer is gone"
                } else if pinned.is_some() {
                    "pinned by an operator"
                } else {
                    "the pair had no streamer"
                };
                current = Some(self.lease(name, t, why));
            }
        } else if let Some(cur) = current.clone() {
            let cur_usable = self.usable(&cur.node);
            let draining = self.nodes.get(&cur.node).is_some_and(|n| n.draining);
            if let Some(p) = pinned.as_ref().filter(|p| **p != cur.node) {
                if next.as_ref().is_none_or(|n| &n.node != p) {
                    next = Some(self.lease(name, p.clone(), "pinned by an operator (make-before-break)"));
                }
            } else if cur_usable && draining && next.is_none() && pinned.is_none() {
                if let Some(t) = self.pick(name, Some(&cur.node)) {
                    next = Some(self.lease(name, t, "drain (make-before-break)"));
                }
            } else if cur_usable
                && pinned.is_none()
                && next.is_none()
                && now - cur.last_update_ms > self.config.stale_after_ms
                && let Some(t) = self.pick(name, Some(&cur.node))
            {
                self.counters.stale_reassignments += 1;
                self.scratch.dirty.insert(cur.node.clone());
                current = Some(self.lease(name, t, "the streamer went silent on the pair"));
            }
        }
        let p = self.pairs.get_mut(name).expect("pair exists: cloned above");
        if p.current.as_ref().map(|l| &l.node) != current.as_ref().map(|l| &l.node)
            && let Some(old) = &p.current
        {
            self.scratch.dirty.insert(old.node.clone());
        }
        if p.next.as_ref().map(|l| &l.node) != next.as_ref().map(|l| &l.node)
            && let Some(old) = &p.next
        {
            self.scratch.dirty.insert(old.node.clone());
        }
        p.current = current;
        p.next = next;
        if p.pinned_to.as_ref().is_some_and(|n| !self.nodes.contains_key(n)) {
            p.pinned_to = None;
        }
    }
}

// ---------------------------------------------------------------------------
// CLI commands
// ---------------------------------------------------------------------------

impl Controller {
    fn to_cli(session: u64, stream_id: &str, node: Option<&str>, payload: impl Into<Payload>) -> Output {
        Output::ToCli {
            session,
            msg: v1::StreamToCli {
                stream_id: stream_id.to_owned(),
                node_uuid: node.map(str::to_owned),
                response: Some(any_of(payload)),
                request_id: String::new(),
            },
        }
    }

    fn count(session: u64, stream_id: &str, expected: u32, missing: Vec<String>) -> Output {
        Self::to_cli(
            session,
            stream_id,
            None,
            v1::CliResponseCountV1Notify { stream_id: stream_id.to_owned(), expected, missing },
        )
    }

    /// Leases (current or incoming) by node, in one pass over the pairs: of the nodes
    /// in `only` (every node when `None`), each with the pair's latest price when
    /// `prices`.
    fn leases_by_node(
        &self,
        only: Option<&BTreeSet<String>>,
        prices: bool,
    ) -> BTreeMap<&str, Vec<v1::StreamAssignment>> {
        let mut by: BTreeMap<&str, Vec<v1::StreamAssignment>> = BTreeMap::new();
        for (name, p) in &self.pairs {
            for l in [&p.current, &p.next].into_iter().flatten() {
                if only.is_some_and(|o| !o.contains(&l.node)) {
                    continue;
                }
                let latest = if prices { self.price_view(name, p).and_then(|v| v.price) } else { None };
                by.entry(l.node.as_str()).or_default().push(v1::StreamAssignment {
                    pair: name.clone(),
                    epoch: l.epoch,
                    latest,
                });
            }
        }
        by
    }

    /// Removes a node that is not connected: from the table, the knowing-nodes index,
    /// the task plane, and every lease it still holds (those pairs are then free for
    /// the next capable node at the next settle).
    fn forget_node(&mut self, id: &str) {
        self.ids.forget(id);
        let Some(n) = self.nodes.remove(id) else { return };
        if let Some(index) = self.scratch.known_by.as_mut() {
            for p in &n.known {
                if let Some(set) = index.get_mut(p) {
                    set.remove(id);
                }
            }
        }
        for p in self.pairs.values_mut() {
            if p.current.as_ref().is_some_and(|l| l.node == id) {
                p.current = None;
            }
            if p.next.as_ref().is_some_and(|l| l.node == id) {
                p.next = None;
            }
        }
        self.forget_worker(id);
    }

    fn node_info(&self, id: &str, n: &Node, streaming: Vec<v1::StreamAssignment>) -> v1::NodeInfo {
        v1::NodeInfo {
            node_uuid: id.to_owned(),
            name: n.name.clone(),
            version: n.version.clone(),
            known_pairs: n.known.iter().cloned().collect(),
            streaming,
            connected_since_ms: n.connected_since_ms,
            state: self.node_state(n).as_str().to_owned(),
            worker: n.worker,
            gone_since_ms: if n.session.is_none() { n.gone_at_ms.unwrap_or(0) } else { 0 },
        }
    }

    fn cli_message(
        &mut self,
        session: u64,
        stream_id: String,
        node_uuids: Vec<String>,
        any: Any,
        out: &mut Vec<Output>,
    ) {
        let Some(admin) = self.clis.get(&session).map(|c| c.admin) else { return };
        self.counters.cli_commands += 1;
        let sid = stream_id.as_str();
        let reply = |out: &mut Vec<Output>, p: Payload| {
            out.push(Self::count(session, sid, 1, Vec::new()));
            out.push(Self::to_cli(session, sid, None, p));
        };
        let refuse = |out: &mut Vec<Output>, type_url: &str, reason: String| {
            out.push(Self::count(session, sid, 1, Vec::new()));
            out.push(Self::to_cli(
                session,
                sid,
                None,
                v1::UnknownCommandV1Notify { type_url: type_url.to_owned(), reason },
            ));
        };
        let payload = match Payload::from_any(&any) {
            Ok(p) => p,
            Err(e) => {
                self.counters.refused += 1;
                return refuse(out, &any.type_url, e.to_string());
            }
        };
        // The commands that change the fleet (or reveal tokens), by the CLI's name for them.
        let admin_command = match &payload {
            Payload::ControllerKickNodesV1Req(_) => Some("kick"),
            Payload::ControllerDrainNodesV1Req(d) if d.undo => Some("undrain"),
            Payload::ControllerDrainNodesV1Req(_) => Some("drain"),
            Payload::ControllerStreamPairsV1Req(_) => Some("stream"),
            Payload::NodeShutdownV1Req(_) => Some("shutdown"),
            Payload::NodeStreamModifyStateV1Req(_) => Some("stream state changes"),
            Payload::ControllerTokenCreateV1Req(_) => Some("token create"),
            Payload::ControllerTokenListV1Req(_) => Some("token list"),
            Payload::ControllerTokenRevokeV1Req(_) => Some("token revoke"),
            Payload::ControllerEvictNodesV1Req(_) => Some("evict"),
            Payload::ControllerForgetNodesV1Req(_) => Some("forget"),
            Payload::ControllerTaskRunV1Req(_) => Some("task run"),
            Payload::ControllerTaskAbortV1Req(_) => Some("task abort"),
            _ => None,
        };
        if let Some(command) = admin_command
            && !admin
        {
            self.counters.refused += 1;
            return refuse(
                out,
                &any.type_url,
                format!("`drover {command}` needs an admin token; this one is read-only"),
            );
        }
        if let Some(answer) = self.task_command(&payload) {
            return reply(out, answer);
        }
        match payload {
            Payload::ControllerTaskAbortV1Req(a) => {
                let answer = self.task_abort(&a.id, out);
                reply(out, answer.into());
            }
            Payload::ControllerListNodesV1Req(_) => {
                let mut leases = self.leases_by_node(None, false);
                let nodes = self
                    .nodes
                    .iter()
                    .map(|(id, n)| self.node_info(id, n, leases.remove(id.as_str()).unwrap_or_default()))
                    .collect();
                reply(out, v1::ControllerListNodesV1Reply { nodes }.into());
            }
            Payload::ControllerTokenListV1Req(_) => {
                let tokens = self
                    .tokens
                    .iter()
                    .map(|(id, t)| v1::TokenInfo {
                        id: id.clone(),
                        role: t.role,
                        description: t.description.clone(),
                        created_at_ms: t.created_ms,
                        expires_at_ms: t.expires_ms,
                        uses_left: t.uses_left.unwrap_or(0),
                        limited: t.uses_left.is_some(),
                        revoked: t.revoked,
                    })
                    .collect();
                reply(out, v1::ControllerTokenListV1Reply { tokens }.into());
            }
            Payload::ControllerTokenRevokeV1Req(r) => {
                let (mut revoked, mut missing) = (Vec::new(), Vec::new());
                for id in r.ids {
                    match self.tokens.get_mut(&id) {
                        Some(t) => {
                            t.revoked = true;
                            // Tickets issued under it die now; open streams stay (a
                            // node then cannot reconnect without a valid credential).
                            self.ids.invalidate_credential(&Credential::token_binding(&id));
                            revoked.push(id);
                        }
                        None => missing.push(id),
                    }
                }
                reply(out, v1::ControllerTokenRevokeV1Reply { revoked, missing }.into());
            }
            Payload::ControllerAppVersionV1Req(_) => reply(
                out,
                v1::ControllerAppVersionV1Reply {
                    version: self.config.version.clone(),
                    protocol: drover_proto::PROTOCOL.to_owned(),
                }
                .into(),
            ),
            Payload::ControllerKickNodesV1Req(k) => {
                let (mut kicked, mut missing) = (Vec::new(), Vec::new());
                for id in k.node_uuids {
                    self.scratch.task_due_ms = 0; // a worker may go offline: rescan its attempts
                    match self.nodes.get_mut(&id).and_then(|n| n.session.take().map(|s| (n, s))) {
                        Some((n, s)) => {
                            n.gone_at_ms = Some(self.now_ms);
                            out.push(Output::CloseNode {
                                node: id.clone(),
                                session: s,
                                reason: "kicked by an operator".into(),
                            });
                            kicked.push(id);
                        }
                        None => missing.push(id),
                    }
                }
                reply(out, v1::ControllerKickNodesV1Reply { kicked, missing }.into());
            }
            Payload::ControllerEvictNodesV1Req(e) => {
                let (mut evicted, mut missing) = (Vec::new(), Vec::new());
                let reason = if e.reason.is_empty() {
                    "evicted by an operator".to_owned()
                } else {
                    e.reason.chars().take(256).collect()
                };
                for id in e.node_uuids {
                    let Some(n) = self.nodes.get_mut(&id) else {
                        missing.push(id);
                        continue;
                    };
                    // conn:close on the control channel first, then the stream ends; the
                    // tickets it holds die with it (it must pass admission again).
                    self.ids.invalidate(&id);
                    out.push(Output::EvictNode { node: id.clone(), reason: reason.clone() });
                    if let Some(s) = n.session.take() {
                        self.scratch.task_due_ms = 0;
                        n.gone_at_ms = Some(self.now_ms);
                        out.push(Output::CloseNode { node: id.clone(), session: s, reason: reason.clone() });
                    }
                    evicted.push(id);
                }
                reply(out, v1::ControllerEvictNodesV1Reply { evicted, missing }.into());
            }
            Payload::ControllerDrainNodesV1Req(d) => {
                let (mut draining, mut missing) = (Vec::new(), Vec::new());
                for id in d.node_uuids {
                    match self.nodes.get_mut(&id).filter(|n| n.session.is_some()) {
                        Some(n) => {
                            // Undo: it takes pairs again at the next settle (this input
                            // settles in full: it is a CLI command).
                            n.draining = !d.undo;
                            draining.push(id);
                        }
                        None => missing.push(id),
                    }
                }
                reply(out, v1::ControllerDrainNodesV1Reply { draining, missing }.into());
            }
            Payload::ControllerForgetNodesV1Req(f) => {
                let (mut forgotten, mut missing, mut connected) = (Vec::new(), Vec::new(), Vec::new());
                for id in f.node_uuids {
                    match self.nodes.get(&id) {
                        None => missing.push(id),
                        Some(n) if n.session.is_some() => connected.push(id),
                        Some(_) => {
                            self.forget_node(&id);
                            forgotten.push(id);
                        }
                    }
                }
                reply(out, v1::ControllerForgetNodesV1Reply { forgotten, missing, connected }.into());
            }
            Payload::ControllerStreamPairsV1Req(r) => {
                let (assigned, refused, error) = self.pin(&r.node_uuid, &r.pairs, r.unpin);
                reply(out, v1::ControllerStreamPairsV1Reply { assigned, refused, error }.into());
            }
            Payload::NodeStreamModifyStateV1Req(m) => {
                // The seed lets a CLI send this to nodes; it goes through the
                // controller's own assignment (pinned), never around it.
                let pairs: Vec<String> = m.streams.into_iter().map(|s| s.pair).collect();
                let (online, missing): (Vec<String>, Vec<String>) =
                    node_uuids.into_iter().partition(|id| self.is_online(id));
                out.push(Self::count(session, sid, online.len() as u32, missing));
                for id in online {
                    let (assigned, refused, error) = self.pin(&id, &pairs, false);
                    out.push(Self::to_cli(
                        session,
                        sid,
                        Some(&id),
                        v1::ControllerStreamPairsV1Reply { assigned, refused, error },
                    ));
                }
            }
            Payload::ControllerPricesV1Req(r) => {
                let filter: BTreeSet<String> = r.pairs.into_iter().collect();
                let prices = self
                    .pairs
                    .iter()
                    .filter(|(name, _)| filter.is_empty() || filter.contains(*name))
                    .filter_map(|(name, p)| self.price_view(name, p))
                    .collect();
                if r.watch
                    && let Some(c) = self.clis.get_mut(&session)
                {
                    c.watches.insert(stream_id.clone(), filter);
                }
                reply(out, v1::ControllerPricesV1Reply { prices }.into());
            }
            Payload::NodeStatusV1Req(_) | Payload::NodeShutdownV1Req(_) if !node_uuids.is_empty() => {
                self.fan_out(session, &stream_id, node_uuids, any, out);
            }
            Payload::Unknown { .. } if !node_uuids.is_empty() && admin => {
                // Nodes answer what they do not know themselves. Only for admins: a
                // command the controller cannot read may change a node's state.
                self.fan_out(session, &stream_id, node_uuids, any, out);
            }
            other => {
                self.counters.refused += 1;
                let reason = if node_uuids.is_empty()
                    && matches!(other, Payload::NodeStatusV1Req(_) | Payload::NodeShutdownV1Req(_))
                {
                    format!("{} needs at least one node", other.name())
                } else {
                    format!("the controller does not handle {}", other.name())
                };
                refuse(out, &any.type_url, reason);
            }
        }
    }

    /// Sends `any` to every online node of `targets`, after telling the CLI how many
    /// replies to expect and which nodes are missing.
    fn fan_out(&mut self, session: u64, stream_id: &str, targets: Vec<String>, any: Any, out: &mut Vec<Output>) {
        let mut seen = BTreeSet::new();
        let (mut online, mut missing) = (Vec::new(), Vec::new());
        for id in targets {
            if !seen.insert(id.clone()) {
                continue;
            }
            match self.nodes.get(&id).and_then(|n| n.session) {
                Some(s) => online.push((id, s)),
                None => missing.push(id),
            }
        }
        out.push(Self::count(session, stream_id, online.len() as u32, missing));
        for (id, s) in online {
            self.next_request += 1;
            let rid = format!("c{}", self.next_request);
            self.pending.insert(
                rid.clone(),
                PendingReply { cli_session: session, stream_id: stream_id.to_owned(), node: id.clone() },
            );
            out.push(Output::ToNode {
                node: id,
                session: s,
                msg: v1::StreamToNode {
                    from_uuid: Some(format!("cli-{session}")),
                    command: Some(any.clone()),
                    request_id: rid,
                },
            });
        }
    }

    /// Pins `pairs` to `node` (or unpins them). Returns the assignments in force
    /// afterwards, the pairs refused, and an error if the node cannot take any.
    fn pin(&mut self, node: &str, pairs: &[String], unpin: bool) -> (Vec<v1::StreamAssignment>, Vec<String>, String) {
        let Some(n) = self.nodes.get(node).filter(|n| n.session.is_some()) else {
            return (Vec::new(), pairs.to_vec(), format!("node {node} is not online"));
        };
        let known = n.known.clone();
        let mut refused = Vec::new();
        let mut taken = Vec::new();
        for p in pairs {
            if !known.contains(p) {
                refused.push(p.clone());
                continue;
            }
            let pair = self.pairs.entry(p.clone()).or_default();
            if unpin {
                if pair.pinned_to.as_deref() == Some(node) {
                    pair.pinned_to = None;
                }
            } else {
                pair.pinned_to = Some(node.to_owned());
            }
            taken.push(p.clone());
        }
        for p in &taken {
            self.settle_pair(p);
        }
        let assigned = taken
            .iter()
            .filter_map(|p| {
                let pair = self.pairs.get(p)?;
                let l = [&pair.next, &pair.current].into_iter().flatten().next()?;
                Some(v1::StreamAssignment { pair: p.clone(), epoch: l.epoch, latest: None })
            })
            .collect();
        (assigned, refused, String::new())
    }
}
