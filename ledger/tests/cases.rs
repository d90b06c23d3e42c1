//! Data-driven cases: every result code and flag combination, each a line or two.

mod common;

use CreateAccountResult as A;
use CreateTransferResult as R;
use common::*;
use ledger::*;
use tally_store::RunStore;

const T0: u64 = 1_000 * NANOS_PER_SECOND;

/// The accounts every transfer case starts with.
fn accounts() -> Vec<Account> {
    vec![
        account(1, 1, 0),
        account(2, 1, 0),
        account(3, 1, AF::DEBITS_MUST_NOT_EXCEED_CREDITS),
        account(4, 1, AF::CREDITS_MUST_NOT_EXCEED_DEBITS),
        account(5, 2, 0),
        account(6, 1, AF::HISTORY),
        account(7, 1, AF::CLOSED),
    ]
}

fn new_ledger() -> Ledger<MemStore> {
    let mut ledger = Ledger::open(MemStore::new()).unwrap();
    let reply = ledger.apply(&[Batch::CreateAccounts(accounts())], T0, None).unwrap();
    let BatchReply::CreateAccounts(results) = &reply[0] else { unreachable!() };
    assert!(results.iter().all(|r| r.result == A::Ok), "{results:?}");
    ledger
}

fn transfers(ledger: &mut Ledger<MemStore>, events: &[Transfer], at: u64) -> Vec<EventResult<R>> {
    let mut reply = ledger.apply(&[Batch::CreateTransfers(events.to_vec())], at, None).unwrap();
    let Some(BatchReply::CreateTransfers(results)) = reply.pop() else { unreachable!() };
    results
}

/// Runs `setup` (which must all succeed), then `batch` `delay_s` seconds later; returns the
/// batch's codes and the ledger.
fn run(setup: &[Transfer], batch: &[Transfer], delay_s: u64) -> (Vec<R>, Ledger<MemStore>) {
    let mut ledger = new_ledger();
    if !setup.is_empty() {
        let results = transfers(&mut ledger, setup, T0 + NANOS_PER_SECOND);
        assert!(results.iter().all(|r| r.result == R::Ok), "setup failed: {results:?}");
    }
    let results = transfers(&mut ledger, batch, T0 + (2 + delay_s) * NANOS_PER_SECOND);
    (results.iter().map(|r| r.result).collect(), ledger)
}

fn check(setup: &[Transfer], batch: &[Transfer], expected: &[R]) {
    let (results, ledger) = run(setup, batch, 0);
    assert_eq!(results, expected, "setup {setup:?}\nbatch {batch:?}");
    check_invariants(&ledger.lookup_accounts(&[1, 2, 3, 4, 5, 6, 7]).unwrap());
}

/// Balances of account `id` as (debits_pending, debits_posted, credits_pending, credits_posted).
fn balances(ledger: &Ledger<MemStore>, id: u128) -> (u128, u128, u128, u128) {
    let a = ledger.lookup_accounts(&[id]).unwrap()[0];
    (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
}

fn t(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    transfer(id, debit, credit, amount)
}

fn with(t: Transfer, edit: impl FnOnce(&mut Transfer)) -> Transfer {
    let mut t = t;
    edit(&mut t);
    t
}

#[test]
fn create_account_codes() {
    let base = account(10, 1, 0);
    let cases: &[(Account, A)] = &[
        (base, A::Ok),
        (Account { timestamp: 1, ..base }, A::TimestampMustBeZero),
        (Account { flags: AccountFlags(1 << 6), ..base }, A::ReservedFlag),
        (Account { flags: AccountFlags(1 << 15), ..base }, A::ReservedFlag),
        (Account { id: 0, ..base }, A::IdMustNotBeZero),
        (Account { id: u128::MAX, ..base }, A::IdMustNotBeIntMax),
        (account(1, 1, 0), A::Exists),
        (account(1, 1, AF::HISTORY), A::ExistsWithDifferentFlags),
        (Account { user_data_128: 1, ..account(1, 1, 0) }, A::ExistsWithDifferentUserData128),
        (Account { user_data_64: 1, ..account(1, 1, 0) }, A::ExistsWithDifferentUserData64),
        (Account { user_data_32: 1, ..account(1, 1, 0) }, A::ExistsWithDifferentUserData32),
        (account(1, 2, 0), A::ExistsWithDifferentLedger),
        (Account { code: 2, ..account(1, 1, 0) }, A::ExistsWithDifferentCode),
        // The exists check comes before field validation: a retry is always answered `exists`.
        (Account { ledger: 0, ..account(1, 1, 0) }, A::ExistsWithDifferentLedger),
        (
            account(10, 1, AF::DEBITS_MUST_NOT_EXCEED_CREDITS | AF::CREDITS_MUST_NOT_EXCEED_DEBITS),
            A::FlagsAreMutuallyExclusive,
        ),
        (Account { debits_pending: 1, ..base }, A::DebitsPendingMustBeZero),
        (Account { debits_posted: 1, ..base }, A::DebitsPostedMustBeZero),
        (Account { credits_pending: 1, ..base }, A::CreditsPendingMustBeZero),
        (Account { credits_posted: 1, ..base }, A::CreditsPostedMustBeZero),
        (Account { ledger: 0, ..base }, A::LedgerMustNotBeZero),
        (Account { code: 0, ..base }, A::CodeMustNotBeZero),
        (account(10, 1, AF::CLOSED | AF::HISTORY), A::Ok),
    ];
    for (event, expected) in cases {
        let mut ledger = new_ledger();
        let reply = ledger.apply(&[Batch::CreateAccounts(vec![*event])], T0 + 1, None).unwrap();
        let BatchReply::CreateAccounts(results) = &reply[0] else { unreachable!() };
        assert_eq!(results[0].result, *expected, "{event:?}");
        let stored = ledger.lookup_accounts(&[event.id]).unwrap();
        if *expected == A::Ok {
            assert_eq!(stored.len(), 1);
            assert_eq!(results[0].timestamp, stored[0].timestamp);
        } else if *expected == A::Exists {
            assert_eq!(results[0].timestamp, T0, "exists answers the original timestamp");
        } else {
            assert_eq!(results[0].timestamp, 0);
        }
    }
}

#[test]
fn create_account_linked_chains() {
    let ok = |id| account(id, 1, AF::LINKED);
    let cases: &[(&[Account], &[A])] = &[
        (&[ok(10), account(11, 1, 0)], &[A::Ok, A::Ok]),
        (&[ok(10), account(11, 0, 0)], &[A::LinkedEventFailed, A::LedgerMustNotBeZero]),
        (&[ok(10), ok(11)], &[A::LinkedEventFailed, A::LinkedEventChainOpen]),
        (&[ok(10)], &[A::LinkedEventChainOpen]),
        (
            &[ok(10), ok(11), account(12, 1, 0), account(10, 1, 0)],
            &[A::Ok, A::Ok, A::Ok, A::ExistsWithDifferentFlags],
        ),
        // A duplicate id inside one chain fails the chain: nothing of it is created.
        (
            &[ok(10), account(10, 1, AF::LINKED), account(12, 1, 0)],
            &[A::LinkedEventFailed, A::Exists, A::LinkedEventFailed],
        ),
    ];
    for (events, expected) in cases {
        let mut ledger = new_ledger();
        let reply = ledger.apply(&[Batch::CreateAccounts(events.to_vec())], T0 + 1, None).unwrap();
        let BatchReply::CreateAccounts(results) = &reply[0] else { unreachable!() };
        let codes: Vec<A> = results.iter().map(|r| r.result).collect();
        assert_eq!(&codes, expected, "{events:?}");
        for (event, code) in events.iter().zip(codes) {
            if code != A::Ok && event.id != 10 {
                assert!(ledger.lookup_accounts(&[event.id]).unwrap().is_empty(), "{event:?} was created");
            }
        }
    }
}

#[test]
fn create_transfer_validation_codes() {
    let base = t(100, 1, 2, 10);
    let pending = flagged(base, TF::PENDING);
    let cases: &[(Transfer, R)] = &[
        (base, R::Ok),
        (with(base, |t| t.amount = 0), R::Ok),
        (with(base, |t| t.timestamp = 1), R::TimestampMustBeZero),
        (flagged(base, 1 << 9), R::ReservedFlag),
        (with(base, |t| t.id = 0), R::IdMustNotBeZero),
        (with(base, |t| t.id = u128::MAX), R::IdMustNotBeIntMax),
        (with(base, |t| t.debit_account_id = 0), R::DebitAccountIdMustNotBeZero),
        (with(base, |t| t.debit_account_id = u128::MAX), R::DebitAccountIdMustNotBeIntMax),
        (with(base, |t| t.credit_account_id = 0), R::CreditAccountIdMustNotBeZero),
        (with(base, |t| t.credit_account_id = u128::MAX), R::CreditAccountIdMustNotBeIntMax),
        (with(base, |t| t.credit_account_id = 1), R::AccountsMustBeDifferent),
        (with(base, |t| t.pending_id = 9), R::PendingIdMustBeZero),
        (with(base, |t| t.timeout = 1), R::TimeoutReservedForPendingTransfer),
        (with(pending, |t| t.timeout = 1), R::Ok),
        (flagged(base, TF::CLOSING_DEBIT), R::ClosingTransferMustBePending),
        (flagged(base, TF::CLOSING_CREDIT), R::ClosingTransferMustBePending),
        (with(base, |t| t.ledger = 0), R::LedgerMustNotBeZero),
        (with(base, |t| t.code = 0), R::CodeMustNotBeZero),
        (with(base, |t| t.debit_account_id = 99), R::DebitAccountNotFound),
        (with(base, |t| t.credit_account_id = 99), R::CreditAccountNotFound),
        (with(base, |t| t.credit_account_id = 5), R::AccountsMustHaveTheSameLedger),
        (with(base, |t| t.ledger = 2), R::TransferMustHaveTheSameLedgerAsAccounts),
        (with(base, |t| t.debit_account_id = 7), R::DebitAccountAlreadyClosed),
        (with(base, |t| t.credit_account_id = 7), R::CreditAccountAlreadyClosed),
        (with(base, |t| t.debit_account_id = 3), R::ExceedsCredits),
        (with(base, |t| t.credit_account_id = 4), R::ExceedsDebits),
        (with(pending, |t| t.debit_account_id = 3), R::ExceedsCredits),
        (with(base, |t| (t.debit_account_id, t.credit_account_id) = (4, 3)), R::Ok),
        (with(base, |t| (t.debit_account_id, t.amount) = (3, 0)), R::Ok),
        (with(pending, |t| t.timeout = u32::MAX), R::Ok),
        // A pending transfer may combine with balancing.
        (flagged(base, TF::PENDING | TF::BALANCING_DEBIT), R::Ok),
    ];
    for (event, expected) in cases {
        check(&[], &[*event], &[*expected]);
    }
}

#[test]
fn overflow_codes() {
    let max = u128::MAX;
    let cases: &[(&[Transfer], Transfer, R)] = &[
        (&[t(50, 1, 2, max)], t(100, 1, 2, 1), R::OverflowsDebitsPosted),
        (&[t(50, 6, 2, max)], t(100, 1, 2, 1), R::OverflowsCreditsPosted),
        (
            &[flagged(t(50, 1, 2, max), TF::PENDING)],
            flagged(t(100, 1, 6, 1), TF::PENDING),
            R::OverflowsDebitsPending,
        ),
        (
            &[flagged(t(50, 6, 2, max), TF::PENDING)],
            flagged(t(100, 1, 2, 1), TF::PENDING),
            R::OverflowsCreditsPending,
        ),
        (&[flagged(t(50, 1, 2, max), TF::PENDING)], t(100, 1, 6, 1), R::OverflowsDebits),
        (&[flagged(t(50, 6, 2, max), TF::PENDING)], t(100, 1, 2, 1), R::OverflowsCredits),
        (&[flagged(t(50, 1, 2, max - 1), TF::PENDING)], t(100, 1, 6, 1), R::Ok),
    ];
    for (setup, event, expected) in cases {
        check(setup, &[*event], &[*expected]);
    }
    // timeout seconds past the end of u64 nanoseconds.
    let mut ledger = new_ledger();
    let late = u64::MAX - 10 * NANOS_PER_SECOND;
    let results =
        transfers(&mut ledger, &[with(flagged(t(100, 1, 2, 1), TF::PENDING), |t| t.timeout = 11)], late);
    assert_eq!(results[0].result, R::OverflowsTimeout);
}

#[test]
fn exists_codes() {
    let original = with(t(50, 1, 2, 10), |t| {
        t.user_data_128 = 7;
        t.user_data_64 = 8;
        t.user_data_32 = 9;
    });
    let cases: &[(Transfer, R)] = &[
        (original, R::Exists),
        (flagged(original, TF::PENDING), R::ExistsWithDifferentFlags),
        (with(original, |t| t.pending_id = 1), R::ExistsWithDifferentPendingId),
        (with(original, |t| t.timeout = 1), R::ExistsWithDifferentTimeout),
        (with(original, |t| t.debit_account_id = 6), R::ExistsWithDifferentDebitAccountId),
        (with(original, |t| t.credit_account_id = 6), R::ExistsWithDifferentCreditAccountId),
        (with(original, |t| t.amount = 11), R::ExistsWithDifferentAmount),
        (with(original, |t| t.user_data_128 = 0), R::ExistsWithDifferentUserData128),
        (with(original, |t| t.user_data_64 = 0), R::ExistsWithDifferentUserData64),
        (with(original, |t| t.user_data_32 = 0), R::ExistsWithDifferentUserData32),
        (with(original, |t| t.ledger = 2), R::ExistsWithDifferentLedger),
        (with(original, |t| t.code = 2), R::ExistsWithDifferentCode),
        // Exists is answered before anything that depends on accounts or balances.
        (with(original, |t| t.ledger = 0), R::ExistsWithDifferentLedger),
    ];
    for (event, expected) in cases {
        check(&[original], &[*event], &[*expected]);
    }
    // The retry answers the original timestamp, and moves nothing.
    let (_, mut ledger) = run(&[original], &[], 0);
    let before = balances(&ledger, 1);
    let results = transfers(&mut ledger, &[original, original], T0 + 9 * NANOS_PER_SECOND);
    assert_eq!(results[0].result, R::Exists);
    assert_eq!(results[0].timestamp, ledger.lookup_transfers(&[50]).unwrap()[0].timestamp);
    assert_eq!(balances(&ledger, 1), before);
    // A duplicate id in one batch: the second answers `exists`; money moves once.
    let (codes, ledger) = run(&[], &[t(60, 1, 2, 5), t(60, 1, 2, 5), with(t(60, 1, 2, 6), |_| ())], 0);
    assert_eq!(codes, [R::Ok, R::Exists, R::ExistsWithDifferentAmount]);
    assert_eq!(balances(&ledger, 1), (0, 5, 0, 0));
}

#[test]
fn balancing_transfers() {
    // Account 3 may not go below zero: it holds 30 of credits.
    let fund = t(50, 1, 3, 30);
    let cases: &[(Transfer, R, u128)] = &[
        (flagged(t(100, 3, 2, 100), TF::BALANCING_DEBIT), R::Ok, 30),
        (flagged(t(100, 3, 2, 20), TF::BALANCING_DEBIT), R::Ok, 20),
        (flagged(t(100, 3, 2, u128::MAX), TF::BALANCING_DEBIT), R::Ok, 30),
        (flagged(t(100, 2, 4, 100), TF::BALANCING_CREDIT), R::Ok, 0),
        (flagged(t(100, 3, 4, 100), TF::BALANCING_DEBIT | TF::BALANCING_CREDIT), R::Ok, 0),
        (flagged(t(100, 3, 2, 100), TF::BALANCING_DEBIT | TF::PENDING), R::Ok, 30),
    ];
    for (event, expected, amount) in cases {
        let (codes, ledger) = run(&[fund], &[*event], 0);
        assert_eq!(codes, [*expected], "{event:?}");
        assert_eq!(ledger.lookup_transfers(&[100]).unwrap()[0].amount, *amount, "{event:?}");
        check_invariants(&ledger.lookup_accounts(&[1, 2, 3, 4]).unwrap());
    }
    // A retry of a balancing transfer with the original (unclamped) amount is `exists`.
    let balancing = flagged(t(100, 3, 2, 100), TF::BALANCING_DEBIT);
    check(&[fund, balancing], &[balancing], &[R::Exists]);
    check(&[fund, balancing], &[with(balancing, |t| t.amount = 29)], &[R::ExistsWithDifferentAmount]);
}

#[test]
fn pending_post_void_codes() {
    let p = with(flagged(t(50, 1, 2, 100), TF::PENDING), |t| t.user_data_64 = 5);
    let post = |amount| settle(100, 50, TF::POST_PENDING_TRANSFER, amount);
    let void = |amount| settle(100, 50, TF::VOID_PENDING_TRANSFER, amount);
    let cases: &[(Transfer, R)] = &[
        (post(u128::MAX), R::Ok),
        (post(100), R::Ok),
        (post(40), R::Ok),
        (post(0), R::Ok),
        (post(101), R::ExceedsPendingTransferAmount),
        (void(0), R::Ok),
        (void(100), R::Ok),
        (void(40), R::PendingTransferHasDifferentAmount),
        (void(101), R::ExceedsPendingTransferAmount),
        (
            flagged(post(0), TF::POST_PENDING_TRANSFER | TF::VOID_PENDING_TRANSFER),
            R::FlagsAreMutuallyExclusive,
        ),
        (flagged(post(0), TF::POST_PENDING_TRANSFER | TF::PENDING), R::FlagsAreMutuallyExclusive),
        (flagged(post(0), TF::POST_PENDING_TRANSFER | TF::BALANCING_DEBIT), R::FlagsAreMutuallyExclusive),
        (flagged(post(0), TF::VOID_PENDING_TRANSFER | TF::BALANCING_CREDIT), R::FlagsAreMutuallyExclusive),
        (flagged(post(0), TF::VOID_PENDING_TRANSFER | TF::CLOSING_DEBIT), R::FlagsAreMutuallyExclusive),
        (flagged(post(0), TF::POST_PENDING_TRANSFER | TF::CLOSING_CREDIT), R::FlagsAreMutuallyExclusive),
        (with(post(0), |t| t.pending_id = 0), R::PendingIdMustNotBeZero),
        (with(post(0), |t| t.pending_id = u128::MAX), R::PendingIdMustNotBeIntMax),
        (with(post(0), |t| t.pending_id = 100), R::PendingIdMustBeDifferent),
        (with(post(0), |t| t.timeout = 1), R::TimeoutReservedForPendingTransfer),
        (with(post(0), |t| t.pending_id = 99), R::PendingTransferNotFound),
        (with(post(0), |t| t.pending_id = 51), R::PendingTransferNotPending),
        (with(post(0), |t| t.debit_account_id = 6), R::PendingTransferHasDifferentDebitAccountId),
        (with(post(0), |t| t.credit_account_id = 6), R::PendingTransferHasDifferentCreditAccountId),
        (with(post(0), |t| t.ledger = 2), R::PendingTransferHasDifferentLedger),
        (with(post(0), |t| t.code = 2), R::PendingTransferHasDifferentCode),
        (
            with(post(0), |t| (t.debit_account_id, t.credit_account_id, t.ledger, t.code) = (1, 2, 1, 1)),
            R::Ok,
        ),
    ];
    for (event, expected) in cases {
        check(&[p, t(51, 1, 2, 1)], &[*event], &[*expected]);
    }
}

#[test]
fn pending_lifecycle_balances() {
    let p = with(flagged(t(50, 1, 2, 100), TF::PENDING), |t| t.user_data_64 = 5);
    let (_, ledger) = run(&[p], &[], 0);
    assert_eq!(balances(&ledger, 1), (100, 0, 0, 0));
    assert_eq!(balances(&ledger, 2), (0, 0, 100, 0));

    let (codes, ledger) = run(&[p], &[settle(100, 50, TF::POST_PENDING_TRANSFER, 40)], 0);
    assert_eq!(codes, [R::Ok]);
    assert_eq!(balances(&ledger, 1), (0, 40, 0, 0), "a partial post releases the rest");
    assert_eq!(balances(&ledger, 2), (0, 0, 0, 40));
    let posted = ledger.lookup_transfers(&[100]).unwrap()[0];
    assert_eq!(
        (posted.debit_account_id, posted.credit_account_id, posted.user_data_64),
        (1, 2, 5),
        "inherited"
    );
    assert_eq!((posted.ledger, posted.code, posted.amount, posted.pending_id), (1, 1, 40, 50));

    let (_, ledger) = run(&[p], &[settle(100, 50, TF::VOID_PENDING_TRANSFER, 0)], 0);
    assert_eq!(balances(&ledger, 1), (0, 0, 0, 0));
    assert_eq!(ledger.lookup_transfers(&[100]).unwrap()[0].amount, 100);

    // Settling twice, or settling a settled transfer.
    let posted = settle(100, 50, TF::POST_PENDING_TRANSFER, u128::MAX);
    let voided = settle(101, 50, TF::VOID_PENDING_TRANSFER, 0);
    check(&[p, posted], &[settle(102, 50, TF::POST_PENDING_TRANSFER, 1)], &[R::PendingTransferAlreadyPosted]);
    check(&[p, voided], &[settle(102, 50, TF::POST_PENDING_TRANSFER, 1)], &[R::PendingTransferAlreadyVoided]);
    check(&[p, posted], &[posted], &[R::Exists]);
    check(&[p, posted], &[settle(100, 50, TF::POST_PENDING_TRANSFER, 100)], &[R::Exists]);
    check(&[p, posted], &[settle(100, 50, TF::POST_PENDING_TRANSFER, 99)], &[R::ExistsWithDifferentAmount]);
    check(&[p, posted], &[with(posted, |t| t.user_data_64 = 5)], &[R::Exists]);
    check(&[p, posted], &[with(posted, |t| t.user_data_64 = 6)], &[R::ExistsWithDifferentUserData64]);
    check(&[p, posted], &[with(posted, |t| t.debit_account_id = 6)], &[R::ExistsWithDifferentDebitAccountId]);
    check(&[p, voided], &[settle(101, 50, TF::VOID_PENDING_TRANSFER, 100)], &[R::Exists]);
}

#[test]
fn pending_expiry() {
    let p = with(flagged(t(50, 1, 2, 100), TF::PENDING), |t| t.timeout = 2);
    let post = settle(100, 50, TF::POST_PENDING_TRANSFER, u128::MAX);
    // Setup runs at T0+1s, so the transfer expires at T0+3s; the batch runs at T0+(2+delay)s.
    let (codes, _) = run(&[p], &[post], 0);
    assert_eq!(codes, [R::Ok], "before expiry");
    let (codes, ledger) = run(&[p], &[post], 1);
    assert_eq!(codes, [R::PendingTransferExpired], "exactly at expiry");
    assert_eq!(balances(&ledger, 1), (0, 0, 0, 0), "expiry released the reservation");
    let (codes, _) = run(&[p], &[settle(100, 50, TF::VOID_PENDING_TRANSFER, 0)], 5);
    assert_eq!(codes, [R::PendingTransferExpired]);
    // A pending transfer without a timeout never expires.
    let (codes, _) = run(&[with(p, |t| t.timeout = 0)], &[post], 1_000_000);
    assert_eq!(codes, [R::Ok]);
    // Expiry within one batch: events later in the batch than the expiry time see it expired,
    // even though the reservation is released only by the next batch.
    let mut ledger = new_ledger();
    transfers(&mut ledger, &[p], T0 + NANOS_PER_SECOND);
    let expiry = T0 + 3 * NANOS_PER_SECOND;
    let results = transfers(&mut ledger, &[t(60, 1, 2, 1), t(61, 1, 2, 1), post], expiry - 2);
    assert_eq!(results[2].result, R::PendingTransferExpired);
    assert_eq!(balances(&ledger, 1), (100, 2, 0, 0));
    transfers(&mut ledger, &[t(62, 1, 2, 1)], expiry);
    assert_eq!(balances(&ledger, 1), (0, 3, 0, 0));
}

/// An idle ledger expires reservations on a tick (an entry of time alone, which the leader
/// proposes when the earliest timeout falls due). One row per tick time: whether the pending
/// transfer is expired after it, and where ledger time stands.
#[test]
fn a_tick_expires_without_a_write() {
    let p = with(flagged(t(50, 1, 2, 100), TF::PENDING), |t| t.timeout = 2);
    let created = T0 + NANOS_PER_SECOND;
    let expiry = created + 2 * NANOS_PER_SECOND;
    for (tick_at, expired, timestamp_last) in [
        (expiry - 1, false, created),
        (expiry, true, expiry),
        (expiry + 7, true, expiry + 7),
        // A tick from a leader whose clock is behind still moves time forwards only.
        (created - 5 * NANOS_PER_SECOND, false, created),
    ] {
        let mut ledger = new_ledger();
        transfers(&mut ledger, &[p], created);
        let digest = ledger.meta().digest;
        assert!(ledger.apply(&[], tick_at, None).unwrap().is_empty());
        let expected = if expired { (0, 0, 0, 0) } else { (100, 0, 0, 0) };
        assert_eq!(balances(&ledger, 1), expected, "tick at {tick_at}");
        assert_eq!(ledger.meta().timestamp_last, timestamp_last, "tick at {tick_at}");
        assert_eq!(ledger.next_expiry().unwrap(), (!expired).then_some(expiry), "tick at {tick_at}");
        assert_ne!(ledger.meta().digest, digest, "a tick is in the ledger's history");
        let post = settle(100, 50, TF::POST_PENDING_TRANSFER, u128::MAX);
        let results = transfers(&mut ledger, &[post], created + NANOS_PER_SECOND);
        let code = if expired { R::PendingTransferExpired } else { R::Ok };
        assert_eq!(results[0].result, code, "tick at {tick_at}");
        assert!(results[0].timestamp == 0 || results[0].timestamp > timestamp_last);
    }
    // Raft's own entries (no batches, no time) change nothing, the digest included.
    let mut ledger = new_ledger();
    transfers(&mut ledger, &[p], created);
    let meta = ledger.meta();
    ledger.apply(&[], 0, None).unwrap();
    assert_eq!(ledger.meta(), meta);
}

#[test]
fn closing_transfers() {
    let close_debit = flagged(t(50, 1, 2, 0), TF::PENDING | TF::CLOSING_DEBIT);
    let close_credit = flagged(t(50, 1, 2, 0), TF::PENDING | TF::CLOSING_CREDIT);
    check(&[close_debit], &[t(100, 1, 2, 1)], &[R::DebitAccountAlreadyClosed]);
    check(&[close_debit], &[t(100, 2, 1, 1)], &[R::CreditAccountAlreadyClosed]);
    check(&[close_credit], &[t(100, 1, 2, 1)], &[R::CreditAccountAlreadyClosed]);
    check(&[close_credit], &[t(100, 1, 6, 1)], &[R::Ok]);
    // Voiding the closing transfer reopens; posting it is refused (the account is closed).
    check(&[close_debit], &[settle(100, 50, TF::VOID_PENDING_TRANSFER, 0), t(101, 1, 2, 1)], &[R::Ok, R::Ok]);
    check(&[close_debit], &[settle(100, 50, TF::POST_PENDING_TRANSFER, 0)], &[R::DebitAccountAlreadyClosed]);
    check(
        &[close_credit],
        &[settle(100, 50, TF::POST_PENDING_TRANSFER, 0)],
        &[R::CreditAccountAlreadyClosed],
    );
    // Other pending transfers of a closed account can be voided but not posted.
    let other = flagged(t(49, 1, 6, 5), TF::PENDING);
    check(&[other, close_debit], &[settle(100, 49, TF::VOID_PENDING_TRANSFER, 0)], &[R::Ok]);
    check(
        &[other, close_debit],
        &[settle(100, 49, TF::POST_PENDING_TRANSFER, 5)],
        &[R::DebitAccountAlreadyClosed],
    );
    // Expiry of a closing transfer reopens the account.
    let mut ledger = new_ledger();
    transfers(&mut ledger, &[with(close_debit, |t| t.timeout = 1)], T0 + NANOS_PER_SECOND);
    assert!(ledger.lookup_accounts(&[1]).unwrap()[0].flags.contains(AF::CLOSED));
    let results = transfers(&mut ledger, &[t(100, 1, 2, 1)], T0 + 2 * NANOS_PER_SECOND);
    assert_eq!(results[0].result, R::Ok);
    assert!(!ledger.lookup_accounts(&[1]).unwrap()[0].flags.contains(AF::CLOSED));
}

#[test]
fn transfer_linked_chains() {
    let l = |t: Transfer| flagged(t, t.flags.0 | TF::LINKED);
    let cases: &[(&[Transfer], &[R])] = &[
        (&[l(t(100, 1, 2, 5)), t(101, 2, 1, 3)], &[R::Ok, R::Ok]),
        (&[l(t(100, 1, 2, 5)), t(101, 3, 1, 3)], &[R::LinkedEventFailed, R::ExceedsCredits]),
        (&[l(t(100, 3, 1, 3)), t(101, 1, 2, 5)], &[R::ExceedsCredits, R::LinkedEventFailed]),
        (&[l(t(100, 1, 2, 5)), l(t(101, 1, 2, 5))], &[R::LinkedEventFailed, R::LinkedEventChainOpen]),
        (&[l(t(100, 1, 2, 5))], &[R::LinkedEventChainOpen]),
        (
            &[t(99, 1, 2, 1), l(t(100, 1, 3, 5)), l(t(101, 3, 2, 5)), t(102, 3, 2, 1), t(103, 1, 2, 1)],
            &[R::Ok, R::LinkedEventFailed, R::LinkedEventFailed, R::ExceedsCredits, R::Ok],
        ),
        // A chain may fund an account and spend from it; a later failure undoes both.
        (&[l(t(100, 1, 3, 5)), t(101, 3, 2, 5)], &[R::Ok, R::Ok]),
        (
            &[l(t(100, 1, 3, 5)), l(t(101, 3, 2, 5)), t(102, 1, 1, 1)],
            &[R::LinkedEventFailed, R::LinkedEventFailed, R::AccountsMustBeDifferent],
        ),
        // A chain that creates a pending transfer and posts it.
        (
            &[
                l(flagged(t(100, 1, 2, 5), TF::PENDING)),
                settle(101, 100, TF::POST_PENDING_TRANSFER, u128::MAX),
            ],
            &[R::Ok, R::Ok],
        ),
        (
            &[
                l(flagged(t(100, 1, 2, 5), TF::PENDING)),
                l(settle(101, 100, TF::POST_PENDING_TRANSFER, u128::MAX)),
                t(102, 0, 2, 1),
            ],
            &[R::LinkedEventFailed, R::LinkedEventFailed, R::DebitAccountIdMustNotBeZero],
        ),
        // A retried chain: the first event exists, which fails the rest of it (nothing new).
        (
            &[l(t(100, 1, 2, 5)), t(101, 2, 1, 3), l(t(100, 1, 2, 5)), t(101, 2, 1, 3)],
            &[R::Ok, R::Ok, R::Exists, R::LinkedEventFailed],
        ),
    ];
    for (events, expected) in cases {
        let (codes, ledger) = run(&[], events, 0);
        assert_eq!(&codes, expected, "{events:?}");
        let mut expected_balances = std::collections::BTreeMap::new();
        for (event, code) in events.iter().zip(codes.iter()) {
            if *code == R::Ok && !event.is_post_or_void() && !event.flags.contains(TF::PENDING) {
                *expected_balances.entry(event.debit_account_id).or_insert(0i128) -= event.amount as i128;
                *expected_balances.entry(event.credit_account_id).or_insert(0i128) += event.amount as i128;
            }
            if *code != R::Ok && *code != R::Exists {
                assert!(ledger.lookup_transfers(&[event.id]).unwrap().iter().all(|t| t.timestamp != 0));
            }
        }
        for id in 1..=3u128 {
            let a = ledger.lookup_accounts(&[id]).unwrap()[0];
            let net = a.credits_posted as i128 - a.debits_posted as i128;
            let pending_post = events.iter().any(|e| e.is_post_or_void());
            if !pending_post {
                assert_eq!(
                    net,
                    expected_balances.get(&id).copied().unwrap_or(0),
                    "account {id} after {events:?}"
                );
            }
            assert_eq!((a.debits_pending, a.credits_pending), (0, 0), "chain left a reservation: {events:?}");
        }
    }
}

#[test]
fn timestamps_strictly_increase_even_when_proposed_time_goes_back() {
    let mut ledger = new_ledger();
    let first = transfers(&mut ledger, &[t(100, 1, 2, 1), t(101, 1, 2, 1)], T0 + 10);
    let second = transfers(&mut ledger, &[t(102, 1, 2, 1)], T0 - 5);
    assert_eq!(first[0].timestamp, T0 + 10);
    assert_eq!(first[1].timestamp, T0 + 11);
    assert_eq!(second[0].timestamp, T0 + 12, "a slow leader clock cannot run time backwards");
    // Rejected events get no timestamp but still use up their slot.
    let third = transfers(&mut ledger, &[t(0, 1, 2, 1), t(103, 1, 2, 1)], T0);
    assert_eq!((third[0].timestamp, third[1].timestamp), (0, T0 + 14));
}

#[test]
fn history_queries() {
    let events = [t(100, 6, 1, 10), t(101, 1, 6, 3), t(102, 6, 2, 4), flagged(t(103, 2, 6, 7), TF::PENDING)];
    let (codes, ledger) = run(&[], &events, 0);
    assert!(codes.iter().all(|c| *c == R::Ok));
    let filter =
        AccountFilter { account_id: 6, limit: 10, debits: true, credits: true, ..AccountFilter::default() };
    let ids = |f: &AccountFilter| -> Vec<u128> {
        ledger.account_transfers(f).unwrap().results.iter().map(|t| t.id).collect()
    };
    assert_eq!(ids(&filter), [100, 101, 102, 103]);
    assert_eq!(ids(&AccountFilter { credits: false, ..filter }), [100, 102]);
    assert_eq!(ids(&AccountFilter { debits: false, ..filter }), [101, 103]);
    assert_eq!(ids(&AccountFilter { reversed: true, limit: 2, ..filter }), [103, 102]);
    // Paging by moving the timestamp bound.
    let page = ledger.account_transfers(&AccountFilter { limit: 2, ..filter }).unwrap().results;
    let next = AccountFilter { timestamp_min: page[1].timestamp + 1, limit: 2, ..filter };
    assert_eq!(ids(&next), [102, 103]);
    let window =
        AccountFilter { timestamp_min: page[1].timestamp, timestamp_max: page[1].timestamp, ..filter };
    assert_eq!(ids(&window), [101], "bounds are inclusive");

    let balances = ledger.account_balances(&filter).unwrap().results;
    let debits_posted: Vec<u128> = balances.iter().map(|b| b.debits_posted).collect();
    let credits_pending: Vec<u128> = balances.iter().map(|b| b.credits_pending).collect();
    assert_eq!(debits_posted, [10, 10, 14, 14]);
    assert_eq!(credits_pending, [0, 0, 0, 7]);
    assert_eq!(balances[0].timestamp, page[0].timestamp);
    let without_history = AccountFilter { account_id: 1, ..filter };
    assert!(ledger.account_balances(&without_history).unwrap().results.is_empty());

    let invalid = [
        (AccountFilter { account_id: 0, ..filter }, FilterError::AccountIdInvalid),
        (AccountFilter { limit: 0, ..filter }, FilterError::LimitInvalid),
        (AccountFilter { limit: 8190, ..filter }, FilterError::LimitInvalid),
        (AccountFilter { debits: false, credits: false, ..filter }, FilterError::NoSideSelected),
        (AccountFilter { timestamp_min: 5, timestamp_max: 4, ..filter }, FilterError::TimestampRangeInvalid),
        (AccountFilter { timestamp_min: (1 << 63) + 1, ..filter }, FilterError::TimestampMinInvalid),
        (AccountFilter { timestamp_max: (1 << 63) + 1, ..filter }, FilterError::TimestampMaxInvalid),
        // The first rule broken is the one named.
        (AccountFilter { account_id: 0, limit: 0, ..filter }, FilterError::AccountIdInvalid),
        (
            AccountFilter { timestamp_min: 5, timestamp_max: 4, limit: 0, ..filter },
            FilterError::TimestampRangeInvalid,
        ),
    ];
    for (filter, expected) in invalid {
        match ledger.account_transfers(&filter) {
            Err(ledger::query::QueryError::Filter(error)) => assert_eq!(error, expected),
            other => panic!("{filter:?} gave {other:?}"),
        }
    }
    // Lookups leave out ids that do not exist, and keep the order asked.
    let found: Vec<u128> = ledger.lookup_transfers(&[103, 999, 100]).unwrap().iter().map(|t| t.id).collect();
    assert_eq!(found, [103, 100]);
}

#[test]
fn several_batches_in_one_entry_commit_together() {
    let mut ledger = new_ledger();
    let batches = [
        Batch::CreateTransfers(vec![flagged(t(100, 1, 2, 5), TF::PENDING)]),
        Batch::CreateTransfers(vec![settle(101, 100, TF::POST_PENDING_TRANSFER, u128::MAX)]),
        Batch::CreateAccounts(vec![account(20, 1, 0)]),
    ];
    let replies = ledger.apply(&batches, T0 + 5, Some(b"applied 7")).unwrap();
    assert_eq!(replies.len(), 3);
    assert_eq!(balances(&ledger, 1), (0, 5, 0, 0));
    assert_eq!(ledger.meta().batches_applied, 4);
    assert_eq!(ledger.store().meta_raw(ledger::codec::META_APP_KEY).unwrap().unwrap(), b"applied 7");
}

/// What a row of `a_failed_id_stays_failed` says: what it checks, the refused transfer, what
/// happens in between, the retry, and the two codes.
type FailedIdRow<'a> = (&'a str, Transfer, &'a [Transfer], Transfer, R, R);

/// A transfer refused for a transient reason stays refused: retried after the state changed so
/// that it would now succeed, it gets `IdAlreadyFailed`, whether in a later batch or the same
/// one, alone or in a chain. One row per reason: the refused transfer, what changes the state in
/// between, the retry (the same id, possibly otherwise different), and the retry's code.
#[test]
fn a_failed_id_stays_failed() {
    let base = t(100, 1, 2, 10);
    let fund_3 = t(900, 1, 3, 50);
    let credit_4 = t(901, 4, 1, 0);
    let rows: &[FailedIdRow] = &[
        (
            "debit account missing",
            with(base, |t| t.debit_account_id = 8),
            &[],
            base,
            R::DebitAccountNotFound,
            R::IdAlreadyFailed,
        ),
        (
            "credit account missing",
            with(base, |t| t.credit_account_id = 8),
            &[],
            base,
            R::CreditAccountNotFound,
            R::IdAlreadyFailed,
        ),
        (
            "exceeds credits, then funded",
            with(base, |t| t.debit_account_id = 3),
            &[fund_3],
            with(base, |t| t.debit_account_id = 3),
            R::ExceedsCredits,
            R::IdAlreadyFailed,
        ),
        (
            "exceeds debits",
            with(base, |t| t.credit_account_id = 4),
            &[credit_4],
            base,
            R::ExceedsDebits,
            R::IdAlreadyFailed,
        ),
        (
            "debit account closed",
            with(base, |t| t.debit_account_id = 7),
            &[],
            base,
            R::DebitAccountAlreadyClosed,
            R::IdAlreadyFailed,
        ),
        (
            "credit account closed",
            with(base, |t| t.credit_account_id = 7),
            &[],
            base,
            R::CreditAccountAlreadyClosed,
            R::IdAlreadyFailed,
        ),
        (
            "pending transfer missing",
            settle(100, 555, TF::POST_PENDING_TRANSFER, 0),
            &[flagged(t(555, 1, 2, 5), TF::PENDING)],
            settle(100, 555, TF::POST_PENDING_TRANSFER, 0),
            R::PendingTransferNotFound,
            R::IdAlreadyFailed,
        ),
        // Not transient: the same id may be sent again, corrected.
        ("ledger zero", with(base, |t| t.ledger = 0), &[], base, R::LedgerMustNotBeZero, R::Ok),
        (
            "different ledgers",
            with(base, |t| t.credit_account_id = 5),
            &[],
            base,
            R::AccountsMustHaveTheSameLedger,
            R::Ok,
        ),
        ("reserved flag", flagged(base, 1 << 9), &[], base, R::ReservedFlag, R::Ok),
    ];
    for (what, refused, between, retry, first, then) in rows {
        let (results, mut ledger) = run(&[], &[*refused], 0);
        assert_eq!(results, [*first], "{what}: the first attempt");
        if !between.is_empty() {
            let done = transfers(&mut ledger, between, T0 + 3 * NANOS_PER_SECOND);
            assert!(done.iter().all(|r| r.result == R::Ok), "{what}: {done:?}");
        }
        let again = transfers(&mut ledger, &[*retry], T0 + 4 * NANOS_PER_SECOND);
        assert_eq!(again[0].result, *then, "{what}: the retry");
        assert_eq!(again[0].timestamp == 0, *then != R::Ok, "{what}");
    }

    // In one batch: the second event with the id is refused as already failed; in a chain, the
    // failed event's id is remembered though the chain is undone, the others' ids are not.
    let l = |t: Transfer| flagged(t, t.flags.0 | TF::LINKED);
    let cases: &[(&[Transfer], &[R])] = &[
        (&[t(100, 3, 1, 5), t(100, 1, 2, 5)], &[R::ExceedsCredits, R::IdAlreadyFailed]),
        (
            &[l(t(100, 1, 2, 5)), t(101, 3, 1, 5), t(100, 1, 2, 5), t(101, 1, 2, 5)],
            &[R::LinkedEventFailed, R::ExceedsCredits, R::Ok, R::IdAlreadyFailed],
        ),
    ];
    for (batch, expected) in cases {
        check(&[], batch, expected);
    }
}

/// Imported events (history from another system): one row per batch, proposed at `P`, on the
/// accounts of `new_ledger` (created at T0 and just after), with the codes expected in
/// precedence order.
#[test]
fn imported_events() {
    const P: u64 = T0 + 10 * NANOS_PER_SECOND;
    let at = |seconds: u64| T0 + seconds * NANOS_PER_SECOND;
    let imp = |id: u128, timestamp: u64| Transfer { timestamp, ..flagged(t(id, 1, 2, 10), TF::IMPORTED) };
    let l = |t: Transfer| flagged(t, t.flags.0 | TF::LINKED);
    let pending = |t: Transfer| flagged(t, t.flags.0 | TF::PENDING);
    let post = Transfer { timestamp: at(3), ..settle(101, 100, TF::POST_PENDING_TRANSFER | TF::IMPORTED, 4) };
    let rows: &[(&str, &[Transfer], &[R])] = &[
        ("one", &[imp(100, at(1))], &[R::Ok]),
        ("in order", &[imp(100, at(1)), imp(101, at(2))], &[R::Ok, R::Ok]),
        (
            "out of order",
            &[imp(100, at(2)), imp(101, at(1))],
            &[R::Ok, R::ImportedEventTimestampMustNotRegress],
        ),
        (
            "the same time twice",
            &[imp(100, at(1)), imp(101, at(1))],
            &[R::Ok, R::ImportedEventTimestampMustNotRegress],
        ),
        ("mixed, imported first", &[imp(100, at(1)), t(101, 1, 2, 1)], &[R::Ok, R::ImportedEventExpected]),
        (
            "mixed, imported second",
            &[t(100, 1, 2, 1), imp(101, at(1))],
            &[R::Ok, R::ImportedEventNotExpected],
        ),
        ("no timestamp", &[imp(100, 0)], &[R::ImportedEventTimestampOutOfRange]),
        ("timestamp 2^63", &[imp(100, 1 << 63)], &[R::ImportedEventTimestampOutOfRange]),
        ("in the future", &[imp(100, P + 1)], &[R::ImportedEventTimestampMustNotAdvance]),
        ("exactly now", &[imp(100, P)], &[R::Ok]),
        ("before the ledger's last event", &[imp(100, T0 + 3)], &[R::ImportedEventTimestampMustNotRegress]),
        // Out of range ranks above a reserved flag; the flag above everything after it.
        (
            "range before flags",
            &[flagged(imp(100, 0), TF::IMPORTED | 1 << 9)],
            &[R::ImportedEventTimestampOutOfRange],
        ),
        ("then flags", &[flagged(imp(100, at(1)), TF::IMPORTED | 1 << 9)], &[R::ReservedFlag]),
        (
            "ledger checks before time",
            &[Transfer { ledger: 2, ..imp(100, T0 + 3) }],
            &[R::TransferMustHaveTheSameLedgerAsAccounts],
        ),
        (
            "time before closed",
            &[Transfer { debit_account_id: 7, ..imp(100, T0 + 3) }],
            &[R::ImportedEventTimestampMustNotRegress],
        ),
        ("closed", &[Transfer { debit_account_id: 7, ..imp(100, at(1)) }], &[R::DebitAccountAlreadyClosed]),
        (
            "pending with a timeout",
            &[Transfer { timeout: 1, ..pending(imp(100, at(1))) }],
            &[R::ImportedEventTimeoutMustBeZero],
        ),
        ("pending, then posted", &[pending(imp(100, at(1))), post], &[R::Ok, R::Ok]),
        (
            "a post before its pending",
            &[pending(imp(100, at(4))), post],
            &[R::Ok, R::ImportedEventTimestampMustNotRegress],
        ),
        // A chain undone gives its time back: the next event may use it.
        (
            "chain",
            &[l(imp(100, at(1))), imp(101, at(1)), imp(102, at(1))],
            &[R::LinkedEventFailed, R::ImportedEventTimestampMustNotRegress, R::Ok],
        ),
    ];
    for (what, batch, expected) in rows {
        let mut ledger = new_ledger();
        let results = transfers(&mut ledger, batch, P);
        let codes: Vec<R> = results.iter().map(|r| r.result).collect();
        assert_eq!(codes, *expected, "{what}");
        for (event, result) in batch.iter().zip(&results) {
            if result.result == R::Ok && event.flags.contains(TF::IMPORTED) {
                assert_eq!(result.timestamp, event.timestamp, "{what}: an imported event keeps its time");
            }
        }
        check_invariants(&ledger.lookup_accounts(&[1, 2, 3, 4, 5, 6, 7]).unwrap());
    }

    // Ledger time moves to the last imported event; the next batch of the ledger's own follows.
    let mut ledger = new_ledger();
    transfers(&mut ledger, &[imp(100, at(1)), imp(101, at(2))], P);
    assert_eq!(ledger.meta().timestamp_last, at(2));
    let later = transfers(&mut ledger, &[t(102, 1, 2, 1)], at(1));
    assert_eq!((later[0].result, later[0].timestamp), (R::Ok, at(2) + 1));
    assert_eq!(ledger.lookup_transfers(&[101]).unwrap()[0].timestamp, at(2));

    // Accounts: the same rules, the time checked last (after the fields).
    let acc = |id: u128, timestamp: u64| Account { timestamp, ..account(id, 1, AF::IMPORTED) };
    let rows: &[(&str, &[Account], &[A])] = &[
        ("one", &[acc(20, at(1))], &[A::Ok]),
        (
            "out of order",
            &[acc(20, at(2)), acc(21, at(1))],
            &[A::Ok, A::ImportedEventTimestampMustNotRegress],
        ),
        ("mixed", &[acc(20, at(1)), account(21, 1, 0)], &[A::Ok, A::ImportedEventExpected]),
        ("mixed the other way", &[account(20, 1, 0), acc(21, at(1))], &[A::Ok, A::ImportedEventNotExpected]),
        ("no timestamp", &[acc(20, 0)], &[A::ImportedEventTimestampOutOfRange]),
        ("in the future", &[acc(20, P + 1)], &[A::ImportedEventTimestampMustNotAdvance]),
        ("fields before time", &[Account { code: 0, ..acc(20, T0) }], &[A::CodeMustNotBeZero]),
        ("regress", &[acc(20, T0)], &[A::ImportedEventTimestampMustNotRegress]),
        // An account that exists is the same account whatever time the retry carries.
        (
            "a stamped account not imported",
            &[Account { timestamp: at(1), ..account(20, 1, 0) }],
            &[A::TimestampMustBeZero],
        ),
        ("exists, not imported", &[acc(1, at(1))], &[A::ExistsWithDifferentFlags]),
        ("exists, imported", &[acc(20, at(1)), acc(20, at(2))], &[A::Ok, A::Exists]),
    ];
    for (what, batch, expected) in rows {
        let mut ledger = new_ledger();
        let mut reply = ledger.apply(&[Batch::CreateAccounts(batch.to_vec())], P, None).unwrap();
        let Some(BatchReply::CreateAccounts(results)) = reply.pop() else { unreachable!() };
        let codes: Vec<A> = results.iter().map(|r| r.result).collect();
        assert_eq!(codes, *expected, "{what}");
    }
    let mut ledger = new_ledger();
    ledger.apply(&[Batch::CreateAccounts(vec![acc(20, at(1))])], P, None).unwrap();
    let imported = ledger.lookup_accounts(&[20]).unwrap()[0];
    assert_eq!((imported.timestamp, imported.flags.contains(AF::IMPORTED)), (at(1), true));
}

/// One history for the query rows: accounts 10-15 and transfers 100-111 with user data, ledgers
/// and codes set, one event per entry (so that the state store holds several runs per index and
/// merges some).
fn query_history<S: Store>(ledger: &mut Ledger<S>) -> Vec<u64> {
    let accounts = [
        // id, ledger, code, user_data_128, user_data_64, user_data_32
        (10, 1, 7, 0xA, 0, 0),
        (11, 1, 8, 0xA, 5, 0),
        (12, 1, 7, 0xB, 5, 3),
        (13, 2, 7, 0, 0, 3),
        (14, 2, 8, 0xA, 0, 0),
        (15, 1, 7, 0, 5, 0),
    ];
    let mut at = T0;
    let mut timestamps = Vec::new();
    for (id, ledger_id, code, u128_, u64_, u32_) in accounts {
        let a = Account {
            code,
            user_data_128: u128_,
            user_data_64: u64_,
            user_data_32: u32_,
            ..account(id, ledger_id, 0)
        };
        at += NANOS_PER_SECOND;
        let reply = ledger.apply(&[Batch::CreateAccounts(vec![a])], at, None).unwrap();
        assert!(matches!(&reply[0], BatchReply::CreateAccounts(r) if r[0].result == A::Ok));
    }
    let transfers = [
        // id, debit, credit, code, user_data_128, user_data_64, user_data_32
        (100, 10, 11, 1, 500, 9, 0),
        (101, 11, 12, 1, 501, 9, 2),
        (102, 10, 12, 2, 0, 0, 2),
        (103, 12, 10, 1, 500, 0, 0),
        (104, 13, 14, 2, 0, 9, 0),
        (105, 14, 13, 1, 500, 0, 2),
        (106, 10, 15, 2, 502, 0, 0),
        (107, 15, 10, 1, 0, 0, 0),
        (108, 11, 10, 2, 500, 9, 2),
        (109, 13, 14, 1, 0, 0, 0),
        (110, 12, 15, 2, 503, 0, 0),
        (111, 15, 11, 1, 500, 9, 0),
    ];
    for (id, debit, credit, code, u128_, u64_, u32_) in transfers {
        let ledger_id = if debit == 13 || debit == 14 { 2 } else { 1 };
        let t = Transfer {
            code,
            ledger: ledger_id,
            user_data_128: u128_,
            user_data_64: u64_,
            user_data_32: u32_,
            ..transfer(id, debit, credit, 1)
        };
        at += NANOS_PER_SECOND;
        let reply = ledger.apply(&[Batch::CreateTransfers(vec![t])], at, None).unwrap();
        let BatchReply::CreateTransfers(results) = &reply[0] else { unreachable!() };
        assert_eq!(results[0].result, R::Ok, "{t:?}");
        timestamps.push(results[0].timestamp);
    }
    timestamps
}

/// Each row: a filter and the ids it selects, in order.
fn check_query_rows<S: Store>(ledger: &Ledger<S>, ts: &[u64], store: &str) {
    let at = |id: u64| ts[(id - 100) as usize];
    let q = QueryFilter { limit: 100, ..QueryFilter::default() };
    let transfer_rows: &[(QueryFilter, &[u128])] = &[
        (QueryFilter { user_data_128: 500, ..q }, &[100, 103, 105, 108, 111]),
        (QueryFilter { user_data_128: 500, reversed: true, ..q }, &[111, 108, 105, 103, 100]),
        (QueryFilter { user_data_128: 500, limit: 2, ..q }, &[100, 103]),
        (QueryFilter { user_data_128: 500, user_data_64: 9, ..q }, &[100, 108, 111]),
        (QueryFilter { user_data_128: 500, user_data_64: 9, user_data_32: 2, ..q }, &[108]),
        (QueryFilter { user_data_64: 9, ..q }, &[100, 101, 104, 108, 111]),
        (QueryFilter { user_data_32: 2, ..q }, &[101, 102, 105, 108]),
        (QueryFilter { code: 2, ..q }, &[102, 104, 106, 108, 110]),
        (QueryFilter { ledger: 2, ..q }, &[104, 105, 109]),
        (QueryFilter { ledger: 2, code: 1, ..q }, &[105, 109]),
        (QueryFilter { ledger: 1, user_data_128: 500, ..q }, &[100, 103, 108, 111]),
        (
            QueryFilter { user_data_128: 500, timestamp_min: at(103), timestamp_max: at(108), ..q },
            &[103, 105, 108],
        ),
        (
            QueryFilter { user_data_128: 500, timestamp_min: at(104), reversed: true, limit: 2, ..q },
            &[111, 108],
        ),
        (QueryFilter { limit: 3, ..q }, &[100, 101, 102]),
        (QueryFilter { reversed: true, limit: 2, ..q }, &[111, 110]),
        (QueryFilter { timestamp_min: at(110), ..q }, &[110, 111]),
        (QueryFilter { timestamp_max: at(101), reversed: true, ..q }, &[101, 100]),
        (QueryFilter { user_data_128: 999, ..q }, &[]),
        (QueryFilter { code: 3, ..q }, &[]),
        (QueryFilter { ledger: 3, ..q }, &[]),
        (QueryFilter { user_data_128: 500, code: 2, ledger: 2, ..q }, &[]),
    ];
    for (filter, expected) in transfer_rows {
        let page = ledger.query_transfers(filter).unwrap();
        let ids: Vec<u128> = page.results.iter().map(|t| t.id).collect();
        assert_eq!((ids.as_slice(), page.resume), (*expected, None), "{store}: {filter:?}");
    }
    let account_rows: &[(QueryFilter, &[u128])] = &[
        (q, &[10, 11, 12, 13, 14, 15]),
        (QueryFilter { reversed: true, limit: 2, ..q }, &[15, 14]),
        (QueryFilter { user_data_128: 0xA, ..q }, &[10, 11, 14]),
        (QueryFilter { user_data_128: 0xA, ledger: 1, ..q }, &[10, 11]),
        (QueryFilter { user_data_64: 5, ..q }, &[11, 12, 15]),
        (QueryFilter { user_data_32: 3, ..q }, &[12, 13]),
        (QueryFilter { code: 8, ..q }, &[11, 14]),
        (QueryFilter { ledger: 2, reversed: true, ..q }, &[14, 13]),
        (QueryFilter { code: 7, ledger: 1, user_data_64: 5, ..q }, &[12, 15]),
        (QueryFilter { user_data_128: 0xC, ..q }, &[]),
    ];
    for (filter, expected) in account_rows {
        let page = ledger.query_accounts(filter).unwrap();
        let ids: Vec<u128> = page.results.iter().map(|a| a.id).collect();
        assert_eq!((ids.as_slice(), page.resume), (*expected, None), "{store}: {filter:?}");
    }
    // An account's history, by its transfers' fields.
    let f =
        AccountFilter { account_id: 10, limit: 100, debits: true, credits: true, ..AccountFilter::default() };
    let history_rows: &[(AccountFilter, &[u128])] = &[
        (f, &[100, 102, 103, 106, 107, 108]),
        (AccountFilter { user_data_128: 500, ..f }, &[100, 103, 108]),
        (AccountFilter { user_data_128: 500, credits: false, ..f }, &[100]),
        (AccountFilter { user_data_64: 9, ..f }, &[100, 108]),
        (AccountFilter { user_data_32: 2, reversed: true, ..f }, &[108, 102]),
        (AccountFilter { code: 2, ..f }, &[102, 106, 108]),
        (AccountFilter { code: 2, user_data_128: 502, ..f }, &[106]),
        (AccountFilter { code: 3, ..f }, &[]),
    ];
    for (filter, expected) in history_rows {
        let page = ledger.account_transfers(filter).unwrap();
        let ids: Vec<u128> = page.results.iter().map(|t| t.id).collect();
        assert_eq!((ids.as_slice(), page.resume), (*expected, None), "{store}: {filter:?}");
    }
    let invalid = [
        (QueryFilter { limit: 0, ..q }, FilterError::LimitInvalid),
        (QueryFilter { limit: 8190, ..q }, FilterError::LimitInvalid),
        (QueryFilter { timestamp_min: 5, timestamp_max: 4, ..q }, FilterError::TimestampRangeInvalid),
        (QueryFilter { timestamp_min: (1 << 63) + 1, ..q }, FilterError::TimestampMinInvalid),
        (QueryFilter { timestamp_max: (1 << 63) + 1, limit: 0, ..q }, FilterError::TimestampMaxInvalid),
    ];
    for (filter, expected) in invalid {
        for error in [ledger.query_transfers(&filter).err(), ledger.query_accounts(&filter).err()] {
            match error {
                Some(ledger::query::QueryError::Filter(error)) => assert_eq!(error, expected, "{filter:?}"),
                other => panic!("{store}: {filter:?} gave {other:?}"),
            }
        }
    }
}

#[test]
fn queries_select_accounts_and_transfers_by_their_fields() {
    let mut memory = Ledger::open(MemStore::new()).unwrap();
    let ts = query_history(&mut memory);
    check_query_rows(&memory, &ts, "memory");
    // The state store serves them from its query indexes: as written, after a reopen, and after
    // a snapshot import (indexes are not in snapshots: an import builds them).
    let dir = tempfile::tempdir().unwrap();
    let inline = tally_store::Options { background_merges: false, ..Default::default() };
    let mut stored = Ledger::open(RunStore::open_with(&dir.path().join("a"), inline).unwrap()).unwrap();
    assert_eq!(query_history(&mut stored), ts);
    check_query_rows(&stored, &ts, "the state store");
    drop(stored);
    let stored = Ledger::open(RunStore::open_with(&dir.path().join("a"), inline).unwrap()).unwrap();
    check_query_rows(&stored, &ts, "the state store, reopened");
    let mut bytes = Vec::new();
    ledger::snapshot::export(stored.store(), &mut bytes).unwrap();
    let mut imported = RunStore::open_with(&dir.path().join("b"), inline).unwrap();
    ledger::snapshot::import(&mut imported, &mut bytes.as_slice()).unwrap();
    check_query_rows(&Ledger::open(imported).unwrap(), &ts, "the state store, imported");
}

/// A query by a ledger (or code) no transfer has: the state store rules chunks out by their zone
/// maps, and each transfer so ruled out counts against the scan budget as if examined. (It did
/// not: such a query walked every zone of the ledger in one call, under the ledger's read lock,
/// while applying waited.) The query stops at the budget, says where, and a second ask from
/// there finishes the range; backwards the same.
#[test]
fn a_query_by_an_absent_ledger_stops_at_its_scan_budget_in_the_state_store() {
    let dir = tempfile::tempdir().unwrap();
    let inline = tally_store::Options { background_merges: false, ..Default::default() };
    let mut ledger = Ledger::open(RunStore::open_with(dir.path(), inline).unwrap()).unwrap();
    let reply = ledger.apply(&[Batch::CreateAccounts(accounts())], T0, None).unwrap();
    let BatchReply::CreateAccounts(results) = &reply[0] else { unreachable!() };
    assert!(results.iter().all(|r| r.result == A::Ok), "{results:?}");
    let count = QUERY_SCAN_MAX + 100;
    let (mut made, mut at) = (0, T0 + NANOS_PER_SECOND);
    while made < count {
        let events: Vec<Transfer> =
            (made..count.min(made + BATCH_EVENTS_MAX)).map(|n| t(10_000 + n as u128, 1, 2, 1)).collect();
        made += events.len();
        at += NANOS_PER_SECOND;
        let mut reply = ledger.apply(&[Batch::CreateTransfers(events)], at, None).unwrap();
        let Some(BatchReply::CreateTransfers(results)) = reply.pop() else { unreachable!() };
        assert!(results.iter().all(|r| r.result == R::Ok));
    }
    for reversed in [false, true] {
        let filter = QueryFilter { ledger: 999, limit: 10, reversed, ..QueryFilter::default() };
        let page = ledger.query_transfers(&filter).unwrap();
        let resume =
            page.resume.unwrap_or_else(|| panic!("reversed {reversed}: walked every zone in one call"));
        assert!(page.results.is_empty());
        let rest = if reversed {
            QueryFilter { timestamp_max: resume, ..filter }
        } else {
            QueryFilter { timestamp_min: resume, ..filter }
        };
        let rest = ledger.query_transfers(&rest).unwrap();
        assert_eq!((rest.results.len(), rest.resume), (0, None), "reversed {reversed}");
    }
    // A ledger the transfers have still finds them, within the limit.
    let found =
        ledger.query_transfers(&QueryFilter { ledger: 1, limit: 10, ..QueryFilter::default() }).unwrap();
    assert_eq!(found.results.len(), 10);
}

/// A query whose filter matches little of a long range stops at the scan budget, says where, and
/// goes on from there when asked again.
#[test]
fn a_query_stops_at_its_scan_budget_and_resumes() {
    let mut ledger = new_ledger();
    let count = QUERY_SCAN_MAX + 100;
    let mut at = T0 + NANOS_PER_SECOND;
    let mut made = 0;
    let mut timestamps = Vec::new();
    while made < count {
        // All with user_data_32 1 and code 1, but the very last: code 2.
        let events: Vec<Transfer> = (made..count.min(made + BATCH_EVENTS_MAX))
            .map(|n| {
                let code = if n + 1 == count { 2 } else { 1 };
                Transfer { user_data_32: 1, code, ..t(10_000 + n as u128, 1, 2, 1) }
            })
            .collect();
        made += events.len();
        at += NANOS_PER_SECOND;
        let results = transfers(&mut ledger, &events, at);
        assert!(results.iter().all(|r| r.result == R::Ok));
        timestamps.extend(results.iter().map(|r| r.timestamp));
    }
    let rare = 10_000 + count as u128 - 1;
    // Driven by user_data_32 (every transfer has 1), checked for code 2: only the last matches,
    // beyond the budget. The first ask stops there and says where; the second finds it.
    let filter = QueryFilter { user_data_32: 1, code: 2, limit: 10, ..QueryFilter::default() };
    let page = ledger.query_transfers(&filter).unwrap();
    assert_eq!((page.results.len(), page.resume), (0, Some(timestamps[QUERY_SCAN_MAX])));
    let rest =
        ledger.query_transfers(&QueryFilter { timestamp_min: page.resume.unwrap(), ..filter }).unwrap();
    let ids: Vec<u128> = rest.results.iter().map(|t| t.id).collect();
    assert_eq!((ids, rest.resume), (vec![rare], None));
    // Backwards, the match comes first and the limit is not reached: the budget runs out at
    // the other end.
    let reversed = QueryFilter { reversed: true, ..filter };
    let page = ledger.query_transfers(&reversed).unwrap();
    assert_eq!(page.results.len(), 1);
    assert_eq!(page.resume, Some(timestamps[count - 1 - QUERY_SCAN_MAX]));
    let rest =
        ledger.query_transfers(&QueryFilter { timestamp_max: page.resume.unwrap(), ..reversed }).unwrap();
    assert_eq!((rest.results.len(), rest.resume), (0, None));
    // An account's history filtered by a field its index does not hold: the same.
    let f = AccountFilter {
        account_id: 1,
        limit: 10,
        debits: true,
        credits: true,
        code: 2,
        ..AccountFilter::default()
    };
    let page = ledger.account_transfers(&f).unwrap();
    assert_eq!((page.results.len(), page.resume), (0, Some(timestamps[QUERY_SCAN_MAX])));
    let rest = ledger.account_transfers(&AccountFilter { timestamp_min: page.resume.unwrap(), ..f }).unwrap();
    assert_eq!((rest.results.iter().map(|t| t.id).collect::<Vec<_>>(), rest.resume), (vec![rare], None));
    // A limit reached within the budget is no resume.
    let wide = QueryFilter { code: 1, limit: 8189, reversed: true, ..QueryFilter::default() };
    let page = ledger.query_transfers(&wide).unwrap();
    assert_eq!(
        (page.results.len(), page.resume, page.results[0].timestamp),
        (8189, None, timestamps[count - 2])
    );
}

/// The change records one batch leaves, as (kind, id, debit account's (pending, posted) debits,
/// credit account's (pending, posted) credits), after the setup (which must all succeed; its own
/// records are not compared). Each row's batch runs `delay_s` seconds after the setup's second
/// (the setup's pending transfer is due two seconds after it).
#[test]
fn each_event_leaves_one_change_record_with_the_balances_after_it() {
    use ChangeKind as K;
    let pending = with(flagged(t(50, 1, 2, 30), TF::PENDING), |t| t.timeout = 2);
    type Row = (Vec<Transfer>, Vec<Transfer>, u64, Vec<(ChangeKind, u128, (u128, u128), (u128, u128))>);
    let rows: Vec<Row> = vec![
        (vec![], vec![t(10, 1, 2, 5)], 0, vec![(K::SinglePhase, 10, (0, 5), (0, 5))]),
        (
            vec![],
            vec![t(10, 1, 2, 5), t(11, 2, 1, 3)],
            0,
            vec![(K::SinglePhase, 10, (0, 5), (0, 5)), (K::SinglePhase, 11, (0, 3), (0, 3))],
        ),
        (vec![], vec![pending], 0, vec![(K::TwoPhasePending, 50, (30, 0), (30, 0))]),
        (
            vec![pending],
            vec![settle(51, 50, TF::POST_PENDING_TRANSFER, 20)],
            0,
            vec![(K::TwoPhasePosted, 51, (0, 20), (0, 20))],
        ),
        (
            vec![pending],
            vec![settle(51, 50, TF::VOID_PENDING_TRANSFER, 0)],
            0,
            vec![(K::TwoPhaseVoided, 51, (0, 0), (0, 0))],
        ),
        // Due before the batch: the expiry first, at its own timestamp, then the batch's event.
        (
            vec![pending],
            vec![t(12, 1, 2, 1)],
            5,
            vec![(K::TwoPhaseExpired, 50, (0, 0), (0, 0)), (K::SinglePhase, 12, (0, 1), (0, 1))],
        ),
        // Refused events and failed chains leave nothing.
        (vec![], vec![t(13, 1, 1, 1), t(14, 1, 99, 1)], 0, vec![]),
        (
            vec![],
            vec![flagged(t(15, 1, 2, 1), TF::LINKED), t(16, 1, 99, 1), t(17, 1, 2, 2)],
            0,
            vec![(K::SinglePhase, 17, (0, 2), (0, 2))],
        ),
    ];
    for (setup, batch, delay_s, expected) in rows {
        let (_, ledger) = run(&setup, &[], 0);
        let before = ledger.meta().timestamp_last;
        let mut ledger = ledger;
        let at = T0 + (2 + delay_s) * NANOS_PER_SECOND;
        let results = transfers(&mut ledger, &batch, at);
        let events = ledger.changes(before + 1, 100).unwrap();
        let got: Vec<_> = events
            .iter()
            .map(|e| {
                let c = &e.change;
                (
                    c.kind,
                    c.id,
                    (c.debit.debits_pending, c.debit.debits_posted),
                    (c.credit.credits_pending, c.credit.credits_posted),
                )
            })
            .collect();
        assert_eq!(got, expected, "setup {setup:?}\nbatch {batch:?}\nresults {results:?}");
        // A transfer's record has the transfer's timestamp; an expiry's comes before the batch's.
        for event in &events {
            if let (Some(transfer), false) = (event.transfer, event.change.kind == K::TwoPhaseExpired) {
                assert_eq!(transfer.timestamp, event.change.timestamp);
                assert!(results.iter().any(|r| r.timestamp == transfer.timestamp));
            }
        }
        assert!(events.windows(2).all(|w| w[0].change.timestamp < w[1].change.timestamp));
    }
    // Accounts: one record each, zero balances, at the account's timestamp; a tick's expiry too.
    let ledger = new_ledger();
    let created = ledger.changes(0, 100).unwrap();
    assert_eq!(
        created.iter().map(|e| (e.change.kind, e.change.id)).collect::<Vec<_>>(),
        (1..=7).map(|id| (K::AccountCreated, id)).collect::<Vec<_>>()
    );
    let (_, mut ledger) = run(&[pending], &[], 0);
    let due = T0 + 3 * NANOS_PER_SECOND;
    ledger.apply(&[], due, None).unwrap();
    let last = *ledger.changes(0, 100).unwrap().last().unwrap();
    assert_eq!((last.change.kind, last.change.id, last.change.timestamp), (K::TwoPhaseExpired, 50, due));
    assert_eq!(ledger.meta().timestamp_last, due);
}
