//! After healing, every node reports the same state digest: all member nodes applied the same
//! log index and hold byte-identical ledger state (the digest chains every write ever applied).

use super::Verdict;
use crate::history::History;

pub const NAME: &str = "nodes-agree";
const GUARANTEE: &str = "after healing, every member node reports the same applied index and state digest";

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict::new(NAME, GUARANTEE);
    let Some(state) = &history.final_state else {
        verdict.problem("the history has no final state: the run did not finish".into());
        return verdict;
    };
    if let Some(error) = &state.error {
        verdict.problem(format!("the final state could not be read: {error}"));
    }
    let Some(first) = state.nodes.first() else {
        verdict.problem("no node reported its digest".into());
        return verdict;
    };
    for node in &state.nodes {
        verdict.checked += 1;
        if node.applied_index != first.applied_index || node.digest != first.digest {
            verdict.problem(format!(
                "node {} applied {} with digest {}, but node {} applied {} with digest {}",
                node.id, node.applied_index, node.digest, first.id, first.applied_index, first.digest
            ));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::fixture::*;
    use crate::history::NodeDigest;

    #[test]
    fn equal_digests_pass() {
        let verdict = check(&Builder::new().finish(balances_after(0), Builder::funding()));
        assert!(verdict.valid, "{:?}", verdict.problems);
        assert_eq!(verdict.checked, 3);
    }

    #[test]
    fn a_diverged_node_fails() {
        let mut history = Builder::new().finish(balances_after(0), Builder::funding());
        history.final_state.as_mut().unwrap().nodes[2] =
            NodeDigest { id: 3, applied_index: 9, digest: "e".into() };
        let verdict = check(&history);
        assert!(!verdict.valid);
        assert!(verdict.problems[0].contains("node 3"), "{:?}", verdict.problems);
    }

    #[test]
    fn no_digests_fails() {
        let mut history = Builder::new().finish(balances_after(0), Builder::funding());
        history.final_state.as_mut().unwrap().nodes.clear();
        assert!(!check(&history).valid);
    }
}
