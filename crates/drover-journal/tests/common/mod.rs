//! Shared helpers for the journal's tests: a tiny state machine whose state is the
//! list of inputs it has seen.

#![allow(dead_code)]

use drover_journal::{DecodeError, StateMachine};

/// Remembers every input, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen(pub Vec<u64>);

impl StateMachine for Seen {
    type Input = u64;
    type Output = u64;

    fn apply(&mut self, input: u64, out: &mut Vec<u64>) {
        self.0.push(input);
        out.push(input);
    }
    fn encode_input(input: &u64, buf: &mut Vec<u8>) -> Result<(), drover_journal::EncodeError> {
        buf.extend_from_slice(&input.to_le_bytes());
        Ok(())
    }
    fn decode_input(bytes: &[u8]) -> Result<u64, DecodeError> {
        bytes.try_into().map(u64::from_le_bytes).map_err(|_| DecodeError(format!("{} bytes", bytes.len())))
    }
    fn checkpoint(&self) -> Result<Vec<u8>, drover_journal::EncodeError> {
        Ok(self.0.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        if !bytes.len().is_multiple_of(8) {
            return Err(DecodeError("ragged".into()));
        }
        Ok(Seen(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
    }
}

/// A small deterministic generator (xorshift64*), so failures print a reproducible seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("DROVER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("seed: DROVER_TEST_SEED={seed}");
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
