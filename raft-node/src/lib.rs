//! `raft-node`: one tally node.
//!
//! How a write flows through the modules:
//!
//! - `service::LedgerService` receives a `CreateTransfers` call, checks its shape (`convert`) and,
//!   on the leader, hands the batch to the `batcher`; a follower forwards it to the leader.
//! - `batcher::Batcher` coalesces concurrent batches into one Raft entry (`types::Request`) and
//!   proposes it with `openraft::Raft::client_write`, once the follower that would take over
//!   from it keeps up in applying (`pace`).
//! - openraft appends the entry through `log_store::LogStore` to the write-ahead log (`wal`),
//!   which fsyncs groups of appends, and replicates it through `network` to the other nodes'
//!   `service::RaftService`.
//! - Once committed, every node applies it in `state_machine::StateMachine`, which runs
//!   `ledger::Ledger::apply` in memory (checkpointed to its store) and returns each batch's results to the batcher's callers.
//!
//! - The timestamp the batcher proposes is the leader's clock bounded by a majority of the
//!   voters' clocks (`clock`); a leader whose clock is off does not stamp.
//!
//! `node` wires it together (data directory, Raft, gRPC server, shutdown) and `cli` is the
//! `tally` command line.

pub mod backup;
pub mod batcher;
pub mod bounds;
// The command line and the real-process test cluster are not the simulator's: its build
// (`sim` feature) leaves them out, a quarter of the crate's compile time in CI.
#[cfg(not(feature = "sim"))]
pub mod cli;
pub mod clock;
pub mod convert;
pub mod metrics;
pub mod net;
pub mod node;
pub mod pace;
pub mod rt;
pub mod security;
pub mod service;
pub mod storage;
pub mod sys;
#[cfg(not(feature = "sim"))]
pub mod testkit;
pub mod types;
