//! Fuzz targets for what the engine decodes off the disk (bolero): run pages, run descriptions,
//! the layout and the page store's checksummed values. Under `cargo test` each runs `ITERATIONS`
//! random inputs; a long run sets `BOLERO_RANDOM_ITERATIONS` (README, "Fuzzing"). Damaged bytes
//! are refused, never a panic, and where it can a target asserts more: what a decoder accepts
//! encodes back to the same bytes.

use bolero::check;

use super::filter::KeyHash;
use super::layout::Layout;
use super::pages::{Value, checked, sealed};
use super::runs::{Kind, Page, Run};

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
/// filter test and a page search without a panic.
#[test]
fn run_descriptions() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        for kind in [Kind::Ids, Kind::Index] {
            if let Ok(run) = Run::decode(kind, 1, bytes) {
                assert_eq!(run.encode(), bytes, "accepted a description it does not encode to");
                let _ = run.may_contain(KeyHash::of(&[7; 16]));
                let _ = run.page_for(&vec![0x42; kind.key_bytes()]);
            }
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
