//! Join and operator tokens.
//!
//! A token reads `dt1.<id>.<secret>`: the id (12 hex digits) names it in listings and
//! revocations and may be logged; the secret (32 random bytes, base64url) is shown once
//! at creation and never stored: the controller keeps only its SHA-256, and compares
//! hashes in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A token as presented, split into its parts.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented {
    /// The public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hash is not the secret, but keep even that out of debug output.
        f.debug_struct("Presented").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A string that is not a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a drover token (expected dt1.<id>.<secret>)")]
pub struct NotAToken;

/// SHA-256 of a secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Splits a presented token and hashes its secret.
pub fn parse(token: &str) -> Result<Presented, NotAToken> {
    let mut parts = token.trim().splitn(3, '.');
    let (Some("dt1"), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NotAToken);
    };
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() < 16 || secret.len() > 128 {
        return Err(NotAToken);
    }
    Ok(Presented { id: id.to_owned(), secret_hash: hash_secret(secret) })
}

/// Whether two secret hashes are equal, in constant time.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// A freshly generated token: the string to hand out once, its id and the hash to keep.
#[derive(Clone)]
pub struct NewToken {
    /// `dt1.<id>.<secret>`: show once, never store.
    pub token: String,
    /// The public id.
    pub id: String,
    /// SHA-256 of the secret, to store.
    pub secret_hash: [u8; 32],
}

/// Generates a token from the OS's secure random source.
pub fn generate() -> Result<NewToken, getrandom::Error> {
    let mut raw = [0u8; 38];
    getrandom::fill(&mut raw)?;
    let id: String = raw[..6].iter().map(|b| format!("{b:02x}")).collect();
    let secret = URL_SAFE_NO_PAD.encode(&raw[6..]);
    let secret_hash = hash_secret(&secret);
    Ok(NewToken { token: format!("dt1.{id}.{secret}"), id, secret_hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_compare() {
        let t = generate().unwrap();
        let p = parse(&t.token).unwrap();
        assert_eq!(p.id, t.id);
        assert!(hashes_equal(&p.secret_hash, &t.secret_hash));
        let other = generate().unwrap();
        assert_ne!(other.id, t.id);
        assert!(!hashes_equal(&parse(&other.token).unwrap().secret_hash, &t.secret_hash));
        assert!(!format!("{p:?}").contains(&t.token[17..]), "debug output leaks nothing");
    }

    #[test]
    fn malformed_tokens() {
        for bad in [
            "",
            "dt1",
            "dt1.abc.def",
            "dt2.0123456789ab.secretsecretsecret",
            "dt1.0123456789zz.secretsecretsecret",
            "-----BEGIN",
        ] {
            assert_eq!(parse(bad), Err(NotAToken), "{bad}");
        }
    }
}
