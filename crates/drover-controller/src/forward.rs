//! What a member that does not lead passes on to the leader, over the Raft port
//! (`drover_raft::network::Forwarder`): the decisions that change the fleet's state and
//! so must be the leader's, today an admission (a token's use, a node's generation, a
//! refusal counted against the peer's address). The follower keeps what it can do
//! itself: the TLS session and a certificate's check, the seed 3 handshake, the
//! ticket's signature (the signing key is derived from the cluster secret on every
//! member), and the node's control channel afterwards.
//!
//! The bytes are postcard of [`Forwarded`] and [`Answer`]; they come from an
//! authenticated member but are decoded as untrusted input: an undecodable or
//! oversized request is refused with a typed reason, never a panic.

use std::net::IpAddr;
use std::sync::Arc;

use drover_raft::network::{ForwardFuture, ForwardHandler};
use serde::{Deserialize, Serialize};

use crate::owner::{Inbox, ShellEvent};

/// The longest forwarded request decoded (an admission is a few hundred bytes; a PEM
/// credential's refusal reason a few more).
pub(crate) const MAX_FORWARDED: usize = 64 << 10;

/// A request a follower forwards.
#[derive(Serialize, Deserialize)]
pub(crate) enum Forwarded {
    /// A node presented a credential at this follower's admission port.
    Admission {
        /// The node id it asked for.
        node: String,
        /// The credential, or why it is not one (counted against the peer).
        presented: Result<drover_core::Credential, String>,
        /// The node's address, as the follower saw it (the rate limit's key).
        peer: IpAddr,
    },
}

/// The leader's answer.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(crate) enum Answer {
    /// `Ok`: admitted at this generation, to reach the leader's gRPC at `upstream`;
    /// `Err`: refused.
    Admission(Result<Admitted, Refused>),
}

/// An admission the leader refused.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(crate) struct Refused {
    /// As the node is told it.
    pub(crate) reason: String,
    /// The member asked does not lead (any more): the node should retry, not give up.
    pub(crate) retry: bool,
}

/// An admission the leader granted.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub(crate) struct Admitted {
    /// The node's admission generation (its tickets must carry it).
    pub(crate) generation: u64,
    /// The leader's gRPC address.
    pub(crate) upstream: String,
}

/// Why a forwarded request was refused before it reached the owner.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum ForwardRefusal {
    #[error("forwarded request of {0} bytes is over the limit of {MAX_FORWARDED}")]
    TooLarge(usize),
    #[error("undecodable forwarded request: {0}")]
    Undecodable(String),
    #[error("the controller is stopping")]
    Stopping,
}

/// Decodes a forwarded request (bounded, typed errors).
pub(crate) fn decode(body: &[u8]) -> Result<Forwarded, ForwardRefusal> {
    if body.len() > MAX_FORWARDED {
        return Err(ForwardRefusal::TooLarge(body.len()));
    }
    postcard::from_bytes(body).map_err(|e| ForwardRefusal::Undecodable(e.to_string()))
}

/// Encodes a value of this protocol.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Postcard cannot fail on these types (no maps with non-string keys, no
    // unsupported types); an empty request would be refused by the leader as such.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes the leader's answer.
pub(crate) fn decode_answer(body: &[u8]) -> Result<Answer, ForwardRefusal> {
    postcard::from_bytes(body).map_err(|e| ForwardRefusal::Undecodable(e.to_string()))
}

/// The leader's side: every forwarded admission goes to the owner as if it had come to
/// this member's own admission port (a member that does not lead refuses it there,
/// naming the leader); `upstream` is this member's gRPC address as nodes reach it.
pub(crate) fn handler(events: Inbox, upstream: String) -> ForwardHandler {
    Arc::new(move |body: Vec<u8>| -> ForwardFuture {
        let (events, upstream) = (events.clone(), upstream.clone());
        Box::pin(async move {
            let request = decode(&body).map_err(|e| {
                tracing::warn!(error = %e, "forwarded request refused");
                e.to_string()
            })?;
            match request {
                Forwarded::Admission { node, presented, peer } => {
                    let (reply, verdict) = tokio::sync::oneshot::channel();
                    let ask = ShellEvent::Admission { node, presented, peer, reply };
                    events.send(ask).await.map_err(|_| ForwardRefusal::Stopping.to_string())?;
                    let verdict = verdict.await.map_err(|_| ForwardRefusal::Stopping.to_string())?;
                    let answer =
                        Answer::Admission(verdict.map(|generation| Admitted { generation, upstream }).map_err(|r| {
                            Refused {
                                retry: matches!(r, drover_core::AdmissionRefusal::NotLeader(_)),
                                reason: r.to_string(),
                            }
                        }));
                    Ok(encode(&answer))
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_bytes_are_typed_refusals() {
        let req = Forwarded::Admission {
            node: "n1".into(),
            presented: Ok(drover_core::Credential::Token { id: "t".into(), secret_hash: [7; 32] }),
            peer: "10.0.0.1".parse().unwrap(),
        };
        let Forwarded::Admission { node, presented, peer } = decode(&encode(&req)).unwrap();
        assert_eq!((node.as_str(), peer.to_string().as_str()), ("n1", "10.0.0.1"));
        assert_eq!(presented, Ok(drover_core::Credential::Token { id: "t".into(), secret_hash: [7; 32] }));
        assert!(matches!(decode(&[0xff, 0xff, 0xff]), Err(ForwardRefusal::Undecodable(_))));
        assert!(matches!(decode(&[]), Err(ForwardRefusal::Undecodable(_))));
        assert_eq!(decode(&vec![0; MAX_FORWARDED + 1]).err(), Some(ForwardRefusal::TooLarge(MAX_FORWARDED + 1)));
        let answer = Answer::Admission(Ok(Admitted { generation: 3, upstream: "a:1".into() }));
        assert_eq!(decode_answer(&encode(&answer)).unwrap(), answer);
        // Any prefix of a valid request is refused, not misread.
        let bytes = encode(&req);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
    }
}
