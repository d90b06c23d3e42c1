//! The gRPC services every node serves: `Ledger` (clients), `Cluster` (operators) and `Raft`
//! (other nodes only).

pub mod cluster;
mod ledger;
mod raft;
mod serve;

pub use cluster::{ClusterService, site_status};
pub use ledger::{LEDGER_REQUEST_BYTES_MAX, LedgerService};
pub use raft::{RaftService, refuse_strangers};
pub use serve::{
    CLIENT_STREAMS_PER_CONNECTION_MAX, STREAMS_PER_CONNECTION_MAX, serve, serve_on, shutdown_signal,
};
