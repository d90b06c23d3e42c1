//! Immutable sorted runs: the shape in which `RunStore` keeps everything looked up by key.
//!
//! A run is a sorted sequence of `(key, value)` entries written once and never changed, cut into
//! pages of about 8 KiB, each page one page-store value under `R | kind | run id | page number`. Its
//! description (the first key of every page, its last key, and a Bloom filter over the first 16
//! bytes of every key) is kept in memory and persisted beside the pages, under
//! `F | kind | run id | chunk`. A lookup tests the filters of a kind's runs, newest first, and
//! reads one page of each run whose filter says yes; a range scan merges cursors over the runs.
//! When a key is in several runs (an account changed twice), the newest run's value wins.
//!
//! Page format: `count u16 | offset u16 x count | entries`, an entry `key | value length u8 |
//! value`, keys strictly increasing. Offsets make a page binary-searchable in place.

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use foldhash::HashMap;

use super::filter::{self, BLOCK_BYTES, Filter, KeyHash};
use super::pages::{Pages, Value};
use ledger::model::Field;
use ledger::store::{StoreError, StoreResult};

/// Small, so that a cold lookup reads little; 128 bytes under 8 KiB, so that a page and what redb
/// keeps beside it fit 8 KiB of its file (a value of exactly 8 KiB takes 16: the disk doubled).
pub const PAGE_BYTES: usize = 8 * 1024 - 128;
/// Runs of a kind merge when this many similar-sized runs sit at the newest end.
pub const FANOUT: usize = 8;
pub const PREFIX_PAGE: u8 = b'R';
pub const PREFIX_RUN_META: u8 = b'F';

/// What a run holds. Keys are big-endian, so byte order is numeric order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// account id -> account record: the newest version of each account.
    Accounts = 0,
    /// transfer id -> timestamp (u64 little-endian): where the transfer sits in the log.
    Ids = 1,
    /// (account id, timestamp) -> transfer id, and the balances after it for accounts with
    /// `history`: the per-account index.
    Index = 2,
    /// The query indexes of the fields that tell records apart, one kind per field: (value,
    /// timestamp) -> nothing for transfers (the timestamp finds the transfer's chunk), -> account
    /// id for accounts. Zero values are not indexed (a zero in a filter means "any"). A
    /// transfer's ledger and code, which few values share among many transfers, have zone maps
    /// instead (`fields.rs`). Derived from the records, so neither snapshots nor the digest carry
    /// them: a store builds them as it writes or imports.
    TransferUserData128 = 3,
    TransferUserData64 = 4,
    TransferUserData32 = 5,
    AccountUserData128 = 6,
    AccountUserData64 = 7,
    AccountUserData32 = 8,
    AccountLedger = 9,
    AccountCode = 10,
    /// (0, timestamp) -> account id, for every account: accounts in time order.
    AccountTimes = 11,
}

/// How many kinds there are: the length of the layout's lists.
pub const KINDS: usize = 12;

impl Kind {
    pub const ALL: [Kind; KINDS] = [
        Kind::Accounts,
        Kind::Ids,
        Kind::Index,
        Kind::TransferUserData128,
        Kind::TransferUserData64,
        Kind::TransferUserData32,
        Kind::AccountUserData128,
        Kind::AccountUserData64,
        Kind::AccountUserData32,
        Kind::AccountLedger,
        Kind::AccountCode,
        Kind::AccountTimes,
    ];

    /// The query index of a transfer field; `None` for ledger and code (zone maps).
    pub fn of_transfer_field(field: Field) -> Option<Kind> {
        match field {
            Field::UserData128 => Some(Kind::TransferUserData128),
            Field::UserData64 => Some(Kind::TransferUserData64),
            Field::UserData32 => Some(Kind::TransferUserData32),
            Field::Ledger | Field::Code => None,
        }
    }

    /// The query index of an account field; `None`: every account, by time.
    pub fn of_account_field(field: Option<Field>) -> Kind {
        match field {
            Some(Field::UserData128) => Kind::AccountUserData128,
            Some(Field::UserData64) => Kind::AccountUserData64,
            Some(Field::UserData32) => Kind::AccountUserData32,
            Some(Field::Ledger) => Kind::AccountLedger,
            Some(Field::Code) => Kind::AccountCode,
            None => Kind::AccountTimes,
        }
    }

    pub fn key_bytes(self) -> usize {
        match self {
            Kind::Accounts | Kind::Ids => 16,
            _ => 24,
        }
    }

    /// Which merge thread merges this kind's runs. Ids and accounts are looked up for every
    /// transfer, so their runs must never pile up behind a long merge of an index (the
    /// per-account index is most of the bytes: two entries per transfer, and its largest merges
    /// take minutes at 100M transfers); the indexes have a thread of their own.
    pub fn lane(self) -> Lane {
        match self {
            Kind::Accounts | Kind::Ids => Lane::Lookups,
            _ => Lane::Indexes,
        }
    }

    pub fn from_u8(tag: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| *kind as u8 == tag)
    }
}

/// A merge thread's share of the kinds (`Kind::lane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Lookups = 0,
    Indexes = 1,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Lookups, Lane::Indexes];
}

/// A query index key: the field's value, then the record's timestamp.
pub fn field_key(value: u128, timestamp: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&value.to_be_bytes());
    key[16..].copy_from_slice(&timestamp.to_be_bytes());
    key
}

fn physical_key(prefix: u8, kind: Kind, run: u64, number: u32) -> [u8; 14] {
    let mut key = [0u8; 14];
    key[0] = prefix;
    key[1] = kind as u8;
    key[2..10].copy_from_slice(&run.to_be_bytes());
    key[10..].copy_from_slice(&number.to_be_bytes());
    key
}

/// The page store key of chunk `number` of a run's description.
pub fn description_chunk_key(kind: Kind, run: u64, number: u32) -> [u8; 14] {
    physical_key(PREFIX_RUN_META, kind, run, number)
}

/// The range of physical keys (pages or description chunks) of one run.
pub fn run_key_range(prefix: u8, kind: Kind, run: u64) -> Range<[u8; 14]> {
    physical_key(prefix, kind, run, 0)..physical_key(prefix, kind, run + 1, 0)
}

/// Byte order of two keys of one kind (16 or 24 bytes), compared as big-endian integers: the
/// same order as comparing the bytes, without a call to `memcmp` for every step of a search.
fn compare(a: &[u8], b: &[u8]) -> Ordering {
    debug_assert_eq!(a.len(), b.len());
    let high = |key: &[u8]| u128::from_be_bytes(key[..16].try_into().unwrap());
    let low = |key: &[u8]| u64::from_be_bytes(key[16..24].try_into().unwrap());
    match a.len() {
        16 => high(a).cmp(&high(b)),
        24 => (high(a), low(a)).cmp(&(high(b), low(b))),
        _ => a.cmp(b),
    }
}

fn filter_key(key: &[u8]) -> [u8; 16] {
    key[..16].try_into().unwrap()
}

/// One run's description: what a lookup needs before it reads a page. Its counts, first and last
/// keys are always in memory; its page fences and Bloom filter (about 10 bits a key, most of it)
/// are held whole while the store's budget for descriptions allows (`Descriptions`), and are
/// otherwise read from the page store a group at a time, through a bounded cache. So memory is
/// bounded by configuration at any ledger size; past the budget, lookups in the runs that did
/// not fit (the largest: a store holds the smaller ones first) cost a cache probe, or a read.
pub struct Run {
    pub kind: Kind,
    pub id: u64,
    pub entries: u64,
    /// Distinct filter keys (first 16 bytes of the key): what a merge sizes its filter by.
    pub distinct: u64,
    pages: usize,
    first_key: Vec<u8>,
    last_key: Vec<u8>,
    filter_blocks: usize,
    body: Body,
}

enum Body {
    /// The fences (the first key of every page, `key_bytes` each) and the filter, decoded.
    Held { fences: Vec<u8>, filter: Filter, reserved: u64, descriptions: Arc<Descriptions> },
    /// Read through the cache. `sample`: the first fence of every group of `FENCES_PER_GROUP`,
    /// which names the one group a search needs.
    Paged { sample: Vec<u8>, descriptions: Arc<Descriptions> },
}

/// Fences per group read and cached together (4 or 6 KiB).
const FENCES_PER_GROUP: usize = 256;
/// Filter blocks per group read and cached together (8 KiB).
const BLOCKS_PER_GROUP: usize = 128;
/// The description's header: entries, distinct keys, pages.
const HEADER_BYTES: usize = 24;

/// The store's budget for descriptions held whole, and the cache of the groups read for the
/// others. Shared by a store's runs; a held description gives its bytes back when its run is
/// dropped (merged away and no longer read).
pub struct Descriptions {
    held_max: u64,
    held: AtomicU64,
    groups: Mutex<GroupCache>,
}

#[derive(Default)]
struct GroupCache {
    groups: HashMap<GroupKey, Value>,
    bytes: usize,
    capacity: usize,
}

/// (kind, run id, section: 0 fences, 1 filter, group number).
type GroupKey = (u8, u64, u8, usize);

impl Descriptions {
    /// A budget of `bytes`: seven eighths for descriptions held whole, one eighth for the cache
    /// of groups read from the others.
    pub fn new(bytes: u64) -> Arc<Descriptions> {
        Arc::new(Descriptions {
            held_max: bytes / 8 * 7,
            held: AtomicU64::new(0),
            groups: Mutex::new(GroupCache { capacity: (bytes / 8) as usize, ..GroupCache::default() }),
        })
    }

    /// Descriptions held whole, and the cache, in bytes.
    pub fn resident_bytes(&self) -> u64 {
        self.held.load(AtomicOrdering::Relaxed) + self.groups.lock().unwrap().bytes as u64
    }

    fn reserve(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.held_max)
            })
            .is_ok()
    }

    /// Whether `bytes` more would fit in the budget now (`assemble` reserves them).
    fn fits(&self, bytes: u64) -> bool {
        self.held.load(AtomicOrdering::Relaxed).checked_add(bytes).is_some_and(|total| total <= self.held_max)
    }

    fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, AtomicOrdering::Relaxed);
    }

    fn cached(&self, key: GroupKey) -> Option<Value> {
        self.groups.lock().unwrap().groups.get(&key).cloned()
    }

    fn keep(&self, key: GroupKey, group: Value) {
        let mut cache = self.groups.lock().unwrap();
        if cache.bytes + group.len() > cache.capacity {
            // Full: an arbitrary eighth goes (as the account cache does).
            let drop: Vec<GroupKey> = cache.groups.keys().step_by(8).copied().collect();
            for key in drop {
                if let Some(gone) = cache.groups.remove(&key) {
                    cache.bytes -= gone.len();
                }
            }
        }
        if cache.bytes + group.len() <= cache.capacity {
            cache.bytes += group.len();
            if let Some(replaced) = cache.groups.insert(key, group) {
                cache.bytes -= replaced.len();
            }
        }
    }
}

impl Run {
    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn last_key(&self) -> &[u8] {
        &self.last_key
    }

    pub fn first_key(&self) -> &[u8] {
        &self.first_key
    }

    /// Whether the fences and filter are held in memory (rather than read through the cache).
    pub fn is_held(&self) -> bool {
        matches!(self.body, Body::Held { .. })
    }

    /// Memory this description takes: what is always resident, and the fences and filter if held.
    pub fn resident_bytes(&self) -> usize {
        let always = self.first_key.len() + self.last_key.len() + 64;
        match &self.body {
            Body::Held { fences, filter, .. } => always + fences.len() + filter.bytes(),
            Body::Paged { sample, .. } => always + sample.len(),
        }
    }

    /// A size class: runs of one class are within a factor of `FANOUT` of each other.
    pub fn class(&self) -> u32 {
        self.entries.max(1).ilog(FANOUT as u64)
    }

    /// Whether the run may hold a key whose first 16 bytes hash to `hash`.
    pub fn may_contain(&self, pages: &Pages, hash: KeyHash) -> StoreResult<bool> {
        match &self.body {
            Body::Held { filter, .. } => Ok(filter.may_contain(hash)),
            Body::Paged { descriptions, .. } => {
                let block = filter::block_of(hash, self.filter_blocks);
                let group = self.group(pages, descriptions, 1, block / BLOCKS_PER_GROUP)?;
                let at = block % BLOCKS_PER_GROUP * BLOCK_BYTES;
                let bytes = group.get(at..at + BLOCK_BYTES).ok_or_else(|| self.corrupt())?;
                Ok(filter::persisted_block_may_contain(bytes, hash))
            }
        }
    }

    /// The last page whose first key is at or before `key`, if `key` is within the run's range.
    pub(super) fn page_for(&self, pages: &Pages, key: &[u8]) -> StoreResult<Option<usize>> {
        if key < self.first_key.as_slice() || key > self.last_key.as_slice() {
            return Ok(None);
        }
        let width = self.kind.key_bytes();
        Ok(Some(match &self.body {
            Body::Held { fences, .. } => last_at_or_before(fences, width, key),
            Body::Paged { sample, descriptions } => {
                let group = last_at_or_before(sample, width, key);
                let fences = self.group(pages, descriptions, 0, group)?;
                group * FENCES_PER_GROUP + last_at_or_before(&fences, width, key)
            }
        }))
    }

    /// Group `number` of a paged description's fences (`section` 0) or filter blocks (1).
    fn group(
        &self,
        pages: &Pages,
        descriptions: &Descriptions,
        section: u8,
        number: usize,
    ) -> StoreResult<Value> {
        let key = (self.kind as u8, self.id, section, number);
        if let Some(group) = descriptions.cached(key) {
            return Ok(group);
        }
        let width = self.kind.key_bytes();
        let range = if section == 0 {
            let first = number * FENCES_PER_GROUP;
            let end = (first + FENCES_PER_GROUP).min(self.pages);
            HEADER_BYTES + first * width..HEADER_BYTES + end * width
        } else {
            let blocks = HEADER_BYTES + self.pages * width + width + 8;
            let first = number * BLOCKS_PER_GROUP;
            let end = (first + BLOCKS_PER_GROUP).min(self.filter_blocks);
            blocks + first * BLOCK_BYTES..blocks + end * BLOCK_BYTES
        };
        if range.is_empty() {
            return Err(self.corrupt());
        }
        let group = Value::from(read_description(pages, self.kind, self.id, range)?);
        descriptions.keep(key, group.clone());
        Ok(group)
    }

    fn corrupt(&self) -> StoreError {
        StoreError::Corrupt(format!("description of {:?} run {}", self.kind, self.id))
    }

    fn load_page(&self, pages: &Pages, page: usize) -> StoreResult<Page> {
        let key = physical_key(PREFIX_PAGE, self.kind, self.id, page as u32);
        let bytes = pages.get(&key)?.ok_or_else(|| {
            StoreError::Corrupt(format!("page {page} of {:?} run {} is missing", self.kind, self.id))
        })?;
        Page::new(bytes, self.kind.key_bytes())
    }

    /// The value stored under `key` in this run, passed to `read`.
    pub fn get<T>(&self, pages: &Pages, key: &[u8], read: impl FnOnce(&[u8]) -> T) -> StoreResult<Option<T>> {
        let Some(page) = self.page_for(pages, key)? else { return Ok(None) };
        let page = self.load_page(pages, page)?;
        let position = page.lower_bound(key);
        if position < page.count() && page.key(position) == key {
            return Ok(Some(read(page.value(position))));
        }
        Ok(None)
    }

    /// The persisted description of a run built in memory: header, fences, last key, filter.
    fn encode(
        entries: u64,
        distinct: u64,
        fences: &[u8],
        last_key: &[u8],
        filter: &Filter,
        width: usize,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + fences.len() + last_key.len() + filter.bytes() + 8);
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&distinct.to_le_bytes());
        out.extend_from_slice(&((fences.len() / width) as u64).to_le_bytes());
        out.extend_from_slice(fences);
        out.extend_from_slice(last_key);
        filter.encode_into(&mut out);
        out
    }

    /// A run from its parts: held whole if the budget allows, else paged.
    fn assemble(
        kind: Kind,
        id: u64,
        (entries, distinct): (u64, u64),
        fences: Vec<u8>,
        last_key: Vec<u8>,
        filter: Filter,
        descriptions: &Arc<Descriptions>,
    ) -> Run {
        let width = kind.key_bytes();
        let pages = fences.len() / width;
        let first_key = fences[..width].to_vec();
        let filter_blocks = filter.bytes() / BLOCK_BYTES;
        let reserved = (fences.len() + filter.bytes()) as u64;
        let body = if descriptions.reserve(reserved) {
            Body::Held { fences, filter, reserved, descriptions: descriptions.clone() }
        } else {
            Body::Paged { sample: sample(&fences, width), descriptions: descriptions.clone() }
        };
        Run { kind, id, entries, distinct, pages, first_key, last_key, filter_blocks, body }
    }

    /// Reads a run's description back from the page store: whole if the budget allows, else
    /// its header, last key and the sample of its fences.
    pub fn load(pages: &Pages, kind: Kind, id: u64, descriptions: &Arc<Descriptions>) -> StoreResult<Run> {
        let corrupt = || StoreError::Corrupt(format!("description of {kind:?} run {id}"));
        let width = kind.key_bytes();
        let header = read_description(pages, kind, id, 0..HEADER_BYTES)?;
        let (entries, distinct, page_count, blocks_start) = decode_header(kind, id, &header)?;
        // Fences, last key and the filter's block count.
        let bytes = read_description(pages, kind, id, 0..blocks_start)?;
        let filter_blocks =
            usize::try_from(u64::from_le_bytes(bytes[blocks_start - 8..].try_into().unwrap()))
                .ok()
                .filter(|blocks| *blocks > 0)
                .ok_or_else(corrupt)?;
        let filter_bytes = filter_blocks.checked_mul(BLOCK_BYTES).ok_or_else(corrupt)?;
        let length = blocks_start.checked_add(filter_bytes).ok_or_else(corrupt)?;
        let fences_end = HEADER_BYTES + page_count * width;
        let held = (page_count * width + filter_bytes) as u64;
        if descriptions.fits(held) {
            let mut whole = bytes;
            whole.extend_from_slice(&read_description(pages, kind, id, blocks_start..length)?);
            return Run::decode_with(kind, id, &whole, descriptions);
        }
        if !read_description(pages, kind, id, length..length + 1).is_err_and(|error| error.is_damage()) {
            return Err(corrupt()); // longer than its filter says
        }
        let fences = &bytes[HEADER_BYTES..fences_end];
        Ok(Run {
            kind,
            id,
            entries,
            distinct,
            pages: page_count,
            first_key: fences[..width].to_vec(),
            last_key: bytes[fences_end..fences_end + width].to_vec(),
            filter_blocks,
            body: Body::Paged { sample: sample(fences, width), descriptions: descriptions.clone() },
        })
    }

    /// A run's description from its persisted form, held whole (fuzzing and tests).
    #[cfg(test)]
    pub(super) fn decode(kind: Kind, id: u64, bytes: &[u8]) -> StoreResult<Run> {
        Run::decode_with(kind, id, bytes, &Descriptions::new(u64::MAX))
    }

    /// A run's description from its persisted form; damaged bytes are refused.
    fn decode_with(kind: Kind, id: u64, bytes: &[u8], descriptions: &Arc<Descriptions>) -> StoreResult<Run> {
        let corrupt = || StoreError::Corrupt(format!("description of {kind:?} run {id}"));
        let (entries, distinct, pages, _) = decode_header(kind, id, bytes)?;
        let width = kind.key_bytes();
        let fences_end = HEADER_BYTES + pages * width;
        let last_end = fences_end + width;
        let fences = bytes.get(HEADER_BYTES..fences_end).ok_or_else(corrupt)?.to_vec();
        let last_key = bytes.get(fences_end..last_end).ok_or_else(corrupt)?.to_vec();
        let (filter, rest) = Filter::decode(&bytes[last_end..]).ok_or_else(corrupt)?;
        if !rest.is_empty() {
            return Err(corrupt());
        }
        Ok(Run::assemble(kind, id, (entries, distinct), fences, last_key, filter, descriptions))
    }

    /// The persisted form (tests: what a decoded run encodes back to).
    #[cfg(test)]
    pub(super) fn encode_again(&self) -> Vec<u8> {
        let Body::Held { fences, filter, .. } = &self.body else { panic!("a paged run") };
        Run::encode(self.entries, self.distinct, fences, &self.last_key, filter, self.kind.key_bytes())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Body::Held { reserved, descriptions, .. } = &self.body {
            descriptions.release(*reserved);
        }
    }
}

/// The header of a description (`bytes`, at least its first 24): entries, distinct keys, pages,
/// and where the filter's blocks begin (after the fences, the last key and the block count). The
/// counts came off the disk: every sum and product is checked.
fn decode_header(kind: Kind, id: u64, bytes: &[u8]) -> StoreResult<(u64, u64, usize, usize)> {
    let corrupt = || StoreError::Corrupt(format!("description of {kind:?} run {id}"));
    let number = |at: usize| -> StoreResult<u64> {
        Ok(u64::from_le_bytes(bytes.get(at..at + 8).ok_or_else(corrupt)?.try_into().unwrap()))
    };
    let (entries, distinct, pages) = (number(0)?, number(8)?, number(16)?);
    let width = kind.key_bytes();
    let pages = usize::try_from(pages).ok().filter(|pages| *pages > 0).ok_or_else(corrupt)?;
    let blocks_start = pages
        .checked_mul(width)
        .and_then(|fences| fences.checked_add(HEADER_BYTES + width + 8))
        .ok_or_else(corrupt)?;
    Ok((entries, distinct, pages, blocks_start))
}

/// The index of the last of `keys` (`width` bytes each, sorted, the first at or before `key`)
/// that is at or before `key`.
fn last_at_or_before(keys: &[u8], width: usize, key: &[u8]) -> usize {
    let key_at = |index: usize| &keys[index * width..(index + 1) * width];
    let (mut low, mut high) = (0, keys.len() / width);
    while high - low > 1 {
        let middle = (low + high) / 2;
        if compare(key_at(middle), key) != Ordering::Greater {
            low = middle;
        } else {
            high = middle;
        }
    }
    low
}

/// The first fence of every group of `FENCES_PER_GROUP`.
fn sample(fences: &[u8], width: usize) -> Vec<u8> {
    fences.chunks(width * FENCES_PER_GROUP).flat_map(|group| &group[..width]).copied().collect()
}

/// Bytes `range` of a run's persisted description, from the chunks that hold them.
fn read_description(pages: &Pages, kind: Kind, id: u64, range: Range<usize>) -> StoreResult<Vec<u8>> {
    let missing = || StoreError::Corrupt(format!("description of {kind:?} run {id} is cut short"));
    // The range may come from damaged counts: memory grows with what is read, not with it.
    let mut out = Vec::with_capacity(range.len().min(4 * PAGE_BYTES));
    let mut at = range.start;
    while at < range.end {
        let number = at / PAGE_BYTES;
        let chunk =
            pages.get(&physical_key(PREFIX_RUN_META, kind, id, number as u32))?.ok_or_else(missing)?;
        let start = at - number * PAGE_BYTES;
        let end = (range.end - number * PAGE_BYTES).min(chunk.len());
        out.extend_from_slice(chunk.get(start..end).filter(|bytes| !bytes.is_empty()).ok_or_else(missing)?);
        at = number * PAGE_BYTES + end;
    }
    Ok(out)
}

/// One page, read in place.
pub(super) struct Page {
    bytes: Value,
    key_bytes: usize,
}

impl Page {
    pub(super) fn new(bytes: Value, key_bytes: usize) -> StoreResult<Page> {
        let page = Page { bytes, key_bytes };
        let count = page.bytes.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
        // Every entry's key, length byte and value within the page: the bytes came off the disk,
        // and a damaged length made `value` panic instead of reporting damage.
        let len = page.bytes.len();
        let fits = count.is_some_and(|count| {
            count > 0
                && len >= 2 + 2 * count
                && (0..count).all(|i| {
                    let at = page.offset(i) + key_bytes;
                    at < len && at + 1 + page.bytes[at] as usize <= len
                })
        });
        if !fits {
            return Err(StoreError::Corrupt("run page layout".into()));
        }
        Ok(page)
    }

    pub(super) fn count(&self) -> usize {
        u16::from_le_bytes([self.bytes[0], self.bytes[1]]) as usize
    }

    fn offset(&self, position: usize) -> usize {
        let at = 2 + 2 * position;
        let bytes: &[u8] = &self.bytes;
        u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize
    }

    pub(super) fn key(&self, position: usize) -> &[u8] {
        let at = self.offset(position);
        &self.bytes[at..at + self.key_bytes]
    }

    pub(super) fn value(&self, position: usize) -> &[u8] {
        let at = self.offset(position) + self.key_bytes;
        let length = self.bytes[at] as usize;
        &self.bytes[at + 1..at + 1 + length]
    }

    /// The first position whose key is not before `key`.
    pub(super) fn lower_bound(&self, key: &[u8]) -> usize {
        let (mut low, mut high) = (0, self.count());
        while low < high {
            let middle = (low + high) / 2;
            if compare(self.key(middle), key) == Ordering::Less {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        low
    }
}

/// Writes a run from entries given in strictly increasing key order. Pages and description
/// chunks go to `out` as `(page store key, value)` for the caller to write; the run exists once its
/// id is in the layout.
pub struct RunBuilder {
    kind: Kind,
    id: u64,
    page: Vec<u8>,
    offsets: Vec<u16>,
    fences: Vec<u8>,
    last_key: Vec<u8>,
    filter: Filter,
    last_filter_key: Option<[u8; 16]>,
    entries: u64,
    distinct: u64,
}

pub type Writes = Vec<(Vec<u8>, Vec<u8>)>;

/// Visits an entry: key, value; returns whether to go on.
pub type EntryVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> StoreResult<bool> + 'a;

impl RunBuilder {
    /// `distinct_max`: at most this many distinct filter keys will be pushed (sizes the filter).
    pub fn new(kind: Kind, id: u64, distinct_max: u64) -> RunBuilder {
        RunBuilder {
            kind,
            id,
            page: Vec::with_capacity(PAGE_BYTES),
            offsets: Vec::new(),
            fences: Vec::new(),
            last_key: Vec::new(),
            filter: Filter::with_capacity(distinct_max),
            last_filter_key: None,
            entries: 0,
            distinct: 0,
        }
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Whether `key` may come next: the right length, after the last key pushed.
    pub fn accepts(&self, key: &[u8]) -> bool {
        key.len() == self.kind.key_bytes() && (self.entries == 0 || key > self.last_key.as_slice())
    }

    pub fn push(&mut self, key: &[u8], value: &[u8], out: &mut Writes) {
        assert_eq!(key.len(), self.kind.key_bytes(), "{:?} key length", self.kind);
        assert!(value.len() <= u8::MAX as usize, "run value of {} bytes", value.len());
        assert!(self.entries == 0 || key > self.last_key.as_slice(), "run keys out of order");
        let entry_bytes = key.len() + 1 + value.len();
        if 2 + 2 * (self.offsets.len() + 1) + self.page.len() + entry_bytes > PAGE_BYTES {
            self.flush_page(out);
        }
        if self.offsets.is_empty() {
            self.fences.extend_from_slice(key);
        }
        self.offsets.push(self.page.len() as u16);
        self.page.extend_from_slice(key);
        self.page.push(value.len() as u8);
        self.page.extend_from_slice(value);
        let filter_key = filter_key(key);
        if self.last_filter_key != Some(filter_key) {
            self.filter.insert(KeyHash::of(&filter_key));
            self.last_filter_key = Some(filter_key);
            self.distinct += 1;
        }
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.entries += 1;
    }

    fn flush_page(&mut self, out: &mut Writes) {
        if self.offsets.is_empty() {
            return;
        }
        let header = 2 + 2 * self.offsets.len();
        let mut bytes = Vec::with_capacity(header + self.page.len());
        bytes.extend_from_slice(&(self.offsets.len() as u16).to_le_bytes());
        for offset in &self.offsets {
            bytes.extend_from_slice(&(offset + header as u16).to_le_bytes());
        }
        bytes.extend_from_slice(&self.page);
        let number = self.fences.len() / self.kind.key_bytes() - 1;
        out.push((physical_key(PREFIX_PAGE, self.kind, self.id, number as u32).to_vec(), bytes));
        self.page.clear();
        self.offsets.clear();
    }

    /// Writes the last page and the description; `None` when no entry was pushed.
    pub fn finish(mut self, out: &mut Writes, descriptions: &Arc<Descriptions>) -> Option<Run> {
        if self.entries == 0 {
            return None;
        }
        self.flush_page(out);
        let width = self.kind.key_bytes();
        let encoded =
            Run::encode(self.entries, self.distinct, &self.fences, &self.last_key, &self.filter, width);
        for (number, chunk) in encoded.chunks(PAGE_BYTES).enumerate() {
            out.push((
                physical_key(PREFIX_RUN_META, self.kind, self.id, number as u32).to_vec(),
                chunk.to_vec(),
            ));
        }
        let counts = (self.entries, self.distinct);
        Some(Run::assemble(self.kind, self.id, counts, self.fences, self.last_key, self.filter, descriptions))
    }
}

/// A position in one run, moving forward or backward, reading a page at a time. The current
/// key is copied out (keys are at most 24 bytes), so that merging compares plain arrays.
struct Cursor<'r> {
    run: &'r Run,
    pages: &'r Pages,
    reversed: bool,
    page_number: usize,
    page: Option<Page>,
    position: usize,
    key: [u8; 24],
    value: Range<usize>,
}

impl<'r> Cursor<'r> {
    /// At the first entry at or after `key` (backward: at or before it).
    fn seek(run: &'r Run, pages: &'r Pages, key: &[u8], reversed: bool) -> StoreResult<Cursor<'r>> {
        let mut cursor = Cursor {
            run,
            pages,
            reversed,
            page_number: 0,
            page: None,
            position: 0,
            key: [0; 24],
            value: 0..0,
        };
        if reversed {
            let page_number = match run.page_for(pages, key)? {
                Some(page) => page,
                None if key > run.last_key.as_slice() => run.pages() - 1,
                None => return Ok(cursor),
            };
            let page = run.load_page(pages, page_number)?;
            let after = page.lower_bound(key);
            let at_or_before = if after < page.count() && page.key(after) == key { after + 1 } else { after };
            // The page's first key is at or before `key`, so this page holds the answer.
            cursor.page_number = page_number;
            cursor.position = at_or_before - 1;
            cursor.page = Some(page);
        } else {
            let page_number = match run.page_for(pages, key)? {
                Some(page) => page,
                None if key < run.first_key() => 0,
                None => return Ok(cursor),
            };
            let page = run.load_page(pages, page_number)?;
            cursor.page_number = page_number;
            cursor.position = page.lower_bound(key);
            let past_end = cursor.position == page.count();
            cursor.page = Some(page);
            if past_end {
                cursor.next_page()?;
            }
        }
        cursor.copy_current();
        Ok(cursor)
    }

    fn copy_current(&mut self) {
        if let Some(page) = &self.page {
            let bytes: &[u8] = &page.bytes;
            let width = page.key_bytes;
            let at = page.offset(self.position);
            self.key[..width].copy_from_slice(&bytes[at..at + width]);
            let length = bytes[at + width] as usize;
            self.value = at + width + 1..at + width + 1 + length;
        }
    }

    fn current_key(&self) -> Option<&[u8]> {
        self.page.as_ref().map(|page| &self.key[..page.key_bytes])
    }

    fn current_value(&self) -> &[u8] {
        &self.page.as_ref().expect("a current entry").bytes[self.value.clone()]
    }

    fn advance(&mut self) -> StoreResult<()> {
        let Some(page) = &self.page else { return Ok(()) };
        if self.reversed {
            if self.position > 0 {
                self.position -= 1;
            } else if self.page_number == 0 {
                self.page = None;
            } else {
                self.page_number -= 1;
                let page = self.run.load_page(self.pages, self.page_number)?;
                self.position = page.count() - 1;
                self.page = Some(page);
            }
        } else if self.position + 1 < page.count() {
            self.position += 1;
        } else {
            self.next_page()?;
        }
        self.copy_current();
        Ok(())
    }

    fn next_page(&mut self) -> StoreResult<()> {
        self.page_number += 1;
        self.position = 0;
        self.page = if self.page_number < self.run.pages() {
            Some(self.run.load_page(self.pages, self.page_number)?)
        } else {
            None
        };
        Ok(())
    }
}

/// Visits the entries of `runs` (oldest first) with `low <= key <= high` in key order (or
/// reversed), each key once with its newest value, until `visit` returns false. `filter`, when
/// given, skips the runs whose filter does not hold it.
pub fn scan(
    runs: &[Arc<Run>],
    pages: &Pages,
    low: &[u8],
    high: &[u8],
    reversed: bool,
    filter: Option<KeyHash>,
    visit: &mut EntryVisitor,
) -> StoreResult<()> {
    let start = if reversed { high } else { low };
    let mut cursors = Vec::with_capacity(runs.len());
    for run in runs {
        let wanted = match filter {
            Some(hash) => run.may_contain(pages, hash)?,
            None => true,
        };
        if wanted {
            cursors.push(Cursor::seek(run, pages, start, reversed)?);
        }
    }
    let mut key = [0u8; 24];
    loop {
        // The next key among all cursors; on a tie the newest run (the later cursor) wins.
        let mut best: Option<(usize, &[u8])> = None;
        for (index, cursor) in cursors.iter().enumerate() {
            let Some(candidate) = cursor.current_key() else { continue };
            let better = best.is_none_or(|(_, current)| match compare(candidate, current) {
                Ordering::Equal => true,
                Ordering::Greater => reversed,
                Ordering::Less => !reversed,
            });
            if better {
                best = Some((index, candidate));
            }
        }
        let Some((best, best_key)) = best else { return Ok(()) };
        let width = best_key.len();
        key[..width].copy_from_slice(best_key);
        let key = &key[..width];
        if (reversed && key < low) || (!reversed && key > high) {
            return Ok(());
        }
        if !visit(key, cursors[best].current_value())? {
            return Ok(());
        }
        for cursor in &mut cursors {
            if cursor.current_key() == Some(key) {
                cursor.advance()?;
            }
        }
    }
}

/// Every entry of `runs`, merged: what a merge writes and what an export reads.
pub fn scan_all(runs: &[Arc<Run>], pages: &Pages, visit: &mut EntryVisitor) -> StoreResult<()> {
    let Some(first) = runs.first() else { return Ok(()) };
    let width = first.kind.key_bytes();
    scan(runs, pages, &vec![0u8; width], &vec![0xff; width], false, None, visit)
}

/// Which runs of a kind (oldest first) to merge now, if any: the newest runs of the newest run's
/// size class or smaller, once there are `FANOUT` of them. New runs are small and join the tail;
/// a merge makes a run of the next class, so classes fall from old to new and a kind holds at
/// most `FANOUT - 1` runs per class: a number of runs logarithmic in the entries (at most 7 per
/// factor of 8), each entry rewritten once per class it climbs. Every kind merges all the way:
/// a history query opens a cursor in each index run that holds its account.
///
/// A merge on a thread lags the commits, so it may take more than `FANOUT` runs and make a run
/// of a higher class than an older one, and smaller runs are left between larger ones. So each
/// class from the newest's up is looked at: the runs from the last run above it to its own last
/// run, whatever their classes, merge (with every newer run) once there are `FANOUT` of them.
/// When classes fall from old to new, that is the newest runs of the newest class, as above;
/// either way no class holds more than `FANOUT - 1` runs with the smaller ones between them.
pub fn pick_merge(runs: &[Arc<Run>]) -> Option<Range<usize>> {
    let newest = runs.last()?.class();
    let top = runs.iter().map(|run| run.class()).max().unwrap_or(newest);
    // Where the runs of class `class` or below begin, after the last run above it.
    let after_above = |class: u32| runs.iter().rposition(|run| run.class() > class).map_or(0, |i| i + 1);
    (newest..=top).find_map(|class| {
        let start = after_above(class);
        let end = if class == newest { runs.len() } else { after_above(class - 1) };
        (end - start >= FANOUT).then_some(start..runs.len())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as `RunBuilder` lays it out: a count, offsets, then key, length byte and value.
    fn page_bytes(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut bytes = (entries.len() as u16).to_le_bytes().to_vec();
        let mut at = 2 + 2 * entries.len();
        for (key, value) in entries {
            bytes.extend_from_slice(&(at as u16).to_le_bytes());
            at += key.len() + 1 + value.len();
        }
        for (key, value) in entries {
            bytes.extend_from_slice(key);
            bytes.push(value.len() as u8);
            bytes.extend_from_slice(value);
        }
        bytes
    }

    /// A page whose length byte runs past its end (damage on disk) is refused as damage when it is
    /// read, not a panic when a value is taken from it.
    #[test]
    fn a_page_with_a_value_length_past_its_end_is_damage() {
        let key = [7u8; 16];
        let good = page_bytes(&[(&key, b"abc"), (&key, b"de")]);
        let page = Page::new(Value::from(good.clone()), 16).expect("a whole page");
        assert_eq!((page.value(0), page.value(1)), (&b"abc"[..], &b"de"[..]));
        let mut damaged = good;
        let last_length = damaged.len() - 3;
        damaged[last_length] = 200;
        match Page::new(Value::from(damaged), 16) {
            Err(StoreError::Corrupt(what)) => assert!(what.contains("page"), "{what}"),
            other => panic!("a damaged length: {:?}", other.map(|_| ())),
        }
    }

    fn build(pages: &Pages, id: u64, entries: &[(u128, u64)], descriptions: &Arc<Descriptions>) -> Arc<Run> {
        let mut out = Writes::new();
        let mut builder = RunBuilder::new(Kind::Ids, id, entries.len() as u64);
        for (key, value) in entries {
            builder.push(&key.to_be_bytes(), &value.to_le_bytes(), &mut out);
        }
        let run = builder.finish(&mut out, descriptions).unwrap();
        let mut batch = super::super::pages::Batch::default();
        for (key, value) in out {
            batch.insert(key, value);
        }
        pages.apply(batch).unwrap();
        Arc::new(run)
    }

    fn collect(runs: &[Arc<Run>], pages: &Pages, low: u128, high: u128, reversed: bool) -> Vec<(u128, u64)> {
        let mut seen = Vec::new();
        scan(runs, pages, &low.to_be_bytes(), &high.to_be_bytes(), reversed, None, &mut |key, value| {
            seen.push((
                u128::from_be_bytes(key.try_into().unwrap()),
                u64::from_le_bytes(value.try_into().unwrap()),
            ));
            Ok(true)
        })
        .unwrap();
        seen
    }

    #[test]
    fn lookups_and_scans_across_pages_and_runs_with_the_newest_value_winning() {
        // Descriptions held whole, and read through the cache.
        for budget in [u64::MAX, 0] {
            lookups_and_scans(&Descriptions::new(budget));
        }
    }

    fn lookups_and_scans(descriptions: &Arc<Descriptions>) {
        let dir = tempfile::tempdir().unwrap();
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        // 5,000 entries of 25 bytes: several pages. Even keys in the old run, multiples of 3 in
        // the new one, so that multiples of 6 are in both.
        let old: Vec<(u128, u64)> = (0..5_000).map(|n| (n * 2, 1)).collect();
        let new: Vec<(u128, u64)> = (0..3_400).map(|n| (n * 3, 2)).collect();
        let runs = [build(&pages, 1, &old, descriptions), build(&pages, 2, &new, descriptions)];
        assert!(runs[0].pages() > 2);
        let reloaded = Run::load(&pages, Kind::Ids, 1, descriptions).unwrap();
        assert_eq!((reloaded.entries, reloaded.pages()), (5_000, runs[0].pages()));

        let get = |key: u128| {
            runs.iter().rev().find_map(|run| {
                run.get(&pages, &key.to_be_bytes(), |v| u64::from_le_bytes(v.try_into().unwrap())).unwrap()
            })
        };
        assert_eq!((get(6), get(4), get(9), get(7), get(20_000)), (Some(2), Some(1), Some(2), None, None));

        let expected: Vec<(u128, u64)> = (100..=2_000u128)
            .filter(|n| n % 2 == 0 || n % 3 == 0)
            .map(|n| (n, if n % 3 == 0 { 2 } else { 1 }))
            .collect();
        assert_eq!(collect(&runs, &pages, 100, 2_000, false), expected);
        let mut reversed = expected.clone();
        reversed.reverse();
        assert_eq!(collect(&runs, &pages, 100, 2_000, true), reversed);
        assert_eq!(collect(&runs, &pages, 10_001, 10_001, false), vec![]);
        let both = (0..10_000u128).filter(|n| n % 6 == 0).count();
        assert_eq!(collect(&runs, &pages, 0, u128::MAX, true).len(), 5_000 + 3_400 - both);
    }

    #[test]
    fn merges_pick_the_newest_runs_of_one_class() {
        let dir = tempfile::tempdir().unwrap();
        let pages = Pages::open(dir.path(), 1 << 20).unwrap();
        let descriptions = Descriptions::new(u64::MAX);
        let sized = |id: u64, entries: u128| {
            build(&pages, id, &(0..entries).map(|n| (n, 0)).collect::<Vec<_>>(), &descriptions)
        };
        let mut runs = vec![sized(1, 5_000)];
        for id in 2..9 {
            runs.push(sized(id, 10));
        }
        assert_eq!(pick_merge(&runs), None);
        runs.push(sized(9, 10));
        assert_eq!(pick_merge(&runs), Some(1..9));

        // As a merge thread that lags the commits leaves them: runs of class 3 with smaller ones
        // between, a small one newest. Eight runs from the last larger one (class 4) to the last
        // of class 3 merge, the small ones with them, and the newest along.
        let mut runs = vec![sized(20, 5_000)];
        for (id, entries) in (21..).zip([600, 100, 600, 100, 600, 600, 600, 100, 600, 10]) {
            runs.push(sized(id, entries));
        }
        assert_eq!(pick_merge(&runs), Some(1..11));
        runs.drain(2..4);
        assert_eq!(pick_merge(&runs), None, "seven from the class-4 run to the last of class 3");
    }

    /// A run whose description spans many chunks and groups answers the same held whole and read
    /// through the cache, built or loaded, and a paged one keeps a small part of it in memory;
    /// the budget is given back when a held run goes.
    #[test]
    fn a_description_read_through_the_cache_answers_as_one_held_whole() {
        let pages = Pages::on(super::super::pages::MemoryDisk::default().pages());
        let entries: Vec<(u128, u64)> = (0..300_000u128).map(|n| (n * 7 + (n * n) % 5, n as u64)).collect();
        let unbounded = Descriptions::new(u64::MAX);
        let held = build(&pages, 1, &entries, &unbounded);
        assert!(held.is_held() && unbounded.resident_bytes() > 200_000, "{}", unbounded.resident_bytes());
        let none = Descriptions::new(0);
        let paged = Run::load(&pages, Kind::Ids, 1, &none).unwrap();
        assert!(!paged.is_held() && paged.resident_bytes() * 50 < held.resident_bytes());
        assert!(paged.pages() > 3 * FENCES_PER_GROUP, "{} pages", paged.pages());
        let reloaded = Run::load(&pages, Kind::Ids, 1, &unbounded).unwrap();
        assert!(reloaded.is_held());
        for probe in (0..2_200_000u128).step_by(37) {
            let key = probe.to_be_bytes();
            let hash = KeyHash::of(&key);
            let read = |run: &Run| {
                let maybe = run.may_contain(&pages, hash).unwrap();
                let found = run.get(&pages, &key, |v| u64::from_le_bytes(v.try_into().unwrap())).unwrap();
                (maybe, found, run.page_for(&pages, &key).unwrap())
            };
            let answer = read(&held);
            assert_eq!(read(&paged), answer, "key {probe}");
            assert_eq!(read(&reloaded), answer, "key {probe}");
            assert!(answer.1.is_none() || answer.0, "a false negative for {probe}");
        }
        let before = unbounded.resident_bytes();
        drop(held);
        assert!(unbounded.resident_bytes() < before, "a dropped run gives its budget back");
    }
}
