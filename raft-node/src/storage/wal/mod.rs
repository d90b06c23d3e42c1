//! A segmented write-ahead log: the durable Raft log of a tally node.
//!
//! # On-disk format, version 2
//!
//! The format is a promise to every node's disk: change it only together with `FORMAT_VERSION`,
//! and keep a reader for the old version. Version 2 changed no framing: it marks logs whose
//! membership entries give every member a peer address (`NodeInfo::peer_address`, the three
//! doors). Version 1 logs come only from pre-release builds and are refused
//! (`WalError::OtherVersion`), not read: no release wrote them.
//!
//! A log is one directory of segment files, each named `<first index, 20 digits, zero-padded>.wal`
//! (`00000000000000000001.wal`), and beside each older segment its record index, the same name
//! ending in `.idx` (`segment_index`). Other files are not the log's and are left alone (the vote
//! written by `write_file_atomic`, its `.tmp`). Indexes start at 1 and are contiguous within a
//! segment and across segments: each segment starts at the index after the previous segment's
//! last record.
//!
//! ```text
//! segment: header record*
//! header:  magic "TALLYWAL" (8 bytes) | format version: u32 LE (2)
//! record:  payload_len: u32 LE | crc: u32 LE | index: u64 LE | payload (payload_len bytes)
//! ```
//!
//! `crc` is CRC-32C (Castagnoli) over the index bytes followed by the payload. `payload_len` is at
//! most `RECORD_BYTES_MAX`. A segment rolls over before a record would take it past
//! `SEGMENT_BYTES_MAX`, but always holds at least one record, whatever its size.
//!
//! # Durability
//!
//! - `append` only writes; `sync` fdatasyncs every segment written since the last sync, and fsyncs
//!   the directory if a segment file was created. One sync covers every append before it.
//! - Before creating a segment the log syncs everything, data and directory. So every segment but
//!   the last is whole on disk before its successor exists, and only the last can hold a torn write.
//! - `truncate_from` deletes later segments newest first and `purge_upto` deletes older segments
//!   oldest first, fsyncing the directory after each: a crash part-way leaves a log that is shorter
//!   at one end and still contiguous.
//! - `open` syncs what it recovered, which may have been only in the page cache of a process that
//!   died before its sync; the caller treats everything it can read as durable.
//! - After an I/O error in `append`, `sync`, `truncate_from` or `purge_upto`, every later call fails:
//!   after a failed fsync Linux may drop the dirty pages and report success on a retry, so the only
//!   safe way on is to reopen, which runs recovery against what is really on disk.
//!
//! # Recovery
//!
//! `open` verifies that the segments are contiguous, and in the last segment, and in every older
//! one without a valid record index (`segment_index`), every record's CRC and that indexes run on
//! from the segment's name. An older segment with a valid index is not read whole: its header,
//! its length and its last record's header are checked against the index, and its records are
//! checked as they are read, like every record the log returns. The index is written when the log
//! rolls over to a new segment, and again at open for an older segment scanned without one, so
//! that opening reads the log's tail, not the whole log kept behind a snapshot.
//!
//! An unreadable record (cut short, too long, bad CRC) in the last segment
//! after which no valid record can be found is the torn tail of writes that were never synced: the
//! file is cut back to the last good record, and a last segment left without records is deleted,
//! as is a last segment whose header is zeros with no valid record after it (created, then a power
//! cut before its first sync let a later write reach the disk but not the header).
//! Any other damage is `WalError::Corrupt`, and the node refuses to start rather than lose
//! acknowledged entries.
//!
//! A damaged record in the last segment with valid records after it is ambiguous. Unsynced writes
//! reach the disk in any order in a power loss (each of them torn or whole), so it can be the torn
//! tail of writes never synced; or damage at rest to a synced, acknowledged record. `open_with`
//! refuses it. `open_recovering` is told below which index records were surely synced (the
//! node's committed file names them): damage there is refused; damage at or beyond it is cut off
//! like a torn tail and reported (`Wal::lost_tail`). If it was a torn write, nothing from the
//! damaged record on was ever acknowledged (any sync that completed after its write would have
//! made it whole), so nothing is lost. If it was damage at rest, this node may have acknowledged
//! entries it no longer has, and must not vote until a leader has given them back: the node
//! withholds its vote (`node::withhold_votes`) until its log reaches `LostTail::last_seen` again.

mod format;
mod recovery;
mod segment;
mod segment_index;

use self::format::*;
use self::recovery::*;
use self::segment::*;
use self::segment_index::SegmentIndex;
use super::files::{create_dir_durably, remove_file_durably, sync_dir};
use crate::sys::fs::{self, File, OpenOptions};
use std::fmt;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::format::{RECORD_BYTES_MAX, SEGMENT_BYTES_MAX};
pub use self::segment::{ReadPlan, SyncPlan};

#[derive(Debug)]
pub enum WalError {
    Io(io::Error),
    /// Damage recovery cannot explain as a torn tail, or a record that no longer reads back.
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A whole, valid segment of another format version: written by another build.
    OtherVersion {
        path: PathBuf,
        version: u32,
    },
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io(error) => write!(f, "wal i/o error: {error}"),
            WalError::Corrupt { path, offset, reason } => {
                write!(f, "wal corrupt: {} at offset {offset}: {reason}", path.display())
            }
            WalError::OtherVersion { path, version } => write!(
                f,
                "{} was written by another build of tally (log format {version}; this build reads format \
                 {FORMAT_VERSION}): run this data directory with the build that wrote it",
                path.display()
            ),
        }
    }
}

impl std::error::Error for WalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WalError::Io(error) => Some(error),
            WalError::Corrupt { .. } | WalError::OtherVersion { .. } => None,
        }
    }
}

impl From<io::Error> for WalError {
    fn from(error: io::Error) -> Self {
        WalError::Io(error)
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> WalError {
    WalError::Corrupt { path: path.to_path_buf(), offset, reason: reason.into() }
}

/// One segment as a purge policy sees it: the indexes it holds, its size and its file.
#[derive(Clone, Debug)]
pub struct SegmentSummary {
    pub first_index: u64,
    pub last_index: u64,
    pub bytes: u64,
    pub path: PathBuf,
}

/// The log of one node, owned by one caller (the log store, behind a lock). Nothing stops a second
/// `Wal` on the same directory, in this process or another, and two writers would corrupt it: a
/// node opens its log once. (A lock file would need `File::lock`, newer than our rust-version.)
pub struct Wal {
    dir: PathBuf,
    /// `SEGMENT_BYTES_MAX`, or smaller in tests so that they roll segments quickly.
    segment_bytes_max: u64,
    /// Ascending and contiguous: each starts at the index after the previous one's last.
    segments: Vec<Segment>,
    /// Counts every change that needs an fsync: a segment's `written` and `synced`, and the
    /// directory's below, are values of it.
    version: u64,
    /// The directory changed (a segment was created) at `dir_written`; an fsync of it covers up to
    /// `dir_synced`.
    dir_written: u64,
    dir_synced: u64,
    /// An I/O error hit a write path; see "Durability" above for why that is final.
    failed: bool,
    /// What `open_recovering` cut off as an ambiguous tail.
    lost_tail: Option<LostTail>,
}

/// A tail `open_recovering` cut off although valid records followed the damage (see "Recovery").
/// WAL indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostTail {
    /// The damaged record's index: the log now ends before it.
    pub first: u64,
    /// The last index a valid record after the damage had.
    pub last_seen: u64,
}

impl Wal {
    /// Opens or creates the log in `dir` and recovers it; see "Recovery" above.
    pub fn open(dir: &Path) -> Result<Wal, WalError> {
        Wal::open_with(dir, SEGMENT_BYTES_MAX)
    }

    /// `open` with segments that roll over at `segment_bytes_max`. Public so that the crash test,
    /// which runs as a separate crate, can roll segments quickly too. Recovery does not depend on
    /// it: a log written with one segment size opens with any other.
    pub fn open_with(dir: &Path, segment_bytes_max: u64) -> Result<Wal, WalError> {
        Wal::open_recovering(dir, segment_bytes_max, None)
    }

    /// `open_with` that cuts off an ambiguous tail (see "Recovery") if it starts at or beyond
    /// `synced_below`, the index below which every record is known to have been synced; `None`
    /// refuses every ambiguous tail, as `open_with` does.
    pub fn open_recovering(
        dir: &Path,
        segment_bytes_max: u64,
        synced_below: Option<u64>,
    ) -> Result<Wal, WalError> {
        assert!(segment_bytes_max > 0 && segment_bytes_max <= SEGMENT_BYTES_MAX);
        create_dir_durably(dir)?;
        let listed = list_segments(dir)?;
        let listed_count = listed.len();
        let mut segments: Vec<Segment> = Vec::with_capacity(listed_count);
        let mut lost_tail = None;
        for (position, (first_index, path)) in listed.into_iter().enumerate() {
            if let Some(previous) = segments.last() {
                check_follows(previous.last_index(), first_index, &path)?;
            }
            let is_last = position + 1 == listed_count;
            // An index that cannot be read is as good as none: the scan reads the segment itself,
            // and meets any error of the segment's own.
            if !is_last && let Ok(Some(segment)) = open_indexed(first_index, &path) {
                segments.push(segment);
                continue;
            }
            let (segment, lost) = recover_segment(dir, first_index, path, is_last, synced_below)?;
            lost_tail = lost_tail.or(lost);
            if !is_last && let Some(segment) = &segment {
                // Scanned whole (an older build's log, or an index lost to a crash): the next
                // open need not.
                segment.write_index();
            }
            segments.extend(segment);
        }
        // What we recovered may be only in the page cache of a process that died before syncing,
        // and every record we return from here on counts as durable.
        if let Some(last) = segments.last() {
            last.file.sync_data()?;
        }
        sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            segments,
            version: 0,
            dir_written: 0,
            dir_synced: 0,
            failed: false,
            lost_tail,
        })
    }

    /// The ambiguous tail `open_recovering` cut off, if it did.
    pub fn lost_tail(&self) -> Option<LostTail> {
        self.lost_tail
    }

    /// Appends one record. Writes to the OS without syncing; see `sync`.
    ///
    /// Panics unless `index` is `last_index() + 1`, or, on an empty log, at least 1: anything else
    /// is a bug in the caller. A payload over `RECORD_BYTES_MAX` is refused and nothing is written.
    pub fn append(&mut self, index: u64, payload: &[u8]) -> Result<(), WalError> {
        let payload_len = match u32::try_from(payload.len()) {
            Ok(len) if len <= RECORD_BYTES_MAX => len,
            _ => return Err(payload_too_large(payload.len()).into()),
        };
        self.check_usable()?;
        match self.last_index() {
            Some(last) => assert_eq!(index, last + 1, "wal: append must follow the last index"),
            None => assert!(index >= 1, "wal: indexes start at 1"),
        }
        let record = encode_record(index, payload);
        let result = self.write_record(index, &record, payload_len);
        self.poison_on_error(result)
    }

    /// Makes every append before it durable: fdatasyncs the segments written since the last sync
    /// and fsyncs the directory if a segment was created. One sync for a group of appends is how
    /// the node commits them as a group.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        let result = self.sync_pending();
        self.poison_on_error(result)
    }

    /// Removes every record with an index of `index` or more, durably.
    pub fn truncate_from(&mut self, index: u64) -> Result<(), WalError> {
        self.check_usable()?;
        let result = self.truncate_from_unchecked(index);
        self.poison_on_error(result)
    }

    /// Deletes, durably, every segment whose last index is at most `index`. Records of a segment
    /// that `index` only partly covers stay readable, so `first_index` may end up below `index + 1`.
    pub fn purge_upto(&mut self, index: u64) -> Result<(), WalError> {
        self.check_usable()?;
        let result = self.purge_upto_unchecked(index);
        self.poison_on_error(result)
    }

    /// Every segment, oldest first: what a purge policy looks at (`log_store::purge_bound`).
    pub fn segments(&self) -> Vec<SegmentSummary> {
        let summary = |segment: &Segment| SegmentSummary {
            first_index: segment.first_index,
            last_index: segment.last_index(),
            bytes: segment.bytes_len,
            path: segment.path.clone(),
        };
        self.segments.iter().map(summary).collect()
    }

    /// The first index still readable, or `None` if the log is empty.
    pub fn first_index(&self) -> Option<u64> {
        self.segments.first().map(|segment| segment.first_index)
    }

    pub fn last_index(&self) -> Option<u64> {
        self.segments.last().map(Segment::last_index)
    }

    /// The records with indexes in `[start, end)`, in order. Indexes the log does not hold are
    /// left out, so the result can be shorter than the range, or empty.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        self.read_plan(start, end, u64::MAX)?.read()
    }

    /// Plans a read of the records in `[start, end)` the log holds, stopping before the payloads
    /// would pass `bytes_max` (but taking at least one record).
    pub fn read_plan(&self, start: u64, end: u64, bytes_max: u64) -> Result<ReadPlan, WalError> {
        self.check_usable()?;
        let mut parts = Vec::new();
        let mut bytes_left = bytes_max;
        for segment in &self.segments {
            let segment_start = start.max(segment.first_index);
            let segment_end = end.min(segment.last_index() + 1);
            if segment_start >= segment_end {
                continue;
            }
            let (part, bytes) = segment.read_part(segment_start, segment_end, bytes_left, parts.is_empty());
            let whole = part.locs.len() as u64 == segment_end - segment_start;
            if !part.locs.is_empty() {
                parts.push(part);
            }
            bytes_left = bytes_left.saturating_sub(bytes);
            if !whole {
                break;
            }
        }
        Ok(ReadPlan { parts })
    }

    /// Plans a sync of every append so far: the segments written since their last sync, and the
    /// directory if a segment was created since its last. Nothing counts as synced until the
    /// caller has run the plan and reported it with `sync_done` (or `sync_failed`): until then,
    /// a roll or a truncation syncs for itself, so "only the last segment can be torn" holds
    /// whatever the IO thread is doing.
    pub fn sync_plan(&self) -> Result<SyncPlan, WalError> {
        self.check_usable()?;
        let files = self
            .segments
            .iter()
            .filter(|segment| segment.written > segment.synced)
            .map(|segment| (segment.file.clone(), segment.first_index, segment.written))
            .collect();
        let dir = (self.dir_written > self.dir_synced).then(|| (self.dir.clone(), self.dir_written));
        Ok(SyncPlan { files, dir, log_dir: self.dir.clone() })
    }

    /// `plan` ran without error: what it covered is durable. A segment deleted meanwhile is
    /// skipped; one created meanwhile has a newer `written` than any in the plan.
    pub fn sync_done(&mut self, plan: &SyncPlan) {
        for (_, first_index, written) in &plan.files {
            if let Some(segment) = self.segments.iter_mut().find(|s| s.first_index == *first_index) {
                segment.synced = segment.synced.max(*written);
            }
        }
        if let Some((_, written)) = plan.dir {
            self.dir_synced = self.dir_synced.max(written);
        }
    }

    /// A `SyncPlan` failed: the log is unusable until reopened (see "Durability").
    pub fn sync_failed(&mut self) {
        self.failed = true;
    }

    /// Records a change to the segment at `position` (an append, a truncation, its creation).
    fn touch(&mut self, position: usize) {
        self.version += 1;
        self.segments[position].written = self.version;
    }

    fn check_usable(&self) -> Result<(), WalError> {
        if self.failed {
            let message = "wal unusable after an earlier i/o error; reopen it to recover";
            return Err(io::Error::other(message).into());
        }
        Ok(())
    }

    fn poison_on_error<T>(&mut self, result: io::Result<T>) -> Result<T, WalError> {
        self.failed |= result.is_err();
        Ok(result?)
    }

    fn write_record(&mut self, index: u64, record: &[u8], payload_len: u32) -> io::Result<()> {
        let segment_bytes_max = self.segment_bytes_max;
        match self.segments.last_mut() {
            Some(segment) if segment.bytes_len + record.len() as u64 <= segment_bytes_max => {
                segment.append(record, payload_len)?;
            }
            _ => self.roll(index, record, payload_len)?,
        }
        self.touch(self.segments.len() - 1);
        Ok(())
    }

    /// Starts a new segment with `record` as its first.
    fn roll(&mut self, index: u64, record: &[u8], payload_len: u32) -> io::Result<()> {
        // Everything before the new segment is made durable first, directory entries included, so
        // that only the last segment can ever hold a torn write: recovery relies on it.
        self.sync_pending()?;
        if let Some(sealed) = self.segments.last() {
            sealed.write_index();
        }
        let segment = Segment::create(&self.dir, index, record, payload_len)?;
        self.segments.push(segment);
        self.version += 1;
        self.dir_written = self.version;
        Ok(())
    }

    fn sync_pending(&mut self) -> io::Result<()> {
        for segment in self.segments.iter_mut().filter(|segment| segment.written > segment.synced) {
            segment.file.sync_data()?;
            segment.synced = segment.written;
        }
        if self.dir_written > self.dir_synced {
            sync_dir(&self.dir)?;
            self.dir_synced = self.dir_written;
        }
        Ok(())
    }

    fn truncate_from_unchecked(&mut self, index: u64) -> io::Result<()> {
        // Newest first: a crash part-way leaves a shorter log, never one with a gap.
        let mut popped = false;
        while let Some(segment) = self.segments.last()
            && segment.first_index >= index
        {
            let segment = self.segments.pop().expect("checked above");
            remove_index(&segment.path)?;
            remove_file_durably(&self.dir, &segment.path)?;
            popped = true;
        }
        if let Some(segment) = self.segments.last()
            && (popped || segment.last_index() >= index)
        {
            // A sealed segment that is the last again takes appends or is cut back: its index,
            // which would name other records, goes first, durably.
            remove_index(&segment.path)?;
            sync_dir(&self.dir)?;
        }
        if let Some(segment) = self.segments.last_mut()
            && segment.last_index() >= index
        {
            segment.truncate_from(index)?;
            self.touch(self.segments.len() - 1);
        }
        self.sync_pending()
    }

    fn purge_upto_unchecked(&mut self, index: u64) -> io::Result<()> {
        let detached = self.detach_upto(index);
        remove_files_durably(&self.dir, &detached)
    }

    /// Takes every segment whose last index is at most `index` out of the log, oldest first, and
    /// returns their files, which the caller deletes with `remove_files_durably` (in that order,
    /// one caller at a time): the deletion, a directory fsync per file, need not hold up appends.
    /// Only for records a durable purge marker covers, which nothing reads again and which a
    /// reopened log drops whatever a crash left of them.
    pub fn detach_upto(&mut self, index: u64) -> Vec<PathBuf> {
        let covered = self.segments.iter().take_while(|segment| segment.last_index() <= index).count();
        self.segments.drain(..covered).map(|segment| segment.path).collect()
    }
}

/// Deletes `paths` (segments `detach_upto` returned) durably, in order: oldest first, so that a
/// crash part-way leaves a log that starts later, never one with a gap.
pub fn remove_files_durably(dir: &Path, paths: &[PathBuf]) -> io::Result<()> {
    for path in paths {
        remove_file_durably(dir, path)?;
        // An index left by a crash here names a segment that no longer exists, and is never read.
        remove_index(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::RangeInclusive;

    use tempfile::TempDir;

    use super::*;
    use crate::storage::files::{read_file, write_file_atomic};

    const PAYLOAD_FIXED_BYTES: usize = 24;
    /// Exactly three `payload_fixed` records per segment, so the cases know where segments roll.
    const SEGMENT_BYTES_SMALL: u64 =
        (SEGMENT_HEADER_BYTES + 3 * (RECORD_HEADER_BYTES + PAYLOAD_FIXED_BYTES)) as u64;
    /// One record per segment: a segment rolls whenever it holds a record.
    const SEGMENT_BYTES_ONE_RECORD: u64 = 1;

    fn payload_fixed(index: u64) -> Vec<u8> {
        index.to_le_bytes().repeat(PAYLOAD_FIXED_BYTES / size_of::<u64>())
    }

    /// From 0 to 38 bytes, with contents that differ between indexes.
    fn payload_varied(index: u64) -> Vec<u8> {
        (0..index * 7 % 39).map(|i| (index as u8).wrapping_mul(31) ^ i as u8).collect()
    }

    type Model = BTreeMap<u64, Vec<u8>>;

    #[derive(Clone, Copy, Debug)]
    enum Op {
        /// Appends `payload_fixed` records for the indexes `first..=last`.
        Append(u64, u64),
        Sync,
        TruncateFrom(u64),
        /// After the purge the log starts at `first_after`, or is empty.
        PurgeUpto {
            upto: u64,
            first_after: Option<u64>,
        },
        Reopen,
    }

    struct Case {
        name: &'static str,
        ops: &'static [Op],
        /// `(first_index, last_index)` at the end.
        bounds: Option<(u64, u64)>,
        segment_files: usize,
    }

    /// Runs the ops against a log and a model, checking after every op that the log reads back
    /// exactly the model, and at the end the bounds and the segment files on disk.
    fn check(case: &Case) {
        let dir = TempDir::new().unwrap();
        let mut wal = Wal::open_with(dir.path(), SEGMENT_BYTES_SMALL).unwrap();
        let mut model = Model::new();
        for (step, op) in case.ops.iter().enumerate() {
            apply(&mut wal, &mut model, dir.path(), *op);
            assert_reads_model(&wal, &model, &format!("case {:?}, step {step} ({op:?})", case.name));
        }
        let bounds = wal.first_index().zip(wal.last_index());
        assert_eq!(bounds, case.bounds, "case {:?}: bounds", case.name);
        let sizes: Vec<u64> =
            segment_paths(dir.path()).iter().map(|path| fs::metadata(path).unwrap().len()).collect();
        assert_eq!(sizes.len(), case.segment_files, "case {:?}: segment files {sizes:?}", case.name);
        assert!(sizes.iter().all(|&size| size <= SEGMENT_BYTES_SMALL), "case {:?}: {sizes:?}", case.name);
    }

    fn apply(wal: &mut Wal, model: &mut Model, dir: &Path, op: Op) {
        match op {
            Op::Append(first, last) => {
                for index in first..=last {
                    wal.append(index, &payload_fixed(index)).unwrap();
                    model.insert(index, payload_fixed(index));
                }
            }
            Op::Sync => wal.sync().unwrap(),
            Op::TruncateFrom(index) => {
                wal.truncate_from(index).unwrap();
                model.split_off(&index);
            }
            Op::PurgeUpto { upto, first_after } => {
                wal.purge_upto(upto).unwrap();
                *model = first_after.map_or_else(Model::new, |first| model.split_off(&first));
            }
            Op::Reopen => *wal = Wal::open_with(dir, SEGMENT_BYTES_SMALL).unwrap(),
        }
    }

    fn assert_reads_model(wal: &Wal, model: &Model, context: &str) {
        assert_eq!(wal.first_index(), model.keys().next().copied(), "{context}: first_index");
        assert_eq!(wal.last_index(), model.keys().next_back().copied(), "{context}: last_index");
        let (first, last) = (wal.first_index().unwrap_or(1), wal.last_index().unwrap_or(0));
        let mid = first + last.saturating_sub(first) / 2;
        let ranges =
            [(0, u64::MAX), (0, first), (first, first + 2), (mid, mid + 3), (mid, mid), (mid + 1, mid)];
        let ranges = ranges.into_iter().chain([(last, last + 5), (last + 1, last + 9)]);
        for (start, end) in ranges {
            let expected: Vec<(u64, Vec<u8>)> = if start < end {
                model.range(start..end).map(|(index, payload)| (*index, payload.clone())).collect()
            } else {
                Vec::new()
            };
            assert_eq!(wal.read(start, end).unwrap(), expected, "{context}: read({start}, {end})");
        }
    }

    fn segment_paths(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir).unwrap().into_iter().map(|(_, path)| path).collect()
    }

    #[test]
    fn append_truncate_purge_reopen() {
        use Op::*;
        let cases = [
            Case {
                name: "append, sync, read",
                ops: &[Append(1, 10), Sync],
                bounds: Some((1, 10)),
                segment_files: 4,
            },
            Case {
                name: "reopen reads the same",
                ops: &[Append(1, 10), Sync, Reopen],
                bounds: Some((1, 10)),
                segment_files: 4,
            },
            Case {
                name: "reopen without a sync keeps what reached the OS",
                ops: &[Append(1, 5), Reopen],
                bounds: Some((1, 5)),
                segment_files: 2,
            },
            Case {
                name: "an empty log starts anywhere, and a reopened one continues its last segment",
                ops: &[Append(100, 104), Reopen, Append(105, 106)],
                bounds: Some((100, 106)),
                segment_files: 3,
            },
            Case {
                name: "an empty log stays empty",
                ops: &[Reopen, Sync, Reopen],
                bounds: None,
                segment_files: 0,
            },
            Case {
                name: "truncate in the middle of a segment",
                ops: &[Append(1, 10), Sync, TruncateFrom(5), Reopen, Append(5, 8)],
                bounds: Some((1, 8)),
                segment_files: 3,
            },
            Case {
                name: "truncate at a segment's first index",
                ops: &[Append(1, 10), Sync, TruncateFrom(7), Reopen, Append(7, 7)],
                bounds: Some((1, 7)),
                segment_files: 3,
            },
            Case {
                name: "truncate across segments",
                ops: &[Append(1, 10), Sync, TruncateFrom(2), Reopen, Append(2, 4)],
                bounds: Some((1, 4)),
                segment_files: 2,
            },
            Case {
                name: "truncate unsynced records",
                ops: &[Append(1, 10), TruncateFrom(6), Reopen],
                bounds: Some((1, 5)),
                segment_files: 2,
            },
            Case {
                name: "truncate everything, then start anywhere",
                ops: &[Append(1, 10), TruncateFrom(1), Reopen, Append(50, 51)],
                bounds: Some((50, 51)),
                segment_files: 1,
            },
            Case {
                name: "truncate below the first index empties the log",
                ops: &[Append(5, 8), TruncateFrom(2)],
                bounds: None,
                segment_files: 0,
            },
            Case {
                name: "truncate past the end changes nothing",
                ops: &[Append(1, 5), TruncateFrom(6), TruncateFrom(100), Reopen],
                bounds: Some((1, 5)),
                segment_files: 2,
            },
            Case {
                name: "purge keeps a partly covered segment",
                ops: &[Append(1, 10), Sync, PurgeUpto { upto: 5, first_after: Some(4) }, Reopen],
                bounds: Some((4, 10)),
                segment_files: 3,
            },
            Case {
                name: "purge whole segments, then append",
                ops: &[Append(1, 10), PurgeUpto { upto: 6, first_after: Some(7) }, Reopen, Append(11, 12)],
                bounds: Some((7, 12)),
                segment_files: 2,
            },
            Case {
                name: "purge below the first index changes nothing",
                ops: &[Append(4, 9), PurgeUpto { upto: 3, first_after: Some(4) }],
                bounds: Some((4, 9)),
                segment_files: 2,
            },
            Case {
                name: "purge everything, then start anywhere",
                ops: &[Append(1, 10), PurgeUpto { upto: 10, first_after: None }, Reopen, Append(20, 21)],
                bounds: Some((20, 21)),
                segment_files: 1,
            },
            Case {
                name: "purge past the end",
                ops: &[Append(1, 4), PurgeUpto { upto: 100, first_after: None }, Reopen],
                bounds: None,
                segment_files: 0,
            },
            Case {
                name: "purge, then truncate into the first segment left",
                ops: &[
                    Append(1, 10),
                    PurgeUpto { upto: 6, first_after: Some(7) },
                    TruncateFrom(8),
                    Reopen,
                    Append(8, 9),
                ],
                bounds: Some((7, 9)),
                segment_files: 1,
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    /// A synced log of `payload_varied` records `1..=last`.
    fn write_log(segment_bytes_max: u64, last: u64) -> TempDir {
        let dir = TempDir::new().unwrap();
        let mut wal = Wal::open_with(dir.path(), segment_bytes_max).unwrap();
        for index in 1..=last {
            wal.append(index, &payload_varied(index)).unwrap();
        }
        wal.sync().unwrap();
        dir
    }

    fn copy_dir(from: &Path) -> TempDir {
        let to = TempDir::new().unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
        }
        to
    }

    /// The file name, offset and length of record `index`, as the log's own table has them.
    fn locate(dir: &Path, index: u64) -> (PathBuf, u64, u64) {
        let wal = Wal::open(dir).unwrap();
        let segment = wal.segments.iter().find(|segment| segment.last_index() >= index).unwrap();
        let loc = segment.records[(index - segment.first_index) as usize];
        let name = PathBuf::from(segment.path.file_name().unwrap());
        (name, loc.offset, RECORD_HEADER_BYTES as u64 + u64::from(loc.payload_len))
    }

    fn records_varied(indexes: RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        indexes.map(|index| (index, payload_varied(index))).collect()
    }

    fn edit_file(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
        let mut bytes = fs::read(path).unwrap();
        edit(&mut bytes);
        fs::write(path, bytes).unwrap();
    }

    /// Opening `dir` must give records `1..last`, and appending `last` again must then work.
    fn assert_recovers_prefix(dir: &Path, segment_bytes_max: u64, last: u64, context: &str) {
        let mut wal =
            Wal::open_with(dir, segment_bytes_max).unwrap_or_else(|error| panic!("{context}: {error}"));
        assert_eq!(wal.read(0, u64::MAX).unwrap(), records_varied(1..=last - 1), "{context}");
        // The torn bytes are gone from disk, not merely skipped.
        for segment in &wal.segments {
            assert_eq!(fs::metadata(&segment.path).unwrap().len(), segment.bytes_len, "{context}");
        }
        wal.append(last, &payload_varied(last)).unwrap();
        wal.sync().unwrap();
        let wal = Wal::open_with(dir, segment_bytes_max).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), records_varied(1..=last), "{context}: appended again");
    }

    /// Layouts for damage tests, as (segment_bytes_max, last index): the last record shares its
    /// segment with others, or sits alone in one, so that damage also lands in a segment header.
    const LAYOUTS: [(u64, u64); 2] = [(SEGMENT_BYTES_MAX, 5), (SEGMENT_BYTES_ONE_RECORD, 3)];

    /// A sync planned (and running without the lock) does not count until it is done: a roll
    /// meanwhile syncs the earlier segment itself, so that only the last segment can be torn; a
    /// truncation after the plan still needs its own sync.
    #[test]
    fn a_planned_sync_counts_only_once_done() {
        let dir = TempDir::new().unwrap();
        let record_bytes = RECORD_HEADER_BYTES as u64 + 100;
        let mut wal = Wal::open_with(dir.path(), SEGMENT_HEADER_BYTES as u64 + 2 * record_bytes).unwrap();
        wal.append(1, &[1; 100]).unwrap();
        let plan = wal.sync_plan().unwrap();
        let dirty = |wal: &Wal| wal.segments.iter().map(|s| s.written > s.synced).collect::<Vec<_>>();
        assert_eq!(dirty(&wal), [true], "planned is not synced");
        wal.append(2, &[2; 100]).unwrap();
        wal.append(3, &[3; 100]).unwrap(); // rolls: the first segment is synced by the roll
        assert_eq!(dirty(&wal), [false, true]);
        assert!(wal.dir_written > wal.dir_synced, "the new segment's directory entry");
        plan.run().unwrap();
        wal.sync_done(&plan);
        assert_eq!(dirty(&wal), [false, true], "an old plan does not cover later writes");
        let plan = wal.sync_plan().unwrap();
        wal.truncate_from(3).unwrap();
        wal.append(3, &[4; 100]).unwrap(); // a new segment with the same first index
        plan.run().unwrap();
        wal.sync_done(&plan);
        assert_eq!(dirty(&wal), [false, true], "a plan for a deleted segment covers not its successor");
        wal.sync().unwrap();
        assert_eq!(dirty(&wal), [false, false]);
        assert_eq!(wal.dir_written, wal.dir_synced);
    }

    #[test]
    fn a_read_plan_stops_at_its_byte_budget_but_takes_one_record() {
        // 10 records of 100 bytes, 3 to a segment: (start, end, bytes_max) -> indexes read.
        let dir = TempDir::new().unwrap();
        let mut wal = Wal::open_with(dir.path(), 3 * (RECORD_HEADER_BYTES as u64 + 100) + 20).unwrap();
        for index in 1..=10 {
            wal.append(index, &[index as u8; 100]).unwrap();
        }
        let plan = wal.sync_plan().unwrap();
        plan.run().unwrap();
        wal.sync_done(&plan);
        assert_eq!(segment_paths(dir.path()).len(), 4);
        let check = |start: u64, end: u64, bytes_max: u64, expected: Vec<u64>| {
            let read = wal.read_plan(start, end, bytes_max).unwrap().read().unwrap();
            let indexes: Vec<u64> = read.iter().map(|(index, _)| *index).collect();
            assert_eq!(indexes, expected, "read_plan({start}, {end}, {bytes_max})");
            assert!(read.iter().all(|(index, payload)| payload == &vec![*index as u8; 100]));
        };
        check(1, 11, u64::MAX, (1..=10).collect());
        check(1, 11, 250, vec![1, 2]);
        check(1, 11, 300, vec![1, 2, 3]);
        check(2, 11, 450, vec![2, 3, 4, 5]);
        check(1, 11, 350, vec![1, 2, 3]);
        check(3, 11, 150, vec![3]);
        check(5, 11, 1, vec![5]);
        check(5, 11, 0, vec![5]);
        check(9, 20, 1000, vec![9, 10]);
        check(11, 20, 1000, vec![]);
    }

    #[test]
    fn torn_tail_is_cut_at_every_offset() {
        for (segment_bytes_max, last) in LAYOUTS {
            let golden = write_log(segment_bytes_max, last);
            let (name, offset, record_bytes) = locate(golden.path(), last);
            let cut_first = if offset == SEGMENT_HEADER_BYTES as u64 { 0 } else { offset };
            for cut in cut_first..offset + record_bytes {
                let dir = copy_dir(golden.path());
                let file = File::options().write(true).open(dir.path().join(&name)).unwrap();
                file.set_len(cut).unwrap();
                let context = format!("segment_bytes_max {segment_bytes_max}, {name:?} cut to {cut} bytes");
                assert_recovers_prefix(dir.path(), segment_bytes_max, last, &context);
            }
        }
    }

    /// What the chaos harness's power cut produced: a new last segment whose header never reached
    /// the disk while part of a later write did. Nothing in it was synced, so it goes; a zeroed
    /// header in front of a whole record is damage and is refused.
    #[test]
    fn a_last_segment_whose_header_never_reached_the_disk_is_dropped() {
        let (segment_bytes_max, last) = (SEGMENT_BYTES_ONE_RECORD, 3);
        let golden = write_log(segment_bytes_max, last);
        let (name, offset, _) = locate(golden.path(), last);
        assert_eq!(offset, SEGMENT_HEADER_BYTES as u64, "the last record sits alone in its segment");

        let dir = copy_dir(golden.path());
        edit_file(&dir.path().join(&name), |bytes| bytes[..SEGMENT_HEADER_BYTES + 8].fill(0));
        assert_recovers_prefix(dir.path(), segment_bytes_max, last, "header and record start zeroed");

        let dir = copy_dir(golden.path());
        edit_file(&dir.path().join(&name), |bytes| bytes[..SEGMENT_HEADER_BYTES].fill(0));
        let error = Wal::open_with(dir.path(), segment_bytes_max)
            .err()
            .expect("a zeroed header before a whole record");
        assert!(error.to_string().contains("bad magic"), "{error}");
    }

    #[test]
    fn flipped_bit_in_last_record_is_a_torn_tail() {
        for (segment_bytes_max, last) in LAYOUTS {
            let golden = write_log(segment_bytes_max, last);
            let (name, offset, record_bytes) = locate(golden.path(), last);
            for position in offset..offset + record_bytes {
                let dir = copy_dir(golden.path());
                edit_file(&dir.path().join(&name), |bytes| bytes[position as usize] ^= 1);
                let context =
                    format!("segment_bytes_max {segment_bytes_max}, {name:?} bit flipped at {position}");
                assert_recovers_prefix(dir.path(), segment_bytes_max, last, &context);
            }
        }
    }

    #[test]
    fn zero_filled_tail_is_a_torn_tail() {
        // A power loss can leave a file longer than the data that reached the disk, the rest zeros.
        let dir = write_log(SEGMENT_BYTES_MAX, 5);
        let (name, offset, _) = locate(dir.path(), 5);
        edit_file(&dir.path().join(&name), |bytes| {
            bytes.truncate(offset as usize);
            bytes.resize(offset as usize + 4096, 0);
        });
        assert_recovers_prefix(dir.path(), SEGMENT_BYTES_MAX, 5, "zero-filled tail");
    }

    #[test]
    fn flipped_bit_before_valid_records_is_corrupt() {
        // (segment_bytes_max, damaged index, keep the record indexes): in the last segment with
        // records after it, or in a segment not the last that open scans for want of an index.
        let cases = [
            (SEGMENT_BYTES_MAX, 1, true),
            (SEGMENT_BYTES_MAX, 4, true),
            (SEGMENT_BYTES_ONE_RECORD, 3, false),
        ];
        let last = 5;
        for (segment_bytes_max, damaged, keep_indexes) in cases {
            let golden = write_log(segment_bytes_max, last);
            let (name, offset, record_bytes) = locate(golden.path(), damaged);
            if !keep_indexes {
                remove_indexes(golden.path());
            }
            for position in offset..offset + record_bytes {
                let dir = copy_dir(golden.path());
                edit_file(&dir.path().join(&name), |bytes| bytes[position as usize] ^= 1);
                let context =
                    format!("segment_bytes_max {segment_bytes_max}, {name:?} bit flipped at {position}");
                let error = Wal::open_with(dir.path(), segment_bytes_max).err();
                assert_corrupt(error, &dir.path().join(&name), offset, "", &context);
            }
        }
    }

    fn remove_indexes(dir: &Path) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|extension| extension == INDEX_EXTENSION) {
                fs::remove_file(path).unwrap();
            }
        }
    }

    /// An older segment with its record index is opened from the index, without reading its
    /// records: a flipped bit inside one of them is found when that record is read, as any damage
    /// after open is, and never served. One whose index disagrees with it (another length, another
    /// last record, a damaged index) is scanned as before, and its damage refused at open.
    #[test]
    fn an_indexed_segment_is_checked_as_its_records_are_read() {
        let last = 5;
        let golden = write_log(SEGMENT_BYTES_ONE_RECORD, last);
        let (name, offset, record_bytes) = locate(golden.path(), 3);
        assert!(golden.path().join(&name).with_extension(INDEX_EXTENSION).exists());
        let dir = copy_dir(golden.path());
        edit_file(&dir.path().join(&name), |bytes| bytes[(offset + record_bytes - 1) as usize] ^= 1);
        let wal = Wal::open_with(dir.path(), SEGMENT_BYTES_ONE_RECORD).unwrap();
        assert_eq!(wal.read(4, 6).unwrap(), records_varied(4..=5));
        match wal.read(1, 6) {
            Err(WalError::Corrupt { path, offset: at, .. }) => {
                assert_eq!((path, at), (dir.path().join(&name), offset))
            }
            other => panic!("a damaged record was read as {other:?}"),
        }

        type Edit = fn(&mut Vec<u8>);
        let disagreeing: [(&str, Edit); 3] = [
            ("index damaged", |index| index[20] ^= 1),
            ("index of another length", |index| index.truncate(index.len() - 1)),
            ("no index", |index| index.clear()),
        ];
        for (what, edit) in disagreeing {
            let dir = copy_dir(dir.path());
            edit_file(&dir.path().join(&name).with_extension(INDEX_EXTENSION), edit);
            let error = Wal::open_with(dir.path(), SEGMENT_BYTES_ONE_RECORD).err();
            assert_corrupt(error, &dir.path().join(&name), offset, "crc", what);
        }
        // The last record rewritten whole, with another payload of the same length: its header no
        // longer matches the index, so the segment is scanned (and is whole).
        let dir = copy_dir(golden.path());
        let mut other = payload_varied(3);
        other[0] ^= 0xff;
        edit_file(&dir.path().join(&name), |bytes| {
            bytes.truncate(offset as usize);
            bytes.extend(encode_record(3, &other));
        });
        let wal = Wal::open_with(dir.path(), SEGMENT_BYTES_ONE_RECORD).unwrap();
        assert_eq!(wal.read(3, 4).unwrap(), vec![(3, other)]);
    }

    /// Opening a log whose older segments have no index (an older build's) writes them, and a
    /// truncation into a sealed segment removes its index: the index never names records the
    /// segment no longer holds.
    #[test]
    fn indexes_are_written_for_older_segments_and_removed_with_what_they_name() {
        let dir = write_log(SEGMENT_BYTES_ONE_RECORD, 5);
        let indexed = |dir: &Path| {
            let mut firsts: Vec<u64> = fs::read_dir(dir)
                .unwrap()
                .filter_map(|entry| {
                    let path = entry.unwrap().path();
                    let name = path.file_name()?.to_str()?.strip_suffix(".idx")?.to_string();
                    name.parse().ok()
                })
                .collect();
            firsts.sort();
            firsts
        };
        assert_eq!(indexed(dir.path()), [1, 2, 3, 4]);
        remove_indexes(dir.path());
        drop(Wal::open_with(dir.path(), SEGMENT_BYTES_ONE_RECORD).unwrap());
        assert_eq!(indexed(dir.path()), [1, 2, 3, 4]);
        let mut wal = Wal::open_with(dir.path(), 1 << 20).unwrap();
        wal.truncate_from(4).unwrap();
        assert_eq!(indexed(dir.path()), [1, 2]);
        wal.append(4, b"four again").unwrap();
        wal.sync().unwrap();
        wal.purge_upto(2).unwrap();
        assert_eq!(indexed(dir.path()), Vec::<u64>::new());
        drop(wal);
        let wal = Wal::open_with(dir.path(), 1 << 20).unwrap();
        assert_eq!(wal.read(3, 5).unwrap(), vec![(3, payload_varied(3)), (4, b"four again".to_vec())]);
    }

    /// Unsynced writes reach the disk in any order in a power loss: record 3 torn, 4 and 5 whole.
    /// Below what is known synced that is damage at rest and refused; from there on it is cut off
    /// as a torn tail, and reported with the last index seen after it.
    #[test]
    fn a_damaged_record_before_valid_ones_is_cut_off_only_beyond_what_was_synced() {
        let (last, damaged) = (5, 3);
        let golden = write_log(SEGMENT_BYTES_MAX, last);
        let (name, offset, record_bytes) = locate(golden.path(), damaged);
        let tear = |dir: &Path| {
            edit_file(&dir.join(&name), |bytes| {
                bytes[(offset + record_bytes / 2) as usize..(offset + record_bytes) as usize].fill(0)
            })
        };
        let dir = copy_dir(golden.path());
        tear(dir.path());
        let error = Wal::open_recovering(dir.path(), SEGMENT_BYTES_MAX, Some(damaged + 1)).err();
        assert_corrupt(error, &dir.path().join(&name), offset, "valid record of index 4", "synced");
        let error = Wal::open_with(dir.path(), SEGMENT_BYTES_MAX).err();
        assert_corrupt(error, &dir.path().join(&name), offset, "valid record of index 4", "strict");

        let mut wal = Wal::open_recovering(dir.path(), SEGMENT_BYTES_MAX, Some(damaged)).unwrap();
        assert_eq!(wal.lost_tail(), Some(LostTail { first: damaged, last_seen: last }));
        assert_eq!(wal.read(0, u64::MAX).unwrap(), records_varied(1..=damaged - 1));
        wal.append(damaged, &payload_varied(damaged)).unwrap();
        wal.sync().unwrap();
        let wal = Wal::open_with(dir.path(), SEGMENT_BYTES_MAX).unwrap();
        assert_eq!(wal.lost_tail(), None);
        assert_eq!(wal.read(0, u64::MAX).unwrap(), records_varied(1..=damaged));
    }

    fn assert_corrupt(error: Option<WalError>, path: &Path, offset: u64, reason_part: &str, context: &str) {
        match error {
            Some(WalError::Corrupt { path: error_path, offset: error_offset, reason }) => {
                assert_eq!((error_path.as_path(), error_offset), (path, offset), "{context}: {reason}");
                assert!(reason.contains(reason_part), "{context}: {reason:?} lacks {reason_part:?}");
            }
            other => panic!("{context}: expected Corrupt, got {other:?}"),
        }
    }

    fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
        dir.join(segment_file_name(first_index))
    }

    /// Each damages a log whose segments hold records [1, 2], [3] and [4], and returns where
    /// `open` must report corruption and a word of the reason.
    type Damager = fn(&Path) -> (PathBuf, u64, &'static str);

    #[test]
    fn damaged_layout_is_corrupt() {
        let cases: [(&str, Damager); 10] = [
            ("bad magic, first segment", |dir| {
                edit_file(&segment_path(dir, 1), |bytes| bytes[0] ^= 1);
                (segment_path(dir, 1), 0, "magic")
            }),
            ("bad magic, last segment", |dir| {
                edit_file(&segment_path(dir, 4), |bytes| bytes[3] ^= 1);
                (segment_path(dir, 4), 0, "magic")
            }),
            ("header cut short in a segment not the last", |dir| {
                File::options().write(true).open(segment_path(dir, 3)).unwrap().set_len(5).unwrap();
                (segment_path(dir, 3), 0, "cut short")
            }),
            ("garbage short of a header in the last segment", |dir| {
                edit_file(&segment_path(dir, 4), |bytes| *bytes = b"TALLYxx".to_vec());
                (segment_path(dir, 4), 0, "not a prefix")
            }),
            ("a segment not the last without records", |dir| {
                File::options().write(true).open(segment_path(dir, 3)).unwrap().set_len(12).unwrap();
                (segment_path(dir, 3), SEGMENT_HEADER_BYTES as u64, "no records")
            }),
            ("a gap between segments", |dir| {
                fs::remove_file(segment_path(dir, 3)).unwrap();
                (segment_path(dir, 4), 0, "gap")
            }),
            ("an overlap between segments", |dir| {
                fs::rename(segment_path(dir, 3), segment_path(dir, 2)).unwrap();
                (segment_path(dir, 2), 0, "overlap")
            }),
            ("a segment holding other records than its name says", |dir| {
                fs::copy(segment_path(dir, 3), segment_path(dir, 4)).unwrap();
                (segment_path(dir, 4), SEGMENT_HEADER_BYTES as u64, "index 3, expected 4")
            }),
            ("a whole record with the wrong index at the end", |dir| {
                let path = segment_path(dir, 4);
                let offset = fs::metadata(&path).unwrap().len();
                edit_file(&path, |bytes| bytes.extend(encode_record(9, b"stale")));
                (path, offset, "index 9, expected 5")
            }),
            ("a .wal file that is not a segment", |dir| {
                fs::write(dir.join("notes.wal"), b"").unwrap();
                (dir.join("notes.wal"), 0, "20-digit")
            }),
        ];
        // Records of 7, 14, 21 and 28 bytes: [1, 2] takes 65 bytes and 3 would not fit in 70.
        let segment_bytes_max = 70;
        let golden = write_log(segment_bytes_max, 4);
        let names: Vec<PathBuf> = segment_paths(golden.path())
            .iter()
            .map(|p| p.strip_prefix(golden.path()).unwrap().into())
            .collect();
        assert_eq!(names, [1, 3, 4].map(|index| PathBuf::from(segment_file_name(index))));
        for (name, damage) in cases {
            let dir = copy_dir(golden.path());
            let (path, offset, reason_part) = damage(dir.path());
            assert_corrupt(Wal::open(dir.path()).err(), &path, offset, reason_part, name);
        }
    }

    #[test]
    fn a_segment_of_another_format_version_is_refused_as_such() {
        for version in [1u32, FORMAT_VERSION + 1] {
            let dir = write_log(70, 4);
            let path = segment_path(dir.path(), 3);
            edit_file(&path, |bytes| bytes[8..12].copy_from_slice(&version.to_le_bytes()));
            match Wal::open(dir.path()).err() {
                Some(WalError::OtherVersion { path: error_path, version: found }) => {
                    assert_eq!((error_path, found), (path, version));
                }
                other => panic!("version {version}: expected OtherVersion, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_segment_file_is_corrupt_without_reading_it() {
        let dir = write_log(SEGMENT_BYTES_MAX, 2);
        let path = segment_path(dir.path(), 1);
        // Sparse, so the test does not write gigabytes.
        File::options().write(true).open(&path).unwrap().set_len(SEGMENT_FILE_BYTES_MAX + 1).unwrap();
        assert_corrupt(Wal::open(dir.path()).err(), &path, SEGMENT_FILE_BYTES_MAX, "more than", "oversized");
    }

    /// Each damages record 3 of `payload_varied` records 1 to 4 on disk; with the reason expected.
    type RecordDamager = fn(&mut Vec<u8>, usize, usize) -> &'static str;

    #[test]
    fn read_verifies_records_again() {
        let cases: [RecordDamager; 2] = [
            |bytes, offset, record_bytes| {
                bytes[offset + record_bytes - 1] ^= 1;
                "crc"
            },
            |bytes, offset, record_bytes| {
                // Whole and with a valid CRC, but not the record the table says is there.
                bytes[offset..offset + record_bytes].copy_from_slice(&encode_record(9, &payload_varied(3)));
                "index 9, expected 3"
            },
        ];
        for damage in cases {
            let dir = write_log(SEGMENT_BYTES_MAX, 4);
            let wal = Wal::open(dir.path()).unwrap();
            let (name, offset, record_bytes) = locate(dir.path(), 3);
            let mut reason_part = "";
            edit_file(&dir.path().join(&name), |bytes| {
                reason_part = damage(bytes, offset as usize, record_bytes as usize);
            });
            assert_eq!(wal.read(1, 3).unwrap(), records_varied(1..=2));
            assert_eq!(wal.read(4, 5).unwrap(), records_varied(4..=4));
            assert_corrupt(wal.read(1, 5).err(), &dir.path().join(&name), offset, reason_part, reason_part);
        }
    }

    #[test]
    fn check_header_cases() {
        let valid = segment_header().to_vec();
        let with_record = [valid.clone(), encode_record(1, b"x")].concat();
        let bad_magic = [b"TALLYWAX".as_slice(), &FORMAT_VERSION.to_le_bytes()].concat();
        let bad_version = [SEGMENT_MAGIC.as_slice(), &0u32.to_le_bytes()].concat();
        let cases: [(&[u8], Option<&str>); 7] = [
            (&valid, None),
            (&with_record, None),
            (b"", Some("cut short")),
            (&valid[..5], Some("cut short")),
            (b"TALLYwal", Some("not a prefix")),
            (&bad_magic, Some("magic")),
            (&bad_version, Some("version 0")),
        ];
        for (bytes, expected) in cases {
            let got = check_header(bytes);
            match (expected, &got) {
                (None, HeaderCheck::Valid) => {}
                (Some("cut short"), HeaderCheck::CutShort) => {}
                (Some(part), HeaderCheck::Bad(reason)) if reason.contains(part) => {}
                (Some("version 0"), HeaderCheck::OtherVersion(0)) => {}
                _ => panic!("{bytes:?}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn payload_size_limit() {
        // (payload bytes, accepted)
        let cases = [(0, true), (RECORD_BYTES_MAX as usize, true), (RECORD_BYTES_MAX as usize + 1, false)];
        for (payload_bytes, accepted) in cases {
            let dir = TempDir::new().unwrap();
            let mut wal = Wal::open(dir.path()).unwrap();
            let payload = vec![7; payload_bytes];
            match wal.append(1, &payload) {
                Ok(()) => assert!(accepted, "{payload_bytes} bytes accepted"),
                Err(WalError::Io(error)) if error.kind() == io::ErrorKind::InvalidInput => {
                    assert!(!accepted, "{payload_bytes} bytes refused");
                    // Nothing was written, and the log is still usable.
                    assert_eq!(segment_paths(dir.path()).len(), 0);
                    wal.append(1, b"small").unwrap();
                }
                Err(error) => panic!("{payload_bytes} bytes: {error}"),
            }
            wal.sync().unwrap();
            drop(wal);
            let expected = if accepted { payload } else { b"small".to_vec() };
            assert_eq!(Wal::open(dir.path()).unwrap().read(1, 2).unwrap(), [(1, expected)]);
        }
    }

    #[test]
    #[should_panic(expected = "append must follow the last index")]
    fn append_with_a_gap_panics() {
        let dir = TempDir::new().unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(1, b"one").unwrap();
        wal.append(3, b"three").unwrap();
    }

    #[test]
    #[should_panic(expected = "indexes start at 1")]
    fn append_of_index_zero_panics() {
        let dir = TempDir::new().unwrap();
        Wal::open(dir.path()).unwrap().append(0, b"zero").unwrap();
    }

    #[test]
    fn open_creates_the_directory() {
        let parent = TempDir::new().unwrap();
        let dir = parent.path().join("data").join("wal");
        let mut wal = Wal::open(&dir).unwrap();
        wal.append(1, b"one").unwrap();
        wal.sync().unwrap();
        assert_eq!(Wal::open(&dir).unwrap().read(0, u64::MAX).unwrap(), [(1, b"one".to_vec())]);
    }

    #[test]
    fn write_file_atomic_round_trip() {
        let dir = TempDir::new().unwrap();
        assert_eq!(read_file(dir.path(), "vote").unwrap(), None);
        let contents: [&[u8]; 3] = [b"term 1", b"", &[0xAB; 10_000]];
        for bytes in contents {
            write_file_atomic(dir.path(), "vote", bytes).unwrap();
            assert_eq!(read_file(dir.path(), "vote").unwrap().as_deref(), Some(bytes));
            assert_eq!(read_file(dir.path(), "vote.tmp").unwrap(), None, "the temporary file is renamed");
        }
        // A log in the same directory leaves these files alone, even a leftover temporary file.
        fs::write(dir.path().join("vote.tmp"), b"half written").unwrap();
        let mut wal = Wal::open(dir.path()).unwrap();
        wal.append(1, b"one").unwrap();
        wal.sync().unwrap();
        assert_eq!(Wal::open(dir.path()).unwrap().last_index(), Some(1));
        assert_eq!(read_file(dir.path(), "vote").unwrap(), Some(vec![0xAB; 10_000]));
    }
}
