//! Shared by the drover-raft tests: a tiny core whose state is the sum of its inputs.
#![allow(dead_code)]

use drover_journal::{DecodeError, EncodeError, StateMachine, machine::encode_input};
use drover_raft::Inputs;
use openraft::{CommittedLeaderId, EntryPayload, LogId};

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

impl drover_journal::Divergence for Sum {
    fn first_difference(&self, other: &Self) -> Option<String> {
        (self.0 != other.0).then(|| format!("the sum: {} replayed, {} recorded", self.0, other.0))
    }
}

/// The log id of entry `index` of `term` (led by member 1).
pub fn id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A normal entry committing the inputs `values` (to [`Sum`]).
pub fn normal(term: u64, index: u64, values: &[u64]) -> drover_raft::types::Entry {
    let mut data = Vec::new();
    for v in values {
        data.extend_from_slice(&encode_input::<Sum>(v).unwrap());
    }
    openraft::Entry { log_id: id(term, index), payload: EntryPayload::Normal(Inputs(data)) }
}
