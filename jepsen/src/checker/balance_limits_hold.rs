//! No account breaks its balance limit: a customer account (flagged debits-must-not-exceed-
//! credits) never shows debits, pending and posted together, above its posted credits, in any
//! successful read or in the final state. The workload sends transfers that must fail on this
//! limit; one that went through shows up here.

use super::{Verdict, describe};
use crate::history::{Balance, History, Outcome};

pub const NAME: &str = "balance-limits-hold";
const GUARANTEE: &str = "no customer account ever shows debits (pending + posted) above its posted credits";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(setup) = &history.setup else {
        verdict.problem("the history has no setup record".into());
        return verdict;
    };
    let over = |b: &Balance| {
        setup.customers.contains(&b.id)
            && b.debits_pending.checked_add(b.debits_posted).is_none_or(|debits| debits > b.credits_posted)
    };
    for op in history.ops.iter().filter(|op| op.is_read() && op.outcome == Outcome::Ok) {
        verdict.checked += 1;
        for balance in op.balances.iter().filter(|b| over(b)) {
            verdict.problem(format!(
                "{} shows account {} over its limit: {balance:?}",
                describe(op),
                balance.id
            ));
        }
    }
    if let Some(state) = history.final_state.as_ref().filter(|s| s.error.is_none()) {
        verdict.checked += 1;
        for balance in state.accounts.iter().filter(|b| over(b)) {
            verdict.problem(format!("final state: account {} is over its limit: {balance:?}", balance.id));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::Consistency;

    #[test]
    fn spending_everything_but_not_more_passes() {
        let mut accounts = balances_after(60);
        accounts[1].debits_pending = 40;
        accounts[2].credits_pending = 40;
        let verdict = check(&Builder::new().read(3, 4, Consistency::Linearizable, accounts).build());
        assert!(verdict.valid, "{:?}", verdict.problems);
    }

    #[test]
    fn an_overdrawn_account_fails() {
        let mut accounts = balances_after(60);
        accounts[1].debits_pending = 41;
        accounts[2].credits_pending = 41;
        let verdict = check(&Builder::new().read(3, 4, Consistency::Local, accounts).build());
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("account 2"), "{:?}", verdict.problems);
    }

    #[test]
    fn the_equity_account_has_no_limit() {
        // The equity account is debited the whole opening total and that is fine.
        let verdict = check(&Builder::new().finish(balances_after(0), Builder::funding()));
        assert!(verdict.valid, "{:?}", verdict.problems);
    }
}
