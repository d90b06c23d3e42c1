//! Snapshots: the whole state as one byte stream, and back.
//!
//! Stream format, version 1 (all integers little-endian):
//!
//! ```text
//! header   "TALLYSNP" | format version u32 | schema version u32
//! record   0x01 | key length u16 | key | value length u32 | value      (in key order)
//! trailer  0x00 | record count u64 | blake3 of every byte up to and including the 0x00 (32 bytes)
//! ```
//!
//! An import checks the header, the count and the checksum, and writes the ledger meta only after
//! all of that holds, so that a store without meta is known to be a half-done import.

use std::io::{BufReader, BufWriter, Read, Write};

use crate::codec::{self, PREFIX_META};
use crate::store::{Records, Store, StoreError, StoreResult};

const MAGIC: &[u8; 8] = b"TALLYSNP";
pub const FORMAT_VERSION: u32 = 1;
const TAG_RECORD: u8 = 1;
const TAG_END: u8 = 0;
/// Records written to the store per import write, to bound the memory an import holds.
const IMPORT_CHUNK_RECORDS: usize = 4096;
/// Keys and values in the state are small; anything larger is a corrupt stream.
const RECORD_KEY_BYTES_MAX: usize = 64;
const RECORD_VALUE_BYTES_MAX: usize = 1 << 20;

/// Writes the whole state of `store` (a store, or a frozen view of one) to `out`; returns the
/// number of records.
pub fn export(store: &impl Records, out: impl Write) -> StoreResult<u64> {
    let mut stream = StreamWriter::start(out)?;
    store.for_each_record(&mut |key, value| stream.record(key, value))?;
    stream.finish()
}

/// Copies a stream written by `export` from `input` to `out` with the embedding application's
/// meta (`META_APP_KEY`) set to `app_meta`, checking `input` as `verify` does. For seeding a new
/// cluster from a backup, whose applied log id is not the old cluster's. `out` holds a valid
/// stream only if this returns `Ok`.
pub fn rewrite_app_meta(input: impl Read, out: impl Write, app_meta: &[u8]) -> StoreResult<Verified> {
    let mut stream = StreamWriter::start(out)?;
    let mut app_written = false;
    let verified = read_stream(input, &mut |records| {
        for (key, value) in records.drain(..) {
            if !app_written && key.as_slice() >= codec::META_APP_KEY {
                stream.record(codec::META_APP_KEY, app_meta)?;
                app_written = true;
                if key == codec::META_APP_KEY {
                    continue;
                }
            }
            stream.record(&key, &value)?;
        }
        Ok(())
    })?;
    if !app_written {
        stream.record(codec::META_APP_KEY, app_meta)?;
    }
    stream.finish()?;
    Ok(verified)
}

/// Writes the stream format: `record` in key order, then `finish`.
struct StreamWriter<W: Write> {
    out: HashingWriter<BufWriter<W>>,
    count: u64,
}

impl<W: Write> StreamWriter<W> {
    fn start(out: W) -> StoreResult<StreamWriter<W>> {
        let mut out = HashingWriter { inner: BufWriter::new(out), hasher: blake3::Hasher::new() };
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&codec::SCHEMA_VERSION.to_le_bytes())?;
        Ok(StreamWriter { out, count: 0 })
    }

    fn record(&mut self, key: &[u8], value: &[u8]) -> StoreResult<()> {
        assert!(key.len() <= RECORD_KEY_BYTES_MAX && value.len() <= RECORD_VALUE_BYTES_MAX);
        self.out.write_all(&[TAG_RECORD])?;
        self.out.write_all(&(key.len() as u16).to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&(value.len() as u32).to_le_bytes())?;
        self.out.write_all(value)?;
        self.count += 1;
        Ok(())
    }

    fn finish(mut self) -> StoreResult<u64> {
        self.out.write_all(&[TAG_END])?;
        let hash = self.out.hasher.finalize();
        let mut inner = self.out.inner;
        inner.write_all(&self.count.to_le_bytes())?;
        inner.write_all(hash.as_bytes())?;
        inner.flush()?;
        Ok(self.count)
    }
}

/// Reads a stream written by `export` into `store`, which must be empty. On any error the store
/// is cleared again, so it never holds part of a snapshot.
pub fn import<S: Store>(store: &mut S, input: impl Read) -> StoreResult<u64> {
    if !store.is_empty()? {
        return Err(StoreError::NotEmpty);
    }
    let result = import_records(store, input);
    if result.is_err() {
        store.clear()?;
    }
    result
}

/// What a whole stream checked out to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The ledger's bookkeeping: its last timestamp and running digest.
    pub ledger: codec::LedgerMeta,
    /// The embedding application's meta, if the state has one.
    pub app: Option<Vec<u8>>,
}

/// Reads a whole stream written by `export` without storing it: the same checks as `import`
/// (header, every record's bounds, count, checksum, ledger meta present and readable). For a
/// snapshot received from the network or read back from disk, before anything depends on it.
pub fn verify(input: impl Read) -> StoreResult<Verified> {
    read_stream(input, &mut |_| Ok(()))
}

/// A raw key and value, as the stream carries them.
type Record = (Vec<u8>, Vec<u8>);

fn import_records<S: Store>(store: &mut S, input: impl Read) -> StoreResult<u64> {
    let mut meta = Vec::new();
    let verified = read_stream(input, &mut |records| {
        let (metas, rest): (Vec<_>, Vec<_>) =
            records.drain(..).partition(|(key, _)| key.first() == Some(&PREFIX_META));
        meta.extend(metas);
        store.put_records(&rest)
    })?;
    store.put_records(&meta)?;
    Ok(verified.records)
}

/// Walks the stream, handing records to `sink` in chunks of up to `IMPORT_CHUNK_RECORDS` (the
/// last one only after the trailer checked out), and checks everything `verify` promises.
fn read_stream(
    input: impl Read,
    sink: &mut dyn FnMut(&mut Vec<Record>) -> StoreResult<()>,
) -> StoreResult<Verified> {
    let mut input = HashingReader { inner: BufReader::new(input), hasher: blake3::Hasher::new() };
    let magic: [u8; 8] = read_array(&mut input)?;
    if &magic != MAGIC {
        return Err(StoreError::Corrupt("not a tally snapshot".into()));
    }
    let format = u32::from_le_bytes(read_array(&mut input)?);
    let schema = u32::from_le_bytes(read_array(&mut input)?);
    if format != FORMAT_VERSION || !codec::SCHEMA_VERSIONS_READ.contains(&schema) {
        return Err(StoreError::Corrupt(format!(
            "snapshot format {format} schema {schema}; this build reads format {FORMAT_VERSION} schema {}",
            codec::SCHEMA_VERSION
        )));
    }
    let mut chunk = Vec::with_capacity(IMPORT_CHUNK_RECORDS);
    let (mut ledger, mut app) = (None, None);
    let mut count = 0u64;
    loop {
        let [tag] = read_array(&mut input)?;
        if tag == TAG_END {
            break;
        }
        if tag != TAG_RECORD {
            return Err(StoreError::Corrupt(format!("snapshot record tag {tag}")));
        }
        let (key, value) = read_record(&mut input)?;
        count += 1;
        if key == codec::META_LEDGER_KEY {
            let meta = codec::decode_ledger_meta(&value)
                .map_err(|schema| StoreError::Corrupt(format!("snapshot ledger meta of schema {schema}")))?;
            ledger = Some(meta);
        } else if key == codec::META_APP_KEY {
            app = Some(value.clone());
        }
        chunk.push((key, value));
        if chunk.len() == IMPORT_CHUNK_RECORDS {
            sink(&mut chunk)?;
            chunk.clear();
        }
    }
    let hash = input.hasher.finalize();
    let count_expected = u64::from_le_bytes(read_array(&mut input.inner)?);
    let hash_expected: [u8; 32] = read_array(&mut input.inner)?;
    if count != count_expected || hash.as_bytes() != &hash_expected {
        return Err(StoreError::Corrupt("snapshot checksum or record count mismatch".into()));
    }
    let Some(ledger) = ledger else {
        return Err(StoreError::Corrupt("snapshot without ledger meta".into()));
    };
    let mut trailing = [0u8; 1];
    if input.inner.read(&mut trailing)? != 0 {
        return Err(StoreError::Corrupt("bytes after the snapshot's trailer".into()));
    }
    sink(&mut chunk)?;
    Ok(Verified { records: count, ledger, app })
}

fn read_record(input: &mut impl Read) -> StoreResult<(Vec<u8>, Vec<u8>)> {
    let key_len = u16::from_le_bytes(read_array(input)?) as usize;
    if key_len == 0 || key_len > RECORD_KEY_BYTES_MAX {
        return Err(StoreError::Corrupt(format!("snapshot key of {key_len} bytes")));
    }
    let mut key = vec![0u8; key_len];
    input.read_exact(&mut key)?;
    let value_len = u32::from_le_bytes(read_array(input)?) as usize;
    if value_len > RECORD_VALUE_BYTES_MAX {
        return Err(StoreError::Corrupt(format!("snapshot value of {value_len} bytes")));
    }
    let mut value = vec![0u8; value_len];
    input.read_exact(&mut value)?;
    Ok((key, value))
}

fn read_array<const N: usize>(input: &mut impl Read) -> StoreResult<[u8; N]> {
    let mut bytes = [0u8; N];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// blake3 over every record of the state except the embedding application's meta, in key order.
/// Two replicas that applied the same entries have the same state digest.
pub fn state_digest(store: &impl Store) -> StoreResult<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    store.for_each_record(&mut |key, value| {
        if key != codec::META_APP_KEY {
            hasher.update(&(key.len() as u32).to_le_bytes());
            hasher.update(key);
            hasher.update(&(value.len() as u32).to_le_bytes());
            hasher.update(value);
        }
        Ok(())
    })?;
    Ok(*hasher.finalize().as_bytes())
}

struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        Ok(written)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, bytes: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(bytes)?;
        self.hasher.update(&bytes[..read]);
        Ok(read)
    }
}
