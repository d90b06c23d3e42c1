//! Measurements of a real three-site cluster on 127.0.0.1 (release build of `tally`):
//!
//! - `failover [rounds]`: SIGKILL the leader under a write load; time from the kill to the next
//!   successful write, per round; median and worst.
//! - `catchup [transfers]`: a follower is down while `transfers` transfers are written (batches of
//!   1000); time from its restart until it has applied everything and its digest matches.
//!
//! `cargo build --release && cargo run --release -p raft-node --example measure -- failover 10`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_node::testkit::TestCluster;
use tally_client::{Client, u128_to, v1};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const DEADLINE: Duration = Duration::from_secs(60);

fn tally_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/release/examples/measure -> target/release/tally
    exe.parent().and_then(|p| p.parent()).map(|p| p.join("tally")).expect("target dir")
}

fn transfer(id: u128, amount: u128) -> v1::Transfer {
    v1::Transfer {
        id: u128_to(id),
        debit_account_id: u128_to(1),
        credit_account_id: u128_to(2),
        amount: u128_to(amount),
        ledger: 1,
        code: 1,
        ..v1::Transfer::default()
    }
}

async fn setup(cluster: &TestCluster) -> Client {
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client(Duration::from_secs(10));
    let accounts =
        (1..=2u128).map(|id| v1::Account { id: u128_to(id), ledger: 1, code: 1, ..v1::Account::default() });
    client.create_accounts(accounts.collect()).await.expect("accounts");
    client
}

async fn failover_round(round: u64) -> Duration {
    let mut cluster = TestCluster::start(&tally_binary(), &SITES, &[]);
    let client = Arc::new(setup(&cluster).await);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let stop = Arc::new(AtomicBool::new(false));
    let successes = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let writer = {
        let (client, stop, successes) = (client.clone(), stop.clone(), successes.clone());
        tokio::spawn(async move {
            let mut id = round as u128 * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                if client.create_transfers(vec![transfer(id, 1)]).await.is_ok() {
                    successes.lock().unwrap().push(Instant::now());
                    id += 1;
                }
            }
        })
    };
    while successes.lock().unwrap().len() < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = Instant::now();
    cluster.kill(leader);
    let resumed = loop {
        if let Some(t) = successes.lock().unwrap().iter().find(|t| **t > killed) {
            break *t;
        }
        assert!(killed.elapsed() < DEADLINE, "writes did not resume");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    resumed - killed
}

async fn catchup(transfers: u128) {
    let mut cluster = TestCluster::start(&tally_binary(), &SITES, &[]);
    let client = setup(&cluster).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let lagging = *cluster.nodes.keys().find(|id| **id != leader).unwrap();
    cluster.kill(lagging);
    let started = Instant::now();
    let mut id = 1_000u128;
    while id < 1_000 + transfers {
        let batch: Vec<_> = (id..(id + 1000).min(1_000 + transfers)).map(|i| transfer(i, 1)).collect();
        id += batch.len() as u128;
        client.create_transfers(batch).await.expect("write");
    }
    println!("wrote {transfers} transfers in {:?} with node {lagging} down", started.elapsed());
    let restarted = Instant::now();
    cluster.restart(lagging);
    cluster.wait_for_convergence(Duration::from_secs(600)).await;
    println!("node {lagging} caught up {transfers} transfers in {:?} after restart", restarted.elapsed());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("failover") => {
            let rounds: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10);
            let mut times = Vec::new();
            for round in 0..rounds {
                let time = failover_round(round).await;
                println!("round {round}: first write {time:?} after SIGKILL of the leader");
                times.push(time);
            }
            times.sort();
            println!(
                "median {:?}, worst {:?} over {rounds} rounds",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
        Some("catchup") => catchup(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100_000)).await,
        _ => eprintln!("usage: measure failover [rounds] | catchup [transfers]"),
    }
}
