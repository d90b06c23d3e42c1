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
//!
//! Every Raft RPC also carries the cluster id (`net::raft::CLUSTER_HEADER`): 128 random bits
//! made when the cluster is bootstrapped, kept in each data directory's `identity.toml`, never
//! a guessable name. A node refuses any other id without saying what it expected. A new node
//! (named in the bootstrap, joining, or replaced) has none until the first vote request,
//! AppendEntries or snapshot reaches it; it adopts that one, durably, and refuses every other
//! from then on.

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
    /// From a node outside this node's membership (removed, or never added).
    NotMember { id: NodeId },
    /// No cluster id, a malformed one, or another cluster's.
    OtherCluster,
    /// A caller of the cluster named `theirs`: this node was started with another `--cluster`.
    OtherName { theirs: String },
    /// This node has no cluster id yet and could not save the one offered.
    CannotAdopt(String),
}

/// The length of a cluster id: 128 bits in lowercase hex.
const CLUSTER_ID_CHARS: usize = 32;

/// A fresh cluster id, for a bootstrap.
pub fn new_cluster_id() -> String {
    format!("{:032x}", (u128::from(crate::sys::random_u64()) << 64) | u128::from(crate::sys::random_u64()))
}

pub fn is_cluster_id(text: &str) -> bool {
    text.len() == CLUSTER_ID_CHARS && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// This node's identity and the incarnations its membership records, shared by the Raft
/// client (to name the target) and the Raft service (to check callers). A std `RwLock`: held
/// only to copy a number, never across an await.
pub struct Identities {
    pub me: Endpoint,
    recorded: RwLock<BTreeMap<NodeId, u64>>,
    /// `None` until bootstrapped or adopted.
    cluster_id: RwLock<Option<String>>,
    /// The cluster's name (`--cluster`); empty: not checked.
    name: String,
}

impl Identities {
    pub fn new(me: Endpoint, cluster_id: Option<String>) -> Identities {
        Identities {
            me,
            recorded: RwLock::new(BTreeMap::new()),
            cluster_id: RwLock::new(cluster_id),
            name: String::new(),
        }
    }

    /// These identities, for a node of the cluster named `name`.
    pub fn named(self, name: &str) -> Identities {
        Identities { name: name.to_string(), ..self }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the cluster name a caller sent: a node started with another `--cluster` (the
    /// default, when someone forgot the flag) must not join by adopting the id. A caller from a
    /// build that sends no name is judged by the cluster id alone.
    pub fn check_name(&self, theirs: Option<&str>) -> Result<(), Refusal> {
        match theirs {
            Some(theirs) if !self.name.is_empty() && theirs != self.name => {
                Err(Refusal::OtherName { theirs: theirs.chars().take(64).collect() })
            }
            _ => Ok(()),
        }
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.read().expect("identities lock").clone()
    }

    /// Checks the cluster id a caller sent. Without one of its own, this node adopts `theirs`
    /// if `adopt` allows (a vote request, an AppendEntries or a snapshot) and `save` stores it.
    pub fn check_cluster(
        &self,
        theirs: Option<&str>,
        adopt: bool,
        save: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<(), Refusal> {
        let theirs = theirs.filter(|id| is_cluster_id(id)).ok_or(Refusal::OtherCluster)?;
        if let Some(mine) = self.cluster_id.read().expect("identities lock").as_deref() {
            return if mine == theirs { Ok(()) } else { Err(Refusal::OtherCluster) };
        }
        if !adopt {
            return Err(Refusal::OtherCluster);
        }
        let mut mine = self.cluster_id.write().expect("identities lock");
        match mine.as_deref() {
            Some(adopted) if adopted == theirs => Ok(()),
            Some(_) => Err(Refusal::OtherCluster),
            None => {
                save(theirs).map_err(Refusal::CannotAdopt)?;
                *mine = Some(theirs.to_string());
                Ok(())
            }
        }
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

    /// Whether `id` is a voter or learner of the membership in effect here; any node is, to a
    /// node that knows no membership yet (new, or empty after losing its disk), as for Raft calls
    /// (`check`): such a node cannot tell, and forwards or refuses as it would for a member. (A
    /// wiped node, taken for the leader a moment longer by the others, refused an operator's
    /// forwarded `replace` as a stranger's, which ended the replacement.)
    pub fn is_member(&self, id: NodeId) -> bool {
        let members = self.recorded.read().expect("identities lock");
        members.is_empty() || members.contains_key(&id)
    }

    /// Checks the headers of an incoming Raft RPC; `vote` for a vote or pre-vote request, whose
    /// sender is held to the incarnation the membership records. Once this node has a
    /// membership, a sender outside it is refused: a removed node's certificate (or any node
    /// certificate of the CA) moved every member's term before. A node not yet given a
    /// membership (new, bootstrapping) takes calls from anyone of the cluster: that is how it
    /// receives its first entries.
    pub fn check(&self, from: Option<&str>, to: Option<&str>, vote: bool) -> Result<(), Refusal> {
        let from = from.and_then(Endpoint::parse).ok_or(Refusal::Malformed)?;
        let to = to.and_then(Endpoint::parse).ok_or(Refusal::Malformed)?;
        if to.id != self.me.id {
            return Err(Refusal::WrongTarget);
        }
        if to.incarnation != 0 && to.incarnation != self.me.incarnation {
            return Err(Refusal::StaleTarget { recorded: to.incarnation });
        }
        {
            let members = self.recorded.read().expect("identities lock");
            if !members.is_empty() && !members.contains_key(&from.id) {
                return Err(Refusal::NotMember { id: from.id });
            }
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
        NodeInfo { address: "a".into(), peer_address: "p".into(), site: "s".into(), incarnation }
    }

    /// Node 1, incarnation 11, whose membership records node 2 as 22 and node 3 as unrecorded.
    fn identities() -> Identities {
        let identities = Identities::new(Endpoint { id: 1, incarnation: 11 }, None);
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
        // A sender the membership has not recorded; one it does not know (removed, or never
        // added) is refused, unless this node knows no membership yet.
        check(Some("3.99"), Some("1.11"), Ok(()));
        check(Some("7.70"), Some("1.11"), Err(Refusal::NotMember { id: 7 }));
        let fresh = Identities::new(Endpoint { id: 1, incarnation: 11 }, None);
        assert_eq!(fresh.check(Some("7.70"), Some("1.11"), true), Ok(()), "no membership yet");
        assert!(fresh.is_member(7) && identities().is_member(3) && !identities().is_member(7));
        check(Some("2.23"), Some("1.11"), Err(Refusal::StaleSender { id: 2, recorded: 22, claimed: 23 }));
        check(Some("2.22"), Some("1.12"), Err(Refusal::StaleTarget { recorded: 12 }));
        check(Some("2.22"), Some("4.11"), Err(Refusal::WrongTarget));
        check(None, Some("1.11"), Err(Refusal::Malformed));
        check(Some("2.22"), None, Err(Refusal::Malformed));
        check(Some("2"), Some("1.11"), Err(Refusal::Malformed));
        check(Some("2.22"), Some("1.x"), Err(Refusal::Malformed));
        check(Some("2.22"), Some("1.18446744073709551616"), Err(Refusal::Malformed));
    }

    /// One row per cluster id a caller may send, to a node with an id and to one without.
    #[test]
    fn a_cluster_id_is_adopted_once_from_a_leader_and_held_to_from_then_on() {
        let ours = new_cluster_id();
        let other = new_cluster_id();
        assert!(is_cluster_id(&ours) && ours != other);
        let with_id = Identities::new(Endpoint { id: 1, incarnation: 11 }, Some(ours.clone()));
        let never = |_: &str| -> Result<(), String> { panic!("a node with an id saves nothing") };
        for (theirs, adopt, expected) in [
            (Some(ours.as_str()), false, Ok(())),
            (Some(other.as_str()), true, Err(Refusal::OtherCluster)),
            (Some("tally"), true, Err(Refusal::OtherCluster)),
            (Some(&ours[..31]), true, Err(Refusal::OtherCluster)),
            (None, true, Err(Refusal::OtherCluster)),
        ] {
            assert_eq!(with_id.check_cluster(theirs, adopt, never), expected, "{theirs:?}");
        }

        let fresh = Identities::new(Endpoint { id: 2, incarnation: 22 }, None);
        assert_eq!(
            fresh.check_cluster(Some(&ours), false, never),
            Err(Refusal::OtherCluster),
            "a vote or clock call"
        );
        assert_eq!(
            fresh.check_cluster(Some(&ours), true, |_| Err("disk full".into())),
            Err(Refusal::CannotAdopt("disk full".into()))
        );
        assert_eq!(fresh.cluster_id(), None, "not adopted if it could not be saved");
        let mut saved = None;
        assert_eq!(
            fresh.check_cluster(Some(&ours), true, |id| {
                saved = Some(id.to_string());
                Ok(())
            }),
            Ok(())
        );
        assert_eq!(
            (saved.as_deref(), fresh.cluster_id().as_deref()),
            (Some(ours.as_str()), Some(ours.as_str()))
        );
        assert_eq!(fresh.check_cluster(Some(&other), true, never), Err(Refusal::OtherCluster));
    }

    /// A node started without `--cluster dev` is named "tally": it refuses dev's callers
    /// instead of adopting dev's id (it joined, and its backups said "cluster tally").
    #[test]
    fn a_caller_of_another_cluster_name_is_refused() {
        let tally = Identities::new(Endpoint { id: 4, incarnation: 44 }, None).named("tally");
        assert_eq!(tally.check_name(Some("dev")), Err(Refusal::OtherName { theirs: "dev".into() }));
        assert_eq!(tally.check_name(Some("tally")), Ok(()));
        assert_eq!(tally.check_name(None), Ok(()), "a build that sends no name");
    }
}
