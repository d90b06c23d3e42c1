//! The record index of a sealed WAL segment: where each record sits, so that opening the log
//! reads a few bytes of each older segment instead of all of it (issue 24: with 4 GiB of log kept
//! behind a snapshot, a restart read and checked every byte, 0.4-1.7 s at rush hour on the chaos
//! harness's disks).
//!
//! A segment is sealed when the log rolls over to a new one, after everything in it was synced;
//! its index is written then, beside it, as `<segment name>.idx`. The index is a cache, never the
//! only copy of anything: written without a sync, checked with its own CRC, with the segment's
//! length and with the last record's header (read back from the segment at open), and rebuilt by
//! scanning the segment whenever any of that fails. Records stay checked where they are read: a
//! read verifies every record's CRC and index (`ReadPart::read`).
//!
//! ```text
//! index:  magic "TALLYIDX" (8 bytes) | version: u32 LE (1) | first index: u64 LE
//!         | segment file length: u64 LE | last record's crc: u32 LE | record count: u32 LE
//!         | payload_len: u32 LE, one per record | crc: u32 LE (CRC-32C of everything before)
//! ```

const MAGIC: [u8; 8] = *b"TALLYIDX";
const VERSION: u32 = 1;
const FIXED_BYTES: usize = MAGIC.len() + 4 + 8 + 8 + 4 + 4;

/// What an index says about its segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    pub first_index: u64,
    /// The segment file's length when it was sealed: the end of its last record.
    pub file_len: u64,
    /// The crc field of the segment's last record, compared with the segment at open.
    pub last_crc: u32,
    /// Each record's payload length, in index order; records follow one another from the end of
    /// the segment's header.
    pub payload_lens: Vec<u32>,
}

impl SegmentIndex {
    pub fn encode(&self) -> Vec<u8> {
        let count = u32::try_from(self.payload_lens.len()).expect("a segment holds fewer than 2^32 records");
        let mut bytes = Vec::with_capacity(FIXED_BYTES + 4 * self.payload_lens.len() + 4);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.first_index.to_le_bytes());
        bytes.extend_from_slice(&self.file_len.to_le_bytes());
        bytes.extend_from_slice(&self.last_crc.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        for len in &self.payload_lens {
            bytes.extend_from_slice(&len.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The index in `bytes`, or `None` if they are not a whole, undamaged index of this version
    /// (the caller then scans the segment).
    pub fn decode(bytes: &[u8]) -> Option<SegmentIndex> {
        let (body, crc) = bytes.split_last_chunk::<4>()?;
        if body.len() < FIXED_BYTES || crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return None;
        }
        let (magic, rest) = body.split_first_chunk::<8>()?;
        let (version, rest) = rest.split_first_chunk::<4>()?;
        let (first_index, rest) = rest.split_first_chunk::<8>()?;
        let (file_len, rest) = rest.split_first_chunk::<8>()?;
        let (last_crc, rest) = rest.split_first_chunk::<4>()?;
        let (count, rest) = rest.split_first_chunk::<4>()?;
        if *magic != MAGIC || u32::from_le_bytes(*version) != VERSION {
            return None;
        }
        let count = u32::from_le_bytes(*count) as usize;
        if count == 0 || rest.len() != count.checked_mul(4)? {
            return None;
        }
        let payload_lens =
            rest.chunks_exact(4).map(|len| u32::from_le_bytes(len.try_into().expect("4 bytes"))).collect();
        Some(SegmentIndex {
            first_index: u64::from_le_bytes(*first_index),
            file_len: u64::from_le_bytes(*file_len),
            last_crc: u32::from_le_bytes(*last_crc),
            payload_lens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> SegmentIndex {
        SegmentIndex {
            first_index: 41,
            file_len: 12 + 3 * 16 + 60,
            last_crc: 0xdead_beef,
            payload_lens: vec![10, 20, 30],
        }
    }

    #[test]
    fn an_index_reads_back_as_written() {
        assert_eq!(SegmentIndex::decode(&index().encode()), Some(index()));
    }

    /// Any flipped bit, any cut and any byte added is refused (the segment is then scanned), never
    /// taken for another index.
    #[test]
    fn a_damaged_or_cut_index_is_refused() {
        let bytes = index().encode();
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert_eq!(SegmentIndex::decode(&damaged), None, "bit {bit} of byte {at} flipped");
            }
            assert_eq!(SegmentIndex::decode(&bytes[..at]), None, "cut to {at} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(SegmentIndex::decode(&longer), None);
    }
}
