//! Backups: one node's applied state in a file, and a new cluster seeded from one (`restore`).
//!
//! A node exports its state for `Cluster.Backup` as it exports a snapshot (a frozen view, so
//! applying goes on) and streams it after a header; `tally backup` writes what it receives to a
//! file and checks it whole before giving it its name. File format, version 1 (integers
//! little-endian):
//!
//! ```text
//! "TALLYBAK" | format version u32 | header length u32 | header (JSON) | blake3 of the header (32 bytes)
//! snapshot stream (ledger::snapshot's format, header.stream_bytes long, checksummed in itself)
//! ```
//!
//! The header is JSON so that `head -c 400 FILE` shows an operator what a file holds; it is
//! checksummed apart from the stream, and checked against it: the stream's own ledger meta
//! (digest, last timestamp) and applied log id must say what the header says.

pub mod restore;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tally_proto::v1 as pb;

use crate::storage::state_machine::AppliedState;
use crate::types::NodeId;

const MAGIC: &[u8; 8] = b"TALLYBAK";
pub const FORMAT_VERSION: u32 = 1;
/// A header is a few hundred bytes; anything much larger is not one.
const HEADER_BYTES_MAX: u32 = 64 << 10;
/// The longest a backup stream may go without a message before `receive` gives up on it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The most bytes of stream one `BackupChunk` carries.
pub const CHUNK_BYTES: usize = 1 << 20;

/// What a backup holds (`pb::BackupHeader`, and when and by what it was written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub cluster: String,
    /// The node that exported the state.
    pub node_id: NodeId,
    /// The last log entry the state includes, in the cluster it was taken from.
    pub applied_index: u64,
    pub applied_term: u64,
    /// The ledger's running digest at that entry, lowercase hex (`NodeStatus.state_digest`).
    pub state_digest: String,
    /// The newest event's timestamp (ns since the Unix epoch).
    pub timestamp_last: u64,
    /// The snapshot stream's length in bytes.
    pub stream_bytes: u64,
    /// When `tally backup` received it (ns since the Unix epoch, its machine's clock).
    pub created_ns: u64,
    /// The tally version that wrote the file.
    pub written_by: String,
}

impl Header {
    fn from_pb(header: pb::BackupHeader) -> Header {
        Header {
            cluster: header.cluster,
            node_id: header.node_id,
            applied_index: header.applied_index,
            applied_term: header.applied_term,
            state_digest: header.state_digest,
            timestamp_last: header.timestamp_last,
            stream_bytes: header.stream_bytes,
            created_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            written_by: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

fn write_header(out: &mut impl Write, header: &Header) -> io::Result<()> {
    let json = serde_json::to_vec(header).expect("a header serializes");
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.write_all(blake3::hash(&json).as_bytes())
}

/// Reads and checks a backup file's header; `input` is left at the start of the stream.
fn read_header(input: &mut impl Read) -> Result<Header, String> {
    let mut fixed = [0u8; 16];
    input.read_exact(&mut fixed).map_err(|e| format!("not a tally backup (too short: {e})"))?;
    if &fixed[..8] != MAGIC {
        return Err("not a tally backup (no TALLYBAK at its start)".into());
    }
    let version = u32::from_le_bytes(fixed[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(format!("backup format {version}; this build reads format {FORMAT_VERSION}"));
    }
    let length = u32::from_le_bytes(fixed[12..16].try_into().unwrap());
    if length > HEADER_BYTES_MAX {
        return Err(format!("the backup's header claims {length} bytes: the file is damaged"));
    }
    let mut json = vec![0u8; length as usize];
    let mut checksum = [0u8; 32];
    input
        .read_exact(&mut json)
        .and_then(|_| input.read_exact(&mut checksum))
        .map_err(|e| format!("the backup's header is cut short: {e}"))?;
    if blake3::hash(&json).as_bytes() != &checksum {
        return Err("the backup's header does not match its checksum: the file is damaged".into());
    }
    serde_json::from_slice(&json).map_err(|e| format!("the backup's header does not read: {e}"))
}

/// Opens the backup file at `path`: its header (checked on its own) and a reader at the start of
/// its snapshot stream, which the caller checks as it reads it (`ledger::snapshot::import` and
/// `verify` do).
pub fn open(path: &Path) -> Result<(Header, io::BufReader<std::fs::File>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut input = io::BufReader::new(file);
    let header = read_header(&mut input).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((header, input))
}

/// A backup file that checked out whole.
#[derive(Debug)]
pub struct Checked {
    pub header: Header,
    pub state: ledger::snapshot::Verified,
}

/// Checks the backup file at `path` whole: its header, its stream (every record, count and
/// checksum), and that the two say the same. Nothing is written.
pub fn verify_file(path: &Path) -> Result<Checked, String> {
    let (header, input) = open(path)?;
    let state = verify_stream(input, &header).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Checked { header, state })
}

/// Checks a backup's stream against its header.
fn verify_stream(stream: impl Read, header: &Header) -> Result<ledger::snapshot::Verified, String> {
    let mut counted = Counted { inner: stream, bytes: 0 };
    let state = ledger::snapshot::verify(&mut counted)
        .map_err(|e| format!("the backup's state is damaged or incomplete: {e}"))?;
    check_against_header(&state, counted.bytes, header)?;
    Ok(state)
}

/// The stream `state` (of `bytes` bytes) is the state `header` describes.
fn check_against_header(
    state: &ledger::snapshot::Verified,
    bytes: u64,
    header: &Header,
) -> Result<(), String> {
    let applied = state
        .app
        .as_deref()
        .map(crate::types::decode::<AppliedState>)
        .transpose()
        .map_err(|e| format!("the backup's applied log id does not read: {e}"))?
        .and_then(|applied| applied.last_applied);
    let said =
        (header.applied_index, header.applied_term, header.state_digest.clone(), header.timestamp_last);
    let found = (
        applied.map_or(0, |id| id.index),
        applied.map_or(0, |id| id.leader_id.term),
        hex(&state.ledger.digest),
        state.ledger.timestamp_last,
    );
    if bytes != header.stream_bytes || said != found {
        return Err(format!(
            "the backup's header does not describe its state (header: index {}, term {}, digest {}, last \
             timestamp {}, {} bytes; state: index {}, term {}, digest {}, last timestamp {}, {bytes} bytes)",
            said.0, said.1, said.2, said.3, header.stream_bytes, found.0, found.1, found.2, found.3
        ));
    }
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.bytes += read as u64;
        Ok(read)
    }
}

/// Where `receive` writes a backup until it checked out.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// Writes the backup a node streams to `out`: first to `out.partial`, fsynced and checked whole
/// (`verify_file`), then renamed to `out`. Refuses to replace an existing `out`; on any error
/// nothing is left behind.
pub async fn receive(mut stream: tonic::Streaming<pb::BackupChunk>, out: &Path) -> Result<Checked, String> {
    if out.exists() {
        return Err(format!("{} exists already: a backup never replaces a file", out.display()));
    }
    let partial = partial_path(out);
    let written = async {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        let mut header = None;
        let mut received = 0u64;
        loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, stream.message())
                .await
                .map_err(|_| format!("the node sent nothing for {} s", STALL_TIMEOUT.as_secs()))?
                .map_err(|status| format!("the node stopped the backup: {}", status.message()))?;
            let Some(chunk) = next else { break };
            if let Some(sent) = chunk.header {
                if header.is_some() {
                    return Err("the node sent a second header".to_string());
                }
                let made = Header::from_pb(sent);
                write_header(&mut file, &made)
                    .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
                header = Some(made);
            } else if header.is_none() {
                return Err("the node sent data before the header".to_string());
            }
            received += chunk.data.len() as u64;
            file.write_all(&chunk.data).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
        }
        let header = header.ok_or("the node sent no header")?;
        if received != header.stream_bytes {
            return Err(format!("the node sent {received} of {} bytes", header.stream_bytes));
        }
        file.sync_all().map_err(|e| format!("cannot sync {}: {e}", partial.display()))?;
        let check = partial.clone();
        let checked =
            tokio::task::spawn_blocking(move || verify_file(&check)).await.map_err(|e| e.to_string())??;
        std::fs::rename(&partial, out).map_err(|e| format!("cannot rename to {}: {e}", out.display()))?;
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
        Ok(checked)
    }
    .await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// The header of a backup a node is about to stream from `exported`.
pub fn header_of(
    exported: &crate::storage::state_machine::Exported,
    cluster: &str,
    node_id: NodeId,
) -> pb::BackupHeader {
    pb::BackupHeader {
        node_id,
        applied_index: exported.applied.map_or(0, |id| id.index),
        applied_term: exported.applied.map_or(0, |id| id.leader_id.term),
        state_digest: hex(&exported.ledger.digest),
        timestamp_last: exported.ledger.timestamp_last,
        stream_bytes: exported.bytes,
        cluster: cluster.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            cluster: "tally".into(),
            node_id: 2,
            applied_index: 7,
            applied_term: 3,
            state_digest: "ab".repeat(32),
            timestamp_last: 42,
            stream_bytes: 100,
            created_ns: 1,
            written_by: "test".into(),
        }
    }

    /// One row per way a header can be damaged: each is refused, with what is wrong.
    #[test]
    fn a_damaged_header_is_refused() {
        let mut bytes = Vec::new();
        write_header(&mut bytes, &header()).unwrap();
        assert_eq!(read_header(&mut &bytes[..]).unwrap(), header());
        let flipped = |at: usize| {
            let mut b = bytes.clone();
            b[at] ^= 0x20;
            b
        };
        for (what, damaged, says) in [
            ("a flipped magic", flipped(0), "not a tally backup"),
            ("a future format", flipped(8), "backup format"),
            ("a huge length", flipped(15), "claims"),
            ("a flipped header byte", flipped(30), "checksum"),
            ("a flipped checksum byte", flipped(bytes.len() - 1), "checksum"),
            ("a cut header", bytes[..40].to_vec(), "cut short"),
            ("nothing", Vec::new(), "too short"),
        ] {
            let error = read_header(&mut &damaged[..]).unwrap_err();
            assert!(error.contains(says), "{what}: {error}");
        }
    }

    #[test]
    fn a_partial_file_sits_beside_the_backup() {
        assert_eq!(partial_path(Path::new("/b/x.tally")), Path::new("/b/x.tally.partial"));
        assert_eq!(partial_path(Path::new("x")), Path::new("x.partial"));
    }
}
