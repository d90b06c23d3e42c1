//! Background load: an open-loop stream of payments next to the checked bank workload, so that
//! every fault strikes a busy cluster (DESIGN.md decision 14: a guarantee shown only at a
//! hundred transfers a second is not yet shown).
//!
//! It sends `rate` transfers a second on schedule, whatever the cluster does: batches of
//! `batch` transfers, and after each batch one single-transfer request (the per-request path).
//! Its accounts are on their own ledger (`LOAD_LEDGER`), so the bank's accounts, which the
//! checkers read, are never touched by it. Each completed request is recorded
//! (`Record::Load`): when it finished, how long it took, how many transfers it carried and
//! whether they were acknowledged. The report turns these into write outages and latency under
//! load; the checkers that cover the whole state (`nodes-agree`) see its effects too.
//!
//! A request that would exceed `IN_FLIGHT_MAX` is not sent and counted as shed: an open loop
//! must not pile up unbounded work in the harness while the cluster is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tally_client::{Client, u128_to, v1};

use crate::history::{LoadSample, Record};
use crate::workload::Recorder;

/// The load's accounts live on this ledger; the bank's on another.
pub const LOAD_LEDGER: u32 = 7;
/// Accounts the load moves money between, without limits.
pub const LOAD_ACCOUNTS: u64 = 1000;
/// Their ids start here, far from the bank's.
const LOAD_ACCOUNT_ID_BASE: u128 = 1 << 80;
/// Transfer ids of the load; the bank's are small numbers.
const LOAD_TRANSFER_ID_BASE: u128 = 1 << 100;
/// Requests of the load outstanding at once; more are shed.
pub const IN_FLIGHT_MAX: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Transfers per second.
    pub rate: f64,
    /// Transfers per batch request.
    pub batch: usize,
    /// Deadline of one request, retries on other nodes included.
    pub timeout: Duration,
    pub seed: u64,
}

/// Creates the load's accounts.
pub async fn open(client: &Client) -> Result<(), String> {
    let accounts: Vec<v1::Account> = (0..LOAD_ACCOUNTS)
        .map(|i| v1::Account {
            id: u128_to(LOAD_ACCOUNT_ID_BASE + u128::from(i)),
            ledger: LOAD_LEDGER,
            code: 1,
            ..v1::Account::default()
        })
        .collect();
    let results = client.create_accounts(accounts).await.map_err(|e| format!("load accounts: {e}"))?;
    match results
        .iter()
        .find(|r| !matches!(r.status(), v1::CreateAccountStatus::Ok | v1::CreateAccountStatus::Exists))
    {
        Some(refused) => Err(format!("a load account was refused: {:?}", refused.status())),
        None => Ok(()),
    }
}

/// Sends the load until `stop`; records every completed request.
pub async fn run(
    options: LoadOptions,
    client: Arc<Client>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed ^ 0x10ad);
    let period = Duration::from_secs_f64((options.batch + 1) as f64 / options.rate);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut next_id = LOAD_TRANSFER_ID_BASE;
    let mut requests = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        for size in [options.batch, 1] {
            let transfers = random_transfers(&mut rng, &mut next_id, size);
            if in_flight.load(Ordering::Relaxed) >= IN_FLIGHT_MAX {
                let sample = LoadSample {
                    time_us: recorder.now_us(),
                    latency_us: 0,
                    transfers: size,
                    outcome: "shed".into(),
                };
                recorder.record(Record::Load(sample)).await?;
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (client, recorder, in_flight) = (client.clone(), recorder.clone(), in_flight.clone());
            requests.spawn(async move {
                let sent_us = recorder.now_us();
                let outcome = outcome(client.create_transfers(transfers).await);
                let time_us = recorder.now_us();
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let sample = LoadSample { time_us, latency_us: time_us - sent_us, transfers: size, outcome };
                recorder.record(Record::Load(sample)).await
            });
        }
        while let Some(done) = requests.try_join_next() {
            done.map_err(|e| format!("load request: {e}"))??;
        }
    }
    while let Some(done) = requests.join_next().await {
        done.map_err(|e| format!("load request: {e}"))??;
    }
    Ok(())
}

fn random_transfers(rng: &mut impl Rng, next_id: &mut u128, count: usize) -> Vec<v1::Transfer> {
    (0..count)
        .map(|_| {
            let debit = rng.random_range(0..LOAD_ACCOUNTS);
            let credit = (debit + rng.random_range(1..LOAD_ACCOUNTS)) % LOAD_ACCOUNTS;
            *next_id += 1;
            v1::Transfer {
                id: u128_to(*next_id),
                debit_account_id: u128_to(LOAD_ACCOUNT_ID_BASE + u128::from(debit)),
                credit_account_id: u128_to(LOAD_ACCOUNT_ID_BASE + u128::from(credit)),
                amount: u128_to(rng.random_range(1..=100)),
                ledger: LOAD_LEDGER,
                code: 1,
                ..v1::Transfer::default()
            }
        })
        .collect()
}

/// "ok" if every transfer was created (or already was: the client re-sent a request whose first
/// attempt took effect unseen, and `EXISTS` is its idempotent answer), "failed" with the first
/// refusal's name if the cluster refused one (a bug: these accounts have no limits), "busy" if
/// the cluster pushed back, "unknown" if no answer came in time.
fn outcome(reply: Result<Vec<v1::CreateTransferResult>, tally_client::Error>) -> String {
    use v1::CreateTransferStatus::{Exists, Ok as Created};
    match reply {
        Ok(results) => match results.iter().find(|r| !matches!(r.status(), Created | Exists)) {
            None => "ok".into(),
            Some(refused) => format!("failed: {}", refused.status().as_str_name()),
        },
        // A full queue on the leader pushing back: the cluster is saturated, not wrong.
        Err(tally_client::Error::Rejected(status)) if status.code() == tonic::Code::ResourceExhausted => {
            "busy".into()
        }
        Err(tally_client::Error::Rejected(status)) => {
            format!("failed: {:?} {}", status.code(), status.message())
        }
        Err(tally_client::Error::Unavailable(_)) => "unknown".into(),
    }
}
