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
//! (`pb::RaftMessage::applied_index`), and its lag is how long it needs to apply what it lacks:
//! as long as the leader took for it, or its backlog at its own recent rate if that is longer.
//! Of the followers answering lately (`REPORT_FRESH`), the leader and as many others as a quorum
//! can spare could be lost together; the best of those that would remain is the one that counts
//! (`quorum_lag`: the best follower of three voters, the second best of five). While it lags more
//! than `--pace-lag-ms` (1 s by default), the leader holds back its next entry (`Pace::keep`), at
//! most `WAIT_MAX` (250 ms) each: a throttle, not a stop. The queue grows, and past
//! `--max-queue-wait-ms` writes are refused at once as at capacity, which is what the cluster then
//! is. Light writes (`batcher`) are not held: few and small, they are not what makes a follower
//! fall behind. With too few followers answering for a quorum to survive the leader (one of three
//! away), the furthest behind of those answering counts: once the voter away is back, the followers
//! that stayed are the successors, and a fault then needs them ready. `--pace-lag-all-ms` (off by
//! default) bounds every follower that answers too, a lone one included: the one that fell behind
//! while another could take over is the one the next fault may need (one run at rush hour: the
//! load's writes flowed after every fault, at the cost of a third of them refused;
//! docs/results/chaos.md).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::types::NodeId;

/// The default longest the follower that would take over may be behind in applying before the
/// leader holds back new entries (`--pace-lag-ms`): about what a new leader needs to catch up
/// before it answers writes. (300 ms held proposals back most of the time at rush hour, where
/// followers trail by a few hundred ms in the normal course, and follower faults stopped writes
/// longer than before.)
pub const LAG_MAX_DEFAULT: Duration = Duration::from_secs(1);
/// The longest one proposal waits for followers: a throttle, not a stop. (1 s made each wait a
/// second without writes, and a one-second retry hint for the clients refused meanwhile.)
pub const WAIT_MAX: Duration = Duration::from_millis(250);
/// A follower's report is used this long; older, it counts as not answering.
pub const REPORT_FRESH: Duration = Duration::from_secs(1);
/// How often a held-back proposal looks again.
const CHECK_EVERY: Duration = Duration::from_millis(5);
/// Points of the leader's own apply history kept: at ~20 entries a second at rush hour, minutes.
const HISTORY_MAX: usize = 4096;

/// A follower's reports apply rate is measured over this long (at least `RATE_SPAN_MIN`).
const RATE_WINDOW: Duration = Duration::from_secs(2);
const RATE_SPAN_MIN: Duration = Duration::from_millis(200);

pub struct Pace {
    /// Lag past which proposals are held back (`--pace-lag-ms`); `None`: never.
    lag_max: Option<Duration>,
    /// Lag of any follower answering past which proposals are held back too
    /// (`--pace-lag-all-ms`); `None`: no such bound.
    lag_all_max: Option<Duration>,
    /// Each follower's applied index as its answers said, and when they came: the last
    /// `RATE_WINDOW` of them, oldest first.
    followers: Mutex<BTreeMap<NodeId, VecDeque<(u64, Instant)>>>,
    /// This node's applied index as it grew, and when: (index, when it was reached), oldest first.
    applied_at: Mutex<VecDeque<(u64, Instant)>>,
    /// When `keep` last let a proposal go: a held-back proposal waits at most until `WAIT_MAX`
    /// after that.
    last_let_go: Mutex<Option<Instant>>,
}

/// What the leader knows of one follower.
#[derive(Clone, Copy, Debug)]
struct Report {
    applied: u64,
    at: Instant,
    /// Entries it applied per second lately, if it applied any over long enough to tell.
    rate: Option<f64>,
}

impl Pace {
    /// Holds proposals back while the follower that would take over lags more than `lag_max`
    /// (never if zero).
    pub fn new(lag_max: Duration) -> Pace {
        Pace {
            lag_max: Some(lag_max).filter(|lag| !lag.is_zero()),
            lag_all_max: None,
            followers: Mutex::default(),
            applied_at: Mutex::default(),
            last_let_go: Mutex::default(),
        }
    }

    /// Holds proposals back also while any follower answering lags more than `lag_all_max`
    /// (never if zero): the one that fell behind while another could take over, or while it was
    /// the only follower, is the one the next fault may need.
    pub fn with_lag_all_max(mut self, lag_all_max: Duration) -> Pace {
        self.lag_all_max = Some(lag_all_max).filter(|lag| !lag.is_zero());
        self
    }

    /// Whether the follower that would take over from `me` among `voters` is within the lag
    /// allowed (or too few answer to tell, or pacing is off), and every follower answering
    /// within `lag_all_max` if there is one.
    pub fn keeps_up(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> bool {
        self.keeps_up_with(self.quorum_lag(voters, me), voters, me)
    }

    /// `keeps_up`, given the quorum's lag `quorum_lag` already looked up.
    fn keeps_up_with(&self, quorum_lag: Option<Duration>, voters: &BTreeSet<NodeId>, me: NodeId) -> bool {
        let quorum_keeps_up = self.lag_max.is_none_or(|lag_max| quorum_lag.is_none_or(|lag| lag <= lag_max));
        let all_keep_up = self
            .lag_all_max
            .is_none_or(|lag_all_max| self.worst_lag(voters, me).is_none_or(|lag| lag <= lag_all_max));
        quorum_keeps_up && all_keep_up
    }

    /// Follower `id` answered, saying it has applied up to `applied`.
    pub fn heard(&self, id: NodeId, applied: u64) {
        let now = Instant::now();
        let mut followers = self.followers.lock().unwrap();
        let reports = followers.entry(id).or_default();
        reports.push_back((applied, now));
        while reports.front().is_some_and(|(_, at)| now.saturating_duration_since(*at) > RATE_WINDOW) {
            reports.pop_front();
        }
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

    /// How long this node needs to apply up to `committed` at the rate it applied over the last
    /// `RATE_WINDOW` (to now, so that a stall counts): zero when it has, `None` when it applied
    /// too little lately to tell (`node::standing`, `service::cluster`).
    pub fn backlog(&self, committed: u64) -> Option<Duration> {
        own_backlog(&self.applied_at.lock().unwrap(), committed, Instant::now())
    }

    /// How far behind in applying the follower that would take over from this node `me` among
    /// `voters` is (the furthest behind of those answering, if too few answered lately for a
    /// quorum without `me`), or `None` if none did.
    pub fn quorum_lag(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Option<Duration> {
        let reports = self.reports(voters, me);
        let history = self.applied_at.lock().unwrap();
        quorum_lag(voters.len(), &reports, &history, Instant::now())
    }

    /// How far behind in applying the furthest behind of the followers among `voters` that
    /// answered lately is, or `None` if none did.
    pub fn worst_lag(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Option<Duration> {
        let reports = self.reports(voters, me);
        let history = self.applied_at.lock().unwrap();
        worst_lag(&reports, &history, Instant::now())
    }

    /// The follower among `voters` (not `me`) that answered lately and has applied the most, with
    /// the index it applied: whom a leader behind in applying hands over to
    /// (`service::cluster::hand_over_while_applying`), known from the answers to its appends
    /// without asking anyone.
    pub fn most_applied(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Option<(NodeId, u64)> {
        let now = Instant::now();
        let followers = self.followers.lock().unwrap();
        voters
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| {
                followers.get(id).and_then(|reports| reports.back()).map(|(applied, at)| (*id, *applied, *at))
            })
            .filter(|(_, _, at)| now.saturating_duration_since(*at) <= REPORT_FRESH)
            .max_by_key(|(_, applied, _)| *applied)
            .map(|(id, applied, _)| (id, applied))
    }

    /// The latest report of each follower among `voters` (not `me`).
    fn reports(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Vec<Report> {
        let followers = self.followers.lock().unwrap();
        voters.iter().filter(|id| **id != me).filter_map(|id| followers.get(id)).filter_map(report).collect()
    }

    /// Waits while the follower that would take over is more than the lag allowed behind (or,
    /// with `lag_all_max`, any follower answering is further behind than that), until `WAIT_MAX`
    /// after the proposal it let go before; returns how long it waited.
    ///
    /// The hold spaces proposals out (one per `WAIT_MAX` at most while a follower lags): it slows
    /// the leader down to what the follower can take, and never adds a wait after a pause of
    /// that long. (Until 2026-12-07 each held proposal waited `WAIT_MAX` from its own call: a new
    /// leader whose only follower was behind held its first entry a quarter of a second, a third
    /// of the write gap after a leader kill at rush hour.)
    pub async fn keep(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Duration {
        if self.lag_max.is_none() && self.lag_all_max.is_none() {
            return Duration::ZERO;
        }
        let started = Instant::now();
        let until = self.last_let_go.lock().unwrap().map_or(started, |at| at + WAIT_MAX);
        let mut held = false;
        loop {
            let quorum_lag = self.quorum_lag(voters, me);
            if let Some(lag) = quorum_lag {
                crate::metrics::FOLLOWER_LAG_MS.set(lag.as_millis() as i64);
            }
            let now = Instant::now();
            if self.keeps_up_with(quorum_lag, voters, me) || now >= until {
                let waited = if held { now.saturating_duration_since(started) } else { Duration::ZERO };
                if held {
                    crate::metrics::PACE_WAIT_SECONDS.observe(waited.as_secs_f64());
                }
                *self.last_let_go.lock().unwrap() = Some(now);
                return waited;
            }
            held = true;
            tokio::time::sleep(CHECK_EVERY.min(until - now)).await;
        }
    }
}

/// The latest of a follower's `reports`, with its apply rate over them.
fn report(reports: &VecDeque<(u64, Instant)>) -> Option<Report> {
    let (first, since) = *reports.front()?;
    let (applied, at) = *reports.back()?;
    let span = at.saturating_duration_since(since);
    let rate =
        (span >= RATE_SPAN_MIN && applied > first).then(|| (applied - first) as f64 / span.as_secs_f64());
    Some(Report { applied, at, rate })
}

/// `Pace::backlog` on its inputs: this node's apply `history` (oldest first) and `now`.
fn own_backlog(history: &VecDeque<(u64, Instant)>, committed: u64, now: Instant) -> Option<Duration> {
    let (applied, _) = *history.back()?;
    if applied >= committed {
        return Some(Duration::ZERO);
    }
    let window_start = history.iter().rev().find(|(_, at)| now.saturating_duration_since(*at) >= RATE_WINDOW);
    let (start, since) = *window_start.or(history.front())?;
    let span = now.saturating_duration_since(since);
    if span < RATE_SPAN_MIN || applied == start {
        return None;
    }
    let rate = (applied - start) as f64 / span.as_secs_f64();
    Some(Duration::from_secs_f64(((committed - applied) as f64 / rate).min(3600.0)))
}

/// `Pace::quorum_lag` on its inputs: `voters` in all (the leader one of them), the `reports` of
/// the others, and the leader's apply `history`.
///
/// While a voter is away (down, paused, cut off) the followers that answer are the ones the
/// cluster leans on: the run that left them unpaced (`None` here until 2026-12-07) saw the only
/// follower left fall 350 entries behind while the other was killed, and the next lost leader
/// stopped writes for 9.7 s while its successor applied (docs/results/chaos.md).
fn quorum_lag(
    voters: usize,
    reports: &[Report],
    history: &VecDeque<(u64, Instant)>,
    now: Instant,
) -> Option<Duration> {
    let quorum = voters / 2 + 1;
    let mut lags: Vec<Duration> = fresh_lags(reports, history, now).collect();
    lags.sort_unstable();
    // Too few answer for a quorum without the leader: every one of them is needed once the
    // voters away are back (those come back behind, in their log or their applying), and the one
    // furthest behind may be the one that takes over.
    if lags.len() < quorum {
        return lags.last().copied();
    }
    // The leader and the `spare` best followers lost, the best that remains takes over.
    let spare = lags.len() - quorum;
    Some(lags[spare])
}

/// `Pace::worst_lag` on its inputs: the lag of the furthest behind of the `reports` fresh at `now`.
fn worst_lag(reports: &[Report], history: &VecDeque<(u64, Instant)>, now: Instant) -> Option<Duration> {
    fresh_lags(reports, history, now).max()
}

/// The lag of each of the `reports` fresh at `now`.
fn fresh_lags<'a>(
    reports: &'a [Report],
    history: &'a VecDeque<(u64, Instant)>,
    now: Instant,
) -> impl Iterator<Item = Duration> + 'a {
    reports
        .iter()
        .filter(move |report| now.saturating_duration_since(report.at) <= REPORT_FRESH)
        .map(|report| lag(report, history))
}

/// How long `report`'s follower needs to apply what the leader has and it has not: that much of
/// the leader's own applying (from when the leader was where the follower is now to its latest
/// point: not to now, so that it shrinks as the follower applies while the leader waits), or, if
/// longer, its backlog at the rate it has been applying lately (a follower slower than the
/// leader takes longer than the leader took).
fn lag(report: &Report, history: &VecDeque<(u64, Instant)>) -> Duration {
    let Some((latest_index, latest)) = history.back().copied() else { return Duration::ZERO };
    if report.applied >= latest_index {
        return Duration::ZERO;
    }
    let since = history.iter().rev().find(|(index, _)| *index <= report.applied).or(history.front());
    let leader_took = since.map_or(Duration::ZERO, |(_, at)| latest.saturating_duration_since(*at));
    let backlog = (latest_index - report.applied) as f64;
    let at_its_rate =
        report.rate.map_or(Duration::ZERO, |rate| Duration::from_secs_f64((backlog / rate).min(3600.0)));
    leader_took.max(at_its_rate)
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
        let fresh = |applied: u64| Report { applied, at: now, rate: None };
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
        // not count): the furthest behind of those that answer counts, a lone one too.
        let stale = Report { at: now - REPORT_FRESH - Duration::from_millis(1), ..fresh(30) };
        assert_eq!(quorum_lag(3, &[fresh(3), stale], &history, now), Some(Duration::from_secs(2)));
        assert_eq!(quorum_lag(3, &[fresh(30)], &history, now), Some(Duration::ZERO));
        assert_eq!(
            quorum_lag(5, &[fresh(30), fresh(20), stale, stale], &history, now),
            Some(Duration::from_secs(1))
        );
        // None answers, or no other voter: nothing to keep pace with.
        assert_eq!(quorum_lag(3, &[stale, stale], &history, now), None);
        assert_eq!(quorum_lag(1, &[], &history, now), None);
        // A follower slower than the leader: 15 entries behind at 5 a second is 3 s, though the
        // leader applied them in 2.
        let slow = Report { rate: Some(5.0), ..fresh(15) };
        let slower = Report { rate: Some(1.0), ..fresh(0) };
        assert_eq!(quorum_lag(3, &[slow, slower], &history, now), Some(Duration::from_secs(3)));
        // Faster than the leader: the leader's time counts.
        let fast = Report { rate: Some(100.0), ..fresh(15) };
        assert_eq!(quorum_lag(3, &[fast, slower], &history, now), Some(Duration::from_secs(2)));
    }

    /// `--pace-lag-all-ms`: the furthest behind of the followers answering counts, a lone one
    /// too (no quorum without the leader), a silent one not.
    #[test]
    fn the_worst_lag_is_that_of_the_follower_furthest_behind_that_answers() {
        let start = Instant::now();
        let history: VecDeque<(u64, Instant)> =
            [(10, start), (20, start + Duration::from_secs(1)), (30, start + Duration::from_secs(2))].into();
        let now = start + Duration::from_secs(3);
        let fresh = |applied: u64| Report { applied, at: now, rate: None };
        let stale = Report { at: now - REPORT_FRESH - Duration::from_millis(1), ..fresh(0) };
        assert_eq!(worst_lag(&[fresh(30), fresh(20)], &history, now), Some(Duration::from_secs(1)));
        assert_eq!(worst_lag(&[fresh(20)], &history, now), Some(Duration::from_secs(1)), "a lone follower");
        assert_eq!(worst_lag(&[fresh(30), stale], &history, now), Some(Duration::ZERO));
        assert_eq!(worst_lag(&[stale], &history, now), None);
    }

    /// With a bound on every follower, one far behind holds proposals back though the other is
    /// up to date (without it, the up-to-date one could take over: nothing is held back).
    #[tokio::test]
    async fn a_bound_on_every_follower_holds_back_for_the_one_far_behind() {
        let voters = BTreeSet::from([1, 2, 3]);
        let quorum_only = Pace::new(LAG_MAX_DEFAULT);
        let every = Pace::new(LAG_MAX_DEFAULT).with_lag_all_max(Duration::from_millis(200));
        for pace in [&quorum_only, &every] {
            pace.applied(10);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for pace in [&quorum_only, &every] {
            pace.applied(20);
            pace.heard(2, 20);
            pace.heard(3, 10);
        }
        assert!(quorum_only.keeps_up(&voters, 1));
        assert!(!every.keeps_up(&voters, 1), "node 3 is 300 ms behind, 200 allowed");
        // Node 2 silent: node 3 alone answers, and is still held to the bound.
        let lone = Pace::new(LAG_MAX_DEFAULT).with_lag_all_max(Duration::from_millis(200));
        lone.applied(10);
        tokio::time::sleep(Duration::from_millis(300)).await;
        lone.applied(20);
        lone.heard(3, 10);
        assert!(!lone.keeps_up(&voters, 1), "a lone follower far behind");
        assert!(Pace::new(LAG_MAX_DEFAULT).keeps_up(&voters, 1), "no bound: nothing to keep pace with");
        // The first proposal goes (no proposal before it to space it from); the next waits.
        assert_eq!(lone.keep(&voters, 1).await, Duration::ZERO);
        let waited = lone.keep(&voters, 1).await;
        assert!(waited >= WAIT_MAX - Duration::from_millis(10), "held back about WAIT_MAX: {waited:?}");
    }

    #[test]
    fn a_followers_rate_is_measured_over_its_recent_reports() {
        let start = Instant::now();
        let reports: VecDeque<(u64, Instant)> =
            [(100, start), (150, start + Duration::from_millis(500)), (200, start + Duration::from_secs(1))]
                .into();
        let report = report(&reports).unwrap();
        assert_eq!((report.applied, report.rate), (200, Some(100.0)));
        let too_short: VecDeque<(u64, Instant)> =
            [(100, start), (200, start + Duration::from_millis(100))].into();
        assert_eq!(super::report(&too_short).unwrap().rate, None);
        let idle: VecDeque<(u64, Instant)> = [(100, start), (100, start + Duration::from_secs(1))].into();
        assert_eq!(super::report(&idle).unwrap().rate, None);
    }

    /// `--pace-lag-ms 0`: a follower far behind holds nothing back.
    #[tokio::test]
    async fn pacing_off_never_holds_a_proposal_back() {
        let voters = BTreeSet::from([1, 2, 3]);
        let pace = Pace::new(Duration::ZERO);
        pace.applied(10);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pace.applied(20);
        pace.heard(2, 10);
        pace.heard(3, 10);
        assert!(pace.quorum_lag(&voters, 1).is_some_and(|lag| lag >= Duration::from_millis(300)));
        assert!(pace.keeps_up(&voters, 1));
        assert_eq!(pace.keep(&voters, 1).await, Duration::ZERO);
        let paced = Pace::new(Duration::from_millis(100));
        paced.applied(10);
        tokio::time::sleep(Duration::from_millis(300)).await;
        paced.applied(20);
        paced.heard(2, 10);
        paced.heard(3, 10);
        assert!(!paced.keeps_up(&voters, 1), "300 ms behind, 100 allowed");
    }

    /// In real time (the lag is measured on the clock): about 1.5 s.
    #[tokio::test]
    async fn a_proposal_waits_for_a_follower_behind_but_never_longer_than_wait_max() {
        let voters = BTreeSet::from([1, 2, 3]);
        let pace = Pace::new(LAG_MAX_DEFAULT);
        pace.applied(10);
        tokio::time::sleep(LAG_MAX_DEFAULT + Duration::from_millis(50)).await;
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
        // Until WAIT_MAX after the proposal let go before, which was a moment ago.
        let almost = WAIT_MAX - Duration::from_millis(10);
        assert!(waited >= almost && waited < WAIT_MAX + Duration::from_millis(500), "{waited:?}");
        // Still behind, but no proposal for WAIT_MAX (a new leader's first, after an election):
        // it goes at once, and the next one waits.
        tokio::time::sleep(WAIT_MAX).await;
        pace.heard(2, 15);
        pace.heard(3, 10);
        assert_eq!(pace.keep(&voters, 1).await, Duration::ZERO, "the first after a pause waits");
        let waited = pace.keep(&voters, 1).await;
        assert!(waited >= almost && waited < WAIT_MAX + Duration::from_millis(500), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_follower_that_applied_most_is_the_one_answering_lately() {
        let voters = BTreeSet::from([1, 2, 3, 4]);
        let pace = Pace::new(LAG_MAX_DEFAULT);
        assert_eq!(pace.most_applied(&voters, 1), None, "no one answered");
        pace.heard(2, 40);
        pace.heard(4, 90);
        tokio::time::advance(REPORT_FRESH + Duration::from_millis(1)).await;
        pace.heard(3, 30);
        pace.heard(1, 100);
        // Node 4's report is stale, node 1 is the leader itself.
        assert_eq!(pace.most_applied(&voters, 1), Some((3, 30)));
        pace.heard(2, 50);
        assert_eq!(pace.most_applied(&voters, 1), Some((2, 50)));
        // Not a voter (a learner, or removed).
        pace.heard(5, 500);
        assert_eq!(pace.most_applied(&voters, 1), Some((2, 50)));
    }

    #[test]
    fn a_nodes_own_backlog_takes_as_long_as_its_recent_rate_says() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 10 entries a second over the last two seconds (what came before does not count).
        let history: VecDeque<(u64, Instant)> =
            [(0, at(0)), (100, at(1000)), (110, at(2000)), (130, at(4000))].into();
        let now = at(4000);
        assert_eq!(own_backlog(&history, 130, now), Some(Duration::ZERO));
        assert_eq!(own_backlog(&history, 150, now), Some(Duration::from_secs(2)));
        // A stall counts: at 5 s, 20 entries in the 3 s since the window's start; at 6 s, none
        // in the window's 2 s: the rate is unknown.
        assert_eq!(own_backlog(&history, 140, at(6000)), None);
        assert_eq!(own_backlog(&history, 140, at(5000)), Some(Duration::from_millis(1500)));
        // Too short a history, or none.
        let young: VecDeque<(u64, Instant)> = [(5, at(0)), (9, at(100))].into();
        assert_eq!(own_backlog(&young, 20, at(150)), None);
        assert_eq!(own_backlog(&VecDeque::new(), 20, now), None);
    }
}
