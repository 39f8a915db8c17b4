//! Scripted checks of single rules of the core, each a short input script with the
//! outputs it must produce.

use drover_core::{Config, Controller, Event, Input, Output, Policy};
use drover_proto::{Payload, v1};

struct Script {
    core: Controller,
    now: i64,
}

fn payload(any: &Option<drover_proto::Any>) -> Payload {
    Payload::from_any(any.as_ref().expect("any")).expect("decodes")
}

impl Script {
    fn new(policy: Policy) -> Script {
        let config = Config { policy, version: "9.9.9".into(), ..Config::default() };
        let mut s = Script { core: Controller::new(config.clone()), now: 10_000 };
        s.run(Event::ControllerStarted { config });
        s.now += 10_000; // past the first start's rejoin grace
        s.run(Event::Tick);
        s
    }

    fn run(&mut self, event: Event) -> Vec<Output> {
        let mut out = Vec::new();
        self.core.handle(Input { at_ms: self.now, event }, &mut out);
        out
    }

    fn join(&mut self, node: &str, session: u64, pairs: &[&str]) -> Vec<Output> {
        let mut out = self.run(Event::NodeConnected { node: node.into(), session });
        out.extend(self.msg(
            node,
            session,
            v1::NodeKnownCurrenciesV1Notify {
                pairs: pairs.iter().map(|p| p.to_string()).collect(),
                name: node.into(),
                version: "1".into(),
                worker: false,
            },
        ));
        out
    }

    fn msg(&mut self, node: &str, session: u64, p: impl Into<Payload>) -> Vec<Output> {
        self.run(Event::node_message(node, session, "", p))
    }

    fn price(&mut self, node: &str, session: u64, pair: &str, epoch: u64, t: i64) -> Vec<Output> {
        self.msg(
            node,
            session,
            v1::NodePriceUpdateV1Notify {
                pair: pair.into(),
                price: Some(v1::Decimal { mantissa: t, scale: 2 }),
                upstream_time_ms: t,
                seq: 1,
                epoch,
            },
        )
    }

    fn cli(&mut self, nodes: &[&str], p: impl Into<Payload>) -> Vec<Output> {
        self.run(Event::CliConnected { session: 900, role: drover_core::OperatorRole::Admin });
        self.run(Event::cli_message(900, "s1", "cli", nodes.iter().map(|n| n.to_string()).collect(), p))
    }
}

/// The pairs each `NodeStreamModifyStateV1Req` in `out` assigns, by node.
fn assignments(out: &[Output]) -> Vec<(String, Vec<(String, u64)>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToNode { node, msg, .. } => match payload(&msg.command) {
                Payload::NodeStreamModifyStateV1Req(m) => {
                    Some((node.clone(), m.streams.into_iter().map(|s| (s.pair, s.epoch)).collect()))
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn first_capable_node_gets_the_pair_with_epoch_one() {
    let mut s = Script::new(Policy::Random);
    let out = s.join("a", 1, &["EURUSD"]);
    assert_eq!(assignments(&out), [("a".to_string(), vec![("EURUSD".to_string(), 1)])]);
    let out = s.join("b", 2, &["EURUSD"]);
    assert_eq!(assignments(&out), [("b".to_string(), vec![])], "b learns it streams nothing");
}

#[test]
fn stream_end_moves_pairs_at_once_with_a_new_epoch() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.join("b", 2, &["EURUSD"]);
    let out = s.run(Event::NodeDisconnected { node: "a".into(), session: 1 });
    assert_eq!(assignments(&out), [("b".to_string(), vec![("EURUSD".to_string(), 2)])]);
    assert_eq!(s.core.counters().failovers, 1);
}

#[test]
fn updates_from_a_deposed_streamer_are_fenced() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.join("b", 2, &["EURUSD"]);
    s.price("a", 1, "EURUSD", 1, 100);
    s.cli(&[], v1::ControllerKickNodesV1Req { node_uuids: vec!["a".into()] });
    // a reconnects and replays an update under its old epoch.
    s.join("a", 3, &["EURUSD"]);
    s.price("a", 3, "EURUSD", 1, 200);
    assert_eq!(s.core.latest_price("EURUSD"), Some((100, 2, 100)));
    assert_eq!(s.core.counters().prices_fenced, 1);
    s.price("b", 2, "EURUSD", 2, 300);
    assert_eq!(s.core.latest_price("EURUSD"), Some((300, 2, 300)));
    // Older by upstream time: dropped, counted.
    s.price("b", 2, "EURUSD", 2, 250);
    assert_eq!(s.core.latest_price("EURUSD"), Some((300, 2, 300)));
    assert_eq!(s.core.counters().prices_stale, 1);
}

#[test]
fn drain_is_make_before_break() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.join("b", 2, &["EURUSD"]);
    let out = s.cli(&[], v1::ControllerDrainNodesV1Req { node_uuids: vec!["a".into()], undo: false });
    // b starts at epoch 2; a keeps streaming until b's first update is accepted.
    assert_eq!(assignments(&out), [("b".to_string(), vec![("EURUSD".to_string(), 2)])]);
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)));
    s.price("a", 1, "EURUSD", 1, 100);
    assert_eq!(s.core.latest_price("EURUSD").map(|p| p.2), Some(100), "no gap: a still counts");
    let out = s.price("b", 2, "EURUSD", 2, 110);
    assert_eq!(assignments(&out), [("a".to_string(), vec![])], "now a is told to stop");
    assert_eq!(s.core.streamer("EURUSD"), Some(("b", 2)));
    assert_eq!(s.core.counters().handovers, 1);
}

#[test]
fn an_undone_drain_takes_pairs_again() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.cli(&[], v1::ControllerDrainNodesV1Req { node_uuids: vec!["a".into()], undo: false });
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)), "no one else to hand over to");
    // A second node joins while a drains: it takes the pair.
    s.join("b", 2, &["EURUSD", "GBPUSD"]);
    s.price("b", 2, "EURUSD", 2, 100);
    assert_eq!(s.core.streamer("EURUSD"), Some(("b", 2)));
    s.join("c", 3, &["USDJPY"]);
    s.cli(&[], v1::ControllerDrainNodesV1Req { node_uuids: vec!["a".into()], undo: true });
    // a is a candidate again: with b drained, EURUSD comes back to a.
    s.cli(&[], v1::ControllerDrainNodesV1Req { node_uuids: vec!["b".into()], undo: false });
    s.price("a", 1, "EURUSD", 3, 200);
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 3)), "the undrained node takes pairs again");
}

#[test]
fn forget_removes_a_gone_node_and_frees_its_pairs_but_not_a_connected_one() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    let out = s.cli(&[], v1::ControllerForgetNodesV1Req { node_uuids: vec!["a".into(), "zz".into()] });
    let reply = out.iter().find_map(|o| match o {
        Output::ToCli { msg, .. } => match payload(&msg.response) {
            Payload::ControllerForgetNodesV1Reply(r) => Some(r),
            _ => None,
        },
        _ => None,
    });
    let r = reply.expect("a forget reply");
    assert_eq!((r.forgotten.len(), r.connected, r.missing), (0, vec!["a".to_string()], vec!["zz".to_string()]));
    s.run(Event::NodeDisconnected { node: "a".into(), session: 1 });
    assert!(s.core.fleet_view().nodes.iter().any(|n| n.id == "a" && n.state == "gone"), "listed as gone");
    s.cli(&[], v1::ControllerForgetNodesV1Req { node_uuids: vec!["a".into()] });
    assert!(s.core.fleet_view().nodes.iter().all(|n| n.id != "a"), "forgotten: no longer listed");
    assert_eq!(s.core.streamer("EURUSD"), None);
    let out = s.join("b", 2, &["EURUSD"]);
    assert_eq!(assignments(&out), [("b".to_string(), vec![("EURUSD".to_string(), 2)])]);
}

#[test]
fn silent_node_is_gone_after_node_timeout() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.join("b", 2, &["EURUSD"]);
    let deadline = s.core.next_deadline().expect("a deadline");
    assert!(deadline <= s.now + 3_001);
    s.now += 2_000;
    s.msg("b", 2, v1::NodeHeartbeatV1Notify { sent_at_ms: 0 });
    s.now += 1_001;
    let out = s.run(Event::Tick);
    assert!(out.iter().any(|o| matches!(o, Output::CloseNode { node, .. } if node == "a")), "{out:?}");
    assert_eq!(s.core.streamer("EURUSD"), Some(("b", 2)));
}

#[test]
fn restart_waits_rejoin_grace_for_previous_streamers() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    s.join("b", 2, &["EURUSD"]);
    let config = s.core.config().clone();
    s.run(Event::ControllerStarted { config });
    // b comes back first: it does not take a's pair during the grace.
    s.join("b", 3, &["EURUSD"]);
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)));
    s.join("a", 4, &["EURUSD"]);
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)), "same assignment after rejoin");
    // Had a not come back, the pair moves when the grace ends.
    let config = s.core.config().clone();
    s.run(Event::ControllerStarted { config });
    s.join("b", 5, &["EURUSD"]);
    s.now += 2_600;
    s.msg("b", 5, v1::NodeHeartbeatV1Notify { sent_at_ms: 0 });
    s.now += 2_401;
    let out = s.run(Event::Tick);
    assert_eq!(assignments(&out), [("b".to_string(), vec![("EURUSD".to_string(), 2)])]);
}

#[test]
fn fan_out_counts_replies_and_names_missing_nodes() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    let out = s.cli(&["a", "zzz"], v1::NodeStatusV1Req {});
    let Output::ToCli { msg, .. } = &out[0] else { panic!("{out:?}") };
    let Payload::CliResponseCountV1Notify(c) = payload(&msg.response) else { panic!() };
    assert_eq!((c.expected, c.missing), (1, vec!["zzz".to_string()]));
    let Output::ToNode { node, msg, .. } = &out[1] else { panic!("{out:?}") };
    assert_eq!(node, "a");
    let rid = msg.request_id.clone();
    let any = Payload::from(v1::NodeStatusV1Reply::default()).to_any();
    let out = s.run(Event::NodeMessage {
        node: "a".into(),
        session: 1,
        request_id: rid,
        from_uuid: Some("cli".into()),
        type_url: any.type_url,
        value: any.value,
    });
    let [Output::ToCli { msg, .. }] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!((msg.stream_id.as_str(), msg.node_uuid.as_deref()), ("s1", Some("a")));
}

#[test]
fn unknown_any_from_a_cli_gets_unknown_command_and_nothing_breaks() {
    let mut s = Script::new(Policy::Random);
    s.run(Event::CliConnected { session: 900, role: drover_core::OperatorRole::Read });
    let out = s.run(Event::CliMessage {
        session: 900,
        stream_id: "x".into(),
        cli_uuid: "cli".into(),
        node_uuids: vec![],
        request_id: String::new(),
        type_url: "type.googleapis.com/acme.Frobnicate".into(),
        value: vec![1, 2, 3],
    });
    let replies: Vec<Payload> = out
        .iter()
        .filter_map(|o| match o {
            Output::ToCli { msg, .. } => Some(payload(&msg.response)),
            _ => None,
        })
        .collect();
    assert!(matches!(&replies[1], Payload::UnknownCommandV1Notify(u) if u.type_url.ends_with("acme.Frobnicate")));
    // A read-only operator may not kick.
    let kick = v1::ControllerKickNodesV1Req { node_uuids: vec!["a".into()] };
    let out = s.run(Event::cli_message(900, "y", "cli", vec![], kick));
    assert!(out.iter().any(|o| matches!(o, Output::ToCli { msg, .. }
        if matches!(payload(&msg.response), Payload::UnknownCommandV1Notify(u) if u.reason.contains("admin")))));
}

/// Regression (issue 9, 10,000-node run): a streamer that went stale with no other
/// node able to take its pair left a deadline in the past, so every later heartbeat
/// ran the full settle and a large fleet saturated the controller.
#[test]
fn stale_streamer_without_alternative_leaves_no_past_deadline() {
    let mut s = Script::new(Policy::Random);
    s.join("a", 1, &["EURUSD"]);
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)));
    let stale_after = s.core.config().stale_after_ms;
    // a keeps its keepalives up but never sends a price.
    for _ in 0..(stale_after / 1_000 + 2) {
        s.now += 1_000;
        s.msg("a", 1, v1::NodeHeartbeatV1Notify { sent_at_ms: 0 });
        s.run(Event::Tick);
    }
    assert_eq!(s.core.streamer("EURUSD"), Some(("a", 1)), "no one else can take it");
    let deadline = s.core.next_deadline().expect("a's keepalive deadline");
    assert!(deadline > s.now, "deadline {deadline} is not after now {}", s.now);
    assert_eq!(s.core.next_deadline_hint(), Some(deadline));
    // A node that can take the pair arrives: the stale streamer is replaced at once.
    s.join("b", 2, &["EURUSD"]);
    assert_eq!(s.core.streamer("EURUSD"), Some(("b", 2)));
    assert_eq!(s.core.counters().stale_reassignments, 1);
}

/// Every admission refusal the core decides is typed, with the reason its metric
/// label names, and the text the node is told.
#[test]
fn admission_refusals_are_typed() {
    use drover_core::{AdmissionRefusal, Credential};
    let mut s = Script::new(Policy::Random);
    let token = |s: &mut Script, id: &str, role: v1::TokenRole, ttl_ms: u64, uses: u32| {
        s.run(Event::TokenCreate {
            session: 0,
            stream_id: String::new(),
            id: id.into(),
            secret_hash: [1; 32],
            role: role as i32,
            ttl_ms,
            uses,
            description: String::new(),
        });
    };
    token(&mut s, "join00000000", v1::TokenRole::Join, 0, 0);
    token(&mut s, "read00000000", v1::TokenRole::Read, 0, 0);
    token(&mut s, "once00000000", v1::TokenRole::Join, 0, 1);
    token(&mut s, "brief0000000", v1::TokenRole::Join, 1_000, 0);
    let mut attempt = 0;
    let mut admit = |s: &mut Script, node: &str, id: &str, secret: u8| {
        attempt += 1;
        let credential = Credential::Token { id: id.into(), secret_hash: [secret; 32] };
        let out = s.run(Event::Admission { attempt, node: node.into(), credential });
        out.into_iter()
            .find_map(|o| match o {
                Output::AdmissionVerdict { result, .. } => Some(result),
                _ => None,
            })
            .expect("a verdict")
    };
    assert_eq!(admit(&mut s, "n1", "nosuchtoken0", 1), Err(AdmissionRefusal::UnknownToken));
    assert_eq!(admit(&mut s, "n1", "join00000000", 2), Err(AdmissionRefusal::UnknownToken), "wrong secret");
    assert_eq!(admit(&mut s, "n1", "read00000000", 1), Err(AdmissionRefusal::NotJoinToken));
    assert!(admit(&mut s, "n1", "once00000000", 1).is_ok());
    assert_eq!(admit(&mut s, "n2", "once00000000", 1), Err(AdmissionRefusal::UsedUp));
    let taken = admit(&mut s, "n1", "join00000000", 1).unwrap_err();
    assert_eq!(taken.reason(), "identity");
    assert!(taken.to_string().contains("belongs to another credential (token once00000000)"), "{taken}");
    s.now += 2_000;
    assert_eq!(admit(&mut s, "n3", "brief0000000", 1), Err(AdmissionRefusal::Expired));
    s.cli(&[], v1::ControllerTokenRevokeV1Req { ids: vec!["join00000000".into()] });
    assert_eq!(admit(&mut s, "n4", "join00000000", 1), Err(AdmissionRefusal::Revoked));
    for r in [AdmissionRefusal::UnknownToken, AdmissionRefusal::Revoked, AdmissionRefusal::RateLimited] {
        assert!(AdmissionRefusal::REASONS.contains(&r.reason()));
    }
}

/// Settings and times from a journal are bounded before the core computes with them:
/// a damaged or hand-written journal (here the input the `decode_input` fuzz target
/// found: a far-future time and a rejoin grace near `i64::MAX`) cannot overflow.
#[test]
fn absurd_times_and_settings_from_a_journal_do_not_overflow() {
    use drover_machine::StateMachine;
    let found: &[u8] = &[
        254, 255, 255, 255, 255, 255, 255, 255, 1, 0, 0, 0, 138, 220, 255, 255, 255, 255, 250, 255, 255, 1, 0, 1, 0, 0,
        0, 0, 59, 0, 1, 43, 1,
    ];
    let input = Controller::decode_input(found).expect("it decodes");
    let mut core = Controller::new(Config::default());
    let mut out = Vec::new();
    core.apply(input, &mut out);
    let huge = Config { rejoin_grace_ms: i64::MAX, node_timeout_ms: i64::MAX, stale_after_ms: -5, ..Config::default() };
    for at_ms in [i64::MAX, i64::MIN, 0] {
        core.apply(Input { at_ms, event: Event::ControllerStarted { config: huge.clone() } }, &mut out);
        core.apply(Input { at_ms, event: Event::NodeConnected { node: "n1".into(), session: 1 } }, &mut out);
        core.apply(Input { at_ms, event: Event::Tick }, &mut out);
    }
    assert!(core.config().rejoin_grace_ms <= drover_core::MAX_SETTING_MS);
    assert_eq!(core.config().stale_after_ms, 0);
    assert!(core.now_ms() <= drover_core::MAX_TIME_MS);
}
