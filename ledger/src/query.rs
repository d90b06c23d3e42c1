//! Reads: lookups by id, the two per-account history queries, and the queries over all accounts
//! and transfers; each bounded by its limit and by the scan budget (`QUERY_SCAN_MAX`).

use crate::codec;
use crate::exec::Ledger;
use crate::model::{
    Account, AccountBalance, AccountFilter, ChangeKind, ChangeRecord, FilterError, Page, QUERY_RESULTS_MAX,
    QUERY_SCAN_MAX, QueryFilter, Transfer,
};
use crate::store::{Scanned, Store, StoreError, StoreResult};

/// Why a history query failed: a bad filter (the caller's fault) or storage (ours).
#[derive(Debug)]
pub enum QueryError {
    Filter(FilterError),
    Store(StoreError),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Filter(error) => write!(f, "invalid filter: {error}"),
            QueryError::Store(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for QueryError {}

impl From<FilterError> for QueryError {
    fn from(error: FilterError) -> Self {
        QueryError::Filter(error)
    }
}

impl From<StoreError> for QueryError {
    fn from(error: StoreError) -> Self {
        QueryError::Store(error)
    }
}

impl<S: Store> Ledger<S> {
    /// The accounts found, in the order asked; ids not found are left out.
    pub fn lookup_accounts(&self, ids: &[u128]) -> StoreResult<Vec<Account>> {
        assert!(ids.len() <= QUERY_RESULTS_MAX, "lookup of {} ids reached the ledger", ids.len());
        ids.iter().filter_map(|id| self.store().account(*id).transpose()).collect()
    }

    /// The transfers found, in the order asked; ids not found are left out.
    pub fn lookup_transfers(&self, ids: &[u128]) -> StoreResult<Vec<Transfer>> {
        assert!(ids.len() <= QUERY_RESULTS_MAX, "lookup of {} ids reached the ledger", ids.len());
        ids.iter().filter_map(|id| self.store().transfer(*id).transpose()).collect()
    }

    /// The transfers of one account that match the filter, in time order (or reversed).
    pub fn account_transfers(&self, filter: &AccountFilter) -> Result<Page<Transfer>, QueryError> {
        filter.validate()?;
        let mut page = Collect::new(filter.limit);
        self.scan(filter, &mut |timestamp, _| {
            page.examine(timestamp, || {
                let transfer = self.indexed_transfer(filter.account_id, timestamp)?;
                Ok(filter.matches(&transfer).then_some(transfer))
            })
        })?;
        page.finish()
    }

    /// The balances of an account after each of its transfers that match the filter. Empty for an
    /// account without the `history` flag.
    pub fn account_balances(&self, filter: &AccountFilter) -> Result<Page<AccountBalance>, QueryError> {
        filter.validate()?;
        let mut page = Collect::new(filter.limit);
        let mut history = true;
        self.scan(filter, &mut |timestamp, value| {
            let (_, balance) = codec::decode_index_value(value, timestamp);
            let Some(balance) = balance else {
                history = false;
                return false;
            };
            page.examine(timestamp, || {
                let matches = !filter.needs_transfer()
                    || filter.matches(&self.indexed_transfer(filter.account_id, timestamp)?);
                Ok(matches.then_some(balance))
            })
        })?;
        if !history {
            return Ok(Page { results: Vec::new(), resume: None });
        }
        page.finish()
    }

    /// Accounts whose fields match the filter, in time order (or reversed), from the query index
    /// of the filter's first non-zero field (or every account by time); the others are checked
    /// on the records.
    pub fn query_accounts(&self, filter: &QueryFilter) -> Result<Page<Account>, QueryError> {
        filter.validate()?;
        let (field, value) = filter.fields().next().map_or((None, 0), |(field, value)| (Some(field), value));
        let mut page = Collect::new(filter.limit);
        self.store().scan_account_field(
            field,
            value,
            filter.timestamp_min,
            filter.timestamp_max_inclusive(),
            filter.reversed,
            &mut |timestamp, id| {
                page.examine(timestamp, || {
                    let account = self.store().account(id)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("query index names account {id}, which is missing"))
                    })?;
                    Ok(filter.matches_account(&account).then_some(account))
                })
            },
        )?;
        page.finish()
    }

    /// Transfers whose fields match the filter, in time order (or reversed), from the query index
    /// of the filter's first non-zero field (or all transfers by time); every field is checked on
    /// the records.
    pub fn query_transfers(&self, filter: &QueryFilter) -> Result<Page<Transfer>, QueryError> {
        filter.validate()?;
        let (min, max) = (filter.timestamp_min, filter.timestamp_max_inclusive());
        let mut page = Collect::new(filter.limit);
        match filter.fields().next() {
            None => self.store().scan_transfers(min, max, filter.reversed, &mut |transfer| {
                page.examine(transfer.timestamp, || Ok(Some(*transfer)))
            })?,
            Some((field, value)) => {
                self.store().scan_transfer_field(field, value, min, max, filter.reversed, &mut |scanned| {
                    match scanned {
                        Scanned::Transfer(transfer) => page.examine(transfer.timestamp, || {
                            Ok(filter.matches_transfer(transfer).then_some(*transfer))
                        }),
                        // Ruled out by a zone map: each transfer counts as examined, or a query by
                        // a value no transfer has walked every zone under the ledger's lock.
                        Scanned::Skipped { resume, transfers } => page.skip(resume, transfers),
                    }
                })?
            }
        }
        page.finish()
    }

    /// Up to `limit` events of the change stream from `timestamp_min` on, in ledger time, each
    /// with the records it concerns.
    pub fn changes(&self, timestamp_min: u64, limit: usize) -> StoreResult<Vec<ChangeEvent>> {
        let mut records = Vec::new();
        self.store().scan_changes(timestamp_min, &mut |change| {
            records.push(*change);
            records.len() < limit
        })?;
        records.into_iter().map(|change| self.change_event(change)).collect()
    }

    fn change_event(&self, change: ChangeRecord) -> StoreResult<ChangeEvent> {
        let missing =
            |what: String| StoreError::Corrupt(format!("change at {}: {what} is missing", change.timestamp));
        let account = |id: u128, balance: &AccountBalance| -> StoreResult<Account> {
            let account = self.store().account(id)?.ok_or_else(|| missing(format!("account {id}")))?;
            Ok(Account {
                debits_pending: balance.debits_pending,
                debits_posted: balance.debits_posted,
                credits_pending: balance.credits_pending,
                credits_posted: balance.credits_posted,
                ..account
            })
        };
        if change.kind == ChangeKind::AccountCreated {
            let created = account(change.id, &change.debit)?;
            return Ok(ChangeEvent { change, transfer: None, debit_account: created, credit_account: None });
        }
        let transfer = if change.kind == ChangeKind::TwoPhaseExpired {
            self.store().transfer(change.id)?
        } else {
            self.store().transfer_at(change.timestamp)?
        };
        let transfer = transfer.ok_or_else(|| missing(format!("transfer {}", change.id)))?;
        Ok(ChangeEvent {
            change,
            transfer: Some(transfer),
            debit_account: account(transfer.debit_account_id, &change.debit)?,
            credit_account: Some(account(transfer.credit_account_id, &change.credit)?),
        })
    }

    /// The transfer an account's index entry names.
    fn indexed_transfer(&self, account_id: u128, timestamp: u64) -> StoreResult<Transfer> {
        self.store().transfer_at(timestamp)?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "index of account {account_id} names a transfer at {timestamp}, which is missing"
            ))
        })
    }

    fn scan(&self, filter: &AccountFilter, visit: &mut dyn FnMut(u64, &[u8]) -> bool) -> StoreResult<()> {
        self.store().scan_index(
            filter.account_id,
            filter.timestamp_min,
            filter.timestamp_max_inclusive(),
            filter.reversed,
            visit,
        )
    }
}

/// The results of a query being gathered, within its limit and the scan budget.
struct Collect<T> {
    results: Vec<T>,
    limit: usize,
    examined: usize,
    resume: Option<u64>,
    error: Option<StoreError>,
}

impl<T> Collect<T> {
    fn new(limit: u32) -> Collect<T> {
        Collect { results: Vec::new(), limit: limit as usize, examined: 0, resume: None, error: None }
    }

    /// Examines the entry at `timestamp` (`read` says whether it is a result); returns whether
    /// the scan goes on. Once `QUERY_SCAN_MAX` entries were examined, the next one is where the
    /// caller resumes.
    fn examine(&mut self, timestamp: u64, read: impl FnOnce() -> StoreResult<Option<T>>) -> bool {
        if self.examined == QUERY_SCAN_MAX {
            self.resume = Some(timestamp);
            return false;
        }
        self.examined += 1;
        match read() {
            Ok(Some(result)) => self.results.push(result),
            Ok(None) => {}
            Err(error) => {
                self.error = Some(error);
                return false;
            }
        }
        self.results.len() < self.limit
    }

    /// Counts up to `transfers` entries ruled out at once as examined; returns whether the scan
    /// goes on (else it resumes at `resume`).
    fn skip(&mut self, resume: u64, transfers: usize) -> bool {
        if self.examined + transfers > QUERY_SCAN_MAX {
            self.resume = Some(resume);
            return false;
        }
        self.examined += transfers;
        true
    }

    fn finish(self) -> Result<Page<T>, QueryError> {
        match self.error {
            Some(error) => Err(error.into()),
            None => Ok(Page { results: self.results, resume: self.resume }),
        }
    }
}

/// One event of the change stream, with its records: the transfer (for an expiry, the pending
/// transfer that expired) and its accounts with their balances just after the event (their other
/// fields, flags included, as they are now); for an account's creation, the account with zero
/// balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub change: ChangeRecord,
    pub transfer: Option<Transfer>,
    pub debit_account: Account,
    pub credit_account: Option<Account>,
}
