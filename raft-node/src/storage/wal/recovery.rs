//! Opening the log: listing segments, checking that they follow one another, reading each
//! (or, for an older segment with a valid record index, its index), and telling a torn tail
//! from damage (see "Recovery" in the module above).

use super::*;

/// Deletes the record index of the segment at `segment_path`, if it has one. Not durable by itself.
pub(super) fn remove_index(segment_path: &Path) -> io::Result<()> {
    match fs::remove_file(segment_path.with_extension(INDEX_EXTENSION)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// The older segment at `path` opened from its record index, or `None` if it has no index that
/// agrees with it (the caller scans it then): the index must be whole, name this segment, match
/// the file's length and the last record's header, and the header must be valid.
pub(super) fn open_indexed(first_index: u64, path: &Path) -> io::Result<Option<Segment>> {
    let index = match fs::read(path.with_extension(INDEX_EXTENSION)) {
        Ok(bytes) => SegmentIndex::decode(&bytes),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let Some(index) = index.filter(|index| index.first_index == first_index) else { return Ok(None) };
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    if file.metadata()?.len() != index.file_len {
        return Ok(None);
    }
    let mut records = Vec::with_capacity(index.payload_lens.len());
    let mut offset = SEGMENT_HEADER_BYTES as u64;
    for payload_len in &index.payload_lens {
        if *payload_len > RECORD_BYTES_MAX {
            return Ok(None);
        }
        records.push(RecordLoc { offset, payload_len: *payload_len });
        offset += (RECORD_HEADER_BYTES as u64) + u64::from(*payload_len);
    }
    let last = *records.last().expect("an index holds at least one record");
    if offset != index.file_len {
        return Ok(None);
    }
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    file.read_exact_at(&mut header, 0)?;
    let mut last_header = [0u8; RECORD_HEADER_BYTES];
    file.read_exact_at(&mut last_header, last.offset)?;
    let last_index = first_index + records.len() as u64 - 1;
    let agrees = matches!(check_header(&header), HeaderCheck::Valid)
        && u32_at(&last_header, 0) == last.payload_len
        && u32_at(&last_header, RECORD_CRC_OFFSET) == index.last_crc
        && u64_at(&last_header, RECORD_INDEX_OFFSET) == last_index;
    if !agrees {
        return Ok(None);
    }
    let file = Arc::new(file);
    let path = path.to_path_buf();
    Ok(Some(Segment { first_index, path, file, records, bytes_len: index.file_len, written: 0, synced: 0 }))
}

/// The segment files in `dir` by first index. Any other `.wal` file is corruption, not a stray:
/// the log owns that suffix in its directory.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else { continue };
        if !name.ends_with(SEGMENT_SUFFIX) {
            continue;
        }
        let Some(first_index) = parse_segment_name(name) else {
            return Err(corrupt(&path, 0, "a .wal file whose name is not a 20-digit index"));
        };
        segments.push((first_index, path));
    }
    segments.sort_unstable_by_key(|(first_index, _)| *first_index);
    Ok(segments)
}

pub(super) fn check_follows(previous_last_index: u64, first_index: u64, path: &Path) -> Result<(), WalError> {
    if previous_last_index.checked_add(1) == Some(first_index) {
        return Ok(());
    }
    let kind = if first_index <= previous_last_index { "overlap" } else { "gap" };
    let reason = format!(
        "{kind}: segment starts at index {first_index}, previous segment ends at {previous_last_index}"
    );
    Err(corrupt(path, 0, reason))
}

/// Reads, checks and, if it is the last segment with a torn tail, repairs one segment file.
/// `None` if it was the last segment and held no complete record, in which case it is deleted;
/// and the ambiguous tail cut off, if one was.
pub(super) fn recover_segment(
    dir: &Path,
    first_index: u64,
    path: PathBuf,
    is_last: bool,
    synced_below: Option<u64>,
) -> Result<(Option<Segment>, Option<LostTail>), WalError> {
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let bytes = read_segment_file(&file, &path)?;
    match check_header(&bytes) {
        HeaderCheck::Valid => {}
        // A crash between creating the segment and syncing it.
        HeaderCheck::CutShort if is_last => {
            remove_file_durably(dir, &path)?;
            return Ok((None, None));
        }
        HeaderCheck::CutShort => return Err(corrupt(&path, 0, "header cut short in a segment not the last")),
        // A power cut after the segment was created and before its first sync, with a later
        // write reaching the disk and the header not: nothing in it was ever acknowledged.
        HeaderCheck::Bad(_) if is_last && never_synced(&bytes, first_index) => {
            remove_file_durably(dir, &path)?;
            return Ok((None, None));
        }
        HeaderCheck::Bad(reason) => return Err(corrupt(&path, 0, reason)),
        HeaderCheck::OtherVersion(version) => return Err(WalError::OtherVersion { path, version }),
    }
    let scan = scan_records(&bytes, first_index);
    let mut lost_tail = None;
    let bytes_len = match &scan.damage {
        None => bytes.len() as u64,
        Some(damage) => {
            let index_expected = first_index.saturating_add(scan.records.len() as u64);
            lost_tail = check_torn_tail(&bytes, &path, damage, index_expected, is_last, synced_below)?;
            // Cut the tail off durably, so the file ends at the last good record and later appends
            // extend a clean log.
            file.set_len(damage.offset as u64)?;
            file.sync_data()?;
            damage.offset as u64
        }
    };
    if scan.records.is_empty() {
        if !is_last {
            return Err(corrupt(&path, SEGMENT_HEADER_BYTES as u64, "segment not the last holds no records"));
        }
        remove_file_durably(dir, &path)?;
        return Ok((None, lost_tail));
    }
    let file = Arc::new(file);
    let segment =
        Segment { first_index, path, file, records: scan.records, bytes_len, written: 0, synced: 0 };
    Ok((Some(segment), lost_tail))
}

/// A last segment whose header is all zeros and which holds no valid record: its header never
/// reached the disk, so neither did a sync of it. (A header zeroed at rest in front of valid
/// records is damage, and stays `Corrupt`.)
pub(super) fn never_synced(bytes: &[u8], first_index: u64) -> bool {
    let header = &bytes[..SEGMENT_HEADER_BYTES.min(bytes.len())];
    header.iter().all(|byte| *byte == 0) && scan_records(bytes, first_index).records.is_empty()
}

pub(super) fn read_segment_file(file: &File, path: &Path) -> Result<Vec<u8>, WalError> {
    let file_len = file.metadata()?.len();
    if file_len > SEGMENT_FILE_BYTES_MAX {
        let reason = format!("segment file is {file_len} bytes, more than the log ever writes");
        return Err(corrupt(path, SEGMENT_FILE_BYTES_MAX, reason));
    }
    let mut bytes = vec![0; file_len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Whether damage found by `scan_records` is a torn tail, which recovery may cut off (with the
/// ambiguous tail it is, if it is one; see "Recovery"); if not, the `Corrupt` error to refuse to
/// start with.
pub(super) fn check_torn_tail(
    bytes: &[u8],
    path: &Path,
    damage: &Damage,
    index_expected: u64,
    is_last: bool,
    synced_below: Option<u64>,
) -> Result<Option<LostTail>, WalError> {
    let reason = if !is_last {
        format!("{} in a segment not the last", damage.reason)
    } else if damage.kind == DamageKind::WrongIndex {
        // The record is whole and its CRC holds: it was written as it is, not torn.
        damage.reason.clone()
    } else if let Some((offset, index)) = find_valid_record_after(bytes, damage.offset, index_expected) {
        if synced_below.is_some_and(|below| index_expected >= below) {
            let mut last_seen = (offset, index);
            while let Some(next) = find_valid_record_after(bytes, last_seen.0, last_seen.1 + 1) {
                last_seen = next;
            }
            return Ok(Some(LostTail { first: index_expected, last_seen: last_seen.1 }));
        }
        format!("{}, yet a valid record of index {index} follows at offset {offset}", damage.reason)
    } else {
        return Ok(None);
    };
    Err(corrupt(path, damage.offset as u64, reason))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum DamageKind {
    /// No valid record at the offset: cut short, too long, or a CRC mismatch.
    Unreadable,
    /// A valid record, but with an index that does not run on from the one before.
    WrongIndex,
}

#[derive(Debug)]
pub(super) struct Damage {
    pub(super) offset: usize,
    pub(super) kind: DamageKind,
    pub(super) reason: String,
}

pub(super) struct SegmentScan {
    /// The valid records before any damage.
    pub(super) records: Vec<RecordLoc>,
    pub(super) damage: Option<Damage>,
}

/// Decodes the records of a segment file (header already checked) until the end or the first
/// damage, expecting indexes to run on from `first_index`.
pub(super) fn scan_records(bytes: &[u8], first_index: u64) -> SegmentScan {
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        let index_expected = first_index.saturating_add(records.len() as u64);
        let (kind, reason) = match decode_record(bytes, offset) {
            Ok(record) if record.index == index_expected => {
                let payload_len = record.payload.len() as u32;
                records.push(RecordLoc { offset: offset as u64, payload_len });
                offset = record.payload.end;
                continue;
            }
            Ok(record) => (
                DamageKind::WrongIndex,
                format!("record holds index {}, expected {index_expected}", record.index),
            ),
            Err(reason) => (DamageKind::Unreadable, reason),
        };
        return SegmentScan { records, damage: Some(Damage { offset, kind, reason }) };
    }
    SegmentScan { records, damage: None }
}

/// The offset and index of a valid record starting anywhere after `damage_offset`, if there is one:
/// the evidence that damage is not a torn tail. The damaged record's length field may be what is
/// damaged, so every offset is tried, not just the one its length points to.
pub(super) fn find_valid_record_after(
    bytes: &[u8],
    damage_offset: usize,
    index_expected: u64,
) -> Option<(usize, u64)> {
    // Records are at least RECORD_HEADER_BYTES long, which bounds the indexes that can follow in
    // the bytes left. Checking that first skips nearly every offset without computing a CRC.
    let records_max = ((bytes.len() - damage_offset) / RECORD_HEADER_BYTES) as u64;
    let indexes_plausible = index_expected..=index_expected.saturating_add(records_max);
    let offset_last = bytes.len().checked_sub(RECORD_HEADER_BYTES)?;
    (damage_offset + 1..=offset_last).find_map(|offset| {
        let index = u64_at(bytes, offset + RECORD_INDEX_OFFSET);
        let valid = indexes_plausible.contains(&index) && decode_record(bytes, offset).is_ok();
        valid.then_some((offset, index))
    })
}
