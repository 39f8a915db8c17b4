//! The cluster secret: what a replica must prove it holds before it may speak Raft.
//!
//! Every member reads the same file (`--cluster-secret-file`; `drover cluster secret`
//! makes one: 32 random bytes as 64 hex digits). Each Raft connection starts with a
//! mutual challenge, before any Raft message is read:
//!
//! 1. the connecting side sends `DRVRAFT1` and a fresh 16-byte nonce `a`;
//! 2. the listening side answers with its own fresh nonce `b` and
//!    `HMAC-SHA256(secret, "listener" · a · b)`;
//! 3. the connecting side checks it and answers `HMAC-SHA256(secret, "connector" · b · a)`;
//! 4. the listening side checks that, then serves Raft requests.
//!
//! Fresh nonces on both sides make a recorded exchange useless; the MACs are compared
//! in constant time. A side that fails the check closes the connection and logs it. The
//! messages after the handshake are not encrypted or authenticated one by one: that is
//! what mutual TLS on this port is for; the secret keeps nodes, CLIs and strangers from
//! speaking the protocol at all.

use std::path::Path;

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type HmacSha256 = hmac::Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"DRVRAFT1";
const NONCE: usize = 16;
const TAG: usize = 32;

/// The cluster secret.
#[derive(Clone)]
pub struct ClusterSecret([u8; 32]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// Why a secret could not be made or read, or a peer was not let in.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The system's random source failed.
    #[error("no randomness: {0}")]
    Random(String),
    /// The file could not be read.
    #[error("reading the cluster secret {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error("the cluster secret file {0} must hold 64 hex digits (make one with `drover cluster secret`)")]
    Malformed(String),
    /// The connection failed during the handshake.
    #[error("handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not hold the cluster secret (or does not speak this protocol).
    #[error("the peer failed the cluster-secret check")]
    Refused,
}

fn nonce() -> Result<[u8; NONCE], SecretError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(n)
}

impl ClusterSecret {
    /// A new random secret.
    pub fn generate() -> Result<ClusterSecret, SecretError> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(ClusterSecret(k))
    }

    /// The secret as the file holds it.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str, origin: &str) -> Result<ClusterSecret, SecretError> {
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SecretError::Malformed(origin.to_owned()));
        }
        let mut k = [0u8; 32];
        for (i, chunk) in t.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| SecretError::Malformed(origin.to_owned()))?;
            k[i] = u8::from_str_radix(hex, 16).map_err(|_| SecretError::Malformed(origin.to_owned()))?;
        }
        Ok(ClusterSecret(k))
    }

    /// Reads a secret file.
    pub fn from_file(path: &Path) -> Result<ClusterSecret, SecretError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SecretError::Read { path: path.display().to_string(), source })?;
        ClusterSecret::from_hex(&text, &path.display().to_string())
    }

    /// A 32-byte key for `purpose`, the same on every member holding this secret
    /// (HMAC-SHA256 of the purpose under the secret): the cluster's shared keys (the
    /// ticket signing key, the task-secret sealing key) come from here, so they are
    /// cluster state without ever being written to the log.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        self.mac(b"drover derive ", purpose.as_bytes(), &[]).finalize().into_bytes().into()
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> HmacSha256 {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(first);
        m.update(second);
        m
    }

    /// The connecting side of the handshake.
    pub async fn prove_as_connector<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
        &self,
        s: &mut S,
    ) -> Result<(), SecretError> {
        let a = nonce()?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&a);
        s.write_all(&hello).await?;
        let mut answer = [0u8; NONCE + TAG];
        s.read_exact(&mut answer).await?;
        let (b, tag) = answer.split_at(NONCE);
        self.mac(b"listener", &a, b).verify_slice(tag).map_err(|_| SecretError::Refused)?;
        s.write_all(&self.mac(b"connector", b, &a).finalize().into_bytes()).await?;
        Ok(())
    }

    /// The listening side of the handshake.
    pub async fn prove_as_listener<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
        &self,
        s: &mut S,
    ) -> Result<(), SecretError> {
        let mut hello = [0u8; 8 + NONCE];
        s.read_exact(&mut hello).await?;
        if &hello[..8] != MAGIC {
            return Err(SecretError::Refused);
        }
        let a = &hello[8..];
        let b = nonce()?;
        let mut answer = b.to_vec();
        answer.extend_from_slice(&self.mac(b"listener", a, &b).finalize().into_bytes());
        s.write_all(&answer).await?;
        let mut tag = [0u8; TAG];
        s.read_exact(&mut tag).await?;
        self.mac(b"connector", &b, a).verify_slice(&tag).map_err(|_| SecretError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_per_purpose_and_the_same_for_every_holder() {
        let s = ClusterSecret::generate().unwrap();
        let copy = ClusterSecret::from_hex(&s.to_hex(), "copy").unwrap();
        assert_eq!(s.derive("ticket"), copy.derive("ticket"));
        assert_ne!(s.derive("ticket"), s.derive("seal"));
        assert_ne!(s.derive("ticket"), ClusterSecret::generate().unwrap().derive("ticket"));
    }

    #[test]
    fn hex_round_trips_and_bad_files_are_refused_by_name() {
        let s = ClusterSecret::generate().unwrap();
        assert_eq!(ClusterSecret::from_hex(&format!("{}\n", s.to_hex()), "f").unwrap().0, s.0);
        for bad in ["", "abc", &"g".repeat(64), &"0".repeat(63)] {
            let err = ClusterSecret::from_hex(bad, "secret.txt").unwrap_err().to_string();
            assert!(err.contains("secret.txt") && err.contains("64 hex digits"), "{err}");
        }
        assert_eq!(format!("{s:?}"), "ClusterSecret(..)", "never printed");
    }
}
