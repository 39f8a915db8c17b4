//! What `drover cluster status` shows: each member's view of itself, gathered over
//! the Raft port, and the cluster view made of them.
//!
//! A member answers a status request ([`crate::network::ask_status`]) from its own
//! openraft metrics: its role, term, the leader it knows, the last index in its log and
//! the last one it applied (it applies only committed entries, so that is the commit
//! index it knows), and the addresses it serves (gRPC, HTTP, admission, Raft). The
//! cluster view asks every member of the current membership at once and puts the
//! answers side by side; a member that does not answer is shown as unreachable, never
//! left out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::{Raft, ServerState};
use serde::{Deserialize, Serialize};

use crate::tls::Credentials;
use crate::types::TypeConfig;

/// The addresses a member serves, by name (`raft`, `grpc`, `http`, `admission`).
pub type Addresses = Arc<BTreeMap<String, String>>;

/// One member's view of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its member id.
    pub id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// The last index in its log.
    pub last_log_index: u64,
    /// The last index it applied (it applies committed entries only).
    pub commit_index: u64,
    /// The addresses it serves.
    pub addresses: BTreeMap<String, String>,
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl MemberStatus {
    /// `raft`'s view of itself now.
    pub fn of(raft: &Raft<TypeConfig>, about: &Addresses) -> MemberStatus {
        let m = raft.metrics().borrow().clone();
        MemberStatus {
            id: m.id,
            role: role(m.state).to_owned(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.last_applied.map_or(0, |l| l.index),
            addresses: (**about).clone(),
        }
    }
}

/// One member in the cluster view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Its member id.
    pub id: u64,
    /// Its role as it reports it, or `unreachable`.
    pub role: String,
    /// Whether it votes (a learner being added does not yet).
    pub voter: bool,
    /// The Raft address the membership holds for it.
    pub raft: String,
    /// The last index it applied, when it answered.
    pub commit_index: Option<u64>,
    /// How many entries it is behind the leader's log, when both answered.
    pub lag: Option<u64>,
    /// The addresses it serves, when it answered.
    pub addresses: BTreeMap<String, String>,
}

/// The cluster as its members report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The leader (the member that reports itself leading in the highest term).
    pub leader: Option<u64>,
    /// The leader's term (with no leader: the highest term any member reports; a
    /// member that campaigned and lost can be in a higher term than the leader).
    pub term: u64,
    /// Every member of the current membership, voters and learners.
    pub members: Vec<MemberView>,
}

impl ClusterStatus {
    /// The leader's addresses, when it answered.
    pub fn leader_addresses(&self) -> Option<&BTreeMap<String, String>> {
        let l = self.leader?;
        self.members.iter().find(|m| m.id == l).map(|m| &m.addresses).filter(|a| !a.is_empty())
    }
}

/// Asks every member of `raft`'s current membership for its status (this member
/// answers from its own metrics), each within `ttl`, and puts the answers together.
pub async fn gather(raft: &Raft<TypeConfig>, creds: &Credentials, about: &Addresses, ttl: Duration) -> ClusterStatus {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let nodes: Vec<(u64, String)> = membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    // Every member is asked at once; the answers are put in membership order.
    let mut set = tokio::task::JoinSet::new();
    for (id, addr) in nodes.iter().cloned() {
        if id == metrics.id {
            continue;
        }
        let creds = creds.clone();
        set.spawn(async move {
            let answer = tokio::time::timeout(ttl, crate::network::ask_status(&addr, &creds, ttl)).await;
            match answer {
                Ok(Ok(s)) => (id, Some(s)),
                Ok(Err(e)) => {
                    tracing::debug!(member = id, %addr, error = %e, "no status from member");
                    (id, None)
                }
                Err(_) => (id, None),
            }
        });
    }
    let mut answers: BTreeMap<u64, Option<MemberStatus>> = BTreeMap::new();
    answers.insert(metrics.id, Some(MemberStatus::of(raft, about)));
    while let Some(r) = set.join_next().await {
        if let Ok((id, answer)) = r {
            answers.insert(id, answer);
        }
    }
    view(&nodes, &voters, &answers)
}

/// The cluster view from the members' answers (`None`: no answer).
fn view(
    nodes: &[(u64, String)],
    voters: &std::collections::BTreeSet<u64>,
    answers: &BTreeMap<u64, Option<MemberStatus>>,
) -> ClusterStatus {
    let reported = || answers.values().flatten();
    // The leader's term; a member that campaigned and lost may report a higher one.
    let leading = reported().filter(|s| s.role == "leader").max_by_key(|s| s.term);
    let leader = leading.map(|s| s.id);
    let term = leading.map_or_else(|| reported().map(|s| s.term).max().unwrap_or(0), |s| s.term);
    let leader_log = leader.and_then(|l| answers.get(&l)?.as_ref()).map(|s| s.last_log_index);
    let members = nodes
        .iter()
        .map(|(id, raft)| {
            let answer = answers.get(id).and_then(Option::as_ref);
            MemberView {
                id: *id,
                role: answer.map_or("unreachable".to_owned(), |s| s.role.clone()),
                voter: voters.contains(id),
                raft: raft.clone(),
                commit_index: answer.map(|s| s.commit_index),
                lag: answer.zip(leader_log).map(|(s, l)| l.saturating_sub(s.last_log_index)),
                addresses: answer.map(|s| s.addresses.clone()).unwrap_or_default(),
            }
        })
        .collect();
    ClusterStatus { leader, term, members }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: u64, role: &str, term: u64, last: u64) -> MemberStatus {
        MemberStatus {
            id,
            role: role.into(),
            term,
            leader: Some(1),
            last_log_index: last,
            commit_index: last.saturating_sub(1),
            addresses: BTreeMap::from([("grpc".to_owned(), format!("10.0.0.{id}:7400"))]),
        }
    }

    #[test]
    fn the_view_names_the_newest_leader_lags_and_the_unreachable() {
        let nodes = vec![(1, "a:1".to_owned()), (2, "b:1".to_owned()), (3, "c:1".to_owned()), (4, "d:1".to_owned())];
        let voters = [1, 2, 3].into_iter().collect();
        let answers = BTreeMap::from([
            // A deposed leader that has not heard of term 5 yet.
            (1, Some(answer(1, "leader", 4, 90))),
            (2, Some(answer(2, "leader", 5, 100))),
            (3, None),
            (4, Some(answer(4, "learner", 5, 70))),
        ]);
        let mut candidate = answers.clone();
        candidate.insert(3, Some(answer(3, "candidate", 6, 100)));
        let c = view(&nodes, &voters, &candidate);
        assert_eq!((c.leader, c.term), (Some(2), 5), "the leader's term, not a losing candidate's");
        let v = view(&nodes, &voters, &answers);
        assert_eq!(v.leader, Some(2));
        assert_eq!(v.term, 5);
        type Row<'a> = (u64, &'a str, bool, Option<u64>, Option<u64>);
        let m: Vec<Row<'_>> =
            v.members.iter().map(|m| (m.id, m.role.as_str(), m.voter, m.commit_index, m.lag)).collect();
        assert_eq!(
            m,
            vec![
                (1, "leader", true, Some(89), Some(10)),
                (2, "leader", true, Some(99), Some(0)),
                (3, "unreachable", true, None, None),
                (4, "learner", false, Some(69), Some(30)),
            ]
        );
        assert_eq!(v.leader_addresses().unwrap()["grpc"], "10.0.0.2:7400");
    }
}
