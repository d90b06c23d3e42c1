//! The persisted format: fixed-size little-endian records and big-endian keys.
//!
//! A serialized format is a promise, so it is versioned (`SCHEMA_VERSION`) and written in one
//! place. Records are little-endian because that is what every CPU we run on reads natively, and
//! TigerBeetle clients use the same 128-byte layouts. Keys are big-endian so that byte order is
//! numeric order: a range scan over `(account_id, timestamp)` is a scan in time.
//!
//! The logical key space: the records a snapshot carries and the state digest hashes, in this
//! order. Both stores present exactly these; how `RunStore` lays them out on disk is its own
//! business (crate `tally-store`).
//!
//! | prefix | key                           | value                                   |
//! |--------|-------------------------------|-----------------------------------------|
//! | `A`    | account id                    | account record (128 bytes)              |
//! | `C`    | event timestamp               | change record (145 bytes)               |
//! | `E`    | expires_at, pending id        | empty                                   |
//! | `I`    | account id, timestamp         | transfer id, then balances if `history` |
//! | `M`    | meta name                     | meta value                              |
//! | `P`    | pending transfer id           | status (1 byte)                         |
//! | `T`    | transfer timestamp            | transfer record (128 bytes)             |
//! | `X`    | id of a transfer that failed  | the transient result code (u32)         |

use crate::model::{
    Account, AccountBalance, AccountFlags, ChangeKind, ChangeRecord, CreateTransferResult, Transfer,
    TransferFlags,
};

/// Bumped whenever a record or key layout changes; stored in the state and in snapshots.
/// Version 2 keys transfers by timestamp (version 1: by id, one sled key per record); version 3
/// adds the ids of transfers that failed for a transient reason (`X`); version 4 the change
/// records (`C`), and gives each expiry a timestamp of its own; version 5 stores the semantics
/// version in the ledger meta.
pub const SCHEMA_VERSION: u32 = 5;
/// The versions this build reads: a version 2 state is a version 3 state without failed ids, a
/// version 3 state one without change records (its change stream starts at its upgrade), a
/// version 4 state one at semantics 1; each is written as version 5 from its next entry on. A
/// build that reads only older versions refuses a newer state, rather than dropping what it does
/// not know from the snapshots it sends.
pub const SCHEMA_VERSIONS_READ: [u32; 4] = [2, 3, 4, 5];

pub const RECORD_BYTES: usize = 128;
pub const BALANCE_BYTES: usize = 64;

pub const PREFIX_ACCOUNT: u8 = b'A';
pub const PREFIX_CHANGE: u8 = b'C';
/// A change record: kind (u8), id (u128), then the debit and the credit account's four balances,
/// each a LEB128 varint (balances are mostly far below 2^128: 145 fixed bytes cost the write
/// path a sixth of its throughput, varints about a third as many bytes). At most this long.
pub const CHANGE_BYTES_MAX: usize = 1 + 16 + 8 * 19;
pub const PREFIX_EXPIRY: u8 = b'E';
pub const PREFIX_INDEX: u8 = b'I';
pub const PREFIX_META: u8 = b'M';
pub const PREFIX_PENDING: u8 = b'P';
pub const PREFIX_TRANSFER: u8 = b'T';
pub const PREFIX_FAILED: u8 = b'X';

/// The ledger's own bookkeeping: schema version, last timestamp, batch count, running digest.
pub const META_LEDGER_KEY: &[u8] = b"Mledger";
/// Opaque bytes owned by the embedding application (raft-node keeps its applied log id here),
/// written in the same atomic batch as the state they describe.
pub const META_APP_KEY: &[u8] = b"Mapp";

pub type IdKey = [u8; 17];
pub type IndexKey = [u8; 25];
pub type TransferKey = [u8; 9];
pub type ExpiryKey = [u8; 25];

pub fn id_key(prefix: u8, id: u128) -> IdKey {
    let mut key = [0u8; 17];
    key[0] = prefix;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// A transfer's logical key: its timestamp, so that the stream lists transfers in the order they
/// were created, which is how they are stored.
pub fn transfer_key(timestamp: u64) -> TransferKey {
    let mut key = [0u8; 9];
    key[0] = PREFIX_TRANSFER;
    key[1..].copy_from_slice(&timestamp.to_be_bytes());
    key
}

/// A change record's logical key: its event's timestamp.
pub fn change_key(timestamp: u64) -> TransferKey {
    let mut key = [0u8; 9];
    key[0] = PREFIX_CHANGE;
    key[1..].copy_from_slice(&timestamp.to_be_bytes());
    key
}

pub fn encode_change(change: &ChangeRecord) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CHANGE_BYTES_MAX);
    encode_change_into(change, &mut bytes);
    bytes
}

/// `encode_change`, appended to `bytes`.
pub fn encode_change_into(change: &ChangeRecord, bytes: &mut Vec<u8>) {
    bytes.push(change.kind as u8);
    bytes.extend_from_slice(&change.id.to_le_bytes());
    for balance in [&change.debit, &change.credit] {
        for value in
            [balance.debits_pending, balance.debits_posted, balance.credits_pending, balance.credits_posted]
        {
            put_varint(bytes, value);
        }
    }
}

/// `None` if the bytes are not a change record.
pub fn decode_change(timestamp: u64, bytes: &[u8]) -> Option<ChangeRecord> {
    let kind = ChangeKind::from_u8(*bytes.first()?)?;
    let id = u128::from_le_bytes(bytes.get(1..17)?.try_into().ok()?);
    let mut rest = &bytes[17..];
    let mut values = [0u128; 8];
    for value in &mut values {
        *value = take_varint(&mut rest)?;
    }
    if !rest.is_empty() {
        return None;
    }
    let balance = |v: &[u128]| AccountBalance {
        debits_pending: v[0],
        debits_posted: v[1],
        credits_pending: v[2],
        credits_posted: v[3],
        timestamp,
    };
    Some(ChangeRecord { timestamp, kind, id, debit: balance(&values[..4]), credit: balance(&values[4..]) })
}

/// LEB128: seven bits a byte, low first, the high bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, mut value: u128) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `None` for a varint cut short, longer than a u128, or not in its shortest form.
fn take_varint(bytes: &mut &[u8]) -> Option<u128> {
    let mut value = 0u128;
    for (position, byte) in bytes.iter().enumerate().take(19) {
        let bits = u128::from(byte & 0x7f);
        let shift = 7 * position as u32;
        if shift == 126 && bits > 0b11 {
            return None;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            if position > 0 && *byte == 0 {
                return None;
            }
            *bytes = &bytes[position + 1..];
            return Some(value);
        }
    }
    None
}

pub fn index_key(account_id: u128, timestamp: u64) -> IndexKey {
    let mut key = [0u8; 25];
    key[0] = PREFIX_INDEX;
    key[1..17].copy_from_slice(&account_id.to_be_bytes());
    key[17..].copy_from_slice(&timestamp.to_be_bytes());
    key
}

pub fn decode_index_key(key: &[u8]) -> (u128, u64) {
    assert_eq!(key.len(), 25, "index key length");
    (u128_be(&key[1..17]), u64::from_be_bytes(key[17..25].try_into().unwrap()))
}

pub fn expiry_key(expires_at: u64, pending_id: u128) -> ExpiryKey {
    let mut key = [0u8; 25];
    key[0] = PREFIX_EXPIRY;
    key[1..9].copy_from_slice(&expires_at.to_be_bytes());
    key[9..].copy_from_slice(&pending_id.to_be_bytes());
    key
}

pub fn decode_expiry_key(key: &[u8]) -> (u64, u128) {
    assert_eq!(key.len(), 25, "expiry key length");
    (u64::from_be_bytes(key[1..9].try_into().unwrap()), u128_be(&key[9..25]))
}

fn u128_be(bytes: &[u8]) -> u128 {
    u128::from_be_bytes(bytes.try_into().unwrap())
}

/// A little-endian cursor over a fixed record; panics on a short record, which is corruption.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, tail) = self.bytes.split_at(N);
        self.bytes = tail;
        head.try_into().unwrap()
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
}

struct Writer<'a> {
    bytes: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, value: &[u8]) {
        self.bytes[self.at..self.at + value.len()].copy_from_slice(value);
        self.at += value.len();
    }
}

pub fn encode_account(account: &Account) -> [u8; RECORD_BYTES] {
    let mut bytes = [0u8; RECORD_BYTES];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&account.id.to_le_bytes());
    w.put(&account.debits_pending.to_le_bytes());
    w.put(&account.debits_posted.to_le_bytes());
    w.put(&account.credits_pending.to_le_bytes());
    w.put(&account.credits_posted.to_le_bytes());
    w.put(&account.user_data_128.to_le_bytes());
    w.put(&account.user_data_64.to_le_bytes());
    w.put(&account.user_data_32.to_le_bytes());
    // Four reserved bytes, zero, where TigerBeetle keeps its `reserved` field.
    w.put(&[0u8; 4]);
    w.put(&account.ledger.to_le_bytes());
    w.put(&account.code.to_le_bytes());
    w.put(&account.flags.0.to_le_bytes());
    w.put(&account.timestamp.to_le_bytes());
    assert_eq!(w.at, RECORD_BYTES);
    bytes
}

pub fn decode_account(bytes: &[u8]) -> Account {
    assert_eq!(bytes.len(), RECORD_BYTES, "account record length");
    let mut r = Reader { bytes };
    let id = r.u128();
    let debits_pending = r.u128();
    let debits_posted = r.u128();
    let credits_pending = r.u128();
    let credits_posted = r.u128();
    let user_data_128 = r.u128();
    let user_data_64 = r.u64();
    let user_data_32 = r.u32();
    let reserved = r.u32();
    assert_eq!(reserved, 0, "account record reserved bytes");
    Account {
        id,
        debits_pending,
        debits_posted,
        credits_pending,
        credits_posted,
        user_data_128,
        user_data_64,
        user_data_32,
        ledger: r.u32(),
        code: r.u16(),
        flags: AccountFlags(r.u16()),
        timestamp: r.u64(),
    }
}

pub fn encode_transfer(transfer: &Transfer) -> [u8; RECORD_BYTES] {
    let mut bytes = [0u8; RECORD_BYTES];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&transfer.id.to_le_bytes());
    w.put(&transfer.debit_account_id.to_le_bytes());
    w.put(&transfer.credit_account_id.to_le_bytes());
    w.put(&transfer.amount.to_le_bytes());
    w.put(&transfer.pending_id.to_le_bytes());
    w.put(&transfer.user_data_128.to_le_bytes());
    w.put(&transfer.user_data_64.to_le_bytes());
    w.put(&transfer.user_data_32.to_le_bytes());
    w.put(&transfer.timeout.to_le_bytes());
    w.put(&transfer.ledger.to_le_bytes());
    w.put(&transfer.code.to_le_bytes());
    w.put(&transfer.flags.0.to_le_bytes());
    w.put(&transfer.timestamp.to_le_bytes());
    assert_eq!(w.at, RECORD_BYTES);
    bytes
}

pub fn decode_transfer(bytes: &[u8]) -> Transfer {
    assert_eq!(bytes.len(), RECORD_BYTES, "transfer record length");
    let mut r = Reader { bytes };
    Transfer {
        id: r.u128(),
        debit_account_id: r.u128(),
        credit_account_id: r.u128(),
        amount: r.u128(),
        pending_id: r.u128(),
        user_data_128: r.u128(),
        user_data_64: r.u64(),
        user_data_32: r.u32(),
        timeout: r.u32(),
        ledger: r.u32(),
        code: r.u16(),
        flags: TransferFlags(r.u16()),
        timestamp: r.u64(),
    }
}

/// The value of an index entry, encoded in place (two of them per transfer: no allocation).
pub struct IndexValue {
    bytes: [u8; 16 + BALANCE_BYTES],
    length: usize,
}

impl std::ops::Deref for IndexValue {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.length]
    }
}

/// The value of an index entry: the transfer id, then the account's balances after the transfer
/// when the account keeps history.
pub fn encode_index_value(transfer_id: u128, balance: Option<&AccountBalance>) -> IndexValue {
    let mut bytes = [0u8; 16 + BALANCE_BYTES];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&transfer_id.to_le_bytes());
    if let Some(balance) = balance {
        w.put(&balance.debits_pending.to_le_bytes());
        w.put(&balance.debits_posted.to_le_bytes());
        w.put(&balance.credits_pending.to_le_bytes());
        w.put(&balance.credits_posted.to_le_bytes());
    }
    let length = w.at;
    IndexValue { bytes, length }
}

/// Decodes an index value; the balance's timestamp is the index key's.
pub fn decode_index_value(value: &[u8], timestamp: u64) -> (u128, Option<AccountBalance>) {
    let mut r = Reader { bytes: value };
    let transfer_id = r.u128();
    let balance = match value.len() {
        16 => None,
        80 => Some(AccountBalance {
            debits_pending: r.u128(),
            debits_posted: r.u128(),
            credits_pending: r.u128(),
            credits_posted: r.u128(),
            timestamp,
        }),
        length => panic!("index value of {length} bytes"),
    };
    (transfer_id, balance)
}

/// The ledger's bookkeeping, stored under `META_LEDGER_KEY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerMeta {
    /// The timestamp of the newest event; the next event gets a larger one.
    pub timestamp_last: u64,
    /// How many batches were applied since the ledger was created.
    pub batches_applied: u64,
    /// blake3 over every change ever applied, chained: equal digests mean equal histories.
    pub digest: [u8; 32],
    /// The rules entries are applied with (`crate::semantics`): replicated state, switched by
    /// an entry of its own (`Ledger::switch_semantics`).
    pub semantics: u32,
}

impl Default for LedgerMeta {
    fn default() -> LedgerMeta {
        LedgerMeta {
            timestamp_last: 0,
            batches_applied: 0,
            digest: [0; 32],
            semantics: crate::semantics::GENESIS,
        }
    }
}

pub const LEDGER_META_BYTES: usize = 4 + 8 + 8 + 32 + 4;
/// The meta of schema versions 2 to 4: no semantics version (1).
const LEDGER_META_BYTES_V4: usize = 4 + 8 + 8 + 32;

pub fn encode_ledger_meta(meta: &LedgerMeta) -> [u8; LEDGER_META_BYTES] {
    let mut bytes = [0u8; LEDGER_META_BYTES];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&SCHEMA_VERSION.to_le_bytes());
    w.put(&meta.timestamp_last.to_le_bytes());
    w.put(&meta.batches_applied.to_le_bytes());
    w.put(&meta.digest);
    w.put(&meta.semantics.to_le_bytes());
    bytes
}

/// The ledger meta as semantics 1 hashes it into the digest: the schema 4 layout, with its
/// version number, whatever layout the store writes. (Semantics 1 hashed the stored bytes, so a
/// change of storage layout changed every digest; semantics 2 hashes `encode_meta_for_digest`.)
pub fn encode_ledger_meta_v4(meta: &LedgerMeta) -> [u8; LEDGER_META_BYTES_V4] {
    let mut bytes = [0u8; LEDGER_META_BYTES_V4];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&4u32.to_le_bytes());
    w.put(&meta.timestamp_last.to_le_bytes());
    w.put(&meta.batches_applied.to_le_bytes());
    w.put(&meta.digest);
    bytes
}

/// The ledger meta as semantics 2 hashes it: the semantics version, not a storage layout's.
pub fn encode_meta_for_digest(meta: &LedgerMeta) -> [u8; LEDGER_META_BYTES_V4] {
    let mut bytes = [0u8; LEDGER_META_BYTES_V4];
    let mut w = Writer { bytes: &mut bytes, at: 0 };
    w.put(&meta.semantics.to_le_bytes());
    w.put(&meta.timestamp_last.to_le_bytes());
    w.put(&meta.batches_applied.to_le_bytes());
    w.put(&meta.digest);
    bytes
}

/// Decodes the ledger meta; `Err` carries the schema version found when it is not ours.
pub fn decode_ledger_meta(bytes: &[u8]) -> Result<LedgerMeta, u32> {
    let mut r = Reader { bytes };
    let version = if bytes.len() >= 4 { r.u32() } else { 0 };
    if !SCHEMA_VERSIONS_READ.contains(&version) {
        return Err(version);
    }
    let expected = if version == SCHEMA_VERSION { LEDGER_META_BYTES } else { LEDGER_META_BYTES_V4 };
    if bytes.len() != expected {
        return Err(version);
    }
    let (timestamp_last, batches_applied, digest) = (r.u64(), r.u64(), r.take());
    let semantics = if version == SCHEMA_VERSION { r.u32() } else { 1 };
    Ok(LedgerMeta { timestamp_last, batches_applied, digest, semantics })
}

/// The value of a failed id (`X`): the transient result code it failed with.
pub fn encode_failed(result: CreateTransferResult) -> [u8; 4] {
    (result as u32).to_le_bytes()
}

/// `None` unless `bytes` is a transient result code.
pub fn decode_failed(bytes: &[u8]) -> Option<CreateTransferResult> {
    let code = u32::from_le_bytes(bytes.try_into().ok()?);
    CreateTransferResult::from_u32(code).filter(|result| result.is_transient())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_records_round_trip_and_refuse_what_is_not_one() {
        let balance = |v: u128| AccountBalance {
            debits_pending: v,
            debits_posted: v / 3,
            credits_pending: 0,
            credits_posted: 127,
            timestamp: 9,
        };
        for value in [0, 1, 127, 128, 300, u64::MAX as u128, 1 << 126, u128::MAX] {
            let change = ChangeRecord {
                timestamp: 9,
                kind: ChangeKind::TwoPhasePosted,
                id: value ^ 5,
                debit: balance(value),
                credit: balance(!value),
            };
            let bytes = encode_change(&change);
            assert!(bytes.len() <= CHANGE_BYTES_MAX);
            assert_eq!(decode_change(9, &bytes), Some(change), "{value}");
            for cut in 0..bytes.len() {
                assert_eq!(decode_change(9, &bytes[..cut]), None, "{value} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_change(9, &longer), None);
        }
        // A varint not in its shortest form, one past 128 bits, an unknown kind.
        let zero = encode_change(&ChangeRecord {
            timestamp: 1,
            kind: ChangeKind::AccountCreated,
            id: 3,
            debit: AccountBalance::default(),
            credit: AccountBalance::default(),
        });
        let mut padded = zero[..17].to_vec();
        padded.extend_from_slice(&[0x80, 0x00]);
        padded.extend_from_slice(&[0; 7]);
        assert_eq!(decode_change(1, &padded), None);
        let mut too_long = zero[..17].to_vec();
        too_long.extend_from_slice(&[0xff; 18]);
        too_long.push(0x04);
        too_long.extend_from_slice(&[0; 7]);
        assert_eq!(decode_change(1, &too_long), None);
        let mut unknown = zero.clone();
        unknown[0] = 7;
        assert_eq!(decode_change(1, &unknown), None);
    }
}
