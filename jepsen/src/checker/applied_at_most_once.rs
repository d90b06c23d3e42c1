//! Nothing is applied twice: the final balances equal what the stored transfers add up to, each
//! counted once. A retried transfer that the ledger applied a second time (under the same id)
//! leaves the balances ahead of the transfers.

use super::{Verdict, replay};
use crate::history::History;

pub const NAME: &str = "applied-at-most-once";
const GUARANTEE: &str = "final balances equal the sum of the stored transfers, each counted once";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(state) = super::complete_final_state(history, &mut verdict) else {
        return verdict;
    };
    let expected = match replay(&state.transfers) {
        Ok(expected) => expected,
        Err(problem) => {
            verdict.problem(problem);
            return verdict;
        }
    };
    for account in &state.accounts {
        verdict.checked += 1;
        let mut want = expected.get(&u128::from(account.id)).copied().unwrap_or_default();
        want.id = account.id;
        if *account != want {
            verdict.problem(format!(
                "account {} holds {account:?}, but its stored transfers add up to {want:?}",
                account.id
            ));
        }
    }
    for id in expected.keys() {
        if !state.accounts.iter().any(|a| u128::from(a.id) == *id) {
            verdict
                .problem(format!("stored transfers move money on account {id}, which the final read lacks"));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::{Balance, Outcome, TransferKind, TransferSpec};

    #[test]
    fn balances_matching_the_transfers_pass_including_two_phase() {
        let pending = TransferSpec {
            id: 10,
            debit: A,
            credit: B,
            amount: 30,
            kind: TransferKind::Pending,
            linked: false,
        };
        let post = TransferSpec { kind: TransferKind::Post { pending_id: 10 }, id: 11, ..pending.clone() };
        let held = TransferSpec { id: 12, amount: 7, ..pending.clone() };
        let void = TransferSpec { kind: TransferKind::Void { pending_id: 12 }, id: 13, ..held.clone() };
        let open = TransferSpec { id: 14, amount: 5, ..pending.clone() };
        let mut stored = Builder::funding();
        stored.extend([
            found(&pending, 10),
            found(&post, 11),
            found(&held, 12),
            found(&void, 13),
            found(&open, 14),
        ]);
        let mut accounts = balances_after(30);
        accounts[1].debits_pending = 5;
        accounts[2].credits_pending = 5;
        let history = Builder::new()
            .transfer(3, 4, vec![pending, post, held, void, open], Outcome::Ok)
            .finish(accounts, stored);
        let verdict = check(&history);
        assert!(verdict.valid, "{:?}", verdict.problems);
    }

    #[test]
    fn a_double_apply_fails() {
        // Transfer 10 is stored once, but the balances moved its amount twice.
        let moved = single(10, A, B, 30);
        let mut stored = Builder::funding();
        stored.push(found(&moved, 10));
        let history =
            Builder::new().transfer(3, 4, vec![moved], Outcome::Ok).finish(balances_after(60), stored);
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("add up to"), "{:?}", verdict.problems);
    }

    #[test]
    fn a_transfer_listed_twice_still_counts_once() {
        // The ledger applied a retry again and indexed it twice: the listing shows it twice and
        // the balances moved twice; counting it once exposes the double apply.
        let moved = single(10, A, B, 30);
        let mut stored = Builder::funding();
        stored.push(found(&moved, 10));
        stored.push(found(&moved, 11));
        let history =
            Builder::new().transfer(3, 4, vec![moved], Outcome::Ok).finish(balances_after(60), stored);
        assert!(!check(&history).valid);
    }

    #[test]
    fn a_post_of_a_pending_transfer_that_is_not_stored_fails() {
        let post = TransferSpec {
            id: 11,
            debit: A,
            credit: B,
            amount: 3,
            kind: TransferKind::Post { pending_id: 10 },
            linked: false,
        };
        let mut stored = Builder::funding();
        stored.push(found(&post, 11));
        let mut accounts = balances_after(3);
        accounts.push(Balance { id: 4, ..Balance::default() });
        let verdict = check(&Builder::new().finish(accounts, stored));
        assert!(!verdict.valid);
    }
}
