//! The guarantees checked after every step of a simulation, from what the nodes themselves hold.
//! (What the client was told is checked by `workload` against the ledger it reads back.)

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::ServerState;
use openraft::type_config::async_runtime::WatchReceiver;

use raft_node::types::LogId;

use crate::World;

/// Digests kept per applied index, newest first: enough for members far apart to share some.
const DIGESTS_KEPT: usize = 100_000;

/// The checks after every step. "At most one leader per term" is not among them: openraft's
/// leader ids are (term, node), so two candidates of one term can both be elected, the higher
/// node id superseding the lower (openraft's `leader_id_adv`). What Raft's safety comes down to
/// is checked instead: a committed index names the same entry (log id) on every node, for ever,
/// and the same applied index means the same state.
#[derive(Default)]
pub struct Invariants {
    /// The log id each committed index was first seen with, and by which node.
    committed: BTreeMap<u64, (LogId, u64)>,
    /// The state digest each applied index was seen with, and by which node first.
    digests: BTreeMap<u64, ([u8; 32], u64)>,
    /// Each node's role as last recorded in the trace, to record changes only.
    roles: BTreeMap<u64, (ServerState, u64)>,
    /// Each node's last snapshot and purge, as last recorded in the trace.
    snapshots: BTreeMap<u64, (Option<u64>, Option<u64>)>,
    /// Whether each node withholds its vote, as last recorded in the trace.
    withheld: BTreeMap<u64, Option<u64>>,
    /// Snapshots taken or installed, and purges, over all nodes.
    pub snapshot_changes: u64,
}

impl Invariants {
    /// Committed entries never change; the same digest at the same applied index on every node.
    pub fn check_step(&mut self, world: &World, at: Duration) -> Result<(), String> {
        for id in world.ids() {
            let Some(node) = world.node(id) else { continue };
            let (state, term, committed, snapshot) = {
                let metrics = node.raft.metrics();
                let metrics = metrics.borrow_watched();
                let snapshot = (metrics.snapshot.map(|id| id.index), metrics.purged.map(|id| id.index));
                // A node that joined is a voter once its own membership says so: another node's
                // may still be one from before it was removed.
                let mut membership = world.membership.lock().unwrap();
                if membership.joining.contains(&id)
                    && metrics.membership_config.membership().voter_ids().any(|voter| voter == id)
                {
                    membership.joining.remove(&id);
                    world.record(at, format_args!("n{id} is a voter"));
                }
                (metrics.state, metrics.current_term, metrics.local_committed, snapshot)
            };
            if self.snapshots.get(&id).is_some_and(|seen| *seen != snapshot) {
                self.snapshot_changes += 1;
                world.record(
                    at,
                    format_args!("n{id} snapshot at {:?}, log purged to {:?}", snapshot.0, snapshot.1),
                );
            }
            self.snapshots.insert(id, snapshot);
            let withheld = node.votes.withheld();
            if state == ServerState::Leader && withheld.is_some() {
                return Err(format!(
                    "node {id} leads term {term} while it withholds its vote (its log lost a damaged tail \
                     and has not reached entry {} again)",
                    withheld.unwrap_or_default()
                ));
            }
            if self.withheld.get(&id) != Some(&withheld) {
                self.withheld.insert(id, withheld);
                if let Some(until) = withheld {
                    world.record(at, format_args!("n{id} withholds its vote until its log reaches {until}"));
                }
            }
            if self.roles.get(&id) != Some(&(state, term)) {
                self.roles.insert(id, (state, term));
                if state == ServerState::Leader {
                    world.record(at, format_args!("n{id} leads term {term}"));
                }
            }
            if let Some(committed) = committed {
                let (first, by) = *self.committed.entry(committed.index).or_insert((committed, id));
                if first != committed {
                    return Err(format!(
                        "committed entry {} is {first} on node {by} but {committed} on node {id}",
                        committed.index
                    ));
                }
            }
            let published = node.state.published();
            let seen =
                std::iter::once((published.index, published.digest)).chain(published.marks.iter().copied());
            for (index, digest) in seen {
                if index == 0 {
                    continue;
                }
                let (first, by) = *self.digests.entry(index).or_insert((digest, id));
                if first != digest {
                    return Err(format!(
                        "nodes {by} and {id} applied entry {index} into different states: {} and {}",
                        hex(&first),
                        hex(&digest)
                    ));
                }
            }
        }
        while self.digests.len() > DIGESTS_KEPT {
            self.digests.pop_first();
        }
        while self.committed.len() > DIGESTS_KEPT {
            self.committed.pop_first();
        }
        Ok(())
    }

    pub fn acknowledged(&self, world: &World) -> u64 {
        world.acknowledged.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether every node is up at the same applied index with the same digest, that index being
/// the leader's committed one; the digest if so, else what differs.
pub fn converged(world: &World) -> Result<String, String> {
    let mut states = BTreeMap::new();
    let mut committed = None;
    let voters = world.membership.lock().unwrap().voters.clone();
    for id in voters {
        let node = world.node(id).ok_or(format!("node {id} is down"))?;
        let published = node.state.published();
        let metrics = node.raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.state == ServerState::Leader {
            committed = metrics.local_committed.map(|id| id.index);
        }
        states.insert(id, (published.index, published.digest));
    }
    let committed = committed.ok_or("no leader")?;
    let first = *states.values().next().expect("a cluster has nodes");
    if first.0 == committed && states.values().all(|state| *state == first) {
        return Ok(format!("index {} digest {}", first.0, hex(&first.1)));
    }
    let described: Vec<String> =
        states.iter().map(|(id, (index, digest))| format!("n{id} at {index} ({})", hex(digest))).collect();
    Err(format!("committed {committed}; {}", described.join(", ")))
}

pub fn hex(digest: &[u8; 32]) -> String {
    digest[..6].iter().map(|byte| format!("{byte:02x}")).collect()
}
