//! `tally-sim`: runs seeds of the deterministic simulation and prints a replay command for each
//! that fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tally_sim::{Faults, Options};

/// Runs tally's nodes under simulated time, network and disk, one seed per run, and checks the
/// ledger's guarantees after every step. The same seed replays the same run, byte for byte.
#[derive(Parser)]
#[command(name = "tally-sim")]
struct Args {
    /// Seeds to run, from --seed on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed (default: one drawn from the OS, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes, one per site: 3 or 5.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    nodes: u64,
    /// Faults to draw from: crash, partition, peer-cut, clock, purge-crash, disk, write-crash,
    /// membership (or all, none).
    #[arg(long, default_value = "all", value_parser = Faults::parse)]
    faults: Faults,
    /// Simulated time per seed (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    sim_time: Duration,
    /// Print each run's trace (and the nodes' logs with RUST_LOG). Runs one seed at a time, so
    /// that their traces do not interleave.
    #[arg(long)]
    verbose: bool,
    /// Seeds run at once, each in a process of its own (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    jobs: Option<u64>,
}

/// Node logs carry the simulated time, as the trace does.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:>9.3}s", tally_sim::now().as_secs_f64())
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| format!("'{text}' is not a duration such as 60s or 5m"))?;
    let seconds = match unit {
        "s" | "" => number,
        "m" => number * 60,
        _ => return Err(format!("'{text}' is not a duration such as 60s or 5m")),
    };
    if seconds < 30 {
        return Err(format!("--sim-time {text}: at least 30s (faults stop 20s before the end)"));
    }
    Ok(Duration::from_secs(seconds))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes == 4 {
        eprintln!("tally-sim: --nodes 4: a simulated cluster has 3 or 5 nodes");
        return ExitCode::from(2);
    }
    if args.verbose {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(SimTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let first = args.seed.unwrap_or_else(|| u64::from(rand::random::<u32>()));
    if args.seeds == 1 {
        return match run_one(&args, first) {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        };
    }
    // Each seed in a process of its own, so that it runs exactly as its replay command does;
    // several at once, their results printed in the order of their seeds.
    let exe = std::env::current_exe().expect("tally-sim's own path");
    let last = first.saturating_add(args.seeds);
    let jobs = match (args.verbose, args.jobs) {
        (true, _) => 1,
        (false, Some(jobs)) => jobs,
        (false, None) => std::thread::available_parallelism().map_or(1, |cores| cores.get() as u64),
    };
    let next = std::sync::atomic::AtomicU64::new(first);
    let (done, results) = std::sync::mpsc::channel();
    let (mut passed, mut failed) = (0u64, 0u64);
    let unrunnable = std::thread::scope(|scope| {
        for _ in 0..jobs.min(args.seeds) {
            let done = done.clone();
            let (next, exe, args) = (&next, &exe, &args);
            scope.spawn(move || {
                loop {
                    // Never past `last`: a plain add would wrap at u64::MAX and start again at 0.
                    let taken = next.fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |seed| (seed < last).then(|| seed + 1),
                    );
                    let Ok(seed) = taken else { break };
                    if done.send((seed, run_apart(exe, args, seed))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done);
        let mut waiting = std::collections::BTreeMap::new();
        let mut due = first;
        for (seed, output) in results {
            waiting.insert(seed, output);
            while let Some(output) = waiting.remove(&due) {
                let output = match output {
                    Ok(output) => output,
                    Err(error) => {
                        eprintln!("tally-sim: cannot run seed {due} in a process of its own: {error}");
                        next.store(last, std::sync::atomic::Ordering::Relaxed);
                        return true;
                    }
                };
                let stdout = String::from_utf8_lossy(&output.stdout);
                for line in stdout.lines().filter(|line| !line.ends_with(" failed")) {
                    println!("{line}");
                }
                if output.status.success() {
                    passed += 1;
                } else {
                    failed += 1;
                    if stdout.is_empty() {
                        println!("seed {due}: FAILED: the simulation process ended with {}", output.status);
                        println!("  replay: {}", replay(&args, due));
                    }
                }
                due += 1;
            }
        }
        false
    });
    if unrunnable {
        return ExitCode::from(2);
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Runs `seed` in a process of its own, with the same arguments as its replay command.
fn run_apart(exe: &std::path::Path, args: &Args, seed: u64) -> std::io::Result<std::process::Output> {
    let mut command = std::process::Command::new(exe);
    command.args(["--seed", &seed.to_string(), "--seeds", "1", "--nodes", &args.nodes.to_string()]);
    command.args([
        "--faults",
        &args.faults.to_string(),
        "--sim-time",
        &format!("{}s", args.sim_time.as_secs()),
    ]);
    if args.verbose {
        command.arg("--verbose");
    }
    command.stderr(std::process::Stdio::inherit()).output()
}

fn replay(args: &Args, seed: u64) -> String {
    format!(
        "tally-sim --seed {seed} --nodes {} --faults {} --sim-time {}s --verbose",
        args.nodes,
        args.faults,
        args.sim_time.as_secs()
    )
}

/// Runs `seed` here; prints its result and whether it passed.
fn run_one(args: &Args, seed: u64) -> bool {
    let options = Options {
        seed,
        nodes: args.nodes,
        faults: args.faults.clone(),
        sim_time: args.sim_time,
        verbose: args.verbose,
    };
    let started = std::time::Instant::now();
    // A node that panics brings the simulation down (its runtime shuts down on an unhandled
    // panic): a failure of the seed, named by the first panic's message and place.
    let first_panic = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let first_panic = first_panic.clone();
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mut first = first_panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if first.is_none() {
                let message = info
                    .payload()
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| info.payload().downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                let place =
                    info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                *first = Some(format!("{}{place}", message.replace('\n', " ")));
                drop(first);
                report(info);
            }
        }));
    }
    let ran = std::panic::catch_unwind(|| tally_sim::run(&options));
    let took = started.elapsed().as_secs_f64();
    let failure = match &ran {
        Ok(outcome) => outcome.failure.clone(),
        Err(_) => {
            let panic = first_panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            Some(format!("a node panicked: {}", panic.unwrap_or_default()))
        }
    };
    match (&failure, &ran) {
        (None, Ok(outcome)) => println!(
            "seed {seed}: passed in {took:.1}s ({} acknowledged, {} faults, {} snapshots or purges, {} state \
             stores reopened after a crash, trace {})",
            outcome.acknowledged, outcome.faults, outcome.snapshots, outcome.stores_kept, outcome.trace_hash
        ),
        (failure, _) => {
            println!("seed {seed}: FAILED in {took:.1}s: {}", failure.as_deref().unwrap_or_default());
            println!("  replay: {}", replay(args, seed));
        }
    }
    println!("{} passed, {} failed", u64::from(failure.is_none()), u64::from(failure.is_some()));
    failure.is_none()
}
