//! `tally dev`: three nodes in three sites on 127.0.0.1, as separate processes of this binary,
//! for a newcomer's first look. Ctrl-C stops them cleanly (SIGTERM, then wait).

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Args;

/// Where `tally dev` keeps its data and certificates unless told otherwise.
pub const DIR_DEFAULT: &str = "tally-dev";

#[derive(Args)]
pub struct DevArgs {
    /// Where the three nodes keep their data, and the cluster's throwaway CA and certificates
    /// (under certs/, made on first use).
    #[arg(long, default_value = DIR_DEFAULT)]
    pub dir: PathBuf,
    /// Node i's client door is 127.0.0.1:(base_port + i), its peer door 127.0.0.1:(base_port +
    /// 100 + i), its metrics 127.0.0.1:(base_port + 200 + i).
    #[arg(long, default_value_t = 7100)]
    pub base_port: u16,
}

const NODES: u64 = 3;
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
/// How long to wait for the cluster to elect a leader before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + id)
}

fn peer_address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + 100 + id)
}

fn metrics_address(args: &DevArgs, id: u64) -> String {
    format!("127.0.0.1:{}", args.base_port as u64 + 200 + id)
}

fn spawn_node(args: &DevArgs, id: u64) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let data_dir = args.dir.join(format!("node-{id}"));
    let mut command = Command::new(exe);
    command.args(["serve", "--cluster", "dev", "--id", &id.to_string(), "--site", SITES[id as usize - 1]]);
    command.args(["--listen", &address(args, id), "--peer-listen", &peer_address(args, id), "--data-dir"]);
    command.arg(&data_dir);
    command.args(["--metrics-listen", &metrics_address(args, id)]);
    let certs = args.dir.join(super::DEV_CERTS);
    let (cert, key) = crate::security::certs::paths(&certs, &crate::security::roles::Role::Node(id));
    command.arg("--ca").arg(certs.join(crate::security::certs::CA_CERT));
    command.arg("--cert").arg(cert).arg("--key").arg(key);
    if id == 1 {
        command.arg("--bootstrap");
        for peer in 2..=NODES {
            let addresses = format!("{},{}", address(args, peer), peer_address(args, peer));
            command.args(["--peer", &format!("{peer}={addresses}@{}", SITES[peer as usize - 1])]);
        }
    }
    command.spawn()
}

fn terminate(children: &mut [Child]) {
    for child in children.iter() {
        // SIGTERM: each node shuts down gracefully.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
}

pub async fn run(args: DevArgs) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(&args.dir) {
        eprintln!("tally dev: cannot create {}: {e}", args.dir.display());
        return ExitCode::FAILURE;
    }
    let certs = args.dir.join(super::DEV_CERTS);
    if let Err(e) = crate::security::certs::make_local(&certs, NODES) {
        eprintln!("tally dev: cannot make the cluster's certificates in {}: {e}", certs.display());
        return ExitCode::FAILURE;
    }
    let security = match super::local_operator(&certs) {
        Ok(security) => security,
        Err(e) => {
            eprintln!("tally dev: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut children = Vec::new();
    for id in 1..=NODES {
        match spawn_node(&args, id) {
            Ok(child) => children.push(child),
            Err(e) => {
                eprintln!("tally dev: cannot start node {id}: {e}");
                terminate(&mut children);
                return ExitCode::FAILURE;
            }
        }
    }
    let nodes: Vec<String> = (1..=NODES).map(|id| address(&args, id)).collect();
    let client =
        tally_client::Client::new(&nodes, Duration::from_secs(2), &security).expect("valid addresses");
    let started = Instant::now();
    let leader = loop {
        if let Ok(status) = client.cluster_status().await
            && status.leader_id != 0
            && status.nodes.iter().all(|n| n.reachable)
        {
            break status.leader_id;
        }
        if started.elapsed() > START_TIMEOUT {
            eprintln!("tally dev: the cluster did not elect a leader within {START_TIMEOUT:?}; stopping");
            terminate(&mut children);
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("tally dev: 3 nodes in 3 sites, data under {}", args.dir.display());
    for (id, node) in nodes.iter().enumerate() {
        let id = id as u64 + 1;
        println!(
            "  node {id} ({}): {node} (peer door {}, metrics http://{}/metrics)",
            SITES[id as usize - 1],
            peer_address(&args, id),
            metrics_address(&args, id)
        );
    }
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
    println!("Ctrl-C stops the cluster.");
    let mut terminate_signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut reported = [false; NODES as usize];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate_signal.recv() => break,
            _ = poll.tick() => {
                for (index, child) in children.iter_mut().enumerate() {
                    if !reported[index] && let Ok(Some(status)) = child.try_wait() {
                        reported[index] = true;
                        eprintln!("tally dev: node {} exited ({status}); the others keep running", index + 1);
                    }
                }
            }
        }
    }
    println!("tally dev: stopping");
    terminate(&mut children);
    ExitCode::SUCCESS
}
