//! Operator commands from CLI streams: listing, kick, evict, drain, forget, pins,
//! prices and their watches, tokens, tasks, and fan-out of commands to nodes with the
//! count of replies to expect.

use super::*;

impl Controller {
    pub(super) fn to_cli(session: u64, stream_id: &str, node: Option<&str>, payload: impl Into<Payload>) -> Output {
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

    pub(super) fn count(session: u64, stream_id: &str, expected: u32, missing: Vec<String>) -> Output {
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
    pub(super) fn leases_by_node(
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
    pub(super) fn forget_node(&mut self, id: &str) {
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
        self.work().forget_worker(id);
    }

    pub(super) fn node_info(&self, id: &str, n: &Node, streaming: Vec<v1::StreamAssignment>) -> v1::NodeInfo {
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

    pub(super) fn cli_message(
        &mut self,
        session: u64,
        stream_id: String,
        node_uuids: Vec<String>,
        any: Any,
        payload: Result<Box<Payload>, String>,
        out: &mut Vec<Output>,
    ) {
        let Some(admin) = self.clis.get(&session).map(|c| c.role == OperatorRole::Admin) else { return };
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
        let payload = match payload {
            Ok(p) => *p,
            Err(reason) => {
                self.counters.refused += 1;
                return refuse(out, &any.type_url, reason);
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
        if let Some(answer) = self.work().task_command(&payload) {
            return reply(out, answer);
        }
        match payload {
            Payload::ControllerTaskAbortV1Req(a) => {
                let answer = self.work().task_abort(&a.id, out);
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
                    self.scratch.tasks.rescan(); // a worker may go offline: rescan its attempts
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
                        self.scratch.tasks.rescan();
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
    pub(super) fn fan_out(
        &mut self,
        session: u64,
        stream_id: &str,
        targets: Vec<String>,
        any: Any,
        out: &mut Vec<Output>,
    ) {
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
                    fence: None,
                },
            });
        }
    }

    /// Pins `pairs` to `node` (or unpins them). Returns the assignments in force
    /// afterwards, the pairs refused, and an error if the node cannot take any.
    pub(super) fn pin(
        &mut self,
        node: &str,
        pairs: &[String],
        unpin: bool,
    ) -> (Vec<v1::StreamAssignment>, Vec<String>, String) {
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
