//! The `tally` command line: run a node (`serve`), a local three-site cluster (`dev`), and the
//! client and operator commands, which talk gRPC through `tally-client` like any other client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tally_client::{Client, u128_from, u128_to, v1};

use crate::node::{NodeConfig, PeerConfig};

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
    Serve(ServeArgs),
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
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
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
}

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML file with the node's settings (same names as the flags, with underscores);
    /// flags given as well override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub id: Option<u64>,
    #[arg(long)]
    pub site: Option<String>,
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address others reach this node at (defaults to --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Cluster name; nodes refuse data and peers of another cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Start a new cluster with this node and the --peer nodes as voters.
    #[arg(long)]
    pub bootstrap: bool,
    /// Another initial voter, as ID=HOST:PORT@SITE (with --bootstrap).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<PeerConfig>,
    /// Join the cluster that the node at this address belongs to.
    #[arg(long)]
    pub join: Option<String>,
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    #[arg(long)]
    pub group_commit_delay_us: Option<u64>,
    #[arg(long)]
    pub snapshot_entries: Option<u64>,
    #[arg(long)]
    pub snapshot_log_keep: Option<u64>,
    /// Reach node ID at HOST:PORT instead of its advertised address, as ID=HOST:PORT
    /// (repeatable): for a NAT, a tunnel, or a fault-injecting proxy.
    #[arg(long = "route", value_parser = parse_route)]
    pub routes: Vec<(u64, String)>,
}

#[derive(Args)]
pub struct DevArgs {
    /// Where the three nodes keep their data.
    #[arg(long, default_value = "tally-dev")]
    pub dir: PathBuf,
    /// Node i listens on 127.0.0.1:(base_port + i).
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
}

#[derive(Subcommand)]
pub enum AccountCommand {
    Create {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u128,
        #[arg(long)]
        ledger: u32,
        #[arg(long)]
        code: u32,
        /// Comma-separated: linked, debits-must-not-exceed-credits, credits-must-not-exceed-debits,
        /// history, closed.
        #[arg(long, value_delimiter = ',')]
        flags: Vec<String>,
        #[arg(long, default_value_t = 0)]
        user_data_128: u128,
        #[arg(long, default_value_t = 0)]
        user_data_64: u64,
        #[arg(long, default_value_t = 0)]
        user_data_32: u32,
    },
}

#[derive(Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub id: u128,
    #[arg(long, default_value_t = 0)]
    pub debit: u128,
    #[arg(long, default_value_t = 0)]
    pub credit: u128,
    /// For --post: omit to post the whole pending amount.
    #[arg(long)]
    pub amount: Option<u128>,
    #[arg(long, default_value_t = 0)]
    pub ledger: u32,
    #[arg(long, default_value_t = 0)]
    pub code: u32,
    /// Reserve the amount; post or void it later.
    #[arg(long)]
    pub pending: bool,
    /// Seconds after which a pending transfer expires.
    #[arg(long, default_value_t = 0)]
    pub timeout: u32,
    /// Post the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["void", "pending"])]
    pub post: Option<u128>,
    /// Void the pending transfer with this id.
    #[arg(long, conflicts_with_all = ["post", "pending"])]
    pub void: Option<u128>,
    /// Extra flags, comma-separated: balancing-debit, balancing-credit, closing-debit, closing-credit.
    #[arg(long, value_delimiter = ',')]
    pub flags: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub user_data_128: u128,
    #[arg(long, default_value_t = 0)]
    pub user_data_64: u64,
    #[arg(long, default_value_t = 0)]
    pub user_data_32: u32,
}

#[derive(Subcommand)]
pub enum LookupCommand {
    Account {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(required = true)]
        ids: Vec<u128>,
    },
    Transfer {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(required = true)]
        ids: Vec<u128>,
    },
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub account: u128,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Newest first.
    #[arg(long)]
    pub reversed: bool,
    /// Show the balances after each transfer (accounts with the history flag).
    #[arg(long)]
    pub balances: bool,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    Status {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add a node: it joins as a learner, catches up, then becomes a voter (unless --learner).
    Add {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        address: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        learner: bool,
        /// Accept a placement where losing one site loses the voter majority.
        #[arg(long)]
        force: bool,
    },
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        force: bool,
    },
    TransferLeader {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        to: u64,
    },
}

fn parse_peer(text: &str) -> Result<PeerConfig, String> {
    let error = || format!("'{text}': expected ID=HOST:PORT@SITE, e.g. 2=127.0.0.1:7102@site-b");
    let (id, rest) = text.split_once('=').ok_or_else(error)?;
    let (address, site) = rest.rsplit_once('@').ok_or_else(error)?;
    let id = id.parse().map_err(|_| error())?;
    if address.is_empty() || site.is_empty() {
        return Err(error());
    }
    Ok(PeerConfig { id, address: address.to_string(), site: site.to_string() })
}

fn parse_route(text: &str) -> Result<(u64, String), String> {
    let error = || format!("'{text}': expected ID=HOST:PORT, e.g. 2=127.0.0.1:9102");
    let (id, address) = text.split_once('=').ok_or_else(error)?;
    let id = id.parse().map_err(|_| error())?;
    if address.is_empty() {
        return Err(error());
    }
    Ok((id, address.to_string()))
}

/// Builds the node configuration from the file (if any) and the flags.
pub fn node_config(args: ServeArgs) -> Result<NodeConfig, String> {
    let file = args.config.as_deref().map(crate::node::read_config_file).transpose()?;
    let missing = |name: &str| format!("--{name} is required (or set it in --config)");
    let config = NodeConfig {
        id: args.id.or(file.as_ref().map(|f| f.id)).ok_or_else(|| missing("id"))?,
        site: args.site.or(file.as_ref().map(|f| f.site.clone())).ok_or_else(|| missing("site"))?,
        listen: args.listen.or(file.as_ref().map(|f| f.listen)).ok_or_else(|| missing("listen"))?,
        advertise: args.advertise.or(file.as_ref().and_then(|f| f.advertise.clone())),
        data_dir: args
            .data_dir
            .or(file.as_ref().map(|f| f.data_dir.clone()))
            .ok_or_else(|| missing("data-dir"))?,
        cluster: args.cluster.or(file.as_ref().map(|f| f.cluster.clone())).unwrap_or_else(|| "tally".into()),
        bootstrap: args.bootstrap || file.as_ref().is_some_and(|f| f.bootstrap),
        peers: if args.peers.is_empty() {
            file.as_ref().map(|f| f.peers.clone()).unwrap_or_default()
        } else {
            args.peers
        },
        join: args.join.or(file.as_ref().and_then(|f| f.join.clone())),
        election_timeout_ms: args
            .election_timeout_ms
            .or(file.as_ref().map(|f| f.election_timeout_ms))
            .unwrap_or(150),
        heartbeat_ms: args.heartbeat_ms.or(file.as_ref().map(|f| f.heartbeat_ms)).unwrap_or(50),
        group_commit_delay_us: args
            .group_commit_delay_us
            .or(file.as_ref().map(|f| f.group_commit_delay_us))
            .unwrap_or(0),
        snapshot_entries: args
            .snapshot_entries
            .or(file.as_ref().map(|f| f.snapshot_entries))
            .unwrap_or(20_000),
        snapshot_log_keep: args
            .snapshot_log_keep
            .or(file.as_ref().map(|f| f.snapshot_log_keep))
            .unwrap_or(1000),
        routes: if args.routes.is_empty() {
            file.as_ref().map(|f| f.routes.clone()).unwrap_or_default()
        } else {
            args.routes.into_iter().collect()
        },
    };
    if config.id == 0 {
        return Err("--id must not be 0".into());
    }
    if config.cluster.is_empty()
        || !config.cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("--cluster '{}': use letters, digits, '-' and '_'", config.cluster));
    }
    if config.site.is_empty() {
        return Err("--site must not be empty".into());
    }
    if config.heartbeat_ms == 0 || config.election_timeout_ms <= config.heartbeat_ms * 2 {
        return Err("--election-timeout-ms must be more than twice --heartbeat-ms".into());
    }
    Ok(config)
}

pub async fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    let config = match node_config(args) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    let id = config.id;
    let listen = config.listen;
    let node = match crate::node::start(config).await {
        Ok(node) => node,
        Err(error) => return fail(&error),
    };
    eprintln!("tally: node {id} serving on {listen}");
    tokio::spawn(crate::node::log_leadership(node.clone()));
    match crate::node::serve(node, crate::node::shutdown_signal()).await {
        Ok(()) => {
            eprintln!("tally: node {id} stopped");
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// Logs to stderr, filtered by `TALLY_LOG` (tracing's env-filter syntax); by default this
/// node's own events and Raft's warnings and errors.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,raft_node=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

fn fail(message: &str) -> ExitCode {
    eprintln!("tally: error: {message}");
    ExitCode::FAILURE
}

fn client(args: &ClientArgs) -> Result<Client, String> {
    Client::new(&args.nodes, Duration::from_millis(args.timeout_ms))
}

fn consistency(args: &ClientArgs) -> v1::ReadConsistency {
    if args.local { v1::ReadConsistency::Local } else { v1::ReadConsistency::Linearizable }
}

fn account_flags(names: &[String]) -> Result<u32, String> {
    use v1::AccountFlag as F;
    names.iter().filter(|n| !n.is_empty()).try_fold(0u32, |flags, name| {
        let flag = match name.as_str() {
            "linked" => F::Linked,
            "debits-must-not-exceed-credits" => F::DebitsMustNotExceedCredits,
            "credits-must-not-exceed-debits" => F::CreditsMustNotExceedDebits,
            "history" => F::History,
            "closed" => F::Closed,
            other => return Err(format!("unknown account flag '{other}'")),
        };
        Ok(flags | flag as u32)
    })
}

fn transfer_flags(args: &TransferArgs) -> Result<u32, String> {
    use v1::TransferFlag as F;
    let mut flags = 0u32;
    if args.pending {
        flags |= F::Pending as u32;
    }
    if args.post.is_some() {
        flags |= F::PostPendingTransfer as u32;
    }
    if args.void.is_some() {
        flags |= F::VoidPendingTransfer as u32;
    }
    for name in args.flags.iter().filter(|n| !n.is_empty()) {
        flags |= match name.as_str() {
            "linked" => F::Linked,
            "balancing-debit" => F::BalancingDebit,
            "balancing-credit" => F::BalancingCredit,
            "closing-debit" => F::ClosingDebit,
            "closing-credit" => F::ClosingCredit,
            other => return Err(format!("unknown transfer flag '{other}'")),
        } as u32;
    }
    Ok(flags)
}

fn status_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

/// Prints the results of a create and returns failure unless every event is ok or exists.
fn report_results(json: bool, results: &[(String, u64)]) -> ExitCode {
    if json {
        let items: Vec<_> = results
            .iter()
            .map(|(status, timestamp)| json!({"status": status, "timestamp": timestamp}))
            .collect();
        println!("{}", serde_json::Value::Array(items));
    } else {
        let mut table = table(&["event", "result", "timestamp"]);
        for (index, (status, timestamp)) in results.iter().enumerate() {
            table.add_row(vec![index.to_string(), status.clone(), timestamp.to_string()]);
        }
        println!("{table}");
    }
    if results.iter().all(|(status, _)| status == "ok" || status == "exists") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY).set_header(header.to_vec());
    table
}

fn account_json(a: &v1::Account) -> serde_json::Value {
    json!({
        "id": u128_from(a.id.as_ref()).to_string(),
        "ledger": a.ledger, "code": a.code, "flags": a.flags,
        "debits_pending": u128_from(a.debits_pending.as_ref()).to_string(),
        "debits_posted": u128_from(a.debits_posted.as_ref()).to_string(),
        "credits_pending": u128_from(a.credits_pending.as_ref()).to_string(),
        "credits_posted": u128_from(a.credits_posted.as_ref()).to_string(),
        "user_data_128": u128_from(a.user_data_128.as_ref()).to_string(),
        "user_data_64": a.user_data_64, "user_data_32": a.user_data_32,
        "timestamp": a.timestamp,
    })
}

fn transfer_json(t: &v1::Transfer) -> serde_json::Value {
    json!({
        "id": u128_from(t.id.as_ref()).to_string(),
        "debit_account_id": u128_from(t.debit_account_id.as_ref()).to_string(),
        "credit_account_id": u128_from(t.credit_account_id.as_ref()).to_string(),
        "amount": u128_from(t.amount.as_ref()).to_string(),
        "pending_id": u128_from(t.pending_id.as_ref()).to_string(),
        "ledger": t.ledger, "code": t.code, "flags": t.flags, "timeout": t.timeout,
        "user_data_128": u128_from(t.user_data_128.as_ref()).to_string(),
        "user_data_64": t.user_data_64, "user_data_32": t.user_data_32,
        "timestamp": t.timestamp,
    })
}

fn print_accounts(json: bool, accounts: &[v1::Account]) {
    if json {
        println!("{}", serde_json::Value::Array(accounts.iter().map(account_json).collect()));
        return;
    }
    let mut table = table(&[
        "id",
        "ledger",
        "code",
        "debits pending",
        "debits posted",
        "credits pending",
        "credits posted",
        "flags",
    ]);
    for a in accounts {
        table.add_row(vec![
            u128_from(a.id.as_ref()).to_string(),
            a.ledger.to_string(),
            a.code.to_string(),
            u128_from(a.debits_pending.as_ref()).to_string(),
            u128_from(a.debits_posted.as_ref()).to_string(),
            u128_from(a.credits_pending.as_ref()).to_string(),
            u128_from(a.credits_posted.as_ref()).to_string(),
            format!("{:#x}", a.flags),
        ]);
    }
    println!("{table}");
}

fn print_transfers(json: bool, transfers: &[v1::Transfer]) {
    if json {
        println!("{}", serde_json::Value::Array(transfers.iter().map(transfer_json).collect()));
        return;
    }
    let mut table =
        table(&["id", "debit", "credit", "amount", "pending id", "ledger", "code", "flags", "timestamp"]);
    for t in transfers {
        table.add_row(vec![
            u128_from(t.id.as_ref()).to_string(),
            u128_from(t.debit_account_id.as_ref()).to_string(),
            u128_from(t.credit_account_id.as_ref()).to_string(),
            u128_from(t.amount.as_ref()).to_string(),
            u128_from(t.pending_id.as_ref()).to_string(),
            t.ledger.to_string(),
            t.code.to_string(),
            format!("{:#x}", t.flags),
            t.timestamp.to_string(),
        ]);
    }
    println!("{table}");
}

fn print_status(json: bool, status: &v1::StatusReply) {
    if json {
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id, "address": n.address, "site": n.site,
                    "role": status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
                    "leader": n.is_leader, "reachable": n.reachable, "term": n.term,
                    "last_log_index": n.last_log_index, "applied_index": n.applied_index,
                    "replication_lag": n.replication_lag, "state_digest": n.state_digest,
                })
            })
            .collect();
        let sites: Vec<_> = status
            .sites
            .iter()
            .map(|s| json!({"site": s.site, "voters": s.voters, "learners": s.learners, "survives_loss": s.survives_loss}))
            .collect();
        let value = json!({"leader_id": status.leader_id, "term": status.term, "committed_index": status.committed_index, "nodes": nodes, "sites": sites});
        println!("{value}");
        return;
    }
    println!(
        "leader: node {}   term: {}   committed index: {}",
        status.leader_id, status.term, status.committed_index
    );
    let mut nodes = table(&[
        "id", "address", "site", "role", "leader", "up", "term", "last log", "applied", "lag", "digest",
    ]);
    for n in &status.nodes {
        nodes.add_row(vec![
            n.id.to_string(),
            n.address.clone(),
            n.site.clone(),
            status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
            if n.is_leader { "*".into() } else { String::new() },
            if n.reachable { "yes".into() } else { "NO".into() },
            n.term.to_string(),
            n.last_log_index.to_string(),
            n.applied_index.to_string(),
            n.replication_lag.to_string(),
            n.state_digest.chars().take(12).collect(),
        ]);
    }
    println!("{nodes}");
    let mut sites = table(&["site", "voters", "learners", "survives its loss"]);
    for s in &status.sites {
        sites.add_row(vec![
            s.site.clone(),
            s.voters.to_string(),
            s.learners.to_string(),
            if s.survives_loss { "yes".into() } else { "NO".into() },
        ]);
    }
    println!("{sites}");
}

async fn run_client(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Account(AccountCommand::Create {
            client: args,
            id,
            ledger,
            code,
            flags,
            user_data_128,
            user_data_64,
            user_data_32,
        }) => {
            let account = v1::Account {
                id: u128_to(id),
                ledger,
                code,
                flags: account_flags(&flags)?,
                user_data_128: u128_to(user_data_128),
                user_data_64,
                user_data_32,
                ..v1::Account::default()
            };
            let results = client(&args)?.create_accounts(vec![account]).await.map_err(|e| e.to_string())?;
            let named = results
                .iter()
                .map(|r| (status_name(r.status().as_str_name(), "CREATE_ACCOUNT_STATUS_"), r.timestamp))
                .collect::<Vec<_>>();
            Ok(report_results(args.json, &named))
        }
        Command::Transfer(args) => {
            let flags = transfer_flags(&args)?;
            let settle = args.post.or(args.void);
            let amount = match (args.amount, args.post) {
                (Some(amount), _) => amount,
                (None, Some(_)) => u128::MAX,
                (None, None) if args.void.is_some() => 0,
                (None, None) => return Err("--amount is required".into()),
            };
            let transfer = v1::Transfer {
                id: u128_to(args.id),
                debit_account_id: u128_to(args.debit),
                credit_account_id: u128_to(args.credit),
                amount: u128_to(amount),
                pending_id: u128_to(settle.unwrap_or(0)),
                user_data_128: u128_to(args.user_data_128),
                user_data_64: args.user_data_64,
                user_data_32: args.user_data_32,
                timeout: args.timeout,
                ledger: args.ledger,
                code: args.code,
                flags,
                timestamp: 0,
            };
            let results =
                client(&args.client)?.create_transfers(vec![transfer]).await.map_err(|e| e.to_string())?;
            let named = results
                .iter()
                .map(|r| (status_name(r.status().as_str_name(), "CREATE_TRANSFER_STATUS_"), r.timestamp))
                .collect::<Vec<_>>();
            Ok(report_results(args.client.json, &named))
        }
        Command::Lookup(LookupCommand::Account { client: args, ids }) => {
            let accounts =
                client(&args)?.lookup_accounts(&ids, consistency(&args)).await.map_err(|e| e.to_string())?;
            print_accounts(args.json, &accounts);
            Ok(if accounts.len() == ids.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Lookup(LookupCommand::Transfer { client: args, ids }) => {
            let transfers =
                client(&args)?.lookup_transfers(&ids, consistency(&args)).await.map_err(|e| e.to_string())?;
            print_transfers(args.json, &transfers);
            Ok(if transfers.len() == ids.len() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::History(args) => {
            use v1::AccountFilterFlag as F;
            let mut flags = F::Debits as u32 | F::Credits as u32;
            if args.reversed {
                flags |= F::Reversed as u32;
            }
            let filter = v1::AccountFilter {
                account_id: u128_to(args.account),
                limit: args.limit,
                flags,
                consistency: consistency(&args.client) as i32,
                ..v1::AccountFilter::default()
            };
            let client = client(&args.client)?;
            if args.balances {
                let balances = client.get_account_balances(filter).await.map_err(|e| e.to_string())?;
                print_balances(args.client.json, &balances);
            } else {
                let transfers = client.get_account_transfers(filter).await.map_err(|e| e.to_string())?;
                print_transfers(args.client.json, &transfers);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(command) => run_cluster(command).await,
        Command::Serve(_) | Command::Dev(_) => unreachable!("not a client command"),
    }
}

fn print_balances(json: bool, balances: &[v1::AccountBalance]) {
    let row = |b: &v1::AccountBalance| {
        [
            u128_from(b.debits_pending.as_ref()).to_string(),
            u128_from(b.debits_posted.as_ref()).to_string(),
            u128_from(b.credits_pending.as_ref()).to_string(),
            u128_from(b.credits_posted.as_ref()).to_string(),
        ]
    };
    if json {
        let items: Vec<_> = balances
            .iter()
            .map(|b| {
                let [dp, dpo, cp, cpo] = row(b);
                json!({"timestamp": b.timestamp, "debits_pending": dp, "debits_posted": dpo, "credits_pending": cp, "credits_posted": cpo})
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return;
    }
    let mut table =
        table(&["timestamp", "debits pending", "debits posted", "credits pending", "credits posted"]);
    for b in balances {
        let mut cells = vec![b.timestamp.to_string()];
        cells.extend(row(b));
        table.add_row(cells);
    }
    println!("{table}");
}

async fn run_cluster(command: ClusterCommand) -> Result<ExitCode, String> {
    let (args, status) = match command {
        ClusterCommand::Status { client: args } => {
            let status = client(&args)?.cluster_status().await;
            (args, status)
        }
        ClusterCommand::Add { client: args, id, address, site, learner, force } => {
            let request = v1::AddNodeRequest { id, address, site, learner_only: learner, force };
            let status = client(&args)?.add_node(request).await;
            (args, status)
        }
        ClusterCommand::Remove { client: args, id, force } => {
            let status = client(&args)?.remove_node(v1::RemoveNodeRequest { id, force }).await;
            (args, status)
        }
        ClusterCommand::TransferLeader { client: args, to } => {
            let status = client(&args)?.transfer_leader(to).await;
            (args, status)
        }
    };
    let status = status.map_err(|e| e.to_string())?;
    print_status(args.json, &status);
    Ok(ExitCode::SUCCESS)
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => crate::dev::run(args).await,
        command => match run_client(command).await {
            Ok(code) => code,
            Err(error) => fail(&error),
        },
    }
}
