//! The data model: accounts, transfers, their flags, and the result codes of creating them.
//!
//! The shapes follow TigerBeetle's public reference (128-bit ids and amounts, `ledger`, `code`,
//! `user_data_*`), so that a team that knows one knows the other. Every record has a fixed
//! 128-byte encoding (see `codec.rs`), which is what the store persists and what the digest hashes.

/// The most events (accounts or transfers) one batch may carry, and the most results one query may
/// return. TigerBeetle's figure: a 1 MiB message of 128-byte events, less the header.
pub const BATCH_EVENTS_MAX: usize = 8189;

/// The most ids one lookup may ask for, and the largest `limit` of a history query.
pub const QUERY_RESULTS_MAX: usize = BATCH_EVENTS_MAX;

/// Ledger time is in nanoseconds; a pending transfer's `timeout` is in seconds.
pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Posting a pending transfer with this amount posts the whole pending amount.
pub const AMOUNT_MAX: u128 = u128::MAX;

/// Ids must be neither zero nor this value: both are reserved as sentinels.
pub const ID_RESERVED_MAX: u128 = u128::MAX;

macro_rules! flags {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $flag:ident = $bit:expr,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub u16);

        impl $name {
            $($(#[$fdoc])* pub const $flag: u16 = 1 << $bit;)*
            /// Every bit that has a meaning; any other bit set is `reserved_flag`.
            pub const KNOWN: u16 = 0 $(| (1 << $bit))*;

            pub fn contains(self, flag: u16) -> bool {
                self.0 & flag != 0
            }

            pub fn has_reserved_bits(self) -> bool {
                self.0 & !Self::KNOWN != 0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut names = Vec::new();
                $(if self.contains(Self::$flag) { names.push(stringify!($flag)); })*
                if self.has_reserved_bits() { names.push("RESERVED"); }
                write!(f, "{}({})", stringify!($name), names.join("|"))
            }
        }
    };
}

flags! {
    /// Account flags. Bit positions match TigerBeetle's.
    AccountFlags {
        /// This event and the next one succeed or fail together.
        LINKED = 0,
        /// `debits_pending + debits_posted` may never exceed `credits_posted`.
        DEBITS_MUST_NOT_EXCEED_CREDITS = 1,
        /// `credits_pending + credits_posted` may never exceed `debits_posted`.
        CREDITS_MUST_NOT_EXCEED_DEBITS = 2,
        /// Keep the account's balances after each of its transfers, for `GetAccountBalances`.
        HISTORY = 3,
        /// Loaded from another system with its own timestamp (`Account::timestamp`), which must be
        /// in the past and after every event so far. A batch is imported or not as a whole.
        IMPORTED = 4,
        /// The account takes no new transfers. Set by a closing transfer, or at creation.
        CLOSED = 5,
    }
}

flags! {
    /// Transfer flags. Bit positions match TigerBeetle's.
    TransferFlags {
        /// This event and the next one succeed or fail together.
        LINKED = 0,
        /// Reserve the amount as pending, to be posted or voided later, or to expire.
        PENDING = 1,
        /// Post the pending transfer `pending_id` (fully, or partially with a smaller amount).
        POST_PENDING_TRANSFER = 2,
        /// Void the pending transfer `pending_id`, releasing its reservation.
        VOID_PENDING_TRANSFER = 3,
        /// Clamp the amount so the debit account's debits do not exceed its credits.
        BALANCING_DEBIT = 4,
        /// Clamp the amount so the credit account's credits do not exceed its debits.
        BALANCING_CREDIT = 5,
        /// Close the debit account (pending only, so voiding reopens it).
        CLOSING_DEBIT = 6,
        /// Close the credit account (pending only, so voiding reopens it).
        CLOSING_CREDIT = 7,
        /// Loaded from another system with its own timestamp (`Transfer::timestamp`), which must
        /// be in the past, after every event so far and after both accounts'. A batch is imported
        /// or not as a whole; an imported pending transfer has no timeout.
        IMPORTED = 8,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Account {
    pub id: u128,
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    pub ledger: u32,
    pub code: u16,
    pub flags: AccountFlags,
    /// Nanoseconds of ledger time at creation; zero in a create request.
    pub timestamp: u64,
}

impl Account {
    /// Would debiting `amount` more break the debit limit flag?
    pub fn debits_exceed_credits(&self, amount: u128) -> bool {
        self.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && self.debits_pending + self.debits_posted + amount > self.credits_posted
    }

    /// Would crediting `amount` more break the credit limit flag?
    pub fn credits_exceed_debits(&self, amount: u128) -> bool {
        self.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && self.credits_pending + self.credits_posted + amount > self.debits_posted
    }

    pub fn balance(&self, timestamp: u64) -> AccountBalance {
        AccountBalance {
            debits_pending: self.debits_pending,
            debits_posted: self.debits_posted,
            credits_pending: self.credits_pending,
            credits_posted: self.credits_posted,
            timestamp,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Transfer {
    pub id: u128,
    pub debit_account_id: u128,
    pub credit_account_id: u128,
    pub amount: u128,
    /// For a post or void: the pending transfer it settles. Zero otherwise.
    pub pending_id: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    /// Seconds after `timestamp` at which a pending transfer expires; zero never expires.
    pub timeout: u32,
    pub ledger: u32,
    pub code: u16,
    pub flags: TransferFlags,
    /// Nanoseconds of ledger time at creation; zero in a create request.
    pub timestamp: u64,
}

impl Transfer {
    pub fn is_post_or_void(&self) -> bool {
        self.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
            || self.flags.contains(TransferFlags::VOID_PENDING_TRANSFER)
    }
}

/// What became of a pending transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PendingStatus {
    Pending = 1,
    Posted = 2,
    Voided = 3,
    Expired = 4,
}

impl PendingStatus {
    pub fn from_u8(value: u8) -> Option<PendingStatus> {
        match value {
            1 => Some(PendingStatus::Pending),
            2 => Some(PendingStatus::Posted),
            3 => Some(PendingStatus::Voided),
            4 => Some(PendingStatus::Expired),
            _ => None,
        }
    }
}

/// An account's balances just after one of its transfers (accounts with the `history` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AccountBalance {
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
    /// The timestamp of the transfer after which the account had these balances.
    pub timestamp: u64,
}

/// What an event of the change stream did (TigerBeetle's CDC event types, and account creation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChangeKind {
    AccountCreated = 1,
    /// A transfer that is neither pending nor settles one.
    SinglePhase = 2,
    TwoPhasePending = 3,
    TwoPhasePosted = 4,
    TwoPhaseVoided = 5,
    /// A pending transfer's timeout passed: its reservation is released.
    TwoPhaseExpired = 6,
}

impl ChangeKind {
    pub fn from_u8(value: u8) -> Option<ChangeKind> {
        [
            ChangeKind::AccountCreated,
            ChangeKind::SinglePhase,
            ChangeKind::TwoPhasePending,
            ChangeKind::TwoPhasePosted,
            ChangeKind::TwoPhaseVoided,
            ChangeKind::TwoPhaseExpired,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == value)
    }

    /// The kind of event a created transfer is.
    pub fn of_transfer(flags: TransferFlags) -> ChangeKind {
        if flags.contains(TransferFlags::PENDING) {
            ChangeKind::TwoPhasePending
        } else if flags.contains(TransferFlags::POST_PENDING_TRANSFER) {
            ChangeKind::TwoPhasePosted
        } else if flags.contains(TransferFlags::VOID_PENDING_TRANSFER) {
            ChangeKind::TwoPhaseVoided
        } else {
            ChangeKind::SinglePhase
        }
    }
}

/// One event of the change stream, as the ledger records it when it applies the event: every
/// account created, transfer created and pending transfer expired, in ledger time, each with its
/// own timestamp (an expiry's is the ledger time it happened at), and the balances of the
/// accounts it touched just after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChangeRecord {
    pub timestamp: u64,
    pub kind: ChangeKind,
    /// The account created, the transfer created, or the pending transfer that expired.
    pub id: u128,
    /// The debit account's balances after the event (the created account's, zero, for
    /// `AccountCreated`). Their `timestamp` is the event's.
    pub debit: AccountBalance,
    /// The credit account's balances after the event (zero for `AccountCreated`).
    pub credit: AccountBalance,
}

/// The most index entries or records one query examines before it answers with what it found
/// and where to go on (`Page::resume`): a query whose filter matches little of a long range must
/// not hold a replica's state for seconds.
pub const QUERY_SCAN_MAX: usize = 8 * BATCH_EVENTS_MAX;

/// A query over one account's transfers, for `GetAccountTransfers` and `GetAccountBalances`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AccountFilter {
    pub account_id: u128,
    /// Only transfers with this `user_data_128`; zero means any.
    pub user_data_128: u128,
    /// Only transfers with this `user_data_64`; zero means any.
    pub user_data_64: u64,
    /// Only transfers with this `user_data_32`; zero means any.
    pub user_data_32: u32,
    /// Only transfers with this `code`; zero means any.
    pub code: u16,
    /// Inclusive lower bound; zero means no bound.
    pub timestamp_min: u64,
    /// Inclusive upper bound; zero means no bound.
    pub timestamp_max: u64,
    /// At most this many results, 1 to `QUERY_RESULTS_MAX`.
    pub limit: u32,
    /// Include transfers that debit the account.
    pub debits: bool,
    /// Include transfers that credit the account.
    pub credits: bool,
    /// Newest first.
    pub reversed: bool,
}

/// A query over all accounts or all transfers, for `QueryAccounts` and `QueryTransfers`
/// (TigerBeetle's `QueryFilter`): every non-zero field must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueryFilter {
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    pub ledger: u32,
    pub code: u16,
    /// Inclusive lower bound; zero means no bound.
    pub timestamp_min: u64,
    /// Inclusive upper bound; zero means no bound.
    pub timestamp_max: u64,
    /// At most this many results, 1 to `QUERY_RESULTS_MAX`.
    pub limit: u32,
    /// Newest first.
    pub reversed: bool,
}

/// Why a filter was refused. The API turns these into `INVALID_ARGUMENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    AccountIdInvalid,
    TimestampMinInvalid,
    TimestampMaxInvalid,
    TimestampRangeInvalid,
    LimitInvalid,
    NoSideSelected,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FilterError::AccountIdInvalid => "account_id must not be zero or 2^128-1",
            FilterError::TimestampMinInvalid => "timestamp_min must not exceed 2^63",
            FilterError::TimestampMaxInvalid => "timestamp_max must not exceed 2^63",
            FilterError::TimestampRangeInvalid => "timestamp_min must not exceed timestamp_max",
            FilterError::LimitInvalid => "limit must be between 1 and 8189",
            FilterError::NoSideSelected => "at least one of debits and credits must be selected",
        })
    }
}

/// Checked in this order, for both kinds of filter: timestamp_min, timestamp_max, their order,
/// limit (and for an account filter: the account id first, the sides last).
fn validate_range(timestamp_min: u64, timestamp_max: u64, limit: u32) -> Result<(), FilterError> {
    if timestamp_min > TIMESTAMP_QUERY_MAX {
        return Err(FilterError::TimestampMinInvalid);
    }
    if timestamp_max > TIMESTAMP_QUERY_MAX {
        return Err(FilterError::TimestampMaxInvalid);
    }
    if timestamp_max != 0 && timestamp_min > timestamp_max {
        return Err(FilterError::TimestampRangeInvalid);
    }
    if limit == 0 || limit as usize > QUERY_RESULTS_MAX {
        return Err(FilterError::LimitInvalid);
    }
    Ok(())
}

/// TigerBeetle's bound on a filter's timestamps: ledger time stays below 2^63.
pub const TIMESTAMP_QUERY_MAX: u64 = 1 << 63;

impl AccountFilter {
    pub fn validate(&self) -> Result<(), FilterError> {
        if self.account_id == 0 || self.account_id == ID_RESERVED_MAX {
            return Err(FilterError::AccountIdInvalid);
        }
        validate_range(self.timestamp_min, self.timestamp_max, self.limit)?;
        if !self.debits && !self.credits {
            return Err(FilterError::NoSideSelected);
        }
        Ok(())
    }

    pub fn timestamp_max_inclusive(&self) -> u64 {
        if self.timestamp_max == 0 { u64::MAX } else { self.timestamp_max }
    }

    /// Whether a transfer of this account matches the filter: its side, and every non-zero field.
    pub fn matches(&self, transfer: &Transfer) -> bool {
        let side = (self.debits && transfer.debit_account_id == self.account_id)
            || (self.credits && transfer.credit_account_id == self.account_id);
        side && (self.user_data_128 == 0 || transfer.user_data_128 == self.user_data_128)
            && (self.user_data_64 == 0 || transfer.user_data_64 == self.user_data_64)
            && (self.user_data_32 == 0 || transfer.user_data_32 == self.user_data_32)
            && (self.code == 0 || transfer.code == self.code)
    }

    /// Whether the side and fields need the transfer itself to decide (the index holds neither).
    pub fn needs_transfer(&self) -> bool {
        !(self.debits && self.credits)
            || self.user_data_128 != 0
            || self.user_data_64 != 0
            || self.user_data_32 != 0
            || self.code != 0
    }
}

impl QueryFilter {
    pub fn validate(&self) -> Result<(), FilterError> {
        validate_range(self.timestamp_min, self.timestamp_max, self.limit)
    }

    pub fn timestamp_max_inclusive(&self) -> u64 {
        if self.timestamp_max == 0 { u64::MAX } else { self.timestamp_max }
    }

    /// The filter's non-zero fields, most selective first (by what they usually hold: references,
    /// then categories), as values of a `Field`.
    pub fn fields(&self) -> impl Iterator<Item = (Field, u128)> {
        [
            (Field::UserData128, self.user_data_128),
            (Field::UserData64, u128::from(self.user_data_64)),
            (Field::UserData32, u128::from(self.user_data_32)),
            (Field::Code, u128::from(self.code)),
            (Field::Ledger, u128::from(self.ledger)),
        ]
        .into_iter()
        .filter(|(_, value)| *value != 0)
    }

    /// Checked on every record a query examines: no allocation.
    pub fn matches_transfer(&self, transfer: &Transfer) -> bool {
        self.fields().all(|(field, value)| field.of_transfer(transfer) == value)
    }

    pub fn matches_account(&self, account: &Account) -> bool {
        self.fields().all(|(field, value)| field.of_account(account) == value)
    }
}

/// A field queries can select accounts and transfers by; each has an index in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    UserData128 = 0,
    UserData64 = 1,
    UserData32 = 2,
    Ledger = 3,
    Code = 4,
}

impl Field {
    pub const ALL: [Field; 5] =
        [Field::UserData128, Field::UserData64, Field::UserData32, Field::Ledger, Field::Code];

    pub fn of_transfer(self, transfer: &Transfer) -> u128 {
        match self {
            Field::UserData128 => transfer.user_data_128,
            Field::UserData64 => u128::from(transfer.user_data_64),
            Field::UserData32 => u128::from(transfer.user_data_32),
            Field::Ledger => u128::from(transfer.ledger),
            Field::Code => u128::from(transfer.code),
        }
    }

    pub fn of_account(self, account: &Account) -> u128 {
        match self {
            Field::UserData128 => account.user_data_128,
            Field::UserData64 => u128::from(account.user_data_64),
            Field::UserData32 => u128::from(account.user_data_32),
            Field::Ledger => u128::from(account.ledger),
            Field::Code => u128::from(account.code),
        }
    }
}

/// One answer of a bounded query: the results, and when the scan budget (`QUERY_SCAN_MAX`) ran
/// out before `limit` results were found, the timestamp to go on from. Asking again with
/// `timestamp_min` (or, reversed, `timestamp_max`) set to it continues where this one stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub results: Vec<T>,
    pub resume: Option<u64>,
}

macro_rules! result_codes {
    ($(#[$doc:meta])* $name:ident { $($(#[$cdoc:meta])* $code:ident = $value:expr,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$cdoc])* $code = $value,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$code,)*];

            pub fn from_u32(value: u32) -> Option<$name> {
                match value {
                    $($value => Some($name::$code),)*
                    _ => None,
                }
            }

            /// Whether the event took effect now (`Ok`) or had already (`Exists`).
            pub fn is_success(self) -> bool {
                matches!(self, $name::Ok | $name::Exists)
            }
        }
    };
}

result_codes! {
    /// The result of creating one account. The numbering is the wire contract (`ledger.proto`),
    /// and the variants are listed in the order in which they are checked (`exec.rs`).
    CreateAccountResult {
        Ok = 0,
        LinkedEventFailed = 1,
        LinkedEventChainOpen = 2,
        ImportedEventExpected = 21,
        ImportedEventNotExpected = 22,
        TimestampMustBeZero = 3,
        ImportedEventTimestampOutOfRange = 23,
        ImportedEventTimestampMustNotAdvance = 24,
        ReservedFlag = 4,
        IdMustNotBeZero = 5,
        IdMustNotBeIntMax = 6,
        ExistsWithDifferentFlags = 7,
        ExistsWithDifferentUserData128 = 8,
        ExistsWithDifferentUserData64 = 9,
        ExistsWithDifferentUserData32 = 10,
        ExistsWithDifferentLedger = 11,
        ExistsWithDifferentCode = 12,
        Exists = 13,
        FlagsAreMutuallyExclusive = 14,
        DebitsPendingMustBeZero = 15,
        DebitsPostedMustBeZero = 16,
        CreditsPendingMustBeZero = 17,
        CreditsPostedMustBeZero = 18,
        LedgerMustNotBeZero = 19,
        CodeMustNotBeZero = 20,
        ImportedEventTimestampMustNotRegress = 25,
    }
}

result_codes! {
    /// The result of creating one transfer. The numbering is the wire contract (`ledger.proto`).
    /// Listed in the order in which they are checked: the codes up to `Exists` apply to every
    /// transfer, then come those of a post or void, then those of a new transfer (`exec.rs`).
    CreateTransferResult {
        Ok = 0,
        LinkedEventFailed = 1,
        LinkedEventChainOpen = 2,
        ImportedEventExpected = 60,
        ImportedEventNotExpected = 61,
        TimestampMustBeZero = 3,
        ImportedEventTimestampOutOfRange = 62,
        ImportedEventTimestampMustNotAdvance = 63,
        ReservedFlag = 4,
        IdMustNotBeZero = 5,
        IdMustNotBeIntMax = 6,
        ExistsWithDifferentFlags = 7,
        ExistsWithDifferentPendingId = 8,
        ExistsWithDifferentTimeout = 9,
        ExistsWithDifferentDebitAccountId = 10,
        ExistsWithDifferentCreditAccountId = 11,
        ExistsWithDifferentAmount = 12,
        ExistsWithDifferentUserData128 = 13,
        ExistsWithDifferentUserData64 = 14,
        ExistsWithDifferentUserData32 = 15,
        ExistsWithDifferentLedger = 16,
        ExistsWithDifferentCode = 17,
        Exists = 18,
        IdAlreadyFailed = 59,
        FlagsAreMutuallyExclusive = 19,
        PendingIdMustNotBeZero = 20,
        PendingIdMustNotBeIntMax = 21,
        PendingIdMustBeDifferent = 22,
        TimeoutReservedForPendingTransfer = 23,
        PendingTransferNotFound = 24,
        PendingTransferNotPending = 25,
        PendingTransferHasDifferentDebitAccountId = 26,
        PendingTransferHasDifferentCreditAccountId = 27,
        PendingTransferHasDifferentLedger = 28,
        PendingTransferHasDifferentCode = 29,
        ExceedsPendingTransferAmount = 30,
        PendingTransferHasDifferentAmount = 31,
        PendingTransferAlreadyPosted = 32,
        PendingTransferAlreadyVoided = 33,
        PendingTransferExpired = 34,
        DebitAccountIdMustNotBeZero = 35,
        DebitAccountIdMustNotBeIntMax = 36,
        CreditAccountIdMustNotBeZero = 37,
        CreditAccountIdMustNotBeIntMax = 38,
        AccountsMustBeDifferent = 39,
        PendingIdMustBeZero = 40,
        ClosingTransferMustBePending = 41,
        LedgerMustNotBeZero = 42,
        CodeMustNotBeZero = 43,
        DebitAccountNotFound = 44,
        CreditAccountNotFound = 45,
        AccountsMustHaveTheSameLedger = 46,
        TransferMustHaveTheSameLedgerAsAccounts = 47,
        ImportedEventTimestampMustNotRegress = 64,
        ImportedEventTimestampMustPostdateDebitAccount = 65,
        ImportedEventTimestampMustPostdateCreditAccount = 66,
        ImportedEventTimeoutMustBeZero = 67,
        DebitAccountAlreadyClosed = 48,
        CreditAccountAlreadyClosed = 49,
        OverflowsDebitsPending = 50,
        OverflowsCreditsPending = 51,
        OverflowsDebitsPosted = 52,
        OverflowsCreditsPosted = 53,
        OverflowsDebits = 54,
        OverflowsCredits = 55,
        OverflowsTimeout = 56,
        ExceedsCredits = 57,
        ExceedsDebits = 58,
    }
}

impl CreateTransferResult {
    /// A failure that depends on the state at the moment (TigerBeetle's transient errors): the
    /// same transfer could succeed later. The ledger remembers the id of a transfer that failed
    /// so, and refuses it from then on (`IdAlreadyFailed`), so that a retry never turns a
    /// refused payment into an accepted one.
    pub fn is_transient(self) -> bool {
        use CreateTransferResult as R;
        matches!(
            self,
            R::DebitAccountNotFound
                | R::CreditAccountNotFound
                | R::PendingTransferNotFound
                | R::ExceedsCredits
                | R::ExceedsDebits
                | R::DebitAccountAlreadyClosed
                | R::CreditAccountAlreadyClosed
        )
    }
}

/// One event's outcome: its code, and the ledger timestamp of the object it names (the new one
/// for `Ok`, the original for `Exists`, zero for a rejection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventResult<R> {
    pub result: R,
    pub timestamp: u64,
}

/// One client request as the state machine sees it. A Raft entry carries one or more batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Batch {
    CreateAccounts(Vec<Account>),
    CreateTransfers(Vec<Transfer>),
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::CreateAccounts(events) => events.len(),
            Batch::CreateTransfers(events) => events.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The results of one batch, one per event, in event order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchReply {
    CreateAccounts(Vec<EventResult<CreateAccountResult>>),
    CreateTransfers(Vec<EventResult<CreateTransferResult>>),
}
