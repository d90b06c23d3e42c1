//! `tally-jepsen`: tally's chaos harness. It starts a cluster of real `tally serve` processes,
//! routes all node-to-node traffic through fault-injecting proxies it owns, runs payment
//! workloads against the nodes while a nemesis kills, pauses and cuts off whole sites, records
//! every operation as a JSON-lines history, and then checks that history: no acknowledged
//! payment lost, nothing applied twice, money conserved, limits held, reads fresh, nodes agreed.
//!
//! It speaks to tally only as a user and an operator would: gRPC through `tally-client`, and
//! signals to processes.
//!
//! A run (`run::run`) goes through the modules in this order:
//! - `nemesis::plan` draws the fault schedule from the seed;
//! - `cluster` plans every node, starts `proxy::Proxies` (one per directed link) and the
//!   `tally serve` processes, each routed to its peers through the proxies;
//! - `workload::Bank::open` creates and funds the accounts; `workload::Process`es then send
//!   payments and reads, each recorded by `workload::Recorder` into `history.jsonl`
//!   (`history::Record`) before it is sent and when it completes;
//! - with `--load`, `load::run` sends an open-loop stream of payments on a ledger of its own
//!   next to the bank, so that faults strike a busy cluster, recording each request;
//! - `nemesis::run` strikes and heals on schedule, recording each fault;
//! - with `--sample-metrics-ms`, `sampler::run` keeps what each node's metrics said;
//! - after the time limit, everything is healed, the final state is read back and recorded;
//! - `report::write` loads the history file (`history::History`), runs every `checker`, and
//!   writes the summary and the pictures (`plot`).

pub mod checker;
pub mod cluster;
pub mod history;
pub mod load;
pub mod nemesis;
pub mod plot;
pub mod proxy;
pub mod report;
pub mod run;
pub mod sampler;
pub mod stream;
pub mod workload;

/// The `tally` binary beside this program (target/<profile>/tally), if it is there.
pub fn tally_beside_me() -> Option<std::path::PathBuf> {
    let me = std::env::current_exe().ok()?;
    // A test binary lives one level deeper, in target/<profile>/deps.
    me.ancestors().skip(1).take(2).map(|dir| dir.join("tally")).find(|path| path.is_file())
}
