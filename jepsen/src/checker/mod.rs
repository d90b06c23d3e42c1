//! The checkers: each reads the history and says whether one guarantee held, and if not, where
//! it broke. One file per guarantee; each file's tests feed it hand-made histories that break
//! it, and one that keeps it.
//!
//! Every checker allows for operations whose outcome is unknown (`info`): such a transfer may or
//! may not have taken effect, so it may appear, or not, and it may be counted in a read, or not.

use std::collections::BTreeMap;

use crate::history::{Balance, FinalState, FoundTransfer, History, TransferKind, TransferSpec};

pub mod acknowledged_transfers_survive;
pub mod applied_at_most_once;
pub mod balance_limits_hold;
pub mod change_stream_matches;
pub mod money_is_conserved;
pub mod nodes_agree;
pub mod nothing_unrequested;
pub mod reads_see_acknowledged;
pub mod timestamps_follow_real_time;

/// The listed problems stop at this many; the count goes on.
const PROBLEMS_SHOWN_MAX: usize = 20;

/// One checker's judgement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub checker: &'static str,
    /// The guarantee, in one sentence.
    pub guarantee: &'static str,
    pub valid: bool,
    /// How many things were checked (reads, transfers, nodes).
    pub checked: usize,
    pub problems_total: usize,
    /// The first problems, each a sentence naming the operations involved.
    pub problems: Vec<String>,
}

impl Verdict {
    fn new(checker: &'static str, guarantee: &'static str) -> Verdict {
        Verdict { checker, guarantee, valid: true, checked: 0, problems_total: 0, problems: Vec::new() }
    }

    fn problem(&mut self, text: String) {
        self.valid = false;
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(text);
        }
    }
}

/// The final state, if the run read it completely; otherwise records why there is none.
fn complete_final_state<'h>(history: &'h History, verdict: &mut Verdict) -> Option<&'h FinalState> {
    match &history.final_state {
        None => verdict.problem("the history has no final state: the run did not finish".into()),
        Some(state) => match &state.error {
            None => return Some(state),
            Some(error) => verdict.problem(format!("the final state could not be read: {error}")),
        },
    }
    None
}

/// Runs every checker.
pub fn check_all(history: &History) -> Vec<Verdict> {
    vec![
        money_is_conserved::check(history),
        acknowledged_transfers_survive::check(history),
        nothing_unrequested::check(history),
        applied_at_most_once::check(history),
        balance_limits_hold::check(history),
        reads_see_acknowledged::check(history),
        nodes_agree::check(history),
        timestamps_follow_real_time::check(history),
        change_stream_matches::check(history),
    ]
}

/// Transfer flags as the ledger stores them (`TransferFlag` in ledger.proto).
pub mod flags {
    pub const LINKED: u32 = 1;
    pub const PENDING: u32 = 2;
    pub const POST_PENDING: u32 = 4;
    pub const VOID_PENDING: u32 = 8;
}

/// The flags a stored transfer must carry, given what the client sent.
pub fn expected_flags(spec: &TransferSpec) -> u32 {
    let kind = match spec.kind {
        TransferKind::Single => 0,
        TransferKind::Pending => flags::PENDING,
        TransferKind::Post { .. } => flags::POST_PENDING,
        TransferKind::Void { .. } => flags::VOID_PENDING,
    };
    kind | if spec.linked { flags::LINKED } else { 0 }
}

/// Balances by account, computed from stored transfers in the order the ledger applied them
/// (timestamp order), with two-phase semantics: a pending transfer reserves, a post moves the
/// reservation to posted, a void releases it. `Err` if a post or void names a pending transfer
/// that is not among them, or a sum overflows.
/// A transfer listed more than once (by id) counts once: the ledger must not apply it twice.
pub fn replay(transfers: &[FoundTransfer]) -> Result<BTreeMap<u128, Balance>, String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut ordered: Vec<&FoundTransfer> = transfers.iter().filter(|t| seen.insert(t.id)).collect();
    ordered.sort_by_key(|t| t.timestamp);
    let by_id: BTreeMap<u128, &FoundTransfer> = transfers.iter().map(|t| (t.id, t)).collect();
    let mut balances: BTreeMap<u128, Balance> = BTreeMap::new();
    let overflow = |id: u128| format!("a balance overflows replaying transfer {id}");
    for t in ordered {
        let reserve = t.flags & flags::PENDING != 0;
        let release = t.flags & (flags::POST_PENDING | flags::VOID_PENDING) != 0;
        if release {
            let pending = by_id.get(&t.pending_id).ok_or_else(|| {
                format!("transfer {} settles pending {}, which is not stored", t.id, t.pending_id)
            })?;
            let debit = balances.entry(pending.debit).or_default();
            debit.debits_pending =
                debit.debits_pending.checked_sub(pending.amount).ok_or_else(|| overflow(t.id))?;
            let credit = balances.entry(pending.credit).or_default();
            credit.credits_pending =
                credit.credits_pending.checked_sub(pending.amount).ok_or_else(|| overflow(t.id))?;
        }
        let posted = t.flags & flags::VOID_PENDING == 0 && !reserve;
        let debit = balances.entry(t.debit).or_default();
        if reserve {
            debit.debits_pending =
                debit.debits_pending.checked_add(t.amount).ok_or_else(|| overflow(t.id))?;
        } else if posted {
            debit.debits_posted = debit.debits_posted.checked_add(t.amount).ok_or_else(|| overflow(t.id))?;
        }
        let credit = balances.entry(t.credit).or_default();
        if reserve {
            credit.credits_pending =
                credit.credits_pending.checked_add(t.amount).ok_or_else(|| overflow(t.id))?;
        } else if posted {
            credit.credits_posted =
                credit.credits_posted.checked_add(t.amount).ok_or_else(|| overflow(t.id))?;
        }
    }
    Ok(balances)
}

/// Short description of an operation for problem reports.
fn describe(op: &crate::history::Op) -> String {
    let completed = op.complete_us.map_or("never".to_string(), |t| format!("{:.3}s", t as f64 / 1e6));
    format!(
        "op {} (process {}, invoked {:.3}s, completed {completed}, {:?})",
        op.op,
        op.process,
        op.invoke_us as f64 / 1e6,
        op.outcome
    )
}

/// Hand-made histories for the checkers' tests.
#[cfg(test)]
pub mod fixture {
    use crate::history::*;

    pub const EQUITY: u64 = 1;
    pub const A: u64 = 2;
    pub const B: u64 = 3;
    pub const OPENING: u64 = 100;
    /// The wall clock at a fixture's time 0.
    pub const EPOCH_US: u64 = 1_800_000_000_000_000;

    /// A bank of two customers, each funded with 100 by transfers 1 and 2 at t=1..2.
    pub struct Builder {
        records: Vec<Record>,
        next_op: u64,
    }

    pub fn single(id: u64, debit: u64, credit: u64, amount: u64) -> TransferSpec {
        TransferSpec { id, debit, credit, amount, kind: TransferKind::Single, linked: false }
    }

    pub fn found(spec: &TransferSpec, timestamp: u64) -> FoundTransfer {
        let pending_id = match spec.kind {
            TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => u128::from(pending_id),
            _ => 0,
        };
        FoundTransfer {
            id: spec.id.into(),
            debit: spec.debit.into(),
            credit: spec.credit.into(),
            amount: spec.amount.into(),
            pending_id,
            flags: super::expected_flags(spec),
            timestamp,
        }
    }

    pub fn balance(id: u64, debits_posted: u128, credits_posted: u128) -> Balance {
        Balance { id, debits_posted, credits_posted, ..Balance::default() }
    }

    /// Balances after funding, with `moved` taken from A to B.
    pub fn balances_after(moved: u128) -> Vec<Balance> {
        let opening = u128::from(OPENING);
        vec![balance(EQUITY, 2 * opening, 0), balance(A, moved, opening), balance(B, 0, opening + moved)]
    }

    #[allow(clippy::new_without_default)]
    impl Builder {
        pub fn new() -> Builder {
            let mut builder = Builder { records: Vec::new(), next_op: 1 };
            builder.records.push(Record::Setup(Setup {
                ledger: 1,
                equity: EQUITY,
                customers: vec![A, B],
                opening: OPENING,
                clock: Some(ClockBase { epoch_unix_us: EPOCH_US, tolerance_ms: 1000 }),
            }));
            builder.transfer(1, 2, vec![single(1, EQUITY, A, OPENING)], Outcome::Ok);
            builder.transfer(1, 2, vec![single(2, EQUITY, B, OPENING)], Outcome::Ok);
            builder
        }

        /// Funding transfers as the final listing finds them.
        pub fn funding() -> Vec<FoundTransfer> {
            vec![found(&single(1, EQUITY, A, OPENING), 1), found(&single(2, EQUITY, B, OPENING), 2)]
        }

        fn op(&mut self) -> u64 {
            self.next_op += 1;
            self.next_op - 1
        }

        pub fn transfer(
            &mut self,
            invoke: u64,
            complete: u64,
            transfers: Vec<TransferSpec>,
            outcome: Outcome,
        ) -> &mut Builder {
            let op = self.op();
            let codes = transfers.iter().map(|_| if outcome == Outcome::Ok { 0 } else { 57 }).collect();
            self.records.push(Record::Invoke {
                op,
                process: 1,
                time_us: invoke,
                call: Call::Transfers { transfers, retry: 0 },
            });
            if outcome != Outcome::Info {
                self.records.push(Record::Complete {
                    op,
                    process: 1,
                    time_us: complete,
                    outcome,
                    codes,
                    balances: vec![],
                    error: None,
                });
            }
            self
        }

        pub fn read(
            &mut self,
            invoke: u64,
            complete: u64,
            consistency: Consistency,
            balances: Vec<Balance>,
        ) -> &mut Builder {
            let op = self.op();
            self.records.push(Record::Invoke {
                op,
                process: 2,
                time_us: invoke,
                call: Call::ReadBalances { consistency },
            });
            self.records.push(Record::Complete {
                op,
                process: 2,
                time_us: complete,
                outcome: Outcome::Ok,
                codes: vec![],
                balances,
                error: None,
            });
            self
        }

        pub fn finish(&mut self, accounts: Vec<Balance>, transfers: Vec<FoundTransfer>) -> History {
            let nodes = (1..=3).map(|id| NodeDigest { id, applied_index: 9, digest: "d".into() }).collect();
            self.records.push(Record::Final(FinalState {
                accounts,
                transfers,
                nodes,
                ..FinalState::default()
            }));
            self.build()
        }

        pub fn build(&self) -> History {
            History::from_records(self.records.clone()).expect("a well-formed history")
        }
    }
}
