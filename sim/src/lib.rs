//! tally-sim: tally's real node code (openraft, the Raft network, the WAL, the batcher, forwarding,
//! the state machine, cluster time, health) for 3 or 5 nodes under turmoil's simulated time,
//! network and disk, driven by one seed (DESIGN.md, decision 17).
//!
//! A run: the nodes boot (node 1 bootstraps the others), a client host creates the bank's
//! accounts and sends transfers from a few concurrent writers, retrying a write whose outcome is
//! unknown with the same ids; faults drawn from the seed hit the nodes meanwhile (`faults`); then
//! everything heals, the writers stop, and the run checks what was acknowledged (`check`). The
//! invariants that need no client (one leader per term, the same state digest at the same applied
//! index) are checked after every step of the simulation.
//!
//! What is simulated: time (every timer, timeout and clock reading of the nodes), the network
//! (latency, partitions, a crashed host's connections), the disk under the WAL, the vote, the
//! identity and the snapshots (turmoil's file system: writes not yet fsynced are lost when a host
//! crashes), the ledger's state store (`raft_node::sys::state_store`: a page store in memory per
//! node and directory that a crash leaves with what was durable and a seed-drawn number of the
//! batches after it, so that a node re-applies from its last durable checkpoint as after a real
//! power cut; its merges and checkpoints run inside the apply), and randomness (openraft's,
//! tokio's, the node's). What is not: CPU time, which is free: work done between two steps takes
//! no simulated time.

pub mod check;
pub mod faults;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use raft_node::node::NodeHandle;

pub use faults::Faults;

/// The client door and the peer door of every simulated node.
pub const CLIENT_PORT: u16 = 7000;
pub const PEER_PORT: u16 = 7001;

/// Faults stop this long before the end of the simulated time, so that the cluster heals and
/// the run can check that it serves again.
pub const HEAL_BEFORE_END: Duration = Duration::from_secs(20);
/// Writers stop this long before the end; the final reads and checks take the rest.
pub const WRITES_STOP_BEFORE_END: Duration = Duration::from_secs(8);
/// After the faults stop, a write must be acknowledged within this much simulated time.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(10);
/// After the client is done, every node must reach the same applied index and digest within
/// this much simulated time.
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(20);

/// One simulation run.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// 3 or 5 nodes, one per site.
    pub nodes: u64,
    pub faults: Faults,
    pub sim_time: Duration,
    /// Prints the trace as it goes, and the nodes' logs (`RUST_LOG`).
    pub verbose: bool,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The first guarantee found broken, with what broke it; `None` if the run passed.
    pub failure: Option<String>,
    /// blake3 of the trace: every fault, acknowledgement, leader and final digest, with the
    /// simulated time of each. The same seed gives the same hash.
    pub trace_hash: String,
    pub acknowledged: u64,
    pub faults: u64,
    /// Snapshots built or installed and log purges, over all nodes.
    pub snapshots: u64,
    /// State stores a crash left holding a checkpoint, over all crashes: each reopened by its
    /// node, which re-applied its log after that checkpoint.
    pub stores_kept: u64,
    pub steps: u64,
}

/// What the simulated hosts and the simulator share. Everything runs on the simulator's
/// thread; the locks are for the types' sake.
pub struct World {
    pub options: Options,
    /// How many times each node has booted, by id.
    boots: BTreeMap<u64, AtomicU64>,
    /// Each running node, as its host last booted it. Weak: a crashed host's runtime drops the
    /// node, and the simulator must not keep it (and its state store) alive.
    nodes: Mutex<BTreeMap<u64, Weak<NodeHandle>>>,
    pub trace: Mutex<Trace>,
    /// Transfers the client was told are created.
    pub acknowledged: AtomicU64,
    /// State stores crashes left holding a checkpoint (`Outcome::stores_kept`).
    pub stores_kept: AtomicU64,
    /// How far each node's machine clock is off, in ms (the clock faults).
    pub skews: Mutex<BTreeMap<u64, i64>>,
    /// Nodes that stopped on a failed disk, and when: a supervisor restarts them.
    pub stopped: Mutex<BTreeMap<u64, Duration>>,
    /// Membership, as the operator (the simulator) changed it.
    pub membership: Mutex<Membership>,
    /// To the operator on the client host: remove this voter (`tally cluster remove`).
    pub removals: tokio::sync::mpsc::UnboundedSender<u64>,
}

/// The voters as the operator changed them, and the spare host: a node's host kept down, with a
/// wiped disk, until the operator brings it in (`faults::Kind::Membership`).
#[derive(Debug, Default)]
pub struct Membership {
    pub voters: std::collections::BTreeSet<u64>,
    /// The host kept down until it joins, if one is.
    pub spare: Option<u64>,
    /// Hosts whose disk is wiped at their next boot.
    pub wipe: std::collections::BTreeSet<u64>,
    /// Hosts that start with `join` (through a voter) until they are seen as voters.
    pub joining: std::collections::BTreeSet<u64>,
    /// Voters the operator has removed, not yet taken down.
    pub removed: Vec<u64>,
}

impl World {
    /// The node `id` as its host runs it now, if it is up.
    pub fn node(&self, id: u64) -> Option<Arc<NodeHandle>> {
        self.nodes.lock().unwrap().get(&id).and_then(Weak::upgrade)
    }

    /// Every host's node id: the voters the run starts with, and one spare.
    pub fn ids(&self) -> impl Iterator<Item = u64> + use<> {
        1..=self.options.nodes + 1
    }

    /// Records `event` in the trace at simulated time `at`.
    pub fn record(&self, at: Duration, event: std::fmt::Arguments<'_>) {
        self.trace.lock().unwrap().record(at, event, self.options.verbose);
    }
}

#[derive(Default)]
pub struct Trace {
    hasher: blake3::Hasher,
    pub events: u64,
}

impl Trace {
    fn record(&mut self, at: Duration, event: std::fmt::Arguments<'_>, print: bool) {
        let line = format!("{:>9.3}s {event}\n", at.as_secs_f64());
        if print {
            eprint!("{line}");
        }
        self.hasher.update(line.as_bytes());
        self.events += 1;
    }
}

/// The simulated time now, on a simulated host or in the simulator.
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn host_name(id: u64) -> String {
    format!("n{id}")
}

pub(crate) fn data_dir(id: u64) -> PathBuf {
    PathBuf::from(format!("/tally/n{id}"))
}

/// The node's configuration, as an operator would write it (`tally serve --config`). Node 1
/// bootstraps the first voters; a node brought in later joins through `join`.
fn node_config(id: u64, nodes: u64, seed: u64, join: Option<u64>) -> raft_node::node::NodeConfig {
    let mut text = format!(
        "id = {id}\nsite = \"site{id}\"\nlisten = \"0.0.0.0:{CLIENT_PORT}\"\nadvertise = \"n{id}:{CLIENT_PORT}\"\n\
         peer_listen = \"0.0.0.0:{PEER_PORT}\"\npeer_advertise = \"n{id}:{PEER_PORT}\"\ninsecure = true\n\
         data_dir = \"{}\"\ncluster = \"sim\"\n\
         # Snapshots often and a short log behind them, so that runs build, send, install\n\
         # and purge behind snapshots.\n\
         snapshot_entries = {snapshot_entries}\nsnapshot_log_keep = {log_keep}\nlog_keep_bytes = 0\n\
         log_keep_ms = 0\nwal_segment_bytes = 65536\ncache_bytes = 8388608\n",
        data_dir(id).display(),
        snapshot_entries = 300 + seed % 700,
        log_keep = seed % 200,
    );
    if let Some(member) = join {
        text.push_str(&format!("join = \"n{member}:{CLIENT_PORT}\"\n"));
    } else if id == 1 {
        text.push_str("bootstrap = true\n");
        for peer in 2..=nodes {
            text.push_str(&format!(
                "[[peers]]\nid = {peer}\naddress = \"n{peer}:{CLIENT_PORT}\"\npeer_address = \"n{peer}:{PEER_PORT}\"\nsite = \"site{peer}\"\n"
            ));
        }
    }
    toml::from_str(&text).expect("the simulator's node configuration parses")
}

/// One boot of node `id`: what its host runs, from start to crash. A node that stops because its
/// (simulated) disk failed ends its host's software, as `tally serve` exits; any other stop, or
/// a start refused, fails the run.
async fn boot(world: Arc<World>, id: u64) -> turmoil::Result {
    if world.membership.lock().unwrap().spare == Some(id) {
        // Down until the operator brings it in.
        return Ok(());
    }
    let boot = world.boots[&id].fetch_add(1, Ordering::Relaxed);
    world.stopped.lock().unwrap().remove(&id);
    world.record(now(), format_args!("n{id} boots ({boot})"));
    let (wiped, join) = {
        let mut membership = world.membership.lock().unwrap();
        let through = membership
            .voters
            .iter()
            .copied()
            .find(|voter| *voter != id && !membership.joining.contains(voter));
        (membership.wipe.remove(&id), membership.joining.contains(&id).then_some(through))
    };
    if wiped {
        wipe(&data_dir(id))?;
        world.record(now(), format_args!("n{id} starts on an empty disk"));
    }
    let join = match join {
        Some(Some(member)) => {
            world.record(now(), format_args!("n{id} joins through n{member}"));
            Some(member)
        }
        Some(None) => return Err(format!("node {id} has no voter to join through").into()),
        None => None,
    };
    let seed = world.options.seed ^ (id << 40) ^ (boot << 20);
    let stopped =
        openraft::rt::deterministic_rng::DeterministicRng::<openraft_rt_tokio::TokioRuntime>::scope(
            seed,
            serve(world.clone(), id, join),
        )
        .await;
    world.nodes.lock().unwrap().remove(&id);
    if stopped.contains("(simulated)") {
        world.record(now(), format_args!("n{id} {stopped}"));
        world.stopped.lock().unwrap().insert(id, now());
        return Ok(());
    }
    Err(format!("node {id} {stopped}").into())
}

/// Empties a simulated node's data directory, durably: a disk replaced.
fn wipe(dir: &Path) -> std::io::Result<()> {
    use raft_node::sys::fs;
    raft_node::sys::sim::wipe_stores(dir);
    if !raft_node::sys::is_dir(dir) {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if raft_node::sys::is_dir(&path) {
            wipe(&path)?;
            fs::remove_dir(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    raft_node::sys::sync_dir(dir)
}

/// Starts node `id` and serves until it stops; why it stopped.
async fn serve(world: Arc<World>, id: u64, join: Option<u64>) -> String {
    let config = node_config(id, world.options.nodes, world.options.seed, join);
    let node = match raft_node::node::start(config).await {
        Ok(node) => node,
        Err(error) => return format!("cannot start: {error}"),
    };
    let skew_ms = world.skews.lock().unwrap().get(&id).copied().unwrap_or(0);
    node.clock.set_skew(skew_ms, 0);
    world.nodes.lock().unwrap().insert(id, Arc::downgrade(&node));
    let listen = async {
        let clients = turmoil::net::TcpListener::bind(("0.0.0.0", CLIENT_PORT)).await?;
        let peers = turmoil::net::TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
        Ok::<_, std::io::Error>((clients, peers))
    };
    let (clients, peers) = match listen.await {
        Ok(listeners) => listeners,
        Err(error) => return format!("cannot listen: {error}"),
    };
    tokio::select! {
        served = raft_node::service::serve_on(node.clone(), clients, peers, std::future::pending()) => {
            format!("stopped serving: {served:?}")
        }
        error = raft_node::node::fatal(node.clone()) => format!("stops on a storage failure: {error}"),
    }
}

/// The simulated wall clock's start (turmoil's epoch), in ns since the Unix epoch.
pub const EPOCH_NS: u64 = 1_800_000_000 * 1_000_000_000;

/// Runs one simulation. Once per process: a simulation leaves state behind in the process (still
/// to be found; a seed run after another in the same process does not replay alone), so
/// `tally-sim` runs each seed in a process of its own.
pub fn run(options: &Options) -> Outcome {
    raft_node::sys::sim::seed(options.seed);
    // Disks drawn from the seed, fast, ordinary or slow to fsync: the same on every node, or
    // (one seed in two from 27 on) one of each, as sites' disks differ; a node on a slow disk
    // then follows a majority that commits ahead of what it has synced.
    let mixed = options.seed / 27 % 2;
    for id in 1..=options.nodes + 1 {
        let fsync_us_max = [1_000, 5_000, 20_000][(options.seed.wrapping_add(id * mixed) % 3) as usize];
        raft_node::sys::sim::set_fsync_us(&data_dir(id), 100, fsync_us_max);
    }
    // The committed id written as in production, or far more often, so that a crash right after
    // writing it (the write-crash fault) comes at the moments where it could name too much.
    let committed_every_ms = [200, 20, 0][(options.seed / 9 % 3) as usize];
    raft_node::sys::sim::set_committed_persist_interval(Duration::from_millis(committed_every_ms));
    let (removals, to_remove) = tokio::sync::mpsc::unbounded_channel();
    let world = Arc::new(World {
        options: options.clone(),
        boots: (1..=options.nodes + 1).map(|id| (id, AtomicU64::new(0))).collect(),
        nodes: Mutex::new(BTreeMap::new()),
        trace: Mutex::new(Trace::default()),
        acknowledged: AtomicU64::new(0),
        stores_kept: AtomicU64::new(0),
        skews: Mutex::new(BTreeMap::new()),
        stopped: Mutex::new(BTreeMap::new()),
        membership: Mutex::new(Membership {
            voters: (1..=options.nodes).collect(),
            spare: Some(options.nodes + 1),
            ..Membership::default()
        }),
        removals,
    });
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(options.seed)
        .simulation_duration(options.sim_time + CONVERGE_WITHIN + Duration::from_secs(30))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(500))
        .max_message_latency(Duration::from_millis(5))
        .tcp_capacity(1 << 16)
        .epoch(std::time::UNIX_EPOCH + Duration::from_nanos(EPOCH_NS));
    // A crash tears the last unsynced writes at a block boundary drawn from the seed, or drops
    // them whole.
    if let Some(block) = [None, Some(512), Some(4096)][(options.seed / 3 % 3) as usize] {
        builder.fs().block_size(block);
    }
    let mut sim = builder.build();
    for id in world.ids() {
        let world = world.clone();
        sim.host(host_name(id), move || boot(world.clone(), id));
    }
    let results = Arc::new(Mutex::new(None));
    {
        let (world, results) = (world.clone(), results.clone());
        sim.client("client", async move {
            tokio::spawn(workload::operator(world.clone(), to_remove));
            let checked = workload::run(world).await;
            *results.lock().unwrap() = Some(checked);
            Ok(())
        });
    }
    let mut schedule = faults::Schedule::draw(options);
    let mut invariants = check::Invariants::default();
    let mut steps = 0u64;
    let failure = loop {
        steps += 1;
        let done = match sim.step() {
            Ok(done) => done,
            Err(error) => break Some(format!("a simulated host failed: {error}")),
        };
        let at = sim.elapsed();
        schedule.apply_due(at, &mut sim, &world);
        if let Err(broken) = invariants.check_step(&world, at) {
            break Some(broken);
        }
        if done {
            break match results.lock().unwrap().take() {
                Some(Ok(())) => None,
                Some(Err(broken)) => Some(broken),
                None => Some("the client stopped without a result".into()),
            };
        }
    };
    let failure = failure.or_else(|| {
        // Every node must come to the same state once nothing is in the way.
        let deadline = sim.elapsed() + CONVERGE_WITHIN;
        loop {
            if let Err(error) = sim.step() {
                return Some(format!("a simulated host failed: {error}"));
            }
            steps += 1;
            if let Err(broken) = invariants.check_step(&world, sim.elapsed()) {
                return Some(broken);
            }
            match check::converged(&world) {
                Ok(digest) => {
                    world.record(sim.elapsed(), format_args!("converged: {digest}"));
                    return None;
                }
                Err(why) if sim.elapsed() >= deadline => {
                    return Some(format!("the nodes did not converge within {CONVERGE_WITHIN:?}: {why}"));
                }
                Err(_) => {}
            }
        }
    });
    if let Some(failure) = &failure {
        world.record(sim.elapsed(), format_args!("FAILED: {failure}"));
    }
    let trace = world.trace.lock().unwrap();
    Outcome {
        failure,
        trace_hash: trace.hasher.finalize().to_hex()[..16].to_string(),
        acknowledged: invariants.acknowledged(&world),
        faults: schedule.applied,
        snapshots: invariants.snapshot_changes,
        stores_kept: world.stores_kept.load(Ordering::Relaxed),
        steps,
    }
}
