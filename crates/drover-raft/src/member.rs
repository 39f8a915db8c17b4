//! One member of a replicated group, started the way every drover replica starts.
//!
//! A member is a Raft log over the journal in its directory, a [`RaftMachine`] over a
//! drover core, openraft between them, and the Raft port serving its peers. The
//! group forms itself: a member whose own id is in the initial member list (`--peers`)
//! and whose log is empty initialises the group with that list. Every member started
//! with the same list does the same, which openraft allows (the same configuration
//! proposed twice is one configuration); a member with a log (a restart) is never
//! initialised again, so a restart with the same flags is a restart, never a second
//! group. A member started without itself in the list waits to be added
//! (`drover cluster add`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_journal::{Journal, StateMachine, Storage};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::inbound::Inbound;
use crate::log_store::{RaftLog, journal_config};
use crate::machine::RaftMachine;
use crate::network::{Network, serve};
use crate::stats::RaftStats;
use crate::status::Addresses;
use crate::tls::Credentials;
use crate::types::TypeConfig;

/// Most entries openraft sends in one AppendEntries request.
pub const MAX_PAYLOAD_ENTRIES: u64 = 8;

/// The timing of a group: how often the leader speaks, how long followers wait.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The leader's heartbeat interval.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time in this range campaigns.
    pub election: (Duration, Duration),
    /// A snapshot is taken after this many entries since the last.
    pub snapshot_every: u64,
    /// Or after this many bytes of log since the last (the unpurged log is also held
    /// in memory, and a busy controller's entries are batches of tens of kilobytes).
    pub snapshot_every_bytes: u64,
}

/// The default of [`Timing::snapshot_every_bytes`].
pub const DEFAULT_SNAPSHOT_EVERY_BYTES: u64 = 256 << 20;

/// The default election timeout (see [`Timing::from_election_timeout`]).
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(200);

impl Default for Timing {
    /// [`Timing::from_election_timeout`] of [`DEFAULT_ELECTION_TIMEOUT`].
    fn default() -> Self {
        Timing::from_election_timeout(DEFAULT_ELECTION_TIMEOUT)
    }
}

impl Timing {
    /// The timing for election timeout `t`: followers campaign after `t` to `2t` of
    /// silence, the leader sends heartbeats every `t/4`, a snapshot every 50,000
    /// entries.
    ///
    /// openraft's followers also honour the silent leader's lease (the longest
    /// timeout, `2t`) before they vote for anyone, so a leader lost at once is
    /// replaced after `3t` to `4t` plus one tick (`1.5` heartbeats) and a vote round:
    /// 0.6 to 0.9 s with the default `t` of 200 ms. Needless elections need `3t` of
    /// silence: twelve heartbeats missed in a row.
    pub fn from_election_timeout(t: Duration) -> Timing {
        let t = t.max(Duration::from_millis(20));
        Timing {
            heartbeat: t / 4,
            election: (t, t * 2),
            snapshot_every: 50_000,
            snapshot_every_bytes: DEFAULT_SNAPSHOT_EVERY_BYTES,
        }
    }

    /// How long a member restarting into a running group waits for the leader to
    /// reach it before it may campaign: three longest timeouts (the lease twice, then a
    /// timeout), at least 1.5 s (the leader retries an unreachable member every 500 ms).
    pub fn restart_grace(&self) -> Duration {
        (self.election.1 * 3).max(Duration::from_millis(1500))
    }

    /// openraft's configuration for `member` under this timing (every member draws its
    /// election timeout from the whole range).
    ///
    /// Tried and measured worse: giving each member its own quarter of the range by id,
    /// so that two followers never campaign at once. The lowest quarter then always
    /// campaigns first, and when it is the one behind (the other follower holds the
    /// last entries), openraft rejects it, backs it off and it campaigns again in ever
    /// higher terms, holding the up-to-date member off: up to 8 terms per election
    /// and a p90 of 1.9 s over 50 kills (BENCHMARKS.md).
    pub fn config(&self, _member: u64) -> Result<Config, MemberError> {
        let c = Config {
            cluster_name: "drover".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election.0.as_millis() as u64,
            election_timeout_max: self.election.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            // Entries behind the snapshot are kept a while (a fifth of the interval, at
            // most 2,000: under load an entry is a batch of tens of kilobytes, held in
            // memory too), so a follower briefly away catches up from the log rather
            // than by a whole snapshot.
            max_in_snapshot_log_to_keep: (self.snapshot_every / 5).min(2_000),
            // At most 8 entries per AppendEntries: a controller's entry is one batch
            // (about 1 MiB, at most a few), so a request stays far below the Raft
            // port's 64 MiB frame limit.
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Config::default()
        };
        c.validate().map_err(|e| MemberError::Config(e.to_string()))
    }
}

/// How a member is started.
pub struct Settings {
    /// Its member id (never reused for another machine).
    pub id: u64,
    /// Its directory: the Raft log's journal and the snapshot live here.
    pub dir: PathBuf,
    /// The Raft port, already bound.
    pub listener: TcpListener,
    /// The initial members, this one included, by id: their Raft addresses.
    pub peers: BTreeMap<u64, String>,
    /// The cluster secret every member holds, and mutual TLS when it is on.
    pub creds: Credentials,
    /// The addresses this member serves (answered to status requests).
    pub about: Addresses,
    /// Heartbeats, elections, snapshots.
    pub timing: Timing,
    /// The application's answer to requests its peers forward to it
    /// ([`crate::network::Forwarder`]); `None`: they are refused.
    pub forward: Option<crate::network::ForwardHandler>,
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The timing is not a valid openraft configuration.
    #[error("raft configuration: {0}")]
    Config(String),
    /// The Raft log could not be opened.
    #[error(transparent)]
    Log(#[from] crate::log_store::OpenError),
    /// The snapshot could not be read.
    #[error(transparent)]
    Snapshot(#[from] crate::machine::SnapshotError),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// A running member.
pub struct Member<M: StateMachine> {
    /// openraft's handle.
    pub raft: Raft<TypeConfig>,
    /// The state machine (the shell reads the core and takes outputs here).
    pub machine: RaftMachine<M>,
    /// The journal under the Raft log (for its counters).
    pub journal: Arc<Journal>,
    /// Elections, leader changes, commit latency, snapshots.
    pub stats: Arc<RaftStats>,
    /// Leadership transfer (shared with the shell's endpoints).
    pub leadership: Leadership,
    server: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    sizer: tokio::task::JoinHandle<()>,
}

impl<M: StateMachine + Send + Sync + 'static> Member<M>
where
    M::Output: Send + Sync,
{
    /// Opens the member's log and snapshot in `settings.dir`, starts openraft and the
    /// Raft port, and initialises the group when this member founds it (see the module
    /// documentation). `fresh` makes the core of a member with no snapshot.
    pub async fn start(
        settings: Settings,
        storage: Arc<dyn Storage>,
        fresh: impl FnOnce() -> M,
    ) -> Result<Member<M>, MemberError> {
        let config = Arc::new(settings.timing.config(settings.id)?);
        let log = RaftLog::open(journal_config(&settings.dir), storage.clone())?;
        let journal = log.journal();
        let machine = RaftMachine::open(&settings.dir, storage, fresh)?;
        let stats = machine.stats();
        let network = Network::new(settings.creds.clone(), stats.clone());
        let raft = Raft::new(settings.id, config, network, log, machine.clone())
            .await
            .map_err(|e| MemberError::Raft(e.to_string()))?;
        let inbound = Inbound::new(raft.clone(), &settings.timing, stats.clone());
        let founder = settings.peers.contains_key(&settings.id);
        let initialized = raft.is_initialized().await.map_err(|e| MemberError::Raft(e.to_string()))?;
        inbound.hold_if_restarting(&settings.timing).await;
        let server =
            tokio::spawn(serve(settings.listener, inbound, settings.creds.clone(), settings.about, settings.forward));
        if founder && !initialized {
            let members: BTreeMap<u64, BasicNode> =
                settings.peers.iter().map(|(id, addr)| (*id, BasicNode::new(addr))).collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(member = settings.id, peers = ?settings.peers, "group initialised"),
                // Another founder got there first: the same group.
                Err(e) => tracing::debug!(error = %e, "group already initialised"),
            }
        } else if !founder && !initialized {
            tracing::info!(member = settings.id, "waiting to be added to a group (drover cluster add)");
        }
        let leadership = Leadership {
            raft: raft.clone(),
            creds: settings.creds.clone(),
            timing: settings.timing,
            handing_over: Arc::new(AtomicBool::new(false)),
        };
        let watcher = tokio::spawn(watch_leadership(raft.clone(), stats.clone(), leadership.handing_over.clone()));
        let sizer = tokio::spawn(snapshot_by_bytes(
            raft.clone(),
            journal.clone(),
            stats.clone(),
            settings.timing.snapshot_every_bytes,
        ));
        Ok(Member { raft, machine, journal, stats, leadership, server, watcher, sizer })
    }

    /// Stops openraft and the Raft port (the log is closed when openraft drops it).
    pub async fn shutdown(self) {
        self.server.abort();
        self.watcher.abort();
        self.sizer.abort();
        if tokio::time::timeout(Duration::from_secs(10), self.raft.shutdown()).await.is_err() {
            tracing::warn!("raft did not shut down within 10 s");
        }
    }
}

/// Hands leadership to another member, on the leader.
///
/// openraft 0.9 has no leadership transfer, so drover makes one from openraft's own
/// parts, electing nothing itself: the leader stops proposing ([`Leadership::handing_over`]
/// tells the shell) and stops its heartbeats, waits until the chosen member holds
/// every entry of its log, waits out its lease on the followers (the longest election
/// timeout, during which they refuse to vote for anyone), then asks the chosen member
/// to campaign at once (openraft's `trigger().elect()` there). The chosen member's log
/// is complete and its campaign starts before any other follower's timer can fire
/// (each waits the lease plus at least the shortest timeout), so it wins; should it
/// not, openraft elects someone else the usual way and nothing is lost either way.
/// Proposals pause for about one lease (2 election timeouts) plus the election.
#[derive(Clone)]
pub struct Leadership {
    raft: Raft<TypeConfig>,
    creds: Credentials,
    timing: Timing,
    handing_over: Arc<AtomicBool>,
}

/// Why leadership was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// This member does not lead (the caller should ask the leader).
    #[error("this member does not lead{}", .0.map(|l| format!(" (member {l} does)")).unwrap_or_default())]
    NotLeader(Option<u64>),
    /// The target is not a voting member (or is this one).
    #[error("member {0} is not another voting member of the group")]
    NotAVoter(u64),
    /// The target did not catch up with the leader's log in time.
    #[error("member {0} did not catch up with the leader's log within {1:?}")]
    Behind(u64, Duration),
    /// The target could not be reached to campaign.
    #[error("member {0} could not be asked to campaign: {1}")]
    Unreachable(u64, String),
    /// The target campaigned but another outcome came first.
    #[error("member {to} campaigned, but {outcome}")]
    Lost {
        /// The target.
        to: u64,
        /// What happened instead.
        outcome: String,
    },
}

impl Leadership {
    /// The followers' lease on a leader (the longest election timeout): a leader no
    /// majority acknowledged for longer may have been replaced.
    pub fn lease(&self) -> Duration {
        self.timing.election.1
    }

    /// Whether a handover is under way (the shell proposes nothing meanwhile).
    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::SeqCst)
    }

    /// Hands leadership to member `to` (see the type's documentation); returns once
    /// `to` leads.
    pub async fn transfer(&self, to: u64) -> Result<(), TransferError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(m.id) || m.state != openraft::ServerState::Leader {
            return Err(TransferError::NotLeader(m.current_leader));
        }
        let membership = m.membership_config.membership().clone();
        if to == m.id || !membership.voter_ids().any(|v| v == to) {
            return Err(TransferError::NotAVoter(to));
        }
        let addr = membership.get_node(&to).map(|n| n.addr.clone()).ok_or(TransferError::NotAVoter(to))?;
        if self.handing_over.swap(true, Ordering::SeqCst) {
            return Err(TransferError::Lost { to, outcome: "another handover is under way".into() });
        }
        self.raft.runtime_config().heartbeat(false);
        tracing::info!(to, "handing leadership over: proposals paused, heartbeats stopped");
        let result = self.hand_over(to, &addr).await;
        self.raft.runtime_config().heartbeat(true);
        self.handing_over.store(false, Ordering::SeqCst);
        match &result {
            Ok(()) => tracing::info!(to, "leadership handed over"),
            Err(e) => tracing::warn!(to, error = %e, "leadership handover failed; proposals resume"),
        }
        result
    }

    async fn hand_over(&self, to: u64, addr: &str) -> Result<(), TransferError> {
        // 1. The target holds every entry (proposals are paused, so the end is fixed
        //    once the in-flight ones are appended).
        let catch_up = Duration::from_secs(5);
        let mut metrics = self.raft.metrics();
        let caught_up = tokio::time::timeout(catch_up, async {
            loop {
                let m = metrics.borrow_and_update().clone();
                if m.current_leader != Some(m.id) {
                    return Err(TransferError::NotLeader(m.current_leader));
                }
                let last = m.last_log_index;
                let matched = m.replication.as_ref().and_then(|r| r.get(&to).cloned()).flatten().map(|l| l.index);
                if last.is_some() && matched == last {
                    return Ok(());
                }
                if metrics.changed().await.is_err() {
                    return Err(TransferError::NotLeader(None));
                }
            }
        })
        .await;
        match caught_up {
            Err(_) => return Err(TransferError::Behind(to, catch_up)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => {}
        }
        // 2. The followers' lease on this leader runs out (nothing has been sent to
        //    them since the last entry was acknowledged, heartbeats being off): the
        //    longest member's lease is the top of the range.
        tokio::time::sleep(self.timing.election.1 + self.timing.heartbeat).await;
        // 3. The target campaigns; its log is complete, so it can win.
        crate::network::ask_to_elect(addr, &self.creds, Duration::from_secs(2))
            .await
            .map_err(|e| TransferError::Unreachable(to, e.to_string()))?;
        let won = tokio::time::timeout(self.timing.election.1 * 4, async {
            loop {
                let leader = metrics.borrow_and_update().current_leader;
                if leader.is_some_and(|l| l != self.raft.metrics().borrow().id) {
                    return leader;
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match won {
            Ok(Some(l)) if l == to => Ok(()),
            Ok(Some(l)) => Err(TransferError::Lost { to, outcome: format!("member {l} was elected") }),
            _ => Err(TransferError::Lost { to, outcome: "no new leader was seen in time".into() }),
        }
    }
}

/// Asks openraft for a snapshot whenever `every` bytes of log were written since the
/// last snapshot this member built or installed (openraft's own policy counts entries
/// only). Checked four times a second.
async fn snapshot_by_bytes(raft: Raft<TypeConfig>, journal: Arc<Journal>, stats: Arc<RaftStats>, every: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let snapshots = || stats.snapshots_built.load(Relaxed) + stats.snapshots_installed.load(Relaxed);
    let (mut seen, mut since) = (snapshots(), journal.stats().bytes);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let (now, bytes) = (snapshots(), journal.stats().bytes);
        if now != seen {
            (seen, since) = (now, bytes);
        } else if bytes.saturating_sub(since) >= every {
            tracing::debug!(bytes = bytes - since, "log grew past --snapshot-every-bytes: snapshot");
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            since = bytes;
        }
    }
}

/// Logs every leadership change this member sees, with the reason as far as this
/// member can tell, and counts elections (new terms) and leader changes.
async fn watch_leadership(raft: Raft<TypeConfig>, stats: Arc<RaftStats>, handing_over: Arc<AtomicBool>) {
    let mut metrics = raft.metrics();
    let (mut term, mut leader, mut first) = (None::<u64>, None::<u64>, true);
    loop {
        let m = metrics.borrow_and_update().clone();
        if term.is_some_and(|t| m.current_term > t) {
            stats.elections.fetch_add(m.current_term - term.unwrap_or(0), Ordering::Relaxed);
        }
        term = Some(m.current_term);
        if m.current_leader != leader {
            let me = m.id;
            let reason = match (leader, m.current_leader) {
                (_, Some(new)) if handing_over.load(Ordering::SeqCst) => {
                    format!("this member handed leadership to member {new}")
                }
                (None, Some(_)) if first => "the first leader this member has seen since it started".to_owned(),
                (Some(old), None) if old == me => "this member stopped leading: a member campaigned".to_owned(),
                (Some(old), None) => format!("member {old} is no longer followed: an election is under way"),
                (Some(old), Some(new)) if old == me => {
                    format!("member {new} won a newer term: this member's heartbeats were not heard in time")
                }
                (Some(old), Some(new)) if new == me => {
                    format!("this member won the election: member {old} was not heard within the election timeout")
                }
                (Some(old), Some(new)) => format!("member {new} won the election after member {old}"),
                (None, Some(new)) => format!("member {new} won the election"),
                (None, None) => String::new(),
            };
            if let Some(new) = m.current_leader {
                stats.leader_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(leader = new, term = m.current_term, previous = ?leader, reason, "leader changed");
            } else {
                tracing::info!(term = m.current_term, previous = ?leader, reason, "leader lost");
            }
            leader = m.current_leader;
            first = false;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
