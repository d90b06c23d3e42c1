//! Shared test machinery: event builders, a reference model (the auditor), a seeded workload,
//! and the invariants every state must keep.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ledger::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type AF = AccountFlags;
pub type TF = TransferFlags;

pub fn account(id: u128, ledger: u32, flags: u16) -> Account {
    Account { id, ledger, code: 1, flags: AccountFlags(flags), ..Account::default() }
}

pub fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

pub fn flagged(mut t: Transfer, flags: u16) -> Transfer {
    t.flags = TransferFlags(flags);
    t
}

/// A post (or void, with `TF::VOID_PENDING_TRANSFER`) of `pending_id`, inheriting everything.
pub fn settle(id: u128, pending_id: u128, flags: u16, amount: u128) -> Transfer {
    Transfer { id, pending_id, amount, flags: TransferFlags(flags), ..Transfer::default() }
}

/// Seed for a randomized test: `TALLY_SEED` if set (to reproduce a failure), else a fixed one
/// per test, so CI runs are reproducible too.
pub fn seed(default: u64) -> u64 {
    std::env::var("TALLY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The auditor: a deliberately simple model of the ledger. No overlay, no undo log, no store:
// plain maps, a whole-model clone to roll back a linked chain, a linear scan to expire.

#[derive(Clone, Default, Debug)]
pub struct Model {
    pub accounts: BTreeMap<u128, Account>,
    pub transfers: BTreeMap<u128, Transfer>,
    pub status: BTreeMap<u128, PendingStatus>,
    /// Per account with history: balances after each transfer.
    pub history: BTreeMap<u128, Vec<AccountBalance>>,
    pub timestamp_last: u64,
    /// Transfers that failed for a transient reason: never rolled back, never created later.
    pub failed: BTreeMap<u128, CreateTransferResult>,
    /// How many retries were refused as already failed.
    pub refused_again: u64,
    /// Results the queries against the model found (to assert the filters select something).
    pub query_results: usize,
    /// How many pending transfers a tick (no write) expired.
    pub expired_by_ticks: usize,
    /// How many imported events were created.
    pub imported: usize,
    /// What the open linked chain changed besides accounts, to roll it back.
    journal: Vec<Change>,
    /// Every event's change record, in ledger time: what the change stream must list.
    pub changes: Vec<ChangeRecord>,
}

#[derive(Clone, Debug)]
enum Change {
    Transfer(u128),
    Status(u128, Option<PendingStatus>),
    History(u128),
    Event,
}

impl Model {
    pub fn apply(&mut self, batch: &Batch, proposed: u64) -> BatchReply {
        let imported = match batch {
            Batch::CreateAccounts(events) => events.first().is_some_and(|e| e.flags.contains(AF::IMPORTED)),
            Batch::CreateTransfers(events) => events.first().is_some_and(|e| e.flags.contains(TF::IMPORTED)),
        };
        let now = proposed.max(self.timestamp_last + 1);
        // An imported batch: no expiry, each event at its own time, before `proposed`. Otherwise
        // the expiries due come first, at timestamps of their own, and the events after them.
        if !imported {
            self.expire(now);
        }
        let first = now.max(self.timestamp_last + 1);
        let time = if imported { Err(proposed) } else { Ok(first) };
        let reply = match batch {
            Batch::CreateAccounts(events) => BatchReply::CreateAccounts(self.run(
                events,
                time,
                (
                    |e: &Account| e.flags.contains(AF::LINKED),
                    |e: &Account| e.timestamp,
                    |e: &Account| e.flags.contains(AF::IMPORTED),
                ),
                Model::create_account,
            )),
            Batch::CreateTransfers(events) => BatchReply::CreateTransfers(self.run(
                events,
                time,
                (
                    |e: &Transfer| e.flags.contains(TF::LINKED),
                    |e: &Transfer| e.timestamp,
                    |e: &Transfer| e.flags.contains(TF::IMPORTED),
                ),
                Model::create_transfer,
            )),
        };
        if !batch.is_empty() && !imported {
            self.timestamp_last = first + batch.len() as u64 - 1;
        }
        reply
    }

    /// `time`: `Ok(first)` for a batch the ledger stamps, `Err(now)` for an imported one.
    fn run<E: Copy, R: Copy + PartialEq + std::fmt::Debug + Code>(
        &mut self,
        events: &[E],
        time: Result<u64, u64>,
        (linked, stamp, imported): (impl Fn(&E) -> bool, impl Fn(&E) -> u64, impl Fn(&E) -> bool),
        create: impl Fn(&mut Model, E, u64) -> (R, u64),
    ) -> Vec<EventResult<R>> {
        let mut results = Vec::new();
        let mut index = 0;
        while index < events.len() {
            // A chain: from `index` through the first event without the linked flag.
            let mut end = index;
            while end < events.len() && linked(&events[end]) {
                end += 1;
            }
            let open = end == events.len();
            let end = end.min(events.len() - 1);
            let accounts_before = self.accounts.clone();
            let timestamp_before = self.timestamp_last;
            self.journal.clear();
            let mut chain = Vec::new();
            let mut failed = false;
            for (i, event) in events.iter().enumerate().take(end + 1).skip(index) {
                let result = if open && i == end {
                    (R::CHAIN_OPEN, 0)
                } else if failed {
                    (R::LINKED_FAILED, 0)
                } else {
                    match time {
                        Ok(_) if imported(event) => (R::IMPORTED_NOT_EXPECTED, 0),
                        Err(_) if !imported(event) => (R::IMPORTED_EXPECTED, 0),
                        Ok(_) if stamp(event) != 0 => (R::TIMESTAMP_NOT_ZERO, 0),
                        Ok(first) => create(self, *event, first + i as u64),
                        Err(_) if stamp(event) == 0 || stamp(event) >= 1 << 63 => {
                            (R::IMPORTED_OUT_OF_RANGE, 0)
                        }
                        Err(now) if stamp(event) > now => (R::IMPORTED_IN_THE_FUTURE, 0),
                        Err(_) => {
                            let created = create(self, *event, stamp(event));
                            if created.0 == R::OK {
                                self.timestamp_last = stamp(event);
                                self.imported += 1;
                            }
                            created
                        }
                    }
                };
                if result.0 != R::OK && !failed {
                    failed = true;
                    self.timestamp_last = timestamp_before;
                    self.accounts = accounts_before.clone();
                    self.roll_back();
                    chain.fill((R::LINKED_FAILED, 0));
                }
                chain.push(result);
            }
            results.extend(chain.into_iter().map(|(result, timestamp)| EventResult { result, timestamp }));
            index = end + 1;
        }
        results
    }

    fn roll_back(&mut self) {
        while let Some(change) = self.journal.pop() {
            match change {
                Change::Transfer(id) => {
                    self.transfers.remove(&id);
                }
                Change::Status(id, Some(previous)) => {
                    self.status.insert(id, previous);
                }
                Change::Status(id, None) => {
                    self.status.remove(&id);
                }
                Change::History(account_id) => {
                    self.history.get_mut(&account_id).unwrap().pop();
                }
                Change::Event => {
                    self.changes.pop();
                }
            }
        }
    }

    fn set_status(&mut self, id: u128, status: PendingStatus) {
        let previous = self.status.insert(id, status);
        self.journal.push(Change::Status(id, previous));
    }

    /// An entry of time alone (`Ledger::apply` with no batches): expiries due then, and ledger
    /// time moved there if anything expired.
    pub fn tick(&mut self, proposed: u64) {
        let now = proposed.max(self.timestamp_last + 1);
        self.expired_by_ticks += self.expire(now);
    }

    /// Expires what is due at `now`, earliest expiry first (then by id), each at its own
    /// timestamp from `now` on; returns how many.
    fn expire(&mut self, now: u64) -> usize {
        let mut due: Vec<(u64, u128)> = self
            .status
            .iter()
            .filter(|(_, status)| **status == PendingStatus::Pending)
            .map(|(id, _)| self.transfers[id])
            .map(|p| (p.timestamp + p.timeout as u64 * NANOS_PER_SECOND, p))
            .filter(|(expires_at, p)| p.timeout > 0 && *expires_at <= now)
            .map(|(expires_at, p)| (expires_at, p.id))
            .collect();
        due.sort_unstable();
        let count = due.len();
        for (_, id) in due {
            let timestamp = now.max(self.timestamp_last + 1);
            self.timestamp_last = timestamp;
            let p = self.transfers[&id];
            let dr = self.accounts.get_mut(&p.debit_account_id).unwrap();
            dr.debits_pending -= p.amount;
            if p.flags.contains(TF::CLOSING_DEBIT) {
                dr.flags.0 &= !AF::CLOSED;
            }
            let cr = self.accounts.get_mut(&p.credit_account_id).unwrap();
            cr.credits_pending -= p.amount;
            if p.flags.contains(TF::CLOSING_CREDIT) {
                cr.flags.0 &= !AF::CLOSED;
            }
            let (debit, credit) = (self.accounts[&p.debit_account_id], self.accounts[&p.credit_account_id]);
            self.event(
                ChangeKind::TwoPhaseExpired,
                id,
                timestamp,
                debit.balance(timestamp),
                credit.balance(timestamp),
            );
            self.set_status(id, PendingStatus::Expired);
        }
        count
    }

    fn event(
        &mut self,
        kind: ChangeKind,
        id: u128,
        timestamp: u64,
        debit: AccountBalance,
        credit: AccountBalance,
    ) {
        self.changes.push(ChangeRecord { timestamp, kind, id, debit, credit });
        self.journal.push(Change::Event);
    }

    fn create_account(&mut self, a: Account, timestamp: u64) -> (CreateAccountResult, u64) {
        use CreateAccountResult as R;
        let f = a.flags;
        let checks = [
            (f.0 & !AF::KNOWN != 0, R::ReservedFlag),
            (a.id == 0, R::IdMustNotBeZero),
            (a.id == u128::MAX, R::IdMustNotBeIntMax),
        ];
        if let Some((_, r)) = checks.iter().find(|(bad, _)| *bad) {
            return (*r, 0);
        }
        if let Some(e) = self.accounts.get(&a.id) {
            let diffs = [
                (a.flags != e.flags, R::ExistsWithDifferentFlags),
                (a.user_data_128 != e.user_data_128, R::ExistsWithDifferentUserData128),
                (a.user_data_64 != e.user_data_64, R::ExistsWithDifferentUserData64),
                (a.user_data_32 != e.user_data_32, R::ExistsWithDifferentUserData32),
                (a.ledger != e.ledger, R::ExistsWithDifferentLedger),
                (a.code != e.code, R::ExistsWithDifferentCode),
            ];
            return match diffs.iter().find(|(bad, _)| *bad) {
                Some((_, r)) => (*r, 0),
                None => (R::Exists, e.timestamp),
            };
        }
        let checks = [
            (
                f.contains(AF::DEBITS_MUST_NOT_EXCEED_CREDITS)
                    && f.contains(AF::CREDITS_MUST_NOT_EXCEED_DEBITS),
                R::FlagsAreMutuallyExclusive,
            ),
            (a.debits_pending != 0, R::DebitsPendingMustBeZero),
            (a.debits_posted != 0, R::DebitsPostedMustBeZero),
            (a.credits_pending != 0, R::CreditsPendingMustBeZero),
            (a.credits_posted != 0, R::CreditsPostedMustBeZero),
            (a.ledger == 0, R::LedgerMustNotBeZero),
            (a.code == 0, R::CodeMustNotBeZero),
            (
                f.contains(AF::IMPORTED) && timestamp <= self.timestamp_last,
                R::ImportedEventTimestampMustNotRegress,
            ),
        ];
        if let Some((_, r)) = checks.iter().find(|(bad, _)| *bad) {
            return (*r, 0);
        }
        self.accounts.insert(a.id, Account { timestamp, ..a });
        let zero = AccountBalance { timestamp, ..AccountBalance::default() };
        self.event(ChangeKind::AccountCreated, a.id, timestamp, zero, zero);
        (R::Ok, timestamp)
    }

    fn create_transfer(&mut self, t: Transfer, timestamp: u64) -> (CreateTransferResult, u64) {
        use CreateTransferResult as R;
        if t.flags.0 & !TF::KNOWN != 0 {
            return (R::ReservedFlag, 0);
        }
        if t.id == 0 {
            return (R::IdMustNotBeZero, 0);
        }
        if t.id == u128::MAX {
            return (R::IdMustNotBeIntMax, 0);
        }
        if let Some(e) = self.transfers.get(&t.id) {
            let r = self.transfer_exists(&t, e);
            return (r, if r == R::Exists { e.timestamp } else { 0 });
        }
        if self.failed.contains_key(&t.id) {
            self.refused_again += 1;
            return (R::IdAlreadyFailed, 0);
        }
        let settles =
            t.flags.contains(TF::POST_PENDING_TRANSFER) || t.flags.contains(TF::VOID_PENDING_TRANSFER);
        let result = if settles { self.settle(t, timestamp) } else { self.new_transfer(t, timestamp) };
        match result {
            Ok(()) => (R::Ok, timestamp),
            Err(r) => {
                // The transient codes, spelled out here rather than asking the ledger.
                if matches!(
                    r,
                    R::DebitAccountNotFound
                        | R::CreditAccountNotFound
                        | R::PendingTransferNotFound
                        | R::ExceedsCredits
                        | R::ExceedsDebits
                        | R::DebitAccountAlreadyClosed
                        | R::CreditAccountAlreadyClosed
                ) {
                    self.failed.insert(t.id, r);
                }
                (r, 0)
            }
        }
    }

    fn transfer_exists(&self, t: &Transfer, e: &Transfer) -> CreateTransferResult {
        use CreateTransferResult as R;
        let settles =
            t.flags.contains(TF::POST_PENDING_TRANSFER) || t.flags.contains(TF::VOID_PENDING_TRANSFER);
        let balancing = t.flags.0 & (TF::BALANCING_DEBIT | TF::BALANCING_CREDIT) != 0;
        if t.flags != e.flags {
            return R::ExistsWithDifferentFlags;
        }
        if t.pending_id != e.pending_id {
            return R::ExistsWithDifferentPendingId;
        }
        if t.timeout != e.timeout {
            return R::ExistsWithDifferentTimeout;
        }
        // For a settle, a zero field means "inherited": compare what it would have inherited.
        let p = if settles { Some(self.transfers[&e.pending_id]) } else { None };
        let pick = |requested: u128, inherited: u128| match p {
            Some(_) if requested == 0 => inherited,
            _ => requested,
        };
        let amount = match p {
            Some(p) if t.flags.contains(TF::VOID_PENDING_TRANSFER) && t.amount == 0 => p.amount,
            Some(p) if t.flags.contains(TF::POST_PENDING_TRANSFER) && t.amount == u128::MAX => p.amount,
            _ => t.amount,
        };
        let p = p.unwrap_or(*e);
        let diffs = [
            (
                pick(t.debit_account_id, e.debit_account_id) != e.debit_account_id,
                R::ExistsWithDifferentDebitAccountId,
            ),
            (
                pick(t.credit_account_id, e.credit_account_id) != e.credit_account_id,
                R::ExistsWithDifferentCreditAccountId,
            ),
            (if balancing { amount < e.amount } else { amount != e.amount }, R::ExistsWithDifferentAmount),
            (pick(t.user_data_128, p.user_data_128) != e.user_data_128, R::ExistsWithDifferentUserData128),
            (
                pick(t.user_data_64.into(), p.user_data_64.into()) != e.user_data_64 as u128,
                R::ExistsWithDifferentUserData64,
            ),
            (
                pick(t.user_data_32.into(), p.user_data_32.into()) != e.user_data_32 as u128,
                R::ExistsWithDifferentUserData32,
            ),
            (pick(t.ledger.into(), e.ledger.into()) != e.ledger as u128, R::ExistsWithDifferentLedger),
            (pick(t.code.into(), e.code.into()) != e.code as u128, R::ExistsWithDifferentCode),
        ];
        diffs.iter().find(|(bad, _)| *bad).map(|(_, r)| *r).unwrap_or(R::Exists)
    }

    fn settle(&mut self, t: Transfer, timestamp: u64) -> Result<(), CreateTransferResult> {
        use CreateTransferResult as R;
        let f = t.flags;
        let post = f.contains(TF::POST_PENDING_TRANSFER);
        let void = f.contains(TF::VOID_PENDING_TRANSFER);
        let others =
            TF::PENDING | TF::BALANCING_DEBIT | TF::BALANCING_CREDIT | TF::CLOSING_DEBIT | TF::CLOSING_CREDIT;
        fail_if(post && void || f.0 & others != 0, R::FlagsAreMutuallyExclusive)?;
        fail_if(t.pending_id == 0, R::PendingIdMustNotBeZero)?;
        fail_if(t.pending_id == u128::MAX, R::PendingIdMustNotBeIntMax)?;
        fail_if(t.pending_id == t.id, R::PendingIdMustBeDifferent)?;
        fail_if(t.timeout != 0, R::TimeoutReservedForPendingTransfer)?;
        let p = *self.transfers.get(&t.pending_id).ok_or(R::PendingTransferNotFound)?;
        fail_if(!p.flags.contains(TF::PENDING), R::PendingTransferNotPending)?;
        fail_if(
            t.debit_account_id != 0 && t.debit_account_id != p.debit_account_id,
            R::PendingTransferHasDifferentDebitAccountId,
        )?;
        fail_if(
            t.credit_account_id != 0 && t.credit_account_id != p.credit_account_id,
            R::PendingTransferHasDifferentCreditAccountId,
        )?;
        fail_if(t.ledger != 0 && t.ledger != p.ledger, R::PendingTransferHasDifferentLedger)?;
        fail_if(t.code != 0 && t.code != p.code, R::PendingTransferHasDifferentCode)?;
        let amount = if void && t.amount == 0 || post && t.amount == u128::MAX { p.amount } else { t.amount };
        fail_if(amount > p.amount, R::ExceedsPendingTransferAmount)?;
        fail_if(void && amount != p.amount, R::PendingTransferHasDifferentAmount)?;
        match self.status[&p.id] {
            PendingStatus::Pending => {}
            PendingStatus::Posted => return Err(R::PendingTransferAlreadyPosted),
            PendingStatus::Voided => return Err(R::PendingTransferAlreadyVoided),
            PendingStatus::Expired => return Err(R::PendingTransferExpired),
        }
        let expired = p.timeout > 0 && p.timestamp + p.timeout as u64 * NANOS_PER_SECOND <= timestamp;
        fail_if(expired, R::PendingTransferExpired)?;
        let mut dr = self.accounts[&p.debit_account_id];
        let mut cr = self.accounts[&p.credit_account_id];
        if f.contains(TF::IMPORTED) {
            self.imported_check(timestamp, &dr, &cr)?;
        }
        fail_if(post && dr.flags.contains(AF::CLOSED), R::DebitAccountAlreadyClosed)?;
        fail_if(post && cr.flags.contains(AF::CLOSED), R::CreditAccountAlreadyClosed)?;
        dr.debits_pending -= p.amount;
        cr.credits_pending -= p.amount;
        if post {
            dr.debits_posted += amount;
            cr.credits_posted += amount;
        } else {
            if p.flags.contains(TF::CLOSING_DEBIT) {
                dr.flags.0 &= !AF::CLOSED;
            }
            if p.flags.contains(TF::CLOSING_CREDIT) {
                cr.flags.0 &= !AF::CLOSED;
            }
        }
        let inherit = |mine: u128, theirs: u128| if mine == 0 { theirs } else { mine };
        let settled = Transfer {
            id: t.id,
            debit_account_id: p.debit_account_id,
            credit_account_id: p.credit_account_id,
            amount,
            pending_id: p.id,
            user_data_128: inherit(t.user_data_128, p.user_data_128),
            user_data_64: inherit(t.user_data_64.into(), p.user_data_64.into()) as u64,
            user_data_32: inherit(t.user_data_32.into(), p.user_data_32.into()) as u32,
            timeout: 0,
            ledger: p.ledger,
            code: p.code,
            flags: t.flags,
            timestamp,
        };
        self.set_status(p.id, if post { PendingStatus::Posted } else { PendingStatus::Voided });
        self.record(settled, dr, cr);
        Ok(())
    }

    fn imported_check(&self, timestamp: u64, dr: &Account, cr: &Account) -> Result<(), CreateTransferResult> {
        use CreateTransferResult as R;
        fail_if(timestamp <= self.timestamp_last, R::ImportedEventTimestampMustNotRegress)?;
        fail_if(timestamp <= dr.timestamp, R::ImportedEventTimestampMustPostdateDebitAccount)?;
        fail_if(timestamp <= cr.timestamp, R::ImportedEventTimestampMustPostdateCreditAccount)
    }

    fn new_transfer(&mut self, t: Transfer, timestamp: u64) -> Result<(), CreateTransferResult> {
        use CreateTransferResult as R;
        let f = t.flags;
        let pending = f.contains(TF::PENDING);
        fail_if(t.debit_account_id == 0, R::DebitAccountIdMustNotBeZero)?;
        fail_if(t.debit_account_id == u128::MAX, R::DebitAccountIdMustNotBeIntMax)?;
        fail_if(t.credit_account_id == 0, R::CreditAccountIdMustNotBeZero)?;
        fail_if(t.credit_account_id == u128::MAX, R::CreditAccountIdMustNotBeIntMax)?;
        fail_if(t.debit_account_id == t.credit_account_id, R::AccountsMustBeDifferent)?;
        fail_if(t.pending_id != 0, R::PendingIdMustBeZero)?;
        fail_if(!pending && t.timeout != 0, R::TimeoutReservedForPendingTransfer)?;
        let closing = f.0 & (TF::CLOSING_DEBIT | TF::CLOSING_CREDIT) != 0;
        fail_if(!pending && closing, R::ClosingTransferMustBePending)?;
        fail_if(t.ledger == 0, R::LedgerMustNotBeZero)?;
        fail_if(t.code == 0, R::CodeMustNotBeZero)?;
        let mut dr = *self.accounts.get(&t.debit_account_id).ok_or(R::DebitAccountNotFound)?;
        let mut cr = *self.accounts.get(&t.credit_account_id).ok_or(R::CreditAccountNotFound)?;
        fail_if(dr.ledger != cr.ledger, R::AccountsMustHaveTheSameLedger)?;
        fail_if(t.ledger != dr.ledger, R::TransferMustHaveTheSameLedgerAsAccounts)?;
        if f.contains(TF::IMPORTED) {
            self.imported_check(timestamp, &dr, &cr)?;
            fail_if(t.timeout != 0, R::ImportedEventTimeoutMustBeZero)?;
        }
        fail_if(dr.flags.contains(AF::CLOSED), R::DebitAccountAlreadyClosed)?;
        fail_if(cr.flags.contains(AF::CLOSED), R::CreditAccountAlreadyClosed)?;
        let mut amount = t.amount;
        if f.contains(TF::BALANCING_DEBIT) {
            let room = dr.credits_posted.saturating_sub(dr.debits_posted.saturating_add(dr.debits_pending));
            amount = amount.min(room);
        }
        if f.contains(TF::BALANCING_CREDIT) {
            let room = cr.debits_posted.saturating_sub(cr.credits_posted.saturating_add(cr.credits_pending));
            amount = amount.min(room);
        }
        let sum = |a: u128, b: u128| a.checked_add(b);
        fail_if(pending && sum(amount, dr.debits_pending).is_none(), R::OverflowsDebitsPending)?;
        fail_if(pending && sum(amount, cr.credits_pending).is_none(), R::OverflowsCreditsPending)?;
        fail_if(sum(amount, dr.debits_posted).is_none(), R::OverflowsDebitsPosted)?;
        fail_if(sum(amount, cr.credits_posted).is_none(), R::OverflowsCreditsPosted)?;
        let dr_total = sum(dr.debits_pending, dr.debits_posted).and_then(|d| sum(d, amount));
        fail_if(dr_total.is_none(), R::OverflowsDebits)?;
        let cr_total = sum(cr.credits_pending, cr.credits_posted).and_then(|c| sum(c, amount));
        fail_if(cr_total.is_none(), R::OverflowsCredits)?;
        fail_if(timestamp.checked_add(t.timeout as u64 * NANOS_PER_SECOND).is_none(), R::OverflowsTimeout)?;
        let limited_debits = dr.flags.contains(AF::DEBITS_MUST_NOT_EXCEED_CREDITS);
        fail_if(limited_debits && dr_total.unwrap() > dr.credits_posted, R::ExceedsCredits)?;
        let limited_credits = cr.flags.contains(AF::CREDITS_MUST_NOT_EXCEED_DEBITS);
        fail_if(limited_credits && cr_total.unwrap() > cr.debits_posted, R::ExceedsDebits)?;
        if pending {
            dr.debits_pending += amount;
            cr.credits_pending += amount;
            self.set_status(t.id, PendingStatus::Pending);
        } else {
            dr.debits_posted += amount;
            cr.credits_posted += amount;
        }
        if f.contains(TF::CLOSING_DEBIT) {
            dr.flags.0 |= AF::CLOSED;
        }
        if f.contains(TF::CLOSING_CREDIT) {
            cr.flags.0 |= AF::CLOSED;
        }
        self.record(Transfer { amount, timestamp, ..t }, dr, cr);
        Ok(())
    }

    fn record(&mut self, t: Transfer, dr: Account, cr: Account) {
        for account in [dr, cr] {
            if account.flags.contains(AF::HISTORY) {
                self.history.entry(account.id).or_default().push(account.balance(t.timestamp));
                self.journal.push(Change::History(account.id));
            }
            self.accounts.insert(account.id, account);
        }
        self.transfers.insert(t.id, t);
        self.journal.push(Change::Transfer(t.id));
        let kind = if t.flags.contains(TF::PENDING) {
            ChangeKind::TwoPhasePending
        } else if t.flags.contains(TF::POST_PENDING_TRANSFER) {
            ChangeKind::TwoPhasePosted
        } else if t.flags.contains(TF::VOID_PENDING_TRANSFER) {
            ChangeKind::TwoPhaseVoided
        } else {
            ChangeKind::SinglePhase
        };
        self.event(kind, t.id, t.timestamp, dr.balance(t.timestamp), cr.balance(t.timestamp));
    }

    /// The transfers of an account matching the filter, as the ledger should return them.
    pub fn account_transfers(&self, f: &AccountFilter) -> Vec<Transfer> {
        let max = if f.timestamp_max == 0 { u64::MAX } else { f.timestamp_max };
        let mut found: Vec<Transfer> = self
            .transfers
            .values()
            .filter(|t| {
                (f.debits && t.debit_account_id == f.account_id)
                    || (f.credits && t.credit_account_id == f.account_id)
            })
            .filter(|t| t.timestamp >= f.timestamp_min && t.timestamp <= max)
            .filter(|t| {
                (f.user_data_128 == 0 || t.user_data_128 == f.user_data_128)
                    && (f.user_data_64 == 0 || t.user_data_64 == f.user_data_64)
                    && (f.user_data_32 == 0 || t.user_data_32 == f.user_data_32)
                    && (f.code == 0 || t.code == f.code)
            })
            .copied()
            .collect();
        found.sort_by_key(|t| t.timestamp);
        if f.reversed {
            found.reverse();
        }
        found.truncate(f.limit as usize);
        found
    }

    /// The transfers matching a query filter, as the ledger should return them.
    pub fn query_transfers(&self, f: &QueryFilter) -> Vec<Transfer> {
        let fields =
            |t: &Transfer| (t.user_data_128, t.user_data_64, t.user_data_32, t.ledger, t.code, t.timestamp);
        query(self.transfers.values().copied(), f, fields)
    }

    /// The accounts matching a query filter, as the ledger should return them.
    pub fn query_accounts(&self, f: &QueryFilter) -> Vec<Account> {
        let fields =
            |a: &Account| (a.user_data_128, a.user_data_64, a.user_data_32, a.ledger, a.code, a.timestamp);
        query(self.accounts.values().copied(), f, fields)
    }
}

/// Records matching a query filter by their (user_data_128, user_data_64, user_data_32, ledger,
/// code, timestamp), in time order (or reversed), up to the limit.
fn query<T>(
    records: impl Iterator<Item = T>,
    f: &QueryFilter,
    fields: impl Fn(&T) -> (u128, u64, u32, u32, u16, u64),
) -> Vec<T> {
    let max = if f.timestamp_max == 0 { u64::MAX } else { f.timestamp_max };
    let mut found: Vec<T> = records
        .filter(|r| {
            let (u128_, u64_, u32_, ledger, code, timestamp) = fields(r);
            (f.user_data_128 == 0 || u128_ == f.user_data_128)
                && (f.user_data_64 == 0 || u64_ == f.user_data_64)
                && (f.user_data_32 == 0 || u32_ == f.user_data_32)
                && (f.ledger == 0 || ledger == f.ledger)
                && (f.code == 0 || code == f.code)
                && timestamp >= f.timestamp_min
                && timestamp <= max
        })
        .collect();
    found.sort_by_key(|r| fields(r).5);
    if f.reversed {
        found.reverse();
    }
    found.truncate(f.limit as usize);
    found
}

fn fail_if(bad: bool, result: CreateTransferResult) -> Result<(), CreateTransferResult> {
    if bad { Err(result) } else { Ok(()) }
}

/// The codes the model's chain runner hands out itself.
pub trait Code: Sized {
    const OK: Self;
    const CHAIN_OPEN: Self;
    const LINKED_FAILED: Self;
    const TIMESTAMP_NOT_ZERO: Self;
    const IMPORTED_EXPECTED: Self;
    const IMPORTED_NOT_EXPECTED: Self;
    const IMPORTED_OUT_OF_RANGE: Self;
    const IMPORTED_IN_THE_FUTURE: Self;
}

impl Code for CreateAccountResult {
    const OK: Self = Self::Ok;
    const CHAIN_OPEN: Self = Self::LinkedEventChainOpen;
    const LINKED_FAILED: Self = Self::LinkedEventFailed;
    const TIMESTAMP_NOT_ZERO: Self = Self::TimestampMustBeZero;
    const IMPORTED_EXPECTED: Self = Self::ImportedEventExpected;
    const IMPORTED_NOT_EXPECTED: Self = Self::ImportedEventNotExpected;
    const IMPORTED_OUT_OF_RANGE: Self = Self::ImportedEventTimestampOutOfRange;
    const IMPORTED_IN_THE_FUTURE: Self = Self::ImportedEventTimestampMustNotAdvance;
}

impl Code for CreateTransferResult {
    const OK: Self = Self::Ok;
    const CHAIN_OPEN: Self = Self::LinkedEventChainOpen;
    const LINKED_FAILED: Self = Self::LinkedEventFailed;
    const TIMESTAMP_NOT_ZERO: Self = Self::TimestampMustBeZero;
    const IMPORTED_EXPECTED: Self = Self::ImportedEventExpected;
    const IMPORTED_NOT_EXPECTED: Self = Self::ImportedEventNotExpected;
    const IMPORTED_OUT_OF_RANGE: Self = Self::ImportedEventTimestampOutOfRange;
    const IMPORTED_IN_THE_FUTURE: Self = Self::ImportedEventTimestampMustNotAdvance;
}

// ---------------------------------------------------------------------------------------------
// Invariants every state must keep, checked against the real ledger.

/// Per ledger: debits equal credits, posted and pending; no account past its limit flag.
pub fn check_invariants(accounts: &[Account]) {
    // Sums as (carries, low 128 bits): a ledger's total may pass 2^128 while each account fits.
    let mut sums: BTreeMap<u32, [(u32, u128); 4]> = BTreeMap::new();
    let add = |sum: &mut (u32, u128), value: u128| {
        let (low, carry) = sum.1.overflowing_add(value);
        *sum = (sum.0 + carry as u32, low);
    };
    for a in accounts {
        let s = sums.entry(a.ledger).or_default();
        add(&mut s[0], a.debits_posted);
        add(&mut s[1], a.credits_posted);
        add(&mut s[2], a.debits_pending);
        add(&mut s[3], a.credits_pending);
        if a.flags.contains(AF::DEBITS_MUST_NOT_EXCEED_CREDITS) {
            assert!(
                a.debits_pending + a.debits_posted <= a.credits_posted,
                "account {} overdrawn: {a:?}",
                a.id
            );
        }
        if a.flags.contains(AF::CREDITS_MUST_NOT_EXCEED_DEBITS) {
            assert!(
                a.credits_pending + a.credits_posted <= a.debits_posted,
                "account {} over-credited: {a:?}",
                a.id
            );
        }
    }
    for (ledger, [debits_posted, credits_posted, debits_pending, credits_pending]) in sums {
        assert_eq!(debits_posted, credits_posted, "ledger {ledger}: posted debits != posted credits");
        assert_eq!(debits_pending, credits_pending, "ledger {ledger}: pending debits != pending credits");
    }
}

// ---------------------------------------------------------------------------------------------
// A seeded workload: batches of accounts and transfers that exercise every rule, generated
// against the model so that most events are meaningful (known accounts, live pending ids).

pub struct Workload {
    rng: ChaCha8Rng,
    pub model: Model,
    next_id: u128,
    /// Proposed time: advances by up to two seconds a batch, so pending transfers expire.
    pub clock: u64,
    account_ids: Vec<u128>,
    pending_ids: Vec<u128>,
    sent: Vec<Transfer>,
    /// Transfers refused for a transient reason, to be retried.
    refused: Vec<Transfer>,
}

/// Accounts near the top of u128, so that overflow checks get exercised.
const WHALE_LEDGER: u32 = 9;

impl Workload {
    pub fn new(seed: u64) -> Workload {
        Workload {
            rng: ChaCha8Rng::seed_from_u64(seed),
            model: Model::default(),
            next_id: 1,
            clock: 1_700_000_000 * NANOS_PER_SECOND,
            account_ids: Vec::new(),
            pending_ids: Vec::new(),
            sent: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn id(&mut self) -> u128 {
        self.next_id += 1;
        // Spread ids over the key space, as real clients (random or time-based ids) do.
        (self.next_id << 64) | self.rng.random::<u64>() as u128
    }

    /// The next batch and the timestamp to propose for it. Also applies it to the model and
    /// returns the model's reply, which the real ledger must match.
    pub fn next(&mut self) -> (Batch, u64, BatchReply) {
        self.next_at(None)
    }

    /// Like `next`, but proposed at `proposed` when given: the batches of one Raft entry share
    /// their leader's timestamp.
    pub fn next_at(&mut self, proposed: Option<u64>) -> (Batch, u64, BatchReply) {
        self.clock += self.rng.random_range(0..2 * NANOS_PER_SECOND);
        // Now and then a leader with a slow clock: time must still move forwards.
        let slow = self.rng.random_ratio(1, 20);
        let proposed = proposed.unwrap_or(if slow { self.clock - 5 * NANOS_PER_SECOND } else { self.clock });
        let batch = if self.account_ids.len() >= 4 && self.rng.random_ratio(1, 12) {
            self.imported_batch(proposed)
        } else if self.account_ids.len() < 4 || self.rng.random_ratio(1, 25) {
            Batch::CreateAccounts(self.accounts_batch())
        } else {
            Batch::CreateTransfers(self.transfers_batch())
        };
        let reply = self.model.apply(&batch, proposed);
        self.learn(&batch, &reply);
        (batch, proposed, reply)
    }

    fn learn(&mut self, batch: &Batch, reply: &BatchReply) {
        match (batch, reply) {
            (Batch::CreateAccounts(events), BatchReply::CreateAccounts(results)) => {
                for (event, result) in events.iter().zip(results) {
                    if result.result == CreateAccountResult::Ok {
                        self.account_ids.push(event.id);
                    }
                }
            }
            (Batch::CreateTransfers(events), BatchReply::CreateTransfers(results)) => {
                for (event, result) in events.iter().zip(results) {
                    if result.result == CreateTransferResult::Ok {
                        if event.flags.contains(TF::PENDING) {
                            self.pending_ids.push(event.id);
                        }
                        self.sent.push(*event);
                    }
                    if self.model.failed.get(&event.id) == Some(&result.result) {
                        self.refused.push(*event);
                    }
                }
                if self.refused.len() > 256 {
                    self.refused.drain(..128);
                }
                if self.pending_ids.len() > 64 {
                    self.pending_ids.drain(..32);
                }
                if self.sent.len() > 256 {
                    self.sent.drain(..128);
                }
            }
            _ => unreachable!(),
        }
    }

    /// History loaded from another system: accounts or transfers with their own timestamps,
    /// increasing from just after the ledger's last one, each before `proposed` (mostly); now
    /// and then one that breaks a rule of imports.
    fn imported_batch(&mut self, proposed: u64) -> Batch {
        let count = self.rng.random_range(1..=5);
        let mut at = self.model.timestamp_last;
        let mut stamps: Vec<u64> = (0..count)
            .map(|_| {
                at += self.rng.random_range(1..NANOS_PER_SECOND / 4);
                at
            })
            .collect();
        let broken = self.rng.random_ratio(1, 3).then(|| self.rng.random_range(0..count));
        let rule = self.rng.random_range(0..6);
        if let Some(i) = broken {
            stamps[i] = match rule {
                0 => 0,
                1 => 1 << 63,
                2 => proposed + 1,
                3 => self.model.timestamp_last,
                _ => stamps[i],
            };
        }
        if self.rng.random_ratio(1, 3) {
            let mut events: Vec<Account> = stamps
                .iter()
                .map(|stamp| {
                    let mut a = account(self.id(), self.rng.random_range(1..=2), AF::IMPORTED);
                    a.code = self.rng.random_range(1..=3);
                    a.timestamp = *stamp;
                    a
                })
                .collect();
            if let Some(i) = broken.filter(|_| rule == 4) {
                events[i].flags.0 &= !AF::IMPORTED;
            }
            if let Some(i) = broken.filter(|_| rule == 5) {
                events[i].flags.0 |= AF::LINKED;
            }
            return Batch::CreateAccounts(events);
        }
        let mut events: Vec<Transfer> = stamps
            .iter()
            .map(|stamp| {
                let pending = self.rng.random_ratio(1, 4);
                let mut t = self.plain(TF::IMPORTED | if pending { TF::PENDING } else { 0 });
                t.timestamp = *stamp;
                t
            })
            .collect();
        match broken {
            Some(i) if rule == 4 => events[i].flags.0 &= !TF::IMPORTED,
            Some(i) if rule == 5 => {
                events[i].flags.0 |= TF::PENDING;
                events[i].timeout = 1;
            }
            _ => {}
        }
        Batch::CreateTransfers(events)
    }

    fn accounts_batch(&mut self) -> Vec<Account> {
        let count = self.rng.random_range(1..=6);
        let mut events = Vec::new();
        for _ in 0..count {
            let mut a = account(self.id(), self.rng.random_range(1..=2), 0);
            a.code = self.rng.random_range(1..=3);
            a.user_data_64 = self.rng.random_range(0..3);
            a.user_data_128 = self.rng.random_range(0..5);
            a.user_data_32 = self.rng.random_range(0..3);
            a.flags.0 = match self.rng.random_range(0..10) {
                0..=2 => 0,
                3..=4 => AF::DEBITS_MUST_NOT_EXCEED_CREDITS,
                5 => AF::CREDITS_MUST_NOT_EXCEED_DEBITS,
                6..=7 => AF::HISTORY,
                8 => AF::HISTORY | AF::DEBITS_MUST_NOT_EXCEED_CREDITS,
                _ => AF::LINKED,
            };
            if self.rng.random_ratio(1, 8) {
                a.ledger = WHALE_LEDGER;
            }
            events.push(a);
        }
        // Occasionally a broken account, or a retry of an existing one (maybe altered).
        if self.rng.random_ratio(1, 3) {
            let broken = match self.rng.random_range(0..8) {
                0 => Account { id: 0, ..events[0] },
                1 => Account { ledger: 0, ..events[0] },
                2 => Account { code: 0, ..events[0] },
                3 => Account { credits_posted: 1, ..events[0] },
                4 => Account {
                    flags: AccountFlags(
                        AF::DEBITS_MUST_NOT_EXCEED_CREDITS | AF::CREDITS_MUST_NOT_EXCEED_DEBITS,
                    ),
                    ..events[0]
                },
                5 => Account { flags: AccountFlags(1 << 12), ..events[0] },
                6 => Account { timestamp: 1, ..events[0] },
                _ => match self.account_ids.first().and_then(|id| self.model.accounts.get(id)) {
                    Some(existing) => {
                        let mut retry = Account {
                            timestamp: 0,
                            debits_pending: 0,
                            debits_posted: 0,
                            credits_pending: 0,
                            credits_posted: 0,
                            ..*existing
                        };
                        // Closing transfers may have changed the stored flags.
                        retry.flags.0 &= !AF::CLOSED;
                        if self.rng.random_bool(0.5) {
                            retry.user_data_64 += 1;
                        }
                        retry
                    }
                    None => events[0],
                },
            };
            let at = self.rng.random_range(0..=events.len());
            events.insert(at, broken);
        }
        events
    }

    fn pick_account(&mut self) -> Account {
        let id = self.account_ids[self.rng.random_range(0..self.account_ids.len())];
        self.model.accounts[&id]
    }

    /// Two distinct accounts on the same ledger, if there are any.
    fn pick_pair(&mut self) -> (Account, Account) {
        for _ in 0..16 {
            let dr = self.pick_account();
            let cr = self.pick_account();
            if dr.id != cr.id && dr.ledger == cr.ledger {
                return (dr, cr);
            }
        }
        (self.pick_account(), self.pick_account())
    }

    fn transfers_batch(&mut self) -> Vec<Transfer> {
        let count = self.rng.random_range(1..=48);
        let mut events = Vec::with_capacity(count);
        while events.len() < count {
            let chain = if self.rng.random_ratio(1, 6) { self.rng.random_range(2..=4) } else { 1 };
            for link in 0..chain {
                let mut t = self.one_transfer();
                if link + 1 < chain {
                    t.flags.0 |= TF::LINKED;
                }
                events.push(t);
            }
        }
        // Now and then a chain left open at the end of the batch.
        if self.rng.random_ratio(1, 30) {
            events.last_mut().unwrap().flags.0 |= TF::LINKED;
        }
        events
    }

    fn one_transfer(&mut self) -> Transfer {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=39 => self.plain(0),
            40..=52 => {
                let timeout = if self.rng.random_bool(0.5) { 0 } else { self.rng.random_range(1..=4) };
                let mut t = self.plain(TF::PENDING);
                t.timeout = timeout;
                t
            }
            53..=66 => self.settlement(),
            67..=72 => {
                let side = if self.rng.random_bool(0.5) { TF::BALANCING_DEBIT } else { TF::BALANCING_CREDIT };
                let mut t = self.plain(side);
                t.amount = if self.rng.random_bool(0.3) { u128::MAX } else { t.amount };
                t
            }
            73..=74 => {
                let side = if self.rng.random_bool(0.5) { TF::CLOSING_DEBIT } else { TF::CLOSING_CREDIT };
                let mut t = self.plain(TF::PENDING | side);
                t.timeout = self.rng.random_range(0..=3);
                t
            }
            75..=82 => self.retry(),
            83..=86 => self.whale(),
            _ => self.invalid(),
        }
    }

    fn plain(&mut self, flags: u16) -> Transfer {
        let (dr, cr) = self.pick_pair();
        let mut t = transfer(self.id(), dr.id, cr.id, self.rng.random_range(0..500));
        t.ledger = dr.ledger;
        t.code = self.rng.random_range(1..=3);
        t.user_data_32 = self.rng.random_range(0..4);
        // A few references shared by several transfers, for the queries.
        t.user_data_128 = self.rng.random_range(0..12);
        t.user_data_64 = self.rng.random_range(0..3);
        t.flags.0 = flags;
        t
    }

    fn whale(&mut self) -> Transfer {
        let flags = if self.rng.random_bool(0.3) { TF::PENDING } else { 0 };
        let mut t = self.plain(flags);
        t.amount = u128::MAX - self.rng.random_range(0..1000);
        t
    }

    fn settlement(&mut self) -> Transfer {
        let Some(&pending_id) = self.pending_ids.get(self.rng.random_range(0..self.pending_ids.len().max(1)))
        else {
            return self.plain(0);
        };
        let p = self.model.transfers[&pending_id];
        let id = self.id();
        let mut t = if self.rng.random_bool(0.6) {
            let amount = match self.rng.random_range(0..4) {
                0 => u128::MAX,
                1 => p.amount,
                2 => p.amount / 2,
                _ => p.amount + 1,
            };
            settle(id, pending_id, TF::POST_PENDING_TRANSFER, amount)
        } else {
            let amount = match self.rng.random_range(0..3) {
                0 => 0,
                1 => p.amount,
                _ => p.amount.saturating_sub(1),
            };
            settle(id, pending_id, TF::VOID_PENDING_TRANSFER, amount)
        };
        match self.rng.random_range(0..10) {
            0 => t.debit_account_id = p.debit_account_id,
            1 => t.credit_account_id = p.debit_account_id,
            2 => t.code = p.code + 1,
            3 => t.user_data_64 = 7,
            _ => {}
        }
        t
    }

    fn retry(&mut self) -> Transfer {
        // A payment refused earlier, sent again (a client retrying after a timeout): whatever
        // balances did since, it must not go through now.
        if !self.refused.is_empty() && self.rng.random_ratio(1, 3) {
            return self.refused[self.rng.random_range(0..self.refused.len())];
        }
        if self.sent.is_empty() {
            return self.plain(0);
        }
        let mut t = self.sent[self.rng.random_range(0..self.sent.len())];
        match self.rng.random_range(0..8) {
            0 => t.amount = t.amount.wrapping_add(1),
            1 => t.user_data_128 ^= 1,
            2 => t.code = t.code % 3 + 1,
            3 => t.flags.0 ^= TF::PENDING,
            4 => t.timeout += 1,
            _ => {}
        }
        t
    }

    fn invalid(&mut self) -> Transfer {
        let mut t = self.plain(0);
        match self.rng.random_range(0..12) {
            0 => t.id = 0,
            1 => t.id = u128::MAX,
            2 => t.flags.0 |= 1 << 13,
            3 => t.credit_account_id = t.debit_account_id,
            4 => t.debit_account_id = 0,
            5 => t.credit_account_id = self.id(),
            6 => t.ledger = 0,
            7 => t.code = 0,
            8 => t.ledger = t.ledger % 2 + 1,
            9 => t.timeout = 1,
            10 => t.pending_id = 5,
            _ => t.timestamp = 42,
        }
        t
    }

    /// Every account id the model knows.
    pub fn account_ids(&self) -> Vec<u128> {
        self.account_ids.clone()
    }

    /// A random filter over a known account, for comparing history queries.
    pub fn filter(&mut self) -> AccountFilter {
        let account_id = self.pick_account().id;
        let (debits, credits) = match self.rng.random_range(0..3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        let timestamp_min = if self.rng.random_bool(0.3) { self.clock - 20 * NANOS_PER_SECOND } else { 0 };
        // Fields from one of the account's transfers, so that filters select something.
        let mut f = AccountFilter {
            account_id,
            timestamp_min,
            limit: self.rng.random_range(1..=50),
            debits,
            credits,
            reversed: self.rng.random_bool(0.5),
            ..AccountFilter::default()
        };
        let sample = self
            .model
            .transfers
            .values()
            .filter(|t| t.debit_account_id == account_id || t.credit_account_id == account_id)
            .min_by_key(|t| (t.id ^ self.rng.random::<u128>()) % 7);
        if let Some(t) = sample.copied() {
            let mut pick = |p: f64| self.rng.random_bool(p);
            f.user_data_128 = if pick(0.3) { t.user_data_128 } else { 0 };
            f.user_data_64 = if pick(0.2) { t.user_data_64 } else { 0 };
            f.user_data_32 = if pick(0.2) { t.user_data_32 } else { 0 };
            f.code = if pick(0.2) { t.code } else { 0 };
        }
        f
    }

    /// A timestamp to read the change stream from: one of the model's events, or before all.
    pub fn change_start(&mut self) -> u64 {
        let changes = &self.model.changes;
        if changes.is_empty() || self.rng.random_ratio(1, 10) {
            return 0;
        }
        changes[self.rng.random_range(0..changes.len())].timestamp
    }

    /// A random query filter, with fields taken from a known transfer or account.
    pub fn query_filter(&mut self, of_transfers: bool) -> QueryFilter {
        let fields: Option<(u128, u64, u32, u32, u16)> = if of_transfers {
            let count = self.model.transfers.len();
            (count > 0).then(|| {
                let t = self.model.transfers.values().nth(self.rng.random_range(0..count)).unwrap();
                (t.user_data_128, t.user_data_64, t.user_data_32, t.ledger, t.code)
            })
        } else {
            let count = self.model.accounts.len();
            (count > 0).then(|| {
                let a = self.model.accounts.values().nth(self.rng.random_range(0..count)).unwrap();
                (a.user_data_128, a.user_data_64, a.user_data_32, a.ledger, a.code)
            })
        };
        let (u128_, u64_, u32_, ledger, code) = fields.unwrap_or_default();
        let mut pick = |p: f64| self.rng.random_bool(p);
        let (a, b, c, d, e, g) = (pick(0.4), pick(0.3), pick(0.3), pick(0.3), pick(0.3), pick(0.3));
        QueryFilter {
            user_data_128: if a { u128_ } else { 0 },
            user_data_64: if b { u64_ } else { 0 },
            user_data_32: if c { u32_ } else { 0 },
            ledger: if d { ledger } else { 0 },
            code: if e { code } else { 0 },
            timestamp_min: if g { self.clock - 30 * NANOS_PER_SECOND } else { 0 },
            timestamp_max: 0,
            limit: self.rng.random_range(1..=60),
            reversed: self.rng.random_bool(0.5),
        }
    }
}

/// Applies `count` batches of the workload to `ledger`, comparing every reply and every account
/// with the model and checking the invariants after each entry.
pub fn run_audited<S: Store>(ledger: &mut Ledger<S>, workload: &mut Workload, count: usize, seed: u64) {
    let mut timestamp_last = ledger.meta().timestamp_last;
    let mut entry_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xe47);
    let mut batch_index = 0;
    while batch_index < count {
        // Mostly one batch an entry; sometimes several, as group commit makes them.
        let entry_batches = if entry_rng.random_ratio(1, 4) { entry_rng.random_range(2..=4) } else { 1 };
        let (batch, proposed, expected) = workload.next();
        let mut entry = vec![batch];
        let mut expected_replies = vec![expected];
        for _ in 1..entry_batches {
            let (batch, _, expected) = workload.next_at(Some(proposed));
            entry.push(batch);
            expected_replies.push(expected);
        }
        let replies = ledger.apply(&entry, proposed, None).unwrap();
        for ((batch, reply), expected) in entry.iter().zip(&replies).zip(&expected_replies) {
            check_reply(batch, reply, expected, seed, batch_index);
            batch_index += 1;
        }
        // Now and then the ledger idles and its leader proposes a tick: expiries without a write.
        if entry_rng.random_ratio(1, 6) {
            workload.clock += entry_rng.random_range(0..3 * NANOS_PER_SECOND);
            ledger.apply(&[], workload.clock, None).unwrap();
            workload.model.tick(workload.clock);
        }
        let ids = workload.account_ids();
        let accounts = ledger.lookup_accounts(&ids).unwrap();
        let expected: Vec<Account> = ids.iter().map(|id| workload.model.accounts[id]).collect();
        assert_eq!(accounts, expected, "seed {seed}: batch {batch_index}: balances differ from the model's");
        check_invariants(&accounts);
        let meta = ledger.meta();
        // Imported batches that created nothing leave time where it was.
        assert!(meta.timestamp_last >= timestamp_last, "seed {seed}: time went back");
        assert_eq!(
            meta.timestamp_last, workload.model.timestamp_last,
            "seed {seed}: timestamps differ from the model's"
        );
        timestamp_last = meta.timestamp_last;
        if entry_rng.random_ratio(1, 12) && !ids.is_empty() {
            check_queries(ledger, workload, seed, batch_index);
        }
    }
}

fn check_reply(batch: &Batch, reply: &BatchReply, expected: &BatchReply, seed: u64, batch_index: usize) {
    if reply == expected {
        return;
    }
    if let (Batch::CreateTransfers(e), BatchReply::CreateTransfers(r), BatchReply::CreateTransfers(x)) =
        (batch, reply, expected)
    {
        for (i, ((e, r), x)) in e.iter().zip(r).zip(x).enumerate() {
            eprintln!("event {i}: {e:?}\n    got {r:?} model {x:?}");
        }
    } else {
        eprintln!("{batch:?}\n got {reply:?}\n model {expected:?}");
    }
    panic!("seed {seed}: batch {batch_index}: the ledger's reply differs from the model's");
}

fn check_queries<S: Store>(ledger: &Ledger<S>, workload: &mut Workload, seed: u64, batch_index: usize) {
    for of_transfers in [true, false] {
        let filter = workload.query_filter(of_transfers);
        let what = if of_transfers { "transfers" } else { "accounts" };
        let matches = if of_transfers {
            let page = ledger.query_transfers(&filter).unwrap();
            assert_eq!(page.resume, None, "seed {seed}: a workload this small fits the scan budget");
            let expected = workload.model.query_transfers(&filter);
            assert_eq!(
                page.results, expected,
                "seed {seed}: batch {batch_index}: {what} differ for {filter:?}"
            );
            expected.len()
        } else {
            let page = ledger.query_accounts(&filter).unwrap();
            assert_eq!(page.resume, None, "seed {seed}: a workload this small fits the scan budget");
            let expected = workload.model.query_accounts(&filter);
            assert_eq!(
                page.results, expected,
                "seed {seed}: batch {batch_index}: {what} differ for {filter:?}"
            );
            expected.len()
        };
        workload.model.query_results += matches;
    }
    let start = workload.change_start();
    let expected: Vec<ChangeRecord> =
        workload.model.changes.iter().filter(|c| c.timestamp >= start).take(50).copied().collect();
    let events = ledger.changes(start, 50).unwrap();
    let got: Vec<ChangeRecord> = events.iter().map(|event| event.change).collect();
    assert_eq!(got, expected, "seed {seed}: batch {batch_index}: change stream from {start}");
    for event in &events {
        check_change_event(&workload.model, event, seed);
    }
    let filter = workload.filter();
    let transfers = ledger.account_transfers(&filter).unwrap();
    assert_eq!(transfers.resume, None);
    let transfers = transfers.results;
    assert_eq!(
        transfers,
        workload.model.account_transfers(&filter),
        "seed {seed}: batch {batch_index}: account transfers differ for {filter:?}"
    );
    let balances = ledger.account_balances(&filter).unwrap().results;
    let history = workload.model.history.get(&filter.account_id).cloned().unwrap_or_default();
    let mut expected: Vec<AccountBalance> = history
        .into_iter()
        .filter(|b| transfers_side_of(&workload.model, filter.account_id, b.timestamp, &filter))
        .filter(|b| b.timestamp >= filter.timestamp_min)
        .collect();
    if filter.reversed {
        expected.reverse();
    }
    expected.truncate(filter.limit as usize);
    assert_eq!(
        balances, expected,
        "seed {seed}: batch {batch_index}: balances history differs for {filter:?}"
    );
}

/// A change event's records agree with the model: the transfer it names, its accounts, and the
/// balances in its record.
fn check_change_event(model: &Model, event: &ledger::query::ChangeEvent, seed: u64) {
    let change = &event.change;
    let balances = |a: &Account| (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted);
    let recorded =
        |b: &AccountBalance| (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted);
    match change.kind {
        ChangeKind::AccountCreated => {
            let account = model.accounts[&change.id];
            assert_eq!(event.debit_account.id, change.id, "seed {seed}");
            assert_eq!(event.debit_account.timestamp, account.timestamp, "seed {seed}");
            assert_eq!(balances(&event.debit_account), (0, 0, 0, 0), "seed {seed}");
            assert!(event.transfer.is_none() && event.credit_account.is_none(), "seed {seed}");
        }
        kind => {
            let transfer = event.transfer.expect("a transfer event has its transfer");
            assert_eq!(transfer, model.transfers[&change.id], "seed {seed}: {kind:?}");
            if kind != ChangeKind::TwoPhaseExpired {
                assert_eq!(transfer.timestamp, change.timestamp, "seed {seed}");
            }
            let credit = event.credit_account.expect("a transfer event has its credit account");
            assert_eq!(
                (event.debit_account.id, credit.id),
                (transfer.debit_account_id, transfer.credit_account_id)
            );
            assert_eq!(balances(&event.debit_account), recorded(&change.debit), "seed {seed}");
            assert_eq!(balances(&credit), recorded(&change.credit), "seed {seed}");
        }
    }
}

/// The whole change stream, read in pages, is the model's: every event once, in ledger time.
pub fn check_whole_change_stream<S: Store>(ledger: &Ledger<S>, model: &Model, seed: u64) {
    let mut read = Vec::new();
    let mut from = 0;
    loop {
        let page = ledger.changes(from, 777).unwrap();
        let Some(last) = page.last() else { break };
        from = last.change.timestamp + 1;
        read.extend(page.iter().map(|event| event.change));
    }
    assert_eq!(read.len(), model.changes.len(), "seed {seed}: change stream length");
    assert_eq!(read, model.changes, "seed {seed}: the change stream differs from the model's");
}

fn transfers_side_of(model: &Model, account_id: u128, timestamp: u64, filter: &AccountFilter) -> bool {
    model.transfers.values().any(|t| {
        t.timestamp == timestamp
            && ((filter.debits && t.debit_account_id == account_id)
                || (filter.credits && t.credit_account_id == account_id))
            && (filter.user_data_128 == 0 || t.user_data_128 == filter.user_data_128)
            && (filter.user_data_64 == 0 || t.user_data_64 == filter.user_data_64)
            && (filter.user_data_32 == 0 || t.user_data_32 == filter.user_data_32)
            && (filter.code == 0 || t.code == filter.code)
    })
}
