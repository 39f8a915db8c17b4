//! What a member does with the requests other members send it: it hands them to
//! openraft, and after refusing a vote because the candidate's log is behind its own,
//! it campaigns at once, in a term above the candidate's.
//!
//! Why: openraft 0.9 draws each member's election timeout once, at start, and a
//! member that refuses a candidate for its short log does not take up the
//! candidate's term. When the leader dies and the follower that is behind campaigns
//! first (under load the other one often holds the last entries), the up-to-date
//! follower later campaigns in that same term, is refused by the first (it voted for
//! itself), and wins only one more timeout later, in the next term: a two-term
//! election, 1.2 to 1.5 s with the default timing instead of 0.6 to 0.9 s (the
//! measured p99 of BENCHMARKS.md before this).
//!
//! And a member busy with an append from the leader does not campaign. openraft
//! restarts a follower's election timer when an append arrives, but answers it only
//! once the entries are on disk, and the leader sends nothing else to that member
//! meanwhile, heartbeats included: a follower whose disk (or CPU) stalls for longer
//! than the lease plus its timeout campaigns against a leader it is hearing, and
//! deposes it (measured: appends of 1.7 to 2.3 s on a member catching up under load,
//! each followed by a needless election). So elections are off on a member while an
//! append is in progress, and back on after the last one ends: at once after a quick
//! one, a lease after a slow one unless the leader spoke again meanwhile (as if
//! openraft's timer had restarted when the member answered). If the leader dies
//! meanwhile, the member campaigns up to a lease later than it would have.
//!
//! A member restarting into a running group holds its elections the same way until
//! the leader reaches it, for at most [`Inbound::hold_elections`]'s grace: openraft
//! 0.9 has no pre-vote, so a member that campaigns before the leader has reconnected
//! to it raises the term and deposes a healthy leader (seen in the kill benchmark: a
//! member restarted 1.8 s earlier campaigned and cost the group a leader change).
//!
//! A split vote (both survivors campaigned in the same term, each voting for itself)
//! is settled the same way: the candidate whose log, then id, is greater campaigns
//! again at once, in the next term, and the other grants it; openraft alone would
//! have both wait out another timeout.
//!
//! The refuser knows the leader is gone: it has itself heard no leader for a lease
//! (tracked here from the append and snapshot requests it receives), so it would
//! campaign within one more timeout anyway; and it has not voted in the candidate's
//! term. Campaigning at once, in the term after the candidate's, wins in one round
//! trip, since its log is at least as long as every refused candidate's. The election
//! is openraft's own (`trigger().elect()`, as many times as it takes to pass the
//! candidate's term); this only decides when.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{Raft, ServerState};
use tokio::time::Instant;

use crate::member::Timing;
use crate::stats::RaftStats;
use crate::types::TypeConfig;

/// The most terms a refuser climbs at once to pass a candidate's; a candidate further
/// ahead is left to openraft's own timers.
const MOST_TERMS_CLIMBED: u64 = 4;

/// A member's receiving side: every request another member sends it goes through here.
#[derive(Clone)]
pub struct Inbound {
    raft: Raft<TypeConfig>,
    /// The followers' lease: how long a member that heard a leader refuses to vote.
    lease: Duration,
    /// The leader's heartbeat interval.
    heartbeat: Duration,
    clock: Arc<Mutex<Clock>>,
    stats: Arc<RaftStats>,
}

#[derive(Default)]
struct Clock {
    /// When a leader last sent an append or a snapshot here.
    heard_leader: Option<Instant>,
    /// When this member last campaigned after a refusal.
    campaigned: Option<Instant>,
    /// Appends and snapshot chunks being handled now (elections are off meanwhile).
    appending: usize,
    /// Counts those begun, so a delayed re-enabling can tell a newer one came.
    begun: u64,
    /// Elections are held until a leader is heard (a restarting member).
    holding: bool,
}

/// Whether member `me`, after answering `req` with `resp`, having heard no leader for a
/// lease, should campaign at once, and if so how many times it elects to pass the
/// candidate's term:
///
/// - it refused the candidate for its shorter log and has not voted in the
///   candidate's term: it elects until its term is above the candidate's;
/// - a split vote (both campaigned in the same term, each voted for itself): the one
///   whose (log, id) is greater campaigns again at once, in the next term, and the
///   other grants it; without this both wait out another timeout.
pub fn terms_to_overtake(me: u64, req: &VoteRequest<u64>, resp: &VoteResponse<u64>) -> Option<u64> {
    if resp.vote_granted {
        return None;
    }
    let (mine, theirs) = (resp.vote.leader_id().term, req.vote.leader_id().term);
    let split = mine == theirs && resp.vote.leader_id().node_id == me && !resp.vote.is_committed();
    if split {
        let ahead = (resp.last_log_id, me) > (req.last_log_id, req.vote.leader_id().node_id);
        return ahead.then_some(1);
    }
    // A member that took up the candidate's term (or a later one) for another has
    // voted there: campaigning over it would only split that term's vote.
    let refused_for_its_log = resp.last_log_id > req.last_log_id;
    let climb = theirs.checked_sub(mine)?.checked_add(1)?;
    (refused_for_its_log && mine < theirs && climb <= MOST_TERMS_CLIMBED).then_some(climb)
}

impl Inbound {
    /// The receiving side of `raft`, whose group runs under `timing`; campaigns after
    /// a refusal are counted in `stats`.
    pub fn new(raft: Raft<TypeConfig>, timing: &Timing, stats: Arc<RaftStats>) -> Inbound {
        Inbound { raft, lease: timing.election.1, heartbeat: timing.heartbeat, clock: Arc::default(), stats }
    }

    /// Holds this member's elections ([`Inbound::hold_elections`], for
    /// [`Timing::restart_grace`]) when it restarts into a group of several voters.
    pub async fn hold_if_restarting(&self, timing: &Timing) {
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        let voters = self.raft.metrics().borrow().membership_config.membership().voter_ids().count();
        if initialized && voters > 1 {
            self.hold_elections(timing.restart_grace());
        }
    }

    /// Holds this member's elections until a leader's first append arrives, or `grace`
    /// passes (for a member restarting into a running group; see the module
    /// documentation).
    pub fn hold_elections(&self, grace: Duration) {
        self.clock().holding = true;
        self.raft.runtime_config().elect(false);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let mut clock = me.clock();
            if clock.holding {
                clock.holding = false;
                if clock.appending == 0 {
                    tracing::info!(
                        grace_ms = grace.as_millis() as u64,
                        "no leader reached this member since it started: it may campaign"
                    );
                    me.raft.runtime_config().elect(true);
                }
            }
        });
    }

    /// The member's openraft.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An append (or heartbeat) from a leader.
    pub async fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RaftError<u64>> {
        let what = format!("an append of {} entries", req.entries.len());
        self.heeding_leader(what, self.raft.append_entries(req)).await
    }

    /// A snapshot chunk from a leader.
    pub async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        self.heeding_leader("a snapshot chunk".to_owned(), self.raft.install_snapshot(req)).await
    }

    /// Handles `work`, a request from the leader, with this member's elections off
    /// (see the module documentation) until it is answered or dropped.
    async fn heeding_leader<T>(&self, what: String, work: impl std::future::Future<Output = T>) -> T {
        let _heeding = Heeding::begin(self, what);
        work.await
    }

    /// A candidate's vote request; see the module documentation for what follows a
    /// refusal.
    pub async fn vote(&self, req: VoteRequest<u64>) -> Result<VoteResponse<u64>, RaftError<u64>> {
        let resp = self.raft.vote(req.clone()).await?;
        let me = self.raft.metrics().borrow().id;
        if let Some(climb) = terms_to_overtake(me, &req, &resp) {
            self.overtake(&req, climb).await;
        }
        Ok(resp)
    }

    async fn overtake(&self, req: &VoteRequest<u64>, climb: u64) {
        let state = self.raft.metrics().borrow().state;
        if !matches!(state, ServerState::Follower | ServerState::Candidate) {
            return;
        }
        {
            let now = Instant::now();
            let mut clock = self.clock();
            let recent = |t: Option<Instant>| t.is_some_and(|t| now.duration_since(t) < self.lease);
            // A leader heard within the lease: openraft refused by lease, not by log.
            // A campaign of ours within the lease: it is under way.
            if recent(clock.heard_leader) || recent(clock.campaigned) {
                return;
            }
            clock.campaigned = Some(now);
        }
        RaftStats::bump(&self.stats.campaigns_after_refusal);
        tracing::info!(
            candidate = req.vote.leader_id().node_id,
            term = req.vote.leader_id().term,
            "campaigning at once: this member refused a candidate whose log is behind its own, or split a vote with it, and no leader has been heard for a lease"
        );
        for _ in 0..climb {
            if let Err(e) = self.raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not campaign");
                return;
            }
        }
    }
}

/// A request from the leader being handled: elections are off from [`Heeding::begin`]
/// until it is dropped, then back on at once after a quick one, a lease after a slow
/// one unless the leader spoke again meanwhile. Dropping (not only finishing) ends it,
/// so a request abandoned half-way never leaves elections off.
struct Heeding {
    inbound: Inbound,
    what: String,
    arrived: Instant,
    begun: u64,
}

impl Heeding {
    fn begin(inbound: &Inbound, what: String) -> Heeding {
        let arrived = Instant::now();
        let mut clock = inbound.clock();
        clock.heard_leader = Some(arrived);
        clock.holding = false;
        clock.appending += 1;
        clock.begun += 1;
        inbound.raft.runtime_config().elect(false);
        Heeding { inbound: inbound.clone(), what, arrived, begun: clock.begun }
    }
}

impl Drop for Heeding {
    fn drop(&mut self) {
        let took = self.arrived.elapsed();
        let me = &self.inbound;
        let mut clock = me.clock();
        clock.appending -= 1;
        if took > me.lease / 2 {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                "{} from the leader took long (a slow disk?); this member did not campaign meanwhile",
                self.what
            );
        }
        if clock.appending > 0 {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            // Counted from the answer, as if openraft's timer restarted now: back on a
            // lease from now, unless another request began (the leader had that long
            // to speak again).
            Ok(handle) if took >= me.heartbeat => {
                let (me, begun) = (me.clone(), self.begun);
                handle.spawn(async move {
                    tokio::time::sleep(me.lease).await;
                    let clock = me.clock();
                    if clock.appending == 0 && clock.begun == begun {
                        me.raft.runtime_config().elect(true);
                    }
                });
            }
            // openraft's timer restarted less than a heartbeat ago (or the runtime is
            // gone: nothing more to hold).
            _ => me.raft.runtime_config().elect(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn req(term: u64, last: Option<u64>) -> VoteRequest<u64> {
        VoteRequest::new(Vote::new(term, 1), last.map(|i| LogId::new(CommittedLeaderId::new(1, 0), i)))
    }

    fn resp(term: u64, committed: bool, last: Option<u64>, granted: bool) -> VoteResponse<u64> {
        voted(term, 0, committed, last, granted)
    }

    fn voted(term: u64, node: u64, committed: bool, last: Option<u64>, granted: bool) -> VoteResponse<u64> {
        let mut vote = Vote::new(term, node);
        vote.committed = committed;
        VoteResponse::new(vote, last.map(|i| LogId::new(CommittedLeaderId::new(1, 0), i)), granted)
    }

    /// The member answering in these tests (candidates are member 1).
    const ME: u64 = 9;

    #[test]
    fn a_candidate_behind_in_the_next_term_is_passed_in_two_elections() {
        assert_eq!(terms_to_overtake(ME, &req(5, Some(10)), &resp(4, true, Some(12), false)), Some(2));
        assert_eq!(terms_to_overtake(ME, &req(7, None), &resp(4, true, Some(1), false)), Some(4));
    }

    #[test]
    fn no_campaign_after_a_grant_an_equal_log_a_vote_in_that_term_or_a_far_candidate() {
        // Granted.
        assert_eq!(terms_to_overtake(ME, &req(5, Some(12)), &resp(5, false, Some(12), true)), None);
        // Refused with the same log: by lease (or by vote), not for its log.
        assert_eq!(terms_to_overtake(ME, &req(5, Some(12)), &resp(4, true, Some(12), false)), None);
        // This member already voted in the candidate's term (for someone else).
        assert_eq!(terms_to_overtake(ME, &req(5, Some(10)), &resp(5, false, Some(12), false)), None);
        // Or in a later one.
        assert_eq!(terms_to_overtake(ME, &req(5, Some(10)), &resp(6, false, Some(12), false)), None);
        // A candidate more than four terms ahead is left to openraft's timers.
        assert_eq!(terms_to_overtake(ME, &req(9, Some(10)), &resp(4, true, Some(12), false)), None);
    }

    #[test]
    fn in_a_split_vote_the_greater_log_then_the_greater_id_campaigns_again_at_once() {
        // Both campaigned in term 5, each voted for itself.
        assert_eq!(terms_to_overtake(ME, &req(5, Some(10)), &voted(5, ME, false, Some(12), false)), Some(1));
        assert_eq!(terms_to_overtake(ME, &req(5, Some(12)), &voted(5, ME, false, Some(12), false)), Some(1));
        // The other side of the same two splits: it waits, and grants.
        assert_eq!(terms_to_overtake(0, &req(5, Some(12)), &voted(5, 0, false, Some(10), false)), None);
        assert_eq!(terms_to_overtake(0, &req(5, Some(12)), &voted(5, 0, false, Some(12), false)), None);
        // A vote for this member that is committed is a leader's, not a split.
        assert_eq!(terms_to_overtake(ME, &req(5, Some(10)), &voted(5, ME, true, Some(12), false)), None);
    }
}
