//! Sampling the other voters' clocks (`clock`): the node's side of cluster time.

use std::sync::Arc;
use std::time::Duration;

use tally_proto::v1 as pb;
// tokio's clock: a simulation advances it (issue 26).
use tokio::time::Instant;

use super::NodeHandle;
use crate::clock::{ClockError, SAMPLE_INTERVAL, STEP_DOWN_INTERVAL, voters};
use crate::types::NodeId;

/// Samples every other voter's clock every `SAMPLE_INTERVAL`; on the leader, hands leadership
/// over when this node's clock is off the majority's. Runs for the life of the node.
pub async fn sample_peers(node: Arc<NodeHandle>) {
    let mut stepped_down: Option<Instant> = None;
    loop {
        tokio::time::sleep(SAMPLE_INTERVAL).await;
        let voters = voters(&node.raft);
        let asks = voters.iter().filter(|id| **id != node.id()).map(|id| sample_one(&node, *id));
        futures::future::join_all(asks).await;
        if !node.is_leader() || stepped_down.is_some_and(|at| at.elapsed() < STEP_DOWN_INTERVAL) {
            continue;
        }
        if let Err(ClockError::Off { offset_ms }) = node.clock.stamp(&voters, node.id())
            && let Some(to) = node.clock.agreeing_peer(&voters, node.id())
        {
            tracing::error!(
                node = node.id(),
                "this node's clock is {offset_ms} ms off the cluster's time (tolerance {} ms): not stamping \
                 entries, handing leadership to node {to}; fix this machine's clock",
                node.clock.tolerance_ns / 1_000_000
            );
            let _ = node.raft.trigger().transfer_leader(to).await;
            stepped_down = Some(Instant::now());
        }
    }
}

async fn sample_one(node: &NodeHandle, peer: NodeId) {
    let Some(address) = node.address_of(peer) else { return };
    let Ok(channel) = node.peers.channel(Some(peer), &address) else { return };
    let mut client = pb::raft_client::RaftClient::new(channel);
    let mut request = tonic::Request::new(pb::ClockRequest {});
    let timeout = Duration::from_nanos((node.clock.tolerance_ns / 2) as u64);
    request.set_timeout(timeout);
    crate::net::raft::name_ends(&mut request, &node.identities, peer, 0);
    let sent_ns = node.clock.now_ns();
    if let Ok(Ok(reply)) = tokio::time::timeout(timeout, client.clock(request)).await {
        node.clock.record(peer, sent_ns, reply.get_ref().time_ns, node.clock.now_ns());
        // A build from before the field does not say: its followers trust its heartbeats alone.
        if node.leader() == Some(peer) && reply.get_ref().leads_a_quorum != Some(false) {
            node.leader_quorum.record();
        }
    }
}
