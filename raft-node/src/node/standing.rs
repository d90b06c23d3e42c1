//! A node behind in applying does not stand for election while one that has applied can win.
//!
//! Raft elects on the log, not on what a node has applied, and a new leader answers no write
//! before it has applied what was committed before it led. At rush hour a restarted node holds
//! the whole log within a second or two but applies its backlog at its own pace (7-10 large
//! entries a second on a busy machine), and when the leader was lost meanwhile it could win the
//! election against a follower that had applied everything: writes then waited 4-19 s for its
//! backlog (issue 24, the ten-minute runs of 2026-12-06).
//!
//! So each node measures how long it would need to apply what it knows committed, at the rate it
//! applied lately (`Pace::backlog`). Longer than `BEHIND_MAX`, it turns its election timer off
//! (openraft's `elect(false)`: it still votes) for as long as it keeps hearing from a leader, and
//! after losing it, waits about that long (at most `PATIENCE_MAX`) before standing: a voter
//! that applied more stands first and wins, and when none can, the wait costs nothing, since
//! this node could not have answered writes before applying its backlog anyway. Two behind
//! stand in the order of their backlogs. A leader behind hands over (`service::cluster`). A node
//! behind that refused its vote to a candidate with a shorter log stands at once: that candidate
//! cannot win with its vote (at rush hour the survivor that had applied everything lacked the dead
//! leader's last entry, and writes waited the other's whole patience).

use std::sync::Arc;
use std::time::Duration;

use super::NodeHandle;

/// How long a node's backlog may take to apply and it still stands at once: at most what the
/// election timer of a voter that applied everything takes to fire at the default timeout
/// (150-187 ms), so that such a voter stands first. At 500 ms a restarted node 160 entries
/// behind (its estimate 470 ms, too good: it took 1.2 s as leader) raced the follower that had
/// applied everything, and won (issue 24).
pub const BEHIND_MAX: Duration = Duration::from_millis(150);
/// The longest a node behind waits after losing its leader before it stands anyway (liveness:
/// its own estimate may be wrong, and someone must lead).
pub const PATIENCE_MAX: Duration = Duration::from_secs(3);
/// A backlog of this many entries or fewer counts as none, whatever its rate says: the entries in
/// flight of a group commit and the pipeline to a follower. (Without it, followers a couple of
/// large entries behind, at a rate measured over a stall, held their candidacy and stood again
/// several times a second in a ten-minute run, and a leader 3 entries behind handed over.)
pub const BACKLOG_FEW: u64 = 8;
/// A node behind in applying stands at once for this long after it refused its vote to a
/// candidate whose log is shorter than its own (`NodeHandle::shorter_log_candidate`): that one
/// cannot win with it, and if it is the only other voter up, no one but this node can.
pub const SHORTER_LOG_FRESH: Duration = Duration::from_secs(1);
/// How often a node looks at its backlog.
const CHECK_EVERY: Duration = Duration::from_millis(25);

/// How long a node with `backlog` entries to apply, expected to take `time` at its recent rate
/// (`None`: it applied too little lately to tell), waits after last hearing from a leader before
/// it stands for election: zero when it is not behind.
pub fn patience(backlog: u64, time: Option<Duration>) -> Duration {
    match time {
        _ if backlog <= BACKLOG_FEW => Duration::ZERO,
        Some(time) if time <= BEHIND_MAX => Duration::ZERO,
        Some(time) => time.min(PATIENCE_MAX),
        None => PATIENCE_MAX,
    }
}

/// This node's backlog (`committed` less `applied` entries), how long it is expected to take at
/// the recent rate (`None` for a few entries, which count as none whatever the rate, and most
/// checks find: the rate is not looked up then), and the patience it calls for.
pub fn backlog(node: &NodeHandle, applied: u64, committed: u64) -> (u64, Option<Duration>, Duration) {
    let backlog = committed.saturating_sub(applied);
    let time = if backlog > BACKLOG_FEW { node.pace.backlog(committed) } else { None };
    (backlog, time, patience(backlog, time))
}

/// For the life of the node: turns its election timer off while it is behind in applying and a
/// leader was heard from within its patience, on otherwise. Leaves it alone while the node
/// withholds its vote after a damaged log (`VoteHold`), which keeps it off.
pub async fn stand_only_when_applied(node: Arc<NodeHandle>) {
    let mut interval = tokio::time::interval(CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = false;
    loop {
        interval.tick().await;
        if node.votes.withheld().is_some() {
            continue;
        }
        let (committed, applied) = {
            let current = node.raft_view();
            (current.local_committed.map_or(0, |id| id.index), current.last_applied.map_or(0, |id| id.index))
        };
        let (_, time, patience) = backlog(&node, applied, committed);
        let outlogged = node.shorter_log_candidate.within(SHORTER_LOG_FRESH);
        let hold =
            !patience.is_zero() && !node.is_leader() && node.leader_contact.within(patience) && !outlogged;
        node.raft.runtime_config().elect(!hold);
        if hold != holding {
            holding = hold;
            if hold {
                let expected = expected(time);
                tracing::info!(
                    node = node.id(),
                    "applied {applied} of {committed} committed entries ({expected} to go at its recent rate): \
                     this node does not stand for election while a leader was heard from in the last {patience:.1?}"
                );
            } else {
                let why = if outlogged { " (a candidate with a shorter log asked for its vote)" } else { "" };
                tracing::info!(
                    node = node.id(),
                    "applied {applied} of {committed} committed entries: this node stands again{why}"
                );
            }
        }
    }
}

/// A backlog's expected time as the logs say it.
pub fn expected(time: Option<Duration>) -> String {
    time.map_or_else(|| "an unknown time".to_string(), |time| format!("{time:.1?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_waits_about_as_long_as_its_backlog_takes_and_no_longer_than_the_patience_allowed() {
        assert_eq!(patience(0, Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(patience(40, Some(BEHIND_MAX)), Duration::ZERO);
        // A few entries are the pipeline, however slow the rate lately.
        assert_eq!(patience(BACKLOG_FEW, Some(Duration::from_secs(5))), Duration::ZERO);
        assert_eq!(patience(40, Some(Duration::from_millis(1200))), Duration::from_millis(1200));
        assert_eq!(patience(400, Some(Duration::from_secs(19))), PATIENCE_MAX);
        // Too little applied lately to tell its rate: a few entries in flight are nothing, more
        // are a backlog of unknown length.
        assert_eq!(patience(BACKLOG_FEW, None), Duration::ZERO);
        assert_eq!(patience(BACKLOG_FEW + 1, None), PATIENCE_MAX);
    }
}
