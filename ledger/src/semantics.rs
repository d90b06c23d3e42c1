//! Semantics versions: what applying an entry does belongs to the log, not to the binary
//! (DESIGN.md decision 16).
//!
//! The version is replicated state (`LedgerMeta::semantics`). A ledger starts at `GENESIS`;
//! an entry of its own (`Ledger::switch_semantics`) moves it to a later version, and every entry
//! after that is applied with that version's rules, on every replica, whichever build applies
//! it. A build applies every version up to `MAX` with its own rules, and a node refuses a
//! version past what it knows instead of applying it with other rules. The leader proposes a
//! switch only once every member runs a build that knows the new version, so a rolling upgrade
//! replaces binaries one at a time and the rules change for all at one index.
//!
//! The versions:
//! 1. The rules of the change-stream schema: each account created, transfer created and pending
//!    transfer expired leaves a change record; each expiry has a timestamp of its own. The digest
//!    of an entry hashes every write, the ledger meta in the storage layout of schema 4 among
//!    them, and moves with every entry of a time (a tick), even one that finds nothing due.
//! 2. As 1, but the digest follows the ledger's records alone: the meta is hashed with the
//!    semantics version in place of a storage layout's (a new layout is no longer a change of
//!    what entries do), and an entry that writes no record leaves the digest as it was (a tick
//!    that found nothing due, because a write expired it first, is not history).

/// The version a new ledger starts at: every build knows it.
pub const GENESIS: u32 = 1;
/// The newest version this build applies.
pub const MAX: u32 = 2;

/// Whether this build applies entries under `version`.
pub fn known(version: u32) -> bool {
    (GENESIS..=MAX).contains(&version)
}
