//! `tally.v1.Ledger`: the client API.
//!
//! Any node takes any request. Writes go through the leader's batcher; a follower forwards them
//! to the leader (one hop, marked with `FORWARDED_HEADER` so that a request never bounces).
//! Linearizable reads run on the leader after a read-index round (`get_read_linearizer`);
//! followers forward them. Local reads are served from this node's state as it is.

use std::sync::Arc;

use ledger::Batch;
use tally_proto::v1 as pb;
use tally_proto::v1::ledger_client::LedgerClient;
use tonic::{Request, Response, Status};

use crate::batcher::Origin;
use crate::convert;
use crate::net::MESSAGE_BYTES_MAX;
use crate::node::{NodeHandle, ReadBarrier};
use crate::security::roles::{Caller, Role};

/// The largest client request accepted: a batch of 8189 events with every field set is about
/// 2 MiB of protobuf; more is refused with RESOURCE_EXHAUSTED before it is decoded.
pub const LEDGER_REQUEST_BYTES_MAX: usize = 4 << 20;
/// Marks a request forwarded by another node.
const FORWARDED_HEADER: &str = "x-tally-forwarded";
/// On a forwarded write: the connection it came on at the forwarding node (`origin_of`).
const ORIGIN_HEADER: &str = "x-tally-origin";
/// On a forwarded reply: the leader's address, so a client can send its next request there
/// directly and save the hop (`tally-client` does).
pub const LEADER_HEADER: &str = "x-tally-leader";

pub struct LedgerService {
    node: Arc<NodeHandle>,
}

impl LedgerService {
    pub fn new(node: Arc<NodeHandle>) -> LedgerService {
        LedgerService { node }
    }

    /// The leader to forward `request` to: its id, address and a client over the pooled
    /// channel. UNAVAILABLE if this node knows no leader, or if the request was already
    /// forwarded once (the leader changed under it: the client retries).
    fn leader_hop<T>(&self, request: &Request<T>) -> Result<Hop, Status> {
        if request.metadata().contains_key(FORWARDED_HEADER) {
            return Err(Status::unavailable("forwarded to a node that is no longer the leader; retry"));
        }
        let leader =
            self.node.leader().ok_or_else(|| Status::unavailable("no leader elected yet; retry shortly"))?;
        let address = self
            .node
            .address_of(leader)
            .ok_or_else(|| Status::unavailable("the leader's address is unknown; retry"))?;
        let channel = self.node.peers.channel(Some(leader), &address).map_err(Status::internal)?;
        let client = LedgerClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let advertised = self.node.advertised_address_of(leader);
        Ok(Hop { from: self.node.id(), leader, address, advertised, client })
    }

    async fn write(&self, batch: Batch, origin: Origin) -> Result<ledger::BatchReply, Status> {
        self.node.batcher.submit(batch, origin).await
    }

    /// Waits until this node's state reflects every write acknowledged before now. Err with
    /// `None` means "not the leader: forward".
    async fn linearize(&self) -> Result<(), Option<Status>> {
        self.node.read_barrier().await.map_err(|barrier| match barrier {
            ReadBarrier::NotLeader => None,
            ReadBarrier::Unavailable(error) => {
                Some(Status::unavailable(format!("cannot serve a linearizable read: {error}")))
            }
            ReadBarrier::Stopping(error) => Some(Status::unavailable(format!("node is stopping: {error}"))),
        })
    }
}

/// One forwarding hop, from this node to the leader.
struct Hop {
    from: u64,
    leader: u64,
    /// Where this node reaches the leader (a route may differ from the membership's address).
    address: String,
    /// The leader's address as clients know it.
    advertised: Option<String>,
    client: LedgerClient<tonic::transport::Channel>,
}

impl Hop {
    /// Sends `message` to the leader, marked as forwarded, with the caller's deadline (capped). An error says which hop failed: the leader's own answer keeps its code, a
    /// failure to reach the leader is UNAVAILABLE naming both nodes.
    async fn forward<T, R, F, Fut>(self, request: Request<T>, call: F) -> Result<Response<R>, Status>
    where
        F: FnOnce(LedgerClient<tonic::transport::Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let timeout = grpc_timeout(request.metadata());
        let origin = origin_of(&request);
        crate::metrics::FORWARDED.inc();
        let mut forwarded = Request::new(request.into_inner());
        forwarded.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        if let Ok(origin) = origin.0.parse() {
            forwarded.metadata_mut().insert(ORIGIN_HEADER, origin);
        }
        if let Some(timeout) = timeout {
            forwarded.set_timeout(timeout);
        }
        let Hop { from, leader, address, advertised, client } = self;
        match call(client, forwarded).await {
            Ok(mut response) => {
                if let Some(Ok(value)) = advertised.map(|a| a.parse()) {
                    response.metadata_mut().insert(LEADER_HEADER, value);
                }
                Ok(response)
            }
            Err(status) if std::error::Error::source(&status).is_some() => Err(Status::unavailable(format!(
                "node {from} could not reach the leader, node {leader} at {address}: {}; retry",
                status.message()
            ))),
            Err(status) => {
                let message = format!("from the leader, node {leader}: {}", status.message());
                Err(Status::new(status.code(), message))
            }
        }
    }
}

/// Where `request` comes from (`batcher::Origin`): the connection it came on, or, forwarded by
/// a member node, the one it came on there (only a node's word counts: a client naming another
/// origin would claim someone else's share).
fn origin_of<T>(request: &Request<T>) -> Origin {
    let caller = request.extensions().get::<Caller>();
    let from_node = caller.is_some_and(|caller| matches!(caller.role, Role::Node(_) | Role::Insecure));
    if from_node && let Some(Ok(origin)) = request.metadata().get(ORIGIN_HEADER).map(|value| value.to_str()) {
        return Origin(origin.to_owned());
    }
    Origin(caller.map_or_else(|| "in-process".to_owned(), |caller| caller.remote.to_string()))
}

/// The longest deadline a forwarded request carries, whatever the caller asked for.
const FORWARD_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// gRPC allows at most 8 digits in a `grpc-timeout`; tonic panics on a duration it cannot encode.
const GRPC_TIMEOUT_DIGITS_MAX: usize = 8;

/// The caller's deadline (`grpc-timeout`), passed on so the leader stops when the caller has;
/// at most `FORWARD_TIMEOUT_MAX`. A malformed one is ignored, as tonic's server ignores it.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    if !text.is_ascii() || text.len() < 2 || text.len() > GRPC_TIMEOUT_DIGITS_MAX + 1 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let value: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => std::time::Duration::from_secs(value.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(value.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(value),
        "m" => std::time::Duration::from_millis(value),
        "u" => std::time::Duration::from_micros(value),
        "n" => std::time::Duration::from_nanos(value),
        _ => return None,
    };
    Some(timeout.min(FORWARD_TIMEOUT_MAX))
}

/// Runs a read here, or forwards it to the leader when it must be linearizable and this node
/// is not the leader.
macro_rules! read {
    ($self:ident, $request:ident, $consistency:expr, $forward:ident, $local:expr) => {{
        if $consistency != pb::ReadConsistency::Local as i32 {
            match $self.linearize().await {
                Ok(()) => {}
                Err(Some(status)) => return Err(status),
                Err(None) => {
                    let hop = $self.leader_hop(&$request)?;
                    return hop.forward($request, |mut c, r| async move { c.$forward(r).await }).await;
                }
            }
        }
        let reply = crate::rt::block(|| $local);
        reply.map(Response::new)
    }};
}

/// Events a change stream reads from storage at a time, and holds for a subscriber at most
/// (twice this: one page being sent, one in the channel).
const CHANGE_PAGE: usize = 512;
/// How long a caught-up change stream waits for a new entry before it looks again anyway.
const CHANGE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Feeds one subscriber: reads a page of events from this node's applied state, sends it (the
/// send waits while the subscriber is slow: nothing more is read meanwhile), and once caught up
/// waits for the next applied entry. Ends when the subscriber goes away.
async fn feed_changes(
    node: Arc<NodeHandle>,
    mut from: u64,
    events: tokio::sync::mpsc::Sender<Result<pb::ChangeEvent, Status>>,
) {
    loop {
        // Before the read: an entry applied after it is a change the wait below sees.
        let applied = node.raft_view().last_applied;
        let state = node.state.clone();
        let page =
            tokio::task::spawn_blocking(move || state.read(|ledger| ledger.changes(from, CHANGE_PAGE))).await;
        let page = match page {
            Ok(Ok(page)) => page,
            Ok(Err(error)) => {
                let _ = events.send(Err(internal(error))).await;
                return;
            }
            Err(_) => return,
        };
        let caught_up = page.len() < CHANGE_PAGE;
        for event in &page {
            from = event.change.timestamp + 1;
            if events.send(Ok(convert::change_event_to(event))).await.is_err() {
                return;
            }
        }
        if caught_up {
            tokio::select! {
                _ = node.wait_for_raft(CHANGE_POLL, |view| view.last_applied != applied) => {}
                _ = events.closed() => return,
            }
        }
    }
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerService {
    type SubscribeChangesStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ChangeEvent, Status>>;

    async fn subscribe_changes(
        &self,
        request: Request<pb::SubscribeChangesRequest>,
    ) -> Result<Response<Self::SubscribeChangesStream>, Status> {
        // Each subscriber holds up to two pages of events and a read per applied entry: their
        // number is bounded, and the place is given back when the subscriber goes away.
        let place = self.node.subscribers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this node serves as many change-stream subscribers as it takes ({}, --max-subscribers): \
                 subscribe on another node, or retry later",
                self.node.config.subscribers_max
            ))
        })?;
        let (sender, receiver) = tokio::sync::mpsc::channel(CHANGE_PAGE);
        let (node, from) = (self.node.clone(), request.get_ref().timestamp_min);
        tokio::spawn(async move {
            feed_changes(node, from, sender).await;
            drop(place);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    async fn create_accounts(
        &self,
        request: Request<pb::CreateAccountsRequest>,
    ) -> Result<Response<pb::CreateAccountsReply>, Status> {
        let events = convert::accounts_from(&request.get_ref().accounts)?;
        if !self.node.is_leader() {
            let hop = self.leader_hop(&request)?;
            return hop.forward(request, |mut c, r| async move { c.create_accounts(r).await }).await;
        }
        let reply = self.write(Batch::CreateAccounts(events), origin_of(&request)).await?;
        Ok(Response::new(convert::account_results_to(&convert::expect_accounts(reply))))
    }

    async fn create_transfers(
        &self,
        request: Request<pb::CreateTransfersRequest>,
    ) -> Result<Response<pb::CreateTransfersReply>, Status> {
        let events = convert::transfers_from(&request.get_ref().transfers)?;
        if !self.node.is_leader() {
            let hop = self.leader_hop(&request)?;
            return hop.forward(request, |mut c, r| async move { c.create_transfers(r).await }).await;
        }
        let reply = self.write(Batch::CreateTransfers(events), origin_of(&request)).await?;
        Ok(Response::new(convert::transfer_results_to(&convert::expect_transfers(reply))))
    }

    async fn lookup_accounts(
        &self,
        request: Request<pb::LookupAccountsRequest>,
    ) -> Result<Response<pb::LookupAccountsReply>, Status> {
        let ids = convert::ids_from(&request.get_ref().ids)?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, lookup_accounts, {
            self.node.state.read(|ledger| ledger.lookup_accounts(&ids)).map_err(internal).map(|accounts| {
                pb::LookupAccountsReply { accounts: accounts.iter().map(convert::account_to).collect() }
            })
        })
    }

    async fn lookup_transfers(
        &self,
        request: Request<pb::LookupTransfersRequest>,
    ) -> Result<Response<pb::LookupTransfersReply>, Status> {
        let ids = convert::ids_from(&request.get_ref().ids)?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, lookup_transfers, {
            self.node.state.read(|ledger| ledger.lookup_transfers(&ids)).map_err(internal).map(|transfers| {
                pb::LookupTransfersReply { transfers: transfers.iter().map(convert::transfer_to).collect() }
            })
        })
    }

    async fn get_account_transfers(
        &self,
        request: Request<pb::AccountFilter>,
    ) -> Result<Response<pb::GetAccountTransfersReply>, Status> {
        let filter = convert::filter_from(request.get_ref())?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, get_account_transfers, {
            self.node.state.read(|ledger| ledger.account_transfers(&filter)).map_err(query_error).map(
                |page| pb::GetAccountTransfersReply {
                    transfers: page.results.iter().map(convert::transfer_to).collect(),
                    resume_timestamp: convert::resume_to(page.resume),
                },
            )
        })
    }

    async fn get_account_balances(
        &self,
        request: Request<pb::AccountFilter>,
    ) -> Result<Response<pb::GetAccountBalancesReply>, Status> {
        let filter = convert::filter_from(request.get_ref())?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, get_account_balances, {
            self.node.state.read(|ledger| ledger.account_balances(&filter)).map_err(query_error).map(|page| {
                pb::GetAccountBalancesReply {
                    balances: page.results.iter().map(convert::balance_to).collect(),
                    resume_timestamp: convert::resume_to(page.resume),
                }
            })
        })
    }

    async fn query_accounts(
        &self,
        request: Request<pb::QueryFilter>,
    ) -> Result<Response<pb::QueryAccountsReply>, Status> {
        let filter = convert::query_filter_from(request.get_ref())?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, query_accounts, {
            self.node.state.read(|ledger| ledger.query_accounts(&filter)).map_err(query_error).map(|page| {
                pb::QueryAccountsReply {
                    accounts: page.results.iter().map(convert::account_to).collect(),
                    resume_timestamp: convert::resume_to(page.resume),
                }
            })
        })
    }

    async fn query_transfers(
        &self,
        request: Request<pb::QueryFilter>,
    ) -> Result<Response<pb::QueryTransfersReply>, Status> {
        let filter = convert::query_filter_from(request.get_ref())?;
        let consistency = request.get_ref().consistency;
        read!(self, request, consistency, query_transfers, {
            self.node.state.read(|ledger| ledger.query_transfers(&filter)).map_err(query_error).map(|page| {
                pb::QueryTransfersReply {
                    transfers: page.results.iter().map(convert::transfer_to).collect(),
                    resume_timestamp: convert::resume_to(page.resume),
                }
            })
        })
    }
}

/// A filter is checked before the read, so what fails here is storage.
fn query_error(error: ledger::query::QueryError) -> Status {
    match error {
        ledger::query::QueryError::Filter(error) => Status::invalid_argument(error.to_string()),
        ledger::query::QueryError::Store(error) => internal(error),
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(format!("reading the ledger: {error}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_write_comes_from_its_connection_or_the_one_a_member_node_names() {
        let request = |role: Role, origin: Option<&str>| {
            let mut request = Request::new(());
            request.extensions_mut().insert(Caller { role, remote: "10.0.0.7:4242".parse().unwrap() });
            if let Some(origin) = origin {
                request.metadata_mut().insert(ORIGIN_HEADER, origin.parse().unwrap());
            }
            request
        };
        let own = Origin("10.0.0.7:4242".to_owned());
        assert_eq!(origin_of(&request(Role::Client("shop".into()), None)), own);
        // A client cannot claim another connection's share.
        assert_eq!(origin_of(&request(Role::Client("shop".into()), Some("10.0.0.8:1"))), own);
        assert_eq!(origin_of(&request(Role::Anonymous, Some("10.0.0.8:1"))), own);
        assert_eq!(origin_of(&request(Role::Node(2), Some("10.0.0.8:1"))), Origin("10.0.0.8:1".to_owned()));
        assert_eq!(origin_of(&request(Role::Node(2), None)), own, "a node's own write");
    }

    #[test]
    fn grpc_timeouts_parse_capped_and_malformed_ones_are_ignored() {
        let check = |value: &str, expected: Option<Duration>| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), expected, "{value}");
        };
        check("250m", Some(Duration::from_millis(250)));
        check("3S", Some(Duration::from_secs(3)));
        check("1500u", Some(Duration::from_micros(1500)));
        check("2H", Some(FORWARD_TIMEOUT_MAX));
        check("99999999H", Some(FORWARD_TIMEOUT_MAX));
        check("100000000H", None);
        check("999999999999S", None);
        check("S", None);
        check("10x", None);
        check("-5S", None);
    }
}
