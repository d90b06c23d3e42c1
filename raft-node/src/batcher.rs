//! Group commit: the leader coalesces concurrent client batches into one Raft entry, so that one
//! fsync and one replication round serve many requests. Each caller gets exactly its own reply.
//!
//! The batcher takes every batch waiting in its queue (and, if configured, waits up to
//! `delay` for more), bounded by `ENTRY_BATCHES_MAX` batches and `ENTRY_EVENTS_MAX` events, and
//! proposes them as one entry. Up to `ENTRIES_IN_FLIGHT_MAX` entries are proposed at once; while
//! they are in flight, new requests pile up in the queue and form the next, larger entry.
//!
//! A write from a connection with nothing else waiting, while another connection has several,
//! is light: it goes to a queue of its own whose entries have their own slot
//! (`LIGHT_ENTRIES_IN_FLIGHT_MAX`), and at capacity it is still taken (up to `LIGHT_EVENTS_MAX`)
//! while the others are refused. A payment service that waits for each answer then shares the
//! leader with an open-loop flood instead of queueing behind it, sharing its large entries, or
//! being refused because the flood always has the next request ready.

use std::sync::Arc;
use std::time::Duration;

use ledger::{Batch, BatchReply};
use openraft::type_config::async_runtime::WatchReceiver;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::Status;

use crate::clock::ClusterClock;
use crate::storage::Raft;
use crate::storage::state_machine::Shared;
use crate::types::{ENTRY_BATCHES_MAX, NodeId, Request};

/// Events per entry: four full batches (about 4 MiB), well under the message limit.
pub const ENTRY_EVENTS_MAX: usize = 4 * ledger::BATCH_EVENTS_MAX;
/// How long one entry of the others (not light writes) should take the leader to apply, by
/// default (`--entry-apply-target-ms`): each is cut to the events it applies in this long by its recent costs (`ApplyCost`), within
/// `ENTRY_EVENTS_MIN` (one batch goes in whole, however large) and `ENTRY_EVENTS_MAX`. A write
/// waits for the entries in flight ahead of it to apply, a light one too (it skips the queue, not
/// the log): at rush hour, with a restarted node catching up beside them on two cores, the leader
/// applied 13,000 events a second, and entries of 8,000-16,000 events took a second each, so the
/// light writes of payment services waited two seconds and more, and timed out (issue 24, a 300-s
/// run of power cuts, 2026-12-07). Two runs at rush hour: 34-39 of 46 faults under a second
/// against 23, at 13-16% less of an open-loop load carried (docs/results/chaos.md).
pub const ENTRY_APPLY_TARGET: Duration = Duration::from_millis(100);
/// The fewest events `ENTRY_APPLY_TARGET` cuts an entry to: each entry has a fixed cost besides
/// applying (an fsync and a replication round on each node).
pub const ENTRY_EVENTS_MIN: usize = 1024;
/// Entries proposed and not yet applied, per leader. This is what makes group commit adapt: an
/// idle leader proposes a lone request at once (small entry, low latency); a busy one has both
/// slots taken, requests queue meanwhile, and the next entry carries all of them. Every entry
/// costs each node a fixed amount (an fsync, a replication round, the apply), so fewer, larger entries win under load: with 64 single-transfer
/// clients, 16 in flight gave entries of ~3 requests and 5,500 transfers/s; 2 gives ~12 and
/// 8,300/s at a lower p99 (`tally benchmark --clients 64 --batch 1`). One alone leaves the disk
/// idle while an entry replicates.
pub const ENTRIES_IN_FLIGHT_MAX: usize = 2;
/// Entries a leader may have committed and not applied and still take writes; past it, it refuses
/// them (it hands leadership to a voter that has applied, `service::cluster`, once its backlog
/// would take longer than `node::standing::BEHIND_MAX`). A few entries of
/// group commit are normal, hundreds are a backlog (a restart's replay, an election won while
/// catching up).
pub const APPLY_BACKLOG_MAX: u64 = 128;
/// Batches waiting for the batcher; a full queue pushes back on clients.
pub const QUEUE_BATCHES_MAX: usize = 16 * 1024;
/// The default longest wait in the leader's queue that still takes more writes
/// (`--max-queue-wait-ms`): past what the cluster can commit, requests are refused at once
/// rather than queued for seconds.
pub const QUEUE_WAIT_MS_DEFAULT: u64 = 50;
/// The default bytes of events submitted and not yet answered (`--max-queued-bytes`): 256
/// full batches. The count above alone allowed 16 GiB of 1 MiB batches.
pub const QUEUE_BYTES_DEFAULT: u64 = 256 << 20;

/// Events of light writes (`Callers::enter`) waiting at most, about one entry: past it, a
/// light write is refused at capacity like any other. So one waits at most for the entries in
/// flight and one light entry before its own.
pub const LIGHT_EVENTS_MAX: usize = ENTRY_EVENTS_MAX;
/// Entries of light writes proposed and not yet applied, beside `ENTRIES_IN_FLIGHT_MAX` of the
/// others.
pub const LIGHT_ENTRIES_IN_FLIGHT_MAX: usize = 1;

/// gRPC's header for how long a client should wait before retrying a refused call.
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// What a batcher takes before it refuses writes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of events waiting or in flight (`--max-queued-bytes`).
    pub bytes_max: u64,
    /// The longest wait in the queue (`--max-queue-wait-ms`).
    pub queue_wait_max: Duration,
    /// How long an entry of the others should take to apply (`--entry-apply-target-ms`,
    /// `ENTRY_APPLY_TARGET` by default); `None`: no cut.
    pub entry_apply_target: Option<Duration>,
}

type Reply = oneshot::Sender<Result<BatchReply, Status>>;

/// Where a write comes from, to share the leader fairly at capacity: the connection it came on
/// (its caller's address), or for a write a follower forwarded, the connection it came on
/// there (`service::ledger`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Origin(pub String);

/// How many writes each origin has waiting for an answer here.
#[derive(Default)]
struct Callers {
    waiting: std::sync::Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    /// Writes waiting, of each origin that has any.
    of: std::collections::HashMap<Origin, usize>,
    /// Origins with more than one write waiting.
    several: usize,
}

impl Callers {
    /// One more write of `origin` waits until the returned guard drops. The guard says whether
    /// the write is light: its connection had nothing else waiting, and another had more than
    /// one. (One look under the lock decides and counts.)
    fn enter(self: &Arc<Callers>, origin: Origin) -> Waiting {
        let mut waiting = self.waiting.lock().unwrap();
        let light = !waiting.of.contains_key(&origin) && waiting.several > 0;
        let count = waiting.of.entry(origin.clone()).or_default();
        *count += 1;
        if *count == 2 {
            waiting.several += 1;
        }
        Waiting { callers: self.clone(), origin, light }
    }
}

/// A write of `origin` waiting for its answer (`Callers::enter`).
struct Waiting {
    callers: Arc<Callers>,
    origin: Origin,
    light: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self.callers.waiting.lock().unwrap();
        let Some(count) = waiting.of.get_mut(&self.origin) else { return };
        *count -= 1;
        match *count {
            0 => {
                waiting.of.remove(&self.origin);
            }
            1 => waiting.several -= 1,
            _ => {}
        }
    }
}

/// A batch waiting for its entry, where its reply goes, when it was submitted, and its share of
/// `--max-queued-bytes`, which goes back only once the entry is done: the caller may be gone
/// long before (a deadline, a reset stream) while the batch still waits or replicates. (`None`
/// when a `Slot` holds it.)
struct Queued {
    batch: Batch,
    reply: Reply,
    submitted: tokio::time::Instant,
    bytes: Option<OwnedSemaphorePermit>,
}

#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Queued>,
    /// Light writes (`Callers::enter`), which the next entry takes first.
    light: mpsc::Sender<Queued>,
    /// Events of the light writes queued.
    light_events: Arc<std::sync::atomic::AtomicUsize>,
    /// `ENTRIES_IN_FLIGHT_MAX` permits, shared with the batcher task: a request that finds the
    /// queue empty and a slot free proposes its entry itself (`submit`).
    in_flight: Arc<Semaphore>,
    proposer: Proposer,
    /// Whether a lone request may propose itself: not with a group-commit delay configured.
    direct: bool,
    /// One permit per byte of events submitted and not answered yet.
    bytes: Arc<Semaphore>,
    bytes_max: usize,
    /// How long the last entry's first batch waited in the queue, in microseconds (`run`).
    queue_wait_us: Arc<std::sync::atomic::AtomicU64>,
    /// Past this wait, while batches queue, new ones are refused (RESOURCE_EXHAUSTED).
    queue_wait_max: Duration,
    /// Writes waiting per origin, for who is refused at capacity.
    callers: Arc<Callers>,
}

/// The memory a batch's events take.
fn batch_bytes(batch: &Batch) -> usize {
    match batch {
        Batch::CreateAccounts(accounts) => std::mem::size_of_val(&accounts[..]),
        Batch::CreateTransfers(transfers) => std::mem::size_of_val(&transfers[..]),
    }
}

impl Batcher {
    /// `clock` gives the timestamp of each entry; `me` is this node's id; `state` its state
    /// machine (how fast it applies sizes entries). At most `bytes_max` bytes of events are
    /// waiting or in flight at a time. A queue whose batches wait longer than
    /// `limits.queue_wait_max` refuses more.
    pub fn start(
        raft: Raft,
        delay: Duration,
        clock: Arc<ClusterClock>,
        me: NodeId,
        limits: Limits,
        pace: Arc<crate::pace::Pace>,
        state: Arc<Shared>,
    ) -> Batcher {
        let (queue, receiver) = mpsc::channel(QUEUE_BATCHES_MAX);
        let (light, light_receiver) = mpsc::channel(QUEUE_BATCHES_MAX);
        let light_events = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let in_flight = Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX));
        let last_commit_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let entry_apply_target = limits.entry_apply_target;
        let proposer = Proposer { raft, clock, me, last_commit_us, pace, state, entry_apply_target };
        let queue_wait_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let others = Lane {
            queue: receiver,
            slots: in_flight.clone(),
            queue_wait_us: Some(queue_wait_us.clone()),
            light_events: None,
            light: false,
        };
        let lights = Lane {
            queue: light_receiver,
            slots: Arc::new(Semaphore::new(LIGHT_ENTRIES_IN_FLIGHT_MAX)),
            queue_wait_us: None,
            light_events: Some(light_events.clone()),
            light: true,
        };
        tokio::spawn(run(proposer.clone(), others, delay));
        tokio::spawn(run(proposer.clone(), lights, delay));

        let bytes_max = (limits.bytes_max as usize).min(Semaphore::MAX_PERMITS);
        Batcher {
            queue,
            light,
            light_events,
            in_flight,
            proposer,
            direct: delay.is_zero(),
            bytes: Arc::new(Semaphore::new(bytes_max)),
            bytes_max,
            queue_wait_us,
            queue_wait_max: limits.queue_wait_max,
            callers: Arc::default(),
        }
    }

    /// Proposes `batch`, from `origin`, and waits for its reply. UNAVAILABLE means the outcome
    /// is unknown only when it says so; either way, retrying with the same ids is safe.
    /// RESOURCE_EXHAUSTED means nothing was proposed: the node is at capacity, or holds as many
    /// bytes of events as it takes.
    pub async fn submit(&self, batch: Batch, origin: Origin) -> Result<BatchReply, Status> {
        // A leader with a backlog to apply would answer only once it is through it (seconds):
        // it hands leadership over (`service::cluster::hand_over_while_applying`), and refuses
        // meanwhile, so that the client retries on the next leader.
        let backlog = {
            let metrics = self.proposer.raft.metrics();
            let current = metrics.borrow_watched();
            let applied = current.last_applied.map_or(0, |id| id.index);
            current.local_committed.map_or(0, |id| id.index).saturating_sub(applied)
        };
        if backlog > APPLY_BACKLOG_MAX {
            return Err(Status::unavailable(format!(
                "this node leads but still applies {backlog} committed entries; it hands leadership to a node \
                 that has applied them: nothing was written, retry"
            )));
        }
        // At capacity: the last entry's first batch waited longer than we let a write queue, and
        // longer than an entry takes to commit, and batches queue still. A batch that arrives
        // while both entries are in flight waits for the older one, less than a commit, and the
        // next entry takes all that waits, up to its bounds: a longer wait means entries are full
        // and a backlog grows (large entries of group commit only make each commit longer). Refused at once, with when to come back,
        // rather than queued for seconds behind what the cluster cannot commit in time (issue 24,
        // item 5). A light write still goes in, to its own queue, while that holds less than
        // an entry (an open-loop flood beside payment services that wait for each answer: the
        // flood would otherwise take every place that frees, since it always has a request
        // arriving).
        let load = |value: &std::sync::atomic::AtomicU64| {
            Duration::from_micros(value.load(std::sync::atomic::Ordering::Relaxed))
        };
        let waited = load(&self.queue_wait_us);
        let commit = load(&self.proposer.last_commit_us);
        // Counted from here; a refusal below drops the count with the guard.
        let waiting = self.callers.enter(origin);
        let light = waiting.light;
        let light_room =
            light && self.light_events.load(std::sync::atomic::Ordering::Relaxed) < LIGHT_EVENTS_MAX;
        if waited > self.queue_wait_max.max(commit)
            && self.queue.capacity() < QUEUE_BATCHES_MAX
            && !light_room
        {
            let retry_ms = waited.as_millis().max(1) as u64;
            let mut status = Status::resource_exhausted(format!(
                "the leader is at capacity (writes waited {} ms to be proposed, more than {} ms): nothing was \
                 written; retry in about {retry_ms} ms with the same ids, or send fewer requests",
                waited.as_millis(),
                self.queue_wait_max.as_millis()
            ));
            status.metadata_mut().insert(RETRY_PUSHBACK_HEADER, retry_ms.into());
            return Err(status);
        }
        let bytes = batch_bytes(&batch);
        let held = u32::try_from(bytes)
            .ok()
            .and_then(|bytes| self.bytes.clone().try_acquire_many_owned(bytes).ok())
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "this node holds as many events as it takes ({} MiB waiting or being replicated; this \
                     batch is {bytes} bytes): nothing was proposed; retry later, or send to another node",
                    self.bytes_max >> 20
                ))
            })?;
        crate::metrics::BATCH_EVENTS.observe(batch.len() as f64);
        let (reply, receiver) = oneshot::channel();
        let mut queued = Queued { batch, reply, submitted: tokio::time::Instant::now(), bytes: Some(held) };
        // A lone request on an idle leader proposes its entry from its own task: through the
        // queue it cost two more hand-offs (the batcher task, then a task per entry) for an
        // entry of one batch all the same. Only when nothing queues (the batcher's first
        // request waits for a slot with the queue empty, and may then wait one entry more) and
        // a slot is free, so group commit under load is unchanged; without a configured delay,
        // which asks to wait for company.
        if self.direct
            && self.queue.capacity() == QUEUE_BATCHES_MAX
            && self.light.capacity() == QUEUE_BATCHES_MAX
            && self.keeps_pace()
            && let Ok(permit) = self.in_flight.clone().try_acquire_owned()
        {
            // Dropped with this future (the caller went away) while Raft still holds the entry,
            // the slot and the bytes stay taken until the log as it stands now is applied.
            let slot =
                Slot { permits: Some((permit, queued.bytes.take())), raft: self.proposer.raft.clone() };
            propose(&self.proposer, vec![queued]).await;
            slot.release();
            return receiver.await.map_err(reply_lost)?;
        }
        let queue = if light {
            self.light_events.fetch_add(queued.batch.len(), std::sync::atomic::Ordering::Relaxed);
            &self.light
        } else {
            &self.queue
        };
        queue.send(queued).await.map_err(|_| Status::unavailable("node is shutting down"))?;
        receiver.await.map_err(reply_lost)?
    }

    /// Whether the follower that would take over keeps up (`pace`): otherwise a lone request
    /// goes through the queue, which waits for it.
    fn keeps_pace(&self) -> bool {
        self.proposer.pace.keeps_up(&crate::clock::voters(&self.proposer.raft), self.proposer.me)
    }
}

/// An entry slot taken by a request proposing for itself (`Batcher::submit`).
struct Slot {
    /// The entry slot and the batch's bytes.
    permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
    raft: Raft,
}

impl Slot {
    /// The entry is done: the slot and the bytes are free.
    fn release(mut self) {
        self.permits.take();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permits) = self.permits.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut metrics = self.raft.metrics();
        let proposed = metrics.borrow_watched().last_log_index;
        runtime.spawn(async move {
            while metrics.borrow_watched().last_applied.map(|id| id.index) < proposed {
                if metrics.changed().await.is_err() {
                    break;
                }
            }
            drop(permits);
        });
    }
}

/// What an entry is proposed with.
#[derive(Clone)]
struct Proposer {
    raft: Raft,
    clock: Arc<ClusterClock>,
    me: NodeId,
    /// How long the last entry took from proposal to commit and apply, in microseconds.
    last_commit_us: Arc<std::sync::atomic::AtomicU64>,
    /// Holds proposals back while the follower that would take over lags in applying.
    pace: Arc<crate::pace::Pace>,
    /// This node's state machine: how fast it applies (`ENTRY_APPLY_TARGET`).
    state: Arc<Shared>,
    /// `Limits::entry_apply_target`.
    entry_apply_target: Option<Duration>,
}

impl Proposer {
    /// The most events an entry of the others may carry now (`ENTRY_APPLY_TARGET`).
    fn entry_events_max(&self) -> usize {
        let within = self.entry_apply_target.and_then(|target| self.state.apply_cost().events_within(target));
        entry_events_max(within)
    }
}

/// `within` (the events applied within the target, if known and cut to), bounded by
/// `ENTRY_EVENTS_MIN` and `ENTRY_EVENTS_MAX`.
fn entry_events_max(within: Option<usize>) -> usize {
    within.map_or(ENTRY_EVENTS_MAX, |events| events.clamp(ENTRY_EVENTS_MIN, ENTRY_EVENTS_MAX))
}

/// One queue the batcher forms entries from, and its entry slots. Light writes and the others
/// each have their own (`Batcher::start`), so a light write never waits for a slot behind the
/// queue of the others nor shares an entry with them: it waits only for the entries in flight
/// before it to apply.
struct Lane {
    queue: mpsc::Receiver<Queued>,
    slots: Arc<Semaphore>,
    /// Where the lane of the others records its oldest batch's wait (the test for capacity).
    queue_wait_us: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Where the light lane gives back the events it takes from its queue.
    light_events: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// The light writes' lane: its entries are cut only to `ENTRY_EVENTS_MAX`, not to
    /// `ENTRY_APPLY_TARGET` (they are at most about an entry, `LIGHT_EVENTS_MAX`, and few), and
    /// pacing does not hold them back: a payment service waiting for each answer is not what
    /// makes a follower fall behind, and at rush hour, with the only follower left catching up,
    /// pacing held each of its writes a quarter of a second (`pace::WAIT_MAX`).
    light: bool,
}

impl Lane {
    /// The next write waiting, now or (with `until`) up to then; `None` when there is none.
    async fn next(&mut self, until: Option<tokio::time::Instant>) -> Option<Queued> {
        let next = match (self.queue.try_recv(), until) {
            (Ok(next), _) => Some(next),
            (Err(_), None) => None,
            (Err(_), Some(until)) => tokio::time::timeout_at(until, self.queue.recv()).await.ok().flatten(),
        };
        self.taken(next)
    }

    fn taken(&self, next: Option<Queued>) -> Option<Queued> {
        if let (Some(queued), Some(events)) = (&next, &self.light_events) {
            events.fetch_sub(queued.batch.len(), std::sync::atomic::Ordering::Relaxed);
        }
        next
    }
}

/// Forms and proposes entries from `lane` until the batcher is gone.
async fn run(proposer: Proposer, mut lane: Lane, delay: Duration) {
    // A write taken from the queue that did not fit the entry before: the next one's first.
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match lane.queue.recv().await {
                Some(first) => lane.taken(Some(first)).expect("a write was received"),
                None => return,
            },
        };
        // Waiting for a slot first lets the queue grow while earlier entries are in flight; so
        // does waiting for the followers to keep pace, which counts as time in the queue.
        let permit = lane.slots.clone().acquire_owned().await.expect("semaphore never closed");
        if !lane.light {
            proposer.pace.keep(&crate::clock::voters(&proposer.raft), proposer.me).await;
        }
        if let Some(queue_wait_us) = &lane.queue_wait_us {
            queue_wait_us
                .store(first.submitted.elapsed().as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let events_max = if lane.light { ENTRY_EVENTS_MAX } else { proposer.entry_events_max() };
        let mut events = first.batch.len();
        let mut group = vec![first];
        let deadline = (!delay.is_zero()).then(|| tokio::time::Instant::now() + delay);
        while group.len() < ENTRY_BATCHES_MAX && events < events_max {
            let Some(next) = lane.next(deadline).await else { break };
            if events + next.batch.len() > events_max {
                carried = Some(next);
                break;
            }
            events += next.batch.len();
            group.push(next);
        }
        let proposer = proposer.clone();
        tokio::spawn(async move {
            propose(&proposer, group).await;
            drop(permit);
        });
    }
}

/// What a caller hears when its reply was dropped unsent: the node stopped mid-write.
fn reply_lost(_: oneshot::error::RecvError) -> Status {
    Status::unavailable("node is shutting down; outcome unknown, retry with the same ids")
}

/// Proposes `group` as one entry and answers each of its callers.
async fn propose(proposer: &Proposer, group: Vec<Queued>) {
    for queued in &group {
        crate::metrics::GROUP_COMMIT_WAIT.observe(queued.submitted.elapsed().as_secs_f64());
    }
    crate::metrics::ENTRY_BATCHES.observe(group.len() as f64);
    crate::metrics::ENTRY_EVENTS.observe(group.iter().map(|queued| queued.batch.len()).sum::<usize>() as f64);
    let mut batches = Vec::with_capacity(group.len());
    let mut replies: Vec<Reply> = Vec::with_capacity(group.len());
    // The bytes go back when this function ends, after the replies are sent.
    let mut _held = Vec::with_capacity(group.len());
    for Queued { batch, reply, bytes, .. } in group {
        batches.push(batch);
        replies.push(reply);
        _held.push(bytes);
    }
    let voters = crate::clock::voters(&proposer.raft);
    let timestamp_proposed = match proposer.clock.stamp(&voters, proposer.me) {
        Ok(timestamp) => timestamp,
        Err(error) => {
            let status = Status::unavailable(format!("{error}; nothing was written, retry"));
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
            return;
        }
    };
    let request = Request::batches(timestamp_proposed, batches);
    let proposed = std::time::Instant::now();
    let written = proposer.raft.client_write(request).await;
    let took = proposed.elapsed();
    crate::metrics::COMMIT_SECONDS.observe(took.as_secs_f64());
    proposer.last_commit_us.store(took.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    match written {
        Ok(written) => {
            let results = written.data.replies;
            assert_eq!(results.len(), replies.len(), "an entry's replies do not match its batches");
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(error) => {
            let status = write_error_status(&error);
            for reply in replies {
                let _ = reply.send(Err(status.clone()));
            }
        }
    }
}

fn write_error_status(
    error: &openraft::error::RaftError<
        crate::types::TypeConfig,
        openraft::error::ClientWriteError<crate::types::TypeConfig>,
    >,
) -> Status {
    use openraft::error::{ClientWriteError, RaftError};
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Status::unavailable(
            "this node stopped being the leader before proposing; nothing was written, retry",
        ),
        other => Status::unavailable(format!("write outcome unknown ({other}); retry with the same ids")),
    }
}

/// How often the leader looks whether the earliest timeout of a pending transfer has come.
pub const EXPIRY_POLL: Duration = Duration::from_millis(100);

/// On the leader, for the life of the node: once the earliest timeout of a pending transfer is
/// due by the time the leader may stamp (its clock bounded by a majority's, as for any entry),
/// proposes a tick, an entry of that time and no batch, which expires what is due
/// (`ledger::Ledger::apply`). So an idle ledger releases reservations within about
/// `EXPIRY_POLL` plus a commit of their timeout, instead of at the next write (polls that find
/// an entry being applied are skipped). A leader that
/// may not stamp proposes nothing; a tick that finds nothing due (a write expired it first)
/// changes nothing but the digest.
pub async fn expire_when_due(
    raft: Raft,
    state: Arc<crate::storage::state_machine::Shared>,
    clock: Arc<ClusterClock>,
    me: NodeId,
) {
    let mut poll = tokio::time::interval(EXPIRY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        poll.tick().await;
        if raft.metrics().borrow_watched().current_leader != Some(me) {
            continue;
        }
        // Never waits for the ledger: a poll during an apply is skipped (the batch being applied
        // expires what is due anyway). Blocking here held a runtime worker for the length of each
        // apply under batch load, and heartbeats starved into elections.
        let due = match state.try_read(|ledger| ledger.next_expiry()) {
            None | Some(Ok(None)) => continue,
            Some(Ok(Some(due))) => due,
            Some(Err(error)) => {
                tracing::error!("cannot read the next expiry: {error}");
                continue;
            }
        };
        let Ok(now) = clock.stamp(&crate::clock::voters(&raft), me) else { continue };
        if now < due {
            continue;
        }
        match raft.client_write(Request::batches(now, Vec::new())).await {
            Ok(_) => crate::metrics::EXPIRY_TICKS.inc(),
            Err(error) => tracing::debug!("expiry tick not written: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(name: &str) -> Origin {
        Origin(name.to_owned())
    }

    #[test]
    fn at_capacity_a_connection_with_nothing_waiting_goes_before_one_with_several() {
        let callers = Arc::new(Callers::default());
        let light = |name: &str| callers.enter(origin(name)).light;
        let flood: Vec<Waiting> = (0..3).map(|_| callers.enter(origin("flood"))).collect();
        assert!(flood.iter().all(|w| !w.light), "the first came before anyone had several waiting");
        let payment = callers.enter(origin("payment"));
        assert!(payment.light);
        // The payment service waits for its answer: its next write is not light meanwhile.
        assert!(!light("payment"));
        drop(payment);
        assert!(light("payment"));
        assert!(light("new"), "a connection never seen has nothing waiting");
        // The flood's own writes are never light.
        assert!(!light("flood"));
        drop(flood);
        let waiting = callers.waiting.lock().unwrap();
        assert!(waiting.of.is_empty() && waiting.several == 0, "every count goes back to nothing");
    }

    #[test]
    fn entries_take_the_apply_target_within_their_bounds() {
        assert_eq!(entry_events_max(None), ENTRY_EVENTS_MAX, "nothing applied yet: no cut");
        assert_eq!(entry_events_max(Some(1_300)), 1_300);
        assert_eq!(entry_events_max(Some(10)), ENTRY_EVENTS_MIN);
        assert_eq!(entry_events_max(Some(usize::MAX)), ENTRY_EVENTS_MAX);
    }

    /// Entries sized by `ApplyCost`, each applied at `fixed` plus `per_event`, from a first entry
    /// of `first` events, in whole batches of `batch` events: the size they settle at.
    fn settled(fixed: Duration, per_event: Duration, first: usize, batch: usize) -> usize {
        let cost = crate::storage::state_machine::ApplyCost::default();
        let mut events = first;
        for _ in 0..60 {
            cost.record(events, fixed + per_event * events as u32);
            let max = entry_events_max(cost.events_within(ENTRY_APPLY_TARGET));
            events = (max / batch).max(1) * batch;
        }
        events
    }

    fn assert_near_target(events: usize, took: Duration) {
        let near = took > ENTRY_APPLY_TARGET * 8 / 10 && took <= ENTRY_APPLY_TARGET;
        assert!(near, "entries of {events} events take {took:?}");
    }

    #[test]
    fn entries_settle_at_the_target_whatever_their_fixed_cost() {
        // The rush-hour leader of issue 24: 13,000 events a second, a few ms per entry.
        let rush = Duration::from_secs(1) / 13_000;
        let events = settled(Duration::from_millis(3), rush, 16_000, 100);
        assert_near_target(events, Duration::from_millis(3) + rush * events as u32);
        // From small entries up.
        let fast = Duration::from_secs(1) / 100_000;
        let events = settled(Duration::from_millis(20), fast, 100, 100);
        assert_near_target(events, Duration::from_millis(20) + fast * events as u32);
        // A fixed part as long as the target (`--apply-delay-ms 100`), full batches: entries do
        // not shrink to one batch, but take at least as long to apply as the fixed part.
        let batch = ledger::BATCH_EVENTS_MAX;
        let events = settled(Duration::from_millis(100), Duration::from_secs(1) / 300_000, 4 * batch, batch);
        assert!(events >= 3 * batch, "{events} events");
    }

    #[test]
    fn among_equals_nobody_is_light() {
        // Many clients of one request each: nobody floods, so nobody goes ahead at capacity.
        let callers = Arc::new(Callers::default());
        let waiting: Vec<Waiting> = (0..8).map(|i| callers.enter(origin(&format!("client {i}")))).collect();
        assert!(waiting.iter().all(|w| !w.light));
        assert!(!callers.enter(origin("client 8")).light);
        let _second = callers.enter(origin("client 0"));
        assert!(callers.enter(origin("client 8")).light, "client 0 has two waiting now");
    }
}
