//! One running node: its configuration, its data directory, Raft, and the gRPC server.
//!
//! Start-up order: check the data directory belongs to this cluster and node id (`identity`),
//! open the WAL and the state, start Raft, bootstrap or join if asked (`start`), then serve gRPC
//! until SIGTERM or Ctrl-C, then shut Raft down (`service::serve`). `config` holds what a node is
//! told, `health` what it reports; this module, `NodeHandle`: what the services ask of a running
//! node.

mod clock_samples;
mod config;
mod health;
mod identity;
pub(crate) mod standing;
mod start;

use crate::batcher::Batcher;
use crate::clock::ClusterClock;
use crate::net::identity::Identities;
use crate::storage::Raft;
use crate::storage::log_store::LogStore;
use crate::types::{NodeId, NodeInfo};
use openraft::ChangeMembers;
use openraft::type_config::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

pub use self::config::*;
pub use self::health::*;
pub use self::identity::*;
pub use self::start::*;

/// A running node: everything the gRPC services need. The simulator drives `raft`, `state`, `clock` and `votes` directly; the rest
/// is the crate's, and the services ask through the methods below where they can.
pub struct NodeHandle {
    pub(crate) config: NodeConfig,
    /// This node's id and incarnation, and those its membership records (`net::identity`).
    pub(crate) identities: Arc<Identities>,
    /// This node's view of the voters' clocks: what the leader may stamp.
    pub clock: Arc<ClusterClock>,
    pub raft: Raft,
    pub state: Arc<crate::storage::state_machine::Shared>,
    pub(crate) log: LogStore,
    pub(crate) batcher: Batcher,
    /// Channels to other nodes for forwarded requests and status fan-out.
    pub(crate) peers: crate::net::Pool,
    /// This node's TLS (None with `--insecure`); reloaded on SIGHUP.
    pub(crate) tls: Option<Arc<crate::security::tls::Tls>>,
    /// When this node last accepted a leader's AppendEntries (for health).
    pub(crate) leader_contact: LastSeen,
    /// When the leader last said, asked for its clock, that a majority of voters acknowledged
    /// it lately (for health: a leader cut off from its quorum still sends heartbeats).
    leader_quorum: LastSeen,
    /// When this node last refused a (pre-)vote to a candidate whose log is shorter than its
    /// own: such a candidate cannot win with this node's vote, so this node stands even if it is
    /// behind in applying (`standing`).
    pub(crate) shorter_log_candidate: LastSeen,
    /// What gRPC health says now (SERVING): also `GET /ready` on the metrics endpoint, for
    /// probes that cannot speak TLS.
    pub(crate) serving: std::sync::atomic::AtomicBool,
    /// When the node started, for its uptime.
    started: std::time::Instant,
    /// One permit per change-stream subscriber this node may serve (`--max-subscribers`).
    pub(crate) subscribers: Arc<tokio::sync::Semaphore>,
    /// The last whole-cluster status and when it was gathered, shared by callers without an
    /// operator's or a node's certificate (`service::cluster`).
    pub(crate) status_cache: tokio::sync::Mutex<Option<(std::time::Instant, tally_proto::v1::StatusReply)>>,
    /// The whole state arriving from the leader, while it does (`service::raft`).
    pub(crate) receiving: Receiving,
    /// Whether this node withholds its vote after losing a damaged tail of its log.
    pub votes: VoteHold,
    /// How far the followers have applied, and this node's own applying, for a leader's pace.
    pub pace: Arc<crate::pace::Pace>,
}

/// Whether this node withholds its vote, and until its log reaches which index: after recovery cut
/// off a damaged tail it may have acknowledged (`LogStore::lost_tail`), it must not help elect a
/// leader that lacks those entries, nor stand itself. A leader's entries up to that index bring
/// them back (a leader holds every committed entry).
#[derive(Default)]
pub struct VoteHold {
    /// The index the log must reach; 0 when votes are not withheld.
    until: std::sync::atomic::AtomicU64,
}

impl VoteHold {
    fn withhold_until(&self, index: u64) {
        self.until.store(index.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// The index until which this node withholds its vote, if it does.
    pub fn withheld(&self) -> Option<u64> {
        Some(self.until.load(std::sync::atomic::Ordering::SeqCst)).filter(|until| *until > 0)
    }
}

/// Votes and elections again once the log holds entries up to the withheld index.
async fn release_votes_when_caught_up(node: Arc<NodeHandle>) {
    let Some(until) = node.votes.withheld() else { return };
    let mut metrics = node.raft.metrics();
    loop {
        let caught_up = metrics.borrow_watched().last_log_index.is_some_and(|last| last >= until);
        if caught_up {
            node.votes.until.store(0, std::sync::atomic::Ordering::SeqCst);
            node.raft.runtime_config().elect(true);
            tracing::info!(
                node = node.id(),
                "the log holds entries up to {until} again: this node votes again"
            );
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// A snapshot being received: whether one is, and its bytes so far.
#[derive(Default)]
pub struct Receiving {
    active: std::sync::atomic::AtomicBool,
    bytes: std::sync::atomic::AtomicU64,
}

impl Receiving {
    /// Marks a snapshot as arriving until the guard is dropped.
    pub fn start(&self) -> ReceivingGuard<'_> {
        self.bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        self.active.store(true, std::sync::atomic::Ordering::Relaxed);
        ReceivingGuard(self)
    }

    /// Bytes received so far, or `None` when no snapshot is arriving.
    pub fn bytes(&self) -> Option<u64> {
        self.active
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.bytes.load(std::sync::atomic::Ordering::Relaxed))
    }
}

pub struct ReceivingGuard<'a>(&'a Receiving);

impl ReceivingGuard<'_> {
    pub fn received(&self, bytes: u64) {
        self.0.bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ReceivingGuard<'_> {
    fn drop(&mut self) {
        self.0.active.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When something was last seen (a leader heard from, a leader saying it had a quorum, a
/// candidate with a shorter log): milliseconds since the node started, `u64::MAX` for never.
pub struct LastSeen {
    started: tokio::time::Instant,
    at_ms: std::sync::atomic::AtomicU64,
}

impl Default for LastSeen {
    fn default() -> LastSeen {
        LastSeen { started: tokio::time::Instant::now(), at_ms: std::sync::atomic::AtomicU64::new(u64::MAX) }
    }
}

impl LastSeen {
    pub fn record(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.at_ms.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn within(&self, window: Duration) -> bool {
        match self.at_ms.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => false,
            at => (self.started.elapsed().as_millis() as u64).saturating_sub(at) < window.as_millis() as u64,
        }
    }
}

impl NodeHandle {
    /// Whether this node serves now (what health reports): a member in contact with a leader
    /// that has heard from a majority of voters lately; as the leader, that it has.
    pub fn judge_serving(&self) -> bool {
        let contact_max = leader_contact_max(&self.config);
        let metrics = self.raft.metrics();
        let current = metrics.borrow_watched();
        let member = current.membership_config.membership().get_node(&self.id()).is_some();
        let in_contact = if current.current_leader == Some(self.id()) {
            current
                .last_quorum_acked
                .as_ref()
                .is_some_and(|acked| openraft::Instant::elapsed(&**acked) < contact_max)
        } else {
            current.current_leader.is_some()
                && self.heard_from_leader_within(contact_max)
                && self.leader_quorum.within(contact_max)
        };
        member && in_contact
    }

    pub fn heard_from_leader_within(&self, window: Duration) -> bool {
        self.leader_contact.within(window)
    }

    /// How long this node has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    pub fn incarnation(&self) -> u64 {
        self.identities.me.incarnation
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id())
    }

    /// The last log index this node has applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow_watched().last_applied.map_or(0, |id| id.index)
    }

    /// Node `id`'s client door, as the membership records it: what clients use to reach it.
    pub fn advertised_address_of(&self, id: NodeId) -> Option<String> {
        self.member(id).map(|n| n.address)
    }

    /// The address this node uses to reach node `id`'s peer door: its route, or the
    /// membership's peer address.
    pub fn address_of(&self, id: NodeId) -> Option<String> {
        self.config.routes.get(&id).cloned().or_else(|| self.member(id).map(|n| n.peer_address))
    }

    fn member(&self, id: NodeId) -> Option<NodeInfo> {
        let metrics = self.raft.metrics();
        let membership = metrics.borrow_watched().membership_config.clone();
        membership.membership().get_node(&id).cloned()
    }
}

/// Why a read could not be linearized here (`NodeHandle::read_barrier`).
#[derive(Debug)]
pub enum ReadBarrier {
    /// This node does not lead: the read goes to the leader.
    NotLeader,
    /// No majority confirmed the read index.
    Unavailable(String),
    /// The node is shutting down.
    Stopping(String),
}

/// What Raft says on this node at one moment: term, leader, log, applied and committed indexes,
/// membership, and on the leader each follower's replication.
pub type RaftView = openraft::RaftMetrics<crate::types::TypeConfig>;

/// What the services ask of Raft through the node: its view, and the changes an operator makes.
impl NodeHandle {
    /// What Raft says now.
    pub fn raft_view(&self) -> RaftView {
        self.raft.metrics().borrow_watched().clone()
    }

    /// Waits until this node's state reflects every write committed before the call (a read
    /// index, confirmed by a majority): what a linearizable read waits for.
    pub async fn read_barrier(&self) -> Result<(), ReadBarrier> {
        use openraft::error::{LinearizableReadError, RaftError};
        let linearizer = match self.raft.get_read_linearizer(openraft::ReadPolicy::ReadIndex).await {
            Ok(linearizer) => linearizer,
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(_))) => {
                return Err(ReadBarrier::NotLeader);
            }
            Err(error) => return Err(ReadBarrier::Unavailable(error.to_string())),
        };
        linearizer.await_ready(&self.raft).await.map(|_| ()).map_err(|e| ReadBarrier::Stopping(e.to_string()))
    }

    /// Waits until `done` holds of what Raft says, at most `timeout`; whether it came to hold.
    pub async fn wait_for_raft(&self, timeout: Duration, done: impl Fn(&RaftView) -> bool) -> bool {
        let mut metrics = self.raft.metrics();
        tokio::time::timeout(timeout, async {
            loop {
                if done(&metrics.borrow_watched()) {
                    return true;
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// The voters, and every member (voters and learners) with what the membership records.
    pub fn membership(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, NodeInfo>) {
        let metrics = self.raft.metrics();
        let current = metrics.borrow_watched();
        let membership = current.membership_config.membership();
        (membership.voter_ids().collect(), membership.nodes().map(|(id, n)| (*id, n.clone())).collect())
    }

    /// Changes the membership (on the leader) and waits until the change is committed: the
    /// index of its entry. `retain`: removed voters stay as learners.
    pub async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, NodeInfo>,
        retain: bool,
    ) -> Result<u64, String> {
        let changed = self.raft.change_membership(change, retain).await.map_err(|e| e.to_string())?;
        Ok(changed.log_id.index)
    }

    /// Adds node `id` as a learner (on the leader): the index of the entry that adds it.
    pub async fn add_learner(&self, id: NodeId, info: NodeInfo) -> Result<u64, String> {
        let added = self.raft.add_learner(id, info, false).await.map_err(|e| e.to_string())?;
        Ok(added.log_id.index)
    }

    /// Proposes `request` (on the leader) and waits until it is applied: the index of its entry.
    pub async fn propose(&self, request: crate::types::Request) -> Result<u64, String> {
        let written = self.raft.client_write(request).await.map_err(|e| e.to_string())?;
        Ok(written.log_id.index)
    }

    /// Asks this node's Raft to hand leadership to `to`.
    pub async fn transfer_leadership(&self, to: NodeId) -> Result<(), String> {
        self.raft.trigger().transfer_leader(to).await.map_err(|e| e.to_string())
    }

    /// Asks for a snapshot of the applied state now.
    pub async fn snapshot_now(&self) -> Result<(), String> {
        self.raft.trigger().snapshot().await.map_err(|e| e.to_string())
    }

    /// Purges the log up to `index` (openraft keeps what a replication still reads).
    pub async fn purge_log_upto(&self, index: u64) -> Result<(), String> {
        self.raft.trigger().purge_log(index).await.map_err(|e| e.to_string())
    }

    /// Lets the leader's replication to `id` start over from an empty log, once: for a node
    /// that comes back on a new disk.
    pub async fn allow_log_restart(&self, id: NodeId) -> Result<(), String> {
        match self.raft.trigger().allow_next_revert(&id, true).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(fatal) => Err(fatal.to_string()),
        }
    }
}
