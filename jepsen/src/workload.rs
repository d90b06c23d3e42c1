//! The workloads: concurrent client processes making payments and reading balances through
//! `tally-client`, each operation recorded before it is sent and when its answer comes.
//!
//! - *bank*: customers on one ledger, funded with a known opening total; single transfers,
//!   linked pairs, pending transfers later posted or voided, transfers too large for any balance
//!   (they must fail on the limit), and reads of every balance (mostly linearizable, some local).
//! - *idempotence*: the same, but a write whose outcome is unknown is re-sent with the same ids,
//!   starting at another node, until a definite answer; it must never take effect twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tally_client::{Client, Error, u128_from, u128_to, v1};
use tokio::sync::Mutex;

use crate::history::{
    Balance, Call, ClockBase, Consistency, Outcome, Phase, Record, Setup, TransferKind, TransferSpec, Writer,
};

/// Records every event with its time since the run started, and counts outcomes for the
/// progress bar.
pub struct Recorder {
    writer: Mutex<Writer>,
    started: Instant,
    /// The wall clock (µs since the Unix epoch) when `started` was taken.
    pub epoch_unix_us: u64,
    next_op: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub unknown: AtomicU64,
}

impl Recorder {
    pub fn new(writer: Writer) -> Recorder {
        Recorder {
            writer: Mutex::new(writer),
            started: Instant::now(),
            epoch_unix_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            next_op: AtomicU64::new(1),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    pub async fn record(&self, record: Record) -> Result<(), String> {
        self.writer.lock().await.write(&record)
    }

    pub async fn invoke(&self, process: u32, call: Call) -> Result<u64, String> {
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        self.record(Record::Invoke { op, process, time_us: self.now_us(), call }).await?;
        Ok(op)
    }

    pub async fn complete(&self, op: u64, process: u32, reply: Reply) -> Result<Outcome, String> {
        let counter = match reply.outcome {
            Outcome::Ok => &self.ok,
            Outcome::Fail => &self.failed,
            Outcome::Info => &self.unknown,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let outcome = reply.outcome;
        let record = Record::Complete {
            op,
            process,
            time_us: self.now_us(),
            outcome,
            codes: reply.codes,
            balances: reply.balances,
            error: reply.error,
        };
        self.record(record).await?;
        Ok(outcome)
    }

    pub async fn nemesis(&self, fault: &str, phase: Phase, detail: String) -> Result<(), String> {
        self.record(Record::Nemesis { time_us: self.now_us(), fault: fault.to_string(), phase, detail }).await
    }
}

/// What came back for one operation.
pub struct Reply {
    pub outcome: Outcome,
    pub codes: Vec<u32>,
    pub balances: Vec<Balance>,
    pub error: Option<String>,
}

impl Reply {
    fn from_error(error: &Error) -> Reply {
        // Only a request refused as malformed certainly did nothing; any other error (timeout,
        // node down, internal) may have come after the write was proposed.
        let outcome = match error {
            Error::Rejected(status) if status.code() == tonic::Code::InvalidArgument => Outcome::Fail,
            _ => Outcome::Info,
        };
        Reply { outcome, codes: Vec::new(), balances: Vec::new(), error: Some(error.to_string()) }
    }
}

use crate::cluster::CLOCK_TOLERANCE_MS;

const LEDGER: u32 = 1;
const CODE: u32 = 1;
const ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS: u32 = 2;

/// The bank's accounts: equity is account 1, customers 2..=customers+1; funding transfers
/// have ids 1..=customers, and every later transfer a fresh id from `next_id`.
pub struct Bank {
    pub setup: Setup,
    next_id: AtomicU64,
}

impl Bank {
    pub fn new(customers: u64, opening: u64) -> Bank {
        let setup = Setup {
            ledger: LEDGER,
            equity: 1,
            customers: (2..customers + 2).collect(),
            opening,
            clock: None,
        };
        Bank { setup, next_id: AtomicU64::new(customers + 1) }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates the accounts and funds every customer, retrying until done or `deadline`.
    /// The funding transfers are recorded as operations of process 0.
    pub async fn open(&self, client: &Client, recorder: &Recorder, deadline: Duration) -> Result<(), String> {
        let clock = ClockBase { epoch_unix_us: recorder.epoch_unix_us, tolerance_ms: CLOCK_TOLERANCE_MS };
        recorder.record(Record::Setup(Setup { clock: Some(clock), ..self.setup.clone() })).await?;
        let started = Instant::now();
        let accounts: Vec<v1::Account> = self
            .setup
            .accounts()
            .into_iter()
            .map(|id| v1::Account {
                id: u128_to(id.into()),
                ledger: LEDGER,
                code: CODE,
                flags: if id == self.setup.equity { 0 } else { ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS },
                ..Default::default()
            })
            .collect();
        loop {
            match client.create_accounts(accounts.clone()).await {
                Ok(results) if results.iter().all(|r| r.status == 0 || r.status == EXISTS_ACCOUNT) => break,
                Ok(results) => return Err(format!("creating the bank's accounts failed: {results:?}")),
                Err(error) if started.elapsed() > deadline => {
                    return Err(format!("creating accounts: {error}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let funding: Vec<TransferSpec> = self
            .setup
            .customers
            .iter()
            .enumerate()
            .map(|(index, customer)| TransferSpec {
                id: index as u64 + 1,
                debit: self.setup.equity,
                credit: *customer,
                amount: self.setup.opening,
                kind: TransferKind::Single,
                linked: false,
            })
            .collect();
        loop {
            let outcome = transfer_op(client, recorder, 0, &funding, 0).await?;
            if outcome == Outcome::Ok {
                return Ok(());
            }
            if outcome == Outcome::Fail || started.elapsed() > deadline {
                return Err("funding the customers failed".into());
            }
        }
    }
}

const EXISTS_ACCOUNT: i32 = v1::CreateAccountStatus::Exists as i32;
const EXISTS_TRANSFER: i32 = v1::CreateTransferStatus::Exists as i32;

fn to_wire(spec: &TransferSpec) -> v1::Transfer {
    let (flags, pending_id) = match spec.kind {
        TransferKind::Single => (0, 0),
        TransferKind::Pending => (crate::checker::flags::PENDING, 0),
        TransferKind::Post { pending_id } => (crate::checker::flags::POST_PENDING, pending_id),
        TransferKind::Void { pending_id } => (crate::checker::flags::VOID_PENDING, pending_id),
    };
    let linked = if spec.linked { crate::checker::flags::LINKED } else { 0 };
    v1::Transfer {
        id: u128_to(spec.id.into()),
        debit_account_id: u128_to(spec.debit.into()),
        credit_account_id: u128_to(spec.credit.into()),
        amount: u128_to(spec.amount.into()),
        pending_id: u128_to(pending_id.into()),
        ledger: LEDGER,
        code: CODE,
        flags: flags | linked,
        ..Default::default()
    }
}

/// Sends one batch of transfers (all-or-nothing) and records it. `Ok` when every transfer
/// answered OK, or any answered EXISTS: ids are never reused, so EXISTS means an earlier
/// attempt of this same operation took effect (and a chain takes effect whole).
pub async fn transfer_op(
    client: &Client,
    recorder: &Recorder,
    process: u32,
    transfers: &[TransferSpec],
    retry: u32,
) -> Result<Outcome, String> {
    let op = recorder.invoke(process, Call::Transfers { transfers: transfers.to_vec(), retry }).await?;
    let reply = match client.create_transfers(transfers.iter().map(to_wire).collect()).await {
        Ok(results) => {
            let codes: Vec<u32> = results.iter().map(|r| r.status as u32).collect();
            let took_effect = results.len() == transfers.len()
                && (results.iter().all(|r| r.status == 0)
                    || results.iter().any(|r| r.status == EXISTS_TRANSFER));
            let outcome = if took_effect { Outcome::Ok } else { Outcome::Fail };
            Reply { outcome, codes, balances: Vec::new(), error: None }
        }
        Err(error) => Reply::from_error(&error),
    };
    recorder.complete(op, process, reply).await
}

async fn read_op(
    client: &Client,
    recorder: &Recorder,
    process: u32,
    setup: &Setup,
    consistency: Consistency,
) -> Result<(), String> {
    let op = recorder.invoke(process, Call::ReadBalances { consistency }).await?;
    let wire = match consistency {
        Consistency::Linearizable => v1::ReadConsistency::Linearizable,
        Consistency::Local => v1::ReadConsistency::Local,
    };
    let ids: Vec<u128> = setup.accounts().into_iter().map(u128::from).collect();
    let reply = match client.lookup_accounts(&ids, wire).await {
        Ok(accounts) => Reply {
            outcome: Outcome::Ok,
            codes: Vec::new(),
            balances: accounts.iter().map(balance_of).collect(),
            error: None,
        },
        Err(error) => Reply::from_error(&error),
    };
    recorder.complete(op, process, reply).await.map(|_| ())
}

pub fn balance_of(account: &v1::Account) -> Balance {
    Balance {
        id: u128_from(account.id.as_ref()) as u64,
        debits_pending: u128_from(account.debits_pending.as_ref()),
        debits_posted: u128_from(account.debits_posted.as_ref()),
        credits_pending: u128_from(account.credits_pending.as_ref()),
        credits_posted: u128_from(account.credits_posted.as_ref()),
    }
}

/// One client process.
pub struct Process {
    pub id: u32,
    /// Re-send writes whose outcome is unknown (the idempotence workload).
    pub resend: bool,
    /// Node addresses, in the order this process tries them.
    pub addresses: Vec<String>,
    pub security: tally_client::Security,
    pub timeout: Duration,
    pub seed: u64,
}

/// Times an unknown write is re-sent before the process gives up on it.
const RESENDS_MAX: u32 = 3;

impl Process {
    pub async fn run(
        self,
        bank: Arc<Bank>,
        recorder: Arc<Recorder>,
        stop: Arc<AtomicBool>,
    ) -> Result<(), String> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let client = Client::new(&self.addresses, self.timeout, &self.security)?;
        let setup = &bank.setup;
        let mut open_pendings: Vec<TransferSpec> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let roll = rng.random_range(0..100);
            let transfers = match roll {
                0..18 => {
                    let consistency = if roll < 15 { Consistency::Linearizable } else { Consistency::Local };
                    read_op(&client, &recorder, self.id, setup, consistency).await?;
                    continue;
                }
                18..50 => vec![self.single(&mut rng, &bank, TransferKind::Single)],
                50..64 => {
                    let mut first = self.single(&mut rng, &bank, TransferKind::Single);
                    first.linked = true;
                    let mut second = self.single(&mut rng, &bank, TransferKind::Single);
                    second.debit = first.credit;
                    if second.credit == second.debit {
                        second.credit = first.debit;
                    }
                    vec![first, second]
                }
                64..78 => vec![self.single(&mut rng, &bank, TransferKind::Pending)],
                78..96 if !open_pendings.is_empty() => {
                    let pending = open_pendings.swap_remove(rng.random_range(0..open_pendings.len()));
                    let kind = if rng.random_bool(0.6) {
                        TransferKind::Post { pending_id: pending.id }
                    } else {
                        TransferKind::Void { pending_id: pending.id }
                    };
                    vec![TransferSpec { id: bank.next_id(), kind, ..pending }]
                }
                78..96 => vec![self.single(&mut rng, &bank, TransferKind::Single)],
                _ => {
                    // More than the whole bank holds: must fail on the debit account's limit.
                    let mut overdraft = self.single(&mut rng, &bank, TransferKind::Single);
                    overdraft.amount = (setup.opening_total() + 1) as u64;
                    vec![overdraft]
                }
            };
            let outcome = self.write(&client, &recorder, &transfers, &mut rng).await?;
            if transfers[0].kind == TransferKind::Pending && outcome != Outcome::Fail {
                open_pendings.push(transfers[0].clone());
            }
        }
        Ok(())
    }

    fn single(&self, rng: &mut ChaCha8Rng, bank: &Bank, kind: TransferKind) -> TransferSpec {
        let customers = &bank.setup.customers;
        let debit = customers[rng.random_range(0..customers.len())];
        let mut credit = customers[rng.random_range(0..customers.len())];
        if credit == debit {
            credit =
                customers[(customers.iter().position(|c| *c == debit).unwrap_or(0) + 1) % customers.len()];
        }
        let amount = rng.random_range(1..=bank.setup.opening / 10);
        TransferSpec { id: bank.next_id(), debit, credit, amount, kind, linked: false }
    }

    /// Sends a write; a process of the idempotence workload re-sends it on an unknown outcome,
    /// each time starting at another node.
    async fn write(
        &self,
        client: &Client,
        recorder: &Recorder,
        transfers: &[TransferSpec],
        rng: &mut ChaCha8Rng,
    ) -> Result<Outcome, String> {
        let mut outcome = transfer_op(client, recorder, self.id, transfers, 0).await?;
        let mut retry = 0;
        while self.resend && outcome == Outcome::Info && retry < RESENDS_MAX {
            retry += 1;
            let mut addresses = self.addresses.clone();
            let count = addresses.len();
            addresses.rotate_left(rng.random_range(1..count.max(2)) % count.max(1));
            let elsewhere = Client::new(&addresses, self.timeout, &self.security)?;
            outcome = transfer_op(&elsewhere, recorder, self.id, transfers, retry).await?;
        }
        Ok(outcome)
    }
}
