//! Fuzz targets for what the engine decodes off the disk (bolero): run pages, run descriptions,
//! the layout and the page store's checksummed values; and for a merge, whose output must be the
//! sorted union of its inputs with the newest value of each key. Under `cargo test` each runs `ITERATIONS`
//! random inputs; a long run sets `BOLERO_RANDOM_ITERATIONS` (docs/testing.md, "Fuzzing"). Damaged bytes
//! are refused, never a panic, and where it can a target asserts more: what a decoder accepts
//! encodes back to the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use bolero::check;

use super::filter::KeyHash;
use super::layout::Layout;
use super::pages::{Batch, MemoryDisk, Pages, Value, checked, sealed};
use super::runs::{self, Descriptions, Kind, Page, Run, RunBuilder, Writes, scan_all};

const ITERATIONS: usize = 2_000;

/// A page of any bytes: refused, or every entry readable and a search in it bounded.
#[test]
fn run_pages() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        for key_bytes in [16, 24] {
            if let Ok(page) = Page::new(Value::from(bytes), key_bytes) {
                for position in 0..page.count() {
                    let _ = (page.key(position), page.value(position));
                }
                let probe = bytes.get(..key_bytes).map_or_else(|| vec![0x80; key_bytes], <[u8]>::to_vec);
                assert!(page.lower_bound(&probe) <= page.count());
            }
        }
    });
}

/// A run description of any bytes: refused, or it encodes back to the same bytes and answers a
/// filter test and a page search without a panic; and the same bytes stored as a run's
/// description chunks, loaded without a budget to hold it (read a group at a time): refused, or
/// answering without a panic.
#[test]
fn run_descriptions() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        let pages = Pages::on(MemoryDisk::default().pages());
        for kind in [Kind::Ids, Kind::Index] {
            if let Ok(run) = Run::decode(kind, 1, bytes) {
                assert_eq!(run.encode_again(), bytes, "accepted a description it does not encode to");
                let _ = run.may_contain(&pages, KeyHash::of(&[7; 16]));
                let _ = run.page_for(&pages, &vec![0x42; kind.key_bytes()]);
            }
        }
        let mut batch = Batch::default();
        for (number, chunk) in bytes.chunks(runs::PAGE_BYTES).enumerate() {
            batch.insert(runs::description_chunk_key(Kind::Ids, 1, number as u32), chunk.to_vec());
        }
        pages.apply(batch).unwrap();
        if let Ok(run) = Run::load(&pages, Kind::Ids, 1, &Descriptions::new(0)) {
            let _ = run.may_contain(&pages, KeyHash::of(&[7; 16]));
            let _ = run.get(&pages, &[0x42; 16], |_| ());
        }
    });
}

/// A layout record of any bytes: refused or read, never a panic.
#[test]
fn layouts() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        let _ = Layout::decode(bytes);
    });
}

/// A stored value of any bytes: its checksum holds or it is refused as damage; what is sealed
/// reads back as itself.
#[test]
fn page_store_values() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        let (key, value) = bytes.split_at(bytes.len().min(9));
        match checked(key, value) {
            Ok(read) => assert_eq!(sealed(key, &read), value),
            Err(error) => assert!(error.is_damage(), "{error}"),
        }
        assert_eq!(&*checked(key, &sealed(key, value)).unwrap(), value);
    });
}

/// Runs of any keys and values (each run's keys sorted, as a builder takes them), merged as the
/// store merges them: the merged run holds the union of the keys, each with the value of the
/// newest run that has it, in order, and reads back the same from the page store.
#[test]
fn merges() {
    check!().with_iterations(ITERATIONS / 4).with_type::<Vec<Vec<(u16, Vec<u8>)>>>().for_each(|inputs| {
        let pages = Pages::on(MemoryDisk::default().pages());
        // Descriptions held whole, or (an odd number of runs) read through the cache.
        let descriptions = Descriptions::new(if inputs.len() % 2 == 0 { u64::MAX } else { 0 });
        let mut expected = BTreeMap::new();
        let mut runs = Vec::new();
        for (id, input) in inputs.iter().take(12).enumerate() {
            // Keys spread over the key space, values of up to 40 bytes: runs of several pages.
            let entries: BTreeMap<u128, &[u8]> = input
                .iter()
                .map(|(key, value)| ((*key as u128) << 100 | *key as u128, &value[..value.len().min(40)]))
                .collect();
            if let Some(run) = build(&pages, id as u64 + 1, &entries, &descriptions) {
                runs.push(Arc::new(run));
                expected.extend(entries.iter().map(|(key, value)| (*key, value.to_vec())));
            }
        }
        let mut scanned = BTreeMap::new();
        let mut merged_writes = Writes::new();
        let distinct = runs.iter().map(|run| run.distinct).sum();
        let mut merged = RunBuilder::new(Kind::Ids, 100, distinct);
        let mut previous: Option<Vec<u8>> = None;
        scan_all(&runs, &pages, &mut |key, value| {
            assert!(previous.as_deref().is_none_or(|previous| previous < key), "a merge scan out of order");
            previous = Some(key.to_vec());
            scanned.insert(u128::from_be_bytes(key.try_into().unwrap()), value.to_vec());
            merged.push(key, value, &mut merged_writes);
            Ok(true)
        })
        .unwrap();
        assert_eq!(scanned, expected, "the merge is not the union with the newest values");
        let Some(merged) = merged.finish(&mut merged_writes, &descriptions) else {
            assert!(expected.is_empty());
            return;
        };
        write(&pages, merged_writes);
        assert_eq!(merged.entries, expected.len() as u64);
        let mut reread = BTreeMap::new();
        scan_all(&[Arc::new(merged)], &pages, &mut |key, value| {
            reread.insert(u128::from_be_bytes(key.try_into().unwrap()), value.to_vec());
            Ok(true)
        })
        .unwrap();
        assert_eq!(reread, expected, "the merged run does not read back as written");
    });
}

fn build(
    pages: &Pages,
    id: u64,
    entries: &BTreeMap<u128, &[u8]>,
    descriptions: &Arc<Descriptions>,
) -> Option<Run> {
    let mut writes = Writes::new();
    let mut builder = RunBuilder::new(Kind::Ids, id, entries.len() as u64);
    for (key, value) in entries {
        builder.push(&key.to_be_bytes(), value, &mut writes);
    }
    let run = builder.finish(&mut writes, descriptions);
    write(pages, writes);
    run
}

fn write(pages: &Pages, writes: Writes) {
    let mut batch = Batch::default();
    for (key, value) in writes {
        batch.insert(key, value);
    }
    pages.apply(batch).unwrap();
}

/// Found by reading, kept as regressions: a page count whose fences' end overflows, and a filter
/// of no blocks (a lookup indexes its first block), are refused as damage.
#[test]
fn a_description_with_an_overflowing_page_count_or_an_empty_filter_is_refused() {
    let mut overflowing = vec![0u8; 24];
    overflowing[16..24].copy_from_slice(&(u64::MAX / 16).to_le_bytes());
    overflowing.extend_from_slice(&[0; 64]);
    assert!(Run::decode(Kind::Ids, 1, &overflowing).is_err_and(|error| error.is_damage()));

    let mut empty_filter = Vec::new();
    empty_filter.extend_from_slice(&1u64.to_le_bytes()); // entries
    empty_filter.extend_from_slice(&1u64.to_le_bytes()); // distinct
    empty_filter.extend_from_slice(&1u64.to_le_bytes()); // pages
    empty_filter.extend_from_slice(&[1; 16]); // the fence
    empty_filter.extend_from_slice(&[1; 16]); // the last key
    empty_filter.extend_from_slice(&0u64.to_le_bytes()); // a filter of no blocks
    assert!(Run::decode(Kind::Ids, 1, &empty_filter).is_err_and(|error| error.is_damage()));
}
