//! `Checkpointed`: a store whose commits are memory work, and whose state reaches the durable
//! store underneath in checkpoints (DESIGN.md decision 15).
//!
//! A node makes a write durable in its Raft log, not in its state store: after a crash it
//! re-applies the log from the last entry its store holds. So applying an entry need not touch
//! the store at all. `commit` adds a small entry's changes to `recent`, a `MemStore` of what was
//! applied since the last checkpoint; `seal` hands all of it to a `CheckpointJob`, which another
//! thread writes to the store underneath in one atomic commit (with the applied marker of the
//! newest entry in it) while applying goes on into a new `recent`. One payment then pays for a
//! few map inserts, and the store's fixed cost per commit (its runs, its atomic batch, its IO
//! threads) is paid once per checkpoint instead of once per entry. An entry of many records
//! (a full batch) already amortizes that cost, and would only pay for the copy: it is committed
//! to the store directly, and made durable (an fsync) by the next checkpoint or flush job, not one
//! fsync each. Only when that waits for nothing, though: with a job running, or the store busy
//! with work of its own (a merge's durable write), a full batch goes to memory like any entry;
//! with the store free, what waits in memory is committed first, the same way. Applying then
//! waits for the disk only when memory is full (the caller's bound), never for a durable write
//! of seconds (issue 24).
//!
//! Reads see `recent` over the sealed layers (checkpoints being written) over the store: a point
//! lookup asks the newest layer first; every record keyed by time (transfers, index entries,
//! change records, the query indexes) is newer in a newer layer, because ledger time only grows,
//! so a scan is each layer's part in turn, each cut at the time where the next one starts.
//! Expiries are the one set whose members go away: a layer keeps the ones it added and the ones
//! of the layers below that it removed.
//!
//! A snapshot or a backup reads the whole state while applying goes on: `freeze` seals what is in
//! memory (queued behind a job under way, so nothing waits for the disk) and hands out the layers
//! in memory, to read over a frozen view of the store underneath.
//!
//! `ledger` owns no thread and no clock: when to seal and where a job runs is the caller's
//! choice (the node: by bytes and by time, on a thread of its own).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use crate::codec::{self, LedgerMeta};
use crate::mem::MemStore;
use crate::model::{Account, ChangeRecord, CreateTransferResult, Field, PendingStatus, Transfer};
use crate::store::{Changes, RecordVisitor, Scanned, SharedStore, Store, StoreError, StoreResult};

/// Memory one record of each kind takes in `recent`, roughly (the record, its map entries and
/// its query index entries): what `recent_bytes` counts.
const ACCOUNT_BYTES: u64 = 256;
const TRANSFER_BYTES: u64 = 320;
const INDEX_BYTES: u64 = 64;
const CHANGE_BYTES: u64 = 160;
const SMALL_BYTES: u64 = 64;
/// An entry that writes at least this many accounts and transfers is committed to the store
/// directly: a batch of this size already spreads the store's fixed cost per commit thin, and
/// going through memory first cost a full batch 30% of its throughput.
pub const DIRECT_RECORDS_MIN: usize = 1024;
/// What waits in memory is written ahead of a full batch, on the applying thread, only up to
/// this much (`recent_bytes`); more (a long checkpoint's worth) is sealed for the checkpoint
/// thread instead, and the batch waits in memory behind it.
pub const RECENT_INLINE_BYTES_MAX: u64 = 8 << 20;

/// What was applied since one checkpoint: one layer over the store.
#[derive(Default)]
struct Layer {
    /// Every record but expiries (`MemStore` keeps a plain set of them, which cannot say that a
    /// key of a layer below is gone).
    store: MemStore,
    /// Expiries this layer added and still has.
    expiry_put: BTreeSet<(u64, u128)>,
    /// Expiries of the layers below that this one removed.
    expiry_deleted: BTreeSet<(u64, u128)>,
    /// The ledger's meta after the newest commit, and the newest application meta.
    meta: Option<LedgerMeta>,
    app_meta: Option<Vec<u8>>,
    /// The ledger's last timestamp before the first commit: every time-keyed record after it is
    /// in this layer or a newer one, none before it.
    timestamp_before: u64,
    bytes: u64,
    commits: u64,
}

impl Layer {
    fn absorb(&mut self, changes: &Changes) {
        if self.commits == 0 {
            self.timestamp_before = changes.timestamp_before;
        }
        self.store.commit_without_expiries(changes);
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
        self.bytes += changes.accounts.len() as u64 * ACCOUNT_BYTES
            + changes.transfers.len() as u64 * TRANSFER_BYTES
            + changes.index.len() as u64 * INDEX_BYTES
            + changes.changes.len() as u64 * CHANGE_BYTES
            + (changes.pending.len()
                + changes.failed.len()
                + changes.expiry_put.len()
                + changes.expiry_delete.len()) as u64
                * SMALL_BYTES
            + SMALL_BYTES;
        self.commits += 1;
    }

    /// All of this layer as the changes of one commit.
    fn to_changes(&self) -> Changes {
        let meta = self.meta.expect("a layer with commits");
        let mut changes = self.store.to_changes(meta, self.timestamp_before);
        changes.expiry_put = self.expiry_put.clone();
        changes.expiry_delete = self.expiry_deleted.clone();
        changes.app_meta = self.app_meta.clone();
        changes
    }
}

/// A layer handed to a `CheckpointJob`: read by the store's readers until the job is done.
struct Sealed {
    layer: Layer,
    /// The job's outcome once it ran (or was dropped without running).
    outcome: Mutex<Option<Result<(), Failed>>>,
    finished: Condvar,
}

/// Why a checkpoint was not written, kept so that every later commit reports it alike.
#[derive(Clone)]
struct Failed {
    /// The stored bytes are damaged (`StoreError::is_damage`): the node rebuilds its state.
    damage: bool,
    what: String,
}

impl Failed {
    fn error(&self) -> StoreError {
        let what = format!("checkpoint: {}", self.what);
        if self.damage { StoreError::Corrupt(what) } else { StoreError::Io(std::io::Error::other(what)) }
    }
}

impl Sealed {
    fn finish(&self, outcome: Result<(), Failed>) {
        let mut slot = self.outcome.lock().unwrap();
        if slot.is_none() {
            *slot = Some(outcome);
            self.finished.notify_all();
        }
    }

    /// The outcome, waiting for it if `wait`, else `None` while the job runs.
    fn outcome(&self, wait: bool) -> Option<Result<(), Failed>> {
        let mut slot = self.outcome.lock().unwrap();
        while wait && slot.is_none() {
            slot = self.finished.wait(slot).unwrap();
        }
        slot.clone()
    }
}

/// A checkpoint to write: `run` it on any thread. Dropped without running, it fails, and the
/// store it came from reports that at its next commit.
pub struct CheckpointJob<S> {
    base: Arc<S>,
    sealed: Arc<Sealed>,
}

impl<S: SharedStore> CheckpointJob<S> {
    /// Entries the checkpoint carries.
    pub fn commits(&self) -> u64 {
        self.sealed.layer.commits
    }

    /// Writes the checkpoint to the store, in one atomic commit, and makes it durable with every
    /// commit before it. A job with no commits (`seal` with only direct commits to make durable)
    /// only flushes.
    pub fn run(self) -> StoreResult<()> {
        let layer = &self.sealed.layer;
        let written = match layer.commits {
            0 => self.base.flush(),
            _ => self.base.commit_shared(&layer.to_changes()).and_then(|()| self.base.flush()),
        };
        let failed = |error: &StoreError| Failed { damage: error.is_damage(), what: error.to_string() };
        self.sealed.finish(written.as_ref().map(|_| ()).map_err(failed));
        written
    }
}

impl<S> Drop for CheckpointJob<S> {
    fn drop(&mut self) {
        let what = "the checkpoint was dropped before it was written".into();
        self.sealed.finish(Err(Failed { damage: false, what }));
    }
}

pub struct Checkpointed<S: SharedStore> {
    /// Shared with a `CheckpointJob` while one runs.
    base: Arc<S>,
    /// Layers handed to jobs and not seen written yet, oldest first: one from `seal`, and one
    /// more from `freeze` while that one's job runs.
    sealed: VecDeque<Arc<Sealed>>,
    recent: Layer,
    /// Entries committed to the store directly since its last flush: not durable yet.
    unsynced: bool,
}

impl<S: SharedStore> Checkpointed<S> {
    pub fn new(base: S) -> Checkpointed<S> {
        Checkpointed {
            base: Arc::new(base),
            sealed: VecDeque::new(),
            recent: Layer::default(),
            unsynced: false,
        }
    }

    /// Whether entries committed to the store directly wait for a flush to be durable (the next
    /// checkpoint's).
    pub fn needs_sync(&self) -> bool {
        self.unsynced
    }

    /// Makes what was committed to the store directly durable, here and now (a checkpoint does it
    /// as well, for everything before it).
    fn sync(&mut self) -> StoreResult<()> {
        self.base.flush()?;
        self.unsynced = false;
        Ok(())
    }

    /// The durable store underneath: as of the last checkpoint once `checkpoint` returned.
    pub fn base(&self) -> &S {
        &self.base
    }

    /// The store underneath, once everything was checkpointed.
    pub fn into_base(mut self) -> StoreResult<S> {
        self.checkpoint()?;
        let base = self.base.clone();
        drop(self);
        Ok(Arc::try_unwrap(base).unwrap_or_else(|_| panic!("a checkpoint job outlived its store")))
    }

    /// Memory held by commits since the last seal, roughly.
    pub fn recent_bytes(&self) -> u64 {
        self.recent.bytes
    }

    /// Commits since the last seal.
    pub fn recent_commits(&self) -> u64 {
        self.recent.commits
    }

    /// Whether a sealed checkpoint has not been seen written yet.
    pub fn checkpoint_in_flight(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// Hands what was applied since the last seal to a job that writes it, for another thread,
    /// or, with nothing in memory but direct commits not yet durable, a job that only flushes (a
    /// flush takes seconds at times: it must not hold up applying); `None` when there is nothing
    /// to do, or while the previous job runs (call again later). An error is a previous job's.
    pub fn seal(&mut self) -> StoreResult<Option<CheckpointJob<S>>> {
        if !self.retire(false)? {
            return Ok(None);
        }
        Ok(self.seal_recent())
    }

    /// A job for what `recent` holds and the direct commits not yet durable, queued behind the
    /// jobs that were not seen written yet; `None` with nothing to write or flush.
    fn seal_recent(&mut self) -> Option<CheckpointJob<S>> {
        if self.recent.commits == 0 && !self.unsynced {
            return None;
        }
        let sealed = Arc::new(Sealed {
            layer: std::mem::take(&mut self.recent),
            outcome: Mutex::new(None),
            finished: Condvar::new(),
        });
        self.sealed.push_back(sealed.clone());
        // The job's flush covers the direct commits before it; if it fails, every later commit
        // fails with it.
        self.unsynced = false;
        Some(CheckpointJob { base: self.base.clone(), sealed })
    }

    /// Freezes the layers in memory as they are now, for a view of the whole state (a snapshot, a
    /// backup) that applying goes on beside: freeze the store underneath in the same breath, and
    /// read the two together (`FrozenLayers::over`). What `recent` holds is sealed for a job of
    /// its own, returned to be run after the ones before it (on the checkpoint thread, in order),
    /// even while one runs: the caller waits for no disk. Once `FrozenLayers::written` returns,
    /// everything committed before the freeze is durable in the store underneath. An error is a
    /// previous job's.
    pub fn freeze(&mut self) -> StoreResult<(FrozenLayers, Option<CheckpointJob<S>>)> {
        self.retire(false)?;
        let job = self.seal_recent();
        Ok((FrozenLayers { sealed: self.sealed.iter().cloned().collect() }, job))
    }

    /// Writes everything committed so far to the store underneath, durably, here and now: waits
    /// for a job that runs, then writes the rest. Returns how many commits it wrote itself.
    pub fn checkpoint(&mut self) -> StoreResult<u64> {
        let commits = self.write_layers()?;
        if self.unsynced {
            self.sync()?;
        }
        Ok(commits)
    }

    /// `checkpoint` that leaves direct commits before it as they are (durable or not): a job
    /// that runs is waited for, and the rest of memory written and flushed.
    fn write_layers(&mut self) -> StoreResult<u64> {
        self.retire(true)?;
        if self.recent.commits == 0 {
            return Ok(0);
        }
        match self.seal()? {
            Some(job) => {
                let commits = job.commits();
                job.run()?;
                self.retire(true)?;
                Ok(commits)
            }
            None => Ok(0),
        }
    }

    /// Drops the sealed layers whose jobs are done, oldest first (waiting for each if `wait`);
    /// whether none is left. A job that failed fails the store from then on.
    fn retire(&mut self, wait: bool) -> StoreResult<bool> {
        while let Some(sealed) = self.sealed.front() {
            match sealed.outcome(wait) {
                None => return Ok(false),
                Some(Ok(())) => self.sealed.pop_front(),
                Some(Err(failed)) => return Err(failed.error()),
            };
        }
        Ok(true)
    }

    /// The layers over the store, oldest first, each with the time its successor starts at.
    fn layers(&self) -> Vec<(&Layer, u64)> {
        cut_layers(self.sealed.iter().map(|sealed| &sealed.layer).chain([&self.recent]))
    }

    /// The first point lookup that finds something, newest layer first.
    fn lookup<T>(&self, find: impl Fn(&dyn Store) -> StoreResult<Option<T>>) -> StoreResult<Option<T>> {
        if let Some(found) = find(&self.recent.store)? {
            return Ok(Some(found));
        }
        for sealed in self.sealed.iter().rev() {
            if let Some(found) = find(&sealed.layer.store)? {
                return Ok(Some(found));
            }
        }
        find(&*self.base)
    }

    /// Runs `scan` over the store and each layer in time order (or reversed), each with the
    /// highest timestamp it may give (`timestamp_max` or where the next layer starts), until one
    /// stops: sets the flag it gets.
    fn scan_layers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        mut scan: impl FnMut(&dyn Store, u64, &mut bool) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let layers = self.layers();
        let base_cut = layers.first().map_or(u64::MAX, |(layer, _)| layer.timestamp_before);
        let mut parts: Vec<(&dyn Store, u64)> = vec![(&*self.base, base_cut)];
        parts.extend(layers.iter().map(|(layer, cut)| (&layer.store as &dyn Store, *cut)));
        if reversed {
            parts.reverse();
        }
        let mut stopped = false;
        for (store, cut) in parts {
            let max = timestamp_max.min(cut);
            if timestamp_min <= max {
                scan(store, max, &mut stopped)?;
            }
            if stopped {
                break;
            }
        }
        Ok(())
    }

    /// Expiries the layers removed from the ones below them.
    fn hidden_expiries(&self) -> usize {
        self.layers().iter().map(|(layer, _)| layer.expiry_deleted.len()).sum()
    }

    /// Whether none of `layers` removed this expiry.
    fn expiry_visible(&self, key: &(u64, u128), layers: &[(&Layer, u64)]) -> bool {
        layers.iter().all(|(layer, _)| !layer.expiry_deleted.contains(key))
    }

    /// Expiries of every layer up to `bound` (`None`: all), visible ones only, each up to
    /// `count` (or all) from the start, sorted and without duplicates.
    fn visible_expiries(&self, bound: Option<u64>, count: Option<usize>) -> StoreResult<Vec<(u64, u128)>> {
        let layers = self.layers();
        let take = count.map(|count| count + self.hidden_expiries());
        let mut found = match (bound, take) {
            (Some(now), _) => self.base.expiries_due(now)?,
            (None, Some(take)) => self.base.first_expiries(take)?,
            (None, None) => unreachable!("a bound or a count"),
        };
        found.retain(|key| self.expiry_visible(key, &layers));
        for (position, (layer, _)) in layers.iter().enumerate() {
            let newer = &layers[position + 1..];
            let range = layer.expiry_put.range(..=(bound.unwrap_or(u64::MAX), u128::MAX));
            let puts = range.filter(|key| self.expiry_visible(key, newer));
            found.extend(puts.take(take.unwrap_or(usize::MAX)));
        }
        found.sort_unstable();
        found.dedup();
        if let Some(count) = count {
            found.truncate(count);
        }
        Ok(found)
    }
}

/// The layers with commits among `layers` (oldest first), each with the time its successor
/// starts at.
fn cut_layers<'a>(layers: impl Iterator<Item = &'a Layer>) -> Vec<(&'a Layer, u64)> {
    // A flush's job holds no layer.
    let layers: Vec<&Layer> = layers.filter(|layer| layer.commits > 0).collect();
    let mut cut = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let next = layers.get(i + 1).map_or(u64::MAX, |next| next.timestamp_before);
        cut.push((*layer, next));
    }
    cut
}

/// The records of `base` with those of `layers` (oldest first) over them, in key order. Reads
/// the layers whole into memory first (bounded by the checkpoint size). A layer whose job has
/// written it to `base` already changes nothing: it puts the same values again.
fn for_each_overlaid(
    layers: &[(&Layer, u64)],
    base: &dyn crate::store::Records,
    visit: &mut RecordVisitor,
) -> StoreResult<()> {
    // Each layer's writes over the older ones': a value, or `None` for a removed expiry.
    let mut newer: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for (layer, _) in layers {
        for (at, id) in &layer.expiry_deleted {
            newer.insert(codec::expiry_key(*at, *id).to_vec(), None);
        }
        for (at, id) in &layer.expiry_put {
            newer.insert(codec::expiry_key(*at, *id).to_vec(), Some(Vec::new()));
        }
        Store::for_each_record(&layer.store, &mut |key, value| {
            newer.insert(key.to_vec(), Some(value.to_vec()));
            Ok(())
        })?;
    }
    let mut newer = newer.into_iter().peekable();
    base.for_each_record(&mut |key, value| {
        while let Some((newer_key, newer_value)) = newer.next_if(|(newer_key, _)| newer_key.as_slice() <= key)
        {
            if let Some(newer_value) = &newer_value {
                visit(&newer_key, newer_value)?;
            }
            if newer_key == key {
                return Ok(());
            }
        }
        visit(key, value)
    })?;
    for (key, value) in newer {
        if let Some(value) = value {
            visit(&key, &value)?;
        }
    }
    Ok(())
}

/// The layers in memory as `Checkpointed::freeze` found them: they change no more, and the
/// checkpoint jobs that write them hold them too.
pub struct FrozenLayers {
    sealed: Vec<Arc<Sealed>>,
}

impl FrozenLayers {
    /// The whole state as of the freeze: these layers over `base`, a view of the store underneath
    /// frozen at the same moment.
    pub fn over<'a, R: crate::store::Records>(&'a self, base: &'a R) -> Overlaid<'a, R> {
        Overlaid { layers: self, base }
    }

    /// Waits until the jobs of these layers are done: everything committed before the freeze is
    /// then durable in the store underneath. An error is a job's.
    pub fn written(&self) -> StoreResult<()> {
        for sealed in &self.sealed {
            if let Err(failed) = sealed.outcome(true).expect("waited for") {
                return Err(failed.error());
            }
        }
        Ok(())
    }
}

/// Frozen layers over a frozen store (`FrozenLayers::over`).
pub struct Overlaid<'a, R> {
    layers: &'a FrozenLayers,
    base: &'a R,
}

impl<R: crate::store::Records> crate::store::Records for Overlaid<'_, R> {
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        let layers = cut_layers(self.layers.sealed.iter().map(|sealed| &sealed.layer));
        for_each_overlaid(&layers, self.base, visit)
    }
}

impl<S: SharedStore> Drop for Checkpointed<S> {
    /// Waits for a job that runs: it holds the store, which holds its file.
    fn drop(&mut self) {
        for sealed in &self.sealed {
            sealed.outcome(true);
        }
    }
}

impl<S: SharedStore> Store for Checkpointed<S> {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        self.lookup(|store| store.account(id))
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        self.lookup(|store| store.transfer(id))
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        self.lookup(|store| store.pending_status(id))
    }

    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
        self.lookup(|store| store.failed_transfer(id))
    }

    fn next_expiry(&self) -> StoreResult<Option<u64>> {
        Ok(self.visible_expiries(None, Some(1))?.first().map(|(expires_at, _)| *expires_at))
    }

    fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>> {
        self.visible_expiries(None, Some(count))
    }

    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
        self.visible_expiries(Some(now), None)
    }

    fn scan_index(
        &self,
        account_id: u128,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> StoreResult<()> {
        self.scan_layers(timestamp_min, timestamp_max, reversed, |store, max, stopped| {
            store.scan_index(account_id, timestamp_min, max, reversed, &mut |timestamp, value| {
                let go = visit(timestamp, value);
                *stopped |= !go;
                go
            })
        })
    }

    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
        self.lookup(|store| store.transfer_at(timestamp))
    }

    fn scan_transfers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()> {
        self.scan_layers(timestamp_min, timestamp_max, reversed, |store, max, stopped| {
            store.scan_transfers(timestamp_min, max, reversed, &mut |transfer| {
                let go = visit(transfer);
                *stopped |= !go;
                go
            })
        })
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
        self.scan_layers(timestamp_min, timestamp_max, reversed, |store, max, stopped| {
            store.scan_transfer_field(field, value, timestamp_min, max, reversed, &mut |transfer| {
                let go = visit(transfer);
                *stopped |= !go;
                go
            })
        })
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
        self.scan_layers(timestamp_min, timestamp_max, reversed, |store, max, stopped| {
            store.scan_account_field(field, value, timestamp_min, max, reversed, &mut |timestamp, id| {
                let go = visit(timestamp, id);
                *stopped |= !go;
                go
            })
        })
    }

    fn scan_changes(
        &self,
        timestamp_min: u64,
        visit: &mut dyn FnMut(&ChangeRecord) -> bool,
    ) -> StoreResult<()> {
        self.scan_layers(timestamp_min, u64::MAX, false, |store, max, stopped| {
            store.scan_changes(timestamp_min, &mut |change| {
                // Past the cut, the next layer has it (the store may hold a sealed layer already
                // written): this part ends, the scan goes on.
                if change.timestamp > max {
                    return false;
                }
                let go = visit(change);
                *stopped |= !go;
                go
            })
        })
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.lookup(|store| store.meta_raw(key))
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        // Directly only when the store takes it at once: not while a job runs (it holds the
        // store's write lock through its flush), nor while the store is busy. What waits in
        // memory goes first, in the same way (not durably: the next flush covers both), if it is
        // small: a large layer is the checkpoint thread's work (`seal`).
        let job_runs = !self.retire(false)?;
        if !job_runs
            && self.recent.bytes <= RECENT_INLINE_BYTES_MAX
            && changes.accounts.len() + changes.transfers.len() >= DIRECT_RECORDS_MIN
        {
            if self.recent.commits > 0 && self.base.try_commit_shared(&self.recent.to_changes())? {
                self.recent = Layer::default();
                self.unsynced = true;
            }
            if self.recent.commits == 0 && self.base.try_commit_shared(changes)? {
                self.unsynced = true;
                return Ok(());
            }
        }
        self.recent.absorb(changes);
        Ok(())
    }

    /// The store's records with the layers' over them, in key order. Reads the layers whole into
    /// memory first (bounded by the checkpoint size).
    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        for_each_overlaid(&self.layers(), &*self.base, visit)
    }

    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        assert!(
            self.sealed.is_empty() && self.recent.commits == 0,
            "an import into a store with commits in memory"
        );
        Arc::get_mut(&mut self.base).expect("no checkpoint job").put_records(records)
    }

    fn clear(&mut self) -> StoreResult<()> {
        self.retire(true)?;
        self.recent = Layer::default();
        Arc::get_mut(&mut self.base).expect("no checkpoint job").clear()
    }

    fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.layers().is_empty() && self.base.is_empty()?)
    }

    /// Makes the store underneath durable: everything up to the last checkpoint written.
    fn flush(&self) -> StoreResult<()> {
        self.base.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::exec::Ledger;
    use crate::model::{AccountFlags, Batch};

    /// A store in memory whose shared commits fail with damage on demand, and which counts its
    /// commits and how many of them its last flush made durable.
    #[derive(Default)]
    struct Failing {
        inner: Mutex<MemStore>,
        damaged: AtomicBool,
        /// Busy with work of its own: `try_commit_shared` declines.
        busy: AtomicBool,
        commits: AtomicU64,
        durable: AtomicU64,
    }

    impl SharedStore for Failing {
        fn commit_shared(&self, changes: &Changes) -> StoreResult<()> {
            if self.damaged.load(Ordering::Relaxed) {
                return Err(StoreError::Corrupt("a checksum does not match".into()));
            }
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.inner.lock().unwrap().commit(changes)
        }

        fn try_commit_shared(&self, changes: &Changes) -> StoreResult<bool> {
            if self.busy.load(Ordering::Relaxed) {
                return Ok(false);
            }
            self.commit_shared(changes).map(|()| true)
        }
    }

    /// Only what these tests read.
    impl Store for Failing {
        fn account(&self, id: u128) -> StoreResult<Option<Account>> {
            self.inner.lock().unwrap().account(id)
        }
        fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
            self.inner.lock().unwrap().transfer(id)
        }
        fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
            self.inner.lock().unwrap().pending_status(id)
        }
        fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
            self.inner.lock().unwrap().failed_transfer(id)
        }
        fn next_expiry(&self) -> StoreResult<Option<u64>> {
            self.inner.lock().unwrap().next_expiry()
        }
        fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>> {
            self.inner.lock().unwrap().first_expiries(count)
        }
        fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
            self.inner.lock().unwrap().expiries_due(now)
        }
        fn scan_index(
            &self,
            _: u128,
            _: u64,
            _: u64,
            _: bool,
            _: &mut dyn FnMut(u64, &[u8]) -> bool,
        ) -> StoreResult<()> {
            unreachable!("not read here")
        }
        fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
            self.inner.lock().unwrap().transfer_at(timestamp)
        }
        fn scan_transfers(
            &self,
            _: u64,
            _: u64,
            _: bool,
            _: &mut dyn FnMut(&Transfer) -> bool,
        ) -> StoreResult<()> {
            unreachable!("not read here")
        }
        fn scan_transfer_field(
            &self,
            _: Field,
            _: u128,
            _: u64,
            _: u64,
            _: bool,
            _: &mut dyn FnMut(Scanned<'_>) -> bool,
        ) -> StoreResult<()> {
            unreachable!("not read here")
        }
        fn scan_account_field(
            &self,
            _: Option<Field>,
            _: u128,
            _: u64,
            _: u64,
            _: bool,
            _: &mut dyn FnMut(u64, u128) -> bool,
        ) -> StoreResult<()> {
            unreachable!("not read here")
        }
        fn scan_changes(&self, _: u64, _: &mut dyn FnMut(&ChangeRecord) -> bool) -> StoreResult<()> {
            unreachable!("not read here")
        }
        fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
            self.inner.lock().unwrap().meta_raw(key)
        }
        fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
            self.commit_shared(changes)
        }
        fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
            self.inner.lock().unwrap().for_each_record(visit)
        }
        fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
            self.inner.lock().unwrap().put_records(records)
        }
        fn clear(&mut self) -> StoreResult<()> {
            self.inner.lock().unwrap().clear()
        }
        fn is_empty(&self) -> StoreResult<bool> {
            self.inner.lock().unwrap().is_empty()
        }
        fn flush(&self) -> StoreResult<()> {
            self.durable.store(self.commits.load(Ordering::Relaxed), Ordering::Relaxed);
            Ok(())
        }
    }

    fn accounts(first: u128) -> Batch {
        accounts_n(first, 2)
    }

    fn accounts_n(first: u128, count: u128) -> Batch {
        Batch::CreateAccounts(
            (first..first + count)
                .map(|id| Account { id, ledger: 1, code: 1, flags: AccountFlags(0), ..Account::default() })
                .collect(),
        )
    }

    /// The store underneath's commits, and how many of them its last flush made durable.
    fn counts(ledger: &Ledger<Checkpointed<Failing>>) -> (u64, u64) {
        let base = ledger.store().base();
        (base.commits.load(Ordering::Relaxed), base.durable.load(Ordering::Relaxed))
    }

    /// A full batch is committed to the store directly and made durable by the next `sync` or
    /// checkpoint, with every commit before it: one fsync for many entries, not one each. Until
    /// then the store says it needs one (the node syncs it on its checkpoint interval).
    #[test]
    fn entries_committed_directly_are_durable_at_the_next_sync_or_checkpoint() {
        let full = DIRECT_RECORDS_MIN as u128;
        let mut ledger = Ledger::open(Checkpointed::new(Failing::default())).unwrap();
        ledger.apply(&[accounts_n(1, full)], 1_000, Some(b"1")).unwrap();
        ledger.apply(&[accounts_n(1 + full, full)], 2_000, Some(b"2")).unwrap();
        assert_eq!(counts(&ledger), (2, 0), "direct commits, none durable yet");
        assert!(ledger.store().needs_sync());
        ledger.store_mut().sync().unwrap();
        assert_eq!(counts(&ledger), (2, 2));
        assert!(!ledger.store().needs_sync());

        // A direct commit, then a small one in memory: the checkpoint's own flush covers both.
        ledger.apply(&[accounts_n(1 + 2 * full, full)], 3_000, Some(b"3")).unwrap();
        ledger.apply(&[accounts(1 + 3 * full)], 4_000, Some(b"4")).unwrap();
        assert!(ledger.store().needs_sync());
        assert_eq!(ledger.store_mut().checkpoint().unwrap(), 1);
        assert_eq!(counts(&ledger), (4, 4));
        assert!(!ledger.store().needs_sync());

        // A direct commit alone: a checkpoint (before a snapshot or a backup) flushes it too.
        ledger.apply(&[accounts_n(3 + 3 * full, full)], 5_000, Some(b"5")).unwrap();
        assert_eq!(ledger.store_mut().checkpoint().unwrap(), 0);
        assert_eq!(counts(&ledger), (5, 5));
    }

    /// With only direct commits to make durable, `seal` gives a job that flushes them, for the
    /// checkpoint thread: applying no longer waits for a flush (seconds at times, issue 24).
    /// While any job runs, or while the store is busy with a durable write of its own, a full
    /// batch goes to memory instead of waiting, and reads see it there; once the store is free,
    /// what waits in memory is written first and the batch directly.
    #[test]
    fn a_full_batch_waits_for_no_flush_and_no_busy_store() {
        let full = DIRECT_RECORDS_MIN as u128;
        let mut ledger = Ledger::open(Checkpointed::new(Failing::default())).unwrap();
        ledger.apply(&[accounts_n(1, full)], 1_000, Some(b"1")).unwrap();
        assert_eq!(counts(&ledger), (1, 0));
        let flush = ledger.store_mut().seal().unwrap().expect("a flush to run");
        assert_eq!(flush.commits(), 0);
        assert!(!ledger.store().needs_sync(), "the job's flush covers the direct commit");
        // The flush has not run: a full batch goes to memory and is read from there.
        ledger.apply(&[accounts_n(1 + full, full)], 2_000, Some(b"2")).unwrap();
        assert_eq!((counts(&ledger), ledger.store().recent_commits()), ((1, 0), 1));
        assert!(ledger.store().account(1 + full).unwrap().is_some());
        assert!(ledger.store().account(1).unwrap().is_some(), "the flush's job hides nothing below");
        flush.run().unwrap();
        assert_eq!(counts(&ledger), (1, 1));
        // The store is busy with a durable write of its own: memory again.
        ledger.store().base().busy.store(true, Ordering::Relaxed);
        ledger.apply(&[accounts_n(1 + 2 * full, full)], 3_000, Some(b"3")).unwrap();
        assert_eq!((counts(&ledger), ledger.store().recent_commits()), ((1, 1), 2));
        ledger.store().base().busy.store(false, Ordering::Relaxed);
        // No job runs and the store is free: what waits in memory is written first (one commit,
        // not durable), then the batch directly; the next flush makes both durable.
        ledger.apply(&[accounts_n(1 + 3 * full, full)], 4_000, Some(b"4")).unwrap();
        assert_eq!((counts(&ledger), ledger.store().recent_commits()), ((3, 1), 0));
        assert!(ledger.store().needs_sync());
        ledger.store_mut().seal().unwrap().expect("a flush").run().unwrap();
        assert_eq!(counts(&ledger), (3, 3));
        assert!(ledger.store_mut().seal().unwrap().is_none(), "nothing left to write or flush");
        for id in [1, 1 + full, 1 + 2 * full, 1 + 3 * full] {
            assert!(ledger.store().account(id).unwrap().is_some(), "account {id}");
        }
    }

    /// What piled up in memory while a job ran is written ahead of the next full batch only
    /// when it is small; a larger layer is left to the next job, and the batch waits behind it.
    #[test]
    fn a_full_batch_writes_no_large_layer_on_the_applying_thread() {
        let full = DIRECT_RECORDS_MIN as u128;
        let mut ledger = Ledger::open(Checkpointed::new(Failing::default())).unwrap();
        ledger.apply(&[accounts_n(1, full)], 1_000, Some(b"0")).unwrap();
        let flush = ledger.store_mut().seal().unwrap().expect("a flush to run");
        let mut next = 1 + full;
        let mut time = 2_000;
        while ledger.store().recent_bytes() <= RECENT_INLINE_BYTES_MAX {
            ledger.apply(&[accounts_n(next, full - 1)], time, Some(b"1")).unwrap();
            (next, time) = (next + full - 1, time + 1_000);
        }
        flush.run().unwrap();
        let waiting = ledger.store().recent_commits();
        ledger.apply(&[accounts_n(next, full)], time, Some(b"2")).unwrap();
        assert_eq!(counts(&ledger), (1, 1), "nothing written on the applying thread");
        assert_eq!(ledger.store().recent_commits(), waiting + 1, "the batch waits in memory");
        assert!(ledger.store().account(next).unwrap().is_some());
        ledger.store_mut().seal().unwrap().expect("the layer for the checkpoint thread").run().unwrap();
        assert_eq!(ledger.store().recent_commits(), 0);
        // With the layer written, the next full batch goes to the store directly again.
        ledger.apply(&[accounts_n(next + full, full)], time + 1_000, Some(b"3")).unwrap();
        assert_eq!(ledger.store().recent_commits(), 0, "committed directly");
    }

    /// Every record of `records`, in key order.
    fn records(records: &impl crate::store::Records) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = Vec::new();
        records
            .for_each_record(&mut |key, value| {
                all.push((key.to_vec(), value.to_vec()));
                Ok(())
            })
            .unwrap();
        all
    }

    /// A freeze while a checkpoint job runs waits for nothing: what memory holds is sealed behind
    /// that job, and the frozen layers over the store as it was at the freeze are the whole state
    /// as of the freeze, byte for byte, whether or not the jobs have written them since and
    /// whatever was applied after. Once the jobs ran, everything before the freeze is durable.
    #[test]
    fn a_freeze_under_a_running_checkpoint_sees_the_whole_state_and_waits_for_no_disk() {
        let full = DIRECT_RECORDS_MIN as u128;
        let mut ledger = Ledger::open(Checkpointed::new(Failing::default())).unwrap();
        let mut reference = Ledger::open(MemStore::default()).unwrap();
        let entries: Vec<Batch> = vec![accounts_n(1, full), accounts(1 + full), accounts(3 + full)];
        let mut running = None;
        for (at, batch) in entries.iter().enumerate() {
            let time = 1_000 * (at as u64 + 1);
            ledger.apply(std::slice::from_ref(batch), time, Some(b"a")).unwrap();
            reference.apply(std::slice::from_ref(batch), time, Some(b"a")).unwrap();
            if at == 1 {
                // A checkpoint of the second entry (and a flush of the first, committed
                // directly), not written yet: the third waits in memory.
                running = ledger.store_mut().seal().unwrap();
            }
        }
        let running = running.expect("a job under way");
        assert_eq!(running.commits(), 1);
        assert!(ledger.store_mut().seal().unwrap().is_none(), "one job at a time for `seal`");
        let (layers, job) = ledger.store_mut().freeze().unwrap();
        let job = job.expect("the third entry sealed for a job of its own");
        assert_eq!(job.commits(), 1);
        let base = ledger.store().base().inner.lock().unwrap().clone();
        assert_eq!(records(&layers.over(&base)), records(reference.store()));
        // Applied after the freeze: not in the frozen state.
        ledger.apply(&[accounts(5 + full)], 4_000, Some(b"b")).unwrap();
        assert_eq!(records(&layers.over(&base)), records(reference.store()));
        // The jobs write the layers in order; read over the store as it is now, the same.
        assert_eq!(counts(&ledger), (1, 0));
        running.run().unwrap();
        assert_eq!(records(&layers.over(&base)), records(reference.store()));
        job.run().unwrap();
        layers.written().unwrap();
        assert_eq!(counts(&ledger), (3, 3), "everything before the freeze durable");
        let written = ledger.store().base().inner.lock().unwrap().clone();
        assert_eq!(records(&layers.over(&written)), records(reference.store()));
        assert_eq!(records(&written), records(reference.store()), "the store holds it all");
        assert!(ledger.store().account(5 + full).unwrap().is_some());
    }

    /// A checkpoint written on another thread that finds the store damaged fails every later
    /// commit as damage (so the node marks its state for a rebuild, as when applying finds it),
    /// and what was applied stays readable meanwhile; one that is dropped unwritten fails them
    /// as an IO error, and dropping the store does not wait for it forever.
    #[test]
    fn a_failed_checkpoint_fails_later_commits_and_says_whether_it_was_damage() {
        for damaged in [true, false] {
            let mut ledger = Ledger::open(Checkpointed::new(Failing::default())).unwrap();
            ledger.apply(&[accounts(1)], 1_000, Some(b"1")).unwrap();
            ledger.store().base().damaged.store(damaged, Ordering::Relaxed);
            let job = ledger.store_mut().seal().unwrap().expect("a layer to write");
            if damaged {
                assert!(job.run().unwrap_err().is_damage());
            } else {
                drop(job);
            }
            assert!(ledger.store().account(1).unwrap().is_some(), "the sealed layer is still read");
            let error = ledger.apply(&[accounts(3)], 2_000, Some(b"2")).unwrap_err();
            assert_eq!(error.is_damage(), damaged, "{error}");
            assert!(error.to_string().contains("checkpoint"), "{error}");
        }
    }
}
