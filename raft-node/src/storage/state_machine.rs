//! openraft's state machine over the `ledger` crate and its state store (`tally_store::RunStore`,
//! on redb).
//!
//! Each applied entry is one `Ledger::apply`: the entry's batches and the applied log id and
//! membership (`AppliedState`, stored as the ledger's app meta), together. Entries are applied in
//! memory and reach the store in checkpoints, each one atomic write: a crash leaves the store at
//! some whole checkpoint, and openraft re-applies the entries after it from the log.
//!
//! Snapshots are files: the ledger's export stream, written, fsynced and renamed into
//! `<data-dir>/snapshots/` before openraft hears of them, so that the log is only ever purged
//! behind a durable snapshot. Installing one imports it into a fresh state directory and swaps
//! directories, so a crash mid-install leaves the old state or the new one, never a mix. On start,
//! if the store is behind the newest snapshot (it lost entries the log no longer has), the snapshot is
//! reloaded.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use ledger::checkpoint::{CheckpointJob, FrozenLayers};
use ledger::{Checkpointed, Ledger, Store};
use openraft::EntryPayload;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use serde::{Deserialize, Serialize};
use tally_store::Options as StoreOptions;
use tally_store::RunStore;

use crate::storage::files;
use crate::sys::state_store;
use crate::types::{
    Entry, LogId, Response, Snapshot, SnapshotMeta, StoredMembership, TypeConfig, decode, encode,
};

/// The ledger as a node keeps it: applied in memory, written to its store in checkpoints.
pub type State = Ledger<Checkpointed<RunStore>>;

/// When applied entries go from memory to the store (`--checkpoint-bytes`, `--checkpoint-interval-ms`).
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// A checkpoint is sealed this long after the last one. A restart re-applies what no
    /// checkpoint carried from the log, so this bounds that work too. Each checkpoint is a burst of work on a busy machine: every 200 ms rather
    /// than every second cut p99.9 with 64 single-transfer clients from 67-85 ms to ~31 ms at
    /// the same throughput...
    pub interval: std::time::Duration,
    /// ... or once this much memory waits for one (`Checkpointed::recent_bytes`); at twice this
    /// while the checkpoint thread is still busy, applying waits for it.
    pub bytes_max: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> CheckpointPolicy {
        CheckpointPolicy { interval: std::time::Duration::from_millis(200), bytes_max: 64 << 20 }
    }
}

const STATE_DIR: &str = "state";
const STATE_NEW_DIR: &str = "state.new";
const STATE_OLD_DIR: &str = "state.old";
const SNAPSHOT_DIR: &str = "snapshots";
/// Snapshot files being received (`service/raft.rs`); any found at start are leftovers of a
/// process that died while receiving.
pub const INCOMING_PREFIX: &str = "incoming-";
/// A snapshot being exported, renamed into place once complete.
const BUILDING_FILE: &str = "building.tmp";
/// A backup being exported (`Shared::export_backup`): unlinked once written, so only a process
/// that died while writing one leaves it.
const BACKUP_FILE: &str = "backup.tmp";
const SNAPSHOT_META_FILE: &str = "current.meta";
/// Written when applying finds the ledger state damaged: the next start discards the state and
/// rebuilds it (`StateMachine::open`).
pub const DAMAGED_MARKER: &str = "state.damaged";

/// What the state machine has applied, stored atomically with the state it describes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// Digest marks are taken after every index that is a multiple of this.
pub const DIGEST_MARK_EVERY: u64 = 64;
/// Digest marks kept (the newest): 4,096 entries' worth, so that members a little apart under
/// load still share some.
const DIGEST_MARKS_KEPT: usize = 64;

/// Where the applied state stands, as status reports it: kept beside the ledger and read
/// without its lock, which an apply or a snapshot install holds for up to seconds (status held
/// a runtime worker meanwhile).
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The last applied index (0: none).
    pub index: u64,
    /// The ledger's running digest after it.
    pub digest: [u8; 32],
    /// The digest after each recent multiple of `DIGEST_MARK_EVERY` applied, oldest first; since
    /// the last start or snapshot install only.
    pub marks: std::collections::VecDeque<(u64, [u8; 32])>,
    /// The semantics version the ledger applies entries with (`ledger::semantics`).
    pub semantics: u32,
}

impl Published {
    fn applied(&mut self, index: u64, meta: &ledger::codec::LedgerMeta) {
        let digest = meta.digest;
        self.index = index;
        self.digest = digest;
        self.semantics = meta.semantics;
        if index.is_multiple_of(DIGEST_MARK_EVERY) {
            if self.marks.len() == DIGEST_MARKS_KEPT {
                self.marks.pop_front();
            }
            self.marks.push_back((index, digest));
        }
    }

    fn reset(&mut self, index: u64, meta: &ledger::codec::LedgerMeta) {
        *self =
            Published { index, digest: meta.digest, marks: Default::default(), semantics: meta.semantics };
    }
}

pub use crate::types::SnapshotFile;

/// The ledger and what was applied to it, shared with the gRPC services for reads.
/// Lock order: `ledger` before `applied`, always.
pub struct Shared {
    data_dir: PathBuf,
    options: StoreOptions,
    /// Reads (lookups, queries, digests) take it shared; applying an entry takes it exclusively.
    /// A std lock: it is never held across an await. `None` only inside `install_file`, which
    /// holds the lock exclusively while the state's directory is swapped.
    ledger: RwLock<Option<State>>,
    pub applied: Mutex<AppliedState>,
    /// Taken after `applied`, never while waiting for anything else.
    published: Mutex<Published>,
    /// The newest semantics version this node applies (`--semantics-max`, else the build's).
    semantics_max: std::sync::atomic::AtomicU32,
    /// Test hook (`--apply-delay-ms`): added to every applied entry, in microseconds.
    apply_delay_us: std::sync::atomic::AtomicU64,
    /// What applying costs this node lately, for the batcher to size entries by.
    apply_cost: ApplyCost,
    /// Held by a snapshot build from before it freezes its view until its snapshot is current,
    /// and by a snapshot install throughout: applying goes on during a build, so an install could
    /// otherwise swap the state's directory under a live view, or be overwritten as current by an
    /// older build. Never taken while holding the ledger lock.
    snapshots: Mutex<()>,
    checkpoint_policy: CheckpointPolicy,
    /// When the last checkpoint was sealed or written (`checkpoint_when_due`).
    checkpointed_at: Mutex<tokio::time::Instant>,
    /// To the checkpoint thread (`checkpoint_thread`). A std channel: its sender is called with
    /// the ledger lock held, outside any async context.
    checkpoints: std::sync::mpsc::Sender<CheckpointJob<RunStore>>,
    /// Taken by the checkpoint thread while it writes a job. Test hook: holding it keeps a job
    /// under way (a disk that takes seconds to sync).
    #[cfg(test)]
    checkpoint_gate: Arc<Mutex<()>>,
}

/// What applying an entry costs this node lately, as a fixed part and a part per event: a
/// least-squares line through each entry's (events, time), older entries weighing less. A leader
/// cuts entries to the events it applies in `batcher::ENTRY_APPLY_TARGET`, so that a write waits
/// for little work ahead of it in the log. A line rather than a rate: a rate (events over time)
/// counts the fixed part against the events, so where the fixed part is most of an entry's time
/// (a slow disk under a checkpoint; the `--apply-delay-ms` hook) every entry it sized came out
/// smaller than the one before, down to one batch, the worst size for throughput.
#[derive(Debug, Default)]
pub struct ApplyCost {
    fit: Mutex<Fit>,
}

/// Weighted sums of a least-squares fit of seconds `y` against events `x`.
#[derive(Debug, Default, Clone, Copy)]
struct Fit {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl ApplyCost {
    /// Weight left to the entries before each new one.
    const FORGET: f64 = 0.9;

    /// An entry of `events` events took `took` to apply.
    pub fn record(&self, events: usize, took: std::time::Duration) {
        if events == 0 {
            return;
        }
        let (x, y) = (events as f64, took.as_secs_f64());
        let mut fit = self.fit.lock().unwrap();
        let f = Self::FORGET;
        *fit = Fit {
            w: fit.w * f + 1.0,
            x: fit.x * f + x,
            y: fit.y * f + y,
            xx: fit.xx * f + x * x,
            xy: fit.xy * f + x * y,
        };
    }

    /// The most events an entry may carry to apply within `target`, or `None` before any entry
    /// with events was applied; but never fewer than take as long as the fixed part. With
    /// entries of about one size so far, the time per event is their mean time over their events
    /// (entries over the target then shrink, which spreads their sizes, and the line is found).
    pub fn events_within(&self, target: std::time::Duration) -> Option<usize> {
        let fit = *self.fit.lock().unwrap();
        if fit.w <= 0.0 {
            return None;
        }
        let (mean_x, mean_y) = (fit.x / fit.w, fit.y / fit.w);
        let var = fit.xx / fit.w - mean_x * mean_x;
        let cov = fit.xy / fit.w - mean_x * mean_y;
        let target = target.as_secs_f64();
        // Sizes spread by a tenth of their mean or more, and time that grows with them: a line.
        let (fixed, per_event) = if var > (mean_x * 0.1).powi(2) && cov > 0.0 {
            let per_event = cov / var;
            ((mean_y - per_event * mean_x).clamp(0.0, mean_y), per_event)
        } else {
            (0.0, mean_y / mean_x)
        };
        // Never so few that the fixed part is most of an entry's time: at half of it, throughput
        // is half of what large entries give, where the target alone would cut it to nothing.
        let events = (target - fixed).max(fixed) / per_event.max(1e-12);
        Some(events.min(usize::MAX as f64) as usize)
    }
}

/// Writes sealed checkpoints to the store, one at a time, until the state machine is dropped. A
/// failed one is reported by the store's next commit, which stops the node.
fn checkpoint_thread(gate: Arc<Mutex<()>>) -> io::Result<std::sync::mpsc::Sender<CheckpointJob<RunStore>>> {
    let (sender, receiver) = std::sync::mpsc::channel::<CheckpointJob<RunStore>>();
    std::thread::Builder::new().name("tally-checkpoint".into()).spawn(move || {
        for job in receiver {
            let _writing = gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            write_checkpoint(job);
        }
    })?;
    Ok(sender)
}

/// Writes one sealed checkpoint. A failure is reported by the store's next commit.
fn write_checkpoint(job: CheckpointJob<RunStore>) {
    let started = std::time::Instant::now();
    match job.run() {
        Ok(()) => crate::metrics::CHECKPOINT_SECONDS.observe(started.elapsed().as_secs_f64()),
        Err(error) => tracing::error!("writing a checkpoint of the ledger state failed: {error}"),
    }
}

impl Shared {
    /// Runs `read` against the ledger.
    pub fn read<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        let ledger = self.ledger.read().unwrap();
        read(ledger.as_ref().expect("ledger outside an install"))
    }

    /// Runs `read` against the ledger if no entry is being applied (nor waiting to be) right
    /// now, else returns `None` at once. For periodic tasks on the async runtime, which must not
    /// hold a worker thread for the length of an apply.
    pub fn try_read<T>(&self, read: impl FnOnce(&State) -> T) -> Option<T> {
        let ledger = self.ledger.try_read().ok()?;
        ledger.as_ref().map(read)
    }

    pub fn applied(&self) -> AppliedState {
        self.applied.lock().unwrap().clone()
    }

    /// The newest semantics version this node applies.
    pub fn semantics_max(&self) -> u32 {
        self.semantics_max.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes this node apply semantics versions up to `max` only (`--semantics-max`): it behaves
    /// as a build that knows no later one. Refused when the ledger is past it already.
    pub fn limit_semantics(&self, max: u32) -> io::Result<()> {
        let current = self.published().semantics;
        if !ledger::semantics::known(max) || current > max {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the ledger applies entries under semantics version {current}, and this node would know up to \
                     {max} only: run it with a build (and --semantics-max) that knows {current}"
                ),
            ));
        }
        self.semantics_max.store(max, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Test hook: every applied entry takes `delay` longer (`--apply-delay-ms`).
    pub fn delay_applies(&self, delay: std::time::Duration) {
        self.apply_delay_us.store(delay.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// What applying an entry costs this node lately.
    pub fn apply_cost(&self) -> &ApplyCost {
        &self.apply_cost
    }

    /// Where the applied state stands; never waits for an apply.
    pub fn published(&self) -> Published {
        self.published.lock().unwrap().clone()
    }

    /// Writes everything applied so far to the store, here and now (waiting for a checkpoint
    /// being written): when memory is full. Called with the ledger lock held exclusively.
    fn checkpoint(&self, ledger: &mut State) -> io::Result<()> {
        let started = tokio::time::Instant::now();
        let commits = ledger.store_mut().checkpoint().map_err(|e| apply_error(&self.data_dir, e))?;
        *self.checkpointed_at.lock().unwrap() = started;
        if commits > 0 {
            crate::metrics::CHECKPOINT_SECONDS.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Once enough memory waits for a checkpoint or the last one is old enough, seals what was
    /// applied since (or, with only full batches committed to the store directly since, a flush
    /// of them) for the checkpoint thread, which writes it while applying goes on. If the thread
    /// is still busy with the previous one and twice the memory waits, writes here.
    fn checkpoint_when_due(&self, ledger: &mut State) -> io::Result<()> {
        let store = ledger.store();
        let bytes = store.recent_bytes();
        let due = bytes >= self.checkpoint_policy.bytes_max
            || ((store.recent_commits() > 0 || store.needs_sync())
                && self.checkpointed_at.lock().unwrap().elapsed() >= self.checkpoint_policy.interval);
        if !due {
            return Ok(());
        }
        match ledger.store_mut().seal().map_err(|e| apply_error(&self.data_dir, e))? {
            Some(job) => {
                self.dispatch(job);
                Ok(())
            }
            // The checkpoint thread is still busy and memory is full: applying waits for the
            // disk. Rare, and long: the worker is handed over (a no-op when it already was).
            None if bytes >= 2 * self.checkpoint_policy.bytes_max => {
                crate::rt::block(|| self.checkpoint(ledger))
            }
            None => Ok(()),
        }
    }

    /// Hands a sealed checkpoint to the checkpoint thread, which writes jobs in the order sent.
    fn dispatch(&self, job: CheckpointJob<RunStore>) {
        *self.checkpointed_at.lock().unwrap() = tokio::time::Instant::now();
        if state_store::threads() {
            // The thread lives as long as `Shared`; a job that cannot be sent fails when
            // dropped, and the next commit reports it.
            let _ = self.checkpoints.send(job);
        } else {
            // Under simulation: written now, as it would be at once on an idle thread.
            write_checkpoint(job);
        }
    }

    /// Freezes the whole applied state as it is now, for an export that applying goes on beside:
    /// the store's view and the layers in memory, read together (`FrozenLayers::over`). Waits
    /// for no disk: what memory holds is sealed for the checkpoint thread, behind a job under way
    /// (a snapshot's build once waited here for a whole checkpoint and its fsync, seconds through
    /// a busy disk, and applying with it: issue 24). Called with the ledger lock held exclusively
    /// and `snapshots` held (one frozen view at a time).
    fn freeze(&self, ledger: &mut State) -> io::Result<(tally_store::FrozenView, FrozenLayers)> {
        let (layers, job) = ledger.store_mut().freeze().map_err(|e| apply_error(&self.data_dir, e))?;
        let view = ledger.store().base().freeze();
        if let Some(job) = job {
            self.dispatch(job);
        }
        Ok((view, layers))
    }

    /// Exports the applied state as it is now, for a backup, into a temporary file that is
    /// unlinked once written: the returned handle reads it from the start, and nothing is left
    /// behind when the reader goes away. Applying goes on meanwhile (a frozen view, as in
    /// `StateMachine::build`); snapshot builds and installs wait, as the view is one at a time.
    pub fn export_backup(&self) -> io::Result<Exported> {
        let _snapshots = self.snapshots.lock().unwrap();
        let path = self.data_dir.join(SNAPSHOT_DIR).join(BACKUP_FILE);
        let ((view, layers), applied, meta) = {
            let mut ledger = self.ledger.write().unwrap();
            let ledger = ledger.as_mut().expect("ledger outside an install");
            let (view, layers) = self.freeze(ledger)?;
            ((view, layers), self.applied.lock().unwrap().last_applied, ledger.meta())
        };
        // The machine's own file even under simulation, which does not simulate backups: the
        // backup service streams it through tokio's file.
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let exported = ledger::snapshot::export(&layers.over(&view), &file).map_err(io_error);
        drop((view, layers));
        std::fs::remove_file(&path)?;
        exported?;
        let bytes = io::Seek::seek(&mut file, io::SeekFrom::Current(0))?;
        io::Seek::rewind(&mut file)?;
        Ok(Exported { file, applied, ledger: meta, bytes })
    }
}

/// A backup's export (`Shared::export_backup`).
pub struct Exported {
    /// The snapshot stream, read from its start; the file has no name any more.
    pub file: std::fs::File,
    /// The last entry the state includes.
    pub applied: Option<LogId>,
    /// The ledger's bookkeeping as of that entry: last timestamp and running digest.
    pub ledger: ledger::codec::LedgerMeta,
    /// The stream's length.
    pub bytes: u64,
}

#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

fn io_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(error.to_string())
}

/// A ledger error while applying. Damage (a checksum that does not match) marks the state for
/// a rebuild at the next start, durably, and is reported as `InvalidData`.
fn apply_error(data_dir: &Path, error: ledger::StoreError) -> io::Error {
    if !error.is_damage() {
        return io_error(error);
    }
    let marked = files::write_file_atomic(data_dir, DAMAGED_MARKER, error.to_string().as_bytes());
    let then = match marked {
        Ok(()) => "restarted, the node rebuilds it from its snapshot and log",
        Err(_) => "it could not even be marked for a rebuild",
    };
    io::Error::new(io::ErrorKind::InvalidData, format!("the ledger state is damaged ({error}); {then}"))
}

/// Whether applying found the state damaged (see `apply_error`).
pub fn marked_damaged(data_dir: &Path) -> bool {
    crate::sys::fs::metadata(data_dir.join(DAMAGED_MARKER)).is_ok()
}

/// Discards a damaged state and opens an empty one in its place. `open` then reloads the local
/// snapshot (checked whole as it is imported), and openraft re-applies the log after it; a log
/// is purged only behind a durable snapshot, so together they hold every applied entry
/// (`node::start` refuses the one case where they would not: no snapshot and a purged log).
fn rebuild(data_dir: &Path, options: StoreOptions, why: &io::Error) -> io::Result<(State, AppliedState)> {
    tracing::warn!(
        "the ledger state in {} cannot be used ({why}); rebuilding it from the local snapshot and log",
        data_dir.display()
    );
    let state = data_dir.join(STATE_DIR);
    state_store::remove(&state)?;
    let opened = open_ledger(&state, options)?;
    if marked_damaged(data_dir) {
        crate::sys::fs::remove_file(data_dir.join(DAMAGED_MARKER))?;
        crate::sys::sync_dir(data_dir)?;
    }
    Ok(opened)
}

fn open_ledger(path: &Path, options: StoreOptions) -> io::Result<(State, AppliedState)> {
    // A page store that panics on damage it meets (redb checks what it reads, but is not built
    // for files damaged at rest) must not crash the node at every start: such a panic is damage,
    // which `StateMachine::open` rebuilds.
    let opened = std::panic::catch_unwind(|| state_store::open(path, options)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot open the state in {}: {what}", path.display()),
        )
    })?;
    // Damage found while opening (a checksum, a record that does not decode) and a state of a
    // form this build replaced (sled's) are `InvalidData`, which `StateMachine::open` rebuilds
    // from the snapshot and log; anything else (another version's state, a failing disk) is left
    // as it is.
    let opened_error = |error: ledger::StoreError| {
        if error.is_damage() || matches!(error, ledger::StoreError::Superseded(_)) {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {error}", path.display()))
        } else {
            io_error(error)
        }
    };
    let store = opened.map_err(opened_error)?;
    let started = std::time::Instant::now();
    let ledger = Ledger::open(Checkpointed::new(store)).map_err(opened_error)?;
    if started.elapsed() >= SLOW_APPLY {
        tracing::warn!("opening the ledger on its state store took {} ms", started.elapsed().as_millis());
    }
    let applied = match ledger.store().meta_raw(ledger::codec::META_APP_KEY).map_err(io_error)? {
        Some(bytes) => {
            decode(&bytes).map_err(|e| io_error(format!("applied state in {}: {e}", path.display())))?
        }
        None => AppliedState::default(),
    };
    Ok((ledger, applied))
}

/// An entry whose apply takes this long or longer is logged.
const SLOW_APPLY: std::time::Duration = std::time::Duration::from_millis(250);

impl StateMachine {
    /// Opens the state under `data_dir`, finishing or discarding a snapshot install that a crash
    /// interrupted, and reloading the newest snapshot if the store fell behind it.
    pub fn open(
        data_dir: &Path,
        cache_bytes: u64,
        checkpoint_policy: CheckpointPolicy,
    ) -> io::Result<StateMachine> {
        let options = StoreOptions { cache_bytes, background_merges: state_store::threads() };
        files::create_dir_durably(&data_dir.join(SNAPSHOT_DIR))?;
        remove_leftovers(&data_dir.join(SNAPSHOT_DIR))?;
        recover_install(data_dir)?;
        let opened = if marked_damaged(data_dir) {
            Err(io::Error::new(io::ErrorKind::InvalidData, "marked damaged when an entry was applied"))
        } else {
            open_ledger(&data_dir.join(STATE_DIR), options)
        };
        let (ledger, applied) = match opened {
            Ok(opened) => opened,
            Err(error) if error.kind() == io::ErrorKind::InvalidData => rebuild(data_dir, options, &error)?,
            Err(error) => return Err(error),
        };
        let mut published = Published::default();
        published.reset(applied.last_applied.map_or(0, |id| id.index), &ledger.meta());
        let checkpoint_gate = Arc::new(Mutex::new(()));
        let machine = StateMachine {
            shared: Arc::new(Shared {
                data_dir: data_dir.to_path_buf(),
                options,
                ledger: RwLock::new(Some(ledger)),
                applied: Mutex::new(applied),
                published: Mutex::new(published),
                semantics_max: std::sync::atomic::AtomicU32::new(ledger::semantics::MAX),
                apply_delay_us: std::sync::atomic::AtomicU64::new(0),
                apply_cost: ApplyCost::default(),
                snapshots: Mutex::new(()),
                checkpoint_policy,
                checkpointed_at: Mutex::new(tokio::time::Instant::now()),
                checkpoints: checkpoint_thread(checkpoint_gate.clone())?,
                #[cfg(test)]
                checkpoint_gate,
            }),
        };
        if let Some(meta) = machine.current_snapshot_meta()? {
            let applied = machine.shared.applied.lock().unwrap().last_applied;
            if applied < meta.last_log_id {
                let started = std::time::Instant::now();
                machine.install_file(&snapshot_path(data_dir, &meta))?;
                tracing::info!(
                    "the state ended at {applied:?}, before the local snapshot's {:?}: the snapshot was \
                     installed at open in {} ms",
                    meta.last_log_id,
                    started.elapsed().as_millis()
                );
            }
        }
        Ok(machine)
    }

    fn current_snapshot_meta(&self) -> io::Result<Option<SnapshotMeta>> {
        let dir = self.shared.data_dir.join(SNAPSHOT_DIR);
        match files::read_file(&dir, SNAPSHOT_META_FILE)? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some).map_err(io_error),
        }
    }

    /// Applies one entry: on the async worker itself when it is small and the ledger is free
    /// (applying it is memory work of microseconds, and handing the worker over to another
    /// thread, as `block_in_place` does, cost more than that on every entry), else with the
    /// worker handed over, since it may wait for the lock or write to the store.
    fn apply_entry(&self, entry: &Entry) -> io::Result<Response> {
        let events = match &entry.payload {
            EntryPayload::Normal(request) => request.batches.iter().map(ledger::Batch::len).sum(),
            _ => 0,
        };
        if events < ledger::checkpoint::DIRECT_RECORDS_MIN
            && let Ok(mut ledger) = self.shared.ledger.try_write()
        {
            return self.apply_locked(ledger.as_mut().expect("ledger outside an install"), entry, events);
        }
        crate::rt::block(|| {
            let started = std::time::Instant::now();
            let mut ledger = self.shared.ledger.write().unwrap();
            let locked = started.elapsed();
            let applied =
                self.apply_locked(ledger.as_mut().expect("ledger outside an install"), entry, events);
            // Reads and answers wait for an entry being applied: say when one takes long.
            if started.elapsed() >= SLOW_APPLY {
                tracing::warn!(
                    "applying entry {} ({events} events) took {} ms, {} ms of it waiting for the ledger",
                    entry.log_id.index,
                    started.elapsed().as_millis(),
                    locked.as_millis()
                );
            }
            applied
        })
    }

    /// Applies `entry`, of `events` accounts and transfers, to the locked `ledger`.
    fn apply_locked(&self, ledger: &mut State, entry: &Entry, events: usize) -> io::Result<Response> {
        let started = std::time::Instant::now();
        let delay = self.shared.apply_delay_us.load(std::sync::atomic::Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
        // Lock order everywhere: the ledger, then the applied state. `build` runs in its own task
        // and takes them in that order too; the other order deadlocked under snapshotting.
        let mut applied = self.shared.applied.lock().unwrap();
        applied.last_applied = Some(entry.log_id);
        if let EntryPayload::Membership(membership) = &entry.payload {
            applied.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
        }
        let meta = encode(&*applied);
        let response = match &entry.payload {
            EntryPayload::Normal(request) if let Some(version) = request.switch_semantics => {
                let max = self.shared.semantics_max();
                if version > max {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "entry {} switches the ledger to semantics version {version}, and this node knows up \
                             to {max} only: it stops rather than apply later entries with other rules than the \
                             cluster's; run a build that knows {version} (without --semantics-max {max})",
                            entry.log_id.index
                        ),
                    ));
                }
                ledger
                    .switch_semantics(version, Some(&meta))
                    .map_err(|e| apply_error(&self.shared.data_dir, e))?;
                tracing::info!(
                    "entry {}: the ledger applies semantics version {version} from here on",
                    entry.log_id.index
                );
                Response::default()
            }
            EntryPayload::Normal(request) => Response {
                replies: ledger
                    .apply(&request.batches, request.timestamp_proposed, Some(&meta))
                    .map_err(|e| apply_error(&self.shared.data_dir, e))?,
            },
            _ => {
                ledger.apply(&[], 0, Some(&meta)).map_err(|e| apply_error(&self.shared.data_dir, e))?;
                Response::default()
            }
        };
        self.shared.published.lock().unwrap().applied(entry.log_id.index, &ledger.meta());
        drop(applied);
        self.shared.checkpoint_when_due(ledger)?;
        crate::metrics::APPLIED_EVENTS.inc_by(events as u64);
        crate::metrics::APPLY_SECONDS.observe(started.elapsed().as_secs_f64());
        self.shared.apply_cost.record(events, started.elapsed());
        Ok(response)
    }

    /// Exports the state to a durable snapshot file and records it as the current snapshot.
    ///
    /// Applying goes on while the export runs: the ledger lock is held only to freeze a view of
    /// the store (`RunStore::freeze`) and the layers in memory (`Shared::freeze`) together with
    /// the applied state they match; the export then reads that view, which later entries do not
    /// change.
    fn build(&self) -> io::Result<Snapshot> {
        let started = std::time::Instant::now();
        let _snapshots = self.shared.snapshots.lock().unwrap();
        let dir = self.shared.data_dir.join(SNAPSHOT_DIR);
        let temporary = dir.join(BUILDING_FILE);
        let ((view, layers), applied) = {
            let mut ledger = self.shared.ledger.write().unwrap();
            let ledger = ledger.as_mut().expect("ledger outside an install");
            (self.shared.freeze(ledger)?, self.shared.applied.lock().unwrap().clone())
        };
        let mut file = crate::sys::fs::File::create(&temporary)?;
        ledger::snapshot::export(&layers.over(&view), &mut file).map_err(io_error)?;
        drop(view);
        // The store's writes since its last sync are lost in a crash, so it could be behind a
        // snapshot taken from them; `open` would then reload the whole snapshot, which takes
        // minutes for a large state. Waiting for the checkpoints of everything before the freeze
        // (each one flushes the store) keeps the store at or past the snapshot once it becomes
        // current, and a restart only re-applies the log after it.
        layers.written().map_err(|e| apply_error(&self.shared.data_dir, e))?;
        file.sync_all()?;
        let meta = SnapshotMeta { last_log_id: applied.last_applied, last_membership: applied.membership };
        // A snapshot installed from the leader while this one was exported is newer: keep it.
        if let Some(current) = self.current_snapshot_meta()?
            && current.last_log_id >= meta.last_log_id
        {
            crate::sys::fs::remove_file(&temporary)?;
            let path = snapshot_path(&self.shared.data_dir, &current);
            return Ok(Snapshot { meta: current, snapshot: SnapshotFile { path } });
        }
        let path = snapshot_path(&self.shared.data_dir, &meta);
        crate::sys::fs::rename(&temporary, &path)?;
        crate::sys::sync_dir(&dir)?;
        make_current(&dir, &meta)?;
        crate::metrics::SNAPSHOT_SECONDS.observe(started.elapsed().as_secs_f64());
        crate::metrics::SNAPSHOT_BYTES.set(crate::sys::fs::metadata(&path).map_or(0, |m| m.len()) as i64);
        Ok(Snapshot { meta, snapshot: SnapshotFile { path } })
    }

    /// Imports the snapshot file into a fresh state directory and swaps it in.
    fn install_file(&self, path: &Path) -> io::Result<()> {
        self.import_fresh(path)?;
        self.swap_in_fresh()
    }

    /// Imports the snapshot file into `state.new`, flushed; an error (a damaged file) leaves
    /// nothing behind.
    fn import_fresh(&self, path: &Path) -> io::Result<()> {
        let fresh = self.shared.data_dir.join(STATE_NEW_DIR);
        state_store::remove(&fresh)?;
        {
            // No merges while importing: the imported runs merge once the store is live.
            let importing = StoreOptions { background_merges: false, ..self.shared.options };
            let mut store = state_store::open(&fresh, importing).map_err(io_error)?;
            let file = crate::sys::fs::File::open(path)?;
            let imported = ledger::snapshot::import(&mut store, file)
                .map_err(|e| io_error(format!("snapshot {}: {e}", path.display())))
                .and_then(|_| store.flush().map(|_| ()).map_err(io_error));
            if let Err(error) = imported {
                drop(store);
                state_store::remove(&fresh)?;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Swaps the imported `state.new` in for the live state and reopens it.
    fn swap_in_fresh(&self) -> io::Result<()> {
        let data_dir = &self.shared.data_dir;
        let mut ledger = self.shared.ledger.write().unwrap();
        // The store holds a lock on its file: close the current one before swapping.
        drop(ledger.take());
        swap_state_dirs(data_dir)?;
        let (reopened, applied) = open_ledger(&data_dir.join(STATE_DIR), self.shared.options)?;
        let index = applied.last_applied.map_or(0, |id| id.index);
        self.shared.published.lock().unwrap().reset(index, &reopened.meta());
        *ledger = Some(reopened);
        *self.shared.applied.lock().unwrap() = applied;
        Ok(())
    }
}

/// Makes the snapshot stream `stream` the current snapshot of the empty data directory
/// `data_dir`, as the snapshot `meta` describes: the state it holds is then applied up to
/// `meta.last_log_id` with `meta.last_membership`, whatever the stream's own applied state said.
/// For restoring a backup into a new cluster; `StateMachine::open` imports it at the first start.
/// The stream is checked whole (`ledger::snapshot::verify`) before it becomes current.
pub fn seed(
    data_dir: &Path,
    meta: &SnapshotMeta,
    stream: impl io::Read,
) -> io::Result<ledger::snapshot::Verified> {
    let dir = data_dir.join(SNAPSHOT_DIR);
    files::create_dir_durably(&dir)?;
    let applied = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
    let temporary = dir.join(BUILDING_FILE);
    let mut file = crate::sys::fs::File::create(&temporary)?;
    let verified = ledger::snapshot::rewrite_app_meta(stream, &mut file, &encode(&applied))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
    let verified = match verified {
        Ok(verified) => verified,
        Err(error) => {
            drop(file);
            crate::sys::fs::remove_file(&temporary)?;
            return Err(error);
        }
    };
    file.sync_all()?;
    crate::sys::fs::rename(&temporary, snapshot_path(data_dir, meta))?;
    crate::sys::sync_dir(&dir)?;
    make_current(&dir, meta)?;
    Ok(verified)
}

/// Removes what a process that died left in the snapshot directory: files being received, and
/// a snapshot being built.
fn remove_leftovers(dir: &Path) -> io::Result<()> {
    for entry in crate::sys::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with(INCOMING_PREFIX) && name.ends_with(".tmp"))
            || name == BUILDING_FILE
            || name == BACKUP_FILE
        {
            crate::sys::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Where the snapshot described by `meta` lives: named by its last log id, so that a file being
/// sent to a follower is never replaced underneath the sender by a newer snapshot.
fn snapshot_path(data_dir: &Path, meta: &SnapshotMeta) -> PathBuf {
    let (index, term) = meta.last_log_id.map_or((0, 0), |id| (id.index, id.leader_id.term));
    data_dir.join(SNAPSHOT_DIR).join(format!("{index:020}-{term}.snap"))
}

/// Records `meta` as the current snapshot (durably), then removes older snapshot files.
fn make_current(dir: &Path, meta: &SnapshotMeta) -> io::Result<()> {
    files::write_file_atomic(dir, SNAPSHOT_META_FILE, &encode(meta))?;
    let keep = snapshot_path(dir.parent().expect("snapshot dir has a parent"), meta);
    for entry in crate::sys::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "snap") && path != keep {
            crate::sys::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// state -> state.old, state.new -> state, then drop state.old. Each step is a rename followed by
/// an fsync of the directory holding them.
fn swap_state_dirs(data_dir: &Path) -> io::Result<()> {
    let (state, fresh, old) = state_dirs(data_dir);
    if state_store::exists(&state) {
        state_store::rename(&state, &old)?;
    }
    state_store::rename(&fresh, &state)?;
    state_store::remove(&old)
}

/// After a crash during `swap_state_dirs`: if `state` is missing but `state.new` is complete,
/// finish the swap; otherwise discard leftovers.
fn recover_install(data_dir: &Path) -> io::Result<()> {
    let (state, fresh, old) = state_dirs(data_dir);
    let exists = state_store::exists;
    if !exists(&state) && exists(&fresh) && exists(&old) {
        state_store::rename(&fresh, &state)?;
    }
    if exists(&fresh) {
        state_store::remove(&fresh)?;
    }
    if exists(&old) && exists(&state) {
        state_store::remove(&old)?;
    }
    Ok(())
}

/// The state store's live, imported and discarded directories.
fn state_dirs(data_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let dir = |name| data_dir.join(name);
    (dir(STATE_DIR), dir(STATE_NEW_DIR), dir(STATE_OLD_DIR))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        crate::rt::block(|| self.build())
    }
}

/// The longest the apply loop keeps its async worker before letting other tasks run.
const APPLY_SLICE: std::time::Duration = std::time::Duration::from_millis(2);

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.shared.applied.lock().unwrap();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut since_yield = tokio::time::Instant::now();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = self.apply_entry(&entry)?;
            if let Some(responder) = responder {
                responder.send(response);
            }
            // A backlog of small entries (a node catching up) is applied on the async worker,
            // entry after entry, with the next ones already read: without a yield it held the
            // worker for as long, and the tasks waiting on it (Raft's own, acknowledging the
            // leader's entries) with it.
            if since_yield.elapsed() >= APPLY_SLICE {
                tokio::task::yield_now().await;
                since_yield = tokio::time::Instant::now();
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        crate::rt::block(|| {
            let _snapshots = self.shared.snapshots.lock().unwrap();
            let dir = self.shared.data_dir.join(SNAPSHOT_DIR);
            let path = snapshot_path(&self.shared.data_dir, meta);
            if snapshot.path != path {
                crate::sys::fs::rename(&snapshot.path, &path)?;
                crate::sys::sync_dir(&dir)?;
            }
            // Imported (which checks it whole) before it becomes current: a damaged file is
            // refused with the old state and the old current snapshot untouched. Once current,
            // a crash before the swap finishes makes `open` import it again.
            self.import_fresh(&path)?;
            make_current(&dir, meta)?;
            self.swap_in_fresh()?;
            let applied = self.shared.applied.lock().unwrap().last_applied;
            if applied != meta.last_log_id {
                return Err(io_error(format!(
                    "installed snapshot says applied {applied:?}, its meta says {:?}",
                    meta.last_log_id
                )));
            }
            Ok(())
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(meta) = self.current_snapshot_meta()? else { return Ok(None) };
        let path = snapshot_path(&self.shared.data_dir, &meta);
        Ok(Some(Snapshot { meta, snapshot: SnapshotFile { path } }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of account creations `first..first + count` at index `index`.
    fn accounts_entry(index: u64, first: u128, count: u128) -> Entry {
        let accounts = (first..first + count)
            .map(|id| ledger::Account { id, ledger: 1, code: 1, ..Default::default() })
            .collect();
        let request =
            crate::types::Request::batches(index * 1_000, vec![ledger::Batch::CreateAccounts(accounts)]);
        Entry {
            log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index),
            payload: EntryPayload::Normal(request),
        }
    }

    async fn apply(machine: &mut StateMachine, entries: Vec<Entry>) {
        let entries: Vec<_> = entries.into_iter().map(|entry| Ok((entry, None))).collect();
        machine.apply(futures::stream::iter(entries)).await.expect("apply");
    }

    /// A snapshot's build waits for no checkpoint under way, and applying does not wait for the
    /// build: it froze what memory holds and the store's view in one breath, and waits for the
    /// checkpoints only to make its snapshot current. (It wrote a whole checkpoint under the
    /// ledger's lock, after the one under way and its fsync: through a busy disk, applying
    /// stopped for 5-8 s at rush hour, issue 24.) The snapshot holds the state as of the freeze.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applying_goes_on_while_a_snapshot_is_built_under_a_slow_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = StateMachine::open(dir.path(), 8 << 20, CheckpointPolicy::default()).unwrap();
        // A direct commit, then small entries in memory, and a checkpoint of them under way.
        apply(&mut machine, vec![accounts_entry(1, 1, ledger::checkpoint::DIRECT_RECORDS_MIN as u128)]).await;
        apply(&mut machine, (2..=4).map(|index| accounts_entry(index, index as u128 * 10_000, 2)).collect())
            .await;
        // The checkpoint thread's gate, held by a thread of the test's until it says.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, holding) = std::sync::mpsc::channel();
        let gate = machine.shared.checkpoint_gate.clone();
        let holder = std::thread::spawn(move || {
            let _gate = gate.lock().unwrap();
            held.send(()).unwrap();
            let _ = released.recv();
        });
        holding.recv().unwrap();
        {
            let mut ledger = machine.shared.ledger.write().unwrap();
            let job = ledger.as_mut().unwrap().store_mut().seal().unwrap().expect("a checkpoint to write");
            machine.shared.dispatch(job);
        }
        apply(&mut machine, (5..=6).map(|index| accounts_entry(index, index as u128 * 10_000, 2)).collect())
            .await;
        let frozen = machine.shared.published();
        assert_eq!(frozen.index, 6);

        let mut builder = machine.clone();
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        let building = dir.path().join(SNAPSHOT_DIR).join(BUILDING_FILE);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !building.exists() {
            assert!(std::time::Instant::now() < deadline, "the build never started its export");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let next = (7..=9).map(|index| accounts_entry(index, index as u128 * 10_000, 2)).collect();
        tokio::time::timeout(std::time::Duration::from_secs(20), apply(&mut machine, next))
            .await
            .expect("applying waited for the build, which waited for the checkpoint");
        assert!(!build.is_finished(), "the build is current only once the checkpoints are written");
        drop(release);
        holder.join().unwrap();
        let snapshot = build.await.unwrap().expect("the build");
        assert_eq!(snapshot.meta.last_log_id.map(|id| id.index), Some(6), "the state as of the freeze");

        let other = tempfile::tempdir().unwrap();
        let mut installed = StateMachine::open(other.path(), 8 << 20, CheckpointPolicy::default()).unwrap();
        let received = other.path().join(SNAPSHOT_DIR).join("incoming-1-0.tmp");
        std::fs::copy(&snapshot.snapshot.path, &received).unwrap();
        installed.install_snapshot(&snapshot.meta, SnapshotFile { path: received }).await.unwrap();
        assert_eq!(installed.shared.published().digest, frozen.digest);
        for id in [1, 20_000, 40_001, 60_000] {
            assert!(
                installed.shared.read(|ledger| ledger.store().account(id).unwrap()).is_some(),
                "account {id}"
            );
        }
        assert!(installed.shared.read(|ledger| ledger.store().account(70_000).unwrap()).is_none());
    }

    /// Status reads where the applied state stands without the ledger's lock, which an apply or
    /// an install holds for up to seconds: it read the digest under that lock, and two status
    /// calls held both runtime workers of a 2-core node meanwhile.
    #[test]
    fn where_the_state_stands_is_read_while_an_apply_holds_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let machine = StateMachine::open(dir.path(), 8 << 20, CheckpointPolicy::default()).unwrap();
        let shared = machine.shared.clone();
        let held = shared.ledger.write().unwrap();
        let (published_tx, published) = std::sync::mpsc::channel();
        let (read_tx, read) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| published_tx.send(shared.published()).unwrap());
            scope.spawn(|| read_tx.send(shared.read(|ledger| ledger.meta().digest)).unwrap());
            let deadline = std::time::Duration::from_secs(10);
            let found = published.recv_timeout(deadline).expect("published waited for the ledger lock");
            assert_eq!(found.index, 0);
            // The ledger itself is not readable meanwhile (what status used to wait for).
            assert!(read.recv_timeout(std::time::Duration::from_millis(200)).is_err());
            drop(held);
            assert_eq!(read.recv_timeout(deadline).unwrap(), found.digest);
        });
    }
}
