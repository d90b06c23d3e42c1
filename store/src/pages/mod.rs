//! The page store under the engine: ordered byte keys to byte values, written in atomic batches,
//! made durable by `sync`. Everything the engine keeps (run pages and descriptions, transfer and
//! change chunks, zone maps, the layout and the plain keys) is a value here.
//!
//! `Pages` is what the engine calls; under it, a `PageStore` holds the bytes. It needs few
//! methods: an atomic batch of puts and deletes (durable or not), a get, an ordered range in both
//! directions, clear and is-empty; `sync` is a durable empty batch. Two implement it:
//!
//! - `on_redb::Redb`, the product: one redb file, `state.redb`, in the store's directory; a
//!   copy-on-write B-tree whose commit is atomic. A batch commits without an fsync
//!   (`Durability::None`); a durable one commits with one, which makes every batch before it
//!   durable too, and records redb's allocator state ("quick repair"), so that reopening after a
//!   crash reads the last durable commit instead of walking the whole file. A crash loses the
//!   batches since the last durable commit, never part of one. (Pages freed by a commit are
//!   reused only after a durable one.)
//! - `in_memory::MemoryDisk`, for tests and fuzzing: the same contract in memory, and the faults
//!   a disk and a crash bring, on demand: the batches since the last durable one lost (all, or
//!   the first few kept), a batch torn (a page store that broke its contract), a value damaged.
//!
//! Each value is stored with a CRC32C of its key and bytes, which `Pages` adds on the way in and
//! checks at every read, whatever the page store: redb checks its own checksums only when it
//! repairs, and damage at rest to a value would otherwise be served as ledger state. A value
//! that fails is `StoreError::Corrupt` (damage, which a node rebuilds).
//!
//! A value read here is a copy: redb hands out pages of its read transactions, and a value kept
//! by a caller would keep its transaction, and every page it saw, from being reused.

mod in_memory;
mod on_redb;

use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

pub use self::in_memory::{MemoryDisk, MemoryPages};
pub use self::on_redb::FILE_NAME;
use ledger::store::{StoreError, StoreResult};

/// A value (or key) as read from the page store: shared, immutable bytes.
pub type Value = Arc<[u8]>;

/// Puts and deletes applied together by `Pages::apply`, in order.
#[derive(Default)]
pub struct Batch {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.writes.push((key.into(), None));
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes, in order: what a page store applies.
    pub fn writes(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.writes
    }
}

/// Reads a value as stored (`stored`, under `key`) into what the engine sees: `Pages` passes its
/// checksum test, and a page store returns what it gives.
pub type Open = fn(key: &[u8], stored: &[u8]) -> StoreResult<Value>;

/// Entries of a range, each through `Open`, in key order from the front and in reverse from the
/// back. Errors come as items.
pub type Entries = Box<dyn DoubleEndedIterator<Item = StoreResult<(Value, Value)>> + Send>;

/// What holds the engine's bytes (see the module's documentation for the contract).
pub trait PageStore: Send + Sync {
    /// The value stored under `key`, through `open`.
    fn get(&self, key: &[u8], open: Open) -> StoreResult<Option<Value>>;

    /// The entries whose keys are within `lower` and `upper`, as of now (later batches do not
    /// show), values through `open`.
    fn range(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>, open: Open) -> Entries;

    /// Applies `batch` atomically: after a crash, all of it or none. With `durably`, it is
    /// durable when this returns, with every batch before it; without, a crash may take it back
    /// (and every batch after it) until a durable batch follows.
    fn commit(&self, batch: Batch, durably: bool) -> StoreResult<()>;

    /// Deletes every entry (not durably until a durable commit).
    fn clear(&self) -> StoreResult<()>;

    fn is_empty(&self) -> StoreResult<bool>;
}

/// The engine's view of its page store: checksummed values, prefix scans, durable batches.
pub struct Pages {
    store: Box<dyn PageStore>,
}

impl Pages {
    /// Opens the product's page store (redb) in directory `dir`, creating the directory and the
    /// store if there are none. `cache_bytes` bounds redb's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<Pages> {
        Ok(Pages::on(on_redb::Redb::open(dir, cache_bytes)?))
    }

    /// The engine's pages on `store`.
    pub fn on(store: impl PageStore + 'static) -> Pages {
        Pages { store: Box::new(store) }
    }

    pub fn get(&self, key: &[u8]) -> StoreResult<Option<Value>> {
        self.store.get(key, checked)
    }

    /// The entries whose keys are within `bounds`, in key order; `.rev()` for the reverse.
    pub fn range<K: AsRef<[u8]> + ?Sized>(&self, bounds: impl RangeBounds<K>) -> Iter {
        Iter(self.store.range(as_bytes(bounds.start_bound()), as_bytes(bounds.end_bound()), checked))
    }

    /// The entries whose keys begin with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Iter {
        let end = prefix_end(prefix);
        let upper = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        Iter(self.store.range(Bound::Included(prefix), upper, checked))
    }

    /// The last entry whose key is at most `key`.
    pub fn last_at_or_before(&self, key: &[u8]) -> StoreResult<Option<(Value, Value)>> {
        self.range(..=key).next_back().transpose()
    }

    /// Applies `batch` atomically: after a crash, all of it or none (none if no `sync` followed).
    pub fn apply(&self, batch: Batch) -> StoreResult<()> {
        self.store.commit(seal(batch), false)
    }

    /// Applies `batch` atomically and durably, with every batch before it.
    pub fn apply_durably(&self, batch: Batch) -> StoreResult<()> {
        self.store.commit(seal(batch), true)
    }

    /// Makes every batch applied so far durable (fsync).
    pub fn sync(&self) -> StoreResult<()> {
        self.store.commit(Batch::default(), true)
    }

    /// Deletes every entry (not durably until `sync`).
    pub fn clear(&self) -> StoreResult<()> {
        self.store.clear()
    }

    pub fn is_empty(&self) -> StoreResult<bool> {
        self.store.is_empty()
    }
}

/// An ordered scan of the page store, as of when it began (later batches do not show). Errors
/// come as items.
pub struct Iter(Entries);

impl Iter {
    /// The keys only.
    pub fn keys(self) -> impl DoubleEndedIterator<Item = StoreResult<Value>> {
        self.map(|entry| entry.map(|(key, _)| key))
    }
}

impl Iterator for Iter {
    type Item = StoreResult<(Value, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

/// `batch` with each value followed by its checksum (as `sealed`), in place.
fn seal(mut batch: Batch) -> Batch {
    for (key, value) in &mut batch.writes {
        if let Some(value) = value {
            value.extend_from_slice(&checksum(key, value));
        }
    }
    batch
}

fn checksum(key: &[u8], value: &[u8]) -> [u8; 4] {
    crc32c::crc32c_append(crc32c::crc32c(key), value).to_le_bytes()
}

/// `value` as stored: followed by the CRC32C of the key and the value.
#[cfg(test)]
pub(super) fn sealed(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(value.len() + 4);
    stored.extend_from_slice(value);
    stored.extend_from_slice(&checksum(key, value));
    stored
}

/// The value stored under `key`, if its checksum holds.
pub(super) fn checked(key: &[u8], stored: &[u8]) -> StoreResult<Value> {
    let damaged =
        || StoreError::Corrupt(format!("the page store's value under {key:02x?} fails its checksum"));
    let split = stored.len().checked_sub(4).ok_or_else(damaged)?;
    let (value, sum) = stored.split_at(split);
    if checksum(key, value) != sum {
        return Err(damaged());
    }
    Ok(Value::from(value))
}

fn as_bytes<K: AsRef<[u8]> + ?Sized>(bound: Bound<&K>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key.as_ref()),
        Bound::Excluded(key) => Bound::Excluded(key.as_ref()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The first key after every key that begins with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(iter: impl Iterator<Item = StoreResult<(Value, Value)>>) -> Vec<Vec<u8>> {
        iter.map(|entry| entry.unwrap().0.to_vec()).collect()
    }

    #[test]
    fn a_prefix_scan_stops_at_the_prefix_end_and_runs_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        let mut batch = Batch::default();
        for key in [&b"a\xff"[..], b"b", b"b\x00", b"b\xff\xff", b"c"] {
            batch.insert(key, key);
        }
        pages.apply(batch).unwrap();
        let inside = vec![b"b".to_vec(), b"b\x00".to_vec(), b"b\xff\xff".to_vec()];
        assert_eq!(keys(pages.scan_prefix(b"b")), inside);
        assert_eq!(keys(pages.scan_prefix(b"b").rev()), inside.into_iter().rev().collect::<Vec<_>>());
        assert_eq!(pages.last_at_or_before(b"b\x01").unwrap().unwrap().0.to_vec(), b"b\x00");
        assert_eq!(keys(pages.scan_prefix(b"\xff")), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_batch_is_kept_whole_through_a_reopen_once_synced_and_a_clear_empties() {
        let dir = tempfile::tempdir().unwrap();
        {
            let pages = Pages::open(dir.path(), 1 << 20).unwrap();
            let mut batch = Batch::default();
            batch.insert(b"k1".to_vec(), vec![1u8; 9000]);
            batch.insert(b"k2".to_vec(), vec![2u8; 10]);
            batch.remove(b"k2".to_vec());
            pages.apply(batch).unwrap();
            pages.sync().unwrap();
        }
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(pages.get(b"k1").unwrap().unwrap().len(), 9000);
        assert!(pages.get(b"k2").unwrap().is_none());
        assert!(!pages.is_empty().unwrap());
        pages.clear().unwrap();
        assert!(pages.is_empty().unwrap());
    }

    #[test]
    fn a_store_whose_table_was_never_committed_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash right after redb created the file leaves: a database without our table.
        drop(redb::Database::create(dir.path().join(FILE_NAME)).unwrap());
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        assert!(pages.is_empty().unwrap());
        assert!(pages.get(b"k").unwrap().is_none());
    }

    #[test]
    fn a_value_damaged_at_rest_is_refused_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let value: Vec<u8> = (0..3000u32).map(|n| (n * 7 + 3) as u8).collect();
        {
            let pages = Pages::open(dir.path(), 1 << 20).unwrap();
            let mut batch = Batch::default();
            batch.insert(b"key".to_vec(), value.clone());
            pages.apply_durably(batch).unwrap();
        }
        // One byte of the value flipped in the file, as a disk can.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let at =
            bytes.windows(value.len()).position(|window| window == value).expect("the value in the file");
        bytes[at + 1500] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        let error = pages.get(b"key").expect_err("the damage is found");
        assert!(error.is_damage(), "{error}");
        let error = pages.scan_prefix(b"k").next().unwrap().expect_err("the damage is found");
        assert!(error.is_damage(), "{error}");
    }
}
