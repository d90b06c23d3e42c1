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

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::{HEAL_BEFORE_END, Options, World, host_name};

/// Which kinds of fault a run draws from (`--faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// A node's host crashes (its unsynced writes are lost) and boots again later.
    pub crash: bool,
    /// A node's site is cut off from every other host, clients included, then reconnected.
    pub partition: bool,
    /// A node is cut off from its peers only: clients still reach it (a peer network down, or
    /// the node's Raft traffic stalled behind a congested link).
    pub peer_cut: bool,
    /// A node's clock jumps seconds ahead or behind, then is set right.
    pub clock: bool,
}

impl Faults {
    pub const NAMES: &'static str = "crash, partition, peer-cut, clock (or all, none)";

    pub fn all() -> Faults {
        Faults { crash: true, partition: true, peer_cut: true, clock: true }
    }

    pub fn parse(text: &str) -> Result<Faults, String> {
        let mut faults = Faults { crash: false, partition: false, peer_cut: false, clock: false };
        for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            match name {
                "all" => faults = Faults::all(),
                "none" => {}
                "crash" => faults.crash = true,
                "partition" => faults.partition = true,
                "peer-cut" => faults.peer_cut = true,
                "clock" => faults.clock = true,
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
            (self.peer_cut, Kind::PeerCut),
            (self.clock, Kind::Clock),
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
            (self.peer_cut, "peer-cut"),
            (self.clock, "clock"),
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
    PeerCut,
    Clock,
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
                Kind::Partition => (Action::Cut(node, true), Action::Heal(node, true)),
                Kind::PeerCut => (Action::Cut(node, false), Action::Heal(node, false)),
                Kind::Clock => {
                    let offset_ms =
                        rng.random_range(2_000..30_000) * if rng.random_bool(0.5) { 1 } else { -1 };
                    (Action::Skew(node, offset_ms), Action::Skew(node, 0))
                }
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
        }
    }
}
