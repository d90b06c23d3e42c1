//! A node's configuration: flags or a TOML file with the same names, and their defaults.

use crate::types::{NodeId, NodeInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Configuration of one node, from flags or a TOML file (same names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    pub site: String,
    /// Address of the client door: `tally.v1.Ledger` for clients, `tally.v1.Cluster` for
    /// operators, health and reflection.
    pub listen: SocketAddr,
    /// Address clients and operators use to reach this node; defaults to `listen`.
    pub advertise: Option<String>,
    /// Address of the peer door: `tally.v1.Raft` and the requests other nodes forward, for this
    /// cluster's nodes only. Bind it to the network between the sites.
    pub peer_listen: SocketAddr,
    /// Address other nodes use to reach this node's peer door; defaults to `peer_listen`.
    #[serde(default)]
    pub peer_advertise: Option<String>,
    /// The cluster's CA and this node's certificate and key: TLS on both doors and to peers.
    #[serde(default)]
    pub tls: Option<crate::security::tls::TlsFiles>,
    /// Plaintext on both doors and to peers, anyone may call anything: only with this set, and
    /// never with `tls`.
    #[serde(default)]
    pub insecure: bool,
    /// Connections each door holds at a time; one more is closed at once.
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// A connection that sends and receives nothing for this long is closed.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Bytes of events submitted to this node and not yet answered; past it a write is refused
    /// with RESOURCE_EXHAUSTED.
    #[serde(default = "default_queued_bytes_max")]
    pub queued_bytes_max: u64,
    /// The longest a write may wait in the leader's queue to be proposed; while writes wait
    /// longer (the cluster at capacity), new ones are refused at once with RESOURCE_EXHAUSTED.
    #[serde(default = "default_queue_wait_max_ms")]
    pub queue_wait_max_ms: u64,
    /// How far behind in applying (ms) the follower that would take over may be before this
    /// node, leading, holds back new entries (`pace`); 0: never.
    #[serde(default = "default_pace_lag_ms")]
    pub pace_lag_ms: u64,
    /// How far behind in applying (ms) any voter that answers may be before this node, leading,
    /// holds back new entries, whether or not another could take over meanwhile; 0: no bound.
    #[serde(default)]
    pub pace_lag_all_ms: u64,
    /// How long (ms) one entry of writes should take this node, leading, to apply: entries are
    /// cut to the events it applies in that long (`batcher::ENTRY_APPLY_TARGET`); 0: no cut
    /// (up to four full batches).
    #[serde(default = "default_entry_apply_target_ms")]
    pub entry_apply_target_ms: u64,
    /// Bytes of request bodies the client door receives at a time, over all its connections;
    /// past it a request is refused with RESOURCE_EXHAUSTED (`security::budget`).
    #[serde(default = "default_receiving_bytes_max")]
    pub receiving_bytes_max: u64,
    /// Change-stream subscribers this node serves at a time; one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[serde(default = "default_subscribers_max")]
    pub subscribers_max: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP); none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The largest snapshot this node accepts from a leader, in bytes.
    #[serde(default = "default_snapshot_bytes_max")]
    pub snapshot_bytes_max: u64,
    pub data_dir: PathBuf,
    /// A name shared by all nodes of one cluster; a node refuses data and peers of another.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Initialize a new cluster whose voters are this node and `peers`. Ignored once initialized.
    #[serde(default)]
    pub bootstrap: bool,
    /// The other initial voters, for `bootstrap`.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Ask the node whose peer door is at this address to add this one to its cluster (as a voter).
    #[serde(default)]
    pub join: Option<String>,
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// How long the leader waits for more requests to put in one entry; 0 takes what is queued.
    #[serde(default)]
    pub group_commit_delay_us: u64,
    /// Entries applied since the last snapshot that trigger a new one.
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_entries: u64,
    /// Log entries kept behind a snapshot, so that a briefly lagging follower catches up from the
    /// log instead of needing the whole snapshot.
    #[serde(default = "default_snapshot_log_keep")]
    pub snapshot_log_keep: u64,
    /// The log behind a snapshot keeps at least its newest this many bytes ...
    #[serde(default = "default_log_keep_bytes")]
    pub log_keep_bytes: u64,
    /// ... and every entry written within this many milliseconds (`log_store::LogKeep`).
    #[serde(default = "default_log_keep_ms")]
    pub log_keep_ms: u64,
    /// Memory for the ledger state's caches (decoded accounts, the page store's cache, the runs'
    /// descriptions), in bytes.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// Applied entries reach the ledger state's store in checkpoints: at least this often...
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// ... and once this many bytes of applied state wait in memory for one.
    #[serde(default = "default_checkpoint_bytes")]
    pub checkpoint_bytes: u64,
    /// The newest semantics version this node applies (`--semantics-max`; default: the build's).
    #[serde(default = "default_semantics_max")]
    pub semantics_max: u32,
    /// Reach node ID's peer door at this address instead of the one the membership records, for
    /// all node-to-node traffic (Raft and forwarded requests): a NAT, a tunnel, or a chaos harness's
    /// fault-injecting proxy between this node and that one.
    #[serde(default)]
    pub routes: BTreeMap<NodeId, String>,
    /// How far this node's clock may be from a majority of the voters' before it stops stamping
    /// entries as leader (`clock`).
    #[serde(default = "default_clock_tolerance_ms")]
    pub clock_tolerance_ms: u64,
    /// Test hook: a file that skews this node's clock (`clock`). Never in production.
    #[serde(default)]
    pub clock_skew_file: Option<PathBuf>,
    /// Test hook: milliseconds added to every applied entry. Never in production.
    #[serde(default)]
    pub apply_delay_ms: u64,
    /// Test hook: WAL segments roll over at this size instead of 64 MiB, so that chaos runs
    /// roll segments often. Never in production.
    #[serde(default)]
    pub wal_segment_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: NodeId,
    /// Its client door.
    pub address: String,
    /// Its peer door.
    pub peer_address: String,
    pub site: String,
}

pub(crate) fn default_cluster() -> String {
    "tally".into()
}

pub fn default_connections_max() -> usize {
    4096
}

pub fn default_idle_timeout_s() -> u64 {
    300
}

pub fn default_receiving_bytes_max() -> u64 {
    crate::security::budget::RECEIVING_BYTES_DEFAULT
}

pub fn default_subscribers_max() -> usize {
    256
}

pub fn default_queue_wait_max_ms() -> u64 {
    crate::batcher::QUEUE_WAIT_MS_DEFAULT
}

pub fn default_entry_apply_target_ms() -> u64 {
    crate::batcher::ENTRY_APPLY_TARGET.as_millis() as u64
}

pub fn default_pace_lag_ms() -> u64 {
    crate::pace::LAG_MAX_DEFAULT.as_millis() as u64
}

pub fn default_queued_bytes_max() -> u64 {
    crate::batcher::QUEUE_BYTES_DEFAULT
}

pub fn default_snapshot_bytes_max() -> u64 {
    1 << 40
}

pub(crate) fn default_election_timeout_ms() -> u64 {
    150
}

pub(crate) fn default_heartbeat_ms() -> u64 {
    50
}

pub(crate) fn default_clock_tolerance_ms() -> u64 {
    crate::clock::TOLERANCE_MS_DEFAULT
}

pub(crate) fn default_snapshot_entries() -> u64 {
    20_000
}

pub(crate) fn default_snapshot_log_keep() -> u64 {
    1000
}

pub fn default_log_keep_bytes() -> u64 {
    4 << 30
}

pub fn default_log_keep_ms() -> u64 {
    15 * 60 * 1000
}

pub fn default_checkpoint_interval_ms() -> u64 {
    crate::storage::state_machine::CheckpointPolicy::default().interval.as_millis() as u64
}

pub fn default_semantics_max() -> u32 {
    ledger::semantics::MAX
}

pub fn default_checkpoint_bytes() -> u64 {
    crate::storage::state_machine::CheckpointPolicy::default().bytes_max
}

pub fn default_cache_bytes() -> u64 {
    tally_store::Options::default().cache_bytes
}

impl NodeConfig {
    pub fn advertise(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    pub fn peer_advertise(&self) -> String {
        self.peer_advertise.clone().unwrap_or_else(|| self.peer_listen.to_string())
    }

    pub fn info(&self, incarnation: u64) -> NodeInfo {
        NodeInfo {
            address: self.advertise(),
            peer_address: self.peer_advertise(),
            site: self.site.clone(),
            incarnation,
        }
    }
}

pub fn read_config_file(path: &Path) -> Result<NodeConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
