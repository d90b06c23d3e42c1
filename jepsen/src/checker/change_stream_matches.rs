//! The change stream a client read during the run, resumed across every fault from the last
//! timestamp it had, matches the final ledger: after de-duplicating by timestamp, no timestamp
//! carries two different events, none goes back in time, every transfer event is a transfer the
//! ledger holds at that timestamp, every expiry is of a pending transfer it holds, and every
//! stored transfer up to the last event read is in the stream (no gap). The subscriber must have
//! reached the ledger's last transfer by the end.
//!
//! The background load's transfers (ids from `load::LOAD_TRANSFER_ID_BASE`) are not in the final
//! listing; their events are held to the ordering rules only.

use std::collections::BTreeMap;

use super::{Verdict, complete_final_state, flags};
use crate::history::{FoundTransfer, History, StreamedEvent};

pub const NAME: &str = "change-stream-matches";
const GUARANTEE: &str = "the change stream, resumed across faults, lists every applied event once, in ledger \
                         time, and nothing that was not applied";

/// Transfer ids of the background load start here (`load.rs`).
const LOAD_TRANSFER_ID_BASE: u128 = 1 << 100;

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(end) = history.stream_end else {
        // A history recorded before the harness subscribed: nothing to hold against.
        return verdict;
    };
    let Some(state) = complete_final_state(history, &mut verdict) else { return verdict };
    let mut by_timestamp: BTreeMap<u64, &StreamedEvent> = BTreeMap::new();
    let mut newest = 0u64;
    for event in &history.streamed {
        verdict.checked += 1;
        match by_timestamp.get(&event.timestamp) {
            Some(seen) if *seen != event => verdict.problem(format!(
                "two different events at {}: {} {} and {} {}",
                event.timestamp, seen.kind, seen.id, event.kind, event.id
            )),
            Some(_) => {}
            None if event.timestamp < newest => verdict.problem(format!(
                "{} {} at {} came after an event at {}: the stream went back in time",
                event.kind, event.id, event.timestamp, newest
            )),
            None => {
                by_timestamp.insert(event.timestamp, event);
            }
        }
        newest = newest.max(event.timestamp);
    }
    let stored: BTreeMap<u128, &FoundTransfer> = state.transfers.iter().map(|t| (t.id, t)).collect();
    for event in by_timestamp.values() {
        if event.kind == "account_created" || event.id >= LOAD_TRANSFER_ID_BASE {
            continue;
        }
        match (stored.get(&event.id), event.kind.as_str()) {
            (None, kind) => verdict.problem(format!(
                "the stream has {kind} {} at {}, which the ledger does not hold",
                event.id, event.timestamp
            )),
            (Some(pending), "two_phase_expired")
                if pending.flags & flags::PENDING == 0 || event.timestamp <= pending.timestamp =>
            {
                verdict.problem(format!(
                    "the stream expires transfer {} at {}, which is not a pending transfer made before then",
                    event.id, event.timestamp
                ))
            }
            (Some(_), "two_phase_expired") => {}
            (Some(transfer), kind) if transfer.timestamp != event.timestamp => verdict.problem(format!(
                "the stream has {kind} {} at {}, which the ledger holds at {}",
                event.id, event.timestamp, transfer.timestamp
            )),
            _ => {}
        }
    }
    for transfer in state.transfers.iter().filter(|t| t.timestamp <= newest) {
        match by_timestamp.get(&transfer.timestamp) {
            Some(event) if event.id == transfer.id => {}
            _ => verdict.problem(format!(
                "transfer {} at {} is missing from the stream, which went on to {newest}",
                transfer.id, transfer.timestamp
            )),
        }
    }
    let (caught_up, last) = end;
    let ledger_last = state.transfers.iter().map(|t| t.timestamp).max().unwrap_or(0);
    if !caught_up || last < ledger_last {
        verdict.problem(format!(
            "the subscriber stopped at {last} without reaching the ledger's last transfer at {ledger_last}"
        ));
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;

    fn event(timestamp: u64, kind: &str, id: u128) -> StreamedEvent {
        StreamedEvent { timestamp, kind: kind.into(), id }
    }

    /// The fixture bank's history (transfers 1 and 2 at 1 and 2) with a stream and its end.
    fn with_stream(events: Vec<StreamedEvent>, caught_up: bool, last: u64) -> History {
        let mut history = Builder::new().finish(balances_after(0), Builder::funding());
        history.streamed = events;
        history.stream_end = Some((caught_up, last));
        history
    }

    fn whole() -> Vec<StreamedEvent> {
        vec![
            event(1, "single_phase", 1),
            event(2, "single_phase", 2),
            event(2, "single_phase", 2),
            event(5, "single_phase", LOAD_TRANSFER_ID_BASE + 1),
        ]
    }

    #[test]
    fn the_whole_history_once_after_de_duplication_passes() {
        let verdict = check(&with_stream(whole(), true, 5));
        assert!(verdict.valid, "{:?}", verdict.problems);
        assert_eq!(verdict.checked, 4);
    }

    #[test]
    fn a_history_without_a_stream_is_not_judged() {
        let history = Builder::new().finish(balances_after(0), Builder::funding());
        let verdict = check(&history);
        assert!(verdict.valid && verdict.checked == 0);
    }

    #[test]
    fn a_gap_fails() {
        let events = vec![event(2, "single_phase", 2)];
        let verdict = check(&with_stream(events, true, 2));
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("transfer 1 at 1 is missing"), "{:?}", verdict.problems);
    }

    #[test]
    fn an_event_not_applied_fails() {
        let mut events = whole();
        events.push(event(6, "single_phase", 77));
        let verdict = check(&with_stream(events, true, 6));
        assert!(
            verdict.problems.iter().any(|p| p.contains("77") && p.contains("does not hold")),
            "{:?}",
            verdict.problems
        );
    }

    #[test]
    fn a_transfer_at_another_time_fails() {
        let events = vec![event(1, "single_phase", 1), event(3, "single_phase", 2)];
        let verdict = check(&with_stream(events, true, 3));
        assert!(verdict.problems.iter().any(|p| p.contains("holds at 2")), "{:?}", verdict.problems);
    }

    #[test]
    fn two_events_at_one_timestamp_fail() {
        let mut events = whole();
        events.push(event(2, "single_phase", 9));
        let verdict = check(&with_stream(events, true, 5));
        assert!(
            verdict.problems.iter().any(|p| p.contains("two different events at 2")),
            "{:?}",
            verdict.problems
        );
    }

    #[test]
    fn going_back_in_time_fails() {
        let events = vec![event(2, "single_phase", 2), event(1, "single_phase", 1)];
        let verdict = check(&with_stream(events, true, 2));
        assert!(verdict.problems.iter().any(|p| p.contains("back in time")), "{:?}", verdict.problems);
    }

    #[test]
    fn an_expiry_of_what_was_not_pending_fails() {
        let mut events = whole();
        events.push(event(7, "two_phase_expired", 1));
        let verdict = check(&with_stream(events, true, 7));
        assert!(
            verdict.problems.iter().any(|p| p.contains("not a pending transfer")),
            "{:?}",
            verdict.problems
        );
    }

    #[test]
    fn a_subscriber_that_never_caught_up_fails() {
        let verdict = check(&with_stream(vec![event(1, "single_phase", 1)], false, 1));
        assert!(verdict.problems.iter().any(|p| p.contains("without reaching")), "{:?}", verdict.problems);
    }
}
