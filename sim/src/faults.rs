//! Faults drawn from the seed: when each starts and ends, on which node or link.
//!
//! One fault at a time, each healed before the next begins, so that a majority is always up and
//! the liveness check at the end means something; overlapping faults are a next step.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::{HEAL_BEFORE_END, Options, World, host_name};

/// Which kinds of fault a run draws from (`--faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// A node's host crashes (its unsynced writes are lost) and boots again later.
    pub crash: bool,
    /// A node is cut off from every other host, then reconnected.
    pub partition: bool,
    /// A node hears the others but they do not hear it (or the reverse).
    pub one_way: bool,
    /// Messages to and from a node are held back for a while, as behind a paused process or a
    /// congested link, then delivered.
    pub pause: bool,
}

impl Faults {
    pub const NAMES: &'static str = "crash, partition, one-way, pause (or all, none)";

    pub fn all() -> Faults {
        Faults { crash: true, partition: true, one_way: true, pause: true }
    }

    pub fn parse(text: &str) -> Result<Faults, String> {
        let mut faults = Faults { crash: false, partition: false, one_way: false, pause: false };
        for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            match name {
                "all" => faults = Faults::all(),
                "none" => {}
                "crash" => faults.crash = true,
                "partition" => faults.partition = true,
                "one-way" => faults.one_way = true,
                "pause" => faults.pause = true,
                other => return Err(format!("unknown fault '{other}': the faults are {}", Faults::NAMES)),
            }
        }
        Ok(faults)
    }

    fn kinds(self) -> Vec<Kind> {
        let mut kinds = Vec::new();
        for (on, kind) in [
            (self.crash, Kind::Crash),
            (self.partition, Kind::Partition),
            (self.one_way, Kind::OneWay),
            (self.pause, Kind::Pause),
        ] {
            if on {
                kinds.push(kind);
            }
        }
        kinds
    }
}

impl std::fmt::Display for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.crash, "crash"),
            (self.partition, "partition"),
            (self.one_way, "one-way"),
            (self.pause, "pause"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        f.write_str(if names.is_empty() { "none" } else { "" })?;
        f.write_str(&names.join(","))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Crash,
    Partition,
    OneWay,
    Pause,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Crash(u64),
    Boot(u64),
    Isolate(u64),
    Reconnect(u64),
    /// Node `.0` stops hearing (`.1` false) or being heard (`.1` true).
    Deafen(u64, bool),
    Undeafen(u64, bool),
    Hold(u64),
    Release(u64),
}

/// The faults of one run, in the order they happen.
pub struct Schedule {
    events: Vec<(Duration, Action)>,
    next: usize,
    nodes: u64,
    /// Faults begun so far.
    pub applied: u64,
}

impl Schedule {
    pub fn draw(options: &Options) -> Schedule {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed ^ 0xfa17);
        let kinds = options.faults.kinds();
        let end = options.sim_time.saturating_sub(HEAL_BEFORE_END);
        let mut events = Vec::new();
        let mut at = Duration::from_secs(3);
        while !kinds.is_empty() && at < end {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let node = rng.random_range(1..=options.nodes);
            let lasts = Duration::from_millis(rng.random_range(200..6_000));
            let until = (at + lasts).min(end);
            let (start, stop) = match kind {
                Kind::Crash => (Action::Crash(node), Action::Boot(node)),
                Kind::Partition => (Action::Isolate(node), Action::Reconnect(node)),
                Kind::OneWay => {
                    let outgoing = rng.random_bool(0.5);
                    (Action::Deafen(node, outgoing), Action::Undeafen(node, outgoing))
                }
                Kind::Pause => (Action::Hold(node), Action::Release(node)),
            };
            events.push((at, start));
            events.push((until, stop));
            at = until + Duration::from_millis(rng.random_range(100..4_000));
        }
        Schedule { events, next: 0, nodes: options.nodes, applied: 0 }
    }

    /// Applies every event due by `at`.
    pub fn apply_due(&mut self, at: Duration, sim: &mut turmoil::Sim<'_>, world: &World) {
        while let Some(&(due, action)) = self.events.get(self.next) {
            if due > at {
                return;
            }
            self.next += 1;
            self.apply(action, sim, world, at);
        }
    }

    fn apply(&mut self, action: Action, sim: &mut turmoil::Sim<'_>, world: &World, at: Duration) {
        let others = |node: u64| (1..=self.nodes).filter(move |other| *other != node).map(host_name);
        world.record(at, format_args!("fault: {action:?}"));
        match action {
            Action::Crash(node) => {
                self.applied += 1;
                sim.crash(host_name(node));
            }
            Action::Boot(node) => sim.bounce(host_name(node)),
            Action::Isolate(node) => {
                self.applied += 1;
                for other in others(node).chain(["client".to_string()]) {
                    sim.partition(host_name(node), other);
                }
            }
            Action::Reconnect(node) => {
                for other in others(node).chain(["client".to_string()]) {
                    sim.repair(host_name(node), other);
                }
            }
            Action::Deafen(node, outgoing) => {
                self.applied += 1;
                for other in others(node) {
                    if outgoing {
                        sim.partition_oneway(host_name(node), other);
                    } else {
                        sim.partition_oneway(other, host_name(node));
                    }
                }
            }
            Action::Undeafen(node, outgoing) => {
                for other in others(node) {
                    if outgoing {
                        sim.repair_oneway(host_name(node), other);
                    } else {
                        sim.repair_oneway(other, host_name(node));
                    }
                }
            }
            Action::Hold(node) => {
                self.applied += 1;
                for other in others(node) {
                    sim.hold(host_name(node), other);
                }
            }
            Action::Release(node) => {
                for other in others(node) {
                    sim.release(host_name(node), other);
                }
            }
        }
    }
}
