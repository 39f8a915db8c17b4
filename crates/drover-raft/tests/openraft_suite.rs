//! openraft's own storage test suite (`openraft::testing::Suite`) against drover's log
//! storage (the journal on real files) and state-machine adapter: every case builds a
//! fresh store in its own temporary directory.

use std::sync::Arc;

use drover_journal::{DecodeError, EncodeError, FsStorage, StateMachine, Storage};
use drover_raft::log_store::journal_config;
use drover_raft::{RaftLog, RaftMachine, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

/// A tiny core: the sum of its inputs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Sum(u64);

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

struct Builder;

impl StoreBuilder<TypeConfig, RaftLog, RaftMachine<Sum>, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, RaftLog, RaftMachine<Sum>), openraft::StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage: Arc<dyn Storage> = Arc::new(FsStorage);
        let log = RaftLog::open(journal_config(dir.path().join("journal")), storage.clone()).expect("open the log");
        let machine = RaftMachine::open(dir.path().join("journal"), storage, Sum::default).expect("open the machine");
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_journal() {
    Suite::test_all(Builder).unwrap();
}
