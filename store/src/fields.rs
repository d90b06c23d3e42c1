//! The query indexes. For each field a record can be selected by, either runs of
//! `(value, timestamp)` entries (`Kind::TransferUserData128` to `Kind::AccountTimes`), or, for a
//! transfer's ledger and code, a zone map: beside each transfer chunk, the few ledgers and codes
//! its transfers have. A ledger or a code is shared by many transfers, so an entry per transfer
//! would cost the write path much and tell a scan little: a query by ledger reads the chunks
//! whose zone holds it, and skips the others. References (user data) tell transfers apart and
//! get entries. Built by every commit from the records it creates; by an import, and by the
//! first open of a store of layout version 1, from records in any order (`Indexer`).

use std::sync::Arc;

use super::layout::Runs;
use super::runs::{self, Kind, RunBuilder, Writes};
use super::{Inner, next_run};
use ledger::model::{Account, Field, Transfer};
use ledger::store::{StoreError, StoreResult};

/// The account kinds' fields, `None` being every account by time.
pub(super) const ACCOUNT_FIELDS: [Option<Field>; 6] = [
    Some(Field::UserData128),
    Some(Field::UserData64),
    Some(Field::UserData32),
    Some(Field::Ledger),
    Some(Field::Code),
    None,
];

/// Physical prefix of a zone map, keyed like its chunk (`Z`, first timestamp).
pub(super) const PREFIX_ZONE: u8 = b'Z';
/// A zone lists at most this many ledgers and as many codes; a chunk with more says "any".
const ZONE_VALUES_MAX: usize = 8;
const ZONE_ANY: u8 = u8::MAX;

pub(super) fn zone_key(chunk_first: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = PREFIX_ZONE;
    key[1..].copy_from_slice(&chunk_first.to_be_bytes());
    key
}

/// The zone map of one chunk's transfers: `ledger count | ledgers (u32 each) | code count | codes
/// (u16 each)`, little-endian, sorted; a count of `ZONE_ANY` (no list) for more than
/// `ZONE_VALUES_MAX` distinct values.
pub(super) fn zone_of(transfers: &[Transfer]) -> Vec<u8> {
    let mut ledgers: Vec<u32> = transfers.iter().map(|t| t.ledger).collect();
    ledgers.sort_unstable();
    ledgers.dedup();
    let mut codes: Vec<u16> = transfers.iter().map(|t| t.code).collect();
    codes.sort_unstable();
    codes.dedup();
    let mut zone = Vec::with_capacity(16);
    push_list(&mut zone, ledgers.len(), |zone| {
        ledgers.iter().for_each(|v| zone.extend_from_slice(&v.to_le_bytes()))
    });
    push_list(&mut zone, codes.len(), |zone| {
        codes.iter().for_each(|v| zone.extend_from_slice(&v.to_le_bytes()))
    });
    zone
}

fn push_list(zone: &mut Vec<u8>, count: usize, write: impl FnOnce(&mut Vec<u8>)) {
    if count > ZONE_VALUES_MAX {
        zone.push(ZONE_ANY);
    } else {
        zone.push(count as u8);
        write(zone);
    }
}

/// Whether the chunk of this zone may hold a transfer whose `field` (ledger or code) is `value`.
pub(super) fn zone_may_hold(zone: &[u8], field: Field, value: u128) -> StoreResult<bool> {
    let corrupt = || StoreError::Corrupt(format!("zone map of {} bytes", zone.len()));
    let list = |at: usize, width: usize| -> StoreResult<(Option<&[u8]>, usize)> {
        let count = *zone.get(at).ok_or_else(corrupt)?;
        if count == ZONE_ANY {
            return Ok((None, at + 1));
        }
        let end = at + 1 + count as usize * width;
        Ok((Some(zone.get(at + 1..end).ok_or_else(corrupt)?), end))
    };
    let (ledgers, codes_at) = list(0, 4)?;
    let (codes, end) = list(codes_at, 2)?;
    if end != zone.len() {
        return Err(corrupt());
    }
    Ok(match field {
        Field::Ledger => ledgers.is_none_or(|list| {
            list.chunks_exact(4).any(|v| u128::from(u32::from_le_bytes(v.try_into().unwrap())) == value)
        }),
        Field::Code => codes.is_none_or(|list| {
            list.chunks_exact(2).any(|v| u128::from(u16::from_le_bytes(v.try_into().unwrap())) == value)
        }),
        Field::UserData128 | Field::UserData64 | Field::UserData32 => true,
    })
}

/// The transfer fields with entries in runs (the others have zone maps).
pub(super) const TRANSFER_INDEXED: [Field; 3] = [Field::UserData128, Field::UserData64, Field::UserData32];

/// Records an `Indexer` holds (32 MiB of transfers, as much of accounts) before it writes their
/// entries as one run per kind.
const SORTED_ENTRIES: usize = 256 << 10;

/// `(value, timestamp)` of the transfers' non-zero `field`, sorted.
pub(super) fn transfer_entries(transfers: &[Transfer], field: Field) -> Vec<(u128, u64)> {
    let mut entries: Vec<(u128, u64)> = transfers
        .iter()
        .map(|transfer| (field.of_transfer(transfer), transfer.timestamp))
        .filter(|(value, _)| *value != 0)
        .collect();
    entries.sort_unstable();
    entries
}

/// `(value, timestamp, id)` of the accounts' non-zero `field` (every account for `None`, value
/// zero), sorted.
pub(super) fn account_entries<'a>(
    accounts: impl Iterator<Item = &'a Account>,
    field: Option<Field>,
) -> Vec<(u128, u64, u128)> {
    let mut entries: Vec<(u128, u64, u128)> = accounts
        .map(|account| (field.map_or(0, |field| field.of_account(account)), account.timestamp, account.id))
        .filter(|(value, _, _)| *value != 0 || field.is_none())
        .collect();
    entries.sort_unstable();
    entries
}

/// Pushes sorted transfer entries into a builder.
pub(super) fn push_transfer_entries(builder: &mut RunBuilder, entries: &[(u128, u64)], writes: &mut Writes) {
    for (value, timestamp) in entries {
        builder.push(&runs::field_key(*value, *timestamp), &[], writes);
    }
}

/// Pushes sorted account entries into a builder.
pub(super) fn push_account_entries(
    builder: &mut RunBuilder,
    entries: &[(u128, u64, u128)],
    writes: &mut Writes,
) {
    for (value, timestamp, id) in entries {
        builder.push(&runs::field_key(*value, *timestamp), &id.to_be_bytes(), writes);
    }
}

/// Builds the query indexes of records given in any order, a bounded number of entries at a time
/// per kind: each batch becomes a run, and merges fold them later.
#[derive(Default)]
pub(super) struct Indexer {
    transfers: Vec<Transfer>,
    accounts: Vec<Account>,
}

impl Indexer {
    pub(super) fn add_transfer(
        &mut self,
        inner: &Inner,
        transfer: Transfer,
        runs: &mut Runs,
        writes: &mut Writes,
    ) {
        self.transfers.push(transfer);
        if self.transfers.len() == SORTED_ENTRIES {
            self.write_transfers(inner, runs, writes);
        }
    }

    pub(super) fn add_account(
        &mut self,
        inner: &Inner,
        account: Account,
        runs: &mut Runs,
        writes: &mut Writes,
    ) {
        self.accounts.push(account);
        if self.accounts.len() == SORTED_ENTRIES {
            self.write_accounts(inner, runs, writes);
        }
    }

    /// Writes what is left.
    pub(super) fn finish(&mut self, inner: &Inner, runs: &mut Runs, writes: &mut Writes) {
        self.write_transfers(inner, runs, writes);
        self.write_accounts(inner, runs, writes);
    }

    fn write_transfers(&mut self, inner: &Inner, runs: &mut Runs, writes: &mut Writes) {
        let transfers = std::mem::take(&mut self.transfers);
        for field in TRANSFER_INDEXED {
            let entries = transfer_entries(&transfers, field);
            let kind = Kind::of_transfer_field(field).expect("an indexed field");
            write_run(inner, kind, entries.len(), runs, writes, &mut |builder, writes| {
                push_transfer_entries(builder, &entries, writes)
            });
        }
    }

    fn write_accounts(&mut self, inner: &Inner, runs: &mut Runs, writes: &mut Writes) {
        let accounts = std::mem::take(&mut self.accounts);
        for field in ACCOUNT_FIELDS {
            let entries = account_entries(accounts.iter(), field);
            let kind = Kind::of_account_field(field);
            write_run(inner, kind, entries.len(), runs, writes, &mut |builder, writes| {
                push_account_entries(builder, &entries, writes)
            });
        }
    }
}

fn write_run(
    inner: &Inner,
    kind: Kind,
    count: usize,
    runs: &mut Runs,
    writes: &mut Writes,
    push: &mut dyn FnMut(&mut RunBuilder, &mut Writes),
) {
    if count == 0 {
        return;
    }
    let mut builder = RunBuilder::new(kind, next_run(inner), count as u64);
    push(&mut builder, writes);
    runs.kinds[kind as usize].extend(builder.finish(writes, &inner.descriptions).map(Arc::new));
}

#[cfg(test)]
mod tests {
    use super::super::layout::{LAYOUT_KEY, Layout};
    use super::super::pages::{Batch as PageBatch, Pages};
    use super::super::runs::{PREFIX_PAGE, PREFIX_RUN_META, run_key_range};
    use super::super::{Options, RunStore};
    use ledger::model::{Account, Batch, QueryFilter, Transfer};
    use ledger::{Ledger, StoreError};

    fn answers(ledger: &Ledger<RunStore>) -> Vec<Vec<u128>> {
        let q = QueryFilter { limit: 100, ..QueryFilter::default() };
        let filters = [
            QueryFilter { user_data_128: 3, ..q },
            QueryFilter { user_data_64: 2, reversed: true, ..q },
            QueryFilter { code: 2, ledger: 1, ..q },
            QueryFilter { user_data_32: 1, ..q },
        ];
        let mut all: Vec<Vec<u128>> = filters
            .iter()
            .map(|f| ledger.query_transfers(f).unwrap().results.iter().map(|t| t.id).collect())
            .collect();
        all.extend(
            filters.iter().map(|f| ledger.query_accounts(f).unwrap().results.iter().map(|a| a.id).collect()),
        );
        all
    }

    /// The query indexes answer after a reopen; a store of layout version 1 (before them, which
    /// only sled held) is refused as superseded, for the node to rebuild from its snapshot and log.
    #[test]
    fn query_indexes_answer_after_a_reopen_and_a_layout_1_store_is_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let inline = Options { background_merges: false, ..Options::default() };
        let mut ledger = Ledger::open(RunStore::open_with(dir.path(), inline).unwrap()).unwrap();
        let accounts: Vec<Account> = (1..=6)
            .map(|id| Account {
                id,
                ledger: 1,
                code: 1 + (id % 2) as u16,
                user_data_128: id % 4,
                user_data_64: (id % 3) as u64,
                user_data_32: 1,
                ..Account::default()
            })
            .collect();
        ledger.apply(&[Batch::CreateAccounts(accounts)], 1_000, None).unwrap();
        for entry in 0..30u128 {
            let transfers = (0..7u128)
                .map(|n| Transfer {
                    id: 100 + entry * 7 + n,
                    debit_account_id: 1 + n % 6,
                    credit_account_id: 1 + (n + 1) % 6,
                    amount: 1,
                    ledger: 1,
                    code: 1 + (n % 2) as u16,
                    user_data_128: (entry + n) % 5,
                    user_data_64: (n % 3) as u64,
                    user_data_32: (entry % 2) as u32,
                    ..Transfer::default()
                })
                .collect();
            ledger.apply(&[Batch::CreateTransfers(transfers)], 2_000 + entry as u64 * 1_000, None).unwrap();
        }
        let expected = answers(&ledger);
        assert!(expected.iter().all(|ids| !ids.is_empty()), "{expected:?}");
        drop(ledger);
        let reopened = Ledger::open(wait_open(dir.path(), inline)).unwrap();
        let (runs, _) = reopened.store().run_counts();
        assert!(runs[3..].iter().all(|count| *count > 0), "query runs {runs:?}");
        assert_eq!(answers(&reopened), expected);
        drop(reopened);

        // Rewrite it as layout version 1 would have left it: three kinds, no query runs.
        {
            let pages = Pages::open(dir.path(), 1 << 20).unwrap();
            let stored = Layout::decode(&pages.get(LAYOUT_KEY).unwrap().unwrap()).unwrap();
            let mut v1 = Vec::new();
            v1.extend_from_slice(&1u32.to_le_bytes());
            v1.extend_from_slice(&stored.next_run.to_le_bytes());
            for ids in &stored.kinds[..3] {
                v1.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                ids.iter().for_each(|id| v1.extend_from_slice(&id.to_le_bytes()));
            }
            v1.extend_from_slice(&0u32.to_le_bytes());
            let mut batch = PageBatch::default();
            for (kind, ids) in super::super::runs::Kind::ALL.iter().zip(&stored.kinds).skip(3) {
                for id in ids {
                    for prefix in [PREFIX_PAGE, PREFIX_RUN_META] {
                        for key in pages.range(run_key_range(prefix, *kind, *id)).keys() {
                            batch.remove(key.unwrap().to_vec());
                        }
                    }
                }
            }
            batch.insert(LAYOUT_KEY, v1);
            pages.apply(batch).unwrap();
            pages.sync().unwrap();
        }
        match RunStore::open_with(dir.path(), inline) {
            Err(StoreError::Superseded(what)) => assert!(what.contains("layout version 1"), "{what}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a layout 1 store opened"),
        }
    }

    #[test]
    fn a_zone_map_lists_few_values_and_says_any_for_many() {
        use super::{zone_may_hold, zone_of};
        use ledger::model::Field;
        let transfer = |ledger: u32, code: u16| Transfer { ledger, code, ..Transfer::default() };
        let few: Vec<Transfer> =
            [(1, 5), (2, 5), (1, 6), (1, 5)].iter().map(|(l, c)| transfer(*l, *c)).collect();
        let zone = zone_of(&few);
        let holds = |zone: &[u8], field, value| zone_may_hold(zone, field, value).unwrap();
        assert!(
            holds(&zone, Field::Ledger, 1)
                && holds(&zone, Field::Ledger, 2)
                && !holds(&zone, Field::Ledger, 3)
        );
        assert!(
            holds(&zone, Field::Code, 6) && !holds(&zone, Field::Code, 7) && !holds(&zone, Field::Code, 1)
        );
        // Nine codes: any code may be there; the one ledger is still listed.
        let many: Vec<Transfer> = (1..=9).map(|code| transfer(4, code)).collect();
        let zone = zone_of(&many);
        assert!(
            holds(&zone, Field::Code, 1_000)
                && holds(&zone, Field::Ledger, 4)
                && !holds(&zone, Field::Ledger, 1)
        );
        for cut in 0..zone.len() {
            assert!(zone_may_hold(&zone[..cut], Field::Code, 1).is_err(), "a zone cut at {cut} was read");
        }
    }

    /// A closed store's file lock may be held for a moment: open with a deadline.
    fn wait_open(path: &std::path::Path, options: Options) -> RunStore {
        let started = std::time::Instant::now();
        loop {
            match RunStore::open_with(path, options) {
                Ok(store) => return store,
                Err(error) if started.elapsed() < std::time::Duration::from_secs(10) => {
                    assert!(error.to_string().contains("lock"), "{error}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => panic!("{error}"),
            }
        }
    }
}
