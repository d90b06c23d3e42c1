//! What a node keeps on disk: the write-ahead log (`wal`, the Raft log), openraft's log store
//! over it (`log_store`), and the ledger state machine on its store with its snapshots
//! (`state_machine`).

pub mod log_store;
pub mod state_machine;
pub mod wal;
