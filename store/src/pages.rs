//! The page store under the engine: ordered byte keys to byte values, written in atomic batches,
//! made durable by `sync`. Everything the engine keeps (run pages and descriptions, transfer and
//! change chunks, zone maps, the layout and the plain keys) is a value here.
//!
//! The production page store is redb (one file, `state.redb`, in the store's directory): a
//! copy-on-write B-tree whose commit is atomic. `apply` commits without an fsync
//! (`Durability::None`); `apply_durably` and `sync` commit with one, which makes every batch
//! before them durable too, and record redb's allocator state ("quick repair"), so that reopening
//! after a crash reads the last durable commit instead of walking the whole file. A crash loses
//! the batches since the last durable commit, never part of one. (Pages freed by a commit are
//! reused only after a durable one.)
//!
//! Each value is stored with a CRC32C of its key and bytes, checked at every read: redb checks its
//! own checksums only when it repairs, and damage at rest to a value would otherwise be served as
//! ledger state. A value that fails is `StoreError::Corrupt` (damage, which a node rebuilds).
//!
//! A value read here is a copy: redb hands out pages of its read transactions, and a value kept
//! by a caller would keep its transaction, and every page it saw, from being reused.

use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

use ledger::store::{StoreError, StoreResult};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger");
/// The page store's file in the store's directory.
pub const FILE_NAME: &str = "state.redb";

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
}

pub struct Pages {
    db: redb::Database,
}

impl Pages {
    /// Opens the page store in directory `dir`, creating the directory and the store if there
    /// are none. `cache_bytes` bounds redb's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<Pages> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let created = !path.exists();
        let db =
            redb::Builder::new().set_cache_size(cache_bytes as usize).create(&path).map_err(pages_error)?;
        let pages = Pages { db };
        // A durable commit creates the table (every commit opens it): on every open, since a
        // crash can come between creating the file and this commit (readers would find none).
        pages.sync()?;
        if created {
            // The file's name, and the directory's in its parent.
            sync_directory(dir)?;
            if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                sync_directory(parent)?;
            }
        }
        Ok(pages)
    }

    pub fn get(&self, key: &[u8]) -> StoreResult<Option<Value>> {
        let read = self.db.begin_read().map_err(pages_error)?;
        let table = read.open_table(TABLE).map_err(pages_error)?;
        let value = redb::ReadableTable::get(&table, key).map_err(pages_error)?;
        value.map(|value| checked(key, value.value())).transpose()
    }

    /// The entries whose keys are within `bounds`, in key order; `.rev()` for the reverse.
    pub fn range<K: AsRef<[u8]> + ?Sized>(&self, bounds: impl RangeBounds<K>) -> Iter {
        Iter::new(self, (as_bytes(bounds.start_bound()), as_bytes(bounds.end_bound())))
    }

    /// The entries whose keys begin with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Iter {
        let end = prefix_end(prefix);
        let upper = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        Iter::new(self, (Bound::Included(prefix), upper))
    }

    /// The last entry whose key is at most `key`.
    pub fn last_at_or_before(&self, key: &[u8]) -> StoreResult<Option<(Value, Value)>> {
        self.range(..=key).next_back().transpose()
    }

    /// Applies `batch` atomically: after a crash, all of it or none (none if no `sync` followed).
    pub fn apply(&self, batch: Batch) -> StoreResult<()> {
        self.commit(batch, false)
    }

    /// Applies `batch` atomically and durably, with every batch before it.
    pub fn apply_durably(&self, batch: Batch) -> StoreResult<()> {
        self.commit(batch, true)
    }

    fn commit(&self, batch: Batch, durably: bool) -> StoreResult<()> {
        let mut write = self.db.begin_write().map_err(pages_error)?;
        let durability = if durably { redb::Durability::Immediate } else { redb::Durability::None };
        write.set_durability(durability).map_err(pages_error)?;
        write.set_quick_repair(durably);
        {
            let mut table = write.open_table(TABLE).map_err(pages_error)?;
            for (key, value) in &batch.writes {
                match value {
                    Some(value) => table.insert(key.as_slice(), sealed(key, value).as_slice()).map(drop),
                    None => table.remove(key.as_slice()).map(drop),
                }
                .map_err(pages_error)?;
            }
        }
        write.commit().map_err(pages_error)?;
        Ok(())
    }

    /// Makes every batch applied so far durable (fsync).
    pub fn sync(&self) -> StoreResult<()> {
        self.commit(Batch::default(), true)
    }

    /// Deletes every entry (not durably until `sync`).
    pub fn clear(&self) -> StoreResult<()> {
        let mut write = self.db.begin_write().map_err(pages_error)?;
        write.set_durability(redb::Durability::None).map_err(pages_error)?;
        write.delete_table(TABLE).map_err(pages_error)?;
        write.open_table(TABLE).map_err(pages_error)?;
        write.commit().map_err(pages_error)?;
        Ok(())
    }

    pub fn is_empty(&self) -> StoreResult<bool> {
        let read = self.db.begin_read().map_err(pages_error)?;
        let table = read.open_table(TABLE).map_err(pages_error)?;
        Ok(table.len().map_err(pages_error)? == 0)
    }
}

/// A key or value as redb hands it out of a scan.
type Stored = redb::OwnedAccessGuard<&'static [u8]>;

/// An ordered scan of the page store, as of when it began (a read transaction: later batches do
/// not show). Errors come as items.
pub struct Iter {
    inner: Result<redb::OwnedRange<&'static [u8], &'static [u8]>, Option<StoreError>>,
}

impl Iter {
    fn new(pages: &Pages, (lower, upper): (Bound<&[u8]>, Bound<&[u8]>)) -> Iter {
        let open = || -> Result<_, redb::Error> {
            let read = pages.db.begin_read()?;
            let table = read.open_table(TABLE)?;
            Ok(table.range_owned((lower, upper))?)
        };
        Iter { inner: open().map_err(|error| Some(pages_error(error))) }
    }

    /// The keys only.
    pub fn keys(self) -> impl DoubleEndedIterator<Item = StoreResult<Value>> {
        self.map(|entry| entry.map(|(key, _)| key))
    }

    fn convert(
        entry: Option<Result<(Stored, Stored), redb::StorageError>>,
    ) -> Option<StoreResult<(Value, Value)>> {
        entry.map(|entry| {
            let (key, value) = entry.map_err(pages_error)?;
            let value = checked(key.value(), value.value())?;
            Ok((Value::from(key.value()), value))
        })
    }
}

impl Iterator for Iter {
    type Item = StoreResult<(Value, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Ok(range) => Self::convert(range.next()),
            Err(error) => error.take().map(Err),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Ok(range) => Self::convert(range.next_back()),
            Err(error) => error.take().map(Err),
        }
    }
}

/// `value` as stored: followed by the CRC32C of the key and the value.
pub(super) fn sealed(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(value.len() + 4);
    stored.extend_from_slice(value);
    stored.extend_from_slice(&crc32c::crc32c_append(crc32c::crc32c(key), value).to_le_bytes());
    stored
}

/// The value stored under `key`, if its checksum holds.
pub(super) fn checked(key: &[u8], stored: &[u8]) -> StoreResult<Value> {
    let damaged =
        || StoreError::Corrupt(format!("the page store's value under {key:02x?} fails its checksum"));
    let split = stored.len().checked_sub(4).ok_or_else(damaged)?;
    let (value, sum) = stored.split_at(split);
    if crc32c::crc32c_append(crc32c::crc32c(key), value).to_le_bytes() != sum {
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

fn sync_directory(path: &Path) -> StoreResult<()> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// A redb error as the store's: damage, IO, or the page store failing otherwise.
fn pages_error(error: impl Into<redb::Error>) -> StoreError {
    match error.into() {
        redb::Error::Corrupted(what) => StoreError::Corrupt(format!("the page store: {what}")),
        redb::Error::Io(error) => StoreError::Io(error),
        other => StoreError::Pages(other.to_string()),
    }
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
