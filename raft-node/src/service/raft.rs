//! `tally.v1.Raft`: node-to-node traffic, server side. Refuses callers of another cluster, calls
//! meant for another node or another incarnation of this one, and senders whose incarnation the
//! membership records differently (`net::identity`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::types::Snapshot;
use futures::StreamExt;
use tally_proto::v1 as pb;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::net::identity::{Endpoint, FROM_HEADER, Identities, Refusal, TO_HEADER};
use crate::net::raft::{CLUSTER_HEADER, message, snapshot_header, unpack};
use crate::node::NodeHandle;
use crate::security::roles::Role;
use crate::storage::state_machine::SnapshotFile;

/// How long an install waits for the next chunk of its stream.
const SNAPSHOT_CHUNK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Numbers incoming snapshot files, so that two streams arriving together never share one.
static INCOMING: AtomicU64 = AtomicU64::new(0);

/// Removes an incoming snapshot file that was not installed (a stream cut short, refused, or
/// older than what the node has); an installed one has been renamed away already.
struct Incoming(PathBuf);

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = crate::sys::fs::remove_file(&self.0);
    }
}

/// Runs `install` (openraft installing the file `incoming` names) on a task of its own, which
/// holds the file until the install is done. The caller's future may be dropped at any await
/// (a reset stream, a cut link, a leader that gives up); openraft may have queued the install
/// by then, and a file removed under it made the rename fail and the node exit.
async fn install_holding<T: Send + 'static>(
    incoming: Incoming,
    install: impl Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    let task = tokio::spawn(async move {
        let output = install.await;
        drop(incoming);
        output
    });
    task.await.map_err(|e| Status::internal(format!("snapshot install task: {e}")))
}

/// A vote (a candidate's request, or the vote a leader sends entries or a snapshot under) must
/// name the caller as its leader: a member must not speak for another.
fn check_claimed<T>(request: &Request<T>, vote: &crate::types::Vote) -> Result<(), Status> {
    check_claimed_from(caller_id(request), vote)
}

fn caller_id<T>(request: &Request<T>) -> Option<crate::types::NodeId> {
    let from = request.metadata().get(FROM_HEADER).and_then(|v| v.to_str().ok());
    from.and_then(Endpoint::parse).map(|from| from.id)
}

fn check_claimed_from(from: Option<crate::types::NodeId>, vote: &crate::types::Vote) -> Result<(), Status> {
    use openraft::vote::RaftLeaderId;
    if from == Some(*vote.leader_id().node_id()) {
        return Ok(());
    }
    Err(Status::permission_denied("refused"))
}

/// Runs on every Raft call before its body is read: a caller whose node certificate is not the
/// node it claims to be (`x-tally-from`), or that does not send this cluster's id, is refused
/// before the node buffers a message (up to 64 MiB) for it. A node without an id
/// yet lets calls through to the full check (`RaftService::check`), which adopts a leader's.
pub fn refuse_strangers(
    identities: Arc<Identities>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let refused = || Err(Status::permission_denied("refused"));
        // The node the certificate names must be the node the call claims to come from.
        match crate::security::roles::caller_of(&request) {
            Role::Insecure => {}
            Role::Node(id) => {
                let from = request.metadata().get(FROM_HEADER).and_then(|v| v.to_str().ok());
                if from.and_then(Endpoint::parse).map(|from| from.id) != Some(id) {
                    return refused();
                }
            }
            _ => return refused(),
        }
        let Some(mine) = identities.cluster_id() else { return Ok(request) };
        let theirs = request.metadata().get(CLUSTER_HEADER).and_then(|v| v.to_str().ok());
        if theirs == Some(mine.as_str()) { Ok(request) } else { refused() }
    }
}

/// Who a Raft call comes from, for what it is checked against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// Any peer: clock samples, leadership transfers.
    Peer,
    /// A vote or pre-vote request.
    Candidate,
    /// AppendEntries or a snapshot.
    Leader,
}

pub struct RaftService {
    node: Arc<NodeHandle>,
    /// One snapshot install at a time: each takes a file as large as the ledger.
    installing: tokio::sync::Semaphore,
    /// When a refusal was last logged: a refused peer retries many times a second, and the log
    /// should say what to do, not fill the disk.
    refusal_logged: std::sync::Mutex<Option<std::time::Instant>>,
}

/// At most one refusal logged per this long.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl RaftService {
    pub fn new(node: Arc<NodeHandle>) -> RaftService {
        RaftService {
            node,
            installing: tokio::sync::Semaphore::new(1),
            refusal_logged: std::sync::Mutex::new(None),
        }
    }

    fn check_caller<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.check(request, Caller::Peer)
    }

    /// `check_caller` for a vote or pre-vote request: the candidate must be the incarnation
    /// this node's membership records. The first election of a bootstrap is how the peers
    /// named in it learn the cluster id.
    fn check_candidate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.check(request, Caller::Candidate)
    }

    /// `check_caller` for a leader's AppendEntries or snapshot. Like a candidate's, it may
    /// carry the cluster id to a node without one yet (new, or replaced), which adopts it.
    fn check_leader<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.check(request, Caller::Leader)
    }

    /// Every refusal reads the same to the caller: it learns nothing of what was expected.
    fn check<T>(&self, request: &Request<T>, caller: Caller) -> Result<(), Status> {
        let header = |name: &str| request.metadata().get(name).and_then(|v| v.to_str().ok());
        let identities = &self.node.identities;
        identities
            .check(header(FROM_HEADER), header(TO_HEADER), caller == Caller::Candidate)
            .and_then(|()| identities.check_name(header(crate::net::raft::CLUSTER_NAME_HEADER)))
            .and_then(|()| {
                identities.check_cluster(header(CLUSTER_HEADER), caller != Caller::Peer, |id| {
                    crate::node::save_cluster_id(&self.node.config.data_dir, id)?;
                    tracing::info!(node = identities.me.id, "joined cluster {id} (from its first Raft call)");
                    Ok(())
                })
            })
            .map_err(|refusal| {
                self.log_refusal(&refusal);
                Status::permission_denied("refused")
            })
    }

    /// No vote, and no leadership handed over, while this node withholds its vote
    /// (`node::VoteHold`): the candidate hears nothing it can count.
    fn check_votes_withheld(&self) -> Result<(), Status> {
        match self.node.votes.withheld() {
            None => Ok(()),
            Some(until) => Err(Status::unavailable(format!(
                "node {} does not vote until its log reaches entry {until} again (its damaged tail was cut off)",
                self.node.id()
            ))),
        }
    }

    /// A (pre-)vote this node refused to a candidate whose log is shorter than its own: that
    /// candidate cannot win with this node's vote, and while this node held back its own
    /// candidacy because it is behind in applying, no one won (a ten-minute run at rush hour: the
    /// survivor that had applied everything lacked the dead leader's last entry, the other held
    /// back for its whole 3-s patience before it stood; `node::standing`).
    fn note_shorter_log(
        &self,
        reply: &openraft::raft::VoteResponse<crate::types::TypeConfig>,
        candidate_log: Option<crate::types::LogId>,
    ) {
        if !reply.vote_granted && reply.last_log_id > candidate_log {
            self.node.shorter_log_candidate.record();
        }
    }

    fn log_refusal(&self, refusal: &Refusal) {
        let mut logged = self.refusal_logged.lock().expect("refusal log lock");
        if logged.is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL) {
            return;
        }
        *logged = Some(std::time::Instant::now());
        let me = self.node.identities.me;
        match refusal {
            Refusal::StaleTarget { recorded } => tracing::error!(
                node = me.id,
                "refusing Raft traffic: the cluster knows node {} as incarnation {recorded}, but this data \
                 directory is incarnation {} (made anew: the old disk was lost or this is another node's). \
                 This node will not vote or accept entries until an operator runs \
                 `tally cluster replace --id {}`",
                me.id,
                me.incarnation,
                me.id
            ),
            Refusal::StaleSender { id, recorded, claimed } => tracing::warn!(
                node = me.id,
                "refusing Raft traffic from node {id}: it runs incarnation {claimed}, the membership records \
                 {recorded}; it lost its disk and must be replaced (`tally cluster replace --id {id}`)"
            ),
            Refusal::NotMember { id } => tracing::warn!(
                node = me.id,
                "refusing Raft traffic from node {id}: it is not a member (removed, or never added); if it \
                 should be, add it with `tally cluster add`"
            ),
            Refusal::WrongTarget | Refusal::Malformed => {
                tracing::warn!(node = me.id, "refusing Raft traffic not addressed to this node: {refusal:?}")
            }
            // Not given one yet: the leader's first vote request or AppendEntries will.
            Refusal::OtherCluster if self.node.identities.cluster_id().is_none() => tracing::info!(
                node = me.id,
                "no cluster id yet: refusing Raft calls other than a leader's or a candidate's until one gives it"
            ),
            Refusal::OtherCluster => tracing::warn!(
                node = me.id,
                "refusing Raft traffic without this cluster's id (another cluster's, or a stranger's). If this \
                 node was meant to join that cluster, empty its data directory and start it without --bootstrap"
            ),
            Refusal::OtherName { theirs } => tracing::error!(
                node = me.id,
                "refusing Raft traffic from a node of cluster '{theirs}': this node was started as cluster \
                 '{}' (--cluster). If it belongs to '{theirs}', restart it with --cluster {theirs}",
                self.node.config.cluster
            ),
            Refusal::CannotAdopt(error) => {
                tracing::error!(node = me.id, "cannot record the cluster id the leader sent: {error}")
            }
        }
    }
}

fn bad_message(error: String) -> Status {
    Status::invalid_argument(error)
}

fn raft_failed(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft: {error}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.check_leader(&request)?;
        let rpc: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> =
            unpack(request.get_ref()).map_err(bad_message)?;
        check_claimed(&request, &rpc.vote)?;
        let reply = self.node.raft.append_entries(rpc).await.map_err(raft_failed)?;
        if !matches!(reply, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            self.node.leader_contact.record();
        }
        Ok(Response::new(pb::RaftMessage {
            applied_index: Some(self.node.applied_index()),
            ..message(&reply)
        }))
    }

    type AppendStreamStream = futures::stream::BoxStream<'static, Result<pb::RaftMessage, Status>>;

    /// A leader's pipelined replication (`net::append_stream`): each request is checked as
    /// `append_entries` checks one, and answered in order. A request that fails its checks ends
    /// the stream with the refusal, after the answers to the requests before it.
    async fn append_stream(
        &self,
        request: Request<Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        self.check_leader(&request)?;
        let from = caller_id(&request);
        let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let requests = {
            let refused = refused.clone();
            request.into_inner().scan((), move |(), message| {
                let rpc = message.and_then(|message| {
                    let rpc: openraft::raft::AppendEntriesRequest<crate::types::TypeConfig> =
                        unpack(&message).map_err(bad_message)?;
                    check_claimed_from(from, &rpc.vote)?;
                    Ok(rpc)
                });
                std::future::ready(match rpc {
                    Ok(rpc) => Some(rpc),
                    Err(status) => {
                        *refused.lock().unwrap() = Some(status);
                        None
                    }
                })
            })
        };
        let node = self.node.clone();
        let answers =
            crate::rt::openraft_spawning(self.node.id(), || self.node.raft.stream_append(requests)).await;
        let answers = answers.map(move |answer| match answer {
            Ok(result) => {
                if !matches!(result, Err(openraft::raft::StreamAppendError::HigherVote(_))) {
                    node.leader_contact.record();
                }
                Ok(pb::RaftMessage { applied_index: Some(node.applied_index()), ..message(&result) })
            }
            Err(fatal) => Err(raft_failed(fatal)),
        });
        let refusal = futures::stream::once(async move { refused.lock().unwrap().take() })
            .filter_map(|refusal| std::future::ready(refusal.map(Err)));
        Ok(Response::new(answers.chain(refusal).boxed()))
    }

    async fn vote(&self, request: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.check_candidate(&request)?;
        self.check_votes_withheld()?;
        let rpc: openraft::raft::VoteRequest<crate::types::TypeConfig> =
            unpack(request.get_ref()).map_err(bad_message)?;
        check_claimed(&request, &rpc.vote)?;
        let candidate_log = rpc.last_log_id;
        let reply = self.node.raft.vote(rpc).await.map_err(raft_failed)?;
        self.note_shorter_log(&reply, candidate_log);
        Ok(Response::new(message(&reply)))
    }

    async fn pre_vote(&self, request: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.check_candidate(&request)?;
        self.check_votes_withheld()?;
        let rpc: openraft::raft::VoteRequest<crate::types::TypeConfig> =
            unpack(request.get_ref()).map_err(bad_message)?;
        check_claimed(&request, &rpc.vote)?;
        let candidate_log = rpc.last_log_id;
        let reply = self.node.raft.pre_vote(rpc).await.map_err(raft_failed)?;
        self.note_shorter_log(&reply, candidate_log);
        Ok(Response::new(message(&reply)))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.check_caller(&request)?;
        self.check_votes_withheld()?;
        let rpc = unpack(request.get_ref()).map_err(bad_message)?;
        let reply = self.node.raft.handle_transfer_leader(rpc).await.map_err(raft_failed)?;
        Ok(Response::new(message(&reply)))
    }

    async fn clock(&self, request: Request<pb::ClockRequest>) -> Result<Response<pb::ClockReply>, Status> {
        self.check_caller(&request)?;
        let leads_a_quorum = self.node.is_leader() && self.node.judge_serving();
        Ok(Response::new(pb::ClockReply {
            time_ns: self.node.clock.now_ns(),
            leads_a_quorum: Some(leads_a_quorum),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.check_leader(&request)?;
        let _installing = self.installing.try_acquire().map_err(|_| {
            Status::resource_exhausted("a snapshot is being installed on this node already; one at a time")
        })?;
        let receiving = self.node.receiving.start();
        let bytes_max = self.node.config.snapshot_bytes_max;
        let from = caller_id(&request);
        let mut chunks = request.into_inner();
        let dir = self.node.config.data_dir.join("snapshots");
        let number = INCOMING.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{}{}-{number}.tmp",
            crate::storage::state_machine::INCOMING_PREFIX,
            std::process::id()
        ));
        let incoming = Incoming(path.clone());
        let mut file =
            crate::sys::tokio_fs::File::create(&path).await.map_err(|e| Status::internal(e.to_string()))?;
        let mut header = None;
        let mut received = 0u64;
        // A stream that stalls (a cut link drops bytes without a reset) would hold the one
        // install place until the connection times out: it gets this long per chunk.
        let next = async |chunks: &mut Streaming<pb::SnapshotChunk>| {
            tokio::time::timeout(SNAPSHOT_CHUNK_WAIT_MAX, chunks.next())
                .await
                .map_err(|_| Status::deadline_exceeded("snapshot stream stalled"))
        };
        while let Some(chunk) = next(&mut chunks).await? {
            let chunk = chunk?;
            if let Some(h) = chunk.header {
                header = Some(snapshot_header(&h).map_err(bad_message)?);
            }
            received += chunk.data.len() as u64;
            receiving.received(received);
            if received > bytes_max {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than this node accepts (--max-snapshot-bytes {bytes_max})"
                )));
            }
            file.write_all(&chunk.data).await.map_err(|e| Status::internal(e.to_string()))?;
        }
        file.sync_all().await.map_err(|e| Status::internal(e.to_string()))?;
        drop(file);
        let (vote, meta) =
            header.ok_or_else(|| Status::invalid_argument("snapshot stream without a header"))?;
        check_claimed_from(from, &vote)?;
        // Checked whole before openraft hears of it: a damaged stream is refused here (the
        // leader sends it again) and never becomes this node's current snapshot.
        let checked = path.clone();
        crate::rt::off_thread(move || ledger::snapshot::verify(crate::sys::fs::File::open(&checked)?))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::data_loss(format!("snapshot received damaged: {e}")))?;
        let snapshot = Snapshot { meta, snapshot: SnapshotFile { path } };
        let raft = self.node.raft.clone();
        let install = async move { raft.install_full_snapshot(vote, snapshot).await };
        let reply = install_holding(incoming, install).await?.map_err(raft_failed)?;
        crate::metrics::SNAPSHOTS_RECEIVED.inc();
        Ok(Response::new(message(&reply)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The install outlives a caller dropped mid-way, and the file stays until the install is
    /// done: with the guard held by the handler (before), the file was gone when openraft got to
    /// it.
    #[tokio::test]
    async fn a_dropped_caller_leaves_the_file_to_the_install() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("incoming-1.tmp");
        std::fs::write(&path, b"snapshot").unwrap();
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (start, started) = tokio::sync::oneshot::channel::<()>();
        let (found_tx, found) = tokio::sync::oneshot::channel();
        let checked = path.clone();
        let install = async move {
            entered_tx.send(()).unwrap();
            started.await.unwrap();
            found_tx.send(checked.exists()).unwrap();
        };
        let caller = tokio::spawn(install_holding(Incoming(path.clone()), install));
        entered.await.unwrap();
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        start.send(()).unwrap();
        assert!(found.await.unwrap(), "the file was removed while the install ran");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while path.exists() {
            assert!(tokio::time::Instant::now() < deadline, "the file outlived its install");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
