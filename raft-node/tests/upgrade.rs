//! Rolling upgrades (DESIGN.md decision 16): what an entry does belongs to the log, not to the
//! binary. Nodes are replaced one at a time under load, from a build that knows only semantics
//! version 1 (`--semantics-max 1`: the same code paths an older build runs) to the current one;
//! the rules change for every node at one entry, once the last node runs the new build.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft_node::testkit::TestCluster;
use tally_client::{Client, u128_from, u128_to, v1};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(30);
const LEDGER: u32 = 1;
const ACCOUNTS: u128 = 8;

/// Batches of 20 transfers between the accounts until `stop`: every fourth a pending transfer
/// that expires after a second, so that expiries (whose rules changed between versions) happen
/// under both. A batch whose outcome is unknown is sent again with the same ids. Returns the
/// ids acknowledged.
fn start_load(
    client: Arc<Client>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u128>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next = 1_000u128;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<v1::Transfer> = (0..20)
                .map(|i| {
                    let id = next + i;
                    let debit = 1 + id % ACCOUNTS;
                    let credit = 1 + (debit % ACCOUNTS);
                    let pending = id.is_multiple_of(4);
                    v1::Transfer {
                        id: u128_to(id),
                        debit_account_id: u128_to(debit),
                        credit_account_id: u128_to(credit),
                        amount: u128_to(1 + id % 5),
                        ledger: LEDGER,
                        code: 1,
                        flags: if pending { v1::TransferFlag::Pending as u32 } else { 0 },
                        timeout: if pending { 1 } else { 0 },
                        ..v1::Transfer::default()
                    }
                })
                .collect();
            let ids: Vec<u128> = batch.iter().map(|t| u128_from(t.id.as_ref())).collect();
            next += 20;
            loop {
                match client.create_transfers(batch.clone()).await {
                    Ok(results) => {
                        for result in &results {
                            let status = result.status();
                            assert!(
                                matches!(
                                    status,
                                    v1::CreateTransferStatus::Ok | v1::CreateTransferStatus::Exists
                                ),
                                "{status:?}"
                            );
                        }
                        acked.lock().unwrap().extend(&ids);
                        break;
                    }
                    Err(_) if !stop.load(Ordering::Relaxed) => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(_) => return,
                }
            }
        }
    })
}

/// Each running node's (semantics version, newest version known), as it reports them.
async fn semantics(cluster: &TestCluster) -> Vec<(u64, u32, u32)> {
    let statuses = cluster.node_statuses().await;
    statuses.values().map(|s| (s.id, s.semantics_version, s.semantics_known)).collect()
}

async fn acked_len(acked: &Mutex<Vec<u128>>) -> usize {
    acked.lock().unwrap().len()
}

/// Waits until the load has acknowledged `more` transfers beyond what it had.
async fn wait_for_progress(acked: &Mutex<Vec<u128>>, more: usize, cluster: &TestCluster) {
    let target = acked_len(acked).await + more;
    let started = Instant::now();
    while acked_len(acked).await < target {
        assert!(started.elapsed() < DEADLINE, "the load stalled\n{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes of a build that knows semantics 1 only take writes; each is stopped and started
/// on the current build in turn, the leader last, while the load goes on. Until the last one
/// runs the new build every node applies version 1; then the leader switches, and every node
/// reports version 2 at the same entry. At the end the nodes agree on the digest (no member
/// ever reported another digest after the same index), every acknowledged transfer is there,
/// and the books balance. A node started again on the old build refuses to apply the new rules,
/// with what to do, instead of diverging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_under_load_switches_the_rules_at_one_entry() {
    let mut cluster = TestCluster::start(Path::new(TALLY), &SITES, &["--semantics-max", "1"]);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client(Duration::from_secs(10)));
    let accounts: Vec<v1::Account> = (1..=ACCOUNTS)
        .map(|id| v1::Account { id: u128_to(id), ledger: LEDGER, code: 1, ..v1::Account::default() })
        .collect();
    client.create_accounts(accounts).await.unwrap();
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let load = start_load(client.clone(), stop.clone(), acked.clone());
    wait_for_progress(&acked, 500, &cluster).await;
    assert!(semantics(&cluster).await.iter().all(|(_, version, known)| (*version, *known) == (1, 1)));

    // The new build: each node in turn, the leader last.
    cluster.extra_args.clear();
    let mut order: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != leader).collect();
    order.push(leader);
    for (upgraded, id) in order.iter().enumerate() {
        cluster.stop(*id);
        wait_for_progress(&acked, 200, &cluster).await;
        cluster.restart(*id);
        let started = Instant::now();
        loop {
            let now = semantics(&cluster).await;
            if now.iter().any(|(node, _, known)| node == id && *known == 2) {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "node {id} did not come back: {now:?}\n{}",
                cluster.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for_progress(&acked, 300, &cluster).await;
        if upgraded + 1 < order.len() {
            let now = semantics(&cluster).await;
            assert!(
                now.iter().all(|(_, version, _)| *version == 1),
                "the rules changed before every node ran the new build: {now:?}"
            );
        }
    }
    let started = Instant::now();
    loop {
        let now = semantics(&cluster).await;
        if now.len() == 3 && now.iter().all(|(_, version, _)| *version == 2) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "never switched to version 2: {now:?}\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_progress(&acked, 300, &cluster).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    cluster.wait_for_convergence(DEADLINE).await;
    let status = client.cluster_status().await.unwrap();
    assert!(status.divergences.is_empty(), "{:?}", status.divergences);
    let acked: Vec<u128> = acked.lock().unwrap().clone();
    for chunk in acked.chunks(1000) {
        let found = client.lookup_transfers(chunk, v1::ReadConsistency::Linearizable).await.unwrap();
        assert_eq!(found.len(), chunk.len(), "acknowledged transfers missing");
    }
    let ids: Vec<u128> = (1..=ACCOUNTS).collect();
    let accounts = client.lookup_accounts(&ids, v1::ReadConsistency::Linearizable).await.unwrap();
    let sum = |f: fn(&v1::Account) -> u128| accounts.iter().map(f).sum::<u128>();
    assert_eq!(sum(|a| u128_from(a.debits_posted.as_ref())), sum(|a| u128_from(a.credits_posted.as_ref())));
    assert_eq!(sum(|a| u128_from(a.debits_pending.as_ref())), sum(|a| u128_from(a.credits_pending.as_ref())));

    // Back to the old build: refused, with what to do.
    let follower = *order.first().unwrap();
    cluster.stop(follower);
    let mut old = cluster
        .command(follower, false)
        .args(["--semantics-max", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let exited = loop {
        if let Some(status) = old.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = old.kill();
            panic!("a node of the old build started on a ledger at version 2");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut message = String::new();
    std::io::Read::read_to_string(&mut old.stderr.take().unwrap(), &mut message).unwrap();
    assert!(!exited.success());
    assert!(message.contains("semantics version 2"), "{message}");
}
