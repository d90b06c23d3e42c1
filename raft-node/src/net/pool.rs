//! Long-lived channels to other nodes, one per address, for forwarded client requests, status
//! fan-out and membership calls. A tonic `Channel` multiplexes concurrent calls over one HTTP/2
//! connection and reconnects by itself, so one per peer serves every request: a connection per
//! forwarded request left 1,150 sockets in TIME_WAIT after 4 s of 16 clients.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

use crate::security::tls::Tls;

/// Distinct peer addresses kept; past it the pool starts over (addresses change only with
/// membership, so this is reached only by churn, and dropping idle channels is harmless).
pub const POOL_ADDRESSES_MAX: usize = 256;

pub struct Pool {
    /// A std mutex: held only to clone or insert a channel, never across an await.
    channels: Mutex<BTreeMap<String, Channel>>,
    tls: Option<Arc<Tls>>,
}

impl Pool {
    /// Channels over TLS with `tls` (None: plaintext, `--insecure`).
    pub fn new(tls: Option<Arc<Tls>>) -> Pool {
        Pool { channels: Mutex::default(), tls }
    }

    /// The channel to `address` (host:port), made on first use; connects lazily.
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        if channels.len() >= POOL_ADDRESSES_MAX {
            channels.clear();
        }
        let channel = super::channel(address, self.tls.as_ref(), None)?;
        channels.insert(address.to_string(), channel.clone());
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
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:1").unwrap();
        pool.channel("127.0.0.1:2").unwrap();
        assert_eq!(pool.len(), 2);
        for port in 0..POOL_ADDRESSES_MAX {
            pool.channel(&format!("127.0.0.1:{}", 10_000 + port)).unwrap();
        }
        assert!(pool.len() <= POOL_ADDRESSES_MAX);
        assert!(pool.channel("not an address").is_err());
    }
}
