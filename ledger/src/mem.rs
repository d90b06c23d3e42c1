//! `MemStore`: the state in typed ordered maps, for tests, simulations and benchmarks.
//!
//! It behaves exactly like `SledStore` (same records, same keys in `for_each_record`), which the
//! determinism test checks by comparing exports; it is simply never durable.

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{
    self, PREFIX_ACCOUNT, PREFIX_EXPIRY, PREFIX_INDEX, PREFIX_META, PREFIX_PENDING, PREFIX_TRANSFER,
};
use crate::model::{Account, PendingStatus, Transfer};
use crate::store::{Changes, Store, StoreError, StoreResult};

#[derive(Default, Clone)]
pub struct MemStore {
    accounts: BTreeMap<u128, Account>,
    transfers: BTreeMap<u128, Transfer>,
    pending: BTreeMap<u128, PendingStatus>,
    expiries: BTreeSet<(u64, u128)>,
    /// Index values stay encoded: they are only ever decoded by a query.
    index: BTreeMap<(u128, u64), Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        Ok(self.accounts.get(&id).copied())
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        Ok(self.transfers.get(&id).copied())
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        Ok(self.pending.get(&id).copied())
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
        let range = self
            .index
            .range((account_id, timestamp_min)..=(account_id, timestamp_max));
        let mut visit =
            |((_, timestamp), value): (&(u128, u64), &Vec<u8>)| visit(*timestamp, value);
        if reversed {
            for entry in range.rev() {
                if !visit(entry) {
                    break;
                }
            }
        } else {
            for entry in range {
                if !visit(entry) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.meta.get(key).cloned())
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        self.accounts
            .extend(changes.accounts.iter().map(|(id, account)| (*id, *account)));
        self.transfers.extend(
            changes
                .transfers
                .iter()
                .map(|(id, transfer)| (*id, *transfer)),
        );
        self.pending
            .extend(changes.pending.iter().map(|(id, status)| (*id, *status)));
        for key in &changes.expiry_delete {
            assert!(
                self.expiries.remove(key),
                "deleted expiry {key:?} was not stored"
            );
        }
        self.expiries.extend(changes.expiry_put.iter().copied());
        for (key, (transfer_id, balance)) in &changes.index {
            self.index.insert(
                *key,
                codec::encode_index_value(*transfer_id, balance.as_ref()),
            );
        }
        if let Some(app_meta) = &changes.app_meta {
            self.meta
                .insert(codec::META_APP_KEY.to_vec(), app_meta.clone());
        }
        self.meta.insert(
            codec::META_LEDGER_KEY.to_vec(),
            codec::encode_ledger_meta(&changes.meta).to_vec(),
        );
        Ok(())
    }

    fn for_each_record(
        &self,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> StoreResult<()>,
    ) -> StoreResult<()> {
        // In prefix order: A, E, I, M, P, T.
        for account in self.accounts.values() {
            visit(
                &codec::id_key(PREFIX_ACCOUNT, account.id),
                &codec::encode_account(account),
            )?;
        }
        for (expires_at, id) in &self.expiries {
            visit(&codec::expiry_key(*expires_at, *id), &[])?;
        }
        for ((account_id, timestamp), value) in &self.index {
            visit(&codec::index_key(*account_id, *timestamp), value)?;
        }
        for (key, value) in &self.meta {
            visit(key, value)?;
        }
        for (id, status) in &self.pending {
            visit(&codec::id_key(PREFIX_PENDING, *id), &[*status as u8])?;
        }
        for transfer in self.transfers.values() {
            visit(
                &codec::id_key(PREFIX_TRANSFER, transfer.id),
                &codec::encode_transfer(transfer),
            )?;
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
            && self.index.is_empty()
            && self.meta.is_empty())
    }

    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

fn put_record(store: &mut MemStore, key: &[u8], value: &[u8]) -> StoreResult<()> {
    let corrupt = || StoreError::Corrupt(format!("record with key {key:02x?}"));
    let id = || -> StoreResult<u128> {
        let bytes: [u8; 16] = key
            .get(1..)
            .and_then(|k| k.try_into().ok())
            .ok_or_else(corrupt)?;
        Ok(u128::from_be_bytes(bytes))
    };
    match key.first().copied() {
        Some(PREFIX_ACCOUNT) if value.len() == codec::RECORD_BYTES => {
            store.accounts.insert(id()?, codec::decode_account(value));
        }
        Some(PREFIX_TRANSFER) if value.len() == codec::RECORD_BYTES => {
            store.transfers.insert(id()?, codec::decode_transfer(value));
        }
        Some(PREFIX_PENDING) if value.len() == 1 => {
            let status = PendingStatus::from_u8(value[0]).ok_or_else(corrupt)?;
            store.pending.insert(id()?, status);
        }
        Some(PREFIX_EXPIRY) if key.len() == 25 && value.is_empty() => {
            store.expiries.insert(codec::decode_expiry_key(key));
        }
        Some(PREFIX_INDEX) if key.len() == 25 && (value.len() == 16 || value.len() == 80) => {
            store
                .index
                .insert(codec::decode_index_key(key), value.to_vec());
        }
        Some(PREFIX_META) => {
            store.meta.insert(key.to_vec(), value.to_vec());
        }
        _ => return Err(corrupt()),
    }
    Ok(())
}
