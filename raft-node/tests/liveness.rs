//! Liveness under load, over real `tally serve` processes: a follower that freezes or falls far
//! behind while the cluster is busy must not stall the healthy majority's commits or cause an
//! election. These ran into 12-second stalls and term changes before replication deadlines were
//! sized for what a message carries, catch-up messages were bounded in bytes, and the WAL's lock
//! stopped covering fdatasync and catch-up reads.
//!
//! The tests here run one at a time (`SERIAL`): each measures gaps between commits, and a second
//! cluster on the same two cores would measure the other cluster's load, not a stall.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_node::testkit::TestCluster;
use tally_client::{Client, Error, u128_to, v1};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(60);
const ACCOUNTS: u128 = 1000;
/// Transfers per request: big enough that catch-up messages are many MiB.
const BATCH: u128 = 4000;
const WRITERS: u128 = 3;
/// The longest a busy cluster may go without acknowledging a write while one follower is frozen
/// or catching up. An entry here commits every ~100 ms; the design target is no stall over one
/// second, and this bound leaves room for a noisy two-core machine.
const COMMIT_GAP_MAX: Duration = Duration::from_secs(1);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn batch(first_id: u128) -> Vec<v1::Transfer> {
    (first_id..first_id + BATCH)
        .map(|id| v1::Transfer {
            id: u128_to(id),
            debit_account_id: u128_to(1 + id % ACCOUNTS),
            credit_account_id: u128_to(1 + (id + 1) % ACCOUNTS),
            amount: u128_to(1),
            ledger: 1,
            code: 1,
            ..v1::Transfer::default()
        })
        .collect()
}

/// `WRITERS` clients sending batches until `stop`; returns when each write was acknowledged.
fn batch_load(client: Arc<Client>, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<Instant>>> {
    (0..WRITERS)
        .map(|writer| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut id = (writer + 1) << 64;
                while !stop.load(Ordering::Relaxed) {
                    match client.create_transfers(batch(id)).await {
                        Ok(results) => {
                            assert!(results.iter().all(|r| r.status() == v1::CreateTransferStatus::Ok));
                            acknowledged.push(Instant::now());
                            id += BATCH;
                        }
                        // Refused at capacity (the leader paces itself to its followers): a
                        // client retries after the hint; a stall still shows as a long gap.
                        Err(Error::Rejected(status)) if status.code() == tonic::Code::ResourceExhausted => {
                            tokio::time::sleep(pushback(&status)).await;
                        }
                        Err(Error::Unavailable(status)) => panic!("a write timed out under load: {status:?}"),
                        Err(Error::Rejected(status)) => panic!("write rejected: {status:?}"),
                    }
                }
                acknowledged
            })
        })
        .collect()
}

/// How long a refusal at capacity asks the client to wait before it tries again.
fn pushback(status: &tonic::Status) -> Duration {
    let hint = status.metadata().get("grpc-retry-pushback-ms").and_then(|ms| ms.to_str().ok());
    let ms = hint.and_then(|ms| ms.parse().ok());
    Duration::from_millis(
        ms.unwrap_or_else(|| panic!("a refusal at capacity without a retry hint: {status:?}")),
    )
}

async fn setup() -> (TestCluster, Arc<Client>, u64, u64) {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client_of(&[leader], Duration::from_secs(10)));
    let accounts = (1..=ACCOUNTS)
        .map(|id| v1::Account { id: u128_to(id), ledger: 1, code: 1, ..v1::Account::default() })
        .collect();
    client.create_accounts(accounts).await.expect("accounts");
    let term = client.cluster_status().await.expect("status").term;
    (cluster, client, leader, term)
}

/// The longest time between two acknowledged writes, over all writers.
async fn longest_gap(writers: Vec<tokio::task::JoinHandle<Vec<Instant>>>) -> (usize, Duration) {
    let mut times = Vec::new();
    for writer in writers {
        times.extend(writer.await.expect("writer"));
    }
    times.sort();
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    (times.len(), gap)
}

async fn check_no_election_and_convergence(cluster: &TestCluster, client: &Client, leader: u64, term: u64) {
    let status = client.cluster_status().await.expect("status");
    assert_eq!(
        (status.leader_id, status.term),
        (leader, term),
        "an election under load\n{}",
        cluster.log_tails()
    );
    cluster.wait_for_convergence(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_follower_stalls_no_commit_of_the_majority() {
    let _serial = SERIAL.lock().await;
    let (cluster, client, leader, term) = setup().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = batch_load(client.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.freeze(follower);
    tokio::time::sleep(Duration::from_secs(6)).await;
    cluster.thaw(follower);
    // The thawed follower catches up while the load goes on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, gap) = longest_gap(writers).await;
    assert!(gap <= COMMIT_GAP_MAX, "{writes} writes, longest gap {gap:?}\n{}", cluster.log_tails());
    check_no_election_and_convergence(&cluster, &client, leader, term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_without_an_election() {
    let _serial = SERIAL.lock().await;
    let (mut cluster, client, leader, term) = setup().await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    cluster.kill(follower);
    // About 100 MiB of entries that the follower will need, more than one message may carry.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = batch_load(client.clone(), stop.clone());
    let started = Instant::now();
    while cluster.node_statuses().await[&leader].applied_index < 200 {
        assert!(started.elapsed() < DEADLINE, "the load did not get through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.restart(follower);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let (writes, gap) = longest_gap(writers).await;
    assert!(gap <= COMMIT_GAP_MAX, "{writes} writes, longest gap {gap:?}\n{}", cluster.log_tails());
    check_no_election_and_convergence(&cluster, &client, leader, term).await;
}
