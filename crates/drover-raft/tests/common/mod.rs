//! Shared by the drover-raft tests: a tiny core whose state is the sum of its inputs.
#![allow(dead_code)]

use drover_journal::{DecodeError, EncodeError, StateMachine};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sum(pub u64);

impl StateMachine for Sum {
    type Input = u64;
    type Output = u64;
    fn apply(&mut self, input: u64, out: &mut Vec<u64>) {
        self.0 += input;
        out.push(self.0);
    }
    fn encode_input(input: &u64, buf: &mut Vec<u8>) -> Result<(), EncodeError> {
        buf.extend_from_slice(&input.to_le_bytes());
        Ok(())
    }
    fn decode_input(bytes: &[u8]) -> Result<u64, DecodeError> {
        bytes.try_into().map(u64::from_le_bytes).map_err(|_| DecodeError("not 8 bytes".into()))
    }
    fn checkpoint(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(self.0.to_le_bytes().to_vec())
    }
    fn restore(bytes: &[u8]) -> Result<Self, DecodeError> {
        Sum::decode_input(bytes).map(Sum)
    }
}
