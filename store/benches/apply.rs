//! Apply throughput of `CreateTransfers`: 10,000 accounts, batches of 8189 random transfers, on
//! the in-memory store and on the state store (`RunStore`, on redb). One thread applies; that is
//! the state machine's real shape.
//!
//! `cargo bench -p tally-store --bench apply` (add `-- --batches N` to change the run length,
//! `-- --accounts N` for another number of accounts, `-- --store memory|disk` for one store).

use std::time::Instant;

// The allocator the `tally` binary uses: glibc's returns large blocks to the kernel and pays for
// zeroed pages again on every entry.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ledger::*;
use rand::{Rng, SeedableRng};
use tally_store::RunStore;

const SEED: u64 = 0xbe7c4;

fn accounts_batches(accounts: u128) -> Vec<Batch> {
    let accounts: Vec<Account> =
        (1..=accounts).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    accounts.chunks(BATCH_EVENTS_MAX).map(|chunk| Batch::CreateAccounts(chunk.to_vec())).collect()
}

fn transfer_batches(count: usize, accounts: u128) -> Vec<Batch> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let mut next_id: u128 = 1 << 64;
    (0..count)
        .map(|_| {
            let events = (0..BATCH_EVENTS_MAX)
                .map(|_| {
                    next_id += 1;
                    let debit_account_id = rng.random_range(1..=accounts);
                    let mut credit_account_id = rng.random_range(1..=accounts - 1);
                    if credit_account_id >= debit_account_id {
                        credit_account_id += 1;
                    }
                    Transfer {
                        id: next_id,
                        debit_account_id,
                        credit_account_id,
                        amount: rng.random_range(1..1_000),
                        ledger: 1,
                        code: 1,
                        ..Transfer::default()
                    }
                })
                .collect();
            Batch::CreateTransfers(events)
        })
        .collect()
}

fn run<S: Store>(name: &str, store: S, accounts: u128, batches: &[Batch]) {
    let mut ledger = Ledger::open(store).unwrap();
    let mut clock = 1_700_000_000 * NANOS_PER_SECOND;
    for batch in accounts_batches(accounts) {
        ledger.apply(&[batch], clock, None).unwrap();
    }
    let started = Instant::now();
    for batch in batches {
        clock += 1_000_000;
        let reply = ledger.apply(std::slice::from_ref(batch), clock, None).unwrap();
        let BatchReply::CreateTransfers(results) = &reply[0] else { unreachable!() };
        assert!(results.iter().all(|r| r.result == CreateTransferResult::Ok));
    }
    let elapsed = started.elapsed();
    let transfers = batches.len() * BATCH_EVENTS_MAX;
    let rate = transfers as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<8} {transfers:>9} transfers in {:>7.3} s: {:>10.0} transfers/s ({:.1} us a batch of {})",
        elapsed.as_secs_f64(),
        rate,
        elapsed.as_secs_f64() * 1e6 / batches.len() as f64,
        BATCH_EVENTS_MAX
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a short smoke.
    let smoke = !args.iter().any(|a| a == "--bench");
    let batches = args
        .iter()
        .position(|a| a == "--batches")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if smoke { 2 } else { 100 });
    let only = args.iter().position(|a| a == "--store").and_then(|i| args.get(i + 1)).cloned();
    let accounts = args
        .iter()
        .position(|a| a == "--accounts")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let batches = transfer_batches(batches, accounts);
    if only.as_deref().is_none_or(|s| s == "memory") {
        run("memory", MemStore::new(), accounts, &batches);
    }
    if only.as_deref().is_none_or(|s| s == "disk") {
        let dir = tempfile::tempdir().unwrap();
        // Merges run inside `commit`: one core pays for all the work the store does.
        let options = tally_store::Options { background_merges: false, ..Default::default() };
        run("disk", RunStore::open_with(dir.path(), options).unwrap(), accounts, &batches);
    }
}
