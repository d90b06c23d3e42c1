//! Node-to-node networking: the Raft RPC client (`raft`), who is at each end of it (`identity`),
//! the bounds on what a peer's messages may say (`bounds`),
//! the pool of long-lived channels for forwarded requests (`pool`), and how every outgoing channel is configured.

pub mod bounds;
pub mod identity;
pub mod pool;
pub mod raft;

use std::time::Duration;

use tonic::transport::Channel;

pub use pool::Pool;
pub use raft::{CLUSTER_HEADER, Network};

/// The largest gRPC message a node sends or accepts: an entry of 8189 transfers is about 1 MiB,
/// and group commit puts several batches in one entry.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// A lazily connected channel to `address` (host:port).
pub fn channel(address: &str) -> Result<Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("address {address}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_lazy())
}
