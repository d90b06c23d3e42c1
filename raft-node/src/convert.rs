//! Conversions between the wire types (`tally_proto::v1`) and the ledger's, in one place.
//!
//! Everything that can be wrong with a request's shape (a `code` above 65535, a batch too large)
//! is refused here with `INVALID_ARGUMENT` and a message that names the event and the field, so
//! the ledger only ever sees well-formed events.

use ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, BATCH_EVENTS_MAX, BatchReply, CreateAccountResult,
    CreateTransferResult, EventResult, QueryFilter, Transfer, TransferFlags,
};
use tally_proto::v1 as pb;
use tonic::Status;

/// The U128 helpers are the client's: one definition of the wire encoding.
pub use tally_client::{u128_from, u128_to};

fn narrow_u16(value: u32, what: &str, index: usize) -> Result<u16, Status> {
    u16::try_from(value).map_err(|_| {
        Status::invalid_argument(format!("event {index}: {what} {value} does not fit in 16 bits"))
    })
}

fn check_batch_len(len: usize, what: &str) -> Result<(), Status> {
    if len == 0 {
        return Err(Status::invalid_argument(format!("empty batch: send 1 to {BATCH_EVENTS_MAX} {what}")));
    }
    if len > BATCH_EVENTS_MAX {
        return Err(Status::invalid_argument(format!(
            "batch of {len} {what}: at most {BATCH_EVENTS_MAX} per request; split it"
        )));
    }
    Ok(())
}

pub fn accounts_from(accounts: &[pb::Account]) -> Result<Vec<Account>, Status> {
    check_batch_len(accounts.len(), "accounts")?;
    accounts.iter().enumerate().map(|(index, a)| account_from(a, index)).collect()
}

fn account_from(a: &pb::Account, index: usize) -> Result<Account, Status> {
    Ok(Account {
        id: u128_from(a.id.as_ref()),
        debits_pending: u128_from(a.debits_pending.as_ref()),
        debits_posted: u128_from(a.debits_posted.as_ref()),
        credits_pending: u128_from(a.credits_pending.as_ref()),
        credits_posted: u128_from(a.credits_posted.as_ref()),
        user_data_128: u128_from(a.user_data_128.as_ref()),
        user_data_64: a.user_data_64,
        user_data_32: a.user_data_32,
        ledger: a.ledger,
        code: narrow_u16(a.code, "code", index)?,
        // Bits above 16 cannot be valid flags; mapping them onto a reserved bit keeps the answer
        // per event (reserved_flag) instead of refusing the whole batch.
        flags: AccountFlags(narrow_flags(a.flags)),
        timestamp: a.timestamp,
    })
}

fn narrow_flags(flags: u32) -> u16 {
    if flags > u32::from(u16::MAX) { 1 << 15 } else { flags as u16 }
}

pub fn account_to(a: &Account) -> pb::Account {
    pb::Account {
        id: u128_to(a.id),
        debits_pending: u128_to(a.debits_pending),
        debits_posted: u128_to(a.debits_posted),
        credits_pending: u128_to(a.credits_pending),
        credits_posted: u128_to(a.credits_posted),
        user_data_128: u128_to(a.user_data_128),
        user_data_64: a.user_data_64,
        user_data_32: a.user_data_32,
        ledger: a.ledger,
        code: u32::from(a.code),
        flags: u32::from(a.flags.0),
        timestamp: a.timestamp,
    }
}

pub fn transfers_from(transfers: &[pb::Transfer]) -> Result<Vec<Transfer>, Status> {
    check_batch_len(transfers.len(), "transfers")?;
    transfers.iter().enumerate().map(|(index, t)| transfer_from(t, index)).collect()
}

fn transfer_from(t: &pb::Transfer, index: usize) -> Result<Transfer, Status> {
    Ok(Transfer {
        id: u128_from(t.id.as_ref()),
        debit_account_id: u128_from(t.debit_account_id.as_ref()),
        credit_account_id: u128_from(t.credit_account_id.as_ref()),
        amount: u128_from(t.amount.as_ref()),
        pending_id: u128_from(t.pending_id.as_ref()),
        user_data_128: u128_from(t.user_data_128.as_ref()),
        user_data_64: t.user_data_64,
        user_data_32: t.user_data_32,
        timeout: t.timeout,
        ledger: t.ledger,
        code: narrow_u16(t.code, "code", index)?,
        flags: TransferFlags(narrow_flags(t.flags)),
        timestamp: t.timestamp,
    })
}

pub fn transfer_to(t: &Transfer) -> pb::Transfer {
    pb::Transfer {
        id: u128_to(t.id),
        debit_account_id: u128_to(t.debit_account_id),
        credit_account_id: u128_to(t.credit_account_id),
        amount: u128_to(t.amount),
        pending_id: u128_to(t.pending_id),
        user_data_128: u128_to(t.user_data_128),
        user_data_64: t.user_data_64,
        user_data_32: t.user_data_32,
        timeout: t.timeout,
        ledger: t.ledger,
        code: u32::from(t.code),
        flags: u32::from(t.flags.0),
        timestamp: t.timestamp,
    }
}

pub fn ids_from(ids: &[pb::U128]) -> Result<Vec<u128>, Status> {
    check_batch_len(ids.len(), "ids")?;
    Ok(ids.iter().map(|id| u128_from(Some(id))).collect())
}

pub fn account_results_to(results: &[EventResult<CreateAccountResult>]) -> pb::CreateAccountsReply {
    pb::CreateAccountsReply {
        results: results
            .iter()
            .map(|r| pb::CreateAccountResult { status: r.result as i32, timestamp: r.timestamp })
            .collect(),
    }
}

pub fn transfer_results_to(results: &[EventResult<CreateTransferResult>]) -> pb::CreateTransfersReply {
    pb::CreateTransfersReply {
        results: results
            .iter()
            .map(|r| pb::CreateTransferResult { status: r.result as i32, timestamp: r.timestamp })
            .collect(),
    }
}

pub fn filter_from(filter: &pb::AccountFilter) -> Result<AccountFilter, Status> {
    use pb::AccountFilterFlag as F;
    let known = F::Debits as u32 | F::Credits as u32 | F::Reversed as u32;
    if filter.flags & !known != 0 {
        return Err(Status::invalid_argument(format!(
            "unknown account filter flags {:#x}",
            filter.flags & !known
        )));
    }
    let converted = AccountFilter {
        account_id: u128_from(filter.account_id.as_ref()),
        user_data_128: u128_from(filter.user_data_128.as_ref()),
        user_data_64: filter.user_data_64,
        user_data_32: filter.user_data_32,
        code: filter_code(filter.code)?,
        timestamp_min: filter.timestamp_min,
        timestamp_max: filter.timestamp_max,
        limit: filter.limit,
        debits: filter.flags & F::Debits as u32 != 0,
        credits: filter.flags & F::Credits as u32 != 0,
        reversed: filter.flags & F::Reversed as u32 != 0,
    };
    converted.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(converted)
}

pub fn query_filter_from(filter: &pb::QueryFilter) -> Result<QueryFilter, Status> {
    use pb::QueryFilterFlag as F;
    let known = F::Reversed as u32;
    if filter.flags & !known != 0 {
        return Err(Status::invalid_argument(format!(
            "unknown query filter flags {:#x}",
            filter.flags & !known
        )));
    }
    let converted = QueryFilter {
        user_data_128: u128_from(filter.user_data_128.as_ref()),
        user_data_64: filter.user_data_64,
        user_data_32: filter.user_data_32,
        ledger: filter.ledger,
        code: filter_code(filter.code)?,
        timestamp_min: filter.timestamp_min,
        timestamp_max: filter.timestamp_max,
        limit: filter.limit,
        reversed: filter.flags & F::Reversed as u32 != 0,
    };
    converted.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(converted)
}

fn filter_code(code: u32) -> Result<u16, Status> {
    u16::try_from(code).map_err(|_| Status::invalid_argument(format!("code {code} is over 65535")))
}

/// A page's `resume_timestamp`: 0 when complete.
pub fn resume_to(resume: Option<u64>) -> u64 {
    resume.unwrap_or(0)
}

pub fn balance_to(b: &AccountBalance) -> pb::AccountBalance {
    pb::AccountBalance {
        debits_pending: u128_to(b.debits_pending),
        debits_posted: u128_to(b.debits_posted),
        credits_pending: u128_to(b.credits_pending),
        credits_posted: u128_to(b.credits_posted),
        timestamp: b.timestamp,
    }
}

/// The reply of one batch, which must be of the kind asked for.
pub fn expect_accounts(reply: BatchReply) -> Vec<EventResult<CreateAccountResult>> {
    match reply {
        BatchReply::CreateAccounts(results) => results,
        BatchReply::CreateTransfers(_) => panic!("a create-accounts batch got a transfers reply"),
    }
}

pub fn expect_transfers(reply: BatchReply) -> Vec<EventResult<CreateTransferResult>> {
    match reply {
        BatchReply::CreateTransfers(results) => results,
        BatchReply::CreateAccounts(_) => panic!("a create-transfers batch got an accounts reply"),
    }
}

pub fn change_event_to(event: &ledger::query::ChangeEvent) -> pb::ChangeEvent {
    use ledger::ChangeKind as K;
    use pb::ChangeType as T;
    let kind = match event.change.kind {
        K::AccountCreated => T::AccountCreated,
        K::SinglePhase => T::SinglePhase,
        K::TwoPhasePending => T::TwoPhasePending,
        K::TwoPhasePosted => T::TwoPhasePosted,
        K::TwoPhaseVoided => T::TwoPhaseVoided,
        K::TwoPhaseExpired => T::TwoPhaseExpired,
    };
    let created = event.change.kind == K::AccountCreated;
    pb::ChangeEvent {
        timestamp: event.change.timestamp,
        r#type: kind as i32,
        transfer: event.transfer.as_ref().map(transfer_to),
        debit_account: (!created).then(|| account_to(&event.debit_account)),
        credit_account: event.credit_account.as_ref().map(account_to),
        account: created.then(|| account_to(&event.debit_account)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proto enums and the ledger's result codes are one contract: same numbers, same names.
    #[test]
    fn result_codes_match_the_proto() {
        for code in CreateAccountResult::ALL {
            let proto = pb::CreateAccountStatus::try_from(*code as i32).expect("missing in ledger.proto");
            let name = proto.as_str_name().trim_start_matches("CREATE_ACCOUNT_STATUS_").replace('_', "");
            assert_eq!(name, format!("{code:?}").to_uppercase(), "{code:?}");
        }
        for code in CreateTransferResult::ALL {
            let proto = pb::CreateTransferStatus::try_from(*code as i32).expect("missing in ledger.proto");
            let name = proto.as_str_name().trim_start_matches("CREATE_TRANSFER_STATUS_").replace('_', "");
            assert_eq!(name, format!("{code:?}").to_uppercase(), "{code:?}");
        }
        assert!(pb::CreateAccountStatus::try_from(CreateAccountResult::ALL.len() as i32).is_err());
        assert!(pb::CreateTransferStatus::try_from(CreateTransferResult::ALL.len() as i32).is_err());
    }

    #[test]
    fn flags_match_the_proto() {
        assert_eq!(pb::AccountFlag::Linked as u16, AccountFlags::LINKED);
        assert_eq!(
            pb::AccountFlag::DebitsMustNotExceedCredits as u16,
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
        );
        assert_eq!(
            pb::AccountFlag::CreditsMustNotExceedDebits as u16,
            AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS
        );
        assert_eq!(pb::AccountFlag::History as u16, AccountFlags::HISTORY);
        assert_eq!(pb::AccountFlag::Closed as u16, AccountFlags::CLOSED);
        assert_eq!(pb::AccountFlag::Imported as u16, AccountFlags::IMPORTED);
        assert_eq!(pb::TransferFlag::Linked as u16, TransferFlags::LINKED);
        assert_eq!(pb::TransferFlag::Pending as u16, TransferFlags::PENDING);
        assert_eq!(pb::TransferFlag::PostPendingTransfer as u16, TransferFlags::POST_PENDING_TRANSFER);
        assert_eq!(pb::TransferFlag::VoidPendingTransfer as u16, TransferFlags::VOID_PENDING_TRANSFER);
        assert_eq!(pb::TransferFlag::BalancingDebit as u16, TransferFlags::BALANCING_DEBIT);
        assert_eq!(pb::TransferFlag::BalancingCredit as u16, TransferFlags::BALANCING_CREDIT);
        assert_eq!(pb::TransferFlag::ClosingDebit as u16, TransferFlags::CLOSING_DEBIT);
        assert_eq!(pb::TransferFlag::ClosingCredit as u16, TransferFlags::CLOSING_CREDIT);
        assert_eq!(pb::TransferFlag::Imported as u16, TransferFlags::IMPORTED);
    }

    #[test]
    fn u128_round_trip() {
        for value in [0, 1, u64::MAX as u128, 1 << 64, u128::MAX] {
            assert_eq!(u128_from(u128_to(value).as_ref()), value);
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let event = pb::Transfer { code: 70_000, ..pb::Transfer::default() };
        let status = transfers_from(&[event]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("event 0: code 70000"), "{}", status.message());
        assert_eq!(transfers_from(&[]).unwrap_err().code(), tonic::Code::InvalidArgument);
        let too_many = vec![pb::Transfer::default(); BATCH_EVENTS_MAX + 1];
        assert!(transfers_from(&too_many).unwrap_err().message().contains("8190"));
        let flags = pb::Transfer { flags: 1 << 20, ..pb::Transfer::default() };
        assert!(transfers_from(&[flags]).unwrap()[0].flags.has_reserved_bits());
    }
}
