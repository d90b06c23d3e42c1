//! What a node tells Prometheus (`--metrics-listen`, `GET /metrics`, the text format).
//!
//! One registry per process, since one process is one node: the counters and histograms are
//! statics that the code paths they measure update (`layer` for every gRPC call of both doors,
//! the batcher, the log's IO thread, snapshots, forwarding, the doors' connections). What
//! openraft already tracks (term, indexes, leader, replication) and the bytes on disk are read
//! when scraped (`render`).

pub mod http;
pub mod layer;

use std::path::Path;
use std::sync::LazyLock;

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(metric: T) -> T {
    REGISTRY.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

/// Seconds, from 100 µs to 10 s.
fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.5, 13).expect("valid buckets")
}

/// Counts, from 1 to 16,384.
fn count_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1.0, 4.0, 8).expect("valid buckets")
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_grpc_requests_total",
        "gRPC calls answered, by door, method and status code",
        &["door", "method", "code"],
    )
});
pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    let opts = HistogramOpts::new("tally_grpc_request_seconds", "Time to answer a gRPC call (its headers)")
        .buckets(seconds_buckets());
    register(HistogramVec::new(opts, &["door", "method"]).expect("valid metric"))
});
pub static BATCH_EVENTS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_batch_events",
        "Events (accounts or transfers) per batch a client submitted",
        count_buckets(),
    )
});
pub static ENTRY_BATCHES: LazyLock<Histogram> = LazyLock::new(|| {
    histogram("tally_entry_batches", "Client batches per Raft entry the leader proposed", count_buckets())
});
pub static ENTRY_EVENTS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram("tally_entry_events", "Events per Raft entry the leader proposed", count_buckets())
});
pub static GROUP_COMMIT_WAIT: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_group_commit_wait_seconds",
        "How long a batch waited in the leader's queue before it was proposed",
        seconds_buckets(),
    )
});
pub static COMMIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_entry_commit_seconds",
        "From proposing an entry to its commit and apply (replication and fsync on a majority)",
        seconds_buckets(),
    )
});
pub static APPLY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_apply_seconds",
        "Time this node took to apply one entry to the ledger (leader and followers alike)",
        seconds_buckets(),
    )
});
pub static APPLIED_EVENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("tally_applied_events_total", "Events (accounts or transfers) this node applied to the ledger")
});
/// Read from the kernel when scraped (`text`): whether a node that applies slowly is short of CPU.
static CPU_SECONDS: LazyLock<Counter> = LazyLock::new(|| {
    register(
        Counter::new("tally_process_cpu_seconds_total", "CPU time this process used, user and system")
            .expect("valid metric"),
    )
});
static RUN_WAIT_SECONDS: LazyLock<Counter> = LazyLock::new(|| {
    register(
        Counter::new(
            "tally_process_run_wait_seconds_total",
            "Time this process's threads were ready to run and waited for a CPU (threads still alive)",
        )
        .expect("valid metric"),
    )
});
pub static FOLLOWER_LAG_MS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_follower_apply_lag_ms",
        "On the leader: how far behind in applying the follower that would take over is (pace.rs)",
    )
});
pub static PACE_WAIT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_pace_wait_seconds",
        "On the leader: how long a proposal waited for the follower that would take over to catch up in applying",
        seconds_buckets(),
    )
});
pub static FSYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_wal_fsync_seconds",
        "Time of one sync of the write-ahead log (fdatasync)",
        seconds_buckets(),
    )
});
pub static SNAPSHOT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram("tally_snapshot_build_seconds", "Time to build a snapshot of the ledger", seconds_buckets())
});
pub static CHECKPOINT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tally_checkpoint_seconds",
        "Time to write what was applied since the last checkpoint to the state store",
        seconds_buckets(),
    )
});
pub static SNAPSHOT_BYTES: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_snapshot_bytes", "Size of the last snapshot built or installed"));
pub static SNAPSHOTS_SENT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "tally_snapshots_sent_total",
        "Whole-state snapshots this node sent to a member that could not catch up from its log",
    )
});
pub static SNAPSHOTS_RECEIVED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("tally_snapshots_received_total", "Whole-state snapshots this node received and installed")
});
static MERGES_FAILED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_state_merges_failed",
        "Background merges of the state store that failed since the process started (each is retried)",
    )
});
pub static STATE_DIVERGED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_state_diverged",
        "1 when this node last found two members with different digests after the same index, else 0",
    )
});
pub static FORWARDED: LazyLock<IntCounter> =
    LazyLock::new(|| counter("tally_forwarded_requests_total", "Requests this node forwarded to the leader"));
pub static EXPIRY_TICKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "tally_expiry_ticks_total",
        "Entries this node proposed as leader to expire pending transfers on an idle ledger",
    )
});
pub static CONNECTIONS: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge_vec("tally_connections", "Connections open, by door", &["door"]));
pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "tally_connections_refused_total",
        "Connections closed at once, by door and why (limit, handshake)",
        &["door", "reason"],
    )
});
pub static LEADER_CHANGES: LazyLock<IntCounter> =
    LazyLock::new(|| counter("tally_raft_leader_changes_total", "Times this node saw the leader change"));
pub static TERMS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter("tally_raft_elections_total", "Terms this node saw begin (each is an election)")
});

pub static TERM: LazyLock<IntGauge> = LazyLock::new(|| gauge("tally_raft_term", "The current Raft term"));
pub static IS_LEADER: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_raft_is_leader", "1 on the leader, else 0"));
pub static LAST_LOG: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_raft_last_log_index", "Index of the last entry in this node's log"));
pub static COMMITTED: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_raft_committed_index", "Index of the last entry known committed"));
pub static APPLIED: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_raft_applied_index", "Index of the last entry applied to the ledger"));
pub static SNAPSHOT_INDEX: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("tally_raft_snapshot_index", "Index of this node's last snapshot"));
pub static LOG_FIRST: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_raft_log_first_index",
        "First entry this node's log still holds (the log behind a snapshot is purged)",
    )
});
pub static RECEIVING_STATE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "tally_receiving_state_bytes",
        "Bytes received of the whole state (a snapshot) arriving now; -1 when none is",
    )
});
pub static LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "tally_raft_replication_lag",
        "Entries a peer is behind this leader's log (on the leader only)",
        &["peer"],
    )
});
pub static DISK: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec("tally_disk_bytes", "Bytes on disk, by part of the data directory", &["part"])
});

/// Makes every metric exist from the start (at zero), so a scrape lists them all.
pub fn init() {
    for histogram in
        [&BATCH_EVENTS, &ENTRY_BATCHES, &ENTRY_EVENTS, &GROUP_COMMIT_WAIT, &COMMIT_SECONDS, &APPLY_SECONDS]
    {
        LazyLock::force(histogram);
    }
    LazyLock::force(&APPLIED_EVENTS);
    LazyLock::force(&CPU_SECONDS);
    LazyLock::force(&RUN_WAIT_SECONDS);
    LazyLock::force(&FSYNC_SECONDS);
    LazyLock::force(&SNAPSHOT_SECONDS);
    LazyLock::force(&CHECKPOINT_SECONDS);
    for counter in [&FORWARDED, &EXPIRY_TICKS, &LEADER_CHANGES, &TERMS, &SNAPSHOTS_SENT, &SNAPSHOTS_RECEIVED]
    {
        LazyLock::force(counter);
    }
    for gauge in
        [&SNAPSHOT_BYTES, &STATE_DIVERGED, &MERGES_FAILED, &TERM, &IS_LEADER, &LAST_LOG, &COMMITTED, &APPLIED]
    {
        LazyLock::force(gauge);
    }
    for gauge in [&SNAPSHOT_INDEX, &LOG_FIRST, &RECEIVING_STATE] {
        LazyLock::force(gauge);
    }
    RECEIVING_STATE.set(-1);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_SECONDS);
    LazyLock::force(&LAG);
    for door in ["client", "peer"] {
        CONNECTIONS.with_label_values(&[door]).set(0);
        for reason in ["limit", "handshake"] {
            CONNECTIONS_REFUSED.with_label_values(&[door, reason]).reset();
        }
    }
    for part in ["wal", "state", "snapshots"] {
        DISK.with_label_values(&[part]).set(0);
    }
}

/// Bytes of the files under `path`, recursively; 0 for what cannot be read.
pub fn bytes_under(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => bytes_under(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// The CPU time this process used: `utime` and `stime` of `/proc/self/stat` (every thread's,
/// those that ended too), in clock ticks of 1/100 s (`USER_HZ`, fixed by Linux's ABI).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command, which is in parentheses and may hold spaces.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}

/// How long this process's live threads waited in the run queue: the second field of each
/// `/proc/self/task/*/schedstat`, in nanoseconds.
fn run_wait_seconds() -> Option<f64> {
    let mut waited_ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.filter_map(Result::ok) {
        let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        waited_ns += schedstat.split_whitespace().nth(1).and_then(|field| field.parse().ok()).unwrap_or(0);
    }
    Some(waited_ns as f64 / 1e9)
}

/// Raises `counter` to `now` (a total read from the kernel); never lowers it (a thread that
/// ended takes its run-queue wait with it).
fn raise_to(counter: &Counter, now: Option<f64>) {
    if let Some(now) = now
        && now > counter.get()
    {
        counter.inc_by(now - counter.get());
    }
}

/// The text format of every metric (the node sets its gauges first: `NodeHandle::refresh_metrics`).
pub fn text() -> String {
    MERGES_FAILED.set(tally_store::MERGES_FAILED.load(std::sync::atomic::Ordering::Relaxed) as i64);
    raise_to(&CPU_SECONDS, cpu_seconds());
    raise_to(&RUN_WAIT_SECONDS, run_wait_seconds());
    let mut out = Vec::new();
    TextEncoder::new().encode(&REGISTRY.gather(), &mut out).expect("text encoding into a Vec");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's CPU time and run-queue wait are read from the kernel, and CPU time grows
    /// as the process works.
    #[test]
    fn cpu_time_and_run_queue_wait_are_read_from_the_kernel() {
        let before = cpu_seconds().expect("/proc/self/stat read");
        assert!(run_wait_seconds().is_some(), "/proc/self/task/*/schedstat read");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds().unwrap() < before + 0.05 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "CPU time never grew");
        }
        let counter = Counter::new("test_cpu", "test").unwrap();
        raise_to(&counter, Some(2.0));
        raise_to(&counter, Some(1.5));
        assert_eq!(counter.get(), 2.0, "never lowered");
    }
}
