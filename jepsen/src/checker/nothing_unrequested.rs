//! Nothing appears that no client asked for: every stored transfer was requested by a client,
//! with the same accounts, amount and flags; no transfer that was definitely refused is stored;
//! and no read shows more posted money on an account than the transfers requested before the
//! read ended (and not refused) could have put there.

use std::collections::{BTreeMap, BTreeSet};

use super::{Verdict, describe, expected_flags};
use crate::history::{History, Outcome, TransferKind};

pub const NAME: &str = "nothing-unrequested";
const GUARANTEE: &str =
    "every stored transfer and every posted amount a read shows was requested by a client";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    check_stored(history, &mut verdict);
    check_reads(history, &mut verdict);
    verdict
}

fn check_stored(history: &History, verdict: &mut Verdict) {
    let Some(state) = super::complete_final_state(history, verdict) else {
        return;
    };
    let requested = history.requested();
    let refused = history.refused();
    let mut seen = BTreeSet::new();
    for stored in &state.transfers {
        verdict.checked += 1;
        if !seen.insert(stored.id) {
            verdict.problem(format!("transfer {} is stored twice", stored.id));
        }
        let Some(spec) = u64::try_from(stored.id).ok().and_then(|id| requested.get(&id)) else {
            verdict
                .problem(format!("transfer {} is stored but no client asked for it: {stored:?}", stored.id));
            continue;
        };
        let pending_id = match spec.kind {
            TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => pending_id,
            TransferKind::Single | TransferKind::Pending => 0,
        };
        let same = stored.debit == u128::from(spec.debit)
            && stored.credit == u128::from(spec.credit)
            && stored.amount == u128::from(spec.amount)
            && stored.pending_id == u128::from(pending_id)
            && stored.flags == expected_flags(spec);
        if !same {
            verdict.problem(format!(
                "transfer {} is stored as {stored:?}, but was requested as {spec:?}",
                spec.id
            ));
        }
        if refused.contains_key(&spec.id) {
            verdict.problem(format!("transfer {} was definitely refused, yet it is stored", spec.id));
        }
    }
}

/// A read may show, per account, at most the posted amounts of transfers invoked before the read
/// completed that were not definitely refused. Swept in time order.
fn check_reads(history: &History, verdict: &mut Verdict) {
    let refused = history.refused();
    let mut candidates: Vec<(u64, &crate::history::TransferSpec)> = history
        .ops
        .iter()
        .flat_map(|op| op.transfers().iter().map(move |t| (op.invoke_us, t)))
        .filter(|(_, t)| !refused.contains_key(&t.id))
        .collect();
    candidates.sort_by_key(|(invoked, _)| *invoked);
    let mut reads: Vec<_> =
        history.ops.iter().filter(|op| op.is_read() && op.outcome == Outcome::Ok).collect();
    reads.sort_by_key(|op| op.complete_or_end());

    let mut counted = BTreeSet::new();
    let mut debits_max: BTreeMap<u64, u128> = BTreeMap::new();
    let mut credits_max: BTreeMap<u64, u128> = BTreeMap::new();
    let mut next = 0;
    for read in reads {
        while next < candidates.len() && candidates[next].0 < read.complete_or_end() {
            let transfer = candidates[next].1;
            if counted.insert(transfer.id) {
                *debits_max.entry(transfer.debit).or_default() += u128::from(transfer.posted_amount());
                *credits_max.entry(transfer.credit).or_default() += u128::from(transfer.posted_amount());
            }
            next += 1;
        }
        verdict.checked += 1;
        for balance in &read.balances {
            let debits = debits_max.get(&balance.id).copied().unwrap_or(0);
            let credits = credits_max.get(&balance.id).copied().unwrap_or(0);
            if balance.debits_posted > debits || balance.credits_posted > credits {
                verdict.problem(format!(
                    "{} shows account {} with debits posted {} and credits posted {}, more than the {debits} and \
                     {credits} requested before it ended",
                    describe(read),
                    balance.id,
                    balance.debits_posted,
                    balance.credits_posted
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::Consistency;

    #[test]
    fn requested_transfers_and_reads_within_bounds_pass() {
        let moved = single(10, A, B, 30);
        let mut stored = Builder::funding();
        stored.push(found(&moved, 10));
        let history = Builder::new()
            .transfer(3, 0, vec![moved], Outcome::Info)
            .read(4, 5, Consistency::Linearizable, balances_after(30))
            .finish(balances_after(30), stored);
        let verdict = check(&history);
        assert!(verdict.valid, "{:?}", verdict.problems);
    }

    #[test]
    fn a_transfer_nobody_asked_for_fails() {
        let mut stored = Builder::funding();
        stored.push(found(&single(99, A, B, 30), 10));
        let verdict = check(&Builder::new().finish(balances_after(30), stored));
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("no client asked"), "{:?}", verdict.problems);
    }

    #[test]
    fn a_stored_transfer_with_another_amount_fails() {
        let mut stored = Builder::funding();
        stored.push(found(&single(10, A, B, 31), 10));
        let history = Builder::new()
            .transfer(3, 4, vec![single(10, A, B, 30)], Outcome::Ok)
            .finish(balances_after(31), stored);
        assert!(!check(&history).valid);
    }

    #[test]
    fn a_refused_transfer_that_is_stored_fails() {
        let refused = single(10, A, B, 500);
        let mut stored = Builder::funding();
        stored.push(found(&refused, 10));
        let history =
            Builder::new().transfer(3, 4, vec![refused], Outcome::Fail).finish(balances_after(500), stored);
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems.iter().any(|p| p.contains("refused")), "{:?}", verdict.problems);
    }

    #[test]
    fn a_read_showing_money_before_anyone_asked_fails() {
        // The read completed at 4; the transfer was only invoked at 6.
        let moved = single(10, A, B, 30);
        let mut stored = Builder::funding();
        stored.push(found(&moved, 10));
        let history = Builder::new()
            .read(3, 4, Consistency::Linearizable, balances_after(30))
            .transfer(6, 7, vec![moved], Outcome::Ok)
            .finish(balances_after(30), stored);
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("more than"), "{:?}", verdict.problems);
    }
}
