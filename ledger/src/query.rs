//! Reads: lookups by id and the two history queries, each bounded by its limit.

use crate::codec;
use crate::exec::Ledger;
use crate::model::{Account, AccountBalance, AccountFilter, FilterError, QUERY_RESULTS_MAX, Transfer};
use crate::store::{Store, StoreError, StoreResult};

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
    pub fn account_transfers(&self, filter: &AccountFilter) -> Result<Vec<Transfer>, QueryError> {
        filter.validate()?;
        let mut transfers = Vec::new();
        let mut error = None;
        self.scan(filter, &mut |_, value| {
            let (transfer_id, _) = codec::decode_index_value(value, 0);
            match self.store().transfer(transfer_id) {
                Ok(Some(transfer)) => {
                    if side_matches(filter, &transfer) {
                        transfers.push(transfer);
                    }
                }
                Ok(None) => panic!("index names transfer {transfer_id}, which is missing"),
                Err(e) => error = Some(e),
            }
            error.is_none() && transfers.len() < filter.limit as usize
        })?;
        match error {
            Some(error) => Err(error.into()),
            None => Ok(transfers),
        }
    }

    /// The balances of an account after each of its transfers that match the filter. Empty for an
    /// account without the `history` flag.
    pub fn account_balances(&self, filter: &AccountFilter) -> Result<Vec<AccountBalance>, QueryError> {
        filter.validate()?;
        let mut balances = Vec::new();
        let mut error = None;
        let wants_both = filter.debits && filter.credits;
        self.scan(filter, &mut |timestamp, value| {
            let (transfer_id, balance) = codec::decode_index_value(value, timestamp);
            let Some(balance) = balance else {
                return false;
            };
            let matches = wants_both
                || match self.store().transfer(transfer_id) {
                    Ok(transfer) => side_matches(filter, &transfer.expect("indexed transfer")),
                    Err(e) => {
                        error = Some(e);
                        return false;
                    }
                };
            if matches {
                balances.push(balance);
            }
            balances.len() < filter.limit as usize
        })?;
        match error {
            Some(error) => Err(error.into()),
            None => Ok(balances),
        }
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

fn side_matches(filter: &AccountFilter, transfer: &Transfer) -> bool {
    (filter.debits && transfer.debit_account_id == filter.account_id)
        || (filter.credits && transfer.credit_account_id == filter.account_id)
}
