//! What a node keeps on disk: the write-ahead log (`wal`, the Raft log: its format, recovery,
//! sync plans and a record index per sealed segment), openraft's log store over it
//! (`log_store`), the ledger state machine on its store with its snapshots (`state_machine`),
//! and the small files kept durably beside them (`files`).

/// Raft over this node's storage: the handle the rest of the node drives.
pub type Raft = openraft::Raft<crate::types::TypeConfig, state_machine::StateMachine>;

pub mod files;
pub mod log_store;
pub mod state_machine;
pub mod wal;
