//! The doors' connections: accepting them under limits, with TLS and the caller's role, and
//! dialing a peer's door.
//!
//! Limits on every door (DESIGN.md, decision 11): at most `connections_max` connections at a
//! time (one more is closed at once, before any TLS work); at most `HANDSHAKES_MAX` TLS
//! handshakes under way, each within `HANDSHAKE_MAX` (or `idle_max`, if shorter), and a
//! connection takes its place among the `connections_max` only once its handshake is done, so
//! that TCP clients that never finish TLS cannot take the places of real ones (they held all
//! 4,096 for 10 s each); a connection that neither sends nor receives a byte for `idle_max` is
//! closed (clients reconnect by themselves). Handshakes run in their own tasks, so a slow one does
//! not hold up the next connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, as the idle timer's: under a simulated clock a std `Instant` would never reach
// the deadline the timer already passed, and the check would spin.
use tokio::time::Instant;

use crate::sys::{TcpListener, TcpStream};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::Connected;

use super::roles::{Caller, Role};
use super::tls::{Tls, presented_role};
use crate::types::NodeId;

/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_MAX: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once, per door; one more connection is closed at once.
pub const HANDSHAKES_MAX: usize = 256;

/// Which door a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Clients and operators: a client certificate is optional.
    Clients,
    /// Other nodes of the cluster: a node certificate is required.
    Peers,
}

impl Door {
    /// The door's name in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Door::Clients => "client",
            Door::Peers => "peer",
        }
    }
}

impl std::fmt::Display for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Door::Clients => "client door",
            Door::Peers => "peer door",
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections_max: usize,
    pub idle_max: Duration,
}

/// Connections that finished their handshake, for `Server::serve_with_incoming_shutdown`.
pub fn incoming(
    listener: TcpListener,
    door: Door,
    tls: Option<Arc<Tls>>,
    limits: Limits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (ready, stream) = mpsc::channel(64);
    tokio::spawn(accept(listener, door, tls, limits, ready));
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

async fn accept(
    listener: TcpListener,
    door: Door,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    ready: mpsc::Sender<io::Result<Conn>>,
) {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
    let warned = Arc::new(RateLimit::default());
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    warned.warn(|| tracing::warn!(%door, "cannot accept a connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = ready.closed() => return,
        };
        let full = || {
            crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[door.label(), "limit"]).inc();
            warned.warn(|| {
                tracing::warn!(
                    %door, %remote, max = limits.connections_max,
                    "connection refused: the door has as many connections as it takes"
                )
            });
        };
        // With TLS, a connection takes its place once its handshake is done, and no TLS work is
        // started while the door is full.
        let entry = match &tls {
            None => permits.clone().try_acquire_owned().ok().map(Entry::Connected),
            Some(_) if permits.available_permits() == 0 => None,
            Some(_) => handshakes.clone().try_acquire_owned().ok().map(Entry::Handshaking),
        };
        let Some(entry) = entry else {
            full();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (tls, ready, warned, permits) = (tls.clone(), ready.clone(), warned.clone(), permits.clone());
        tokio::spawn(async move {
            let conn = match (tls, entry) {
                (_, Entry::Connected(permit)) => {
                    Some(Conn::new(Io::Plain(stream), door, Role::Insecure, remote, permit, limits.idle_max))
                }
                (Some(tls), Entry::Handshaking(handshaking)) => {
                    let accepted = handshake(stream, remote, door, &tls, limits.idle_max, &warned).await;
                    drop(handshaking);
                    accepted.and_then(|(stream, role)| {
                        let Ok(permit) = permits.try_acquire_owned() else {
                            crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[door.label(), "limit"]).inc();
                            warned.warn(|| {
                                tracing::warn!(%door, %remote, "connection refused after its handshake: the door is full")
                            });
                            return None;
                        };
                        Some(Conn::new(Io::Tls(Box::new(stream)), door, role, remote, permit, limits.idle_max))
                    })
                }
                (None, Entry::Handshaking(_)) => unreachable!("a plain door takes connections at once"),
            };
            if let Some(conn) = conn {
                let _ = ready.send(Ok(conn)).await;
            }
        });
    }
}

/// What a new connection holds: its place among the door's connections, or (with TLS) one of
/// the door's handshake places until its handshake is done.
enum Entry {
    Connected(OwnedSemaphorePermit),
    Handshaking(OwnedSemaphorePermit),
}

/// The TLS handshake of a connection, and the role its certificate names; `None` when refused.
async fn handshake(
    stream: TcpStream,
    remote: SocketAddr,
    door: Door,
    tls: &Tls,
    idle_max: Duration,
    warned: &RateLimit,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Role)> {
    let configs = tls.current();
    let config = match door {
        Door::Clients => configs.client_door.clone(),
        Door::Peers => configs.peer_door.clone(),
    };
    let handshake_max = HANDSHAKE_MAX.min(idle_max);
    let accepted =
        tokio::time::timeout(handshake_max, tokio_rustls::TlsAcceptor::from(config).accept(stream)).await;
    let refused =
        || crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[door.label(), "handshake"]).inc();
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        // rustls's refusals (a certificate not of the cluster's CA, a bad message) come as
        // `InvalidData`; anything else is the connection going away mid-handshake: a peer that
        // was killed or gave up, not worth a warning.
        Ok(Err(e)) if e.kind() != std::io::ErrorKind::InvalidData => {
            tracing::debug!(%door, %remote, "connection closed during the TLS handshake: {e}");
            return None;
        }
        Ok(Err(e)) => {
            refused();
            warned.warn(|| tracing::warn!(%door, %remote, "TLS handshake refused: {e}"));
            return None;
        }
        Err(_) => {
            refused();
            warned.warn(
                || tracing::warn!(%door, %remote, "TLS handshake not finished within {handshake_max:?}"),
            );
            return None;
        }
    };
    let role = match (door, presented_role(stream.get_ref().1.peer_certificates())) {
        (Door::Clients, None) => Role::Anonymous,
        (_, Some(Ok(role @ Role::Node(_)))) => role,
        (Door::Clients, Some(Ok(role))) => role,
        (Door::Peers, Some(Ok(role))) => {
            warned
                .warn(|| tracing::warn!(%door, %remote, "refused {role}: only nodes come through this door"));
            return None;
        }
        (_, Some(Err(e))) => {
            warned.warn(
                || tracing::warn!(%door, %remote, "refused a certificate that names no tally role: {e}"),
            );
            return None;
        }
        (Door::Peers, None) => return None,
    };
    Some((stream, role))
}

/// At most one warning a second: a refused peer retries many times a second.
#[derive(Default)]
struct RateLimit {
    last_ms: AtomicU64,
}

impl RateLimit {
    fn warn(&self, log: impl FnOnce()) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let now = now.as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            log();
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection: its stream, who is at the other end, its place under the door's
/// connection limit (given back when it closes), and its idle timer.
pub struct Conn {
    io: Io,
    door: Door,
    caller: Caller,
    _permit: OwnedSemaphorePermit,
    idle_max: Duration,
    last_active: Instant,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl Conn {
    fn new(
        io: Io,
        door: Door,
        role: Role,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
        idle_max: Duration,
    ) -> Conn {
        crate::metrics::CONNECTIONS.with_label_values(&[door.label()]).inc();
        Conn {
            io,
            door,
            caller: Caller { role, remote },
            _permit: permit,
            idle_max,
            last_active: Instant::now(),
            idle: Box::pin(tokio::time::sleep(idle_max)),
        }
    }

    /// Called when the stream would wait: an error once the connection has been idle too long.
    /// The timer is reset only when it fires, not on every byte.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.idle.as_mut().poll(cx).is_ready() {
            let until = self.last_active + self.idle_max;
            if Instant::now() >= until {
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed"));
            }
            self.idle.as_mut().reset(until);
        }
        Poll::Pending
    }

    fn progress<T>(&mut self, poll: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.last_active = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.check_idle(cx).map(Err),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        crate::metrics::CONNECTIONS.with_label_values(&[self.door.label()]).dec();
    }
}

impl Connected for Conn {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        };
        this.progress(poll, cx)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        };
        this.progress(poll, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = match &mut this.io {
            Io::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.progress(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Dials peer doors over TLS with this node's certificate, checking that the peer is a node of
/// the cluster, and node `expect` when given.
#[derive(Clone)]
pub struct PeerDialer {
    tls: Arc<Tls>,
    expect: Option<NodeId>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Dialed = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for PeerDialer {
    type Response = Dialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Dialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, expect) = (self.tls.clone(), self.expect);
        Box::pin(async move {
            let host = uri.host().ok_or("no host")?.trim_matches(['[', ']']).to_string();
            let port = uri.port_u16().ok_or("no port")?;
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            // The verifier checks the node id, not this name (see `tls`).
            let name = ServerName::try_from(host)?;
            let connector = tokio_rustls::TlsConnector::from(tls.current().peer_calls.clone());
            let stream = connector.connect(name, stream).await?;
            match (presented_role(stream.get_ref().1.peer_certificates()), expect) {
                (Some(Ok(Role::Node(id))), Some(expected)) if id != expected => {
                    Err(format!("the peer at {uri} is node {id}, not node {expected}").into())
                }
                (Some(Ok(Role::Node(_))), _) => Ok(hyper_util::rt::TokioIo::new(stream)),
                _ => Err(format!("the peer at {uri} is not a node of this cluster").into()),
            }
        })
    }
}

/// A lazily connected channel to the peer door at `address` (host:port): TLS with this node's
/// certificate unless the node runs `--insecure` (`tls` None).
pub fn peer_channel(
    address: &str,
    tls: Option<&Arc<Tls>>,
    expect: Option<NodeId>,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("address {address}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(PeerDialer { tls: tls.clone(), expect }),
        #[cfg(not(feature = "sim"))]
        None => endpoint.connect_lazy(),
        #[cfg(feature = "sim")]
        None => endpoint.connect_with_connector_lazy(PlainDialer),
    })
}

/// Dials plaintext over the simulated network (`sys`), where tonic's own connector, which dials
/// with tokio, cannot go.
#[cfg(feature = "sim")]
#[derive(Clone)]
pub struct PlainDialer;

#[cfg(feature = "sim")]
impl tower_service::Service<http::Uri> for PlainDialer {
    type Response = hyper_util::rt::TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri.host().ok_or("no host")?.to_string();
            let port = uri.port_u16().ok_or("no port")?;
            Ok(hyper_util::rt::TokioIo::new(TcpStream::connect((host.as_str(), port)).await?))
        })
    }
}
