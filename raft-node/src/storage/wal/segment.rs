//! One segment file as the open log knows it (where its records sit), and the plans that let
//! reads and syncs run outside the log's lock: a `ReadPlan` names the preads of a range of
//! entries, a `SyncPlan` the files one fdatasync must cover.

use super::*;

/// Where one record sits in its segment file, so a read is one pread and payloads stay on disk.
#[derive(Clone, Copy, Debug)]
pub(super) struct RecordLoc {
    pub(super) offset: u64,
    pub(super) payload_len: u32,
}

pub(super) struct Segment {
    pub(super) first_index: u64,
    pub(super) path: PathBuf,
    /// Kept open for the segment's life: reads are preads on it, appends go to the last one.
    /// Shared so that a sync or a read can run on it without the log's lock (`SyncPlan`,
    /// `ReadPlan`).
    pub(super) file: Arc<File>,
    /// `records[i]` holds index `first_index + i`. Never empty: a segment is created together with
    /// its first record, and recovery deletes a last segment left without any.
    pub(super) records: Vec<RecordLoc>,
    /// The file's length: the end of the last record.
    pub(super) bytes_len: u64,
    /// The log's change counter (`Wal::version`) at this file's last change, and at the last
    /// change an fdatasync is known to cover. Written since its last sync if `written > synced`.
    /// Counters rather than a flag, because a sync runs without the log's lock (`SyncPlan`) and
    /// may only mark as durable what was written before it began.
    pub(super) written: u64,
    pub(super) synced: u64,
}

impl Segment {
    /// Creates the segment file holding the header and its first record. Not synced.
    pub(super) fn create(
        dir: &Path,
        first_index: u64,
        record: &[u8],
        payload_len: u32,
    ) -> io::Result<Segment> {
        let path = dir.join(segment_file_name(first_index));
        // `create_new`: a segment file is never overwritten; an existing one would be a bookkeeping
        // bug in truncate or purge, and overwriting it would hide that.
        crate::sys::disk_fault(&path)?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        let mut bytes = Vec::with_capacity(SEGMENT_HEADER_BYTES + record.len());
        bytes.extend_from_slice(&segment_header());
        bytes.extend_from_slice(record);
        file.write_all_at(&bytes, 0)?;
        let records = vec![RecordLoc { offset: SEGMENT_HEADER_BYTES as u64, payload_len }];
        let file = Arc::new(file);
        let bytes_len = bytes.len() as u64;
        Ok(Segment { first_index, path, file, records, bytes_len, written: 0, synced: 0 })
    }

    /// Writes this segment's record index beside it (see `segment_index`), once it is sealed
    /// and synced, and syncs it. Best effort: the index is a cache that open checks against the
    /// segment, and without it open scans the segment as it would anyway. Synced (one small
    /// fdatasync per segment sealed) because a power cut takes every index not on disk: with the
    /// chaos harness's small segments, a restart after one scanned thousands of them, 15 s
    /// (issue 24). Its name is made durable by the directory sync the new segment needs.
    pub(super) fn write_index(&self) {
        let written = (|| -> io::Result<()> {
            let last = self.records.last().expect("a segment holds records");
            let mut last_header = [0u8; RECORD_HEADER_BYTES];
            self.file.read_exact_at(&mut last_header, last.offset)?;
            let index = SegmentIndex {
                first_index: self.first_index,
                file_len: self.bytes_len,
                last_crc: u32_at(&last_header, RECORD_CRC_OFFSET),
                payload_lens: self.records.iter().map(|loc| loc.payload_len).collect(),
            };
            let path = self.path.with_extension(INDEX_EXTENSION);
            crate::sys::disk_fault(&path)?;
            let mut file = File::create(&path)?;
            file.write_all(&index.encode())?;
            crate::sys::sync_data(&file, &path)
        })();
        if let Err(error) = written {
            tracing::warn!(
                "wal: cannot write the record index of {}: {error}; the next start scans it",
                self.path.display()
            );
        }
    }

    pub(super) fn last_index(&self) -> u64 {
        assert!(!self.records.is_empty(), "wal: segment {} holds no records", self.path.display());
        self.first_index + self.records.len() as u64 - 1
    }

    pub(super) fn append(&mut self, record: &[u8], payload_len: u32) -> io::Result<()> {
        assert!(self.bytes_len + record.len() as u64 <= SEGMENT_FILE_BYTES_MAX);
        crate::sys::disk_fault(&self.path)?;
        self.file.write_all_at(record, self.bytes_len)?;
        self.records.push(RecordLoc { offset: self.bytes_len, payload_len });
        self.bytes_len += record.len() as u64;
        Ok(())
    }

    /// Cuts the file back to the records before `index`, which this segment must hold and which
    /// must not be its first. Not synced.
    pub(super) fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        assert!(index > self.first_index && index <= self.last_index());
        let keep = (index - self.first_index) as usize;
        let offset = self.records[keep].offset;
        self.file.set_len(offset)?;
        self.records.truncate(keep);
        self.bytes_len = offset;
        Ok(())
    }

    /// The records `[start, end)` of this segment, as many as fit in `bytes_max` payload bytes
    /// (and the first one anyway if `take_one`), as a part of a `ReadPlan`. Returns the part and
    /// the payload bytes it holds.
    pub(super) fn read_part(&self, start: u64, end: u64, bytes_max: u64, take_one: bool) -> (ReadPart, u64) {
        assert!(self.first_index <= start && start < end && end <= self.last_index() + 1);
        let all = &self.records[(start - self.first_index) as usize..(end - self.first_index) as usize];
        let mut bytes = 0u64;
        let mut count = 0;
        for loc in all {
            let next = bytes + u64::from(loc.payload_len);
            if next > bytes_max && !(take_one && count == 0) {
                break;
            }
            bytes = next;
            count += 1;
        }
        let part =
            ReadPart { file: self.file.clone(), path: self.path.clone(), start, locs: all[..count].to_vec() };
        (part, bytes)
    }
}

/// Records to read from one segment, taken under the log's lock and read without it.
pub(super) struct ReadPart {
    pub(super) file: Arc<File>,
    pub(super) path: PathBuf,
    pub(super) start: u64,
    pub(super) locs: Vec<RecordLoc>,
}

impl ReadPart {
    /// Reads the records with one pread, verifying every record again: disks rot, and a bad
    /// entry must never reach the state machine or another node.
    pub(super) fn read(&self, entries: &mut Vec<(u64, Vec<u8>)>) -> Result<(), WalError> {
        let span_start = self.locs[0].offset;
        let last = self.locs[self.locs.len() - 1];
        let span_end = last.offset + RECORD_HEADER_BYTES as u64 + u64::from(last.payload_len);
        let mut bytes = vec![0; (span_end - span_start) as usize];
        self.file.read_exact_at(&mut bytes, span_start)?;
        for (index, loc) in (self.start..).zip(&self.locs) {
            let decoded = decode_record(&bytes, (loc.offset - span_start) as usize)
                .map_err(|reason| corrupt(&self.path, loc.offset, reason))?;
            if decoded.index != index {
                let reason = format!("record holds index {}, expected {index}", decoded.index);
                return Err(corrupt(&self.path, loc.offset, reason));
            }
            entries.push((index, bytes[decoded.payload].to_vec()));
        }
        Ok(())
    }
}

/// A read of a range of records, planned under the log's lock (`Wal::read_plan`) and carried
/// out without it, so that a large read (a follower catching up) does not hold up appends and
/// syncs. The plan holds the segment files open, so a record truncated or purged after the
/// plan may still be read as it was; a record overwritten in place (truncated, then appended
/// again) fails its checks or shows the new entry. The log store's callers tolerate both: a
/// leader never truncates its own log, and openraft checks the log ids it gets back. On an
/// error the log store reads again under the lock.
pub struct ReadPlan {
    pub(super) parts: Vec<ReadPart>,
}

impl ReadPlan {
    pub fn read(&self) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let mut entries = Vec::new();
        for part in &self.parts {
            part.read(&mut entries)?;
        }
        Ok(entries)
    }
}

/// What one sync must make durable, taken under the log's lock (`Wal::sync_plan`) and run without
/// it, so that appends go on while the disk syncs. An fdatasync through a shared handle covers
/// every write to that file made before it started, whoever made it.
pub struct SyncPlan {
    /// Each file to fdatasync, with its segment's first index and `written` when planned.
    pub(super) files: Vec<(Arc<File>, u64, u64)>,
    /// The directory to fsync, with `dir_written` when planned.
    pub(super) dir: Option<(PathBuf, u64)>,
    /// The log's directory.
    pub(super) log_dir: PathBuf,
}

impl SyncPlan {
    /// Syncs. The caller then reports the result to the log: `Wal::sync_done` on success,
    /// `Wal::sync_failed` on an error (see "Durability").
    pub fn run(&self) -> io::Result<()> {
        crate::sys::disk_fault(&self.log_dir)?;
        for (file, first_index, _) in &self.files {
            // A deliberately broken build, to show that the chaos harness's power cut catches a
            // log that acknowledges before its appends are on disk (docs/results/chaos.md, "Power cuts").
            if cfg!(feature = "acknowledge-before-fsync") {
                continue;
            }
            crate::sys::sync_data(file, &self.log_dir.join(segment_file_name(*first_index)))?;
        }
        if let Some((dir, _)) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }
}
