//! The `tally` command line, one file per command group:
//!
//! - `serve`: run one node; `dev`: a local three-site cluster of `serve` processes;
//! - `benchmark`: drive load at a cluster (its own or `--nodes`) and report throughput and latency;
//! - `ledger`: accounts, transfers, lookups and history; `cluster`: status and membership.
//!
//! Client and operator commands talk gRPC through `tally-client`, like any other client.

mod backup;
mod benchmark;
mod certs;
mod cluster;
mod dev;
mod explain;
mod ledger;
mod serve;
mod words;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tally_client::{Client, Security, v1};

pub use backup::{BackupArgs, RestoreArgs};
pub use benchmark::BenchmarkArgs;
pub use certs::CertsCommand;
pub use cluster::ClusterCommand;
pub use dev::DevArgs;
pub use ledger::{AccountCommand, HistoryArgs, LookupCommand, QueryCommand, TransferArgs, WatchArgs};
pub use serve::{ServeArgs, node_config};

/// The dev cluster's client ports, which are also the client commands' default nodes.
pub const DEV_NODES: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

#[derive(Parser)]
#[command(name = "tally", version, about = "tally: a replicated ledger database for payment services")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one node.
    Serve(Box<ServeArgs>),
    /// Run a local cluster of three nodes in three sites, for trying tally out.
    Dev(DevArgs),
    /// Create accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Create a transfer: a plain or pending one, or the post or void of a pending one.
    Transfer(TransferArgs),
    /// Look up accounts or transfers by id.
    #[command(subcommand)]
    Lookup(LookupCommand),
    /// An account's transfers (or balances after each, with --balances).
    History(HistoryArgs),
    /// Accounts or transfers selected by their fields (user data, ledger, code).
    #[command(subcommand)]
    Query(QueryCommand),
    /// Follow the change stream: every event (account created, transfer, expiry) with the
    /// balances after it, from the start or from --from, then each new one; survives a node
    /// going away.
    Watch(WatchArgs),
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Measure throughput and latency: a fresh local cluster, or the nodes given.
    Benchmark(BenchmarkArgs),
    /// Make a cluster's CA and its node, operator and client certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Back up a running cluster's state to a file (from a follower), or check a backup file.
    Backup(BackupArgs),
    /// Seed one node's data directory of a new cluster from a backup file.
    Restore(RestoreArgs),
}

impl Command {
    /// A command that talks to a cluster or makes files and prints, but serves nothing and
    /// starts no node.
    pub fn prints_only(&self) -> bool {
        !matches!(self, Command::Serve(_) | Command::Dev(_) | Command::Benchmark(_))
    }
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Node addresses (host:port), comma-separated; any of them may be down.
    #[arg(long, env = "TALLY_NODES", default_value = DEV_NODES, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Give up after this long, retries included.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Read from the answering node's state, possibly stale, instead of a linearizable read.
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How a command connects to the nodes' client doors.
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// The cluster's CA certificate (PEM). Default: `tally dev`'s, if ./tally-dev/certs exists.
    #[arg(long, env = "TALLY_CA")]
    pub ca: Option<PathBuf>,
    /// A client or operator certificate (PEM) to prove a role: changing the cluster needs an
    /// operator's. Default with `tally dev`'s CA: its operator certificate.
    #[arg(long, env = "TALLY_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, env = "TALLY_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Plaintext, for a cluster started with --insecure.
    #[arg(long, env = "TALLY_INSECURE", conflicts_with_all = ["ca", "cert", "key"])]
    pub insecure: bool,
}

/// How the operator of a local cluster connects, with the certificates `make_local` made in `dir`.
pub fn local_operator(dir: &Path) -> Result<Security, String> {
    let operator = crate::security::roles::Role::Operator(crate::security::certs::LOCAL_OPERATOR.into());
    let (cert, key) = crate::security::certs::paths(dir, &operator);
    Security::from_files(&dir.join(crate::security::certs::CA_CERT), Some((&cert, &key)))
}

/// Where `tally dev` keeps its certificates, relative to its --dir.
pub const DEV_CERTS: &str = "certs";

impl TlsArgs {
    pub fn security(&self) -> Result<Security, String> {
        if self.insecure {
            return Ok(Security::Insecure);
        }
        let identity = self.cert.as_deref().zip(self.key.as_deref());
        if let Some(ca) = &self.ca {
            return Security::from_files(ca, identity);
        }
        let dev = Path::new(dev::DIR_DEFAULT).join(DEV_CERTS);
        if dev.join(crate::security::certs::CA_CERT).exists() {
            return match identity {
                Some(identity) => {
                    Security::from_files(&dev.join(crate::security::certs::CA_CERT), Some(identity))
                }
                None => local_operator(&dev),
            };
        }
        Err(format!(
            "no CA certificate to check the nodes with: pass --ca FILE (with --cert and --key for a \
             client or operator certificate; `tally certs`), run from the directory of `tally dev` (it \
             keeps its own in {}/{DEV_CERTS}), or --insecure for a cluster started with --insecure",
            dev::DIR_DEFAULT
        ))
    }
}

fn or_fail(result: Result<ExitCode, String>) -> ExitCode {
    result.unwrap_or_else(|error| fail(&error))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("tally: error: {message}");
    ExitCode::FAILURE
}

fn client(args: &ClientArgs) -> Result<Client, String> {
    Client::new(&args.nodes, Duration::from_millis(args.timeout_ms), &args.tls.security()?)
}

fn consistency(args: &ClientArgs) -> v1::ReadConsistency {
    if args.local { v1::ReadConsistency::Local } else { v1::ReadConsistency::Linearizable }
}

/// A ledger timestamp (ns since the Unix epoch) as RFC 3339 in UTC with nanoseconds, as tables
/// show it (`--json` keeps the number); 0, which no applied event has, as "-".
fn rfc3339(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ns.to_string())
}

fn status_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY).set_header(header.to_vec());
    table
}

/// Runs a command on a multi-threaded runtime of its own until it ends. The binary calls this
/// rather than `run`: a plain function of this crate keeps the whole async call tree's code in the
/// library, where a `block_on(run(..))` in the binary had every future compiled again there in a
/// release build (2m43s of the build, for the binary alone).
pub fn run_to_end(cli: Cli) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run(cli))
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Benchmark(args) => benchmark::run(args).await,
        Command::Certs(command) => or_fail(certs::run(command)),
        Command::Backup(args) => or_fail(backup::run_backup(args).await),
        Command::Restore(args) => or_fail(backup::run_restore(args)),
        Command::Cluster(command) => or_fail(cluster::run(command).await),
        command => or_fail(ledger::run(command).await),
    }
}

/// A duration such as 10s, 500ms, 2m or 1h (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let error = || format!("'{text}': expected a duration such as 10s, 500ms, 2m or 1h");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number.parse().map_err(|_| error())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(error()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_as_rfc3339() {
        assert_eq!(rfc3339(1_796_128_768_389_841_106), "2026-12-01T12:39:28.389841106Z");
        assert_eq!(rfc3339(1_000_000_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(0), "-");
    }

    #[test]
    fn durations_parse_with_units() {
        let check = |text: &str, expected: Option<Duration>| {
            assert_eq!(parse_duration(text).ok(), expected, "{text}")
        };
        check("10s", Some(Duration::from_secs(10)));
        check("10", Some(Duration::from_secs(10)));
        check("500ms", Some(Duration::from_millis(500)));
        check("2m", Some(Duration::from_secs(120)));
        check("1.5s", Some(Duration::from_millis(1500)));
        check("ten", None);
        check("5h", Some(Duration::from_secs(5 * 3600)));
        check("0s", Some(Duration::ZERO));
        check("5d", None);
        check("-1s", None);
    }
}
