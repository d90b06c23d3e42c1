//! `ledger`: tally's accounting state machine, deterministic and storage-backed.
//!
//! How a batch flows through the crate:
//!
//! - `model` defines what a batch carries (`Batch` of `Account`s or `Transfer`s), the flags, and
//!   the result codes.
//! - `exec` holds `Ledger`, whose `apply` executes the batches of one Raft entry against an
//!   overlay of changes (`store::Changes`), rolling back failed linked chains, and commits the
//!   overlay to a `Store` in one atomic write together with a chained digest.
//! - `store` is the storage boundary; `mem::MemStore` here and `tally_store::RunStore` (the
//!   storage engine, a crate of its own) implement it with the same key space, described and
//!   encoded in `codec`.
//! - `query` serves lookups and per-account history from the store.
//! - `snapshot` exports the whole state as a checksummed stream, imports it, and computes the
//!   state digest replicas compare.
//!
//! There is no async, no clock, no randomness, no thread and no file here: time comes in as the leader's proposed
//! timestamp, and identical inputs give identical bytes.

pub mod checkpoint;
pub mod codec;
pub mod exec;
pub mod mem;
pub mod model;
pub mod query;
pub mod semantics;
pub mod snapshot;
pub mod store;

pub use checkpoint::Checkpointed;
pub use exec::Ledger;
pub use mem::MemStore;
pub use model::*;
pub use store::{Changes, Records, SharedStore, Store, StoreError, StoreResult};
