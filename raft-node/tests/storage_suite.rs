//! openraft's own storage test suite against our WAL-backed log store and sled state machine.

use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};
use raft_node::storage::log_store::LogStore;
use raft_node::storage::state_machine::StateMachine;
use raft_node::types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = LogStore::open(&dir.path().join("wal")).expect("open the log store");
        let machine = StateMachine::open(dir.path(), raft_node::node::default_cache_bytes())
            .expect("open the state machine");
        Ok((dir, log, machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("openraft's storage suite");
}
