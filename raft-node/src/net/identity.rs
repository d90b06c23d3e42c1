//! Who is at each end of a Raft RPC: node id and data-directory incarnation.
//!
//! Raft is safe only if a node remembers what it promised: its vote and the entries it
//! acknowledged. A node whose disk was wiped and that restarts under its old id has forgotten
//! both, and with one lagging peer its empty log could elect a leader that lacks acknowledged
//! entries (Raft amnesia). So every data directory has an incarnation, a random number made when
//! it is first used (`node::claim_data_dir`) and recorded in the membership (`NodeInfo`), and
//! every Raft RPC names the sender's and the target's `id.incarnation` (`FROM_HEADER`,
//! `TO_HEADER`). A node refuses a call meant for another incarnation of itself, and a vote
//! request from a candidate whose incarnation its membership records differently. A node that
//! lost its disk is therefore cut off from Raft until an operator replaces it
//! (`Cluster.ReplaceNode`), which makes it a new member with an empty log, as it really is.
//!
//! Only vote requests are held to the sender's incarnation: a node catching up replays old
//! membership entries, so its view of others can be behind, and it must still accept the
//! entries of a leader that was itself replaced since. Raft's own checks decide those (the
//! leader's term); the target check is what keeps a node from acting on promises it forgot.
//!
//! Incarnation 0 means "not recorded yet": the peers named at bootstrap are recorded by the
//! leader as soon as they answer (`service::cluster::record_incarnations`).

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::types::{NodeId, NodeInfo};

/// `<node id>.<incarnation>` of the sender.
pub const FROM_HEADER: &str = "x-tally-from";
/// `<node id>.<incarnation>` of the target, as the sender's membership records it.
pub const TO_HEADER: &str = "x-tally-to";

/// One end of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub id: NodeId,
    /// 0: not recorded yet.
    pub incarnation: u64,
}

impl Endpoint {
    pub fn header(self) -> String {
        format!("{}.{}", self.id, self.incarnation)
    }

    pub fn parse(text: &str) -> Option<Endpoint> {
        let (id, incarnation) = text.split_once('.')?;
        Some(Endpoint { id: id.parse().ok()?, incarnation: incarnation.parse().ok()? })
    }
}

/// Why a call was refused. The caller is told only that it was refused, never what was
/// expected (a prober learns nothing); the node's own log says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Headers missing or not `id.incarnation`.
    Malformed,
    /// Meant for another node id (a misrouted address).
    WrongTarget,
    /// Meant for another incarnation of this node: this node lost its disk.
    StaleTarget { recorded: u64 },
    /// From a node whose incarnation differs from what this node's membership records.
    StaleSender { id: NodeId, recorded: u64, claimed: u64 },
}

/// This node's identity and the incarnations its membership records, shared by the Raft
/// client (to name the target) and the Raft service (to check callers). A std `RwLock`: held
/// only to copy a number, never across an await.
pub struct Identities {
    pub me: Endpoint,
    recorded: RwLock<BTreeMap<NodeId, u64>>,
}

impl Identities {
    pub fn new(me: Endpoint) -> Identities {
        Identities { me, recorded: RwLock::new(BTreeMap::new()) }
    }

    /// Takes the incarnations of the membership now in effect.
    pub fn update<'a>(&self, nodes: impl Iterator<Item = (&'a NodeId, &'a NodeInfo)>) {
        let recorded = nodes.map(|(id, info)| (*id, info.incarnation)).collect();
        *self.recorded.write().expect("identities lock") = recorded;
    }

    /// The incarnation the membership records for `id`; 0 when unknown or not recorded.
    pub fn recorded(&self, id: NodeId) -> u64 {
        self.recorded.read().expect("identities lock").get(&id).copied().unwrap_or(0)
    }

    /// Checks the headers of an incoming Raft RPC; `vote` for a vote or pre-vote request, whose
    /// sender is held to the incarnation the membership records.
    pub fn check(&self, from: Option<&str>, to: Option<&str>, vote: bool) -> Result<(), Refusal> {
        let from = from.and_then(Endpoint::parse).ok_or(Refusal::Malformed)?;
        let to = to.and_then(Endpoint::parse).ok_or(Refusal::Malformed)?;
        if to.id != self.me.id {
            return Err(Refusal::WrongTarget);
        }
        if to.incarnation != 0 && to.incarnation != self.me.incarnation {
            return Err(Refusal::StaleTarget { recorded: to.incarnation });
        }
        let recorded = self.recorded(from.id);
        if vote && recorded != 0 && recorded != from.incarnation {
            return Err(Refusal::StaleSender { id: from.id, recorded, claimed: from.incarnation });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(incarnation: u64) -> NodeInfo {
        NodeInfo { address: "a".into(), site: "s".into(), incarnation }
    }

    /// Node 1, incarnation 11, whose membership records node 2 as 22 and node 3 as unrecorded.
    fn identities() -> Identities {
        let identities = Identities::new(Endpoint { id: 1, incarnation: 11 });
        let nodes = BTreeMap::from([(1, node(11)), (2, node(22)), (3, node(0))]);
        identities.update(nodes.iter());
        identities
    }

    fn check(from: Option<&str>, to: Option<&str>, expected: Result<(), Refusal>) {
        assert_eq!(identities().check(from, to, true), expected, "from {from:?} to {to:?}");
    }

    #[test]
    fn entries_are_taken_from_a_sender_this_node_knows_only_by_an_older_incarnation() {
        assert_eq!(identities().check(Some("2.23"), Some("1.11"), false), Ok(()));
        assert_eq!(
            identities().check(Some("2.23"), Some("1.12"), false),
            Err(Refusal::StaleTarget { recorded: 12 })
        );
    }

    #[test]
    fn calls_are_checked_at_both_ends() {
        check(Some("2.22"), Some("1.11"), Ok(()));
        // The sender does not know this node's incarnation yet (bootstrap peers).
        check(Some("2.22"), Some("1.0"), Ok(()));
        // A sender the membership has not recorded, or does not know.
        check(Some("3.99"), Some("1.11"), Ok(()));
        check(Some("7.70"), Some("1.11"), Ok(()));
        check(Some("2.23"), Some("1.11"), Err(Refusal::StaleSender { id: 2, recorded: 22, claimed: 23 }));
        check(Some("2.22"), Some("1.12"), Err(Refusal::StaleTarget { recorded: 12 }));
        check(Some("2.22"), Some("4.11"), Err(Refusal::WrongTarget));
        check(None, Some("1.11"), Err(Refusal::Malformed));
        check(Some("2.22"), None, Err(Refusal::Malformed));
        check(Some("2"), Some("1.11"), Err(Refusal::Malformed));
        check(Some("2.22"), Some("1.x"), Err(Refusal::Malformed));
        check(Some("2.22"), Some("1.18446744073709551616"), Err(Refusal::Malformed));
    }
}
