//! `tally-jepsen`: tally's chaos harness. It starts a cluster of real `tally serve` processes,
//! routes all node-to-node traffic through fault-injecting proxies it owns, runs payment
//! workloads against the nodes while a nemesis kills, pauses and cuts off whole sites, records
//! every operation as a JSON-lines history, and then checks that history: no acknowledged
//! payment lost, nothing applied twice, money conserved, limits held, reads fresh, nodes agreed.
//!
//! It speaks to tally only as a user and an operator would: gRPC through `tally-client`, and
//! signals to processes.

pub mod checker;
pub mod history;
