//! `faultfs`: a FUSE filesystem that behaves like a disk behind a volatile page cache, for the
//! chaos harness. Everything written is readable at once, but only what was made durable
//! survives `FaultFs::power_cut`:
//!
//! - a file's contents and length are durable once the file is fsynced (`fsync` or `fdatasync`);
//! - a name (a create, a rename, an unlink, a mkdir) is durable once its directory is fsynced;
//! - a power cut puts every file back to its last fsynced contents and every directory back to its
//!   last fsynced names, and may tear the last unsynced write (keep a prefix of it), as a disk that
//!   lost power in the middle of a write would.
//!
//! That is the strict reading of POSIX that a database must assume; real filesystems are often
//! kinder (ext4 orders some metadata), which is why a process kill (SIGKILL keeps the kernel's page
//! cache) never tested any of this.
//!
//! Every byte written under the mount point lives on the machine's own disk, in a temporary
//! directory (`$TMPDIR/faultfs-*`, a file per file, removed with the mount); the pre-image of each
//! synced byte overwritten since its file's last fsync lives in the harness's memory. Chaos runs
//! write tens of gigabytes. Writes and fsyncs can also be made to fail (`FaultFs::fail`), for
//! disk-full and I/O-error faults. Unix only, and mounting needs root (or `fusermount3`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Attributes and names are never cached by the kernel: after a power cut, what a lookup
/// returned before may be gone.
const TTL: Duration = Duration::ZERO;
const BLOCK_BYTES: u32 = 4096;

/// A change to a name, for a trip wire to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A file or directory created.
    Create,
    /// A file or directory removed.
    Remove,
    /// A rename, matched by either name.
    Rename,
}

/// A failure to inject into writes, fsyncs and creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// ENOSPC: the disk is full.
    DiskFull,
    /// EIO: the disk failed.
    Io,
}

impl Fault {
    fn errno(self) -> Errno {
        match self {
            Fault::DiskFull => Errno::ENOSPC,
            Fault::Io => Errno::EIO,
        }
    }
}

/// What a power cut did, for the harness's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCut {
    /// Files whose unsynced writes were discarded.
    pub files_rolled_back: usize,
    /// Bytes of unsynced writes discarded (appended or overwritten).
    pub bytes_lost: u64,
    /// Directories whose unsynced names were discarded.
    pub directories_rolled_back: usize,
    /// Bytes of the last unsynced write that were kept anyway (a torn write).
    pub torn_bytes_kept: u64,
}

/// A mounted faultfs; unmounted when dropped.
pub struct FaultFs {
    disk: Arc<Mutex<Disk>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FaultFs {
    /// Mounts an empty faultfs on `mountpoint`, an existing empty directory.
    pub fn mount(mountpoint: &Path) -> io::Result<FaultFs> {
        let disk = Arc::new(Mutex::new(Disk::new()));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("faultfs".into()), MountOption::DefaultPermissions];
        // Several request threads: a slow fsync (`slow_syncs`) must not hold up the writes
        // that come in while it runs, as a real disk's would not.
        config.n_threads = Some(4);
        let backing = Arc::new(Backing::new()?);
        let session = fuser::spawn_mount(Handler { disk: disk.clone(), backing }, mountpoint, &config)?;
        Ok(FaultFs { disk, mountpoint: mountpoint.to_path_buf(), session: Some(session) })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Loses everything not made durable. Stop (SIGKILL) every process writing here first: a
    /// process still running would go on writing into the rolled-back state. `tear_seed`, if
    /// given, keeps a prefix of the last unsynced write (its length drawn from the seed), as a
    /// disk that lost power in the middle of it might. Trip wires and slow syncs end with it.
    pub fn power_cut(&self, tear_seed: Option<u64>) -> PowerCut {
        self.disk.lock().unwrap().power_cut(tear_seed)
    }

    /// From now on, writes, fsyncs and creates fail with `fault` (or succeed again with `None`).
    pub fn fail(&self, fault: Option<Fault>) {
        self.disk.lock().unwrap().fault = fault;
    }

    /// Arms a trip wire, for a power cut at a chosen step of the writer: once a change names
    /// something `matches` accepts (a file or directory created or removed, either name of a
    /// rename), `after` more changes succeed (that one included), and from then on every change
    /// fails with EIO, as if the power had gone at that instant. `tripped` then says so; the
    /// harness kills the writer and calls `power_cut`, which disarms. Replaces an earlier wire.
    pub fn arm(&self, matches: impl Fn(Change, &OsStr) -> bool + Send + 'static, after: u32) {
        let mut disk = self.disk.lock().unwrap();
        disk.trip = Some(Trip { matches: Box::new(matches), after, left: None });
        disk.tripped = false;
    }

    /// Whether an armed wire went off (until the power cut or `disarm`).
    pub fn tripped(&self) -> bool {
        self.disk.lock().unwrap().tripped
    }

    /// Takes the wire away, tripped or not: changes succeed again.
    pub fn disarm(&self) {
        let mut disk = self.disk.lock().unwrap();
        disk.trip = None;
        disk.tripped = false;
    }

    /// From now on every fsync makes durable what was written before it, then takes `delay`
    /// before it returns (`None`: at once); writes to other files go on meanwhile and are not
    /// covered (the kernel holds a FUSE file's inode lock across its fsync, so writes to the
    /// same file wait). A real disk's fsync takes milliseconds, which is when races between
    /// writing one file and syncing another show: a WAL segment roll, the commit file.
    pub fn slow_syncs(&self, delay: Option<Duration>) {
        self.disk.lock().unwrap().sync_delay = delay;
    }

    /// Bytes written since their file's last fsync, over all files.
    pub fn unsynced_bytes(&self) -> u64 {
        self.disk.lock().unwrap().unsynced_bytes()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // A lazy unmount: it succeeds even while a killed process's files are still closing.
            let _ = session.umount_and_join();
        }
    }
}

struct Node {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
}

enum Kind {
    File(SharedFile),
    Directory(Directory),
}

/// A file's bytes as they are now, and how to put back the ones that are not durable. The bytes
/// are in a file of the mount's backing directory on the machine's own disk (the harness's memory
/// held them until a 600-second run at rush-hour load wrote more than the machine's 24 GiB),
/// open while the file is open through the mount: a run's disks hold tens of thousands of files,
/// more than a process may keep open, but its writers keep only a few open at a time. The
/// pre-images stay in memory, as they are few: only durable bytes overwritten since the last
/// fsync.
///
/// Each file has a lock of its own, so that writes to one file (a page store writing out a
/// commit) do not wait for writes to another (the log's appends and fsyncs), as on a disk behind a
/// page cache; the disk's lock covers names, lengths as seen by lookups, faults and power cuts.
struct File {
    path: PathBuf,
    /// The length now.
    length: usize,
    /// The length at the last fsync.
    synced_length: usize,
    /// `(offset, old bytes)` for every durable byte overwritten (or cut off) since the last
    /// fsync, oldest first. Bytes past `synced_length` need none: they are cut off anyway.
    undo: Vec<(usize, Vec<u8>)>,
    unsynced_bytes: u64,
    /// The power cuts this file went through: a write or fsync that looked the file up before
    /// the latest one is refused (EIO), as the power went while it was on its way.
    cuts: u64,
    /// Opens through the mount not yet released; the backing file's handle is dropped when the
    /// last one is.
    opens: u32,
    backing: Option<std::fs::File>,
}

/// A file as the disk holds it: its lock is taken after the disk's, never before.
type SharedFile = Arc<Mutex<File>>;

/// The backing file failed (the machine's disk is full, say): the writer sees EIO.
fn backing_failed(error: io::Error) -> Errno {
    eprintln!("faultfs: the file backing a file failed: {error}");
    Errno::EIO
}

/// Where a mount's files keep their bytes: a temporary directory, removed with the mount.
struct Backing {
    dir: tempfile::TempDir,
    next: std::sync::atomic::AtomicU64,
}

impl Backing {
    fn new() -> io::Result<Backing> {
        Ok(Backing { dir: tempfile::Builder::new().prefix("faultfs-").tempdir()?, next: Default::default() })
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl File {
    fn new(backing: &Backing) -> Result<File, Errno> {
        let number = backing.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = backing.dir.path().join(number.to_string());
        let backing = std::fs::File::create_new(&path).map_err(backing_failed)?;
        Ok(File {
            path,
            length: 0,
            synced_length: 0,
            undo: Vec::new(),
            unsynced_bytes: 0,
            cuts: 0,
            // Created through the mount, which opens it.
            opens: 1,
            backing: Some(backing),
        })
    }

    /// The backing file, opened if it is not.
    fn backing(&mut self) -> Result<&std::fs::File, Errno> {
        if self.backing.is_none() {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .map_err(backing_failed)?;
            self.backing = Some(opened);
        }
        Ok(self.backing.as_ref().expect("just opened"))
    }

    fn opened(&mut self) {
        self.opens += 1;
    }

    fn released(&mut self) {
        self.opens = self.opens.saturating_sub(1);
        if self.opens == 0 {
            self.backing = None;
        }
    }

    /// The bytes in `start..end`, cut at the file's end.
    fn read(&mut self, start: usize, end: usize) -> Result<Vec<u8>, Errno> {
        let end = end.min(self.length);
        let mut bytes = vec![0; end.saturating_sub(start)];
        self.backing()?.read_exact_at(&mut bytes, start as u64).map_err(backing_failed)?;
        Ok(bytes)
    }

    /// Saves the durable bytes in `range` before they change.
    fn keep_old(&mut self, start: usize, end: usize) -> Result<(), Errno> {
        let end = end.min(self.synced_length);
        if start < end {
            let old = self.read(start, end)?;
            self.undo.push((start, old));
        }
        Ok(())
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<(), Errno> {
        self.keep_old(offset, offset + bytes.len())?;
        // Past the end, the gap reads as zeros, as on a disk.
        self.backing()?.write_all_at(bytes, offset as u64).map_err(backing_failed)?;
        self.length = self.length.max(offset + bytes.len());
        self.unsynced_bytes += bytes.len() as u64;
        Ok(())
    }

    fn truncate(&mut self, length: usize) -> Result<(), Errno> {
        self.keep_old(length, self.length)?;
        self.backing()?.set_len(length as u64).map_err(backing_failed)?;
        self.unsynced_bytes += self.length.abs_diff(length) as u64;
        self.length = length;
        Ok(())
    }

    fn sync(&mut self) {
        self.synced_length = self.length;
        self.undo.clear();
        self.unsynced_bytes = 0;
    }

    /// Back to the last fsync; returns the bytes lost.
    fn roll_back(&mut self) -> Result<u64, Errno> {
        let lost = self.unsynced_bytes;
        let undo = std::mem::take(&mut self.undo);
        let synced_length = self.synced_length;
        let data = self.backing()?;
        data.set_len(synced_length as u64).map_err(backing_failed)?;
        for (offset, old) in undo.into_iter().rev() {
            data.write_all_at(&old, offset as u64).map_err(backing_failed)?;
        }
        self.length = self.synced_length;
        self.unsynced_bytes = 0;
        if self.opens == 0 {
            self.backing = None;
        }
        Ok(lost)
    }
}

#[derive(Default)]
struct Directory {
    names: BTreeMap<OsString, u64>,
    /// The names at the last fsync of this directory.
    synced_names: BTreeMap<OsString, u64>,
}

struct Disk {
    nodes: HashMap<u64, Node>,
    next_inode: u64,
    /// The newest write, while it is not durable: what a torn write keeps part of.
    last_write: Option<(u64, usize, Vec<u8>)>,
    fault: Option<Fault>,
    trip: Option<Trip>,
    sync_delay: Option<Duration>,
    /// A trip wire went off: every change fails until the power cut (or `disarm`).
    tripped: bool,
    /// Power cuts so far (`File::cuts`).
    cuts: u64,
}

/// What sets a trip wire off: a change and the name it touches.
type Matcher = dyn Fn(Change, &OsStr) -> bool + Send;

/// Where a power cut is to land: at a named step of the program writing to the disk.
struct Trip {
    matches: Box<Matcher>,
    after: u32,
    /// Changes still allowed, counted from the first that named a match.
    left: Option<u32>,
}

const ROOT: u64 = 1;

impl Disk {
    fn new() -> Disk {
        let root =
            Node { kind: Kind::Directory(Directory::default()), perm: 0o755, mtime: SystemTime::now() };
        Disk {
            nodes: HashMap::from([(ROOT, root)]),
            next_inode: ROOT + 1,
            last_write: None,
            fault: None,
            trip: None,
            sync_delay: None,
            tripped: false,
            cuts: 0,
        }
    }

    fn attr(&self, inode: u64) -> Option<FileAttr> {
        let node = self.nodes.get(&inode)?;
        let (kind, size, nlink) = match &node.kind {
            Kind::File(file) => (FileType::RegularFile, file.lock().unwrap().length as u64, 1),
            Kind::Directory(_) => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino: INodeNo(inode),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        })
    }

    fn directory(&mut self, inode: u64) -> Result<&mut Directory, Errno> {
        match self.nodes.get_mut(&inode).map(|node| &mut node.kind) {
            Some(Kind::Directory(directory)) => Ok(directory),
            Some(Kind::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&self, inode: u64) -> Result<SharedFile, Errno> {
        match self.nodes.get(&inode).map(|node| &node.kind) {
            Some(Kind::File(file)) => Ok(file.clone()),
            Some(Kind::Directory(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn check_fault(&self) -> Result<(), Errno> {
        match self.fault {
            Some(fault) => Err(fault.errno()),
            None => Ok(()),
        }
    }

    /// Every change to the disk goes through here first, with the name it touches if any: a
    /// tripped wire fails it, as the power is gone.
    fn step(&mut self, change: Option<Change>, names: &[&OsStr]) -> Result<(), Errno> {
        if self.tripped {
            return Err(Errno::EIO);
        }
        let Some(trip) = &mut self.trip else { return Ok(()) };
        if trip.left.is_none()
            && change.is_some_and(|change| names.iter().any(|name| (trip.matches)(change, name)))
        {
            trip.left = Some(trip.after);
        }
        match &mut trip.left {
            Some(0) => {
                self.trip = None;
                self.tripped = true;
                Err(Errno::EIO)
            }
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn create(&mut self, parent: u64, name: &OsStr, kind: Kind, perm: u16) -> Result<FileAttr, Errno> {
        self.step(Some(Change::Create), &[name])?;
        self.check_fault()?;
        if self.directory(parent)?.names.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        if let Kind::File(file) = &kind {
            // Created after the power cuts so far: none refuses its writes.
            file.lock().unwrap().cuts = self.cuts;
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.nodes.insert(inode, Node { kind, perm, mtime: SystemTime::now() });
        self.directory(parent)?.names.insert(name.to_os_string(), inode);
        Ok(self.attr(inode).expect("just created"))
    }

    fn remove(&mut self, parent: u64, name: &OsStr, directory: bool) -> Result<(), Errno> {
        self.step(Some(Change::Remove), &[name])?;
        let inode = *self.directory(parent)?.names.get(name).ok_or(Errno::ENOENT)?;
        match (&self.nodes[&inode].kind, directory) {
            (Kind::Directory(d), true) if !d.names.is_empty() => return Err(Errno::ENOTEMPTY),
            (Kind::Directory(_), true) | (Kind::File(_), false) => {}
            (Kind::File(_), true) => return Err(Errno::ENOTDIR),
            (Kind::Directory(_), false) => return Err(Errno::EISDIR),
        }
        // The node stays: the last fsynced names may still hold it.
        self.directory(parent)?.names.remove(name);
        Ok(())
    }

    fn rename(&mut self, parent: u64, name: &OsStr, new_parent: u64, new_name: &OsStr) -> Result<(), Errno> {
        self.step(Some(Change::Rename), &[name, new_name])?;
        let inode = *self.directory(parent)?.names.get(name).ok_or(Errno::ENOENT)?;
        if let Some(&target) = self.directory(new_parent)?.names.get(new_name)
            && let Kind::Directory(d) = &self.nodes[&target].kind
            && !d.names.is_empty()
        {
            return Err(Errno::ENOTEMPTY);
        }
        self.directory(parent)?.names.remove(name);
        self.directory(new_parent)?.names.insert(new_name.to_os_string(), inode);
        Ok(())
    }

    /// A write's part under the disk's lock: the file, and the power cuts so far. The bytes
    /// are written under the file's own lock (`write_file`).
    fn write(&mut self, inode: u64, offset: usize, bytes: &[u8]) -> Result<(SharedFile, u64), Errno> {
        self.step(None, &[])?;
        self.check_fault()?;
        let file = self.file(inode)?;
        self.nodes.get_mut(&inode).unwrap().mtime = SystemTime::now();
        self.last_write = Some((inode, offset, bytes.to_vec()));
        Ok((file, self.cuts))
    }

    /// An fsync's part under the disk's lock (`sync_file` does the rest).
    fn sync_file(&mut self, inode: u64) -> Result<(SharedFile, u64), Errno> {
        self.step(None, &[])?;
        self.check_fault()?;
        let file = self.file(inode)?;
        if self.last_write.as_ref().is_some_and(|(written, _, _)| *written == inode) {
            self.last_write = None;
        }
        Ok((file, self.cuts))
    }

    fn sync_directory(&mut self, inode: u64) -> Result<(), Errno> {
        self.step(None, &[])?;
        self.check_fault()?;
        let directory = self.directory(inode)?;
        directory.synced_names = directory.names.clone();
        Ok(())
    }

    fn unsynced_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|node| match &node.kind {
                Kind::File(file) => file.lock().unwrap().unsynced_bytes,
                Kind::Directory(_) => 0,
            })
            .sum()
    }

    fn power_cut(&mut self, tear_seed: Option<u64>) -> PowerCut {
        self.trip = None;
        self.sync_delay = None;
        self.tripped = false;
        self.cuts += 1;
        let mut cut = PowerCut::default();
        for node in self.nodes.values_mut() {
            match &mut node.kind {
                Kind::File(file) => {
                    let mut file = file.lock().unwrap();
                    file.cuts = self.cuts;
                    if file.unsynced_bytes > 0 || !file.undo.is_empty() || file.length != file.synced_length {
                        cut.files_rolled_back += 1;
                        // A backing file that fails here has said why on stderr; the run goes on
                        // with what it holds.
                        cut.bytes_lost += file.roll_back().unwrap_or(0);
                    }
                }
                Kind::Directory(directory) => {
                    if directory.names != directory.synced_names {
                        cut.directories_rolled_back += 1;
                        directory.names = directory.synced_names.clone();
                    }
                }
            }
        }
        self.collect_unreachable();
        if let (Some(seed), Some((inode, offset, bytes))) = (tear_seed, self.last_write.take())
            && let Some(Kind::File(file)) = self.nodes.get(&inode).map(|node| &node.kind)
        {
            let mut file = file.lock().unwrap();
            let kept = (mix(seed) % (bytes.len() as u64 + 1)) as usize;
            if kept > 0 && file.write(offset, &bytes[..kept]).is_ok() {
                // What the platter holds after the cut is durable by definition.
                file.sync();
                cut.torn_bytes_kept = kept as u64;
            }
        }
        self.last_write = None;
        cut
    }

    /// Drops the nodes no name leads to any more.
    fn collect_unreachable(&mut self) {
        let mut reachable = vec![ROOT];
        let mut seen = std::collections::HashSet::from([ROOT]);
        while let Some(inode) = reachable.pop() {
            if let Some(Node { kind: Kind::Directory(directory), .. }) = self.nodes.get(&inode) {
                for child in directory.names.values() {
                    if seen.insert(*child) {
                        reachable.push(*child);
                    }
                }
            }
        }
        self.nodes.retain(|inode, _| seen.contains(inode));
    }
}

/// splitmix64: a torn write's length from the harness's seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The FUSE side: each request takes the disk's lock for its duration.
struct Handler {
    disk: Arc<Mutex<Disk>>,
    backing: Arc<Backing>,
}

impl Handler {
    /// Runs an fsync under the disk's lock, then takes the slow-sync delay without it (writes
    /// to other files go on meanwhile).
    fn sync(&self, sync: impl FnOnce(&mut Disk) -> Result<(), Errno>) -> Result<(), Errno> {
        let (result, delay) = {
            let mut disk = self.disk.lock().unwrap();
            (sync(&mut disk), disk.sync_delay)
        };
        self.delay_sync(result, delay)
    }

    /// A write: the file looked up (and the write counted, checked for faults, kept for a torn
    /// write) under the disk's lock, the bytes written under the file's own.
    fn write_file(&self, inode: u64, offset: usize, data: &[u8]) -> Result<(), Errno> {
        let found = self.disk.lock().unwrap().write(inode, offset, data);
        write_found(found?, offset, data)
    }

    /// An fsync of a file: looked up under the disk's lock, made durable under its own (writes to
    /// other files go on meanwhile), then the slow-sync delay.
    fn sync_file(&self, inode: u64) -> Result<(), Errno> {
        let (found, delay) = {
            let mut disk = self.disk.lock().unwrap();
            (disk.sync_file(inode), disk.sync_delay)
        };
        let result = found.and_then(|(file, cuts)| {
            let mut file = file.lock().unwrap();
            if file.cuts != cuts {
                return Err(Errno::EIO);
            }
            file.sync();
            Ok(())
        });
        self.delay_sync(result, delay)
    }

    fn delay_sync(&self, result: Result<(), Errno>, delay: Option<Duration>) -> Result<(), Errno> {
        if let (Ok(()), Some(delay)) = (result, delay) {
            std::thread::sleep(delay);
        }
        result
    }
}

/// A write's second half, under the file's lock: refused if a power cut came since the file was
/// looked up.
fn write_found((file, cuts): (SharedFile, u64), offset: usize, data: &[u8]) -> Result<(), Errno> {
    let mut file = file.lock().unwrap();
    if file.cuts != cuts {
        return Err(Errno::EIO);
    }
    file.write(offset, data)
}

fn reply_entry(result: Result<FileAttr, Errno>, reply: ReplyEntry) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(errno) => reply.error(errno),
    }
}

fn reply_empty(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}

impl Filesystem for Handler {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut disk = self.disk.lock().unwrap();
        let found = disk.directory(parent.0).and_then(|d| d.names.get(name).copied().ok_or(Errno::ENOENT));
        reply_entry(found.map(|inode| disk.attr(inode).expect("a named node exists")), reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.disk.lock().unwrap().attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut disk = self.disk.lock().unwrap();
        let result = (|| {
            if let Some(size) = size {
                disk.step(None, &[])?;
                disk.check_fault()?;
                disk.file(ino.0)?.lock().unwrap().truncate(size as usize)?;
            }
            let node = disk.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            if size.is_some() || mtime.is_some() {
                node.mtime = SystemTime::now();
            }
            Ok(disk.attr(ino.0).expect("exists"))
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let perm = (mode & !umask & 0o7777) as u16;
        let result =
            self.disk.lock().unwrap().create(parent.0, name, Kind::Directory(Directory::default()), perm);
        reply_entry(result, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.disk.lock().unwrap().remove(parent.0, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.disk.lock().unwrap().remove(parent.0, name, true), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.disk.lock().unwrap().rename(parent.0, name, newparent.0, newname), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.lock().unwrap().file(ino.0) {
            Ok(file) => {
                file.lock().unwrap().opened();
                reply.opened(FileHandle(0), FopenFlags::empty())
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // A file a power cut took away has nothing left to close.
        let file = self.disk.lock().unwrap().file(ino.0);
        if let Ok(file) = file {
            file.lock().unwrap().released();
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = self.disk.lock().unwrap().file(ino.0);
        match file {
            Ok(file) => {
                let mut file = file.lock().unwrap();
                let start = (offset as usize).min(file.length);
                match file.read(start, start + size as usize) {
                    Ok(bytes) => reply.data(&bytes),
                    Err(errno) => reply.error(errno),
                }
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_file(ino.0, offset as usize, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing becomes durable.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.sync_file(ino.0), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.lock().unwrap().directory(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut disk = self.disk.lock().unwrap();
        let names: Vec<(OsString, u64)> = match disk.directory(ino.0) {
            Ok(directory) => directory.names.iter().map(|(name, inode)| (name.clone(), *inode)).collect(),
            Err(errno) => return reply.error(errno),
        };
        let mut entries = vec![(OsString::from("."), ino.0, FileType::Directory)];
        entries.push((OsString::from(".."), ROOT, FileType::Directory));
        for (name, inode) in names {
            let kind = match disk.nodes[&inode].kind {
                Kind::File(_) => FileType::RegularFile,
                Kind::Directory(_) => FileType::Directory,
            };
            entries.push((name, inode, kind));
        }
        for (index, (name, inode, kind)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(inode), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.sync(|disk| disk.sync_directory(ino.0)), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = 1 << 28;
        reply.statfs(blocks, blocks / 2, blocks / 2, 1 << 20, 1 << 19, BLOCK_BYTES, 255, BLOCK_BYTES);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let file = match File::new(&self.backing) {
            Ok(file) => file,
            Err(errno) => return reply.error(errno),
        };
        let file = Arc::new(Mutex::new(file));
        match self.disk.lock().unwrap().create(parent.0, name, Kind::File(file), perm) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut disk = self.disk.lock().unwrap();
        let result = (|| {
            if mode != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
            disk.step(None, &[])?;
            disk.check_fault()?;
            let file = disk.file(ino.0)?;
            let mut file = file.lock().unwrap();
            let end = (offset + length) as usize;
            if end > file.length {
                let old = file.length;
                file.write(old, &vec![0; end - old])?;
            }
            Ok(())
        })();
        reply_empty(result, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler_with_files(count: usize) -> (Handler, Vec<u64>) {
        let handler =
            Handler { disk: Arc::new(Mutex::new(Disk::new())), backing: Arc::new(Backing::new().unwrap()) };
        let inodes = (0..count)
            .map(|index| {
                let file = Arc::new(Mutex::new(File::new(&handler.backing).unwrap()));
                let name = OsString::from(format!("file-{index}"));
                let attr = handler.disk.lock().unwrap().create(ROOT, &name, Kind::File(file), 0o644);
                attr.unwrap().ino.0
            })
            .collect();
        (handler, inodes)
    }

    /// A write to one file does not wait for another file's lock (held here as a long write
    /// would hold it): a log's appends go on while a page store writes out a commit.
    #[test]
    fn a_write_to_one_file_does_not_wait_for_another() {
        let (handler, inodes) = handler_with_files(2);
        let busy = handler.disk.lock().unwrap().file(inodes[0]).unwrap();
        let _held = busy.lock().unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let result = handler
                    .write_file(inodes[1], 0, b"log record")
                    .and_then(|()| handler.sync_file(inodes[1]));
                done.send(result).unwrap();
            });
            let result = finished.recv_timeout(Duration::from_secs(10)).expect("the write did not wait");
            assert_eq!(result, Ok(()));
        });
    }

    /// A write that looked its file up before a power cut and reaches it after is refused, and
    /// changes nothing: the power went while it was on its way.
    #[test]
    fn a_write_caught_by_a_power_cut_is_refused() {
        let (handler, inodes) = handler_with_files(1);
        handler.write_file(inodes[0], 0, b"durable").unwrap();
        handler.sync_file(inodes[0]).unwrap();
        handler.sync(|disk| disk.sync_directory(ROOT)).unwrap();
        let on_its_way = handler.disk.lock().unwrap().write(inodes[0], 0, b"NOT").unwrap();
        let file = on_its_way.0.clone();
        handler.disk.lock().unwrap().power_cut(None);
        assert_eq!(write_found(on_its_way, 0, b"NOT"), Err(Errno::EIO));
        // A write that looks the file up after the cut goes through.
        handler.write_file(inodes[0], 7, b" after").unwrap();
        assert_eq!(file.lock().unwrap().read(0, 64).unwrap(), b"durable after");
    }
}
