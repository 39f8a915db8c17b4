//! Session tickets: what `auth:ack` hands a node and what `NodeCommandStream` checks
//! (gRPC metadata `authorization: Bearer <ticket>`).
//!
//! A ticket is `dk2.<node id, base64url>.<generation>.<expiry, Unix ms>.<HMAC-SHA256,
//! base64url>`, signed with a 32-byte key kept in the controller's data directory. It
//! binds the node id, the node's admission generation and an expiry; the MAC is checked
//! in constant time. The signature only proves the controller issued it: whether the
//! generation is still the node's current one (not evicted, not revoked, not admitted
//! again since) is the core's to judge when the stream opens, so the expiry is a
//! ceiling, not the only guard. (`dk1` tickets, without a generation, are no longer
//! accepted: their holders pass admission again.)

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The signing key.
#[derive(Clone)]
pub struct TicketKey([u8; 32]);

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

/// Why a ticket was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// Not a ticket at all.
    #[error("malformed ticket")]
    Malformed,
    /// The MAC does not match: forged or tampered with.
    #[error("ticket signature is invalid")]
    BadSignature,
    /// Past its expiry.
    #[error("ticket expired")]
    Expired,
    /// Issued to another node.
    #[error("ticket was issued to another node")]
    WrongNode,
}

impl TicketKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TicketKey(bytes)
    }

    /// A fresh key from the OS's secure random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k)?;
        Ok(TicketKey(k))
    }

    /// The key's bytes (to store it).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, body: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(body.as_bytes());
        mac
    }

    /// A ticket for `node_id` at admission `generation`, valid until `expires_ms`.
    pub fn issue(&self, node_id: &str, generation: u64, expires_ms: i64) -> String {
        let body = format!("dk2.{}.{generation}.{expires_ms}", URL_SAFE_NO_PAD.encode(node_id));
        let tag = self.mac(&body).finalize().into_bytes();
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks a ticket's signature and expiry at time `now_ms`; returns what it claims.
    pub fn verify(&self, ticket: &str, now_ms: i64) -> Result<Claims, TicketError> {
        let (body, tag) = ticket.rsplit_once('.').ok_or(TicketError::Malformed)?;
        let mut parts = body.split('.');
        let (Some("dk2"), Some(node), Some(generation), Some(expiry), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TicketError::Malformed);
        };
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TicketError::Malformed)?;
        self.mac(body).verify_slice(&tag).map_err(|_| TicketError::BadSignature)?;
        let expiry: i64 = expiry.parse().map_err(|_| TicketError::Malformed)?;
        let generation: u64 = generation.parse().map_err(|_| TicketError::Malformed)?;
        if now_ms >= expiry {
            return Err(TicketError::Expired);
        }
        let node = URL_SAFE_NO_PAD.decode(node).map_err(|_| TicketError::Malformed)?;
        let node = String::from_utf8(node).map_err(|_| TicketError::Malformed)?;
        Ok(Claims { node, generation })
    }

    /// Checks a ticket and that it was issued to `node_id`; returns its generation.
    pub fn verify_for(&self, ticket: &str, node_id: &str, now_ms: i64) -> Result<u64, TicketError> {
        let c = self.verify(ticket, now_ms)?;
        if c.node == node_id { Ok(c.generation) } else { Err(TicketError::WrongNode) }
    }
}

/// What a valid ticket says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The node it was issued to.
    pub node: String,
    /// The node's admission generation when it was issued.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_expire_tamper() {
        let k = TicketKey::from_bytes([7; 32]);
        let t = k.issue("node-1", 3, 1_000);
        assert_eq!(k.verify(&t, 999), Ok(Claims { node: "node-1".into(), generation: 3 }));
        assert_eq!(k.verify(&t, 1_000), Err(TicketError::Expired));
        assert_eq!(k.verify_for(&t, "node-2", 10), Err(TicketError::WrongNode));
        assert_eq!(k.verify_for(&t, "node-1", 10), Ok(3));
        // Another key's ticket, or a changed byte anywhere, is refused.
        let other = TicketKey::from_bytes([8; 32]);
        assert_eq!(other.verify(&t, 10), Err(TicketError::BadSignature));
        let forged = t.replace(".1000.", ".9999999999999.");
        assert_eq!(k.verify(&forged, 10), Err(TicketError::BadSignature));
        let regenerated = t.replace(".3.", ".4.");
        assert_eq!(k.verify(&regenerated, 10), Err(TicketError::BadSignature), "the generation is signed");
        let renamed = k.issue("node-1", 3, 1_000).replacen(
            &URL_SAFE_NO_PAD.encode("node-1"),
            &URL_SAFE_NO_PAD.encode("node-2"),
            1,
        );
        assert_eq!(k.verify(&renamed, 10), Err(TicketError::BadSignature));
        for bad in ["", "dk2", "dk2.a.b", "dk2.a.1.b.c.d", "xx2.bm9kZQ.1.1000.AAAA"] {
            assert!(k.verify(bad, 10).is_err(), "{bad}");
        }
        // A dk1 ticket (no generation) from an earlier release is refused as malformed.
        let body = format!("dk1.{}.1000", URL_SAFE_NO_PAD.encode("node-1"));
        let dk1 = format!("{body}.{}", URL_SAFE_NO_PAD.encode(k.mac(&body).finalize().into_bytes()));
        assert_eq!(k.verify(&dk1, 10), Err(TicketError::Malformed));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_verify(s in ".{0,200}") {
            let k = TicketKey::from_bytes([1; 32]);
            proptest::prop_assert!(k.verify(&s, 0).is_err());
        }
    }
}
