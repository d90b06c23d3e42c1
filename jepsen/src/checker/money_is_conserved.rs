//! Every read of all balances conserves money: on the ledger, total debits equal total credits
//! (posted and pending alike), and the customers together hold exactly the opening total, no
//! matter how it moved between them. Checked on every successful read, linearizable or local,
//! and on the final state.
//!
//! A local read may come from a node that is still catching up (a node just added, or restarted
//! far behind), so it may show the ledger as it was before the bank opened: none of the bank's
//! accounts yet, or all of them created and none funded. Those two states are whole prefixes
//! of the history and conserve money; a local read is allowed to be that stale. Any other
//! partial view, and any such view from a linearizable read, is a problem.

use super::{Verdict, describe};
use crate::history::{Balance, Call, Consistency, History, Outcome, Setup};

pub const NAME: &str = "money-is-conserved";
const GUARANTEE: &str =
    "every read of all balances has debits = credits and the customers hold the opening total";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(setup) = &history.setup else {
        verdict.problem("the history has no setup record".into());
        return verdict;
    };
    for op in history.ops.iter().filter(|op| op.is_read() && op.outcome == Outcome::Ok) {
        verdict.checked += 1;
        let local = matches!(op.call, Call::ReadBalances { consistency: Consistency::Local });
        if local && before_opening(setup, &op.balances) {
            continue;
        }
        if let Err(problem) = conserves(setup, &op.balances) {
            verdict.problem(format!("{}: {problem}", describe(op)));
        }
    }
    if let Some(state) = history.final_state.as_ref().filter(|s| s.error.is_none()) {
        verdict.checked += 1;
        if let Err(problem) = conserves(setup, &state.accounts) {
            verdict.problem(format!("final state: {problem}"));
        }
    }
    verdict
}

/// Whether `balances` show the ledger before the bank opened: no bank account, or every bank
/// account there exactly once with nothing moved.
fn before_opening(setup: &Setup, balances: &[Balance]) -> bool {
    let accounts = setup.accounts();
    let bank: Vec<&Balance> = balances.iter().filter(|b| accounts.contains(&b.id)).collect();
    let untouched = |b: &&Balance| {
        b.debits_posted == 0 && b.credits_posted == 0 && b.debits_pending == 0 && b.credits_pending == 0
    };
    bank.is_empty() || (misplaced_account(&accounts, balances).is_none() && bank.iter().all(untouched))
}

/// The first of `accounts` that does not appear exactly once, and how often it appears.
fn misplaced_account(accounts: &[u64], balances: &[Balance]) -> Option<(u64, usize)> {
    accounts.iter().map(|id| (*id, balances.iter().filter(|b| b.id == *id).count())).find(|(_, n)| *n != 1)
}

/// `Err` says how the balances break conservation.
fn conserves(setup: &Setup, balances: &[Balance]) -> Result<(), String> {
    if let Some((id, count)) = misplaced_account(&setup.accounts(), balances) {
        return Err(format!("account {id} appears {count} times in the read"));
    }
    let all: Vec<&Balance> = balances.iter().collect();
    let customers: Vec<&Balance> = balances.iter().filter(|b| setup.customers.contains(&b.id)).collect();
    let debits_posted = sum(&all, |b| b.debits_posted)?;
    let credits_posted = sum(&all, |b| b.credits_posted)?;
    if debits_posted != credits_posted {
        return Err(format!("debits posted {debits_posted} != credits posted {credits_posted}"));
    }
    let debits_pending = sum(&all, |b| b.debits_pending)?;
    let credits_pending = sum(&all, |b| b.credits_pending)?;
    if debits_pending != credits_pending {
        return Err(format!("debits pending {debits_pending} != credits pending {credits_pending}"));
    }
    let customer_credits = sum(&customers, |b| b.credits_posted)?;
    let customer_debits = sum(&customers, |b| b.debits_posted)?;
    if customer_debits.checked_add(setup.opening_total()) != Some(customer_credits) {
        return Err(format!(
            "customers hold {customer_credits} - {customer_debits}, not the opening total {}",
            setup.opening_total()
        ));
    }
    Ok(())
}

fn sum(balances: &[&Balance], field: fn(&Balance) -> u128) -> Result<u128, String> {
    balances
        .iter()
        .try_fold(0u128, |total, b| total.checked_add(field(b)))
        .ok_or_else(|| "a sum overflows 128 bits".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::Consistency;

    #[test]
    fn a_read_that_moved_money_consistently_passes() {
        let history = Builder::new().read(3, 4, Consistency::Linearizable, balances_after(30)).build();
        let verdict = check(&history);
        assert!(verdict.valid, "{:?}", verdict.problems);
        assert_eq!(verdict.checked, 1);
    }

    #[test]
    fn a_read_that_does_not_sum_fails() {
        // A's debit of 30 is seen, B's credit is not: money vanished mid-read.
        let mut torn = balances_after(30);
        torn[2].credits_posted -= 30;
        let history = Builder::new().read(3, 4, Consistency::Local, torn).build();
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("debits posted"), "{:?}", verdict.problems);
    }

    #[test]
    fn money_created_on_both_sides_breaks_the_opening_total() {
        // Debits equal credits, but B received 50 from the equity account after the opening.
        let mut inflated = balances_after(0);
        inflated[0].debits_posted += 50;
        inflated[2].credits_posted += 50;
        let history = Builder::new().read(3, 4, Consistency::Linearizable, inflated).build();
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("opening total"), "{:?}", verdict.problems);
    }

    #[test]
    fn a_local_read_from_before_the_opening_passes_but_not_a_linearizable_one() {
        let unfunded: Vec<Balance> = balances_after(0)
            .into_iter()
            .map(|b| Balance {
                debits_posted: 0,
                credits_posted: 0,
                debits_pending: 0,
                credits_pending: 0,
                ..b
            })
            .collect();
        for (consistency, balances, valid) in [
            (Consistency::Local, vec![], true),
            (Consistency::Local, unfunded.clone(), true),
            (Consistency::Linearizable, vec![], false),
            (Consistency::Linearizable, unfunded.clone(), false),
            (Consistency::Local, unfunded[..1].to_vec(), false),
        ] {
            let verdict = check(&Builder::new().read(3, 4, consistency, balances.clone()).build());
            assert_eq!(verdict.valid, valid, "{consistency:?} {balances:?}: {:?}", verdict.problems);
        }
    }

    #[test]
    fn a_read_missing_an_account_fails() {
        let mut partial = balances_after(0);
        partial.pop();
        let verdict = check(&Builder::new().read(3, 4, Consistency::Linearizable, partial).build());
        assert!(!verdict.valid);
    }

    #[test]
    fn unbalanced_final_state_fails() {
        let mut accounts = balances_after(0);
        accounts[1].debits_pending = 5;
        let verdict = check(&Builder::new().finish(accounts, Builder::funding()));
        assert!(!verdict.valid);
        assert!(verdict.problems[0].starts_with("final state"), "{:?}", verdict.problems);
    }
}
