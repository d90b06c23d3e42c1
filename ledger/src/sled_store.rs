//! `SledStore`: the state in one sled tree, the product's store.
//!
//! One tree with prefixed keys (`codec.rs`) rather than a tree per kind of record, because sled
//! makes a `Batch` atomic within one tree; across trees it would take a transaction, which is much
//! slower. sled may lose its newest batches on a crash (it flushes on a timer); the Raft log still
//! has them, and the caller re-applies from the applied marker it keeps in `META_APP_KEY`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::codec::{self, PREFIX_EXPIRY};
use crate::model::{Account, PendingStatus, Transfer};
use crate::store::{Changes, RecordVisitor, Store, StoreError, StoreResult};

const TREE_NAME: &[u8] = b"ledger";

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    /// While a `FrozenView` exists: the value every key had when it was frozen, recorded by
    /// `commit` before it first changes the key (`None`: the key did not exist). Shared with the
    /// view; a std mutex, held only to look up or insert.
    pre_images: Arc<Mutex<Option<PreImages>>>,
}

type PreImages = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

impl SledStore {
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: &Path) -> StoreResult<SledStore> {
        let db = sled::Config::new().path(path).open()?;
        let tree = db.open_tree(TREE_NAME)?;
        Ok(SledStore { db, tree, pre_images: Arc::new(Mutex::new(None)) })
    }

    /// A view of the state as it is now that later commits do not change, for a snapshot export
    /// that must not stop applying: sled has no snapshots of its own, so from here until the view
    /// is dropped, `commit` keeps the old value of every key it changes, and the view reads the
    /// live tree through those. The memory this takes is one old value per key changed while the
    /// view lives. One view at a time.
    pub fn freeze(&self) -> FrozenView {
        let mut pre_images = self.pre_images.lock().unwrap();
        assert!(pre_images.is_none(), "sled store: a second frozen view");
        *pre_images = Some(BTreeMap::new());
        FrozenView { db: self.db.clone(), tree: self.tree.clone(), pre_images: self.pre_images.clone() }
    }

    /// Records the current value of each key `changes` writes that has none recorded yet.
    fn keep_pre_images(&self, changes: &Changes) -> StoreResult<()> {
        let mut guard = self.pre_images.lock().unwrap();
        let Some(pre_images) = guard.as_mut() else { return Ok(()) };
        let mut result = Ok(());
        changes.for_each_write(|key, _| {
            if result.is_ok() && !pre_images.contains_key(key) {
                match self.tree.get(key) {
                    Ok(value) => {
                        pre_images.insert(key.to_vec(), value.map(|v| v.to_vec()));
                    }
                    Err(error) => result = Err(error),
                }
            }
        });
        Ok(result?)
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
        self.keep_pre_images(changes)?;
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

/// The state of a `SledStore` when `SledStore::freeze` was called, readable while commits go on.
pub struct FrozenView {
    db: sled::Db,
    tree: sled::Tree,
    pre_images: Arc<Mutex<Option<PreImages>>>,
}

impl FrozenView {
    /// Flushes the live store: everything committed so far, the frozen state included, is
    /// written out, and survives a process crash. Safe while commits go on.
    pub fn flush_store(&self) -> StoreResult<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Every record of the frozen state in key order: the live tree, with each key changed since
    /// the freeze read from its pre-image instead (and keys deleted since then put back).
    ///
    /// Why this is the frozen state although the tree moves underneath: `commit` records a key's
    /// pre-image before it changes the key, and this reads a tree entry before it looks the key
    /// up in the pre-images; so a changed value read from the tree always finds its pre-image.
    /// A key deleted since the freeze is not in the tree: it comes from the pre-images, between
    /// the tree keys around it. Each key is visited once, at increasing positions.
    pub fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        let mut position: Option<Vec<u8>> = None;
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            self.visit_deleted_before(position.as_deref(), Some(&key), visit)?;
            match self.pre_image(&key) {
                Some(Some(old)) => visit(&key, &old)?,
                Some(None) => {}
                None => visit(&key, &value)?,
            }
            position = Some(key.to_vec());
        }
        self.visit_deleted_before(position.as_deref(), None, visit)
    }

    fn pre_image(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let guard = self.pre_images.lock().unwrap();
        guard.as_ref().expect("frozen").get(key).cloned()
    }

    /// Visits the pre-images of keys strictly between `after` and `before` that existed at the
    /// freeze. The tree went from `after` straight to `before`, so it did not return them: they
    /// were deleted since (and maybe written again after the iterator passed).
    fn visit_deleted_before(
        &self,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        visit: &mut RecordVisitor,
    ) -> StoreResult<()> {
        use std::ops::Bound::{Excluded, Unbounded};
        let found: Vec<(Vec<u8>, Vec<u8>)> = {
            let guard = self.pre_images.lock().unwrap();
            let pre_images = guard.as_ref().expect("frozen");
            let low = after.map_or(Unbounded, Excluded);
            let high = before.map_or(Unbounded, Excluded);
            pre_images
                .range::<[u8], _>((low, high))
                .filter_map(|(key, old)| Some((key.clone(), old.clone()?)))
                .collect()
        };
        for (key, old) in found {
            visit(&key, &old)?;
        }
        Ok(())
    }
}

impl Drop for FrozenView {
    fn drop(&mut self) {
        *self.pre_images.lock().unwrap() = None;
    }
}
