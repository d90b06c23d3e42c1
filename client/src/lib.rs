//! `tally-client`: a Rust client for tally.
//!
//! A `Client` holds a list of node addresses, any of which may be down. Every call has a
//! deadline; a call that fails because a node is unreachable, has no leader yet, or timed out is
//! retried on the next node with backoff until the deadline. One attempt gets at most half the
//! deadline, so that a node that hangs (frozen, or cut off) does not use it all; and once an
//! attempt has waited `WATCH_AFTER`, the client asks the other nodes where the leader is, and
//! moves there as soon as they name another node (a frozen leader stopped every client's writes
//! for half its deadline; the others elect a new one in a few hundred ms). Retrying writes
//! is safe because events carry their own ids: a transfer that was already applied answers
//! `EXISTS` and moves nothing. The client remembers which node answered last and starts there.
//!
//! Results are the generated protobuf types (`v1`), whose enums are typed (`status()`).
//!
//! Every connection is TLS (`Security::Tls`): the nodes' certificates are checked against the
//! cluster's CA, and a client certificate, when given, says who the caller is (the operator
//! role is needed to change the membership). `Security::Insecure` talks plaintext to a cluster
//! started with `--insecure`.

mod door;

pub use door::diagnose;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use tally_proto::v1;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use v1::cluster_client::ClusterClient;
use v1::ledger_client::LedgerClient;

/// Messages up to this size are sent and accepted (a full batch of 8189 events is ~2 MiB).
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// The pause after the first failed attempt; it doubles up to `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// An attempt that waits this long on one node starts the leader watch (`leader_elsewhere`)...
const WATCH_AFTER: Duration = Duration::from_millis(300);
/// ...which asks the other nodes at most this often (the calls under way share their answers)...
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// ...giving each this long to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How a client connects.
#[derive(Clone, Debug)]
pub enum Security {
    /// TLS, trusting the nodes whose certificates `ca_pem` (PEM) signed; with a client
    /// certificate and its key (PEM) when given.
    Tls { ca_pem: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)> },
    /// Plaintext, for a cluster started with `--insecure` only.
    Insecure,
}

impl Security {
    /// TLS from PEM files: the CA, and optionally a client certificate and its key. Each file
    /// must hold what its flag names: a key given as the CA (or the reverse) is refused here,
    /// with the file named, rather than failing every connection later.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Security, String> {
        let identity = match identity {
            Some((cert, key)) => {
                Some((read_pem(cert, Pem::Certificate, "--cert")?, read_pem(key, Pem::PrivateKey, "--key")?))
            }
            None => None,
        };
        Ok(Security::Tls { ca_pem: read_pem(ca, Pem::Certificate, "--ca")?, identity })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// A PEM file's contents, if it holds the `wanted` kind of object.
fn read_pem(path: &std::path::Path, wanted: Pem, flag: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {} ({flag}): {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let holds_certificate = text.contains("-----BEGIN CERTIFICATE-----");
    let holds_key = text.contains("PRIVATE KEY-----");
    let what = match wanted {
        Pem::Certificate => "a certificate",
        Pem::PrivateKey => "a private key",
    };
    let found = match (holds_certificate, holds_key) {
        (true, _) if wanted == Pem::Certificate => return Ok(bytes),
        (_, true) if wanted == Pem::PrivateKey => return Ok(bytes),
        (_, true) => "a private key",
        (true, _) => "a certificate",
        _ => "no PEM certificate or key",
    };
    let hint = match flag {
        "--ca" => ": pass the cluster's CA certificate (ca.pem from `tally certs`)",
        "--cert" => ": pass the client or operator certificate (the .pem beside its .key)",
        _ => ": pass the certificate's private key (the .key beside its .pem)",
    };
    Err(format!("{} ({flag}) holds {found}, not {what}{hint}", path.display()))
}

/// Checks that a node address is host:port, as the client doors are given.
pub fn check_address(address: &str) -> Result<(), String> {
    let example = "write each node's client door as host:port, e.g. 127.0.0.1:7101";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("'{address}' is not host:port: {example}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("'{address}' is not host:port: {example}"));
    }
    Ok(())
}

/// A client of a tally cluster.
pub struct Client {
    nodes: Vec<(String, Channel)>,
    /// The node to try first: the last one that answered.
    preferred: AtomicUsize,
    /// Deadline of one call, retries included.
    timeout: Duration,
    /// The leader watch's last answer: when it was asked, for calls waiting on which node, and
    /// the node the others named as leader (`leader_elsewhere`).
    watched: tokio::sync::Mutex<Option<Watched>>,
}

#[derive(Clone, Copy)]
struct Watched {
    at: Instant,
    waiting_on: usize,
    leader: Option<usize>,
}

/// How one attempt ended.
enum Attempt<T> {
    Answered(Result<Answer<T>, Status>),
    TimedOut,
    /// The other nodes name this node as the leader.
    LeaderElsewhere(usize),
}

#[derive(Debug)]
pub enum Error {
    /// The request is wrong and retrying will not help (INVALID_ARGUMENT, FAILED_PRECONDITION...).
    Rejected(Status),
    /// No node gave an answer before the deadline. For a write, the outcome is unknown: it may
    /// or may not have been applied. Retry it with the same ids to find out.
    Unavailable(Status),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Rejected(status) => write!(f, "rejected: {}", status.message()),
            Error::Unavailable(status) => {
                write!(f, "no node answered in time (last error: {})", status.message())
            }
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn status(&self) -> &Status {
        match self {
            Error::Rejected(status) | Error::Unavailable(status) => status,
        }
    }
}

/// Whether another node, or the same one later, may answer differently. A status that carries
/// a local error as its source was made here from a broken connection (an HTTP/2 GOAWAY from a
/// node that is stopping arrives as INTERNAL), not sent by a node: that is retryable too.
fn retryable(status: &Status) -> bool {
    let from_transport = std::error::Error::source(status).is_some();
    from_transport
        || matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Aborted | Code::Cancelled
        )
}

pub fn u128_to(value: u128) -> Option<v1::U128> {
    Some(v1::U128 { lo: value as u64, hi: (value >> 64) as u64 })
}

pub fn u128_from(value: Option<&v1::U128>) -> u128 {
    value.map_or(0, |v| (u128::from(v.hi) << 64) | u128::from(v.lo))
}

/// A reply, and the leader's address if a follower forwarded the request to it.
struct Answer<T> {
    value: T,
    leader: Option<String>,
}

/// Unwraps a reply, keeping the leader hint a follower adds when it forwarded the request: the
/// client then starts its next call at the leader, if the leader is in its node list.
fn answer<T, U>(response: tonic::Response<T>, take: impl FnOnce(T) -> U) -> Answer<U> {
    let leader = response.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    Answer { value: take(response.into_inner()), leader }
}

/// Set by a node on a reply to a request it forwarded to the leader: the leader's address.
const LEADER_HEADER: &str = "x-tally-leader";

impl Client {
    /// A client of the nodes at `addresses` (host:port, their client doors). Connections are
    /// made lazily.
    pub fn new(addresses: &[String], timeout: Duration, security: &Security) -> Result<Client, String> {
        if addresses.is_empty() {
            return Err("no node addresses given".into());
        }
        let tls = match security {
            Security::Tls { ca_pem, identity } => {
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                Some(tls)
            }
            Security::Insecure => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let nodes = addresses
            .iter()
            .map(|address| {
                check_address(address)?;
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                    .map_err(|e| format!("bad node address '{address}': {e}"))?
                    .connect_timeout(Duration::from_millis(500).min(timeout))
                    .tcp_nodelay(true);
                if let Some(tls) = &tls {
                    endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS settings: {e}"))?;
                }
                Ok((address.clone(), endpoint.connect_lazy()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Client { nodes, preferred: AtomicUsize::new(0), timeout, watched: tokio::sync::Mutex::new(None) })
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|(address, _)| address.clone()).collect()
    }

    /// Calls `call` on one node after another until one answers or the deadline passes.
    async fn with_retries<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Answer<T>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = BACKOFF_MIN;
        let mut node = self.preferred.load(Ordering::Relaxed) % self.nodes.len();
        let mut last_error = Status::unavailable("no attempt made");
        for attempt in 0.. {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let channel = self.nodes[node].1.clone();
            // One node may hang (a frozen process, a partition): give it part of the deadline,
            // so that the others get their turn.
            let budget = if self.nodes.len() > 1 { left.min(self.timeout / 2) } else { left };
            let sent = tokio::time::timeout(budget, call(channel, budget));
            let outcome = tokio::select! {
                answered = sent => match answered {
                    Ok(answered) => Attempt::Answered(answered),
                    Err(_) => Attempt::TimedOut,
                },
                leader = self.watch_leader(node) => Attempt::LeaderElsewhere(leader),
            };
            match outcome {
                Attempt::Answered(Ok(answer)) => {
                    let leader = answer.leader.and_then(|a| self.nodes.iter().position(|(n, _)| *n == a));
                    self.preferred.store(leader.unwrap_or(node), Ordering::Relaxed);
                    return Ok(answer.value);
                }
                Attempt::Answered(Err(status)) if !retryable(&status) => return Err(Error::Rejected(status)),
                Attempt::Answered(Err(status)) => last_error = status,
                Attempt::TimedOut => {
                    last_error = Status::deadline_exceeded("deadline passed waiting for a node")
                }
                // The attempt is dropped (its outcome unknown, as on a timeout) and sent to the
                // leader at once: events carry their ids, so a write that was applied after all
                // answers `EXISTS`.
                Attempt::LeaderElsewhere(leader) => {
                    last_error = Status::unavailable(format!(
                        "{} did not answer, and the other nodes name {} as the leader",
                        self.nodes[node].0, self.nodes[leader].0
                    ));
                    node = leader;
                    continue;
                }
            }
            node = (node + 1) % self.nodes.len();
            // A full round of nodes failed: pause before the next round.
            if (attempt + 1) % self.nodes.len() == 0 {
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        // Start the next call elsewhere: this node did not answer.
        self.preferred.store(node, Ordering::Relaxed);
        Err(Error::Unavailable(last_error))
    }

    /// Returns once the other nodes name a leader other than node `waiting_on`, asking them from
    /// `WATCH_AFTER` on; never with a single node.
    async fn watch_leader(&self, waiting_on: usize) -> usize {
        if self.nodes.len() < 2 {
            return std::future::pending().await;
        }
        tokio::time::sleep(WATCH_AFTER).await;
        loop {
            if let Some(leader) = self.leader_elsewhere(waiting_on).await
                && leader != waiting_on
            {
                return leader;
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// The node that the nodes other than `waiting_on` name as the leader (the one named in the
    /// newest term among those that answer within `PROBE_TIMEOUT`), if it is one of this
    /// client's. Asked at most every `WATCH_EVERY` for the calls waiting on one node together.
    async fn leader_elsewhere(&self, waiting_on: usize) -> Option<usize> {
        let mut watched = self.watched.lock().await;
        if let Some(last) = *watched
            && last.waiting_on == waiting_on
            && last.at.elapsed() < WATCH_EVERY
        {
            return last.leader;
        }
        let mut probes = tokio::task::JoinSet::new();
        for (index, (_, channel)) in self.nodes.iter().enumerate() {
            if index == waiting_on {
                continue;
            }
            let channel = channel.clone();
            probes.spawn(async move {
                let request = Self::request(v1::StatusRequest { local_only: true }, PROBE_TIMEOUT);
                let mut cluster = ClusterClient::new(channel);
                let reply = tokio::time::timeout(PROBE_TIMEOUT, cluster.status(request)).await.ok()?.ok()?;
                let leader = reply.metadata().get(LEADER_HEADER)?.to_str().ok()?.to_string();
                Some((reply.get_ref().term, leader))
            });
        }
        let mut newest: Option<(u64, String)> = None;
        while let Some(answer) = probes.join_next().await {
            if let Ok(Some(answer)) = answer
                && newest.as_ref().is_none_or(|newest| answer.0 > newest.0)
            {
                newest = Some(answer);
            }
        }
        let leader =
            newest.and_then(|(_, leader)| self.nodes.iter().position(|(address, _)| *address == leader));
        *watched = Some(Watched { at: Instant::now(), waiting_on, leader });
        leader
    }

    fn ledger(channel: Channel) -> LedgerClient<Channel> {
        LedgerClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        request
    }

    pub async fn create_accounts(
        &self,
        accounts: Vec<v1::Account>,
    ) -> Result<Vec<v1::CreateAccountResult>, Error> {
        let message = v1::CreateAccountsRequest { accounts };
        self.with_retries(|channel, left| {
            let request = Self::request(message.clone(), left);
            async move { Ok(answer(Self::ledger(channel).create_accounts(request).await?, |r| r.results)) }
        })
        .await
    }

    pub async fn create_transfers(
        &self,
        transfers: Vec<v1::Transfer>,
    ) -> Result<Vec<v1::CreateTransferResult>, Error> {
        let message = v1::CreateTransfersRequest { transfers };
        self.with_retries(|channel, left| {
            let request = Self::request(message.clone(), left);
            async move { Ok(answer(Self::ledger(channel).create_transfers(request).await?, |r| r.results)) }
        })
        .await
    }

    pub async fn lookup_accounts(
        &self,
        ids: &[u128],
        consistency: v1::ReadConsistency,
    ) -> Result<Vec<v1::Account>, Error> {
        let message = v1::LookupAccountsRequest {
            ids: ids.iter().filter_map(|id| u128_to(*id)).collect(),
            consistency: consistency as i32,
        };
        self.with_retries(|channel, left| {
            let request = Self::request(message.clone(), left);
            async move { Ok(answer(Self::ledger(channel).lookup_accounts(request).await?, |r| r.accounts)) }
        })
        .await
    }

    pub async fn lookup_transfers(
        &self,
        ids: &[u128],
        consistency: v1::ReadConsistency,
    ) -> Result<Vec<v1::Transfer>, Error> {
        let message = v1::LookupTransfersRequest {
            ids: ids.iter().filter_map(|id| u128_to(*id)).collect(),
            consistency: consistency as i32,
        };
        self.with_retries(|channel, left| {
            let request = Self::request(message.clone(), left);
            async move { Ok(answer(Self::ledger(channel).lookup_transfers(request).await?, |r| r.transfers)) }
        })
        .await
    }

    /// One account's transfers. A reply with a non-zero `resume_timestamp` ran out of scan
    /// budget before `limit` results: ask again from there for the rest (`ledger.proto`).
    pub async fn get_account_transfers(
        &self,
        filter: v1::AccountFilter,
    ) -> Result<v1::GetAccountTransfersReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(filter, left);
            async move { Ok(answer(Self::ledger(channel).get_account_transfers(request).await?, |reply| reply)) }
        })
        .await
    }

    /// One account's balance history; `resume_timestamp` as in `get_account_transfers`.
    pub async fn get_account_balances(
        &self,
        filter: v1::AccountFilter,
    ) -> Result<v1::GetAccountBalancesReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(filter, left);
            async move { Ok(answer(Self::ledger(channel).get_account_balances(request).await?, |reply| reply)) }
        })
        .await
    }

    /// Accounts selected by their fields; `resume_timestamp` as in `get_account_transfers`.
    pub async fn query_accounts(&self, filter: v1::QueryFilter) -> Result<v1::QueryAccountsReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(filter, left);
            async move { Ok(answer(Self::ledger(channel).query_accounts(request).await?, |reply| reply)) }
        })
        .await
    }

    /// Transfers selected by their fields; `resume_timestamp` as in `get_account_transfers`.
    pub async fn query_transfers(&self, filter: v1::QueryFilter) -> Result<v1::QueryTransfersReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(filter, left);
            async move { Ok(answer(Self::ledger(channel).query_transfers(request).await?, |reply| reply)) }
        })
        .await
    }

    /// The change stream of the first node that answers, from `timestamp_min` on (see
    /// `ledger.proto`). The stream does not end; on an error, subscribe again (to any node)
    /// from the last timestamp received + 1.
    pub async fn subscribe_changes(
        &self,
        timestamp_min: u64,
    ) -> Result<tonic::Streaming<v1::ChangeEvent>, Error> {
        let message = v1::SubscribeChangesRequest { timestamp_min };
        self.with_retries(|channel, _| {
            let request = tonic::Request::new(message);
            async move { Ok(answer(Self::ledger(channel).subscribe_changes(request).await?, |reply| reply)) }
        })
        .await
    }

    /// The change stream from `timestamp_min` on, resuming by itself: when its node fails, it
    /// subscribes again to the next node from the last event received + 1, so every event comes
    /// exactly once (see `Changes`).
    pub fn changes(&self, timestamp_min: u64) -> Changes<'_> {
        let node = self.preferred.load(Ordering::Relaxed) % self.nodes.len();
        Changes { client: self, next_timestamp: timestamp_min, node, stream: None }
    }

    pub async fn cluster_status(&self) -> Result<v1::StatusReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(v1::StatusRequest { local_only: false }, left);
            async move { Ok(answer(ClusterClient::new(channel).status(request).await?, |r| r)) }
        })
        .await
    }

    /// One node's own status, from that node (no fan-out), within the client's timeout: a frozen
    /// node accepts the connection and never answers (a test waiting on one hung for minutes).
    pub async fn node_status(&self, address: &str) -> Result<v1::NodeStatus, Error> {
        let index = self.nodes.iter().position(|(a, _)| a == address);
        let channel = match index {
            Some(i) => self.nodes[i].1.clone(),
            None => {
                return Err(Error::Rejected(Status::invalid_argument(format!(
                    "{address} is not in the node list"
                ))));
            }
        };
        let request = Self::request(v1::StatusRequest { local_only: true }, self.timeout);
        let reply = tokio::time::timeout(self.timeout, ClusterClient::new(channel).status(request))
            .await
            .map_err(|_| Error::Unavailable(Status::deadline_exceeded(format!("{address} did not answer"))))?
            .map_err(Error::Unavailable)?
            .into_inner();
        reply.nodes.into_iter().next().ok_or_else(|| Error::Unavailable(Status::internal("empty status")))
    }

    pub async fn add_node(&self, request: v1::AddNodeRequest) -> Result<v1::StatusReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(request.clone(), left);
            async move { Ok(answer(ClusterClient::new(channel).add_node(request).await?, |r| r)) }
        })
        .await
    }

    pub async fn remove_node(&self, request: v1::RemoveNodeRequest) -> Result<v1::StatusReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(request, left);
            async move { Ok(answer(ClusterClient::new(channel).remove_node(request).await?, |r| r)) }
        })
        .await
    }

    /// Brings back member `id` after it lost its disk (`Cluster.ReplaceNode`).
    pub async fn replace_node(&self, id: u64) -> Result<v1::StatusReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(v1::ReplaceNodeRequest { id }, left);
            async move { Ok(answer(ClusterClient::new(channel).replace_node(request).await?, |r| r)) }
        })
        .await
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<v1::StatusReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(v1::TransferLeaderRequest { to }, left);
            async move { Ok(answer(ClusterClient::new(channel).transfer_leader(request).await?, |r| r)) }
        })
        .await
    }

    /// Streams a backup of the state of the first node in the list (`Cluster.Backup`), as that
    /// node has applied it. No deadline on the call: a large state takes a while; the caller
    /// times out a stream that stalls.
    pub async fn backup(&self) -> Result<tonic::Streaming<v1::BackupChunk>, Error> {
        let channel = self.nodes[0].1.clone();
        let reply = ClusterClient::new(channel).backup(v1::BackupRequest {}).await.map_err(|status| {
            if retryable(&status) { Error::Unavailable(status) } else { Error::Rejected(status) }
        })?;
        Ok(reply.into_inner())
    }

    /// Has the leader snapshot its state now, and with `purge_log` drop its log behind it.
    pub async fn take_snapshot(&self, purge_log: bool) -> Result<v1::TakeSnapshotReply, Error> {
        self.with_retries(|channel, left| {
            let request = Self::request(v1::TakeSnapshotRequest { purge_log }, left);
            async move { Ok(answer(ClusterClient::new(channel).take_snapshot(request).await?, |r| r)) }
        })
        .await
    }
}

/// The change stream of `Client::changes`: every applied event in ledger time, then each new
/// one; it does not end. `next` resumes on another node when the stream breaks, and answers
/// `Error::Unavailable` only when no node served it for the client's timeout (call `next` again
/// to keep trying).
pub struct Changes<'a> {
    client: &'a Client,
    next_timestamp: u64,
    /// The node serving the stream, or to be asked next.
    node: usize,
    stream: Option<tonic::Streaming<v1::ChangeEvent>>,
}

impl Changes<'_> {
    /// The node serving the stream now, if one does.
    pub fn node(&self) -> Option<&str> {
        self.stream.as_ref().map(|_| self.client.nodes[self.node].0.as_str())
    }

    /// Where the stream goes on: the last event's timestamp + 1.
    pub fn next_timestamp(&self) -> u64 {
        self.next_timestamp
    }

    pub async fn next(&mut self) -> Result<v1::ChangeEvent, Error> {
        let nodes = self.client.nodes.len();
        let mut deadline = None;
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0;
        let mut last_error = Status::unavailable("no attempt made");
        loop {
            if self.stream.is_none() {
                let channel = self.client.nodes[self.node].1.clone();
                let request = v1::SubscribeChangesRequest { timestamp_min: self.next_timestamp };
                let mut ledger = Client::ledger(channel);
                match tokio::time::timeout(self.client.timeout, ledger.subscribe_changes(request)).await {
                    Ok(Ok(response)) => self.stream = Some(response.into_inner()),
                    Ok(Err(status)) if !retryable(&status) => return Err(Error::Rejected(status)),
                    Ok(Err(status)) => last_error = status,
                    Err(_) => last_error = Status::deadline_exceeded("deadline passed waiting for a node"),
                }
            }
            if let Some(stream) = &mut self.stream {
                match stream.message().await {
                    Ok(Some(event)) => {
                        self.next_timestamp = event.timestamp + 1;
                        return Ok(event);
                    }
                    Ok(None) => last_error = Status::unavailable("the node ended the stream"),
                    Err(status) if !retryable(&status) => return Err(Error::Rejected(status)),
                    Err(status) => last_error = status,
                }
            }
            // The stream broke (its node stopped, or was cut off): resume on the next node.
            self.stream = None;
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.client.timeout);
            if Instant::now() > deadline {
                return Err(Error::Unavailable(last_error));
            }
            self.node = (self.node + 1) % nodes;
            failures += 1;
            if failures % nodes == 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_retried_but_a_node_verdict_is_not() {
        assert!(!retryable(&Status::internal("the node said so")));
        assert!(!retryable(&Status::invalid_argument("8190 events")));
        let mut goaway = Status::internal("h2 protocol error: http2 error");
        goaway.set_source(std::sync::Arc::new(std::io::Error::other("GoAway(NO_ERROR, Remote)")));
        assert!(retryable(&goaway));
        assert!(retryable(&Status::unavailable("no leader yet")));
    }

    /// A node that accepts connections and never answers (a frozen process: the kernel still
    /// accepts) gets the client's timeout, not forever.
    #[tokio::test]
    async fn a_node_that_never_answers_gets_the_timeout_not_forever() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let client =
            Client::new(std::slice::from_ref(&address), Duration::from_millis(300), &Security::Insecure)
                .unwrap();
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), client.node_status(&address)).await;
        assert!(matches!(outcome, Ok(Err(Error::Unavailable(_)))), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}
