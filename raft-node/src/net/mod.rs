//! Node-to-node networking: the Raft RPC client (`raft`, pipelined replication in `append_stream`), who is at each end of it (`identity`),
//! the bounds on what a peer's messages may say (`bounds`), which peers answer (`reach`),
//! the pool of long-lived channels for forwarded requests (`pool`), and how every outgoing channel is configured.

pub mod append_stream;
pub mod identity;
pub mod pool;
pub mod raft;
pub mod reach;

use std::sync::Arc;

use tonic::transport::Channel;

pub use pool::Pool;
pub use raft::{CLUSTER_HEADER, Network};

/// The largest gRPC message a node sends or accepts: an entry of 8189 transfers is about 1 MiB,
/// and group commit puts several batches in one entry.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
// Replication sends at most this much of the log per message, with room to spare.
const _: () = assert!(crate::storage::log_store::APPEND_ENTRIES_BYTES_MAX * 4 <= MESSAGE_BYTES_MAX as u64);

/// A lazily connected channel to the peer door at `address` (host:port), over TLS with this
/// node's certificate (unless `--insecure`), to node `expect` when given.
pub fn channel(
    address: &str,
    tls: Option<&Arc<crate::security::tls::Tls>>,
    expect: Option<crate::types::NodeId>,
) -> Result<Channel, String> {
    crate::security::doors::peer_channel(address, tls, expect)
}
