//! `SledStore`: the state in one sled tree, the product's store.
//!
//! One tree with prefixed keys (`codec.rs`) rather than a tree per kind of record, because sled
//! makes a `Batch` atomic within one tree; across trees it would take a transaction, which is much
//! slower. sled may lose its newest batches on a crash (it flushes on a timer); the Raft log still
//! has them, and the caller re-applies from the applied marker it keeps in `META_APP_KEY`.

use std::path::Path;

use crate::codec::{self, PREFIX_EXPIRY};
use crate::model::{Account, PendingStatus, Transfer};
use crate::store::{Changes, RecordVisitor, Store, StoreError, StoreResult};

const TREE_NAME: &[u8] = b"ledger";

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let db = sled::Config::new().path(path).open()?;
        let tree = db.open_tree(TREE_NAME)?;
        Ok(SledStore { db, tree })
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

fn record<T>(
    value: Option<sled::IVec>,
    decode: impl Fn(&[u8]) -> T,
    expected: usize,
) -> StoreResult<Option<T>> {
    match value {
        None => Ok(None),
        Some(bytes) if bytes.len() == expected => Ok(Some(decode(&bytes))),
        Some(bytes) => {
            Err(StoreError::Corrupt(format!("record of {} bytes, expected {expected}", bytes.len())))
        }
    }
}

impl Store for SledStore {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        let value = self.tree.get(codec::id_key(codec::PREFIX_ACCOUNT, id))?;
        record(value, codec::decode_account, codec::RECORD_BYTES)
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        let value = self.tree.get(codec::id_key(codec::PREFIX_TRANSFER, id))?;
        record(value, codec::decode_transfer, codec::RECORD_BYTES)
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        let value = self.tree.get(codec::id_key(codec::PREFIX_PENDING, id))?;
        match record(value, |bytes| PendingStatus::from_u8(bytes[0]), 1)? {
            None => Ok(None),
            Some(Some(status)) => Ok(Some(status)),
            Some(None) => Err(StoreError::Corrupt("pending status byte".into())),
        }
    }

    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
        let start = [PREFIX_EXPIRY];
        let end = codec::expiry_key(now, u128::MAX);
        let mut due = Vec::new();
        for entry in self.tree.range(&start[..]..=&end[..]) {
            let (key, _) = entry?;
            due.push(codec::decode_expiry_key(&key));
        }
        Ok(due)
    }

    fn scan_index(
        &self,
        account_id: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> StoreResult<()> {
        let start = codec::index_key(account_id, timestamp_min);
        let end = codec::index_key(account_id, timestamp_max);
        let mut range = self.tree.range(start..=end);
        loop {
            let entry = if reversed { range.next_back() } else { range.next() };
            let Some(entry) = entry else { break };
            let (key, value) = entry?;
            let (_, timestamp) = codec::decode_index_key(&key);
            if !visit(timestamp, &value) {
                break;
            }
        }
        Ok(())
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|value| value.to_vec()))
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        changes.for_each_write(|key, value| match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        });
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            visit(&key, &value)?;
        }
        Ok(())
    }

    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for (key, value) in records {
            batch.insert(key.as_slice(), value.as_slice());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn clear(&mut self) -> StoreResult<()> {
        self.tree.clear()?;
        self.db.flush()?;
        Ok(())
    }

    fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.tree.is_empty())
    }

    fn flush(&self) -> StoreResult<()> {
        self.db.flush()?;
        Ok(())
    }
}
