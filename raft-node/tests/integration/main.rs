//! raft-node's integration tests, in one binary: each was a binary of its own, and compiling and
//! linking ten of them (each with the node's library and the common helpers) took about a minute
//! and a half of every CI run. `wal_crash` stays apart: it runs itself again as the process it
//! kills. One module per theme: `cargo test --release -p raft-node --test integration cluster::`.

mod common;

mod backup;
mod cluster;
mod deploy;
mod first_hour;
mod fuzz;
mod liveness;
mod security;
mod storage_suite;
mod structure;
mod upgrade;
