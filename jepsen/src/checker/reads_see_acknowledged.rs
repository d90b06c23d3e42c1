//! A read that starts after a transfer was acknowledged sees that transfer. Posted totals only
//! grow (posting moves a reservation to posted; nothing takes posted money back), so a
//! linearizable read invoked after some transfers completed `ok` must show, on each account, at
//! least the posted amounts of those transfers. A read showing less is stale: it missed an
//! acknowledged payment. Local reads may be stale by design and are not checked here.

use std::collections::{BTreeMap, BTreeSet};

use super::{Verdict, describe};
use crate::history::{Call, Consistency, History, Outcome, TransferSpec};

pub const NAME: &str = "reads-see-acknowledged";
const GUARANTEE: &str = "a linearizable read started after a transfer was acknowledged includes it";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let mut acknowledged: Vec<(u64, u64, &TransferSpec)> = history
        .ops
        .iter()
        .filter(|op| op.outcome == Outcome::Ok)
        .flat_map(|op| op.transfers().iter().map(move |t| (op.complete_or_end(), op.op, t)))
        .collect();
    acknowledged.sort_by_key(|(completed, _, _)| *completed);
    let mut reads: Vec<_> = history
        .ops
        .iter()
        .filter(|op| op.outcome == Outcome::Ok)
        .filter(|op| matches!(op.call, Call::ReadBalances { consistency: Consistency::Linearizable }))
        .collect();
    reads.sort_by_key(|op| op.invoke_us);

    let mut counted = BTreeSet::new();
    // Per account: the posted amount acknowledged so far, and the last op that added to it.
    let mut debits_min: BTreeMap<u64, (u128, u64)> = BTreeMap::new();
    let mut credits_min: BTreeMap<u64, (u128, u64)> = BTreeMap::new();
    let mut next = 0;
    for read in reads {
        while next < acknowledged.len() && acknowledged[next].0 < read.invoke_us {
            let (_, op, transfer) = acknowledged[next];
            if counted.insert(transfer.id) && transfer.posted_amount() > 0 {
                let amount = u128::from(transfer.posted_amount());
                let debit = debits_min.entry(transfer.debit).or_default();
                *debit = (debit.0 + amount, op);
                let credit = credits_min.entry(transfer.credit).or_default();
                *credit = (credit.0 + amount, op);
            }
            next += 1;
        }
        verdict.checked += 1;
        for balance in &read.balances {
            let (debits, debit_op) = debits_min.get(&balance.id).copied().unwrap_or_default();
            let (credits, credit_op) = credits_min.get(&balance.id).copied().unwrap_or_default();
            if balance.debits_posted < debits || balance.credits_posted < credits {
                verdict.problem(format!(
                    "{} is stale: account {} shows debits posted {} and credits posted {}, but transfers \
                     acknowledged before it started (the last by op {}) put at least {debits} and {credits} there",
                    describe(read),
                    balance.id,
                    balance.debits_posted,
                    balance.credits_posted,
                    debit_op.max(credit_op)
                ));
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;

    #[test]
    fn reads_after_acknowledgement_that_include_it_pass() {
        // The read overlapping the transfer may or may not see it; the one after must.
        let history = Builder::new()
            .transfer(3, 6, vec![single(10, A, B, 30)], Outcome::Ok)
            .read(4, 5, Consistency::Linearizable, balances_after(0))
            .read(7, 8, Consistency::Linearizable, balances_after(30))
            .build();
        let verdict = check(&history);
        assert!(verdict.valid, "{:?}", verdict.problems);
        assert_eq!(verdict.checked, 2);
    }

    #[test]
    fn a_stale_read_fails() {
        let history = Builder::new()
            .transfer(3, 4, vec![single(10, A, B, 30)], Outcome::Ok)
            .read(7, 8, Consistency::Linearizable, balances_after(0))
            .build();
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("stale"), "{:?}", verdict.problems);
    }

    #[test]
    fn a_stale_local_read_is_allowed() {
        let history = Builder::new()
            .transfer(3, 4, vec![single(10, A, B, 30)], Outcome::Ok)
            .read(7, 8, Consistency::Local, balances_after(0))
            .build();
        assert!(check(&history).valid);
    }

    #[test]
    fn a_read_missing_the_funding_fails() {
        let mut unfunded = balances_after(0);
        unfunded[1].credits_posted = 0;
        unfunded[0].debits_posted -= u128::from(OPENING);
        let verdict = check(&Builder::new().read(7, 8, Consistency::Linearizable, unfunded).build());
        assert!(!verdict.valid);
    }
}
