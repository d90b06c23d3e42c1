//! The storage boundary: what the state machine reads, and the set of changes one applied Raft
//! entry writes at once.
//!
//! Two stores implement it: `MemStore` (typed maps, for tests, simulations and benchmarks) and
//! `tally_store::RunStore` (the product, a crate of its own). Both present the same records under the same keys (`codec.rs`), so
//! an export of either is byte-for-byte the same for the same history.

use std::collections::BTreeSet;

use crate::codec::{self, LedgerMeta};
use crate::model::{
    Account, AccountBalance, ChangeRecord, CreateTransferResult, Field, PendingStatus, Transfer,
};

#[derive(Debug)]
pub enum StoreError {
    /// The page store failed (other than with damage or an IO error).
    Pages(String),
    Io(std::io::Error),
    /// The stored bytes are not what this version of tally wrote.
    Corrupt(String),
    /// An import was asked of a store that already holds state.
    NotEmpty,
    /// The state was written by a version of tally this build does not read (not damage: it
    /// must be left as it is).
    OtherVersion(String),
    /// The state was written in a form this build replaced and does not read, which the node
    /// rebuilds from what it holds besides (its snapshot and log): not damage, no operator needed.
    Superseded(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Pages(error) => write!(f, "the page store: {error}"),
            StoreError::Io(error) => write!(f, "io: {error}"),
            StoreError::Corrupt(what) => write!(f, "corrupt ledger state: {what}"),
            StoreError::NotEmpty => write!(f, "cannot import a snapshot into a non-empty store"),
            StoreError::OtherVersion(what) | StoreError::Superseded(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// The stored bytes are damaged (a checksum or a decoding failed), as opposed to a disk that
    /// fails: the state cannot be trusted, but a copy of it can be rebuilt.
    pub fn is_damage(&self) -> bool {
        matches!(self, StoreError::Corrupt(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError::Io(error)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What a field scan of transfers meets (`Store::scan_transfer_field`).
#[derive(Debug, Clone, Copy)]
pub enum Scanned<'a> {
    /// A transfer that may match.
    Transfer(&'a Transfer),
    /// Up to `transfers` transfers ruled out at once (a chunk whose zone map does not hold the
    /// value); a scan resumed at `resume` (its lower bound, or its upper bound when reversed)
    /// goes on with them.
    Skipped { resume: u64, transfers: usize },
}

/// Everything one applied entry changes, with final values, in an order fixed by the entry alone
/// (sorted, or creation order), so that the digest and the writes never depend on hashing.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Sorted by id.
    pub accounts: Vec<Account>,
    /// New transfers, in the order they were created (which is timestamp order).
    pub transfers: Vec<Transfer>,
    /// Sorted by id.
    pub pending: Vec<(u128, PendingStatus)>,
    pub expiry_put: BTreeSet<(u64, u128)>,
    pub expiry_delete: BTreeSet<(u64, u128)>,
    /// Ids of transfers that failed for a transient reason, with it; sorted by id.
    pub failed: Vec<(u128, CreateTransferResult)>,
    /// In the order written, which is timestamp order.
    pub index: Vec<IndexWrite>,
    /// The change records of the entry's events, in timestamp order.
    pub changes: Vec<ChangeRecord>,
    pub meta: LedgerMeta,
    /// Written with the state, atomically; `None` leaves the stored value as it is.
    pub app_meta: Option<Vec<u8>>,
    /// The ledger's last timestamp before this entry: the accounts with a later one are the
    /// ones it created (one timeline, imported events included), the others it changed. Not a
    /// write: stores index new accounts by it.
    pub timestamp_before: u64,
}

impl Changes {
    /// Calls `record` with every key written and its new value (`None` for a delete), grouped by
    /// kind of record and in a deterministic order. Stores write exactly this; the digest hashes
    /// exactly this.
    pub fn for_each_write(&self, mut record: impl FnMut(&[u8], Option<&[u8]>)) {
        for account in &self.accounts {
            record(&codec::id_key(codec::PREFIX_ACCOUNT, account.id), Some(&codec::encode_account(account)));
        }
        let mut encoded = Vec::with_capacity(codec::CHANGE_BYTES_MAX);
        for change in &self.changes {
            encoded.clear();
            codec::encode_change_into(change, &mut encoded);
            record(&codec::change_key(change.timestamp), Some(&encoded));
        }
        let mut expiries: Vec<((u64, u128), bool)> = self
            .expiry_put
            .iter()
            .map(|key| (*key, true))
            .chain(self.expiry_delete.iter().map(|key| (*key, false)))
            .collect();
        expiries.sort_unstable();
        for ((expires_at, id), put) in expiries {
            let key = codec::expiry_key(expires_at, id);
            record(&key, if put { Some(&[]) } else { None });
        }
        for write in &self.index {
            let value = codec::encode_index_value(write.transfer_id, write.balance.as_ref());
            record(&codec::index_key(write.account_id, write.timestamp), Some(&value));
        }
        if let Some(app_meta) = &self.app_meta {
            record(codec::META_APP_KEY, Some(app_meta));
        }
        record(codec::META_LEDGER_KEY, Some(&codec::encode_ledger_meta(&self.meta)));
        for (id, status) in &self.pending {
            record(&codec::id_key(codec::PREFIX_PENDING, *id), Some(&[*status as u8]));
        }
        for transfer in &self.transfers {
            record(&codec::transfer_key(transfer.timestamp), Some(&codec::encode_transfer(transfer)));
        }
        for (id, result) in &self.failed {
            record(&codec::id_key(codec::PREFIX_FAILED, *id), Some(&codec::encode_failed(*result)));
        }
    }
}

/// One entry of the per-account index: the account's transfer at `timestamp`, and for an account
/// with history, its balances just after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexWrite {
    pub account_id: u128,
    pub timestamp: u64,
    pub transfer_id: u128,
    pub balance: Option<AccountBalance>,
}

/// Visits a record: key, value.
pub type RecordVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> StoreResult<()> + 'a;

/// What the state machine needs from storage. Reads see only committed state; the state machine
/// keeps its own overlay of uncommitted changes.
pub trait Store {
    fn account(&self, id: u128) -> StoreResult<Option<Account>>;
    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>>;
    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>>;
    /// The transient result a transfer with this id failed with, if one did.
    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>>;
    /// The earliest `expires_at` of a pending transfer, if any.
    fn next_expiry(&self) -> StoreResult<Option<u64>>;
    /// The first `count` expiries, oldest first, as `(expires_at, id)`.
    fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>>;
    /// Pending transfers with `expires_at <= now`, oldest first, as `(expires_at, id)`.
    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>>;
    /// Index entries of one account with `timestamp_min <= timestamp <= timestamp_max`, in time
    /// order (or reversed), until `visit` returns false. `visit` gets the timestamp and the raw
    /// index value (`codec::decode_index_value`).
    fn scan_index(
        &self,
        account_id: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> StoreResult<()>;
    /// The transfer created at `timestamp`, if one was.
    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>>;
    /// Transfers with `timestamp_min <= timestamp <= timestamp_max`, in time order (or reversed),
    /// until `visit` returns false.
    fn scan_transfers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()>;
    /// Transfers within the bounds, in time order (or reversed), that may have `field` equal to
    /// `value` (never zero): each one that has is visited, and others may be (a store may serve a
    /// field from a coarse index; the caller checks), until `visit` returns false. A stretch of
    /// transfers a coarse index rules out is visited too (`Scanned::Skipped`): it is work all
    /// the same, which a query counts against its budget.
    fn scan_transfer_field(
        &self,
        field: Field,
        value: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(Scanned<'_>) -> bool,
    ) -> StoreResult<()>;
    /// `(timestamp, id)` of the accounts whose `field` holds `value` (never zero), or of every
    /// account for `None`, within the bounds, in time order (or reversed), until `visit` returns
    /// false.
    fn scan_account_field(
        &self,
        field: Option<Field>,
        value: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, u128) -> bool,
    ) -> StoreResult<()>;
    /// Change records with `timestamp >= timestamp_min`, in time order, until `visit` returns
    /// false.
    fn scan_changes(
        &self,
        timestamp_min: u64,
        visit: &mut dyn FnMut(&ChangeRecord) -> bool,
    ) -> StoreResult<()>;
    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Writes all of `changes` atomically: after a crash, either all of it or none of it is there.
    /// Durable once `flush` has returned: a crash before takes it back, with every later commit
    /// (commits are kept in order, and the node re-applies them from its log).
    fn commit(&mut self, changes: &Changes) -> StoreResult<()>;
    /// Every record in key order, as `(key, value)`: the input of export and of the state digest.
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()>;
    /// Writes raw records during an import. Not atomic on its own: `snapshot::import` writes the
    /// ledger meta last and treats a store without it as empty.
    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()>;
    /// Removes every record.
    fn clear(&mut self) -> StoreResult<()>;
    fn is_empty(&self) -> StoreResult<bool>;
    /// Makes everything committed so far durable (fsync). A no-op in memory.
    fn flush(&self) -> StoreResult<()>;
}

/// A store that can take a commit while it is being read, from another thread: what a
/// background checkpoint writes to (`checkpoint::Checkpointed`).
pub trait SharedStore: Store + Send + Sync {
    /// `Store::commit`, through a shared reference. Two must not run at once.
    fn commit_shared(&self, changes: &Changes) -> StoreResult<()>;

    /// `commit_shared` if the store takes it now, without waiting for other work of its own (a
    /// merge's durable write, say): `false`, and nothing written, if it would wait. By default it
    /// never would.
    fn try_commit_shared(&self, changes: &Changes) -> StoreResult<bool> {
        self.commit_shared(changes).map(|()| true)
    }
}

/// Records listed in key order: a store, or a frozen view of one (`tally_store::RunStore::freeze`). What a
/// snapshot export reads.
pub trait Records {
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()>;
}

impl<S: Store> Records for S {
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        Store::for_each_record(self, visit)
    }
}
