//! faultfs on a real mount: what a power cut keeps and what it loses. Needs root and /dev/fuse
//! (both are there on CI machines).

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use faultfs::{Change, Fault, FaultFs};

fn mounted() -> (tempfile::TempDir, FaultFs) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::mount(dir.path()).expect("mount faultfs (needs root and /dev/fuse)");
    (dir, fs)
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// Creates `name` under `root` holding `bytes`, made durable (file and name); returns it open.
fn durable_file(root: &Path, name: &str, bytes: &[u8]) -> File {
    let mut file = File::create(root.join(name)).unwrap();
    file.write_all(bytes).unwrap();
    file.sync_data().unwrap();
    sync_dir(root);
    file
}

fn read(path: &Path) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path).ok()?.read_to_end(&mut bytes).unwrap();
    Some(bytes)
}

#[test]
fn a_power_cut_keeps_what_was_fsynced_and_loses_the_rest() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let path = root.join("log");
    let mut file = durable_file(&root, "log", b"hello");
    file.write_all(b" world").unwrap();
    assert_eq!(read(&path).unwrap(), b"hello world", "written bytes are readable at once");
    assert_eq!(fs.unsynced_bytes(), 6);
    drop(file);

    let cut = fs.power_cut(None);
    assert_eq!(read(&path).unwrap(), b"hello");
    assert_eq!((cut.files_rolled_back, cut.bytes_lost), (1, 6));
}

#[test]
fn overwrites_and_truncation_of_durable_bytes_are_undone() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let path = root.join("state");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"0123456789").unwrap();
    file.sync_all().unwrap();
    sync_dir(&root);
    file.seek(SeekFrom::Start(2)).unwrap();
    file.write_all(b"ab").unwrap();
    file.set_len(6).unwrap();
    file.write_all(b"XYZXYZ").unwrap();
    assert_eq!(read(&path).unwrap(), b"01abXYZXYZ");
    drop(file);

    fs.power_cut(None);
    assert_eq!(read(&path).unwrap(), b"0123456789");
}

#[test]
fn a_name_is_durable_only_once_its_directory_is_fsynced() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    // The write-temp, fsync, rename, fsync-directory dance survives.
    fs::write(root.join("vote"), b"old").unwrap();
    File::open(root.join("vote")).unwrap().sync_all().unwrap();
    sync_dir(&root);
    let mut temporary = File::create(root.join("vote.tmp")).unwrap();
    temporary.write_all(b"new").unwrap();
    temporary.sync_all().unwrap();
    fs::rename(root.join("vote.tmp"), root.join("vote")).unwrap();
    sync_dir(&root);
    // A rename whose directory is not fsynced is undone, and so is a delete.
    fs::write(root.join("a"), b"A").unwrap();
    File::open(root.join("a")).unwrap().sync_all().unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    sync_dir(&root);
    fs::rename(root.join("a"), root.join("sub").join("b")).unwrap();
    fs::remove_file(root.join("vote")).unwrap();
    // Created and fsynced, but its directory was not: gone after the cut.
    let mut file = File::create(root.join("orphan")).unwrap();
    file.write_all(b"data").unwrap();
    file.sync_all().unwrap();
    drop(file);

    fs.power_cut(None);
    let mut names: Vec<String> =
        fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "sub", "vote"]);
    assert_eq!(read(&root.join("vote")).unwrap(), b"new");
    assert_eq!(read(&root.join("a")).unwrap(), b"A");
    assert!(read(&root.join("sub").join("b")).is_none());
}

#[test]
fn a_torn_write_keeps_a_prefix_of_the_last_unsynced_write() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let path = root.join("segment");
    let mut file = durable_file(&root, "segment", b"durable|");
    file.write_all(b"first unsynced|").unwrap();
    file.write_all(b"the last write, torn").unwrap();
    drop(file);

    let cut = fs.power_cut(Some(7));
    let bytes = read(&path).unwrap();
    let kept = cut.torn_bytes_kept as usize;
    assert!(kept <= 20);
    // The torn write lands where it was written; the write before it is lost.
    let mut expected = b"durable|".to_vec();
    if kept > 0 {
        expected.resize(8 + 15, 0);
        expected.extend_from_slice(&b"the last write, torn"[..kept]);
    }
    assert_eq!(bytes, expected);
}

#[test]
fn injected_faults_fail_writes_and_fsyncs_and_clear_again() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let mut file = File::create(root.join("f")).unwrap();
    fs.fail(Some(Fault::DiskFull));
    let error = file.write_all(b"x").and_then(|_| file.sync_all()).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
    fs.fail(Some(Fault::Io));
    assert_eq!(file.sync_all().unwrap_err().raw_os_error(), Some(5), "EIO");
    fs.fail(None);
    file.write_all(b"ok").unwrap();
    file.sync_all().unwrap();
}

/// A trip wire set off by a name lets `after` more changes through, then fails every change
/// (EIO) until the power cut, which loses what was not synced by then and disarms the wire.
#[test]
fn a_trip_wire_stops_the_disk_at_a_named_step_until_the_power_cut() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let mut log = durable_file(&root, "log", b"synced");
    fs.arm(|change, name| change == Change::Create && name.to_string_lossy().ends_with(".new"), 3);
    log.write_all(b" unsynced").unwrap();
    assert!(!fs.tripped(), "no matching name yet");
    // The create of `segment.new` is the first of its three changes, then a write and a sync.
    let mut segment = File::create(root.join("segment.new")).unwrap();
    segment.write_all(b"header").unwrap();
    segment.sync_data().unwrap();
    assert!(!fs.tripped());
    assert_eq!(segment.write_all(b"more").unwrap_err().raw_os_error(), Some(5), "EIO");
    assert!(fs.tripped());
    assert_eq!(log.sync_data().unwrap_err().raw_os_error(), Some(5), "every change fails");
    assert_eq!(read(&root.join("log")).unwrap(), b"synced unsynced", "reads still work");
    drop((log, segment));

    fs.power_cut(None);
    assert!(!fs.tripped());
    assert_eq!(read(&root.join("log")).unwrap(), b"synced");
    assert_eq!(read(&root.join("segment.new")), None, "its name was never synced");
    File::create(root.join("after")).unwrap().sync_all().unwrap();

    // With no changes allowed, the matching change itself fails.
    fs.arm(|_, name| name == "victim", 0);
    assert!(File::create(root.join("victim")).is_err());
    assert!(fs.tripped());
    fs.disarm();
    File::create(root.join("victim")).unwrap();
}

/// A slow fsync makes durable what was written before it; a write to another file that comes
/// in while it takes its time goes through at once and is not covered. (The kernel holds a
/// FUSE file's inode lock across its fsync, so writes to the same file wait for it.)
#[test]
fn a_slow_fsync_covers_only_what_was_written_before_it() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let mut log = durable_file(&root, "log", b"");
    let mut other = durable_file(&root, "other", b"");
    log.write_all(b"before").unwrap();
    fs.slow_syncs(Some(std::time::Duration::from_secs(1)));
    let syncing = log.try_clone().unwrap();
    let sync = std::thread::spawn(move || {
        syncing.sync_data().unwrap();
        std::time::Instant::now()
    });
    // The sync has run once nothing is unsynced; then write while it is still sleeping.
    while fs.unsynced_bytes() > 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    other.write_all(b"during").unwrap();
    let written = std::time::Instant::now();
    let synced = sync.join().unwrap();
    assert!(written < synced, "the write waited for the slow fsync");
    drop((log, other));
    fs.power_cut(None);
    assert_eq!(read(&root.join("log")).unwrap(), b"before");
    assert_eq!(read(&root.join("other")).unwrap(), b"");
}

/// The ledger's state store on faultfs: a child process applies, flushes, applies once more and
/// dies without closing anything; after a power cut the state reopens at the flush or later, as a
/// whole entry. (On sled, before `RunStore::open` fsynced its directories, it reopened empty: the
/// cut took the names of everything it had flushed.)
#[test]
fn the_ledger_state_survives_a_power_cut_as_of_its_last_flush() {
    let (_dir, fs) = mounted();
    let path = fs.mountpoint().join("state");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "ledger_child", "--nocapture", "--test-threads=1"])
        .env("FAULTFS_LEDGER_DIR", &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&child.stdout);
    let digests: Vec<&str> =
        stdout.lines().filter_map(|line| Some(&line[line.find("digest ")? + 7..])).collect();
    assert_eq!(digests.len(), 2, "child output: {stdout}");

    fs.power_cut(None);
    let reopened = ledger::Ledger::open(tally_store::RunStore::open(&path).unwrap()).unwrap();
    let digest = hex(&reopened.meta().digest);
    assert!(digests.contains(&digest.as_str()), "state at {digest}, expected one of {digests:?}");
    assert_eq!(reopened.lookup_transfers(&[10]).unwrap().len(), 1, "the flushed transfer");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The child of the test above (does nothing unless it is that child).
#[test]
fn ledger_child() {
    use ledger::*;
    use tally_store::RunStore;
    let Some(path) = std::env::var_os("FAULTFS_LEDGER_DIR") else { return };
    let accounts: Vec<Account> =
        (1..=4).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    let transfer = |id: u128| Transfer {
        id,
        debit_account_id: 1,
        credit_account_id: 2,
        amount: 5,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    };
    let mut ledger = Ledger::open(RunStore::open(Path::new(&path)).unwrap()).unwrap();
    ledger.apply(&[Batch::CreateAccounts(accounts)], 1_000, None).unwrap();
    ledger.apply(&[Batch::CreateTransfers(vec![transfer(10)])], 2_000, None).unwrap();
    ledger.store().flush().unwrap();
    println!("digest {}", hex(&ledger.meta().digest));
    ledger.apply(&[Batch::CreateTransfers(vec![transfer(11)])], 3_000, None).unwrap();
    println!("digest {}", hex(&ledger.meta().digest));
    // Dies with the store open: no destructor flushes anything.
    std::process::abort();
}

/// The write-ahead log on faultfs: the record index of every sealed segment survives a power cut,
/// so a restart reads a few bytes of each older segment instead of all of it. (Unsynced before
/// issue 24's fix: after a power cut in a ten-minute chaos run, a node scanned thousands of
/// segments over FUSE and took 15 s to open its log.)
#[test]
fn the_logs_segment_indexes_survive_a_power_cut() {
    use raft_node::storage::wal::Wal;
    let (_dir, fs) = mounted();
    let log = fs.mountpoint().join("wal");
    let mut wal = Wal::open_with(&log, 64 * 1024).unwrap();
    for index in 1..=200u64 {
        wal.append(index, &vec![index as u8; 4000]).unwrap();
        if index % 10 == 0 {
            wal.sync().unwrap();
        }
    }
    drop(wal);
    let indexes = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut found: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "idx"))
            .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&path).unwrap()))
            .collect();
        found.sort();
        found
    };
    let before = indexes(&log);
    let segments = fs::read_dir(&log).unwrap().filter(|entry| {
        entry.as_ref().unwrap().path().extension().is_some_and(|extension| extension == "wal")
    });
    assert_eq!(before.len() + 1, segments.count(), "an index beside every sealed segment");
    assert!(before.len() >= 10, "{} segments sealed", before.len());

    fs.power_cut(None);
    assert_eq!(indexes(&log), before, "the indexes after the power cut");
    let wal = Wal::open_with(&log, 64 * 1024).unwrap();
    assert_eq!(wal.last_index(), Some(200));
}

/// The harness's resident memory, from /proc.
fn resident_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// What is written lives on the machine's disk, not in the harness's memory: a 600-second chaos
/// run writes tens of gigabytes. 512 MiB written and fsynced grow the process by far less than
/// that (the in-memory disk grew by all of it), and read back whole; a power cut still rolls back
/// what came after the fsync.
#[test]
fn written_bytes_live_on_the_machines_disk_not_in_memory() {
    let (_dir, fs) = mounted();
    let root = fs.mountpoint().to_path_buf();
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let before = resident_bytes();
    let mut file = File::create(root.join("big")).unwrap();
    for _ in 0..512 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_data().unwrap();
    sync_dir(&root);
    let grown = resident_bytes().saturating_sub(before);
    assert!(grown < 256 << 20, "the harness grew by {} MiB for 512 MiB written", grown >> 20);
    file.write_all(b"after the fsync").unwrap();
    drop(file);

    let cut = fs.power_cut(None);
    assert_eq!(cut.bytes_lost, 15);
    let mut back = File::open(root.join("big")).unwrap();
    assert_eq!(back.metadata().unwrap().len(), 512 << 20);
    let mut read_back = vec![0; 1 << 20];
    for _ in 0..512 {
        back.read_exact(&mut read_back).unwrap();
        assert!(read_back == chunk, "the bytes read back differ");
    }
}
