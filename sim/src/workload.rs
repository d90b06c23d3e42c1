//! The client host: a bank's accounts, concurrent writers moving money between them, and the
//! final audit of what the client was told against the ledger it reads back.
//!
//! A writer sends a batch of transfers with fresh ids to a node drawn from the seed. An answer
//! with every result `OK` or `EXISTS` acknowledges them. Anything else (a timeout, an error, a
//! node that is down) leaves the outcome unknown: the writer sends the same batch, same ids, to
//! another node until it is acknowledged (`EXISTS` on a retry means the first attempt took
//! effect). When the writers stop, a batch still unknown may or may not have taken effect; the
//! audit allows both, as a payment service's reconciliation must.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use raft_node::convert::{u128_from, u128_to};
use rand::{Rng, SeedableRng};
use tally_proto::v1 as pb;
use tally_proto::v1::ledger_client::LedgerClient;
use tonic::transport::Channel;

use crate::{CLIENT_PORT, HEAL_BEFORE_END, LIVENESS_BOUND, WRITES_STOP_BEFORE_END, World, now};

/// The bank's accounts (ids 1..=ACCOUNTS), on ledger 1, without balance limits.
const ACCOUNTS: u64 = 8;
/// Writers sending at once.
const WRITERS: u64 = 4;
/// Transfers in one request, at most.
const BATCH_MAX: u64 = 3;
/// How long a writer waits for an answer before it counts the outcome unknown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// A transfer the client sent: debit account, credit account, amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    debit: u64,
    credit: u64,
    amount: u64,
}

#[derive(Default)]
struct Book {
    /// Every transfer sent, by id.
    sent: BTreeMap<u128, Sent>,
    /// Acknowledged ids, with the simulated time of the acknowledgement.
    acknowledged: BTreeMap<u128, Duration>,
    /// When each transfer was first sent (simulated time).
    first_sent: BTreeMap<u128, Duration>,
    /// Per account, the amounts debited and credited by the transfers acknowledged so far.
    acknowledged_sums: BTreeMap<u64, (u128, u128)>,
    /// Per account, the amounts debited and credited by every transfer sent so far.
    sent_sums: BTreeMap<u64, (u128, u128)>,
}

impl Book {
    fn add(sums: &mut BTreeMap<u64, (u128, u128)>, sent: Sent) {
        sums.entry(sent.debit).or_default().0 += u128::from(sent.amount);
        sums.entry(sent.credit).or_default().1 += u128::from(sent.amount);
    }
}

/// Runs the workload and audits it; the first broken guarantee, if any.
pub async fn run(world: Arc<World>) -> Result<(), String> {
    let nodes: Vec<LedgerClient<Channel>> = world.ids().map(client).collect();
    let book = Arc::new(std::sync::Mutex::new(Book::default()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(world.options.seed ^ 0xc11e);
    create_accounts(&world, &nodes, &mut rng).await?;
    let writes_stop = world.options.sim_time.saturating_sub(WRITES_STOP_BEFORE_END);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (world, nodes, book) = (world.clone(), nodes.clone(), book.clone());
        let seed = rng.random::<u64>();
        writers.push(tokio::spawn(async move { write(world, nodes, book, writer, seed, writes_stop).await }));
    }
    let reader = {
        let (world, nodes, book) = (world.clone(), nodes.clone(), book.clone());
        let seed = rng.random::<u64>();
        tokio::spawn(async move { read(world, nodes, book, seed, writes_stop).await })
    };
    for writer in writers {
        writer.await.map_err(|e| format!("a writer panicked: {e}"))?;
    }
    reader.await.map_err(|e| format!("the reader panicked: {e}"))??;
    let book = std::mem::take(&mut *book.lock().unwrap());
    check_liveness(&world, &book)?;
    audit(&world, &nodes, &book, &mut rng).await
}

fn channel(id: u64) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://n{id}:{CLIENT_PORT}"))
        .expect("a valid address")
        .connect_timeout(Duration::from_millis(500));
    endpoint.connect_with_connector_lazy(raft_node::security::doors::PlainDialer)
}

fn client(id: u64) -> LedgerClient<Channel> {
    LedgerClient::new(channel(id))
}

/// The operator: removes the voters the simulator names (`tally cluster remove`), through any
/// voter, again until it is done (the site rule refuses while a joining node is not yet a voter),
/// and tells the simulator, which takes the node down.
pub async fn operator(world: Arc<World>, mut removals: tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let mut through = 0usize;
    while let Some(victim) = removals.recv().await {
        loop {
            let voters: Vec<u64> = world.membership.lock().unwrap().voters.iter().copied().collect();
            through = (through + 1) % voters.len();
            let mut cluster = pb::cluster_client::ClusterClient::new(channel(voters[through]));
            let request = pb::RemoveNodeRequest { id: victim, force: false };
            match tokio::time::timeout(REQUEST_TIMEOUT * 5, cluster.remove_node(request)).await {
                Ok(Ok(_)) => {
                    world.record(now(), format_args!("n{victim} is no longer a member"));
                    world.membership.lock().unwrap().removed.push(victim);
                    break;
                }
                Ok(Err(status)) => world.record(
                    now(),
                    format_args!("removing n{victim}: {:?} {}", status.code(), status.message()),
                ),
                Err(_) => world.record(now(), format_args!("removing n{victim}: timeout")),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn create_accounts(
    world: &World,
    nodes: &[LedgerClient<Channel>],
    rng: &mut impl Rng,
) -> Result<(), String> {
    let accounts: Vec<pb::Account> = (1..=ACCOUNTS)
        .map(|id| pb::Account { id: u128_to(id.into()), ledger: 1, code: 1, ..Default::default() })
        .collect();
    loop {
        let mut node = nodes[rng.random_range(0..nodes.len())].clone();
        let request = pb::CreateAccountsRequest { accounts: accounts.clone() };
        if let Ok(Ok(reply)) = tokio::time::timeout(REQUEST_TIMEOUT, node.create_accounts(request)).await {
            let ok = pb::CreateAccountStatus::Ok as i32;
            let exists = pb::CreateAccountStatus::Exists as i32;
            let results = reply.into_inner().results;
            if let Some(bad) = results.iter().find(|r| r.status != ok && r.status != exists) {
                return Err(format!("creating the bank's accounts answered status {}", bad.status));
            }
            world.record(now(), format_args!("accounts created"));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn write(
    world: Arc<World>,
    nodes: Vec<LedgerClient<Channel>>,
    book: Arc<std::sync::Mutex<Book>>,
    writer: u64,
    seed: u64,
    writes_stop: Duration,
) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut sequence = 0u64;
    // As a client library does: stay with the node that answered, move on from one that did not.
    let mut target = rng.random_range(0..nodes.len());
    'batches: while now() < writes_stop {
        let count = rng.random_range(1..=BATCH_MAX);
        let mut transfers = Vec::new();
        for _ in 0..count {
            sequence += 1;
            let id = (u128::from(writer + 1) << 64) | u128::from(sequence);
            let debit = rng.random_range(1..=ACCOUNTS);
            let credit = (debit + rng.random_range(1..ACCOUNTS) - 1) % ACCOUNTS + 1;
            let sent = Sent { debit, credit, amount: rng.random_range(1..=100) };
            {
                let mut book = book.lock().unwrap();
                book.sent.insert(id, sent);
                book.first_sent.insert(id, now());
                Book::add(&mut book.sent_sums, sent);
            }
            transfers.push(pb::Transfer {
                id: u128_to(id),
                debit_account_id: u128_to(debit.into()),
                credit_account_id: u128_to(credit.into()),
                amount: u128_to(sent.amount.into()),
                ledger: 1,
                code: 1,
                ..Default::default()
            });
        }
        // The same batch, same ids, until acknowledged or the writers stop.
        while now() < writes_stop {
            let mut node = nodes[target].clone();
            let request = pb::CreateTransfersRequest { transfers: transfers.clone() };
            match tokio::time::timeout(REQUEST_TIMEOUT, node.create_transfers(request)).await {
                Ok(Ok(reply)) => {
                    let ok = pb::CreateTransferStatus::Ok as i32;
                    let exists = pb::CreateTransferStatus::Exists as i32;
                    let results = reply.into_inner().results;
                    let at = now();
                    if results.len() == transfers.len()
                        && results.iter().all(|r| r.status == ok || r.status == exists)
                    {
                        let mut book = book.lock().unwrap();
                        for transfer in &transfers {
                            let id = u128_from(transfer.id.as_ref());
                            if book.acknowledged.insert(id, at).is_none() {
                                let sent = book.sent[&id];
                                Book::add(&mut book.acknowledged_sums, sent);
                            }
                        }
                        world.acknowledged.fetch_add(transfers.len() as u64, Ordering::Relaxed);
                        let first = u128_from(transfers[0].id.as_ref());
                        world.record(at, format_args!("ack w{writer} {first:x}+{}", transfers.len()));
                        continue 'batches;
                    }
                    // A business rejection of a transfer between two open accounts without
                    // limits is a wrong answer, not an unknown one; the audit reports it as a
                    // transfer missing from what was acknowledged if it was acknowledged.
                    world.record(at, format_args!("w{writer} refused: {:?}", results));
                }
                Ok(Err(status)) => {
                    world.record(now(), format_args!("w{writer} error: {:?}", status.code()));
                }
                Err(_) => world.record(now(), format_args!("w{writer} timeout")),
            }
            target = (target + 1) % nodes.len();
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..100))).await;
        }
    }
}

/// A reader beside the writers: linearizable lookups, checked against what the client knows at
/// the moment. A transfer acknowledged before the read began must be found, as it was sent; one
/// never sent must not be; each account's posted debits and credits lie between the sums of the
/// transfers acknowledged before the read began and of those sent before it ended. (With
/// `READ_CONSISTENCY_LOCAL` instead, seeds 1, 2, 3, 5, 7 and 8 fail: a follower lags.)
async fn read(
    world: Arc<World>,
    nodes: Vec<LedgerClient<Channel>>,
    book: Arc<std::sync::Mutex<Book>>,
    seed: u64,
    reads_stop: Duration,
) -> Result<(), String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut target = rng.random_range(0..nodes.len());
    let mut reads = 0u64;
    while now() < reads_stop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..300))).await;
        // What must be visible: the newest acknowledged transfers, and a few older ones.
        let (must, floor) = {
            let book = book.lock().unwrap();
            let mut must: Vec<(u128, Sent)> =
                book.acknowledged.keys().rev().take(4).map(|id| (*id, book.sent[id])).collect();
            for _ in 0..4 {
                let nth = rng.random_range(0..book.acknowledged.len().max(1));
                if let Some((id, _)) = book.acknowledged.iter().nth(nth) {
                    must.push((*id, book.sent[id]));
                }
            }
            (must, book.acknowledged_sums.clone())
        };
        let never_sent =
            (u128::from(WRITERS + 1 + rng.random_range(0..4)) << 64) | u128::from(rng.random::<u32>());
        let ids = must.iter().map(|(id, _)| *id).chain([never_sent]).filter_map(u128_to).collect();
        let transfers =
            pb::LookupTransfersRequest { ids, consistency: pb::ReadConsistency::Linearizable as i32 };
        let accounts = pb::LookupAccountsRequest {
            ids: (1..=ACCOUNTS).filter_map(|id| u128_to(id.into())).collect(),
            consistency: pb::ReadConsistency::Linearizable as i32,
        };
        let mut node = nodes[target].clone();
        let read = async {
            let transfers = node.lookup_transfers(transfers).await?.into_inner().transfers;
            let accounts = node.lookup_accounts(accounts).await?.into_inner().accounts;
            Ok::<_, tonic::Status>((transfers, accounts))
        };
        let (transfers, accounts) = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Ok(Ok(read)) => read,
            _ => {
                target = (target + 1) % nodes.len();
                continue;
            }
        };
        let ceiling = book.lock().unwrap().sent_sums.clone();
        let found: BTreeMap<u128, &pb::Transfer> =
            transfers.iter().map(|transfer| (u128_from(transfer.id.as_ref()), transfer)).collect();
        for (id, sent) in &must {
            let Some(transfer) = found.get(id) else {
                return Err(format!(
                    "a linearizable read from n{} at {:.3}s did not find transfer {id:x}, acknowledged before it began",
                    target + 1,
                    now().as_secs_f64()
                ));
            };
            check_as_sent(*id, transfer, sent)?;
        }
        if found.contains_key(&never_sent) {
            return Err(format!("a read found transfer {never_sent:x}, which was never sent"));
        }
        for account in &accounts {
            let id = u128_from(account.id.as_ref()) as u64;
            let posted =
                (u128_from(account.debits_posted.as_ref()), u128_from(account.credits_posted.as_ref()));
            let low = floor.get(&id).copied().unwrap_or_default();
            let high = ceiling.get(&id).copied().unwrap_or_default();
            if posted.0 < low.0 || posted.1 < low.1 || posted.0 > high.0 || posted.1 > high.1 {
                return Err(format!(
                    "a linearizable read from n{} at {:.3}s has account {id} at debits, credits posted {posted:?}: \
                     acknowledged before it began {low:?}, sent before it ended {high:?}",
                    target + 1,
                    now().as_secs_f64()
                ));
            }
        }
        reads += 1;
    }
    world.record(now(), format_args!("reader: {reads} linearizable reads checked"));
    Ok(())
}

/// After the faults stop, the cluster must acknowledge a write within `LIVENESS_BOUND`.
fn check_liveness(world: &World, book: &Book) -> Result<(), String> {
    let healed = world.options.sim_time.saturating_sub(HEAL_BEFORE_END);
    let writes_stop = world.options.sim_time.saturating_sub(WRITES_STOP_BEFORE_END);
    let mut last = healed;
    let mut times: Vec<Duration> = book.acknowledged.values().copied().filter(|at| *at >= healed).collect();
    times.sort();
    for at in times.into_iter().chain([writes_stop]) {
        if at.saturating_sub(last) > LIVENESS_BOUND {
            return Err(format!(
                "no write was acknowledged from {:.3}s to {:.3}s, after the faults had stopped at {:.3}s",
                last.as_secs_f64(),
                at.as_secs_f64(),
                healed.as_secs_f64()
            ));
        }
        last = at;
    }
    Ok(())
}

/// Reads back every transfer sent and every account: each acknowledged transfer is there as sent;
/// a transfer never acknowledged is there as sent or not at all; each account's posted amounts
/// are the sums of the transfers found; debits equal credits.
async fn audit(
    world: &World,
    nodes: &[LedgerClient<Channel>],
    book: &Book,
    rng: &mut impl Rng,
) -> Result<(), String> {
    let ids: Vec<u128> = book.sent.keys().copied().collect();
    let mut found = BTreeMap::new();
    for chunk in ids.chunks(1000) {
        let ids = chunk.iter().filter_map(|id| u128_to(*id)).collect();
        let request =
            pb::LookupTransfersRequest { ids, consistency: pb::ReadConsistency::Linearizable as i32 };
        let reply = retry(nodes, rng, |mut node| {
            let request = request.clone();
            async move { node.lookup_transfers(request).await.map(|r| r.into_inner()) }
        })
        .await?;
        for transfer in reply.transfers {
            found.insert(u128_from(transfer.id.as_ref()), transfer);
        }
    }
    for (id, sent) in &book.sent {
        match found.get(id) {
            Some(transfer) => {
                check_as_sent(*id, transfer, sent)?;
                check_timestamp(*id, transfer.timestamp, book)?;
            }
            None if book.acknowledged.contains_key(id) => {
                return Err(format!(
                    "transfer {id:x}, acknowledged at {:.3}s, is not in the ledger",
                    book.acknowledged[id].as_secs_f64()
                ));
            }
            None => {}
        }
    }
    let request = pb::LookupAccountsRequest {
        ids: (1..=ACCOUNTS).filter_map(|id| u128_to(id.into())).collect(),
        consistency: pb::ReadConsistency::Linearizable as i32,
    };
    let accounts = retry(nodes, rng, |mut node| {
        let request = request.clone();
        async move { node.lookup_accounts(request).await.map(|r| r.into_inner()) }
    })
    .await?
    .accounts;
    let mut expected: BTreeMap<u64, (u128, u128)> = (1..=ACCOUNTS).map(|id| (id, (0, 0))).collect();
    for id in found.keys() {
        let sent = book.sent[id];
        expected.get_mut(&sent.debit).expect("a bank account").0 += u128::from(sent.amount);
        expected.get_mut(&sent.credit).expect("a bank account").1 += u128::from(sent.amount);
    }
    let (mut debits, mut credits) = (0u128, 0u128);
    for account in &accounts {
        let id = u128_from(account.id.as_ref()) as u64;
        let posted = (u128_from(account.debits_posted.as_ref()), u128_from(account.credits_posted.as_ref()));
        if expected.get(&id) != Some(&posted) {
            return Err(format!(
                "account {id} has debits and credits posted {posted:?}, but the transfers in the ledger make {:?}",
                expected.get(&id)
            ));
        }
        debits += posted.0;
        credits += posted.1;
    }
    if accounts.len() as u64 != ACCOUNTS || debits != credits {
        return Err(format!("{} accounts read; debits {debits}, credits {credits}", accounts.len()));
    }
    world.record(
        now(),
        format_args!(
            "audit: {} sent, {} acknowledged, {} in the ledger, {debits} moved",
            book.sent.len(),
            book.acknowledged.len(),
            found.len()
        ),
    );
    Ok(())
}

/// A transfer read back holds the accounts and amount it was sent with.
fn check_as_sent(id: u128, transfer: &pb::Transfer, sent: &Sent) -> Result<(), String> {
    let read = Sent {
        debit: u128_from(transfer.debit_account_id.as_ref()) as u64,
        credit: u128_from(transfer.credit_account_id.as_ref()) as u64,
        amount: u128_from(transfer.amount.as_ref()) as u64,
    };
    if read != *sent {
        return Err(format!("transfer {id:x} reads {read:?}, but {sent:?} was sent"));
    }
    Ok(())
}

/// A transfer's ledger time is within the cluster's clock tolerance of the (simulated) wall
/// clock between its first sending and its acknowledgement, whatever any node's own clock says.
fn check_timestamp(id: u128, timestamp_ns: u64, book: &Book) -> Result<(), String> {
    let tolerance_ns = i128::from(raft_node::clock::TOLERANCE_MS_DEFAULT) * 1_000_000;
    let wall = |at: Duration| i128::from(crate::EPOCH_NS) + at.as_nanos() as i128;
    let earliest = wall(book.first_sent[&id]) - tolerance_ns;
    let stamped = i128::from(timestamp_ns);
    let late = book.acknowledged.get(&id).map(|at| stamped - (wall(*at) + tolerance_ns));
    if stamped < earliest || late.is_some_and(|late| late > 0) {
        return Err(format!(
            "transfer {id:x} is stamped {:.3}s (simulated wall clock), but was sent at {:.3}s and acknowledged at {}: \
             more than the clock tolerance ({} ms) away",
            (stamped - wall(Duration::ZERO)) as f64 / 1e9,
            book.first_sent[&id].as_secs_f64(),
            book.acknowledged.get(&id).map_or("never".into(), |at| format!("{:.3}s", at.as_secs_f64())),
            raft_node::clock::TOLERANCE_MS_DEFAULT
        ));
    }
    Ok(())
}

/// Asks nodes drawn from the seed until one answers, for at most `WRITES_STOP_BEFORE_END`.
async fn retry<T, F, Fut>(nodes: &[LedgerClient<Channel>], rng: &mut impl Rng, call: F) -> Result<T, String>
where
    F: Fn(LedgerClient<Channel>) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let deadline = now() + WRITES_STOP_BEFORE_END;
    let mut last = String::new();
    let mut target = rng.random_range(0..nodes.len());
    while now() < deadline {
        let node = nodes[target].clone();
        target = (target + 1) % nodes.len();
        match tokio::time::timeout(REQUEST_TIMEOUT, call(node)).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(status)) => last = format!("{:?}: {}", status.code(), status.message()),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("the final reads found no node answering: {last}"))
}
