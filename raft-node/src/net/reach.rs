//! Whether each peer answers our Raft calls, told in the log as an operator needs it.
//!
//! openraft logs a WARN for every vote request and replication call that fails, which at
//! start-up (peers not up yet) or while a site is down fills the log with the same line many
//! times a second. Those lines are dropped (`logs::RaftNoise`) and this tells the story instead,
//! once per turn of events: a peer that has not come up yet is waited for (INFO), a peer that
//! does not answer for `DOWN_AFTER` (or not at all within `STARTING_GRACE` of this node's start)
//! is reported (WARN, again every `WARN_INTERVAL` while it lasts), and its return too (INFO).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// How long peers named at start may take to come up before their silence is a warning.
pub const STARTING_GRACE: Duration = Duration::from_secs(30);
/// How long a peer that answered before may be silent before it is reported.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);
/// How often a peer that stays silent is reported again.
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// What a call to one peer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    /// No connection, or no answer in time.
    Unreachable,
    /// It answered, refusing the call (another cluster, another incarnation, no cluster id yet).
    Refused,
}

/// What to tell the log after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A peer that has not answered yet, within the start-up grace: INFO, once.
    Waiting,
    /// Silent (or refusing) for this long: WARN.
    Down { silent: Duration, refused: bool },
    /// Answers again after a reported silence: INFO.
    Back { silent: Duration },
}

#[derive(Debug, Default)]
struct PeerState {
    answered_once: bool,
    failing_since: Option<Instant>,
    told_waiting: bool,
    warned_at: Option<Instant>,
}

impl PeerState {
    fn observe(&mut self, outcome: Outcome, started: Instant, now: Instant) -> Option<Report> {
        if outcome == Outcome::Answered {
            let since = self.failing_since.take();
            let warned = self.warned_at.take().is_some();
            self.answered_once = true;
            return since.filter(|_| warned).map(|since| Report::Back { silent: now - since });
        }
        let since = *self.failing_since.get_or_insert(now);
        let starting = !self.answered_once && now.duration_since(started) < STARTING_GRACE;
        if starting {
            let first = !self.told_waiting;
            self.told_waiting = true;
            return first.then_some(Report::Waiting);
        }
        // Silent since the first call that failed: a peer this node never had to call before
        // (a follower calls the leader only once the leader is gone) has been silent since then,
        // not since this node started.
        let silent = now.duration_since(since);
        let due = self.warned_at.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL);
        if silent >= DOWN_AFTER && due {
            self.warned_at = Some(now);
            return Some(Report::Down { silent, refused: outcome == Outcome::Refused });
        }
        None
    }
}

/// Every peer's state, shared by the connections to them (openraft makes a new one per
/// replication stream and per election).
pub struct Reachability {
    started: Instant,
    peers: Mutex<BTreeMap<NodeId, PeerState>>,
}

impl Default for Reachability {
    fn default() -> Reachability {
        Reachability { started: Instant::now(), peers: Mutex::new(BTreeMap::new()) }
    }
}

impl Reachability {
    /// Records what a call to `target` at `address` did, and logs it if it is news.
    pub fn observe(&self, target: NodeId, address: &str, outcome: Outcome, error: &dyn std::fmt::Display) {
        let report = {
            let mut peers = self.peers.lock().expect("reachability lock");
            peers.entry(target).or_default().observe(outcome, self.started, Instant::now())
        };
        match report {
            None => {}
            Some(Report::Waiting) => {
                tracing::info!("waiting for node {target} at {address} to come up ({error})")
            }
            Some(Report::Down { silent, refused: false }) => tracing::warn!(
                "node {target} at {address} has not answered for {} s: {error}",
                silent.as_secs()
            ),
            Some(Report::Down { silent, refused: true }) => tracing::warn!(
                "node {target} at {address} has refused this node's Raft calls for {} s (its log says why)",
                silent.as_secs()
            ),
            Some(Report::Back { silent }) => {
                tracing::info!("node {target} at {address} answers again after {} s", silent.as_secs())
            }
        }
    }
}

/// Drops openraft's WARN about a vote request or replication call that failed to reach its
/// peer (`Reachability` tells the log about those); every other event passes.
pub struct RaftNoise;

impl<S> tracing_subscriber::layer::Filter<S> for RaftNoise {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        let metadata = event.metadata();
        if *metadata.level() != tracing::Level::WARN || !metadata.target().starts_with("openraft") {
            return true;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        !is_noise(&message.0)
    }
}

/// openraft's messages for a call that did not reach its peer: a connection refused or a
/// refusal (which this node's network reports as `Unreachable`), or a timeout. Every one of
/// those calls went through `Peer::call`, which told `Reachability`.
fn is_noise(message: &str) -> bool {
    message.contains("Unreachable")
        || message.starts_with("timeout while requesting ")
        || message.contains("failed to send a heartbeat")
        || (message.starts_with("ReplicationCore recv RPCError") && message.contains("timeout"))
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per openraft message seen in start-up and chaos logs: dropped or kept.
    #[test]
    fn only_openraft_warnings_about_unreached_peers_are_dropped() {
        for (message, noise) in [
            (
                "while requesting pre-vote, error: Unreachable node: node 2: code: 'The service is currently \
                 unavailable', message: \"Connection refused (os error 111)\", target: 2",
                true,
            ),
            (
                "while requesting vote, error: Unreachable node: node 1: code: 'The caller does not have permission', message: \"refused\", target: 1",
                true,
            ),
            ("timeout while requesting vote: timeout after 150ms when Vote 1->2", true),
            (
                "ReplicationCore recv RPCError: Unreachable node: node 3: h2 protocol error, when:(AppendEntries)",
                true,
            ),
            (
                "ReplicationCore recv RPCError: timeout after 1s when AppendEntries 1->3, when:(AppendEntries)",
                true,
            ),
            (
                "ReplicationCore recv RPCError: RemoteError: from 3: storage error, when:(AppendEntries)",
                false,
            ),
            ("while requesting vote, error: NetworkError: raft message version 9, target: 2", false),
            (
                "update progress error: Unreachable node: node 2: code: 'The service is currently unavailable'",
                true,
            ),
            (
                "HeartbeatWorker(id=1, target=2) failed to send a heartbeat: Ok(Err(Unreachable(Unreachable { source: .. })))",
                true,
            ),
            ("HeartbeatWorker(id=1, target=2) failed to send a heartbeat: Err(Timeout { .. })", true),
            ("AllowNextRevert: current node is not a Leader", false),
        ] {
            assert_eq!(is_noise(message), noise, "{message}");
        }
    }

    /// One row per call, in order: seconds since start, its outcome, and what the log is told.
    #[test]
    fn the_log_hears_of_a_peer_once_per_turn_of_events() {
        use Outcome::*;
        let secs = Duration::from_secs;
        let down = |s: u64| Some(Report::Down { silent: secs(s), refused: false });
        let rows: &[(f64, Outcome, Option<Report>)] = &[
            // Not up yet: one INFO, then quiet through the grace.
            (0.1, Unreachable, Some(Report::Waiting)),
            (0.5, Unreachable, None),
            (20.0, Refused, None),
            // Up: nothing to say (the wait was never a warning).
            (21.0, Answered, None),
            // Down for a moment: quiet until DOWN_AFTER.
            (40.0, Unreachable, None),
            (44.0, Unreachable, None),
            (45.0, Unreachable, down(5)),
            (50.0, Unreachable, None),
            (105.0, Unreachable, down(65)),
            (106.0, Answered, Some(Report::Back { silent: secs(66) })),
            (107.0, Answered, None),
            (110.0, Refused, None),
            (115.5, Refused, Some(Report::Down { silent: Duration::from_secs_f64(5.5), refused: true })),
        ];
        let started = Instant::now();
        let mut peer = PeerState::default();
        for (at, outcome, expected) in rows {
            let now = started + Duration::from_secs_f64(*at);
            assert_eq!(&peer.observe(*outcome, started, now), expected, "at {at} s: {outcome:?}");
        }
    }

    #[test]
    fn a_peer_that_never_comes_up_is_a_warning_once_the_grace_is_over() {
        let started = Instant::now();
        let mut peer = PeerState::default();
        assert_eq!(peer.observe(Outcome::Unreachable, started, started), Some(Report::Waiting));
        let after = started + STARTING_GRACE;
        assert_eq!(
            peer.observe(Outcome::Unreachable, started, after),
            Some(Report::Down { silent: STARTING_GRACE, refused: false })
        );
        assert_eq!(peer.observe(Outcome::Unreachable, started, after + Duration::from_secs(1)), None);
    }

    /// A follower calls the leader for the first time when the leader is gone: it has been
    /// silent for as long as the calls have failed, not since this node started (it said "209 s"
    /// half a second after the leader was killed).
    #[test]
    fn a_peer_first_called_long_after_the_start_is_silent_since_that_call() {
        let started = Instant::now();
        let at = |seconds: f64| started + Duration::from_secs_f64(seconds);
        let mut peer = PeerState::default();
        assert_eq!(peer.observe(Outcome::Unreachable, started, at(209.0)), None);
        assert_eq!(peer.observe(Outcome::Unreachable, started, at(209.5)), None);
        assert_eq!(
            peer.observe(Outcome::Unreachable, started, at(214.0)),
            Some(Report::Down { silent: Duration::from_secs(5), refused: false })
        );
    }
}
