//! The product's page store: redb (see the module above for how batches become durable).

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::{Batch, Entries, Open, PageStore, Value};
use ledger::store::{StoreError, StoreResult};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ledger");
/// The page store's file in the store's directory.
pub const FILE_NAME: &str = "state.redb";

pub struct Redb {
    db: redb::Database,
}

impl Redb {
    /// Opens the store in directory `dir`, creating the directory and the store if there are
    /// none. `cache_bytes` bounds redb's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<Redb> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let created = !path.exists();
        // redb calls this only when it walks the whole file to rebuild its allocator state: after
        // a crash whose last durable commit recorded none (every durable commit here records it).
        // That takes seconds per GiB, so it is said.
        let walked = Arc::new(AtomicBool::new(false));
        let noted = walked.clone();
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes as usize)
            .set_repair_callback(move |_| noted.store(true, Ordering::Relaxed))
            .create(&path)
            .map_err(pages_error)?;
        if walked.load(Ordering::Relaxed) {
            eprintln!(
                "state store: redb repaired {} by walking the whole file (its last durable commit \
                 recorded no allocator state)",
                path.display()
            );
        }
        let redb = Redb { db };
        // A durable commit creates the table (every commit opens it): on every open, since a
        // crash can come between creating the file and this commit (readers would find none).
        redb.commit(Batch::default(), true)?;
        if created {
            // The file's name, and the directory's in its parent.
            sync_directory(dir)?;
            if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                sync_directory(parent)?;
            }
        }
        Ok(redb)
    }
}

impl PageStore for Redb {
    fn get(&self, key: &[u8], open: Open) -> StoreResult<Option<Value>> {
        let read = self.db.begin_read().map_err(pages_error)?;
        let table = read.open_table(TABLE).map_err(pages_error)?;
        let value = redb::ReadableTable::get(&table, key).map_err(pages_error)?;
        value.map(|value| open(key, value.value())).transpose()
    }

    fn range(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>, open: Open) -> Entries {
        let range = || -> Result<_, redb::Error> {
            let read = self.db.begin_read()?;
            let table = read.open_table(TABLE)?;
            Ok(table.range_owned((lower, upper))?)
        };
        match range() {
            Ok(range) => Box::new(Scan { range, open }),
            Err(error) => Box::new(std::iter::once(Err(pages_error(error)))),
        }
    }

    fn commit(&self, batch: Batch, durably: bool) -> StoreResult<()> {
        let mut write = self.db.begin_write().map_err(pages_error)?;
        let durability = if durably { redb::Durability::Immediate } else { redb::Durability::None };
        write.set_durability(durability).map_err(pages_error)?;
        write.set_quick_repair(durably);
        {
            let mut table = write.open_table(TABLE).map_err(pages_error)?;
            for (key, value) in batch.writes() {
                match value {
                    Some(value) => table.insert(key.as_slice(), value.as_slice()).map(drop),
                    None => table.remove(key.as_slice()).map(drop),
                }
                .map_err(pages_error)?;
            }
        }
        write.commit().map_err(pages_error)?;
        Ok(())
    }

    fn clear(&self) -> StoreResult<()> {
        let mut write = self.db.begin_write().map_err(pages_error)?;
        write.set_durability(redb::Durability::None).map_err(pages_error)?;
        write.delete_table(TABLE).map_err(pages_error)?;
        write.open_table(TABLE).map_err(pages_error)?;
        write.commit().map_err(pages_error)?;
        Ok(())
    }

    fn is_empty(&self) -> StoreResult<bool> {
        let read = self.db.begin_read().map_err(pages_error)?;
        let table = read.open_table(TABLE).map_err(pages_error)?;
        Ok(table.len().map_err(pages_error)? == 0)
    }
}

/// A key or value as redb hands it out of a scan.
type Stored = redb::OwnedAccessGuard<&'static [u8]>;

/// An ordered scan of one read transaction.
struct Scan {
    range: redb::OwnedRange<&'static [u8], &'static [u8]>,
    open: Open,
}

impl Scan {
    fn convert(
        &self,
        entry: Option<Result<(Stored, Stored), redb::StorageError>>,
    ) -> Option<StoreResult<(Value, Value)>> {
        entry.map(|entry| {
            let (key, value) = entry.map_err(pages_error)?;
            let value = (self.open)(key.value(), value.value())?;
            Ok((Value::from(key.value()), value))
        })
    }
}

impl Iterator for Scan {
    type Item = StoreResult<(Value, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = self.range.next();
        self.convert(entry)
    }
}

impl DoubleEndedIterator for Scan {
    fn next_back(&mut self) -> Option<Self::Item> {
        let entry = self.range.next_back();
        self.convert(entry)
    }
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
