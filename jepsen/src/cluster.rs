//! The cluster under test: real `tally serve` processes on 127.0.0.1, each with its own port
//! and data directory, talking to each other only through the harness's proxies.
//!
//! Every node the run may ever have is planned up front (the initial ones and those that
//! membership churn will add), so that each process starts with a `--route` to every other
//! node through the proxy of that directed link. Clients reach nodes directly.
//!
//! Each node's data directory is a disk of its own: a `faultfs` mount, so that a power cut loses
//! what that node had not fsynced (`Cluster::power_cut`).
//!
//! TLS is on, as in production: the run makes its own CA and certificates with `tally certs`
//! (beside the logs), every node serves both doors with its node certificate, and the harness's
//! clients call as an operator.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tally_client::{Client, Security, v1};

use faultfs::{FaultFs, PowerCut};

use crate::proxy::Proxies;

/// How long a node may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `tally serve`'s exit code when its storage failed (`raft_node::node::EXIT_STORAGE_FAILED`).
const EXIT_STORAGE_FAILED: u8 = 74;
/// `tally serve`'s exit code when it cannot read its own data back
/// (`raft_node::node::EXIT_DATA_UNREADABLE`).
pub const EXIT_DATA_UNREADABLE: i32 = 65;

/// Every node's `--clock-tolerance-ms`, which `timestamps-follow-real-time` holds them to.
pub const CLOCK_TOLERANCE_MS: u64 = 1000;
/// What each node's log keeps behind a snapshot (`--log-keep-bytes`, `--log-keep-time`).
const LOG_KEEP_BYTES: &str = "64MiB";
const LOG_KEEP_TIME: &str = "30s";
/// WAL segments roll over at this size in chaos runs (64 MiB in production): at 2,000
/// transfers/s a node rolls a segment every few seconds, so that faults (and the
/// `power-cut-roll` nemesis) land in rolls. Under `--load`, `wal_segment_bytes_for` instead.
pub const WAL_SEGMENT_BYTES: &str = "1MiB";
pub const WAL_SEGMENT_FLAG: &str = "--wal-segment-bytes";

/// WAL segments for a background load of `rate` transfers/s: about two seconds of it each
/// (~128 bytes a transfer), between 1 and 64 MiB, so that rolls stay seconds apart. At rush hour
/// 1 MiB segments rolled several times a second and made thousands of files a restart opens
/// (issue 24: 3.1 s on average to open a log, over FUSE).
pub fn wal_segment_bytes_for(rate: f64) -> String {
    let bytes = (rate.max(0.0) * 256.0) as u64;
    let mib = bytes.div_ceil(1 << 20).next_power_of_two().clamp(1, 64);
    format!("{mib}MiB")
}

/// Whether `args` already set `flag` (as two arguments or as `flag=value`).
pub fn sets_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|arg| arg == flag || arg.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
}

/// The name every node of a run shares (`--cluster`).
const CLUSTER_NAME: &str = "jepsen";
/// The semantics version the previous build knows, which the `upgrade` nemesis upgrades from:
/// one below the newest the binary under test knows (`ledger::semantics::MAX`; a node started
/// with a cap it does not know refuses to start, so a stale value here fails loudly).
const PREVIOUS_SEMANTICS: u32 = 1;

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: u64,
    pub site: String,
    /// The client door: clients and operators (the workload, the nemeses) call it directly.
    pub address: SocketAddr,
    /// The peer door: other nodes reach it only through the proxies (`--route`).
    pub peer_address: SocketAddr,
    /// Its Prometheus metrics (`--metrics-listen`; `sampler`).
    pub metrics_address: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

pub struct Cluster {
    binary: PathBuf,
    /// Where each node's clock-skew file is (`--clock-skew-file`, the `clock` nemesis): beside
    /// the logs, not on the node's disk.
    skew_dir: PathBuf,
    /// Every planned node, started or not.
    pub nodes: BTreeMap<u64, NodeSpec>,
    /// Voters as the harness last changed them.
    pub members: BTreeSet<u64>,
    processes: BTreeMap<u64, Child>,
    paused: BTreeSet<u64>,
    /// Nodes removed from the cluster (or never admitted); never started again.
    retired: BTreeSet<u64>,
    pub proxies: Proxies,
    /// Flags added to every `serve`.
    extra_args: Vec<String>,
    /// The run's CA and certificates (`tally certs`).
    certs: PathBuf,
    /// How the harness's clients connect: as the run's operator.
    pub security: Security,
    /// Nodes whose disk fails now (`disk_fault`), and those whose disk ever failed.
    disk_failing: BTreeSet<u64>,
    disk_faulted: BTreeSet<u64>,
    /// Nodes whose files the `corrupt` nemesis damaged, until its heal has looked at them: a
    /// refusal to start is what they should do, not a crash.
    damaged: BTreeSet<u64>,
    /// Nodes the `corrupt` nemesis damaged and that still run on those files (until wiped):
    /// damage it did not notice at start may surface later, and stopping on it is right.
    ever_damaged: BTreeSet<u64>,
    /// Nodes that run the previous build (`--semantics-max` one below the current build's),
    /// until the `upgrade` nemesis replaces them.
    old_build: BTreeSet<u64>,
    /// Each node's disk, mounted on its data directory. Declared last: unmounted after the
    /// processes are gone.
    disks: BTreeMap<u64, FaultFs>,
}

/// The operator the harness's clients call as.
const OPERATOR: &str = "jepsen";

/// Makes a CA, a certificate for each node and one for the harness's operator in `dir` with
/// `tally certs`, as an operator would; returns how clients connect with them.
fn make_certificates(
    binary: &Path,
    dir: &Path,
    nodes: impl Iterator<Item = u64>,
) -> Result<Security, String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let output = Command::new(binary)
            .arg("certs")
            .args(args)
            .arg("--dir")
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run {} certs: {e}", binary.display()))?;
        if !output.status.success() {
            return Err(format!(
                "tally certs {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    };
    run(&["ca", "--name", CLUSTER_NAME])?;
    for id in nodes {
        run(&["node", "--id", &id.to_string(), "--host", "127.0.0.1"])?;
    }
    run(&["operator", "--name", OPERATOR])?;
    Security::from_files(
        &dir.join("ca.pem"),
        Some((&dir.join(format!("operator-{OPERATOR}.pem")), &dir.join(format!("operator-{OPERATOR}.key")))),
    )
}

/// Node ports come from below Linux's ephemeral range (32768 and up), so that the proxies'
/// and clients' outgoing connections cannot take a node's port while it is down.
const NODE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// `count` ports of `NODE_PORTS` that are free now, starting at a place that depends on this
/// process, so that runs side by side rarely collide.
fn free_addresses(count: usize) -> Result<Vec<SocketAddr>, String> {
    let span = NODE_PORTS.end - NODE_PORTS.start;
    let start = (std::process::id() as u64 * 7919 % u64::from(span)) as u16;
    let mut found = Vec::new();
    for offset in 0..span {
        if found.len() == count {
            break;
        }
        let port = NODE_PORTS.start + (start + offset) % span;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(address).is_ok() {
            found.push(address);
        }
    }
    if found.len() < count {
        return Err(format!("only {} free ports in {NODE_PORTS:?} on 127.0.0.1", found.len()));
    }
    Ok(found)
}

/// Site names: "site-a", "site-b", ...
pub fn site_name(index: usize) -> String {
    let letter = (b'a' + (index % 26) as u8) as char;
    if index < 26 { format!("site-{letter}") } else { format!("site-{letter}{}", index / 26) }
}

impl Cluster {
    /// Plans `layout[i]` nodes in site i plus `spares` nodes for churn (each in a new site),
    /// starts the proxies, and starts the initial nodes, node 1 bootstrapping.
    pub async fn start(
        binary: &Path,
        layout: &[usize],
        spares: usize,
        data_root: &Path,
        logs: &Path,
        extra_args: Vec<String>,
        old_build: bool,
    ) -> Result<Cluster, String> {
        let mut nodes = BTreeMap::new();
        let mut plan: Vec<String> = Vec::new();
        for (index, count) in layout.iter().enumerate() {
            plan.extend(std::iter::repeat_n(site_name(index), *count));
        }
        let initial = plan.len();
        plan.extend((0..spares).map(|spare| site_name(layout.len() + spare)));
        let mut addresses = free_addresses(plan.len() * 3)?.into_iter();
        for (index, site) in plan.into_iter().enumerate() {
            let id = index as u64 + 1;
            let (address, peer_address) = (addresses.next().unwrap(), addresses.next().unwrap());
            let spec = NodeSpec {
                id,
                site,
                address,
                peer_address,
                metrics_address: addresses.next().unwrap(),
                data_dir: data_root.join(format!("node-{id}")),
                log: logs.join(format!("node-{id}.log")),
            };
            nodes.insert(id, spec);
        }
        let mut disks = BTreeMap::new();
        for spec in nodes.values() {
            std::fs::create_dir_all(&spec.data_dir)
                .map_err(|e| format!("cannot create {}: {e}", spec.data_dir.display()))?;
            let disk = FaultFs::mount(&spec.data_dir).map_err(|e| {
                format!("cannot mount faultfs on {} (needs root and /dev/fuse): {e}", spec.data_dir.display())
            })?;
            disks.insert(spec.id, disk);
        }
        let certs = logs.join("certs");
        let security = make_certificates(binary, &certs, nodes.keys().copied())?;
        let targets = nodes.values().map(|n| (n.id, n.peer_address)).collect();
        let proxies = Proxies::start(&targets).await?;
        let members: BTreeSet<u64> = (1..=initial as u64).collect();
        let mut cluster = Cluster {
            binary: binary.to_path_buf(),
            skew_dir: logs.to_path_buf(),
            nodes,
            members: members.clone(),
            processes: BTreeMap::new(),
            paused: BTreeSet::new(),
            retired: BTreeSet::new(),
            proxies,
            extra_args,
            certs,
            security,
            disk_failing: BTreeSet::new(),
            disk_faulted: BTreeSet::new(),
            damaged: BTreeSet::new(),
            ever_damaged: BTreeSet::new(),
            old_build: if old_build { members.clone() } else { BTreeSet::new() },
            disks,
        };
        for id in members {
            cluster.spawn(id, id == 1)?;
        }
        Ok(cluster)
    }

    fn command(&self, id: u64, bootstrap: bool) -> Result<Command, String> {
        let spec = &self.nodes[&id];
        let mut command = Command::new(&self.binary);
        command.args(["serve", "--cluster", CLUSTER_NAME, "--id", &id.to_string(), "--site", &spec.site]);
        command.args([
            "--listen",
            &spec.address.to_string(),
            "--peer-listen",
            &spec.peer_address.to_string(),
        ]);
        command.arg("--data-dir").arg(&spec.data_dir);
        command.arg("--ca").arg(self.certs.join("ca.pem"));
        command.arg("--cert").arg(self.certs.join(format!("node-{id}.pem")));
        command.arg("--key").arg(self.certs.join(format!("node-{id}.key")));
        command.args(["--clock-tolerance-ms", &CLOCK_TOLERANCE_MS.to_string()]);
        command.arg("--clock-skew-file").arg(self.skew_file(id));
        if !sets_flag(&self.extra_args, "--metrics-listen") {
            command.args(["--metrics-listen", &spec.metrics_address.to_string()]);
        }
        if !sets_flag(&self.extra_args, WAL_SEGMENT_FLAG) {
            command.args([WAL_SEGMENT_FLAG, WAL_SEGMENT_BYTES]);
        }
        // The log behind a snapshot is kept for 30 s, not a production node's 15 minutes or
        // 4 GiB: faults last seconds (and when every disk lived in this process's memory, the
        // defaults filled 23 GiB at 38,000 transfers/s and the harness was killed for it).
        command.args(["--log-keep-bytes", LOG_KEEP_BYTES, "--log-keep-time", LOG_KEEP_TIME]);
        for other in self.nodes.keys().filter(|other| **other != id) {
            command.args(["--route", &format!("{other}={}", self.proxies.address(id, *other))]);
        }
        if bootstrap {
            command.arg("--bootstrap");
            for peer in self.members.iter().filter(|peer| **peer != id) {
                let peer = &self.nodes[peer];
                let addresses = format!("{},{}", peer.address, peer.peer_address);
                command.args(["--peer", &format!("{}={addresses}@{}", peer.id, peer.site)]);
            }
        }
        command.args(&self.extra_args);
        if self.old_build.contains(&id) {
            command.args(["--semantics-max", &PREVIOUS_SEMANTICS.to_string()]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| format!("cannot open {}: {e}", spec.log.display()))?;
        command.stdout(Stdio::null()).stderr(log);
        Ok(command)
    }

    /// Starts node `id`'s process (it must not be running).
    pub fn spawn(&mut self, id: u64, bootstrap: bool) -> Result<(), String> {
        let child = self
            .command(id, bootstrap)?
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.processes.insert(id, child);
        Ok(())
    }

    /// Starts every member that is not running and resumes every paused one.
    pub fn revive_all(&mut self) -> Result<Vec<u64>, String> {
        let mut revived = Vec::new();
        // A process that died and was not reaped yet counts as not running.
        let dead: Vec<u64> = self
            .processes
            .iter_mut()
            .filter_map(|(id, child)| matches!(child.try_wait(), Ok(Some(_))).then_some(*id))
            .collect();
        for id in dead {
            self.processes.remove(&id);
        }
        for id in self.paused.clone() {
            self.resume(id);
            revived.push(id);
        }
        for id in self.members.clone() {
            if !self.is_running(id) {
                self.spawn(id, false)?;
                revived.push(id);
            }
        }
        Ok(revived)
    }

    /// Whether node `id` still runs the previous build.
    pub fn runs_old_build(&self, id: u64) -> bool {
        self.old_build.contains(&id)
    }

    /// Node `id` runs the current build from its next start.
    pub fn upgrade(&mut self, id: u64) {
        self.old_build.remove(&id);
    }

    /// SIGKILL: the node stops dead, as in a power cut.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.processes.remove(&id) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused.remove(&id);
    }

    /// A power cut of these nodes: SIGKILL, then each one's disk loses what was not fsynced (and
    /// may tear its last unsynced write, as drawn from `seed`). Restart them with `spawn`.
    pub fn power_cut(&mut self, ids: &[u64], seed: u64) -> Vec<(u64, PowerCut)> {
        for id in ids {
            self.kill(*id);
        }
        ids.iter()
            .filter_map(|id| {
                let disk = self.disks.get(id)?;
                Some((*id, disk.power_cut(Some(seed ^ id))))
            })
            .collect()
    }

    /// Arms a trip wire on node `id`'s disk (`faultfs::FaultFs::arm`): once it goes off, every
    /// change to the disk fails until `power_cut`.
    pub fn arm_power_cut(
        &self,
        id: u64,
        matches: impl Fn(faultfs::Change, &std::ffi::OsStr) -> bool + Send + 'static,
        after: u32,
    ) {
        if let Some(disk) = self.disks.get(&id) {
            disk.arm(matches, after);
        }
    }

    /// Makes node `id`'s fsyncs take `delay` (`faultfs::FaultFs::slow_syncs`) until its next
    /// power cut.
    pub fn slow_syncs(&self, id: u64, delay: Option<Duration>) {
        if let Some(disk) = self.disks.get(&id) {
            disk.slow_syncs(delay);
        }
    }

    /// Whether node `id`'s trip wire went off.
    pub fn tripped(&self, id: u64) -> bool {
        self.disks.get(&id).is_some_and(FaultFs::tripped)
    }

    pub fn disarm(&self, id: u64) {
        if let Some(disk) = self.disks.get(&id) {
            disk.disarm();
        }
    }

    fn skew_file(&self, id: u64) -> PathBuf {
        self.skew_dir.join(format!("node-{id}.clock"))
    }

    /// Makes node `id`'s clock read `offset_ms` off, drifting `drift_ppm` from now on; (0, 0)
    /// puts it right. The node picks it up within 100 ms.
    pub fn skew_clock(&self, id: u64, offset_ms: i64, drift_ppm: i64) -> Result<(), String> {
        let path = self.skew_file(id);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, format!("{offset_ms} {drift_ppm}\n"))
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Deletes every file of node `id`'s data directory (it must be stopped) and makes the
    /// deletion durable: its disk was lost and replaced with an empty one. Returns how many
    /// files and directories were deleted.
    pub fn wipe(&mut self, id: u64) -> Result<usize, String> {
        self.ever_damaged.remove(&id);
        let dir = &self.nodes[&id].data_dir;
        let failed = |e: std::io::Error| format!("cannot wipe {}: {e}", dir.display());
        let mut deleted = 0;
        for entry in std::fs::read_dir(dir).map_err(failed)? {
            let path = entry.map_err(failed)?.path();
            deleted += walkdir_count(&path);
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(failed)?;
            } else {
                std::fs::remove_file(&path).map_err(failed)?;
            }
        }
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
        Ok(deleted)
    }

    /// Damages node `id`'s files at rest (it must be stopped): flips `flips` bytes, at offsets
    /// drawn from `seed`, in one of its WAL segments or its state store's files, chosen by `seed`, and makes
    /// the damage durable. Returns what it did.
    pub fn corrupt(&mut self, id: u64, seed: u64, flips: usize) -> Result<String, String> {
        use rand::{Rng, SeedableRng};
        let dir = self.nodes[&id].data_dir.clone();
        let mut files: Vec<PathBuf> = Vec::new();
        collect_files(&dir.join("wal"), &mut files);
        collect_files(&dir.join("state"), &mut files);
        files.retain(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let wal_segment = name.ends_with(".wal");
            let state = path.starts_with(dir.join("state"));
            (wal_segment || state) && std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
        });
        files.sort();
        if files.is_empty() {
            return Ok(format!("node {id} has no WAL segment or state file to damage"));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let path = files[rng.random_range(0..files.len())].clone();
        let failed = |e: std::io::Error| format!("cannot damage {}: {e}", path.display());
        let mut bytes = std::fs::read(&path).map_err(failed)?;
        let mut offsets = Vec::new();
        for _ in 0..flips {
            let offset = rng.random_range(0..bytes.len());
            bytes[offset] ^= rng.random_range(1..=255u8);
            offsets.push(offset);
        }
        offsets.sort_unstable();
        std::fs::write(&path, &bytes)
            .and_then(|()| std::fs::File::open(&path)?.sync_all())
            .map_err(failed)?;
        self.damaged.insert(id);
        self.ever_damaged.insert(id);
        let shown = path.strip_prefix(&dir).unwrap_or(&path).display().to_string();
        Ok(format!("node {id}: {flips} bytes flipped in {shown} ({} bytes) at {offsets:?}", bytes.len()))
    }

    /// After `corrupt`: the node's exit code if it stopped (a refusal to start is 65), or `None`
    /// while it runs. From then on an exit is a crash again.
    pub fn damage_outcome(&mut self, id: u64) -> Option<Option<i32>> {
        self.damaged.remove(&id);
        let status = self.processes.get_mut(&id)?.try_wait().ok()??;
        self.processes.remove(&id);
        Some(status.code())
    }

    /// Makes every write and fsync of node `id`'s disk fail with `fault`, or succeed again. A
    /// node that exits while its disk fails is doing what it should (stop rather than go on
    /// without durability): `exited` does not report it as a crash.
    pub fn disk_fault(&mut self, id: u64, fault: Option<faultfs::Fault>) {
        if let Some(disk) = self.disks.get(&id) {
            disk.fail(fault);
        }
        if fault.is_some() {
            self.disk_failing.insert(id);
            self.disk_faulted.insert(id);
        } else {
            self.disk_failing.remove(&id);
        }
    }

    /// Forgets node `id`'s process if it has exited; returns whether it had.
    pub fn take_exited(&mut self, id: u64) -> bool {
        let exited = self.processes.get_mut(&id).is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))));
        if exited {
            self.processes.remove(&id);
        }
        exited
    }

    /// SIGTERM and wait, asynchronously: a graceful stop (for a node removed from the
    /// cluster, which is never started again). Returns how long the node took, or `None` if it had to be killed after
    /// `STOP_GRACE`.
    pub async fn stop(&mut self, id: u64) -> Option<Duration> {
        self.resume(id);
        self.retired.insert(id);
        let mut child = self.processes.remove(&id)?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < STOP_GRACE {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// SIGSTOP: the process freezes with its sockets open, like a machine that hangs.
    pub fn pause(&mut self, id: u64) {
        if let Some(child) = self.processes.get(&id) {
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
            self.paused.insert(id);
        }
    }

    pub fn resume(&mut self, id: u64) {
        if self.paused.remove(&id)
            && let Some(child) = self.processes.get(&id)
        {
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
    }

    /// The next planned node that has never run, for membership churn.
    pub fn spare(&self) -> Option<u64> {
        self.nodes.keys().copied().find(|id| {
            !self.members.contains(id) && !self.retired.contains(id) && !self.processes.contains_key(id)
        })
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.processes.contains_key(&id)
    }

    /// Processes that exited on their own (a crash): id and exit status. A node whose disk is
    /// failing is left alone: the heal restarts it. A node that stopped on a storage error
    /// (exit code `EXIT_STORAGE_FAILED`) after its disk failed, or after it found damage the
    /// `corrupt` nemesis left in its files, is what it should do, and not a crash: it is
    /// restarted at once, as a supervisor would (its log says so).
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut exited = Vec::new();
        let mut stopped = Vec::new();
        for (id, child) in self.processes.iter_mut() {
            if self.disk_failing.contains(id) || self.damaged.contains(id) {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let expected = self.disk_faulted.contains(id) || self.ever_damaged.contains(id);
                if status.code() == Some(i32::from(EXIT_STORAGE_FAILED)) && expected {
                    stopped.push(*id);
                } else {
                    exited.push((*id, status.to_string()));
                }
            }
        }
        for id in stopped {
            self.processes.remove(&id);
            if self.members.contains(&id) {
                // If this fails, the node stays down and the final revive retries it.
                let _ = self.spawn(id, false);
            }
        }
        for (id, _) in &exited {
            self.processes.remove(id);
        }
        exited
    }

    /// Members by site.
    pub fn sites(&self) -> BTreeMap<String, Vec<u64>> {
        let mut sites: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for id in &self.members {
            sites.entry(self.nodes[id].site.clone()).or_default().push(*id);
        }
        sites
    }

    pub fn site_of(&self) -> BTreeMap<u64, String> {
        self.nodes.values().map(|n| (n.id, n.site.clone())).collect()
    }

    pub fn address(&self, id: u64) -> String {
        self.nodes[&id].address.to_string()
    }

    /// A client of the given nodes, trying them in that order.
    pub fn client_of(&self, ids: &[u64], timeout: Duration) -> Result<Client, String> {
        let addresses: Vec<String> = ids.iter().map(|id| self.address(*id)).collect();
        Client::new(&addresses, timeout, &self.security)
    }

    /// The leader, as the running members see it, if one answers within `timeout`.
    pub async fn leader(&self, timeout: Duration) -> Option<u64> {
        let running: Vec<u64> = self
            .members
            .iter()
            .copied()
            .filter(|id| self.is_running(*id) && !self.paused.contains(id))
            .collect();
        if running.is_empty() {
            return None;
        }
        let client = self.client_of(&running, timeout).ok()?;
        let status = client.cluster_status().await.ok()?;
        (status.leader_id != 0).then_some(status.leader_id)
    }

    /// Each running member's own status.
    pub async fn statuses(&self) -> BTreeMap<u64, v1::NodeStatus> {
        let mut statuses = BTreeMap::new();
        let running: Vec<u64> = self.members.iter().copied().filter(|id| self.is_running(*id)).collect();
        let Ok(client) = self.client_of(&running, Duration::from_secs(1)) else { return statuses };
        for id in running {
            if let Ok(status) = client.node_status(&self.address(id)).await {
                statuses.insert(id, status);
            }
        }
        statuses
    }

    /// Waits until every member answers with the same applied index and digest; returns their
    /// statuses, or `Err` with the last statuses seen when `deadline` passes.
    pub async fn converge(&self, deadline: Duration) -> Result<BTreeMap<u64, v1::NodeStatus>, String> {
        let started = Instant::now();
        loop {
            let statuses = self.statuses().await;
            if statuses.len() == self.members.len()
                && let Some(first) = statuses.values().next()
                && first.applied_index > 0
                && statuses
                    .values()
                    .all(|s| s.applied_index == first.applied_index && s.state_digest == first.state_digest)
            {
                return Ok(statuses);
            }
            if started.elapsed() >= deadline {
                let seen: Vec<String> = statuses
                    .values()
                    .map(|s| format!("node {} applied {} digest {}", s.id, s.applied_index, s.state_digest))
                    .collect();
                return Err(format!(
                    "members {:?} did not converge within {deadline:?}; saw: {}",
                    self.members,
                    seen.join("; ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Every regular file under `dir`, recursively.
fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, files);
        } else {
            files.push(path);
        }
    }
}

/// Files and directories at and under `path`.
fn walkdir_count(path: &Path) -> usize {
    match std::fs::read_dir(path) {
        Ok(entries) => 1 + entries.filter_map(Result::ok).map(|e| walkdir_count(&e.path())).sum::<usize>(),
        Err(_) => 1,
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.processes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn site_names_are_distinct() {
        let names: std::collections::BTreeSet<String> = (0..60).map(super::site_name).collect();
        assert_eq!(names.len(), 60);
        assert_eq!(super::site_name(0), "site-a");
    }

    #[test]
    fn segments_hold_about_two_seconds_of_load() {
        use super::wal_segment_bytes_for as segment;
        assert_eq!(
            (segment(0.0), segment(2_000.0), segment(30_900.0)),
            ("1MiB".into(), "1MiB".into(), "8MiB".into())
        );
        assert_eq!((segment(46_300.0), segment(1e9)), ("16MiB".into(), "64MiB".into()));
    }

    #[test]
    fn a_flag_given_by_the_caller_is_seen_in_either_form() {
        let args = |list: &[&str]| list.iter().map(|arg| arg.to_string()).collect::<Vec<_>>();
        let flag = super::WAL_SEGMENT_FLAG;
        assert!(super::sets_flag(&args(&["--wal-segment-bytes", "2MiB"]), flag));
        assert!(super::sets_flag(&args(&["--wal-segment-bytes=2MiB"]), flag));
        assert!(!super::sets_flag(&args(&["--wal-segment-bytes-max=2MiB", "--load"]), flag));
    }
}
