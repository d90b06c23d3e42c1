//! `tally-jepsen`: run tally under faults and check what it did. See the crate documentation.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tally_jepsen::nemesis::{Fault, Timing};
use tally_jepsen::run::{Options, run_to_end};

#[derive(Parser)]
#[command(version, about = "Chaos tests for tally: real processes, whole-site faults, checked histories")]
struct Args {
    /// Nodes per site, comma-separated: 1,1,1 is three sites of one node; 2,2,1 five nodes.
    #[arg(long, default_value = "1,1,1", value_delimiter = ',')]
    layout: Vec<usize>,
    /// Faults (the list is made from every fault the harness knows: `nemesis_help`).
    #[arg(long, default_value = "all", help = nemesis_help())]
    nemesis: String,
    /// Seconds of workload.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Seed of the schedule and the workload; a random one if not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Client processes; every other one re-sends writes whose outcome is unknown.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    customers: u64,
    /// Each customer's opening balance.
    #[arg(long, default_value_t = 1000)]
    opening: u64,
    /// Deadline of one client call in milliseconds, retries on other nodes included.
    #[arg(long, default_value_t = 2000)]
    op_timeout_ms: u64,
    /// Quiet time before each fault, in seconds: MIN,MAX.
    #[arg(long, default_value = "4,8", value_delimiter = ',')]
    quiet: Vec<u64>,
    /// How long each fault is held, in seconds: MIN,MAX.
    #[arg(long, default_value = "4,10", value_delimiter = ',')]
    hold: Vec<u64>,
    /// Milliseconds added each way to every link between two sites.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Output folder; defaults to jepsen-runs/<seed>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The tally binary under test; defaults to the one beside this program.
    #[arg(long)]
    tally_bin: Option<PathBuf>,
    /// Extra flag for every `tally serve` (repeatable), e.g. --serve-arg=--election-timeout-ms=300.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Background load: transfers per second, open loop, next to the checked bank workload
    /// (batches of --load-batch, each followed by one single-transfer request).
    #[arg(long)]
    load: Option<f64>,
    /// Transfers per batch request of the background load.
    #[arg(long, default_value_t = 100)]
    load_batch: usize,
    /// Sample every node's metrics this often (milliseconds) into nodes/metrics.tsv, to tell
    /// what was behind a gap in the writes (docs/jepsen/rush-hour/scripts/gaps.py).
    #[arg(long)]
    sample_metrics_ms: Option<u64>,
    /// Run nothing: check the history.jsonl already in this folder again, and redraw its report.
    #[arg(long)]
    check: Option<PathBuf>,
}

fn range(values: &[u64], name: &str) -> Result<(Duration, Duration), String> {
    match values {
        [low, high] if low <= high => Ok((Duration::from_secs(*low), Duration::from_secs(*high))),
        [one] => Ok((Duration::from_secs(*one), Duration::from_secs(*one))),
        _ => Err(format!("--{name} takes MIN,MAX seconds with MIN <= MAX")),
    }
}

fn options(args: Args) -> Result<Options, String> {
    if args.layout.is_empty() || args.layout.contains(&0) {
        return Err("--layout needs at least one site, each with at least one node".into());
    }
    if args.clients == 0 || args.customers < 2 || args.opening < 10 {
        return Err("need --clients >= 1, --customers >= 2 and --opening >= 10".into());
    }
    if args.load.is_some_and(|rate| !(rate > 0.0 && rate.is_finite())) {
        return Err("--load takes a positive number of transfers per second".into());
    }
    if args.load_batch == 0 || args.load_batch > 8189 {
        return Err("--load-batch must be 1 to 8189".into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let binary = match args.tally_bin {
        Some(path) => path,
        None => tally_jepsen::tally_beside_me()
            .ok_or("no tally binary beside tally-jepsen: build it (cargo build --release -p raft-node) or pass --tally-bin")?,
    };
    Ok(Options {
        binary,
        layout: args.layout,
        faults: Fault::parse_list(&args.nemesis)?,
        timing: Timing { quiet: range(&args.quiet, "quiet")?, hold: range(&args.hold, "hold")? },
        time_limit: Duration::from_secs(args.time_limit),
        seed,
        clients: args.clients,
        customers: args.customers,
        opening: args.opening,
        op_timeout: Duration::from_millis(args.op_timeout_ms),
        latency: Duration::from_millis(args.latency_ms),
        out: args.out.unwrap_or_else(|| PathBuf::from(format!("jepsen-runs/{seed}"))),
        progress: true,
        serve_args: args.serve_args,
        load: args.load.map(|rate| tally_jepsen::load::LoadOptions {
            rate,
            batch: args.load_batch,
            timeout: Duration::from_millis(args.op_timeout_ms),
            seed,
        }),
        sample_metrics: args.sample_metrics_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
    })
}

/// `--nemesis`'s help: every name `Fault::parse_list` accepts (a hand-kept list missed some).
fn nemesis_help() -> String {
    let names: Vec<&str> = Fault::ALL.iter().map(|fault| fault.name()).collect();
    format!("Faults: all, none, or a comma-separated list of {}", names.join(", "))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(dir) = args.check {
        // The run's own seed and crashes, from its summary, unless --seed says otherwise.
        let (seed, crashes) = tally_jepsen::report::previous(&dir);
        return match tally_jepsen::report::write(&dir, args.seed.or(seed).unwrap_or(0), crashes) {
            Ok(report) => {
                print!("{}", report.text());
                if report.valid { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
            }
            Err(error) => {
                eprintln!("tally-jepsen: {error}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let options = match options(args) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("tally-jepsen: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let out = options.out.clone();
    eprintln!("tally-jepsen: seed {}, output in {}", options.seed, out.display());
    match run_to_end(options) {
        Ok(report) => {
            print!("{}", report.text());
            println!("\nhistory, summary, pictures and node logs: {}", out.display());
            if report.valid { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
        }
        Err(error) => {
            eprintln!("tally-jepsen: the run could not finish: {error}");
            std::process::ExitCode::from(2)
        }
    }
}
