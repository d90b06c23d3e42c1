//! Long-lived channels to other nodes, one per address, for forwarded client requests, status
//! fan-out and membership calls. A tonic `Channel` multiplexes concurrent calls over one HTTP/2
//! connection and reconnects by itself, so one per peer serves every request: a connection per
//! forwarded request left 1,150 sockets in TIME_WAIT after 4 s of 16 clients.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

use crate::security::tls::Tls;
use crate::types::NodeId;

/// Distinct peer addresses kept; past it the pool starts over (addresses change only with
/// membership, so this is reached only by churn, and dropping idle channels is harmless).
pub const POOL_ADDRESSES_MAX: usize = 256;

pub struct Pool {
    /// By address and the node expected there. A std mutex: held only to clone or insert a
    /// channel, never across an await.
    channels: Mutex<BTreeMap<(String, Option<NodeId>), Channel>>,
    tls: Option<Arc<Tls>>,
}

impl Pool {
    /// Channels over TLS with `tls` (None: plaintext, `--insecure`).
    pub fn new(tls: Option<Arc<Tls>>) -> Pool {
        Pool { channels: Mutex::default(), tls }
    }

    /// The channel to node `node` at `address` (host:port), made on first use; connects lazily.
    /// With TLS, a connection to a peer whose certificate names another node is refused: a
    /// forwarded write, a membership change or a status asked of node 2 reaches node 2, not
    /// whoever answers at an address the membership (or a stale route) gives for it. `None`
    /// only where the node is not known yet (`--join`: any member will do).
    pub fn channel(&self, node: Option<NodeId>, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap();
        let key = (address.to_string(), node);
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        if channels.len() >= POOL_ADDRESSES_MAX {
            channels.clear();
        }
        let channel = super::channel(address, self.tls.as_ref(), node)?;
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    pub fn len(&self) -> usize {
        self.channels.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_channel_per_address_and_a_bounded_count() {
        let pool = Pool::new(None);
        pool.channel(Some(1), "127.0.0.1:1").unwrap();
        pool.channel(Some(1), "127.0.0.1:1").unwrap();
        pool.channel(Some(2), "127.0.0.1:2").unwrap();
        assert_eq!(pool.len(), 2);
        pool.channel(Some(3), "127.0.0.1:2").unwrap();
        assert_eq!(pool.len(), 3, "another node expected at an address is another channel");
        for port in 0..POOL_ADDRESSES_MAX {
            pool.channel(None, &format!("127.0.0.1:{}", 10_000 + port)).unwrap();
        }
        assert!(pool.len() <= POOL_ADDRESSES_MAX);
        assert!(pool.channel(None, "not an address").is_err());
    }
}
