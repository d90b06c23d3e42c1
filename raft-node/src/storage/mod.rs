//! What a node keeps on disk: the write-ahead log (`wal`, the Raft log, with a record index per
//! sealed segment, `segment_index`), openraft's log store
//! over it (`log_store`), and the ledger state machine on its store with its snapshots
//! (`state_machine`).

pub mod log_store;
mod segment_index;
pub mod state_machine;
pub mod wal;
