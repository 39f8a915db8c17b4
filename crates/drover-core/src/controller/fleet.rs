//! The fleet rules: nodes joining, leaving and saying what they know, price updates
//! and their fencing, and `settle`, which restores the assignment invariants after
//! every input (failover, stale streamers, drains, pins, the rejoin grace) and sends
//! each node whose pairs changed its new set.

use super::*;

impl Controller {
    pub(super) fn started(&mut self, config: Config) {
        self.config = Config { seed: self.config.seed, ..config }.bounded();
        // Every connection died with the previous process.
        let streaming: BTreeSet<String> =
            self.pairs.values().flat_map(|p| p.current.iter().chain(p.next.iter())).map(|l| l.node.clone()).collect();
        for (id, n) in &mut self.nodes {
            self.scratch.tasks.rescan();
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

    pub(super) fn node_connected(&mut self, node: String, session: u64, out: &mut Vec<Output>) {
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
        self.scratch.tasks.rescan();
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

    pub(super) fn reply_to_node(node: &str, session: u64, request_id: String, payload: impl Into<Payload>) -> Output {
        Output::ToNode {
            node: node.to_owned(),
            session,
            msg: v1::StreamToNode { from_uuid: None, command: Some(any_of(payload)), request_id, fence: None },
        }
    }

    pub(super) fn node_message(
        &mut self,
        node: &str,
        session: u64,
        request_id: String,
        msg: NodeMsg,
        out: &mut Vec<Output>,
    ) {
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.session == Some(session)) else {
            // A message from a connection that is no longer current. A price on it is
            // fenced like one under an old epoch (a streamer cut off and replaced,
            // whose queued updates arrive after the partition heals).
            let price = match &msg {
                NodeMsg::Price(_) => true,
                NodeMsg::Message { type_url, .. } => type_url.ends_with(".NodePriceUpdateV1Notify"),
                NodeMsg::Reply(_) => false,
            };
            if price {
                self.counters.prices_fenced += 1;
            }
            return;
        };
        n.last_seen_ms = self.now_ms;
        let (type_url, payload) = match msg {
            // A reply to a command a CLI fanned out goes back to that CLI.
            NodeMsg::Reply(any) => {
                if let Some(p) = self.pending.remove(&request_id)
                    && self.clis.contains_key(&p.cli_session)
                {
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
            NodeMsg::Price(u) => return self.price_update(node, u),
            NodeMsg::Message { type_url, payload } => (type_url, payload.map(|p| *p)),
        };
        if let Ok(p) = &payload
            && self.work().task_message(node, session, request_id.clone(), p, out)
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
                out.push(Self::reply_to_node(
                    node,
                    session,
                    request_id,
                    v1::UnknownCommandV1Notify { type_url, reason },
                ));
            }
            Err(reason) => {
                self.counters.refused += 1;
                out.push(Self::reply_to_node(
                    node,
                    session,
                    request_id,
                    v1::UnknownCommandV1Notify { type_url, reason },
                ));
            }
        }
    }

    pub(super) fn known_currencies(
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
            out.push(Self::reply_to_node(
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

    pub(super) fn price_update(&mut self, node: &str, u: v1::NodePriceUpdateV1Notify) {
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
        // The streamer's id is kept from the previous price when it is the same node
        // (the common case): no allocation per accepted update.
        let streamer = match pair.latest.take() {
            Some(p) if p.streamer == node => p.streamer,
            _ => node.to_owned(),
        };
        pair.latest = Some(PriceRec {
            mantissa: price.mantissa,
            scale: price.scale,
            upstream_time_ms: u.upstream_time_ms,
            seq: u.seq,
            epoch: u.epoch,
            streamer,
        });
        self.counters.prices_accepted += 1;
        self.publish(&u.pair);
    }

    pub(super) fn price_view(&self, name: &str, pair: &Pair) -> Option<v1::PriceView> {
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

    pub(super) fn publish(&mut self, pair: &str) {
        // Watch notifications are collected into `published` and drained by `settle`.
        if self.clis.values().any(|c| !c.watches.is_empty()) {
            self.scratch.published.push(pair.to_owned());
        }
    }

    pub(super) fn settle(&mut self, out: &mut Vec<Output>) {
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
                self.scratch.tasks.rescan();
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
        self.work().settle_tasks(out);
    }

    /// Whether `settle_pair` would leave `pair` unchanged, decided without touching it.
    pub(super) fn pair_is_quiet(&self, name: &str, p: &Pair) -> bool {
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
    pub(super) fn flush(&mut self, out: &mut Vec<Output>) {
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
                    fence: None,
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
    pub(super) fn candidates(&mut self, pair: &str, except: Option<&str>, draining: bool) -> Vec<String> {
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

    pub(super) fn load(&self, node: &str) -> usize {
        self.pairs.values().filter(|p| [&p.current, &p.next].into_iter().flatten().any(|l| l.node == node)).count()
    }

    pub(super) fn pick(&mut self, pair: &str, except: Option<&str>) -> Option<String> {
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

    pub(super) fn lease(&mut self, pair: &str, node: String, reason: &'static str) -> Lease {
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

    pub(super) fn usable(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.session.is_some())
    }

    pub(super) fn settle_pair(&mut self, name: &str) {
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
