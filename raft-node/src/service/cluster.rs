//! `tally.v1.Cluster`: status and membership for operators.
//!
//! Membership changes run on the leader (followers forward them) and obey the site rule
//! (DESIGN.md §9): a change after which losing any one site would remove a majority of voters is
//! refused with FAILED_PRECONDITION, unless forced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use tally_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::node::{NodeHandle, RaftView};
use crate::security::roles::{Role, caller_of, require_operator};
use crate::types::{NodeId, NodeInfo};

/// How long `TakeSnapshot` waits for the snapshot (and the purge) before giving up.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// How long a whole-cluster status gathered for one caller without a certificate serves others:
/// each costs a call to every other member, and anyone who reaches the client door may ask.
const SHARED_STATUS_MAX_AGE: Duration = Duration::from_secs(1);

/// How long Status waits for each other node's own report.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_millis(700);
/// How long AddNode waits for a new node to catch up before leaving it a learner.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClusterService {
    node: Arc<NodeHandle>,
}

impl ClusterService {
    pub fn new(node: Arc<NodeHandle>) -> ClusterService {
        ClusterService { node }
    }

    /// An operator, or a member node forwarding an operator's request (the follower checked
    /// the operator: `require_operator` runs before any forwarding); `joining` also lets that
    /// node ask for itself to be added. A removed node's certificate, or any other node
    /// certificate of the CA, could change the membership before.
    fn require_operator_or_member<T>(
        &self,
        request: &Request<T>,
        joining: Option<NodeId>,
    ) -> Result<(), Status> {
        match caller_of(request) {
            Role::Node(id) if self.node.identities.is_member(id) || joining == Some(id) => Ok(()),
            Role::Node(id) => Err(Status::permission_denied(format!(
                "node {id} is not a member of this cluster: it may not change it"
            ))),
            _ => require_operator(request),
        }
    }

    fn local_status(&self) -> pb::NodeStatus {
        let metrics = self.node.raft_view();
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == self.node.id());
        // Not from the ledger: its lock is held for the length of an apply or an install.
        let published = self.node.state.published();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let clock = self.node.clock.estimate(&voters, self.node.id());
        let clock_ok = self.node.clock.judge(&clock, voters.len()).is_ok();
        let receiving = self.node.receiving.bytes();
        pb::NodeStatus {
            id: self.node.id(),
            address: self.node.config.advertise(),
            peer_address: self.node.config.peer_advertise(),
            site: self.node.config.site.clone(),
            role: if voter { pb::NodeRole::Voter } else { pb::NodeRole::Learner } as i32,
            is_leader: metrics.current_leader == Some(self.node.id()),
            reachable: true,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            applied_index: published.index,
            replication_lag: 0,
            state_digest: hex(&published.digest),
            incarnation: self.node.incarnation(),
            needs_replace: false,
            recorded_incarnation: membership.get_node(&self.node.id()).map_or(0, |n| n.incarnation),
            clock_offset_ms: clock.offset_ns / 1_000_000,
            clock_synchronized: clock_ok,
            uptime_seconds: self.node.uptime().as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            digest_marks: published
                .marks
                .iter()
                .map(|(index, digest)| pb::DigestMark { index: *index, digest: hex(digest) })
                .collect(),
            semantics_version: published.semantics,
            semantics_known: self.node.state.semantics_max(),
            snapshot_index: metrics.snapshot.map_or(0, |id| id.index),
            log_first_index: metrics.purged.map_or(0, |id| id.index + 1),
            receiving_state: receiving.is_some(),
            state_bytes_received: receiving.unwrap_or(0),
            redundancy: pb::Redundancy::Unspecified as i32,
            entries_behind: 0,
            serving: self.node.judge_serving(),
            cluster: self.node.config.cluster.clone(),
        }
    }

    /// The whole cluster as this node sees it, with every member's own report.
    async fn cluster_status(&self) -> pb::StatusReply {
        let metrics = self.node.raft_view();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let nodes: BTreeMap<NodeId, NodeInfo> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let lags: BTreeMap<NodeId, u64> = metrics
            .replication
            .as_ref()
            .map(|replication| {
                let last = metrics.last_log_index.unwrap_or(0);
                replication
                    .iter()
                    .map(|(id, matched)| (*id, last - matched.map_or(0, |m| m.index).min(last)))
                    .collect()
            })
            .unwrap_or_default();
        let reports =
            futures::future::join_all(nodes.iter().map(|(id, info)| self.node_report(*id, info))).await;
        let nodes = reports
            .into_iter()
            .map(|mut report| {
                report.role =
                    if voters.contains(&report.id) { pb::NodeRole::Voter } else { pb::NodeRole::Learner }
                        as i32;
                report.is_leader = metrics.current_leader == Some(report.id);
                report.replication_lag = lags.get(&report.id).copied().unwrap_or(0);
                let recorded = nodes.get(&report.id).map_or(0, |n| n.incarnation);
                report.needs_replace = report.reachable && recorded != 0 && report.incarnation != recorded;
                report.recorded_incarnation = recorded;
                report
            })
            .collect::<Vec<_>>();
        let nodes = judge_redundancy(nodes, metrics.replication.is_some());
        let sites = site_status(&voters, &membership.nodes().map(|(id, n)| (*id, n.clone())).collect());
        let divergences = divergences(&nodes);
        let mut reply = pb::StatusReply {
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            committed_index: metrics.local_committed.map_or(0, |id| id.index),
            nodes,
            sites,
            answered_by: self.node.id(),
            divergences,
            ..pb::StatusReply::default()
        };
        judge_commit(&mut reply, &voters);
        reply
    }

    async fn node_report(&self, id: NodeId, info: &NodeInfo) -> pb::NodeStatus {
        if id == self.node.id() {
            return self.local_status();
        }
        let unreachable = pb::NodeStatus {
            id,
            address: info.address.clone(),
            peer_address: info.peer_address.clone(),
            site: info.site.clone(),
            reachable: false,
            ..pb::NodeStatus::default()
        };
        let address = self.node.address_of(id).unwrap_or_else(|| info.peer_address.clone());
        ask_status(&self.node, id, &address).await.unwrap_or(unreachable)
    }

    /// Runs a membership change on the leader, or forwards it.
    fn leader_client(
        &self,
    ) -> Result<Option<pb::cluster_client::ClusterClient<tonic::transport::Channel>>, Status> {
        if self.node.is_leader() {
            return Ok(None);
        }
        let leader =
            self.node.leader().ok_or_else(|| Status::unavailable("no leader elected yet; retry shortly"))?;
        let address =
            self.node.address_of(leader).ok_or_else(|| Status::unavailable("leader address unknown"))?;
        Ok(Some(pb::cluster_client::ClusterClient::new(
            self.node.peers.channel(Some(leader), &address).map_err(Status::internal)?,
        )))
    }

    fn check_sites(
        &self,
        voters: &BTreeSet<NodeId>,
        nodes: &BTreeMap<NodeId, NodeInfo>,
        force: bool,
    ) -> Result<(), Status> {
        if force {
            return Ok(());
        }
        let fragile: Vec<String> =
            site_status(voters, nodes).into_iter().filter(|s| !s.survives_loss).map(|s| s.site).collect();
        if fragile.is_empty() {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "refused: with voters {voters:?}, losing site {} would lose the voter majority; \
             spread voters over more sites, or pass force to accept the risk",
            fragile.join(" or site ")
        )))
    }

    /// Waits until the leader has replicated to `id` everything up to `index`.
    async fn wait_caught_up(&self, id: NodeId, address: &str, index: u64) -> Result<(), Status> {
        let caught_up = self
            .node
            .wait_for_raft(CATCH_UP_TIMEOUT, |view| {
                let matched = view.replication.as_ref().and_then(|r| r.get(&id).cloned()).flatten();
                matched.is_some_and(|m| m.index >= index)
            })
            .await;
        match caught_up {
            true => Ok(()),
            _ => Err(Status::deadline_exceeded(format!(
                "node {id} joined as a learner but did not catch up within {CATCH_UP_TIMEOUT:?}; it stays a \
                 learner: check that it runs and is reachable at {address}, then add it again"
            ))),
        }
    }

    /// Waits until node `id` itself reports a log up to `index`: after a replacement the leader's
    /// progress for it starts over only once the node has answered, so the node is asked.
    async fn wait_has_log(&self, id: NodeId, address: &str, index: u64) -> Result<(), Status> {
        let caught_up = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            loop {
                if let Some(status) = ask_status(&self.node, id, address).await
                    && status.last_log_index >= index
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        caught_up.map_err(|_| {
            Status::deadline_exceeded(format!(
                "node {id} was replaced and is a learner, but did not catch up within {CATCH_UP_TIMEOUT:?}; \
                 check that it runs and is reachable at {address}, then promote it with `tally cluster add`"
            ))
        })
    }

    fn membership(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, NodeInfo>) {
        self.node.membership()
    }
}

/// Node `id`'s report of itself, asked at `address` (the route this node uses to it), if it
/// answers within `PEER_STATUS_TIMEOUT`; `None` too when another node answers there (its
/// certificate names another node).
async fn ask_status(node: &NodeHandle, id: NodeId, address: &str) -> Option<pb::NodeStatus> {
    let channel = node.peers.channel(Some(id), address).ok()?;
    let mut client = pb::cluster_client::ClusterClient::new(channel);
    let mut request = Request::new(pb::StatusRequest { local_only: true });
    request.set_timeout(PEER_STATUS_TIMEOUT);
    match tokio::time::timeout(PEER_STATUS_TIMEOUT, client.status(request)).await {
        Ok(Ok(reply)) => reply.into_inner().nodes.into_iter().next(),
        _ => None,
    }
}

/// The incarnation node `id` reports, asked at `address` (the route this node uses to it).
async fn ask_incarnation(node: &NodeHandle, id: NodeId, address: &str) -> Result<u64, Status> {
    match ask_status(node, id, address).await {
        Some(status) if !status.cluster.is_empty() && status.cluster != node.config.cluster => {
            Err(Status::failed_precondition(format!(
                "node {id} at {address} was started as cluster '{}', this is cluster '{}': restart it with \
                 --cluster {} (its data directory emptied), then retry",
                status.cluster, node.config.cluster, node.config.cluster
            )))
        }
        Some(status) if status.id == id && status.incarnation != 0 => Ok(status.incarnation),
        Some(status) if status.id != id => Err(Status::failed_precondition(format!(
            "the node at {address} is node {}, not node {id}",
            status.id
        ))),
        _ => Err(Status::unavailable(format!(
            "node {id} does not answer at {address}; start it first, then retry"
        ))),
    }
}

/// Starts the housekeeping a node does for its life on what the members report of themselves
/// (`Status`): recording incarnations, watching for diverged states, raising the semantics
/// version, handing leadership over while applying a backlog, purging the log behind snapshots.
pub fn spawn_housekeeping(node: &Arc<NodeHandle>) {
    tokio::spawn(record_incarnations(node.clone()));
    tokio::spawn(watch_divergence(node.clone()));
    tokio::spawn(raise_semantics(node.clone()));
    tokio::spawn(hand_over_while_applying(node.clone()));
    tokio::spawn(purge_behind_snapshots(node.clone()));
}

/// How often the leader looks for members whose incarnation is not recorded yet.
const RECORD_INCARNATIONS_INTERVAL: Duration = Duration::from_millis(500);

/// On the leader: records the incarnation of every member that has none yet (the peers named
/// at bootstrap) as soon as it answers, so that from then on a wipe of its disk is noticed.
/// Runs for the life of the node.
async fn record_incarnations(node: Arc<NodeHandle>) {
    loop {
        tokio::time::sleep(RECORD_INCARNATIONS_INTERVAL).await;
        if !node.is_leader() {
            continue;
        }
        let unrecorded: Vec<(NodeId, NodeInfo)> = {
            let metrics = node.raft_view();
            // A new leader's membership entry may not be committed yet (a fresh cluster's first
            // leader, in its first milliseconds): openraft refuses a change then, and logs it as
            // an error. Wait for the next round.
            let membership_at = metrics.membership_config.log_id().map(|id| id.index);
            if membership_at > metrics.local_committed.map(|id| id.index) {
                continue;
            }
            let membership = metrics.membership_config.membership();
            membership.nodes().filter(|(_, n)| n.incarnation == 0).map(|(id, n)| (*id, n.clone())).collect()
        };
        let mut learned = BTreeMap::new();
        for (id, mut info) in unrecorded {
            let Some(address) = node.address_of(id) else { continue };
            if let Ok(incarnation) = ask_incarnation(&node, id, &address).await {
                info.incarnation = incarnation;
                learned.insert(id, info);
            }
        }
        if !learned.is_empty() {
            let ids: Vec<NodeId> = learned.keys().copied().collect();
            match node.change_membership(ChangeMembers::SetNodes(learned), false).await {
                Ok(_) => tracing::info!(node = node.id(), "recorded the incarnations of nodes {ids:?}"),
                Err(error) => tracing::debug!(node = node.id(), "recording incarnations: {error}"),
            }
        }
    }
}

/// For each site: its voters and learners, and whether the others keep a majority without it.
/// Every index after which two reachable members report different digests, with each member's
/// digest there (from their current state and their digest marks).
pub fn divergences(nodes: &[pb::NodeStatus]) -> Vec<pb::Divergence> {
    let mut at: BTreeMap<u64, BTreeMap<NodeId, &str>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.reachable && !n.state_digest.is_empty()) {
        let marks = node.digest_marks.iter().map(|m| (m.index, m.digest.as_str()));
        for (index, digest) in marks.chain([(node.applied_index, node.state_digest.as_str())]) {
            at.entry(index).or_default().insert(node.id, digest);
        }
    }
    at.into_iter()
        .filter(|(_, digests)| digests.values().collect::<BTreeSet<_>>().len() > 1)
        .map(|(index, digests)| pb::Divergence {
            index,
            digests: digests.into_iter().map(|(id, d)| (id, d.to_string())).collect(),
        })
        .collect()
}

/// How often each node compares its digests with the other members' (`watch_divergence`).
const DIVERGENCE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// For the life of the node: asks every member for its digests now and then, and when two
/// differ after the same index, logs it as an error (once per index) and sets
/// `tally_state_diverged`, so that a split in the books is loud on every node, not only in a
/// status someone asks for.
async fn watch_divergence(node: Arc<NodeHandle>) {
    let service = ClusterService::new(node);
    let mut reported: BTreeSet<u64> = BTreeSet::new();
    let mut interval = tokio::time::interval(DIVERGENCE_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let found = service.cluster_status().await.divergences;
        crate::metrics::STATE_DIVERGED.set(i64::from(!found.is_empty()));
        for divergence in found {
            if reported.insert(divergence.index) {
                tracing::error!(
                    "members' states differ after index {}: {}; they apply the same log to different states \
                     (restored from different backups, or built with other semantics): stop writes and find \
                     which state is right",
                    divergence.index,
                    describe_digests(&divergence.digests)
                );
            }
        }
        while reported.len() > 1024 {
            reported.pop_first();
        }
    }
}

/// How often the leader looks whether every member knows a newer semantics version than the
/// ledger applies (only while one is newer than the ledger's: during an upgrade, and at the
/// start of a new cluster).
const SEMANTICS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// For the life of the node: on the leader, once every member (voters and learners) answers
/// and runs a build that knows a newer semantics version than the ledger applies, proposes the
/// entry that switches to the newest they all know. Rolling upgrades end here: until the last
/// node runs the new build, every entry is applied with the old rules on every node.
async fn raise_semantics(node: Arc<NodeHandle>) {
    let service = ClusterService::new(node.clone());
    let mut interval = tokio::time::interval(SEMANTICS_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let current = node.state.published().semantics;
        if !node.is_leader() || current >= node.state.semantics_max() {
            continue;
        }
        let status = service.cluster_status().await;
        if status.nodes.iter().any(|n| !n.reachable) {
            continue;
        }
        let target = status.nodes.iter().map(|n| n.semantics_known).min().unwrap_or(current);
        if target <= current {
            continue;
        }
        match node.propose(crate::types::Request::switch_semantics(target)).await {
            Ok(index) => tracing::info!(
                "every member knows semantics version {target}: switched from {current} at entry {index}"
            ),
            Err(error) => tracing::debug!("switch to semantics version {target} not written: {error}"),
        }
    }
}

/// How often a node looks whether its log behind the last snapshot may be purged.
const PURGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// For the life of the node: purges the log behind the last snapshot down to what it keeps
/// (`--snapshot-log-keep` entries, `--log-keep-bytes`, `--log-keep-time`, whichever keeps the
/// most). A follower that was down, paused or cut off for minutes then needs only the entries it
/// missed, streamed from the log, instead of the whole state (issue 24, item 2). openraft does
/// not purge entries a replication still reads.
async fn purge_behind_snapshots(node: Arc<NodeHandle>) {
    let keep = crate::storage::log_store::LogKeep {
        bytes: node.config.log_keep_bytes,
        age: Duration::from_millis(node.config.log_keep_ms),
    };
    let mut interval = tokio::time::interval(PURGE_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let (snapshot, purged) = {
            let current = node.raft_view();
            (current.snapshot.map(|id| id.index), current.purged.map(|id| id.index))
        };
        let Some(by_entries) = snapshot.and_then(|index| index.checked_sub(node.config.snapshot_log_keep))
        else {
            continue;
        };
        let log = node.log.clone();
        let Ok(Some(by_size)) = crate::rt::off_thread(move || log.purge_bound(keep)).await else {
            continue;
        };
        let upto = by_entries.min(by_size);
        if purged.is_none_or(|purged| upto > purged) {
            let _ = node.purge_log_upto(upto).await;
        }
    }
}

/// How often the leader looks at its apply backlog: as often as a node behind looks at whether to
/// stand (`standing`), since a node elected while behind should hand over as soon as it leads.
const APPLY_BACKLOG_CHECK: Duration = Duration::from_millis(25);
/// After asking to hand over, the leader waits this long before it asks again (the one it asked
/// stands at once; openraft's transfer stops this leader proposing meanwhile).
const HAND_OVER_AGAIN: Duration = Duration::from_millis(300);

/// For the life of the node: a leader behind in applying (its backlog would take longer than
/// `standing::BEHIND_MAX` at its recent rate: it was elected while catching up, as a node behind
/// is when no voter that applied more could win) hands leadership to the voter that has applied
/// the most, if that one has at most half as much left. Raft elects on the log, not on what a
/// node has applied, and writes wait for the leader's apply: the batcher keeps two entries in
/// flight until they are applied, so a leader with a backlog proposes nothing new, and writes
/// stopped for seconds (issue 24's first suspect). (Up to 2026-12-06 the rule counted entries,
/// 128 each way: in a ten-minute run a leader 135 entries behind, applying 7-8 a second, kept
/// writes waiting 19 s while a voter 31 behind could have taken over.)
///
/// Who applied most comes from the answers to this leader's appends (`Pace::most_applied`), so
/// the check costs nothing and runs every `APPLY_BACKLOG_CHECK`. (Until 2026-12-07 it ran every
/// 250 ms and asked each voter's status in turn: at rush hour a node elected 300 entries behind
/// handed over 420 ms after it led, and the write gap after that leader kill was 1.34 s.)
async fn hand_over_while_applying(node: Arc<NodeHandle>) {
    let mut interval = tokio::time::interval(APPLY_BACKLOG_CHECK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        interval.tick().await;
        if !node.is_leader() || asked.is_some_and(|at| at.elapsed() < HAND_OVER_AGAIN) {
            continue;
        }
        let current = node.raft_view();
        let voters: BTreeSet<NodeId> = current.membership_config.membership().voter_ids().collect();
        let applied = current.last_applied.map_or(0, |id| id.index);
        let committed = current.local_committed.map_or(0, |id| id.index);
        let (backlog, time, patience) = crate::node::standing::backlog(&node, applied, committed);
        if patience.is_zero() {
            continue;
        }
        let Some((to, their_applied)) = node.pace.most_applied(&voters, node.id()) else { continue };
        if committed.saturating_sub(their_applied) * 2 > backlog || !node.is_leader() {
            continue;
        }
        // Only once it holds this leader's whole log: openraft's transfer waits for that on the
        // target, within a heartbeat's deadline, and a new leader finds where each follower's log
        // matches its own first (a few round trips). Asked earlier, the transfer timed out and
        // writes waited for the next try (rush hour, 2026-12-07).
        let matched = current.replication.as_ref().and_then(|r| r.get(&to).cloned()).flatten();
        if matched.is_none_or(|m| Some(m.index) < current.last_log_index) {
            continue;
        }
        let expected = crate::node::standing::expected(time);
        tracing::warn!(
            node = node.id(),
            "applied {applied} of {committed} committed entries ({expected} to go at its recent rate): handing \
             leadership to node {to}, which applied {their_applied}, so that writes do not wait for this node's backlog"
        );
        asked = Some(tokio::time::Instant::now());
        let _ = node.transfer_leadership(to).await;
    }
}

/// A member this many entries or fewer behind the leader's log, and with as few still to apply,
/// counts as up to date: a moment of work at load.
const UP_TO_DATE_ENTRIES_MAX: u64 = 128;

/// Sets each member's `redundancy` and `entries_behind`: what it lacks of the newest log a
/// reachable member reports (the leader's replication lag, when the leader answers) or has still
/// to apply, whichever is more.
fn judge_redundancy(mut nodes: Vec<pb::NodeStatus>, leader_answers: bool) -> Vec<pb::NodeStatus> {
    let newest = nodes.iter().filter(|n| n.reachable).map(|n| n.last_log_index).max().unwrap_or(0);
    for node in &mut nodes {
        let lacking =
            if leader_answers { node.replication_lag } else { newest.saturating_sub(node.last_log_index) };
        node.entries_behind = lacking.max(node.last_log_index.saturating_sub(node.applied_index));
        node.redundancy = if !node.reachable {
            pb::Redundancy::Down
        } else if node.receiving_state {
            pb::Redundancy::ReceivingState
        } else if node.entries_behind > UP_TO_DATE_ENTRIES_MAX {
            pb::Redundancy::CatchingUp
        } else {
            pb::Redundancy::UpToDate
        } as i32;
    }
    nodes
}

/// Whether the cluster commits now, and what losing each site would do from here: sets the
/// reply's `can_commit`, `voters_up` and `voters`, and each site's `voters_up` and
/// `survives_loss_now`. A voter counts as up when it answered and is not receiving the whole
/// state (it acknowledges no entry until it has it). The leader's own health decides whether
/// commits go on: it alone knows whether a majority acknowledged it lately.
fn judge_commit(reply: &mut pb::StatusReply, voters: &BTreeSet<NodeId>) {
    let up = |n: &pb::NodeStatus| n.reachable && !n.receiving_state && voters.contains(&n.id);
    let up_by_site = |site: &str| reply.nodes.iter().filter(|n| n.site == site && up(n)).count() as u32;
    let voters_up = reply.nodes.iter().filter(|n| up(n)).count() as u32;
    let quorum = voters.len() as u32 / 2 + 1;
    let leader_serving = reply.nodes.iter().any(|n| n.id == reply.leader_id && n.reachable && n.serving);
    let sites: Vec<(u32, bool)> = reply
        .sites
        .iter()
        .map(|s| {
            let site_up = up_by_site(&s.site);
            (site_up, voters_up - site_up >= quorum)
        })
        .collect();
    for (site, (site_up, survives)) in reply.sites.iter_mut().zip(sites) {
        site.voters_up = site_up;
        site.survives_loss_now = survives;
    }
    reply.voters = voters.len() as u32;
    reply.voters_up = voters_up;
    reply.can_commit = reply.leader_id != 0 && leader_serving;
}

/// "node 1 a1b2c3d4e5f6, node 3 ffee..." (12 hex digits each).
pub fn describe_digests(digests: &std::collections::HashMap<NodeId, String>) -> String {
    let mut sorted: Vec<_> = digests.iter().collect();
    sorted.sort();
    let parts: Vec<String> =
        sorted.iter().map(|(id, digest)| format!("node {id} {}", &digest[..digest.len().min(12)])).collect();
    parts.join(", ")
}

pub fn site_status(voters: &BTreeSet<NodeId>, nodes: &BTreeMap<NodeId, NodeInfo>) -> Vec<pb::SiteStatus> {
    let mut sites: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for (id, info) in nodes {
        let counts = sites.entry(info.site.clone()).or_default();
        if voters.contains(id) {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    let total = voters.len() as u32;
    let quorum = total / 2 + 1;
    sites
        .into_iter()
        .map(|(site, (site_voters, learners))| pb::SiteStatus {
            site,
            voters: site_voters,
            learners,
            survives_loss: total - site_voters >= quorum,
            ..pb::SiteStatus::default()
        })
        .collect()
}

use crate::backup::hex;

fn change_error(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("membership change failed: {error}; retry"))
}

/// A backup's stream: its header, then the exported state in chunks.
type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    type BackupStream = BackupStream;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<BackupStream>, Status> {
        require_operator(&request)?;
        let state = self.node.state.clone();
        let exported = tokio::task::spawn_blocking(move || state.export_backup())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot export this node's state: {e}")))?;
        let header = crate::backup::header_of(&exported, &self.node.config.cluster, self.node.id());
        tracing::info!(
            "streaming a backup of {} bytes at applied index {}",
            header.stream_bytes,
            header.applied_index
        );
        let mut file = tokio::fs::File::from_std(exported.file);
        let stream = async_stream::try_stream! {
            use tokio::io::AsyncReadExt;
            let mut header = Some(header);
            loop {
                let mut data = Vec::with_capacity(crate::backup::CHUNK_BYTES);
                (&mut file)
                    .take(crate::backup::CHUNK_BYTES as u64)
                    .read_to_end(&mut data)
                    .await
                    .map_err(|e| Status::internal(format!("cannot read the exported state: {e}")))?;
                let last = data.len() < crate::backup::CHUNK_BYTES;
                if !data.is_empty() || header.is_some() {
                    yield pb::BackupChunk { header: header.take(), data };
                }
                if last {
                    break;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        if request.get_ref().local_only {
            let metrics = self.node.raft_view();
            let mut reply = Response::new(pb::StatusReply {
                leader_id: metrics.current_leader.unwrap_or(0),
                term: metrics.current_term,
                committed_index: metrics.local_committed.map_or(0, |id| id.index),
                nodes: vec![self.local_status()],
                answered_by: self.node.id(),
                ..pb::StatusReply::default()
            });
            // The leader's client door, as on a forwarded reply: a client whose call hangs on
            // a node asks the others where the leader is (`tally_client`'s leader watch).
            let leader = metrics.current_leader.and_then(|leader| self.node.advertised_address_of(leader));
            if let Some(Ok(value)) = leader.map(|address| address.parse()) {
                reply.metadata_mut().insert(crate::service::ledger::LEADER_HEADER, value);
            }
            return Ok(reply);
        }
        // Operators and nodes get a fresh status (they act on it); anyone else shares one
        // gathered at most a second ago, and concurrent callers wait for the same one.
        if matches!(caller_of(&request), Role::Operator(_) | Role::Node(_) | Role::Insecure) {
            return Ok(Response::new(self.cluster_status().await));
        }
        let mut cache = self.node.status_cache.lock().await;
        if let Some((at, status)) = cache.as_ref()
            && at.elapsed() < SHARED_STATUS_MAX_AGE
        {
            return Ok(Response::new(status.clone()));
        }
        let status = self.cluster_status().await;
        *cache = Some((std::time::Instant::now(), status.clone()));
        Ok(Response::new(status))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let joining = Some(request.get_ref().id).filter(|_| !request.get_ref().force);
        self.require_operator_or_member(&request, joining)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.add_node(request.into_inner()).await;
        }
        let add = request.into_inner();
        if add.id == 0 || add.address.is_empty() || add.peer_address.is_empty() || add.site.is_empty() {
            return Err(Status::invalid_argument("id (not 0), address, peer_address and site are required"));
        }
        let (mut voters, mut nodes) = self.membership();
        let existing = nodes.get(&add.id).cloned();
        if let Some(existing) = &existing
            && (&existing.address, &existing.peer_address, &existing.site)
                != (&add.address, &add.peer_address, &add.site)
        {
            return Err(Status::already_exists(format!(
                "node {} is already a member at {existing}; remove it first to change its addresses or site",
                add.id
            )));
        }
        let placeholder = NodeInfo {
            address: add.address.clone(),
            peer_address: add.peer_address.clone(),
            site: add.site.clone(),
            incarnation: 0,
        };
        nodes.insert(add.id, placeholder.clone());
        if !add.learner_only {
            voters.insert(add.id);
            self.check_sites(&voters, &nodes, add.force)?;
        }
        let incarnation = match add.incarnation {
            0 => {
                let address = self.node.config.routes.get(&add.id).unwrap_or(&add.peer_address).clone();
                ask_incarnation(&self.node, add.id, &address).await?
            }
            given => given,
        };
        if let Some(existing) = &existing
            && existing.incarnation != 0
            && existing.incarnation != incarnation
        {
            return Err(Status::failed_precondition(format!(
                "node {} is a member with another data directory than the one it runs on now: it lost its \
                 disk; bring it back with ReplaceNode (`tally cluster replace --id {}`)",
                add.id, add.id
            )));
        }
        let info = NodeInfo { incarnation, ..placeholder };
        // Joins as a learner, then must catch up with the log up to its own addition before it
        // may vote: a voter that cannot be reached would weaken the quorum from the start.
        let added = self.node.add_learner(add.id, info).await.map_err(change_error)?;
        self.wait_caught_up(add.id, &add.peer_address, added).await?;
        if !add.learner_only {
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([add.id]));
            self.node.change_membership(change, false).await.map_err(change_error)?;
        }
        Ok(Response::new(self.cluster_status().await))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.require_operator_or_member(&request, None)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.remove_node(request.into_inner()).await;
        }
        let remove = request.into_inner();
        let (mut voters, mut nodes) = self.membership();
        if !nodes.contains_key(&remove.id) {
            // Already gone (perhaps by an earlier attempt of this same request): done.
            return Ok(Response::new(self.cluster_status().await));
        }
        let was_voter = voters.remove(&remove.id);
        nodes.remove(&remove.id);
        let change = if was_voter {
            if voters.is_empty() {
                return Err(Status::failed_precondition("refused: cannot remove the last voter"));
            }
            self.check_sites(&voters, &nodes, remove.force)?;
            // Not retained as a learner: the node leaves the cluster altogether.
            ChangeMembers::RemoveVoters(BTreeSet::from([remove.id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([remove.id]))
        };
        self.node.change_membership(change, false).await.map_err(change_error)?;
        Ok(Response::new(self.cluster_status().await))
    }

    async fn replace_node(
        &self,
        request: Request<pb::ReplaceNodeRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.require_operator_or_member(&request, None)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.replace_node(request.into_inner()).await;
        }
        let id = request.get_ref().id;
        let (voters, nodes) = self.membership();
        let Some(recorded) = nodes.get(&id).cloned() else {
            return Err(Status::not_found(format!(
                "node {id} is not a member; add it with AddNode (`tally cluster add`)"
            )));
        };
        if id == self.node.id() {
            return Err(Status::failed_precondition(format!(
                "node {id} is the leader and has its disk; nothing to replace"
            )));
        }
        let address = self.node.address_of(id).unwrap_or_else(|| recorded.peer_address.clone());
        let incarnation = ask_incarnation(&self.node, id, &address).await?;
        let was_voter = voters.contains(&id);
        if incarnation == recorded.incarnation {
            if was_voter {
                return Err(Status::failed_precondition(format!(
                    "node {id} still runs on the data directory the membership records; nothing to replace"
                )));
            }
            // A replacement whose caller gave up waiting (and retries): finish it, under the
            // site rule, since this learner may as well be one on purpose.
            let mut with = voters.clone();
            with.insert(id);
            self.check_sites(&with, &nodes, false)?;
            let index = self.node.raft_view().last_log_index.unwrap_or(0);
            self.wait_has_log(id, &address, index).await?;
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            self.node.change_membership(change, false).await.map_err(change_error)?;
            return Ok(Response::new(self.cluster_status().await));
        }
        // The leader's replication progress still says what the old incarnation had; let it
        // start over from nothing when the node answers that its log is empty.
        self.node.allow_log_restart(id).await.map_err(change_error)?;
        // One joint change: the old incarnation stops being a voter and the node is recorded as
        // its new incarnation, a learner with an empty log. From the moment this entry is in the
        // leader's log its Raft calls name the new incarnation, and the node accepts them; it
        // acknowledges only what it really has on disk.
        let new = NodeInfo { incarnation, ..recorded.clone() };
        let mut changes = Vec::new();
        if was_voter {
            changes.push(ChangeMembers::RemoveVoters(BTreeSet::from([id])));
        }
        changes.push(ChangeMembers::SetNodes(BTreeMap::from([(id, new)])));
        let changed =
            self.node.change_membership(ChangeMembers::Batch(changes), true).await.map_err(change_error)?;
        tracing::info!(node = self.node.id(), "node {id} replaced by incarnation {incarnation}; catching up");
        self.wait_has_log(id, &address, changed).await?;
        if was_voter {
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            self.node.change_membership(change, false).await.map_err(change_error)?;
        }
        Ok(Response::new(self.cluster_status().await))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.require_operator_or_member(&request, None)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.transfer_leader(request.into_inner()).await;
        }
        let to = request.get_ref().to;
        let (voters, _) = self.membership();
        if !voters.contains(&to) {
            return Err(Status::failed_precondition(format!(
                "node {to} is not a voter; only a voter can lead"
            )));
        }
        self.node.transfer_leadership(to).await.map_err(Status::unavailable)?;
        // Wait (bounded) for the new leader to take over, so the reply shows it.
        self.node.wait_for_raft(Duration::from_secs(3), |view| view.current_leader == Some(to)).await;
        Ok(Response::new(self.cluster_status().await))
    }

    async fn take_snapshot(
        &self,
        request: Request<pb::TakeSnapshotRequest>,
    ) -> Result<Response<pb::TakeSnapshotReply>, Status> {
        self.require_operator_or_member(&request, None)?;
        if let Some(mut leader) = self.leader_client()? {
            return leader.take_snapshot(request.into_inner()).await;
        }
        let purge_log = request.get_ref().purge_log;
        let wanted = self.node.raft_view().last_applied.map_or(0, |id| id.index);
        let index = |view: &RaftView| view.snapshot.map_or(0, |id| id.index);
        let purged = |view: &RaftView| view.purged.map_or(0, |id| id.index);
        let late = || {
            Status::unavailable(format!(
                "no snapshot up to index {wanted} within {} s; retry",
                SNAPSHOT_WAIT.as_secs()
            ))
        };
        self.node.snapshot_now().await.map_err(Status::unavailable)?;
        if !self.node.wait_for_raft(SNAPSHOT_WAIT, |view| index(view) >= wanted).await {
            return Err(late());
        }
        if purge_log {
            let snapshot = index(&self.node.raft_view());
            self.node.purge_log_upto(snapshot).await.map_err(Status::unavailable)?;
            if !self.node.wait_for_raft(SNAPSHOT_WAIT, |view| purged(view) >= snapshot).await {
                return Err(late());
            }
        }
        let view = self.node.raft_view();
        Ok(Response::new(pb::TakeSnapshotReply { index: index(&view), purged: purged(&view) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        id: NodeId,
        reachable: bool,
        applied: u64,
        digest: &str,
        marks: &[(u64, &str)],
    ) -> pb::NodeStatus {
        pb::NodeStatus {
            id,
            reachable,
            applied_index: applied,
            state_digest: digest.into(),
            digest_marks: marks
                .iter()
                .map(|(index, d)| pb::DigestMark { index: *index, digest: d.to_string() })
                .collect(),
            ..pb::NodeStatus::default()
        }
    }

    /// One row per cluster: the indexes found divergent, from current digests and marks alike.
    #[test]
    fn divergences_are_found_where_two_members_differ_after_one_index() {
        for (what, nodes, expected) in [
            (
                "all agree",
                vec![report(1, true, 70, "a", &[(64, "m")]), report(2, true, 70, "a", &[(64, "m")])],
                vec![],
            ),
            (
                "apart, no shared index",
                vec![report(1, true, 70, "a", &[]), report(2, true, 71, "b", &[])],
                vec![],
            ),
            ("current digests", vec![report(1, true, 70, "a", &[]), report(2, true, 70, "b", &[])], vec![70]),
            (
                "a mark against a current digest",
                vec![
                    report(1, true, 130, "a", &[(64, "m"), (128, "x")]),
                    report(2, true, 128, "y", &[(64, "m")]),
                ],
                vec![128],
            ),
            (
                "an unreachable member",
                vec![report(1, true, 70, "a", &[]), report(2, false, 70, "", &[])],
                vec![],
            ),
        ] {
            let found: Vec<u64> = divergences(&nodes).iter().map(|d| d.index).collect();
            assert_eq!(found, expected, "{what}");
        }
    }

    fn check(placement: &[(NodeId, &str, bool)], expected_survives: &[(&str, bool)]) {
        let nodes: BTreeMap<NodeId, NodeInfo> = placement
            .iter()
            .map(|(id, site, _)| {
                (
                    *id,
                    NodeInfo {
                        address: format!("n{id}"),
                        site: site.to_string(),
                        incarnation: 1,
                        ..NodeInfo::default()
                    },
                )
            })
            .collect();
        let voters: BTreeSet<NodeId> =
            placement.iter().filter(|(_, _, voter)| *voter).map(|(id, _, _)| *id).collect();
        let got: Vec<(String, bool)> =
            site_status(&voters, &nodes).into_iter().map(|s| (s.site, s.survives_loss)).collect();
        let expected: Vec<(String, bool)> =
            expected_survives.iter().map(|(s, ok)| (s.to_string(), *ok)).collect();
        assert_eq!(got, expected, "{placement:?}");
    }

    #[test]
    fn site_rule() {
        check(&[(1, "a", true), (2, "b", true), (3, "c", true)], &[("a", true), ("b", true), ("c", true)]);
        check(&[(1, "a", true), (2, "a", true), (3, "b", true)], &[("a", false), ("b", true)]);
        check(
            &[(1, "a", true), (2, "a", true), (3, "b", true), (4, "b", true), (5, "c", true)],
            &[("a", true), ("b", true), ("c", true)],
        );
        check(
            &[(1, "a", true), (2, "b", true), (3, "c", true), (4, "d", true)],
            &[("a", true), ("b", true), ("c", true), ("d", true)],
        );
        check(&[(1, "a", true), (2, "b", true), (3, "b", false)], &[("a", false), ("b", false)]);
        check(
            &[(1, "a", true), (2, "b", true), (3, "c", true), (4, "d", false)],
            &[("a", true), ("b", true), ("c", true), ("d", true)],
        );
    }

    /// Up to date, catching up, receiving the state, down: from the leader's replication lag when
    /// the leader answers, else from the newest log a member reports; applying counts too.
    #[test]
    fn redundancy_is_judged_from_what_a_member_lacks_or_has_to_apply() {
        let member =
            |id, reachable, last_log_index, applied_index, replication_lag, receiving_state| pb::NodeStatus {
                id,
                reachable,
                last_log_index,
                applied_index,
                replication_lag,
                receiving_state,
                ..pb::NodeStatus::default()
            };
        let judged = |nodes, leader_answers| -> Vec<(pb::Redundancy, u64)> {
            judge_redundancy(nodes, leader_answers)
                .iter()
                .map(|n| (n.redundancy(), n.entries_behind))
                .collect()
        };
        let nodes = vec![
            member(1, true, 5000, 4990, 0, false),
            member(2, true, 4900, 4900, 100, false),
            member(3, true, 3000, 3000, 2000, false),
            member(4, true, 5000, 1000, 0, false),
            member(5, true, 0, 0, 5000, true),
            member(6, false, 0, 0, 4000, false),
        ];
        use pb::Redundancy::*;
        assert_eq!(
            judged(nodes.clone(), true),
            [
                (UpToDate, 10),
                (UpToDate, 100),
                (CatchingUp, 2000),
                (CatchingUp, 4000),
                (ReceivingState, 5000),
                (Down, 4000)
            ]
        );
        // Answered by a follower: measured against the newest log reported.
        assert_eq!(
            judged(nodes, false),
            [
                (UpToDate, 10),
                (UpToDate, 100),
                (CatchingUp, 2000),
                (CatchingUp, 4000),
                (ReceivingState, 5000),
                (Down, 5000)
            ]
        );
    }
}
