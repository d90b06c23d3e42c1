//! Semantics versions (`ledger::semantics`): what an entry does belongs to the ledger's state,
//! not to the build that applies it.

mod common;

use common::*;
use ledger::*;

/// Entries of a seeded workload on `ledger`: batches, and a tick after every fifth, at a time
/// that sometimes finds pending transfers due and sometimes nothing (the batch before expired
/// them).
fn history(ledger: &mut Ledger<MemStore>, workload: &mut Workload, entries: usize) {
    for entry in 0..entries {
        let (batch, proposed, _) = workload.next();
        ledger.apply(&[batch], proposed, None).unwrap();
        if entry % 5 == 4 {
            workload.model.tick(proposed);
            ledger.apply(&[], proposed, None).unwrap();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new ledger starts at semantics 1, which applies entries as every build before semantics
/// versions did: the digest after this history is the one commit 458087f computed (its test,
/// run there, printed it). A build that changed what semantics 1 does fails here.
#[test]
fn semantics_1_applies_entries_as_the_builds_before_versions_did() {
    let mut ledger = Ledger::open(MemStore::new()).unwrap();
    assert_eq!(ledger.meta().semantics, semantics::GENESIS);
    history(&mut ledger, &mut Workload::new(0x5e_0001), 400);
    assert_eq!(hex(&ledger.meta().digest), GOLDEN_SEMANTICS_1);
}

const GOLDEN_SEMANTICS_1: &str = "57318fc27ade8148aae61eb9c45eef5cac278fdf2864b0cfb013d99f0b85305b";

/// A switch is an entry of its own: it moves the digest, and the entries after it are applied
/// with the new rules on every replica that applied it: the same records, and semantics 2's
/// digest, which an entry that wrote nothing leaves as it was. Versions this build does not
/// know, and going back, are refused with nothing written.
#[test]
fn a_switch_changes_the_rules_from_its_entry_on() {
    let mut workload = Workload::new(0x5e_0002);
    let mut before = Ledger::open(MemStore::new()).unwrap();
    history(&mut before, &mut workload, 100);
    let mut switched = Ledger::open(before.store().clone()).unwrap();
    let mut stayed = Ledger::open(before.store().clone()).unwrap();
    switched.switch_semantics(2, Some(b"app")).unwrap();
    assert_eq!(switched.meta().semantics, 2);
    assert_ne!(switched.meta().digest, stayed.meta().digest, "a switch is history");
    assert_eq!(switched.store().meta_raw(codec::META_APP_KEY).unwrap().as_deref(), Some(&b"app"[..]));
    let refused = [(3, "a version this build does not know"), (0, "no version"), (1, "going back")];
    for (version, what) in refused {
        let digest = switched.meta().digest;
        assert!(switched.switch_semantics(version, None).is_err(), "{what}");
        assert_eq!((switched.meta().semantics, switched.meta().digest), (2, digest), "{what}");
    }
    // The same entries after it: the same records, another digest.
    let mut rest = Workload::new(0x5e_0003);
    let entries: Vec<(Batch, u64)> = (0..50).map(|_| rest.next()).map(|(b, p, _)| (b, p)).collect();
    for (batch, proposed) in &entries {
        switched.apply(std::slice::from_ref(batch), *proposed, None).unwrap();
        stayed.apply(std::slice::from_ref(batch), *proposed, None).unwrap();
    }
    assert_eq!(export_bytes_without_meta(switched.store()), export_bytes_without_meta(stayed.store()));
    assert_ne!(switched.meta().digest, stayed.meta().digest);
    // A tick that finds nothing due (one a moment before expired everything): semantics 1
    // moves the digest, 2 does not.
    let later = entries.last().unwrap().1 + 86_400 * 1_000_000_000;
    for ledger in [&mut switched, &mut stayed] {
        ledger.apply(&[], later, None).unwrap();
        assert_eq!(ledger.next_expiry().unwrap(), None, "the first tick expired everything");
    }
    let (switched_digest, stayed_digest) = (switched.meta().digest, stayed.meta().digest);
    for ledger in [&mut switched, &mut stayed] {
        ledger.apply(&[], later, None).unwrap();
    }
    assert_eq!(switched.meta().digest, switched_digest, "semantics 2: a tick that wrote nothing");
    assert_ne!(stayed.meta().digest, stayed_digest, "semantics 1: every tick");
    // The version is kept with the state and comes back with it.
    let reopened = Ledger::open(switched.into_store()).unwrap();
    assert_eq!(reopened.meta().semantics, 2);
}

/// The records of a store as a snapshot carries them, without the ledger meta (whose digest
/// differs by semantics).
fn export_bytes_without_meta(store: &MemStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut records = Vec::new();
    Store::for_each_record(store, &mut |key: &[u8], value: &[u8]| {
        if key != codec::META_LEDGER_KEY && key != codec::META_APP_KEY {
            records.push((key.to_vec(), value.to_vec()));
        }
        Ok(())
    })
    .unwrap();
    records
}
