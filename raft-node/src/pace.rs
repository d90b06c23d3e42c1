//! A leader keeps pace with the followers that would replace it.
//!
//! Raft commits an entry once a majority holds it in its log; applying it is each node's own
//! business. A follower that applies slower than the leader commits falls behind without anyone
//! noticing, until the leader dies: the new leader answers no write before it has applied its
//! backlog (a reply needs the state after every earlier entry). At rush hour followers fell
//! 200-300 entries behind (10-15 s of applying) within two minutes, and a lost leader stopped
//! writes for 6-12 s each time (issue 24, the 600-s run of 2026-12-06, node logs).
//!
//! So the leader watches how far behind in applying the followers that would replace it are: each
//! follower tells its applied index in every answer to AppendEntries, heartbeats included
//! (`pb::RaftMessage::applied_index`), and its lag is how much of the leader's own applying it has
//! yet to do: from when the leader was where that follower is now to the leader's latest apply.
//! Of the followers answering lately (`REPORT_FRESH`), the
//! leader and as many others as a quorum can spare could be lost together; the best of those
//! that would remain is the one that counts (`quorum_lag`: the best follower of three voters, the
//! second best of five). While it lags more than `LAG_MAX`, the leader proposes nothing new
//! (`Pace::keep`): the queue grows, and past `--max-queue-wait-ms` writes are refused at once as
//! at capacity, which is what the cluster then is. With too few followers answering for a quorum
//! to survive the leader, nothing is held back: losing the leader would stop writes anyway. A
//! wait never exceeds `WAIT_MAX`, so that followers stuck behind slow writes, never stop them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::types::NodeId;

/// The longest a follower completing the quorum may be behind in applying before the leader
/// holds back new entries: about what a new leader needs to catch up before it answers writes.
pub const LAG_MAX: Duration = Duration::from_millis(300);
/// The longest one proposal waits for followers.
pub const WAIT_MAX: Duration = Duration::from_secs(1);
/// A follower's report is used this long; older, it counts as not answering.
pub const REPORT_FRESH: Duration = Duration::from_secs(1);
/// How often a held-back proposal looks again.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// Points of the leader's own apply history kept: at ~20 entries a second at rush hour, minutes.
const HISTORY_MAX: usize = 4096;

#[derive(Default)]
pub struct Pace {
    /// Each follower's applied index as its last answer said, and when it came.
    followers: Mutex<BTreeMap<NodeId, (u64, Instant)>>,
    /// This node's applied index as it grew, and when: (index, when it was reached), oldest first.
    applied_at: Mutex<VecDeque<(u64, Instant)>>,
}

impl Pace {
    /// Follower `id` answered, saying it has applied up to `applied`.
    pub fn heard(&self, id: NodeId, applied: u64) {
        self.followers.lock().unwrap().insert(id, (applied, Instant::now()));
    }

    /// This node has applied up to `index`.
    pub fn applied(&self, index: u64) {
        let mut history = self.applied_at.lock().unwrap();
        if history.back().is_none_or(|(last, _)| index > *last) {
            history.push_back((index, Instant::now()));
            if history.len() > HISTORY_MAX {
                history.pop_front();
            }
        }
    }

    /// How far behind in applying the follower that would take over from this node `me` among
    /// `voters` is, or `None` if too few followers answered lately for a quorum without `me`.
    pub fn quorum_lag(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Option<Duration> {
        let now = Instant::now();
        let reports: Vec<(u64, Instant)> = {
            let followers = self.followers.lock().unwrap();
            voters.iter().filter(|id| **id != me).filter_map(|id| followers.get(id).copied()).collect()
        };
        let history = self.applied_at.lock().unwrap();
        quorum_lag(voters.len(), &reports, &history, now)
    }

    /// Waits while the follower that would take over is more than `LAG_MAX` behind, at most
    /// `WAIT_MAX`; returns how long it waited.
    pub async fn keep(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Duration {
        let started = Instant::now();
        let mut waited = Duration::ZERO;
        loop {
            let lag = self.quorum_lag(voters, me);
            if let Some(lag) = lag {
                crate::metrics::FOLLOWER_LAG_MS.set(lag.as_millis() as i64);
            }
            if lag.is_none_or(|lag| lag <= LAG_MAX) || waited >= WAIT_MAX {
                if !waited.is_zero() {
                    crate::metrics::PACE_WAIT_SECONDS.observe(waited.as_secs_f64());
                }
                return waited;
            }
            tokio::time::sleep(CHECK_EVERY).await;
            waited = started.elapsed();
        }
    }
}

/// `Pace::quorum_lag` on its inputs: `voters` in all (the leader one of them), the `reports` of
/// the others, and the leader's apply `history`.
fn quorum_lag(
    voters: usize,
    reports: &[(u64, Instant)],
    history: &VecDeque<(u64, Instant)>,
    now: Instant,
) -> Option<Duration> {
    let quorum = voters / 2 + 1;
    let mut applied: Vec<u64> = reports
        .iter()
        .filter(|(_, at)| now.saturating_duration_since(*at) <= REPORT_FRESH)
        .map(|(applied, _)| *applied)
        .collect();
    // Without the leader, the followers answering must still make a quorum.
    if applied.len() < quorum {
        return None;
    }
    applied.sort_unstable_by(|a, b| b.cmp(a));
    // The leader and the `spare` best followers lost, the best that remains takes over.
    let spare = applied.len() - quorum;
    let taking_over = applied[spare];
    // How much of the leader's applying that follower has yet to do: from when the leader was
    // where the follower is now (the last point at or below it) to the leader's latest point.
    // Not measured to now, so that it shrinks as the follower applies while the leader waits.
    let Some((latest_index, latest)) = history.back().copied() else { return Some(Duration::ZERO) };
    if taking_over >= latest_index {
        return Some(Duration::ZERO);
    }
    let since = history.iter().rev().find(|(index, _)| *index <= taking_over).or(history.front());
    Some(since.map_or(Duration::ZERO, |(_, at)| latest.saturating_duration_since(*at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_that_of_the_follower_that_would_take_over() {
        let start = Instant::now();
        let history: VecDeque<(u64, Instant)> =
            [(10, start), (20, start + Duration::from_secs(1)), (30, start + Duration::from_secs(2))].into();
        let now = start + Duration::from_secs(3);
        let fresh = |applied: u64| (applied, now);
        // Three voters: the better follower counts. It applied 25: the leader was at 20 a second
        // before its latest point.
        assert_eq!(quorum_lag(3, &[fresh(5), fresh(25)], &history, now), Some(Duration::from_secs(1)));
        // Up to date.
        assert_eq!(quorum_lag(3, &[fresh(30), fresh(0)], &history, now), Some(Duration::ZERO));
        // Behind the whole history: at least all of it.
        assert_eq!(quorum_lag(3, &[fresh(3), fresh(2)], &history, now), Some(Duration::from_secs(2)));
        // Five voters: the leader and the best follower may go together (one site); the second
        // best of four counts.
        let reports = [fresh(30), fresh(15), fresh(0), fresh(9)];
        assert_eq!(quorum_lag(5, &reports, &history, now), Some(Duration::from_secs(2)));
        // One of them down: the other three must all stay, and the best of them counts.
        assert_eq!(quorum_lag(5, &[fresh(30), fresh(15), fresh(9)], &history, now), Some(Duration::ZERO));
        // Too few answer for a quorum without the leader (a report older than REPORT_FRESH does
        // not count): nothing to keep pace with.
        let stale = (30, now - REPORT_FRESH - Duration::from_millis(1));
        assert_eq!(quorum_lag(3, &[fresh(3), stale], &history, now), None);
        assert_eq!(quorum_lag(3, &[fresh(30)], &history, now), None);
        assert_eq!(quorum_lag(5, &[fresh(30), fresh(20), stale, stale], &history, now), None);
        assert_eq!(quorum_lag(1, &[], &history, now), None);
    }

    /// In real time (the lag is measured on the clock): about 1.5 s.
    #[tokio::test]
    async fn a_proposal_waits_for_a_follower_behind_but_never_longer_than_wait_max() {
        let voters = BTreeSet::from([1, 2, 3]);
        let pace = Pace::default();
        pace.applied(10);
        tokio::time::sleep(LAG_MAX + Duration::from_millis(50)).await;
        pace.applied(20);
        pace.heard(2, 20);
        assert_eq!(
            pace.keep(&voters, 1).await,
            Duration::ZERO,
            "node 3 silent: no quorum without the leader"
        );
        pace.heard(3, 10);
        assert_eq!(pace.keep(&voters, 1).await, Duration::ZERO, "node 2 up to date: no wait");
        // Node 2 (the better follower) lacks what the leader applied in the last 350 ms, and
        // catches up 100 ms into the wait.
        pace.heard(2, 15);
        let catch_up = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pace.heard(2, 20);
        };
        let (waited, ()) = tokio::join!(pace.keep(&voters, 1), catch_up);
        assert!(waited >= Duration::from_millis(100) && waited < WAIT_MAX, "{waited:?}");
        // Stuck behind, answering all along: WAIT_MAX at most.
        pace.heard(2, 15);
        let answering = async {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                pace.heard(2, 15);
                pace.heard(3, 10);
            }
        };
        let (waited, ()) = tokio::join!(pace.keep(&voters, 1), answering);
        assert!(waited >= WAIT_MAX && waited < WAIT_MAX + Duration::from_millis(500), "{waited:?}");
    }
}
