//! The results of a run, computed from its history file: each checker's verdict, operation
//! counts, the longest write outage after each fault, and the two pictures.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::checker::{Verdict, check_all};
use crate::history::{History, Outcome, Phase};
use crate::plot::{Sample, Series, Window};

/// The longest stretch without a successful write, from a fault's start until the next fault
/// starts (or the run ends).
#[derive(Debug, Clone, Serialize)]
pub struct Outage {
    pub fault: String,
    pub detail: String,
    pub start_s: f64,
    /// How long the fault was held before it was healed.
    pub held_s: Option<f64>,
    /// Fault start to the first write acknowledged after it.
    pub first_write_s: Option<f64>,
    /// Heal (restart, resume, reconnect) to the first write acknowledged after it.
    pub first_write_after_heal_s: Option<f64>,
    pub longest_without_write_s: f64,
    /// The same for the background load's writes, when the run had one.
    pub load_longest_without_write_s: Option<f64>,
    /// Heal to every member up to date again (full redundancy), when the run watched it and
    /// it came back before the next fault.
    pub redundancy_restored_s: Option<f64>,
}

/// What the background load saw over the whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadSummary {
    pub requests: u64,
    pub transfers_ok: u64,
    /// Transfers per second acknowledged, over the span of the load.
    pub transfers_per_second: f64,
    /// Requests by outcome: ok, unknown, shed, failed: ...
    pub outcomes: BTreeMap<String, u64>,
    /// Latency of acknowledged requests, milliseconds.
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub valid: bool,
    pub seed: u64,
    pub verdicts: Vec<Verdict>,
    /// Operations by kind and outcome, e.g. "transfers ok".
    pub counts: BTreeMap<String, u64>,
    pub outages: Vec<Outage>,
    /// Longest write outage per fault kind, in seconds.
    pub worst_outage_by_fault: BTreeMap<String, f64>,
    /// Nodes that exited without being told to.
    pub crashes: Vec<String>,
    pub load: Option<LoadSummary>,
    /// Longest background-load write outage per fault kind, in seconds.
    pub worst_load_outage_by_fault: BTreeMap<String, f64>,
    /// Longest time from heal to full redundancy per fault kind, in seconds (faults after
    /// which it did not come back before the next one are not counted: see `outages`).
    pub worst_redundancy_restored_by_fault: BTreeMap<String, f64>,
    /// Attempts at reading the final state that failed before the last one.
    pub failed_final_reads: Vec<String>,
}

/// The seed and the crashes an earlier report of `dir` recorded (for `--check`, which checks
/// the history again and must not forget them).
pub fn previous(dir: &Path) -> (Option<u64>, Vec<String>) {
    let Ok(text) = std::fs::read_to_string(dir.join("summary.json")) else { return (None, Vec::new()) };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { return (None, Vec::new()) };
    let crashes = value["crashes"]
        .as_array()
        .map(|list| list.iter().filter_map(|c| c.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    (value["seed"].as_u64(), crashes)
}

/// Computes the report of the history in `dir`, writes `summary.json`, `summary.txt`,
/// `latency.png` and `throughput.png` there.
pub fn write(dir: &Path, seed: u64, crashes: Vec<String>) -> Result<Report, String> {
    let history = History::load(&dir.join("history.jsonl"))?;
    let verdicts = check_all(&history);
    let valid = verdicts.iter().all(|v| v.valid) && crashes.is_empty();
    let outages = outages(&history);
    let mut worst_outage_by_fault: BTreeMap<String, f64> = BTreeMap::new();
    let mut worst_load_outage_by_fault: BTreeMap<String, f64> = BTreeMap::new();
    let mut worst_redundancy_restored_by_fault: BTreeMap<String, f64> = BTreeMap::new();
    for outage in &outages {
        let worst = worst_outage_by_fault.entry(outage.fault.clone()).or_default();
        *worst = worst.max(outage.longest_without_write_s);
        if let Some(load) = outage.load_longest_without_write_s {
            let worst = worst_load_outage_by_fault.entry(outage.fault.clone()).or_default();
            *worst = worst.max(load);
        }
        if let Some(restored) = outage.redundancy_restored_s {
            let worst = worst_redundancy_restored_by_fault.entry(outage.fault.clone()).or_default();
            *worst = worst.max(restored);
        }
    }
    let report = Report {
        valid,
        seed,
        verdicts,
        counts: counts(&history),
        outages,
        worst_outage_by_fault,
        crashes,
        load: load_summary(&history),
        worst_load_outage_by_fault,
        worst_redundancy_restored_by_fault,
        failed_final_reads: history.final_state.as_ref().map(|s| s.failed_reads.clone()).unwrap_or_default(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("summary.json"), json).map_err(|e| format!("summary.json: {e}"))?;
    std::fs::write(dir.join("summary.txt"), report.text()).map_err(|e| format!("summary.txt: {e}"))?;
    let (samples, windows, end_s) = picture_data(&history);
    crate::plot::latency_png(&dir.join("latency.png"), &samples, &windows, end_s)?;
    crate::plot::throughput_png(&dir.join("throughput.png"), &samples, &windows, end_s)?;
    Ok(report)
}

fn counts(history: &History) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for op in &history.ops {
        let kind = if op.is_read() { "reads" } else { "transfers" };
        let outcome = match op.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "failed",
            Outcome::Info => "unknown",
        };
        *counts.entry(format!("{kind} {outcome}")).or_default() += 1;
    }
    let resends =
        history.ops.iter().filter(|op| matches!(op.call, crate::history::Call::Transfers { retry: 1.., .. }));
    counts.insert("transfers re-sent".into(), resends.count() as u64);
    counts
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

fn load_summary(history: &History) -> Option<LoadSummary> {
    if history.load.is_empty() {
        return None;
    }
    let mut summary = LoadSummary { requests: history.load.len() as u64, ..LoadSummary::default() };
    let mut latencies = Vec::new();
    for sample in &history.load {
        *summary.outcomes.entry(sample.outcome.clone()).or_default() += 1;
        if sample.outcome == "ok" {
            summary.transfers_ok += sample.transfers as u64;
            latencies.push(sample.latency_us);
        }
    }
    let first = history.load.iter().map(|s| s.time_us).min().unwrap_or(0);
    let last = history.load.iter().map(|s| s.time_us).max().unwrap_or(0);
    summary.transfers_per_second = summary.transfers_ok as f64 / seconds(last - first).max(1e-3);
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |us| *us as f64 / 1e3)
    };
    (summary.latency_ms_p50, summary.latency_ms_p99, summary.latency_ms_max) = (at(0.5), at(0.99), at(1.0));
    Some(summary)
}

/// When, in `[from, until]`, every member was up to date: `from` itself if they were then (the
/// last change before it says so), or the first change to full redundancy after it.
fn redundancy_restored(changes: &[(u64, bool)], from: u64, until: u64) -> Option<u64> {
    let before = changes.iter().rev().find(|(t, _)| *t <= from);
    if before.is_some_and(|(_, full)| *full) {
        return Some(from);
    }
    changes.iter().find(|(t, full)| *full && *t > from && *t <= until).map(|(t, _)| *t)
}

/// The longest stretch in `[from, until]` without one of the sorted `writes`.
fn longest_gap(writes: &[u64], from: u64, until: u64) -> (u64, Option<u64>) {
    let inside: Vec<u64> = writes.iter().copied().filter(|t| *t >= from && *t <= until).collect();
    let mut previous = from;
    let mut longest = 0;
    for t in inside.iter().copied().chain(std::iter::once(until)) {
        longest = longest.max(t - previous);
        previous = t;
    }
    (longest, inside.first().copied())
}

fn outages(history: &History) -> Vec<Outage> {
    let mut writes: Vec<u64> = history
        .ops
        .iter()
        .filter(|op| !op.is_read() && op.outcome == Outcome::Ok && op.process != 0)
        .filter_map(|op| op.complete_us)
        .collect();
    writes.sort_unstable();
    let mut load_writes: Vec<u64> =
        history.load.iter().filter(|s| s.outcome == "ok").map(|s| s.time_us).collect();
    load_writes.sort_unstable();
    let starts: Vec<_> = history.nemesis.iter().filter(|e| e.phase == Phase::Start).collect();
    let run_end = history.ops.iter().filter_map(|op| op.complete_us).max().unwrap_or(0);
    let first_write_after = |t: u64| writes.iter().copied().find(|w| *w >= t);
    let mut result = Vec::new();
    for (index, start) in starts.iter().enumerate() {
        let until = starts.get(index + 1).map_or(run_end, |next| next.time_us).max(start.time_us);
        let (longest, first_inside) = longest_gap(&writes, start.time_us, until);
        let load_longest =
            (!history.load.is_empty()).then(|| seconds(longest_gap(&load_writes, start.time_us, until).0));
        let end = history
            .nemesis
            .iter()
            .find(|e| e.phase == Phase::End && e.fault == start.fault && e.time_us >= start.time_us);
        let redundancy_restored_s = end.and_then(|end| {
            redundancy_restored(&history.redundancy, end.time_us, until).map(|t| seconds(t - end.time_us))
        });
        result.push(Outage {
            redundancy_restored_s,
            fault: start.fault.clone(),
            detail: end.map_or(start.detail.clone(), |end| format!("{}; {}", start.detail, end.detail)),
            start_s: seconds(start.time_us),
            held_s: end.map(|end| seconds(end.time_us - start.time_us)),
            first_write_s: first_inside.map(|t| seconds(t - start.time_us)),
            first_write_after_heal_s: end
                .and_then(|end| first_write_after(end.time_us).map(|t| seconds(t - end.time_us))),
            longest_without_write_s: seconds(longest),
            load_longest_without_write_s: load_longest,
        });
    }
    result
}

fn picture_data(history: &History) -> (Vec<Sample>, Vec<Window>, f64) {
    let samples = history
        .ops
        .iter()
        .filter(|op| op.process != 0)
        .filter_map(|op| {
            let complete = op.complete_us?;
            let series = match (op.is_read(), op.outcome) {
                (false, Outcome::Ok) => Series::TransferOk,
                (false, Outcome::Fail) => Series::TransferFailed,
                (false, Outcome::Info) => Series::TransferUnknown,
                (true, Outcome::Ok) => Series::ReadOk,
                (true, _) => Series::ReadUnknown,
            };
            Some(Sample {
                time_s: seconds(complete),
                latency_ms: (complete - op.invoke_us) as f64 / 1e3,
                series,
            })
        })
        .collect::<Vec<_>>();
    let end_s = samples.iter().map(|s| s.time_s).fold(0.0, f64::max);
    let mut windows = Vec::new();
    let mut open: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &history.nemesis {
        match event.phase {
            Phase::Start => {
                open.entry(&event.fault).or_insert(event.time_us);
            }
            Phase::End => {
                if let Some(start) = open.remove(event.fault.as_str()) {
                    windows.push(Window {
                        start_s: seconds(start),
                        end_s: seconds(event.time_us),
                        label: event.fault.clone(),
                    });
                }
            }
        }
    }
    (samples, windows, end_s)
}

impl Report {
    pub fn text(&self) -> String {
        let mut out = format!("{} (seed {})\n\n", if self.valid { "VALID" } else { "INVALID" }, self.seed);
        for verdict in &self.verdicts {
            out += &format!(
                "  {:<32} {:<7} checked {:>6}  {}\n",
                verdict.checker,
                if verdict.valid { "ok" } else { "BROKEN" },
                verdict.checked,
                verdict.guarantee
            );
            for problem in &verdict.problems {
                out += &format!("      - {problem}\n");
            }
            if verdict.problems_total > verdict.problems.len() {
                out += &format!("      ... {} problems in all\n", verdict.problems_total);
            }
        }
        for crash in &self.crashes {
            out += &format!("  node exited on its own: {crash}\n");
        }
        for failed in &self.failed_final_reads {
            out += &format!("  the final state was read again after: {failed}\n");
        }
        out += "\noperations:\n";
        for (kind, count) in &self.counts {
            out += &format!("  {kind:<20} {count}\n");
        }
        out += "\nafter each fault: the longest time without a successful write (from the fault's start \
                to the next fault), how long the fault was held, heal to the next write, and heal to \
                every member up to date again (redundancy restored after):\n";
        let optional = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}s"));
        for outage in &self.outages {
            let load =
                outage.load_longest_without_write_s.map_or(String::new(), |s| format!("  load {s:>6.2}s"));
            out += &format!(
                "  {:>7.1}s  {:<17} {:>6.2}s  held {:>6}  healed->write {:>6}{load}  redundancy {:>6}  ({})\n",
                outage.start_s,
                outage.fault,
                outage.longest_without_write_s,
                optional(outage.held_s),
                optional(outage.first_write_after_heal_s),
                optional(outage.redundancy_restored_s),
                outage.detail
            );
        }
        out += "\nworst (longest without a successful write) per fault:\n";
        for (fault, worst) in &self.worst_outage_by_fault {
            out += &format!("  {fault:<17} {worst:.2}s");
            if let Some(load) = self.worst_load_outage_by_fault.get(fault) {
                out += &format!("   background load: {load:.2}s");
            }
            if let Some(restored) = self.worst_redundancy_restored_by_fault.get(fault) {
                out += &format!("   redundancy restored after: {restored:.2}s");
            }
            out += "\n";
        }
        if let Some(load) = &self.load {
            out += &format!(
                "\nbackground load: {} requests, {} transfers acknowledged ({:.0}/s); latency of \
                 acknowledged requests p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
                load.requests,
                load.transfers_ok,
                load.transfers_per_second,
                load.latency_ms_p50,
                load.latency_ms_p99,
                load.latency_ms_max
            );
            for (outcome, count) in &load.outcomes {
                out += &format!("  {outcome:<20} {count}\n");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, Record, TransferKind, TransferSpec};

    fn write(op: u64, complete_us: u64) -> [Record; 2] {
        let transfer = TransferSpec {
            id: op,
            debit: 2,
            credit: 3,
            amount: 1,
            kind: TransferKind::Single,
            linked: false,
        };
        [
            Record::Invoke {
                op,
                process: 1,
                time_us: complete_us - 1,
                call: Call::Transfers { transfers: vec![transfer], retry: 0 },
            },
            Record::Complete {
                op,
                process: 1,
                time_us: complete_us,
                outcome: Outcome::Ok,
                codes: vec![0],
                balances: vec![],
                error: None,
            },
        ]
    }

    /// `--check` checks a run again with the seed and crashes its summary recorded (it wrote
    /// "seed 0" and forgot the crashes).
    #[test]
    fn a_check_again_keeps_the_runs_seed_and_crashes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous(dir.path()), (None, Vec::new()));
        let summary = r#"{"valid": false, "seed": 4242, "crashes": ["node 2 panicked"], "verdicts": []}"#;
        std::fs::write(dir.path().join("summary.json"), summary).unwrap();
        assert_eq!(previous(dir.path()), (Some(4242), vec!["node 2 panicked".to_string()]));
    }

    #[test]
    fn outages_measure_the_gap_the_hold_and_the_recovery() {
        let mut records: Vec<Record> = Vec::new();
        records.extend(write(1, 500_000));
        records.push(Record::Nemesis {
            time_us: 1_000_000,
            fault: "kill-all".into(),
            phase: Phase::Start,
            detail: "kill".into(),
        });
        records.push(Record::Nemesis {
            time_us: 3_000_000,
            fault: "kill-all".into(),
            phase: Phase::End,
            detail: "restart".into(),
        });
        records.extend(write(2, 3_400_000));
        records.extend(write(3, 3_500_000));
        records.extend(write(4, 9_000_000));
        let history = History::from_records(records).unwrap();
        let outages = outages(&history);
        assert_eq!(outages.len(), 1);
        let outage = &outages[0];
        // From the fault at 1 s, writes resume at 3.4 s; the later gap 3.5 s -> 9 s is longer.
        assert_eq!(outage.first_write_s, Some(2.4));
        assert_eq!(outage.held_s, Some(2.0));
        assert!((outage.first_write_after_heal_s.unwrap() - 0.4).abs() < 1e-9);
        assert!((outage.longest_without_write_s - 5.5).abs() < 1e-9);
        assert_eq!(outage.redundancy_restored_s, None, "not watched");
    }

    #[test]
    fn redundancy_is_restored_at_the_first_change_to_full_after_the_heal() {
        let changes = [(500, true), (1_000, false), (3_600, true), (4_000, false), (5_000, true)];
        // Healed at 3 s: full again at 3.6 s.
        assert_eq!(redundancy_restored(&changes, 3_000, 9_000), Some(3_600));
        // Healed while full: at once.
        assert_eq!(redundancy_restored(&changes, 3_700, 9_000), Some(3_700));
        // Not before the next fault.
        assert_eq!(redundancy_restored(&changes, 4_100, 4_900), None);
        assert_eq!(redundancy_restored(&[], 100, 200), None);
    }

    /// A final read that needed a second attempt still checks the run, and the summary says
    /// what failed first (the run of 2026-12-07 whose one attempt timed out was left unchecked).
    #[test]
    fn a_final_state_read_at_a_later_attempt_is_checked_and_the_failed_attempt_shown() {
        let dir = tempfile::tempdir().unwrap();
        let failed = "final listing of account 2's transfers: deadline passed (after 10.0 s)";
        let mut records: Vec<Record> = write(1, 500_000).into();
        records.push(Record::Final(crate::history::FinalState {
            failed_reads: vec![failed.to_string()],
            ..Default::default()
        }));
        let lines: Vec<String> = records.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
        std::fs::write(dir.path().join("history.jsonl"), lines.join("\n") + "\n").unwrap();
        let report = super::write(dir.path(), 1, Vec::new()).unwrap();
        assert_eq!(report.failed_final_reads, vec![failed.to_string()]);
        let text = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
        assert!(text.contains(&format!("the final state was read again after: {failed}")), "{text}");
        let unread =
            report.verdicts.iter().filter(|v| v.problems.iter().any(|p| p.contains("could not be read")));
        assert_eq!(unread.count(), 0, "{text}");
    }

    #[test]
    fn load_outages_and_summary_come_from_the_load_samples() {
        let sample = |time_us: u64, outcome: &str| {
            Record::Load(crate::history::LoadSample {
                time_us,
                latency_us: 10_000,
                transfers: 100,
                outcome: outcome.into(),
            })
        };
        let mut records: Vec<Record> = Vec::new();
        records.extend(write(1, 500_000));
        records.push(sample(600_000, "ok"));
        records.push(Record::Nemesis {
            time_us: 1_000_000,
            fault: "kill-site".into(),
            phase: Phase::Start,
            detail: "kill".into(),
        });
        records.push(sample(1_100_000, "ok"));
        records.push(sample(1_500_000, "unknown"));
        records.push(sample(1_600_000, "shed"));
        records.push(sample(2_900_000, "ok"));
        records.extend(write(2, 3_000_000));
        let history = History::from_records(records).unwrap();
        let outages = outages(&history);
        // Load writes at 1.1 s and 2.9 s: the gap between them is the longest until 3 s.
        assert!((outages[0].load_longest_without_write_s.unwrap() - 1.8).abs() < 1e-9);
        let summary = load_summary(&history).unwrap();
        assert_eq!((summary.requests, summary.transfers_ok), (5, 300));
        assert_eq!(summary.outcomes["unknown"], 1);
        assert_eq!(summary.outcomes["shed"], 1);
        assert!((summary.latency_ms_p50 - 10.0).abs() < 1e-9);
    }
}
