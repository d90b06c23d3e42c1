//! One running node: its configuration, its data directory, Raft, and the gRPC server.
//!
//! Start-up order: check the data directory belongs to this cluster and node id (`identity`),
//! open the WAL and the state, start Raft, bootstrap or join if asked, then serve gRPC until
//! SIGTERM or Ctrl-C, then shut Raft down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use tally_proto::v1 as pb;

use crate::batcher::Batcher;
use crate::clock::ClusterClock;
use crate::net::identity::{Endpoint, Identities};
use crate::net::{MESSAGE_BYTES_MAX, Network};
use crate::security::doors::{self, Door, Limits};
use crate::storage::log_store::LogStore;
use crate::storage::state_machine::StateMachine;
use crate::types::{NodeId, NodeInfo, Raft};

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
    /// Memory for the ledger state's caches (the page store's cache and decoded accounts), in bytes.
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

fn default_cluster() -> String {
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
pub fn default_queued_bytes_max() -> u64 {
    crate::batcher::QUEUE_BYTES_DEFAULT
}
pub fn default_snapshot_bytes_max() -> u64 {
    1 << 40
}
fn default_election_timeout_ms() -> u64 {
    150
}
fn default_heartbeat_ms() -> u64 {
    50
}
fn default_clock_tolerance_ms() -> u64 {
    crate::clock::TOLERANCE_MS_DEFAULT
}
fn default_snapshot_entries() -> u64 {
    20_000
}
fn default_snapshot_log_keep() -> u64 {
    1000
}
pub fn default_log_keep_bytes() -> u64 {
    4 << 30
}
pub fn default_log_keep_ms() -> u64 {
    15 * 60 * 1000
}
pub fn default_checkpoint_interval_ms() -> u64 {
    200
}
pub fn default_semantics_max() -> u32 {
    ledger::semantics::MAX
}

pub fn default_checkpoint_bytes() -> u64 {
    64 << 20
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

/// Who a data directory belongs to; written when the directory is first used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
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
fn new_incarnation() -> u64 {
    loop {
        let incarnation: u64 = crate::sys::random_u64() >> 1;
        if incarnation != 0 {
            return incarnation;
        }
    }
}

const IDENTITY_FILE: &str = "identity.toml";
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

/// Everything the gRPC services need.
pub struct NodeHandle {
    pub config: NodeConfig,
    /// This node's id and incarnation, and those its membership records (`net::identity`).
    pub identities: Arc<Identities>,
    /// This node's view of the voters' clocks: what the leader may stamp.
    pub clock: Arc<ClusterClock>,
    pub raft: Raft,
    pub state: Arc<crate::storage::state_machine::Shared>,
    pub log: LogStore,
    pub batcher: Batcher,
    /// Channels to other nodes for forwarded requests and status fan-out.
    pub peers: crate::net::Pool,
    /// This node's TLS (None with `--insecure`); reloaded on SIGHUP.
    pub tls: Option<Arc<crate::security::tls::Tls>>,
    /// When this node last accepted a leader's AppendEntries (for health).
    pub leader_contact: LeaderContact,
    /// When the leader last said, asked for its clock, that a majority of voters acknowledged
    /// it lately (for health: a leader cut off from its quorum still sends heartbeats).
    pub leader_quorum: LeaderContact,
    /// What gRPC health says now (SERVING): also `GET /ready` on the metrics endpoint, for
    /// probes that cannot speak TLS.
    pub serving: std::sync::atomic::AtomicBool,
    /// When the node started, for its uptime.
    pub started: std::time::Instant,
    /// One permit per change-stream subscriber this node may serve (`--max-subscribers`).
    pub subscribers: Arc<tokio::sync::Semaphore>,
    /// The last whole-cluster status and when it was gathered, shared by callers without an
    /// operator's or a node's certificate (`service::cluster`).
    pub status_cache: tokio::sync::Mutex<Option<(std::time::Instant, tally_proto::v1::StatusReply)>>,
    /// The whole state arriving from the leader, while it does (`service::raft`).
    pub receiving: Receiving,
    /// Whether this node withholds its vote after losing a damaged tail of its log.
    pub votes: VoteHold,
}

/// Whether this node withholds its vote, and until its log reaches which index: after recovery cut
/// off a damaged tail it may have acknowledged (`LogStore::lost_tail`), it must not help elect a
/// leader that lacks those entries, nor stand itself. A leader's entries up to that index bring
/// them back (a leader holds every committed entry).
#[derive(Default)]
pub struct VoteHold {
    /// The index the log must reach; 0 when votes are not withheld.
    until: std::sync::atomic::AtomicU64,
}

impl VoteHold {
    fn withhold_until(&self, index: u64) {
        self.until.store(index.max(1), std::sync::atomic::Ordering::SeqCst);
    }

    /// The index until which this node withholds its vote, if it does.
    pub fn withheld(&self) -> Option<u64> {
        Some(self.until.load(std::sync::atomic::Ordering::SeqCst)).filter(|until| *until > 0)
    }
}

/// Votes and elections again once the log holds entries up to the withheld index.
async fn release_votes_when_caught_up(node: Arc<NodeHandle>) {
    let Some(until) = node.votes.withheld() else { return };
    let mut metrics = node.raft.metrics();
    loop {
        let caught_up = metrics.borrow_watched().last_log_index.is_some_and(|last| last >= until);
        if caught_up {
            node.votes.until.store(0, std::sync::atomic::Ordering::SeqCst);
            node.raft.runtime_config().elect(true);
            tracing::info!(
                node = node.id(),
                "the log holds entries up to {until} again: this node votes again"
            );
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// A snapshot being received: whether one is, and its bytes so far.
#[derive(Default)]
pub struct Receiving {
    active: std::sync::atomic::AtomicBool,
    bytes: std::sync::atomic::AtomicU64,
}

impl Receiving {
    /// Marks a snapshot as arriving until the guard is dropped.
    pub fn start(&self) -> ReceivingGuard<'_> {
        self.bytes.store(0, std::sync::atomic::Ordering::Relaxed);
        self.active.store(true, std::sync::atomic::Ordering::Relaxed);
        ReceivingGuard(self)
    }

    /// Bytes received so far, or `None` when no snapshot is arriving.
    pub fn bytes(&self) -> Option<u64> {
        self.active
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| self.bytes.load(std::sync::atomic::Ordering::Relaxed))
    }
}

pub struct ReceivingGuard<'a>(&'a Receiving);

impl ReceivingGuard<'_> {
    pub fn received(&self, bytes: u64) {
        self.0.bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ReceivingGuard<'_> {
    fn drop(&mut self) {
        self.0.active.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When a leader was last heard from (or said it had a quorum): milliseconds since the node started, `u64::MAX` for never.
pub struct LeaderContact {
    started: tokio::time::Instant,
    at_ms: std::sync::atomic::AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> LeaderContact {
        LeaderContact {
            started: tokio::time::Instant::now(),
            at_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
}

impl LeaderContact {
    pub fn record(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.at_ms.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn within(&self, window: Duration) -> bool {
        match self.at_ms.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => false,
            at => (self.started.elapsed().as_millis() as u64).saturating_sub(at) < window.as_millis() as u64,
        }
    }
}

impl NodeHandle {
    /// Whether this node serves now (what health reports): a member in contact with a leader
    /// that has heard from a majority of voters lately; as the leader, that it has.
    pub fn judge_serving(&self) -> bool {
        let contact_max = leader_contact_max(&self.config);
        let metrics = self.raft.metrics();
        let current = metrics.borrow_watched();
        let member = current.membership_config.membership().get_node(&self.id()).is_some();
        let in_contact = if current.current_leader == Some(self.id()) {
            current
                .last_quorum_acked
                .as_ref()
                .is_some_and(|acked| openraft::Instant::elapsed(&**acked) < contact_max)
        } else {
            current.current_leader.is_some()
                && self.heard_from_leader_within(contact_max)
                && self.leader_quorum.within(contact_max)
        };
        member && in_contact
    }

    pub fn heard_from_leader_within(&self, window: Duration) -> bool {
        self.leader_contact.within(window)
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    pub fn incarnation(&self) -> u64 {
        self.identities.me.incarnation
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id())
    }

    /// Node `id`'s client door, as the membership records it: what clients use to reach it.
    pub fn advertised_address_of(&self, id: NodeId) -> Option<String> {
        self.member(id).map(|n| n.address)
    }

    /// The address this node uses to reach node `id`'s peer door: its route, or the
    /// membership's peer address.
    pub fn address_of(&self, id: NodeId) -> Option<String> {
        self.config.routes.get(&id).cloned().or_else(|| self.member(id).map(|n| n.peer_address))
    }

    fn member(&self, id: NodeId) -> Option<NodeInfo> {
        let metrics = self.raft.metrics();
        let membership = metrics.borrow_watched().membership_config.clone();
        membership.membership().get_node(&id).cloned()
    }
}

fn raft_config(config: &NodeConfig) -> openraft::Config {
    openraft::Config {
        cluster_name: config.cluster.clone(),
        heartbeat_interval: config.heartbeat_ms,
        election_timeout_min: config.election_timeout_ms,
        election_timeout_max: config.election_timeout_ms * 2,
        // Entries per append: up to 64 MiB messages fit a few hundred 1 MiB entries.
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
        // The log behind a snapshot is purged by `service::cluster::purge_behind_snapshots`, by
        // entries, bytes and age; openraft would purge by entries alone.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: 60_000,
        enable_elect: true,
        // A leader that restarts must win a new election before it serves. Restoring leadership
        // at once (openraft's default) lets it answer linearizable reads from its persisted
        // commit index, which we write lazily, and from its state, which reaches the disk in checkpoints:
        // the chaos harness caught such a leader serving a read that missed payments
        // acknowledged just before a power loss. A new election commits a fresh entry first.
        enable_leader_restore: Some(false),
        // A follower that was frozen or cut off must not bump its term when it comes back and
        // depose a healthy leader: it first asks whether a quorum would vote for it, and one that
        // still hears from the leader says no. (Without it, a follower thawed after a 6 s
        // SIGSTOP under load forced an election every time.)
        enable_pre_vote: Some(true),
        ..openraft::Config::default()
    }
}

/// Why a node did not start.
#[derive(Debug)]
pub enum StartError {
    /// Its write-ahead log or its state cannot be read back (damaged, or a failing disk): it
    /// cannot serve, and what to do is in the message. Exit code `EXIT_DATA_UNREADABLE`.
    DataUnreadable(String),
    /// Re-applying the log at start found the ledger state damaged and marked it: started again
    /// (a supervisor's restart), the node rebuilds it. Exit code `EXIT_STORAGE_FAILED`.
    StateDamaged(String),
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::DataUnreadable(message)
            | StartError::StateDamaged(message)
            | StartError::Other(message) => f.write_str(message),
        }
    }
}

impl From<String> for StartError {
    fn from(message: String) -> StartError {
        StartError::Other(message)
    }
}

/// What an operator does about a data directory the node cannot read back.
fn unreadable(config: &NodeConfig, what: &str, error: impl std::fmt::Display) -> StartError {
    StartError::DataUnreadable(format!(
        "cannot read {what} in {}: {error}. This node cannot repair it by itself and will not serve \
         from it. If the disk fails, replace it first. Then move {} aside (keep it to find out what \
         happened), start this node again with the same flags on an empty data directory, and run \
         `tally cluster replace --id {}` against any node: it rejoins as a new incarnation and copies \
         the ledger from its peers",
        config.data_dir.display(),
        config.data_dir.display(),
        config.id
    ))
}

/// The exit code of a node that cannot read its own data back (EX_DATAERR): see `StartError`.
pub const EXIT_DATA_UNREADABLE: u8 = 65;

/// Opens the node's storage and starts Raft and the batcher.
pub async fn start(config: NodeConfig) -> Result<Arc<NodeHandle>, StartError> {
    let tls = match (&config.tls, config.insecure) {
        (Some(files), false) => Some(Arc::new(crate::security::tls::Tls::load(files.clone(), config.id)?)),
        (None, true) => None,
        (Some(_), true) => {
            return Err("--insecure and TLS files (--ca, --cert, --key) exclude each other"
                .to_string()
                .into());
        }
        (None, false) => {
            return Err(
                "TLS needs --ca, --cert and --key (make them with `tally certs`); plaintext only with \
                 --insecure"
                    .to_string()
                    .into(),
            );
        }
    };
    let claimed = claim_data_dir(&config)?;
    let identities = Arc::new(
        Identities::new(Endpoint { id: config.id, incarnation: claimed.incarnation }, claimed.cluster_id)
            .named(&config.cluster),
    );
    let segment_bytes = config.wal_segment_bytes.unwrap_or(crate::storage::wal::SEGMENT_BYTES_MAX);
    let opening = std::time::Instant::now();
    let log =
        LogStore::open_with(&config.data_dir.join(WAL_DIR), segment_bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::Unsupported => StartError::Other(e.to_string()),
            _ => unreadable(&config, "the write-ahead log (wal/)", e),
        })?;
    let checkpoints = crate::storage::state_machine::CheckpointPolicy {
        interval: Duration::from_millis(config.checkpoint_interval_ms),
        bytes_max: config.checkpoint_bytes,
    };
    let log_opened = opening.elapsed();
    let machine = StateMachine::open(&config.data_dir, config.cache_bytes, checkpoints)
        .map_err(|e| unreadable(&config, "the ledger state (state/, snapshots/)", e))?;
    let state_opened = opening.elapsed();
    machine.shared.limit_semantics(config.semantics_max).map_err(|e| e.to_string())?;
    machine.shared.delay_applies(Duration::from_millis(config.apply_delay_ms));
    // A rebuilt state starts at the local snapshot; the log must go on from there.
    let (applied, purged) = (machine.shared.applied().last_applied, log.last_purged());
    if applied < purged {
        return Err(unreadable(
            &config,
            "the ledger state (state/, snapshots/)",
            format!(
                "it ends at {applied:?}, but the log was purged up to {purged:?}, with no snapshot to cover the gap"
            ),
        ));
    }
    let state = machine.shared.clone();
    let votes = VoteHold::default();
    if let Some((first, last_seen)) = log.lost_tail() {
        tracing::warn!(
            node = config.id,
            "the log's tail from entry {first} was damaged (a crash tore unsynced writes, or the disk \
             damaged them), with entries up to {last_seen} on disk after it; it is cut off. This node \
             neither votes nor stands for election until a leader has given it entries up to \
             {last_seen} again, in case it had acknowledged some"
        );
        votes.withhold_until(last_seen);
    }
    let mut raft_config = raft_config(&config);
    raft_config.enable_elect = votes.withheld().is_none();
    let raft_config = Arc::new(raft_config.validate().map_err(|e| format!("raft configuration: {e}"))?);
    let raft = Raft::new(
        config.id,
        raft_config,
        Network::new(config.routes.clone(), identities.clone(), tls.clone()),
        log.clone(),
        machine,
    )
    .await
    .map_err(|e| {
        if crate::storage::state_machine::marked_damaged(&config.data_dir) {
            StartError::StateDamaged(format!(
                "re-applying the log found the ledger state damaged ({e}); it is marked, and this node \
                 rebuilds it from its snapshot and log when started again"
            ))
        } else {
            StartError::Other(format!("cannot start raft: {e}"))
        }
    })?;
    // Where a restart's time goes: a node that takes long to start leaves the cluster short of
    // a member for as long (issue 24).
    tracing::info!(
        node = config.id,
        "storage open in {} ms: the log ({}..{}) in {} ms, the ledger state (applied {}) in {} ms, \
         raft in {} ms; what was committed after the state's entry is applied as the leader's \
         commit index reaches this node",
        opening.elapsed().as_millis(),
        log.last_purged().map_or(0, |id| id.index + 1),
        log.last_index().unwrap_or(0),
        log_opened.as_millis(),
        applied.map_or(0, |id| id.index),
        (state_opened - log_opened).as_millis(),
        (opening.elapsed() - state_opened).as_millis(),
    );
    let clock = ClusterClock::new(config.clock_tolerance_ms, config.clock_skew_file.clone());
    let batcher = Batcher::start(
        raft.clone(),
        Duration::from_micros(config.group_commit_delay_us),
        clock.clone(),
        config.id,
        crate::batcher::Limits {
            bytes_max: config.queued_bytes_max,
            queue_wait_max: Duration::from_millis(config.queue_wait_max_ms),
        },
    );
    identities.update(raft.metrics().borrow_watched().membership_config.membership().nodes());
    tokio::spawn(follow_membership(raft.clone(), identities.clone()));
    let subscribers_max = config.subscribers_max;
    let node = Arc::new(NodeHandle {
        config,
        identities,
        clock,
        raft,
        state,
        log,
        batcher,
        peers: crate::net::Pool::new(tls.clone()),
        tls,
        leader_contact: LeaderContact::default(),
        leader_quorum: LeaderContact::default(),
        serving: std::sync::atomic::AtomicBool::new(false),
        started: std::time::Instant::now(),
        subscribers: Arc::new(tokio::sync::Semaphore::new(subscribers_max)),
        status_cache: tokio::sync::Mutex::new(None),
        receiving: Receiving::default(),
        votes,
    });
    if node.votes.withheld().is_some() {
        tokio::spawn(release_votes_when_caught_up(node.clone()));
    }
    tokio::spawn(crate::service::cluster::record_incarnations(node.clone()));
    tokio::spawn(crate::clock::sample_peers(node.clone()));
    tokio::spawn(crate::service::cluster::watch_divergence(node.clone()));
    tokio::spawn(crate::service::cluster::raise_semantics(node.clone()));
    tokio::spawn(crate::service::cluster::hand_over_while_applying(node.clone()));
    tokio::spawn(crate::service::cluster::purge_behind_snapshots(node.clone()));
    tokio::spawn(crate::batcher::expire_when_due(
        node.raft.clone(),
        node.state.clone(),
        node.clock.clone(),
        node.id(),
    ));
    if node.config.bootstrap {
        bootstrap(&node).await?;
    }
    if let Some(address) = node.config.join.clone() {
        tokio::spawn(join(node.clone(), address));
    }
    Ok(node)
}

/// Keeps the incarnations the Raft RPCs check in step with the membership in effect. Watches
/// openraft's server metrics, which change with the vote, the leader and the membership only:
/// its full metrics change on every append and apply, and each change woke this task (and two
/// others like it) thousands of times a second under load.
async fn follow_membership(raft: Raft, identities: Arc<Identities>) {
    let mut metrics = raft.server_metrics();
    let mut followed = *metrics.borrow_watched().membership_config.log_id();
    while metrics.changed().await.is_ok() {
        let membership = {
            let current = metrics.borrow_watched();
            if current.membership_config.log_id() == &followed {
                continue;
            }
            current.membership_config.clone()
        };
        followed = *membership.log_id();
        identities.update(membership.membership().nodes());
    }
}

async fn bootstrap(node: &NodeHandle) -> Result<(), StartError> {
    if node.raft.is_initialized().await.map_err(|e| StartError::Other(e.to_string()))? {
        return Ok(());
    }
    // The cluster id first, durably: a crash before `initialize` bootstraps again with it.
    if node.identities.cluster_id().is_none() {
        let id = crate::net::identity::new_cluster_id();
        save_cluster_id(&node.config.data_dir, &id)?;
        node.identities.check_cluster(Some(&id), true, |_| Ok(())).map_err(|e| format!("{e:?}"))?;
    }
    let mut members = BTreeMap::new();
    members.insert(node.id(), node.config.info(node.incarnation()));
    // The peers' incarnations are not known yet: the leader records them once they answer.
    for peer in &node.config.peers {
        members.insert(
            peer.id,
            NodeInfo {
                address: peer.address.clone(),
                peer_address: peer.peer_address.clone(),
                site: peer.site.clone(),
                incarnation: 0,
            },
        );
    }
    node.raft.initialize(members).await.map_err(|e| format!("cannot bootstrap the cluster: {e}").into())
}

/// Asks the cluster at `address` to add this node, retrying until it answers.
async fn join(node: Arc<NodeHandle>, address: String) {
    let request = pb::AddNodeRequest {
        id: node.id(),
        address: node.config.advertise(),
        peer_address: node.config.peer_advertise(),
        site: node.config.site.clone(),
        learner_only: false,
        force: false,
        incarnation: node.incarnation(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let channel = node.peers.channel(None, &address)?;
            let mut client = pb::cluster_client::ClusterClient::new(channel);
            client.add_node(request.clone()).await.map_err(|s| s.message().to_string())
        };
        match attempt.await {
            Ok(_) => return,
            Err(error) if error.contains("refused") || error.contains("site") => {
                eprintln!("tally: node {} cannot join via {address}: {error}", node.id());
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// How recently a leader must have been heard from (a follower) or have heard from a quorum
/// (the leader) for health to say SERVING.
fn leader_contact_max(config: &NodeConfig) -> Duration {
    Duration::from_millis((config.election_timeout_ms * 6).max(1000))
}

/// How often health is re-evaluated.
const HEALTH_INTERVAL: Duration = Duration::from_millis(200);

/// Keeps gRPC health true to what a load balancer needs to know: SERVING only while this node
/// is a member and in contact with a leader that is in contact with a quorum (it can take
/// writes, forwarding them); NOT_SERVING when no leader is elected, when it is cut off from the
/// leader, when the leader is cut off from a quorum, and once it is removed from the cluster.
/// For the whole server ("") and for `tally.v1.Ledger`.
async fn report_health(node: Arc<NodeHandle>, reporter: tonic_health::server::HealthReporter) {
    let ledger =
        <pb::ledger_server::LedgerServer<crate::service::LedgerService> as tonic::server::NamedService>::NAME;
    let mut reported = None;
    let mut ticks = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        ticks.tick().await;
        let serving = node.judge_serving();
        node.serving.store(serving, std::sync::atomic::Ordering::Relaxed);
        if reported != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in ["", ledger] {
                reporter.set_service_status(service, status).await;
            }
            reported = Some(serving);
        }
    }
}

/// Serves the client door and the peer door on the configured addresses until `shutdown`
/// resolves, then stops Raft.
pub async fn serve(
    node: Arc<NodeHandle>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let bind = |address: SocketAddr, door: &'static str| async move {
        crate::sys::TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen on {address} ({door}): {e}"))
    };
    let clients = bind(node.config.listen, "the client door, --listen").await?;
    let peers = bind(node.config.peer_listen, "the peer door, --peer-listen").await?;
    serve_on(node, clients, peers, shutdown).await
}

/// The two doors (DESIGN.md, decision 11). The client door serves clients (`tally.v1.Ledger`),
/// operators (`tally.v1.Cluster`), health and reflection. The peer door serves only what nodes
/// ask of each other: `tally.v1.Raft`, and the Ledger and Cluster requests a node forwards to
/// the leader or fans out for status, so that all node-to-node traffic goes one way, through
/// one route (`--route`).
pub async fn serve_on(
    node: Arc<NodeHandle>,
    clients: crate::sys::TcpListener,
    peers: crate::sys::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(node.clone(), health_reporter));
    // Reflection as v1 and as v1alpha, which older tools (Python's grpcio-reflection, older
    // grpcurl) still ask for.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;
    let reflection = reflection().build_v1().map_err(|e| e.to_string())?;
    let ledger = || {
        pb::ledger_server::LedgerServer::new(crate::service::LedgerService::new(node.clone()))
            .max_decoding_message_size(crate::service::LEDGER_REQUEST_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    };
    let cluster =
        || pb::cluster_server::ClusterServer::new(crate::service::ClusterService::new(node.clone()));
    let raft = pb::raft_server::RaftServer::new(crate::service::RaftService::new(node.clone()))
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let raft = tonic::service::interceptor::InterceptedService::new(
        raft,
        crate::service::refuse_strangers(node.identities.clone()),
    );
    let (stopping, stop_requested) = tokio::sync::watch::channel(false);
    let stopped = |mut watch: tokio::sync::watch::Receiver<bool>| async move {
        let _ = watch.wait_for(|stopping| *stopping).await;
    };
    let limits = Limits {
        connections_max: node.config.connections_max,
        idle_max: Duration::from_secs(node.config.idle_timeout_s),
    };
    if node.tls.is_none() {
        tracing::warn!(
            node = node.id(),
            "--insecure: both doors are plaintext and anyone who reaches them may write, change the membership \
             or pose as a node; never outside a test machine"
        );
    }
    let client_door = door_server(CLIENT_STREAMS_PER_CONNECTION_MAX)
        .layer(crate::metrics::layer::Observe { door: "client" })
        .layer(crate::security::budget::ReceiveBudget::new(node.config.receiving_bytes_max))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ledger())
        .add_service(cluster())
        .serve_with_incoming_shutdown(
            doors::incoming(clients, Door::Clients, node.tls.clone(), limits),
            stopped(stop_requested.clone()),
        );
    let peer_door = door_server(STREAMS_PER_CONNECTION_MAX)
        .layer(crate::metrics::layer::Observe { door: "peer" })
        .add_service(raft)
        .add_service(ledger())
        .add_service(cluster())
        .serve_with_incoming_shutdown(
            doors::incoming(peers, Door::Peers, node.tls.clone(), limits),
            stopped(stop_requested.clone()),
        );
    let doors = async { tokio::try_join!(client_door, peer_door).map(|_| ()) };
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    // A graceful stop waits for requests in flight, but not forever: a request waiting for a
    // commit that will never come (this node was removed, or lost its quorum) must not keep
    // the process alive after SIGTERM.
    let drain_deadline = async {
        signal.await;
        tokio::time::sleep(SHUTDOWN_DRAIN_MAX).await;
    };
    let result = tokio::select! {
        served = doors => served.map_err(|e| format!("gRPC server: {e}")),
        () = drain_deadline => {
            tracing::warn!(node = node.id(), "requests still in flight {SHUTDOWN_DRAIN_MAX:?} after the stop signal; stopping anyway");
            Ok(())
        }
    };
    let _ = node.raft.shutdown().await;
    result
}

fn door_server(streams_per_connection: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Streams a peer reset before this node got to them: every heartbeat to a frozen node
        // times out after 50 ms and is reset, and h2's default of 20 answered a thawed node's
        // peers with GOAWAY (too_many_resets), cutting replication. Still bounded, against
        // rapid-reset floods.
        .http2_max_pending_accept_reset_streams(Some(RESET_STREAMS_PENDING_MAX))
        // Calls one connection may have open at once; h2 refuses more (REFUSED_STREAM), and
        // well-behaved clients queue them.
        .max_concurrent_streams(Some(streams_per_connection))
}

/// Calls open at once on one connection of the peer door (a leader's replication and
/// heartbeats, forwarded writes).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// ... and of the client door: an application's pool of calls, whose bytes the receive budget
/// bounds over all connections too.
pub const CLIENT_STREAMS_PER_CONNECTION_MAX: u32 = 256;

/// Streams reset by the peer before they were accepted that a connection tolerates: a 50 ms
/// heartbeat to a node frozen for 30 s makes 600.
const RESET_STREAMS_PENDING_MAX: usize = 1024;

/// How long a stopping node waits for requests in flight to finish.
const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(2);

/// Logs every change of leader or term this node sees, for the operator and chaos runs.
pub async fn log_leadership(node: Arc<NodeHandle>) {
    // Server metrics: they change with the leader and the vote, not with every append.
    let mut metrics = node.raft.server_metrics();
    let mut last = (None, 0);
    loop {
        let now = {
            let m = metrics.borrow_watched();
            (m.current_leader, m.vote.leader_id().term)
        };
        if now != last {
            match now.0 {
                Some(leader) => {
                    if last.0 != Some(leader) {
                        crate::metrics::LEADER_CHANGES.inc();
                    }
                    tracing::info!(node = node.id(), term = now.1, leader, "leader known")
                }
                None => tracing::info!(node = node.id(), term = now.1, "no leader"),
            }
            if now.1 > last.1 {
                crate::metrics::TERMS.inc();
            }
            last = now;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The exit code of a node that stopped because its storage failed (EX_IOERR): a supervisor
/// restarts it once the disk is fixed; any other failure exits with 1.
pub const EXIT_STORAGE_FAILED: u8 = 74;

/// Resolves when Raft has stopped on a fatal error, with that error: a write or fsync of the log
/// that failed (a full or failing disk), a state that could not be applied. The node cannot go on
/// without its storage; restarted, it recovers from what is really on disk (see `storage/wal.rs`,
/// "Durability"). Never resolves while Raft runs.
pub async fn fatal(node: Arc<NodeHandle>) -> String {
    // Looks at the full metrics only when the server metrics change (openraft stopping drops
    // their sender) or once a second: the full ones change on every append and apply.
    let mut changes = node.raft.server_metrics();
    let mut ticks = tokio::time::interval(FATAL_POLL);
    loop {
        if let Err(fatal) = &node.raft.metrics().borrow_watched().running_state {
            return fatal.to_string();
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                if let Err(fatal) = &node.raft.metrics().borrow_watched().running_state {
                    return fatal.to_string();
                }
                return "raft stopped".into();
            },
            _ = ticks.tick() => {}
        }
    }
}

/// How often `fatal` looks whether Raft stopped, beside the changes it is told of.
const FATAL_POLL: Duration = Duration::from_secs(1);

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

pub fn read_config_file(path: &Path) -> Result<NodeConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
