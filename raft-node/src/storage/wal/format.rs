//! The log's bytes on disk: segment names, the segment header, records (see the module above
//! for the format). Encoding and decoding only; no file is opened here.

use super::*;

/// A segment rolls over before a record would take it past this size. It bounds the memory
/// recovery needs (a segment is read whole) and how much a purge can leave behind.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// The largest payload one record may hold. A Raft entry is one client batch, far below this.
pub const RECORD_BYTES_MAX: u32 = 64 * 1024 * 1024;

pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"TALLYWAL";

pub(super) const FORMAT_VERSION: u32 = 2;

pub(super) const SEGMENT_HEADER_BYTES: usize = SEGMENT_MAGIC.len() + size_of::<u32>();

/// Where the fields of a record header sit: `payload_len`, `crc`, `index`.
pub(super) const RECORD_CRC_OFFSET: usize = size_of::<u32>();

pub(super) const RECORD_INDEX_OFFSET: usize = RECORD_CRC_OFFSET + size_of::<u32>();

pub(super) const RECORD_HEADER_BYTES: usize = RECORD_INDEX_OFFSET + size_of::<u64>();

pub(super) const SEGMENT_SUFFIX: &str = ".wal";

/// A sealed segment's record index sits beside it: `<segment's first index>.idx`.
pub(super) const INDEX_EXTENSION: &str = "idx";

pub(super) const SEGMENT_NAME_DIGITS: usize = 20;

/// The largest segment file the log ever writes: a full segment, or a lone largest record. Recovery
/// refuses bigger files instead of reading them into memory.
pub(super) const SEGMENT_FILE_BYTES_MAX: u64 =
    SEGMENT_BYTES_MAX + (SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;

// A lone record of the largest size must fit in a segment file of the largest size.
const _: () = assert!(RECORD_BYTES_MAX as u64 <= SEGMENT_BYTES_MAX);

// u64::MAX has 20 decimal digits, so every index has a name and names sort like indexes.
const _: () = assert!(u64::MAX.ilog10() + 1 == SEGMENT_NAME_DIGITS as u32);

pub(super) fn segment_file_name(first_index: u64) -> String {
    format!("{first_index:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_NAME_DIGITS)
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn segment_header() -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0; SEGMENT_HEADER_BYTES];
    header[..SEGMENT_MAGIC.len()].copy_from_slice(&SEGMENT_MAGIC);
    header[SEGMENT_MAGIC.len()..].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header
}

#[derive(Debug)]
pub(super) enum HeaderCheck {
    Valid,
    /// Shorter than a header, and what is there is a prefix of a valid one.
    CutShort,
    Bad(String),
    /// A valid header of another format version.
    OtherVersion(u32),
}

pub(super) fn check_header(bytes: &[u8]) -> HeaderCheck {
    let expected = segment_header();
    if bytes.len() < SEGMENT_HEADER_BYTES {
        if expected.starts_with(bytes) {
            return HeaderCheck::CutShort;
        }
        return HeaderCheck::Bad("header cut short, and not a prefix of a valid header".into());
    }
    if bytes[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
        return HeaderCheck::Bad("bad magic: not a tally wal segment".into());
    }
    let version = u32_at(bytes, SEGMENT_MAGIC.len());
    if version != FORMAT_VERSION {
        return HeaderCheck::OtherVersion(version);
    }
    HeaderCheck::Valid
}

pub(super) fn record_crc(index: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload)
}

pub(super) fn encode_record(index: u64, payload: &[u8]) -> Vec<u8> {
    let payload_len = u32::try_from(payload.len()).expect("caller checked RECORD_BYTES_MAX");
    let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    record.extend_from_slice(&payload_len.to_le_bytes());
    record.extend_from_slice(&record_crc(index, payload).to_le_bytes());
    record.extend_from_slice(&index.to_le_bytes());
    record.extend_from_slice(payload);
    record
}

pub(super) struct DecodedRecord {
    pub(super) index: u64,
    /// Where the payload sits in the buffer decoded from.
    pub(super) payload: Range<usize>,
}

/// Decodes the record at `offset` in `bytes`, or says why there is no valid record there.
pub(super) fn decode_record(bytes: &[u8], offset: usize) -> Result<DecodedRecord, String> {
    let payload_start = offset + RECORD_HEADER_BYTES;
    if bytes.len() < payload_start {
        return Err("record header cut short".into());
    }
    let payload_len = u32_at(bytes, offset);
    let crc = u32_at(bytes, offset + RECORD_CRC_OFFSET);
    let index = u64_at(bytes, offset + RECORD_INDEX_OFFSET);
    if payload_len > RECORD_BYTES_MAX {
        return Err(format!("payload length {payload_len} over RECORD_BYTES_MAX"));
    }
    let payload = payload_start..payload_start + payload_len as usize;
    let Some(payload_bytes) = bytes.get(payload.clone()) else {
        return Err(format!("payload of {payload_len} bytes cut short"));
    };
    if record_crc(index, payload_bytes) != crc {
        return Err("crc mismatch".into());
    }
    Ok(DecodedRecord { index, payload })
}

pub(super) fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

pub(super) fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"))
}

pub(super) fn payload_too_large(payload_len: usize) -> io::Error {
    let message = format!("payload of {payload_len} bytes over RECORD_BYTES_MAX ({RECORD_BYTES_MAX})");
    io::Error::new(io::ErrorKind::InvalidInput, message)
}
