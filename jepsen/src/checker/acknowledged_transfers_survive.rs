//! No acknowledged transfer is lost: every transfer that some attempt completed `ok` is found in
//! the ledger after healing, with every fault healed and every node back.

use super::Verdict;
use crate::history::History;

pub const NAME: &str = "acknowledged-transfers-survive";
const GUARANTEE: &str = "every transfer acknowledged ok is stored after healing";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(state) = super::complete_final_state(history, &mut verdict) else {
        return verdict;
    };
    let stored: std::collections::BTreeSet<u128> = state.transfers.iter().map(|t| t.id).collect();
    for (id, spec) in history.acknowledged() {
        verdict.checked += 1;
        if !stored.contains(&u128::from(id)) {
            let op = history.ops.iter().find(|op| op.transfers().iter().any(|t| t.id == id));
            verdict.problem(format!(
                "transfer {id} ({} -> {}, {}) was acknowledged by {} but is not stored",
                spec.debit,
                spec.credit,
                spec.amount,
                op.map_or("?".into(), super::describe)
            ));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::Outcome;

    #[test]
    fn stored_acknowledged_and_missing_unknown_transfers_pass() {
        let moved = single(10, A, B, 30);
        let lost_in_flight = single(11, A, B, 5);
        let mut stored = Builder::funding();
        stored.push(found(&moved, 10));
        let history = Builder::new()
            .transfer(3, 4, vec![moved], Outcome::Ok)
            .transfer(5, 0, vec![lost_in_flight], Outcome::Info)
            .finish(balances_after(30), stored);
        let verdict = check(&history);
        assert!(verdict.valid, "{:?}", verdict.problems);
        assert_eq!(verdict.checked, 3);
    }

    #[test]
    fn a_lost_write_fails() {
        let history = Builder::new()
            .transfer(3, 4, vec![single(10, A, B, 30)], Outcome::Ok)
            .finish(balances_after(0), Builder::funding());
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("transfer 10"), "{:?}", verdict.problems);
    }

    #[test]
    fn a_run_without_a_final_state_fails() {
        assert!(!check(&Builder::new().build()).valid);
    }
}
