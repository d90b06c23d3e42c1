//! Snapshot import into a `RunStore`.

use std::sync::Arc;

use super::fields::Indexer;
use super::layout::Runs;
use super::pages::Batch;
use super::runs::{Kind, RunBuilder, Writes};
use super::{CHUNK_TRANSFERS, Inner, chunk_key, next_run};
use ledger::codec::{
    self, PREFIX_ACCOUNT, PREFIX_CHANGE, PREFIX_EXPIRY, PREFIX_FAILED, PREFIX_INDEX, PREFIX_META,
    PREFIX_PENDING, PREFIX_TRANSFER,
};
use ledger::model::PendingStatus;
use ledger::store::{StoreError, StoreResult};

/// An import cuts its sorted input into runs of at most this many entries, which bounds the
/// memory of a run's filter while it is built.
const IMPORT_RUN_ENTRIES: u64 = 4 << 20;

/// A snapshot import in progress: records arrive in logical key order (`A`, `C`, `E`, `I`, `P`,
/// `T`, `X`; the meta is written last); sorted sections become runs directly, transfers become chunks, and their
/// ids are sorted a million at a time into runs of their own, as are the query index entries of
/// transfers and accounts (`fields::Indexer`). Merges fold the runs later.
#[derive(Default)]
pub(super) struct Import {
    accounts: Option<RunBuilder>,
    index: Option<RunBuilder>,
    ids: Vec<(u128, u64)>,
    chunk: Vec<u8>,
    /// Change records of the chunk being gathered, and the last one written.
    changes: Vec<ledger::model::ChangeRecord>,
    changes_last: Option<u64>,
    runs: Runs,
    writes: Writes,
    /// The query indexes, built from the accounts and transfers as they arrive.
    fields: Indexer,
    pub(super) finished: bool,
}

const IMPORT_IDS_SORTED: usize = 1 << 20;

impl Import {
    pub(super) fn put(
        &mut self,
        inner: &Inner,
        key: &[u8],
        value: &[u8],
        batch: &mut Batch,
    ) -> StoreResult<()> {
        let corrupt = || StoreError::Corrupt(format!("snapshot record with key {key:02x?}"));
        match key.first().copied() {
            Some(PREFIX_ACCOUNT) if key.len() == 17 && value.len() == codec::RECORD_BYTES => {
                self.push(inner, Kind::Accounts, &key[1..], value)?;
                self.fields.add_account(
                    inner,
                    codec::decode_account(value),
                    &mut self.runs,
                    &mut self.writes,
                );
            }
            Some(PREFIX_INDEX) if key.len() == 25 && (value.len() == 16 || value.len() == 80) => {
                self.push(inner, Kind::Index, &key[1..], value)?;
            }
            Some(PREFIX_CHANGE) if key.len() == 9 => {
                let timestamp = u64::from_be_bytes(key[1..].try_into().expect("9-byte key"));
                let change = codec::decode_change(timestamp, value).ok_or_else(corrupt)?;
                if self.changes.last().is_some_and(|last| last.timestamp >= timestamp)
                    || self.changes_last.is_some_and(|last| last >= timestamp)
                {
                    return Err(corrupt());
                }
                self.changes.push(change);
                if self.changes.len() == CHUNK_TRANSFERS {
                    self.write_changes();
                }
            }
            Some(PREFIX_EXPIRY) if key.len() == 25 && value.is_empty() => batch.insert(key, value),
            Some(PREFIX_FAILED) if key.len() == 17 => {
                let result = codec::decode_failed(value).ok_or_else(corrupt)?;
                batch.insert(key, value);
                let id = u128::from_be_bytes(key[1..].try_into().expect("17-byte key"));
                self.ids.push((id, super::FAILED_MARK | result as u64));
                if self.ids.len() == IMPORT_IDS_SORTED {
                    self.write_ids(inner);
                }
            }
            Some(PREFIX_PENDING) if key.len() == 17 && value.len() == 1 => {
                PendingStatus::from_u8(value[0]).ok_or_else(corrupt)?;
                batch.insert(key, value);
            }
            Some(PREFIX_META) if self.finished => batch.insert(key, value),
            Some(PREFIX_TRANSFER) if key.len() == 9 && value.len() == codec::RECORD_BYTES => {
                let transfer = codec::decode_transfer(value);
                if codec::transfer_key(transfer.timestamp) != key {
                    return Err(corrupt());
                }
                if let Some(last) = self.chunk.rchunks_exact(codec::RECORD_BYTES).next()
                    && codec::decode_transfer(last).timestamp >= transfer.timestamp
                {
                    return Err(corrupt());
                }
                self.chunk.extend_from_slice(value);
                if self.chunk.len() == CHUNK_TRANSFERS * codec::RECORD_BYTES {
                    self.write_chunk();
                }
                self.ids.push((transfer.id, transfer.timestamp));
                self.fields.add_transfer(inner, transfer, &mut self.runs, &mut self.writes);
                if self.ids.len() == IMPORT_IDS_SORTED {
                    self.write_ids(inner);
                }
            }
            _ => return Err(corrupt()),
        }
        Ok(())
    }

    /// The run being built for a kind that arrives sorted.
    fn builder(&mut self, kind: Kind) -> &mut Option<RunBuilder> {
        if kind == Kind::Accounts { &mut self.accounts } else { &mut self.index }
    }

    fn push(&mut self, inner: &Inner, kind: Kind, key: &[u8], value: &[u8]) -> StoreResult<()> {
        if self.builder(kind).as_ref().is_some_and(|builder| builder.entries() >= IMPORT_RUN_ENTRIES) {
            let full = self.builder(kind).take().unwrap();
            self.runs.kinds[kind as usize]
                .extend(full.finish(&mut self.writes, &inner.descriptions).map(Arc::new));
        }
        let last = self.runs.of(kind).last().map(|run| run.last_key().to_vec());
        let writes = &mut self.writes;
        let builder = if kind == Kind::Accounts { &mut self.accounts } else { &mut self.index }
            .get_or_insert_with(|| RunBuilder::new(kind, next_run(inner), IMPORT_RUN_ENTRIES));
        if !builder.accepts(key) || last.is_some_and(|last| builder.entries() == 0 && key <= last.as_slice())
        {
            return Err(StoreError::Corrupt("snapshot records out of order".into()));
        }
        builder.push(key, value, writes);
        Ok(())
    }

    fn write_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let transfers: Vec<_> =
            self.chunk.chunks_exact(codec::RECORD_BYTES).map(codec::decode_transfer).collect();
        let first = transfers[0].timestamp;
        self.writes.push((super::fields::zone_key(first).to_vec(), super::fields::zone_of(&transfers)));
        self.writes.push((chunk_key(first).to_vec(), std::mem::take(&mut self.chunk)));
    }

    fn write_changes(&mut self) {
        let Some(last) = self.changes.last() else { return };
        self.changes_last = Some(last.timestamp);
        let key = codec::change_key(self.changes[0].timestamp).to_vec();
        self.writes.push((key, super::encode_change_chunk(&self.changes)));
        self.changes.clear();
    }

    fn write_ids(&mut self, inner: &Inner) {
        if self.ids.is_empty() {
            return;
        }
        self.ids.sort_unstable();
        let mut builder = RunBuilder::new(Kind::Ids, next_run(inner), self.ids.len() as u64);
        for (id, timestamp) in self.ids.drain(..) {
            builder.push(&id.to_be_bytes(), &timestamp.to_le_bytes(), &mut self.writes);
        }
        self.runs.kinds[Kind::Ids as usize]
            .extend(builder.finish(&mut self.writes, &inner.descriptions).map(Arc::new));
    }

    pub(super) fn flush(&mut self, inner: &Inner) -> StoreResult<()> {
        if !self.writes.is_empty() {
            inner.write_pages(&mut self.writes)?;
        }
        Ok(())
    }

    /// Writes what is left and the layout naming the imported runs.
    pub(super) fn finish(&mut self, inner: &Inner) -> StoreResult<()> {
        for kind in [Kind::Accounts, Kind::Index] {
            if let Some(builder) = self.builder(kind).take() {
                self.runs.kinds[kind as usize]
                    .extend(builder.finish(&mut self.writes, &inner.descriptions).map(Arc::new));
            }
        }
        self.write_chunk();
        self.write_changes();
        self.write_ids(inner);
        self.fields.finish(inner, &mut self.runs, &mut self.writes);
        self.finished = true;
        let layout = inner.layout.lock().unwrap();
        let writes = std::mem::take(&mut self.writes);
        // Taken, not cloned: a run this holds could never be deleted after a merge.
        inner.write_layout(&layout, std::mem::take(&mut self.runs), writes, Batch::default())
    }
}
