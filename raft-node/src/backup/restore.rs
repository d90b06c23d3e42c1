//! Seeding the data directory of one node of a new cluster from a backup.
//!
//! A restored node starts as if it had installed a snapshot of the backup's state at log id
//! `(term 0, lowest voter, backup's applied index)` whose membership is the new cluster's voters:
//! the snapshot is its current one (`state_machine::seed`), its log is empty and purged up to that
//! id (`LogStore::seed`), it has voted for no one, and its identity is new. Every node of the new
//! cluster is seeded with the same id and membership (incarnations unrecorded, as at a bootstrap;
//! the leader records them), so their logs agree where they start; the first election then runs
//! at term 1 as after a bootstrap, and the first leader's blank entry follows the backup's index.
//!
//! The new cluster's id is made from what the restore starts from: the backup (its cluster,
//! source node, applied index and term, state digest and time taken), the new cluster's name and
//! its voters (`restored_cluster_id`). Every restored directory gets it at once, so nodes restored
//! alike are one cluster whatever order they start in, and nodes restored from another backup or
//! with another voter list are another cluster to them: every Raft call between the two is
//! refused (`net::identity`), where before the lowest voter made a random id that every node
//! adopted, and nodes restored from backups at different indexes took each other's logs as their
//! own and diverged silently. Nothing of the old cluster's identity carries over, so a restored
//! node never talks Raft with the old cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::vote::RaftLeaderIdExt;
use openraft::{Membership, RaftTypeConfig};

use super::Header;
use crate::node::PeerConfig;
use crate::storage::log_store::LogStore;
use crate::types::{LogId, NodeId, NodeInfo, SnapshotMeta, StoredMembership, TypeConfig};

/// Which node of which new cluster a restore seeds.
pub struct Target<'a> {
    pub data_dir: &'a Path,
    pub cluster: &'a str,
    pub id: NodeId,
    /// Every voter of the new cluster, this node included, as `--peer` names them.
    pub voters: &'a [PeerConfig],
}

/// What a restore made.
#[derive(Debug)]
pub struct Restored {
    pub header: Header,
    /// The new data directory's incarnation.
    pub incarnation: u64,
    /// The new cluster's id: the same in every directory restored from this backup for these
    /// voters.
    pub cluster_id: String,
}

/// Seeds `target.data_dir` (absent or empty) from the backup file at `backup`, checked whole
/// first. On an error the directory is left empty, as it was.
pub fn restore(backup: &Path, target: &Target) -> Result<Restored, String> {
    let voters = check_voters(target)?;
    let dir = target.data_dir;
    let existed = dir.exists();
    if existed
        && std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?.next().is_some()
    {
        return Err(format!(
            "{} is not empty: a restore seeds a new node's data directory, and never one in use",
            dir.display()
        ));
    }
    let checked = super::verify_file(backup)?;
    let seeded = seed(backup, target, &voters, &checked.header);
    if seeded.is_err() {
        let _ = if existed { empty_dir(dir) } else { std::fs::remove_dir_all(dir) };
    }
    seeded
}

fn seed(
    backup: &Path,
    target: &Target,
    voters: &BTreeMap<NodeId, NodeInfo>,
    header: &Header,
) -> Result<Restored, String> {
    let dir = target.data_dir;
    let lowest = *voters.keys().next().expect("voters checked");
    let leader_id = <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(0, lowest);
    let log_id = LogId::new(leader_id, header.applied_index);
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), Membership::from(voters.clone())),
    };
    crate::storage::files::create_dir_durably(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (_, input) = super::open(backup)?;
    crate::storage::state_machine::seed(dir, &meta, input)
        .map_err(|e| format!("cannot write the state into {}: {e}", dir.display()))?;
    LogStore::seed(&dir.join(crate::node::WAL_DIR), log_id)
        .map_err(|e| format!("cannot write the log into {}: {e}", dir.display()))?;
    // The identity last: a directory that a failed restore left without one is refused by
    // `tally serve` as not a node's.
    let cluster_id = restored_cluster_id(header, target.cluster, voters);
    let incarnation = crate::node::write_identity(dir, target.cluster, target.id, Some(&cluster_id))?;
    Ok(Restored { header: header.clone(), incarnation, cluster_id })
}

/// The id of the cluster restored from the backup `header` describes, named `cluster`, of
/// `voters`: a hash of all of them, in the form of `identity::new_cluster_id`.
pub fn restored_cluster_id(header: &Header, cluster: &str, voters: &BTreeMap<NodeId, NodeInfo>) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(b"tally restored cluster 1");
    field(header.cluster.as_bytes());
    field(&header.node_id.to_le_bytes());
    field(&header.applied_index.to_le_bytes());
    field(&header.applied_term.to_le_bytes());
    field(header.state_digest.as_bytes());
    field(&header.created_ns.to_le_bytes());
    field(cluster.as_bytes());
    for (id, voter) in voters {
        field(&id.to_le_bytes());
        field(voter.address.as_bytes());
        field(voter.peer_address.as_bytes());
        field(voter.site.as_bytes());
    }
    let id = super::hex(&hasher.finalize().as_bytes()[..16]);
    debug_assert!(crate::net::identity::is_cluster_id(&id));
    id
}

/// The voters as a membership: at least one, each id once, this node among them.
fn check_voters(target: &Target) -> Result<BTreeMap<NodeId, NodeInfo>, String> {
    if target.voters.is_empty() {
        return Err("name every voter of the new cluster with --voter, this node included".into());
    }
    let mut voters = BTreeMap::new();
    for voter in target.voters {
        let info = NodeInfo {
            address: voter.address.clone(),
            peer_address: voter.peer_address.clone(),
            site: voter.site.clone(),
            incarnation: 0,
        };
        if voters.insert(voter.id, info).is_some() {
            return Err(format!("voter {} is named twice", voter.id));
        }
    }
    if !voters.contains_key(&target.id) {
        let ids: BTreeSet<_> = voters.keys().collect();
        return Err(format!("node {} is not among the voters {ids:?}: name it with --voter too", target.id));
    }
    Ok(voters)
}

fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() { std::fs::remove_dir_all(&path)? } else { std::fs::remove_file(&path)? }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(applied_index: u64, digest: &str) -> Header {
        Header {
            cluster: "prod".into(),
            node_id: 2,
            applied_index,
            applied_term: 3,
            state_digest: digest.into(),
            timestamp_last: 1,
            stream_bytes: 10,
            created_ns: 5,
            written_by: "tally 0.1.0".into(),
        }
    }

    fn voters(ids: &[NodeId]) -> BTreeMap<NodeId, NodeInfo> {
        ids.iter()
            .map(|id| {
                let info = NodeInfo {
                    address: format!("n{id}:7100"),
                    peer_address: format!("n{id}:7200"),
                    site: format!("s{id}"),
                    incarnation: 0,
                };
                (*id, info)
            })
            .collect()
    }

    /// Nodes restored from one backup for one voter list share a cluster id; another backup or
    /// another voter list (nodes 1, 2 with {1,2,3} and 3, 4 with {1,3,4}: two quorums, two leaders
    /// before) is another cluster, whose Raft calls are refused.
    #[test]
    fn a_restored_cluster_id_binds_the_backup_and_the_voters() {
        let id = |header: &Header, cluster: &str, ids: &[NodeId]| {
            restored_cluster_id(header, cluster, &voters(ids))
        };
        let base = id(&header(100, "aa"), "prod", &[1, 2, 3]);
        assert!(crate::net::identity::is_cluster_id(&base));
        assert_eq!(base, id(&header(100, "aa"), "prod", &[1, 2, 3]), "the same restore, the same id");
        for (what, other) in [
            ("a later backup", id(&header(150, "bb"), "prod", &[1, 2, 3])),
            ("another voter list", id(&header(100, "aa"), "prod", &[1, 3, 4])),
            ("another name", id(&header(100, "aa"), "staging", &[1, 2, 3])),
            (
                "another backup at the same index",
                id(&Header { created_ns: 6, ..header(100, "aa") }, "prod", &[1, 2, 3]),
            ),
        ] {
            assert_ne!(base, other, "{what}");
        }
        let mut moved = voters(&[1, 2, 3]);
        moved.get_mut(&2).unwrap().peer_address = "elsewhere:7200".into();
        assert_ne!(base, restored_cluster_id(&header(100, "aa"), "prod", &moved), "a voter at another door");
    }
}
