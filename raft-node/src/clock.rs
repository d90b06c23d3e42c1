//! Cluster time: ledger time follows what a majority of the voters' clocks say, not one
//! machine's (DESIGN.md §13).
//!
//! Every node asks every other voter for its wall clock every `SAMPLE_INTERVAL` (`Raft.Clock`)
//! and keeps the last answer of each: the peer's offset from this node's clock, with half the
//! round trip as its error. Each voter's clock then stands for an interval of offsets (its
//! offset, widened by its error and by half the tolerance, so that two intervals meet when the
//! clocks agree within the tolerance), and Marzullo's algorithm finds the window where most of
//! them meet (`window`). The leader stamps an entry with its own clock moved into that window.
//! When fewer than a majority of the voters' clocks meet, or its own clock is off the window by
//! more than the tolerance, it does not stamp: the write is refused as UNAVAILABLE (nothing
//! written, safe to retry) and the leader hands its leadership to a voter whose clock agrees
//! (`sample_peers`). So a leader an hour fast cannot move ledger time an hour ahead, and after a
//! failover time does not creep along 1 ns per event to catch up with a leader that was ahead.
//!
//! The ledger still makes timestamps strictly increasing (`max(proposed, last + 1)`); this
//! module only bounds what is proposed.
//!
//! `--clock-skew-file` is a test hook for the chaos harness: the file holds `OFFSET_MS
//! DRIFT_PPM`, re-read every `SKEW_RELOAD_INTERVAL`, and this node's wall clock reads as if it
//! were off by that offset and drifting at that rate since the file changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

// tokio's clock wherever time drives a decision (a sample's age, a hand-over's pause): a
// simulation advances it (issue 26); the same clock as std's in production.
use tokio::time::Instant;

use openraft::type_config::async_runtime::WatchReceiver;

use crate::types::NodeId;

/// How far a clock may be from the window of a majority's clocks before its node stops
/// stamping, by default.
pub const TOLERANCE_MS_DEFAULT: u64 = 1000;
/// How often each node samples each other voter's clock.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(200);
/// A sample older than this is not used: the peer may have been down, cut off, or its clock
/// may have jumped since.
const SAMPLE_AGE_MAX: Duration = Duration::from_secs(3);
/// How often the leader may hand over its leadership because of its clock.
pub const STEP_DOWN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the skew file of the test hook is re-read.
const SKEW_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

/// Why the leader does not stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockError {
    /// Fewer than a majority of the voters' clocks agree (or have been sampled lately).
    NoMajority { agreeing: usize, needed: usize },
    /// This node's clock is off the majority's window by more than the tolerance.
    Off { offset_ms: i64 },
}

impl std::fmt::Display for ClockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClockError::NoMajority { agreeing, needed } => write!(
                f,
                "the leader cannot tell the cluster's time: {agreeing} voters' clocks agree, {needed} needed"
            ),
            ClockError::Off { offset_ms } => {
                write!(f, "the leader's clock is {offset_ms} ms off the cluster's time; it is handing over")
            }
        }
    }
}

/// One peer's clock, as last sampled.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Its clock minus ours.
    offset_ns: i64,
    /// Half the round trip: the true offset is within this of `offset_ns`.
    error_ns: i64,
    /// Our wall clock and our monotonic clock when it was taken: if our wall clock jumps
    /// afterwards (an operator, NTP stepping it, the test hook), the offset is corrected by the
    /// jump, since the monotonic clock does not jump.
    taken_wall_ns: u64,
    taken: Instant,
}

impl Sample {
    /// The peer's offset from our wall clock as it reads at `now_wall_ns`.
    fn offset_now_ns(&self, now_wall_ns: u64) -> i64 {
        let wall = i128::from(now_wall_ns) - i128::from(self.taken_wall_ns);
        let jump = wall - self.taken.elapsed().as_nanos() as i128;
        (i128::from(self.offset_ns) - jump).clamp(i64::MIN.into(), i64::MAX.into()) as i64
    }
}

/// This node's view of the cluster's clocks.
pub struct ClusterClock {
    pub tolerance_ns: i64,
    skew: Skew,
    /// The last sample of each peer. A std mutex: held to copy a few numbers, never across an
    /// await.
    samples: Mutex<BTreeMap<NodeId, Sample>>,
}

/// Where this node's clock stands against the voters'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// How many voters' clocks meet in the window (this one included if it does).
    pub agreeing: usize,
    /// The correction that moves this node's clock into the window (0 if it is inside).
    pub offset_ns: i64,
}

impl ClusterClock {
    pub fn new(tolerance_ms: u64, skew_file: Option<PathBuf>) -> Arc<ClusterClock> {
        let clock = Arc::new(ClusterClock {
            tolerance_ns: i64::try_from(tolerance_ms).unwrap_or(i64::MAX / 1_000_000) * 1_000_000,
            skew: Skew::default(),
            samples: Mutex::new(BTreeMap::new()),
        });
        if let Some(path) = skew_file {
            tokio::spawn(reload_skew(clock.clone(), path));
        }
        clock
    }

    /// Test hook, as the skew file (`--clock-skew-file`) but set directly: from now on this
    /// node's clock is off by `offset_ms`, drifting `drift_ppm`. The simulator's clock faults.
    pub fn set_skew(&self, offset_ms: i64, drift_ppm: i64) {
        self.skew.set(offset_ms, drift_ppm);
    }

    /// This machine's wall clock, ns since the epoch (with the test hook's skew, if any).
    pub fn now_ns(&self) -> u64 {
        let system = crate::sys::wall_clock().as_nanos() as i128;
        (system + i128::from(self.skew.now_ns())).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Records a sample of `peer`'s clock: asked at `sent_ns`, answered `remote_ns`, heard back at
    /// `received_ns` (our clock). A sample whose round trip took longer than half the tolerance
    /// says too little and is dropped.
    pub fn record(&self, peer: NodeId, sent_ns: u64, remote_ns: u64, received_ns: u64) {
        let (sent, remote, received) = (i128::from(sent_ns), i128::from(remote_ns), i128::from(received_ns));
        let error_ns = ((received - sent).max(0) / 2) as i64;
        if error_ns > self.tolerance_ns / 4 {
            return;
        }
        let offset_ns = (remote - (sent + received) / 2).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        let sample = Sample { offset_ns, error_ns, taken_wall_ns: received_ns, taken: Instant::now() };
        self.samples.lock().expect("clock samples lock").insert(peer, sample);
    }

    /// Where this node's clock stands against the voters' (`voters` may include `me`).
    pub fn estimate(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Estimate {
        self.estimate_at(voters, me, self.now_ns())
    }

    fn estimate_at(&self, voters: &BTreeSet<NodeId>, me: NodeId, now_wall_ns: u64) -> Estimate {
        let half = self.tolerance_ns / 2;
        let mut intervals = vec![(-half, half)];
        let samples = self.samples.lock().expect("clock samples lock");
        for id in voters.iter().filter(|id| **id != me) {
            if let Some(sample) = samples.get(id).filter(|s| s.taken.elapsed() <= SAMPLE_AGE_MAX) {
                let reach = sample.error_ns.saturating_add(half);
                let offset = sample.offset_now_ns(now_wall_ns);
                intervals.push((offset.saturating_sub(reach), offset.saturating_add(reach)));
            }
        }
        let (agreeing, low, high) = window(&intervals);
        // With no two clocks meeting, there is no window to move towards: stay on our own.
        let offset_ns = if agreeing > 1 { 0i64.clamp(low, high) } else { 0 };
        Estimate { agreeing, offset_ns }
    }

    /// The timestamp the leader proposes for an entry: its clock, moved into the window of a
    /// majority of the voters' clocks; or why it must not stamp.
    pub fn stamp(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Result<u64, ClockError> {
        let now = self.now_ns();
        if cfg!(feature = "stamp-with-own-clock") {
            return Ok(now);
        }
        let estimate = self.estimate_at(voters, me, now);
        self.judge(&estimate, voters.len())?;
        Ok((i128::from(now) + i128::from(estimate.offset_ns)).clamp(0, i128::from(u64::MAX)) as u64)
    }

    /// Whether a node whose clock stands at `estimate` against `voters` voters may stamp.
    pub fn judge(&self, estimate: &Estimate, voters: usize) -> Result<(), ClockError> {
        let needed = voters / 2 + 1;
        if estimate.agreeing < needed {
            return Err(ClockError::NoMajority { agreeing: estimate.agreeing, needed });
        }
        if estimate.offset_ns.abs() > self.tolerance_ns {
            return Err(ClockError::Off { offset_ms: estimate.offset_ns / 1_000_000 });
        }
        Ok(())
    }

    /// A voter whose clock sits in the majority's window, to hand leadership to.
    pub fn agreeing_peer(&self, voters: &BTreeSet<NodeId>, me: NodeId) -> Option<NodeId> {
        let estimate = self.estimate(voters, me);
        let samples = self.samples.lock().expect("clock samples lock");
        voters
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| {
                samples.get(id).filter(|s| s.taken.elapsed() <= SAMPLE_AGE_MAX).map(|s| (*id, s))
            })
            .min_by_key(|(_, s)| (s.offset_ns.saturating_sub(estimate.offset_ns)).unsigned_abs())
            .map(|(id, _)| id)
    }
}

/// Marzullo's algorithm: the number of intervals that meet where most of them meet, and that
/// window (`low`, `high`). Intervals that only touch count as meeting. At least one interval.
pub fn window(intervals: &[(i64, i64)]) -> (usize, i64, i64) {
    assert!(!intervals.is_empty(), "the window of no clocks");
    // Starts sort before ends at the same offset, so touching intervals meet.
    let mut edges: Vec<(i64, i8)> =
        intervals.iter().flat_map(|(low, high)| [(*low, -1), (*high, 1)]).collect();
    edges.sort_unstable();
    let (mut count, mut best) = (0usize, (0usize, 0i64, 0i64));
    for (index, (offset, kind)) in edges.iter().enumerate() {
        if *kind == -1 {
            count += 1;
            if count > best.0 {
                // Every start has its end later in the sorted edges.
                best = (count, *offset, edges[index + 1].0);
            }
        } else {
            count -= 1;
        }
    }
    best
}

/// The test hook's skew: an offset and a drift rate from a moment on.
#[derive(Default)]
struct Skew {
    offset_ns: AtomicI64,
    drift_ppm: AtomicI64,
    /// When the drift began, as ns since `BASE`.
    drift_since_ns: AtomicI64,
}

static BASE: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();

fn since_base_ns() -> i64 {
    BASE.get_or_init(tokio::time::Instant::now).elapsed().as_nanos() as i64
}

impl Skew {
    fn now_ns(&self) -> i64 {
        let drift_ppm = self.drift_ppm.load(Ordering::Relaxed);
        let offset = self.offset_ns.load(Ordering::Relaxed);
        if drift_ppm == 0 {
            return offset;
        }
        let elapsed = since_base_ns() - self.drift_since_ns.load(Ordering::Relaxed);
        offset.saturating_add((i128::from(elapsed) * i128::from(drift_ppm) / 1_000_000) as i64)
    }

    fn set(&self, offset_ms: i64, drift_ppm: i64) {
        self.offset_ns.store(offset_ms.saturating_mul(1_000_000), Ordering::Relaxed);
        self.drift_ppm.store(drift_ppm, Ordering::Relaxed);
        self.drift_since_ns.store(since_base_ns(), Ordering::Relaxed);
    }
}

/// Parses the skew file: `OFFSET_MS [DRIFT_PPM]`.
pub fn parse_skew(text: &str) -> Result<(i64, i64), String> {
    let mut words = text.split_whitespace();
    let error = || format!("'{}': expected OFFSET_MS [DRIFT_PPM], e.g. 3600000 0", text.trim());
    let offset = words.next().ok_or_else(error)?.parse().map_err(|_| error())?;
    let drift = words.next().map_or(Ok(0), |w| w.parse().map_err(|_| error()))?;
    if words.next().is_some() {
        return Err(error());
    }
    Ok((offset, drift))
}

/// Applies the skew file whenever it changes; a missing file means no skew.
async fn reload_skew(clock: Arc<ClusterClock>, path: PathBuf) {
    let mut applied: Option<String> = None;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if applied.as_deref() != Some(text.as_str()) {
            match if text.trim().is_empty() { Ok((0, 0)) } else { parse_skew(&text) } {
                Ok((offset_ms, drift_ppm)) => {
                    clock.skew.set(offset_ms, drift_ppm);
                    if (offset_ms, drift_ppm) != (0, 0) {
                        tracing::warn!(
                            "test hook: this node's clock is now off by {offset_ms} ms, drifting {drift_ppm} ppm"
                        );
                    } else if applied.is_some() {
                        tracing::info!("test hook: this node's clock is right again");
                    }
                }
                Err(error) => tracing::warn!("test hook {}: {error}", path.display()),
            }
            applied = Some(text);
        }
        tokio::time::sleep(SKEW_RELOAD_INTERVAL).await;
    }
}

/// The voters of the membership in effect.
pub fn voters(raft: &crate::storage::Raft) -> BTreeSet<NodeId> {
    raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marzullo_finds_where_most_clocks_meet() {
        let check = |intervals: &[(i64, i64)], expected: (usize, i64, i64)| {
            assert_eq!(window(intervals), expected, "{intervals:?}");
        };
        check(&[(-5, 5)], (1, -5, 5));
        check(&[(-5, 5), (-3, 7)], (2, -3, 5));
        check(&[(-5, 5), (5, 15)], (2, 5, 5));
        check(&[(-5, 5), (6, 16)], (1, -5, 5));
        // One clock an hour off: the other two still meet.
        check(&[(-5, 5), (3_600, 3_610), (-1, 9)], (2, -1, 5));
        check(&[(0, 10), (2, 12), (4, 14), (100, 110), (6, 16)], (4, 6, 10));
    }

    fn clock() -> ClusterClock {
        ClusterClock {
            tolerance_ns: 1_000_000_000,
            skew: Skew::default(),
            samples: Mutex::new(BTreeMap::new()),
        }
    }

    const MS: u64 = 1_000_000;

    /// Records a sample of each peer (offset in ms, 10 ms round trip) taken just now.
    fn sampled(peers: &[(NodeId, i64)]) -> ClusterClock {
        let clock = clock();
        let now = clock.now_ns();
        for (id, offset_ms) in peers {
            let remote = (now as i64 - 5 * MS as i64 + offset_ms * MS as i64) as u64;
            clock.record(*id, now - 10 * MS, remote, now);
        }
        clock
    }

    /// Milliseconds, rounded: a sample's correction for a jump of our wall clock is off by the
    /// few microseconds between reading the wall and the monotonic clock.
    fn ms(ns: i64) -> i64 {
        (ns as f64 / MS as f64).round() as i64
    }

    #[test]
    fn the_leader_stamps_only_within_a_majority() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        // (peers' offsets in ms, the correction in ms, whether it may stamp, agreeing clocks)
        let check = |peers: &[(NodeId, i64)], correction_ms: i64, stamps: bool, agreeing: usize| {
            let clock = sampled(peers);
            let estimate = clock.estimate(&voters, 1);
            let got = (ms(estimate.offset_ns), clock.stamp(&voters, 1).is_ok(), estimate.agreeing);
            assert_eq!(got, (correction_ms, stamps, agreeing), "peers {peers:?}");
        };
        // Everyone agrees: no correction.
        check(&[(2, 0), (3, 0)], 0, true, 3);
        check(&[(2, 300), (3, -200)], 0, true, 3);
        // One peer an hour off: the other one and this node are a majority.
        check(&[(2, 3_600_000), (3, 10)], 0, true, 2);
        // This node an hour fast: both peers agree without it.
        check(&[(2, -3_600_000), (3, -3_600_000)], -3_599_495, false, 2);
        // 800 ms apart from both: this node is moved towards them, within the tolerance.
        check(&[(2, 800), (3, 800)], 295, true, 3);
        // Nobody sampled, or every clock disagrees.
        check(&[], 0, false, 1);
        check(&[(2, 5_000), (3, -5_000)], 0, false, 1);
        assert_eq!(
            sampled(&[(2, 5_000), (3, -5_000)]).stamp(&voters, 1),
            Err(ClockError::NoMajority { agreeing: 1, needed: 2 })
        );
        assert!(matches!(
            sampled(&[(2, -3_600_000), (3, -3_600_000)]).stamp(&voters, 1),
            Err(ClockError::Off { offset_ms }) if (-3_599_496..=-3_599_494).contains(&offset_ms)
        ));
    }

    #[test]
    fn a_jump_of_our_own_clock_moves_every_sample() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        let clock = sampled(&[(2, 0), (3, 0)]);
        clock.skew.set(3_600_000, 0);
        let estimate = clock.estimate(&voters, 1);
        assert_eq!((ms(estimate.offset_ns), estimate.agreeing), (-3_599_495, 2));
        assert!(clock.stamp(&voters, 1).is_err());
    }

    #[test]
    fn a_slow_sample_is_dropped() {
        let clock = clock();
        let now = clock.now_ns();
        clock.record(2, now - 600 * MS, now - 300 * MS, now);
        assert_eq!(clock.estimate(&[1, 2].into(), 1).agreeing, 1);
        clock.record(2, now - 400 * MS, now - 200 * MS, now);
        assert_eq!(clock.estimate(&[1, 2].into(), 1).agreeing, 2);
    }

    #[test]
    fn skew_files_parse() {
        assert_eq!(parse_skew("3600000"), Ok((3_600_000, 0)));
        assert_eq!(parse_skew(" -250 20000\n"), Ok((-250, 20_000)));
        for bad in ["", "fast", "1 2 3", "1 x"] {
            assert!(parse_skew(bad).is_err(), "{bad:?}");
        }
    }
}
