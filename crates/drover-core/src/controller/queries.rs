//! Read-only queries on the controller's state: what the shell, metrics, the
//! dashboard and tests ask between inputs. None of them changes the state.

use super::*;

impl Controller {
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
        self.clis.get(&session).is_some_and(|c| c.role == OperatorRole::Admin)
    }

    /// What a node id is bound to (`token <id>` or `certificate`), if it is.
    pub fn node_credential(&self, node: &str) -> Option<&str> {
        self.ids.credential_of(node)
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

    pub(super) fn node_state(&self, n: &Node) -> NodeState {
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
        if let Some(t) = self.scratch.tasks.deadline() {
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
}
