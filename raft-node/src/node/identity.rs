//! The data directory's identity: which cluster and node it belongs to (`identity.toml`), claimed
//! at start-up so that a node never runs on another's data.

use crate::types::NodeId;
use serde::{Deserialize, Serialize};

use super::NodeConfig;

/// Who a data directory belongs to; written when the directory is first used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    cluster: String,
    node_id: NodeId,
    /// Made at random when the directory is first used and never changed: a node that comes
    /// back with an empty directory is another incarnation (`net::identity`). A directory made
    /// by a build without incarnations reads as 0 and is given one.
    #[serde(default)]
    incarnation: u64,
    /// The cluster's id (`net::identity`): made by the bootstrap, or adopted from the leader's
    /// first call; absent until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
}

/// What `claim_data_dir` found or made.
pub struct Claimed {
    pub incarnation: u64,
    pub cluster_id: Option<String>,
}

/// Records `cluster_id` in the data directory's identity, durably (a bootstrap, or a new node
/// adopting its leader's).
pub fn save_cluster_id(dir: &std::path::Path, cluster_id: &str) -> Result<(), String> {
    let path = dir.join(IDENTITY_FILE);
    let text =
        crate::sys::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut identity: Identity =
        toml::from_str(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    identity.cluster_id = Some(cluster_id.to_string());
    let text = toml::to_string(&identity).expect("identity serializes");
    crate::storage::files::write_file_atomic(dir, IDENTITY_FILE, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// A fresh incarnation: random, never 0 (0 means "not recorded"), and 63 bits, as TOML's
/// integers are signed 64-bit (`identity.toml`).
pub(crate) fn new_incarnation() -> u64 {
    loop {
        let incarnation: u64 = crate::sys::random_u64() >> 1;
        if incarnation != 0 {
            return incarnation;
        }
    }
}

pub(crate) const IDENTITY_FILE: &str = "identity.toml";

/// The write-ahead log's directory under the data directory.
pub const WAL_DIR: &str = "wal";

/// Gives the data directory `dir` its identity: node `id` of `cluster`, a new incarnation, and
/// `cluster_id` if given (else the node adopts its leader's). For a directory that a restore
/// seeds; `claim_data_dir` does the same for an empty one at the first start. Returns the
/// incarnation.
pub fn write_identity(
    dir: &std::path::Path,
    cluster: &str,
    id: NodeId,
    cluster_id: Option<&str>,
) -> Result<u64, String> {
    let identity = Identity {
        cluster: cluster.to_string(),
        node_id: id,
        incarnation: new_incarnation(),
        cluster_id: cluster_id.map(str::to_string),
    };
    let text = toml::to_string(&identity).expect("identity serializes");
    crate::storage::files::write_file_atomic(dir, IDENTITY_FILE, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", dir.join(IDENTITY_FILE).display()))?;
    Ok(identity.incarnation)
}

/// Refuses a data directory that holds another cluster's or another node's data, or data
/// without an identity (not ours). An empty or new directory is claimed with a new incarnation.
/// Returns the directory's incarnation and cluster id.
pub fn claim_data_dir(config: &NodeConfig) -> Result<Claimed, String> {
    let dir = &config.data_dir;
    crate::sys::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    let path = dir.join(IDENTITY_FILE);
    let mut found = match crate::sys::fs::read_to_string(&path) {
        Ok(text) => {
            toml::from_str::<Identity>(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let entries = crate::sys::fs::read_dir(dir).map_err(|e| e.to_string())?.count();
            if entries > 0 {
                return Err(format!(
                    "data directory {} is not empty and has no {IDENTITY_FILE}: it is not a tally node's; \
                     use an empty directory",
                    dir.display()
                ));
            }
            Identity { cluster: config.cluster.clone(), node_id: config.id, incarnation: 0, cluster_id: None }
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if (found.cluster.as_str(), found.node_id) != (config.cluster.as_str(), config.id) {
        return Err(format!(
            "data directory {} belongs to node {} of cluster '{}', not node {} of cluster '{}'; \
             start with --id {} --cluster {} or use another --data-dir",
            dir.display(),
            found.node_id,
            found.cluster,
            config.id,
            config.cluster,
            found.node_id,
            found.cluster
        ));
    }
    if found.incarnation == 0 {
        found.incarnation = new_incarnation();
        let text = toml::to_string(&found).expect("identity serializes");
        crate::storage::files::write_file_atomic(dir, IDENTITY_FILE, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(id) = &found.cluster_id
        && !crate::net::identity::is_cluster_id(id)
    {
        return Err(format!("{} is damaged: cluster_id '{id}' is not 32 hex digits", path.display()));
    }
    Ok(Claimed { incarnation: found.incarnation, cluster_id: found.cluster_id })
}
