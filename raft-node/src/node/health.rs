//! What a node tells about itself: its metrics' gauges and endpoint, its leadership changes in
//! the log, and the storage failures that stop it.

use openraft::type_config::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use super::NodeHandle;

/// Logs every change of leader or term this node sees, for the operator and chaos runs.
pub async fn log_leadership(node: Arc<NodeHandle>) {
    // Server metrics: they change with the leader and the vote, not with every append.
    let mut metrics = node.raft.server_metrics();
    let mut last = (None, 0);
    loop {
        let now = {
            let m = metrics.borrow_watched();
            (m.current_leader, m.vote.leader_id().term)
        };
        if now != last {
            match now.0 {
                Some(leader) => {
                    if last.0 != Some(leader) {
                        crate::metrics::LEADER_CHANGES.inc();
                    }
                    tracing::info!(node = node.id(), term = now.1, leader, "leader known")
                }
                None => tracing::info!(node = node.id(), term = now.1, "no leader"),
            }
            if now.1 > last.1 {
                crate::metrics::TERMS.inc();
            }
            last = now;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The exit code of a node that stopped because its storage failed (EX_IOERR): a supervisor
/// restarts it once the disk is fixed; any other failure exits with 1.
pub const EXIT_STORAGE_FAILED: u8 = 74;

/// Resolves when Raft has stopped on a fatal error, with that error: a write or fsync of the log
/// that failed (a full or failing disk), a state that could not be applied. The node cannot go on
/// without its storage; restarted, it recovers from what is really on disk (see `storage/wal.rs`,
/// "Durability"). Never resolves while Raft runs.
pub async fn fatal(node: Arc<NodeHandle>) -> String {
    // Looks at the full metrics only when the server metrics change (openraft stopping drops
    // their sender) or once a second: the full ones change on every append and apply.
    let mut changes = node.raft.server_metrics();
    let mut ticks = tokio::time::interval(FATAL_POLL);
    loop {
        if let Err(fatal) = &node.raft.metrics().borrow_watched().running_state {
            return fatal.to_string();
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                if let Err(fatal) = &node.raft.metrics().borrow_watched().running_state {
                    return fatal.to_string();
                }
                return "raft stopped".into();
            },
            _ = ticks.tick() => {}
        }
    }
}

/// How often `fatal` looks whether Raft stopped, beside the changes it is told of.
pub(crate) const FATAL_POLL: Duration = Duration::from_secs(1);

impl NodeHandle {
    /// Sets the gauges of what openraft and the disk say now (before `metrics::text`).
    pub fn refresh_metrics(&self) {
        use crate::metrics::*;
        {
            let metrics = self.raft.metrics();
            let current = metrics.borrow_watched();
            TERM.set(current.current_term as i64);
            IS_LEADER.set(i64::from(current.current_leader == Some(self.id())));
            LAST_LOG.set(current.last_log_index.unwrap_or(0) as i64);
            APPLIED.set(current.last_applied.map_or(0, |id| id.index) as i64);
            COMMITTED.set(current.local_committed.map_or(0, |id| id.index) as i64);
            SNAPSHOT_INDEX.set(current.snapshot.map_or(0, |id| id.index) as i64);
            LOG_FIRST.set(current.purged.map_or(0, |id| id.index + 1) as i64);
            RECEIVING_STATE.set(self.receiving.bytes().map_or(-1, |bytes| bytes as i64));
            LAG.reset();
            if let Some(replication) = &current.replication {
                let last = current.last_log_index.unwrap_or(0);
                for (peer, matched) in replication {
                    let matched = matched.as_ref().map_or(0, |m| m.index);
                    LAG.with_label_values(&[&peer.to_string()]).set(last.saturating_sub(matched) as i64);
                }
            }
        }
        let dir = &self.config.data_dir;
        for (part, path) in
            [("wal", dir.join("wal")), ("state", dir.join("state")), ("snapshots", dir.join("snapshots"))]
        {
            DISK.with_label_values(&[part]).set(bytes_under(&path) as i64);
        }
    }
}

/// Serves `--metrics-listen` (`metrics::http`): the node's metrics, and ready while it serves.
pub async fn serve_metrics(node: Arc<NodeHandle>, address: std::net::SocketAddr) -> Result<(), String> {
    let ready = node.clone();
    let render = move || {
        node.refresh_metrics();
        crate::metrics::text()
    };
    crate::metrics::http::serve(address, render, move || {
        ready.serving.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await
}
