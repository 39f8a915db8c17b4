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
use std::time::Duration;

use drover_journal::{Journal, StateMachine, Storage};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::net::TcpListener;

use crate::log_store::{RaftLog, journal_config};
use crate::machine::RaftMachine;
use crate::network::{Network, serve};
use crate::secret::ClusterSecret;
use crate::status::Addresses;
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
}

impl Default for Timing {
    /// 150 ms heartbeats, elections after 750 to 1500 ms of silence (five to ten
    /// missed heartbeats: a loaded 2-core machine does not start needless elections),
    /// a snapshot every 50,000 entries.
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(150),
            election: (Duration::from_millis(750), Duration::from_millis(1500)),
            snapshot_every: 50_000,
        }
    }
}

impl Timing {
    /// openraft's configuration for this timing.
    pub fn config(&self) -> Result<Config, MemberError> {
        let c = Config {
            cluster_name: "drover".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election.0.as_millis() as u64,
            election_timeout_max: self.election.1.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            // Entries behind the snapshot are kept a while, so a follower briefly away
            // catches up from the log rather than by a whole snapshot.
            max_in_snapshot_log_to_keep: 10_000,
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
    /// The cluster secret every member holds.
    pub secret: ClusterSecret,
    /// The addresses this member serves (answered to status requests).
    pub about: Addresses,
    /// Heartbeats, elections, snapshots.
    pub timing: Timing,
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
    server: tokio::task::JoinHandle<()>,
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
        let config = Arc::new(settings.timing.config()?);
        let log = RaftLog::open(journal_config(&settings.dir), storage.clone())?;
        let journal = log.journal();
        let machine = RaftMachine::open(&settings.dir, storage, fresh)?;
        let network = Network::new(settings.secret.clone());
        let raft = Raft::new(settings.id, config, network, log, machine.clone())
            .await
            .map_err(|e| MemberError::Raft(e.to_string()))?;
        let server = tokio::spawn(serve(settings.listener, raft.clone(), settings.secret, settings.about));
        let founder = settings.peers.contains_key(&settings.id);
        let initialized = raft.is_initialized().await.map_err(|e| MemberError::Raft(e.to_string()))?;
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
        Ok(Member { raft, machine, journal, server })
    }

    /// Stops openraft and the Raft port (the log is closed when openraft drops it).
    pub async fn shutdown(self) {
        self.server.abort();
        if tokio::time::timeout(Duration::from_secs(10), self.raft.shutdown()).await.is_err() {
            tracing::warn!("raft did not shut down within 10 s");
        }
    }
}
