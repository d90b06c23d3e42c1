//! `tally benchmark`: our answer to `tigerbeetle benchmark` and `pgbench`.
//!
//! Against `--nodes`, or a fresh local three-site cluster of `tally serve` processes in a
//! temporary directory (removed after), it creates `--accounts` funded accounts, then drives
//! `--clients` concurrent clients, each sending `--batch` random transfers per request, for
//! `--duration` (after `--warmup`) or until `--transfers` are sent. Closed loop by default (each
//! client sends its next request when the last is answered); `--rate` makes it open loop, with
//! latency counted from when a request was due, so a stall is not hidden by clients that waited.
//!
//! At the end it checks that money is conserved (customers' debits equal the transfers
//! acknowledged, every account's debits equal every account's credits) and that every node
//! reached the same applied index and state digest. `--reads` adds a phase of single-account
//! lookups, linearizable and then local. For its own cluster it reports each node's CPU time per
//! transfer, read from `/proc`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tally_client::{Client, Security, u128_from, u128_to, v1};

use super::fail;
use crate::testkit::TestCluster;

/// The most concurrent clients one benchmark runs.
const CLIENTS_MAX: usize = 4096;
/// Every customer account starts with this much credit, so no random transfer overdraws it.
const FUNDING_AMOUNT: u128 = 1 << 60;
/// Random transfers move 1 to this many units.
const TRANSFER_AMOUNT_MAX: u64 = 100;
/// Deadline of one request, retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const LEDGER: u32 = 1;
const CODE: u32 = 1;
/// How long a fresh local cluster may take to elect a leader, and all nodes to converge.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

#[derive(Args, Clone)]
pub struct BenchmarkArgs {
    /// Nodes of a running cluster (host:port, comma-separated). Default: start a fresh local
    /// three-site cluster in a temporary directory and remove it afterwards.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// How to connect to --nodes (a local cluster uses its own CA).
    #[command(flatten)]
    pub tls: super::TlsArgs,
    /// Customer accounts; transfers go between two of them chosen at random.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Concurrent clients, each with its own connections.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Transfers per request (1 to 8189).
    #[arg(long, default_value_t = 8189)]
    pub batch: usize,
    /// How long to measure, after the warm-up (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// Load sent before measuring starts, not counted.
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub warmup: Duration,
    /// Stop after this many transfers instead (warm-up included, measured from the start).
    #[arg(long)]
    pub transfers: Option<u64>,
    /// Open loop: requests per second over all clients, sent on schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Also measure single-account lookups (linearizable, then local) for `--duration` each.
    #[arg(long)]
    pub reads: bool,
    /// Seed of the random transfers and their ids: use a new one for each run against the same
    /// `--nodes`, or the transfers exist already.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start client i at node i mod n, as clients behind a load balancer would, instead of every
    /// client at the first node (a follower forwards; tally-client then follows the leader hint).
    #[arg(long)]
    pub spread: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Extra flags for each `tally serve` of the local cluster, space-separated
    /// (e.g. "--group-commit-delay-us 200").
    #[arg(long, allow_hyphen_values = true)]
    pub serve_args: Option<String>,
}

impl BenchmarkArgs {
    fn check(&self) -> Result<(), String> {
        if self.batch == 0 || self.batch > ledger::BATCH_EVENTS_MAX {
            return Err(format!("--batch must be 1 to {}", ledger::BATCH_EVENTS_MAX));
        }
        if self.clients == 0 || self.clients > CLIENTS_MAX {
            return Err(format!("--clients must be 1 to {CLIENTS_MAX}"));
        }
        if self.accounts < 2 {
            return Err("--accounts must be at least 2".into());
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err("--rate must be a positive number of requests per second".into());
        }
        if self.duration.is_zero() && self.transfers.is_none() {
            return Err("--duration must be more than 0".into());
        }
        Ok(())
    }
}

pub async fn run(args: BenchmarkArgs) -> ExitCode {
    if let Err(error) = args.check() {
        return fail(&error);
    }
    match benchmark(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => fail(&error),
    }
}

/// Where the load goes: a cluster this run started (and stops), or one given by `--nodes`.
struct Target {
    nodes: Vec<String>,
    security: Security,
    local: Option<TestCluster>,
}

impl Target {
    async fn open(args: &BenchmarkArgs) -> Result<Target, String> {
        if !args.nodes.is_empty() {
            return Ok(Target { nodes: args.nodes.clone(), security: args.tls.security()?, local: None });
        }
        let binary = std::env::current_exe().map_err(|e| format!("cannot find the tally binary: {e}"))?;
        let extra: Vec<String> =
            args.serve_args.as_deref().unwrap_or("").split_whitespace().map(str::to_string).collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let cluster = TestCluster::start(&binary, &SITES, &extra);
        if !args.quiet {
            eprintln!("tally benchmark: local cluster of 3 nodes in {}", cluster.dir.path().display());
        }
        tokio::time::timeout(CLUSTER_READY_TIMEOUT, cluster.wait_for_leader(CLUSTER_READY_TIMEOUT))
            .await
            .map_err(|_| format!("the local cluster elected no leader:\n{}", cluster.log_tails()))?;
        Ok(Target { nodes: cluster.addresses(), security: cluster.security(), local: Some(cluster) })
    }

    /// Each local node's CPU time so far (user + system).
    fn cpu_times(&self) -> BTreeMap<u64, Duration> {
        let Some(cluster) = &self.local else { return BTreeMap::new() };
        cluster.pids().into_iter().filter_map(|(id, pid)| Some((id, process_cpu_time(pid)?))).collect()
    }
}

/// utime + stime of a process, from `/proc/<pid>/stat`.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / ticks_per_second))
}

fn self_cpu_time() -> Duration {
    process_cpu_time(std::process::id()).unwrap_or_default()
}

async fn benchmark(args: BenchmarkArgs) -> Result<bool, String> {
    let target = Target::open(&args).await?;
    let setup_client = Client::new(&target.nodes, REQUEST_TIMEOUT, &target.security)?;
    create_accounts(&setup_client, args.accounts).await?;
    let cpu_before = (target.cpu_times(), self_cpu_time());
    let term_before = current_term(&setup_client).await?;
    let totals_before = balances(&setup_client, args.accounts).await?;
    let writes = drive_writes(&args, &target.nodes, &target.security).await?;
    let term_after = current_term(&setup_client).await?;
    let cpu = cpu_report(&target, cpu_before, writes.measured.transfers_ok);
    let reads = if args.reads {
        vec![
            drive_reads(&args, &target.nodes, &target.security, v1::ReadConsistency::Linearizable).await?,
            drive_reads(&args, &target.nodes, &target.security, v1::ReadConsistency::Local).await?,
        ]
    } else {
        Vec::new()
    };
    let mut check = verify(&setup_client, &target, &totals_before, args.accounts, &writes).await;
    check.terms = (term_before, term_after);
    let report = Report { args: &args, writes: &writes.measured, reads: &reads, cpu: &cpu, check: &check };
    if args.json {
        println!("{}", report.json());
    } else {
        report.print();
    }
    Ok(check.is_ok())
}

fn account(id: u128, flags: u32) -> v1::Account {
    v1::Account { id: u128_to(id), ledger: LEDGER, code: CODE, flags, ..v1::Account::default() }
}

fn plain_transfer(id: u128, debit: u128, credit: u128, amount: u128) -> v1::Transfer {
    v1::Transfer {
        id: u128_to(id),
        debit_account_id: u128_to(debit),
        credit_account_id: u128_to(credit),
        amount: u128_to(amount),
        // A payment carries its own reference (an order id, say), which the ledger indexes for
        // queries: as many index entries as a real payment costs.
        user_data_128: u128_to(id ^ (1 << 127)),
        ledger: LEDGER,
        code: CODE,
        ..v1::Transfer::default()
    }
}

/// Ids of the setup's transfers; the load's ids start above them.
const FUNDING_TRANSFER_ID_BASE: u128 = 1 << 100;

/// Customer accounts 1..=count, which must not spend more than they hold, and a funding account
/// (count + 1) that credits each of them `FUNDING_AMOUNT`. Ids make a repeated setup a no-op.
async fn create_accounts(client: &Client, count: u64) -> Result<(), String> {
    let funding = u128::from(count) + 1;
    let limit = v1::AccountFlag::DebitsMustNotExceedCredits as u32;
    let mut ids = (1..=u128::from(count)).collect::<Vec<_>>();
    let mut accounts: Vec<v1::Account> = ids.iter().map(|id| account(*id, limit)).collect();
    accounts.push(account(funding, 0));
    for chunk in accounts.chunks(ledger::BATCH_EVENTS_MAX) {
        let results =
            client.create_accounts(chunk.to_vec()).await.map_err(|e| format!("creating accounts: {e}"))?;
        check_setup_results(results.iter().map(|r| r.status().as_str_name()), "account")?;
    }
    ids.truncate(count as usize);
    let fundings: Vec<v1::Transfer> = ids
        .iter()
        .map(|id| plain_transfer(FUNDING_TRANSFER_ID_BASE + id, funding, *id, FUNDING_AMOUNT))
        .collect();
    for chunk in fundings.chunks(ledger::BATCH_EVENTS_MAX) {
        let results =
            client.create_transfers(chunk.to_vec()).await.map_err(|e| format!("funding accounts: {e}"))?;
        check_setup_results(results.iter().map(|r| r.status().as_str_name()), "funding transfer")?;
    }
    Ok(())
}

fn check_setup_results<'a>(statuses: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    for status in statuses {
        if !status.ends_with("_OK") && !status.ends_with("_EXISTS") {
            return Err(format!("a setup {what} was refused: {status} (is this cluster empty?)"));
        }
    }
    Ok(())
}

/// What the clients saw while measuring.
#[derive(Default, Clone)]
struct Measured {
    elapsed: Duration,
    requests: u64,
    transfers_ok: u64,
    /// Microseconds per request.
    latencies_us: Vec<u64>,
    /// Microseconds per request answered (not refused, not failed).
    accepted_latencies_us: Vec<u64>,
    /// Requests refused at once because the cluster was at capacity (RESOURCE_EXHAUSTED).
    refused: u64,
    /// When each request that carried acknowledged transfers completed.
    acknowledged_at: Vec<Instant>,
    /// Event results other than ok, and failed requests, by name.
    errors: BTreeMap<String, u64>,
}

impl Measured {
    fn merge(&mut self, other: Measured) {
        self.requests += other.requests;
        self.transfers_ok += other.transfers_ok;
        self.latencies_us.extend(other.latencies_us);
        self.accepted_latencies_us.extend(other.accepted_latencies_us);
        self.refused += other.refused;
        self.acknowledged_at.extend(other.acknowledged_at);
        for (name, count) in other.errors {
            *self.errors.entry(name).or_default() += count;
        }
    }

    fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The longest time between two acknowledgements, any clients: a commit stall shows here even
    /// when every single request stays within its latency budget.
    fn longest_gap(&self) -> Duration {
        let mut times = self.acknowledged_at.clone();
        times.sort();
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// The whole write phase: what was measured, and the amounts the checks need.
struct Writes {
    measured: Measured,
    /// Sum of the amounts of transfers acknowledged ok, warm-up included.
    amount_ok: u128,
    /// Sum of the amounts of requests whose outcome is unknown (timed out).
    amount_unknown: u128,
}

/// Shared between the clients and the progress display.
struct Progress {
    transfers_ok: AtomicU64,
    stop: AtomicBool,
}

async fn drive_writes(args: &BenchmarkArgs, nodes: &[String], security: &Security) -> Result<Writes, String> {
    let progress = Arc::new(Progress { transfers_ok: AtomicU64::new(0), stop: AtomicBool::new(false) });
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let mut tasks = Vec::new();
    for index in 0..args.clients {
        let mut order = nodes.to_vec();
        if args.spread {
            order.rotate_left(index % nodes.len());
        }
        let client = Client::new(&order, REQUEST_TIMEOUT, security)?;
        let load = ClientLoad::new(args, index, measure_from);
        tasks.push(tokio::spawn(load.run(client, progress.clone())));
    }
    let bar = progress_bar(args, "writing");
    let stop_at = match args.transfers {
        Some(_) => None,
        None => Some(measure_from + args.duration),
    };
    loop {
        let done = progress.transfers_ok.load(Ordering::Relaxed);
        if let Some(bar) = &bar {
            let seconds = started.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{done} transfers, {:.0}/s", done as f64 / seconds));
            bar.set_position(started.elapsed().as_millis() as u64);
        }
        let finished = match (stop_at, args.transfers) {
            (Some(at), _) => Instant::now() >= at,
            (None, Some(limit)) => done >= limit,
            (None, None) => unreachable!("checked: a duration or a transfer count"),
        };
        if finished || tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let mut measured = Measured::default();
    let (mut amount_ok, mut amount_unknown) = (0u128, 0u128);
    for task in tasks {
        let result = task.await.map_err(|e| format!("a client task failed: {e}"))?;
        measured.merge(result.measured);
        amount_ok += result.amount_ok;
        amount_unknown += result.amount_unknown;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let measured_from = if args.transfers.is_some() { started } else { measure_from };
    measured.elapsed = stopped.saturating_duration_since(measured_from);
    Ok(Writes { measured, amount_ok, amount_unknown })
}

fn progress_bar(args: &BenchmarkArgs, what: &str) -> Option<indicatif::ProgressBar> {
    if args.quiet || args.json {
        return None;
    }
    let total = args.warmup + args.duration;
    let bar = indicatif::ProgressBar::new(total.as_millis() as u64);
    let style =
        indicatif::ProgressStyle::with_template(&format!("{what} [{{elapsed}}] {{wide_bar}} {{msg}}"))
            .expect("valid template");
    bar.set_style(style);
    Some(bar)
}

/// One client's load: its ids, its random transfers, its schedule.
struct ClientLoad {
    /// This client's transfer ids are `id_base + n`: disjoint from every other client's, and
    /// from those of a run with another `--seed` against the same `--nodes`.
    id_base: u128,
    accounts: u64,
    batch: usize,
    rng: rand_chacha::ChaCha8Rng,
    /// Open loop: time between two requests of this client.
    interval: Option<Duration>,
    measure_from: Instant,
}

#[derive(Default)]
struct ClientResult {
    measured: Measured,
    amount_ok: u128,
    amount_unknown: u128,
}

impl ClientLoad {
    fn new(args: &BenchmarkArgs, index: usize, measure_from: Instant) -> ClientLoad {
        ClientLoad {
            id_base: (1u128 << 120) + (u128::from(args.seed as u32) << 80) + ((index as u128) << 64),
            accounts: args.accounts,
            batch: args.batch,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ (index as u64).wrapping_mul(0x9e37_79b9)),
            interval: args.rate.map(|rate| Duration::from_secs_f64(args.clients as f64 / rate)),
            measure_from,
        }
    }

    fn next_batch(&mut self, sequence: &mut u128) -> (Vec<v1::Transfer>, u128) {
        let mut amount_total = 0;
        let transfers = (0..self.batch)
            .map(|_| {
                let debit = self.rng.random_range(1..=self.accounts);
                let mut credit = self.rng.random_range(1..self.accounts);
                if credit >= debit {
                    credit += 1;
                }
                let amount = self.rng.random_range(1..=TRANSFER_AMOUNT_MAX);
                amount_total += u128::from(amount);
                *sequence += 1;
                plain_transfer(self.id_base + *sequence, debit.into(), credit.into(), amount.into())
            })
            .collect();
        (transfers, amount_total)
    }

    async fn run(self, client: Client, progress: Arc<Progress>) -> ClientResult {
        match self.interval {
            Some(interval) => self.run_open(interval, Arc::new(client), progress).await,
            None => self.run_closed(client, progress).await,
        }
    }

    /// Closed loop: the next request once the last is answered.
    async fn run_closed(mut self, client: Client, progress: Arc<Progress>) -> ClientResult {
        let mut result = ClientResult::default();
        let mut sequence = 0u128;
        while !progress.stop.load(Ordering::Relaxed) {
            let due = Instant::now();
            let (transfers, amount) = self.next_batch(&mut sequence);
            let count = transfers.len();
            let reply = client.create_transfers(transfers).await;
            record(&mut result, reply, (amount, count), due, self.measure_from, &progress);
        }
        result
    }

    /// Open loop: each request goes out when due, answered or not those before it (at most
    /// `OPEN_LOOP_OUTSTANDING_MAX` at once, a connection's streams), and its latency counts
    /// from when it was due, so that a queue anywhere shows.
    async fn run_open(
        mut self,
        interval: Duration,
        client: Arc<Client>,
        progress: Arc<Progress>,
    ) -> ClientResult {
        let result = Arc::new(std::sync::Mutex::new(ClientResult::default()));
        let outstanding = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_OUTSTANDING_MAX));
        let mut sent = tokio::task::JoinSet::new();
        let mut sequence = 0u128;
        let mut due = Instant::now();
        while !progress.stop.load(Ordering::Relaxed) {
            tokio::time::sleep_until(due.into()).await;
            let permit = outstanding.clone().acquire_owned().await.expect("semaphore never closed");
            let (transfers, amount) = self.next_batch(&mut sequence);
            let (client, result, progress, measure_from) =
                (client.clone(), result.clone(), progress.clone(), self.measure_from);
            sent.spawn(async move {
                let count = transfers.len();
                let reply = client.create_transfers(transfers).await;
                record(&mut result.lock().unwrap(), reply, (amount, count), due, measure_from, &progress);
                drop(permit);
            });
            while sent.try_join_next().is_some() {}
            due += interval;
        }
        while sent.join_next().await.is_some() {}
        // Every request task has ended: this is the last reference.
        Arc::try_unwrap(result).map(|result| result.into_inner().unwrap()).unwrap_or_default()
    }
}

/// Requests one open-loop client has sent and not seen answered, at most: the streams a node
/// takes on one connection (`service::CLIENT_STREAMS_PER_CONNECTION_MAX`).
const OPEN_LOOP_OUTSTANDING_MAX: usize = 256;

/// Records one request due at `due` of `sent` (its amount, its transfers) and its reply.
fn record(
    result: &mut ClientResult,
    reply: Result<Vec<v1::CreateTransferResult>, tally_client::Error>,
    sent: (u128, usize),
    due: Instant,
    measure_from: Instant,
    progress: &Progress,
) {
    let latency_us = due.elapsed().as_micros() as u64;
    let measured = due >= measure_from;
    let accepted = reply.is_ok();
    let refused = matches!(&reply, Err(tally_client::Error::Rejected(status))
        if status.code() == tonic::Code::ResourceExhausted);
    let ok = tally(result, reply, sent.0, sent.1, measured);
    if measured {
        let measured = &mut result.measured;
        measured.requests += 1;
        measured.latencies_us.push(latency_us);
        if accepted {
            measured.accepted_latencies_us.push(latency_us);
        }
        measured.refused += u64::from(refused);
        if ok > 0 {
            measured.acknowledged_at.push(Instant::now());
        }
    }
    progress.transfers_ok.fetch_add(ok, Ordering::Relaxed);
}

/// Counts one reply: ok transfers and their amount, errors by name. Returns the ok count.
fn tally(
    result: &mut ClientResult,
    reply: Result<Vec<v1::CreateTransferResult>, tally_client::Error>,
    amount: u128,
    count: usize,
    measured: bool,
) -> u64 {
    let mut errors = BTreeMap::new();
    let ok = match reply {
        Ok(results) if results.len() == count => {
            let mut ok = 0;
            for r in &results {
                match r.status() {
                    v1::CreateTransferStatus::Ok => ok += 1,
                    other => *errors.entry(other.as_str_name().to_string()).or_insert(0) += 1,
                }
            }
            // Random transfers between funded accounts only fail on a bug: the amounts of
            // refused ones are not known here, so the conservation check will report them.
            if ok == count as u64 {
                result.amount_ok += amount;
            } else {
                result.amount_unknown += amount;
            }
            ok
        }
        Ok(results) => {
            *errors.entry(format!("reply with {} results for {count} events", results.len())).or_insert(0) +=
                1;
            result.amount_unknown += amount;
            0
        }
        Err(error) => {
            let name = match &error {
                tally_client::Error::Rejected(s) => format!("rejected {:?}", s.code()),
                tally_client::Error::Unavailable(s) => format!("unknown outcome ({:?})", s.code()),
            };
            *errors.entry(name).or_insert(0) += 1;
            result.amount_unknown += amount;
            0
        }
    };
    if measured {
        result.measured.transfers_ok += ok;
        for (name, n) in errors {
            *result.measured.errors.entry(name).or_default() += n;
        }
    }
    ok
}

/// Single-account lookups from `--clients` clients for `--duration`.
async fn drive_reads(
    args: &BenchmarkArgs,
    nodes: &[String],
    security: &Security,
    consistency: v1::ReadConsistency,
) -> Result<(String, Measured), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for index in 0..args.clients {
        let client = Client::new(nodes, REQUEST_TIMEOUT, security)?;
        let (stop, accounts) = (stop.clone(), args.accounts);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed.wrapping_add(index as u64));
        tasks.push(tokio::spawn(async move {
            let mut measured = Measured::default();
            while !stop.load(Ordering::Relaxed) {
                let id = u128::from(rng.random_range(1..=accounts));
                let started = Instant::now();
                let reply = client.lookup_accounts(&[id], consistency).await;
                measured.latencies_us.push(started.elapsed().as_micros() as u64);
                measured.requests += 1;
                match reply {
                    Ok(found) if found.len() == 1 => {}
                    Ok(_) => *measured.errors.entry("account not found".into()).or_default() += 1,
                    Err(e) => *measured.errors.entry(format!("{:?}", e.status().code())).or_default() += 1,
                }
            }
            measured
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut measured = Measured::default();
    for task in tasks {
        measured.merge(task.await.map_err(|e| format!("a reader task failed: {e}"))?);
    }
    measured.elapsed = started.elapsed();
    let name = match consistency {
        v1::ReadConsistency::Local => "lookup account (local)",
        _ => "lookup account (linearizable)",
    };
    Ok((name.to_string(), measured))
}

/// CPU time per node (and of this process, the clients) over the write phase.
struct Cpu {
    rows: Vec<(String, Duration, f64)>,
}

fn cpu_report(target: &Target, before: (BTreeMap<u64, Duration>, Duration), transfers: u64) -> Cpu {
    let after = target.cpu_times();
    let mut rows = Vec::new();
    let per_transfer = |d: Duration| d.as_nanos() as f64 / 1000.0 / transfers.max(1) as f64;
    for (id, now) in &after {
        let used = now.saturating_sub(before.0.get(id).copied().unwrap_or_default());
        rows.push((format!("node {id}"), used, per_transfer(used)));
    }
    if !after.is_empty() {
        let used = self_cpu_time().saturating_sub(before.1);
        rows.push(("clients (this process)".into(), used, per_transfer(used)));
    }
    Cpu { rows }
}

/// The end-of-run checks: money conserved, every node at the same digest.
struct Check {
    failures: Vec<String>,
    /// The Raft term before and after the write phase: a higher one means an election happened
    /// under load.
    terms: (u64, u64),
    digest: String,
    applied_index: u64,
}

impl Check {
    fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }
}

async fn verify(client: &Client, target: &Target, before: &Totals, accounts: u64, writes: &Writes) -> Check {
    let mut check = Check { failures: Vec::new(), terms: (0, 0), digest: String::new(), applied_index: 0 };
    match balances(client, accounts).await {
        Ok(after) => check_money(&mut check, before, &after, writes),
        Err(error) => check.failures.push(format!("cannot read the balances: {error}")),
    }
    match converged(target).await {
        Ok((index, digest)) => (check.applied_index, check.digest) = (index, digest),
        Err(error) => check.failures.push(error),
    }
    check
}

#[derive(Default)]
struct Totals {
    customer_debits: u128,
    customer_credits: u128,
    all_debits: u128,
    all_credits: u128,
}

async fn balances(client: &Client, accounts: u64) -> Result<Totals, String> {
    let mut totals = Totals::default();
    let ids: Vec<u128> = (1..=u128::from(accounts) + 1).collect();
    for chunk in ids.chunks(ledger::BATCH_EVENTS_MAX) {
        let found = client
            .lookup_accounts(chunk, v1::ReadConsistency::Linearizable)
            .await
            .map_err(|e| e.to_string())?;
        if found.len() != chunk.len() {
            return Err(format!("{} of {} accounts found", found.len(), chunk.len()));
        }
        for a in found {
            let (debits, credits) =
                (u128_from(a.debits_posted.as_ref()), u128_from(a.credits_posted.as_ref()));
            totals.all_debits += debits;
            totals.all_credits += credits;
            if u128_from(a.id.as_ref()) <= u128::from(accounts) {
                totals.customer_debits += debits;
                totals.customer_credits += credits;
            }
        }
    }
    Ok(totals)
}

/// Compares the balances after the run with those before it (a cluster given by `--nodes` may
/// hold earlier runs): every account's debits equal every account's credits, and what the
/// customers paid each other is what was acknowledged (plus at most what is unknown), credited
/// to customers as much as debited.
fn check_money(check: &mut Check, before: &Totals, after: &Totals, writes: &Writes) {
    if after.all_debits != after.all_credits {
        check.failures.push(format!(
            "money not conserved: debits {} != credits {}",
            after.all_debits, after.all_credits
        ));
    }
    // Balances only grow; one that shrank is lost money, reported rather than overflowed.
    let (Some(moved), Some(credited)) = (
        after.customer_debits.checked_sub(before.customer_debits),
        after.customer_credits.checked_sub(before.customer_credits),
    ) else {
        check.failures.push("customers' posted balances went down during the run".into());
        return;
    };
    if moved < writes.amount_ok || moved > writes.amount_ok + writes.amount_unknown {
        check.failures.push(format!(
            "customers' debits grew by {moved}, not by the acknowledged {} (plus up to {} unknown)",
            writes.amount_ok, writes.amount_unknown
        ));
    }
    if credited != moved {
        check.failures.push(format!("customers were credited {credited} but debited {moved}"));
    }
}

async fn current_term(client: &Client) -> Result<u64, String> {
    client.cluster_status().await.map(|s| s.term).map_err(|e| format!("cluster status: {e}"))
}

/// Waits until every node reports the same applied index and digest.
async fn converged(target: &Target) -> Result<(u64, String), String> {
    let client = Client::new(&target.nodes, Duration::from_secs(2), &target.security)?;
    let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut statuses = Vec::new();
        for address in &target.nodes {
            if let Ok(status) = client.node_status(address).await {
                statuses.push((status.applied_index, status.state_digest));
            }
        }
        if statuses.len() == target.nodes.len() && statuses.windows(2).all(|w| w[0] == w[1]) {
            return Ok(statuses.remove(0));
        }
        last = statuses;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("nodes did not reach the same digest within {CLUSTER_READY_TIMEOUT:?}: {last:?}"))
}

struct Report<'a> {
    args: &'a BenchmarkArgs,
    writes: &'a Measured,
    reads: &'a [(String, Measured)],
    cpu: &'a Cpu,
    check: &'a Check,
}

/// p50, p99, p99.9 and max of sorted microseconds.
fn percentiles(latencies_us: &[u64]) -> [u64; 4] {
    let mut sorted = latencies_us.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        if sorted.is_empty() { 0 } else { sorted[((sorted.len() - 1) as f64 * q).round() as usize] }
    };
    [at(0.5), at(0.99), at(0.999), at(1.0)]
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

impl Report<'_> {
    fn workload(&self) -> String {
        let mode = match self.args.rate {
            Some(rate) => format!("open loop at {rate} requests/s"),
            None => "closed loop".into(),
        };
        format!(
            "{} clients x {} transfers per request, {} accounts, {mode}",
            self.args.clients, self.args.batch, self.args.accounts
        )
    }

    fn print(&self) {
        let w = self.writes;
        println!("{}", self.workload());
        println!(
            "measured {:.1} s: {} requests, {} transfers ok; longest time without an acknowledgement {:.0} ms",
            w.elapsed.as_secs_f64(),
            w.requests,
            w.transfers_ok,
            w.longest_gap().as_secs_f64() * 1000.0
        );
        let mut table = super::table(&["workload", "per second", "p50 ms", "p99 ms", "p99.9 ms", "max ms"]);
        let mut row = |name: &str, rate: f64, latencies: &[u64]| {
            let [p50, p99, p999, max] = percentiles(latencies);
            table.add_row(vec![name.to_string(), format!("{rate:.0}"), ms(p50), ms(p99), ms(p999), ms(max)]);
        };
        row("transfers (latency per request)", w.per_second(w.transfers_ok), &w.latencies_us);
        if w.accepted_latencies_us.len() as u64 != w.requests {
            let accepted = w.accepted_latencies_us.len() as u64;
            row("  requests answered only", w.per_second(accepted), &w.accepted_latencies_us);
        }
        for (name, m) in self.reads {
            row(name, m.per_second(m.requests), &m.latencies_us);
        }
        println!("{table}");
        if w.refused > 0 {
            println!(
                "refused at once, the cluster at capacity (RESOURCE_EXHAUSTED): {} of {} requests ({:.1}%)",
                w.refused,
                w.requests,
                100.0 * w.refused as f64 / w.requests.max(1) as f64
            );
        }
        for (name, count) in w.errors.iter().chain(self.reads.iter().flat_map(|(_, m)| m.errors.iter())) {
            println!("errors: {count} x {name}");
        }
        if !self.cpu.rows.is_empty() {
            let mut table = super::table(&["process", "CPU s", "CPU us per transfer"]);
            for (name, used, per) in &self.cpu.rows {
                table.add_row(vec![name.clone(), format!("{:.2}", used.as_secs_f64()), format!("{per:.2}")]);
            }
            println!("{table}");
        }
        let (term_before, term_after) = self.check.terms;
        if term_after != term_before {
            println!("ELECTIONS under load: term {term_before} -> {term_after}");
        }
        if self.check.is_ok() {
            println!(
                "check: money conserved; every node at applied index {} with digest {}",
                self.check.applied_index,
                &self.check.digest[..self.check.digest.len().min(16)]
            );
        }
        for failure in &self.check.failures {
            println!("CHECK FAILED: {failure}");
        }
    }

    fn json(&self) -> serde_json::Value {
        let latency = |m: &Measured| {
            let [p50, p99, p999, max] = percentiles(&m.latencies_us);
            json!({"p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": max})
        };
        let w = self.writes;
        let [p50, p99, p999, max] = percentiles(&w.accepted_latencies_us);
        let accepted_latency = json!({"p50_us": p50, "p99_us": p99, "p999_us": p999, "max_us": max});
        json!({
            "workload": {
                "clients": self.args.clients, "batch": self.args.batch, "accounts": self.args.accounts,
                "rate": self.args.rate, "seed": self.args.seed,
            },
            "writes": {
                "seconds": w.elapsed.as_secs_f64(), "requests": w.requests, "transfers_ok": w.transfers_ok,
                "transfers_per_second": w.per_second(w.transfers_ok), "latency": latency(w), "errors": w.errors,
                "refused": w.refused, "accepted_latency": accepted_latency,
                "longest_gap_us": w.longest_gap().as_micros() as u64,
            },
            "reads": self.reads.iter().map(|(name, m)| json!({
                "name": name, "requests": m.requests, "per_second": m.per_second(m.requests),
                "latency": latency(m), "errors": m.errors,
            })).collect::<Vec<_>>(),
            "cpu": self.cpu.rows.iter().map(|(name, used, per)| json!({
                "process": name, "seconds": used.as_secs_f64(), "us_per_transfer": per,
            })).collect::<Vec<_>>(),
            "terms": {"before": self.check.terms.0, "after": self.check.terms.1},
            "check": {"ok": self.check.is_ok(), "failures": self.check.failures,
                      "applied_index": self.check.applied_index, "digest": self.check.digest},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let latencies: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentiles(&latencies), [501, 990, 999, 1000]);
        assert_eq!(percentiles(&[]), [0, 0, 0, 0]);
    }
}
