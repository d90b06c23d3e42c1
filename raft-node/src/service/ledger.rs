//! `tally.v1.Ledger`: the client API.
//!
//! Any node takes any request. Writes go through the leader's batcher; a follower forwards them
//! to the leader (one hop, marked with `FORWARDED_HEADER` so that a request never bounces).
//! Linearizable reads run on the leader after a read-index round (`get_read_linearizer`);
//! followers forward them. Local reads are served from this node's state as it is.

use std::sync::Arc;

use ledger::Batch;
use openraft::ReadPolicy;
use tally_proto::v1 as pb;
use tally_proto::v1::ledger_client::LedgerClient;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::net::MESSAGE_BYTES_MAX;
use crate::node::NodeHandle;

/// The largest client request accepted: a batch of 8189 events with every field set is about
/// 2 MiB of protobuf; more is refused with RESOURCE_EXHAUSTED before it is decoded.
pub const LEDGER_REQUEST_BYTES_MAX: usize = 4 << 20;
/// Marks a request forwarded by another node.
const FORWARDED_HEADER: &str = "x-tally-forwarded";

pub struct LedgerService {
    node: Arc<NodeHandle>,
}

impl LedgerService {
    pub fn new(node: Arc<NodeHandle>) -> LedgerService {
        LedgerService { node }
    }

    /// A client to the current leader, or UNAVAILABLE if there is none this node can name, or if
    /// this request was already forwarded once.
    fn leader_client<T>(
        &self,
        request: &Request<T>,
    ) -> Result<LedgerClient<tonic::transport::Channel>, Status> {
        if request.metadata().contains_key(FORWARDED_HEADER) {
            return Err(Status::unavailable("forwarded to a node that is no longer the leader; retry"));
        }
        let leader =
            self.node.leader().ok_or_else(|| Status::unavailable("no leader elected yet; retry shortly"))?;
        let address = self
            .node
            .address_of(leader)
            .ok_or_else(|| Status::unavailable("the leader's address is unknown; retry"))?;
        let channel = crate::net::channel(&address).map_err(Status::internal)?;
        Ok(LedgerClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX))
    }

    async fn write(&self, batch: Batch) -> Result<ledger::BatchReply, Status> {
        self.node.batcher.submit(batch).await
    }

    /// Waits until this node's state reflects every write acknowledged before now. Err with
    /// `None` means "not the leader: forward".
    async fn linearize(&self) -> Result<(), Option<Status>> {
        let linearizer = match self.node.raft.get_read_linearizer(ReadPolicy::ReadIndex).await {
            Ok(linearizer) => linearizer,
            Err(openraft::error::RaftError::APIError(
                openraft::error::LinearizableReadError::ForwardToLeader(_),
            )) => {
                return Err(None);
            }
            Err(error) => {
                return Err(Some(Status::unavailable(format!("cannot serve a linearizable read: {error}"))));
            }
        };
        linearizer
            .await_ready(&self.node.raft)
            .await
            .map(|_| ())
            .map_err(|e| Some(Status::unavailable(format!("node is stopping: {e}"))))
    }
}

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    request
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
                    let mut client = $self.leader_client(&$request)?;
                    return client.$forward(forwarded($request.into_inner())).await;
                }
            }
        }
        let reply = tokio::task::block_in_place(|| $local);
        reply.map(Response::new)
    }};
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerService {
    async fn create_accounts(
        &self,
        request: Request<pb::CreateAccountsRequest>,
    ) -> Result<Response<pb::CreateAccountsReply>, Status> {
        let events = convert::accounts_from(&request.get_ref().accounts)?;
        if !self.node.is_leader() {
            let mut client = self.leader_client(&request)?;
            return client.create_accounts(forwarded(request.into_inner())).await;
        }
        let reply = self.write(Batch::CreateAccounts(events)).await?;
        Ok(Response::new(convert::account_results_to(&convert::expect_accounts(reply))))
    }

    async fn create_transfers(
        &self,
        request: Request<pb::CreateTransfersRequest>,
    ) -> Result<Response<pb::CreateTransfersReply>, Status> {
        let events = convert::transfers_from(&request.get_ref().transfers)?;
        if !self.node.is_leader() {
            let mut client = self.leader_client(&request)?;
            return client.create_transfers(forwarded(request.into_inner())).await;
        }
        let reply = self.write(Batch::CreateTransfers(events)).await?;
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
            self.node.state.read(|ledger| ledger.account_transfers(&filter)).map_err(internal).map(
                |transfers| pb::GetAccountTransfersReply {
                    transfers: transfers.iter().map(convert::transfer_to).collect(),
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
            self.node.state.read(|ledger| ledger.account_balances(&filter)).map_err(internal).map(
                |balances| pb::GetAccountBalancesReply {
                    balances: balances.iter().map(convert::balance_to).collect(),
                },
            )
        })
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(format!("reading the ledger: {error}"))
}
