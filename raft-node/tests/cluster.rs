//! A real cluster: `tally serve` processes on 127.0.0.1 talking gRPC, in three sites.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_node::security::roles::Role;
use raft_node::testkit::TestCluster;
use tally_client::{Client, Error, Security, u128_from, u128_to, v1};

mod common;

use common::raw_grpc_call;

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(30);
const LEDGER: u32 = 1;
/// Every account starts funded from this one, which may go negative.
const BANK: u128 = 1;

fn account(id: u128) -> v1::Account {
    v1::Account { id: u128_to(id), ledger: LEDGER, code: 1, ..v1::Account::default() }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> v1::Transfer {
    v1::Transfer {
        id: u128_to(id),
        debit_account_id: u128_to(debit),
        credit_account_id: u128_to(credit),
        amount: u128_to(amount),
        ledger: LEDGER,
        code: 1,
        ..v1::Transfer::default()
    }
}

fn statuses(results: &[v1::CreateTransferResult]) -> Vec<v1::CreateTransferStatus> {
    results.iter().map(|r| r.status()).collect()
}

async fn create_accounts(client: &Client, ids: impl Iterator<Item = u128>) {
    let results = client.create_accounts(ids.map(account).collect()).await.expect("create accounts");
    assert!(results.iter().all(|r| r.status() == v1::CreateAccountStatus::Ok), "{results:?}");
}

/// Balances (credits - debits, posted) of `ids` as each running node sees them locally.
async fn local_balances(cluster: &TestCluster, ids: &[u128]) -> BTreeMap<u64, Vec<i128>> {
    let mut seen = BTreeMap::new();
    for (id, node) in &cluster.nodes {
        if !cluster.is_running(*id) {
            continue;
        }
        let client =
            Client::new(std::slice::from_ref(&node.address), Duration::from_secs(5), &cluster.security())
                .unwrap();
        let accounts = client.lookup_accounts(ids, v1::ReadConsistency::Local).await.expect("local lookup");
        let balances = accounts
            .iter()
            .map(|a| {
                u128_from(a.credits_posted.as_ref()) as i128 - u128_from(a.debits_posted.as_ref()) as i128
            })
            .collect();
        seen.insert(*id, balances);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_follower_reach_every_node() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let client = cluster.client_of(&[follower], Duration::from_secs(10));
    create_accounts(&client, 1..=4).await;
    let transfers = vec![transfer(10, BANK, 2, 100), transfer(11, BANK, 3, 50), transfer(12, 2, 4, 30)];
    let results = client.create_transfers(transfers).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok; 3]);
    // A linearizable read through the follower sees the write at once.
    let accounts = client.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(u128_from(accounts[0].credits_posted.as_ref()), 100);

    let digest = cluster.wait_for_convergence(DEADLINE).await;
    assert_eq!(digest.len(), 64);
    let balances = local_balances(&cluster, &[1, 2, 3, 4]).await;
    assert_eq!(balances.len(), 3);
    for seen in balances.values() {
        assert_eq!(seen, &vec![-150, 70, 50, 30]);
    }
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert!(status.sites.iter().all(|s| s.survives_loss), "{:?}", status.sites);
}

/// Writes transfers of 1 from BANK to account 2 in a loop, recording the ids acknowledged.
fn write_load(
    client: Arc<Client>,
    stop: Arc<AtomicBool>,
    first_id: u128,
) -> tokio::task::JoinHandle<(Vec<u128>, Vec<Instant>)> {
    tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        let mut times = Vec::new();
        let mut id = first_id;
        while !stop.load(Ordering::Relaxed) {
            match client.create_transfers(vec![transfer(id, BANK, 2, 1)]).await {
                Ok(results) => {
                    let status = results[0].status();
                    assert!(
                        status == v1::CreateTransferStatus::Ok || status == v1::CreateTransferStatus::Exists,
                        "{status:?}"
                    );
                    acknowledged.push(id);
                    times.push(Instant::now());
                    id += 1;
                }
                // Unknown outcome: retry the same id (idempotent), which the loop does.
                Err(Error::Unavailable(_)) => {}
                Err(Error::Rejected(status)) => panic!("write rejected: {status:?}"),
            }
        }
        (acknowledged, times)
    })
}

// Covered by tally-sim on every seed (docs/simulation.md); out of the default set.
#[cfg(feature = "covered-by-sim")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_loses_nothing_and_the_node_catches_up() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = write_load(client.clone(), stop.clone(), 1000);
    // Let some writes land, then kill the leader mid-load.
    let started = Instant::now();
    while cluster.node_statuses().await.values().map(|s| s.applied_index).min().unwrap_or(0) < 20 {
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    assert_ne!(new_leader, leader);
    // Writes continue on the new leader; let some land before the old one comes back.
    let count_at_kill = cluster.node_statuses().await.values().map(|s| s.applied_index).max().unwrap_or(0);
    let started = Instant::now();
    while cluster.node_statuses().await.values().map(|s| s.applied_index).max().unwrap_or(0)
        < count_at_kill + 20
    {
        assert!(started.elapsed() < DEADLINE, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.restart(leader);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, times) = load.await.unwrap();
    let after_kill = times.iter().find(|t| **t > killed_at).expect("a write succeeded after the kill");
    eprintln!("first write after SIGKILL of the leader: {:?}", *after_kill - killed_at);
    assert!(acknowledged.len() > 20);

    // Nothing acknowledged is lost: every transfer is there, and the balance is exactly their sum.
    let found = client.lookup_transfers(&acknowledged, v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(found.len(), acknowledged.len(), "acknowledged transfers are missing");
    let accounts = client.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(
        u128_from(accounts[0].credits_posted.as_ref()),
        acknowledged.len() as u128,
        "a transfer applied twice or lost"
    );

    // A retry of acknowledged transfers through the new leader answers `exists` and moves nothing.
    let retry: Vec<v1::Transfer> = acknowledged.iter().take(50).map(|id| transfer(*id, BANK, 2, 1)).collect();
    let results = client.create_transfers(retry).await.unwrap();
    assert!(results.iter().all(|r| r.status() == v1::CreateTransferStatus::Exists), "{results:?}");
    let again = client.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(again, accounts);

    // The killed node came back and caught up: all three agree.
    cluster.wait_for_convergence(DEADLINE).await;
}

/// Applying is memory work, and the state reaches sled in checkpoints: a follower, then the
/// leader, SIGKILLed while writes are acknowledged, restart, re-apply their log from their last
/// checkpoint and reach the same applied index and running digest as the others, with every
/// acknowledged transfer there once. Once with no checkpoint written before the kills (every ten
/// minutes: the whole log is re-applied), once with checkpoints every 200 ms (the log after the
/// last one is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_between_checkpoints_replays_its_log_to_the_same_digest() {
    for interval_ms in ["600000", "200"] {
        let checkpoints = interval_ms == "200";
        let mut cluster =
            TestCluster::start(Path::new(TALLY), &SITES, &["--checkpoint-interval-ms", interval_ms]);
        let leader = cluster.wait_for_leader(DEADLINE).await;
        let client = Arc::new(cluster.client(Duration::from_secs(10)));
        create_accounts(&client, 1..=2).await;
        let stop = Arc::new(AtomicBool::new(false));
        let load = write_load(client.clone(), stop.clone(), 1000);
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        for victim in [follower, leader] {
            wait_for_writes(&cluster, 100).await;
            let started = Instant::now();
            let written = loop {
                let metrics = cluster.scrape(victim).await;
                let written = sample(&metrics, "tally_checkpoint_seconds_count", None);
                if !checkpoints || written > 0.0 || started.elapsed() > DEADLINE {
                    break written;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(written > 0.0, checkpoints, "node {victim}: {written} checkpoints written");
            cluster.kill(victim);
            cluster.wait_for_leader(DEADLINE).await;
            wait_for_writes(&cluster, 50).await;
            cluster.restart(victim);
        }
        wait_for_writes(&cluster, 50).await;
        stop.store(true, Ordering::Relaxed);
        let (acknowledged, _) = load.await.unwrap();
        cluster.wait_for_convergence(DEADLINE).await;
        let balances = local_balances(&cluster, &[2]).await;
        assert_eq!(balances.len(), 3);
        for (id, balance) in &balances {
            assert_eq!(balance[0], acknowledged.len() as i128, "node {id}: {balances:?}");
        }
        let found = client.lookup_transfers(&acknowledged, v1::ReadConsistency::Linearizable).await.unwrap();
        assert_eq!(found.len(), acknowledged.len(), "acknowledged transfers are missing");
    }
}

/// Waits until some node has applied `count` entries more than when called.
async fn wait_for_writes(cluster: &TestCluster, count: u64) {
    let applied_max = |statuses: BTreeMap<u64, v1::NodeStatus>| {
        statuses.values().map(|s| s.applied_index).max().unwrap_or(0)
    };
    let before = applied_max(cluster.node_statuses().await);
    let started = Instant::now();
    while applied_max(cluster.node_statuses().await) < before + count {
        assert!(started.elapsed() < DEADLINE, "writes did not flow\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A snapshot every 40 entries, and the log behind it purged down to 5 entries: nothing kept by
/// bytes or age.
const SNAPSHOT_AND_PURGE_OFTEN: [&str; 8] = [
    "--snapshot-entries",
    "40",
    "--snapshot-log-keep",
    "5",
    "--log-keep-bytes",
    "0",
    "--log-keep-time",
    "0s",
];

// Covered by tally-sim on every seed (docs/simulation.md); out of the default set.
#[cfg(feature = "covered-by-sim")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_purged_log_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &SNAPSHOT_AND_PURGE_OFTEN);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let client = cluster.client_of(&[leader], Duration::from_secs(10));
    create_accounts(&client, 1..=3).await;
    cluster.kill(lagging);
    // Enough separate entries for several snapshots, each purging the log behind it. One request
    // at a time, so that each is an entry of its own: concurrent writers were coalesced into too
    // few entries once applying got fast, and no snapshot purged the log.
    for i in 0..240u128 {
        let results = client.create_transfers(vec![transfer(10_000 + i, BANK, 2 + i % 2, 1)]).await.unwrap();
        assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    }
    cluster.restart(lagging);
    cluster.wait_for_convergence(DEADLINE).await;
    let snapshots = std::fs::read_dir(cluster.nodes[&lagging].data_dir.join("snapshots")).unwrap();
    assert!(
        snapshots.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "snap")),
        "the lagging node caught up without installing a snapshot"
    );
    let balances = local_balances(&cluster, &[2, 3]).await;
    for seen in balances.values() {
        assert_eq!(seen, &vec![120, 120]);
    }
}

/// `tally cluster snapshot --purge-log`: the leader snapshots at once and drops its whole log
/// behind the snapshot, so a member that was down catches up from the snapshot, with the
/// default snapshot settings (20,000 entries between snapshots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_snapshot_purges_the_log_and_a_lagging_node_installs_it() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let follower = *cluster.nodes.keys().find(|id| **id != leader && **id != lagging).unwrap();
    // Asked of a follower: it forwards to the leader.
    let client = cluster.client_of(&[follower], Duration::from_secs(10));
    create_accounts(&client, 1..=3).await;
    cluster.kill(lagging);
    for i in 0..20u128 {
        let results = client.create_transfers(vec![transfer(10_000 + i, BANK, 2 + i % 2, 1)]).await.unwrap();
        assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    }
    let applied = cluster.node_statuses().await[&leader].applied_index;
    let taken = client.take_snapshot(true).await.expect("snapshot");
    assert!(taken.index >= applied, "snapshot {} behind applied {applied}", taken.index);
    assert_eq!(taken.purged, taken.index, "the whole log behind the snapshot is purged");
    cluster.restart(lagging);
    cluster.wait_for_convergence(DEADLINE).await;
    let snapshots = std::fs::read_dir(cluster.nodes[&lagging].data_dir.join("snapshots")).unwrap();
    assert!(
        snapshots.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "snap")),
        "the lagging node caught up without installing a snapshot"
    );
    for seen in local_balances(&cluster, &[2, 3]).await.values() {
        assert_eq!(seen, &vec![10, 10]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_load_obey_the_site_rule() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client(Duration::from_secs(15)));
    create_accounts(&client, 1..=2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = write_load(client.clone(), stop.clone(), 1_000_000);

    // A second voter in site-a would put two of four voters there: losing site-a would lose the
    // majority. Refused, and nothing changes.
    let refused = client
        .add_node(v1::AddNodeRequest {
            id: 5,
            address: "127.0.0.1:1".into(),
            peer_address: "127.0.0.1:2".into(),
            site: "site-a".into(),
            learner_only: false,
            force: false,
            incarnation: 0,
        })
        .await;
    match refused {
        Err(Error::Rejected(status)) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(status.message().contains("site-a"), "{}", status.message());
        }
        other => panic!("a second voter in site-a was not refused: {other:?}"),
    }
    assert!(client.cluster_status().await.unwrap().nodes.iter().all(|n| n.id != 5));

    // A fourth node, empty, in a fourth site: added, caught up, promoted.
    cluster.define_node(4, "site-d");
    cluster.spawn(4, false);
    let address = cluster.address(4);
    let request = v1::AddNodeRequest {
        id: 4,
        address: address.clone(),
        peer_address: cluster.peer_address(4),
        site: "site-d".into(),
        learner_only: false,
        force: false,
        incarnation: 0,
    };
    let status = client.add_node(request).await.expect("add node 4");
    let node4 = status.nodes.iter().find(|n| n.id == 4).expect("node 4 listed");
    assert_eq!(node4.role(), v1::NodeRole::Voter);
    assert!(node4.reachable);

    // Remove an original node while writes continue.
    let status =
        client.remove_node(v1::RemoveNodeRequest { id: 1, force: false }).await.expect("remove node 1");
    assert!(status.nodes.iter().all(|n| n.id != 1));
    cluster.stop(1);
    // Removing another would leave two voters, one lost site from no majority: refused.
    let refused = client.remove_node(v1::RemoveNodeRequest { id: 2, force: false }).await;
    assert!(
        matches!(refused, Err(Error::Rejected(ref s)) if s.code() == tonic::Code::FailedPrecondition),
        "{refused:?}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, _) = load.await.unwrap();
    let client = cluster.client_of(&[2, 3, 4], Duration::from_secs(10));
    let found = client.lookup_transfers(&acknowledged, v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(found.len(), acknowledged.len());
    cluster.wait_for_convergence(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_answer_and_changes_nothing() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    let results = client.create_transfers(vec![transfer(5, 1, 2, 10)]).await.unwrap();
    assert_eq!(statuses(&results), [v1::CreateTransferStatus::Ok]);
    let before = client.lookup_accounts(&[1, 2], v1::ReadConsistency::Linearizable).await.unwrap();

    // 8190 events: refused whole.
    let too_many: Vec<_> = (0..8190u128).map(|i| transfer(100 + i, 1, 2, 1)).collect();
    let error = client.create_transfers(too_many).await.unwrap_err();
    assert_eq!(error.status().code(), tonic::Code::InvalidArgument);
    assert!(error.status().message().contains("8189"), "{}", error.status().message());
    // An empty batch, and a code that does not fit in 16 bits.
    assert_eq!(
        client.create_transfers(vec![]).await.unwrap_err().status().code(),
        tonic::Code::InvalidArgument
    );
    let wide = v1::Transfer { code: 1 << 20, ..transfer(6, 1, 2, 1) };
    assert_eq!(
        client.create_transfers(vec![wide]).await.unwrap_err().status().code(),
        tonic::Code::InvalidArgument
    );
    // An oversized message (above the 4 MiB request limit): refused before decoding.
    let fat = v1::Account { id: u128_to(9), ledger: 1, code: 1, ..v1::Account::default() };
    let error = client.create_accounts(vec![fat; 8189 * 2]).await.unwrap_err();
    assert!(
        matches!(error.status().code(), tonic::Code::ResourceExhausted | tonic::Code::InvalidArgument),
        "{error:?}"
    );
    // Per-event rejections: zero and reserved ids, unknown accounts, a duplicate in one batch.
    let results = client
        .create_transfers(vec![
            transfer(0, 1, 2, 1),
            transfer(u128::MAX, 1, 2, 1),
            transfer(7, 1, 99, 1),
            transfer(8, 98, 2, 1),
            transfer(5, 1, 2, 10),
            transfer(5, 1, 2, 11),
        ])
        .await
        .unwrap();
    use v1::CreateTransferStatus as S;
    assert_eq!(
        statuses(&results),
        [
            S::IdMustNotBeZero,
            S::IdMustNotBeIntMax,
            S::CreditAccountNotFound,
            S::DebitAccountNotFound,
            S::Exists,
            S::ExistsWithDifferentAmount
        ]
    );
    let after = client.lookup_accounts(&[1, 2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(after, before, "a refused request moved money");
    assert!(
        client.lookup_transfers(&[6, 7, 8, 100], v1::ReadConsistency::Linearizable).await.unwrap().is_empty()
    );
    // A filter without a side, and a malformed protobuf body.
    let filter =
        v1::AccountFilter { account_id: u128_to(1), limit: 10, flags: 0, ..v1::AccountFilter::default() };
    assert_eq!(
        client.get_account_transfers(filter).await.unwrap_err().status().code(),
        tonic::Code::InvalidArgument
    );
    let garbage = raw_grpc_call(
        cluster.channel_as(&cluster.address(1), None),
        "/tally.v1.Ledger/CreateTransfers",
        &[0xff, 0xff, 0xff, 0x07, 0x01],
    )
    .await;
    assert!(matches!(garbage, tonic::Code::Internal | tonic::Code::InvalidArgument), "{garbage:?}");
    let after = client.lookup_accounts(&[1, 2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_names_the_leader_and_a_failed_hop() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    // A forwarded reply tells the client where the leader is.
    // A client without a certificate: the client door takes it.
    let channel = cluster.channel_as(&cluster.address(follower), None);
    let mut ledger = v1::ledger_client::LedgerClient::new(channel);
    let started = Instant::now();
    // The follower may not have heard from the new leader yet: it answers UNAVAILABLE until then.
    let reply = loop {
        let request = v1::CreateAccountsRequest { accounts: vec![account(1)] };
        match ledger.create_accounts(request).await {
            Ok(reply) => break reply,
            Err(status) => assert!(started.elapsed() < DEADLINE, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hint = reply.metadata().get("x-tally-leader").map(|v| v.to_str().unwrap().to_string());
    assert_eq!(hint, Some(cluster.address(leader)));

    // The follower reaches the leader at an address where nothing listens: the client hears
    // which hop failed, as UNAVAILABLE (retryable), not a bare connection error.
    cluster.stop(follower);
    let nowhere = format!("{leader}=127.0.0.1:{}", raft_node::testkit::free_port());
    cluster.restart_with(follower, &["--route", &nowhere]);
    let client = cluster.client_of(&[follower], Duration::from_secs(2));
    let expected = format!("node {follower} could not reach the leader, node {leader} at 127.0.0.1:");
    let started = Instant::now();
    loop {
        let error = client.create_accounts(vec![account(2)]).await.unwrap_err();
        let message = error.status().message();
        if message.contains(&expected) {
            assert_eq!(error.status().code(), tonic::Code::Unavailable);
            break;
        }
        // Until it is up and hears from the leader, the restarted follower answers otherwise.
        assert!(started.elapsed() < DEADLINE, "last error: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_someone_elses_data_directory() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    cluster.stop(1);
    let data_dir = cluster.nodes[&1].data_dir.clone();
    let address = format!("127.0.0.1:{}", raft_node::testkit::free_port());
    let peer_address = format!("127.0.0.1:{}", raft_node::testkit::free_port());
    let run = |args: &[&str]| {
        std::process::Command::new(TALLY)
            .args(["serve", "--site", "site-a", "--listen", &address, "--peer-listen", &peer_address])
            .args(["--insecure", "--data-dir"])
            .arg(&data_dir)
            .args(args)
            .output()
            .unwrap()
    };
    let other_id = run(&["--id", "2", "--cluster", "test"]);
    assert!(!other_id.status.success());
    let message = String::from_utf8_lossy(&other_id.stderr);
    assert!(message.contains("belongs to node 1 of cluster 'test'"), "{message}");
    let other_cluster = run(&["--id", "1", "--cluster", "elsewhere"]);
    assert!(!other_cluster.status.success());
    assert!(String::from_utf8_lossy(&other_cluster.stderr).contains("cluster 'test'"));
    // A directory with foreign files and no identity.
    let foreign = cluster.dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("something"), b"not tally").unwrap();
    let output = std::process::Command::new(TALLY)
        .args(["serve", "--id", "1", "--site", "a", "--listen", &address, "--peer-listen", &peer_address])
        .args(["--insecure", "--data-dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a tally node's"));
    // A WAL damaged in the middle (not a torn tail) is refused with the file named.
    let wal_dir = data_dir.join("wal");
    let segment = std::fs::read_dir(&wal_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .expect("a WAL segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    assert!(bytes.len() > 64, "segment too small to damage");
    let middle = 24;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let damaged = run(&["--id", "1", "--cluster", "test"]);
    assert!(!damaged.status.success());
    let message = String::from_utf8_lossy(&damaged.stderr);
    assert!(message.contains("write-ahead log"), "{message}");
}

/// A power loss of the whole cluster right after writes were acknowledged: the first
/// linearizable read after the restart must include every one of them. Regression: openraft's
/// default let the old leader restore its leadership at start-up and serve reads from its
/// lazily persisted commit index and a sled state that had not been flushed, missing the last
/// acknowledged payments (found by the chaos harness, `tally-jepsen`, in a power-loss run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_read_after_a_power_loss_sees_every_acknowledged_write() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let setup = cluster.client(Duration::from_secs(10));
    create_accounts(&setup, 1..=2).await;
    let mut acknowledged_total = 0;
    for round in 0..4u128 {
        let client = Arc::new(cluster.client(Duration::from_secs(1)));
        let stop = Arc::new(AtomicBool::new(false));
        let load = write_load(client.clone(), stop.clone(), 1_000_000 * (round + 1));
        let started = Instant::now();
        let applied =
            |statuses: BTreeMap<u64, v1::NodeStatus>| statuses.values().map(|s| s.applied_index).max();
        let before = applied(cluster.node_statuses().await).unwrap_or(0);
        while applied(cluster.node_statuses().await).unwrap_or(0) < before + 50 {
            assert!(started.elapsed() < DEADLINE, "writes did not flow");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for id in 1..=3 {
            cluster.kill(id);
        }
        stop.store(true, Ordering::Relaxed);
        let (acknowledged, _) = load.await.unwrap();
        acknowledged_total += acknowledged.len() as u128;
        for id in 1..=3 {
            cluster.restart(id);
        }
        let reader = cluster.client(Duration::from_secs(1));
        let started = Instant::now();
        let accounts = loop {
            match reader.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await {
                Ok(accounts) => break accounts,
                Err(_) => assert!(started.elapsed() < DEADLINE, "no read answered after the restart"),
            }
        };
        let seen = u128_from(accounts[0].credits_posted.as_ref());
        assert!(
            seen >= acknowledged_total,
            "round {round}: the first read after the power loss shows {seen}, but {acknowledged_total} \
             transfers of 1 were acknowledged before it"
        );
    }
}

/// Raft amnesia: a voter whose disk was wiped restarts under its old id with an empty log. Had
/// it voted, the lagging peer would have been elected without a write that was acknowledged by
/// the old leader and the wiped node, and that write would have been lost. The wiped node is
/// refused by its peers instead (another incarnation than the membership records), so the
/// cluster waits for the old leader; `cluster replace` then brings the node back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_cannot_vote_until_replaced() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let others: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let (lagging, wiped) = (others[0], others[1]);
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    let started = Instant::now();
    while !client.cluster_status().await.is_ok_and(|s| s.nodes.iter().all(|n| n.recorded_incarnation != 0)) {
        assert!(started.elapsed() < DEADLINE, "the leader did not record every incarnation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The write is on the leader and on `wiped` only.
    cluster.stop(lagging);
    let results = client.create_transfers(vec![transfer(100, BANK, 2, 7)]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok]);
    cluster.kill(wiped);
    cluster.wipe(wiped);
    cluster.restart(wiped);
    cluster.kill(leader);
    cluster.restart(lagging);

    // `lagging` and the empty `wiped` are two of three voters, but must not form a quorum.
    let survivors = cluster.client_of(&[lagging, wiped], Duration::from_secs(3));
    let refused = survivors.create_transfers(vec![transfer(101, BANK, 2, 1)]).await;
    assert!(refused.is_err(), "a write committed without the old leader: {refused:?}");
    let status = survivors.node_status(&cluster.address(lagging)).await.expect("lagging answers");
    assert_ne!(status.term, 0);
    let leaders: Vec<u64> =
        cluster.node_statuses().await.values().filter(|s| s.is_leader).map(|s| s.id).collect();
    assert!(leaders.is_empty(), "elected without the old leader: {leaders:?}\n{}", cluster.log_tails());

    cluster.restart(leader);
    cluster.wait_for_leader(DEADLINE).await;
    let reader = cluster.client_of(&[leader, lagging], Duration::from_secs(10));
    let accounts = reader.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(u128_from(accounts[0].credits_posted.as_ref()), 7, "the acknowledged transfer was lost");
    let status = reader.cluster_status().await.unwrap();
    let lost = status.nodes.iter().find(|n| n.id == wiped).unwrap();
    assert!(lost.needs_replace, "status does not say node {wiped} lost its disk: {lost:?}");

    let replaced = reader.replace_node(wiped).await.expect("replace");
    let node = replaced.nodes.iter().find(|n| n.id == wiped).unwrap();
    assert_eq!((node.role(), node.needs_replace), (v1::NodeRole::Voter, false), "{node:?}");
    // A second replace has nothing to do, and says so.
    let again = reader.replace_node(wiped).await;
    assert!(
        matches!(&again, Err(Error::Rejected(s)) if s.code() == tonic::Code::FailedPrecondition),
        "{again:?}"
    );
    cluster.wait_for_convergence(DEADLINE).await;
    let balances = local_balances(&cluster, &[2]).await;
    assert!(balances.values().all(|b| b == &vec![7]), "{balances:?}");
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Writes transfer `id` and returns how far its ledger timestamp is from this machine's clock
/// at the moment of the write (ns; positive: ahead).
#[cfg(feature = "covered-by-sim")]
async fn timestamp_error_ns(client: &Client, id: u128) -> i128 {
    let before = unix_now_ns();
    let results = client.create_transfers(vec![transfer(id, BANK, 2, 1)]).await.expect("write");
    let after = unix_now_ns();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok]);
    let stored = client.lookup_transfers(&[id], v1::ReadConsistency::Linearizable).await.unwrap();
    let timestamp = stored[0].timestamp as i128;
    if timestamp < before as i128 { timestamp - before as i128 } else { (timestamp - after as i128).max(0) }
}

/// Ledger time is the cluster's: a follower an hour off changes nothing, and a leader an hour
/// fast neither stamps with its clock nor keeps the leadership. Without the bound, every
/// transfer of that leader was stamped an hour ahead (and pending transfers expired early).
// Covered by tally-sim on every seed (docs/simulation.md); out of the default set.
#[cfg(feature = "covered-by-sim")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_time_follows_a_majority_of_clocks() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    let tolerance_ns = 1_000_000_000i128;
    let hour_ms = 3_600_000;

    cluster.skew_clock(follower, -hour_ms, 0);
    for id in 200..210 {
        let error = timestamp_error_ns(&client, id).await;
        assert!(error.abs() <= tolerance_ns, "a follower's clock moved ledger time by {error} ns");
    }
    assert_eq!(cluster.wait_for_leader(DEADLINE).await, leader, "a follower's clock moved the leadership");
    cluster.skew_clock(follower, 0, 0);

    cluster.skew_clock(leader, hour_ms, 0);
    let started = Instant::now();
    let mut id = 300;
    loop {
        // Every write answered ok, before or after the handover, carries the cluster's time.
        if let Ok(results) = client.create_transfers(vec![transfer(id, BANK, 2, 1)]).await
            && statuses(&results) == vec![v1::CreateTransferStatus::Ok]
        {
            let stored = client.lookup_transfers(&[id], v1::ReadConsistency::Linearizable).await.unwrap();
            let error = stored[0].timestamp as i128 - unix_now_ns() as i128;
            assert!(error.abs() <= 2 * tolerance_ns, "transfer {id} stamped {error} ns off");
        }
        id += 1;
        let now_leader = cluster.wait_for_leader(DEADLINE).await;
        if now_leader != leader {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "the leader with a wrong clock kept the leadership");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = timestamp_error_ns(&client, 400).await;
    assert!(error.abs() <= tolerance_ns, "after the handover, ledger time is {error} ns off");
    let status = client.node_status(&cluster.address(leader)).await.unwrap();
    assert!(!status.clock_synchronized, "{status:?}");
    assert!(status.clock_offset_ms < -hour_ms + 1000, "{status:?}");
}

/// A damaged last record of the WAL looks like a torn write and recovery drops it; but when the
/// node had recorded it as committed, it was synced and acknowledged, and dropping it would be
/// amnesia of one entry. The node refuses to start instead (exit code 65), saying what to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_lost_a_committed_entry_refuses_to_start() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    for id in 500..520 {
        client.create_transfers(vec![transfer(id, BANK, 2, 1)]).await.expect("write");
    }
    // The committed file is written at most every 200 ms, after a sync.
    let wal_dir = cluster.nodes[&1].data_dir.join("wal");
    let started = Instant::now();
    while !wal_dir.join("committed").exists() {
        assert!(started.elapsed() < DEADLINE, "no committed file");
        client.create_transfers(vec![transfer(600, BANK, 2, 1)]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop(1);
    let mut segments: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segments.sort();
    let last = segments.last().expect("a WAL segment").clone();
    // Cut the segment one byte into its first record (after the 12-byte header): every record reads as a torn tail, the committed
    // entry's with them, wherever in the log the committed file (written at most every 200 ms)
    // points. (Cut in half, the log kept the entry whenever the file was last written early.)
    assert_eq!(segments.len(), 1, "a few entries fill one segment");
    std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(13).unwrap();
    let mut node = cluster.command(1, false).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = node.kill();
            panic!("the node started on a log that lost a committed entry\n{}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut message = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().unwrap(), &mut message).unwrap();
    assert_eq!(status.code(), Some(65), "{message}");
    assert!(
        message.contains("recorded as committed") && message.contains("cluster replace --id 1"),
        "{message}"
    );
}

/// The cluster id a node's data directory records, as an insider (a peer's operator) could read it.
/// Sends one AppendEntries with the given headers on `channel`; returns the status code.
async fn forged_append(
    channel: tonic::transport::Channel,
    headers: &[(&'static str, String)],
    request: openraft::raft::AppendEntriesRequest<raft_node::types::TypeConfig>,
) -> tonic::Code {
    let mut client = tally_proto::v1::raft_client::RaftClient::new(channel);
    let message = raft_node::net::raft::message(&request);
    let mut call = tonic::Request::new(message.clone());
    for (name, value) in headers {
        call.metadata_mut().insert(*name, value.parse().unwrap());
    }
    let unary = match client.append_entries(call).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    // The same request as the first of a pipelined stream (`net::append_stream`): refused alike,
    // at the stream's opening or as its first answer.
    let mut call = tonic::Request::new(futures::stream::iter([message]));
    for (name, value) in headers {
        call.metadata_mut().insert(*name, value.parse().unwrap());
    }
    let streamed = match client.append_stream(call).await {
        Err(status) => status.code(),
        Ok(answers) => match answers.into_inner().message().await {
            Err(status) => status.code(),
            Ok(_) => tonic::Code::Ok,
        },
    };
    let transport =
        |code| matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled);
    assert!(
        unary == streamed || transport(unary) && transport(streamed),
        "unary {unary:?}, stream {streamed:?}"
    );
    unary
}

/// The attack from the "locked down" issue: one AppendEntries sent from outside, claiming term
/// 1,000,000 from a made-up node 99, moved every node to term 1,000,001; one with term u64::MAX
/// made every Raft core panic on `term + 1`, and again after every restart (the term is saved
/// with the vote). Now Raft is served only at the peer door, which takes only node certificates
/// of the cluster's CA; a node's message is refused unless its certificate is the node it
/// claims to be and it names the cluster's id; and even a member's with an out-of-bounds term
/// or index is refused before openraft sees it: every node stays at its term and the cluster
/// keeps serving, restarts included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_raft_message_is_refused_and_the_cluster_keeps_serving() {
    use openraft::raft::AppendEntriesRequest;
    use openraft::testing::{blank_ent, log_id};
    use raft_node::types::{TypeConfig, Vote};
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    // Every node has heard from the cluster, so has its id. (A node that has not takes the id
    // of the first Raft call that reaches it, but only from a node certificate of the CA.)
    cluster.wait_for_convergence(DEADLINE).await;
    let terms_before: Vec<u64> = cluster.node_statuses().await.values().map(|s| s.term).collect();
    let cluster_id = cluster.cluster_id(1);
    for id in cluster.nodes.keys() {
        assert_eq!(cluster.cluster_id(*id), cluster_id, "node {id}");
    }
    let made_up = format!("{:032x}", 0x5eed_u128);
    let append = |term: u64, entry_index: Option<u64>| AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, 99),
        prev_log_id: None,
        entries: entry_index.map(|index| blank_ent::<TypeConfig>(1, 99, index)).into_iter().collect(),
        leader_commit: Some(log_id::<TypeConfig>(1, 99, 0)),
    };
    // A node certificate from another CA, for node 1.
    let elsewhere = tempfile::tempdir().unwrap();
    raft_node::security::certs::make_local(elsewhere.path(), 1).unwrap();
    let (cert, key) = raft_node::security::certs::paths(elsewhere.path(), &Role::Node(1));
    let other_ca = match cluster.security_as(None) {
        Security::Tls { ca_pem, .. } => Security::Tls {
            ca_pem,
            identity: Some((std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())),
        },
        Security::Insecure => unreachable!("the test cluster runs TLS"),
    };
    for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
        // The client door has no Raft service at all.
        let original = vec![("x-tally-cluster", "tally".to_string()), ("x-tally-from", "99.0".into())];
        let operator = cluster.channel_as(&cluster.address(id), Some(Role::Operator("cli".into())));
        let code = forged_append(operator, &original, append(1_000_000, None)).await;
        assert_eq!(code, tonic::Code::Unimplemented, "node {id}: Raft at the client door");
        let peer_door = cluster.peer_address(id);
        // The peer door takes only node certificates of this cluster's CA: no connection for
        // a caller without one, an operator, or a node certificate of another CA.
        let refused_at_the_door = [
            ("no certificate", cluster.channel_as(&peer_door, None)),
            ("an operator's certificate", cluster.channel_as(&peer_door, Some(Role::Operator("cli".into())))),
            ("another CA's node 1", raft_node::testkit::channel_with(&peer_door, &other_ca)),
        ];
        for (what, channel) in refused_at_the_door {
            // With TLS 1.3 the client learns of the refusal only when it sends: a transport
            // error, never an answer from the Raft service.
            let code = forged_append(channel, &original, append(1_000_000, None)).await;
            let transport =
                matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled);
            assert!(transport, "node {id}: {what}: {code:?}");
        }
        let to = format!("{id}.0");
        let headers = |cluster: &str, from: u64| {
            vec![
                ("x-tally-cluster", cluster.to_string()),
                ("x-tally-from", format!("{from}.0")),
                ("x-tally-to", to.clone()),
            ]
        };
        // Node 99: a certificate this CA signed for a node that is not a member. A member:
        // another node's own certificate, as an insider with its key would have it.
        let member = id % 3 + 1;
        let as_node = |node: u64| cluster.channel_as(&peer_door, Some(Role::Node(node)));
        type Row<'a> =
            (&'a str, u64, Vec<(&'static str, String)>, AppendEntriesRequest<TypeConfig>, tonic::Code);
        let rows: Vec<Row> = vec![
            (
                "the original recipe",
                99,
                headers("tally", 99),
                append(1_000_000, None),
                tonic::Code::PermissionDenied,
            ),
            ("no headers", 99, vec![], append(1_000_000, None), tonic::Code::PermissionDenied),
            (
                "a made-up cluster id",
                99,
                headers(&made_up, 99),
                append(u64::MAX, None),
                tonic::Code::PermissionDenied,
            ),
            (
                "a member's certificate, claiming to be another node",
                member,
                headers(&cluster_id, 99),
                append(1_000_000, None),
                tonic::Code::PermissionDenied,
            ),
            // A node certificate the CA signed, with the cluster's id, outside the membership
            // (never added, or removed): it moved every node's term before.
            (
                "a non-member with the cluster's id",
                99,
                headers(&cluster_id, 99),
                append(1_000_000, None),
                tonic::Code::PermissionDenied,
            ),
            (
                "a member sending entries as another leader",
                member,
                headers(&cluster_id, member),
                AppendEntriesRequest { vote: Vote::new_committed(1_000_000, id), ..append(1, None) },
                tonic::Code::PermissionDenied,
            ),
            (
                "a member, term u64::MAX",
                member,
                headers(&cluster_id, member),
                append(u64::MAX, None),
                tonic::Code::InvalidArgument,
            ),
            (
                "a member, entry index u64::MAX",
                member,
                headers(&cluster_id, member),
                append(1, Some(u64::MAX)),
                tonic::Code::InvalidArgument,
            ),
        ];
        for (what, node, headers, request, expected) in rows {
            assert_eq!(forged_append(as_node(node), &headers, request).await, expected, "node {id}: {what}");
        }
        // Operator rights are an operator's: a node certificate outside the membership may not
        // change it, and a member's (which may forward an operator's change) may not take the
        // books away in a backup.
        let mut stranger = v1::cluster_client::ClusterClient::new(as_node(99));
        let removed = stranger.remove_node(v1::RemoveNodeRequest { id: member, force: true }).await;
        assert_eq!(
            removed.map(|_| ()).unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "node {id}: remove"
        );
        let mut insider = v1::cluster_client::ClusterClient::new(as_node(member));
        let backup = insider.backup(v1::BackupRequest {}).await;
        assert_eq!(
            backup.map(|_| ()).unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "node {id}: backup"
        );
        // Refused before the body is read: garbage from a stranger is not even decoded.
        let garbage = vec![0xff; 4096];
        let code = raw_grpc_call(as_node(99), "/tally.v1.Raft/AppendEntries", &garbage).await;
        assert_eq!(code, tonic::Code::PermissionDenied, "node {id}: garbage");
    }
    let statuses = cluster.node_statuses().await;
    for (id, status) in &statuses {
        assert!(status.reachable, "node {id} stopped answering");
        assert!(status.term < 1000, "node {id} moved to term {}", status.term);
    }
    assert!(terms_before.iter().all(|t| *t < 1000));
    let results = client.create_transfers(vec![transfer(500, BANK, 2, 7)]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);

    // Nothing was saved: every node starts again and the cluster serves.
    for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
        cluster.kill(id);
        cluster.restart(id);
    }
    cluster.wait_for_leader(DEADLINE).await;
    let results = client.create_transfers(vec![transfer(501, BANK, 2, 7)]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    cluster.wait_for_convergence(DEADLINE).await;
    for seen in local_balances(&cluster, &[2]).await.values() {
        assert_eq!(seen, &vec![14]);
    }
}

async fn health(cluster: &TestCluster, address: &str) -> Option<i32> {
    let channel = cluster.channel_as(address, None);
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    client.check(request).await.ok().map(|reply| reply.into_inner().status)
}

async fn wait_for_health(cluster: &TestCluster, address: &str, serving: bool) {
    let wanted = if serving {
        tonic_health::pb::health_check_response::ServingStatus::Serving
    } else {
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    } as i32;
    let started = Instant::now();
    loop {
        let status = health(cluster, address).await;
        if status == Some(wanted) {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "{address}: health {status:?}, waiting for {wanted}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A load balancer asks gRPC health where to send traffic: SERVING only on a member in touch
/// with a leader; NOT_SERVING when it is cut off from a majority and once it is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_not_serving_without_a_leader_or_after_removal() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    for id in cluster.nodes.keys() {
        wait_for_health(&cluster, &cluster.address(*id), true).await;
    }
    // The leader alone: no quorum answers it any more.
    let others: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    for id in &others {
        cluster.kill(*id);
    }
    wait_for_health(&cluster, &cluster.address(leader), false).await;
    // The same answer for probes that cannot speak TLS, on the metrics endpoint.
    let ready = cluster.http_get(leader, "/ready").await;
    assert!(ready.starts_with("HTTP/1.1 503") || ready.starts_with("HTTP/1.0 503"), "{ready}");
    for id in &others {
        cluster.restart(*id);
    }
    for id in cluster.nodes.keys() {
        wait_for_health(&cluster, &cluster.address(*id), true).await;
    }
    let ready = cluster.http_get(leader, "/ready").await;
    assert!(ready.contains(" 200 ") && ready.contains("SERVING"), "{ready}");
    // A removed node keeps running, but takes no traffic.
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let removed = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let client = cluster.client_of(&[leader], Duration::from_secs(10));
    client.remove_node(v1::RemoveNodeRequest { id: removed, force: true }).await.expect("remove");
    wait_for_health(&cluster, &cluster.address(removed), false).await;
    wait_for_health(&cluster, &cluster.address(leader), true).await;
}

/// A node whose ledger state is damaged at rest rebuilds it by itself, from its own snapshot and
/// log (both checked as they are read back), and keeps its identity: no operator, no `cluster
/// replace`. (It refused to start before, exit 65.) So does a node upgraded from a tally that kept
/// the state on sled, which this build no longer reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_ledger_state_is_damaged_or_on_sled_rebuilds_it_from_its_snapshot_and_log() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &SNAPSHOT_AND_PURGE_OFTEN);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let damaged = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let client = cluster.client_of(&[leader], Duration::from_secs(10));
    create_accounts(&client, 1..=3).await;
    // One request at a time, each an entry of its own: several snapshots on every node.
    for i in 0..120u128 {
        let results = client.create_transfers(vec![transfer(20_000 + i, BANK, 2 + i % 2, 1)]).await.unwrap();
        assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    }
    cluster.wait_for_convergence(DEADLINE).await;
    let incarnation = cluster.node_statuses().await[&damaged].incarnation;
    let data_dir = cluster.nodes[&damaged].data_dir.clone();
    let snapshots = std::fs::read_dir(data_dir.join("snapshots")).unwrap();
    assert!(snapshots.filter_map(Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "snap")));

    // The store's layout record garbled, as a flipped byte no checksum covered would leave it:
    // it no longer decodes when the state is opened.
    cluster.kill(damaged);
    {
        let pages = tally_store::pages::Pages::open(&data_dir.join("state"), 1 << 20).unwrap();
        let mut batch = tally_store::pages::Batch::default();
        batch.insert(tally_store::LAYOUT_KEY, vec![1u8, 0, 0, 0, 9, 9, 9]);
        pages.apply(batch).unwrap();
        pages.sync().unwrap();
    }
    cluster.restart(damaged);
    cluster.wait_for_convergence(DEADLINE).await;
    let results = client.create_transfers(vec![transfer(30_000, BANK, 2, 1)]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    cluster.wait_for_convergence(DEADLINE).await;

    // The state as an older tally left it: sled's files in place of the store's.
    cluster.kill(damaged);
    std::fs::remove_dir_all(data_dir.join("state")).unwrap();
    std::fs::create_dir(data_dir.join("state")).unwrap();
    std::fs::write(data_dir.join("state/conf"), b"segment_size: 8388608\nuse_compression: false\n").unwrap();
    std::fs::write(data_dir.join("state/db"), vec![0u8; 4096]).unwrap();
    cluster.restart(damaged);
    cluster.wait_for_convergence(DEADLINE).await;

    let status = &cluster.node_statuses().await[&damaged];
    assert!(status.reachable, "the damaged node does not answer");
    assert_eq!(status.incarnation, incarnation, "it kept its data directory's identity");
    assert!(!status.needs_replace);
    assert!(!data_dir.join("state/conf").exists(), "sled's files are gone");
    for seen in local_balances(&cluster, &[2, 3]).await.values() {
        assert_eq!(seen, &vec![61, 60]);
    }
    // And it takes new writes like the others.
    let results = client.create_transfers(vec![transfer(30_001, BANK, 2, 1)]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateTransferStatus::Ok);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// Older tools ask for reflection as `grpc.reflection.v1alpha` (Python's grpcio-reflection,
/// older grpcurl): the client door answers that as well as v1, listing every service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_to_v1alpha_and_v1_clients() {
    use tonic_reflection::pb::{v1, v1alpha};
    let cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let channel = cluster.channel_as(&cluster.address(1), None);
    let expected = ["grpc.health.v1.Health", "tally.v1.Cluster", "tally.v1.Ledger"];

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut replies =
        alpha.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().expect("a v1alpha reply");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("not a service list: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(names.iter().any(|n| n == name), "v1alpha lists {names:?}, not {name}");
    }

    let mut current = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut replies =
        current.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.message().await.unwrap().expect("a v1 reply");
    assert!(format!("{reply:?}").contains("tally.v1.Ledger"), "{reply:?}");
}

/// `--log-format json`: every line a node writes to stderr is one JSON object with a level and
/// a message, start-up and stop included, for log collectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES[..1], &["--log-format", "json"]);
    cluster.wait_for_leader(DEADLINE).await;
    cluster.stop(1);
    let text = std::fs::read_to_string(cluster.dir.path().join("node-1.log")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["message"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("serving clients on")), "{text}");
    assert!(lines.iter().any(|l| l.contains("node 1 stopped")), "{text}");
}

/// Starts node 4, empty, in site-d, and adds it (as a learner, or a voter once caught up).
async fn add_fourth_node(cluster: &mut TestCluster, client: &Client, learner_only: bool) {
    cluster.define_node(4, "site-d");
    cluster.spawn(4, false);
    let request = v1::AddNodeRequest {
        id: 4,
        address: cluster.address(4),
        peer_address: cluster.peer_address(4),
        site: "site-d".into(),
        learner_only,
        force: false,
        incarnation: 0,
    };
    client.add_node(request).await.expect("add node 4");
}

/// A payment refused for lack of funds is refused again when retried after the account was
/// funded: on the leader, on a new leader, and on a node that got the state from a snapshot
/// only (the failed id is part of the replicated state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_payment_stays_refused_on_every_node() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=1).await;
    let guarded = v1::Account { flags: v1::AccountFlag::DebitsMustNotExceedCredits as u32, ..account(2) };
    let results = client.create_accounts(vec![guarded]).await.unwrap();
    assert_eq!(results[0].status(), v1::CreateAccountStatus::Ok);
    let payment = transfer(10, 2, BANK, 5);
    let results = client.create_transfers(vec![payment]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::ExceedsCredits]);
    let results = client.create_transfers(vec![transfer(11, BANK, 2, 100)]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok]);
    let refused_again = vec![v1::CreateTransferStatus::IdAlreadyFailed];
    let results = client.create_transfers(vec![payment]).await.unwrap();
    assert_eq!(statuses(&results), refused_again);

    // A fourth node catches up from a snapshot (the log behind it is gone) and leads.
    client.take_snapshot(true).await.expect("snapshot and purge");
    add_fourth_node(&mut cluster, &client, false).await;
    client.transfer_leader(4).await.expect("leader to node 4");
    let started = Instant::now();
    while cluster.wait_for_leader(DEADLINE).await != 4 {
        assert!(started.elapsed() < DEADLINE, "node 4 never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_four = cluster.client_of(&[4], Duration::from_secs(10));
    let results = on_four.create_transfers(vec![payment]).await.unwrap();
    assert_eq!(statuses(&results), refused_again);
    let accounts = on_four.lookup_accounts(&[2], v1::ReadConsistency::Linearizable).await.unwrap();
    assert_eq!(u128_from(accounts[0].debits_posted.as_ref()), 0, "the refused payment moved money");
}

/// A payment is found by the reference it carries (user_data_128), on every node: on one that
/// got the state from a snapshot only (query indexes are not in snapshots: the import builds
/// them), through the API and through `tally query`. A bad filter is refused, naming the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_are_found_by_their_reference_on_every_node() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=3).await;
    // Order 7001 is paid in three parts, to two merchants; other orders in between.
    let part = |id: u128, credit: u128, order: u128, code: u32| v1::Transfer {
        user_data_128: u128_to(order),
        code,
        ..transfer(id, BANK, credit, 10)
    };
    let batches = [
        vec![part(10, 2, 7001, 1), part(11, 3, 7002, 1)],
        vec![part(12, 2, 7003, 1), part(13, 3, 7001, 2)],
        vec![part(14, 2, 7002, 1), part(15, 2, 7001, 1)],
    ];
    for batch in batches {
        let results = client.create_transfers(batch).await.unwrap();
        assert!(statuses(&results).iter().all(|s| *s == v1::CreateTransferStatus::Ok), "{results:?}");
    }
    client.take_snapshot(true).await.expect("snapshot and purge");
    add_fourth_node(&mut cluster, &client, true).await;
    cluster.wait_for_convergence(DEADLINE).await;

    let order = |order: u128, consistency: v1::ReadConsistency| v1::QueryFilter {
        user_data_128: u128_to(order),
        limit: 10,
        consistency: consistency as i32,
        ..v1::QueryFilter::default()
    };
    let ids =
        |transfers: &[v1::Transfer]| transfers.iter().map(|t| u128_from(t.id.as_ref())).collect::<Vec<_>>();
    let on_four = cluster.client_of(&[4], Duration::from_secs(10));
    for consistency in [v1::ReadConsistency::Local, v1::ReadConsistency::Linearizable] {
        let page = on_four.query_transfers(order(7001, consistency)).await.unwrap();
        assert_eq!((ids(&page.transfers), page.resume_timestamp), (vec![10, 13, 15], 0), "{consistency:?}");
    }
    let by_code = v1::QueryFilter { code: 2, ..order(7001, v1::ReadConsistency::Local) };
    assert_eq!(ids(&on_four.query_transfers(by_code).await.unwrap().transfers), vec![13]);
    let merchant = v1::AccountFilter {
        account_id: u128_to(2),
        user_data_128: u128_to(7001),
        limit: 10,
        flags: v1::AccountFilterFlag::Credits as u32 | v1::AccountFilterFlag::Reversed as u32,
        consistency: v1::ReadConsistency::Local as i32,
        ..v1::AccountFilter::default()
    };
    assert_eq!(ids(&on_four.get_account_transfers(merchant).await.unwrap().transfers), vec![15, 10]);
    let accounts = v1::QueryFilter { ledger: LEDGER, ..order(0, v1::ReadConsistency::Local) };
    let found = on_four.query_accounts(accounts).await.unwrap().accounts;
    assert_eq!(found.iter().map(|a| u128_from(a.id.as_ref())).collect::<Vec<_>>(), vec![1, 2, 3]);

    // The CLI, against node 4 only.
    let mut args =
        vec!["query".to_string(), "transfers".to_string(), "--user-data-128".into(), "7001".into()];
    args.extend(["--reversed".to_string(), "--json".into(), "--local".into()]);
    let mut cli = cluster.cli_args(Some(Role::Client("app".into())));
    cli[1] = cluster.address(4);
    args.extend(cli);
    let output = std::process::Command::new(TALLY).args(&args).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ["15", "13", "10"]);

    // Bad filters change nothing and say what is wrong.
    for (filter, says) in [
        (v1::QueryFilter { limit: 0, ..order(7001, v1::ReadConsistency::Linearizable) }, "limit"),
        (v1::QueryFilter { code: 70_000, ..order(7001, v1::ReadConsistency::Linearizable) }, "code 70000"),
        (v1::QueryFilter { flags: 2, ..order(7001, v1::ReadConsistency::Linearizable) }, "flags"),
        (
            v1::QueryFilter {
                timestamp_min: 5,
                timestamp_max: 4,
                ..order(7001, v1::ReadConsistency::Linearizable)
            },
            "timestamp_min",
        ),
    ] {
        let error = client.query_transfers(filter).await.unwrap_err();
        let status = error.status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{filter:?}");
        assert!(status.message().contains(says), "{filter:?}: {}", status.message());
    }
}

/// The change stream survives the loss of the node it is read from: a subscriber on the leader,
/// which is killed under load, resumes on another node from the last timestamp it got, and ends
/// up with every event exactly once, in ledger time, as the survivors list them from the start:
/// each account created, each acknowledged transfer, and each expiry, with balances that add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_stream_resumes_on_another_node_with_every_event_once() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=3).await;
    // Load from another task: 40 batches of 5, one pending transfer of 1 s in each.
    let writer = {
        let client = cluster.client(Duration::from_secs(10));
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for batch in 0..40u128 {
                let mut events: Vec<v1::Transfer> =
                    (0..4).map(|n| transfer(1_000 + batch * 5 + n, BANK, 2 + n % 2, 1)).collect();
                events.push(v1::Transfer {
                    flags: v1::TransferFlag::Pending as u32,
                    timeout: 1,
                    ..transfer(1_000 + batch * 5 + 4, BANK, 3, 1)
                });
                let ids: Vec<u128> = events.iter().map(|t| u128_from(t.id.as_ref())).collect();
                // Retried through the leader's loss: idempotent by id.
                let results = loop {
                    match client.create_transfers(events.clone()).await {
                        Ok(results) => break results,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                for (id, result) in ids.iter().zip(&results) {
                    let status = result.status();
                    assert!(
                        matches!(status, v1::CreateTransferStatus::Ok | v1::CreateTransferStatus::Exists),
                        "{status:?}"
                    );
                    acknowledged.push(*id);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acknowledged
        })
    };

    let mut received: Vec<v1::ChangeEvent> = Vec::new();
    let on_leader = cluster.client_of(&[leader], Duration::from_secs(10));
    let mut stream = on_leader.subscribe_changes(0).await.expect("subscribe on the leader");
    while received.len() < 60 {
        let event = tokio::time::timeout(DEADLINE, stream.message()).await.expect("an event in time");
        received.push(event.expect("the stream").expect("not ended"));
    }
    cluster.kill(leader);
    // The stream breaks (or ends); whatever it still delivered counts.
    while let Ok(Some(event)) =
        tokio::time::timeout(DEADLINE, stream.message()).await.expect("the stream breaks in time")
    {
        received.push(event);
    }
    let acknowledged = tokio::time::timeout(2 * DEADLINE, writer).await.expect("the writer ends").unwrap();
    let survivors: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let others = cluster.client_of(&survivors, Duration::from_secs(10));
    let last_id = *acknowledged.last().unwrap();
    let resume_from = received.last().unwrap().timestamp + 1;
    let mut stream = others.subscribe_changes(resume_from).await.expect("subscribe on a survivor");
    // Until the last transfer and every expiry (40 pending transfers of 1 s) have come.
    let expired = |events: &[v1::ChangeEvent]| {
        events.iter().filter(|e| e.r#type() == v1::ChangeType::TwoPhaseExpired).count()
    };
    let started = Instant::now();
    let has_last = |events: &[v1::ChangeEvent]| {
        events.iter().any(|e| e.transfer.as_ref().is_some_and(|t| u128_from(t.id.as_ref()) == last_id))
    };
    while !(has_last(&received) && expired(&received) == 40) {
        assert!(started.elapsed() < 2 * DEADLINE, "the resumed stream stalled at {} events", received.len());
        match tokio::time::timeout(DEADLINE, stream.message()).await.expect("an event in time") {
            Ok(Some(event)) => received.push(event),
            other => panic!("the resumed stream broke: {other:?}"),
        }
    }

    // Exactly once, in ledger time, and the same as a survivor lists from the start.
    assert!(received.windows(2).all(|w| w[0].timestamp < w[1].timestamp), "a duplicate or a step back");
    let mut listed: Vec<v1::ChangeEvent> = Vec::new();
    let mut stream = others.subscribe_changes(0).await.expect("subscribe from the start");
    while listed.len() < received.len() {
        let event = tokio::time::timeout(DEADLINE, stream.message()).await.expect("an event in time");
        listed.push(event.expect("the stream").expect("not ended"));
    }
    assert_eq!(listed, received, "the resumed stream differs from the survivors' history");
    let created: Vec<u128> = received
        .iter()
        .filter(|e| e.r#type() == v1::ChangeType::AccountCreated)
        .map(|e| u128_from(e.account.as_ref().unwrap().id.as_ref()))
        .collect();
    assert_eq!(created, vec![1, 2, 3]);
    let mut transfers: Vec<u128> = received
        .iter()
        .filter(|e| !matches!(e.r#type(), v1::ChangeType::AccountCreated | v1::ChangeType::TwoPhaseExpired))
        .map(|e| u128_from(e.transfer.as_ref().unwrap().id.as_ref()))
        .collect();
    transfers.sort_unstable();
    assert_eq!(transfers, acknowledged, "every acknowledged transfer once, nothing else");
    // Balances after each event add up: the bank's debits move by each event's amount.
    let mut bank_debits: i128 = 0;
    for event in received.iter().filter(|e| e.r#type() != v1::ChangeType::AccountCreated) {
        let amount = u128_from(event.transfer.as_ref().unwrap().amount.as_ref()) as i128;
        let debit = event.debit_account.as_ref().unwrap();
        let now =
            (u128_from(debit.debits_posted.as_ref()) + u128_from(debit.debits_pending.as_ref())) as i128;
        let step = if event.r#type() == v1::ChangeType::TwoPhaseExpired { -amount } else { amount };
        assert_eq!(now, bank_debits + step, "at {}", event.timestamp);
        bank_debits = now;
    }

    // `tally watch` prints the same events, one JSON object per line.
    let mut args = vec!["watch".to_string(), "--json".into(), "--count".into(), "5".into()];
    let mut cli = cluster.cli_args(Some(Role::Client("app".into())));
    cli[1] = survivors.iter().map(|id| cluster.address(*id)).collect::<Vec<_>>().join(",");
    args.extend(cli);
    let output = std::process::Command::new(TALLY).args(&args).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let timestamps: Vec<u64> = lines.iter().map(|l| l["timestamp"].as_u64().unwrap()).collect();
    assert_eq!(timestamps, received[..5].iter().map(|e| e.timestamp).collect::<Vec<_>>());
    assert_eq!(lines[0]["type"], "account_created");
}

/// A reservation on an idle ledger expires on time, without a write, even when the leader that
/// took it is gone: the new leader proposes the expiry when the timeout falls due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_ledger_expires_reservations_without_a_write() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    let pending =
        v1::Transfer { flags: v1::TransferFlag::Pending as u32, timeout: 2, ..transfer(10, BANK, 2, 25) };
    let created = Instant::now();
    let results = client.create_transfers(vec![pending]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok]);
    cluster.kill(leader);
    let survivors: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    let reader = cluster.client_of(&survivors, Duration::from_secs(10));
    let reserved = |accounts: &[v1::Account]| u128_from(accounts[0].debits_pending.as_ref());
    loop {
        let accounts = reader.lookup_accounts(&[BANK], v1::ReadConsistency::Linearizable).await.unwrap();
        if reserved(&accounts) == 0 {
            break;
        }
        assert_eq!(reserved(&accounts), 25);
        assert!(created.elapsed() < DEADLINE, "the reservation never expired:\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ledger time is the majority's clock, a few ms off this one at most.
    assert!(created.elapsed() >= Duration::from_millis(1900), "expired before its timeout");
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    let ticks = sample(&cluster.scrape(new_leader).await, "tally_expiry_ticks_total", None);
    assert!(ticks >= 1.0, "the new leader proposed no expiry: {ticks}");
    let post = v1::Transfer {
        flags: v1::TransferFlag::PostPendingTransfer as u32,
        pending_id: u128_to(10),
        ..transfer(11, 0, 0, 0)
    };
    let results = reader.create_transfers(vec![v1::Transfer { ledger: 0, code: 0, ..post }]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::PendingTransferExpired]);
}

/// History from another system through the API: imported accounts and transfers keep their
/// own past timestamps, in order, on every node; the ledger's own events follow them; a batch
/// that mixes them or goes back in time is refused event by event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_imported_with_its_own_timestamps() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    let day = 86_400 * 1_000_000_000u64;
    let then = unix_now_ns() - 30 * day;
    let imported_account = |id: u128, timestamp: u64| v1::Account {
        flags: v1::AccountFlag::Imported as u32,
        timestamp,
        ..account(id)
    };
    let results =
        client.create_accounts(vec![imported_account(1, then), imported_account(2, then + 1)]).await.unwrap();
    assert!(results.iter().all(|r| r.status() == v1::CreateAccountStatus::Ok), "{results:?}");
    let imported = |id: u128, timestamp: u64| v1::Transfer {
        flags: v1::TransferFlag::Imported as u32,
        timestamp,
        ..transfer(id, 1, 2, 10)
    };
    let results = client
        .create_transfers(vec![imported(10, then + day), imported(11, then + 2 * day), transfer(12, 1, 2, 1)])
        .await
        .unwrap();
    assert_eq!(
        statuses(&results),
        vec![
            v1::CreateTransferStatus::Ok,
            v1::CreateTransferStatus::Ok,
            v1::CreateTransferStatus::ImportedEventExpected
        ]
    );
    assert_eq!(results[1].timestamp, then + 2 * day);
    let results = client
        .create_transfers(vec![imported(13, then + day / 2), imported(14, unix_now_ns() + day)])
        .await
        .unwrap();
    assert_eq!(
        statuses(&results),
        vec![
            v1::CreateTransferStatus::ImportedEventTimestampMustNotRegress,
            v1::CreateTransferStatus::ImportedEventTimestampMustNotAdvance
        ]
    );
    let results = client.create_transfers(vec![transfer(15, 1, 2, 5)]).await.unwrap();
    assert_eq!(statuses(&results), vec![v1::CreateTransferStatus::Ok]);
    assert!(results[0].timestamp > then + 2 * day, "the ledger's own events follow the imports");
    cluster.wait_for_convergence(DEADLINE).await;
    for id in cluster.nodes.keys() {
        let local = cluster.client_of(&[*id], Duration::from_secs(5));
        let found = local.lookup_transfers(&[10, 11, 15], v1::ReadConsistency::Local).await.unwrap();
        let times: Vec<u64> = found.iter().map(|t| t.timestamp).collect();
        assert_eq!(&times[..2], &[then + day, then + 2 * day], "node {id}");
        let accounts = local.lookup_accounts(&[1, 2], v1::ReadConsistency::Local).await.unwrap();
        assert_eq!(
            (accounts[0].timestamp, u128_from(accounts[0].debits_posted.as_ref())),
            (then, 25),
            "node {id}"
        );
    }
}

/// Waits until node `id`'s log has a line containing every one of `parts`; returns the log.
async fn wait_for_log(cluster: &TestCluster, id: u64, parts: &[&str]) -> String {
    let path = cluster.dir.path().join(format!("node-{id}.log"));
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|line| parts.iter().all(|part| line.contains(part))) {
            return text;
        }
        assert!(started.elapsed() < DEADLINE, "node {id} never logged {parts:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn warnings(cluster: &TestCluster) -> Vec<String> {
    cluster
        .nodes
        .keys()
        .map(|id| std::fs::read_to_string(cluster.dir.path().join(format!("node-{id}.log"))).unwrap())
        .collect::<String>()
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .map(str::to_string)
        .collect()
}

/// A node started before its peers says it waits for them, once each, and warns of nothing;
/// a peer that goes away is one warning on the leader once it has been silent a while, and its
/// return is said too. (openraft's own warnings for each failed call are not logged.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_logs_say_peers_are_awaited_and_warn_of_nothing() {
    let mut cluster = TestCluster::define(Path::new(TALLY), &SITES, &[]);
    cluster.spawn(1, true);
    for peer in [2, 3] {
        let waiting = format!("waiting for node {peer} at {}", cluster.peer_address(peer));
        wait_for_log(&cluster, 1, &[&waiting]).await;
    }
    cluster.spawn(2, false);
    cluster.spawn(3, false);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    cluster.wait_for_convergence(DEADLINE).await;
    assert_eq!(warnings(&cluster), Vec::<String>::new(), "{}", cluster.log_tails());

    let gone = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    cluster.kill(gone);
    let silent = format!("node {gone} at {} has not answered for", cluster.peer_address(gone));
    wait_for_log(&cluster, leader, &[" WARN ", &silent]).await;
    cluster.restart(gone);
    let back = format!("node {gone} at {} answers again", cluster.peer_address(gone));
    wait_for_log(&cluster, leader, &[&back]).await;
    let warned = warnings(&cluster);
    assert!(
        !warned.is_empty() && warned.len() <= 2 && warned.iter().all(|line| line.contains(&silent)),
        "{warned:#?}"
    );
}

/// The value of the Prometheus sample `name` (with exactly these labels, or none) in `text`;
/// the sum over every sample of `name` when `labels` is None.
fn sample(text: &str, name: &str, labels: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let (metric, rest) =
                key.split_once('{').map_or((key, None), |(m, r)| (m, Some(r.trim_end_matches('}'))));
            let wanted = metric == name && labels.is_none_or(|labels| rest.unwrap_or("") == labels);
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Prometheus scrapes each node at `--metrics-listen`: under load the request counts and
/// latencies, batch and entry sizes, group-commit waits, fsyncs, the Raft indexes and the bytes
/// on disk move, and a follower reports the writes it forwarded; every node what it applied and
/// the CPU it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_load() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    let before = cluster.scrape(leader).await;
    assert!(before.starts_with("HTTP/1.") && before.contains("200"), "{}", &before[..before.len().min(200)]);
    for name in
        ["tally_grpc_requests_total", "tally_wal_fsync_seconds_count", "tally_raft_term", "tally_disk_bytes"]
    {
        assert!(before.contains(name), "{name} missing");
    }
    let client = cluster.client(Duration::from_secs(10));
    create_accounts(&client, 1..=2).await;
    for batch in 0..20u128 {
        let transfers = (0..50).map(|i| transfer(1000 + batch * 50 + i, BANK, 2, 1)).collect();
        client.create_transfers(transfers).await.unwrap();
    }
    // One write through the follower, which forwards it.
    let via_follower = cluster.client_of(&[follower], Duration::from_secs(10));
    via_follower.create_transfers(vec![transfer(9999, BANK, 2, 1)]).await.unwrap();
    let after = cluster.scrape(leader).await;
    let method = r#"code="0",door="client",method="/tally.v1.Ledger/CreateTransfers""#;
    let moved =
        |name: &str, labels: Option<&str>| sample(&after, name, labels) - sample(&before, name, labels);
    assert!(moved("tally_grpc_requests_total", Some(method)) >= 20.0, "{after}");
    assert!(moved("tally_grpc_request_seconds_count", None) >= 20.0);
    assert!(moved("tally_batch_events_sum", None) >= 1000.0);
    assert!(moved("tally_entry_events_sum", None) >= 1000.0);
    assert!(moved("tally_group_commit_wait_seconds_count", None) >= 20.0);
    assert!(moved("tally_entry_commit_seconds_count", None) >= 1.0);
    assert!(moved("tally_wal_fsync_seconds_count", None) >= 1.0);
    assert!(moved("tally_raft_applied_index", None) >= 20.0);
    assert_eq!(sample(&after, "tally_raft_is_leader", None), 1.0);
    assert!(sample(&after, "tally_raft_term", None) >= 1.0);
    assert!(sample(&after, "tally_disk_bytes", Some(r#"part="wal""#)) > 0.0);
    // The leader replicates to both followers over connections to their peer doors (who else
    // connected to the leader's own door depends on who called whom first: CI saw none).
    let mut peer_connections = 0.0;
    for id in cluster.nodes.keys() {
        peer_connections += sample(&cluster.scrape(*id).await, "tally_connections", Some(r#"door="peer""#));
    }
    assert!(peer_connections >= 2.0, "the peers' connections: {peer_connections}");
    assert!(after.contains("tally_raft_replication_lag{peer="), "the leader reports each peer's lag");
    // Status says what each node runs and for how long.
    let status = client.cluster_status().await.unwrap();
    for node in &status.nodes {
        assert_eq!(node.version, env!("CARGO_PKG_VERSION"), "node {}", node.id);
        assert!(node.uptime_seconds < 600, "node {}: up {} s", node.id, node.uptime_seconds);
    }
    let follower_metrics = cluster.scrape(follower).await;
    assert!(sample(&follower_metrics, "tally_forwarded_requests_total", None) >= 1.0);
    assert_eq!(sample(&follower_metrics, "tally_raft_is_leader", None), 0.0);
    // Every node applies, and says what it took and what CPU it used (a follower too, which may
    // not have applied the last few entries yet).
    for metrics in [&after, &follower_metrics] {
        assert!(sample(metrics, "tally_apply_seconds_count", None) >= 10.0);
        assert!(sample(metrics, "tally_applied_events_total", None) >= 500.0);
        assert!(sample(metrics, "tally_process_cpu_seconds_total", None) > 0.0);
        assert!(metrics.contains("tally_process_run_wait_seconds_total "));
    }
    // Every metric the Grafana dashboard queries is one a node serves.
    let dashboard = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/tally.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tally_"))
            {
                let served = ["", "_bucket", "_sum", "_count"].iter().any(|suffix| {
                    word.strip_suffix(suffix).is_some_and(|base| after.contains(&format!("# TYPE {base} ")))
                });
                assert!(served, "the dashboard queries {word}, which no node serves");
                queried += 1;
            }
        }
    }
    assert!(queried >= 10);
}

/// A node made leader while it still has entries to apply hands leadership at once to a voter
/// that has applied them, so that writes do not wait for its backlog (Raft elects on the log,
/// and the leader keeps two entries in flight until it has applied them: a leader with a backlog
/// proposed nothing new until it had caught up). Node 3 applies every entry 20 ms slower (a test
/// hook), so under load it trails the others by hundreds of entries; made leader, it hands over,
/// and the load goes on with no gap of 2 s without an acknowledged write (before, the gap lasted
/// as long as its backlog: seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_backlog_to_apply_hands_leadership_over() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    if leader == 3 {
        client.transfer_leader(1).await.expect("leadership away from node 3");
    }
    cluster.stop(3);
    cluster.restart_with(3, &["--apply-delay-ms", "20"]);
    let writers = Writers::start(&client, 4);
    let started = Instant::now();
    loop {
        let statuses = cluster.node_statuses().await;
        let most = statuses.values().map(|s| s.applied_index).max().unwrap_or(0);
        if statuses.get(&3).is_some_and(|s| s.last_log_index > 0 && most > s.applied_index + 300) {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "node 3 never trailed: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = Instant::now();
    client.transfer_leader(3).await.expect("leadership to node 3");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (count, longest) = writers.stop(moved).await;
    assert!(count > 10, "{count} writes after the transfer\n{}", cluster.log_tails());
    assert!(longest < Duration::from_secs(2), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    let leader = cluster.wait_for_leader(DEADLINE).await;
    assert_ne!(leader, 3, "node 3 kept leading with its backlog");
    assert!(cluster.log_tails().contains("handing leadership to node"), "{}", cluster.log_tails());
}

/// Concurrent writers of single transfers from BANK to account 2, each with ids of its own,
/// recording when each write was acknowledged.
struct Writers {
    acks: Arc<std::sync::Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(client: &Arc<Client>, count: u128) -> Writers {
        let acks = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..count)
            .map(|writer| {
                let (client, acks, stop) = (client.clone(), acks.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut id = 1_000_000_000 * (writer + 1);
                    while !stop.load(Ordering::Relaxed) {
                        id += 1;
                        // An unknown outcome is retried with the same id.
                        while client.create_transfers(vec![transfer(id, BANK, 2, 1)]).await.is_err() {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        acks.lock().unwrap().push(Instant::now());
                    }
                })
            })
            .collect();
        Writers { acks, stop, tasks }
    }

    /// How many writes were acknowledged after `since`, so far, and the longest time from `since`
    /// on without one (to the last one, or to now).
    fn acks_since(&self, since: Instant) -> (usize, Duration) {
        let acks: Vec<Instant> = self.acks.lock().unwrap().clone();
        longest_gap(acks, since, Instant::now())
    }

    /// Stops the writers; how many writes were acknowledged after `since`, and the longest time
    /// from `since` on without an acknowledged write (to the last one, or to now).
    async fn stop(self, since: Instant) -> (usize, Duration) {
        let stopped = Instant::now();
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let acks: Vec<Instant> = self.acks.lock().unwrap().clone();
        longest_gap(acks, since, stopped)
    }
}

/// How many of `acks` came at or after `since`, and the longest time from `since` to `until`
/// without one.
fn longest_gap(mut acks: Vec<Instant>, since: Instant, until: Instant) -> (usize, Duration) {
    acks.retain(|at| *at >= since);
    acks.sort();
    let mut last = since;
    let mut longest = Duration::ZERO;
    for at in acks.iter().copied().chain([until]) {
        longest = longest.max(at.saturating_duration_since(last));
        last = at;
    }
    (acks.len(), longest)
}

/// The status of node `id` as the cluster reports it.
async fn member_status(client: &Client, id: u64) -> Option<v1::NodeStatus> {
    client.cluster_status().await.ok()?.nodes.into_iter().find(|n| n.id == id)
}

/// A follower SIGKILLed under load until the leader has snapshotted well over the old 1,000
/// entries past its log catches up from the leader's log when it comes back: the log behind a
/// snapshot is kept by bytes and age (before, it was purged to 1,000 entries behind, and the
/// follower got the whole state). No snapshot is sent, writes never stop for 1 s, and status
/// says when the follower is back to full redundancy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_away_for_thousands_of_entries_catches_up_from_the_log() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--snapshot-entries", "500"]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let writers = Writers::start(&client, 4);
    wait_for_writes(&cluster, 50).await;
    let away_at = cluster.node_statuses().await[&follower].last_log_index;
    let killed = Instant::now();
    cluster.kill(follower);
    // A leader keeps what a replication still reads, and the one to the dead follower reads from
    // where it stopped; a new leader has no such read. It had purged to 1,000 entries behind
    // its snapshots.
    wait_for_writes(&cluster, 500).await;
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    client.transfer_leader(other).await.expect("leadership to the other live node");
    let leader = other;
    loop {
        let status = member_status(&client, leader).await;
        if status.as_ref().is_some_and(|s| s.snapshot_index > away_at + 2_000) {
            break;
        }
        assert!(killed.elapsed() < DEADLINE, "the leader did not snapshot past {away_at}: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = member_status(&client, follower).await.expect("status");
    assert_eq!(status.redundancy(), v1::Redundancy::Down);
    cluster.restart(follower);
    let started = Instant::now();
    let caught_up = loop {
        let status = member_status(&client, follower).await;
        if status.as_ref().is_some_and(|s| s.redundancy() == v1::Redundancy::UpToDate) {
            break status.unwrap();
        }
        assert!(started.elapsed() < DEADLINE, "node {follower} did not catch up: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "node {follower} up to date {:?} after its restart, at {} of {}",
        started.elapsed(),
        caught_up.applied_index,
        caught_up.last_log_index
    );
    let (count, longest) = writers.stop(killed).await;
    assert!(count > 2_000, "{count} writes");
    assert!(longest < Duration::from_secs(1), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    for id in 1..=3 {
        let metrics = cluster.scrape(id).await;
        assert_eq!(sample(&metrics, "tally_snapshots_sent_total", None), 0.0, "node {id} sent a snapshot");
        assert_eq!(sample(&metrics, "tally_snapshots_received_total", None), 0.0, "node {id} got one");
    }
    cluster.wait_for_convergence(DEADLINE).await;
}

/// A follower restarted under load, then the leader SIGKILLed: writes resume within a second,
/// whoever wins (before: ~3.7 s when the restarted node won with a backlog to apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_just_after_a_follower_restarted_stops_writes_for_under_a_second() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let writers = Writers::start(&client, 4);
    wait_for_writes(&cluster, 50).await;
    cluster.kill(follower);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(follower);
    // As soon as the follower answers again, while it replays and catches up.
    let started = Instant::now();
    while member_status(&client, follower).await.is_none_or(|s| !s.reachable) {
        assert!(started.elapsed() < DEADLINE, "node {follower} did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (count, longest) = writers.stop(killed).await;
    eprintln!("node {new_leader} leads; longest time without a write after the kill: {longest:?}");
    assert!(count > 100, "{count} writes after the kill");
    assert!(longest < Duration::from_secs(1), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    cluster.restart(leader);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// Restarts follower `slow` applying every entry 20 ms slower (a test hook) and writes with four
/// writers until it trails the most applied node by 300 entries; returns the writers, still
/// writing.
async fn trail_in_applying(cluster: &mut TestCluster, client: &Arc<Client>, slow: u64) -> Writers {
    cluster.stop(slow);
    cluster.restart_with(slow, &["--apply-delay-ms", "20"]);
    let writers = Writers::start(client, 4);
    let started = Instant::now();
    loop {
        let statuses = cluster.node_statuses().await;
        let most = statuses.values().map(|s| s.applied_index).max().unwrap_or(0);
        if statuses.get(&slow).is_some_and(|s| s.last_log_index > 0 && most > s.applied_index + 300) {
            return writers;
        }
        assert!(started.elapsed() < DEADLINE, "node {slow} never trailed: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A follower far behind in applying (a test hook adds 20 ms to each of its applies, so it trails
/// by thousands of entries under four writers) holds the whole log, so Raft would elect it as
/// readily as the follower that applied everything, and writes would then wait seconds for its
/// backlog (issue 24: 4-19 s in the ten-minute runs, where a restarted node had the log within a
/// second and applied it at 7-10 entries a second). It does not stand while it expects its
/// backlog to take longer than half a second (`node::standing`): once the leader is killed, the
/// other follower leads and writes resume within a second. The writers pause before the kill so
/// that both followers hold the same log (else the one behind in applying may also lack the last
/// entries and lose anyway), and it runs twice: a coin toss between the two would fail it three
/// times in four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_in_applying_does_not_win_when_the_leader_is_lost() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    for round in 0..2 {
        let leader = cluster.wait_for_leader(DEADLINE).await;
        let mut followers = (1..=3).filter(|id| *id != leader);
        let (slow, other) = (followers.next().unwrap(), followers.next().unwrap());
        let started = Instant::now();
        let writers = trail_in_applying(&mut cluster, &client, slow).await;
        writers.stop(started).await;
        loop {
            let statuses = cluster.node_statuses().await;
            let logs: BTreeSet<u64> = statuses.values().map(|s| s.last_log_index).collect();
            if statuses.len() == 3 && logs.len() == 1 {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "the logs never converged: {statuses:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_for_log(&cluster, slow, &["does not stand for election"]).await;
        let killed = Instant::now();
        cluster.kill(leader);
        let writers = Writers::start(&client, 4);
        let new_leader = cluster.wait_for_leader(DEADLINE).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (count, longest) = writers.stop(killed).await;
        eprintln!(
            "round {round}: node {new_leader} leads; longest time without a write after the kill: {longest:?}"
        );
        assert_eq!(new_leader, other, "node {slow}, behind in applying, won\n{}", cluster.log_tails());
        // The new leader's only follower answering is the slow one, seconds behind: it paces on
        // it (`pace`, WAIT_MAX per entry), a few entries a second of these single transfers.
        assert!(count > 20, "{count} writes after the kill");
        assert!(longest < Duration::from_secs(1), "writes stopped for {longest:?}\n{}", cluster.log_tails());
        cluster.stop(slow);
        cluster.restart(slow);
        cluster.restart(leader);
        cluster.wait_for_convergence(DEADLINE).await;
    }
}

/// A frozen leader (SIGSTOP: its connections stay open and never answer) held every client's
/// call for the client's whole attempt budget, half its deadline, although the others elected a
/// new leader in a few hundred ms: the harness's pauses of the leader's site stopped writes for
/// exactly 1.00 s with its 2-s deadline (issue 24). A waiting client now asks the other nodes
/// where the leader is and moves there: writes resume well within the budget (3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_holds_writes_for_less_than_a_client_attempt() {
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let client = Arc::new(cluster.client(Duration::from_secs(6)));
    create_accounts(&client, 1..=2).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let writers = Writers::start(&client, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frozen = Instant::now();
    cluster.freeze(leader);
    let deadline = Instant::now() + DEADLINE;
    let new_leader = loop {
        let statuses = cluster.node_statuses().await;
        if let Some(status) = statuses.values().find(|s| s.is_leader && s.id != leader) {
            break status.id;
        }
        assert!(Instant::now() < deadline, "no new leader: {statuses:?}\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (count, longest) = writers.stop(frozen).await;
    eprintln!("node {new_leader} leads; longest time without a write after the freeze: {longest:?}");
    assert!(count > 20, "{count} writes after the freeze\n{}", cluster.log_tails());
    assert!(longest < Duration::from_secs(2), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    cluster.thaw(leader);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// The survivor that applied everything may lack the dead leader's last entries: Raft then
/// elects only the other survivor, which holds them but is behind in applying and holds back its
/// candidacy (`node::standing`), and writes waited its whole patience (3 s) before it stood, won
/// and handed over (a ten-minute run at rush hour, 2026-12-07). It stands at once when it refuses
/// its vote to a candidate with a shorter log. Here the fast follower is frozen while the leader
/// and the slow one (20 ms more per apply, hundreds of entries behind) commit more; then the
/// leader is killed and the fast one thawed: the slow one says why it stands, and writes resume
/// before its patience would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_in_applying_stands_at_once_when_the_other_lacks_entries() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let mut followers = (1..=3).filter(|id| *id != leader);
    let (slow, fast) = (followers.next().unwrap(), followers.next().unwrap());
    let started = Instant::now();
    let writers = trail_in_applying(&mut cluster, &client, slow).await;
    cluster.freeze(fast);
    let frozen_at = cluster.node_statuses().await.get(&leader).map_or(0, |s| s.last_log_index);
    loop {
        let statuses = cluster.node_statuses().await;
        if statuses.get(&slow).is_some_and(|s| s.last_log_index > frozen_at + 3) {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "nothing committed without node {fast}: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writers.stop(started).await;
    wait_for_log(&cluster, slow, &["does not stand for election"]).await;
    let killed = Instant::now();
    cluster.kill(leader);
    cluster.thaw(fast);
    let writers = Writers::start(&client, 4);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (count, longest) = writers.stop(killed).await;
    eprintln!("node {new_leader} leads; longest time without a write after the kill: {longest:?}");
    wait_for_log(&cluster, slow, &["stands again (a candidate with a shorter log asked for its vote)"]).await;
    // Paced on the slow follower, the only one answering (`pace`): a few entries a second.
    assert!(count > 20, "{count} writes after the kill\n{}", cluster.log_tails());
    // Under the slow node's patience (`node::standing::PATIENCE_MAX`, 3 s).
    assert!(longest < Duration::from_secs(3), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    cluster.stop(slow);
    cluster.restart(slow);
    cluster.restart(leader);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// Followers that apply slower than the leader commits (a test hook adds 5 ms to each of their
/// applies; the leader applies as fast as it can) would fall behind without bound, and a new
/// leader answers no write before it has applied its backlog: at rush hour followers fell
/// 10-15 s behind and each lost leader stopped writes for 6-12 s (issue 24). The leader keeps
/// pace with the follower that would take over (`pace`): after 10 s of load, once the leader is
/// killed, writes resume within 3 s (an election and ~1 s of applying, the most it lets a
/// follower trail by; 7.2 s without it, and growing with the load's length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_keeps_pace_with_slow_followers_so_that_losing_it_stops_writes_briefly() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    for follower in (1..=3).filter(|id| *id != leader) {
        cluster.stop(follower);
        cluster.restart_with(follower, &["--apply-delay-ms", "5"]);
    }
    cluster.wait_for_convergence(DEADLINE).await;
    assert_eq!(cluster.wait_for_leader(DEADLINE).await, leader, "leadership moved");
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let writers = Writers::start(&client, 16);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let metrics = cluster.scrape(leader).await;
    let waits = sample(&metrics, "tally_pace_wait_seconds_count", None);
    let lag_ms = sample(&metrics, "tally_follower_apply_lag_ms", None);
    let statuses = cluster.node_statuses().await;
    let applied: Vec<(u64, u64)> = statuses.iter().map(|(id, s)| (*id, s.applied_index)).collect();
    eprintln!("proposals held back: {waits}; the better follower's lag: {lag_ms} ms; applied: {applied:?}");
    assert!(waits > 0.0, "the leader never waited for its followers: {statuses:?}");
    let killed = Instant::now();
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (count, longest) = writers.stop(killed).await;
    eprintln!("longest time without a write after the kill: {longest:?}");
    assert!(count > 20, "{count} writes after the kill\n{}", cluster.log_tails());
    assert!(longest < Duration::from_secs(3), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    cluster.restart(leader);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// A restarted node takes part in the quorum as soon as its log is open, and applies what its
/// state lacks as it goes: openraft used to re-apply the whole backlog before the node answered
/// anything, and at rush hour a node whose state trailed its log by two checkpoints was out of
/// the quorum for 12.2 s after a kill (issue 24). Here nothing is checkpointed, so the follower's
/// state holds nothing of the load, and it comes back applying every entry 20 ms slower (a test
/// hook): its backlog of over 500 entries takes more than 10 s to apply. The other follower is
/// killed first, so the leader commits through the restarted node alone: writes resume within
/// seconds of its restart, well before its backlog is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_counts_toward_the_quorum_before_it_has_applied_its_backlog() {
    let args = ["--checkpoint-interval-ms", "3600000", "--checkpoint-bytes", "1GiB"];
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &args);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let mut followers = (1..=3).filter(|id| *id != leader);
    let (restarted, killed) = (followers.next().unwrap(), followers.next().unwrap());
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let writers = Writers::start(&client, 4);
    wait_for_writes(&cluster, 600).await;
    cluster.kill(restarted);
    cluster.kill(killed);
    let started = Instant::now();
    cluster.restart_with(restarted, &["--apply-delay-ms", "20"]);
    let statuses = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (count, _) = writers.acks_since(started);
        if count >= 20 {
            break cluster.node_statuses().await;
        }
        assert!(started.elapsed() < DEADLINE, "no writes after the restart\n{}", cluster.log_tails());
    };
    let resumed = started.elapsed();
    let status = &statuses[&restarted];
    eprintln!(
        "writes resumed {resumed:?} after node {restarted}'s restart; it has applied {} of {}",
        status.applied_index, status.last_log_index
    );
    assert!(
        status.applied_index + 100 < status.last_log_index,
        "node {restarted} had applied its backlog before writes resumed: {status:?}\n{}",
        cluster.log_tails()
    );
    assert!(
        resumed < Duration::from_secs(5),
        "writes resumed only after {resumed:?}\n{}",
        cluster.log_tails()
    );
    writers.stop(started).await;
    cluster.restart(killed);
    cluster.wait_for_convergence(DEADLINE).await;
}

/// At capacity the flood is refused, not the payment service that waits for each answer: one
/// connection's 16 writers of full batches keep the leader past capacity (every apply slowed to
/// 50 ms) and are refused again and again, while another connection's single transfers, one at
/// a time, all go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_capacity_a_flood_is_refused_before_a_client_that_waits_for_each_answer() {
    let args = ["--apply-delay-ms", "50", "--max-queue-wait-ms", "20"];
    let cluster = TestCluster::start(Path::new(TALLY), &SITES, &args);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let flood = Arc::new(cluster.client_of(&[leader], Duration::from_secs(30)));
    let payments = cluster.client_of(&[leader], Duration::from_secs(30));
    create_accounts(&flood, 1..=2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let batch = ledger::BATCH_EVENTS_MAX as u128;
    let writers: Vec<_> = (0..16u128)
        .map(|writer| {
            let (flood, stop, refused) = (flood.clone(), stop.clone(), refused.clone());
            tokio::spawn(async move {
                let mut first = 10_000_000 + writer * 1_000_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let transfers = (first..first + batch).map(|id| transfer(id, BANK, 2, 1)).collect();
                    match flood.create_transfers(transfers).await {
                        Ok(_) => first += batch,
                        Err(Error::Rejected(status)) if status.code() == tonic::Code::ResourceExhausted => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(error) => panic!("flood batch from {first}: {error}"),
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    while refused.load(Ordering::Relaxed) == 0 {
        assert!(started.elapsed() < DEADLINE, "the flood never reached capacity");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused_before = refused.load(Ordering::Relaxed);
    let paying = Instant::now();
    for id in 1..=5u128 {
        let results = payments.create_transfers(vec![transfer(id, BANK, 2, 1)]).await;
        let results =
            results.unwrap_or_else(|error| panic!("payment {id} while the flood is refused: {error}"));
        assert!(results.iter().all(|r| r.status() == v1::CreateTransferStatus::Ok), "{results:?}");
    }
    let refused_during = refused.load(Ordering::Relaxed) - refused_before;
    eprintln!("5 payments in {:?}; {refused_during} flood batches refused meanwhile", paying.elapsed());
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(refused_during > 0, "the flood was not refused while the payments went through");
}

/// A follower that lost its disk is replaced under load after the leader purged its log: it
/// receives the whole state (a snapshot) while the load goes on, writes never stop for 1 s, and
/// status says when it is up to date again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_node_receives_the_state_under_load_and_writes_never_stop() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &[]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let wiped = (1..=3).find(|id| *id != leader).unwrap();
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    create_accounts(&client, 1..=2).await;
    let started = Instant::now();
    while !client.cluster_status().await.is_ok_and(|s| s.nodes.iter().all(|n| n.recorded_incarnation != 0)) {
        assert!(started.elapsed() < DEADLINE, "the leader did not record every incarnation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writers = Writers::start(&client, 4);
    wait_for_writes(&cluster, 300).await;
    cluster.kill(wiped);
    cluster.wipe(wiped);
    cluster.restart(wiped);
    // Nothing of the log is left to catch up from.
    client.take_snapshot(true).await.expect("snapshot and purge");
    let since = Instant::now();
    let replaced = client.replace_node(wiped).await.expect("replace");
    let node = replaced.nodes.iter().find(|n| n.id == wiped).unwrap();
    assert_eq!((node.role(), node.needs_replace), (v1::NodeRole::Voter, false), "{node:?}");
    loop {
        let status = member_status(&client, wiped).await;
        if status.as_ref().is_some_and(|s| s.redundancy() == v1::Redundancy::UpToDate) {
            break;
        }
        assert!(since.elapsed() < DEADLINE, "node {wiped} did not catch up: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (count, longest) = writers.stop(since).await;
    eprintln!("node {wiped} replaced and up to date in {:?}; {count} writes meanwhile", since.elapsed());
    assert!(longest < Duration::from_secs(1), "writes stopped for {longest:?}\n{}", cluster.log_tails());
    let metrics = cluster.scrape(wiped).await;
    assert!(sample(&metrics, "tally_snapshots_received_total", None) >= 1.0, "no snapshot installed");
    cluster.wait_for_convergence(DEADLINE).await;
}
