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
//! The new cluster gets a new cluster id: the lowest voter's directory makes one, and the others
//! adopt it from that node's first vote request, as the peers of a bootstrap do. Nothing of the
//! old cluster's identity carries over, so a restored node never talks Raft with the old cluster.

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
    /// The voter whose directory holds the new cluster id (the lowest id).
    pub id_maker: NodeId,
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
    let id_maker = *voters.keys().next().expect("voters checked");
    let leader_id = <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(0, id_maker);
    let log_id = LogId::new(leader_id, header.applied_index);
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), Membership::from(voters.clone())),
    };
    crate::storage::wal::create_dir_durably(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (_, input) = super::open(backup)?;
    crate::storage::state_machine::seed(dir, &meta, input)
        .map_err(|e| format!("cannot write the state into {}: {e}", dir.display()))?;
    LogStore::seed(&dir.join(crate::node::WAL_DIR), log_id)
        .map_err(|e| format!("cannot write the log into {}: {e}", dir.display()))?;
    // The identity last: a directory that a failed restore left without one is refused by
    // `tally serve` as not a node's.
    let cluster_id = (target.id == id_maker).then(crate::net::identity::new_cluster_id);
    let incarnation = crate::node::write_identity(dir, target.cluster, target.id, cluster_id.as_deref())?;
    Ok(Restored { header: header.clone(), incarnation, id_maker })
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
