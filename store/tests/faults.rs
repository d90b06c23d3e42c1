//! The engine on a page store in memory that fails as disks and crashes do
//! (`tally_store::pages::MemoryDisk`): what a crash keeps, what damage at rest does, what a torn
//! batch does. Each target is a bolero target over a seed: bounded under `cargo test`, longer
//! with `BOLERO_RANDOM_ITERATIONS` (docs/testing.md, "Fuzzing"). Merges run inside `commit` and the
//! cache is small, so that a few hundred batches merge runs of every kind.

use bolero::check;
use ledger::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tally_store::pages::{MemoryDisk, Pages};
use tally_store::{Options, RunStore};

const ACCOUNTS: u128 = 24;
const OPTIONS: Options = Options { cache_bytes: 1 << 16, background_merges: false };

/// Entry `n` of the workload of `seed`: the accounts first, then transfers between them (some
/// pending with a timeout, some posting or voiding an earlier pending one, some refused), with
/// query fields set, so that every kind of run, chunk and plain key is written.
fn entry(seed: u64, n: u64) -> Vec<Batch> {
    if n == 0 {
        let accounts = (1..=ACCOUNTS)
            .map(|id| Account {
                id,
                ledger: 1,
                code: 1 + (id % 3) as u16,
                user_data_128: id % 5,
                flags: if id % 4 == 0 {
                    AccountFlags(AccountFlags::HISTORY)
                } else {
                    AccountFlags::default()
                },
                ..Account::default()
            })
            .collect();
        return vec![Batch::CreateAccounts(accounts)];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let count = rng.random_range(1..=120u128);
    let transfers = (0..count)
        .map(|i| {
            let id = (n as u128) << 32 | i;
            let debit = rng.random_range(1..=ACCOUNTS);
            let credit = debit % ACCOUNTS + 1;
            let mut transfer = Transfer {
                id,
                debit_account_id: debit,
                credit_account_id: credit,
                amount: rng.random_range(1..1_000),
                ledger: 1,
                code: rng.random_range(1..4),
                user_data_64: rng.random_range(0..3),
                ..Transfer::default()
            };
            match rng.random_range(0..10) {
                0 | 1 => {
                    transfer.flags = TransferFlags(TransferFlags::PENDING);
                    transfer.timeout = rng.random_range(0..3);
                }
                2 if n > 2 => {
                    // An earlier entry's transfer: posted or voided if it was pending, refused
                    // otherwise.
                    let earlier = rng.random_range(1..n) as u128;
                    transfer.pending_id = earlier << 32 | rng.random_range(0..4);
                    transfer.flags = if rng.random_bool(0.5) {
                        TransferFlags(TransferFlags::POST_PENDING_TRANSFER)
                    } else {
                        TransferFlags(TransferFlags::VOID_PENDING_TRANSFER)
                    };
                    transfer.amount = 0;
                    transfer.debit_account_id = 0;
                    transfer.credit_account_id = 0;
                    transfer.ledger = 0;
                    transfer.code = 0;
                }
                3 => transfer.credit_account_id = ACCOUNTS + 7, // refused: no such account
                _ => {}
            }
            transfer
        })
        .collect();
    vec![Batch::CreateTransfers(transfers)]
}

/// Ledger time of entry `n`: a second apart, so that pending transfers expire along the way.
fn time(n: u64) -> u64 {
    1_700_000_000_000_000_000 + n * 1_000_000_000
}

fn open(disk: &MemoryDisk) -> StoreResult<Ledger<RunStore>> {
    Ledger::open(RunStore::open_on(Pages::on(disk.pages()), OPTIONS)?)
}

/// Applies entries `range` of the workload of `seed`.
fn apply<S: Store>(ledger: &mut Ledger<S>, seed: u64, range: std::ops::Range<u64>) {
    for n in range {
        ledger.apply(&entry(seed, n), time(n), None).unwrap();
    }
}

/// The state after the first `entries` entries, applied in memory.
fn replayed(seed: u64, entries: u64) -> Ledger<MemStore> {
    let mut ledger = Ledger::open(MemStore::new()).unwrap();
    apply(&mut ledger, seed, 0..entries);
    ledger
}

/// A query's error as the store's (the filters here are valid: anything else is a bug).
fn queried<T>(result: Result<T, query::QueryError>) -> StoreResult<T> {
    result.map_err(|error| match error {
        query::QueryError::Store(error) => error,
        query::QueryError::Filter(error) => panic!("a valid filter refused: {error}"),
    })
}

fn exported(store: &impl Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    snapshot::export(store, &mut bytes).unwrap();
    bytes
}

/// A crash keeps every entry made durable (a flush) and whole entries after it, never part of
/// one: the store reopens as the state after some whole prefix of entries, no shorter than the
/// last flush, byte for byte what applying that prefix in memory gives. Then it goes on: the rest
/// of the entries leave it where a run without the crash ends.
#[test]
fn a_crash_keeps_the_flushed_entries_and_whole_entries_after_them() {
    check!().with_iterations(24).with_type::<u64>().for_each(|seed| {
        let seed = *seed;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let entries = rng.random_range(2..160u64);
        let disk = MemoryDisk::default();
        let mut ledger = open(&disk).unwrap();
        let mut flushed = 0;
        for n in 0..entries {
            ledger.apply(&entry(seed, n), time(n), None).unwrap();
            if rng.random_range(0..8) == 0 {
                ledger.store().flush().unwrap();
                flushed = n + 1;
            }
        }
        let keep = rng.random_range(0..=disk.unsynced_batches());
        disk.crash(keep);
        // The process that wrote is gone: what it still does fails (its drop's flush included).
        assert!(ledger.store().flush().is_err(), "a store written before the crash still writes");
        drop(ledger);

        let mut reopened = open(&disk).unwrap();
        let kept = reopened.meta().batches_applied;
        assert!(
            (flushed..=entries).contains(&kept),
            "seed {seed}: {kept} entries kept; {flushed} were flushed of {entries}"
        );
        let expected = replayed(seed, kept);
        assert_eq!(reopened.meta().digest, expected.meta().digest, "seed {seed}");
        assert!(exported(reopened.store()) == exported(expected.store()), "seed {seed}: the state differs");

        apply(&mut reopened, seed, kept..entries);
        let uninterrupted = replayed(seed, entries);
        assert_eq!(reopened.meta().digest, uninterrupted.meta().digest, "seed {seed}");
        assert!(exported(reopened.store()) == exported(uninterrupted.store()), "seed {seed}");
    });
}

/// A bit flipped at rest in any stored value is refused as damage where it is read, never served
/// and never a panic: opening the store and exporting it (all records) either fails with damage
/// or gives exactly the undamaged export (the value is one export does not read: a query index,
/// which the lookups below read instead).
#[test]
fn damage_to_any_stored_value_is_refused_as_damage() {
    check!().with_iterations(6).with_type::<u64>().for_each(|seed| {
        let seed = *seed;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let entries = rng.random_range(20..80u64);
        let disk = MemoryDisk::default();
        {
            let mut ledger = open(&disk).unwrap();
            apply(&mut ledger, seed, 0..entries);
            ledger.store().flush().unwrap();
        }
        let intact = exported(open(&disk).unwrap().store());
        let keys = disk.keys();
        for _ in 0..40 {
            let key = &keys[rng.random_range(0..keys.len())];
            let damaged = disk.copy();
            assert!(damaged.damage(key, rng.random::<u32>() as usize));
            let read = open(&damaged).and_then(|ledger| {
                let mut bytes = Vec::new();
                snapshot::export(ledger.store(), &mut bytes)?;
                let filter = QueryFilter { limit: 100, code: 2, ..QueryFilter::default() };
                queried(ledger.query_transfers(&filter))?;
                queried(ledger.query_accounts(&QueryFilter {
                    limit: 100,
                    user_data_128: 3,
                    ..QueryFilter::default()
                }))?;
                ledger.lookup_transfers(&[(entries as u128 / 2) << 32])?;
                Ok(bytes)
            });
            match read {
                Ok(bytes) => assert!(bytes == intact, "seed {seed}: damage under {key:02x?} was served"),
                Err(error) => assert!(error.is_damage(), "seed {seed}: {error}"),
            }
        }
    });
}

/// A batch torn by the page store (which redb's atomic commit rules out, and the engine relies
/// on) is not a panic: the store opens and reads, or refuses with an error.
#[test]
fn a_torn_batch_is_an_error_or_a_store_never_a_panic() {
    check!().with_iterations(16).with_type::<u64>().for_each(|seed| {
        let seed = *seed;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let entries = rng.random_range(2..100u64);
        let disk = MemoryDisk::default();
        {
            let mut ledger = open(&disk).unwrap();
            apply(&mut ledger, seed, 0..entries);
            let unsynced = disk.unsynced_batches();
            disk.crash_torn(rng.random_range(0..=unsynced), rng.random_range(0..200));
        }
        let _ = open(&disk).and_then(|ledger| {
            let mut bytes = Vec::new();
            snapshot::export(ledger.store(), &mut bytes)?;
            ledger.lookup_transfers(&[1 << 32, (entries as u128 - 1) << 32])?;
            queried(ledger.query_transfers(&QueryFilter { limit: 10, code: 1, ..QueryFilter::default() }))
        });
    });
}
