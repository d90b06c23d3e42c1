//! What a node takes from the machine: files, sockets, the wall clock and randomness. A
//! production build takes them from std and tokio, as before; a build with the `sim` feature (the
//! deterministic simulation, `sim/`, issue 26) takes them from turmoil, whose files lose unsynced
//! writes when a simulated host crashes, whose sockets run over a simulated network, and whose
//! clock is simulated time. Every other module asks here, so that the simulation runs the same
//! code as a node.
//!
//! The ledger's state store too (`state_store`): on redb in production, under simulation on a
//! page store in memory (`tally_store::pages::MemoryDisk`) that a simulated crash leaves with what
//! was durable and a seed-drawn number of the batches after it; its merges and checkpoints then
//! run inside the apply that causes them, so that a seed replays the same store.

#[cfg(not(feature = "sim"))]
pub use std::fs;
#[cfg(not(feature = "sim"))]
pub use tokio::fs as tokio_fs;
#[cfg(not(feature = "sim"))]
pub use tokio::net::{TcpListener, TcpStream};

#[cfg(feature = "sim")]
pub use turmoil::fs::shim::std::fs;
#[cfg(feature = "sim")]
pub use turmoil::fs::shim::tokio::fs as tokio_fs;
#[cfg(feature = "sim")]
pub use turmoil::net::{TcpListener, TcpStream};

use std::io;
use std::path::Path;

/// Makes `dir`'s entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(not(feature = "sim"))]
    return std::fs::File::open(dir)?.sync_all();
    #[cfg(feature = "sim")]
    return turmoil::fs::shim::std::fs::sync_dir(dir);
}

/// fdatasyncs the open file `path`. A file deleted since it was opened (a purged log segment)
/// syncs as on Linux, where its descriptor still names it: turmoil knows files by path and fails
/// the sync of one no longer there ("No such file or directory", as an `Other` error), which the
/// simulator takes for the success Linux gives.
pub fn sync_data(file: &fs::File, path: &Path) -> io::Result<()> {
    #[cfg(not(feature = "sim"))]
    {
        let _ = path;
        file.sync_data()
    }
    #[cfg(feature = "sim")]
    match file.sync_data() {
        Err(_) if !fs::exists(path) => Ok(()),
        other => other,
    }
}

/// A fault the simulator put on the disk holding `path`: an error for each write and sync there
/// while it lasts (EIO, ENOSPC). Never one in production, where the disk reports its own.
pub fn disk_fault(path: &Path) -> io::Result<()> {
    #[cfg(feature = "sim")]
    return sim::disk_fault(path);
    #[cfg(not(feature = "sim"))]
    {
        let _ = path;
        Ok(())
    }
}

/// Tells the simulator that `path` was just written durably (a vote, the committed id, a purge
/// marker: `files::write_file_atomic`), so that it can crash the node at that moment. Nothing in
/// production.
pub fn wrote_durably(path: &Path) {
    #[cfg(feature = "sim")]
    sim::wrote_durably(path);
    #[cfg(not(feature = "sim"))]
    let _ = path;
}

/// How often a node writes its committed log id (`storage::log_store`): `production` in
/// production; under simulation, what the seed chose (as often as every sync), so that a crash
/// finds the file at the moments where writing it could go wrong.
pub fn committed_persist_interval(production: std::time::Duration) -> std::time::Duration {
    #[cfg(feature = "sim")]
    if let Some(interval) = sim::committed_persist_interval() {
        return interval;
    }
    production
}

/// Whether `path` is a directory.
pub fn is_dir(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_dir())
}

/// The ledger's state store, kept in a directory of its own (`<data-dir>/state`, and beside it
/// `state.new` and `state.old` while a snapshot is installed). Directory operations here are
/// durable when they return.
pub mod state_store {
    use std::io;
    use std::path::Path;

    use ledger::StoreResult;
    use tally_store::{Options, RunStore};

    /// Whether the store merges and writes checkpoints on threads of its own (production), or
    /// inside the apply that causes them (under simulation: deterministic, and CPU is free).
    pub fn threads() -> bool {
        !cfg!(feature = "sim")
    }

    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path, options: Options) -> StoreResult<RunStore> {
        #[cfg(feature = "sim")]
        return super::sim::open_store(path, options);
        #[cfg(not(feature = "sim"))]
        RunStore::open_with(path, options)
    }

    pub fn exists(path: &Path) -> bool {
        #[cfg(feature = "sim")]
        return super::sim::store_exists(path);
        #[cfg(not(feature = "sim"))]
        path.exists()
    }

    /// Removes the store in `path`, if there is one.
    pub fn remove(path: &Path) -> io::Result<()> {
        #[cfg(feature = "sim")]
        return super::sim::remove_store(path);
        #[cfg(not(feature = "sim"))]
        {
            if path.exists() {
                std::fs::remove_dir_all(path)?;
            }
            sync_parent(path)
        }
    }

    /// Renames the store in `from` to `to` (where none is).
    pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
        #[cfg(feature = "sim")]
        return super::sim::rename_store(from, to);
        #[cfg(not(feature = "sim"))]
        {
            std::fs::rename(from, to)?;
            sync_parent(to)
        }
    }

    #[cfg(not(feature = "sim"))]
    fn sync_parent(path: &Path) -> io::Result<()> {
        std::fs::File::open(path.parent().expect("a state directory has a parent"))?.sync_all()
    }
}

/// The wall clock: time since the Unix epoch.
pub fn wall_clock() -> std::time::Duration {
    #[cfg(feature = "sim")]
    if let Some(now) = turmoil::since_epoch() {
        return now;
    }
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// A random `u64`: from the operating system, or under simulation from the seeded generator of
/// the simulated host asking.
pub fn random_u64() -> u64 {
    #[cfg(feature = "sim")]
    if let Some(value) = sim::random_u64() {
        return value;
    }
    rand::random::<u64>()
}

/// The simulation's hooks into a node. Set by the simulator for the host it is running; each
/// simulated host runs on the simulator's one thread, so the state is the thread's.
#[cfg(feature = "sim")]
pub mod sim {
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use rand::{RngCore, SeedableRng};
    use tally_store::pages::{MemoryDisk, Pages};
    use tally_store::{Options, RunStore};

    thread_local! {
        static DURABLE_WRITES: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
        static DISK_FAULTS: RefCell<Vec<(PathBuf, std::io::ErrorKind)>> = const { RefCell::new(Vec::new()) };
        static RNG: RefCell<Option<rand_chacha::ChaCha8Rng>> = const { RefCell::new(None) };
        static FSYNC: RefCell<Vec<(PathBuf, (u64, u64))>> = const { RefCell::new(Vec::new()) };
        static STORES: RefCell<BTreeMap<PathBuf, MemoryDisk>> = const { RefCell::new(BTreeMap::new()) };
        static COMMITTED_PERSIST_INTERVAL: RefCell<Option<Duration>> = const { RefCell::new(None) };
    }

    /// Makes every node write its committed log id at most every `interval` (zero: after every
    /// sync) instead of production's interval.
    pub fn set_committed_persist_interval(interval: Duration) {
        COMMITTED_PERSIST_INTERVAL.with(|cell| *cell.borrow_mut() = Some(interval));
    }

    pub(super) fn committed_persist_interval() -> Option<Duration> {
        COMMITTED_PERSIST_INTERVAL.with(|cell| *cell.borrow())
    }

    /// The state store in `path` (`state_store::open`): on the simulated disk kept for that path,
    /// a new one if there is none.
    pub(super) fn open_store(path: &Path, options: Options) -> ledger::StoreResult<RunStore> {
        let disk = STORES.with(|stores| stores.borrow_mut().entry(path.to_path_buf()).or_default().clone());
        RunStore::open_on(Pages::on(disk.pages()), options)
    }

    pub(super) fn store_exists(path: &Path) -> bool {
        STORES.with(|stores| stores.borrow().contains_key(path))
    }

    pub(super) fn remove_store(path: &Path) -> std::io::Result<()> {
        super::disk_fault(path)?;
        STORES.with(|stores| stores.borrow_mut().remove(path));
        Ok(())
    }

    pub(super) fn rename_store(from: &Path, to: &Path) -> std::io::Result<()> {
        super::disk_fault(to)?;
        STORES.with(|stores| {
            let mut stores = stores.borrow_mut();
            let disk = stores.remove(from).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no state store in {}", from.display()),
                )
            })?;
            stores.insert(to.to_path_buf(), disk);
            Ok(())
        })
    }

    /// The power of the host whose data directory is `data_dir` is cut: each of its state
    /// stores keeps what was durable and a number of the batches written after it drawn from
    /// the seeded generator (none to all), and every store opened on them fails from now on.
    /// Call it before the host crashes. Returns how many of its stores hold something after the
    /// crash (the node reopens them and re-applies its log after their last checkpoint), and how
    /// many batches were lost over all of them.
    pub fn crash_stores(data_dir: &Path) -> (usize, usize) {
        STORES.with(|stores| {
            let stores = stores.borrow();
            let (mut kept, mut lost) = (0, 0);
            for (_, disk) in stores.iter().filter(|(path, _)| path.starts_with(data_dir)) {
                let unsynced = disk.unsynced_batches();
                let keep = (random_u64().unwrap_or(0) % (unsynced as u64 + 1)) as usize;
                disk.crash(keep);
                lost += unsynced - keep;
                kept += usize::from(!disk.keys().is_empty());
            }
            (kept, lost)
        })
    }

    /// The state stores under `data_dir` are gone: a disk replaced.
    pub fn wipe_stores(data_dir: &Path) {
        STORES.with(|stores| stores.borrow_mut().retain(|path, _| !path.starts_with(data_dir)));
    }

    /// Fails every write and sync under `data_dir` with `kind` from now on (`Other` for EIO,
    /// `StorageFull` for ENOSPC), or none again.
    pub fn set_disk_fault(data_dir: &Path, kind: Option<std::io::ErrorKind>) {
        DISK_FAULTS.with(|faults| {
            let mut faults = faults.borrow_mut();
            faults.retain(|(dir, _)| dir != data_dir);
            if let Some(kind) = kind {
                faults.push((data_dir.to_path_buf(), kind));
            }
        });
    }

    pub(super) fn disk_fault(path: &Path) -> std::io::Result<()> {
        let kind = DISK_FAULTS.with(|faults| {
            faults.borrow().iter().find(|(dir, _)| path.starts_with(dir)).map(|(_, kind)| *kind)
        });
        match kind {
            None => Ok(()),
            Some(std::io::ErrorKind::StorageFull) => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (simulated)",
            )),
            Some(kind) => Err(std::io::Error::new(kind, "Input/output error (simulated)")),
        }
    }

    pub(super) fn wrote_durably(path: &Path) {
        DURABLE_WRITES.with(|writes| writes.borrow_mut().push(path.to_path_buf()));
    }

    /// The files written durably since the last call, in order.
    pub fn take_durable_writes() -> Vec<PathBuf> {
        DURABLE_WRITES.with(|writes| std::mem::take(&mut *writes.borrow_mut()))
    }

    /// Seeds the generator `random_u64` draws from (a node's incarnation, a cluster id).
    pub fn seed(seed: u64) {
        RNG.with(|rng| *rng.borrow_mut() = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed)));
    }

    pub(super) fn random_u64() -> Option<u64> {
        RNG.with(|rng| rng.borrow_mut().as_mut().map(|rng| rng.next_u64()))
    }

    /// How long a simulated fsync under `data_dir` takes, in microseconds, from `min` to `max`
    /// (drawn from the seeded generator): each node's disk its own, as sites' disks differ.
    /// Appends made meanwhile are not covered by it.
    pub fn set_fsync_us(data_dir: &Path, min: u64, max: u64) {
        FSYNC.with(|fsync| {
            let mut fsync = fsync.borrow_mut();
            fsync.retain(|(dir, _)| dir != data_dir);
            fsync.push((data_dir.to_path_buf(), (min, max.max(min))));
        });
    }

    /// The time the next fsync under `dir` takes, split at the moment its writes become durable.
    pub fn fsync_latency_split(dir: &Path) -> (Duration, Duration) {
        let latency = fsync_latency(dir).as_micros() as u64;
        let durable_at = random_u64().unwrap_or(0) % (latency + 1);
        (Duration::from_micros(durable_at), Duration::from_micros(latency - durable_at))
    }

    /// The time the next fsync under `dir` takes (none on a disk the simulator did not set).
    pub fn fsync_latency(dir: &Path) -> Duration {
        let (min, max) = FSYNC.with(|fsync| {
            fsync.borrow().iter().find(|(root, _)| dir.starts_with(root)).map_or((0, 0), |(_, range)| *range)
        });
        let spread = max - min;
        let extra = if spread == 0 { 0 } else { random_u64().unwrap_or(0) % (spread + 1) };
        Duration::from_micros(min + extra)
    }
}
