//! The Raft network, client side: openraft's RPCs to other nodes over `tally.v1.Raft`.
//!
//! Raft messages travel as postcard bytes inside `RaftMessage` (see `raft.proto`); snapshots
//! stream as chunks of `SNAPSHOT_CHUNK_BYTES_MAX`; replication is pipelined on one stream per
//! follower (`append_stream`). Every failure to reach a node is reported to
//! openraft as `Unreachable`, which makes it back off and retry.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::OptionalSend;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tally_proto::v1 as pb;
use tally_proto::v1::raft_client::RaftClient;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::append_stream;
use super::identity::{Endpoint, FROM_HEADER, Identities, TO_HEADER};
use super::reach::{Outcome, Reachability};
use super::{MESSAGE_BYTES_MAX, channel};
use crate::bounds::Bounded;
use crate::storage::state_machine::SnapshotFile;
use crate::types::{NodeId, NodeInfo, Snapshot, SnapshotMeta, TypeConfig, Vote, decode, encode};

/// Version of the postcard encoding inside `RaftMessage`.
pub const RAFT_MESSAGE_VERSION: u32 = 1;
/// Snapshot bytes per chunk: well under `MESSAGE_BYTES_MAX`.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 4 << 20;
const _: () = assert!(SNAPSHOT_CHUNK_BYTES_MAX * 2 <= MESSAGE_BYTES_MAX);

pub fn message<T: serde::Serialize>(value: &T) -> pb::RaftMessage {
    pb::RaftMessage { version: RAFT_MESSAGE_VERSION, payload: encode(value), applied_index: None }
}

/// Decodes a Raft message from a peer, and refuses terms and indexes near overflow
/// (`bounds`).
pub fn unpack<T: for<'de> serde::Deserialize<'de> + Bounded>(message: &pb::RaftMessage) -> Result<T, String> {
    if message.version != RAFT_MESSAGE_VERSION {
        return Err(format!(
            "raft message version {}, this build speaks {RAFT_MESSAGE_VERSION}",
            message.version
        ));
    }
    let value: T = decode(&message.payload).map_err(|e| format!("raft message: {e}"))?;
    value.check_bounds().map_err(|e| format!("raft message: {e}"))?;
    Ok(value)
}

/// The metadata header that carries the cluster's id (`net::identity`): a node refuses Raft
/// traffic from another cluster, so that neither a misconfigured address nor a stranger on the
/// network can reach its log.
pub const CLUSTER_HEADER: &str = "x-tally-cluster";
/// The sender's cluster name (`--cluster`), which a node checks before adopting the id.
pub const CLUSTER_NAME_HEADER: &str = "x-tally-cluster-name";

#[derive(Clone)]
pub struct Network {
    /// Addresses that override the membership's, per node (`NodeConfig::routes`).
    routes: BTreeMap<NodeId, String>,
    /// This node's identity and the incarnations of the membership in effect: a replication
    /// stream outlives membership changes, so each call looks the target's up afresh.
    identities: Arc<Identities>,
    /// TLS to the peers, each checked to be the node meant (None: `--insecure`).
    tls: Option<Arc<crate::security::tls::Tls>>,
    /// Which peers answer, for the log.
    reach: Arc<Reachability>,
    /// Where followers' answers tell how far they have applied.
    pace: Arc<crate::pace::Pace>,
}

impl Network {
    pub fn new(
        routes: BTreeMap<NodeId, String>,
        identities: Arc<Identities>,
        tls: Option<Arc<crate::security::tls::Tls>>,
        pace: Arc<crate::pace::Pace>,
    ) -> Network {
        Network { routes, identities, tls, reach: Arc::new(Reachability::default()), pace }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Peer {
        let address = self.routes.get(&target).unwrap_or(&node.peer_address);
        let client = channel(address, self.tls.as_ref(), Some(target)).ok().map(|channel| {
            RaftClient::new(channel)
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX)
        });
        Peer {
            target,
            address: address.clone(),
            incarnation_at_start: node.incarnation,
            client,
            identities: self.identities.clone(),
            reach: self.reach.clone(),
            pace: self.pace.clone(),
            streams: true,
        }
    }
}

/// The connection to one other node.
pub struct Peer {
    target: NodeId,
    /// Its peer door, as this node reaches it.
    address: String,
    /// The target's incarnation in the membership this stream was made for, used while the
    /// shared view does not know the target yet.
    incarnation_at_start: u64,
    client: Option<RaftClient<Channel>>,
    identities: Arc<Identities>,
    reach: Arc<Reachability>,
    pace: Arc<crate::pace::Pace>,
    /// Whether the target takes pipelined replication (`append_stream`); false once it answered
    /// that it does not (an older build), and replication then sends one request at a time.
    streams: bool,
}

/// The deadline of one RPC: openraft's (votes, heartbeats), or one sized for what it carries.
enum Deadline<'a> {
    Fixed(&'a RPCOption),
    BySize(&'a RPCOption),
}

/// Every AppendEntries that carries entries gets at least this long.
const REPLICATION_DEADLINE_MIN: Duration = Duration::from_secs(1);
/// The slowest link between sites we plan for: a message gets the time to cross it at this rate
/// on top of `REPLICATION_DEADLINE_MIN`.
const REPLICATION_BYTES_PER_SECOND_MIN: u64 = 8 << 20;

/// openraft asks for its heartbeat interval (50 ms) as the deadline of every AppendEntries. A
/// catch-up message of several MiB cannot make that, and each cancelled attempt resets an
/// HTTP/2 stream until the follower's server answers GOAWAY (too many resets) and replication
/// stalls. A message with entries gets a deadline sized for its bytes instead; an empty one (a
/// heartbeat, or a probe) keeps openraft's.
pub(super) fn replication_deadline(option: &RPCOption, message_bytes: usize) -> Duration {
    let transfer = Duration::from_millis(message_bytes as u64 * 1000 / REPLICATION_BYTES_PER_SECOND_MIN);
    option.hard_ttl().max(REPLICATION_DEADLINE_MIN + transfer)
}

fn unreachable<E: std::fmt::Display>(target: NodeId) -> impl Fn(E) -> Unreachable<TypeConfig> {
    move |error| Unreachable::from_string(format!("node {target}: {error}"))
}

/// Names the cluster, this node and the target on an outgoing Raft call. The target's
/// incarnation is the one the membership in effect records, else `incarnation_otherwise`. A
/// node without a cluster id yet sends none, and is refused.
pub fn name_ends<T>(
    request: &mut tonic::Request<T>,
    identities: &Identities,
    target: NodeId,
    incarnation_otherwise: u64,
) {
    let recorded = match identities.recorded(target) {
        0 => incarnation_otherwise,
        known => known,
    };
    let to = Endpoint { id: target, incarnation: recorded };
    let metadata = request.metadata_mut();
    if let Some(cluster) = identities.cluster_id().and_then(|id| id.parse().ok()) {
        metadata.insert(CLUSTER_HEADER, cluster);
    }
    if let Ok(name) = identities.name().parse() {
        metadata.insert(CLUSTER_NAME_HEADER, name);
    }
    metadata.insert(FROM_HEADER, identities.me.header().parse().expect("digits and a dot"));
    metadata.insert(TO_HEADER, to.header().parse().expect("digits and a dot"));
}

impl Peer {
    fn address<T>(&self, request: &mut tonic::Request<T>) {
        name_ends(request, &self.identities, self.target, self.incarnation_at_start);
    }

    fn client(&self) -> Result<RaftClient<Channel>, Unreachable<TypeConfig>> {
        self.client
            .clone()
            .ok_or_else(|| Unreachable::from_string(format!("node {}: bad address", self.target)))
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        request: &Req,
        deadline: Deadline<'_>,
        rpc: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: for<'de> serde::Deserialize<'de> + Bounded,
        F: FnOnce(RaftClient<Channel>, tonic::Request<pb::RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftMessage>, tonic::Status>>,
    {
        let message = message(request);
        let timeout = match deadline {
            Deadline::Fixed(option) => option.hard_ttl(),
            Deadline::BySize(option) => replication_deadline(option, message.payload.len()),
        };
        let mut grpc_request = tonic::Request::new(message);
        grpc_request.set_timeout(timeout);
        self.address(&mut grpc_request);
        let reply = rpc(self.client()?, grpc_request).await;
        let outcome = match &reply {
            Ok(_) => Outcome::Answered,
            Err(status) if status.code() == tonic::Code::PermissionDenied => Outcome::Refused,
            Err(_) => Outcome::Unreachable,
        };
        let error = reply.as_ref().err().map_or_else(String::new, |status| status.message().to_string());
        self.reach.observe(self.target, &self.address, outcome, &error);
        let reply = reply.map_err(unreachable(self.target))?;
        if let Some(applied) = reply.get_ref().applied_index {
            self.pace.heard(self.target, applied);
        }
        unpack(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

impl RaftNetworkV2<TypeConfig> for Peer {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let deadline =
            if rpc.entries.is_empty() { Deadline::Fixed(&option) } else { Deadline::BySize(&option) };
        self.call(&rpc, deadline, |mut c, r| async move { c.append_entries(r).await }).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, super::append_stream::Item>, RPCError<TypeConfig>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        // A stream of one request (openraft's heartbeats, every 50 ms) gains nothing from a
        // pipeline: it goes as one unary call, as before.
        if !self.streams || input.size_hint().1 == Some(1) {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let client = self.client()?;
            let id = self.target;
            let target = append_stream::Target {
                id,
                address: self.address.clone(),
                reach: self.reach.clone(),
                identities: self.identities.clone(),
                incarnation: self.incarnation_at_start,
                pace: self.pace.clone(),
            };
            match append_stream::open(client, target, input.boxed(), option).await? {
                append_stream::Opened::Answers(answers) => Ok(answers),
                append_stream::Opened::Unimplemented => {
                    self.streams = false;
                    tracing::info!(
                        "node {id} does not take pipelined replication (an older build): one request at a time"
                    );
                    Err(RPCError::Unreachable(Unreachable::from_string(format!(
                        "node {id}: no append stream; sending one request at a time"
                    ))))
                }
            }
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, Deadline::Fixed(&option), |mut c, r| async move { c.vote(r).await }).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, Deadline::Fixed(&option), |mut c, r| async move { c.pre_vote(r).await }).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&rpc, Deadline::Fixed(&option), |mut c, r| async move { c.transfer_leader(r).await }).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let target = self.target;
        let header = message(&(vote, snapshot.meta.clone()));
        let file =
            crate::sys::tokio_fs::File::open(&snapshot.snapshot.path).await.map_err(unreachable(target))?;
        let mut request = tonic::Request::new(snapshot_chunks(header, file));
        self.address(&mut request);
        let send = async move { client.install_snapshot(request).await };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = send => {
                let reply = reply.map_err(unreachable(target))?;
                let response = unpack(reply.get_ref())
                    .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
                crate::metrics::SNAPSHOTS_SENT.inc();
                Ok(response)
            }
        }
    }
}

/// The snapshot file as a stream of chunks, the header on the first.
fn snapshot_chunks(
    header: pb::RaftMessage,
    mut file: crate::sys::tokio_fs::File,
) -> impl futures::Stream<Item = pb::SnapshotChunk> + Send + 'static {
    async_stream::stream! {
        let mut header = Some(header);
        loop {
            let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES_MAX];
            let mut filled = 0;
            while filled < data.len() {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(read) => filled += read,
                    // The receiver sees a short stream and refuses it (checksum); openraft retries.
                    Err(_) => return,
                }
            }
            data.truncate(filled);
            let last = filled < SNAPSHOT_CHUNK_BYTES_MAX;
            yield pb::SnapshotChunk { header: header.take(), data };
            if last {
                break;
            }
        }
    }
}

/// Decodes the header of a snapshot stream.
pub fn snapshot_header(message: &pb::RaftMessage) -> Result<(Vote, SnapshotMeta), String> {
    unpack(message)
}
