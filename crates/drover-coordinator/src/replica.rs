//! A replica of an instance (`drover coordinator --replica K`): seed 4's primary and
//! secondaries on one openraft group per instance.
//!
//! The replicas of an instance are the members of one Raft group (drover-raft's
//! [`Member`], the engine the controllers use); the instance's log is the group's
//! log, applied by every replica to an [`InstanceLog`]. The group's leader is the
//! primary. Each replica serves its own application on loopback, as a single
//! coordinator does, and what the application is told depends on the replica's role:
//!
//! - **Secondary** (seed 4's "starting as a non-upgrading secondary", or "as an
//!   upgrading secondary" when started with `--upgrade-version V`): the last committed
//!   checkpoint and the records after it, then every record as it commits, with its
//!   original sequence id. Nothing the application sends is logged: its calls are
//!   read, counted and dropped while the log holds them already, and the ones the log
//!   does not hold yet wait (see [`Session::on_committed`]).
//! - **Becoming primary**: when this replica leads and has applied everything in its
//!   log (so every record the old primary committed has been delivered), its
//!   application gets `TakeBecomingPrimaryCheckpoint` (`UpgradeTakeCheckpoint` when
//!   upgrading). drover sends this (type 11), not `BecomingPrimary` (type 15): it is
//!   the message seed 4's secondary flows name and what every binding answers with a
//!   checkpoint. The checkpoint is committed, then the calls that were waiting are
//!   logged and processing goes on from the old primary's last committed record.
//! - **Primary**: as a single coordinator, except that a record is durable when the
//!   group committed it (the session's `Append` is proposed; the record is delivered
//!   when this replica applies it), and so is a checkpoint.
//!
//! A primary that stops leading ends its application's session: what its application
//! sent after the last committed record may or may not be in the new primary's log,
//! so the application restarts and comes back as a secondary (seed 4 has no way to
//! take a live application back to secondary). Links from other instances are taken
//! only by the primary; a secondary closes them at once, and the sending coordinator
//! tries the instance's next replica.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_journal::FsStorage;
use drover_raft::member::{Member, Settings, Timing};
use drover_raft::openraft::ServerState;
use drover_raft::tls::Credentials;
use drover_wire::ambrosia::{Frame, Limits};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::instance;
use crate::replicated::{Input, InstanceLog, Output};
use crate::server::{
    AppPorts, CoordinatorConfig, CoordinatorError, Links, Listening, MAX_CALL, read_frames, session_connections,
};
use crate::session::{Action, Session};

/// How a replica is started.
pub struct ReplicaConfig {
    /// The instance, its ports and limits (as for a single coordinator).
    pub coordinator: CoordinatorConfig,
    /// This replica's id in the group (never reused for another machine).
    pub id: u64,
    /// The Raft port, already bound.
    pub raft: TcpListener,
    /// The Raft address the others reach this replica at.
    pub raft_addr: String,
    /// The initial replicas by id (their Raft addresses); empty or without this
    /// replica: it waits to be added (`drover coordinator add-replica`).
    pub peers: BTreeMap<u64, String>,
    /// The group's secret (and TLS when on).
    pub creds: Credentials,
    /// Heartbeats, elections, snapshots.
    pub timing: Timing,
}

/// A replica asks for a checkpoint at least every this many bytes of records: every
/// replica holds the records after the last checkpoint in memory, and a Raft snapshot
/// of the instance carries them.
pub const REPLICA_CHECKPOINT_EVERY: u64 = 64 << 20;

/// Most messages kept from an application whose session cannot start yet.
const MAX_EARLY_FRAMES: usize = 1024;

/// The directory of replica `id` of an instance: its Raft log and snapshot.
pub fn replica_dir(log_dir: &std::path::Path, name: &str, id: u64) -> PathBuf {
    instance::dir(log_dir, name).join(format!("replica-{id}"))
}

/// What a replica's application is doing, as `drover coordinator status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppView {
    /// `none` (no application connected), `waiting` (connected; no checkpoint to start
    /// from yet), `secondary`, `becoming-primary` or `primary`.
    pub phase: String,
    /// The sequence id of the next record it will be sent (its replay position).
    pub next_seq: i64,
    /// Calls it sent that were dropped (the log held them already).
    pub dropped: u64,
}

/// A replica's view of itself (`drover coordinator status` gathers one per replica).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// The instance.
    pub instance: String,
    /// The replica's id.
    pub id: u64,
    /// `leader` (primary), `follower` (secondary), `candidate`, `learner`.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows.
    pub leader: Option<u64>,
    /// The last Raft index it applied (its commit index).
    pub commit_index: u64,
    /// Records committed and applied here (the next record's sequence id).
    pub records: i64,
    /// The digest of every record applied here (equal on replicas in step).
    pub digest: u64,
    /// The instance version of the last checkpoint.
    pub version: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Its application.
    pub app: AppView,
    /// What it serves (`raft`, `peer`, `receive`, `send`).
    pub addresses: BTreeMap<String, String>,
}

/// A stable committer id for an instance: the same on every replica, since the
/// records an application sees carry it whichever replica sends them.
pub fn committer_id(name: &str) -> i32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    (h & 0x7fff_ffff) as i32
}

/// The state shared by the replica's loop and its admin handler.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) app: Arc<Mutex<AppView>>,
    pub(crate) addresses: Arc<BTreeMap<String, String>>,
    pub(crate) instance: String,
    /// Set when the leader said this replica was removed from the group.
    removed: Arc<std::sync::atomic::AtomicBool>,
    /// This replica's directory (where the removal is marked).
    dir: PathBuf,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut AppView)) {
        if let Ok(mut a) = self.app.lock() {
            f(&mut a);
        }
    }

    /// The leader removed this replica from the group (openraft does not tell a
    /// removed voter: the leader stops replicating to it). Marked on disk first, so a
    /// restart of this replica refuses to run instead of campaigning in a group that
    /// no longer has it.
    pub(crate) fn mark_removed(&self) -> std::io::Result<()> {
        let path = removed_marker(&self.dir);
        let f = std::fs::File::create(&path)?;
        f.sync_all()?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        self.removed.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The file that marks a replica removed from its group.
fn removed_marker(replica_dir: &std::path::Path) -> PathBuf {
    replica_dir.join("removed")
}

/// Whether the member these metrics describe leads (one view, read once).
fn leading(m: &drover_raft::openraft::RaftMetrics<u64, drover_raft::openraft::BasicNode>) -> bool {
    m.state == ServerState::Leader && m.current_leader == Some(m.id)
}

/// The replica's state machine handle and openraft.
type M = Member<InstanceLog>;

/// Runs a replica until `shutdown` resolves.
pub async fn run_replica(
    config: ReplicaConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_listening: impl FnOnce(Listening),
) -> Result<(), CoordinatorError> {
    let c = &config.coordinator;
    let dir = replica_dir(&c.log_dir, &c.instance, config.id);
    std::fs::create_dir_all(&dir)?;
    let _lock = drover_journal::DirLock::acquire(&dir)?;
    if removed_marker(&dir).exists() {
        return Err(CoordinatorError::Config(format!(
            "replica {} of {} was removed from the instance's group ({} exists): it does not run again; to add a replica with this id, delete {} and use add-replica",
            config.id,
            c.instance,
            removed_marker(&dir).display(),
            dir.display()
        )));
    }
    let registered = instance::load(&c.log_dir, &c.instance).ok().map(|m| m.version);
    let receive = TcpListener::bind(("127.0.0.1", c.receive_port)).await?;
    let send = if c.connect_send { None } else { Some(TcpListener::bind(("127.0.0.1", c.send_port)).await?) };
    let peer = TcpListener::bind(("127.0.0.1", c.peer_port)).await?;
    let peer_addr = peer.local_addr()?.to_string();
    instance::set_replica_addresses(&c.log_dir, &c.instance, config.id, &peer_addr, &config.raft_addr)?;
    let listening = Listening {
        receive_port: receive.local_addr()?.port(),
        send_port: send.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()),
        peer_port: peer.local_addr()?.port(),
    };
    let mut addresses = BTreeMap::new();
    addresses.insert("raft".to_owned(), config.raft_addr.clone());
    addresses.insert("peer".to_owned(), peer_addr.clone());
    addresses.insert("receive".to_owned(), listening.receive_port.to_string());
    if let Some(p) = listening.send_port {
        addresses.insert("send".to_owned(), p.to_string());
    }
    let shared = Shared {
        app: Arc::new(Mutex::new(AppView { phase: "none".into(), ..AppView::default() })),
        addresses: Arc::new(addresses),
        instance: c.instance.clone(),
        removed: Arc::default(),
        dir: dir.clone(),
    };
    let slot: crate::admin::Slot = Arc::default();
    let settings = Settings {
        id: config.id,
        dir: dir.clone(),
        listener: config.raft,
        peers: config.peers.clone(),
        creds: config.creds.clone(),
        about: shared.addresses.clone(),
        timing: config.timing,
        forward: Some(crate::admin::handler(slot.clone())),
    };
    let member = Member::start(settings, Arc::new(FsStorage), InstanceLog::default)
        .await
        .map_err(|e| CoordinatorError::Config(format!("replica {}: {e}", config.id)))?;
    // Every replica hands committed records to its application, leader or not.
    member.machine.keep_outputs(true);
    if let Ok(mut s) = slot.lock() {
        *s = Some(crate::admin::Ctx {
            raft: member.raft.clone(),
            machine: member.machine.clone(),
            leadership: member.leadership.clone(),
            creds: config.creds.clone(),
            shared: shared.clone(),
        });
    }
    on_listening(listening);
    tracing::info!(instance = %c.instance, replica = config.id, raft = %config.raft_addr, peer = %peer_addr,
        receive = listening.receive_port, "replica listening");
    let mut replica = Replica {
        coordinator: config.coordinator.clone(),
        id: config.id,
        member: &member,
        shared,
        version_file: registered,
        committer_id: committer_id(&c.instance),
        proposing: Arc::default(),
        was_member: Default::default(),
    };
    let result = replica.run(shutdown, &receive, send.as_ref(), &peer).await;
    if let Ok(mut s) = slot.lock() {
        *s = None;
    }
    member.shutdown().await;
    result
}

struct Replica<'a> {
    coordinator: CoordinatorConfig,
    id: u64,
    member: &'a M,
    shared: Shared,
    /// The version in this log directory's `instance.json` (None: not registered here).
    version_file: Option<u64>,
    committer_id: i32,
    /// Proposals of this replica not yet answered, whichever session made them: until
    /// they are, no session may start or become primary (a record an ended session
    /// proposed may still commit, and its calls must be counted as logged first).
    proposing: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether a membership with this replica in it was seen (see `removed`).
    was_member: std::sync::atomic::AtomicBool,
}

/// What a primary's session waits to see committed (what it proposed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Awaiting {
    Nothing,
    Record,
    Checkpoint,
    /// The first start's checkpoint with record 0 in the same entry: the `Append` the
    /// session answers the written checkpoint with is not proposed again.
    InitialBundled,
}

/// Where an application's session stands.
enum App {
    /// Connected; waiting for something to start from (no checkpoint yet and not
    /// the primary of an empty log).
    Waiting(Vec<Frame>),
    /// In session. `next_seq`: the next record it is to be sent.
    Live { session: Box<Session>, next_seq: i64, upgrade: bool, app_version: u64, awaiting: Awaiting },
}

impl Replica<'_> {
    fn c(&self) -> &CoordinatorConfig {
        &self.coordinator
    }

    /// Whether this replica leads and has applied its whole log (so every record an
    /// earlier primary committed has been handed out).
    fn leads_caught_up(&self) -> bool {
        let metrics = self.member.raft.metrics();
        let m = metrics.borrow();
        leading(&m)
            // An entry of this term is applied (the leader's first, blank one): so every
            // entry of an earlier term in its log is committed and applied too...
            && m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term)
            // ...and nothing it has is waiting to be applied.
            && m.last_applied.map(|l| l.index) == m.last_log_index
            && !self.member.leadership.handing_over()
            && self.proposing.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// Whether this replica was in the group and has been removed from it (it gets no
    /// records any more): the leader said so, or it applied a membership without it
    /// after one with it (a replica being added first applies the memberships from
    /// before it was added).
    fn removed(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if self.shared.removed.load(SeqCst) {
            return true;
        }
        let metrics = self.member.raft.metrics();
        let m = metrics.borrow();
        if m.membership_config.membership().get_node(&self.id).is_some() {
            self.was_member.store(true, SeqCst);
            return false;
        }
        m.membership_config.log_id().is_some() && self.was_member.load(SeqCst)
    }

    fn leads(&self) -> bool {
        leading(&self.member.raft.metrics().borrow())
    }

    /// Notes a committed version in this directory's `instance.json` (when registered
    /// here), so that the file says what the group says.
    fn note_version(&mut self, version: u64) {
        if self.version_file.is_some_and(|v| v < version)
            && let Ok(mut meta) = instance::load(&self.c().log_dir, &self.c().instance)
        {
            match instance::upgrade(&self.c().log_dir, &mut meta, version) {
                Ok(()) => self.version_file = Some(version),
                Err(e) => tracing::warn!(error = %e, "could not record the instance's new version"),
            }
        }
    }

    async fn run(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
        receive: &TcpListener,
        send: Option<&TcpListener>,
        peer: &TcpListener,
    ) -> Result<(), CoordinatorError> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut ports = AppPorts::new(receive, send);
        loop {
            let (input, from) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tick.tick() => {
                    if self.removed() {
                        tracing::warn!(instance = %self.c().instance, replica = self.id,
                            "this replica was removed from the instance's group: it stops");
                        return Ok(());
                    }
                    // No application: committed records are only counted.
                    for o in self.member.machine.take_outputs() {
                        if let Output::Checkpoint { version, .. } = o {
                            self.note_version(version);
                        }
                    }
                    continue;
                }
                a = peer.accept() => {
                    // Links go to the primary's application; there is none here.
                    drop(a);
                    continue;
                }
                a = ports.next_session() => match a {
                    Some(a) => a,
                    None => continue,
                },
            };
            let (input, output) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                c = session_connections(self.c(), ports.send(), input, from) => match c {
                    Some(c) => c,
                    None => continue,
                },
            };
            let end = tokio::select! {
                _ = &mut shutdown => None,
                end = self.serve(input, output, peer, &mut ports) => Some(end),
            };
            self.shared.set(|a| *a = AppView { phase: "none".into(), ..AppView::default() });
            match end {
                None => return Ok(()),
                Some(Ok(why)) => {
                    tracing::info!(instance = %self.c().instance, replica = self.id, %why, "application session ended")
                }
                Some(Err(e)) => return Err(e),
            }
        }
    }

    /// Starts the application's session if it can start: as the primary of an empty
    /// log (first start), else as a secondary from the last committed checkpoint
    /// (becoming primary at once when this replica leads).
    fn try_start(&mut self) -> Option<(App, Vec<Action>)> {
        let name = self.c().instance.clone();
        let (max, id) = (self.c().max_checkpoint, self.committer_id);
        let upgrade_to = self.c().upgrade_version;
        if self.proposing.load(std::sync::atomic::Ordering::SeqCst) > 0 || self.removed() {
            // An ended session's proposal may still commit: start after it is settled.
            // A replica removed from the group has nothing to hand out.
            return None;
        }
        let core = self.member.machine.core();
        if core.is_empty() {
            drop(core);
            if !self.leads_caught_up() {
                return None;
            }
            tracing::info!(instance = %name, replica = self.id, "first start (primary)");
            let (session, actions) = Session::first_start(id, &name, max);
            let app_version = upgrade_to.unwrap_or(self.version_file.unwrap_or(0));
            let live = App::Live {
                session: Box::new(session),
                next_seq: 0,
                upgrade: false,
                app_version,
                awaiting: Awaiting::Nothing,
            };
            return Some((live, actions));
        }
        let (stored, records) = core.start()?;
        let (next_seq, version) = (core.next_seq(), core.version());
        drop(core);
        let upgrade = upgrade_to.is_some_and(|v| v > version);
        let app_version = if upgrade { upgrade_to.unwrap_or(version) } else { version };
        match Session::secondary(id, &name, &stored, records, max) {
            Ok((session, actions)) => {
                tracing::info!(instance = %name, replica = self.id, next_seq, upgrade, "application started as a secondary");
                let live = App::Live {
                    session: Box::new(session),
                    next_seq,
                    upgrade,
                    app_version,
                    awaiting: Awaiting::Nothing,
                };
                Some((live, actions))
            }
            Err(e) => {
                tracing::error!(instance = %name, error = %e, "the committed checkpoint does not decode");
                None
            }
        }
    }

    /// Runs one application session to its end.
    async fn serve(
        &mut self,
        input: TcpStream,
        output: TcpStream,
        peer: &TcpListener,
        ports: &mut AppPorts<'_>,
    ) -> Result<String, CoordinatorError> {
        let mut out = BufWriter::with_capacity(256 * 1024, output);
        let limits = Limits { max_checkpoint: self.c().max_checkpoint, max_message: MAX_CALL, ..Limits::default() };
        let (tx, mut frames) = mpsc::channel(1024);
        let reader = tokio::spawn(read_frames(input, tx, limits));
        let (mut links, mut events) = Links::new(self.c(), self.committer_id);
        let instance = self.c().instance.clone();
        // What the proposals say: `Ok` once committed and applied (the loop takes the
        // outputs at once), `Err` when this replica no longer leads.
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<Result<(), String>>();
        let mut metrics = self.member.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut app = App::Waiting(Vec::new());
        self.shared.set(|a| a.phase = "waiting".into());
        let mut actions: Vec<Action> = Vec::new();
        let result = async {
            loop {
                if let App::Waiting(early) = &mut app {
                    let early = std::mem::take(early);
                    if let Some((mut started, first)) = self.try_start() {
                        actions.extend(first);
                        if let App::Live { session, .. } = &mut started {
                            for f in early {
                                actions.extend(session.on_frame(f));
                            }
                        }
                        app = started;
                    } else {
                        app = App::Waiting(early);
                    }
                }
                // Committed records and checkpoints, then the role.
                actions.extend(self.committed(&mut app));
                if self.removed() {
                    return Ok("this replica was removed from the instance's group: it receives no records".into());
                }
                if let App::Live { session, upgrade, .. } = &mut app {
                    if session.is_secondary() && self.leads_caught_up() {
                        tracing::info!(instance = %self.c().instance, replica = self.id, upgrade = *upgrade,
                            "this replica leads: its application becomes primary");
                        actions.extend(session.become_primary(*upgrade));
                        links.open_pending(session);
                    } else if !session.is_secondary() && !self.leads() {
                        return Ok(format!(
                            "this replica is no longer primary (replica {:?} leads): the application must restart, and comes back as a secondary",
                            self.member.raft.metrics().borrow().current_leader
                        ));
                    }
                }
                // Carry out what the session asked for.
                for a in std::mem::take(&mut actions) {
                    match a {
                        Action::Send(bytes) => {
                            if let Err(e) = out.write_all(&bytes).await {
                                return Ok(format!("writing to the application: {e}"));
                            }
                        }
                        Action::Append(entry) => {
                            if let App::Live { awaiting, .. } = &mut app {
                                *awaiting = Awaiting::Record;
                            }
                            self.propose(vec![vec![Input::Record(entry)]], &answers_tx);
                        }
                        Action::WriteCheckpoint(state) => {
                            let (version, initial) = match &mut app {
                                App::Live { app_version, awaiting, session, .. } => {
                                    let initial = session.initial_to_log();
                                    *awaiting = if initial.is_some() { Awaiting::InitialBundled } else { Awaiting::Checkpoint };
                                    (*app_version, initial)
                                }
                                App::Waiting(_) => (0, None),
                            };
                            // One entry per part; the last part and, at a first start, the
                            // InitialMessage (record 0) in one entry: committed together, so
                            // no primary can ever start from that checkpoint without record 0.
                            let mut entries: Vec<Vec<Input>> =
                                InstanceLog::checkpoint_inputs(&state, version).into_iter().map(|i| vec![i]).collect();
                            if let (Some(initial), Some(last)) = (initial, entries.last_mut()) {
                                last.push(Input::Record(initial));
                            }
                            self.propose(entries, &answers_tx);
                        }
                        Action::Upgraded => {
                            tracing::info!(instance = %self.c().instance, replica = self.id, "upgraded: the upgrade checkpoint is committed");
                        }
                        Action::Close(why) => {
                            tracing::error!(instance = %self.c().instance, reason = %why, "application misbehaved; ending its session");
                            return Ok(why);
                        }
                        link => {
                            links.act(link);
                        }
                    }
                }
                if let Err(e) = out.flush().await {
                    return Ok(format!("writing to the application: {e}"));
                }
                self.publish(&app);
                let reading = match &app {
                    App::Live { session, .. } => !session.backpressure(),
                    App::Waiting(_) => true,
                };
                let primary = matches!(&app, App::Live { session, .. } if !session.is_secondary());
                tokio::select! {
                    f = frames.recv(), if reading => match (f, &mut app) {
                        (Some(Ok(frame)), App::Live { session, .. }) => actions = session.on_frame(frame),
                        (Some(Ok(frame)), App::Waiting(early)) => {
                            // An application speaks after it is spoken to: a few frames
                            // may race the start, a stream of them is a misbehaving one.
                            if early.len() >= MAX_EARLY_FRAMES {
                                return Ok(format!("the application sent {MAX_EARLY_FRAMES} messages before its session could start"));
                            }
                            early.push(frame);
                        }
                        (Some(Err(why)), _) => return Ok(why),
                        (None, _) => return Ok("the application's connection ended".into()),
                    },
                    changed = metrics.changed() => {
                        if changed.is_err() {
                            return Ok("the replica's consensus stopped".into());
                        }
                    }
                    _ = tick.tick() => {}
                    proposed = answers.recv() => if let Some(Err(why)) = proposed {
                        return Ok(format!("a proposal was not committed: {why}"));
                    },
                    accepted = peer.accept() => match accepted {
                        Ok((s, from)) if primary => links.accept(s, from),
                        // Only the primary takes links; the sender tries the next replica.
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "peer accept failed; pausing 100 ms");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    never = ports.refuse_second_applications(&instance) => match never {},
                    ev = events.recv() => if let App::Live { session, .. } = &mut app {
                        actions = links.on_event(&self.c().instance, session, ev);
                    },
                }
            }
        }
        .await;
        reader.abort();
        result
    }

    /// Hands what was committed since the last call to the session.
    fn committed(&mut self, app: &mut App) -> Vec<Action> {
        let mut actions = Vec::new();
        let every = self.c().checkpoint_every_bytes.min(REPLICA_CHECKPOINT_EVERY);
        for o in self.member.machine.take_outputs() {
            let App::Live { session, next_seq, app_version, awaiting, .. } = app else {
                if let Output::Checkpoint { version, .. } = o {
                    self.note_version(version);
                }
                continue;
            };
            match o {
                Output::Record { seq, payload } => {
                    if seq < *next_seq {
                        continue;
                    }
                    if seq > *next_seq {
                        actions.push(Action::Close(format!(
                            "records {} to {} were not handed to the application (this replica caught up by a snapshot): it must restart",
                            *next_seq,
                            seq - 1
                        )));
                        break;
                    }
                    *next_seq += 1;
                    if session.is_secondary() {
                        actions.extend(session.on_committed(seq, &payload));
                    } else if *awaiting != Awaiting::Record {
                        // Cannot happen while sessions start only with no proposal in
                        // flight; should it, the calls in it would be logged twice.
                        actions.push(Action::Close(format!(
                            "record {seq} was committed but this primary's session did not propose it"
                        )));
                        break;
                    } else {
                        *awaiting = Awaiting::Nothing;
                        actions.extend(session.on_durable(seq, &payload));
                        if self.member.machine.with_core(|c| c.bytes_since_checkpoint()) >= every {
                            actions.extend(session.request_checkpoint());
                        }
                    }
                }
                Output::Checkpoint { version, stored, .. } => {
                    self.note_version(version);
                    if session.is_secondary() {
                        session.on_checkpoint_committed(&stored);
                        if version > *app_version {
                            actions.push(Action::Close(format!(
                                "the instance moved to version {version}; this replica's application is version {app_version}: restart it at the new version"
                            )));
                            break;
                        }
                    } else if !matches!(*awaiting, Awaiting::Checkpoint | Awaiting::InitialBundled) {
                        actions.push(Action::Close(
                            "a checkpoint was committed but this primary's session did not propose it".into(),
                        ));
                        break;
                    } else {
                        // With record 0 bundled, the Append the session answers with is
                        // already committed with the checkpoint (its output comes next).
                        if *awaiting == Awaiting::Checkpoint {
                            *awaiting = Awaiting::Nothing;
                        }
                        let written = session.on_checkpoint_written();
                        let bundled = *awaiting == Awaiting::InitialBundled;
                        for a in written {
                            match a {
                                Action::Append(_) if bundled => *awaiting = Awaiting::Record,
                                other => actions.push(other),
                            }
                        }
                    }
                }
            }
        }
        actions
    }

    /// Proposes `entries` in order, each a Raft entry of one or more inputs applied
    /// together (the session has at most one record or checkpoint in flight); a failure
    /// (this replica no longer leads) and the end of the batch are reported on `answers`.
    fn propose(&self, entries: Vec<Vec<Input>>, answers: &mpsc::UnboundedSender<Result<(), String>>) {
        let raft = self.member.raft.clone();
        let leadership = self.member.leadership.clone();
        let answers = answers.clone();
        let proposing = self.proposing.clone();
        proposing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            // Counted down however the task ends (answered, failed, or the runtime stopping).
            struct Done(Arc<std::sync::atomic::AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(proposing);
            for inputs in entries {
                // A handover waits for the target to hold the whole log: no proposal meanwhile.
                while leadership.handing_over() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let mut data = Vec::new();
                for input in &inputs {
                    match drover_journal::machine::encode_input::<InstanceLog>(input) {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(e) => {
                            let _ = answers.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                if let Err(e) = raft.client_write(drover_raft::Inputs(data)).await {
                    let _ = answers.send(Err(e.to_string()));
                    return;
                }
            }
            let _ = answers.send(Ok(()));
        });
    }

    /// Publishes the application's state for `status`.
    fn publish(&self, app: &App) {
        let (phase, next, dropped) = match app {
            App::Waiting(_) => ("waiting", 0, 0),
            App::Live { session, next_seq, .. } => {
                let phase = if session.is_secondary() {
                    "secondary"
                } else if session.is_live() {
                    "primary"
                } else {
                    "becoming-primary"
                };
                (phase, *next_seq, session.dropped())
            }
        };
        self.shared.set(|a| {
            a.phase = phase.into();
            a.next_seq = next;
            a.dropped = dropped;
        });
    }
}
