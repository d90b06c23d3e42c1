//! Health: what the node reports to gRPC health checks, logs about leadership, and the storage
//! failures that stop it.

use openraft::type_config::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;
use tally_proto::v1 as pb;

use super::NodeHandle;

/// How often health is re-evaluated.
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// Keeps gRPC health true to what a load balancer needs to know: SERVING only while this node
/// is a member and in contact with a leader that is in contact with a quorum (it can take
/// writes, forwarding them); NOT_SERVING when no leader is elected, when it is cut off from the
/// leader, when the leader is cut off from a quorum, and once it is removed from the cluster.
/// For the whole server ("") and for `tally.v1.Ledger`.
pub(crate) async fn report_health(node: Arc<NodeHandle>, reporter: tonic_health::server::HealthReporter) {
    let ledger =
        <pb::ledger_server::LedgerServer<crate::service::LedgerService> as tonic::server::NamedService>::NAME;
    let mut reported = None;
    let mut ticks = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        ticks.tick().await;
        let serving = node.judge_serving();
        node.serving.store(serving, std::sync::atomic::Ordering::Relaxed);
        if reported != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in ["", ledger] {
                reporter.set_service_status(service, status).await;
            }
            reported = Some(serving);
        }
    }
}

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
