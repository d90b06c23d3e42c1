//! Ledger time is real time: every stored transfer's timestamp lies within the nodes' clock
//! tolerance of the wall-clock moments between which it can have been applied: no earlier than
//! the first invocation that carried it, and no later than the first acknowledgement of it. A
//! leader whose clock is off (the `clock` nemesis) must neither stamp with it nor keep ledger
//! time away from real time after a failover.

use std::collections::BTreeMap;

use super::Verdict;
use crate::history::{History, Outcome};

pub const NAME: &str = "timestamps-follow-real-time";
const GUARANTEE: &str = "every stored transfer's timestamp is within the clock tolerance of when it was requested and acknowledged";

/// When a transfer can have been applied, in µs of the history's time.
#[derive(Default)]
struct Window {
    invoked_first_us: u64,
    acknowledged_first_us: Option<u64>,
}

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(clock) = history.setup.as_ref().and_then(|s| s.clock) else {
        // A history from a run before the harness recorded its clock: nothing to hold it to.
        return verdict;
    };
    let Some(state) = super::complete_final_state(history, &mut verdict) else {
        return verdict;
    };
    let mut windows: BTreeMap<u128, Window> = BTreeMap::new();
    for op in history.ops.iter().filter(|op| !op.is_read()) {
        let acknowledged = (op.outcome == Outcome::Ok).then_some(op.complete_us).flatten();
        for spec in op.transfers() {
            let window = windows
                .entry(u128::from(spec.id))
                .or_insert(Window { invoked_first_us: op.invoke_us, acknowledged_first_us: None });
            window.invoked_first_us = window.invoked_first_us.min(op.invoke_us);
            if let Some(at) = acknowledged {
                window.acknowledged_first_us = Some(window.acknowledged_first_us.map_or(at, |w| w.min(at)));
            }
        }
    }
    let tolerance_us = clock.tolerance_ms as i128 * 1000;
    let wall_us = |time_us: u64| i128::from(clock.epoch_unix_us) + i128::from(time_us);
    for transfer in &state.transfers {
        let Some(window) = windows.get(&transfer.id) else { continue };
        verdict.checked += 1;
        let stamped_us = i128::from(transfer.timestamp) / 1000;
        let early_us = wall_us(window.invoked_first_us) - stamped_us;
        let late_us = window.acknowledged_first_us.map_or(0, |at| stamped_us - wall_us(at));
        if early_us > tolerance_us || late_us > tolerance_us {
            let (how, by_us) = if early_us > 0 {
                ("before it was requested", early_us)
            } else {
                ("after it was acknowledged", late_us)
            };
            verdict.problem(format!(
                "transfer {} is stamped {:.3} s {how} (tolerance {} ms)",
                transfer.id,
                by_us as f64 / 1e6,
                clock.tolerance_ms
            ));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;

    /// A stored transfer requested at 1 s and acknowledged at 2 s (history time), stamped at
    /// `stamped_ms` after the fixture's epoch; `outcome` of its one attempt.
    fn check_stamp(stamped_ms: i64, outcome: Outcome, valid: bool) {
        let spec = single(10, A, B, 30);
        let mut stored = Builder::funding();
        for funding in &mut stored {
            funding.timestamp = EPOCH_US * 1000;
        }
        stored.push(found(&spec, ((EPOCH_US as i64 * 1000) + stamped_ms * 1_000_000) as u64));
        let history = Builder::new()
            .transfer(1_000_000, 2_000_000, vec![spec], outcome)
            .finish(balances_after(30), stored);
        let verdict = check(&history);
        assert_eq!(verdict.valid, valid, "stamped at {stamped_ms} ms, {outcome:?}: {:?}", verdict.problems);
        assert_eq!(verdict.checked, 3);
    }

    #[test]
    fn timestamps_within_the_tolerance_pass_and_others_fail() {
        check_stamp(1_500, Outcome::Ok, true);
        check_stamp(200, Outcome::Ok, true);
        check_stamp(2_900, Outcome::Ok, true);
        check_stamp(-100, Outcome::Ok, false);
        check_stamp(3_100, Outcome::Ok, false);
        check_stamp(3_600_000, Outcome::Ok, false);
        // Never acknowledged: it may have been applied any time after it was requested.
        check_stamp(60_000, Outcome::Info, true);
        check_stamp(-100, Outcome::Info, false);
    }

    #[test]
    fn a_history_without_a_clock_is_not_held_to_one() {
        let mut history = Builder::new().finish(balances_after(0), Builder::funding());
        history.setup.as_mut().unwrap().clock = None;
        let verdict = check(&history);
        assert!(verdict.valid);
        assert_eq!(verdict.checked, 0);
    }
}
