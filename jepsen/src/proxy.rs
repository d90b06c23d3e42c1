//! Fault-injecting TCP proxies, one per directed link between two nodes.
//!
//! Node `a` reaches node `b` only through the proxy of link `a -> b` (the harness starts `a` with
//! `--route b=<that proxy>`), so that link can be cut or slowed without touching the others, and
//! without root. A link carries every connection `a` opens to `b`, both ways: `a`'s requests
//! and `b`'s answers. Cutting `a -> b` alone is a one-way partition: `a` cannot reach `b`, while
//! `b` still reaches `a` over `b -> a`.
//!
//! A cut link behaves like a network that drops packets, not one that refuses them: bytes in
//! either direction are silently discarded, new connections are accepted and then hear nothing,
//! and no reset is sent. When the link heals, the connections that lost bytes are closed (their
//! streams are broken), so the endpoints reconnect. Latency delays every chunk by the link's
//! delay, in order, without limiting throughput.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a link does to traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    pub cut: bool,
    pub latency: Duration,
}

struct Link {
    listen: SocketAddr,
    state: watch::Sender<LinkState>,
    task: tokio::task::JoinHandle<()>,
}

/// Every directed link between a set of nodes.
pub struct Proxies {
    links: BTreeMap<(u64, u64), Link>,
}

impl Proxies {
    /// Starts a proxy for every ordered pair of `targets` (node id -> its listening address).
    pub async fn start(targets: &BTreeMap<u64, SocketAddr>) -> Result<Proxies, String> {
        let mut links = BTreeMap::new();
        for (&from, _) in targets.iter() {
            for (&to, &target) in targets.iter().filter(|(to, _)| **to != from) {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| format!("cannot bind a proxy port on 127.0.0.1: {e}"))?;
                let listen = listener.local_addr().map_err(|e| e.to_string())?;
                let (state, watcher) = watch::channel(LinkState::default());
                let task = tokio::spawn(accept_loop(listener, target, watcher));
                links.insert((from, to), Link { listen, state, task });
            }
        }
        Ok(Proxies { links })
    }

    /// The address node `from` must use to reach node `to`.
    pub fn address(&self, from: u64, to: u64) -> SocketAddr {
        self.links[&(from, to)].listen
    }

    pub fn set(&self, from: u64, to: u64, change: impl FnOnce(&mut LinkState)) {
        if let Some(link) = self.links.get(&(from, to)) {
            link.state.send_modify(change);
        }
    }

    pub fn state(&self, from: u64, to: u64) -> LinkState {
        self.links.get(&(from, to)).map(|link| *link.state.borrow()).unwrap_or_default()
    }

    /// Links leaving or entering any of `nodes`, from or to a node outside them.
    pub fn links_across(&self, nodes: &[u64], outbound: bool, inbound: bool) -> Vec<(u64, u64)> {
        self.links
            .keys()
            .copied()
            .filter(|(from, to)| {
                (outbound && nodes.contains(from) && !nodes.contains(to))
                    || (inbound && !nodes.contains(from) && nodes.contains(to))
            })
            .collect()
    }

    /// Heals every cut; latencies stay.
    pub fn heal_all(&self) {
        for link in self.links.values() {
            link.state.send_modify(|state| state.cut = false);
        }
    }

    /// Sets the latency of every link between two different sites.
    pub fn set_latency_between_sites(&self, site_of: &BTreeMap<u64, String>, latency: Duration) {
        for (&(from, to), link) in &self.links {
            if site_of.get(&from) != site_of.get(&to) {
                link.state.send_modify(|state| state.latency = latency);
            }
        }
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for link in self.links.values() {
            link.task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, state: watch::Receiver<LinkState>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((inbound, _)) = accepted {
                    connections.spawn(connection(inbound, target, state.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Dropping the JoinSet (when this task is aborted) aborts every connection.
}

/// Waits until the link is not cut; `Err` if the watch closed (the proxy is going away).
async fn wait_until_healed(state: &mut watch::Receiver<LinkState>) -> Result<(), ()> {
    state.wait_for(|s| !s.cut).await.map(|_| ()).map_err(|_| ())
}

/// One proxied connection. Connects to the target only while the link is up; a connection
/// accepted during a cut hears nothing and is closed when the link heals.
async fn connection(inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    if state.borrow().cut {
        let _ = wait_until_healed(&mut state).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    // Either direction ending (EOF, error, or a healed cut) ends the connection.
    tokio::select! {
        _ = pump(in_read, out_write, state.clone()) => {}
        _ = pump(out_read, in_write, state) => {}
    }
}

/// Copies one direction through a delay line, dropping bytes while the link is cut. Returns
/// when the source closes, a write fails, or the link heals after having dropped bytes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
) {
    let (line, delayed) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(deliver(delayed, to));
    let mut buffer = vec![0u8; 64 * 1024];
    let mut last_due = Instant::now();
    let mut dropped = false;
    loop {
        tokio::select! {
            read = from.read(&mut buffer) => {
                let Ok(count @ 1..) = read else { break };
                let now = *state.borrow();
                if now.cut {
                    dropped = true;
                    continue;
                }
                last_due = last_due.max(Instant::now() + now.latency);
                if line.send((last_due, buffer[..count].to_vec())).is_err() {
                    break;
                }
            }
            changed = state.changed() => {
                if changed.is_err() || (dropped && !state.borrow().cut) {
                    break;
                }
            }
        }
    }
    drop(line);
    writer.abort();
}

async fn deliver(
    mut delayed: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    while let Some((due, bytes)) = delayed.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&bytes).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8], within: Duration) -> Option<Vec<u8>> {
        stream.write_all(text).await.ok()?;
        let mut got = vec![0u8; text.len()];
        tokio::time::timeout(within, stream.read_exact(&mut got)).await.ok()?.ok()?;
        Some(got)
    }

    async fn two_nodes() -> Proxies {
        let targets = BTreeMap::from([(1, echo_server().await), (2, echo_server().await)]);
        Proxies::start(&targets).await.unwrap()
    }

    #[tokio::test]
    async fn forwards_until_cut_then_drops_silently_then_heals() {
        let proxies = two_nodes().await;
        let mut stream = TcpStream::connect(proxies.address(1, 2)).await.unwrap();
        assert_eq!(
            round_trip(&mut stream, b"hello", Duration::from_secs(5)).await.as_deref(),
            Some(&b"hello"[..])
        );

        proxies.set(1, 2, |s| s.cut = true);
        // Silence, not a reset: the write succeeds and no answer comes.
        assert_eq!(round_trip(&mut stream, b"lost", Duration::from_millis(300)).await, None);
        // The other direction of the pair is a separate link and still works.
        let mut reverse = TcpStream::connect(proxies.address(2, 1)).await.unwrap();
        assert!(round_trip(&mut reverse, b"ok", Duration::from_secs(5)).await.is_some());
        // A new connection during the cut is accepted and hears nothing.
        let mut during = TcpStream::connect(proxies.address(1, 2)).await.unwrap();
        assert_eq!(round_trip(&mut during, b"x", Duration::from_millis(300)).await, None);

        proxies.heal_all();
        // The broken connections are closed once healed; a new one works.
        let mut buffer = [0u8; 8];
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)));
        let mut fresh = TcpStream::connect(proxies.address(1, 2)).await.unwrap();
        assert!(round_trip(&mut fresh, b"again", Duration::from_secs(5)).await.is_some());
    }

    #[tokio::test]
    async fn latency_delays_each_way() {
        let proxies = two_nodes().await;
        proxies.set(1, 2, |s| s.latency = Duration::from_millis(100));
        let mut stream = TcpStream::connect(proxies.address(1, 2)).await.unwrap();
        let started = std::time::Instant::now();
        assert!(round_trip(&mut stream, b"slow", Duration::from_secs(5)).await.is_some());
        // 100 ms out, 100 ms back.
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn links_across_a_site() {
        let targets =
            BTreeMap::from([(1, echo_server().await), (2, echo_server().await), (3, echo_server().await)]);
        let proxies = Proxies::start(&targets).await.unwrap();
        assert_eq!(proxies.links_across(&[1], true, true), vec![(1, 2), (1, 3), (2, 1), (3, 1)]);
        assert_eq!(proxies.links_across(&[1, 2], false, true), vec![(3, 1), (3, 2)]);
    }
}
