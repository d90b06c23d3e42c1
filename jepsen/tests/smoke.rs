//! The CI smoke run: three sites of one node each, under payments, through a kill of the
//! leader's site, a site cut off, a power cut of the whole cluster (unsynced writes lost), a node
//! that loses its disk and is replaced, and a wrong clock, with a background load of 2,000
//! transfers a second so that the faults strike a busy cluster. Every checker must pass.
//! Longer runs: `cargo run --release -p tally-jepsen -- --nemesis all --time-limit 600`.

use std::path::PathBuf;
use std::time::Duration;

use tally_jepsen::load::LoadOptions;
use tally_jepsen::nemesis::{Fault, Timing};
use tally_jepsen::run::{Options, run};

/// The `tally` binary of this build, built first if `cargo test -p tally-jepsen` ran alone.
fn tally_binary() -> PathBuf {
    if let Some(path) = tally_jepsen::tally_beside_me() {
        return path;
    }
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "-p", "raft-node", "--bin", "tally"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building tally failed");
    tally_jepsen::tally_beside_me().expect("tally is built beside the test binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_survive_site_loss_a_cut_a_power_cut_a_lost_disk_and_a_wrong_clock() {
    let out = tempfile::tempdir().expect("output directory");
    let options = Options {
        binary: tally_binary(),
        layout: vec![1, 1, 1],
        faults: vec![Fault::KillLeaderSite, Fault::CutSite, Fault::PowerCut, Fault::Wipe, Fault::Clock],
        timing: Timing {
            quiet: (Duration::from_secs(3), Duration::from_secs(4)),
            hold: (Duration::from_secs(3), Duration::from_secs(4)),
        },
        time_limit: Duration::from_secs(40),
        seed: 20261124,
        clients: 4,
        customers: 6,
        opening: 1000,
        op_timeout: Duration::from_secs(2),
        latency: Duration::from_millis(2),
        out: out.path().to_path_buf(),
        progress: false,
        serve_args: Vec::new(),
        load: Some(LoadOptions { rate: 2000.0, batch: 100, timeout: Duration::from_secs(2), seed: 20261124 }),
        sample_metrics: Some(Duration::from_millis(500)),
    };
    let report = run(options).await.expect("the run finishes");
    let text = report.text();
    println!("{text}");
    assert!(report.valid, "the smoke run found a problem:\n{text}\nhistory kept in {}", out.keep().display());
    for fault in ["kill-leader-site", "cut-site", "power-cut", "wipe", "clock"] {
        assert!(report.worst_outage_by_fault.contains_key(fault), "{fault} never ran:\n{text}");
    }
    assert!(report.counts.get("transfers ok").copied().unwrap_or(0) > 100, "too little traffic:\n{text}");
    // Every node's metrics were sampled, and its applied index grew over the run.
    let samples = std::fs::read_to_string(out.path().join("nodes/metrics.tsv")).expect("metrics.tsv");
    for node in ["1", "2", "3"] {
        let applied: Vec<f64> = samples
            .lines()
            .map(|line| line.split('\t').collect::<Vec<_>>())
            .filter(|fields| fields[1] == node && fields[2] == "tally_raft_applied_index")
            .map(|fields| fields[3].parse().expect("a number"))
            .collect();
        assert!(
            applied.len() > 20 && applied.last() > applied.first(),
            "node {node}'s applied index was not sampled as it grew: {:?}",
            &applied[..applied.len().min(5)]
        );
    }
    let load = report.load.as_ref().expect("the background load ran");
    assert!(load.transfers_ok > 10_000, "too little background load:\n{text}");
    assert!(!load.outcomes.keys().any(|o| o.starts_with("failed")), "load transfers refused:\n{text}");
    for picture in ["latency.png", "throughput.png", "history.jsonl", "summary.json"] {
        assert!(out.path().join(picture).is_file(), "{picture} missing");
    }
}
