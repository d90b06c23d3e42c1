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

/// Snapshot files a dead process was receiving or building are removed when the node starts;
/// snapshots themselves stay.
#[test]
fn leftover_snapshot_files_are_removed_at_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    for name in ["incoming-4242-0.tmp", "incoming-4242-1.tmp", "building.tmp", "keep.snap"] {
        std::fs::write(snapshots.join(name), b"partial").unwrap();
    }
    let _machine = StateMachine::open(dir.path(), raft_node::node::default_cache_bytes()).expect("open");
    let mut left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["keep.snap"]);
}
