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
    /// Fault start to the first write acknowledged after it.
    pub first_write_s: Option<f64>,
    pub longest_without_write_s: f64,
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
}

/// Computes the report of the history in `dir`, writes `summary.json`, `summary.txt`,
/// `latency.png` and `throughput.png` there.
pub fn write(dir: &Path, seed: u64, crashes: Vec<String>) -> Result<Report, String> {
    let history = History::load(&dir.join("history.jsonl"))?;
    let verdicts = check_all(&history);
    let valid = verdicts.iter().all(|v| v.valid) && crashes.is_empty();
    let outages = outages(&history);
    let mut worst_outage_by_fault: BTreeMap<String, f64> = BTreeMap::new();
    for outage in &outages {
        let worst = worst_outage_by_fault.entry(outage.fault.clone()).or_default();
        *worst = worst.max(outage.longest_without_write_s);
    }
    let report =
        Report { valid, seed, verdicts, counts: counts(&history), outages, worst_outage_by_fault, crashes };
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

fn outages(history: &History) -> Vec<Outage> {
    let mut writes: Vec<u64> = history
        .ops
        .iter()
        .filter(|op| !op.is_read() && op.outcome == Outcome::Ok && op.process != 0)
        .filter_map(|op| op.complete_us)
        .collect();
    writes.sort_unstable();
    let starts: Vec<_> = history.nemesis.iter().filter(|e| e.phase == Phase::Start).collect();
    let run_end = history.ops.iter().filter_map(|op| op.complete_us).max().unwrap_or(0);
    let mut result = Vec::new();
    for (index, start) in starts.iter().enumerate() {
        // Churn records two starts (the add, then the whole change); the window is the same.
        let until = starts.get(index + 1).map_or(run_end, |next| next.time_us).max(start.time_us);
        let inside: Vec<u64> =
            writes.iter().copied().filter(|t| *t >= start.time_us && *t <= until).collect();
        let mut previous = start.time_us;
        let mut longest = 0;
        for t in inside.iter().copied().chain(std::iter::once(until)) {
            longest = longest.max(t - previous);
            previous = t;
        }
        result.push(Outage {
            fault: start.fault.clone(),
            detail: start.detail.clone(),
            start_s: seconds(start.time_us),
            first_write_s: inside.first().map(|t| seconds(t - start.time_us)),
            longest_without_write_s: seconds(longest),
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
        out += "\noperations:\n";
        for (kind, count) in &self.counts {
            out += &format!("  {kind:<20} {count}\n");
        }
        out += "\nlongest time without a successful write after each fault:\n";
        for outage in &self.outages {
            out += &format!(
                "  {:>7.1}s  {:<17} {:>6.2}s  ({})\n",
                outage.start_s, outage.fault, outage.longest_without_write_s, outage.detail
            );
        }
        out += "\nworst per fault:\n";
        for (fault, worst) in &self.worst_outage_by_fault {
            out += &format!("  {fault:<17} {worst:.2}s\n");
        }
        out
    }
}
