//! The owner task: the only place the core and the journal are touched.
//!
//! For each event: stamp the time and make it an input. Then, on one controller:
//! append the input to the journal (waiting only for queue space), apply it to the
//! core, and pass the outputs with the input's ticket to the releaser, which sends them
//! once the ticket says the input is durable. In a cluster ([`Backend::Replicated`]):
//! propose the inputs to the Raft group (in order, several batches in flight); the
//! core is applied by the group's state machine, committed entries only, on every
//! member; when a batch is committed the leader takes the outputs its entries made and
//! passes them to the releaser, already durable on a majority. Only the leader serves
//! nodes and CLIs; a member that stops leading stops releasing at once and closes its
//! streams.

use crate::now_ms;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use drover_core::{Controller, Event, Input, Output};
use drover_journal::machine::encode_input;
use drover_journal::{Journal, StateMachine, Ticket};
use drover_proto::v1;
use drover_raft::openraft;
use tokio::sync::{mpsc, watch};

/// At most one log line per this interval about rate-limited admissions.
const RATE_LIMIT_LOG_EVERY_MS: i64 = 10_000;

use crate::{ControllerConfig, ShellError};

/// A stream's outgoing half, as the releaser holds it.
pub(crate) enum Sink {
    Node(mpsc::Sender<Result<v1::StreamToNode, tonic::Status>>),
    Cli(mpsc::Sender<Result<v1::StreamToCli, tonic::Status>>),
}

/// What the gRPC handlers tell the owner.
pub(crate) enum ShellEvent {
    NodeOpened {
        node: String,
        session: u64,
        /// The admission generation of the ticket it opened with.
        generation: u64,
        sink: mpsc::Sender<Result<v1::StreamToNode, tonic::Status>>,
    },
    NodeMessage {
        node: String,
        session: u64,
        msg: v1::StreamFromNode,
    },
    NodeClosed {
        node: String,
        session: u64,
    },
    CliOpened {
        session: u64,
        role: drover_core::OperatorRole,
        sink: mpsc::Sender<Result<v1::StreamToCli, tonic::Status>>,
    },
    CliMessage {
        session: u64,
        msg: v1::StreamFromCli,
    },
    CliClosed {
        session: u64,
    },
    /// Is this operator token valid, and what may it do? (A read: nothing is journaled.)
    CliAuth {
        id: String,
        secret_hash: [u8; 32],
        peer: std::net::IpAddr,
        reply: tokio::sync::oneshot::Sender<Result<drover_core::OperatorRole, CliRefusal>>,
    },
    /// An admission connection finished its handshake: its control channel.
    ControlOpened {
        node: String,
        id: u64,
        evict: mpsc::Sender<String>,
    },
    /// That control channel ended.
    ControlClosed {
        node: String,
        id: u64,
    },
    /// A node presented a credential at admission (a certificate already checked by
    /// the admission task, or a token for the core to check; `Err`: not a credential).
    Admission {
        node: String,
        presented: Result<drover_core::Credential, String>,
        peer: std::net::IpAddr,
        reply: tokio::sync::oneshot::Sender<Result<u64, drover_core::AdmissionRefusal>>,
    },
}

/// The controller is stopping: the owner no longer answers.
#[derive(Debug)]
pub(crate) struct Stopping;

/// The owner's inbox. Every event is stamped with the time the shell received it, and
/// the core's clock follows those stamps: keepalives are judged by when messages
/// arrived, not by when a busy owner got to them. (Stamped at processing time, a
/// backlog longer than `node_timeout` would time out nodes whose heartbeats are
/// waiting in the queue, and the failovers would feed the backlog.)
#[derive(Clone)]
pub(crate) struct Inbox(mpsc::Sender<(i64, ShellEvent)>);

impl Inbox {
    /// The inbox and the owner's end of it, holding up to `capacity` events.
    pub(crate) fn new(capacity: usize) -> (Inbox, mpsc::Receiver<(i64, ShellEvent)>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Inbox(tx), rx)
    }

    /// Stamps `event` with the current time and queues it for the owner.
    pub(crate) async fn send(&self, event: ShellEvent) -> Result<(), Stopping> {
        self.0.send((now_ms(), event)).await.map_err(|_| Stopping)
    }
}

/// Why an operator stream is refused.
#[derive(Debug)]
pub(crate) enum CliRefusal {
    /// The token: unknown, expired, revoked, a join token, or too many failures.
    Token(&'static str),
    /// This member does not lead: why, and the leader's gRPC address when known (the
    /// CLI follows it).
    NotLeader { why: String, leader_grpc: Option<String> },
}

/// Who leads, as a member that does not lead tells nodes and operators.
#[derive(Clone, Debug)]
pub(crate) struct LeaderHint {
    /// A sentence naming the leader and its gRPC address (or saying none is known).
    pub(crate) text: String,
    /// The leader's gRPC address, when known.
    pub(crate) grpc: Option<String>,
}

/// Asks the owner about an operator token (a read: nothing is journaled): its role,
/// or why it is refused (unknown, expired, revoked, a join token; not the leader).
pub(crate) async fn operator_role(
    events: &Inbox,
    presented: drover_admission::token::Presented,
    peer: std::net::IpAddr,
) -> Result<Result<drover_core::OperatorRole, CliRefusal>, Stopping> {
    let (reply, verdict) = tokio::sync::oneshot::channel();
    let auth = ShellEvent::CliAuth { id: presented.id, secret_hash: presented.secret_hash, peer, reply };
    events.send(auth).await?;
    verdict.await.map_err(|_| Stopping)
}

/// What the owner tells the releaser, in order.
enum Release {
    Register(u64, Sink),
    /// A node's admission control channel (id, eviction sender).
    Control(String, u64, Option<mpsc::Sender<String>>),
    /// Where the verdict on an admission attempt goes (`Ok`: the ticket generation).
    Admission(u64, tokio::sync::oneshot::Sender<Result<u64, drover_core::AdmissionRefusal>>),
    Unregister(u64),
    /// End a stream with this status (its message was refused before the journal).
    Refuse(u64, tonic::Status),
    /// The ticket of a batch of inputs (`None`: already durable, committed by the
    /// Raft group), how many, all their outputs, and the fence of the leader that
    /// committed them (stamped on every command to a node; `None` on one controller).
    Outputs(Option<Ticket>, u64, Vec<Output>, Option<v1::LeaderFence>),
    /// This controller stopped leading: every stream is ended with this message, and
    /// admissions waiting for a verdict are refused with it.
    Deposed(String),
}

/// The log under the core: the local journal (one controller), or the Raft group's.
pub(crate) enum Backend {
    /// One controller: the core is applied here, as inputs are appended.
    Local {
        /// The core.
        core: Box<Controller>,
        /// Its journal.
        journal: Journal,
    },
    /// A member of a cluster.
    Replicated(Box<Replicated>),
}

/// The owner's side of a cluster member.
pub(crate) struct Replicated {
    pub(crate) member: drover_raft::member::Member<Controller>,
    /// Leading, and this leadership's `ControllerStarted` is committed: serving.
    leading: bool,
    /// Counts leaderships: a commit reported for an earlier one is stale.
    epoch: u64,
    /// This leadership's leader id (term, member), stamped on every command to a node.
    fence: Option<v1::LeaderFence>,
    /// Proposed batches not yet committed.
    inflight: usize,
    /// Since when proposals have waited with none committed (`None`: none waits).
    waiting_since: Option<std::time::Instant>,
    /// The term in which this member gave up leading for lack of commits: it does not
    /// take the lead again in that term (openraft may still call it leader).
    gave_up_term: Option<u64>,
    /// The deliberately broken build's core, applied as batches are proposed.
    #[cfg(feature = "broken-ack-before-commit")]
    shadow: Option<Box<Controller>>,
    /// Where proposals wait for their commit, in order (see [`await_commits`]).
    proposals: Option<mpsc::UnboundedSender<Proposal>>,
    /// What a refused node or CLI is told (who leads, where), kept current by
    /// `crate::cluster::watch_leader`.
    pub(crate) leader_hint: Arc<std::sync::Mutex<LeaderHint>>,
}

impl Replicated {
    pub(crate) fn new(
        member: drover_raft::member::Member<Controller>,
        leader_hint: Arc<std::sync::Mutex<LeaderHint>>,
    ) -> Replicated {
        member.machine.keep_outputs(false);
        // A follower may hold an evicted node's control channel (any member admits):
        // it closes it as the leader would.
        member.machine.keep_when_following(|o| matches!(o, Output::EvictNode { .. }));
        Replicated {
            member,
            leading: false,
            epoch: 0,
            fence: None,
            inflight: 0,
            waiting_since: None,
            gave_up_term: None,
            #[cfg(feature = "broken-ack-before-commit")]
            shadow: None,
            proposals: None,
            leader_hint,
        }
    }

    fn hint(&self) -> String {
        self.leader_hint.lock().map(|h| h.text.clone()).unwrap_or_default()
    }

    fn leader_grpc(&self) -> Option<String> {
        self.leader_hint.lock().ok().and_then(|h| h.grpc.clone())
    }
}

/// A batch proposed to the Raft group: its leadership epoch, the receiver of its
/// commit, how many inputs it holds.
type Proposal = (u64, drover_raft::types::WriteReceiver, u64, std::time::Instant);

/// A proposal's fate: its epoch, `Err` if it was not committed, how many inputs.
type Commit = (u64, Result<(), String>, u64);

/// Waits for each proposal's commit, in the order they were made, and reports it.
/// Commit latency (propose → committed) goes to `stats`.
async fn await_commits(
    mut proposals: mpsc::UnboundedReceiver<Proposal>,
    commits: mpsc::UnboundedSender<Commit>,
    stats: Arc<drover_raft::stats::RaftStats>,
) {
    while let Some((epoch, rx, n, proposed)) = proposals.recv().await {
        let result = match rx.await {
            Ok(Ok(_)) => {
                stats.commit_latency.observe_duration(proposed.elapsed());
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the Raft engine dropped the proposal".to_owned()),
        };
        if commits.send((epoch, result, n)).is_err() {
            return;
        }
    }
}

/// Most batches proposed to the Raft group and not yet committed; past it the owner
/// waits (the inbox fills, and the gRPC handlers wait for room).
const MAX_INFLIGHT: usize = 32;

/// Bytes of an entry's framing in the Raft log beyond its inputs (term, leader, index,
/// kind, the message header).
const RAFT_ENTRY_OVERHEAD: usize = 128;

/// The core, borrowed from wherever the backend keeps it.
enum CoreRef<'a> {
    Local(&'a Controller),
    Raft(drover_raft::machine::Core<'a, Controller>),
}

impl std::ops::Deref for CoreRef<'_> {
    type Target = Controller;
    fn deref(&self) -> &Controller {
        match self {
            CoreRef::Local(c) => c,
            CoreRef::Raft(c) => c,
        }
    }
}

/// Most events in one batch.
const MAX_BATCH: usize = 4096;
/// Stop adding events to a batch past this many payload bytes (the journal refuses a
/// batch over its record limit).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Fixed part of an input's journal entry, above the bytes of its strings: the entry
/// framing, the time, the session, and a length prefix (at most 10 bytes) per string.
pub(crate) const INPUT_OVERHEAD: usize = 256;

impl ShellEvent {
    /// An upper bound on the bytes the event's input takes in the journal: every
    /// string and byte field it carries plus [`INPUT_OVERHEAD`] (strings in a list add
    /// their own length prefix, at most 5 bytes for any string a message can hold).
    fn size_hint(&self) -> usize {
        INPUT_OVERHEAD
            + match self {
                ShellEvent::NodeMessage { node, msg, .. } => {
                    node.len()
                        + msg.request_id.len()
                        + msg.from_uuid.as_ref().map_or(0, String::len)
                        + msg.response.as_ref().map_or(0, |a| a.type_url.len() + a.value.len())
                }
                ShellEvent::CliMessage { msg, .. } => {
                    msg.stream_id.len()
                        + msg.request_id.len()
                        + msg.cli_uuid.len()
                        + msg.command.as_ref().map_or(0, |a| a.type_url.len() + a.value.len())
                        + msg.node_uuids.iter().map(|u| u.len() + 5).sum::<usize>()
                }
                _ => 0,
            }
    }
}

/// What `/metrics` shows, published by the owner after each batch.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The core's counters.
    pub counters: drover_core::Counters,
    /// The task plane's counters.
    pub tasks: drover_core::TaskCounters,
    /// Task queue depth and tasks by state.
    pub task_gauges: drover_core::TaskGauges,
    /// Nodes per state.
    pub nodes: std::collections::BTreeMap<&'static str, u64>,
    /// Pairs with a streamer.
    pub pairs_with: u64,
    /// Pairs without one.
    pub pairs_without: u64,
    /// The journal writer's counters.
    pub journal: drover_journal::JournalStats,
    /// The journal writer's histograms.
    pub histograms: drover_journal::JournalHistograms,
    /// How long recovery (checkpoint load and replay) took at start, in microseconds.
    pub replay_us: u64,
    /// Inputs replayed at start.
    pub replayed_inputs: u64,
    /// Admissions refused since this process started, by `AdmissionRefusal::reason`
    /// (the core's verdicts, and the shell's own: malformed credentials and the
    /// failure limiter, which never reach the journal).
    pub admission_refusals: BTreeMap<&'static str, u64>,
    /// Node streams refused because their ticket's generation was no longer current.
    pub stale_tickets: u64,
    /// Operator tokens refused on gRPC and HTTP (bad, or rate-limited).
    pub operator_refusals: u64,
    /// Messages the shell could not decode (journaled as a digest only).
    pub undecodable: u64,
}

/// Liveness and progress, for `/healthz` and `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    /// Recovery finished and the controller serves.
    pub ready: AtomicBool,
    /// Inputs applied.
    pub applied: AtomicU64,
    /// Unix ms of the last applied input.
    pub last_applied_ms: AtomicI64,
    /// Events waiting for the owner.
    pub queued: AtomicU64,
    /// Inputs known durable (their outputs released).
    pub durable: AtomicU64,
    /// Set when the journal failed: the controller is broken.
    pub journal_failed: AtomicBool,
    /// A cluster member serves nodes and CLIs (it leads, its `ControllerStarted` is
    /// committed, and a majority acknowledged it within the lease). One controller:
    /// set once ready.
    pub serving: AtomicBool,
}

/// A leader whose proposals wait this long (or three leases, if longer) with none
/// committed stops serving. Commits under a heavy load take well under a second here;
/// a member that cannot commit for two is replaced by then.
const NO_COMMIT_LIMIT: Duration = Duration::from_secs(2);

/// Longest string field kept in the digest of an undecodable message.
const DIGEST_FIELD: usize = 256;

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Why a message cannot be decoded (an unknown type, or bytes that are not its type),
/// or `None` when it can. Only such messages are replaced by a digest: what the core
/// cannot decode changes no state, so journaling its bytes in full would only let a
/// low-privilege peer fill the disk. Small messages of a known type (prices,
/// heartbeats) skip the trial decode: they are cheap to journal whatever they hold.
/// `relayed`: an unknown type is passed on unread (a node's reply to a CLI, an admin's
/// command to nodes), so only bytes that are not their known type count.
/// (A message without a payload is an empty Any, as the core sees it.)
fn undecodable(any: Option<&drover_proto::Any>, relayed: bool) -> Option<String> {
    const SMALL: usize = 1024;
    let empty = drover_proto::Any::default();
    let any = any.unwrap_or(&empty);
    if any.value.len() <= SMALL && drover_proto::Payload::knows(&any.type_url) {
        return None;
    }
    match drover_proto::Payload::from_any(any) {
        Err(e) => Some(truncate(e.to_string(), DIGEST_FIELD)),
        Ok(drover_proto::Payload::Unknown { .. }) if !relayed => {
            Some(format!("unknown message type {}", truncate(any.type_url.clone(), DIGEST_FIELD)))
        }
        Ok(_) => None,
    }
}

/// Whether a CLI message asks for a new token.
fn is_token_create(msg: &v1::StreamFromCli) -> bool {
    msg.command.as_ref().is_some_and(|a| a.type_url.ends_with(".ControllerTokenCreateV1Req"))
}

/// Puts a new token's secret into its creation reply; `false` when `msg` is another
/// message (the stream's other replies).
fn fill_secret(msg: &mut v1::StreamToCli, secret: &str) -> bool {
    let Some(any) = &msg.response else { return false };
    if let Ok(drover_proto::Payload::ControllerTokenCreateV1Reply(mut r)) = drover_proto::Payload::from_any(any) {
        r.token = secret.to_owned();
        msg.response = Some(drover_proto::Payload::from(r).to_any());
        return true;
    }
    false
}

pub(crate) struct Owner {
    config: ControllerConfig,
    log: Backend,
    /// New tokens' secrets, by CLI session and stream, until their creation replies
    /// are released (they are put into the reply outside the core).
    secrets: Vec<(u64, String, String)>,
    health: Arc<Health>,
    last_ms: i64,
    limiter: drover_admission::limiter::FailureLimiter,
    /// Seals secret task environments before they are journaled; the releaser opens them.
    sealer: Arc<crate::secrets::Sealer>,
    /// Failed operator tokens per address and token id.
    operator_limiter: drover_admission::limiter::FailureLimiter,
    /// Operator tokens refused (never journaled).
    operator_refusals: u64,
    /// Messages the shell could not decode, journaled as a digest only.
    undecodable: u64,
    attempts: u64,
    /// Admission attempts in flight: peer, node and the token id presented.
    peers: HashMap<u64, (std::net::IpAddr, String, String)>,
    /// Rate-limited refusals not yet logged, and when the last such line was written.
    rate_limited_unlogged: u64,
    rate_limit_logged_ms: i64,
    /// Where `/metrics` reads from.
    snapshot: watch::Sender<Snapshot>,
    /// Admissions refused, by reason (see `Stats::admission_refusals`).
    refusals: BTreeMap<&'static str, u64>,
    /// Recovery time (µs) and inputs replayed, for `/metrics`.
    replay: (u64, u64),
    /// Where the dashboard reads from.
    view: watch::Sender<Arc<drover_core::FleetView>>,
    /// Inputs were applied since the last publish.
    dirty: bool,
    /// Price history and recent events, for the dashboard.
    recent: crate::recent::Shared,
}

/// How often the metrics snapshot and fleet view are refreshed while inputs arrive.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

impl Owner {
    /// The core (on a cluster member: the one its state machine applies to).
    fn core(&self) -> CoreRef<'_> {
        match &self.log {
            Backend::Local { core, .. } => CoreRef::Local(core),
            Backend::Replicated(r) => CoreRef::Raft(r.member.machine.core()),
        }
    }

    /// The journal (on a cluster member: the one under its Raft log).
    fn journal(&self) -> &Journal {
        match &self.log {
            Backend::Local { journal, .. } => journal,
            Backend::Replicated(r) => &r.member.journal,
        }
    }

    /// The largest run of encoded inputs one append (or one Raft entry) may hold.
    fn max_entry(&self) -> usize {
        match &self.log {
            Backend::Local { journal, .. } => journal.max_entry(),
            Backend::Replicated(r) => r.member.journal.max_entry().saturating_sub(RAFT_ENTRY_OVERHEAD),
        }
    }

    /// Whether this controller serves nodes and CLIs (always, on its own).
    fn serving(&self) -> bool {
        match &self.log {
            Backend::Local { .. } => true,
            Backend::Replicated(r) => r.leading,
        }
    }

    /// A leadership handover is under way: nothing is proposed meanwhile.
    fn handing_over(&self) -> bool {
        matches!(&self.log, Backend::Replicated(r) if r.member.leadership.handing_over())
    }

    /// A receiver of the metrics snapshots this owner publishes.
    pub(crate) fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// The price history and recent events this owner records (for the dashboard).
    pub(crate) fn recent(&self) -> crate::recent::Shared {
        self.recent.clone()
    }

    /// A receiver of the fleet views this owner publishes (for the dashboard).
    pub(crate) fn views(&self) -> watch::Receiver<Arc<drover_core::FleetView>> {
        self.view.subscribe()
    }

    /// Publishes the metrics snapshot and the fleet view. Both cost O(nodes + pairs),
    /// so the run loop calls this at most every `PUBLISH_EVERY`, not per batch.
    fn publish(&mut self) {
        self.dirty = false;
        let view = Arc::new(self.core().fleet_view());
        if let Ok(mut r) = self.recent.lock() {
            r.sample(&view);
        }
        self.view.send_replace(view);
        let core = self.core();
        let (nodes, pairs_with, pairs_without) = core.gauges();
        let (_, stale_tickets) = core.identity_counters();
        let (counters, tasks, task_gauges) =
            (core.counters().clone(), core.task_counters().clone(), core.task_gauges());
        drop(core);
        self.snapshot.send_replace(Snapshot {
            counters,
            tasks,
            task_gauges,
            nodes,
            pairs_with,
            pairs_without,
            journal: self.journal().stats(),
            histograms: self.journal().histograms(),
            replay_us: self.replay.0,
            replayed_inputs: self.replay.1,
            admission_refusals: self.refusals.clone(),
            stale_tickets,
            operator_refusals: self.operator_refusals,
            undecodable: self.undecodable,
        });
    }

    /// Counts an admission refusal, by reason (the core's verdicts and the shell's own).
    fn refused(&mut self, refusal: &drover_core::AdmissionRefusal) {
        *self.refusals.entry(refusal.reason()).or_default() += 1;
        // The metrics changed even though nothing was journaled: publish them.
        self.dirty = true;
    }

    /// Records how long recovery took, for `/metrics`.
    pub(crate) fn set_replay(&mut self, micros: u64, inputs: u64) {
        self.replay = (micros, inputs);
    }

    pub(crate) fn new(
        config: ControllerConfig,
        log: Backend,
        health: Arc<Health>,
        sealer: Arc<crate::secrets::Sealer>,
    ) -> Self {
        let limiter = drover_admission::limiter::FailureLimiter::new(config.max_failed_admissions, 60_000);
        let operator_limiter = drover_admission::limiter::FailureLimiter::new(config.max_failed_admissions, 60_000);
        Owner {
            config,
            log,
            secrets: Vec::new(),
            health,
            last_ms: 0,
            limiter,
            sealer,
            operator_limiter,
            operator_refusals: 0,
            undecodable: 0,
            attempts: 0,
            peers: HashMap::new(),
            rate_limited_unlogged: 0,
            rate_limit_logged_ms: i64::MIN / 2,
            snapshot: watch::channel(Snapshot::default()).0,
            refusals: BTreeMap::new(),
            replay: (0, 0),
            view: watch::channel(Arc::new(drover_core::FleetView::default())).0,
            dirty: true,
            recent: Default::default(),
        }
    }

    pub(crate) async fn run(
        mut self,
        mut events: mpsc::Receiver<(i64, ShellEvent)>,
        mut stop: watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(), ShellError> {
        let (release_tx, release_rx) = mpsc::unbounded_channel();
        let health = self.health.clone();
        // A failed journal write surfaces in the releaser (it awaits the tickets); it
        // tells the owner here, which stops the controller rather than leave it up
        // with nothing durable and no outputs.
        let (fatal_tx, mut fatal) = tokio::sync::oneshot::channel::<drover_journal::JournalError>();
        let releaser = tokio::spawn(release(release_rx, health, fatal_tx, self.sealer.clone()));
        // A cluster member starts as a follower; it runs the fleet once it leads.
        let (commit_tx, mut commits) = mpsc::unbounded_channel::<Commit>();
        let mut metrics = match &mut self.log {
            Backend::Local { .. } => {
                let config = self.config.core.clone();
                self.inputs(vec![Event::ControllerStarted { config }], &release_tx).await?;
                self.bootstrap_admin(&release_tx).await?;
                None
            }
            Backend::Replicated(r) => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(await_commits(rx, commit_tx, r.member.stats.clone()));
                r.proposals = Some(tx);
                Some(r.member.raft.metrics())
            }
        };
        self.health.ready.store(true, Ordering::SeqCst);
        if matches!(self.log, Backend::Local { .. }) {
            self.health.serving.store(true, Ordering::SeqCst);
        }
        let _ = ready.send(());
        let mut refresh = tokio::time::interval(PUBLISH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let deadline =
                self.core().next_deadline_hint().filter(|_| self.serving() && !self.handing_over()).map(|d| {
                    let wait = Duration::from_millis((d - now_ms()).max(0) as u64);
                    tokio::time::Instant::now() + wait
                });
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let metrics_changed = async {
                match metrics.as_mut() {
                    Some(m) => m.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let room = match &self.log {
                Backend::Local { .. } => true,
                // A leadership handover pauses proposals (inputs wait in the inbox).
                Backend::Replicated(r) => r.inflight < MAX_INFLIGHT && !r.member.leadership.handing_over(),
            };
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break Ok(());
                    }
                }
                e = &mut fatal => {
                    if let Ok(e) = e {
                        break Err(ShellError::Journal(e));
                    }
                }
                alive = metrics_changed => {
                    if !alive {
                        break Err(ShellError::Cluster("the Raft engine stopped".into()));
                    }
                    if let Err(e) = self.on_raft_change(&release_tx).await {
                        break Err(e);
                    }
                }
                Some((epoch, result, n)) = commits.recv() => {
                    let Backend::Replicated(r) = &mut self.log else { continue };
                    if epoch != r.epoch {
                        continue;
                    }
                    r.inflight -= 1;
                    let settled = r.inflight == 0;
                    r.waiting_since = (!settled).then(std::time::Instant::now);
                    match result {
                        Ok(()) => {
                            self.committed(n, &release_tx);
                            if settled {
                                // Every reply proposed so far is out: no secret is left waiting.
                                self.secrets.clear();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "a proposal was not committed: no longer leading");
                            self.step_down(&release_tx, "this controller stopped leading".into());
                        }
                    }
                }
                _ = refresh.tick() => {
                    if self.dirty || matches!(self.log, Backend::Replicated(_)) {
                        self.publish();
                    }
                    // A leader whose proposals have waited several leases with none
                    // committed cannot lead (a disk that stalls, a Raft engine that does
                    // not answer; by then the others have elected another): it stops
                    // serving, so its nodes and CLIs look for the leader they elected.
                    if let Backend::Replicated(r) = &self.log
                        && r.leading
                        && let Some(since) = r.waiting_since
                        && since.elapsed() > (r.member.leadership.lease() * 3).max(NO_COMMIT_LIMIT)
                    {
                        let ms = since.elapsed().as_millis();
                        tracing::warn!(waited_ms = ms as u64, "no proposal committed for several leases: stepping down (a slow disk?)");
                        let term = r.fence.map(|f| f.term);
                        self.step_down(&release_tx, format!("this controller committed nothing for {ms} ms"));
                        if let Backend::Replicated(r) = &mut self.log {
                            r.gave_up_term = term;
                        }
                    }
                    // A follower closes the control channels it holds of nodes the
                    // group evicted (the leader's releaser does the same for its own).
                    if let Backend::Replicated(r) = &self.log
                        && !r.leading
                    {
                        let evictions = r.member.machine.take_outputs();
                        if !evictions.is_empty() {
                            let _ = release_tx.send(Release::Outputs(None, 0, evictions, None));
                        }
                    }
                }
                ev = events.recv(), if room => {
                    let Some(ev) = ev else { break Ok(()) };
                    // Everything already waiting joins this batch: one journal append,
                    // one ticket, one release.
                    let mut batch = vec![ev];
                    let mut bytes = 0;
                    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        match events.try_recv() {
                            Ok(ev) => {
                                bytes += ev.1.size_hint();
                                batch.push(ev);
                            }
                            Err(_) => break,
                        }
                    }
                    self.health.queued.store(events.len() as u64, Ordering::Relaxed);
                    let handled = if self.serving() {
                        self.events(batch, &release_tx).await
                    } else {
                        self.refuse(batch, &release_tx);
                        Ok(())
                    };
                    if let Err(e) = handled {
                        break Err(e);
                    }
                }
                _ = sleep => {
                    if let Err(e) = self.inputs(vec![Event::Tick], &release_tx).await {
                        break Err(e);
                    }
                }
            }
        };
        match (&mut self.log, result.is_ok()) {
            (Backend::Local { core, journal }, true) => {
                // Graceful stop: everything appended becomes durable, then a final checkpoint.
                journal.flush().await?;
                let covered = journal.checkpoint(core.checkpoint()?).await?;
                tracing::info!(covered, "final checkpoint written");
            }
            (Backend::Local { .. }, false) => self.health.journal_failed.store(true, Ordering::SeqCst),
            (Backend::Replicated(_), _) => {}
        }
        drop(release_tx);
        let _ = releaser.await;
        if let Backend::Replicated(r) = self.log {
            r.member.shutdown().await;
        }
        result
    }

    /// The Raft group's metrics changed: start or stop leading as they say.
    async fn on_raft_change(&mut self, release: &mpsc::UnboundedSender<Release>) -> Result<(), ShellError> {
        let Backend::Replicated(r) = &self.log else { return Ok(()) };
        let m = r.member.raft.metrics().borrow().clone();
        if let Err(e) = &m.running_state {
            return Err(ShellError::Cluster(format!("the Raft engine failed: {e}")));
        }
        let leads = m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id);
        let id = m.vote.leader_id();
        let fence = v1::LeaderFence { term: id.term, member: id.node_id };
        // Metrics coalesce: a leader deposed and elected again in a later term may
        // never be seen not leading. A new term is a new leadership: its own fence, and
        // everything proposed in the old one is settled again from the commit.
        let renewed = leads && r.leading && r.fence.as_ref().is_some_and(|f| *f != fence);
        let lease = r.member.leadership.lease();
        if renewed {
            self.step_down(release, format!("this controller (member {}) was elected again in term {}", m.id, id.term));
        }
        // A leader that has not heard a majority for longer than the followers' lease
        // may already be replaced on the other side of a partition: it stops serving at
        // once (openraft keeps it leader until it hears the newer term) and serves
        // again only once a majority acknowledges it.
        let unheard = m.millis_since_quorum_ack.filter(|&ms| ms > lease.as_millis() as u64);
        // The deliberately broken build keeps serving without a majority too.
        #[cfg(feature = "broken-ack-before-commit")]
        let unheard = unheard.filter(|_| false);
        let Backend::Replicated(r) = &self.log else { return Ok(()) };
        if let Some(ms) = unheard.filter(|_| leads && r.leading) {
            tracing::warn!(since_ms = ms, "no majority has acknowledged this leader within the lease: stepping down");
            self.step_down(release, format!("this controller (member {}) lost its majority ({ms} ms unheard)", m.id));
        }
        let Backend::Replicated(r) = &self.log else { return Ok(()) };
        if leads && !r.leading && unheard.is_none() && r.gave_up_term != Some(id.term) {
            self.take_lead(release, fence).await?;
        } else if !leads && r.leading {
            self.step_down(release, format!("this controller (member {}) stopped leading", m.id));
        }
        Ok(())
    }

    /// Became leader: every entry before this term is applied once `ControllerStarted`
    /// commits (it says every connection is new: the old leader's died with its
    /// leadership), then the fleet is served from here.
    async fn take_lead(
        &mut self,
        release: &mpsc::UnboundedSender<Release>,
        fence: v1::LeaderFence,
    ) -> Result<(), ShellError> {
        let Backend::Replicated(r) = &mut self.log else { return Ok(()) };
        let term = fence.term;
        r.epoch += 1;
        r.fence = Some(fence);
        r.member.machine.keep_outputs(true);
        // Outputs of entries the previous leader proposed were its to send.
        drop(r.member.machine.take_outputs());
        let config = self.config.core.clone();
        if !self.commit_now(vec![Event::ControllerStarted { config }], release).await? {
            return Ok(());
        }
        if let Backend::Replicated(r) = &mut self.log {
            r.leading = true;
        }
        self.health.serving.store(true, Ordering::SeqCst);
        self.bootstrap_admin(release).await?;
        tracing::info!(term, "leading: serving nodes and CLIs");
        if let Ok(mut r) = self.recent.lock() {
            r.note(now_ms(), "leader", format!("this controller leads (term {term})"));
        }
        Ok(())
    }

    /// Stopped leading (or never got to): nothing more is released, every stream is
    /// closed with `why`, proposals in flight are forgotten (if the group commits them,
    /// the new leader's `ControllerStarted` follows them).
    fn step_down(&mut self, release: &mpsc::UnboundedSender<Release>, why: String) {
        let Backend::Replicated(r) = &mut self.log else { return };
        let was = r.leading;
        r.leading = false;
        self.health.serving.store(false, Ordering::SeqCst);
        r.epoch += 1;
        r.inflight = 0;
        r.waiting_since = None;
        #[cfg(feature = "broken-ack-before-commit")]
        {
            r.shadow = None;
        }
        r.member.machine.keep_outputs(false);
        self.secrets.clear();
        self.peers.clear();
        let hint = r.hint();
        let _ = release.send(Release::Deposed(format!("{why}; {hint}")));
        if was {
            tracing::warn!(%why, "no longer leading: streams closed, nothing more released");
            if let Ok(mut r) = self.recent.lock() {
                r.note(now_ms(), "leader", why);
            }
        }
    }

    /// A proposed batch of `n` inputs is committed: the outputs its entries (and any
    /// before it) made are released.
    fn committed(&mut self, n: u64, release: &mpsc::UnboundedSender<Release>) {
        let Backend::Replicated(r) = &self.log else { return };
        let out = r.member.machine.take_outputs();
        // The deliberately broken build released these batches' outputs before their
        // commit (see `inputs_with_secrets`): not twice.
        #[cfg(feature = "broken-ack-before-commit")]
        if n > 0 {
            drop(out);
            return;
        }
        let fence = r.fence;
        self.settle(None, n, out, fence, release);
    }

    /// Proposes `events` and waits until they are committed and applied, releasing
    /// their outputs (on one controller: appends, applies and waits until durable).
    /// `false`: this member stopped leading first (and has stepped down).
    async fn commit_now(
        &mut self,
        events: Vec<Event>,
        release: &mpsc::UnboundedSender<Release>,
    ) -> Result<bool, ShellError> {
        let Backend::Replicated(r) = &self.log else {
            self.inputs(events, release).await?;
            self.journal().flush().await?;
            return Ok(true);
        };
        let raft = r.member.raft.clone();
        let now = now_ms();
        let mut data = Vec::new();
        for event in events {
            self.last_ms = self.last_ms.max(now);
            data.extend_from_slice(&encode_input::<Controller>(&Input { at_ms: self.last_ms, event })?);
        }
        match raft.client_write(drover_raft::Inputs(data)).await {
            Ok(_) => {
                self.committed(0, release);
                Ok(true)
            }
            Err(e) => {
                tracing::info!(error = %e, "not committed: no longer leading");
                self.step_down(release, "this controller stopped leading".into());
                Ok(false)
            }
        }
    }

    /// Shell events reaching a member that does not lead: nodes and CLIs are told who
    /// does, admissions are refused with the same, nothing is journaled.
    fn refuse(&mut self, batch: Vec<(i64, ShellEvent)>, release: &mpsc::UnboundedSender<Release>) {
        let Backend::Replicated(r) = &self.log else { return };
        let why = format!("this controller does not lead the cluster; {}", r.hint());
        let leader_grpc = r.leader_grpc();
        for (_, ev) in batch {
            match ev {
                ShellEvent::NodeOpened { session, sink, .. } => {
                    let _ = release.send(Release::Register(session, Sink::Node(sink)));
                    let _ = release.send(Release::Refuse(session, tonic::Status::unavailable(why.clone())));
                }
                ShellEvent::CliOpened { session, sink, .. } => {
                    let _ = release.send(Release::Register(session, Sink::Cli(sink)));
                    let _ = release.send(Release::Refuse(session, tonic::Status::unavailable(why.clone())));
                }
                ShellEvent::Admission { reply, .. } => {
                    let refusal = drover_core::AdmissionRefusal::NotLeader(why.clone());
                    self.refused(&refusal);
                    let _ = reply.send(Err(refusal));
                }
                ShellEvent::CliAuth { reply, .. } => {
                    let _ =
                        reply.send(Err(CliRefusal::NotLeader { why: why.clone(), leader_grpc: leader_grpc.clone() }));
                }
                ShellEvent::ControlOpened { node, id, evict } => {
                    let _ = release.send(Release::Control(node, id, Some(evict)));
                }
                ShellEvent::ControlClosed { node, id } => {
                    let _ = release.send(Release::Control(node, id, None));
                }
                ShellEvent::NodeMessage { .. }
                | ShellEvent::NodeClosed { .. }
                | ShellEvent::CliMessage { .. }
                | ShellEvent::CliClosed { .. } => {}
            }
        }
    }

    /// Turns a batch of shell events into inputs, registering new sessions with the
    /// releaser before the batch's outputs and unregistering closed ones after them.
    async fn events(
        &mut self,
        batch: Vec<(i64, ShellEvent)>,
        release: &mpsc::UnboundedSender<Release>,
    ) -> Result<(), ShellError> {
        let mut inputs = Vec::with_capacity(batch.len());
        let mut closed = Vec::new();
        let mut secrets: Vec<(u64, String, String)> = Vec::new();
        for (received_ms, ev) in batch {
            // A single input the journal could never hold is refused to its peer here,
            // never passed on (the gRPC limit keeps every message below this with
            // headroom: this is the guard should the two ever drift apart).
            let hint = ev.size_hint();
            if hint > self.max_entry() {
                let session = match &ev {
                    ShellEvent::NodeMessage { session, .. } | ShellEvent::CliMessage { session, .. } => *session,
                    _ => 0,
                };
                tracing::warn!(
                    session,
                    bytes = hint,
                    limit = self.max_entry(),
                    "message refused: too large for one journal entry"
                );
                let status = tonic::Status::resource_exhausted(format!(
                    "message of about {hint} bytes is over the controller's journal entry limit of {} bytes",
                    self.max_entry()
                ));
                let _ = release.send(Release::Refuse(session, status));
                continue;
            }
            let event = match ev {
                ShellEvent::ControlOpened { node, id, evict } => {
                    let _ = release.send(Release::Control(node, id, Some(evict)));
                    continue;
                }
                ShellEvent::ControlClosed { node, id } => {
                    let _ = release.send(Release::Control(node, id, None));
                    continue;
                }
                ShellEvent::CliAuth { id, secret_hash, peer, reply } => {
                    // Failed operator tokens are limited per address and token id like
                    // admissions; a valid token always passes.
                    let now = now_ms();
                    let verdict = self.core().operator_role(&id, &secret_hash, now);
                    let key = (peer, id);
                    let verdict = match verdict {
                        Ok(role) => Ok(role),
                        Err(_) if !self.operator_limiter.allowed(&key, now) => {
                            self.operator_refusals += 1;
                            Err(CliRefusal::Token(
                                "too many failed attempts with this token from this address; retry later",
                            ))
                        }
                        Err(reason) => {
                            self.operator_limiter.failed(key, now);
                            self.operator_refusals += 1;
                            Err(CliRefusal::Token(reason))
                        }
                    };
                    let _ = reply.send(verdict);
                    continue;
                }
                ShellEvent::Admission { node, presented, peer, reply } => {
                    let now = now_ms();
                    let key = (
                        peer,
                        match &presented {
                            Ok(drover_core::Credential::Token { id, .. }) => id.clone(),
                            Ok(drover_core::Credential::Certificate) => "certificate".to_owned(),
                            Err(_) => "malformed".to_owned(),
                        },
                    );
                    // Past the limit only a valid credential goes on (checked read-only,
                    // so the refusals stay cheap and unjournaled): one node's bad token
                    // must not lock out good ones behind the same address.
                    let valid = match &presented {
                        Ok(drover_core::Credential::Token { id, secret_hash }) => {
                            self.core().join_credential_valid(id, secret_hash, now).is_ok()
                        }
                        Ok(drover_core::Credential::Certificate) => true,
                        Err(_) => false,
                    };
                    if !valid && !self.limiter.allowed(&key, now) {
                        self.refused(&drover_core::AdmissionRefusal::RateLimited);
                        // One line per interval, not one per attempt.
                        self.rate_limited_unlogged += 1;
                        if now - self.rate_limit_logged_ms >= RATE_LIMIT_LOG_EVERY_MS {
                            tracing::warn!(%node, %peer, refused = self.rate_limited_unlogged,
                                "admission refused: too many failed attempts (count since the last such line)");
                            self.rate_limit_logged_ms = now;
                            self.rate_limited_unlogged = 0;
                        }
                        let _ = reply.send(Err(drover_core::AdmissionRefusal::RateLimited));
                        continue;
                    }
                    let presented = match presented {
                        Ok(p) => p,
                        Err(reason) => {
                            let refusal = drover_core::AdmissionRefusal::Malformed(reason);
                            self.refused(&refusal);
                            self.limiter.failed(key, now);
                            tracing::warn!(%node, %peer, reason = %refusal, "admission refused");
                            let _ = reply.send(Err(refusal));
                            continue;
                        }
                    };
                    self.attempts += 1;
                    let attempt = self.attempts;
                    let _ = release.send(Release::Admission(attempt, reply));
                    self.peers.insert(attempt, (peer, node.clone(), key.1));
                    Event::Admission { attempt, node, credential: presented }
                }
                ShellEvent::NodeOpened { node, session, generation, sink } => {
                    let _ = release.send(Release::Register(session, Sink::Node(sink)));
                    tracing::info!(%node, session, "node stream opened");
                    Event::NodeOpened { node, session, generation }
                }
                ShellEvent::NodeMessage { node, session, msg } => {
                    let relayed = self.core().is_pending_reply(&node, &msg.request_id);
                    let refused = undecodable(msg.response.as_ref(), relayed);
                    let (type_url, value) = msg.response.map(|a| (a.type_url, a.value)).unwrap_or_default();
                    if let Some(reason) = refused {
                        self.undecodable += 1;
                        Event::NodeRefused {
                            node,
                            session,
                            request_id: truncate(msg.request_id, DIGEST_FIELD),
                            type_url: truncate(type_url, DIGEST_FIELD),
                            reason,
                        }
                    } else {
                        Event::NodeMessage {
                            node,
                            session,
                            request_id: msg.request_id,
                            from_uuid: msg.from_uuid,
                            type_url,
                            value,
                        }
                    }
                }
                ShellEvent::NodeClosed { node, session } => {
                    tracing::info!(%node, session, "node stream closed");
                    // A close the controller made (kick, timeout, replaced) is already in
                    // the events with its reason, from `Output::CloseNode`.
                    if self.core().session_of(&node) == Some(session)
                        && let Ok(mut r) = self.recent.lock()
                    {
                        r.note(now_ms(), "closed", format!("{} stream closed", self.core().node_label(&node)));
                    }
                    closed.push(session);
                    Event::NodeDisconnected { node, session }
                }
                ShellEvent::CliOpened { session, role, sink } => {
                    let _ = release.send(Release::Register(session, Sink::Cli(sink)));
                    Event::CliConnected { session, role }
                }
                ShellEvent::CliMessage { session, msg } if is_token_create(&msg) => {
                    // The secret is made here, never in the core and never journaled.
                    let req = msg.command.as_ref().and_then(|a| drover_proto::Payload::from_any(a).ok());
                    let Some(drover_proto::Payload::ControllerTokenCreateV1Req(req)) = req else { continue };
                    let token = match drover_admission::token::generate() {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "no secure randomness for a token");
                            continue;
                        }
                    };
                    secrets.push((session, msg.stream_id.clone(), token.token));
                    Event::TokenCreate {
                        session,
                        stream_id: msg.stream_id,
                        id: token.id,
                        secret_hash: token.secret_hash,
                        role: req.role,
                        ttl_ms: req.ttl_ms,
                        uses: req.uses,
                        description: req.description,
                    }
                }
                ShellEvent::CliMessage { session, mut msg } => {
                    if let Err(reason) = self.seal_secrets(&mut msg) {
                        inputs.push((
                            received_ms,
                            Event::CliRefused {
                                session,
                                stream_id: truncate(msg.stream_id, DIGEST_FIELD),
                                type_url: drover_proto::type_url::<v1::ControllerTaskRunV1Req>(),
                                reason,
                            },
                        ));
                        continue;
                    }
                    let relayed = !msg.node_uuids.is_empty() && self.core().cli_is_admin(session);
                    let refused = undecodable(msg.command.as_ref(), relayed);
                    let (type_url, value) = msg.command.map(|a| (a.type_url, a.value)).unwrap_or_default();
                    if let Some(reason) = refused {
                        self.undecodable += 1;
                        inputs.push((
                            received_ms,
                            Event::CliRefused {
                                session,
                                stream_id: truncate(msg.stream_id, DIGEST_FIELD),
                                type_url: truncate(type_url, DIGEST_FIELD),
                                reason,
                            },
                        ));
                        continue;
                    }
                    Event::CliMessage {
                        session,
                        stream_id: msg.stream_id,
                        cli_uuid: msg.cli_uuid,
                        node_uuids: msg.node_uuids,
                        request_id: msg.request_id,
                        type_url,
                        value,
                    }
                }
                ShellEvent::CliClosed { session } => {
                    closed.push(session);
                    Event::CliDisconnected { session }
                }
            };
            inputs.push((received_ms, event));
        }
        self.inputs_with_secrets(inputs, secrets, release).await?;
        for session in closed {
            let _ = release.send(Release::Unregister(session));
        }
        Ok(())
    }

    /// Seals the secret environment of a task request in place, before it is journaled.
    fn seal_secrets(&self, msg: &mut v1::StreamFromCli) -> Result<(), String> {
        let Some(any) = &msg.command else { return Ok(()) };
        if !any.type_url.ends_with(".ControllerTaskRunV1Req") {
            return Ok(());
        }
        let Ok(drover_proto::Payload::ControllerTaskRunV1Req(mut req)) = drover_proto::Payload::from_any(any) else {
            return Ok(());
        };
        let plain_looks_sealed = req.env.values().any(|v| v.starts_with(drover_core::SEALED_PREFIX));
        if req.secret_env.is_empty() && !plain_looks_sealed {
            return Ok(());
        }
        self.sealer.seal_request(&mut req).map_err(|e| e.to_string())?;
        msg.command = Some(drover_proto::Payload::from(req).to_any());
        Ok(())
    }

    async fn inputs(&mut self, events: Vec<Event>, release: &mpsc::UnboundedSender<Release>) -> Result<(), ShellError> {
        let now = now_ms();
        self.inputs_with_secrets(events.into_iter().map(|e| (now, e)).collect(), Vec::new(), release).await
    }

    /// On first start (or when no admin token is left), creates an admin token and
    /// writes it to `admin.token` in the data directory (mode 0600).
    async fn bootstrap_admin(&mut self, release: &mpsc::UnboundedSender<Release>) -> Result<(), ShellError> {
        if self.core().has_admin_token(now_ms()) {
            return Ok(());
        }
        let token = drover_admission::token::generate()
            .map_err(|e| ShellError::Config(format!("no secure randomness: {e}")))?;
        let event = Event::TokenCreate {
            session: 0,
            stream_id: String::new(),
            id: token.id.clone(),
            secret_hash: token.secret_hash,
            role: v1::TokenRole::Admin as i32,
            ttl_ms: 0,
            uses: 0,
            description: "first admin token".into(),
        };
        if !self.commit_now(vec![event], release).await? {
            // Not committed: the next leader makes one.
            return Ok(());
        }
        let path = self.config.data_dir.join(crate::ADMIN_TOKEN_FILE);
        crate::write_secret(&path, format!("{}\n", token.token).as_bytes())?;
        tracing::info!(file = %path.display(), id = %token.id, "first admin token created (mode 0600); use it with --token or DROVER_TOKEN");
        Ok(())
    }

    /// Journals a batch of inputs (one append, in order), applies them in the same
    /// order, and queues all their outputs behind the batch's ticket. On a cluster
    /// member: proposes them to the group instead (their outputs are released when
    /// committed, by [`Owner::committed`]). `secrets` are the new tokens' secrets, put
    /// into their creation replies outside the core.
    async fn inputs_with_secrets(
        &mut self,
        events: Vec<(i64, Event)>,
        secrets: Vec<(u64, String, String)>,
        release: &mpsc::UnboundedSender<Release>,
    ) -> Result<(), ShellError> {
        // Each input's time is when the shell received it (kept monotonic).
        let inputs: Vec<Input> = events
            .into_iter()
            .map(|(received_ms, event)| {
                self.last_ms = self.last_ms.max(received_ms);
                Input { at_ms: self.last_ms, event }
            })
            .collect();
        if inputs.is_empty() {
            return Ok(());
        }
        self.secrets.extend(secrets);
        // An input that cannot be encoded stops the controller before it is applied:
        // nothing it would cause is released, nothing is skipped silently.
        let encoded = inputs.iter().map(encode_input::<Controller>).collect::<Result<Vec<_>, _>>()?;
        let limit = self.max_entry();
        #[cfg(feature = "broken-ack-before-commit")]
        let mut broken_early = None;
        match &mut self.log {
            Backend::Local { core, journal } => {
                // One append per run of inputs that fits in a journal entry; the last
                // ticket covers them all (the journal makes appends durable in order).
                let mut ticket = None;
                for chunk in drover_journal::split_by_size(encoded, limit) {
                    ticket = Some(journal.append_batch(chunk).await?);
                }
                let Some(ticket) = ticket else { return Ok(()) };
                let mut out = Vec::new();
                let n = inputs.len() as u64;
                for input in inputs {
                    core.apply(input, &mut out);
                }
                self.settle(Some(ticket), n, out, None, release);
                // Every reply of this batch went out with it: no secret is left waiting.
                self.secrets.clear();
                if self.journal().checkpoint_due()
                    && let Backend::Local { core, journal } = &mut self.log
                {
                    let covered = journal.checkpoint(core.checkpoint()?).await?;
                    tracing::info!(covered, "checkpoint written");
                }
            }
            Backend::Replicated(r) => {
                // DELIBERATELY BROKEN, only in a build with the feature
                // `broken-ack-before-commit` (never a default): the leader applies the
                // batch to a copy of its core and releases the outputs at once, before
                // the group commits it. It exists to show that the chaos suite's
                // history checker catches a build that acknowledges before commit.
                #[cfg(feature = "broken-ack-before-commit")]
                {
                    let machine = &r.member.machine;
                    let shadow = r.shadow.get_or_insert_with(|| Box::new(machine.with_core(|c| c.clone())));
                    let mut early = Vec::new();
                    for input in &inputs {
                        shadow.apply(input.clone(), &mut early);
                    }
                    broken_early = Some((early, inputs.len() as u64, r.fence));
                }
                // One entry per run that fits; each waits for its commit in order.
                let Some(proposals) = r.proposals.clone() else { return Ok(()) };
                for chunk in drover_journal::split_by_size(encoded, limit) {
                    let n = chunk.len() as u64;
                    let data: Vec<u8> = chunk.concat();
                    let proposed = std::time::Instant::now();
                    let rx = r
                        .member
                        .raft
                        .client_write_ff(drover_raft::Inputs(data))
                        .await
                        .map_err(|e| ShellError::Cluster(format!("the Raft engine stopped: {e}")))?;
                    r.inflight += 1;
                    r.waiting_since.get_or_insert_with(std::time::Instant::now);
                    let _ = proposals.send((r.epoch, rx, n, proposed));
                }
            }
        }
        #[cfg(feature = "broken-ack-before-commit")]
        if let Some((early, n, fence)) = broken_early {
            self.settle(None, n, early, fence, release);
        }
        Ok(())
    }

    /// What every batch's outputs go through before the releaser: log lines, the
    /// admission limiter, token secrets, the dashboard's recent events, progress.
    fn settle(
        &mut self,
        ticket: Option<Ticket>,
        n: u64,
        mut out: Vec<Output>,
        fence: Option<v1::LeaderFence>,
        release: &mpsc::UnboundedSender<Release>,
    ) {
        let at_ms = now_ms();
        for o in &mut out {
            match o {
                Output::CloseNode { node, reason, .. } => tracing::info!(%node, %reason, "closing node stream"),
                Output::AdmissionVerdict { attempt, result } => {
                    let (peer, node, token_id) = self
                        .peers
                        .remove(attempt)
                        .unwrap_or_else(|| (std::net::IpAddr::from([0, 0, 0, 0]), String::new(), String::new()));
                    match result {
                        Ok(generation) => tracing::info!(%node, %peer, generation, "node admitted"),
                        Err(reason) => {
                            self.refused(reason);
                            self.limiter.failed((peer, token_id), at_ms);
                            tracing::warn!(%node, %peer, %reason, kind = reason.reason(), "admission refused");
                        }
                    }
                }
                Output::ToCli { session, msg } => {
                    if let Some(i) = self.secrets.iter().position(|(s, sid, _)| s == session && *sid == msg.stream_id)
                        && fill_secret(msg, &self.secrets[i].2)
                    {
                        self.secrets.swap_remove(i);
                    }
                }
                Output::EvictNode { node, reason } => tracing::warn!(%node, %reason, "evicting node"),
                Output::Assigned { pair, node, epoch, reason } => {
                    tracing::info!(%pair, %node, epoch, %reason, "streamer assigned")
                }
                Output::TaskEnded { task, state, detail } => tracing::info!(%task, %state, %detail, "task ended"),
                Output::ToNode { .. } => {}
            }
        }
        if let Ok(mut r) = self.recent.lock() {
            let core = self.core();
            r.observe(at_ms, &out, |id| core.node_label(id));
        }
        self.health.applied.fetch_add(n, Ordering::Relaxed);
        self.health.last_applied_ms.store(at_ms, Ordering::Relaxed);
        let _ = release.send(Release::Outputs(ticket, n, out, fence));
        self.dirty = true;
    }
}

/// Sends outputs once their input is durable, in order.
async fn release(
    mut rx: mpsc::UnboundedReceiver<Release>,
    health: Arc<Health>,
    fatal: tokio::sync::oneshot::Sender<drover_journal::JournalError>,
    sealer: Arc<crate::secrets::Sealer>,
) {
    let mut sinks: HashMap<u64, Sink> = HashMap::new();
    let mut verdicts: HashMap<u64, tokio::sync::oneshot::Sender<Result<u64, drover_core::AdmissionRefusal>>> =
        HashMap::new();
    let mut controls: HashMap<String, (u64, mpsc::Sender<String>)> = HashMap::new();
    while let Some(r) = rx.recv().await {
        match r {
            Release::Register(session, sink) => {
                sinks.insert(session, sink);
            }
            Release::Unregister(session) => {
                sinks.remove(&session);
            }
            Release::Refuse(session, status) => match sinks.remove(&session) {
                Some(Sink::Node(tx)) => {
                    let _ = tx.try_send(Err(status));
                }
                Some(Sink::Cli(tx)) => {
                    let _ = tx.try_send(Err(status));
                }
                None => {}
            },
            Release::Admission(attempt, reply) => {
                verdicts.insert(attempt, reply);
            }
            Release::Control(node, id, Some(evict)) => {
                controls.insert(node, (id, evict));
            }
            Release::Control(node, id, None) => {
                if controls.get(&node).is_some_and(|(i, _)| *i == id) {
                    controls.remove(&node);
                }
            }
            Release::Deposed(why) => {
                for (_, sink) in sinks.drain() {
                    let status = tonic::Status::unavailable(why.clone());
                    match sink {
                        Sink::Node(tx) => drop(tx.try_send(Err(status))),
                        Sink::Cli(tx) => drop(tx.try_send(Err(status))),
                    }
                }
                for (_, reply) in verdicts.drain() {
                    let _ = reply.send(Err(drover_core::AdmissionRefusal::NotLeader(why.clone())));
                }
            }
            Release::Outputs(ticket, inputs, outputs, fence) => {
                if let Some(ticket) = ticket
                    && let Err(e) = ticket.await
                {
                    tracing::error!(error = %e, "journal failed: outputs withheld, controller stopping");
                    health.journal_failed.store(true, Ordering::SeqCst);
                    let _ = fatal.send(e);
                    return;
                }
                health.durable.fetch_add(inputs, Ordering::Relaxed);
                for o in outputs {
                    if let Output::EvictNode { node, reason } = &o {
                        if let Some((_, evict)) = controls.remove(node) {
                            let _ = evict.try_send(reason.clone());
                        }
                        continue;
                    }
                    if let Output::AdmissionVerdict { attempt, result } = o {
                        if let Some(reply) = verdicts.remove(&attempt) {
                            let _ = reply.send(result);
                        }
                        continue;
                    }
                    let mut o = o;
                    if let Output::ToNode { msg, .. } = &mut o {
                        msg.fence = fence;
                    }
                    if let Output::ToNode { node, msg, .. } = &mut o
                        && let Err(e) = sealer.open_dispatch(msg)
                    {
                        // The task runs without it and fails visibly on its worker.
                        tracing::error!(%node, error = %e, "a secret of a dispatched task could not be opened");
                    }
                    deliver(&mut sinks, o);
                }
            }
        }
    }
}

fn deliver(sinks: &mut HashMap<u64, Sink>, o: Output) {
    use tokio::sync::mpsc::error::TrySendError;
    // Full: the peer does not read. Closed: it went away (its close is on its way).
    fn verdict<T>(r: Result<(), TrySendError<T>>) -> Option<bool> {
        match r {
            Ok(()) => None,
            Err(TrySendError::Full(_)) => Some(true),
            Err(TrySendError::Closed(_)) => Some(false),
        }
    }
    let (session, failed) = match o {
        Output::ToNode { session, msg, .. } => match sinks.get(&session) {
            Some(Sink::Node(tx)) => (session, verdict(tx.try_send(Ok(msg)))),
            _ => return,
        },
        Output::ToCli { session, msg } => match sinks.get(&session) {
            Some(Sink::Cli(tx)) => (session, verdict(tx.try_send(Ok(msg)))),
            _ => return,
        },
        Output::CloseNode { session, reason, .. } => {
            if let Some(Sink::Node(tx)) = sinks.remove(&session) {
                let _ = tx.try_send(Err(tonic::Status::aborted(reason)));
            }
            return;
        }
        Output::AdmissionVerdict { .. }
        | Output::EvictNode { .. }
        | Output::Assigned { .. }
        | Output::TaskEnded { .. } => return,
    };
    match failed {
        Some(true) => {
            // A peer that does not read is cut off rather than allowed to stall everyone.
            tracing::warn!(session, "stream queue full (the peer does not read); dropping the stream");
            sinks.remove(&session);
        }
        Some(false) => {
            tracing::debug!(session, "stream already closed by its peer");
            sinks.remove(&session);
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The worst case of each kind of message a peer sends: every field the gRPC layer
    /// lets it fill, at exactly the message limit.
    fn worst_inputs(limit: usize) -> Vec<Input> {
        let node = "n".repeat(drover_proto::MAX_NODE_ID);
        let pad = |fixed: usize| vec![0xff_u8; limit - fixed];
        // A node message: the value takes whatever the other fields leave.
        let mut msg = v1::StreamFromNode {
            node_uuid: node.clone(),
            from_uuid: Some("u".repeat(64)),
            response: Some(drover_proto::Any { type_url: "t".repeat(256), value: Vec::new() }),
            request_id: "r".repeat(64),
        };
        // Longer values take longer length prefixes: settle on the largest that fits.
        let mut fixed = msg.encoded_len();
        loop {
            msg.response.as_mut().unwrap().value = pad(fixed);
            if msg.encoded_len() <= limit {
                break;
            }
            fixed += msg.encoded_len() - limit;
        }
        assert!(msg.encoded_len() > limit - 8, "the message is the largest accepted");
        let (type_url, value) = msg.response.map(|a| (a.type_url, a.value)).unwrap();
        let from_node = Event::NodeMessage {
            node,
            session: u64::MAX,
            request_id: msg.request_id,
            from_uuid: msg.from_uuid,
            type_url,
            value,
        };
        // A CLI message: many short node ids cost the most framing per byte.
        let cli = v1::StreamFromCli {
            stream_id: "s".repeat(64),
            cli_uuid: "c".repeat(64),
            node_uuids: vec![String::new(); (limit - 1024) / 2],
            request_id: "r".repeat(64),
            command: None,
        };
        assert!(cli.encoded_len() <= limit);
        let from_cli = Event::CliMessage {
            session: u64::MAX,
            stream_id: cli.stream_id,
            cli_uuid: cli.cli_uuid,
            node_uuids: cli.node_uuids,
            request_id: cli.request_id,
            type_url: String::new(),
            value: Vec::new(),
        };
        [from_node, from_cli].into_iter().map(|event| Input { at_ms: i64::MAX, event }).collect()
    }

    #[test]
    fn the_largest_message_the_grpc_layer_accepts_fits_one_journal_entry_with_headroom() {
        let limit = crate::ControllerConfig::new("unused").max_message_bytes;
        for input in worst_inputs(limit) {
            let entry = encode_input::<Controller>(&input).unwrap().len();
            assert!(
                entry <= crate::largest_input_bytes(limit),
                "a {limit}-byte message became a {entry}-byte entry, over the bound {}",
                crate::largest_input_bytes(limit)
            );
            assert!(entry <= crate::JOURNAL_ENTRY_BYTES / 2, "{entry} bytes leave no headroom");
        }
        assert!(crate::ControllerConfig::new("unused").check_limits().is_ok());
        let mut too_big = crate::ControllerConfig::new("unused");
        too_big.max_message_bytes = crate::JOURNAL_ENTRY_BYTES / 2;
        assert!(too_big.check_limits().is_err(), "a message limit that could not fit twice is refused");
    }
}
