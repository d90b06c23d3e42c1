//! The history of a run: what every client asked and heard, when the nemesis struck and healed,
//! and the state read back after healing. It is written as JSON lines, one `Record` per line, as
//! the run goes (`history.jsonl` in the run's folder), and the checkers read it back from there:
//! nothing a checker sees comes from the harness's memory.
//!
//! An operation is one request: a batch of transfers that succeed or fail together (one
//! transfer, or a linked chain), or a read of every account's balances. Its completion is
//! - `ok`: it took effect (every transfer answered OK, or EXISTS: the same transfer was already
//!   applied by an earlier attempt with the same ids);
//! - `fail`: it definitely did not take effect (the ledger answered with an error code);
//! - `info`: unknown; no answer came (timeout, node down). It may or may not have taken effect,
//!   and the checkers allow for both.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The accounts of the bank and the money they start with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    pub ledger: u32,
    /// Funds the customers at the start; its balance is minus the opening total.
    pub equity: u64,
    /// Customer accounts, each opened with `opening` and flagged debits-must-not-exceed-credits.
    pub customers: Vec<u64>,
    pub opening: u64,
    /// The wall clock at the run's time 0, and how far the nodes let ledger time stray from
    /// it; absent in histories of older runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockBase>,
}

/// What `timestamps-follow-real-time` needs to turn a history's times into wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockBase {
    /// The harness's wall clock (µs since the Unix epoch) at `time_us` 0.
    pub epoch_unix_us: u64,
    /// The nodes' `--clock-tolerance-ms`.
    pub tolerance_ms: u64,
}

impl Setup {
    pub fn opening_total(&self) -> u128 {
        u128::from(self.opening) * self.customers.len() as u128
    }

    pub fn accounts(&self) -> Vec<u64> {
        let mut ids = vec![self.equity];
        ids.extend(&self.customers);
        ids
    }
}

/// 128-bit numbers as decimal strings: JSON numbers that large do not survive most readers
/// (nor serde's tagged enums).
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One transfer as a client sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSpec {
    pub id: u64,
    pub debit: u64,
    pub credit: u64,
    /// For a post or void: the pending transfer's whole amount.
    pub amount: u64,
    pub kind: TransferKind,
    /// Linked to the next transfer of the same operation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransferKind {
    /// Moves `amount` at once.
    Single,
    /// Reserves `amount` until posted or voided.
    Pending,
    /// Posts the whole of pending transfer `pending_id`.
    Post { pending_id: u64 },
    /// Releases pending transfer `pending_id`.
    Void { pending_id: u64 },
}

impl TransferSpec {
    /// What this transfer adds to debits_posted / credits_posted when it takes effect.
    pub fn posted_amount(&self) -> u64 {
        match self.kind {
            TransferKind::Single | TransferKind::Post { .. } => self.amount,
            TransferKind::Pending | TransferKind::Void { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Served by the leader after confirming it still leads: must see every acknowledged write.
    Linearizable,
    /// Served by whichever node answered, from its state as it is: may be stale.
    Local,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Call {
    Transfers {
        transfers: Vec<TransferSpec>,
        /// 0 for a first attempt; n for the n-th re-send of a write whose outcome was unknown.
        #[serde(default, skip_serializing_if = "is_zero")]
        retry: u32,
    },
    ReadBalances {
        consistency: Consistency,
    },
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Fail,
    Info,
}

/// One account's balances as a read returned them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Balance {
    pub id: u64,
    #[serde(with = "decimal")]
    pub debits_pending: u128,
    #[serde(with = "decimal")]
    pub debits_posted: u128,
    #[serde(with = "decimal")]
    pub credits_pending: u128,
    #[serde(with = "decimal")]
    pub credits_posted: u128,
}

/// A transfer as the ledger stores it, found after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundTransfer {
    #[serde(with = "decimal")]
    pub id: u128,
    #[serde(with = "decimal")]
    pub debit: u128,
    #[serde(with = "decimal")]
    pub credit: u128,
    #[serde(with = "decimal")]
    pub amount: u128,
    #[serde(with = "decimal")]
    pub pending_id: u128,
    pub flags: u32,
    pub timestamp: u64,
}

/// One node's view after healing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDigest {
    pub id: u64,
    pub applied_index: u64,
    pub digest: String,
}

/// What the harness read back after healing every fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalState {
    pub accounts: Vec<Balance>,
    /// Every transfer stored, found by listing each account's debits.
    pub transfers: Vec<FoundTransfer>,
    /// Every member node's applied index and state digest.
    pub nodes: Vec<NodeDigest>,
    /// Why the final state could not be read completely, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts at reading it that failed before the last one (each with how long it took): a
    /// healed cluster that is slow to answer shows here instead of leaving the run unchecked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_reads: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Start,
    End,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Setup(Setup),
    Invoke {
        op: u64,
        process: u32,
        time_us: u64,
        call: Call,
    },
    Complete {
        op: u64,
        process: u32,
        time_us: u64,
        outcome: Outcome,
        /// For transfers: the ledger's status code of each transfer, in order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        codes: Vec<u32>,
        /// For a read: every account's balances.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        balances: Vec<Balance>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Nemesis {
        time_us: u64,
        /// The fault's name, e.g. "kill-site".
        fault: String,
        phase: Phase,
        /// What it did: which nodes or links.
        detail: String,
    },
    Final(FinalState),
    /// One request of the background load (`load.rs`), when it completed.
    Load(LoadSample),
    /// Events of the change stream, as the subscriber (`stream.rs`) received them.
    Streamed {
        time_us: u64,
        events: Vec<StreamedEvent>,
    },
    /// Whether every member was up to date (full redundancy), as `tally cluster status` judged
    /// it: recorded when it changes (`run::watch_redundancy`).
    Redundancy {
        time_us: u64,
        full: bool,
        /// The members that were not, and why ("node 3 down", "node 2 catching up: 1200
        /// entries"), or why nothing answered.
        detail: String,
    },
    /// The subscriber stopped: whether it had reached the ledger's last event, and the last
    /// timestamp it received.
    StreamEnd {
        time_us: u64,
        caught_up: bool,
        last_timestamp: u64,
    },
}

/// One change stream event, as far as the checker needs it: its timestamp, its type
/// (`account_created`, `single_phase`, `two_phase_pending`, ... `two_phase_expired`) and the id
/// of the account or transfer it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedEvent {
    pub timestamp: u64,
    pub kind: String,
    #[serde(with = "decimal")]
    pub id: u128,
}

/// One background-load request: when it completed (or was shed), how long it took, how many
/// transfers it carried, and "ok", "unknown", "shed" or "failed: <why>".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    pub time_us: u64,
    pub latency_us: u64,
    pub transfers: usize,
    pub outcome: String,
}

/// Appends records to `history.jsonl`, flushing each line so a crash of the harness keeps them.
pub struct Writer {
    file: std::io::BufWriter<std::fs::File>,
}

impl Writer {
    pub fn create(path: &Path) -> Result<Writer, String> {
        let file =
            std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Writer { file: std::io::BufWriter::new(file) })
    }

    pub fn write(&mut self, record: &Record) -> Result<(), String> {
        let line = serde_json::to_string(record).map_err(|e| e.to_string())?;
        writeln!(self.file, "{line}").and_then(|()| self.file.flush()).map_err(|e| format!("history: {e}"))
    }
}

/// One operation: its invocation and, if it came, its completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub op: u64,
    pub process: u32,
    pub call: Call,
    pub invoke_us: u64,
    /// `None`: the run ended before an answer came (treated as `info`).
    pub complete_us: Option<u64>,
    pub outcome: Outcome,
    pub codes: Vec<u32>,
    pub balances: Vec<Balance>,
    pub error: Option<String>,
}

impl Op {
    /// The completion time, or "never" for an operation still open at the end.
    pub fn complete_or_end(&self) -> u64 {
        self.complete_us.unwrap_or(u64::MAX)
    }

    pub fn transfers(&self) -> &[TransferSpec] {
        match &self.call {
            Call::Transfers { transfers, .. } => transfers,
            Call::ReadBalances { .. } => &[],
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(self.call, Call::ReadBalances { .. })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NemesisEvent {
    pub time_us: u64,
    pub fault: String,
    pub phase: Phase,
    pub detail: String,
}

/// A whole history, as the checkers see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub setup: Option<Setup>,
    /// In invocation order.
    pub ops: Vec<Op>,
    pub nemesis: Vec<NemesisEvent>,
    pub final_state: Option<FinalState>,
    /// The background load's requests, in completion order.
    pub load: Vec<LoadSample>,
    /// The change stream's events in the order received, resumptions included.
    pub streamed: Vec<StreamedEvent>,
    /// `(caught up, last timestamp)` when the subscriber stopped; `None` for a history recorded
    /// without one.
    pub stream_end: Option<(bool, u64)>,
    /// `(time, every member up to date)` at each change, in time order.
    pub redundancy: Vec<(u64, bool)>,
}

impl History {
    /// Pairs invocations with completions. Malformed input is an error, never skipped.
    pub fn from_records(records: impl IntoIterator<Item = Record>) -> Result<History, String> {
        let mut history = History::default();
        let mut open: BTreeMap<u64, usize> = BTreeMap::new();
        let mut invoked = std::collections::BTreeSet::new();
        for record in records {
            match record {
                Record::Setup(setup) => history.setup = Some(setup),
                Record::Invoke { op, process, time_us, call } => {
                    if !invoked.insert(op) {
                        return Err(format!("operation {op} invoked twice"));
                    }
                    open.insert(op, history.ops.len());
                    history.ops.push(Op {
                        op,
                        process,
                        call,
                        invoke_us: time_us,
                        complete_us: None,
                        outcome: Outcome::Info,
                        codes: Vec::new(),
                        balances: Vec::new(),
                        error: None,
                    });
                }
                Record::Complete { op, time_us, outcome, codes, balances, error, .. } => {
                    let index =
                        open.remove(&op).ok_or_else(|| format!("operation {op} completed but not open"))?;
                    let entry = &mut history.ops[index];
                    entry.complete_us = Some(time_us);
                    entry.outcome = outcome;
                    entry.codes = codes;
                    entry.balances = balances;
                    entry.error = error;
                }
                Record::Nemesis { time_us, fault, phase, detail } => {
                    history.nemesis.push(NemesisEvent { time_us, fault, phase, detail })
                }
                Record::Final(state) => history.final_state = Some(state),
                Record::Load(sample) => history.load.push(sample),
                Record::Streamed { events, .. } => history.streamed.extend(events),
                Record::Redundancy { time_us, full, .. } => history.redundancy.push((time_us, full)),
                Record::StreamEnd { caught_up, last_timestamp, .. } => {
                    history.stream_end = Some((caught_up, last_timestamp))
                }
            }
        }
        Ok(history)
    }

    pub fn load(path: &Path) -> Result<History, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut records = Vec::new();
        for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), number + 1))?;
            records.push(record);
        }
        History::from_records(records)
    }

    /// Every transfer any client asked for, by id (the first time it was asked).
    pub fn requested(&self) -> BTreeMap<u64, &TransferSpec> {
        let mut requested = BTreeMap::new();
        for op in &self.ops {
            for transfer in op.transfers() {
                requested.entry(transfer.id).or_insert(transfer);
            }
        }
        requested
    }

    /// Ids of transfers that some attempt acknowledged (`ok`).
    pub fn acknowledged(&self) -> BTreeMap<u64, &TransferSpec> {
        let mut acknowledged = BTreeMap::new();
        for op in self.ops.iter().filter(|op| op.outcome == Outcome::Ok) {
            for transfer in op.transfers() {
                acknowledged.insert(transfer.id, transfer);
            }
        }
        acknowledged
    }

    /// Ids of transfers that every attempt definitely refused (`fail`, never `ok` or `info`).
    pub fn refused(&self) -> BTreeMap<u64, &TransferSpec> {
        let mut outcomes: BTreeMap<u64, (bool, &TransferSpec)> = BTreeMap::new();
        for op in &self.ops {
            for transfer in op.transfers() {
                let refused = op.outcome == Outcome::Fail;
                outcomes
                    .entry(transfer.id)
                    .and_modify(|(all, _)| *all &= refused)
                    .or_insert((refused, transfer));
            }
        }
        outcomes.into_iter().filter(|(_, (refused, _))| *refused).map(|(id, (_, t))| (id, t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let transfer = TransferSpec {
            id: 7,
            debit: 2,
            credit: 3,
            amount: 10,
            kind: TransferKind::Post { pending_id: 6 },
            linked: false,
        };
        let records = vec![
            Record::Setup(Setup { ledger: 1, equity: 1, customers: vec![2, 3], opening: 100, clock: None }),
            Record::Invoke {
                op: 1,
                process: 0,
                time_us: 5,
                call: Call::Transfers { transfers: vec![transfer], retry: 0 },
            },
            Record::Complete {
                op: 1,
                process: 0,
                time_us: 9,
                outcome: Outcome::Ok,
                codes: vec![0],
                balances: vec![],
                error: None,
            },
            Record::Invoke {
                op: 2,
                process: 1,
                time_us: 6,
                call: Call::ReadBalances { consistency: Consistency::Linearizable },
            },
            Record::Complete {
                op: 2,
                process: 1,
                time_us: 10,
                outcome: Outcome::Ok,
                codes: vec![],
                balances: vec![Balance { id: 2, credits_posted: u128::MAX, ..Balance::default() }],
                error: None,
            },
            Record::Invoke {
                op: 3,
                process: 2,
                time_us: 7,
                call: Call::ReadBalances { consistency: Consistency::Local },
            },
        ];
        let mut writer = Writer::create(&path).unwrap();
        for record in &records {
            writer.write(record).unwrap();
        }
        drop(writer);
        let history = History::load(&path).unwrap();
        assert_eq!(history, History::from_records(records).unwrap());
        assert_eq!(history.ops.len(), 3);
        assert_eq!(history.ops[1].balances[0].credits_posted, u128::MAX);
        assert_eq!(history.ops[2].complete_us, None);
        assert_eq!(history.ops[2].outcome, Outcome::Info);
    }

    #[test]
    fn a_completion_without_invocation_is_an_error() {
        let records = vec![Record::Complete {
            op: 4,
            process: 0,
            time_us: 1,
            outcome: Outcome::Ok,
            codes: vec![],
            balances: vec![],
            error: None,
        }];
        assert!(History::from_records(records).is_err());
    }
}
