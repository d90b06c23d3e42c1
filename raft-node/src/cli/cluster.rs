//! `tally cluster`: status and membership, for operators.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;
use tally_client::v1;

use super::{ClientArgs, client, status_name, table};

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
        /// Its client door (its --advertise, or --listen).
        #[arg(long)]
        address: String,
        /// Its peer door (its --peer-advertise, or --peer-listen).
        #[arg(long)]
        peer_address: String,
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
    /// Bring back a node whose disk was lost: start it again, empty, under its old id, then run
    /// this. It rejoins as a new incarnation, catches up and votes again.
    Replace {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        id: u64,
    },
    TransferLeader {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        to: u64,
    },
    /// Have the leader snapshot its state now; with --purge-log, also drop its whole log behind
    /// the snapshot (members behind it then catch up from the snapshot).
    Snapshot {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        purge_log: bool,
    },
}

fn print_status(json: bool, status: &v1::StatusReply) {
    if json {
        let nodes: Vec<_> = status
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.id, "address": n.address, "peer_address": n.peer_address, "site": n.site,
                    "role": status_name(v1::NodeRole::try_from(n.role).unwrap_or_default().as_str_name(), "NODE_ROLE_"),
                    "leader": n.is_leader, "reachable": n.reachable, "term": n.term,
                    "last_log_index": n.last_log_index, "applied_index": n.applied_index,
                    "replication_lag": n.replication_lag, "state_digest": n.state_digest,
                    "incarnation": n.incarnation, "needs_replace": n.needs_replace,
                    "clock_offset_ms": n.clock_offset_ms, "clock_synchronized": n.clock_synchronized,
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
        "disk",
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
            if n.needs_replace { "LOST: replace".into() } else { String::new() },
        ]);
    }
    println!("{nodes}");
    for n in status.nodes.iter().filter(|n| n.needs_replace) {
        println!(
            "node {} runs on a new data directory (its disk was lost): run `tally cluster replace --id {}`",
            n.id, n.id
        );
    }
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

pub async fn run(command: ClusterCommand) -> Result<ExitCode, String> {
    let (args, status) = match command {
        ClusterCommand::Status { client: args } => {
            let status = client(&args)?.cluster_status().await;
            (args, status)
        }
        ClusterCommand::Add { client: args, id, address, peer_address, site, learner, force } => {
            let request = v1::AddNodeRequest {
                id,
                address,
                peer_address,
                site,
                learner_only: learner,
                force,
                incarnation: 0,
            };
            let status = client(&args)?.add_node(request).await;
            (args, status)
        }
        ClusterCommand::Remove { client: args, id, force } => {
            let status = client(&args)?.remove_node(v1::RemoveNodeRequest { id, force }).await;
            (args, status)
        }
        ClusterCommand::Replace { client: args, id } => {
            let status = client(&args)?.replace_node(id).await;
            (args, status)
        }
        ClusterCommand::TransferLeader { client: args, to } => {
            let status = client(&args)?.transfer_leader(to).await;
            (args, status)
        }
        ClusterCommand::Snapshot { client: args, purge_log } => {
            let taken = client(&args)?.take_snapshot(purge_log).await.map_err(|e| e.to_string())?;
            if args.json {
                println!("{}", serde_json::json!({ "index": taken.index, "purged": taken.purged }));
            } else {
                println!("snapshot up to log index {}; log purged up to {}", taken.index, taken.purged);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let status = status.map_err(|e| e.to_string())?;
    print_status(args.json, &status);
    Ok(ExitCode::SUCCESS)
}
