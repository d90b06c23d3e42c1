//! Crash consistency: a child process applies the seeded workload to the state store and is
//! killed with SIGKILL at random points; reopened, the state must be exactly the state after some
//! whole prefix of batches (never half a batch), which we check by replaying that prefix in memory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use ledger::*;
use rand::{Rng, SeedableRng};
use tally_store::RunStore;

const CHILD_DIR_ENV: &str = "TALLY_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "TALLY_CRASH_CHILD_SEED";
const KILLS: usize = 12;
/// The child stops by itself after this many batches, should nobody kill it.
const CHILD_BATCHES_MAX: u64 = 20_000;

/// Not a test on its own: the body of the child process, which does nothing unless the parent
/// set `TALLY_CRASH_CHILD_DIR`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else { return };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    let mut ledger = Ledger::open(RunStore::open(dir.as_ref()).unwrap()).unwrap();
    let mut workload = Workload::new(seed);
    let done = ledger.meta().batches_applied;
    for _ in 0..done {
        workload.next();
    }
    for applied in done + 1..=CHILD_BATCHES_MAX {
        let (batch, proposed, _) = workload.next();
        ledger.apply(&[batch], proposed, None).unwrap();
        println!("applied {applied}");
    }
}

/// The state after the first `batches` batches of the workload, computed in memory.
fn replay(seed: u64, batches: u64) -> Ledger<MemStore> {
    let mut ledger = Ledger::open(MemStore::new()).unwrap();
    let mut workload = Workload::new(seed);
    for _ in 0..batches {
        let (batch, proposed, _) = workload.next();
        ledger.apply(&[batch], proposed, None).unwrap();
    }
    ledger
}

#[test]
fn sigkill_leaves_a_whole_prefix_of_batches() {
    let seed = seed(0x7a11_c4a5);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut printed_max = 0u64;
    for kill in 0..KILLS {
        // Kill soon after start now and then, to hit recovery of a barely-written store.
        let wait_for =
            if rng.random_ratio(1, 4) { rng.random_range(0..3) } else { rng.random_range(20..300) };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_SEED_ENV, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        for line in stdout.by_ref() {
            if let Some(count) = line.unwrap().strip_prefix("applied ") {
                printed_max = printed_max.max(count.parse().unwrap());
                seen += 1;
                if seen >= wait_for {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The child went on applying until the signal landed: read what it printed meanwhile.
        for line in stdout {
            if let Some(count) = line.unwrap().strip_prefix("applied ") {
                printed_max = printed_max.max(count.parse().unwrap());
            }
        }

        let reopened = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
        let batches = reopened.meta().batches_applied;
        // At most one batch applied but not yet printed when the signal landed.
        assert!(batches <= printed_max + 1, "seed {seed}: kill {kill}: more batches than were applied");
        let expected = replay(seed, batches);
        assert_eq!(
            reopened.meta(),
            expected.meta(),
            "seed {seed}: kill {kill}: meta after {batches} batches"
        );
        assert_eq!(
            ledger::snapshot::state_digest(reopened.store()).unwrap(),
            ledger::snapshot::state_digest(expected.store()).unwrap(),
            "seed {seed}: kill {kill}: state is not the state after {batches} whole batches"
        );
    }
    assert!(printed_max > 100, "the child made too little progress to test anything");
}

/// Damage at rest in a page that only a merge reads: the merge thread finds it (each value's
/// checksum), stops merging, and the next commit fails as damage, which stops a node for a
/// rebuild, instead of the store going on with merges that fail forever.
#[test]
fn damage_a_merge_finds_fails_the_next_commit() {
    use tally_store::pages::Pages;
    let dir = tempfile::tempdir().unwrap();
    let accounts: Vec<Account> =
        (1..=10).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    let mut next_id = 1_000u128;
    let mut transfers = || {
        let batch: Vec<Transfer> = (0..10)
            .map(|n| {
                next_id += 1;
                Transfer {
                    id: next_id,
                    debit_account_id: 1 + n % 10,
                    credit_account_id: 1 + (n + 1) % 10,
                    amount: 1,
                    ledger: 1,
                    code: 1,
                    ..Transfer::default()
                }
            })
            .collect();
        [Batch::CreateTransfers(batch)]
    };
    let mut clock = 1_000_000u64;
    {
        let mut ledger = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
        ledger.apply(&[Batch::CreateAccounts(accounts)], clock, None).unwrap();
        for _ in 0..3 {
            clock += 1_000;
            ledger.apply(&transfers(), clock, None).unwrap();
        }
    }
    // One byte flipped in the newest ids run's first page, in the file, as a disk can.
    let page = {
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        pages.scan_prefix(&[b'R', 1]).next_back().expect("an ids run").unwrap().1.to_vec()
    };
    let path = dir.path().join(tally_store::pages::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(page.len()).position(|window| window == page).expect("the page in the file");
    bytes[at + page.len() / 2] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    // Runs pile up until a merge reads the damaged page.
    let mut ledger = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let error = loop {
        clock += 1_000;
        match ledger.apply(&transfers(), clock, None) {
            Ok(_) => {}
            Err(error) => break error,
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "no commit failed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(error.is_damage(), "{error}");
    assert!(error.to_string().contains("merge"), "{error}");
}
