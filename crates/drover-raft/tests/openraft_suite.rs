//! openraft's own storage test suite (`openraft::testing::Suite`) against drover's log
//! storage (the journal on real files) and state-machine adapter: every case builds a
//! fresh store in its own temporary directory.

use std::sync::Arc;

mod common;

use common::Sum;
use drover_journal::{FsStorage, Storage};
use drover_raft::log_store::journal_config;
use drover_raft::{RaftLog, RaftMachine, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

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
