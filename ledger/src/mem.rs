//! `MemStore`: the state in typed maps, for tests, simulations and benchmarks.
//!
//! It behaves exactly like `tally_store::RunStore` (same records, same keys in `for_each_record`), which the
//! determinism test checks by comparing exports; it is simply never durable. Point lookups use
//! hash maps (their order never leaks: `for_each_record` sorts), and each account's index is a
//! vector in time order, because timestamps only grow: an index write is an append.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::HashMap;

use crate::codec::{
    self, PREFIX_ACCOUNT, PREFIX_CHANGE, PREFIX_EXPIRY, PREFIX_FAILED, PREFIX_INDEX, PREFIX_META,
    PREFIX_PENDING, PREFIX_TRANSFER,
};
use crate::model::{
    Account, AccountBalance, ChangeRecord, CreateTransferResult, Field, PendingStatus, Transfer,
};
use crate::store::{Changes, IndexWrite, RecordVisitor, Scanned, Store, StoreError, StoreResult};

#[derive(Default, Clone)]
pub struct MemStore {
    accounts: HashMap<u128, Account>,
    transfers: HashMap<u128, Transfer>,
    pending: HashMap<u128, PendingStatus>,
    expiries: BTreeSet<(u64, u128)>,
    failed: HashMap<u128, CreateTransferResult>,
    index: HashMap<u128, IndexList>,
    changes: BTreeMap<u64, ChangeRecord>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Derived, for queries (not records): transfer ids by timestamp, and the field indexes,
    /// `(field, value, timestamp)` for transfers and `(field, value, timestamp, id)` for
    /// accounts (`None`: every account, value zero). Zero values are not indexed.
    transfer_times: BTreeMap<u64, u128>,
    transfer_fields: BTreeSet<(Field, u128, u64)>,
    account_fields: BTreeSet<(Option<Field>, u128, u64, u128)>,
}

/// One account's index: `(timestamp, transfer id)` in time order, and for an account with
/// history, the balances after each (the same length), kept apart so that the common case stays
/// small.
#[derive(Clone, Default)]
struct IndexList {
    entries: Vec<(u64, u128)>,
    balances: Vec<AccountBalance>,
}

impl IndexList {
    fn encode(&self, position: usize) -> codec::IndexValue {
        codec::encode_index_value(self.entries[position].1, self.balances.get(position))
    }
}

/// Visits a range forwards (or backwards) until `visit` returns false.
fn visit_in_order<T: Copy>(
    range: impl DoubleEndedIterator<Item = T>,
    reversed: bool,
    visit: &mut impl FnMut(T) -> bool,
) {
    if reversed {
        range.rev().take_while(|entry| visit(*entry)).for_each(drop);
    } else {
        range.take_while(|entry| visit(*entry)).for_each(drop);
    }
}

/// A hash map's entries in key order, for everything that must not depend on hashing.
fn sorted<K: Ord + Copy, V>(map: &HashMap<K, V>) -> Vec<(K, &V)> {
    let mut entries: Vec<(K, &V)> = map.iter().map(|(k, v)| (*k, v)).collect();
    entries.sort_unstable_by_key(|(k, _)| *k);
    entries
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn insert_transfer(&mut self, transfer: Transfer) {
        self.transfer_times.insert(transfer.timestamp, transfer.id);
        for field in Field::ALL {
            let value = field.of_transfer(&transfer);
            if value != 0 {
                self.transfer_fields.insert((field, value, transfer.timestamp));
            }
        }
        self.transfers.insert(transfer.id, transfer);
    }

    fn index_new_account(&mut self, account: &Account) {
        self.account_fields.insert((None, 0, account.timestamp, account.id));
        for field in Field::ALL {
            let value = field.of_account(account);
            if value != 0 {
                self.account_fields.insert((Some(field), value, account.timestamp, account.id));
            }
        }
    }

    fn append_index(
        &mut self,
        account_id: u128,
        timestamp: u64,
        transfer_id: u128,
        balance: Option<AccountBalance>,
    ) {
        let list = self.index.entry(account_id).or_default();
        if let Some((last, _)) = list.entries.last() {
            assert!(timestamp > *last, "index of account {account_id} went back in time");
        }
        assert_eq!(list.balances.len() == list.entries.len(), balance.is_some() || list.entries.is_empty());
        list.entries.push((timestamp, transfer_id));
        if let Some(balance) = balance {
            list.balances.push(balance);
        }
    }

    /// `commit`, but for the expiries: the store above keeps them (`checkpoint::Checkpointed`).
    pub(crate) fn commit_without_expiries(&mut self, changes: &Changes) {
        for account in &changes.accounts {
            if account.timestamp > changes.timestamp_before {
                self.index_new_account(account);
            }
            self.accounts.insert(account.id, *account);
        }
        for transfer in &changes.transfers {
            self.insert_transfer(*transfer);
        }
        self.changes.extend(changes.changes.iter().map(|change| (change.timestamp, *change)));
        self.pending.extend(changes.pending.iter().copied());
        self.failed.extend(changes.failed.iter().copied());
        for write in &changes.index {
            self.append_index(write.account_id, write.timestamp, write.transfer_id, write.balance);
        }
        if let Some(app_meta) = &changes.app_meta {
            self.meta.insert(codec::META_APP_KEY.to_vec(), app_meta.clone());
        }
        self.meta.insert(codec::META_LEDGER_KEY.to_vec(), codec::encode_ledger_meta(&changes.meta).to_vec());
    }

    /// Everything this store holds but expiries, as the changes of one commit, for a store whose
    /// state was `timestamp_before` before it (`checkpoint::Checkpointed`).
    pub(crate) fn to_changes(&self, meta: codec::LedgerMeta, timestamp_before: u64) -> Changes {
        let accounts = sorted(&self.accounts).into_iter().map(|(_, account)| *account).collect();
        let pending = sorted(&self.pending).into_iter().map(|(id, status)| (id, *status)).collect();
        let failed = sorted(&self.failed).into_iter().map(|(id, result)| (id, *result)).collect();
        let transfers = self.transfer_times.values().map(|id| self.transfers[id]).collect();
        let mut index = Vec::new();
        for (&account_id, list) in &self.index {
            for (position, (timestamp, transfer_id)) in list.entries.iter().enumerate() {
                let balance = list.balances.get(position).copied();
                index.push(IndexWrite {
                    account_id,
                    timestamp: *timestamp,
                    transfer_id: *transfer_id,
                    balance,
                });
            }
        }
        index.sort_unstable_by_key(|write| (write.timestamp, write.account_id));
        Changes {
            accounts,
            transfers,
            pending,
            expiry_put: BTreeSet::new(),
            expiry_delete: BTreeSet::new(),
            failed,
            index,
            changes: self.changes.values().copied().collect(),
            meta,
            app_meta: self.meta.get(codec::META_APP_KEY).cloned(),
            timestamp_before,
        }
    }
}

impl Store for MemStore {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        Ok(self.accounts.get(&id).copied())
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        Ok(self.transfers.get(&id).copied())
    }

    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
        Ok(self.failed.get(&id).copied())
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        Ok(self.pending.get(&id).copied())
    }

    fn next_expiry(&self) -> StoreResult<Option<u64>> {
        Ok(self.expiries.first().map(|(expires_at, _)| *expires_at))
    }

    fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>> {
        Ok(self.expiries.iter().take(count).copied().collect())
    }

    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
        Ok(self.expiries.range(..=(now, u128::MAX)).copied().collect())
    }

    fn scan_index(
        &self,
        account_id: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> StoreResult<()> {
        let Some(list) = self.index.get(&account_id) else { return Ok(()) };
        let start = list.entries.partition_point(|(timestamp, _)| *timestamp < timestamp_min);
        let end = list.entries.partition_point(|(timestamp, _)| *timestamp <= timestamp_max).max(start);
        let mut visit = |position: usize| visit(list.entries[position].0, &list.encode(position));
        if reversed {
            for position in (start..end).rev() {
                if !visit(position) {
                    break;
                }
            }
        } else {
            for position in start..end {
                if !visit(position) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
        Ok(self.transfer_times.get(&timestamp).map(|id| self.transfers[id]))
    }

    fn scan_transfers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()> {
        let range = self.transfer_times.range(timestamp_min..=timestamp_max.max(timestamp_min));
        let mut visit = |(_, id): (&u64, &u128)| visit(&self.transfers[id]);
        visit_in_order(range, reversed, &mut visit);
        Ok(())
    }

    fn scan_transfer_field(
        &self,
        field: Field,
        value: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(Scanned<'_>) -> bool,
    ) -> StoreResult<()> {
        let range = self
            .transfer_fields
            .range((field, value, timestamp_min)..=(field, value, timestamp_max.max(timestamp_min)));
        let mut visit = |(_, _, timestamp): &(Field, u128, u64)| {
            visit(Scanned::Transfer(&self.transfers[&self.transfer_times[timestamp]]))
        };
        visit_in_order(range, reversed, &mut visit);
        Ok(())
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
        let max = timestamp_max.max(timestamp_min);
        let range =
            self.account_fields.range((field, value, timestamp_min, 0)..=(field, value, max, u128::MAX));
        let mut visit = |(_, _, timestamp, id): &(Option<Field>, u128, u64, u128)| visit(*timestamp, *id);
        visit_in_order(range, reversed, &mut visit);
        Ok(())
    }

    fn scan_changes(
        &self,
        timestamp_min: u64,
        visit: &mut dyn FnMut(&ChangeRecord) -> bool,
    ) -> StoreResult<()> {
        self.changes.range(timestamp_min..).take_while(|(_, change)| visit(change)).for_each(drop);
        Ok(())
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.meta.get(key).cloned())
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        self.commit_without_expiries(changes);
        for key in &changes.expiry_delete {
            assert!(self.expiries.remove(key), "deleted expiry {key:?} was not stored");
        }
        self.expiries.extend(changes.expiry_put.iter().copied());
        Ok(())
    }

    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        // In prefix order: A, C, E, I, M, P, T, X.
        for (id, account) in sorted(&self.accounts) {
            visit(&codec::id_key(PREFIX_ACCOUNT, id), &codec::encode_account(account))?;
        }
        for change in self.changes.values() {
            visit(&codec::change_key(change.timestamp), &codec::encode_change(change))?;
        }
        for (expires_at, id) in &self.expiries {
            visit(&codec::expiry_key(*expires_at, *id), &[])?;
        }
        for (account_id, list) in sorted(&self.index) {
            for (position, (timestamp, _)) in list.entries.iter().enumerate() {
                visit(&codec::index_key(account_id, *timestamp), &list.encode(position))?;
            }
        }
        for (key, value) in &self.meta {
            visit(key, value)?;
        }
        for (id, status) in sorted(&self.pending) {
            visit(&codec::id_key(PREFIX_PENDING, id), &[*status as u8])?;
        }
        let mut transfers: Vec<&Transfer> = self.transfers.values().collect();
        transfers.sort_unstable_by_key(|transfer| transfer.timestamp);
        for transfer in transfers {
            visit(&codec::transfer_key(transfer.timestamp), &codec::encode_transfer(transfer))?;
        }
        for (id, result) in sorted(&self.failed) {
            visit(&codec::id_key(PREFIX_FAILED, id), &codec::encode_failed(*result))?;
        }
        Ok(())
    }

    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        for (key, value) in records {
            put_record(self, key, value)?;
        }
        Ok(())
    }

    fn clear(&mut self) -> StoreResult<()> {
        *self = MemStore::default();
        Ok(())
    }

    fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.accounts.is_empty()
            && self.transfers.is_empty()
            && self.pending.is_empty()
            && self.expiries.is_empty()
            && self.failed.is_empty()
            && self.index.is_empty()
            && self.changes.is_empty()
            && self.meta.is_empty())
    }

    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

fn put_record(store: &mut MemStore, key: &[u8], value: &[u8]) -> StoreResult<()> {
    let corrupt = || StoreError::Corrupt(format!("record with key {key:02x?}"));
    let id = || -> StoreResult<u128> {
        let bytes: [u8; 16] = key.get(1..).and_then(|k| k.try_into().ok()).ok_or_else(corrupt)?;
        Ok(u128::from_be_bytes(bytes))
    };
    match key.first().copied() {
        Some(PREFIX_ACCOUNT) if value.len() == codec::RECORD_BYTES => {
            let account = codec::decode_account(value);
            if account.id != id()? {
                return Err(corrupt());
            }
            store.index_new_account(&account);
            store.accounts.insert(account.id, account);
        }
        Some(PREFIX_TRANSFER) if key.len() == 9 && value.len() == codec::RECORD_BYTES => {
            let transfer = codec::decode_transfer(value);
            if codec::transfer_key(transfer.timestamp) != key {
                return Err(corrupt());
            }
            store.insert_transfer(transfer);
        }
        Some(PREFIX_CHANGE) if key.len() == 9 => {
            let timestamp = u64::from_be_bytes(key[1..].try_into().expect("9-byte key"));
            store.changes.insert(timestamp, codec::decode_change(timestamp, value).ok_or_else(corrupt)?);
        }
        Some(PREFIX_PENDING) if value.len() == 1 => {
            let status = PendingStatus::from_u8(value[0]).ok_or_else(corrupt)?;
            store.pending.insert(id()?, status);
        }
        Some(PREFIX_FAILED) if key.len() == 17 => {
            store.failed.insert(id()?, codec::decode_failed(value).ok_or_else(corrupt)?);
        }
        Some(PREFIX_EXPIRY) if key.len() == 25 && value.is_empty() => {
            store.expiries.insert(codec::decode_expiry_key(key));
        }
        Some(PREFIX_INDEX) if key.len() == 25 && (value.len() == 16 || value.len() == 80) => {
            let (account_id, timestamp) = codec::decode_index_key(key);
            let (transfer_id, balance) = codec::decode_index_value(value, timestamp);
            store.append_index(account_id, timestamp, transfer_id, balance);
        }
        Some(PREFIX_META) => {
            store.meta.insert(key.to_vec(), value.to_vec());
        }
        _ => return Err(corrupt()),
    }
    Ok(())
}
