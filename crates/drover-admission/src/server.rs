//! The controller's side of one admission connection, sans-IO.
//!
//! Feed it decoded packets (or decode errors) and ticks; it returns [`Action`]s. It
//! never decides on a credential itself: it asks with [`Action::Verify`] and is told
//! with [`ServerConn::on_verdict`]. Every deviation from the seed's flow (a packet
//! out of order, an unknown code, bad JSON, an oversize packet, a handshake past its
//! deadline) ends in `conn:close {"reason"}` and [`Action::Close`].

use drover_wire::admission::{Code, Packet, PacketError};

use crate::version::VersionPolicy;

/// Longest node id accepted.
pub const MAX_NODE_ID: usize = drover_proto::MAX_NODE_ID;
/// Longest credential accepted (a PEM chain fits).
pub const MAX_CREDENTIAL: usize = 16 * 1024;

/// Settings of the handshake.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Which node versions may join.
    pub policy: VersionPolicy,
    /// The handshake must be done this long after the connection opened.
    pub handshake_deadline_ms: i64,
}

/// Where the handshake stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for `conn:establish`.
    AwaitEstablish,
    /// `conn:startAuth` sent; waiting for `auth:start`.
    AwaitAuthStart {
        /// The node id from `conn:establish`.
        node: String,
        /// The version it reported.
        version: String,
    },
    /// The credential is being checked.
    Verifying {
        /// The node id.
        node: String,
    },
    /// `auth:ack` sent; waiting for the node's `auth:ack`.
    AwaitNodeAck {
        /// The node id.
        node: String,
    },
    /// `auth:dec` sent; waiting for the node's `conn:close`.
    Declined,
    /// Admitted: the connection is the control channel.
    Admitted {
        /// The node id.
        node: String,
    },
    /// Done.
    Closed,
}

/// What the connection's I/O must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this packet.
    Send(Packet),
    /// Check this credential for this node and call `on_verdict`.
    Verify {
        /// The node id.
        node: String,
        /// The version it reported.
        version: String,
        /// The credential from `auth:start` (a join token or a PEM certificate chain).
        credential: String,
    },
    /// The node finished the handshake.
    Admitted {
        /// The node id.
        node: String,
    },
    /// Close the connection (after sending what precedes this action).
    Close {
        /// Why (already sent to the peer in `conn:close` where the protocol allows).
        reason: String,
    },
}

/// One admission connection, controller side.
#[derive(Debug)]
pub struct ServerConn {
    config: ServerConfig,
    phase: Phase,
    opened_ms: i64,
}

fn close(reason: impl Into<String>) -> Vec<Action> {
    let reason = reason.into();
    vec![Action::Send(Packet::new(Code::ConnClose).with("reason", reason.clone())), Action::Close { reason }]
}

impl ServerConn {
    /// A connection opened at `now_ms`.
    pub fn new(config: ServerConfig, now_ms: i64) -> Self {
        ServerConn { config, phase: Phase::AwaitEstablish, opened_ms: now_ms }
    }

    /// Where the handshake stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// When `on_tick` must next be called (the handshake deadline), if ever.
    pub fn deadline(&self) -> Option<i64> {
        match self.phase {
            Phase::Admitted { .. } | Phase::Closed => None,
            _ => Some(self.opened_ms + self.config.handshake_deadline_ms),
        }
    }

    /// Time passed: enforces the handshake deadline.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<Action> {
        match self.deadline() {
            Some(d) if now_ms >= d => {
                self.phase = Phase::Closed;
                close(format!("handshake not finished within {} ms", self.config.handshake_deadline_ms))
            }
            _ => Vec::new(),
        }
    }

    fn fail(&mut self, reason: impl Into<String>) -> Vec<Action> {
        self.phase = Phase::Closed;
        close(reason)
    }

    /// A packet (or a decode error) arrived.
    pub fn on_packet(&mut self, packet: Result<Packet, PacketError>, now_ms: i64) -> Vec<Action> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        let timed_out = self.on_tick(now_ms);
        if !timed_out.is_empty() {
            return timed_out;
        }
        let p = match packet {
            Ok(p) => p,
            Err(e) => return self.fail(e.to_string()),
        };
        match (std::mem::replace(&mut self.phase, Phase::Closed), p.code) {
            (_, Code::ConnClose) => vec![Action::Close { reason: "closed by the node".into() }],
            (Phase::AwaitEstablish, Code::ConnEstablish) => self.establish(&p),
            (phase @ Phase::Admitted { .. }, Code::ConnAlive) => {
                self.phase = phase;
                Vec::new()
            }
            (Phase::AwaitAuthStart { node, version }, Code::AuthStart) => match p.str_field("cert") {
                Some(c) if !c.is_empty() && c.len() <= MAX_CREDENTIAL => {
                    self.phase = Phase::Verifying { node: node.clone() };
                    vec![Action::Verify { node, version, credential: c.to_owned() }]
                }
                _ => self.fail(format!("auth:start needs a \"cert\" of 1..={MAX_CREDENTIAL} characters")),
            },
            (Phase::AwaitNodeAck { node }, Code::AuthAck) => {
                self.phase = Phase::Admitted { node: node.clone() };
                vec![Action::Admitted { node }]
            }
            (phase, code) => {
                let expected = match phase {
                    Phase::AwaitEstablish => "conn:establish",
                    Phase::AwaitAuthStart { .. } => "auth:start",
                    Phase::Verifying { .. } => "nothing until the verdict",
                    Phase::AwaitNodeAck { .. } => "auth:ack",
                    Phase::Declined => "conn:close",
                    Phase::Admitted { .. } => "conn:alive or conn:close",
                    Phase::Closed => "nothing",
                };
                self.fail(format!("unexpected {code}: expected {expected}"))
            }
        }
    }

    fn establish(&mut self, p: &Packet) -> Vec<Action> {
        let (Some(id), Some(version), Some(kind)) = (p.str_field("id"), p.str_field("version"), p.str_field("type"))
        else {
            return self.fail("conn:establish needs \"id\", \"version\" and \"type\"");
        };
        if id.is_empty() || id.len() > MAX_NODE_ID || id.chars().any(char::is_control) {
            return self.fail(format!("node id must be 1..={MAX_NODE_ID} printable characters"));
        }
        if kind != "node" {
            return self.fail(format!("type {kind:?} cannot join: only \"node\""));
        }
        if let Err(reason) = self.config.policy.check(version) {
            return self.fail(reason);
        }
        self.phase = Phase::AwaitAuthStart { node: id.to_owned(), version: version.to_owned() };
        vec![Action::Send(Packet::new(Code::ConnStartAuth))]
    }

    /// The verdict on the credential: `Ok((upstream, ticket))` or `Err(reason)`.
    pub fn on_verdict(&mut self, verdict: Result<(String, String), String>) -> Vec<Action> {
        let Phase::Verifying { node } = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return Vec::new();
        };
        match verdict {
            Ok((upstream, ticket)) => {
                self.phase = Phase::AwaitNodeAck { node };
                vec![Action::Send(Packet::new(Code::AuthAck).with("upstream", upstream).with("ticket", ticket))]
            }
            Err(reason) => {
                self.phase = Phase::Declined;
                vec![Action::Send(Packet::new(Code::AuthDec).with("reason", reason))]
            }
        }
    }

    /// A keepalive to send on an admitted connection.
    pub fn alive(&self) -> Option<Packet> {
        matches!(self.phase, Phase::Admitted { .. }).then(|| Packet::new(Code::ConnAlive))
    }

    /// Moves an admitted node to another upstream with a new ticket.
    pub fn move_to(&self, upstream: &str, ticket: &str) -> Option<Packet> {
        matches!(self.phase, Phase::Admitted { .. })
            .then(|| Packet::new(Code::AuthAck).with("upstream", upstream).with("ticket", ticket))
    }

    /// Evicts the node: it must stop and stay out until re-admitted.
    pub fn evict(&mut self, reason: &str) -> Vec<Action> {
        self.fail(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Version;

    fn conn() -> ServerConn {
        let v = Version::parse("0.1.0").unwrap();
        ServerConn::new(
            ServerConfig { policy: VersionPolicy { controller: v, min_node: v }, handshake_deadline_ms: 10_000 },
            0,
        )
    }

    fn establish(version: &str) -> Packet {
        Packet::new(Code::ConnEstablish).with("id", "n1").with("version", version).with("type", "node")
    }

    fn sent(actions: &[Action]) -> Vec<Code> {
        actions.iter().filter_map(|a| if let Action::Send(p) = a { Some(p.code) } else { None }).collect()
    }

    fn closed_with(actions: &[Action], needle: &str) -> bool {
        actions.iter().any(|a| matches!(a, Action::Close { reason } if reason.contains(needle)))
            && actions.iter().any(|a| matches!(a, Action::Send(p) if p.code == Code::ConnClose && p.str_field("reason").is_some_and(|r| r.contains(needle))))
    }

    #[test]
    fn the_whole_flow() {
        let mut c = conn();
        assert_eq!(sent(&c.on_packet(Ok(establish("0.1.0")), 1)), [Code::ConnStartAuth]);
        let a = c.on_packet(Ok(Packet::new(Code::AuthStart).with("cert", "dt1.x.y")), 2);
        assert!(matches!(&a[..], [Action::Verify { node, version, credential }]
            if node == "n1" && version == "0.1.0" && credential == "dt1.x.y"));
        let a = c.on_verdict(Ok(("127.0.0.1:7400".into(), "ticket".into())));
        let [Action::Send(p)] = &a[..] else { panic!("{a:?}") };
        assert_eq!(
            (p.code, p.str_field("upstream"), p.str_field("ticket")),
            (Code::AuthAck, Some("127.0.0.1:7400"), Some("ticket"))
        );
        assert_eq!(c.on_packet(Ok(Packet::new(Code::AuthAck)), 3), [Action::Admitted { node: "n1".into() }]);
        assert_eq!(c.deadline(), None, "no deadline once admitted");
        assert!(c.on_packet(Ok(Packet::new(Code::ConnAlive)), 60_000).is_empty());
        assert!(c.move_to("other:1", "t2").is_some());
        assert!(closed_with(&c.evict("evicted by an operator"), "evicted"));
    }

    #[test]
    fn refusals() {
        // wrong version
        assert!(closed_with(&conn().on_packet(Ok(establish("9.0.0")), 0), "incompatible"));
        // wrong type, missing fields
        let mut c = conn();
        assert!(closed_with(&c.on_packet(Ok(establish("0.1.0").with("type", "cli")), 0), "only \"node\""));
        assert!(closed_with(&conn().on_packet(Ok(Packet::new(Code::ConnEstablish)), 0), "needs"));
        // out of order
        assert!(closed_with(
            &conn().on_packet(Ok(Packet::new(Code::AuthStart).with("cert", "x")), 0),
            "unexpected auth:start"
        ));
        // decode errors
        assert!(closed_with(&conn().on_packet(Err(PacketError::UnknownCode("x:y".into())), 0), "unknown packet code"));
        assert!(closed_with(&conn().on_packet(Err(PacketError::InvalidJson("eof".into())), 0), "not valid JSON"));
        assert!(closed_with(&conn().on_packet(Err(PacketError::TooLarge { max: 65536 }), 0), "exceeds"));
        // declined credential: auth:dec, then the node's conn:close
        let mut c = conn();
        c.on_packet(Ok(establish("0.1.0")), 0);
        c.on_packet(Ok(Packet::new(Code::AuthStart).with("cert", "bad")), 0);
        assert_eq!(sent(&c.on_verdict(Err("bad token".into()))), [Code::AuthDec]);
        assert!(matches!(c.on_packet(Ok(Packet::new(Code::ConnClose)), 0)[..], [Action::Close { .. }]));
        // slow client
        let mut c = conn();
        c.on_packet(Ok(establish("0.1.0")), 0);
        assert!(c.on_tick(9_999).is_empty());
        assert!(closed_with(&c.on_tick(10_000), "not finished within"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_packet_sequences_never_panic_and_admit_only_through_the_flow(
            codes in proptest::collection::vec(0usize..7, 0..12),
            verdicts in proptest::collection::vec(proptest::bool::ANY, 0..4),
        ) {
            let mut c = conn();
            let mut v = verdicts.into_iter();
            let mut saw_verify = false;
            for (t, i) in codes.into_iter().enumerate() {
                let code = Code::ALL[i];
                let p = match code {
                    Code::ConnEstablish => establish("0.1.0"),
                    Code::AuthStart => Packet::new(code).with("cert", "dt1.x.y"),
                    _ => Packet::new(code),
                };
                for a in c.on_packet(Ok(p), t as i64) {
                    match a {
                        Action::Verify { .. } => {
                            saw_verify = true;
                            let ok = v.next().unwrap_or(false);
                            c.on_verdict(if ok { Ok(("u".into(), "t".into())) } else { Err("no".into()) });
                        }
                        Action::Admitted { .. } => proptest::prop_assert!(saw_verify, "admitted without a verdict"),
                        _ => {}
                    }
                }
            }
        }
    }
}
