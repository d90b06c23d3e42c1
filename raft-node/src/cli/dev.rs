//! `tally dev`: three nodes in three sites on 127.0.0.1, as separate processes of this binary,
//! for a newcomer's first look. Ctrl-C stops them cleanly (SIGTERM, then wait).

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

/// Where `tally dev` keeps its data and certificates unless told otherwise.
pub const DIR_DEFAULT: &str = "tally-dev";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = false)]
pub struct DevArgs {
    /// Where the nodes keep their data, and the cluster's throwaway CA and certificates (under
    /// certs/, made on first use).
    #[arg(long, default_value = DIR_DEFAULT, global = true)]
    pub dir: PathBuf,
    /// Node i's client door is 127.0.0.1:(base_port + i), its peer door 127.0.0.1:(base_port +
    /// 100 + i), its metrics 127.0.0.1:(base_port + 200 + i).
    #[arg(long, default_value_t = 7100, global = true)]
    pub base_port: u16,
    #[command(subcommand)]
    pub action: Option<DevAction>,
}

/// What `tally dev` does besides starting the three nodes.
#[derive(Subcommand)]
pub enum DevAction {
    /// Start one node of the dev cluster again (one that exited or was killed), in this terminal;
    /// Ctrl-C stops it.
    StartNode {
        /// Its id: 1-3, or one added with add-node.
        id: u64,
    },
    /// Add a node to the running dev cluster: make its certificate, start it in this terminal,
    /// and add it (`tally cluster add`); Ctrl-C stops it (it stays a member: `tally cluster
    /// remove --id ID` removes it).
    AddNode {
        /// Its id (4 or more).
        id: u64,
        /// Its site (default: site-d for node 4, site-e for 5...).
        #[arg(long)]
        site: Option<String>,
        /// Keep it a learner (a copy that does not vote).
        #[arg(long)]
        learner: bool,
    },
}

const NODES: u64 = 3;
/// How long to wait for the cluster to elect a leader before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After this long without a leader, the wait is said aloud.
const START_PATIENCE: Duration = Duration::from_secs(3);

fn address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + id)
}

fn peer_address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + 100 + id)
}

fn metrics_address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + 200 + id)
}

/// Node `id`'s site: site-a for node 1, site-b for 2, and so on.
fn site_of(id: u64) -> String {
    let letter = (b'a' + ((id.max(1) - 1) % 26) as u8) as char;
    format!("site-{letter}")
}

fn serve_command(args: &DevArgs, id: u64, site: &str, bootstrap: bool) -> std::io::Result<Command> {
    let exe = std::env::current_exe()?;
    let data_dir = args.dir.join(format!("node-{id}"));
    let mut command = Command::new(exe);
    command.args(["serve", "--cluster", CLUSTER, "--id", &id.to_string(), "--site", site]);
    command.args(["--listen", &address(args, id), "--peer-listen", &peer_address(args, id), "--data-dir"]);
    command.arg(&data_dir);
    command.args(["--metrics-listen", &metrics_address(args, id)]);
    let certs = args.dir.join(super::DEV_CERTS);
    let (cert, key) = crate::security::certs::paths(&certs, &crate::security::roles::Role::Node(id));
    command.arg("--ca").arg(certs.join(crate::security::certs::CA_CERT));
    command.arg("--cert").arg(cert).arg("--key").arg(key);
    if bootstrap {
        command.arg("--bootstrap");
        for peer in 2..=NODES {
            let addresses = format!("{},{}", address(args, peer), peer_address(args, peer));
            command.args(["--peer", &format!("{peer}={addresses}@{}", site_of(peer))]);
        }
    }
    Ok(command)
}

/// The dev cluster's name (`--cluster`).
const CLUSTER: &str = "dev";

fn terminate(children: &mut [Child]) {
    for child in children.iter() {
        // SIGTERM: each node shuts down gracefully.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

pub async fn run(mut args: DevArgs) -> ExitCode {
    let result = match args.action.take() {
        None => return run_cluster(&args).await,
        Some(DevAction::StartNode { id }) => start_node(&args, id).await,
        Some(DevAction::AddNode { id, site, learner }) => add_node(&args, id, site, learner).await,
    };
    result.unwrap_or_else(|error| {
        eprintln!("tally dev: {error}");
        ExitCode::FAILURE
    })
}

/// The directory and the certificates of nodes 1-3 and of the operator (made on first use);
/// how the operator connects.
fn prepare(args: &DevArgs) -> Result<tally_client::Security, String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let certs = args.dir.join(super::DEV_CERTS);
    crate::security::certs::make_local(&certs, NODES)
        .map_err(|e| format!("cannot make the cluster's certificates in {}: {e}", certs.display()))?;
    super::local_operator(&certs)
}

/// `tally dev` as it was started (its --dir and --base-port when not the defaults), for the
/// commands it suggests.
fn invocation(args: &DevArgs) -> String {
    let mut words = "tally dev".to_string();
    if args.dir != std::path::Path::new(DIR_DEFAULT) {
        words.push_str(&format!(" --dir {}", args.dir.display()));
    }
    if args.base_port != 7100 {
        words.push_str(&format!(" --base-port {}", args.base_port));
    }
    words
}

async fn run_cluster(args: &DevArgs) -> ExitCode {
    let security = match prepare(args) {
        Ok(security) => security,
        Err(e) => {
            eprintln!("tally dev: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut children = Vec::new();
    for id in 1..=NODES {
        match serve_command(args, id, &site_of(id), id == 1).and_then(|mut command| command.spawn()) {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("tally dev: cannot start node {id}: {e}");
                terminate(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    let nodes: Vec<String> = (1..=NODES).map(|id| address(args, id)).collect();
    let client =
        tally_client::Client::new(&nodes, Duration::from_secs(2), &security).expect("valid addresses");
    let started = Instant::now();
    let mut exited: Vec<bool> = vec![false; children.len()];
    let mut said_waiting = false;
    let leader = loop {
        for (index, child) in children.iter_mut().enumerate() {
            if !exited[index]
                && let Ok(Some(status)) = child.try_wait()
            {
                exited[index] = true;
                eprintln!("tally dev: node {} exited at start ({status}): its error is above", index + 1);
            }
        }
        if exited.iter().all(|e| *e) {
            eprintln!("tally dev: every node exited at start, nothing runs: see their errors above");
            return ExitCode::FAILURE;
        }
        let running = exited.iter().filter(|e| !**e).count();
        if let Ok(status) = client.cluster_status().await
            && status.leader_id != 0
            && status.nodes.iter().filter(|n| n.reachable).count() >= running
        {
            break status.leader_id;
        }
        if started.elapsed() > START_TIMEOUT {
            eprintln!("tally dev: the cluster did not elect a leader within {START_TIMEOUT:?}; stopping");
            terminate(&mut children);
            return ExitCode::FAILURE;
        }
        if !said_waiting && started.elapsed() > START_PATIENCE {
            said_waiting = true;
            eprintln!(
                "tally dev: waiting for the nodes to elect a leader (up to {} s)...",
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("tally dev: 3 nodes in 3 sites, data under {}", args.dir.display());
    for (id, node) in nodes.iter().enumerate() {
        let id = id as u64 + 1;
        println!(
            "  node {id} ({}): {node} (peer door {}, metrics http://{}/metrics)",
            site_of(id),
            peer_address(args, id),
            metrics_address(args, id)
        );
    }
    let certs = args.dir.join(super::DEV_CERTS);
    println!("  leader: node {leader}");
    println!("  TLS: CA and certificates in {} (the CLI finds them when run from here)", certs.display());
    println!();
    println!("Try, in another terminal:");
    println!("  tally account create --id 1 --ledger 1 --code 1");
    println!("  tally account create --id 2 --ledger 1 --code 1");
    println!("  tally transfer --id 1 --debit 1 --credit 2 --amount 100 --ledger 1 --code 1");
    println!("  tally lookup account 1 2");
    println!("  tally cluster status");
    println!("  tally backup --out ledger.tally");
    println!("  {} add-node 4        (a fourth node, in site-d)", invocation(args));
    println!("Ctrl-C stops the cluster.");
    let mut terminate_signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate_signal.recv() => break,
            _ = poll.tick() => {
                for (index, child) in children.iter_mut().enumerate() {
                    if !exited[index] && let Ok(Some(status)) = child.try_wait() {
                        exited[index] = true;
                        let id = index + 1;
                        let running: Vec<String> = exited
                            .iter()
                            .enumerate()
                            .filter(|(_, e)| !**e)
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        let still = match running.len() {
                            0 => "none of the nodes tally dev started runs now".to_string(),
                            1 => format!("of the nodes tally dev started, only node {} runs: writes stop until a \
                                          second is back", running[0]),
                            _ => format!("nodes {} still run, a majority: the cluster goes on", running.join(" and ")),
                        };
                        eprintln!(
                            "tally dev: node {id} exited ({status}); {still}. Start it again in another terminal: \
                             {} start-node {id}",
                            invocation(args)
                        );
                    }
                }
                if exited.iter().all(|e| *e) {
                    eprintln!(
                        "tally dev: stopping, with none of its nodes left; `{}` starts them again on their data",
                        invocation(args)
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    println!("tally dev: stopping");
    terminate(&mut children);
    ExitCode::SUCCESS
}

/// Runs `child` until it exits, or until Ctrl-C or SIGTERM, which it passes on.
async fn foreground(mut child: Child, id: u64) -> Result<ExitCode, String> {
    let mut terminate_signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate_signal.recv() => break,
            _ = poll.tick() => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("node {id} exited ({status}): its error is above"));
                }
            }
        }
    }
    println!("tally dev: stopping node {id}");
    terminate(std::slice::from_mut(&mut child));
    Ok(ExitCode::SUCCESS)
}

/// `tally dev start-node ID`: node ID on its data directory again, in the foreground.
async fn start_node(args: &DevArgs, id: u64) -> Result<ExitCode, String> {
    prepare(args)?;
    let data_dir = args.dir.join(format!("node-{id}"));
    if id > NODES && !data_dir.exists() {
        return Err(format!("node {id} was never added: {} add-node {id}", invocation(args)));
    }
    let child = serve_command(args, id, &site_of(id), false)
        .and_then(|mut command| command.spawn())
        .map_err(|e| format!("cannot start node {id}: {e}"))?;
    println!(
        "tally dev: node {id} ({}) starts on {}, client door {}; Ctrl-C stops it",
        site_of(id),
        data_dir.display(),
        address(args, id)
    );
    foreground(child, id).await
}

/// `tally dev add-node ID`: a new node's certificate, the node started, then added to the
/// cluster; it runs in the foreground.
async fn add_node(args: &DevArgs, id: u64, site: Option<String>, learner: bool) -> Result<ExitCode, String> {
    if id <= NODES {
        return Err(format!(
            "nodes 1-{NODES} are the dev cluster's own; to start one again: {} start-node {id}",
            invocation(args)
        ));
    }
    let security = prepare(args)?;
    let certs = args.dir.join(super::DEV_CERTS);
    crate::security::certs::make_local(&certs, id)
        .map_err(|e| format!("cannot make node {id}'s certificate in {}: {e}", certs.display()))?;
    let site = site.unwrap_or_else(|| site_of(id));
    let mut child = serve_command(args, id, &site, false)
        .and_then(|mut command| command.spawn())
        .map_err(|e| format!("cannot start node {id}: {e}"))?;
    let nodes: Vec<String> = (1..=NODES).map(|n| address(args, n)).collect();
    let client = tally_client::Client::new(&nodes, Duration::from_secs(30), &security)?;
    let new_node = tally_client::Client::new(&[address(args, id)], Duration::from_secs(1), &security)?;
    let started = Instant::now();
    while new_node.node_status(&address(args, id)).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("node {id} exited at start ({status}): its error is above"));
        }
        if started.elapsed() > START_TIMEOUT {
            terminate(std::slice::from_mut(&mut child));
            return Err(format!("node {id} did not answer within {START_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let request = tally_client::v1::AddNodeRequest {
        id,
        address: address(args, id),
        peer_address: peer_address(args, id),
        site: site.clone(),
        learner_only: learner,
        force: false,
        incarnation: 0,
    };
    if let Err(error) = client.add_node(request).await {
        terminate(std::slice::from_mut(&mut child));
        return Err(format!("cannot add node {id}: {error}"));
    }
    let role = if learner { "a learner" } else { "a voter" };
    println!(
        "tally dev: node {id} is {role} in {site}, client door {}; Ctrl-C stops it (it stays a member: \
         `tally cluster remove --id {id}` removes it, {} start-node {id} starts it again)",
        address(args, id),
        invocation(args)
    );
    foreground(child, id).await
}
