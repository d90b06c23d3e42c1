//! `tally.v1.Cluster`: status and membership for operators.
//!
//! Membership changes run on the leader (followers forward them) and obey the site rule
//! (DESIGN.md §9): a change after which losing any one site would remove a majority of voters is
//! refused with FAILED_PRECONDITION, unless forced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::ChangeMembers;
use openraft::type_config::async_runtime::WatchReceiver;
use tally_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::node::NodeHandle;
use crate::types::{NodeId, NodeInfo};

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

    fn local_status(&self) -> pb::NodeStatus {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == self.node.id());
        let digest = self.node.state.read(|ledger| ledger.meta().digest);
        pb::NodeStatus {
            id: self.node.id(),
            address: self.node.config.advertise(),
            site: self.node.config.site.clone(),
            role: if voter { pb::NodeRole::Voter } else { pb::NodeRole::Learner } as i32,
            is_leader: metrics.current_leader == Some(self.node.id()),
            reachable: true,
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            applied_index: metrics.last_applied.map_or(0, |id| id.index),
            replication_lag: 0,
            state_digest: hex(&digest),
        }
    }

    /// The whole cluster as this node sees it, with every member's own report.
    async fn cluster_status(&self) -> pb::StatusReply {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
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
                report
            })
            .collect::<Vec<_>>();
        let sites = site_status(&voters, &membership.nodes().map(|(id, n)| (*id, n.clone())).collect());
        pb::StatusReply {
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            committed_index: metrics.local_committed.map_or(0, |id| id.index),
            nodes,
            sites,
            answered_by: self.node.id(),
        }
    }

    async fn node_report(&self, id: NodeId, info: &NodeInfo) -> pb::NodeStatus {
        if id == self.node.id() {
            return self.local_status();
        }
        let unreachable = pb::NodeStatus {
            id,
            address: info.address.clone(),
            site: info.site.clone(),
            reachable: false,
            ..pb::NodeStatus::default()
        };
        let Ok(channel) = self.node.peers.channel(&info.address) else { return unreachable };
        let mut client = pb::cluster_client::ClusterClient::new(channel);
        let mut request = Request::new(pb::StatusRequest { local_only: true });
        request.set_timeout(PEER_STATUS_TIMEOUT);
        match tokio::time::timeout(PEER_STATUS_TIMEOUT, client.status(request)).await {
            Ok(Ok(reply)) => reply.into_inner().nodes.into_iter().next().unwrap_or(unreachable),
            _ => unreachable,
        }
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
            self.node.peers.channel(&address).map_err(Status::internal)?,
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
        let mut metrics = self.node.raft.metrics();
        let caught_up = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
            loop {
                let matched = {
                    let current = metrics.borrow_watched();
                    current.replication.as_ref().and_then(|r| r.get(&id).cloned()).flatten().map(|m| m.index)
                };
                if matched.is_some_and(|m| m >= index) {
                    return true;
                }
                if metrics.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match caught_up {
            Ok(true) => Ok(()),
            _ => Err(Status::deadline_exceeded(format!(
                "node {id} joined as a learner but did not catch up within {CATCH_UP_TIMEOUT:?}; it stays a \
                 learner: check that it runs and is reachable at {address}, then add it again"
            ))),
        }
    }

    fn membership(&self) -> (BTreeSet<NodeId>, BTreeMap<NodeId, NodeInfo>) {
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        (membership.voter_ids().collect(), membership.nodes().map(|(id, n)| (*id, n.clone())).collect())
    }
}

/// For each site: its voters and learners, and whether the others keep a majority without it.
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
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn change_error(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("membership change failed: {error}; retry"))
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        if request.get_ref().local_only {
            let metrics = self.node.raft.metrics().borrow_watched().clone();
            return Ok(Response::new(pb::StatusReply {
                leader_id: metrics.current_leader.unwrap_or(0),
                term: metrics.current_term,
                committed_index: metrics.local_committed.map_or(0, |id| id.index),
                nodes: vec![self.local_status()],
                sites: Vec::new(),
                answered_by: self.node.id(),
            }));
        }
        Ok(Response::new(self.cluster_status().await))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        if let Some(mut leader) = self.leader_client()? {
            return leader.add_node(request.into_inner()).await;
        }
        let add = request.into_inner();
        if add.id == 0 || add.address.is_empty() || add.site.is_empty() {
            return Err(Status::invalid_argument("id (not 0), address and site are required"));
        }
        let info = NodeInfo { address: add.address.clone(), site: add.site.clone() };
        let (mut voters, mut nodes) = self.membership();
        if let Some(existing) = nodes.get(&add.id)
            && existing != &info
        {
            return Err(Status::already_exists(format!(
                "node {} is already a member at {existing}; remove it first to change its address or site",
                add.id
            )));
        }
        nodes.insert(add.id, info.clone());
        if !add.learner_only {
            voters.insert(add.id);
            self.check_sites(&voters, &nodes, add.force)?;
        }
        // Joins as a learner, then must catch up with the log up to its own addition before it
        // may vote: a voter that cannot be reached would weaken the quorum from the start.
        let added = self.node.raft.add_learner(add.id, info, false).await.map_err(change_error)?;
        self.wait_caught_up(add.id, &add.address, added.log_id.index).await?;
        if !add.learner_only {
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([add.id]));
            self.node.raft.change_membership(change, false).await.map_err(change_error)?;
        }
        Ok(Response::new(self.cluster_status().await))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
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
        self.node.raft.change_membership(change, false).await.map_err(change_error)?;
        Ok(Response::new(self.cluster_status().await))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
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
        self.node.raft.trigger().transfer_leader(to).await.map_err(|e| Status::unavailable(e.to_string()))?;
        // Wait (bounded) for the new leader to take over, so the reply shows it.
        let mut metrics = self.node.raft.metrics();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while metrics.borrow_watched().current_leader != Some(to) {
                if metrics.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        Ok(Response::new(self.cluster_status().await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(placement: &[(NodeId, &str, bool)], expected_survives: &[(&str, bool)]) {
        let nodes: BTreeMap<NodeId, NodeInfo> = placement
            .iter()
            .map(|(id, site, _)| (*id, NodeInfo { address: format!("n{id}"), site: site.to_string() }))
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
}
