//! Fuzz targets for every decoder fed from the network or the disk (bolero). Under `cargo test`
//! each runs `ITERATIONS` random inputs on the stable toolchain; a long run sets
//! `BOLERO_RANDOM_ITERATIONS` (docs/testing.md, "Fuzzing"). Each target asserts more
//! than "no panic" where it can: what a decoder accepts must be what was written, or must
//! re-encode to the same bytes.
//!
//! An input a long run finds that crashes a target becomes a regression test of its own here.

use bolero::check;
use prost::Message;
use raft_node::types::{Entry, TypeConfig, decode_request, encode_request};
use tally_proto::v1 as pb;

/// Random inputs per target under `cargo test` (BOLERO_RANDOM_ITERATIONS overrides it).
const ITERATIONS: usize = 2_000;

fn raft_message(payload: &[u8]) -> pb::RaftMessage {
    pb::RaftMessage {
        version: raft_node::net::raft::RAFT_MESSAGE_VERSION,
        payload: payload.to_vec(),
        applied_index: None,
    }
}

/// Every Raft message a peer can send, request or reply: decoded and bounds-checked, never a
/// panic; whatever is accepted has terms and indexes within bounds.
fn raft_messages(bytes: &[u8]) {
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, VoteRequest,
        VoteResponse,
    };
    use raft_node::net::raft::unpack;
    let message = raft_message(bytes);
    let _ = unpack::<AppendEntriesRequest<TypeConfig>>(&message);
    let _ = unpack::<AppendEntriesResponse<TypeConfig>>(&message);
    let _ = unpack::<VoteRequest<TypeConfig>>(&message);
    let _ = unpack::<VoteResponse<TypeConfig>>(&message);
    let _ = unpack::<TransferLeaderRequest<TypeConfig>>(&message);
    let _ = unpack::<SnapshotResponse<TypeConfig>>(&message);
    let _ = raft_node::net::raft::snapshot_header(&message);
}

#[test]
fn raft_messages_from_peers() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| raft_messages(bytes));
}

/// An entry's application data (our own compact encoding): decoded or refused, and what is
/// accepted encodes back to the same bytes.
#[test]
fn entry_requests() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        if let Ok(request) = decode_request(bytes) {
            assert_eq!(encode_request(&request), bytes, "decoded {request} from bytes it does not encode to");
        }
        let _ = raft_node::types::decode::<Entry>(bytes);
    });
}

/// A snapshot stream (from a leader, or a file on disk): `verify` and `import` agree, and an
/// import that fails leaves the store empty.
#[test]
fn snapshot_streams() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        let verified = ledger::snapshot::verify(bytes);
        let mut store = ledger::MemStore::new();
        let imported = ledger::snapshot::import(&mut store, bytes);
        assert_eq!(
            verified.is_ok(),
            imported.is_ok(),
            "verify and import disagree: {verified:?} / {imported:?}"
        );
        if imported.is_err() {
            assert!(ledger::Store::is_empty(&store).unwrap(), "a failed import left records behind");
        }
    });
}

/// A real snapshot with bytes flipped: never accepted unless the flips cancel out.
#[test]
fn damaged_snapshots() {
    let mut ledger = ledger::Ledger::open(ledger::MemStore::new()).unwrap();
    let batch = ledger::Batch::CreateAccounts(
        (1..=20u128).map(|id| ledger::Account { id, ledger: 1, code: 1, ..Default::default() }).collect(),
    );
    ledger.apply(&[batch], 1_000, None).unwrap();
    let mut original = Vec::new();
    ledger::snapshot::export(ledger.store(), &mut original).unwrap();
    check!().with_iterations(ITERATIONS).with_type::<Vec<(u16, u8)>>().for_each(|flips| {
        let mut bytes = original.clone();
        for (at, bits) in flips {
            let at = *at as usize % bytes.len();
            bytes[at] ^= bits;
        }
        if bytes != original {
            assert!(ledger::snapshot::verify(&bytes[..]).is_err(), "a damaged snapshot was verified");
        }
    });
}

/// What a client sends: protobuf decoding, then the one conversion to ledger types. Never a
/// panic; a conversion refuses with INVALID_ARGUMENT or succeeds.
#[test]
fn client_requests() {
    check!().with_iterations(ITERATIONS).for_each(|bytes: &[u8]| {
        if let Ok(request) = pb::CreateTransfersRequest::decode(bytes)
            && let Err(status) = raft_node::convert::transfers_from(&request.transfers)
        {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
        if let Ok(request) = pb::CreateAccountsRequest::decode(bytes)
            && let Err(status) = raft_node::convert::accounts_from(&request.accounts)
        {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
        if let Ok(filter) = pb::AccountFilter::decode(bytes) {
            let _ = raft_node::convert::filter_from(&filter);
        }
    });
}

/// WAL segments read back from disk: a log of a few records with bytes flipped at rest. Opening
/// may refuse (damage) or drop a torn tail, but every record it returns is one that was written,
/// at its index: damage is never served.
#[test]
fn damaged_wal_segments() {
    use raft_node::storage::wal::Wal;
    check!().with_iterations(ITERATIONS / 4).with_type::<(Vec<Vec<u8>>, Vec<(u16, u8)>)>().for_each(
        |(payloads, flips)| {
            let payloads: Vec<&Vec<u8>> = payloads.iter().take(8).collect();
            let dir = tempfile::tempdir().unwrap();
            {
                let mut wal = Wal::open(dir.path()).unwrap();
                for (index, payload) in payloads.iter().enumerate() {
                    wal.append(index as u64 + 1, payload).unwrap();
                }
                wal.sync().unwrap();
            }
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "wal") {
                    let mut bytes = std::fs::read(&path).unwrap();
                    for (at, bits) in flips {
                        let at = *at as usize % bytes.len();
                        bytes[at] ^= bits;
                    }
                    std::fs::write(&path, bytes).unwrap();
                }
            }
            let Ok(wal) = Wal::open(dir.path()) else { return };
            let (Some(first), Some(last)) = (wal.first_index(), wal.last_index()) else { return };
            let Ok(records) = wal.read(first, last + 1) else { return };
            for (index, payload) in records {
                assert_eq!(
                    Some(&&payload),
                    payloads.get(index as usize - 1),
                    "record {index} came back other than it was written"
                );
            }
        },
    );
}
