//! The nemesis: faults on a seeded schedule, one at a time, each held for a while and then
//! healed, with quiet time between them for the cluster to recover.
//!
//! The schedule (which fault, when, for how long, and the random number that picks its target)
//! is drawn from the seed before the run starts, so a run is reproducible from its seed; only
//! targets that depend on the cluster's state (the leader) are read at the time. Faults come in
//! rounds: each round is a fresh shuffle of the chosen faults, so every fault is exercised.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tally_client::v1;
use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::history::Phase;
use crate::workload::Recorder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL every node of one site; restart them when healed.
    KillSite,
    /// The same, for the site of the current leader.
    KillLeaderSite,
    /// SIGSTOP every node of one site; SIGCONT when healed.
    PauseSite,
    /// Cut every link between one site and the others: both ways, or only inbound, or only
    /// outbound (chosen by the seed).
    CutSite,
    /// Cut every link of the current leader, both ways.
    CutLeader,
    /// Add a node in a new site, then remove another node, under load.
    Churn,
    /// SIGKILL every node at once; restart them all when healed. The kernel keeps each node's
    /// unsynced writes (the page cache survives a process kill).
    KillAll,
    /// Cut the power of every node: SIGKILL, and each node's disk loses everything it had not
    /// fsynced (a torn last write included); restart them all when healed.
    PowerCut,
    /// The same for the nodes of one site.
    PowerCutSite,
    /// Cut the power of one node (the leader's, every other time) in the middle of a WAL
    /// segment roll: a few changes after it creates its next segment (chaos runs roll a segment
    /// every MiB).
    PowerCutRoll,
    /// Cut the power of one node right after it recorded its commit index (the `committed`
    /// file renamed into place and its directory synced), before its next log sync: the file
    /// must not name an entry the cut takes from its log.
    PowerCutCommit,
    /// Cut the power of a follower in the middle of a snapshot install: it loses its disk
    /// (`wipe`), the leader snapshots and purges its log, the follower is replaced and so must
    /// install the snapshot; the power goes while it receives the file, imports it, makes it
    /// current or swaps it in. Restarted, it must finish catching up by itself.
    PowerCutInstall,
    /// Every write and fsync of one node fails with ENOSPC; when healed the disk has room again
    /// and the node is restarted if it stopped.
    DiskFull,
    /// The same with EIO: the disk fails.
    DiskError,
    /// One node loses its disk: SIGKILL, every file of its data directory deleted, restarted
    /// empty under the same id. Its peers must refuse it (another incarnation) until the heal
    /// replaces it (`Cluster.ReplaceNode`), as an operator would.
    Wipe,
    /// One node's clock goes wrong: an hour ahead, an hour behind, 400 ms ahead (within the
    /// tolerance), or running 40% fast; the leader's, every other time. Put right when healed.
    Clock,
    /// One node's files are damaged at rest: SIGKILL, bytes flipped in one of its WAL segments
    /// or its state store's files, restarted. It must notice: either it recovers by itself, or it
    /// refuses to start (exit code 65) and the heal does what its message says (an empty data
    /// directory, then `cluster replace`). It must never serve or replicate the damage.
    Corrupt,
    /// A rolling upgrade: every node in turn (the leader last) is stopped and started on the
    /// current build, under load. With this nemesis the nodes start on the previous build (the
    /// binary with `--semantics-max` one version down), so the first time is an upgrade whose
    /// last step switches the cluster's rules; later times are rolling restarts.
    Upgrade,
}

impl Fault {
    pub const ALL: [Fault; 18] = [
        Fault::KillSite,
        Fault::KillLeaderSite,
        Fault::PauseSite,
        Fault::CutSite,
        Fault::CutLeader,
        Fault::Churn,
        Fault::KillAll,
        Fault::PowerCut,
        Fault::PowerCutSite,
        Fault::PowerCutRoll,
        Fault::PowerCutCommit,
        Fault::PowerCutInstall,
        Fault::DiskFull,
        Fault::DiskError,
        Fault::Wipe,
        Fault::Clock,
        Fault::Corrupt,
        Fault::Upgrade,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillSite => "kill-site",
            Fault::KillLeaderSite => "kill-leader-site",
            Fault::PauseSite => "pause-site",
            Fault::CutSite => "cut-site",
            Fault::CutLeader => "cut-leader",
            Fault::Churn => "churn",
            Fault::KillAll => "kill-all",
            Fault::PowerCut => "power-cut",
            Fault::PowerCutSite => "power-cut-site",
            Fault::PowerCutRoll => "power-cut-roll",
            Fault::PowerCutCommit => "power-cut-commit",
            Fault::PowerCutInstall => "power-cut-install",
            Fault::DiskFull => "disk-full",
            Fault::DiskError => "eio",
            Fault::Wipe => "wipe",
            Fault::Clock => "clock",
            Fault::Corrupt => "corrupt",
            Fault::Upgrade => "upgrade",
        }
    }

    /// "all", or a comma-separated list of names.
    pub fn parse_list(text: &str) -> Result<Vec<Fault>, String> {
        if text == "all" {
            return Ok(Fault::ALL.to_vec());
        }
        if text == "none" {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|name| {
                Fault::ALL.into_iter().find(|f| f.name() == name.trim()).ok_or_else(|| {
                    let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                    format!("unknown nemesis '{name}': use all, none, or some of {}", names.join(", "))
                })
            })
            .collect()
    }
}

/// One planned fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Since the run's workload started.
    pub at: Duration,
    pub fault: Fault,
    pub hold: Duration,
    /// Picks the target among the candidates at the time.
    pub pick: u64,
}

/// Timing of the schedule.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Quiet time before each fault: from, to.
    pub quiet: (Duration, Duration),
    /// How long each fault is held: from, to.
    pub hold: (Duration, Duration),
}

fn between(rng: &mut ChaCha8Rng, (low, high): (Duration, Duration)) -> Duration {
    if high <= low { low } else { rng.random_range(low..=high) }
}

/// The whole schedule for a run of `length`, leaving the last quiet period fault-free.
pub fn plan(faults: &[Fault], timing: Timing, length: Duration, seed: u64) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
    let mut schedule = Vec::new();
    let mut round: Vec<Fault> = Vec::new();
    let mut at = Duration::ZERO;
    if faults.is_empty() {
        return schedule;
    }
    loop {
        at += between(&mut rng, timing.quiet);
        let hold = between(&mut rng, timing.hold);
        if at + hold + timing.quiet.0 > length {
            return schedule;
        }
        if round.is_empty() {
            round = faults.to_vec();
            round.shuffle(&mut rng);
        }
        let fault = round.pop().expect("a round is refilled when empty");
        let hold = if matches!(fault, Fault::Churn | Fault::Upgrade) { Duration::ZERO } else { hold };
        schedule.push(Planned { at, fault, hold, pick: rng.random() });
        at += hold;
    }
}

/// The faults asked for that the schedule leaves out (the run is too short for them), in words.
pub fn unscheduled(faults: &[Fault], schedule: &[Planned], length: Duration) -> Option<String> {
    let left_out: Vec<&str> =
        faults.iter().filter(|f| !schedule.iter().any(|p| p.fault == **f)).map(|f| f.name()).collect();
    if left_out.is_empty() {
        return None;
    }
    Some(format!(
        "{} s leaves room for {} of the {} faults asked for; not run: {}. A longer --time-limit (or shorter \
         --quiet and --hold) runs them all.",
        length.as_secs(),
        faults.len() - left_out.len(),
        faults.len(),
        left_out.join(", ")
    ))
}

/// How long `power-cut-roll` and `power-cut-commit` wait for their node to reach the step.
const TRIP_WAIT: Duration = Duration::from_secs(30);
/// How long each fsync of the `power-cut-commit` node takes while the nemesis waits for it.
const COMMIT_SYNC_DELAY: Duration = Duration::from_millis(5);
/// How long `power-cut-install` waits for the snapshot install to reach the chosen step.
const INSTALL_WAIT: Duration = Duration::from_secs(60);

/// Whether a change to a name starts a step of a snapshot install.
type StepStart = fn(faultfs::Change, &str) -> bool;

/// The steps of a snapshot install a power cut can land in: what starts the step, and up to
/// how many changes into it the power goes.
const INSTALL_STEPS: [(&str, StepStart, u64); 4] = [
    (
        "receiving the file",
        |change, name| change == faultfs::Change::Create && name.starts_with("incoming-"),
        24,
    ),
    ("importing it", |change, name| change == faultfs::Change::Create && name == "state.new", 200),
    ("making it current", |change, name| change == faultfs::Change::Rename && name == "current.meta", 4),
    ("swapping it in", |change, name| change == faultfs::Change::Rename && name == "state.old", 6),
];

fn describe_cut(id: u64, cut: &faultfs::PowerCut) -> String {
    format!(
        "node {id} lost {} bytes in {} files and {} directories{}",
        cut.bytes_lost,
        cut.files_rolled_back,
        cut.directories_rolled_back,
        if cut.torn_bytes_kept > 0 {
            format!(", {} torn bytes kept", cut.torn_bytes_kept)
        } else {
            String::new()
        }
    )
}

/// Waits (up to `wait`) for node `id`'s armed trip wire, then cuts its power; `None` (and the
/// wire taken away) if it never went off.
async fn cut_when_tripped(cluster: &mut Cluster, id: u64, seed: u64, wait: Duration) -> Option<String> {
    let started = tokio::time::Instant::now();
    while !cluster.tripped(id) {
        if started.elapsed() > wait {
            cluster.disarm(id);
            cluster.slow_syncs(id, None);
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cuts = cluster.power_cut(&[id], seed);
    Some(cuts.iter().map(|(id, cut)| describe_cut(*id, cut)).collect::<Vec<_>>().join("; "))
}

/// `power-cut-install`: see `Fault::PowerCutInstall`.
async fn power_cut_install(
    cluster: &mut Cluster,
    leader: Option<u64>,
    pick_value: u64,
) -> Result<(String, Undo), String> {
    let followers: Vec<u64> = cluster.members.iter().copied().filter(|id| Some(*id) != leader).collect();
    let (Some(_), Some(id)) = (leader, pick(&followers, pick_value)) else {
        return Ok(("no leader, or no follower to install a snapshot on".into(), Undo::Nothing));
    };
    let (step, matches, most) = INSTALL_STEPS[((pick_value / 2) % INSTALL_STEPS.len() as u64) as usize];
    let after = ((pick_value / 8) % most) as u32;
    cluster.kill(id);
    let files = cluster.wipe(id)?;
    cluster.spawn(id, false)?;
    let others: Vec<u64> = cluster.members.iter().copied().filter(|other| *other != id).collect();
    let client = cluster.client_of(&others, Duration::from_secs(75))?;
    let snapshot = match client.take_snapshot(true).await {
        Ok(taken) => format!("leader snapshot at {}, log purged to {}", taken.index, taken.purged),
        Err(error) => format!("leader snapshot failed ({error})"),
    };
    cluster.arm_power_cut(id, move |change, name| matches(change, &name.to_string_lossy()), after);
    let replacing = tokio::spawn(async move { client.replace_node(id).await });
    let started = tokio::time::Instant::now();
    while !cluster.tripped(id) && !replacing.is_finished() && started.elapsed() < INSTALL_WAIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cut = if cluster.tripped(id) {
        let cut = cluster.power_cut(&[id], pick_value);
        cluster.spawn(id, false)?;
        format!("power cut {after} changes into {step}: {}; restarted", describe_cut(id, &cut[0].1))
    } else {
        cluster.disarm(id);
        format!("the install never reached {step} {after} changes in; no cut")
    };
    // The replacement goes on by itself after the restart (the node keeps its incarnation); the
    // heal replaces it again only if it did not finish.
    let replaced = match tokio::time::timeout(Duration::from_secs(90), replacing).await {
        Ok(Ok(Ok(_))) => "replacement finished".to_string(),
        Ok(Ok(Err(error))) => format!("replacement failed: {error}"),
        Ok(Err(error)) => format!("replacement task failed: {error}"),
        Err(_) => "replacement still running after 90 s".to_string(),
    };
    Ok((
        format!("node {id} lost its disk ({files} files), restarted empty; {snapshot}; {cut}; {replaced}"),
        Undo::Replace(id),
    ))
}

/// How long `upgrade` waits for each restarted node to answer before going on to the next.
const UPGRADE_NODE_WAIT: Duration = Duration::from_secs(30);
/// How long `upgrade` lets the cluster run between two nodes.
const UPGRADE_PAUSE: Duration = Duration::from_secs(1);

/// `upgrade`: see `Fault::Upgrade`.
async fn rolling_upgrade(cluster: &mut Cluster, leader: Option<u64>) -> Result<String, String> {
    let mut order: Vec<u64> = cluster.members.iter().copied().filter(|id| Some(*id) != leader).collect();
    order.extend(leader.filter(|id| cluster.members.contains(id)));
    let mut steps = Vec::new();
    for id in order {
        let was_old = cluster.runs_old_build(id);
        cluster.kill(id);
        cluster.upgrade(id);
        cluster.spawn(id, false)?;
        let client = cluster.client_of(&[id], Duration::from_secs(2))?;
        let address = cluster.address(id);
        let started = tokio::time::Instant::now();
        let answered = loop {
            if let Ok(status) = client.node_status(&address).await {
                break Some(status);
            }
            if started.elapsed() > UPGRADE_NODE_WAIT {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        steps.push(match answered {
            Some(status) => format!(
                "node {id}{} (knows semantics {}, applies {})",
                if was_old { " upgraded" } else { " restarted" },
                status.semantics_known,
                status.semantics_version
            ),
            None => format!("node {id} did not answer within {} s", UPGRADE_NODE_WAIT.as_secs()),
        });
        tokio::time::sleep(UPGRADE_PAUSE).await;
    }
    Ok(format!("rolling upgrade, the leader ({leader:?}) last: {}", steps.join("; ")))
}

/// Bytes the `corrupt` nemesis flips in one file.
const CORRUPT_FLIPS: usize = 16;

/// How to undo a fault.
enum Undo {
    Restart(Vec<u64>),
    /// Clear a node's disk fault, then restart it if it stopped.
    DiskHealthy(u64),
    Resume(Vec<u64>),
    Heal(Vec<(u64, u64)>),
    /// Replace a node that lost its disk.
    Replace(u64),
    /// Put a node's clock right.
    ClockRight(u64),
    /// See what a node with damaged files did, and repair it from its peers if it refused.
    Repair(u64),
    Nothing,
}

/// Runs the schedule until it ends or `stop` says so; every fault is healed before returning.
pub async fn run(
    schedule: Vec<Planned>,
    cluster: Arc<Mutex<Cluster>>,
    recorder: Arc<Recorder>,
    started: tokio::time::Instant,
    end: Duration,
    current: Arc<std::sync::Mutex<String>>,
) -> Result<(), String> {
    for planned in schedule {
        // A slow fault (churn waits for catch-up) can push the rest past the end: stop there.
        if started.elapsed() > end {
            break;
        }
        tokio::time::sleep_until(started + planned.at).await;
        let name = planned.fault.name();
        *current.lock().expect("not poisoned") = name.to_string();
        if matches!(planned.fault, Fault::Churn | Fault::Upgrade) {
            // A membership change takes a while (the new node catches up first), and so does a
            // rolling upgrade: the window opens when it begins and closes with what it did.
            let what = match planned.fault {
                Fault::Churn => "add a node in a new site, then remove another",
                _ => "stop and start every node on the current build, one at a time",
            };
            recorder.nemesis(name, Phase::Start, what.into()).await?;
            let (detail, _) = strike(&planned, &cluster).await?;
            recorder.nemesis(name, Phase::End, detail).await?;
        } else {
            let (detail, undo) = strike(&planned, &cluster).await?;
            recorder.nemesis(name, Phase::Start, detail).await?;
            tokio::time::sleep(planned.hold).await;
            let healed = heal(undo, &cluster).await?;
            recorder.nemesis(name, Phase::End, healed).await?;
        }
        current.lock().expect("not poisoned").clear();
    }
    Ok(())
}

/// The current leader, asking for up to five seconds (an election may be under way).
async fn find_leader(cluster: &Cluster) -> Option<u64> {
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(leader) = cluster.leader(Duration::from_secs(1)).await {
            return Some(leader);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn pick<T: Clone>(candidates: &[T], pick: u64) -> Option<T> {
    (!candidates.is_empty()).then(|| candidates[(pick % candidates.len() as u64) as usize].clone())
}

async fn strike(planned: &Planned, cluster: &Mutex<Cluster>) -> Result<(String, Undo), String> {
    let mut cluster = cluster.lock().await;
    let sites: BTreeMap<String, Vec<u64>> = cluster.sites();
    let site_names: Vec<String> = sites.keys().cloned().collect();
    let leader = match planned.fault {
        Fault::KillLeaderSite | Fault::CutLeader => find_leader(&cluster).await,
        Fault::Clock | Fault::PowerCutRoll | Fault::PowerCutCommit if planned.pick.is_multiple_of(2) => {
            find_leader(&cluster).await
        }
        Fault::PowerCutInstall | Fault::Upgrade => find_leader(&cluster).await,
        _ => None,
    };
    let chosen_site =
        |site: Option<String>| site.or_else(|| pick(&site_names, planned.pick)).unwrap_or_default();
    Ok(match planned.fault {
        Fault::Upgrade => (rolling_upgrade(&mut cluster, leader).await?, Undo::Nothing),
        Fault::KillSite | Fault::KillLeaderSite => {
            let site = chosen_site(leader.map(|id| cluster.nodes[&id].site.clone()));
            let nodes = sites.get(&site).cloned().unwrap_or_default();
            for id in &nodes {
                cluster.kill(*id);
            }
            let why = leader.map_or(String::new(), |id| format!(" (leader {id})"));
            (format!("SIGKILL {site}{why}: nodes {nodes:?}"), Undo::Restart(nodes))
        }
        Fault::PauseSite => {
            let site = chosen_site(None);
            let nodes = sites.get(&site).cloned().unwrap_or_default();
            for id in &nodes {
                cluster.pause(*id);
            }
            (format!("SIGSTOP {site}: nodes {nodes:?}"), Undo::Resume(nodes))
        }
        Fault::CutSite => {
            let site = chosen_site(None);
            let nodes = sites.get(&site).cloned().unwrap_or_default();
            let (outbound, inbound, how) = match planned.pick % 3 {
                0 => (true, true, "both ways"),
                1 => (false, true, "inbound only"),
                _ => (true, false, "outbound only"),
            };
            let links = cluster.proxies.links_across(&nodes, outbound, inbound);
            for (from, to) in &links {
                cluster.proxies.set(*from, *to, |s| s.cut = true);
            }
            (format!("cut {site} (nodes {nodes:?}) off, {how}: {} links", links.len()), Undo::Heal(links))
        }
        Fault::CutLeader => match leader {
            Some(id) => {
                let links = cluster.proxies.links_across(&[id], true, true);
                for (from, to) in &links {
                    cluster.proxies.set(*from, *to, |s| s.cut = true);
                }
                (format!("cut leader {id} off, both ways: {} links", links.len()), Undo::Heal(links))
            }
            None => ("no leader to cut off".into(), Undo::Nothing),
        },
        Fault::KillAll => {
            let nodes: Vec<u64> = cluster.members.iter().copied().collect();
            for id in &nodes {
                cluster.kill(*id);
            }
            (format!("SIGKILL every node: {nodes:?}"), Undo::Restart(nodes))
        }
        Fault::PowerCut | Fault::PowerCutSite => {
            let nodes: Vec<u64> = if planned.fault == Fault::PowerCut {
                cluster.members.iter().copied().collect()
            } else {
                let site = chosen_site(None);
                sites.get(&site).cloned().unwrap_or_default()
            };
            let cuts = cluster.power_cut(&nodes, planned.pick);
            let lost: Vec<String> = cuts.iter().map(|(id, cut)| describe_cut(*id, cut)).collect();
            (format!("power cut of nodes {nodes:?}: {}", lost.join("; ")), Undo::Restart(nodes))
        }
        Fault::PowerCutRoll | Fault::PowerCutCommit => {
            let members: Vec<u64> = cluster.members.iter().copied().collect();
            match leader.or_else(|| pick(&members, planned.pick / 2)) {
                Some(id) => {
                    let (when, after) = if planned.fault == Fault::PowerCutRoll {
                        let after = ((planned.pick / 16) % 6) as u32;
                        let roll = |change, name: &std::ffi::OsStr| {
                            change == faultfs::Change::Create && name.to_string_lossy().ends_with(".wal")
                        };
                        cluster.arm_power_cut(id, roll, after);
                        ("rolling its WAL to a new segment", after)
                    } else {
                        // The rename, then the directory's fsync: the file is durable. Syncs of
                        // milliseconds, as on a real disk, so that the log is written while the
                        // commit file syncs.
                        let commit = |change, name: &std::ffi::OsStr| {
                            change == faultfs::Change::Rename && name == "committed"
                        };
                        cluster.slow_syncs(id, Some(COMMIT_SYNC_DELAY));
                        cluster.arm_power_cut(id, commit, 2);
                        ("recording its commit index", 2)
                    };
                    let role = if leader == Some(id) { "leader " } else { "" };
                    match cut_when_tripped(&mut cluster, id, planned.pick, TRIP_WAIT).await {
                        Some(cut) => (
                            format!("{role}node {id}: power cut {after} changes into {when}: {cut}"),
                            Undo::Restart(vec![id]),
                        ),
                        None => (
                            format!(
                                "{role}node {id} was not {when} within {} s; no cut",
                                TRIP_WAIT.as_secs()
                            ),
                            Undo::Nothing,
                        ),
                    }
                }
                None => ("no member to cut".into(), Undo::Nothing),
            }
        }
        Fault::PowerCutInstall => power_cut_install(&mut cluster, leader, planned.pick).await?,
        Fault::DiskFull | Fault::DiskError => {
            let members: Vec<u64> = cluster.members.iter().copied().collect();
            match pick(&members, planned.pick) {
                Some(id) => {
                    let (fault, what) = if planned.fault == Fault::DiskFull {
                        (faultfs::Fault::DiskFull, "ENOSPC")
                    } else {
                        (faultfs::Fault::Io, "EIO")
                    };
                    cluster.disk_fault(id, Some(fault));
                    (format!("node {id}: every write and fsync fails with {what}"), Undo::DiskHealthy(id))
                }
                None => ("no member to fail".into(), Undo::Nothing),
            }
        }
        Fault::Churn => {
            let detail = churn(&mut cluster, planned.pick).await?;
            (detail, Undo::Nothing)
        }
        Fault::Clock => {
            let members: Vec<u64> = cluster.members.iter().copied().collect();
            match leader.or_else(|| pick(&members, planned.pick / 2)) {
                Some(id) => {
                    let (offset_ms, drift_ppm, what) = match (planned.pick / 2) % 4 {
                        0 => (3_600_000, 0, "an hour ahead"),
                        1 => (-3_600_000, 0, "an hour behind"),
                        2 => (400, 0, "400 ms ahead"),
                        _ => (0, 400_000, "running 40% fast"),
                    };
                    cluster.skew_clock(id, offset_ms, drift_ppm)?;
                    let role = if leader == Some(id) { "leader " } else { "" };
                    (format!("{role}node {id}'s clock is {what}"), Undo::ClockRight(id))
                }
                None => ("no member to skew".into(), Undo::Nothing),
            }
        }
        Fault::Corrupt => {
            let members: Vec<u64> = cluster.members.iter().copied().collect();
            match pick(&members, planned.pick) {
                Some(id) => {
                    cluster.kill(id);
                    let detail = cluster.corrupt(id, planned.pick, CORRUPT_FLIPS)?;
                    cluster.spawn(id, false)?;
                    (format!("{detail}; restarted"), Undo::Repair(id))
                }
                None => ("no member to damage".into(), Undo::Nothing),
            }
        }
        Fault::Wipe => {
            let members: Vec<u64> = cluster.members.iter().copied().collect();
            match pick(&members, planned.pick) {
                Some(id) => {
                    cluster.kill(id);
                    let files = cluster.wipe(id)?;
                    cluster.spawn(id, false)?;
                    (format!("node {id} lost its disk ({files} files); restarted empty"), Undo::Replace(id))
                }
                None => ("no member to wipe".into(), Undo::Nothing),
            }
        }
    })
}

async fn heal(undo: Undo, cluster: &Mutex<Cluster>) -> Result<String, String> {
    let mut cluster = cluster.lock().await;
    Ok(match undo {
        Undo::Restart(nodes) => {
            for id in &nodes {
                if cluster.members.contains(id) && !cluster.is_running(*id) {
                    cluster.spawn(*id, false)?;
                }
            }
            format!("restarted {nodes:?}")
        }
        Undo::DiskHealthy(id) => {
            let stopped = cluster.take_exited(id);
            cluster.disk_fault(id, None);
            if cluster.members.contains(&id) && !cluster.is_running(id) {
                cluster.spawn(id, false)?;
            }
            if stopped {
                format!("disk of node {id} healthy; it had stopped, restarted")
            } else {
                format!("disk of node {id} healthy")
            }
        }
        Undo::Resume(nodes) => {
            for id in &nodes {
                cluster.resume(*id);
            }
            format!("SIGCONT {nodes:?}")
        }
        Undo::Heal(links) => {
            for (from, to) in &links {
                cluster.proxies.set(*from, *to, |s| s.cut = false);
            }
            format!("healed {} links", links.len())
        }
        Undo::Replace(id) => replace(&cluster, id).await,
        Undo::Repair(id) => match cluster.damage_outcome(id) {
            None => format!("node {id} runs on its damaged files (it recovered by itself)"),
            Some(Some(crate::cluster::EXIT_DATA_UNREADABLE)) => {
                let files = cluster.wipe(id)?;
                cluster.spawn(id, false)?;
                let replaced = replace(&cluster, id).await;
                format!(
                    "node {id} refused to start on damaged data; emptied ({files} files), restarted; {replaced}"
                )
            }
            Some(code) => {
                // A crash on damaged data: restarted as any crash, and the checkers judge the rest.
                cluster.spawn(id, false)?;
                format!("node {id} exited with {code:?} on damaged data (not a refusal); restarted")
            }
        },
        Undo::ClockRight(id) => {
            cluster.skew_clock(id, 0, 0)?;
            format!("node {id}'s clock is right again")
        }
        Undo::Nothing => "nothing to heal".into(),
    })
}

/// `tally cluster replace --id ID`, through the other members, as an operator would run it.
async fn replace(cluster: &Cluster, id: u64) -> String {
    let others: Vec<u64> = cluster.members.iter().copied().filter(|other| *other != id).collect();
    // ReplaceNode waits for the node to catch up (up to a minute).
    let client = match cluster.client_of(&others, Duration::from_secs(75)) {
        Ok(client) => client,
        Err(error) => return format!("cannot replace node {id}: {error}"),
    };
    // Only a node that answers with the incarnation the membership records is done: one that
    // is still starting (not reachable) reports no incarnation, and must be replaced.
    if let Ok(status) = client.cluster_status().await
        && status.nodes.iter().any(|n| {
            n.id == id
                && n.role() == v1::NodeRole::Voter
                && n.reachable
                && n.incarnation != 0
                && n.incarnation == n.recorded_incarnation
        })
    {
        return format!("node {id} is a voter of its current incarnation: nothing to replace");
    }
    match client.replace_node(id).await {
        Ok(status) => {
            let role = status.nodes.iter().find(|n| n.id == id).map(|n| n.role().as_str_name());
            format!("replaced node {id}: {}", role.unwrap_or("not listed"))
        }
        Err(error) => format!("replacing node {id} failed: {error}"),
    }
}

/// Adds the next spare node (in its own new site) and removes another member.
async fn churn(cluster: &mut Cluster, pick_value: u64) -> Result<String, String> {
    let Some(spare) = cluster.spare() else {
        return Ok("no spare node left to add".into());
    };
    let site = cluster.nodes[&spare].site.clone();
    cluster.spawn(spare, false)?;
    let members: Vec<u64> = cluster.members.iter().copied().collect();
    // AddNode waits for the new node to catch up (up to a minute).
    let client = cluster.client_of(&members, Duration::from_secs(75))?;
    let request = v1::AddNodeRequest {
        id: spare,
        address: cluster.address(spare),
        peer_address: cluster.nodes[&spare].peer_address.to_string(),
        site: site.clone(),
        learner_only: false,
        force: false,
        // Asked of the node by the leader.
        incarnation: 0,
    };
    let added = client.add_node(request).await;
    let now_members = |status: &v1::StatusReply| {
        status.nodes.iter().any(|n| n.id == spare && n.role() == v1::NodeRole::Voter)
    };
    let joined = match &added {
        Ok(status) => now_members(status),
        Err(_) => client.cluster_status().await.is_ok_and(|s| now_members(&s)),
    };
    if !joined {
        // It may have stayed a learner: take it out again, so that it is not waited for.
        let _ = client.remove_node(v1::RemoveNodeRequest { id: spare, force: false }).await;
        cluster.stop(spare).await;
        let error = added.err().map_or("not in the membership".to_string(), |e| e.to_string());
        return Ok(format!("adding node {spare} in {site} failed: {error}"));
    }
    cluster.members.insert(spare);

    let mut candidates: Vec<u64> = cluster.members.iter().copied().filter(|id| *id != spare).collect();
    let first = (pick_value % candidates.len() as u64) as usize;
    candidates.rotate_left(first);
    let mut refusals = Vec::new();
    for id in candidates {
        match client.remove_node(v1::RemoveNodeRequest { id, force: false }).await {
            Ok(_) => {
                cluster.members.remove(&id);
                let stopped = match cluster.stop(id).await {
                    Some(took) => format!("it exited {:.2}s after SIGTERM", took.as_secs_f64()),
                    None => "it did not exit within 10 s of SIGTERM and was killed".into(),
                };
                return Ok(format!("added node {spare} in {site}; removed node {id} ({stopped})"));
            }
            Err(error) => refusals.push(format!("node {id}: {error}")),
        }
    }
    Ok(format!("added node {spare} in {site}; no node could be removed: {}", refusals.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            quiet: (Duration::from_secs(2), Duration::from_secs(4)),
            hold: (Duration::from_secs(3), Duration::from_secs(5)),
        }
    }

    #[test]
    fn the_schedule_is_a_function_of_the_seed() {
        let one = plan(&Fault::ALL, timing(), Duration::from_secs(120), 7);
        assert_eq!(one, plan(&Fault::ALL, timing(), Duration::from_secs(120), 7));
        assert_ne!(one, plan(&Fault::ALL, timing(), Duration::from_secs(120), 8));
    }

    #[test]
    fn every_fault_comes_once_per_round_and_the_run_ends_quiet() {
        let length = Duration::from_secs(300);
        let schedule = plan(&Fault::ALL, timing(), length, 1);
        let count = Fault::ALL.len();
        let first_round: std::collections::BTreeSet<Fault> =
            schedule[..count].iter().map(|p| p.fault).collect();
        assert_eq!(first_round.len(), count);
        for pair in schedule.windows(2) {
            assert!(pair[1].at >= pair[0].at + pair[0].hold + timing().quiet.0);
        }
        let last = schedule.last().unwrap();
        assert!(last.at + last.hold + timing().quiet.0 <= length);
    }

    /// Two faults asked for, room for one: the run says which one it leaves out.
    #[test]
    fn a_run_too_short_for_every_fault_says_which_it_leaves_out() {
        let faults = [Fault::KillLeaderSite, Fault::CutSite];
        let short = Duration::from_secs(12);
        let schedule = plan(&faults, timing(), short, 3);
        assert_eq!(schedule.len(), 1, "{schedule:?}");
        let warning = unscheduled(&faults, &schedule, short).expect("a warning");
        let left_out = if schedule[0].fault == Fault::CutSite { "kill-leader-site" } else { "cut-site" };
        assert!(warning.contains(&format!("not run: {left_out}.")), "{warning}");
        assert!(warning.contains("room for 1 of the 2 faults"), "{warning}");
        let long = Duration::from_secs(60);
        assert_eq!(unscheduled(&faults, &plan(&faults, timing(), long, 3), long), None);
    }

    #[test]
    fn fault_lists_parse() {
        assert_eq!(Fault::parse_list("all").unwrap().len(), Fault::ALL.len());
        assert_eq!(
            Fault::parse_list("kill-site, kill-all, power-cut").unwrap(),
            vec![Fault::KillSite, Fault::KillAll, Fault::PowerCut]
        );
        assert!(Fault::parse_list("kill-everything").unwrap_err().contains("unknown nemesis"));
    }
}
