//! The node's side of an admission connection, sans-IO.

use drover_wire::admission::{Code, Packet, PacketError};

/// What the node's I/O must do.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeAction {
    /// Send this packet.
    Send(Packet),
    /// Admitted: open `NodeCommandStream` at `upstream` with `ticket`.
    Admitted {
        /// The gRPC address to use.
        upstream: String,
        /// The session ticket.
        ticket: String,
    },
    /// Already admitted: move to another upstream with a new ticket.
    Moved {
        /// The new gRPC address.
        upstream: String,
        /// The new ticket.
        ticket: String,
    },
    /// The credential was refused (`auth:dec`).
    Denied {
        /// The controller's reason.
        reason: String,
    },
    /// The controller closed the connection (`conn:close`): refused version, eviction…
    Closed {
        /// The controller's reason.
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Start,
    Established,
    AuthSent,
    Admitted,
    Done,
}

/// One admission connection, node side.
#[derive(Debug)]
pub struct NodeConn {
    id: String,
    version: String,
    credential: String,
    state: State,
}

impl NodeConn {
    /// A node with this id, version and credential (join token or PEM chain).
    pub fn new(id: impl Into<String>, version: impl Into<String>, credential: impl Into<String>) -> Self {
        NodeConn { id: id.into(), version: version.into(), credential: credential.into(), state: State::Start }
    }

    /// The first packet: `conn:establish`.
    pub fn start(&mut self) -> Vec<NodeAction> {
        self.state = State::Established;
        vec![NodeAction::Send(
            Packet::new(Code::ConnEstablish)
                .with("id", self.id.clone())
                .with("version", self.version.clone())
                .with("type", "node"),
        )]
    }

    /// A packet (or decode error) from the controller.
    pub fn on_packet(&mut self, packet: Result<Packet, PacketError>) -> Vec<NodeAction> {
        let p = match packet {
            Ok(p) => p,
            Err(e) => {
                self.state = State::Done;
                let reason = format!("bad packet from the controller: {e}");
                return vec![
                    NodeAction::Send(Packet::new(Code::ConnClose).with("reason", reason.clone())),
                    NodeAction::Closed { reason },
                ];
            }
        };
        let reason = || p.str_field("reason").unwrap_or("no reason given").to_owned();
        match (&self.state, p.code) {
            (_, Code::ConnClose) => {
                self.state = State::Done;
                vec![NodeAction::Closed { reason: reason() }]
            }
            (State::Established, Code::ConnStartAuth) => {
                self.state = State::AuthSent;
                vec![NodeAction::Send(Packet::new(Code::AuthStart).with("cert", self.credential.clone()))]
            }
            (State::AuthSent, Code::AuthAck) | (State::Admitted, Code::AuthAck) => {
                let (Some(upstream), Some(ticket)) = (p.str_field("upstream"), p.str_field("ticket")) else {
                    self.state = State::Done;
                    let reason = "auth:ack without upstream and ticket".to_string();
                    return vec![
                        NodeAction::Send(Packet::new(Code::ConnClose).with("reason", reason.clone())),
                        NodeAction::Closed { reason },
                    ];
                };
                let (upstream, ticket) = (upstream.to_owned(), ticket.to_owned());
                if self.state == State::Admitted {
                    return vec![NodeAction::Moved { upstream, ticket }];
                }
                self.state = State::Admitted;
                vec![NodeAction::Send(Packet::new(Code::AuthAck)), NodeAction::Admitted { upstream, ticket }]
            }
            (State::AuthSent, Code::AuthDec) => {
                self.state = State::Done;
                vec![
                    NodeAction::Send(Packet::new(Code::ConnClose).with("reason", "credential refused")),
                    NodeAction::Denied { reason: reason() },
                ]
            }
            (State::Admitted, Code::ConnAlive) => Vec::new(),
            (_, code) => {
                self.state = State::Done;
                let reason = format!("unexpected {code} from the controller");
                vec![
                    NodeAction::Send(Packet::new(Code::ConnClose).with("reason", reason.clone())),
                    NodeAction::Closed { reason },
                ]
            }
        }
    }

    /// A keepalive, once admitted.
    pub fn alive(&self) -> Option<Packet> {
        (self.state == State::Admitted).then(|| Packet::new(Code::ConnAlive))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Action, ServerConfig, ServerConn};
    use crate::version::{Version, VersionPolicy};

    /// Runs a node and a controller state machine against each other.
    fn handshake(verdict: Result<(String, String), String>, node_version: &str) -> (Vec<NodeAction>, Vec<Action>) {
        let v = Version::parse("0.1.0").unwrap();
        let mut server = ServerConn::new(
            ServerConfig { policy: VersionPolicy { controller: v, min_node: v }, handshake_deadline_ms: 10_000 },
            0,
        );
        let mut node = NodeConn::new("n1", node_version, "dt1.0123456789ab.secretsecretsecret");
        let mut to_server: Vec<Packet> = Vec::new();
        let mut node_log = Vec::new();
        let mut server_log = Vec::new();
        for a in node.start() {
            if let NodeAction::Send(p) = a {
                to_server.push(p)
            }
        }
        let mut verdict = Some(verdict);
        for _ in 0..10 {
            let mut to_node = Vec::new();
            for p in to_server.drain(..) {
                for a in server.on_packet(Ok(p), 1) {
                    match &a {
                        Action::Send(p) => to_node.push(p.clone()),
                        Action::Verify { .. } => {
                            for a in server.on_verdict(verdict.take().expect("one verdict")) {
                                if let Action::Send(p) = &a {
                                    to_node.push(p.clone())
                                }
                                server_log.push(a);
                            }
                        }
                        _ => {}
                    }
                    server_log.push(a);
                }
            }
            for p in to_node {
                for a in node.on_packet(Ok(p)) {
                    if let NodeAction::Send(p) = &a {
                        to_server.push(p.clone())
                    }
                    node_log.push(a);
                }
            }
        }
        (node_log, server_log)
    }

    #[test]
    fn node_and_controller_complete_the_seed_flow() {
        let (node, server) = handshake(Ok(("127.0.0.1:7400".into(), "tkt".into())), "0.1.0");
        assert!(node.contains(&NodeAction::Admitted { upstream: "127.0.0.1:7400".into(), ticket: "tkt".into() }));
        assert!(server.contains(&Action::Admitted { node: "n1".into() }));
    }

    #[test]
    fn denied_and_refused_versions() {
        let (node, server) = handshake(Err("unknown token".into()), "0.1.0");
        assert!(node.contains(&NodeAction::Denied { reason: "unknown token".into() }));
        assert!(server.iter().any(|a| matches!(a, Action::Close { .. })), "{server:?}");
        let (node, _) = handshake(Ok(("x".into(), "y".into())), "7.0.0");
        assert!(
            node.iter().any(|a| matches!(a, NodeAction::Closed { reason } if reason.contains("incompatible"))),
            "{node:?}"
        );
    }
}
