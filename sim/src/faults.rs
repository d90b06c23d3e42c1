//! Faults drawn from the seed: when each starts and ends, on which node or link.
//!
//! One fault at a time, each healed before the next begins, so that a majority is always up and
//! the liveness check at the end means something; overlapping faults are a next step.
//!
//! Links are cut by holding their messages, which the link delivers once it heals: what TCP's
//! retransmission does over a real partition. turmoil's own partitions drop the segments of an
//! established TCP stream and never resend them, which leaves a connection that hangs with a hole
//! in its byte stream until keep-alives give up on it, something no real network does; the first
//! runs found only that. One-way cuts need a link that drops one way and retransmits, which
//! turmoil does not have: not drawn yet.
//!
//! A node that stops on a failed disk (fail-stop, as `tally serve` does with exit code 74) is
//! restarted a second later, as a supervisor would, whether or not its disk is healed yet.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;
use rand::{Rng, SeedableRng};

use crate::{HEAL_BEFORE_END, Options, World, data_dir, host_name};

/// How long a supervisor waits before it restarts a node that stopped.
pub const RESTART_AFTER: Duration = Duration::from_secs(1);
/// How long a purge crash waits for the node's next purge after its cut heals.
const PURGE_CRASH_ARMED: Duration = Duration::from_secs(8);

/// One kind of fault, by its name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A node's host crashes (its unsynced writes are lost, the last ones possibly torn) and
    /// boots again later.
    Crash,
    /// A node's site is cut off from every other host, clients included, then reconnected.
    Partition,
    /// A node is cut off from its peers only: clients still reach it (a peer network down, or
    /// the node's Raft traffic stalled behind a congested link).
    PeerCut,
    /// A node's clock jumps seconds ahead or behind, then is set right.
    Clock,
    /// A node is cut off until it lags, and crashes at its first log purge after the cut heals:
    /// between the purge marker and the deletion of the segments, often right after installing
    /// a snapshot past the end of its log.
    PurgeCrash,
    /// A node's disk fails every write and sync (EIO) or is full (ENOSPC) for a while.
    Disk,
    /// A node crashes right after it next writes a vote, its committed id or a purge marker
    /// durably, while what those name may still be in flight to its disk.
    WriteCrash,
    /// The operator replaces a voter: the spare host starts on an empty disk and joins (`join`),
    /// then a voter is removed (`tally cluster remove`), taken down, and its disk wiped; it is
    /// the spare from then on.
    Membership,
}

const KINDS: [(&str, Kind); 8] = [
    ("crash", Kind::Crash),
    ("partition", Kind::Partition),
    ("peer-cut", Kind::PeerCut),
    ("clock", Kind::Clock),
    ("purge-crash", Kind::PurgeCrash),
    ("disk", Kind::Disk),
    ("write-crash", Kind::WriteCrash),
    ("membership", Kind::Membership),
];

/// Which kinds of fault a run draws from (`--faults`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Faults(BTreeSet<Kind>);

impl Faults {
    pub const NAMES: &'static str =
        "crash, partition, peer-cut, clock, purge-crash, disk, write-crash, membership (or all, none)";

    pub fn all() -> Faults {
        Faults(KINDS.iter().map(|(_, kind)| *kind).collect())
    }

    pub fn has(&self, kind: Kind) -> bool {
        self.0.contains(&kind)
    }

    pub fn parse(text: &str) -> Result<Faults, String> {
        let mut faults = BTreeSet::new();
        for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            match name {
                "all" => faults.extend(Faults::all().0),
                "none" => {}
                name => match KINDS.iter().find(|(known, _)| *known == name) {
                    Some((_, kind)) => {
                        faults.insert(*kind);
                    }
                    None => return Err(format!("unknown fault '{name}': the faults are {}", Faults::NAMES)),
                },
            }
        }
        Ok(Faults(faults))
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> =
            KINDS.iter().filter(|(_, kind)| self.has(*kind)).map(|(name, _)| *name).collect();
        f.write_str(if names.is_empty() { "none" } else { "" })?;
        f.write_str(&names.join(","))
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Crash(u64),
    Boot(u64),
    /// Node `.0`'s links are held: to its peers, and to clients too if `.1`.
    Cut(u64, bool),
    Heal(u64, bool),
    /// Node `.0`'s clock is off by `.1` ms (0: right again).
    Skew(u64, i64),
    /// Node `.0`'s links heal, and it crashes at its next log purge.
    HealThenCrashAtPurge(u64),
    /// Node `.0` crashes right after its next durable write of a vote, committed id or marker.
    CrashAtWrite(u64),
    /// Ends `HealThenCrashAtPurge` or `CrashAtWrite`: boots the node if it crashed.
    Disarm(u64),
    /// Node `.0`'s disk fails with `.1`, or works again.
    Disk(u64, Option<ErrorKind>),
    /// The spare host starts on an empty disk and joins.
    Join,
    /// The operator removes a voter other than one still joining: the `.0`th (modulo their number).
    Remove(usize),
}

/// Cuts the power of node `node`'s host: its WAL and files lose what was not synced (turmoil),
/// its state store keeps what was durable and a seed-drawn number of the batches after it.
fn crash(sim: &mut turmoil::Sim<'_>, world: &World, at: Duration, node: u64) {
    let (kept, lost) = raft_node::sys::sim::crash_stores(&data_dir(node));
    world.stores_kept.fetch_add(kept as u64, std::sync::atomic::Ordering::Relaxed);
    world.record(
        at,
        format_args!("n{node} loses power: {kept} state stores kept, {lost} unsynced batches lost"),
    );
    sim.crash(host_name(node));
}

/// A crash waiting for its moment.
struct Armed {
    node: u64,
    trigger: Trigger,
    crashed: bool,
}

enum Trigger {
    /// The node's next log purge: its purged index as it was when armed (`None` until read).
    Purge(Option<Option<u64>>),
    /// The node's next durable write of a small file (`raft_node::sys::wrote_durably`).
    DurableWrite,
}

/// The faults of one run, in the order they happen.
pub struct Schedule {
    events: Vec<(Duration, Action)>,
    next: usize,
    /// Every host: the voters the run starts with and the spare.
    hosts: u64,
    armed: Option<Armed>,
    /// Faults begun so far.
    pub applied: u64,
}

impl Schedule {
    pub fn draw(options: &Options) -> Schedule {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed ^ 0xfa17);
        let kinds: Vec<Kind> = options.faults.0.iter().copied().collect();
        let end = options.sim_time.saturating_sub(HEAL_BEFORE_END);
        let mut events = Vec::new();
        let mut at = Duration::from_secs(3);
        // With membership changes any host may be a voter, the spare too.
        let hosts = options.nodes + u64::from(options.faults.has(Kind::Membership));
        while !kinds.is_empty() && at < end {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let node = rng.random_range(1..=hosts);
            let lasts = Duration::from_millis(rng.random_range(200..6_000));
            let until = (at + lasts).min(end);
            let fault = match kind {
                Kind::Crash => vec![(at, Action::Crash(node)), (until, Action::Boot(node))],
                Kind::Partition => vec![(at, Action::Cut(node, true)), (until, Action::Heal(node, true))],
                Kind::PeerCut => vec![(at, Action::Cut(node, false)), (until, Action::Heal(node, false))],
                Kind::Clock => {
                    let offset_ms =
                        rng.random_range(2_000..30_000) * if rng.random_bool(0.5) { 1 } else { -1 };
                    vec![(at, Action::Skew(node, offset_ms)), (until, Action::Skew(node, 0))]
                }
                Kind::PurgeCrash => vec![
                    (at, Action::Cut(node, true)),
                    (until, Action::HealThenCrashAtPurge(node)),
                    ((until + PURGE_CRASH_ARMED).min(end), Action::Disarm(node)),
                ],
                Kind::WriteCrash => vec![(at, Action::CrashAtWrite(node)), (until, Action::Disarm(node))],
                Kind::Membership => vec![(at, Action::Join), (until, Action::Remove(rng.random_range(0..8)))],
                Kind::Disk => {
                    let kind = if rng.random_bool(0.5) { ErrorKind::Other } else { ErrorKind::StorageFull };
                    vec![(at, Action::Disk(node, Some(kind))), (until, Action::Disk(node, None))]
                }
            };
            let until = fault.last().expect("a fault has events").0;
            events.extend(fault);
            at = until + Duration::from_millis(rng.random_range(100..4_000));
        }
        Schedule { events, next: 0, hosts: options.nodes + 1, armed: None, applied: 0 }
    }

    /// Applies every event due by `at`, a purge crash whose purge came, and the restart of a
    /// node that stopped on its disk.
    pub fn apply_due(&mut self, at: Duration, sim: &mut turmoil::Sim<'_>, world: &World) {
        while let Some(&(due, action)) = self.events.get(self.next) {
            if due > at {
                break;
            }
            self.next += 1;
            self.apply(action, sim, world, at);
        }
        self.crash_when_due(at, sim, world);
        let removed = std::mem::take(&mut world.membership.lock().unwrap().removed);
        for node in removed {
            // Taken down, its disk to be wiped: the spare from now on.
            world.record(at, format_args!("n{node} removed: taken down, its disk to be wiped"));
            {
                let mut membership = world.membership.lock().unwrap();
                membership.voters.remove(&node);
                membership.spare = Some(node);
                membership.wipe.insert(node);
            }
            crash(sim, world, at, node);
        }
        let restart: Vec<u64> = world
            .stopped
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, stopped_at)| at >= **stopped_at + RESTART_AFTER)
            .map(|(node, _)| *node)
            .collect();
        for node in restart {
            world.stopped.lock().unwrap().remove(&node);
            world.record(at, format_args!("n{node} restarted by its supervisor"));
            sim.bounce(host_name(node));
        }
    }

    /// Crashes an armed node whose moment came in the last step.
    fn crash_when_due(&mut self, at: Duration, sim: &mut turmoil::Sim<'_>, world: &World) {
        let written = raft_node::sys::sim::take_durable_writes();
        let Some(armed) = self.armed.as_mut().filter(|armed| !armed.crashed) else { return };
        let Some(node) = world.node(armed.node) else { return };
        let moment = match &mut armed.trigger {
            Trigger::Purge(before) => {
                let purged = node.raft.metrics().borrow_watched().purged.map(|id| id.index);
                match *before {
                    None => {
                        *before = Some(purged);
                        None
                    }
                    Some(before) if before != purged => Some(format!("at its purge to {purged:?}")),
                    Some(_) => None,
                }
            }
            Trigger::DurableWrite => {
                let dir = data_dir(armed.node);
                written
                    .iter()
                    .find(|path| path.starts_with(&dir))
                    .map(|path| format!("after writing {}", path.display()))
            }
        };
        drop(node);
        if let Some(moment) = moment {
            armed.crashed = true;
            world.record(at, format_args!("fault: Crash({}) {moment}", armed.node));
            crash(sim, world, at, armed.node);
        }
    }

    fn apply(&mut self, action: Action, sim: &mut turmoil::Sim<'_>, world: &World, at: Duration) {
        let others = |node: u64| (1..=self.hosts).filter(move |other| *other != node).map(host_name);
        world.record(at, format_args!("fault: {action:?}"));
        match action {
            Action::Crash(node) => {
                self.applied += 1;
                crash(sim, world, at, node);
            }
            Action::Boot(node) => sim.bounce(host_name(node)),
            Action::Cut(node, clients) => {
                self.applied += 1;
                for other in others(node).chain(clients.then(|| "client".to_string())) {
                    sim.hold(host_name(node), other);
                }
            }
            Action::Heal(node, clients) => {
                for other in others(node).chain(clients.then(|| "client".to_string())) {
                    sim.release(host_name(node), other);
                }
            }
            Action::Skew(node, offset_ms) => {
                if offset_ms != 0 {
                    self.applied += 1;
                }
                // The machine's clock: it stays off across a crash of the node.
                world.skews.lock().unwrap().insert(node, offset_ms);
                if let Some(running) = world.node(node) {
                    running.clock.set_skew(offset_ms, 0);
                }
            }
            Action::HealThenCrashAtPurge(node) => {
                self.apply(Action::Heal(node, true), sim, world, at);
                self.armed = Some(Armed { node, trigger: Trigger::Purge(None), crashed: false });
            }
            Action::CrashAtWrite(node) => {
                self.applied += 1;
                self.armed = Some(Armed { node, trigger: Trigger::DurableWrite, crashed: false });
            }
            Action::Disarm(node) => {
                if self.armed.take().is_some_and(|armed| armed.crashed) {
                    sim.bounce(host_name(node));
                }
            }
            Action::Join => {
                let spare = {
                    let mut membership = world.membership.lock().unwrap();
                    let spare = membership.spare.take();
                    if let Some(spare) = spare {
                        membership.joining.insert(spare);
                        membership.voters.insert(spare);
                    }
                    spare
                };
                match spare {
                    Some(spare) => {
                        self.applied += 1;
                        sim.bounce(host_name(spare));
                    }
                    None => world.record(at, format_args!("no spare host: the last removal is not done")),
                }
            }
            Action::Remove(pick) => {
                let candidates: Vec<u64> = {
                    let membership = world.membership.lock().unwrap();
                    membership
                        .voters
                        .iter()
                        .copied()
                        .filter(|voter| !membership.joining.contains(voter))
                        .collect()
                };
                if membership_changes_allowed(&candidates) {
                    let victim = candidates[pick % candidates.len()];
                    world.record(at, format_args!("operator removes n{victim}"));
                    let _ = world.removals.send(victim);
                }
            }
            Action::Disk(node, kind) => {
                if kind.is_some() {
                    self.applied += 1;
                }
                raft_node::sys::sim::set_disk_fault(&data_dir(node), kind);
            }
        }
    }
}

/// A removal leaves at least three voters that are not still joining.
fn membership_changes_allowed(candidates: &[u64]) -> bool {
    candidates.len() > 3
}
