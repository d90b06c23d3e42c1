//! `tally serve`: run one node from flags or a TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::node::{NodeConfig, PeerConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML file with the node's settings (same names as the flags, with underscores);
    /// flags given as well override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id (a positive number, unique in the cluster, never reused for another machine).
    #[arg(long)]
    pub id: Option<u64>,
    /// The site (data center, zone) it runs in: voters are spread so that losing one site keeps
    /// a majority.
    #[arg(long)]
    pub site: Option<String>,
    /// The client door: the address clients and operators call (tally.v1.Ledger and
    /// tally.v1.Cluster).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address clients and operators reach the client door at (defaults to --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The peer door: the address other nodes of the cluster call (tally.v1.Raft and forwarded
    /// requests), for this cluster's nodes only.
    #[arg(long)]
    pub peer_listen: Option<SocketAddr>,
    /// Address other nodes reach the peer door at (defaults to --peer-listen).
    #[arg(long)]
    pub peer_advertise: Option<String>,
    /// The cluster's CA certificate (PEM): peers and client certificates must chain to it.
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM, from `tally certs node`); reloaded on SIGHUP.
    #[arg(long, requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM); reloaded on SIGHUP.
    #[arg(long, requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// Plaintext on both doors, and anyone who reaches them may write, change the membership or
    /// pose as a node. Test machines only.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    pub insecure: bool,
    /// Connections each door holds at a time; one more is closed at once (default 4096).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a connection may send and receive nothing before it is closed (default 300).
    #[arg(long)]
    pub idle_timeout_s: Option<u64>,
    /// Bytes of events submitted to this node and not answered yet, e.g. 256MiB (the default);
    /// past it writes are refused with RESOURCE_EXHAUSTED.
    #[arg(long, value_parser = parse_limit)]
    pub max_queued_bytes: Option<u64>,
    /// The longest a write may wait in the leader's queue (default 50): while writes wait longer,
    /// the cluster is at capacity and new ones are refused at once with RESOURCE_EXHAUSTED and a
    /// retry hint, instead of queueing for seconds.
    #[arg(long)]
    pub max_queue_wait_ms: Option<u64>,
    /// How far behind in applying the follower that would take over may be, in ms, before a
    /// leader holds back new entries (default 1000; 0 never): a new leader answers writes only
    /// once it has applied what it lacks.
    #[arg(long)]
    pub pace_lag_ms: Option<u64>,
    /// How far behind in applying any voter that answers may be, in ms, before a leader holds
    /// back new entries (default 0: no bound beyond --pace-lag-ms). With a bound, a voter that
    /// fell behind while another could take over (or while it was the only follower) is brought
    /// back within it before the next fault needs it, at the cost of the cluster's pace.
    #[arg(long)]
    pub pace_lag_all_ms: Option<u64>,
    /// How long one entry of writes should take the leader to apply, in ms (default 100; 0: no
    /// cut): entries are cut to what it applies in that long, so that a write waits for little
    /// work ahead of it. Larger carries more at capacity on a busy machine; smaller answers
    /// sooner.
    #[arg(long)]
    pub entry_apply_target_ms: Option<u64>,
    /// Bytes of requests the client door receives at a time over all connections, e.g. 256MiB
    /// (the default; at least 8MiB); past it a request is refused with RESOURCE_EXHAUSTED.
    #[arg(long, value_parser = parse_limit)]
    pub max_receiving_bytes: Option<u64>,
    /// Change-stream subscribers served at a time (default 256); one more is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long)]
    pub max_subscribers: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, read-only: bind it to the
    /// monitoring network).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The largest snapshot this node accepts from a leader, e.g. 512GiB (default 1TiB).
    #[arg(long, value_parser = parse_limit)]
    pub max_snapshot_bytes: Option<u64>,
    /// Where it keeps its log and ledger state (created on first use; one node's only).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Cluster name (default tally): the same on every node; nodes refuse data and peers of another
    /// cluster.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Start a new cluster with this node and the --peer nodes as voters.
    #[arg(long)]
    pub bootstrap: bool,
    /// Another initial voter, as ID=CLIENT_HOST:PORT,PEER_HOST:PORT@SITE (with --bootstrap).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<PeerConfig>,
    /// Join the cluster of the node whose peer door is at this address.
    #[arg(long)]
    pub join: Option<String>,
    /// How long followers wait without a leader's heartbeat before an election, in ms (default
    /// 150; randomized up to 1.25 times that). Raise it for sites far apart.
    #[arg(long)]
    pub election_timeout_ms: Option<u64>,
    /// How often the leader sends heartbeats, in ms (default 50): well below the election timeout.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// How long the leader waits for more writes to join an entry, in µs (default 0: entries
    /// form while the previous one is written).
    #[arg(long)]
    pub group_commit_delay_us: Option<u64>,
    /// Snapshot the ledger state every this many log entries (default 20000).
    #[arg(long)]
    pub snapshot_entries: Option<u64>,
    /// Log entries kept behind a snapshot at least (default 1000).
    #[arg(long)]
    pub snapshot_log_keep: Option<u64>,
    /// Keep at least this much of the newest log behind a snapshot, e.g. 4GiB (the default) or 0,
    /// so that a node that was away catches up from the entries it missed instead of receiving
    /// the whole state.
    #[arg(long, value_parser = parse_size)]
    pub log_keep_bytes: Option<u64>,
    /// ... and everything written within this long, e.g. 15m (the default), 1h or 0s; whichever
    /// of the two reaches further back.
    #[arg(long, value_parser = super::parse_duration)]
    pub log_keep_time: Option<std::time::Duration>,
    /// Memory for the ledger state's caches, e.g. 512MiB or 2GiB (default 768MiB): half decoded
    /// accounts, a quarter the page store's cache, a quarter the runs' descriptions.
    #[arg(long, value_parser = parse_bytes)]
    pub cache_bytes: Option<u64>,
    /// Write what was applied to the ledger state's store at least this often (default 200).
    /// Applying is memory work; a restart re-applies the log since the last checkpoint.
    #[arg(long)]
    pub checkpoint_interval_ms: Option<u64>,
    /// ... or once this much memory waits for a checkpoint, e.g. 64MiB (the default).
    #[arg(long, value_parser = parse_bytes)]
    pub checkpoint_bytes: Option<u64>,
    /// Apply semantics versions up to N only, as a build that knows no later one would (default:
    /// every version this build knows). For rehearsing a rolling upgrade from an older build.
    #[arg(long, hide = true)]
    pub semantics_max: Option<u32>,
    /// Reach node ID's peer door at HOST:PORT instead of its advertised peer address, as
    /// ID=HOST:PORT (repeatable): for a NAT, a tunnel, or a fault-injecting proxy.
    #[arg(long = "route", value_parser = parse_route)]
    pub routes: Vec<(u64, String)>,
    /// How far this node's clock may be from a majority of the voters' clocks before it stops
    /// stamping entries as leader (default 1000).
    #[arg(long)]
    pub clock_tolerance_ms: Option<u64>,
    /// How the node logs to stderr: text (one line per event) or json (one JSON object per
    /// line, for log collectors).
    #[arg(long, value_enum, env = "TALLY_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Test hook for chaos runs: a file holding `OFFSET_MS [DRIFT_PPM]` that skews this node's
    /// clock while it runs (re-read as it changes; missing means no skew). Never in production.
    #[arg(long, hide = true)]
    pub clock_skew_file: Option<PathBuf>,
    /// Test hook: every applied entry takes this many milliseconds longer, as on a node with a
    /// backlog to apply. Never in production.
    #[arg(long, hide = true)]
    pub apply_delay_ms: Option<u64>,
    /// Test hook for chaos runs: WAL segments roll over at this size (e.g. 1MiB) instead of
    /// 64 MiB. Never in production.
    #[arg(long, hide = true, value_parser = parse_bytes)]
    pub wal_segment_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub(super) fn parse_peer(text: &str) -> Result<PeerConfig, String> {
    let error = || {
        format!(
            "'{text}': expected ID=CLIENT_HOST:PORT,PEER_HOST:PORT@SITE, e.g. 2=127.0.0.1:7102,127.0.0.1:7202@site-b"
        )
    };
    let (id, rest) = text.split_once('=').ok_or_else(error)?;
    let (addresses, site) = rest.rsplit_once('@').ok_or_else(error)?;
    let (address, peer_address) = addresses.split_once(',').ok_or_else(error)?;
    let id = id.parse().map_err(|_| error())?;
    if address.is_empty() || peer_address.is_empty() || site.is_empty() {
        return Err(error());
    }
    Ok(PeerConfig { id, address: address.into(), peer_address: peer_address.into(), site: site.into() })
}

/// A size in bytes of at least 1MiB: a number, optionally followed by KiB, MiB or GiB.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size(text)?
        .checked_mul(1)
        .filter(|bytes| *bytes >= 1 << 20)
        .ok_or_else(|| format!("'{text}': at least 1MiB and at most {} bytes", u64::MAX))
}

/// A limit in bytes, above 0: a number, optionally followed by KiB, MiB, GiB or TiB.
fn parse_limit(text: &str) -> Result<u64, String> {
    parse_size(text)?.checked_mul(1).filter(|bytes| *bytes > 0).ok_or_else(|| format!("'{text}': above 0"))
}

fn parse_size(text: &str) -> Result<u64, String> {
    let error = || format!("'{text}': expected a size such as 536870912, 512MiB or 2GiB");
    let too_large = || format!("'{text}': at most {} bytes", u64::MAX);
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let shift = match unit.trim() {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(error()),
    };
    if digits.is_empty() {
        return Err(error());
    }
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    number.checked_mul(1 << shift).ok_or_else(too_large)
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
        peer_listen: args
            .peer_listen
            .or(file.as_ref().map(|f| f.peer_listen))
            .ok_or_else(|| missing("peer-listen"))?,
        peer_advertise: args.peer_advertise.or(file.as_ref().and_then(|f| f.peer_advertise.clone())),
        tls: match (args.ca, args.cert, args.key) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::security::tls::TlsFiles { ca, cert, key }),
            _ => file.as_ref().and_then(|f| f.tls.clone()),
        },
        insecure: args.insecure || file.as_ref().is_some_and(|f| f.insecure),
        connections_max: args
            .max_connections
            .or(file.as_ref().map(|f| f.connections_max))
            .unwrap_or_else(crate::node::default_connections_max),
        idle_timeout_s: args
            .idle_timeout_s
            .or(file.as_ref().map(|f| f.idle_timeout_s))
            .unwrap_or_else(crate::node::default_idle_timeout_s),
        receiving_bytes_max: args
            .max_receiving_bytes
            .or(file.as_ref().map(|f| f.receiving_bytes_max))
            .unwrap_or_else(crate::node::default_receiving_bytes_max),
        subscribers_max: args
            .max_subscribers
            .or(file.as_ref().map(|f| f.subscribers_max))
            .unwrap_or_else(crate::node::default_subscribers_max),
        queued_bytes_max: args
            .max_queued_bytes
            .or(file.as_ref().map(|f| f.queued_bytes_max))
            .unwrap_or_else(crate::node::default_queued_bytes_max),
        queue_wait_max_ms: args
            .max_queue_wait_ms
            .or(file.as_ref().map(|f| f.queue_wait_max_ms))
            .unwrap_or_else(crate::node::default_queue_wait_max_ms),
        pace_lag_ms: args
            .pace_lag_ms
            .or(file.as_ref().map(|f| f.pace_lag_ms))
            .unwrap_or_else(crate::node::default_pace_lag_ms),
        pace_lag_all_ms: args.pace_lag_all_ms.or(file.as_ref().map(|f| f.pace_lag_all_ms)).unwrap_or(0),
        entry_apply_target_ms: args
            .entry_apply_target_ms
            .or(file.as_ref().map(|f| f.entry_apply_target_ms))
            .unwrap_or_else(crate::node::default_entry_apply_target_ms),
        metrics_listen: args.metrics_listen.or(file.as_ref().and_then(|f| f.metrics_listen)),
        snapshot_bytes_max: args
            .max_snapshot_bytes
            .or(file.as_ref().map(|f| f.snapshot_bytes_max))
            .unwrap_or_else(crate::node::default_snapshot_bytes_max),
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
        log_keep_bytes: args
            .log_keep_bytes
            .or(file.as_ref().map(|f| f.log_keep_bytes))
            .unwrap_or_else(crate::node::default_log_keep_bytes),
        log_keep_ms: args
            .log_keep_time
            .map(|time| time.as_millis() as u64)
            .or(file.as_ref().map(|f| f.log_keep_ms))
            .unwrap_or_else(crate::node::default_log_keep_ms),
        cache_bytes: args
            .cache_bytes
            .or(file.as_ref().map(|f| f.cache_bytes))
            .unwrap_or_else(crate::node::default_cache_bytes),
        checkpoint_interval_ms: args
            .checkpoint_interval_ms
            .or(file.as_ref().map(|f| f.checkpoint_interval_ms))
            .unwrap_or_else(crate::node::default_checkpoint_interval_ms),
        checkpoint_bytes: args
            .checkpoint_bytes
            .or(file.as_ref().map(|f| f.checkpoint_bytes))
            .unwrap_or_else(crate::node::default_checkpoint_bytes),
        semantics_max: args
            .semantics_max
            .or(file.as_ref().map(|f| f.semantics_max))
            .unwrap_or(ledger::semantics::MAX),
        routes: if args.routes.is_empty() {
            file.as_ref().map(|f| f.routes.clone()).unwrap_or_default()
        } else {
            args.routes.into_iter().collect()
        },
        clock_tolerance_ms: args
            .clock_tolerance_ms
            .or(file.as_ref().map(|f| f.clock_tolerance_ms))
            .unwrap_or(crate::clock::TOLERANCE_MS_DEFAULT),
        clock_skew_file: args.clock_skew_file.or(file.as_ref().and_then(|f| f.clock_skew_file.clone())),
        apply_delay_ms: args.apply_delay_ms.or(file.as_ref().map(|f| f.apply_delay_ms)).unwrap_or(0),
        wal_segment_bytes: args.wal_segment_bytes.or(file.as_ref().and_then(|f| f.wal_segment_bytes)),
    };
    if config
        .wal_segment_bytes
        .is_some_and(|bytes| bytes == 0 || bytes > crate::storage::wal::SEGMENT_BYTES_MAX)
    {
        return Err(format!(
            "--wal-segment-bytes must be between 1 and {} bytes",
            crate::storage::wal::SEGMENT_BYTES_MAX
        ));
    }
    if config.id == 0 {
        return Err("--id must not be 0".into());
    }
    if config.connections_max == 0 || config.idle_timeout_s == 0 || config.subscribers_max == 0 {
        return Err("--max-connections, --idle-timeout-s and --max-subscribers must be above 0".into());
    }
    if config.receiving_bytes_max < RECEIVING_BYTES_MIN {
        return Err(format!(
            "--max-receiving-bytes must be at least {} MiB: twice the largest request, so that one always fits",
            RECEIVING_BYTES_MIN >> 20
        ));
    }
    if config.peer_listen == config.listen {
        return Err(format!(
            "--peer-listen {} is the client door's --listen: the peer door needs its own address",
            config.peer_listen
        ));
    }
    if config.cluster.is_empty()
        || !config.cluster.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("--cluster '{}': use letters, digits, '-' and '_'", config.cluster));
    }
    if config.site.is_empty() {
        return Err("--site must not be empty".into());
    }
    if config.clock_tolerance_ms < CLOCK_TOLERANCE_MS_MIN {
        return Err(format!(
            "--clock-tolerance-ms must be at least {CLOCK_TOLERANCE_MS_MIN}: a round trip between sites must fit in a quarter of it"
        ));
    }
    if config.heartbeat_ms == 0 || config.election_timeout_ms <= config.heartbeat_ms * 2 {
        return Err("--election-timeout-ms must be more than twice --heartbeat-ms".into());
    }
    Ok(config)
}

/// Below this, round trips between sites would make most clock samples too uncertain to use.
const CLOCK_TOLERANCE_MS_MIN: u64 = 100;
/// The smallest `--max-receiving-bytes`: twice the largest request the client door decodes.
const RECEIVING_BYTES_MIN: u64 = 2 * crate::service::LEDGER_REQUEST_BYTES_MAX as u64;

/// Says what the node does as a whole (started, stopped, why it cannot go on): a plain line on
/// stderr, or with `--log-format json` a log event like every other.
fn say(format: LogFormat, error: bool, message: &str) {
    match (format, error) {
        (LogFormat::Text, false) => eprintln!("tally: {message}"),
        (LogFormat::Text, true) => eprintln!("tally: error: {message}"),
        (LogFormat::Json, false) => tracing::info!("{message}"),
        (LogFormat::Json, true) => tracing::error!("{message}"),
    }
}

pub async fn run(args: ServeArgs) -> ExitCode {
    // Taken before anything slow (opening the state, replaying the log): a SIGHUP meant for a
    // certificate reload killed a node that was still starting (`main` ignores it until here).
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let format = args.log_format;
    init_logging(format);
    let fail = |message: &str| {
        say(format, true, message);
        ExitCode::FAILURE
    };
    let config = match node_config(args) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    let id = config.id;
    let (listen, peer_listen) = (config.listen, config.peer_listen);
    let node = match crate::node::start(config).await {
        Ok(node) => node,
        Err(error @ crate::node::StartError::DataUnreadable(_)) => {
            say(format, true, &error.to_string());
            return ExitCode::from(crate::node::EXIT_DATA_UNREADABLE);
        }
        Err(error @ crate::node::StartError::StateDamaged(_)) => {
            say(format, true, &error.to_string());
            return ExitCode::from(crate::node::EXIT_STORAGE_FAILED);
        }
        Err(error) => return fail(&error.to_string()),
    };
    say(format, false, &format!("node {id} serving clients on {listen}, peers on {peer_listen}"));
    tokio::spawn(crate::node::log_leadership(node.clone()));
    match (node.tls.clone(), hangups) {
        (Some(tls), Ok(hangups)) => drop(tokio::spawn(reload_on_hangup(id, tls, hangups))),
        (Some(_), Err(_)) => {
            tracing::warn!(node = id, "cannot watch for SIGHUP: certificates reload only with a restart")
        }
        // Nothing to reload. (tokio never takes a handler back: a SIGHUP still does not stop
        // the node once the stream is dropped.)
        (None, _) => {}
    }
    crate::metrics::init();
    if let Some(address) = node.config.metrics_listen
        && let Err(error) = crate::node::serve_metrics(node.clone(), address).await
    {
        return fail(&error);
    }
    // A node whose storage failed stops (fail-stop) rather than serve on without durability.
    let failure = Arc::new(std::sync::Mutex::new(None));
    let shutdown = {
        let (failure, node) = (failure.clone(), node.clone());
        async move {
            tokio::select! {
                _ = crate::service::shutdown_signal() => {}
                error = crate::node::fatal(node) => *failure.lock().unwrap() = Some(error),
            }
        }
    };
    let served = crate::service::serve(node, shutdown).await;
    match (served, failure.lock().unwrap().take()) {
        (_, Some(error)) => {
            let message = format!(
                "node {id} stops: {error}. It does not serve without its storage; fix the disk and \
                 restart it, and it recovers from what is on disk"
            );
            say(format, true, &message);
            ExitCode::from(crate::node::EXIT_STORAGE_FAILED)
        }
        (Ok(()), None) => {
            say(format, false, &format!("node {id} stopped"));
            ExitCode::SUCCESS
        }
        (Err(error), None) => fail(&error),
    }
}

/// Reads the TLS files again on every SIGHUP: renewed certificates without a restart.
async fn reload_on_hangup(
    id: u64,
    tls: Arc<crate::security::tls::Tls>,
    mut hangups: tokio::signal::unix::Signal,
) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => {
                tracing::info!(node = id, "SIGHUP: TLS certificates reloaded; new connections use them")
            }
            Err(e) => {
                tracing::error!(node = id, "SIGHUP: TLS certificates not reloaded, the old ones stay: {e}")
            }
        }
    }
}

/// Logs to stderr, filtered by `TALLY_LOG` (tracing's env-filter syntax); by default this
/// node's own events and Raft's warnings and errors, less openraft's about peers it could not
/// reach (`net::reach` says those once per turn of events instead).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,raft_node=info"));
    let filter = filter.and(crate::net::reach::RaftNoise);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false);
    let registry = tracing_subscriber::registry();
    let _ = match format {
        LogFormat::Text => registry.with(tracing_subscriber::Layer::with_filter(logs, filter)).try_init(),
        LogFormat::Json => registry
            .with(tracing_subscriber::Layer::with_filter(logs.json().flatten_event(true), filter))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn cache_sizes_parse_with_units_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_bytes("536870912"), Ok(512 << 20));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024KiB"), Ok(1 << 20));
        for bad in ["", "MiB", "12", "5TB", "1.5GiB", "-1GiB", "99999999999999999999GiB"] {
            let error = parse_bytes(bad).expect_err(bad);
            assert!(error.contains(&format!("'{bad}'")), "{error}");
        }
    }
}
