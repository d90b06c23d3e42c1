//! Pipelined replication, client side: a leader's AppendEntries to one follower on one gRPC
//! stream (`tally.v1.Raft/AppendStream`), without waiting for each answer before the next.
//!
//! One request at a time (openraft's default, and our unary `AppendEntries`) made a follower that
//! was away catch up at one message per round trip: the leader reads up to 8 MiB, encodes and
//! sends it, the follower writes and fsyncs it, answers, and only then does the next read begin.
//! At rush hour ~440 entries of ~0.4 MB took 13 s that way, with writes stopped, because the
//! follower was the only other voter (issue 24). On a stream the leader's reads, the transfer and
//! the follower's writes overlap, and one fsync on the follower covers whatever arrived meanwhile.
//!
//! What is unanswered is bounded: at most `WINDOW_BYTES` of messages (each counted as at least
//! `MESSAGE_BYTES_MIN`), so a follower buffers little and a leader reads ahead little. Answers come
//! in request order; each must come within the deadline its message's size earns
//! (`replication_deadline`), counted from when it was queued or the previous answer came,
//! whichever is later. A follower without the call (an older build) answers UNIMPLEMENTED: the
//! connection then uses unary AppendEntries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use openraft::base::BoxStream;
use openraft::error::{NetworkError, RPCError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use tally_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::identity::Identities;
use super::raft::{message, name_ends, replication_deadline, unpack};
use super::reach::{Outcome, Reachability};
use crate::types::{NodeId, TypeConfig};

/// Bytes of requests sent on a stream and not yet answered.
pub const WINDOW_BYTES: usize = 32 << 20;
/// Each message counts as at least this much: at most 32 unanswered, within the 64 requests
/// openraft's follower side queues.
pub const MESSAGE_BYTES_MIN: usize = 1 << 20;
/// How often a stream with nothing unanswered looks again whether something was sent.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// A request sent and not answered yet.
struct Unanswered {
    /// Its share of the window, given back when its answer comes.
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    queued_at: Instant,
}

type Queue = Arc<Mutex<VecDeque<Unanswered>>>;

/// Where a stream goes, for its errors and the reachability log.
#[derive(Clone)]
pub struct Target {
    pub id: NodeId,
    pub address: String,
    pub reach: Arc<Reachability>,
    /// Who this node is, and the target's incarnation if the membership does not record one
    /// (`raft::name_ends`).
    pub identities: Arc<Identities>,
    pub incarnation: u64,
    /// Told how far the target has applied, as its answers say.
    pub pace: Arc<crate::pace::Pace>,
}

impl Target {
    fn failed(&self, status: &tonic::Status) -> RPCError<TypeConfig> {
        let outcome = match status.code() {
            tonic::Code::PermissionDenied => Outcome::Refused,
            _ => Outcome::Unreachable,
        };
        self.reach.observe(self.id, &self.address, outcome, &status.message());
        RPCError::Unreachable(Unreachable::from_string(format!("node {}: {status}", self.id)))
    }
}

/// How opening a stream ended.
pub enum Opened {
    Answers(BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>),
    /// The follower does not know the call: use unary AppendEntries with it.
    Unimplemented,
}

/// Sends `input` to `target` on one stream.
pub async fn open(
    mut client: pb::raft_client::RaftClient<tonic::transport::Channel>,
    target: Target,
    input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    option: RPCOption,
) -> Result<Opened, RPCError<TypeConfig>> {
    // openraft backs off after a failed stream (100-300 ms, `node::start::REPLICATION_BACKOFF`)
    // while it makes the stream's first request, so that request is made before connecting. A
    // peer that is down refuses the connection before tonic asks for a request, and without this
    // the leader tried again at once, thousands of times a second, taking a core of its two for
    // as long as a site was down (`tally dev`, one node killed: 5.5 CPU-seconds in 5 s).
    let mut input = input.peekable();
    if std::pin::Pin::new(&mut input).peek().await.is_none() {
        return Ok(Opened::Answers(futures::stream::empty().boxed()));
    }
    let queue: Queue = Arc::default();
    let requests = windowed(input.boxed(), queue.clone());
    let mut request = tonic::Request::new(requests);
    name_ends(&mut request, &target.identities, target.id, target.incarnation);
    let opening = replication_deadline(&option, 0);
    let answers = match tokio::time::timeout(opening, client.append_stream(request)).await {
        Err(_) => {
            let status = tonic::Status::deadline_exceeded("opening the append stream timed out");
            return Err(target.failed(&status));
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => return Ok(Opened::Unimplemented),
        Ok(Err(status)) => return Err(target.failed(&status)),
        Ok(Ok(response)) => response.into_inner(),
    };
    target.reach.observe(target.id, &target.address, Outcome::Answered, &"");
    let state = Some(Answers { answers, queue, last_answer_at: Instant::now(), option, target });
    Ok(Opened::Answers(futures::stream::unfold(state, |state| async move { state?.next().await }).boxed()))
}

/// `input` encoded, each request entered in `queue` once the window has room for it.
fn windowed(
    input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    queue: Queue,
) -> impl futures::Stream<Item = pb::RaftMessage> + Send + 'static {
    let window = Arc::new(Semaphore::new(WINDOW_BYTES));
    input.then(move |request| {
        let (window, queue) = (window.clone(), queue.clone());
        async move {
            let message = message(&request);
            let bytes = message.payload.len();
            let share = bytes.clamp(MESSAGE_BYTES_MIN, WINDOW_BYTES) as u32;
            let permit = window.acquire_many_owned(share).await.expect("the window is never closed");
            queue.lock().unwrap().push_back(Unanswered { _permit: permit, bytes, queued_at: Instant::now() });
            message
        }
    })
}

/// The answers of one stream, with what is unanswered.
struct Answers {
    answers: tonic::Streaming<pb::RaftMessage>,
    queue: Queue,
    last_answer_at: Instant,
    option: RPCOption,
    target: Target,
}

/// One answer of a pipelined replication stream, as openraft takes it.
pub(crate) type Item = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

impl Answers {
    /// The next answer, and the state to go on with (`None` after an error: the stream is over).
    async fn next(mut self) -> Option<(Item, Option<Answers>)> {
        loop {
            let oldest = self.queue.lock().unwrap().front().map(|sent| (sent.bytes, sent.queued_at));
            let wait = match oldest {
                Some((bytes, queued_at)) => {
                    let deadline =
                        queued_at.max(self.last_answer_at) + replication_deadline(&self.option, bytes);
                    deadline.saturating_duration_since(Instant::now())
                }
                None => IDLE_CHECK,
            };
            // `Streaming::message` keeps what it has read in the stream: a timeout loses nothing.
            let answer = match tokio::time::timeout(wait, self.answers.message()).await {
                Err(_) if oldest.is_none() => continue,
                Err(_) => {
                    let status = tonic::Status::deadline_exceeded("no answer on the append stream in time");
                    return Some((Err(self.target.failed(&status)), None));
                }
                Ok(Err(status)) => return Some((Err(self.target.failed(&status)), None)),
                // The follower ended the stream (after a conflict or a higher vote it answered).
                Ok(Ok(None)) => return None,
                Ok(Ok(Some(answer))) => answer,
            };
            if self.queue.lock().unwrap().pop_front().is_none() {
                let error =
                    NetworkError::from_string(format!("node {}: an answer to nothing sent", self.target.id));
                return Some((Err(RPCError::Network(error)), None));
            }
            self.last_answer_at = Instant::now();
            if let Some(applied) = answer.applied_index {
                self.target.pace.heard(self.target.id, applied);
            }
            return match unpack::<StreamAppendResult<TypeConfig>>(&answer) {
                Ok(result) => Some((Ok(result), Some(self))),
                Err(error) => Some((Err(RPCError::Network(NetworkError::from_string(error))), None)),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use openraft::network::RaftNetworkFactory;
    use openraft::network::v2::RaftNetworkV2;
    use openraft::raft::{AppendEntriesResponse, StreamAppendError};
    use openraft::testing::{blank_ent, log_id};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::net::identity::{Endpoint, Identities};
    use crate::types::{NodeInfo, Vote};

    /// A follower that counts what it receives and answers each request with its last log id,
    /// once `open` says so. Without `streams`, it is an older build: no AppendStream.
    struct Follower {
        streams: bool,
        received: Arc<AtomicUsize>,
        open: tokio::sync::watch::Receiver<bool>,
    }

    fn answer(request: &pb::RaftMessage) -> pb::RaftMessage {
        let rpc: AppendEntriesRequest<TypeConfig> = unpack(request).unwrap();
        message(&Ok::<_, StreamAppendError<TypeConfig>>(rpc.entries.last().map(|entry| entry.log_id)))
    }

    #[tonic::async_trait]
    impl pb::raft_server::Raft for Follower {
        async fn append_entries(
            &self,
            request: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            let _: AppendEntriesRequest<TypeConfig> = unpack(request.get_ref()).unwrap();
            self.received.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(message(&AppendEntriesResponse::<TypeConfig>::Success)))
        }

        type AppendStreamStream = futures::stream::BoxStream<'static, Result<pb::RaftMessage, Status>>;

        async fn append_stream(
            &self,
            request: Request<Streaming<pb::RaftMessage>>,
        ) -> Result<Response<Self::AppendStreamStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("not in this build"));
            }
            // Reads everything the leader sends at once, so that only the leader's window holds it back.
            let (sent, queued) = tokio::sync::mpsc::unbounded_channel();
            let (received, mut inbound) = (self.received.clone(), request.into_inner());
            tokio::spawn(async move {
                while let Ok(Some(request)) = inbound.message().await {
                    received.fetch_add(1, Ordering::SeqCst);
                    let _ = sent.send(request);
                }
            });
            let open = self.open.clone();
            let answers = tokio_stream::wrappers::UnboundedReceiverStream::new(queued).then(move |request| {
                let mut open = open.clone();
                async move {
                    let _ = open.wait_for(|open| *open).await;
                    Ok(answer(&request))
                }
            });
            Ok(Response::new(answers.boxed()))
        }

        async fn vote(&self, _: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn pre_vote(&self, _: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn transfer_leader(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn install_snapshot(
            &self,
            _: Request<Streaming<pb::SnapshotChunk>>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented(""))
        }

        async fn clock(&self, _: Request<pb::ClockRequest>) -> Result<Response<pb::ClockReply>, Status> {
            Err(Status::unimplemented(""))
        }
    }

    /// Starts `follower` as node 2 on a free port; returns node 1's connection to it.
    async fn connect(follower: Follower) -> crate::net::raft::Peer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::raft_server::RaftServer::new(follower))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        peer_at(address).await
    }

    /// Node 1's connection to node 2 at `address`.
    async fn peer_at(address: String) -> crate::net::raft::Peer {
        let identities = Arc::new(Identities::new(Endpoint { id: 1, incarnation: 1 }, None));
        let mut network = crate::net::Network::new(
            Default::default(),
            identities,
            None,
            std::sync::Arc::new(crate::pace::Pace::new(crate::pace::LAG_MAX_DEFAULT)),
        );
        let info =
            NodeInfo { address: address.clone(), peer_address: address, site: "b".into(), incarnation: 1 };
        network.new_client(2, &info).await
    }

    fn requests(count: u64) -> futures::stream::Iter<std::vec::IntoIter<AppendEntriesRequest<TypeConfig>>> {
        let requests: Vec<_> = (1..=count)
            .map(|index| AppendEntriesRequest {
                vote: Vote::new_committed(1, 1),
                prev_log_id: (index > 1).then(|| log_id::<TypeConfig>(1, 1, index - 1)),
                entries: vec![blank_ent::<TypeConfig>(1, 1, index)],
                leader_commit: None,
            })
            .collect();
        futures::stream::iter(requests)
    }

    /// A leader sends ahead without waiting for answers, but never more than its window: with
    /// nothing answered, 32 small requests (each counted as 1 MiB) and no more; once answers
    /// come, the rest, each answered in order.
    #[tokio::test]
    async fn requests_go_ahead_of_their_answers_up_to_the_window() {
        let received = Arc::new(AtomicUsize::new(0));
        let (open, opened) = tokio::sync::watch::channel(false);
        let mut peer = connect(Follower { streams: true, received: received.clone(), open: opened }).await;
        // Answers held back this long would be late: long enough for a busy test machine.
        let option = RPCOption::new(Duration::from_secs(10));
        let mut answers = peer.stream_append(requests(100), option).await.unwrap();
        let window = WINDOW_BYTES / MESSAGE_BYTES_MIN;
        let started = std::time::Instant::now();
        while received.load(Ordering::SeqCst) < window {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} received",
                received.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(received.load(Ordering::SeqCst), window, "sent beyond the window before any answer");
        open.send(true).unwrap();
        for index in 1..=100 {
            let answer = answers.next().await.expect("an answer").expect("no error");
            assert_eq!(answer, Ok(Some(log_id::<TypeConfig>(1, 1, index))));
        }
        assert!(answers.next().await.is_none());
        assert_eq!(received.load(Ordering::SeqCst), 100);
    }

    /// A peer that is down refuses the connection before anything is sent. openraft sleeps its
    /// replication backoff while it makes a stream's first request, so that request must come
    /// before the attempt: the leader retried a dead peer thousands of times a second, a core's
    /// worth, until it did (`tally dev`, one node killed).
    #[tokio::test]
    async fn a_peer_that_is_down_is_tried_only_once_the_first_request_is_made() {
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let mut peer = peer_at(address).await;
        // The backoff, as openraft takes it: before the first request is made.
        let backoff = Duration::from_millis(300);
        let mut later = requests(3);
        let first = later.next().await.unwrap();
        let input = Box::pin(
            futures::stream::once(async move {
                tokio::time::sleep(backoff).await;
                first
            })
            .chain(later),
        );
        let started = std::time::Instant::now();
        let result = peer.stream_append(input, RPCOption::new(Duration::from_secs(1))).await;
        assert!(result.is_err(), "a peer that is down answered");
        assert!(
            started.elapsed() >= backoff,
            "tried again after {:?}, before the backoff",
            started.elapsed()
        );
    }

    /// A follower of a build without AppendStream: the first session fails, and from then on
    /// its requests go one at a time, answered as before.
    #[tokio::test]
    async fn a_follower_without_streams_gets_one_request_at_a_time() {
        let received = Arc::new(AtomicUsize::new(0));
        let (_open, opened) = tokio::sync::watch::channel(true);
        let mut peer = connect(Follower { streams: false, received: received.clone(), open: opened }).await;
        let option = RPCOption::new(Duration::from_millis(50));
        assert!(peer.stream_append(requests(3), option.clone()).await.is_err());
        let answers: Vec<_> = peer.stream_append(requests(3), option).await.unwrap().collect().await;
        let expected: Vec<_> = (1..=3).map(|index| Ok(Some(log_id::<TypeConfig>(1, 1, index)))).collect();
        assert_eq!(answers.into_iter().map(|answer| answer.unwrap()).collect::<Vec<_>>(), expected);
        assert_eq!(received.load(Ordering::SeqCst), 3);
    }
}
