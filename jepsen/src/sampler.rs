//! `--sample-metrics-ms`: what each node's own metrics said during the run, so that a gap in the
//! writes can be told apart by its cause (a follower applying behind, a checkpoint or an fsync
//! that took long, a leader holding entries back for its followers, an election).
//!
//! Every node serves Prometheus text on a port of its own (`--metrics-listen`, always given by
//! `cluster`). Every interval the sampler reads it from each node that runs and writes the series
//! below (plain gauges and counters, and histograms' `_sum` and `_count`, never their buckets)
//! to `nodes/metrics.tsv`: one line per series and node, `seconds node name{labels} value`, the seconds
//! on the history's clock (`Recorder::now_us`). `docs/jepsen/rush-hour/scripts/gaps.py` lines them
//! up with the longest gaps between acknowledged writes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::workload::Recorder;

/// The series kept (exact names, or a histogram's name for its `_sum` and `_count`).
const SERIES: &[&str] = &[
    "tally_raft_is_leader",
    "tally_raft_term",
    "tally_raft_last_log_index",
    "tally_raft_committed_index",
    "tally_raft_applied_index",
    "tally_raft_snapshot_index",
    "tally_raft_log_first_index",
    "tally_raft_replication_lag",
    "tally_raft_elections_total",
    "tally_follower_apply_lag_ms",
    "tally_pace_wait_seconds",
    "tally_checkpoint_seconds",
    "tally_wal_fsync_seconds",
    "tally_entry_commit_seconds",
    "tally_group_commit_wait_seconds",
    "tally_snapshot_build_seconds",
    "tally_snapshots_sent_total",
    "tally_snapshots_received_total",
    "tally_receiving_state_bytes",
    "tally_state_merges_failed",
    "tally_apply_seconds",
    "tally_applied_events_total",
    "tally_entry_events",
    "tally_process_cpu_seconds_total",
    "tally_process_run_wait_seconds_total",
];

/// How long one node may take to answer before its sample is skipped.
const READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether the metrics line `line` (`name{labels} value` or `name value`) is one of `SERIES`.
fn kept(line: &str) -> bool {
    let name = line.split([' ', '{']).next().unwrap_or("");
    SERIES.iter().any(|series| {
        name == *series || name.strip_prefix(series).is_some_and(|rest| rest == "_sum" || rest == "_count")
    })
}

/// The kept lines of a Prometheus text page, as `name{labels}` and value.
fn parse(page: &str) -> Vec<(&str, &str)> {
    page.lines()
        .filter(|line| !line.starts_with('#') && kept(line))
        .filter_map(|line| line.rsplit_once(' '))
        .collect()
}

/// One `GET /metrics` from `address`, the body.
async fn fetch(address: SocketAddr) -> Option<String> {
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    };
    tokio::time::timeout(READ_TIMEOUT, get).await.ok().flatten()
}

/// Until `stop`: samples every node of `nodes` every `every` into `out`.
pub async fn run(
    nodes: Vec<(u64, SocketAddr)>,
    out: &Path,
    every: Duration,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut file =
        tokio::fs::File::create(out).await.map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let pages = read_all(&nodes).await;
        let seconds = recorder.now_us() as f64 / 1e6;
        let mut lines = String::new();
        for (id, page) in pages {
            let Some(page) = page else { continue };
            for (name, value) in parse(&page) {
                lines.push_str(&format!("{seconds:.3}\t{id}\t{name}\t{value}\n"));
            }
        }
        file.write_all(lines.as_bytes()).await.map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    file.flush().await.map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// Every node's page, read at once (a node that does not answer does not delay the others).
async fn read_all(nodes: &[(u64, SocketAddr)]) -> Vec<(u64, Option<String>)> {
    let mut reads = tokio::task::JoinSet::new();
    for (id, address) in nodes.iter().copied() {
        reads.spawn(async move { (id, fetch(address).await) });
    }
    let mut pages = Vec::new();
    while let Some(page) = reads.join_next().await {
        if let Ok(page) = page {
            pages.push(page);
        }
    }
    pages.sort_by_key(|(id, _)| *id);
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kept_series_and_histograms_sums_and_counts_are_read() {
        let page = "# HELP tally_raft_applied_index applied\n\
                    tally_raft_applied_index 1234\n\
                    tally_raft_applied_index_other 1\n\
                    tally_checkpoint_seconds_bucket{le=\"0.1\"} 3\n\
                    tally_checkpoint_seconds_sum 0.25\n\
                    tally_checkpoint_seconds_count 4\n\
                    tally_raft_replication_lag{node=\"2\"} 17\n\
                    tally_grpc_requests_total{method=\"x\"} 9\n";
        assert_eq!(
            parse(page),
            [
                ("tally_raft_applied_index", "1234"),
                ("tally_checkpoint_seconds_sum", "0.25"),
                ("tally_checkpoint_seconds_count", "4"),
                ("tally_raft_replication_lag{node=\"2\"}", "17")
            ]
        );
    }
}
