//! tally's wire contract. The `.proto` files under `proto/tally/v1/` are the API reference; this
//! crate only holds the code generated from them, and nothing else: no business logic, no
//! conversions (those live in `raft-node`, at the edge).

/// Package `tally.v1`: the client API (`Ledger`), the operator API (`Cluster`) and node-to-node
/// Raft traffic (`Raft`).
pub mod v1 {
    tonic::include_proto!("tally.v1");
}

/// The encoded `FileDescriptorSet` of every tally `.proto` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tally_descriptor.bin"));
