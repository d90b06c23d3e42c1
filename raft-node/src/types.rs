//! The openraft type configuration, and what a Raft entry carries.
//!
//! An entry's application data is a `Request`: the leader's proposed timestamp and one or more
//! client batches (group commit puts several in one entry). It is encoded with our own compact
//! format (`encode_request`): a 1 MiB batch of 8189 transfers is 8189 fixed 128-byte records,
//! copied, not parsed field by field.

use std::fmt;

use ledger::{Account, Batch, BatchReply, CreateAccountResult, CreateTransferResult, EventResult};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// openraft's runtime: tokio. Under simulation, openraft's randomness (election timeouts, tick
/// phases) comes from a seed the simulator sets for each simulated host (`DeterministicRng::scope`),
/// not from the OS.
#[cfg(not(feature = "sim"))]
type Runtime = openraft::impls::TokioRuntime;
#[cfg(feature = "sim")]
type Runtime = openraft::rt::deterministic_rng::DeterministicRng<openraft_rt_tokio::TokioRuntime>;

openraft::declare_raft_types!(
    /// tally's Raft types: u64 node ids, `NodeInfo` nodes, `Request` entries.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
        AsyncRuntime = Runtime,
);

pub type NodeId = u64;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type Payload = openraft::EntryPayload<Request, NodeId, NodeInfo>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotFile>;

/// A snapshot's data: a file holding the ledger's export stream (`storage::state_machine`).
#[derive(Debug)]
pub struct SnapshotFile {
    pub path: std::path::PathBuf,
}

/// A member of the cluster: where to reach it and which site (data center) it is in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` of its client door (`tally.v1.Ledger` and `tally.v1.Cluster`), as clients and
    /// operators reach it.
    pub address: String,
    /// `host:port` of its peer door (`tally.v1.Raft` and requests other nodes forward), as
    /// other nodes reach it.
    pub peer_address: String,
    pub site: String,
    /// The incarnation of its data directory (`net::identity`); 0 until the leader records it.
    pub incarnation: u64,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (peers {})@{}", self.address, self.peer_address, self.site)
    }
}

/// One Raft entry's application data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The leader's clock (ns since the epoch) when it proposed the entry.
    pub timestamp_proposed: u64,
    pub batches: Vec<Batch>,
    /// An entry that switches the ledger to this semantics version (`ledger::semantics`), with
    /// no batches and no time.
    pub switch_semantics: Option<u32>,
}

impl Request {
    /// An entry of batches (none: a tick that expires what is due at `timestamp_proposed`).
    pub fn batches(timestamp_proposed: u64, batches: Vec<Batch>) -> Request {
        Request { timestamp_proposed, batches, switch_semantics: None }
    }

    /// An entry that switches the ledger's rules to semantics `version` from here on.
    pub fn switch_semantics(version: u32) -> Request {
        Request { timestamp_proposed: 0, batches: Vec::new(), switch_semantics: Some(version) }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(version) = self.switch_semantics {
            return write!(f, "Request(switch to semantics {version})");
        }
        let events: usize = self.batches.iter().map(Batch::len).sum();
        write!(f, "Request({} batches, {} events @{})", self.batches.len(), events, self.timestamp_proposed)
    }
}

/// The ledger's replies to one entry's batches, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    pub replies: Vec<BatchReply>,
}

const REQUEST_FORMAT_VERSION: u8 = 1;
/// An entry that switches semantics: this byte, then the version (u32). Written only once every
/// member runs a build that reads it.
const REQUEST_FORMAT_SWITCH: u8 = 2;
const BATCH_KIND_ACCOUNTS: u8 = 1;
const BATCH_KIND_TRANSFERS: u8 = 2;
/// The most batches one entry may carry; group commit stops adding at this many.
pub const ENTRY_BATCHES_MAX: usize = 1024;

pub fn encode_request(request: &Request) -> Vec<u8> {
    if let Some(version) = request.switch_semantics {
        let mut out = vec![REQUEST_FORMAT_SWITCH];
        out.extend_from_slice(&version.to_le_bytes());
        return out;
    }
    let events: usize = request.batches.iter().map(Batch::len).sum();
    let mut out = Vec::with_capacity(13 + request.batches.len() * 5 + events * ledger::codec::RECORD_BYTES);
    out.push(REQUEST_FORMAT_VERSION);
    out.extend_from_slice(&request.timestamp_proposed.to_le_bytes());
    out.extend_from_slice(&(request.batches.len() as u32).to_le_bytes());
    for batch in &request.batches {
        match batch {
            Batch::CreateAccounts(events) => {
                out.push(BATCH_KIND_ACCOUNTS);
                out.extend_from_slice(&(events.len() as u32).to_le_bytes());
                for event in events {
                    out.extend_from_slice(&ledger::codec::encode_account(event));
                }
            }
            Batch::CreateTransfers(events) => {
                out.push(BATCH_KIND_TRANSFERS);
                out.extend_from_slice(&(events.len() as u32).to_le_bytes());
                for event in events {
                    out.extend_from_slice(&ledger::codec::encode_transfer(event));
                }
            }
        }
    }
    out
}

/// A cursor over an encoded entry; every read checks its bounds, because these bytes came off
/// the disk or the network.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < count {
            return Err(format!("truncated: wanted {count} bytes, {} left", self.bytes.len()));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

pub fn decode_request(bytes: &[u8]) -> Result<Request, String> {
    let mut cursor = Cursor { bytes };
    let version = cursor.u8()?;
    if version == REQUEST_FORMAT_SWITCH {
        let semantics = cursor.u32()?;
        if !cursor.bytes.is_empty() {
            return Err(format!("{} trailing bytes", cursor.bytes.len()));
        }
        return Ok(Request::switch_semantics(semantics));
    }
    if version != REQUEST_FORMAT_VERSION {
        return Err(format!("entry format version {version}, this build reads {REQUEST_FORMAT_VERSION}"));
    }
    let timestamp_proposed = cursor.u64()?;
    let batch_count = cursor.u32()? as usize;
    if batch_count > ENTRY_BATCHES_MAX {
        return Err(format!("{batch_count} batches in one entry"));
    }
    let mut batches = Vec::with_capacity(batch_count);
    for _ in 0..batch_count {
        let kind = cursor.u8()?;
        let count = cursor.u32()? as usize;
        if count > ledger::BATCH_EVENTS_MAX {
            return Err(format!("batch of {count} events"));
        }
        let records = cursor.take(count * ledger::codec::RECORD_BYTES)?;
        let records = records.chunks_exact(ledger::codec::RECORD_BYTES);
        batches.push(match kind {
            BATCH_KIND_ACCOUNTS => {
                Batch::CreateAccounts(records.map(decode_account_checked).collect::<Result<_, _>>()?)
            }
            BATCH_KIND_TRANSFERS => {
                Batch::CreateTransfers(records.map(ledger::codec::decode_transfer).collect())
            }
            kind => return Err(format!("batch kind {kind}")),
        });
    }
    if !cursor.bytes.is_empty() {
        return Err(format!("{} trailing bytes", cursor.bytes.len()));
    }
    Ok(Request::batches(timestamp_proposed, batches))
}

/// Accounts carry 4 reserved bytes that must be zero; the ledger's decoder asserts it, so an
/// entry from the wire is checked first.
fn decode_account_checked(record: &[u8]) -> Result<Account, String> {
    if record[108..112] != [0; 4] {
        return Err("account record with reserved bytes set".into());
    }
    Ok(ledger::codec::decode_account(record))
}

pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(response.replies.len() as u32).to_le_bytes());
    for reply in &response.replies {
        let (kind, results): (u8, Vec<(u32, u64)>) = match reply {
            BatchReply::CreateAccounts(r) => {
                (BATCH_KIND_ACCOUNTS, r.iter().map(|e| (e.result as u32, e.timestamp)).collect())
            }
            BatchReply::CreateTransfers(r) => {
                (BATCH_KIND_TRANSFERS, r.iter().map(|e| (e.result as u32, e.timestamp)).collect())
            }
        };
        out.push(kind);
        out.extend_from_slice(&(results.len() as u32).to_le_bytes());
        for (code, timestamp) in results {
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&timestamp.to_le_bytes());
        }
    }
    out
}

pub fn decode_response(bytes: &[u8]) -> Result<Response, String> {
    let mut cursor = Cursor { bytes };
    let count = cursor.u32()? as usize;
    let mut replies = Vec::with_capacity(count.min(ENTRY_BATCHES_MAX));
    for _ in 0..count {
        let kind = cursor.u8()?;
        let n = cursor.u32()? as usize;
        let mut pairs = Vec::with_capacity(n.min(ledger::BATCH_EVENTS_MAX));
        for _ in 0..n {
            pairs.push((cursor.u32()?, cursor.u64()?));
        }
        replies.push(match kind {
            BATCH_KIND_ACCOUNTS => BatchReply::CreateAccounts(
                pairs
                    .into_iter()
                    .map(|(code, timestamp)| {
                        let result =
                            CreateAccountResult::from_u32(code).ok_or(format!("account code {code}"))?;
                        Ok(EventResult { result, timestamp })
                    })
                    .collect::<Result<_, String>>()?,
            ),
            BATCH_KIND_TRANSFERS => BatchReply::CreateTransfers(
                pairs
                    .into_iter()
                    .map(|(code, timestamp)| {
                        let result =
                            CreateTransferResult::from_u32(code).ok_or(format!("transfer code {code}"))?;
                        Ok(EventResult { result, timestamp })
                    })
                    .collect::<Result<_, String>>()?,
            ),
            kind => return Err(format!("reply kind {kind}")),
        });
    }
    Ok(Response { replies })
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&encode_request(self))
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        decode_request(&bytes).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Response {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&encode_response(self))
    }
}

impl<'de> Deserialize<'de> for Response {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        decode_response(&bytes).map_err(serde::de::Error::custom)
    }
}

/// Encodes any Raft structure for the disk or the wire (postcard: compact, serde, no schema).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encoding into a Vec cannot fail")
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::Transfer;

    #[test]
    fn request_round_trip_and_damage() {
        let request = Request {
            timestamp_proposed: 42,
            batches: vec![
                Batch::CreateAccounts(vec![Account { id: 7, ledger: 1, code: 1, ..Account::default() }]),
                Batch::CreateTransfers(vec![Transfer { id: 9, amount: u128::MAX, ..Transfer::default() }; 3]),
            ],
            switch_semantics: None,
        };
        let bytes = encode_request(&request);
        assert_eq!(decode_request(&bytes).unwrap(), request);
        assert_eq!(decode::<Request>(&encode(&request)).unwrap(), request);
        for cut in 0..bytes.len() {
            assert!(decode_request(&bytes[..cut]).is_err(), "a request cut at {cut} decoded");
        }
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert!(decode_request(&wrong_version).is_err());
        let switch = Request::switch_semantics(2);
        let bytes = encode_request(&switch);
        assert_eq!(decode_request(&bytes).unwrap(), switch);
        for cut in 0..bytes.len() {
            assert!(decode_request(&bytes[..cut]).is_err(), "a switch cut at {cut} decoded");
        }
        assert!(decode_request(&[bytes.clone(), vec![0]].concat()).is_err(), "a switch with trailing bytes");
    }

    #[test]
    fn response_round_trip() {
        let response = Response {
            replies: vec![BatchReply::CreateTransfers(vec![EventResult {
                result: CreateTransferResult::ExceedsCredits,
                timestamp: 0,
            }])],
        };
        assert_eq!(decode::<Response>(&encode(&response)).unwrap(), response);
    }
}
