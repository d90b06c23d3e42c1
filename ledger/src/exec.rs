//! The deterministic execution of batches: the accounting rules.
//!
//! `Ledger::apply` takes the batches of one Raft entry and the timestamp its leader proposed,
//! executes them against an overlay of uncommitted changes (`Tx`), and commits the overlay to the
//! store in one atomic write. Nothing here reads a clock, draws a random number or iterates a hash
//! map: the same entries on the same state give the same bytes on every replica.
//!
//! Order of checks for a transfer (the first that fails is the event's result):
//! 1. linked chain: `linked_event_chain_open` (last event of the batch is linked),
//!    `linked_event_failed` (an earlier event of the chain failed), `timestamp_must_be_zero`;
//! 2. `reserved_flag`, `id_must_not_be_zero`, `id_must_not_be_int_max`;
//! 3. if the id exists: `exists_with_different_{flags, pending_id, timeout, debit_account_id,
//!    credit_account_id, amount, user_data_128, user_data_64, user_data_32, ledger, code}` or
//!    `exists` — before anything that depends on balances, so that a retry is always answered
//!    the same way;
//! 4. a post or void: `flags_are_mutually_exclusive`, `pending_id_must_not_be_zero`,
//!    `pending_id_must_not_be_int_max`, `pending_id_must_be_different`,
//!    `timeout_reserved_for_pending_transfer`, `pending_transfer_not_found`,
//!    `pending_transfer_not_pending`, `pending_transfer_has_different_{debit_account_id,
//!    credit_account_id, ledger, code}`, `exceeds_pending_transfer_amount`,
//!    `pending_transfer_has_different_amount` (void), `pending_transfer_already_{posted, voided}`,
//!    `pending_transfer_expired`, then (post only) `{debit, credit}_account_already_closed`;
//! 5. a new transfer: `{debit, credit}_account_id_must_not_be_{zero, int_max}`,
//!    `accounts_must_be_different`, `pending_id_must_be_zero`, (not pending)
//!    `timeout_reserved_for_pending_transfer` and `closing_transfer_must_be_pending`,
//!    `ledger_must_not_be_zero`, `code_must_not_be_zero`, `{debit, credit}_account_not_found`,
//!    `accounts_must_have_the_same_ledger`, `transfer_must_have_the_same_ledger_as_accounts`,
//!    `{debit, credit}_account_already_closed`, then the balancing clamp, then (pending)
//!    `overflows_{debits, credits}_pending`, `overflows_{debits, credits}_posted`,
//!    `overflows_{debits, credits}`, `overflows_timeout`, `exceeds_credits`, `exceeds_debits`.

use std::collections::BTreeSet;

use foldhash::HashMap;

use crate::codec::LedgerMeta;
use crate::model::*;
use crate::store::{Changes, IndexWrite, Store, StoreError, StoreResult};

/// The accounting state machine over a store.
pub struct Ledger<S> {
    store: S,
    meta: LedgerMeta,
}

impl<S: Store> Ledger<S> {
    /// Opens the ledger kept in `store`: an empty store is a new ledger.
    pub fn open(store: S) -> StoreResult<Ledger<S>> {
        let meta = match store.meta_raw(crate::codec::META_LEDGER_KEY)? {
            Some(bytes) => crate::codec::decode_ledger_meta(&bytes).map_err(|version| {
                // A newer schema is no damage: a newer build wrote it (a rollback), and it must
                // be left as it is, not rebuilt.
                if version > crate::codec::SCHEMA_VERSION {
                    StoreError::OtherVersion(format!(
                        "the ledger state was written by a newer tally (schema version {version}; this build \
                         reads up to {}): run that version or a later one",
                        crate::codec::SCHEMA_VERSION
                    ))
                } else {
                    StoreError::Corrupt(format!(
                        "ledger schema version {version}, this build reads version {}",
                        crate::codec::SCHEMA_VERSION
                    ))
                }
            })?,
            None if store.is_empty()? => LedgerMeta::default(),
            None => {
                return Err(StoreError::Corrupt(
                    "records without ledger meta: an interrupted snapshot import".into(),
                ));
            }
        };
        if !crate::semantics::known(meta.semantics) {
            return Err(StoreError::OtherVersion(format!(
                "the ledger applies entries under semantics version {}; this build knows {} to {}: \
                 run a newer tally",
                meta.semantics,
                crate::semantics::GENESIS,
                crate::semantics::MAX
            )));
        }
        Ok(Ledger { store, meta })
    }

    /// Applies an entry that switches the rules of every later entry to semantics `version`
    /// (`crate::semantics`), and stores `app_meta` with it. The switch is part of the history:
    /// it moves the digest. A version this build does not know, or one below the current, is
    /// refused and nothing is written.
    pub fn switch_semantics(&mut self, version: u32, app_meta: Option<&[u8]>) -> StoreResult<()> {
        if !crate::semantics::known(version) || version < self.meta.semantics {
            return Err(StoreError::OtherVersion(format!(
                "an entry switches to semantics version {version}; this build applies {} to {} and the \
                 ledger is at {}",
                crate::semantics::GENESIS,
                crate::semantics::MAX,
                self.meta.semantics
            )));
        }
        let mut meta = self.meta;
        meta.semantics = version;
        let mut framed = Vec::with_capacity(32 + 16 + 4);
        framed.extend_from_slice(&self.meta.digest);
        framed.extend_from_slice(b"semantics");
        framed.extend_from_slice(&version.to_le_bytes());
        meta.digest = *blake3::hash(&framed).as_bytes();
        let changes = crate::store::Changes {
            meta,
            app_meta: app_meta.map(<[u8]>::to_vec),
            timestamp_before: self.meta.timestamp_last,
            ..crate::store::Changes::default()
        };
        self.store.commit(&changes)?;
        self.meta = meta;
        Ok(())
    }

    /// When the earliest pending transfer with a timeout expires (ns of ledger time), if any:
    /// the leader proposes a tick (`apply` with no batches) once its time has come.
    pub fn next_expiry(&self) -> StoreResult<Option<u64>> {
        self.store.next_expiry()
    }

    pub fn meta(&self) -> LedgerMeta {
        self.meta
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, for work that changes no record (a checkpoint of `Checkpointed`).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn into_store(self) -> S {
        self.store
    }

    /// Applies the batches of one entry as one atomic write, and stores `app_meta` with it.
    /// `timestamp_proposed` is the leader's clock; events get `max(proposed, last + 1)` onwards.
    pub fn apply(
        &mut self,
        batches: &[Batch],
        timestamp_proposed: u64,
        app_meta: Option<&[u8]>,
    ) -> StoreResult<Vec<BatchReply>> {
        let mut tx = Tx::new(&self.store, self.meta);
        let mut replies = Vec::with_capacity(batches.len());
        for batch in batches {
            replies.push(tx.execute(batch, timestamp_proposed)?);
        }
        let tick = batches.is_empty() && timestamp_proposed != 0;
        if tick {
            tx.tick(timestamp_proposed)?;
        }
        let wrote = tx.writes > 0;
        let mut changes = tx.work.into_changes();
        // An entry without batches and without a time (Raft's blank and membership entries) is
        // no event of the ledger: the digest follows the ledger's history, not the log's, so
        // that a cluster restored from a backup reads the backup's digest until its first write.
        // From semantics 2 on, neither is an entry that wrote no record (a tick that found
        // nothing due).
        let moves = match self.meta.semantics {
            1 => !batches.is_empty() || tick,
            _ => (!batches.is_empty() || tick) && (wrote || changes.meta != self.meta),
        };
        if moves {
            changes.meta.digest = digest_changes(&self.meta.digest, &changes, self.meta.semantics);
        }
        changes.app_meta = app_meta.map(<[u8]>::to_vec);
        changes.timestamp_before = self.meta.timestamp_last;
        self.store.commit(&changes)?;
        self.meta = changes.meta;
        Ok(replies)
    }
}

/// The running digest: blake3 of the previous digest and every write of this entry in key order.
/// The writes are framed into one buffer first: blake3 is several times faster over one large
/// input than over many small `update` calls.
fn digest_changes(previous: &[u8; 32], changes: &Changes, semantics: u32) -> [u8; 32] {
    // Sized for the entry up front: growing a buffer of megabytes copies it again each time.
    let capacity = 4096
        + changes.accounts.len() * 160
        + changes.transfers.len() * 150
        + changes.index.len() * 120
        + changes.changes.len() * 170
        + (changes.pending.len() + changes.expiry_put.len() + changes.expiry_delete.len()) * 48;
    let mut framed = Vec::with_capacity(capacity);
    framed.extend_from_slice(previous);
    // The meta as the semantics hashes it, not as the store lays it out.
    let meta = match semantics {
        1 => crate::codec::encode_ledger_meta_v4(&changes.meta),
        _ => crate::codec::encode_meta_for_digest(&changes.meta),
    };
    changes.for_each_write(|key, value| {
        let value = if key == crate::codec::META_LEDGER_KEY { Some(&meta[..]) } else { value };
        framed.extend_from_slice(&(key.len() as u32).to_le_bytes());
        framed.extend_from_slice(key);
        match value {
            Some(value) => {
                framed.push(1);
                framed.extend_from_slice(&(value.len() as u32).to_le_bytes());
                framed.extend_from_slice(value);
            }
            None => framed.push(0),
        }
    });
    *blake3::hash(&framed).as_bytes()
}

/// How to undo one change to the overlay, for rolling back a failed linked chain.
enum Undo {
    Account(u128, Option<Account>),
    Transfer(u128),
    Pending(u128, Option<PendingStatus>),
    ExpiryPut((u64, u128)),
    /// The key, and whether it was a put of this same entry (rather than a stored key).
    ExpiryDelete((u64, u128), bool),
    Index,
    Change,
}

/// The overlay of one entry's uncommitted changes, shaped for speed while executing (hash maps
/// and appends); `into_changes` sorts it into the ordered `Changes` that stores and the digest
/// consume, so no hash order ever leaks.
#[derive(Default)]
struct Work {
    accounts: HashMap<u128, Account>,
    /// New transfers in creation order, and where each id sits in it.
    transfers: Vec<Transfer>,
    transfer_positions: HashMap<u128, u32>,
    pending: HashMap<u128, PendingStatus>,
    expiry_put: BTreeSet<(u64, u128)>,
    expiry_delete: BTreeSet<(u64, u128)>,
    /// Not undone by a chain's rollback: the event failed, whatever became of its chain.
    failed: HashMap<u128, CreateTransferResult>,
    index: Vec<IndexWrite>,
    changes: Vec<ChangeRecord>,
    meta: LedgerMeta,
}

impl Work {
    fn into_changes(self) -> Changes {
        let mut accounts: Vec<Account> = self.accounts.into_values().collect();
        accounts.sort_unstable_by_key(|a| a.id);
        let mut pending: Vec<(u128, PendingStatus)> = self.pending.into_iter().collect();
        pending.sort_unstable_by_key(|(id, _)| *id);
        let mut failed: Vec<(u128, CreateTransferResult)> = self.failed.into_iter().collect();
        failed.sort_unstable_by_key(|(id, _)| *id);
        Changes {
            accounts,
            transfers: self.transfers,
            pending,
            expiry_put: self.expiry_put,
            expiry_delete: self.expiry_delete,
            failed,
            index: self.index,
            changes: self.changes,
            meta: self.meta,
            app_meta: None,
            timestamp_before: 0,
        }
    }
}

/// One entry's execution: the committed store underneath, the overlay of changes on top.
struct Tx<'s, S> {
    store: &'s S,
    work: Work,
    /// Undo records, kept only while a linked chain is open: an event outside a chain either
    /// succeeds whole or is rejected before it writes anything.
    undo: Vec<Undo>,
    recording: bool,
    /// Counts overlay writes, to assert that a rejected event wrote nothing.
    writes: u64,
}

type Outcome<R> = StoreResult<(R, u64)>;

impl<'s, S: Store> Tx<'s, S> {
    fn new(store: &'s S, meta: LedgerMeta) -> Tx<'s, S> {
        let work = Work { meta, ..Work::default() };
        Tx { store, work, undo: Vec::new(), recording: false, writes: 0 }
    }

    fn execute(&mut self, batch: &Batch, timestamp_proposed: u64) -> StoreResult<BatchReply> {
        assert!(batch.len() <= BATCH_EVENTS_MAX, "batch of {} events reached the ledger", batch.len());
        let imported = match batch {
            Batch::CreateAccounts(events) => events.first().is_some_and(Event::imported),
            Batch::CreateTransfers(events) => events.first().is_some_and(Event::imported),
        };
        let clock = if imported {
            // History from another system: each event brings its own (past) timestamp, and
            // ledger time moves to each one that is created. Nothing expires meanwhile: that
            // follows the cluster's time, at the next batch or tick.
            Clock::Imported { now: timestamp_proposed }
        } else {
            // Expiries due by then come first, each at a timestamp of its own; the batch's
            // events follow them.
            let now = timestamp_proposed.max(self.work.meta.timestamp_last + 1);
            self.expire_pending(now)?;
            Clock::Assigned { first: now.max(self.work.meta.timestamp_last + 1) }
        };
        let reply = match batch {
            Batch::CreateAccounts(events) => {
                BatchReply::CreateAccounts(self.execute_chains(events, clock, Self::create_account)?)
            }
            Batch::CreateTransfers(events) => {
                BatchReply::CreateTransfers(self.execute_chains(events, clock, Self::create_transfer)?)
            }
        };
        if let Clock::Assigned { first } = clock
            && !batch.is_empty()
        {
            let last = first.checked_add(batch.len() as u64 - 1).expect("ledger time overflowed u64");
            assert!(last > self.work.meta.timestamp_last, "ledger time went backwards");
            self.work.meta.timestamp_last = last;
        }
        self.work.meta.batches_applied += 1;
        Ok(reply)
    }

    /// Runs each event, treating linked chains as all-or-nothing.
    fn execute_chains<E: Event, R: ResultCode>(
        &mut self,
        events: &[E],
        clock: Clock,
        create: impl Fn(&mut Self, &E, u64) -> Outcome<R>,
    ) -> StoreResult<Vec<EventResult<R>>> {
        let mut results: Vec<EventResult<R>> = Vec::with_capacity(events.len());
        // (first event, undo savepoint, ledger time before it)
        let mut chain: Option<(usize, usize, u64)> = None;
        let mut chain_broken = false;
        for (index, event) in events.iter().enumerate() {
            if event.linked() && chain.is_none() {
                chain = Some((index, self.undo.len(), self.work.meta.timestamp_last));
                self.recording = true;
            }
            let writes_before = self.writes;
            let (result, result_timestamp) = if event.linked() && index == events.len() - 1 {
                (R::LINKED_EVENT_CHAIN_OPEN, 0)
            } else if chain_broken {
                (R::LINKED_EVENT_FAILED, 0)
            } else {
                match clock {
                    Clock::Assigned { .. } if event.imported() => (R::IMPORTED_EVENT_NOT_EXPECTED, 0),
                    Clock::Imported { .. } if !event.imported() => (R::IMPORTED_EVENT_EXPECTED, 0),
                    Clock::Assigned { .. } if event.timestamp() != 0 => (R::TIMESTAMP_MUST_BE_ZERO, 0),
                    Clock::Assigned { first } => create(self, event, first + index as u64)?,
                    Clock::Imported { .. }
                        if event.timestamp() == 0 || event.timestamp() >= IMPORTED_TIMESTAMP_END =>
                    {
                        (R::IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE, 0)
                    }
                    Clock::Imported { now } if event.timestamp() > now => {
                        (R::IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE, 0)
                    }
                    Clock::Imported { .. } => {
                        let created = create(self, event, event.timestamp())?;
                        if created.0 == R::OK {
                            self.work.meta.timestamp_last = event.timestamp();
                        }
                        created
                    }
                }
            };
            if result != R::OK {
                assert_eq!(self.writes, writes_before, "a rejected event changed the state");
                if let Some((chain_first, savepoint, timestamp_before)) = chain
                    && !chain_broken
                {
                    chain_broken = true;
                    self.rollback(savepoint);
                    self.work.meta.timestamp_last = timestamp_before;
                    for earlier in &mut results[chain_first..index] {
                        *earlier = EventResult { result: R::LINKED_EVENT_FAILED, timestamp: 0 };
                    }
                }
            }
            results.push(EventResult { result, timestamp: result_timestamp });
            if chain.is_some() && (!event.linked() || result == R::LINKED_EVENT_CHAIN_OPEN) {
                chain = None;
                chain_broken = false;
            }
            if chain.is_none() {
                self.undo.clear();
                self.recording = false;
            }
        }
        Ok(results)
    }

    fn rollback(&mut self, savepoint: usize) {
        while self.undo.len() > savepoint {
            let changes = &mut self.work;
            match self.undo.pop().unwrap() {
                Undo::Account(id, Some(previous)) => {
                    changes.accounts.insert(id, previous);
                }
                Undo::Account(id, None) => {
                    changes.accounts.remove(&id);
                }
                Undo::Transfer(id) => {
                    let transfer = changes.transfers.pop().expect("undo of a transfer not created");
                    assert_eq!(transfer.id, id);
                    changes.transfer_positions.remove(&id);
                }
                Undo::Pending(id, Some(previous)) => {
                    changes.pending.insert(id, previous);
                }
                Undo::Pending(id, None) => {
                    changes.pending.remove(&id);
                }
                Undo::ExpiryPut(key) => {
                    changes.expiry_put.remove(&key);
                }
                Undo::ExpiryDelete(key, true) => {
                    changes.expiry_put.insert(key);
                }
                Undo::ExpiryDelete(key, false) => {
                    changes.expiry_delete.remove(&key);
                }
                Undo::Index => {
                    changes.index.pop();
                }
                Undo::Change => {
                    changes.changes.pop();
                }
            }
        }
    }

    // Reads through the overlay.

    fn account(&self, id: u128) -> StoreResult<Option<Account>> {
        match self.work.accounts.get(&id) {
            Some(account) => Ok(Some(*account)),
            None => self.store.account(id),
        }
    }

    fn transfer(&self, id: u128) -> StoreResult<Option<Transfer>> {
        match self.work.transfer_positions.get(&id) {
            Some(position) => Ok(Some(self.work.transfers[*position as usize])),
            None => self.store.transfer(id),
        }
    }

    fn failed_transfer(&self, id: u128) -> StoreResult<Option<CreateTransferResult>> {
        match self.work.failed.get(&id) {
            Some(result) => Ok(Some(*result)),
            None => self.store.failed_transfer(id),
        }
    }

    fn pending_status(&self, id: u128) -> StoreResult<Option<PendingStatus>> {
        match self.work.pending.get(&id) {
            Some(status) => Ok(Some(*status)),
            None => self.store.pending_status(id),
        }
    }

    // Writes into the overlay, each recorded for rollback.

    fn record(&mut self, undo: impl FnOnce() -> Undo) {
        self.writes += 1;
        if self.recording {
            self.undo.push(undo());
        }
    }

    fn put_account(&mut self, account: Account) {
        let previous = self.work.accounts.insert(account.id, account);
        self.record(|| Undo::Account(account.id, previous));
    }

    fn put_transfer(&mut self, transfer: Transfer) {
        let previous = self.work.transfer_positions.insert(transfer.id, self.work.transfers.len() as u32);
        self.work.transfers.push(transfer);
        assert!(previous.is_none(), "transfer {} created twice", transfer.id);
        self.record(|| Undo::Transfer(transfer.id));
    }

    fn put_pending_status(&mut self, id: u128, status: PendingStatus) {
        let previous = self.work.pending.insert(id, status);
        self.record(|| Undo::Pending(id, previous));
    }

    fn put_expiry(&mut self, key: (u64, u128)) {
        assert!(self.work.expiry_put.insert(key), "expiry {key:?} inserted twice");
        self.record(|| Undo::ExpiryPut(key));
    }

    fn delete_expiry(&mut self, key: (u64, u128)) {
        let was_put = self.work.expiry_put.remove(&key);
        if !was_put {
            assert!(self.work.expiry_delete.insert(key), "expiry {key:?} deleted twice");
        }
        self.record(|| Undo::ExpiryDelete(key, was_put));
    }

    fn put_index(&mut self, account: &Account, transfer: &Transfer) {
        let balance =
            account.flags.contains(AccountFlags::HISTORY).then(|| account.balance(transfer.timestamp));
        self.work.index.push(IndexWrite {
            account_id: account.id,
            timestamp: transfer.timestamp,
            transfer_id: transfer.id,
            balance,
        });
        self.record(|| Undo::Index);
    }

    fn put_change(&mut self, kind: ChangeKind, id: u128, timestamp: u64, debit: &Account, credit: &Account) {
        if let Some(last) = self.work.changes.last() {
            assert!(timestamp > last.timestamp, "change records out of time order");
        }
        self.work.changes.push(ChangeRecord {
            timestamp,
            kind,
            id,
            debit: debit.balance(timestamp),
            credit: credit.balance(timestamp),
        });
        self.record(|| Undo::Change);
    }

    /// An entry of time alone (`apply` with no batches and a proposed timestamp): expires every
    /// pending transfer due at that time, or just after the ledger's last timestamp if that is
    /// later, and moves ledger time there if anything expired. How an idle ledger expires
    /// reservations without waiting for a write.
    fn tick(&mut self, timestamp_proposed: u64) -> StoreResult<()> {
        let now = timestamp_proposed.max(self.work.meta.timestamp_last + 1);
        self.expire_pending(now)
    }

    /// Expires every pending transfer due at `now`, releasing its reservation, oldest expiry
    /// first, each at its own timestamp from `now` on (ledger time moves to the last). Runs at
    /// the start of each batch, so a transfer is expired by the first batch whose time reaches
    /// its expiry (or by a tick, on an idle ledger).
    fn expire_pending(&mut self, now: u64) -> StoreResult<()> {
        let mut due: Vec<(u64, u128)> = self
            .store
            .expiries_due(now)?
            .into_iter()
            .filter(|key| !self.work.expiry_delete.contains(key))
            .collect();
        due.extend(self.work.expiry_put.range(..=(now, u128::MAX)).copied());
        due.sort_unstable();
        for key in due {
            let timestamp = now.max(self.work.meta.timestamp_last + 1);
            self.expire(key, timestamp)?;
            self.work.meta.timestamp_last = timestamp;
        }
        self.undo.clear();
        Ok(())
    }

    fn expire(&mut self, (expires_at, id): (u64, u128), timestamp: u64) -> StoreResult<()> {
        let pending = self.transfer(id)?.expect("expiry of an unknown transfer");
        assert_eq!(self.pending_status(id)?, Some(PendingStatus::Pending), "expiry of a settled transfer");
        assert_eq!(expires_at, pending.timestamp + u64::from(pending.timeout) * NANOS_PER_SECOND);
        let mut debit = self.account(pending.debit_account_id)?.expect("pending transfer's debit account");
        let mut credit = self.account(pending.credit_account_id)?.expect("pending transfer's credit account");
        debit.debits_pending -= pending.amount;
        credit.credits_pending -= pending.amount;
        if pending.flags.contains(TransferFlags::CLOSING_DEBIT) {
            debit.flags.0 &= !AccountFlags::CLOSED;
        }
        if pending.flags.contains(TransferFlags::CLOSING_CREDIT) {
            credit.flags.0 &= !AccountFlags::CLOSED;
        }
        self.put_change(ChangeKind::TwoPhaseExpired, id, timestamp, &debit, &credit);
        self.put_account(debit);
        self.put_account(credit);
        self.put_pending_status(id, PendingStatus::Expired);
        self.delete_expiry((expires_at, id));
        Ok(())
    }

    fn create_account(&mut self, a: &Account, timestamp: u64) -> Outcome<CreateAccountResult> {
        use CreateAccountResult as R;
        if a.flags.has_reserved_bits() {
            return Ok((R::ReservedFlag, 0));
        }
        if a.id == 0 {
            return Ok((R::IdMustNotBeZero, 0));
        }
        if a.id == ID_RESERVED_MAX {
            return Ok((R::IdMustNotBeIntMax, 0));
        }
        if let Some(existing) = self.account(a.id)? {
            return Ok(account_exists(a, &existing));
        }
        let result = if a.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && a.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
        {
            R::FlagsAreMutuallyExclusive
        } else if a.debits_pending != 0 {
            R::DebitsPendingMustBeZero
        } else if a.debits_posted != 0 {
            R::DebitsPostedMustBeZero
        } else if a.credits_pending != 0 {
            R::CreditsPendingMustBeZero
        } else if a.credits_posted != 0 {
            R::CreditsPostedMustBeZero
        } else if a.ledger == 0 {
            R::LedgerMustNotBeZero
        } else if a.code == 0 {
            R::CodeMustNotBeZero
        } else if a.flags.contains(AccountFlags::IMPORTED) && timestamp <= self.work.meta.timestamp_last {
            R::ImportedEventTimestampMustNotRegress
        } else {
            let created = Account { timestamp, ..*a };
            self.put_change(ChangeKind::AccountCreated, a.id, timestamp, &created, &Account::default());
            self.put_account(created);
            return Ok((R::Ok, timestamp));
        };
        Ok((result, 0))
    }

    /// Creates a transfer, and remembers its id if it failed for a transient reason.
    fn create_transfer(&mut self, t: &Transfer, timestamp: u64) -> Outcome<CreateTransferResult> {
        let (result, timestamp) = self.try_create_transfer(t, timestamp)?;
        if result.is_transient() {
            self.work.failed.insert(t.id, result);
        }
        Ok((result, timestamp))
    }

    fn try_create_transfer(&mut self, t: &Transfer, timestamp: u64) -> Outcome<CreateTransferResult> {
        use CreateTransferResult as R;
        if t.flags.has_reserved_bits() {
            return Ok((R::ReservedFlag, 0));
        }
        if t.id == 0 {
            return Ok((R::IdMustNotBeZero, 0));
        }
        if t.id == ID_RESERVED_MAX {
            return Ok((R::IdMustNotBeIntMax, 0));
        }
        if let Some(existing) = self.transfer(t.id)? {
            return self.transfer_exists(t, &existing);
        }
        if self.failed_transfer(t.id)?.is_some() {
            return Ok((R::IdAlreadyFailed, 0));
        }
        if t.is_post_or_void() {
            return self.post_or_void_pending_transfer(t, timestamp);
        }
        let result = new_transfer_precheck(t);
        if result != R::Ok {
            return Ok((result, 0));
        }
        let Some(debit) = self.account(t.debit_account_id)? else {
            return Ok((R::DebitAccountNotFound, 0));
        };
        let Some(credit) = self.account(t.credit_account_id)? else {
            return Ok((R::CreditAccountNotFound, 0));
        };
        let imported_after =
            t.flags.contains(TransferFlags::IMPORTED).then_some(self.work.meta.timestamp_last);
        let result = new_transfer_check(t, &debit, &credit, timestamp, imported_after);
        let amount = match result {
            Ok(amount) => amount,
            Err(result) => return Ok((result, 0)),
        };
        self.apply_new_transfer(t, timestamp, amount, debit, credit);
        Ok((R::Ok, timestamp))
    }

    fn apply_new_transfer(
        &mut self,
        t: &Transfer,
        timestamp: u64,
        amount: u128,
        mut debit: Account,
        mut credit: Account,
    ) {
        let transfer = Transfer { amount, timestamp, ..*t };
        if t.flags.contains(TransferFlags::PENDING) {
            debit.debits_pending += amount;
            credit.credits_pending += amount;
            self.put_pending_status(t.id, PendingStatus::Pending);
            if t.timeout > 0 {
                self.put_expiry((timestamp + u64::from(t.timeout) * NANOS_PER_SECOND, t.id));
            }
        } else {
            debit.debits_posted += amount;
            credit.credits_posted += amount;
        }
        if t.flags.contains(TransferFlags::CLOSING_DEBIT) {
            debit.flags.0 |= AccountFlags::CLOSED;
        }
        if t.flags.contains(TransferFlags::CLOSING_CREDIT) {
            credit.flags.0 |= AccountFlags::CLOSED;
        }
        self.put_transfer(transfer);
        self.put_index(&debit, &transfer);
        self.put_index(&credit, &transfer);
        self.put_change(
            ChangeKind::of_transfer(transfer.flags),
            transfer.id,
            transfer.timestamp,
            &debit,
            &credit,
        );
        self.put_account(debit);
        self.put_account(credit);
    }

    fn post_or_void_pending_transfer(
        &mut self,
        t: &Transfer,
        timestamp: u64,
    ) -> Outcome<CreateTransferResult> {
        use CreateTransferResult as R;
        let result = post_or_void_precheck(t);
        if result != R::Ok {
            return Ok((result, 0));
        }
        let Some(p) = self.transfer(t.pending_id)? else {
            return Ok((R::PendingTransferNotFound, 0));
        };
        let status = self.pending_status(p.id)?;
        let amount = match post_or_void_check(t, &p, status, timestamp) {
            Ok(amount) => amount,
            Err(result) => return Ok((result, 0)),
        };
        let post = t.flags.contains(TransferFlags::POST_PENDING_TRANSFER);
        let mut debit = self.account(p.debit_account_id)?.expect("pending transfer's debit account");
        let mut credit = self.account(p.credit_account_id)?.expect("pending transfer's credit account");
        if t.flags.contains(TransferFlags::IMPORTED)
            && let Err(result) = imported_check(timestamp, self.work.meta.timestamp_last, &debit, &credit)
        {
            return Ok((result, 0));
        }
        if post && debit.flags.contains(AccountFlags::CLOSED) {
            return Ok((R::DebitAccountAlreadyClosed, 0));
        }
        if post && credit.flags.contains(AccountFlags::CLOSED) {
            return Ok((R::CreditAccountAlreadyClosed, 0));
        }

        let transfer = Transfer {
            id: t.id,
            debit_account_id: p.debit_account_id,
            credit_account_id: p.credit_account_id,
            amount,
            pending_id: p.id,
            user_data_128: if t.user_data_128 == 0 { p.user_data_128 } else { t.user_data_128 },
            user_data_64: if t.user_data_64 == 0 { p.user_data_64 } else { t.user_data_64 },
            user_data_32: if t.user_data_32 == 0 { p.user_data_32 } else { t.user_data_32 },
            timeout: 0,
            ledger: p.ledger,
            code: p.code,
            flags: t.flags,
            timestamp,
        };
        debit.debits_pending -= p.amount;
        credit.credits_pending -= p.amount;
        if post {
            // Cannot overflow: pending + posted + p.amount fit when the pending transfer was made.
            debit.debits_posted += amount;
            credit.credits_posted += amount;
        } else {
            if p.flags.contains(TransferFlags::CLOSING_DEBIT) {
                debit.flags.0 &= !AccountFlags::CLOSED;
            }
            if p.flags.contains(TransferFlags::CLOSING_CREDIT) {
                credit.flags.0 &= !AccountFlags::CLOSED;
            }
        }
        self.put_pending_status(p.id, if post { PendingStatus::Posted } else { PendingStatus::Voided });
        if p.timeout > 0 {
            self.delete_expiry((p.timestamp + u64::from(p.timeout) * NANOS_PER_SECOND, p.id));
        }
        self.put_transfer(transfer);
        self.put_index(&debit, &transfer);
        self.put_index(&credit, &transfer);
        self.put_change(
            ChangeKind::of_transfer(transfer.flags),
            transfer.id,
            transfer.timestamp,
            &debit,
            &credit,
        );
        self.put_account(debit);
        self.put_account(credit);
        Ok((R::Ok, timestamp))
    }

    fn transfer_exists(&self, t: &Transfer, e: &Transfer) -> Outcome<CreateTransferResult> {
        use CreateTransferResult as R;
        let result = if t.flags != e.flags {
            R::ExistsWithDifferentFlags
        } else if t.pending_id != e.pending_id {
            R::ExistsWithDifferentPendingId
        } else if t.timeout != e.timeout {
            R::ExistsWithDifferentTimeout
        } else if t.is_post_or_void() {
            let p = self.transfer(e.pending_id)?.expect("posted transfer's pending transfer");
            post_or_void_exists(t, e, &p)
        } else {
            transfer_exists_fields(t, e)
        };
        Ok((result, if result == R::Exists { e.timestamp } else { 0 }))
    }
}

/// What `execute_chains` needs to know of an event.
trait Event {
    fn linked(&self) -> bool;
    fn imported(&self) -> bool;
    fn timestamp(&self) -> u64;
}

impl Event for Account {
    fn linked(&self) -> bool {
        self.flags.contains(AccountFlags::LINKED)
    }
    fn imported(&self) -> bool {
        self.flags.contains(AccountFlags::IMPORTED)
    }
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

impl Event for Transfer {
    fn linked(&self) -> bool {
        self.flags.contains(TransferFlags::LINKED)
    }
    fn imported(&self) -> bool {
        self.flags.contains(TransferFlags::IMPORTED)
    }
    fn timestamp(&self) -> u64 {
        self.timestamp
    }
}

/// The codes `execute_chains` hands out itself.
trait ResultCode: Copy + PartialEq {
    const OK: Self;
    const LINKED_EVENT_FAILED: Self;
    const LINKED_EVENT_CHAIN_OPEN: Self;
    const IMPORTED_EVENT_EXPECTED: Self;
    const IMPORTED_EVENT_NOT_EXPECTED: Self;
    const TIMESTAMP_MUST_BE_ZERO: Self;
    const IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE: Self;
    const IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE: Self;
}

macro_rules! result_code {
    ($name:ident) => {
        impl ResultCode for $name {
            const OK: Self = $name::Ok;
            const LINKED_EVENT_FAILED: Self = $name::LinkedEventFailed;
            const LINKED_EVENT_CHAIN_OPEN: Self = $name::LinkedEventChainOpen;
            const IMPORTED_EVENT_EXPECTED: Self = $name::ImportedEventExpected;
            const IMPORTED_EVENT_NOT_EXPECTED: Self = $name::ImportedEventNotExpected;
            const TIMESTAMP_MUST_BE_ZERO: Self = $name::TimestampMustBeZero;
            const IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE: Self = $name::ImportedEventTimestampOutOfRange;
            const IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE: Self =
                $name::ImportedEventTimestampMustNotAdvance;
        }
    };
}

result_code!(CreateAccountResult);
result_code!(CreateTransferResult);

/// Where a batch's events get their timestamps.
#[derive(Clone, Copy)]
enum Clock {
    /// From the ledger: event `i` of the batch gets `first + i`.
    Assigned { first: u64 },
    /// From the events themselves (imported), each before `now`, the entry's proposed time.
    Imported { now: u64 },
}

/// Imported timestamps are below 2^63, as TigerBeetle's are.
const IMPORTED_TIMESTAMP_END: u64 = 1 << 63;

fn account_exists(a: &Account, e: &Account) -> (CreateAccountResult, u64) {
    use CreateAccountResult as R;
    let result = if a.flags != e.flags {
        R::ExistsWithDifferentFlags
    } else if a.user_data_128 != e.user_data_128 {
        R::ExistsWithDifferentUserData128
    } else if a.user_data_64 != e.user_data_64 {
        R::ExistsWithDifferentUserData64
    } else if a.user_data_32 != e.user_data_32 {
        R::ExistsWithDifferentUserData32
    } else if a.ledger != e.ledger {
        R::ExistsWithDifferentLedger
    } else if a.code != e.code {
        R::ExistsWithDifferentCode
    } else {
        return (R::Exists, e.timestamp);
    };
    (result, 0)
}

/// Field comparisons of a re-submitted new transfer. A balancing transfer stored the clamped
/// amount, so any request for at least that much is the same request.
fn transfer_exists_fields(t: &Transfer, e: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    let balancing =
        t.flags.contains(TransferFlags::BALANCING_DEBIT) || t.flags.contains(TransferFlags::BALANCING_CREDIT);
    if t.debit_account_id != e.debit_account_id {
        R::ExistsWithDifferentDebitAccountId
    } else if t.credit_account_id != e.credit_account_id {
        R::ExistsWithDifferentCreditAccountId
    } else if if balancing { t.amount < e.amount } else { t.amount != e.amount } {
        R::ExistsWithDifferentAmount
    } else if t.user_data_128 != e.user_data_128 {
        R::ExistsWithDifferentUserData128
    } else if t.user_data_64 != e.user_data_64 {
        R::ExistsWithDifferentUserData64
    } else if t.user_data_32 != e.user_data_32 {
        R::ExistsWithDifferentUserData32
    } else if t.ledger != e.ledger {
        R::ExistsWithDifferentLedger
    } else if t.code != e.code {
        R::ExistsWithDifferentCode
    } else {
        R::Exists
    }
}

/// Field comparisons of a re-submitted post or void: zero fields were inherited from the pending
/// transfer `p`, so they match whatever was inherited.
fn post_or_void_exists(t: &Transfer, e: &Transfer, p: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    let amount_requested = resolve_post_or_void_amount(t, p);
    let inherited_differs = |requested: u128, stored: u128, pending: u128| {
        if requested == 0 { stored != pending } else { requested != stored }
    };
    if t.debit_account_id != 0 && t.debit_account_id != e.debit_account_id {
        R::ExistsWithDifferentDebitAccountId
    } else if t.credit_account_id != 0 && t.credit_account_id != e.credit_account_id {
        R::ExistsWithDifferentCreditAccountId
    } else if amount_requested != e.amount {
        R::ExistsWithDifferentAmount
    } else if inherited_differs(t.user_data_128, e.user_data_128, p.user_data_128) {
        R::ExistsWithDifferentUserData128
    } else if inherited_differs(t.user_data_64.into(), e.user_data_64.into(), p.user_data_64.into()) {
        R::ExistsWithDifferentUserData64
    } else if inherited_differs(t.user_data_32.into(), e.user_data_32.into(), p.user_data_32.into()) {
        R::ExistsWithDifferentUserData32
    } else if t.ledger != 0 && t.ledger != e.ledger {
        R::ExistsWithDifferentLedger
    } else if t.code != 0 && t.code != e.code {
        R::ExistsWithDifferentCode
    } else {
        R::Exists
    }
}

/// A void releases the whole amount (0 means "the pending amount"); a post moves `amount`, or the
/// whole pending amount when `amount` is `AMOUNT_MAX`.
fn resolve_post_or_void_amount(t: &Transfer, p: &Transfer) -> u128 {
    if t.flags.contains(TransferFlags::VOID_PENDING_TRANSFER) {
        if t.amount == 0 { p.amount } else { t.amount }
    } else if t.amount == AMOUNT_MAX {
        p.amount
    } else {
        t.amount
    }
}

/// The checks of a post or void that need no stored state.
fn post_or_void_precheck(t: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    use TransferFlags as F;
    let exclusive =
        F::PENDING | F::BALANCING_DEBIT | F::BALANCING_CREDIT | F::CLOSING_DEBIT | F::CLOSING_CREDIT;
    let both = t.flags.contains(F::POST_PENDING_TRANSFER) && t.flags.contains(F::VOID_PENDING_TRANSFER);
    if both || t.flags.0 & exclusive != 0 {
        R::FlagsAreMutuallyExclusive
    } else if t.pending_id == 0 {
        R::PendingIdMustNotBeZero
    } else if t.pending_id == ID_RESERVED_MAX {
        R::PendingIdMustNotBeIntMax
    } else if t.pending_id == t.id {
        R::PendingIdMustBeDifferent
    } else if t.timeout != 0 {
        R::TimeoutReservedForPendingTransfer
    } else {
        R::Ok
    }
}

/// The checks of a post or void against its pending transfer; `Ok` is the amount to settle.
fn post_or_void_check(
    t: &Transfer,
    p: &Transfer,
    status: Option<PendingStatus>,
    timestamp: u64,
) -> Result<u128, CreateTransferResult> {
    use CreateTransferResult as R;
    if !p.flags.contains(TransferFlags::PENDING) {
        return Err(R::PendingTransferNotPending);
    }
    if t.debit_account_id != 0 && t.debit_account_id != p.debit_account_id {
        return Err(R::PendingTransferHasDifferentDebitAccountId);
    }
    if t.credit_account_id != 0 && t.credit_account_id != p.credit_account_id {
        return Err(R::PendingTransferHasDifferentCreditAccountId);
    }
    if t.ledger != 0 && t.ledger != p.ledger {
        return Err(R::PendingTransferHasDifferentLedger);
    }
    if t.code != 0 && t.code != p.code {
        return Err(R::PendingTransferHasDifferentCode);
    }
    let amount = resolve_post_or_void_amount(t, p);
    if amount > p.amount {
        return Err(R::ExceedsPendingTransferAmount);
    }
    if t.flags.contains(TransferFlags::VOID_PENDING_TRANSFER) && amount < p.amount {
        return Err(R::PendingTransferHasDifferentAmount);
    }
    match status.expect("pending transfer without a status") {
        PendingStatus::Pending => {}
        PendingStatus::Posted => return Err(R::PendingTransferAlreadyPosted),
        PendingStatus::Voided => return Err(R::PendingTransferAlreadyVoided),
        PendingStatus::Expired => return Err(R::PendingTransferExpired),
    }
    if p.timeout > 0 && p.timestamp + u64::from(p.timeout) * NANOS_PER_SECOND <= timestamp {
        return Err(R::PendingTransferExpired);
    }
    Ok(amount)
}

/// The checks of an imported transfer's timestamp against the ledger's last one and its accounts'.
fn imported_check(
    timestamp: u64,
    timestamp_last: u64,
    dr: &Account,
    cr: &Account,
) -> Result<(), CreateTransferResult> {
    use CreateTransferResult as R;
    if timestamp <= timestamp_last {
        return Err(R::ImportedEventTimestampMustNotRegress);
    }
    if timestamp <= dr.timestamp {
        return Err(R::ImportedEventTimestampMustPostdateDebitAccount);
    }
    if timestamp <= cr.timestamp {
        return Err(R::ImportedEventTimestampMustPostdateCreditAccount);
    }
    Ok(())
}

/// The checks of a new transfer that need no stored state.
fn new_transfer_precheck(t: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    use TransferFlags as F;
    if t.debit_account_id == 0 {
        R::DebitAccountIdMustNotBeZero
    } else if t.debit_account_id == ID_RESERVED_MAX {
        R::DebitAccountIdMustNotBeIntMax
    } else if t.credit_account_id == 0 {
        R::CreditAccountIdMustNotBeZero
    } else if t.credit_account_id == ID_RESERVED_MAX {
        R::CreditAccountIdMustNotBeIntMax
    } else if t.debit_account_id == t.credit_account_id {
        R::AccountsMustBeDifferent
    } else if t.pending_id != 0 {
        R::PendingIdMustBeZero
    } else if !t.flags.contains(F::PENDING) && t.timeout != 0 {
        R::TimeoutReservedForPendingTransfer
    } else if !t.flags.contains(F::PENDING) && t.flags.0 & (F::CLOSING_DEBIT | F::CLOSING_CREDIT) != 0 {
        R::ClosingTransferMustBePending
    } else if t.ledger == 0 {
        R::LedgerMustNotBeZero
    } else if t.code == 0 {
        R::CodeMustNotBeZero
    } else {
        R::Ok
    }
}

/// The checks of a new transfer against its accounts; `Ok` is the amount to move, after the
/// balancing clamp.
fn new_transfer_check(
    t: &Transfer,
    dr: &Account,
    cr: &Account,
    timestamp: u64,
    imported_after: Option<u64>,
) -> Result<u128, CreateTransferResult> {
    use CreateTransferResult as R;
    use TransferFlags as F;
    if dr.ledger != cr.ledger {
        return Err(R::AccountsMustHaveTheSameLedger);
    }
    if t.ledger != dr.ledger {
        return Err(R::TransferMustHaveTheSameLedgerAsAccounts);
    }
    if let Some(timestamp_last) = imported_after {
        imported_check(timestamp, timestamp_last, dr, cr)?;
        if t.timeout != 0 {
            return Err(R::ImportedEventTimeoutMustBeZero);
        }
    }
    if dr.flags.contains(AccountFlags::CLOSED) {
        return Err(R::DebitAccountAlreadyClosed);
    }
    if cr.flags.contains(AccountFlags::CLOSED) {
        return Err(R::CreditAccountAlreadyClosed);
    }
    let mut amount = t.amount;
    if t.flags.contains(F::BALANCING_DEBIT) {
        let debits = dr.debits_posted.saturating_add(dr.debits_pending);
        amount = amount.min(dr.credits_posted.saturating_sub(debits));
    }
    if t.flags.contains(F::BALANCING_CREDIT) {
        let credits = cr.credits_posted.saturating_add(cr.credits_pending);
        amount = amount.min(cr.debits_posted.saturating_sub(credits));
    }
    let overflows = |a: u128, b: u128| a.checked_add(b).is_none();
    if t.flags.contains(F::PENDING) {
        if overflows(amount, dr.debits_pending) {
            return Err(R::OverflowsDebitsPending);
        }
        if overflows(amount, cr.credits_pending) {
            return Err(R::OverflowsCreditsPending);
        }
    }
    if overflows(amount, dr.debits_posted) {
        return Err(R::OverflowsDebitsPosted);
    }
    if overflows(amount, cr.credits_posted) {
        return Err(R::OverflowsCreditsPosted);
    }
    // Pending plus posted never overflows on its own: every earlier transfer passed this check.
    if overflows(amount, dr.debits_pending + dr.debits_posted) {
        return Err(R::OverflowsDebits);
    }
    if overflows(amount, cr.credits_pending + cr.credits_posted) {
        return Err(R::OverflowsCredits);
    }
    if timestamp.checked_add(u64::from(t.timeout) * NANOS_PER_SECOND).is_none() {
        return Err(R::OverflowsTimeout);
    }
    if dr.debits_exceed_credits(amount) {
        return Err(R::ExceedsCredits);
    }
    if cr.credits_exceed_debits(amount) {
        return Err(R::ExceedsDebits);
    }
    Ok(amount)
}
