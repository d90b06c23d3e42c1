//! The seeded random workload against the auditor (a simple model that predicts every reply and
//! every balance), determinism across stores, and snapshot round trips.
//!
//! A failure prints its seed; `TALLY_SEED=<seed> cargo test -p ledger --test auditor` replays it.

mod common;

use common::*;
use ledger::*;
use tally_store::RunStore;

/// Batches the auditor checks in CI: `AUDIT_SEEDS` seeds of `AUDIT_BATCHES_PER_SEED` batches.
const AUDIT_SEEDS: u64 = 4;
const AUDIT_BATCHES_PER_SEED: usize = 1500;

#[test]
fn auditor_predicts_every_reply_and_balance() {
    let base = seed(0x7a11_0001);
    for offset in 0..AUDIT_SEEDS {
        let seed = base + offset;
        let mut ledger = Ledger::open(MemStore::new()).unwrap();
        let mut workload = Workload::new(seed);
        run_audited(&mut ledger, &mut workload, AUDIT_BATCHES_PER_SEED, seed);
        check_whole_change_stream(&ledger, &workload.model, seed);
        assert!(workload.model.transfers.len() > AUDIT_BATCHES_PER_SEED, "seed {seed}: workload too idle");
        assert!(workload.model.refused_again > 10, "seed {seed}: too few retries of failed ids");
        assert!(workload.model.expired_by_ticks > 10, "seed {seed}: too few expiries without a write");
        assert!(workload.model.imported > 50, "seed {seed}: too few imported events");
        assert!(workload.model.query_results > 1000, "seed {seed}: queries selected too little");
    }
}

#[test]
fn auditor_on_the_state_store() {
    let seed = seed(0x7a11_0002);
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
    let mut workload = Workload::new(seed);
    run_audited(&mut ledger, &mut workload, 400, seed);
    check_whole_change_stream(&ledger, &workload.model, seed);
}

fn export_bytes(store: &impl Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    ledger::snapshot::export(store, &mut bytes).unwrap();
    bytes
}

#[test]
fn same_workload_same_bytes_in_memory_and_in_the_state_store() {
    let seed = seed(0x7a11_0003);
    let dir = tempfile::tempdir().unwrap();
    let mut memory = Ledger::open(MemStore::new()).unwrap();
    // Merges inside `commit`, so that which runs exist is the same on every run of the test.
    let inline = tally_store::Options { background_merges: false, ..Default::default() };
    let mut stored = Ledger::open(RunStore::open_with(dir.path(), inline).unwrap()).unwrap();
    let mut workload = Workload::new(seed);
    for _ in 0..600 {
        let (batch, proposed, _) = workload.next();
        let batches = std::slice::from_ref(&batch);
        let from_memory = memory.apply(batches, proposed, Some(b"app")).unwrap();
        let from_store = stored.apply(batches, proposed, Some(b"app")).unwrap();
        assert_eq!(from_memory, from_store, "seed {seed}");
        assert_eq!(memory.meta(), stored.meta(), "seed {seed}: running digests diverged");
    }
    let digest = ledger::snapshot::state_digest(memory.store()).unwrap();
    assert_eq!(digest, ledger::snapshot::state_digest(stored.store()).unwrap(), "seed {seed}");
    assert_eq!(export_bytes(memory.store()), export_bytes(stored.store()), "seed {seed}");
    // 600 entries made hundreds of runs of each kind; merges keep a few dozen.
    let (runs, _) = stored.store().run_counts();
    assert!(runs.iter().all(|count| (1..=40).contains(count)), "seed {seed}: runs {runs:?}");

    // And the state survives closing and reopening the store.
    let meta = stored.meta();
    drop(stored);
    let reopened = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
    assert_eq!(reopened.meta(), meta);
    assert_eq!(ledger::snapshot::state_digest(reopened.store()).unwrap(), digest);

    // A different seed gives a different digest: the digest is not a constant.
    let mut other = Ledger::open(MemStore::new()).unwrap();
    let mut workload = Workload::new(seed + 1);
    for _ in 0..600 {
        let (batch, proposed, _) = workload.next();
        other.apply(&[batch], proposed, None).unwrap();
    }
    assert_ne!(other.meta().digest, memory.meta().digest);
}

/// A frozen view exports the state as it was when frozen, byte for byte, while later batches
/// (new transfers, posts and voids that delete pending and expiry keys) are applied, first
/// between the freeze and the export, then during it from another thread.
#[test]
fn a_frozen_view_of_the_state_store_exports_the_frozen_state_while_applying_goes_on() {
    let seed = seed(0x7a11_0006);
    let dir = tempfile::tempdir().unwrap();
    let mut stored = Ledger::open(RunStore::open(dir.path()).unwrap()).unwrap();
    let mut memory = Ledger::open(MemStore::new()).unwrap();
    let mut workload = Workload::new(seed);
    let mut apply = |count: usize, stored: &mut Ledger<RunStore>| {
        for _ in 0..count {
            let (batch, proposed, _) = workload.next();
            let batches = std::slice::from_ref(&batch);
            assert_eq!(
                stored.apply(batches, proposed, None).unwrap(),
                memory.apply(batches, proposed, None).unwrap()
            );
        }
    };
    apply(300, &mut stored);
    let frozen_bytes = export_bytes(stored.store());
    let view = stored.store().freeze();
    apply(300, &mut stored);
    let mut from_view = Vec::new();
    ledger::snapshot::export(&view, &mut from_view).unwrap();
    assert_eq!(from_view, frozen_bytes, "seed {seed}: the view moved with the store");
    drop(view);

    let frozen_bytes = export_bytes(stored.store());
    let view = stored.store().freeze();
    let exporter = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        ledger::snapshot::export(&view, &mut bytes).unwrap();
        bytes
    });
    apply(300, &mut stored);
    assert_eq!(exporter.join().unwrap(), frozen_bytes, "seed {seed}: a concurrent export moved");
    // Once the view is gone the store is itself again, and a new view can be taken.
    drop(stored.store().freeze());
    assert_eq!(export_bytes(stored.store()), export_bytes(memory.store()), "seed {seed}");
}

#[test]
fn snapshot_round_trip_under_the_workload() {
    let seed = seed(0x7a11_0004);
    let mut workload = Workload::new(seed);
    let mut original = Ledger::open(MemStore::new()).unwrap();
    run_audited(&mut original, &mut workload, 300, seed);

    let bytes = export_bytes(original.store());
    let mut memory = MemStore::new();
    ledger::snapshot::import(&mut memory, &bytes[..]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut stored = RunStore::open(dir.path()).unwrap();
    ledger::snapshot::import(&mut stored, &bytes[..]).unwrap();
    assert_eq!(export_bytes(&memory), bytes);
    assert_eq!(export_bytes(&stored), bytes);

    // The imported ledgers carry on exactly like the original.
    let mut memory = Ledger::open(memory).unwrap();
    let mut stored = Ledger::open(stored).unwrap();
    assert_eq!(memory.meta(), original.meta());
    for _ in 0..300 {
        let (batch, proposed, expected) = workload.next();
        let batches = std::slice::from_ref(&batch);
        assert_eq!(original.apply(batches, proposed, None).unwrap()[0], expected, "seed {seed}");
        assert_eq!(memory.apply(batches, proposed, None).unwrap()[0], expected, "seed {seed}");
        assert_eq!(stored.apply(batches, proposed, None).unwrap()[0], expected, "seed {seed}");
    }
    let digest = ledger::snapshot::state_digest(original.store()).unwrap();
    assert_eq!(ledger::snapshot::state_digest(memory.store()).unwrap(), digest);
    assert_eq!(ledger::snapshot::state_digest(stored.store()).unwrap(), digest);
    assert_eq!(memory.meta().digest, original.meta().digest);
}

#[test]
fn a_damaged_snapshot_is_refused_and_leaves_nothing_behind() {
    let seed = seed(0x7a11_0005);
    let mut workload = Workload::new(seed);
    let mut original = Ledger::open(MemStore::new()).unwrap();
    for _ in 0..50 {
        let (batch, proposed, _) = workload.next();
        original.apply(&[batch], proposed, None).unwrap();
    }
    let bytes = export_bytes(original.store());
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("a flipped bit", {
            let mut b = bytes.clone();
            let at = b.len() / 2;
            b[at] ^= 1;
            b
        }),
        ("a truncated stream", bytes[..bytes.len() - 40].to_vec()),
        ("a missing trailer", bytes[..bytes.len() - 41].to_vec()),
        ("a wrong magic", {
            let mut b = bytes.clone();
            b[0] = b'X';
            b
        }),
        ("a future format", {
            let mut b = bytes.clone();
            b[8] = 9;
            b
        }),
        ("nothing at all", Vec::new()),
        ("bytes after the trailer", {
            let mut b = bytes.clone();
            b.push(0);
            b
        }),
    ];
    let imported = ledger::snapshot::import(&mut MemStore::new(), &bytes[..]).unwrap();
    assert_eq!(
        ledger::snapshot::verify(&bytes[..]).unwrap().records,
        imported,
        "verify counts what import writes"
    );
    for (what, bytes) in damaged {
        assert!(ledger::snapshot::verify(&bytes[..]).is_err(), "{what} was verified");
        let mut rewritten = Vec::new();
        assert!(
            ledger::snapshot::rewrite_app_meta(&bytes[..], &mut rewritten, b"app").is_err(),
            "{what} was rewritten"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut stored = RunStore::open(dir.path()).unwrap();
        let error = ledger::snapshot::import(&mut stored, &bytes[..]);
        assert!(error.is_err(), "{what} was accepted");
        assert!(stored.is_empty().unwrap(), "{what} left records behind");
        let mut memory = MemStore::new();
        assert!(ledger::snapshot::import(&mut memory, &bytes[..]).is_err(), "{what} was accepted");
        assert!(memory.is_empty().unwrap(), "{what} left records behind");
    }
    // Importing over existing state is refused.
    let mut store = original.into_store();
    assert!(matches!(ledger::snapshot::import(&mut store, &bytes[..]), Err(StoreError::NotEmpty)));
}

/// A backup seeds a new cluster with the same state under the new cluster's applied log id: the
/// copy changes the application's meta and nothing else, whether the state had one or not.
#[test]
fn a_rewritten_snapshot_differs_only_in_the_application_meta() {
    let mut workload = Workload::new(seed(0x7a11_0006));
    for app_before in [None, Some(&b"old applied id"[..])] {
        let mut original = Ledger::open(MemStore::new()).unwrap();
        for _ in 0..30 {
            let (batch, proposed, _) = workload.next();
            original.apply(&[batch], proposed, app_before).unwrap();
        }
        let bytes = export_bytes(original.store());
        let before = ledger::snapshot::verify(&bytes[..]).unwrap();
        assert_eq!(before.app.as_deref(), app_before);
        let mut rewritten = Vec::new();
        let read = ledger::snapshot::rewrite_app_meta(&bytes[..], &mut rewritten, b"new applied id").unwrap();
        assert_eq!(read, before, "it reports what it read");
        let after = ledger::snapshot::verify(&rewritten[..]).unwrap();
        assert_eq!(after.app.as_deref(), Some(&b"new applied id"[..]));
        assert_eq!(after.ledger, before.ledger);
        assert_eq!(after.records, before.records + u64::from(app_before.is_none()));
        let mut copy = MemStore::new();
        ledger::snapshot::import(&mut copy, &rewritten[..]).unwrap();
        assert_eq!(
            ledger::snapshot::state_digest(&copy).unwrap(),
            ledger::snapshot::state_digest(original.store()).unwrap(),
            "the state is the same but for the application meta"
        );
    }
}

/// A data directory written on sled (tally before redb held the state) is refused as superseded,
/// which the node rebuilds from its snapshot and log, and is left as it was for that.
#[test]
fn a_state_written_on_sled_is_refused_as_superseded_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("conf"), b"segment_size: 8388608").unwrap();
    std::fs::write(dir.path().join("db"), [7u8; 512]).unwrap();
    let error = RunStore::open(dir.path()).err().expect("a sled state is refused");
    assert!(matches!(error, ledger::StoreError::Superseded(_)), "{error}");
    assert!(error.to_string().contains("sled"), "{error}");
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["conf", "db"]);
    assert_eq!(std::fs::read(dir.path().join("db")).unwrap(), [7u8; 512]);
}

/// A state of schema 2 (before failed ids) or 3 (before change records) is read, and written as
/// the current schema from its next entry; a schema this build does not know is refused.
#[test]
fn a_schema_2_state_is_read_and_upgraded() {
    let mut workload = Workload::new(seed(0x7a11_0007));
    let mut original = Ledger::open(MemStore::new()).unwrap();
    for _ in 0..20 {
        let (batch, proposed, _) = workload.next();
        original.apply(&[batch], proposed, None).unwrap();
    }
    // Schemas 2 to 4 lay the meta out without a semantics version (which is 1 for them).
    let with_version = |version: u32| {
        let mut store = original.store().clone();
        let mut meta = codec::encode_ledger_meta_v4(&original.meta()).to_vec();
        meta[..4].copy_from_slice(&version.to_le_bytes());
        store.put_records(&[(codec::META_LEDGER_KEY.to_vec(), meta)]).unwrap();
        store
    };
    assert!(Ledger::open(with_version(3)).is_ok(), "a schema 3 state opens");
    assert_eq!(
        Ledger::open(with_version(4)).unwrap().meta(),
        original.meta(),
        "a schema 4 state, at semantics 1"
    );
    let mut upgraded = Ledger::open(with_version(2)).expect("a schema 2 state opens");
    assert_eq!(upgraded.meta(), original.meta());
    let (batch, proposed, _) = workload.next();
    upgraded.apply(&[batch], proposed, None).unwrap();
    let stored = upgraded.store().meta_raw(codec::META_LEDGER_KEY).unwrap().unwrap();
    assert_eq!(stored[..4], codec::SCHEMA_VERSION.to_le_bytes(), "written as the current schema");
    // A newer schema is a newer build's (a rollback), not damage: refused as such, so that the
    // node leaves it alone instead of rebuilding it (it was reported as corrupt).
    match Ledger::open(with_version(9)) {
        Err(StoreError::OtherVersion(message)) => assert!(message.contains("newer tally"), "{message}"),
        other => panic!("a newer schema: {:?}", other.map(|_| ())),
    }
}

/// A store dropped and opened again at once opens (a closed store's file lock may still be held
/// for a moment: `open_with` waits for it), as a snapshot install does when it swaps the
/// imported state in: here a state imported from a snapshot, as there.
#[test]
fn a_store_reopens_at_once_after_it_is_dropped() {
    let mut workload = Workload::new(seed(0x7a11_0008));
    let mut source = Ledger::open(MemStore::new()).unwrap();
    for _ in 0..300 {
        let (batch, proposed, _) = workload.next();
        source.apply(&[batch], proposed, None).unwrap();
    }
    let bytes = export_bytes(source.store());
    let dir = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let path = dir.path().join(format!("state-{round}"));
        let mut store = RunStore::open(&path).unwrap();
        ledger::snapshot::import(&mut store, &mut bytes.as_slice()).unwrap();
        store.flush().unwrap();
        drop(store);
        let reopened = Ledger::open(RunStore::open(&path).unwrap()).unwrap();
        assert_eq!(reopened.meta(), source.meta());
    }
}

/// A store that applies in memory and writes checkpoints (what a node runs) answers every reply,
/// balance, query and change record as the model predicts: one checkpoints here and now at
/// random points, the other seals and writes its checkpoints on another thread, read meanwhile.
/// Their exports, at random points, are byte for byte the plain store's; a batch large enough to
/// bypass memory lands after what waited; the store reopened holds the state of the last checkpoint.
#[test]
fn a_checkpointed_store_reads_and_exports_like_a_plain_one() {
    use rand::{Rng, SeedableRng};
    let seed = seed(0x7a11_0004);
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut here = Ledger::open(Checkpointed::new(RunStore::open(dirs.0.path()).unwrap())).unwrap();
    // Merges inside `commit` behind: a background merge's durable write would send the large
    // batch at the end to memory (the store is busy), whenever it happens to run.
    let inline = tally_store::Options { background_merges: false, ..Default::default() };
    let behind = Checkpointed::new(RunStore::open_with(dirs.1.path(), inline).unwrap());
    let mut behind = Ledger::open(behind).unwrap();
    let mut plain = Ledger::open(MemStore::new()).unwrap();
    let mut workloads = (Workload::new(seed), Workload::new(seed), Workload::new(seed));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xc4e);
    let mut job: Option<std::thread::JoinHandle<()>> = None;
    let (mut checkpoints, mut sealed) = (0, 0);
    let mut done = 0;
    while done < 900 {
        let count = rng.random_range(1..=40);
        run_audited(&mut here, &mut workloads.0, count, seed);
        run_audited(&mut behind, &mut workloads.1, count, seed);
        run_audited(&mut plain, &mut workloads.2, count, seed);
        done += count;
        assert_eq!(here.meta(), plain.meta(), "seed {seed}: digests diverged");
        assert_eq!(behind.meta(), plain.meta(), "seed {seed}: digests diverged");
        if rng.random_ratio(1, 3) {
            assert_eq!(export_bytes(here.store()), export_bytes(plain.store()), "seed {seed}");
            assert_eq!(export_bytes(behind.store()), export_bytes(plain.store()), "seed {seed}");
        }
        if rng.random_ratio(1, 2) {
            assert!(here.store_mut().checkpoint().unwrap() > 0, "seed {seed}");
            assert_eq!(here.store().recent_commits(), 0);
            checkpoints += 1;
        }
        if let Some(sealing) = behind.store_mut().seal().unwrap() {
            job = Some(std::thread::spawn(move || sealing.run().unwrap()));
            sealed += 1;
        }
        if rng.random_ratio(1, 3)
            && let Some(running) = job.take()
        {
            // Written, and not yet seen written (no commit since): the store holds the sealed
            // layer's records too, and reads must not see them twice, nor stop at them.
            running.join().unwrap();
            assert!(behind.store().checkpoint_in_flight(), "seed {seed}");
            check_whole_change_stream(&behind, &workloads.1.model, seed);
            assert_eq!(export_bytes(behind.store()), export_bytes(plain.store()), "seed {seed}");
            let (read, expected) = (all_changes(behind.store()), all_changes(plain.store()));
            let differ = read.iter().zip(&expected).position(|(a, b)| a != b);
            assert!(
                read.len() == expected.len() && differ.is_none(),
                "seed {seed}: one scan read {} change records of {}, the first different at {differ:?}",
                read.len(),
                expected.len()
            );
        }
    }
    assert!(checkpoints > 5 && sealed > 5, "seed {seed}: too few checkpoints");
    check_whole_change_stream(&behind, &workloads.1.model, seed);

    // With no job running, a batch of many new accounts goes to the store directly, after the
    // commits waiting. (While a job runs it waits in memory: the checkpoint module's tests.)
    if let Some(running) = job.take() {
        running.join().unwrap();
    }
    let last = plain.meta().timestamp_last;
    let many: Vec<Account> = (0..1500u128).map(|i| account((1 << 100) + i, 1, 0)).collect();
    for ledger in [&mut here as &mut dyn ApplyBatch, &mut behind, &mut plain] {
        ledger.apply_one(Batch::CreateAccounts(many.clone()), last + 1_000_000);
    }
    assert_eq!(export_bytes(here.store()), export_bytes(plain.store()), "seed {seed}");
    assert_eq!(export_bytes(behind.store()), export_bytes(plain.store()), "seed {seed}");
    assert_eq!(behind.store().recent_commits(), 0, "seed {seed}: a large batch went through memory");

    let meta = behind.meta();
    let stored = behind.into_store().into_base().unwrap();
    assert_eq!(export_bytes(&stored), export_bytes(plain.store()), "seed {seed}");
    drop(stored);
    let reopened = Ledger::open(RunStore::open(dirs.1.path()).unwrap()).unwrap();
    assert_eq!(reopened.meta(), meta, "seed {seed}: the store reopened is not at the last checkpoint");
    assert_eq!(export_bytes(reopened.store()), export_bytes(plain.store()), "seed {seed}");
}

/// Every change record a store holds, in one scan.
fn all_changes(store: &impl Store) -> Vec<ChangeRecord> {
    let mut changes = Vec::new();
    store
        .scan_changes(0, &mut |change| {
            changes.push(*change);
            true
        })
        .unwrap();
    changes
}

/// Applies one batch to ledgers over different stores alike.
trait ApplyBatch {
    fn apply_one(&mut self, batch: Batch, proposed: u64);
}

impl<S: Store> ApplyBatch for Ledger<S> {
    fn apply_one(&mut self, batch: Batch, proposed: u64) {
        let replies = self.apply(&[batch], proposed, None).unwrap();
        let BatchReply::CreateAccounts(results) = &replies[0] else { panic!("accounts were created") };
        assert!(results.iter().all(|event| event.result == CreateAccountResult::Ok), "{results:?}");
    }
}
