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
        let machine =
            StateMachine::open(dir.path(), raft_node::node::default_cache_bytes(), Default::default())
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
    let _machine = StateMachine::open(dir.path(), raft_node::node::default_cache_bytes(), Default::default())
        .expect("open");
    let mut left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["keep.snap"]);
}

async fn apply_blanks(machine: &mut StateMachine, indexes: std::ops::RangeInclusive<u64>) {
    use openraft::storage::RaftStateMachine;
    let entries: Vec<_> =
        indexes.map(|index| Ok((openraft::testing::blank_ent::<TypeConfig>(1, 1, index), None))).collect();
    machine.apply(futures::stream::iter(entries)).await.expect("apply");
}

fn applied_index(machine: &StateMachine) -> Option<u64> {
    machine.shared.applied().last_applied.map(|id| id.index)
}

/// A snapshot whose file is damaged is refused before it becomes current: the old state and
/// the old current snapshot stay, and the node opens again. (Made current first, the damaged
/// file was imported again at every start, which failed: the node never started again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_refused_and_the_old_state_kept() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use raft_node::storage::state_machine::SnapshotFile;
    let cache = raft_node::node::default_cache_bytes();
    let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut leader = StateMachine::open(leader_dir.path(), cache, Default::default()).unwrap();
    apply_blanks(&mut leader, 1..=9).await;
    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.expect("build");

    let mut follower = StateMachine::open(follower_dir.path(), cache, Default::default()).unwrap();
    apply_blanks(&mut follower, 1..=3).await;
    let own = follower.get_snapshot_builder().await.build_snapshot().await.expect("build");
    let mut bytes = std::fs::read(&snapshot.snapshot.path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    let received = follower_dir.path().join("snapshots").join("incoming-1-0.tmp");
    std::fs::write(&received, &bytes).unwrap();
    let refused = follower
        .install_snapshot(&snapshot.meta, SnapshotFile { path: received })
        .await
        .expect_err("damaged");
    assert!(refused.to_string().contains("checksum"), "{refused}");
    assert_eq!(applied_index(&follower), Some(3));
    let current = follower.get_current_snapshot().await.unwrap().expect("a current snapshot");
    assert_eq!(current.meta.last_log_id, own.meta.last_log_id);
    drop(follower);

    let mut reopened = StateMachine::open(follower_dir.path(), cache, Default::default())
        .expect("opens after a refused install");
    assert_eq!(applied_index(&reopened), Some(3));
    assert!(!follower_dir.path().join("state.new").exists());

    // The same snapshot undamaged installs, and is what the node opens with.
    let received = follower_dir.path().join("snapshots").join("incoming-1-1.tmp");
    std::fs::copy(&snapshot.snapshot.path, &received).unwrap();
    reopened.install_snapshot(&snapshot.meta, SnapshotFile { path: received }).await.expect("install");
    drop(reopened);
    let reopened = StateMachine::open(follower_dir.path(), cache, Default::default()).unwrap();
    assert_eq!(applied_index(&reopened), Some(9));
}
