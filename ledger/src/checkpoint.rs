//! `Checkpointed`: a store whose commits are memory work, and whose state reaches the durable
//! store underneath in checkpoints (DESIGN.md decision 15).
//!
//! A node makes a write durable in its Raft log, not in its state store: after a crash it
//! re-applies the log from the last entry its store holds. So applying an entry need not touch
//! the store at all. `commit` adds the entry's changes to `recent`, a `MemStore` of everything
//! applied since the last checkpoint, and `checkpoint` writes all of it to the store underneath
//! in one atomic commit, with the applied marker of the newest entry in it. One payment then
//! pays for a few map inserts, and the store's fixed cost per commit (its runs, its atomic batch,
//! its IO threads) is paid once per checkpoint instead of once per entry.
//!
//! Reads see `recent` over the store: a point lookup asks `recent` first; every record keyed by
//! time (transfers, index entries, change records, the query indexes) is newer in `recent` than
//! anything underneath, because ledger time only grows, so a scan is the store's part followed by
//! `recent`'s (or the reverse). Expiries are the one set whose members go away: the ones that
//! `recent` added are in `expiry_put`, the ones of the store it removed are in `expiry_deleted`.
//!
//! When to checkpoint is the caller's choice (the node checkpoints by bytes and by time, and
//! before every snapshot); `recent_bytes` tells how much memory waits.

use std::collections::BTreeSet;

use crate::codec::{self, LedgerMeta};
use crate::mem::MemStore;
use crate::model::{Account, ChangeRecord, CreateTransferResult, Field, PendingStatus, Transfer};
use crate::store::{Changes, RecordVisitor, Store, StoreResult};

/// Memory one record of each kind takes in `recent`, roughly (the record, its map entries and
/// its query index entries): what `recent_bytes` counts.
const ACCOUNT_BYTES: u64 = 256;
const TRANSFER_BYTES: u64 = 320;
const INDEX_BYTES: u64 = 64;
const CHANGE_BYTES: u64 = 160;
const SMALL_BYTES: u64 = 64;

pub struct Checkpointed<S> {
    base: S,
    /// Everything committed since the last checkpoint but expiries (`MemStore` keeps a plain
    /// set of them, which cannot say that a key of the store underneath is gone).
    recent: MemStore,
    /// Expiries added since the last checkpoint and still there.
    expiry_put: BTreeSet<(u64, u128)>,
    /// Expiries of the store underneath removed since the last checkpoint.
    expiry_deleted: BTreeSet<(u64, u128)>,
    /// The ledger's meta after the newest commit, and the newest application meta.
    meta: Option<LedgerMeta>,
    app_meta: Option<Vec<u8>>,
    /// The ledger's last timestamp before the first commit since the last checkpoint: every
    /// time-keyed record after it is in `recent`, none before it.
    timestamp_before: u64,
    recent_bytes: u64,
    recent_commits: u64,
}

impl<S: Store> Checkpointed<S> {
    pub fn new(base: S) -> Checkpointed<S> {
        Checkpointed {
            base,
            recent: MemStore::new(),
            expiry_put: BTreeSet::new(),
            expiry_deleted: BTreeSet::new(),
            meta: None,
            app_meta: None,
            timestamp_before: 0,
            recent_bytes: 0,
            recent_commits: 0,
        }
    }

    /// The durable store underneath, as of the last checkpoint.
    pub fn base(&self) -> &S {
        &self.base
    }

    pub fn into_base(self) -> S {
        assert_eq!(self.recent_commits, 0, "a checkpointed store dropped {} commits", self.recent_commits);
        self.base
    }

    /// Memory held by commits since the last checkpoint, roughly.
    pub fn recent_bytes(&self) -> u64 {
        self.recent_bytes
    }

    /// Commits since the last checkpoint.
    pub fn recent_commits(&self) -> u64 {
        self.recent_commits
    }

    /// Writes everything committed since the last checkpoint to the store underneath, in one
    /// atomic commit. Returns how many commits it carried.
    pub fn checkpoint(&mut self) -> StoreResult<u64> {
        let commits = self.recent_commits;
        if commits == 0 {
            return Ok(0);
        }
        let meta = self.meta.expect("a commit since the last checkpoint");
        let mut changes = std::mem::take(&mut self.recent).into_changes(meta, self.timestamp_before);
        changes.expiry_put = std::mem::take(&mut self.expiry_put);
        changes.expiry_delete = std::mem::take(&mut self.expiry_deleted);
        changes.app_meta = self.app_meta.take();
        if let Err(error) = self.base.commit(&changes) {
            // Nothing is lost: put it all back, so that a retry (or the node's stop) sees the
            // state as it was.
            self.recent = MemStore::new();
            self.recent.commit_without_expiries(&changes);
            self.expiry_put = changes.expiry_put;
            self.expiry_deleted = changes.expiry_delete;
            self.app_meta = changes.app_meta;
            return Err(error);
        }
        self.forget_recent();
        Ok(commits)
    }

    fn forget_recent(&mut self) {
        self.recent = MemStore::new();
        self.expiry_put.clear();
        self.expiry_deleted.clear();
        self.meta = None;
        self.app_meta = None;
        self.recent_bytes = 0;
        self.recent_commits = 0;
    }

    fn clipped(&self, timestamp_max: u64) -> u64 {
        if self.recent_commits == 0 { timestamp_max } else { timestamp_max.min(self.timestamp_before) }
    }

    /// Runs `older` then `newer` (or the reverse), stopping when one of them stopped: `visit`
    /// returned false inside it.
    fn in_order(
        reversed: bool,
        older: impl FnOnce(&mut bool) -> StoreResult<()>,
        newer: impl FnOnce(&mut bool) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut stopped = false;
        if reversed {
            newer(&mut stopped)?;
            if !stopped {
                older(&mut stopped)?;
            }
        } else {
            older(&mut stopped)?;
            if !stopped {
                newer(&mut stopped)?;
            }
        }
        Ok(())
    }
}

/// Wraps `visit` so that a `false` it returns is recorded in `stopped`.
fn noting<'v, T: ?Sized>(
    stopped: &'v mut bool,
    visit: &'v mut dyn FnMut(&T) -> bool,
) -> impl FnMut(&T) -> bool + 'v {
    move |item| {
        let go = visit(item);
        *stopped |= !go;
        go
    }
}

impl<S: Store> Store for Checkpointed<S> {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        match self.recent.account(id)? {
            Some(account) => Ok(Some(account)),
            None => self.base.account(id),
        }
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        match self.recent.transfer(id)? {
            Some(transfer) => Ok(Some(transfer)),
            None => self.base.transfer(id),
        }
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        match self.recent.pending_status(id)? {
            Some(status) => Ok(Some(status)),
            None => self.base.pending_status(id),
        }
    }

    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
        match self.recent.failed_transfer(id)? {
            Some(result) => Ok(Some(result)),
            None => self.base.failed_transfer(id),
        }
    }

    fn next_expiry(&self) -> StoreResult<Option<u64>> {
        // At most `expiry_deleted.len()` of the store's first expiries are hidden.
        let base = self.base.first_expiries(self.expiry_deleted.len() + 1)?;
        let base = base.into_iter().find(|key| !self.expiry_deleted.contains(key));
        let recent = self.expiry_put.first().copied();
        Ok([base, recent].into_iter().flatten().min().map(|(expires_at, _)| expires_at))
    }

    fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>> {
        let base = self.base.first_expiries(self.expiry_deleted.len() + count)?;
        let mut first: Vec<(u64, u128)> =
            base.into_iter().filter(|key| !self.expiry_deleted.contains(key)).collect();
        first.extend(self.expiry_put.iter().take(count).copied());
        first.sort_unstable();
        first.truncate(count);
        Ok(first)
    }

    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
        let mut due = self.base.expiries_due(now)?;
        due.retain(|key| !self.expiry_deleted.contains(key));
        due.extend(self.expiry_put.range(..=(now, u128::MAX)).copied());
        due.sort_unstable();
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
        let clipped = self.clipped(timestamp_max);
        let visit = std::cell::RefCell::new(visit);
        let scan = |store: &dyn Store, max: u64, stopped: &mut bool| {
            store.scan_index(account_id, timestamp_min, max, reversed, &mut |timestamp, value| {
                let go = (visit.borrow_mut())(timestamp, value);
                *stopped |= !go;
                go
            })
        };
        Self::in_order(
            reversed,
            |stopped| if timestamp_min <= clipped { scan(&self.base, clipped, stopped) } else { Ok(()) },
            |stopped| scan(&self.recent, timestamp_max, stopped),
        )
    }

    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
        match self.recent.transfer_at(timestamp)? {
            Some(transfer) => Ok(Some(transfer)),
            None => self.base.transfer_at(timestamp),
        }
    }

    fn scan_transfers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()> {
        let clipped = self.clipped(timestamp_max);
        let visit = std::cell::RefCell::new(visit);
        let scan = |store: &dyn Store, max: u64, stopped: &mut bool| {
            let mut visit = visit.borrow_mut();
            store.scan_transfers(timestamp_min, max, reversed, &mut noting(stopped, &mut **visit))
        };
        Self::in_order(
            reversed,
            |stopped| if timestamp_min <= clipped { scan(&self.base, clipped, stopped) } else { Ok(()) },
            |stopped| scan(&self.recent, timestamp_max, stopped),
        )
    }

    fn scan_transfer_field(
        &self,
        field: Field,
        value: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()> {
        let clipped = self.clipped(timestamp_max);
        let visit = std::cell::RefCell::new(visit);
        let scan = |store: &dyn Store, max: u64, stopped: &mut bool| {
            let mut visit = visit.borrow_mut();
            let mut visit = noting(stopped, &mut **visit);
            store.scan_transfer_field(field, value, timestamp_min, max, reversed, &mut visit)
        };
        Self::in_order(
            reversed,
            |stopped| if timestamp_min <= clipped { scan(&self.base, clipped, stopped) } else { Ok(()) },
            |stopped| scan(&self.recent, timestamp_max, stopped),
        )
    }

    fn scan_account_field(
        &self,
        field: Option<Field>,
        value: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, u128) -> bool,
    ) -> StoreResult<()> {
        let clipped = self.clipped(timestamp_max);
        let visit = std::cell::RefCell::new(visit);
        let scan = |store: &dyn Store, max: u64, stopped: &mut bool| {
            store.scan_account_field(field, value, timestamp_min, max, reversed, &mut |timestamp, id| {
                let go = (visit.borrow_mut())(timestamp, id);
                *stopped |= !go;
                go
            })
        };
        Self::in_order(
            reversed,
            |stopped| if timestamp_min <= clipped { scan(&self.base, clipped, stopped) } else { Ok(()) },
            |stopped| scan(&self.recent, timestamp_max, stopped),
        )
    }

    fn scan_changes(
        &self,
        timestamp_min: u64,
        visit: &mut dyn FnMut(&ChangeRecord) -> bool,
    ) -> StoreResult<()> {
        let mut stopped = false;
        if self.recent_commits == 0 || timestamp_min <= self.timestamp_before {
            let before = self.timestamp_before;
            let all = self.recent_commits == 0;
            self.base.scan_changes(timestamp_min, &mut |change| {
                if !all && change.timestamp > before {
                    return false;
                }
                let go = visit(change);
                stopped |= !go;
                go
            })?;
        }
        if !stopped {
            self.recent.scan_changes(timestamp_min, visit)?;
        }
        Ok(())
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match self.recent.meta_raw(key)? {
            Some(value) => Ok(Some(value)),
            None => self.base.meta_raw(key),
        }
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        if self.recent_commits == 0 {
            self.timestamp_before = changes.timestamp_before;
        }
        self.recent.commit_without_expiries(changes);
        for key in &changes.expiry_delete {
            if !self.expiry_put.remove(key) {
                assert!(self.expiry_deleted.insert(*key), "expiry {key:?} deleted twice");
            }
        }
        for key in &changes.expiry_put {
            assert!(!self.expiry_deleted.contains(key), "expiry {key:?} put again after its delete");
            self.expiry_put.insert(*key);
        }
        self.meta = Some(changes.meta);
        if changes.app_meta.is_some() {
            self.app_meta = changes.app_meta.clone();
        }
        self.recent_bytes += changes.accounts.len() as u64 * ACCOUNT_BYTES
            + changes.transfers.len() as u64 * TRANSFER_BYTES
            + changes.index.len() as u64 * INDEX_BYTES
            + changes.changes.len() as u64 * CHANGE_BYTES
            + (changes.pending.len()
                + changes.failed.len()
                + changes.expiry_put.len()
                + changes.expiry_delete.len()) as u64
                * SMALL_BYTES
            + SMALL_BYTES;
        self.recent_commits += 1;
        Ok(())
    }

    /// The store's records with `recent`'s over them, in key order. Reads `recent` whole into
    /// memory first (bounded by the checkpoint size).
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        let mut newer: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.recent.for_each_record(&mut |key, value| {
            newer.push((key.to_vec(), value.to_vec()));
            Ok(())
        })?;
        newer.extend(
            self.expiry_put.iter().map(|(at, id)| (codec::expiry_key(*at, *id).to_vec(), Vec::new())),
        );
        newer.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let hidden: BTreeSet<Vec<u8>> =
            self.expiry_deleted.iter().map(|(at, id)| codec::expiry_key(*at, *id).to_vec()).collect();
        let mut newer = newer.into_iter().peekable();
        self.base.for_each_record(&mut |key, value| {
            while let Some((newer_key, newer_value)) =
                newer.next_if(|(newer_key, _)| newer_key.as_slice() <= key)
            {
                visit(&newer_key, &newer_value)?;
                if newer_key == key {
                    return Ok(());
                }
            }
            if hidden.contains(key) { Ok(()) } else { visit(key, value) }
        })?;
        for (key, value) in newer {
            visit(&key, &value)?;
        }
        Ok(())
    }

    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        assert_eq!(self.recent_commits, 0, "an import into a store with commits in memory");
        self.base.put_records(records)
    }

    fn clear(&mut self) -> StoreResult<()> {
        self.forget_recent();
        self.base.clear()
    }

    fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.recent_commits == 0 && self.base.is_empty()?)
    }

    /// Makes the store underneath durable: everything up to the last checkpoint.
    fn flush(&self) -> StoreResult<()> {
        self.base.flush()
    }
}
