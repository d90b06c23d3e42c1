//! One run: start the cluster, open the bank, run the workload under the nemesis for the time
//! limit, heal everything, read the final state, and check the history.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tally_client::v1;
use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::history::{FinalState, FoundTransfer, NodeDigest, Record, Writer};
use crate::nemesis::{Fault, Timing};
use crate::report::Report;
use crate::workload::{Bank, Process, Recorder, balance_of};

#[derive(Debug, Clone)]
pub struct Options {
    /// The `tally` binary under test.
    pub binary: PathBuf,
    /// Nodes per site.
    pub layout: Vec<usize>,
    pub faults: Vec<Fault>,
    pub timing: Timing,
    /// How long the workload runs.
    pub time_limit: Duration,
    pub seed: u64,
    /// Client processes; every other one re-sends unknown writes (idempotence workload).
    pub clients: usize,
    pub customers: u64,
    pub opening: u64,
    /// Deadline of one client call, retries on other nodes included.
    pub op_timeout: Duration,
    /// Added to every link between two different sites, each way.
    pub latency: Duration,
    /// Where the history, summary, pictures and node logs go.
    pub out: PathBuf,
    pub progress: bool,
    /// Extra flags for every `tally serve`.
    pub serve_args: Vec<String>,
    /// An open-loop background load next to the bank workload.
    pub load: Option<crate::load::LoadOptions>,
    /// How often to sample every node's metrics into `nodes/metrics.tsv`, if at all.
    pub sample_metrics: Option<Duration>,
}

/// How long healing may take before the run is judged on what it has.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(90);
/// Attempts at reading the final state, each request with the client's 10-s deadline.
const FINAL_READ_ATTEMPTS: usize = 3;

/// `run` on a multi-threaded runtime of its own (the binary's entry: a plain function keeps the
/// run's futures compiled once, in the library, rather than again in the binary).
pub fn run_to_end(options: Options) -> Result<Report, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no tokio runtime: {e}"))?;
    runtime.block_on(run(options))
}

pub async fn run(options: Options) -> Result<Report, String> {
    if !options.binary.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release -p raft-node` or pass --tally-bin",
            options.binary.display()
        ));
    }
    let logs = options.out.join("nodes");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let data = tempfile::Builder::new()
        .prefix("tally-jepsen-data-")
        .tempdir()
        .map_err(|e| format!("cannot create a data directory: {e}"))?;
    let schedule = crate::nemesis::plan(&options.faults, options.timing, options.time_limit, options.seed);
    if let Some(warning) = crate::nemesis::unscheduled(&options.faults, &schedule, options.time_limit) {
        eprintln!("tally-jepsen: {warning}");
    }
    let spares = schedule.iter().filter(|p| p.fault == Fault::Churn).count();
    let mut serve_args = options.serve_args.clone();
    if let Some(load) = options.load
        && !crate::cluster::sets_flag(&serve_args, crate::cluster::WAL_SEGMENT_FLAG)
    {
        let bytes = crate::cluster::wal_segment_bytes_for(load.rate);
        serve_args.extend([crate::cluster::WAL_SEGMENT_FLAG.to_string(), bytes]);
    }
    let cluster = Cluster::start(
        &options.binary,
        &options.layout,
        spares,
        data.path(),
        &logs,
        serve_args,
        options.faults.contains(&Fault::Upgrade),
    )
    .await?;
    cluster.proxies.set_latency_between_sites(&cluster.site_of(), options.latency);
    let all_nodes: Vec<u64> = cluster.nodes.keys().copied().collect();
    let initial: Vec<u64> = cluster.members.iter().copied().collect();
    let addresses: Vec<String> = all_nodes.iter().map(|id| cluster.address(*id)).collect();
    let security = cluster.security.clone();
    // A tokio mutex: the nemesis holds it across awaits (a membership change waits for the new
    // node to catch up), and the progress watcher must wait for it, not block a worker thread.
    let cluster = Arc::new(Mutex::new(cluster));

    let recorder = Arc::new(Recorder::new(Writer::create(&options.out.join("history.jsonl"))?));
    let bank = Arc::new(Bank::new(options.customers, options.opening));
    let load_client = {
        let cluster = cluster.lock().await;
        let client = cluster.client_of(&initial, Duration::from_secs(5))?;
        bank.open(&client, &recorder, Duration::from_secs(60)).await?;
        if options.load.is_some() {
            crate::load::open(&client).await?;
        }
        let timeout = options.load.map_or(options.op_timeout, |load| load.timeout);
        Arc::new(cluster.client_of(&all_nodes, timeout)?)
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut processes = tokio::task::JoinSet::new();
    if let Some(load) = options.load {
        processes.spawn(crate::load::run(load, load_client, recorder.clone(), stop.clone()));
    }
    for index in 0..options.clients {
        let mut order = addresses.clone();
        order.rotate_left(index % initial.len().max(1));
        let process = Process {
            id: index as u32 + 1,
            resend: index % 2 == 1,
            addresses: order,
            security: security.clone(),
            timeout: options.op_timeout,
            seed: options.seed.wrapping_add(index as u64 * 0x9e37_79b9),
        };
        processes.spawn(process.run(bank.clone(), recorder.clone(), stop.clone()));
    }
    // The change stream's subscriber, through every fault until the final state is read.
    let (stream_last, stream_target) = tokio::sync::watch::channel(None);
    let subscriber = {
        let client = Arc::new(cluster.lock().await.client_of(&all_nodes, options.op_timeout)?);
        tokio::spawn(crate::stream::follow(client, recorder.clone(), stream_target))
    };
    let redundancy = {
        let client = Arc::new(cluster.lock().await.client_of(&all_nodes, options.op_timeout)?);
        tokio::spawn(watch_redundancy(client, recorder.clone(), stop.clone()))
    };
    let sampler = match options.sample_metrics {
        Some(every) => {
            let nodes =
                cluster.lock().await.nodes.values().map(|node| (node.id, node.metrics_address)).collect();
            let out = logs.join("metrics.tsv");
            let (recorder, stop) = (recorder.clone(), stop.clone());
            Some(tokio::spawn(async move { crate::sampler::run(nodes, &out, every, recorder, stop).await }))
        }
        None => None,
    };
    let started = tokio::time::Instant::now();
    // The fault under way, for the progress bar; a std mutex, never held across an await.
    let current_fault = Arc::new(std::sync::Mutex::new(String::new()));
    let nemesis = tokio::spawn(crate::nemesis::run(
        schedule,
        cluster.clone(),
        recorder.clone(),
        started,
        options.time_limit,
        current_fault.clone(),
    ));

    let crashes = watch(&options, &cluster, &recorder, &current_fault, started).await;
    stop.store(true, Ordering::Relaxed);
    nemesis.await.map_err(|e| format!("nemesis task: {e}"))??;
    while let Some(finished) = processes.join_next().await {
        finished.map_err(|e| format!("client task: {e}"))??;
    }
    redundancy.await.map_err(|e| format!("redundancy watcher: {e}"))??;
    if let Some(sampler) = sampler {
        sampler.await.map_err(|e| format!("metrics sampler: {e}"))??;
    }

    let final_state = heal_and_read(&cluster, &bank, &initial).await;
    // The ledger's last event is at least its last transfer's; the subscriber reads on to it.
    let last = final_state.transfers.iter().map(|t| t.timestamp).max().unwrap_or(0);
    recorder.record(Record::Final(final_state)).await?;
    let _ = stream_last.send(Some(last));
    subscriber.await.map_err(|e| format!("change stream task: {e}"))??;
    drop(cluster);
    crate::report::write(&options.out, options.seed, crashes)
}

/// How often the harness asks whether every member is up to date.
const REDUNDANCY_POLL: Duration = Duration::from_millis(250);

/// Until `stop`: records each change of whether every member is up to date, as `tally cluster
/// status` judges it (`Record::Redundancy`), so that the report can say, after each fault, how
/// long until the cluster had full redundancy again.
async fn watch_redundancy(
    client: Arc<tally_client::Client>,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut last = None;
    while !stop.load(Ordering::Relaxed) {
        // Who lacks what, without the entry counts, which move all the time: each change of it
        // is recorded, with the counts of the moment.
        let (lacking, detail) = match client.cluster_status().await {
            Ok(status) => {
                let members = status.nodes.iter().filter(|n| n.redundancy() != v1::Redundancy::UpToDate);
                let lacking: Vec<(u64, v1::Redundancy)> =
                    members.clone().map(|n| (n.id, n.redundancy())).collect();
                let detail: Vec<String> = members
                    .map(|n| {
                        format!("node {} {:?} ({} entries behind)", n.id, n.redundancy(), n.entries_behind)
                    })
                    .collect();
                (Some(lacking).filter(|_| !status.nodes.is_empty()), detail.join(", "))
            }
            Err(error) => (None, format!("no status: {}", error.status().message())),
        };
        if last.as_ref() != Some(&lacking) {
            let full = lacking.as_ref().is_some_and(Vec::is_empty);
            recorder.record(Record::Redundancy { time_us: recorder.now_us(), full, detail }).await?;
            last = Some(lacking);
        }
        tokio::time::sleep(REDUNDANCY_POLL).await;
    }
    Ok(())
}

/// Shows progress until the time limit; returns the nodes that exited on their own.
async fn watch(
    options: &Options,
    cluster: &Mutex<Cluster>,
    recorder: &Recorder,
    current_fault: &std::sync::Mutex<String>,
    started: tokio::time::Instant,
) -> Vec<String> {
    let bar =
        if options.progress { ProgressBar::new(options.time_limit.as_secs()) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut crashes = Vec::new();
    while started.elapsed() < options.time_limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(started.elapsed().as_secs());
        let fault = current_fault.lock().expect("not poisoned").clone();
        bar.set_message(format!(
            "ok {} failed {} unknown {} {}",
            recorder.ok.load(Ordering::Relaxed),
            recorder.failed.load(Ordering::Relaxed),
            recorder.unknown.load(Ordering::Relaxed),
            if fault.is_empty() { String::new() } else { format!("| {fault}") }
        ));
        let exited = cluster.lock().await.exited();
        for (id, status) in exited {
            let text = format!("node {id} at {:.1}s: {status}", started.elapsed().as_secs_f64());
            let _ = recorder.nemesis("crash", crate::history::Phase::Start, text.clone()).await;
            crashes.push(text);
        }
    }
    bar.finish_and_clear();
    crashes
}

/// Heals every fault, waits for the members to agree, and reads the final state.
async fn heal_and_read(cluster: &Mutex<Cluster>, bank: &Bank, initial: &[u64]) -> FinalState {
    let mut cluster = cluster.lock().await;
    cluster.proxies.heal_all();
    if let Err(error) = cluster.revive_all() {
        return FinalState { error: Some(error), ..FinalState::default() };
    }
    let members: Vec<u64> = cluster.members.iter().copied().collect();
    let mut state = FinalState::default();
    // The workload has stopped: once the members agree, nothing moves while we read.
    let statuses = match cluster.converge(CONVERGENCE_DEADLINE).await {
        Ok(statuses) => statuses,
        Err(error) => {
            state.error = Some(error);
            state.nodes = digests(&cluster.statuses().await);
            return state;
        }
    };
    state.nodes = digests(&statuses);
    let client = match cluster
        .client_of(if members.is_empty() { initial } else { &members }, Duration::from_secs(10))
    {
        Ok(client) => client,
        Err(error) => {
            state.error = Some(error);
            return state;
        }
    };
    // The workload has stopped and the members agree, but a node may still be busy (a store
    // merge's layout write took 8 s in one run, and the read's 10-s deadline passed): try again,
    // and keep what failed for the summary.
    for attempt in 1..=FINAL_READ_ATTEMPTS {
        let started = std::time::Instant::now();
        state.transfers.clear();
        match read_final(&client, bank, &mut state).await {
            Ok(()) => break,
            Err(error) if attempt < FINAL_READ_ATTEMPTS => {
                state.failed_reads.push(format!("{error} (after {:.1} s)", started.elapsed().as_secs_f64()));
            }
            Err(error) => state.error = Some(error),
        }
    }
    state
}

fn digests(statuses: &std::collections::BTreeMap<u64, v1::NodeStatus>) -> Vec<NodeDigest> {
    statuses
        .values()
        .map(|s| NodeDigest { id: s.id, applied_index: s.applied_index, digest: s.state_digest.clone() })
        .collect()
}

/// Reads every account, and lists every stored transfer by paging through each account's
/// debits (every transfer debits exactly one account).
async fn read_final(
    client: &tally_client::Client,
    bank: &Bank,
    state: &mut FinalState,
) -> Result<(), String> {
    let ids: Vec<u128> = bank.setup.accounts().into_iter().map(u128::from).collect();
    let accounts = client
        .lookup_accounts(&ids, v1::ReadConsistency::Linearizable)
        .await
        .map_err(|e| format!("final lookup of accounts: {e}"))?;
    state.accounts = accounts.iter().map(balance_of).collect();
    const PAGE: u32 = 8189;
    for id in ids {
        let mut after = 0u64;
        loop {
            let filter = v1::AccountFilter {
                account_id: tally_client::u128_to(id),
                timestamp_min: after,
                timestamp_max: 0,
                limit: PAGE,
                flags: v1::AccountFilterFlag::Debits as u32,
                consistency: v1::ReadConsistency::Linearizable as i32,
                ..v1::AccountFilter::default()
            };
            let page = client
                .get_account_transfers(filter)
                .await
                .map_err(|e| format!("final listing of account {id}'s transfers: {e}"))?;
            // More to come: a full page, or a scan budget that ran out (`resume_timestamp`).
            let full = page.transfers.len() == PAGE as usize || page.resume_timestamp != 0;
            if page.resume_timestamp != 0 {
                after = page.resume_timestamp;
            }
            for t in &page.transfers {
                after = after.max(t.timestamp + 1);
                state.transfers.push(FoundTransfer {
                    id: tally_client::u128_from(t.id.as_ref()),
                    debit: tally_client::u128_from(t.debit_account_id.as_ref()),
                    credit: tally_client::u128_from(t.credit_account_id.as_ref()),
                    amount: tally_client::u128_from(t.amount.as_ref()),
                    pending_id: tally_client::u128_from(t.pending_id.as_ref()),
                    flags: t.flags,
                    timestamp: t.timestamp,
                });
            }
            if !full {
                break;
            }
        }
    }
    Ok(())
}
