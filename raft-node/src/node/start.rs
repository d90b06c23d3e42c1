//! Start-up and wiring: open the log and the state, start Raft over them, bootstrap or join.

use crate::batcher::Batcher;
use crate::clock::ClusterClock;
use crate::net::Network;
use crate::net::identity::{Endpoint, Identities};
use crate::storage::Raft;
use crate::storage::log_store::LogStore;
use crate::storage::state_machine::StateMachine;
use crate::types::NodeInfo;
use openraft::type_config::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tally_proto::v1 as pb;

use super::{
    LastSeen, NodeConfig, NodeHandle, Receiving, VoteHold, WAL_DIR, claim_data_dir,
    release_votes_when_caught_up, save_cluster_id,
};

/// Commands openraft may queue for the state machine before its core waits (`raft_config`): a
/// minute of commit advances at a thousand entries a second, some dozens of bytes each.
const STATE_MACHINE_COMMANDS_MAX: u64 = 1 << 16;

/// How long the leader waits before it tries a peer again that did not answer (openraft's
/// backoff policy: 100 ms, then 200 ms, then every 300 ms). openraft's default doubles from
/// 200 ms to a second, so a follower back from a restart waited up to a second more for its
/// first entries (0.5 s on average) while the cluster ran without redundancy (issue 24). A try
/// at a node that is down costs a refused connection.
const REPLICATION_BACKOFF: &str = "100ms 200ms ...300ms";

pub(crate) fn raft_config(config: &NodeConfig) -> openraft::Config {
    openraft::Config {
        cluster_name: config.cluster.clone(),
        heartbeat_interval: config.heartbeat_ms,
        // openraft's leader lease is `election_timeout_max`: a follower refuses to vote until
        // that long after the last heartbeat it saw, so a follower whose timer fires first
        // (at `min`) is refused and tries again a timeout later. Max at 1.25 x min, not 2 x,
        // shortens that lease (issue 24: a new leader 450-550 ms after the leader's site died at
        // 150-300 ms).
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms + config.election_timeout_ms / 4,
        // Entries per append: up to 64 MiB messages fit a few hundred 1 MiB entries.
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
        // The log behind a snapshot is purged by `service::cluster::purge_behind_snapshots`, by
        // entries, bytes and age; openraft would purge by entries alone.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: 60_000,
        enable_elect: true,
        // A leader that restarts must win a new election before it serves. Restoring leadership
        // at once (openraft's default) lets it answer linearizable reads from its persisted
        // commit index, which we write lazily, and from its state, which reaches the disk in checkpoints:
        // the chaos harness caught such a leader serving a read that missed payments
        // acknowledged just before a power loss. A new election commits a fresh entry first.
        enable_leader_restore: Some(false),
        // A follower that was frozen or cut off must not bump its term when it comes back and
        // depose a healthy leader: it first asks whether a quorum would vote for it, and one that
        // still hears from the leader says no. (Without it, a follower thawed after a 6 s
        // SIGSTOP under load forced an election every time.)
        enable_pre_vote: Some(true),
        // A follower behind in applying keeps acknowledging entries: openraft queues a command
        // for its state-machine task per advance of the commit index, and its core stops (no
        // acknowledgements, no votes) while the queue is full. At 1,024 (its default) a follower
        // a second or two behind under single-transfer writes stopped, and when the leader was
        // lost and that follower was the only other voter, the cluster committed at its apply rate.
        state_machine_channel_size: Some(STATE_MACHINE_COMMANDS_MAX),
        backoff: REPLICATION_BACKOFF.to_string(),
        ..openraft::Config::default()
    }
}

/// Why a node did not start.
#[derive(Debug)]
pub enum StartError {
    /// Its write-ahead log or its state cannot be read back (damaged, or a failing disk): it
    /// cannot serve, and what to do is in the message. Exit code `EXIT_DATA_UNREADABLE`.
    DataUnreadable(String),
    /// Re-applying the log at start found the ledger state damaged and marked it: started again
    /// (a supervisor's restart), the node rebuilds it. Exit code `EXIT_STORAGE_FAILED`.
    StateDamaged(String),
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::DataUnreadable(message)
            | StartError::StateDamaged(message)
            | StartError::Other(message) => f.write_str(message),
        }
    }
}

impl From<String> for StartError {
    fn from(message: String) -> StartError {
        StartError::Other(message)
    }
}

/// What an operator does about a data directory the node cannot read back.
pub(crate) fn unreadable(config: &NodeConfig, what: &str, error: impl std::fmt::Display) -> StartError {
    StartError::DataUnreadable(format!(
        "cannot read {what} in {}: {error}. This node cannot repair it by itself and will not serve \
         from it. If the disk fails, replace it first. Then move {} aside (keep it to find out what \
         happened), start this node again with the same flags on an empty data directory, and run \
         `tally cluster replace --id {}` against any node: it rejoins as a new incarnation and copies \
         the ledger from its peers",
        config.data_dir.display(),
        config.data_dir.display(),
        config.id
    ))
}

/// The exit code of a node that cannot read its own data back (EX_DATAERR): see `StartError`.
pub const EXIT_DATA_UNREADABLE: u8 = 65;

/// Opens the node's storage and starts Raft and the batcher.
pub async fn start(config: NodeConfig) -> Result<Arc<NodeHandle>, StartError> {
    let tls = match (&config.tls, config.insecure) {
        (Some(files), false) => Some(Arc::new(crate::security::tls::Tls::load(files.clone(), config.id)?)),
        (None, true) => None,
        (Some(_), true) => {
            return Err("--insecure and TLS files (--ca, --cert, --key) exclude each other"
                .to_string()
                .into());
        }
        (None, false) => {
            return Err(
                "TLS needs --ca, --cert and --key (make them with `tally certs`); plaintext only with \
                 --insecure"
                    .to_string()
                    .into(),
            );
        }
    };
    let claimed = claim_data_dir(&config)?;
    let identities = Arc::new(
        Identities::new(Endpoint { id: config.id, incarnation: claimed.incarnation }, claimed.cluster_id)
            .named(&config.cluster),
    );
    let segment_bytes = config.wal_segment_bytes.unwrap_or(crate::storage::wal::SEGMENT_BYTES_MAX);
    let opening = std::time::Instant::now();
    let log =
        LogStore::open_with(&config.data_dir.join(WAL_DIR), segment_bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::Unsupported => StartError::Other(e.to_string()),
            _ => unreadable(&config, "the write-ahead log (wal/)", e),
        })?;
    let checkpoints = crate::storage::state_machine::CheckpointPolicy {
        interval: Duration::from_millis(config.checkpoint_interval_ms),
        bytes_max: config.checkpoint_bytes,
    };
    let log_opened = opening.elapsed();
    let machine = StateMachine::open(&config.data_dir, config.cache_bytes, checkpoints)
        .map_err(|e| unreadable(&config, "the ledger state (state/, snapshots/)", e))?;
    let state_opened = opening.elapsed();
    machine.shared.limit_semantics(config.semantics_max).map_err(|e| e.to_string())?;
    machine.shared.delay_applies(Duration::from_millis(config.apply_delay_ms));
    // A rebuilt state starts at the local snapshot; the log must go on from there.
    let (applied, purged) = (machine.shared.applied().last_applied, log.last_purged());
    if applied < purged {
        return Err(unreadable(
            &config,
            "the ledger state (state/, snapshots/)",
            format!(
                "it ends at {applied:?}, but the log was purged up to {purged:?}, with no snapshot to cover the gap"
            ),
        ));
    }
    let state = machine.shared.clone();
    let votes = VoteHold::default();
    if let Some((first, last_seen)) = log.lost_tail() {
        tracing::warn!(
            node = config.id,
            "the log's tail from entry {first} was damaged (a crash tore unsynced writes, or the disk \
             damaged them), with entries up to {last_seen} on disk after it; it is cut off. This node \
             neither votes nor stands for election until a leader has given it entries up to \
             {last_seen} again, in case it had acknowledged some"
        );
        votes.withhold_until(last_seen);
    }
    let pace = Arc::new(
        crate::pace::Pace::new(Duration::from_millis(config.pace_lag_ms))
            .with_lag_all_max(Duration::from_millis(config.pace_lag_all_ms)),
    );
    let mut raft_config = raft_config(&config);
    raft_config.enable_elect = votes.withheld().is_none();
    let raft_config = Arc::new(raft_config.validate().map_err(|e| format!("raft configuration: {e}"))?);
    let raft = Raft::new(
        config.id,
        raft_config,
        Network::new(config.routes.clone(), identities.clone(), tls.clone(), pace.clone()),
        log.clone(),
        machine,
    )
    .await
    .map_err(|e| {
        if crate::storage::state_machine::marked_damaged(&config.data_dir) {
            StartError::StateDamaged(format!(
                "re-applying the log found the ledger state damaged ({e}); it is marked, and this node \
                 rebuilds it from its snapshot and log when started again"
            ))
        } else {
            StartError::Other(format!("cannot start raft: {e}"))
        }
    })?;
    // Where a restart's time goes: a node that takes long to start leaves the cluster short of
    // a member for as long (issue 24).
    tracing::info!(
        node = config.id,
        "storage open in {} ms: the log ({}..{}) in {} ms, the ledger state (applied {}) in {} ms, \
         raft in {} ms; what was committed after the state's entry is applied as the leader's \
         commit index reaches this node",
        opening.elapsed().as_millis(),
        log.last_purged().map_or(0, |id| id.index + 1),
        log.last_index().unwrap_or(0),
        log_opened.as_millis(),
        applied.map_or(0, |id| id.index),
        (state_opened - log_opened).as_millis(),
        (opening.elapsed() - state_opened).as_millis(),
    );
    let clock = ClusterClock::new(config.clock_tolerance_ms, config.clock_skew_file.clone());
    let batcher = Batcher::start(
        raft.clone(),
        Duration::from_micros(config.group_commit_delay_us),
        clock.clone(),
        config.id,
        crate::batcher::Limits {
            bytes_max: config.queued_bytes_max,
            queue_wait_max: Duration::from_millis(config.queue_wait_max_ms),
            entry_apply_target: Some(Duration::from_millis(config.entry_apply_target_ms))
                .filter(|target| !target.is_zero()),
        },
        pace.clone(),
        state.clone(),
    );
    tokio::spawn(record_applying(raft.clone(), pace.clone()));
    identities.update(raft.metrics().borrow_watched().membership_config.membership().nodes());
    tokio::spawn(follow_membership(raft.clone(), identities.clone()));
    let subscribers_max = config.subscribers_max;
    let node = Arc::new(NodeHandle {
        config,
        identities,
        clock,
        raft,
        state,
        log,
        batcher,
        peers: crate::net::Pool::new(tls.clone()),
        tls,
        leader_contact: LastSeen::default(),
        leader_quorum: LastSeen::default(),
        shorter_log_candidate: LastSeen::default(),
        serving: std::sync::atomic::AtomicBool::new(false),
        started: std::time::Instant::now(),
        subscribers: Arc::new(tokio::sync::Semaphore::new(subscribers_max)),
        status_cache: tokio::sync::Mutex::new(None),
        receiving: Receiving::default(),
        votes,
        pace,
    });
    if node.votes.withheld().is_some() {
        tokio::spawn(release_votes_when_caught_up(node.clone()));
    }
    tokio::spawn(super::clock_samples::sample_peers(node.clone()));
    tokio::spawn(super::standing::stand_only_when_applied(node.clone()));
    tokio::spawn(crate::batcher::expire_when_due(
        node.raft.clone(),
        node.state.clone(),
        node.clock.clone(),
        node.id(),
    ));
    if node.config.bootstrap {
        bootstrap(&node).await?;
    }
    if let Some(address) = node.config.join.clone() {
        tokio::spawn(join(node.clone(), address));
    }
    Ok(node)
}

/// Keeps the incarnations the Raft RPCs check in step with the membership in effect. Watches
/// openraft's server metrics, which change with the vote, the leader and the membership only:
/// its full metrics change on every append and apply, and each change woke this task (and two
/// others like it) thousands of times a second under load.
pub(crate) async fn follow_membership(raft: Raft, identities: Arc<Identities>) {
    let mut metrics = raft.server_metrics();
    let mut followed = *metrics.borrow_watched().membership_config.log_id();
    while metrics.changed().await.is_ok() {
        let membership = {
            let current = metrics.borrow_watched();
            if current.membership_config.log_id() == &followed {
                continue;
            }
            current.membership_config.clone()
        };
        followed = *membership.log_id();
        identities.update(membership.membership().nodes());
    }
}

pub(crate) async fn bootstrap(node: &NodeHandle) -> Result<(), StartError> {
    if node.raft.is_initialized().await.map_err(|e| StartError::Other(e.to_string()))? {
        return Ok(());
    }
    // The cluster id first, durably: a crash before `initialize` bootstraps again with it.
    if node.identities.cluster_id().is_none() {
        let id = crate::net::identity::new_cluster_id();
        save_cluster_id(&node.config.data_dir, &id)?;
        node.identities.check_cluster(Some(&id), true, |_| Ok(())).map_err(|e| format!("{e:?}"))?;
    }
    let mut members = BTreeMap::new();
    members.insert(node.id(), node.config.info(node.incarnation()));
    // The peers' incarnations are not known yet: the leader records them once they answer.
    for peer in &node.config.peers {
        members.insert(
            peer.id,
            NodeInfo {
                address: peer.address.clone(),
                peer_address: peer.peer_address.clone(),
                site: peer.site.clone(),
                incarnation: 0,
            },
        );
    }
    node.raft.initialize(members).await.map_err(|e| format!("cannot bootstrap the cluster: {e}").into())
}

/// Asks the cluster at `address` to add this node, retrying until it answers.
pub(crate) async fn join(node: Arc<NodeHandle>, address: String) {
    let request = pb::AddNodeRequest {
        id: node.id(),
        address: node.config.advertise(),
        peer_address: node.config.peer_advertise(),
        site: node.config.site.clone(),
        learner_only: false,
        force: false,
        incarnation: node.incarnation(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = node.peers.channel(None, &address)?;
            let mut client = pb::cluster_client::ClusterClient::new(channel);
            client.add_node(request.clone()).await.map_err(|s| s.message().to_string())
        };
        match attempt.await {
            Ok(_) => return,
            Err(error) if error.contains("refused") || error.contains("site") => {
                eprintln!("tally: node {} cannot join via {address}: {error}", node.id());
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// How recently a leader must have been heard from (a follower) or have heard from a quorum
/// (the leader) for health to say SERVING.
pub(crate) fn leader_contact_max(config: &NodeConfig) -> Duration {
    Duration::from_millis((config.election_timeout_ms * 6).max(1000))
}

/// For the life of the node: tells `pace` how this node's applying advances, which is what a
/// leader measures its followers' lag against.
async fn record_applying(raft: crate::storage::Raft, pace: Arc<crate::pace::Pace>) {
    let mut metrics = raft.metrics();
    loop {
        let applied = metrics.borrow_watched().last_applied.map(|id| id.index);
        if let Some(applied) = applied {
            pace.applied(applied);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_peer_that_did_not_answer_is_tried_again_within_300_ms() {
        let config =
            openraft::Config { backoff: super::REPLICATION_BACKOFF.to_string(), ..Default::default() };
        let config = config.validate().expect("the backoff policy parses");
        let delays: Vec<Duration> = config.build_backoff().take(20).collect();
        assert_eq!(
            delays[..3],
            [Duration::from_millis(100), Duration::from_millis(200), Duration::from_millis(300)]
        );
        assert!(delays.iter().all(|delay| *delay <= Duration::from_millis(300)), "{delays:?}");
    }
}
