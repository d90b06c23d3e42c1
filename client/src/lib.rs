//! `tally-client`: a Rust client for tally's `tally.v1.Ledger` API.
//!
//! For now it re-exports the generated stubs; the replicated-node issue grows it into a client
//! with a node list, leader discovery, deadlines and idempotent retries.

pub use tally_proto::v1;
