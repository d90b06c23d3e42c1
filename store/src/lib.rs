//! `RunStore`: the state in one page store table (redb, `pages.rs`), laid out for a ledger's workload.
//!
//! Transfers never change once created and arrive in timestamp order; accounts are few and hot;
//! lookups are by id, by (account, time) and by expiry. So the state is not one key per
//! record (a B-tree does tens of thousands of random inserts a second) but a few large values per
//! applied entry:
//!
//! | physical key                      | value                                                |
//! |-----------------------------------|------------------------------------------------------|
//! | `T` first timestamp               | up to 64 transfer records of one entry, in time order   |
//! | `R` kind, run id, page number     | a page of a sorted run (`runs.rs`): accounts, transfer ids -> timestamp, per-account index, query indexes |
//! | `F` kind, run id, chunk number    | that run's description: page fences and Bloom filter |
//! | `L` `layout`                      | the runs of each kind, oldest first, and runs awaiting deletion |
//! | `C` first timestamp               | up to 64 change records of one entry, each with its timestamp, in time order |
//! | `Z` first timestamp               | the zone map of that chunk: its transfers' ledgers and codes (`fields.rs`) |
//! | `E`, `M`, `P`, `X`                | expiries, meta, pending statuses and failed ids, as in the logical key space (`codec.rs`) |
//!
//! A failed id is also in the ids runs, with `FAILED_MARK | result code` for a timestamp: every
//! new transfer asks whether its id failed before, and the runs' Bloom filters answer "no" for
//! the price of a hash, where a tree lookup per transfer cost a sixth of the batch throughput.
//! The `X` keys are what export and the digest read.
//!
//! The query indexes (`fields.rs`) are runs too, one kind per field: `(value, timestamp)` of every
//! record whose field is not zero; a transfer's ledger and code have zone maps instead. They are
//! derived data: export and the digest leave them out, import and the first open of a layout-1
//! store build them from the records.
//!
//! Each commit (a checkpoint, or a full batch) writes, in one atomic batch: its transfers as chunks, one new run
//! per kind it changed (the accounts it changed, the ids it created, its index entries, its
//! query index entries), the
//! layout naming those runs, and its plain keys. Runs are merged (`runs::pick_merge`), inline or
//! on two background threads (`runs::Lane`: ids and accounts, the indexes): a merge writes its run's pages under a fresh id recorded in the layout
//! as garbage, then swaps it for its sources in one batch; the sources are deleted once no reader
//! or frozen view holds them. A crash at any point leaves the layout of some whole entry and
//! garbage that the merge threads delete after `open` (or `open` itself, without them). Reading memory is bounded: run descriptions (about 10 bits per key
//! of filter), the page store's cache and the account cache, both sized by `Options::cache_bytes`.
//!
//! A commit is durable once flushed (a checkpoint's, or a merge's): a crash takes back the
//! commits after the last flush; the Raft log still has them, and the caller re-applies from the
//! applied marker it keeps in `META_APP_KEY`.

mod export;
mod fields;
mod filter;
#[cfg(test)]
mod fuzz;
mod import;
mod layout;
pub mod pages;
pub mod runs;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use foldhash::HashMap;

pub use self::export::FrozenView;
use self::export::{PreImages, export};
use self::filter::KeyHash;
use self::import::Import;
pub use self::layout::LAYOUT_KEY;
use self::layout::{Layout, Runs};
use self::pages::{Batch, Pages, Value};
use self::runs::{Descriptions, Kind, Lane, PREFIX_PAGE, PREFIX_RUN_META, Run, RunBuilder, Writes};
use ledger::codec::{
    self, PREFIX_CHANGE, PREFIX_EXPIRY, PREFIX_FAILED, PREFIX_META, PREFIX_PENDING, PREFIX_TRANSFER,
};
use ledger::model::{Account, ChangeRecord, CreateTransferResult, Field, PendingStatus, Transfer};
use ledger::store::{Changes, RecordVisitor, Scanned, Store, StoreError, StoreResult};

/// Transfers in one `T` value: 8,064 bytes, like a run page (see `runs::PAGE_BYTES`).
const CHUNK_TRANSFERS: usize = 63;
/// Marks an ids-run entry as a failed id rather than a transfer's timestamp (timestamps stay
/// below 2^63: ledger time is nanoseconds since 1970, and imported ones are checked).
pub(crate) const FAILED_MARK: u64 = 1 << 63;
/// Writes a merge or an import sends to the page store per batch.
const WRITES_PER_BATCH: usize = 64;
/// Deletes of a garbage run's keys per batch to the page store.
const DELETES_PER_BATCH: usize = 1024;
/// Memory an account takes in the cache: id and record, and the map's control byte and spare
/// capacity.
const CACHED_ACCOUNT_BYTES: u64 = 168;

/// How a `RunStore` uses memory and threads.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Memory for the store: half to decoded accounts (the hottest records: two lookups for
    /// every transfer), a quarter to the page store's cache, a quarter to the runs' descriptions
    /// (fences and Bloom filters, held whole while they fit, the largest read through a cache
    /// otherwise).
    pub cache_bytes: u64,
    /// Merge runs on a thread of the store's own (the product), or inside `commit` (a benchmark
    /// of one core, which then pays for every merge it causes).
    pub background_merges: bool,
}

impl Default for Options {
    fn default() -> Options {
        // 768 MiB: the descriptions' quarter holds every run's whole up to about 100M
        // transfers (151 MiB of them there); with 512 MiB, apply at 70-100M ran at 60% of it.
        Options { cache_bytes: 768 << 20, background_merges: true }
    }
}

pub struct RunStore {
    inner: Arc<Inner>,
    /// One merge thread per lane, in the product.
    mergers: Vec<JoinHandle<()>>,
    background_merges: bool,
    import: Option<Import>,
}

/// What a store shares with its merge thread and its frozen views.
struct Inner {
    pages: Pages,
    /// The budget and cache of the runs' descriptions.
    descriptions: Arc<Descriptions>,
    /// The runs readers use. Replaced, never changed in place, by the holder of `layout`.
    runs: RwLock<Arc<Runs>>,
    /// Held to change the layout (a commit, a merge's start and swap, garbage collection).
    layout: Mutex<Layout>,
    accounts: Mutex<AccountCache>,
    /// While a `FrozenView` exists: the value each plain key (`E`, `M`, `P`) had when it was
    /// frozen, recorded by `commit` before it first changes the key (`None`: the key did not
    /// exist). Runs and transfer chunks need no such thing: they never change.
    pre_images: Mutex<Option<PreImages>>,
    /// Damage the merge thread found in the pages it read: from then on every commit fails with
    /// it, which stops the node for a rebuild, instead of running on a store it cannot merge.
    damage: Mutex<Option<String>>,
    merges: Mutex<MergeSignal>,
    merges_wake: Condvar,
    /// Held while garbage is deleted: the two merge threads collect one at a time, so that a run
    /// leaves the layout's garbage list only once its pages are gone.
    collecting: Mutex<()>,
    /// Durable writes under way: of the layout (with the layout lock held), or a checkpoint's
    /// sync (`flush`), which holds the page store's one writer (redb's write lock) through its
    /// fsyncs. A commit that need not wait for them declines (`try_commit_shared`).
    durable_writes: std::sync::atomic::AtomicUsize,
}

/// One durable write under way (`Inner::durable_writes`) while it lives.
struct DurableWrite<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> DurableWrite<'a> {
    fn start(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        DurableWrite(count)
    }
}

impl Drop for DurableWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Background merges that failed in this process, for a node's metrics
/// (`tally_state_merges_failed`): a failure is printed and the merge tried again at the next
/// commit, and a store that keeps failing would otherwise go unseen until its reads slow down.
pub static MERGES_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Default)]
struct MergeSignal {
    /// Per lane (`Lane as usize`): a commit added runs since the lane last looked.
    pending: [bool; 2],
    stop: bool,
}

/// Decoded accounts by id, bounded: when full, an arbitrary eighth is dropped. Every account a
/// commit writes goes in (they are the hot ones).
struct AccountCache {
    accounts: HashMap<u128, Account>,
    capacity: usize,
}

impl AccountCache {
    fn insert(&mut self, account: Account) {
        if self.accounts.len() >= self.capacity && !self.accounts.contains_key(&account.id) {
            let drop: Vec<u128> = self.accounts.keys().take(self.capacity / 8 + 1).copied().collect();
            for id in drop {
                self.accounts.remove(&id);
            }
        }
        self.accounts.insert(account.id, account);
    }
}

impl RunStore {
    /// Opens (or creates) the store in directory `path` with default options.
    pub fn open(path: &Path) -> StoreResult<RunStore> {
        RunStore::open_with(path, Options::default())
    }

    /// Opens (or creates) the store in directory `path`, on the product's page store (redb).
    pub fn open_with(path: &Path, options: Options) -> StoreResult<RunStore> {
        if is_sled_directory(path) {
            return Err(sled_state(path));
        }
        let started = std::time::Instant::now();
        let pages = Pages::open(path, options.cache_bytes / 4)?;
        report_slow(|| "opening the page store (redb, its recovery after a crash)".into(), started);
        RunStore::open_on(pages, options).map_err(|error| match error {
            StoreError::Corrupt(what) => StoreError::Corrupt(format!("{}: {what}", path.display())),
            other => other,
        })
    }

    /// Opens (or creates) the store on `pages`: the product's (`open_with`), or a page store in
    /// memory with faults on demand (`pages::MemoryDisk`), for tests and fuzzing.
    pub fn open_on(pages: Pages, options: Options) -> StoreResult<RunStore> {
        let mut runs = Runs::default();
        let mut layout = Layout::default();
        let descriptions = Descriptions::new(options.cache_bytes / 4);
        let loading = std::time::Instant::now();
        if let Some(bytes) = pages.get(LAYOUT_KEY)? {
            let stored = Layout::decode(&bytes)?;
            layout.next_run = stored.next_run;
            layout.garbage = stored.garbage;
            // The descriptions held whole are the first loaded: ids and accounts first (every
            // transfer looks them up), each kind's newest (smallest) runs first.
            for (kind, ids) in Kind::ALL.into_iter().zip(stored.kinds) {
                let loaded: Vec<Arc<Run>> = ids
                    .iter()
                    .rev()
                    .map(|id| Run::load(&pages, kind, *id, &descriptions).map(Arc::new))
                    .collect::<StoreResult<_>>()?;
                runs.kinds[kind as usize] = loaded.into_iter().rev().collect();
            }
        } else if pages.get(codec::META_LEDGER_KEY)?.is_some() {
            return Err(StoreError::Corrupt("a ledger meta record without a layout".into()));
        }
        let garbage = layout.garbage.len();
        report_slow(
            || {
                format!(
                    "loading the layout and {} runs' descriptions at open",
                    runs.kinds.iter().flatten().count()
                )
            },
            loading,
        );
        let capacity = (options.cache_bytes / 2 / CACHED_ACCOUNT_BYTES).max(1024) as usize;
        let inner = Arc::new(Inner {
            pages,
            descriptions,
            runs: RwLock::new(Arc::new(runs)),
            layout: Mutex::new(layout),
            accounts: Mutex::new(AccountCache { accounts: HashMap::default(), capacity }),
            pre_images: Mutex::new(None),
            damage: Mutex::new(None),
            merges: Mutex::new(MergeSignal { pending: [true; 2], stop: false }),
            merges_wake: Condvar::new(),
            collecting: Mutex::new(()),
            durable_writes: Default::default(),
        });
        // What a crash left as garbage is deleted by the merge threads, if there are any: it is
        // invisible to readers, and deleting a large run takes seconds, which a node restarting
        // after a crash must not wait for (issue 24).
        if !options.background_merges {
            let collecting = std::time::Instant::now();
            inner.collect_garbage()?;
            report_slow(|| format!("collecting the garbage of {garbage} runs at open"), collecting);
        }
        let mut mergers = Vec::new();
        if options.background_merges {
            for (lane, name) in [(Lane::Lookups, "state-merges"), (Lane::Indexes, "index-merges")] {
                let inner = inner.clone();
                let thread =
                    std::thread::Builder::new().name(name.into()).spawn(move || inner.merge_loop(lane));
                mergers.push(thread.expect("spawn a merge thread"));
            }
        }
        Ok(RunStore { inner, mergers, background_merges: options.background_merges, import: None })
    }

    /// A view of the state as it is now that later commits do not change, for a snapshot export
    /// that must not stop applying. Runs and transfer chunks never change, so the view keeps the
    /// runs of this moment (a merge does not delete them while the view lives) and reads
    /// transfers up to this moment's last timestamp; for the few plain keys that do change, from
    /// here until the view is dropped `commit` keeps the old value of every key it changes. One
    /// view at a time.
    pub fn freeze(&self) -> FrozenView {
        let mut pre_images = self.inner.pre_images.lock().unwrap();
        assert!(pre_images.is_none(), "state store: a second frozen view");
        *pre_images = Some(BTreeMap::new());
        FrozenView {
            inner: self.inner.clone(),
            runs: self.inner.current_runs(),
            timestamp_last: self.inner.timestamp_last().unwrap_or(u64::MAX),
        }
    }

    /// Whether some kind has runs to merge now (or a merge under way): false once the merge
    /// threads have caught up. For tests and benchmarks: the store merges by itself.
    pub fn merges_due(&self) -> bool {
        let runs = self.inner.current_runs();
        Kind::ALL.into_iter().any(|kind| runs::pick_merge(runs.of(kind)).is_some())
    }

    /// How many runs each kind has (`Kind::ALL` order), and the memory their descriptions take.
    pub fn run_counts(&self) -> ([usize; runs::KINDS], usize) {
        let runs = self.inner.current_runs();
        let counts = Kind::ALL.map(|kind| runs.of(kind).len());
        let bytes = runs.kinds.iter().flatten().map(|run| run.resident_bytes()).sum();
        (counts, bytes)
    }

    /// An id's entry in the ids runs: a transfer's timestamp, or `FAILED_MARK` and the result
    /// code of a transfer that failed.
    fn ids_lookup(&self, id: u128) -> StoreResult<Option<u64>> {
        let key = id.to_be_bytes();
        let hash = KeyHash::of(&key);
        let runs = self.inner.current_runs();
        for run in runs.of(Kind::Ids).iter().rev() {
            if run.may_contain(&self.inner.pages, hash)?
                && let Some(timestamp) =
                    run.get(&self.inner.pages, &key, |value| u64::from_le_bytes(value.try_into().unwrap()))?
            {
                return Ok(Some(timestamp));
            }
        }
        Ok(None)
    }

    /// The transfer with this timestamp, from its chunk.
    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
        let key = chunk_key(timestamp);
        let Some(entry) = self.inner.pages.range(..=key).next_back() else { return Ok(None) };
        let (chunk_key, chunk) = entry?;
        if chunk_key.first() != Some(&PREFIX_TRANSFER) {
            return Ok(None);
        }
        Ok(find_in_chunk(&chunk, timestamp)?.map(codec::decode_transfer))
    }

    /// The transfers within the bounds of the chunks whose zone map `select` takes, in time
    /// order (or reversed), until `visit` returns false; a chunk it does not take is visited as
    /// skipped. Every chunk has a zone map under the same timestamp.
    fn scan_chunks(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        select: &dyn Fn(&[u8]) -> StoreResult<bool>,
        visit: &mut dyn FnMut(Scanned<'_>) -> bool,
    ) -> StoreResult<()> {
        if timestamp_min > timestamp_max {
            return Ok(());
        }
        let pages = &self.inner.pages;
        let start = chunk_start(pages, fields::zone_key(timestamp_min))?;
        let end = fields::zone_key(timestamp_max);
        let zones = pages.range::<[u8]>((Bound::Included(&start[..]), Bound::Included(&end[..])));
        // Reversed, a skipped chunk ends before the chunk visited after it in time begins.
        let mut later_first = timestamp_max.saturating_add(1);
        let mut visit_zone = |entry: StoreResult<(Value, Value)>| -> StoreResult<bool> {
            let (key, zone) = entry?;
            let first = u64::from_be_bytes(key[1..9].try_into().unwrap());
            if !select(&zone)? {
                let resume = if reversed { later_first - 1 } else { first.max(timestamp_min) };
                later_first = first.max(timestamp_min);
                return Ok(visit(Scanned::Skipped { resume, transfers: CHUNK_TRANSFERS }));
            }
            later_first = first.max(timestamp_min);
            let chunk = pages.get(&chunk_key(first))?;
            let chunk =
                chunk.ok_or_else(|| StoreError::Corrupt(format!("zone map {key:02x?} without its chunk")))?;
            let mut records = chunk_records(&chunk)?;
            let mut go_on = |record: &[u8]| {
                let timestamp = record_timestamp(record);
                if timestamp < timestamp_min || timestamp > timestamp_max {
                    return true;
                }
                visit(Scanned::Transfer(&codec::decode_transfer(record)))
            };
            Ok(if reversed { records.rev().all(&mut go_on) } else { records.all(&mut go_on) })
        };
        if reversed {
            for entry in zones.rev() {
                if !visit_zone(entry)? {
                    break;
                }
            }
        } else {
            for entry in zones {
                if !visit_zone(entry)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Writes of the plain keys (expiries, pending statuses, failed ids, meta), in key order per
    /// kind.
    fn plain_writes(changes: &Changes, mut write: impl FnMut(&[u8], Option<&[u8]>)) {
        for key in &changes.expiry_delete {
            write(&codec::expiry_key(key.0, key.1), None);
        }
        for key in &changes.expiry_put {
            write(&codec::expiry_key(key.0, key.1), Some(&[]));
        }
        for (id, status) in &changes.pending {
            write(&codec::id_key(PREFIX_PENDING, *id), Some(&[*status as u8]));
        }
        for (id, result) in &changes.failed {
            write(&codec::id_key(PREFIX_FAILED, *id), Some(&codec::encode_failed(*result)));
        }
        if let Some(app_meta) = &changes.app_meta {
            write(codec::META_APP_KEY, Some(app_meta));
        }
        write(codec::META_LEDGER_KEY, Some(&codec::encode_ledger_meta(&changes.meta)));
    }

    /// Records the current value of each plain key `changes` writes that has none recorded yet.
    fn keep_pre_images(&self, changes: &Changes) -> StoreResult<()> {
        let mut guard = self.inner.pre_images.lock().unwrap();
        let Some(pre_images) = guard.as_mut() else { return Ok(()) };
        let mut result = Ok(());
        Self::plain_writes(changes, |key, _| {
            if result.is_ok() && !pre_images.contains_key(key) {
                match self.inner.pages.get(key) {
                    Ok(value) => {
                        pre_images.insert(key.to_vec(), value.map(|v| v.to_vec()));
                    }
                    Err(error) => result = Err(error),
                }
            }
        });
        result
    }

    fn signal_merges(&self) -> StoreResult<()> {
        if self.background_merges {
            self.inner.merges.lock().unwrap().pending = [true; 2];
            self.inner.merges_wake.notify_all();
        } else {
            while self.inner.merge_once(&Lane::ALL)? {}
        }
        Ok(())
    }
}

impl Drop for RunStore {
    fn drop(&mut self) {
        self.inner.merges.lock().unwrap().stop = true;
        self.inner.merges_wake.notify_all();
        for merger in self.mergers.drain(..) {
            let _ = merger.join();
        }
        // A store closed, not crashed, keeps its last commits. Best effort: what a failure here
        // leaves out is re-applied from the log, as after a crash.
        let _ = self.inner.flush();
    }
}

/// Whether `path` holds a state written on sled (tally before the page store was redb): sled's
/// `conf` and `db` files.
fn is_sled_directory(path: &Path) -> bool {
    path.join("conf").is_file() && path.join("db").is_file()
}

fn sled_state(path: &Path) -> StoreError {
    StoreError::Superseded(format!(
        "{} holds a ledger state written on sled by an older tally; this build keeps the state in \
         redb, and rebuilds it from the node's snapshot and log",
        path.display()
    ))
}

fn chunk_key(timestamp: u64) -> [u8; 9] {
    codec::transfer_key(timestamp)
}

/// The records of a transfer chunk, in time order.
fn chunk_records(chunk: &[u8]) -> StoreResult<std::slice::ChunksExact<'_, u8>> {
    if chunk.is_empty() || !chunk.len().is_multiple_of(codec::RECORD_BYTES) {
        return Err(StoreError::Corrupt(format!("transfer chunk of {} bytes", chunk.len())));
    }
    Ok(chunk.chunks_exact(codec::RECORD_BYTES))
}

/// Where a scan of chunks keyed `prefix | first timestamp` from `key`'s timestamp begins: at the
/// chunk that holds it, which starts at or before it, if one of the prefix does.
fn chunk_start(pages: &Pages, key: [u8; 9]) -> StoreResult<Vec<u8>> {
    Ok(match pages.last_at_or_before(&key)? {
        Some((found, _)) if found.first() == Some(&key[0]) => found.to_vec(),
        _ => key.to_vec(),
    })
}

/// A change chunk's entries: the timestamp (u64 little-endian), the record's length (u8), the
/// change record. The `(timestamp, record bytes)` of a chunk, in time order.
fn change_records(chunk: &[u8]) -> StoreResult<Vec<(u64, &[u8])>> {
    let corrupt = || StoreError::Corrupt(format!("change chunk of {} bytes", chunk.len()));
    let mut records = Vec::with_capacity(CHUNK_TRANSFERS);
    let mut rest = chunk;
    while !rest.is_empty() {
        let timestamp = u64::from_le_bytes(rest.get(..8).ok_or_else(corrupt)?.try_into().unwrap());
        let length = *rest.get(8).ok_or_else(corrupt)? as usize;
        records.push((timestamp, rest.get(9..9 + length).ok_or_else(corrupt)?));
        rest = &rest[9 + length..];
    }
    if records.is_empty() {
        return Err(corrupt());
    }
    Ok(records)
}

/// One change chunk's value.
fn encode_change_chunk(changes: &[ChangeRecord]) -> Vec<u8> {
    let mut value = Vec::with_capacity(changes.len() * 64);
    for change in changes {
        value.extend_from_slice(&change.timestamp.to_le_bytes());
        let length_at = value.len();
        value.push(0);
        codec::encode_change_into(change, &mut value);
        value[length_at] = (value.len() - length_at - 1) as u8;
    }
    value
}

fn record_timestamp(record: &[u8]) -> u64 {
    u64::from_le_bytes(record[120..128].try_into().unwrap())
}

/// The record with `timestamp` in a chunk of records sorted by timestamp.
fn find_in_chunk(chunk: &[u8], timestamp: u64) -> StoreResult<Option<&[u8]>> {
    let count = chunk_records(chunk)?.len();
    let record = |i: usize| &chunk[i * codec::RECORD_BYTES..(i + 1) * codec::RECORD_BYTES];
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = (low + high) / 2;
        match record_timestamp(record(middle)).cmp(&timestamp) {
            std::cmp::Ordering::Less => low = middle + 1,
            std::cmp::Ordering::Greater => high = middle,
            std::cmp::Ordering::Equal => return Ok(Some(record(middle))),
        }
    }
    Ok(None)
}

/// A fresh run id.
/// What takes this long or longer in the store is reported on stderr: an entry's commit waits
/// for it when it holds the layout or the page store's write lock (issue 24: writes stopped for
/// seconds with no fault, and the node's log said nothing).
const SLOW: std::time::Duration = std::time::Duration::from_millis(250);

/// Reports `what` on stderr if it took `SLOW` or longer since `started`.
fn report_slow(what: impl FnOnce() -> String, started: std::time::Instant) {
    let took = started.elapsed();
    if took >= SLOW {
        eprintln!("state store: {} took {} ms", what(), took.as_millis());
    }
}

fn next_run(inner: &Inner) -> u64 {
    let mut layout = inner.layout.lock().unwrap();
    layout.next_run += 1;
    layout.next_run - 1
}

impl Inner {
    /// Makes everything committed so far durable.
    fn flush(&self) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let durable = DurableWrite::start(&self.durable_writes);
        let synced = self.pages.sync();
        drop(durable);
        report_slow(|| "a sync of the page store".into(), started);
        synced
    }

    fn current_runs(&self) -> Arc<Runs> {
        self.runs.read().unwrap().clone()
    }

    fn timestamp_last(&self) -> Option<u64> {
        let bytes = self.pages.get(codec::META_LEDGER_KEY).ok()??;
        codec::decode_ledger_meta(&bytes).ok().map(|meta| meta.timestamp_last)
    }

    /// Writes `writes`, `extra` and the layout with `runs` in one batch, durably (with every
    /// batch before it: the pages of the runs it names), then makes `runs` the readers' runs.
    /// Called with the layout lock held. A merge, an import and a checkpoint end here: a restart
    /// finds the last one, and the page store reuses what it freed.
    fn write_layout(&self, layout: &Layout, runs: Runs, writes: Writes, extra: Batch) -> StoreResult<()> {
        self.write_layout_with(layout, runs, writes, extra, true)
    }

    /// `write_layout`, atomic but not durable unless `durably`: a commit is made durable by the
    /// next durable batch (`flush`), and a crash before it takes it back with everything after it.
    fn write_layout_with(
        &self,
        layout: &Layout,
        runs: Runs,
        writes: Writes,
        extra: Batch,
        durably: bool,
    ) -> StoreResult<()> {
        let mut batch = extra;
        for (key, value) in writes {
            batch.insert(key, value);
        }
        batch.insert(LAYOUT_KEY, layout.encode(&runs));
        if durably {
            let durable = DurableWrite::start(&self.durable_writes);
            let written = self.pages.apply_durably(batch);
            drop(durable);
            written?;
        } else {
            self.pages.apply(batch)?;
        }
        *self.runs.write().unwrap() = Arc::new(runs);
        Ok(())
    }

    fn write_pages(&self, writes: &mut Writes) -> StoreResult<()> {
        let mut batch = Batch::default();
        for (key, value) in writes.drain(..) {
            batch.insert(key, value);
        }
        self.pages.apply(batch)?;
        Ok(())
    }

    /// A merge thread's loop: the merges of one lane's kinds, whenever a commit signals.
    fn merge_loop(&self, lane: Lane) {
        if lane == Lane::Lookups {
            let started = std::time::Instant::now();
            let garbage = self.layout.lock().unwrap().garbage.len();
            if let Err(error) = self.collect_garbage()
                && self.merge_failed(&error)
            {
                return;
            }
            report_slow(|| format!("collecting the garbage of {garbage} runs left at open"), started);
        }
        loop {
            {
                let mut signal = self.merges.lock().unwrap();
                while !signal.pending[lane as usize] && !signal.stop {
                    signal = self.merges_wake.wait(signal).unwrap();
                }
                if signal.stop {
                    return;
                }
                signal.pending[lane as usize] = false;
            }
            loop {
                match self.merge_once(&[lane]) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(error) if self.merge_failed(&error) => return,
                    Err(_) => break,
                }
                if self.merges.lock().unwrap().stop {
                    return;
                }
            }
        }
    }

    /// Counts and reports a merge (or its garbage collection) that failed; true if it found
    /// damage, after which the thread stops. Otherwise the next commit signals again; a store that
    /// cannot write will fail its commits too, and that is where the error surfaces. Damage does
    /// not heal by retrying: the next commit reports it (`commit_shared`).
    fn merge_failed(&self, error: &StoreError) -> bool {
        MERGES_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        eprintln!("state store: a merge failed: {error}");
        if error.is_damage() {
            *self.damage.lock().unwrap() = Some(error.to_string());
        }
        error.is_damage()
    }

    /// Merges the runs `runs::pick_merge` picks among the kinds of `lanes`, if any: writes the
    /// merged run under a fresh id (garbage until swapped in), swaps it for its sources, and
    /// collects garbage. The lanes' threads never merge the same kind.
    fn merge_once(&self, lanes: &[Lane]) -> StoreResult<bool> {
        let (kind, sources, id) = {
            let mut layout = self.layout.lock().unwrap();
            let runs = self.current_runs();
            let Some((kind, range)) = Kind::ALL
                .into_iter()
                .filter(|kind| lanes.contains(&kind.lane()))
                .find_map(|kind| runs::pick_merge(runs.of(kind)).map(|range| (kind, range)))
            else {
                return Ok(false);
            };
            let id = layout.next_run;
            layout.next_run += 1;
            layout.writing.push((kind, id));
            let started = std::time::Instant::now();
            self.write_layout(&layout, (*runs).clone(), Writes::new(), Batch::default())?;
            report_slow(|| format!("a merge's first layout write ({kind:?})"), started);
            (kind, runs.of(kind)[range].to_vec(), id)
        };
        let distinct = sources.iter().map(|run| run.distinct).sum();
        let mut builder = RunBuilder::new(kind, id, distinct);
        let mut writes = Writes::new();
        let mut stopped = false;
        runs::scan_all(&sources, &self.pages, &mut |key, value| {
            builder.push(key, value, &mut writes);
            if writes.len() >= WRITES_PER_BATCH {
                self.write_pages(&mut writes)?;
                // A store being closed does not wait for a long merge to end.
                stopped = self.merges.lock().unwrap().stop;
            }
            Ok(!stopped)
        })?;
        let merged = builder.finish(&mut writes, &self.descriptions).expect("merged runs hold entries");
        let merged_entries = merged.entries;
        let source_count = sources.len();
        if !stopped {
            // The builder asserted the order; the count is the union's: every key of the largest
            // source, at most every entry of all (a key in several runs is kept once, the newest).
            let total: u64 = sources.iter().map(|run| run.entries).sum();
            let largest = sources.iter().map(|run| run.entries).max().unwrap_or(0);
            assert!(
                largest <= merged.entries && merged.entries <= total,
                "a merge of {kind:?} runs holding {total} entries (the largest {largest}) made {}",
                merged.entries
            );
        }
        self.write_pages(&mut writes)?;
        {
            let mut layout = self.layout.lock().unwrap();
            layout.writing.retain(|writing| *writing != (kind, id));
            let mut runs = (*self.current_runs()).clone();
            let list = &mut runs.kinds[kind as usize];
            match list.iter().position(|run| Arc::ptr_eq(run, &sources[0])) {
                Some(start) if !stopped => {
                    list.splice(start..start + sources.len(), [Arc::new(merged)]);
                    layout.retired.extend(sources);
                }
                // Stopped, or the store was cleared meanwhile.
                _ => layout.garbage.push((kind, id)),
            }
            let started = std::time::Instant::now();
            self.write_layout(&layout, runs, Writes::new(), Batch::default())?;
            report_slow(
                || format!("a merge's last layout write ({kind:?}, {} entries)", merged_entries),
                started,
            );
        }
        let started = std::time::Instant::now();
        self.collect_garbage()?;
        report_slow(
            || format!("collecting the garbage of a merge ({kind:?}, {source_count} sources)"),
            started,
        );
        Ok(!stopped)
    }

    /// Deletes runs that are garbage, or retired and no longer held by any reader or view.
    fn collect_garbage(&self) -> StoreResult<()> {
        let _collecting = self.collecting.lock().unwrap();
        let doomed: Vec<(Kind, u64)> = {
            let mut layout = self.layout.lock().unwrap();
            let (free, held): (Vec<_>, Vec<_>) =
                std::mem::take(&mut layout.retired).into_iter().partition(|run| Arc::strong_count(run) == 1);
            layout.retired = held;
            let mut doomed = std::mem::take(&mut layout.garbage);
            doomed.extend(free.iter().map(|run| (run.kind, run.id)));
            // Still listed as garbage while they are deleted, in case of a crash.
            layout.garbage = doomed.clone();
            doomed
        };
        if doomed.is_empty() {
            return Ok(());
        }
        // In small batches: a commit waits for the page store's write lock only as long as one.
        for (kind, id) in &doomed {
            for prefix in [PREFIX_PAGE, PREFIX_RUN_META] {
                let mut batch = Batch::default();
                for key in self.pages.range(runs::run_key_range(prefix, *kind, *id)).keys() {
                    batch.remove(key?.to_vec());
                    if batch.len() >= DELETES_PER_BATCH {
                        self.pages.apply(std::mem::take(&mut batch))?;
                        // A store being closed does not wait: what is left stays listed.
                        if self.merges.lock().unwrap().stop {
                            return Ok(());
                        }
                    }
                }
                self.pages.apply(batch)?;
            }
        }
        let mut layout = self.layout.lock().unwrap();
        layout.garbage.retain(|run| !doomed.contains(run));
        let runs = (*self.current_runs()).clone();
        self.write_layout(&layout, runs, Writes::new(), Batch::default())
    }
}

fn record<T>(value: Option<Value>, decode: impl Fn(&[u8]) -> T, expected: usize) -> StoreResult<Option<T>> {
    match value {
        None => Ok(None),
        Some(bytes) if bytes.len() == expected => Ok(Some(decode(&bytes))),
        Some(bytes) => {
            Err(StoreError::Corrupt(format!("record of {} bytes, expected {expected}", bytes.len())))
        }
    }
}

impl Store for RunStore {
    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        if let Some(account) = self.inner.accounts.lock().unwrap().accounts.get(&id) {
            return Ok(Some(*account));
        }
        let key = id.to_be_bytes();
        let hash = KeyHash::of(&key);
        let runs = self.inner.current_runs();
        for run in runs.of(Kind::Accounts).iter().rev() {
            if !run.may_contain(&self.inner.pages, hash)? {
                continue;
            }
            let found = run.get(&self.inner.pages, &key, |value| {
                (value.len() == codec::RECORD_BYTES).then(|| codec::decode_account(value))
            })?;
            match found {
                Some(Some(account)) => {
                    self.inner.accounts.lock().unwrap().insert(account);
                    return Ok(Some(account));
                }
                Some(None) => return Err(StoreError::Corrupt(format!("account {id}: record length"))),
                None => {}
            }
        }
        Ok(None)
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        match self.ids_lookup(id)? {
            None => Ok(None),
            Some(value) if value & FAILED_MARK != 0 => Ok(None),
            Some(timestamp) => match self.transfer_at(timestamp)? {
                Some(transfer) if transfer.id == id => Ok(Some(transfer)),
                _ => {
                    Err(StoreError::Corrupt(format!("transfer {id} is indexed at {timestamp} but not there")))
                }
            },
        }
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        let value = self.inner.pages.get(&codec::id_key(PREFIX_PENDING, id))?;
        match record(value, |bytes| PendingStatus::from_u8(bytes[0]), 1)? {
            None => Ok(None),
            Some(Some(status)) => Ok(Some(status)),
            Some(None) => Err(StoreError::Corrupt("pending status byte".into())),
        }
    }

    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
        match self.ids_lookup(id)? {
            Some(value) if value & FAILED_MARK != 0 => codec::decode_failed(&(value as u32).to_le_bytes())
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt(format!("failed id {id}: {value:x}"))),
            _ => Ok(None),
        }
    }

    fn next_expiry(&self) -> StoreResult<Option<u64>> {
        match self.inner.pages.scan_prefix(&[PREFIX_EXPIRY]).next() {
            None => Ok(None),
            Some(entry) => Ok(Some(codec::decode_expiry_key(&entry?.0).0)),
        }
    }

    fn first_expiries(&self, count: usize) -> StoreResult<Vec<(u64, u128)>> {
        let mut first = Vec::with_capacity(count.min(1024));
        for entry in self.inner.pages.scan_prefix(&[PREFIX_EXPIRY]).take(count) {
            first.push(codec::decode_expiry_key(&entry?.0));
        }
        Ok(first)
    }

    fn expiries_due(&self, now: u64) -> StoreResult<Vec<(u64, u128)>> {
        let start = [PREFIX_EXPIRY];
        let end = codec::expiry_key(now, u128::MAX);
        let mut due = Vec::new();
        for entry in self.inner.pages.range(&start[..]..=&end[..]) {
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
        let low = codec::index_key(account_id, timestamp_min);
        let high = codec::index_key(account_id, timestamp_max);
        let runs = self.inner.current_runs();
        let hash = KeyHash::of(&account_id.to_be_bytes());
        runs::scan(
            runs.of(Kind::Index),
            &self.inner.pages,
            &low[1..],
            &high[1..],
            reversed,
            Some(hash),
            &mut |key, value| Ok(visit(u64::from_be_bytes(key[16..24].try_into().unwrap()), value)),
        )
    }

    fn transfer_at(&self, timestamp: u64) -> StoreResult<Option<Transfer>> {
        RunStore::transfer_at(self, timestamp)
    }

    fn scan_transfers(
        &self,
        timestamp_min: u64,
        timestamp_max: u64,
        reversed: bool,
        visit: &mut dyn FnMut(&Transfer) -> bool,
    ) -> StoreResult<()> {
        // Every zone is taken: nothing is skipped.
        self.scan_chunks(
            timestamp_min,
            timestamp_max,
            reversed,
            &|_| Ok(true),
            &mut |scanned| match scanned {
                Scanned::Transfer(transfer) => visit(transfer),
                Scanned::Skipped { .. } => true,
            },
        )
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
        let Some(kind) = Kind::of_transfer_field(field) else {
            let select = |zone: &[u8]| fields::zone_may_hold(zone, field, value);
            return self.scan_chunks(timestamp_min, timestamp_max, reversed, &select, visit);
        };
        let runs = self.inner.current_runs();
        runs::scan(
            runs.of(kind),
            &self.inner.pages,
            &runs::field_key(value, timestamp_min),
            &runs::field_key(value, timestamp_max),
            reversed,
            Some(KeyHash::of(&value.to_be_bytes())),
            &mut |key, _| {
                let timestamp = u64::from_be_bytes(key[16..24].try_into().unwrap());
                let transfer = self.transfer_at(timestamp)?.ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "query index names a transfer at {timestamp}, which is missing"
                    ))
                })?;
                Ok(visit(Scanned::Transfer(&transfer)))
            },
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
        let runs = self.inner.current_runs();
        let corrupt = || StoreError::Corrupt("account query index value".into());
        runs::scan(
            runs.of(Kind::of_account_field(field)),
            &self.inner.pages,
            &runs::field_key(value, timestamp_min),
            &runs::field_key(value, timestamp_max),
            reversed,
            field.map(|_| KeyHash::of(&value.to_be_bytes())),
            &mut |key, id| {
                let id = u128::from_be_bytes(id.try_into().map_err(|_| corrupt())?);
                Ok(visit(u64::from_be_bytes(key[16..24].try_into().unwrap()), id))
            },
        )
    }

    fn scan_changes(
        &self,
        timestamp_min: u64,
        visit: &mut dyn FnMut(&ChangeRecord) -> bool,
    ) -> StoreResult<()> {
        let pages = &self.inner.pages;
        let start = chunk_start(pages, codec::change_key(timestamp_min))?;
        for entry in
            pages.range::<[u8]>((Bound::Included(&start[..]), Bound::Excluded(&[PREFIX_CHANGE + 1][..])))
        {
            let (_, chunk) = entry?;
            for (timestamp, bytes) in change_records(&chunk)? {
                if timestamp < timestamp_min {
                    continue;
                }
                let change = codec::decode_change(timestamp, bytes)
                    .ok_or_else(|| StoreError::Corrupt(format!("change record at {timestamp}")))?;
                if !visit(&change) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn meta_raw(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.inner.pages.get(key)?.map(|value| value.to_vec()))
    }

    fn commit(&mut self, changes: &Changes) -> StoreResult<()> {
        ledger::store::SharedStore::commit_shared(self, changes)
    }

    fn for_each_record(&self, visit: &mut RecordVisitor) -> StoreResult<()> {
        export(&self.inner, &self.inner.current_runs(), None, u64::MAX, visit)
    }

    fn put_records(&mut self, records: &[(Vec<u8>, Vec<u8>)]) -> StoreResult<()> {
        let mut import = self.import.take().unwrap_or_default();
        let mut batch = Batch::default();
        for (key, value) in records {
            if key.first() == Some(&PREFIX_META) && !import.finished {
                import.finish(&self.inner)?;
            }
            import.put(&self.inner, key, value, &mut batch)?;
        }
        import.flush(&self.inner)?;
        self.inner.pages.apply(batch)?;
        self.import = Some(import);
        Ok(())
    }

    fn clear(&mut self) -> StoreResult<()> {
        self.import = None;
        let mut layout = self.inner.layout.lock().unwrap();
        self.inner.pages.clear()?;
        layout.retired.clear();
        layout.garbage.clear();
        *self.inner.runs.write().unwrap() = Arc::new(Runs::default());
        self.inner.accounts.lock().unwrap().accounts.clear();
        drop(layout);
        self.inner.pages.sync()
    }

    fn is_empty(&self) -> StoreResult<bool> {
        self.inner.pages.is_empty()
    }

    fn flush(&self) -> StoreResult<()> {
        self.inner.flush()
    }
}

impl ledger::store::SharedStore for RunStore {
    /// Everything a commit changes is behind the store's own locks (the layout, the runs, the
    /// account cache), and the runs it adds appear to readers in one swap: readers and merges
    /// may go on meanwhile. Two commits must not run at once (`Checkpointed` runs one at a time).
    fn commit_shared(&self, changes: &Changes) -> StoreResult<()> {
        let batch = Self::encode_plain(changes);
        let waited = std::time::Instant::now();
        let layout = self.inner.layout.lock().unwrap();
        report_slow(|| "a commit's wait for the layout (a merge or a checkpoint held it)".into(), waited);
        self.commit_under(layout, changes, batch)
    }

    /// Not while a durable write is under way, which takes seconds at times (issue 24): a merge
    /// or its garbage collection holding the layout across one, or a checkpoint's sync, which
    /// holds the page store's writer (a commit of 11,720 transfers once waited 1,260 ms for a
    /// 1,085 ms sync on the applying thread). The layout's other holders hold it briefly.
    fn try_commit_shared(&self, changes: &Changes) -> StoreResult<bool> {
        let durable_writes = || self.inner.durable_writes.load(std::sync::atomic::Ordering::Acquire);
        if durable_writes() > 0 {
            return Ok(false);
        }
        let batch = Self::encode_plain(changes);
        let layout = match self.inner.layout.try_lock() {
            Ok(layout) if durable_writes() > 0 => {
                drop(layout);
                return Ok(false);
            }
            Ok(layout) => layout,
            Err(std::sync::TryLockError::WouldBlock) if durable_writes() > 0 => return Ok(false),
            Err(std::sync::TryLockError::WouldBlock) => self.inner.layout.lock().unwrap(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => panic!("the layout lock: {poisoned}"),
        };
        self.commit_under(layout, changes, batch).map(|()| true)
    }
}

impl RunStore {
    /// What a commit writes beside its runs, encoded before it takes the layout (merges wait for
    /// it): the plain keys, the transfer chunks with their zone maps, the change chunks.
    fn encode_plain(changes: &Changes) -> Batch {
        let mut batch = Batch::default();
        Self::plain_writes(changes, |key, value| match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        });
        for chunk in changes.transfers.chunks(CHUNK_TRANSFERS) {
            let mut value = Vec::with_capacity(chunk.len() * codec::RECORD_BYTES);
            for transfer in chunk {
                value.extend_from_slice(&codec::encode_transfer(transfer));
            }
            batch.insert(chunk_key(chunk[0].timestamp), value);
            batch.insert(fields::zone_key(chunk[0].timestamp), fields::zone_of(chunk));
        }
        for chunk in changes.changes.chunks(CHUNK_TRANSFERS) {
            batch.insert(codec::change_key(chunk[0].timestamp), encode_change_chunk(chunk));
        }
        batch
    }

    /// A commit (`SharedStore::commit_shared`), with the layout locked: `batch` (`encode_plain`)
    /// and the commit's runs, in one atomic batch.
    fn commit_under(
        &self,
        mut layout: std::sync::MutexGuard<'_, Layout>,
        changes: &Changes,
        batch: Batch,
    ) -> StoreResult<()> {
        if let Some(damage) = self.inner.damage.lock().unwrap().clone() {
            return Err(StoreError::Corrupt(format!("a merge found damage: {damage}")));
        }
        self.keep_pre_images(changes)?;
        let mut runs = (*self.inner.current_runs()).clone();
        let mut writes = Writes::new();
        // One run per kind this entry changed, each built from its entries in key order.
        let descriptions = &self.inner.descriptions;
        let mut new_run = |kind: Kind, count: usize, push: &mut dyn FnMut(&mut RunBuilder, &mut Writes)| {
            if count == 0 {
                return;
            }
            let mut builder = RunBuilder::new(kind, layout.next_run, count as u64);
            layout.next_run += 1;
            push(&mut builder, &mut writes);
            runs.kinds[kind as usize]
                .push(Arc::new(builder.finish(&mut writes, descriptions).expect("entries")));
        };
        new_run(Kind::Accounts, changes.accounts.len(), &mut |builder, writes| {
            for account in &changes.accounts {
                builder.push(&account.id.to_be_bytes(), &codec::encode_account(account), writes);
            }
        });
        let mut ids: Vec<(u128, u64)> = changes.transfers.iter().map(|t| (t.id, t.timestamp)).collect();
        ids.extend(changes.failed.iter().map(|(id, result)| (*id, FAILED_MARK | *result as u64)));
        ids.sort_unstable();
        new_run(Kind::Ids, ids.len(), &mut |builder, writes| {
            for (id, timestamp) in &ids {
                builder.push(&id.to_be_bytes(), &timestamp.to_le_bytes(), writes);
            }
        });
        let mut index: Vec<&ledger::store::IndexWrite> = changes.index.iter().collect();
        index.sort_unstable_by_key(|write| (write.account_id, write.timestamp));
        new_run(Kind::Index, index.len(), &mut |builder, writes| {
            for write in &index {
                let key = codec::index_key(write.account_id, write.timestamp);
                let value = codec::encode_index_value(write.transfer_id, write.balance.as_ref());
                builder.push(&key[1..], &value, writes);
            }
        });
        for field in fields::TRANSFER_INDEXED {
            let entries = fields::transfer_entries(&changes.transfers, field);
            let kind = Kind::of_transfer_field(field).expect("an indexed field");
            new_run(kind, entries.len(), &mut |builder, writes| {
                fields::push_transfer_entries(builder, &entries, writes)
            });
        }
        let created =
            || changes.accounts.iter().filter(|account| account.timestamp > changes.timestamp_before);
        if created().next().is_some() {
            for field in fields::ACCOUNT_FIELDS {
                let entries = fields::account_entries(created(), field);
                new_run(Kind::of_account_field(field), entries.len(), &mut |builder, writes| {
                    fields::push_account_entries(builder, &entries, writes)
                });
            }
        }
        // Not durable: the node's log is, and `flush` (a checkpoint) makes this durable with
        // every commit before it, one fsync for many entries.
        let writing = std::time::Instant::now();
        self.inner.write_layout_with(&layout, runs, writes, batch, false)?;
        report_slow(|| format!("a commit of {} transfers' pages", changes.transfers.len()), writing);
        drop(layout);
        let mut cache = self.inner.accounts.lock().unwrap();
        for account in &changes.accounts {
            cache.insert(*account);
        }
        drop(cache);
        self.signal_merges()
    }
}

#[cfg(test)]
mod tests {
    use super::runs::{FANOUT, Kind};
    use super::{Options, RunStore};
    use ledger::model::{Account, Batch, Transfer};
    use ledger::{Ledger, MemStore, Store, snapshot};
    use std::time::{Duration, Instant};

    fn apply<S: Store>(ledger: &mut Ledger<S>, entries: u64) {
        let accounts = (1..=12).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
        ledger.apply(&[Batch::CreateAccounts(accounts)], 1_000, None).unwrap();
        for entry in 0..entries {
            let transfers = (0..9u128)
                .map(|n| Transfer {
                    id: 100 + entry as u128 * 9 + n,
                    debit_account_id: 1 + (entry as u128 + n) % 12,
                    credit_account_id: 1 + (entry as u128 + n + 1) % 12,
                    amount: 1 + n,
                    ledger: 1,
                    code: 1,
                    user_data_64: entry % 7,
                    ..Transfer::default()
                })
                .collect();
            ledger.apply(&[Batch::CreateTransfers(transfers)], 2_000 + entry * 1_000, None).unwrap();
        }
    }

    fn exported(store: &impl Store) -> Vec<u8> {
        let mut bytes = Vec::new();
        snapshot::export(store, &mut bytes).unwrap();
        bytes
    }

    /// The product's two merge threads (ids and accounts; the indexes) merge every kind to
    /// where merges inside `commit` leave it, concurrently with the commits and with each other's
    /// garbage collection: the same records as in memory, every kind within its bound of runs,
    /// and the same after a reopen (nothing deleted that the layout still names).
    #[test]
    fn the_two_merge_threads_leave_every_kind_merged_and_the_records_whole() {
        let dir = tempfile::tempdir().unwrap();
        let entries = 600;
        let mut ledger = Ledger::open(RunStore::open_with(dir.path(), Options::default()).unwrap()).unwrap();
        apply(&mut ledger, entries);
        let deadline = Instant::now() + Duration::from_secs(60);
        while ledger.store().merges_due() {
            assert!(Instant::now() < deadline, "merges never caught up: {:?}", ledger.store().run_counts().0);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut in_memory = Ledger::open(MemStore::new()).unwrap();
        apply(&mut in_memory, entries);
        let expected = exported(in_memory.store());
        assert_eq!(exported(ledger.store()), expected);
        // A commit's runs hold 9-18 entries (class 1), all 601 of them at most 10,818 (class 4):
        // at most FANOUT - 1 runs for each of the four classes, whatever order the merges took.
        let (counts, _) = ledger.store().run_counts();
        for (kind, count) in Kind::ALL.into_iter().zip(counts) {
            assert!(count <= 4 * (FANOUT - 1), "{kind:?}: {count} runs of {counts:?}");
        }
        ledger.store().flush().unwrap();
        drop(ledger);
        let reopened = RunStore::open_with(dir.path(), Options::default()).unwrap();
        assert_eq!(exported(&reopened), expected);
    }

    /// Garbage a crash left (here: a large run's pages, listed as garbage) is deleted after
    /// `open` returns, by the merge threads, in small batches; reads never see it meanwhile.
    /// Without merge threads, `open` deletes it itself.
    #[test]
    fn garbage_left_by_a_crash_is_deleted_after_open_by_the_merge_threads() {
        use super::runs::{PREFIX_PAGE, Writes, run_key_range};
        use super::{DELETES_PER_BATCH, pages};
        let pages_of_garbage = 3 * DELETES_PER_BATCH + 5;
        for background_merges in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let options = Options { background_merges, ..Options::default() };
            let mut ledger = Ledger::open(RunStore::open_with(dir.path(), options).unwrap()).unwrap();
            apply(&mut ledger, 20);
            let store = ledger.into_store();
            let inner = store.inner.clone();
            let garbage_run = {
                let mut layout = inner.layout.lock().unwrap();
                let id = layout.next_run;
                layout.next_run += 1;
                layout.garbage.push((Kind::Ids, id));
                let mut batch = pages::Batch::default();
                let keys = run_key_range(PREFIX_PAGE, Kind::Ids, id);
                for number in 0..pages_of_garbage as u32 {
                    let mut key = keys.start;
                    key[10..].copy_from_slice(&number.to_be_bytes());
                    batch.insert(key, vec![0xab; 64]);
                }
                inner.write_layout(&layout, (*inner.current_runs()).clone(), Writes::new(), batch).unwrap();
                id
            };
            let expected = exported(&store);
            drop((store, inner));
            let garbage_keys = |store: &RunStore| {
                store.inner.pages.range(run_key_range(PREFIX_PAGE, Kind::Ids, garbage_run)).count()
            };

            let reopened = RunStore::open_with(dir.path(), options).unwrap();
            assert_eq!(exported(&reopened), expected, "merges {background_merges}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while garbage_keys(&reopened) > 0 || !reopened.inner.layout.lock().unwrap().garbage.is_empty() {
                assert!(!background_merges || Instant::now() < deadline, "the garbage is never deleted");
                assert!(background_merges, "without merge threads, open deletes the garbage");
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(reopened);
            let reopened = RunStore::open_with(dir.path(), options).unwrap();
            assert_eq!(exported(&reopened), expected, "merges {background_merges}");
            assert!(
                reopened.inner.layout.lock().unwrap().garbage.is_empty(),
                "the deletion was made durable"
            );
        }
    }

    /// While a merge holds the layout across a durable write, or a checkpoint's sync holds the
    /// page store's writer (seconds at times), a full batch is not committed to the store, which
    /// would wait for it, but kept in memory over it; once they are done, it is committed
    /// directly.
    #[test]
    fn a_full_batch_does_not_wait_for_a_merge_or_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        // No merge threads: the merge here is the test's own (a real one would make the last
        // assertion depend on timing).
        let store =
            RunStore::open_with(dir.path(), Options { background_merges: false, ..Options::default() });
        let mut ledger = Ledger::open(ledger::checkpoint::Checkpointed::new(store.unwrap())).unwrap();
        let full = ledger::checkpoint::DIRECT_RECORDS_MIN as u128;
        let accounts = |first: u128| {
            let accounts =
                (first..first + full).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() });
            Batch::CreateAccounts(accounts.collect())
        };
        let inner = ledger.store().base().inner.clone();
        let held = inner.layout.lock().unwrap();
        let durable = super::DurableWrite::start(&inner.durable_writes);
        ledger.apply(&[accounts(1)], 1_000, None).unwrap();
        assert_eq!(ledger.store().recent_commits(), 1, "kept in memory");
        assert!(ledger.store().base().account(1).unwrap().is_none(), "not in the store");
        assert!(ledger.store().account(1).unwrap().is_some(), "read from memory");
        drop(held);
        // A checkpoint's sync holds the page store's writer, not the layout: the same.
        ledger.apply(&[accounts(1 + full)], 1_500, None).unwrap();
        assert_eq!(ledger.store().recent_commits(), 2, "kept in memory while a sync runs");
        assert!(ledger.store().base().account(1 + full).unwrap().is_none(), "not in the store");
        drop(durable);
        ledger.store_mut().checkpoint().unwrap();
        ledger.apply(&[accounts(1 + 2 * full)], 2_000, None).unwrap();
        assert_eq!(ledger.store().recent_commits(), 0, "committed directly");
        assert!(ledger.store().base().account(1 + 2 * full).unwrap().is_some());
    }
}
