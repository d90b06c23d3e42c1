//! The storage engine as the ledger grows: apply throughput, resident memory, lookup latency by
//! id and disk use, from an empty store to `--transfers` (default 100,000,000), in batches of
//! 8189 random transfers between `--accounts` accounts (default 10,000); then the time to export
//! a snapshot of the whole state, and to reopen the store and serve a lookup. Merges run inside `commit`, so the throughput is what one core
//! sustains, merges included.
//!
//! `cargo bench -p tally-store --bench growth -- --transfers 100000000 --out docs/storage`
//! writes `growth.csv` and `growth.svg` (the curve) to `--out`; `--dir` keeps the store there
//! instead of in a temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ledger::*;
use rand::{Rng, SeedableRng};
use tally_store::Options;
use tally_store::RunStore;

const SEED: u64 = 0x6e0_77b;
const LOOKUPS_PER_STEP: usize = 2_000;

struct Args {
    transfers: u64,
    accounts: u128,
    step: u64,
    out: Option<PathBuf>,
    dir: Option<PathBuf>,
    cache_bytes: u64,
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let number = |name: &str, default: u64| value(name).map_or(default, |v| v.parse().expect(name));
    // `cargo test --benches` runs this without `--bench`: a smoke run.
    let smoke = !args.iter().any(|a| a == "--bench");
    let transfers = number("--transfers", if smoke { 50_000 } else { 100_000_000 });
    Args {
        transfers,
        accounts: number("--accounts", 10_000) as u128,
        step: number("--step", (transfers / 20).max(BATCH_EVENTS_MAX as u64)),
        out: value("--out").map(PathBuf::from),
        dir: value("--dir").map(PathBuf::from),
        cache_bytes: number("--cache-bytes", Options::default().cache_bytes),
    }
}

/// The id of the n-th transfer: a bijection of n, so ids look random (the hard case for an index)
/// and any earlier id can be named again for a lookup.
fn transfer_id(n: u64) -> u128 {
    let mut x = n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    ((x as u128) << 64) | (n as u128 + 1)
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn disk_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A writer that counts what it is given: the size of a snapshot without writing it.
#[derive(Default)]
struct Counted(u64);

impl Write for Counted {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len() as u64;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Row {
    transfers: u64,
    rate: f64,
    resident_mib: f64,
    runs_mib: f64,
    disk_gib: f64,
    lookup_p50_us: f64,
    lookup_p99_us: f64,
    /// Accounts, ids, index, and all the query indexes together.
    runs: [usize; 4],
}

fn lookups(ledger: &Ledger<RunStore>, created: u64, rng: &mut impl Rng) -> (f64, f64) {
    let mut times: Vec<Duration> = (0..LOOKUPS_PER_STEP)
        .map(|_| {
            let id = transfer_id(rng.random_range(0..created));
            let started = Instant::now();
            let found = ledger.lookup_transfers(&[id]).unwrap();
            let elapsed = started.elapsed();
            assert_eq!(found.len(), 1, "transfer {id} is missing");
            elapsed
        })
        .collect();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn main() {
    let args = parse_args();
    let temporary = tempfile::tempdir().unwrap();
    let dir = args.dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    let options = Options { cache_bytes: args.cache_bytes, background_merges: false };
    let mut ledger = Ledger::open(RunStore::open_with(&dir, options).unwrap()).unwrap();
    let mut clock = 1_700_000_000 * NANOS_PER_SECOND;
    let accounts: Vec<Account> =
        (1..=args.accounts).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    for chunk in accounts.chunks(BATCH_EVENTS_MAX) {
        clock += 1_000_000;
        ledger.apply(&[Batch::CreateAccounts(chunk.to_vec())], clock, None).unwrap();
    }
    println!(
        "{:>12} {:>12} {:>10} {:>9} {:>8} {:>9} {:>9}  runs (accounts, ids, index, query indexes)",
        "transfers", "per second", "RSS MiB", "runs MiB", "disk GiB", "p50 us", "p99 us"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let mut rows = Vec::new();
    let mut created = 0u64;
    while created < args.transfers {
        let step_end = (created + args.step).min(args.transfers);
        let step_start = created;
        let mut applying = Duration::ZERO;
        while created < step_end {
            let count = (step_end - created).min(BATCH_EVENTS_MAX as u64);
            let events: Vec<Transfer> = (0..count)
                .map(|i| {
                    let debit_account_id = rng.random_range(1..=args.accounts);
                    let mut credit_account_id = rng.random_range(1..args.accounts);
                    if credit_account_id >= debit_account_id {
                        credit_account_id += 1;
                    }
                    Transfer {
                        id: transfer_id(created + i),
                        debit_account_id,
                        credit_account_id,
                        amount: 1,
                        ledger: 1,
                        code: 1,
                        ..Transfer::default()
                    }
                })
                .collect();
            clock += 1_000_000;
            let started = Instant::now();
            let reply = ledger.apply(&[Batch::CreateTransfers(events)], clock, None).unwrap();
            applying += started.elapsed();
            let BatchReply::CreateTransfers(results) = &reply[0] else { unreachable!() };
            assert!(results.iter().all(|r| r.result == CreateTransferResult::Ok));
            created += count;
        }
        let (lookup_p50_us, lookup_p99_us) = lookups(&ledger, created, &mut rng);
        let (runs, runs_bytes) = ledger.store().run_counts();
        let row = Row {
            transfers: created,
            rate: (created - step_start) as f64 / applying.as_secs_f64(),
            resident_mib: resident_bytes() as f64 / (1 << 20) as f64,
            runs_mib: runs_bytes as f64 / (1 << 20) as f64,
            disk_gib: disk_bytes(&dir) as f64 / (1 << 30) as f64,
            lookup_p50_us,
            lookup_p99_us,
            runs: [runs[0], runs[1], runs[2], runs[3..].iter().sum()],
        };
        println!(
            "{:>12} {:>12.0} {:>10.0} {:>9.1} {:>8.2} {:>9.1} {:>9.1}  {:?}",
            row.transfers,
            row.rate,
            row.resident_mib,
            row.runs_mib,
            row.disk_gib,
            row.lookup_p50_us,
            row.lookup_p99_us,
            row.runs
        );
        rows.push(row);
    }
    let view = ledger.store().freeze();
    let started = Instant::now();
    let mut snapshot = Counted::default();
    let records = ledger::snapshot::export(&view, &mut snapshot).unwrap();
    let disk = disk_bytes(&dir);
    println!(
        "exported a snapshot of {records} records, {:.2} GiB, in {:.1} s; the store takes {:.2} GiB on disk, {:.2}x the snapshot",
        snapshot.0 as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64(),
        disk as f64 / (1u64 << 30) as f64,
        disk as f64 / snapshot.0 as f64
    );
    drop(view);
    ledger.store().flush().unwrap();
    drop(ledger);
    let started = Instant::now();
    let reopened = Ledger::open(RunStore::open_with(&dir, options).unwrap()).unwrap();
    reopened.lookup_transfers(&[transfer_id(created / 2)]).unwrap();
    println!("reopened and served a lookup in {:.2} s", started.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).unwrap();
        write_csv(&out.join("growth.csv"), &rows);
        write_svg(&out.join("growth.svg"), &rows, args.accounts);
    }
}

fn write_csv(path: &Path, rows: &[Row]) {
    let mut file = std::fs::File::create(path).unwrap();
    writeln!(file, "transfers,per_second,resident_mib,runs_mib,disk_gib,lookup_p50_us,lookup_p99_us")
        .unwrap();
    for r in rows {
        writeln!(
            file,
            "{},{:.0},{:.0},{:.1},{:.2},{:.1},{:.1}",
            r.transfers, r.rate, r.resident_mib, r.runs_mib, r.disk_gib, r.lookup_p50_us, r.lookup_p99_us
        )
        .unwrap();
    }
}

/// A panel's title, colour and value.
type Panel = (&'static str, &'static str, fn(&Row) -> f64);

/// Two panels, one above the other: transfers/s, and resident memory (MiB), against transfers
/// stored. Plain SVG, so that no plotting library or font has to be built for a bench.
fn write_svg(path: &Path, rows: &[Row], accounts: u128) {
    let (width, panel, left, top) = (760.0, 220.0, 80.0, 40.0);
    let x_max = rows.last().map_or(1, |r| r.transfers) as f64;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{}' font-family='sans-serif' font-size='12'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <text x='{left}' y='20' font-size='14'>tally storage engine as the ledger grows ({accounts} accounts, batches of 8189, one core)</text>\n",
        top + 2.0 * (panel + 50.0)
    );
    let panels: [Panel; 2] = [
        ("transfers/s applied into the state store", "#1f77b4", |r| r.rate),
        ("resident memory, MiB", "#d62728", |r| r.resident_mib),
    ];
    for (index, (title, colour, value)) in panels.iter().enumerate() {
        let y0 = top + index as f64 * (panel + 50.0);
        let y_max = rows.iter().map(value).fold(1.0, f64::max) * 1.1;
        let x = |t: f64| left + t / x_max * (width - left - 20.0);
        let y = |v: f64| y0 + panel - v / y_max * panel;
        svg += &format!(
            "<text x='{left}' y='{}'>{title}</text>\n<line x1='{left}' y1='{}' x2='{left}' y2='{}' stroke='black'/>\n\
             <line x1='{left}' y1='{}' x2='{}' y2='{}' stroke='black'/>\n",
            y0 + 12.0,
            y0 + 16.0,
            y0 + panel,
            y0 + panel,
            width - 20.0,
            y0 + panel
        );
        for tick in 0..=4 {
            let v = y_max * tick as f64 / 4.0;
            svg +=
                &format!("<text x='{}' y='{}' text-anchor='end'>{:.0}</text>\n", left - 6.0, y(v) + 4.0, v);
            let t = x_max * tick as f64 / 4.0;
            svg += &format!(
                "<text x='{}' y='{}' text-anchor='middle'>{:.0}M</text>\n",
                x(t),
                y0 + panel + 16.0,
                t / 1e6
            );
        }
        let points: Vec<String> =
            rows.iter().map(|r| format!("{:.1},{:.1}", x(r.transfers as f64), y(value(r)))).collect();
        svg += &format!(
            "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>\n",
            points.join(" ")
        );
        svg += &format!(
            "<text x='{}' y='{}' text-anchor='end'>transfers stored</text>\n",
            width - 20.0,
            y0 + panel + 32.0
        );
    }
    svg += "</svg>\n";
    std::fs::write(path, svg).unwrap();
}
