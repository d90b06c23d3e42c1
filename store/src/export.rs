//! Reading a `RunStore` back as logical records: the input of a snapshot export and of the
//! state digest, from the store itself or from a frozen view of it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::layout::Runs;
use super::runs::{self, Kind};
use super::{Inner, change_records, chunk_records, record_timestamp};
use ledger::codec::{
    self, PREFIX_ACCOUNT, PREFIX_CHANGE, PREFIX_EXPIRY, PREFIX_FAILED, PREFIX_INDEX, PREFIX_META,
    PREFIX_PENDING, PREFIX_TRANSFER,
};
use ledger::store::{RecordVisitor, StoreResult};

pub(super) type PreImages = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Every logical record of the state, in key order (`A`, `C`, `E`, `I`, `M`, `P`, `T`, `X`):
/// accounts and index entries merged from `runs`, plain keys from the tree (through `pre_images`
/// for a frozen view), change records and transfers from their chunks up to `timestamp_last`.
pub(super) fn export(
    inner: &Inner,
    runs: &Runs,
    pre_images: Option<&Mutex<Option<PreImages>>>,
    timestamp_last: u64,
    visit: &mut RecordVisitor,
) -> StoreResult<()> {
    let mut key = Vec::with_capacity(25);
    for (prefix, kind) in [(PREFIX_ACCOUNT, Kind::Accounts), (PREFIX_INDEX, Kind::Index)] {
        if prefix == PREFIX_INDEX {
            'changes: for entry in inner.pages.scan_prefix(&[PREFIX_CHANGE]) {
                let (_, chunk) = entry?;
                for (timestamp, record) in change_records(&chunk)? {
                    if timestamp > timestamp_last {
                        break 'changes;
                    }
                    visit(&codec::change_key(timestamp), record)?;
                }
            }
            visit_plain(inner, PREFIX_EXPIRY, pre_images, visit)?;
        }
        runs::scan_all(runs.of(kind), &inner.pages, &mut |run_key, value| {
            key.clear();
            key.push(prefix);
            key.extend_from_slice(run_key);
            visit(&key, value)?;
            Ok(true)
        })?;
    }
    visit_plain(inner, PREFIX_META, pre_images, visit)?;
    visit_plain(inner, PREFIX_PENDING, pre_images, visit)?;
    'chunks: for entry in inner.pages.scan_prefix(&[PREFIX_TRANSFER]) {
        let (_, chunk) = entry?;
        for record in chunk_records(&chunk)? {
            let timestamp = record_timestamp(record);
            if timestamp > timestamp_last {
                break 'chunks;
            }
            visit(&codec::transfer_key(timestamp), record)?;
        }
    }
    visit_plain(inner, PREFIX_FAILED, pre_images, visit)
}

/// The plain keys with one prefix, in key order, as they were when frozen if `pre_images` is
/// given: the live tree, with each key changed since the freeze read from its pre-image instead
/// (and keys deleted since then put back).
///
/// Why this is the frozen state although the tree moves underneath: `commit` records a key's
/// pre-image before it changes the key, and this reads a tree entry before it looks the key up
/// in the pre-images; so a changed value read from the tree always finds its pre-image. A key
/// deleted since the freeze is not in the tree: it comes from the pre-images, between the tree
/// keys around it. Each key is visited once, at increasing positions.
fn visit_plain(
    inner: &Inner,
    prefix: u8,
    pre_images: Option<&Mutex<Option<PreImages>>>,
    visit: &mut RecordVisitor,
) -> StoreResult<()> {
    let Some(pre_images) = pre_images else {
        for entry in inner.pages.scan_prefix(&[prefix]) {
            let (key, value) = entry?;
            visit(&key, &value)?;
        }
        return Ok(());
    };
    let pre_image = |key: &[u8]| pre_images.lock().unwrap().as_ref().expect("frozen").get(key).cloned();
    let deleted_between = |after: Bound<&[u8]>, before: Bound<&[u8]>| -> Vec<(Vec<u8>, Vec<u8>)> {
        let guard = pre_images.lock().unwrap();
        guard
            .as_ref()
            .expect("frozen")
            .range::<[u8], _>((after, before))
            .filter_map(|(key, old)| Some((key.clone(), old.clone()?)))
            .collect()
    };
    let start = [prefix];
    let end = [prefix + 1];
    let mut position: Vec<u8> = start.to_vec();
    let mut first = true;
    for entry in inner.pages.scan_prefix(&start) {
        let (key, value) = entry?;
        let after =
            if first { Bound::Included(position.as_slice()) } else { Bound::Excluded(position.as_slice()) };
        for (old_key, old) in deleted_between(after, Bound::Excluded(&key)) {
            visit(&old_key, &old)?;
        }
        match pre_image(&key) {
            Some(Some(old)) => visit(&key, &old)?,
            Some(None) => {}
            None => visit(&key, &value)?,
        }
        position = key.to_vec();
        first = false;
    }
    let after =
        if first { Bound::Included(position.as_slice()) } else { Bound::Excluded(position.as_slice()) };
    for (old_key, old) in deleted_between(after, Bound::Excluded(&end[..])) {
        visit(&old_key, &old)?;
    }
    Ok(())
}

/// The state of a `RunStore` when `RunStore::freeze` was called, readable while commits go on.
pub struct FrozenView {
    pub(super) inner: Arc<Inner>,
    pub(super) runs: Arc<Runs>,
    pub(super) timestamp_last: u64,
}

impl FrozenView {
    /// Flushes the live store: everything committed so far, the frozen state included, is
    /// written out, and survives a process crash. Safe while commits go on.
    pub fn flush_store(&self) -> StoreResult<()> {
        self.inner.flush()
    }

    /// Every record of the frozen state in key order.
    pub fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        export(&self.inner, &self.runs, Some(&self.inner.pre_images), self.timestamp_last, visit)
    }
}

impl ledger::store::Records for FrozenView {
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        FrozenView::for_each_record(self, visit)
    }
}

impl Drop for FrozenView {
    fn drop(&mut self) {
        *self.inner.pre_images.lock().unwrap() = None;
    }
}
